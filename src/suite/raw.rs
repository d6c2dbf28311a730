//! A suite file as written: the YAML schema (documented in docs/suites.md and emitted as JSON
//! Schema by `loragate schema`). Values that need checking after parsing carry their source
//! location (`Spanned`), so every error points at a line and column.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::score::clip::Scale;

/// A prompt suite: models, LoRAs, defaults, thresholds and cases.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSuite {
    /// Suite name; names the baseline and output folders. Default: the file name.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub description: Option<String>,
    /// Base models every case runs on unless it says otherwise: `tiny`, `tiny-sticker`, a
    /// diffusers folder, a single file (`{ path: x.safetensors, config: folder-or-yaml }` gives
    /// its configs), or a cached hub id. Default: `[tiny]`.
    #[serde(default)]
    #[schemars(with = "Vec<RawModel>")]
    pub models: Vec<Spanned<RawModel>>,
    /// CLIP scorer: `tiny-clip` (default) or a folder in the transformers CLIPModel layout.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub scorer: Option<Spanned<String>>,
    /// Image encoder of the identity checks (identity, identity groups, stacking): a DINOv2
    /// (`Dinov2Model`) or CLIP folder, or a cached hub id such as `facebook/dinov2-base`.
    /// Default: the CLIP `scorer`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub identity_scorer: Option<Spanned<String>>,
    /// The `aesthetic` check: a LAION-style aesthetic predictor on CLIP image embeddings.
    #[serde(default)]
    #[schemars(with = "Option<RawAesthetic>")]
    pub aesthetic: Option<Spanned<RawAesthetic>>,
    /// The LoRAs cases refer to by name.
    #[serde(default)]
    pub loras: Vec<RawLora>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub thresholds: RawThresholds,
    #[serde(default)]
    pub policy: RawPolicy,
    /// Identity groups: cases whose images must show the same character.
    #[serde(default)]
    pub identity_groups: Vec<RawIdentityGroup>,
    pub cases: Vec<RawCase>,
}

/// A model: a name or path, or a single file with the configs to read it with.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawModel {
    Name(String),
    File(RawModelFile),
}

/// A model with the configs to read it with.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModelFile {
    /// The single file (or folder, or name).
    pub path: String,
    /// Its configs: a diffusers folder, a cached hub id, or an LDM original_config .yaml,
    /// relative to the suite file.
    #[serde(default)]
    pub config: Option<String>,
}

/// The aesthetic predictor and the CLIP model whose image embeddings it reads.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAesthetic {
    /// The predictor as .safetensors (`layers.{0,2,4,6,7}`), relative to the suite file.
    pub predictor: String,
    /// Its CLIP model (the published predictor reads ViT-L/14): a folder or a cached hub id.
    /// Default: the suite's `scorer`.
    #[serde(default)]
    pub clip: Option<String>,
}

/// A LoRA file and how it is used.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    /// The name cases use (`adapters: [zorb]`).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Path relative to the suite file.
    #[schemars(with = "String")]
    pub file: Spanned<String>,
    /// Default weight when a case names the LoRA without one. Default 1.
    #[serde(default)]
    pub weight: Option<f64>,
    /// The trigger word. CLIP has never seen it, so it is replaced by `class_word` (or removed)
    /// in the text that CLIP scores, as DreamBooth evaluations do.
    #[serde(default)]
    pub trigger: Option<String>,
    #[serde(default)]
    pub class_word: Option<String>,
    /// The character sheet: reference images or folders of images, relative to the suite file.
    /// Every image made with this LoRA active and its trigger in the prompt is scored for
    /// identity against them (every case, variant, matrix or prompts-file line, seed).
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub references: Option<Vec<Spanned<String>>>,
    /// The folder of images the LoRA was trained on (kohya `N_name` folders allowed), relative
    /// to the suite file: the `memorization` check runs for this LoRA and compares its images
    /// with these. Default: the dataset its loragate metadata names, when the suite sets
    /// `thresholds.memorization`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub training_set: Option<Spanned<String>>,
}

