//! Raw suite → validated [`Suite`]: defaults applied, names checked, models and LoRA files
//! found and read, reference images decoded, sizes and samplers parsed, variants expanded to
//! their concrete lists. Nothing is generated until all of this has succeeded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::raw::{self, RawCase, RawSuite, RawThresholds};
use super::{AdapterUse, Case, IdentityGroup, ModelRef, Policy, Settings, Suite, SuiteLora, Thresholds, Variant};
use crate::error::{Error, ExitCode, Result};
use crate::names::SafeName;
use crate::lora::LoraFile;
use crate::model::noise::Rng;
use crate::model::locate::{resolve_model, resolve_scorer};
use crate::model::scheduler::SamplerKind;

/// Builds located errors for one suite file.
struct Ctx<'a> {
    file: &'a Path,
    dir: PathBuf,
}

impl Ctx<'_> {
    fn err_at(&self, line: usize, column: usize, message: impl Into<String>, hint: Option<String>) -> Error {
        Error::Suite { file: self.file.to_path_buf(), line, column, message: message.into(), hint, infrastructure: false }
    }

    fn err<T>(&self, at: &Spanned<T>, message: impl Into<String>, hint: Option<String>) -> Error {
        self.err_at(at.referenced.line() as usize, at.referenced.column() as usize, message, hint)
    }

    /// A path written in the suite, relative to the suite's folder.
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.dir.join(p) }
    }
}

/// Reads, parses and validates a suite file.
pub fn load_suite(path: &Path) -> Result<Suite> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        // Not text at all is a bad suite (exit 2), located at the first invalid byte.
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let column = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            return Err(Error::Suite {
                file: path.to_path_buf(),
                line,
                column,
                message: "the suite file is not UTF-8 text".into(),
                hint: Some("save it as UTF-8; suite files are YAML".into()),
                infrastructure: false,
            });
        }
    };
    parse_suite(path, &text)
}

/// The name a suite file gives its baselines (its `name:`, else its file stem), without
/// loading its models and LoRAs.
pub fn suite_name_of(path: &Path) -> Result<SafeName> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let ctx = Ctx { file: path, dir };
    let raw: RawSuite = serde_saphyr::from_str(&text).map_err(|e| yaml_error(&ctx, &e))?;
    suite_name(&ctx, &raw)
}

fn suite_name(ctx: &Ctx, raw: &RawSuite) -> Result<SafeName> {
    match &raw.name {
        Some(n) => check_name(ctx, n, "suite name"),
        None => {
            let stem = ctx.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "suite".into());
            SafeName::new(&stem).map_err(|why| {
                ctx.err_at(1, 1, format!("the file name `{stem}` {why} and the suite has no `name:`"), Some(format!("add `name: {}`", SafeName::slug(&stem))))
            })
        }
    }
}

/// Parses and validates suite text; `path` locates relative files and names the file in errors.
pub fn parse_suite(path: &Path, text: &str) -> Result<Suite> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let ctx = Ctx { file: path, dir };
    let raw: RawSuite = serde_saphyr::from_str(text).map_err(|e| yaml_error(&ctx, &e))?;
    resolve(&ctx, raw)
}

fn yaml_error(ctx: &Ctx, e: &serde_saphyr::Error) -> Error {
    let (line, column, message) = crate::error::yaml_error_parts(e);
    let hint = if message.contains("unknown field") {
        Some("check the spelling; `loragate schema` prints every field a suite may have".to_string())
    } else if message.contains("missing field") {
        Some("add the field; docs/suites.md shows a complete example".to_string())
    } else if message.starts_with("invalid") {
        Some("the value has the wrong type for this field; see `loragate schema`".to_string())
    } else {
        None
    };
    ctx.err_at(line, column, message, hint)
}

fn parse_size(ctx: &Ctx, s: &Spanned<String>) -> Result<(usize, usize)> {
    let bad = || ctx.err(s, format!("`{}` is not a size", s.value), Some("write WIDTHxHEIGHT, e.g. 128x128".into()));
    let (w, h) = s.value.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (usize, usize) = (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
        return Err(ctx.err(
            s,
            format!("size {w}x{h} is not a multiple of 8 (the VAE works on 8x8 pixel cells)"),
            Some(format!("try {}x{}", w.max(8).div_ceil(8) * 8, h.max(8).div_ceil(8) * 8)),
        ));
    }
    if w * h > 4096 * 4096 {
        return Err(ctx.err(s, format!("size {w}x{h} is larger than 4096x4096"), None));
    }
    Ok((w, h))
}

fn parse_sampler(ctx: &Ctx, s: &Spanned<String>) -> Result<SamplerKind> {
    SamplerKind::parse(&s.value).map_err(|e| ctx.err(s, e.to_string(), None))
}

fn check_name(ctx: &Ctx, s: &Spanned<String>, what: &str) -> Result<SafeName> {
    SafeName::new(&s.value).map_err(|why| {
        ctx.err(s, format!("{what} `{}` {why}", s.value), Some(format!("{what}s name files; try `{}`", SafeName::slug(&s.value))))
    })
}

