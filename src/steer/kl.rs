//! Per-token KL(steered ‖ base) in f32, pooled statistics over positions (mean, p50, p90, p95, max), and the
//! sliding-window rmse used by the incoherence trace and the rewind watchdog.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// Which statistic of the pooled per-token KL the dose targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Mean over positions.
    Mean,
    /// 90th percentile.
    P90,
    /// 95th percentile (default: the tail of bad tokens, not the average).
    #[default]
    P95,
    /// Largest value.
    Max,
}

impl Statistic {
    /// Parse `mean`, `p90`, `p95` or `max`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "mean" => Statistic::Mean,
            "p90" => Statistic::P90,
            "p95" => Statistic::P95,
            "max" => Statistic::Max,
            other => {
                return Err(Error::invalid(format!("unknown KL statistic `{other}` (mean, p90, p95, max)")))
            }
        })
    }
}

impl std::fmt::Display for Statistic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Statistic::Mean => "mean",
            Statistic::P90 => "p90",
            Statistic::P95 => "p95",
            Statistic::Max => "max",
        })
    }
}

/// Summary of pooled per-token KL values, nats.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct KlStats {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Maximum.
    pub max: f64,
    /// Number of positions pooled.
    pub n_pos: usize,
}

impl KlStats {
    /// Summarise values; percentiles interpolate linearly between order statistics (numpy's default).
    pub fn from_values(values: &[f32]) -> Self {
        if values.is_empty() {
            return KlStats::default();
        }
        let mut v: Vec<f64> = values.iter().map(|x| *x as f64).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        KlStats {
            mean,
            p50: percentile_sorted(&v, 0.50),
            p90: percentile_sorted(&v, 0.90),
            p95: percentile_sorted(&v, 0.95),
            max: v[v.len() - 1],
            n_pos: v.len(),
        }
    }

    /// The chosen statistic.
    pub fn get(&self, s: Statistic) -> f64 {
        match s {
            Statistic::Mean => self.mean,
            Statistic::P90 => self.p90,
            Statistic::P95 => self.p95,
            Statistic::Max => self.max,
        }
    }
}

/// Percentile `q` ∈ [0, 1] of sorted values with linear interpolation.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let w = pos - lo as f64;
    sorted[lo] * (1.0 - w) + sorted[hi] * w
}

/// KL(p_s ‖ p_b) between the next-token distributions of two rows of raw logits, nats (f32 inputs, f64 sums).
pub fn kl_rows(steered: &[f32], base: &[f32]) -> f32 {
    let ls = log_softmax64(steered);
    let lb = log_softmax64(base);
    // A zero-probability token (log p = −∞) adds nothing; a NaN anywhere makes the KL NaN, never 0.
    let kl: f64 = ls
        .iter()
        .zip(lb.iter())
        .map(|(s, b)| if *s == f64::NEG_INFINITY { 0.0 } else { s.exp() * (s - b) })
        .sum();
    // Rounding can leave a tiny negative value for identical distributions.
    if kl < 0.0 {
        0.0
    } else {
        kl as f32
    }
}

/// Negative log-likelihood of `token` under one row of raw logits, nats.
pub fn nll_row(logits: &[f32], token: u32) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
    match logits.get(token as usize) {
        Some(x) => (lse - *x as f64) as f32,
        None => f32::INFINITY,
    }
}

fn log_softmax64(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| *v as f64 - lse).collect()
}

/// Per-position KL(steered ‖ base) over the last axis of two logit tensors `[.., vocab]`, computed in f32.
pub fn kl_tensor(steered: &Tensor, base: &Tensor) -> Result<Tensor> {
    if steered.dims() != base.dims() {
        return Err(Error::invalid(format!(
            "KL needs logits of one shape, got {:?} and {:?}",
            steered.dims(),
            base.dims()
        )));
    }
    let ls = candle_nn::ops::log_softmax(&steered.to_dtype(DType::F32)?, D::Minus1)?;
    let lb = candle_nn::ops::log_softmax(&base.to_dtype(DType::F32)?, D::Minus1)?;
    let kl = (ls.exp()? * (ls - lb)?)?.sum(D::Minus1)?;
    // Rounding can leave a tiny negative value: clamp with (|x| + x) / 2, which keeps a NaN a NaN (`relu` would
    // turn it into a harmless-looking 0).
    Ok(((kl.abs()? + &kl)? * 0.5)?)
}

/// Root-mean-square of `kl` over the trailing window of `window` tokens ending at each token.
pub fn window_rmse(kl: &[f32], window: usize) -> Vec<f32> {
    let w = window.max(1);
    (0..kl.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(w);
            let s = &kl[lo..=i];
            (s.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / s.len() as f64).sqrt() as f32
        })
        .collect()
}

/// Perplexity of the last `ceil(frac · n)` entries of a per-token NLL trace (at least one token).
/// `None` for an empty trace.
pub fn tail_perplexity(nll: &[f32], frac: f64) -> Option<f64> {
    let n = nll.len();
    if n == 0 {
        return None;
    }
    let k = ((n as f64 * frac.clamp(0.0, 1.0)).ceil() as usize).clamp(1, n);
    let tail = &nll[n - k..];
    let mean = tail.iter().map(|x| *x as f64).sum::<f64>() / k as f64;
    Some(mean.exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile([1..=10], 95) = 9.55, 90 -> 9.1, 50 -> 5.5
        let v: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        let s = KlStats::from_values(&v);
        assert!((s.p95 - 9.55).abs() < 1e-9);
        assert!((s.p90 - 9.1).abs() < 1e-9);
        assert!((s.p50 - 5.5).abs() < 1e-9);
        assert_eq!(s.max, 10.0);
        assert!((s.mean - 5.5).abs() < 1e-9);
        assert_eq!(s.n_pos, 10);
    }

    #[test]
    fn kl_of_known_distributions() -> Result<()> {
        // p = [0.5, 0.5], q = [0.25, 0.75]: KL = 0.5 ln 2 + 0.5 ln(2/3)
        let p = [0.0f32, 0.0];
        let q = [0.0f32, 3f32.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_rows(&p, &q) as f64 - want).abs() < 1e-6);
        assert_eq!(kl_rows(&p, &p), 0.0);
        let t = kl_tensor(&Tensor::new(&[p], &Device::Cpu)?, &Tensor::new(&[q], &Device::Cpu)?)?;
        let got: Vec<f32> = t.to_vec1()?;
        assert!((got[0] as f64 - want).abs() < 1e-6);
        assert!((nll_row(&q, 1) as f64 - (-(0.75f64).ln())).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn window_rmse_is_trailing() {
        let r = window_rmse(&[3.0, 4.0, 0.0], 2);
        assert!((r[0] - 3.0).abs() < 1e-6);
        assert!((r[1] - (12.5f32).sqrt()).abs() < 1e-6);
        assert!((r[2] - (8.0f32).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn statistic_parses() -> Result<()> {
        assert_eq!(Statistic::parse("P95")?, Statistic::P95);
        assert!(Statistic::parse("p99").is_err());
        Ok(())
    }
}
