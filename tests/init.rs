//! Gating the LoRAs of a repository that has none of loragate in it, as a new user would: a
//! folder with one LoRA file, a loragate binary installed elsewhere (not in a checkout), the demo
//! model reached the way the README tells an installed user (`LORAGATE_ASSETS`). `loragate init`
//! writes a starter suite and a workflow; the suite validates and runs, the workflow passes
//! actionlint. And with no assets at all, a single-file checkpoint opens through `--config`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::actionlint::{actionlint, real_findings};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loragate-init-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The binary as `cargo install` leaves it: a copy outside any loragate checkout.
fn installed(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let to = bin.join("loragate");
    std::fs::copy(env!("CARGO_BIN_EXE_loragate"), &to).unwrap();
    to
}

fn run(bin: &Path, cwd: &Path, assets: &Path, args: &[&str]) -> (i32, String) {
    let o: Output = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env("LORAGATE_ASSETS", assets)
        .env("LORAGATE_CACHE", cwd.join(".cache"))
        .env_remove("CI")
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn init_in_a_repository_with_one_lora_gives_a_suite_that_runs_and_a_workflow_that_lints() {
    let root = tmp("repo");
    let repo = root.join("my-loras");
    std::fs::create_dir_all(repo.join("loras")).unwrap();
    std::fs::copy(common::repo().join("assets/loras/zorb-loragate.safetensors"), repo.join("loras/zorb.safetensors")).unwrap();
    let bin = installed(&root);
    let assets = common::repo().join("assets");

    let (code, out) = run(&bin, &repo, &assets, &["init", "--model", "tiny"]);
    assert_eq!(code, 0, "{out}");
    // What it read from the file, and the next three commands.
    assert!(out.contains("trigger `zorb` (in 300 of 300 captions of 1_zorb)") && out.contains("trained at 128x128"), "{out}");
    let next: Vec<&str> = out.lines().skip_while(|l| *l != "next:").skip(1).collect();
    assert_eq!(next.len(), 3, "{out}");
    assert!(next[0].contains("loragate suite suites/zorb.yaml") && next[1].contains("loragate baseline review") && next[2].contains("git add"), "{out}");
    let suite = std::fs::read_to_string(repo.join("suites/zorb.yaml")).unwrap();
    for needle in ["file: \"../loras/zorb.safetensors\"", "trigger: \"zorb\"", "word_order:", "ladder: [{ size: 128x128 }, { size: 192x192", "{ size: 256x256", "matrix:", "# - name: other-base", "# - name: stacked"] {
        assert!(suite.contains(needle), "{needle}:\n{suite}");
    }
    // The workflow uses the published action and passes actionlint.
    let workflow = repo.join(".github/workflows/loragate.yml");
    let text = std::fs::read_to_string(&workflow).unwrap();
    assert!(text.contains("uses: loragate/loragate@v1") && !text.contains("uses: ./") && !text.contains("version: source"), "{text}");
    let found = real_findings(actionlint(std::slice::from_ref(&workflow)));
    assert!(found.is_empty(), "actionlint:\n{}", serde_json::to_string_pretty(&found).unwrap());

    // Validates, and is not written over; `--check` writes nothing.
    let (code, out) = run(&bin, &repo, &assets, &["suite", "suites/zorb.yaml", "--check"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&bin, &repo, &assets, &["init", "--model", "tiny"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("suites/zorb.yaml, .github/workflows/loragate.yml exists") && out.contains("--force"), "{out}");
    let (code, out) = run(&bin, &repo, &assets, &["init", "--model", "tiny", "--check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would write suites/zorb.yaml") && !out.contains("next:"), "{out}");
    assert_eq!(std::fs::read_dir(repo.join("suites")).unwrap().count(), 1, "no leftovers from --check");

    // The first run: everything to review, nothing failed.
    let (code, out) = run(&bin, &repo, &assets, &["suite", "suites/zorb.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("REVIEW")), "a first run is to review: {out}");

    // An assets folder that is not one says so, and how to get the demo models.
    let (code, out) = run(&bin, &repo, &root.join("nowhere"), &["suite", "suites/zorb.yaml", "--check"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("LORAGATE_ASSETS") && out.contains("clone"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_lora_without_metadata_still_gets_a_suite_and_is_told_what_to_fill_in() {
    let root = tmp("bare");
    let repo = root.join("r");
    std::fs::create_dir_all(&repo).unwrap();
    // The zorb file's tensors, with no metadata at all.
    let file = loragate::tensors::TensorFile::load(common::repo().join("assets/loras/zorb.kohya.safetensors"), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tensors: BTreeMap<String, candle_core::Tensor> = file.tensors.into_iter().collect();
    loragate::tensors::save(&repo.join("character.safetensors"), &tensors, &BTreeMap::new(), loragate::tensors::SaveDtype::F32).unwrap();
    let bin = installed(&root);
    let assets = common::repo().join("assets");
    // Found without naming it.
    let (code, out) = run(&bin, &repo, &assets, &["init", "--model", "tiny"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("character.safetensors: no trigger found"), "{out}");
    assert!(out.contains("fill in: character: the trigger word") && out.contains("fill in: character: prompts"), "{out}");
    let (code, out) = run(&bin, &repo, &assets, &["suite", "suites/character.yaml", "--check"]);
    assert_eq!(code, 0, "{out}");
    // Without a base model it cannot guess, and says what to give.
    std::fs::remove_dir_all(repo.join("suites")).unwrap();
    std::fs::remove_dir_all(repo.join(".github")).unwrap();
    let (code, out) = run(&bin, &repo, &assets, &["init"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--model"), "{out}");
    // A folder without LoRA files.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out) = run(&bin, &empty, &assets, &["init", "--model", "tiny"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no LoRA files"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

/// No assets at all: a single-file checkpoint (tiny-sd under its A1111 names, no configs in it)
/// opens with `--config` naming a folder of configs and tokenizer files, and nothing else.
#[test]
fn with_no_assets_a_single_file_checkpoint_opens_through_config() {
    let root = tmp("noassets");
    let bin = installed(&root);
    let tiny = common::repo().join("assets/tinyworld/tiny-sd");
    let with_configs = root.join("with-configs.safetensors");
    loragate::model::single_file::write_from_folder(&tiny, &with_configs).unwrap();
    let tensors: BTreeMap<String, candle_core::Tensor> =
        loragate::tensors::TensorFile::load(&with_configs, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap().tensors.into_iter().collect();
    let bare = root.join("model.safetensors");
    loragate::tensors::save(&bare, &tensors, &BTreeMap::new(), loragate::tensors::SaveDtype::F16).unwrap();
    // The configs: every JSON and tokenizer file of the folder, no weights.
    let configs = root.join("configs");
    for entry in walk(&tiny) {
        let rel = entry.strip_prefix(&tiny).unwrap();
        if entry.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        std::fs::create_dir_all(configs.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, configs.join(rel)).unwrap();
    }
    let empty = root.join("no-assets");
    std::fs::create_dir_all(&empty).unwrap();
    let out = root.join("gen.png");
    let (code, text) = run(&bin, &root, &empty, &["generate", "red circle, large", "--model", bare.to_str().unwrap(), "--config", configs.to_str().unwrap(), "--steps", "2", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(out.is_file());
    // The demo models are not there, and the error says how to get them.
    let (code, text) = run(&bin, &root, &empty, &["generate", "red circle", "--model", "tiny", "--steps", "2", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("LORAGATE_ASSETS") && text.contains("clone"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
