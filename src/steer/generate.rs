//! Steered generation with per-token incoherence traces, backtrack/replay at a new dose, and the automatic
//! rewind watchdog.
//!
//! Each completion is a *lane*. A batch of n lanes runs as one forward pass of 2n rows: rows 0..n are steered
//! (coefficient = the lane's dose) and rows n..2n are the base model (coefficient exactly 0) fed the same
//! sampled tokens, so every step yields steered and base next-token logits at the same position: the per-token
//! KL(steered ‖ base), the base NLL of the sampled token and the dose it was sampled at come for free.
//!
//! Replay semantics: token k is sampled from the model steered at `dose[k]` at every position, given the
//! prompt and tokens < k. Rewinding to token t at a new dose therefore keeps tokens < t and re-prefills
//! prompt + kept tokens at the new dose (steered keys/values depend on the dose, so a cache built at the old
//! dose cannot be truncated and reused); at dose 0 the continuation is exactly the base model's.

use super::completion::{Completion, Rewind, TokenTrace};
use super::kl::{kl_tensor, nll_row, window_rmse};
use super::vector::Steering;
use crate::error::{Error, Result};
use crate::model::generate::{left_pad, rows_f32, sample_row, Sampling};
use crate::model::Output;
use crate::model::{Forward, KvCache, LoadedModel, LogitsAt, Path};
use crate::progress::Progress;
use candle_core::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The automatic rewind watchdog: when the windowed KL crosses `tau`, rewind `rewind` tokens and replay at
/// `dose × factor` (never below `floor × c*`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Watchdog {
    /// Threshold on the rmse of KL over the trace window, nats.
    pub tau: f32,
    /// Tokens to rewind when it fires.
    pub rewind: usize,
    /// Dose multiplier per rewind.
    pub factor: f64,
    /// Lowest dose, as a fraction of c*.
    pub floor: f64,
    /// Most automatic rewinds per completion.
    pub max_rewinds: usize,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog { tau: 1.5, rewind: 8, factor: 0.7, floor: 0.2, max_rewinds: 4 }
    }
}

/// Options of a generation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    /// Temperature, top-p, top-k and the most new tokens (the seed comes from each request).
    pub sampling: Sampling,
    /// Sliding window of the KL rmse trace, tokens.
    pub window: usize,
    /// Completions decoded together (each takes a steered and a base row).
    pub batch_size: usize,
    /// Automatic rewinds, if wanted.
    pub watchdog: Option<Watchdog>,
}

impl GenConfig {
    /// Gemma-style sampling (T 1, top-p 0.95, top-k 64), window 8, batches of 8, no watchdog.
    pub fn new(max_new_tokens: usize) -> Self {
        GenConfig {
            sampling: Sampling::default_sampling(max_new_tokens, 0),
            window: 8,
            batch_size: 8,
            watchdog: None,
        }
    }
}

/// One completion to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Index of the prompt in its list (used in the completion id).
    pub prompt_index: usize,
    /// User prompt.
    pub prompt: String,
    /// Multiple of c* to steer at.
    pub alpha: f64,
    /// Sampling seed of this completion.
    pub seed: u64,
}

/// Requests for every prompt × alpha, seeds `seed, seed+1, …` in that order.
pub fn requests_for(prompts: &[String], alphas: &[f64], seed: u64) -> Vec<Request> {
    let mut out = Vec::with_capacity(prompts.len() * alphas.len());
    for (i, p) in prompts.iter().enumerate() {
        for a in alphas {
            out.push(Request {
                prompt_index: i,
                prompt: p.clone(),
                alpha: *a,
                seed: seed + out.len() as u64,
            });
        }
    }
    out
}

/// The id of a completion: prompt index, alpha in hundredths, seed (`p003-a075-s1042`). The only id scheme:
/// every caller's completions get their ids here.
pub fn completion_id(prompt_index: usize, alpha: f64, seed: u64) -> String {
    format!("p{prompt_index:03}-a{:03}-s{seed}", (alpha * 100.0).round() as i64)
}

