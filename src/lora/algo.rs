//! The adapter algorithms a LoRA file's modules may use, checked from their tensors, and the
//! weight update each one makes.
//!
//! | algorithm | tensors (kohya/LyCORIS names)                          | update ΔW (before the scale)              |
//! |-----------|--------------------------------------------------------|-------------------------------------------|
//! | LoRA/LoCon | `lora_down` `[r, in(, k, k)]`, `lora_up` `[out, r(, 1, 1)]` | `up · down`                          |
//! | LoCon + Tucker | `lora_down` `[r, in, 1, 1]`, `lora_mid` `[r, r, k, k]`, `lora_up` | `Σ up[o,p] mid[p,q] down[q,i]` |
//! | LoHa      | `hada_w1_a` `[out, r]`, `hada_w1_b` `[r, in·k·k]`, `hada_w2_*` | `(w1_a · w1_b) ⊙ (w2_a · w2_b)`      |
//! | LoHa + Tucker | `hada_t1` `[r, r, k, k]`, `hada_w1_a` `[r, out]`, `hada_w1_b` `[r, in]`, same for 2 | `tucker(t1, w1_a, w1_b) ⊙ tucker(t2, …)` |
//! | LoKr      | `lokr_w1` `[a, c]` or `lokr_w1_a·lokr_w1_b`; `lokr_w2` `[b, d(, k, k)]` or `lokr_w2_a·lokr_w2_b` or `tucker(lokr_t2, …)` | `w1 ⊗ w2` (`[a·b, c·d(, k, k)]`) |
//! | full      | `diff` (the weight's shape), `diff_b` `[out]`          | `diff`, and `diff_b` on the bias          |
//!
//! `tucker(t, a, b)[o, i, kh, kw] = Σ_{p,q} t[p, q, kh, kw] · a[p, o] · b[q, i]`: LyCORIS's
//! Tucker rebuild, where the core mixes the ranks and `a`, `b` map them to the output and input
//! channels.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Which algorithm a module uses (for messages and `inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// A low-rank pair (LoRA; LoCon on convolutions), with or without a Tucker core.
    Lora,
    LoHa,
    LoKr,
    /// A full-weight difference.
    Full,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Lora => "LoRA/LoCon",
            Algorithm::LoHa => "LoHa",
            Algorithm::LoKr => "LoKr",
            Algorithm::Full => "full diff",
        })
    }
}

/// One half of a LoKr update.
#[derive(Debug, Clone)]
pub enum KronHalf {
    /// The half as a whole matrix (`lokr_w1` `[a, c]`, `lokr_w2` `[b, d]` or `[b, d, k, k]`).
    Full(Tensor),
    /// `a @ b`: `[rows, r] @ [r, cols]` (`lokr_w2_b` may be `[r, d·k·k]`).
    Product { a: Tensor, b: Tensor },
    /// `tucker(t, a, b)` for the second half on a k×k convolution: `t [r, r, k, k]`, `a [r, rows]`, `b [r, cols]`.
    Tucker { t: Tensor, a: Tensor, b: Tensor },
}

impl KronHalf {
    /// The rank of a factorised half (`None` for a whole matrix).
    pub fn rank(&self) -> Option<usize> {
        match self {
            KronHalf::Full(_) => None,
            KronHalf::Product { b, .. } | KronHalf::Tucker { b, .. } => Some(b.dims()[0]),
        }
    }

    /// The shape of the half once rebuilt: `[rows, cols]` or `[rows, cols, k, k]`.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            KronHalf::Full(w) => w.dims().to_vec(),
            KronHalf::Product { a, b } => vec![a.dims()[0], b.dims()[1]],
            KronHalf::Tucker { t, a, b } => vec![a.dims()[1], b.dims()[1], t.dims()[2], t.dims()[3]],
        }
    }

    fn rebuild(&self) -> Result<Tensor> {
        match self {
            KronHalf::Full(w) => Ok(w.clone()),
            KronHalf::Product { a, b } => Ok(a.matmul(b)?),
            KronHalf::Tucker { t, a, b } => tucker(t, a, b),
        }
    }

    fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(match self {
            KronHalf::Full(w) => KronHalf::Full(w.to_device(device)?),
            KronHalf::Product { a, b } => KronHalf::Product { a: a.to_device(device)?, b: b.to_device(device)? },
            KronHalf::Tucker { t, a, b } => KronHalf::Tucker { t: t.to_device(device)?, a: a.to_device(device)?, b: b.to_device(device)? },
        })
    }
}

