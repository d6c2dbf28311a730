//! Images and embeddings → numbers: everything the checks judge and score baselines store.
//!
//! This is the only stage of the checks that looks at pixels and embeddings. What it produces
//! ([`CaseNumbers`], [`GroupNumbers`]) is plain data, so every verdict ([`super::verdicts`]) can
//! be tested on synthetic numbers without a model.

use std::collections::HashMap;

use super::generate::{ApplyOutcome, Generation, stack_key};
use super::scoring::{Embeddings, dot};
use crate::baseline::scores::{Measurement, Metric, ScoreBaseline, VariantInputs};
use crate::error::Result;
use crate::score::pixels::{mean_abs_diff, mean_std, similarity};
use crate::suite::expand::{CasePlan, Plan, VariantPlan};
use crate::suite::{Case, IdentityGroup, ModelRef, Suite, Variant};

/// The numbers of one seed of one variant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeedNumbers {
    pub seed: u64,
    /// The generation's content key: identical images in other cases or variants share it, so
    /// the statistics never count one generation twice.
    pub image: String,
    /// CLIP text–image cosine of the image, and of its no-LoRA control.
    pub clip: f64,
    pub clip_control: Option<f64>,
    /// Mean absolute pixel difference from the control (0–1).
    pub effect: Option<f64>,
    /// Mean image–image cosine (identity scorer) to the case's references, for the image and
    /// the control.
    pub identity: Option<f64>,
    pub identity_control: Option<f64>,
    /// The aesthetic predictor's score of the image and of the control.
    pub aesthetic: Option<f64>,
    pub aesthetic_control: Option<f64>,
    /// Word order: similarity to the first order's image of the same seed, and the same for
    /// the controls.
    pub order_similarity: Option<f64>,
    pub order_similarity_control: Option<f64>,
    /// Likeness to the accepted images of the same variant (identity scorer, mean cosine to the
    /// accepted images of the other seeds), where the variant's inputs are unchanged apart from
    /// the LoRA files: the reference-free identity signal. `likeness_accepted` is the same for
    /// the accepted image of this seed (how alike the accepted images are among themselves),
    /// `likeness_control` for the no-LoRA control (how alike a picture without the character is).
    pub likeness: Option<f64>,
    pub likeness_accepted: Option<f64>,
    pub likeness_control: Option<f64>,
}

/// The numbers of one variant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VariantNumbers {
    pub label: String,
    pub prompt: String,
    pub score_text: String,
    /// CLIP floor of this variant (raw cosine).
    pub floor: f64,
    pub weight: Option<f64>,
    pub added: Option<String>,
    /// The suite LoRA indices of this variant's stack.
    pub loras: Vec<usize>,
    pub seeds: Vec<SeedNumbers>,
    /// Mean image similarity between the seeds' images (None with one seed), and the same for
    /// the controls: how alike the LoRA's pictures are, against the base model's.
    pub seed_similarity: Option<f64>,
    pub seed_similarity_control: Option<f64>,
    /// The slices the variant belongs to (`bg=grass`, `tag=large`, ...).
    pub slices: Vec<String>,
    /// Every LoRA weight is zero (a sweep's weight 0): its LoRA measurements equal the
    /// control's by construction and are left out of the statistics.
    pub structural: bool,
}

/// Whether a LoRA stack applied to a model.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedNumbers {
    pub model: String,
    /// Several models in the case: the check is named per model.
    pub per_model: bool,
    /// One outcome per distinct stack of LoRA files used on this model (`None`: no report).
    pub outcomes: Vec<Option<ApplyOutcome>>,
}

/// Stacking interference: what each LoRA keeps of its own effect when stacked with another.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StackNumbers {
    pub names: Vec<String>,
    /// `[i][k]`: the share of LoRA i's own pixel change (against the control) that survives
    /// when LoRA k is stacked on it; 1 on the diagonal, `None` where not measurable.
    pub effect_kept: Vec<Vec<Option<f64>>>,
    /// The same in the identity scorer's embedding space: what i keeps of its look.
    pub identity_kept: Vec<Vec<Option<f64>>>,
}

