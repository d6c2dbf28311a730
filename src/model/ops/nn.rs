//! Layers shared by every model component, written so that gradients flow through all of them.
//!
//! candle-nn's fused `softmax_last_dim` and `layer_norm` have no backward pass: a LoRA on `to_q`
//! or `to_k` would silently get no gradient through them. Here f32 on the CPU takes this
//! project's fused kernels ([`crate::model::fused`]), which carry their own backward pass to the
//! input; other devices and dtypes take the composite, differentiable form; a weight that itself
//! needs a gradient always does. Batched matmuls always get a contiguous left operand (candle issue #3744: on the
//! CPU a transposed left view gives wrong results after the first batch item).

use std::sync::{Arc, Mutex};

use candle_core::DType;
use candle_core::{D, Module, Tensor};

use crate::error::Result;
use crate::model::adapters::{AdaptableLayer, LayerKind};
pub use crate::model::conv::ConvExtras;
use crate::model::conv::FrozenKernel;
use crate::model::params::{Init, Params};

/// `a @ b` with `a` made contiguous first (see the module docs).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = if a.is_contiguous() { a.clone() } else { a.contiguous()? };
    if let Some(dtype) = crate::model::ops::emulated_on_cpu(&a) {
        // candle's CPU backend has no bf16 matmul: bf16 operands, f32 accumulation, a bf16
        // result, as GPU tensor cores do.
        return Ok(a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.to_dtype(dtype)?);
    }
    Ok(a.matmul(b)?)
}

/// A linear layer whose weight can carry LoRA patches.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight and bias, each with the merged adapters' deltas.
    layer: Arc<AdaptableLayer>,
}

impl Linear {
    pub fn load(p: &Params, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = p.get("weight", &[out_features, in_features], Init::FanIn(in_features))?;
        let bias = if bias { Some(p.get("bias", &[out_features], Init::Zeros)?) } else { None };
        let layer = AdaptableLayer::new(
            p.prefix().to_string(),
            LayerKind::Linear { in_features, out_features },
            weight,
            bias,
        );
        p.register(layer.clone());
        Ok(Linear { layer })
    }

