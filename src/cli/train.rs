//! `loragate train [CONFIG] [flags]`: train a LoRA; `--check` only checks the dataset.

use std::path::PathBuf;

use clap::Args;

use crate::device::{parse_device, parse_dtype};
use crate::error::{ExitCode, Result};
use crate::train::config::Overrides;
use crate::train::{TrainConfig, TrainOptions};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A YAML training config; flags override its values.
    config: Option<PathBuf>,
    /// Dataset folder: images with same-name .txt captions, kohya `N_name` repeat folders allowed.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Base model: tiny (default), tiny-sticker or a diffusers folder.
    #[arg(long)]
    model: Option<String>,
    /// Output folder. Default: out/train/<name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output name (file stem). Default: the dataset folder's name.
    #[arg(long)]
    name: Option<String>,
    /// kohya (default) or diffusers.
    #[arg(long)]
    format: Option<String>,
    /// f32 (default) or f16.
    #[arg(long)]
    save_precision: Option<String>,
    #[arg(long)]
    rank: Option<usize>,
    /// Default: the rank.
    #[arg(long)]
    alpha: Option<f64>,
    /// Comma-separated layer-name suffixes, e.g. to_q,to_k,to_v,to_out.0,ff.net.0.proj,conv1.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// cosine (default) or constant after warm-up.
    #[arg(long)]
    lr_schedule: Option<String>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Training resolution(s), comma-separated for multi-resolution training. Default: the model's.
    #[arg(long, value_delimiter = ',')]
    resolution: Option<Vec<usize>>,
    /// Tags kept first and never dropped.
    #[arg(long)]
    keep_tokens: Option<usize>,
    /// Keep tags in their written order.
    #[arg(long)]
    no_shuffle_tags: bool,
    #[arg(long)]
    tag_dropout: Option<f64>,
    #[arg(long)]
    caption_dropout: Option<f64>,
    /// Probability of a horizontal flip.
    #[arg(long)]
    flip: Option<f64>,
    #[arg(long)]
    color_jitter: Option<f64>,
    /// 0 disables clipping.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Run this suite on checkpoints.
    #[arg(long = "validate")]
    validation_suite: Option<PathBuf>,
    /// Validate every N steps (a multiple of --checkpoint-every).
    #[arg(long = "validate-every")]
    validation_every: Option<usize>,
    /// The suite LoRA that checkpoints replace (default: the suite's only LoRA).
    #[arg(long = "validate-lora")]
    validation_lora: Option<String>,
    /// Held-out images, never trained on: a fraction (0.1) or a folder.
    #[arg(long)]
    validation_split: Option<String>,
    /// Which checkpoint becomes <name>.safetensors: best (default) or latest-passing.
    #[arg(long)]
    pick: Option<String>,
    /// Stop once nothing improved for N evaluations.
    #[arg(long = "early-stop", value_name = "PATIENCE")]
    early_stop: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Only check the dataset and print the findings.
    #[arg(long)]
    check: bool,
}

impl TrainArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            name: self.name.clone(),
            dataset: self.dataset.clone(),
            model: self.model.clone(),
            output_dir: self.out.clone(),
            format: self.format.clone(),
            save_precision: self.save_precision.clone(),
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            learning_rate: self.lr,
            lr_schedule: self.lr_schedule.clone(),
            warmup_steps: self.warmup_steps,
            steps: self.steps,
            batch_size: self.batch_size,
            seed: self.seed,
            resolution: self.resolution.clone(),
            keep_tokens: self.keep_tokens,
            no_shuffle_tags: self.no_shuffle_tags,
            tag_dropout: self.tag_dropout,
            caption_dropout: self.caption_dropout,
            flip: self.flip,
            color_jitter: self.color_jitter,
            max_grad_norm: self.max_grad_norm,
            checkpoint_every: self.checkpoint_every,
            validation_suite: self.validation_suite.clone(),
            validation_every: self.validation_every,
            validation_lora: self.validation_lora.clone(),
            validation_split: self.validation_split.clone(),
            pick: self.pick.clone(),
            early_stop_patience: self.early_stop,
        }
    }
}

pub fn run(a: TrainArgs) -> Result<ExitCode> {
    // `cli::run` prepared the process for training: candle's element-wise ops on one thread
    // unless CANDLE_NUM_THREADS says otherwise (`device::prepare_process`).
    let o = a.overrides();
    let cfg = match &a.config {
        Some(p) => TrainConfig::load(p, &o)?,
        None => TrainConfig::from_overrides(&o)?,
    };
    if a.check {
        let (_, _, check) = crate::train::prepare(&cfg)?;
        print!("{}", check.table());
        return Ok(if check.errors() > 0 { ExitCode::Usage } else { ExitCode::Success });
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype("f32", &device)?;
    let opts = TrainOptions { device, dtype, progress: true };
    let outcome = crate::train::run(&cfg, &opts, &mut |line| println!("{line}"))?;
    // Validation failures are check failures, as in `loragate suite`: no passing checkpoint → 1.
    Ok(if !outcome.verdicts.is_empty() && !outcome.verdicts.iter().any(|v| v.ok()) { ExitCode::CheckFailed } else { ExitCode::Success })
}