/// The first sampling seed of round `round` from the session's base seed: rounds never share a seed, and within
/// a round the walk-down hands out `round_seed + k` for its k-th generation. The only seed scheme.
pub fn round_seed(base: u64, round: u32) -> u64 {
    base.wrapping_add(1000 * round as u64)
}

/// The seeds of a custom prompt's completions in a round: past every seed the walk-down can use (it stays under
/// 1000 generations a round), one block of 16 per custom prompt.
pub fn custom_prompt_seed(base: u64, round: u32, custom_index: usize) -> u64 {
    round_seed(base, round).wrapping_add(500 + 16 * custom_index as u64)
}

/// One completion being decoded.
struct Lane {
    steered_prompt: Vec<u32>,
    base_prompt: Vec<u32>,
    tokens: Vec<u32>,
    kl: Vec<f32>,
    nll: Vec<f32>,
    doses: Vec<f32>,
    dose: f64,
    rng: StdRng,
    rewinds: Vec<Rewind>,
    /// The watchdog only looks at tokens from here on (the last rewind point).
    watch_from: usize,
    auto_rewinds: usize,
    done: bool,
}

impl Lane {
    fn rewind_to(&mut self, at: usize, dose: f64, cause: &str) {
        self.rewinds.push(Rewind { at, from_dose: self.dose, to_dose: dose, cause: cause.into() });
        self.tokens.truncate(at);
        self.kl.truncate(at);
        self.nll.truncate(at);
        self.doses.truncate(at);
        self.dose = dose;
        self.watch_from = at;
    }
}

/// Shared inputs of a decoding run.
struct Run<'a> {
    lm: &'a LoadedModel,
    steering: &'a Steering,
    cfg: &'a GenConfig,
    c_star: f64,
}

