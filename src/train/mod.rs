//! `loragate train`: LoRA training whose checkpoints are gated by suites.
//!
//! The stages, in order:
//! 1. [`config`]: YAML and flags → a validated [`TrainConfig`] (errors before any work).
//! 2. [`check`]: the dataset check (unreadable files, missing captions, small images,
//!    near-duplicates); errors stop here.
//! 3. [`dataset`] and [`augment`]: buckets, repeats, augmented copies, caption work.
//! 4. [`network`]: LoRA matrices attached to the UNet as live adapters.
//! 5. [`r#loop`]: latents cached once, then steps of noise → UNet → MSE → AdamW ([`optim`]).
//! 6. [`export`]: checkpoints in kohya or diffusers format with full metadata.
//! 7. [`validate`]: each checkpoint runs the validation suite and, with `validation_split`,
//!    measures the held-out loss.
//! 8. [`pick`]: the checkpoint to ship is chosen (and training may stop early); it is written
//!    as `<name>.safetensors` with the reason in its metadata, and `report.html`
//!    ([`crate::report::training`]) charts the run.
//!
//! ```no_run
//! # fn main() -> loragate::Result<()> {
//! use loragate::train::{TrainConfig, TrainOptions, config::Overrides, run};
//! let cfg = TrainConfig::from_overrides(&Overrides {
//!     dataset: Some("data/zorb".into()),
//!     steps: Some(300),
//!     ..Default::default()
//! })?;
//! let outcome = run(&cfg, &TrainOptions::cpu(), &mut |line| eprintln!("{line}"))?;
//! println!("wrote {}", outcome.final_path.display());
//! # Ok(()) }
//! ```

pub mod augment;
pub mod check;
pub mod config;
pub mod dataset;
pub mod export;
pub mod r#loop;
pub mod network;
pub mod optim;
pub mod pick;
pub mod validate;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};

pub use check::{DatasetCheck, check_dataset};
pub use config::TrainConfig;
pub use r#loop::{StepStats, Trainer};
pub use network::Network;
pub use pick::{Choice, Evaluation};
pub use validate::CheckpointVerdict;

use crate::error::{Error, IoContext, Result};
use crate::model::Pipeline;
use crate::model::locate::{ModelLocation, resolve_model};
use crate::progress::Progress;

/// How to run training.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub device: Device,
    pub dtype: DType,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

impl TrainOptions {
    /// f32 on the CPU, no progress bars.
    pub fn cpu() -> Self {
        TrainOptions { device: Device::Cpu, dtype: DType::F32, progress: false }
    }
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub config: TrainConfig,
    pub check: DatasetCheck,
    /// `<out>/<name>.safetensors`.
    pub final_path: PathBuf,
    /// `(step, file)` of every checkpoint saved.
    pub checkpoints: Vec<(usize, PathBuf)>,
    pub verdicts: Vec<CheckpointVerdict>,
    /// What each checkpoint measured (held-out loss, suite scores), in step order.
    pub evaluations: Vec<Evaluation>,
    /// The held-out loss before the first step, with `validation_split`.
    pub heldout_start: Option<f64>,
    /// The held-out images (dataset-relative paths), never trained on.
    pub heldout_images: Vec<String>,
    /// The checkpoint written as `<name>.safetensors`, and why.
    pub choice: Choice,
    /// The chosen step (`choice.step`).
    pub best: Option<usize>,
    /// Why training stopped before `steps`, when it did.
    pub stopped_early: Option<String>,
    /// `<out>/report.html`.
    pub report: PathBuf,
    pub steps: Vec<StepStats>,
    /// Training steps per second (optimisation only: latent caching, saving and validation
    /// excluded).
    pub steps_per_second: f64,
    /// `<out>/validation/junit.xml`, when validation ran.
    pub junit: Option<PathBuf>,
    /// `<out>/loss.csv`.
    pub log: PathBuf,
}

/// The model location and the dataset check, with `cfg.resolutions` filled in from the
/// model's native size when the config named none. Nothing heavy is loaded.
pub fn prepare(cfg: &TrainConfig) -> Result<(TrainConfig, ModelLocation, DatasetCheck)> {
    let location = resolve_model(&cfg.model)?;
    let mut cfg = cfg.clone();
    if cfg.resolutions.is_empty() {
        let (w, h) = crate::model::pipeline::native_size(&location)?;
        cfg.resolutions = vec![w.min(h)];
    }
    if let Some(&r) = cfg.resolutions.iter().find(|&&r| r < cfg.bucket_step) {
        return Err(Error::invalid(format!(
            "resolution {r} is below bucket_step {}; lower bucket_step or raise the resolution",
            cfg.bucket_step
        )));
    }
    let check = check_dataset(&cfg.dataset, &check_options(&cfg))?;
    Ok((cfg, location, check))
}

