//! Gate Q1: how the student changed. Measures a model (with its adapters at their gates) on fresh neutral-prompt
//! generations — coherence as the base model's log-likelihood of them, persona strength as the log-probability gain
//! of the same tokens under the persona prompt, plus each sample's per-token KL to the base for the heal screen's
//! heat map — and writes `gate-q1.md`: coherence and trait before vs after,
//! the sweep table ranked by coherence cost per nat of trait moved, and sample generations side by side.
//! When the eval stage's metrics exist they can be passed in instead; the report says which it used.

use super::adapter;
use super::data::Example;
use super::train::{batch_completion_log_probs, completion_log_probs, BatchLogProbs};
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use crate::model::decoder::Path as FwdPath;
use crate::model::generate::{generate, Sampling};
use crate::model::{Adapters, Hooks, LoadedModel};
use crate::progress::Progress;
use crate::stats::{bootstrap, Interval};
use crate::steer::Completion;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// What to generate and score when measuring a model.
#[derive(Debug, Clone)]
pub struct MeasureSpec {
    /// Neutral user prompts (held out from training where possible).
    pub prompts: Vec<String>,
    /// The neutral system prompt used for generation and distillation.
    pub neutral_system: String,
    /// The persona system prompt, for persona strength; `None` leaves the trait unmeasured.
    pub persona_system: Option<String>,
    /// Sampling of the fresh generations.
    pub sampling: Sampling,
}

/// One column of the heal screen: a completion's scores and its per-token KL heat map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenHeat {
    /// Text of each completion token (they concatenate to the completion's text).
    pub tokens: Vec<String>,
    /// KL to the base of each token's next-token distribution, nats; empty when unknown.
    #[serde(default)]
    pub kl: Vec<f32>,
    /// Mean base-model log-likelihood per token, nats (higher is more coherent); `None` when unknown.
    #[serde(default)]
    pub coherence: Option<f64>,
    /// Mean log-probability gain per token under the persona prompt vs the neutral one (base model), nats;
    /// `None` when unmeasured.
    #[serde(default)]
    pub persona_gain: Option<f64>,
    /// Mean of `kl`, nats; `None` when unknown.
    #[serde(default)]
    pub kl_mean: Option<f64>,
}

/// `Some(x)` when finite (JSON has no NaN; a non-number would make the report unreadable).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn mean_f32(xs: &[f32]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    finite(xs.iter().map(|x| *x as f64).sum::<f64>() / xs.len() as f64)
}

impl TokenHeat {
    /// The teacher column from a steered completion's own traces: its KL is the steered model's KL to the
    /// unsteered one (the base in round 0; the previous rounds baked in later rounds), its coherence the mean
    /// log-likelihood under that unsteered model. Persona gain is not part of a completion's traces (see
    /// `teacher_heat`). `None` when the completion carries no per-token texts (the screen then shows plain text).
    pub fn from_completion(c: &Completion) -> Option<TokenHeat> {
        let n = c.tokens.len();
        if n == 0 || c.token_text.len() != n || c.token_text.iter().all(|t| t.is_empty()) {
            return None;
        }
        let kl = if c.trace.kl.len() == n { c.trace.kl.clone() } else { Vec::new() };
        let coherence =
            if c.trace.nll_base.len() == n { mean_f32(&c.trace.nll_base).map(|nll| -nll) } else { None };
        Some(TokenHeat {
            tokens: c.token_text.clone(),
            kl_mean: mean_f32(&kl),
            kl,
            coherence,
            persona_gain: None,
        })
    }
}

/// The teacher column: `TokenHeat::from_completion` plus the completion's persona gain per token, measured as the
/// students' is (base model with every gate at 0, restored afterwards; persona vs neutral system prompt of
/// `spec`, on the completion's own tokens). `None` when the completion carries no per-token texts.
pub fn teacher_heat(lm: &LoadedModel, spec: &MeasureSpec, c: &Completion) -> Result<Option<TokenHeat>> {
    let Some(mut heat) = TokenHeat::from_completion(c) else { return Ok(None) };
    if let Some(persona) = &spec.persona_system {
        heat.persona_gain =
            persona_gain(lm, &spec.neutral_system, persona, &c.prompt, &c.tokens, Adapters::Base)?;
    }
    Ok(Some(heat))
}

/// Mean log-probability gain per token of `tokens` after `prompt` under the persona system prompt vs the neutral
/// one, with the adapters `sel` picks.
fn persona_gain(
    lm: &LoadedModel,
    neutral: &str,
    persona: &str,
    prompt: &str,
    tokens: &[u32],
    sel: Adapters,
) -> Result<Option<f64>> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let gain =
        log_prob_after(lm, persona, prompt, tokens, sel)? - log_prob_after(lm, neutral, prompt, tokens, sel)?;
    Ok(finite(gain / tokens.len() as f64))
}

/// Summed log-probability of `tokens` after `prompt` under the system prompt `system`, with the adapters `sel`
/// picks.
fn log_prob_after(
    lm: &LoadedModel,
    system: &str,
    prompt: &str,
    tokens: &[u32],
    sel: Adapters,
) -> Result<f64> {
    let ids = lm.tokenizer.encode(&lm.chat.prompt(Some(system), prompt)?)?;
    Ok(token_log_probs(lm, &ids, tokens, sel)?.iter().map(|x| *x as f64).sum())
}

/// One fresh generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// User prompt.
    pub prompt: String,
    /// Generated text.
    pub text: String,
    /// Base-model NLL per token of the text, nats.
    pub nll_base: f64,
    /// Generated token ids (empty in reports written before they were recorded).
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// Per-token texts, KL(model as measured ‖ base) and the sample's scores; `None` for an empty generation
    /// and in reports written before they were recorded.
    #[serde(default)]
    pub heat: Option<TokenHeat>,
}