impl Run<'_> {
    /// Decode lanes until each is finished, re-prefilling the ones the watchdog rewound.
    fn run(&self, lanes: &mut [Lane], progress: &mut dyn Progress) -> Result<()> {
        if self.cfg.sampling.max_new_tokens == 0 {
            lanes.iter_mut().for_each(|l| l.done = true);
            return Ok(());
        }
        let max_new = self.cfg.sampling.max_new_tokens;
        for l in lanes.iter_mut().filter(|l| l.tokens.len() >= max_new) {
            l.done = true;
        }
        loop {
            let pending: Vec<usize> = (0..lanes.len()).filter(|i| !lanes[*i].done).collect();
            if pending.is_empty() {
                return Ok(());
            }
            for chunk in pending.chunks(self.cfg.batch_size.max(1)) {
                self.pass(lanes, chunk, progress)?;
            }
        }
    }

    /// One batched pass over `idx`: prefill prompt + kept tokens, then decode until every lane stops,
    /// hits the length limit or is rewound by the watchdog.
    fn pass(&self, lanes: &mut [Lane], idx: &[usize], progress: &mut dyn Progress) -> Result<()> {
        let lm = self.lm;
        let n = idx.len();
        let max_new = self.cfg.sampling.max_new_tokens;
        let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(2 * n);
        for &i in idx {
            let l = &lanes[i];
            seqs.push([l.steered_prompt.as_slice(), l.tokens.as_slice()].concat());
        }
        for &i in idx {
            let l = &lanes[i];
            seqs.push([l.base_prompt.as_slice(), l.tokens.as_slice()].concat());
        }
        if seqs.iter().any(Vec::is_empty) {
            return Err(Error::invalid("every prompt needs at least one token"));
        }
        let mut coeffs: Vec<f32> = idx.iter().map(|&i| lanes[i].dose as f32).collect();
        coeffs.extend(std::iter::repeat_n(0.0, n));
        let hooks = self.steering.hooks(&coeffs);
        let (flat, t, pad) = left_pad(&seqs, lm.tokenizer.pad_id);
        let pad: Vec<usize> = if pad.iter().any(|p| *p > 0) { pad } else { vec![] };
        let mut cache = KvCache::new(lm.model.cfg.num_hidden_layers);
        let ids = Tensor::from_vec(flat, (2 * n, t), lm.model.device())?;
        let f = Forward {
            hooks: &hooks,
            pad: &pad,
            logits: LogitsAt::Last,
            path: Path::Inference,
            adapters: crate::model::Adapters::AsGated,
        };
        let (mut logits, mut kl) = split_step(lm.model.forward(&ids, Some(&mut cache), &f)?, n)?;
        let mut active = vec![true; n];
        let total = lanes.len() as u64;
        loop {
            let mut next = vec![lm.tokenizer.pad_id; 2 * n];
            for (r, &i) in idx.iter().enumerate() {
                if !active[r] {
                    continue;
                }
                let lane = &mut lanes[i];
                let (steered, base) = (&logits[r], &logits[n + r]);
                let tok = sample_row(steered, &self.cfg.sampling, &mut lane.rng);
                if lm.tokenizer.stop_ids.contains(&tok) {
                    lane.done = true;
                    active[r] = false;
                    continue;
                }
                let (k, nll) = (kl[r], nll_row(base, tok));
                if !k.is_finite() || nll.is_nan() {
                    return Err(Error::invalid(format!(
                        "generation for prompt {} at token {}: KL(steered‖base) is {k} and the base NLL is {nll}; \
                         the logits are not finite (a NaN or infinity in the steering vector or the model's weights)",
                        i,
                        lane.tokens.len() + 1
                    )));
                }
                lane.tokens.push(tok);
                lane.kl.push(k);
                lane.nll.push(nll);
                lane.doses.push(lane.dose as f32);
                if lane.tokens.len() >= max_new {
                    lane.done = true;
                    active[r] = false;
                    continue;
                }
                if self.watchdog_fires(lane) {
                    active[r] = false;
                    continue;
                }
                next[r] = tok;
                next[n + r] = tok;
            }
            let finished = lanes.iter().filter(|l| l.done).count() as u64;
            let longest = idx.iter().map(|&i| lanes[i].tokens.len()).max().unwrap_or(0);
            progress.step(finished, total, &format!("{longest}/{max_new} tokens"));
            if !active.iter().any(|a| *a) {
                return Ok(());
            }
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let ids = Tensor::from_vec(next, (2 * n, 1), lm.model.device())?;
            (logits, kl) = split_step(lm.model.forward(&ids, Some(&mut cache), &f)?, n)?;
        }
    }

    /// Check the lane's windowed KL after its newest token; on a crossing, rewind it and return true.
    fn watchdog_fires(&self, lane: &mut Lane) -> bool {
        let Some(w) = self.cfg.watchdog else { return false };
        if self.steering.is_prompt_only() || lane.auto_rewinds >= w.max_rewinds {
            return false;
        }
        let win = self.cfg.window.max(1);
        let len = lane.tokens.len();
        // Judge only a full window sampled since the last rewind, so kept tokens cannot re-trigger it.
        if len < lane.watch_from + win {
            return false;
        }
        let s = &lane.kl[len - win..len];
        let rmse = (s.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / win as f64).sqrt();
        let floor = w.floor * self.c_star;
        if rmse <= w.tau as f64 || lane.dose <= floor + 1e-9 {
            return false;
        }
        let at = len.saturating_sub(w.rewind).max(lane.watch_from);
        let to = (lane.dose * w.factor).max(floor);
        lane.rewind_to(at, to, "auto");
        lane.auto_rewinds += 1;
        true
    }
}

