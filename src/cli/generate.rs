use std::path::{Path, PathBuf};

use clap::Args;

use crate::device::{device_class, parse_device, parse_dtype};
use crate::error::{Error, ExitCode, Result};
use crate::imageio::{tensor_to_images, write_png};
use crate::lora::{LoraFile, LoraStack};
use crate::model::scheduler::SamplerKind;
use crate::model::{GenerationParams, Pipeline};
use crate::progress::Progress;
use crate::record::{GenerationRecord, LoraUse, VERSION};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// A built-in model (tiny, tiny-sticker) or a diffusers pipeline folder.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// A LoRA file with an optional weight, FILE[:WEIGHT]; repeat to stack LoRAs.
    #[arg(long = "lora", value_parser = super::parse_lora_arg)]
    loras: Vec<(PathBuf, f64)>,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Image size WIDTHxHEIGHT; both must be multiples of 8.
    #[arg(long, value_parser = super::parse_size)]
    size: Option<(usize, usize)>,
    /// Number of images (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "")]
    negative: String,
    /// ddim or euler.
    #[arg(long, default_value = "ddim", value_parser = SamplerKind::parse)]
    sampler: SamplerKind,
    /// Text-encoder layer from the end (1 = last, 2 = penultimate).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or f16/bf16 on a GPU.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The configs of a single-file checkpoint: a diffusers folder, a cached hub id, or an LDM
    /// original_config .yaml (as diffusers' `from_single_file(..., config=...)`).
    #[arg(long)]
    config: Option<String>,
    /// Decode in f32 under f16/bf16 (the SD VAE overflows in f16; without this, an image whose
    /// decode overflows is decoded again in f32, and the run says so).
    #[arg(long, value_name = "DTYPE")]
    vae_dtype: Option<String>,
    /// Output PNG. With --batch N > 1, images are written as NAME-0.png, NAME-1.png, ...
    #[arg(short, long, default_value = "out.png")]
    output: PathBuf,
}

pub fn run(a: GenerateArgs) -> Result<ExitCode> {
    if a.batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let location = crate::model::locate::resolve_model_with_config(&a.model, a.config.as_deref())?;
    let mut pipe = Pipeline::load(&location, dtype, &device)?;
    let vae_dtype = a.vae_dtype.as_deref().map(|v| crate::device::parse_vae_dtype(v, &device)).transpose()?;
    if let Some(v) = vae_dtype {
        pipe.set_vae_dtype(v)?;
    }
    let (width, height) = a.size.unwrap_or_else(|| default_size(&pipe));
    pipe.check_size(width, height)?;

    let files: Vec<LoraFile> = a.loras.iter().map(|(p, _)| LoraFile::load(p)).collect::<Result<_>>()?;
    let pairs: Vec<(&LoraFile, f64)> = files.iter().zip(&a.loras).map(|(f, (_, w))| (f, *w)).collect();
    let stack = LoraStack::resolve(&pipe, &pairs)?;
    let report = stack.apply(&pipe)?;
    if !pairs.is_empty() {
        eprintln!("{report}");
    }

    let params = GenerationParams {
        steps: a.steps,
        guidance: a.guidance,
        width,
        height,
        sampler: a.sampler,
        negative_prompt: a.negative.clone(),
        clip_skip: a.clip_skip,
    };
    let prompts: Vec<&str> = vec![a.prompt.as_str(); a.batch];
    let seeds: Vec<u64> = (0..a.batch as u64).map(|i| a.seed.wrapping_add(i)).collect();
    let progress = Progress::steps("generating", (a.steps * a.batch.div_ceil(pipe.max_batch)) as u64);
    let images = pipe.generate(&prompts, &seeds, &params, &mut |done, _| progress.set(done as u64))?;
    progress.finish();
    for w in pipe.take_warnings() {
        eprintln!("warning: prompt {:?}: {}", w.prompt, w.message);
    }
    for n in pipe.take_notes() {
        eprintln!("note: {n}");
    }

    let model_hash = pipe.fingerprint()?;
    let loras: Vec<LoraUse> =
        files.iter().zip(&a.loras).map(|(f, (_, w))| LoraUse { name: f.name(), hash: f.hash.clone(), weight: *w }).collect();
    for (i, img) in tensor_to_images(&images)?.iter().enumerate() {
        let record = GenerationRecord {
            prompt: a.prompt.clone(),
            negative_prompt: a.negative.clone(),
            seed: seeds[i],
            steps: a.steps,
            guidance: a.guidance,
            sampler: a.sampler.name().into(),
            width,
            height,
            clip_skip: a.clip_skip,
            model: location.name.clone(),
            model_hash: model_hash.clone(),
            loras: loras.clone(),
            device: device_class(&device).into(),
            dtype: crate::device::compute_name(dtype, vae_dtype),
            loragate: VERSION.into(),
            generator: crate::harness::cache::GENERATOR_VERSION.into(),
        };
        let path = output_path(&a.output, i, a.batch);
        write_png(&path, img, &record.png_text())?;
        println!("{}", path.display());
    }
    Ok(ExitCode::Success)
}

/// The model's native size: the UNet's sample size times the VAE factor.
pub(crate) fn default_size(pipe: &Pipeline) -> (usize, usize) {
    let s = pipe.unet.config.sample_size.unwrap_or(64) * pipe.vae_factor();
    (s, s)
}

fn output_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = base.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}-{i}.{ext}"))
}
