//! The heal loop: a fresh LoRA on the neutral-prompt examples, trained with NLL + λ_eff·relu(D − τ)
//! (+ spectral penalty, + weight decay) by our AdamW with a cosine schedule and gradient accumulation.
//! The reference logits come from the same model with this round's adapter gated off (or every adapter, for the
//! `base` reference) on the no-grad inference path. Checkpoints (adapter + optimiser moments) are written
//! atomically every N steps and at the end; a run resumes from the last one; cancellation stops between
//! micro-steps after saving; a non-finite loss stops the run and keeps the last good checkpoint.
//!
//! Files under the run directory: `train/checkpoint.safetensors`, `train/log.jsonl` (one `StepRecord` per
//! optimiser step), `adapter/` (PEFT layout, written on completion) and `heal.json` (the `HealLog`).

use super::adapter::{self, LoraAdapter, Site, TrainableLora};
use super::bake::HistoryEntry;
use super::config::{HealConfig, Reference};
use super::data::{Dataset, Example};
use super::loss;
use super::optim::{cosine_lr, AdamW};
use super::peft::{self, AdapterMeta};
use super::st_io;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write_json;
use crate::model::decoder::Path as FwdPath;
use crate::model::{
    Adapter, Adapters, CapturePositions, Forward, Hooks, LogitsAt, LoraLinear, Model, ModelInfo,
};
use crate::progress::Progress;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Version of the checkpoint and log formats.
pub const SCHEMA_VERSION: u32 = 1;

/// Metrics of one optimiser step, as logged to `train/log.jsonl` and passed to the step callback (a TUI chart
/// plots `loss`, `nll`, `d` and `lambda_eff` against `step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based optimiser step.
    pub step: usize,
    /// Total optimiser steps of the run.
    pub total_steps: usize,
    /// 0-based epoch of the step's first example.
    pub epoch: usize,
    /// Mean total loss over the step's micro-steps.
    pub loss: f64,
    /// Mean NLL of completion tokens, nats.
    pub nll: f64,
    /// Mean aggregated KL D to the reference, nats.
    pub d: f64,
    /// Mean per-position KL (the plain mean, whatever the aggregation), nats.
    pub kl_mean: f64,
    /// Mean barrier term λ_eff·relu(D − τ).
    pub barrier: f64,
    /// Mean spectral penalty term.
    pub spectral: f64,
    /// λ_eff of this round.
    pub lambda_eff: f64,
    /// Learning rate used.
    pub lr: f64,
    /// L2 norm of the accumulated gradient over all A and B.
    pub grad_norm: f64,
    /// Tokens forwarded in this step (prompt + completion).
    pub tokens: usize,
    /// Throughput of this step (forward, reference, backward, update).
    pub tokens_per_s: f64,
    /// Seconds since the run (or the resume) started.
    pub elapsed_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealStatus {
    /// Every step ran; the adapter is written.
    Completed,
    /// Stopped at the requested step count; resume to continue.
    Stopped,
    /// The user cancelled; a checkpoint holds the progress.
    Cancelled,
    /// The loss became NaN or infinite; the last good checkpoint is kept.
    Diverged,
}

/// The record of one heal run, written to `heal.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealLog {
    /// Format version.
    pub schema_version: u32,
    /// How it ended.
    pub status: HealStatus,
    /// One line for humans.
    pub message: String,
    /// The model trained on.
    pub model: ModelInfo,
    /// Adapters on the model at their gates during training (the `prev` reference).
    pub history_gates: BTreeMap<String, f64>,
    /// Where those adapters came from, as given by the caller.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// Settings.
    pub config: HealConfig,
    /// Fingerprint of the training token sequences.
    pub data_fingerprint: String,
    /// Examples trained on.
    pub n_examples: usize,
    /// `(completion id, reason)` of completions left out.
    pub skipped: Vec<(String, String)>,
    /// Completions cut at `max_len`.
    pub truncated: usize,
    /// Optimiser steps planned.
    pub total_steps: usize,
    /// Optimiser steps done (including those before a resume).
    pub steps_done: usize,
    /// Step the run resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Wall time of this invocation.
    pub wall_s: f64,
    /// Tokens forwarded in this invocation.
    pub tokens: usize,
    /// Training throughput of this invocation.
    pub tokens_per_s: f64,
    /// Optimiser steps per second of this invocation.
    pub steps_per_s: f64,
    /// The last step's metrics.
    pub last: Option<StepRecord>,
    /// The PEFT adapter directory, when completed.
    pub adapter_dir: Option<PathBuf>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

