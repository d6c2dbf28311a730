//! Fused f32 CPU kernels: fewer passes over memory than the composite candle ops they replace.
//! Each has a composite twin that GPUs and other dtypes use, and a test that the two agree.
//!
//! Most also carry a backward pass to their input (`bwd`), so that training runs them too:
//! candle's autograd on the composite form allocates and zeroes a tensor per element-wise op
//! and differentiates frozen weights it is then told to throw away. Their weights (norm
//! scales, base linear weights) are frozen; callers take the composite form when one needs a
//! gradient. The backward passes are tested against the composite form's autograd.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::gemm::{MatRef, matmul_add_into, matmul_add_into_parallel, matmul_into, matmul_into_parallel};
use crate::model::kernels;

/// Group normalisation over `[B, C, ...]`, optionally followed by SiLU.
pub struct GroupNormCpu {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl CustomOp1 for GroupNormCpu {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("group-norm-cpu: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("group-norm-cpu: non-contiguous input") };
        let x = &data[start..end];
        let dims = layout.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        if c % self.groups != 0 {
            candle_core::bail!("group norm: {c} channels do not split into {} groups", self.groups);
        }
        let per_group = c / self.groups;
        let w = self.weight.to_vec1::<f32>()?;
        let bias = self.bias.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        let group_len = (per_group * spatial).max(1);
        let (silu, groups) = (self.silu, self.groups);
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (o, xs))| {
            let g = i % groups;
            let (mean, inv) = self.statistics(xs);
            for cc in 0..per_group {
                let ch = g * per_group + cc;
                let scale = (w[ch] as f64 * inv) as f32;
                let shift = (bias[ch] as f64 - mean * w[ch] as f64 * inv) as f32;
                let range = cc * spatial..(cc + 1) * spatial;
                kernels::affine_into(&xs[range.clone()], &mut o[range], scale, shift, silu);
            }
        });
        let _ = b;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims();
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        let group_len = (per_group * spatial).max(1);
        let w = self.weight.to_vec1::<f32>()?;
        let bias = self.bias.to_vec1::<f32>()?;
        let dx = with_f32(arg, |x| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).zip(g.par_chunks(group_len)).enumerate().for_each(
                    |(i, ((d, xs), gs))| {
                        let first = (i % self.groups) * per_group;
                        let (mean, inv) = self.statistics(xs);
                        let (mean, inv) = (mean as f32, inv as f32);
                        let (mut s1, mut s2) = (0f64, 0f64);
                        for cc in 0..per_group {
                            let ch = first + cc;
                            let r = cc * spatial..(cc + 1) * spatial;
                            let (a, b) = kernels::norm_grad_sums(&xs[r.clone()], &gs[r.clone()], &mut d[r], (mean, inv), (w[ch], bias[ch]), self.silu);
                            s1 += a;
                            s2 += b;
                        }
                        let n = xs.len() as f64;
                        kernels::norm_grad_finish(xs, d, mean, inv, (s1 / n) as f32, (s2 / n) as f32);
                    },
                );
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, dims, arg.device())?))
    }
}

impl GroupNormCpu {
    fn statistics(&self, xs: &[f32]) -> (f64, f64) {
        normalisation_statistics(xs, self.eps)
    }
}

