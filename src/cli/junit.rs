use std::path::PathBuf;

use clap::Args;

use crate::error::{ExitCode, Result};
use crate::fsutil::write_text_atomic;

#[derive(Debug, Args)]
pub struct MergeJunitArgs {
    /// JUnit files to merge (one per partition of a matrix run).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: MergeJunitArgs) -> Result<ExitCode> {
    let refs: Vec<&std::path::Path> = a.files.iter().map(|p| p.as_path()).collect();
    write_text_atomic(&a.output, &crate::report::junit::merge(&refs)?)?;
    println!("{}", a.output.display());
    Ok(ExitCode::Success)
}

#[derive(Debug, Args)]
pub struct MergeReportArgs {
    /// The output folders of a suite's partitions (each with outcome.json and images/).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where the merged report.html, junit.xml, summary.md and images go.
    #[arg(short, long)]
    output: PathBuf,
}

/// Merges the reports of a suite's partitions into one, as `merge-junit` does for JUnit.
pub fn merge_report(a: MergeReportArgs) -> Result<ExitCode> {
    let parts = a.dirs.iter().map(|d| crate::report::read_outcome(d)).collect::<Result<Vec<_>>>()?;
    let merged = crate::report::merge_outcomes(parts)?;
    let paths = crate::report::write_all(&merged, &a.output)?;
    println!("{}: {} passed, {} to review, {} failed · report {}", merged.suite, merged.passed(), merged.to_review(), merged.failed(), paths.html.display());
    Ok(if merged.failed() > 0 { ExitCode::CheckFailed } else { ExitCode::Success })
}
