//! Training configuration: a YAML file and/or command-line flags, resolved in two passes
//! (as written → validated [`TrainConfig`]), so a bad value fails before any model is loaded.
//!
//! Flags override the file. Errors in the file point at `file:line:column`; errors in flags
//! name the flag. Paths in the file are relative to the file's folder; paths in flags to the
//! working directory. The whole resolved config is stored (as JSON) in every LoRA written.
//!
//! ```yaml
//! name: zorb                 # output file stem (default: the dataset folder's name)
//! dataset: data/zorb         # images + .txt captions, kohya N_name folders allowed
//! model: tiny                # built-in name or diffusers folder
//! rank: 8
//! alpha: 8
//! targets: [to_q, to_k, to_v, to_out.0, ff.net.0.proj, proj_in, conv1]
//! learning_rate: 1.0e-3
//! steps: 600
//! batch_size: 4
//! resolution: [64, 128]      # one or several (multi-resolution training)
//! keep_tokens: 1
//! tag_dropout: 0.1
//! sketch: 0.1                # wild augmentation probabilities, each appends its tag
//! checkpoint_every: 100
//! validation_suite: ../suites/portrait.yaml
//! validation_every: 200
//! validation_split: 0.1      # held-out images (or a folder of its own), never trained on
//! pick: best                 # or latest-passing
//! early_stop: { patience: 2 }
//! ```

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::augment::{CaptionOptions, ImageOptions, Wild};
use super::optim::{AdamWConfig, ScheduleKind};
use crate::error::{Error, Result};

/// A number or a list of numbers.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

/// `validation_split:` as written: a fraction of the dataset or a folder.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SplitRaw {
    Fraction(f64),
    Folder(String),
}

