//! The run's statistical verdicts, under one false-alarm budget:
//! - `regression`: each variant of a case (a *unit*), each case and all cases against the
//!   accepted measurements;
//! - `slice`: a slice of prompts (a matrix slot's value, a tag, a tag named first, a ladder rung,
//!   a base model) worse than the rest beyond noise: against its accepted measurements, or on a
//!   first run against the rest's lift over the control; within each case, and across cases by
//!   slot value and tag;
//! - `identity/accepted`: the reference-free identity check of a case, which fails where the
//!   likeness to the accepted images is lost on a slice the case's prompts belong to;
//! - `misses`: a prompt set with more prompts under its floor or over its control drop than the
//!   accepted version had.
//!
//! Every test here gives a p-value; [`benjamini_hochberg`] over all of them at 5 % decides which
//! fail, so pure seed noise turns the gate red in at most 5 % of runs however many prompts,
//! slices and metrics a suite has (`tests/calibration.rs` counts it), while a drop confined to a
//! few cases or one slice still stands out. Single prompts of a prompt set are not tested on
//! their own: one noisy prompt out of a hundred is a review item (the worst prompts), not a red
//! gate; prompt sets are judged through their slices and as a whole.
//!
//! Pure functions of measured numbers, like [`super::verdicts`]: no images, no models.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::measure::{CaseNumbers, VariantNumbers};
use super::stats::{DropTest, Noise, benjamini_hochberg, drop_test, more_misses_p, tolerance_from_seed_noise};
use super::verdicts::aggregate;
use super::{CheckResult, Status};
use crate::baseline::scores::{Metric, ScoreBaseline};
use crate::suite::{Thresholds, Tolerances};

/// The false-alarm budget of a run.
pub const ALPHA: f64 = 0.05;

/// Tolerance when the accepted run shows no seed spread to derive one from.
const FALLBACK_TOLERANCE: f64 = 0.02;

/// Metrics the regression tests judge. Diversity is measured once per variant, so its noise
/// cannot be told from seeds; collapse is the `diversity` check's business.
const REGRESSION_METRICS: [Metric; 6] = [Metric::Clip, Metric::Identity, Metric::WordOrder, Metric::Effect, Metric::Leak, Metric::Aesthetic];

/// Metrics whose slices are compared: what a prompt's content can break. (Effect, leak and
/// diversity measure how much the LoRA acts, not whether it draws the right thing.)
const SLICE_METRICS: [Metric; 5] = [Metric::Clip, Metric::Identity, Metric::Likeness, Metric::Aesthetic, Metric::WordOrder];

/// Slice kinds that only make sense within a case (a rung, a model, the tag named first).
const CASE_ONLY_SLICES: [&str; 3] = ["first", "size", "model"];

/// What the run-wide tests read of one case.
pub struct CaseInput<'a> {
    pub name: &'a str,
    pub thresholds: &'a Thresholds,
    /// A matrix or prompt file: per-prompt misses are counted against the accepted version,
    /// and single prompts are not tested on their own.
    pub prompt_set: bool,
    pub numbers: &'a CaseNumbers,
    pub candidate: &'a ScoreBaseline,
    /// The accepted measurements of the same scorers, if any.
    pub accepted: Option<&'a ScoreBaseline>,
    /// Why `accepted` is `None` (no accepted measurements yet, another scorer, unreadable): the
    /// regression check's verdict and message then.
    pub no_accepted: Option<(Status, String)>,
    /// `" against the accepted zorb.safetensors (f2fe7ee5)"`, or empty.
    pub changed: String,
}

/// One row of the worst-slices table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SliceRow {
    /// The case, or `all-cases`.
    pub scope: String,
    /// `bg=grass`, `tag=large`, `first=large`, `size=192x192`, `model=tiny-sticker`.
    pub slice: String,
    pub metric: String,
    /// Prompts (variants) in the slice and in the rest, and the seeds behind the slice's mean.
    pub prompts: usize,
    pub rest_prompts: usize,
    pub seeds: usize,
    /// The slice's mean value now, the rest's, and the slice's accepted mean (paired slices).
    pub value: f64,
    pub rest: f64,
    pub accepted: Option<f64>,
    /// How much more the slice lost against its accepted measurements than the rest did
    /// (paired), or how far it is behind the rest in what the LoRA adds over the no-LoRA
    /// control (first run): positive is worse.
    pub gap: f64,
    pub p: f64,
    pub failed: bool,
    /// A stronger failing slice that holds most of this one's prompts (`bg=grass`): the
    /// likelier cause, when a slice fails only because its prompts share another slot value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<String>,
    /// The prompts in the slice, as (case index, variant).
    #[serde(skip)]
    members: Vec<(usize, String)>,
}

