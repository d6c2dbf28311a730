//! A loaded text-to-image pipeline: tokenizer(s), text encoder(s), UNet, VAE and noise schedule,
//! and the generation loop (classifier-free guidance, any sampler, batches of prompts).

use std::collections::BTreeMap;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::Family;
use crate::model::adapters::AdapterTargets;
use crate::model::loading::{fingerprint, load_component_tensors, read_config, weight_files};
use crate::model::noise::initial_latents;
use crate::model::params::{Params, WeightStore};
use crate::model::locate::ModelLocation;
use crate::model::scheduler::{NoiseSchedule, SamplerKind, ScheduleConfig};
use crate::model::text_encoder::{LayerChoice, TextEncoder};
use crate::model::tokenizer::Tokenizer;
use crate::model::unet::{AddedConditioning, UNet, UNetConfig};
use crate::model::single_file::Converted;
use crate::model::vae::{Vae, VaeConfig, normalize_vae_keys};

/// How to generate, apart from the prompts and seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerKind,
    pub negative_prompt: String,
    /// 1 = the last text-encoder layer (SD 1.x/2.x default), 2 = the penultimate, ...
    pub clip_skip: usize,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            steps: 20,
            guidance: 5.0,
            width: 128,
            height: 128,
            sampler: SamplerKind::Ddim,
            negative_prompt: String::new(),
            clip_skip: 1,
        }
    }
}

/// Text conditioning for a batch.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// A warning about a prompt (too long for the text encoder, characters it has no token for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptWarning {
    pub prompt: String,
    pub message: String,
}

struct SecondEncoder {
    tokenizer: Tokenizer,
    encoder: TextEncoder,
}

pub struct Pipeline {
    pub location: ModelLocation,
    pub family: Family,
    pub tokenizer: Tokenizer,
    pub text_encoder: TextEncoder,
    second: Option<SecondEncoder>,
    pub unet: UNet,
    pub vae: Vae,
    /// The dtype the VAE computes in: the pipeline's, or f32 (`--vae-dtype f32`).
    pub vae_dtype: DType,
    /// An f32 copy of the VAE, made the first time a half-precision decode overflows, for the
    /// images that overflow.
    vae_f32: std::cell::OnceCell<Vae>,
    /// Things the run should say (a VAE that was upcast).
    notes: RefCell<Vec<String>>,
    pub schedule: NoiseSchedule,
    targets: AdapterTargets,
    pub device: Device,
    pub dtype: DType,
    /// Largest number of images denoised in one UNet batch (each counts twice with guidance).
    pub max_batch: usize,
    force_zeros_for_empty_prompt: bool,
    warnings: RefCell<Vec<PromptWarning>>,
    /// The files the pipeline was read from (configs and weights), for its fingerprint.
    files: Vec<PathBuf>,
    fingerprint: std::cell::OnceCell<String>,
}

/// The files a pipeline is read from (configs and weights), without reading them: the basis of
/// its fingerprint, so a cache can be checked before any model is loaded.
pub fn model_files(location: &ModelLocation) -> Result<Vec<PathBuf>> {
    if let Some(f) = &location.single_file {
        // The configs a single file is read with change its pixels as much as its weights do.
        let mut files = vec![f.clone()];
        match &location.config {
            Some(c) if c.is_dir() => {
                let mut text: Vec<PathBuf> = crate::model::single_file::config_file_names(c).into_iter().map(|r| c.join(r)).collect();
                text.sort();
                files.extend(text);
            }
            Some(c) => files.push(c.clone()),
            None => {}
        }
        return Ok(files);
    }
    let root = &location.folder;
    let unet_dir = location.unet_folder.clone().unwrap_or_else(|| root.join("unet"));
    let mut dirs = vec![root.join("text_encoder"), unet_dir, root.join("vae")];
    if root.join("text_encoder_2").is_dir() {
        dirs.push(root.join("text_encoder_2"));
    }
    let mut files = Vec::new();
    for d in &dirs {
        files.push(d.join("config.json"));
        files.extend(weight_files(d)?);
    }
    // Everything else that can change pixels: the scheduler, the tokenizers (a token id is a
    // different prompt) and model_index.json (`force_zeros_for_empty_prompt`).
    let sched = root.join("scheduler").join("scheduler_config.json");
    if sched.is_file() {
        files.push(sched);
    }
    for tok in ["tokenizer", "tokenizer_2"] {
        if let Ok(entries) = std::fs::read_dir(root.join(tok)) {
            let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
            found.sort();
            files.extend(found);
        }
    }
    let index = root.join("model_index.json");
    if index.is_file() {
        files.push(index);
    }
    Ok(files)
}