    pub fn layer(&self) -> &Arc<AdaptableLayer> {
        &self.layer
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, false)
    }

    /// The id of the weight this layer computes with, when that is all it computes with: no
    /// trainable adapter runs beside it and nothing about it needs a gradient. Equal ids mean
    /// equal outputs for the same input.
    pub fn frozen_weight_id(&self) -> Option<candle_core::TensorId> {
        let w = self.layer.effective_weight();
        let frozen = !w.track_op() && self.layer.effective_bias().as_ref().is_none_or(|b| !b.track_op());
        (frozen && self.layer.live_adapters().is_empty()).then(|| w.id())
    }

    /// `forward(x) + residual`; one pass over the output on the CPU without gradients.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, Some(residual), false)
    }

    /// GEGLU of the output: its first half times the exact GELU of its second half.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, true)
    }

    fn forward_fused(&self, x: &Tensor, residual: Option<&Tensor>, geglu: bool) -> Result<Tensor> {
        let w = self.layer.effective_weight();
        let bias = self.layer.effective_bias();
        let live = self.layer.live_adapters();
        let frozen = |t: &Tensor| !t.track_op() && fused_cpu(t);
        let frozen_base = fused_cpu(x) && frozen(&w) && w.is_contiguous() && bias.as_ref().is_none_or(frozen);
        if frozen_base && live.is_empty() && !x.track_op() && residual.is_none_or(frozen) {
            // Inference: one pass over the gemm's output for bias, GEGLU or residual.
            let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
            let residual = match residual {
                Some(r) if !r.is_contiguous() => Some(r.contiguous()?),
                r => r.cloned(),
            };
            let op = crate::model::fused::LinearCpu { weight: w, bias, residual, geglu };
            return Ok(x.apply_op1_no_bwd(&op)?);
        }
        let dims = x.dims().to_vec();
        let in_f = *dims.last().expect("linear input has at least one dim");
        let rows = x.elem_count() / in_f;
        let x2 = x.reshape((rows, in_f))?;
        let mut y = if frozen_base {
            // Training: the frozen base product differentiates only to its input.
            let x2 = if x2.is_contiguous() { x2.clone() } else { x2.contiguous()? };
            x2.apply_op1(crate::model::fused::LinearCpu { weight: w.clone(), bias, residual: None, geglu: false })?
        } else {
            let y = matmul(&x2, &w.t()?)?;
            match &bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        for a in live {
            let h = matmul(&x2, &a.down.as_tensor().t()?)?;
            let d = matmul(&h, &a.up.as_tensor().t()?)?;
            y = (y + (d * a.scale)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = w.dim(0)?;
        let y = y.reshape(out_dims)?;
        if geglu {
            return self::geglu(&y);
        }
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }
}

/// A 2-D convolution (square kernel, symmetric padding) whose weight can carry LoRA patches.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// The weight and bias, each with the merged adapters' deltas.
    layer: Arc<AdaptableLayer>,
    pub stride: usize,
    pub padding: usize,
    /// The effective weight with its fast CPU kernel layouts, replaced when the weight is (a
    /// new LoRA merge makes a new weight tensor).
    frozen: Arc<Mutex<Option<FrozenKernel>>>,
}

impl Conv2d {
    pub fn load(
        p: &Params,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel * kernel;
        let weight = p.get("weight", &[out_channels, in_channels, kernel, kernel], Init::FanIn(fan_in))?;
        let bias = if bias { Some(p.get("bias", &[out_channels], Init::Zeros)?) } else { None };
        let layer = AdaptableLayer::new(
            p.prefix().to_string(),
            LayerKind::Conv2d { in_channels, out_channels, kernel },
            weight,
            bias,
        );
        p.register(layer.clone());
        Ok(Conv2d { layer, stride, padding, frozen: Default::default() })
    }

    pub fn layer(&self) -> &Arc<AdaptableLayer> {
        &self.layer
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, ConvExtras::default())
    }

    /// Nearest-neighbour upsampling of `x` to `size`, then this convolution. Without gradients
    /// on the CPU the upsampled input is never materialised.
    pub fn forward_upsampled(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.forward_with(x, ConvExtras { upsample: Some(size), ..Default::default() })
    }

    /// This convolution with the [`ConvExtras`] folded into its output pass when no gradient is
    /// needed on the CPU, and applied as separate (differentiable) ops otherwise.
    pub fn forward_with(&self, x: &Tensor, extras: ConvExtras<'_>) -> Result<Tensor> {
        let w = self.layer.effective_weight();
        let bias = self.layer.effective_bias();
        let live = self.layer.live_adapters();
        if live.is_empty() && !x.track_op() && fused_cpu(x) {
            let y = crate::model::conv::conv2d_inference(x, &self.frozen_kernel(&w), bias.as_ref(), self.padding, self.stride, extras)?;
            if let Some(y) = y {
                return Ok(y);
            }
        }
        let mut x = x.clone();
        if let Some((h, wd)) = extras.tokens_in {
            let (b, _, c) = x.dims3()?;
            x = x.transpose(1, 2)?.contiguous()?.reshape((b, c, h, wd))?;
        }
        if let Some((h, wd)) = extras.upsample {
            x = x.upsample_nearest2d(h, wd)?;
        }
        // Training: a frozen kernel differentiates to its input only, with the bias and an
        // untracked time embedding folded into its output pass.
        let channel_add = extras.channel_add.filter(|t| !t.track_op());
        let (mut y, add_done) = match crate::model::conv::conv2d_frozen(&x, &self.frozen_kernel(&w), bias.as_ref(), channel_add, self.padding, self.stride)? {
            Some(y) => (y, channel_add.is_some()),
            None => {
                let mut y = conv2d(&x, &w, self.padding, self.stride)?;
                if let Some(b) = &bias {
                    y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
                }
                (y, false)
            }
        };
        for a in live {
            let h = conv2d(&x, a.down.as_tensor(), self.padding, self.stride)?;
            let d = conv2d(&h, a.up.as_tensor(), 0, 1)?;
            y = (y + (d * a.scale)?)?;
        }
        if let Some(t) = extras.channel_add.filter(|_| !add_done) {
            y = y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        if let Some(r) = extras.residual {
            y = (y + r)?;
        }
        if extras.tokens_out {
            let (b, o, h, wd) = y.dims4()?;
            y = y.reshape((b, o, h * wd))?.transpose(1, 2)?.contiguous()?;
        }
        Ok(y)
    }

    /// `w` (the current effective weight) with the layouts made for it so far.
    fn frozen_kernel(&self, w: &Tensor) -> FrozenKernel {
        let mut cache = self.frozen.lock().expect("conv cache lock poisoned");
        match cache.as_ref() {
            Some(k) if k.weight().id() == w.id() => k.clone(),
            _ => {
                let k = FrozenKernel::new(w);
                *cache = Some(k.clone());
                k
            }
        }
    }
}

/// Convolution entry point, one place to swap kernels.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    crate::model::conv::conv2d(x, w, padding, stride)
}

