//! loragate's side of `scripts/compare-with-diffusers.sh`: the same txt2img work as the peer
//! script (tiny-sd, 128x128, 20 DDIM steps, guidance 5, loading excluded), median of 5 runs per
//! batch size, printed as JSON.
use std::time::Instant;

use candle_core::{DType, Device};
use loragate::model::resolve::resolve_model;
use loragate::model::{GenerationParams, Pipeline};

fn main() {
    let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
    let params = GenerationParams { steps: 20, guidance: 5.0, width: 128, height: 128, ..Default::default() };
    let prompts = [
        "red circle, large, in the center, white background",
        "blue square, small, on the left, sunset background",
        "yellow triangle, large, at the bottom, night background",
        "purple diamond, on the right, grass background",
    ];
    let mut out = Vec::new();
    for b in [1usize, 4] {
        let seeds: Vec<u64> = (0..b as u64).collect();
        pipe.generate(&prompts[..b], &seeds, &params, &mut |_, _| {}).unwrap();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                pipe.generate(&prompts[..b], &seeds, &params, &mut |_, _| {}).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        out.push(format!("\"batch{b}_s\": {:.4}", times[2]));
    }
    println!("{{{}}}", out.join(", "));
}
