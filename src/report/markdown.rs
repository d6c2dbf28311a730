//! A Markdown summary for `$GITHUB_STEP_SUMMARY` and PR comments: the verdict, then the checks
//! grouped as "failed", "to review" and "passed", each with its numbers.

use std::fmt::Write;

use crate::harness::{CheckResult, Status, SuiteOutcome};

fn icon(s: Status) -> &'static str {
    match s {
        Status::Passed => "✅",
        Status::Review => "👀",
        Status::Failed => "❌",
        Status::Skipped => "⏭️",
        Status::Known => "🩹",
        Status::Error => "💥",
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `passed`, `passed, 3 to review` or `failed`.
pub fn verdict(o: &SuiteOutcome) -> String {
    match (o.failed(), o.to_review()) {
        (0, 0) => "passed".into(),
        (0, n) => format!("passed, {n} to review"),
        _ => "failed".into(),
    }
}

fn list(s: &mut String, title: &str, rows: &[&CheckResult]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "### {title} ({})\n", rows.len());
    for r in rows {
        let by = if r.scorer.is_empty() { String::new() } else { format!(" _({})_", escape(&r.scorer)) };
        let _ = writeln!(s, "- {} **{} · {}** — {}{by}", icon(r.status), r.case, r.check, escape(&r.message));
    }
    let _ = writeln!(s);
}

pub fn to_markdown(o: &SuiteOutcome) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## loragate · `{}` {}\n", o.suite, verdict(o));
    let _ = writeln!(
        s,
        "**{}** passed · **{}** to review · **{}** failed · **{}** known failures · **{}** skipped — {} images ({} generated, {} cached) · {} · {}-{}\n",
        o.passed(),
        o.to_review(),
        o.failed(),
        o.known(),
        o.skipped(),
        o.images_total,
        o.generated,
        o.cached,
        o.scorers_line(),
        o.device,
        o.dtype
    );
    let of = |f: fn(Status) -> bool| o.results.iter().filter(|r| f(r.status)).collect::<Vec<_>>();
    list(&mut s, "Failed", &of(Status::is_failure));
    list(&mut s, "To review", &of(|st| st == Status::Review));
    list(&mut s, "Known failures", &of(|st| st == Status::Known));
    if o.prompt_scores.len() > 1 {
        let _ = writeln!(s, "### Worst prompts ({}, of {}; all in `prompts.csv`)\n", o.scale.describe(), o.prompt_scores.len());
        let _ = writeln!(s, "| CLIP | without the LoRA | floor | case / variant | prompt |\n|---|---|---|---|---|");
        for p in o.worst_prompts(10) {
            let control = p.control.map(|c| format!("{:.3}", o.scale.apply(c))).unwrap_or_else(|| "–".into());
            let clip = format!("{:.3}", o.scale.apply(p.clip));
            let clip = if p.clip < p.floor { format!("**{clip}**") } else { clip };
            let _ = writeln!(s, "| {clip} | {control} | {:.3} | {} / {} | {} |", o.scale.apply(p.floor), escape(&p.case), escape(&p.variant), escape(&p.prompt));
        }
        let _ = writeln!(s);
    }
    if !o.slices.is_empty() {
        let failing = o.slices.iter().filter(|r| r.failed).count();
        let _ = writeln!(s, "### Worst slices ({failing} failing of {} tested; {} statistical tests shared a 5 % false-alarm budget)\n", o.slices.len(), o.statistical_tests);
        let _ = writeln!(s, "| | scope | slice | metric | prompts × seeds | slice | rest | accepted | lost beyond the rest | p |\n|---|---|---|---|---|---|---|---|---|---|");
        for r in o.slices.iter().take(10) {
            let seeds = r.seeds_per_prompt();
            let accepted = r.accepted.map(|a| format!("{a:.3}")).unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {} | {} | `{}` | {} | {} × {seeds} | {:.3} | {:.3} | {accepted} | {:+.3} | {:.4} |",
                if r.failed { icon(Status::Failed) } else { icon(Status::Passed) },
                escape(&r.scope),
                escape(&r.slice),
                r.metric,
                r.prompts,
                r.value,
                r.rest,
                r.gap,
                r.p
            );
        }
        let _ = writeln!(s);
    }
    let rest = of(|st| matches!(st, Status::Passed | Status::Skipped));
    let _ = writeln!(s, "<details><summary>Passed ({})</summary>\n", rest.len());
    let _ = writeln!(s, "| | case | check | result | scored by |\n|---|---|---|---|---|");
    for r in rest {
        let _ = writeln!(s, "| {} | {} | {} | {} | {} |", icon(r.status), escape(&r.case), escape(&r.check), escape(&r.message), escape(&r.scorer));
    }
    let _ = writeln!(s, "\n</details>\n");
    for (case, m) in &o.stacks {
        let _ = writeln!(s, "**Stacking `{case}`**: what each LoRA (row) keeps of its own effect / look when stacked with another (column)\n");
        let _ = writeln!(s, "| | {} |\n|---|{}", m.names.join(" | "), "---|".repeat(m.names.len()));
        let pct = |x: Option<f64>| x.map(|x| format!("{:.0} %", x * 100.0)).unwrap_or_else(|| "–".into());
        for (i, row) in m.names.iter().enumerate() {
            let cells: Vec<String> = (0..m.names.len()).map(|k| if i == k { "alone".into() } else { format!("{} / {}", pct(m.effect_kept[i][k]), pct(m.identity_kept[i][k])) }).collect();
            let _ = writeln!(s, "| **{row}** | {} |", cells.join(" | "));
        }
        let _ = writeln!(s);
    }
    for n in &o.notes {
        let _ = writeln!(s, "Note: {}\n", escape(n));
    }
    if !o.pending.is_empty() {
        let _ = writeln!(s, "{} new or changed files were written under `baselines/` (`loragate baseline review`).\n", o.pending.len());
    }
    if !o.stale.is_empty() {
        let _ = writeln!(s, "{} baseline files belong to no case any more (stale):", o.stale.len());
        for p in o.stale.iter().take(10) {
            let _ = writeln!(s, "- `{}`", p.display());
        }
        let _ = writeln!(s);
    }
    s
}
