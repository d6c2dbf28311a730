//! The spatial transformer of SD UNets: `Transformer2DModel` with its `BasicTransformerBlock`s.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::nn::{Conv2d, ConvExtras, GroupNorm, LayerNorm, Linear, attention_heads};
use crate::model::params::Params;

/// Multi-head attention with diffusers' key names (`to_q`, `to_k`, `to_v`, `to_out.0`).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn load(p: &Params, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::load(&p.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&p.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&p.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&p.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x [B, N, C]` attends to `context [B, M, Cc]` (itself when `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_impl(x, context, None)
    }

    /// `forward(x, context) + residual`, the sum folded into the output projection.
    pub fn forward_residual(&self, x: &Tensor, context: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, context, Some(residual))
    }

    fn forward_impl(&self, x: &Tensor, context: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let o = attention_heads(&q, &k, &v, self.heads)?;
        match residual {
            Some(r) => self.to_out.forward_residual(&o, r),
            None => self.to_out.forward(&o),
        }
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`) with exact (erf) GELU, as diffusers.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(p: &Params, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::load(&p.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&p.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// `ff(x) + residual`.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_residual(&self.proj.forward_geglu(x)?, residual)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn load(p: &Params, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::load(&p.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&p.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&p.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&p.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&p.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&p.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_residual(&self.norm1.forward(x)?, None, x)?;
        let x = self.attn2.forward_residual(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward(&self.norm3.forward(&x)?, &x)
    }
}

/// Either projection flavour: 1×1 convolutions (SD 1.x) or linear layers (SD 2.x, SDXL).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`: norm, project in, transformer blocks, project out, residual.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl SpatialTransformer {
    pub fn load(p: &Params, c: &SpatialTransformerConfig) -> Result<Self> {
        let ch = c.channels;
        let head_dim = ch / c.heads;
        let inner = c.heads * head_dim;
        let proj = |name: &str, i: usize, o: usize| -> Result<Projection> {
            Ok(if c.linear_projection {
                Projection::Linear(Linear::load(&p.pp(name), i, o, true)?)
            } else {
                Projection::Conv(Conv2d::load(&p.pp(name), i, o, 1, 1, 0, true)?)
            })
        };
        Ok(SpatialTransformer {
            norm: GroupNorm::load(&p.pp("norm"), c.groups, ch, 1e-6)?,
            proj_in: proj("proj_in", ch, inner)?,
            blocks: (0..c.depth)
                .map(|i| TransformerBlock::load(&p.pp("transformer_blocks").pp(i), inner, c.heads, head_dim, c.context_dim))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out", inner, ch)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let y = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.reshape((b, ch, h * w))?.transpose(1, 2)?.contiguous()?)
        };
        // Convolution projections read and write tokens directly, and proj_out adds the residual.
        let mut y = match &self.proj_in {
            Projection::Conv(conv) => conv.forward_with(&y, ConvExtras { tokens_out: true, ..Default::default() })?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&y)?)?,
        };
        for block in &self.blocks {
            y = block.forward(&y, context)?;
        }
        match &self.proj_out {
            Projection::Conv(conv) => {
                conv.forward_with(&y, ConvExtras { tokens_in: Some((h, w)), residual: Some(residual), ..Default::default() })
            }
            Projection::Linear(lin) => {
                let y = lin.forward(&y)?.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
                Ok((y + residual)?)
            }
        }
    }
}
