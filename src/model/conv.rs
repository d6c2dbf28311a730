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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `x [B, C, H, W]` convolved with `w [O, C, k, k]`, symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if let Some(op) = FrozenConv::new(x, w, None, None, padding, stride)? {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        // Records the op for backprop only when `x` needs a gradient.
        return Ok(x.apply_op1(op)?);
    }
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

/// The kernel `w [O, C, k, k]` as the `[k·k·C, O]` matrix of the pixel-major forward pass.
pub fn pixel_major_kernel(w: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    Ok(w.permute((2, 3, 1, 0))?.contiguous()?.reshape((kh * kw * c, o))?)
}

/// Inference-only convolution (nothing may need a gradient): `x`, nearest-upsampled to
/// `upsample` first when given, convolved with `w`, plus `bias`. `w_pm` is
/// [`pixel_major_kernel`]`(w)` if the caller keeps one. `None` when the fused CPU kernel does not
/// apply (other device or dtype); the caller then takes the composite path.
pub fn conv2d_inference(
    x: &Tensor,
    w: &Tensor,
    w_pm: Option<&Tensor>,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    upsample: Option<(usize, usize)>,
) -> Result<Option<Tensor>> {
    if x.track_op() || w.track_op() || bias.is_some_and(|b| b.track_op()) {
        return Ok(None);
    }
    let Some(mut op) = FrozenConv::new(x, w, w_pm, bias, padding, stride)? else { return Ok(None) };
    op.upsample = upsample;
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    Ok(Some(x.apply_op1_no_bwd(&op)?))
}

/// Convolution with a frozen kernel, as a custom op on its input.
#[derive(Clone)]
struct FrozenConv {
    w: Tensor,
    /// `w` as `[k·k·C, O]`.
    w_pm: Tensor,
    bias: Option<Tensor>,
    /// Nearest-neighbour upsampling of the input to this size first (inference only).
    upsample: Option<(usize, usize)>,
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
    fn new(x: &Tensor, w: &Tensor, w_pm: Option<&Tensor>, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Option<Self>> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && !w.track_op()) {
            return Ok(None);
        }
        let (o, c, kh, kw) = w.dims4()?;
        if kh != kw || x.dim(1)? != c {
            return Ok(None);
        }
        let w_pm = match w_pm {
            Some(t) => t.clone(),
            None => pixel_major_kernel(w)?,
        };
        Ok(Some(FrozenConv {
            w: w.contiguous()?,
            w_pm,
            bias: bias.cloned(),
            upsample: None,
            o,
            c,
            k: kh,
            stride,
            padding,
        }))
    }

    fn geometry(&self, dims: &[usize]) -> candle_core::Result<Geometry> {
        let [b, c, h, w] = dims else { candle_core::bail!("conv2d: input must be [B, C, H, W], got {dims:?}") };
        let (h, w) = self.upsample.unwrap_or((*h, *w));
        let (k, s, p) = (self.k, self.stride, self.padding);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: input {h}x{w} is smaller than the {k}x{k} kernel");
        }
        Ok(Geometry { b: *b, c: *c, h, w, ho: (h + 2 * p - k) / s + 1, wo: (w + 2 * p - k) / s + 1, k, s, p })
    }

    /// `x [B, C, h, w]` (before any upsampling) → `[B, O, Ho, Wo]`.
    fn forward_vec(&self, x: &[f32], in_hw: (usize, usize), g: &Geometry) -> candle_core::Result<Vec<f32>> {
        let kc = g.k * g.k * g.c;
        let (hw_out, pixels) = (g.ho * g.wo, g.b * g.ho * g.wo);
        let xt = channels_last(x, g, in_hw);
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0f32; self.o],
        };
        let (w_store, w_layout) = self.w_pm.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_store else { candle_core::bail!("frozen-conv2d: kernel not on the CPU") };
        let mut out = vec![0f32; g.b * self.o * hw_out];
        let tile = tile_pixels(kc, pixels);
        // The pointwise case reads its patches straight from the channels-last input.
        let xt = CpuStorage::F32(xt);
        let mut cols = CpuStorage::F32(if g.pointwise() { Vec::new() } else { vec![0f32; tile.min(pixels) * kc] });
        for p0 in (0..pixels).step_by(tile) {
            let n = tile.min(pixels - p0);
            let y = if g.pointwise() {
                let l = Layout::contiguous_with_offset((n, kc), p0 * kc);
                xt.matmul(w_cpu, (1, n, self.o, kc), &l, w_layout)?
            } else {
                let CpuStorage::F32(buf) = &mut cols else { unreachable!() };
                let CpuStorage::F32(src) = &xt else { unreachable!() };
                im2col_channels_last(src, g, p0, &mut buf[..n * kc]);
                cols.matmul(w_cpu, (1, n, self.o, kc), &Layout::contiguous((n, kc)), w_layout)?
            };
            let CpuStorage::F32(y) = y else { candle_core::bail!("frozen-conv2d: gemm gave no f32") };
            scatter_tile(&y, &bias, p0, hw_out, &mut out);
        }
        Ok(out)
    }
}

