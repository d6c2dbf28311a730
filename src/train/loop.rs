//! The training loop: batches from the cached latents, noise and timesteps per sample from the
//! seeded RNG, the UNet with live LoRA adapters, MSE against the schedule's training target,
//! backprop, gradient clipping and an AdamW step at the scheduled learning rate.
//!
//! Latents are encoded once: every image is fitted to its bucket at each training resolution,
//! `augment_variants` augmented copies are drawn (seeded per image, bucket and copy, so the
//! cache does not depend on the order of work) and encoded by the VAE; a step picks one copy.
//! Text encodings are cached by caption string. For SDXL, each sample also carries its
//! caption's pooled embedding and its size ids (source size, crop corner, bucket size).
//!
//! Held-out images ([`Trainer::set_heldout`]) are encoded once too, without augmentation, and
//! never reach the sampler. Their loss ([`Trainer::heldout_loss`]) uses fixed timesteps and
//! fixed noise per image, so it is a function of the LoRA alone: it compares checkpoints, and
//! runs on the same held-out images whatever their seeds.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::augment::{augment, process_caption};
use super::config::TrainConfig;
use super::dataset::{BatchSampler, Entry, TrainImage, bucket_crop, entries, fit_to_bucket};
use super::network::Network;
use super::optim::{AdamW, LrSchedule, clip_grad_norm};
use crate::error::{Error, Result};
use crate::imageio::images_to_tensor;
use crate::model::Pipeline;
use crate::model::noise::{Rng, randn};
use crate::model::scheduler::NoiseSchedule;
use crate::model::unet::{AddedConditioning, UNet};
use crate::progress::Progress;

/// Most captions whose encodings are kept (a shuffled caption rarely repeats exactly, so
/// the cache is bounded rather than grown forever).
const TEXT_CACHE_LIMIT: usize = 4096;

/// The held-out loss's timesteps, as fractions of the schedule: four, spread evenly from
/// nearly clean to nearly pure noise (the midpoints of four equal spans).
pub const HELDOUT_TIMESTEPS: [f64; 4] = [0.125, 0.375, 0.625, 0.875];

/// The held-out noise's seed: a constant, not the run's seed, so runs with different seeds
/// measure their held-out images against the same noise.
const HELDOUT_SEED: u64 = 0x4845_4c44_4f55_5421;

/// A sample's source image size and the bucket it was fitted to (SDXL's size ids).
#[derive(Debug, Clone, Copy)]
struct SampleSize {
    source: (usize, usize),
    bucket: (usize, usize),
}

/// A held-out sample: its latent, plain caption and fixed noise.
#[derive(Debug, Clone)]
struct HeldOutSample {
    bucket: (usize, usize),
    /// Its source image's size (width, height).
    source: (usize, usize),
    latent: Tensor,
    noise: Tensor,
    caption: String,
}

/// One cached training sample: a latent and the tags its augmentations add.
#[derive(Debug, Clone)]
struct CachedLatent {
    latent: Tensor,
    tags: Vec<&'static str>,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// 1-based number of the step just done.
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub batch: usize,
    pub seconds: f64,
}

/// A derived seed: the same inputs give the same stream whatever else the run does.
fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for &p in parts {
        h = (h ^ p).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}

/// Everything one UNet training call needs, one row per sample.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// Clean latents `[B, 4, h, w]`.
    pub latents: Tensor,
    /// The noise added to them, like `latents`.
    pub noise: Tensor,
    /// One training timestep per sample.
    pub timesteps: Vec<usize>,
    /// The captions' conditioning `[B, 77, D]`.
    pub context: Tensor,
    /// SDXL's pooled embeddings and size/crop ids; `None` for other UNets.
    pub added: Option<AddedConditioning>,
}

