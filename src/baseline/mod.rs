//! Stored reference images and measurements, and their review, in the manner of insta's
//! snapshots.
//!
//! Layout: `baselines/<suite>/<device>-<dtype>/<case>/<image>.png` with a `<image>.json` beside
//! it that says what produced it (model and LoRA hashes, prompt, seed, steps, size, generator
//! version, device, dtype) and the hash of its pixels, plus `<case>/scores.json`, the case's
//! accepted measurements ([`scores`]). Baselines are keyed by device class and dtype because
//! those change pixels.
//!
//! What a difference means depends on the inputs ([`ImageVerdict`]): with the same inputs, a
//! pixel change means the environment (code, machine) moved pixels; with changed inputs (a new
//! LoRA file), the image is a review item. Nothing is overwritten unasked: depending on the
//! [`UpdateMode`], a new image is written beside the old one as `<image>.new.png` (+ `.new.json`,
//! and `scores.new.json`), written over it, or not written at all.
//!
//! Accepting moves files through a journal (`.journal.json`): a run killed halfway is completed
//! the next time the store is opened, so an image and its metadata always change together.

pub mod scores;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{content_hash, write_text_atomic};
use crate::imageio::{read_image, write_png};
use crate::names::SafeName;
use crate::record::GenerationRecord;
use crate::score::pixels::similarity;
use scores::ScoreBaseline;

/// When a run may write under `baselines/`, as insta's `INSTA_UPDATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateMode {
    /// Write nothing (the default when `CI` is set).
    Never,
    /// Write new and changed images as pending `.new` files for review (the local default).
    Pending,
    /// Write new and changed images straight over the baselines.
    Always,
}

impl UpdateMode {
    /// `pending` locally, `never` where the `CI` variable is set (as every CI system does).
    pub fn default_for_environment() -> UpdateMode {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
        if ci { UpdateMode::Never } else { UpdateMode::Pending }
    }

    pub fn parse(s: &str) -> std::result::Result<UpdateMode, String> {
        match s {
            "never" | "no" => Ok(UpdateMode::Never),
            "pending" | "new" => Ok(UpdateMode::Pending),
            "always" => Ok(UpdateMode::Always),
            _ => Err(format!("`{s}`: use never, pending or always")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            UpdateMode::Never => "never",
            UpdateMode::Pending => "pending",
            UpdateMode::Always => "always",
        }
    }
}

/// The metadata file beside a baseline image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaselineMeta {
    pub suite: String,
    pub case: String,
    pub image: String,
    pub record: GenerationRecord,
    /// Content hash of the RGB pixels: the image and this file belong together.
    #[serde(default)]
    pub pixels: String,
}

/// The hash of an image's pixels (not of its PNG encoding).
pub fn pixel_hash(img: &RgbImage) -> String {
    let mut bytes = format!("{}x{}|", img.width(), img.height()).into_bytes();
    bytes.extend_from_slice(img.as_raw());
    content_hash(&bytes)
}

/// What one image's comparison with its baseline means.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageVerdict {
    /// Similar enough to the stored image.
    Match { score: f64 },
    /// Same inputs, other pixels: code or machine changed the output. A failure.
    EnvironmentChanged { score: f64 },
    /// The inputs changed (named); the new image asks for review.
    InputsChanged { score: f64, changes: Vec<String> },
    /// No stored image yet: review.
    Missing,
    /// The stored image or its metadata cannot be read. A failure of this image's check only.
    Corrupt { reason: String },
}

#[derive(Debug, Clone)]
pub struct Comparison {
    pub image: SafeName,
    pub baseline: PathBuf,
    pub stored: Option<RgbImage>,
    pub verdict: ImageVerdict,
    /// Where the new image was written (pending or over the baseline), if it was.
    pub written: Option<PathBuf>,
}

/// A pending file waiting for review: an image, or a case's measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub case: String,
    /// The image name, or `scores` for the measurements.
    pub image: String,
    pub new_file: PathBuf,
    pub old_file: PathBuf,
}

