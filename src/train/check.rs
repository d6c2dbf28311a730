//! The dataset check that runs before training (and alone with `loragate train --check`):
//! unreadable files, missing or empty captions, images below the training size, stray
//! caption files, ignored folders, and near-duplicate images by perceptual hash.
//!
//! Errors stop training (the run would be wrong); warnings are printed and training goes on.

use std::path::Path;

use image::RgbImage;
use rayon::prelude::*;

use super::dataset::{FoundImage, Scan, TrainImage, bucket_for, buckets, dataset_hash, read_caption, scan};
use crate::error::Result;
pub use crate::score::phash::{HASH_BITS, PerceptualHash};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// What is wrong with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// The folder holds no usable image.
    NoImages,
    /// The file is not a decodable image.
    Unreadable,
    /// No `.txt` caption beside the image (and no `default_caption`).
    MissingCaption,
    /// The caption file is empty: the image trains as unconditional.
    EmptyCaption,
    /// Smaller than its training bucket: it will be upscaled (blurry).
    TooSmall,
    /// Looks the same as another image (perceptual hash).
    NearDuplicate,
    /// A caption without an image.
    OrphanCaption,
    /// A sub-folder that is not an `N_name` repeat folder.
    IgnoredFolder,
}

impl Problem {
    pub fn name(&self) -> &'static str {
        match self {
            Problem::NoImages => "no images",
            Problem::Unreadable => "unreadable",
            Problem::MissingCaption => "missing caption",
            Problem::EmptyCaption => "empty caption",
            Problem::TooSmall => "too small",
            Problem::NearDuplicate => "near-duplicate",
            Problem::OrphanCaption => "caption without image",
            Problem::IgnoredFolder => "ignored folder",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub severity: Severity,
    pub problem: Problem,
    /// Relative to the dataset folder.
    pub file: String,
    pub detail: String,
}

/// What the check compares against.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Training resolutions (the largest decides "too small").
    pub resolutions: Vec<usize>,
    pub bucket_step: usize,
    pub max_aspect: f64,
    /// Perceptual-hash distance (bits of [`HASH_BITS`]) at or below which two images count as
    /// near-duplicates.
    pub duplicate_distance: u32,
    /// Caption for images without a `.txt` file; `None` makes a missing caption an error.
    pub default_caption: Option<String>,
}

/// The outcome: findings, and the images that are fit to train on.
#[derive(Debug, Clone)]
pub struct DatasetCheck {
    pub root: std::path::PathBuf,
    pub findings: Vec<Finding>,
    pub images: Vec<TrainImage>,
    /// Images found (usable or not).
    pub scanned: usize,
    /// See [`dataset_hash`].
    pub hash: String,
}

impl DatasetCheck {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning).count()
    }

    /// Samples per epoch (images × repeats).
    pub fn samples_per_epoch(&self) -> usize {
        self.images.iter().map(|i| i.repeats).sum()
    }

    /// The findings as a table (errors first), with a summary line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let summary = format!(
            "dataset {}: {} images found, {} usable ({} samples per epoch with repeats); {} errors, {} warnings\n",
            self.root.display(),
            self.scanned,
            self.images.len(),
            self.samples_per_epoch(),
            self.errors(),
            self.warnings()
        );
        if self.findings.is_empty() {
            out.push_str(&summary);
            return out;
        }
        let mut rows: Vec<&Finding> = self.findings.iter().collect();
        rows.sort_by(|a, b| (a.severity, a.problem, &a.file).cmp(&(b.severity, b.problem, &b.file)));
        let fw = rows.iter().map(|f| f.file.chars().count()).max().unwrap_or(4).clamp(4, 48);
        let pw = rows.iter().map(|f| f.problem.name().len()).max().unwrap_or(7).max(7);
        out.push_str(&format!("{:<8} {:<pw$} {:<fw$} detail\n", "severity", "problem", "file"));
        out.push_str(&format!("{} {} {} {}\n", "-".repeat(8), "-".repeat(pw), "-".repeat(fw), "-".repeat(40)));
        for f in rows {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            out.push_str(&format!("{sev:<8} {:<pw$} {:<fw$} {}\n", f.problem.name(), f.file, f.detail));
        }
        out.push_str(&summary);
        out
    }
}

struct Loaded {
    found: FoundImage,
    image: std::result::Result<RgbImage, String>,
    caption: std::result::Result<Option<String>, String>,
    file_hash: String,
}

fn load(found: &FoundImage) -> Loaded {
    let bytes = std::fs::read(&found.path);
    let (image, file_hash) = match bytes {
        Err(e) => (Err(e.to_string()), String::new()),
        Ok(b) => {
            let h = crate::fsutil::content_hash(&b);
            let img = image::load_from_memory(&b).map(|d| d.to_rgb8()).map_err(|e| e.to_string());
            (img, h)
        }
    };
    let caption = match &found.caption_path {
        None => Ok(None),
        Some(p) => read_caption(p).map(Some).map_err(|e| e.to_string()),
    };
    Loaded { found: found.clone(), image, caption, file_hash }
}