/// `early_stop:` as written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopRaw {
    /// Evaluations without improvement before training stops.
    #[schemars(with = "usize")]
    pub patience: Spanned<usize>,
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<usize> {
        match self {
            OneOrMany::One(v) => vec![*v],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A training config file as written. Every field is optional; see [`TrainConfig`] for the
/// defaults. Unknown fields are errors.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTrainConfig {
    /// Output name: files are `<name>.safetensors` and `<name>-step<N>.safetensors`.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    /// The dataset folder (relative to this file).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub dataset: Option<Spanned<String>>,
    /// Base model: `tiny`, `tiny-sticker` or a diffusers folder (relative to this file).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub model: Option<Spanned<String>>,
    /// Where LoRAs, logs and validation reports go (relative to this file).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub output_dir: Option<Spanned<String>>,
    /// `kohya` (default) or `diffusers`.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub format: Option<Spanned<String>>,
    /// `f32` (default) or `f16`.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub save_precision: Option<Spanned<String>>,
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub rank: Option<Spanned<usize>>,
    /// Default: the rank (scale 1).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub alpha: Option<Spanned<f64>>,
    /// UNet layer name suffixes. Default `[to_q, to_k, to_v, to_out.0]`.
    #[schemars(with = "Option<Vec<String>>")]
    #[serde(default)]
    pub targets: Option<Spanned<Vec<String>>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub learning_rate: Option<Spanned<f64>>,
    /// `cosine` (default) or `constant`, after the warm-up.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub lr_schedule: Option<Spanned<String>>,
    /// Linear warm-up steps. Default: 5 % of the steps.
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub warmup_steps: Option<Spanned<usize>>,
    /// The learning rate the cosine ends at. Default 0.
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub min_learning_rate: Option<Spanned<f64>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub weight_decay: Option<Spanned<f64>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub adam_beta1: Option<Spanned<f64>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub adam_beta2: Option<Spanned<f64>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub adam_epsilon: Option<Spanned<f64>>,
    /// Global gradient-norm limit; 0 disables clipping. Default 1.
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub max_grad_norm: Option<Spanned<f64>>,
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub steps: Option<Spanned<usize>>,
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub batch_size: Option<Spanned<usize>>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Training resolution(s): the side of a square of the bucket area. Default: the
    /// model's native size.
    #[schemars(with = "Option<OneOrMany>")]
    #[serde(default)]
    pub resolution: Option<Spanned<OneOrMany>>,
    /// Bucket sides are multiples of this. Default 64.
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub bucket_step: Option<Spanned<usize>>,
    /// Largest bucket aspect ratio. Default 2.
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub max_aspect: Option<Spanned<f64>>,
    /// Tags kept first and never dropped. Default 1.
    #[serde(default)]
    pub keep_tokens: Option<usize>,
    /// Default true.
    #[serde(default)]
    pub shuffle_tags: Option<bool>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub tag_dropout: Option<Spanned<f64>>,
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub caption_dropout: Option<Spanned<f64>>,
    /// Caption for images without a `.txt` (otherwise they are errors).
    #[serde(default)]
    pub default_caption: Option<String>,
    /// Probability of a horizontal flip (breaks left/right captions). Default 0.
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub flip: Option<Spanned<f64>>,
    /// Colour jitter strength. Default 0.
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub color_jitter: Option<Spanned<f64>>,
    /// Probability of the sketch look (tag `sketch`).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub sketch: Option<Spanned<f64>>,
    /// Probability of pixelation (tag `pixel art`).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub pixelate: Option<Spanned<f64>>,
    /// Probability of the oil-paint blur (tag `oil painting`).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub oil_paint: Option<Spanned<f64>>,
    /// Probability of added noise (tag `noisy`).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub noise: Option<Spanned<f64>>,
    /// Probability of a perspective warp (tag `perspective`).
    #[schemars(with = "Option<f64>")]
    #[serde(default)]
    pub perspective: Option<Spanned<f64>>,
    /// Augmented copies per image, each encoded once. Default 1 without image
    /// augmentations, 4 with.
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub augment_variants: Option<Spanned<usize>>,
    /// Perceptual-hash distance for near-duplicates in the dataset check. Default 8.
    #[serde(default)]
    pub duplicate_distance: Option<u32>,
    /// Save a checkpoint every N steps (and at the end). Default: the validation interval,
    /// or only at the end.
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub checkpoint_every: Option<Spanned<usize>>,
    /// A suite to run on checkpoints (relative to this file).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub validation_suite: Option<Spanned<String>>,
    /// Validate every N steps (a multiple of checkpoint_every). Default: checkpoint_every.
    #[schemars(with = "Option<usize>")]
    #[serde(default)]
    pub validation_every: Option<Spanned<usize>>,
    /// The suite LoRA (by name) that checkpoints replace. Default: the suite's only LoRA.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub validation_lora: Option<Spanned<String>>,
    /// Held-out images, never trained on, whose loss is measured at every checkpoint: a
    /// fraction of the dataset (`0.1`, drawn by the seed) or a folder of its own (relative to
    /// this file).
    #[schemars(with = "Option<SplitRaw>")]
    #[serde(default)]
    pub validation_split: Option<Spanned<SplitRaw>>,
    /// Which checkpoint becomes `<name>.safetensors`: `best` (default) or `latest-passing`.
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub pick: Option<Spanned<String>>,
    /// `{ patience: N }`: stop once neither the held-out loss nor the suite's scores improved
    /// for N evaluations.
    #[schemars(with = "Option<EarlyStopRaw>")]
    #[serde(default)]
    pub early_stop: Option<Spanned<EarlyStopRaw>>,
}

/// Values given on the command line; each replaces the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub dataset: Option<PathBuf>,
    pub model: Option<String>,
    pub output_dir: Option<PathBuf>,
    pub format: Option<String>,
    pub save_precision: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub targets: Option<Vec<String>>,
    pub learning_rate: Option<f64>,
    pub lr_schedule: Option<String>,
    pub warmup_steps: Option<usize>,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub seed: Option<u64>,
    pub resolution: Option<Vec<usize>>,
    pub keep_tokens: Option<usize>,
    pub no_shuffle_tags: bool,
    pub tag_dropout: Option<f64>,
    pub caption_dropout: Option<f64>,
    pub flip: Option<f64>,
    pub color_jitter: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub checkpoint_every: Option<usize>,
    pub validation_suite: Option<PathBuf>,
    pub validation_every: Option<usize>,
    pub validation_lora: Option<String>,
    /// A fraction (`0.1`) or a folder.
    pub validation_split: Option<String>,
    pub pick: Option<String>,
    pub early_stop_patience: Option<usize>,
}

