//! Tensor operations and what layers are made of: differentiable layers ([`nn`]), convolution
//! ([`conv`]), the fused f32 CPU kernels inference takes ([`fused`], [`kernels`]), antialiased
//! [`resize`], weight access by key ([`params`], as candle's `VarBuilder`), the registry of layers
//! that LoRAs patch ([`adapters`]) and the seeded random numbers ([`noise`]). Nothing here knows
//! a model.

pub mod adapters;
pub mod conv;
pub mod fused;
pub mod kernels;
pub mod nn;
pub mod noise;
pub mod params;
pub mod resize;