/// Everything measured for one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseNumbers {
    pub case: String,
    pub applied: Vec<AppliedNumbers>,
    /// Models whose LoRA stack was refused.
    pub refused: Vec<String>,
    /// Variants whose images all exist, in plan order.
    pub variants: Vec<VariantNumbers>,
    /// Broken images (`label seed N: why`) and how many were looked at.
    pub broken: Vec<String>,
    pub images: usize,
    pub references: usize,
    /// Per reference image (file name), the mean cosine of the LoRA's images to it.
    pub reference_means: Vec<(String, f64)>,
    pub stack: Option<StackNumbers>,
}

/// An identity group: the lowest mean similarity between two of its cases, for the LoRA's
/// images and for the controls.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNumbers {
    pub name: String,
    pub cases: Vec<String>,
    pub floor: f64,
    pub margin: f64,
    /// `(case a, case b, mean cosine)` of the least alike pair.
    pub lowest: Option<(String, String, f64)>,
    pub lowest_control: Option<f64>,
}

/// What the measuring stage reads.
pub struct Sources<'a> {
    pub suite: &'a Suite,
    pub plan: &'a Plan,
    pub generation: &'a Generation,
    pub emb: &'a Embeddings,
    pub model_fingerprints: &'a HashMap<ModelRef, String>,
    /// Identity embeddings of the accepted images, by (case, image id), for the variants whose
    /// inputs are unchanged apart from the LoRA files.
    pub accepted: &'a HashMap<(String, String), Vec<f32>>,
}

impl Sources<'_> {
    fn image(&self, job: usize) -> &image::RgbImage {
        self.generation.outcomes[job].image.as_ref().expect("only usable variants are measured")
    }

    fn usable(&self, v: &VariantPlan) -> bool {
        v.images.iter().chain(&v.controls).all(|&j| self.generation.outcomes[j].image.is_some())
    }
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Mean pairwise pixel similarity of images (None for fewer than two).
fn pairwise_similarity(src: &Sources, jobs: &[usize]) -> Result<Option<f64>> {
    let mut sims = Vec::new();
    for i in 0..jobs.len() {
        for k in i + 1..jobs.len() {
            sims.push(similarity(src.image(jobs[i]), src.image(jobs[k]))?);
        }
    }
    Ok(mean(&sims))
}

