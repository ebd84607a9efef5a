//! The tokenizer with the special tokens generation needs (BOS, EOS, end-of-turn), read from
//! `tokenizer.json` + `tokenizer_config.json`, or built from GGUF metadata.

use super::config::ModelConfig;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// A Hugging Face tokenizer plus special-token facts.
#[derive(Clone)]
pub struct TextTokenizer {
    /// The underlying tokenizer.
    pub inner: Tokenizer,
    /// BOS text (e.g. `<bos>`), if the model has one.
    pub bos_token: Option<String>,
    /// EOS text.
    pub eos_token: Option<String>,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// Id used for padding.
    pub pad_id: u32,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(m)) => m.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Read `tokenizer.json` and `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        if !tp.exists() {
            return Err(Error::MissingFile { path: tp, what: "tokenizer".into() });
        }
        let inner =
            Tokenizer::from_file(&tp).map_err(|e| Error::bad_file(&tp, format!("bad tokenizer: {e}")))?;
        let tc = dir.join("tokenizer_config.json");
        let tcv: Value = if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::bad_file(&tc, e))?;
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&tc, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let bos = token_text(tcv.get("bos_token"));
        let eos = token_text(tcv.get("eos_token"));
        Ok(Self::assemble(inner, bos, eos, cfg))
    }

    /// Combine a tokenizer with its special-token texts and the config's EOS ids.
    pub fn assemble(inner: Tokenizer, bos: Option<String>, eos: Option<String>, cfg: &ModelConfig) -> Self {
        let mut stop_ids = cfg.eos_token_ids.clone();
        for s in [
            eos.as_deref(),
            Some("<end_of_turn>"),
            Some("<|im_end|>"),
            Some("<|endoftext|>"),
            Some("<|eot_id|>"),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(id) = inner.token_to_id(s) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort();
        stop_ids.dedup();
        let pad_id = ["<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|s| inner.token_to_id(s))
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);
        TextTokenizer { inner, bos_token: bos, eos_token: eos, stop_ids, pad_id }
    }

    /// Encode text that already contains any special tokens it needs (templates insert BOS themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(Error::tokenizer)?.get_ids().to_vec())
    }

    /// Decode ids to text, keeping special tokens visible when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.inner.decode(ids, !keep_special).map_err(Error::tokenizer)
    }

    /// The text of one token (for heat maps).
    pub fn token_str(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