fn resolve_model_ref(ctx: &Ctx, s: &Spanned<raw::RawModel>) -> Result<ModelRef> {
    let (written, config) = match &s.value {
        raw::RawModel::Name(n) => (n, None),
        raw::RawModel::File(f) => (&f.path, f.config.as_ref()),
    };
    let relative = |w: &String| -> String {
        if crate::model::locate::BUILTIN_MODELS.iter().any(|(n, _)| n == w) || w == "tiny-sd" || (!Path::new(w).exists() && !ctx.path(w).exists() && crate::model::locate::looks_like_hub_id(w)) {
            w.clone()
        } else {
            ctx.path(w).to_string_lossy().into_owned()
        }
    };
    let arg = relative(written);
    let config_arg = config.map(relative);
    // The same file read with other configs is another model, with another label.
    let label = match config {
        Some(c) => SafeName::for_model(&format!("{written} with {c}")),
        None => SafeName::for_model(written),
    };
    match crate::model::locate::resolve_model_with_config(&arg, config_arg.as_deref()) {
        Ok(location) => Ok(ModelRef { name: written.clone(), label, location }),
        Err(e) => {
            // A model folder that is not there is an environment problem (exit 3); an unknown
            // built-in name or a folder that is not a model is the suite's fault (exit 2).
            let infrastructure = e.exit_code() == ExitCode::Infrastructure;
            let mut err = ctx.err(
                s,
                format!("model `{written}`: {e}"),
                Some("use a built-in model (tiny, tiny-sticker) or a diffusers folder relative to the suite file".into()),
            );
            if let Error::Suite { infrastructure: i, .. } = &mut err {
                *i = infrastructure;
            }
            Err(err)
        }
    }
}

fn thresholds(ctx: &Ctx, base: &Thresholds, raw: &RawThresholds) -> Result<Thresholds> {
    let scale = raw.clip_scale.unwrap_or(base.clip_scale);
    let to_cos = |v: Option<f64>, d: f64| v.map(|v| scale.to_cosine(v)).unwrap_or(d);
    let regression = match &raw.regression {
        None => base.regression.clone(),
        Some(t) => tolerances(ctx, t, base)?,
    };
    Ok(Thresholds {
        clip_floor: to_cos(raw.clip_floor, base.clip_floor),
        clip_scale: scale,
        clip_aggregate: raw.clip_aggregate.unwrap_or(base.clip_aggregate),
        control_drop: to_cos(raw.control_drop, base.control_drop),
        effect: raw.effect.unwrap_or(base.effect),
        leak: raw.leak.or(base.leak),
        word_order: raw.word_order.unwrap_or(base.word_order),
        identity: raw.identity.unwrap_or(base.identity),
        aesthetic_floor: raw.aesthetic_floor.or(base.aesthetic_floor),
        aesthetic_drop: raw.aesthetic_drop.unwrap_or(base.aesthetic_drop),
        baseline: raw.baseline.unwrap_or(base.baseline),
        sweep_zero: raw.sweep_zero.unwrap_or(base.sweep_zero),
        blank: raw.blank.unwrap_or(base.blank),
        per_seed: raw.per_seed.unwrap_or(base.per_seed),
        relative_margin: raw.relative_margin.unwrap_or(base.relative_margin),
        diversity: raw.diversity.unwrap_or(base.diversity),
        likeness: raw.likeness.unwrap_or(base.likeness),
        stack_loss: raw.stack_loss.unwrap_or(base.stack_loss),
        regression,
        memorization: raw.memorization.or(base.memorization),
        memorization_margin: raw.memorization_margin.unwrap_or(base.memorization_margin),
    })
}

/// `regression:` as written: one number for every metric, or a map by metric name. A case's
/// map adds to (and overrides) the suite's.
fn tolerances(ctx: &Ctx, t: &Spanned<raw::RawTolerance>, base: &Thresholds) -> Result<crate::suite::Tolerances> {
    use crate::baseline::scores::Metric;
    let check = |name: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(ctx.err(t, format!("regression tolerance {name} = {v}: it must be a number ≥ 0, in the metric's own units"), None))
        }
    };
    match &t.value {
        raw::RawTolerance::All(v) => Ok(crate::suite::Tolerances { all: Some(check("(all metrics)", *v)?), per_metric: Default::default() }),
        raw::RawTolerance::PerMetric(map) => {
            let mut out = base.regression.clone();
            for (name, v) in map {
                let metric = Metric::ALL.iter().copied().find(|m| m.name() == name).ok_or_else(|| {
                    let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
                    ctx.err(t, format!("regression tolerance for `{name}`: no such metric"), Some(format!("metrics: {}", names.join(", "))))
                })?;
                out.per_metric.insert(metric, check(name, *v)?);
            }
            Ok(out)
        }
    }
}

/// A scorer named in the suite (relative to it, a cached hub id, or `tiny-clip`) → its folder.
fn resolve_scorer_arg(ctx: &Ctx, arg: &Spanned<String>, what: &str) -> Result<PathBuf> {
    let written = arg.value.as_str();
    let path = if written == crate::model::locate::BUILTIN_SCORER { written.to_string() } else { ctx.path(written).to_string_lossy().into_owned() };
    resolve_scorer(&path).map_err(|e| ctx.err(arg, format!("{what}: {e}"), Some("use `tiny-clip`, a model folder relative to the suite, or a cached hub id".into())))
}