impl SliceRow {
    /// Seeds behind each prompt's mean.
    pub fn seeds_per_prompt(&self) -> usize {
        self.seeds.checked_div(self.prompts).unwrap_or(0)
    }

    /// "bg=grass: likeness 0.268 against 0.732 on the other 50 prompts (10 prompts × 2 seeds; accepted 0.813; lost +0.527 more than the rest, p 0.0000)".
    pub fn describe(&self) -> String {
        let seeds = self.seeds_per_prompt();
        let (accepted, what) = match self.accepted {
            Some(a) => (format!("; accepted {a:.3}"), format!("lost {:+.3} more than the rest", self.gap)),
            None => (String::new(), format!("{:+.3} behind the rest against the no-LoRA control", self.gap)),
        };
        let within = self.within.as_ref().map(|w| format!("; most of its prompts are also {w}")).unwrap_or_default();
        format!(
            "{}: {} {:.3} against {:.3} on the other {} prompts ({} prompts × {seeds} seeds{accepted}; {what}, p {:.4}{within})",
            self.slice, self.metric, self.value, self.rest, self.rest_prompts, self.prompts, self.p
        )
    }
}

/// Everything the run-wide tests decided.
#[derive(Debug, Default)]
pub struct RunVerdicts {
    /// Per case (in input order): `regression`, then `slice`, `identity/accepted` and
    /// `misses` where they apply.
    pub per_case: Vec<Vec<CheckResult>>,
    /// `all-cases · regression` and `all-cases · slice`.
    pub suite: Vec<CheckResult>,
    /// Every slice tested, failing ones first, then by p.
    pub slices: Vec<SliceRow>,
    /// How many tests shared the budget.
    pub tests: usize,
}

/// One measurement of this run, with the accepted version's and the control's.
#[derive(Debug, Clone)]
struct Obs {
    value: f64,
    accepted: Option<f64>,
    control: Option<f64>,
    /// The generation it measures: identical images count once.
    image: String,
}

/// One variant's measurements of one metric.
#[derive(Debug, Clone)]
struct Unit {
    case: usize,
    variant: String,
    metric: Metric,
    obs: Vec<Obs>,
    slices: Vec<String>,
}

impl Unit {
    /// Paired drops (accepted − now, oriented so that positive is worse).
    fn drops(&self) -> Vec<f64> {
        self.obs.iter().filter_map(|o| Some(self.metric.drop(o.accepted?, o.value))).collect()
    }
    /// How much less the LoRA adds over the no-LoRA control than nothing, per seed (positive is
    /// worse): the first run's measure, where there is nothing accepted to pair with.
    fn losses(&self) -> Vec<f64> {
        self.obs.iter().filter_map(|o| Some(self.metric.drop(o.value, o.control?))).collect()
    }
    /// Identical generations: the same metric of the same images.
    fn identity_key(&self) -> String {
        let mut images: Vec<&str> = self.obs.iter().map(|o| o.image.as_str()).collect();
        images.sort_unstable();
        format!("{}|{}", self.metric.name(), images.join(","))
    }
    fn mean_value(&self) -> f64 {
        mean(&self.obs.iter().map(|o| o.value).collect::<Vec<_>>())
    }
    fn mean_accepted(&self) -> Option<f64> {
        let a: Vec<f64> = self.obs.iter().filter_map(|o| o.accepted).collect();
        (!a.is_empty()).then(|| mean(&a))
    }
    fn has(&self, key: &str) -> bool {
        self.slices.iter().any(|s| s == key)
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// `bg` of `bg=grass`.
fn kind_of(key: &str) -> &str {
    key.split_once('=').map(|(k, _)| k).unwrap_or(key)
}

/// The measurements of every case as units, structural zeros left out.
fn units_of(cases: &[CaseInput]) -> Vec<Unit> {
    let mut out = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        let effect = if c.thresholds.leak.is_some() { Metric::Leak } else { Metric::Effect };
        for v in c.numbers.variants.iter().filter(|v| !v.structural) {
            let slices = &v.slices;
            let mut push = |metric: Metric, obs: Vec<Obs>| {
                if !obs.is_empty() {
                    out.push(Unit { case: ci, variant: v.label.clone(), metric, obs, slices: slices.clone() });
                }
            };
            type Get = fn(&super::measure::SeedNumbers) -> (Option<f64>, Option<f64>);
            let per_seed = |metric: Metric, get: Get| -> Vec<Obs> {
                v.seeds
                    .iter()
                    .filter_map(|s| {
                        let (value, control) = get(s);
                        let value = value.filter(|x| x.is_finite())?;
                        Some(Obs { value, accepted: accepted_value(c, v, metric, Some(s.seed)), control: control.filter(|x| x.is_finite()), image: s.image.clone() })
                    })
                    .collect()
            };
            push(Metric::Clip, per_seed(Metric::Clip, |s| (Some(s.clip), s.clip_control)));
            push(Metric::Identity, per_seed(Metric::Identity, |s| (s.identity, s.identity_control)));
            push(Metric::WordOrder, per_seed(Metric::WordOrder, |s| (s.order_similarity, s.order_similarity_control)));
            push(Metric::Aesthetic, per_seed(Metric::Aesthetic, |s| (s.aesthetic, s.aesthetic_control)));
            push(effect, per_seed(effect, |s| (s.effect, None)));
            // Likeness pairs with the accepted images' likeness among themselves.
            let likeness: Vec<Obs> = v
                .seeds
                .iter()
                .filter_map(|s| Some(Obs { value: s.likeness?, accepted: s.likeness_accepted, control: s.likeness_control, image: s.image.clone() }))
                .collect();
            push(Metric::Likeness, likeness);
        }
    }
    out
}

/// The accepted value of a measurement, where the variant's inputs are unchanged (apart from
/// the LoRA files).
fn accepted_value(c: &CaseInput, v: &VariantNumbers, metric: Metric, seed: Option<u64>) -> Option<f64> {
    let a = c.accepted?;
    if !same_inputs(a, c.candidate, &v.label) {
        return None;
    }
    a.measurements.iter().find(|m| m.metric == metric && m.variant == v.label && m.seed == seed).map(|m| m.value).filter(|x| x.is_finite())
}

fn same_inputs(accepted: &ScoreBaseline, candidate: &ScoreBaseline, variant: &str) -> bool {
    matches!((accepted.variants.get(variant), candidate.variants.get(variant)), (Some(x), Some(y)) if x.settings == y.settings)
}

/// Units with the same images (a case's prompt repeated by a ladder's first rung or a sweep's
/// weight 1) are tested once; the verdict is shared.
fn distinct(units: &[Unit]) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    (0..units.len()).filter(|&i| seen.insert(units[i].identity_key())).collect()
}

