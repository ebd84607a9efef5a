//! Interval estimates shared by the gates: seeded bootstrap draws, percentile intervals, a ratio-of-sums
//! interval over resampled units, Wilson intervals for proportions. Every bootstrap in the tool draws with
//! `SEED` and `RESAMPLES`, so a report recomputed from the same files gives the same intervals.

use crate::eval::report::nan_f64;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;
/// Seed of every bootstrap.
pub const SEED: u64 = 0x5eed_b007;
/// Coverage of the intervals.
pub const LEVEL: f64 = 0.95;

/// A value with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The value on all units (for a difference: a − b).
    #[serde(with = "nan_f64")]
    pub value: f64,
    /// Lower end.
    #[serde(with = "nan_f64")]
    pub lo: f64,
    /// Upper end.
    #[serde(with = "nan_f64")]
    pub hi: f64,
    /// Resamples in which the number was defined (0 for an analytic interval).
    pub resamples: usize,
}

impl Interval {
    /// Whether the interval lies wholly above or wholly below 0 (a "moved" claim needs this).
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
    /// Its width (NaN when undefined).
    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }
    /// `-2.345 [-2.501, -2.190]`, or `—`.
    pub fn show(&self) -> String {
        if !self.value.is_finite() {
            return "—".into();
        }
        if self.lo.is_finite() && self.hi.is_finite() {
            format!("{:.3} [{:.3}, {:.3}]", self.value, self.lo, self.hi)
        } else {
            format!("{:.3}", self.value)
        }
    }
}

/// The percentile interval of `samples` around `value` (NaN ends when none is finite), numpy's linear
/// interpolation.
pub fn percentile_interval(value: f64, samples: &mut Vec<f64>) -> Interval {
    samples.retain(|x| x.is_finite());
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let h = p * (samples.len() - 1) as f64;
        let (i, f) = (h.floor() as usize, h - h.floor());
        let j = (i + 1).min(samples.len() - 1);
        samples[i] + f * (samples[j] - samples[i])
    };
    let tail = (1.0 - LEVEL) / 2.0;
    Interval { value, lo: q(tail), hi: q(1.0 - tail), resamples: samples.len() }
}

/// `resamples` draws of `n` unit indices with replacement (none when `n` is 0).
pub fn draws(n: usize, resamples: usize, seed: u64) -> impl Iterator<Item = Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..if n == 0 { 0 } else { resamples }).map(move |_| (0..n).map(|_| rng.random_range(0..n)).collect())
}

/// A statistic of units with its bootstrap interval: `stat` gets the unit indices of all units once, then of
/// each resample.
pub fn bootstrap(n: usize, mut stat: impl FnMut(&[usize]) -> f64) -> Interval {
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all);
    let mut samples: Vec<f64> = draws(n, RESAMPLES, SEED).map(|idx| stat(&idx)).collect();
    percentile_interval(value, &mut samples)
}

/// Σ num(i) / Σ den(i) over the unit indices `idx` (a token-weighted mean over prompts, say); NaN when the
/// denominators sum to 0.
pub fn ratio_at(idx: &[usize], num: impl Fn(usize) -> f64, den: impl Fn(usize) -> f64) -> f64 {
    let (a, b) = idx.iter().fold((0.0, 0.0), |(a, b), i| (a + num(*i), b + den(*i)));
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Σ num / Σ den over the units, with its bootstrap interval.
pub fn ratio_of_sums(num: &[f64], den: &[f64]) -> Interval {
    bootstrap(num.len().min(den.len()), |idx| ratio_at(idx, |i| num[i], |i| den[i]))
}

/// The Wilson score interval of a proportion k / n at `LEVEL` (NaN when n is 0).
pub fn wilson(k: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval { value: f64::NAN, lo: f64::NAN, hi: f64::NAN, resamples: 0 };
    }
    let z = 1.959_963_984_540_054; // the 97.5th percentile of the standard normal
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let den = 1.0 + z * z / n;
    let mid = (p + z * z / (2.0 * n)) / den;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / den;
    Interval { value: p, lo: (mid - half).max(0.0), hi: (mid + half).min(1.0), resamples: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile([1, 2, 3, 4, 5], [2.5, 97.5]) = [1.1, 4.9].
        let iv = percentile_interval(3.0, &mut vec![5.0, 1.0, f64::NAN, 3.0, 2.0, 4.0]);
        assert!((iv.lo - 1.1).abs() < 1e-12 && (iv.hi - 4.9).abs() < 1e-12, "{iv:?}");
        assert_eq!(iv.resamples, 5, "the NaN is not a resample");
    }

    #[test]
    fn wilson_matches_the_textbook_values() {
        // statsmodels.stats.proportion.proportion_confint(8, 10, method="wilson") = (0.4902, 0.9433).
        let iv = wilson(8, 10);
        assert!((iv.lo - 0.490_162).abs() < 1e-5 && (iv.hi - 0.943_317).abs() < 1e-5, "{iv:?}");
        // All successes: the upper end is 1, the lower end n / (n + z²).
        let all = wilson(20, 20);
        assert!((all.hi - 1.0).abs() < 1e-12 && (all.lo - 20.0 / (20.0 + 1.959_964f64.powi(2))).abs() < 1e-5);
        assert!(wilson(0, 0).value.is_nan());
    }

    #[test]
    fn a_ratio_of_sums_weights_units_by_their_denominator() {
        // Prompt 1: 10 tokens summing to -10; prompt 2: 30 tokens summing to -90 → -100 / 40 = -2.5.
        let iv = ratio_of_sums(&[-10.0, -90.0], &[10.0, 30.0]);
        assert!((iv.value + 2.5).abs() < 1e-12);
        // Resamples are (1,1) → -1, (2,2) → -3, or mixed → -2.5: the interval's ends are -3 and -1.
        assert!((iv.lo + 3.0).abs() < 1e-12 && (iv.hi + 1.0).abs() < 1e-12, "{iv:?}");
    }
}
