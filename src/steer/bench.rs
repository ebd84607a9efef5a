//! Steering benchmark: decoding throughput with the steering hook off and on (same prompts, same greedy
//! length), the cost of the traced generation (steered + base rows), and the wall time of an iso-KL
//! calibration. Timings are medians over repetitions, interleaved so drift hits every arm alike.

use super::dose::{calibrate, DoseConfig};
use super::generate::{generate_completions, requests_for, GenConfig};
use super::vector::Steering;
use crate::error::{Error, Result};
use crate::model::generate::{generate, Sampling};
use crate::model::{Hooks, LoadedModel, ModelInfo};
use crate::progress::{Progress, Silent};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Prompts decoded together.
    pub batch: usize,
    /// Tokens per row.
    pub new_tokens: usize,
    /// Timed repetitions per arm.
    pub reps: usize,
    /// Coefficient for the steered arm.
    pub coeff: f64,
    /// User prompts (cycled to fill the batch).
    pub prompts: Vec<String>,
    /// System prompt.
    pub system: String,
    /// Calibration to time (None: skip).
    pub dose: Option<DoseConfig>,
}

/// Benchmark results, written as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Model measured.
    pub model: ModelInfo,
    /// Device and dtype.
    pub device: String,
    /// Steered layers.
    pub layers: Vec<usize>,
    /// Options used (calibration prompts omitted).
    pub batch: usize,
    /// Tokens per row.
    pub new_tokens: usize,
    /// Repetitions per arm.
    pub reps: usize,
    /// Unsteered decoding, tokens/s (median).
    pub plain_tok_s: f64,
    /// Steered decoding (hook on, no traces), tokens/s (median).
    pub steered_tok_s: f64,
    /// Extra time of steered over plain decoding, percent.
    pub steering_overhead_pct: f64,
    /// Steered generation with per-token traces (steered + base rows), tokens/s (median).
    pub traced_tok_s: f64,
    /// Extra time of traced generation over plain decoding, percent.
    pub traced_overhead_pct: f64,
    /// Seconds of each plain repetition.
    pub plain_s: Vec<f64>,
    /// Seconds of each steered repetition.
    pub steered_s: Vec<f64>,
    /// Seconds of each traced repetition.
    pub traced_s: Vec<f64>,
    /// Iso-KL calibration wall time, seconds.
    pub dose_wall_s: Option<f64>,
    /// Evaluations the calibration needed.
    pub dose_evaluations: Option<usize>,
    /// Calibrated coefficient.
    pub dose_c_star: Option<f64>,
    /// Whether it converged.
    pub dose_converged: Option<bool>,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Run the benchmark.
pub fn bench_steer(
    lm: &LoadedModel,
    steering: &Steering,
    layers: Vec<usize>,
    cfg: &BenchConfig,
    progress: &mut dyn Progress,
) -> Result<BenchReport> {
    if cfg.prompts.is_empty() || cfg.batch == 0 || cfg.new_tokens == 0 || cfg.reps == 0 {
        return Err(Error::invalid("the benchmark needs prompts, a batch, tokens and repetitions"));
    }
    let users: Vec<String> = (0..cfg.batch).map(|i| cfg.prompts[i % cfg.prompts.len()].clone()).collect();
    let ids: Vec<Vec<u32>> = users
        .iter()
        .map(|u| lm.tokenizer.encode(&lm.chat.prompt(Some(&cfg.system), u)?))
        .collect::<Result<_>>()?;
    let greedy = Sampling::greedy(cfg.new_tokens);
    let pad = lm.tokenizer.pad_id;
    let plain_hooks = Hooks::none();
    let steer_hooks = steering.hooks(&[cfg.coeff as f32]);
    let decode = |hooks: &Hooks| -> Result<(f64, usize)> {
        let t = Instant::now();
        // No stop ids: every row decodes exactly `new_tokens`, so the arms do identical work.
        let g = generate(&lm.model, &ids, &greedy, hooks, &[], pad, &mut |_| true)?;
        Ok((t.elapsed().as_secs_f64(), g.tokens.iter().map(Vec::len).sum()))
    };
    let gen_cfg = GenConfig { sampling: greedy, window: 8, batch_size: cfg.batch, watchdog: None };
    let reqs = requests_for(&users, &[1.0], 0);
    let total = (3 * cfg.reps + usize::from(cfg.dose.is_some())) as u64;
    decode(&plain_hooks)?; // warm-up: allocator and caches
    let (mut plain_s, mut steered_s, mut traced_s) = (vec![], vec![], vec![]);
    let (mut plain_tok, mut traced_tok) = (0usize, 0usize);
    let mut done = 0;
    for _ in 0..cfg.reps {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let (s, n) = decode(&plain_hooks)?;
        plain_s.push(s);
        plain_tok = n;
        done += 1;
        progress.step(done, total, "plain decoding");
        let (s, _) = decode(&steer_hooks)?;
        steered_s.push(s);
        done += 1;
        progress.step(done, total, "steered decoding");
        let t = Instant::now();
        let out = generate_completions(
            lm,
            steering,
            &cfg.system,
            cfg.coeff,
            &reqs,
            &gen_cfg,
            &mut Silent::default(),
        )?;
        traced_s.push(t.elapsed().as_secs_f64());
        traced_tok = out.iter().map(|c| c.tokens.len()).sum();
        done += 1;
        progress.step(done, total, "traced generation");
    }
    let (mp, ms, mt) = (median(&plain_s), median(&steered_s), median(&traced_s));
    let plain_rate = plain_tok as f64 / mp;
    let traced_rate = traced_tok as f64 / mt;
    let mut report = BenchReport {
        model: lm.info.clone(),
        device: format!("{:?} {:?}", lm.model.device().location(), lm.model.dtype()),
        layers,
        batch: cfg.batch,
        new_tokens: cfg.new_tokens,
        reps: cfg.reps,
        plain_tok_s: plain_rate,
        steered_tok_s: plain_tok as f64 / ms,
        steering_overhead_pct: 100.0 * (ms / mp - 1.0),
        traced_tok_s: traced_rate,
        traced_overhead_pct: 100.0 * (plain_rate / traced_rate - 1.0),
        plain_s,
        steered_s,
        traced_s,
        dose_wall_s: None,
        dose_evaluations: None,
        dose_c_star: None,
        dose_converged: None,
    };
    if let Some(d) = &cfg.dose {
        progress.step(done, total, "iso-KL calibration");
        let r = calibrate(lm, steering, d, &mut Silent::default())?;
        report.dose_wall_s = Some(r.wall_s);
        report.dose_evaluations = Some(r.history.len());
        report.dose_c_star = Some(r.c_star);
        report.dose_converged = Some(r.converged);
        progress.step(total, total, "done");
    }
    Ok(report)
}
