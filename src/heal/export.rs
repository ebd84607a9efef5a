//! The merged model as a Hugging Face directory our own loader (and transformers) can read: every attached
//! adapter folded in at its gate (the model in memory is left as it is), `config.json` from
//! `ModelConfig::to_hf_value`, `generation_config.json`, and the tokenizer files: copied from the source directory
//! when there is one, otherwise rebuilt from the loaded tokenizer and chat template (GGUF sources).

use super::adapter;
use super::st_io;
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write, atomic_write_json};
use crate::model::decoder::PROJECTIONS;
use crate::model::{LoadedModel, Model};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Tokenizer-side files copied verbatim from a source model directory when present.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
];

/// Every weight of the model under its Hugging Face name, adapters merged at their gates, RMSNorm weights
/// stored as the checkpoint stores them (Gemma's `1 + w` unfolded).
pub fn merged_tensors(model: &Model) -> Result<BTreeMap<String, Tensor>> {
    let cfg = &model.cfg;
    let unfold =
        |t: &Tensor| -> Result<Tensor> { Ok(if cfg.norm_plus_one() { (t - 1.0)? } else { t.clone() }) };
    let mut out = BTreeMap::new();
    out.insert("model.embed_tokens.weight".to_string(), model.embed_tokens.clone());
    for (i, block) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for proj in PROJECTIONS {
            let site = adapter::Site::new(i, proj);
            let lin = adapter::projection(model, &site)?;
            out.insert(format!("{}.weight", site.hf_path()), lin.merged_weight()?.detach());
            if let Some(b) = &lin.bias {
                out.insert(format!("{}.bias", site.hf_path()), b.clone());
            }
        }
        if let Some(n) = &block.attn.q_norm {
            out.insert(format!("{p}.self_attn.q_norm.weight"), unfold(&n.weight)?);
        }
        if let Some(n) = &block.attn.k_norm {
            out.insert(format!("{p}.self_attn.k_norm.weight"), unfold(&n.weight)?);
        }
        out.insert(format!("{p}.input_layernorm.weight"), unfold(&block.input_layernorm.weight)?);
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            unfold(&block.post_attention_layernorm.weight)?,
        );
        if let Some(n) = &block.pre_feedforward_layernorm {
            out.insert(format!("{p}.pre_feedforward_layernorm.weight"), unfold(&n.weight)?);
        }
        if let Some(n) = &block.post_feedforward_layernorm {
            out.insert(format!("{p}.post_feedforward_layernorm.weight"), unfold(&n.weight)?);
        }
    }
    out.insert("model.norm.weight".to_string(), unfold(&model.norm.weight)?);
    if let Some(h) = &model.lm_head {
        out.insert("lm_head.weight".to_string(), h.merged_weight()?.detach());
    }
    Ok(out)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Write the merged model to `out` (created if needed). `provenance` is recorded in `steer_heal_merge.json`.
pub fn export_merged(lm: &LoadedModel, out: &Path, provenance: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::bad_file(out, e))?;
    let model = &lm.model;
    let tensors = merged_tensors(model)?;
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    st_io::save(&out.join("model.safetensors"), &tensors, &md)?;

    let cfg = &model.cfg;
    let mut hf = cfg.to_hf_value();
    if let Some(o) = hf.as_object_mut() {
        o.insert("torch_dtype".into(), dtype_name(model.dtype()).into());
    }
    atomic_write_json(&out.join("config.json"), &hf)?;
    atomic_write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}),
    )?;

    let src = &lm.info.path;
    let mut copied = false;
    if src.is_dir() {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.exists() {
                let bytes = std::fs::read(&from).map_err(|e| Error::bad_file(&from, e))?;
                atomic_write(&out.join(f), &bytes)?;
                copied |= f == "tokenizer.json";
            }
        }
    }
    if !copied {
        let text = lm.tokenizer.inner.to_string(false).map_err(Error::tokenizer)?;
        atomic_write(&out.join("tokenizer.json"), text.as_bytes())?;
        atomic_write_json(
            &out.join("tokenizer_config.json"),
            &json!({
                "chat_template": lm.chat.source(),
                "bos_token": lm.tokenizer.bos_token,
                "eos_token": lm.tokenizer.eos_token,
                "model_max_length": cfg.max_position_embeddings,
            }),
        )?;
    }
    let gates: BTreeMap<String, f64> = adapter::gates(model);
    atomic_write_json(
        &out.join("steer_heal_merge.json"),
        &json!({
            "base_model": lm.info,
            "merged_adapters": gates,
            "provenance": provenance,
        }),
    )?;
    Ok(())
}
