//! Steered sampling with a per-token trace, run in lockstep with the unsteered base model: for every sampled
//! token, KL(steered ‖ base) of the next-token distributions and the token's NLL under the base model.
//! Interim implementation for the TUI worker; `bridge` is the one place the steer module's generation and
//! replay plug in instead.
//!
//! Dose schedule: `dose[j]` is the coefficient at the position whose logits sampled token j (position
//! `n_prompt + j − 1`). A replay from token `at` at dose d keeps the history's doses before that position and
//! steers positions ≥ `n_prompt + at − 1` at d, built as stacked `Steer` hooks whose coefficients are the
//! increments of the schedule.

use crate::error::{Error, Result};
use crate::model::generate::{log_softmax, sample_row, Decoder, Sampling};
use crate::model::{Hooks, LoadedModel, Steer};
use candle_core::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use std::collections::BTreeMap;

/// KL(p ‖ q) from two log-probability rows, nats.
pub fn kl_from_logprobs(lp: &[f32], lq: &[f32]) -> f32 {
    lp.iter().zip(lq).map(|(a, b)| if a.is_finite() { a.exp() * (a - b) } else { 0.0 }).sum::<f32>().max(0.0)
}

/// Trailing-window rmse of a trace: entry i is `sqrt(mean(x[i+1−w..=i]²))`.
pub fn window_rmse(xs: &[f32], w: usize) -> Vec<f32> {
    let w = w.max(1);
    (0..xs.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(w);
            let win = &xs[lo..=i];
            (win.iter().map(|x| x * x).sum::<f32>() / win.len() as f32).sqrt()
        })
        .collect()
}

/// A piecewise-constant dose over absolute positions: `(start position, coefficient)`, starts increasing.
pub type DoseSchedule = Vec<(usize, f32)>;

/// Steering hooks realising one schedule per row (rows may have different schedules, same length).
pub fn schedule_hooks(vectors: &BTreeMap<usize, Tensor>, schedules: &[DoseSchedule]) -> Result<Hooks> {
    let n = schedules.first().map(Vec::len).unwrap_or(0);
    if schedules.iter().any(|s| s.len() != n) {
        return Err(Error::invalid("rows of one batch must have schedules of equal length"));
    }
    let mut steer = Vec::new();
    for seg in 0..n {
        let start = schedules[0][seg].0;
        if schedules.iter().any(|s| s[seg].0 != start) {
            return Err(Error::invalid("rows of one batch must change dose at the same positions"));
        }
        // Each segment adds its increment over the previous one from its start on.
        let coeffs: Vec<f32> =
            schedules.iter().map(|s| s[seg].1 - if seg == 0 { 0.0 } else { s[seg - 1].1 }).collect();
        if seg > 0 && coeffs.iter().all(|c| *c == 0.0) {
            continue;
        }
        for (layer, v) in vectors {
            steer.push(Steer { layer: *layer, vector: v.clone(), coeffs: coeffs.clone(), start });
        }
    }
    Ok(Hooks { capture: None, steer })
}

/// What one row of a rollout produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowTrace {
    /// New tokens (stop token excluded).
    pub tokens: Vec<u32>,
    /// KL(steered ‖ base) per token.
    pub kl: Vec<f32>,
    /// Base-model NLL per token.
    pub nll_base: Vec<f32>,
}

