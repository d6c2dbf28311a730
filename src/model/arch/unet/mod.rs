//! `UNet2DConditionModel`: the denoiser of SD 1.x, 2.x and SDXL, read from diffusers' config.
//!
//! This is the project's own implementation (not candle-transformers') because it must
//! (1) take one timestep per batch item, for training, (2) carry SDXL's added conditioning, and
//! (3) let gradients reach every LoRA matrix. Layer and key names follow diffusers exactly.

pub mod blocks;
pub mod transformer;

use std::sync::Mutex;

use candle_core::{DType, Tensor, TensorId};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::params::Params;
use crate::model::row_groups::Group;
use blocks::{AttentionLayout, BlockLayout, Common, DownBlock, MidBlock, UpBlock};

/// A config value that diffusers allows either once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::invalid(format!("UNet config: `{what}` has {} entries for {n} blocks", v.len()))),
        }
    }
}

/// The fields of diffusers' `UNet2DConditionModel` config.json this implementation reads.
/// Fields it cannot honour are checked in [`UNetConfig::validate`] rather than ignored.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "eight_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub act_fn: Option<String>,
    #[serde(default)]
    pub conv_in_kernel: Option<usize>,
    #[serde(default)]
    pub conv_out_kernel: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl Default for PerBlock<bool> {
    fn default() -> Self {
        PerBlock::One(false)
    }
}

fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn two_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn eight_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}

impl UNetConfig {
    /// SD 1.5's UNet.
    pub fn sd15() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64
        }))
        .expect("static config")
    }

    /// SD 2.x's UNet (768-v).
    pub fn sd2() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": true, "sample_size": 96
        }))
        .expect("static config")
    }

    /// SDXL base's UNet.
    pub fn sdxl() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128
        }))
        .expect("static config")
    }

    /// Rejects configs this implementation would run wrongly, naming the field.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let bad = |m: String| Err(Error::invalid(format!("UNet config: {m}")));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} block_out_channels, {} down blocks and {} up blocks must agree",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("up block type `{t}` is not supported"));
            }
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn" {
                return bad(format!("mid block type `{m}` is not supported"));
            }
        let unsupported: [(&str, bool); 9] = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            ("resnet_time_scale_shift other than `default`", self.resnet_time_scale_shift.as_deref().is_some_and(|s| s != "default")),
            ("time_embedding_type other than `positional`", self.time_embedding_type.as_deref().is_some_and(|s| s != "positional")),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("act_fn other than `silu`", self.act_fn.as_deref().is_some_and(|s| s != "silu")),
            ("only_cross_attention", self.only_cross_attention.expand(n, "only_cross_attention")?.iter().any(|&b| b)),
        ];
        for (what, present) in unsupported {
            if present {
                return bad(format!("{what} is not supported"));
            }
        }
        if self.conv_in_kernel.unwrap_or(3) != 3 || self.conv_out_kernel.unwrap_or(3) != 3 {
            return bad("conv_in_kernel/conv_out_kernel other than 3".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if self.addition_time_embed_dim.is_some() && self.projection_class_embeddings_input_dim.is_some() => {}
            Some("text_time") => {
                return bad("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
            }
            Some(other) => return bad(format!("addition_embed_type `{other}` is not supported")),
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % groups != 0) {
            return bad(format!("{c} channels do not split into {groups} groups"));
        }
        Ok(())
    }

    /// How many times the UNet halves the latent (the number of downsamplers).
    pub fn downsamplings(&self) -> usize {
        self.block_out_channels.len() - 1
    }

    /// The text width the cross-attention layers expect (768 SD 1.x, 1024 SD 2.x, 2048 SDXL).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        }
    }

    pub fn is_sdxl_style(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}

/// SDXL's extra conditioning: the pooled text embedding and the six size/crop numbers.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `[B, pooled]`
    pub text_embeds: Tensor,
    /// `[B, 6]`: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: Tensor,
}

struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn load(p: &Params, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(&p.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&p.pp("linear_2"), dim, dim, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Sinusoidal embedding of `t [B]` to `[B, dim]`, as diffusers' `Timesteps`.
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[&cos, &sin], 1)? } else { Tensor::cat(&[&sin, &cos], 1)? };
    let emb = if dim % 2 == 1 { emb.pad_with_zeros(1, 0, 1)? } else { emb };
    Ok(emb)
}

pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// [`UNet::predict`]'s row groups' slices of the last context (see [`UNet::group_context`]).
    group_contexts: Mutex<Vec<((TensorId, usize), Tensor)>>,
}

