//! The two calls the worker makes into steered generation for the round being curated: `generate_completions`
//! (a custom prompt, every alpha) and `replay_completion` (rewind to token t, resample at a new dose), both the
//! steer module's traced generation and replay, with the round's vector and its calibrated c*, behind the
//! worker's streaming and cancel interface. Ids and seeds come from the steer module's one scheme.

use crate::error::{Error, Result};
use crate::model::generate::Sampling;
use crate::model::LoadedModel;
use crate::progress::Progress;
use crate::steer::{self, Completion, GenConfig, Request, SteerVector, Steering};
use serde::{Deserialize, Serialize};

/// Generate completions for one prompt at every alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Round the completions belong to.
    pub round: u32,
    /// Index of the prompt in the round (custom prompts count on from the session's prompts; ids derive from
    /// it).
    pub prompt_index: usize,
    /// Which custom prompt of the round this is (0, 1, …; seeds derive from it).
    pub custom_index: usize,
    /// Neutral system prompt.
    pub system: String,
    /// User prompt.
    pub prompt: String,
    /// Multiples of the round's c* (each completion's dose is alpha × c*).
    pub alphas: Vec<f64>,
    /// Completions per alpha.
    pub samples_per_alpha: usize,
    /// Sampling (its seed is the session's base seed; the round and custom index pick the completions' seeds).
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
    /// Dose for the resampled tokens (absolute: alpha × c*).
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

/// Adapts the worker's cancel check to the steer module's `Progress` (which must be `Send`).
struct CancelCheck<'a> {
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Progress for CancelCheck<'_> {
    fn step(&mut self, _done: u64, _total: u64, _msg: &str) {}
    fn is_cancelled(&self) -> bool {
        (self.cancelled)()
    }
}

fn gen_config(sampling: &Sampling, kl_window: usize) -> GenConfig {
    GenConfig { sampling: *sampling, window: kl_window.max(1), ..GenConfig::new(sampling.max_new_tokens) }
}

/// Generate completions for one prompt, one row per (alpha, sample), with the steer module's traced generation
/// at the vector's calibrated c*. Each row's text pieces are then streamed to `on_token(row, piece)`;
/// `cancelled` is polled between decode steps.
pub fn generate_completions(
    lm: &LoadedModel,
    vector: &SteerVector,
    req: &GenerateRequest,
    cancelled: &(dyn Fn() -> bool + Sync),
    on_token: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let mut requests: Vec<Request> = Vec::new();
    for alpha in &req.alphas {
        for _ in 0..req.samples_per_alpha.max(1) {
            let seed = steer::custom_prompt_seed(req.sampling.seed, req.round, req.custom_index)
                .wrapping_add(requests.len() as u64);
            requests.push(Request {
                prompt_index: req.prompt_index,
                prompt: req.prompt.clone(),
                alpha: *alpha,
                seed,
            });
        }
    }
    let cfg = gen_config(&req.sampling, req.kl_window);
    let mut progress = CancelCheck { cancelled };
    let out = steer::generate_completions(
        lm,
        &Steering::new(vector, &lm.model)?,
        &req.system,
        vector.calibrated()?,
        &requests,
        &cfg,
        &mut progress,
    )?;
    for (row, c) in out.iter().enumerate() {
        for piece in &c.token_text {
            on_token(row, piece);
        }
    }
    Ok(out)
}

/// Rewind `req.completion` to token `req.at` and resample the rest at `req.dose` with the steer module's replay;
/// the prefix keeps its tokens, traces and doses, and the rewind is recorded as `manual`.
pub fn replay_completion(
    lm: &LoadedModel,
    vector: &SteerVector,
    req: &ReplayRequest,
    cancelled: &(dyn Fn() -> bool + Sync),
    on_token: &mut dyn FnMut(&str),
) -> Result<Completion> {
    let c = &req.completion;
    if req.at > c.tokens.len() {
        return Err(Error::invalid(format!(
            "cannot rewind `{}` to token {}: it has {}",
            c.id,
            req.at,
            c.tokens.len()
        )));
    }
    let cfg = gen_config(&req.sampling, req.kl_window);
    let mut progress = CancelCheck { cancelled };
    let steering = Steering::new(vector, &lm.model)?;
    let out = steer::replay(lm, &steering, vector.calibrated()?, c, req.at, req.dose, &cfg, &mut progress)?;
    for piece in out.token_text.iter().skip(req.at) {
        on_token(piece);
    }
    Ok(out)
}
