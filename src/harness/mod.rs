//! Running a suite: plan → generate (cached) → embed → check → compare with baselines.
//!
//! The result, a [`SuiteOutcome`], is what every report (console, JUnit, Markdown, HTML) reads.
//! Per-check failures never stop the run: each is recorded, and the exit code reflects them.

pub mod cache;
pub mod checks;
pub mod generate;
pub mod scoring;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;

use crate::baseline::{BaselineStatus, BaselineStore};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::score::ClipScorer;
use crate::score::clip::Scale;
use crate::score::pixels::diff_heat_map;
use crate::suite::expand::expand;
use crate::suite::Suite;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    Passed,
    Failed,
    Skipped,
    /// The check could not be evaluated (infrastructure); counts as a failure.
    Error,
}

/// A pointer from a check to one of the images it looked at.
#[derive(Debug, Clone)]
pub struct ImageShot {
    pub case: String,
    /// `<variant>-s<seed>`: also the baseline file name.
    pub id: String,
    pub job: usize,
    pub control: Option<usize>,
    pub caption: String,
    pub score: Option<f64>,
}

/// One check's verdict (one JUnit test case).
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub case: String,
    /// `clip`, `clip@192x192`, `control`, `effect`, `word-order`, `baseline`, ...
    pub check: String,
    pub status: Status,
    /// What was measured against what limit, in words and numbers.
    pub message: String,
    pub metrics: Vec<(String, f64)>,
    pub shots: Vec<ImageShot>,
}

impl CheckResult {
    pub fn id(&self) -> String {
        format!("{}::{}", self.case, self.check)
    }
}

/// An image with everything a reviewer wants next to it.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub case: String,
    pub id: String,
    pub caption: String,
    pub current: RgbImage,
    pub control: Option<RgbImage>,
    pub baseline: Option<RgbImage>,
    pub diff: Option<RgbImage>,
    pub baseline_score: Option<f64>,
    pub clip: Option<f64>,
    pub prompt: String,
    pub failed: bool,
}

/// Where time went, for the overhead benchmark and the console summary.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub plan: f64,
    pub generate: f64,
    pub score: f64,
    pub checks: f64,
    pub baselines: f64,
}

#[derive(Debug, Clone)]
pub struct SuiteOutcome {
    pub suite: String,
    pub file: PathBuf,
    pub scorer: String,
    pub scale: Scale,
    pub results: Vec<CheckResult>,
    pub evidence: Vec<Evidence>,
    pub images_total: usize,
    pub generated: usize,
    pub cached: usize,
    pub timings: Timings,
    pub pending: Vec<PathBuf>,
    pub stale: Vec<PathBuf>,
    pub warnings: Vec<String>,
    pub baseline_dir: PathBuf,
    pub device: String,
    pub dtype: String,
}

impl SuiteOutcome {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| matches!(r.status, Status::Failed | Status::Error)).count()
    }
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.status == Status::Passed).count()
    }
    pub fn skipped(&self) -> usize {
        self.results.iter().filter(|r| r.status == Status::Skipped).count()
    }
}

/// How to run a suite.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Never write under `baselines/` (CI).
    pub ci: bool,
    pub device: Device,
    pub dtype: DType,
    /// `None` disables the image cache.
    pub cache_dir: Option<PathBuf>,
    pub baselines_dir: PathBuf,
    /// `(n, m)`: run the n-th of m partitions (1-based), as nextest's `--partition count:n/m`.
    pub partition: Option<(usize, usize)>,
    /// Only cases whose name contains this.
    pub filter: Option<String>,
    pub max_batch: usize,
    /// Draw progress bars.
    pub progress: bool,
}

/// The folder holding `start` that looks like a project root (has `.git` or `baselines/`),
/// else the working directory.
pub fn project_root(start: &Path) -> PathBuf {
    let abs = if start.is_absolute() { start.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(start) };
    for dir in abs.ancestors() {
        if dir.join(".git").exists() || dir.join("baselines").is_dir() || dir.join("Cargo.toml").is_file() {
            return dir.to_path_buf();
        }
    }
    std::env::current_dir().unwrap_or_default()
}

