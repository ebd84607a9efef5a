//! Deterministic tiny random models for tests and fast development runs: a Hugging Face style directory with
//! `config.json`, `model.safetensors`, a byte-level BPE `tokenizer.json` built here, and a chat template.

use super::chat::CHATML;
use super::config::{Activation, Arch, ModelConfig};
use super::decoder::PROJECTIONS;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Gemma-style template: system text folded into the first user turn, `model` as the assistant role.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% set ns = namespace(sys='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\\n\\n' %}{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// The seven tinymfv answer words (`eval::data::FOUNDATIONS`' words; a test there checks they agree). The model
/// layer does not depend on the eval, so the fixture keeps its own copy.
pub const ANSWER_WORDS: [&str; 7] =
    ["care", "fairness", "loyalty", "authority", "sanctity", "liberty", "social"];

/// Special tokens of the tiny tokenizers, by family.
fn specials(arch: Arch) -> Vec<&'static str> {
    match arch {
        Arch::Gemma3 => vec!["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        _ => vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    }
}

/// A byte-level BPE tokenizer with every byte as a token, a few merges, and the family's special tokens.
pub fn tiny_tokenizer(arch: Arch) -> Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), i as u32);
    }
    // A handful of merges so common words are not all single bytes.
    let merge_pairs =
        [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "u"), ("r", "e")];
    let mut merges = Vec::new();
    for (a, b) in merge_pairs {
        let joined = format!("{a}{b}");
        let id = vocab.len() as u32;
        vocab.entry(joined).or_insert(id);
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(Error::tokenizer)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let added: Vec<AddedToken> = specials(arch).into_iter().map(|s| AddedToken::from(s, true)).collect();
    tok.add_special_tokens(added).map_err(Error::tokenizer)?;
    Ok(tok)
}

/// The tiny config for a family, sized to the tiny tokenizer.
pub fn tiny_config(arch: Arch, vocab_size: usize, tok: &Tokenizer) -> ModelConfig {
    let n_layers = 4;
    let (eos, bos) = match arch {
        Arch::Gemma3 => (tok.token_to_id("<end_of_turn>"), tok.token_to_id("<bos>")),
        _ => (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")),
    };
    ModelConfig {
        arch,
        vocab_size,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: n_layers,
        num_attention_heads: 4,
        // Gemma-3 270M has one KV head; it also keeps candle-transformers' reference on its contiguous path.
        num_key_value_heads: if arch == Arch::Gemma3 { 1 } else { 2 },
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: if arch == Arch::Gemma3 { 1e6 } else { 1e4 },
        rope_local_base_freq: 1e4,
        rope_scaling_factor: 1.0,
        sliding_window: (arch == Arch::Gemma3).then_some(64),
        sliding_layers: (0..n_layers).map(|i| arch == Arch::Gemma3 && (i + 1) % 2 != 0).collect(),
        max_position_embeddings: 1024,
        tie_word_embeddings: arch != Arch::Qwen3,
        attention_bias: false,
        activation: if arch == Arch::Gemma3 { Activation::GeluTanh } else { Activation::Silu },
        query_pre_attn_scalar: (arch == Arch::Gemma3).then_some(16.0),
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
    }
}

/// Random weights with HF names; uniform with the given std, fixed by `seed`.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    let mut uniform = |shape: &[usize], std: f64, mean: f64| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let a = std * 3f64.sqrt();
        let v: Vec<f32> = (0..n).map(|_| (mean + rng.random_range(-a..a)) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let h = cfg.hidden_size;
    let hd = cfg.head_dim;
    let norm_mean = if cfg.norm_plus_one() { 0.0 } else { 1.0 };
    out.insert("model.embed_tokens.weight".into(), uniform(&[cfg.vocab_size, h], 1.0, 0.0)?);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for name in PROJECTIONS {
            let (o, inp) = match name {
                "q_proj" => (cfg.num_attention_heads * hd, h),
                "k_proj" | "v_proj" => (cfg.num_key_value_heads * hd, h),
                "o_proj" => (h, cfg.num_attention_heads * hd),
                "gate_proj" | "up_proj" => (cfg.intermediate_size, h),
                _ => (h, cfg.intermediate_size),
            };
            let group = if name.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(&name) {
                "mlp"
            } else {
                "self_attn"
            };
            out.insert(
                format!("{p}.{group}.{name}.weight"),
                uniform(&[o, inp], 1.0 / (inp as f64).sqrt(), 0.0)?,
            );
        }
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if cfg.arch == Arch::Gemma3 {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            out.insert(format!("{p}.{n}.weight"), uniform(&[h], 0.1, norm_mean)?);
        }
        if cfg.qk_norm() {
            out.insert(format!("{p}.self_attn.q_norm.weight"), uniform(&[hd], 0.1, norm_mean)?);
            out.insert(format!("{p}.self_attn.k_norm.weight"), uniform(&[hd], 0.1, norm_mean)?);
        }
    }
    out.insert("model.norm.weight".into(), uniform(&[h], 0.1, norm_mean)?);
    if !cfg.tie_word_embeddings {
        out.insert("lm_head.weight".into(), uniform(&[cfg.vocab_size, h], 1.0 / (h as f64).sqrt(), 0.0)?);
    }
    Ok(out)
}