/// Generation settings for every case unless the case overrides them.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Seeds; each case variant is generated once per seed. Default `[0, 1]`.
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    /// Denoising steps. Default 20.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale. Default 5.
    #[serde(default)]
    pub guidance: Option<f64>,
    /// `WIDTHxHEIGHT`, multiples of 8. Default: the model's native size.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub size: Option<Spanned<String>>,
    /// `ddim` (default) or `euler`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub sampler: Option<Spanned<String>>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub clip_skip: Option<usize>,
    /// The LoRA stack every case uses unless it says otherwise: `name` or `name:weight`.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub adapters: Option<Vec<Spanned<String>>>,
}

/// How CLIP scores of several seeds combine into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    Mean,
    /// Best of N, as people pick the best of four images.
    Best,
    Min,
}

/// Pass/fail limits. Every field is optional; see docs/suites.md for defaults and meanings.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawThresholds {
    /// Minimum CLIP text–image score, in `clip_scale`.
    #[serde(default)]
    pub clip_floor: Option<f64>,
    /// The scale `clip_floor` is written in: `cosine` (default), `torchmetrics` (100×), `clipscore` (2.5×).
    #[serde(default)]
    pub clip_scale: Option<Scale>,
    /// How the seeds' scores combine: `mean` (default), `best`, `min`.
    #[serde(default)]
    pub clip_aggregate: Option<Aggregate>,
    /// Largest allowed drop of the CLIP score against the no-LoRA control (same scale).
    #[serde(default)]
    pub control_drop: Option<f64>,
    /// Smallest mean absolute pixel difference (0–1) from the control: the LoRA has an effect.
    #[serde(default)]
    pub effect: Option<f64>,
    /// Largest mean absolute pixel difference (0–1) from the control. When set, the case checks
    /// that the LoRA leaves it alone (`leak`) instead of checking that it has an effect.
    #[serde(default)]
    pub leak: Option<f64>,
    /// Smallest image similarity (0–1) between tag-order permutations.
    #[serde(default)]
    pub word_order: Option<f64>,
    /// Smallest image–image cosine (of the `identity_scorer`) to identity references / within
    /// identity groups.
    #[serde(default)]
    pub identity: Option<f64>,
    /// Smallest mean aesthetic score of a variant's images (the predictor's own scale: about
    /// 1–10 for the published weights). Default: none, only the drop is checked.
    #[serde(default)]
    pub aesthetic_floor: Option<f64>,
    /// Largest drop of the mean aesthetic score against the no-LoRA control (default 0.5).
    #[serde(default)]
    pub aesthetic_drop: Option<f64>,
    /// Smallest similarity (0–1) to the stored baseline image.
    #[serde(default)]
    pub baseline: Option<f64>,
    /// Largest mean absolute pixel difference between a sweep's weight 0 and the base render.
    #[serde(default)]
    pub sweep_zero: Option<f64>,
    /// Smallest pixel standard deviation (0–1) of an image that is not blank.
    #[serde(default)]
    pub blank: Option<f64>,
    /// Floors and control drops also hold for every seed, not only for the aggregate
    /// (default true). Set false for best-of-N suites (`clip_aggregate: best`).
    #[serde(default)]
    pub per_seed: Option<bool>,
    /// How much worse than the no-LoRA control the LoRA may be on word order and identity
    /// (default 0.05).
    #[serde(default)]
    pub relative_margin: Option<f64>,
    /// The share (0–1) of the control's seed-to-seed variety the LoRA must keep; below it the
    /// LoRA has collapsed to one picture (default 0.5).
    #[serde(default)]
    pub diversity: Option<f64>,
    /// The share (0–1) of the accepted images' likeness among themselves that new images of
    /// the same prompts must keep, over a case and each of its slices (`identity/accepted`,
    /// default 0.5): the reference-free identity check of a retrained LoRA.
    #[serde(default)]
    pub likeness: Option<f64>,
    /// The largest share (0–1) of its own pixel effect a LoRA may lose when stacked with
    /// another (default 0.5).
    #[serde(default)]
    pub stack_loss: Option<f64>,
    /// The largest tolerated drop against the accepted measurements, in each metric's own
    /// units: a map (`{ clip: 0.02, aesthetic: 0.3 }`; metrics: clip, identity, word-order,
    /// effect, leak, diversity, aesthetic, likeness) or one number for every metric. A metric
    /// without one takes a quarter of the seed-to-seed standard deviation of its accepted
    /// measurements. The regression and slice checks fail where a one-sided test finds the
    /// drop above it.
    #[serde(default)]
    #[schemars(with = "Option<RawTolerance>")]
    pub regression: Option<Spanned<RawTolerance>>,
    /// The `memorization` check (suite level only): the image–image cosine (of the
    /// `identity_scorer`) to its nearest training image at or above which a generated image
    /// may be a copy (default 0.6, measured on tiny-clip). Setting it runs the check for every
    /// LoRA cases use with its trigger; a LoRA's `training_set:` alone runs it with the default.
    #[serde(default)]
    pub memorization: Option<f64>,
    /// How much closer (identity cosine) to its nearest training image than its no-LoRA
    /// control is to its own an image must be to count as a copy (default 0.25).
    #[serde(default)]
    pub memorization_margin: Option<f64>,
}

