//! The UNet's convolutional building blocks: resnets, down/up samplers and the down, mid and up
//! blocks that combine them with spatial transformers.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::nn::{Conv2d, ConvExtras, GroupNorm, Linear};
use crate::model::params::Params;
use crate::model::unet::transformer::{SpatialTransformer, SpatialTransformerConfig};

/// `ResnetBlock2D` (used by the UNet with a time embedding and by the VAE without).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(p: &Params, in_ch: usize, out_ch: usize, temb: Option<usize>, groups: usize, eps: f64) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&p.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::load(&p.pp("conv1"), in_ch, out_ch, 3, 1, 1, true)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::load(&p.pp("time_emb_proj"), t, out_ch, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&p.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::load(&p.pp("conv2"), out_ch, out_ch, 3, 1, 1, true)?,
            shortcut: if in_ch != out_ch {
                Some(Conv2d::load(&p.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0, true)?)
            } else {
                None
            },
        })
    }

    /// `temb` is the already-activated time embedding `[B, T]` (or `None` in the VAE).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // The time embedding and the skip are folded into the convolutions' output passes.
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(t)?),
            _ => None,
        };
        let h = self.conv1.forward_with(&self.norm1.forward_silu(x)?, ConvExtras { channel_add: t.as_ref(), ..Default::default() })?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_with(&self.norm2.forward_silu(&h)?, ConvExtras { residual: Some(&skip), ..Default::default() })
    }
}

/// Stride-2 convolution. `padding` 1 in the UNet; 0 with a one-sided pad in the VAE encoder.
pub struct Downsample {
    conv: Conv2d,
    asymmetric: bool,
}

impl Downsample {
    pub fn load(p: &Params, ch: usize, padding: usize) -> Result<Self> {
        Ok(Downsample { conv: Conv2d::load(&p.pp("conv"), ch, ch, 3, 2, padding, true)?, asymmetric: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            return self.conv.forward(&x);
        }
        self.conv.forward(x)
    }
}

/// Nearest-neighbour upsampling to a target size, then a 3×3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(p: &Params, ch: usize) -> Result<Self> {
        Ok(Upsample { conv: Conv2d::load(&p.pp("conv"), ch, ch, 3, 1, 1, true)? })
    }

    /// `size` is the skip connection's spatial size (odd latent sizes round down on the way in,
    /// so plain doubling would not meet them); `None` doubles.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((h * 2, w * 2));
        self.conv.forward_upsampled(x, (th, tw))
    }
}

/// What one level of the UNet is made of.
pub struct BlockLayout {
    pub in_ch: usize,
    pub out_ch: usize,
    /// Channels of the previous (deeper) up block's output; up blocks only.
    pub prev_out_ch: usize,
    pub layers: usize,
    /// `Some` for cross-attention blocks.
    pub attention: Option<AttentionLayout>,
    pub resample: bool,
}

#[derive(Clone, Copy)]
pub struct AttentionLayout {
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
}

pub struct Common {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub downsample_padding: usize,
}

fn transformer(p: &Params, ch: usize, a: &AttentionLayout, common: &Common) -> Result<SpatialTransformer> {
    SpatialTransformer::load(
        p,
        &SpatialTransformerConfig {
            channels: ch,
            heads: a.heads,
            depth: a.depth,
            context_dim: a.context_dim,
            groups: common.groups,
            linear_projection: a.linear_projection,
        },
    )
}

/// `DownBlock2D` or `CrossAttnDownBlock2D`.
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    pub fn load(p: &Params, l: &BlockLayout, common: &Common) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..l.layers {
            let in_ch = if i == 0 { l.in_ch } else { l.out_ch };
            resnets.push(ResnetBlock::load(&p.pp("resnets").pp(i), in_ch, l.out_ch, Some(common.temb), common.groups, common.eps)?);
            if let Some(a) = &l.attention {
                attentions.push(transformer(&p.pp("attentions").pp(i), l.out_ch, a, common)?);
            }
        }
        let downsampler = if l.resample {
            Some(Downsample::load(&p.pp("downsamplers").pp(0), l.out_ch, common.downsample_padding)?)
        } else {
            None
        };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Returns the output and pushes every intermediate state onto `skips`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        Ok(self.run(x.clone(), temb, Some(ctx), skips, 0)?.0)
    }

    /// Steps of [`DownBlock::run`]: each resnet and its transformer, then the downsampler.
    pub fn steps(&self) -> usize {
        2 * self.resnets.len() + 1
    }

    /// Runs steps `from..` (resnet `i` is step `2i`, its transformer `2i + 1`, the downsampler the
    /// last), pushing intermediate states onto `skips` as [`DownBlock::forward`] does. Without a
    /// context it stops before the first transformer and returns that step, else
    /// [`DownBlock::steps`].
    pub fn run(&self, mut h: Tensor, temb: &Tensor, ctx: Option<&Tensor>, skips: &mut Vec<Tensor>, from: usize) -> Result<(Tensor, usize)> {
        for step in from..self.steps() {
            let i = step / 2;
            if step == self.steps() - 1 {
                if let Some(d) = &self.downsampler {
                    h = d.forward(&h)?;
                    skips.push(h.clone());
                }
            } else if step % 2 == 0 {
                h = self.resnets[i].forward(&h, Some(temb))?;
                if self.attentions.get(i).is_none() {
                    skips.push(h.clone());
                }
            } else if let Some(attn) = self.attentions.get(i) {
                let Some(ctx) = ctx else { return Ok((h, step)) };
                h = attn.forward(&h, ctx)?;
                skips.push(h.clone());
            }
        }
        Ok((h, self.steps()))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
pub struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

impl MidBlock {
    pub fn load(p: &Params, ch: usize, attention: &AttentionLayout, common: &Common) -> Result<Self> {
        let resnet = |i: usize| ResnetBlock::load(&p.pp("resnets").pp(i), ch, ch, Some(common.temb), common.groups, common.eps);
        Ok(MidBlock {
            resnets: vec![resnet(0)?, resnet(1)?],
            attentions: vec![transformer(&p.pp("attentions").pp(0), ch, attention, common)?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, ctx)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`: one more resnet than the down blocks, each eating a skip.
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    pub fn load(p: &Params, l: &BlockLayout, common: &Common) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..l.layers {
            let skip_ch = if i == l.layers - 1 { l.in_ch } else { l.out_ch };
            let in_ch = if i == 0 { l.prev_out_ch } else { l.out_ch };
            resnets.push(ResnetBlock::load(
                &p.pp("resnets").pp(i),
                in_ch + skip_ch,
                l.out_ch,
                Some(common.temb),
                common.groups,
                common.eps,
            )?);
            if let Some(a) = &l.attention {
                attentions.push(transformer(&p.pp("attentions").pp(i), l.out_ch, a, common)?);
            }
        }
        let upsampler = if l.resample { Some(Upsample::load(&p.pp("upsamplers").pp(0), l.out_ch)?) } else { None };
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| crate::error::Error::invalid("UNet: ran out of skip connections"))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, ctx)?;
            }
        }
        if let Some(u) = &self.upsampler {
            let size = match skips.last() {
                Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                None => None,
            };
            h = u.forward(&h, size)?;
        }
        Ok(h)
    }
}
