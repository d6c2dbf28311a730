//! `loragate init`: gate the LoRAs of a repository that has none of loragate in it. For each
//! LoRA file, a starter suite from what the file says about itself (its tags, trigger and
//! training resolution: [`crate::suite::starter`]); and a workflow that uses the loragate action.
//! Everything it writes is validated before it says so.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::{Error, ExitCode, Result};
use crate::fsutil::write_text_atomic;
use crate::lora::LoraFile;
use crate::names::SafeName;
use crate::suite::starter::{LoraFacts, StarterSpec, facts, starter_suite};

/// The published action new workflows use.
pub const DEFAULT_ACTION: &str = "loragate/loragate@v1";

/// loragate's own gate: the workflow `init` writes is this file, as another repository needs it.
const OWN_WORKFLOW: &str = include_str!("../../.github/workflows/lora-gate.yml");

/// Where the workflow goes.
const WORKFLOW_PATH: &str = ".github/workflows/loragate.yml";

#[derive(Debug, Args)]
pub struct InitArgs {
    /// LoRA files to gate (default: every LoRA `.safetensors` file under the current folder).
    loras: Vec<PathBuf>,
    /// The base model the suites run on: a built-in demo model (tiny), a diffusers folder, a
    /// single file, or a cached hub id. Default: the one the LoRA's metadata names, where it
    /// can be found.
    #[arg(long)]
    model: Option<String>,
    /// The CLIP scorer of the text–image checks. Default: tiny-clip for the demo models, else
    /// openai/clip-vit-large-patch14 (from the hub cache).
    #[arg(long)]
    scorer: Option<String>,
    /// The action the workflow uses (`owner/repo@ref`), e.g. your fork.
    #[arg(long, default_value = DEFAULT_ACTION)]
    action: String,
    /// Replace files that exist (default: refuse).
    #[arg(long)]
    force: bool,
    /// Write nothing: show what would be written and validate it.
    #[arg(long)]
    check: bool,
}

/// Folders never searched for LoRA files.
const SKIP: &[&str] = &[".git", "target", "out", "baselines", "node_modules", ".loragate", "assets"];

fn find_loras(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if p.is_dir() {
            if depth > 0 && !SKIP.contains(&name.as_str()) && !name.starts_with('.') {
                find_loras(&p, depth - 1, out);
            }
        } else if name.ends_with(".safetensors") && LoraFile::load(&p).is_ok() {
            out.push(p);
        }
    }
}

/// A path relative to `from` (a folder), for files a suite names.
fn relative(path: &Path, from: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (path, from) = (abs(path), abs(from));
    let common = path.components().zip(from.components()).take_while(|(a, b)| a == b).count();
    let ups = from.components().count() - common;
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    for c in path.components().skip(common) {
        rel.push(c);
    }
    rel.to_string_lossy().replace('\\', "/")
}

/// The base model for a LoRA: `--model`, else the demo model its training config names, else
/// the published base of its family if it is in the hub cache.
fn model_for(lora: &LoraFile, asked: Option<&str>) -> Result<String> {
    if let Some(m) = asked {
        return Ok(m.to_string());
    }
    let trained_on = lora.metadata.get("loragate.training_config").and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok()).and_then(|c| c["model"].as_str().map(String::from));
    if let Some(m) = trained_on.filter(|m| crate::model::locate::BUILTIN_MODELS.iter().any(|(n, _)| n == m)) {
        return Ok(m);
    }
    let family = crate::lora::apply::probable_family(lora);
    let hub = match family {
        Some(crate::model::Family::Sd1) => Some("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        Some(crate::model::Family::Sd2) => Some("stabilityai/stable-diffusion-2-1"),
        Some(crate::model::Family::Sdxl) => Some("stabilityai/stable-diffusion-xl-base-1.0"),
        _ => None,
    };
    if let Some(id) = hub.filter(|id| crate::model::locate::resolve_hub_id(id).is_ok()) {
        return Ok(id.to_string());
    }
    let made_for = family.map(|f| format!(" (it was made for {f})")).unwrap_or_default();
    Err(Error::invalid(format!(
        "{}: which base model should its suite run on{made_for}? Give --model: a diffusers folder, a single file, or a cached hub id{}",
        lora.path.display(),
        hub.map(|h| format!(" such as {h}")).unwrap_or_default()
    )))
}

fn scorer_for(model: &str, asked: Option<&str>) -> String {
    match asked {
        Some(s) => s.to_string(),
        None if crate::model::locate::BUILTIN_MODELS.iter().any(|(n, _)| *n == model) => crate::model::locate::BUILTIN_SCORER.to_string(),
        None => "openai/clip-vit-large-patch14".to_string(),
    }
}

