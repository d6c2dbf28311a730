//! Fused CPU kernels for inference (no gradient): fewer passes over memory than the composite
//! candle ops they replace. Each has a composite twin that training and GPUs use, and a test
//! that the two agree.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

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
        let group_len = per_group * spatial;
        let (silu, eps, groups) = (self.silu, self.eps, self.groups);
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (o, xs))| {
            let g = i % groups;
            let n = xs.len() as f64;
            let (s, q) = kernels::moments(xs);
            let mean = s / n;
            let var = (q / n - mean * mean).max(0.0);
            let inv = 1.0 / (var + eps).sqrt();
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
        use candle_core::backend::BackendStorage;
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous input") };
        let (out_f, in_f) = self.weight.dims2()?;
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&in_f) {
            candle_core::bail!("linear: input {dims:?} for a weight of {out_f}x{in_f}");
        }
        let rows = (end - start) / in_f.max(1);
        let (w_store, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w_cpu) = &*w_store else { candle_core::bail!("linear: weight not on the CPU") };
        let Some((w_start, _)) = w_layout.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous weight") };
        // The weight read as its transpose `[in, out]`.
        let wt = Layout::new(Shape::from((in_f, out_f)), vec![1, in_f], w_start);
        let x = Layout::contiguous_with_offset((rows, in_f), start);
        let CpuStorage::F32(mut y) = storage.matmul(w_cpu, (1, rows, out_f, in_f), &x, &wt)? else {
            candle_core::bail!("linear: f32 only")
        };
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0f32; out_f],
        };
        let per_task = rows_per_task(rows, out_f, 16 * 1024);
        if self.geglu {
            let half = out_f / 2;
            *dims.last_mut().expect("non-empty") = half;
            let mut out = vec![0f32; rows * half];
            out.par_chunks_mut(per_task * half).zip(y.par_chunks_mut(per_task * out_f)).for_each(|(o, ys)| {
                for row in ys.chunks_exact_mut(out_f) {
                    kernels::add_rows(row, &bias);
                }
                kernels::geglu_rows(ys, o, half);
            });
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        *dims.last_mut().expect("non-empty") = out_f;
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual_guard {
            Some((store, l)) => {
                let candle_core::Storage::Cpu(CpuStorage::F32(r)) = &**store else { candle_core::bail!("linear: residual must be f32 on the CPU") };
                let Some((rs, re)) = l.contiguous_offsets() else { candle_core::bail!("linear: non-contiguous residual") };
                if re - rs != y.len() {
                    candle_core::bail!("linear: residual {:?} does not match the output {dims:?}", l.dims());
                }
                Some(&r[rs..re])
            }
            None => None,
        };
        y.par_chunks_mut(per_task * out_f).enumerate().for_each(|(t, ys)| {
            let res = residual.map(|r| &r[t * per_task * out_f..][..ys.len()]);
            for (i, row) in ys.chunks_exact_mut(out_f).enumerate() {
                kernels::add_rows(row, &bias);
                if let Some(r) = res {
                    kernels::add_rows(row, &r[i * out_f..(i + 1) * out_f]);
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// Multi-head attention without a mask on `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, straight from and to that layout (see [`kernels::attention_rows`]).
pub struct AttentionCpu {
    pub heads: usize,
    pub scale: f32,
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
        if kb != b || khd != hd || vl.dims() != kl.dims() || hd % self.heads != 0 || m == 0 {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} for {} heads", ql.dims(), kl.dims(), vl.dims(), self.heads);
        }
        let (h, d) = (self.heads, hd / self.heads);
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
        out.par_chunks_mut(n * hd)
            .enumerate()
            .flat_map(|(bi, img)| img.par_chunks_mut(rows * hd).enumerate().map(move |(c, o)| (bi, c * rows, o)))
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
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::model::nn::GroupNorm;
    use crate::model::params::{Params, WeightStore};

    #[test]
    fn fused_group_norm_matches_the_composite_form() {
        let store = WeightStore::random(3, candle_core::DType::F32, &Device::Cpu);
        let targets = Default::default();
        let p = Params::root(&store, &targets);
        let gn = GroupNorm::load(&p.pp("gn"), 4, 8, 1e-5).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 8, 5, 3), &Device::Cpu).unwrap().affine(3.0, 1.0).unwrap();
        // A Var input forces the composite (differentiable) path.
        let xv = Var::from_tensor(&x).unwrap();
        for silu in [false, true] {
            let fused = if silu { gn.forward_silu(&x).unwrap() } else { gn.forward(&x).unwrap() };
            let slow = if silu { gn.forward_silu(xv.as_tensor()).unwrap() } else { gn.forward(xv.as_tensor()).unwrap() };
            let d = (fused - slow).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "silu={silu}: {d}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_softmax_matches_the_composite_form() {
        for (shape, scale) in [((3, 5, 7), 1.0), ((2, 9, 77), 0.25), ((1, 2, 300), 0.125)] {
            let x = Tensor::randn(0f32, 3., shape, &Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let fused = crate::model::nn::softmax_last_scaled(&x, scale).unwrap();
            let slow = crate::model::nn::softmax_last_scaled(xv.as_tensor(), scale).unwrap();
            assert!(slow.track_op(), "the Var must take the composite path");
            let d = max_diff(&fused, &slow);
            assert!(d < 1e-6, "{shape:?}: {d}");
        }
        // Masked entries (-inf) get zero weight.
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &Device::Cpu).unwrap();
        let p = crate::model::nn::softmax_last(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p[0][1], 0.0);
        assert!((p[0][0] + p[0][2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fused_geglu_matches_the_composite_form() {
        for shape in [(2, 3, 16), (1, 300, 64), (4, 1, 2)] {
            let x = Tensor::randn(0f32, 2., shape, &Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let fused = crate::model::nn::geglu(&x).unwrap();
            let slow = crate::model::nn::geglu(xv.as_tensor()).unwrap();
            assert!(slow.track_op());
            assert_eq!(fused.dims(), slow.dims());
            // Relative to the largest output: products of two N(0, 2) values reach ~50.
            let scale = slow.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let d = max_diff(&fused, &slow);
            assert!(d < 1e-6 * (1.0 + scale), "{shape:?}: {d}");
        }
    }

    #[test]
    fn attention_with_folded_scale_matches_the_composite_form() {
        let q = Tensor::randn(0f32, 1., (2, 4, 33, 16), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 4, 20, 16), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 4, 20, 16), &Device::Cpu).unwrap();
        let fused = crate::model::nn::attention(&q, &k, &v, None).unwrap();
        let qv = Var::from_tensor(&q).unwrap();
        let slow = crate::model::nn::attention(qv.as_tensor(), &k, &v, None).unwrap();
        assert!(max_diff(&fused, &slow) < 1e-5);
    }

    #[test]
    fn fused_linear_matches_the_composite_form() {
        use crate::model::nn::Linear;
        let store = WeightStore::random(5, candle_core::DType::F32, &Device::Cpu);
        let targets = Default::default();
        let p = Params::root(&store, &targets);
        for (rows, inp, out, bias) in [(7, 5, 6, true), (300, 64, 128, true), (3, 16, 8, false)] {
            let lin = Linear::load(&p.pp(format!("l{rows}_{bias}")), inp, out, bias).unwrap();
            let x = Tensor::randn(0f32, 1., (2, rows, inp), &Device::Cpu).unwrap();
            let r = Tensor::randn(0f32, 1., (2, rows, out), &Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let pairs = [
                (lin.forward(&x).unwrap(), lin.forward(xv.as_tensor()).unwrap()),
                (lin.forward_residual(&x, &r).unwrap(), lin.forward_residual(xv.as_tensor(), &r).unwrap()),
                (lin.forward_geglu(&x).unwrap(), lin.forward_geglu(xv.as_tensor()).unwrap()),
            ];
            for (i, (fused, slow)) in pairs.iter().enumerate() {
                assert!(slow.track_op());
                assert_eq!(fused.dims(), slow.dims());
                assert!(max_diff(fused, slow) < 1e-5, "case {i} rows {rows}: {}", max_diff(fused, slow));
            }
        }
    }

    #[test]
    fn fused_multi_head_attention_matches_the_composite_form() {
        // Odd sizes exercise the padding of keys, head dims and query blocks.
        for (b, n, m, heads, d) in [(2, 33, 20, 4, 16), (1, 7, 77, 2, 40), (3, 256, 256, 1, 64), (2, 5, 1, 3, 3)] {
            let q = Tensor::randn(0f32, 1., (b, n, heads * d), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1., (b, m, heads * d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1., (b, m, heads * d), &Device::Cpu).unwrap();
            let fused = crate::model::nn::attention_heads(&q, &k, &v, heads).unwrap();
            let qv = Var::from_tensor(&q).unwrap();
            let slow = crate::model::nn::attention_heads(qv.as_tensor(), &k, &v, heads).unwrap();
            assert!(slow.track_op());
            assert_eq!(fused.dims(), slow.dims());
            let d = max_diff(&fused, &slow);
            assert!(d < 1e-5, "b{b} n{n} m{m} h{heads}: {d}");
        }
    }
}
