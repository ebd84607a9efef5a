//! Iso-KL dosing: find the coefficient c* at which a statistic (p95 by default) of per-token
//! KL(steered ‖ base) over greedy steered rollouts equals a target (1 nat by default).
//!
//! Measuring at c: greedy-generate T tokens per calibration prompt with the vector added at c; teacher-force
//! prompt + rollout through the base and the steered model; KL at every rollout position (the stop token's
//! position included), in f32, pooled over prompts.
//!
//! Search: start at the geometric middle of the bracket, double (or halve) until the target is crossed, then
//! Illinois regula falsi on log c against log stat (KL ≈ ½c²·vᵀFv near 0, so the log-log curve is close to a
//! line of slope 2), falling back to geometric bisection when a step leaves the bracket or the secant is flat.
//! The whole history is kept; a target never crossed inside the bracket returns the bracket edge with a warning.

use super::kl::{kl_tensor, KlStats, Statistic};
use super::vector::{Calibration, Steering};
use crate::error::{Error, Result};
use crate::model::generate::{generate, Sampling};
use crate::model::{Forward, LoadedModel, LogitsAt, ModelInfo, Path};
use crate::progress::Progress;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Root-finding options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SolverConfig {
    /// Target value of the statistic, nats.
    pub target: f64,
    /// Stop when |stat − target| < tol.
    pub tol: f64,
    /// Smallest coefficient tried.
    pub lo: f64,
    /// Largest coefficient tried.
    pub hi: f64,
    /// Most refinement steps after the target is bracketed.
    pub max_iters: usize,
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig { target: 1.0, tol: 0.05, lo: 0.01, hi: 16.0, max_iters: 12 }
    }
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Solution {
    /// The chosen coefficient.
    pub coefficient: f64,
    /// The statistic measured there.
    pub stat: f64,
    /// |stat − target| < tol.
    pub converged: bool,
    /// The statistic was seen on both sides of the target.
    pub crossed: bool,
    /// Why the result may not be what was asked for.
    pub warning: Option<String>,
    /// Every (coefficient, statistic) evaluated, in order.
    pub history: Vec<(f64, f64)>,
}