/// Group normalisation over `[B, C, ...]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(p: &Params, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: p.get("weight", &[channels], Init::Ones)?,
            bias: p.get("bias", &[channels], Init::Zeros)?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// Group norm followed by SiLU (the resnet pattern), fused on the CPU when no gradient is
    /// needed: one pass for the statistics, one for the output, instead of about ten.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if fused_cpu(x) && !self.weight.track_op() && !self.bias.track_op() {
            // With its backward pass to `x` when `x` tracks a gradient (training).
            let op = crate::model::fused::GroupNormCpu {
                weight: self.weight.clone(),
                bias: self.bias.clone(),
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
            return Ok(x.apply_op1(op)?);
        }
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        // Statistics over thousands of values lose everything in half precision (an f16 sum
        // stops growing past 2048 by small steps): compute them in f32, as GPU kernels do.
        let half = x.dtype() != DType::F32 && x.dtype() != DType::F64;
        let xs = if half { x.to_dtype(DType::F32)? } else { x.clone() };
        let xg = xs.reshape((b, self.groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centered = xg.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(dims.as_slice())?;
        let normed = if half { normed.to_dtype(x.dtype())? } else { normed };
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let y = normed.broadcast_mul(&self.weight.reshape(shape.as_slice())?)?.broadcast_add(&self.bias.reshape(shape.as_slice())?)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(p: &Params, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: p.get("weight", &[dim], Init::Ones)?,
            bias: p.get("bias", &[dim], Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() {
            let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
            return Ok(candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)?);
        }
        if fused_cpu(x) && !self.weight.track_op() && !self.bias.track_op() {
            let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
            let op = crate::model::fused::LayerNormCpu { weight: self.weight.clone(), bias: self.bias.clone(), eps: self.eps };
            return Ok(x.apply_op1(op)?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension; fused when no gradient is needed.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    softmax_last_scaled(x, 1.0)
}

/// `softmax(x · scale)` over the last dimension. The fused CPU kernel applies the scale inside
/// its exp, saving a pass over `x`.
pub fn softmax_last_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_cpu(x) {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        return Ok(x.apply_op1(crate::model::fused::SoftmaxCpu { scale: scale as f32 })?);
    }
    let x = if scale == 1.0 { x.clone() } else { (x * scale)? };
    if !x.track_op() && x.dtype() != DType::F32 && x.dtype() != DType::F64 {
        // Half precision: exponentials and their sum in f32 (diffusers' upcast softmax).
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        return Ok(candle_nn::ops::softmax_last_dim(&x)?.to_dtype(dtype)?);
    }
    if !x.track_op() {
        let x = if x.is_contiguous() { x } else { x.contiguous()? };
        return Ok(candle_nn::ops::softmax_last_dim(&x)?);
    }
    Ok(candle_nn::ops::softmax(&x, D::Minus1)?)
}

/// Whether `x` can go to the fused CPU kernels of [`crate::model::fused`]: f32 on the CPU, unless
/// the generic path is forced ([`crate::model::ops::generic_ops`]).
pub fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !crate::model::ops::generic_ops()
}

/// GEGLU over the last dimension: the first half times the exact GELU of the second half.
/// The fused kernel (with its backward pass) for f32 on the CPU.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if fused_cpu(h) {
        let h = if h.is_contiguous() { h.clone() } else { h.contiguous()? };
        return Ok(h.apply_op1(crate::model::fused::GegluCpu)?);
    }
    geglu_composite(h)
}

