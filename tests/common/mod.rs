//! Test helpers: a loaded tiny random model, and a GGUF file written from a tiny Hugging Face model directory the
//! way llama.cpp's converter does (llama.cpp tensor names, Q/K rows permuted for Llama, `1 + w` Gemma norms,
//! tokenizer in `tokenizer.ggml.*`).

#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use steer_heal::model::gguf::permute_qk;
use steer_heal::model::{load_model, tiny::make_tiny_model, Arch, LoadedModel, ModelConfig};

/// Under `dir`, with the real binary: `make-tiny-model`, then a vector from `extract --n-pairs 4`, calibrated by
/// `dose --n-prompts 2 --tokens 4` when `dose`. Returns the model folder and the vector file.
pub fn cli_tiny_model_and_vector(dir: &Path, dose: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"));
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run steer-heal");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let model = dir.join("tiny");
    let vdir = dir.join("vector");
    run(bin().arg("make-tiny-model").arg(&model));
    run(bin().args(["extract", "--model"]).arg(&model).args(["--n-pairs", "4", "--out"]).arg(&vdir));
    let vector = steer_heal::session::layout::StageOut::new(&vdir).vector();
    if dose {
        run(bin()
            .args(["dose", "--model"])
            .arg(&model)
            .arg("--vector")
            .arg(&vector)
            .args(["--n-prompts", "2", "--tokens", "4", "--out"])
            .arg(&vdir));
    }
    (model, vector)
}

/// `run` flags for one fast headless round on a tiny random model (as `just tiny-run`): short completions, a
/// short eval, and filters opened for random text.
pub const FAST_TINY_ROUND: &[&str] = &[
    "--rounds",
    "1",
    "--floor",
    "0",
    "--n-prompts",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-n",
    "2",
    "--think",
    "4",
    "--json-probe-tokens",
    "8",
    "--max-ppl",
    "1e30",
    "--max-repetition",
    "1.01",
];

/// A deterministic tiny random model of `arch` (f32, CPU), loaded from its own temporary folder (kept alive by
/// the returned guard).
pub fn tiny_model(arch: Arch, seed: u64) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().expect("tempdir");
    make_tiny_model(arch, dir.path(), seed).expect("tiny model");
    let m = load_model(dir.path(), Some(candle_core::DType::F32), &Device::Cpu).expect("load");
    (dir, m)
}

fn gguf_name(hf: &str, arch: Arch) -> String {
    let (base, suffix) = hf.rsplit_once('.').expect("dotted name");
    let name = match base {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = base.strip_prefix("model.layers.").expect("layer tensor");
            let (idx, part) = rest.split_once('.').expect("layer part");
            let part = match part {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" if arch == Arch::Gemma3 => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                other => other,
            };
            format!("blk.{idx}.{part}")
        }
    };
    format!("{name}.{suffix}")
}