/// How a recipe's dataset (and its held-out folder) is checked.
fn check_options(cfg: &TrainConfig) -> check::CheckOptions {
    check::CheckOptions {
        resolutions: cfg.resolutions.clone(),
        bucket_step: cfg.bucket_step,
        max_aspect: cfg.max_aspect,
        duplicate_distance: cfg.duplicate_distance,
        default_caption: cfg.default_caption.clone(),
    }
}

/// The run facts stored in every file: folders, tag counts (of the images trained on), dataset
/// hash, start time.
fn facts(cfg: &TrainConfig, pipe: &Pipeline, check: &DatasetCheck, images: &[dataset::TrainImage]) -> export::RunFacts {
    let mut folders: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut tag_frequency: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for img in images {
        let f = folders.entry(img.folder.clone()).or_insert((img.repeats, 0));
        f.1 += 1;
        let tf = tag_frequency.entry(img.folder.clone()).or_default();
        for t in augment::tags(&img.caption) {
            *tf.entry(t.to_string()).or_default() += 1;
        }
    }
    // SOURCE_DATE_EPOCH makes files byte-reproducible (the reproducible-builds convention).
    let started_at = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    });
    export::RunFacts {
        model: cfg.model.clone(),
        family: pipe.family,
        prediction: pipe.schedule.prediction,
        images: images.len(),
        samples_per_epoch: images.iter().map(|i| i.repeats.max(1)).sum(),
        dataset_hash: check.hash.clone(),
        folders,
        tag_frequency,
        started_at,
    }
}

/// The training and held-out images, as `validation_split` says (all images train without it).
pub fn split_images(cfg: &TrainConfig, check: &DatasetCheck) -> Result<(Vec<dataset::TrainImage>, Vec<dataset::TrainImage>)> {
    match &cfg.validation_split {
        None => Ok((check.images.clone(), Vec::new())),
        Some(config::HeldOut::Fraction(f)) => {
            let (train, held) = dataset::split_heldout(check.images.len(), *f, cfg.seed)
                .map_err(|e| Error::invalid(format!("{} ({})", e, cfg.dataset.display())))?;
            Ok((train.iter().map(|&i| check.images[i].clone()).collect(), held.iter().map(|&i| check.images[i].clone()).collect()))
        }
        Some(config::HeldOut::Folder(dir)) => {
            let held = check_dataset(dir, &check_options(cfg))?;
            if held.errors() > 0 || held.images.is_empty() {
                return Err(Error::invalid(format!(
                    "the held-out folder {} (validation_split) has {} usable image(s) and {} error(s):\n{}",
                    dir.display(),
                    held.images.len(),
                    held.errors(),
                    held.table().trim_end()
                )));
            }
            Ok((check.images.clone(), held.images))
        }
    }
}

/// Checks that buckets fit the model: sides must divide into the UNet's latent levels.
fn check_bucket_step(cfg: &TrainConfig, pipe: &Pipeline) -> Result<()> {
    let need = pipe.vae_factor() << pipe.unet.config.downsamplings();
    if !cfg.bucket_step.is_multiple_of(need) {
        return Err(Error::invalid(format!(
            "bucket_step {} does not suit this model: bucket sides must be multiples of {need} (VAE factor {} × 2^{} UNet downsamplings)",
            cfg.bucket_step,
            pipe.vae_factor(),
            pipe.unet.config.downsamplings()
        )));
    }
    Ok(())
}