/// The model's native image size (UNet sample size × VAE factor), from the configs alone.
pub fn native_size(location: &ModelLocation) -> Result<(usize, usize)> {
    if let Some(f) = &location.single_file {
        let (shapes, meta) = crate::model::single_file::read_header(f)?;
        if let Some(c) = &location.config {
            let (unet, vae): (UNetConfig, VaeConfig) = if c.is_dir() {
                (read_config(&c.join("unet").join("config.json"))?, read_config(&c.join("vae").join("config.json"))?)
            } else {
                let l = crate::model::ldm_config::read(c)?;
                (l.unet, l.vae)
            };
            let s = unet.sample_size.unwrap_or(64) * vae.downscale();
            return Ok((s, s));
        }
        if let Some(c) = meta.get("loragate.configs") {
            let v: serde_json::Value = serde_json::from_str(c).map_err(|e| Error::model(f, e.to_string()))?;
            let unet: UNetConfig = serde_json::from_value(v["unet"].clone()).map_err(|e| Error::model(f, e.to_string()))?;
            let vae: VaeConfig = serde_json::from_value(v["vae"].clone()).map_err(|e| Error::model(f, e.to_string()))?;
            let s = unet.sample_size.unwrap_or(64) * vae.downscale();
            return Ok((s, s));
        }
        let s = match crate::model::single_file::detect_family(&shapes).map_err(|e| Error::model(f, e.to_string()))? {
            Family::Sdxl => 1024,
            Family::Sd2 => 768,
            _ => 512,
        };
        return Ok((s, s));
    }
    let unet_dir = location.unet_folder.clone().unwrap_or_else(|| location.folder.join("unet"));
    let unet: UNetConfig = read_config(&unet_dir.join("config.json"))?;
    let vae: VaeConfig = read_config(&location.folder.join("vae").join("config.json"))?;
    let s = unet.sample_size.unwrap_or(64) * vae.downscale();
    Ok((s, s))
}

/// The fingerprint of a model without loading it.
pub fn model_fingerprint(location: &ModelLocation) -> Result<String> {
    fingerprint(&model_files(location)?)
}

/// Loads one component with its own LoRA-target registry.
fn build<T>(
    store: &WeightStore,
    f: impl FnOnce(&Params) -> Result<T>,
) -> Result<(T, AdapterTargets)> {
    let targets = RefCell::new(AdapterTargets::default());
    let p = Params::root(store, &targets);
    let value = f(&p)?;
    Ok((value, targets.into_inner()))
}

use crate::model::loading::normalize_text_encoder_keys;

impl Pipeline {
    /// Loads a pipeline: a diffusers folder or a single-file checkpoint (see [`ModelLocation`]).
    pub fn load(location: &ModelLocation, dtype: DType, device: &Device) -> Result<Self> {
        let parts = match &location.single_file {
            Some(file) => crate::model::single_file::convert(file, dtype, device, location.config.as_deref())?,
            None => parts_from_folder(location, dtype, device)?,
        };
        Self::from_parts(location, parts, dtype, device)
    }

