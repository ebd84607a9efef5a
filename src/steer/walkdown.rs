//! The walk-down controller: probe a few steered generations; while too few pass the automatic filter, lower
//! the dose multiplier κ (× 0.7, floor 0.2) and probe again; then top up batches at the settled κ until
//! enough completions pass. The filter is a [`Scorer`]: gate Q0's automatic filter (`score::ScoreCard`), so
//! "passes" means one thing from the walk-down to heal.

use super::completion::Completion;
use super::generate::{generate_completions, GenConfig, Request};
use super::vector::Steering;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::progress::Progress;
use serde::{Deserialize, Serialize};

/// A filter's verdict on one completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether the completion is kept.
    pub pass: bool,
    /// The score behind it (for logs).
    pub value: f64,
    /// One line explaining it.
    pub reason: String,
}

/// Decides which completions are kept: gate Q0's automatic filter in the loop, so the walk-down counts exactly the
/// completions gate Q0 keeps. It sees each batch as soon as it is generated, and may record it (the rounds runner
/// writes the batch with its score cards) before it answers.
pub trait Scorer {
    /// One verdict per completion of `batch`, in order.
    fn judge(&mut self, batch: &[Completion]) -> Result<Vec<Verdict>>;
}

impl<F: FnMut(&[Completion]) -> Result<Vec<Verdict>>> Scorer for F {
    fn judge(&mut self, batch: &[Completion]) -> Result<Vec<Verdict>> {
        self(batch)
    }
}

/// Options of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WalkDownConfig {
    /// Fraction of a probe that must pass to stop walking down.
    pub target_pass: f64,
    /// Generations per probe.
    pub probe_n: usize,
    /// κ multiplier per step down.
    pub factor: f64,
    /// Lowest κ.
    pub floor: f64,
    /// Generations per top-up batch.
    pub batch_n: usize,
    /// Stop topping up once this many have passed.
    pub min_keep: usize,
    /// Keep at most this many.
    pub max_keep: usize,
    /// Most top-up batches.
    pub max_batches: usize,
}

impl Default for WalkDownConfig {
    fn default() -> Self {
        WalkDownConfig {
            target_pass: 0.75,
            probe_n: 8,
            factor: 0.7,
            floor: 0.2,
            batch_n: 16,
            min_keep: 30,
            max_keep: 64,
            max_batches: 6,
        }
    }
}

/// One probe or top-up batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalkStep {
    /// `probe` or `top-up`.
    pub phase: String,
    /// Dose multiplier used (dose = alpha × κ × c*).
    pub kappa: f64,
    /// Generations in it.
    pub n: usize,
    /// How many passed.
    pub passed: usize,
}

/// What the controller did, written as `walkdown.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalkDownReport {
    /// Options used.
    pub config: WalkDownConfig,
    /// Every probe and batch in order.
    pub steps: Vec<WalkStep>,
    /// κ the run settled on.
    pub kappa: f64,
    /// Completions generated in all.
    pub generated: usize,
    /// Completions kept.
    pub kept: usize,
    /// Whether `min_keep` was reached.
    pub reached_min: bool,
    /// Verdict of every generated completion by id.
    pub verdicts: Vec<(String, Verdict)>,
}

/// The controller's output: kept and rejected completions plus its report.
#[derive(Debug, Clone)]
pub struct WalkDownResult {
    /// Passing completions (at most `max_keep`).
    pub kept: Vec<Completion>,
    /// Completions the filter rejected.
    pub rejected: Vec<Completion>,
    /// Passing completions beyond `max_keep`.
    pub surplus: Vec<Completion>,
    /// The report.
    pub report: WalkDownReport,
}

/// Cycles through prompt × alpha pairs, handing out fresh seeds.
struct RequestSource<'a> {
    prompts: &'a [String],
    alphas: &'a [f64],
    next: usize,
    seed: u64,
}

impl RequestSource<'_> {
    fn take(&mut self, n: usize, kappa: f64) -> Vec<Request> {
        (0..n)
            .map(|_| {
                let k = self.next;
                self.next += 1;
                let p = (k / self.alphas.len()) % self.prompts.len();
                let a = self.alphas[k % self.alphas.len()];
                Request {
                    prompt_index: p,
                    prompt: self.prompts[p].clone(),
                    alpha: a * kappa,
                    seed: self.seed + k as u64,
                }
            })
            .collect()
    }
}

