//! The trainable LoRA network: one down/up pair per targeted UNet layer, attached to the
//! model as *live* adapters (they run unmerged in the forward pass, so gradients reach them).
//!
//! Initialisation follows PEFT and kohya: `up` (B) is zero, so training starts exactly at the
//! base model; `down` (A) is uniform in ±1/√fan_in (PyTorch's default `nn.Linear` init, which
//! both use). The forward pass adds `scale · up(down(x))` with `scale = alpha / rank`.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::lora::export::ExportModule;
use crate::lora::keys::Component;
use crate::model::adapters::{AdaptableLayer, AdapterTargets, LayerKind, LiveAdapter};
use crate::model::noise::Rng;

/// One trained module.
#[derive(Debug, Clone)]
pub struct TrainModule {
    /// The registry key: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub key: String,
    pub layer: Arc<AdaptableLayer>,
    /// `[rank, in]` or `[rank, in, k, k]`.
    pub down: Var,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: Var,
}

impl TrainModule {
    /// The module path inside the UNet (the key without `unet.`).
    pub fn path(&self) -> &str {
        self.key.strip_prefix("unet.").unwrap_or(&self.key)
    }
}

/// All trained modules, of one rank and alpha.
#[derive(Debug, Clone)]
pub struct Network {
    pub modules: Vec<TrainModule>,
    pub rank: usize,
    pub alpha: f64,
}

/// Whether a module path is one a target suffix names: the whole path, or its last
/// dot-separated components (`to_out.0` names `….attn1.to_out.0`, never `….to_out.10`).
pub fn matches_target(path: &str, suffix: &str) -> bool {
    path == suffix || path.strip_suffix(suffix).is_some_and(|head| head.ends_with('.'))
}

/// The short names a target list can use, for error messages: each layer's last component,
/// or its last two when the last is a number (`to_out.0`).
pub fn target_names(targets: &AdapterTargets) -> Vec<String> {
    let mut names = BTreeSet::new();
    for (key, _) in targets.iter() {
        let Some(path) = key.strip_prefix("unet.") else { continue };
        let parts: Vec<&str> = path.split('.').collect();
        let n = parts.len();
        let name = if n >= 2 && parts[n - 1].bytes().all(|b| b.is_ascii_digit()) {
            format!("{}.{}", parts[n - 2], parts[n - 1])
        } else {
            parts[n - 1].to_string()
        };
        names.insert(name);
    }
    names.into_iter().collect()
}

/// The UNet layers that a list of target suffixes selects, in registry order. A suffix that
/// selects nothing is an error (a typo would otherwise train a smaller network silently).
pub fn select_layers(targets: &AdapterTargets, suffixes: &[String]) -> Result<Vec<(String, Arc<AdaptableLayer>)>> {
    let mut out = Vec::new();
    for s in suffixes {
        let before = out.len();
        for (key, layer) in targets.iter() {
            let Some(path) = key.strip_prefix("unet.") else { continue };
            if matches_target(path, s) && !out.iter().any(|(k, _): &(String, _)| k == key) {
                out.push((key.clone(), layer.clone()));
            }
        }
        if out.len() == before {
            return Err(Error::invalid(format!(
                "target `{s}` names no layer of this UNet; targets are name suffixes such as {}",
                target_names(targets).join(", ")
            )));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl Network {
    /// Creates the modules for the selected layers with PEFT/kohya initialisation from `rng`.
    pub fn new(layers: &[(String, Arc<AdaptableLayer>)], rank: usize, alpha: f64, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Self> {
        if rank == 0 {
            return Err(Error::invalid("rank must be at least 1"));
        }
        let mut modules = Vec::with_capacity(layers.len());
        for (key, layer) in layers {
            let (down_shape, up_shape, fan_in): (Vec<usize>, Vec<usize>, usize) = match layer.kind {
                LayerKind::Linear { in_features, out_features } => (vec![rank, in_features], vec![out_features, rank], in_features),
                LayerKind::Conv2d { in_channels, out_channels, kernel } => (
                    vec![rank, in_channels, kernel, kernel],
                    vec![out_channels, rank, 1, 1],
                    in_channels * kernel * kernel,
                ),
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = down_shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
            let down = Tensor::from_vec(data, down_shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
            let up = Tensor::zeros(up_shape.as_slice(), dtype, device)?;
            modules.push(TrainModule { key: key.clone(), layer: layer.clone(), down: Var::from_tensor(&down)?, up: Var::from_tensor(&up)? });
        }
        Ok(Network { modules, rank, alpha })
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Puts the adapters into the forward pass (replacing any live adapters of those layers).
    pub fn attach(&self) {
        let scale = self.scale();
        for m in &self.modules {
            m.layer.set_live(vec![LiveAdapter { down: m.down.clone(), up: m.up.clone(), scale }]);
        }
    }

    /// Takes the adapters out of the forward pass: the model is the base model again.
    pub fn detach(&self) {
        for m in &self.modules {
            m.layer.set_live(Vec::new());
        }
    }

    /// Every trainable variable: each module's down, then its up.
    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().flat_map(|m| [m.down.clone(), m.up.clone()]).collect()
    }

    /// Trainable numbers in total.
    pub fn parameter_count(&self) -> usize {
        self.modules.iter().map(|m| m.down.as_tensor().elem_count() + m.up.as_tensor().elem_count()).sum()
    }

    /// The modules as the exporter writes them (f32 copies on the CPU).
    pub fn export_modules(&self) -> Result<Vec<ExportModule>> {
        self.modules
            .iter()
            .map(|m| {
                let cpu = |v: &Var| -> Result<Tensor> { Ok(v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
                Ok(ExportModule {
                    component: Component::Unet,
                    path: m.path().to_string(),
                    down: cpu(&m.down)?,
                    up: cpu(&m.up)?,
                    alpha: self.alpha,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_suffixes_match_whole_components_only() {
        assert!(matches_target("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "to_out.0"));
        assert!(!matches_target("a.to_out.10", "to_out.0"));
        assert!(matches_target("a.attn1.to_q", "attn1.to_q"));
        assert!(!matches_target("a.xto_q", "to_q"));
        assert!(matches_target("conv_in", "conv_in"));
        assert!(!matches_target("a.conv1", "conv"));
    }
}
