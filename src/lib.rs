//! loragate tests LoRA checkpoints for Stable Diffusion like build artifacts.

pub mod error;
pub mod fsutil;
pub mod model;
pub mod tensors;

pub use error::{Error, ExitCode, Result};
pub mod lora;
pub mod cli;
pub mod device;
pub mod imageio;
pub mod progress;
pub mod record;
pub mod world;
