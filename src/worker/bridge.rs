//! The two calls the worker makes into steered generation: `generate_completions` (one prompt, every alpha)
//! and `replay_completion` (rewind to token t, resample at a new dose). Each is one small function so the
//! steer module's versions can replace the interim `rollout` behind them without touching the worker.

use super::rollout::{rollout, window_rmse, DoseSchedule};
use crate::error::{Error, Result};
use crate::model::generate::Sampling;
use crate::model::LoadedModel;
use crate::score::perplexity::prompt_ids;
use crate::steer::{Completion, Rewind, TokenTrace};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Generate completions for one prompt at every alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Round the completions belong to.
    pub round: u32,
    /// Index of the prompt (ids and seeds derive from it).
    pub prompt_index: usize,
    /// Neutral system prompt.
    pub system: String,
    /// User prompt.
    pub prompt: String,
    /// Multiples of the base dose.
    pub alphas: Vec<f64>,
    /// Base dose `c*`.
    pub base_dose: f64,
    /// Completions per alpha.
    pub samples_per_alpha: usize,
    /// Sampling (its seed is the session's base seed).
    pub sampling: Sampling,
    /// Window of the KL rmse trace.
    pub kl_window: usize,
}

/// Rewind a completion to token `at` and resample the rest at `dose`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// Round of the completion.
    pub round: u32,
    /// The completion as it stands.
    pub completion: Completion,
    /// First token to resample.
    pub at: usize,
    /// Dose for the resampled tokens.
    pub dose: f64,
    /// Sampling (`max_new_tokens` bounds the whole completion).
    pub sampling: Sampling,
    /// Window of the KL rmse trace.
    pub kl_window: usize,
}

/// Turns streamed token ids into text pieces whose concatenation is the decoded text.
#[derive(Debug, Default)]
pub struct PieceDecoder {
    tokens: Vec<u32>,
    prev: String,
}

impl PieceDecoder {
    /// Add a token; returns the text it completes (empty while a character is split across tokens).
    pub fn push(&mut self, lm: &LoadedModel, id: u32) -> String {
        self.tokens.push(id);
        let Ok(cur) = lm.tokenizer.decode(&self.tokens, false) else { return String::new() };
        if cur.ends_with('\u{FFFD}') {
            return String::new();
        }
        let piece = match cur.strip_prefix(self.prev.as_str()) {
            Some(p) => p.to_string(),
            None => lm.tokenizer.token_str(id),
        };
        self.prev = cur;
        piece
    }
}

/// Completion id: `p003-a075-s42`.
pub fn completion_id(prompt_index: usize, alpha: f64, seed: u64) -> String {
    format!("p{prompt_index:03}-a{:03}-s{seed}", (alpha * 100.0).round() as i64)
}

/// Generate completions for one prompt, one row per (alpha, sample). `on_token(row, piece)` streams text and
/// returns false to cancel.
pub fn generate_completions(
    lm: &LoadedModel,
    vectors: Option<&BTreeMap<usize, Tensor>>,
    req: &GenerateRequest,
    on_token: &mut dyn FnMut(usize, &str) -> bool,
) -> Result<Vec<Completion>> {
    let ids = prompt_ids(lm, &req.system, &req.prompt)?;
    let mut rows: Vec<(f64, u64)> = Vec::new();
    for alpha in &req.alphas {
        for _ in 0..req.samples_per_alpha.max(1) {
            let seed = req.sampling.seed.wrapping_add(req.prompt_index as u64 * 1000 + rows.len() as u64);
            rows.push((*alpha, seed));
        }
    }
    let schedules: Vec<DoseSchedule> =
        rows.iter().map(|(a, _)| vec![(0, (a * req.base_dose) as f32)]).collect();
    let seeds: Vec<u64> = rows.iter().map(|r| r.1).collect();
    let prefixes = vec![ids; rows.len()];
    let mut pieces: Vec<PieceDecoder> = (0..rows.len()).map(|_| PieceDecoder::default()).collect();
    let mut texts: Vec<Vec<String>> = vec![Vec::new(); rows.len()];
    let traces = rollout(lm, vectors, &prefixes, &schedules, &req.sampling, &seeds, &mut |r, id| {
        let p = pieces[r].push(lm, id);
        let go = on_token(r, &p);
        texts[r].push(p);
        go
    })?;
    let mut out = Vec::with_capacity(rows.len());
    for (((alpha, seed), tr), token_text) in rows.iter().zip(traces).zip(texts) {
        let dose = alpha * req.base_dose;
        let n = tr.tokens.len();
        out.push(Completion {
            id: completion_id(req.prompt_index, *alpha, *seed),
            system: req.system.clone(),
            prompt: req.prompt.clone(),
            text: lm.tokenizer.decode(&tr.tokens, false)?,
            token_text,
            alpha: *alpha,
            dose,
            seed: *seed,
            trace: TokenTrace {
                kl_window_rmse: window_rmse(&tr.kl, req.kl_window),
                kl: tr.kl,
                nll_base: tr.nll_base,
                dose: vec![dose as f32; n],
            },
            tokens: tr.tokens,
            rewinds: vec![],
        });
    }
    Ok(out)
}

