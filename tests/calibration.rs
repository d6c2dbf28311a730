//! The gate's statistics calibrated on synthetic measurements, without a model: the run-wide
//! verdicts (`regression`, `slice`, `identity/accepted`, `misses`) judge made-up accepted and
//! retrained numbers whose truth is known.
//!
//! - False alarms: pure seed noise (a clean retrain) turns the gate red in at most 5 % of runs,
//!   on a portrait-like suite of 13 cases and on a hundred-prompt suite, also when clean
//!   retrains move single prompts far (heavy-tailed shifts, as measured on real retrains).
//! - Power: a drop of 0.1 (cosine) on 3 of 13 cases fails `regression` in at least 90 % of runs,
//!   and one slice of 16 of 100 prompts that loses its identity fails `slice` and
//!   `identity/accepted`, naming the slice, in at least 90 %.
//! - The local-damage example: 3 of 13 cases down 0.15 on both of two seeds (the pooled mean
//!   moves by less than the tolerance) fails `regression`.
//!
//! The noise levels are stated beside each test. docs/statistics.md gives power at other levels,
//! and the shapes world's tiny-clip is noisier than the levels tested here (0.086 per pair).

use std::collections::BTreeMap;

use loragate::baseline::scores::{Measurement, Metric, ScoreBaseline, VariantInputs};
use loragate::harness::Status;
use loragate::harness::measure::{CaseNumbers, SeedNumbers, VariantNumbers};
use loragate::harness::run_verdicts::{CaseInput, RunVerdicts, judge};
use loragate::model::noise::Rng;
use loragate::suite::{Thresholds, Tolerances};

/// One synthetic variant: its slices and, per seed, (accepted, now) of one metric.
struct SynthVariant {
    label: String,
    slices: Vec<String>,
    pairs: Vec<(f64, f64)>,
}

struct SynthCase {
    name: String,
    prompt_set: bool,
    metric: Metric,
    variants: Vec<SynthVariant>,
}

/// What `judge` reads, built from synthetic cases: the candidate's numbers, its score baseline
/// and the accepted one, all variants with unchanged inputs.
struct Built {
    numbers: Vec<CaseNumbers>,
    candidates: Vec<ScoreBaseline>,
    accepted: Vec<ScoreBaseline>,
    thresholds: Thresholds,
}

fn build(cases: &[SynthCase]) -> Built {
    let mut out = Built { numbers: Vec::new(), candidates: Vec::new(), accepted: Vec::new(), thresholds: Thresholds::default() };
    for c in cases {
        let mut variants = Vec::new();
        let mut inputs = BTreeMap::new();
        let (mut acc, mut now) = (Vec::new(), Vec::new());
        for v in &c.variants {
            let seeds: Vec<SeedNumbers> = v
                .pairs
                .iter()
                .enumerate()
                .map(|(s, &(a, x))| {
                    let mut n = SeedNumbers { seed: s as u64, image: format!("{}/{}/{s}", c.name, v.label), clip: 0.6, clip_control: Some(0.6), ..Default::default() };
                    match c.metric {
                        Metric::Clip => n.clip = x,
                        Metric::Likeness => {
                            n.likeness = Some(x);
                            n.likeness_accepted = Some(a);
                            n.likeness_control = Some(0.2);
                        }
                        other => panic!("no synthetic {other:?}"),
                    }
                    n
                })
                .collect();
            for (s, &(a, x)) in v.pairs.iter().enumerate() {
                if c.metric == Metric::Clip {
                    acc.push(Measurement { metric: Metric::Clip, variant: v.label.clone(), seed: Some(s as u64), value: a });
                    now.push(Measurement { metric: Metric::Clip, variant: v.label.clone(), seed: Some(s as u64), value: x });
                }
            }
            inputs.insert(v.label.clone(), VariantInputs { settings: "same".into(), loras: vec![("zorb.safetensors".into(), "h".into())] });
            variants.push(VariantNumbers { label: v.label.clone(), floor: 0.25, seeds, slices: v.slices.clone(), ..Default::default() });
        }
        let baseline = |measurements: Vec<Measurement>| ScoreBaseline {
            suite: "s".into(),
            case: c.name.clone(),
            scorer: "tiny-clip".into(),
            scorers: Default::default(),
            variants: inputs.clone(),
            measurements,
        };
        out.accepted.push(baseline(acc));
        out.candidates.push(baseline(now));
        out.numbers.push(CaseNumbers {
            case: c.name.clone(),
            applied: vec![],
            refused: vec![],
            variants,
            broken: vec![],
            images: 0,
            references: 0,
            reference_means: vec![],
            stack: None,
        });
    }
    out
}