/// `x [B, C, h, w]` as channels-last `[B, H, W, C]`, nearest-upsampled from `h × w` to the
/// geometry's `H × W` (the same source indices as candle's `upsample_nearest2d`).
fn channels_last(x: &[f32], g: &Geometry, (h, w): (usize, usize)) -> Vec<f32> {
    let src_idx = |dst: usize, src: usize| -> Vec<usize> {
        let scale = src as f64 / dst as f64;
        (0..dst).map(|i| ((i as f64 * scale) as usize).min(src - 1)).collect()
    };
    let (sy, sx) = (src_idx(g.h, h), src_idx(g.w, w));
    let c = g.c;
    let mut out = vec![0f32; g.b * g.h * g.w * c];
    // One task per output row of one image; each writes `W·C` contiguous floats.
    out.par_chunks_mut(g.w * c).enumerate().for_each(|(row, dst)| {
        let (b, y) = (row / g.h, row % g.h);
        let img = &x[b * c * h * w..][..c * h * w];
        let src_row = sy[y] * w;
        for (ch, plane) in img.chunks_exact(h * w).enumerate() {
            let src = &plane[src_row..src_row + w];
            for (xo, &xi) in sx.iter().enumerate() {
                dst[xo * c + ch] = src[xi];
            }
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
/// adding the bias.
fn scatter_tile(y: &[f32], bias: &[f32], p0: usize, hw_out: usize, out: &mut [f32]) {
    let o = bias.len();
    let n = y.len() / o;
    // (image, first pixel within it, count, offset in the tile) for each image the tile touches.
    let mut spans = Vec::new();
    let mut p = p0;
    while p < p0 + n {
        let (b, s) = (p / hw_out, p % hw_out);
        let len = (hw_out - s).min(p0 + n - p);
        spans.push((b, s, len, p - p0));
        p += len;
    }
    let mut rows: Vec<(usize, &mut [f32], usize, usize)> = Vec::new();
    let mut rest = out;
    let mut consumed = 0;
    for &(b, s, len, t0) in &spans {
        let (_, tail) = rest.split_at_mut(b * o * hw_out - consumed);
        let (img, tail) = tail.split_at_mut(o * hw_out);
        consumed = (b + 1) * o * hw_out;
        rest = tail;
        for (ch, row) in img.chunks_exact_mut(hw_out).enumerate() {
            rows.push((ch, &mut row[s..s + len], t0, len));
        }
    }
    rows.par_iter_mut().with_min_len(8).for_each(|(ch, dst, t0, _)| {
        let (ch, t0) = (*ch, *t0);
        let b = bias[ch];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = y[(t0 + i) * o + ch] + b;
        }
    });
}

/// The adjoint of an NCHW im2col (`[B, C·k·k, Ho·Wo]` patches): sums patch gradients back
/// into `[B, C, H, W]`.
fn col2im(cols: &[f32], g: &Geometry) -> Vec<f32> {
    let kk = g.c * g.k * g.k;
    let n = g.ho * g.wo;
    let mut x = vec![0f32; g.b * g.c * g.h * g.w];
    for b in 0..g.b {
        for c in 0..g.c {
            let plane = &mut x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
            for ki in 0..g.k {
                for kj in 0..g.k {
                    let row = (c * g.k + ki) * g.k + kj;
                    let src = &cols[(b * kk + row) * n..][..n];
                    for oy in 0..g.ho {
                        let iy = (oy * g.s + ki) as isize - g.p as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let dst_row = &mut plane[iy as usize * g.w..][..g.w];
                        for ox in 0..g.wo {
                            let ix = (ox * g.s + kj) as isize - g.p as isize;
                            if ix >= 0 && ix < g.w as isize {
                                dst_row[ix as usize] += src[oy * g.wo + ox];
                            }
                        }
                    }
                }
            }
        }
    }
    x
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(layout.dims())?;
        if g.c != self.c {
            candle_core::bail!("conv2d: {} input channels for a kernel of {}", g.c, self.c);
        }
        let CpuStorage::F32(data) = storage else { candle_core::bail!("frozen-conv2d: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("frozen-conv2d: non-contiguous input") };
        let dims = layout.dims();
        let out = self.forward_vec(&data[start..end], (dims[2], dims[3]), &g)?;
        Ok((CpuStorage::F32(out), Shape::from((g.b, self.o, g.ho, g.wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.bias.is_some() || self.upsample.is_some() {
            candle_core::bail!("frozen-conv2d: no backward for the inference-only bias and upsampling");
        }
        let g = self.geometry(arg.dims())?;
        let kk = g.c * g.k * g.k;
        let n = g.ho * g.wo;
        let w2t = self.w.reshape((self.o, kk))?.t()?.contiguous()?;
        let grad = grad.contiguous()?.reshape((g.b, self.o, n))?;
        let gcols = w2t.broadcast_matmul(&grad)?;
        if g.pointwise() {
            return Ok(Some(gcols.reshape(arg.dims())?));
        }
        let gx = col2im(&gcols.flatten_all()?.to_vec1::<f32>()?, &g);
        Ok(Some(Tensor::from_vec(gx, arg.dims(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::model::noise::Rng::new(seed);
        crate::model::noise::randn(&mut rng, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn frozen_conv_matches_candle_forward_and_input_gradient() {
        for (k, stride, padding, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 8), (3, 2, 0, 9, 9), (1, 1, 0, 5, 6), (3, 1, 0, 6, 5)] {
            let x = Var::from_tensor(&randn(&[2, 3, h, w], 1)).unwrap();
            let kernel = randn(&[4, 3, k, k], 2);
            let ours = conv2d(x.as_tensor(), &kernel, padding, stride).unwrap();
            let theirs = x.as_tensor().conv2d(&kernel, padding, stride, 1, 1).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "forward k{k} s{stride} p{padding}");
            let probe = randn(ours.dims(), 3);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            assert!(max_diff(a, b) < 1e-4, "input gradient k{k} s{stride} p{padding}");
        }
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
            let ours = conv2d_inference(&x, &kernel, None, Some(&bias), padding, stride, up).unwrap().unwrap();
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
        assert!(conv2d_inference(xv.as_tensor(), &randn(&[3, 2, 3, 3], 5), None, None, 1, 1, None).unwrap().is_none());
    }
}