/// Sample every row from `prefixes` (prompt + forced tokens) under `schedules`, tracing KL and base NLL.
/// `on_token(row, id)` sees each token and returns false to stop (the rollout then returns `Cancelled`).
pub fn rollout(
    lm: &LoadedModel,
    vectors: Option<&BTreeMap<usize, Tensor>>,
    prefixes: &[Vec<u32>],
    schedules: &[DoseSchedule],
    s: &Sampling,
    seeds: &[u64],
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<RowTrace>> {
    let b = prefixes.len();
    if seeds.len() != b || schedules.len() != b {
        return Err(Error::invalid("rollout needs one seed and one schedule per row"));
    }
    // Dose schedules are in absolute positions, so rows must not be shifted by left padding.
    if prefixes.iter().any(|p| p.len() != prefixes[0].len()) {
        return Err(Error::invalid("rollout rows must share one prefix length"));
    }
    let model = &lm.model;
    let pad = lm.tokenizer.pad_id;
    let stop = &lm.tokenizer.stop_ids;
    let steered_hooks = match vectors {
        Some(v) if !v.is_empty() => Some(schedule_hooks(v, schedules)?),
        _ => None,
    };
    // With no vector the steered model is the base model: one decoder, KL 0.
    let none = Hooks::none();
    let mut steered = Decoder::prefill(model, prefixes, pad, steered_hooks.as_ref().unwrap_or(&none))?;
    let mut base = match steered_hooks {
        Some(_) => Some(Decoder::prefill(model, prefixes, pad, &none)?),
        None => None,
    };
    let mut rngs: Vec<StdRng> = seeds.iter().map(|s| StdRng::seed_from_u64(*s)).collect();
    let mut out = vec![RowTrace::default(); b];
    let mut done = vec![false; b];
    for step in 0..s.max_new_tokens {
        let mut next = vec![pad; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let tok = sample_row(&steered.last_logits[r], s, &mut rngs[r]);
            if stop.contains(&tok) {
                done[r] = true;
                continue;
            }
            let ls = log_softmax(&steered.last_logits[r]);
            let (kl, nll) = match &base {
                Some(bd) => {
                    let lb = log_softmax(&bd.last_logits[r]);
                    (kl_from_logprobs(&ls, &lb), -lb[tok as usize])
                }
                None => (0.0, -ls[tok as usize]),
            };
            out[r].tokens.push(tok);
            out[r].kl.push(kl);
            out[r].nll_base.push(nll);
            next[r] = tok;
            if !on_token(r, tok) {
                return Err(Error::Cancelled);
            }
        }
        if done.iter().all(|d| *d) || step + 1 == s.max_new_tokens {
            break;
        }
        steered.step(&next, steered_hooks.as_ref().unwrap_or(&none))?;
        if let Some(bd) = base.as_mut() {
            bd.step(&next, &none)?;
        }
    }
    Ok(out)
}

/// Per-token text pieces whose concatenation is the decoded text (byte-level tokens that split a character
/// give an empty piece and the next token carries the character).
pub fn token_pieces(lm: &LoadedModel, tokens: &[u32]) -> Result<Vec<String>> {
    let mut pieces = Vec::with_capacity(tokens.len());
    let mut prev = String::new();
    for i in 0..tokens.len() {
        let cur = lm.tokenizer.decode(&tokens[..=i], false)?;
        if cur.ends_with('\u{FFFD}') {
            // An incomplete UTF-8 sequence: the character is completed (and shown) by a later token.
            pieces.push(String::new());
            continue;
        }
        match cur.strip_prefix(prev.as_str()) {
            Some(p) => pieces.push(p.to_string()),
            None => pieces.push(lm.tokenizer.token_str(tokens[i])),
        }
        prev = cur;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_by_hand() {
        // p = (0.5, 0.5), q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3)
        let lp = [0.5f32.ln(), 0.5f32.ln()];
        let lq = [0.25f32.ln(), 0.75f32.ln()];
        let want = 0.5 * 2f32.ln() + 0.5 * (2.0f32 / 3.0).ln();
        assert!((kl_from_logprobs(&lp, &lq) - want).abs() < 1e-6);
        assert_eq!(kl_from_logprobs(&lp, &lp), 0.0);
    }

    #[test]
    fn window_rmse_by_hand() {
        let r = window_rmse(&[3.0, 4.0, 0.0], 2);
        assert!((r[0] - 3.0).abs() < 1e-6);
        assert!((r[1] - 12.5f32.sqrt()).abs() < 1e-6);
        assert!((r[2] - 8.0f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn schedule_becomes_increments() -> Result<()> {
        let v = Tensor::new(&[1f32, 0.0], &candle_core::Device::Cpu)?;
        let vectors = BTreeMap::from([(1usize, v)]);
        let h = schedule_hooks(&vectors, &[vec![(0, 2.0), (10, 0.5)]])?;
        let got: Vec<(usize, Vec<f32>)> = h.steer.iter().map(|s| (s.start, s.coeffs.clone())).collect();
        assert_eq!(got, vec![(0, vec![2.0]), (10, vec![-1.5])]);
        assert!(schedule_hooks(&vectors, &[vec![(0, 1.0)], vec![(0, 1.0), (3, 2.0)]]).is_err());
        Ok(())
    }
}
