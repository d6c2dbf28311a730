//! The loragate action (action.yml) tested the way a runner executes it: each mode's script
//! in a temporary repository with the `GITHUB_*` variables a job sets, and the loragate binary
//! installed from a release built here (`scripts/package-release.sh`). A whole pull request goes
//! through: plan, install (the sum checked), run, report, review (red), accept (commit, push,
//! the gate started again), run and review (green). And the action's steps, as a reusable
//! workflow's job, pass actionlint. Needs bash, git, jq, curl, tar and sha256sum, as GitHub's
//! runners have them; a missing one fails the test and says which.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::actionlint::{actionlint, real_findings};
use serde_json::Value;

fn need(tools: &[&str]) {
    for t in tools {
        let ok = Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success());
        assert!(ok, "the action's scripts need `{t}` (GitHub's runners have it): install it to run this test");
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loragate-action-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(dir: &Path, cmd: &str) -> String {
    let o = Command::new("bash").args(["-c", cmd]).current_dir(dir).output().unwrap();
    assert!(o.status.success(), "{cmd}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A job's environment: its folders and files, as the runner sets them.
struct Job {
    workspace: PathBuf,
    temp: PathBuf,
    path: String,
    output: PathBuf,
    summary: PathBuf,
    github_path: PathBuf,
}

impl Job {
    fn new(root: &Path, workspace: &Path, name: &str) -> Job {
        let temp = root.join(format!("runner-temp-{name}"));
        std::fs::create_dir_all(&temp).unwrap();
        let output = temp.join("output");
        let summary = temp.join("summary.md");
        let github_path = temp.join("path");
        for f in [&output, &summary, &github_path] {
            std::fs::write(f, "").unwrap();
        }
        Job { workspace: workspace.to_path_buf(), temp, path: std::env::var("PATH").unwrap(), output, summary, github_path }
    }

    /// Runs `action/<script>` as the action's step does; `(exit code, output)`.
    fn step(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
        let mut c = Command::new("bash");
        c.arg(common::repo().join("action").join(script)).args(args).current_dir(&self.workspace);
        c.env_clear()
            .env("PATH", &self.path)
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("CI", "true")
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_WORKSPACE", &self.workspace)
            .env("GITHUB_OUTPUT", &self.output)
            .env("GITHUB_STEP_SUMMARY", &self.summary)
            .env("GITHUB_PATH", &self.github_path)
            .env("GITHUB_ACTION_PATH", common::repo())
            .env("GITHUB_ACTION_REPOSITORY", "loragate/loragate")
            .env("GITHUB_REPOSITORY", "someone/their-loras")
            .env("RUNNER_TEMP", &self.temp)
            .env("RUNNER_TOOL_CACHE", self.temp.join("toolcache"))
            .env("RUNNER_OS", "Linux")
            .env("LORAGATE_ASSETS", common::repo().join("assets"))
            .env("LORAGATE_CACHE", self.temp.join("cache"));
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }

    /// The step outputs written so far: `key=value` lines, and `key<<DELIMITER` blocks.
    fn outputs(&self) -> std::collections::BTreeMap<String, String> {
        let text = std::fs::read_to_string(&self.output).unwrap();
        let mut out = std::collections::BTreeMap::new();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if let Some((k, delim)) = l.split_once("<<") {
                let value: Vec<&str> = lines.by_ref().take_while(|x| *x != delim).collect();
                out.insert(k.to_string(), value.join("\n"));
            } else if let Some((k, v)) = l.split_once('=') {
                out.insert(k.to_string(), v.to_string());
            }
        }
        out
    }

    /// What the install step put on the PATH, for the steps after it.
    fn take_path(&mut self) {
        for dir in std::fs::read_to_string(&self.github_path).unwrap().lines() {
            self.path = format!("{dir}:{}", self.path);
        }
    }
}

/// A user's repository: one LoRA, one small suite, committed on `main`, with a bare remote.
fn user_repo(root: &Path) -> PathBuf {
    let repo = root.join("their-loras");
    std::fs::create_dir_all(repo.join("suites")).unwrap();
    std::fs::create_dir_all(repo.join("loras")).unwrap();
    std::fs::copy(common::repo().join("assets/loras/zorb-loragate.safetensors"), repo.join("loras/zorb.safetensors")).unwrap();
    std::fs::write(
        repo.join("suites/zorb check.yaml"),
        "name: zorb\nloras:\n  - name: zorb\n    file: ../loras/zorb.safetensors\n    trigger: zorb\n    class_word: \"\"\ndefaults:\n  seeds: [0, 1]\n  steps: 6\n  size: 128x128\n  adapters: [zorb]\nthresholds:\n  clip_floor: 0.1\n  control_drop: 0.6\ncases:\n  - name: sky\n    prompt: \"zorb, large, in the center, sky background\"\n  - name: grass\n    prompt: \"zorb, small, on the left, grass background\"\n",
    )
    .unwrap();
    sh(&repo, "git init -q -b main . && git config user.email t@t && git config user.name t && git add . && git commit -qm start");
    sh(root, "git init -q --bare origin.git");
    sh(&repo, "git remote add origin ../origin.git && git push -q origin main && git checkout -q -b pr");
    repo
}

#[test]
fn a_pull_request_goes_through_the_action_from_plan_to_accepted() {
    need(&["bash", "git", "jq", "curl", "tar", "sha256sum"]);
    let root = tmp("flow");
    let repo = user_repo(&root);

    // A release, as .github/workflows/release.yml packs it, served from a folder.
    let releases = root.join("releases");
    let dist = releases.join("v0.0.1-test");
    sh(&common::repo(), &format!("scripts/package-release.sh {} loragate-x86_64-linux.tar.gz {}", env!("CARGO_BIN_EXE_loragate"), dist.display()));
    assert!(std::fs::read_to_string(dist.join("SHA256SUMS")).unwrap().contains("  loragate-x86_64-linux.tar.gz"));
    let url = format!("file://{}", releases.display());
    let release = [("LORAGATE_VERSION", "v0.0.1-test"), ("LORAGATE_DEVICE", "cpu"), ("LORAGATE_RELEASES_URL", url.as_str())];

    // plan: the PR changes the LoRA the suite names (the suite file's name has a space).
    std::fs::write(repo.join("loras/zorb.safetensors"), std::fs::read(common::fixtures().join("loras/zorb-seed2.safetensors")).unwrap()).unwrap();
    sh(&repo, "git commit -qam 'retrain zorb'");
    let base = sh(&repo, "git rev-parse main").trim().to_string();
    let plan = Job::new(&root, &repo, "plan");
    let (code, out) = plan.step("plan.sh", &[], &[("BASE", &base)]);
    assert_eq!(code, 0, "{out}");
    let suites: Value = serde_json::from_str(&plan.outputs()["suites"]).unwrap();
    assert_eq!(suites, serde_json::json!([{"file": "suites/zorb check.yaml", "name": "zorb-check"}]), "a name safe for artifacts");

    // install: resolve (the cache key), then download, check the sum, put it on the PATH.
    let mut gate = Job::new(&root, &repo, "gate");
    let (code, out) = gate.step("install.sh", &["--resolve"], &release);
    assert_eq!(code, 0, "{out}");
    let o = gate.outputs();
    assert_eq!((o["version"].as_str(), o["cacheable"].as_str()), ("v0.0.1-test", "true"));
    assert!(o["key"].contains("v0.0.1-test-cpu") && o["dir"].contains("toolcache"), "{o:?}");
    let (code, out) = gate.step("install.sh", &[], &release);
    assert_eq!(code, 0, "{out}");
    assert!(gate.outputs()["path"].ends_with("/loragate"), "{out}");
    gate.take_path();

    // run: a partition of the suite, counts as outputs, the summary on the run page.
    let files = plan.outputs()["files"].clone();
    let (code, out) = gate.step("run.sh", &[], &[("LORAGATE_SUITES", &files), ("LORAGATE_PARTITION", "1/1"), ("LORAGATE_DEVICE", "cpu")]);
    assert_eq!(code, 0, "{out}");
    let o = gate.outputs();
    assert_eq!(o["failed"], "0", "{out}");
    assert!(o["to-review"].parse::<u32>().unwrap() > 0, "a first run is to review: {o:?}");
    assert!(!o["artifact"].contains('/') && o["artifact"].starts_with("loragate-zorb-check"), "{o:?}");
    assert!(std::fs::read_to_string(&gate.summary).unwrap().contains("## loragate · `zorb`"));

    // report: the artifacts as download-artifact lays them out, merged; red when the gate failed.
    let artifacts = repo.join("artifacts").join(&o["artifact"]);
    std::fs::create_dir_all(&artifacts).unwrap();
    sh(&repo, &format!("cp -r {}/. '{}'", o["out"], artifacts.display()));
    let mut report = Job::new(&root, &repo, "report");
    report.path = gate.path.clone();
    let (code, out) = report.step("report.sh", &[], &[("GATE_RESULT", "success")]);
    assert_eq!(code, 0, "{out}");
    assert!(repo.join("merged/zorb/report.html").is_file() && repo.join("merged/junit.xml").is_file(), "{out}");
    assert!(std::fs::read_to_string(&report.summary).unwrap().contains("loragate · `zorb`"));
    let (code, out) = report.step("report.sh", &[], &[("GATE_RESULT", "failure")]);
    assert_eq!(code, 1, "a failed gate is red: {out}");

    // review: red, something waits to be accepted.
    let (code, out) = report.step("review.sh", &[], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("to review"), "{out}");

    // accept: the label's job commits and pushes the baselines and starts the gate again.
    let fake_bin = root.join("fake-bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let gh_log = root.join("gh.log");
    std::fs::write(fake_bin.join("gh"), format!("#!/bin/sh\necho \"$@\" >> '{}'\n", gh_log.display())).unwrap();
    sh(&root, &format!("chmod +x '{}'", fake_bin.join("gh").display()));
    let mut accept = Job::new(&root, &repo, "accept");
    accept.path = format!("{}:{}", fake_bin.display(), gate.path);
    let (code, out) = accept.step("accept.sh", &[], &[("LORAGATE_SUITES", &files), ("HEAD_REF", "pr"), ("LORAGATE_WORKFLOW", "loragate.yml"), ("LORAGATE_DEVICE", "cpu")]);
    assert_eq!(code, 0, "{out}");
    let pushed = sh(&root, "git --git-dir origin.git log --format=%s pr");
    assert!(pushed.starts_with("Accept new LoRA baselines"), "{pushed}");
    assert!(sh(&root, "git --git-dir origin.git ls-tree -r --name-only pr").contains("baselines/zorb/cpu-f32/sky/main-s0.png"));
    assert_eq!(std::fs::read_to_string(&gh_log).unwrap().trim(), "workflow run loragate.yml --ref pr -f suites=suites/zorb check.yaml");

    // The gate again, on the accepted baselines: green, nothing to review.
    let rerun = Job::new(&root, &repo, "rerun");
    let (code, out) = Job { path: gate.path.clone(), ..rerun }.step("run.sh", &[], &[("LORAGATE_SUITES", &files), ("LORAGATE_OUT", "out/rerun")]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = report.step("review.sh", &[], &[("LORAGATE_MERGED", "out/rerun")]);
    assert_eq!(code, 0, "nothing left to review: {out}");

    // A download that does not match its sum is refused.
    let mut tampered = Job::new(&root, &repo, "tampered");
    tampered.path = std::env::var("PATH").unwrap();
    sh(&dist, "printf '0%.0s' $(seq 64) > bad && sed -i \"s/^[0-9a-f]*  loragate-x86_64-linux.tar.gz$/$(cat bad)  loragate-x86_64-linux.tar.gz/\" SHA256SUMS");
    let (code, out) = tampered.step("install.sh", &[], &release);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("does not match its SHA-256 sum"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_inputs_are_refused_with_a_message() {
    need(&["bash", "jq"]);
    let root = tmp("bad");
    let job = Job::new(&root, &root, "bad");
    let (code, out) = job.step("install.sh", &["--resolve"], &[("LORAGATE_DEVICE", "tpu"), ("LORAGATE_VERSION", "v1.0.0")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("device must be cpu or cuda"), "{out}");
    let (code, out) = job.step("install.sh", &["--resolve"], &[("LORAGATE_VERSION", "../../etc")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is not a release tag"), "{out}");
    let (code, out) = job.step("run.sh", &[], &[("LORAGATE_SUITES", "suites/x.yaml"), ("LORAGATE_PARTITION", "one of two")]);
    assert!(code != 0 && (out.contains("partition must be N/M") || out.contains("not on the PATH")), "{out}");
    let (code, out) = job.step("accept.sh", &[], &[("LORAGATE_SUITES", "")]);
    assert_eq!(code, 2, "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

/// actionlint reads workflows, not action metadata: the action's steps are checked as the job
/// of a reusable workflow whose inputs are the action's (the same `inputs.*` expressions).
#[test]
fn the_actions_steps_pass_actionlint() {
    let action: Value = serde_saphyr::from_str(&std::fs::read_to_string(common::repo().join("action.yml")).unwrap()).unwrap();
    assert_eq!(action["runs"]["using"], "composite");
    for input in ["suites", "version", "device", "partition", "update-baselines", "mode"] {
        assert!(action["inputs"].get(input).is_some(), "input {input}");
    }
    for output in ["failed", "to-review", "passed"] {
        assert!(action["outputs"].get(output).is_some(), "output {output}");
    }
    let mut inputs = serde_json::Map::new();
    for (k, v) in action["inputs"].as_object().unwrap() {
        inputs.insert(k.clone(), serde_json::json!({"type": "string", "required": false, "default": v["default"]}));
    }
    let mut steps = action["runs"]["steps"].as_array().unwrap().clone();
    for s in &mut steps {
        // Scripts exist and are executable; in a workflow they would come from the checkout.
        if let Some(run) = s["run"].as_str()
            && let Some(script) = run.split("action/").nth(1).and_then(|r| r.split('"').next())
        {
            let path = common::repo().join("action").join(script);
            assert!(path.is_file(), "{}", path.display());
            use std::os::unix::fs::PermissionsExt;
            assert!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o111 != 0, "{} is not executable", path.display());
            s["run"] = Value::String(run.replace("$GITHUB_ACTION_PATH", "$GITHUB_WORKSPACE"));
        }
    }
    let workflow = serde_json::json!({
        "on": {"workflow_call": {"inputs": inputs}},
        "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": steps}}
    });
    let dir = tmp("lint");
    let file = dir.join("action-as-workflow.yml");
    std::fs::write(&file, serde_json::to_string_pretty(&workflow).unwrap()).unwrap();
    let found = real_findings(actionlint(std::slice::from_ref(&file)));
    assert!(found.is_empty(), "actionlint:\n{}", serde_json::to_string_pretty(&found).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