/// The identity checks' image encoder: a DINOv2 or CLIP folder.
fn resolve_image_scorer(ctx: &Ctx, arg: &Spanned<String>) -> Result<(String, PathBuf)> {
    let dir = resolve_scorer_arg(ctx, arg, "identity_scorer")?;
    crate::model::locate::scorer_kind(&dir).map_err(|e| ctx.err(arg, format!("identity_scorer: {e}"), None))?;
    Ok((arg.value.clone(), dir))
}

/// The aesthetic predictor, checked now (layout, and that it reads its CLIP model's width) so a
/// mismatch stops the run before anything is generated.
fn resolve_aesthetic(ctx: &Ctx, a: &Spanned<raw::RawAesthetic>, scorer: &(String, PathBuf)) -> Result<crate::suite::AestheticSpec> {
    let predictor = ctx.path(&a.value.predictor);
    if !predictor.is_file() {
        return Err(ctx.err(a, format!("aesthetic predictor `{}` not found (looked at {})", a.value.predictor, predictor.display()), Some("paths are relative to the suite file".into())));
    }
    let model = crate::model::aesthetic::AestheticModel::open(&predictor, &crate::device::Device::Cpu).map_err(|e| ctx.err(a, e.to_string(), None))?;
    let clip = match &a.value.clip {
        Some(c) => {
            let spanned = Spanned { value: c.clone(), referenced: a.referenced, defined: a.defined };
            (c.clone(), resolve_scorer_arg(ctx, &spanned, "aesthetic clip")?)
        }
        None => scorer.clone(),
    };
    if crate::model::locate::scorer_kind(&clip.1).map_err(|e| ctx.err(a, format!("aesthetic clip: {e}"), None))? != crate::model::locate::ScorerKind::Clip {
        return Err(ctx.err(a, format!("aesthetic clip `{}` is not a CLIP model: the predictor reads CLIP image embeddings", clip.0), None));
    }
    let config: serde_json::Value = crate::model::loading::read_config(&clip.1.join("config.json"))?;
    let width = config["projection_dim"].as_u64().unwrap_or(512) as usize;
    if width != model.input_width() {
        return Err(ctx.err(
            a,
            format!("the aesthetic predictor reads {}-wide CLIP embeddings but `{}` gives {width}", model.input_width(), clip.0),
            Some("set `clip:` to the CLIP model the predictor was trained on (ViT-L/14 for the published one)".into()),
        ));
    }
    Ok(crate::suite::AestheticSpec { predictor, clip })
}

fn check_thresholds(ctx: &Ctx, t: &Thresholds, line: usize) -> Result<()> {
    let unit = [
        ("effect", t.effect),
        ("word_order", t.word_order),
        ("baseline", t.baseline),
        ("blank", t.blank),
        ("sweep_zero", t.sweep_zero),
        ("relative_margin", t.relative_margin),
        ("diversity", t.diversity),
        ("likeness", t.likeness),
        ("stack_loss", t.stack_loss),
        ("memorization_margin", t.memorization_margin),
    ];
    let unit = unit.into_iter().chain(t.leak.map(|v| ("leak", v)));
    for (name, v) in unit {
        if !(0.0..=1.0).contains(&v) {
            return Err(ctx.err_at(line, 1, format!("threshold `{name}` is {v}; it must be between 0 and 1"), None));
        }
    }
    for (name, v) in [("clip_floor", t.clip_floor), ("identity", t.identity)].into_iter().chain(t.memorization.map(|v| ("memorization", v))) {
        if !(-1.0..=1.0).contains(&v) {
            return Err(ctx.err_at(
                line,
                1,
                format!("threshold `{name}` is {v} as a raw cosine, outside [-1, 1]"),
                Some("if the value is in another scale, set `clip_scale: torchmetrics` (100×) or `clipscore` (2.5×)".into()),
            ));
        }
    }
    for (name, v) in t.aesthetic_floor.map(|v| ("aesthetic_floor", v)).into_iter().chain([("aesthetic_drop", t.aesthetic_drop)]) {
        if !v.is_finite() || (name == "aesthetic_drop" && v < 0.0) {
            return Err(ctx.err_at(line, 1, format!("threshold `{name}` is {v}; it must be a finite number{}", if name == "aesthetic_drop" { " of at least 0" } else { "" }), None));
        }
    }
    if !(0.0..=2.0).contains(&t.control_drop) {
        return Err(ctx.err_at(line, 1, format!("threshold `control_drop` is {} as a raw cosine, outside [0, 2]", t.control_drop), None));
    }
    Ok(())
}

fn parse_adapters(
    ctx: &Ctx,
    list: &[Spanned<String>],
    loras: &[SuiteLora],
) -> Result<Vec<AdapterUse>> {
    list.iter()
        .map(|s| {
            let (name, weight) = match s.value.rsplit_once(':') {
                Some((n, w)) => {
                    let w: f64 = w.trim().parse().map_err(|_| {
                        ctx.err(s, format!("`{}`: weight `{w}` is not a number", s.value), Some("write name or name:weight, e.g. zorb:0.7".into()))
                    })?;
                    (n.trim(), Some(w))
                }
                None => (s.value.trim(), None),
            };
            let idx = loras.iter().position(|l| l.name == name).ok_or_else(|| {
                let known: Vec<&str> = loras.iter().map(|l| l.name.as_str()).collect();
                ctx.err(
                    s,
                    format!("no LoRA named `{name}`"),
                    Some(if known.is_empty() {
                        "declare it under `loras:` with a name and a file".into()
                    } else {
                        format!("known LoRAs: {}", known.join(", "))
                    }),
                )
            })?;
            let weight = weight.unwrap_or(loras[idx].weight);
            if !weight.is_finite() {
                return Err(ctx.err(s, "LoRA weight is not a finite number", None));
            }
            Ok(AdapterUse { lora: idx, weight })
        })
        .collect()
}