/// A module's tensors, by algorithm, checked against each other (not yet against a layer).
#[derive(Debug, Clone)]
pub enum AdapterWeights {
    /// `down [r, in(, k, k)]`, `up [out, r(, 1, 1)]`; with `mid [r, r, k, k]` the down matrix is
    /// `[r, in(, 1, 1)]` and the kernel is the core's.
    LowRank { down: Tensor, up: Tensor, mid: Option<Tensor> },
    /// Without Tucker cores: `w1a [out, r]`, `w1b [r, in·k·k]`, likewise `w2a`, `w2b`. With them
    /// (`t1`, `t2` `[r, r, k, k]`): `w1a [r, out]`, `w1b [r, in]`.
    Hadamard { w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t: Option<(Tensor, Tensor)> },
    Kronecker { w1: KronHalf, w2: KronHalf },
    Full { diff: Option<Tensor>, diff_b: Option<Tensor> },
}

impl AdapterWeights {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            AdapterWeights::LowRank { .. } => Algorithm::Lora,
            AdapterWeights::Hadamard { .. } => Algorithm::LoHa,
            AdapterWeights::Kronecker { .. } => Algorithm::LoKr,
            AdapterWeights::Full { .. } => Algorithm::Full,
        }
    }

    /// Whether the update is built through a Tucker core.
    pub fn has_tucker(&self) -> bool {
        match self {
            AdapterWeights::LowRank { mid, .. } => mid.is_some(),
            AdapterWeights::Hadamard { t, .. } => t.is_some(),
            AdapterWeights::Kronecker { w2, .. } => matches!(w2, KronHalf::Tucker { .. }),
            AdapterWeights::Full { .. } => false,
        }
    }

    /// The rank that divides alpha, where the algorithm has one: LoRA's and LoHa's rank; LoKr's
    /// first factorised half (w1's rank, else w2's); none for a full diff or a LoKr with two
    /// whole halves.
    pub fn rank(&self) -> Option<usize> {
        match self {
            AdapterWeights::LowRank { down, .. } => Some(down.dims()[0]),
            AdapterWeights::Hadamard { w1b, .. } => Some(w1b.dims()[0]),
            AdapterWeights::Kronecker { w1, w2 } => w1.rank().or(w2.rank()),
            AdapterWeights::Full { .. } => None,
        }
    }

    /// The shape of the update: `[out, in_total]` for 2-D forms, `[out, in, k, k]` where a
    /// Tucker core, a 4-D LoKr half or a 4-D diff fixes the kernel. `None` for a bias-only diff.
    pub fn update_dims(&self) -> Option<Vec<usize>> {
        let flat = |out: usize, t: &Tensor| vec![out, t.elem_count() / t.dims()[0]];
        match self {
            AdapterWeights::LowRank { down, up, mid: None } => Some(vec![up.dims()[0], down.elem_count() / down.dims()[0]]),
            AdapterWeights::LowRank { down, up, mid: Some(m) } => {
                Some(vec![up.dims()[0], down.elem_count() / down.dims()[0], m.dims()[2], m.dims()[3]])
            }
            AdapterWeights::Hadamard { w1a, w1b, t: None, .. } => Some(flat(w1a.dims()[0], w1b)),
            AdapterWeights::Hadamard { w1a, w1b, t: Some((t1, _)), .. } => Some(vec![w1a.dims()[1], w1b.dims()[1], t1.dims()[2], t1.dims()[3]]),
            AdapterWeights::Kronecker { w1, w2 } => {
                let (d1, d2) = (w1.dims(), w2.dims());
                let mut d = vec![d1[0] * d2[0], d1[1] * d2[1]];
                d.extend_from_slice(&d2[2..]);
                Some(d)
            }
            AdapterWeights::Full { diff, .. } => diff.as_ref().map(|t| t.dims().to_vec()),
        }
    }

    /// The bias update's length, for a full diff with `diff_b`.
    pub fn bias_len(&self) -> Option<usize> {
        match self {
            AdapterWeights::Full { diff_b: Some(b), .. } => Some(b.elem_count()),
            _ => None,
        }
    }

    /// The update ΔW in [`Self::update_dims`] (unscaled, f32), or `None` for a bias-only diff.
    pub fn update(&self) -> Result<Option<Tensor>> {
        Ok(Some(match self {
            AdapterWeights::LowRank { down, up, mid: None } => {
                let rank = down.dims()[0];
                let up2 = up.reshape((up.dims()[0], up.elem_count() / up.dims()[0]))?;
                up2.matmul(&down.reshape((rank, down.elem_count() / rank))?)?
            }
            AdapterWeights::LowRank { down, up, mid: Some(mid) } => {
                let rank = down.dims()[0];
                let out = up.dims()[0];
                // LoCon's core sits between down and up: a = upᵀ maps its output rank to the
                // layer's outputs, b = down its input rank to the layer's inputs.
                let a = up.reshape((out, up.elem_count() / out))?.t()?.contiguous()?;
                tucker(mid, &a, &down.reshape((rank, down.elem_count() / rank))?)?
            }
            AdapterWeights::Hadamard { w1a, w1b, w2a, w2b, t: None } => (w1a.matmul(w1b)? * w2a.matmul(w2b)?)?,
            AdapterWeights::Hadamard { w1a, w1b, w2a, w2b, t: Some((t1, t2)) } => (tucker(t1, w1a, w1b)? * tucker(t2, w2a, w2b)?)?,
            AdapterWeights::Kronecker { w1, w2 } => kron(&w1.rebuild()?, &w2.rebuild()?)?,
            AdapterWeights::Full { diff: Some(d), .. } => d.clone(),
            AdapterWeights::Full { diff: None, .. } => return Ok(None),
        }))
    }

    /// The same tensors on `device` (f32 stays f32).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        let opt = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(match self {
            AdapterWeights::LowRank { down, up, mid } => AdapterWeights::LowRank { down: mv(down)?, up: mv(up)?, mid: opt(mid)? },
            AdapterWeights::Hadamard { w1a, w1b, w2a, w2b, t } => AdapterWeights::Hadamard {
                w1a: mv(w1a)?,
                w1b: mv(w1b)?,
                w2a: mv(w2a)?,
                w2b: mv(w2b)?,
                t: match t {
                    Some((t1, t2)) => Some((mv(t1)?, mv(t2)?)),
                    None => None,
                },
            },
            AdapterWeights::Kronecker { w1, w2 } => AdapterWeights::Kronecker { w1: w1.to_device(device)?, w2: w2.to_device(device)? },
            AdapterWeights::Full { diff, diff_b } => AdapterWeights::Full { diff: opt(diff)?, diff_b: opt(diff_b)? },
        })
    }

    /// The tensors, in the order of their roles ([`super::keys::Role`]), which is the order of
    /// a module's `keys`.
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            AdapterWeights::LowRank { down, up, mid } => [Some(down), Some(up), mid.as_ref()].into_iter().flatten().collect(),
            AdapterWeights::Hadamard { w1a, w1b, w2a, w2b, t } => {
                let mut v = vec![w1a, w1b, w2a, w2b];
                if let Some((t1, t2)) = t {
                    v.extend([t1, t2]);
                }
                v
            }
            AdapterWeights::Kronecker { w1, w2 } => [w1, w2]
                .into_iter()
                .flat_map(|h| match h {
                    KronHalf::Full(w) => vec![w],
                    KronHalf::Product { a, b } => vec![a, b],
                    KronHalf::Tucker { t, a, b } => vec![a, b, t],
                })
                .collect(),
            AdapterWeights::Full { diff, diff_b } => [diff.as_ref(), diff_b.as_ref()].into_iter().flatten().collect(),
        }
    }
}

