//! The heal loss: NLL on completion tokens, per-position KL between the student and the reference, its
//! aggregation D over positions (mean, rmse, p95, max), and the barrier `λ_eff · relu(D − τ)`. Everything is
//! built from differentiable candle ops so gradients reach the LoRA variables.

use super::config::{Agg, Reg};
use crate::error::{Error, Result};
use crate::model::fused::{self, KlDirection};
use crate::model::Path;
use candle_core::{DType, Tensor, D};

/// Row-wise log-softmax over the last axis in f32. Off the composite path it is one fused kernel with its own
/// backward where that applies (CPU); the composite ops detach the max shift (it cancels analytically).
pub fn log_softmax(logits: &Tensor, path: Path) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    if path != Path::Composite && fused::applies(&x) {
        return Ok(fused::log_softmax(&x)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// Per-position KL `[n]` between two rows of log-probabilities `[n, vocab]`:
/// `kl_rev` is KL(student ‖ reference) = Σ p_s (log p_s − log p_r); `kl_fwd` and `nll` give
/// KL(reference ‖ student) and KL(student ‖ reference) respectively (`nll` only logs it).
/// Off the composite path, a fused kernel with its own backward where that applies (CPU, constant reference).
pub fn per_position_kl(student_lp: &Tensor, reference_lp: &Tensor, reg: Reg, path: Path) -> Result<Tensor> {
    if path != Path::Composite
        && fused::applies(student_lp)
        && !reference_lp.track_op()
        && student_lp.rank() == 2
    {
        return Ok(fused::kl_rows(student_lp, reference_lp, kl_direction(reg))?);
    }
    let diff = (student_lp - reference_lp)?;
    Ok(match reg {
        Reg::KlRev | Reg::Nll => (student_lp.exp()? * diff)?.sum(D::Minus1)?,
        Reg::KlFwd => (reference_lp.exp()? * diff.neg()?)?.sum(D::Minus1)?,
    })
}

/// The KL each regulariser uses (`nll` logs KL(student ‖ reference)).
fn kl_direction(reg: Reg) -> KlDirection {
    match reg {
        Reg::KlRev | Reg::Nll => KlDirection::StudentToReference,
        Reg::KlFwd => KlDirection::ReferenceToStudent,
    }
}

/// Per-position NLL of `targets` and KL to the reference, both `[n]`, straight from the student's logits
/// `[n, vocab]`. On the training path on CPU this is one kernel (`fused::nll_and_kl`) that never writes the
/// student's log-probabilities; otherwise `log_softmax`, `token_nll` and `per_position_kl` on `path`.
pub fn token_nll_and_kl(
    logits: &Tensor,
    reference_lp: &Tensor,
    targets: &[u32],
    reg: Reg,
    path: Path,
) -> Result<(Tensor, Tensor)> {
    let x = logits.to_dtype(DType::F32)?;
    if path == Path::Training && fused::applies(&x) && !reference_lp.track_op() {
        let terms = fused::nll_and_kl(&x, reference_lp, targets, kl_direction(reg))?;
        let column = |i| terms.narrow(1, i, 1)?.squeeze(1)?.contiguous();
        return Ok((column(0)?, column(1)?));
    }
    let lp = log_softmax(&x, path)?;
    let t = Tensor::new(targets, lp.device())?;
    Ok((token_nll(&lp, &t)?, per_position_kl(&lp, reference_lp, reg, path)?))
}

/// Index (fractional) of quantile `q` in a sorted list of `n` values (NumPy's default linear interpolation).
fn quantile_position(n: usize, q: f64) -> (usize, usize, f64) {
    let pos = q * (n.saturating_sub(1)) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    (lo, hi, pos - lo as f64)
}

/// Aggregate per-position KL `[n]` into a scalar D. p95 and max pick their order statistics from detached
/// values and then read those positions from the live tensor, so the gradient flows to exactly those positions.
pub fn aggregate(kl: &Tensor, agg: Agg) -> Result<Tensor> {
    let n = kl.dim(0)?;
    if n == 0 {
        return Err(Error::invalid("cannot aggregate KL over zero positions"));
    }
    Ok(match agg {
        Agg::Mean => kl.mean_all()?,
        Agg::Rmse => (kl.sqr()?.mean_all()? + 1e-8)?.sqrt()?,
        Agg::P95 | Agg::Max => {
            let vals: Vec<f32> = kl.detach().to_dtype(DType::F32)?.to_vec1()?;
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|a, b| vals[*a].total_cmp(&vals[*b]));
            let q = if agg == Agg::Max { 1.0 } else { 0.95 };
            let (lo, hi, frac) = quantile_position(n, q);
            let idx = Tensor::new(&[order[lo] as u32, order[hi] as u32], kl.device())?;
            let picked = kl.index_select(&idx, 0)?;
            let w = Tensor::new(&[(1.0 - frac) as f32, frac as f32], kl.device())?.to_dtype(kl.dtype())?;
            (picked * w)?.sum_all()?
        }
    })
}

/// Mean negative log-likelihood of `targets` `[n]` under log-probabilities `[n, vocab]`.
pub fn nll(lp: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(token_nll(lp, targets)?.mean_all()?)
}

/// Per-position negative log-likelihood `[n]` of `targets` `[n]` under log-probabilities `[n, vocab]`.
pub fn token_nll(lp: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

/// `λ_eff · relu(D − τ)`; zero for the `nll` regulariser.
pub fn barrier(d: &Tensor, reg: Reg, lambda_eff: f64, tau: f64) -> Result<Tensor> {
    if reg == Reg::Nll || lambda_eff == 0.0 {
        return Ok(d.zeros_like()?);
    }
    Ok(((d - tau)?.relu()? * lambda_eff)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap_or(f32::NAN)
    }

    /// A 4-token loop in 60 tokens: KL ≈ 5.7 nats on the loop, 0 elsewhere.
    fn loop_kl() -> Result<Tensor> {
        let mut v = vec![0f32; 60];
        for x in v.iter_mut().skip(40).take(4) {
            *x = 5.7;
        }
        Ok(Tensor::from_vec(v, 60, &Device::Cpu)?)
    }

    #[test]
    fn rmse_catches_the_short_loop_that_mean_lets_through() -> Result<()> {
        let kl = loop_kl()?;
        let mean = scalar(&aggregate(&kl, Agg::Mean)?);
        let rmse = scalar(&aggregate(&kl, Agg::Rmse)?);
        assert!((mean - 0.38).abs() < 0.005, "mean {mean}");
        assert!((rmse - 1.47).abs() < 0.01, "rmse {rmse}");
        // With τ = 0.5 the mean barrier is silent; the rmse one bites.
        let b_mean = scalar(&barrier(&aggregate(&kl, Agg::Mean)?, Reg::KlRev, 0.3, 0.5)?);
        let b_rmse = scalar(&barrier(&aggregate(&kl, Agg::Rmse)?, Reg::KlRev, 0.3, 0.5)?);
        assert_eq!(b_mean, 0.0);
        assert!((b_rmse - 0.3 * (1.47 - 0.5)).abs() < 0.01, "{b_rmse}");
        assert_eq!(scalar(&aggregate(&kl, Agg::Max)?), 5.7);
        // p95 of 60 values sits at rank 56.05 of the sorted list: inside the loop's four values.
        let p95 = scalar(&aggregate(&kl, Agg::P95)?);
        assert!((p95 - 5.7).abs() < 1e-5, "p95 {p95}");
        // With 3 loop tokens it falls between the last zero (rank 56) and the first loop value (rank 57).
        let mut v = vec![0f32; 60];
        v[10..13].iter_mut().for_each(|x| *x = 5.7);
        let p95 = scalar(&aggregate(&Tensor::from_vec(v, 60, &Device::Cpu)?, Agg::P95)?);
        assert!((p95 - 0.05 * 5.7).abs() < 1e-5, "p95 {p95}");
        Ok(())
    }

    #[test]
    fn max_gradient_reaches_only_the_argmax() -> Result<()> {
        let v = Var::from_vec(vec![0.1f32, 2.0, 0.5], 3, &Device::Cpu)?;
        let d = aggregate(v.as_tensor(), Agg::Max)?;
        let g = d.backward()?;
        let grad: Vec<f32> = g.get(v.as_tensor()).map(|t| t.to_vec1()).transpose()?.unwrap_or_default();
        assert_eq!(grad, vec![0.0, 1.0, 0.0]);
        Ok(())
    }

    #[test]
    fn kl_matches_a_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let s = log_softmax(&Tensor::new(&[[1f32, 0.0]], &dev)?, Path::Training)?;
        let r = log_softmax(&Tensor::new(&[[0f32, 0.0]], &dev)?, Path::Training)?;
        let ps = [1f64.exp() / (1.0 + 1f64.exp()), 1.0 / (1.0 + 1f64.exp())];
        let rev: f64 = ps.iter().map(|p| p * (p / 0.5).ln()).sum();
        let fwd: f64 = ps.iter().map(|p| 0.5 * (0.5 / p).ln()).sum();
        let got_rev = per_position_kl(&s, &r, Reg::KlRev, Path::Training)?.to_vec1::<f32>()?[0] as f64;
        let got_fwd = per_position_kl(&s, &r, Reg::KlFwd, Path::Training)?.to_vec1::<f32>()?[0] as f64;
        assert!((got_rev - rev).abs() < 1e-6, "{got_rev} vs {rev}");
        assert!((got_fwd - fwd).abs() < 1e-6, "{got_fwd} vs {fwd}");
        Ok(())
    }

    #[test]
    fn nll_picks_the_target_log_probs() -> Result<()> {
        let dev = Device::Cpu;
        let lp = Tensor::new(&[[-0.1f32, -2.0], [-3.0, -0.05]], &dev)?;
        let t = Tensor::new(&[1u32, 1], &dev)?;
        assert!((scalar(&nll(&lp, &t)?) - 1.025).abs() < 1e-6);
        Ok(())
    }
}
