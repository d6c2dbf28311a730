//! Reports of a suite run, all read from one [`SuiteOutcome`]: the console table, JUnit XML,
//! a Markdown summary (`$GITHUB_STEP_SUMMARY`) and a self-contained HTML review page.

pub mod console;
pub mod html;
pub mod junit;
pub mod markdown;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::fsutil::write_text_atomic;
use crate::harness::SuiteOutcome;
use crate::imageio::write_png;

/// Where the files of one run went.
#[derive(Debug, Clone)]
pub struct ReportPaths {
    pub junit: PathBuf,
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub images: PathBuf,
}

/// Writes every report (atomically) and the images of the run into `dir`.
pub fn write_all(o: &SuiteOutcome, dir: &Path) -> Result<ReportPaths> {
    let paths = ReportPaths {
        junit: dir.join("junit.xml"),
        html: dir.join("report.html"),
        markdown: dir.join("summary.md"),
        images: dir.join("images"),
    };
    write_text_atomic(&paths.junit, &junit::to_junit(o)?)?;
    write_text_atomic(&paths.html, &html::to_html(o)?)?;
    let md = markdown::to_markdown(o);
    write_text_atomic(&paths.markdown, &md)?;
    for e in &o.evidence {
        let case_dir = paths.images.join(&e.case);
        write_png(&case_dir.join(format!("{}.png", e.id)), &e.current, &[])?;
        if let Some(c) = &e.control {
            write_png(&case_dir.join(format!("{}.control.png", e.id)), c, &[])?;
        }
        if let Some(d) = &e.diff {
            write_png(&case_dir.join(format!("{}.diff.png", e.id)), d, &[])?;
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
