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
//! 7. [`validate`]: each checkpoint runs the validation suite; the best passing one is named.
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
    /// The step of the best passing checkpoint, when validation ran and one passed.
    pub best: Option<usize>,
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
    let check = check_dataset(
        &cfg.dataset,
        &check::CheckOptions {
            resolutions: cfg.resolutions.clone(),
            bucket_step: cfg.bucket_step,
            max_aspect: cfg.max_aspect,
            duplicate_distance: cfg.duplicate_distance,
            default_caption: cfg.default_caption.clone(),
        },
    )?;
    Ok((cfg, location, check))
}

/// The run facts stored in every file: folders, tag counts, dataset hash, start time.
fn facts(cfg: &TrainConfig, pipe: &Pipeline, check: &DatasetCheck) -> export::RunFacts {
    let mut folders: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut tag_frequency: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for img in &check.images {
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
        images: check.images.len(),
        samples_per_epoch: check.samples_per_epoch(),
        dataset_hash: check.hash.clone(),
        folders,
        tag_frequency,
        started_at,
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
    let validator = match &cfg.validation {
        Some(v) => Some(validate::Validator::new(v, &opts.device, opts.dtype, &cfg.output_dir)?),
        None => None,
    };
    let pipe = Pipeline::load(&location, opts.dtype, &opts.device)?;
    check_bucket_step(&cfg, &pipe)?;
    std::fs::create_dir_all(&cfg.output_dir).at(&cfg.output_dir)?;
    let facts = facts(&cfg, &pipe, &check);

    let bar = |label: &str, n: usize| if opts.progress { Progress::steps(label, n as u64) } else { Progress::hidden() };
    let caching = bar("latents", Trainer::latent_jobs(&cfg, &check.images));
    let mut trainer = Trainer::new(&pipe, cfg.clone(), check.images.clone(), &caching)?;
    caching.finish();
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

    let progress = bar("training", cfg.steps);
    let mut steps = Vec::with_capacity(cfg.steps);
    let mut checkpoints = Vec::new();
    let mut verdicts = Vec::new();
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
        if due(cfg.checkpoint_every) || validate_now && last {
            let path = cfg.output_dir.join(format!("{}-step{}.safetensors", cfg.name, s.step));
            let meta = export::metadata(&cfg, &facts, &trainer.network, s.step);
            export::save(&path, &cfg, &trainer.network, &meta)?;
            checkpoints.push((s.step, path.clone()));
            if let (true, Some(v)) = (validate_now, &validator) {
                let verdict = v.validate(&path, s.step)?;
                let line = format!(
                    "step {}: {} — {} passed, {} failed ({:.0} s)",
                    s.step,
                    if verdict.ok() { "pass" } else { "FAIL" },
                    verdict.passed,
                    verdict.failed,
                    verdict.seconds
                );
                progress.suspend(|| log(&line));
                verdicts.push(verdict);
            } else {
                let line = format!("step {}: saved {} (loss {:.4})", s.step, path.display(), ema.unwrap_or(s.loss));
                progress.suspend(|| log(&line));
            }
        }
    }
    progress.finish();
    let final_path = cfg.output_dir.join(format!("{}.safetensors", cfg.name));
    let meta = export::metadata(&cfg, &facts, &trainer.network, trainer.step);
    export::save(&final_path, &cfg, &trainer.network, &meta)?;
    trainer.network.detach();

    let log_path = cfg.output_dir.join("loss.csv");
    let mut csv = String::from("step,loss,lr,grad_norm,seconds\n");
    for s in &steps {
        csv.push_str(&format!("{},{:.6},{:.6e},{:.6},{:.4}\n", s.step, s.loss, s.lr, s.grad_norm, s.seconds));
    }
    crate::fsutil::write_text_atomic(&log_path, &csv)?;

    let steps_per_second = cfg.steps as f64 / train_seconds.max(1e-9);
    log(&format!(
        "trained {} steps in {:.1} s ({:.2} steps/s; {:.1} s in total with checkpoints and validation); wrote {}",
        cfg.steps,
        train_seconds,
        steps_per_second,
        t_all.elapsed().as_secs_f64(),
        final_path.display()
    ));
    let (junit, best) = match &validator {
        Some(v) if !verdicts.is_empty() => {
            log(&format!("validation by suite `{}`:", v.suite_name()));
            log(validate::table(&verdicts).trim_end());
            let junit = v.write_junit(&verdicts)?;
            let best = validate::best(&verdicts);
            match best {
                Some(b) => log(&format!("best passing checkpoint: {} (step {})", b.file.display(), b.step)),
                None => log("no checkpoint passed every check"),
            }
            log(&format!("junit: {}", junit.display()));
            (Some(junit), best.map(|b| b.step))
        }
        _ => (None, None),
    };
    let _ = std::io::stderr().flush();
    Ok(TrainOutcome {
        config: cfg,
        check,
        final_path,
        checkpoints,
        verdicts,
        best,
        steps,
        steps_per_second,
        junit,
        log: log_path,
    })
}
