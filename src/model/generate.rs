//! Batched sampling: left padding with attention masks, temperature / top-k / top-p with a per-row seed,
//! greedy, stop ids, a per-token callback for streaming, and the log-probability of every sampled token.

use super::cache::KvCache;
use super::decoder::{Forward, LogitsAt, Model};
use super::hook::Hooks;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Base seed; row i uses `seed + i`.
    pub seed: u64,
    /// Most new tokens per row.
    pub max_new_tokens: usize,
}

impl Sampling {
    /// Refuse settings that would sample nonsense: a NaN or negative temperature, a nucleus mass outside
    /// (0, 1], no tokens to generate.
    pub fn validate(&self) -> Result<()> {
        if !Self::valid_temperature(self.temperature) {
            return Err(Error::invalid(format!(
                "temperature {} must be a finite number ≥ 0 (0 = greedy)",
                self.temperature
            )));
        }
        if !Self::valid_top_p(self.top_p) {
            return Err(Error::invalid(format!("top-p {} must be in (0, 1] (1 = off)", self.top_p)));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::invalid("max new tokens must be at least 1"));
        }
        Ok(())
    }
    /// A temperature sampling can use: finite and ≥ 0 (0 = greedy).
    pub fn valid_temperature(t: f64) -> bool {
        t.is_finite() && t >= 0.0
    }
    /// A nucleus mass sampling can use: in (0, 1] (1 = off).
    pub fn valid_top_p(p: f64) -> bool {
        p > 0.0 && p <= 1.0
    }
    /// Greedy decoding of at most `n` tokens.
    pub fn greedy(n: usize) -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, max_new_tokens: n }
    }
    /// Gemma-style sampling defaults (T 1, top-p 0.95, top-k 64).
    pub fn default_sampling(n: usize, seed: u64) -> Self {
        Sampling { temperature: 1.0, top_p: 0.95, top_k: 64, seed, max_new_tokens: n }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// Emitted a stop id (kept out of the tokens).
    Stop,
    /// Hit `max_new_tokens`.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// Generated tokens per row.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens of each row (stop token excluded).
    pub tokens: Vec<Vec<u32>>,
    /// Log-probability (T = 1, full vocabulary) of each new token.
    pub logprobs: Vec<Vec<f32>>,
    /// Why each row ended.
    pub stop: Vec<StopReason>,
}

/// One sampled token, reported as it is produced.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    /// Batch row.
    pub row: usize,
    /// Index of the token within the row's completion.
    pub index: usize,
    /// Token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
}

/// Left-pad prompts to one length; returns ids `[b, t]` and the pad count of each row.
pub fn left_pad(prompts: &[Vec<u32>], pad_id: u32) -> (Vec<u32>, usize, Vec<usize>) {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut pads = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = t - p.len();
        pads.push(n);
        ids.extend(std::iter::repeat_n(pad_id, n));
        ids.extend_from_slice(p);
    }
    (ids, t, pads)
}

/// Log-softmax of one row of logits (f32), numerically stable.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    logits.iter().map(|x| x - lse).collect()
}

/// Log-probability of token `id` under one row of logits: `log_softmax(logits)[id]` without materialising the
/// whole vocabulary's log-probabilities (one pass for the max, one for the sum, no allocation).
pub fn log_prob_of(logits: &[f32], id: u32) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    logits.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY) - lse
}

/// Pick a token from one row of logits.
pub fn sample_row(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = s.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l / t)).collect();
    let k = if s.top_k == 0 { cand.len() } else { s.top_k.min(cand.len()) };
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(k);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    let m = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - m).exp()).collect();
    let z: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f32 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// Index of the largest value (first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// A batch being decoded: model state after the prompt, ready to step.
pub struct Decoder<'m> {
    model: &'m Model,
    /// KV cache of the batch.
    pub cache: KvCache,
    pad: Vec<usize>,
    /// Last logits per row (`[b, vocab]`, f32, on CPU).
    pub last_logits: Vec<Vec<f32>>,
}

