//! One round's LoRA: the A/B pairs per adapted projection, their initialisation (A Kaiming-uniform with a=√5,
//! B ~ N(1e-4, 1e-4)), attaching them to a model as gated adapters, switching gates, and the trainable form whose
//! tensors are candle `Var`s shared with the attached adapters (so an optimiser update is seen by the next forward).

use crate::error::{Error, Result};
use crate::model::decoder::PROJECTIONS;
use crate::model::{Adapter, LoraLinear, Model};
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

/// Where an adapter pair sits: block index and projection name (one of `decoder::PROJECTIONS`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    /// 0-based block index.
    pub layer: usize,
    /// Projection name, e.g. `q_proj`.
    pub proj: String,
}

impl Site {
    /// A site at `layer`, projection `proj`.
    pub fn new(layer: usize, proj: &str) -> Self {
        Site { layer, proj: proj.to_string() }
    }
    /// `self_attn` or `mlp`: the Hugging Face module that owns the projection.
    pub fn module(&self) -> &'static str {
        if ["gate_proj", "up_proj", "down_proj"].contains(&self.proj.as_str()) {
            "mlp"
        } else {
            "self_attn"
        }
    }
    /// Hugging Face path of the projection, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf_path(&self) -> String {
        format!("model.layers.{}.{}.{}", self.layer, self.module(), self.proj)
    }
}

/// A frozen LoRA adapter for one round: plain tensors, loadable, attachable, bakeable.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Name used inside the model (e.g. `round-2`).
    pub name: String,
    /// Rank r.
    pub r: usize,
    /// α; the adapter adds `gate · (α/r) · B A x`.
    pub alpha: f64,
    /// `(A [r, d_in], B [d_out, r])` per site.
    pub pairs: BTreeMap<Site, (Tensor, Tensor)>,
}

impl LoraAdapter {
    /// `α / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Adapted block indices, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let mut l: Vec<usize> = self.pairs.keys().map(|s| s.layer).collect();
        l.dedup();
        l
    }

    /// Adapted projection names, in `PROJECTIONS` order.
    pub fn targets(&self) -> Vec<String> {
        PROJECTIONS
            .iter()
            .filter(|p| self.pairs.keys().any(|s| s.proj == **p))
            .map(|p| p.to_string())
            .collect()
    }

    /// Check every pair fits the model's projection shapes.
    pub fn check_fits(&self, model: &Model) -> Result<()> {
        for (site, (a, b)) in &self.pairs {
            let lin = projection(model, site)?;
            let want_a = [self.r, lin.in_dim()];
            let want_b = [lin.out_dim(), self.r];
            if a.dims() != want_a || b.dims() != want_b {
                return Err(Error::invalid(format!(
                    "adapter `{}` at {}: A {:?} / B {:?} do not fit the model (need {:?} / {:?})",
                    self.name,
                    site.hf_path(),
                    a.dims(),
                    b.dims(),
                    want_a,
                    want_b
                )));
            }
        }
        Ok(())
    }

    /// Attach as a gated adapter on every site (not merged). Fails if the name is already attached.
    pub fn attach(&self, model: &mut Model, gate: f64) -> Result<()> {
        self.check_fits(model)?;
        if adapter_names(model).contains(&self.name) {
            return Err(Error::invalid(format!("an adapter named `{}` is already attached", self.name)));
        }
        let dtype = model.dtype();
        let dev = model.device().clone();
        for (site, (a, b)) in &self.pairs {
            let lin = projection_mut(model, site)?;
            lin.adapters.push(Adapter {
                name: self.name.clone(),
                a: a.to_dtype(dtype)?.to_device(&dev)?,
                b: b.to_dtype(dtype)?.to_device(&dev)?,
                scale: self.scale(),
                gate,
            });
        }
        Ok(())
    }
}

/// The projection at a site.
pub fn projection<'m>(model: &'m Model, site: &Site) -> Result<&'m LoraLinear> {
    let n = model.layers.len();
    model
        .layers
        .get(site.layer)
        .ok_or_else(|| Error::invalid(format!("layer {} does not exist (the model has {n})", site.layer)))?
        .projection(&site.proj)
        .ok_or_else(|| Error::invalid(format!("unknown projection `{}`", site.proj)))
}

/// The projection at a site, mutably.
pub fn projection_mut<'m>(model: &'m mut Model, site: &Site) -> Result<&'m mut LoraLinear> {
    let n = model.layers.len();
    model
        .layers
        .get_mut(site.layer)
        .ok_or_else(|| Error::invalid(format!("layer {} does not exist (the model has {n})", site.layer)))?
        .projection_mut(&site.proj)
        .ok_or_else(|| Error::invalid(format!("unknown projection `{}`", site.proj)))
}