/// Which axis DoRA's magnitude lies along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoraAxis {
    /// One magnitude per output channel (PEFT; LyCORIS's default `wd_on_out`): the norm of each
    /// output row of the weight.
    Output,
    /// One magnitude per input channel (older LyCORIS and kohya files, `[1, in, …]`): the norm of
    /// each input column.
    Input,
}

/// DoRA's learned magnitude: the merged weight's direction is kept, its norms replaced.
#[derive(Debug, Clone)]
pub struct Dora {
    /// One value per output (or input) channel, flat.
    pub magnitude: Tensor,
    pub axis: DoraAxis,
}

impl Dora {
    /// `m ⊙ V / ‖V‖ − W` for `V = W + ΔW`: the change DoRA makes to `base` at full strength, the
    /// norms taken per output row (or input column) of V, recomputed from the merged weight as
    /// PEFT and LyCORIS do. `base` and `scaled_update` are f32 in the weight's shape. A row whose
    /// norm is zero stays zero (LyCORIS's epsilon in the denominator).
    pub fn delta(&self, base: &Tensor, scaled_update: &Tensor) -> Result<Tensor> {
        let merged = (base + scaled_update)?;
        let dims = merged.dims().to_vec();
        let (rows, cols) = match self.axis {
            DoraAxis::Output => (dims[0], merged.elem_count() / dims[0]),
            DoraAxis::Input => (dims[1], merged.elem_count() / dims[1]),
        };
        // Rows of `by_channel` are the channels the magnitude belongs to.
        let by_channel = match self.axis {
            DoraAxis::Output => merged.reshape((rows, cols))?,
            DoraAxis::Input => merged.transpose(0, 1)?.contiguous()?.reshape((rows, cols))?,
        };
        let norm = (by_channel.sqr()?.sum_keepdim(1)?.sqrt()? + f32::EPSILON as f64)?;
        let factor = self.magnitude.reshape((rows, 1))?.to_dtype(DType::F32)?.broadcast_div(&norm)?;
        let scaled = by_channel.broadcast_mul(&factor)?;
        let scaled = match self.axis {
            DoraAxis::Output => scaled.reshape(dims)?,
            DoraAxis::Input => {
                let mut t_dims = dims.clone();
                t_dims.swap(0, 1);
                scaled.reshape(t_dims)?.transpose(0, 1)?.contiguous()?
            }
        };
        Ok((scaled - base)?)
    }
}