impl<'m> Decoder<'m> {
    /// Prefill `prompts` (left-padded) with the given hooks.
    pub fn prefill(model: &'m Model, prompts: &[Vec<u32>], pad_id: u32, hooks: &Hooks) -> Result<Self> {
        Self::start(model, prompts, pad_id, hooks, LogitsAt::Last)
    }

    /// A fresh cache over the left-padded `prompts`, with the logits `logits` asks for (none: `last_logits` empty).
    fn start(
        model: &'m Model,
        prompts: &[Vec<u32>],
        pad_id: u32,
        hooks: &Hooks,
        logits: LogitsAt,
    ) -> Result<Self> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::invalid("every prompt needs at least one token"));
        }
        let (ids, t, pad) = left_pad(prompts, pad_id);
        let ids = Tensor::from_vec(ids, (prompts.len(), t), model.device())?;
        let mut cache = model.new_cache();
        let pad: Vec<usize> = if pad.iter().any(|p| *p > 0) { pad } else { vec![] };
        let out =
            model.forward(&ids, Some(&mut cache), &Forward { pad: &pad, logits, ..Forward::infer(hooks) })?;
        let last_logits = match logits {
            LogitsAt::None => Vec::new(),
            _ => rows_f32(out.logits.as_ref())?,
        };
        Ok(Decoder { model, cache, pad, last_logits })
    }

    /// The state `prefill` would reach on `rows`, where each row is a shared prefix followed by its own tokens:
    /// `rows[r] = (i, rest)` stands for `prefixes[i] ++ rest`, and every `rest` has the same length. Each prefix is
    /// computed once and its cache rows copied to the rows that continue it; a causal model's keys and values of
    /// a prefix do not depend on what follows, and the rows keep `prefill`'s left padding and positions (the
    /// prefixes are padded to the length the rests leave), so the result is `prefill`'s up to rounding. The eval
    /// scores every item in two frames whose prompts share the vignette and the schema's opening. The hooks must
    /// treat every row alike (one steering coefficient for the batch): the prefixes run as a smaller batch, and
    /// per-row coefficients are refused there.
    pub fn prefill_shared(
        model: &'m Model,
        prefixes: &[Vec<u32>],
        rows: &[(usize, Vec<u32>)],
        pad_id: u32,
        hooks: &Hooks,
    ) -> Result<Self> {
        let t = rows.first().map(|(_, r)| r.len()).unwrap_or(0);
        if t == 0 || rows.iter().any(|(i, r)| r.len() != t || *i >= prefixes.len()) {
            return Err(Error::invalid(
                "shared prefill: every row needs a prefix and a rest of one common length",
            ));
        }
        let mut dec = Self::start(model, prefixes, pad_id, hooks, LogitsAt::None)?;
        let owners: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
        // The cache carries its rows' padding; the decoder's copy follows it.
        dec.cache = dec.cache.select_rows(&owners)?;
        dec.pad = dec.cache.pad().to_vec();
        let flat: Vec<u32> = rows.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        dec.feed(flat, t, hooks)?;
        Ok(dec)
    }

    /// Feed one token per row and update `last_logits`.
    pub fn step(&mut self, next: &[u32], hooks: &Hooks) -> Result<()> {
        self.feed(next.to_vec(), 1, hooks)
    }

    /// Feed `t` tokens per row (`ids` row after row) and update `last_logits` from each row's last one.
    fn feed(&mut self, ids: Vec<u32>, t: usize, hooks: &Hooks) -> Result<()> {
        let b = ids.len() / t.max(1);
        let ids = Tensor::from_vec(ids, (b, t), self.model.device())?;
        let f = Forward { pad: &self.pad, logits: LogitsAt::Last, ..Forward::infer(hooks) };
        let out = self.model.forward(&ids, Some(&mut self.cache), &f)?;
        self.last_logits = rows_f32(out.logits.as_ref())?;
        Ok(())
    }

    /// Left padding of each row.
    pub fn pad(&self) -> &[usize] {
        &self.pad
    }
}

