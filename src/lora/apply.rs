//! Matching a LoRA's modules to a model's layers, and applying a weighted stack of LoRAs.
//!
//! Matching is strict: every module of the file must name a layer of the model and fit its
//! shape, or the whole LoRA is refused with an error that names the module, both shapes and the
//! base family the LoRA was probably made for. A LoRA never silently does nothing.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::keys::{Component, ModuleName, flatten};
use super::{LoraFile, preview};
use crate::error::{Error, Result};
use crate::model::adapters::{AdaptableLayer, AdapterTargets, MergedDelta};
use crate::model::unet::UNetConfig;
use crate::model::{Family, Pipeline};

/// One LoRA module bound to the layer it patches.
#[derive(Debug, Clone)]
pub struct BoundModule {
    pub layer: Arc<AdaptableLayer>,
    /// `unet.down_blocks.…` (the registry key).
    pub target: String,
    pub down: Tensor,
    pub up: Tensor,
    /// alpha / rank (1 without alpha).
    pub scale: f64,
}

/// A LoRA whose every module is bound to a layer of one model.
#[derive(Debug, Clone)]
pub struct ResolvedLora {
    pub name: String,
    pub hash: String,
    pub modules: Vec<BoundModule>,
    pub tensor_count: usize,
}

/// What was applied, for "N of M applied" lines and the `tensors applied` check.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyEntry {
    pub name: String,
    pub weight: f64,
    pub modules_applied: usize,
    pub modules_total: usize,
    pub tensors_applied: usize,
    pub tensors_total: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ApplyReport {
    pub entries: Vec<ApplyEntry>,
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{} at weight {}: {} of {} tensors applied ({} of {} modules)",
                e.name, e.weight, e.tensors_applied, e.tensors_total, e.modules_applied, e.modules_total
            )?;
        }
        Ok(())
    }
}

/// Lookup of a model's patchable layers by every name a LoRA may use for them.
pub struct TargetIndex<'a> {
    targets: &'a AdapterTargets,
    /// `(component, kohya-flat name)` → registry key; includes LDM-style UNet names.
    flat: HashMap<(Component, String), String>,
}

impl<'a> TargetIndex<'a> {
    pub fn new(targets: &'a AdapterTargets, unet: Option<&UNetConfig>) -> Self {
        let mut flat = HashMap::new();
        for (key, _) in targets.iter() {
            let (component, path) = match split_component(key) {
                Some(x) => x,
                None => continue,
            };
            flat.insert((component, flatten(path)), key.clone());
            if component == Component::Unet
                && let Some(ldm) = unet.and_then(|c| crate::model::ldm::unet_module_to_ldm(path, c)) {
                    flat.entry((component, flatten(&ldm))).or_insert_with(|| key.clone());
                }
        }
        TargetIndex { targets, flat }
    }

    /// The registry key and layer a module name refers to.
    pub fn find(&self, component: Component, name: &ModuleName) -> Option<(String, &'a Arc<AdaptableLayer>)> {
        let key = match name {
            ModuleName::Dotted(p) => format!("{}.{p}", component.prefix()),
            ModuleName::Flat(f) => self.flat.get(&(component, f.clone()))?.clone(),
        };
        self.targets.get(&key).map(|l| (key, l))
    }
}

fn split_component(key: &str) -> Option<(Component, &str)> {
    if let Some(p) = key.strip_prefix("unet.") {
        Some((Component::Unet, p))
    } else if let Some(p) = key.strip_prefix("text_encoder_2.") {
        Some((Component::TextEncoder2, p))
    } else {
        key.strip_prefix("text_encoder.").map(|p| (Component::TextEncoder, p))
    }
}

/// The base family a LoRA was most likely trained for, from the widths it expects.
pub fn probable_family(lora: &LoraFile) -> Option<Family> {
    if lora.modules.iter().any(|m| m.component == Component::TextEncoder2) {
        return Some(Family::Sdxl);
    }
    let name_ends = |m: &super::LoraModule, tails: &[&str]| {
        let n = m.name.as_str();
        tails.iter().any(|t| n.ends_with(t))
    };
    for m in &lora.modules {
        if m.component == Component::Unet
            && name_ends(m, &["attn2.to_k", "attn2.to_v", "attn2_to_k", "attn2_to_v"])
        {
            return Some(Family::from_text_width(m.down.elem_count() / m.rank()));
        }
    }
    for m in &lora.modules {
        if m.component == Component::TextEncoder && name_ends(m, &["q_proj"]) {
            let w = m.down.elem_count() / m.rank();
            return Some(match w {
                768 => Family::Sd1,
                1024 => Family::Sd2,
                w => Family::Other { text_width: w },
            });
        }
    }
    None
}

