//! Reading diffusers component folders (`unet/`, `vae/`, `text_encoder/`...) from disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::fsutil::read_text;
use crate::tensors::TensorFile;

/// Parses a component's `config.json` (or another JSON file) into `T`, naming the file on error.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("cannot read config: {e}")))
}

/// The weight file(s) of a component folder, in the order diffusers prefers them.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let candidates = [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ];
    for c in candidates {
        let p = dir.join(c);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    for index in ["diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"] {
        let p = dir.join(index);
        if p.is_file() {
            let v: serde_json::Value = read_config(&p)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .ok_or_else(|| Error::model(&p, "no weight_map"))?
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    let pickles = ["diffusion_pytorch_model.bin", "pytorch_model.bin"];
    if pickles.iter().any(|p| dir.join(p).is_file()) {
        return Err(Error::model(
            dir,
            "only PyTorch pickle (.bin) weights found; loragate reads safetensors only \
             (convert with `diffusers`' save_pretrained(safe_serialization=True))",
        ));
    }
    Err(Error::model(dir, "no safetensors weights found (diffusion_pytorch_model.safetensors or model.safetensors)"))
}

/// All tensors of a component folder, in `dtype` on `device`.
pub fn load_component_tensors(dir: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in weight_files(dir)? {
        let tf = TensorFile::load(&f, dtype, device).map_err(|e| match e {
            Error::TensorFile { path, reason } => Error::model(path, reason),
            other => other,
        })?;
        all.extend(tf.tensors);
    }
    Ok(all)
}

/// A content identity of model files: the SHA-256 of each whole file (memoised between runs by
/// path, size and modification time), combined with the file names.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    let mut acc = String::new();
    for f in files {
        // `unet/config.json`: the folder tells two config files apart.
        let name: Vec<String> = f.components().rev().take(2).map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let name = name.into_iter().rev().collect::<Vec<_>>().join("/");
        acc.push_str(&format!("{name}={}\n", crate::fsutil::file_hash(f)?));
    }
    Ok(crate::fsutil::content_hash(acc.as_bytes()))
}

/// Adds the `text_model.` prefix that newer transformers versions drop, and drops buffers.
pub fn normalize_text_encoder_keys(tensors: &mut HashMap<String, Tensor>) {
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for k in keys {
        if k.ends_with("position_ids") {
            tensors.remove(&k);
        } else if ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| k.starts_with(p))
            && let Some(t) = tensors.remove(&k) {
                tensors.insert(format!("text_model.{k}"), t);
            }
    }
}