/// Find c with `f(c)` ≈ `cfg.target` for an increasing `f` (see the module notes).
pub fn solve_iso_kl(cfg: &SolverConfig, f: &mut dyn FnMut(f64) -> Result<f64>) -> Result<Solution> {
    if !(cfg.lo > 0.0 && cfg.hi > cfg.lo && cfg.target > 0.0 && cfg.tol > 0.0) {
        return Err(Error::invalid(format!(
            "iso-KL needs 0 < lo < hi and a positive target and tolerance (lo {}, hi {}, target {}, tol {})",
            cfg.lo, cfg.hi, cfg.target, cfg.tol
        )));
    }
    let mut history: Vec<(f64, f64)> = Vec::new();
    let mut eval = |c: f64, history: &mut Vec<(f64, f64)>| -> Result<f64> {
        let s = f(c)?;
        if !s.is_finite() {
            return Err(Error::invalid(format!("KL statistic at coefficient {c} is not finite ({s})")));
        }
        history.push((c, s));
        Ok(s)
    };
    let hit = |s: f64| (s - cfg.target).abs() < cfg.tol;
    let done = |c: f64, s: f64, crossed: bool, history: Vec<(f64, f64)>| Solution {
        coefficient: c,
        stat: s,
        converged: true,
        crossed,
        warning: None,
        history,
    };

    // 1. Bracket from the geometric middle.
    let c0 = (cfg.lo * cfg.hi).sqrt();
    let s0 = eval(c0, &mut history)?;
    if hit(s0) {
        return Ok(done(c0, s0, false, history));
    }
    // Below the target: double towards `hi`; above it: halve towards `lo`; stop once the target is crossed.
    let up = s0 < cfg.target;
    let (mut c_prev, mut s_prev) = (c0, s0);
    let (a, sa, b, sb);
    loop {
        let (edge, at_edge) = if up { (cfg.hi, c_prev >= cfg.hi) } else { (cfg.lo, c_prev <= cfg.lo) };
        if at_edge {
            let warning = Some(format!(
                "KL {:.3} at the {} coefficient {edge} stays {} the target {}; returning the bracket edge",
                s_prev,
                if up { "largest" } else { "smallest" },
                if up { "below" } else { "above" },
                cfg.target
            ));
            return Ok(Solution {
                coefficient: c_prev,
                stat: s_prev,
                converged: false,
                crossed: false,
                warning,
                history,
            });
        }
        let c = if up { (2.0 * c_prev).min(cfg.hi) } else { (0.5 * c_prev).max(cfg.lo) };
        let s = eval(c, &mut history)?;
        if hit(s) {
            return Ok(done(c, s, true, history));
        }
        if up && s > cfg.target {
            (a, sa, b, sb) = (c_prev, s_prev, c, s);
            break;
        }
        if !up && s < cfg.target {
            (a, sa, b, sb) = (c, s, c_prev, s_prev);
            break;
        }
        (c_prev, s_prev) = (c, s);
    }

    // 2. Illinois regula falsi in log-log space between a (below) and b (above).
    let lt = cfg.target.ln();
    let resid = |s: f64| s.max(1e-12).ln() - lt;
    let (mut xa, mut ya, mut xb, mut yb) = (a.ln(), resid(sa), b.ln(), resid(sb));
    // Which end was replaced last and how many times in a row.
    let mut last_side = 0i8;
    let mut streak = 0usize;
    for _ in 0..cfg.max_iters {
        let denom = yb - ya;
        let mut x = if denom.abs() < 1e-6 { 0.5 * (xa + xb) } else { xb - yb * (xb - xa) / denom };
        if !x.is_finite() || x <= xa.min(xb) || x >= xa.max(xb) {
            x = 0.5 * (xa + xb);
        }
        let c = x.exp();
        let s = eval(c, &mut history)?;
        if hit(s) {
            return Ok(done(c, s, true, history));
        }
        let y = resid(s);
        let side = if y < 0.0 { -1 } else { 1 };
        if side < 0 {
            (xa, ya) = (x, y);
        } else {
            (xb, yb) = (x, y);
        }
        streak = if side == last_side { streak + 1 } else { 1 };
        last_side = side;
        if streak >= 2 {
            // The other end has gone stale: halve its log-residual so the next secant moves towards it.
            if side < 0 {
                yb *= 0.5;
            } else {
                ya *= 0.5;
            }
        }
    }
    let (c, s) = history
        .iter()
        .copied()
        .min_by(|p, q| (p.1 - cfg.target).abs().total_cmp(&(q.1 - cfg.target).abs()))
        .ok_or_else(|| Error::invalid("iso-KL evaluated nothing"))?;
    let warning = Some(format!(
        "no coefficient within tolerance {} of the target {} after {} refinement steps; closest: c = {c:.4} with {s:.4}",
        cfg.tol, cfg.target, cfg.max_iters
    ));
    Ok(Solution { coefficient: c, stat: s, converged: false, crossed: true, warning, history })
}

/// Options of a calibration on a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoseConfig {
    /// Root-finding options.
    pub solver: SolverConfig,
    /// Statistic of the pooled per-token KL.
    pub statistic: Statistic,
    /// Greedy rollout length per prompt.
    pub tokens: usize,
    /// Calibration user prompts.
    pub prompts: Vec<String>,
    /// System prompt of the calibration chats (the neutral one used for generation).
    pub system: String,
}

/// One measured coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DosePoint {
    /// Coefficient.
    pub coefficient: f64,
    /// Value of the targeted statistic.
    pub stat: f64,
    /// All statistics of the pooled KL.
    pub kl: KlStats,
}

/// The result of `dose`, written as `dose.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoseReport {
    /// Model the dose was measured on.
    pub model: ModelInfo,
    /// Vector file, when known.
    pub vector: Option<String>,
    /// Options used.
    pub config: DoseConfig,
    /// Calibrated coefficient c*.
    pub c_star: f64,
    /// Statistic at c*.
    pub achieved: f64,
    /// |achieved − target| < tol.
    pub converged: bool,
    /// The target was crossed inside the bracket.
    pub crossed: bool,
    /// Set when the target was never crossed or not reached within tolerance.
    pub warning: Option<String>,
    /// Every evaluation in order.
    pub history: Vec<DosePoint>,
    /// Wall time of the calibration, seconds.
    pub wall_s: f64,
}

impl DoseReport {
    /// The calibration record to store in the vector's metadata.
    pub fn calibration(&self) -> Calibration {
        Calibration {
            coefficient: self.c_star,
            target: self.config.solver.target,
            statistic: self.config.statistic,
            tol: self.config.solver.tol,
            achieved: self.achieved,
            converged: self.converged,
            crossed: self.crossed,
            tokens: self.config.tokens,
            n_prompts: self.config.prompts.len(),
        }
    }
}