fn geglu_composite(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    let hidden = h.narrow(D::Minus1, 0, half)?;
    let gate = h.narrow(D::Minus1, half, half)?;
    Ok((hidden * gelu_erf(&gate)?)?)
}

/// Exact (erf) GELU. When a gradient is tracked it is spelled out from `erf`, whose backward
/// is exact: candle's own `GeluErf` backward rounds 1/√(2π) to 0.398942, a 1e-6 relative error
/// that the finite-difference proof of the trainer's gradients sees.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(x.gelu_erf()?);
    }
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? * 0.5)? + 0.5;
    Ok((x * cdf?)?)
}

/// The activations found in SD configs (`act_fn`, `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, as PyTorch's default `F.gelu`.
    Gelu,
    /// tanh-approximated GELU (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's.
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            Activation::Gelu => gelu_erf(x)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

/// Scaled dot-product attention over `[B, heads, N, d]` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // Without a mask (which must stay unscaled) the scale goes into the fused softmax instead
    // of a pass over q.
    let fold = mask.is_none() && fused_cpu(q);
    let q = if fold { q.clone() } else { (q * scale)? };
    let mut scores = matmul(&q, &k.transpose(D::Minus2, D::Minus1)?)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    if !scores.track_op() && fused_cpu(&scores) && scores.is_contiguous() {
        // `scores` is a fresh tensor nothing else holds: normalise it in place.
        scores.inplace_op1(&crate::model::fused::SoftmaxCpu { scale: if fold { scale as f32 } else { 1.0 } })?;
        return matmul(&scores, v);
    }
    let probs = softmax_last_scaled(&scores, if fold { scale } else { 1.0 })?;
    matmul(&probs, v)
}

/// Multi-head attention without a mask on tokens: `q [B, N, H·d]` attends to `k`, `v`
/// `[B, M, H·d]`; returns `[B, N, H·d]`. For f32 on the CPU one fused kernel reads the heads
/// in place (its backward pass recomputes the probabilities); otherwise heads are split,
/// [`attention`] runs, and they are merged.
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    if fused_cpu(q) && fused_cpu(k) && fused_cpu(v) && m > 0 {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(if t.is_contiguous() { t.clone() } else { t.contiguous()? }) };
        let op = crate::model::fused::AttentionCpu { heads, scale: (1.0 / (d as f64).sqrt()) as f32 };
        return Ok(c(q)?.apply_op3(&c(k)?, &c(v)?, op)?);
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> { Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let o = attention(&split(q, n)?, &split(k, m)?, &split(v, m)?, None)?;
    Ok(o.transpose(1, 2)?.reshape((b, n, inner))?)
}

/// Runs `f` on a rayon worker thread. gemm and the fused kernels split their work with rayon:
/// from a worker each split starts at once, from any other thread it is a hand-off (wake a
/// worker, sleep, be woken), and a UNet call makes dozens of them.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}

/// An `nn.Embedding` table.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn load(p: &Params, count: usize, dim: usize) -> Result<Self> {
        Ok(Embedding { table: p.get("weight", &[count, dim], Init::Normal(0.02))? })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::Embedding::new(self.table.clone(), self.table.dim(1)?).forward(ids)?)
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }
}
