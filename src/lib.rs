//! loragate tests LoRA checkpoints for Stable Diffusion like build artifacts.

pub mod error;
pub mod fsutil;
pub mod names;
pub mod model;
pub mod tensors;

pub use error::{Error, ExitCode, Result};
pub mod lora;
pub mod cli;
pub mod device;
pub mod imageio;
pub mod progress;
pub mod record;
pub mod score;
pub mod suite;
pub mod harness;
pub mod baseline;
pub mod report;
pub mod world;
pub mod train;
