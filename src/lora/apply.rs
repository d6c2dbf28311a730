//! Matching a LoRA's modules to a model's layers, and applying a weighted stack of LoRAs.
//!
//! Matching is strict: every module of the file must name a layer of the model and fit its
//! shape, or the whole LoRA is refused with an error that names the module, both shapes and the
//! base family the LoRA was probably made for. A LoRA never silently does nothing.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::algo::{AdapterWeights, Dora, DoraAxis};
use super::keys::{Component, ModuleName, flatten};
use super::{LoraFile, LoraModule, preview};
use crate::error::{Error, Result};
use crate::model::adapters::{AdaptableLayer, AdapterTargets, LayerKind, MergedDelta, Patch, PatchDelta};
use crate::model::unet::UNetConfig;
use crate::model::{Family, Pipeline};

/// One LoRA module bound to the layer it patches.
#[derive(Debug, Clone)]
pub struct BoundModule {
    pub layer: Arc<AdaptableLayer>,
    /// `unet.down_blocks.…` (the registry key).
    pub target: String,
    /// The module's tensors on the layer's device, as merged.
    pub patch: Arc<ModulePatch>,
    /// The module's own scale (see [`LoraModule::scale`]).
    pub scale: f64,
}

/// A module's update as merged into its layer.
///
/// Without DoRA the change is `weight · scale · ΔW` (and `weight · diff_b` on the bias). With
/// DoRA it is `weight · (m ⊙ V / ‖V‖ − W)` for `V = W + scale · ΔW`, the norms recomputed from
/// that merged weight: at weight 1 exactly PEFT's and LyCORIS's DoRA, at 0 the base model, and
/// linear in between, as A1111 and ComfyUI apply a DoRA's strength.
#[derive(Debug, Clone)]
pub struct ModulePatch {
    pub weights: AdapterWeights,
    pub scale: f64,
    pub dora: Option<Dora>,
}

impl Patch for ModulePatch {
    fn delta(&self, base: &Tensor, weight: f64) -> Result<PatchDelta> {
        let update = match self.weights.update()? {
            Some(u) => Some(u.reshape(base.shape())?),
            None => None,
        };
        let dw = match (&self.dora, update) {
            (None, Some(u)) => Some((u * (self.scale * weight))?),
            (Some(dora), Some(u)) => Some((dora.delta(base, &(u * self.scale)?)? * weight)?),
            (_, None) => None,
        };
        let db = match &self.weights {
            AdapterWeights::Full { diff_b: Some(b), .. } => Some((b * weight)?),
            _ => None,
        };
        Ok(PatchDelta { weight: dw, bias: db })
    }
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
    let name_ends = |m: &LoraModule, tails: &[&str]| {
        let n = m.name.as_str();
        tails.iter().any(|t| n.ends_with(t))
    };
    for m in &lora.modules {
        if m.component == Component::Unet
            && name_ends(m, &["attn2.to_k", "attn2.to_v", "attn2_to_k", "attn2_to_v"])
            && let Some(w) = m.in_features()
        {
            return Some(Family::from_text_width(w));
        }
    }
    for m in &lora.modules {
        if m.component == Component::TextEncoder
            && name_ends(m, &["q_proj"])
            && let Some(w) = m.in_features()
        {
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
        if let Some(problem) = misfit(m, layer.kind) {
            return Err(Error::LoraMismatch {
                path: lora.path.clone(),
                message: format!("cannot apply to {model_name}: layer `{target}` {problem}.{}", family_hint()),
            });
        }
        let device = layer.base_weight().device();
        let patch = ModulePatch {
            weights: m.weights.to_device(device)?,
            scale: m.scale(),
            dora: match &m.dora {
                Some(d) => Some(Dora { magnitude: d.magnitude.to_device(device)?, axis: d.axis }),
                None => None,
            },
        };
        bound.push(BoundModule { layer: layer.clone(), target, patch: Arc::new(patch), scale: m.scale() });
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
    /// touch are reset to their base weights). Each module's delta is computed from the layer's
    /// base weight, then the deltas are summed, so the stack's order does not matter, DoRA
    /// modules included: as PEFT runs several active adapters, each DoRA normalises the base
    /// weight plus its own update, never another LoRA's.
    pub fn apply(&self, pipe: &Pipeline) -> Result<ApplyReport> {
        self.apply_to(pipe.targets())
    }

    pub fn apply_to(&self, targets: &AdapterTargets) -> Result<ApplyReport> {
        let mut per_layer: HashMap<String, Vec<MergedDelta>> = HashMap::new();
        let mut report = ApplyReport::default();
        for (lora, weight) in &self.loras {
            for m in &lora.modules {
                per_layer.entry(m.target.clone()).or_default().push(MergedDelta { patch: m.patch.clone(), weight: *weight });
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

/// Why module `m` cannot patch a layer of `kind`, naming its tensors' shapes, or `None` when
/// its update, bias difference and DoRA magnitude all fit.
fn misfit(m: &LoraModule, kind: LayerKind) -> Option<String> {
    let (want_in, want_out) = (kind.in_dim(), kind.out_dim());
    let (channels, kernel) = match kind {
        LayerKind::Linear { in_features, .. } => (in_features, 1),
        LayerKind::Conv2d { in_channels, kernel, .. } => (in_channels, kernel),
    };
    let shapes = || {
        let parts: Vec<String> = m.keys.iter().zip(m.weights.tensors()).map(|(k, t)| format!("`{k}` {:?}", t.dims())).collect();
        parts.join(", ")
    };
    let layer = match kind {
        LayerKind::Linear { .. } => format!("maps {want_in} → {want_out} features"),
        LayerKind::Conv2d { .. } => format!("maps {channels} → {want_out} channels with a {kernel}×{kernel} kernel ({want_in} inputs per output)"),
    };
    if let Some(d) = m.weights.update_dims() {
        let fits = if d.len() == 4 {
            d[0] == want_out && d[1] == channels && d[2] == kernel && d[3] == kernel
        } else {
            d[0] == want_out && d[1..].iter().product::<usize>() == want_in
        };
        if !fits {
            let inputs: usize = d[1..].iter().product();
            let what = match (m.algorithm(), m.weights.has_tucker()) {
                (super::Algorithm::Lora, false) => format!("the LoRA's matrices ({}) map {inputs} → {}", shapes(), d[0]),
                (a, _) => format!("the {a} tensors ({}) make a {d:?} update", shapes()),
            };
            return Some(format!("{layer}, but {what}"));
        }
    }
    if let Some(n) = m.weights.bias_len()
        && n != want_out
    {
        return Some(format!("has {want_out} outputs, but the bias difference ({}) has {n}", shapes()));
    }
    if let Some(dora) = &m.dora {
        let (n, axis, want) = match dora.axis {
            DoraAxis::Output => (dora.magnitude.elem_count(), "output", want_out),
            DoraAxis::Input => (dora.magnitude.elem_count(), "input", channels),
        };
        if n != want {
            return Some(format!("has {want} {axis} channels, but the DoRA magnitude has {n} values"));
        }
    }
    None
}