/// `[b, 1, vocab]` logits to per-row f32 vectors.
pub fn rows_f32(logits: Option<&Tensor>) -> Result<Vec<Vec<f32>>> {
    let l = logits.ok_or_else(|| Error::invalid("forward returned no logits"))?;
    let (b, _, v) = l.dims3()?;
    Ok(l.to_dtype(DType::F32)?.reshape((b, v))?.to_vec2()?)
}

/// Generate from each prompt. `on_token` sees every token as it is sampled and returns false to stop all rows.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    s: &Sampling,
    hooks: &Hooks,
    stop_ids: &[u32],
    pad_id: u32,
    on_token: &mut dyn FnMut(TokenEvent) -> bool,
) -> Result<Generation> {
    s.validate()?;
    let mut dec = Decoder::prefill(model, prompts, pad_id, hooks)?;
    continue_generation(&mut dec, s, hooks, stop_ids, pad_id, on_token)
}

/// Keep sampling from a prefilled decoder.
pub fn continue_generation(
    dec: &mut Decoder,
    s: &Sampling,
    hooks: &Hooks,
    stop_ids: &[u32],
    pad_id: u32,
    on_token: &mut dyn FnMut(TokenEvent) -> bool,
) -> Result<Generation> {
    let b = dec.last_logits.len();
    let mut rngs: Vec<StdRng> =
        (0..b).map(|i| StdRng::seed_from_u64(s.seed.wrapping_add(i as u64))).collect();
    let mut gen =
        Generation { tokens: vec![vec![]; b], logprobs: vec![vec![]; b], stop: vec![StopReason::Length; b] };
    let mut done = vec![false; b];
    for step in 0..s.max_new_tokens {
        let mut next = vec![pad_id; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let logits = &dec.last_logits[r];
            let tok = sample_row(logits, s, &mut rngs[r]);
            if stop_ids.contains(&tok) {
                done[r] = true;
                gen.stop[r] = StopReason::Stop;
                continue;
            }
            let lp = log_prob_of(logits, tok);
            gen.tokens[r].push(tok);
            gen.logprobs[r].push(lp);
            next[r] = tok;
            if !on_token(TokenEvent { row: r, index: step, id: tok, logprob: lp }) {
                for (d, st) in done.iter_mut().zip(gen.stop.iter_mut()) {
                    if !*d {
                        *d = true;
                        *st = StopReason::Cancelled;
                    }
                }
                return Ok(gen);
            }
        }
        if done.iter().all(|d| *d) || step + 1 == s.max_new_tokens {
            break;
        }
        dec.step(&next, hooks)?;
    }
    Ok(gen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let logits = vec![0.1, 3.0, 2.0, -1.0];
        let s = Sampling { temperature: 1.0, top_p: 1.0, top_k: 1, seed: 3, max_new_tokens: 1 };
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..20 {
            assert_eq!(sample_row(&logits, &s, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p ≈ [0.665, 0.245, 0.09]: top-p 0.6 keeps only the first.
        let logits = vec![2.0, 1.0, 0.0];
        let s = Sampling { temperature: 1.0, top_p: 0.6, top_k: 0, seed: 0, max_new_tokens: 1 };
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample_row(&logits, &s, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = vec![0.0, (3f32).ln()]; // p = [0.25, 0.75]
        let s = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0, max_new_tokens: 1 };
        let mut rng = StdRng::seed_from_u64(7);
        let ones = (0..4000).filter(|_| sample_row(&logits, &s, &mut rng) == 1).count();
        let frac = ones as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    #[test]
    fn log_prob_of_matches_the_full_log_softmax() {
        let logits = vec![0.5, -2.0, 3.25, 1.0];
        let full = log_softmax(&logits);
        for (id, want) in full.iter().enumerate() {
            assert!((log_prob_of(&logits, id as u32) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn left_pad_aligns_right() {
        let (ids, t, pads) = left_pad(&[vec![1, 2, 3], vec![4]], 0);
        assert_eq!(t, 3);
        assert_eq!(pads, vec![0, 2]);
        assert_eq!(ids, vec![1, 2, 3, 0, 0, 4]);
    }
}
