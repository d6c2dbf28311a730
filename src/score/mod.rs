//! Scoring images: CLIP text–image and image–image similarity, and pixel/structure comparison
//! against stored baselines.

pub mod clip;
pub mod resize;

pub use clip::{ClipScorer, Scale};
pub mod pixels;
