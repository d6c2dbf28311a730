use std::path::PathBuf;

use clap::Args;

use crate::error::{ExitCode, Result};
use crate::lora::{LoraFile, inspect};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A LoRA file (.safetensors) in kohya, diffusers or PEFT format.
    file: PathBuf,
}

pub fn run(a: InspectArgs) -> Result<ExitCode> {
    let lora = LoraFile::load(&a.file)?;
    print!("{}", inspect::summary(&lora));
    Ok(ExitCode::Success)
}