/// The text CLIP scores: triggers replaced by class words (or removed), tidy commas.
pub fn score_text(prompt: &str, loras: &[&SuiteLora]) -> String {
    let mut tags: Vec<String> = prompt.split(',').map(|t| t.trim().to_string()).collect();
    for l in loras {
        if let Some(trigger) = &l.trigger {
            for t in &mut tags {
                let words: Vec<String> = t
                    .split_whitespace()
                    .map(|w| if w.eq_ignore_ascii_case(trigger) { l.class_word.clone().unwrap_or_default() } else { w.to_string() })
                    .filter(|w| !w.is_empty())
                    .collect();
                *t = words.join(" ");
            }
        }
    }
    tags.retain(|t| !t.is_empty());
    if tags.is_empty() {
        // Nothing but a trigger: CLIP gets the prompt as written rather than an empty text.
        return prompt.trim().to_string();
    }
    tags.join(", ")
}

/// Tag-order permutations: the original first, then the others.
fn permutations(ctx: &Ctx, prompt: &str, spec: &Spanned<raw::RawWordOrder>) -> Result<Vec<String>> {
    let tags: Vec<String> = prompt.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    if tags.len() < 2 {
        return Err(ctx.err(spec, "word_order needs a prompt of at least two comma-separated tags", None));
    }
    let n = tags.len();
    let total: usize = (1..=n).try_fold(1usize, |acc, k| acc.checked_mul(k)).unwrap_or(usize::MAX);
    let order_prompt = |order: &[usize]| order.iter().map(|&i| tags[i].as_str()).collect::<Vec<_>>().join(", ");
    if let Some(k) = spec.value.sample {
        if k < 2 {
            return Err(ctx.err(spec, "word_order.sample must be at least 2 (the original order and one other)", None));
        }
        let k = k.min(total);
        let mut rng = Rng::new(spec.value.seed.unwrap_or(0));
        let mut seen: BTreeSet<Vec<usize>> = BTreeSet::new();
        let ident: Vec<usize> = (0..n).collect();
        seen.insert(ident.clone());
        let mut out = vec![order_prompt(&ident)];
        let mut tries = 0;
        while out.len() < k && tries < 10_000 {
            tries += 1;
            let mut order = ident.clone();
            rng.shuffle(&mut order);
            if seen.insert(order.clone()) {
                out.push(order_prompt(&order));
            }
        }
        return Ok(out);
    }
    let max = spec.value.max.unwrap_or(24);
    if total > max {
        return Err(ctx.err(
            spec,
            format!("{n} tags have {total} orders, more than max {max}"),
            Some(format!("raise `max`, or use `sample: N` for N seeded orders (e.g. sample: {})", max.min(8))),
        ));
    }
    // Heap's algorithm gives every permutation; the identity comes first.
    let mut order: Vec<usize> = (0..n).collect();
    let mut c = vec![0usize; n];
    let mut out = vec![order_prompt(&order)];
    let mut i = 0;
    while i < n {
        if c[i] < i {
            if i % 2 == 0 { order.swap(0, i) } else { order.swap(c[i], i) }
            out.push(order_prompt(&order));
            c[i] += 1;
            i = 0;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
    Ok(out)
}

fn resolve(ctx: &Ctx, raw: RawSuite) -> Result<Suite> {
    let name = suite_name(ctx, &raw)?;
    let scorer_arg = raw.scorer.as_ref().map(|s| s.value.clone()).unwrap_or_else(|| crate::model::locate::BUILTIN_SCORER.into());
    let scorer_path = match &raw.scorer {
        Some(s) => {
            let dir = resolve_scorer_arg(ctx, s, "scorer")?;
            if crate::model::locate::scorer_kind(&dir).map_err(|e| ctx.err(s, format!("scorer: {e}"), None))? != crate::model::locate::ScorerKind::Clip {
                return Err(ctx.err(s, format!("scorer `{}` is not a CLIP model: the text–image checks need one", s.value), Some("DINOv2 reads no text; name it as `identity_scorer`".into())));
            }
            dir
        }
        None => resolve_scorer(&scorer_arg).map_err(|e| ctx.err_at(1, 1, e.to_string(), None))?,
    };

    let identity_scorer = raw.identity_scorer.as_ref().map(|s| resolve_image_scorer(ctx, s)).transpose()?;
    let aesthetic = raw.aesthetic.as_ref().map(|a| resolve_aesthetic(ctx, a, &(scorer_arg.clone(), scorer_path.clone()))).transpose()?;

    // LoRAs: names unique, files readable and valid.
    let mut loras: Vec<SuiteLora> = Vec::new();
    let mut cache: HashMap<PathBuf, Arc<LoraFile>> = HashMap::new();
    for l in &raw.loras {
        if loras.iter().any(|x| x.name == l.name.value) {
            return Err(ctx.err(&l.name, format!("LoRA name `{}` is used twice", l.name.value), None));
        }
        // LoRA names appear in variant labels and file names (`zorb+sticker-s0.png`).
        let name = check_name(ctx, &l.name, "LoRA name")?;
        let path = ctx.path(&l.file.value);
        if !path.is_file() {
            return Err(ctx.err(
                &l.file,
                format!("LoRA file `{}` not found (looked at {})", l.file.value, path.display()),
                Some("paths are relative to the suite file".into()),
            ));
        }
        let file = match cache.get(&path) {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(LoraFile::load(&path).map_err(|e| ctx.err(&l.file, e.to_string(), None))?);
                cache.insert(path.clone(), f.clone());
                f
            }
        };
        let weight = l.weight.unwrap_or(1.0);
        if !weight.is_finite() {
            return Err(ctx.err(&l.name, "weight is not a finite number", None));
        }
        loras.push(SuiteLora {
            name,
            file,
            weight,
            trigger: l.trigger.clone().filter(|t| !t.trim().is_empty()),
            class_word: l.class_word.clone(),
            references: resolve_references(ctx, l.references.as_deref().unwrap_or(&[]))?,
            training_set: crate::suite::TrainingSet::NotAsked,
        });
    }

    let suite_models: Vec<ModelRef> = if raw.models.is_empty() {
        vec![ModelRef { name: "tiny".into(), label: SafeName::for_model("tiny"), location: resolve_model("tiny")? }]
    } else {
        raw.models.iter().map(|m| resolve_model_ref(ctx, m)).collect::<Result<_>>()?
    };

    let d = &raw.defaults;
    let defaults = Settings {
        seeds: d.seeds.clone().unwrap_or_else(|| vec![0, 1]),
        steps: d.steps.unwrap_or(20),
        guidance: d.guidance.unwrap_or(5.0),
        size: d.size.as_ref().map(|s| parse_size(ctx, s)).transpose()?,
        sampler: d.sampler.as_ref().map(|s| parse_sampler(ctx, s)).transpose()?.unwrap_or_default(),
        negative_prompt: d.negative_prompt.clone().unwrap_or_default(),
        clip_skip: d.clip_skip.unwrap_or(1),
    };
    let default_adapters = match &d.adapters {
        Some(list) => parse_adapters(ctx, list, &loras)?,
        None => Vec::new(),
    };
    let suite_thresholds = thresholds(ctx, &Thresholds::default(), &raw.thresholds)?;
    check_thresholds(ctx, &suite_thresholds, 1)?;
    for (l, rl) in loras.iter_mut().zip(&raw.loras) {
        l.training_set = training_set(ctx, rl, &l.file, suite_thresholds.memorization.is_some())?;
    }

    let mut cases = Vec::with_capacity(raw.cases.len());
    let mut names = BTreeSet::new();
    if raw.cases.is_empty() {
        return Err(ctx.err_at(1, 1, "the suite has no cases", Some("add a `cases:` list with at least one case".into())));
    }
    for rc in &raw.cases {
        let name = check_name(ctx, &rc.name, "case name")?;
        if !names.insert(name.clone()) {
            return Err(ctx.err(&rc.name, format!("case name `{}` is used twice", rc.name.value), None));
        }
        cases.push(resolve_case(ctx, rc, name, &defaults, &default_adapters, &loras, &suite_models, &suite_thresholds)?);
    }

    let mut identity_groups = Vec::new();
    for g in &raw.identity_groups {
        if g.cases.len() < 2 {
            return Err(ctx.err(&g.name, "an identity group needs at least two cases", None));
        }
        let mut members = Vec::new();
        for c in &g.cases {
            match names.iter().find(|n| n.as_str() == c.value) {
                Some(n) if !members.contains(n) => members.push(n.clone()),
                Some(_) => return Err(ctx.err(c, format!("identity group `{}` names case `{}` twice", g.name.value, c.value), None)),
                None => return Err(ctx.err(c, format!("identity group `{}` names no case `{}`", g.name.value, c.value), None)),
            }
        }
        let group = check_name(ctx, &g.name, "identity group name")?;
        if identity_groups.iter().any(|x: &IdentityGroup| x.name == group) {
            return Err(ctx.err(&g.name, format!("identity group name `{}` is used twice", g.name.value), None));
        }
        let known_failure = g.known_failure.clone().filter(|r| !r.trim().is_empty());
        identity_groups.push(IdentityGroup { name: group, cases: members, known_failure });
    }

    Ok(Suite {
        name,
        file: ctx.file.to_path_buf(),
        description: raw.description.clone(),
        scorer: (scorer_arg, scorer_path),
        identity_scorer,
        aesthetic,
        loras,
        cases,
        identity_groups,
        policy: Policy {
            incompatible_base: raw.policy.incompatible_base.unwrap_or(raw::IncompatiblePolicy::Fail),
            changed_images: raw.policy.changed_images.unwrap_or_default(),
        },
        thresholds: suite_thresholds,
    })
}

#[allow(clippy::too_many_arguments)]
fn resolve_case(
    ctx: &Ctx,
    rc: &RawCase,
    name: SafeName,
    defaults: &Settings,
    default_adapters: &[AdapterUse],
    loras: &[SuiteLora],
    suite_models: &[ModelRef],
    suite_thresholds: &Thresholds,
) -> Result<Case> {
    let line = rc.name.referenced.line() as usize;
    // The case's prompt: as written; for a prompt file, its first line (what the report shows
    // as the case's prompt; every line is a variant).
    let file_entries = match &rc.prompts_file {
        Some(f) => {
            if let Some(p) = &rc.prompt {
                return Err(ctx.err(p, "a case with `prompts_file` takes its prompts from the file", Some("remove `prompt`, or `prompts_file`".into())));
            }
            Some(read_prompts_file(ctx, f)?)
        }
        None => None,
    };
    let prompt = match (&rc.prompt, &file_entries) {
        (Some(p), _) if p.value.trim().is_empty() => return Err(ctx.err(p, "the prompt is empty", None)),
        (Some(p), _) => p.value.clone(),
        (None, Some(entries)) => entries[0].prompt.clone(),
        (None, None) => return Err(ctx.err(&rc.name, "the case has no prompt", Some("add `prompt:` (or `prompts_file:` with prompts in kohya's format)".into()))),
    };
    let settings = Settings {
        seeds: rc.seeds.clone().unwrap_or_else(|| defaults.seeds.clone()),
        steps: rc.steps.unwrap_or(defaults.steps),
        guidance: rc.guidance.unwrap_or(defaults.guidance),
        size: match &rc.size {
            Some(s) => Some(parse_size(ctx, s)?),
            None => defaults.size,
        },
        sampler: rc.sampler.as_ref().map(|s| parse_sampler(ctx, s)).transpose()?.unwrap_or(defaults.sampler),
        negative_prompt: rc.negative_prompt.clone().unwrap_or_else(|| defaults.negative_prompt.clone()),
        clip_skip: rc.clip_skip.unwrap_or(defaults.clip_skip),
    };
    if settings.seeds.is_empty() {
        return Err(ctx.err(&rc.name, "the case has no seeds", Some("give `seeds: [0, 1]` or remove the empty list".into())));
    }
    if settings.steps == 0 || settings.steps > 1000 {
        return Err(ctx.err(&rc.name, format!("steps must be between 1 and 1000, got {}", settings.steps), None));
    }
    if !settings.guidance.is_finite() {
        return Err(ctx.err(&rc.name, "guidance is not a finite number", None));
    }
    let mut adapters = match &rc.adapters {
        Some(list) => parse_adapters(ctx, list, loras)?,
        None => default_adapters.to_vec(),
    };
    if rc.thresholds.as_ref().is_some_and(|t| t.memorization.is_some() || t.memorization_margin.is_some()) {
        return Err(ctx.err_at(
            line,
            1,
            format!("case `{name}` sets `memorization` thresholds: the memorization check judges all of a LoRA's images across the suite at once"),
            Some("set `memorization` and `memorization_margin` in the suite's `thresholds:`".into()),
        ));
    }
    let mut thresholds = thresholds(ctx, suite_thresholds, rc.thresholds.as_ref().unwrap_or(&RawThresholds::default()))?;
    if rc.thresholds.as_ref().is_some_and(|t| t.clip_scale.is_none()) {
        thresholds.clip_scale = suite_thresholds.clip_scale;
    }
    check_thresholds(ctx, &thresholds, line)?;

    let kinds = [
        rc.word_order.is_some(),
        rc.ladder.is_some(),
        rc.models.is_some(),
        rc.sweep.is_some(),
        rc.bisect.is_some(),
        rc.stack.is_some(),
        rc.matrix.is_some(),
        rc.prompts_file.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() > 1 {
        return Err(ctx.err(
            &rc.name,
            "a case can have one variant (word_order, ladder, models, sweep, bisect, stack, matrix or prompts_file)",
            Some("split it into one case per variant".into()),
        ));
    }
    let mut models = suite_models.to_vec();
    let variant = if let Some(spec) = &rc.word_order {
        Variant::WordOrder { prompts: permutations(ctx, &prompt, spec)? }
    } else if let Some(rungs) = &rc.ladder {
        if rungs.is_empty() {
            return Err(ctx.err(&rc.name, "the ladder has no rungs", None));
        }
        let scale = thresholds.clip_scale;
        let rungs = rungs
            .iter()
            .map(|r| Ok((parse_size(ctx, &r.size)?, r.clip_floor.map(|f| scale.to_cosine(f)))))
            .collect::<Result<Vec<_>>>()?;
        Variant::Ladder { rungs }
    } else if let Some(ms) = &rc.models {
        if ms.is_empty() {
            return Err(ctx.err(&rc.name, "`models` is empty", None));
        }
        models = Vec::new();
        for m in ms {
            let r = resolve_model_ref(ctx, m)?;
            if models.iter().any(|x: &ModelRef| x.label == r.label || x.location == r.location) {
                return Err(ctx.err(m, format!("model `{}` is listed twice", r.name), None));
            }
            models.push(r);
        }
        Variant::BaseSwap
    } else if let Some(sw) = &rc.sweep {
        let adapter = adapters.iter().position(|a| loras[a.lora].name == sw.value.lora).ok_or_else(|| {
            ctx.err(sw, format!("the sweep's LoRA `{}` is not in this case's adapters", sw.value.lora), Some("add it to `adapters`".into()))
        })?;
        if sw.value.weights.len() < 2 || sw.value.weights.iter().any(|w| !w.is_finite()) {
            return Err(ctx.err(sw, "a sweep needs at least two finite weights", None));
        }
        Variant::Sweep { adapter, weights: sw.value.weights.clone() }
    } else if let Some(b) = &rc.bisect {
        if b.add.is_empty() {
            return Err(ctx.err(&rc.name, "bisect.add is empty", None));
        }
        Variant::Bisect { add: b.add.clone() }
    } else if let Some(m) = &rc.matrix {
        let slots: Vec<(String, Vec<String>)> = m.value.slots.iter().map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_string()).collect())).collect();
        let entries = super::prompts::expand_matrix(&prompt, &slots, m.value.sample, m.value.seed.unwrap_or(0), m.value.max.unwrap_or(256))
            .map_err(|e| ctx.err(m, format!("matrix: {e}"), None))?;
        Variant::Prompts { entries }
    } else if let Some(entries) = file_entries {
        Variant::Prompts { entries }
    } else if let Some(st) = &rc.stack {
        if rc.adapters.is_some() {
            return Err(ctx.err(st, "a stack case takes its LoRAs from `stack:`", Some("remove `adapters` from this case".into())));
        }
        let stacked = parse_stack(ctx, st, loras)?;
        // The whole stack is the case's adapters: what `applied` and the score text refer to.
        adapters = stacked.clone();
        Variant::Stack { loras: stacked }
    } else {
        Variant::Single
    };
    let references = resolve_references(ctx, rc.references.as_deref().unwrap_or(&[]))?;
    let used: Vec<&SuiteLora> = adapters.iter().map(|a| &loras[a.lora]).collect();
    let score_text = rc.score_prompt.clone().unwrap_or_else(|| score_text(&prompt, &used));
    if matches!(variant, Variant::Stack { .. }) && rc.control == Some(false) {
        return Err(ctx.err(&rc.name, "a stack case needs its no-LoRA control: it measures each LoRA's effect against it", Some("remove `control: false`".into())));
    }
    let mut known_failures = Vec::new();
    for k in rc.known_failures.iter().flatten() {
        let kind = k.value.check.trim_end_matches('*');
        let base = kind.split(['/', '@']).next().unwrap_or("");
        let valid = super::CHECK_KINDS.iter().any(|c| if k.value.check.ends_with('*') { c.starts_with(base) } else { *c == base });
        if !valid {
            return Err(ctx.err(k, format!("known failure `{}` names no check", k.value.check), Some(format!("checks: {}", super::CHECK_KINDS.join(", ")))));
        }
        if k.value.reason.trim().is_empty() {
            return Err(ctx.err(k, "a known failure needs a reason", Some("say why it fails, so the report can tell the reader".into())));
        }
        known_failures.push(super::KnownFailure { check: k.value.check.clone(), reason: k.value.reason.trim().to_string() });
    }
    Ok(Case {
        name,
        known_failures,
        prompt,
        score_text,
        settings,
        control: rc.control.unwrap_or(true) && !adapters.is_empty(),
        adapters,
        models,
        variant,
        references,
        thresholds,
        line,
    })
}

