//! LoRA files: reading the kohya, diffusers and PEFT formats and the LyCORIS algorithms (LoHa,
//! LoKr, LoCon with Tucker cores, full diffs) and DoRA, checking them, and patching a loaded
//! pipeline with one or several of them at chosen weights. `docs/lora-formats.md` lists every
//! format, algorithm and scale rule.
//!
//! ```no_run
//! # use loragate::{lora::{LoraFile, LoraStack}, model::{Pipeline, locate::resolve_model}};
//! # fn main() -> loragate::Result<()> {
//! let pipe = Pipeline::load(&resolve_model("tiny")?, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let zorb = LoraFile::load("zorb.safetensors".as_ref())?;
//! let stack = LoraStack::resolve(&pipe, &[(&zorb, 0.8)])?; // every tensor must match a layer
//! stack.apply(&pipe)?;                                       // merged; weights change cheaply
//! # Ok(()) }
//! ```

pub mod algo;
mod assemble;
pub mod export;
pub mod inspect;
pub mod keys;
pub mod apply;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::tensors::TensorFile;
pub use keys::{Component, KeyStyle, ModuleName};
pub use apply::{ApplyReport, LoraStack};
pub use algo::{AdapterWeights, Algorithm, Dora, DoraAxis, KronHalf};
use keys::Role;

/// The on-disk format of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Diffusers,
    Peft,
    /// Keys of more than one style in one file.
    Mixed,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya (sd-scripts)",
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Peft => "PEFT",
            LoraFormat::Mixed => "mixed kohya/diffusers/PEFT keys",
        })
    }
}

/// One patched module: its tensors by algorithm, its alpha and, for DoRA, its magnitude.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub component: Component,
    pub name: ModuleName,
    pub weights: AdapterWeights,
    pub alpha: Option<f64>,
    pub dora: Option<Dora>,
    /// The tensor names this module came from (for messages).
    pub keys: Vec<String>,
}

impl LoraModule {
    pub fn algorithm(&self) -> Algorithm {
        self.weights.algorithm()
    }

    /// The rank alpha is divided by, where the algorithm has one (see [`AdapterWeights::rank`]).
    pub fn rank(&self) -> Option<usize> {
        self.weights.rank()
    }

    /// The module's own scale, before the user's weight: alpha / rank for LoRA, LoHa and a LoKr
    /// with a factorised half (1 without alpha; an alpha of 0 means "alpha = rank", as kohya
    /// sd-scripts and LyCORIS read it); 1 for a LoKr whose halves are both whole matrices
    /// (LyCORIS ignores alpha there) and for a full diff.
    pub fn scale(&self) -> f64 {
        match (self.rank(), self.alpha) {
            (Some(r), Some(a)) if a != 0.0 => a / r as f64,
            _ => 1.0,
        }
    }

    /// The down and up matrices of a plain LoRA module (no Tucker core, no DoRA).
    pub fn low_rank(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.weights, &self.dora) {
            (AdapterWeights::LowRank { down, up, mid: None }, None) => Some((down, up)),
            _ => None,
        }
    }

    /// The input width of the update (`in · k · k` for convolutions), for family guesses.
    pub fn in_features(&self) -> Option<usize> {
        self.weights.update_dims().map(|d| d[1..].iter().product())
    }
}

/// A parsed, validated LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub modules: Vec<LoraModule>,
    pub metadata: BTreeMap<String, String>,
    /// Number of tensors in the file.
    pub tensor_count: usize,
    /// Content hash of the file (for caches and baselines).
    pub hash: String,
}

impl LoraFile {
    /// Reads and validates a LoRA file: every tensor must be a recognised LoRA tensor, each
    /// module must have both matrices with agreeing ranks, and no value may be NaN or infinite.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::lora(path, format!("cannot read: {e}")))?;
        Self::from_bytes(path, &bytes)
    }

    /// Like [`LoraFile::load`] from bytes; `path` names the file in messages (and is where an
    /// `adapter_config.json` is looked for).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let file = TensorFile::from_bytes(path, bytes, DType::F32, &Device::Cpu).map_err(|e| match e {
            Error::TensorFile { reason, .. } => Error::lora(path, format!("not a readable safetensors file: {reason}")),
            other => other,
        })?;
        let hash = crate::fsutil::content_hash(bytes);
        let peft_config = read_peft_config(path, &file.metadata);
        parse_modules(path, file, hash, peft_config)
    }

    /// The file name, for tables.
    pub fn name(&self) -> String {
        self.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| self.path.display().to_string())
    }

    pub fn ranks(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.modules.iter().filter_map(|m| m.rank()).collect();
        r.sort_unstable();
        r.dedup();
        r
    }
}

/// PEFT keeps alpha in `adapter_config.json` (or diffusers in the `lora_adapter_metadata`
/// header field) instead of in the tensors.
#[derive(Debug, Clone, Default)]
struct PeftConfig {
    alpha: Option<f64>,
    rank: Option<usize>,
    alpha_pattern: Vec<(String, f64)>,
}

