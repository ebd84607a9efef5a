//! What a decoder looks like: one `ModelConfig` for every architecture we run, read from a Hugging Face
//! `config.json` (or built from GGUF metadata). Architecture differences are flags, not separate models.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The decoder families we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama / SmolLM2: RMSNorm, SwiGLU, RoPE, GQA.
    Llama,
    /// Qwen3: Llama plus RMSNorm on per-head q and k.
    Qwen3,
    /// Gemma-3 text: scaled embeddings, (1+w) norms, sandwich norms, gelu-tanh, local/global layers.
    Gemma3,
}

impl Arch {
    /// The `model_type` string Hugging Face uses for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3_text",
        }
    }
    /// Parse a `model_type` (or GGUF `general.architecture`) string.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "mistral" => Some(Arch::Llama),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3_text" | "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }
}

/// MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SiLU-gated (SwiGLU).
    Silu,
    /// tanh-approximated GELU, gated (GeGLU) as in Gemma.
    GeluTanh,
}

/// Everything the decoder needs to know about shapes and numerics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of global (full-attention) layers.
    pub rope_theta: f64,
    /// RoPE base of sliding-window layers (Gemma-3); equals `rope_theta` elsewhere.
    pub rope_local_base_freq: f64,
    /// Linear RoPE scaling factor for global layers (Gemma-3 4B+); 1.0 means none.
    pub rope_scaling_factor: f64,
    /// Sliding window size for local layers, if any.
    pub sliding_window: Option<usize>,
    /// Per layer: true when it is a sliding-window (local) layer.
    pub sliding_layers: Vec<bool>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub activation: Activation,
    /// Attention scale is `query_pre_attn_scalar^-0.5` (Gemma) instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Attention logit scale.
    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }
    /// Gemma's embedding multiplier (√hidden); 1 elsewhere.
    pub fn embed_scale(&self) -> Option<f64> {
        (self.arch == Arch::Gemma3).then(|| (self.hidden_size as f64).sqrt())
    }
    /// Gemma stores RMSNorm weights as `w` and applies `1 + w`.
    pub fn norm_plus_one(&self) -> bool {
        self.arch == Arch::Gemma3
    }
    /// Whether q/k get a per-head RMSNorm.
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Gemma3)
    }
    /// Default steering band: layers in the 0.45–0.55 fraction of depth (at least one layer).
    pub fn layer_band(&self, lo: f64, hi: f64) -> Vec<usize> {
        let n = self.num_hidden_layers;
        let a = (lo * n as f64) as usize;
        let b = ((hi * n as f64) as usize).max(a + 1).min(n);
        (a.min(n.saturating_sub(1))..b).collect()
    }

    /// Check internal consistency so later shape errors cannot happen.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |r: String| Err(Error::bad_file(path, r));
        if self.num_hidden_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            return bad("layer_types length differs from num_hidden_layers".into());
        }
        if self.num_attention_heads == 0 || self.head_dim == 0 || self.intermediate_size == 0 {
            return bad("num_attention_heads, head_dim and intermediate_size must be positive".into());
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        // Values that must be finite and > 0: an epsilon of −1 or a RoPE base of 0 runs, but not as a model.
        let positive = [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("rope_theta", Some(self.rope_theta)),
            ("rope_local_base_freq", Some(self.rope_local_base_freq)),
            ("rope_scaling factor", Some(self.rope_scaling_factor)),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ];
        for (name, v) in positive {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return bad(format!("{name} is {v}; it must be a positive number"));
            }
        }
        Ok(())
    }

    /// Read a Hugging Face `config.json`. Multimodal Gemma-3 configs are read through their `text_config`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingFile { path: path.to_path_buf(), what: "model config".into() }
            }
            _ => Error::bad_file(path, e),
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_value(&v, path)
    }

    /// Build from an already parsed `config.json` value; `path` only names the source in errors.
    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let v = match v.get("text_config") {
            Some(t) if t.is_object() => t,
            _ => v,
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_file(path, "no `model_type` field"))?;
        let arch = Arch::parse(model_type)
            .ok_or_else(|| Error::UnknownArch { path: path.to_path_buf(), arch: model_type.to_string() })?;
        let req = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::bad_file(path, format!("missing or non-integer `{k}`")))
        };
        let opt_f = |k: &str| v.get(k).and_then(Value::as_f64);
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_hidden_layers = req("num_hidden_layers")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(Error::bad_file(path, "num_attention_heads must be positive"));
        }
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        let rope_theta = opt_f("rope_theta").unwrap_or(if arch == Arch::Gemma3 { 1e6 } else { 1e4 });
        let sliding_window = if arch == Arch::Gemma3 {
            v.get("sliding_window").and_then(Value::as_u64).map(|x| x as usize)
        } else {
            None
        };
        let sliding_layers: Vec<bool> = if arch != Arch::Gemma3 {
            vec![false; num_hidden_layers]
        } else if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
            types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
        } else {
            let pattern = v.get("sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6) as usize;
            (0..num_hidden_layers).map(|i| pattern > 0 && (i + 1) % pattern != 0).collect()
        };
        let rope_scaling_factor = match v.get("rope_scaling") {
            Some(Value::Object(m)) => {
                let kind = m.get("rope_type").or_else(|| m.get("type")).and_then(Value::as_str).unwrap_or("");
                match kind {
                    "linear" => m.get("factor").and_then(Value::as_f64).unwrap_or(1.0),
                    "default" => 1.0,
                    other => {
                        return Err(Error::bad_file(
                            path,
                            format!("unsupported rope_scaling type `{other}` (supported: linear)"),
                        ))
                    }
                }
            }
            _ => 1.0,
        };
        let activation =
            match v.get("hidden_activation").or_else(|| v.get("hidden_act")).and_then(Value::as_str) {
                Some("silu") | Some("swish") | None if arch != Arch::Gemma3 => Activation::Silu,
                Some("gelu_pytorch_tanh") | Some("gelu") | None => Activation::GeluTanh,
                Some("silu") => Activation::Silu,
                Some(other) => {
                    return Err(Error::bad_file(path, format!("unsupported activation `{other}`")))
                }
            };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_local_base_freq: if arch == Arch::Gemma3 {
                opt_f("rope_local_base_freq").unwrap_or(1e4)
            } else {
                rope_theta
            },
            rope_scaling_factor,
            sliding_window,
            sliding_layers,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(8192),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(arch == Arch::Gemma3),
            attention_bias: v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            activation,
            query_pre_attn_scalar: if arch == Arch::Gemma3 { opt_f("query_pre_attn_scalar") } else { None },
            attn_logit_softcapping: opt_f("attn_logit_softcapping"),
            final_logit_softcapping: opt_f("final_logit_softcapping"),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Write the config as a Hugging Face `config.json` value (the fields both we and transformers read), each
    /// field with the JSON type transformers declares for it: transformers 5 validates configs strictly and refuses
    /// a float where it declares `int` ("Field 'query_pre_attn_scalar' expected int, got float"). Counts, sizes and
    /// token ids are integers; `rms_norm_eps`, the RoPE bases (`rope_theta`, Gemma's `rope_local_base_freq`,
    /// both `float` in transformers' `RopeParameters`) and the softcaps are floats. Gemma's
    /// `query_pre_attn_scalar` is an `int` there: it is written as one whenever it is integral (every released
    /// Gemma-3), else as the float it is, which transformers cannot express. The types are checked against
    /// transformers' declarations in `tests/hf_config_types.rs`.
    pub fn to_hf_value(&self) -> Value {
        let mut m = serde_json::json!({
            "model_type": self.arch.model_type(),
            "architectures": [match self.arch {
                Arch::Llama => "LlamaForCausalLM",
                Arch::Qwen3 => "Qwen3ForCausalLM",
                Arch::Gemma3 => "Gemma3ForCausalLM",
            }],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "torch_dtype": "float32",
        });
        let o = m.as_object_mut().expect("json! object literal");
        match self.activation {
            Activation::Silu => o.insert("hidden_act".into(), "silu".into()),
            Activation::GeluTanh => o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into()),
        };
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => None,
            [one] => o.insert("eos_token_id".into(), (*one).into()),
            many => o.insert("eos_token_id".into(), many.to_vec().into()),
        };
        if self.arch == Arch::Gemma3 {
            o.insert("rope_local_base_freq".into(), self.rope_local_base_freq.into());
            o.insert("sliding_window".into(), self.sliding_window.unwrap_or(4096).into());
            let types: Vec<&str> = self
                .sliding_layers
                .iter()
                .map(|s| if *s { "sliding_attention" } else { "full_attention" })
                .collect();
            o.insert("layer_types".into(), types.into());
            // Older readers (candle-transformers) use the pattern; exact when the layout is periodic.
            let pattern = self.sliding_layers.iter().position(|s| !s).map(|p| p + 1).unwrap_or(0);
            o.insert("sliding_window_pattern".into(), pattern.into());
            let scalar = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
            let scalar = if scalar.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&scalar) {
                Value::from(scalar as u64)
            } else {
                Value::from(scalar)
            };
            o.insert("query_pre_attn_scalar".into(), scalar);
            o.insert("attn_logit_softcapping".into(), self.attn_logit_softcapping.into());
            o.insert("final_logit_softcapping".into(), self.final_logit_softcapping.into());
            if self.rope_scaling_factor != 1.0 {
                o.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "linear", "factor": self.rope_scaling_factor}),
                );
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_pattern_marks_every_sixth_layer_global() {
        let v = serde_json::json!({"model_type":"gemma3_text","hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":12,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
            "vocab_size":10,"sliding_window":4,"sliding_window_pattern":6});
        let c = ModelConfig::from_hf_value(&v, Path::new("config.json")).expect("valid");
        let globals: Vec<usize> = (0..12).filter(|&i| !c.sliding_layers[i]).collect();
        assert_eq!(globals, vec![5, 11]);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn hf_round_trip() {
        let v = serde_json::json!({"model_type":"qwen3","hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":3,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
            "vocab_size":10,"eos_token_id":[1,2]});
        let c = ModelConfig::from_hf_value(&v, Path::new("c.json")).expect("valid");
        let back = ModelConfig::from_hf_value(&c.to_hf_value(), Path::new("c.json")).expect("valid");
        assert_eq!(c, back);
    }

    #[test]
    fn hf_fields_have_the_types_transformers_declares() -> Result<()> {
        // Gemma-3-270M as the GGUF reader builds it: the scalar arrives as a float. transformers 5 declares
        // `query_pre_attn_scalar: int` and refuses `256.0`; the RoPE bases are floats there.
        let v = serde_json::json!({"model_type":"gemma3_text","hidden_size":640,"intermediate_size":2048,
            "num_hidden_layers":18,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":256,
            "vocab_size":262144,"sliding_window":512,"query_pre_attn_scalar":256.0,"rope_theta":1000000,
            "rope_local_base_freq":10000,"max_position_embeddings":32768,"bos_token_id":2,"eos_token_id":[1,106]});
        let c = ModelConfig::from_hf_value(&v, Path::new("config.json"))?;
        let text = serde_json::to_string(&c.to_hf_value()).map_err(|e| Error::invalid(e.to_string()))?;
        let w: Value = serde_json::from_str(&text).map_err(|e| Error::invalid(e.to_string()))?;
        for k in
            ["query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "head_dim", "vocab_size"]
        {
            assert!(w[k].is_u64(), "`{k}` = {} should be an int", w[k]);
        }
        for k in ["rope_theta", "rope_local_base_freq", "rms_norm_eps"] {
            assert!(w[k].is_f64(), "`{k}` = {} should be a float", w[k]);
        }
        assert_eq!(w["query_pre_attn_scalar"], serde_json::json!(256));
        assert_eq!(w["eos_token_id"], serde_json::json!([1, 106]));
        assert_eq!(ModelConfig::from_hf_value(&w, Path::new("config.json"))?, c);
        Ok(())
    }

    #[test]
    fn band_is_middle_of_depth() {
        let v = serde_json::json!({"model_type":"llama","hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":30,"num_attention_heads":2,"vocab_size":10});
        let c = ModelConfig::from_hf_value(&v, Path::new("c.json")).expect("valid");
        assert_eq!(c.layer_band(0.45, 0.55), vec![13, 14, 15]);
    }
}
