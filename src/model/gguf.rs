//! GGUF checkpoints (llama.cpp's format): read the metadata into a `ModelConfig`, dequantise every tensor to f32,
//! map llama.cpp tensor names and layouts to Hugging Face ones, rebuild the tokenizer and chat template from the
//! metadata, and write the result out as a Hugging Face directory (`convert`).
//!
//! Two layout differences are undone here, both checked by tests against references:
//! - llama.cpp permutes the Q and K projection rows of Llama-architecture models into the interleaved RoPE layout;
//!   our decoder uses Hugging Face's rotate-half layout, so the permutation is reversed (`unpermute_qk`).
//! - llama.cpp's Gemma-3 conversion stores RMSNorm weights as `1 + w` (candle-transformers' `quantized_gemma3`
//!   applies them as plain multipliers); our decoder adds the 1 at load time, so it is subtracted here.

use super::chat::ChatTemplate;
use super::config::{Activation, Arch, ModelConfig};
use super::decoder::Model;
use super::load::{default_dtype, fingerprint, LoadedModel, MapWeights, ModelInfo};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write, atomic_write_json};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steer_heal_kernels::blocks::{BlockRows, Coding};
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

/// A GGUF file read into memory in Hugging Face terms: config, f32 tensors under HF names and layouts, tokenizer.
pub struct GgufCheckpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// Shapes and numerics from the metadata.
    pub cfg: ModelConfig,
    /// Dequantised f32 CPU tensors under Hugging Face names, in Hugging Face layout.
    pub tensors: HashMap<String, Tensor>,
    /// The block codes of the matrices stored as Q4_1 or Q8_0, under the same names and in the same layout
    /// (`codes`: the decode step reads these).
    pub codes: HashMap<String, Arc<BlockRows>>,
    /// The tokenizer rebuilt from `tokenizer.ggml.*`.
    pub tokenizer: Tokenizer,
    /// Text of the BOS token, if the metadata names one.
    pub bos_token: Option<String>,
    /// Text of the EOS token, if the metadata names one.
    pub eos_token: Option<String>,
    /// Text of the padding token, if the metadata names one.
    pub pad_token: Option<String>,
    /// Whether the tokenizer prepends BOS on plain encodes (`tokenizer.ggml.add_bos_token`).
    pub add_bos_token: bool,
    /// The Jinja chat template from `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
}

/// Quantisation types we can dequantise (everything candle's GGUF reader turns into a tensor).
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// ggml's names for its type ids, so an unsupported file is named in the user's terms.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31..=33 => "Q4_0_4_4/4_8/8_8 (repacked)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36..=38 => "IQ4_NL repacked",
        39 => "MXFP4",
        _ => "unknown",
    }
}

fn is_supported(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// Turn candle's header-parse failure into a one-line reason.
fn header_error(e: candle_core::Error) -> String {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("").to_string();
    if let Some(rest) = first.strip_prefix("unknown dtype for tensor ") {
        if let Ok(id) = rest.trim().parse::<u32>() {
            return format!(
                "unsupported GGUF quantisation type {id} ({}); supported: {SUPPORTED_TYPES}",
                ggml_type_name(id)
            );
        }
    }
    if first.contains("unknown magic") {
        return format!("not a GGUF file ({first})");
    }
    format!("not a readable GGUF file, truncated or corrupt ({first})")
}

/// Integer metadata regardless of its stored width.
fn md_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return None,
    })
}

/// Float metadata (ints accepted too: some writers store `freq_base` as an integer).
fn md_f64(v: &Value) -> Option<f64> {
    match v {
        // Through the shortest decimal form, so 1e-6 stays 1e-6 rather than 9.99999997e-7.
        Value::F32(x) => format!("{x}").parse().ok(),
        Value::F64(x) => Some(*x),
        other => md_u64(other).map(|x| x as f64),
    }
}

