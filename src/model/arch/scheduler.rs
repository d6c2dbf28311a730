//! Noise schedules and samplers behind one trait.
//!
//! The noise schedule (betas) comes from the model's `scheduler_config.json`, whatever sampler
//! class it names (SD 1.5 ships PNDM); the sampler is the user's choice. DDIM (eta 0) matches
//! diffusers' `DDIMScheduler` step for step; Euler matches `EulerDiscreteScheduler`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The fields of `scheduler_config.json` that define the schedule.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ScheduleConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default = "leading")]
    pub timestep_spacing: String,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn leading() -> String {
    "leading".into()
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// The discretised diffusion process: cumulative alphas per training timestep.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub config: ScheduleConfig,
}

impl NoiseSchedule {
    pub fn new(config: &ScheduleConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(Error::invalid("scheduler: num_train_timesteps must be at least 2"));
        }
        let betas: Vec<f64> = match config.beta_schedule.as_str() {
            "scaled_linear" => {
                let (a, b) = (config.beta_start.sqrt(), config.beta_end.sqrt());
                (0..n).map(|i| (a + (b - a) * i as f64 / (n - 1) as f64).powi(2)).collect()
            }
            "linear" => (0..n)
                .map(|i| config.beta_start + (config.beta_end - config.beta_start) * i as f64 / (n - 1) as f64)
                .collect(),
            other => return Err(Error::invalid(format!("scheduler: beta_schedule `{other}` is not supported"))),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return Err(Error::invalid(format!("scheduler: prediction_type `{other}` is not supported"))),
        };
        Ok(NoiseSchedule { alphas_cumprod, prediction, config: config.clone() })
    }

    /// Inference timesteps, descending, as diffusers' `set_timesteps` with the config's spacing.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let n = self.config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::invalid(format!("steps must be between 1 and {n}, got {steps}")));
        }
        let ts: Vec<usize> = match self.config.timestep_spacing.as_str() {
            "leading" => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| i * ratio + self.config.steps_offset).collect()
            }
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                let mut v: Vec<usize> = (1..=steps).map(|i| ((i as f64 * ratio).round() as usize).saturating_sub(1)).collect();
                v.reverse();
                v
            }
            "linspace" => (0..steps)
                .rev()
                .map(|i| if steps == 1 { 0 } else { (i as f64 * (n - 1) as f64 / (steps - 1) as f64).round() as usize })
                .collect(),
            other => return Err(Error::invalid(format!("scheduler: timestep_spacing `{other}` is not supported"))),
        };
        Ok(ts.into_iter().map(|t| t.min(n - 1)).collect())
    }

    /// `(sqrt(ā_t), sqrt(1 − ā_t))` per item, shaped `[n, 1, 1, 1]` to broadcast over latents.
    fn signal_noise_scales(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, b): (Vec<f32>, Vec<f32>) = timesteps
            .iter()
            .map(|&t| {
                let ac = self.alphas_cumprod[t];
                (ac.sqrt() as f32, (1.0 - ac).sqrt() as f32)
            })
            .unzip();
        let n = timesteps.len();
        let to = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, 1, 1, 1), like.device())?.to_dtype(like.dtype())?) };
        Ok((to(a)?, to(b)?))
    }

    /// Noises clean latents for training: `sqrt(ā_t) x0 + sqrt(1 - ā_t) ε`, one `t` per item.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, b) = self.signal_noise_scales(timesteps, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// The training target for a prediction type.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::Sample => Ok(x0.clone()),
            Prediction::VPrediction => {
                // v = sqrt(ā) ε − sqrt(1 − ā) x0
                let (a, b) = self.signal_noise_scales(timesteps, x0)?;
                Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?)
            }
        }
    }

    /// (x0, ε) from the model output at timestep `t`.
    fn split(&self, x: &Tensor, out: &Tensor, t: usize) -> Result<(Tensor, Tensor)> {
        let ac = self.alphas_cumprod[t];
        let (sa, sb) = (ac.sqrt(), (1.0 - ac).sqrt());
        Ok(match self.prediction {
            Prediction::Epsilon => (((x - (out * sb)?)? / sa)?, out.clone()),
            Prediction::Sample => (out.clone(), ((x - (out * sa)?)? / sb)?),
            Prediction::VPrediction => (((x * sa)? - (out * sb)?)?, ((out * sa)? + (x * sb)?)?),
        })
    }
}

