//! Everything that touches candle: loading Stable Diffusion components, running them, patching
//! them with LoRAs, and the sampling loop.
//!
//! - [`pipeline`]: a loaded model and the generation loop.
//! - [`unet`], [`vae`], [`text_encoder`], [`tokenizer`], [`scheduler`]: the components.
//! - [`adapters`]: the registry of layers that LoRAs patch.
//! - [`params`], [`loading`], [`resolve`]: where weights and folders come from.
//! - [`nn`], [`conv`]: differentiable layers shared by all components.
//! - [`noise`]: the seeded RNG that makes a seed mean the same image everywhere.

pub mod adapters;
pub mod conv;
pub mod ldm;
pub mod fused;
pub mod kernels;
pub mod loading;
pub mod nn;
pub mod noise;
pub mod params;
pub mod pipeline;
pub mod resolve;
pub mod scheduler;
pub mod single_file;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;

use std::fmt;

pub use pipeline::{GenerationParams, Pipeline};

/// The base-model family, as far as LoRA compatibility is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// SD 1.x: 768-wide text (CLIP ViT-L/14).
    Sd1,
    /// SD 2.x: 1024-wide text (OpenCLIP ViT-H/14).
    Sd2,
    /// SDXL: 2048-wide text (two encoders) and added conditioning.
    Sdxl,
    /// Another SD-layout model, named by its text width (the shapes world's tiny-sd is 192).
    Other { text_width: usize },
}

impl Family {
    pub fn from_text_width(width: usize) -> Self {
        match width {
            768 => Family::Sd1,
            1024 => Family::Sd2,
            2048 => Family::Sdxl,
            w => Family::Other { text_width: w },
        }
    }

    pub fn from_unet(c: &unet::UNetConfig) -> Self {
        if c.is_sdxl_style() {
            return Family::Sdxl;
        }
        Self::from_text_width(c.context_dim())
    }

    /// A short id for metadata (`ss_base_model_version`-like).
    pub fn id(&self) -> String {
        match self {
            Family::Sd1 => "sd_v1".into(),
            Family::Sd2 => "sd_v2".into(),
            Family::Sdxl => "sdxl_base_v1-0".into(),
            Family::Other { text_width } => format!("sd_layout_text{text_width}"),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Family::Sd1 => write!(f, "SD 1.x (text width 768)"),
            Family::Sd2 => write!(f, "SD 2.x (text width 1024)"),
            Family::Sdxl => write!(f, "SDXL (text width 2048)"),
            Family::Other { text_width: 192 } => write!(f, "the shapes world's tiny-sd (text width 192)"),
            Family::Other { text_width } => write!(f, "an SD-layout model with text width {text_width}"),
        }
    }
}
