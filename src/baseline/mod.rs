//! Stored reference images and their review, in the manner of insta's snapshots.
//!
//! Layout: `baselines/<suite>/<device>-<dtype>/<case>/<image>.png` with a `<image>.json` beside
//! it that says what produced it (model and LoRA hashes, prompt, seed, steps, size, device,
//! dtype). Baselines are keyed by device class and dtype because those change pixels.
//!
//! A mismatch never overwrites anything: the new image is written beside the old one as
//! `<image>.new.png` (+ `.new.json`), and `loragate baseline review | accept | reject` settles
//! pending files. In CI (`CI=true` or `--ci`) nothing under `baselines/` is ever written.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::write_text_atomic;
use crate::imageio::{read_image, write_png};
use crate::record::GenerationRecord;
use crate::score::pixels::similarity;

/// The metadata file beside a baseline image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaselineMeta {
    pub suite: String,
    pub case: String,
    pub image: String,
    pub record: GenerationRecord,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BaselineStatus {
    /// Similar enough to the stored image.
    Match { score: f64 },
    /// Differs; `pending` is where the new image was written (None in CI).
    Changed { score: f64, pending: Option<PathBuf> },
    /// No stored image yet.
    Missing { pending: Option<PathBuf> },
}

#[derive(Debug, Clone)]
pub struct Comparison {
    pub case: String,
    pub image: String,
    pub baseline: PathBuf,
    pub status: BaselineStatus,
    /// What changed in the generation facts since the baseline was accepted.
    pub changed_inputs: Vec<String>,
}

/// A pending image waiting for review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub case: String,
    pub image: String,
    pub new_png: PathBuf,
    pub old_png: PathBuf,
}

impl Pending {
    pub fn id(&self) -> String {
        format!("{}/{}", self.case, self.image)
    }
}

#[derive(Debug, Clone)]
pub struct BaselineStore {
    pub suite: String,
    /// `baselines/<suite>/<class>`.
    pub dir: PathBuf,
    pub write_pending: bool,
}

impl BaselineStore {
    /// `root` is the `baselines/` folder; `class` is e.g. `cpu-f32`.
    pub fn new(root: &Path, suite: &str, class: &str, write_pending: bool) -> Self {
        BaselineStore { suite: suite.to_string(), dir: root.join(suite).join(class), write_pending }
    }

    pub fn png(&self, case: &str, image: &str) -> PathBuf {
        self.dir.join(case).join(format!("{image}.png"))
    }

    fn json(&self, case: &str, image: &str) -> PathBuf {
        self.dir.join(case).join(format!("{image}.json"))
    }

    fn new_png(&self, case: &str, image: &str) -> PathBuf {
        self.dir.join(case).join(format!("{image}.new.png"))
    }

    fn new_json(&self, case: &str, image: &str) -> PathBuf {
        self.dir.join(case).join(format!("{image}.new.json"))
    }

    /// Compares `current` with the stored baseline and records a pending file when it differs.
    pub fn compare(&self, case: &str, image: &str, current: &RgbImage, record: &GenerationRecord, threshold: f64) -> Result<Comparison> {
        let png = self.png(case, image);
        let meta = BaselineMeta { suite: self.suite.clone(), case: case.into(), image: image.into(), record: record.clone() };
        let (status, changed_inputs) = if png.is_file() {
            let stored = read_image(&png)?;
            let score = if stored.dimensions() == current.dimensions() { similarity(&stored, current)? } else { 0.0 };
            let changed = match std::fs::read_to_string(self.json(case, image)).ok().and_then(|t| serde_json::from_str::<BaselineMeta>(&t).ok()) {
                Some(old) => describe_changes(&old.record, record),
                None => vec!["the baseline has no metadata file".into()],
            };
            if score >= threshold {
                // A stale pending file from an earlier run no longer applies.
                self.remove_pending(case, image);
                (BaselineStatus::Match { score }, changed)
            } else {
                (BaselineStatus::Changed { score, pending: self.write_new(case, image, current, &meta)? }, changed)
            }
        } else {
            (BaselineStatus::Missing { pending: self.write_new(case, image, current, &meta)? }, Vec::new())
        };
        Ok(Comparison { case: case.into(), image: image.into(), baseline: png, status, changed_inputs })
    }