/// Last-position logits of a 2n-row step as f32 rows, and KL(steered row r ‖ base row n + r) for each r.
fn split_step(out: Output, n: usize) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let l = out.logits.ok_or_else(|| Error::invalid("forward returned no logits"))?;
    let v = l.dim(2)?;
    let flat = l.reshape((2 * n, v))?;
    let kl = kl_tensor(&flat.narrow(0, 0, n)?, &flat.narrow(0, n, n)?)?.to_vec1::<f32>()?;
    Ok((rows_f32(Some(&l))?, kl))
}

/// Render and tokenise the steered and base prompts of one user message.
fn prompt_ids(
    lm: &LoadedModel,
    steering: &Steering,
    system: &str,
    user: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let base = lm.tokenizer.encode(&lm.chat.prompt(Some(system), user)?)?;
    let steered = if steering.is_prompt_only() {
        lm.tokenizer.encode(&lm.chat.prompt(Some(steering.steered_system(system)), user)?)?
    } else {
        base.clone()
    };
    Ok((steered, base))
}

fn finish(lm: &LoadedModel, lane: Lane, window: usize, head: CompletionHead) -> Result<Completion> {
    let text = lm.tokenizer.decode(&lane.tokens, false)?;
    let token_text = lane.tokens.iter().map(|t| lm.tokenizer.token_str(*t)).collect();
    let kl_window_rmse = window_rmse(&lane.kl, window);
    Ok(Completion {
        id: head.id,
        system: head.system,
        prompt: head.prompt,
        text,
        tokens: lane.tokens,
        token_text,
        alpha: head.alpha,
        dose: head.dose,
        seed: head.seed,
        trace: TokenTrace { kl: lane.kl, nll_base: lane.nll, kl_window_rmse, dose: lane.doses },
        rewinds: lane.rewinds,
    })
}

struct CompletionHead {
    id: String,
    system: String,
    prompt: String,
    alpha: f64,
    dose: f64,
    seed: u64,
}

fn check_cfg(cfg: &GenConfig, c_star: f64) -> Result<()> {
    cfg.sampling.validate()?;
    if !c_star.is_finite() || c_star < 0.0 {
        return Err(Error::invalid(format!("calibrated coefficient must be finite and ≥ 0, got {c_star}")));
    }
    if let Some(w) = cfg.watchdog {
        if !(w.factor > 0.0 && w.factor < 1.0) {
            return Err(Error::invalid(format!("watchdog factor must be in (0, 1), got {}", w.factor)));
        }
        if w.rewind == 0 {
            return Err(Error::invalid("watchdog rewind must be at least one token"));
        }
    }
    Ok(())
}

/// Generate one completion per request at `alpha × c*` with the neutral `system` prompt, with traces.
pub fn generate_completions(
    lm: &LoadedModel,
    steering: &Steering,
    system: &str,
    c_star: f64,
    requests: &[Request],
    cfg: &GenConfig,
    progress: &mut dyn Progress,
) -> Result<Vec<Completion>> {
    check_cfg(cfg, c_star)?;
    let mut lanes = Vec::with_capacity(requests.len());
    let mut heads = Vec::with_capacity(requests.len());
    for r in requests {
        if !r.alpha.is_finite() || r.alpha < 0.0 {
            return Err(Error::invalid(format!("alpha must be finite and ≥ 0, got {}", r.alpha)));
        }
        if r.prompt.trim().is_empty() {
            return Err(Error::invalid(format!(
                "prompt {} is empty (write a prompt or leave it out)",
                r.prompt_index
            )));
        }
        let (steered_prompt, base_prompt) = prompt_ids(lm, steering, system, &r.prompt)?;
        let dose = if steering.is_prompt_only() { 1.0 } else { r.alpha * c_star };
        lanes.push(Lane {
            steered_prompt,
            base_prompt,
            tokens: vec![],
            kl: vec![],
            nll: vec![],
            doses: vec![],
            dose,
            rng: StdRng::seed_from_u64(r.seed),
            rewinds: vec![],
            watch_from: 0,
            auto_rewinds: 0,
            done: false,
        });
        heads.push(CompletionHead {
            id: completion_id(r.prompt_index, r.alpha, r.seed),
            system: system.to_string(),
            prompt: r.prompt.clone(),
            alpha: r.alpha,
            dose,
            seed: r.seed,
        });
    }
    Run { lm, steering, cfg, c_star }.run(&mut lanes, progress)?;
    lanes.into_iter().zip(heads).map(|(lane, head)| finish(lm, lane, cfg.window, head)).collect()
}

