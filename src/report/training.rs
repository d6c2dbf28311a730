//! The training report, `<out>/report.html`: one self-contained page (charts as inline SVG from
//! [`super::charts`], thumbnails as PNG data URIs) with the smoothed training loss, the
//! held-out loss, each of the validation suite's scores per checkpoint, one fixed prompt's
//! image per checkpoint side by side, the checkpoint table, and the chosen checkpoint with
//! its reason (and why training stopped early, when it did).

use std::fmt::Write;
use std::path::Path;

use base64::Engine;

use super::charts::{BLUE, Chart, GREEN, GREY, ORANGE, RED, Series, svg};
use crate::error::Result;
use crate::train::config::PickRule;
use crate::train::pick::{Choice, Evaluation};
use crate::train::{CheckpointVerdict, StepStats};

/// Everything the report shows about one training run.
pub struct TrainingRun<'a> {
    pub name: &'a str,
    pub model: &'a str,
    /// The validation suite's name, when one ran.
    pub suite: Option<&'a str>,
    pub steps: &'a [StepStats],
    pub planned_steps: usize,
    pub heldout_start: Option<f64>,
    pub heldout_images: usize,
    pub evaluations: &'a [Evaluation],
    pub verdicts: &'a [CheckpointVerdict],
    pub choice: &'a Choice,
    pub pick: PickRule,
    pub stopped_early: Option<&'a str>,
    pub final_file: &'a Path,
}

/// The smoothing of the training-loss line: the console's exponential moving average.
pub const SMOOTHING: f64 = 0.95;

