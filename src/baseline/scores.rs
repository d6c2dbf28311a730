//! Score baselines: the measurements of an accepted run, kept beside its images.
//!
//! `baselines/<suite>/<device>-<dtype>/<case>/scores.json` holds every number the checks of a
//! case measured (CLIP text–image per variant and seed, identity, word-order similarity, effect
//! or leak, diversity), the scorer that measured them and, per variant, the inputs that
//! produced its images. A later run pairs its own measurements with these by metric, variant
//! and seed (only where the variant's settings are unchanged) for the `regression` check: a
//! retrained LoRA passes when it is no worse than the accepted one, whatever its pixels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a measurement measures, and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// CLIP text–image cosine of the LoRA's image (raw cosine).
    Clip,
    /// Image–image cosine (of the identity scorer) to the case's reference images.
    Identity,
    /// Image similarity of a tag order to the order as written (0–1).
    WordOrder,
    /// Mean absolute pixel difference from the no-LoRA control (0–1).
    Effect,
    /// The same, on a prompt the LoRA must leave alone: smaller is better.
    Leak,
    /// 1 − mean image similarity between seeds (0–1): the variety of the LoRA's images.
    Diversity,
    /// The aesthetic predictor's score (its own scale).
    Aesthetic,
    /// Image–image cosine (identity scorer) to the accepted images of the same variant: the
    /// reference-free identity signal. Measured against the accepted images on every run, so
    /// never stored.
    Likeness,
}

impl Metric {
    pub const ALL: [Metric; 8] = [Metric::Clip, Metric::Identity, Metric::WordOrder, Metric::Effect, Metric::Leak, Metric::Diversity, Metric::Aesthetic, Metric::Likeness];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Clip => "clip",
            Metric::Identity => "identity",
            Metric::WordOrder => "word-order",
            Metric::Effect => "effect",
            Metric::Leak => "leak",
            Metric::Diversity => "diversity",
            Metric::Aesthetic => "aesthetic",
            Metric::Likeness => "likeness",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Leak)
    }

    /// How much worse `candidate` is than `accepted` (positive = worse).
    pub fn drop(self, accepted: f64, candidate: f64) -> f64 {
        if self.higher_is_better() { accepted - candidate } else { candidate - accepted }
    }
}

/// One number of one case, keyed so a later run can be paired with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub metric: Metric,
    pub variant: String,
    /// `None` for measurements over all seeds (diversity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub value: f64,
}

/// What produced a variant's images, apart from the LoRA files: measurements pair only where
/// this is unchanged (same prompt, settings, base model and weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantInputs {
    /// Hash of the prompt, generation settings, model fingerprint and LoRA weights.
    pub settings: String,
    /// The LoRA files (name and content hash), for the report of what changed.
    pub loras: Vec<(String, String)>,
}

/// The measurements of one case, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreBaseline {
    pub suite: String,
    pub case: String,
    /// The scorers' names and fingerprints: scores of another scorer are not comparable.
    pub scorer: String,
    /// The scorer of each metric (`clip`, `identity`, ... → name and fingerprint, or `pixels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scorers: BTreeMap<String, String>,
    pub variants: BTreeMap<String, VariantInputs>,
    pub measurements: Vec<Measurement>,
}

impl ScoreBaseline {
    /// The LoRA files of any variant, deduplicated, for "what changed" messages.
    pub fn lora_files(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self.variants.values().flat_map(|v| v.loras.iter().cloned()).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Pairs of (accepted, candidate) values per metric, where variant, seed and settings agree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairing {
    pub pairs: BTreeMap<Metric, Vec<(f64, f64)>>,
    /// Candidate measurements without an accepted counterpart (new variants, changed settings).
    pub unpaired: usize,
}

impl Pairing {
    /// Adds another case's pairs.
    pub fn merge(&mut self, other: Pairing) {
        for (m, v) in other.pairs {
            self.pairs.entry(m).or_default().extend(v);
        }
        self.unpaired += other.unpaired;
    }
}

/// Pairs `candidate` with `accepted`.
pub fn pair(accepted: &ScoreBaseline, candidate: &ScoreBaseline) -> Pairing {
    let mut out = Pairing::default();
    let key = |m: &Measurement| (m.metric, m.variant.clone(), m.seed);
    let stored: BTreeMap<_, f64> = accepted.measurements.iter().map(|m| (key(m), m.value)).collect();
    for m in &candidate.measurements {
        let same_inputs = match (accepted.variants.get(&m.variant), candidate.variants.get(&m.variant)) {
            (Some(a), Some(c)) => a.settings == c.settings,
            _ => false,
        };
        match stored.get(&key(m)) {
            Some(&a) if same_inputs && a.is_finite() && m.value.is_finite() => out.pairs.entry(m.metric).or_default().push((a, m.value)),
            _ => out.unpaired += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(values: &[(Metric, &str, Option<u64>, f64)], settings: &str) -> ScoreBaseline {
        let mut variants = BTreeMap::new();
        for (_, v, _, _) in values {
            variants.insert(v.to_string(), VariantInputs { settings: settings.into(), loras: vec![("a.safetensors".into(), "h".into())] });
        }
        ScoreBaseline {
            suite: "s".into(),
            case: "c".into(),
            scorer: "tiny-clip".into(),
            scorers: Default::default(),
            variants,
            measurements: values.iter().map(|(m, v, s, x)| Measurement { metric: *m, variant: v.to_string(), seed: *s, value: *x }).collect(),
        }
    }

    #[test]
    fn pairs_by_metric_variant_and_seed_where_settings_agree() {
        let a = baseline(&[(Metric::Clip, "main", Some(0), 0.3), (Metric::Clip, "main", Some(1), 0.32), (Metric::Leak, "main", Some(0), 0.01)], "x");
        let c = baseline(&[(Metric::Clip, "main", Some(1), 0.31), (Metric::Clip, "main", Some(2), 0.2), (Metric::Leak, "main", Some(0), 0.02)], "x");
        let p = pair(&a, &c);
        assert_eq!(p.pairs[&Metric::Clip], vec![(0.32, 0.31)]);
        assert_eq!(p.pairs[&Metric::Leak], vec![(0.01, 0.02)]);
        assert_eq!(p.unpaired, 1, "seed 2 has no accepted value");
        // Another prompt or weight: nothing pairs.
        let moved = baseline(&[(Metric::Clip, "main", Some(1), 0.31)], "y");
        let p = pair(&a, &moved);
        assert!(p.pairs.is_empty());
        assert_eq!(p.unpaired, 1);
    }

    #[test]
    fn drops_point_the_right_way() {
        assert!(Metric::Clip.drop(0.3, 0.2) > 0.0);
        assert!(Metric::Leak.drop(0.01, 0.05) > 0.0, "more leak is worse");
        assert!(Metric::Leak.drop(0.05, 0.01) < 0.0);
    }
}