/// The dose in effect at token `t` of `c`, as the exact f64 the run used when the f32 trace matches one.
fn dose_at(c: &Completion, t: usize) -> f64 {
    let Some(traced) = c.trace.dose.get(t).or(c.trace.dose.last()).map(|d| *d as f64) else { return c.dose };
    std::iter::once(c.dose)
        .chain(c.rewinds.iter().map(|r| r.to_dose))
        .find(|d| (d - traced).abs() <= 1e-6 * d.abs().max(1.0))
        .unwrap_or(traced)
}

/// The sampling seed of a completion's next replay: derived from its seed and rewind count, so a replayed
/// completion can be reproduced from the file alone.
pub fn replay_seed(c: &Completion) -> u64 {
    c.seed.wrapping_add(1_000_003u64.wrapping_mul(c.rewinds.len() as u64 + 1))
}

/// Regenerate `c` from token `from` at `dose`, keeping tokens before `from`; the rewind is recorded with
/// `cause` (`manual` or `auto`) and every new token's trace entry carries the dose it was sampled at.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    lm: &LoadedModel,
    steering: &Steering,
    c_star: f64,
    c: &Completion,
    from: usize,
    dose: f64,
    cfg: &GenConfig,
    progress: &mut dyn Progress,
) -> Result<Completion> {
    check_cfg(cfg, c_star)?;
    if from > c.tokens.len() {
        return Err(Error::invalid(format!(
            "completion {} has {} tokens; cannot replay from token {from}",
            c.id,
            c.tokens.len()
        )));
    }
    if !dose.is_finite() || dose < 0.0 {
        return Err(Error::invalid(format!("dose must be finite and ≥ 0, got {dose}")));
    }
    if steering.is_prompt_only() && dose != 1.0 && dose != 0.0 {
        return Err(Error::invalid(
            "the prompt-only arm has no coefficient: replay it at dose 1 (persona) or 0 (none)",
        ));
    }
    let n_tr = c.trace.kl.len().min(c.trace.nll_base.len()).min(c.trace.dose.len());
    if n_tr < from {
        return Err(Error::invalid(format!("completion {} has traces for only {n_tr} of its tokens", c.id)));
    }
    let (mut steered_prompt, base_prompt) = prompt_ids(lm, steering, &c.system, &c.prompt)?;
    if steering.is_prompt_only() && dose == 0.0 {
        steered_prompt = base_prompt.clone();
    }
    let old = dose_at(c, from);
    let mut lane = Lane {
        steered_prompt,
        base_prompt,
        tokens: c.tokens[..from].to_vec(),
        kl: c.trace.kl[..from].to_vec(),
        nll: c.trace.nll_base[..from].to_vec(),
        doses: c.trace.dose[..from].to_vec(),
        dose: old,
        rng: StdRng::seed_from_u64(replay_seed(c)),
        rewinds: c.rewinds.clone(),
        watch_from: from,
        auto_rewinds: 0,
        done: false,
    };
    lane.rewind_to(from, dose, "manual");
    let mut lanes = vec![lane];
    Run { lm, steering, cfg, c_star }.run(&mut lanes, progress)?;
    let head = CompletionHead {
        id: c.id.clone(),
        system: c.system.clone(),
        prompt: c.prompt.clone(),
        alpha: c.alpha,
        dose: c.dose,
        seed: c.seed,
    };
    let lane = lanes.pop().ok_or_else(|| Error::invalid("replay lost its lane"))?;
    finish(lm, lane, cfg.window, head)
}
