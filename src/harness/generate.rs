//! Producing every planned image: from the cache when possible, otherwise by loading each model
//! once, applying each LoRA stack once, and generating in batches of equal settings.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::device::{DType, Device};
use image::RgbImage;

use super::cache::{CacheMeta, ImageCache, KeyParts};
use crate::device::device_class;
use crate::error::{Error, Result};
use crate::imageio::tensor_to_images;
use crate::lora::{ApplyReport, LoraStack};
use crate::model::pipeline::model_fingerprint;
use crate::model::{GenerationParams, Pipeline};
use crate::progress::Progress;
use crate::record::{GenerationRecord, LoraUse, VERSION};
use crate::suite::expand::{Job, Plan};
use crate::suite::{ModelRef, Suite};

/// What happened to one job.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub key: String,
    /// `None` when the LoRA stack could not be applied to the model.
    pub image: Option<RgbImage>,
    pub had_nan: bool,
    pub cached: bool,
    pub record: Option<GenerationRecord>,
}

/// The LoRA application outcome of a (model, stack) pair: the report or the refusal.
pub type ApplyOutcome = std::result::Result<ApplyReport, String>;

pub struct Generation {
    pub outcomes: Vec<JobOutcome>,
    /// By [`stack_key`].
    pub reports: HashMap<String, ApplyOutcome>,
    pub generated: usize,
    pub cached: usize,
    /// Generation pipelines loaded (one per model with anything to generate or apply): 0 when
    /// every image and LoRA report came from the cache.
    pub pipelines_loaded: usize,
    pub seconds: f64,
    /// What the models said while generating (a VAE upcast to f32).
    pub notes: Vec<String>,
}

/// Identifies a (model, LoRA files) pair; weights do not change whether a LoRA applies.
pub fn stack_key(suite: &Suite, model_fp: &str, job: &Job) -> String {
    let files: Vec<&str> = job.stack.iter().map(|a| suite.loras[a.lora].file.hash.as_str()).collect();
    crate::fsutil::content_hash(format!("{model_fp}|{}", files.join(",")).as_bytes())
}

pub struct GenerateOptions<'a> {
    pub device: &'a Device,
    pub dtype: DType,
    /// The VAE's dtype when it differs from `dtype` (`--vae-dtype f32`).
    pub vae_dtype: Option<DType>,
    pub max_batch: usize,
}

fn record_for(suite: &Suite, job: &Job, model_fp: &str, device: &Device, compute: &str) -> GenerationRecord {
    let p = &job.params;
    GenerationRecord {
        prompt: job.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        seed: job.seed,
        steps: p.steps,
        guidance: p.guidance,
        sampler: p.sampler.name().into(),
        width: p.width,
        height: p.height,
        clip_skip: p.clip_skip,
        model: job.model.name.clone(),
        model_hash: model_fp.to_string(),
        loras: job
            .stack
            .iter()
            .map(|a| {
                let l = &suite.loras[a.lora];
                LoraUse { name: l.file.name(), hash: l.file.hash.clone(), weight: a.weight }
            })
            .collect(),
        device: device_class(device).into(),
        dtype: compute.into(),
        loragate: VERSION.into(),
        generator: super::cache::GENERATOR_VERSION.into(),
    }
}

