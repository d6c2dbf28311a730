//! Turning images and scores into pass/fail results, one per check, each with its numbers.

use std::collections::HashMap;

use super::generate::{Generation, stack_key};
use super::scoring::{Embeddings, dot};
use super::{CheckResult, ImageShot, Status};
use crate::error::Result;
use crate::score::pixels::{mean_abs_diff, mean_std, similarity};
use crate::suite::expand::{CasePlan, Plan, VariantPlan};
use crate::suite::{Aggregate, Case, IncompatiblePolicy, Suite, Thresholds, Variant};

/// Everything the checks read.
pub struct Inputs<'a> {
    pub suite: &'a Suite,
    pub plan: &'a Plan,
    pub generation: &'a Generation,
    pub emb: &'a Embeddings,
    pub model_fingerprints: &'a HashMap<crate::suite::ModelRef, String>,
}

fn aggregate(scores: &[f64], how: Aggregate) -> f64 {
    match how {
        Aggregate::Mean => scores.iter().sum::<f64>() / scores.len().max(1) as f64,
        Aggregate::Best => scores.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Aggregate::Min => scores.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

fn agg_name(how: Aggregate) -> &'static str {
    match how {
        Aggregate::Mean => "mean",
        Aggregate::Best => "best",
        Aggregate::Min => "min",
    }
}

/// Shows a raw cosine in the suite's scale.
fn show(t: &Thresholds, cosine: f64) -> String {
    format!("{:.3}", t.clip_scale.apply(cosine))
}

fn result(case: &Case, check: &str, status: Status, message: String) -> CheckResult {
    CheckResult { case: case.name.clone(), check: check.to_string(), status, message, metrics: Vec::new(), shots: Vec::new() }
}

impl Inputs<'_> {
    fn images_ok(&self, v: &VariantPlan) -> bool {
        v.images.iter().chain(&v.controls).all(|&j| self.generation.outcomes[j].image.is_some())
    }

    fn scores(&self, v: &VariantPlan, jobs: &[usize]) -> Vec<f64> {
        jobs.iter().filter_map(|&j| self.emb.text_score(j, &v.score_text)).collect()
    }

    fn shots(&self, case: &Case, v: &VariantPlan) -> Vec<ImageShot> {
        v.images
            .iter()
            .zip(&v.seeds)
            .enumerate()
            .map(|(k, (&j, seed))| ImageShot {
                id: format!("{}-s{seed}", v.label),
                job: j,
                control: v.controls.get(k).copied(),
                caption: format!("{} · seed {seed}", v.label),
                case: case.name.clone(),
                score: self.emb.text_score(j, &v.score_text),
            })
            .collect()
    }
}

/// All checks of the suite, cases in order, then identity groups.
pub fn run_checks(inp: &Inputs) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    for cp in &inp.plan.cases {
        let case = &inp.suite.cases[cp.case];
        out.extend(case_checks(inp, case, cp)?);
    }
    out.extend(identity_group_checks(inp));
    Ok(out)
}

