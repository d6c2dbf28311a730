//! Suite overhead: how much of a run is spent outside generation (scoring, checks, baseline
//! comparison, reports), and how long an unchanged re-run takes against the first run.
//!
//! `cargo bench --bench suite_overhead` runs a small suite twice in a fresh cache (cold, then
//! warm) and prints both side by side. It is a measurement, not a pass/fail test.

use std::time::Instant;

use candle_core::{DType, Device};
use loragate::harness::{RunOptions, run_suite};
use loragate::report::write_all;
use loragate::suite::load_suite;

fn main() {
    loragate::device::prepare_process(loragate::device::Workload::Inference);
    let dir = std::env::temp_dir().join(format!("loragate-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let zorb = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/loras/zorb.kohya.safetensors");
    let suite_path = dir.join("bench.yaml");
    std::fs::write(
        &suite_path,
        format!(
            "name: bench\nloras:\n  - {{ name: zorb, file: {}, trigger: zorb }}\ndefaults: {{ seeds: [0, 1], steps: 20, adapters: [zorb] }}\nthresholds: {{ clip_floor: 0.3 }}\ncases:\n  - {{ name: center, prompt: \"zorb, large, in the center, sky background\" }}\n  - {{ name: tags, prompt: \"zorb, small, grass background\", word_order: {{ max: 6 }} }}\n  - {{ name: ladder, prompt: \"zorb, large, sky background\", ladder: [{{ size: 128x128 }}, {{ size: 192x192 }}] }}\n",
            zorb.display()
        ),
    )
    .unwrap();
    let suite = load_suite(&suite_path).unwrap();
    let opts = RunOptions {
        update: loragate::baseline::UpdateMode::Never,
        no_checks: loragate::harness::NoChecks::Fail,
        device: Device::Cpu,
        dtype: DType::F32,
        vae_dtype: None,
        cache_dir: Some(dir.join("cache")),
        baselines_dir: dir.join("baselines"),
        partition: None,
        filter: None,
        max_batch: 8,
        progress: false,
    };
    println!("{:<8} {:>8} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8} {:>10}", "run", "images", "generate", "score", "checks", "baselines", "report", "total", "overhead");
    let mut totals = Vec::new();
    for run in ["cold", "warm"] {
        let t = Instant::now();
        let o = run_suite(&suite, &opts).unwrap();
        let r = Instant::now();
        write_all(&o, &dir.join("out")).unwrap();
        let report = r.elapsed().as_secs_f64();
        let total = t.elapsed().as_secs_f64();
        let tm = &o.timings;
        let overhead = tm.score + tm.checks + tm.baselines + report;
        println!(
            "{run:<8} {:>8} {:>9.2}s {:>7.2}s {:>7.2}s {:>9.2}s {:>7.2}s {:>7.2}s {:>9.1}%",
            format!("{}/{}", o.generated, o.images_total),
            tm.generate,
            tm.score,
            tm.checks,
            tm.baselines,
            report,
            total,
            100.0 * overhead / total
        );
        totals.push(total);
    }
    println!("unchanged re-run: {:.2}s vs {:.2}s first run ({:.1}% of it)", totals[1], totals[0], 100.0 * totals[1] / totals[0]);
    let _ = std::fs::remove_dir_all(&dir);
}