/// Metadata lookups that name the file and key in errors.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    arch: String,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }
    fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(&self.arch_key(key)).and_then(md_u64).map(|x| x as usize)
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let k = self.arch_key(key);
        self.opt_usize(key)
            .ok_or_else(|| Error::bad_file(self.path, format!("metadata `{k}` is missing or not an integer")))
    }
    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(&self.arch_key(key)).and_then(md_f64)
    }
    fn opt_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }
    fn opt_id(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(md_u64).map(|x| x as u32)
    }
    fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = match self.get(key) {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(Error::bad_file(
                    self.path,
                    format!("metadata `{key}` is missing or not an array"),
                ))
            }
        };
        arr.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(Error::bad_file(self.path, format!("metadata `{key}` holds a non-string"))),
            })
            .collect()
    }
    fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Some(*x as i64),
                    Value::I64(x) => Some(*x),
                    other => md_u64(other).map(|x| x as i64),
                })
                .collect(),
            _ => None,
        }
    }
    fn floats(&self, key: &str) -> Option<Vec<f64>> {
        match self.get(key) {
            Some(Value::Array(a)) => a.iter().map(md_f64).collect(),
            _ => None,
        }
    }
}

/// Build the decoder config from GGUF metadata; `vocab_size` and tying come from the tensors.
fn config_from_meta(
    meta: &Meta,
    arch: Arch,
    vocab_size: usize,
    tied: bool,
    attention_bias: bool,
) -> Result<ModelConfig> {
    let hidden_size = meta.usize("embedding_length")?;
    let num_attention_heads = meta.usize("attention.head_count")?;
    if num_attention_heads == 0 {
        return Err(Error::bad_file(
            meta.path,
            format!("metadata `{}` is 0", meta.arch_key("attention.head_count")),
        ));
    }
    let num_hidden_layers = meta.usize("block_count")?;
    let num_key_value_heads = meta.opt_usize("attention.head_count_kv").unwrap_or(num_attention_heads);
    let head_dim = meta.opt_usize("attention.key_length").unwrap_or(hidden_size / num_attention_heads);
    let gemma = arch == Arch::Gemma3;
    let rope_theta = meta.opt_f64("rope.freq_base").unwrap_or(if gemma { 1e6 } else { 1e4 });
    let rope_scaling_factor = match meta.opt_str(&meta.arch_key("rope.scaling.type")) {
        None | Some("none") => 1.0,
        Some("linear") => meta.opt_f64("rope.scaling.factor").unwrap_or(1.0),
        Some(other) => {
            return Err(Error::bad_file(
                meta.path,
                format!("unsupported RoPE scaling `{other}` (supported: linear)"),
            ))
        }
    };
    let sliding_layers: Vec<bool> = if !gemma {
        vec![false; num_hidden_layers]
    } else {
        match meta.get(&meta.arch_key("attention.sliding_window_pattern")) {
            // Newer writers store one flag per layer.
            Some(Value::Array(a)) if a.len() == num_hidden_layers => {
                a.iter().map(|v| matches!(v, Value::Bool(true))).collect()
            }
            other => {
                // llama.cpp hard-codes Gemma-3's period of 6 (five local layers, then one global).
                let period = other.and_then(md_u64).unwrap_or(6) as usize;
                (0..num_hidden_layers).map(|i| period > 0 && (i + 1) % period != 0).collect()
            }
        }
    };
    let query_pre_attn_scalar = gemma.then(|| {
        // llama.cpp: Gemma-3 27B scales by hidden/heads, every other size by the head dimension.
        if num_hidden_layers == 62 {
            (hidden_size / num_attention_heads) as f64
        } else {
            head_dim as f64
        }
    });
    let mut eos_token_ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| meta.opt_id(k))
        .collect();
    eos_token_ids.sort();
    eos_token_ids.dedup();
    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: meta.usize("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: meta.opt_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta,
        rope_local_base_freq: if gemma {
            meta.opt_f64("rope.local_freq_base").unwrap_or(1e4)
        } else {
            rope_theta
        },
        rope_scaling_factor,
        sliding_window: if gemma { meta.opt_usize("attention.sliding_window") } else { None },
        sliding_layers,
        max_position_embeddings: meta.opt_usize("context_length").unwrap_or(8192),
        tie_word_embeddings: tied,
        attention_bias,
        activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        query_pre_attn_scalar,
        attn_logit_softcapping: meta.opt_f64("attn_logit_softcapping"),
        final_logit_softcapping: meta.opt_f64("final_logit_softcapping"),
        bos_token_id: meta.opt_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids,
    };
    cfg.validate(meta.path)?;
    Ok(cfg)
}