/// Write `out` as a GGUF file holding the model in `dir`; 2-D projection weights are stored as `quant`
/// (norms stay F32, as llama.cpp keeps them).
pub fn write_gguf_from_dir(dir: &Path, out: &Path, quant: GgmlDType) {
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let cfg = ModelConfig::from_hf_value(&cfg_json, &dir.join("config.json")).expect("config");
    let arch_name = match cfg.arch {
        Arch::Llama => "llama",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => "gemma3",
    };
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights");
    let mut q: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for hf in names {
        let mut t: Tensor = tensors[hf].clone();
        if cfg.arch == Arch::Llama && hf.ends_with("q_proj.weight") {
            t = permute_qk(&t, cfg.num_attention_heads).expect("permute q");
        }
        if cfg.arch == Arch::Llama && hf.ends_with("k_proj.weight") {
            t = permute_qk(&t, cfg.num_key_value_heads).expect("permute k");
        }
        if cfg.arch == Arch::Gemma3 && hf.ends_with("norm.weight") {
            t = (t + 1.0).expect("norm shift");
        }
        let dtype = if t.rank() == 2 { quant } else { GgmlDType::F32 };
        q.push((gguf_name(hf, cfg.arch), QTensor::quantize(&t, dtype).expect("quantize")));
    }

    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).expect("tokenizer"))
            .expect("json");
    let mut by_id: Vec<(u32, String, i32)> = tok["model"]["vocab"]
        .as_object()
        .expect("vocab")
        .iter()
        .map(|(k, v)| (v.as_u64().expect("id") as u32, k.clone(), 1))
        .collect();
    for a in tok["added_tokens"].as_array().expect("added") {
        let id = a["id"].as_u64().expect("id") as u32;
        let content = a["content"].as_str().expect("content").to_string();
        by_id.retain(|(i, _, _)| *i != id);
        by_id.push((id, content, if a["special"].as_bool() == Some(true) { 3 } else { 4 }));
    }
    by_id.sort();
    assert!(by_id.iter().enumerate().all(|(i, (id, _, _))| i as u32 == *id), "vocab ids are contiguous");
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(p) => {
                Value::String(format!("{} {}", p[0].as_str().expect("a"), p[1].as_str().expect("b")))
            }
            _ => Value::String(String::new()),
        })
        .collect();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("tc"))
            .expect("json");

    let a = |k: &str| format!("{arch_name}.{k}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch_name.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (a("block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (a("feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (a("attention.head_count"), Value::U32(cfg.num_attention_heads as u32)),
        (a("attention.head_count_kv"), Value::U32(cfg.num_key_value_heads as u32)),
        (a("attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (a("attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("context_length"), Value::U32(cfg.max_position_embeddings as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(by_id.iter().map(|t| Value::String(t.1.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(by_id.iter().map(|t| Value::I32(t.2)).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(b) = cfg.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    // Like llama.cpp: EOS is the tokenizer's end-of-text token, EOT the chat turn end when it differs.
    let id_of = |text: &str| by_id.iter().find(|t| t.1 == text).map(|t| t.0);
    let eos = tc["eos_token"].as_str().and_then(id_of).or(cfg.eos_token_ids.first().copied());
    if let Some(e) = eos {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(e) = cfg.eos_token_ids.iter().find(|e| Some(**e) != eos) {
        md.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(*e)));
    }
    if let Some(t) = tc["chat_template"].as_str() {
        md.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    if cfg.arch == Arch::Gemma3 {
        md.push((a("attention.sliding_window"), Value::U32(cfg.sliding_window.expect("window") as u32)));
        let period = cfg.sliding_layers.iter().position(|s| !s).expect("a global layer") + 1;
        md.push((a("attention.sliding_window_pattern"), Value::U32(period as u32)));
        md.push((a("rope.local_freq_base"), Value::F32(cfg.rope_local_base_freq as f32)));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).expect("create gguf");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
}

/// Overwrite the ggml type id of tensor `name` in GGUF bytes (to fake a quantisation type we cannot read).
pub fn patch_tensor_type(bytes: &mut [u8], name: &str, type_id: u32) {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).expect("tensor info present");
    let mut p = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().expect("4 bytes")) as usize;
    p += 4 + 8 * n_dims;
    bytes[p..p + 4].copy_from_slice(&type_id.to_le_bytes());
}

/// Add `delta` to the data offset of tensor `name` in a GGUF file's header.
pub fn shift_tensor_offset(bytes: &mut [u8], name: &str, delta: u64) {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).expect("tensor info present");
    let mut p = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().expect("4 bytes")) as usize;
    p += 4 + 8 * n_dims + 4;
    let off = u64::from_le_bytes(bytes[p..p + 8].try_into().expect("8 bytes")) + delta;
    bytes[p..p + 8].copy_from_slice(&off.to_le_bytes());
}

/// Every HF tensor of a directory, by name (for comparing converted weights).
pub fn dir_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights")
}
