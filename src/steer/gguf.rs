//! llama.cpp control vectors: export a steering vector as GGUF (`general.architecture = controlvector`,
//! f32 tensors `direction.N`, `controlvector.model_hint`, `controlvector.layer_count`) and import one back.
//!
//! Layer numbering: our vector's direction for 0-based block `b` is added to the residual after block `b`
//! (`HookSite::ResidualAfterBlock`). llama.cpp adds `direction.N` to the output of 0-based block `N`: its loader
//! puts `direction.N` in row `N - 1` of the control-vector buffer, `llama_adapter_cvec::apply` copies row `N - 1`
//! to layer `N`'s tensor, and each layer's graph adds the tensor of its own index (`build_cvec(cur, il)`). So
//! block `b` is written as `direction.b`. llama.cpp has no `direction.0` (layer 0 never gets a tensor, and its
//! loader rejects the name), so a vector with a direction for block 0 is refused with an error that says so,
//! rather than exported without it: the file would steer differently from the vector.
//!
//! Our own metadata rides along under `steer_heal.vector` (llama.cpp ignores the extra keys), so a round trip
//! loses nothing, and [`LAYER_CONVENTION_KEY`] = [`LAYER_CONVENTION`] marks the numbering. Files written before
//! that key existed carry `steer_heal.vector` without it and numbered `direction.{b + 1}` (one layer late in
//! llama.cpp); they import to the blocks they were written from. Files without our metadata (llama.cpp's own,
//! repeng's) are read with llama.cpp's numbering: `direction.N` is block `N`.

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

/// Metadata key that names the layer numbering of the `direction.N` tensors.
pub const LAYER_CONVENTION_KEY: &str = "steer_heal.layer_convention";
/// llama.cpp's numbering: `direction.N` is added after 0-based block `N`. The only value we write.
pub const LAYER_CONVENTION: &str = "llama.cpp";

/// How a file numbers its `direction.N` tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// `direction.N` is block `N` (llama.cpp; our files with [`LAYER_CONVENTION`]).
    LlamaCpp,
    /// `direction.N` is block `N - 1` (our files from before [`LAYER_CONVENTION_KEY`]).
    OldPlusOne,
}

/// Serialise a vector as a llama.cpp control-vector GGUF.
pub fn to_gguf_bytes(v: &SteerVector) -> Result<Vec<u8>> {
    if v.directions.is_empty() {
        return Err(Error::invalid("a prompt-only arm has no directions to export as a control vector"));
    }
    if v.directions.contains_key(&0) {
        let others: Vec<usize> = v.directions.keys().copied().filter(|l| *l != 0).collect();
        return Err(Error::invalid(format!(
            "the vector steers block 0, which a llama.cpp control vector cannot: llama.cpp adds `direction.N` after \
             block N and has no `direction.0`; extract the vector without block 0 (its other blocks: {others:?})"
        )));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (l, d) in &v.directions {
        tensors
            .push((format!("direction.{l}"), QTensor::quantize(&d.to_dtype(DType::F32)?, GgmlDType::F32)?));
    }
    let meta_json = serde_json::to_string(&v.meta).map_err(|e| Error::invalid(e.to_string()))?;
    let hint = if v.meta.arch.is_empty() { v.meta.model.id.clone() } else { v.meta.arch.clone() };
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("controlvector".into())),
        ("controlvector.model_hint", Value::String(hint)),
        ("controlvector.layer_count", Value::U32(v.directions.len() as u32)),
        (META_KEY, Value::String(meta_json)),
        (LAYER_CONVENTION_KEY, Value::String(LAYER_CONVENTION.into())),
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

/// Read a llama.cpp control-vector GGUF, the exact inverse of [`export_gguf`]: `direction.N` becomes block `N`,
/// except in files our earlier versions wrote (steer-heal metadata without [`LAYER_CONVENTION_KEY`]), whose
/// `direction.N` was block `N - 1`. Without steer-heal metadata, provenance is filled from `model` when given
/// (else from `controlvector.model_hint`) and the method is recorded as imported.
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
    let numbering = match content.metadata.get(LAYER_CONVENTION_KEY) {
        Some(v) => match v.to_string() {
            Ok(c) if c == LAYER_CONVENTION => Numbering::LlamaCpp,
            Ok(c) => {
                return Err(bad(format!(
                    "`{LAYER_CONVENTION_KEY}` is `{c}`; this version reads `{LAYER_CONVENTION}` only"
                )))
            }
            Err(e) => return Err(bad(format!("`{LAYER_CONVENTION_KEY}` is not a string ({e})"))),
        },
        None if content.metadata.contains_key(META_KEY) => Numbering::OldPlusOne,
        None => Numbering::LlamaCpp,
    };
    let mut directions = BTreeMap::new();
    let mut hidden = None;
    for name in content.tensor_infos.keys() {
        let n: usize = name
            .strip_prefix("direction.")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("unexpected tensor `{name}` (want `direction.N`)")))?;
        if n == 0 {
            return Err(bad(
                "tensor `direction.0`: llama.cpp has no control vector for layer 0 (it adds `direction.N` after \
                 block N, from N = 1)"
                    .into(),
            ));
        }
        let t =
            content.tensor(&mut f, name, &Device::Cpu).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let t = t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
        let h = t.elem_count();
        if *hidden.get_or_insert(h) != h {
            return Err(bad(format!("tensor `{name}` has {h} values, others have {}", hidden.unwrap_or(0))));
        }
        let block = match numbering {
            Numbering::LlamaCpp => n,
            Numbering::OldPlusOne => n - 1,
        };
        directions.insert(block, t);
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