fn noise_of(units: &[&Unit], pick: impl Fn(&Unit) -> Vec<f64>) -> Option<Noise> {
    let groups: Vec<Vec<f64>> = units.iter().map(|u| pick(u)).filter(|d| !d.is_empty()).collect();
    let refs: Vec<&[f64]> = groups.iter().map(|g| g.as_slice()).collect();
    Noise::estimate(&refs)
}

/// Each metric's default tolerance: a quarter of its accepted seed-to-seed spread.
fn default_tolerances(units: &[Unit]) -> BTreeMap<Metric, (f64, &'static str)> {
    let mut by: BTreeMap<Metric, Vec<Vec<f64>>> = BTreeMap::new();
    for &i in &distinct(units) {
        by.entry(units[i].metric).or_default().push(units[i].obs.iter().filter_map(|o| o.accepted).collect());
    }
    by.into_iter()
        .map(|(m, groups)| {
            let refs: Vec<&[f64]> = groups.iter().map(|g| g.as_slice()).collect();
            match tolerance_from_seed_noise(&refs) {
                Some(t) => (m, (t, "¼ of the accepted seed spread")),
                None => (m, (FALLBACK_TOLERANCE, "default")),
            }
        })
        .collect()
}

fn tolerance(set: &Tolerances, defaults: &BTreeMap<Metric, (f64, &'static str)>, m: Metric) -> (f64, &'static str) {
    match set.set_for(m) {
        Some(t) => (t, "set in the suite"),
        None => defaults.get(&m).copied().unwrap_or((FALLBACK_TOLERANCE, "default")),
    }
}

/// The mean drop over several units' pairs, each pair weighted equally, with its variance.
fn pooled_drop(units: &[&Unit], noise: &Noise) -> Option<(f64, f64, usize)> {
    let (mut sum, mut var, mut n_all) = (0.0, 0.0, 0usize);
    for u in units {
        let d = u.drops();
        let n = d.len();
        sum += d.iter().sum::<f64>();
        var += (n * n) as f64 * noise.unit_var(n);
        n_all += n;
    }
    (n_all > 0).then(|| (sum / n_all as f64, var / (n_all * n_all) as f64, n_all))
}

fn metric_line(m: Metric, t: &DropTest, tol: (f64, &str)) -> String {
    format!("{}: mean drop {:+.4} (95 % t-interval {:+.4} to {:+.4}, {} pairs; tolerance {:.4}, {})", m.name(), t.mean, t.low, t.high, t.n, tol.0, tol.1)
}

/// The tests of a run before the budget decides them.
#[derive(Default)]
struct Family {
    ps: Vec<f64>,
}

impl Family {
    fn add(&mut self, p: f64) -> usize {
        self.ps.push(p);
        self.ps.len() - 1
    }
}

/// Runs every test of the run and decides them together.
pub fn judge(cases: &[CaseInput], suite_tolerances: &Tolerances) -> RunVerdicts {
    let units = units_of(cases);
    let distinct_units: Vec<&Unit> = distinct(&units).into_iter().map(|i| &units[i]).collect();
    let defaults = default_tolerances(&units);
    let noise: BTreeMap<Metric, Noise> = Metric::ALL
        .into_iter()
        .filter_map(|m| Some((m, noise_of(&distinct_units.iter().copied().filter(|u| u.metric == m).collect::<Vec<_>>(), |u| u.drops())?)))
        .collect();
    let mut family = Family::default();

    // Regression: each distinct unit of the deliberate cases, each case, all cases.
    let mut unit_tests: HashMap<String, (usize, DropTest)> = HashMap::new();
    for u in distinct_units.iter().filter(|u| REGRESSION_METRICS.contains(&u.metric) && !cases[u.case].prompt_set) {
        let (Some(noise), d) = (noise.get(&u.metric), u.drops()) else { continue };
        if d.is_empty() {
            continue;
        }
        let tol = tolerance(&cases[u.case].thresholds.regression, &defaults, u.metric).0;
        let t = drop_test(mean(&d), noise.unit_var(d.len()), noise.unit_df(), tol, d.len());
        unit_tests.insert(u.identity_key(), (family.add(t.p), t));
    }
    let mut case_tests: Vec<BTreeMap<Metric, (Option<usize>, DropTest)>> = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        let mut per_metric = BTreeMap::new();
        for m in REGRESSION_METRICS {
            let Some(noise) = noise.get(&m) else { continue };
            let mine: Vec<&Unit> = units.iter().filter(|u| u.case == ci && u.metric == m && !u.drops().is_empty()).collect();
            let Some((d, var, n)) = pooled_drop(&mine, noise) else { continue };
            let t = drop_test(d, var, noise.df, tolerance(&c.thresholds.regression, &defaults, m).0, n);
            // A case of one variant is already tested as that unit.
            let id = (mine.len() > 1 || c.prompt_set).then(|| family.add(t.p));
            per_metric.insert(m, (id, t));
        }
        case_tests.push(per_metric);
    }
    let mut suite_tests: BTreeMap<Metric, (usize, DropTest)> = BTreeMap::new();
    if cases.len() > 1 {
        for m in REGRESSION_METRICS {
            let Some(noise) = noise.get(&m) else { continue };
            let all: Vec<&Unit> = distinct_units.iter().copied().filter(|u| u.metric == m && !u.drops().is_empty()).collect();
            let Some((d, var, n)) = pooled_drop(&all, noise) else { continue };
            let t = drop_test(d, var, noise.df, tolerance(suite_tolerances, &defaults, m).0, n);
            suite_tests.insert(m, (family.add(t.p), t));
        }
    }

    // Slices: within each case, and across cases by slot value and tag. (Not whole cases against
    // each other: a suite's cases are different scenarios on purpose, and a clean retrain moved
    // one case's likeness far enough to look like a loss.)
    let mut slice_tests: Vec<(SliceRow, usize)> = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        let mine: Vec<&Unit> = units.iter().filter(|u| u.case == ci).collect();
        for row in slice_rows(c.name, &mine, &c.thresholds.regression, &defaults, false) {
            let id = family.add(row.p);
            slice_tests.push((row, id));
        }
    }
    if cases.len() > 1 {
        for row in slice_rows("all-cases", &distinct_units, suite_tolerances, &defaults, true) {
            let id = family.add(row.p);
            slice_tests.push((row, id));
        }
    }

    // Misses of prompt sets against the accepted version.
    let miss_tests: Vec<Option<(usize, MissCount)>> =
        cases.iter().map(|c| if c.prompt_set { miss_count(c) } else { None }.map(|m| (family.add(more_misses_p(m.new.len(), m.recovered.len())), m))).collect();

    let rejected = benjamini_hochberg(&family.ps, ALPHA);
    explain_by_stronger_slices(&mut slice_tests, &rejected);
    let budget = format!("Benjamini–Hochberg over the run's {} tests at {:.0} %", family.ps.len(), ALPHA * 100.0);

    let mut out = RunVerdicts { tests: family.ps.len(), ..Default::default() };
    for (ci, c) in cases.iter().enumerate() {
        let mut results = vec![regression_result(c, ci, &case_tests[ci], &units, &unit_tests, &rejected, &defaults, &budget)];
        let rows: Vec<&(SliceRow, usize)> = slice_tests.iter().filter(|(r, _)| r.scope == c.name).collect();
        if !rows.is_empty() {
            results.push(slice_result(c.name, &rows, &rejected, &budget));
        }
        // The reference-free identity check: likeness lost on a slice of the case, or on a slice
        // across cases that holds some of its prompts.
        let likeness = c.numbers.variants.iter().flat_map(|v| &v.seeds).filter(|s| s.likeness.is_some()).count();
        if likeness > 0 {
            let mine = |r: &SliceRow| c.numbers.variants.iter().any(|v| v.slices.contains(&r.slice));
            let mut lost: Vec<&SliceRow> = slice_tests
                .iter()
                .filter(|(r, i)| rejected[*i] && r.metric == "likeness" && (r.scope == c.name || (r.scope == "all-cases" && mine(r))))
                .map(|(r, _)| r)
                .collect();
            lost.sort_by(|a, b| a.p.total_cmp(&b.p));
            results.push(identity_accepted(c, &lost, &budget));
        }
        if let Some((i, m)) = &miss_tests[ci] {
            results.push(misses_result(c.name, m, rejected[*i], &budget));
        }
        out.per_case.push(results);
    }
    if !suite_tests.is_empty() {
        let (mut worse, mut parts, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
        for (m, (i, t)) in &suite_tests {
            let tol = tolerance(suite_tolerances, &defaults, *m);
            parts.push(metric_line(*m, t, tol));
            metrics.push((format!("{}_drop", m.name()), t.mean));
            if rejected[*i] {
                worse.push(format!("{} (p {:.4})", metric_line(*m, t, tol), t.p));
            }
        }
        let mut changed: Vec<&str> = cases.iter().map(|c| c.changed.as_str()).filter(|c| !c.is_empty()).collect();
        changed.sort_unstable();
        changed.dedup();
        let changed = changed.join(";");
        let (status, message) = if worse.is_empty() {
            (Status::Passed, format!("no worse than accepted{changed} over all cases, each generation counted once: {}", parts.join("; ")))
        } else {
            (Status::Failed, format!("significantly worse than accepted{changed} over all cases ({budget}): {}", worse.join("; ")))
        };
        out.suite.push(CheckResult { case: "all-cases".into(), check: "regression".into(), status, message, metrics, scorer: String::new() });
    }
    let suite_rows: Vec<&(SliceRow, usize)> = slice_tests.iter().filter(|(r, _)| r.scope == "all-cases").collect();
    if !suite_rows.is_empty() {
        out.suite.push(slice_result("all-cases", &suite_rows, &rejected, &budget));
    }
    let mut rows: Vec<SliceRow> = slice_tests
        .into_iter()
        .map(|(mut r, i)| {
            r.failed = rejected[i];
            r
        })
        .collect();
    rows.sort_by(|a, b| b.failed.cmp(&a.failed).then(a.p.total_cmp(&b.p)));
    out.slices = rows;
    out
}