/// Keeps the cases of one partition. Cases of an identity group stay together.
pub fn partition_cases(suite: &mut Suite, n: usize, m: usize) -> Result<()> {
    if m == 0 || n == 0 || n > m {
        return Err(Error::invalid(format!("partition {n}/{m}: use N/M with 1 ≤ N ≤ M")));
    }
    let mut unit_of: HashMap<String, usize> = HashMap::new();
    let mut units = 0;
    for g in &suite.identity_groups {
        let existing = g.cases.iter().find_map(|c| unit_of.get(c).copied());
        let u = existing.unwrap_or_else(|| {
            units += 1;
            units - 1
        });
        for c in &g.cases {
            unit_of.insert(c.clone(), u);
        }
    }
    for c in &suite.cases {
        if !unit_of.contains_key(&c.name) {
            unit_of.insert(c.name.clone(), units);
            units += 1;
        }
    }
    // Units in order of their first case, dealt round-robin.
    let mut order: Vec<usize> = Vec::new();
    for c in &suite.cases {
        let u = unit_of[&c.name];
        if !order.contains(&u) {
            order.push(u);
        }
    }
    let keep: HashSet<usize> = order.iter().enumerate().filter(|(i, _)| i % m == n - 1).map(|(_, u)| *u).collect();
    suite.cases.retain(|c| keep.contains(&unit_of[&c.name]));
    let names: HashSet<String> = suite.cases.iter().map(|c| c.name.clone()).collect();
    suite.identity_groups.retain(|g| g.cases.iter().all(|c| names.contains(c)));
    Ok(())
}

