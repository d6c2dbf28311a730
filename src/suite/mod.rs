//! Prompt suites: YAML as written ([`raw`]) → a validated [`Suite`] ([`resolve`]) whose cases
//! expand into concrete generations ([`expand`]).
//!
//! Validation happens completely before anything is generated: unknown fields, wrong types,
//! missing files and bad values are errors with `file:line:column` and a hint.

pub mod expand;
pub mod raw;
pub mod resolve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use resolve::load_suite;

use crate::lora::LoraFile;
use crate::model::scheduler::SamplerKind;
use crate::score::clip::Scale;
pub use raw::{Aggregate, IncompatiblePolicy};

/// A validated suite.
#[derive(Debug, Clone)]
pub struct Suite {
    pub name: String,
    pub file: PathBuf,
    pub description: Option<String>,
    /// The scorer argument as written and its resolved folder.
    pub scorer: (String, PathBuf),
    pub loras: Vec<SuiteLora>,
    pub cases: Vec<Case>,
    pub identity_groups: Vec<IdentityGroup>,
    pub incompatible_base: IncompatiblePolicy,
}

/// A model as a suite names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    /// As written (`tiny`, `../models/sd15`).
    pub name: String,
    pub location: crate::model::resolve::ModelLocation,
}

#[derive(Debug, Clone)]
pub struct SuiteLora {
    pub name: String,
    pub file: Arc<LoraFile>,
    pub weight: f64,
    pub trigger: Option<String>,
    pub class_word: Option<String>,
}

/// One LoRA of a stack: index into [`Suite::loras`] and weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterUse {
    pub lora: usize,
    pub weight: f64,
}

/// Generation settings after defaults are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    /// `None`: the model's native size.
    pub size: Option<(usize, usize)>,
    pub sampler: SamplerKind,
    pub negative_prompt: String,
    pub clip_skip: usize,
}

/// Pass/fail limits, CLIP values in raw cosine.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub clip_floor: f64,
    pub clip_scale: Scale,
    pub clip_aggregate: Aggregate,
    pub control_drop: f64,
    pub effect: f64,
    /// When set, the LoRA must *not* change this case's images by more than this (mean abs,
    /// 0–1): a prompt without the trigger word that the LoRA should leave alone.
    pub leak: Option<f64>,
    pub word_order: f64,
    pub identity: f64,
    pub baseline: f64,
    pub sweep_zero: f64,
    pub blank: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            // The field notes' rule of thumb: retrain below CLIP 0.25 (raw cosine of ViT-L/14).
            clip_floor: 0.25,
            clip_scale: Scale::Cosine,
            clip_aggregate: Aggregate::Mean,
            control_drop: 0.05,
            effect: 0.005,
            leak: None,
            word_order: 0.85,
            identity: 0.8,
            baseline: 0.98,
            sweep_zero: 0.5 / 255.0,
            blank: 0.02,
        }
    }
}

/// What a case varies.
#[derive(Debug, Clone, PartialEq)]
pub enum Variant {
    Single,
    /// Prompts with the tags in other orders; the first is the prompt as written.
    WordOrder { prompts: Vec<String> },
    /// Sizes with optional per-rung floors (raw cosine).
    Ladder { rungs: Vec<((usize, usize), Option<f64>)> },
    /// The case runs on each of its models.
    BaseSwap,
    /// Weights of one LoRA of the stack (index into the case's adapters).
    Sweep { adapter: usize, weights: Vec<f64> },
    /// Prompt prefixes: the prompt, then with words added one at a time.
    Bisect { add: Vec<String> },
}

impl Variant {
    pub fn kind(&self) -> &'static str {
        match self {
            Variant::Single => "single",
            Variant::WordOrder { .. } => "word-order",
            Variant::Ladder { .. } => "ladder",
            Variant::BaseSwap => "base-swap",
            Variant::Sweep { .. } => "sweep",
            Variant::Bisect { .. } => "bisect",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    /// What CLIP scores (triggers replaced by class words, or `score_prompt`).
    pub score_text: String,
    pub settings: Settings,
    pub adapters: Vec<AdapterUse>,
    pub control: bool,
    pub models: Vec<ModelRef>,
    pub variant: Variant,
    pub references: Vec<PathBuf>,
    pub thresholds: Thresholds,
    /// Where the case starts in the suite file.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct IdentityGroup {
    pub name: String,
    pub cases: Vec<String>,
}

/// Finds a suite: the path as given, else `suites/<path>`, else `<path>.yaml` in either.
pub fn find_suite(arg: &str) -> Option<PathBuf> {
    let p = Path::new(arg);
    let mut candidates = vec![p.to_path_buf(), Path::new("suites").join(p)];
    if p.extension().is_none() {
        candidates.push(p.with_extension("yaml"));
        candidates.push(Path::new("suites").join(p).with_extension("yaml"));
    }
    candidates.into_iter().find(|c| c.is_file())
}

/// Checks a name that becomes a file or folder name: it must not escape its folder.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err("contains `..`".into());
    }
    if name.contains('/') || name.contains('\\') || name.contains(':') {
        return Err("contains a path separator".into());
    }
    if name.len() > 100 {
        return Err("is longer than 100 characters".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("contains {c:?}; use letters, digits, `-`, `_` and `.`"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("starts with `.` or `-`".into());
    }
    Ok(())
}

/// A file-name-safe version of a name, for the hint.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "case".into() } else { s.chars().take(100).collect() }
}