/// Measures one case.
pub fn measure_case(src: &Sources, case: &Case, cp: &CasePlan) -> Result<CaseNumbers> {
    let applied = applied_numbers(src, case, cp);
    let refused: Vec<String> = applied
        .iter()
        .filter(|a| a.outcomes.iter().any(|o| matches!(o, Some(Err(_)))))
        .map(|a| a.model.clone())
        .collect();
    let usable: Vec<&VariantPlan> = cp.variants.iter().filter(|v| src.usable(v)).collect();
    let embedded = |paths: &[std::path::PathBuf]| -> Vec<(std::path::PathBuf, Vec<f32>)> { paths.iter().filter_map(|p| Some((p.clone(), src.emb.references.get(p)?.clone()))).collect() };
    let identity_of = |refs: &[(std::path::PathBuf, Vec<f32>)], job: usize| -> Option<f64> {
        let e = src.emb.identity(job)?;
        mean(&refs.iter().map(|(_, r)| dot(e, r)).collect::<Vec<_>>())
    };
    let mut all_refs: Vec<std::path::PathBuf> = Vec::new();

    let mut broken = Vec::new();
    let mut images = 0;
    let mut variants = Vec::with_capacity(usable.len());
    let first = usable.first().copied();
    for v in &usable {
        for (&j, seed) in v.images.iter().chain(&v.controls).zip(v.seeds.iter().cycle()) {
            images += 1;
            if let Some(why) = broken_image(src, j, case.thresholds.blank) {
                broken.push(format!("{} seed {seed}: {why}", v.label));
            }
        }
        let refs = embedded(&references_of(src.suite, case, v));
        for (p, _) in &refs {
            if !all_refs.contains(p) {
                all_refs.push(p.clone());
            }
        }
        let accepted: Vec<Option<&Vec<f32>>> = v.seeds.iter().map(|&s| src.accepted.get(&(case.name.to_string(), v.image_id(s).to_string()))).collect();
        let character = v.stack.iter().any(|a| a.weight != 0.0 && src.suite.loras[a.lora].triggered_by(&v.prompt));
        let mut seeds = Vec::with_capacity(v.seeds.len());
        for (k, (&j, &seed)) in v.images.iter().zip(&v.seeds).enumerate() {
            let control = v.controls.get(k).copied();
            let mut n = SeedNumbers {
                seed,
                image: src.generation.outcomes[j].key.clone(),
                clip: src.emb.text_score(j, &v.score_text).unwrap_or(f64::NAN),
                clip_control: control.and_then(|c| src.emb.text_score(c, &v.score_text)),
                effect: control.map(|c| mean_abs_diff(src.image(j), src.image(c))).transpose()?,
                ..Default::default()
            };
            if !refs.is_empty() {
                n.identity = identity_of(&refs, j);
                n.identity_control = control.and_then(|c| identity_of(&refs, c));
            }
            if character {
                // Against the accepted images of the other seeds: the same seed shares its noise
                // with this image, which would make any version look alike.
                let others: Vec<&Vec<f32>> = accepted.iter().enumerate().filter(|(i, _)| *i != k).filter_map(|(_, a)| *a).collect();
                let like = |e: Option<&Vec<f32>>| e.and_then(|e| mean(&others.iter().map(|a| dot(e, a)).collect::<Vec<_>>()));
                if let Some(own) = accepted[k].filter(|_| !others.is_empty()) {
                    n.likeness = like(src.emb.identity(j));
                    n.likeness_accepted = like(Some(own));
                    n.likeness_control = like(control.and_then(|c| src.emb.identity(c)));
                }
            }
            n.aesthetic = src.emb.aesthetic[j];
            n.aesthetic_control = control.and_then(|c| src.emb.aesthetic[c]);
            if matches!(case.variant, Variant::WordOrder { .. })
                && let Some(f) = first
                && !std::ptr::eq(f, *v)
            {
                n.order_similarity = Some(similarity(src.image(f.images[k]), src.image(j))?);
                if let (Some(&fc), Some(c)) = (f.controls.get(k), control) {
                    n.order_similarity_control = Some(similarity(src.image(fc), src.image(c))?);
                }
            }
            seeds.push(n);
        }
        variants.push(VariantNumbers {
            label: v.label.to_string(),
            prompt: v.prompt.clone(),
            score_text: v.score_text.clone(),
            floor: v.floor,
            weight: v.weight,
            added: v.added.clone(),
            loras: v.stack.iter().map(|a| a.lora).collect(),
            seeds,
            seed_similarity: pairwise_similarity(src, &v.images)?,
            seed_similarity_control: if v.controls.is_empty() { None } else { pairwise_similarity(src, &v.controls)? },
            slices: v.slices.clone(),
            structural: v.stack.is_empty() || v.stack.iter().all(|a| a.weight == 0.0),
        });
    }
    let stack = match &case.variant {
        Variant::Stack { loras } => Some(stack_numbers(src, loras.iter().map(|a| a.lora).collect(), &usable)?),
        _ => None,
    };
    let lora_images: Vec<&Vec<f32>> = usable.iter().flat_map(|v| v.images.iter().filter_map(|&j| src.emb.identity(j))).collect();
    let refs = embedded(&all_refs);
    let reference_means = refs
        .iter()
        .filter_map(|(p, r)| {
            let name = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string());
            Some((name, mean(&lora_images.iter().map(|e| dot(e, r)).collect::<Vec<_>>())?))
        })
        .collect();
    Ok(CaseNumbers { case: case.name.to_string(), applied, refused, variants, broken, images, references: refs.len(), reference_means, stack })
}

