//! `bench-heal`: training throughput of one heal step — reference pass (no grad, adapter gated off), student
//! forward on the training path with the loss, backward, AdamW update — at a given rank on a given model, timed
//! per phase on synthetic sequences and written as JSON. Speed lives here, never in tests.

use super::adapter::TrainableLora;
use super::config::HealConfig;
use super::data::Example;
use super::optim::AdamW;
use super::train::{batch_completion_logits, batch_reference_log_probs, gradients, losses_from_logits};
use crate::error::{Error, Result};
use crate::model::decoder::Path as FwdPath;
use crate::model::{LoadedModel, ModelInfo};
use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What to benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchSpec {
    /// Tokens per sequence (prompt + completion).
    pub seq_len: usize,
    /// Prompt tokens per sequence (no loss on them).
    pub prompt_len: usize,
    /// Timed steps, after one untimed warm-up step.
    pub steps: usize,
    /// Sequences per step, through the model together.
    #[serde(default = "one")]
    pub batch: usize,
    /// Heal config (rank, targets, layer range, regulariser...).
    pub cfg: HealConfig,
}

fn one() -> usize {
    1
}

/// Seconds spent per phase over the timed steps.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Reference pass (inference path, adapter off).
    pub reference_s: f64,
    /// Student forward on the training path plus the loss.
    pub forward_s: f64,
    /// Backward.
    pub backward_s: f64,
    /// AdamW update.
    pub optimizer_s: f64,
}

impl Phases {
    /// All four phases.
    pub fn total_s(&self) -> f64 {
        self.reference_s + self.forward_s + self.backward_s + self.optimizer_s
    }
}

/// The benchmark's result (the JSON written by `steer-heal bench-heal`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// What ran.
    pub spec: BenchSpec,
    /// Model identity.
    pub model: ModelInfo,
    /// Activation dtype.
    pub dtype: String,
    /// Device description.
    pub device: String,
    /// Worker threads candle's CPU kernels use.
    pub threads: usize,
    /// candle's thread-pool spin limit in effect (`CANDLE_BARRIER_POOL_SPIN_LIMIT`; empty means candle's default).
    #[serde(default)]
    pub barrier_pool_spin_limit: String,
    /// Which library did the large products (`model::cpu::blas_summary`).
    #[serde(default)]
    pub blas: String,
    /// Trainable parameters (all A and B).
    pub trainable_params: usize,
    /// Adapted projections.
    pub adapted_projections: usize,
    /// Tokens per second of full heal steps (reference + forward + backward + update).
    pub tokens_per_s: f64,
    /// Tokens per second without the reference pass (plain LoRA SFT, for comparison).
    pub tokens_per_s_without_reference: f64,
    /// Optimiser steps per second (`batch` sequences per step).
    pub steps_per_s: f64,
    /// Time per phase.
    pub phases: Phases,
    /// Peak resident memory of the process over the training-path run, MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// Loss at the first and last timed step (a sanity check that training moved).
    pub loss_first_last: (f64, f64),
    /// Loss of every timed step on the training path.
    #[serde(default)]
    pub losses: Vec<f64>,
    /// The same steps from the same start on the composite path (differentiable candle ops only), when asked.
    #[serde(default)]
    pub composite: Option<PathRun>,
    /// Largest relative difference between the two paths' step losses.
    #[serde(default)]
    pub composite_max_rel_loss_diff: Option<f64>,
}

/// Peak resident memory of this process so far, MiB (VmHWM; 0 where /proc is absent).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One timed run of heal steps on one numerical path: time per phase and the loss of every timed step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathRun {
    /// Tokens per second of full heal steps (reference + forward + backward + update).
    pub tokens_per_s: f64,
    /// Tokens per second without the reference pass (plain LoRA SFT, for comparison).
    pub tokens_per_s_without_reference: f64,
    /// Time per phase.
    pub phases: Phases,
    /// Loss of every timed step, in order.
    pub losses: Vec<f64>,
}