/// A LoRA's training images for the memorization check: `training_set:` as written (it must be
/// a folder with images), else, when the suite asks for the check, the dataset its loragate
/// metadata names. A named folder that is not there is recorded as missing (the check then
/// says so), never skipped.
fn training_set(ctx: &Ctx, l: &raw::RawLora, file: &LoraFile, asked: bool) -> Result<crate::suite::TrainingSet> {
    use crate::suite::TrainingSet;
    let count = |dir: &Path| crate::train::dataset::scan(dir).map(|s| s.images.len()).unwrap_or(0);
    if let Some(t) = &l.training_set {
        let dir = ctx.path(&t.value);
        if !dir.is_dir() {
            return Err(ctx.err(t, format!("training set `{}` not found (looked at {})", t.value, dir.display()), Some("a folder of training images, relative to the suite file".into())));
        }
        if count(&dir) == 0 {
            return Err(ctx.err(
                t,
                format!("training set `{}` has no images (looked for {} at its top level and in N_name folders)", t.value, crate::train::dataset::IMAGE_EXTENSIONS.join(", ")),
                None,
            ));
        }
        return Ok(TrainingSet::Folder { dir, origin: format!("training_set: {}", t.value), from_metadata: false });
    }
    if !asked {
        return Ok(TrainingSet::NotAsked);
    }
    Ok(training_set_from_metadata(&l.name.value, file, &ctx.dir))
}