    /// Builds the pipeline from components in the diffusers layout.
    pub fn from_parts(location: &ModelLocation, parts: Converted, dtype: DType, device: &Device) -> Result<Self> {
        let origin = location.single_file.clone().unwrap_or_else(|| location.folder.clone());
        if !parts.unused.is_empty() {
            // As for a folder's tensors (warn_unused): extra weights usually mean the wrong configs.
            eprintln!(
                "warning: {}: {} tensors are not used by the architecture the configs describe (first: {})",
                origin.display(),
                parts.unused.len(),
                parts.unused[0]
            );
        }
        let schedule = NoiseSchedule::new(&parts.schedule).map_err(|e| Error::model(&origin, e.to_string()))?;
        let at = |what: &str| origin.join(what);

        let mut te = parts.text_encoder;
        normalize_text_encoder_keys(&mut te);
        let store = WeightStore::from_tensors(at("text_encoder"), te, dtype, device);
        let (text_encoder, te_targets) =
            build(&store, |p| TextEncoder::load(p, &parts.text_config, false)).map_err(|e| at_component(e, &at("text_encoder")))?;
        let second = match parts.second {
            Some((cfg2, mut te2, tok2)) => {
                normalize_text_encoder_keys(&mut te2);
                let with_projection = te2.contains_key("text_projection.weight");
                let store = WeightStore::from_tensors(at("text_encoder_2"), te2, dtype, device);
                let (enc2, t2) = build(&store, |p| TextEncoder::load(p, &cfg2, with_projection))
                    .map_err(|e| at_component(e, &at("text_encoder_2")))?;
                Some((SecondEncoder { tokenizer: tok2, encoder: enc2 }, t2))
            }
            None => None,
        };

        let unet_cfg = parts.unet_config;
        let unet_origin = location.unet_folder.clone().unwrap_or_else(|| at("unet"));
        let store = WeightStore::from_tensors(&unet_origin, parts.unet, dtype, device);
        let (unet, unet_targets) =
            build(&store, |p| UNet::load(p, &unet_cfg)).map_err(|e| at_component(e, &unet_origin))?;
        warn_unused(&store);

        let mut vae_tensors = parts.vae;
        normalize_vae_keys(&mut vae_tensors);
        let store = WeightStore::from_tensors(at("vae"), vae_tensors, dtype, device);
        let (vae, _vae_targets) = build(&store, |p| Vae::load(p, &parts.vae_config)).map_err(|e| at_component(e, &at("vae")))?;

        let mut targets = AdapterTargets::default();
        targets.extend_prefixed("unet", &unet_targets);
        targets.extend_prefixed("text_encoder", &te_targets);
        let second = second.map(|(s, t2)| {
            targets.extend_prefixed("text_encoder_2", &t2);
            s
        });
        let files = model_files(location)?;
        let context_dim = unet_cfg.context_dim();
        let text_width = text_encoder.config.hidden_size
            + second.as_ref().map(|s| s.encoder.config.hidden_size).unwrap_or(0);
        if text_width != context_dim {
            return Err(Error::model(
                &origin,
                format!("the text encoder(s) give {text_width} features but the UNet's cross-attention expects {context_dim}"),
            ));
        }
        Ok(Pipeline {
            location: location.clone(),
            family: Family::from_unet(&unet_cfg),
            tokenizer: parts.tokenizer,
            text_encoder,
            second,
            unet,
            vae,
            vae_dtype: dtype,
            vae_f32: std::cell::OnceCell::new(),
            notes: RefCell::new(Vec::new()),
            schedule,
            targets,
            device: device.clone(),
            dtype,
            max_batch: 8,
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            warnings: RefCell::new(Vec::new()),
            files,
            fingerprint: std::cell::OnceCell::new(),
        })
    }

