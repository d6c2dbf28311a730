//! The spatial transformer of SD UNets: `Transformer2DModel` with its `BasicTransformerBlock`s.

use std::sync::Mutex;

use candle_core::{Tensor, TensorId};

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
    /// The keys and values of the last [`CONTEXTS_KEPT`] cross-attention contexts: a generation
    /// passes the same text context at every step, so its projections are made once per
    /// generation (per row group).
    context_kv: Mutex<Vec<ContextKv>>,
}

/// Contexts whose keys and values each attention layer keeps: one per row group of
/// [`super::UNet::predict`], which run at once with their own slices of the context.
const CONTEXTS_KEPT: usize = 2;

/// Keys and values of one context, with the ids of the context and the weights they came from
/// (candle never reuses a tensor id, and a LoRA merge makes a new weight tensor).
struct ContextKv {
    ids: (TensorId, TensorId, TensorId),
    k: Tensor,
    v: Tensor,
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
            context_kv: Mutex::new(Vec::new()),
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
        let q = self.to_q.forward(x)?;
        let (k, v) = match context {
            Some(ctx) => self.context_keys_and_values(ctx)?,
            None => (self.to_k.forward(x)?, self.to_v.forward(x)?),
        };
        let o = attention_heads(&q, &k, &v, self.heads)?;
        match residual {
            Some(r) => self.to_out.forward_residual(&o, r),
            None => self.to_out.forward(&o),
        }
    }
}

impl Attention {
    /// `to_k(ctx)` and `to_v(ctx)`, from the cache when they were made from this very context and
    /// these weights, and nothing needs a gradient (training always recomputes).
    fn context_keys_and_values(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = match (self.to_k.frozen_weight_id(), self.to_v.frozen_weight_id()) {
            (Some(k), Some(v)) if !ctx.track_op() => Some((ctx.id(), k, v)),
            _ => None,
        };
        let Some(ids) = ids else {
            self.context_kv.lock().expect("attention cache lock poisoned").clear();
            return Ok((self.to_k.forward(ctx)?, self.to_v.forward(ctx)?));
        };
        if let Some(c) = self.context_kv.lock().expect("attention cache lock poisoned").iter().find(|c| c.ids == ids) {
            return Ok((c.k.clone(), c.v.clone()));
        }
        // Computed without the lock held: the other row group's layer may be here too.
        let (k, v) = (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
        let mut cache = self.context_kv.lock().expect("attention cache lock poisoned");
        if cache.len() == CONTEXTS_KEPT {
            cache.remove(0);
        }
        cache.push(ContextKv { ids, k: k.clone(), v: v.clone() });
        Ok((k, v))
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::model::adapters::MergedDelta;
    use crate::model::params::WeightStore;

    use crate::model::noise::seeded_randn as randn;

    fn same(a: &Tensor, b: &Tensor) -> bool {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() == 0.0
    }

    #[test]
    fn context_projections_are_reused_only_for_the_same_context_and_weights() {
        let store = WeightStore::random(3, DType::F32, &Device::Cpu);
        let targets = Default::default();
        let attn = Attention::load(&Params::root(&store, &targets).pp("attn"), 8, 6, 2, 4).unwrap();
        let (x, ctx) = (randn(&[2, 5, 8], 1), randn(&[2, 7, 6], 2));
        let first = attn.forward(&x, Some(&ctx)).unwrap();
        assert_eq!(attn.context_kv.lock().unwrap().len(), 1, "an untracked context is kept");
        assert!(same(&first, &attn.forward(&x, Some(&ctx)).unwrap()));
        // A new context tensor (even with equal values) is a new computation.
        let other = randn(&[2, 7, 6], 4);
        let with_other = attn.forward(&x, Some(&other)).unwrap();
        assert!(!same(&first, &with_other));
        // Two contexts are kept (one per row group), the oldest goes when a third comes.
        let kept = |attn: &Attention| attn.context_kv.lock().unwrap().iter().map(|c| c.ids.0).collect::<Vec<_>>();
        assert_eq!(kept(&attn), [ctx.id(), other.id()]);
        let third = randn(&[2, 7, 6], 7);
        attn.forward(&x, Some(&third)).unwrap();
        assert_eq!(kept(&attn), [other.id(), third.id()]);
        // A LoRA merged into to_k makes a new weight: the cached keys are not used.
        attn.forward(&x, Some(&ctx)).unwrap();
        let delta = MergedDelta::low_rank(randn(&[2, 6], 5), randn(&[8, 2], 6), 1.0);
        attn.to_k.layer().set_merged(vec![delta]).unwrap();
        let merged = attn.forward(&x, Some(&ctx)).unwrap();
        assert!(!same(&first, &merged));
        assert!(same(&merged, &attn.forward(&x, Some(&ctx.copy().unwrap())).unwrap()), "merged result equals a fresh computation");
        // A context that needs a gradient is never kept.
        let tracked = Var::from_tensor(&ctx).unwrap();
        attn.forward(&x, Some(tracked.as_tensor())).unwrap();
        assert!(attn.context_kv.lock().unwrap().is_empty());
    }
}
