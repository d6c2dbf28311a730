//! The 2-D convolution used by every model component.
//!
//! On the CPU, candle 0.11's tiled convolution is several times slower than one im2col plus one
//! large matrix product, and its backward pass always computes the kernel's gradient too, even
//! when the kernel is a frozen base weight (a LoRA run never needs that). So for frozen kernels
//! on the CPU this module runs its own op: im2col + gemm forward, and a backward that computes
//! only the input's gradient (gemm + col2im). Trainable kernels (LoCon adapters) and GPUs use
//! candle's convolution, which differentiates both arguments.
//!
//! The forward pass is pixel-major: patches `[pixels, k·k·C]` (read from a channels-last copy
//! of the input) times the kernel as `[k·k·C, O]`. gemm runs that shape (many rows, few
//! columns) at 1.5-2× the speed of `[O, K] @ [K, pixels]`, and the channels-last patches are
//! plain copies of `C` floats. Pixels go in tiles that keep the patches in cache; each tile's
//! result is transposed back to `[B, O, H, W]` with the bias added on the way.
//!
//! 3×3 stride-1 kernels with enough channels take [`winograd`] F(4×4, 3×3) instead of im2col:
//! 4× fewer multiplications, the same pixel-major output.

mod winograd;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::gemm::{MatRef, matmul_add_into, matmul_add_into_parallel, matmul_into_parallel};
use winograd::{Tiling, WinogradKernel};

/// A convolution kernel that needs no gradient, with the pixel-major layout the CPU convolution
/// computes from (im2col, Winograd, the input gradient), made on first use and kept with the
/// kernel (a model keeps one per layer, so it is made once per weight).
#[derive(Clone, Debug)]
pub struct FrozenKernel {
    weight: Tensor,
    pixel_major: Arc<Mutex<Option<Tensor>>>,
}

impl FrozenKernel {
    pub fn new(weight: &Tensor) -> Self {
        FrozenKernel { weight: weight.clone(), pixel_major: Default::default() }
    }

    /// The `[O, C, k, k]` kernel itself.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[k·k·C, O]`, for im2col and for the input gradient.
    fn pixel_major(&self) -> Result<Tensor> {
        let mut slot = self.pixel_major.lock().expect("conv kernel lock poisoned");
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = pixel_major_kernel(&self.weight)?;
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// Whether a convolution takes Winograd: 3×3, stride 1, enough channels on both sides that its
/// 36 products are real matrix products (a 4-channel latent or a 3-channel image output stays
/// with im2col, whose single product is wider), and enough 4×4 tiles over the batch (`tiles`)
/// to pay for remaking the transformed kernel per call (see [`WinogradKernel`]). A transformed
/// position that fits in cache (`C·O` ≤ 64 Ki floats) pays off from 8 tiles (measured on
/// tiny-sd's UNet: its 4×4 level at batch 8 is faster with Winograd, at 2 tiles not); a larger
/// one streams through memory for each of its 36 positions, so SD's 1280-channel layers at
/// 16×16 and 8×8 latents (32 and 8 tiles) take im2col (one guided SD 1.5 step at 512²: 11.0 s
/// with them on Winograd, PyTorch 9.7 s).
fn takes_winograd(k: usize, stride: usize, c: usize, o: usize, tiles: usize) -> bool {
    let min_tiles = if c * o <= WINOGRAD_CACHED_POSITION { WINOGRAD_MIN_TILES } else { WINOGRAD_MIN_TILES_STREAMED };
    k == 3 && stride == 1 && c >= 16 && o >= 16 && tiles >= min_tiles
}

/// A convolution as [`record_paths`] saw it: its rows (images in the call), channels, kernel
/// size, output size, and whether it took Winograd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConvPath {
    pub rows: usize,
    pub c: usize,
    pub o: usize,
    pub k: usize,
    pub ho: usize,
    pub wo: usize,
    pub winograd: bool,
}

/// Whether a [`record_paths`] is running (one at a time, `RECORDER`); what it saw so far.
static RECORDING: AtomicBool = AtomicBool::new(false);
static RECORDED: Mutex<BTreeSet<ConvPath>> = Mutex::new(BTreeSet::new());
static RECORDER: Mutex<()> = Mutex::new(());

/// Runs `f` and returns, with its result, every CPU convolution the process ran meanwhile (any
/// thread) and the path each took: for tests that must show that a batch size crosses the
/// switch between Winograd and im2col ([`takes_winograd`]), which depends on the rows a call
/// gets after row groups split a batch. The decision is a function of the listed fields, so
/// convolutions of other threads add true facts, never wrong ones. Costs one relaxed load per
/// convolution when nothing records.
pub fn record_paths<R>(f: impl FnOnce() -> R) -> (R, BTreeSet<ConvPath>) {
    let _one = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    RECORDED.lock().unwrap_or_else(|e| e.into_inner()).clear();
    RECORDING.store(true, Ordering::Relaxed);
    let out = f();
    RECORDING.store(false, Ordering::Relaxed);
    (out, std::mem::take(&mut *RECORDED.lock().unwrap_or_else(|e| e.into_inner())))
}

fn record(path: ConvPath) {
    if RECORDING.load(Ordering::Relaxed) {
        RECORDED.lock().unwrap_or_else(|e| e.into_inner()).insert(path);
    }
}

/// See [`takes_winograd`].
const WINOGRAD_MIN_TILES: usize = 8;
const WINOGRAD_MIN_TILES_STREAMED: usize = 64;
const WINOGRAD_CACHED_POSITION: usize = 64 * 1024;

/// `x [B, C, H, W]` convolved with `w [O, C, k, k]`, symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if let Some(op) = FrozenConv::new(x, x.dim(1)?, &FrozenKernel::new(w), None, padding, stride)? {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        // Records the op for backprop only when `x` needs a gradient.
        return Ok(x.apply_op1(op)?);
    }
    if let Some(dtype) = crate::model::ops::emulated_on_cpu(x) {
        // No bf16 convolution on candle's CPU backend: bf16 operands, f32 accumulation.
        return Ok(x.to_dtype(DType::F32)?.conv2d(&w.to_dtype(DType::F32)?, padding, stride, 1, 1)?.to_dtype(dtype)?);
    }
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

