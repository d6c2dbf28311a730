//! The statistics behind the regression, slice and miss-count checks.
//!
//! A retrained LoRA is compared with the accepted one measurement by measurement, paired by
//! variant and seed (same prompt, same noise). A *unit* is one variant's pairs of one metric
//! (two to a few seeds), too few for a test on their own spread, so every unit borrows the noise
//! of the whole run ([`Noise`]): the seed-to-seed spread within units, pooled over every unit of
//! the metric, plus whatever spread of unit means is left beyond it (a retrain may shift one
//! prompt for all its seeds), and how heavy the tails of unit means are. A unit's mean drop is
//! then tested against the tolerance with a one-sided t-test ([`drop_test`]), whose 95 % interval
//! has the right coverage at two pairs because its variance comes from the whole run.
//!
//! Many units, slices and counts are tested in one run. [`benjamini_hochberg`] over all of
//! them keeps the chance that pure seed noise turns the gate red at 5 % or less, whatever the
//! number of prompts.

use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, StudentsT};

/// The noise of one metric's paired drops over a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    /// Standard deviation of one pair around its unit's mean (seed to seed).
    pub within_sd: f64,
    /// Standard deviation of unit means beyond what the seed noise explains, from their median
    /// absolute deviation: a few damaged units do not hide themselves by inflating it.
    pub between_sd: f64,
    /// Degrees of freedom of the variance estimate.
    pub df: f64,
    /// Degrees of freedom of the t distribution one unit's drop is judged by: low where unit
    /// means are heavy-tailed. Clean retrains move a few prompts far (their unit drops had
    /// kurtosis 5 to 40 in our measurements, against 3 for normal data), so a normal model
    /// would call those prompts regressions.
    pub tail_df: f64,
}

/// Fewer units than this: their spread and tails are not estimated (assumed heavy).
const MIN_UNITS: usize = 8;

/// The t distribution whose kurtosis matches `kurtosis` (excess 6/(ν − 4)), at least 4 degrees of
/// freedom; nearly normal data give a nearly normal distribution.
pub fn df_for_kurtosis(kurtosis: f64) -> f64 {
    let excess = kurtosis - 3.0;
    if excess <= 0.006 { 1000.0 } else { (4.0 + 6.0 / excess).clamp(4.0, 1000.0) }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}

/// A standard deviation that a few damaged units cannot inflate: the median absolute deviation,
/// scaled to agree with the standard deviation for normal data.
pub fn robust_sd(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let mut v = xs.to_vec();
    let m = median(&mut v);
    let mut dev: Vec<f64> = xs.iter().map(|x| (x - m).abs()).collect();
    1.4826 * median(&mut dev)
}

fn kurtosis(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let m2 = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    let m4 = xs.iter().map(|x| (x - m).powi(4)).sum::<f64>() / n;
    if m2 < 1e-30 { 3.0 } else { m4 / (m2 * m2) }
}

impl Noise {
    /// Estimates the noise from units of paired drops (each unit one variant's seeds). `None`
    /// when there is nothing to estimate it from: a single pair.
    pub fn estimate(units: &[&[f64]]) -> Option<Noise> {
        let units: Vec<&[f64]> = units.iter().copied().filter(|u| !u.is_empty()).collect();
        if units.len() < 2 && units.first().is_none_or(|u| u.len() < 2) {
            return None;
        }
        let mut ss = 0.0;
        let mut df_within = 0usize;
        for u in units.iter().filter(|u| u.len() >= 2) {
            let m = u.iter().sum::<f64>() / u.len() as f64;
            ss += u.iter().map(|x| (x - m).powi(2)).sum::<f64>();
            df_within += u.len() - 1;
        }
        let means: Vec<f64> = units.iter().map(|u| u.iter().sum::<f64>() / u.len() as f64).collect();
        let within_var = if df_within > 0 { ss / df_within as f64 } else { 0.0 };
        let spread = robust_sd(&means);
        let tail_df = if means.len() >= MIN_UNITS { df_for_kurtosis(kurtosis(&means)) } else { 5.0 };
        if means.len() == 1 {
            // One unit: its seeds' spread is all there is.
            return Some(Noise { within_sd: within_var.sqrt(), between_sd: 0.0, df: df_within as f64, tail_df });
        }
        if df_within == 0 {
            // One value per unit: the units' own spread is all there is.
            return Some(Noise { within_sd: 0.0, between_sd: spread, df: (means.len() - 1) as f64, tail_df });
        }
        let mean_inv_n = units.iter().map(|u| 1.0 / u.len() as f64).sum::<f64>() / means.len() as f64;
        let between_var = (spread * spread - within_var * mean_inv_n).max(0.0);
        Some(Noise { within_sd: within_var.sqrt(), between_sd: between_var.sqrt(), df: df_within as f64, tail_df })
    }

