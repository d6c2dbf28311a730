//! The final table printed to the terminal.

use std::fmt::Write;

use crate::harness::{Status, SuiteOutcome};

fn tag(s: Status) -> &'static str {
    match s {
        Status::Passed => "PASS",
        Status::Review => "REVIEW",
        Status::Failed => "FAIL",
        Status::Skipped => "SKIP",
        Status::Known => "KNOWN",
        Status::Error => "ERROR",
    }
}

/// A table of every check, then the totals. `width` wraps long messages.
pub fn table(o: &SuiteOutcome, width: usize) -> String {
    let mut s = String::new();
    let case_w = o.results.iter().map(|r| r.case.chars().count()).max().unwrap_or(4).clamp(4, 28);
    let check_w = o.results.iter().map(|r| r.check.chars().count()).max().unwrap_or(5).clamp(5, 24);
    let msg_w = width.saturating_sub(case_w + check_w + 12).max(30);
    let _ = writeln!(s, "{:<6} {:<case_w$} {:<check_w$} result", "", "case", "check");
    for n in &o.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for r in &o.results {
        let msg: String = r.message.chars().take(msg_w).collect();
        let more = if r.message.chars().count() > msg_w { "…" } else { "" };
        let _ = writeln!(s, "{:<6} {:<case_w$} {:<check_w$} {msg}{more}", tag(r.status), clip(&r.case, case_w), clip(&r.check, check_w));
    }
    if o.prompt_scores.len() > 1 {
        let _ = writeln!(s, "\nworst prompts ({}; every prompt's scores are in prompts.csv):", o.scale.describe());
        for p in o.worst_prompts(5) {
            let control = p.control.map(|c| format!(", without the LoRA {:.3}", o.scale.apply(c))).unwrap_or_default();
            let mark = if p.clip < p.floor { "under the floor" } else { "" };
            let _ = writeln!(s, "  {:>7.3}  {}/{}  {:?}{control} {mark}", o.scale.apply(p.clip), p.case, p.variant, p.prompt);
        }
    }
    if !o.slices.is_empty() {
        let failing = o.slices.iter().filter(|r| r.failed).count();
        let _ = writeln!(s, "\nworst slices ({failing} failing of {} tested):", o.slices.len());
        for r in o.slices.iter().take(5) {
            let line: String = format!("  {} {}: {}", if r.failed { "FAIL" } else { "    " }, r.scope, r.describe()).chars().take(width.max(40)).collect();
            let _ = writeln!(s, "{line}");
        }
    }
    // The memorization check names the worst pair: in full, where the table cut it.
    for r in o.results.iter().filter(|r| r.check.starts_with("memorization/") && r.message.chars().count() > msg_w) {
        let _ = writeln!(s, "\n{} {}: {}", tag(r.status), r.check, r.message);
    }
    let t = &o.timings;
    let _ = writeln!(
        s,
        "\n{}: {} passed, {} to review, {} failed, {} known failures, {} skipped · {} images ({} generated, {} cached) · models loaded: {} pipelines, {} scorers · generate {:.1}s, score {:.1}s, checks {:.1}s, baselines {:.1}s",
        o.suite,
        o.passed(),
        o.to_review(),
        o.failed(),
        o.known(),
        o.skipped(),
        o.images_total,
        o.generated,
        o.cached,
        o.pipelines_loaded,
        o.scorers_loaded,
        t.generate,
        t.score,
        t.checks,
        t.baselines
    );
    s
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}
