//! Running the tinymfv protocol on a model, batched and cached: every (item, frame) is one sequence; sequences
//! are sorted by prompt length and left-padded into batches; one prefill, `think` greedy steps on one KV cache,
//! then one forward over the forced-answer suffix on top of that cache, with vocabulary logits only where the
//! answer and the prefill NLL are read. Returns the full `EvalReport`.

use super::data::{select_items, EvalItem};
use super::json_probe::run_json_probe;
use super::metrics::compute_metrics;
use super::protocol::{answer_token_ids, frame_tokens, read_think, AnswerCase, FrameOrder, FrameTokens};
use super::report::{EvalConfig, EvalReport, FrameRecord, RowRecord, Timings, SCHEMA_VERSION};
use crate::error::{Error, Result};
use crate::model::decoder::{Forward, LogitsAt, Path};
use crate::model::generate::Decoder;
use crate::model::{ChatTemplate, Hooks, LoadedModel, Model, TextTokenizer};
use crate::progress::Progress;
use candle_core::{DType, IndexOp, Tensor};
use std::time::Instant;

/// The model under evaluation and everything needed to prompt it.
#[derive(Clone, Copy)]
pub struct EvalModel<'a> {
    /// The decoder (base, baked student, ...).
    pub model: &'a Model,
    /// Its tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// Its own chat template.
    pub chat: &'a ChatTemplate,
    /// Hooks applied at every position (steering for control arms; empty for plain eval).
    pub hooks: &'a Hooks,
    /// Recorded in the report.
    pub model_id: &'a str,
    /// Recorded in the report.
    pub weights_hash: &'a str,
}

impl<'a> EvalModel<'a> {
    /// Evaluate a loaded model as it is, with the given hooks.
    pub fn from_loaded(lm: &'a LoadedModel, hooks: &'a Hooks) -> Self {
        EvalModel {
            model: &lm.model,
            tokenizer: &lm.tokenizer,
            chat: &lm.chat,
            hooks,
            model_id: &lm.info.id,
            weights_hash: &lm.info.weights_hash,
        }
    }
}

/// One sequence to score: an item in one frame.
struct Sequence {
    item: usize,
    order: FrameOrder,
    tokens: FrameTokens,
}

/// ln Σ exp over one row of logits, in f64: an f32 sum over a 49k (SmolLM2) or 262k (Gemma) vocabulary drifts by
/// about 1e-4 nats, as large as the differences the eval is meant to resolve.
fn logsumexp(logits: &[f32]) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + logits.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln()
}

