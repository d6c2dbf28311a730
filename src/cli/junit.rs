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