/// Every LoRA-ready linear of the model (all block projections and the output head), mutably.
fn all_linears_mut(model: &mut Model) -> Vec<&mut LoraLinear> {
    let mut out = Vec::new();
    for block in model.layers.iter_mut() {
        let crate::model::decoder::Block { attn, mlp, .. } = block;
        out.extend([&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj, &mut attn.o_proj]);
        out.extend([&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.down_proj]);
    }
    if let Some(h) = model.lm_head.as_mut() {
        out.push(h);
    }
    out
}

/// Names of the adapters attached anywhere in the model, in first-seen order.
pub fn adapter_names(model: &Model) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for block in &model.layers {
        for p in PROJECTIONS {
            if let Some(l) = block.projection(p) {
                for ad in &l.adapters {
                    if !names.contains(&ad.name) {
                        names.push(ad.name.clone());
                    }
                }
            }
        }
    }
    names
}

/// Set the gate of every adapter named `name`; returns how many were changed.
pub fn set_gate(model: &mut Model, name: &str, gate: f64) -> usize {
    let mut n = 0;
    for lin in all_linears_mut(model) {
        for ad in lin.adapters.iter_mut().filter(|a| a.name == name) {
            ad.gate = gate;
            n += 1;
        }
    }
    n
}

/// Make the attached adapter `name` a constant of the model: its tensors stop being training variables. A
/// trained adapter left as variables makes every later forward (eval, generation, measuring) build and keep an
/// autograd graph — through the KV cache, for the whole of a decode — which costs time and, with a few rounds'
/// adapters, tens of GB. The storage is shared, so the values are unchanged. Returns how many projections it
/// touched.
pub fn freeze(model: &mut Model, name: &str) -> usize {
    let mut n = 0;
    for lin in all_linears_mut(model) {
        for ad in lin.adapters.iter_mut().filter(|a| a.name == name) {
            ad.a = ad.a.detach();
            ad.b = ad.b.detach();
            n += 1;
        }
    }
    n
}

/// Current gate of each attached adapter name (the first occurrence's).
pub fn gates(model: &Model) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for block in &model.layers {
        for p in PROJECTIONS {
            if let Some(l) = block.projection(p) {
                for ad in &l.adapters {
                    out.entry(ad.name.clone()).or_insert(ad.gate);
                }
            }
        }
    }
    out
}

/// Remove every adapter named `name` from the model (un-attach a round); returns how many were removed.
pub fn detach(model: &mut Model, name: &str) -> usize {
    let mut n = 0;
    for lin in all_linears_mut(model) {
        let before = lin.adapters.len();
        lin.adapters.retain(|a| a.name != name);
        n += before - lin.adapters.len();
    }
    n
}

/// Read one attached adapter back out of the model as a frozen `LoraAdapter` (tensors detached, on CPU, f32).
pub fn extract(model: &Model, name: &str) -> Result<LoraAdapter> {
    let mut pairs = BTreeMap::new();
    let mut shape: Option<(usize, f64)> = None;
    for (li, block) in model.layers.iter().enumerate() {
        for p in PROJECTIONS {
            let Some(l) = block.projection(p) else { continue };
            for ad in l.adapters.iter().filter(|a| a.name == name) {
                let r = ad.a.dim(0)?;
                shape.get_or_insert((r, ad.scale));
                pairs.insert(
                    Site::new(li, p),
                    (
                        ad.a.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                        ad.b.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                    ),
                );
            }
        }
    }
    let (r, scale) = shape.ok_or_else(|| Error::invalid(format!("no adapter named `{name}` is attached")))?;
    Ok(LoraAdapter { name: name.to_string(), r, alpha: scale * r as f64, pairs })
}

/// Standard normal samples by Box–Muller (rand 0.9 ships no normal distribution without `rand_distr`).
fn normal(rng: &mut StdRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let rad = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((mean + std * rad * th.cos()) as f32);
        if out.len() < n {
            out.push((mean + std * rad * th.sin()) as f32);
        }
    }
    out
}

/// A LoRA being trained: `Var`s for every A and B, attached to the model under `name`.
pub struct TrainableLora {
    /// Name inside the model.
    pub name: String,
    /// Rank.
    pub r: usize,
    /// α.
    pub alpha: f64,
    /// `(A, B)` variables per site.
    pub vars: BTreeMap<Site, (Var, Var)>,
}

