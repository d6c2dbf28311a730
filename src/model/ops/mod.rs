//! Tensor operations and what layers are made of: differentiable layers ([`nn`]), convolution
//! ([`conv`]), the fused f32 CPU kernels inference and training take ([`fused`], [`kernels`]), antialiased
//! [`resize`], weight access by key ([`params`], as candle's `VarBuilder`), the registry of layers
//! that LoRAs patch ([`adapters`]), the seeded random numbers ([`noise`]) and a batch run as two
//! row groups at once ([`row_groups`]). Nothing here knows
//! a model.

pub mod adapters;
pub mod conv;
pub mod fused;
pub mod gemm;
pub mod kernels;
pub mod nn;
pub mod noise;
pub mod params;
pub mod resize;
pub mod row_groups;

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not decided yet (read `LORAGATE_GENERIC_OPS`), 1: fused CPU kernels allowed, 2: generic.
static GENERIC: AtomicU8 = AtomicU8::new(0);

/// Whether every operation takes candle's generic path instead of the fused f32 CPU kernels:
/// the path CUDA and half precision take. Set by `LORAGATE_GENERIC_OPS=1`
/// or [`set_generic_ops`], so the GPU's code path can be proven on the CPU.
pub fn generic_ops() -> bool {
    match GENERIC.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("LORAGATE_GENERIC_OPS").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
            GENERIC.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Forces the generic path on or off for the whole process (tests of the GPU code path).
pub fn set_generic_ops(on: bool) {
    GENERIC.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// `Some(dtype)` when `x` is in a dtype whose matrix products candle's CPU backend lacks (bf16):
/// those products run in f32 on bf16 operands and round back, as GPU tensor cores accumulate.
pub fn emulated_on_cpu(x: &candle_core::Tensor) -> Option<candle_core::DType> {
    (x.device().is_cpu() && x.dtype() == candle_core::DType::BF16).then_some(candle_core::DType::BF16)
}