/// Run the benchmark on the training path (and, when `compare_composite`, again from the same start on the
/// composite path, reporting its speed and how far its losses are from the training path's). The adapter is
/// attached for each run and detached afterwards.
pub fn bench_heal(lm: &mut LoadedModel, spec: &BenchSpec, compare_composite: bool) -> Result<BenchResult> {
    let cfg = &spec.cfg;
    cfg.validate(&lm.model.cfg)?;
    if spec.prompt_len == 0 || spec.prompt_len >= spec.seq_len || spec.steps == 0 || spec.batch == 0 {
        return Err(Error::invalid("bench needs 0 < prompt_len < seq_len, at least one step and batch ≥ 1"));
    }
    let vocab = lm.model.cfg.vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Ordinary-token ids only: stay below the special tokens at the top of small vocabularies.
    let hi = vocab.saturating_sub(16).max(2);
    let examples: Vec<Example> = (0..(spec.steps + 1) * spec.batch)
        .map(|i| Example {
            id: format!("bench-{i}"),
            ids: (0..spec.seq_len).map(|_| rng.random_range(0..hi)).collect(),
            prompt_len: spec.prompt_len,
        })
        .collect();
    let (main, params, projections) = run_path(&mut lm.model, spec, &examples, FwdPath::Training)?;
    // The training path's own peak, before the comparison run can raise it.
    let peak_rss = peak_rss_mib();
    let composite = if compare_composite {
        Some(run_path(&mut lm.model, spec, &examples, FwdPath::Composite)?.0)
    } else {
        None
    };
    let composite_max_rel_loss_diff = composite.as_ref().map(|c| {
        main.losses.iter().zip(&c.losses).map(|(a, b)| (a - b).abs() / b.abs().max(1e-12)).fold(0.0, f64::max)
    });
    Ok(BenchResult {
        spec: spec.clone(),
        model: lm.info.clone(),
        dtype: format!("{:?}", lm.model.dtype()).to_lowercase(),
        device: if lm.model.device().is_cuda() { "cuda".into() } else { "cpu".into() },
        threads: candle_core::utils::get_num_threads(),
        barrier_pool_spin_limit: std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap_or_default(),
        blas: crate::model::cpu::blas_summary(),
        trainable_params: params,
        adapted_projections: projections,
        tokens_per_s: main.tokens_per_s,
        tokens_per_s_without_reference: main.tokens_per_s_without_reference,
        steps_per_s: spec.steps as f64 / main.phases.total_s().max(1e-9),
        phases: main.phases,
        peak_rss_mib: peak_rss,
        loss_first_last: (
            main.losses.first().copied().unwrap_or(f64::NAN),
            main.losses.last().copied().unwrap_or(f64::NAN),
        ),
        losses: main.losses.clone(),
        composite,
        composite_max_rel_loss_diff,
    })
}

/// Fresh adapter (same seed every time), one untimed warm-up step, then the timed steps on `path`.
/// Returns the run, the trainable parameter count and the number of adapted projections.
fn run_path(
    model: &mut crate::model::Model,
    spec: &BenchSpec,
    examples: &[Example],
    path: FwdPath,
) -> Result<(PathRun, usize, usize)> {
    let cfg = &spec.cfg;
    let name = format!("bench-{}", cfg.adapter_name());
    let layers = cfg.layers(model.cfg.num_hidden_layers);
    let lora = TrainableLora::init(model, &name, &layers, &cfg.targets, cfg.r, cfg.alpha, cfg.seed)?;
    lora.attach(model, 1.0)?;
    let vars = lora.named_vars();
    let mut opt = AdamW::new(&vars, cfg.betas, cfg.eps, cfg.weight_decay)?;
    let mut phases = Phases::default();
    let mut losses = Vec::new();
    let mut run = |exs: &[Example], phases: &mut Phases, model: &mut crate::model::Model| -> Result<f64> {
        let exs: Vec<&Example> = exs.iter().collect();
        let t0 = Instant::now();
        let refs = batch_reference_log_probs(model, &exs, cfg, &name)?;
        let t1 = Instant::now();
        let student = batch_completion_logits(model, &exs, path, crate::model::Adapters::AsGated)?;
        // As the heal loop does: each sequence its own NLL + barrier, averaged over the step.
        let parts = losses_from_logits(&exs, &student, &refs, None, cfg, path)?;
        let mut total: Option<Tensor> = None;
        for p in parts {
            let l = (p.loss / exs.len() as f64)?;
            total = Some(match total {
                Some(acc) => (acc + l)?,
                None => l,
            });
        }
        let total = total.ok_or_else(|| Error::invalid("empty bench step"))?;
        let value = total.to_scalar::<f32>()? as f64;
        let t2 = Instant::now();
        let grads = gradients(&total, &lora)?;
        let t3 = Instant::now();
        opt.step(&vars, &grads, cfg.lr)?;
        let t4 = Instant::now();
        phases.reference_s += (t1 - t0).as_secs_f64();
        phases.forward_s += (t2 - t1).as_secs_f64();
        phases.backward_s += (t3 - t2).as_secs_f64();
        phases.optimizer_s += (t4 - t3).as_secs_f64();
        Ok(value)
    };
    let mut warm = Phases::default();
    let mut chunks = examples.chunks(spec.batch);
    let result = (|| {
        if let Some(first) = chunks.next() {
            run(first, &mut warm, model)?;
        }
        for exs in chunks {
            losses.push(run(exs, &mut phases, model)?);
        }
        Ok::<_, Error>(())
    })();
    super::adapter::detach(model, &name);
    result?;
    let total_s = phases.total_s();
    let tokens = (spec.steps * spec.batch * spec.seq_len) as f64;
    let params: usize = lora.vars.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum();
    let run = PathRun {
        tokens_per_s: tokens / total_s.max(1e-9),
        tokens_per_s_without_reference: tokens / (total_s - phases.reference_s).max(1e-9),
        phases,
        losses,
    };
    Ok((run, params, lora.vars.len()))
}