/// The Hugging Face name of a llama.cpp tensor, or `None` for tensors our decoder does not use.
fn hf_name(name: &str, arch: Arch) -> Option<String> {
    let (base, suffix) = name.rsplit_once('.')?;
    let mapped = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = base.strip_prefix("blk.")?;
            let (idx, part) = rest.split_once('.')?;
            let idx: usize = idx.parse().ok()?;
            let gemma = arch == Arch::Gemma3;
            let part = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                // Gemma's sandwich norms: llama.cpp calls the pre-MLP norm `ffn_norm` in both families.
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "post_attention_norm" => "post_attention_layernorm",
                "post_ffw_norm" => "post_feedforward_layernorm",
                _ => return None,
            };
            format!("model.layers.{idx}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// Reverse llama.cpp's Q/K row permutation: per head, rows stored as `[d/2, 2]` go back to `[2, d/2]`.
/// Works on weights `[heads·d, in]` and biases `[heads·d]`.
pub fn unpermute_qk(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::invalid(format!("cannot unpermute {rows} rows into {heads} heads")));
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Which row of the file each row of `unpermute_qk`'s result is (for the block codes, reordered by row).
fn unpermuted_row_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let index = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
    Ok(unpermute_qk(&index, heads)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|r| r as usize)
        .collect())
}

/// The block coding `codes` keeps for a GGUF type (the decode step's kernels read Q4_1 and Q8_0).
fn block_coding(t: GgmlDType) -> Option<Coding> {
    match t {
        GgmlDType::Q4_1 => Some(Coding::Q4_1),
        GgmlDType::Q8_0 => Some(Coding::Q8_0),
        _ => None,
    }
}

/// The inverse of `unpermute_qk`: what llama.cpp's converter does to Hugging Face Q/K weights.
pub fn permute_qk(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::invalid(format!("cannot permute {rows} rows into {heads} heads")));
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Byte-level BPE pre-tokenisation for llama.cpp's `tokenizer.ggml.pre` names, as Hugging Face tokenizer JSON.
fn gpt2_pre_tokenizer(pre: &str) -> serde_json::Value {
    use serde_json::json;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match pre {
        // SmolLM / StarCoder: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        // "default", "gpt2" and names we do not know: GPT-2's own split.
        _ => byte_level(true),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path, what: &str) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| Error::bad_file(path, format!("cannot build tokenizer {what}: {e}")))
}

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_NORMAL: i64 = 1;

/// Rebuild the tokenizer from `tokenizer.ggml.*`.
fn build_tokenizer(meta: &Meta) -> Result<Tokenizer> {
    let path = meta.path;
    let model = meta
        .opt_str("tokenizer.ggml.model")
        .ok_or_else(|| {
            Error::bad_file(path, "metadata `tokenizer.ggml.model` is missing: no tokenizer in this file")
        })?
        .to_string();
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(Error::bad_file(
            path,
            "`tokenizer.ggml.token_type` and `tokenizer.ggml.tokens` differ in length",
        ));
    }
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut tok = match model.as_str() {
        "gpt2" => {
            let merges: Vec<(String, String)> = meta
                .strings("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok((a.to_string(), b.to_string())),
                    None => Err(Error::bad_file(path, format!("BPE merge `{m}` has no space"))),
                })
                .collect::<Result<_>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                .build()
                .map_err(|e| Error::bad_file(path, format!("cannot build BPE tokenizer: {e}")))?;
            let mut tok = Tokenizer::new(bpe);
            let pre = meta.opt_str("tokenizer.ggml.pre").unwrap_or("default");
            tok.with_pre_tokenizer(Some(from_json::<tokenizers::PreTokenizerWrapper>(
                gpt2_pre_tokenizer(pre),
                path,
                "pre-tokenizer",
            )?));
            tok.with_decoder(Some(from_json::<tokenizers::DecoderWrapper>(
                serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                path,
                "decoder",
            )?));
            tok
        }
        "llama" => spm_tokenizer(meta, &tokens, &types, vocab)?,
        other => {
            return Err(Error::bad_file(
                path,
                format!(
                "unsupported tokenizer model `{other}` (supported: gpt2 byte-level BPE, llama SentencePiece)"
            ),
            ))
        }
    };
    // Control and user-defined tokens are matched before the model sees the text, as llama.cpp does.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| matches!(**ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(t, ty)| AddedToken::from(t.clone(), *ty != TOKEN_USER_DEFINED).normalized(false))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| Error::bad_file(path, format!("cannot add special tokens: {e}")))?;
    let bos = meta.opt_id("tokenizer.ggml.bos_token_id").and_then(|i| Some((i, tokens.get(i as usize)?)));
    if let (true, Some((bos_id, bos))) = (meta.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false), bos)
    {
        // Plain encodes (not chat templates, which write BOS themselves) get BOS prepended, as llama.cpp does.
        tok.with_post_processor(Some(from_json::<tokenizers::PostProcessorWrapper>(
            serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}}),
            path,
            "post-processor",
        )?));
    }
    Ok(tok)
}

