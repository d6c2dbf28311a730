//! The 2-D convolution used by every model component.
//!
//! On the CPU, candle 0.11's tiled convolution is several times slower than one im2col plus one
//! large matrix product, and its backward pass always computes the kernel's gradient too, even
//! when the kernel is a frozen base weight (a LoRA run never needs that). So for frozen kernels
//! on the CPU this module runs its own op: im2col + gemm forward, and a backward that computes
//! only the input's gradient (gemm + col2im). Trainable kernels (LoCon adapters) and GPUs use
//! candle's convolution, which differentiates both arguments.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;

/// `x [B, C, H, W]` convolved with `w [O, C, k, k]`, symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && !w.track_op() {
        let (o, c, kh, kw) = w.dims4()?;
        if kh == kw && x.dim(1)? == c {
            let op = FrozenConv { w: w.contiguous()?, o, c, k: kh, stride, padding };
            let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
            // Records the op for backprop only when `x` needs a gradient.
            return Ok(x.apply_op1(op)?);
        }
    }
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

/// Convolution with a frozen kernel, as a custom op on its input.
#[derive(Clone)]
struct FrozenConv {
    w: Tensor,
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

impl FrozenConv {
    fn geometry(&self, dims: &[usize]) -> candle_core::Result<Geometry> {
        let [b, c, h, w] = dims else { candle_core::bail!("conv2d: input must be [B, C, H, W], got {dims:?}") };
        let (k, s, p) = (self.k, self.stride, self.padding);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: input {h}x{w} is smaller than the {k}x{k} kernel");
        }
        Ok(Geometry { b: *b, c: *c, h: *h, w: *w, ho: (h + 2 * p - k) / s + 1, wo: (w + 2 * p - k) / s + 1, k, s, p })
    }

    /// `W [O, C·k·k] @ cols [B, C·k·k, Ho·Wo]` → `[B, O, Ho·Wo]`.
    fn forward_vec(&self, x: &[f32], g: &Geometry) -> candle_core::Result<Vec<f32>> {
        let kk = g.c * g.k * g.k;
        let n = g.ho * g.wo;
        let cols = if g.pointwise() { x.to_vec() } else { im2col(x, g) };
        let cols = Tensor::from_vec(cols, (g.b, kk, n), &Device::Cpu)?;
        let w2 = self.w.reshape((self.o, kk))?;
        w2.broadcast_matmul(&cols)?.flatten_all()?.to_vec1::<f32>()
    }
}

/// Unfolds `x [B, C, H, W]` into `[B, C·k·k, Ho·Wo]` patches.
fn im2col(x: &[f32], g: &Geometry) -> Vec<f32> {
    let kk = g.c * g.k * g.k;
    let n = g.ho * g.wo;
    let mut cols = vec![0f32; g.b * kk * n];
    for b in 0..g.b {
        for c in 0..g.c {
            let plane = &x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
            for ki in 0..g.k {
                for kj in 0..g.k {
                    let row = (c * g.k + ki) * g.k + kj;
                    let dst = &mut cols[(b * kk + row) * n..][..n];
                    for oy in 0..g.ho {
                        let iy = (oy * g.s + ki) as isize - g.p as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let src_row = &plane[iy as usize * g.w..][..g.w];
                        let dst_row = &mut dst[oy * g.wo..][..g.wo];
                        if g.s == 1 {
                            // Contiguous run: ox + kj - p must lie in [0, w).
                            let lo = g.p.saturating_sub(kj);
                            let hi = (g.w + g.p).saturating_sub(kj).min(g.wo);
                            if lo < hi {
                                let start = lo + kj - g.p;
                                dst_row[lo..hi].copy_from_slice(&src_row[start..start + (hi - lo)]);
                            }
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                let ix = (ox * g.s + kj) as isize - g.p as isize;
                                if ix >= 0 && ix < g.w as isize {
                                    *d = src_row[ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    cols
}

/// The adjoint of [`im2col`]: sums patch gradients back into `[B, C, H, W]`.
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
        let out = self.forward_vec(&data[start..end], &g)?;
        Ok((CpuStorage::F32(out), Shape::from((g.b, self.o, g.ho, g.wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
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
    use candle_core::Var;

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
}
