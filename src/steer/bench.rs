//! Steering benchmark: decoding throughput with the steering hook off and on (same prompts, same greedy
//! length), the cost of the traced generation (steered + base rows), and the wall time of an iso-KL
//! calibration. Timings are medians over repetitions, interleaved so drift hits every arm alike. Wall time
//! and process CPU time are both recorded: on a shared machine the wall clock mostly measures the neighbours,
//! and CPU time is the fairer comparison of the arms.

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
    /// Extra CPU time of steered over plain decoding, percent (None where process CPU time is unavailable).
    pub steering_overhead_cpu_pct: Option<f64>,
    /// Extra CPU time per token of traced generation over plain decoding, percent.
    pub traced_overhead_cpu_pct: Option<f64>,
    /// Seconds of each plain repetition.
    pub plain_s: Vec<f64>,
    /// Seconds of each steered repetition.
    pub steered_s: Vec<f64>,
    /// Seconds of each traced repetition.
    pub traced_s: Vec<f64>,
    /// CPU seconds of each plain repetition.
    pub plain_cpu_s: Vec<f64>,
    /// CPU seconds of each steered repetition.
    pub steered_cpu_s: Vec<f64>,
    /// CPU seconds of each traced repetition.
    pub traced_cpu_s: Vec<f64>,
    /// Iso-KL calibration wall time, seconds.
    pub dose_wall_s: Option<f64>,
    /// Iso-KL calibration CPU time, seconds.
    pub dose_cpu_s: Option<f64>,
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

/// CPU time of this process (all threads), seconds, from `/proc/self/stat` (Linux; clock ticks of 1/100 s).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 overall.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, Option<f64>)> {
    let c0 = process_cpu_seconds();
    let t = Instant::now();
    let out = f()?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (c0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((out, wall, cpu))
}

fn overhead_pct(arm: &[f64], base: &[f64], arm_tokens: usize, base_tokens: usize) -> f64 {
    let per = |xs: &[f64], n: usize| median(xs) / n.max(1) as f64;
    100.0 * (per(arm, arm_tokens) / per(base, base_tokens) - 1.0)
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
    // No stop ids: every row decodes exactly `new_tokens`, so the plain and steered arms do identical work.
    let decode = |hooks: &Hooks| -> Result<usize> {
        let g = generate(&lm.model, &ids, &greedy, hooks, &[], pad, &mut |_| true)?;
        Ok(g.tokens.iter().map(Vec::len).sum())
    };
    let gen_cfg = GenConfig { sampling: greedy, window: 8, batch_size: cfg.batch, watchdog: None };
    let reqs = requests_for(&users, &[1.0], 0);
    let traced = || -> Result<usize> {
        let out = generate_completions(
            lm,
            steering,
            &cfg.system,
            cfg.coeff,
            &reqs,
            &gen_cfg,
            &mut Silent::default(),
        )?;
        Ok(out.iter().map(|c| c.tokens.len()).sum())
    };
    let total = (3 * cfg.reps + usize::from(cfg.dose.is_some())) as u64;
    decode(&plain_hooks)?; // warm-up: allocator and caches
    let (mut plain_s, mut steered_s, mut traced_s) = (vec![], vec![], vec![]);
    let (mut plain_cpu, mut steered_cpu, mut traced_cpu) = (vec![], vec![], vec![]);
    let (mut plain_tok, mut traced_tok) = (0usize, 0usize);
    let mut done = 0;
    for rep in 0..cfg.reps {
        // Rotate the order each repetition so no arm always runs first.
        for k in 0..3 {
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            match (rep + k) % 3 {
                0 => {
                    let (n, w, c) = timed(|| decode(&plain_hooks))?;
                    plain_tok = n;
                    plain_s.push(w);
                    plain_cpu.extend(c);
                    progress.step(done + 1, total, "plain decoding");
                }
                1 => {
                    let (_, w, c) = timed(|| decode(&steer_hooks))?;
                    steered_s.push(w);
                    steered_cpu.extend(c);
                    progress.step(done + 1, total, "steered decoding");
                }
                _ => {
                    let (n, w, c) = timed(traced)?;
                    traced_tok = n;
                    traced_s.push(w);
                    traced_cpu.extend(c);
                    progress.step(done + 1, total, "traced generation");
                }
            }
            done += 1;
        }
    }
    let cpu_ok = plain_cpu.len() == cfg.reps && steered_cpu.len() == cfg.reps && traced_cpu.len() == cfg.reps;
    let mut report = BenchReport {
        model: lm.info.clone(),
        device: format!("{:?} {:?}", lm.model.device().location(), lm.model.dtype()),
        layers,
        batch: cfg.batch,
        new_tokens: cfg.new_tokens,
        reps: cfg.reps,
        plain_tok_s: plain_tok as f64 / median(&plain_s),
        steered_tok_s: plain_tok as f64 / median(&steered_s),
        steering_overhead_pct: overhead_pct(&steered_s, &plain_s, plain_tok, plain_tok),
        traced_tok_s: traced_tok as f64 / median(&traced_s),
        traced_overhead_pct: overhead_pct(&traced_s, &plain_s, traced_tok, plain_tok),
        steering_overhead_cpu_pct: cpu_ok
            .then(|| overhead_pct(&steered_cpu, &plain_cpu, plain_tok, plain_tok)),
        traced_overhead_cpu_pct: cpu_ok.then(|| overhead_pct(&traced_cpu, &plain_cpu, traced_tok, plain_tok)),
        plain_s,
        steered_s,
        traced_s,
        plain_cpu_s: plain_cpu,
        steered_cpu_s: steered_cpu,
        traced_cpu_s: traced_cpu,
        dose_wall_s: None,
        dose_cpu_s: None,
        dose_evaluations: None,
        dose_c_star: None,
        dose_converged: None,
    };
    if let Some(d) = &cfg.dose {
        progress.step(done, total, "iso-KL calibration");
        let (r, _, cpu) = timed(|| calibrate(lm, steering, d, &mut Silent::default()))?;
        report.dose_wall_s = Some(r.wall_s);
        report.dose_cpu_s = cpu;
        report.dose_evaluations = Some(r.history.len());
        report.dose_c_star = Some(r.c_star);
        report.dose_converged = Some(r.converged);
        progress.step(total, total, "done");
    }
    Ok(report)
}
