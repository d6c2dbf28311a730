//! txt2img on the embedded tiny-sd: 128×128, 20 DDIM steps, guidance 5, batch 1 and 4 — the
//! same work as the PyTorch + diffusers peer figure (README, "Performance"). Model loading is
//! outside the timed loop, as in the peer measurement.

use candle_core::{DType, Device};
use criterion::{Criterion, criterion_group, criterion_main};
use loragate::model::resolve::resolve_model;
use loragate::model::{GenerationParams, Pipeline};

fn txt2img(c: &mut Criterion) {
    let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
    let params = GenerationParams { steps: 20, guidance: 5.0, width: 128, height: 128, ..Default::default() };
    let prompts = [
        "red circle, large, in the center, white background",
        "blue square, small, on the left, sunset background",
        "yellow triangle, large, at the bottom, night background",
        "purple diamond, on the right, grass background",
    ];
    let mut group = c.benchmark_group("txt2img_tiny_128px_20steps");
    group.sample_size(10);
    for batch in [1usize, 4] {
        let seeds: Vec<u64> = (0..batch as u64).collect();
        group.bench_function(format!("batch{batch}"), |b| {
            b.iter(|| pipe.generate(&prompts[..batch], &seeds, &params, &mut |_, _| {}).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, txt2img);
criterion_main!(benches);