/// The workflow for another repository: loragate's own gate with the published action, and
/// without the lines that build loragate from source.
pub fn workflow_for(action: &str) -> String {
    let own = OWN_WORKFLOW.replace(
        "# `loragate init` writes this file into other repositories, with `uses: ./` replaced by the\n# published action and the lines marked \"loragate's own repository\" left out: there the action\n# installs the release binary instead of building this checkout.\n",
        "# Written by `loragate init`. Register a self-hosted runner with the label `gpu`\n# (docs/ci-and-runners.md), or change `runs-on: gpu` and `device: cuda` to run on a CPU.\n",
    );
    let mut out = String::new();
    for line in own.lines() {
        if line.trim_end().ends_with("# loragate's own repository") {
            continue;
        }
        let line = line.replace("uses: ./", &format!("uses: {action}")).replace("workflow: lora-gate.yml", "workflow: loragate.yml").replace("name: lora-gate", "name: loragate");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

struct Planned {
    path: PathBuf,
    text: String,
    what: String,
}

fn check_suite(path: &Path) -> Result<String> {
    let suite = crate::suite::load_suite(path)?;
    let plan = crate::suite::expand::expand(&suite)?;
    Ok(format!("{} cases, {} images", suite.cases.len(), plan.jobs.len()))
}

pub fn run(a: InitArgs) -> Result<ExitCode> {
    let root = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let mut loras = a.loras.clone();
    if loras.is_empty() {
        find_loras(&root, 6, &mut loras);
        if loras.is_empty() {
            return Err(Error::invalid("no LoRA files (.safetensors) under this folder: name them, e.g. `loragate init loras/my-character.safetensors`"));
        }
    }
    let suites_dir = root.join("suites");
    let mut planned = Vec::new();
    let mut todo = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for path in &loras {
        let lora = LoraFile::load(path)?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name = SafeName::slug(&stem).to_string();
        if names.contains(&name) {
            return Err(Error::invalid(format!("two LoRA files would both be named `{name}`: give them other file names, or run init for one at a time")));
        }
        names.push(name.clone());
        let model = model_for(&lora, a.model.as_deref())?;
        let scorer = scorer_for(&model, a.scorer.as_deref());
        let f: LoraFacts = facts(&lora.metadata);
        let source = if lora.metadata.contains_key("ss_tag_frequency") { "its kohya metadata (tags, resolution)" } else if lora.metadata.is_empty() { "no metadata (the file has none)" } else { "its metadata (it has no tag frequencies)" };
        let file = relative(path, &suites_dir);
        let spec = StarterSpec { name: &name, file: &file, model: &model, scorer: &scorer, facts: &f, source };
        let (text, fill) = starter_suite(&spec);
        todo.extend(fill);
        let found = match &f.trigger {
            Some((t, how)) => format!("trigger `{t}` ({how})"),
            None => "no trigger found".into(),
        };
        let res = f.resolution.map(|(w, h)| format!(", trained at {w}x{h}")).unwrap_or_default();
        let tags = if f.tags.is_empty() { String::new() } else { format!(", tags {}", f.tags.iter().take(4).map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" ")) };
        planned.push(Planned { path: suites_dir.join(format!("{name}.yaml")), text, what: format!("{}: {found}{tags}{res}; model {model}, scorer {scorer}", lora.name()) });
    }
    planned.push(Planned { path: root.join(WORKFLOW_PATH), text: workflow_for(&a.action), what: format!("the gate, using {}", a.action) });

    if !a.force && !a.check {
        let existing: Vec<String> = planned.iter().filter(|p| p.path.exists()).map(|p| relative(&p.path, &root)).collect();
        if !existing.is_empty() {
            return Err(Error::invalid(format!("{} exists: keep it, or pass --force to replace it", existing.join(", "))));
        }
    }
    for p in &planned {
        let rel = relative(&p.path, &root);
        let is_suite = p.path.extension().is_some_and(|e| e == "yaml") && p.path.starts_with(&suites_dir);
        // Validated in place (relative paths resolve from the suite's folder): a check run
        // writes a hidden copy there and removes it.
        let target = if a.check { p.path.with_file_name(format!(".{}.check", p.path.file_name().unwrap_or_default().to_string_lossy())) } else { p.path.clone() };
        write_text_atomic(&target, &p.text)?;
        let verdict = if is_suite {
            let checked = check_suite(&target);
            if a.check {
                let _ = std::fs::remove_file(&target);
            }
            checked.map_err(|e| Error::invalid(format!("{rel}: the starter suite does not validate ({e}); please report this")))?
        } else {
            let parsed: std::result::Result<serde_json::Value, _> = serde_saphyr::from_str(&p.text);
            if a.check {
                let _ = std::fs::remove_file(&target);
            }
            parsed.map_err(|e| Error::invalid(format!("{rel}: not valid YAML ({e}); please report this")))?;
            "valid YAML".into()
        };
        let done = if a.check { "would write" } else { "wrote" };
        println!("{done} {rel} ({verdict}): {}", p.what);
    }
    for t in &todo {
        println!("fill in: {t}");
    }
    if a.check {
        return Ok(ExitCode::Success);
    }
    let first = relative(&planned[0].path, &root);
    println!("\nnext:");
    println!("  loragate suite {first}            # the first run: its images and measurements are to review");
    println!("  loragate baseline review                  # look at out/*/report.html, accept what is right");
    println!("  git add suites baselines .github && git commit -m \"Gate the LoRAs with loragate\"");
    Ok(ExitCode::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workflow_for_another_repository_uses_the_action_and_builds_nothing() {
        let w = workflow_for("acme/loragate@v1");
        assert!(w.contains("uses: acme/loragate@v1") && !w.contains("uses: ./"), "{w}");
        assert!(!w.contains("version: source") && !w.contains("rust-toolchain") && !w.contains("rust-cache"), "{w}");
        assert!(w.contains("workflow: loragate.yml") && w.contains("name: loragate\n"), "{w}");
        assert!(w.contains("Written by `loragate init`"), "{w}");
        // Every job of the gate is still there.
        for job in ["plan:", "gate:", "report:", "review:", "accept-baselines:"] {
            assert!(w.contains(&format!("  {job}")), "{job}");
        }
    }

    #[test]
    fn paths_are_relative_to_the_suite_folder() {
        assert_eq!(relative(Path::new("/r/loras/a.safetensors"), Path::new("/r/suites")), "../loras/a.safetensors");
        assert_eq!(relative(Path::new("/r/suites/a.safetensors"), Path::new("/r/suites")), "a.safetensors");
    }
}