/// Rendered calibration prompts: (steered, base) token ids per prompt.
pub fn calibration_ids(
    lm: &LoadedModel,
    steering: &Steering,
    cfg: &DoseConfig,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    cfg.prompts
        .iter()
        .map(|p| {
            let base = lm.tokenizer.encode(&lm.chat.prompt(Some(&cfg.system), p)?)?;
            let steered =
                lm.tokenizer.encode(&lm.chat.prompt(Some(steering.steered_system(&cfg.system)), p)?)?;
            Ok((steered, base))
        })
        .collect()
}

/// Per-token KL(steered ‖ base) over greedy steered rollouts at `coeff`, pooled over prompts.
pub fn measure_kl(
    lm: &LoadedModel,
    steering: &Steering,
    prompts: &[(Vec<u32>, Vec<u32>)],
    coeff: f64,
    tokens: usize,
) -> Result<Vec<f32>> {
    if prompts.is_empty() || tokens == 0 {
        return Err(Error::invalid("KL measurement needs at least one prompt and one token"));
    }
    let steered_prompts: Vec<Vec<u32>> = prompts.iter().map(|p| p.0.clone()).collect();
    let hooks = steering.hooks(&[coeff as f32]);
    // Roll out without stop ids so every row has T tokens, then cut at the first stop (kept: its position
    // is a real next-token prediction).
    let gen = generate(
        &lm.model,
        &steered_prompts,
        &Sampling::greedy(tokens),
        &hooks,
        &[],
        lm.tokenizer.pad_id,
        &mut |_| true,
    )?;
    let mut out = Vec::new();
    for ((steered, base), rollout) in prompts.iter().zip(gen.tokens.iter()) {
        let cut = rollout
            .iter()
            .position(|t| lm.tokenizer.stop_ids.contains(t))
            .map(|i| i + 1)
            .unwrap_or(rollout.len());
        let rollout = &rollout[..cut];
        if rollout.is_empty() {
            continue;
        }
        out.extend(teacher_forced_kl(lm, steering, steered, base, rollout, coeff)?);
    }
    Ok(out)
}

/// KL at each rollout position when prompt + rollout is teacher-forced through the steered and base model.
pub fn teacher_forced_kl(
    lm: &LoadedModel,
    steering: &Steering,
    steered_prompt: &[u32],
    base_prompt: &[u32],
    rollout: &[u32],
    coeff: f64,
) -> Result<Vec<f32>> {
    let l = rollout.len();
    let seqs = [[steered_prompt, rollout].concat(), [base_prompt, rollout].concat()];
    let (flat, t, pad) = crate::model::generate::left_pad(&seqs, lm.tokenizer.pad_id);
    let pad_arg: Vec<usize> = if pad.iter().any(|p| *p > 0) { pad.clone() } else { vec![] };
    let ids = Tensor::from_vec(flat, (2, t), lm.model.device())?;
    let hooks = steering.hooks(&[coeff as f32, 0.0]);
    let f = Forward {
        hooks: &hooks,
        pad: &pad_arg,
        logits: LogitsAt::All,
        path: Path::Inference,
        adapters: crate::model::Adapters::AsGated,
    };
    let logits = lm
        .model
        .forward(&ids, None, &f)?
        .logits
        .ok_or_else(|| Error::invalid("forward returned no logits"))?;
    // Row r predicts rollout token k at position pad_r + prompt_r − 1 + k.
    let s0 = pad[0] + steered_prompt.len() - 1;
    let b0 = pad[1] + base_prompt.len() - 1;
    let s = logits.get(0)?.narrow(0, s0, l)?;
    let b = logits.get(1)?.narrow(0, b0, l)?;
    let kl: Vec<f32> = kl_tensor(&s, &b)?.to_vec1()?;
    crate::numeric::ensure_finite(&kl, || {
        format!("KL(steered‖base) at coefficient {coeff} (the steering vector or the model's logits are not finite)")
    })?;
    Ok(kl)
}