impl TrainableLora {
    /// Fresh adapter over `layers × targets`, initialised from `seed`: A ~ U(±1/√d_in) (PyTorch's
    /// `kaiming_uniform_(a=√5)`), B ~ N(1e-4, 1e-4) so the ±c gate directions differ from the start.
    pub fn init(
        model: &Model,
        name: &str,
        layers: &[usize],
        targets: &[String],
        r: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let dev = model.device().clone();
        // f32 whatever the base's dtype: a bf16 A/B would lose most AdamW updates of lr 1e-4 to rounding.
        let dtype = DType::F32;
        let mut vars = BTreeMap::new();
        for &layer in layers {
            for proj in PROJECTIONS.iter().filter(|p| targets.iter().any(|t| t == *p)) {
                let site = Site::new(layer, proj);
                let lin = projection(model, &site)?;
                let (d_in, d_out) = (lin.in_dim(), lin.out_dim());
                let bound = 1.0 / (d_in as f64).sqrt();
                let a: Vec<f32> = (0..r * d_in).map(|_| rng.random_range(-bound..bound) as f32).collect();
                let b = normal(&mut rng, d_out * r, 1e-4, 1e-4);
                let a = Tensor::from_vec(a, (r, d_in), &dev)?.to_dtype(dtype)?;
                let b = Tensor::from_vec(b, (d_out, r), &dev)?.to_dtype(dtype)?;
                vars.insert(site, (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        if vars.is_empty() {
            return Err(Error::invalid("the heal config selects no projection to adapt"));
        }
        Ok(TrainableLora { name: name.to_string(), r, alpha, vars })
    }

    /// Attach to the model at `gate`, sharing the `Var` storage (so updates are live).
    pub fn attach(&self, model: &mut Model, gate: f64) -> Result<()> {
        if adapter_names(model).contains(&self.name) {
            return Err(Error::invalid(format!("an adapter named `{}` is already attached", self.name)));
        }
        for (site, (a, b)) in &self.vars {
            let lin = projection_mut(model, site)?;
            lin.adapters.push(Adapter {
                name: self.name.clone(),
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: self.alpha / self.r as f64,
                gate,
            });
        }
        Ok(())
    }

    /// Every variable with a stable name (`<layer>.<proj>.lora_A` / `.lora_B`), in a fixed order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::with_capacity(self.vars.len() * 2);
        for (site, (a, b)) in &self.vars {
            out.push((format!("{}.lora_A", site.hf_path()), a));
            out.push((format!("{}.lora_B", site.hf_path()), b));
        }
        out
    }

    /// A frozen copy (detached f32 CPU tensors).
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut pairs = BTreeMap::new();
        for (site, (a, b)) in &self.vars {
            pairs.insert(
                site.clone(),
                (
                    a.as_detached_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                    b.as_detached_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
                ),
            );
        }
        Ok(LoraAdapter { name: self.name.clone(), r: self.r, alpha: self.alpha, pairs })
    }

    /// Overwrite every variable from a frozen adapter of the same layout (resume from a checkpoint).
    pub fn load_from(&self, ad: &LoraAdapter) -> Result<()> {
        for (site, (a, b)) in &self.vars {
            let (sa, sb) = ad.pairs.get(site).ok_or_else(|| {
                Error::invalid(format!("checkpoint has no adapter weights for {}", site.hf_path()))
            })?;
            if sa.dims() != a.dims() || sb.dims() != b.dims() {
                return Err(Error::invalid(format!(
                    "checkpoint adapter at {} has shapes {:?}/{:?}, the run needs {:?}/{:?}",
                    site.hf_path(),
                    sa.dims(),
                    sb.dims(),
                    a.dims(),
                    b.dims()
                )));
            }
            a.set(&sa.to_dtype(a.dtype())?.to_device(a.device())?)?;
            b.set(&sb.to_dtype(b.dtype())?.to_device(b.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_muller_has_the_asked_moments() {
        let mut rng = StdRng::seed_from_u64(1);
        let v = normal(&mut rng, 20000, 1e-4, 1e-4);
        let m = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (*x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((m - 1e-4).abs() < 3e-6, "mean {m}");
        assert!((s - 1e-4).abs() < 3e-6, "std {s}");
    }

    #[test]
    fn sites_name_hf_modules() {
        assert_eq!(Site::new(3, "q_proj").hf_path(), "model.layers.3.self_attn.q_proj");
        assert_eq!(Site::new(0, "down_proj").hf_path(), "model.layers.0.mlp.down_proj");
    }
}
