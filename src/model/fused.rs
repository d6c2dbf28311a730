//! Fused CPU kernels for inference (no gradient): fewer passes over memory than the composite
//! candle ops they replace. Each has a composite twin that training and GPUs use, and a test
//! that the two agree.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

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
        let silu = self.silu;
        let eps = self.eps;
        let groups = self.groups;
        use rayon::prelude::*;
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (o, xs))| {
            let g = i % groups;
            let n = xs.len() as f64;
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for cc in 0..per_group {
                let ch = g * per_group + cc;
                let scale = (w[ch] as f64 * inv) as f32;
                let shift = (bias[ch] as f64 - mean * w[ch] as f64 * inv) as f32;
                let src = &xs[cc * spatial..(cc + 1) * spatial];
                let dst = &mut o[cc * spatial..(cc + 1) * spatial];
                if silu {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        let y = v * scale + shift;
                        *d = y / (1.0 + (-y).exp());
                    }
                } else {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v * scale + shift;
                    }
                }
            }
        });
        let _ = b;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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
}
