//! Every knob of one heal run, with the chosen defaults (see `shared/README.md`, "Heal loss"): what is
//! regularised, how the per-position KL is aggregated, which reference it is measured against, the LoRA shape and
//! the optimiser schedule. Serialised into checkpoints and logs so a run can be resumed and reproduced.

use crate::error::{Error, Result};
use crate::model::decoder::PROJECTIONS;
use crate::model::ModelConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which divergence the barrier bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reg {
    /// KL(student ‖ reference): mode-seeking, the default.
    KlRev,
    /// KL(reference ‖ student): mass-covering.
    KlFwd,
    /// No barrier: plain NLL (D is still measured and logged).
    Nll,
}

/// How per-position KL values are aggregated into one number D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    /// Arithmetic mean (lets short loops through).
    Mean,
    /// `sqrt(mean KL² + 1e-8)`, the default: a few large values dominate.
    Rmse,
    /// 95th percentile (linear interpolation).
    P95,
    /// Largest value.
    Max,
}

/// What the student's KL is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The previous rounds' adapters at their gates, this round's adapter off (the default).
    Prev,
    /// The pristine base: every adapter gate at 0.
    Base,
}

macro_rules! str_enum {
    ($t:ty, $what:literal, $($name:literal => $v:expr),+) => {
        impl FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok($v),)+
                    other => Err(Error::invalid(format!(
                        concat!("unknown ", $what, " `{}` (expected one of: {})"),
                        other,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(if *self == $v { return f.write_str($name); })+
                Ok(())
            }
        }
    };
}

str_enum!(Reg, "regulariser", "kl_rev" => Reg::KlRev, "kl_fwd" => Reg::KlFwd, "nll" => Reg::Nll);
str_enum!(Agg, "KL aggregation", "mean" => Agg::Mean, "rmse" => Agg::Rmse, "p95" => Agg::P95, "max" => Agg::Max);
str_enum!(Reference, "reference", "prev" => Reference::Prev, "base" => Reference::Base);

fn one() -> usize {
    1
}

fn is_one(x: &usize) -> bool {
    *x == 1
}

/// Configuration of one heal run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealConfig {
    /// Round index (0-based); names the adapter and scales λ.
    pub round: usize,
    /// Projection names to adapt (subset of `decoder::PROJECTIONS`).
    pub targets: Vec<String>,
    /// Fraction of depth where adapted layers start and end: layers `floor(lo·n) .. floor(hi·n)`.
    pub layer_range: (f64, f64),
    /// LoRA rank.
    pub r: usize,
    /// LoRA α (scale α/r).
    pub alpha: f64,
    /// Regulariser.
    pub reg: Reg,
    /// KL aggregation over completion positions.
    pub agg: Agg,
    /// Reference model for the KL.
    pub reference: Reference,
    /// Barrier strength λ.
    pub lambda: f64,
    /// Barrier threshold τ in nats.
    pub tau: f64,
    /// λ_eff = λ·(1+round)^p.
    pub lambda_round_pow: f64,
    /// Weight of the spectral penalty mean σ_max(B·A) over adapted projections (0 = off).
    pub spectral_lambda: f64,
    /// Power iterations for σ_max.
    pub spectral_iters: usize,
    /// Decoupled AdamW weight decay (0 = off).
    pub weight_decay: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW β1, β2.
    pub betas: (f64, f64),
    /// AdamW ε.
    pub eps: f64,
    /// Fraction of optimiser steps spent warming up linearly before the cosine decay.
    pub warmup_ratio: f64,
    /// Examples per optimiser step (their gradients are accumulated).
    pub grad_accum: usize,
    /// Examples that go through the model together in one padded forward/backward pass (speed only: the step's
    /// gradient is the same sum of per-example gradients). 4 by default (a whole default step): on a 2-core CPU
    /// four 128-token sequences per pass train 1.25× faster than one at a time, for 2.4× the peak memory
    /// (`bench/PROFILE.md`). Checkpoints written before the field existed ran one at a time and resume so.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub micro_batch: usize,
    /// Passes over the data.
    pub epochs: usize,
    /// Longest training sequence (prompt + completion); longer ones lose their completion's tail.
    pub max_len: usize,
    /// Seed of the adapter initialisation and the data order.
    pub seed: u64,
    /// Save a checkpoint every this many optimiser steps (0 = only at the end).
    pub checkpoint_every: usize,
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig {
            round: 0,
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            layer_range: (0.2, 0.8),
            r: 32,
            alpha: 64.0,
            reg: Reg::KlRev,
            agg: Agg::Rmse,
            reference: Reference::Prev,
            lambda: 0.3,
            tau: 0.5,
            lambda_round_pow: 0.0,
            spectral_lambda: 0.0,
            spectral_iters: 3,
            weight_decay: 0.0,
            lr: 1e-4,
            betas: (0.9, 0.95),
            eps: 1e-8,
            warmup_ratio: 0.1,
            grad_accum: 4,
            micro_batch: 4,
            epochs: 2,
            max_len: 1024,
            seed: 42,
            checkpoint_every: 10,
        }
    }
}