/// `x` convolved with a frozen kernel `w` plus `bias` and the `[B, O]` per-channel term
/// `channel_add` (both must need no gradient), differentiable to `x` only: the training path.
/// `None` when the fast CPU kernel does not apply; the caller then takes [`conv2d`] and adds
/// the terms itself.
pub fn conv2d_frozen(
    x: &Tensor,
    kernel: &FrozenKernel,
    bias: Option<&Tensor>,
    channel_add: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let tracked = |t: Option<&Tensor>| t.is_some_and(|t| t.track_op() || !crate::model::nn::fused_cpu(t));
    if tracked(bias) || tracked(channel_add) {
        return Ok(None);
    }
    let Some(mut op) = FrozenConv::new(x, x.dim(1)?, kernel, bias, padding, stride)? else { return Ok(None) };
    op.channel_add = match channel_add {
        Some(t) if !t.is_contiguous() => Some(t.contiguous()?),
        t => t.cloned(),
    };
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    Ok(Some(x.apply_op1(op)?))
}

/// The kernel `w [O, C, k, k]` as the `[k·k·C, O]` matrix of the pixel-major forward pass.
fn pixel_major_kernel(w: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    if !(w.device().is_cpu() && w.dtype() == DType::F32) {
        return Ok(w.permute((2, 3, 1, 0))?.contiguous()?.reshape((kh * kw * c, o))?);
    }
    // A direct loop: candle's generic strided copy took ~15 ms for the tiny UNet's kernels.
    let src = w.flatten_all()?.to_vec1::<f32>()?;
    let kk = kh * kw;
    let mut dst = vec![0f32; src.len()];
    for (oi, filter) in src.chunks_exact(c * kk).enumerate() {
        for (ci, taps) in filter.chunks_exact(kk).enumerate() {
            for (tap, &v) in taps.iter().enumerate() {
                dst[(tap * c + ci) * o + oi] = v;
            }
        }
    }
    Ok(Tensor::from_vec(dst, (kk * c, o), w.device())?)
}

/// What an inference-only convolution folds into its output pass, besides the bias.
#[derive(Default, Clone, Copy)]
pub struct ConvExtras<'a> {
    /// Nearest-neighbour upsampling of the input to this size first.
    pub upsample: Option<(usize, usize)>,
    /// `[B, O]`, added to every pixel of channel `o` of image `b` (a time embedding).
    pub channel_add: Option<&'a Tensor>,
    /// `[B, O, Ho, Wo]`, added to the output (a residual connection).
    pub residual: Option<&'a Tensor>,
    /// The input is tokens `[B, H·W, C]` of an `H × W` image instead of `[B, C, H, W]`.
    pub tokens_in: Option<(usize, usize)>,
    /// Return tokens `[B, Ho·Wo, O]` instead of `[B, O, Ho, Wo]` (not with `residual`).
    pub tokens_out: bool,
}

/// Inference-only convolution (nothing may need a gradient): `x` convolved with `kernel`, plus
/// `bias` and the `extras`. `None` when the fused CPU kernel does not apply (something tracks a gradient, other device
/// or dtype); the caller then takes the composite path.
pub fn conv2d_inference(
    x: &Tensor,
    kernel: &FrozenKernel,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    extras: ConvExtras<'_>,
) -> Result<Option<Tensor>> {
    let tracked = |t: Option<&Tensor>| t.is_some_and(|t| t.track_op() || !crate::model::nn::fused_cpu(t));
    if x.track_op() || kernel.weight.track_op() || tracked(bias) || tracked(extras.channel_add) || tracked(extras.residual) {
        return Ok(None);
    }
    if extras.tokens_out && extras.residual.is_some() {
        return Ok(None);
    }
    let x_nchw_c = if extras.tokens_in.is_some() { x.dim(2)? } else { x.dim(1)? };
    let Some(mut op) = FrozenConv::new(x, x_nchw_c, kernel, bias, padding, stride)? else { return Ok(None) };
    let contiguous = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
        Ok(match t {
            Some(t) if t.is_contiguous() => Some(t.clone()),
            Some(t) => Some(t.contiguous()?),
            None => None,
        })
    };
    op.upsample = extras.upsample;
    op.channel_add = contiguous(extras.channel_add)?;
    op.residual = contiguous(extras.residual)?;
    op.tokens_in = extras.tokens_in;
    op.tokens_out = extras.tokens_out;
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    Ok(Some(x.apply_op1_no_bwd(&op)?))
}

/// Convolution with a frozen kernel, as a custom op on its input.
#[derive(Clone)]
struct FrozenConv {
    kernel: FrozenKernel,
    bias: Option<Tensor>,
    /// Inference only: see [`ConvExtras`].
    upsample: Option<(usize, usize)>,
    channel_add: Option<Tensor>,
    residual: Option<Tensor>,
    tokens_in: Option<(usize, usize)>,
    tokens_out: bool,
    o: usize,
    c: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Geometry {
    fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
}

/// Output pixels per gemm tile: at most about 1 MiB of patches (gemm runs near its best and
/// they stay in L2), in equal tiles.
fn tile_pixels(kc: usize, pixels: usize) -> usize {
    let max = ((1 << 18) / kc.max(1)).clamp(64, 4096);
    pixels.div_ceil(pixels.div_ceil(max).max(1)).max(1)
}

impl FrozenConv {
    /// `None` unless the fast CPU path applies: f32 on the CPU with a kernel that needs no
    /// gradient.
    fn new(x: &Tensor, x_channels: usize, kernel: &FrozenKernel, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Option<Self>> {
        let w = &kernel.weight;
        if !(crate::model::nn::fused_cpu(x) && w.dtype() == DType::F32 && !w.track_op()) {
            return Ok(None);
        }
        let (o, c, kh, kw) = w.dims4()?;
        if kh != kw || x_channels != c {
            return Ok(None);
        }
        Ok(Some(FrozenConv {
            kernel: kernel.clone(),
            bias: bias.cloned(),
            upsample: None,
            channel_add: None,
            residual: None,
            tokens_in: None,
            tokens_out: false,
            o,
            c,
            k: kh,
            stride,
            padding,
        }))
    }

    /// The geometry for an input of `dims`, and the input's own (pre-upsampling) size.
    fn geometry(&self, dims: &[usize]) -> candle_core::Result<(Geometry, (usize, usize))> {
        let (b, c, h, w) = match (self.tokens_in, dims) {
            (Some((h, w)), &[b, n, c]) if n == h * w => (b, c, h, w),
            (None, &[b, c, h, w]) => (b, c, h, w),
            _ => candle_core::bail!("conv2d: input must be [B, C, H, W] (or tokens [B, H·W, C]), got {dims:?}"),
        };
        let (hu, wu) = self.upsample.unwrap_or((h, w));
        let (k, s, p) = (self.k, self.stride, self.padding);
        if hu + 2 * p < k || wu + 2 * p < k {
            candle_core::bail!("conv2d: input {hu}x{wu} is smaller than the {k}x{k} kernel");
        }
        let g = Geometry { b, c, h: hu, w: wu, ho: (hu + 2 * p - k) / s + 1, wo: (wu + 2 * p - k) / s + 1, k, s, p };
        Ok((g, (h, w)))
    }

    /// Per-image, per-channel additive term: bias plus `channel_add`, `[B · O]`.
    fn channel_terms(&self, b: usize) -> candle_core::Result<Vec<f32>> {
        let bias = match &self.bias {
            Some(t) => t.to_vec1::<f32>()?,
            None => vec![0f32; self.o],
        };
        let add = match &self.channel_add {
            Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0f32; b * self.o],
        };
        if add.len() != b * self.o {
            candle_core::bail!("conv2d: channel term of {} values for {b} images of {} channels", add.len(), self.o);
        }
        Ok(add.iter().enumerate().map(|(i, a)| bias[i % self.o] + a).collect())
    }