#[allow(clippy::too_many_arguments)]
fn regression_result(
    c: &CaseInput,
    ci: usize,
    tests: &BTreeMap<Metric, (Option<usize>, DropTest)>,
    units: &[Unit],
    unit_tests: &HashMap<String, (usize, DropTest)>,
    rejected: &[bool],
    defaults: &BTreeMap<Metric, (f64, &'static str)>,
    budget: &str,
) -> CheckResult {
    let result = |status, message: String| CheckResult { case: c.name.to_string(), check: "regression".into(), status, message, metrics: Vec::new(), scorer: String::new() };
    if let Some((status, why)) = &c.no_accepted {
        return result(*status, why.clone());
    }
    if tests.is_empty() {
        let paired: Vec<String> = units
            .iter()
            .filter(|u| u.case == ci && REGRESSION_METRICS.contains(&u.metric) && !u.drops().is_empty())
            .map(|u| format!("{} {:+.4}", u.metric.name(), mean(&u.drops())))
            .collect();
        if !paired.is_empty() {
            // One pair per metric in the whole run: there is no spread to judge a drop by.
            return result(
                Status::Passed,
                format!(
                    "measurements pair with accepted ones, too few to estimate their noise (it takes two seeds or variants): no drop can be called significant; drops: {}",
                    paired.join(", ")
                ),
            );
        }
        return result(
            Status::Review,
            format!("none of the {} measurements pairs with an accepted one (the case's prompts or settings changed): accept new ones", c.candidate.measurements.len()),
        );
    }
    let (mut worse, mut parts, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
    for (m, (id, t)) in tests {
        let tol = tolerance(&c.thresholds.regression, defaults, *m);
        parts.push(metric_line(*m, t, tol));
        metrics.push((format!("{}_drop", m.name()), t.mean));
        if id.is_some_and(|i| rejected[i]) {
            worse.push(format!("{} over the case (p {:.4})", metric_line(*m, t, tol), t.p));
        }
        for u in units.iter().filter(|u| u.case == ci && u.metric == *m) {
            if let Some((i, t)) = unit_tests.get(&u.identity_key())
                && rejected[*i]
            {
                worse.push(format!("{} on {}: drop {:+.4} (95 % t-interval {:+.4} to {:+.4}, {} pairs, p {:.4})", m.name(), u.variant, t.mean, t.low, t.high, t.n, t.p));
            }
        }
    }
    let paired: usize = tests.values().map(|(_, t)| t.n).sum();
    let unpaired = c.candidate.measurements.iter().filter(|m| REGRESSION_METRICS.contains(&m.metric)).count().saturating_sub(paired);
    let note = if unpaired > 0 { format!("; {unpaired} measurements had no accepted counterpart") } else { String::new() };
    let mut r = if worse.is_empty() {
        result(Status::Passed, format!("no worse than accepted{} beyond each metric's tolerance: {}{note}", c.changed, parts.join("; ")))
    } else {
        result(Status::Failed, format!("significantly worse than accepted{} ({budget}): {}", c.changed, worse.join("; ")))
    };
    r.metrics = metrics;
    r
}

/// Every slice of `units` with a rest to compare with, one row per slice and metric. Within a
/// case every key counts; across cases (`across`) slot values, tags and cases, with at least two
/// prompts on each side. The noise of a slice's test comes from its rest (the slice's own
/// damage cannot hide itself), its tails from the whole metric's units.
fn slice_rows(scope: &str, units: &[&Unit], tolerances: &Tolerances, defaults: &BTreeMap<Metric, (f64, &'static str)>, across: bool) -> Vec<SliceRow> {
    let mut rows = Vec::new();
    for m in SLICE_METRICS {
        let of_metric: Vec<&Unit> = units.iter().copied().filter(|u| u.metric == m).collect();
        if of_metric.len() < 2 {
            continue;
        }
        let paired = of_metric.iter().all(|u| !u.drops().is_empty());
        // A first run compares what the LoRA adds over its control; likeness needs an accepted run.
        if !paired && (m == Metric::Likeness || of_metric.iter().any(|u| u.losses().is_empty())) {
            continue;
        }
        let pick = |u: &Unit| if paired { u.drops() } else { u.losses() };
        let Some(all_noise) = noise_of(&of_metric, pick) else { continue };
        let keys: BTreeSet<&str> = of_metric
            .iter()
            .flat_map(|u| u.slices.iter().map(String::as_str))
            .filter(|k| !across || !CASE_ONLY_SLICES.contains(&kind_of(k)))
            .collect();
        let min = if across { 2 } else { 1 };
        let tol = tolerance(tolerances, defaults, m).0;
        for key in keys {
            let kind = kind_of(key);
            let inside: Vec<&Unit> = of_metric.iter().copied().filter(|u| u.has(key)).collect();
            // The rest: units sliced the same way (same slot, or any tag) but not in this slice.
            let rest: Vec<&Unit> = of_metric.iter().copied().filter(|u| !u.has(key) && u.slices.iter().any(|s| kind_of(s) == kind)).collect();
            if inside.len() < min || rest.len() < min {
                continue;
            }
            let noise = if rest.len() >= 3 { noise_of(&rest, pick).unwrap_or(all_noise) } else { all_noise };
            let df = noise.df.min(all_noise.tail_df).min(if rest.len() >= 3 { (rest.len() - 1) as f64 } else { f64::INFINITY }).max(1.0);
            let unit_means = |us: &[&Unit]| -> (f64, f64, usize) {
                let (mut sum, mut var, mut seeds) = (0.0, 0.0, 0);
                for u in us {
                    let d = pick(u);
                    sum += mean(&d);
                    var += noise.unit_var(d.len());
                    seeds += d.len();
                }
                let k = us.len() as f64;
                (sum / k, var / (k * k), seeds)
            };
            let (ds, vs, seeds) = unit_means(&inside);
            let (dr, vr, _) = unit_means(&rest);
            // Worse than the rest beyond the tolerance and, paired, worse than its own accepted
            // measurements too: a retrain that moves every prompt a little is `regression`'s
            // business, and the likeness that every retrain loses a little is no slice's fault.
            let beyond_rest = drop_test(ds - dr, vs + vr, df, tol, inside.len());
            let p = if paired && m != Metric::Likeness { beyond_rest.p.max(drop_test(ds, vs, df, tol, inside.len()).p) } else { beyond_rest.p };
            let accepted: Vec<f64> = inside.iter().filter_map(|u| u.mean_accepted()).collect();
            rows.push(SliceRow {
                scope: scope.into(),
                slice: key.into(),
                metric: m.name().into(),
                prompts: inside.len(),
                rest_prompts: rest.len(),
                seeds,
                value: mean(&inside.iter().map(|u| u.mean_value()).collect::<Vec<_>>()),
                rest: mean(&rest.iter().map(|u| u.mean_value()).collect::<Vec<_>>()),
                accepted: (paired && !accepted.is_empty()).then(|| mean(&accepted)),
                gap: ds - dr,
                p,
                failed: false,
                within: None,
                members: inside.iter().map(|u| (u.case, u.variant.clone())).collect(),
            });
        }
    }
    rows
}

/// Marks failing slices whose prompts mostly belong to a stronger failing slice of the same
/// metric (five "oil painting" prompts that all happen to be on grass, when grass lost the
/// character): the reader should look at the stronger one first.
fn explain_by_stronger_slices(rows: &mut [(SliceRow, usize)], rejected: &[bool]) {
    let failing: Vec<usize> = (0..rows.len()).filter(|&i| rejected[rows[i].1]).collect();
    for &i in &failing {
        let stronger = failing
            .iter()
            .copied()
            .filter(|&k| k != i && rows[k].0.metric == rows[i].0.metric && rows[k].0.p < rows[i].0.p && rows[k].0.slice != rows[i].0.slice)
            .filter(|&k| {
                let shared = rows[i].0.members.iter().filter(|m| rows[k].0.members.contains(m)).count();
                2 * shared > rows[i].0.members.len()
            })
            .min_by(|&a, &b| rows[a].0.p.total_cmp(&rows[b].0.p));
        rows[i].0.within = stronger.map(|k| rows[k].0.slice.clone());
    }
}

fn slice_result(scope: &str, rows: &[&(SliceRow, usize)], rejected: &[bool], budget: &str) -> CheckResult {
    let mut failing: Vec<&SliceRow> = rows.iter().filter(|(_, i)| rejected[*i]).map(|(r, _)| r).collect();
    failing.sort_by(|a, b| a.p.total_cmp(&b.p));
    let failing: Vec<String> = failing.iter().map(|r| r.describe()).collect();
    let worst = rows.iter().min_by(|a, b| a.0.p.total_cmp(&b.0.p)).map(|(r, _)| r);
    let n = rows.iter().map(|(r, _)| r.slice.as_str()).collect::<BTreeSet<_>>().len();
    let (status, message) = if failing.is_empty() {
        (Status::Passed, format!("no slice of {n} is worse than the rest beyond noise; closest: {}", worst.map(|r| r.describe()).unwrap_or_default()))
    } else {
        (Status::Failed, format!("{} worse than the rest beyond noise ({budget}): {}", if failing.len() == 1 { "a slice is" } else { "slices are" }, failing.join("; ")))
    };
    let mut res = CheckResult { case: scope.to_string(), check: "slice".into(), status, message, metrics: Vec::new(), scorer: String::new() };
    if let Some(r) = worst {
        res.metrics = vec![("worst_slice_gap".into(), r.gap), ("worst_slice_p".into(), r.p)];
    }
    res
}

/// The share of the accepted images' likeness that the case's new images keep,
/// `Σ(new − control) / Σ(accepted − control)`: 1 as alike to the accepted images as those are to
/// each other, 0 no more alike than a picture without the LoRA. Shown, not judged: where the
/// accepted images are barely more alike than a no-LoRA picture it is a ratio of noise, so the
/// verdict comes from the slice tests.
fn kept_share(variants: &[VariantNumbers]) -> Option<f64> {
    let terms: Vec<(f64, f64)> =
        variants.iter().flat_map(|v| &v.seeds).filter_map(|s| Some((s.likeness? - s.likeness_control?, s.likeness_accepted? - s.likeness_control?))).collect();
    let (num, den) = terms.iter().fold((0.0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
    (den > 1e-3 * terms.len() as f64).then(|| num / den)
}

fn identity_accepted(c: &CaseInput, lost: &[&SliceRow], budget: &str) -> CheckResult {
    let seeds: Vec<&super::measure::SeedNumbers> = c.numbers.variants.iter().flat_map(|v| &v.seeds).filter(|s| s.likeness.is_some()).collect();
    let now = mean(&seeds.iter().filter_map(|s| s.likeness).collect::<Vec<_>>());
    let accepted = mean(&seeds.iter().filter_map(|s| s.likeness_accepted).collect::<Vec<_>>());
    let kept = kept_share(&c.numbers.variants).map(|k| format!("; it keeps {:.0} % of what makes the accepted images alike beyond a no-LoRA picture", k * 100.0)).unwrap_or_default();
    let head = format!(
        "likeness (identity scorer) to the accepted images of the same prompts: {now:.3} over {} images, where the accepted images are {accepted:.3} alike among themselves{kept}",
        seeds.len()
    );
    let (status, message) = if lost.is_empty() {
        (Status::Passed, format!("{head}; no slice lost the character beyond noise"))
    } else {
        (Status::Failed, format!("{head}; the character is lost ({budget}): {}", lost.iter().map(|r| r.describe()).collect::<Vec<_>>().join("; ")))
    };
    let mut res = CheckResult { case: c.name.to_string(), check: "identity/accepted".into(), status, message, metrics: vec![("likeness".into(), now), ("likeness_accepted".into(), accepted)], scorer: String::new() };
    if let Some(k) = kept_share(&c.numbers.variants) {
        res.metrics.push(("likeness_kept".into(), k));
    }
    res
}

/// A prompt set's per-prompt misses now and in the accepted version.
#[derive(Debug, Clone, PartialEq)]
pub struct MissCount {
    pub now: Vec<String>,
    pub new: Vec<String>,
    pub recovered: Vec<String>,
    pub compared: usize,
}

/// Whether a prompt misses: its aggregate CLIP under the floor, or more than the control drop
/// below its control. `clips` are per seed; `controls` the same seeds without the LoRA.
pub fn misses(clips: &[f64], controls: &[f64], floor: f64, t: &Thresholds) -> bool {
    let s = aggregate(clips, t.clip_aggregate);
    let dropped = controls.len() == clips.len() && !controls.is_empty() && aggregate(controls, t.clip_aggregate) - s > t.control_drop;
    s < floor || dropped
}

/// The accepted CLIP scores of a variant's seeds, where its inputs are unchanged.
pub fn accepted_clips(accepted: &ScoreBaseline, candidate: &ScoreBaseline, v: &VariantNumbers) -> Option<Vec<f64>> {
    if !same_inputs(accepted, candidate, &v.label) {
        return None;
    }
    v.seeds.iter().map(|s| accepted.measurements.iter().find(|m| m.metric == Metric::Clip && m.variant == v.label && m.seed == Some(s.seed)).map(|m| m.value)).collect()
}

fn miss_count(c: &CaseInput) -> Option<MissCount> {
    let accepted = c.accepted?;
    let mut out = MissCount { now: Vec::new(), new: Vec::new(), recovered: Vec::new(), compared: 0 };
    for v in &c.numbers.variants {
        let clips: Vec<f64> = v.seeds.iter().map(|s| s.clip).collect();
        let controls: Vec<f64> = v.seeds.iter().filter_map(|s| s.clip_control).collect();
        let now = misses(&clips, &controls, v.floor, c.thresholds);
        if now {
            out.now.push(v.label.clone());
        }
        let Some(before) = accepted_clips(accepted, c.candidate, v) else { continue };
        out.compared += 1;
        let was = misses(&before, &controls, v.floor, c.thresholds);
        if now && !was {
            out.new.push(v.label.clone());
        }
        if was && !now {
            out.recovered.push(v.label.clone());
        }
    }
    (out.compared > 0).then_some(out)
}

fn misses_result(case: &str, m: &MissCount, rejected: bool, budget: &str) -> CheckResult {
    let list = |xs: &[String]| if xs.is_empty() { "none".to_string() } else { xs.join(", ") };
    let counts = format!(
        "{} of {} prompts miss their floor or control drop; {} new ({}), {} recovered ({}); p {:.4}",
        m.now.len(),
        m.compared,
        m.new.len(),
        list(&m.new),
        m.recovered.len(),
        list(&m.recovered),
        more_misses_p(m.new.len(), m.recovered.len())
    );
    let (status, message) = if rejected {
        (Status::Failed, format!("more prompts miss than in the accepted version ({budget}): {counts}"))
    } else if m.new.is_empty() {
        (Status::Passed, format!("no more misses than the accepted version: {counts}"))
    } else {
        (Status::Passed, format!("not significantly more misses than the accepted version (the new ones are review items among the worst prompts): {counts}"))
    };
    CheckResult {
        case: case.to_string(),
        check: "misses".into(),
        status,
        message,
        metrics: vec![("misses".into(), m.now.len() as f64), ("new_misses".into(), m.new.len() as f64)],
        scorer: String::new(),
    }
}