/// The LoRA file layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `lora_unet_…lora_down.weight`, `….alpha` (kohya sd-scripts, A1111, ComfyUI).
    Kohya,
    /// `unet.….lora.down.weight` (diffusers' `load_lora_weights`).
    Diffusers,
}

/// Where checkpoints are validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationConfig {
    pub suite: PathBuf,
    pub every: usize,
    pub lora: Option<String>,
}

/// The held-out images.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldOut {
    /// This fraction of the dataset's images, drawn by the seed.
    Fraction(f64),
    /// Every image of this folder; the dataset is trained on whole.
    Folder(PathBuf),
}

/// How the shipped checkpoint is chosen (see [`super::pick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PickRule {
    Best,
    LatestPassing,
}

/// When to stop before `steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EarlyStop {
    pub patience: usize,
}

/// A validated training configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub name: String,
    pub dataset: PathBuf,
    pub model: String,
    pub output_dir: PathBuf,
    pub format: OutputFormat,
    /// `f32` or `f16`.
    pub save_precision: String,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub lr_schedule: ScheduleKind,
    pub warmup_steps: usize,
    pub min_learning_rate: f64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub steps: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Empty: the model's native size (filled in when the model is known).
    pub resolutions: Vec<usize>,
    pub bucket_step: usize,
    pub max_aspect: f64,
    pub caption: CaptionOptions,
    pub default_caption: Option<String>,
    pub image: ImageOptions,
    pub augment_variants: usize,
    pub duplicate_distance: u32,
    /// 0: only the final LoRA.
    pub checkpoint_every: usize,
    pub validation: Option<ValidationConfig>,
    pub validation_split: Option<HeldOut>,
    pub pick: PickRule,
    pub early_stop: Option<EarlyStop>,
}

impl TrainConfig {
    /// The resolved config as JSON (stored in LoRA metadata).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A config from flags alone (no file).
    pub fn from_overrides(o: &Overrides) -> Result<Self> {
        resolve(None, RawTrainConfig::default(), o)
    }

    /// Reads a config file and applies the flags.
    pub fn load(path: &Path, o: &Overrides) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text, o)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str, o: &Overrides) -> Result<Self> {
        let raw: RawTrainConfig = if text.trim().is_empty() {
            RawTrainConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| yaml_error(path, &e))?
        };
        resolve(Some(path), raw, o)
    }
}

fn yaml_error(path: &Path, e: &serde_saphyr::Error) -> Error {
    let (line, column, message) = crate::error::yaml_error_parts(e);
    let hint = if message.contains("unknown field") {
        Some("check the spelling; `loragate train --help` and docs/training.md list every field".to_string())
    } else if message.starts_with("invalid") {
        Some("the value has the wrong type for this field".to_string())
    } else {
        None
    };
    Error::Suite { file: path.to_path_buf(), line, column, message, hint, infrastructure: false }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Default,
    File(usize, usize),
    Flag(&'static str),
}

struct Ctx<'a> {
    file: Option<&'a Path>,
}