    /// `x` (`[B, C, h, w]` before any upsampling, or tokens) → `[B, O, Ho, Wo]` (or tokens).
    fn forward_vec(&self, x: &CpuStorage, x_layout: &Layout, in_hw: (usize, usize), g: &Geometry) -> candle_core::Result<Vec<f32>> {
        let kc = g.k * g.k * g.c;
        let (hw_out, pixels) = (g.ho * g.wo, g.b * g.ho * g.wo);
        let CpuStorage::F32(data) = x else { candle_core::bail!("frozen-conv2d: f32 only") };
        let Some((start, end)) = x_layout.contiguous_offsets() else { candle_core::bail!("frozen-conv2d: non-contiguous input") };
        let x_data = &data[start..end];
        let terms = self.channel_terms(g.b)?;
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual_guard {
            Some((store, layout)) => {
                let Storage::Cpu(CpuStorage::F32(r)) = &**store else { candle_core::bail!("conv2d: residual must be f32 on the CPU") };
                let Some((rs, re)) = layout.contiguous_offsets() else { candle_core::bail!("conv2d: non-contiguous residual") };
                if re - rs != g.b * self.o * hw_out {
                    candle_core::bail!("conv2d: residual {:?} does not match the output", layout.dims());
                }
                Some(&r[rs..re])
            }
            None => None,
        };
        let mut out = vec![0f32; g.b * self.o * hw_out];
        // Places the output pixels `p0..` (pixel-major rows `y [n, O]`) with every added term.
        let place = |out: &mut [f32], p0: usize, y: &mut [f32]| {
            if self.tokens_out {
                add_channel_terms_at(y, &terms, self.o, hw_out, p0);
                out[p0 * self.o..][..y.len()].copy_from_slice(y);
            } else {
                scatter_tile(y, &terms, residual, self.o, p0, hw_out, out);
            }
        };
        let layout_error = |e: crate::error::Error| candle_core::Error::Msg(format!("conv2d kernel layout: {e}"));
        let w_pm = self.kernel.pixel_major().map_err(layout_error)?;
        let (w_store, w_layout) = w_pm.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_store else { candle_core::bail!("frozen-conv2d: kernel not on the CPU") };
        let Some((w_start, w_end)) = w_layout.contiguous_offsets() else { candle_core::bail!("frozen-conv2d: non-contiguous kernel") };
        let CpuStorage::F32(w_data) = w_cpu else { candle_core::bail!("frozen-conv2d: f32 kernel expected") };
        let w_data = &w_data[w_start..w_end];
        let tiling = Tiling::new(g.b, g.ho, g.wo);
        let winograd = takes_winograd(g.k, g.s, g.c, self.o, tiling.tiles());
        record(ConvPath { rows: g.b, c: g.c, o: self.o, k: g.k, ho: g.ho, wo: g.wo, winograd });
        if winograd {
            let xp = channels_last(x_data, g, in_hw, self.tokens_in.is_some(), g.p, tiling.padded_size());
            winograd::convolve(&WinogradKernel::new(w_data, self.o, g.c), &xp, &tiling, |p0, y| place(&mut out, p0, y));
            return Ok(out);
        }
        if g.pointwise() && self.upsample.is_none() {
            self.pointwise_in_place(x_data, w_data, &terms, residual, g, &mut out);
            return Ok(out);
        }
        // Channels-last input: tokens already are; images are transposed (and upsampled).
        let owned;
        let xt_data = if self.tokens_in.is_some() && self.upsample.is_none() {
            x_data
        } else {
            owned = channels_last(x_data, g, in_hw, self.tokens_in.is_some(), 0, (g.h, g.w));
            &owned
        };
        let xt_data = &xt_data[..g.b * g.h * g.w * g.c];
        let tile = tile_pixels(kc, pixels);
        let kernel = MatRef { data: w_data, rows: kc, cols: self.o, row_stride: self.o, col_stride: 1 };
        // `n` patch rows starting at `patches[0]`, times the kernel, into `dst` (`n × O`): gemm
        // writes every element, so `dst` is a reused buffer, never zeroed per tile.
        let gemm = |dst: &mut [f32], patches: &[f32], n: usize| {
            let lhs = MatRef { data: patches, rows: n, cols: kc, row_stride: kc, col_stride: 1 };
            matmul_into_parallel(&mut dst[..n * self.o], self.o, lhs, kernel);
        };
        let mut cols = if g.pointwise() { Vec::new() } else { vec![0f32; tile.min(pixels) * kc] };
        let mut y = vec![0f32; tile.min(pixels) * self.o];
        for p0 in (0..pixels).step_by(tile) {
            let n = tile.min(pixels - p0);
            if g.pointwise() {
                // Patches are the channels-last input itself.
                gemm(&mut y, &xt_data[p0 * kc..], n);
            } else {
                im2col_channels_last(xt_data, g, p0, &mut cols[..n * kc]);
                gemm(&mut y, &cols, n);
            }
            place(&mut out, p0, &mut y[..n * self.o]);
        }
        Ok(out)
    }

