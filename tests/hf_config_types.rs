//! Every `config.json` we write (a tiny model, `convert` of a GGUF, a merged/baked directory) gives each field the
//! JSON type transformers declares for it. transformers 5 validates configs strictly: one float where it declares
//! `int` (Gemma's `query_pre_attn_scalar: 256.0`) and `from_pretrained` refuses the whole directory. Python and
//! serde_json agree on the split: `256` is an int, `256.0` and `1e-6` are floats.
//!
//! The tables are copied from transformers 5.24.0 (the wheel on PyPI): `models/llama/configuration_llama.py`
//! (`LlamaConfig`), `models/qwen3/configuration_qwen3.py` (`Qwen3Config`), `models/gemma3/configuration_gemma3.py`
//! (`Gemma3TextConfig`), the `PreTrainedConfig` fields of `configuration_utils.py`, and the legacy keys that
//! `modeling_rope_utils.py` (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`, `RopeParameters`) and
//! `Gemma3TextConfig.convert_rope_params_to_dict` / `__post_init__` still read. `just interop` loads the same
//! directories with transformers itself.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde_json::Value;
use std::path::Path;
use steer_heal::model::gguf::convert_gguf;
use steer_heal::model::{load_model, tiny::make_tiny_model, Arch};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A type as transformers declares it; `Opt` adds `| None` (JSON null).
#[derive(Clone, Copy, Debug)]
enum Ty {
    Int,
    Float,
    /// `int | float` (`attention_dropout`).
    Number,
    Bool,
    Str,
    ListStr,
    /// `int | list[int]` (`eos_token_id`).
    IntOrListInt,
    Dict,
    Opt(&'static Ty),
}

const INT: Ty = Ty::Int;
const FLOAT: Ty = Ty::Float;

/// `LlamaConfig`, transformers 5.24.0 `models/llama/configuration_llama.py`.
const LLAMA: &[(&str, Ty)] = &[
    ("vocab_size", Ty::Int),
    ("hidden_size", Ty::Int),
    ("intermediate_size", Ty::Int),
    ("num_hidden_layers", Ty::Int),
    ("num_attention_heads", Ty::Int),
    ("num_key_value_heads", Ty::Opt(&INT)),
    ("hidden_act", Ty::Str),
    ("max_position_embeddings", Ty::Int),
    ("initializer_range", Ty::Float),
    ("rms_norm_eps", Ty::Float),
    ("use_cache", Ty::Bool),
    ("pad_token_id", Ty::Opt(&INT)),
    ("bos_token_id", Ty::Opt(&INT)),
    ("eos_token_id", Ty::Opt(&Ty::IntOrListInt)),
    ("pretraining_tp", Ty::Opt(&INT)),
    ("tie_word_embeddings", Ty::Bool),
    ("rope_parameters", Ty::Opt(&Ty::Dict)),
    ("attention_bias", Ty::Bool),
    ("attention_dropout", Ty::Opt(&Ty::Number)),
    ("mlp_bias", Ty::Bool),
    ("head_dim", Ty::Opt(&INT)),
];

/// `Qwen3Config`, transformers 5.24.0 `models/qwen3/configuration_qwen3.py`.
const QWEN3: &[(&str, Ty)] = &[
    ("vocab_size", Ty::Int),
    ("hidden_size", Ty::Int),
    ("intermediate_size", Ty::Int),
    ("num_hidden_layers", Ty::Int),
    ("num_attention_heads", Ty::Int),
    ("num_key_value_heads", Ty::Opt(&INT)),
    ("head_dim", Ty::Int),
    ("hidden_act", Ty::Str),
    ("max_position_embeddings", Ty::Int),
    ("initializer_range", Ty::Float),
    ("rms_norm_eps", Ty::Float),
    ("use_cache", Ty::Bool),
    ("tie_word_embeddings", Ty::Bool),
    ("rope_parameters", Ty::Opt(&Ty::Dict)),
    ("attention_bias", Ty::Bool),
    ("use_sliding_window", Ty::Bool),
    ("sliding_window", Ty::Opt(&INT)),
    ("max_window_layers", Ty::Int),
    ("layer_types", Ty::Opt(&Ty::ListStr)),
    ("attention_dropout", Ty::Number),
    ("pad_token_id", Ty::Opt(&INT)),
    ("bos_token_id", Ty::Opt(&INT)),
    ("eos_token_id", Ty::Opt(&Ty::IntOrListInt)),
];

/// `Gemma3TextConfig`, transformers 5.24.0 `models/gemma3/configuration_gemma3.py`.
const GEMMA3_TEXT: &[(&str, Ty)] = &[
    ("vocab_size", Ty::Int),
    ("hidden_size", Ty::Int),
    ("intermediate_size", Ty::Int),
    ("num_hidden_layers", Ty::Int),
    ("num_attention_heads", Ty::Int),
    ("num_key_value_heads", Ty::Int),
    ("head_dim", Ty::Int),
    ("hidden_activation", Ty::Str),
    ("max_position_embeddings", Ty::Int),
    ("initializer_range", Ty::Float),
    ("rms_norm_eps", Ty::Float),
    ("use_cache", Ty::Bool),
    ("pad_token_id", Ty::Opt(&INT)),
    ("eos_token_id", Ty::Opt(&Ty::IntOrListInt)),
    ("bos_token_id", Ty::Opt(&INT)),
    ("tie_word_embeddings", Ty::Bool),
    ("rope_parameters", Ty::Opt(&Ty::Dict)),
    ("attention_bias", Ty::Bool),
    ("attention_dropout", Ty::Opt(&Ty::Number)),
    ("query_pre_attn_scalar", Ty::Int),
    ("sliding_window", Ty::Opt(&INT)),
    ("layer_types", Ty::Opt(&Ty::ListStr)),
    ("final_logit_softcapping", Ty::Opt(&FLOAT)),
    ("attn_logit_softcapping", Ty::Opt(&FLOAT)),
    ("use_bidirectional_attention", Ty::Opt(&Ty::Bool)),
];

/// `PreTrainedConfig` fields (`configuration_utils.py`) and the `model_type` string every config carries.
const COMMON: &[(&str, Ty)] = &[
    ("model_type", Ty::Str),
    ("transformers_version", Ty::Opt(&Ty::Str)),
    ("architectures", Ty::Opt(&Ty::ListStr)),
    ("dtype", Ty::Opt(&Ty::Str)),
    // Popped from kwargs as the backward-compatible name of `dtype`.
    ("torch_dtype", Ty::Opt(&Ty::Str)),
];

/// Legacy keys transformers 5 still reads into `rope_parameters`: `rope_theta` (`RopeParameters.rope_theta:
/// float | None`) and `rope_scaling`, both through `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`.
const LEGACY_ROPE: &[(&str, Ty)] = &[("rope_theta", Ty::Float), ("rope_scaling", Ty::Opt(&Ty::Dict))];

/// Legacy Gemma-3 keys: `rope_local_base_freq` becomes `rope_parameters["sliding_attention"]["rope_theta"]`
/// (`Gemma3TextConfig.convert_rope_params_to_dict`), `sliding_window_pattern` is read in `__post_init__`
/// (`kwargs.get("sliding_window_pattern", 6)`, an int).
const LEGACY_GEMMA3: &[(&str, Ty)] =
    &[("rope_local_base_freq", Ty::Float), ("sliding_window_pattern", Ty::Int)];

fn table(arch: Arch) -> Vec<(&'static str, Ty)> {
    let own: &[(&str, Ty)] = match arch {
        Arch::Llama => LLAMA,
        Arch::Qwen3 => QWEN3,
        Arch::Gemma3 => GEMMA3_TEXT,
    };
    let mut t: Vec<(&str, Ty)> = own.iter().chain(COMMON).chain(LEGACY_ROPE).copied().collect();
    if arch == Arch::Gemma3 {
        t.extend_from_slice(LEGACY_GEMMA3);
    }
    t
}

fn fits(v: &Value, ty: Ty) -> bool {
    match ty {
        Ty::Int => v.is_u64() || v.is_i64(),
        Ty::Float => v.is_f64(),
        Ty::Number => v.is_number(),
        Ty::Bool => v.is_boolean(),
        Ty::Str => v.is_string(),
        Ty::ListStr => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        Ty::IntOrListInt => {
            fits(v, Ty::Int) || v.as_array().is_some_and(|a| a.iter().all(|x| fits(x, Ty::Int)))
        }
        Ty::Dict => v.is_object(),
        Ty::Opt(inner) => v.is_null() || fits(v, *inner),
    }
}

/// Every key of the `config.json` in `dir` is one transformers declares for `arch`, with the declared type.
fn check_config(dir: &Path, arch: Arch) -> TestResult {
    let path = dir.join("config.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let obj = v.as_object().ok_or("config.json is not an object")?;
    assert_eq!(obj.get("model_type").and_then(Value::as_str), Some(arch.model_type()));
    let table = table(arch);
    let mut wrong = Vec::new();
    for (k, val) in obj {
        match table.iter().find(|(name, _)| name == k) {
            None => wrong.push(format!("`{k}` = {val}: not a field transformers declares for {arch:?}")),
            Some((_, ty)) if !fits(val, *ty) => {
                wrong.push(format!("`{k}` = {val}: transformers declares {ty:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}:\n  {}", path.display(), wrong.join("\n  "));
    Ok(())
}

fn short(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama => "llama",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => "gemma3",
    }
}

const ARCHES: [Arch; 3] = [Arch::Llama, Arch::Qwen3, Arch::Gemma3];

#[test]
fn tiny_model_configs_have_transformers_types() -> TestResult {
    for arch in ARCHES {
        let tmp = tempfile::tempdir()?;
        make_tiny_model(arch, tmp.path(), 7)?;
        check_config(tmp.path(), arch)?;
    }
    Ok(())
}

#[test]
fn converted_configs_have_transformers_types() -> TestResult {
    for arch in ARCHES {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("hf");
        make_tiny_model(arch, &src, 7)?;
        let gguf = tmp.path().join("tiny.gguf");
        common::write_gguf_from_dir(&src, &gguf, GgmlDType::F32);
        let out = tmp.path().join("converted");
        convert_gguf(&gguf, &out)?;
        check_config(&out, arch)?;
        if arch == Arch::Gemma3 {
            // The field transformers refused: from GGUF metadata it is the head dimension, an int.
            let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
            assert_eq!(v["query_pre_attn_scalar"], serde_json::json!(16));
            assert_eq!(v["rope_theta"], serde_json::json!(1e6));
            assert!(v["rope_theta"].is_f64() && v["rope_local_base_freq"].is_f64());
        }
    }
    Ok(())
}

#[test]
fn merged_configs_have_transformers_types() -> TestResult {
    for arch in ARCHES {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("hf");
        make_tiny_model(arch, &src, 7)?;
        // From the GGUF, so the config comes from GGUF metadata as it does for a real converted model.
        let gguf = tmp.path().join("tiny.gguf");
        common::write_gguf_from_dir(&src, &gguf, GgmlDType::F32);
        let lm = load_model(&gguf, Some(DType::F32), &Device::Cpu)?;
        let out = tmp.path().join("merged");
        steer_heal::heal::export_merged(&lm, &out, &serde_json::json!({"test": true}))?;
        check_config(&out, arch)?;
    }
    Ok(())
}

/// For `just interop`: tiny GGUF files of each family (llama.cpp's conventions, Q8_0 projections) in
/// `$STEER_HEAL_INTEROP_DIR`, which the recipe then converts with `steer-heal convert`.
#[test]
#[ignore = "writes fixtures for `just interop`"]
fn write_interop_fixtures() -> TestResult {
    let Ok(dir) = std::env::var("STEER_HEAL_INTEROP_DIR") else {
        return Err("set STEER_HEAL_INTEROP_DIR".into());
    };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    for arch in ARCHES {
        let src = dir.join(format!("tiny-{}", short(arch)));
        make_tiny_model(arch, &src, 7)?;
        let gguf = dir.join(format!("tiny-{}.gguf", short(arch)));
        common::write_gguf_from_dir(&src, &gguf, GgmlDType::Q8_0);
        println!("wrote {}", gguf.display());
    }
    Ok(())
}