#[cfg(test)]
mod tests {
    use super::*;

    const HIDDEN: usize = 8;
    const BLOCKS: usize = 4;

    /// A vector over `blocks` of a 4-block model of width 8; block b's direction is filled with b + 0.5.
    fn vector(blocks: &[usize]) -> Result<SteerVector> {
        let mut dirs = BTreeMap::new();
        for b in blocks {
            dirs.insert(*b, Tensor::full(*b as f32 + 0.5, HIDDEN, &Device::Cpu)?);
        }
        let meta = VectorMeta {
            format: VECTOR_FORMAT.into(),
            model: ModelInfo { id: "tiny".into(), path: PathBuf::from("tiny"), weights_hash: "h".into() },
            arch: "llama".into(),
            hidden_size: HIDDEN,
            num_layers: BLOCKS,
            layers: vec![],
            hook: HookSite::ResidualAfterBlock,
            read_position: ReadPosition::LastPromptToken,
            operation: Operation::Add,
            normalization: Normalization::None,
            method: Method::MeanDiff,
            n_pairs: 4,
            persona: None,
            prompt_system: None,
            random_seed: None,
            norms: vec![],
            calibration: None,
            created: "2025-01-01T00:00:00+00:00".into(),
            tool: "steer-heal test".into(),
        };
        SteerVector::new(dirs, meta)
    }

    fn read(path: &Path) -> Result<gguf_file::Content> {
        let mut f = std::fs::File::open(path)?;
        Ok(gguf_file::Content::read(&mut f)?)
    }

    fn tensor_names(path: &Path) -> Result<Vec<String>> {
        let mut names: Vec<String> = read(path)?.tensor_infos.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    /// Write a control-vector GGUF by hand: `tensors` as (name, value), plus `metadata`.
    fn write_raw(path: &Path, metadata: &[(&str, Value)], tensors: &[(&str, f32)]) -> Result<()> {
        let mut md = vec![("general.architecture", Value::String("controlvector".into()))];
        md.extend(metadata.iter().map(|(k, v)| (*k, v.clone())));
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let qs: Vec<(&str, QTensor)> = tensors
            .iter()
            .map(|(n, x)| {
                Ok((*n, QTensor::quantize(&Tensor::full(*x, HIDDEN, &Device::Cpu)?, GgmlDType::F32)?))
            })
            .collect::<Result<_>>()?;
        let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }

    fn first_value(v: &SteerVector, block: usize) -> Result<Option<f32>> {
        match v.directions.get(&block) {
            Some(t) => Ok(t.to_vec1::<f32>()?.first().copied()),
            None => Ok(None),
        }
    }

    #[test]
    fn block_b_is_written_as_direction_b_and_round_trips() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cv.gguf");
        let v = vector(&[1, 3])?;
        export_gguf(&v, &path)?;
        assert_eq!(tensor_names(&path)?, vec!["direction.1", "direction.3"]);
        let content = read(&path)?;
        let convention = content.metadata.get(LAYER_CONVENTION_KEY).and_then(|c| c.to_string().ok().cloned());
        assert_eq!(convention.as_deref(), Some(LAYER_CONVENTION));
        assert!(matches!(content.metadata.get("controlvector.layer_count"), Some(Value::U32(2))));
        let back = import_gguf(&path, None)?;
        assert_eq!(back.meta, v.meta);
        assert_eq!(back.meta.layers, vec![1, 3]);
        for b in [1, 3] {
            assert_eq!(back.directions[&b].to_vec1::<f32>()?, v.directions[&b].to_vec1::<f32>()?);
        }
        // The last block is exportable too: llama.cpp has a tensor for every layer but 0.
        export_gguf(&vector(&[BLOCKS - 1])?, &path)?;
        assert_eq!(tensor_names(&path)?, vec![format!("direction.{}", BLOCKS - 1)]);
        Ok(())
    }

