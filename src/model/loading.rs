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

/// A content identity of model files: the full content of files up to 256 MiB; for larger
/// files their size plus the first and last MiB (hashing 7 GB per run would cost seconds and
/// any real change to a checkpoint changes its header or tail).
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    const FULL: u64 = 256 << 20;
    const EDGE: usize = 1 << 20;
    let mut acc = Vec::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let len = file.metadata().map_err(|e| Error::io(f, e))?.len();
        acc.extend(len.to_le_bytes());
        if len <= FULL {
            file.read_to_end(&mut acc).map_err(|e| Error::io(f, e))?;
        } else {
            let mut buf = vec![0u8; EDGE];
            file.read_exact(&mut buf).map_err(|e| Error::io(f, e))?;
            acc.extend(&buf);
            file.seek(SeekFrom::End(-(EDGE as i64))).map_err(|e| Error::io(f, e))?;
            file.read_exact(&mut buf).map_err(|e| Error::io(f, e))?;
            acc.extend(&buf);
        }
    }
    Ok(crate::fsutil::content_hash(&acc))
}