/// Options of one invocation that do not change what is learned.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Start over even if a checkpoint exists.
    pub fresh: bool,
    /// Stop (with a checkpoint) after this many optimiser steps in total.
    pub stop_after_steps: Option<usize>,
    /// Gate the adapter is left at after training (default 1).
    pub final_gate: Option<f64>,
    /// The kept rounds the model carries (recorded in the log so the run can be re-created and exported).
    pub history: Vec<HistoryEntry>,
}

/// Paths of a run directory (the session layout owns the names).
pub use crate::session::layout::HealRunDir as RunPaths;

/// Read `train/log.jsonl` (a torn last line is ignored).
pub fn read_step_log(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<StepRecord>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => return Err(Error::bad_file(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

/// Log-probabilities of `ex`'s completion positions `[C, vocab]` (f32), via the last block's hidden states so the
/// prompt positions never go through the vocabulary projection (the one-example case of the padded batch).
pub(crate) fn completion_log_probs(
    model: &Model,
    ex: &Example,
    path: FwdPath,
    sel: Adapters,
) -> Result<Tensor> {
    Ok(batch_completion_log_probs(model, &[ex], path, sel)?.lp)
}

/// Completion logits of several examples, stacked like `BatchLogProbs`.
pub(crate) struct BatchLogits {
    /// `[Σ C_i, vocab]`, in the model's dtype.
    pub logits: Tensor,
    /// `(first row, rows)` of each example, in order.
    pub spans: Vec<(usize, usize)>,
}

/// Completion log-probabilities of several examples, stacked: `lp` is `[Σ C_i, vocab]` and example `i` owns rows
/// `spans[i]`. The per-token loss terms are computed on the whole stack and only their `[C_i]` vectors are
/// sliced per example: slicing the `[C_i, vocab]` rows instead would make each slice's backward pass write a
/// zero-padded gradient the size of the whole stack.
pub(crate) struct BatchLogProbs {
    /// `[Σ C_i, vocab]`, f32.
    pub lp: Tensor,
    /// `(first row, rows)` of each example, in order.
    pub spans: Vec<(usize, usize)>,
}

/// Completion log-probs of several examples from one forward pass: the sequences are left-padded to the longest
/// (padded keys masked, each row's positions starting at 0, so every row sees exactly what it would alone), and
/// all rows' completion positions go through the vocabulary projection as one matrix. Batching is for speed
/// only: the values equal `completion_log_probs` example by example.
pub(crate) fn batch_completion_log_probs(
    model: &Model,
    exs: &[&Example],
    path: FwdPath,
    sel: Adapters,
) -> Result<BatchLogProbs> {
    let BatchLogits { logits, spans } = batch_completion_logits(model, exs, path, sel)?;
    Ok(BatchLogProbs { lp: loss::log_softmax(&logits, path)?, spans })
}

/// The stacked completion logits behind `batch_completion_log_probs`.
pub(crate) fn batch_completion_logits(
    model: &Model,
    exs: &[&Example],
    path: FwdPath,
    sel: Adapters,
) -> Result<BatchLogits> {
    if exs.is_empty() {
        return Err(Error::invalid("no examples to score"));
    }
    // A lone example gets no padding (`pad` all 0 takes the decoder's unpadded path).
    let t = exs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let pad: Vec<usize> = exs.iter().map(|e| t - e.ids.len()).collect();
    let mut flat = Vec::with_capacity(exs.len() * t);
    for (e, p) in exs.iter().zip(&pad) {
        // Any in-vocabulary id will do under the mask.
        flat.extend(std::iter::repeat_n(0u32, *p));
        flat.extend_from_slice(&e.ids);
    }
    let ids = Tensor::from_vec(flat, (exs.len(), t), model.device())?;
    let last = model.layers.len() - 1;
    let hooks = Hooks::capture(vec![last], CapturePositions::All);
    let f = Forward { hooks: &hooks, pad: &pad, logits: LogitsAt::None, path, adapters: sel };
    let out = model.forward(&ids, None, &f)?;
    let h = out
        .hidden
        .get(&last)
        .ok_or_else(|| Error::invalid("the last block's hidden state was not captured"))?;
    let rows = exs
        .iter()
        .zip(&pad)
        .enumerate()
        .map(|(i, (e, p))| Ok(h.get(i)?.narrow(0, p + e.prompt_len - 1, e.completion_len())?))
        .collect::<Result<Vec<_>>>()?;
    let logits = model.logits_from_hidden(&Tensor::cat(&rows, 0)?.unsqueeze(0)?, path)?.squeeze(0)?;
    let mut at = 0;
    let spans = exs
        .iter()
        .map(|e| {
            at += e.completion_len();
            (at - e.completion_len(), e.completion_len())
        })
        .collect();
    Ok(BatchLogits { logits, spans })
}

/// The loss of one example and its parts.
pub struct LossParts {
    /// Total loss (differentiable).
    pub loss: Tensor,
    /// NLL of the completion tokens.
    pub nll: f64,
    /// Aggregated KL D.
    pub d: f64,
    /// Plain mean of the per-position KL.
    pub kl_mean: f64,
    /// Barrier term.
    pub barrier: f64,
    /// Spectral penalty term.
    pub spectral: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Reference log-probs: the same weights with this round's adapter (or every adapter) gated off, no grad.
pub(crate) fn reference_log_probs(
    model: &Model,
    ex: &Example,
    cfg: &HealConfig,
    name: &str,
) -> Result<Tensor> {
    Ok(batch_reference_log_probs(model, &[ex], cfg, name)?.lp)
}

/// `reference_log_probs` of several examples from one padded forward pass.
pub(crate) fn batch_reference_log_probs(
    model: &Model,
    exs: &[&Example],
    cfg: &HealConfig,
    name: &str,
) -> Result<BatchLogProbs> {
    // The reference is a selection passed with the pass; the model's gates are never touched.
    let sel = match cfg.reference {
        Reference::Prev => Adapters::Without(name),
        Reference::Base => Adapters::Base,
    };
    let lp = batch_completion_log_probs(model, exs, FwdPath::Inference, sel)?;
    Ok(BatchLogProbs { lp: lp.lp.detach(), spans: lp.spans })
}

/// The heal loss of one example for the attached trainable adapter: reference pass (no grad, gate off), student
/// pass on the training path, NLL + barrier (+ spectral penalty).
pub fn example_loss(
    model: &mut Model,
    lora: &TrainableLora,
    ex: &Example,
    cfg: &HealConfig,
) -> Result<LossParts> {
    let mut parts = batch_losses(model, lora, &[ex], cfg)?;
    parts.pop().ok_or_else(|| Error::invalid("no loss computed"))
}

/// `example_loss` of several examples at once: one padded reference pass and one padded student pass for all of
/// them. Each example keeps its own NLL, D and barrier (the loss is not pooled across examples), so summing the
/// returned losses gives what one-at-a-time accumulation gives.
pub fn batch_losses(
    model: &mut Model,
    lora: &TrainableLora,
    exs: &[&Example],
    cfg: &HealConfig,
) -> Result<Vec<LossParts>> {
    batch_losses_on(model, lora, exs, cfg, FwdPath::Training)
}

/// `batch_losses` with the student on a chosen differentiable path: `Training` (what heal uses) or `Composite`
/// (candle's differentiable ops only, the slower reference the fused kernels are checked against).
pub fn batch_losses_on(
    model: &mut Model,
    lora: &TrainableLora,
    exs: &[&Example],
    cfg: &HealConfig,
    path: FwdPath,
) -> Result<Vec<LossParts>> {
    if path == FwdPath::Inference {
        return Err(Error::invalid("the inference path has no gradients: train on Training or Composite"));
    }
    let refs = batch_reference_log_probs(model, exs, cfg, &lora.name)?;
    let student = batch_completion_logits(model, exs, path, Adapters::AsGated)?;
    let pen = spectral_penalty(lora, cfg)?;
    losses_from_logits(exs, &student, &refs, pen.as_ref(), cfg, path)
}

/// Each example's NLL + barrier (+ the spectral penalty `pen`, shared) from the student's stacked logits and the
/// reference's stacked log-probs. The per-token NLL and KL are computed once over the stack (`path` picks the
/// fused head or the composite ops) and only their `[C_i]` vectors are sliced per example.
pub(crate) fn losses_from_logits(
    exs: &[&Example],
    student: &BatchLogits,
    refs: &BatchLogProbs,
    pen: Option<&Tensor>,
    cfg: &HealConfig,
    path: FwdPath,
) -> Result<Vec<LossParts>> {
    let targets: Vec<u32> = exs.iter().flat_map(|ex| ex.ids[ex.prompt_len..].iter().copied()).collect();
    let (token_nll, token_kl) = loss::token_nll_and_kl(&student.logits, &refs.lp, &targets, cfg.reg, path)?;
    let spectral = match pen {
        Some(p) => scalar(p)?,
        None => 0.0,
    };
    student
        .spans
        .iter()
        .map(|&(at, n)| {
            let nll = token_nll.narrow(0, at, n)?.mean_all()?;
            let kl = token_kl.narrow(0, at, n)?;
            let d = loss::aggregate(&kl, cfg.agg)?;
            let barrier = loss::barrier(&d, cfg.reg, cfg.lambda_eff(), cfg.tau)?;
            let mut total = (&nll + &barrier)?;
            if let Some(p) = pen {
                total = (total + p)?;
            }
            Ok(LossParts {
                nll: scalar(&nll)?,
                d: scalar(&d)?,
                kl_mean: scalar(&kl.mean_all()?)?,
                barrier: scalar(&barrier)?,
                spectral,
                loss: total,
            })
        })
        .collect()
}

/// `spectral_lambda` · mean σ_max(B·A) over the adapted projections, or `None` when the penalty is off.
fn spectral_penalty(lora: &TrainableLora, cfg: &HealConfig) -> Result<Option<Tensor>> {
    if cfg.spectral_lambda <= 0.0 {
        return Ok(None);
    }
    let mut sum: Option<Tensor> = None;
    for (a, b) in lora.vars.values() {
        let ad = Adapter {
            name: lora.name.clone(),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 1.0,
            gate: 1.0,
        };
        let s = LoraLinear::adapter_sigma_max(&ad, cfg.spectral_iters)?.to_dtype(DType::F32)?;
        sum = Some(match sum {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    match sum {
        Some(sum) => Ok(Some(((sum / lora.vars.len() as f64)? * cfg.spectral_lambda)?)),
        None => Ok(None),
    }
}

/// Loss parts of an attached adapter over a data set, without gradients (both passes on the inference path).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean NLL of completion tokens over examples.
    pub nll: f64,
    /// Mean aggregated KL D to the reference over examples.
    pub d: f64,
    /// Largest per-example D.
    pub d_max: f64,
    /// Mean plain per-position KL.
    pub kl_mean: f64,
}

/// Measure the adapter `name` (as attached, at its gate) against the reference `cfg.reference` with the
/// aggregation and divergence of `cfg`.
pub fn evaluate(model: &mut Model, name: &str, data: &Dataset, cfg: &HealConfig) -> Result<Evaluation> {
    if data.examples.is_empty() {
        return Err(Error::invalid("nothing to evaluate"));
    }
    let mut ev = Evaluation { nll: 0.0, d: 0.0, d_max: 0.0, kl_mean: 0.0 };
    let n = data.examples.len() as f64;
    for ex in &data.examples {
        let ref_lp = reference_log_probs(model, ex, cfg, name)?;
        let lp = completion_log_probs(model, ex, FwdPath::Inference, Adapters::AsGated)?;
        let targets = Tensor::new(&ex.ids[ex.prompt_len..], model.device())?;
        let kl = loss::per_position_kl(&lp, &ref_lp, cfg.reg, FwdPath::Inference)?;
        let d = scalar(&loss::aggregate(&kl, cfg.agg)?)?;
        ev.nll += scalar(&loss::nll(&lp, &targets)?)? / n;
        ev.d += d / n;
        ev.d_max = ev.d_max.max(d);
        ev.kl_mean += scalar(&kl.mean_all()?)? / n;
    }
    Ok(ev)
}

/// Gradients of `loss` for every variable, by name; a variable the gradient never reached is an error (the
/// fused kernels have no backward pass, so a broken training path shows up here rather than as a silent no-op).
pub fn gradients(loss: &Tensor, lora: &TrainableLora) -> Result<BTreeMap<String, Tensor>> {
    let store = loss.backward()?;
    let mut out = BTreeMap::new();
    for (name, var) in lora.named_vars() {
        let g = store.get(var.as_tensor()).ok_or_else(|| {
            Error::invalid(format!("no gradient reached `{name}`: the training path is broken"))
        })?;
        out.insert(name, g.to_dtype(DType::F32)?);
    }
    Ok(out)
}

/// The example order of epoch `e` (a seeded shuffle, recomputed identically on resume).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)));
    order.shuffle(&mut rng);
    order
}

/// Optimiser steps of a run over `n` examples.
pub fn total_steps(n: usize, cfg: &HealConfig) -> usize {
    (n * cfg.epochs).div_ceil(cfg.grad_accum)
}

/// What ties a checkpoint to its run: config, data, model and history. The checkpoint interval and the
/// micro-batch change nothing that is trained, so they are left out (`micro_batch` 1 is not serialised): a run may
/// resume with other values, and checkpoints written before micro-batches existed still match. Checkpoints
/// written while the micro-batch was still part of the identity match the form with `micro_batch` as set.
fn run_identity(
    cfg: &HealConfig,
    data_fp: &str,
    info: &ModelInfo,
    history: &BTreeMap<String, f64>,
    micro_batch: usize,
) -> String {
    let mut c = cfg.clone();
    c.checkpoint_every = 0;
    c.micro_batch = micro_batch;
    serde_json::json!({"config": c, "data": data_fp, "model": info.weights_hash, "history": history})
        .to_string()
}

fn save_checkpoint(path: &Path, lora: &TrainableLora, opt: &AdamW, identity: &str) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, var) in lora.named_vars() {
        tensors.insert(format!("lora.{name}"), var.as_detached_tensor().to_dtype(DType::F32)?);
    }
    for (name, (m, v)) in &opt.moments {
        tensors.insert(format!("adam_m.{name}"), m.clone());
        tensors.insert(format!("adam_v.{name}"), v.clone());
    }
    let mut md = BTreeMap::new();
    md.insert("schema_version".into(), SCHEMA_VERSION.to_string());
    md.insert("step".into(), opt.step.to_string());
    md.insert("identity".into(), identity.to_string());
    st_io::save(path, &tensors, &md)
}

/// Restore adapter and optimiser from a checkpoint whose identity is one of `identities`; returns the step it
/// was taken at.
fn load_checkpoint(path: &Path, lora: &TrainableLora, opt: &mut AdamW, identities: &[&str]) -> Result<usize> {
    let (tensors, md) = st_io::load(path, lora_device(lora))?;
    let bad = |m: &str| Error::bad_file(path, m);
    if !md.get("identity").is_some_and(|id| identities.contains(&id.as_str())) {
        return Err(bad(
            "checkpoint was made with a different config, data, model or history; start fresh (--fresh) to overwrite it",
        ));
    }
    let step: usize =
        md.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no step in metadata"))?;
    let mut pairs = BTreeMap::new();
    for (site, _) in lora.vars.iter() {
        let get = |k: String| tensors.get(&k).cloned().ok_or_else(|| bad(&format!("missing tensor `{k}`")));
        let a = get(format!("lora.{}.lora_A", site.hf_path()))?;
        let b = get(format!("lora.{}.lora_B", site.hf_path()))?;
        pairs.insert(site.clone(), (a, b));
    }
    lora.load_from(&LoraAdapter { name: lora.name.clone(), r: lora.r, alpha: lora.alpha, pairs })?;
    for (name, (m, v)) in opt.moments.iter_mut() {
        let get = |k: String| tensors.get(&k).cloned().ok_or_else(|| bad(&format!("missing tensor `{k}`")));
        *m = get(format!("adam_m.{name}"))?;
        *v = get(format!("adam_v.{name}"))?;
    }
    opt.step = step;
    Ok(step)
}

fn lora_device(lora: &TrainableLora) -> &candle_core::Device {
    lora.vars.values().next().map(|(a, _)| a.device()).unwrap_or(&candle_core::Device::Cpu)
}

/// Keep only log lines of steps ≤ `step` (after resuming from that step's checkpoint).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<StepRecord> = read_step_log(path)?.into_iter().filter(|r| r.step <= step).collect();
    let mut s = String::new();
    for r in kept {
        s.push_str(&serde_json::to_string(&r).map_err(|e| Error::bad_file(path, e))?);
        s.push('\n');
    }
    crate::fsutil::atomic_write(path, s.as_bytes())
}

/// Train this round's adapter on `data`, writing into `out_dir`. On return the adapter stays attached to `model`
/// under `cfg.adapter_name()` (gate `opts.final_gate`, default 1) whatever the status, so the caller can measure
/// it or `adapter::detach` it. `on_step` sees every optimiser step's metrics.
#[allow(clippy::too_many_arguments)]
pub fn heal(
    model: &mut Model,
    info: &ModelInfo,
    data: &Dataset,
    cfg: &HealConfig,
    out_dir: &Path,
    opts: &RunOptions,
    progress: &mut dyn Progress,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<HealLog> {
    cfg.validate(&model.cfg)?;
    if data.examples.is_empty() {
        return Err(Error::invalid("no usable training examples (every completion was skipped)"));
    }
    if let Some(e) = data.examples.iter().find(|e| e.prompt_len == 0 || e.completion_len() == 0) {
        return Err(Error::invalid(format!("example `{}` has an empty prompt or completion", e.id)));
    }
    let started = Instant::now();
    let paths = RunPaths::at(out_dir);
    std::fs::create_dir_all(paths.train()).map_err(|e| Error::bad_file(out_dir, e))?;
    // Temp files of a killed earlier attempt (a run directory has one writer: this run, or the session that
    // holds its lock).
    crate::fsutil::remove_stale_temps(out_dir)?;
    let name = cfg.adapter_name();
    if adapter::adapter_names(model).contains(&name) {
        return Err(Error::invalid(format!(
            "the model already carries an adapter named `{name}`; heal round {} needs a fresh one",
            cfg.round
        )));
    }
    let history = adapter::gates(model);
    let layers = cfg.layers(model.cfg.num_hidden_layers);
    let lora = TrainableLora::init(model, &name, &layers, &cfg.targets, cfg.r, cfg.alpha, cfg.seed)?;
    let vars = lora.named_vars();
    let mut opt = AdamW::new(&vars, cfg.betas, cfg.eps, cfg.weight_decay)?;
    let data_fp = data.fingerprint();
    let identity = run_identity(cfg, &data_fp, info, &history, 1);
    let older_identity = run_identity(cfg, &data_fp, info, &history, cfg.micro_batch);

    let ckpt = paths.checkpoint();
    let mut resumed_from = None;
    if opts.fresh {
        for p in [ckpt.clone(), paths.log()] {
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::bad_file(&p, e))?;
            }
        }
    } else if ckpt.exists() {
        let step = load_checkpoint(&ckpt, &lora, &mut opt, &[&identity, &older_identity])?;
        truncate_log(&paths.log(), step)?;
        resumed_from = Some(step);
    } else {
        // Killed before its first checkpoint: training starts again at step 1, so the steps logged by the
        // lost attempt go (else the log would read 1, 2, 1, 2).
        truncate_log(&paths.log(), 0)?;
    }
    let resumed_note =
        resumed_from.map(|s| format!("resumed from the checkpoint at step {s}; ")).unwrap_or_default();
    lora.attach(model, 1.0)?;

    let n = data.examples.len();
    let total = total_steps(n, cfg);
    let micro_total = n * cfg.epochs;
    let lambda_eff = cfg.lambda_eff();
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .map_err(|e| Error::bad_file(paths.log(), e))?;
    let mut status = HealStatus::Completed;
    let mut message = String::new();
    let mut last: Option<StepRecord> = None;
    let mut last_ckpt: Option<usize> = resumed_from;
    let mut tokens_run = 0usize;
    let start_step = opt.step;
    let mut orders: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    progress.step(start_step as u64, total as u64, &format!("{resumed_note}training"));

    while opt.step < total {
        if opts.stop_after_steps.is_some_and(|s| opt.step >= s) {
            status = HealStatus::Stopped;
            message = format!("stopped after step {} of {total} as asked; run again to resume", opt.step);
            break;
        }
        let step_start = Instant::now();
        let first = opt.step * cfg.grad_accum;
        let end = (first + cfg.grad_accum).min(micro_total);
        let count = (end - first) as f64;
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut s_loss, mut s_nll, mut s_d, mut s_kl, mut s_bar, mut s_spec) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mut tokens = 0usize;
        let mut cancelled = false;
        let mut bad: Option<String> = None;
        // The step's examples go through the model `micro_batch` at a time; each keeps its own loss, scaled by
        // 1/count, so the accumulated gradient is the same whatever the micro-batch.
        let mut k = first;
        'micro: while k < end {
            if progress.is_cancelled() {
                cancelled = true;
                break;
            }
            let stop = (k + cfg.micro_batch).min(end);
            let exs: Vec<&Example> = (k..stop)
                .map(|k| {
                    let epoch = k / n;
                    let order = orders.entry(epoch).or_insert_with(|| epoch_order(n, cfg.seed, epoch));
                    &data.examples[order[k % n]]
                })
                .collect();
            k = stop;
            let parts = batch_losses(model, &lora, &exs, cfg)?;
            let mut sum: Option<Tensor> = None;
            for (ex, m) in exs.iter().zip(parts) {
                let l = scalar(&m.loss)?;
                if !l.is_finite() {
                    bad = Some(format!("loss became {l} on example `{}`", ex.id));
                    break 'micro;
                }
                s_loss += l / count;
                s_nll += m.nll / count;
                s_d += m.d / count;
                s_kl += m.kl_mean / count;
                s_bar += m.barrier / count;
                s_spec += m.spectral / count;
                tokens += ex.ids.len();
                let scaled = (m.loss / count)?;
                sum = Some(match sum {
                    Some(acc) => (acc + scaled)?,
                    None => scaled,
                });
            }
            let Some(sum) = sum else { continue };
            for (name, g) in gradients(&sum, &lora)? {
                let next = match acc.remove(&name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                acc.insert(name, next);
            }
        }
        if cancelled {
            status = HealStatus::Cancelled;
            break;
        }
        let grad_norm = if bad.is_none() {
            let mut sq = 0.0;
            for g in acc.values() {
                sq += scalar(&g.sqr()?.sum_all()?)?;
            }
            let norm = sq.sqrt();
            if !norm.is_finite() {
                bad = Some(format!("gradient norm became {norm}"));
            }
            norm
        } else {
            f64::NAN
        };
        if let Some(why) = bad {
            status = HealStatus::Diverged;
            message = match last_ckpt {
                Some(s) => format!(
                    "{why} at step {}; stopped and kept the last good checkpoint (step {s}) at {}",
                    opt.step + 1,
                    ckpt.display()
                ),
                None => format!("{why} at step {}; stopped before any checkpoint was written", opt.step + 1),
            };
            break;
        }
        let lr = cosine_lr(cfg.lr, opt.step, total, cfg.warmup_ratio);
        opt.step(&vars, &acc, lr)?;
        tokens_run += tokens;
        let secs = step_start.elapsed().as_secs_f64().max(1e-9);
        let rec = StepRecord {
            step: opt.step,
            total_steps: total,
            epoch: first / n,
            loss: s_loss,
            nll: s_nll,
            d: s_d,
            kl_mean: s_kl,
            barrier: s_bar,
            spectral: s_spec,
            lambda_eff,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        let line = serde_json::to_string(&rec).map_err(|e| Error::bad_file(paths.log(), e))?;
        writeln!(log_file, "{line}").map_err(|e| Error::bad_file(paths.log(), e))?;
        log_file.flush().map_err(|e| Error::bad_file(paths.log(), e))?;
        if cfg.checkpoint_every > 0 && opt.step % cfg.checkpoint_every == 0 && opt.step < total {
            log_file.sync_data().map_err(|e| Error::bad_file(paths.log(), e))?;
            save_checkpoint(&ckpt, &lora, &opt, &identity)?;
            last_ckpt = Some(opt.step);
        }
        progress.step(
            opt.step as u64,
            total as u64,
            &format!("loss {:.3} nll {:.3} D {:.3} λ {:.3}", rec.loss, rec.nll, rec.d, lambda_eff),
        );
        on_step(&rec);
        last = Some(rec);
    }

    if status != HealStatus::Diverged && last_ckpt != Some(opt.step) && opt.step > 0 {
        save_checkpoint(&ckpt, &lora, &opt, &identity)?;
        last_ckpt = Some(opt.step);
    }
    let mut adapter_dir = None;
    match status {
        HealStatus::Completed => {
            let meta = AdapterMeta {
                schema_version: SCHEMA_VERSION,
                name: name.clone(),
                round: Some(cfg.round),
                default_gate: 1.0,
                base_model: info.id.clone(),
                base_weights_hash: Some(info.weights_hash.clone()),
            };
            peft::save_peft(&lora.to_adapter()?, &paths.adapter(), &meta)?;
            adapter_dir = Some(paths.adapter());
            // Training is over: from here on the adapter is a constant, so no later forward tracks gradients.
            adapter::freeze(model, &name);
            message = format!("completed {total} steps; adapter written to {}", paths.adapter().display());
        }
        HealStatus::Cancelled => {
            message =
                format!("cancelled at step {} of {total}; checkpoint saved, run again to resume", opt.step);
        }
        HealStatus::Stopped | HealStatus::Diverged => {}
    }
    if let Some(g) = opts.final_gate {
        adapter::set_gate(model, &name, g);
    }
    // Whoever reads the outcome learns that this run continued an earlier one.
    let message = format!("{resumed_note}{message}");
    let wall = started.elapsed().as_secs_f64();
    let log = HealLog {
        schema_version: SCHEMA_VERSION,
        status,
        message,
        model: info.clone(),
        history_gates: history,
        history: opts.history.clone(),
        config: cfg.clone(),
        data_fingerprint: data_fp,
        n_examples: n,
        skipped: data.skipped.clone(),
        truncated: data.truncated,
        total_steps: total,
        steps_done: opt.step,
        resumed_from,
        wall_s: wall,
        tokens: tokens_run,
        tokens_per_s: tokens_run as f64 / wall.max(1e-9),
        steps_per_s: (opt.step - start_step) as f64 / wall.max(1e-9),
        last,
        adapter_dir,
        checkpoint: last_ckpt.map(|_| ckpt.clone()),
    };
    atomic_write_json(&paths.summary(), &log)?;
    Ok(log)
}

/// Read the frozen adapter held in a checkpoint (to export a run that has not finished): the adapter, the step
/// it was taken at, and the run's config.
pub fn adapter_from_checkpoint(path: &Path) -> Result<(LoraAdapter, usize, HealConfig)> {
    let (tensors, md) = st_io::load(path, &candle_core::Device::Cpu)?;
    let bad = |m: String| Error::bad_file(path, m);
    let step: usize = md
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("not a heal checkpoint (no step in metadata)".into()))?;
    let identity: serde_json::Value = md
        .get("identity")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("not a heal checkpoint (no run identity in metadata)".into()))?;
    let cfg: HealConfig = identity
        .get("config")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| bad("the checkpoint's config does not parse".into()))?;
    let mut halves: BTreeMap<Site, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (k, t) in tensors {
        let Some(rest) = k.strip_prefix("lora.") else { continue };
        let (site, half) = peft::parse_tensor_name(&format!("base_model.model.{rest}.weight"))
            .ok_or_else(|| bad(format!("unexpected tensor `{k}`")))?;
        let slot = halves.entry(site).or_default();
        if half == 'A' {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let mut pairs = BTreeMap::new();
    for (site, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                pairs.insert(site, (a, b));
            }
            _ => return Err(bad(format!("{} misses A or B", site.hf_path()))),
        }
    }
    if pairs.is_empty() {
        return Err(bad("no adapter tensors in the checkpoint".into()));
    }
    let ad = LoraAdapter { name: cfg.adapter_name(), r: cfg.r, alpha: cfg.alpha, pairs };
    Ok((ad, step, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_differ() {
        let a = epoch_order(10, 42, 0);
        let b = epoch_order(10, 42, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(10, 42, 0));
    }

    /// The vendored backward pass (vendor/README.md) stores a gradient's first contribution instead of adding it
    /// to zeros: a variable reached once through a transposed view, once through a broadcast and twice through a
    /// shared product still gets the hand-computed gradient, contiguous, and a subtracted-only path gets `-g`.
    #[test]
    fn gradients_through_views_shared_uses_and_subtraction_are_exact() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor, Var};
        let dev = Device::Cpu;
        let x = Var::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &dev)?;
        let c = Tensor::from_slice(&[1f32, 10.0, 100.0, 1000.0, 1e4, 1e5], (3, 2), &dev)?;
        let b = Var::from_slice(&[0.5f32, -1.0, 2.0], 3, &dev)?;
        // L = Σ xᵀ ⊙ c + Σ x ⊙ broadcast(b) + Σ x ⊙ x − Σ b
        let l = ((x.as_tensor().t()? * &c)?.sum_all()?
            + x.as_tensor().broadcast_mul(b.as_tensor())?.sum_all()?
            + (x.as_tensor() * x.as_tensor())?.sum_all()?)?;
        let l = (l - b.as_tensor().sum_all()?)?;
        let g = l.backward()?;
        let gx = g.get(x.as_tensor()).expect("x has a gradient");
        let gb = g.get(b.as_tensor()).expect("b has a gradient");
        assert!(gx.is_contiguous() && gb.is_contiguous());
        // ∂L/∂x[i][j] = c[j][i] + b[j] + 2 x[i][j]; ∂L/∂b[j] = Σ_i x[i][j] − 1.
        let want_x = [
            1.0 + 0.5 + 2.0,
            100.0 - 1.0 + 4.0,
            1e4 + 2.0 + 6.0,
            10.0 + 0.5 + 8.0,
            1000.0 - 1.0 + 10.0,
            1e5 + 2.0 + 12.0,
        ];
        assert_eq!(gx.flatten_all()?.to_vec1::<f32>()?, want_x.map(|v| v as f32).to_vec());
        assert_eq!(gb.to_vec1::<f32>()?, vec![4.0, 6.0, 8.0]);
        // A variable reached only through a subtraction gets exactly −1 per element.
        let y = Var::from_slice(&[3f32, 4.0], 2, &dev)?;
        let g = (Tensor::zeros(2, candle_core::DType::F32, &dev)? - y.as_tensor())?.sum_all()?.backward()?;
        assert_eq!(g.get(y.as_tensor()).expect("y has a gradient").to_vec1::<f32>()?, vec![-1.0, -1.0]);
        Ok(())
    }

    #[test]
    fn steps_round_up() {
        let c = HealConfig { grad_accum: 4, epochs: 2, ..HealConfig::default() };
        assert_eq!(total_steps(5, &c), 3);
    }
}
