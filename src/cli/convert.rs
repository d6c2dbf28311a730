//! `loragate convert`: a single-file checkpoint (A1111 / ComfyUI) to a diffusers folder, or a
//! folder to a single file. Tensors keep their dtype, so folder → file → folder gives the same
//! tensors bit for bit and the same config files byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};

use crate::error::{Error, ExitCode, Result};
use crate::fsutil::write_text_atomic;
use crate::model::single_file::{Converted, TokenizerFiles, convert};
use crate::tensors::SaveDtype;

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

/// The dtype most of a file's tensors are stored in (what a folder written from it keeps).
pub fn file_dtype(path: &Path) -> Result<DType> {
    crate::tensors::dominant_dtype(path)
}

fn save(dir: &Path, name: &str, tensors: &std::collections::HashMap<String, Tensor>, dtype: DType) -> Result<()> {
    let sorted: BTreeMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let save_dtype = if dtype == DType::F16 { SaveDtype::F16 } else { SaveDtype::F32 };
    crate::tensors::save(&dir.join(name), &sorted, &BTreeMap::new(), save_dtype)
}

/// Writes a converted single file as a diffusers pipeline folder.
pub fn write_folder(p: &Converted, dtype: DType, out: &Path) -> Result<()> {
    save(&out.join("unet"), "diffusion_pytorch_model.safetensors", &p.unet, dtype)?;
    save(&out.join("vae"), "diffusion_pytorch_model.safetensors", &p.vae, dtype)?;
    save(&out.join("text_encoder"), "model.safetensors", &p.text_encoder, dtype)?;
    if let Some((_, te2, _)) = &p.second {
        save(&out.join("text_encoder_2"), "model.safetensors", te2, dtype)?;
    }
    for (rel, text) in &p.config_files {
        write_text_atomic(&out.join(rel), text)?;
    }
    match &p.tokenizer_files {
        TokenizerFiles::Files(files) => {
            for (rel, text) in files {
                write_text_atomic(&out.join(rel), text)?;
            }
        }
        TokenizerFiles::Clip => {
            let dirs: &[(&str, Option<&str>)] = if p.second.is_some() { &[("tokenizer", None), ("tokenizer_2", Some("!"))] } else { &[("tokenizer", None)] };
            for (dir, pad) in dirs {
                let (vocab, merges) = p.tokenizer.export_vocab_and_merges();
                write_text_atomic(&out.join(dir).join("vocab.json"), &serde_json::to_string(&vocab).expect("serialisable"))?;
                let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
                write_text_atomic(&out.join(dir).join("merges.txt"), &format!("#version: 0.2\n{}\n", merges.join("\n")))?;
                if let Some(pad) = pad {
                    write_text_atomic(&out.join(dir).join("special_tokens_map.json"), &serde_json::json!({ "pad_token": pad }).to_string())?;
                }
            }
        }
    }
    if !p.config_files.contains_key("model_index.json") {
        let xl = p.second.is_some();
        let mut index = serde_json::json!({
            "_class_name": if xl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        });
        if xl {
            index["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
            index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
            index["force_zeros_for_empty_prompt"] = serde_json::json!(p.force_zeros_for_empty_prompt);
        }
        write_text_atomic(&out.join("model_index.json"), &serde_json::to_string_pretty(&index).expect("serialisable"))?;
    }
    Ok(())
}
