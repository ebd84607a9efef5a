//! `heal --sweep`: the same round's data healed once per regulariser × strength, each arm from the same seed and
//! measured the same way, so the gate-Q1 table can rank them by coherence cost per nat of trait moved. Each arm
//! trains in its own run directory (and so resumes on its own after a crash) and is detached after measuring.

use super::adapter;
use super::config::{Agg, HealConfig, Reg};
use super::data::Dataset;
use super::gate::{self, MeasureSpec, Metrics, SweepRow};
use super::train::{self, HealStatus, RunOptions};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// A regulariser axis of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepReg {
    /// KL(student ‖ reference) barrier with the run's aggregation; strength = λ.
    KlRev,
    /// KL(student ‖ reference) barrier aggregated by the mean over positions (lets short loops through).
    KlRevMean,
    /// KL(student ‖ reference) barrier aggregated by the rmse over positions (the default aggregation).
    KlRevRmse,
    /// KL(reference ‖ student) barrier; strength = λ.
    KlFwd,
    /// No barrier (one arm; strength unused).
    Nll,
    /// NLL + spectral penalty; strength = its weight.
    Spectral,
    /// NLL + decoupled weight decay; strength = the decay.
    Wd,
}

impl FromStr for SweepReg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "kl_rev" => SweepReg::KlRev,
            "kl_rev_mean" => SweepReg::KlRevMean,
            "kl_rev_rmse" => SweepReg::KlRevRmse,
            "kl_fwd" => SweepReg::KlFwd,
            "nll" => SweepReg::Nll,
            "spectral" => SweepReg::Spectral,
            "wd" => SweepReg::Wd,
            other => {
                return Err(Error::invalid(format!(
                    "unknown sweep regulariser `{other}` (expected kl_rev, kl_rev_mean, kl_rev_rmse, kl_fwd, nll, spectral or wd)"
                )))
            }
        })
    }
}

impl fmt::Display for SweepReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SweepReg::KlRev => "kl_rev",
            SweepReg::KlRevMean => "kl_rev_mean",
            SweepReg::KlRevRmse => "kl_rev_rmse",
            SweepReg::KlFwd => "kl_fwd",
            SweepReg::Nll => "nll",
            SweepReg::Spectral => "spectral",
            SweepReg::Wd => "wd",
        })
    }
}

/// One arm: a label, its axis and strength, and the full config it trains with.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepArm {
    /// e.g. `kl_rev λ=0.3`.
    pub label: String,
    /// Axis.
    pub reg: SweepReg,
    /// Strength.
    pub strength: f64,
    /// Config of the run.
    pub cfg: HealConfig,
}

impl SweepArm {
    /// A directory name for the arm's run.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.reg, self.strength).replace(['/', ' '], "_")
    }
}

/// The arms of `regs × strengths` built on `base` (`nll` appears once).
pub fn arms(base: &HealConfig, regs: &[SweepReg], strengths: &[f64]) -> Result<Vec<SweepArm>> {
    if regs.is_empty() || strengths.is_empty() {
        return Err(Error::invalid("a sweep needs at least one regulariser and one strength"));
    }
    if let Some(s) = strengths.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
        return Err(Error::invalid(format!("sweep strength {s} must be a number ≥ 0")));
    }
    let mut out = Vec::new();
    for reg in regs {
        if *reg == SweepReg::Nll {
            if !out.iter().any(|a: &SweepArm| a.reg == SweepReg::Nll) {
                let cfg = HealConfig { reg: Reg::Nll, ..base.clone() };
                out.push(SweepArm { label: "nll".into(), reg: *reg, strength: 0.0, cfg });
            }
            continue;
        }
        for &s in strengths {
            let (label, cfg) = match reg {
                SweepReg::KlRev => {
                    (format!("kl_rev λ={s}"), HealConfig { reg: Reg::KlRev, lambda: s, ..base.clone() })
                }
                SweepReg::KlRevMean => (
                    format!("kl_rev mean λ={s}"),
                    HealConfig { reg: Reg::KlRev, agg: Agg::Mean, lambda: s, ..base.clone() },
                ),
                SweepReg::KlRevRmse => (
                    format!("kl_rev rmse λ={s}"),
                    HealConfig { reg: Reg::KlRev, agg: Agg::Rmse, lambda: s, ..base.clone() },
                ),
                SweepReg::KlFwd => {
                    (format!("kl_fwd λ={s}"), HealConfig { reg: Reg::KlFwd, lambda: s, ..base.clone() })
                }
                SweepReg::Spectral => (
                    format!("spectral {s}"),
                    HealConfig { reg: Reg::Nll, spectral_lambda: s, ..base.clone() },
                ),
                SweepReg::Wd => {
                    (format!("wd {s}"), HealConfig { reg: Reg::Nll, weight_decay: s, ..base.clone() })
                }
                SweepReg::Nll => continue,
            };
            out.push(SweepArm { label, reg: *reg, strength: s, cfg });
        }
    }
    Ok(out)
}