    /// The variance of the mean of `n` pairs of one unit.
    pub fn unit_var(&self, n: usize) -> f64 {
        self.between_sd.powi(2) + self.within_sd.powi(2) / n.max(1) as f64
    }

    /// Degrees of freedom for judging one unit (or a few): the heavier of the estimate's and the
    /// tails'.
    pub fn unit_df(&self) -> f64 {
        self.df.min(self.tail_df).max(1.0)
    }
}

/// A one-sided test of "the mean drop exceeds the tolerance", with its two-sided 95 % t-interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropTest {
    pub mean: f64,
    pub se: f64,
    pub df: f64,
    pub low: f64,
    pub high: f64,
    pub p: f64,
    /// Pairs (or units, for slices) behind the mean.
    pub n: usize,
}

/// Tests `mean` (with variance `var` on `df` degrees of freedom) against `tol`.
pub fn drop_test(mean: f64, var: f64, df: f64, tol: f64, n: usize) -> DropTest {
    let se = var.max(0.0).sqrt();
    if se < 1e-12 {
        // No noise at all (identical images): the drop is what it is.
        let p = if mean > tol + 1e-12 { 0.0 } else { 1.0 };
        return DropTest { mean, se: 0.0, df, low: mean, high: mean, p, n };
    }
    let t = StudentsT::new(0.0, 1.0, df.max(1.0)).expect("df ≥ 1 and unit scale");
    let q = t.inverse_cdf(0.975);
    DropTest { mean, se, df, low: mean - q * se, high: mean + q * se, p: t.sf((mean - tol) / se), n }
}

/// Which of `ps` Benjamini–Hochberg rejects at false-discovery rate `q`. Under the global null
/// this is the chance of any rejection, so `q` bounds the gate's false alarms.
pub fn benjamini_hochberg(ps: &[f64], q: f64) -> Vec<bool> {
    let m = ps.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| ps[a].total_cmp(&ps[b]));
    let mut cut = 0;
    for (rank, &i) in order.iter().enumerate() {
        if ps[i] <= q * (rank + 1) as f64 / m as f64 {
            cut = rank + 1;
        }
    }
    let mut out = vec![false; m];
    for &i in &order[..cut] {
        out[i] = true;
    }
    out
}

/// One-sided exact test that a prompt set has more misses than the accepted version had: of the
/// prompts whose verdict flipped, `new` flipped to a miss and `recovered` back. Under "no worse",
/// each flip is as likely either way (McNemar's test, exact).
pub fn more_misses_p(new: usize, recovered: usize) -> f64 {
    let n = new + recovered;
    if new == 0 || n == 0 {
        return 1.0;
    }
    let b = Binomial::new(0.5, n as u64).expect("p = 0.5");
    // P(X ≥ new) = 1 − P(X ≤ new − 1).
    b.sf(new as u64 - 1)
}