/// The training loss of a batch: the latents noised to their timesteps, the UNet's prediction
/// (through whatever adapters are attached), and the mean squared error, over every element,
/// against the schedule's target (noise, sample or v). [`Trainer`] takes every step through
/// this; it is public so that a step on given inputs can be compared with a peer's.
pub fn step_loss(unet: &UNet, schedule: &NoiseSchedule, inputs: &StepBatch) -> Result<Tensor> {
    let StepBatch { latents, noise, timesteps, context, added } = inputs;
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let target = schedule.training_target(latents, noise, timesteps)?.to_dtype(latents.dtype())?;
    let t = Tensor::from_vec(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), timesteps.len(), latents.device())?;
    let pred = unet.forward(&noisy, &t, context, added.as_ref())?;
    Ok((pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

/// The gradient of `loss` with respect to each variable, in order.
pub fn gradients(loss: &Tensor, vars: &[Var]) -> Result<Vec<Tensor>> {
    // On a rayon worker: the backward pass's matrix products split there without hand-offs.
    let grads = crate::model::nn::on_worker(|| loss.backward())?;
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            // A variable the loss does not reach (cannot happen for a UNet target).
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// SDXL's size conditioning of a training sample, as its training did: the source image's
/// size (h, w), the top-left corner (y, x) that [`fit_to_bucket`] cuts from the resized image,
/// and the bucket's size (h, w).
pub fn sdxl_time_ids((iw, ih): (usize, usize), bucket: (usize, usize)) -> [f32; 6] {
    let (_, (x, y)) = bucket_crop((iw as u32, ih as u32), bucket);
    [ih as f32, iw as f32, y as f32, x as f32, bucket.1 as f32, bucket.0 as f32]
}

/// The state of a training run.
pub struct Trainer<'a> {
    pub pipe: &'a Pipeline,
    pub cfg: TrainConfig,
    pub network: Network,
    pub images: Vec<TrainImage>,
    opt: AdamW,
    schedule: LrSchedule,
    /// The stream of batches, captions, noise and timesteps.
    rng: Rng,
    sampler: BatchSampler,
    latents: HashMap<(Entry, usize), CachedLatent>,
    /// Per caption: its context and, for SDXL, its pooled embedding.
    text_cache: HashMap<String, (Tensor, Option<Tensor>)>,
    heldout: Vec<HeldOutSample>,
    /// The images (indices into `images`) of the last step's batch.
    last_batch: Vec<usize>,
    /// Steps done.
    pub step: usize,
}

impl<'a> Trainer<'a> {
    /// Sets up a run: creates and attaches the network, and encodes every latent (progress
    /// on `progress`). `cfg.resolutions` must be filled in.
    pub fn new(pipe: &'a Pipeline, cfg: TrainConfig, images: Vec<TrainImage>, progress: &Progress) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::invalid("no images to train on"));
        }
        if cfg.resolutions.is_empty() {
            return Err(Error::invalid("no training resolution"));
        }
        let layers = super::network::select_layers(pipe.targets(), &cfg.targets)?;
        // The network's initial values have their own stream, so changing e.g. the batch
        // size does not change the starting point.
        let mut init_rng = Rng::new(mix(cfg.seed, &[1]));
        let network = Network::new(&layers, cfg.rank, cfg.alpha, &mut init_rng, pipe.dtype, &pipe.device)?;
        let opt = AdamW::new(network.vars(), cfg.adamw)?;
        let schedule = LrSchedule {
            kind: cfg.lr_schedule,
            peak: cfg.learning_rate,
            min: cfg.min_learning_rate,
            warmup: cfg.warmup_steps,
            total: cfg.steps,
        };
        let all = entries(&images, &cfg.resolutions, cfg.bucket_step, cfg.max_aspect);
        let sampler = BatchSampler::new(all.clone(), &images, cfg.batch_size);
        let mut t = Trainer {
            pipe,
            network,
            images,
            opt,
            schedule,
            rng: Rng::new(mix(cfg.seed, &[2])),
            sampler,
            latents: HashMap::new(),
            text_cache: HashMap::new(),
            heldout: Vec::new(),
            last_batch: Vec::new(),
            step: 0,
            cfg,
        };
        t.cache_latents(&all, progress)?;
        t.network.attach();
        Ok(t)
    }

    /// Encodes every (entry, variant) once, a few images per VAE call.
    fn cache_latents(&mut self, all: &[Entry], progress: &Progress) -> Result<()> {
        let mut jobs: Vec<(Entry, usize)> = Vec::new();
        for e in all {
            for v in 0..self.cfg.augment_variants {
                jobs.push((*e, v));
            }
        }
        // Group by bucket so each VAE call has one size.
        jobs.sort_by_key(|(e, v)| (e.bucket, e.image, *v));
        let chunk = 8;
        let mut i = 0;
        while i < jobs.len() {
            let bucket = jobs[i].0.bucket;
            let mut j = i;
            while j < jobs.len() && j - i < chunk && jobs[j].0.bucket == bucket {
                j += 1;
            }
            let mut imgs = Vec::with_capacity(j - i);
            let mut tags = Vec::with_capacity(j - i);
            for (e, v) in &jobs[i..j] {
                let fitted = fit_to_bucket(&self.images[e.image].image, e.bucket);
                let mut rng = Rng::new(mix(self.cfg.seed, &[3, e.image as u64, e.bucket.0 as u64, e.bucket.1 as u64, *v as u64]));
                let a = augment(&fitted, &self.cfg.image, &mut rng);
                imgs.push(a.image);
                tags.push(a.tags);
            }
            let pixels = images_to_tensor(&imgs, &self.pipe.device)?.to_dtype(self.pipe.dtype)?;
            let lat = self.pipe.vae.encode(&pixels)?;
            for (k, ((e, v), t)) in jobs[i..j].iter().zip(tags).enumerate() {
                self.latents.insert((*e, *v), CachedLatent { latent: lat.get(k)?, tags: t });
            }
            progress.inc((j - i) as u64);
            i = j;
        }
        Ok(())
    }

    /// Latents to encode in total (for a progress bar before [`Trainer::new`]).
    pub fn latent_jobs(cfg: &TrainConfig, images: &[TrainImage]) -> usize {
        images.len() * cfg.resolutions.len() * cfg.augment_variants
    }

    /// The UNet conditioning of captions, `[B, 77, D]`, and for SDXL the pooled embeddings
    /// `[B, P]`, from the cache where possible.
    fn encode_captions(&mut self, captions: &[String]) -> Result<(Tensor, Option<Tensor>)> {
        let missing: Vec<&str> = {
            let mut m: Vec<&str> = captions.iter().map(String::as_str).filter(|c| !self.text_cache.contains_key(*c)).collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            if self.text_cache.len() + missing.len() > TEXT_CACHE_LIMIT {
                self.text_cache.clear();
            }
            let enc = self.pipe.encode_prompts(&missing, 1)?;
            // Captions longer than the text encoder's context are cut, as in generation; the
            // warning would repeat every step, so it is not collected here.
            let _ = self.pipe.take_warnings();
            for (k, c) in missing.iter().enumerate() {
                let pooled = enc.pooled.as_ref().map(|p| p.get(k)).transpose()?;
                self.text_cache.insert(c.to_string(), (enc.context.get(k)?, pooled));
            }
        }
        let rows: Vec<&(Tensor, Option<Tensor>)> = captions.iter().map(|c| &self.text_cache[c]).collect();
        let context = Tensor::stack(&rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), 0)?;
        let pooled = match rows.iter().map(|r| r.1.clone()).collect::<Option<Vec<_>>>() {
            Some(p) if !p.is_empty() => Some(Tensor::stack(&p, 0)?),
            _ => None,
        };
        Ok((context, pooled))
    }

    /// The inputs of one batch: noise and timesteps from `rng`, the captions' conditioning
    /// and, for SDXL, the pooled embeddings and each sample's size and crop.
    fn batch_inputs(&mut self, batch: &[(Entry, usize)], captions: &[String], rng: &mut Rng) -> Result<StepBatch> {
        let latents = Tensor::stack(&batch.iter().map(|k| self.latents[k].latent.clone()).collect::<Vec<_>>(), 0)?;
        let dims = latents.dims().to_vec();
        let b = dims[0];
        let n_train = self.pipe.schedule.alphas_cumprod.len();
        let mut noise_parts = Vec::with_capacity(b);
        let mut timesteps = Vec::with_capacity(b);
        for _ in 0..b {
            // Per sample: its noise, then its timestep.
            noise_parts.push(randn(rng, &dims[1..], &Device::Cpu)?);
            timesteps.push(rng.below(n_train));
        }
        let noise = Tensor::stack(&noise_parts, 0)?.to_device(&self.pipe.device)?.to_dtype(self.pipe.dtype)?;
        let (context, pooled) = self.encode_captions(captions)?;
        let sizes: Vec<SampleSize> = batch
            .iter()
            .map(|(e, _)| {
                let img = &self.images[e.image].image;
                SampleSize { source: (img.width() as usize, img.height() as usize), bucket: e.bucket }
            })
            .collect();
        let added = self.added_conditioning(pooled, &sizes)?;
        Ok(StepBatch { latents, noise, timesteps, context, added })
    }

    /// SDXL's added conditioning of a batch (its captions' pooled embeddings and each sample's
    /// size ids); `None` for UNets without it, whose captions give no pooled embedding.
    fn added_conditioning(&self, pooled: Option<Tensor>, sizes: &[SampleSize]) -> Result<Option<AddedConditioning>> {
        let Some(text_embeds) = pooled else { return Ok(None) };
        let ids: Vec<f32> = sizes.iter().flat_map(|s| sdxl_time_ids(s.source, s.bucket)).collect();
        let time_ids = Tensor::from_vec(ids, (sizes.len(), 6), &self.pipe.device)?.to_dtype(self.pipe.dtype)?;
        Ok(Some(AddedConditioning { text_embeds, time_ids }))
    }

    /// The loss of one batch: noise and timesteps from `rng`.
    fn batch_loss(&mut self, batch: &[(Entry, usize)], captions: &[String], rng: &mut Rng) -> Result<Tensor> {
        let inputs = self.batch_inputs(batch, captions, rng)?;
        step_loss(&self.pipe.unet, &self.pipe.schedule, &inputs)
    }

    /// The loss of held-out latents `x0` with their fixed `noise` (on the CPU) at timesteps
    /// `ts`: the step's own loss ([`step_loss`]), SDXL's conditioning included.
    fn loss_at(&mut self, x0: &Tensor, noise: &Tensor, ts: &[usize], captions: &[String], sizes: &[SampleSize]) -> Result<Tensor> {
        let noise = noise.to_device(&self.pipe.device)?.to_dtype(self.pipe.dtype)?;
        let (context, pooled) = self.encode_captions(captions)?;
        let added = self.added_conditioning(pooled, sizes)?;
        step_loss(&self.pipe.unet, &self.pipe.schedule, &StepBatch { latents: x0.clone(), noise, timesteps: ts.to_vec(), context, added })
    }

    /// One optimisation step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let t0 = Instant::now();
        let entries = self.sampler.next_batch(&mut self.rng);
        let mut batch = Vec::with_capacity(entries.len());
        let mut captions = Vec::with_capacity(entries.len());
        for e in entries {
            let v = self.rng.below(self.cfg.augment_variants);
            let tags = self.latents[&(e, v)].tags.clone();
            captions.push(process_caption(&self.images[e.image].caption, &tags, &self.cfg.caption, &mut self.rng));
            batch.push((e, v));
        }
        self.last_batch = batch.iter().map(|(e, _)| e.image).collect();
        let mut rng = std::mem::replace(&mut self.rng, Rng::new(0));
        let loss = self.batch_loss(&batch, &captions, &mut rng);
        self.rng = rng;
        let loss = loss?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss_value} at step {}; lower the learning rate (now {:.2e})",
                self.step + 1,
                self.schedule.at(self.step)
            )));
        }
        let mut g = gradients(&loss, self.opt.vars())?;
        let grad_norm = clip_grad_norm(&mut g, self.cfg.max_grad_norm)?;
        let lr = self.schedule.at(self.step);
        self.opt.step(&g, lr)?;
        self.step += 1;
        Ok(StepStats { step: self.step, loss: loss_value, lr, grad_norm, batch: batch.len(), seconds: t0.elapsed().as_secs_f64() })
    }

    /// The loss on a fixed probe (the first `n` entries, their plain captions, noise and
    /// timesteps from `seed`), without gradients: comparable across steps, unlike the
    /// training loss, whose timesteps are random.
    pub fn probe_loss(&mut self, n: usize, seed: u64) -> Result<f64> {
        let mut keys: Vec<(Entry, usize)> = self.latents.keys().filter(|(_, v)| *v == 0).copied().collect();
        keys.sort();
        keys.truncate(n.max(1));
        let mut rng = Rng::new(seed);
        let mut total = 0.0;
        // One bucket per UNet call.
        let mut by_bucket: std::collections::BTreeMap<(usize, usize), Vec<(Entry, usize)>> = Default::default();
        for k in keys {
            by_bucket.entry(k.0.bucket).or_default().push(k);
        }
        let mut count = 0;
        for (_, ks) in by_bucket {
            let captions: Vec<String> = ks.iter().map(|(e, _)| self.images[e.image].caption.clone()).collect();
            let loss = self.batch_loss(&ks, &captions, &mut rng)?;
            total += loss.to_scalar::<f32>()? as f64 * ks.len() as f64;
            count += ks.len();
        }
        Ok(total / count.max(1) as f64)
    }

    /// Encodes the held-out images (each at every training resolution, no augmentation) and
    /// draws their fixed noise. They are kept apart from the training images: the sampler never
    /// sees them.
    pub fn set_heldout(&mut self, images: &[TrainImage], progress: &Progress) -> Result<()> {
        let mut all = entries(images, &self.cfg.resolutions, self.cfg.bucket_step, self.cfg.max_aspect);
        all.sort_by_key(|e| (e.bucket, e.image));
        self.heldout.clear();
        for chunk in all.chunk_by(|a, b| a.bucket == b.bucket) {
            for part in chunk.chunks(8) {
                let imgs: Vec<image::RgbImage> = part.iter().map(|e| fit_to_bucket(&images[e.image].image, e.bucket)).collect();
                let pixels = images_to_tensor(&imgs, &self.pipe.device)?.to_dtype(self.pipe.dtype)?;
                let lat = self.pipe.vae.encode(&pixels)?;
                for (k, e) in part.iter().enumerate() {
                    let latent = lat.get(k)?;
                    // Noise per image and bucket, from the held-out stream alone.
                    let mut rng = Rng::new(mix(HELDOUT_SEED, &[e.image as u64, e.bucket.0 as u64, e.bucket.1 as u64]));
                    let noise = randn(&mut rng, latent.dims(), &Device::Cpu)?;
                    let img = &images[e.image];
                    let source = (img.image.width() as usize, img.image.height() as usize);
                    self.heldout.push(HeldOutSample { bucket: e.bucket, source, latent, noise, caption: img.caption.clone() });
                }
                progress.inc(part.len() as u64);
            }
        }
        Ok(())
    }

    /// The images of the last step's batch, as indices into [`Trainer::images`] (the training
    /// images only: held-out images are not among them).
    pub fn last_batch(&self) -> &[usize] {
        &self.last_batch
    }

    /// Held-out samples (images × resolutions).
    pub fn heldout_len(&self) -> usize {
        self.heldout.len()
    }

    /// The mean loss over the held-out samples at [`HELDOUT_TIMESTEPS`], with their fixed
    /// noise; `None` without held-out images. No gradients are taken.
    pub fn heldout_loss(&mut self) -> Result<Option<f64>> {
        if self.heldout.is_empty() {
            return Ok(None);
        }
        let n_train = self.pipe.schedule.alphas_cumprod.len();
        let samples = self.heldout.clone();
        let mut total = 0.0;
        let mut count = 0usize;
        for group in samples.chunk_by(|a, b| a.bucket == b.bucket) {
            for part in group.chunks(8) {
                let x0 = Tensor::stack(&part.iter().map(|s| s.latent.clone()).collect::<Vec<_>>(), 0)?;
                let noise = Tensor::stack(&part.iter().map(|s| s.noise.clone()).collect::<Vec<_>>(), 0)?;
                let captions: Vec<String> = part.iter().map(|s| s.caption.clone()).collect();
                let sizes: Vec<SampleSize> = part.iter().map(|s| SampleSize { source: s.source, bucket: s.bucket }).collect();
                for f in HELDOUT_TIMESTEPS {
                    let t = ((f * n_train as f64) as usize).min(n_train - 1);
                    let loss = self.loss_at(&x0, &noise, &vec![t; part.len()], &captions, &sizes)?.detach();
                    total += loss.to_scalar::<f32>()? as f64 * part.len() as f64;
                    count += part.len();
                }
            }
        }
        Ok(Some(total / count as f64))
    }

    /// The epoch the sampler is in (1-based once training has started).
    pub fn epoch(&self) -> usize {
        self.sampler.epoch
    }

    /// Samples per epoch.
    pub fn epoch_len(&self) -> usize {
        self.sampler.epoch_len()
    }
}
