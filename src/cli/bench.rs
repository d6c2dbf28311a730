//! `loragate bench`: measurements printed as one JSON object, for `scripts/gpu-check.sh` and the
//! side-by-side comparisons with PyTorch. Loading is timed apart from the work; GPU work is
//! synchronised before a clock stops.
//!
//! - `parity`: tiny-sd against the PyTorch fixtures on a device and dtype (and, in half
//!   precision, against the same device in f32);
//! - `txt2img`: seconds per image and images per second of a model at given sizes and batches;
//! - `unet`: milliseconds per UNet call.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::error::{Error, ExitCode, Result};
use crate::model::locate::resolve_model;
use crate::model::unet::AddedConditioning;
use crate::model::{GenerationParams, Pipeline};
use crate::tensors::TensorFile;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// tiny-sd against the PyTorch parity fixtures (tests/fixtures/parity).
    Parity(ParityArgs),
    /// Text to image: load time, then the median time of `--repeat` runs per batch size.
    Txt2img(Txt2imgArgs),
    /// One UNet call (with classifier-free guidance's doubled batch), median of `--calls`.
    Unet(UnetArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// A built-in name, a diffusers folder, a single file or a cached hub id.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or f16/bf16 on a GPU.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Debug, Args)]
struct ParityArgs {
    #[command(flatten)]
    common: Common,
    /// The folder with parity.safetensors and parity.json.
    #[arg(long, default_value = "tests/fixtures/parity")]
    fixtures: PathBuf,
}

#[derive(Debug, Args)]
struct Txt2imgArgs {
    #[command(flatten)]
    common: Common,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Timed runs per batch size, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The VAE's dtype, when it should differ (f32 under f16).
    #[arg(long)]
    vae_dtype: Option<String>,
}

#[derive(Debug, Args)]
struct UnetArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Images per call (the UNet sees twice as many rows under guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 10)]
    calls: usize,
}