impl Pending {
    pub fn id(&self) -> String {
        format!("{}/{}", self.case, self.image)
    }

    pub fn is_scores(&self) -> bool {
        self.image == SCORES
    }
}

const SCORES: &str = "scores";
const JOURNAL: &str = ".journal.json";

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    /// (from, to), file names relative to the store folder.
    moves: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct BaselineStore {
    pub suite: String,
    /// `baselines/<suite>/<class>`.
    pub dir: PathBuf,
    pub update: UpdateMode,
}

impl BaselineStore {
    /// Opens `root/<suite>/<class>` (`class` e.g. `cpu-f32`), first completing an accept that
    /// was interrupted. Returns what recovery did, if anything.
    pub fn open(root: &Path, suite: &SafeName, class: &SafeName, update: UpdateMode) -> Result<(Self, Vec<String>)> {
        let store = BaselineStore { suite: suite.to_string(), dir: class.under(&suite.under(root)), update };
        let recovered = store.recover()?;
        Ok((store, recovered))
    }

    fn case_dir(&self, case: &str) -> PathBuf {
        self.dir.join(case)
    }

    pub fn png(&self, case: &str, image: &str) -> PathBuf {
        self.case_dir(case).join(format!("{image}.png"))
    }

    fn json(&self, case: &str, image: &str) -> PathBuf {
        self.case_dir(case).join(format!("{image}.json"))
    }

    fn new_png(&self, case: &str, image: &str) -> PathBuf {
        self.case_dir(case).join(format!("{image}.new.png"))
    }

    fn new_json(&self, case: &str, image: &str) -> PathBuf {
        self.case_dir(case).join(format!("{image}.new.json"))
    }

    pub fn scores_path(&self, case: &str) -> PathBuf {
        self.case_dir(case).join("scores.json")
    }

    fn new_scores_path(&self, case: &str) -> PathBuf {
        self.case_dir(case).join("scores.new.json")
    }

    /// Compares `current` with the stored baseline. New and changed images are written as the
    /// update mode allows.
    pub fn compare(&self, case: &SafeName, image: &SafeName, current: &RgbImage, record: &GenerationRecord, threshold: f64) -> Result<Comparison> {
        let (case, name) = (case.as_str(), image.as_str());
        let png = self.png(case, name);
        let meta = BaselineMeta { suite: self.suite.clone(), case: case.into(), image: name.into(), record: record.clone(), pixels: pixel_hash(current) };
        let mut stored = None;
        let verdict = if !png.exists() {
            ImageVerdict::Missing
        } else {
            match self.read_stored(case, name) {
                Err(reason) => ImageVerdict::Corrupt { reason },
                Ok((img, old)) => {
                    let score = if img.dimensions() == current.dimensions() { similarity(&img, current)? } else { 0.0 };
                    stored = Some(img);
                    let changes = describe_changes(&old.record, record);
                    if score >= threshold {
                        ImageVerdict::Match { score }
                    } else if changes.is_empty() {
                        ImageVerdict::EnvironmentChanged { score }
                    } else {
                        ImageVerdict::InputsChanged { score, changes }
                    }
                }
            }
        };
        let written = match verdict {
            ImageVerdict::Match { .. } => {
                // A stale pending file from an earlier run no longer applies.
                self.remove_pending(case, name);
                None
            }
            _ => self.write_image(case, name, current, &meta)?,
        };
        Ok(Comparison { image: image.clone(), baseline: png, stored, verdict, written })
    }

    /// The stored image and its metadata, checked against each other.
    fn read_stored(&self, case: &str, image: &str) -> std::result::Result<(RgbImage, BaselineMeta), String> {
        let png = self.png(case, image);
        let img = read_image(&png).map_err(|e| e.to_string())?;
        let json = self.json(case, image);
        let text = std::fs::read_to_string(&json).map_err(|e| format!("{}: {e} (every baseline image needs its metadata file)", json.display()))?;
        let meta: BaselineMeta = serde_json::from_str(&text).map_err(|e| format!("{}: not baseline metadata: {e}", json.display()))?;
        if !meta.pixels.is_empty() && meta.pixels != pixel_hash(&img) {
            return Err(format!("{} does not match the pixel hash in {}: the pair was changed separately", png.display(), json.display()));
        }
        Ok((img, meta))
    }

