//! Rough CPU timings of the pipeline's parts. Each figure is the median of `REPS` runs (default
//! 5); `cpu` is the process's CPU time over the same runs, steadier than wall time on a busy
//! machine. Set `RAYON_NUM_THREADS` to fix the thread count.
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use loragate::model::{GenerationParams, Pipeline, locate::resolve_model};

/// CPU time of all of this process's threads, from /proc (ns resolution).
fn cpu_time() -> Duration {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `f` `reps` times (after one warm-up when `warm`), `inner` calls per run, and prints the
/// median wall and CPU time per call.
fn bench(name: &str, reps: usize, inner: u32, warm: bool, mut f: impl FnMut()) {
    if warm {
        f();
    }
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_time());
        for _ in 0..inner {
            f();
        }
        wall.push(t.elapsed() / inner);
        cpu.push((cpu_time() - c) / inner);
    }
    println!("{name:<12} {:>10.1?} wall  {:>10.1?} cpu", median(wall), median(cpu));
}

fn main() {
    loragate::device::prepare_process(loragate::device::Workload::Inference);
    let reps: usize = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let t = Instant::now();
    let pipe = Pipeline::load(&resolve_model("tiny").unwrap(), DType::F32, &Device::Cpu).unwrap();
    println!("load {:?}", t.elapsed());
    for b in [2usize, 8] {
        let x = Tensor::randn(0f32, 1., (b, 4, 16, 16), &Device::Cpu).unwrap();
        let ts = Tensor::full(500f32, b, &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1., (b, 77, 192), &Device::Cpu).unwrap();
        bench(&format!("unet b{b}"), reps, 10 / (b as u32 / 2), true, || {
            pipe.unet.forward(&x, &ts, &ctx, None).unwrap();
        });
        let z = Tensor::randn(0f32, 1., (b / 2, 4, 16, 16), &Device::Cpu).unwrap();
        bench(&format!("vae b{}", b / 2), reps, 1, true, || {
            pipe.vae.decode(&z).unwrap();
        });
    }
    bench("te b4", reps, 1, true, || {
        pipe.encode_prompts(&["red circle, large"; 4], 1).unwrap();
    });
    for b in [1usize, 4] {
        let p = vec!["red circle, large, in the center, white background"; b];
        let seeds: Vec<u64> = (0..b as u64).collect();
        bench(&format!("txt2img b{b}"), reps.min(3), 1, false, || {
            pipe.generate(&p, &seeds, &GenerationParams::default(), &mut |_, _| {}).unwrap();
        });
    }
}