    /// A content identity of the model's files (see [`fingerprint`]), computed once.
    pub fn fingerprint(&self) -> Result<String> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        let f = fingerprint(&self.files)?;
        Ok(self.fingerprint.get_or_init(|| f).clone())
    }

    /// Every layer a LoRA may patch, as `unet.…`, `text_encoder.…`, `text_encoder_2.…`.
    pub fn targets(&self) -> &AdapterTargets {
        &self.targets
    }

    /// Pixels per latent cell (8 for every SD VAE).
    pub fn vae_factor(&self) -> usize {
        self.vae.config.downscale()
    }

    /// Checks a requested image size, with a suggestion when it does not fit.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let f = self.vae_factor();
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            let round = |v: usize| (v.max(1).div_ceil(f) * f).max(f);
            return Err(Error::invalid(format!(
                "size {width}x{height} is not a multiple of {f} (the VAE works on {f}x{f} pixel cells); \
                 try {}x{}",
                round(width),
                round(height)
            )));
        }
        Ok(())
    }

    /// Warnings collected while encoding prompts since the last call.
    pub fn take_warnings(&self) -> Vec<PromptWarning> {
        std::mem::take(&mut self.warnings.borrow_mut())
    }

    fn tokenize(&self, tok: &Tokenizer, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * tok.context);
        for p in prompts {
            let e = tok.encode(p);
            if e.truncated {
                self.warnings.borrow_mut().push(PromptWarning {
                    prompt: p.to_string(),
                    message: format!(
                        "{} tokens; the text encoder reads {} and the rest is ignored",
                        e.prompt_tokens,
                        tok.context - 2
                    ),
                });
            }
            if !e.unknown.is_empty() {
                let chars: String = e.unknown.iter().collect();
                self.warnings.borrow_mut().push(PromptWarning {
                    prompt: p.to_string(),
                    message: format!("characters with no token were dropped: {chars:?}"),
                });
            }
            ids.extend(e.ids);
        }
        Ok(Tensor::from_vec(ids, (prompts.len(), tok.context), &self.device)?)
    }

    /// Encodes prompts into the UNet's conditioning.
    pub fn encode_prompts(&self, prompts: &[&str], clip_skip: usize) -> Result<Conditioning> {
        let skip = clip_skip.max(1) - 1;
        match &self.second {
            None => {
                let ids = self.tokenize(&self.tokenizer, prompts)?;
                let enc = self.text_encoder.forward(&ids, LayerChoice { skip, final_norm: true })?;
                Ok(Conditioning { context: enc.hidden, pooled: None })
            }
            Some(s) => {
                // SDXL: penultimate layers of both encoders, concatenated; pooled from the second.
                let choice = LayerChoice { skip: skip.max(1), final_norm: false };
                let e1 = self.text_encoder.forward(&self.tokenize(&self.tokenizer, prompts)?, choice)?;
                let e2 = s.encoder.forward(&self.tokenize(&s.tokenizer, prompts)?, choice)?;
                let context = Tensor::cat(&[&e1.hidden, &e2.hidden], 2)?;
                Ok(Conditioning { context, pooled: Some(e2.pooled) })
            }
        }
    }

    fn negative_conditioning(&self, negative: &str, n: usize, clip_skip: usize) -> Result<Conditioning> {
        let c = self.encode_prompts(&[negative], clip_skip)?;
        let zero = self.force_zeros_for_empty_prompt && negative.is_empty();
        let rep = |t: &Tensor| -> Result<Tensor> {
            let t = if zero { t.zeros_like()? } else { t.clone() };
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        Ok(Conditioning { context: rep(&c.context)?, pooled: c.pooled.as_ref().map(rep).transpose()? })
    }

    /// Generates one image per prompt; image `i` starts from the noise of seed `seeds[i]`.
    /// Returns `[B, 3, H, W]` in `[0, 1]`.
    pub fn generate(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        params: &GenerationParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        Ok(self.generate_checked(prompts, seeds, params, progress)?.0)
    }

    /// Like [`Pipeline::generate`], also saying which images went NaN during denoising (the
    /// decoder's clamp would otherwise hide it as black pixels).
    pub fn generate_checked(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        params: &GenerationParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Tensor, Vec<bool>)> {
        if prompts.len() != seeds.len() {
            return Err(Error::invalid(format!("{} prompts but {} seeds", prompts.len(), seeds.len())));
        }
        if prompts.is_empty() {
            return Err(Error::invalid("nothing to generate: no prompts"));
        }
        self.check_size(params.width, params.height)?;
        let f = self.vae_factor();
        let c = self.unet.config.in_channels;
        let mut out = Vec::new();
        let mut nan = Vec::new();
        let total_steps = params.steps * prompts.len().div_ceil(self.max_batch);
        let mut done = 0;
        for (chunk_p, chunk_s) in prompts.chunks(self.max_batch).zip(seeds.chunks(self.max_batch)) {
            let noise = initial_latents(chunk_s, c, params.height / f, params.width / f, &Device::Cpu)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            let mut step_progress = |s: usize, _t: usize| progress(done + s, total_steps);
            let latents = self.denoise(chunk_p, &noise, params, &mut step_progress)?;
            let per_item = latents.to_dtype(DType::F32)?.flatten_from(1)?.to_vec2::<f32>()?;
            nan.extend(per_item.iter().map(|row| row.iter().any(|v| !v.is_finite())));
            out.push(self.decode(&latents)?);
            done += params.steps;
        }
        Ok((Tensor::cat(&out, 0)?, nan))
    }

    /// The denoising loop from given initial latents (unscaled standard normal noise).
    pub fn generate_from_latents(
        &self,
        prompts: &[&str],
        noise: &Tensor,
        params: &GenerationParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let latents = self.denoise(prompts, noise, params, progress)?;
        self.decode(&latents)
    }

    /// Latents → images in `[0, 1]`, in the VAE's dtype. An image whose half-precision decode
    /// overflows (the SD VAE does in f16) is decoded again in f32, on its own so that its
    /// batchmates keep their pixels, as diffusers' `force_upcast`; the run says so
    /// ([`Pipeline::take_notes`]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let images = self.vae.decode_unclamped(&latents.to_dtype(self.vae_dtype)?)?;
        if self.vae_dtype == DType::F32 || all_finite(&images)? {
            return Ok(images.clamp(0f32, 1f32)?.to_dtype(self.dtype)?);
        }
        let vae = match self.vae_f32.get() {
            Some(v) => v,
            None => {
                let v = self.load_vae(DType::F32)?;
                self.vae_f32.get_or_init(|| v)
            }
        };
        let mut rows = Vec::with_capacity(latents.dim(0)?);
        let mut upcast = 0;
        for i in 0..latents.dim(0)? {
            let row = images.narrow(0, i, 1)?;
            if all_finite(&row)? {
                rows.push(row.clamp(0f32, 1f32)?.to_dtype(self.dtype)?);
            } else {
                upcast += 1;
                rows.push(vae.decode(&latents.narrow(0, i, 1)?.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?);
            }
        }
        self.notes.borrow_mut().push(format!(
            "the VAE overflowed in {} (NaN or Inf) on {upcast} of {} images: they were decoded in f32, as diffusers' force_upcast does; `--vae-dtype f32` decodes every image in f32",
            crate::device::dtype_name(self.vae_dtype),
            latents.dim(0)?
        ));
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Makes the VAE compute in `dtype` (f32 under a half-precision pipeline: `--vae-dtype`).
    pub fn set_vae_dtype(&mut self, dtype: DType) -> Result<()> {
        if dtype != self.vae_dtype {
            self.vae = self.load_vae(dtype)?;
            self.vae_dtype = dtype;
        }
        Ok(())
    }

    /// The VAE again, from the model's files, in `dtype`.
    fn load_vae(&self, dtype: DType) -> Result<Vae> {
        let (config, tensors, origin) = match &self.location.single_file {
            Some(file) => {
                let parts = crate::model::single_file::convert(file, dtype, &self.device, self.location.config.as_deref())?;
                (parts.vae_config, parts.vae, file.clone())
            }
            None => {
                let dir = self.location.folder.join("vae");
                let config: VaeConfig = read_config(&dir.join("config.json"))?;
                (config, load_component_tensors(&dir, dtype, &self.device)?, dir)
            }
        };
        let mut tensors = tensors;
        normalize_vae_keys(&mut tensors);
        let store = WeightStore::from_tensors(&origin, tensors, dtype, &self.device);
        let (vae, _) = build(&store, |p| Vae::load(p, &config)).map_err(|e| at_component(e, &origin))?;
        Ok(vae)
    }

    /// What the run should tell the user since the last call (an upcast VAE).
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut self.notes.borrow_mut())
    }

    /// Text → clean latents.
    pub fn denoise(
        &self,
        prompts: &[&str],
        noise: &Tensor,
        params: &GenerationParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = prompts.len();
        if noise.dim(0)? != b {
            return Err(Error::invalid(format!("{b} prompts but {} initial latents", noise.dim(0)?)));
        }
        let sampler = params.sampler.build(&self.schedule, params.steps)?;
        let cond = self.encode_prompts(prompts, params.clip_skip)?;
        let guided = params.guidance > 1.0;
        let (context, pooled) = if guided {
            let neg = self.negative_conditioning(&params.negative_prompt, b, params.clip_skip)?;
            let context = Tensor::cat(&[&neg.context, &cond.context], 0)?;
            let pooled = match (&neg.pooled, &cond.pooled) {
                (Some(n), Some(c)) => Some(Tensor::cat(&[n, c], 0)?),
                _ => None,
            };
            (context, pooled)
        } else {
            (cond.context, cond.pooled)
        };
        let rows = context.dim(0)?;
        let added = match pooled {
            Some(text_embeds) => {
                let (h, w) = (noise.dim(2)? * self.vae_factor(), noise.dim(3)? * self.vae_factor());
                let ids: Vec<f32> = (0..rows).flat_map(|_| [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32]).collect();
                Some(AddedConditioning { text_embeds, time_ids: Tensor::from_vec(ids, (rows, 6), &self.device)? })
            }
            None => None,
        };
        let mut x = (noise * sampler.init_noise_sigma())?;
        let steps = sampler.timesteps().len();
        for i in 0..steps {
            let t = sampler.timesteps()[i];
            let xin = sampler.scale_input(&x, i)?;
            let xin = if guided { Tensor::cat(&[&xin, &xin], 0)? } else { xin };
            let ts = Tensor::full(t as f32, rows, &self.device)?;
            let out = self.unet.predict(&xin, &ts, &context, added.as_ref())?;
            let eps = if guided {
                let uncond = out.narrow(0, 0, b)?;
                let condp = out.narrow(0, b, b)?;
                (&uncond + ((condp - &uncond)? * params.guidance)?)?
            } else {
                out
            };
            x = sampler.step(&x, &eps, i)?;
            progress(i + 1, steps);
        }
        Ok(x)
    }
}