/// Regression tolerances: one number for every metric, or one per metric.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawTolerance {
    All(f64),
    PerMetric(std::collections::BTreeMap<String, f64>),
}

/// What to do when something cannot run as asked.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// A LoRA that cannot apply to a base model: `fail` (default), `skip`, or `expect` (the
    /// suite asserts the LoRA is refused, e.g. an SD 1.5 LoRA on SDXL).
    #[serde(default)]
    pub incompatible_base: Option<IncompatiblePolicy>,
    /// An image whose inputs changed since its baseline was accepted (a new LoRA file, another
    /// prompt): `review` (default: listed as "to review", not a failure) or `fail`.
    #[serde(default)]
    pub changed_images: Option<ChangedImagesPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangedImagesPolicy {
    #[default]
    Review,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncompatiblePolicy {
    Fail,
    Skip,
    Expect,
}

/// One case: a prompt, optionally one variant kind, and checks.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCase {
    /// Unique within the suite; letters, digits, `-`, `_`, `.`; names files.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// The prompt; with `matrix`, a template with `{slot}`s. A case with `prompts_file` has none.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub prompt: Option<Spanned<String>>,
    /// The text CLIP scores, when it should differ from the prompt with triggers replaced.
    #[serde(default)]
    pub score_prompt: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub size: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub sampler: Option<Spanned<String>>,
    #[serde(default)]
    pub clip_skip: Option<usize>,
    /// This case's LoRA stack (`[]` for none): `name` or `name:weight`, applied in order.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub adapters: Option<Vec<Spanned<String>>>,
    /// Generate the same seeds without LoRAs and compare (default true when adapters are used).
    #[serde(default)]
    pub control: Option<bool>,
    /// Variant: permutations of the comma-separated tags.
    #[serde(default)]
    #[schemars(with = "Option<RawWordOrder>")]
    pub word_order: Option<Spanned<RawWordOrder>>,
    /// Variant: a resolution ladder.
    #[serde(default)]
    pub ladder: Option<Vec<RawRung>>,
    /// Variant: base-model swap (models to run on).
    #[serde(default)]
    #[schemars(with = "Option<Vec<RawModel>>")]
    pub models: Option<Vec<Spanned<RawModel>>>,
    /// Variant: a weight sweep of one LoRA of the stack.
    #[serde(default)]
    #[schemars(with = "Option<RawSweep>")]
    pub sweep: Option<Spanned<RawSweep>>,
    /// Variant: failure-point bisection: words added to the prompt one at a time.
    #[serde(default)]
    pub bisect: Option<RawBisect>,
    /// Variant: a prompt matrix: every combination of the slot values (or a seeded sample).
    #[serde(default)]
    #[schemars(with = "Option<RawMatrix>")]
    pub matrix: Option<Spanned<RawMatrix>>,
    /// Variant: prompts from a file in kohya sd-scripts' sample-prompt format (relative to the
    /// suite file): one a line, `#` comments, `--n --w --h --d --l --s --ss` flags per line.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub prompts_file: Option<Spanned<String>>,
    /// Variant: stacking interference: each LoRA alone and every pair at the given weights.
    #[serde(default)]
    #[schemars(with = "Option<RawStack>")]
    pub stack: Option<Spanned<RawStack>>,
    /// Reference images the LoRA's character must match: image files or folders of images
    /// (held-out training images, approved renders), relative to the suite file.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub references: Option<Vec<Spanned<String>>>,
    /// Per-case threshold overrides.
    #[serde(default)]
    pub thresholds: Option<RawThresholds>,
    /// Checks known to fail on this case, with why: reported as known failures instead of
    /// failing the gate, and as "to review" once they pass again (as pytest's xfail).
    #[serde(default)]
    #[schemars(with = "Option<Vec<RawKnownFailure>>")]
    pub known_failures: Option<Vec<Spanned<RawKnownFailure>>>,
}