/// A model's coherence and trait on fresh neutral generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Mean base-model log-likelihood per generated token, nats (higher is more coherent); `-ln ppl`.
    pub coherence: f64,
    /// Base-model perplexity of the generations.
    pub ppl: f64,
    /// Mean log-probability gain per token under the persona prompt vs the neutral one (base model), nats.
    pub persona_strength: Option<f64>,
    /// Generated tokens scored.
    pub tokens: usize,
    /// The generations.
    pub samples: Vec<Sample>,
}

/// Log-probabilities of `gen` after `prompt`, with the adapters `sel` picks.
fn token_log_probs(lm: &LoadedModel, prompt: &[u32], gen: &[u32], sel: Adapters) -> Result<Vec<f32>> {
    let lp = completion_log_probs(&lm.model, &completion_example(prompt, gen), FwdPath::Inference, sel)?;
    gathered(&lp, gen)
}

/// `gen` scored after `prompt`: the example whose completion positions are `gen`'s.
fn completion_example(prompt: &[u32], gen: &[u32]) -> Example {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(gen);
    Example { id: String::new(), ids, prompt_len: prompt.len() }
}

/// Each generated token's log-prob from its completion rows `[len(gen), vocab]`.
fn gathered(lp: &Tensor, gen: &[u32]) -> Result<Vec<f32>> {
    let targets = Tensor::new(gen, lp.device())?.unsqueeze(1)?;
    Ok(lp.gather(&targets, 1)?.squeeze(1)?.to_vec1()?)
}

/// Generate from the model as it is (adapters at their gates), then score the generations under the pristine base
/// (every gate 0; restored afterwards).
pub fn measure(lm: &LoadedModel, spec: &MeasureSpec, progress: &mut dyn Progress) -> Result<Measurement> {
    if spec.prompts.is_empty() {
        return Err(Error::invalid("no prompts to measure on"));
    }
    let neutral: Vec<Vec<u32>> = spec
        .prompts
        .iter()
        .map(|p| lm.tokenizer.encode(&lm.chat.prompt(Some(&spec.neutral_system), p)?))
        .collect::<Result<_>>()?;
    progress.step(0, 2, "generating");
    let gen = generate(
        &lm.model,
        &neutral,
        &spec.sampling,
        &Hooks::none(),
        &lm.tokenizer.stop_ids,
        lm.tokenizer.pad_id,
        &mut |_| !progress.is_cancelled(),
    )?;
    if progress.is_cancelled() {
        return Err(Error::Cancelled);
    }
    progress.step(1, 2, "scoring under the base model");
    // With every adapter off the student is the base: its KL to the base is exactly 0 and needs no forward.
    let student_is_base = adapter::gates(&lm.model).values().all(|g| *g == 0.0);
    let (mut sum_lp, mut sum_gain, mut tokens) = (0.0f64, 0.0f64, 0usize);
    let mut samples = Vec::with_capacity(spec.prompts.len());
    let work: Vec<(&String, &Vec<u32>, &Vec<u32>)> =
        spec.prompts.iter().zip(&neutral).zip(&gen.tokens).map(|((p, i), g)| (p, i, g)).collect();
    for chunk in work.chunks(SCORE_BATCH) {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        for (sample, lp, gain) in score_samples(lm, spec, chunk, student_is_base)? {
            sum_lp += lp;
            sum_gain += gain.unwrap_or(0.0);
            tokens += sample.token_ids.len();
            samples.push(sample);
        }
    }
    progress.step(2, 2, "measured");
    let mean_lp = if tokens > 0 { sum_lp / tokens as f64 } else { f64::NAN };
    Ok(Measurement {
        coherence: mean_lp,
        ppl: (-mean_lp).exp(),
        persona_strength: spec.persona_system.as_ref().map(|_| sum_gain / tokens.max(1) as f64),
        tokens,
        samples,
    })
}

/// Generations scored per batched forward. Each forward is a few hundred tokens per row; the cap bounds the
/// completion logits (`rows × tokens × vocab`) on a large vocabulary.
const SCORE_BATCH: usize = 8;