fn run(cases: &[SynthCase], tolerance: Option<f64>) -> RunVerdicts {
    let mut b = build(cases);
    if let Some(t) = tolerance {
        b.thresholds.regression = Tolerances { all: Some(t), per_metric: Default::default() };
    }
    let inputs: Vec<CaseInput> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| CaseInput {
            name: &c.name,
            thresholds: &b.thresholds,
            prompt_set: c.prompt_set,
            numbers: &b.numbers[i],
            candidate: &b.candidates[i],
            accepted: Some(&b.accepted[i]),
            no_accepted: None,
            changed: String::new(),
        })
        .collect();
    judge(&inputs, &b.thresholds.regression)
}

fn failed(v: &RunVerdicts, check: &str) -> Vec<String> {
    v.per_case.iter().flatten().chain(&v.suite).filter(|r| r.status == Status::Failed && r.check == check).map(|r| format!("{} · {}: {}", r.case, r.check, r.message)).collect()
}

fn any_failure(v: &RunVerdicts) -> bool {
    v.per_case.iter().flatten().chain(&v.suite).any(|r| r.status.is_failure())
}

/// A seed pair: the accepted value and the retrained one around the same prompt mean, their
/// seed noise correlated by `rho` (the same seed's noise: the retrain draws a similar picture).
fn pair(rng: &mut Rng, mean: f64, sd: f64, rho: f64, drop: f64) -> (f64, f64) {
    let a = rng.normal();
    let c = rho * a + (1.0 - rho * rho).sqrt() * rng.normal();
    (mean + sd * a, mean - drop + sd * c)
}

/// The portrait suite's shape: 13 cases; seven of one variant, then a tag order of five, a
/// ladder and a base swap of two, a stack of three, a sweep of three (weight 0 left out) and a
/// bisection of four.
const PORTRAIT: [(&str, usize); 13] = [
    ("training-prompt", 1),
    ("sky-left", 1),
    ("sky-right", 1),
    ("on-grass", 1),
    ("at-night", 1),
    ("on-white", 1),
    ("no-trigger", 1),
    ("tag-order", 5),
    ("ladder", 2),
    ("other-base", 2),
    ("stacked", 3),
    ("sweep", 3),
    ("failure-point", 4),
];

/// A portrait-like run of CLIP pairs: seed spread `sd` (the same for accepted and retrained),
/// `drop` on the named cases, and per-prompt shifts from `shift` (what a retrain moves a prompt
/// by for all its seeds).
fn portrait(rng: &mut Rng, seeds: usize, sd: f64, damaged: &[&str], drop: f64, shift: &mut dyn FnMut(&mut Rng) -> f64) -> Vec<SynthCase> {
    PORTRAIT
        .iter()
        .map(|&(name, n)| SynthCase {
            name: name.into(),
            prompt_set: false,
            metric: Metric::Clip,
            variants: (0..n)
                .map(|v| {
                    let mean = 0.3 + 0.4 * rng.uniform();
                    let d = if damaged.contains(&name) { drop } else { 0.0 } + shift(rng);
                    SynthVariant {
                        label: format!("v{v}"),
                        slices: if n > 1 { vec![format!("first=t{v}")] } else { vec![] },
                        pairs: (0..seeds).map(|_| pair(rng, mean, sd, 0.45, d)).collect(),
                    }
                })
                .collect(),
        })
        .collect()
}

/// A hundred-prompt run of likeness pairs in three prompt sets sliced by background (six, and a
/// seventh of 16 prompts: the one that may lose its identity), size and place.
fn hundred(rng: &mut Rng, seeds: usize, sd: f64, slice_drop: f64, shift: &mut dyn FnMut(&mut Rng) -> f64) -> Vec<SynthCase> {
    let mut prompts: Vec<(usize, Vec<String>)> = (0..100usize)
        .map(|i| {
            let bg = if i % 100 < 16 { "moss".to_string() } else { format!("bg{}", i % 6) };
            (i, vec![format!("bg={bg}"), format!("size={}", i % 2), format!("place={}", i % 5)])
        })
        .collect();
    // Spread the 16 over the three sets as the committed suite's matrices would.
    prompts.sort_by_key(|(i, _)| (i * 37) % 100);
    let sets = [("attributes", 60), ("reordered", 20), ("styled", 20)];
    let mut cases = Vec::new();
    let mut it = prompts.into_iter();
    for (name, n) in sets {
        let variants = (0..n)
            .map(|k| {
                let (i, slices) = it.next().expect("100 prompts");
                let d = if slices[0] == "bg=moss" { slice_drop } else { 0.0 } + shift(rng);
                let mean = 0.7 + 0.1 * rng.normal();
                SynthVariant { label: format!("p{i}-{k}"), slices, pairs: (0..seeds).map(|_| pair(rng, mean, sd, 0.3, d)).collect() }
            })
            .collect();
        cases.push(SynthCase { name: name.into(), prompt_set: true, metric: Metric::Likeness, variants });
    }
    cases
}

