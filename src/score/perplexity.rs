//! Base-model scores that need the network: per-token negative log-likelihood of a completion under the base
//! (unsteered) model, its tail perplexity, and persona strength (projection of hidden states on the vector).
//!
//! `ppl_tail = exp(mean of nll over the last ⌈f·n⌉ tokens)`, f = 0.25 by default: the tail is where steering
//! drift shows, and the first tokens are often generic.
//! `strength = mean over vector layers L of mean over completion positions t of ⟨h_L,t, v_L⟩ / ‖v_L‖`.

use crate::error::{Error, Result};
use crate::model::generate::log_softmax;
use crate::model::{CapturePositions, Forward, Hooks, LoadedModel, LogitsAt, Path};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// The one tail-perplexity function (the walk-down's coherence filter uses it too).
pub use crate::steer::kl::tail_perplexity;

/// What one teacher-forced pass of the base model over prompt + completion gives.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherForced {
    /// NLL of each completion token under the base model, nats.
    pub nll: Vec<f32>,
    /// Persona strength, when vectors were given.
    pub persona_strength: Option<f64>,
}

/// Token ids of the rendered chat prompt (system + user, ending at the assistant header).
pub fn prompt_ids(lm: &LoadedModel, system: &str, prompt: &str) -> Result<Vec<u32>> {
    let sys = if system.is_empty() { None } else { Some(system) };
    let text = lm.chat.prompt(sys, prompt)?;
    lm.tokenizer.encode(&text)
}

/// Mean projection of the rows of `hidden` `[t, h]` on the unit direction of `v` `[h]`.
pub fn mean_projection(hidden: &Tensor, v: &Tensor) -> Result<f64> {
    let v = v.to_dtype(DType::F32)?.flatten_all()?;
    let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if norm <= 0.0 || !norm.is_finite() {
        return Err(Error::invalid("persona vector has zero or non-finite norm"));
    }
    let h = hidden.to_dtype(DType::F32)?;
    let mean = h.mean(0)?; // mean of dot products == dot product with the mean row
    let dot = (mean * &v)?.sum_all()?.to_scalar::<f32>()?;
    Ok(dot as f64 / norm as f64)
}

/// Teacher-force `tokens` after the rendered prompt through the base model (no steering): per-token NLL and,
/// when `vectors` is given, the persona strength over the completion positions.
pub fn teacher_force(
    lm: &LoadedModel,
    system: &str,
    prompt: &str,
    tokens: &[u32],
    vectors: Option<&BTreeMap<usize, Tensor>>,
) -> Result<TeacherForced> {
    if tokens.is_empty() {
        return Ok(TeacherForced { nll: vec![], persona_strength: None });
    }
    let p = prompt_ids(lm, system, prompt)?;
    let np = p.len();
    let mut ids = p;
    ids.extend_from_slice(tokens);
    let n_layers = lm.model.cfg.num_hidden_layers;
    let hooks = match vectors {
        Some(vs) => {
            if let Some(bad) = vs.keys().find(|l| **l >= n_layers) {
                return Err(Error::invalid(format!(
                    "persona vector names layer {bad}, the model has {n_layers} layers"
                )));
            }
            Hooks::capture(vs.keys().copied().collect(), CapturePositions::All)
        }
        None => Hooks::none(),
    };
    let x = Tensor::new(ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::All,
        path: Path::Inference,
        adapters: crate::model::Adapters::AsGated,
    };
    let out = lm.model.forward(&x, None, &f)?;
    let logits = out.logits.ok_or_else(|| Error::invalid("forward returned no logits"))?;
    // Logits at position i predict token i + 1: completion token j is predicted at np - 1 + j.
    let rows: Vec<Vec<f32>> =
        logits.squeeze(0)?.narrow(0, np - 1, tokens.len())?.to_dtype(DType::F32)?.to_vec2()?;
    let nll = rows.iter().zip(tokens).map(|(row, t)| -log_softmax(row)[*t as usize]).collect();
    let persona_strength = match vectors {
        Some(vs) if !vs.is_empty() => {
            let mut total = 0.0;
            for (layer, v) in vs {
                let h = out
                    .hidden
                    .get(layer)
                    .ok_or_else(|| Error::invalid(format!("no hidden state captured at layer {layer}")))?;
                let h = h.squeeze(0)?.narrow(0, np, tokens.len())?;
                total += mean_projection(&h, v)?;
            }
            Some(total / vs.len() as f64)
        }
        _ => None,
    };
    Ok(TeacherForced { nll, persona_strength })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tail_perplexity_by_hand() {
        // 8 tokens, tail = last 2: mean(2, 4) = 3 → e³
        let p = tail_perplexity(&[1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 4.0], 0.25).unwrap_or(0.0);
        assert!((p - 3f64.exp()).abs() < 1e-9, "{p}");
        // 3 tokens: ceil(0.75) = 1 → last token only
        let p = tail_perplexity(&[9.0, 9.0, 0.0], 0.25).unwrap_or(-1.0);
        assert!((p - 1.0).abs() < 1e-12);
        assert_eq!(tail_perplexity(&[], 0.25), None);
    }

    #[test]
    fn projection_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        // rows (1,2) and (3,4): mean (2,3); v = (3,4)/5 → (6 + 12) / 5 = 3.6
        let h = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let v = Tensor::new(&[3f32, 4.0], &dev)?;
        assert!((mean_projection(&h, &v)? - 3.6).abs() < 1e-6);
        let zero = Tensor::new(&[0f32, 0.0], &dev)?;
        assert!(mean_projection(&h, &zero).is_err());
        Ok(())
    }
}
