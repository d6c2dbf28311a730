use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::baseline::{BaselineStore, Pending, UpdateMode, matches};
use crate::names::SafeName;
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
    /// Only this suite: its file (`suites/portrait.yaml`, `portrait`) or its name (default: all).
    suite: Option<String>,
    /// Only pending images whose `case/image` contains this.
    #[arg(long)]
    filter: Option<String>,
    /// The baselines folder. Default: baselines/ in the current project.
    #[arg(long)]
    baselines: Option<PathBuf>,
}

/// Every store (suite × device class) under the baselines folder, interrupted accepts
/// completed. Folders that are not valid names were not written by loragate and are skipped.
fn stores(sel: &Selection) -> Result<Vec<BaselineStore>> {
    let root = sel.baselines.clone().unwrap_or_else(|| project_root(&std::env::current_dir().unwrap_or_default()).join("baselines"));
    let mut out = Vec::new();
    let suites = std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))?;
    // A suite file (`suites/portrait.yaml`, `portrait`) names its baselines by its `name:`;
    // anything else is taken as that name.
    let want = match &sel.suite {
        Some(w) => Some(match crate::suite::find_suite(w) {
            Some(file) => crate::suite::validate::suite_name_of(&file)?.to_string(),
            None => w.clone(),
        }),
        None => None,
    };
    for s in suites.flatten() {
        let name = s.file_name().to_string_lossy().into_owned();
        let Ok(suite) = SafeName::new(&name) else { continue };
        if want.as_ref().is_some_and(|w| *w != name) || !s.path().is_dir() {
            continue;
        }
        for class in std::fs::read_dir(s.path()).map_err(|e| Error::io(s.path(), e))?.flatten() {
            let Ok(class_name) = SafeName::new(&class.file_name().to_string_lossy()) else { continue };
            if class.path().is_dir() {
                let (store, recovered) = BaselineStore::open(&root, &suite, &class_name, UpdateMode::Pending)?;
                for r in recovered {
                    println!("{r}");
                }
                out.push(store);
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
    let what = if p.is_scores() {
        if p.old_file.is_file() { "measurements changed".into() } else { "new measurements".into() }
    } else if p.old_file.is_file() {
        match (crate::imageio::read_image(&p.old_file), crate::imageio::read_image(&p.new_file)) {
            (Ok(a), Ok(b)) if a.dimensions() == b.dimensions() => {
                format!("changed, similarity {:.3}", crate::score::pixels::similarity(&a, &b).unwrap_or(0.0))
            }
            _ => "changed".into(),
        }
    } else {
        "new".into()
    };
    format!("{}/{} [{}] ({what})\n    new: {}\n    old: {}", store.suite, p.id(), store.dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), p.new_file.display(), p.old_file.display())
}

pub fn run(a: BaselineArgs) -> Result<ExitCode> {
    match a.action {
        Action::Accept(sel) => {
            let items = selected(&sel)?;
            accept(&items)?;
            for (store, p) in &items {
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
            let mut accepted = Vec::new();
            let mut rej = 0;
            for (store, p, d) in decisions {
                match d.as_str() {
                    "a" | "accept" => accepted.push((store.clone(), p.clone())),
                    "r" | "reject" => {
                        store.reject(p)?;
                        rej += 1;
                    }
                    _ => {}
                }
            }
            let acc = accepted.len();
            accept(&accepted)?;
            println!("{acc} accepted, {rej} rejected, {} skipped", items.len() - acc - rej);
        }
    }
    Ok(ExitCode::Success)
}

/// Accepts items store by store, each store's files in one journaled move.
fn accept(items: &[(BaselineStore, Pending)]) -> Result<()> {
    let mut by_store: Vec<(&BaselineStore, Vec<Pending>)> = Vec::new();
    for (store, p) in items {
        match by_store.iter_mut().find(|(s, _)| s.dir == store.dir) {
            Some((_, v)) => v.push(p.clone()),
            None => by_store.push((store, vec![p.clone()])),
        }
    }
    for (store, ps) in by_store {
        store.accept(&ps)?;
    }
    Ok(())
}