const TRIALS: usize = 300;

/// Seed noise measured on retrains of the committed recipe (tiny-clip, 4 seeds): CLIP 0.09 per
/// seed, likeness 0.15.
const CLIP_SEED_SD: f64 = 0.09;
const LIKENESS_SEED_SD: f64 = 0.15;

#[test]
fn pure_seed_noise_turns_the_gate_red_in_at_most_5_percent_of_runs() {
    let mut rng = Rng::new(1);
    let mut none = |_: &mut Rng| 0.0;
    let portrait_alarms = (0..TRIALS).filter(|_| any_failure(&run(&portrait(&mut rng, 4, CLIP_SEED_SD, &[], 0.0, &mut none), None))).count();
    let hundred_alarms = (0..TRIALS).filter(|_| any_failure(&run(&hundred(&mut rng, 4, LIKENESS_SEED_SD, 0.0, &mut none), None))).count();
    eprintln!("false alarms: portrait-like {portrait_alarms} of {TRIALS}, hundred-like {hundred_alarms} of {TRIALS}");
    assert!(portrait_alarms * 20 <= TRIALS, "portrait-like: {portrait_alarms} of {TRIALS}");
    assert!(hundred_alarms * 20 <= TRIALS, "hundred-like: {hundred_alarms} of {TRIALS}");
}

/// Clean retrains also move a few prompts far for all their seeds: per-prompt shifts from a
/// Student t with 3 degrees of freedom (infinite kurtosis) must not turn the gate red either.
#[test]
fn heavy_tailed_retrain_shifts_stay_under_5_percent_false_alarms() {
    let mut rng = Rng::new(2);
    let t3 = |rng: &mut Rng| {
        let z = rng.normal();
        let chi: f64 = (0..3).map(|_| rng.normal().powi(2)).sum();
        z / (chi / 3.0).sqrt()
    };
    let mut clip_shift = |rng: &mut Rng| 0.03 * t3(rng);
    let portrait_alarms = (0..TRIALS).filter(|_| any_failure(&run(&portrait(&mut rng, 4, CLIP_SEED_SD, &[], 0.0, &mut clip_shift), None))).count();
    let mut likeness_shift = |rng: &mut Rng| 0.05 * t3(rng);
    let hundred_alarms = (0..TRIALS).filter(|_| any_failure(&run(&hundred(&mut rng, 4, LIKENESS_SEED_SD, 0.0, &mut likeness_shift), None))).count();
    eprintln!("false alarms with heavy-tailed shifts: portrait-like {portrait_alarms} of {TRIALS}, hundred-like {hundred_alarms} of {TRIALS}");
    assert!(portrait_alarms * 20 <= TRIALS, "portrait-like: {portrait_alarms} of {TRIALS}");
    assert!(hundred_alarms * 20 <= TRIALS, "hundred-like: {hundred_alarms} of {TRIALS}");
}

/// A drop of 0.1 on three of the thirteen cases (drawn anew each run), 4 seeds, at a seed
/// spread of 0.03: the spread of a CLIP whose cosines live in a narrow band, as ViT-L/14's do
/// around 0.2–0.35. docs/statistics.md lists the power at tiny-clip's wider spread.
#[test]
fn a_drop_of_a_tenth_on_three_of_thirteen_cases_fails_regression_in_90_percent() {
    let mut rng = Rng::new(3);
    let mut none = |_: &mut Rng| 0.0;
    let (mut found, mut named, mut wrong) = (0, 0, 0);
    for _ in 0..TRIALS {
        let mut names: Vec<&str> = PORTRAIT.iter().map(|(n, _)| *n).collect();
        let damaged: Vec<&str> = (0..3).map(|_| names.remove(rng.below(names.len()))).collect();
        let v = run(&portrait(&mut rng, 4, 0.03, &damaged, 0.1, &mut none), None);
        let hits: Vec<String> = failed(&v, "regression").into_iter().filter(|h| !h.starts_with("all-cases")).collect();
        found += usize::from(!hits.is_empty());
        let right = hits.iter().filter(|h| damaged.iter().any(|d| h.starts_with(d))).count();
        named += right;
        wrong += hits.len() - right;
    }
    eprintln!("power, 0.1 on 3 of 13 cases at seed spread 0.03: {found} of {TRIALS} runs fail; {named} damaged cases named, {wrong} others");
    assert!(found * 10 >= TRIALS * 9, "{found} of {TRIALS}");
    // Benjamini–Hochberg bounds the share of wrongly named cases among those named (5 %).
    assert!(wrong * 20 <= named + wrong, "{wrong} of {} named cases did not drop", named + wrong);
}