/// Trains a LoRA as `cfg` says: dataset check, latents, steps, checkpoints, validation.
/// Human-readable lines (the check table, checkpoint verdicts) go to `log`.
pub fn run(cfg: &TrainConfig, opts: &TrainOptions, log: &mut dyn FnMut(&str)) -> Result<TrainOutcome> {
    let (cfg, location, check) = prepare(cfg)?;
    log(check.table().trim_end());
    if check.errors() > 0 {
        return Err(Error::invalid(format!(
            "the dataset check found {} error(s) in {}; fix them (see the table above) and run again",
            check.errors(),
            cfg.dataset.display()
        )));
    }
    let (train_images, heldout_images) = split_images(&cfg, &check)?;
    let validator = match &cfg.validation {
        Some(v) => Some(validate::Validator::new(v, &opts.device, opts.dtype, &cfg.output_dir)?),
        None => None,
    };
    let pipe = Pipeline::load(&location, opts.dtype, &opts.device)?;
    check_bucket_step(&cfg, &pipe)?;
    std::fs::create_dir_all(&cfg.output_dir).at(&cfg.output_dir)?;
    let facts = facts(&cfg, &pipe, &check, &train_images);

    let bar = |label: &str, n: usize| if opts.progress { Progress::steps(label, n as u64) } else { Progress::hidden() };
    let caching = bar("latents", Trainer::latent_jobs(&cfg, &train_images) + heldout_images.len() * cfg.resolutions.len());
    let mut trainer = Trainer::new(&pipe, cfg.clone(), train_images, &caching)?;
    trainer.set_heldout(&heldout_images, &caching)?;
    caching.finish();
    let heldout_names: Vec<String> = heldout_images.iter().map(|i| i.rel.clone()).collect();
    log(&format!(
        "training {} modules ({} parameters, rank {}, alpha {}) for {} steps of batch {} at {} (resolutions {:?}, {} samples per epoch)",
        trainer.network.modules.len(),
        trainer.network.parameter_count(),
        cfg.rank,
        cfg.alpha,
        cfg.steps,
        cfg.batch_size,
        location.name,
        cfg.resolutions,
        trainer.epoch_len()
    ));
    let heldout_start = trainer.heldout_loss()?;
    if let Some(l) = heldout_start {
        let shown: Vec<&str> = heldout_names.iter().take(4).map(String::as_str).collect();
        log(&format!(
            "held out {} image(s), never trained on ({}{}); held-out loss before training {l:.4} ({} samples × {} fixed timesteps, fixed noise)",
            heldout_names.len(),
            shown.join(", "),
            if heldout_names.len() > shown.len() { ", ..." } else { "" },
            trainer.heldout_len(),
            r#loop::HELDOUT_TIMESTEPS.len()
        ));
    }

    let progress = bar("training", cfg.steps);
    let mut steps = Vec::with_capacity(cfg.steps);
    let mut checkpoints = Vec::new();
    let mut verdicts: Vec<CheckpointVerdict> = Vec::new();
    let mut evaluations: Vec<Evaluation> = Vec::new();
    let mut stopped_early = None;
    let mut ema: Option<f64> = None;
    let mut train_seconds = 0.0;
    let t_all = Instant::now();
    for _ in 0..cfg.steps {
        let s = trainer.train_step()?;
        train_seconds += s.seconds;
        ema = Some(match ema {
            None => s.loss,
            Some(e) => 0.95 * e + 0.05 * s.loss,
        });
        progress.set(s.step as u64);
        progress.message(format!(
            "loss {:.4} · {:.2} steps/s · lr {:.2e}",
            ema.unwrap_or(s.loss),
            s.step as f64 / train_seconds.max(1e-9),
            s.lr
        ));
        steps.push(s);
        let last = s.step == cfg.steps;
        let due = |every: usize| every > 0 && s.step % every == 0;
        let validate_now = validator.is_some() && cfg.validation.as_ref().is_some_and(|v| due(v.every) || last);
        let measure_last = last && heldout_start.is_some();
        if due(cfg.checkpoint_every) || validate_now && last || measure_last {
            let path = cfg.output_dir.join(format!("{}-step{}.safetensors", cfg.name, s.step));
            let heldout = trainer.heldout_loss()?;
            let mut meta = export::metadata(&cfg, &facts, &trainer.network, s.step);
            if let Some(l) = heldout {
                export::put_heldout(&mut meta, l, trainer.heldout_len());
            }
            export::save(&path, &cfg, &trainer.network, &meta)?;
            checkpoints.push((s.step, path.clone()));
            let held_text = heldout.map(|l| format!(" · held-out loss {l:.4}")).unwrap_or_default();
            let mut eval = Evaluation { step: s.step, heldout, suite: None };
            if let (true, Some(v)) = (validate_now, &validator) {
                let verdict = v.validate(&path, s.step)?;
                let line = format!(
                    "step {}: {} — {} passed, {} failed{held_text} ({:.0} s)",
                    s.step,
                    if verdict.ok() { "pass" } else { "FAIL" },
                    verdict.passed,
                    verdict.failed,
                    verdict.seconds
                );
                progress.suspend(|| log(&line));
                eval.suite = Some(verdict.scores.clone());
                verdicts.push(verdict);
            } else {
                let line = format!("step {}: saved {} (loss {:.4}{held_text})", s.step, path.display(), ema.unwrap_or(s.loss));
                progress.suspend(|| log(&line));
            }
            if heldout.is_some() || eval.suite.is_some() {
                evaluations.push(eval);
            }
            if let Some(why) = cfg.early_stop.and_then(|e| pick::stop_reason(&evaluations, e.patience)) {
                let line = format!("step {}: stopped early: {why}", s.step);
                progress.suspend(|| log(&line));
                stopped_early = Some(format!("at step {} of {}: {why}", s.step, cfg.steps));
                break;
            }
        }
    }
    progress.finish();
    let trained = trainer.step;

    let choice = pick::choose(&evaluations, cfg.pick);
    let final_path = cfg.output_dir.join(format!("{}.safetensors", cfg.name));
    let mut extra = BTreeMap::new();
    extra.insert("loragate.pick".to_string(), serde_json::to_value(cfg.pick).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default());
    extra.insert("loragate.pick_reason".to_string(), choice.reason.clone());
    if let Some(why) = &stopped_early {
        extra.insert("loragate.stopped_early".to_string(), why.clone());
    }
    match choice.step.and_then(|st| checkpoints.iter().find(|(c, _)| *c == st)) {
        Some((_, src)) => export::copy_with_metadata(src, &final_path, &extra)?,
        None => {
            let mut meta = export::metadata(&cfg, &facts, &trainer.network, trained);
            meta.extend(extra);
            export::save(&final_path, &cfg, &trainer.network, &meta)?;
        }
    }
    trainer.network.detach();

    let log_path = cfg.output_dir.join("loss.csv");
    let mut csv = String::from("step,loss,lr,grad_norm,seconds,heldout_loss\n");
    for s in &steps {
        let held = evaluations.iter().find(|e| e.step == s.step).and_then(|e| e.heldout).map(|l| format!("{l:.6}")).unwrap_or_default();
        csv.push_str(&format!("{},{:.6},{:.6e},{:.6},{:.4},{held}\n", s.step, s.loss, s.lr, s.grad_norm, s.seconds));
    }
    crate::fsutil::write_text_atomic(&log_path, &csv)?;

    let steps_per_second = trained as f64 / train_seconds.max(1e-9);
    log(&format!(
        "trained {} steps in {:.1} s ({:.2} steps/s; {:.1} s in total with checkpoints and validation){}",
        trained,
        train_seconds,
        steps_per_second,
        t_all.elapsed().as_secs_f64(),
        stopped_early.as_ref().map(|w| format!("; stopped early {w}")).unwrap_or_default()
    ));
    if let Some(v) = &validator {
        log(&format!("validation by suite `{}`:", v.suite_name()));
    }
    if !evaluations.is_empty() {
        log(validate::table(&evaluations, &verdicts, choice.step).trim_end());
    }
    let junit = match &validator {
        Some(v) if !verdicts.is_empty() => Some(v.write_junit(&verdicts)?),
        _ => None,
    };
    match choice.step {
        Some(st) => log(&format!("chosen checkpoint: step {st} → {} ({})", final_path.display(), choice.reason)),
        None => log(&format!("wrote {} ({})", final_path.display(), choice.reason)),
    }
    if let Some(j) = &junit {
        log(&format!("junit: {}", j.display()));
    }
    let report = cfg.output_dir.join("report.html");
    let html = crate::report::training::to_html(&crate::report::training::TrainingRun {
        name: &cfg.name,
        model: &location.name,
        suite: validator.as_ref().map(|v| v.suite_name()),
        steps: &steps,
        planned_steps: cfg.steps,
        heldout_start,
        heldout_images: heldout_names.len(),
        evaluations: &evaluations,
        verdicts: &verdicts,
        choice: &choice,
        pick: cfg.pick,
        stopped_early: stopped_early.as_deref(),
        final_file: &final_path,
    })?;
    crate::fsutil::write_text_atomic(&report, &html)?;
    log(&format!("report: {}", report.display()));
    let best = choice.step;
    let _ = std::io::stderr().flush();
    Ok(TrainOutcome {
        config: cfg,
        check,
        final_path,
        checkpoints,
        verdicts,
        evaluations,
        heldout_start,
        heldout_images: heldout_names,
        choice,
        best,
        stopped_early,
        report,
        steps,
        steps_per_second,
        junit,
        log: log_path,
    })
}
