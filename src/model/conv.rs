//! The 2-D convolution kernel used by every model component.
//!
//! One function, so that a faster or training-specific kernel can replace candle's in one place.

use candle_core::Tensor;

use crate::error::Result;

/// `x [B, C, H, W]` convolved with `w [O, C, k, k]`, symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}
