//! CLIP scorers in the transformers `CLIPModel` layout: text–image and image–image similarity.
//!
//! Scores are **raw cosine similarity** of the L2-normalised embeddings, in [−1, 1]. Other tools
//! report 100 × cosine (torchmetrics' `CLIPScore`) or 2.5 × max(cosine, 0) (Hessel et al.'s
//! CLIPScore); [`Scale`] converts for display. CLIP reads at most 77 tokens: longer prompts are
//! cut and the cut is reported.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::loading::{fingerprint, load_component_tensors, read_config, weight_files};
use crate::model::nn::{Activation, Conv2d, LayerNorm, Linear};
use crate::model::params::{Init, Params, WeightStore};
use crate::model::pipeline::normalize_text_encoder_keys;
use crate::model::text_encoder::{EncoderLayer, LayerChoice, TextConfig, TextEncoder, TowerDims};
use crate::model::tokenizer::Tokenizer;
use crate::score::resize::resize_bicubic_aa;

/// How a CLIP score is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Raw cosine similarity in [−1, 1] (what loragate stores and compares).
    #[default]
    Cosine,
    /// 100 × cosine (torchmetrics).
    Torchmetrics,
    /// 2.5 × max(cosine, 0) (Hessel et al. 2021).
    Clipscore,
}

impl Scale {
    pub fn apply(&self, cosine: f64) -> f64 {
        match self {
            Scale::Cosine => cosine,
            Scale::Torchmetrics => 100.0 * cosine,
            Scale::Clipscore => 2.5 * cosine.max(0.0),
        }
    }

    /// The inverse of [`Scale::apply`] (for thresholds written in another scale).
    pub fn to_cosine(&self, value: f64) -> f64 {
        match self {
            Scale::Cosine => value,
            Scale::Torchmetrics => value / 100.0,
            Scale::Clipscore => value / 2.5,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Scale::Cosine => "raw cosine",
            Scale::Torchmetrics => "100×cosine (torchmetrics)",
            Scale::Clipscore => "2.5×cosine (CLIPScore)",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct VisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "three")]
    num_channels: usize,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn three() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
struct ClipConfig {
    text_config: TextConfig,
    vision_config: VisionConfig,
    projection_dim: usize,
}

struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
}

impl VisionTower {
    fn load(p: &Params, c: &VisionConfig) -> Result<Self> {
        let v = p.pp("vision_model");
        let e = v.pp("embeddings");
        let h = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let act = Activation::parse(&c.hidden_act)
            .ok_or_else(|| Error::invalid(format!("CLIP vision: unsupported hidden_act `{}`", c.hidden_act)))?;
        let dims = TowerDims { hidden: h, intermediate: c.intermediate_size, heads: c.num_attention_heads, act, eps: c.layer_norm_eps };
        Ok(VisionTower {
            class_embedding: e.get("class_embedding", &[h], Init::Normal(0.02))?,
            patch_embedding: Conv2d::load(&e.pp("patch_embedding"), c.num_channels, h, c.patch_size, c.patch_size, 0, false)?,
            position_embedding: e.pp("position_embedding").get("weight", &[patches + 1, h], Init::Normal(0.02))?,
            pre_norm: LayerNorm::load(&v.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| EncoderLayer::load_with(&v.pp("encoder").pp("layers").pp(i), &dims))
                .collect::<Result<_>>()?,
            post_norm: LayerNorm::load(&v.pp("post_layernorm"), h, c.layer_norm_eps)?,
        })
    }

    /// `[B, 3, S, S]` normalised pixels → pooled `[B, hidden]` (post-normed class token).
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self.patch_embedding.forward(pixels)?; // [B, h, g, g]
        let h = patches.dim(1)?;
        let tokens = patches.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, g·g, h]
        let cls = self.class_embedding.reshape((1, 1, h))?.broadcast_as((b, 1, h))?.contiguous()?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.post_norm.forward(&x.i((.., 0, ..))?.contiguous()?)
    }
}

/// A loaded CLIP model used as a scorer.
pub struct ClipScorer {
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    text: TextEncoder,
    vision: VisionTower,
    visual_projection: Linear,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: Device,
    hash: std::cell::OnceCell<String>,
    files: Vec<PathBuf>,
    warnings: RefCell<Vec<String>>,
}

const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD: [f32; 3] = [0.26862954, 0.261_302_6, 0.275_777_1];

