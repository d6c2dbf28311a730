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

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::device::{DType, Device, dtype_name, parse_device, parse_dtype};
use crate::error::{Error, ExitCode, Result};
use crate::model::locate::resolve_model;
use crate::model::{GenerationParams, Pipeline};

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


pub fn run(a: BenchArgs) -> Result<ExitCode> {
    let out = match a.what {
        What::Parity(p) => parity(&p)?,
        What::Txt2img(t) => txt2img(&t)?,
        What::Unet(u) => unet(&u)?,
    };
    println!("{}", serde_json::to_string_pretty(&out).expect("serialisable"));
    Ok(ExitCode::Success)
}

fn parity(a: &ParityArgs) -> Result<Value> {
    let (pipe, _, dtype, load_s) = load(&a.common)?;
    let mut out = json!({ "device": a.common.device, "dtype": dtype_name(dtype), "load_s": load_s });
    for (k, v) in crate::model::bench::parity(&pipe, &a.fixtures)? {
        out[k] = v;
    }
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
        let s = crate::model::bench::median((0..a.repeat.max(1)).map(|_| run()).collect::<Result<Vec<_>>>()?);
        batches.push(json!({ "batch": b, "seconds": s, "seconds_per_image": s / b as f64, "images_per_second": b as f64 / s }));
    }
    Ok(json!({
        "model": a.common.model, "device": a.common.device, "dtype": dtype_name(dtype), "size": a.size, "steps": a.steps,
        "guidance": a.guidance, "load_s": load_s, "batches": batches, "notes": pipe.take_notes(),
    }))
}

fn unet(a: &UnetArgs) -> Result<Value> {
    let (pipe, _, dtype, load_s) = load(&a.common)?;
    let (rows, ms) = crate::model::bench::unet_call_ms(&pipe, a.size, a.batch, a.calls)?;
    Ok(json!({ "model": a.common.model, "device": a.common.device, "dtype": dtype_name(dtype), "size": a.size, "batch": a.batch, "rows": rows, "load_s": load_s, "ms_per_call": ms }))
}