impl UNet {
    pub fn load(p: &Params, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let temb = c.time_embedding_dim.unwrap_or(ch[0] * 4);
        let heads = match &c.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => c.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let cross = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let depth = c.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let common = Common { temb, groups: c.norm_num_groups, eps: c.norm_eps, downsample_padding: c.downsample_padding };
        let attn = |i: usize, d: usize| AttentionLayout {
            heads: heads[i],
            depth: d,
            context_dim: cross[i],
            linear_projection: c.use_linear_projection,
        };

        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let layout = BlockLayout {
                in_ch: if i == 0 { ch[0] } else { ch[i - 1] },
                out_ch: ch[i],
                prev_out_ch: 0,
                layers: layers[i],
                attention: (c.down_block_types[i] == "CrossAttnDownBlock2D").then(|| attn(i, depth[i])),
                resample: i + 1 < n,
            };
            down.push(DownBlock::load(&p.pp("down_blocks").pp(i), &layout, &common)?);
        }
        let mid = MidBlock::load(&p.pp("mid_block"), ch[n - 1], &attn(n - 1, depth[n - 1]), &common)?;

        let rev_depth: Vec<usize> = match &c.reverse_transformer_layers_per_block {
            Some(r) if r.len() == n => r.clone(),
            Some(r) => return Err(Error::invalid(format!("UNet config: reverse_transformer_layers_per_block has {} entries for {n} blocks", r.len()))),
            None => depth.iter().rev().copied().collect(),
        };
        let mut up = Vec::with_capacity(n);
        #[allow(clippy::needless_range_loop)] // i and its mirror r index several tables
        for i in 0..n {
            let r = n - 1 - i; // the matching down level
            let layout = BlockLayout {
                in_ch: ch[r.saturating_sub(1)],
                out_ch: ch[r],
                prev_out_ch: if i == 0 { ch[n - 1] } else { ch[r + 1] },
                layers: layers[r] + 1,
                attention: (c.up_block_types[i] == "CrossAttnUpBlock2D").then(|| attn(r, rev_depth[i])),
                resample: i + 1 < n,
            };
            up.push(UpBlock::load(&p.pp("up_blocks").pp(i), &layout, &common)?);
        }
        let add_embedding = if c.is_sdxl_style() {
            let in_dim = c.projection_class_embeddings_input_dim.expect("validated");
            Some(TimestepEmbedding::load(&p.pp("add_embedding"), in_dim, temb)?)
        } else {
            None
        };
        Ok(UNet {
            config: c.clone(),
            conv_in: Conv2d::load(&p.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1, true)?,
            time_embedding: TimestepEmbedding::load(&p.pp("time_embedding"), ch[0], temb)?,
            add_embedding,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(&p.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::load(&p.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1, true)?,
            group_contexts: Mutex::new(Vec::new()),
        })
    }