/// Binds every module of `lora` to a layer of the model, or explains why it cannot.
pub fn resolve_lora(lora: &LoraFile, index: &TargetIndex, model_name: &str, model_family: Family) -> Result<ResolvedLora> {
    let family_hint = || match probable_family(lora) {
        Some(f) if f != model_family => format!(" The LoRA was probably made for {f}; the model is {model_family}."),
        Some(f) => format!(" The LoRA looks made for {f}, like the model."),
        None => String::new(),
    };
    let mut unmatched = Vec::new();
    let mut bound = Vec::with_capacity(lora.modules.len());
    for m in &lora.modules {
        let Some((target, layer)) = index.find(m.component, &m.name) else {
            unmatched.push(m.keys[0].clone());
            continue;
        };
        let rank = m.rank();
        let lora_in = m.down.elem_count() / rank;
        let lora_out = m.up.elem_count() / rank;
        let (want_in, want_out) = (layer.kind.in_dim(), layer.kind.out_dim());
        if lora_in != want_in || lora_out != want_out {
            return Err(Error::LoraMismatch {
                path: lora.path.clone(),
                message: format!(
                    "cannot apply to {model_name}: layer `{target}` maps {want_in} → {want_out} features, but the \
                     LoRA's matrices (down {:?}, up {:?}) map {lora_in} → {lora_out}.{}",
                    m.down.dims(),
                    m.up.dims(),
                    family_hint()
                ),
            });
        }
        bound.push(BoundModule { layer: layer.clone(), target, down: m.down.clone(), up: m.up.clone(), scale: m.scale() });
    }
    if !unmatched.is_empty() {
        return Err(Error::LoraMismatch {
            path: lora.path.clone(),
            message: format!(
                "{} of {} modules match no layer of {model_name}: {}.{}",
                unmatched.len(),
                lora.modules.len(),
                preview(&unmatched),
                family_hint()
            ),
        });
    }
    Ok(ResolvedLora { name: lora.name(), hash: lora.hash.clone(), modules: bound, tensor_count: lora.tensor_count })
}

/// Several LoRAs bound to one model, each with a weight; applied by merging into the weights.
#[derive(Debug, Clone, Default)]
pub struct LoraStack {
    pub loras: Vec<(ResolvedLora, f64)>,
}

impl LoraStack {
    /// Binds each LoRA to `pipe`; any LoRA that does not fit is an error naming it.
    pub fn resolve(pipe: &Pipeline, loras: &[(&LoraFile, f64)]) -> Result<Self> {
        let index = TargetIndex::new(pipe.targets(), Some(&pipe.unet.config));
        let name = pipe.location.name.clone();
        let mut out = Vec::with_capacity(loras.len());
        for (lora, w) in loras {
            check_weight(*w)?;
            out.push((resolve_lora(lora, &index, &name, pipe.family)?, *w));
        }
        Ok(LoraStack { loras: out })
    }

    /// Changes the weights (in stack order) without re-reading or re-binding anything.
    pub fn set_weights(&mut self, weights: &[f64]) -> Result<()> {
        if weights.len() != self.loras.len() {
            return Err(Error::invalid(format!("{} weights for {} LoRAs", weights.len(), self.loras.len())));
        }
        for ((_, w), nw) in self.loras.iter_mut().zip(weights) {
            check_weight(*nw)?;
            *w = *nw;
        }
        Ok(())
    }

    /// Patches the model: every layer gets exactly the deltas of this stack (layers it does not
    /// touch are reset to their base weights).
    pub fn apply(&self, pipe: &Pipeline) -> Result<ApplyReport> {
        self.apply_to(pipe.targets())
    }

    pub fn apply_to(&self, targets: &AdapterTargets) -> Result<ApplyReport> {
        let mut per_layer: HashMap<String, Vec<MergedDelta>> = HashMap::new();
        let mut report = ApplyReport::default();
        for (lora, weight) in &self.loras {
            for m in &lora.modules {
                per_layer.entry(m.target.clone()).or_default().push(MergedDelta {
                    down: m.down.clone(),
                    up: m.up.clone(),
                    scale: m.scale * weight,
                });
            }
            report.entries.push(ApplyEntry {
                name: lora.name.clone(),
                weight: *weight,
                modules_applied: lora.modules.len(),
                modules_total: lora.modules.len(),
                tensors_applied: lora.tensor_count,
                tensors_total: lora.tensor_count,
            });
        }
        for (key, layer) in targets.iter() {
            match per_layer.remove(key) {
                Some(deltas) => layer.set_merged(deltas)?,
                None if layer.merged_count() > 0 => layer.set_merged(Vec::new())?,
                None => {}
            }
        }
        Ok(report)
    }
}

fn check_weight(w: f64) -> Result<()> {
    if !w.is_finite() {
        return Err(Error::invalid(format!("LoRA weight {w} is not a finite number")));
    }
    Ok(())
}