/// Runs a validated suite.
pub fn run_suite(suite: &Suite, opts: &RunOptions) -> Result<SuiteOutcome> {
    let t0 = Instant::now();
    let mut suite = suite.clone();
    if let Some((n, m)) = opts.partition {
        partition_cases(&mut suite, n, m)?;
    }
    if let Some(f) = &opts.filter {
        suite.cases.retain(|c| c.name.contains(f.as_str()));
        let names: HashSet<String> = suite.cases.iter().map(|c| c.name.clone()).collect();
        suite.identity_groups.retain(|g| g.cases.iter().all(|c| names.contains(c)));
    }
    let plan = expand(&suite)?;
    let mut timings = Timings { plan: t0.elapsed().as_secs_f64(), ..Default::default() };

    let cache = cache::ImageCache::new(opts.cache_dir.clone());
    let progress = if opts.progress { Progress::steps("generating", plan.jobs.len() as u64) } else { Progress::hidden() };
    let gen_opts = generate::GenerateOptions { device: &opts.device, dtype: opts.dtype, max_batch: opts.max_batch };
    let generation = generate::generate_all(&suite, &plan, &cache, &gen_opts, &progress)?;
    progress.finish();
    timings.generate = generation.seconds;

    let t = Instant::now();
    let scorer = ClipScorer::load(&suite.scorer.1, &opts.device)?;
    let texts: Vec<String> = plan.cases.iter().flat_map(|c| c.variants.iter().map(|v| v.score_text.clone())).collect();
    let refs: Vec<PathBuf> = suite.cases.iter().flat_map(|c| c.references.clone()).collect();
    let progress = if opts.progress { Progress::steps("scoring", plan.jobs.len() as u64) } else { Progress::hidden() };
    let emb = scoring::embed_all(&scorer, &generation.outcomes, &texts, &refs, &progress)?;
    progress.finish();
    timings.score = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut fingerprints = HashMap::new();
    for j in &plan.jobs {
        if !fingerprints.contains_key(&j.model) {
            fingerprints.insert(j.model.clone(), crate::model::pipeline::model_fingerprint(&j.model.location)?);
        }
    }
    let inputs = checks::Inputs { suite: &suite, plan: &plan, generation: &generation, emb: &emb, model_fingerprints: &fingerprints };
    let mut results = checks::run_checks(&inputs)?;
    timings.checks = t.elapsed().as_secs_f64();

    // Baselines: every LoRA (or base) image of every variant, per case.
    let t = Instant::now();
    let class = format!("{}-{}", crate::device::device_class(&opts.device), crate::device::dtype_name(opts.dtype));
    let store = BaselineStore::new(&opts.baselines_dir, &suite.name, &class, !opts.ci);
    let mut evidence = Vec::new();
    let mut produced = HashSet::new();
    let mut pending = Vec::new();
    let mut insert_at: Vec<(usize, crate::harness::CheckResult)> = Vec::new();
    for cp in &plan.cases {
        let case = &suite.cases[cp.case];
        let t_case = &case.thresholds;
        let mut worst: Option<(f64, String)> = None;
        let (mut missing, mut changed, mut compared) = (Vec::new(), Vec::new(), 0);
        let mut notes: Vec<String> = Vec::new();
        for v in &cp.variants {
            for (k, (&j, seed)) in v.images.iter().zip(&v.seeds).enumerate() {
                let o = &generation.outcomes[j];
                let (Some(img), Some(record)) = (&o.image, &o.record) else { continue };
                let id = format!("{}-s{seed}", v.label);
                produced.insert((case.name.clone(), id.clone()));
                let cmp = store.compare(&case.name, &id, img, record, t_case.baseline)?;
                compared += 1;
                let (baseline_img, score) = match &cmp.status {
                    BaselineStatus::Match { score } | BaselineStatus::Changed { score, .. } => {
                        (crate::imageio::read_image(&cmp.baseline).ok(), Some(*score))
                    }
                    BaselineStatus::Missing { .. } => (None, None),
                };
                match &cmp.status {
                    BaselineStatus::Match { .. } => {}
                    BaselineStatus::Changed { score, pending: p } => {
                        changed.push(format!("{id} ({score:.3})"));
                        pending.extend(p.clone());
                        if !cmp.changed_inputs.is_empty() {
                            notes.push(format!("{id}: {}", cmp.changed_inputs.join(", ")));
                        }
                    }
                    BaselineStatus::Missing { pending: p } => {
                        missing.push(id.clone());
                        pending.extend(p.clone());
                    }
                }
                if let Some(s) = score
                    && worst.as_ref().is_none_or(|w| s < w.0) {
                        worst = Some((s, id.clone()));
                    }
                let diff = match &baseline_img {
                    Some(b) if b.dimensions() == img.dimensions() => Some(diff_heat_map(b, img)?),
                    _ => None,
                };
                let control = v.controls.get(k).and_then(|&c| generation.outcomes[c].image.clone());
                evidence.push(Evidence {
                    case: case.name.clone(),
                    id: id.clone(),
                    caption: format!("{} · seed {seed}", v.label),
                    current: img.clone(),
                    control,
                    baseline: baseline_img,
                    diff,
                    baseline_score: score,
                    clip: emb.text_score(j, &v.score_text),
                    prompt: v.prompt.clone(),
                    failed: false,
                });
            }
        }
        if compared == 0 {
            continue;
        }
        let (status, message) = if missing.is_empty() && changed.is_empty() {
            let w = worst.clone().map(|(s, id)| format!("; least similar {id} at {s:.3}")).unwrap_or_default();
            (Status::Passed, format!("{compared} images match their baselines (similarity ≥ {:.3}{w})", t_case.baseline))
        } else {
            let mut parts = Vec::new();
            if !changed.is_empty() {
                parts.push(format!("{} of {compared} images differ from their baselines (similarity < {:.3}): {}", changed.len(), t_case.baseline, changed.join(", ")));
            }
            if !missing.is_empty() {
                parts.push(format!("{} images have no baseline: {}", missing.len(), missing.join(", ")));
            }
            if !notes.is_empty() {
                parts.push(format!("inputs changed since acceptance: {}", notes.join("; ")));
            }
            parts.push(if opts.ci {
                "run the suite locally and settle with `loragate baseline review`".into()
            } else {
                "new images are pending; settle with `loragate baseline review`".into()
            });
            (Status::Failed, parts.join(". "))
        };
        let pos = results.iter().rposition(|r| r.case == case.name).map(|p| p + 1).unwrap_or(results.len());
        let mut r = CheckResult { case: case.name.clone(), check: "baseline".into(), status, message, metrics: vec![], shots: vec![] };
        if let Some((s, _)) = worst {
            r.metrics.push(("similarity_min".into(), s));
        }
        insert_at.push((pos, r));
    }
    for (pos, r) in insert_at.into_iter().rev() {
        results.insert(pos, r);
    }
    // Mark evidence of failed cases so the report can show failures first.
    let failed_cases: HashSet<String> =
        results.iter().filter(|r| matches!(r.status, Status::Failed | Status::Error)).map(|r| r.case.clone()).collect();
    for e in &mut evidence {
        e.failed = failed_cases.contains(&e.case);
    }
    let stale = if opts.partition.is_none() && opts.filter.is_none() { store.stale(&produced) } else { Vec::new() };
    timings.baselines = t.elapsed().as_secs_f64();
    Ok(SuiteOutcome {
        suite: suite.name.clone(),
        file: suite.file.clone(),
        scorer: suite.scorer.0.clone(),
        scale: suite.cases.first().map(|c| c.thresholds.clip_scale).unwrap_or_default(),
        results,
        evidence,
        images_total: plan.jobs.len(),
        generated: generation.generated,
        cached: generation.cached,
        timings,
        pending,
        stale,
        warnings: emb.warnings.clone(),
        baseline_dir: store.dir.clone(),
        device: crate::device::device_class(&opts.device).into(),
        dtype: crate::device::dtype_name(opts.dtype).into(),
    })
}
