//! Prompt suites: YAML as written ([`raw`]) → a validated [`Suite`] ([`validate`]) whose cases
//! expand into concrete generations ([`expand`]).
//!
//! Validation happens completely before anything is generated: unknown fields, wrong types,
//! missing files and bad values are errors with `file:line:column` and a hint.

pub mod expand;
pub mod prompts;
pub mod raw;
pub mod starter;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use validate::load_suite;

use crate::baseline::scores::Metric;
use crate::lora::LoraFile;
use crate::model::scheduler::SamplerKind;
use crate::score::clip::Scale;
pub use raw::{Aggregate, ChangedImagesPolicy, IncompatiblePolicy};

use crate::names::SafeName;

/// A validated suite.
#[derive(Debug, Clone)]
pub struct Suite {
    pub name: SafeName,
    pub file: PathBuf,
    pub description: Option<String>,
    /// The scorer argument as written and its resolved folder.
    pub scorer: (String, PathBuf),
    /// The identity checks' image encoder as written and its folder (`None`: the CLIP scorer).
    pub identity_scorer: Option<(String, PathBuf)>,
    pub aesthetic: Option<AestheticSpec>,
    pub loras: Vec<SuiteLora>,
    pub cases: Vec<Case>,
    pub identity_groups: Vec<IdentityGroup>,
    pub policy: Policy,
    /// The suite-wide thresholds (cases may override them).
    pub thresholds: Thresholds,
}

/// The aesthetic check's predictor file and its CLIP model (as written, and the folder).
#[derive(Debug, Clone)]
pub struct AestheticSpec {
    pub predictor: PathBuf,
    pub clip: (String, PathBuf),
}

/// What to do when something cannot run as asked, or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub incompatible_base: IncompatiblePolicy,
    pub changed_images: ChangedImagesPolicy,
}

/// A model as a suite names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    /// As written (`tiny`, `../models/sd15`), for messages.
    pub name: String,
    /// The name in file names (`tiny`, `sd15-1a2b3c4d`, `org--name`).
    pub label: SafeName,
    pub location: crate::model::locate::ModelLocation,
}

#[derive(Debug, Clone)]
pub struct SuiteLora {
    pub name: SafeName,
    pub file: Arc<LoraFile>,
    pub weight: f64,
    pub trigger: Option<String>,
    pub class_word: Option<String>,
    /// The character sheet: every image made with this LoRA and its trigger is scored for
    /// identity against these.
    pub references: Vec<PathBuf>,
    /// Where its training images are, for the memorization check.
    pub training_set: TrainingSet,
}

/// A LoRA's training images, as the memorization check finds them.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainingSet {
    /// The check does not run for this LoRA.
    NotAsked,
    /// A folder of images: `training_set:` as written, or the dataset the LoRA's metadata names.
    Folder { dir: PathBuf, origin: String, from_metadata: bool },
    /// The check was asked for but has no images to compare with: why, and what to do.
    Missing(String),
}

impl SuiteLora {
    /// Whether `prompt` calls this LoRA's character: it names the trigger, or the LoRA has none.
    pub fn triggered_by(&self, prompt: &str) -> bool {
        match &self.trigger {
            None => true,
            Some(t) => prompt.split(|c: char| c == ',' || c.is_whitespace()).any(|w| w.eq_ignore_ascii_case(t)),
        }
    }
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
    pub aesthetic_floor: Option<f64>,
    pub aesthetic_drop: f64,
    pub baseline: f64,
    pub sweep_zero: f64,
    pub blank: f64,
    /// Floors and control drops also hold seed by seed (a melted seed fails even when the mean
    /// passes).
    pub per_seed: bool,
    /// How much worse than the no-LoRA control the LoRA may be on word order and identity.
    pub relative_margin: f64,
    /// The share of the control's seed-to-seed variety the LoRA must keep (collapse check).
    pub diversity: f64,
    /// The share of the accepted images' likeness among themselves (beyond a no-LoRA image's)
    /// that new images must keep, over a case and over each of its slices (`identity/accepted`).
    pub likeness: f64,
    /// The largest share of its own pixel effect a LoRA may lose when stacked.
    pub stack_loss: f64,
    /// The largest tolerated drop against the accepted measurements (regression and slice
    /// checks), per metric in its own units.
    pub regression: Tolerances,
    /// The memorization check's copy threshold (identity cosine to the nearest training image);
    /// a suite-wide number, `None` unless the suite set it.
    pub memorization: Option<f64>,
    /// How much closer to its nearest training image than its control an image must be to
    /// count as a copy (identity cosine).
    pub memorization_margin: f64,
}