impl HealConfig {
    /// λ_eff = λ·(1+round)^p; zero when the regulariser is `nll`.
    pub fn lambda_eff(&self) -> f64 {
        if self.reg == Reg::Nll {
            return 0.0;
        }
        self.lambda * (1.0 + self.round as f64).powf(self.lambda_round_pow)
    }

    /// Name of this round's adapter inside the model (`round-N`).
    pub fn adapter_name(&self) -> String {
        format!("round-{}", self.round)
    }

    /// The adapted block indices for a model with `n` layers: `floor(lo·n) .. floor(hi·n)`, at least one.
    pub fn layers(&self, n: usize) -> Vec<usize> {
        let (lo, hi) = self.layer_range;
        let a = ((lo * n as f64).floor() as usize).min(n.saturating_sub(1));
        let b = ((hi * n as f64).floor() as usize).clamp(a + 1, n);
        (a..b).collect()
    }

    /// Check every value, naming the first bad one.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("heal config: {m}")));
        if self.targets.is_empty() {
            return bad("no target projections".into());
        }
        for t in &self.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                return bad(format!("unknown target `{t}` (expected some of: {})", PROJECTIONS.join(", ")));
            }
        }
        let (lo, hi) = self.layer_range;
        if !((0.0..1.0).contains(&lo) && lo < hi && hi <= 1.0) {
            return bad(format!("layer range {lo}..{hi} must satisfy 0 ≤ lo < hi ≤ 1"));
        }
        if cfg.num_hidden_layers == 0 {
            return bad("the model has no layers".into());
        }
        if self.r == 0 {
            return bad("rank r must be positive".into());
        }
        let positive = [("alpha", self.alpha), ("lr", self.lr), ("eps", self.eps)];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number, got {v}"));
            }
        }
        let non_negative = [
            ("lambda", self.lambda),
            ("tau", self.tau),
            ("spectral_lambda", self.spectral_lambda),
            ("weight_decay", self.weight_decay),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be ≥ 0, got {v}"));
            }
        }
        if !self.lambda_round_pow.is_finite() {
            return bad("lambda_round_pow must be finite".into());
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return bad(format!("betas ({b1}, {b2}) must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("warmup_ratio {} must be in [0, 1)", self.warmup_ratio));
        }
        if self.grad_accum == 0 || self.epochs == 0 || self.micro_batch == 0 {
            return bad("grad_accum, micro_batch and epochs must be at least 1".into());
        }
        if self.max_len < 2 {
            return bad("max_len must be at least 2".into());
        }
        if self.spectral_lambda > 0.0 && self.spectral_iters == 0 {
            return bad("spectral_iters must be at least 1 when the spectral penalty is on".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn middle_sixty_percent_of_thirty_layers() {
        let c = HealConfig::default();
        assert_eq!(c.layers(30), (6..24).collect::<Vec<_>>());
        assert_eq!(c.layers(4), vec![0, 1, 2]);
        assert_eq!(c.layers(1), vec![0]);
    }

    #[test]
    fn lambda_decays_with_round() {
        let c = HealConfig { round: 3, lambda_round_pow: -0.5, ..HealConfig::default() };
        assert!((c.lambda_eff() - 0.15).abs() < 1e-12);
        let nll = HealConfig { reg: Reg::Nll, ..HealConfig::default() };
        assert_eq!(nll.lambda_eff(), 0.0);
    }

    #[test]
    fn names_parse_and_print() {
        for s in ["kl_rev", "kl_fwd", "nll"] {
            assert_eq!(s.parse::<Reg>().map(|r| r.to_string()).ok().as_deref(), Some(s));
        }
        assert!("kl".parse::<Reg>().is_err());
        assert_eq!("p95".parse::<Agg>().ok(), Some(Agg::P95));
        assert_eq!("base".parse::<Reference>().ok(), Some(Reference::Base));
    }
}
