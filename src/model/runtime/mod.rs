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

    /// Opens a scorer folder of either kind, its weights read on first use.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Ok(match scorer_kind(dir)? {
            ScorerKind::Clip => ImageEncoder::Clip(Box::new(clip::ClipModel::open(dir, device)?)),
            ScorerKind::Dinov2 => ImageEncoder::Dinov2(Box::new(dino::DinoModel::open(dir, device)?)),
        })
    }

    pub fn weights_loaded(&self) -> bool {
        match self {
            ImageEncoder::Clip(m) => m.weights_loaded(),
            ImageEncoder::Dinov2(m) => m.weights_loaded(),
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

/// A scorer's network, read from disk on first use. Scorers are opened when a run starts, but
/// an unchanged re-run finds every embedding in the cache and never needs their weights.
pub(crate) struct OnFirstUse<T> {
    value: std::cell::OnceCell<T>,
    load: Option<Box<dyn Fn() -> Result<T> + Send>>,
}

impl<T> OnFirstUse<T> {
    /// Already loaded (models built from tensors in memory).
    pub(crate) fn ready(value: T) -> Self {
        OnFirstUse { value: value.into(), load: None }
    }

    pub(crate) fn deferred(load: impl Fn() -> Result<T> + Send + 'static) -> Self {
        OnFirstUse { value: Default::default(), load: Some(Box::new(load)) }
    }

    /// The value, loading it now if this is the first use. A failed load is tried again next time.
    pub(crate) fn get(&self) -> Result<&T> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let load = self.load.as_ref().expect("a value that is not ready has its loader");
        let v = load()?;
        Ok(self.value.get_or_init(|| v))
    }

    pub(crate) fn is_loaded(&self) -> bool {
        self.value.get().is_some()
    }
}

/// A `preprocessor_config.json` field of three numbers (`image_mean`, `image_std`).
fn rgb_triplet(v: &serde_json::Value, key: &str) -> Option<[f32; 3]> {
    let a = v[key].as_array()?;
    Some([a.first()?.as_f64()? as f32, a.get(1)?.as_f64()? as f32, a.get(2)?.as_f64()? as f32])
}
