//! Extraction: the mean-difference persona vector (residual after each chosen block, read at the last prompt
//! token of `chat(system = persona, user = context)` with the generation prompt), batched with left padding;
//! plus the norm-matched random control.

use super::persona::Persona;
use super::vector::{
    arch_hint, now_rfc3339, tool_version, HookSite, Method, Normalization, Operation, PersonaRef,
    ReadPosition, SteerVector, VectorMeta, VECTOR_FORMAT,
};
use crate::error::{Error, Result};
use crate::model::generate::left_pad;
use crate::model::{Adapters, CapturePositions, Forward, Hooks, LoadedModel, LogitsAt, Path};
use crate::progress::Progress;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr_free::standard_normal;
use std::collections::BTreeMap;

/// Options of an extraction.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    /// 0-based blocks to read (default: the 0.45–0.55 depth band).
    pub layers: Vec<usize>,
    /// Use only the first n contexts (None: all).
    pub n_pairs: Option<usize>,
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// L2-normalise each layer's direction.
    pub normalize: bool,
}

impl ExtractConfig {
    /// Defaults for a model: the 0.45–0.55 band, all contexts, batches of 8, raw (unnormalised) directions.
    pub fn for_model(lm: &LoadedModel) -> Self {
        ExtractConfig {
            layers: lm.model.cfg.layer_band(0.45, 0.55),
            n_pairs: None,
            batch_size: 8,
            normalize: false,
        }
    }
}

/// Progress through the batches of both personas.
struct Tally<'a> {
    progress: &'a mut dyn Progress,
    done: u64,
    total: u64,
}

/// Sum of the residual after each layer at the last token of each text, per layer (f32, CPU).
fn sum_last_token_residuals(
    lm: &LoadedModel,
    texts: &[String],
    layers: &[usize],
    batch_size: usize,
    tally: &mut Tally,
    label: &str,
    sel: Adapters,
) -> Result<BTreeMap<usize, Tensor>> {
    let h = lm.model.cfg.hidden_size;
    let mut sums: BTreeMap<usize, Tensor> = BTreeMap::new();
    for l in layers {
        sums.insert(*l, Tensor::zeros(h, DType::F32, &Device::Cpu)?);
    }
    let hooks = Hooks::capture(layers.to_vec(), CapturePositions::Last);
    for chunk in texts.chunks(batch_size.max(1)) {
        if tally.progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let ids: Vec<Vec<u32>> = chunk.iter().map(|t| lm.tokenizer.encode(t)).collect::<Result<_>>()?;
        if ids.iter().any(Vec::is_empty) {
            return Err(Error::invalid("a rendered extraction prompt tokenised to nothing"));
        }
        let (flat, t, pad) = left_pad(&ids, lm.tokenizer.pad_id);
        let x = Tensor::from_vec(flat, (chunk.len(), t), lm.model.device())?;
        let pad_arg: Vec<usize> = if pad.iter().any(|p| *p > 0) { pad } else { vec![] };
        let f = Forward {
            hooks: &hooks,
            pad: &pad_arg,
            logits: LogitsAt::None,
            path: Path::Inference,
            adapters: sel,
        };
        let out = lm.model.forward(&x, None, &f)?;
        for l in layers {
            let got = out
                .hidden
                .get(l)
                .ok_or_else(|| Error::invalid(format!("layer {l} was not captured")))?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .sum(0)?;
            let s = sums.get_mut(l).ok_or_else(|| Error::invalid("capture bookkeeping"))?;
            *s = (&*s + got)?;
        }
        tally.done += 1;
        tally.progress.step(tally.done, tally.total, label);
    }
    Ok(sums)
}

/// Mean residual after each layer at the last token of each text (batched with left padding; f32, CPU), with the
/// adapters `sel` picks — the read extraction uses, shared with the rounds loop's student-shift measurement.
pub fn mean_last_token_residuals(
    lm: &LoadedModel,
    texts: &[String],
    layers: &[usize],
    batch_size: usize,
    sel: Adapters,
) -> Result<BTreeMap<usize, Tensor>> {
    let mut silent = crate::progress::Silent::default();
    let total = texts.len().div_ceil(batch_size.max(1)) as u64;
    let mut tally = Tally { progress: &mut silent, done: 0, total };
    let sums = sum_last_token_residuals(lm, texts, layers, batch_size, &mut tally, "residuals", sel)?;
    let n = texts.len().max(1) as f64;
    sums.into_iter().map(|(l, s)| Ok((l, (s / n)?))).collect()
}

