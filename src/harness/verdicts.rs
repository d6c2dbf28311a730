//! Numbers → verdicts, one [`CheckResult`] per check, each with its numbers in words.
//!
//! Every function here is pure: it reads measured numbers ([`super::measure`]) and thresholds,
//! never images, so every failure path is tested on synthetic numbers below.
//!
//! The verdict model (docs/checks-and-verdicts.md, "Verdicts"):
//! - absolute checks (floors, control, effect, leak, per seed) fail when a number is out of
//!   bounds;
//! - relative checks (word order, identity, identity groups, diversity) compare the LoRA with
//!   the no-LoRA control and fail when the LoRA is worse than the base model by more than a
//!   margin, reporting both figures;
//! - a seed's miss, and in prompt sets a prompt's, is judged against the accepted version
//!   ([`settle_misses`]);
//! - `regression`, `slice`, `identity/accepted` and `misses` are statistical and judged
//!   run-wide ([`super::run_verdicts`]);
//! - `baseline` fails when pixels changed while the inputs did not (the environment moved
//!   them), and asks for review when the inputs changed.

use super::measure::{AppliedNumbers, CaseNumbers, GroupNumbers, MemorizationNumbers, StackNumbers, VariantNumbers};
use super::{CheckResult, Status};
use crate::baseline::scores::ScoreBaseline;
use crate::suite::{Aggregate, Case, IncompatiblePolicy, Thresholds, Variant};

/// What a case asks of its numbers.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub case: &'a str,
    pub t: &'a Thresholds,
    pub incompatible_base: IncompatiblePolicy,
    pub kind: Kind,
}

/// The case's variant, as far as verdicts care.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Single,
    BaseSwap,
    WordOrder,
    Ladder,
    /// The weight the suite uses for the swept LoRA.
    Sweep { nominal: f64 },
    Bisect,
    Stack,
    /// A prompt matrix or prompt file: every prompt is checked like a case of its own.
    Prompts,
}

impl<'a> Rules<'a> {
    pub fn of(case: &'a Case, incompatible_base: IncompatiblePolicy) -> Self {
        let kind = match &case.variant {
            Variant::Single => Kind::Single,
            Variant::BaseSwap => Kind::BaseSwap,
            Variant::WordOrder { .. } => Kind::WordOrder,
            Variant::Ladder { .. } => Kind::Ladder,
            Variant::Sweep { adapter, .. } => Kind::Sweep { nominal: case.adapters[*adapter].weight },
            Variant::Bisect { .. } => Kind::Bisect,
            Variant::Stack { .. } => Kind::Stack,
            Variant::Prompts { .. } => Kind::Prompts,
        };
        Rules { case: case.name.as_str(), t: &case.thresholds, incompatible_base, kind }
    }

    fn result(&self, check: &str, status: Status, message: String) -> CheckResult {
        CheckResult { case: self.case.to_string(), check: check.to_string(), status, message, metrics: Vec::new(), scorer: String::new() }
    }

    /// A raw cosine in the suite's scale.
    fn show(&self, cosine: f64) -> String {
        format!("{:.3}", self.t.clip_scale.apply(cosine))
    }
}