    fn write_image(&self, case: &str, image: &str, img: &RgbImage, meta: &BaselineMeta) -> Result<Option<PathBuf>> {
        if self.update == UpdateMode::Never {
            return Ok(None);
        }
        let (p, j) = (self.new_png(case, image), self.new_json(case, image));
        write_png(&p, img, &meta.record.png_text())?;
        write_text_atomic(&j, &serde_json::to_string_pretty(meta).expect("serialisable"))?;
        if self.update == UpdateMode::Always {
            self.commit(&[(p, self.png(case, image)), (j, self.json(case, image))])?;
            return Ok(Some(self.png(case, image)));
        }
        Ok(Some(p))
    }

    fn remove_pending(&self, case: &str, image: &str) {
        if self.update != UpdateMode::Never {
            let _ = std::fs::remove_file(self.new_png(case, image));
            let _ = std::fs::remove_file(self.new_json(case, image));
        }
    }

    /// The accepted measurements of a case: `Ok(None)` when there are none yet, an error
    /// message when the file is unreadable.
    pub fn scores(&self, case: &str) -> std::result::Result<Option<ScoreBaseline>, String> {
        let path = self.scores_path(case);
        match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| format!("{}: not a score baseline: {e}", path.display())),
        }
    }

    /// Writes a case's measurements as the update mode allows; returns where.
    pub fn write_scores(&self, case: &str, scores: &ScoreBaseline) -> Result<Option<PathBuf>> {
        if self.update == UpdateMode::Never {
            return Ok(None);
        }
        let p = self.new_scores_path(case);
        write_text_atomic(&p, &serde_json::to_string_pretty(scores).expect("serialisable"))?;
        if self.update == UpdateMode::Always {
            self.commit(&[(p, self.scores_path(case))])?;
            return Ok(Some(self.scores_path(case)));
        }
        Ok(Some(p))
    }

    /// Removes a case's pending measurements (they equal the accepted ones again).
    pub fn remove_pending_scores(&self, case: &str) {
        if self.update != UpdateMode::Never {
            let _ = std::fs::remove_file(self.new_scores_path(case));
        }
    }

    /// Every pending file, sorted.
    pub fn pending(&self) -> Result<Vec<Pending>> {
        let mut out = Vec::new();
        let Ok(cases) = std::fs::read_dir(&self.dir) else { return Ok(out) };
        for case in cases.flatten() {
            if !case.path().is_dir() {
                continue;
            }
            let case_name = case.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(case.path()).at(case.path())?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name == "scores.new.json" {
                    out.push(Pending { case: case_name.clone(), image: SCORES.into(), new_file: f.path(), old_file: self.scores_path(&case_name) });
                } else if let Some(image) = name.strip_suffix(".new.png") {
                    out.push(Pending { case: case_name.clone(), image: image.to_string(), new_file: f.path(), old_file: self.png(&case_name, image) });
                }
            }
        }
        out.sort_by_key(|a| a.id());
        Ok(out)
    }

    /// Makes pending files the baselines, all together: an image moves with its metadata.
    pub fn accept(&self, items: &[Pending]) -> Result<()> {
        let mut moves = Vec::new();
        for p in items {
            if p.is_scores() {
                moves.push((p.new_file.clone(), p.old_file.clone()));
            } else {
                let new_json = self.new_json(&p.case, &p.image);
                if new_json.is_file() {
                    moves.push((new_json, self.json(&p.case, &p.image)));
                }
                moves.push((p.new_file.clone(), p.old_file.clone()));
            }
        }
        self.commit(&moves)
    }

    pub fn reject(&self, p: &Pending) -> Result<()> {
        std::fs::remove_file(&p.new_file).at(&p.new_file)?;
        if !p.is_scores() {
            let _ = std::fs::remove_file(self.new_json(&p.case, &p.image));
        }
        Ok(())
    }

    /// Renames `moves` through a journal: the journal is written first (atomically), then the
    /// files move, then the journal goes. A crash in between is completed by [`Self::recover`].
    fn commit(&self, moves: &[(PathBuf, PathBuf)]) -> Result<()> {
        if moves.is_empty() {
            return Ok(());
        }
        let rel = |p: &Path| p.strip_prefix(&self.dir).map(|r| r.to_string_lossy().into_owned()).map_err(|_| Error::internal(format!("{} is outside {}", p.display(), self.dir.display())));
        let journal = Journal { moves: moves.iter().map(|(a, b)| Ok((rel(a)?, rel(b)?))).collect::<Result<_>>()? };
        let path = self.dir.join(JOURNAL);
        write_text_atomic(&path, &serde_json::to_string(&journal).expect("serialisable"))?;
        // Test hook: die after N renames, as a killed process would.
        let die_after: Option<usize> = std::env::var("LORAGATE_FAULT_AFTER_RENAMES").ok().and_then(|v| v.parse().ok());
        for (i, (from, to)) in moves.iter().enumerate() {
            if die_after == Some(i) {
                std::process::abort();
            }
            std::fs::rename(from, to).at(from)?;
        }
        std::fs::remove_file(&path).at(&path)
    }

    /// Completes an interrupted accept: every move whose source still exists is done again.
    pub fn recover(&self) -> Result<Vec<String>> {
        let path = self.dir.join(JOURNAL);
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Vec::new()) };
        let journal: Journal = match serde_json::from_str(&text) {
            Ok(j) => j,
            // A journal that was never completely written: nothing had moved yet.
            Err(_) => {
                std::fs::remove_file(&path).at(&path)?;
                return Ok(Vec::new());
            }
        };
        let mut done = Vec::new();
        for (from, to) in &journal.moves {
            let (from, to) = (self.dir.join(from), self.dir.join(to));
            if from.exists() {
                std::fs::rename(&from, &to).at(&from)?;
                done.push(format!("completed an interrupted accept: {}", to.display()));
            }
        }
        std::fs::remove_file(&path).at(&path)?;
        Ok(done)
    }

    /// Baseline files that no case of the suite produced this run (renamed or removed cases,
    /// variants or seeds).
    pub fn stale(&self, produced: &HashSet<(String, String)>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(cases) = std::fs::read_dir(&self.dir) else { return out };
        for case in cases.flatten() {
            let case_name = case.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(case.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.contains(".new.") {
                    continue;
                }
                let image = if name == "scores.json" { Some(SCORES) } else { name.strip_suffix(".png") };
                if let Some(image) = image
                    && !produced.contains(&(case_name.clone(), image.to_string()))
                {
                    out.push(f.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Marks a case's scores as produced, for [`Self::stale`].
    pub fn scores_key(case: &str) -> (String, String) {
        (case.to_string(), SCORES.to_string())
    }
}

/// Human-readable differences between the inputs of two generations; empty when the same
/// inputs should give the same pixels.
pub fn describe_changes(old: &GenerationRecord, new: &GenerationRecord) -> Vec<String> {
    let mut out = Vec::new();
    if old.model_hash != new.model_hash {
        out.push(format!("model {} changed", new.model));
    }
    if old.loras.len() != new.loras.len() || old.loras.iter().zip(&new.loras).any(|(a, b)| a.hash != b.hash) {
        let names: Vec<&str> = new.loras.iter().map(|l| l.name.as_str()).collect();
        out.push(format!("LoRA file changed ({})", names.join(", ")));
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
        ("clip skip", old.clip_skip.to_string(), new.clip_skip.to_string()),
        ("generator version", old.generator.clone(), new.generator.clone()),
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