    #[test]
    fn block_0_cannot_be_exported() -> Result<()> {
        for blocks in [&[0][..], &[0, 2][..]] {
            let e = to_gguf_bytes(&vector(blocks)?).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("block 0") && e.contains("direction.0"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn files_of_the_old_numbering_import_to_the_blocks_they_came_from() -> Result<()> {
        // What earlier versions wrote: our metadata without the convention key, block b as direction.{b+1}.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("old.gguf");
        let v = vector(&[1, 2])?;
        let meta = serde_json::to_string(&v.meta).map_err(|e| Error::invalid(e.to_string()))?;
        write_raw(&path, &[(META_KEY, Value::String(meta))], &[("direction.2", 1.5), ("direction.3", 2.5)])?;
        let back = import_gguf(&path, None)?;
        assert_eq!(back.meta, v.meta);
        assert_eq!(back.meta.layers, vec![1, 2]);
        assert_eq!(first_value(&back, 1)?, Some(1.5));
        assert_eq!(first_value(&back, 2)?, Some(2.5));
        // Exported again, it is in llama.cpp's numbering.
        let new = dir.path().join("new.gguf");
        export_gguf(&back, &new)?;
        assert_eq!(tensor_names(&new)?, vec!["direction.1", "direction.2"]);
        Ok(())
    }

    #[test]
    fn llama_cpp_files_import_with_direction_n_as_block_n() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("llamacpp.gguf");
        let hint = ("controlvector.model_hint", Value::String("llama".into()));
        write_raw(&path, std::slice::from_ref(&hint), &[("direction.1", 7.0), ("direction.3", 9.0)])?;
        let info = ModelInfo { id: "m".into(), path: PathBuf::from("m"), weights_hash: String::new() };
        let v = import_gguf(&path, Some((&info, BLOCKS)))?;
        assert_eq!(v.meta.method, Method::ImportedGguf);
        assert_eq!(v.meta.layers, vec![1, 3]);
        assert_eq!((first_value(&v, 1)?, first_value(&v, 3)?), (Some(7.0), Some(9.0)));
        // And back out under the same names.
        let out = dir.path().join("again.gguf");
        export_gguf(&v, &out)?;
        assert_eq!(tensor_names(&out)?, vec!["direction.1", "direction.3"]);
        // llama.cpp itself rejects direction.0; a direction past the model's last block cannot be applied.
        write_raw(&path, std::slice::from_ref(&hint), &[("direction.0", 1.0)])?;
        let e = import_gguf(&path, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("direction.0"), "{e}");
        write_raw(&path, &[hint], &[("direction.4", 1.0)])?;
        let e = import_gguf(&path, Some((&info, BLOCKS))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("block 4") && e.contains("4 blocks"), "{e}");
        Ok(())
    }

    #[test]
    fn an_unknown_layer_convention_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("future.gguf");
        write_raw(&path, &[(LAYER_CONVENTION_KEY, Value::String("other".into()))], &[("direction.1", 1.0)])?;
        let e = import_gguf(&path, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(LAYER_CONVENTION_KEY) && e.contains("`other`"), "{e}");
        Ok(())
    }
}
