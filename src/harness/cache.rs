//! A content-addressed cache of generated images, their embeddings by each scorer, and LoRA
//! application reports.
//!
//! The key of an image hashes everything that determines its pixels: the model's fingerprint,
//! each LoRA's file hash and weight in stack order, prompt, negative prompt, seed, size, steps,
//! guidance, sampler, clip skip, device and dtype, and [`GENERATOR_VERSION`], which changes
//! whenever the generation code could change pixels. Re-running an unchanged suite therefore
//! generates nothing. Entries are written atomically; a corrupt entry is treated as a miss.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::fsutil::{content_hash, write_atomic};
use crate::imageio::{read_image, read_png_text, write_png};
use crate::lora::ApplyReport;
use crate::suite::expand::Job;

/// The version of the code that turns inputs into pixels. Bump it whenever a change to the model
/// code, kernels, sampler or noise changes generated pixels: cached images and baselines made by
/// another version are then regenerated or reviewed instead of trusted. `tests/golden.rs` fails
/// when pixels change while this stays the same.
pub const GENERATOR_VERSION: &str = "gen-2";

/// What a cached image carries besides its pixels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheMeta {
    /// The float output had NaN values (they become 0 in the PNG).
    pub had_nan: bool,
    pub record: crate::record::GenerationRecord,
}

#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: Option<PathBuf>,
}

/// The facts an image key is built from.
#[derive(Debug, Serialize)]
pub struct KeyParts<'a> {
    pub model_fingerprint: &'a str,
    pub loras: Vec<(&'a str, f64)>,
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: &'a str,
    pub clip_skip: usize,
    pub device: &'a str,
    pub dtype: &'a str,
}

impl<'a> KeyParts<'a> {
    /// The facts of `job`'s image: `lora_hash(i)` is the file hash of the suite's LoRA `i`,
    /// `device` the device class (`cpu`, `cuda`), `dtype` the compute label
    /// ([`crate::device::compute_name`]).
    pub fn of(job: &'a Job, lora_hash: impl Fn(usize) -> &'a str, model_fingerprint: &'a str, device: &'a str, dtype: &'a str) -> Self {
        let p = &job.params;
        KeyParts {
            model_fingerprint,
            loras: job.stack.iter().map(|a| (lora_hash(a.lora), a.weight)).collect(),
            prompt: &job.prompt,
            negative_prompt: &p.negative_prompt,
            seed: job.seed,
            width: p.width,
            height: p.height,
            steps: p.steps,
            guidance: p.guidance,
            sampler: p.sampler.name(),
            clip_skip: p.clip_skip,
            device,
            dtype,
        }
    }

    pub fn key(&self) -> String {
        let json = serde_json::to_string(self).expect("serialisable");
        content_hash(format!("{GENERATOR_VERSION}|{json}").as_bytes())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredReport {
    ok: Option<ApplyReportData>,
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ApplyReportData {
    entries: Vec<(String, f64, usize, usize, usize, usize)>,
}

impl ImageCache {
    /// A cache in `dir`, or a disabled one.
    pub fn new(dir: Option<PathBuf>) -> Self {
        ImageCache { dir }
    }

    fn image_path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("images").join(&key[..2]).join(format!("{key}.png")))
    }

    pub fn get(&self, key: &str) -> Option<(RgbImage, CacheMeta)> {
        let path = self.image_path(key)?;
        if !path.is_file() {
            return None;
        }
        let img = read_image(&path).ok()?;
        let text = read_png_text(&path).ok()?;
        let meta = text.iter().find(|(k, _)| k == "loragate-cache")?;
        let meta: CacheMeta = serde_json::from_str(&meta.1).ok()?;
        Some((img, meta))
    }

    pub fn put(&self, key: &str, img: &RgbImage, meta: &CacheMeta) -> Result<()> {
        let Some(path) = self.image_path(key) else { return Ok(()) };
        let mut text = meta.record.png_text();
        text.push(("loragate-cache".into(), serde_json::to_string(meta).expect("serialisable")));
        write_png(&path, img, &text)
    }

    fn report_path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("reports").join(format!("{key}.json")))
    }

    /// A cached LoRA application outcome: the report, or the mismatch message.
    pub fn get_report(&self, key: &str) -> Option<std::result::Result<ApplyReport, String>> {
        let path = self.report_path(key)?;
        let text = std::fs::read_to_string(path).ok()?;
        let stored: StoredReport = serde_json::from_str(&text).ok()?;
        match (stored.ok, stored.error) {
            (Some(r), _) => Some(Ok(ApplyReport {
                entries: r
                    .entries
                    .into_iter()
                    .map(|(name, weight, ma, mt, ta, tt)| crate::lora::apply::ApplyEntry {
                        name,
                        weight,
                        modules_applied: ma,
                        modules_total: mt,
                        tensors_applied: ta,
                        tensors_total: tt,
                    })
                    .collect(),
            })),
            (None, Some(e)) => Some(Err(e)),
            _ => None,
        }
    }

    pub fn put_report(&self, key: &str, outcome: &std::result::Result<ApplyReport, String>) -> Result<()> {
        let Some(path) = self.report_path(key) else { return Ok(()) };
        let stored = match outcome {
            Ok(r) => StoredReport {
                ok: Some(ApplyReportData {
                    entries: r
                        .entries
                        .iter()
                        .map(|e| (e.name.clone(), e.weight, e.modules_applied, e.modules_total, e.tensors_applied, e.tensors_total))
                        .collect(),
                }),
                error: None,
            },
            Err(e) => StoredReport { ok: None, error: Some(e.clone()) },
        };
        write_atomic(&path, serde_json::to_string(&stored).expect("serialisable").as_bytes())
    }
}