/// Score generations `(prompt, neutral prompt ids, generated ids)` in at most three batched forwards: the model
/// as it is (skipped when it is the base) for the per-token KL(student ‖ base), then the pristine base (every
/// adapter left out of the pass) for the log-likelihood of the tokens after the neutral prompt and, when a persona
/// prompt is given, after the persona prompt. Batching is for speed only (each row sees what it would alone).
/// Returns each sample with its summed base log-likelihood and summed persona gain, in order.
fn score_samples(
    lm: &LoadedModel,
    spec: &MeasureSpec,
    work: &[(&String, &Vec<u32>, &Vec<u32>)],
    student_is_base: bool,
) -> Result<Vec<(Sample, f64, Option<f64>)>> {
    // Empty generations have nothing to score and take no row.
    let live: Vec<_> = work.iter().filter(|(_, _, g)| !g.is_empty()).collect();
    let neutral_ex: Vec<Example> = live.iter().map(|(_, ids, g)| completion_example(ids, g)).collect();
    let persona_ex: Option<Vec<Example>> = match &spec.persona_system {
        Some(persona) => Some(
            live.iter()
                .map(|(p, _, g)| {
                    Ok(completion_example(&lm.tokenizer.encode(&lm.chat.prompt(Some(persona), p)?)?, g))
                })
                .collect::<Result<_>>()?,
        ),
        None => None,
    };
    let batch = |exs: &[Example], sel: Adapters| -> Result<Option<BatchLogProbs>> {
        if exs.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&Example> = exs.iter().collect();
        Ok(Some(batch_completion_log_probs(&lm.model, &refs, FwdPath::Inference, sel)?))
    };
    let student = if student_is_base { None } else { batch(&neutral_ex, Adapters::AsGated)? };
    let base = batch(&neutral_ex, Adapters::Base)?;
    let persona = match &persona_ex {
        Some(exs) => batch(exs, Adapters::Base)?,
        None => None,
    };
    // Example `k`'s `[C_k, vocab]` rows of a batch.
    let rows = |b: &BatchLogProbs, k: usize| -> Result<Tensor> {
        let (start, len) = b.spans[k];
        Ok(b.lp.narrow(0, start, len)?)
    };
    let mut out = Vec::with_capacity(work.len());
    let mut k = 0;
    for (prompt, _, gen) in work {
        let text = lm.tokenizer.decode(gen, false)?;
        if gen.is_empty() {
            let sample = Sample {
                prompt: prompt.to_string(),
                text,
                nll_base: f64::NAN,
                token_ids: Vec::new(),
                heat: None,
            };
            out.push((sample, 0.0, None));
            continue;
        }
        let base = base.as_ref().ok_or_else(|| Error::invalid("no base scores for a generation"))?;
        let base_rows = rows(base, k)?;
        let lp = gathered(&base_rows, gen)?;
        let s: f64 = lp.iter().map(|x| *x as f64).sum();
        let kl = match &student {
            Some(st) => super::loss::per_position_kl(
                &rows(st, k)?,
                &base_rows,
                super::config::Reg::KlRev,
                FwdPath::Inference,
            )?
            .to_vec1()?,
            None => vec![0.0; gen.len()],
        };
        let gain = match &persona {
            Some(pb) => Some(gathered(&rows(pb, k)?, gen)?.iter().map(|x| *x as f64).sum::<f64>() - s),
            None => None,
        };
        let n = gen.len() as f64;
        let sample = Sample {
            prompt: prompt.to_string(),
            text,
            nll_base: -s / n,
            token_ids: gen.to_vec(),
            heat: Some(TokenHeat {
                tokens: gen.iter().map(|t| lm.tokenizer.token_str(*t)).collect(),
                kl_mean: mean_f32(&kl),
                kl,
                coherence: finite(s / n),
                persona_gain: gain.and_then(|g| finite(g / n)),
            }),
        };
        out.push((sample, s, gain));
        k += 1;
    }
    Ok(out)
}

/// Per-token KL(student ‖ base) of a completion after the neutral prompt, nats: the student is the model as it is
/// (adapters at their gates), the base has every gate at 0 (restored afterwards). One value per completion token,
/// for the heal screen's heat map.
pub fn token_kl_to_base(lm: &LoadedModel, system: &str, prompt: &str, tokens: &[u32]) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let ex = completion_example(&lm.tokenizer.encode(&lm.chat.prompt(Some(system), prompt)?)?, tokens);
    let student = completion_log_probs(&lm.model, &ex, FwdPath::Inference, Adapters::AsGated)?;
    let base = completion_log_probs(&lm.model, &ex, FwdPath::Inference, Adapters::Base)?;
    let kl = super::loss::per_position_kl(&student, &base, super::config::Reg::KlRev, FwdPath::Inference)?;
    Ok(kl.to_vec1()?)
}

/// Coherence and trait of one model state, in whatever units the report's labels name.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Coherence (higher is better).
    pub coherence: f64,
    /// Trait value, if measured.
    pub trait_value: Option<f64>,
}

impl From<&Measurement> for Metrics {
    fn from(m: &Measurement) -> Self {
        Metrics { coherence: m.coherence, trait_value: m.persona_strength }
    }
}

/// One row of the `heal --sweep` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// Arm label, e.g. `kl_rev λ=0.3`.
    pub label: String,
    /// Regulariser name.
    pub reg: String,
    /// Its strength (λ, spectral weight or weight decay).
    pub strength: f64,
    /// Metrics after healing with this arm.
    pub after: Metrics,
    /// Mean aggregated KL to the reference at the end of training.
    pub d_final: Option<f64>,
    /// How the arm's run ended.
    pub status: String,
    /// First sample generation after healing.
    pub sample: String,
    /// The slope's 95 % bootstrap interval over the measured prompts (None: not computed, or older reports).
    #[serde(default)]
    pub slope_ci: Option<Interval>,
}

/// The heal screen's columns for each measured prompt: the teacher (a training completion for that prompt, with its
/// KL heat), the student before, and the healed student (`after`, when measured). The one pairing the `heal`
/// command and the rounds loop both report.
pub fn sample_pairs(
    lm: &LoadedModel,
    spec: &MeasureSpec,
    training: &[Completion],
    before: &Measurement,
    after: Option<&Measurement>,
) -> Result<Vec<SamplePair>> {
    let mut samples = Vec::new();
    for (i, b) in before.samples.iter().enumerate() {
        let teacher = training.iter().find(|c| c.prompt == b.prompt);
        let a = after.and_then(|m| m.samples.get(i));
        let teacher_heat = match teacher {
            Some(c) => teacher_heat(lm, spec, c)?,
            None => None,
        };
        samples.push(SamplePair {
            prompt: b.prompt.clone(),
            teacher: teacher.map(|c| c.text.clone()),
            before: b.text.clone(),
            after: a.map(|s| s.text.clone()).unwrap_or_default(),
            teacher_heat,
            before_heat: b.heat.clone(),
            after_heat: a.and_then(|s| s.heat.clone()),
        });
    }
    Ok(samples)
}

