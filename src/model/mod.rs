//! The model layer: everything that computes with tensors to load, run and patch Stable
//! Diffusion and CLIP models. Four layers, each a folder, each using only the ones above it:
//!
//! - [`ops`]: tensor operations and what layers are made of ([`nn`] layers with gradients, fused
//!   inference [`kernels`], [`conv`]olution, weight access by key in [`params`], the [`adapters`]
//!   registry of layers that LoRAs patch, the seeded [`noise`] that makes a seed mean the same
//!   image everywhere);
//! - [`arch`]: the architectures ([`unet`], [`vae`], [`text_encoder`], [`scheduler`]s, the CLIP
//!   towers in [`arch::clip`], the DINOv2 encoder in [`arch::dinov2`], the LAION aesthetic MLP
//!   in [`arch::aesthetic`]);
//! - [`formats`]: where weights come from ([`locate`] a model from what a user wrote, diffusers
//!   folders via [`loading`], A1111/ComfyUI [`single_file`]s and their [`ldm`] key names, the CLIP
//!   [`tokenizer`] files);
//! - [`runtime`]: running a model (the generation [`pipeline`]; the scorers: the [`clip`] model
//!   for text and images, [`dino`] for identity, the [`aesthetic`] predictor).
//!
//! The modules are re-exported here by name (`crate::model::unet`), so a path says what a thing
//! is, not which layer folder holds it.

pub mod arch;
pub mod formats;
pub mod ops;
pub mod runtime;

pub use arch::{scheduler, text_encoder, unet, vae};
pub use formats::{folder_writer, ldm, ldm_config, loading, locate, single_file, tokenizer};
pub use ops::{adapters, conv, fused, gemm, kernels, nn, noise, params, resize, row_groups};
pub use runtime::{aesthetic, bench, clip, dino, pipeline};

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
