//! A Markdown summary for `$GITHUB_STEP_SUMMARY` and PR comments: the verdict, failures first
//! with their numbers, then a table of every check.

use std::fmt::Write;

use crate::harness::{Status, SuiteOutcome};

fn icon(s: Status) -> &'static str {
    match s {
        Status::Passed => "✅",
        Status::Failed => "❌",
        Status::Skipped => "⏭️",
        Status::Error => "💥",
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn to_markdown(o: &SuiteOutcome) -> String {
    let mut s = String::new();
    let verdict = if o.failed() == 0 { "passed" } else { "failed" };
    let _ = writeln!(s, "## loragate · `{}` {verdict}\n", o.suite);
    let _ = writeln!(
        s,
        "**{}** passed · **{}** failed · **{}** skipped — {} images ({} generated, {} cached) · scorer `{}` ({}) · {}-{}\n",
        o.passed(),
        o.failed(),
        o.skipped(),
        o.images_total,
        o.generated,
        o.cached,
        o.scorer,
        o.scale.describe(),
        o.device,
        o.dtype
    );
    let failures: Vec<_> = o.results.iter().filter(|r| matches!(r.status, Status::Failed | Status::Error)).collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "### Failures\n");
        for r in &failures {
            let _ = writeln!(s, "- {} **{} · {}** — {}", icon(r.status), r.case, r.check, escape(&r.message));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "<details><summary>All {} checks</summary>\n", o.results.len());
    let _ = writeln!(s, "| | case | check | result |\n|---|---|---|---|");
    for r in &o.results {
        let _ = writeln!(s, "| {} | {} | {} | {} |", icon(r.status), escape(&r.case), escape(&r.check), escape(&r.message));
    }
    let _ = writeln!(s, "\n</details>\n");
    if !o.pending.is_empty() {
        let _ = writeln!(s, "{} new or changed images are pending review (`loragate baseline review`).\n", o.pending.len());
    }
    if !o.stale.is_empty() {
        let _ = writeln!(s, "{} baseline images belong to no case any more (stale):", o.stale.len());
        for p in o.stale.iter().take(10) {
            let _ = writeln!(s, "- `{}`", p.display());
        }
        let _ = writeln!(s);
    }
    s
}