/// Makes (or finds) every image of the plan.
pub fn generate_all(suite: &Suite, plan: &Plan, cache: &ImageCache, opts: &GenerateOptions, progress: &Progress) -> Result<Generation> {
    let start = Instant::now();
    let (device, dtype) = (opts.device, opts.dtype);
    let compute = crate::device::compute_name(dtype, opts.vae_dtype);
    let mut fingerprints: HashMap<ModelRef, String> = HashMap::new();
    for job in &plan.jobs {
        if !fingerprints.contains_key(&job.model) {
            fingerprints.insert(job.model.clone(), model_fingerprint(&job.model.location)?);
        }
    }
    let key_of = |job: &Job| -> String { KeyParts::of(job, |i| suite.loras[i].file.hash.as_str(), &fingerprints[&job.model], device_class(device), &compute).key() };

    let mut outcomes: Vec<Option<JobOutcome>> = vec![None; plan.jobs.len()];
    let mut reports: HashMap<String, ApplyOutcome> = HashMap::new();
    let mut cached = 0;
    for (i, job) in plan.jobs.iter().enumerate() {
        let key = key_of(job);
        if !job.stack.is_empty() {
            let sk = stack_key(suite, &fingerprints[&job.model], job);
            if !reports.contains_key(&sk)
                && let Some(r) = cache.get_report(&sk) {
                    reports.insert(sk, r);
                }
        }
        if let Some((image, meta)) = cache.get(&key) {
            cached += 1;
            outcomes[i] = Some(JobOutcome { key, image: Some(image), had_nan: meta.had_nan, cached: true, record: Some(meta.record) });
        }
    }

    // What still needs a model: jobs without images, and stacks without a known outcome.
    let mut by_model: BTreeMap<ModelRef, Vec<usize>> = BTreeMap::new();
    for (i, job) in plan.jobs.iter().enumerate() {
        let needs_report = !job.stack.is_empty() && !reports.contains_key(&stack_key(suite, &fingerprints[&job.model], job));
        if outcomes[i].is_none() || needs_report {
            by_model.entry(job.model.clone()).or_default().push(i);
        }
    }
    let to_generate = outcomes.iter().filter(|o| o.is_none()).count();
    progress.set(0);
    progress.message(format!("{to_generate} to generate, {cached} cached"));
    let mut generated = 0;
    let mut pipelines_loaded = 0;
    let mut notes = Vec::new();
    for (model, job_ids) in by_model {
        progress.message(format!("loading {}", model.name));
        let mut pipe = Pipeline::load(&model.location, dtype, device)?;
        pipelines_loaded += 1;
        if let Some(v) = opts.vae_dtype {
            pipe.set_vae_dtype(v)?;
        }
        pipe.max_batch = opts.max_batch.max(1);
        let fp = fingerprints[&model].clone();
        // Group by stack (LoRA files and weights, in order).
        let mut by_stack: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in &job_ids {
            let s: Vec<String> = plan.jobs[i].stack.iter().map(|a| format!("{}@{}", a.lora, a.weight)).collect();
            by_stack.entry(s.join(",")).or_default().push(i);
        }
        for (_, ids) in by_stack {
            let stack = plan.jobs[ids[0]].stack.clone();
            let pairs: Vec<(&crate::lora::LoraFile, f64)> = stack.iter().map(|a| (&*suite.loras[a.lora].file, a.weight)).collect();
            let sk = (!stack.is_empty()).then(|| stack_key(suite, &fp, &plan.jobs[ids[0]]));
            match LoraStack::resolve(&pipe, &pairs) {
                Ok(bound) => {
                    let report = bound.apply(&pipe)?;
                    if let Some(sk) = &sk {
                        cache.put_report(sk, &Ok(report.clone()))?;
                        reports.insert(sk.clone(), Ok(report));
                    }
                }
                Err(e @ Error::LoraMismatch { .. }) => {
                    let msg = e.to_string();
                    if let Some(sk) = &sk {
                        cache.put_report(sk, &Err(msg.clone()))?;
                        reports.insert(sk.clone(), Err(msg));
                    }
                    for &i in &ids {
                        if outcomes[i].is_none() {
                            outcomes[i] = Some(JobOutcome { key: key_of(&plan.jobs[i]), image: None, had_nan: false, cached: false, record: None });
                        }
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            // Batch the missing images by identical generation settings.
            let mut by_params: Vec<(GenerationParams, Vec<usize>)> = Vec::new();
            for &i in &ids {
                if outcomes[i].is_some() {
                    continue;
                }
                let p = &plan.jobs[i].params;
                match by_params.iter_mut().find(|(q, _)| q == p) {
                    Some((_, v)) => v.push(i),
                    None => by_params.push((p.clone(), vec![i])),
                }
            }
            for (params, group) in by_params {
                for chunk in group.chunks(pipe.max_batch) {
                    let prompts: Vec<&str> = chunk.iter().map(|&i| plan.jobs[i].prompt.as_str()).collect();
                    let seeds: Vec<u64> = chunk.iter().map(|&i| plan.jobs[i].seed).collect();
                    progress.message(format!("{} · {}", model.name, truncate(prompts[0], 40)));
                    let (images, nan) = pipe.generate_checked(&prompts, &seeds, &params, &mut |_, _| {})?;
                    for ((&i, img), had_nan) in chunk.iter().zip(tensor_to_images(&images)?).zip(nan) {
                        let job = &plan.jobs[i];
                        let key = key_of(job);
                        let record = record_for(suite, job, &fp, device, &compute);
                        cache.put(&key, &img, &CacheMeta { had_nan, record: record.clone() })?;
                        outcomes[i] = Some(JobOutcome { key, image: Some(img), had_nan, cached: false, record: Some(record) });
                        generated += 1;
                        progress.inc(1);
                    }
                }
            }
        }
        for w in pipe.take_warnings() {
            progress.println(format!("warning: prompt {:?}: {}", w.prompt, w.message));
        }
        for n in pipe.take_notes() {
            progress.println(format!("note: {}: {n}", model.name));
            notes.push(format!("{}: {n}", model.name));
        }
    }
    let outcomes = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| Error::internal(format!("job {i} was neither cached nor generated"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Generation { outcomes, reports, generated, cached, pipelines_loaded, seconds: start.elapsed().as_secs_f64(), notes })
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}