fn all_finite(t: &Tensor) -> Result<bool> {
    // Inf − Inf and NaN · 0 are NaN: one sum tells whether any value is not finite.
    let s = (t.to_dtype(DType::F32)? * 0.0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// Reads the components of a diffusers folder.
pub fn parts_from_folder(location: &ModelLocation, dtype: DType, device: &Device) -> Result<Converted> {
    let root = &location.folder;
    let index: serde_json::Value =
        if root.join("model_index.json").is_file() { read_config(&root.join("model_index.json"))? } else { serde_json::Value::Null };
    let sched_path = root.join("scheduler").join("scheduler_config.json");
    let schedule: ScheduleConfig = if sched_path.is_file() { read_config(&sched_path)? } else { ScheduleConfig::default() };
    let te_dir = root.join("text_encoder");
    let second = if root.join("text_encoder_2").is_dir() {
        let d = root.join("text_encoder_2");
        Some((read_config(&d.join("config.json"))?, load_component_tensors(&d, dtype, device)?, Tokenizer::from_dir(&root.join("tokenizer_2"))?))
    } else {
        None
    };
    let unet_dir = location.unet_folder.clone().unwrap_or_else(|| root.join("unet"));
    let vae_dir = root.join("vae");
    let unet_config: UNetConfig = read_config(&unet_dir.join("config.json"))?;
    Ok(Converted {
        family: Family::from_unet(&unet_config),
        unet_config,
        unet: load_component_tensors(&unet_dir, dtype, device)?,
        vae_config: read_config(&vae_dir.join("config.json"))?,
        vae: load_component_tensors(&vae_dir, dtype, device)?,
        text_config: read_config(&te_dir.join("config.json"))?,
        text_encoder: load_component_tensors(&te_dir, dtype, device)?,
        tokenizer: Tokenizer::from_dir(&root.join("tokenizer"))?,
        second,
        schedule,
        force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"].as_bool().unwrap_or(false),
        source: crate::model::single_file::ConfigSource::Folder(root.clone()),
        unused: Vec::new(),
        config_files: BTreeMap::new(),
        tokenizer_files: crate::model::single_file::TokenizerFiles::Files(BTreeMap::new()),
    })
}

fn at_component(e: Error, dir: &Path) -> Error {
    match e {
        Error::Invalid(m) => Error::model(dir, m),
        other => other,
    }
}

fn warn_unused(store: &WeightStore) {
    let unused = store.unused();
    if !unused.is_empty() {
        eprintln!(
            "warning: {}: {} tensors are not used by the architecture in config.json (first: {})",
            store.origin().display(),
            unused.len(),
            unused[0]
        );
    }
}