fn broken_image(src: &Sources, job: usize, blank: f64) -> Option<String> {
    let o = &src.generation.outcomes[job];
    let (mean, std) = mean_std(o.image.as_ref()?);
    if o.had_nan {
        Some("NaN during denoising".into())
    } else if mean < 0.02 && std < blank {
        Some(format!("black (mean {mean:.3})"))
    } else if std < blank {
        Some(format!("blank (pixel std {std:.4} < {blank})"))
    } else {
        None
    }
}

fn applied_numbers(src: &Sources, case: &Case, cp: &CasePlan) -> Vec<AppliedNumbers> {
    if case.adapters.is_empty() {
        return Vec::new();
    }
    let per_model = cp.variants.iter().any(|v| v.model != cp.variants[0].model);
    let mut out: Vec<AppliedNumbers> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for v in &cp.variants {
        let Some(&j) = v.images.first() else { continue };
        let job = &src.plan.jobs[j];
        if job.stack.is_empty() {
            continue;
        }
        let key = stack_key(src.suite, &src.model_fingerprints[&v.model], job);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let outcome = src.generation.reports.get(&key).cloned();
        match out.iter_mut().find(|a| a.model == v.model.name) {
            Some(a) => a.outcomes.push(outcome),
            None => out.push(AppliedNumbers { model: v.model.name.clone(), per_model, outcomes: vec![outcome] }),
        }
    }
    out
}

/// Pixels of an image as centred floats, for effect projections.
fn pixels(img: &image::RgbImage) -> Vec<f32> {
    img.as_raw().iter().map(|&p| p as f32 / 255.0).collect()
}

/// One seed of a stacked pair, as vectors (pixels or embeddings): both LoRAs, the other LoRA
/// alone, this LoRA alone, neither.
struct StackSeed {
    both: Vec<f32>,
    other: Vec<f32>,
    alone: Vec<f32>,
    base: Vec<f32>,
}

/// `Σ <both − other, alone − base> / Σ |alone − base|²` over seeds: the share of its own change
/// that a LoRA keeps when the other LoRA is stacked on it.
fn kept(seeds: &[StackSeed]) -> Option<f64> {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for StackSeed { both: a, other: b, alone: c, base: d } in seeds {
        for i in 0..a.len() {
            let own = (c[i] - d[i]) as f64;
            num += (a[i] - b[i]) as f64 * own;
            den += own * own;
        }
    }
    (den > 1e-12).then(|| num / den)
}

fn stack_numbers(src: &Sources, loras: Vec<usize>, usable: &[&VariantPlan]) -> Result<StackNumbers> {
    let n = loras.len();
    let names: Vec<String> = loras.iter().map(|&l| src.suite.loras[l].name.to_string()).collect();
    let find = |set: &[usize]| usable.iter().find(|v| v.stack.len() == set.len() && set.iter().all(|l| v.stack.iter().any(|a| a.lora == *l))).copied();
    let mut effect_kept = vec![vec![None; n]; n];
    let mut identity_kept = vec![vec![None; n]; n];
    for i in 0..n {
        effect_kept[i][i] = Some(1.0);
        identity_kept[i][i] = Some(1.0);
        for k in 0..n {
            if i == k {
                continue;
            }
            let (Some(alone_i), Some(alone_k), Some(both)) = (find(&[loras[i]]), find(&[loras[k]]), find(&[loras[i], loras[k]])) else { continue };
            let seeds = alone_i.images.len().min(both.images.len()).min(alone_k.images.len()).min(alone_i.controls.len());
            let mut px = Vec::new();
            let mut emb = Vec::new();
            for s in 0..seeds {
                let (ji, jk, jb, j0) = (alone_i.images[s], alone_k.images[s], both.images[s], alone_i.controls[s]);
                // What stacking k on i adds beyond k alone, against what i alone adds to the base.
                px.push(StackSeed { both: pixels(src.image(jb)), other: pixels(src.image(jk)), alone: pixels(src.image(ji)), base: pixels(src.image(j0)) });
                let e = |j: usize| src.emb.identity(j).cloned();
                if let (Some(both), Some(other), Some(alone), Some(base)) = (e(jb), e(jk), e(ji), e(j0)) {
                    emb.push(StackSeed { both, other, alone, base });
                }
            }
            effect_kept[i][k] = kept(&px);
            identity_kept[i][k] = if emb.len() == seeds { kept(&emb) } else { None };
        }
    }
    Ok(StackNumbers { names, effect_kept, identity_kept })
}

