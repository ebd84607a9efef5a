//! Adapters on disk in Hugging Face PEFT's layout, so a Python user can `PeftModel.from_pretrained(base, dir)`:
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight` (A `[r, d_in]`, B `[d_out, r]`)
//! and `adapter_config.json` with PEFT's `LoraConfig` keys. Our own facts (adapter name, round, gate, base model
//! fingerprint) go in a separate `steer_heal_adapter.json` that PEFT never reads.

use super::adapter::{LoraAdapter, Site};
use super::st_io;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write_json;
use crate::model::decoder::PROJECTIONS;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// File name of the PEFT weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the PEFT config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of our side-car metadata.
pub const META_FILE: &str = "steer_heal_adapter.json";

/// What we record beside the PEFT files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// Schema version of this file.
    pub schema_version: u32,
    /// Adapter name inside the model (`round-N`).
    pub name: String,
    /// Round the adapter was trained in.
    pub round: Option<usize>,
    /// Gate to apply it at by default (1 = as trained).
    pub default_gate: f64,
    /// Base model id the adapter was trained on.
    pub base_model: String,
    /// Fingerprint of the base weights.
    pub base_weights_hash: Option<String>,
}

/// The PEFT tensor name of one half of a pair.
pub fn tensor_name(site: &Site, half: char) -> String {
    format!("base_model.model.{}.lora_{half}.weight", site.hf_path())
}

/// PEFT `target_modules`: a plain list when the adapter covers every target in every listed layer (then
/// `layers_to_transform` restricts it), otherwise a regex that `re.fullmatch`es exactly the adapted modules.
fn target_modules(ad: &LoraAdapter) -> (Value, Option<Vec<usize>>) {
    let targets = ad.targets();
    let layers = ad.layers();
    let full = layers.iter().all(|l| targets.iter().all(|t| ad.pairs.contains_key(&Site::new(*l, t))));
    if full {
        (json!(targets), Some(layers))
    } else {
        let alts: Vec<String> = ad.pairs.keys().map(|s| s.hf_path().replace('.', "\\.")).collect();
        (Value::String(format!("^({})$", alts.join("|"))), None)
    }
}

/// The `adapter_config.json` PEFT writes for a LoRA, with our adapter's values.
pub fn peft_config(ad: &LoraAdapter, base_model_name_or_path: &str) -> Value {
    let (targets, layers) = target_modules(ad);
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": if layers.is_some() { json!("layers") } else { Value::Null },
        "layers_to_transform": layers,
        "loftq_config": {},
        // PEFT writes an integer α; keep ours integral when it is.
        "lora_alpha": if ad.alpha.fract() == 0.0 && ad.alpha.abs() < 1e15 { json!(ad.alpha as i64) } else { json!(ad.alpha) },
        "lora_dropout": 0.0,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": ad.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    })
}

/// Write `ad` to `dir` in PEFT layout (plus our side-car), each file atomically.
pub fn save_peft(ad: &LoraAdapter, dir: &Path, meta: &AdapterMeta) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
    let mut tensors = BTreeMap::new();
    for (site, (a, b)) in &ad.pairs {
        tensors.insert(tensor_name(site, 'A'), a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        tensors.insert(tensor_name(site, 'B'), b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    st_io::save(&dir.join(WEIGHTS_FILE), &tensors, &md)?;
    atomic_write_json(&dir.join(CONFIG_FILE), &peft_config(ad, &meta.base_model))?;
    atomic_write_json(&dir.join(META_FILE), meta)?;
    Ok(())
}

/// Parse a PEFT tensor name into its site and half (`'A'` or `'B'`).
pub fn parse_tensor_name(name: &str) -> Option<(Site, char)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, rest) = rest.split_once('.')?;
    let (proj, rest) = rest.split_once('.')?;
    if !PROJECTIONS.contains(&proj) {
        return None;
    }
    let site = Site::new(layer, proj);
    if site.module() != module {
        return None;
    }
    let half = match rest {
        "lora_A.weight" | "lora_A.default.weight" => 'A',
        "lora_B.weight" | "lora_B.default.weight" => 'B',
        _ => return None,
    };
    Some((site, half))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::MissingFile { path: path.to_path_buf(), what: "PEFT file".into() }
        }
        _ => Error::bad_file(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))
}

/// Read a PEFT LoRA directory (ours or one written by Python's peft) into a frozen adapter.
/// Supports plain LoRA and rsLoRA scaling; DoRA, per-module rank/alpha patterns and `fan_in_fan_out` are refused
/// with a clear error.
pub fn load_peft(dir: &Path) -> Result<(LoraAdapter, Option<AdapterMeta>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = read_json(&cfg_path)?;
    let bad = |m: String| Error::bad_file(&cfg_path, m);
    match cfg.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(bad(format!("peft_type is {other:?}, only LORA adapters are supported"))),
    }
    let r = cfg
        .get("r")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("missing or bad `r`".into()))? as usize;
    let alpha = cfg
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing or bad `lora_alpha`".into()))?;
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(bad("DoRA adapters (use_dora) are not supported".into()));
    }
    if flag("fan_in_fan_out") {
        return Err(bad("fan_in_fan_out adapters (Conv1D models) are not supported".into()));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if cfg.get(k).and_then(Value::as_object).map(|m| !m.is_empty()).unwrap_or(false) {
            return Err(bad(format!("per-module `{k}` is not supported")));
        }
    }
    // rsLoRA scales by α/√r; store an α that gives the same α/r scale.
    let alpha = if flag("use_rslora") { alpha * (r as f64).sqrt() } else { alpha };
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        return Err(Error::MissingFile { path: wpath, what: "PEFT adapter weights".into() });
    }
    let (tensors, _) = st_io::load(&wpath, &Device::Cpu)?;
    let mut halves: BTreeMap<Site, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let (site, half) = parse_tensor_name(&name).ok_or_else(|| {
            Error::bad_file(&wpath, format!("tensor `{name}` is not a LoRA A/B of a decoder projection"))
        })?;
        let slot = halves.entry(site).or_default();
        let t = t.to_dtype(DType::F32)?;
        if half == 'A' {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let mut pairs = BTreeMap::new();
    for (site, (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::bad_file(
                &wpath,
                format!("{} has only one of lora_A / lora_B", site.hf_path()),
            ));
        };
        if a.rank() != 2 || b.rank() != 2 || a.dim(0)? != r || b.dim(1)? != r {
            return Err(Error::bad_file(
                &wpath,
                format!("{}: A {:?} / B {:?} do not have rank r = {r}", site.hf_path(), a.dims(), b.dims()),
            ));
        }
        pairs.insert(site, (a, b));
    }
    if pairs.is_empty() {
        return Err(Error::bad_file(&wpath, "no LoRA tensors"));
    }
    let meta_path = dir.join(META_FILE);
    let meta: Option<AdapterMeta> = if meta_path.exists() {
        Some(
            serde_json::from_value(read_json(&meta_path)?)
                .map_err(|e| Error::bad_file(&meta_path, format!("not adapter metadata: {e}")))?,
        )
    } else {
        None
    };
    let name = meta.as_ref().map(|m| m.name.clone()).unwrap_or_else(|| {
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into())
    });
    Ok((LoraAdapter { name, r, alpha, pairs }, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = Site::new(12, "gate_proj");
        let n = tensor_name(&s, 'B');
        assert_eq!(n, "base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight");
        assert_eq!(parse_tensor_name(&n), Some((s, 'B')));
        assert_eq!(parse_tensor_name("base_model.model.model.layers.1.mlp.q_proj.lora_A.weight"), None);
        assert_eq!(parse_tensor_name("base_model.model.lm_head.lora_A.weight"), None);
    }
}