impl ClipScorer {
    /// Loads a folder with `config.json` (a `CLIPModel`), weights, and a tokenizer
    /// (`tokenizer.json` or `vocab.json` + `merges.txt`); `preprocessor_config.json` is honoured.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: ClipConfig = read_config(&dir.join("config.json"))?;
        let mut tensors = load_component_tensors(dir, DType::F32, device)?;
        normalize_text_encoder_keys(&mut tensors);
        let store = WeightStore::from_tensors(dir, tensors, DType::F32, device);
        let tokenizer = Tokenizer::from_dir(dir)?;
        let mut files = weight_files(dir)?;
        files.push(dir.join("config.json"));
        let mut scorer = Self::build(dir, &cfg, &store, tokenizer, files, device)?;
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v: serde_json::Value = read_config(&pre)?;
            let three = |k: &str| -> Option<[f32; 3]> {
                let a = v[k].as_array()?;
                Some([a.first()?.as_f64()? as f32, a.get(1)?.as_f64()? as f32, a.get(2)?.as_f64()? as f32])
            };
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
        let tokenizer = Tokenizer::from_clip_bpe_gz(&crate::model::resolve::clip_vocab_path()?)?;
        Self::build(Path::new("<random>"), &cfg, &store, tokenizer, Vec::new(), device)
    }

    fn build(dir: &Path, cfg: &ClipConfig, store: &WeightStore, mut tokenizer: Tokenizer, files: Vec<PathBuf>, device: &Device) -> Result<Self> {
        let targets = RefCell::new(Default::default());
        let p = Params::root(store, &targets);
        let mut text_cfg = cfg.text_config.clone();
        text_cfg.projection_dim = Some(cfg.projection_dim);
        let text = TextEncoder::load(&p, &text_cfg, true).map_err(|e| model_err(e, dir))?;
        let vision = VisionTower::load(&p, &cfg.vision_config).map_err(|e| model_err(e, dir))?;
        let visual_projection = Linear::load(&p.pp("visual_projection"), cfg.vision_config.hidden_size, cfg.projection_dim, false)
            .map_err(|e| model_err(e, dir))?;
        tokenizer.context = text_cfg.max_position_embeddings.min(tokenizer.context);
        Ok(ClipScorer {
            path: dir.to_path_buf(),
            tokenizer,
            text,
            vision,
            visual_projection,
            image_size: cfg.vision_config.image_size,
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
            device: device.clone(),
            hash: std::cell::OnceCell::new(),
            files,
            warnings: RefCell::new(Vec::new()),
        })
    }

    /// The side of the square images the vision tower reads.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    pub fn fingerprint(&self) -> Result<String> {
        if let Some(h) = self.hash.get() {
            return Ok(h.clone());
        }
        let h = fingerprint(&self.files)?;
        Ok(self.hash.get_or_init(|| h).clone())
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
        let pooled = self.vision.forward(pixels)?;
        normalize(&self.visual_projection.forward(&pooled)?)
    }

    /// L2-normalised image embeddings of 8-bit images.
    pub fn image_embeddings(&self, images: &[RgbImage]) -> Result<Tensor> {
        let t = crate::imageio::images_to_tensor(images, &self.device)?;
        self.image_embeddings_from_pixels(&self.preprocess(&t)?)
    }

    /// L2-normalised text embeddings from token ids `[B, 77]`.
    pub fn text_embeddings_from_ids(&self, ids: &Tensor) -> Result<Tensor> {
        normalize(&self.text.forward(ids, LayerChoice::LAST)?.pooled)
    }

    /// L2-normalised text embeddings; prompts longer than CLIP's context are cut (and reported).
    pub fn text_embeddings(&self, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for t in texts {
            let e = self.tokenizer.encode(t);
            if e.truncated {
                self.warnings.borrow_mut().push(format!(
                    "CLIP read only the first {} of {} tokens of {t:?}",
                    self.tokenizer.context - 2,
                    e.prompt_tokens
                ));
            }
            ids.extend(e.ids);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), self.tokenizer.context), &self.device)?;
        self.text_embeddings_from_ids(&ids)
    }

    /// Raw cosine of each image with the text at the same index.
    pub fn text_image_scores(&self, images: &[RgbImage], texts: &[&str]) -> Result<Vec<f64>> {
        if images.len() != texts.len() {
            return Err(Error::invalid(format!("{} images but {} texts", images.len(), texts.len())));
        }
        let ie = self.image_embeddings(images)?;
        let te = self.text_embeddings(texts)?;
        row_cosines(&ie, &te)
    }
}

fn model_err(e: Error, dir: &Path) -> Error {
    match e {
        Error::Invalid(m) => Error::model(dir, m),
        other => other,
    }
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
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
