//! One LoRA training step on the embedded tiny-sd (rank 8, attention targets, batch 4, 128 px,
//! f32 CPU, AdamW): the work of the side-by-side figure against diffusers + PEFT (docs/performance.md,
//! "Performance"). Setup and warm-up are outside the timed loop.

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "common/train_work.rs"]
mod train_work;

fn train_step(c: &mut Criterion) {
    // Enough schedule for criterion's warm-up and samples (it stops at the measurement time).
    train_work::with_trainer(100_000, |trainer| {
        let mut group = c.benchmark_group("train_tiny_rank8_batch4_128px");
        group.sample_size(20);
        group.bench_function("step", |b| b.iter(|| trainer.train_step().unwrap().loss));
        group.finish();
    });
}

criterion_group!(benches, train_step);
criterion_main!(benches);
