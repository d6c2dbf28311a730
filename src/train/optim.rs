//! The optimiser side of training: AdamW with decoupled weight decay, a learning-rate schedule
//! (linear warm-up, then cosine or constant), and clipping of the global gradient norm.
//!
//! Written out here rather than taken from candle-nn so that every formula is visible and
//! tested: the update is Loshchilov & Hutter's AdamW (weight decay applied to the parameter
//! directly, scaled by the learning rate, not added to the gradient), with bias-corrected
//! moments as in PyTorch's `torch.optim.AdamW`.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // PyTorch's defaults.
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW over a fixed list of variables; moments live on the variables' device.
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (the `t` of the bias correction).
    t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW { config, vars, m, v, t: 0 })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(format!("AdamW: {} gradients for {} variables", grads.len(), self.vars.len())));
        }
        self.t += 1;
        let c = self.config;
        let t = self.t as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, g) in grads.iter().enumerate() {
            let theta = self.vars[i].as_tensor();
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            // θ ← θ (1 − lr λ) − lr m̂ / (√v̂ + ε)
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (theta * (1.0 - lr * c.weight_decay))?;
            let next = (decayed - (update * lr)?)?;
            self.vars[i].set(&next.detach())?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Half a cosine from the peak down to `min_lr` at the last step.
    Cosine,
    /// The peak until the end.
    Constant,
}

impl ScheduleKind {
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
        }
    }
}

/// The learning rate of every step: linear warm-up to `peak`, then [`ScheduleKind`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub min: f64,
    pub warmup: usize,
    pub total: usize,
}

impl LrSchedule {
    /// The rate for step `step` (0-based). Warm-up reaches the peak on its last step, so the
    /// first step never uses a rate of zero (a wasted step).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Cosine => {
                let span = self.total.saturating_sub(self.warmup).saturating_sub(1);
                if span == 0 {
                    return self.peak;
                }
                let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
                self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The L2 norm of all gradients together (computed in f64 on the host for stability).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        sum += s as f64;
    }
    Ok(sum.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_written_out_formula() {
        let theta0 = [0.5f64, -1.5, 2.0];
        let var = Var::from_tensor(&Tensor::new(&[0.5f32, -1.5, 2.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![var.clone()], cfg).unwrap();
        let (mut th, mut m, mut v) = (theta0.to_vec(), [0.0f64; 3], [0.0f64; 3]);
        for t in 1..=5 {
            // Gradient of 0.5 * sum(θ²) * k: kθ.
            let k = t as f64 * 0.7;
            let g: Vec<f64> = th.iter().map(|x| k * x).collect();
            let lr = 0.05;
            let gt = Tensor::new(g.iter().map(|&x| x as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
            opt.step(&[gt], lr).unwrap();
            for i in 0..3 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                th[i] = th[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
            let got = var.as_tensor().to_vec1::<f32>().unwrap();
            for i in 0..3 {
                assert!((got[i] as f64 - th[i]).abs() < 1e-5, "step {t} entry {i}: {} vs {}", got[i], th[i]);
            }
        }
        assert_eq!(opt.steps_done(), 5);
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        // With a zero gradient Adam's update is zero, so only the decay moves θ: θ(1 − lr λ).
        let var = Var::from_tensor(&Tensor::new(&[2.0f32], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], AdamWConfig { weight_decay: 0.5, ..Default::default() }).unwrap();
        opt.step(&[Tensor::new(&[0.0f32], &Device::Cpu).unwrap()], 0.1).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 2.0 * (1.0 - 0.05)).abs() < 1e-6, "{got}");
    }

    #[test]
    fn cosine_schedule_warms_up_peaks_and_decays_to_the_floor() {
        let s = LrSchedule { kind: ScheduleKind::Cosine, peak: 1e-3, min: 1e-5, warmup: 10, total: 110 };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(4) - 5e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12, "the first step after warm-up is the peak");
        assert!((s.at(109) - 1e-5).abs() < 1e-12, "the last step reaches the floor");
        let mid = s.at(10 + 99 / 2);
        assert!((mid - (1e-5 + (1e-3 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI * 49.0 / 99.0).cos()))).abs() < 1e-12);
        for i in 10..109 {
            assert!(s.at(i + 1) <= s.at(i), "decreasing after warm-up");
        }
        let c = LrSchedule { kind: ScheduleKind::Constant, peak: 2e-4, min: 0.0, warmup: 0, total: 5 };
        assert!((0..5).all(|i| c.at(i) == 2e-4));
    }

    #[test]
    fn clipping_scales_to_the_limit_and_reports_the_norm_before() {
        let mut g = vec![Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-5, "below the limit nothing changes");
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
