//! The measurements behind `loragate bench`: tiny-sd against the PyTorch parity fixtures on a
//! device and dtype, and the time of one UNet call. GPU work is synchronised before a clock
//! stops.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::unet::AddedConditioning;
use crate::model::{GenerationParams, Pipeline};
use crate::tensors::TensorFile;

pub fn median(mut xs: Vec<f64>) -> f64 {
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

/// The fixture pipeline (20 DDIM steps, guidance 5, the fixture's initial latents).
fn fixture_images(pipe: &Pipeline, prompts: &[&str], latents: &Tensor) -> Result<Tensor> {
    let params = GenerationParams { steps: 20, guidance: 5.0, ..Default::default() };
    let latents = latents.to_device(&pipe.device)?.to_dtype(pipe.dtype)?;
    pipe.generate_from_latents(prompts, &latents, &params, &mut |_, _| {})
}

/// The pipeline's UNet, VAE decode and whole generation against the fixtures in `fixtures`
/// (`parity.safetensors`, `parity.json`), and in half precision against itself in f32.
pub fn parity(pipe: &Pipeline, fixtures: &Path) -> Result<Vec<(&'static str, Value)>> {
    let (device, dtype) = (pipe.device.clone(), pipe.dtype);
    let fx = TensorFile::load(fixtures.join("parity.safetensors"), DType::F32, &device)?.tensors;
    let get = |k: &str| fx.get(k).cloned().ok_or_else(|| Error::invalid(format!("{}: no fixture `{k}`", fixtures.display())));
    let meta: Value = serde_json::from_str(&crate::fsutil::read_text(&fixtures.join("parity.json"))?).map_err(|e| Error::invalid(e.to_string()))?;
    let prompts: Vec<String> = meta["prompts"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let to = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?) };
    let eps = pipe.unet.forward(&to(get("unet.sample")?)?, &get("unet.timestep")?, &to(get("unet.context")?)?, None)?;
    let decoded = pipe.decode(&to(get("vae.latents")?)?)?;
    let images = fixture_images(pipe, &prompts, &get("pipe.latents")?)?;
    let mut out = vec![(
        "against_pytorch_f32",
        json!({
            "unet": diff(&eps, &get("unet.eps")?)?,
            "vae_decode": diff(&decoded, &get("vae.decoded")?)?,
            "pipeline": diff(&images, &get("pipe.images")?)?,
        }),
    )];
    if dtype != DType::F32 {
        let f32_pipe = Pipeline::load(&pipe.location, DType::F32, &device)?;
        out.push(("against_f32_same_device", json!({ "pipeline": diff(&images, &fixture_images(&f32_pipe, &prompts, &get("pipe.latents")?)?)? })));
    }
    out.push(("notes", json!(pipe.take_notes())));
    Ok(out)
}

/// The median milliseconds of one UNet call on `batch` images of `size` pixels (twice as many
/// rows, as under guidance), after one warm-up call; and the rows.
pub fn unet_call_ms(pipe: &Pipeline, size: usize, batch: usize, calls: usize) -> Result<(usize, f64)> {
    let (device, dtype) = (&pipe.device, pipe.dtype);
    let f = pipe.vae_factor();
    let rows = 2 * batch;
    let cfg = &pipe.unet.config;
    let mut rng = crate::model::noise::Rng::new(0);
    // A guided step's batch: each latent twice (unconditional and conditional rows), as the
    // pipeline passes it.
    let latents = crate::model::noise::randn(&mut rng, &[batch, cfg.in_channels, size / f, size / f], device)?.to_dtype(dtype)?;
    let x = Tensor::cat(&[&latents, &latents], 0)?;
    let t = Tensor::full(500f32, rows, device)?;
    let ctx = crate::model::noise::randn(&mut rng, &[rows, 77, cfg.context_dim()], device)?.to_dtype(dtype)?;
    let added = match cfg.projection_class_embeddings_input_dim.filter(|_| cfg.is_sdxl_style()) {
        Some(dim) => {
            let pooled = dim - 6 * cfg.addition_time_embed_dim.unwrap_or(256);
            let ids: Vec<f32> = (0..rows).flat_map(|_| [size as f32, size as f32, 0.0, 0.0, size as f32, size as f32]).collect();
            Some(AddedConditioning {
                text_embeds: crate::model::noise::randn(&mut rng, &[rows, pooled], device)?.to_dtype(dtype)?,
                time_ids: Tensor::from_vec(ids, (rows, 6), device)?.to_dtype(dtype)?,
            })
        }
        None => None,
    };
    let call = || -> Result<f64> {
        let s = Instant::now();
        pipe.unet.predict(&x, &t, &ctx, added.as_ref())?;
        device.synchronize()?;
        Ok(s.elapsed().as_secs_f64() * 1000.0)
    };
    call()?;
    let ms = median((0..calls.max(1)).map(|_| call()).collect::<Result<Vec<_>>>()?);
    Ok((rows, ms))
}
