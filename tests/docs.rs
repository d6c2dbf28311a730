//! The README is for newcomers: it starts with the two commands, stays short (about 12 KB), and
//! every link in it and in `docs/` resolves: files, and `#anchors` to headings that exist.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files a reader is sent through.
fn documents() -> Vec<PathBuf> {
    let mut out = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
    docs.sort();
    out.extend(docs);
    out
}

/// `(line, target)` of every inline link and image outside code blocks and code spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans hold examples, not links.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n + 1, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { Some(c) } else if c == ' ' { Some('-') } else { None })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

fn broken(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for (line, target) in links(&text) {
        if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = target.split_once('#').map(|(p, a)| (p, Some(a))).unwrap_or((target.as_str(), None));
        let dest = if path.is_empty() { file.to_path_buf() } else { file.parent().unwrap().join(path) };
        let here = format!("{}:{line}: {target}", file.strip_prefix(repo()).unwrap_or(file).display());
        if !dest.exists() {
            out.push(format!("{here}: no such file"));
            continue;
        }
        if let Some(a) = anchor {
            let text = std::fs::read_to_string(&dest).unwrap_or_default();
            if !anchors(&text).iter().any(|h| h == a) {
                out.push(format!("{here}: no heading with that anchor"));
            }
        }
    }
    out
}

#[test]
fn every_link_in_the_readme_and_the_docs_resolves() {
    let found: Vec<String> = documents().iter().flat_map(|d| broken(d)).collect();
    assert!(found.is_empty(), "broken links:\n{}", found.join("\n"));
}

#[test]
fn the_readme_starts_with_the_two_commands_and_stays_short() {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(text.len() <= 12 * 1024, "README.md is {} bytes; keep it near 12 KB and put the depth in docs/", text.len());
    let first_block: Vec<&str> = text.split("```").nth(1).unwrap().lines().skip(1).collect();
    assert!(first_block[0].starts_with("cargo run --release -- suite suites/portrait.yaml"), "{first_block:?}");
    assert!(first_block[1].starts_with("cargo test --release"), "{first_block:?}");
    // The test command is exactly what CI runs.
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert_eq!(ci.lines().last().unwrap().trim(), "cargo test --release");
    // It tells a newcomer how to install, how to gate their own LoRAs, and where the rest is.
    for needle in ["## Install", "cargo install --locked", "LORAGATE_ASSETS", "## Gate your own LoRAs", "loragate init", "`loragate gate`", "`loragate review`", "branch protection"] {
        assert!(text.contains(needle), "README lacks {needle}");
    }
    for doc in ["suites", "checks-and-verdicts", "statistics", "training", "models", "gpu", "ci-and-runners", "performance"] {
        assert!(text.contains(&format!("(docs/{doc}.md)")), "README does not link docs/{doc}.md");
    }
}

#[test]
fn the_checker_sees_broken_links() {
    assert_eq!(links("see [a](x.md) and ![b](y.png#z) but `[c](not.md)`\n```\n[d](code.md)\n```"), vec![(1, "x.md".to_string()), (1, "y.png#z".to_string())]);
    assert_eq!(slug(" Reports and exit codes"), "reports-and-exit-codes");
    assert_eq!(slug("Baselines, and review!"), "baselines-and-review");
    let dir = std::env::temp_dir().join(format!("loragate-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.md"), "# Top\n[ok](#top) [bad](#nowhere) [gone](missing.md)\n").unwrap();
    let found = broken(&dir.join("a.md"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 2, "{found:?}");
}