fn pass_if(ok: bool) -> Status {
    if ok { Status::Passed } else { Status::Failed }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

pub fn aggregate(scores: &[f64], how: Aggregate) -> f64 {
    match how {
        Aggregate::Mean => mean(scores),
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

fn clips(v: &VariantNumbers) -> Vec<f64> {
    v.seeds.iter().map(|s| s.clip).collect()
}

/// Every check of one case that its own numbers decide.
pub fn case_verdicts(r: &Rules, n: &CaseNumbers) -> Vec<CheckResult> {
    let mut out: Vec<CheckResult> = n.applied.iter().map(|a| applied(r, a)).collect();
    if n.variants.is_empty() {
        let why = if n.refused.is_empty() { "no images were produced".to_string() } else { format!("the LoRA stack could not be applied to {}", n.refused.join(", ")) };
        out.push(r.result("images", Status::Skipped, format!("no images: {why}")));
        return out;
    }
    out.push(sanity(r, n));
    out.extend(clip(r, &n.variants));
    if r.t.per_seed && !matches!(r.kind, Kind::Sweep { .. } | Kind::Bisect) {
        out.push(per_seed(r, &n.variants));
    }
    match r.kind {
        Kind::WordOrder => out.push(word_order(r, &n.variants)),
        Kind::Sweep { nominal } => out.extend(sweep(r, &n.variants, nominal)),
        Kind::Bisect => out.push(bisect(r, &n.variants)),
        _ => {}
    }
    if !matches!(r.kind, Kind::Sweep { .. }) && n.variants.iter().any(|v| v.seeds.iter().any(|s| s.clip_control.is_some())) {
        out.extend(control_and_effect(r, &n.variants));
    }
    if n.references > 0 {
        out.push(identity(r, n));
    }
    if let Some(a) = aesthetic(r, &n.variants) {
        out.push(a);
    }
    if let Some(d) = diversity(r, &n.variants) {
        out.push(d);
    }
    if let Some(s) = &n.stack {
        out.push(stack(r, s));
    }
    out
}

/// 100 % of every LoRA's tensors applied; refusals follow the suite's policy.
pub fn applied(r: &Rules, a: &AppliedNumbers) -> CheckResult {
    let name = if a.per_model { format!("applied/{}", a.model) } else { "applied".into() };
    let mut lines: Vec<String> = Vec::new();
    let mut incomplete = false;
    let mut refusal: Option<String> = None;
    let mut missing = false;
    for o in &a.outcomes {
        match o {
            Some(Ok(report)) => {
                for e in &report.entries {
                    incomplete |= e.tensors_applied != e.tensors_total;
                    let line = format!("{}: {} of {} tensors applied ({} of {} modules)", e.name, e.tensors_applied, e.tensors_total, e.modules_applied, e.modules_total);
                    if !lines.contains(&line) {
                        lines.push(line);
                    }
                }
            }
            Some(Err(msg)) => refusal = Some(msg.clone()),
            None => missing = true,
        }
    }
    let msg = lines.join("; ");
    if missing {
        return r.result(&name, Status::Error, "no LoRA application report was produced".into());
    }
    match (refusal, r.incompatible_base) {
        (Some(m), IncompatiblePolicy::Fail) => r.result(&name, Status::Failed, m),
        (Some(m), IncompatiblePolicy::Skip) => r.result(&name, Status::Skipped, m),
        (Some(m), IncompatiblePolicy::Expect) => r.result(&name, Status::Passed, format!("refused as expected: {m}")),
        (None, _) if incomplete => r.result(&name, Status::Failed, msg),
        (None, IncompatiblePolicy::Expect) => r.result(&name, Status::Failed, format!("expected {} to refuse the LoRA, but it applied: {msg}", a.model)),
        (None, _) => r.result(&name, Status::Passed, msg),
    }
}

pub fn sanity(r: &Rules, n: &CaseNumbers) -> CheckResult {
    if n.broken.is_empty() {
        r.result("sanity", Status::Passed, format!("{} images: no NaN, black or blank image", n.images))
    } else {
        r.result("sanity", Status::Failed, format!("{} of {} images are broken: {}", n.broken.len(), n.images, n.broken.join("; ")))
    }
}

/// The CLIP floor on the aggregate over seeds: per variant, or the worst tag order.
pub fn clip(r: &Rules, variants: &[VariantNumbers]) -> Vec<CheckResult> {
    let t = r.t;
    let how = t.clip_aggregate;
    match r.kind {
        Kind::Single | Kind::BaseSwap | Kind::Ladder | Kind::Stack | Kind::Prompts => variants
            .iter()
            .map(|v| {
                let scores = clips(v);
                let s = aggregate(&scores, how);
                let name = match r.kind {
                    Kind::Ladder => format!("clip@{}", v.label),
                    _ if variants.len() > 1 => format!("clip/{}", v.label),
                    _ => "clip".to_string(),
                };
                let ok = s >= v.floor;
                let mut res = r.result(
                    &name,
                    pass_if(ok),
                    format!(
                        "CLIP {} over {} seeds {} {} floor {} ({}; text: {:?})",
                        agg_name(how),
                        scores.len(),
                        r.show(s),
                        if ok { "≥" } else { "<" },
                        r.show(v.floor),
                        t.clip_scale.describe(),
                        v.score_text
                    ),
                );
                res.metrics = vec![("clip".into(), t.clip_scale.apply(s)), ("floor".into(), t.clip_scale.apply(v.floor))];
                res
            })
            .collect(),
        Kind::WordOrder => {
            // The floor holds for every order; the worst order is reported.
            let (worst, wv) = variants.iter().map(|v| (aggregate(&clips(v), how), v)).fold((f64::INFINITY, &variants[0]), |a, b| if b.0 < a.0 { b } else { a });
            let mut res = r.result(
                "clip",
                pass_if(worst >= t.clip_floor),
                format!("CLIP {} of the worst of {} tag orders {} (floor {}, {}): {:?}", agg_name(how), variants.len(), r.show(worst), r.show(t.clip_floor), t.clip_scale.describe(), wv.prompt),
            );
            res.metrics = vec![("clip_worst_order".into(), t.clip_scale.apply(worst))];
            vec![res]
        }
        Kind::Sweep { .. } | Kind::Bisect => Vec::new(),
    }
}

/// Floors and control drops seed by seed: a melted seed is named even when the mean passes.
pub fn per_seed(r: &Rules, variants: &[VariantNumbers]) -> CheckResult {
    let t = r.t;
    let mut bad = Vec::new();
    let mut total = 0;
    for v in variants {
        for s in &v.seeds {
            total += 1;
            // A NaN score fails too.
            if s.clip.partial_cmp(&v.floor).is_none_or(|o| o == std::cmp::Ordering::Less) {
                bad.push(format!("{} seed {}: CLIP {} < floor {}", v.label, s.seed, r.show(s.clip), r.show(v.floor)));
            } else if let Some(c) = s.clip_control
                && c - s.clip > t.control_drop
            {
                bad.push(format!("{} seed {}: CLIP {} drops {} below its control {} (allowed {})", v.label, s.seed, r.show(s.clip), r.show(c - s.clip), r.show(c), r.show(t.control_drop)));
            }
        }
    }
    let mut res = if bad.is_empty() {
        r.result("per-seed", Status::Passed, format!("all {total} seeds hold the floor and the control drop on their own"))
    } else {
        r.result("per-seed", Status::Failed, format!("{} of {total} seeds fail on their own, whatever the {}: {}", bad.len(), agg_name(t.clip_aggregate), bad.join("; ")))
    };
    res.metrics = vec![("seeds_failed".into(), bad.len() as f64)];
    res
}

/// Every tag order stays similar to the order as written, judged against the base model: the
/// worst order must hold the floor unless the base model misses it too, and the LoRA's
/// similarities, paired with the base model's by order and seed, must not be lower on average
/// by more than the margin.
pub fn word_order(r: &Rules, variants: &[VariantNumbers]) -> CheckResult {
    let t = r.t;
    let mut lora: Vec<(f64, String)> = Vec::new();
    let mut base: Vec<f64> = Vec::new();
    let mut paired: Vec<f64> = Vec::new();
    for v in variants.iter().skip(1) {
        for s in &v.seeds {
            if let Some(x) = s.order_similarity {
                lora.push((x, format!("{:?} (seed {})", v.prompt, s.seed)));
                if let Some(b) = s.order_similarity_control {
                    paired.push(x - b);
                }
            }
            base.extend(s.order_similarity_control);
        }
    }
    let (min, worst) = lora.iter().cloned().fold((1.0f64, String::from("-")), |a, b| if b.0 < a.0 { b } else { a });
    let lora_mean = mean(&lora.iter().map(|x| x.0).collect::<Vec<_>>());
    let base_min = (!base.is_empty() && paired.len() == lora.len()).then(|| base.iter().copied().fold(1.0f64, f64::min));
    let what = format!("image similarity across {} tag orders: min {min:.3}, mean {lora_mean:.3}", variants.len());
    let mut res = match base_min {
        None => r.result("word-order", pass_if(min >= t.word_order), format!("{what} (floor {:.3}); least similar: {worst}", t.word_order)),
        Some(b) => {
            let gap = mean(&paired);
            let worse_than_base = gap < -t.relative_margin;
            let below_floor_alone = min < t.word_order && b >= t.word_order;
            let note = if b < t.word_order && !worse_than_base {
                "; the base model is itself order-sensitive here, so the LoRA is judged against it"
            } else if worse_than_base {
                "; the LoRA makes the prompt more order-sensitive than the base model"
            } else {
                ""
            };
            let base_mean = mean(&base);
            r.result(
                "word-order",
                pass_if(!worse_than_base && !below_floor_alone),
                format!(
                    "{what} (floor {:.3}); without the LoRA min {b:.3}, mean {base_mean:.3}; LoRA − base {gap:+.3} on average (margin {:.3}){note}; least similar: {worst}",
                    t.word_order, t.relative_margin
                ),
            )
        }
    };
    res.metrics = vec![("similarity_min".into(), min), ("similarity_mean".into(), lora_mean)];
    if let Some(b) = base_min {
        res.metrics.push(("similarity_min_control".into(), b));
        res.metrics.push(("similarity_gap".into(), mean(&paired)));
    }
    res
}

/// The CLIP curve over weights, and weight 0 against the base render.
pub fn sweep(r: &Rules, variants: &[VariantNumbers], nominal: f64) -> Vec<CheckResult> {
    let t = r.t;
    let how = t.clip_aggregate;
    let mut curve: Vec<(f64, f64)> = variants.iter().filter_map(|v| Some((v.weight?, aggregate(&clips(v), how)))).collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let critical = curve.iter().find(|(_, s)| *s < t.clip_floor).map(|(w, _)| *w);
    let shown: Vec<String> = curve.iter().map(|(w, s)| format!("{w}: {}", r.show(*s))).collect();
    let fails_in_use = critical.is_some_and(|c| c <= nominal);
    let mut res = r.result(
        "sweep",
        pass_if(!fails_in_use),
        format!(
            "CLIP by weight {} (floor {}); {}",
            shown.join(", "),
            r.show(t.clip_floor),
            match critical {
                Some(c) => format!("falls under the floor at weight {c} (the suite uses {nominal})"),
                None => "stays above the floor at every weight".into(),
            }
        ),
    );
    res.metrics = curve.iter().map(|(w, s)| (format!("clip@w{w}"), t.clip_scale.apply(*s))).collect();
    if let Some(c) = critical {
        res.metrics.push(("critical_weight".into(), c));
    }
    let mut out = vec![res];
    if let Some(v0) = variants.iter().find(|v| v.weight == Some(0.0)) {
        let diffs: Vec<f64> = v0.seeds.iter().filter_map(|s| s.effect).collect();
        if diffs.len() == v0.seeds.len() && !diffs.is_empty() {
            let worst = diffs.iter().copied().fold(0.0f64, f64::max);
            let mut z = r.result(
                "sweep-zero",
                pass_if(worst <= t.sweep_zero),
                format!("weight 0 against the base render: mean abs difference {:.5} ({:.2}/255; limit {:.2}/255)", worst, worst * 255.0, t.sweep_zero * 255.0),
            );
            z.metrics = vec![("mean_abs_diff".into(), worst)];
            out.push(z);
        }
    }
    out
}

/// The first added word after which the score falls under the floor.
pub fn bisect(r: &Rules, variants: &[VariantNumbers]) -> CheckResult {
    let t = r.t;
    let scored: Vec<(&VariantNumbers, f64)> = variants.iter().map(|v| (v, aggregate(&clips(v), t.clip_aggregate))).collect();
    let curve: Vec<String> = scored.iter().map(|(v, s)| format!("{}: {}", v.added.as_deref().unwrap_or("(base)"), r.show(*s))).collect();
    let (status, msg) = match scored.iter().find(|(_, s)| *s < t.clip_floor) {
        None => (Status::Passed, format!("every prefix stays above the floor {}: {}", r.show(t.clip_floor), curve.join(", "))),
        Some((v, s)) => match &v.added {
            None => (Status::Failed, format!("the base prompt already scores {} < floor {}: {}", r.show(*s), r.show(t.clip_floor), curve.join(", "))),
            Some(w) => (Status::Failed, format!("the score falls under the floor {} after adding {w:?} ({}): {}", r.show(t.clip_floor), r.show(*s), curve.join(", "))),
        },
    };
    let mut res = r.result("bisect", status, msg);
    res.metrics = scored.iter().map(|(v, s)| (format!("clip{}", v.label), t.clip_scale.apply(*s))).collect();
    res
}

/// Against the no-LoRA control: prompt adherence must not drop, and the LoRA must do
/// something (or, for a prompt it must leave alone, next to nothing).
pub fn control_and_effect(r: &Rules, variants: &[VariantNumbers]) -> Vec<CheckResult> {
    let t = r.t;
    let how = t.clip_aggregate;
    let mut worst_drop = (f64::NEG_INFINITY, String::new());
    let mut effects = Vec::new();
    for v in variants {
        let controls: Vec<f64> = v.seeds.iter().filter_map(|s| s.clip_control).collect();
        if controls.len() != v.seeds.len() || controls.is_empty() {
            continue;
        }
        let lora = aggregate(&clips(v), how);
        let control = aggregate(&controls, how);
        if control - lora > worst_drop.0 {
            worst_drop = (control - lora, format!("{}: {} with the LoRA vs {} without", v.label, r.show(lora), r.show(control)));
        }
        effects.extend(v.seeds.iter().filter_map(|s| s.effect));
    }
    let mut c = r.result(
        "control",
        pass_if(worst_drop.0 <= t.control_drop),
        format!("largest CLIP drop against the no-LoRA control {} (allowed {}; {})", r.show(worst_drop.0.max(0.0)), r.show(t.control_drop), worst_drop.1),
    );
    c.metrics = vec![("drop".into(), t.clip_scale.apply(worst_drop.0))];
    let effect = mean(&effects);
    let mut e = match t.leak {
        Some(max) => {
            let ok = effect <= max;
            let verdict = if ok { "leaves the images alone" } else { "leaks into a prompt it should not touch" };
            r.result("leak", pass_if(ok), format!("the LoRA {verdict}: it changes them by {:.4} mean abs ({:.1}/255; allowed {:.4})", effect, effect * 255.0, max))
        }
        None => {
            let ok = effect >= t.effect;
            r.result(
                "effect",
                pass_if(ok),
                if ok {
                    format!("the LoRA changes the images by {:.4} mean abs ({:.1}/255; needs {:.4})", effect, effect * 255.0, t.effect)
                } else {
                    format!("the LoRA changes the images by only {:.4} mean abs ({:.2}/255; needs {:.4}): it does next to nothing", effect, effect * 255.0, t.effect)
                },
            )
        }
    };
    e.metrics = vec![("mean_abs_diff".into(), effect)];
    vec![c, e]
}

/// Image–image cosine (of the identity scorer) to the references: an absolute floor, and no
/// worse than the base model by more than the margin. With several references it names the
/// nearest.
pub fn identity(r: &Rules, n: &CaseNumbers) -> CheckResult {
    let t = r.t;
    let lora: Vec<f64> = n.variants.iter().flat_map(|v| v.seeds.iter().filter_map(|s| s.identity)).collect();
    let base: Vec<f64> = n.variants.iter().flat_map(|v| v.seeds.iter().filter_map(|s| s.identity_control)).collect();
    let m = mean(&lora);
    let min = lora.iter().copied().fold(f64::INFINITY, f64::min);
    let nearest = n.reference_means.iter().max_by(|a, b| a.1.total_cmp(&b.1));
    let nearest_note = match nearest {
        Some((name, v)) if n.reference_means.len() > 1 => format!("; nearest reference {name} ({v:.3})"),
        _ => String::new(),
    };
    let head = format!("image–image cosine to {} reference images: mean {m:.3}, min {min:.3} (floor {:.3}){nearest_note}", n.references, t.identity);
    let mut res = if base.is_empty() {
        r.result("identity", pass_if(m >= t.identity), head)
    } else {
        let b = mean(&base);
        let worse = m < b - t.relative_margin;
        let why = if worse { format!("; the LoRA makes the images less like the references than the base model ({b:.3}, margin {:.3})", t.relative_margin) } else { format!("; without the LoRA {b:.3}") };
        let mut res = r.result("identity", pass_if(m >= t.identity && !worse), format!("{head}{why}"));
        res.metrics.push(("identity_mean_control".into(), b));
        res
    };
    res.metrics.splice(0..0, [("identity_mean".into(), m), ("identity_min".into(), min)]);
    if let Some((_, v)) = nearest {
        res.metrics.push(("identity_nearest_reference".into(), *v));
    }
    res
}

/// The aesthetic predictor's score: each variant's mean over its seeds above the floor (when
/// one is set), and no lower than the no-LoRA control's by more than `aesthetic_drop`.
pub fn aesthetic(r: &Rules, variants: &[VariantNumbers]) -> Option<CheckResult> {
    let t = r.t;
    let mut scored = Vec::new();
    for v in variants {
        let lora: Vec<f64> = v.seeds.iter().filter_map(|s| s.aesthetic).collect();
        if lora.is_empty() || lora.len() != v.seeds.len() {
            continue;
        }
        let control: Vec<f64> = v.seeds.iter().filter_map(|s| s.aesthetic_control).collect();
        scored.push((v.label.as_str(), mean(&lora), (control.len() == lora.len()).then(|| mean(&control))));
    }
    let (low_label, low, _) = *scored.iter().min_by(|a, b| a.1.total_cmp(&b.1))?;
    let drop = scored.iter().filter_map(|&(l, s, c)| Some((l, c? - s, s, c?))).max_by(|a, b| a.1.total_cmp(&b.1));
    let below = t.aesthetic_floor.is_some_and(|f| low < f);
    let dropped = drop.is_some_and(|d| d.1 > t.aesthetic_drop);
    let floor = t.aesthetic_floor.map(|f| format!("floor {f:.2}")).unwrap_or_else(|| "no floor".into());
    let drop_text = match drop {
        Some((l, d, s, c)) => format!("largest drop against the no-LoRA control {:.2} ({l}: {s:.2} with the LoRA vs {c:.2} without; allowed {:.2})", d.max(0.0), t.aesthetic_drop),
        None => "no control to compare with".into(),
    };
    let mut res = r.result("aesthetic", pass_if(!below && !dropped), format!("aesthetic score: lowest variant mean {low:.2} ({low_label}; {floor}); {drop_text}"));
    res.metrics.push(("aesthetic_min".into(), low));
    if let Some((_, d, _, _)) = drop {
        res.metrics.push(("aesthetic_drop".into(), d));
    }
    Some(res)
}

/// Collapse: the LoRA must keep a share of the base model's seed-to-seed variety.
pub fn diversity(r: &Rules, variants: &[VariantNumbers]) -> Option<CheckResult> {
    let t = r.t;
    let pairs: Vec<(f64, f64)> = variants.iter().filter_map(|v| Some((v.seed_similarity?, v.seed_similarity_control?))).collect();
    if pairs.is_empty() {
        return None;
    }
    let lora = 1.0 - mean(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let base = 1.0 - mean(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let mut res = if base < 1e-3 {
        r.result("diversity", Status::Passed, format!("the base model itself draws the same picture for every seed (variety {base:.4}); nothing to compare"))
    } else {
        let kept = lora / base;
        let ok = kept >= t.diversity;
        r.result(
            "diversity",
            pass_if(ok),
            format!(
                "variety between seeds (1 − image similarity): {lora:.3} with the LoRA, {base:.3} without; the LoRA keeps {:.0} % (needs {:.0} %){}",
                kept * 100.0,
                t.diversity * 100.0,
                if ok { "" } else { ": it draws nearly the same picture for every seed (collapse)" }
            ),
        )
    };
    res.metrics = vec![("diversity".into(), lora), ("diversity_control".into(), base)];
    Some(res)
}

/// Stacking interference: every LoRA keeps enough of its own effect when stacked. The effect
/// is measured in pixels, against the LoRA alone; what it keeps of its look in CLIP space is
/// reported beside it (a style LoRA moves CLIP embeddings too little for that share to decide).
pub fn stack(r: &Rules, s: &StackNumbers) -> CheckResult {
    let t = r.t;
    let n = s.names.len();
    let mut losses = Vec::new();
    let mut worst = (f64::NEG_INFINITY, String::new());
    let mut metrics = Vec::new();
    let pct = |x: Option<f64>| x.map(|x| format!("{:.0} %", x * 100.0)).unwrap_or("-".into());
    for i in 0..n {
        for k in 0..n {
            if i == k {
                continue;
            }
            let Some(kept) = s.effect_kept[i][k] else { continue };
            let loss = 1.0 - kept;
            metrics.push((format!("effect_kept/{}+{}", s.names[i], s.names[k]), kept));
            if let Some(look) = s.identity_kept[i][k] {
                metrics.push((format!("look_kept/{}+{}", s.names[i], s.names[k]), look));
            }
            if loss > worst.0 {
                worst = (loss, format!("{} with {}", s.names[i], s.names[k]));
            }
            if loss > t.stack_loss {
                losses.push(format!("{} stacked with {} keeps {} of its effect ({} of its look)", s.names[i], s.names[k], pct(Some(kept)), pct(s.identity_kept[i][k])));
            }
        }
    }
    let mut res = if losses.is_empty() {
        let largest = if worst.1.is_empty() { "-".to_string() } else { format!("{:.0} %, {}", worst.0.max(0.0) * 100.0, worst.1) };
        r.result("stack", Status::Passed, format!("every LoRA keeps at least {:.0} % of its own effect when stacked (largest loss {largest})", (1.0 - t.stack_loss) * 100.0))
    } else {
        r.result("stack", Status::Failed, format!("stacked LoRAs interfere (allowed loss {:.0} %): {}", t.stack_loss * 100.0, losses.join("; ")))
    };
    res.metrics = metrics;
    res
}

/// The cases of a group look alike: an absolute floor on the least alike pair, and no worse
/// than the base model's images of the same cases by more than the margin.
pub fn identity_group(g: &GroupNumbers) -> CheckResult {
    let name = format!("identity-group/{}", g.name);
    let result = |status, message: String| CheckResult { case: g.name.clone(), check: name.clone(), status, message, metrics: Vec::new(), scorer: String::new() };
    let Some((a, b, lowest)) = &g.lowest else {
        return result(Status::Skipped, "no images to compare".into());
    };
    let head = format!("image–image cosine between the cases {}: lowest pair {a} vs {b} at {lowest:.3} (floor {:.3})", g.cases.join(", "), g.floor);
    let mut res = match g.lowest_control {
        None => result(pass_if(*lowest >= g.floor), head),
        Some(c) => {
            let worse = *lowest < c - g.margin;
            let tail = if worse { format!("; less alike than without the LoRA ({c:.3}, margin {:.3})", g.margin) } else { format!("; without the LoRA {c:.3}") };
            result(pass_if(*lowest >= g.floor && !worse), format!("{head}{tail}"))
        }
    };
    res.metrics = vec![("identity_min_pair".into(), *lowest)];
    if let Some(c) = g.lowest_control {
        res.metrics.push(("identity_min_pair_control".into(), c));
    }
    res
}

/// The fewest copies that fail the memorization check, and the smallest share of the LoRA's
/// images they must be: one image that happens to look like a training image is one noisy
/// number and never fails it alone, nor two out of a hundred.
pub const MEMORIZATION_MIN_COPIES: usize = 2;
pub const MEMORIZATION_MIN_SHARE: f64 = 0.10;

/// Whether an image made with the LoRA is a copy: its nearest training image is at least
/// `threshold` alike, and it is at least `margin` more alike than its no-LoRA control is to the
/// control's own nearest training image (`None` without a control: not judged).
pub fn is_copy(n: &super::measure::Nearest, threshold: f64, margin: f64) -> Option<bool> {
    let c = n.control?;
    Some(n.similarity >= threshold && n.similarity - c >= margin)
}

/// Training images that several of a LoRA's images are nearest to (by the identity scorer),
/// most first: where its outputs converge.
pub fn converging(n: &MemorizationNumbers) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for i in &n.images {
        match counts.iter_mut().find(|(t, _)| *t == i.training) {
            Some(c) => c.1 += 1,
            None => counts.push((i.training.clone(), 1)),
        }
    }
    counts.retain(|(_, c)| *c >= 2);
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

/// The memorization check of one LoRA. Each image made with it is a copy or not
/// ([`is_copy`]); the LoRA fails when at least [`MEMORIZATION_MIN_COPIES`] of its judged images,
/// and at least [`MEMORIZATION_MIN_SHARE`] of them, are copies.
pub fn memorization(n: &MemorizationNumbers) -> CheckResult {
    let result = |status, message: String| CheckResult { case: "all-cases".into(), check: format!("memorization/{}", n.lora), status, message, metrics: Vec::new(), scorer: String::new() };
    if let Some(why) = &n.missing {
        return result(Status::Error, format!("not measured: {why}"));
    }
    let judged: Vec<&super::measure::Nearest> = n.images.iter().filter(|i| i.control.is_some()).collect();
    if judged.is_empty() {
        let why = if n.images.is_empty() {
            format!("no image of the run was made with `{}` and its trigger", n.lora)
        } else {
            "it compares each image with its no-LoRA control, and these cases have `control: false`".to_string()
        };
        return result(Status::Skipped, format!("not measured: {why}"));
    }
    let (t, m) = (n.threshold, n.margin);
    let copies: Vec<&&super::measure::Nearest> = judged.iter().filter(|i| is_copy(i, t, m) == Some(true)).collect();
    let share = copies.len() as f64 / judged.len() as f64;
    let fails = copies.len() >= MEMORIZATION_MIN_COPIES && share >= MEMORIZATION_MIN_SHARE;
    // The worst pair: the copy (else any image) furthest above its control.
    let gain = |i: &super::measure::Nearest| i.similarity - i.control.unwrap_or(f64::NAN);
    let worst = judged.iter().max_by(|a, b| gain(a).total_cmp(&gain(b))).expect("not empty");
    let unjudged = n.images.len() - judged.len();
    let mut message = format!(
        "{} of {} images copy a training image; closest {}/{} ≈ {} (identity {:.3}, no LoRA {:.3}, hash distance {} of {}); a copy is at identity cosine ≥ {t:.3} to its nearest of {} training images ({}) and ≥ {m:.3} above its no-LoRA control's{}",
        copies.len(),
        judged.len(),
        worst.case,
        worst.image,
        worst.training,
        worst.similarity,
        worst.control.unwrap_or(f64::NAN),
        worst.hash_distance,
        crate::score::phash::HASH_BITS,
        n.training_images,
        n.origin,
        if unjudged > 0 { format!(" ({unjudged} images without a control not judged)") } else { String::new() },
    );
    if let Some((img, count)) = converging(n).first() {
        message.push_str(&format!("; {count} images are nearest to {img}"));
    }
    if fails {
        message.push_str(&format!(
            "; the LoRA reproduces its training images ({:.0} % of its images; it passes with fewer than {MEMORIZATION_MIN_COPIES} copies or under {:.0} %): train on more images, for fewer steps or at a lower rank",
            share * 100.0,
            MEMORIZATION_MIN_SHARE * 100.0
        ));
    }
    let mut res = result(pass_if(!fails), message);
    let gains: Vec<f64> = judged.iter().map(|i| gain(i)).collect();
    let mut sims: Vec<f64> = judged.iter().map(|i| i.similarity).collect();
    sims.sort_by(f64::total_cmp);
    res.metrics = vec![
        ("copy_share".into(), share),
        ("nearest_median".into(), sims[sims.len() / 2]),
        ("nearest_max".into(), sims[sims.len() - 1]),
        ("gain_over_control_max".into(), gains.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
    ];
    res
}

/// One seed, or one prompt of a prompt set, is one noisy number: its miss is judged against
/// the accepted version. A miss the accepted version had too becomes a known failure (accepted
/// as it is), a new one a review item. Whether a prompt set has significantly more misses than
/// before is the run-wide `misses` check's question, and a case's mean still has its floor.
/// Without accepted scores, a miss still fails.
pub fn settle_misses(results: &mut [CheckResult], r: &Rules, variants: &[VariantNumbers], accepted: Option<&ScoreBaseline>, candidate: &ScoreBaseline) {
    let Some(accepted) = accepted else { return };
    let prompt_set = r.kind == Kind::Prompts;
    let t = r.t;
    // Per seed, a miss is judged on that seed alone.
    let one_seed = Thresholds { clip_aggregate: Aggregate::Mean, ..t.clone() };
    let before: Vec<(&VariantNumbers, Option<Vec<f64>>)> = variants.iter().map(|v| (v, super::run_verdicts::accepted_clips(accepted, candidate, v))).collect();
    for res in results.iter_mut().filter(|res| res.status == Status::Failed) {
        if let Some(label) = res.check.strip_prefix("clip/").filter(|_| prompt_set) {
            let Some((v, Some(acc))) = before.iter().find(|(v, _)| v.label == label) else { continue };
            let was = aggregate(acc, t.clip_aggregate);
            if was < v.floor {
                res.status = Status::Known;
                res.message = format!("under the floor as the accepted version was ({}): {}", r.show(was), res.message);
            } else {
                res.status = Status::Review;
                res.message = format!("a new miss (the accepted version scored {}); one prompt alone does not fail the gate, `misses` counts them: {}", r.show(was), res.message);
            }
        } else if (res.check == "control" && prompt_set) || res.check == "per-seed" {
            // Which prompts (or seeds) miss now, and which of them missed before.
            let per_seed = res.check == "per-seed";
            let mut new = Vec::new();
            for (v, acc) in &before {
                let controls: Vec<f64> = v.seeds.iter().filter_map(|s| s.clip_control).collect();
                let clips: Vec<f64> = v.seeds.iter().map(|s| s.clip).collect();
                let dropped = |c: &[f64]| controls.len() == c.len() && aggregate(&controls, t.clip_aggregate) - aggregate(c, t.clip_aggregate) > t.control_drop;
                if !per_seed {
                    if dropped(&clips) && !acc.as_deref().is_some_and(dropped) {
                        new.push(v.label.clone());
                    }
                    continue;
                }
                for (k, s) in v.seeds.iter().enumerate() {
                    let control: Vec<f64> = s.clip_control.into_iter().collect();
                    if !super::run_verdicts::misses(&[s.clip], &control, v.floor, &one_seed) {
                        continue;
                    }
                    let before = acc.as_ref().and_then(|a| a.get(k)).is_some_and(|a| super::run_verdicts::misses(&[*a], &control, v.floor, &one_seed));
                    if !before {
                        new.push(format!("{} seed {}", v.label, s.seed));
                    }
                }
            }
            let what = if per_seed { "a seed" } else { "a prompt" };
            if new.is_empty() {
                res.status = Status::Known;
                res.message = format!("misses only where the accepted version missed too: {}", res.message);
            } else {
                res.status = Status::Review;
                res.message = format!("new misses, to review ({}); {what} alone does not fail the gate: {}", new.join(", "), res.message);
            }
        }
    }
}

/// The accepted LoRA files the candidate no longer uses (the files it replaced).
pub fn replaced_files(accepted: &ScoreBaseline, candidate: &ScoreBaseline) -> Vec<(String, String)> {
    let now = candidate.lora_files();
    accepted.lora_files().into_iter().filter(|f| !now.contains(f)).collect()
}

/// "against the accepted zorb.safetensors (f2fe7ee5)".
pub fn files_note(files: &[(String, String)]) -> String {
    format!("against the accepted {}", files.iter().map(|(n, h)| format!("{n} ({})", &h[..h.len().min(8)])).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::generate::ApplyOutcome;
    use crate::harness::measure::SeedNumbers;
    use crate::lora::ApplyReport;
    use crate::lora::apply::ApplyEntry;

    /// A LoRA's images: `(nearest training image, similarity, its control's similarity)`.
    fn memorized(images: &[(&str, f64, Option<f64>)]) -> MemorizationNumbers {
        let near = |(i, (t, s, c)): (usize, &(&str, f64, Option<f64>))| crate::harness::measure::Nearest {
            case: "c".into(),
            image: format!("p-s{i}"),
            training: t.to_string(),
            similarity: *s,
            hash_distance: 40,
            by_hash: t.to_string(),
            by_hash_distance: 40,
            control: *c,
        };
        MemorizationNumbers {
            lora: "zorb".into(),
            training_dir: "data".into(),
            origin: "training_set: data".into(),
            training_images: 4,
            threshold: 0.6,
            margin: 0.25,
            images: images.iter().enumerate().map(near).collect(),
            controls: Vec::new(),
            missing: None,
        }
    }

    #[test]
    fn memorization_fails_copies_not_closeness_the_base_model_shares_nor_one_noisy_image() {
        // Six of eight images are near a training image and far above their controls.
        let mut copying = vec![("1_zorb/0001.png", 0.85, Some(0.3)); 6];
        copying.extend([("1_zorb/0003.png", 0.5, Some(0.45)), ("1_zorb/0003.png", 0.7, Some(0.2))]);
        copying[2].1 = 0.95;
        let r = memorization(&memorized(&copying));
        assert_eq!(r.status, Status::Failed, "{}", r.message);
        assert_eq!(r.check, "memorization/zorb");
        assert!(r.message.starts_with("7 of 8 images copy a training image; closest c/p-s2 ≈ 1_zorb/0001.png (identity 0.950, no LoRA 0.300, hash distance 40 of 1024)"), "the worst pair comes first: {}", r.message);
        assert!(r.message.contains("6 images are nearest to 1_zorb/0001.png"), "{}", r.message);
        assert_eq!(converging(&memorized(&copying)), vec![("1_zorb/0001.png".to_string(), 6), ("1_zorb/0003.png".to_string(), 2)]);
        // As close to the training set as the base model's pictures of the same prompts: the
        // training set covers the world, nothing is copied.
        let covered = [("1_shapes/0031.png", 0.88, Some(0.8)); 40];
        assert_eq!(memorization(&memorized(&covered)).status, Status::Passed);
        // Far above the control but not alike enough.
        assert_eq!(memorization(&memorized(&[("a.png", 0.55, Some(0.1)); 10])).status, Status::Passed);
        // One copy among ten, then two among a hundred: noise, not a failure.
        let mut one = vec![("a.png", 0.7, Some(0.68)); 9];
        one.push(("a.png", 0.99, Some(0.3)));
        assert_eq!(memorization(&memorized(&one)).status, Status::Passed);
        let mut two = vec![("a.png", 0.7, Some(0.68)); 98];
        two.extend([("a.png", 0.99, Some(0.3)); 2]);
        assert_eq!(memorization(&memorized(&two)).status, Status::Passed);
        let mut ten = vec![("a.png", 0.7, Some(0.68)); 90];
        ten.extend([("a.png", 0.99, Some(0.3)); 10]);
        assert_eq!(memorization(&memorized(&ten)).status, Status::Failed, "a tenth of the images are copies");
    }

    #[test]
    fn memorization_that_cannot_be_measured_says_so() {
        let mut n = memorized(&[]);
        n.missing = Some("LoRA `zorb`'s metadata names the dataset `/tmp/zreg`, and no folder of images is there".into());
        let r = memorization(&n);
        assert_eq!(r.status, Status::Error, "asked for and not measured is never a pass");
        assert!(r.message.contains("/tmp/zreg"), "{}", r.message);
        let r = memorization(&memorized(&[("a.png", 0.99, None), ("a.png", 0.99, None)]));
        assert_eq!(r.status, Status::Skipped);
        assert!(r.message.contains("control: false"), "{}", r.message);
        assert_eq!(memorization(&memorized(&[])).status, Status::Skipped);
    }

    fn rules(t: &Thresholds, kind: Kind) -> Rules<'_> {
        Rules { case: "c", t, incompatible_base: IncompatiblePolicy::Fail, kind }
    }

    fn seed(seed: u64, clip: f64) -> SeedNumbers {
        SeedNumbers { seed, clip, ..Default::default() }
    }

    fn variant(label: &str, seeds: Vec<SeedNumbers>) -> VariantNumbers {
        VariantNumbers { label: label.into(), floor: 0.25, seeds, ..Default::default() }
    }

    fn case(variants: Vec<VariantNumbers>) -> CaseNumbers {
        CaseNumbers { case: "c".into(), applied: vec![], refused: vec![], variants, broken: vec![], images: 2, references: 0, reference_means: vec![], stack: None }
    }

    fn status(results: &[CheckResult], check: &str) -> Status {
        results.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no {check} in {results:#?}")).status
    }

    #[test]
    fn a_melted_seed_fails_per_seed_while_the_mean_passes() {
        let t = Thresholds { clip_floor: 0.25, ..Default::default() };
        let n = case(vec![variant("main", vec![seed(0, 0.40), seed(1, 0.38), seed(2, 0.05)])]);
        let out = case_verdicts(&rules(&t, Kind::Single), &n);
        assert_eq!(status(&out, "clip"), Status::Passed, "mean 0.277 passes the floor");
        let ps = out.iter().find(|r| r.check == "per-seed").unwrap();
        assert_eq!(ps.status, Status::Failed);
        assert!(ps.message.contains("main seed 2: CLIP 0.050 < floor 0.250"), "{}", ps.message);
        // A control drop on one seed is named too.
        let mut s = seed(1, 0.30);
        s.clip_control = Some(0.70);
        let n = case(vec![variant("main", vec![SeedNumbers { clip_control: Some(0.31), ..seed(0, 0.30) }, s])]);
        let ps = per_seed(&rules(&t, Kind::Single), &n.variants);
        assert_eq!(ps.status, Status::Failed);
        assert!(ps.message.contains("seed 1") && ps.message.contains("below its control"), "{}", ps.message);
        // Switched off (best-of-N suites): no per-seed check at all.
        let t = Thresholds { per_seed: false, ..t };
        assert!(case_verdicts(&rules(&t, Kind::Single), &case(vec![variant("main", vec![seed(0, 0.4), seed(1, 0.0)])])).iter().all(|r| r.check != "per-seed"));
    }

    #[test]
    fn best_and_min_aggregation() {
        let v = vec![variant("main", vec![seed(0, 0.10), seed(1, 0.40)])];
        let best = Thresholds { clip_aggregate: Aggregate::Best, ..Default::default() };
        assert_eq!(clip(&rules(&best, Kind::Single), &v)[0].status, Status::Passed);
        let min = Thresholds { clip_aggregate: Aggregate::Min, ..Default::default() };
        let r = &clip(&rules(&min, Kind::Single), &v)[0];
        assert_eq!(r.status, Status::Failed);
        assert!(r.message.contains("CLIP min over 2 seeds 0.100 < floor 0.250"), "{}", r.message);
        let mean = Thresholds::default();
        assert_eq!(clip(&rules(&mean, Kind::Single), &v)[0].status, Status::Passed, "mean 0.25");
    }

    fn order(label: &str, prompt: &str, sims: &[(f64, f64)]) -> VariantNumbers {
        let seeds = sims.iter().enumerate().map(|(i, (l, b))| SeedNumbers { order_similarity: Some(*l), order_similarity_control: Some(*b), ..seed(i as u64, 0.4) }).collect();
        VariantNumbers { prompt: prompt.into(), ..variant(label, seeds) }
    }

    #[test]
    fn word_order_is_judged_against_the_base_model() {
        let t = Thresholds { word_order: 0.85, relative_margin: 0.05, ..Default::default() };
        let r = rules(&t, Kind::WordOrder);
        let first = variant("order-0", vec![seed(0, 0.4)]);
        // The base model is order-sensitive here (0.60): a LoRA just as sensitive is no alarm.
        let base_sensitive = [first.clone(), order("order-1", "b, a", &[(0.62, 0.60)])];
        let res = word_order(&r, &base_sensitive);
        assert_eq!(res.status, Status::Passed, "{}", res.message);
        assert!(res.message.contains("the base model is itself order-sensitive"), "{}", res.message);
        // The base model is robust (0.90) and the LoRA is not (0.59): the contrast fails.
        let res = word_order(&r, &[first.clone(), order("order-1", "b, a", &[(0.59, 0.90)])]);
        assert_eq!(res.status, Status::Failed);
        assert!(res.message.contains("min 0.590") && res.message.contains("without the LoRA min 0.900"), "{}", res.message);
        assert!(res.message.contains("LoRA − base -0.310"), "{}", res.message);
        // Far worse than an order-sensitive base still fails.
        assert_eq!(word_order(&r, &[first.clone(), order("order-1", "b, a", &[(0.40, 0.60)])]).status, Status::Failed);
        // One noisy pair below the base is not worse on average.
        let noisy = order("order-1", "b, a", &[(0.33, 0.39), (0.70, 0.66), (0.72, 0.70)]);
        assert_eq!(word_order(&r, &[first.clone(), noisy]).status, Status::Passed);
        // Below the floor while the base holds it fails even within the margin.
        assert_eq!(word_order(&r, &[first.clone(), order("order-1", "b, a", &[(0.84, 0.87)])]).status, Status::Failed);
        // Without a control, the absolute floor alone decides.
        let mut alone = order("order-1", "b, a", &[(0.84, 0.0)]);
        alone.seeds[0].order_similarity_control = None;
        assert_eq!(word_order(&r, &[first, alone]).status, Status::Failed);
    }

    #[test]
    fn sweep_fails_when_the_curve_breaks_at_the_weight_in_use_and_weight_zero_must_be_the_base() {
        let t = Thresholds::default();
        let w = |w: f64, clip: f64, effect: f64| VariantNumbers { weight: Some(w), ..variant(&format!("w{w}"), vec![SeedNumbers { effect: Some(effect), ..seed(0, clip) }]) };
        let good = [w(0.0, 0.4, 0.0), w(0.5, 0.35, 0.05), w(1.0, 0.3, 0.1), w(1.5, 0.2, 0.2)];
        let out = sweep(&rules(&t, Kind::Sweep { nominal: 1.0 }), &good, 1.0);
        assert_eq!(out[0].status, Status::Passed, "{}", out[0].message);
        assert!(out[0].message.contains("falls under the floor at weight 1.5 (the suite uses 1)"), "{}", out[0].message);
        assert_eq!(out[0].metrics.iter().find(|m| m.0 == "critical_weight").unwrap().1, 1.5);
        assert_eq!(out[1].check, "sweep-zero");
        assert_eq!(out[1].status, Status::Passed);
        let bad = [w(0.0, 0.4, 0.01), w(0.5, 0.2, 0.05), w(1.0, 0.3, 0.1)];
        let out = sweep(&rules(&t, Kind::Sweep { nominal: 1.0 }), &bad, 1.0);
        assert_eq!(out[0].status, Status::Failed, "under the floor at 0.5 ≤ 1");
        assert_eq!(out[1].status, Status::Failed, "weight 0 differs from the base render by 2.5/255");
    }

    #[test]
    fn bisect_names_the_word_after_which_the_score_falls() {
        let t = Thresholds::default();
        let step = |label: &str, added: Option<&str>, clip: f64| VariantNumbers { added: added.map(String::from), ..variant(label, vec![seed(0, clip)]) };
        let vs = [step("+0", None, 0.4), step("+1", Some("large"), 0.35), step("+2", Some("at night"), 0.1), step("+3", Some("left"), 0.3)];
        let res = bisect(&rules(&t, Kind::Bisect), &vs);
        assert_eq!(res.status, Status::Failed);
        assert!(res.message.contains("after adding \"at night\""), "{}", res.message);
        let res = bisect(&rules(&t, Kind::Bisect), &[step("+0", None, 0.1)]);
        assert!(res.message.contains("the base prompt already scores"), "{}", res.message);
        assert_eq!(bisect(&rules(&t, Kind::Bisect), &vs[..2]).status, Status::Passed);
    }

    fn report(applied: usize, total: usize) -> ApplyOutcome {
        Ok(ApplyReport { entries: vec![ApplyEntry { name: "z.safetensors".into(), weight: 1.0, modules_applied: applied, modules_total: total, tensors_applied: applied * 3, tensors_total: total * 3 }] })
    }

    #[test]
    fn applied_follows_the_incompatible_base_policy() {
        let t = Thresholds::default();
        let refused = AppliedNumbers { model: "sdxl".into(), per_model: true, outcomes: vec![Some(Err("made for SD 1.x".into()))] };
        let fits = AppliedNumbers { model: "tiny".into(), per_model: false, outcomes: vec![Some(report(56, 56))] };
        let partial = AppliedNumbers { model: "tiny".into(), per_model: false, outcomes: vec![Some(report(50, 56))] };
        let with = |p| Rules { incompatible_base: p, ..rules(&t, Kind::Single) };
        assert_eq!(applied(&with(IncompatiblePolicy::Fail), &refused).status, Status::Failed);
        let skip = applied(&with(IncompatiblePolicy::Skip), &refused);
        assert_eq!((skip.status, skip.check.as_str()), (Status::Skipped, "applied/sdxl"));
        let expect = applied(&with(IncompatiblePolicy::Expect), &refused);
        assert_eq!(expect.status, Status::Passed);
        assert!(expect.message.starts_with("refused as expected"));
        assert_eq!(applied(&with(IncompatiblePolicy::Expect), &fits).status, Status::Failed, "expected a refusal, it applied");
        assert_eq!(applied(&with(IncompatiblePolicy::Fail), &fits).status, Status::Passed);
        let p = applied(&with(IncompatiblePolicy::Fail), &partial);
        assert_eq!(p.status, Status::Failed);
        assert!(p.message.contains("150 of 168 tensors"), "{}", p.message);
        let none = AppliedNumbers { outcomes: vec![None], ..fits };
        assert_eq!(applied(&with(IncompatiblePolicy::Fail), &none).status, Status::Error);
        // With every model refused (skip), the case reports no images instead of checks on them.
        let n = CaseNumbers { applied: vec![refused], refused: vec!["sdxl".into()], ..case(vec![]) };
        let out = case_verdicts(&with(IncompatiblePolicy::Skip), &n);
        assert_eq!(status(&out, "images"), Status::Skipped);
        assert!(out.iter().all(|r| r.status != Status::Failed));
    }

    #[test]
    fn identity_groups_fail_below_the_floor_or_behind_the_base_model() {
        let g = |lowest: f64, control: Option<f64>| GroupNumbers {
            name: "g".into(),
            cases: vec!["a".into(), "b".into()],
            floor: 0.8,
            margin: 0.05,
            lowest: Some(("a".into(), "b".into(), lowest)),
            lowest_control: control,
        };
        assert_eq!(identity_group(&g(0.85, None)).status, Status::Passed);
        assert_eq!(identity_group(&g(0.75, None)).status, Status::Failed);
        let behind = identity_group(&g(0.82, Some(0.95)));
        assert_eq!(behind.status, Status::Failed, "{}", behind.message);
        assert!(behind.message.contains("less alike than without the LoRA (0.950"), "{}", behind.message);
        assert_eq!(identity_group(&g(0.9, Some(0.92))).status, Status::Passed);
        let empty = GroupNumbers { lowest: None, ..g(0.0, None) };
        assert_eq!(identity_group(&empty).status, Status::Skipped);
    }

    #[test]
    fn identity_reports_the_base_model_and_fails_behind_it() {
        let t = Thresholds { identity: 0.25, relative_margin: 0.05, ..Default::default() };
        let s = |l: f64, b: f64| SeedNumbers { identity: Some(l), identity_control: Some(b), ..seed(0, 0.4) };
        let n = CaseNumbers { references: 2, ..case(vec![variant("main", vec![s(0.59, 0.90)])]) };
        let res = identity(&rules(&t, Kind::Single), &n);
        assert_eq!(res.status, Status::Failed, "above the floor, but far behind the base: {}", res.message);
        assert!(res.message.contains("0.590") && res.message.contains("0.900"), "{}", res.message);
        let n = CaseNumbers { references: 2, ..case(vec![variant("main", vec![s(0.5, 0.3)])]) };
        assert_eq!(identity(&rules(&t, Kind::Single), &n).status, Status::Passed);
        let n = CaseNumbers { references: 2, ..case(vec![variant("main", vec![s(0.2, 0.1)])]) };
        assert_eq!(identity(&rules(&t, Kind::Single), &n).status, Status::Failed, "under the absolute floor");
    }

    #[test]
    fn identity_names_the_nearest_of_several_references() {
        let t = Thresholds { identity: 0.25, ..Default::default() };
        let s = SeedNumbers { identity: Some(0.6), ..seed(0, 0.4) };
        let means = vec![("front.png".to_string(), 0.52), ("side.png".to_string(), 0.71), ("back.png".to_string(), 0.57)];
        let n = CaseNumbers { references: 3, reference_means: means, ..case(vec![variant("main", vec![s])]) };
        let res = identity(&rules(&t, Kind::Single), &n);
        assert!(res.message.contains("mean 0.600") && res.message.contains("nearest reference side.png (0.710)"), "{}", res.message);
        assert!(res.metrics.iter().any(|(k, v)| k == "identity_nearest_reference" && (*v - 0.71).abs() < 1e-12));
    }

    #[test]
    fn aesthetic_fails_under_its_floor_or_behind_the_control() {
        let s = |a: f64, c: f64| SeedNumbers { aesthetic: Some(a), aesthetic_control: Some(c), ..seed(0, 0.4) };
        let v = |a: f64, c: f64| variant("main", vec![s(a, c), s(a + 0.2, c)]);
        // No floor: only the drop against the control counts.
        let t = Thresholds { aesthetic_floor: None, aesthetic_drop: 0.5, ..Default::default() };
        let ok = aesthetic(&rules(&t, Kind::Single), &[v(5.0, 5.2)]).unwrap();
        assert_eq!(ok.status, Status::Passed, "{}", ok.message);
        let dropped = aesthetic(&rules(&t, Kind::Single), &[v(4.0, 5.5)]).unwrap();
        assert_eq!(dropped.status, Status::Failed);
        assert!(dropped.message.contains("4.10 with the LoRA vs 5.50 without"), "{}", dropped.message);
        // A floor fails the lowest variant even when the control is as bad.
        let t = Thresholds { aesthetic_floor: Some(4.5), aesthetic_drop: 0.5, ..Default::default() };
        let low = aesthetic(&rules(&t, Kind::Single), &[v(6.0, 6.0), VariantNumbers { label: "night".into(), ..v(4.0, 4.0) }]).unwrap();
        assert_eq!(low.status, Status::Failed);
        assert!(low.message.contains("lowest variant mean 4.10 (night; floor 4.50)"), "{}", low.message);
        // Without scores (no predictor in the suite) there is no check.
        assert!(aesthetic(&rules(&t, Kind::Single), &[variant("main", vec![seed(0, 0.4)])]).is_none());
    }

    #[test]
    fn diversity_catches_a_collapsed_lora() {
        let t = Thresholds { diversity: 0.5, ..Default::default() };
        let v = |lora: f64, base: f64| VariantNumbers { seed_similarity: Some(lora), seed_similarity_control: Some(base), ..variant("main", vec![seed(0, 0.4), seed(1, 0.4)]) };
        let collapsed = diversity(&rules(&t, Kind::Single), &[v(0.99, 0.70)]).unwrap();
        assert_eq!(collapsed.status, Status::Failed);
        assert!(collapsed.message.contains("collapse"), "{}", collapsed.message);
        assert_eq!(diversity(&rules(&t, Kind::Single), &[v(0.80, 0.70)]).unwrap().status, Status::Passed);
        let still = diversity(&rules(&t, Kind::Single), &[v(1.0, 1.0)]).unwrap();
        assert_eq!(still.status, Status::Passed, "the base model is no more varied: {}", still.message);
        let one_seed = VariantNumbers { seed_similarity: None, ..v(0.9, 0.9) };
        assert!(diversity(&rules(&t, Kind::Single), &[one_seed]).is_none());
    }

    #[test]
    fn stack_fails_where_a_lora_loses_its_effect() {
        let t = Thresholds { stack_loss: 0.5, ..Default::default() };
        let s = StackNumbers {
            names: vec!["zorb".into(), "sticker".into()],
            effect_kept: vec![vec![Some(1.0), Some(0.2)], vec![Some(0.9), Some(1.0)]],
            identity_kept: vec![vec![Some(1.0), Some(0.7)], vec![Some(0.95), Some(1.0)]],
        };
        let res = stack(&rules(&t, Kind::Stack), &s);
        assert_eq!(res.status, Status::Failed);
        assert!(res.message.contains("zorb stacked with sticker keeps 20 % of its effect (70 % of its look)"), "{}", res.message);
        assert!(!res.message.contains("sticker stacked with zorb"), "{}", res.message);
        let fine = StackNumbers { effect_kept: vec![vec![Some(1.0), Some(0.8)], vec![Some(0.9), Some(1.0)]], ..s };
        assert_eq!(stack(&rules(&t, Kind::Stack), &fine).status, Status::Passed);
        // The look alone (CLIP space) does not decide.
        let look_lost = StackNumbers { identity_kept: vec![vec![Some(1.0), Some(0.1)], vec![Some(0.1), Some(1.0)]], ..fine };
        assert_eq!(stack(&rules(&t, Kind::Stack), &look_lost).status, Status::Passed);
    }

    #[test]
    fn control_effect_and_leak() {
        let t = Thresholds { control_drop: 0.05, effect: 0.01, ..Default::default() };
        let s = |clip: f64, control: f64, effect: f64| SeedNumbers { clip_control: Some(control), effect: Some(effect), ..seed(0, clip) };
        let out = control_and_effect(&rules(&t, Kind::Single), &[variant("main", vec![s(0.30, 0.40, 0.002)])]);
        assert_eq!((out[0].check.as_str(), out[0].status), ("control", Status::Failed));
        assert_eq!((out[1].check.as_str(), out[1].status), ("effect", Status::Failed));
        assert!(out[1].message.contains("it does next to nothing"));
        let leak = Thresholds { leak: Some(0.01), ..t };
        let out = control_and_effect(&rules(&leak, Kind::Single), &[variant("main", vec![s(0.40, 0.40, 0.05)])]);
        assert_eq!((out[1].check.as_str(), out[1].status), ("leak", Status::Failed));
        let out = control_and_effect(&rules(&leak, Kind::Single), &[variant("main", vec![s(0.40, 0.40, 0.001)])]);
        assert_eq!((out[0].status, out[1].status), (Status::Passed, Status::Passed));
    }
}
