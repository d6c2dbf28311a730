//! The architecture docs/models.md describes ("Layout"), checked on the source: the model layer's four
//! folders use only the folders above them (ops → arch → formats → runtime), and the harness,
//! scoring, baselines, reports and suites never compute on tensors (no candle imports; they pass
//! `crate::device` handles and plain vectors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

const LAYERS: [&str; 4] = ["ops", "arch", "formats", "runtime"];

/// Which layer folder each `crate::model::<module>` lives in.
fn module_layers() -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (i, layer) in LAYERS.iter().enumerate() {
        for e in std::fs::read_dir(src().join("model").join(layer)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().trim_end_matches(".rs").to_string();
            if name != "mod" {
                out.insert(name, i);
            }
        }
    }
    out
}

/// `(file, line, used module)` for every `crate::model::<module>` in `text` outside tests.
fn model_uses(text: &str) -> Vec<(usize, String)> {
    let body = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    for (n, line) in body.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        for part in line.split("crate::model::").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push((n + 1, name));
        }
    }
    out
}

#[test]
fn model_layers_use_only_the_layers_above_them() {
    let layers = module_layers();
    assert!(layers.len() >= 15, "{layers:?}");
    let mut wrong = Vec::new();
    for (i, layer) in LAYERS.iter().enumerate() {
        for f in rust_files(&src().join("model").join(layer)) {
            let text = std::fs::read_to_string(&f).unwrap();
            for (line, used) in model_uses(&text) {
                let target = if LAYERS.contains(&used.as_str()) { LAYERS.iter().position(|l| *l == used) } else { layers.get(&used).copied() };
                if let Some(t) = target
                    && t > i
                {
                    wrong.push(format!("{}:{line} ({layer}) uses {used} ({})", f.display(), LAYERS[t]));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "a lower layer uses a higher one:\n{}", wrong.join("\n"));
}

#[test]
fn the_model_free_stages_never_touch_candle() {
    let mut wrong = Vec::new();
    for dir in ["harness", "score", "baseline", "report", "suite", "cli"] {
        for f in rust_files(&src().join(dir)) {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.contains("candle_core") || line.contains("candle_nn") {
                    wrong.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_a_violation() {
    let uses = model_uses("use crate::model::pipeline::Pipeline;\nlet x = crate::model::nn::attention(a);\n/// see [`crate::model::clip`]\n#[cfg(test)]\nuse crate::model::vae;");
    assert_eq!(uses, vec![(1, "pipeline".to_string()), (2, "nn".to_string())]);
}