fn case_checks(inp: &Inputs, case: &Case, cp: &CasePlan) -> Result<Vec<CheckResult>> {
    let t = &case.thresholds;
    let mut out = Vec::new();

    // 100 % of LoRA tensors applied, per base model; refusals follow the suite's policy.
    let mut refused: Vec<&str> = Vec::new();
    if !case.adapters.is_empty() {
        let mut seen = Vec::new();
        for v in &cp.variants {
            if v.images.is_empty() || seen.contains(&v.model.name) {
                continue;
            }
            seen.push(v.model.name.clone());
            let job = &inp.plan.jobs[v.images[0]];
            if job.stack.is_empty() {
                continue;
            }
            let sk = stack_key(inp.suite, &inp.model_fingerprints[&v.model], job);
            let name = if cp.variants.iter().any(|x| x.model != v.model) { format!("applied/{}", v.model.name) } else { "applied".into() };
            let policy = inp.suite.incompatible_base;
            let r = match inp.generation.reports.get(&sk) {
                Some(Ok(report)) => {
                    let all = report.entries.iter().all(|e| e.tensors_applied == e.tensors_total);
                    // The stored report may come from another weight of the same files.
                    let msg = report
                        .entries
                        .iter()
                        .map(|e| format!("{}: {} of {} tensors applied ({} of {} modules)", e.name, e.tensors_applied, e.tensors_total, e.modules_applied, e.modules_total))
                        .collect::<Vec<_>>()
                        .join("; ");
                    match (all, policy) {
                        (true, IncompatiblePolicy::Expect) => {
                            result(case, &name, Status::Failed, format!("expected {} to refuse the LoRA, but it applied: {msg}", v.model.name))
                        }
                        (true, _) => result(case, &name, Status::Passed, msg),
                        (false, _) => result(case, &name, Status::Failed, msg),
                    }
                }
                Some(Err(msg)) => {
                    refused.push(v.model.name.as_str());
                    match policy {
                        IncompatiblePolicy::Fail => result(case, &name, Status::Failed, msg.clone()),
                        IncompatiblePolicy::Skip => result(case, &name, Status::Skipped, msg.clone()),
                        IncompatiblePolicy::Expect => result(case, &name, Status::Passed, format!("refused as expected: {msg}")),
                    }
                }
                None => result(case, &name, Status::Error, "no LoRA application report was produced".into()),
            };
            out.push(r);
        }
    }
    let usable: Vec<&VariantPlan> = cp.variants.iter().filter(|v| inp.images_ok(v)).collect();
    if usable.is_empty() {
        out.push(result(case, "images", Status::Skipped, format!("no images: the LoRA stack could not be applied to {}", refused.join(", "))));
        return Ok(out);
    }

    // No NaN, black or blank images.
    let mut bad = Vec::new();
    let mut total = 0;
    for v in &usable {
        for (&j, seed) in v.images.iter().chain(&v.controls).zip(v.seeds.iter().cycle()) {
            total += 1;
            let o = &inp.generation.outcomes[j];
            let img = o.image.as_ref().expect("usable");
            let (mean, std) = mean_std(img);
            if o.had_nan {
                bad.push(format!("{} seed {seed}: NaN during denoising", v.label));
            } else if mean < 0.02 && std < t.blank {
                bad.push(format!("{} seed {seed}: black (mean {mean:.3})", v.label));
            } else if std < t.blank {
                bad.push(format!("{} seed {seed}: blank (pixel std {std:.4} < {})", v.label, t.blank));
            }
        }
    }
    out.push(if bad.is_empty() {
        result(case, "sanity", Status::Passed, format!("{total} images: no NaN, black or blank image"))
    } else {
        result(case, "sanity", Status::Failed, format!("{} of {total} images are broken: {}", bad.len(), bad.join("; ")))
    });

    let how = t.clip_aggregate;
    match &case.variant {
        Variant::Single | Variant::BaseSwap | Variant::Ladder { .. } => {
            for v in &usable {
                let scores = inp.scores(v, &v.images);
                let s = aggregate(&scores, how);
                let name = match &case.variant {
                    Variant::Ladder { .. } => format!("clip@{}", v.label),
                    _ if usable.len() > 1 || cp.variants.len() > 1 => format!("clip/{}", v.label),
                    _ => "clip".to_string(),
                };
                let status = if s >= v.floor { Status::Passed } else { Status::Failed };
                let mut r = result(
                    case,
                    &name,
                    status,
                    format!(
                        "CLIP {} over {} seeds {} {} floor {} ({}; text: {:?})",
                        agg_name(how),
                        scores.len(),
                        show(t, s),
                        if status == Status::Passed { "≥" } else { "<" },
                        show(t, v.floor),
                        t.clip_scale.describe(),
                        v.score_text
                    ),
                );
                r.metrics = vec![("clip".into(), t.clip_scale.apply(s)), ("floor".into(), t.clip_scale.apply(v.floor))];
                r.shots = inp.shots(case, v);
                out.push(r);
            }
        }
        Variant::WordOrder { .. } => {
            // The prompt-adherence floor holds for every order; the worst order is reported.
            let per: Vec<(f64, &VariantPlan)> = usable.iter().map(|v| (aggregate(&inp.scores(v, &v.images), how), *v)).collect();
            let (worst, wv) = per.iter().copied().fold((f64::INFINITY, usable[0]), |a, b| if b.0 < a.0 { b } else { a });
            let status = if worst >= case.thresholds.clip_floor { Status::Passed } else { Status::Failed };
            let mut r = result(
                case,
                "clip",
                status,
                format!("CLIP {} of the worst of {} tag orders {} (floor {}, {}): {:?}", agg_name(how), per.len(), show(t, worst), show(t, t.clip_floor), t.clip_scale.describe(), wv.prompt),
            );
            r.metrics = vec![("clip_worst_order".into(), t.clip_scale.apply(worst))];
            out.push(r);
            // Consistency: every order against the order as written, seed by seed.
            let first = usable[0];
            let mut worst_sim = (1.0f64, String::new());
            let mut sims = Vec::new();
            for v in &usable[1..] {
                for ((&a, &b), seed) in first.images.iter().zip(&v.images).zip(&v.seeds) {
                    let (ia, ib) = (inp.generation.outcomes[a].image.as_ref().expect("usable"), inp.generation.outcomes[b].image.as_ref().expect("usable"));
                    let s = similarity(ia, ib)?;
                    sims.push(s);
                    if s < worst_sim.0 {
                        worst_sim = (s, format!("{:?} (seed {seed})", v.prompt));
                    }
                }
            }
            let mean = sims.iter().sum::<f64>() / sims.len().max(1) as f64;
            let status = if worst_sim.0 >= t.word_order { Status::Passed } else { Status::Failed };
            let mut r = result(
                case,
                "word-order",
                status,
                format!(
                    "image similarity across {} tag orders: min {:.3}, mean {mean:.3} (floor {:.3}); least similar: {}",
                    usable.len(),
                    worst_sim.0,
                    t.word_order,
                    if worst_sim.1.is_empty() { "-".into() } else { worst_sim.1.clone() }
                ),
            );
            r.metrics = vec![("similarity_min".into(), worst_sim.0), ("similarity_mean".into(), mean)];
            r.shots = usable.iter().flat_map(|v| inp.shots(case, v).into_iter().take(1)).collect();
            out.push(r);
        }
        Variant::Sweep { adapter, .. } => {
            let nominal = case.adapters[*adapter].weight;
            let mut curve: Vec<(f64, f64)> = usable.iter().filter_map(|v| Some((v.weight?, aggregate(&inp.scores(v, &v.images), how)))).collect();
            curve.sort_by(|a, b| a.0.total_cmp(&b.0));
            let critical = curve.iter().find(|(_, s)| *s < case.thresholds.clip_floor).map(|(w, _)| *w);
            let shown: Vec<String> = curve.iter().map(|(w, s)| format!("{w}: {}", show(t, *s))).collect();
            let fails_in_use = critical.is_some_and(|c| c <= nominal);
            let mut r = result(
                case,
                "sweep",
                if fails_in_use { Status::Failed } else { Status::Passed },
                format!(
                    "CLIP by weight {} (floor {}); {}",
                    shown.join(", "),
                    show(t, t.clip_floor),
                    match critical {
                        Some(c) => format!("falls under the floor at weight {c} (the suite uses {nominal})"),
                        None => "stays above the floor at every weight".into(),
                    }
                ),
            );
            r.metrics = curve.iter().map(|(w, s)| (format!("clip@w{w}"), t.clip_scale.apply(*s))).collect();
            if let Some(c) = critical {
                r.metrics.push(("critical_weight".into(), c));
            }
            r.shots = usable.iter().flat_map(|v| inp.shots(case, v).into_iter().take(1)).collect();
            out.push(r);
            // Weight 0 must reproduce the base render.
            if let Some(v0) = usable.iter().find(|v| v.weight == Some(0.0))
                && v0.controls.len() == v0.images.len() && !v0.controls.is_empty() {
                    let mut worst = 0.0f64;
                    for (&a, &b) in v0.images.iter().zip(&v0.controls) {
                        let d = mean_abs_diff(inp.generation.outcomes[a].image.as_ref().expect("usable"), inp.generation.outcomes[b].image.as_ref().expect("usable"))?;
                        worst = worst.max(d);
                    }
                    let status = if worst <= t.sweep_zero { Status::Passed } else { Status::Failed };
                    let mut r = result(
                        case,
                        "sweep-zero",
                        status,
                        format!("weight 0 against the base render: mean abs difference {:.5} ({:.2}/255; limit {:.2}/255)", worst, worst * 255.0, t.sweep_zero * 255.0),
                    );
                    r.metrics = vec![("mean_abs_diff".into(), worst)];
                    out.push(r);
                }
        }
        Variant::Bisect { .. } => {
            let scored: Vec<(&VariantPlan, f64)> = usable.iter().map(|v| (*v, aggregate(&inp.scores(v, &v.images), how))).collect();
            let curve: Vec<String> = scored.iter().map(|(v, s)| format!("{}: {}", v.added.as_deref().unwrap_or("(base)"), show(t, *s))).collect();
            let first_bad = scored.iter().find(|(_, s)| *s < case.thresholds.clip_floor);
            let (status, msg) = match first_bad {
                None => (Status::Passed, format!("every prefix stays above the floor {}: {}", show(t, t.clip_floor), curve.join(", "))),
                Some((v, s)) => match &v.added {
                    None => (Status::Failed, format!("the base prompt already scores {} < floor {}: {}", show(t, *s), show(t, t.clip_floor), curve.join(", "))),
                    Some(w) => (Status::Failed, format!("the score falls under the floor {} after adding {w:?} ({}): {}", show(t, t.clip_floor), show(t, *s), curve.join(", "))),
                },
            };
            let mut r = result(case, "bisect", status, msg);
            r.metrics = scored.iter().map(|(v, s)| (format!("clip{}", v.label), t.clip_scale.apply(*s))).collect();
            r.shots = usable.iter().flat_map(|v| inp.shots(case, v).into_iter().take(1)).collect();
            out.push(r);
        }
    }

    // Against the no-LoRA control: prompt adherence must not drop, and the LoRA must do something.
    let with_control: Vec<&&VariantPlan> = usable.iter().filter(|v| !v.controls.is_empty()).collect();
    if !with_control.is_empty() && !matches!(case.variant, Variant::Sweep { .. }) {
        let mut worst_drop = (f64::NEG_INFINITY, String::new());
        let mut effects = Vec::new();
        for v in &with_control {
            let lora = aggregate(&inp.scores(v, &v.images), how);
            let control = aggregate(&inp.scores(v, &v.controls), how);
            if control - lora > worst_drop.0 {
                worst_drop = (control - lora, format!("{}: {} with the LoRA vs {} without", v.label, show(t, lora), show(t, control)));
            }
            for (&a, &b) in v.images.iter().zip(&v.controls) {
                effects.push(mean_abs_diff(inp.generation.outcomes[a].image.as_ref().expect("usable"), inp.generation.outcomes[b].image.as_ref().expect("usable"))?);
            }
        }
        let status = if worst_drop.0 <= case.thresholds.control_drop { Status::Passed } else { Status::Failed };
        let mut r = result(
            case,
            "control",
            status,
            format!("largest CLIP drop against the no-LoRA control {} (allowed {}; {})", show(t, worst_drop.0.max(0.0)), show(t, t.control_drop), worst_drop.1),
        );
        r.metrics = vec![("drop".into(), t.clip_scale.apply(worst_drop.0))];
        out.push(r);
        let effect = effects.iter().sum::<f64>() / effects.len().max(1) as f64;
        let mut r = match t.leak {
            // A prompt the LoRA should leave alone (no trigger word): small is good.
            Some(max) => {
                let status = if effect <= max { Status::Passed } else { Status::Failed };
                let verdict = if status == Status::Passed { "leaves the images alone" } else { "leaks into a prompt it should not touch" };
                result(case, "leak", status, format!("the LoRA {verdict}: it changes them by {:.4} mean abs ({:.1}/255; allowed {:.4})", effect, effect * 255.0, max))
            }
            None => {
                let status = if effect >= t.effect { Status::Passed } else { Status::Failed };
                result(
                    case,
                    "effect",
                    status,
                    if status == Status::Passed {
                        format!("the LoRA changes the images by {:.4} mean abs ({:.1}/255; needs {:.4})", effect, effect * 255.0, t.effect)
                    } else {
                        format!("the LoRA changes the images by only {:.4} mean abs ({:.2}/255; needs {:.4}): it does next to nothing", effect, effect * 255.0, t.effect)
                    },
                )
            }
        };
        r.metrics = vec![("mean_abs_diff".into(), effect)];
        r.shots = with_control.iter().flat_map(|v| inp.shots(case, v).into_iter().take(1)).collect();
        out.push(r);
    }

    // Identity against reference images.
    if !case.references.is_empty() {
        let refs: Vec<&Vec<f32>> = case.references.iter().filter_map(|p| inp.emb.references.get(p)).collect();
        let mut per_image = Vec::new();
        for v in &usable {
            for &j in &v.images {
                if let Some(e) = &inp.emb.images[j] {
                    per_image.push(refs.iter().map(|r| dot(e, r)).sum::<f64>() / refs.len().max(1) as f64);
                }
            }
        }
        let mean = per_image.iter().sum::<f64>() / per_image.len().max(1) as f64;
        let min = per_image.iter().copied().fold(f64::INFINITY, f64::min);
        let status = if mean >= t.identity { Status::Passed } else { Status::Failed };
        let mut r = result(
            case,
            "identity",
            status,
            format!("CLIP image–image cosine to {} reference images: mean {mean:.3}, min {min:.3} (floor {:.3})", refs.len(), t.identity),
        );
        r.metrics = vec![("identity_mean".into(), mean), ("identity_min".into(), min)];
        out.push(r);
    }
    Ok(out)
}

