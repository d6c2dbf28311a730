//! DINOv2 in the transformers `Dinov2Model` layout: a ViT whose CLS token, after the final layer
//! norm, is the image embedding DreamBooth-style evaluations compare for subject identity
//! (DINO-I). Patches of 14 pixels, layer scale on both residual branches, and position
//! embeddings interpolated (bicubic, as PyTorch's) to the image's patch grid.

use candle_core::{IndexOp, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Activation, Conv2d, LayerNorm, Linear, attention_heads};
use crate::model::ops::resize::interpolate_bicubic_torch;
use crate::model::params::{Init, Params};

/// The fields of a `Dinov2Config` this implementation reads.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// The image size the position embeddings were trained for (518 for the published models).
    pub image_size: usize,
    #[serde(default = "fourteen")]
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn four() -> f64 {
    4.0
}
fn gelu() -> String {
    "gelu".into()
}
fn eps() -> f64 {
    1e-6
}
fn fourteen() -> usize {
    14
}
fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}

impl Dinov2Config {
    /// DINOv2 ViT-S/14 (`facebook/dinov2-small`).
    pub fn small() -> Self {
        serde_json::from_value(serde_json::json!({"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "image_size": 518})).expect("static config")
    }

    /// DINOv2 ViT-B/14 (`facebook/dinov2-base`).
    pub fn base() -> Self {
        serde_json::from_value(serde_json::json!({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 518})).expect("static config")
    }

    fn check(&self) -> Result<()> {
        if self.use_swiglu_ffn {
            return Err(Error::invalid("DINOv2: `use_swiglu_ffn` (the giant model's feed-forward) is not supported; use the small or base model"));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::invalid(format!("DINOv2: hidden_size {} is not a multiple of {} heads", self.hidden_size, self.num_attention_heads)));
        }
        Ok(())
    }
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    scale2: Tensor,
}

/// A loaded DINOv2 image encoder.
pub struct Dinov2 {
    pub config: Dinov2Config,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch: Conv2d,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    act: Activation,
}

impl Dinov2 {
    pub fn load(p: &Params, c: &Dinov2Config) -> Result<Self> {
        c.check()?;
        let h = c.hidden_size;
        let act = Activation::parse(&c.hidden_act).ok_or_else(|| Error::invalid(format!("DINOv2: unsupported hidden_act `{}`", c.hidden_act)))?;
        let e = p.pp("embeddings");
        let grid = c.image_size / c.patch_size;
        let inner = (h as f64 * c.mlp_ratio) as usize;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = p.pp("encoder").pp("layer").pp(i);
                let a = l.pp("attention");
                Ok(Layer {
                    norm1: LayerNorm::load(&l.pp("norm1"), h, c.layer_norm_eps)?,
                    q: Linear::load(&a.pp("attention").pp("query"), h, h, c.qkv_bias)?,
                    k: Linear::load(&a.pp("attention").pp("key"), h, h, c.qkv_bias)?,
                    v: Linear::load(&a.pp("attention").pp("value"), h, h, c.qkv_bias)?,
                    out: Linear::load(&a.pp("output").pp("dense"), h, h, true)?,
                    scale1: l.pp("layer_scale1").get("lambda1", &[h], Init::Ones)?,
                    norm2: LayerNorm::load(&l.pp("norm2"), h, c.layer_norm_eps)?,
                    fc1: Linear::load(&l.pp("mlp").pp("fc1"), h, inner, true)?,
                    fc2: Linear::load(&l.pp("mlp").pp("fc2"), inner, h, true)?,
                    scale2: l.pp("layer_scale2").get("lambda1", &[h], Init::Ones)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The mask token is used only in pre-training; read so it counts as used.
        let _ = e.get("mask_token", &[1, h], Init::Zeros);
        Ok(Dinov2 {
            config: c.clone(),
            cls_token: e.get("cls_token", &[1, 1, h], Init::Normal(0.02))?,
            position_embeddings: e.get("position_embeddings", &[1, grid * grid + 1, h], Init::Normal(0.02))?,
            patch: Conv2d::load(&e.pp("patch_embeddings").pp("projection"), c.num_channels, h, c.patch_size, c.patch_size, 0, true)?,
            layers,
            layernorm: LayerNorm::load(&p.pp("layernorm"), h, c.layer_norm_eps)?,
            act,
        })
    }

    /// Position embeddings for a `gh × gw` patch grid: the class position, then the trained grid
    /// resized as transformers does (bicubic in f32, unless the grid already fits).
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let total = self.position_embeddings.dim(1)? - 1;
        let side = (total as f64).sqrt().round() as usize;
        if gh == side && gw == side {
            return Ok(self.position_embeddings.clone());
        }
        let h = self.config.hidden_size;
        let dtype = self.position_embeddings.dtype();
        let grid = self.position_embeddings.i((.., 1.., ..))?.reshape((side, side, h))?.permute((2, 0, 1))?.contiguous()?;
        let data = grid.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let resized = interpolate_bicubic_torch(&data, h, side, side, gh, gw);
        let grid = Tensor::from_vec(resized, (h, gh * gw), &candle_core::Device::Cpu)?.t()?.to_device(self.position_embeddings.device())?.to_dtype(dtype)?;
        Ok(Tensor::cat(&[&self.position_embeddings.i((.., 0..1, ..))?, &grid.unsqueeze(0)?], 1)?)
    }

    /// Preprocessed pixels `[B, 3, H, W]` → the pooled embedding `[B, hidden]` (the CLS token
    /// after the final layer norm: transformers' `pooler_output`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, hgt, wid) = pixels.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw) = (hgt / p, wid / p);
        let h = self.config.hidden_size;
        let patches = self.patch.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, gh·gw, h]
        let cls = self.cls_token.broadcast_as((b, 1, h))?.contiguous()?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions(gh, gw)?)?;
        for l in &self.layers {
            let n = l.norm1.forward(&x)?;
            let a = attention_heads(&l.q.forward(&n)?, &l.k.forward(&n)?, &l.v.forward(&n)?, self.config.num_attention_heads)?;
            x = (x + l.out.forward(&a)?.broadcast_mul(&l.scale1)?)?;
            let n = l.norm2.forward(&x)?;
            let m = l.fc2.forward(&self.act.forward(&l.fc1.forward(&n)?)?)?;
            x = (x + m.broadcast_mul(&l.scale2)?)?;
        }
        Ok(self.layernorm.forward(&x)?.i((.., 0, ..))?.contiguous()?)
    }
}