fn read_peft_config(path: &Path, metadata: &BTreeMap<String, String>) -> PeftConfig {
    let mut cfg = PeftConfig::default();
    let mut absorb = |v: &serde_json::Value| {
        let get = |k: &str| -> Option<&serde_json::Value> {
            v.get(k).or_else(|| v.get(format!("unet.{k}"))).or_else(|| v.get("unet").and_then(|u| u.get(k)))
        };
        if let Some(a) = get("lora_alpha").and_then(|a| a.as_f64()) {
            cfg.alpha = Some(a);
        }
        if let Some(r) = get("r").and_then(|r| r.as_u64()) {
            cfg.rank = Some(r as usize);
        }
        if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
            cfg.alpha_pattern = p.iter().filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a))).collect();
        }
    };
    if let Some(m) = metadata.get("lora_adapter_metadata")
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(m) {
            absorb(&v);
        }
    if let Some(dir) = path.parent()
        && let Ok(text) = std::fs::read_to_string(dir.join("adapter_config.json"))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                absorb(&v);
            }
    cfg
}

fn parse_modules(path: &Path, file: TensorFile, hash: String, peft: PeftConfig) -> Result<LoraFile> {
    let err = |m: String| Error::lora(path, m);
    if file.tensors.is_empty() {
        return Err(err("the file holds no tensors".into()));
    }
    let tensor_count = file.tensors.len();
    let mut styles = std::collections::HashSet::new();
    let mut grouped: BTreeMap<(Component, ModuleName), assemble::Parts> = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in file.sorted_names() {
        let t = &file.tensors[name];
        let parsed = match keys::parse_key(name) {
            Ok(p) => p,
            Err(keys::KeyProblem::Unsupported(what)) => {
                return Err(err(format!("tensor `{name}` belongs to {what}, which loragate cannot apply")));
            }
            Err(keys::KeyProblem::Unknown) => {
                unknown.push(name.to_string());
                continue;
            }
        };
        if t.dtype() != DType::F32 {
            return Err(err(format!("tensor `{name}` is not a floating-point tensor")));
        }
        check_finite(t).map_err(|bad| err(format!("tensor `{name}` contains {bad}")))?;
        if t.elem_count() == 0 {
            return Err(err(format!("tensor `{name}` is empty (shape {:?})", t.dims())));
        }
        styles.insert(parsed.style);
        let parts = grouped.entry((parsed.component, parsed.module)).or_default();
        if parsed.role == Role::Alpha && t.elem_count() != 1 {
            return Err(err(format!("alpha `{name}` has {} values, expected one", t.elem_count())));
        }
        if parts.insert(parsed.role, (name.to_string(), t.clone())).is_some() {
            return Err(err(format!("tensor `{name}` names a module whose matrices appear twice")));
        }
    }
    if !unknown.is_empty() {
        return Err(err(format!(
            "{} of {tensor_count} tensors are not LoRA tensors of any known format (kohya, diffusers, PEFT, LyCORIS): {}",
            unknown.len(),
            preview(&unknown)
        )));
    }
    let mut modules = Vec::with_capacity(grouped.len());
    for ((component, name), mut parts) in grouped {
        let alpha = match parts.remove(&Role::Alpha) {
            Some((k, t)) => Some((k, t.flatten_all()?.to_vec1::<f32>()?[0] as f64)),
            None => None,
        };
        let built = assemble::assemble(name.as_str(), &parts).map_err(err)?;
        let mut keys: Vec<String> = parts.into_values().map(|(k, _)| k).collect();
        let alpha = match alpha {
            Some((k, a)) => {
                keys.push(k);
                Some(a)
            }
            None => peft_alpha(&peft, name.as_str()),
        };
        modules.push(LoraModule { component, name, weights: built.weights, alpha, dora: built.dora, keys });
    }
    let format = if styles.len() > 1 {
        LoraFormat::Mixed
    } else {
        match styles.into_iter().next() {
            Some(KeyStyle::Kohya) => LoraFormat::Kohya,
            Some(KeyStyle::Peft) => LoraFormat::Peft,
            _ => LoraFormat::Diffusers,
        }
    };
    Ok(LoraFile { path: path.to_path_buf(), format, modules, metadata: file.metadata, tensor_count, hash })
}

fn peft_alpha(cfg: &PeftConfig, module: &str) -> Option<f64> {
    for (pattern, a) in &cfg.alpha_pattern {
        if module.ends_with(pattern.as_str()) || module.contains(pattern.as_str()) {
            return Some(*a);
        }
    }
    cfg.alpha
}

fn check_finite(t: &Tensor) -> std::result::Result<(), String> {
    let v = t.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(|e| e.to_string())?;
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    match (nan, inf) {
        (0, 0) => Ok(()),
        (n, 0) => Err(format!("{n} NaN values")),
        (0, i) => Err(format!("{i} infinite values")),
        (n, i) => Err(format!("{n} NaN and {i} infinite values")),
    }
}

/// The first few names of a list, for messages.
pub(crate) fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    let more = names.len().saturating_sub(3);
    if more > 0 { format!("{} and {more} more", shown.join(", ")) } else { shown.join(", ") }
}

/// A LoRA as a map of key → tensor in one format, for writing.
pub type LoraTensors = HashMap<String, Tensor>;
