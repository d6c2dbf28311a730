//! The training work that `benches/train_step.rs` (criterion) and `examples/train_speed.rs`
//! (the side-by-side run against `benches/peer/peft_train_step.py`) both time, defined once:
//! tiny-sd, rank 8, attention targets (to_q, to_k, to_v, to_out.0), batch 4, 128 px, f32 on
//! the CPU, AdamW, 16 rendered zorb images.

use loragate::imageio::write_png;
use loragate::progress::Progress;
use loragate::train::config::Overrides;
use loragate::train::{TrainConfig, Trainer, prepare};
use loragate::world::{Concept, DatasetSpec, RenderOptions};

/// Sets up a trainer on a fresh dataset (outside any timed loop), runs `f` with it, and removes
/// the dataset. `steps` bounds the learning-rate schedule: at least the steps `f` will take.
pub fn with_trainer<R>(steps: usize, f: impl FnOnce(&mut Trainer<'_>) -> R) -> R {
    // As `loragate train` does first thing: the allocator tuned for training, candle's
    // element-wise ops on one thread unless told otherwise (docs/performance.md), then the
    // thread pools.
    loragate::device::prepare_process(loragate::device::Workload::Training);
    let dir = std::env::temp_dir().join(format!("loragate-train-work-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = DatasetSpec { concept: Some(Concept::Zorb), count: 16, seed: 0, p_keep: 0.75, fixed_order: false, mislabel: None };
    for s in spec.plan() {
        write_png(&dir.join(format!("{:04}.png", s.index)), &s.render(&RenderOptions::default()), &[]).unwrap();
        std::fs::write(dir.join(format!("{:04}.txt", s.index)), &s.caption).unwrap();
    }
    let cfg = TrainConfig::from_overrides(&Overrides {
        dataset: Some(dir.clone()),
        rank: Some(8),
        batch_size: Some(4),
        resolution: Some(vec![128]),
        steps: Some(steps),
        learning_rate: Some(1e-3),
        ..Default::default()
    })
    .unwrap();
    let (cfg, location, check) = prepare(&cfg).unwrap();
    let pipe = loragate::model::Pipeline::load(&location, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&pipe, cfg, check.images, &Progress::hidden()).unwrap();
    for _ in 0..3 {
        trainer.train_step().unwrap(); // warm-up: allocations, text cache
    }
    let out = f(&mut trainer);
    drop(trainer);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
