//! The CLIP text transformer: Stable Diffusion's text encoder and the text tower of CLIP scorers.
//!
//! Keys follow transformers' `CLIPTextModel` (`text_model.encoder.layers.N.self_attn.q_proj`).
//! Files saved without the `text_model.` prefix are normalised to it on load, so LoRA paths
//! (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`) always resolve.

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Activation, Embedding, LayerNorm, Linear, attention};
use crate::model::params::Params;

/// `config.json` of a `CLIPTextModel` (or the `text_config` of a `CLIPModel`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

impl TextConfig {
    /// OpenAI CLIP ViT-L/14's text tower, as in SD 1.x.
    pub fn sd15() -> Self {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
            eos_token_id: 49407,
        }
    }

    /// OpenCLIP ViT-H/14's text tower as SD 2.x ships it (23 of 24 layers, GELU).
    pub fn sd2() -> Self {
        TextConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            projection_dim: Some(512),
            ..Self::sd15()
        }
    }

    /// SDXL's second text encoder: OpenCLIP ViT-bigG/14 with projection.
    pub fn sdxl_bigg() -> Self {
        TextConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            projection_dim: Some(1280),
            ..Self::sd15()
        }
    }

    pub fn activation(&self) -> Result<Activation> {
        Activation::parse(&self.hidden_act)
            .ok_or_else(|| Error::invalid(format!("text encoder: unsupported hidden_act `{}`", self.hidden_act)))
    }
}

/// One pre-norm transformer layer of CLIP (text and vision towers share it).
pub(crate) struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

/// The sizes of a CLIP transformer tower.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TowerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub act: Activation,
    pub eps: f64,
}

impl EncoderLayer {
    fn load(p: &Params, c: &TextConfig) -> Result<Self> {
        let dims = TowerDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.activation()?,
            eps: c.layer_norm_eps,
        };
        Self::load_with(p, &dims)
    }

    pub(crate) fn load_with(p: &Params, c: &TowerDims) -> Result<Self> {
        let h = c.hidden;
        let a = p.pp("self_attn");
        Ok(EncoderLayer {
            ln1: LayerNorm::load(&p.pp("layer_norm1"), h, c.eps)?,
            q: Linear::load(&a.pp("q_proj"), h, h, true)?,
            k: Linear::load(&a.pp("k_proj"), h, h, true)?,
            v: Linear::load(&a.pp("v_proj"), h, h, true)?,
            out: Linear::load(&a.pp("out_proj"), h, h, true)?,
            ln2: LayerNorm::load(&p.pp("layer_norm2"), h, c.eps)?,
            fc1: Linear::load(&p.pp("mlp").pp("fc1"), h, c.intermediate, true)?,
            fc2: Linear::load(&p.pp("mlp").pp("fc2"), c.intermediate, h, true)?,
            heads: c.heads,
            act: c.act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let d = h / self.heads;
        let y = self.ln1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.q.forward(&y)?)?;
        let k = split(self.k.forward(&y)?)?;
        let v = split(self.v.forward(&y)?)?;
        let o = attention(&q, &k, &v, mask)?.transpose(1, 2)?.reshape((b, n, h))?;
        let x = (x + self.out.forward(&o)?)?;
        let y = self.ln2.forward(&x)?;
        let y = self.fc2.forward(&self.act.forward(&self.fc1.forward(&y)?)?)?;
        Ok((x + y)?)
    }
}

/// Which hidden state a pipeline takes as its conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerChoice {
    /// 0 = the last layer, 1 = the penultimate ("clip skip 2"), ...
    pub skip: usize,
    /// Apply the final layer norm to the chosen layer (SD 1.x/2.x: yes; SDXL: no).
    pub final_norm: bool,
}

impl LayerChoice {
    pub const LAST: LayerChoice = LayerChoice { skip: 0, final_norm: true };
    pub const SDXL: LayerChoice = LayerChoice { skip: 1, final_norm: false };
}

/// The outputs of one text-encoder call.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// `[B, tokens, hidden]`: the conditioning the UNet cross-attends to.
    pub hidden: Tensor,
    /// `[B, hidden]` or `[B, projection]`: the final-normed end-of-text state, projected when
    /// the model has a text projection.
    pub pooled: Tensor,
}

pub struct TextEncoder {
    pub config: TextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
}

impl TextEncoder {
    /// `p` addresses the folder's root; `text_model.` is added here. The projection is loaded
    /// when `text_projection.weight` exists (CLIPModel, CLIPTextModelWithProjection).
    pub fn load(p: &Params, config: &TextConfig, with_projection: bool) -> Result<Self> {
        let c = config;
        let t = p.pp("text_model");
        let e = t.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&t.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let projection = match (with_projection, c.projection_dim) {
            (true, Some(pd)) => Some(Linear::load(&p.pp("text_projection"), c.hidden_size, pd, false)?),
            _ => None,
        };
        Ok(TextEncoder {
            config: c.clone(),
            token_embedding: Embedding::load(&e.pp("token_embedding"), c.vocab_size, c.hidden_size)?,
            position_embedding: Embedding::load(&e.pp("position_embedding"), c.max_position_embeddings, c.hidden_size)?,
            layers,
            final_norm: LayerNorm::load(&t.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?,
            projection,
        })
    }

    /// Encodes `ids [B, tokens]` (u32). The pooled state is taken at the first end-of-text token.
    pub fn forward(&self, ids: &Tensor, choice: LayerChoice) -> Result<TextEncoding> {
        crate::model::nn::on_worker(|| self.forward_on_worker(ids, choice))
    }

    fn forward_on_worker(&self, ids: &Tensor, choice: LayerChoice) -> Result<TextEncoding> {
        let (b, n) = ids.dims2()?;
        if n > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{n} tokens, but the text encoder reads at most {}",
                self.config.max_position_embeddings
            )));
        }
        if choice.skip >= self.layers.len() {
            return Err(Error::invalid(format!(
                "clip skip {} is more than the {} layers of the text encoder",
                choice.skip + 1,
                self.layers.len()
            )));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, n as u32, device)?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?.unsqueeze(0)?)?;
        let mask = causal_mask(n, device, x.dtype())?;
        let stop = self.layers.len() - choice.skip;
        let mut chosen = None;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, Some(&mask))?;
            if i + 1 == stop {
                chosen = Some(x.clone());
            }
        }
        let chosen = chosen.expect("stop is within the layers");
        let hidden = if choice.final_norm { self.final_norm.forward(&chosen)? } else { chosen };
        let last = self.final_norm.forward(&x)?;
        let eos = eos_positions(ids, self.config.eos_token_id)?;
        let pooled = Tensor::cat(
            &(0..b).map(|i| last.i((i, eos[i]))?.unsqueeze(0)).collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(TextEncoding { hidden, pooled })
    }
}

fn causal_mask(n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, n, n), device)?.to_dtype(dtype)?)
}

/// Index of the first end-of-text token of each row (the last index when there is none).
/// Configs written by old transformers versions say `eos_token_id: 2`; like transformers, those
/// take the position of the highest id, which is CLIP's end token.
fn eos_positions(ids: &Tensor, eos: u32) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|r| {
            if eos == 2 {
                r.iter().enumerate().max_by_key(|(i, t)| (**t, std::cmp::Reverse(*i))).map(|(i, _)| i).unwrap_or(0)
            } else {
                r.iter().position(|&t| t == eos).unwrap_or(r.len() - 1)
            }
        })
        .collect())
}