impl ImageCache {
    fn vector_path(&self, space: &str, key: &str) -> Option<PathBuf> {
        // `space` names the scorer and its content fingerprint: another model, another folder.
        let space = &content_hash(format!("{EMBEDDING_VERSION}|{space}").as_bytes())[..16];
        self.dir.as_ref().map(|d| d.join("embeddings").join(space).join(&key[..2.min(key.len())]).join(format!("{key}.f32")))
    }

    /// A cached embedding of the image (or text) `key` in the scorer space `space`.
    pub fn get_vector(&self, space: &str, key: &str) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.vector_path(space, key)?).ok()?;
        // A truncated or foreign file is a miss, as a corrupt image is.
        (bytes.len() % 4 == 0 && !bytes.is_empty()).then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn put_vector(&self, space: &str, key: &str, v: &[f32]) -> Result<()> {
        let Some(path) = self.vector_path(space, key) else { return Ok(()) };
        write_atomic(&path, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }
}

/// The version of the scoring code (preprocessing, towers): bump it when embeddings of the same
/// image by the same model files would change, so cached ones are not trusted.
pub const EMBEDDING_VERSION: &str = "emb-1";

/// The default cache folder: `$LORAGATE_CACHE`, else `.loragate/cache` in the repository (or
/// working directory) that holds `start`.
pub fn default_cache_dir(start: &Path) -> PathBuf {
    if let Ok(d) = std::env::var("LORAGATE_CACHE") {
        return PathBuf::from(d);
    }
    crate::harness::project_root(start).join(".loragate").join("cache")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GenerationParams;
    use crate::model::scheduler::SamplerKind;
    use crate::suite::{AdapterUse, ModelRef};

    /// Every fact the README lists changes the key, each on its own; the same facts give the
    /// same key.
    #[test]
    fn every_input_of_an_image_changes_its_key() {
        let location = crate::model::locate::ModelLocation { name: "tiny".into(), folder: "models/tiny".into(), unet_folder: None, single_file: None, config: None };
        let model = ModelRef { name: "tiny".into(), label: crate::names::SafeName::new("tiny").unwrap(), location };
        let base = Job {
            model,
            stack: vec![AdapterUse { lora: 0, weight: 1.0 }, AdapterUse { lora: 1, weight: 0.5 }],
            prompt: "zorb, large".into(),
            seed: 3,
            params: GenerationParams::default(),
        };
        let hashes = ["aaaa", "bbbb", "cccc"];
        let key = |job: &Job, hashes: [&'static str; 3], fp: &str, device: &str, dtype: &str| KeyParts::of(job, |i| hashes[i], fp, device, dtype).key();
        let base_key = key(&base, hashes, "fp", "cpu", "f32");
        assert_eq!(key(&base.clone(), hashes, "fp", "cpu", "f32"), base_key, "the same facts, the same key");
        let with = |f: &dyn Fn(&mut Job)| {
            let mut j = base.clone();
            f(&mut j);
            key(&j, hashes, "fp", "cpu", "f32")
        };
        let variants: Vec<(&str, String)> = vec![
            ("model fingerprint", key(&base, hashes, "fp2", "cpu", "f32")),
            ("a LoRA file", key(&base, ["aaaa", "dddd", "cccc"], "fp", "cpu", "f32")),
            ("device", key(&base, hashes, "fp", "cuda", "f32")),
            ("dtype", key(&base, hashes, "fp", "cpu", "f16")),
            ("the VAE's dtype", key(&base, hashes, "fp", "cpu", "f16+vae-f32")),
            ("LoRA weight", with(&|j| j.stack[1].weight = 0.75)),
            ("LoRA order", with(&|j| j.stack.reverse())),
            ("one LoRA fewer", with(&|j| j.stack.truncate(1))),
            ("prompt", with(&|j| j.prompt.push('!'))),
            ("negative prompt", with(&|j| j.params.negative_prompt = "blurry".into())),
            ("seed", with(&|j| j.seed = 4)),
            ("width", with(&|j| j.params.width = 192)),
            ("height", with(&|j| j.params.height = 192)),
            ("steps", with(&|j| j.params.steps = 21)),
            ("guidance", with(&|j| j.params.guidance = 5.5)),
            ("sampler", with(&|j| j.params.sampler = SamplerKind::Euler)),
            ("clip skip", with(&|j| j.params.clip_skip = 2)),
        ];
        let mut seen = std::collections::BTreeMap::from([(base_key, "base")]);
        for (what, k) in &variants {
            if let Some(other) = seen.insert(k.clone(), what) {
                panic!("changing the {what} gives the key of {other}");
            }
        }
        // A name is not a pixel: the same model under another name keeps its key.
        assert_eq!(with(&|j| j.model.name = "tiny-again".into()), key(&base, hashes, "fp", "cpu", "f32"));
    }
}
