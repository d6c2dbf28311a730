//! A DINOv2 model loaded as an identity scorer: a folder in the transformers `Dinov2Model`
//! layout and its `preprocessor_config.json` (BitImageProcessor: shortest edge resized with
//! bicubic, centre crop, ImageNet normalisation). Its embedding is the pooled CLS token,
//! L2-normalised, so identity is a cosine as with CLIP.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::model::arch::dinov2::{Dinov2, Dinov2Config};
use crate::model::loading::{load_component_tensors, read_config, weight_files};
use crate::model::ops::resize::resize_bicubic_aa;
use crate::model::params::{Params, WeightStore};

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How images become the model's input (the published models: shortest edge 256, crop 224).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoPreprocess {
    pub shortest_edge: usize,
    pub crop: (usize, usize),
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for DinoPreprocess {
    fn default() -> Self {
        DinoPreprocess { shortest_edge: 256, crop: (224, 224), mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

impl DinoPreprocess {
    /// Reads a `preprocessor_config.json`; absent fields keep the published values.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut p = DinoPreprocess::default();
        let three = |k: &str| super::rgb_triplet(v, k);
        p.mean = three("image_mean").unwrap_or(p.mean);
        p.std = three("image_std").unwrap_or(p.std);
        if let Some(s) = v["size"]["shortest_edge"].as_u64().or_else(|| v["size"].as_u64()) {
            p.shortest_edge = s as usize;
        }
        if let (Some(h), Some(w)) = (v["crop_size"]["height"].as_u64(), v["crop_size"]["width"].as_u64()) {
            p.crop = (h as usize, w as usize);
        } else if let Some(s) = v["crop_size"].as_u64() {
            p.crop = (s as usize, s as usize);
        }
        if v["do_resize"] == false || v["do_center_crop"] == false {
            return Err(Error::invalid("DINOv2 preprocessing without resize or centre crop is not supported: images of every size must give the same input size"));
        }
        if p.shortest_edge < p.crop.0.max(p.crop.1) || p.crop.0 == 0 || p.crop.1 == 0 || p.std.contains(&0.0) {
            return Err(Error::invalid(format!("preprocessor_config.json: shortest edge {} smaller than the crop {:?}, or a zero size or std", p.shortest_edge, p.crop)));
        }
        Ok(p)
    }

    /// An 8-bit image's pixels as the model reads them, `[3, crop_h, crop_w]` flattened.
    fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let planar: Vec<f32> = (0..3).flat_map(|c| img.as_raw().iter().skip(c).step_by(3).map(|&v| v as f32 / 255.0)).collect();
        // transformers: the shortest edge to `shortest_edge`, the other scaled and truncated.
        let s = self.shortest_edge;
        let (rh, rw) = if h <= w { (s, (w * s / h).max(s)) } else { ((h * s / w).max(s), s) };
        let resized = resize_bicubic_aa(&planar, 3, h, w, rh, rw);
        let (ch, cw) = self.crop;
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        let mut out = Vec::with_capacity(3 * ch * cw);
        for c in 0..3 {
            for y in 0..ch {
                let row = &resized[(c * rh + top + y) * rw + left..][..cw];
                // The processor resizes 8-bit images, so its values are rounded to 8 bits.
                out.extend(row.iter().map(|v| ((v * 255.0).round().clamp(0.0, 255.0) / 255.0 - self.mean[c]) / self.std[c]));
            }
        }
        out
    }
}

/// A loaded DINOv2 image encoder used as a scorer.
pub struct DinoModel {
    pub path: PathBuf,
    model: super::OnFirstUse<Dinov2>,
    pub preprocess: DinoPreprocess,
    device: Device,
    files: super::FilesFingerprint,
}

impl DinoModel {
    /// Loads a folder with `config.json` (a `Dinov2Model`), its weights and, when present,
    /// `preprocessor_config.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let scorer = Self::open(dir, device)?;
        scorer.model.get()?;
        Ok(scorer)
    }

    /// Like [`DinoModel::load`], but the weights are read on the first embedding: the
    /// preprocessing and the files' fingerprint (what cache keys need) now.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let config: Dinov2Config = read_config(&dir.join("config.json"))?;
        let (d, dev) = (dir.to_path_buf(), device.clone());
        let model = super::OnFirstUse::deferred(move || {
            let tensors = load_component_tensors(&d, DType::F32, &dev)?;
            // Dinov2Model checkpoints have no prefix; the backbone inside a classifier has `dinov2.`.
            let tensors = tensors.into_iter().map(|(k, v)| (k.strip_prefix("dinov2.").map(str::to_string).unwrap_or(k), v)).collect();
            let store = WeightStore::from_tensors(&d, tensors, DType::F32, &dev);
            let targets = RefCell::new(Default::default());
            Dinov2::load(&Params::root(&store, &targets), &config).map_err(|e| match e {
                Error::Invalid(m) => Error::model(&d, m),
                other => other,
            })
        });
        let pre_file = dir.join("preprocessor_config.json");
        let preprocess = if pre_file.is_file() {
            DinoPreprocess::from_json(&read_config(&pre_file)?).map_err(|e| Error::model(&pre_file, e.to_string()))?
        } else {
            DinoPreprocess::default()
        };
        let mut files = weight_files(dir)?;
        files.push(dir.join("config.json"));
        if pre_file.is_file() {
            files.push(pre_file);
        }
        Ok(DinoModel { path: dir.to_path_buf(), model, preprocess, device: device.clone(), files: super::FilesFingerprint::new(files) })
    }

    /// A model of `config` with seeded random weights: for tests of the published layouts.
    pub fn with_random_weights(config: &Dinov2Config, seed: u64, device: &Device) -> Result<Self> {
        let store = WeightStore::random(seed, DType::F32, device);
        let targets = RefCell::new(Default::default());
        let model = super::OnFirstUse::ready(Dinov2::load(&Params::root(&store, &targets), config)?);
        Ok(DinoModel { path: PathBuf::from("<random>"), model, preprocess: DinoPreprocess::default(), device: device.clone(), files: Default::default() })
    }

    pub fn fingerprint(&self) -> Result<String> {
        self.files.get()
    }

    /// Whether its weights have been read (an unchanged re-run reads none).
    pub fn weights_loaded(&self) -> bool {
        self.model.is_loaded()
    }

    /// What makes its embeddings what they are: the model files and the preprocessing (for
    /// caching embeddings).
    pub fn embedding_space(&self) -> Result<String> {
        Ok(format!("dinov2 {} {:?}", self.fingerprint()?, self.preprocess))
    }

    /// 8-bit images → the model's input `[B, 3, crop_h, crop_w]`.
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        let (ch, cw) = self.preprocess.crop;
        let data: Vec<f32> = images.iter().flat_map(|i| self.preprocess.apply(i)).collect();
        Ok(Tensor::from_vec(data, (images.len(), 3, ch, cw), &Device::Cpu)?.to_device(&self.device)?)
    }

    /// The pooled output (`pooler_output`) of preprocessed pixels, not normalised.
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        self.model.get()?.forward(pixels)
    }

    /// L2-normalised embeddings of 8-bit images, as plain vectors.
    pub fn image_embedding_rows(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pooled = self.pooled(&self.pixels(images)?)?;
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}
