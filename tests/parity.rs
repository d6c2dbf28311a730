//! Parity with PyTorch + diffusers + transformers on the shapes world's models, through the
//! fused f32 CPU kernels that inference on the CPU takes.
//!
//! The fixtures in tests/fixtures/parity were computed in float32 by the reference script in
//! shared/tinyworld/reference.py (PyTorch 2.11, diffusers 0.42, transformers 5.17).

mod common;

const GENERIC: bool = false;

include!("common/parity_cases.rs");
