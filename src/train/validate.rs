//! Validation of checkpoints by a suite: each checkpoint replaces one LoRA of the suite, the
//! suite runs, and its verdict (checks passed and failed) is recorded. At the end a table and
//! one JUnit file (a test suite per checkpoint) show every verdict, and the best passing
//! checkpoint is named.
//!
//! Baseline checks are left out of verdicts: baselines pin the images of one accepted LoRA,
//! and every checkpoint makes new images by design.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{DType, Device};

use super::config::ValidationConfig;
use crate::error::{Error, Result};
use crate::fsutil::write_text_atomic;
use crate::harness::{RunOptions, Status, project_root, run_suite};
use crate::lora::LoraFile;
use crate::suite::{Suite, load_suite};

/// One checkpoint's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointVerdict {
    pub step: usize,
    pub file: PathBuf,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// `case::check: message` of each failed check.
    pub failures: Vec<String>,
    /// This checkpoint's JUnit file.
    pub junit: PathBuf,
    pub seconds: f64,
}

impl CheckpointVerdict {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }
}

/// A loaded validation suite and where its results go.
pub struct Validator {
    suite: Suite,
    lora: usize,
    opts: RunOptions,
    dir: PathBuf,
}

impl Validator {
    /// Loads and checks the suite, and picks the LoRA that checkpoints replace.
    pub fn new(cfg: &ValidationConfig, device: &Device, dtype: DType, out_dir: &Path) -> Result<Self> {
        let suite = load_suite(&cfg.suite)?;
        let names: Vec<&str> = suite.loras.iter().map(|l| l.name.as_str()).collect();
        let lora = match &cfg.lora {
            Some(n) => suite.loras.iter().position(|l| &l.name == n).ok_or_else(|| {
                Error::invalid(format!(
                    "validation_lora `{n}` is not a LoRA of suite {} (it has: {})",
                    cfg.suite.display(),
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                ))
            })?,
            None => match suite.loras.len() {
                1 => 0,
                0 => {
                    return Err(Error::invalid(format!(
                        "validation suite {} has no LoRA for checkpoints to replace; add one under `loras:`",
                        cfg.suite.display()
                    )));
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "validation suite {} has several LoRAs ({}); say which one checkpoints replace with validation_lora",
                        cfg.suite.display(),
                        names.join(", ")
                    )));
                }
            },
        };
        let dir = out_dir.join("validation");
        let root = project_root(&cfg.suite);
        let opts = RunOptions {
            // Never touch the project's baselines from a training run.
            update: crate::baseline::UpdateMode::Never,
            no_checks: crate::harness::NoChecks::Fail,
            device: device.clone(),
            dtype,
            vae_dtype: None,
            // Control images (no LoRA) repeat across checkpoints: cache them.
            cache_dir: Some(dir.join(".cache")),
            baselines_dir: root.join("baselines"),
            partition: None,
            filter: None,
            max_batch: 8,
            progress: false,
        };
        Ok(Validator { suite, lora, opts, dir })
    }

    pub fn suite_name(&self) -> &str {
        self.suite.name.as_str()
    }

    /// Runs the suite with `checkpoint` in place of the chosen LoRA.
    pub fn validate(&self, checkpoint: &Path, step: usize) -> Result<CheckpointVerdict> {
        let t0 = std::time::Instant::now();
        let mut suite = self.suite.clone();
        suite.loras[self.lora].file = Arc::new(LoraFile::load(checkpoint)?);
        let mut outcome = run_suite(&suite, &self.opts)?;
        outcome.results.retain(|r| r.check != "baseline");
        outcome.pending.clear();
        outcome.suite = format!("{}@step{step}", self.suite.name);
        let dir = self.dir.join(format!("step{step}"));
        let junit = dir.join("junit.xml");
        write_text_atomic(&junit, &crate::report::junit::to_junit(&outcome)?)?;
        write_text_atomic(&dir.join("report.html"), &crate::report::html::to_html(&outcome, &crate::report::EncodedImages::of(&outcome)?)?)?;
        let failures = outcome
            .results
            .iter()
            .filter(|r| matches!(r.status, Status::Failed | Status::Error))
            .map(|r| format!("{}: {}", r.id(), r.message))
            .collect();
        Ok(CheckpointVerdict {
            step,
            file: checkpoint.to_path_buf(),
            passed: outcome.passed(),
            failed: outcome.failed(),
            skipped: outcome.skipped(),
            failures,
            junit,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Writes one JUnit file with a test suite per checkpoint; returns its path.
    pub fn write_junit(&self, verdicts: &[CheckpointVerdict]) -> Result<PathBuf> {
        let files: Vec<&Path> = verdicts.iter().map(|v| v.junit.as_path()).collect();
        let path = self.dir.join("junit.xml");
        write_text_atomic(&path, &crate::report::junit::merge(&files)?)?;
        Ok(path)
    }
}

/// The checkpoint to ship: the latest one whose every check passed.
pub fn best(verdicts: &[CheckpointVerdict]) -> Option<&CheckpointVerdict> {
    verdicts.iter().filter(|v| v.ok()).max_by_key(|v| v.step)
}

/// The verdicts as a table, one row per checkpoint, the best marked.
pub fn table(verdicts: &[CheckpointVerdict]) -> String {
    let best_step = best(verdicts).map(|b| b.step);
    let mut out = String::new();
    out.push_str(&format!("{:<10} {:<7} {:>6} {:>6} {:>7}  {}\n", "checkpoint", "verdict", "passed", "failed", "skipped", "first failure / file"));
    for v in verdicts {
        let verdict = if v.ok() { "pass" } else { "FAIL" };
        let mark = if Some(v.step) == best_step { " ← best" } else { "" };
        let note = match v.failures.first() {
            Some(f) => {
                let f: String = f.chars().take(90).collect();
                if v.failures.len() > 1 { format!("{f} (+{} more)", v.failures.len() - 1) } else { f }
            }
            None => v.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        out.push_str(&format!(
            "{:<10} {:<7} {:>6} {:>6} {:>7}  {note}{mark}\n",
            format!("step {}", v.step),
            verdict,
            v.passed,
            v.failed,
            v.skipped
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(step: usize, passed: usize, failed: usize) -> CheckpointVerdict {
        CheckpointVerdict {
            step,
            file: PathBuf::from(format!("x-step{step}.safetensors")),
            passed,
            failed,
            skipped: 0,
            failures: (0..failed).map(|i| format!("case{i}::clip: too low")).collect(),
            junit: PathBuf::new(),
            seconds: 0.0,
        }
    }

    #[test]
    fn the_best_is_the_latest_checkpoint_that_passes_everything() {
        let vs = vec![v(100, 3, 1), v(200, 4, 0), v(300, 4, 0), v(400, 2, 2)];
        assert_eq!(best(&vs).unwrap().step, 300);
        assert!(best(&[v(100, 1, 1)]).is_none());
        assert!(best(&[v(100, 0, 0)]).is_none(), "nothing checked is not a pass");
        let t = table(&vs);
        assert!(t.lines().nth(3).unwrap().contains("← best"), "{t}");
        assert!(t.contains("FAIL"));
    }
}