/// The reference images a variant's identity is scored against: the case's own, else the
/// character sheets of the LoRAs it uses with their triggers.
pub fn references_of(suite: &Suite, case: &Case, v: &VariantPlan) -> Vec<std::path::PathBuf> {
    if !case.references.is_empty() {
        return case.references.clone();
    }
    let mut out: Vec<std::path::PathBuf> = Vec::new();
    for a in v.stack.iter().filter(|a| a.weight != 0.0) {
        let l = &suite.loras[a.lora];
        if l.triggered_by(&v.prompt) {
            out.extend(l.references.iter().filter(|r| !out.contains(r)).cloned().collect::<Vec<_>>());
        }
    }
    out
}

/// Measures an identity group across its cases.
pub fn measure_group(src: &Sources, g: &IdentityGroup) -> GroupNumbers {
    let members: Vec<(&Case, Vec<usize>, Vec<usize>)> = g
        .cases
        .iter()
        .filter_map(|name| {
            let ci = src.suite.cases.iter().position(|c| &c.name == name)?;
            let cp = src.plan.cases.iter().find(|p| p.case == ci)?;
            let ok = |j: &usize| src.emb.identity(*j).is_some();
            let images: Vec<usize> = cp.variants.iter().flat_map(|v| v.images.iter().copied()).filter(ok).collect();
            let controls: Vec<usize> = cp.variants.iter().flat_map(|v| v.controls.iter().copied()).filter(ok).collect();
            Some((&src.suite.cases[ci], images, controls))
        })
        .collect();
    let floor = members.first().map(|(c, _, _)| c.thresholds.identity).unwrap_or(0.8);
    let margin = members.first().map(|(c, _, _)| c.thresholds.relative_margin).unwrap_or(0.05);
    let pair_mean = |a: &[usize], b: &[usize]| -> Option<f64> {
        mean(&a.iter().flat_map(|&x| b.iter().filter_map(move |&y| src.emb.image_image(x, y))).collect::<Vec<_>>())
    };
    let mut lowest: Option<(String, String, f64)> = None;
    let mut lowest_control: Option<f64> = None;
    for i in 0..members.len() {
        for k in i + 1..members.len() {
            let (a, b) = (&members[i], &members[k]);
            if let Some(m) = pair_mean(&a.1, &b.1)
                && lowest.as_ref().is_none_or(|l| m < l.2)
            {
                lowest = Some((a.0.name.to_string(), b.0.name.to_string(), m));
            }
            if let Some(m) = pair_mean(&a.2, &b.2) {
                lowest_control = Some(lowest_control.map_or(m, |l: f64| l.min(m)));
            }
        }
    }
    GroupNumbers { name: g.name.to_string(), cases: g.cases.iter().map(|c| c.to_string()).collect(), floor, margin, lowest, lowest_control }
}