/// A before/after sample for one prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplePair {
    /// User prompt.
    pub prompt: String,
    /// A steered teacher completion for it, if the training set has one.
    pub teacher: Option<String>,
    /// Student before healing.
    pub before: String,
    /// Student after healing.
    pub after: String,
    /// The teacher's scores and per-token KL (steered vs unsteered); `None` in older reports.
    #[serde(default)]
    pub teacher_heat: Option<TokenHeat>,
    /// The student-before's scores and per-token KL to the base; `None` in older reports.
    #[serde(default)]
    pub before_heat: Option<TokenHeat>,
    /// The healed student's scores and per-token KL to the base; `None` in older reports.
    #[serde(default)]
    pub after_heat: Option<TokenHeat>,
}

/// Everything `gate-q1.md` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateQ1 {
    /// Round index.
    pub round: usize,
    /// Model id.
    pub model: String,
    /// Where the numbers come from (eval metrics or the fallback), in words.
    pub source: String,
    /// Name and unit of the coherence metric.
    pub coherence_label: String,
    /// Name and unit of the trait metric.
    pub trait_label: String,
    /// +1 when healing is meant to raise the trait (persona strength), −1 when it is meant to lower it (e.g.
    /// tinymfv authority for a care-over-authority persona).
    pub trait_sign: f64,
    /// Before healing.
    pub before: Metrics,
    /// After healing (the run that produced the adapter).
    pub after: Option<Metrics>,
    /// Lines about the heal run (config, steps, final loss), free-form.
    pub heal_summary: Vec<String>,
    /// Sweep rows, if a sweep ran.
    pub sweep: Vec<SweepRow>,
    /// Sample generations.
    pub samples: Vec<SamplePair>,
    /// Notes (e.g. that the prompts were not held out).
    pub notes: Vec<String>,
    /// 95 % intervals over the measured prompts of before, after and their paired difference (None in older
    /// reports, or when eval metrics replaced the measurement).
    #[serde(default)]
    pub intervals: Option<Box<Q1Intervals>>,
}

/// Gate Q1's numbers with 95 % bootstrap intervals over the measured prompts (paired: before and after are
/// generated from the same prompts, and each resample draws the same prompts for both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Q1Intervals {
    /// Prompts the intervals rest on.
    pub prompts: usize,
    /// Coherence before healing.
    pub coherence_before: Interval,
    /// Coherence after.
    pub coherence_after: Interval,
    /// after − before.
    pub coherence_delta: Interval,
    /// Persona strength before (None: unmeasured).
    pub trait_before: Option<Interval>,
    /// Persona strength after.
    pub trait_after: Option<Interval>,
    /// after − before.
    pub trait_delta: Option<Interval>,
}

/// One prompt's summed base log-likelihood, summed persona gain (None: unmeasured) and token count, from its
/// scores; ratios of their sums over prompts are a measurement's coherence and persona strength.
fn prompt_sums(h: Option<&TokenHeat>) -> (f64, Option<f64>, f64) {
    let Some(h) = h else { return (0.0, None, 0.0) };
    let n = h.tokens.len() as f64;
    (h.coherence.map(|c| c * n).unwrap_or(0.0), h.persona_gain.map(|g| g * n), n)
}

/// `prompt_sums` of each measured prompt.
fn per_prompt(m: &Measurement) -> Vec<(f64, Option<f64>, f64)> {
    m.samples.iter().map(|s| prompt_sums(s.heat.as_ref())).collect()
}

/// Σ of one column over the resampled prompts divided by their tokens (NaN without tokens).
fn ratio(
    rows: &[(f64, Option<f64>, f64)],
    idx: &[usize],
    col: impl Fn(&(f64, Option<f64>, f64)) -> f64,
) -> f64 {
    crate::stats::ratio_at(idx, |i| col(&rows[i]), |i| rows[i].2)
}

/// Paired intervals of a before and an after measurement on the same prompts (None when the prompts differ).
pub fn q1_intervals(before: &Measurement, after: &Measurement) -> Option<Box<Q1Intervals>> {
    let same = before.samples.len() == after.samples.len()
        && before.samples.iter().zip(&after.samples).all(|(a, b)| a.prompt == b.prompt);
    if !same || before.samples.is_empty() {
        return None;
    }
    let has_trait = before.persona_strength.is_some() && after.persona_strength.is_some();
    paired_prompt_intervals(&per_prompt(before), &per_prompt(after), has_trait)
}

/// Gate Q1's intervals from its saved sample pairs (each pair's before and after scores), for a report written
/// without them; None when a pair lacks its scores.
pub fn q1_intervals_from_samples(g: &GateQ1) -> Option<Box<Q1Intervals>> {
    if g.samples.is_empty() || g.samples.iter().any(|p| p.before_heat.is_none() || p.after_heat.is_none()) {
        return None;
    }
    let b: Vec<_> = g.samples.iter().map(|p| prompt_sums(p.before_heat.as_ref())).collect();
    let a: Vec<_> = g.samples.iter().map(|p| prompt_sums(p.after_heat.as_ref())).collect();
    let has_trait = b.iter().chain(&a).any(|r| r.1.is_some());
    paired_prompt_intervals(&b, &a, has_trait)
}

fn paired_prompt_intervals(
    b: &[(f64, Option<f64>, f64)],
    a: &[(f64, Option<f64>, f64)],
    has_trait: bool,
) -> Option<Box<Q1Intervals>> {
    let n = b.len();
    let coh = |r: &(f64, Option<f64>, f64)| r.0;
    let gain = |r: &(f64, Option<f64>, f64)| r.1.unwrap_or(0.0);
    let trait_iv = |f: &dyn Fn(&[usize]) -> f64| has_trait.then(|| bootstrap(n, f));
    Some(Box::new(Q1Intervals {
        prompts: n,
        coherence_before: bootstrap(n, |i| ratio(b, i, coh)),
        coherence_after: bootstrap(n, |i| ratio(a, i, coh)),
        coherence_delta: bootstrap(n, |i| ratio(a, i, coh) - ratio(b, i, coh)),
        trait_before: trait_iv(&|i| ratio(b, i, gain)),
        trait_after: trait_iv(&|i| ratio(a, i, gain)),
        trait_delta: trait_iv(&|i| ratio(a, i, gain) - ratio(b, i, gain)),
    }))
}