/// The training set a LoRA file's loragate metadata names (`dataset` of
/// `loragate.training_config`), for a suite in `suite_dir`: a folder of images, or why not.
pub fn training_set_from_metadata(name: &str, file: &LoraFile, suite_dir: &Path) -> crate::suite::TrainingSet {
    use crate::suite::TrainingSet;
    let count = |dir: &Path| crate::train::dataset::scan(dir).map(|s| s.images.len()).unwrap_or(0);
    let named = file
        .metadata
        .get("loragate.training_config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .and_then(|c| c["dataset"].as_str().map(str::to_string));
    let Some(named) = named else {
        return TrainingSet::Missing(format!(
            "LoRA `{name}` has no `training_set:` and its file's metadata names no loragate dataset: set `training_set:` to the folder it was trained on"
        ));
    };
    // Recipes name datasets relative to where `loragate train` ran (usually a project root),
    // so look in the suite's and the LoRA file's projects, in the working directory, beside
    // the LoRA file and beside the suite.
    let p = Path::new(&named);
    let lora_dir = file.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        let mut c = vec![crate::harness::project_root(suite_dir).join(p), crate::harness::project_root(lora_dir).join(p)];
        if let Ok(cwd) = std::env::current_dir() {
            c.push(cwd.join(p));
        }
        c.push(lora_dir.join(p));
        c.push(suite_dir.join(p));
        let mut seen = std::collections::HashSet::new();
        c.retain(|d| seen.insert(d.clone()));
        c
    };
    match candidates.iter().find(|d| d.is_dir() && count(d) > 0) {
        Some(dir) => TrainingSet::Folder { dir: dir.clone(), origin: format!("the dataset its metadata names, {named}"), from_metadata: true },
        None => TrainingSet::Missing(format!(
            "LoRA `{name}`'s metadata names the dataset `{named}`, and no folder of images is there (looked at {}): regenerate it with the LoRA's training recipe, or set `training_set:`",
            candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Reference images as written (files, or folders of images), each decoded now so a corrupt
/// one stops the run before anything is generated.
fn resolve_references(ctx: &Ctx, list: &[Spanned<String>]) -> Result<Vec<PathBuf>> {
    let mut references: Vec<PathBuf> = Vec::new();
    for r in list {
        let p = ctx.path(&r.value);
        let is_dir = p.is_dir();
        let files = if is_dir {
            // A folder: every image in it, in name order (held-out training images, approved renders).
            let listed = std::fs::read_dir(&p).map_err(|e| ctx.err(r, format!("reference folder `{}` cannot be listed: {e}", r.value), None))?;
            let mut files: Vec<PathBuf> = listed
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().and_then(|x| x.to_str()).is_some_and(|x| ["png", "jpg", "jpeg", "webp"].contains(&x.to_ascii_lowercase().as_str())))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(ctx.err(r, format!("reference folder `{}` has no images (.png, .jpg, .jpeg, .webp)", r.value), None));
            }
            files
        } else if p.is_file() {
            vec![p]
        } else {
            return Err(ctx.err(r, format!("reference image `{}` not found (looked at {})", r.value, p.display()), None));
        };
        for f in files {
            // Decoded now, so a corrupt reference stops the run before anything is generated.
            crate::imageio::read_image(&f).map_err(|e| {
                let shown = if is_dir { format!("{}/{}", r.value.trim_end_matches('/'), f.file_name().unwrap_or_default().to_string_lossy()) } else { r.value.clone() };
                ctx.err(r, format!("reference image `{shown}` cannot be read: {e}"), Some("replace it with a PNG, JPEG or WebP image".into()))
            })?;
            if !references.contains(&f) {
                references.push(f);
            }
        }
    }
    Ok(references)
}

/// A stack variant's LoRAs, by name, with their weights.
fn parse_stack(ctx: &Ctx, st: &Spanned<raw::RawStack>, loras: &[SuiteLora]) -> Result<Vec<AdapterUse>> {
    let spec = &st.value;
    if spec.loras.len() < 2 {
        return Err(ctx.err(st, "a stack needs at least two LoRAs", Some("list them under `loras:`, e.g. [zorb, sticker]".into())));
    }
    if spec.loras.len() > 6 {
        return Err(ctx.err(st, format!("a stack of {} LoRAs makes {} pairs; at most 6 LoRAs", spec.loras.len(), spec.loras.len() * (spec.loras.len() - 1) / 2), None));
    }
    if let Some(w) = &spec.weights
        && w.len() != spec.loras.len() {
            return Err(ctx.err(st, format!("the stack has {} LoRAs and {} weights", spec.loras.len(), w.len()), Some("give one weight per LoRA, or none".into())));
        }
    let mut out: Vec<AdapterUse> = Vec::new();
    for (i, name) in spec.loras.iter().enumerate() {
        let idx = loras.iter().position(|l| l.name == name.as_str()).ok_or_else(|| {
            let known: Vec<&str> = loras.iter().map(|l| l.name.as_str()).collect();
            ctx.err(st, format!("the stack names no LoRA `{name}`"), Some(format!("known LoRAs: {}", known.join(", "))))
        })?;
        if out.iter().any(|a| a.lora == idx) {
            return Err(ctx.err(st, format!("the stack names `{name}` twice"), None));
        }
        let weight = spec.weights.as_ref().map(|w| w[i]).unwrap_or(loras[idx].weight);
        if !weight.is_finite() || weight == 0.0 {
            return Err(ctx.err(st, format!("stack weight {weight} of `{name}` must be a finite number other than 0"), None));
        }
        out.push(AdapterUse { lora: idx, weight });
    }
    Ok(out)
}

/// Reads a case's `prompts_file` (kohya's sample-prompt format); errors name the file and line.
fn read_prompts_file(ctx: &Ctx, f: &Spanned<String>) -> Result<Vec<super::prompts::PromptEntry>> {
    let path = ctx.path(&f.value);
    let text = std::fs::read_to_string(&path).map_err(|e| ctx.err(f, format!("prompts file `{}` cannot be read ({}): {e}", f.value, path.display()), None))?;
    super::prompts::parse_prompt_file(&text).map_err(|(line, message)| Error::Suite {
        file: path.clone(),
        line,
        column: 1,
        message,
        hint: Some("one prompt a line; flags: --n negative prompt, --w/--h size, --d seed, --l guidance, --s steps, --ss sampler".into()),
        infrastructure: false,
    })
}
