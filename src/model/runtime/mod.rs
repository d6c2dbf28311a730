//! Running a model: the generation [`pipeline`], its [`bench`]marks, and the scorers that embed images and texts
//! ([`clip`], [`dino`], [`aesthetic`]).

pub mod aesthetic;
pub mod bench;
pub mod clip;
pub mod dino;
pub mod pipeline;

use std::path::Path;

use crate::device::Device;
use crate::error::Result;
use crate::model::locate::{ScorerKind, scorer_kind};

/// An image encoder for the identity checks: CLIP's vision tower or DINOv2.
pub enum ImageEncoder {
    Clip(Box<clip::ClipModel>),
    Dinov2(Box<dino::DinoModel>),
}

impl ImageEncoder {
    /// Loads a scorer folder of either kind (told apart by `config.json`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(match scorer_kind(dir)? {
            ScorerKind::Clip => ImageEncoder::Clip(Box::new(clip::ClipModel::load(dir, device)?)),
            ScorerKind::Dinov2 => ImageEncoder::Dinov2(Box::new(dino::DinoModel::load(dir, device)?)),
        })
    }

    /// L2-normalised embeddings of 8-bit images, one row per image.
    pub fn image_embedding_rows(&self, images: &[image::RgbImage]) -> Result<Vec<Vec<f32>>> {
        match self {
            ImageEncoder::Clip(m) => m.image_embedding_rows(images),
            ImageEncoder::Dinov2(m) => m.image_embedding_rows(images),
        }
    }

    pub fn fingerprint(&self) -> Result<String> {
        match self {
            ImageEncoder::Clip(m) => m.fingerprint(),
            ImageEncoder::Dinov2(m) => m.fingerprint(),
        }
    }

    pub fn embedding_space(&self) -> Result<String> {
        match self {
            ImageEncoder::Clip(m) => m.embedding_space(),
            ImageEncoder::Dinov2(m) => m.embedding_space(),
        }
    }
}

/// The content hash of a model's files, computed on first use and then kept: a scorer's
/// fingerprint is part of every embedding cache key it looks up.
#[derive(Debug, Default)]
pub(crate) struct FilesFingerprint {
    files: Vec<std::path::PathBuf>,
    hash: std::cell::OnceCell<String>,
}

impl FilesFingerprint {
    pub(crate) fn new(files: Vec<std::path::PathBuf>) -> Self {
        FilesFingerprint { files, hash: Default::default() }
    }

    pub(crate) fn get(&self) -> Result<String> {
        if let Some(h) = self.hash.get() {
            return Ok(h.clone());
        }
        let h = crate::model::loading::fingerprint(&self.files)?;
        Ok(self.hash.get_or_init(|| h).clone())
    }
}

/// A `preprocessor_config.json` field of three numbers (`image_mean`, `image_std`).
fn rgb_triplet(v: &serde_json::Value, key: &str) -> Option<[f32; 3]> {
    let a = v[key].as_array()?;
    Some([a.first()?.as_f64()? as f32, a.get(1)?.as_f64()? as f32, a.get(2)?.as_f64()? as f32])
}
