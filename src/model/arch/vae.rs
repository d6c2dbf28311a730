//! `AutoencoderKL`: encodes images to latents and decodes latents to images.
//!
//! Old checkpoints name the mid-block attention `query/key/value/proj_attn`; those keys are
//! renamed to `to_q/to_k/to_v/to_out.0` by [`normalize_vae_keys`] before loading.

use std::collections::HashMap;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Conv2d, GroupNorm, Linear, attention_heads};
use crate::model::params::Params;
use crate::model::unet::blocks::{Downsample, ResnetBlock, Upsample};

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// SD 1.x/2.x's VAE.
    pub fn sd() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        }
    }

    /// SDXL's VAE: the same architecture with another latent scale.
    pub fn sdxl() -> Self {
        VaeConfig { scaling_factor: 0.13025, ..Self::sd() }
    }

    /// Pixels per latent cell along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("VAE config: {m}")));
        if self.block_out_channels.is_empty() {
            return bad("no block_out_channels".into());
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return bad(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return bad(format!("up block type `{t}` is not supported"));
            }
        }
        Ok(())
    }
}

/// Renames legacy VAE attention keys in place.
pub fn normalize_vae_keys(tensors: &mut HashMap<String, Tensor>) {
    let renames = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for k in keys {
        for (old, new) in renames {
            let pat = format!(".attentions.0.{old}.");
            if k.contains(&pat) {
                let nk = k.replace(&pat, &format!(".attentions.0.{new}."));
                if let Some(t) = tensors.remove(&k) {
                    tensors.insert(nk, t);
                }
            }
        }
    }
}