impl Ctx<'_> {
    fn err(&self, origin: &Origin, key: &str, message: String, hint: Option<&str>) -> Error {
        match (origin, self.file) {
            (Origin::File(line, column), Some(f)) => Error::Suite {
                file: f.to_path_buf(),
                line: *line,
                column: *column,
                message: format!("{key}: {message}"),
                hint: hint.map(str::to_string),
                infrastructure: false,
            },
            (Origin::Flag(flag), _) => Error::invalid(format!("{flag}: {message}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())),
            _ => Error::invalid(format!("{key}: {message}")),
        }
    }

    fn dir(&self) -> PathBuf {
        match self.file.and_then(Path::parent) {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// A flag value if given, else the file's (with its location), else none.
fn pick<T: Clone>(flag: Option<T>, flag_name: &'static str, file: Option<Spanned<T>>) -> Option<(T, Origin)> {
    match (flag, file) {
        (Some(v), _) => Some((v, Origin::Flag(flag_name))),
        (None, Some(s)) => Some((s.value, Origin::File(s.referenced.line() as usize, s.referenced.column() as usize))),
        (None, None) => None,
    }
}

fn or_default<T>(v: Option<(T, Origin)>, d: T) -> (T, Origin) {
    v.unwrap_or((d, Origin::Default))
}

fn resolve(file: Option<&Path>, raw: RawTrainConfig, o: &Overrides) -> Result<TrainConfig> {
    let ctx = Ctx { file };
    let path_of = |flag: Option<PathBuf>, file_value: Option<Spanned<String>>, flag_name: &'static str| -> Option<(PathBuf, Origin)> {
        match (flag, file_value) {
            (Some(p), _) => Some((p, Origin::Flag(flag_name))),
            (None, Some(s)) => {
                let p = Path::new(&s.value);
                let p = if p.is_absolute() { p.to_path_buf() } else { ctx.dir().join(p) };
                Some((p, Origin::File(s.referenced.line() as usize, s.referenced.column() as usize)))
            }
            (None, None) => None,
        }
    };

    let (dataset, _) = path_of(o.dataset.clone(), raw.dataset, "--dataset").ok_or_else(|| {
        ctx.err(&Origin::Default, "dataset", "no dataset folder given".into(), Some("set `dataset:` in the config or pass --dataset DIR"))
    })?;

    let name = match pick(o.name.clone(), "--name", raw.name) {
        Some((n, origin)) => {
            crate::names::SafeName::new(&n).map_err(|why| {
                ctx.err(&origin, "name", format!("`{n}` {why}"), Some("the name becomes a file name; use letters, digits, `-`, `_`"))
            })?;
            n
        }
        None => {
            let stem = dataset.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            // `10_zorb` → `zorb`: a repeat folder given directly names the concept.
            let stem = super::dataset::repeat_folder(&stem).map(|(_, n)| n.to_string()).unwrap_or(stem);
            crate::names::SafeName::slug(&stem).to_string()
        }
    };

    let model = pick(o.model.clone(), "--model", raw.model)
        .map(|(m, origin)| {
            let builtin = crate::model::locate::BUILTIN_MODELS.iter().any(|(n, _)| *n == m) || m == "tiny-sd";
            match origin {
                Origin::File(..) if !builtin => ctx.dir().join(&m).to_string_lossy().into_owned(),
                _ => m,
            }
        })
        .unwrap_or_else(|| "tiny".into());

    let output_dir = path_of(o.output_dir.clone(), raw.output_dir, "--out")
        .map(|(p, _)| p)
        .unwrap_or_else(|| PathBuf::from("out").join("train").join(&name));

    let (format, origin) = or_default(pick(o.format.clone(), "--format", raw.format), "kohya".into());
    let format = match format.to_ascii_lowercase().as_str() {
        "kohya" => OutputFormat::Kohya,
        "diffusers" => OutputFormat::Diffusers,
        other => return Err(ctx.err(&origin, "format", format!("unknown format `{other}`"), Some("use kohya or diffusers"))),
    };
    let (save_precision, origin) = or_default(pick(o.save_precision.clone(), "--save-precision", raw.save_precision), "f32".into());
    let save_precision = match save_precision.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float" => "f32".to_string(),
        "f16" | "fp16" | "half" => "f16".to_string(),
        other => return Err(ctx.err(&origin, "save_precision", format!("unknown precision `{other}`"), Some("use f32 or f16"))),
    };

    let (rank, origin) = or_default(pick(o.rank, "--rank", raw.rank), 8);
    if rank == 0 || rank > 1024 {
        return Err(ctx.err(&origin, "rank", format!("must be between 1 and 1024, got {rank}"), None));
    }
    let (alpha, origin) = or_default(pick(o.alpha, "--alpha", raw.alpha), rank as f64);
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ctx.err(&origin, "alpha", format!("must be a positive number, got {alpha}"), Some("the LoRA scale is alpha / rank")));
    }

    let (targets, origin) = or_default(
        pick(o.targets.clone(), "--targets", raw.targets),
        ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect(),
    );
    if targets.is_empty() {
        return Err(ctx.err(&origin, "targets", "the list is empty".into(), Some("name at least one layer suffix, e.g. to_q")));
    }
    for t in &targets {
        let ok = !t.is_empty()
            && !t.starts_with('.')
            && !t.ends_with('.')
            && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !ok {
            return Err(ctx.err(&origin, "targets", format!("`{t}` is not a layer name suffix"), Some("e.g. to_q, to_out.0, ff.net.0.proj, proj_in, conv1")));
        }
    }

    let positive = |v: f64, origin: &Origin, key: &str| -> Result<f64> {
        if v.is_finite() && v > 0.0 { Ok(v) } else { Err(ctx.err(origin, key, format!("must be a positive number, got {v}"), None)) }
    };
    let non_negative = |v: f64, origin: &Origin, key: &str| -> Result<f64> {
        if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(ctx.err(origin, key, format!("must be 0 or more, got {v}"), None)) }
    };
    let probability = |v: Option<(f64, Origin)>, key: &str| -> Result<f64> {
        match v {
            None => Ok(0.0),
            Some((p, origin)) if (0.0..=1.0).contains(&p) => {
                let _ = origin;
                Ok(p)
            }
            Some((p, origin)) => Err(ctx.err(&origin, key, format!("is a probability and must be between 0 and 1, got {p}"), None)),
        }
    };

    let (lr, origin) = or_default(pick(o.learning_rate, "--lr", raw.learning_rate), 1e-4);
    let learning_rate = positive(lr, &origin, "learning_rate")?;
    if learning_rate > 1.0 {
        return Err(ctx.err(&origin, "learning_rate", format!("{learning_rate} is far too high (LoRA rates are around 1e-4 to 1e-2)"), None));
    }
    let (sched, origin) = or_default(pick(o.lr_schedule.clone(), "--lr-schedule", raw.lr_schedule), "cosine".into());
    let lr_schedule = match sched.as_str() {
        "cosine" => ScheduleKind::Cosine,
        "constant" => ScheduleKind::Constant,
        other => return Err(ctx.err(&origin, "lr_schedule", format!("unknown schedule `{other}`"), Some("use cosine or constant"))),
    };
    let (steps, origin) = or_default(pick(o.steps, "--steps", raw.steps), 500);
    if steps == 0 {
        return Err(ctx.err(&origin, "steps", "must be at least 1".into(), None));
    }
    let (warmup_steps, origin) = or_default(pick(o.warmup_steps, "--warmup-steps", raw.warmup_steps), steps / 20);
    if warmup_steps >= steps && warmup_steps > 0 {
        return Err(ctx.err(&origin, "warmup_steps", format!("{warmup_steps} warm-up steps leave none of the {steps} steps to train at the full rate"), None));
    }
    let (min_lr, origin) = or_default(pick(None, "", raw.min_learning_rate), 0.0);
    let min_learning_rate = non_negative(min_lr, &origin, "min_learning_rate")?;
    if min_learning_rate > learning_rate {
        return Err(ctx.err(&origin, "min_learning_rate", format!("{min_learning_rate} is above the learning rate {learning_rate}"), None));
    }
    let d = AdamWConfig::default();
    let (wd, origin) = or_default(pick(None, "", raw.weight_decay), d.weight_decay);
    let weight_decay = non_negative(wd, &origin, "weight_decay")?;
    let beta = |v: Option<Spanned<f64>>, default: f64, key: &str| -> Result<f64> {
        let (b, origin) = or_default(pick(None, "", v), default);
        if (0.0..1.0).contains(&b) { Ok(b) } else { Err(ctx.err(&origin, key, format!("must be in [0, 1), got {b}"), None)) }
    };
    let beta1 = beta(raw.adam_beta1, d.beta1, "adam_beta1")?;
    let beta2 = beta(raw.adam_beta2, d.beta2, "adam_beta2")?;
    let (eps, origin) = or_default(pick(None, "", raw.adam_epsilon), d.eps);
    let eps = positive(eps, &origin, "adam_epsilon")?;
    let (mgn, origin) = or_default(pick(o.max_grad_norm, "--max-grad-norm", raw.max_grad_norm), 1.0);
    let max_grad_norm = non_negative(mgn, &origin, "max_grad_norm")?;

    let (batch_size, origin) = or_default(pick(o.batch_size, "--batch-size", raw.batch_size), 4);
    if batch_size == 0 || batch_size > 256 {
        return Err(ctx.err(&origin, "batch_size", format!("must be between 1 and 256, got {batch_size}"), None));
    }
    let seed = o.seed.or(raw.seed).unwrap_or(0);

    let res = pick(o.resolution.clone(), "--resolution", raw.resolution.map(|s| Spanned::new(s.value.to_vec(), s.referenced, s.defined)));
    let resolutions = match res {
        None => Vec::new(),
        Some((v, origin)) => {
            if v.is_empty() {
                return Err(ctx.err(&origin, "resolution", "the list is empty".into(), None));
            }
            if let Some(bad) = v.iter().find(|&&r| !(32..=4096).contains(&r)) {
                return Err(ctx.err(&origin, "resolution", format!("{bad} is outside 32..4096"), None));
            }
            let mut v = v;
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    let (bucket_step, origin) = or_default(pick(None, "", raw.bucket_step), 64);
    if bucket_step == 0 || bucket_step % 8 != 0 {
        return Err(ctx.err(&origin, "bucket_step", format!("must be a positive multiple of 8, got {bucket_step}"), None));
    }
    if let Some(&r) = resolutions.iter().find(|&&r| r < bucket_step) {
        return Err(ctx.err(&origin, "bucket_step", format!("{bucket_step} is larger than the resolution {r}"), None));
    }
    let (max_aspect, origin) = or_default(pick(None, "", raw.max_aspect), 2.0);
    if !(max_aspect.is_finite() && max_aspect >= 1.0) {
        return Err(ctx.err(&origin, "max_aspect", format!("must be at least 1, got {max_aspect}"), None));
    }

    let caption = CaptionOptions {
        keep_tokens: o.keep_tokens.or(raw.keep_tokens).unwrap_or(1),
        shuffle: !o.no_shuffle_tags && raw.shuffle_tags.unwrap_or(true),
        tag_dropout: probability(pick(o.tag_dropout, "--tag-dropout", raw.tag_dropout), "tag_dropout")?,
        caption_dropout: probability(pick(o.caption_dropout, "--caption-dropout", raw.caption_dropout), "caption_dropout")?,
    };
    let flip = probability(pick(o.flip, "--flip", raw.flip), "flip")?;
    let (cj, origin) = or_default(pick(o.color_jitter, "--color-jitter", raw.color_jitter), 0.0);
    if !(0.0..=1.0).contains(&cj) {
        return Err(ctx.err(&origin, "color_jitter", format!("must be between 0 and 1, got {cj}"), None));
    }
    let mut wild = [0.0; 5];
    let raws = [raw.sketch, raw.pixelate, raw.oil_paint, raw.noise, raw.perspective];
    for ((slot, w), v) in wild.iter_mut().zip(Wild::ALL).zip(raws) {
        *slot = probability(pick(None, "", v), w.key())?;
    }
    let image = ImageOptions { flip, color_jitter: cj, wild };
    let (augment_variants, origin) = or_default(pick(None, "", raw.augment_variants), if image.any() { 4 } else { 1 });
    if !(1..=64).contains(&augment_variants) {
        return Err(ctx.err(&origin, "augment_variants", format!("must be between 1 and 64, got {augment_variants}"), None));
    }

    let validation_suite = path_of(o.validation_suite.clone(), raw.validation_suite, "--validate");
    let val_every = pick(o.validation_every, "--validate-every", raw.validation_every);
    let ckpt = pick(o.checkpoint_every, "--checkpoint-every", raw.checkpoint_every);
    let checkpoint_every = match (&ckpt, &val_every) {
        (Some((c, _)), _) => *c,
        (None, Some((v, _))) => *v,
        (None, None) => 0,
    };
    let validation = match validation_suite {
        None => {
            if let Some((_, origin)) = &val_every {
                return Err(ctx.err(origin, "validation_every", "is set but no validation suite is".into(), Some("set validation_suite (--validate SUITE)")));
            }
            None
        }
        Some((suite, _)) => {
            let every = val_every.as_ref().map(|(v, _)| *v).unwrap_or(checkpoint_every);
            if let Some((v, origin)) = &val_every {
                if *v == 0 {
                    return Err(ctx.err(origin, "validation_every", "must be at least 1".into(), None));
                }
                if checkpoint_every > 0 && v % checkpoint_every != 0 {
                    return Err(ctx.err(
                        origin,
                        "validation_every",
                        format!("{v} is not a multiple of checkpoint_every {checkpoint_every}"),
                        Some("validation runs on saved checkpoints"),
                    ));
                }
            }
            let lora = pick(o.validation_lora.clone(), "--validate-lora", raw.validation_lora).map(|(l, _)| l);
            Some(ValidationConfig { suite, every, lora })
        }
    };

    let split_flag = o.validation_split.clone().map(|v| match v.trim().parse::<f64>() {
        Ok(f) => SplitRaw::Fraction(f),
        Err(_) => SplitRaw::Folder(v),
    });
    let validation_split = match pick(split_flag, "--validation-split", raw.validation_split) {
        None => None,
        Some((SplitRaw::Fraction(f), origin)) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(ctx.err(
                    &origin,
                    "validation_split",
                    format!("{f} is not a fraction between 0 and 1 (exclusive)"),
                    Some("e.g. 0.1 holds out a tenth of the images; or name a folder of held-out images"),
                ));
            }
            Some(HeldOut::Fraction(f))
        }
        Some((SplitRaw::Folder(d), origin)) => {
            let p = Path::new(&d);
            let p = match origin {
                Origin::File(..) if !p.is_absolute() => ctx.dir().join(p),
                _ => p.to_path_buf(),
            };
            if !p.is_dir() {
                return Err(ctx.err(
                    &origin,
                    "validation_split",
                    format!("folder {} does not exist", p.display()),
                    Some("give a folder of held-out images with captions, or a fraction such as 0.1"),
                ));
            }
            // A folder inside the dataset would be scanned, and trained on, with it.
            if let (Ok(a), Ok(b)) = (p.canonicalize(), dataset.canonicalize())
                && a.starts_with(&b)
            {
                return Err(ctx.err(
                    &origin,
                    "validation_split",
                    format!("folder {} is inside the dataset {}, so it would be trained on", p.display(), dataset.display()),
                    Some("move the held-out images out of the dataset folder, or give a fraction"),
                ));
            }
            Some(HeldOut::Folder(p))
        }
    };

    let (pick_name, origin) = or_default(pick(o.pick.clone(), "--pick", raw.pick), "best".into());
    let pick_rule = match pick_name.as_str() {
        "best" => PickRule::Best,
        "latest-passing" => PickRule::LatestPassing,
        other => return Err(ctx.err(&origin, "pick", format!("unknown rule `{other}`"), Some("use best or latest-passing"))),
    };

    let early_raw = raw.early_stop.map(|s| {
        let origin = Origin::File(s.value.patience.referenced.line() as usize, s.value.patience.referenced.column() as usize);
        (s.value.patience.value, origin)
    });
    let early_stop = match o.early_stop_patience.map(|p| (p, Origin::Flag("--early-stop"))).or(early_raw) {
        None => None,
        Some((patience, origin)) => {
            if patience == 0 {
                return Err(ctx.err(&origin, "early_stop.patience", "must be at least 1".into(), Some("the number of evaluations without improvement before stopping")));
            }
            if validation.is_none() && validation_split.is_none() {
                return Err(ctx.err(
                    &origin,
                    "early_stop",
                    "has nothing to watch: neither validation_suite nor validation_split is set".into(),
                    Some("set validation_split (e.g. 0.1) and/or validation_suite"),
                ));
            }
            if checkpoint_every == 0 {
                return Err(ctx.err(&origin, "early_stop", "needs checkpoints to evaluate".into(), Some("set checkpoint_every or validation_every")));
            }
            Some(EarlyStop { patience })
        }
    };

    Ok(TrainConfig {
        name,
        dataset,
        model,
        output_dir,
        format,
        save_precision,
        rank,
        alpha,
        targets,
        learning_rate,
        lr_schedule,
        warmup_steps,
        min_learning_rate,
        adamw: AdamWConfig { beta1, beta2, eps, weight_decay },
        max_grad_norm,
        steps,
        batch_size,
        seed,
        resolutions,
        bucket_step,
        max_aspect,
        caption,
        default_caption: raw.default_caption,
        image,
        augment_variants,
        duplicate_distance: raw.duplicate_distance.unwrap_or(8),
        checkpoint_every,
        validation,
        validation_split,
        pick: pick_rule,
        early_stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TrainConfig> {
        TrainConfig::parse(Path::new("cfg/train.yaml"), text, &Overrides::default())
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("dataset: data/10_zorb\n").unwrap();
        assert_eq!(c.dataset, PathBuf::from("cfg/data/10_zorb"));
        assert_eq!(c.name, "zorb");
        assert_eq!(c.model, "tiny");
        assert_eq!((c.rank, c.alpha, c.batch_size, c.steps, c.warmup_steps), (8, 8.0, 4, 500, 25));
        assert_eq!(c.targets, vec!["to_q", "to_k", "to_v", "to_out.0"]);
        assert_eq!(c.format, OutputFormat::Kohya);
        assert_eq!(c.output_dir, PathBuf::from("out/train/zorb"));
        assert!(c.caption.shuffle);
        assert_eq!(c.augment_variants, 1);
        assert!(c.validation.is_none());
    }

    #[test]
    fn flags_override_the_file() {
        let o = Overrides { rank: Some(4), resolution: Some(vec![128, 64]), format: Some("diffusers".into()), ..Default::default() };
        let c = TrainConfig::parse(Path::new("t.yaml"), "dataset: d\nrank: 16\nresolution: 96\n", &o).unwrap();
        assert_eq!(c.rank, 4);
        assert_eq!(c.alpha, 4.0, "alpha defaults to the final rank");
        assert_eq!(c.resolutions, vec![64, 128]);
        assert_eq!(c.format, OutputFormat::Diffusers);
        let c = TrainConfig::parse(Path::new("t.yaml"), "dataset: d\nresolution: [64, 128]\nsketch: 0.2\n", &Overrides::default()).unwrap();
        assert_eq!(c.resolutions, vec![64, 128]);
        assert_eq!(c.image.wild[0], 0.2);
        assert_eq!(c.augment_variants, 4);
    }

    #[test]
    fn validation_and_checkpoint_intervals_fit_together() {
        let c = parse("dataset: d\nvalidation_suite: s.yaml\nvalidation_every: 50\n").unwrap();
        assert_eq!(c.checkpoint_every, 50);
        assert_eq!(c.validation.as_ref().unwrap().every, 50);
        assert_eq!(c.validation.unwrap().suite, PathBuf::from("cfg/s.yaml"));
        let e = parse("dataset: d\ncheckpoint_every: 30\nvalidation_suite: s.yaml\nvalidation_every: 50\n").unwrap_err();
        assert!(e.to_string().contains("cfg/train.yaml:4:19:"), "{e}");
        assert!(e.to_string().contains("not a multiple"), "{e}");
    }
}