/// Render each context under a system prompt with the generation prompt appended.
fn render_all(lm: &LoadedModel, system: &str, contexts: &[String]) -> Result<Vec<String>> {
    contexts.iter().map(|c| lm.chat.prompt(Some(system), c)).collect()
}

/// Mean-difference vector: mean residual under the positive persona minus under the negative, per layer.
pub fn extract_mean_diff(
    lm: &LoadedModel,
    persona: &Persona,
    cfg: &ExtractConfig,
    progress: &mut dyn Progress,
) -> Result<SteerVector> {
    let n_layers = lm.model.cfg.num_hidden_layers;
    if cfg.layers.is_empty() {
        return Err(Error::invalid("extraction needs at least one layer"));
    }
    if let Some(l) = cfg.layers.iter().find(|l| **l >= n_layers) {
        return Err(Error::invalid(format!(
            "layer {l} is outside the model's {n_layers} blocks (0..{n_layers})"
        )));
    }
    let n = cfg.n_pairs.unwrap_or(persona.spec.contexts.len()).min(persona.spec.contexts.len());
    if n == 0 {
        return Err(Error::invalid("extraction needs at least one context pair"));
    }
    let contexts = &persona.spec.contexts[..n];
    let pos = render_all(lm, &persona.spec.positive, contexts)?;
    let neg = render_all(lm, &persona.spec.negative, contexts)?;
    let bs = cfg.batch_size.max(1);
    let total = 2 * n.div_ceil(bs) as u64;
    progress.step(0, total, "extract");
    let mut tally = Tally { progress, done: 0, total };
    let mut layers = cfg.layers.clone();
    layers.sort();
    layers.dedup();
    // The model as it is: a later round's vector is read from the student that carries the kept rounds.
    let sp =
        sum_last_token_residuals(lm, &pos, &layers, bs, &mut tally, "positive persona", Adapters::AsGated)?;
    let sn =
        sum_last_token_residuals(lm, &neg, &layers, bs, &mut tally, "negative persona", Adapters::AsGated)?;
    let mut directions = BTreeMap::new();
    for l in &layers {
        let (p, q) = match (sp.get(l), sn.get(l)) {
            (Some(p), Some(q)) => (p, q),
            _ => return Err(Error::invalid("capture bookkeeping")),
        };
        let mut v = ((p - q)? / n as f64)?;
        if cfg.normalize {
            let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            v = (v / (norm as f64 + 1e-8))?;
        }
        directions.insert(*l, v);
    }
    let meta = VectorMeta {
        format: VECTOR_FORMAT.into(),
        model: lm.info.clone(),
        arch: arch_hint(lm),
        hidden_size: lm.model.cfg.hidden_size,
        num_layers: n_layers,
        layers: vec![],
        hook: HookSite::ResidualAfterBlock,
        read_position: ReadPosition::LastPromptToken,
        operation: Operation::Add,
        normalization: if cfg.normalize { Normalization::L2 } else { Normalization::None },
        method: Method::MeanDiff,
        n_pairs: n,
        persona: Some(PersonaRef::of(persona)),
        prompt_system: None,
        random_seed: None,
        norms: vec![],
        calibration: None,
        created: now_rfc3339(),
        tool: tool_version(),
    };
    SteerVector::new(directions, meta)
}

/// The random control: a Gaussian direction per layer scaled to the same L2 norm as `like`'s direction.
pub fn random_like(like: &SteerVector, seed: u64) -> Result<SteerVector> {
    if like.directions.is_empty() {
        return Err(Error::invalid("a random control needs a vector with directions to match norms against"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let h = like.meta.hidden_size;
    let mut directions = BTreeMap::new();
    for ((l, _), norm) in like.directions.iter().zip(like.meta.norms.iter()) {
        let g: Vec<f32> = (0..h).map(|_| standard_normal(&mut rng) as f32).collect();
        let gn = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        let v: Vec<f32> = g.iter().map(|x| (*x as f64 / gn * *norm as f64) as f32).collect();
        directions.insert(*l, Tensor::from_vec(v, h, &Device::Cpu)?);
    }
    let mut meta = like.meta.clone();
    meta.method = Method::RandomNormMatched;
    meta.random_seed = Some(seed);
    meta.calibration = None;
    meta.created = now_rfc3339();
    SteerVector::new(directions, meta)
}

/// A standard normal sampler on `rand` alone (Box–Muller), so no extra distribution crate is needed.
mod rand_distr_free {
    use rand::Rng;

    /// One draw from N(0, 1).
    pub fn standard_normal(rng: &mut impl Rng) -> f64 {
        // u1 in (0, 1] keeps ln finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}