/// The slope (`slope`) of an arm with its 95 % bootstrap interval over the prompts, paired before/after;
/// resamples whose trait moved less than `MIN_TRAIT_MOVE` have no slope and are left out. None when the slope
/// itself is blank or the prompts differ.
pub fn slope_interval(before: &Measurement, after: &Measurement, trait_sign: f64) -> Option<Interval> {
    slope(&Metrics::from(before), &Metrics::from(after), trait_sign)?;
    q1_intervals(before, after)?;
    let (b, a) = (per_prompt(before), per_prompt(after));
    let coh = |r: &(f64, Option<f64>, f64)| r.0;
    let gain = |r: &(f64, Option<f64>, f64)| r.1.unwrap_or(0.0);
    let at = |i: &[usize]| {
        let m = |rows: &[(f64, Option<f64>, f64)]| Metrics {
            coherence: ratio(rows, i, coh),
            trait_value: Some(ratio(rows, i, gain)),
        };
        slope(&m(&b), &m(&a), trait_sign).unwrap_or(f64::NAN)
    };
    Some(bootstrap(b.len(), at))
}

/// |trait moved| below this leaves the slope blank (a ratio over a non-move is noise).
pub const MIN_TRAIT_MOVE: f64 = 0.05;

/// Coherence cost per nat of trait moved, in centinats: `−100 · Δcoh / (sign · Δtrait)`. Negative means coherence
/// rose while the trait moved the intended way (a "free lunch"); for a trait meant to go down this equals the
/// reference's `100 · Δcoh / Δtrait`. `None` when the trait is unmeasured or moved less than `MIN_TRAIT_MOVE`.
pub fn slope(before: &Metrics, after: &Metrics, trait_sign: f64) -> Option<f64> {
    let moved = trait_sign * (after.trait_value? - before.trait_value?);
    if moved.abs() < MIN_TRAIT_MOVE || !moved.is_finite() {
        return None;
    }
    Some(-100.0 * (after.coherence - before.coherence) / moved)
}

/// Sweep rows ranked: rows whose trait moved the intended way first, by slope (most negative first); then rows
/// whose trait moved the wrong way (their slope's sign no longer means a free lunch), by slope; then rows with a
/// blank slope, in input order.
pub fn rank_sweep<'a>(
    rows: &'a [SweepRow],
    before: &Metrics,
    trait_sign: f64,
) -> Vec<(&'a SweepRow, Option<f64>)> {
    let tier = |r: &SweepRow, sl: Option<f64>| -> u8 {
        match (sl, r.after.trait_value.zip(before.trait_value)) {
            (Some(_), Some((a, b))) if trait_sign * (a - b) > 0.0 => 0,
            (Some(_), _) => 1,
            (None, _) => 2,
        }
    };
    let mut v: Vec<(&SweepRow, Option<f64>)> =
        rows.iter().map(|r| (r, slope(before, &r.after, trait_sign))).collect();
    v.sort_by(|a, b| {
        tier(a.0, a.1).cmp(&tier(b.0, b.1)).then_with(|| match (a.1, b.1) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => std::cmp::Ordering::Equal,
        })
    });
    v
}

/// True when the row's trait moved against the intended direction by at least `MIN_TRAIT_MOVE`.
fn wrong_way(r: &SweepRow, before: &Metrics, trait_sign: f64) -> bool {
    match r.after.trait_value.zip(before.trait_value) {
        Some((a, b)) => trait_sign * (a - b) <= -MIN_TRAIT_MOVE,
        None => false,
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        Some(v) => format!("{v}"),
        None => String::new(),
    }
}

/// Make text safe inside a Markdown table cell.
fn cell(s: &str, max_chars: usize) -> String {
    let one: String = s.replace('|', "\\|").replace(['\n', '\r'], " ⏎ ");
    if one.chars().count() > max_chars {
        format!("{}…", one.chars().take(max_chars).collect::<String>())
    } else {
        one
    }
}