impl CaseNumbers {
    /// The measurements a score baseline stores, keyed by metric, variant and seed.
    pub fn measurements(&self, leak_case: bool) -> Vec<Measurement> {
        let mut out = Vec::new();
        let mut push = |metric, variant: &str, seed, value: Option<f64>| {
            if let Some(value) = value.filter(|v: &f64| v.is_finite()) {
                out.push(Measurement { metric, variant: variant.to_string(), seed, value });
            }
        };
        for v in &self.variants {
            for s in &v.seeds {
                push(Metric::Clip, &v.label, Some(s.seed), Some(s.clip));
                push(Metric::Identity, &v.label, Some(s.seed), s.identity);
                push(Metric::WordOrder, &v.label, Some(s.seed), s.order_similarity);
                push(Metric::Aesthetic, &v.label, Some(s.seed), s.aesthetic);
                push(if leak_case { Metric::Leak } else { Metric::Effect }, &v.label, Some(s.seed), s.effect);
            }
            push(Metric::Diversity, &v.label, None, v.seed_similarity.map(|x| 1.0 - x));
        }
        out
    }

    /// This run's measurements as a score baseline.
    pub fn score_baseline(&self, suite: &Suite, case: &Case, cp: &CasePlan, src: &Sources, scorers: &super::scoring::ScorerNames) -> ScoreBaseline {
        ScoreBaseline {
            suite: suite.name.to_string(),
            case: case.name.to_string(),
            scorer: scorers.combined.clone(),
            scorers: scorers.ids.clone(),
            variants: variant_inputs(suite, case, cp, src.plan, src.model_fingerprints),
            measurements: self.measurements(case.thresholds.leak.is_some()),
        }
    }
}

/// What produced each variant's images apart from the LoRA files: measurements (and accepted
/// images) pair only where this is unchanged.
pub fn variant_inputs(suite: &Suite, case: &Case, cp: &CasePlan, plan: &Plan, model_fingerprints: &HashMap<ModelRef, String>) -> std::collections::BTreeMap<String, VariantInputs> {
    let mut variants = std::collections::BTreeMap::new();
    for v in &cp.variants {
        let Some(&j) = v.images.first() else { continue };
        let job = &plan.jobs[j];
        let settings = serde_json::json!({
            "prompt": v.prompt,
            "score_text": v.score_text,
            "model": model_fingerprints[&v.model],
            "params": format!("{:?}", v.params),
            "weights": job.stack.iter().map(|a| a.weight).collect::<Vec<_>>(),
            // By content: the same character sheet pairs wherever the checkout lives.
            "references": references_of(suite, case, v).iter().map(|r| crate::fsutil::file_hash(r).unwrap_or_else(|_| r.display().to_string())).collect::<Vec<_>>(),
        });
        let loras = job.stack.iter().map(|a| (suite.loras[a.lora].file.name(), suite.loras[a.lora].file.hash.clone())).collect();
        variants.insert(v.label.to_string(), VariantInputs { settings: crate::fsutil::content_hash(settings.to_string().as_bytes()), loras });
    }
    variants
}

/// A LoRA's training images, embedded by the identity scorer and hashed.
pub struct TrainingImages {
    pub dir: std::path::PathBuf,
    /// Where the folder came from (`training_set: …`, or the metadata's dataset).
    pub origin: String,
    /// Path relative to `dir`, identity embedding, perceptual hash.
    pub images: Vec<(String, Vec<f32>, crate::score::phash::PerceptualHash)>,
}

/// One generated image and the training images nearest to it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Nearest {
    pub case: String,
    /// The evidence image (`<variant>-s<seed>`), or its control's.
    pub image: String,
    /// The nearest training image by the identity scorer, its cosine, and the perceptual-hash
    /// distance to that same training image.
    pub training: String,
    pub similarity: f64,
    pub hash_distance: u32,
    /// The nearest training image by perceptual hash, and its distance.
    pub by_hash: String,
    pub by_hash_distance: u32,
    /// For an image made with the LoRA: the identity cosine of its no-LoRA control (same
    /// prompt and seed) to the control's own nearest training image.
    #[serde(default)]
    pub control: Option<f64>,
}

