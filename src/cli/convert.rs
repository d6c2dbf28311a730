//! `loragate convert`: a single-file checkpoint (A1111 / ComfyUI) to a diffusers folder, or a
//! folder to a single file. Tensors keep their dtype, so folder → file → folder gives the same
//! tensors bit for bit and the same config files byte for byte.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::device::Device;
use crate::error::{Error, ExitCode, Result};
use crate::model::folder_writer::{file_dtype, write_folder};
use crate::model::single_file::{Converted, convert};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum To {
    /// A diffusers pipeline folder.
    Folder,
    /// One A1111-style `.safetensors` file (LDM key names, configs in the header).
    SingleFile,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A single-file checkpoint, or (with `--to single-file`) a diffusers folder.
    input: PathBuf,
    /// Where the folder or file goes.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "folder")]
    to: To,
    /// The configs of a single file (a diffusers folder, a cached hub id, or an LDM
    /// original_config .yaml), as diffusers' `from_single_file(..., config=...)`.
    #[arg(long)]
    config: Option<String>,
}

pub fn run(a: ConvertArgs) -> Result<ExitCode> {
    match a.to {
        To::Folder => {
            if !a.input.is_file() {
                return Err(Error::invalid(format!("{}: not a single-file checkpoint (converting a folder takes `--to single-file`)", a.input.display())));
            }
            let config = a.config.as_deref().map(crate::model::locate::resolve_config).transpose()?;
            let dtype = file_dtype(&a.input)?;
            let parts = convert(&a.input, dtype, &Device::Cpu, config.as_deref())?;
            for k in parts.unused.iter().take(5) {
                eprintln!("warning: {}: `{k}` is not used by the architecture the configs describe", a.input.display());
            }
            write_folder(&parts, dtype, &a.out)?;
            println!("wrote {} ({}; {})", a.out.display(), parts.family, describe_source(&parts));
        }
        To::SingleFile => {
            if a.config.is_some() {
                return Err(Error::invalid("--config belongs to a single file being read; a folder has its own configs"));
            }
            crate::model::single_file::write_from_folder(&a.input, &a.out)?;
            println!("wrote {}", a.out.display());
        }
    }
    Ok(ExitCode::Success)
}

fn describe_source(p: &Converted) -> String {
    use crate::model::single_file::ConfigSource::*;
    match &p.source {
        Embedded => "configs from the file's header".into(),
        Folder(d) => format!("configs from {}", d.display()),
        OriginalConfig(y) => format!("configs derived from {}", y.display()),
        Family(f) => format!("the published {f} configs"),
    }
}
