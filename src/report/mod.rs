//! Reports of a suite run, all read from one [`SuiteOutcome`]: the console table, JUnit XML,
//! a Markdown summary (`$GITHUB_STEP_SUMMARY`) and a self-contained HTML review page; and the
//! training report ([`training`], its charts by [`charts`]).

pub mod charts;
pub mod console;
pub mod html;
pub mod junit;
pub mod markdown;
pub mod training;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::Result;
use crate::fsutil::write_text_atomic;
use crate::error::Error;
use crate::harness::{Evidence, SuiteOutcome};
use crate::fsutil::write_atomic;
use crate::imageio::{encode_png_fast, read_image};

/// Where the files of one run went.
#[derive(Debug, Clone)]
pub struct ReportPaths {
    pub junit: PathBuf,
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub images: PathBuf,
    /// The outcome without pixels, for `loragate merge-report`.
    pub outcome: PathBuf,
    /// Every prompt's scores, for people who chart them.
    pub prompts: PathBuf,
}

/// `images/<case>/<id><suffix>.png`: where an evidence image is written and read back.
fn image_path(images: &Path, e: &Evidence, suffix: &str) -> PathBuf {
    images.join(&e.case).join(format!("{}{suffix}.png", e.id))
}

/// The kinds of image an [`Evidence`] carries, by file suffix.
const SUFFIXES: [&str; 4] = ["", ".control", ".baseline", ".diff"];

fn evidence_image<'a>(e: &'a Evidence, suffix: &str) -> Option<&'a image::RgbImage> {
    match suffix {
        "" => Some(&e.current),
        ".control" => e.control.as_ref(),
        ".baseline" => e.baseline.as_ref(),
        _ => e.diff.as_ref(),
    }
}

