//! The GitHub Actions workflows are well-formed: every job runs somewhere and has steps, every
//! step either uses an action or runs a command, `needs` and `matrix.*` refer to things that
//! exist, and expressions are closed. When `actionlint` is installed (on PATH or in
//! $ACTIONLINT), it must also pass.

use std::path::PathBuf;

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
fn actionlint_passes_when_installed() {
    let bin = std::env::var("ACTIONLINT").unwrap_or_else(|_| "actionlint".into());
    let Ok(out) = std::process::Command::new(&bin).arg("-version").output() else {
        eprintln!("actionlint not installed; the structural checks above still ran");
        return;
    };
    assert!(out.status.success());
    let files: Vec<PathBuf> = workflows().into_iter().map(|(p, _)| p).collect();
    let out = std::process::Command::new(&bin).args(&files).output().unwrap();
    assert!(out.status.success(), "actionlint:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