/// `tucker(t, a, b)[o, i, kh, kw] = Σ_{p,q} t[p, q, kh, kw] · a[p, o] · b[q, i]`, for `t [p, q, k, k]`,
/// `a [p, out]`, `b [q, in]`.
pub fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q, kh, kw) = t.dims4()?;
    let out = a.dims()[1];
    let inp = b.dims()[1];
    if a.dims()[0] != p || b.dims()[0] != q {
        return Err(Error::invalid(format!("Tucker core {:?} does not fit factors {:?} and {:?}", t.dims(), a.dims(), b.dims())));
    }
    // [out, p] @ [p, q·k·k] → [out, q, k·k] → [out, k·k, q] @ [q, in] → [out, k·k, in] → [out, in, k, k].
    let left = a.t()?.contiguous()?.matmul(&t.reshape((p, q * kh * kw))?)?;
    let left = left.reshape((out, q, kh * kw))?.transpose(1, 2)?.contiguous()?.reshape((out * kh * kw, q))?;
    let full = left.matmul(b)?.reshape((out, kh * kw, inp))?.transpose(1, 2)?.contiguous()?;
    Ok(full.reshape((out, inp, kh, kw))?)
}

/// The Kronecker product of `w1 [a, c]` and `w2 [b, d, …]`: `[a·b, c·d, …]`, where entry
/// `[i·b + j, p·d + q, …]` is `w1[i, p] · w2[j, q, …]` (torch.kron with w1's trailing dims 1).
pub fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let d2 = w2.dims().to_vec();
    let (b, rest) = (d2[0], w2.elem_count() / d2[0]);
    // [a, 1, c, 1] ⊙ [1, b, 1, rest] → [a, b, c, rest]; rows i·b + j, columns p·rest + s.
    let prod = w1.reshape((a, 1, c, 1))?.broadcast_mul(&w2.reshape((1, b, 1, rest))?)?;
    let mut dims = vec![a * b, c * d2[1]];
    dims.extend_from_slice(&d2[2..]);
    Ok(prod.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::noise::seeded_randn as randn;

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn tucker_is_the_sum_over_both_ranks() {
        let (t, a, b) = (randn(&[2, 3, 3, 3], 1), randn(&[2, 5], 2), randn(&[3, 4], 3));
        let got = v(&tucker(&t, &a, &b).unwrap());
        let (tv, av, bv) = (v(&t), v(&a), v(&b));
        for o in 0..5 {
            for i in 0..4 {
                for k in 0..9 {
                    let mut want = 0.0f32;
                    for p in 0..2 {
                        for q in 0..3 {
                            want += tv[(p * 3 + q) * 9 + k] * av[p * 5 + o] * bv[q * 4 + i];
                        }
                    }
                    let g = got[(o * 4 + i) * 9 + k];
                    assert!((g - want).abs() < 1e-5, "[{o},{i},{k}]: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn kron_places_w2_blocks_scaled_by_w1() {
        let (w1, w2) = (randn(&[2, 3], 4), randn(&[4, 5, 3, 3], 5));
        let got = kron(&w1, &w2).unwrap();
        assert_eq!(got.dims(), &[8, 15, 3, 3]);
        let (g, a, b) = (v(&got), v(&w1), v(&w2));
        for i in 0..2 {
            for j in 0..4 {
                for p in 0..3 {
                    for q in 0..5 {
                        for k in 0..9 {
                            let want = a[i * 3 + p] * b[(j * 5 + q) * 9 + k];
                            assert_eq!(g[((i * 4 + j) * 15 + p * 5 + q) * 9 + k], want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn locon_with_a_core_equals_down_then_core_then_up() {
        // The merged kernel of down (1×1) → mid (3×3) → up (1×1), applied as one convolution,
        // equals the three convolutions in a row.
        let (down, mid, up) = (randn(&[2, 3, 1, 1], 6), randn(&[2, 2, 3, 3], 7), randn(&[4, 2, 1, 1], 8));
        let w = AdapterWeights::LowRank { down: down.clone(), up: up.clone(), mid: Some(mid.clone()) }.update().unwrap().unwrap();
        assert_eq!(w.dims(), &[4, 3, 3, 3]);
        let x = randn(&[1, 3, 6, 6], 9);
        let merged = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        let seq = x.conv2d(&down, 0, 1, 1, 1).unwrap().conv2d(&mid, 1, 1, 1, 1).unwrap().conv2d(&up, 0, 1, 1, 1).unwrap();
        let d = (merged - seq).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn dora_keeps_the_direction_and_takes_the_magnitude() {
        let base = randn(&[3, 4], 10);
        let upd = (randn(&[3, 4], 11) * 0.1).unwrap();
        for axis in [DoraAxis::Output, DoraAxis::Input] {
            let n = if axis == DoraAxis::Output { 3 } else { 4 };
            let m = Tensor::from_vec((1..=n).map(|i| i as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
            let d = Dora { magnitude: m, axis }.delta(&base, &upd).unwrap();
            let w = (&base + &d).unwrap();
            let v_ = (&base + &upd).unwrap();
            let (w, v_) = if axis == DoraAxis::Output { (w, v_) } else { (w.t().unwrap(), v_.t().unwrap()) };
            let (wr, vr) = (w.to_vec2::<f32>().unwrap(), v_.to_vec2::<f32>().unwrap());
            for (c, (wr, vr)) in wr.iter().zip(&vr).enumerate() {
                let norm = wr.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - (c + 1) as f32).abs() < 1e-5, "{axis:?} channel {c}: norm {norm}");
                let vn = vr.iter().map(|x| x * x).sum::<f32>().sqrt();
                for (a, b) in wr.iter().zip(vr) {
                    assert!((a / norm - b / vn).abs() < 1e-5, "{axis:?}: the direction changed");
                }
            }
        }
    }
}
