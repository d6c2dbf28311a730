//! Parity with PyTorch + diffusers + transformers on the shapes world's models, through the
//! fused f32 CPU kernels that inference on the CPU takes.
//!
//! The fixtures in tests/fixtures/parity were computed in float32 by the reference script in
//! shared/tinyworld/reference.py (PyTorch 2.11, diffusers 0.42, transformers 5.17).

mod common;

const GENERIC: bool = false;

include!("common/parity_cases.rs");

use loragate::model::kernels::{Build, CpuFeatures, build, rerun_tests_under_other_builds, supported_builds};

/// Run by the children of the test below (and here): `LORAGATE_KERNELS` took effect.
#[test]
fn the_forced_kernel_build_is_in_effect() {
    let want = Build::choose(std::env::var("LORAGATE_KERNELS").ok().as_deref(), &CpuFeatures::detect()).unwrap();
    assert_eq!(build(), want);
    println!("kernel build in effect: {}", build().name());
}

/// The parity tests under every kernel build this CPU runs: this process runs them under the
/// widest (or the forced) build, children with `LORAGATE_KERNELS` under each other one, so the
/// plain loops (attention tiles, softmax, Winograd transforms) meet the PyTorch fixtures on x86
/// machines too.
#[test]
fn every_kernel_build_this_cpu_runs_passes_the_parity_tests() {
    let ran = rerun_tests_under_other_builds("", &["every_kernel_build_this_cpu_runs_passes_the_parity_tests"]);
    let builds: Vec<Build> = ran.iter().map(|(b, _)| *b).collect();
    assert_eq!(builds, supported_builds(), "every build this CPU runs, each once");
    for (b, passed) in &ran {
        assert!(*b == build() || *passed >= 10, "{}: only {passed} parity tests ran", b.name());
    }
    eprintln!("parity tests ran under: {}", builds.iter().map(|b| b.name()).collect::<Vec<_>>().join(", "));
}
