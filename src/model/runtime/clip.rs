//! A CLIP model loaded as a scorer: a folder in the transformers `CLIPModel` layout (or a random
//! one of a published config), its tokenizer and the preprocessing it was trained with, giving
//! L2-normalised embeddings. Scoring ([`crate::score`], [`crate::harness`]) works on those
//! embeddings as plain vectors. CLIP reads at most 77 tokens: longer prompts are cut and the cut
//! is reported.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::model::arch::clip::{ClipConfig, ClipTowers};
use crate::model::loading::{load_component_tensors, normalize_text_encoder_keys, read_config, weight_files};
use crate::model::ops::resize::resize_bicubic_aa;
use crate::model::params::{Params, WeightStore};
use crate::model::tokenizer::Tokenizer;

/// A loaded CLIP model used as a scorer.
pub struct ClipModel {
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    towers: super::OnFirstUse<ClipTowers>,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: Device,
    files: super::FilesFingerprint,
    warnings: RefCell<Vec<String>>,
}

const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD: [f32; 3] = [0.26862954, 0.261_302_6, 0.275_777_1];

impl ClipModel {
    /// Loads a folder with `config.json` (a `CLIPModel`), weights, and a tokenizer
    /// (`tokenizer.json` or `vocab.json` + `merges.txt`); `preprocessor_config.json` is honoured.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let scorer = Self::open(dir, device)?;
        scorer.towers.get()?;
        Ok(scorer)
    }

    /// Like [`ClipModel::load`], but the weights are read on the first embedding: the
    /// tokenizer, the preprocessing and the files' fingerprint (what cache keys need) now.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: ClipConfig = read_config(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let mut files = weight_files(dir)?;
        files.push(dir.join("config.json"));
        let (d, dev, c) = (dir.to_path_buf(), device.clone(), cfg.clone());
        let towers = super::OnFirstUse::deferred(move || {
            let mut tensors = load_component_tensors(&d, DType::F32, &dev)?;
            normalize_text_encoder_keys(&mut tensors);
            let store = WeightStore::from_tensors(&d, tensors, DType::F32, &dev);
            Self::towers(&d, &c, &store)
        });
        let mut scorer = Self::assemble(dir, &cfg, towers, tokenizer, files, device);
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v: serde_json::Value = read_config(&pre)?;
            let three = |k: &str| super::rgb_triplet(&v, k);
            scorer.mean = three("image_mean").unwrap_or(scorer.mean);
            scorer.std = three("image_std").unwrap_or(scorer.std);
            if let Some(s) = v["crop_size"]["height"].as_u64().or_else(|| v["crop_size"].as_u64()) {
                scorer.image_size = s as usize;
            }
        }
        Ok(scorer)
    }

    /// A scorer of the architecture in `config_json` (a transformers CLIPModel config) with
    /// seeded random weights and OpenAI CLIP's tokenizer: for tests of real layouts
    /// (ViT-B/32, ViT-L/14) without their weights.
    pub fn with_random_weights(config_json: &str, seed: u64, device: &Device) -> Result<Self> {
        let cfg: ClipConfig = serde_json::from_str(config_json).map_err(|e| Error::invalid(format!("CLIP config: {e}")))?;
        let store = WeightStore::random(seed, DType::F32, device);
        let tokenizer = Tokenizer::openai_clip()?;
        let dir = Path::new("<random>");
        let towers = super::OnFirstUse::ready(Self::towers(dir, &cfg, &store)?);
        Ok(Self::assemble(dir, &cfg, towers, tokenizer, Vec::new(), device))
    }

    fn towers(dir: &Path, cfg: &ClipConfig, store: &WeightStore) -> Result<ClipTowers> {
        let targets = RefCell::new(Default::default());
        ClipTowers::load(&Params::root(store, &targets), cfg).map_err(|e| model_err(e, dir))
    }

    fn assemble(dir: &Path, cfg: &ClipConfig, towers: super::OnFirstUse<ClipTowers>, mut tokenizer: Tokenizer, files: Vec<PathBuf>, device: &Device) -> Self {
        tokenizer.context = cfg.text_config.max_position_embeddings.min(tokenizer.context);
        ClipModel {
            path: dir.to_path_buf(),
            tokenizer,
            towers,
            image_size: cfg.vision_config.image_size,
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
            device: device.clone(),
            files: super::FilesFingerprint::new(files),
            warnings: RefCell::new(Vec::new()),
        }
    }

    /// Whether its weights have been read (an unchanged re-run reads none).
    pub fn weights_loaded(&self) -> bool {
        self.towers.is_loaded()
    }

    /// The side of the square images the vision tower reads.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    pub fn fingerprint(&self) -> Result<String> {
        self.files.get()
    }

    /// What makes its embeddings what they are: the model files and the preprocessing (for
    /// caching embeddings).
    pub fn embedding_space(&self) -> Result<String> {
        Ok(format!("clip {} {} {:?} {:?} {}", self.fingerprint()?, self.image_size, self.mean, self.std, self.tokenizer.context))
    }

    /// Warnings (truncated prompts, unknown characters) since the last call.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.warnings.borrow_mut())
    }

    /// Images in `[0, 1]` (`[B, 3, H, W]`) to the scorer's input: shortest side resized to the
    /// model's size with antialiased bicubic, centre crop, normalised.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let s = self.image_size;
        let (rh, rw) = if h <= w { (s, (w * s).div_ceil(h).max(s)) } else { ((h * s).div_ceil(w).max(s), s) };
        let data = images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let per = c * h * w;
        let mut out = Vec::with_capacity(b * c * s * s);
        for i in 0..b {
            let resized = resize_bicubic_aa(&data[i * per..(i + 1) * per], c, h, w, rh, rw);
            let (top, left) = ((rh - s) / 2, (rw - s) / 2);
            for ch in 0..c {
                for y in 0..s {
                    let row = &resized[(ch * rh + top + y) * rw + left..][..s];
                    out.extend(row.iter().map(|v| (v.clamp(0.0, 1.0) - self.mean[ch]) / self.std[ch]));
                }
            }
        }
        Ok(Tensor::from_vec(out, (b, c, s, s), &Device::Cpu)?.to_device(&self.device)?)
    }

    /// L2-normalised image embeddings from preprocessed pixels.
    pub fn image_embeddings_from_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        self.towers.get()?.image_embeddings(pixels)
    }

    /// L2-normalised image embeddings of 8-bit images.
    pub fn image_embeddings(&self, images: &[RgbImage]) -> Result<Tensor> {
        let t = crate::imageio::images_to_tensor(images, &self.device)?;
        self.image_embeddings_from_pixels(&self.preprocess(&t)?)
    }

    /// L2-normalised text embeddings from token ids `[B, 77]`.
    pub fn text_embeddings_from_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.towers.get()?.text_embeddings(ids)
    }

    /// A text's token ids; a cut is recorded as a warning.
    fn encode_noting_cuts(&self, t: &str) -> Vec<u32> {
        let e = self.tokenizer.encode(t);
        if e.truncated {
            self.warnings.borrow_mut().push(format!("CLIP read only the first {} of {} tokens of {t:?}", self.tokenizer.context - 2, e.prompt_tokens));
        }
        e.ids
    }

    /// Records the warnings a text's embedding would give (for embeddings taken from a cache).
    pub fn note_cuts(&self, t: &str) {
        self.encode_noting_cuts(t);
    }

    /// L2-normalised text embeddings; prompts longer than CLIP's context are cut (and reported).
    pub fn text_embeddings(&self, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for t in texts {
            ids.extend(self.encode_noting_cuts(t));
        }
        let ids = Tensor::from_vec(ids, (texts.len(), self.tokenizer.context), &self.device)?;
        self.text_embeddings_from_ids(&ids)
    }

    /// Raw cosine of each image with the text at the same index.
    /// Normalised image embeddings as plain vectors, one per image, for scoring.
    pub fn image_embedding_rows(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        rows(&self.image_embeddings(images)?)
    }

    /// Normalised text embeddings as plain vectors, one per text, for scoring.
    pub fn text_embedding_rows(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        rows(&self.text_embeddings(texts)?)
    }

    pub fn text_image_scores(&self, images: &[RgbImage], texts: &[&str]) -> Result<Vec<f64>> {
        if images.len() != texts.len() {
            return Err(Error::invalid(format!("{} images but {} texts", images.len(), texts.len())));
        }
        let ie = self.image_embeddings(images)?;
        let te = self.text_embeddings(texts)?;
        row_cosines(&ie, &te)
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn model_err(e: Error, dir: &Path) -> Error {
    match e {
        Error::Invalid(m) => Error::model(dir, m),
        other => other,
    }
}

/// Cosine of row i of `a` with row i of `b` (both already normalised).
pub fn row_cosines(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let v = (a * b)?.sum(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.into_iter().map(|x| x as f64).collect())
}

/// All pairwise cosines `a @ b^T` as rows.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Vec<Vec<f64>>> {
    let m = a.matmul(&b.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(m.into_iter().map(|r| r.into_iter().map(|x| x as f64).collect()).collect())
}