/// Forwards progress with the arm's label in front, and the outer cancellation.
struct ArmProgress<'a> {
    outer: &'a mut dyn Progress,
    prefix: String,
}

impl Progress for ArmProgress<'_> {
    fn step(&mut self, done: u64, total: u64, msg: &str) {
        self.outer.step(done, total, &format!("{} {msg}", self.prefix));
    }
    fn is_cancelled(&self) -> bool {
        self.outer.is_cancelled()
    }
}

/// A finished arm: its row and its full measurement.
#[derive(Debug, Clone)]
pub struct ArmResult {
    /// The table row.
    pub row: SweepRow,
    /// The measurement after healing.
    pub measurement: gate::Measurement,
    /// The run record.
    pub log: train::HealLog,
}

/// Heal and measure each arm in `out_dir/sweep/<arm>/` (resuming an arm's checkpoint unless `opts.fresh`),
/// detaching its adapter afterwards.
pub fn run_sweep(
    lm: &mut LoadedModel,
    data: &Dataset,
    arms: &[SweepArm],
    out_dir: &Path,
    spec: &MeasureSpec,
    opts: &RunOptions,
    progress: &mut dyn Progress,
) -> Result<Vec<ArmResult>> {
    let mut out = Vec::with_capacity(arms.len());
    for (i, arm) in arms.iter().enumerate() {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let dir = out_dir.join("sweep").join(arm.dir_name());
        let mut p = ArmProgress {
            outer: &mut *progress,
            prefix: format!("[{}/{}] {}", i + 1, arms.len(), arm.label),
        };
        let log = train::heal(&mut lm.model, &lm.info, data, &arm.cfg, &dir, opts, &mut p, &mut |_| {})?;
        let name = arm.cfg.adapter_name();
        let measured = if log.status == HealStatus::Completed {
            let ev = train::evaluate(&mut lm.model, &name, data, &arm.cfg);
            let m = gate::measure(lm, spec, &mut p);
            Some((ev, m))
        } else {
            None
        };
        adapter::detach(&mut lm.model, &name);
        let Some((ev, m)) = measured else {
            return Err(Error::invalid(format!(
                "sweep arm `{}` did not complete: {}",
                arm.label, log.message
            )));
        };
        let (ev, m) = (ev?, m?);
        let row = SweepRow {
            label: arm.label.clone(),
            reg: arm.reg.to_string(),
            strength: arm.strength,
            after: Metrics::from(&m),
            d_final: Some(ev.d),
            status: format!("{:?}", log.status).to_lowercase(),
            sample: m.samples.first().map(|s| s.text.clone()).unwrap_or_default(),
            // Filled by the caller, which has the before measurement.
            slope_ci: None,
        };
        out.push(ArmResult { row, measurement: m, log });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_cross_regularisers_with_strengths_and_nll_once() -> Result<()> {
        let regs: Vec<SweepReg> =
            ["nll", "kl_rev", "spectral", "nll"].iter().map(|s| s.parse()).collect::<Result<_>>()?;
        let a = arms(&HealConfig::default(), &regs, &[0.1, 1.0])?;
        let labels: Vec<&str> = a.iter().map(|x| x.label.as_str()).collect();
        assert_eq!(labels, vec!["nll", "kl_rev λ=0.1", "kl_rev λ=1", "spectral 0.1", "spectral 1"]);
        assert_eq!(a[2].cfg.lambda, 1.0);
        assert_eq!((a[4].cfg.reg, a[4].cfg.spectral_lambda), (Reg::Nll, 1.0));
        assert!(arms(&HealConfig::default(), &regs, &[-1.0]).is_err());
        // The study's sweep: NLL only vs the mean- and rmse-aggregated KL barrier.
        let regs: Vec<SweepReg> =
            ["nll", "kl_rev_mean", "kl_rev_rmse"].iter().map(|s| s.parse()).collect::<Result<_>>()?;
        let a = arms(&HealConfig { agg: Agg::P95, ..HealConfig::default() }, &regs, &[0.3])?;
        let got: Vec<(&str, Reg, Agg)> = a.iter().map(|x| (x.label.as_str(), x.cfg.reg, x.cfg.agg)).collect();
        assert_eq!(
            got,
            vec![
                ("nll", Reg::Nll, Agg::P95),
                ("kl_rev mean λ=0.3", Reg::KlRev, Agg::Mean),
                ("kl_rev rmse λ=0.3", Reg::KlRev, Agg::Rmse)
            ]
        );
        assert!("l2".parse::<SweepReg>().is_err());
        Ok(())
    }
}
