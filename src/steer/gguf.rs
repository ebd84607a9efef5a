//! llama.cpp control vectors: export a steering vector as GGUF (`general.architecture = controlvector`,
//! f32 tensors `direction.N` with N = block index + 1 as llama.cpp counts, `controlvector.model_hint`,
//! `controlvector.layer_count`) and import one back. Our own metadata rides along under `steer_heal.vector`
//! so a round trip loses nothing; llama.cpp ignores the extra key.

use super::vector::{
    now_rfc3339, tool_version, HookSite, Method, Normalization, Operation, ReadPosition, SteerVector,
    VectorMeta, META_KEY, VECTOR_FORMAT,
};
use crate::error::{Error, Result};
use crate::model::ModelInfo;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Serialise a vector as a llama.cpp control-vector GGUF.
pub fn to_gguf_bytes(v: &SteerVector) -> Result<Vec<u8>> {
    if v.directions.is_empty() {
        return Err(Error::invalid("a prompt-only arm has no directions to export as a control vector"));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (l, d) in &v.directions {
        tensors.push((
            format!("direction.{}", l + 1),
            QTensor::quantize(&d.to_dtype(DType::F32)?, GgmlDType::F32)?,
        ));
    }
    let meta_json = serde_json::to_string(&v.meta).map_err(|e| Error::invalid(e.to_string()))?;
    let hint = if v.meta.arch.is_empty() { v.meta.model.id.clone() } else { v.meta.arch.clone() };
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("controlvector".into())),
        ("controlvector.model_hint", Value::String(hint)),
        ("controlvector.layer_count", Value::U32(v.directions.len() as u32)),
        (META_KEY, Value::String(meta_json)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut cur = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut cur, &md_refs, &t_refs)?;
    Ok(cur.into_inner())
}

/// Write a control-vector GGUF atomically.
pub fn export_gguf(v: &SteerVector, path: &Path) -> Result<()> {
    crate::fsutil::atomic_write(path, &to_gguf_bytes(v)?)
}

/// Read a llama.cpp control-vector GGUF. Without steer-heal metadata, provenance is filled from `model`
/// when given (else from `controlvector.model_hint`) and the method is recorded as imported.
pub fn import_gguf(path: &Path, model: Option<(&ModelInfo, usize)>) -> Result<SteerVector> {
    let bad = |why: String| Error::bad_file(path, why);
    let mut f = std::fs::File::open(path).map_err(|e| Error::bad_file(path, e))?;
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| bad(format!("not a readable GGUF file ({e})")))?;
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok().cloned());
    if arch.as_deref() != Some("controlvector") {
        return Err(bad(format!(
            "general.architecture is {}, not `controlvector`",
            arch.map(|a| format!("`{a}`")).unwrap_or_else(|| "missing".into())
        )));
    }
    let mut directions = BTreeMap::new();
    let mut hidden = None;
    for name in content.tensor_infos.keys() {
        let n: usize = name
            .strip_prefix("direction.")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("unexpected tensor `{name}` (want `direction.N`)")))?;
        if n == 0 {
            return Err(bad("tensor `direction.0`: llama.cpp counts control-vector layers from 1".into()));
        }
        let t =
            content.tensor(&mut f, name, &Device::Cpu).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let t = t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
        let h = t.elem_count();
        if *hidden.get_or_insert(h) != h {
            return Err(bad(format!("tensor `{name}` has {h} values, others have {}", hidden.unwrap_or(0))));
        }
        directions.insert(n - 1, t);
    }
    let hidden = hidden.ok_or_else(|| bad("no `direction.N` tensors".into()))?;
    let layers: Vec<usize> = directions.keys().copied().collect();
    let ours = match content.metadata.get(META_KEY) {
        Some(v) => {
            let json = v.to_string().map_err(|e| bad(format!("`{META_KEY}` is not a string ({e})")))?;
            let meta: VectorMeta =
                serde_json::from_str(json).map_err(|e| bad(format!("`{META_KEY}` is not valid: {e}")))?;
            if meta.hidden_size != hidden || meta.layers != layers {
                return Err(bad(format!(
                    "`{META_KEY}` says layers {:?} of width {}, tensors hold layers {layers:?} of width {hidden}",
                    meta.layers, meta.hidden_size
                )));
            }
            Some(meta)
        }
        None => None,
    };
    let meta = match ours {
        Some(m) => m,
        None => {
            let hint = content
                .metadata
                .get("controlvector.model_hint")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_default();
            let max_layer = layers.last().copied().unwrap_or(0);
            let (info, num_layers) = match model {
                Some((info, n)) => (info.clone(), n),
                None => (
                    ModelInfo { id: hint.clone(), path: PathBuf::new(), weights_hash: String::new() },
                    max_layer + 1,
                ),
            };
            if max_layer >= num_layers {
                return Err(bad(format!(
                    "direction for block {max_layer} but the model has {num_layers} blocks"
                )));
            }
            VectorMeta {
                format: VECTOR_FORMAT.into(),
                model: info,
                arch: hint,
                hidden_size: hidden,
                num_layers,
                layers: vec![],
                hook: HookSite::ResidualAfterBlock,
                read_position: ReadPosition::LastPromptToken,
                operation: Operation::Add,
                normalization: Normalization::None,
                method: Method::ImportedGguf,
                n_pairs: 0,
                persona: None,
                prompt_system: None,
                random_seed: None,
                norms: vec![],
                calibration: None,
                created: now_rfc3339(),
                tool: tool_version(),
            }
        }
    };
    let dirs: BTreeMap<usize, Tensor> = directions;
    SteerVector::new(dirs, meta)
}
