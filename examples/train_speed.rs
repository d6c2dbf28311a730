//! Training speed on tiny-sd: rank 8, attention targets (to_q, to_k, to_v, to_out.0), batch 4,
//! 128 px, f32 on the CPU — the setting of the diffusers + PEFT peer figure (7.8 steps/s on the
//! 2-core reference machine, shared/tinyworld/README.md).
//!
//! `cargo run --release --example train_speed [STEPS]`

use std::time::Instant;

use loragate::imageio::write_png;
use loragate::progress::Progress;
use loragate::train::config::Overrides;
use loragate::train::{TrainConfig, Trainer, prepare};
use loragate::world::{Concept, DatasetSpec, RenderOptions};

fn main() -> loragate::Result<()> {
    loragate::device::pin_thread_counts();
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let dir = std::env::temp_dir().join(format!("loragate-train-speed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = DatasetSpec { concept: Some(Concept::Zorb), count: 16, seed: 0, p_keep: 0.75, fixed_order: false };
    for s in spec.plan() {
        write_png(&dir.join(format!("{:04}.png", s.index)), &s.render(&RenderOptions::default()), &[])?;
        std::fs::write(dir.join(format!("{:04}.txt", s.index)), &s.caption).unwrap();
    }
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(dir.clone()),
        rank: Some(8),
        batch_size: Some(4),
        resolution: Some(vec![128]),
        steps: Some(steps + 3),
        learning_rate: Some(1e-3),
        ..Default::default()
    })?;
    let (cfg, location, check) = prepare(&cfg)?;
    let pipe = loragate::model::Pipeline::load(&location, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let mut t = Trainer::new(&pipe, cfg, check.images, &Progress::hidden())?;
    for _ in 0..3 {
        t.train_step()?; // warm-up: allocations, text cache
    }
    let t0 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = t.train_step()?.loss;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "tiny-sd, rank 8, attention targets, batch 4, 128 px, f32 CPU ({} threads): {steps} steps in {secs:.2} s = {:.2} steps/s (last loss {loss:.4}); peer diffusers+PEFT: 7.8 steps/s",
        rayon::current_num_threads(),
        steps as f64 / secs
    );
    // The last line is for scripts/compare-training-with-peft.sh.
    println!("{{\"steps_per_s\": {}, \"threads\": {}}}", steps as f64 / secs, rayon::current_num_threads());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