/// Every evidence image encoded once, in parallel, as PNG: the same bytes become the image files
/// and the HTML report's data URIs.
pub struct EncodedImages(HashMap<(usize, &'static str), Vec<u8>>);

impl EncodedImages {
    pub fn of(o: &SuiteOutcome) -> Result<Self> {
        let wanted: Vec<(usize, &'static str)> =
            o.evidence.iter().enumerate().flat_map(|(i, e)| SUFFIXES.iter().filter(|s| evidence_image(e, s).is_some()).map(move |s| (i, *s))).collect();
        let encoded = wanted
            .into_par_iter()
            .map(|(i, s)| Ok(((i, s), encode_png_fast(evidence_image(&o.evidence[i], s).expect("filtered"))?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(EncodedImages(encoded))
    }

    /// The PNG of evidence `index`'s image of kind `suffix` (`""` for the image itself).
    pub fn png(&self, index: usize, suffix: &str) -> Option<&[u8]> {
        SUFFIXES.iter().find(|s| **s == suffix).and_then(|s| self.0.get(&(index, *s))).map(Vec::as_slice)
    }
}

/// Writes every report (atomically) and the images of the run into `dir`.
pub fn write_all(o: &SuiteOutcome, dir: &Path) -> Result<ReportPaths> {
    let paths = ReportPaths {
        junit: dir.join("junit.xml"),
        html: dir.join("report.html"),
        markdown: dir.join("summary.md"),
        images: dir.join("images"),
        outcome: dir.join("outcome.json"),
        prompts: dir.join("prompts.csv"),
    };
    write_text_atomic(&paths.prompts, &prompts_csv(o))?;
    write_text_atomic(&paths.junit, &junit::to_junit(o)?)?;
    write_text_atomic(&paths.outcome, &serde_json::to_string(o).expect("serialisable"))?;
    let encoded = EncodedImages::of(o)?;
    write_text_atomic(&paths.html, &html::to_html(o, &encoded)?)?;
    let md = markdown::to_markdown(o);
    write_text_atomic(&paths.markdown, &md)?;
    for (i, e) in o.evidence.iter().enumerate() {
        for suffix in SUFFIXES {
            if let Some(png) = encoded.png(i, suffix) {
                write_atomic(&image_path(&paths.images, e, suffix), png)?;
            }
        }
    }
    // GitHub Actions shows this file on the run's page.
    if let Ok(summary) = std::env::var("GITHUB_STEP_SUMMARY")
        && !summary.is_empty() {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&summary) {
                let _ = f.write_all(md.as_bytes());
            }
        }
    Ok(paths)
}

/// Reads the outcome a run wrote into `dir` (its `outcome.json` and images).
pub fn read_outcome(dir: &Path) -> Result<SuiteOutcome> {
    let path = dir.join("outcome.json");
    let text = crate::fsutil::read_text(&path)?;
    let mut o: SuiteOutcome = serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{}: not a loragate outcome: {e}", path.display())))?;
    let images = dir.join("images");
    for e in &mut o.evidence {
        e.current = read_image(&image_path(&images, e, ""))?;
        let optional = |p: PathBuf| if p.is_file() { read_image(&p).map(Some) } else { Ok(None) };
        e.control = optional(image_path(&images, e, ".control"))?;
        e.baseline = optional(image_path(&images, e, ".baseline"))?;
        e.diff = optional(image_path(&images, e, ".diff"))?;
    }
    Ok(o)
}

/// One outcome from the outcomes of a suite's partitions, in the order given.
pub fn merge_outcomes(parts: Vec<SuiteOutcome>) -> Result<SuiteOutcome> {
    let mut parts = parts.into_iter();
    let mut all = parts.next().ok_or_else(|| Error::invalid("nothing to merge"))?;
    for p in parts {
        if p.suite != all.suite {
            return Err(Error::invalid(format!("cannot merge the reports of two suites (`{}` and `{}`): merge each suite's partitions on their own", all.suite, p.suite)));
        }
        all.results.extend(p.results);
        all.evidence.extend(p.evidence);
        all.prompt_scores.extend(p.prompt_scores);
        all.slices.extend(p.slices);
        all.statistical_tests += p.statistical_tests;
        all.stacks.extend(p.stacks);
        all.memorization.extend(p.memorization);
        all.images_total += p.images_total;
        all.generated += p.generated;
        all.cached += p.cached;
        all.pipelines_loaded += p.pipelines_loaded;
        all.scorers_loaded += p.scorers_loaded;
        all.timings.plan += p.timings.plan;
        all.timings.generate += p.timings.generate;
        all.timings.score += p.timings.score;
        all.timings.checks += p.timings.checks;
        all.timings.baselines += p.timings.baselines;
        all.pending.extend(p.pending);
        all.stale.extend(p.stale);
        for w in p.warnings {
            if !all.warnings.contains(&w) {
                all.warnings.push(w);
            }
        }
        // "partition 2/2 holds no case" is news about a part, not about the whole.
        all.notes.extend(p.notes.into_iter().filter(|n| !n.starts_with("no checks to run")));
    }
    all.notes.retain(|n| !n.starts_with("no checks to run"));
    all.slices.sort_by(|a, b| b.failed.cmp(&a.failed).then(a.p.total_cmp(&b.p)));
    all.stale.sort();
    all.stale.dedup();
    Ok(all)
}

/// `prompts.csv`: one row per prompt (each variant of each case), scores in the suite's scale.
pub fn prompts_csv(o: &SuiteOutcome) -> String {
    let field = |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let mut out = String::from("case,variant,prompt,scored_text,seeds,clip,control,drop,floor,passes_floor,scale\n");
    for p in &o.prompt_scores {
        let show = |x: f64| format!("{:.4}", o.scale.apply(x));
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            field(&p.case),
            field(&p.variant),
            field(&p.prompt),
            field(&p.score_text),
            p.seeds,
            show(p.clip),
            p.control.map(show).unwrap_or_default(),
            p.control.map(|c| show(c - p.clip)).unwrap_or_default(),
            show(p.floor),
            p.clip >= p.floor,
            o.scale.describe()
        ));
    }
    out
}