/// Mean and `1/√(var + eps)` of the values a normalisation divides by, in f64.
fn normalisation_statistics(xs: &[f32], eps: f64) -> (f64, f64) {
    let n = xs.len() as f64;
    let (s, q) = kernels::moments(xs);
    let mean = s / n;
    let var = (q / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

/// Runs `f` on the `f32` data of `t` (made contiguous first), which must be on the CPU.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (store, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*store else { candle_core::bail!("fused kernel: tensor not on the CPU") };
    Ok(f(contiguous_f32(cpu, layout, "fused kernel")?))
}

/// Layer normalisation over the last dimension (weights frozen).
pub struct LayerNormCpu {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNormCpu {
    fn statistics(&self, xs: &[f32]) -> (f32, f32) {
        let (mean, inv) = normalisation_statistics(xs, self.eps);
        (mean as f32, inv as f32)
    }
}

impl CustomOp1 for LayerNormCpu {
    fn name(&self) -> &'static str {
        "layer-norm-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "layer norm")?;
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        let (w, b) = (self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?);
        if w.len() != width || b.len() != width {
            candle_core::bail!("layer norm: {} weights for rows of {width}", w.len());
        }
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(x.len() / width, width, 16 * 1024) * width;
        out.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(o, xs)| {
            for (or, xr) in o.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
                let (mean, inv) = self.statistics(xr);
                for i in 0..width {
                    or[i] = (xr[i] - mean) * inv * w[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = arg.dims().last().copied().unwrap_or(1).max(1);
        let w = self.weight.to_vec1::<f32>()?;
        let dx = with_f32(arg, |x| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                let rows = rows_per_task(x.len() / width, width, 16 * 1024) * width;
                dx.par_chunks_mut(rows).zip(x.par_chunks(rows)).zip(g.par_chunks(rows)).for_each(|((d, xs), gs)| {
                    for ((dr, xr), gr) in d.chunks_exact_mut(width).zip(xs.chunks_exact(width)).zip(gs.chunks_exact(width)) {
                        let (mean, inv) = self.statistics(xr);
                        let (mut s1, mut s2) = (0f64, 0f64);
                        for i in 0..width {
                            let v = gr[i] * w[i];
                            dr[i] = v;
                            s1 += v as f64;
                            s2 += (v * (xr[i] - mean) * inv) as f64;
                        }
                        let n = width as f64;
                        kernels::norm_grad_finish(xr, dr, mean, inv, (s1 / n) as f32, (s2 / n) as f32);
                    }
                });
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

/// Rows per rayon task so that each task has at least `min_elems` elements.
fn rows_per_task(rows: usize, width: usize, min_elems: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_size = min_elems.div_ceil(width.max(1));
    by_size.max(rows.div_ceil(4 * threads)).max(1)
}

/// The contiguous `f32` data of a custom op's input.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: non-contiguous input") };
    Ok(&data[start..end])
}

/// Softmax over the last dimension of `x · scale`; in place ([`InplaceOp1`]) on a tensor the
/// caller owns, or into a new one ([`CustomOp1`]).
pub struct SoftmaxCpu {
    pub scale: f32,
}

impl SoftmaxCpu {
    fn run(&self, xs: &mut [f32], width: usize) {
        let chunk = rows_per_task(xs.len() / width, width, 16 * 1024) * width;
        xs.par_chunks_mut(chunk).for_each(|c| kernels::softmax_rows(c, width, self.scale));
    }
}

impl CustomOp1 for SoftmaxCpu {
    fn name(&self) -> &'static str {
        "softmax-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = contiguous_f32(storage, layout, CustomOp1::name(self))?.to_vec();
        self.run(&mut out, layout.dims().last().copied().unwrap_or(1).max(1));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = arg.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_f32(res, |y| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                let rows = rows_per_task(y.len() / width, width, 16 * 1024) * width;
                dx.par_chunks_mut(rows)
                    .zip(y.par_chunks(rows))
                    .zip(g.par_chunks(rows))
                    .for_each(|((d, ys), gs)| kernels::softmax_rows_backward(ys, gs, d, width, self.scale));
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

impl InplaceOp1 for SoftmaxCpu {
    fn name(&self) -> &'static str {
        "softmax-cpu-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("softmax: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("softmax: non-contiguous input") };
        self.run(&mut data[start..end], layout.dims().last().copied().unwrap_or(1).max(1));
        Ok(())
    }
}

/// GEGLU: `[..., 2n]` → `[..., n]`, the first half times the exact GELU of the second.
pub struct GegluCpu;

impl CustomOp1 for GegluCpu {
    fn name(&self) -> &'static str {
        "geglu-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let mut dims = layout.dims().to_vec();
        let last = dims.last_mut().ok_or_else(|| candle_core::Error::Msg("geglu: scalar input".into()))?;
        if *last % 2 != 0 {
            candle_core::bail!("geglu: odd last dimension {last}");
        }
        *last /= 2;
        let width = *last;
        let mut out = vec![0f32; x.len() / 2];
        if let Some(total_rows) = out.len().checked_div(width) {
            let rows = rows_per_task(total_rows, width, 8 * 1024);
            out.par_chunks_mut(rows * width)
                .zip(x.par_chunks(2 * rows * width))
                .for_each(|(o, xs)| kernels::geglu_rows(xs, o, width));
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = arg.dims().last().copied().unwrap_or(2) / 2;
        let dh = with_f32(arg, |h| {
            with_f32(grad, |g| {
                let mut dh = vec![0f32; h.len()];
                if let Some(total_rows) = g.len().checked_div(width) {
                    let rows = rows_per_task(total_rows, width, 8 * 1024);
                    dh.par_chunks_mut(2 * rows * width)
                        .zip(h.par_chunks(2 * rows * width))
                        .zip(g.par_chunks(rows * width))
                        .for_each(|((d, hs), gs)| kernels::geglu_rows_backward(hs, gs, d, width));
                }
                dh
            })
        })??;
        Ok(Some(Tensor::from_vec(dh, arg.dims(), arg.device())?))
    }
}

/// Rows per block of [`LinearCpu`]'s blockwise GEGLU, `None` when there are too few rows to give
/// every thread two blocks of at least 32 (then one product runs over all threads): a block's
/// product (≤ 256 KiB) stays in L2 while its bias and GEGLU are applied.
fn geglu_block_rows(rows: usize, out_f: usize) -> Option<usize> {
    const MIN_ROWS: usize = 32;
    let blocks = 2 * rayon::current_num_threads().max(1);
    if rows < blocks * MIN_ROWS {
        return None;
    }
    let by_cache = ((64 * 1024) / out_f.max(1)).max(MIN_ROWS);
    Some(by_cache.min(rows.div_ceil(blocks)))
}

/// `x @ wᵀ + bias` over the last dimension of `x`, then either GEGLU or `+ residual`, in the
/// gemm output's single pass.
pub struct LinearCpu {
    /// `[out, in]`, contiguous.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Same shape as the output.
    pub residual: Option<Tensor>,
    pub geglu: bool,
}

impl CustomOp1 for LinearCpu {
    fn name(&self) -> &'static str {
        "linear-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous input") };
        let (out_f, in_f) = self.weight.dims2()?;
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&in_f) {
            candle_core::bail!("linear: input {dims:?} for a weight of {out_f}x{in_f}");
        }
        let rows = (end - start) / in_f.max(1);
        let CpuStorage::F32(x) = storage else { candle_core::bail!("linear: f32 only") };
        let x = &x[start..end];
        let (w_store, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(w)) = &*w_store else { candle_core::bail!("linear: f32 weight on the CPU expected") };
        let Some((w_start, w_end)) = w_layout.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous weight") };
        let bias = match &self.bias {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual_guard {
            Some((store, l)) => {
                let candle_core::Storage::Cpu(CpuStorage::F32(r)) = &**store else { candle_core::bail!("linear: residual must be f32 on the CPU") };
                let Some((rs, re)) = l.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous residual") };
                if re - rs != rows * out_f || self.geglu {
                    candle_core::bail!("linear: residual {:?} does not match the output", l.dims());
                }
                Some(&r[rs..re])
            }
            None => None,
        };
        // The weight `[out, in]` read as its transpose `[in, out]`.
        let rhs = MatRef { data: &w[w_start..w_end], rows: in_f, cols: out_f, row_stride: 1, col_stride: in_f };
        if self.geglu
            && let Some(block) = geglu_block_rows(rows, out_f)
        {
            // Blocks of rows, each product on one thread with its bias and GEGLU applied while
            // the block is still in cache: the `[rows, 2·half]` product never reaches memory.
            let half = out_f / 2;
            *dims.last_mut().expect("non-empty") = half;
            let mut out = vec![0f32; rows * half];
            out.par_chunks_mut(block * half).enumerate().for_each_init(Vec::new, |h, (bi, dst)| {
                let n = dst.len() / half;
                h.resize(n * out_f, 0.0);
                let lhs = MatRef { data: &x[bi * block * in_f..][..n * in_f], rows: n, cols: in_f, row_stride: in_f, col_stride: 1 };
                match &bias {
                    Some(b) => {
                        for row in h.chunks_exact_mut(out_f) {
                            row.copy_from_slice(b);
                        }
                        matmul_add_into(h, out_f, lhs, rhs);
                    }
                    None => matmul_into(h, out_f, lhs, rhs),
                }
                kernels::geglu_rows(h, dst, half);
            });
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        // The output starts as bias + residual (or is left for gemm to overwrite), and gemm adds
        // the product in its own pass: no zeroing, no second pass.
        let per_task = rows_per_task(rows, out_f, 16 * 1024);
        let mut y = vec![0f32; rows * out_f];
        let accumulate = bias.is_some() || residual.is_some();
        if accumulate {
            y.par_chunks_mut(per_task * out_f).enumerate().for_each(|(t, ys)| {
                let res = residual.map(|r| &r[t * per_task * out_f..][..ys.len()]);
                for (i, row) in ys.chunks_exact_mut(out_f).enumerate() {
                    match (res, &bias) {
                        (Some(r), b) => {
                            row.copy_from_slice(&r[i * out_f..(i + 1) * out_f]);
                            if let Some(b) = b {
                                kernels::add_rows(row, b);
                            }
                        }
                        (None, Some(b)) => row.copy_from_slice(b),
                        (None, None) => {}
                    }
                }
            });
        }
        let lhs = MatRef { data: x, rows, cols: in_f, row_stride: in_f, col_stride: 1 };
        if accumulate {
            matmul_add_into_parallel(&mut y, out_f, lhs, rhs);
        } else {
            matmul_into_parallel(&mut y, out_f, lhs, rhs);
        }
        if self.geglu {
            let half = out_f / 2;
            *dims.last_mut().expect("non-empty") = half;
            let mut out = vec![0f32; rows * half];
            out.par_chunks_mut(per_task * half).zip(y.par_chunks(per_task * out_f)).for_each(|(o, ys)| kernels::geglu_rows(ys, o, half));
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        *dims.last_mut().expect("non-empty") = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// The input's gradient `g @ w` (the weight is frozen: its gradient is never computed).
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.geglu || self.residual.is_some() {
            candle_core::bail!("linear-cpu: no backward through the fused GEGLU or residual (use the separate ops)");
        }
        let (out_f, in_f) = self.weight.dims2()?;
        let rows = arg.elem_count() / in_f.max(1);
        let g = grad.contiguous()?.reshape((rows, out_f))?;
        Ok(Some(g.matmul(&self.weight)?.reshape(arg.dims())?))
    }
}

/// Multi-head attention without a mask on `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, straight from and to that layout (see [`kernels::attention_rows`]).
pub struct AttentionCpu {
    pub heads: usize,
    pub scale: f32,
}

/// Keys × head width from which [`AttentionCpu`] takes gemm on query blocks: the register-tile
/// kernel streams every key and value per four queries, which is fast while they sit in L1/L2
/// (tiny-sd: 256 × 16) and bandwidth-bound beyond (SD 1.5 at 512²: 4096 × 40).
const GEMM_ATTENTION_MIN_KV: usize = 16 * 1024;

/// Query rows per gemm block: the block's scores (`rows × M`) stay in L2.
fn gemm_attention_rows(m: usize) -> usize {
    ((256 * 1024) / m.max(1)).clamp(8, 256)
}

impl AttentionCpu {
    /// Per image, head and block of queries: scores `Q·Kᵀ` by gemm into a scratch block, softmax
    /// with the scale folded in, then `P·V` by gemm straight into the output. Heads are read in
    /// place through strides; nothing is packed or copied by hand.
    fn forward_by_gemm(&self, q: &[f32], k: &[f32], v: &[f32], (b, n, m): (usize, usize, usize)) -> Vec<f32> {
        use crate::model::gemm::{MatRef, matmul_into};
        let (h, hd) = (self.heads, q.len() / (b * n).max(1));
        let d = hd / h;
        let rows = gemm_attention_rows(m);
        let mut out = vec![0f32; b * n * hd];
        // One task per block of query rows of one image, all heads: disjoint output rows.
        out.par_chunks_mut((n * hd).max(1)).enumerate().for_each(|(bi, img_out)| {
            img_out.par_chunks_mut((rows * hd).max(1)).enumerate().for_each(|(blk, o)| {
                let (i0, nq) = (blk * rows, o.len() / hd);
                let mut scores = vec![0f32; nq * m];
                for hi in 0..h {
                    let qv = MatRef { data: &q[(bi * n + i0) * hd + hi * d..], rows: nq, cols: d, row_stride: hd, col_stride: 1 };
                    let kt = MatRef { data: &k[bi * m * hd + hi * d..], rows: d, cols: m, row_stride: 1, col_stride: hd };
                    matmul_into(&mut scores, m, qv, kt);
                    kernels::softmax_rows(&mut scores, m, self.scale);
                    let p = MatRef { data: &scores, rows: nq, cols: m, row_stride: m, col_stride: 1 };
                    let vv = MatRef { data: &v[bi * m * hd + hi * d..], rows: m, cols: d, row_stride: hd, col_stride: 1 };
                    matmul_into(&mut o[hi * d..], hd, p, vv);
                }
            });
        });
        out
    }
}

impl candle_core::CustomOp3 for AttentionCpu {
    fn name(&self) -> &'static str {
        "attention-cpu"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (contiguous_f32(qs, ql, "attention")?, contiguous_f32(ks, kl, "attention")?, contiguous_f32(vs, vl, "attention")?);
        let (b, n, hd) = ql.shape().dims3()?;
        let (kb, m, khd) = kl.shape().dims3()?;
        if kb != b || khd != hd || vl.dims() != kl.dims() || hd == 0 || self.heads == 0 || hd % self.heads != 0 || m == 0 {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} for {} heads", ql.dims(), kl.dims(), vl.dims(), self.heads);
        }
        let (h, d) = (self.heads, hd / self.heads);
        if m * d >= GEMM_ATTENTION_MIN_KV {
            return Ok((CpuStorage::F32(self.forward_by_gemm(q, k, v, (b, n, m))), Shape::from((b, n, hd))));
        }
        let (mp, dp) = kernels::attention_padding(m, d);
        // Per (image, head): keys transposed and values, padded for the register tiles.
        let mut kt = vec![0f32; b * h * d * mp];
        let mut vp = vec![0f32; b * h * m * dp];
        kt.par_chunks_mut(d * mp).zip(vp.par_chunks_mut(m * dp)).enumerate().for_each(|(bh, (kt, vp))| {
            let (bi, hi) = (bh / h, bh % h);
            for j in 0..m {
                let at = (bi * m + j) * hd + hi * d;
                for (t, &x) in k[at..at + d].iter().enumerate() {
                    kt[t * mp + j] = x;
                }
                vp[j * dp..j * dp + d].copy_from_slice(&v[at..at + d]);
            }
        });
        let q: Vec<f32> = if self.scale == 1.0 { q.to_vec() } else { q.iter().map(|x| x * self.scale).collect() };
        let mut out = vec![0f32; b * n * hd];
        // Row runs of a multiple of the 4-query block, about four per thread per image.
        let rows = n.div_ceil(4 * rayon::current_num_threads().max(1)).max(16).next_multiple_of(4).min(n.max(1));
        out.par_chunks_mut((n * hd).max(1))
            .enumerate()
            .flat_map(|(bi, img)| img.par_chunks_mut((rows * hd).max(1)).enumerate().map(move |(c, o)| (bi, c * rows, o)))
            .for_each(|(bi, i0, o)| {
                let mut scratch = Vec::new();
                let nrows = o.len() / hd;
                for hi in 0..h {
                    let bh = bi * h + hi;
                    let kv = kernels::HeadKv { kt: &kt[bh * d * mp..][..d * mp], v: &vp[bh * m * dp..][..m * dp], m, m_pad: mp, d, d_pad: dp };
                    let qh = &q[(bi * n + i0) * hd + hi * d..];
                    kernels::attention_rows(qh, hd, nrows, &kv, &mut o[hi * d..], hd, &mut scratch);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, n, hd))))
    }

    /// Gradients to the queries, keys and values (those that need one). The probabilities are
    /// recomputed rather than kept from the forward pass; every batched product has a
    /// contiguous left operand (candle issue #3744).
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, hd) = q.dims3()?;
        let m = k.dim(1)?;
        let (h, d) = (self.heads, hd / self.heads);
        // [B, len, H·d] → [B, H, len, d]
        let split = |t: &Tensor, len: usize| t.detach().reshape((b, len, h, d))?.transpose(1, 2)?.contiguous();
        // [B, H, len, d] → [B, len, H·d], and the same from the transposed [B, H, d, len].
        let merge = |t: Tensor, len: usize| t.transpose(1, 2)?.contiguous()?.reshape((b, len, hd));
        let merge_t = |t: Tensor, len: usize| t.permute((0, 3, 1, 2))?.contiguous()?.reshape((b, len, hd));
        let (qh, kh, vh, gh) = (split(q, n)?, split(k, m)?, split(v, m)?, split(grad, n)?);
        let p = qh.matmul(&kh.t()?)?;
        p.inplace_op1(&SoftmaxCpu { scale: self.scale })?;
        // `pᵀ·g` as `(gᵀ·p)ᵀ`: transposing the small `[N, d]` operand instead of the `[N, M]` one.
        let dv = if v.track_op() { Some(merge_t(gh.t()?.contiguous()?.matmul(&p)?, m)?) } else { None };
        if !(q.track_op() || k.track_op()) {
            return Ok((None, None, dv));
        }
        let dp = gh.matmul(&vh.t()?)?;
        let ds = CustomOp1::bwd(&SoftmaxCpu { scale: self.scale }, &p, &p, &dp)?.expect("softmax has a backward pass");
        let dq = if q.track_op() { Some(merge(ds.matmul(&kh)?, n)?) } else { None };
        let dk = if k.track_op() { Some(merge_t(qh.t()?.contiguous()?.matmul(&ds)?, m)?) } else { None };
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, Var};

    use crate::model::nn::{GroupNorm, LayerNorm, Linear};
    use crate::model::params::{Params, WeightStore};

    fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
        let mut rng = crate::model::noise::Rng::new(seed);
        (crate::model::noise::randn(&mut rng, shape, &Device::Cpu).unwrap() * std).unwrap()
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
    }

    /// `f` (built for a dtype) at `x`: in f32 through the fused kernels and their backward
    /// passes, and in f64 through the composite form and candle's autograd (which
    /// tests/train.rs proves by finite differences). Returns the output difference and the
    /// input-gradient difference, each relative to the f64 value's largest magnitude. Also
    /// checks that the untracked f32 forward (inference) equals the tracked one.
    fn against_composite(x: &Tensor, f: impl Fn(DType) -> Box<dyn Fn(&Tensor) -> Tensor>) -> (f64, f64) {
        assert!(!crate::model::ops::generic_ops(), "the fused kernels must be on for this test");
        let run = |dtype: DType| {
            let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let y = f(dtype)(xv.as_tensor());
            assert!(y.track_op(), "{dtype:?}: the output must track the input");
            let cotangent = randn(y.dims(), 99, 1.0).to_dtype(dtype).unwrap();
            let grads = (&y * &cotangent).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(xv.as_tensor()).expect("an input gradient").clone())
        };
        let (y32, g32) = run(DType::F32);
        let (y64, g64) = run(DType::F64);
        let inference = f(DType::F32)(&x.to_dtype(DType::F32).unwrap());
        assert!(max_diff(&inference, &y32) <= 1e-6 * (1.0 + max_abs(&y64)), "inference and training forward passes differ");
        (max_diff(&y32, &y64) / max_abs(&y64).max(1e-12), max_diff(&g32, &g64) / max_abs(&g64).max(1e-12))
    }

    fn store(tensors: &[(&str, Tensor)], dtype: DType) -> WeightStore {
        let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
        WeightStore::from_tensors("<test>", map, dtype, &Device::Cpu)
    }

    #[test]
    fn group_norm_forward_and_backward_match_the_composite_form() {
        let (c, groups) = (8, 4);
        let (w, b) = (randn(&[c], 1, 1.0).affine(0.5, 1.0).unwrap(), randn(&[c], 2, 0.5));
        let x = randn(&[2, c, 5, 3], 3, 3.0).affine(1.0, 1.0).unwrap();
        for silu in [false, true] {
            let (dy, dg) = against_composite(&x, |dtype| {
                let st = store(&[("weight", w.clone()), ("bias", b.clone())], dtype);
                let gn = GroupNorm::load(&Params::root(&st, &Default::default()), groups, c, 1e-5).unwrap();
                Box::new(move |x| if silu { gn.forward_silu(x).unwrap() } else { gn.forward(x).unwrap() })
            });
            assert!(dy < 1e-5 && dg < 1e-5, "silu={silu}: output {dy:e}, gradient {dg:e}");
        }
    }

    #[test]
    fn layer_norm_forward_and_backward_match_the_composite_form() {
        let d = 24;
        let (w, b) = (randn(&[d], 4, 1.0), randn(&[d], 5, 0.5));
        let x = randn(&[2, 7, d], 6, 2.0).affine(1.0, -0.5).unwrap();
        let (dy, dg) = against_composite(&x, |dtype| {
            let st = store(&[("weight", w.clone()), ("bias", b.clone())], dtype);
            let ln = LayerNorm::load(&Params::root(&st, &Default::default()), d, 1e-5).unwrap();
            Box::new(move |x| ln.forward(x).unwrap())
        });
        assert!(dy < 1e-5 && dg < 1e-5, "output {dy:e}, gradient {dg:e}");
    }

    #[test]
    fn softmax_forward_and_backward_match_the_composite_form() {
        for (shape, scale) in [([3, 5, 7], 1.0), ([2, 9, 77], 0.25), ([1, 2, 300], 0.125)] {
            let x = randn(&shape, 7, 3.0);
            let (dy, dg) = against_composite(&x, |_| Box::new(move |x| crate::model::nn::softmax_last_scaled(x, scale).unwrap()));
            assert!(dy < 1e-5 && dg < 1e-5, "{shape:?}: output {dy:e}, gradient {dg:e}");
        }
        // Masked entries (-inf) get zero weight.
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &Device::Cpu).unwrap();
        let p = crate::model::nn::softmax_last(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p[0][1], 0.0);
        assert!((p[0][0] + p[0][2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn geglu_forward_and_backward_match_the_composite_form() {
        for shape in [[2, 3, 16], [1, 300, 64], [4, 1, 2]] {
            let x = randn(&shape, 8, 2.0);
            let (dy, dg) = against_composite(&x, |_| Box::new(|x| crate::model::nn::geglu(x).unwrap()));
            // The erf approximation is good to 1.5e-7 absolute.
            assert!(dy < 2e-6 && dg < 2e-6, "{shape:?}: output {dy:e}, gradient {dg:e}");
        }
    }

    #[test]
    fn linear_forward_and_backward_match_the_composite_form() {
        // Few rows (one product over the threads) and many (GEGLU in blocks, the last one short).
        for (rows, inp, out, bias) in [(7, 5, 6, true), (301, 64, 128, true), (3, 16, 8, false), (257, 32, 48, false)] {
            let w = randn(&[out, inp], 9, 0.3);
            let b = randn(&[out], 10, 1.0);
            let r = randn(&[2, rows, out], 11, 1.0);
            let x = randn(&[2, rows, inp], 12, 1.0);
            for case in ["plain", "residual", "geglu"] {
                let (dy, dg) = against_composite(&x, |dtype| {
                    let mut tensors = vec![("weight", w.clone())];
                    if bias {
                        tensors.push(("bias", b.clone()));
                    }
                    let st = store(&tensors, dtype);
                    let lin = Linear::load(&Params::root(&st, &Default::default()), inp, out, bias).unwrap();
                    let r = r.to_dtype(dtype).unwrap();
                    Box::new(move |x| match case {
                        "plain" => lin.forward(x).unwrap(),
                        "residual" => lin.forward_residual(x, &r).unwrap(),
                        _ => lin.forward_geglu(x).unwrap(),
                    })
                });
                assert!(dy < 1e-5 && dg < 1e-5, "{case}, rows {rows}: output {dy:e}, gradient {dg:e}");
            }
        }
    }

    #[test]
    fn attention_forward_and_backward_match_the_composite_form() {
        let q = randn(&[2, 4, 33, 16], 13, 1.0);
        let k = randn(&[2, 4, 20, 16], 14, 1.0);
        let v = randn(&[2, 4, 20, 16], 15, 1.0);
        let (dy, dg) = against_composite(&q, |dtype| {
            let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
            Box::new(move |q| crate::model::nn::attention(q, &k, &v, None).unwrap())
        });
        assert!(dy < 1e-5 && dg < 1e-5, "output {dy:e}, gradient {dg:e}");
    }

    #[test]
    fn multi_head_attention_gradients_to_queries_keys_and_values_match_the_composite_form() {
        for (b, n, m, heads, d) in [(2, 33, 20, 4, 16), (1, 7, 77, 2, 40), (2, 5, 1, 3, 3)] {
            let inputs = [randn(&[b, n, heads * d], 19, 1.0), randn(&[b, m, heads * d], 20, 1.0), randn(&[b, m, heads * d], 21, 1.0)];
            let cotangent = randn(&[b, n, heads * d], 22, 1.0);
            let run = |dtype: DType, tracked: [bool; 3]| -> Vec<Option<Tensor>> {
                let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
                let pick = |i: usize| if tracked[i] { vars[i].as_tensor().clone() } else { vars[i].as_tensor().detach() };
                let o = crate::model::nn::attention_heads(&pick(0), &pick(1), &pick(2), heads).unwrap();
                let grads = (&o * &cotangent.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
                vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect()
            };
            let want = run(DType::F64, [true; 3]);
            for tracked in [[true; 3], [true, false, false], [false, true, true], [false, false, true]] {
                let got = run(DType::F32, tracked);
                for i in 0..3 {
                    match (&got[i], tracked[i]) {
                        (Some(g), true) => {
                            let w = want[i].as_ref().unwrap();
                            // With one key the queries' gradient is exactly zero: an absolute floor.
                            let (diff, scale) = (max_diff(g, w), max_abs(w));
                            assert!(diff <= 1e-5 * scale + 1e-7, "b{b} n{n} m{m} h{heads}, input {i}: gradient off by {diff:e} (largest {scale:e})");
                        }
                        (None, false) => {}
                        (g, t) => panic!("input {i}: tracked {t} but gradient present {}", g.is_some()),
                    }
                }
            }
        }
    }

    #[test]
    fn fused_multi_head_attention_matches_the_composite_form() {
        // Odd sizes exercise the padding of keys, head dims and query blocks.
        // (2, 1100, 1000, 2, 20) and (3, 256, 256, 1, 64) take the gemm path (blocks of queries, the
        // last one partial); the others the register-tile kernel.
        for (b, n, m, heads, d) in [(2, 33, 20, 4, 16), (1, 7, 77, 2, 40), (3, 256, 256, 1, 64), (2, 5, 1, 3, 3), (2, 1100, 1000, 2, 20)] {
            let q = randn(&[b, n, heads * d], 16, 1.0);
            let k = randn(&[b, m, heads * d], 17, 1.0);
            let v = randn(&[b, m, heads * d], 18, 1.0);
            let (dy, dg) = against_composite(&q, |dtype| {
                let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
                Box::new(move |q| crate::model::nn::attention_heads(q, &k, &v, heads).unwrap())
            });
            assert!(dy < 1e-5 && dg < 1e-5, "b{b} n{n} m{m} h{heads}: output {dy:e}, gradient {dg:e}");
        }
    }
}