fn load(c: &Common) -> Result<(Pipeline, Device, DType, f64)> {
    let device = parse_device(&c.device)?;
    let dtype = parse_dtype(&c.dtype, &device)?;
    let t = Instant::now();
    let pipe = Pipeline::load(&resolve_model(&c.model)?, dtype, &device)?;
    device.synchronize()?;
    Ok((pipe, device, dtype, t.elapsed().as_secs_f64()))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Largest and mean absolute difference, as f32 on the CPU.
fn diff(a: &Tensor, b: &Tensor) -> Result<Value> {
    let d = (a.to_dtype(DType::F32)?.to_device(&Device::Cpu)? - b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?.abs()?;
    let max = d.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mean = d.mean_all()?.to_scalar::<f32>()?;
    Ok(json!({ "max": max, "mean": mean }))
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    let out = match a.what {
        What::Parity(p) => parity(&p)?,
        What::Txt2img(t) => txt2img(&t)?,
        What::Unet(u) => unet(&u)?,
    };
    println!("{}", serde_json::to_string_pretty(&out).expect("serialisable"));
    Ok(ExitCode::Success)
}

/// The fixture pipeline (20 DDIM steps, guidance 5, the fixture's initial latents).
fn fixture_images(pipe: &Pipeline, prompts: &[&str], latents: &Tensor) -> Result<Tensor> {
    let params = GenerationParams { steps: 20, guidance: 5.0, ..Default::default() };
    let latents = latents.to_device(&pipe.device)?.to_dtype(pipe.dtype)?;
    pipe.generate_from_latents(prompts, &latents, &params, &mut |_, _| {})
}

fn parity(a: &ParityArgs) -> Result<Value> {
    let (pipe, device, dtype, load_s) = load(&a.common)?;
    let fx = TensorFile::load(a.fixtures.join("parity.safetensors"), DType::F32, &device)?.tensors;
    let get = |k: &str| fx.get(k).cloned().ok_or_else(|| Error::invalid(format!("{}: no fixture `{k}`", a.fixtures.display())));
    let meta: Value = serde_json::from_str(&crate::fsutil::read_text(&a.fixtures.join("parity.json"))?).map_err(|e| Error::invalid(e.to_string()))?;
    let prompts: Vec<String> = meta["prompts"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let to = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?) };
    let eps = pipe.unet.forward(&to(get("unet.sample")?)?, &get("unet.timestep")?, &to(get("unet.context")?)?, None)?;
    let decoded = pipe.decode(&to(get("vae.latents")?)?)?;
    let images = fixture_images(&pipe, &prompts, &get("pipe.latents")?)?;
    let mut out = json!({
        "device": a.common.device,
        "dtype": dtype_name(dtype),
        "load_s": load_s,
        "against_pytorch_f32": {
            "unet": diff(&eps, &get("unet.eps")?)?,
            "vae_decode": diff(&decoded, &get("vae.decoded")?)?,
            "pipeline": diff(&images, &get("pipe.images")?)?,
        },
    });
    if dtype != DType::F32 {
        let f32_pipe = Pipeline::load(&pipe.location, DType::F32, &device)?;
        out["against_f32_same_device"] = json!({ "pipeline": diff(&images, &fixture_images(&f32_pipe, &prompts, &get("pipe.latents")?)?)? });
    }
    out["notes"] = json!(pipe.take_notes());
    Ok(out)
}

fn txt2img(a: &Txt2imgArgs) -> Result<Value> {
    let (mut pipe, device, dtype, load_s) = load(&a.common)?;
    if let Some(v) = &a.vae_dtype {
        pipe.set_vae_dtype(parse_dtype(v, &device)?)?;
    }
    let params = GenerationParams { steps: a.steps, guidance: a.guidance, width: a.size, height: a.size, ..Default::default() };
    let mut batches = Vec::new();
    for &b in &a.batches {
        if b == 0 {
            return Err(Error::invalid("batch sizes must be at least 1"));
        }
        pipe.max_batch = b;
        let prompts = vec!["a photograph of an astronaut riding a horse"; b];
        let seeds: Vec<u64> = (0..b as u64).collect();
        let run = || -> Result<f64> {
            let t = Instant::now();
            pipe.generate(&prompts, &seeds, &params, &mut |_, _| {})?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        };
        run()?; // warm-up: kernels compile and caches fill
        let s = median((0..a.repeat.max(1)).map(|_| run()).collect::<Result<Vec<_>>>()?);
        batches.push(json!({ "batch": b, "seconds": s, "seconds_per_image": s / b as f64, "images_per_second": b as f64 / s }));
    }
    Ok(json!({
        "model": a.common.model, "device": a.common.device, "dtype": dtype_name(dtype), "size": a.size, "steps": a.steps,
        "guidance": a.guidance, "load_s": load_s, "batches": batches, "notes": pipe.take_notes(),
    }))
}

fn unet(a: &UnetArgs) -> Result<Value> {
    let (pipe, device, dtype, load_s) = load(&a.common)?;
    let f = pipe.vae_factor();
    let rows = 2 * a.batch;
    let cfg = &pipe.unet.config;
    let mut rng = crate::model::noise::Rng::new(0);
    let x = crate::model::noise::randn(&mut rng, &[rows, cfg.in_channels, a.size / f, a.size / f], &device)?.to_dtype(dtype)?;
    let t = Tensor::full(500f32, rows, &device)?;
    let ctx = crate::model::noise::randn(&mut rng, &[rows, 77, cfg.context_dim()], &device)?.to_dtype(dtype)?;
    let added = match cfg.projection_class_embeddings_input_dim.filter(|_| cfg.is_sdxl_style()) {
        Some(dim) => {
            let pooled = dim - 6 * cfg.addition_time_embed_dim.unwrap_or(256);
            let ids: Vec<f32> = (0..rows).flat_map(|_| [a.size as f32, a.size as f32, 0.0, 0.0, a.size as f32, a.size as f32]).collect();
            Some(AddedConditioning {
                text_embeds: crate::model::noise::randn(&mut rng, &[rows, pooled], &device)?.to_dtype(dtype)?,
                time_ids: Tensor::from_vec(ids, (rows, 6), &device)?.to_dtype(dtype)?,
            })
        }
        None => None,
    };
    let call = || -> Result<f64> {
        let s = Instant::now();
        pipe.unet.forward(&x, &t, &ctx, added.as_ref())?;
        device.synchronize()?;
        Ok(s.elapsed().as_secs_f64() * 1000.0)
    };
    call()?;
    let ms = median((0..a.calls.max(1)).map(|_| call()).collect::<Result<Vec<_>>>()?);
    Ok(json!({ "model": a.common.model, "device": a.common.device, "dtype": dtype_name(dtype), "size": a.size, "batch": a.batch, "rows": rows, "load_s": load_s, "ms_per_call": ms }))
}