/// SentencePiece BPE (Llama-2, Gemma) as a Hugging Face BPE with byte fallback. SentencePiece merges the adjacent
/// pair whose union has the highest score; a merge list ranked by that score reproduces it (the same
/// construction as transformers' `SentencePieceExtractor`).
fn spm_tokenizer(
    meta: &Meta,
    tokens: &[String],
    types: &[i64],
    vocab: HashMap<String, u32>,
) -> Result<Tokenizer> {
    let path = meta.path;
    let scores = meta.floats("tokenizer.ggml.scores").ok_or_else(|| {
        Error::bad_file(path, "metadata `tokenizer.ggml.scores` is missing: SentencePiece needs it")
    })?;
    if scores.len() != tokens.len() {
        return Err(Error::bad_file(
            path,
            "`tokenizer.ggml.scores` and `tokenizer.ggml.tokens` differ in length",
        ));
    }
    let normal = |s: &str| vocab.get(s).map(|&i| types[i as usize] == TOKEN_NORMAL).unwrap_or(false);
    let mut ranked: Vec<(f64, u32, u32, usize)> = Vec::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TOKEN_NORMAL {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if normal(l) && normal(r) {
                ranked.push((scores[id], vocab[l], vocab[r], pairs.len()));
                pairs.push((l.to_string(), r.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked.into_iter().map(|(_, _, _, i)| pairs[i].clone()).collect();
    let unk = meta.opt_id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize)).cloned();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::bad_file(path, format!("cannot build SentencePiece tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let space_prefix = meta.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let replace = serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if space_prefix {
        serde_json::json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    tok.with_normalizer(Some(from_json::<tokenizers::NormalizerWrapper>(normalizer, path, "normalizer")?))
        .map_err(|e| Error::bad_file(path, format!("cannot set normalizer: {e}")))?;
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    tok.with_decoder(Some(from_json::<tokenizers::DecoderWrapper>(
        serde_json::json!({"type": "Sequence", "decoders": decoders}),
        path,
        "decoder",
    )?));
    Ok(tok)
}

/// Check the quantisation type of every tensor we will read, naming the first unsupported one.
fn check_types(path: &Path, infos: &HashMap<String, TensorInfo>) -> Result<()> {
    let mut names: Vec<&String> = infos.keys().collect();
    names.sort();
    for n in names {
        let t = infos[n].ggml_dtype;
        if !is_supported(t) {
            return Err(Error::bad_file(
                path,
                format!("tensor `{n}` uses quantisation type {t:?}, which is not supported (supported: {SUPPORTED_TYPES})"),
            ));
        }
    }
    Ok(())
}

/// Every tensor must start on the file's alignment and end before the next one starts and before the end of
/// the file: a shifted offset would otherwise read the neighbour's bytes as this tensor's (plausible-looking
/// garbage, not an error).
fn check_layout(path: &Path, content: &Content, file_len: u64) -> Result<()> {
    let align = match content.metadata.get("general.alignment") {
        None => 32,
        Some(v) => match md_u64(v) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(Error::bad_file(
                    path,
                    format!("metadata `general.alignment` is {v:?}, not a power of two"),
                ))
            }
        },
    };
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        if !info.offset.is_multiple_of(align) {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `{name}` starts at data offset {}, not a multiple of the file's alignment {align}: the \
                     file is corrupt",
                    info.offset
                ),
            ));
        }
        let t = info.ggml_dtype;
        let elems = info.shape.elem_count() as u64;
        let block = t.block_size() as u64;
        if block == 0 || !elems.is_multiple_of(block) {
            return Err(Error::bad_file(
                path,
                format!("tensor `{name}` has {elems} values, not a whole number of {t:?} blocks"),
            ));
        }
        let bytes = elems / block * t.type_size() as u64;
        spans.push((info.offset, info.offset + bytes, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[0].1 > w[1].0 {
            return Err(Error::bad_file(
                path,
                format!("tensors `{}` and `{}` overlap in the file: it is corrupt", w[0].2, w[1].2),
            ));
        }
    }
    if let Some(last) = spans.last() {
        let end = content.tensor_data_offset + last.1;
        if end > file_len {
            return Err(Error::bad_file(
                path,
                format!(
                    "truncated: tensor `{}` data runs past the end of the file ({end} > {file_len} bytes)",
                    last.2
                ),
            ));
        }
    }
    Ok(())
}