/// A sample's scores after its heading, e.g. ` (coherence -1.2345 · persona gain 0.1200 · mean KL to base 0.0310
/// nats/token)`; empty when the report predates per-sample scores.
fn column_note(h: Option<&TokenHeat>, kl_name: &str) -> String {
    let Some(h) = h else { return String::new() };
    let mut parts = Vec::new();
    if let Some(c) = h.coherence {
        parts.push(format!("coherence {c:.4}"));
    }
    if let Some(g) = h.persona_gain {
        parts.push(format!("persona gain {g:.4}"));
    }
    if let Some(k) = h.kl_mean {
        parts.push(format!("mean {kl_name} {k:.4}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({} nats/token)", parts.join(" · "))
    }
}

/// Render `gate-q1.md`.
pub fn render(g: &GateQ1) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Gate Q1 — round {}: heal\n", g.round);
    let _ = writeln!(s, "Model: `{}`  ", g.model);
    let _ = writeln!(s, "Metrics: {}  ", g.source);
    let _ = writeln!(
        s,
        "Coherence = {}; trait = {} (healing is meant to move it {}).\n",
        g.coherence_label,
        g.trait_label,
        if g.trait_sign >= 0.0 { "up" } else { "down" }
    );
    let _ = writeln!(s, "## Before vs after\n");
    let _ = writeln!(s, "| | coherence | trait | coherence, 95 % | trait, 95 % |");
    let _ = writeln!(s, "|---|---:|---:|---|---|");
    let show = |x: Option<&Interval>| x.map(Interval::show).unwrap_or_default();
    let iv = g.intervals.as_deref();
    let _ = writeln!(
        s,
        "| before | {} | {} | {} | {} |",
        num(Some(g.before.coherence), 4),
        num(g.before.trait_value, 4),
        show(iv.map(|i| &i.coherence_before)),
        show(iv.and_then(|i| i.trait_before.as_ref()))
    );
    if let Some(a) = &g.after {
        let _ = writeln!(
            s,
            "| after | {} | {} | {} | {} |",
            num(Some(a.coherence), 4),
            num(a.trait_value, 4),
            show(iv.map(|i| &i.coherence_after)),
            show(iv.and_then(|i| i.trait_after.as_ref()))
        );
        let dt = match (a.trait_value, g.before.trait_value) {
            (Some(x), Some(y)) => Some(x - y),
            _ => None,
        };
        let _ = writeln!(
            s,
            "| Δ | {} | {} | {} | {} |",
            num(Some(a.coherence - g.before.coherence), 4),
            num(dt, 4),
            show(iv.map(|i| &i.coherence_delta)),
            show(iv.and_then(|i| i.trait_delta.as_ref()))
        );
        let _ = writeln!(
            s,
            "\nCoherence cost per nat of trait moved: {} cnat/nat (negative = coherence rose while the trait moved; \
             blank when |Δtrait| < {MIN_TRAIT_MOVE}).",
            num(slope(&g.before, a, g.trait_sign), 1)
        );
    }
    if let Some(iv) = &g.intervals {
        let _ = writeln!(
            s,
            "\nIntervals: 95 % bootstrap over the {} measured prompts ({} resamples, paired before/after, \
             token-weighted as the values are). Coherence: {}. Trait: {}.",
            iv.prompts,
            crate::stats::RESAMPLES,
            crate::eval::gate_q2::moved_words(&iv.coherence_delta),
            iv.trait_delta.as_ref().map(crate::eval::gate_q2::moved_words).unwrap_or("unmeasured")
        );
    }
    if !g.heal_summary.is_empty() {
        let _ = writeln!(s, "\n## Heal run\n");
        for l in &g.heal_summary {
            let _ = writeln!(s, "- {l}");
        }
    }
    if !g.sweep.is_empty() {
        let _ = writeln!(s, "\n## Sweep: regularisers × strengths\n");
        let _ = writeln!(
            s,
            "Ranked by coherence cost per nat of trait moved (`−100·Δcoh / Δtrait` toward the intended direction, \
             cnat/nat), most negative first; blank when |Δtrait| < {MIN_TRAIT_MOVE}. Arms whose trait moved the \
             wrong way come after the others and are marked ↩. `slope 95 %` is the bootstrap interval over the \
             measured prompts; ⚠ marks an arm whose interval spans 0 (its ranking is not resolved).\n"
        );
        let _ =
            writeln!(s, "| rank | arm | Δcoh | Δtrait | slope | slope 95 % | D final | status | sample |");
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---|---:|---|---|");
        for (i, (r, sl)) in rank_sweep(&g.sweep, &g.before, g.trait_sign).into_iter().enumerate() {
            let dt = match (r.after.trait_value, g.before.trait_value) {
                (Some(x), Some(y)) => Some(x - y),
                _ => None,
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                cell(&r.label, 40),
                num(Some(r.after.coherence - g.before.coherence), 4),
                num(dt, 4),
                if wrong_way(r, &g.before, g.trait_sign) {
                    format!("{} ↩", num(sl, 1))
                } else {
                    num(sl, 1)
                },
                match &r.slope_ci {
                    Some(iv) if iv.lo.is_finite() && iv.hi.is_finite() =>
                        format!("[{:.1}, {:.1}]{}", iv.lo, iv.hi, if iv.excludes_zero() { "" } else { " ⚠" }),
                    _ => String::new(),
                },
                num(r.d_final, 3),
                r.status,
                cell(&r.sample, 120)
            );
        }
    }
    if !g.samples.is_empty() {
        let _ = writeln!(s, "\n## Samples (same neutral prompts)\n");
        for (i, p) in g.samples.iter().enumerate() {
            let _ = writeln!(s, "### {}. {}\n", i + 1, p.prompt.trim());
            if let Some(t) = &p.teacher {
                let note = column_note(p.teacher_heat.as_ref(), "KL steered vs unsteered");
                let _ = writeln!(s, "**Steered teacher**{note}:\n\n```text\n{}\n```\n", t.trim_end());
            }
            let note = column_note(p.before_heat.as_ref(), "KL to base");
            let _ = writeln!(s, "**Student before**{note}:\n\n```text\n{}\n```\n", p.before.trim_end());
            let note = column_note(p.after_heat.as_ref(), "KL to base");
            let _ = writeln!(s, "**Student after**{note}:\n\n```text\n{}\n```\n", p.after.trim_end());
        }
    }
    if !g.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &g.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// Write `gate-q1.md` atomically.
pub fn write(path: &Path, g: &GateQ1) -> Result<()> {
    atomic_write(path, render(g).as_bytes())
}

/// The fallback metrics' description and labels.
pub fn fallback_labels(persona: bool) -> (String, String, String) {
    (
        "fallback (no eval metrics): fresh neutral-prompt generations scored by the base model".into(),
        "mean base-model log-likelihood per generated token (nats; −ln perplexity)".into(),
        if persona {
            "persona strength: mean log-prob gain per token under the persona prompt vs the neutral one (nats)".into()
        } else {
            "unmeasured (no persona prompt given)".into()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, coh: f64, tr: f64) -> SweepRow {
        SweepRow {
            slope_ci: None,
            label: label.into(),
            reg: "kl_rev".into(),
            strength: 0.3,
            after: Metrics { coherence: coh, trait_value: Some(tr) },
            d_final: Some(0.4),
            status: "completed".into(),
            sample: "a | b\nc".into(),
        }
    }

    #[test]
    fn slope_matches_the_reference_for_a_trait_pushed_down() {
        let before = Metrics { coherence: 0.9, trait_value: Some(-1.3) };
        let after = Metrics { coherence: 0.95, trait_value: Some(-1.8) };
        // Reference: cohΔ / authΔ × 100 = 0.05 / −0.5 × 100 = −10.
        assert!((slope(&before, &after, -1.0).unwrap_or(0.0) + 10.0).abs() < 1e-9);
        // Same numbers for a trait meant to go up: it moved the wrong way, so the sign flips.
        assert!((slope(&before, &after, 1.0).unwrap_or(0.0) - 10.0).abs() < 1e-9);
        let tiny = Metrics { coherence: 0.5, trait_value: Some(-1.32) };
        assert_eq!(slope(&before, &tiny, -1.0), None);
    }

    #[test]
    fn sweep_ranks_most_negative_first_and_blanks_last() {
        let before = Metrics { coherence: -2.0, trait_value: Some(0.0) };
        let rows = vec![
            row("costly", -2.5, 1.0),     // coherence fell 0.5 per nat: +50
            row("still", -1.0, 0.01),     // trait did not move: blank
            row("free", -1.9, 0.5),       // coherence rose: −20
            row("cheap", -2.05, 1.0),     // +5
            row("backwards", -2.5, -0.5), // trait moved the wrong way: −100, but ranked after the right-way rows
        ];
        let ranked: Vec<&str> =
            rank_sweep(&rows, &before, 1.0).iter().map(|(r, _)| r.label.as_str()).collect();
        assert_eq!(ranked, vec!["free", "cheap", "costly", "backwards", "still"]);
        let g = GateQ1 {
            round: 1,
            model: "tiny".into(),
            source: "test".into(),
            coherence_label: "c".into(),
            trait_label: "t".into(),
            trait_sign: 1.0,
            before,
            after: Some(rows[2].after),
            heal_summary: vec!["kl_rev".into()],
            sweep: rows,
            samples: vec![],
            intervals: None,
            notes: vec![],
        };
        let md = render(&g);
        let free_line = md.lines().find(|l| l.contains("| free |")).unwrap_or_default();
        assert!(free_line.starts_with("| 1 | free | 0.1000 | 0.5000 | -20.0 |"), "{free_line}");
        let still = md.lines().find(|l| l.contains("| still |")).unwrap_or_default();
        assert!(still.starts_with("| 5 | still | 1.0000 | 0.0100 |  |"), "{still}");
        let back = md.lines().find(|l| l.contains("| backwards |")).unwrap_or_default();
        assert!(back.contains("| -100.0 ↩ |"), "{back}");
        assert!(md.contains("a \\| b ⏎ c"), "cells are escaped");
    }

    #[test]
    fn reports_written_before_per_token_heat_still_load() {
        // A gate-q1.json sample pair and a measured sample as written before the heat fields existed.
        let pair: SamplePair =
            serde_json::from_str(r#"{"prompt":"p","teacher":"t","before":"b","after":"a"}"#)
                .expect("old pair");
        assert!(pair.teacher_heat.is_none() && pair.before_heat.is_none() && pair.after_heat.is_none());
        let sample: Sample =
            serde_json::from_str(r#"{"prompt":"p","text":"x","nll_base":2.5}"#).expect("old sample");
        assert!(sample.token_ids.is_empty() && sample.heat.is_none());
        // And the new fields round-trip.
        let heat = TokenHeat {
            tokens: vec!["a".into(), " b".into()],
            kl: vec![0.0, 1.5],
            coherence: Some(-2.0),
            persona_gain: None,
            kl_mean: Some(0.75),
        };
        let full = SamplePair { after_heat: Some(heat.clone()), ..pair };
        let back: SamplePair = serde_json::from_str(&serde_json::to_string(&full).expect("ser")).expect("de");
        assert_eq!(back.after_heat, Some(heat));
    }

    #[test]
    fn teacher_column_comes_from_the_completion_traces() {
        let c = Completion {
            id: "c".into(),
            system: "s".into(),
            prompt: "p".into(),
            text: "Hi there".into(),
            tokens: vec![1, 2],
            token_text: vec!["Hi".into(), " there".into()],
            alpha: 1.0,
            dose: 2.0,
            seed: 0,
            trace: crate::steer::TokenTrace {
                kl: vec![0.5, 1.5],
                nll_base: vec![1.0, 3.0],
                kl_window_rmse: vec![],
                dose: vec![],
            },
            rewinds: vec![],
        };
        let h = TokenHeat::from_completion(&c).expect("heat");
        assert_eq!(h.tokens, c.token_text);
        assert_eq!(h.kl, vec![0.5, 1.5]);
        assert_eq!((h.coherence, h.kl_mean, h.persona_gain), (Some(-2.0), Some(1.0), None));
        // Without per-token texts (e.g. an edited completion) there is no heat column.
        let bare = Completion { token_text: vec![String::new(); 2], ..c.clone() };
        assert_eq!(TokenHeat::from_completion(&bare), None);
        // Without a KL trace the tokens still show, unscored.
        let no_kl = Completion { trace: Default::default(), ..c };
        let h = TokenHeat::from_completion(&no_kl).expect("heat");
        assert!(h.kl.is_empty() && h.kl_mean.is_none() && h.coherence.is_none());
    }

    #[test]
    fn gate_md_shows_each_columns_scores() {
        let heat = |kl: f64| TokenHeat {
            tokens: vec!["x".into()],
            kl: vec![kl as f32],
            coherence: Some(-1.5),
            persona_gain: Some(0.25),
            kl_mean: Some(kl),
        };
        let g = GateQ1 {
            round: 0,
            model: "tiny".into(),
            source: "test".into(),
            coherence_label: "c".into(),
            trait_label: "t".into(),
            trait_sign: 1.0,
            before: Metrics { coherence: -1.0, trait_value: None },
            after: None,
            heal_summary: vec![],
            sweep: vec![],
            samples: vec![SamplePair {
                prompt: "p".into(),
                teacher: Some("t".into()),
                before: "b".into(),
                after: "a".into(),
                teacher_heat: Some(TokenHeat { persona_gain: None, ..heat(0.9) }),
                before_heat: Some(heat(0.0)),
                after_heat: Some(heat(0.125)),
            }],
            intervals: None,
            notes: vec![],
        };
        let md = render(&g);
        assert!(
            md.contains(
                "**Steered teacher** (coherence -1.5000 · mean KL steered vs unsteered 0.9000 nats/token):"
            ),
            "{md}"
        );
        assert!(
            md.contains("**Student before** (coherence -1.5000 · persona gain 0.2500 · mean KL to base 0.0000 nats/token):"),
            "{md}"
        );
        assert!(md.contains("mean KL to base 0.1250 nats/token"), "{md}");
        // An old report renders as before.
        let old = GateQ1 {
            samples: vec![SamplePair {
                teacher_heat: None,
                before_heat: None,
                after_heat: None,
                ..g.samples[0].clone()
            }],
            ..g
        };
        assert!(render(&old).contains("**Student before**:\n"), "{}", render(&old));
    }

    fn measured(rows: &[(&str, f64, f64, usize)]) -> Measurement {
        let samples: Vec<Sample> = rows
            .iter()
            .map(|(prompt, coh, gain, n)| Sample {
                prompt: prompt.to_string(),
                text: String::new(),
                nll_base: -coh,
                token_ids: vec![1; *n],
                heat: Some(TokenHeat {
                    tokens: vec![String::new(); *n],
                    kl: vec![],
                    coherence: Some(*coh),
                    persona_gain: Some(*gain),
                    kl_mean: None,
                }),
            })
            .collect();
        let tokens: usize = rows.iter().map(|r| r.3).sum();
        let lp: f64 = rows.iter().map(|r| r.1 * r.3 as f64).sum();
        let g: f64 = rows.iter().map(|r| r.2 * r.3 as f64).sum();
        Measurement {
            coherence: lp / tokens as f64,
            ppl: (-lp / tokens as f64).exp(),
            persona_strength: Some(g / tokens as f64),
            tokens,
            samples,
        }
    }

    fn report_for_render() -> GateQ1 {
        GateQ1 {
            round: 1,
            model: "tiny".into(),
            source: "test".into(),
            coherence_label: "c".into(),
            trait_label: "t".into(),
            trait_sign: 1.0,
            before: Metrics { coherence: -2.0, trait_value: Some(0.2) },
            after: Some(Metrics { coherence: -1.5, trait_value: Some(0.5) }),
            heal_summary: vec![],
            sweep: vec![],
            samples: vec![],
            notes: vec![],
            intervals: None,
        }
    }

    #[test]
    fn q1_intervals_are_paired_and_token_weighted() {
        // Every prompt gains exactly 0.5 nats/token of coherence: the paired Δ is 0.5 with a zero-width
        // interval, while before and after alone vary with the prompts drawn.
        let before = measured(&[("a", -1.0, 0.1, 10), ("b", -3.0, 0.3, 30), ("c", -2.0, 0.2, 20)]);
        let after = measured(&[("a", -0.5, 0.3, 10), ("b", -2.5, 0.9, 30), ("c", -1.5, 0.2, 20)]);
        let iv = q1_intervals(&before, &after).expect("same prompts");
        assert_eq!(iv.prompts, 3);
        assert!((iv.coherence_before.value - before.coherence).abs() < 1e-12, "token-weighted as the value");
        assert!((iv.coherence_delta.value - 0.5).abs() < 1e-12);
        assert!(iv.coherence_delta.width() < 1e-12 && iv.coherence_delta.excludes_zero(), "{iv:?}");
        assert!(iv.coherence_before.width() > 0.5, "{iv:?}");
        let dt = iv.trait_delta.expect("measured");
        assert!(
            (dt.value - (after.persona_strength.unwrap_or(0.0) - before.persona_strength.unwrap_or(0.0)))
                .abs()
                < 1e-12
        );
        // Different prompts cannot be paired.
        let other = measured(&[("x", -1.0, 0.1, 10), ("b", -3.0, 0.3, 30), ("c", -2.0, 0.2, 20)]);
        assert!(q1_intervals(&before, &other).is_none());
        // The slope's interval: coherence rose while the trait rose, so every defined resample is negative.
        let sl = slope_interval(&before, &after, 1.0).expect("trait moved");
        assert!(sl.hi < 0.0 && sl.excludes_zero(), "{sl:?}");
        let g = GateQ1 { intervals: Some(iv), ..report_for_render() };
        let md = render(&g);
        assert!(md.contains("| Δ | 0.5000 | 0.3000 | 0.500 [0.500, 0.500] |"), "{md}");
        assert!(md.contains("over the 3 measured prompts") && md.contains("Coherence: moved up"), "{md}");
        // The same intervals from the report's saved sample pairs (what `report` recomputes for old files).
        let pairs: Vec<SamplePair> = before
            .samples
            .iter()
            .zip(&after.samples)
            .map(|(b, a)| SamplePair {
                prompt: b.prompt.clone(),
                before_heat: b.heat.clone(),
                after_heat: a.heat.clone(),
                ..SamplePair::default()
            })
            .collect();
        let from_pairs = q1_intervals_from_samples(&GateQ1 { samples: pairs, ..report_for_render() });
        assert_eq!(from_pairs, g.intervals);
    }
}
