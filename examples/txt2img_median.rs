//! loragate's side of `scripts/compare-with-diffusers.sh`: the same txt2img work as the peer
//! script (tiny-sd, 128x128, 20 DDIM steps, guidance 5, loading excluded), median of 5 runs per
//! batch size, printed as JSON.
use std::time::Instant;

#[path = "../benches/common/txt2img_work.rs"]
mod txt2img_work;
use txt2img_work::Txt2ImgWork;

fn main() {
    let work = Txt2ImgWork::load();
    let mut out = Vec::new();
    for b in [1usize, 4, 8] {
        work.run(b); // warm-up
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                work.run(b);
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        out.push(format!("\"batch{b}_s\": {:.4}", times[2]));
    }
    println!("{{{}}}", out.join(", "));
}