    /// Predicts noise (or v) for `x [B, C, h, w]` at `timesteps [B]` given `context [B, N, D]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        crate::model::nn::on_worker(|| self.forward_on_worker(x, timesteps, context, added))
    }

    /// [`UNet::forward`] for inference, where nothing needs a gradient: on a CPU with several
    /// threads the batch runs as two row groups at once ([`crate::model::row_groups`]), keeping
    /// guidance's pairs together. The same result as [`UNet::forward`] up to float rounding.
    pub fn predict(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, added: Option<&AddedConditioning>) -> Result<Tensor> {
        crate::model::nn::on_worker(|| {
            crate::model::row_groups::in_row_groups(x.dim(0)?, true, x.device(), |group| {
                let added = match added {
                    Some(a) => Some(AddedConditioning { text_embeds: group.select(&a.text_embeds)?, time_ids: group.select(&a.time_ids)? }),
                    None => None,
                };
                let context = self.group_context(context, group)?;
                self.forward_on_worker(&group.select(x)?, &group.select(timesteps)?, &context, added.as_ref())
            })
        })
    }

    /// `group`'s rows of `context`, the same tensor at every step that passes this context: the
    /// cross-attention layers keep their context's keys and values by tensor id.
    fn group_context(&self, context: &Tensor, group: Group<'_>) -> Result<Tensor> {
        let mut kept = self.group_contexts.lock().expect("group context lock poisoned");
        let key = (context.id(), group.index());
        if let Some((_, t)) = kept.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let t = group.select(context)?;
        kept.retain(|((id, _), _)| *id == context.id());
        kept.push((key, t.clone()));
        Ok(t)
    }

    /// `conv_in` and the down blocks' layers before the first one that reads the text context:
    /// the hidden state, the skips so far, and where to go on (down block, step of
    /// [`DownBlock::run`]). Classifier-free guidance passes every latent twice (its
    /// unconditional and conditional rows), so when the batch's two halves have bitwise equal
    /// latents and time embeddings, those layers compute the same values for both halves: they
    /// run on the first half and their results are repeated.
    fn context_free_prefix(&self, x: &Tensor, temb: &Tensor) -> Result<(Tensor, Vec<Tensor>, (usize, usize))> {
        if !(halves_are_equal(x)? && halves_are_equal(temb)?) {
            let h = self.conv_in.forward(x)?;
            return Ok((h.clone(), vec![h], (0, 0)));
        }
        let half = x.dim(0)? / 2;
        let (x, temb) = (x.narrow(0, 0, half)?, temb.narrow(0, 0, half)?);
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        let mut resume = (self.down.len(), 0);
        for (i, block) in self.down.iter().enumerate() {
            let (out, step) = block.run(h, &temb, None, &mut skips, 0)?;
            h = out;
            if step < block.steps() {
                resume = (i, step);
                break;
            }
        }
        let twice = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[t, t], 0)?) };
        Ok((twice(&h)?, skips.iter().map(twice).collect::<Result<_>>()?, resume))
    }

    fn forward_on_worker(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        if timesteps.dims() != [b] || context.dim(0)? != b {
            return Err(Error::invalid(format!(
                "UNet: batch of {b} latents with timesteps {:?} and context {:?}",
                timesteps.dims(),
                context.dims()
            )));
        }
        let c = &self.config;
        let t_emb = sinusoidal_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
            .to_dtype(x.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_embedding, added) {
            (Some(add), Some(a)) => {
                let dim = c.addition_time_embed_dim.expect("validated");
                let ids = a.time_ids.flatten_all()?;
                let time = sinusoidal_embedding(&ids, dim, c.flip_sin_to_cos, c.freq_shift)?
                    .reshape((b, ()))?
                    .to_dtype(x.dtype())?;
                let cond = Tensor::cat(&[&a.text_embeds, &time], 1)?;
                emb = (emb + add.forward(&cond)?)?;
            }
            (Some(_), None) => {
                return Err(Error::invalid("this UNet (SDXL) needs pooled text embeddings and time ids"));
            }
            (None, _) => {}
        }
        let temb = emb.silu()?;

        let (mut h, mut skips, (first_block, first_step)) = self.context_free_prefix(x, &temb)?;
        for (i, block) in self.down.iter().enumerate().skip(first_block) {
            let from = if i == first_block { first_step } else { 0 };
            h = block.run(h, &temb, Some(context), &mut skips, from)?.0;
        }
        h = self.mid.forward(&h, &temb, context)?;
        for block in &self.up {
            h = block.forward(&h, &temb, context, &mut skips)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// Whether `t`'s batch has an even, nonzero size and its two halves are bitwise equal.
fn halves_are_equal(t: &Tensor) -> Result<bool> {
    let b = t.dim(0)?;
    if b == 0 || b % 2 == 1 {
        return Ok(false);
    }
    let (first, second) = (t.narrow(0, 0, b / 2)?, t.narrow(0, b / 2, b / 2)?);
    // NaN never equals itself: such a batch is simply not shared.
    Ok(first.eq(&second)?.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::noise::seeded_randn as randn;
    use crate::model::params::WeightStore;
    use candle_core::Device;

    #[test]
    fn predict_gives_each_row_group_the_same_context_slice_every_step() {
        let config: UNetConfig = serde_json::from_str(include_str!("../../../../assets/tinyworld/tiny-sd/unet/config.json")).unwrap();
        let store = WeightStore::random(1, DType::F32, &Device::Cpu);
        let targets = Default::default();
        let unet = UNet::load(&Params::root(&store, &targets), &config).unwrap();
        let x = randn(&[2, 4, 8, 8], 2);
        let x = Tensor::cat(&[&x, &x], 0).unwrap();
        let t = Tensor::full(500f32, 4, &Device::Cpu).unwrap();
        let ctx = randn(&[4, 77, config.context_dim()], 3);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let kept = || unet.group_contexts.lock().unwrap().iter().map(|(key, t)| (*key, t.id())).collect::<Vec<_>>();
        let first = pool.install(|| unet.predict(&x, &t, &ctx, None)).unwrap();
        let slices = kept();
        assert_eq!(slices.len(), 2, "one slice per row group");
        // A second step with the same context reuses the very same slices (so the attention
        // layers' kept keys and values, found by tensor id, are reused too)...
        let second = pool.install(|| unet.predict(&x, &t, &ctx, None)).unwrap();
        assert_eq!(kept(), slices);
        assert_eq!(first.flatten_all().unwrap().to_vec1::<f32>().unwrap(), second.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // ...and a new context replaces them.
        let other = randn(&[4, 77, config.context_dim()], 4);
        pool.install(|| unet.predict(&x, &t, &other, None)).unwrap();
        let now = kept();
        assert_eq!(now.len(), 2);
        assert!(now.iter().all(|((id, _), _)| *id == other.id()));
    }
}