/// The exponential moving average of `values` (the first value starts it).
pub fn smooth(values: &[f64], keep: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut ema: Option<f64> = None;
    for &v in values {
        let e = match ema {
            None => v,
            Some(e) => keep * e + (1.0 - keep) * v,
        };
        ema = Some(e);
        out.push(e);
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px;font-size:20px}
main{padding:14px 24px}
.pick{background:#fff;border-left:6px solid #7b3fbf;border-radius:8px;padding:10px 14px;margin:0 0 14px;box-shadow:0 1px 2px #0002}
.pick.none{border-left-color:#d33}
.stopped{background:#fff6e0;border-left:6px solid #d89b00;border-radius:8px;padding:8px 14px;margin:0 0 14px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.charts figure{margin:0;background:#fff;border-radius:8px;padding:6px;box-shadow:0 1px 2px #0002}
.charts svg{width:100%;height:auto}
.rule{color:#555;font-size:12px;margin-top:4px}
.thumbs{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 14px}
.thumbs figure{margin:0;text-align:center;font-size:12px;padding:4px;border:3px solid transparent;border-radius:6px;background:#fff}
.thumbs figure.chosen{border-color:#7b3fbf}
.thumbs img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td.note{text-align:left}
tr.chosen{background:#f1e9fb;font-weight:600}
.pass{color:#2e9d57}.fail{color:#d33}
h2{font-size:16px;margin:18px 0 8px}
.prompt{color:#555;font-family:ui-monospace,monospace;font-size:12px}
"#;

/// The charts of a run, in page order (empty series are left out).
pub fn charts(r: &TrainingRun) -> Vec<Chart> {
    let x_max = r.steps.last().map(|s| s.step).unwrap_or(0).max(r.evaluations.last().map(|e| e.step).unwrap_or(0)) as f64;
    let x_range = (0.0, x_max.max(1.0));
    let mark = r.choice.step.map(|s| (s as f64, format!("chosen: step {s}")));
    let chart = |title: &str, y: &str, series: Vec<Series>| Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: y.into(),
        series,
        mark: mark.clone(),
        x_range,
    };
    let line = |name: &str, points: Vec<(f64, f64)>, color| Series { name: name.into(), points, color, dots: true, faint: false };
    let mut out = Vec::new();
    let raw: Vec<f64> = r.steps.iter().map(|s| s.loss).collect();
    if !raw.is_empty() {
        let xs: Vec<f64> = r.steps.iter().map(|s| s.step as f64).collect();
        out.push(chart(
            "Training loss",
            "MSE",
            vec![
                Series { name: "per step".into(), points: xs.iter().copied().zip(raw.iter().copied()).collect(), color: GREY, dots: false, faint: true },
                Series {
                    name: format!("smoothed (EMA {SMOOTHING})"),
                    points: xs.iter().copied().zip(smooth(&raw, SMOOTHING)).collect(),
                    color: BLUE,
                    dots: false,
                    faint: false,
                },
            ],
        ));
    }
    let mut held: Vec<(f64, f64)> = r.heldout_start.map(|l| (0.0, l)).into_iter().collect();
    held.extend(r.evaluations.iter().filter_map(|e| e.heldout.map(|l| (e.step as f64, l))));
    if !held.is_empty() {
        out.push(chart(
            &format!("Held-out loss ({} image(s), fixed timesteps and noise)", r.heldout_images),
            "MSE",
            vec![line("held-out", held, ORANGE)],
        ));
    }
    let suite: Vec<(f64, &crate::train::pick::SuiteScores)> = r.evaluations.iter().filter_map(|e| e.suite.as_ref().map(|s| (e.step as f64, s))).collect();
    type Get = fn(&crate::train::pick::SuiteScores) -> Option<f64>;
    let metrics: [(&str, &str, Get); 4] = [
        ("CLIP mean (clip checks)", "CLIP", |s| s.clip),
        ("Identity mean (identity checks)", "similarity", |s| s.identity),
        ("Diversity mean (diversity checks)", "variety", |s| s.diversity),
        ("Effect mean (abs pixel change vs base)", "mean abs", |s| s.effect),
    ];
    for (title, y, get) in metrics {
        let pts: Vec<(f64, f64)> = suite.iter().filter_map(|(x, s)| get(s).map(|v| (*x, v))).collect();
        if !pts.is_empty() {
            out.push(chart(title, y, vec![line(y, pts, GREEN)]));
        }
    }
    if !suite.is_empty() {
        out.push(chart(
            "Checks passed and failed",
            "checks",
            vec![
                line("passed", suite.iter().map(|(x, s)| (*x, s.passed as f64)).collect(), GREEN),
                line("failed", suite.iter().map(|(x, s)| (*x, s.failed as f64)).collect(), RED),
            ],
        ));
    }
    out
}

/// The pick rules in one line each (by [`PickRule`] order), shown under the choice.
const RULES: [&str; 2] = [
    "Rule (pick: best): checkpoints that pass every check first; then the lowest mean rank over held-out loss (lower is better), CLIP, identity and diversity (higher is better); ties go to the lower held-out loss, then the later step.",
    "Rule (pick: latest-passing): the latest checkpoint that passes every check.",
];

/// The report page.
pub fn to_html(r: &TrainingRun) -> Result<String> {
    let mut h = String::new();
    let trained = r.steps.last().map(|s| s.step).unwrap_or(0);
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>training report · {}</title><style>{STYLE}</style></head><body>",
        esc(r.name)
    );
    let _ = write!(
        h,
        "<header><h1>training report · {}</h1><div>{} · {trained} of {} steps{} · {}{}</div></header><main>",
        esc(r.name),
        esc(r.model),
        r.planned_steps,
        if r.heldout_images > 0 { format!(" · {} held-out image(s), never trained on", r.heldout_images) } else { String::new() },
        r.suite.map(|s| format!("validated by suite <b>{}</b>", esc(s))).unwrap_or_else(|| "no validation suite".into()),
        r.stopped_early.map(|_| " · <b>stopped early</b>").unwrap_or_default(),
    );
    if let Some(why) = r.stopped_early {
        let _ = write!(h, "<div class=\"stopped\" id=\"stopped-early\"><b>Stopped early</b> {}</div>", esc(why));
    }
    let pick_name = match r.pick {
        PickRule::Best => "best",
        PickRule::LatestPassing => "latest-passing",
    };
    let file = r.final_file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match r.choice.step {
        Some(s) => {
            let _ = write!(
                h,
                "<div class=\"pick\" id=\"chosen\"><b>Chosen: step {s}</b>, written as <code>{}</code> (pick: {pick_name}).<br>{}<div class=\"rule\">{}</div></div>",
                esc(&file),
                esc(&r.choice.reason),
                RULES[r.pick as usize]
            );
        }
        None => {
            let _ = write!(h, "<div class=\"pick none\" id=\"chosen\"><b>No checkpoint chosen</b> (pick: {pick_name}): {}</div>", esc(&r.choice.reason));
        }
    }

    h.push_str("<h2>Curves</h2><div class=\"charts\">");
    for c in charts(r) {
        let _ = write!(h, "<figure class=\"chart\">{}</figure>", svg(&c, 460, 260)?);
    }
    h.push_str("</div>");

    let thumbs: Vec<&CheckpointVerdict> = r.verdicts.iter().filter(|v| v.thumbnail.is_some()).collect();
    if let Some((caption, _)) = thumbs.first().and_then(|v| v.thumbnail.as_ref()) {
        let _ = write!(h, "<h2>One prompt per checkpoint</h2><div class=\"prompt\">{}</div><div class=\"thumbs\">", esc(caption));
        for v in &thumbs {
            let (_, img) = v.thumbnail.as_ref().expect("filtered");
            let png = crate::imageio::encode_png_fast(img)?;
            let chosen = Some(v.step) == r.choice.step;
            let _ = write!(
                h,
                "<figure class=\"thumb{}\"><img alt=\"step {}\" src=\"data:image/png;base64,{}\"><figcaption>step {} · <span class=\"{}\">{}</span>{}</figcaption></figure>",
                if chosen { " chosen" } else { "" },
                v.step,
                base64::engine::general_purpose::STANDARD.encode(&png),
                v.step,
                if v.ok() { "pass" } else { "fail" },
                if v.ok() { "pass" } else { "FAIL" },
                if chosen { " · chosen" } else { "" }
            );
        }
        h.push_str("</div>");
    }

    if !r.evaluations.is_empty() {
        h.push_str("<h2>Checkpoints</h2><table><tr><th>checkpoint</th><th>held-out loss</th><th>verdict</th><th>passed</th><th>failed</th><th>CLIP</th><th>identity</th><th>diversity</th><th>effect</th><th>first failure</th></tr>");
        let num = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into());
        for e in r.evaluations {
            let v = r.verdicts.iter().find(|v| v.step == e.step);
            let s = e.suite.as_ref();
            let verdict = match v {
                Some(v) if v.ok() => "<span class=\"pass\">pass</span>",
                Some(_) => "<span class=\"fail\">FAIL</span>",
                None => "–",
            };
            let _ = write!(
                h,
                "<tr{}><td>step {}{}</td><td>{}</td><td>{verdict}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"note\">{}</td></tr>",
                if Some(e.step) == r.choice.step { " class=\"chosen\"" } else { "" },
                e.step,
                if Some(e.step) == r.choice.step { " ← chosen" } else { "" },
                num(e.heldout),
                s.map(|s| s.passed.to_string()).unwrap_or_else(|| "–".into()),
                s.map(|s| s.failed.to_string()).unwrap_or_else(|| "–".into()),
                num(s.and_then(|s| s.clip)),
                num(s.and_then(|s| s.identity)),
                num(s.and_then(|s| s.diversity)),
                num(s.and_then(|s| s.effect)),
                esc(v.and_then(|v| v.failures.first()).map(String::as_str).unwrap_or(""))
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</main></body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_the_console_ema() {
        let s = smooth(&[1.0, 0.0, 0.0], 0.95);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - 0.95).abs() < 1e-12 && (s[2] - 0.9025).abs() < 1e-12);
    }
}
