//! txt2img on the embedded tiny-sd: 128×128, 20 DDIM steps, guidance 5, batch 1, 4 and 8 — the
//! same work as the PyTorch + diffusers peer figure (docs/performance.md). Model loading is
//! outside the timed loop, as in the peer measurement.

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "common/txt2img_work.rs"]
mod txt2img_work;
use txt2img_work::Txt2ImgWork;

fn txt2img(c: &mut Criterion) {
    let work = Txt2ImgWork::load();
    let mut group = c.benchmark_group("txt2img_tiny_128px_20steps");
    group.sample_size(10);
    for batch in [1usize, 4, 8] {
        group.bench_function(format!("batch{batch}"), |b| b.iter(|| work.run(batch)));
    }
    group.finish();
}

criterion_group!(benches, txt2img);
criterion_main!(benches);