/// Calibrate a steering arm by iso-KL. The prompt-only arm has no coefficient: it is measured once at 1.
pub fn calibrate(
    lm: &LoadedModel,
    steering: &Steering,
    cfg: &DoseConfig,
    progress: &mut dyn Progress,
) -> Result<DoseReport> {
    let start = std::time::Instant::now();
    let prompts = calibration_ids(lm, steering, cfg)?;
    let mut points: Vec<DosePoint> = Vec::new();
    // Most evaluations: the middle, the doublings or halvings to an edge, the refinement steps.
    let budget =
        (1 + ((cfg.solver.hi / cfg.solver.lo).log2() / 2.0).ceil() as usize + cfg.solver.max_iters) as u64;
    let mut measure = |c: f64| -> Result<f64> {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let kl = KlStats::from_values(&measure_kl(lm, steering, &prompts, c, cfg.tokens)?);
        let stat = kl.get(cfg.statistic);
        points.push(DosePoint { coefficient: c, stat, kl });
        progress.step(
            points.len() as u64,
            budget.max(points.len() as u64),
            &format!("c={c:.4} {}={stat:.3}", cfg.statistic),
        );
        Ok(stat)
    };
    let sol = if steering.is_prompt_only() {
        let s = measure(1.0)?;
        Solution {
            coefficient: 1.0,
            stat: s,
            converged: (s - cfg.solver.target).abs() < cfg.solver.tol,
            crossed: false,
            warning: Some(
                "the prompt-only arm has no coefficient; KL measured with the persona prompt".into(),
            ),
            history: vec![(1.0, s)],
        }
    } else {
        solve_iso_kl(&cfg.solver, &mut measure)?
    };
    Ok(DoseReport {
        model: lm.info.clone(),
        vector: None,
        config: cfg.clone(),
        c_star: sol.coefficient,
        achieved: sol.stat,
        converged: sol.converged,
        crossed: sol.crossed,
        warning: sol.warning,
        history: points,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solve(f: impl Fn(f64) -> f64) -> Result<Solution> {
        let mut g = |c: f64| Ok(f(c));
        solve_iso_kl(&SolverConfig::default(), &mut g)
    }

    #[test]
    fn quadratic_curve_is_solved_in_log_log() -> Result<()> {
        for k in [0.05, 0.3, 2.0, 40.0] {
            let sol = solve(|c| k * c * c)?;
            let want = (1.0 / k).sqrt();
            assert!(sol.converged, "k={k}: {sol:?}");
            assert!((sol.stat - 1.0).abs() < 0.05, "k={k}: {sol:?}");
            assert!((sol.coefficient / want - 1.0).abs() < 0.03, "k={k}: c={} want {want}", sol.coefficient);
            // A pure power law is a line in log-log: bracketing plus at most one secant step.
            assert!(sol.history.len() <= 8, "k={k}: {} evaluations", sol.history.len());
        }
        Ok(())
    }

    #[test]
    fn bent_curves_converge_with_illinois() -> Result<()> {
        // Saturating and steep curves, far from a power law.
        let curves: Vec<Box<dyn Fn(f64) -> f64>> = vec![
            Box::new(|c| 3.0 * (1.0 - (-c * c / 9.0).exp())),
            Box::new(|c| 0.01 * c.powi(4) + 0.001 * c),
            Box::new(|c| (c - 2.0).max(0.0).powi(3) + 1e-4 * c),
        ];
        for (i, f) in curves.iter().enumerate() {
            let sol = solve(f)?;
            assert!(sol.converged, "curve {i}: {sol:?}");
            assert!((f(sol.coefficient) - 1.0).abs() < 0.05, "curve {i}");
            let last = sol.history.last().copied().unwrap_or_default();
            assert_eq!(last.0, sol.coefficient, "curve {i}: returns its last evaluation");
            assert!(sol.history.len() <= 10, "curve {i}: {} evaluations", sol.history.len());
        }
        Ok(())
    }

    #[test]
    fn never_crossing_warns_and_returns_the_edge() -> Result<()> {
        let low = solve(|c| 1e-3 * c * c)?;
        assert!(!low.converged && !low.crossed);
        assert_eq!(low.coefficient, 16.0);
        assert!(low.warning.as_deref().unwrap_or("").contains("below the target"));
        let high = solve(|c| 1e5 * c * c)?;
        assert!(!high.converged && !high.crossed);
        assert_eq!(high.coefficient, 0.01);
        assert!(high.warning.as_deref().unwrap_or("").contains("above the target"));
        Ok(())
    }

    #[test]
    fn unreachable_tolerance_returns_the_closest_point() -> Result<()> {
        // A jump over the target: no coefficient is within tolerance.
        let sol = solve(|c| if c < 1.0 { 0.5 } else { 1.5 })?;
        assert!(!sol.converged && sol.crossed);
        assert!(sol.warning.is_some());
        let best = sol.history.iter().map(|p| (p.1 - 1.0).abs()).fold(f64::INFINITY, f64::min);
        assert_eq!((sol.stat - 1.0).abs(), best);
        assert!(sol.history.len() <= 1 + 6 + 12);
        Ok(())
    }

    #[test]
    fn bad_bracket_is_rejected() {
        let cfg = SolverConfig { lo: 2.0, hi: 1.0, ..SolverConfig::default() };
        let mut g = |c: f64| Ok(c);
        assert!(solve_iso_kl(&cfg, &mut g).is_err());
    }
}