/// The memorization check's threshold when a LoRA names its `training_set:` and the suite sets
/// none. Measured on tiny-clip (docs/checks-and-verdicts.md): every image of the zorb recipe's
/// clean retrains is at 0.56 or more from its nearest training image (600 images cover the
/// world), so the threshold alone tells nothing there and the margin decides; it keeps out
/// images that are far closer than their control yet unlike anything in the set. The copying
/// LoRA's copies are at 0.62–0.91.
pub const DEFAULT_MEMORIZATION: f64 = 0.6;

/// Regression tolerances, each in its metric's units. A metric without one takes its default
/// from the accepted run's own seed noise (see [`crate::harness::stats::tolerance_from_seed_noise`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tolerances {
    /// One number for every metric (`regression: 0.02`).
    pub all: Option<f64>,
    pub per_metric: std::collections::BTreeMap<Metric, f64>,
}

impl Tolerances {
    /// The tolerance the suite sets for `metric`, if it sets one.
    pub fn set_for(&self, metric: Metric) -> Option<f64> {
        self.per_metric.get(&metric).copied().or(self.all)
    }
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
            aesthetic_floor: None,
            aesthetic_drop: 0.5,
            baseline: 0.98,
            sweep_zero: 0.5 / 255.0,
            blank: 0.02,
            per_seed: true,
            relative_margin: 0.05,
            diversity: 0.5,
            likeness: 0.5,
            stack_loss: 0.5,
            regression: Tolerances::default(),
            memorization: None,
            // The clean retrains' images come at most 0.24 closer to the training set than
            // their controls, the copying LoRA's copies 0.39–0.63 (docs/checks-and-verdicts.md).
            memorization_margin: 0.25,
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
    /// Stacking interference: each LoRA alone and every pair, at these weights.
    Stack { loras: Vec<AdapterUse> },
    /// Many prompts: a matrix's expansions or a prompt file's lines, each with its overrides.
    Prompts { entries: Vec<prompts::PromptEntry> },
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
            Variant::Stack { .. } => "stack",
            Variant::Prompts { .. } => "prompts",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: SafeName,
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
    pub known_failures: Vec<KnownFailure>,
    /// Where the case starts in the suite file.
    pub line: usize,
}

/// A check known to fail, and why (see [`crate::harness::Status::Known`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownFailure {
    /// A check name, or a prefix ending in `*`.
    pub check: String,
    pub reason: String,
}

impl KnownFailure {
    pub fn matches(&self, check: &str) -> bool {
        match self.check.strip_suffix('*') {
            Some(prefix) => check.starts_with(prefix),
            None => check == self.check,
        }
    }
}

/// The checks a case can have, by the name before any `/` or `@` (for validating
/// `known_failures`).
pub const CHECK_KINDS: &[&str] = &[
    "applied", "sanity", "images", "clip", "per-seed", "control", "effect", "leak", "word-order", "identity", "aesthetic", "diversity", "sweep", "sweep-zero",
    "bisect", "stack", "regression", "slice", "misses", "baseline", "memorization",
];

#[derive(Debug, Clone)]
pub struct IdentityGroup {
    pub name: SafeName,
    pub cases: Vec<SafeName>,
    /// Why the group is known to fail, if it is.
    pub known_failure: Option<String>,
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