/// Inputs shared by every batch of one controller run.
struct Batcher<'a> {
    lm: &'a LoadedModel,
    steering: &'a Steering,
    system: &'a str,
    c_star: f64,
    gen: &'a GenConfig,
    src: RequestSource<'a>,
    kept: Vec<Completion>,
    rejected: Vec<Completion>,
    steps: Vec<WalkStep>,
    verdicts: Vec<(String, Verdict)>,
}

impl Batcher<'_> {
    /// Generate `n` completions at `kappa`, score them, and return how many passed.
    fn batch(
        &mut self,
        phase: &str,
        n: usize,
        kappa: f64,
        scorer: &mut dyn Scorer,
        progress: &mut dyn Progress,
    ) -> Result<usize> {
        let reqs = self.src.take(n, kappa);
        let out = generate_completions(
            self.lm,
            self.steering,
            self.system,
            self.c_star,
            &reqs,
            self.gen,
            progress,
        )?;
        let verdicts = scorer.judge(&out)?;
        if verdicts.len() != out.len() {
            return Err(Error::invalid(format!(
                "the walk-down filter judged {} of a batch of {}",
                verdicts.len(),
                out.len()
            )));
        }
        let mut passed = 0;
        for (c, v) in out.into_iter().zip(verdicts) {
            self.verdicts.push((c.id.clone(), v.clone()));
            if v.pass {
                passed += 1;
                self.kept.push(c);
            } else {
                self.rejected.push(c);
            }
        }
        self.steps.push(WalkStep { phase: phase.into(), kappa, n, passed });
        Ok(passed)
    }
}

/// Run the controller: probe, walk κ down while the pass fraction is below target, then top up. Each batch is
/// handed to `scorer` as soon as it is generated (the loop records and shows it while the next one runs).
#[allow(clippy::too_many_arguments)]
pub fn walk_down(
    lm: &LoadedModel,
    steering: &Steering,
    system: &str,
    c_star: f64,
    prompts: &[String],
    alphas: &[f64],
    seed: u64,
    gen: &GenConfig,
    cfg: &WalkDownConfig,
    scorer: &mut dyn Scorer,
    progress: &mut dyn Progress,
) -> Result<WalkDownResult> {
    if prompts.is_empty() || alphas.is_empty() {
        return Err(Error::invalid("the walk-down controller needs at least one prompt and one alpha"));
    }
    if cfg.probe_n == 0 || cfg.batch_n == 0 || !(cfg.factor > 0.0 && cfg.factor < 1.0) || cfg.floor <= 0.0 {
        return Err(Error::invalid("walk-down needs probe_n, batch_n ≥ 1, factor in (0, 1) and floor > 0"));
    }
    let mut b = Batcher {
        lm,
        steering,
        system,
        c_star,
        gen,
        src: RequestSource { prompts, alphas, next: 0, seed },
        kept: Vec::new(),
        rejected: Vec::new(),
        steps: Vec::new(),
        verdicts: Vec::new(),
    };
    let mut kappa = 1.0f64;
    // Probe and walk down. The prompt-only arm has no dose to lower.
    loop {
        let passed = b.batch("probe", cfg.probe_n, kappa, scorer, progress)?;
        let frac = passed as f64 / cfg.probe_n as f64;
        if frac >= cfg.target_pass || steering.is_prompt_only() || kappa <= cfg.floor + 1e-12 {
            break;
        }
        kappa = (kappa * cfg.factor).max(cfg.floor);
    }
    let mut batches = 0;
    while b.kept.len() < cfg.min_keep && batches < cfg.max_batches {
        b.batch("top-up", cfg.batch_n, kappa, scorer, progress)?;
        batches += 1;
    }
    let Batcher { mut kept, rejected, steps, verdicts, .. } = b;
    let generated = kept.len() + rejected.len();
    let surplus = if kept.len() > cfg.max_keep { kept.split_off(cfg.max_keep) } else { Vec::new() };
    let report = WalkDownReport {
        config: *cfg,
        steps,
        kappa,
        generated,
        kept: kept.len(),
        reached_min: kept.len() >= cfg.min_keep,
        verdicts,
    };
    Ok(WalkDownResult { kept, rejected, surplus, report })
}