/// Write a tiny random model directory for `arch`.
pub fn make_tiny_model(arch: Arch, out: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::bad_file(out, e))?;
    let mut tok = tiny_tokenizer(arch)?;
    // The tinymfv answer words as whole tokens, so the eval (which needs seven distinct first tokens) and with
    // it the whole loop run on the tiny model.
    let words: Vec<AddedToken> = ANSWER_WORDS.iter().map(|w| AddedToken::from(*w, false)).collect();
    tok.add_tokens(words).map_err(Error::tokenizer)?;
    let vocab_size = tok.get_vocab_size(true);
    let mut cfg = tiny_config(arch, vocab_size, &tok);
    // Room for an eval prompt (vignette, think tokens, answer) and a JSON probe.
    cfg.max_position_embeddings = 4096;
    let mut hf = cfg.to_hf_value();
    if let Some(o) = hf.as_object_mut() {
        if arch == Arch::Qwen3 {
            // Fields candle-transformers' Qwen3 reference reads.
            o.insert("max_window_layers".into(), cfg.num_hidden_layers.into());
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
        }
        if arch == Arch::Gemma3 {
            o.insert("query_pre_attn_scalar".into(), (cfg.head_dim as u64).into());
        }
    }
    write_json(&out.join("config.json"), &hf)?;
    let tok_path = out.join("tokenizer.json");
    tok.save(&tok_path, true).map_err(|e| Error::bad_file(&tok_path, e))?;
    let (template, bos, eos) = match arch {
        Arch::Gemma3 => (GEMMA_TEMPLATE, "<bos>", "<eos>"),
        _ => (CHATML, "<|endoftext|>", "<|im_end|>"),
    };
    let bos_value = if arch == Arch::Gemma3 { serde_json::Value::from(bos) } else { serde_json::Value::Null };
    write_json(
        &out.join("tokenizer_config.json"),
        // The tokenizer class as `convert` writes it: transformers would otherwise pick Gemma's own class for
        // gemma3_text, which wants an `<unk>` token the tiny vocabulary does not have.
        &serde_json::json!({"chat_template": template, "bos_token": bos_value, "eos_token": eos,
            "model_max_length": cfg.max_position_embeddings, "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": cfg.eos_token_ids, "bos_token_id": cfg.bos_token_id}),
    )?;
    let weights = random_weights(&cfg, seed)?;
    let wp = out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &wp).map_err(|e| Error::bad_file(&wp, e))?;
    Ok(())
}

/// Write pretty JSON atomically enough for a generated directory.
fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::bad_file(path, e))?;
    std::fs::write(path, s).map_err(|e| Error::bad_file(path, e))
}
