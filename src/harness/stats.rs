//! The statistics behind the regression check.
//!
//! A retrained LoRA is compared with the accepted one measurement by measurement, paired by
//! variant and seed (same prompt, same noise). Two tools:
//! - a paired sign-flip test ([`sign_flip_p`]) of "the mean drop exceeds the tolerance": under
//!   the null hypothesis each pair's excess drop is as likely negative as positive, so every
//!   assignment of signs is equally likely. The check fails when p < 0.05. With n pairs the
//!   smallest possible p is 2^−n, so fewer than five pairs can never be significant: a single
//!   case with two seeds cannot fail by itself, and the suite-wide check pools its pairs;
//! - a seeded bootstrap of the mean drop ([`bootstrap_mean`]) for the 95 % interval the report
//!   shows.

use crate::model::noise::Rng;

/// The mean of paired drops (accepted − candidate, oriented so that positive is worse) and its
/// 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropEstimate {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    pub pairs: usize,
}

const RESAMPLES: usize = 4000;

/// Bootstraps the mean of `drops`; `seed` makes the interval reproducible. `None` without data.
pub fn bootstrap_mean(drops: &[f64], seed: u64) -> Option<DropEstimate> {
    let n = drops.len();
    if n == 0 {
        return None;
    }
    let mean = drops.iter().sum::<f64>() / n as f64;
    let min = drops.iter().copied().fold(f64::INFINITY, f64::min);
    let max = drops.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if n == 1 || min == max {
        return Some(DropEstimate { mean, low: min, high: max, pairs: n });
    }
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| drops[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    Some(DropEstimate { mean, low: at(0.025), high: at(0.975), pairs: n })
}

/// One-sided p-value of the paired sign-flip test that the mean of `excess` is above 0: the
/// share of sign assignments whose mean is at least the observed one. Exact up to 16 pairs,
/// else 20,000 seeded random assignments. 1 without data.
pub fn sign_flip_p(excess: &[f64], seed: u64) -> f64 {
    let n = excess.len();
    if n == 0 {
        return 1.0;
    }
    let observed: f64 = excess.iter().sum();
    // Float sums of the same terms in another order: a tiny slack keeps ties as ties.
    let slack = 1e-12 * excess.iter().map(|x| x.abs()).sum::<f64>().max(1e-300);
    if n <= 16 {
        let total = 1u64 << n;
        let at_least = (0..total)
            .filter(|mask| {
                let s: f64 = excess.iter().enumerate().map(|(i, x)| if mask >> i & 1 == 1 { -x.abs() } else { x.abs() }).sum();
                s >= observed - slack
            })
            .count();
        return at_least as f64 / total as f64;
    }
    const DRAWS: usize = 20_000;
    let mut rng = Rng::new(seed);
    let at_least = (0..DRAWS)
        .filter(|_| {
            let s: f64 = excess.iter().map(|x| if rng.next_u64() & 1 == 1 { -x.abs() } else { x.abs() }).sum();
            s >= observed - slack
        })
        .count();
    (at_least + 1) as f64 / (DRAWS + 1) as f64
}

/// A stable seed from a text (the case and metric), so reruns give the same interval.
pub fn seed_of(text: &str) -> u64 {
    let h = crate::fsutil::content_hash(text.as_bytes());
    u64::from_str_radix(&h[..16], 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_mean_and_narrows_with_more_pairs() {
        let few = [0.01, 0.03, -0.01, 0.02];
        let e = bootstrap_mean(&few, 1).unwrap();
        assert!(e.low <= e.mean && e.mean <= e.high, "{e:?}");
        let many: Vec<f64> = (0..64).map(|i| few[i % 4]).collect();
        let m = bootstrap_mean(&many, 1).unwrap();
        assert!((m.mean - e.mean).abs() < 1e-12);
        assert!(m.high - m.low < (e.high - e.low) * 0.6, "{m:?} vs {e:?}");
    }

    #[test]
    fn reproducible_for_a_seed_and_exact_without_spread() {
        let d = [0.1, -0.2, 0.05, 0.3, 0.0];
        assert_eq!(bootstrap_mean(&d, 7), bootstrap_mean(&d, 7));
        let same = bootstrap_mean(&[0.04, 0.04, 0.04], 3).unwrap();
        assert_eq!((same.low, same.mean, same.high), (0.04, 0.04, 0.04));
        assert_eq!(bootstrap_mean(&[], 1), None);
        // Two pairs: the interval spans them both.
        let two = bootstrap_mean(&[0.01, 0.05], 2).unwrap();
        assert_eq!((two.low, two.high), (0.01, 0.05));
    }

    #[test]
    fn sign_flips_need_enough_pairs_and_a_consistent_excess() {
        assert_eq!(sign_flip_p(&[0.1, 0.1], 1), 0.25, "two pairs: at best p = 1/4");
        assert_eq!(sign_flip_p(&[0.1; 5], 1), 1.0 / 32.0);
        assert!(sign_flip_p(&[0.1; 5], 1) < 0.05);
        assert!(sign_flip_p(&[0.1, -0.1, 0.1, -0.1, 0.1, -0.1], 1) > 0.5);
        assert_eq!(sign_flip_p(&[], 1), 1.0);
        // Many pairs, a small consistent excess: significant; by Monte Carlo past 16 pairs.
        let mut rng = Rng::new(3);
        let xs: Vec<f64> = (0..40).map(|_| 0.02 + 0.03 * rng.normal()).collect();
        let p = sign_flip_p(&xs, 9);
        assert!(p < 0.01, "p {p}");
        let zero: Vec<f64> = (0..40).map(|_| 0.03 * rng.normal()).collect();
        assert!(sign_flip_p(&zero, 9) > 0.05);
    }

    #[test]
    fn the_percentile_interval_covers_the_true_mean_about_95_percent_of_the_time() {
        // Normal drops with mean 0.02: the interval must hold 0.02 in most trials.
        let mut rng = Rng::new(99);
        let trials = 200;
        let mut covered = 0;
        for t in 0..trials {
            let drops: Vec<f64> = (0..30).map(|_| 0.02 + 0.05 * rng.normal()).collect();
            let e = bootstrap_mean(&drops, t).unwrap();
            if e.low <= 0.02 && 0.02 <= e.high {
                covered += 1;
            }
        }
        assert!((175..=200).contains(&covered), "covered {covered} of {trials}");
    }
}