/// A check that is known to fail, and why.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKnownFailure {
    /// The check's name as reports show it (`per-seed`, `identity`, `clip@192x192`), or a
    /// prefix ending in `*` (`clip*`).
    pub check: String,
    /// Why it fails: shown with the verdict, so say what is known (an issue link, a cause).
    pub reason: String,
}

/// Tag-order permutations: all of them up to `max` (default 24), or `sample` seeded ones.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWordOrder {
    #[serde(default)]
    pub max: Option<usize>,
    #[serde(default)]
    pub sample: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// One rung of a resolution ladder, with an optional floor of its own.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRung {
    #[schemars(with = "String")]
    pub size: Spanned<String>,
    #[serde(default)]
    pub clip_floor: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    /// The LoRA (by name) whose weight varies; the rest of the stack stays as it is.
    pub lora: String,
    pub weights: Vec<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBisect {
    /// Words or tags appended to the prompt one at a time, in order.
    pub add: Vec<String>,
}

/// A prompt matrix: each other key is a slot of the prompt template with its values, e.g.
/// `{ size: [small, large], place: [on the left, on the right], sample: 20 }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct RawMatrix {
    /// Draw this many combinations (seeded) instead of taking them all.
    #[serde(default)]
    pub sample: Option<usize>,
    /// The seed of the draw (default 0).
    #[serde(default)]
    pub seed: Option<u64>,
    /// The most combinations taken without `sample` (default 256): a guard against a typo that
    /// would generate thousands of images.
    #[serde(default)]
    pub max: Option<usize>,
    /// The slots and their values.
    #[serde(flatten)]
    pub slots: std::collections::BTreeMap<String, Vec<SlotValue>>,
}

/// A slot value as YAML writes it: text, or a number or boolean taken as its text.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SlotValue {
    Text(String),
    Integer(i64),
    Number(f64),
    Flag(bool),
}

impl std::fmt::Display for SlotValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotValue::Text(s) => f.write_str(s),
            SlotValue::Integer(i) => write!(f, "{i}"),
            SlotValue::Number(x) => write!(f, "{x}"),
            SlotValue::Flag(b) => write!(f, "{b}"),
        }
    }
}

/// LoRAs to stack: each alone and every pair, at `weights` (default: each LoRA's weight).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStack {
    /// Names from `loras:`, at least two.
    pub loras: Vec<String>,
    #[serde(default)]
    pub weights: Option<Vec<f64>>,
}

/// Cases whose images must show the same character (the sword girl and the staff girl).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIdentityGroup {
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    #[schemars(with = "Vec<String>")]
    pub cases: Vec<Spanned<String>>,
    /// Why this group is known to fail, if it is (reported instead of failing the gate).
    #[serde(default)]
    pub known_failure: Option<String>,
}