impl GgufCheckpoint {
    /// Read and dequantise a GGUF file. Errors are one line naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingFile { path: path.to_path_buf(), what: "GGUF file".into() }
            }
            _ => Error::bad_file(path, e),
        })?;
        let file_len = file.metadata().map_err(|e| Error::bad_file(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::bad_file(path, header_error(e)))?;
        let arch_name = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(Error::bad_file(path, "metadata `general.architecture` is missing")),
        };
        let arch = Arch::parse(&arch_name)
            .ok_or_else(|| Error::UnknownArch { path: path.to_path_buf(), arch: arch_name.clone() })?;
        let meta = Meta { md: &content.metadata, arch: arch_name, path };
        check_types(path, &content.tensor_infos)?;
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(Error::bad_file(
                path,
                "per-frequency RoPE scaling (`rope_freqs.weight`, Llama-3.1 style) is not supported",
            ));
        }
        check_layout(path, &content, file_len)?;
        let mut tensors = HashMap::new();
        let mut codes = HashMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let hf = hf_name(name, arch).ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor `{name}` is not one a `{}` model has", arch.model_type()),
                )
            })?;
            let info = &content.tensor_infos[name];
            // `check_layout` has already refused data that runs past the end of the file.
            let q = info.read(&mut reader, content.tensor_data_offset, &Device::Cpu).map_err(|e| {
                let msg = e.to_string();
                Error::bad_file(
                    path,
                    format!("cannot read tensor `{name}`: {}", msg.lines().next().unwrap_or("")),
                )
            })?;
            let t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| Error::bad_file(path, format!("cannot dequantise `{name}`: {e}")))?;
            let t = t.to_dtype(DType::F32)?;
            if let (Some(coding), [rows, cols]) = (block_coding(info.ggml_dtype), t.dims()) {
                let data =
                    q.data().map_err(|e| Error::bad_file(path, format!("cannot read `{name}`: {e}")))?;
                let rows = BlockRows::from_ggml(coding, &data, *rows, *cols)
                    .map_err(|e| Error::bad_file(path, format!("tensor `{name}`: {e}")))?;
                codes.insert(hf.clone(), Arc::new(rows));
            }
            tensors.insert(hf, t);
        }
        let embed = tensors.get("model.embed_tokens.weight").ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".into(),
        })?;
        let vocab_size = embed.dims().first().copied().unwrap_or(0);
        let tied = !tensors.contains_key("lm_head.weight");
        let attention_bias = tensors.contains_key("model.layers.0.self_attn.q_proj.bias");
        let cfg = config_from_meta(&meta, arch, vocab_size, tied, attention_bias)?;
        if arch == Arch::Llama {
            for i in 0..cfg.num_hidden_layers {
                for (proj, heads) in
                    [("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)]
                {
                    for suffix in ["weight", "bias"] {
                        let key = format!("model.layers.{i}.self_attn.{proj}.{suffix}");
                        if let Some(t) = tensors.remove(&key) {
                            let fixed = unpermute_qk(&t, heads).map_err(|_| Error::TensorShape {
                                path: path.to_path_buf(),
                                name: key.clone(),
                                got: t.dims().to_vec(),
                                want: vec![heads * cfg.head_dim],
                            })?;
                            if let Some(c) = codes.remove(&key) {
                                let order = unpermuted_row_order(c.rows(), heads)?;
                                let c = c.with_rows_in_order(&order).map_err(|e| Error::bad_file(path, e))?;
                                codes.insert(key.clone(), Arc::new(c));
                            }
                            tensors.insert(key, fixed);
                        }
                    }
                }
            }
        }
        if cfg.norm_plus_one() {
            for (name, t) in tensors.iter_mut() {
                if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
                    *t = (&*t - 1.0)?;
                }
            }
        }
        let tokenizer = build_tokenizer(&meta)?;
        let token_text = |key: &str| meta.opt_id(key).and_then(|i| tokenizer.id_to_token(i));
        let bos_token = token_text("tokenizer.ggml.bos_token_id");
        let eos_token = token_text("tokenizer.ggml.eos_token_id");
        let pad_token = token_text("tokenizer.ggml.padding_token_id");
        let add_bos_token = meta.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let chat_template = meta.opt_str("tokenizer.chat_template").map(String::from);
        Ok(GgufCheckpoint {
            path: path.to_path_buf(),
            cfg,
            tensors,
            codes,
            tokenizer,
            bos_token,
            eos_token,
            pad_token,
            add_bos_token,
            chat_template,
        })
    }

    /// The chat template to use: the file's own, else the family's turn format (Gemma's for Gemma, ChatML
    /// otherwise), so base models without a template still render prompts.
    pub fn chat_template_or_default(&self) -> String {
        match (&self.chat_template, self.cfg.arch) {
            (Some(t), _) => t.clone(),
            (None, Arch::Gemma3) => super::tiny::GEMMA_TEMPLATE.to_string(),
            (None, _) => super::chat::CHATML.to_string(),
        }
    }

    /// The tokenizer with its special tokens, as the rest of the crate uses it.
    pub fn text_tokenizer(&self) -> TextTokenizer {
        TextTokenizer::assemble(
            self.tokenizer.clone(),
            self.bos_token.clone(),
            self.eos_token.clone(),
            &self.cfg,
        )
    }

    /// Write a Hugging Face directory: `config.json`, `model.safetensors` (f32), `tokenizer.json`,
    /// `tokenizer_config.json` (chat template, BOS/EOS) and `generation_config.json`.
    pub fn write_hf_dir(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::bad_file(out, e))?;
        let mut cfg = self.cfg.to_hf_value();
        if let Some(o) = cfg.as_object_mut() {
            if self.cfg.arch == Arch::Qwen3 {
                // Fields transformers' Qwen3 config reads without defaults in older versions.
                o.insert("use_sliding_window".into(), false.into());
                o.insert("max_window_layers".into(), self.cfg.num_hidden_layers.into());
            }
        }
        atomic_write_json(&out.join("config.json"), &cfg)?;
        let weights_path = out.join("model.safetensors");
        write_safetensors_atomically(&self.tensors, &weights_path)?;
        let tok_path = out.join("tokenizer.json");
        let tok_json = self
            .tokenizer
            .to_string(false)
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot serialise tokenizer: {e}")))?;
        atomic_write(&tok_path, tok_json.as_bytes())?;
        let mut tc = serde_json::json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": false,
            "model_max_length": self.cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let Some(o) = tc.as_object_mut() {
            if let Some(p) = &self.pad_token {
                o.insert("pad_token".into(), p.clone().into());
            }
            o.insert("chat_template".into(), self.chat_template_or_default().into());
        }
        atomic_write_json(&out.join("tokenizer_config.json"), &tc)?;
        let gen = serde_json::json!({
            "bos_token_id": self.cfg.bos_token_id,
            "eos_token_id": self.cfg.eos_token_ids,
        });
        atomic_write_json(&out.join("generation_config.json"), &gen)?;
        Ok(())
    }
}