    /// A 1×1 convolution (no upsampling) as one product per image straight between the
    /// input's and the output's own layouts, NCHW or tokens, read and written through strides:
    /// no channels-last copy and no transposing scatter. Each image's output starts as its
    /// added terms (bias, time embedding, residual) and gemm accumulates onto it.
    fn pointwise_in_place(&self, x: &[f32], w_pm: &[f32], terms: &[f32], residual: Option<&[f32]>, g: &Geometry, out: &mut [f32]) {
        let (c, o, hw) = (g.c, self.o, g.h * g.w);
        let tokens_in = self.tokens_in.is_some();
        // `w_pm` is the kernel as `[C, O]`.
        let image = |bi: usize, dst: &mut [f32], parallel: bool| {
            let (xb, add) = (&x[bi * c * hw..][..c * hw], &terms[bi * o..][..o]);
            let accumulate = if parallel { matmul_add_into_parallel } else { matmul_add_into };
            if self.tokens_out {
                // [HW, O] = x as [HW, C] · [C, O]
                for row in dst.chunks_exact_mut(o) {
                    row.copy_from_slice(add);
                }
                let lhs = if tokens_in { MatRef { data: xb, rows: hw, cols: c, row_stride: c, col_stride: 1 } } else { MatRef { data: xb, rows: hw, cols: c, row_stride: 1, col_stride: hw } };
                accumulate(dst, o, lhs, MatRef { data: w_pm, rows: c, cols: o, row_stride: o, col_stride: 1 });
            } else {
                // [O, HW] = [O, C] · x as [C, HW]
                for (oi, row) in dst.chunks_exact_mut(hw).enumerate() {
                    match residual {
                        Some(r) => {
                            for (d, &rv) in row.iter_mut().zip(&r[(bi * o + oi) * hw..][..hw]) {
                                *d = rv + add[oi];
                            }
                        }
                        None => row.fill(add[oi]),
                    }
                }
                let rhs = if tokens_in { MatRef { data: xb, rows: c, cols: hw, row_stride: 1, col_stride: c } } else { MatRef { data: xb, rows: c, cols: hw, row_stride: hw, col_stride: 1 } };
                accumulate(dst, hw, MatRef { data: w_pm, rows: o, cols: c, row_stride: 1, col_stride: o }, rhs);
            }
        };
        // Whole images per task when there are enough of them; else each product in parallel.
        if g.b >= 2 * rayon::current_num_threads() {
            out.par_chunks_mut(o * hw).enumerate().for_each(|(bi, dst)| image(bi, dst, false));
        } else {
            for (bi, dst) in out.chunks_mut(o * hw).enumerate() {
                image(bi, dst, true);
            }
        }
    }
}

/// Adds the per-image channel terms to pixel-major rows `y [n, O]` of the pixels `p0..`.
fn add_channel_terms_at(y: &mut [f32], terms: &[f32], o: usize, hw_out: usize, p0: usize) {
    let per_task = (16 * 1024 / o).max(1);
    y.par_chunks_mut(per_task * o).enumerate().for_each(|(t, chunk)| {
        for (i, row) in chunk.chunks_exact_mut(o).enumerate() {
            let b = (p0 + t * per_task + i) / hw_out;
            for (v, &a) in row.iter_mut().zip(&terms[b * o..(b + 1) * o]) {
                *v += a;
            }
        }
    });
}

/// `x [B, C, h, w]` (or tokens `[B, h·w, C]` when `tokens`) as channels-last `[B, Hp, Wp, C]`,
/// nearest-upsampled from `h × w` to the geometry's `H × W` (the same source indices as candle's
/// `upsample_nearest2d`) and placed `pad` rows and columns in from the top left of an
/// `Hp × Wp` frame of zeros.
fn channels_last(x: &[f32], g: &Geometry, (h, w): (usize, usize), tokens: bool, pad: usize, (hp, wp): (usize, usize)) -> Vec<f32> {
    let src_idx = |dst: usize, src: usize| -> Vec<usize> {
        let scale = src as f64 / dst as f64;
        (0..dst).map(|i| ((i as f64 * scale) as usize).min(src - 1)).collect()
    };
    let (sy, sx) = (src_idx(g.h, h), src_idx(g.w, w));
    let c = g.c;
    assert!(hp >= g.h + pad && wp >= g.w + pad, "channels_last: a {hp}x{wp} frame cannot hold {}x{} at {pad}", g.h, g.w);
    let mut out = vec![0f32; g.b * hp * wp * c];
    // One task per output row of one image; each writes `W·C` contiguous floats.
    out.par_chunks_mut(wp * c).enumerate().for_each(|(row, dst)| {
        let (b, y) = (row / hp, row % hp);
        if y < pad || y >= pad + g.h {
            return;
        }
        let (y, dst) = (y - pad, &mut dst[pad * c..(pad + g.w) * c]);
        let img = &x[b * c * h * w..][..c * h * w];
        if tokens {
            let src = &img[sy[y] * w * c..][..w * c];
            for (xo, &xi) in sx.iter().enumerate() {
                dst[xo * c..(xo + 1) * c].copy_from_slice(&src[xi * c..(xi + 1) * c]);
            }
            return;
        }
        // Eight channels at a time: eight reads, one contiguous 32-byte write per pixel.
        let src_row = sy[y] * w;
        let plane = |ch: usize| &img[ch * h * w + src_row..][..w];
        let mut ch = 0;
        while ch < c {
            let nb = (c - ch).min(8);
            let planes: [&[f32]; 8] = std::array::from_fn(|i| plane(ch + i.min(nb - 1)));
            if w == g.w {
                for (xo, d) in dst.chunks_exact_mut(c).enumerate() {
                    for (i, v) in d[ch..ch + nb].iter_mut().enumerate() {
                        *v = planes[i][xo];
                    }
                }
            } else {
                for (d, &xi) in dst.chunks_exact_mut(c).zip(&sx) {
                    for (i, v) in d[ch..ch + nb].iter_mut().enumerate() {
                        *v = planes[i][xi];
                    }
                }
            }
            ch += nb;
        }
    });
    out
}

/// Patches for output pixels `p0..`: one row of `k·k·C` per pixel, ordered (ki, kj, c), read
/// from the channels-last input; zeros where the kernel overlaps the padding.
fn im2col_channels_last(xt: &[f32], g: &Geometry, p0: usize, cols: &mut [f32]) {
    let (c, kc) = (g.c, g.k * g.k * g.c);
    let hw_out = g.ho * g.wo;
    let per_task = (16 * 1024 / kc).max(1);
    cols.par_chunks_mut(per_task * kc).enumerate().for_each(|(t, chunk)| {
        for (i, row) in chunk.chunks_exact_mut(kc).enumerate() {
            let p = p0 + t * per_task + i;
            let (b, r) = (p / hw_out, p % hw_out);
            let (oy, ox) = (r / g.wo, r % g.wo);
            let img = &xt[b * g.h * g.w * c..][..g.h * g.w * c];
            // Kernel columns kj in lo..hi land inside the image.
            let x0 = (ox * g.s) as isize - g.p as isize;
            let lo = (-x0).clamp(0, g.k as isize) as usize;
            let hi = (g.w as isize - x0).clamp(0, g.k as isize) as usize;
            for (ki, dst) in row.chunks_exact_mut(g.k * c).enumerate() {
                let iy = (oy * g.s + ki) as isize - g.p as isize;
                if iy < 0 || iy >= g.h as isize || lo >= hi {
                    dst.fill(0.0);
                    continue;
                }
                dst[..lo * c].fill(0.0);
                dst[hi * c..].fill(0.0);
                let src = &img[iy as usize * g.w * c..][..g.w * c];
                if g.s == 1 {
                    // Neighbouring pixels are adjacent in channels-last memory: one copy.
                    let start = (x0 + lo as isize) as usize * c;
                    dst[lo * c..hi * c].copy_from_slice(&src[start..start + (hi - lo) * c]);
                } else {
                    for kj in lo..hi {
                        let ix = (x0 + kj as isize) as usize;
                        dst[kj * c..(kj + 1) * c].copy_from_slice(&src[ix * c..(ix + 1) * c]);
                    }
                }
            }
        }
    });
}

/// Writes a pixel-major gemm tile `y [n, O]` for pixels `p0..p0+n` into `out [B, O, Ho·Wo]`,
/// adding the per-image channel terms `[B · O]` and the residual `[B, O, Ho·Wo]`.
fn scatter_tile(y: &[f32], terms: &[f32], residual: Option<&[f32]>, o: usize, p0: usize, hw_out: usize, out: &mut [f32]) {
    const BLOCK: usize = 8;
    let n = y.len() / o;
    // Blocks of up to eight output rows (image b, channels ch0..) restricted to the tile's
    // pixels s0..s1, with the tile row of pixel s0: each pixel's eight values are contiguous in
    // `y`, so a block reads `y` once.
    // (image, first channel, output rows, first pixel, last pixel, tile row)
    type Block<'a> = (usize, usize, &'a mut [f32], usize, usize, usize);
    let mut blocks: Vec<Block> = Vec::new();
    let first_image = p0 / hw_out;
    for (i, img) in out.chunks_exact_mut(o * hw_out).enumerate().skip(first_image) {
        let img_start = i * hw_out;
        if img_start >= p0 + n {
            break;
        }
        let (s0, s1) = (p0.max(img_start) - img_start, (p0 + n).min(img_start + hw_out) - img_start);
        for (j, block) in img.chunks_mut(BLOCK * hw_out).enumerate() {
            blocks.push((i, j * BLOCK, block, s0, s1, img_start + s0 - p0));
        }
    }
    blocks.par_iter_mut().for_each(|(b, ch0, block, s0, s1, t0)| {
        let (b, ch0, s0, s1, t0) = (*b, *ch0, *s0, *s1, *t0);
        let nb = block.len() / hw_out;
        let add = &terms[b * o + ch0..][..nb];
        let mut rows: Vec<&mut [f32]> = block.chunks_exact_mut(hw_out).map(|r| &mut r[s0..s1]).collect();
        let res: Vec<&[f32]> = match residual {
            Some(r) => (0..nb).map(|j| &r[(b * o + ch0 + j) * hw_out + s0..][..s1 - s0]).collect(),
            None => Vec::new(),
        };
        for t in 0..s1 - s0 {
            let src = &y[(t0 + t) * o + ch0..][..nb];
            for j in 0..nb {
                let v = src[j] + add[j];
                rows[j][t] = if res.is_empty() { v } else { v + res[j][t] };
            }
        }
    });
}

