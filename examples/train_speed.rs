//! loragate's side of `scripts/compare-training-with-peft.sh`: the training work of
//! `benches/common/train_work.rs` (tiny-sd, rank 8, attention targets, batch 4, 128 px, f32 on
//! the CPU), `STEPS` steps after a warm-up, as steps per second.
//!
//! `cargo run --release --example train_speed [STEPS]`

use std::time::Instant;

#[path = "../benches/common/train_work.rs"]
mod train_work;

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let (secs, loss) = train_work::with_trainer(steps + 3, |t| {
        let t0 = Instant::now();
        let mut loss = 0.0;
        for _ in 0..steps {
            loss = t.train_step().unwrap().loss;
        }
        (t0.elapsed().as_secs_f64(), loss)
    });
    println!(
        "tiny-sd, rank 8, attention targets, batch 4, 128 px, f32 CPU ({} threads): {steps} steps in {secs:.2} s = {:.2} steps/s (last loss {loss:.4})",
        rayon::current_num_threads(),
        steps as f64 / secs
    );
    // The last line is for scripts/compare-training-with-peft.sh.
    println!("{{\"steps_per_s\": {}, \"threads\": {}}}", steps as f64 / secs, rayon::current_num_threads());
}
