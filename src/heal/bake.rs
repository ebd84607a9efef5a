//! Gated bake and history: `W ← W + Σ c_i (α_i/r_i) B_i A_i` over kept rounds (a gate of 0 leaves W bit-for-bit
//! untouched, so all gates at 0 is the pristine base), and loading a base model with every kept round re-applied
//! as a gated adapter rather than merged, so any round can later be un-baked (gate 0 or detach) or forked from.

use super::adapter::{self, LoraAdapter};
use super::peft;
use crate::error::{Error, Result};
use crate::model::{load_model, LoadedModel, Model};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One kept round: its adapter directory (PEFT layout) and the gate it is applied at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Adapter directory.
    pub dir: PathBuf,
    /// Gate c (1 = as trained, 0 = off).
    pub gate: f64,
}

/// Load every entry's adapter and attach it to `model` at its gate, in order. An adapter whose name is already
/// attached gets a `-N` suffix so rounds from different runs can be stacked. Returns the adapters as attached.
pub fn attach_history(model: &mut Model, entries: &[HistoryEntry]) -> Result<Vec<LoraAdapter>> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if !e.gate.is_finite() {
            return Err(Error::invalid(format!(
                "gate {} for {} is not a finite number",
                e.gate,
                e.dir.display()
            )));
        }
        let (mut ad, _) = peft::load_peft(&e.dir)?;
        let names = adapter::adapter_names(model);
        if names.contains(&ad.name) {
            let base = ad.name.clone();
            let mut i = 2;
            while names.contains(&format!("{base}-{i}")) {
                i += 1;
            }
            ad.name = format!("{base}-{i}");
        }
        ad.attach(model, e.gate).map_err(|err| Error::bad_file(&e.dir, err))?;
        out.push(ad);
    }
    Ok(out)
}

/// Load a base model (directory or GGUF) and re-apply the kept rounds as gated adapters (not merged).
pub fn load_with_history(
    path: &Path,
    dtype: Option<DType>,
    dev: &Device,
    entries: &[HistoryEntry],
) -> Result<LoadedModel> {
    let mut lm = load_model(path, dtype, dev)?;
    attach_history(&mut lm.model, entries)?;
    Ok(lm)
}

/// Fold every attached adapter into its base weight at its current gate and drop the adapters. Adapters at gate 0
/// are skipped, so the weights stay exactly as they were.
pub fn merge_attached(model: &mut Model) -> Result<()> {
    model.merge_adapters()
}

/// Gated bake: attach each `(adapter, gate)` and merge everything attached into the weights.
pub fn bake(model: &mut Model, rounds: &[(LoraAdapter, f64)]) -> Result<()> {
    for (ad, gate) in rounds {
        ad.attach(model, *gate)?;
    }
    merge_attached(model)
}