fn identity_group_checks(inp: &Inputs) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for g in &inp.suite.identity_groups {
        let members: Vec<(&Case, Vec<usize>)> = g
            .cases
            .iter()
            .filter_map(|name| {
                let ci = inp.suite.cases.iter().position(|c| &c.name == name)?;
                let cp = inp.plan.cases.iter().find(|p| p.case == ci)?;
                let jobs: Vec<usize> = cp.variants.iter().flat_map(|v| v.images.iter().copied()).filter(|&j| inp.emb.images[j].is_some()).collect();
                Some((&inp.suite.cases[ci], jobs))
            })
            .collect();
        let floor = members.first().map(|(c, _)| c.thresholds.identity).unwrap_or(0.8);
        let mut worst = (f64::INFINITY, String::new());
        let mut all = Vec::new();
        for i in 0..members.len() {
            for k in i + 1..members.len() {
                let (a, b) = (&members[i], &members[k]);
                let sims: Vec<f64> = a.1.iter().flat_map(|&x| b.1.iter().filter_map(move |&y| inp.emb.image_image(x, y))).collect();
                if sims.is_empty() {
                    continue;
                }
                let m = sims.iter().sum::<f64>() / sims.len() as f64;
                all.push(m);
                if m < worst.0 {
                    worst = (m, format!("{} vs {}", a.0.name, b.0.name));
                }
            }
        }
        let name = format!("identity-group/{}", g.name);
        let r = if all.is_empty() {
            CheckResult { case: g.name.clone(), check: name, status: Status::Skipped, message: "no images to compare".into(), metrics: vec![], shots: vec![] }
        } else {
            let status = if worst.0 >= floor { Status::Passed } else { Status::Failed };
            CheckResult {
                case: g.name.clone(),
                check: name,
                status,
                message: format!(
                    "CLIP image–image cosine between the cases {}: lowest pair {} at {:.3} (floor {floor:.3})",
                    g.cases.join(", "),
                    worst.1,
                    worst.0
                ),
                metrics: vec![("identity_min_pair".into(), worst.0)],
                shots: vec![],
            }
        };
        out.push(r);
    }
    out
}