/// One slice of 16 of 100 prompts loses the character: its likeness to the accepted images
/// drops by 0.3 (our mislabeled-slice retrain lost 0.47 to 0.68 on its slice), at the seed
/// spread measured on retrains (0.15), 4 seeds.
#[test]
fn a_slice_of_sixteen_prompts_losing_identity_is_named_in_90_percent() {
    let mut rng = Rng::new(4);
    let mut none = |_: &mut Rng| 0.0;
    let (mut named, mut others) = (0, 0);
    for _ in 0..TRIALS {
        let v = run(&hundred(&mut rng, 4, LIKENESS_SEED_SD, 0.3, &mut none), None);
        let slices = failed(&v, "slice");
        let identity = failed(&v, "identity/accepted");
        let names_it = |xs: &[String]| xs.iter().any(|x| x.contains("bg=moss"));
        named += usize::from(names_it(&slices) && names_it(&identity) && slices.iter().any(|s| s.starts_with("all-cases")));
        others += v.slices.iter().filter(|r| r.failed && r.slice != "bg=moss").count();
    }
    eprintln!("power, one slice of 16 of 100 prompts losing identity: named in {named} of {TRIALS} runs; {others} other slices named in all");
    assert!(named * 10 >= TRIALS * 9, "{named} of {TRIALS}");
}

/// The example: three of thirteen cases drop 0.15 on both of their two seeds, the other
/// pairs differ by seed noise of 0.02. Pooled over all pairs that moves the mean by 0.017, under
/// the 0.02 tolerance, so a pooled test alone passes it; the per-case tests find it.
#[test]
fn the_local_damage_example_fails_regression() {
    let mut rng = Rng::new(5);
    let mut none = |_: &mut Rng| 0.0;
    let damaged = ["sky-left", "at-night", "on-white"];
    let cases = portrait(&mut rng, 2, 0.02, &damaged, 0.15, &mut none);
    let pairs: usize = cases.iter().map(|c| c.variants.iter().map(|v| v.pairs.len()).sum::<usize>()).sum();
    let damaged_pairs: usize = cases.iter().filter(|c| damaged.contains(&c.name.as_str())).map(|c| c.variants.iter().map(|v| v.pairs.len()).sum::<usize>()).sum();
    // 52 pairs here: the sweep's weight 0 is left out (it is the control by construction).
    assert_eq!((damaged_pairs, pairs), (6, 52));
    assert!(0.15 * damaged_pairs as f64 / (pairs as f64) < 0.02, "the pooled mean moves by less than the tolerance");
    let v = run(&cases, Some(0.02));
    let hits = failed(&v, "regression");
    for d in damaged {
        assert!(hits.iter().any(|h| h.starts_with(d)), "{d} is not named: {hits:#?}");
    }
    assert_eq!(hits.iter().filter(|h| !damaged.iter().any(|d| h.starts_with(d)) && !h.starts_with("all-cases")).count(), 0, "{hits:#?}");
}

/// The power of `regression` against 0.1 on 3 of 13 cases at other seed spreads and seed
/// counts, for docs/statistics.md (a measurement, not a check):
/// `cargo test --release --test calibration -- --ignored --nocapture`.
#[test]
#[ignore]
fn power_table() {
    let mut rng = Rng::new(6);
    let mut none = |_: &mut Rng| 0.0;
    eprintln!("seed spread | seeds | false alarms | power (0.1 on 3 of 13 cases)");
    for sd in [0.03, 0.05, 0.09] {
        for seeds in [2, 4, 8] {
            let alarms = (0..TRIALS).filter(|_| any_failure(&run(&portrait(&mut rng, seeds, sd, &[], 0.0, &mut none), None))).count();
            let found = (0..TRIALS)
                .filter(|_| {
                    let mut names: Vec<&str> = PORTRAIT.iter().map(|(n, _)| *n).collect();
                    let damaged: Vec<&str> = (0..3).map(|_| names.remove(rng.below(names.len()))).collect();
                    !failed(&run(&portrait(&mut rng, seeds, sd, &damaged, 0.1, &mut none), None), "regression").is_empty()
                })
                .count();
            eprintln!("{sd:.2} | {seeds} | {:.1} % | {:.0} %", 100.0 * alarms as f64 / TRIALS as f64, 100.0 * found as f64 / TRIALS as f64);
        }
    }
}