/// Single-head self-attention over all pixels, with a group norm in front and a residual.
struct SpatialSelfAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialSelfAttention {
    fn load(p: &Params, ch: usize, groups: usize) -> Result<Self> {
        Ok(SpatialSelfAttention {
            norm: GroupNorm::load(&p.pp("group_norm"), groups, ch, 1e-6)?,
            to_q: Linear::load(&p.pp("to_q"), ch, ch, true)?,
            to_k: Linear::load(&p.pp("to_k"), ch, ch, true)?,
            to_v: Linear::load(&p.pp("to_v"), ch, ch, true)?,
            to_out: Linear::load(&p.pp("to_out").pp(0), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // contiguous(): the transposed view must not reach a batched matmul (candle #3744).
        let y = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&y)?;
        let k = self.to_k.forward(&y)?;
        let v = self.to_v.forward(&y)?;
        let o = attention_heads(&q, &k, &v, 1)?;
        let o = self.to_out.forward(&o)?.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialSelfAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn load(p: &Params, ch: usize, c: &VaeConfig) -> Result<Self> {
        let g = c.norm_num_groups;
        Ok(MidBlock {
            resnet0: ResnetBlock::load(&p.pp("resnets").pp(0), ch, ch, None, g, 1e-6)?,
            attention: if c.mid_block_add_attention {
                Some(SpatialSelfAttention::load(&p.pp("attentions").pp(0), ch, g)?)
            } else {
                None
            },
            resnet1: ResnetBlock::load(&p.pp("resnets").pp(1), ch, ch, None, g, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(p: &Params, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut blocks = Vec::new();
        for (i, &out) in ch.iter().enumerate() {
            let bp = p.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..c.layers_per_block {
                let inp = if j == 0 { if i == 0 { ch[0] } else { ch[i - 1] } } else { out };
                resnets.push(ResnetBlock::load(&bp.pp("resnets").pp(j), inp, out, None, g, 1e-6)?);
            }
            let down = if i + 1 < ch.len() { Some(Downsample::load(&bp.pp("downsamplers").pp(0), out, 0)?) } else { None };
            blocks.push((resnets, down));
        }
        let last = *ch.last().expect("validated");
        Ok(Encoder {
            conv_in: Conv2d::load(&p.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1, true)?,
            blocks,
            mid: MidBlock::load(&p.pp("mid_block"), last, c)?,
            norm_out: GroupNorm::load(&p.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: Conv2d::load(&p.pp("conv_out"), last, 2 * c.latent_channels, 3, 1, 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(p: &Params, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let last = ch[n - 1];
        let mut blocks = Vec::new();
        let mut prev = last;
        for i in 0..n {
            let out = ch[n - 1 - i];
            let bp = p.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..=c.layers_per_block {
                let inp = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock::load(&bp.pp("resnets").pp(j), inp, out, None, g, 1e-6)?);
            }
            let up = if i + 1 < n { Some(Upsample::load(&bp.pp("upsamplers").pp(0), out)?) } else { None };
            blocks.push((resnets, up));
            prev = out;
        }
        Ok(Decoder {
            conv_in: Conv2d::load(&p.pp("conv_in"), c.latent_channels, last, 3, 1, 1, true)?,
            mid: MidBlock::load(&p.pp("mid_block"), last, c)?,
            blocks,
            norm_out: GroupNorm::load(&p.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            conv_out: Conv2d::load(&p.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1, true)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

pub struct Vae {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    pub fn load(p: &Params, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let l = config.latent_channels;
        Ok(Vae {
            config: config.clone(),
            encoder: Encoder::load(&p.pp("encoder"), config)?,
            decoder: Decoder::load(&p.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&p.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0, true)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(&p.pp("post_quant_conv"), l, l, 1, 1, 0, true)?)
            } else {
                None
            },
        })
    }

    /// Latents (already multiplied by the scaling factor, as the UNet sees them) to images in
    /// `[0, 1]`, `[B, 3, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decode_unclamped(latents)?.clamp(0f32, 1f32)?)
    }

    /// [`Vae::decode`] before the clamp to `[0, 1]`, which would hide an overflow: an infinite
    /// value clamps to 1, and a NaN through min/max to a plausible number.
    ///
    /// On the CPU the images go one at a time, two at once ([`Vae::image_by_image`]).
    pub fn decode_unclamped(&self, latents: &Tensor) -> Result<Tensor> {
        crate::model::nn::on_worker(|| self.image_by_image(latents, |z| self.decode_on_worker(z)))
    }

    /// [`Vae::decode_unclamped`] in one pass over the whole batch on every device: the batched
    /// kernels the GPU path takes, for tests that compare them with image-by-image decodes.
    pub fn decode_unclamped_in_one_pass(&self, latents: &Tensor) -> Result<Tensor> {
        crate::model::nn::on_worker(|| self.decode_on_worker(latents))
    }

    fn decode_on_worker(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling_factor)?;
        if let Some(s) = self.config.shift_factor {
            z = (z + s)?;
        }
        if let Some(pq) = &self.post_quant_conv {
            z = pq.forward(&z)?;
        }
        let x = self.decoder.forward(&z)?;
        Ok(((x + 1.0)? / 2.0)?)
    }

    /// Images in `[0, 1]` to the mean of the latent distribution, scaled for the UNet. On the
    /// CPU the images go one at a time, two at once ([`Vae::image_by_image`]).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        crate::model::nn::on_worker(|| self.image_by_image(images, |x| self.encode_on_worker(x)))
    }

    /// [`Vae::encode`] in one pass over the whole batch on every device (see
    /// [`Vae::decode_unclamped_in_one_pass`]).
    pub fn encode_in_one_pass(&self, images: &Tensor) -> Result<Tensor> {
        crate::model::nn::on_worker(|| self.encode_on_worker(images))
    }

    /// `pass` over a batch. On the CPU the batch runs as two row groups at once
    /// ([`crate::model::row_groups`]), each passing its images one at a time: the VAE's
    /// activations are the largest tensors of a generation or a training run's latent cache
    /// (peak memory: the portrait suite's fell from 290 to 218 MB, a training run's from
    /// 357 to 338 MB), and one image's stay in cache better (decoding four: 101 against 106 ms).
    /// Other devices take the batch in one pass.
    fn image_by_image(&self, batch: &Tensor, pass: impl Fn(&Tensor) -> Result<Tensor> + Sync) -> Result<Tensor> {
        if !crate::model::row_groups::on_fused_cpu(batch.device()) {
            return pass(batch);
        }
        crate::model::row_groups::in_row_groups(batch.dim(0)?, false, batch.device(), |group| {
            let mine = group.select(batch)?;
            let each = (0..mine.dim(0)?).map(|i| pass(&mine.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&each, 0)?)
        })
    }

    fn encode_on_worker(&self, images: &Tensor) -> Result<Tensor> {
        let x = ((images * 2.0)? - 1.0)?;
        let mut h = self.encoder.forward(&x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let mean = h.narrow(1, 0, self.config.latent_channels)?;
        let mean = match self.config.shift_factor {
            Some(s) => (mean - s)?,
            None => mean,
        };
        Ok((mean * self.config.scaling_factor)?)
    }
}
