//! Scoring images without a model: CLIP score scales and pixel/structure
//! comparison against stored baselines. The CLIP model itself is [`crate::model::clip`].

pub mod clip;

pub use clip::Scale;
pub mod phash;
pub mod pixels;