/// Scans and checks a dataset folder.
pub fn check_dataset(root: &Path, o: &CheckOptions) -> Result<DatasetCheck> {
    let s = scan(root)?;
    Ok(check_scan(&s, o))
}

/// Checks a scanned folder: decodes every image (in parallel) and reads every caption.
pub fn check_scan(s: &Scan, o: &CheckOptions) -> DatasetCheck {
    let mut findings = Vec::new();
    let mut warn = |problem, file: &str, detail: String| {
        findings.push(Finding { severity: Severity::Warning, problem, file: file.to_string(), detail })
    };
    for sk in &s.skipped {
        warn(Problem::IgnoredFolder, &sk.rel, sk.reason.clone());
    }
    for c in &s.orphan_captions {
        warn(Problem::OrphanCaption, c, "no image with the same name; the caption is unused".into());
    }
    let loaded: Vec<Loaded> = s.images.par_iter().map(load).collect();
    let max_res = o.resolutions.iter().copied().max().unwrap_or(0);
    let top_buckets = if max_res > 0 { buckets(max_res, o.bucket_step.max(1), o.max_aspect) } else { Vec::new() };
    let mut images = Vec::new();
    let mut hashes: Vec<(usize, PerceptualHash)> = Vec::new();
    let mut identity = Vec::new();
    for l in loaded {
        let f = &l.found;
        let img = match l.image {
            Ok(i) => i,
            Err(e) => {
                findings.push(Finding {
                    severity: Severity::Error,
                    problem: Problem::Unreadable,
                    file: f.rel.clone(),
                    detail: format!("cannot decode: {e}"),
                });
                continue;
            }
        };
        let caption = match l.caption {
            Ok(Some(c)) => {
                if c.is_empty() {
                    findings.push(Finding {
                        severity: Severity::Warning,
                        problem: Problem::EmptyCaption,
                        file: f.rel.clone(),
                        detail: "the caption file is empty; the image trains with the empty prompt".into(),
                    });
                }
                c
            }
            Ok(None) => match &o.default_caption {
                Some(d) => {
                    findings.push(Finding {
                        severity: Severity::Warning,
                        problem: Problem::MissingCaption,
                        file: f.rel.clone(),
                        detail: format!("no .txt caption; using default_caption {d:?}"),
                    });
                    d.clone()
                }
                None => {
                    findings.push(Finding {
                        severity: Severity::Error,
                        problem: Problem::MissingCaption,
                        file: f.rel.clone(),
                        detail: format!(
                            "no caption file {}; write one, or set default_caption",
                            Path::new(&f.rel).with_extension("txt").display()
                        ),
                    });
                    continue;
                }
            },
            Err(e) => {
                findings.push(Finding {
                    severity: Severity::Error,
                    problem: Problem::Unreadable,
                    file: f.caption_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    detail: format!("caption cannot be read: {e}"),
                });
                continue;
            }
        };
        if !top_buckets.is_empty() {
            let (bw, bh) = bucket_for(img.width(), img.height(), &top_buckets);
            if (img.width() as usize) < bw || (img.height() as usize) < bh {
                findings.push(Finding {
                    severity: Severity::Warning,
                    problem: Problem::TooSmall,
                    file: f.rel.clone(),
                    detail: format!(
                        "{}x{} is below its training size {bw}x{bh}; it will be upscaled and look soft",
                        img.width(),
                        img.height()
                    ),
                });
            }
        }
        hashes.push((images.len(), PerceptualHash::of(&img)));
        identity.push((f.rel.clone(), l.file_hash.clone(), caption.clone(), f.repeats));
        images.push(TrainImage { rel: f.rel.clone(), image: img, caption, repeats: f.repeats, folder: f.folder.clone() });
    }
    // Near-duplicates: each image is reported once, against the first earlier image it matches.
    for i in 0..hashes.len() {
        let best = (0..i)
            .map(|j| (j, hashes[i].1.distance(&hashes[j].1)))
            .filter(|&(_, d)| d <= o.duplicate_distance)
            .min_by_key(|&(_, d)| d);
        if let Some((j, d)) = best {
            findings.push(Finding {
                severity: Severity::Warning,
                problem: Problem::NearDuplicate,
                file: images[hashes[i].0].rel.clone(),
                detail: format!(
                    "looks like {} (hash distance {d} of {HASH_BITS}); duplicates weigh an image more than intended",
                    images[hashes[j].0].rel
                ),
            });
        }
    }
    if images.is_empty() {
        findings.push(Finding {
            severity: Severity::Error,
            problem: Problem::NoImages,
            file: ".".into(),
            detail: format!(
                "no usable images (looked for {} with .txt captions, at the top level and in N_name folders)",
                super::dataset::IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    DatasetCheck { root: s.root.clone(), findings, images, scanned: s.images.len(), hash: dataset_hash(&identity) }
}
