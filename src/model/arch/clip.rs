//! The CLIP architecture in the transformers `CLIPModel` layout: the vision tower (ViT with a
//! class token), the text tower (the SD text encoder with a projection) and the projections into
//! the shared embedding space. [`crate::model::clip`] loads and runs it as a scorer.

use candle_core::{IndexOp, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Activation, Conv2d, LayerNorm, Linear};
use crate::model::params::{Init, Params};
use crate::model::text_encoder::{EncoderLayer, LayerChoice, TextConfig, TextEncoder, TowerDims};

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "three")]
    pub num_channels: usize,
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
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
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

/// The two towers and the image projection, loaded from `Params` (weights by key).
pub struct ClipTowers {
    text: TextEncoder,
    vision: VisionTower,
    visual_projection: Linear,
}

impl ClipTowers {
    pub fn load(p: &Params, cfg: &ClipConfig) -> Result<Self> {
        let mut text_cfg = cfg.text_config.clone();
        text_cfg.projection_dim = Some(cfg.projection_dim);
        Ok(ClipTowers {
            text: TextEncoder::load(p, &text_cfg, true)?,
            vision: VisionTower::load(p, &cfg.vision_config)?,
            visual_projection: Linear::load(&p.pp("visual_projection"), cfg.vision_config.hidden_size, cfg.projection_dim, false)?,
        })
    }

    /// L2-normalised image embeddings of preprocessed pixels `[B, 3, S, S]`.
    pub fn image_embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?;
        normalize(&self.visual_projection.forward(&pooled)?)
    }

    /// L2-normalised text embeddings of token ids `[B, 77]`.
    pub fn text_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        normalize(&self.text.forward(ids, LayerChoice::LAST)?.pooled)
    }
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}