/// Greedy pick that never returns a stop id: the think has a fixed length (tinymfv forces min = max new tokens,
/// which masks end-of-sequence until the budget is spent).
fn argmax_excluding(logits: &[f32], banned: &[u32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, x) in logits.iter().enumerate() {
        if banned.contains(&(i as u32)) {
            continue;
        }
        if best.map(|b| *x > logits[b]).unwrap_or(true) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Log-probabilities of the answer ids in one row of logits. A row with a NaN or infinity has a non-finite
/// log-sum-exp: that is an error, not an answer probability of NaN (or 0) in the report.
fn answer_lp(logits: &[f32], lse: f64, ids: &[u32; 7]) -> Result<[f64; 7]> {
    if !lse.is_finite() {
        let (i, v) = crate::numeric::first_non_finite(logits).unwrap_or((0, lse as f32));
        return Err(Error::invalid(format!(
            "eval: the model's logits are not finite ({v} at vocabulary id {i}); check the model's weights and the \
             adapters it carries"
        )));
    }
    Ok(ids.map(|id| logits[id as usize] as f64 - lse))
}

/// The batch size that splits `n` sequences into as few batches of at most `most` as possible, of even sizes:
/// 264 at most 100 gives three batches of 88, not 100, 100 and a slow tail of 64.
fn even_batch(n: usize, most: usize) -> usize {
    let most = most.max(1);
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// Progress units of one sequence: prefill, each think step, the answer forward.
fn units_per_sequence(think: usize) -> u64 {
    think as u64 + 2
}

/// Progress across batches: units done so far of the run's total.
struct Tally<'p> {
    progress: &'p mut dyn Progress,
    done: u64,
    total: u64,
}

impl Tally<'_> {
    fn add(&mut self, units: usize, msg: &str) -> Result<()> {
        self.done += units as u64;
        self.progress.step(self.done, self.total, msg);
        if self.progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

/// The prefixes the batch's two frames of each item can share, and each sequence as (its item's prefix, the rest),
/// when the batch is made of item pairs (sequences 2k and 2k + 1 are one item's frames) of equal prompt lengths.
/// The frames' prompts agree up to the first option of the schema (template, vignette, schema opening): that part
/// is prefilled once per item. Every rest must have one length, so each item's prefix ends that many tokens
/// before its prompt does; `None` when the batch does not allow it (then everything is prefilled per sequence).
#[allow(clippy::type_complexity)]
fn shared_prefixes(seqs: &[&Sequence]) -> Option<(Vec<Vec<u32>>, Vec<(usize, Vec<u32>)>)> {
    if seqs.is_empty() || !seqs.len().is_multiple_of(2) {
        return None;
    }
    let pairs: Vec<(&[u32], &[u32])> = seqs
        .chunks(2)
        .map(|p| (p[0].tokens.prompt.as_slice(), p[1].tokens.prompt.as_slice(), p[0].item == p[1].item))
        .map(|(a, b, same)| (same && a.len() == b.len()).then_some((a, b)))
        .collect::<Option<_>>()?;
    if pairs.iter().any(|(a, _)| a.is_empty()) {
        return None;
    }
    // The rest of each item must keep at least one token of its own, and one length across the batch.
    let rest = pairs
        .iter()
        .map(|(a, b)| a.len() - a.iter().zip(*b).take_while(|(x, y)| x == y).count().min(a.len() - 1))
        .max()?;
    if pairs.iter().any(|(a, _)| a.len() <= rest) {
        return None;
    }
    let mut prefixes = Vec::with_capacity(pairs.len());
    let mut rows = Vec::with_capacity(seqs.len());
    for (i, (a, b)) in pairs.iter().enumerate() {
        let split = a.len() - rest;
        prefixes.push(a[..split].to_vec());
        rows.push((i, a[split..].to_vec()));
        rows.push((i, b[split..].to_vec()));
    }
    Some((prefixes, rows))
}

/// Score one batch of sequences; returns one frame record per sequence, in order.
fn run_batch(
    m: &EvalModel,
    seqs: &[&Sequence],
    think: usize,
    ids: &[u32; 7],
    timings: &mut Timings,
    tally: &mut Tally,
) -> Result<Vec<FrameRecord>> {
    let b = seqs.len();
    let tok = m.tokenizer;
    let t0 = Instant::now();
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s.tokens.prompt.clone()).collect();
    let mut dec = match shared_prefixes(seqs) {
        Some((prefixes, rows)) => {
            timings.shared_prompt_tokens += prefixes.iter().map(Vec::len).sum::<usize>();
            Decoder::prefill_shared(m.model, &prefixes, &rows, tok.pad_id, m.hooks)?
        }
        None => Decoder::prefill(m.model, &prompts, tok.pad_id, m.hooks)?,
    };
    timings.prefill_s += t0.elapsed().as_secs_f64();
    timings.sequences += b;
    timings.prompt_tokens += prompts.iter().map(Vec::len).sum::<usize>();
    timings.padded_prompt_tokens += b * prompts.iter().map(Vec::len).max().unwrap_or(0);
    timings.think_tokens += b * think;
    tally.add(b, "prefill")?;

    // Think: exactly `think` greedy tokens, keeping what the natural case needs (answer log-probs at every
    // step, log-prob of each generated token). Those log-probs come from the model's full distribution; only the
    // greedy pick skips stop ids.
    let t1 = Instant::now();
    let mut think_ids: Vec<Vec<u32>> = vec![Vec::with_capacity(think); b];
    let mut gen_lp: Vec<Vec<f64>> = vec![Vec::with_capacity(think); b];
    let mut slot_lp: Vec<Vec<[f64; 7]>> = vec![Vec::with_capacity(think + 1); b];
    for k in 0..think {
        let mut next = vec![0u32; b];
        for r in 0..b {
            let logits = &dec.last_logits[r];
            let lse = logsumexp(logits);
            slot_lp[r].push(answer_lp(logits, lse, ids)?);
            let t = argmax_excluding(logits, &tok.stop_ids);
            gen_lp[r].push(logits[t as usize] as f64 - lse);
            think_ids[r].push(t);
            next[r] = t;
        }
        dec.step(&next, m.hooks)?;
        tally.add(b, &format!("think {}/{think}", k + 1))?;
    }
    for (slots, logits) in slot_lp.iter_mut().zip(&dec.last_logits) {
        slots.push(answer_lp(logits, logsumexp(logits), ids)?);
    }
    timings.think_s += t1.elapsed().as_secs_f64();

    // Forced answer: one forward over the suffix (right-padded if lengths differ; causal attention keeps the
    // padding invisible to the real positions).
    let t2 = Instant::now();
    let readings = think_ids.iter().map(|t| read_think(tok, t)).collect::<Result<Vec<_>>>()?;
    let forced = if readings.iter().any(|r| r.case == AnswerCase::Interrupted) {
        let s_max = seqs.iter().map(|s| s.tokens.suffix.len()).max().unwrap_or(0);
        // Only the positions from the first prefill token's predecessor on are read (the prefill NLL and the
        // answer slot), so the vocabulary projection starts there.
        let first_read = seqs.iter().map(|s| s.tokens.prefill_start - 1).min().unwrap_or(0);
        let mut flat = Vec::with_capacity(b * s_max);
        for s in seqs {
            flat.extend_from_slice(&s.tokens.suffix);
            flat.extend(std::iter::repeat_n(tok.pad_id, s_max - s.tokens.suffix.len()));
        }
        let x = Tensor::from_vec(flat, (b, s_max), m.model.device())?;
        let pad = dec.pad().to_vec();
        let f = Forward {
            hooks: m.hooks,
            pad: &pad,
            logits: LogitsAt::From(first_read),
            path: Path::Inference,
            adapters: crate::model::Adapters::AsGated,
        };
        let out = m.model.forward(&x, Some(&mut dec.cache), &f)?;
        let logits = out
            .logits
            .ok_or_else(|| Error::invalid("suffix forward returned no logits"))?
            .to_dtype(DType::F32)?;
        Some((logits, first_read))
    } else {
        None
    };
    let mut records = Vec::with_capacity(b);
    for (r, (s, reading)) in seqs.iter().zip(readings).enumerate() {
        let (lp, pmass, nll_json, n_prefill) = match reading.case {
            AnswerCase::Natural => {
                let span = reading.natural.ok_or_else(|| Error::invalid("natural case without a span"))?;
                let lp = slot_lp[r][span.slot];
                let nll = gen_lp[r][span.start..span.slot].iter().map(|x| -x).sum::<f64>()
                    / (span.slot - span.start).max(1) as f64;
                (lp, lp.iter().map(|x| x.exp()).sum(), nll, span.slot - span.start)
            }
            AnswerCase::AnsweredElsewhere => ([f64::NAN; 7], 0.0, f64::NAN, 0),
            AnswerCase::Interrupted => {
                let (logits, first_read) =
                    forced.as_ref().ok_or_else(|| Error::invalid("no suffix logits"))?;
                let suffix = &s.tokens.suffix;
                let st = s.tokens.prefill_start;
                // Positions st-1 ..= len-1: each predicts the next suffix token; the last one is the answer slot.
                // The logits start at position `first_read`.
                let rows: Vec<Vec<f32>> =
                    logits.i(r)?.narrow(0, st - 1 - first_read, suffix.len() - st + 1)?.to_vec2()?;
                let mut nll = 0.0;
                for (i, &target) in suffix.iter().enumerate().skip(st) {
                    let row = &rows[i - st];
                    nll -= row[target as usize] as f64 - logsumexp(row);
                }
                let n = suffix.len() - st;
                let last = &rows[rows.len() - 1];
                let lp = answer_lp(last, logsumexp(last), ids)?;
                (lp, lp.iter().map(|x| x.exp()).sum(), nll / n as f64, n)
            }
        };
        records.push(FrameRecord {
            order: s.order,
            case: reading.case,
            lp,
            pmass,
            nll_json,
            n_prefill_tokens: n_prefill,
            think_tokens: think,
            emitted_close: reading.emitted_close,
            think_text: reading.text,
        });
    }
    timings.answer_s += t2.elapsed().as_secs_f64();
    tally.add(b, "answer")?;
    Ok(records)
}

/// Run the whole eval: items, both frames, batched scoring, the json_is_valid probe, metrics.
pub fn run_eval(m: &EvalModel, cfg: &EvalConfig, progress: &mut dyn Progress) -> Result<EvalReport> {
    cfg.validate()?;
    let start = Instant::now();
    // A student's kept rounds are attached adapters; the eval's few hundred forwards run on a copy with them merged
    // (the same function, one product per projection instead of one plus two rank-r ones per round).
    let merged = m.model.merged_copy()?;
    let m = &match &merged {
        Some(model) => EvalModel { model, ..*m },
        None => *m,
    };
    let ids = answer_token_ids(m.tokenizer)?;
    let items: Vec<EvalItem> = select_items(cfg.variant, &cfg.conditions, cfg.n_vignettes)?;
    let mut seqs = Vec::with_capacity(items.len() * 2);
    for (i, it) in items.iter().enumerate() {
        for order in [FrameOrder::Forward, FrameOrder::Reversed] {
            seqs.push(Sequence {
                item: i,
                order,
                tokens: frame_tokens(
                    m.chat,
                    m.tokenizer,
                    cfg.system_prompt.as_deref(),
                    &it.text,
                    order,
                    cfg.suffix,
                )?,
            });
        }
    }
    // Similar lengths share a batch, so little compute goes to padding; both frames of an item go in one batch
    // (sequences 2i and 2i + 1), so that they share the prefill of their common prefix (`shared_prefixes`).
    let (by_len, per_batch): (Vec<usize>, usize) = if cfg.batch_size >= 2 {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| seqs[2 * i].tokens.prompt.len().max(seqs[2 * i + 1].tokens.prompt.len()));
        let by_len = order.into_iter().flat_map(|i| [2 * i, 2 * i + 1]).collect();
        (by_len, 2 * even_batch(items.len(), cfg.batch_size / 2))
    } else {
        let mut by_len: Vec<usize> = (0..seqs.len()).collect();
        by_len.sort_by_key(|&i| seqs[i].tokens.prompt.len());
        (by_len, even_batch(seqs.len(), cfg.batch_size))
    };
    let total = seqs.len() as u64 * units_per_sequence(cfg.think_tokens);
    let mut timings = Timings::default();
    let mut results: Vec<Option<FrameRecord>> = vec![None; seqs.len()];
    {
        let mut tally = Tally { progress: &mut *progress, done: 0, total };
        for chunk in by_len.chunks(per_batch) {
            let batch: Vec<&Sequence> = chunk.iter().map(|&i| &seqs[i]).collect();
            let recs = run_batch(m, &batch, cfg.think_tokens, &ids, &mut timings, &mut tally)?;
            for (&i, rec) in chunk.iter().zip(recs) {
                results[i] = Some(rec);
            }
        }
    }
    let mut rows: Vec<RowRecord> = items
        .iter()
        .map(|it| RowRecord {
            id: it.id.clone(),
            condition: it.condition,
            foundation: it.foundation.clone(),
            foundation_coarse: it.coarse,
            human: it.human,
            frames: Vec::with_capacity(2),
        })
        .collect();
    for (s, rec) in seqs.iter().zip(results) {
        rows[s.item].frames.push(rec.ok_or_else(|| Error::invalid("a sequence was not scored"))?);
    }
    let json_probe = if cfg.json_probe {
        let t = Instant::now();
        let r = run_json_probe(m, cfg.system_prompt.as_deref(), cfg.json_probe_max_tokens, progress)?;
        timings.json_probe_s = t.elapsed().as_secs_f64();
        Some(r)
    } else {
        None
    };
    let metrics = compute_metrics(&rows, json_probe.as_ref().map(|j| j.fraction_valid()));
    timings.total_s = start.elapsed().as_secs_f64();
    Ok(EvalReport {
        schema_version: SCHEMA_VERSION,
        created: chrono::Utc::now().to_rfc3339(),
        model_id: m.model_id.to_string(),
        weights_hash: m.weights_hash.to_string(),
        config: cfg.clone(),
        answer_token_ids: ids,
        intervals: super::bootstrap::intervals(&rows),
        metrics,
        rows,
        json_probe,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(item: usize, prompt: &[u32]) -> Sequence {
        let tokens = FrameTokens { prompt: prompt.to_vec(), suffix: vec![1, 2], prefill_start: 1 };
        Sequence { item, order: FrameOrder::Forward, tokens }
    }

    #[test]
    fn the_two_frames_of_an_item_share_their_common_prefix_and_every_rest_has_one_length() {
        // Item 0 agrees on 3 tokens of 5, item 1 on 5 of 7: rests of max(2, 2) = 2 tokens.
        let s = [
            seq(0, &[1, 2, 3, 4, 5]),
            seq(0, &[1, 2, 3, 9, 9]),
            seq(1, &[7, 7, 7, 7, 7, 1, 2]),
            seq(1, &[7, 7, 7, 7, 7, 3, 4]),
        ];
        let refs: Vec<&Sequence> = s.iter().collect();
        let (prefixes, rows) = shared_prefixes(&refs).expect("shareable");
        assert_eq!(prefixes, vec![vec![1, 2, 3], vec![7, 7, 7, 7, 7]]);
        assert_eq!(rows, vec![(0, vec![4, 5]), (0, vec![9, 9]), (1, vec![1, 2]), (1, vec![3, 4])]);
        // Every row is its prefix and rest: the prompts themselves.
        for ((i, rest), sq) in rows.iter().zip(&s) {
            assert_eq!([prefixes[*i].as_slice(), rest].concat(), sq.tokens.prompt);
        }
        // A longer rest elsewhere shortens every prefix: item 0 differs from its second token on.
        let t = [
            seq(0, &[1, 2, 3, 4]),
            seq(0, &[1, 5, 6, 7]),
            seq(1, &[7, 7, 7, 7, 7, 1]),
            seq(1, &[7, 7, 7, 7, 7, 3]),
        ];
        let refs: Vec<&Sequence> = t.iter().collect();
        let (prefixes, _) = shared_prefixes(&refs).expect("shareable");
        assert_eq!(prefixes, vec![vec![1], vec![7, 7, 7]]);
        // Frames of unequal lengths, frames of two items, identical frames: no sharing where it cannot hold.
        let u = [seq(0, &[1, 2, 3]), seq(0, &[1, 2, 3, 4])];
        assert!(shared_prefixes(&u.iter().collect::<Vec<_>>()).is_none());
        let v = [seq(0, &[1, 2, 3]), seq(1, &[1, 2, 4])];
        assert!(shared_prefixes(&v.iter().collect::<Vec<_>>()).is_none());
        let e = [seq(0, &[]), seq(0, &[])];
        assert!(shared_prefixes(&e.iter().collect::<Vec<_>>()).is_none(), "empty prompts are not split");
        let w = [seq(0, &[1, 2, 3]), seq(0, &[1, 2, 3])];
        let (prefixes, rows) = shared_prefixes(&w.iter().collect::<Vec<_>>()).expect("identical frames");
        assert_eq!((prefixes[0].len(), rows[0].1.len()), (2, 1), "a rest keeps one token of its own");
    }

    #[test]
    fn batches_are_as_few_and_as_even_as_the_cap_allows() {
        assert_eq!(even_batch(264, 100), 88);
        assert_eq!(even_batch(264, 132), 132);
        assert_eq!(even_batch(264, 32), 30);
        assert_eq!(even_batch(32, 96), 32);
        assert_eq!(even_batch(97, 96), 49);
        assert_eq!(even_batch(0, 96), 1);
        assert_eq!(even_batch(5, 0), 1);
    }

    #[test]
    fn greedy_skips_banned_ids() {
        assert_eq!(argmax_excluding(&[0.0, 5.0, 3.0], &[1]), 2);
        assert_eq!(argmax_excluding(&[0.0, 5.0, 3.0], &[]), 1);
    }

    #[test]
    fn logsumexp_is_stable() {
        let v = logsumexp(&[1000.0, 1000.0]);
        assert!((v - (1000.0 + 2f64.ln())).abs() < 1e-12);
    }

    /// Over a Gemma-sized vocabulary the f64 sum is exact to ~1e-12 nats where an f32 sum drifts by more than
    /// 1e-6 (so this test tells the two apart).
    #[test]
    fn logsumexp_is_f64_accurate_over_a_large_vocabulary() {
        let n = 262_144usize;
        let logits: Vec<f32> = (0..n).map(|i| -0.37 * (i % 7) as f32).collect();
        // Exact: each residue class k has its count of exp(x_k) terms (x_k as the f32 it is stored as).
        let mut exact = 0.0f64;
        for k in 0..7 {
            let count = (0..n).filter(|i| i % 7 == k).count() as f64;
            exact += count * ((-0.37f32 * k as f32) as f64).exp();
        }
        let exact = exact.ln();
        let ours = logsumexp(&logits);
        assert!((ours - exact).abs() < 1e-9, "f64 lse {ours} vs {exact}");
        let f32_sum: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((f32_sum.ln() as f64 - exact).abs() > 1e-6, "the fixture must expose an f32 sum's drift");
    }
}