/// Rewind `req.completion` to token `req.at` and resample the rest at `req.dose`; the prefix keeps its tokens,
/// traces and doses. The replay's sampling seed is derived from the completion's seed and its rewind count.
pub fn replay_completion(
    lm: &LoadedModel,
    vectors: Option<&BTreeMap<usize, Tensor>>,
    req: &ReplayRequest,
    on_token: &mut dyn FnMut(&str) -> bool,
) -> Result<Completion> {
    let c = &req.completion;
    let at = req.at;
    if at > c.tokens.len() {
        return Err(Error::invalid(format!(
            "cannot rewind `{}` to token {at}: it has {}",
            c.id,
            c.tokens.len()
        )));
    }
    let ids = prompt_ids(lm, &c.system, &c.prompt)?;
    let np = ids.len();
    let dose_at = |j: usize| c.trace.dose.get(j).copied().unwrap_or(c.dose as f32);
    // History's schedule up to the rewind, then the new dose from the position that samples token `at`.
    let mut sched: DoseSchedule = vec![(0, c.dose as f32)];
    let set = |pos: usize, d: f32, sched: &mut DoseSchedule| {
        if let Some(last) = sched.last_mut() {
            if last.1 == d {
                return;
            }
            if last.0 == pos {
                last.1 = d;
                return;
            }
        }
        sched.push((pos, d));
    };
    for j in 0..at {
        set(np - 1 + j, dose_at(j), &mut sched);
    }
    set(np - 1 + at, req.dose as f32, &mut sched);
    let mut prefix = ids;
    prefix.extend_from_slice(&c.tokens[..at]);
    let sampling =
        Sampling { max_new_tokens: req.sampling.max_new_tokens.saturating_sub(at).max(1), ..req.sampling };
    let seed = c.seed.wrapping_add(7919 * (c.rewinds.len() as u64 + 1));
    let mut dec = PieceDecoder::default();
    // Seed the piece decoder with the prefix so the first new piece joins the old text correctly.
    for t in &c.tokens[..at] {
        dec.push(lm, *t);
    }
    let mut new_pieces = Vec::new();
    let traces = rollout(lm, vectors, &[prefix], &[sched], &sampling, &[seed], &mut |_, id| {
        let p = dec.push(lm, id);
        let go = on_token(&p);
        new_pieces.push(p);
        go
    })?;
    let tr = traces.into_iter().next().ok_or_else(|| Error::invalid("replay produced no row"))?;
    let mut tokens = c.tokens[..at].to_vec();
    tokens.extend_from_slice(&tr.tokens);
    let keep = |v: &Vec<f32>| v.iter().take(at).copied().collect::<Vec<f32>>();
    let mut kl = keep(&c.trace.kl);
    kl.extend_from_slice(&tr.kl);
    let mut nll = keep(&c.trace.nll_base);
    nll.extend_from_slice(&tr.nll_base);
    let mut dose = (0..at).map(dose_at).collect::<Vec<f32>>();
    dose.extend(std::iter::repeat_n(req.dose as f32, tr.tokens.len()));
    let mut token_text: Vec<String> = c.token_text.iter().take(at).cloned().collect();
    token_text.extend(new_pieces);
    let mut rewinds = c.rewinds.clone();
    rewinds.push(Rewind { at, from_dose: dose_at(at) as f64, to_dose: req.dose, cause: "manual".into() });
    Ok(Completion {
        id: c.id.clone(),
        system: c.system.clone(),
        prompt: c.prompt.clone(),
        text: lm.tokenizer.decode(&tokens, false)?,
        tokens,
        token_text,
        alpha: c.alpha,
        dose: c.dose,
        seed: c.seed,
        trace: TokenTrace { kl_window_rmse: window_rmse(&kl, req.kl_window), kl, nll_base: nll, dose },
        rewinds,
    })
}