/// Everything the memorization check of one LoRA judges: each distinct image made with it (its
/// trigger in the prompt) and each of their no-LoRA controls, with their nearest training images.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemorizationNumbers {
    pub lora: String,
    pub training_dir: std::path::PathBuf,
    pub origin: String,
    pub training_images: usize,
    /// Identity cosine at or above which an image may be a copy, and how much more alike than
    /// its control it must be.
    pub threshold: f64,
    #[serde(default)]
    pub margin: f64,
    pub images: Vec<Nearest>,
    pub controls: Vec<Nearest>,
    /// The check was asked for but nothing could be measured: why.
    pub missing: Option<String>,
}

/// The nearest training images of one generated image.
fn nearest(hash: &crate::score::phash::PerceptualHash, emb: &[f32], training: &TrainingImages) -> Option<(usize, f64, usize, u32)> {
    let mut by_emb: Option<(usize, f64)> = None;
    let mut by_hash: Option<(usize, u32)> = None;
    for (i, (_, e, h)) in training.images.iter().enumerate() {
        let s = dot(emb, e);
        if by_emb.is_none_or(|b| s > b.1) {
            by_emb = Some((i, s));
        }
        let d = hash.distance(h);
        if by_hash.is_none_or(|b| d < b.1) {
            by_hash = Some((i, d));
        }
    }
    let ((ie, s), (ih, d)) = (by_emb?, by_hash?);
    Some((ie, s, ih, d))
}

/// Measures the memorization check of LoRA `lora` (index into the suite's LoRAs) over every
/// planned image made with it and its trigger, each paired with its no-LoRA control. One
/// generation shared by several cases counts once.
pub fn measure_memorization(src: &Sources, lora: usize, training: &TrainingImages, threshold: f64, margin: f64) -> MemorizationNumbers {
    let l = &src.suite.loras[lora];
    let mut out = MemorizationNumbers {
        lora: l.name.to_string(),
        training_dir: training.dir.clone(),
        origin: training.origin.clone(),
        training_images: training.images.len(),
        threshold,
        margin,
        images: Vec::new(),
        controls: Vec::new(),
        missing: None,
    };
    let near = |case: &str, id: &str, job: usize| -> Option<Nearest> {
        let e = src.emb.identity(job)?;
        let hash = crate::score::phash::PerceptualHash::of(src.image(job));
        let (ie, s, ih, d) = nearest(&hash, e, training)?;
        Some(Nearest {
            case: case.to_string(),
            image: id.to_string(),
            training: training.images[ie].0.clone(),
            similarity: s,
            hash_distance: hash.distance(&training.images[ie].2),
            by_hash: training.images[ih].0.clone(),
            by_hash_distance: d,
            control: None,
        })
    };
    let (mut seen, mut seen_controls) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for cp in &src.plan.cases {
        let case = &src.suite.cases[cp.case];
        for v in cp.variants.iter().filter(|v| src.usable(v)) {
            if !v.stack.iter().any(|a| a.lora == lora && a.weight != 0.0) || !l.triggered_by(&v.prompt) {
                continue;
            }
            for (k, (&j, &seed)) in v.images.iter().zip(&v.seeds).enumerate() {
                let id = v.image_id(seed).to_string();
                let control = v.controls.get(k).and_then(|&c| near(case.name.as_str(), &id, c).map(|n| (c, n)));
                if seen.insert(src.generation.outcomes[j].key.clone())
                    && let Some(mut n) = near(case.name.as_str(), &id, j)
                {
                    n.control = control.as_ref().map(|(_, c)| c.similarity);
                    out.images.push(n);
                }
                if let Some((c, n)) = control
                    && seen_controls.insert(src.generation.outcomes[c].key.clone())
                {
                    out.controls.push(n);
                }
            }
        }
    }
    out
}
