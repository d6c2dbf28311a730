use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::baseline::{BaselineStore, Pending, matches};
use crate::error::{Error, ExitCode, Result};
use crate::harness::project_root;

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// List pending images and, on a terminal, accept (a), reject (r) or skip (s) each one.
    /// Decisions are applied at the end.
    Review(Selection),
    /// Make pending images the new baselines.
    Accept(Selection),
    /// Delete pending images, keeping the baselines.
    Reject(Selection),
}

#[derive(Debug, Args)]
struct Selection {
    /// Only this suite (default: all suites).
    suite: Option<String>,
    /// Only pending images whose `case/image` contains this.
    #[arg(long)]
    filter: Option<String>,
    /// The baselines folder. Default: baselines/ in the current project.
    #[arg(long)]
    baselines: Option<PathBuf>,
}

fn stores(sel: &Selection) -> Result<Vec<BaselineStore>> {
    let root = sel.baselines.clone().unwrap_or_else(|| project_root(&std::env::current_dir().unwrap_or_default()).join("baselines"));
    let mut out = Vec::new();
    let suites = std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))?;
    for s in suites.flatten() {
        let name = s.file_name().to_string_lossy().into_owned();
        if sel.suite.as_ref().is_some_and(|want| want.trim_end_matches(".yaml") != name) || !s.path().is_dir() {
            continue;
        }
        for class in std::fs::read_dir(s.path()).map_err(|e| Error::io(s.path(), e))?.flatten() {
            if class.path().is_dir() {
                let class_name = class.file_name().to_string_lossy().into_owned();
                out.push(BaselineStore::new(&root, &name, &class_name, true));
            }
        }
    }
    Ok(out)
}

fn selected(sel: &Selection) -> Result<Vec<(BaselineStore, Pending)>> {
    let mut out = Vec::new();
    for store in stores(sel)? {
        for p in store.pending()? {
            if matches(sel.filter.as_deref(), &p) {
                out.push((store.clone(), p));
            }
        }
    }
    Ok(out)
}

fn describe(store: &BaselineStore, p: &Pending) -> String {
    let what = if p.old_png.is_file() {
        match (crate::imageio::read_image(&p.old_png), crate::imageio::read_image(&p.new_png)) {
            (Ok(a), Ok(b)) if a.dimensions() == b.dimensions() => {
                format!("changed, similarity {:.3}", crate::score::pixels::similarity(&a, &b).unwrap_or(0.0))
            }
            _ => "changed".into(),
        }
    } else {
        "new".into()
    };
    format!("{}/{} [{}] ({what})\n    new: {}\n    old: {}", store.suite, p.id(), store.dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), p.new_png.display(), p.old_png.display())
}

pub fn run(a: BaselineArgs) -> Result<ExitCode> {
    match a.action {
        Action::Accept(sel) => {
            let items = selected(&sel)?;
            for (store, p) in &items {
                store.accept(p)?;
                println!("accepted {}/{}", store.suite, p.id());
            }
            println!("{} accepted", items.len());
        }
        Action::Reject(sel) => {
            let items = selected(&sel)?;
            for (store, p) in &items {
                store.reject(p)?;
                println!("rejected {}/{}", store.suite, p.id());
            }
            println!("{} rejected", items.len());
        }
        Action::Review(sel) => {
            let items = selected(&sel)?;
            if items.is_empty() {
                println!("nothing pending");
                return Ok(ExitCode::Success);
            }
            let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            if !interactive {
                for (store, p) in &items {
                    println!("{}", describe(store, p));
                }
                println!("{} pending; settle with `loragate baseline accept|reject [SUITE] [--filter F]`", items.len());
                return Ok(ExitCode::Success);
            }
            println!("the run's report.html shows each image beside its baseline and diff");
            let mut decisions = Vec::new();
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            for (store, p) in &items {
                println!("{}", describe(store, p));
                print!("  accept (a), reject (r), skip (s)? ");
                std::io::stdout().flush().ok();
                let answer = lines.next().and_then(|l| l.ok()).unwrap_or_default();
                decisions.push((store, p, answer.trim().to_lowercase()));
            }
            let (mut acc, mut rej) = (0, 0);
            for (store, p, d) in decisions {
                match d.as_str() {
                    "a" | "accept" => {
                        store.accept(p)?;
                        acc += 1;
                    }
                    "r" | "reject" => {
                        store.reject(p)?;
                        rej += 1;
                    }
                    _ => {}
                }
            }
            println!("{acc} accepted, {rej} rejected, {} skipped", items.len() - acc - rej);
        }
    }
    Ok(ExitCode::Success)
}
