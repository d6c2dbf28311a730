//! One self-contained HTML review page: CSS and JS embedded, images inlined as data URIs, so it
//! works offline and as a single CI artifact. For each case: the checks with their numbers and,
//! per image, the baseline, the current image, the diff heat map and the no-LoRA control side
//! by side. Cases are grouped as failed, to review and passed; a search box and a status
//! switch filter.

use std::collections::BTreeMap;
use std::fmt::Write;

use base64::Engine;

use crate::error::Result;
use crate::harness::{Evidence, Status, SuiteOutcome, worse};
use crate::report::EncodedImages;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Passed => "pass",
        Status::Review => "review",
        Status::Failed => "fail",
        Status::Skipped => "skip",
        Status::Known => "skip",
        Status::Error => "fail",
    }
}

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:16px 24px;position:sticky;top:0;z-index:2}
header h1{margin:0 0 4px;font-size:20px}
.summary span{margin-right:14px}
.controls{margin-top:8px}
.controls input[type=search]{width:320px;padding:4px 8px;border-radius:4px;border:0}
main{padding:16px 24px}
.case{background:#fff;border-radius:8px;margin:0 0 16px;padding:12px 16px;box-shadow:0 1px 2px #0002;border-left:6px solid #2e9d57}
.case.failed{border-left-color:#d33}
.case.review{border-left-color:#d89b00}
h2.group{font-size:15px;margin:18px 0 8px;color:#445}
.shot.worst figcaption{max-width:180px}
table.matrix{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
table.matrix caption{text-align:left;color:#555;padding-bottom:4px}
table.matrix td,table.matrix th{border:1px solid #ddd;padding:3px 8px;text-align:center}
.case h2{margin:0 0 8px;font-size:16px}
table.checks{border-collapse:collapse;width:100%;margin-bottom:8px}
table.checks td{padding:3px 6px;border-top:1px solid #eee;vertical-align:top}
td.st{width:60px;font-weight:600}
td.by{color:#888;font-size:12px;white-space:nowrap}
.pass{color:#2e9d57}.fail{color:#d33}.skip{color:#888}.review{color:#b07d00}
.shots{display:flex;flex-wrap:wrap;gap:14px}
.shot{font-size:12px}
.shot .row{display:flex;gap:4px}
.shot figure{margin:0;text-align:center}
.shot img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc;background:#eee}
.shot .missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;border:1px dashed #bbb;color:#999}
.prompt{color:#555;font-family:ui-monospace,monospace;font-size:12px}
table.slices{border-collapse:collapse;margin:6px 0 14px;font-size:13px;background:#fff}
table.slices td,table.slices th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.sheet{background:#fff;border-radius:8px;margin:0 0 12px;padding:8px 12px;box-shadow:0 1px 2px #0002}
.sheet h3{margin:0 0 6px;font-size:14px}
.cells{display:flex;flex-wrap:wrap;gap:6px}
.cell{margin:0;padding:2px;border:2px solid transparent;border-radius:4px;font-size:10px;text-align:center;width:104px}
.cell img{width:48px;height:48px;image-rendering:pixelated;background:#eee}
.cell.fail{border-color:#d33}.cell.changed{border-color:#d89b00}
.cell figcaption{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.hidden{display:none}
"#;

const SCRIPT: &str = r#"
const q=document.getElementById('q'),f=document.getElementById('failed');
function apply(){const t=q.value.toLowerCase();for(const c of document.querySelectorAll('.case')){
const hit=c.textContent.toLowerCase().includes(t);const ok=!f.checked||!c.classList.contains('passed');
c.classList.toggle('hidden',!(hit&&ok));}}
q.addEventListener('input',apply);f.addEventListener('change',apply);
for(const i of document.querySelectorAll('img[data-from]')){const s=document.getElementById(i.dataset.from);if(s)i.src=s.src;}
"#;

/// An image with its caption; `id` lets the contact sheets show it again without a second copy.
fn figure(label: &str, png: Option<&[u8]>, extra: &str, id: &str) -> Result<String> {
    Ok(match png {
        Some(i) => {
            let id = if id.is_empty() { String::new() } else { format!(" id=\"{id}\"") };
            format!("<figure><img{id} src=\"{}\" alt=\"{}\"><figcaption>{}{}</figcaption></figure>", data_uri(i), esc(label), esc(label), extra)
        }
        None => format!("<figure><div class=\"missing\">no {}</div><figcaption>{}</figcaption></figure>", esc(label), esc(label)),
    })
}

/// A case as the report shows it: its worst status, its checks, and its images (with their index
/// among the run's evidence).
type CaseView<'a> = (Status, Vec<&'a crate::harness::CheckResult>, Vec<(usize, &'a Evidence)>);

fn shot(e: &Evidence, index: usize, pngs: &EncodedImages) -> Result<String> {
    let mut s = String::new();
    let score = e.baseline_score.map(|v| format!(" {v:.3}")).unwrap_or_default();
    let clip = e.clip.map(|v| format!(" clip {v:.3}")).unwrap_or_default();
    let _ = write!(s, "<div class=\"shot\"><div class=\"row\">");
    s.push_str(&figure("baseline", pngs.png(index, ".baseline"), "", &format!("b{index}"))?);
    s.push_str(&figure("current", pngs.png(index, ""), &clip, &format!("c{index}"))?);
    s.push_str(&figure("diff", pngs.png(index, ".diff"), &score, &format!("d{index}"))?);
    if e.control.is_some() {
        s.push_str(&figure("no LoRA", pngs.png(index, ".control"), "", &format!("n{index}"))?);
    }
    let _ = write!(s, "</div><div>{}</div></div>", esc(&e.caption));
    Ok(s)
}

pub fn to_html(o: &SuiteOutcome, pngs: &EncodedImages) -> Result<String> {
    // Per case: its worst status, its checks, its images.
    let mut cases: BTreeMap<&str, CaseView> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for r in &o.results {
        if !cases.contains_key(r.case.as_str()) {
            order.push(&r.case);
        }
        let e = cases.entry(&r.case).or_insert((Status::Passed, Vec::new(), Vec::new()));
        e.0 = worse(e.0, r.status);
        e.1.push(r);
    }
    for (i, ev) in o.evidence.iter().enumerate() {
        if let Some(e) = cases.get_mut(ev.case.as_str()) {
            e.2.push((i, ev));
        }
    }
    let mut body = String::new();
    for (title, class, wanted) in [("Failed", "failed", 2), ("To review", "review", 1), ("Passed", "passed", 0)] {
        let rank = |s: Status| if s.is_failure() { 2 } else if s == Status::Review { 1 } else { 0 };
        let group: Vec<&str> = order.iter().copied().filter(|c| rank(cases[c].0) == wanted).collect();
        if group.is_empty() {
            continue;
        }
        let _ = write!(body, "<h2 class=\"group\">{title} ({})</h2>", group.len());
        for name in group {
            let (_, checks, shots) = &cases[name];
            let _ = write!(body, "<section class=\"case {class}\" id=\"case-{}\"><h2>{}</h2>", esc(name), esc(name));
            if let Some((_, p)) = shots.first() {
                let _ = write!(body, "<div class=\"prompt\">{}</div>", esc(&p.prompt));
            }
            body.push_str("<table class=\"checks\">");
            for r in checks {
                let _ = write!(
                    body,
                    "<tr><td class=\"st {}\">{}</td><td>{}</td><td>{}</td><td class=\"by\">{}</td></tr>",
                    status_class(r.status),
                    status_word(r.status),
                    esc(&r.check),
                    esc(&r.message),
                    esc(&r.scorer)
                );
            }
            body.push_str("</table>");
            if let Some((_, m)) = o.stacks.iter().find(|(c, _)| c == name) {
                body.push_str(&stack_matrix(m));
            }
            body.push_str("<div class=\"shots\">");
            for (i, e) in shots {
                body.push_str(&shot(e, *i, pngs)?);
            }
            body.push_str("</div></section>");
        }
    }
    let worst = format!("{}{}{}{}", memorization(o, pngs)?, worst_slices(o), contact_sheets(o), worst_prompts(o, pngs)?);
    let verdict = crate::report::markdown::verdict(o);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>loragate · {} {verdict}</title><style>{STYLE}</style></head><body>\
<header><h1>loragate · {} — {verdict}</h1><div class=\"summary\"><span class=\"pass\">{} passed</span><span class=\"review\">{} to review</span><span class=\"fail\">{} failed</span><span>{} known failures</span><span>{} skipped</span>\
<span>{} images ({} generated, {} cached)</span><span>{}</span><span>{}-{}</span></div>\
<div class=\"controls\"><input id=\"q\" type=\"search\" placeholder=\"filter cases and checks…\"> <label><input id=\"failed\" type=\"checkbox\"> failed and to review only</label></div></header>\
<main>{worst}{body}</main><script>{SCRIPT}</script></body></html>",
        esc(&o.suite),
        esc(&o.suite),
        o.passed(),
        o.to_review(),
        o.failed(),
        o.known(),
        o.skipped(),
        o.images_total,
        o.generated,
        o.cached,
        esc(&o.scorers_line()),
        o.device,
        o.dtype
    );
    Ok(html)
}

/// The N×N table of what each LoRA (row) keeps of its own effect and look when stacked with
/// another (column).
fn stack_matrix(m: &crate::harness::measure::StackNumbers) -> String {
    let mut s = String::from("<table class=\"matrix\"><caption>What each LoRA (row) keeps of its own effect / look when stacked with another (column)</caption><tr><th></th>");
    for n in &m.names {
        let _ = write!(s, "<th>{}</th>", esc(n));
    }
    s.push_str("</tr>");
    let pct = |x: Option<f64>| x.map(|x| format!("{:.0} %", x * 100.0)).unwrap_or_else(|| "–".into());
    for (i, row) in m.names.iter().enumerate() {
        let _ = write!(s, "<tr><th>{}</th>", esc(row));
        for k in 0..m.names.len() {
            let (e, id) = (m.effect_kept[i][k], m.identity_kept[i][k]);
            let kept = [e, id].into_iter().flatten().fold(1.0f64, f64::min);
            // Green when a LoRA keeps its effect, red when stacking wipes it out.
            let hue = (kept.clamp(0.0, 1.0) * 120.0).round();
            let cell = if i == k { "alone".to_string() } else { format!("{} / {}", pct(e), pct(id)) };
            let _ = write!(s, "<td style=\"background:hsl({hue},60%,85%)\">{cell}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// The lowest-scoring prompts with their image, score and the no-LoRA control's.
fn worst_prompts(o: &SuiteOutcome, pngs: &EncodedImages) -> Result<String> {
    if o.prompt_scores.len() < 2 {
        return Ok(String::new());
    }
    let mut s = format!("<h2 class=\"group\">Worst prompts ({}, of {}; all in prompts.csv)</h2><div class=\"shots\">", o.scale.describe(), o.prompt_scores.len());
    for p in o.worst_prompts(10) {
        let img = o.evidence.iter().position(|e| e.case == p.case && e.id == p.image).and_then(|i| pngs.png(i, ""));
        let control = p.control.map(|c| format!(" · without the LoRA {:.3}", o.scale.apply(c))).unwrap_or_default();
        let class = if p.clip < p.floor { "fail" } else { "pass" };
        let caption = format!("<span class=\"{class}\">{:.3}</span>{control}<br><a href=\"#case-{}\">{} / {}</a><br><span class=\"prompt\">{}</span>", o.scale.apply(p.clip), esc(&p.case), esc(&p.case), esc(&p.variant), esc(&p.prompt));
        match img {
            Some(i) => {
                let _ = write!(s, "<div class=\"shot worst\"><figure><img src=\"{}\" alt=\"{}\"><figcaption>{caption}</figcaption></figure></div>", data_uri(i), esc(&p.prompt));
            }
            None => {
                let _ = write!(s, "<div class=\"shot worst\"><figure><div class=\"missing\">no image</div><figcaption>{caption}</figcaption></figure></div>");
            }
        }
    }
    s.push_str("</div>");
    Ok(s)
}

/// Per LoRA the memorization check ran for: each copy (else the closest pair) as the generated
/// image beside its nearest training image with both distances, and the training images that
/// several outputs converge on. Training images are read from their folder now; one that is
/// gone (a report merged on another machine) shows as missing.
fn memorization(o: &SuiteOutcome, pngs: &EncodedImages) -> Result<String> {
    use crate::harness::verdicts::{converging, is_copy};
    let mut s = String::new();
    let training_png = |dir: &std::path::Path, rel: &str| -> Option<Vec<u8>> { crate::imageio::read_image(&dir.join(rel)).ok().and_then(|i| crate::imageio::encode_png_fast(&i).ok()) };
    for n in o.memorization.iter().filter(|n| n.missing.is_none() && !n.images.is_empty()) {
        let mut copies: Vec<&crate::harness::measure::Nearest> = n.images.iter().filter(|i| is_copy(i, n.threshold, n.margin) == Some(true)).collect();
        let gain = |i: &crate::harness::measure::Nearest| i.similarity - i.control.unwrap_or(f64::NAN);
        copies.sort_by(|a, b| gain(b).total_cmp(&gain(a)));
        let title = if copies.is_empty() { "no copies; the closest pair".to_string() } else { format!("{} copies", copies.len()) };
        if copies.is_empty() {
            copies.extend(n.images.iter().filter(|i| i.control.is_some()).max_by(|a, b| gain(a).total_cmp(&gain(b))));
        }
        let _ = write!(
            s,
            "<h2 class=\"group\">Memorization · {} ({title}; {} training images from {})</h2><div class=\"shots\">",
            esc(&n.lora),
            n.training_images,
            esc(&n.origin)
        );
        for c in copies.iter().take(24) {
            let generated = o.evidence.iter().position(|e| e.case == c.case && e.id == c.image).and_then(|i| pngs.png(i, ""));
            let caption = format!(
                "identity {:.3} (no LoRA {:.3}) · hash {} of {}<br><a href=\"#case-{}\">{} / {}</a>",
                c.similarity,
                c.control.unwrap_or(f64::NAN),
                c.hash_distance,
                crate::score::phash::HASH_BITS,
                esc(&c.case),
                esc(&c.case),
                esc(&c.image)
            );
            let _ = write!(s, "<div class=\"shot\"><div class=\"row\">");
            s.push_str(&figure("generated", generated, "", "")?);
            s.push_str(&figure(&c.training, training_png(&n.training_dir, &c.training).as_deref(), "", "")?);
            let _ = write!(s, "</div><div>{caption}</div></div>");
        }
        s.push_str("</div>");
        let converge = converging(n);
        if !converge.is_empty() {
            let _ = write!(s, "<table class=\"checks\"><caption>Training images that several outputs of {} are nearest to</caption><tr><th>training image</th><th></th><th>outputs</th></tr>", esc(&n.lora));
            for (t, count) in converge.iter().take(12) {
                let img = match training_png(&n.training_dir, t) {
                    Some(p) => format!("<img src=\"{}\" alt=\"{}\" width=\"64\" height=\"64\">", data_uri(&p), esc(t)),
                    None => "missing".into(),
                };
                let _ = write!(s, "<tr><td>{}</td><td>{img}</td><td>{count} of {}</td></tr>", esc(t), n.images.len());
            }
            s.push_str("</table>");
        }
    }
    Ok(s)
}

/// The slices the run compared, failing first: the failure-point finder over a prompt set.
fn worst_slices(o: &SuiteOutcome) -> String {
    if o.slices.is_empty() {
        return String::new();
    }
    let failing = o.slices.iter().filter(|r| r.failed).count();
    let mut s = format!(
        "<h2 class=\"group\">Worst slices ({failing} failing of {} tested)</h2><table class=\"slices\"><tr><th></th><th>scope</th><th>slice</th><th>metric</th><th>prompts × seeds</th><th>slice</th><th>rest</th><th>accepted</th><th>lost beyond the rest</th><th>p</th></tr>",
        o.slices.len()
    );
    for r in o.slices.iter().take(12) {
        let seeds = r.seeds_per_prompt();
        let accepted = r.accepted.map(|a| format!("{a:.3}")).unwrap_or_else(|| "–".into());
        let (class, word) = if r.failed { ("fail", "failed") } else { ("pass", "") };
        let _ = write!(
            s,
            "<tr><td class=\"{class}\">{word}</td><td>{}</td><td>{}</td><td>{}</td><td>{} × {seeds}</td><td>{:.3}</td><td>{:.3}</td><td>{accepted}</td><td>{:+.3}</td><td>{:.4}</td></tr>",
            esc(&r.scope),
            esc(&r.slice),
            esc(&r.metric),
            r.prompts,
            r.value,
            r.rest,
            r.gap,
            r.p
        );
    }
    s.push_str("</table>");
    s
}

/// One contact-sheet cell: the accepted and the current image of a prompt's first seed, side by
/// side (shown again from the case sections below, not copied).
struct Cell<'a> {
    evidence: usize,
    e: &'a Evidence,
    failing: bool,
}

fn cells_html(cells: &[Cell]) -> String {
    let mut s = String::from("<div class=\"cells\">");
    for c in cells {
        let changed = c.e.baseline_score.is_some_and(|b| b < 0.999) || c.e.baseline.is_none();
        let class = if c.failing { "cell fail" } else if changed { "cell changed" } else { "cell" };
        let title = format!("{} · {} · seed {}: {}", c.e.case, c.e.variant, c.e.seed, c.e.prompt);
        let _ = write!(
            s,
            "<figure class=\"{class}\" title=\"{}\"><img data-from=\"b{i}\" alt=\"accepted\"><img data-from=\"c{i}\" alt=\"current\"><figcaption>{}</figcaption></figure>",
            esc(&title),
            esc(&c.e.variant),
            i = c.evidence
        );
    }
    s.push_str("</div>");
    s
}

/// Contact sheets: for every failing slice and the closest others, then for every case of four
/// or more prompts, one grid of accepted and current thumbnails (first seed), failing and changed
/// ones first. A character lost on one background shows as one row of wrong pictures.
fn contact_sheets(o: &SuiteOutcome) -> String {
    let first_seed = |case: &str, variant: &str| o.evidence.iter().enumerate().filter(|(_, e)| e.case == case && e.variant == variant).min_by_key(|(_, e)| e.seed);
    let in_failing_slice = |case: &str, variant: &str| -> bool {
        let Some(p) = o.prompt_scores.iter().find(|p| p.case == case && p.variant == variant) else { return false };
        o.slices.iter().any(|r| r.failed && (r.scope == case || r.scope == "all-cases") && p.slices.contains(&r.slice))
    };
    let order = |cells: &mut Vec<Cell>| cells.sort_by(|a, b| b.failing.cmp(&a.failing).then(a.e.baseline_score.unwrap_or(0.0).total_cmp(&b.e.baseline_score.unwrap_or(0.0))));
    let mut s = String::new();
    let mut shown: Vec<&crate::harness::run_verdicts::SliceRow> = o.slices.iter().filter(|r| r.failed).collect();
    shown.extend(o.slices.iter().filter(|r| !r.failed).take(3));
    let mut seen = std::collections::BTreeSet::new();
    for r in shown {
        if !seen.insert((r.scope.clone(), r.slice.clone())) {
            continue;
        }
        let mut cells: Vec<Cell> = o
            .prompt_scores
            .iter()
            .filter(|p| (r.scope == "all-cases" || p.case == r.scope) && p.slices.contains(&r.slice))
            .filter_map(|p| first_seed(&p.case, &p.variant).map(|(i, e)| Cell { evidence: i, e, failing: r.failed }))
            .collect();
        if cells.is_empty() {
            continue;
        }
        order(&mut cells);
        let verdict = if r.failed { "<span class=\"fail\">failed</span>" } else { "closest to failing" };
        let _ = write!(s, "<div class=\"sheet\"><h3>{} · slice {} — {verdict}: {}</h3>{}</div>", esc(&r.scope), esc(&r.slice), esc(&r.describe()), cells_html(&cells));
    }
    let mut cases: Vec<&str> = Vec::new();
    for p in &o.prompt_scores {
        if !cases.contains(&p.case.as_str()) {
            cases.push(&p.case);
        }
    }
    for case in cases {
        let variants: Vec<&str> = o.prompt_scores.iter().filter(|p| p.case == case).map(|p| p.variant.as_str()).collect();
        if variants.len() < 4 {
            continue;
        }
        let mut cells: Vec<Cell> = variants.iter().filter_map(|v| first_seed(case, v).map(|(i, e)| Cell { evidence: i, e, failing: in_failing_slice(case, v) })).collect();
        order(&mut cells);
        let _ = write!(s, "<div class=\"sheet\"><h3><a href=\"#case-{}\">{}</a> · {} prompts, accepted | current</h3>{}</div>", esc(case), esc(case), variants.len(), cells_html(&cells));
    }
    if s.is_empty() {
        return s;
    }
    format!(
        "<h2 class=\"group\">Contact sheets</h2><p class=\"prompt\">Each cell: the accepted image (left) and the current one (right) of a prompt, first seed. Red: in a failing slice; amber: changed since acceptance.</p>{s}"
    )
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Passed => "passed",
        Status::Review => "to review",
        Status::Failed => "failed",
        Status::Skipped => "skipped",
        Status::Known => "known failure",
        Status::Error => "error",
    }
}
