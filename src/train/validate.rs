//! Validation of checkpoints by a suite: each checkpoint replaces one LoRA of the suite, the
//! suite runs, and its verdict (checks passed and failed) is recorded. At the end a table and
//! one JUnit file (a test suite per checkpoint) show every verdict; [`super::pick`] chooses the
//! checkpoint to ship from them. Each verdict also keeps the suite's scores (for ranking and the
//! training report's charts) and one image of the first case that uses the LoRA (the report's
//! thumbnails).
//!
//! Baseline checks are left out of verdicts: baselines pin the images of one accepted LoRA,
//! and every checkpoint makes new images by design.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{DType, Device};

use image::RgbImage;

use super::config::ValidationConfig;
use super::pick::{Evaluation, SuiteScores};
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
    /// Mean scores by kind of check.
    pub scores: SuiteScores,
    /// `(caption, image)`: the first image (first variant, first seed) of the first case that
    /// uses the LoRA; the same prompt and seed at every checkpoint.
    pub thumbnail: Option<(String, RgbImage)>,
}

impl CheckpointVerdict {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }
}

/// The mean of each kind of score over the results (skipped checks have no numbers).
pub fn suite_scores(results: &[crate::harness::CheckResult]) -> SuiteScores {
    let mean = |check: &dyn Fn(&str) -> bool, key: &str| -> Option<f64> {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| check(&r.check) && r.status != Status::Skipped)
            .flat_map(|r| r.metrics.iter().filter(|(k, _)| k == key).map(|(_, v)| *v))
            .filter(|v| v.is_finite())
            .collect();
        if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) }
    };
    SuiteScores {
        passed: results.iter().filter(|r| r.status == Status::Passed).count(),
        failed: results.iter().filter(|r| r.status.is_failure()).count(),
        clip: mean(&|c| c == "clip" || c.starts_with("clip@"), "clip"),
        identity: mean(&|c| c == "identity", "identity_mean"),
        diversity: mean(&|c| c == "diversity", "diversity"),
        effect: mean(&|c| c == "effect", "mean_abs_diff"),
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
        let mut scores = suite_scores(&outcome.results);
        // The suite's own counts (they know what a pass is).
        scores.passed = outcome.passed();
        scores.failed = outcome.failed();
        let first_case = suite.cases.iter().find(|c| c.adapters.iter().any(|a| a.lora == self.lora && a.weight != 0.0));
        let thumbnail = first_case
            .and_then(|c| outcome.evidence.iter().find(|e| e.case == c.name.as_str()))
            .map(|e| (format!("{} · {}", e.prompt, e.caption), e.current.clone()));
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
            scores,
            thumbnail,
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

/// The checkpoints as a table, one row per evaluation (held-out loss, verdict, scores), the
/// chosen one marked.
pub fn table(evals: &[Evaluation], verdicts: &[CheckpointVerdict], chosen: Option<usize>) -> String {
    let num = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    out.push_str(&format!(
        "{:<10} {:>8} {:<7} {:>6} {:>6} {:>6} {:>8} {:>9}  {}\n",
        "checkpoint", "held-out", "verdict", "passed", "failed", "CLIP", "identity", "diversity", "first failure / file"
    ));
    for e in evals {
        let v = verdicts.iter().find(|v| v.step == e.step);
        let verdict = match v {
            Some(v) if v.ok() => "pass",
            Some(_) => "FAIL",
            None => "-",
        };
        let mark = if Some(e.step) == chosen { " ← chosen" } else { "" };
        let note = match v.and_then(|v| v.failures.first().map(|f| (f, v.failures.len()))) {
            Some((f, n)) => {
                let f: String = f.chars().take(80).collect();
                if n > 1 { format!("{f} (+{} more)", n - 1) } else { f }
            }
            None => v.and_then(|v| v.file.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let s = v.map(|v| &v.scores);
        out.push_str(&format!(
            "{:<10} {:>8} {:<7} {:>6} {:>6} {:>6} {:>8} {:>9}  {note}{mark}\n",
            format!("step {}", e.step),
            num(e.heldout),
            verdict,
            v.map(|v| v.passed.to_string()).unwrap_or_else(|| "-".into()),
            v.map(|v| v.failed.to_string()).unwrap_or_else(|| "-".into()),
            num(s.and_then(|s| s.clip)),
            num(s.and_then(|s| s.identity)),
            num(s.and_then(|s| s.diversity)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::CheckResult;

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
            scores: SuiteScores { passed, failed, clip: Some(0.4), ..Default::default() },
            thumbnail: None,
        }
    }

    #[test]
    fn the_table_shows_held_out_loss_verdicts_and_the_chosen_checkpoint() {
        let vs = vec![v(100, 3, 1), v(200, 4, 0)];
        let evals: Vec<Evaluation> = [(100, 0.25), (200, 0.125), (300, 0.5)]
            .iter()
            .map(|&(step, l)| Evaluation { step, heldout: Some(l), suite: vs.iter().find(|v| v.step == step).map(|v| v.scores.clone()) })
            .collect();
        let t = table(&evals, &vs, Some(200));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].contains("0.2500") && lines[1].contains("FAIL") && lines[1].contains("case0::clip"), "{t}");
        assert!(lines[2].contains("0.1250") && lines[2].contains("pass") && lines[2].ends_with("← chosen"), "{t}");
        // Held-out loss only: no suite ran at step 300.
        assert!(lines[3].contains("0.5000") && !lines[3].contains("pass"), "{t}");
    }

    #[test]
    fn suite_scores_average_each_kind_of_check() {
        let r = |check: &str, status, metrics: Vec<(&str, f64)>| CheckResult {
            case: "c".into(),
            check: check.into(),
            status,
            message: String::new(),
            metrics: metrics.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            scorer: String::new(),
        };
        let results = vec![
            r("clip", Status::Passed, vec![("clip", 0.4), ("floor", 0.25)]),
            r("clip@192x192", Status::Failed, vec![("clip", 0.2), ("floor", 0.25)]),
            r("identity", Status::Passed, vec![("identity_mean", 0.5), ("identity_min", 0.1)]),
            r("diversity", Status::Skipped, vec![("diversity", 9.0)]),
            r("effect", Status::Passed, vec![("mean_abs_diff", 0.05)]),
            r("leak", Status::Passed, vec![("mean_abs_diff", 0.9)]),
        ];
        let s = suite_scores(&results);
        assert_eq!((s.passed, s.failed), (4, 1));
        assert!((s.clip.unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(s.identity, Some(0.5));
        assert_eq!(s.diversity, None, "skipped checks have no score");
        assert_eq!(s.effect, Some(0.05), "the leak check's change is not the effect");
    }
}
