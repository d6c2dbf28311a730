//! A converted single file written as a diffusers pipeline folder (`loragate convert`): every
//! component's tensors in the dtype the file stored them in, its configs as they came, the
//! tokenizer files, and a `model_index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::fsutil::write_text_atomic;
use crate::model::single_file::{Converted, TokenizerFiles};
use crate::tensors::SaveDtype;

/// The dtype most of a file's tensors are stored in (what a folder written from it keeps).
pub fn file_dtype(path: &Path) -> Result<DType> {
    crate::tensors::dominant_dtype(path)
}

fn save(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<()> {
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