/// Per image, `[rows, cols]` → `[cols, rows]`: NCHW ↔ channels-last (`rows` = C, `cols` = H·W,
/// or the reverse), in parallel over output rows.
fn transpose_planes(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(rows.max(1)).enumerate().for_each(|(i, dst)| {
        let (img, col) = (i / cols, i % cols);
        let src = &x[img * rows * cols..][..rows * cols];
        for (r, d) in dst.iter_mut().enumerate() {
            *d = src[r * cols + col];
        }
    });
    out
}

/// The adjoint of [`im2col_channels_last`]: sums patch gradients `cols [pixels, k·k·C]`
/// (ordered ki, kj, c) back into a channels-last `[B, H, W, C]` input gradient. Each task
/// gathers one input row from the patches that read it, so no two tasks write the same place.
fn col2im_channels_last(cols: &[f32], g: &Geometry) -> Vec<f32> {
    let (c, kc) = (g.c, g.k * g.k * g.c);
    let (s, p) = (g.s as isize, g.p as isize);
    // The output index `o` with `o·s + kernel_offset - p = i`, if there is one.
    let source = |i: usize, offset: usize, len: usize| -> Option<usize> {
        let t = i as isize + p - offset as isize;
        (t >= 0 && t % s == 0 && ((t / s) as usize) < len).then_some((t / s) as usize)
    };
    let mut out = vec![0f32; g.b * g.h * g.w * c];
    out.par_chunks_mut(g.w * c).enumerate().for_each(|(row, dst)| {
        let (b, iy) = (row / g.h, row % g.h);
        for ki in 0..g.k {
            let Some(oy) = source(iy, ki, g.ho) else { continue };
            for (ix, d) in dst.chunks_exact_mut(c).enumerate() {
                for kj in 0..g.k {
                    let Some(ox) = source(ix, kj, g.wo) else { continue };
                    let patch = ((b * g.ho + oy) * g.wo + ox) * kc + (ki * g.k + kj) * c;
                    crate::model::kernels::add_rows(d, &cols[patch..patch + c]);
                }
            }
        }
    });
    out
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, in_hw) = self.geometry(layout.dims())?;
        if g.c != self.c {
            candle_core::bail!("conv2d: {} input channels for a kernel of {}", g.c, self.c);
        }
        let out = self.forward_vec(storage, layout, in_hw, &g)?;
        let shape = if self.tokens_out { Shape::from((g.b, g.ho * g.wo, self.o)) } else { Shape::from((g.b, self.o, g.ho, g.wo)) };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // Bias and channel terms are constants added to the output (see `conv2d_frozen`):
        // they do not change the input's gradient.
        if self.upsample.is_some() || self.residual.is_some() || self.tokens_in.is_some() || self.tokens_out {
            candle_core::bail!("frozen-conv2d: no backward for the inference-only extras");
        }
        let (g, _) = self.geometry(arg.dims())?;
        let pixels = g.b * g.ho * g.wo;
        // Pixel-major, as the forward pass: the output gradient channels-last `[pixels, O]`
        // times the kernel `[O, k·k·C]` gives each output pixel's patch gradient.
        let hw_out = g.ho * g.wo;
        let grad_cl = crate::model::fused::with_f32(grad, |d| transpose_planes(d, self.o, hw_out))?;
        let cols = Tensor::from_vec(grad_cl, (pixels, self.o), arg.device())?.matmul(&self.kernel.pixel_major().map_err(|e| candle_core::Error::Msg(e.to_string()))?.t()?)?;
        let dx = crate::model::fused::with_f32(&cols, |cols| {
            let dx_cl = if g.pointwise() { std::borrow::Cow::Borrowed(cols) } else { std::borrow::Cow::Owned(col2im_channels_last(cols, &g)) };
            transpose_planes(&dx_cl, g.h * g.w, g.c)
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::model::noise::seeded_randn as randn;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// `ours` and `theirs`, both computed from `x`, agree, and so do their gradients to `x`
    /// under the same random weighting of the output.
    fn assert_same_output_and_input_gradient(x: &Var, ours: &Tensor, theirs: &Tensor, case: &str) {
        assert!(max_diff(ours, theirs) < 1e-4, "forward {case}");
        let probe = randn(ours.dims(), 3);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, b) < 1e-4, "input gradient {case}");
    }

    #[test]
    fn frozen_conv_matches_candle_forward_and_input_gradient() {
        for (k, stride, padding, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 8), (3, 2, 0, 9, 9), (1, 1, 0, 5, 6), (3, 1, 0, 6, 5)] {
            let x = Var::from_tensor(&randn(&[2, 3, h, w], 1)).unwrap();
            let kernel = randn(&[4, 3, k, k], 2);
            let ours = conv2d(x.as_tensor(), &kernel, padding, stride).unwrap();
            let theirs = x.as_tensor().conv2d(&kernel, padding, stride, 1, 1).unwrap();
            assert_same_output_and_input_gradient(&x, &ours, &theirs, &format!("k{k} s{stride} p{padding}"));
        }
    }

    #[test]
    fn training_conv_folds_bias_and_channel_terms_and_differentiates_its_input() {
        for (k, stride, padding, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 8), (1, 1, 0, 5, 6)] {
            let x = Var::from_tensor(&randn(&[2, 3, h, w], 1)).unwrap();
            let kernel = randn(&[4, 3, k, k], 2);
            let bias = randn(&[4], 3);
            let temb = randn(&[2, 4], 4);
            let ours = conv2d_frozen(x.as_tensor(), &FrozenKernel::new(&kernel), Some(&bias), Some(&temb), padding, stride).unwrap().unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(&kernel, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&temb.reshape((2, 4, 1, 1)).unwrap())
                .unwrap();
            assert_same_output_and_input_gradient(&x, &ours, &theirs, &format!("k{k} s{stride} p{padding}"));
        }
        // A channel term that needs its own gradient is not folded (it would lose it).
        let x = randn(&[1, 3, 4, 4], 6);
        let temb = Var::from_tensor(&randn(&[1, 4], 7)).unwrap();
        assert!(conv2d_frozen(&x, &FrozenKernel::new(&randn(&[4, 3, 3, 3], 8)), None, Some(temb.as_tensor()), 1, 1).unwrap().is_none());
    }

    #[test]
    fn inference_conv_with_bias_and_upsampling_matches_the_composite_form() {
        // Batches of 3 with small tiles exercise tiles that straddle two images.
        for (k, stride, padding, c, h, w, up) in [
            (3, 1, 1, 3, 9, 7, None),
            (3, 2, 1, 5, 8, 8, None),
            (1, 1, 0, 6, 5, 6, None),
            (3, 1, 1, 4, 4, 5, Some((8, 10))),
            (3, 1, 1, 70, 30, 30, None),
            (3, 1, 1, 2, 3, 3, Some((7, 5))),
        ] {
            let x = randn(&[3, c, h, w], 1);
            let kernel = randn(&[4, c, k, k], 2);
            let bias = randn(&[4], 3);
            let extras = ConvExtras { upsample: up, ..Default::default() };
            let ours = conv2d_inference(&x, &FrozenKernel::new(&kernel), Some(&bias), padding, stride, extras).unwrap().unwrap();
            let xu = match up {
                Some((th, tw)) => x.upsample_nearest2d(th, tw).unwrap(),
                None => x.clone(),
            };
            let theirs = xu.conv2d(&kernel, padding, stride, 1, 1).unwrap().broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-4, "k{k} s{stride} p{padding} c{c} {h}x{w} {up:?}");
        }
        // Anything that needs a gradient is refused.
        let xv = Var::from_tensor(&randn(&[1, 2, 4, 4], 4)).unwrap();
        assert!(conv2d_inference(xv.as_tensor(), &FrozenKernel::new(&randn(&[3, 2, 3, 3], 5)), None, 1, 1, ConvExtras::default()).unwrap().is_none());
    }

    /// Largest difference relative to the largest value of `theirs`.
    fn relative_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
        let scale = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max_diff(ours, theirs) / scale.max(1e-6)
    }

    /// Winograd F(4×4, 3×3) against candle's direct convolution, relative to the output's largest
    /// value: its transforms' weights (up to 25 in, 64 out) round more than im2col; measured
    /// 2.5e-7 to 1.0e-5 over these cases, growing with the channel count (im2col stays below 2e-6).
    const WINOGRAD_TOLERANCE: f32 = 2e-5;

    #[test]
    fn winograd_convolutions_match_candle() {
        // 3×3 stride 1 with 16+ channels each side: Winograd. Odd and even sizes, paddings 0-2,
        // upsampling, batches of 3, and more channels out than in; sizes give enough tiles over
        // the batch (see takes_winograd). One-pixel outputs: `winograd::tests`.
        for (c, o, h, w, padding, up) in [
            (16, 16, 16, 16, 1, None),
            (20, 33, 15, 17, 1, None),
            (17, 16, 18, 22, 0, None),
            (16, 18, 15, 15, 0, None),
            (24, 16, 14, 13, 2, None),
            (16, 40, 8, 7, 1, Some((16, 14))),
            (64, 64, 17, 15, 1, None),
            // SD widths: the transforms' rounding grows with the channel count.
            (640, 320, 17, 21, 1, None),
        ] {
            let (hu, wu) = up.unwrap_or((h, w));
            let (ho, wo) = (hu + 2 * padding - 2, wu + 2 * padding - 2);
            assert!(takes_winograd(3, 1, c, o, Tiling::new(3, ho, wo).tiles()), "c{c} o{o} {h}x{w}");
            let x = randn(&[3, c, h, w], 1);
            let kernel = randn(&[o, c, 3, 3], 2);
            let bias = randn(&[o], 3);
            let xu = match up {
                Some((th, tw)) => x.upsample_nearest2d(th, tw).unwrap(),
                None => x.clone(),
            };
            let theirs = xu.conv2d(&kernel, padding, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap()).unwrap();
            let extras = ConvExtras { upsample: up, ..Default::default() };
            let ours = conv2d_inference(&x, &FrozenKernel::new(&kernel), Some(&bias), padding, 1, extras).unwrap().unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let case = format!("c{c} o{o} {h}x{w} p{padding} {up:?}");
            assert!(relative_diff(&ours, &theirs) < WINOGRAD_TOLERANCE, "{case}: {}", relative_diff(&ours, &theirs));
            // The training path: Winograd forward, pixel-major input gradient.
            let xv = Var::from_tensor(&xu).unwrap();
            let ours = conv2d(xv.as_tensor(), &kernel, padding, 1).unwrap();
            let theirs = xv.as_tensor().conv2d(&kernel, padding, 1, 1, 1).unwrap();
            assert!(relative_diff(&ours, &theirs) < WINOGRAD_TOLERANCE, "training {case}");
            let probe = randn(ours.dims(), 3);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g1.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap());
            assert!(relative_diff(a, b) < 2e-6, "input gradient {case}");
        }
        for (k, stride, c, o, tiles) in [(3, 2, 16, 16, 64), (1, 1, 16, 16, 64), (3, 1, 4, 64, 64), (3, 1, 64, 3, 64), (3, 1, 64, 64, WINOGRAD_MIN_TILES - 1), (3, 1, 1280, 1280, WINOGRAD_MIN_TILES_STREAMED - 1)] {
            assert!(!takes_winograd(k, stride, c, o, tiles), "k{k} s{stride} c{c} o{o} tiles{tiles}");
        }
    }

    /// `[1, c, h, w]` as a UNet resnet's convolution sees it: normals through a per-channel
    /// affine (GroupNorm's scale and shift, here drawn around 1 and 0) and SiLU, so values are
    /// mostly positive (mean ≈ 0.2-0.3), with a few channels far from zero.
    fn post_silu_input(c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
        let x = randn(&[c, h * w], seed).to_vec2::<f32>().unwrap();
        let affine = randn(&[2, c], seed + 1).to_vec2::<f32>().unwrap();
        x.into_iter()
            .enumerate()
            .flat_map(|(ci, row)| {
                let (scale, shift) = (1.0 + 0.5 * affine[0][ci], 0.5 * affine[1][ci]);
                row.into_iter().map(move |v| crate::model::kernels::silu::<false>(v * scale + shift))
            })
            .collect()
    }

    /// The 3×3, padding-1 convolution of `x [C, H, W]` by `w [O, C, 3, 3]` at output pixel
    /// `(y, x)`, channel `oi`, summed directly: in f64 (the reference) and in f32 in the
    /// order a naive loop takes (what a plain direct convolution would give).
    fn direct_at(x: &[f32], w: &[f32], (c, h, wd): (usize, usize, usize), (oi, y, xx): (usize, usize, usize)) -> (f64, f32) {
        let (mut exact, mut naive) = (0f64, 0f32);
        for ci in 0..c {
            for ky in 0..3 {
                for kx in 0..3 {
                    let (iy, ix) = ((y + ky).checked_sub(1), (xx + kx).checked_sub(1));
                    let (Some(iy), Some(ix)) = (iy, ix) else { continue };
                    if iy >= h || ix >= wd {
                        continue;
                    }
                    let (a, b) = (x[(ci * h + iy) * wd + ix], w[((oi * c + ci) * 3 + ky) * 3 + kx]);
                    exact += a as f64 * b as f64;
                    naive += a * b;
                }
            }
        }
        (exact, naive)
    }

    /// Winograd's error against the exact convolution (f64), relative to the output's largest
    /// value, at the widths SD 1.5 and SDXL run it with. Rounding grows with the input channels
    /// (each of the 36 products sums `C` transformed terms, which `Bᵀ`'s and `Aᵀ`'s weights, up
    /// to 5 and 8, make larger than the inputs), and positive-mean inputs put much of a patch's
    /// sum into one transformed position, whose products must then cancel in the output
    /// transform.
    ///
    /// Measured (2-core x86-64, sampled outputs below): 7.3e-6 to 1.7e-5 in the AVX2 and
    /// AVX-512 builds (identical), up to 1.9e-5 in the plain build (no FMA), largest at 2560
    /// channels; the same outputs summed directly in f32, one term after another, 2.8e-6 to
    /// 4.9e-6. The tolerance is 5× the worst: the errors are maxima over about 5,000 sampled
    /// outputs of a layer's million or more, whose full maximum is larger (for errors spread
    /// like a normal distribution, ~1.5×), and other CPUs' gemm kernels block the channel sums
    /// differently. `WINOGRAD_TOLERANCE` (2e-5, normal inputs of up to 640 channels) would
    /// leave the plain build 5 % of headroom here.
    const WINOGRAD_SD_TOLERANCE: f32 = 1e-4;

    #[test]
    fn winograd_holds_at_the_widths_and_tile_counts_of_sd15_and_sdxl() {
        // (input channels, output channels, latent side, rows per row group): each the widest
        // input a level of these UNets reaches (up blocks concatenate the skip connection),
        // at the smallest tile count it takes Winograd with. SDXL at 1024²: 32×32 (2560 in,
        // 64 tiles per row: the streamed threshold exactly), 64×64 (1920 in, 256 tiles),
        // 128×128 (960 in, 1024 tiles). SD 1.5 at 512² reaches the same widths: 2560 at
        // 16×16 with four rows per group (64 tiles), 1920 at 32×32 (64 tiles), 960 at 64×64.
        let cases = [(2560, 1280, 32, 1), (2560, 1280, 16, 4), (1920, 640, 32, 1), (1920, 640, 64, 1), (960, 320, 128, 1), (960, 320, 64, 1)];
        let mut worst = (0f32, 0f32);
        for (i, &(c, o, side, rows)) in cases.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let tiles = Tiling::new(rows, side, side).tiles();
            assert!(takes_winograd(3, 1, c, o, tiles), "c{c} o{o} {side}² × {rows} must take Winograd");
            let images: Vec<Vec<f32>> = (0..rows).map(|r| post_silu_input(c, side, side, seed + 2 * r as u64)).collect();
            let x = Tensor::from_vec(images.concat(), (rows, c, side, side), &Device::Cpu).unwrap();
            // Kaiming-scaled weights: outputs of about unit size, as in a trained UNet.
            let kernel = (randn(&[o, c, 3, 3], seed + 7) * (1.0 / (9.0 * c as f64).sqrt())).unwrap();
            let ours = conv2d_inference(&x, &FrozenKernel::new(&kernel), None, 1, 1, ConvExtras::default()).unwrap().unwrap();
            let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let w = kernel.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Every pixel of the corner, edge and middle tiles of the first and last image
            // (padding reaches the former), at output channels across the range.
            let ends = [0, 4, side / 2, side - 4];
            let channels: Vec<usize> = (0..8).map(|k| k * (o - 1) / 7).collect();
            let (mut scale, mut err, mut naive_err) = (0f64, 0f64, 0f64);
            for b in [0, rows - 1] {
                for &ty in &ends {
                    for &tx in &ends {
                        for y in ty..ty + 4 {
                            for xx in tx..tx + 4 {
                                for &oi in &channels {
                                    let (exact, naive) = direct_at(&images[b], &w, (c, side, side), (oi, y, xx));
                                    let got = ours[((b * o + oi) * side + y) * side + xx] as f64;
                                    scale = scale.max(exact.abs());
                                    err = err.max((got - exact).abs());
                                    naive_err = naive_err.max((naive as f64 - exact).abs());
                                }
                            }
                        }
                    }
                }
            }
            let (rel, naive_rel) = ((err / scale) as f32, (naive_err / scale) as f32);
            eprintln!("winograd c{c} o{o} {side}² × {rows} ({tiles} tiles): {rel:.2e} of the largest output (direct f32 sum: {naive_rel:.2e})");
            assert!(rel < WINOGRAD_SD_TOLERANCE, "c{c} o{o} {side}² × {rows}: Winograd off by {rel:e} of the largest output (direct f32: {naive_rel:e})");
            worst = (worst.0.max(rel), worst.1.max(naive_rel));
        }
        eprintln!("worst: winograd {:.2e}, direct f32 {:.2e}", worst.0, worst.1);
    }

    #[test]
    fn pointwise_convolutions_match_candle_in_every_layout() {
        // Batches on both sides of the switch between images in parallel and parallel products.
        let threads = rayon::current_num_threads();
        for b in [1, 2 * threads + 1] {
            let (c, o, h, w) = (7, 5, 3, 4);
            let x = randn(&[b, c, h, w], 1);
            let kernel = randn(&[o, c, 1, 1], 2);
            let (bias, t, r) = (randn(&[o], 3), randn(&[b, o], 4), randn(&[b, o, h, w], 5));
            let plain = x.conv2d(&kernel, 0, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap()).unwrap();
            let with_terms = plain.broadcast_add(&t.reshape((b, o, 1, 1)).unwrap()).unwrap();
            let to_tokens = |y: &Tensor| y.reshape((b, y.dim(1).unwrap(), h * w)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let tokens = to_tokens(&x);
            let kernel = FrozenKernel::new(&kernel);
            let cases: Vec<(&str, &Tensor, ConvExtras, Tensor)> = vec![
                ("nchw", &x, ConvExtras { channel_add: Some(&t), ..Default::default() }, with_terms.clone()),
                ("nchw_residual", &x, ConvExtras { channel_add: Some(&t), residual: Some(&r), ..Default::default() }, (&with_terms + &r).unwrap()),
                ("tokens_out", &x, ConvExtras { channel_add: Some(&t), tokens_out: true, ..Default::default() }, to_tokens(&with_terms)),
                ("tokens_in", &tokens, ConvExtras { tokens_in: Some((h, w)), residual: Some(&r), ..Default::default() }, (&plain + &r).unwrap()),
                ("tokens_in_out", &tokens, ConvExtras { tokens_in: Some((h, w)), tokens_out: true, ..Default::default() }, to_tokens(&plain)),
            ];
            for (name, input, extras, want) in cases {
                let got = conv2d_inference(input, &kernel, Some(&bias), 0, 1, extras).unwrap().unwrap();
                assert_eq!(got.dims(), want.dims(), "{name} b{b}");
                assert!(max_diff(&got, &want) < 1e-5, "{name} b{b}: {}", max_diff(&got, &want));
            }
        }
    }

    #[test]
    fn conv_extras_match_the_composite_form() {
        use crate::model::nn::Conv2d;
        use crate::model::params::{Params, WeightStore};
        let store = WeightStore::random(7, DType::F32, &Device::Cpu);
        let targets = Default::default();
        let p = Params::root(&store, &targets);
        for (k, padding, c, o, h, w) in [(3, 1, 5, 6, 6, 7), (1, 0, 70, 9, 20, 20), (3, 1, 70, 9, 20, 20), (3, 1, 32, 24, 9, 7)] {
            let conv = Conv2d::load(&p.pp(format!("c{k}_{c}")), c, o, k, 1, padding, true).unwrap();
            let x = randn(&[3, c, h, w], 1);
            let t = randn(&[3, o], 2);
            let r = randn(&[3, o, h, w], 3);
            let tokens = x.reshape((3, c, h * w)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let cases: Vec<(&str, Tensor, ConvExtras)> = vec![
                ("channel_add", x.clone(), ConvExtras { channel_add: Some(&t), ..Default::default() }),
                ("residual", x.clone(), ConvExtras { residual: Some(&r), ..Default::default() }),
                ("both", x.clone(), ConvExtras { channel_add: Some(&t), residual: Some(&r), ..Default::default() }),
                ("tokens_out", x.clone(), ConvExtras { tokens_out: true, ..Default::default() }),
                ("tokens_in", tokens.clone(), ConvExtras { tokens_in: Some((h, w)), residual: Some(&r), ..Default::default() }),
                ("tokens_in_out", tokens.clone(), ConvExtras { tokens_in: Some((h, w)), tokens_out: true, ..Default::default() }),
            ];
            for (name, input, extras) in cases {
                let fused = conv.forward_with(&input, extras).unwrap();
                // A Var input takes the composite, differentiable path.
                let var = Var::from_tensor(&input).unwrap();
                let slow = conv.forward_with(var.as_tensor(), extras).unwrap();
                assert!(slow.track_op());
                assert_eq!(fused.dims(), slow.dims(), "{name}");
                assert!(relative_diff(&fused, &slow) < 2e-6, "{name} k{k} c{c}: {}", relative_diff(&fused, &slow));
            }
        }
    }
}