/// Write f32 tensors as safetensors the way `atomic_write` writes small files (temp file beside the target, fsync,
/// rename), but through candle's own serialiser: building one byte vector of a whole model in our unoptimised
/// dev-profile code is many times slower.
fn write_safetensors_atomically(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let f32s: HashMap<&str, Tensor> =
        tensors.iter().map(|(k, t)| Ok((k.as_str(), t.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&f32s, &tmp)
        .map_err(|e| Error::bad_file(&tmp, format!("cannot write weights: {e}")))?;
    // candle's writer creates owner-only files; give the weights the permissions of an ordinary new file.
    let probe = dir.join(format!(".{name}.{}.perm", std::process::id()));
    if let Ok(meta) = std::fs::File::create(&probe).and_then(|f| f.metadata()) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    let _ = std::fs::remove_file(&probe);
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::bad_file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::bad_file(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Best effort: the rename is durable once the directory entry is.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Load a GGUF file as a ready model: dequantised weights in `dtype` (default: f32 on CPU, bf16 on CUDA),
/// tokenizer and chat template from the metadata.
pub fn load_gguf(path: &Path, dtype: Option<DType>, dev: &Device) -> Result<LoadedModel> {
    let dtype = dtype.unwrap_or_else(|| default_dtype(dev));
    let ck = GgufCheckpoint::read(path)?;
    let tokenizer = ck.text_tokenizer();
    let chat = ChatTemplate::new(ck.chat_template_or_default(), &tokenizer)
        .map_err(|e| Error::bad_file(path, format!("chat template `tokenizer.chat_template`: {e}")))?;
    let weights = MapWeights { tensors: ck.tensors, origin: path.to_path_buf(), codes: ck.codes };
    let model = Model::load(&ck.cfg, &weights, dtype, dev)?;
    let id = path
        .file_name()
        .map(|s| s.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into());
    let info = ModelInfo { id, path: path.to_path_buf(), weights_hash: fingerprint(&[path.to_path_buf()])? };
    Ok(LoadedModel { model, tokenizer, chat, info })
}

/// Convert a GGUF file to a Hugging Face directory that `load_model` (and transformers) can read.
pub fn convert_gguf(path: &Path, out: &Path) -> Result<()> {
    GgufCheckpoint::read(path)?.write_hf_dir(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_roundtrips_and_matches_llama_cpp_layout() -> Result<()> {
        // Two heads of dim 4: HF rows per head are [x0, x1 | y0, y1]; llama.cpp interleaves them to [x0, y0, x1, y1].
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((8, 1))?;
        let p = permute_qk(&t, 2)?;
        let v: Vec<f32> = p.flatten_all()?.to_vec1()?;
        assert_eq!(v, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back: Vec<f32> = unpermute_qk(&p, 2)?.flatten_all()?.to_vec1()?;
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", Arch::Llama).as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", Arch::Gemma3).as_deref(),
            Some("model.layers.3.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.0.post_ffw_norm.weight", Arch::Gemma3).as_deref(),
            Some("model.layers.0.post_feedforward_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight", Arch::Llama).as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("token_embd.weight", Arch::Qwen3).as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("rope_freqs.weight", Arch::Llama), None);
    }

    #[test]
    fn sentencepiece_vocab_merges_by_score_and_falls_back_to_bytes() -> Result<()> {
        let mut toks: Vec<(String, i32)> = vec![("<unk>".into(), 2), ("<s>".into(), 3), ("</s>".into(), 3)];
        toks.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 6)));
        for p in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "or", "▁wor", "ld",
            "▁world",
        ] {
            toks.push((p.into(), 1));
        }
        toks.push(("<start_of_turn>".into(), 4));
        let n = toks.len();
        let mut md: HashMap<String, Value> = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| Value::String(t.0.clone())).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(toks.iter().map(|t| Value::I32(t.1)).collect()),
        );
        // SentencePiece BPE scores: earlier pieces merge first.
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array((0..n).map(|i| Value::F32(-(i as f32))).collect()),
        );
        md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        let meta = Meta { md: &md, arch: "gemma3".into(), path: Path::new("t.gguf") };
        let tok = build_tokenizer(&meta)?;
        let enc = tok.encode("hello world", false).map_err(Error::tokenizer)?;
        assert_eq!(enc.get_tokens(), ["hello", "▁world"]);
        for text in ["hello world", "hé wörld", "<start_of_turn>hello"] {
            let ids = tok.encode(text, false).map_err(Error::tokenizer)?.get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).map_err(Error::tokenizer)?, text);
        }
        let enc = tok.encode("hé", false).map_err(Error::tokenizer)?;
        assert_eq!(enc.get_tokens(), ["h", "<0xC3>", "<0xA9>"]);
        let enc = tok.encode("<start_of_turn>hello", false).map_err(Error::tokenizer)?;
        assert_eq!(enc.get_tokens(), ["<start_of_turn>", "hello"]);
        Ok(())
    }

    #[test]
    fn unknown_type_ids_are_named() {
        let e = candle_core::Error::Msg("unknown dtype for tensor 16".into());
        let s = header_error(e);
        assert!(s.contains("IQ2_XXS") && s.contains("unsupported"), "{s}");
    }
}