/// A sampler walks from noise to a clean latent, one model evaluation per step.
pub trait Sampler {
    /// The timesteps at which the model is evaluated, in order.
    fn timesteps(&self) -> &[usize];
    /// Scales the initial noise (1 for DDIM, σ_max for Euler).
    fn init_noise_sigma(&self) -> f64;
    /// Scales the model input at step `i` (identity for DDIM).
    fn scale_input(&self, x: &Tensor, i: usize) -> Result<Tensor>;
    /// One step from the model output at step `i`.
    fn step(&self, x: &Tensor, model_out: &Tensor, i: usize) -> Result<Tensor>;
}

/// Which sampler a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    #[default]
    Ddim,
    Euler,
}

impl SamplerKind {
    pub fn name(&self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler" => Ok(SamplerKind::Euler),
            other => Err(Error::invalid(format!("unknown sampler `{other}` (known: ddim, euler)"))),
        }
    }

    pub fn build(&self, schedule: &NoiseSchedule, steps: usize) -> Result<Box<dyn Sampler>> {
        Ok(match self {
            SamplerKind::Ddim => Box::new(Ddim::new(schedule, steps)?),
            SamplerKind::Euler => Box::new(Euler::new(schedule, steps)?),
        })
    }
}

/// Deterministic DDIM (eta 0).
pub struct Ddim {
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    step_ratio: usize,
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        Ok(Ddim {
            schedule: schedule.clone(),
            timesteps: schedule.timesteps(steps)?,
            step_ratio: schedule.config.num_train_timesteps / steps,
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn step(&self, x: &Tensor, out: &Tensor, i: usize) -> Result<Tensor> {
        let t = self.timesteps[i];
        // diffusers: prev = t - num_train_timesteps // steps, whatever the spacing.
        let prev = t as i64 - self.step_ratio as i64;
        let ac_prev = if prev >= 0 {
            self.schedule.alphas_cumprod[prev as usize]
        } else if self.schedule.config.set_alpha_to_one {
            1.0
        } else {
            self.schedule.alphas_cumprod[0]
        };
        let (x0, eps) = self.schedule.split(x, out, t)?;
        Ok(((x0 * ac_prev.sqrt())? + (eps * (1.0 - ac_prev).sqrt())?)?)
    }
}

/// Euler (Karras et al. 2022, Algorithm 2 without churn), diffusers' `EulerDiscreteScheduler`.
pub struct Euler {
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    sigmas: Vec<f64>,
}

impl Euler {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        let timesteps = schedule.timesteps(steps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let ac = schedule.alphas_cumprod[t];
                ((1.0 - ac) / ac).sqrt()
            })
            .collect();
        sigmas.push(0.0);
        Ok(Euler { schedule: schedule.clone(), timesteps, sigmas })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        let s = self.sigmas[0];
        match self.schedule.config.timestep_spacing.as_str() {
            "linspace" | "trailing" => s,
            _ => (s * s + 1.0).sqrt(),
        }
    }
    fn scale_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        Ok((x / (s * s + 1.0).sqrt())?)
    }
    fn step(&self, x: &Tensor, out: &Tensor, i: usize) -> Result<Tensor> {
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = match self.schedule.prediction {
            Prediction::Epsilon => (x - (out * s)?)?,
            Prediction::VPrediction => ((out * (-s / (s * s + 1.0).sqrt()))? + (x / (s * s + 1.0))?)?,
            Prediction::Sample => out.clone(),
        };
        let d = ((x - &x0)? / s)?;
        Ok((x + (d * (s_next - s))?)?)
    }
}