/// The default tolerance of a metric: a quarter of the seed-to-seed standard deviation of its
/// accepted measurements (pooled within variants). A shift smaller than that would take 16
/// seeds of one prompt to see; it is not a regression. `None` without two seeds anywhere.
pub fn tolerance_from_seed_noise(groups: &[&[f64]]) -> Option<f64> {
    let mut ss = 0.0;
    let mut df = 0usize;
    for g in groups.iter().filter(|g| g.len() >= 2) {
        let m = g.iter().sum::<f64>() / g.len() as f64;
        ss += g.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        df += g.len() - 1;
    }
    (df > 0).then(|| 0.25 * (ss / df as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::noise::Rng;

    #[test]
    fn noise_pools_the_seed_spread_and_finds_what_is_left_between_units() {
        let mut rng = Rng::new(1);
        // 40 units of 4 pairs: seed noise 0.05 around unit means spread by 0.03.
        let units: Vec<Vec<f64>> = (0..40)
            .map(|_| {
                let shift = 0.03 * rng.normal();
                (0..4).map(|_| shift + 0.05 * rng.normal()).collect()
            })
            .collect();
        let refs: Vec<&[f64]> = units.iter().map(|u| u.as_slice()).collect();
        let n = Noise::estimate(&refs).unwrap();
        assert!((n.within_sd - 0.05).abs() < 0.008, "{n:?}");
        assert!((0.005..0.05).contains(&n.between_sd), "{n:?}");
        assert_eq!(n.df, 120.0);
        assert!(n.tail_df > 8.0, "normal unit means have light tails: {n:?}");
        // Three damaged units hardly move the spread (median absolute deviation), but they make
        // the tails heavy.
        let mut damaged = units.clone();
        for u in &mut damaged[..3] {
            for x in u.iter_mut() {
                *x += 0.3;
            }
        }
        let refs: Vec<&[f64]> = damaged.iter().map(|u| u.as_slice()).collect();
        let d = Noise::estimate(&refs).unwrap();
        assert!((d.within_sd - n.within_sd).abs() < 1e-12 && d.between_sd < n.between_sd + 0.02, "{d:?} vs {n:?}");
        assert!(d.tail_df < 6.0, "{d:?}");
        // One value per unit: only the spread of the values.
        let single: Vec<Vec<f64>> = (0..10).map(|_| vec![0.02 * rng.normal()]).collect();
        let refs: Vec<&[f64]> = single.iter().map(|u| u.as_slice()).collect();
        let s = Noise::estimate(&refs).unwrap();
        assert_eq!(s.within_sd, 0.0);
        assert!(s.between_sd > 0.0 && s.df == 9.0, "{s:?}");
        assert_eq!(Noise::estimate(&[&[0.1]]), None);
        let one = Noise::estimate(&[&[0.1, 0.3]]).unwrap();
        assert!((one.within_sd - 0.02f64.sqrt()).abs() < 1e-12 && one.between_sd == 0.0 && one.df == 1.0, "{one:?}");
        assert_eq!(df_for_kurtosis(3.0), 1000.0);
        assert_eq!(df_for_kurtosis(9.0), 5.0);
        assert_eq!(df_for_kurtosis(40.0), 4.0 + 6.0 / 37.0);
    }

    #[test]
    fn the_drop_test_is_one_sided_against_the_tolerance() {
        let t = drop_test(0.10, 0.02f64.powi(2), 200.0, 0.02, 4);
        assert!(t.p < 0.001 && t.low > 0.05 && t.high < 0.15, "{t:?}");
        let at_tol = drop_test(0.02, 0.02f64.powi(2), 200.0, 0.02, 4);
        assert!((at_tol.p - 0.5).abs() < 1e-9, "{at_tol:?}");
        assert!(drop_test(-0.1, 0.0004, 200.0, 0.02, 4).p > 0.99, "better is never a regression");
        // Without noise: exact.
        assert_eq!(drop_test(0.0, 0.0, 10.0, 0.02, 2).p, 1.0);
        assert_eq!(drop_test(0.05, 0.0, 10.0, 0.02, 2).p, 0.0);
    }

    /// The interval's coverage is right at two pairs when the noise comes from the whole run,
    /// where a percentile bootstrap of two pairs ([min, max]) covers about half the time.
    #[test]
    fn the_t_interval_covers_95_percent_at_two_pairs() {
        let mut rng = Rng::new(99);
        let trials = 2000;
        let mut covered = 0;
        for _ in 0..trials {
            // A run of 60 units of two pairs with drop 0.02 and seed noise 0.05; look at unit 0.
            let units: Vec<Vec<f64>> = (0..60).map(|_| (0..2).map(|_| 0.02 + 0.05 * rng.normal()).collect()).collect();
            let refs: Vec<&[f64]> = units.iter().map(|u| u.as_slice()).collect();
            let noise = Noise::estimate(&refs).unwrap();
            let m = (units[0][0] + units[0][1]) / 2.0;
            let t = drop_test(m, noise.unit_var(2), noise.unit_df(), 0.0, 2);
            covered += usize::from(t.low <= 0.02 && 0.02 <= t.high);
        }
        let rate = covered as f64 / trials as f64;
        assert!((0.93..=0.98).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn benjamini_hochberg_steps_up() {
        assert_eq!(benjamini_hochberg(&[0.01, 0.02, 0.035, 0.5], 0.05), vec![true, true, true, false]);
        assert_eq!(benjamini_hochberg(&[0.01, 0.04, 0.03, 0.5], 0.05), vec![true, false, false, false]);
        // Step-up: four p-values at 0.04 are all rejected together.
        assert_eq!(benjamini_hochberg(&[0.04; 4], 0.05), vec![true; 4]);
        assert_eq!(benjamini_hochberg(&[0.02, 0.5], 0.05), vec![true, false]);
        assert_eq!(benjamini_hochberg(&[0.03, 0.5], 0.05), vec![false, false]);
        assert_eq!(benjamini_hochberg(&[], 0.05), Vec::<bool>::new());
    }

    #[test]
    fn more_misses_is_mcnemars_exact_test() {
        assert!((more_misses_p(1, 0) - 0.5).abs() < 1e-12, "one new miss is noise");
        assert!((more_misses_p(5, 0) - 1.0 / 32.0).abs() < 1e-12);
        assert!((more_misses_p(7, 1) - 9.0 / 256.0).abs() < 1e-12);
        assert!(more_misses_p(6, 6) > 0.5);
        assert_eq!(more_misses_p(0, 3), 1.0);
    }

    #[test]
    fn the_default_tolerance_is_a_quarter_of_the_seed_spread() {
        let t = tolerance_from_seed_noise(&[&[0.1, 0.3], &[0.5, 0.7]]).unwrap();
        // Within-variant SD: sqrt((0.01+0.01+0.01+0.01)/2) = 0.1414.
        assert!((t - 0.25 * 0.02f64.sqrt()).abs() < 1e-12, "{t}");
        assert_eq!(tolerance_from_seed_noise(&[&[0.1], &[0.2]]), None);
    }
}
