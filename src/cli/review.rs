//! `loragate review`: the review gate, as Chromatic and Percy gate a merge on visual changes.
//! It reads the outcomes of suite runs and fails while any of them has images or measurements
//! to review; it passes once they are accepted (the `loragate:accept-baselines` label commits
//! them, and the rerun has nothing left to review). Regressions are the suite run's own exit
//! code: red there means a LoRA got worse, red here means a person has not looked yet.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::{Error, ExitCode, Result};
use crate::harness::{Status, SuiteOutcome};

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// Report folders: a suite's output (`out/portrait`), a merged report, or a folder that holds
    /// several (searched three levels deep for `outcome.json`). Default: `out`.
    dirs: Vec<PathBuf>,
}

/// Every `outcome.json` in `dir` or up to three folders below it, sorted.
fn outcomes_under(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let file = dir.join("outcome.json");
    if file.is_file() {
        out.push(file);
        return Ok(());
    }
    if depth == 0 {
        return Ok(());
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    subs.sort();
    for s in subs {
        outcomes_under(&s, depth - 1, out)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<SuiteOutcome> {
    let text = crate::fsutil::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{}: not a loragate outcome: {e}", path.display())))
}

/// The review items of the runs, as Markdown (also the console's text).
pub fn summary(runs: &[(PathBuf, SuiteOutcome)]) -> (usize, String) {
    let mut s = String::new();
    let mut total = 0;
    for (path, o) in runs {
        let items: Vec<_> = o.results.iter().filter(|r| r.status == Status::Review).collect();
        total += items.len();
        let failed = if o.failed() > 0 { format!(" ({} failed checks: the gate reports them)", o.failed()) } else { String::new() };
        let folder = path.parent().unwrap_or(path).display();
        if items.is_empty() {
            let _ = writeln!(s, "- `{}` ({folder}): nothing to review{failed}", o.suite);
            continue;
        }
        let _ = writeln!(s, "- `{}` ({folder}): {} to review{failed}", o.suite, items.len());
        for r in items {
            let msg: String = r.message.chars().take(240).collect();
            let more = if r.message.chars().count() > 240 { "…" } else { "" };
            let _ = writeln!(s, "  - **{} · {}**: {}{more}", r.case, r.check, msg.replace('\n', " "));
        }
    }
    (total, s)
}

pub fn run(a: ReviewArgs) -> Result<ExitCode> {
    let dirs = if a.dirs.is_empty() { vec![PathBuf::from("out")] } else { a.dirs };
    let mut files = Vec::new();
    for d in &dirs {
        if !d.is_dir() {
            return Err(Error::invalid(format!("{}: no such folder; give the output folder of `loragate suite` (out/<suite>) or a merged report", d.display())));
        }
        outcomes_under(d, 3, &mut files)?;
    }
    if files.is_empty() {
        let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(Error::invalid(format!("no outcome.json in {}: run `loragate suite` first (it writes out/<suite>/outcome.json)", shown.join(", "))));
    }
    let runs = files.iter().map(|f| Ok((f.clone(), read(f)?))).collect::<Result<Vec<_>>>()?;
    let (total, text) = summary(&runs);
    let verdict = if total == 0 {
        "nothing to review: every image and measurement is accepted".to_string()
    } else {
        format!("{total} items to review: open report.html, then accept them (the `loragate:accept-baselines` label, or `loragate baseline review` locally) or fix the LoRA")
    };
    print!("{text}");
    println!("review: {verdict}");
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY")
        && !path.is_empty()
    {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = write!(f, "## loragate review: {verdict}\n\n{text}\n");
        }
    }
    Ok(if total == 0 { ExitCode::Success } else { ExitCode::CheckFailed })
}