    fn write_new(&self, case: &str, image: &str, img: &RgbImage, meta: &BaselineMeta) -> Result<Option<PathBuf>> {
        if !self.write_pending {
            return Ok(None);
        }
        let p = self.new_png(case, image);
        write_png(&p, img, &meta.record.png_text())?;
        write_text_atomic(&self.new_json(case, image), &serde_json::to_string_pretty(meta).expect("serialisable"))?;
        Ok(Some(p))
    }

    fn remove_pending(&self, case: &str, image: &str) {
        if self.write_pending {
            let _ = std::fs::remove_file(self.new_png(case, image));
            let _ = std::fs::remove_file(self.new_json(case, image));
        }
    }

    /// Every pending image, sorted.
    pub fn pending(&self) -> Result<Vec<Pending>> {
        let mut out = Vec::new();
        let Ok(cases) = std::fs::read_dir(&self.dir) else { return Ok(out) };
        for case in cases.flatten() {
            if !case.path().is_dir() {
                continue;
            }
            let case_name = case.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(case.path()).map_err(|e| Error::io(case.path(), e))?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(image) = name.strip_suffix(".new.png") {
                    out.push(Pending {
                        case: case_name.clone(),
                        image: image.to_string(),
                        new_png: f.path(),
                        old_png: self.png(&case_name, image),
                    });
                }
            }
        }
        out.sort_by_key(|a| a.id());
        Ok(out)
    }

    /// Makes a pending image the baseline (rename is atomic: no half-written baseline).
    pub fn accept(&self, p: &Pending) -> Result<()> {
        let new_json = self.new_json(&p.case, &p.image);
        if new_json.is_file() {
            std::fs::rename(&new_json, self.json(&p.case, &p.image)).map_err(|e| Error::io(&new_json, e))?;
        }
        std::fs::rename(&p.new_png, &p.old_png).map_err(|e| Error::io(&p.new_png, e))
    }

    pub fn reject(&self, p: &Pending) -> Result<()> {
        let _ = std::fs::remove_file(self.new_json(&p.case, &p.image));
        std::fs::remove_file(&p.new_png).map_err(|e| Error::io(&p.new_png, e))
    }

    /// Baseline images that no case of the suite produced this run (renamed or removed cases).
    pub fn stale(&self, produced: &std::collections::HashSet<(String, String)>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(cases) = std::fs::read_dir(&self.dir) else { return out };
        for case in cases.flatten() {
            let case_name = case.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(case.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".new.png") {
                    continue;
                }
                if let Some(image) = name.strip_suffix(".png")
                    && !produced.contains(&(case_name.clone(), image.to_string())) {
                        out.push(f.path());
                    }
            }
        }
        out.sort();
        out
    }
}

/// Human-readable differences between the facts of two generations.
pub fn describe_changes(old: &GenerationRecord, new: &GenerationRecord) -> Vec<String> {
    let mut out = Vec::new();
    if old.model_hash != new.model_hash {
        out.push(format!("model {} changed", new.model));
    }
    if old.loras.len() != new.loras.len() || old.loras.iter().zip(&new.loras).any(|(a, b)| a.hash != b.hash) {
        out.push("LoRA file(s) changed".into());
    }
    if old.loras.iter().zip(&new.loras).any(|(a, b)| a.weight != b.weight) {
        out.push("LoRA weights changed".into());
    }
    for (what, a, b) in [
        ("prompt", old.prompt.clone(), new.prompt.clone()),
        ("negative prompt", old.negative_prompt.clone(), new.negative_prompt.clone()),
        ("seed", old.seed.to_string(), new.seed.to_string()),
        ("steps", old.steps.to_string(), new.steps.to_string()),
        ("guidance", old.guidance.to_string(), new.guidance.to_string()),
        ("sampler", old.sampler.clone(), new.sampler.clone()),
        ("size", format!("{}x{}", old.width, old.height), format!("{}x{}", new.width, new.height)),
        ("loragate version", old.loragate.clone(), new.loragate.clone()),
    ] {
        if a != b {
            out.push(format!("{what}: {a} → {b}"));
        }
    }
    out
}

/// Selects pending entries by a substring of `case/image` (all when `None`).
pub fn matches(filter: Option<&str>, p: &Pending) -> bool {
    filter.is_none_or(|f| p.id().contains(f))
}
