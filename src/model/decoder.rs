//! Our decoder: Llama, Qwen3 and Gemma-3 text in one layer loop, chosen by `ModelConfig` flags.
//!
//! Three numerical paths share every weight:
//! - `Path::Inference` uses candle's fused CPU kernels (softmax, RMSNorm, RoPE) and is meant for no-grad use:
//!   those kernels have no backward pass and silently drop gradients;
//! - `Path::Composite` is built only from differentiable candle ops;
//! - `Path::Training` is `Composite` with RMSNorm, RoPE, the attention softmax and the gated MLP replaced, on
//!   CPU f32, by our kernels that carry their own backward (`model::fused`, the `kernels/` crate): same values
//!   and gradients, fewer passes.
//!
//! GQA is computed by folding the query heads of a group into the sequence axis, so K and V are never copied per
//! query head. Hooks (capture, steering) run after each block; see `hook.rs`.

use super::batched::batched_product;
use super::cache::KvCache;
use super::codes::WeightCodes;
use super::config::{Activation, ModelConfig};
use super::fused;
use super::hook::{CapturePositions, Hooks};
use super::lora::{Adapters, LoraLinear};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::BTreeMap;

/// Which numerical path a forward pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no gradients.
    Inference,
    /// Differentiable: the composite ops, with `model::fused`'s kernels (own backward) where they apply.
    Training,
    /// Differentiable candle ops only: the slower reference path the training kernels are checked against.
    Composite,
}

/// Which positions get vocabulary logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every position: `[b, t, vocab]`.
    All,
    /// The last position only: `[b, 1, vocab]`.
    Last,
    /// Positions `p..t` only: `[b, t - p, vocab]`. For a pass that reads a tail of its positions (the eval's
    /// forced answer), the vocabulary projection of the others is wasted work and memory (on Gemma's 262k
    /// vocabulary, a batch of suffixes at every position is gigabytes of logits).
    From(usize),
    /// No logits (capture-only passes).
    None,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// Capture and steering hooks.
    pub hooks: &'a Hooks,
    /// Left-padding length per batch row (empty: no padding).
    pub pad: &'a [usize],
    /// Which logits to compute.
    pub logits: LogitsAt,
    /// Numerical path.
    pub path: Path,
    /// Which adapters take part (all at their gates, none, or all but one).
    pub adapters: Adapters<'a>,
}

impl<'a> Forward<'a> {
    /// Plain inference with the given hooks, logits at every position.
    pub fn infer(hooks: &'a Hooks) -> Self {
        Forward { hooks, pad: &[], logits: LogitsAt::All, path: Path::Inference, adapters: Adapters::AsGated }
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Output {
    /// Logits, shaped as `LogitsAt` says; `None` when not requested.
    pub logits: Option<Tensor>,
    /// Captured residual streams by block index.
    pub hidden: BTreeMap<usize, Tensor>,
}

/// RMSNorm with its effective weight (Gemma's `1 + w` is folded in at load time).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Effective multiplier applied after normalisation.
    pub weight: Tensor,
    /// Epsilon inside the square root.
    pub eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        Ok(match path {
            Path::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?,
            Path::Training if fused::applies(x) => fused::rms_norm(x, &self.weight, self.eps)?,
            Path::Training | Path::Composite => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?
            }
        })
    }
}

/// Self-attention of one block.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

/// Gated MLP of one block.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    /// Llama/Qwen: the norm before the MLP. Gemma: the norm on the attention output.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma only: the norm before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    /// Gemma only: the norm on the MLP output.
    pub post_feedforward_layernorm: Option<RmsNorm>,
    /// Sliding-window (local) layer.
    pub sliding: bool,
}

/// Names of the projections a block holds, in a fixed order.
pub const PROJECTIONS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl Block {
    /// The projection with the given name (one of `PROJECTIONS`).
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut LoraLinear> {
        Some(match name {
            "q_proj" => &mut self.attn.q_proj,
            "k_proj" => &mut self.attn.k_proj,
            "v_proj" => &mut self.attn.v_proj,
            "o_proj" => &mut self.attn.o_proj,
            "gate_proj" => &mut self.mlp.gate_proj,
            "up_proj" => &mut self.mlp.up_proj,
            "down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }
    /// Read-only access to a projection.
    pub fn projection(&self, name: &str) -> Option<&LoraLinear> {
        Some(match name {
            "q_proj" => &self.attn.q_proj,
            "k_proj" => &self.attn.k_proj,
            "v_proj" => &self.attn.v_proj,
            "o_proj" => &self.attn.o_proj,
            "gate_proj" => &self.mlp.gate_proj,
            "up_proj" => &self.mlp.up_proj,
            "down_proj" => &self.mlp.down_proj,
            _ => return None,
        })
    }
}

/// Precomputed RoPE tables `[max_pos, head_dim/2]`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        base: f64,
        scale: f64,
        head_dim: usize,
        max_pos: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| (1.0 / base.powf(2.0 * i as f64 / head_dim as f64) / scale) as f32).collect();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, max_pos as u32, dev)?.to_dtype(DType::F32)?.reshape((max_pos, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Rope { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }
}

/// The whole decoder.
#[derive(Debug, Clone)]
pub struct Model {
    /// Shapes and numerics.
    pub cfg: ModelConfig,
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// The embeddings' block codes, for the tied head's decode-step products (`codes`).
    pub embed_codes: Option<WeightCodes>,
    /// Blocks, in order.
    pub layers: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output head; `None` when tied to the embeddings.
    pub lm_head: Option<LoraLinear>,
    rope_global: Rope,
    rope_local: Rope,
    rope_len: usize,
    device: Device,
    dtype: DType,
}

/// Where the decoder reads its tensors from (safetensors, GGUF, random init).
pub trait WeightSource {
    /// The tensor `name`, checked to have `shape`, in `dtype` on `dev`.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor>;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Every tensor name it holds (to refuse weights the config does not use).
    fn names(&self) -> Vec<String>;
    /// The file or folder the weights came from, for messages.
    fn origin(&self) -> &std::path::Path;
    /// The block codes the tensor `name` was dequantised from, when the source keeps them (a GGUF's Q4_1 and
    /// Q8_0 matrices): the decode step's products read them (`codes`).
    fn codes(&self, _name: &str) -> Option<std::sync::Arc<steer_heal_kernels::blocks::BlockRows>> {
        None
    }
}

/// A weight source that remembers which tensors the decoder took.
struct Tracked<'a> {
    ws: &'a dyn WeightSource,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Tracked<'_> {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        self.used.borrow_mut().insert(name.to_string());
        self.ws.get(name, shape, dtype, dev)
    }

    /// A tensor the config does not use means the config and the weights disagree (a wrong block count, a
    /// relabelled architecture): refuse it rather than run a different model than the file holds.
    fn all_used(&self, cfg: &ModelConfig) -> Result<()> {
        let used = self.used.borrow();
        let mut unused: Vec<String> = self.ws.names().into_iter().filter(|n| !used.contains(n)).collect();
        unused.sort();
        let Some(first) = unused.first() else { return Ok(()) };
        let block =
            |n: &str| -> Option<usize> { n.strip_prefix("model.layers.")?.split('.').next()?.parse().ok() };
        let n = cfg.num_hidden_layers;
        let arch = cfg.arch.model_type();
        let reason = if let Some(top) = unused.iter().filter_map(|u| block(u)).filter(|b| *b >= n).max() {
            format!(
                "the config says {n} blocks (num_hidden_layers / block_count) but the weights hold {} (tensor `{}` \
                 is unused)",
                top + 1,
                unused.iter().find(|u| block(u).is_some_and(|b| b >= n)).unwrap_or(first)
            )
        } else if unused.iter().any(|u| u.contains("q_norm") || u.contains("k_norm")) {
            format!(
                "tensor `{}` (a per-head q/k norm, as Qwen3 and Gemma-3 have) is not used by `{arch}`: is the \
                 architecture (`model_type` / `general.architecture`) right?",
                unused.iter().find(|u| u.contains("q_norm") || u.contains("k_norm")).unwrap_or(first)
            )
        } else {
            format!(
                "{} tensor(s) the `{arch}` config does not use, first `{first}`: the config and the weights disagree",
                unused.len()
            )
        };
        Err(Error::bad_file(self.ws.origin(), reason))
    }
}

/// Longest RoPE table built up front; longer contexts are rejected with a clear error.
const MAX_ROPE: usize = 8192;

impl Model {
    /// Bytes of weights a batch-1 decode step reads: every projection and the head once, from their block codes
    /// where they have them (`codes`), else as their tensors; norms included, the embedding rows looked up not.
    pub fn weight_bytes_per_token(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let linear = |l: &LoraLinear| {
            let frozen = l.codes.as_ref().map_or_else(|| bytes(&l.weight), |c| c.bytes());
            frozen
                + l.bias.as_ref().map_or(0, bytes)
                + l.adapters.iter().map(|a| bytes(&a.a) + bytes(&a.b)).sum::<usize>()
        };
        let head = match &self.lm_head {
            Some(l) => linear(l),
            None => self.embed_codes.as_ref().map_or_else(|| bytes(&self.embed_tokens), |c| c.bytes()),
        };
        let norm = |n: &Option<RmsNorm>| n.as_ref().map_or(0, |n| bytes(&n.weight));
        let blocks: usize = self
            .layers
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .into_iter()
                    .map(linear)
                    .sum::<usize>()
                    + bytes(&b.input_layernorm.weight)
                    + bytes(&b.post_attention_layernorm.weight)
                    + norm(&b.pre_feedforward_layernorm)
                    + norm(&b.post_feedforward_layernorm)
                    + norm(&a.q_norm)
                    + norm(&a.k_norm)
            })
            .sum();
        blocks + head + bytes(&self.norm.weight)
    }

    /// Every projection that can carry adapters: each block's seven, then the untied head.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        let blocks = self.layers.iter_mut().flat_map(|b| {
            let Block { attn, mlp, .. } = b;
            [
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut attn.o_proj,
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
                &mut mlp.down_proj,
            ]
        });
        blocks.chain(self.lm_head.as_mut())
    }

    /// Fold every attached adapter into its base weight at its current gate and drop the adapters. Adapters at
    /// gate 0 are skipped, so those weights stay exactly as they were.
    pub fn merge_adapters(&mut self) -> Result<()> {
        for lin in self.linears_mut() {
            if !lin.adapters.is_empty() {
                lin.merge()?;
            }
        }
        Ok(())
    }

    /// A copy with every active adapter merged into its weight, or `None` when no adapter is active (the model is
    /// then its own merged form). Inference that runs many forwards (an eval) is faster on it: one product per
    /// projection instead of one plus two rank-r ones per attached adapter. The copy shares every unmerged
    /// tensor with `self`.
    pub fn merged_copy(&self) -> Result<Option<Model>> {
        // The clone only shares tensors until the merge writes new weights.
        let mut copy = self.clone();
        if !copy.linears_mut().any(|l| l.adapters.iter().any(|a| a.gate != 0.0)) {
            return Ok(None);
        }
        copy.merge_adapters()?;
        Ok(Some(copy))
    }

    /// Build a model from a weight source using Hugging Face tensor names.
    pub fn load(cfg: &ModelConfig, ws: &dyn WeightSource, dtype: DType, dev: &Device) -> Result<Self> {
        let tracked = Tracked { ws, used: Default::default() };
        let model = Self::load_tracked(cfg, &tracked, dtype, dev)?;
        tracked.all_used(cfg)?;
        Ok(model)
    }

    fn load_tracked(cfg: &ModelConfig, ws: &Tracked, dtype: DType, dev: &Device) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
            let w = ws.get(name, &[dim], dtype, dev)?;
            let w = if cfg.norm_plus_one() { (w + 1.0)? } else { w };
            Ok(RmsNorm { weight: w, eps: cfg.rms_norm_eps })
        };
        let lin = |name: &str, o: usize, i: usize, bias: bool| -> Result<LoraLinear> {
            let w = ws.get(&format!("{name}.weight"), &[o, i], dtype, dev)?;
            let b = if bias { Some(ws.get(&format!("{name}.bias"), &[o], dtype, dev)?) } else { None };
            Ok(LoraLinear::new(w, b).with_codes(ws.ws.codes(&format!("{name}.weight"))))
        };
        let embed_tokens = ws.get("model.embed_tokens.weight", &[cfg.vocab_size, h], dtype, dev)?;
        let embed_codes =
            ws.ws.codes("model.embed_tokens.weight").and_then(|c| WeightCodes::for_weight(&embed_tokens, c));
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qd = cfg.num_attention_heads * hd;
            let kvd = cfg.num_key_value_heads * hd;
            let ab = cfg.attention_bias;
            let attn = Attention {
                q_proj: lin(&format!("{p}.self_attn.q_proj"), qd, h, ab)?,
                k_proj: lin(&format!("{p}.self_attn.k_proj"), kvd, h, ab)?,
                v_proj: lin(&format!("{p}.self_attn.v_proj"), kvd, h, ab)?,
                o_proj: lin(&format!("{p}.self_attn.o_proj"), h, qd, false)?,
                q_norm: if cfg.qk_norm() {
                    Some(norm(&format!("{p}.self_attn.q_norm.weight"), hd)?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm() {
                    Some(norm(&format!("{p}.self_attn.k_norm.weight"), hd)?)
                } else {
                    None
                },
            };
            let m = cfg.intermediate_size;
            let mlp = Mlp {
                gate_proj: lin(&format!("{p}.mlp.gate_proj"), m, h, false)?,
                up_proj: lin(&format!("{p}.mlp.up_proj"), m, h, false)?,
                down_proj: lin(&format!("{p}.mlp.down_proj"), h, m, false)?,
            };
            let gemma = cfg.norm_plus_one();
            layers.push(Block {
                attn,
                mlp,
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                pre_feedforward_layernorm: if gemma {
                    Some(norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?)
                } else {
                    None
                },
                post_feedforward_layernorm: if gemma {
                    Some(norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?)
                } else {
                    None
                },
                sliding: cfg.sliding_layers[i],
            });
        }
        let norm_f = norm("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !ws.ws.contains("lm_head.weight") {
            None
        } else {
            Some(lin("lm_head", cfg.vocab_size, h, false)?)
        };
        let rope_len = cfg.max_position_embeddings.clamp(1, MAX_ROPE);
        let rope_global = Rope::new(cfg.rope_theta, cfg.rope_scaling_factor, hd, rope_len, dtype, dev)?;
        let rope_local = Rope::new(cfg.rope_local_base_freq, 1.0, hd, rope_len, dtype, dev)?;
        Ok(Model {
            cfg: cfg.clone(),
            embed_tokens,
            embed_codes,
            layers,
            norm: norm_f,
            lm_head,
            rope_global,
            rope_local,
            rope_len,
            device: dev.clone(),
            dtype,
        })
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Run the decoder on `ids` `[b, t]`, appending to `cache` when given (its length is the position offset).
    pub fn forward(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, f: &Forward) -> Result<Output> {
        let (b, t) = ids.dims2()?;
        if t == 0 {
            return Err(Error::invalid("forward called with an empty sequence"));
        }
        if !f.pad.is_empty() && f.pad.len() != b {
            return Err(Error::invalid(format!("pad has {} rows, batch has {b}", f.pad.len())));
        }
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if offset + t > self.rope_len {
            return Err(Error::invalid(format!(
                "sequence of {} tokens exceeds the supported context of {}",
                offset + t,
                self.rope_len
            )));
        }
        if let Some(c) = cache.as_ref() {
            if !c.pad().is_empty() && c.pad() != f.pad && offset > 0 {
                return Err(Error::invalid("padding changed between cached forward passes"));
            }
        }
        if let Some(c) = cache.as_mut() {
            c.set_pad(f.pad.to_vec());
        }
        let mut xs =
            self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        if let Some(s) = self.cfg.embed_scale() {
            // Gemma multiplies in the activation dtype.
            let s = Tensor::new(s as f32, &self.device)?.to_dtype(self.dtype)?;
            xs = xs.broadcast_mul(&s)?;
        }
        let kv_len = offset + t;
        let (cos_g, sin_g) = rope_tables(&self.rope_global, b, t, offset, f.pad, &self.device)?;
        let (cos_l, sin_l) = if self.cfg.sliding_layers.iter().any(|s| *s) {
            rope_tables(&self.rope_local, b, t, offset, f.pad, &self.device)?
        } else {
            (cos_g.clone(), sin_g.clone())
        };
        let mask_g = build_mask(b, t, offset, f.pad, None, self.dtype, &self.device)?;
        let mask_l = match self.cfg.sliding_window {
            Some(w) if self.cfg.sliding_layers.iter().any(|s| *s) => {
                build_mask(b, t, offset, f.pad, Some(w), self.dtype, &self.device)?
            }
            _ => mask_g.clone(),
        };
        let mut hidden = BTreeMap::new();
        let hooked = !f.hooks.is_empty();
        for (li, layer) in self.layers.iter().enumerate() {
            let (cos, sin, mask) =
                if layer.sliding { (&cos_l, &sin_l, &mask_l) } else { (&cos_g, &sin_g, &mask_g) };
            let kv = cache.as_mut().map(|c| (&mut **c, li));
            xs = self.block_forward(layer, &xs, cos, sin, mask.as_ref(), kv, f.path, f.adapters)?;
            if hooked {
                xs = apply_hooks(li, xs, f.hooks, offset, &mut hidden)?;
            }
        }
        if let Some(c) = cache.as_mut() {
            c.advance(t);
        }
        debug_assert!(kv_len == offset + t);
        let logits = match f.logits {
            LogitsAt::None => None,
            LogitsAt::All => Some(self.head(&xs, f.path)?),
            LogitsAt::Last => Some(self.head(&xs.narrow(1, t - 1, 1)?, f.path)?),
            LogitsAt::From(p) if p < t => Some(self.head(&xs.narrow(1, p, t - p)?, f.path)?),
            LogitsAt::From(p) => {
                return Err(Error::invalid(format!("logits from position {p} of a {t}-token pass")));
            }
        };
        Ok(Output { logits, hidden })
    }

    /// Final norm, vocabulary projection and soft-capping of hidden states `[b, t, hidden]` taken after the last
    /// block, e.g. a capture narrowed to the positions that need logits (training skips the prompt's positions).
    pub fn logits_from_hidden(&self, xs: &Tensor, path: Path) -> Result<Tensor> {
        self.head(xs, path)
    }

    /// Final norm, vocabulary projection and optional soft-capping.
    fn head(&self, xs: &Tensor, path: Path) -> Result<Tensor> {
        let xs = self.norm.forward(xs, path)?;
        let logits = match &self.lm_head {
            Some(l) => l.forward(&xs)?,
            None => {
                let (b, t, h) = xs.dims3()?;
                let x2 = xs.reshape((b * t, h))?;
                super::lora::frozen_matmul_wt_coded(&x2, &self.embed_tokens, self.embed_codes.as_ref())?
                    .reshape((b, t, self.cfg.vocab_size))?
            }
        };
        Ok(match self.cfg.final_logit_softcapping {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        layer: &Block,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<(&mut KvCache, usize)>,
        path: Path,
        sel: Adapters,
    ) -> Result<Tensor> {
        let residual = xs;
        let h = layer.input_layernorm.forward(xs, path)?;
        let h = self.attention(&layer.attn, &h, cos, sin, mask, kv, path, sel)?;
        let xs = if let Some(post_ff) = &layer.post_feedforward_layernorm {
            let h = layer.post_attention_layernorm.forward(&h, path)?;
            let xs = (residual + h)?;
            let pre = layer.pre_feedforward_layernorm.as_ref().ok_or_else(|| Error::invalid("gemma norm"))?;
            let m = self.mlp(&layer.mlp, &pre.forward(&xs, path)?, path, sel)?;
            (xs + post_ff.forward(&m, path)?)?
        } else {
            let xs = (residual + h)?;
            let m = self.mlp(&layer.mlp, &layer.post_attention_layernorm.forward(&xs, path)?, path, sel)?;
            (xs + m)?
        };
        Ok(xs)
    }

    fn mlp(&self, mlp: &Mlp, xs: &Tensor, path: Path, sel: Adapters) -> Result<Tensor> {
        let g = mlp.gate_proj.forward_with(xs, sel)?;
        if path == Path::Training && fused::applies(&g) {
            let act = match self.cfg.activation {
                Activation::Silu => fused::GluActivation::Silu,
                Activation::GeluTanh => fused::GluActivation::GeluTanh,
            };
            let u = mlp.up_proj.forward_with(xs, sel)?;
            return Ok(mlp.down_proj.forward_with(&fused::glu(&g, &u, act)?, sel)?);
        }
        let g = match self.cfg.activation {
            Activation::Silu => g.silu()?,
            Activation::GeluTanh => g.gelu()?,
        };
        let u = mlp.up_proj.forward_with(xs, sel)?;
        Ok(mlp.down_proj.forward_with(&(g * u)?, sel)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        at: &Attention,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<(&mut KvCache, usize)>,
        path: Path,
        sel: Adapters,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let nkv = self.cfg.num_key_value_heads;
        let hd = self.cfg.head_dim;
        let q = at.q_proj.forward_with(xs, sel)?.reshape((b, t, nh, hd))?;
        let k = at.k_proj.forward_with(xs, sel)?.reshape((b, t, nkv, hd))?;
        let v = at.v_proj.forward_with(xs, sel)?.reshape((b, t, nkv, hd))?;
        let q = match &at.q_norm {
            Some(n) => n.forward(&q, path)?,
            None => q,
        };
        let k = match &at.k_norm {
            Some(n) => n.forward(&k, path)?,
            None => k,
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = apply_rope(&q, cos, sin, path)?;
        let k = apply_rope(&k, cos, sin, path)?;
        let (k, v) = match kv {
            Some((cache, li)) => cache.append(li, &k, &v)?,
            None => (k, v),
        };
        // One pass per query row over the cache's buffers, straight into the output projection's layout, where the
        // kernels module says it is the faster way for this shape.
        if path == Path::Inference
            && fused::attention::preferred(b, nkv, t, hd)
            && fused::applies(&q)
            && !q.track_op()
            && !k.track_op()
            && !v.track_op()
        {
            let softcap = self.cfg.attn_logit_softcapping;
            let out = fused::attention::attention(&q, &k, &v, mask, self.cfg.attn_scale(), softcap)?;
            return Ok(at.o_proj.forward_with(&out, sel)?);
        }
        let s = k.dim(2)?;
        let rep = nh / nkv;
        // Fold each group's query heads into the sequence axis: [b, nkv, rep*t, hd] against [b, nkv, s, hd].
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let (raw, probs, out);
        if path == Path::Training {
            // One BLAS product per (sequence, key-value head), forward and backward (model::batched).
            let qg = qg.reshape((b * nkv, rep * t, hd))?;
            raw = batched_product(&qg, &k.reshape((b * nkv, s, hd))?, true)?.reshape((b, nh, t, s))?;
            probs = self.attention_probs(&raw, mask, path)?;
            let p = probs.reshape((b * nkv, rep * t, s))?;
            out = batched_product(&p, &v.reshape((b * nkv, s, hd))?, false)?;
        } else {
            raw = qg.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
            probs = self.attention_probs(&raw, mask, path)?;
            out = probs.reshape((b, nkv, rep * t, s))?.matmul(&v)?;
        }
        let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(at.o_proj.forward_with(&out, sel)?)
    }

    /// Attention probabilities from raw scores `q·kᵀ` `[b, nh, t, s]`: scale, soft-capping, mask, softmax.
    fn attention_probs(&self, raw: &Tensor, mask: Option<&Tensor>, path: Path) -> Result<Tensor> {
        if path == Path::Training && fused::applies(raw) && self.cfg.attn_logit_softcapping.is_none() {
            // Scale, mask and softmax in one pass each way.
            return Ok(fused::attention_probs(raw, self.cfg.attn_scale(), mask)?);
        }
        let scores = (raw * self.cfg.attn_scale())?;
        let scores = match self.cfg.attn_logit_softcapping {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        };
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        Ok(match path {
            Path::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
            Path::Training | Path::Composite => {
                let max = scores.max_keepdim(D::Minus1)?.detach();
                let e = scores.broadcast_sub(&max)?.exp()?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            }
        })
    }
}

/// RoPE on `[b, h, t, d]` with tables `[t, d/2]` or `[b, t, d/2]` (HF "rotate half" layout).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    Ok(match path {
        Path::Inference => candle_nn::rotary_emb::rope(x, cos, sin)?,
        Path::Training if fused::applies(x) => fused::rope(x, cos, sin)?,
        Path::Training | Path::Composite => composite_rope(x, cos, sin)?,
    })
}

/// RoPE from differentiable candle ops: the composite path, and the reference `fused::rope` is tested against.
pub(crate) fn composite_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let (cos, sin) = if cos.rank() == 2 {
        (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?)
    } else {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    };
    let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
    let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

/// Cos/sin for the positions of this call: `[t, d/2]` without padding, else `[b, t, d/2]` with each row's
/// real tokens starting at position 0.
fn rope_tables(
    rope: &Rope,
    b: usize,
    t: usize,
    offset: usize,
    pad: &[usize],
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    if pad.iter().all(|p| *p == 0) {
        return Ok((rope.cos.narrow(0, offset, t)?, rope.sin.narrow(0, offset, t)?));
    }
    let mut pos = Vec::with_capacity(b * t);
    for &p in pad {
        for i in 0..t {
            pos.push((offset + i).saturating_sub(p) as u32);
        }
    }
    let idx = Tensor::from_vec(pos, b * t, dev)?;
    let half = rope.cos.dim(1)?;
    let cos = rope.cos.index_select(&idx, 0)?.reshape((b, t, half))?;
    let sin = rope.sin.index_select(&idx, 0)?.reshape((b, t, half))?;
    Ok((cos, sin))
}

/// Additive attention mask `[b, 1, t, offset+t]`, or `None` when every key is visible to every query.
/// Masks future keys, left-pad keys, and keys at distance ≥ `window` (Hugging Face's sliding semantics).
/// A padded query may see itself so its softmax row is never empty.
pub(crate) fn build_mask(
    b: usize,
    t: usize,
    offset: usize,
    pad: &[usize],
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let s = offset + t;
    let padded = pad.iter().any(|p| *p > 0);
    let windowed = window.map(|w| s > w).unwrap_or(false);
    if t == 1 && !padded && !windowed {
        return Ok(None);
    }
    let rows = if padded { b } else { 1 };
    let mut m = vec![0f32; rows * t * s];
    for r in 0..rows {
        let p = if padded { pad[r] } else { 0 };
        for i in 0..t {
            let qi = offset + i;
            for j in 0..s {
                let future = j > qi;
                let pad_key = j < p && j != qi;
                let far = window.map(|w| qi >= j + w).unwrap_or(false);
                if future || pad_key || far {
                    m[(r * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let m = Tensor::from_vec(m, (rows, 1, t, s), dev)?.to_dtype(dtype)?;
    Ok(Some(m))
}

/// Run the hooks of block `li` on its output.
fn apply_hooks(
    li: usize,
    mut xs: Tensor,
    hooks: &Hooks,
    offset: usize,
    hidden: &mut BTreeMap<usize, Tensor>,
) -> Result<Tensor> {
    for st in hooks.steer.iter().filter(|s| s.layer == li) {
        let (b, t, h) = xs.dims3()?;
        if st.vector.dims() != [h] {
            return Err(Error::invalid(format!(
                "steering vector for layer {li} has shape {:?}, the model's hidden size is {h}",
                st.vector.dims()
            )));
        }
        if st.start >= offset + t {
            continue;
        }
        let v = st.vector.to_dtype(xs.dtype())?.reshape((1, 1, h))?;
        let c = match st.coeffs.len() {
            1 => Tensor::new(&[st.coeffs[0]], xs.device())?.reshape((1, 1, 1))?,
            n if n == b => Tensor::from_vec(st.coeffs.clone(), (b, 1, 1), xs.device())?,
            n => return Err(Error::invalid(format!("{n} steering coefficients for a batch of {b}"))),
        }
        .to_dtype(xs.dtype())?;
        let mut add = c.broadcast_mul(&v)?;
        if st.start > offset {
            // Only positions ≥ start: a 0/1 column over this call's positions.
            let on: Vec<f32> = (0..t).map(|i| if offset + i >= st.start { 1.0 } else { 0.0 }).collect();
            let on = Tensor::from_vec(on, (1, t, 1), xs.device())?.to_dtype(xs.dtype())?;
            add = add.broadcast_mul(&on)?;
        }
        xs = xs.broadcast_add(&add)?;
    }
    if let Some(cap) = &hooks.capture {
        if cap.layers.contains(&li) {
            let t = xs.dim(1)?;
            let kept = match cap.positions {
                CapturePositions::All => xs.clone(),
                CapturePositions::Last => xs.narrow(1, t - 1, 1)?.squeeze(1)?,
            };
            hidden.insert(li, kept);
        }
    }
    Ok(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_rope_matches_the_composite_rope_with_shared_and_per_row_tables() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2usize, 3usize, 40usize, 16usize);
        let x = candle_core::Var::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        for table in [vec![t, d / 2], vec![b, t, d / 2]] {
            let ang = Tensor::randn(0f32, 2.0, table.as_slice(), &dev)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let probe = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
            let yf = fused::rope(x.as_tensor(), &cos, &sin)?;
            let yc = composite_rope(x.as_tensor(), &cos, &sin)?;
            let gf = (&yf * &probe)?.sum_all()?.backward()?;
            let gc = (&yc * &probe)?.sum_all()?.backward()?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
            };
            let (gf, gc) =
                (gf.get(&x).ok_or(Error::invalid("grad"))?, gc.get(&x).ok_or(Error::invalid("grad"))?);
            assert!(diff(&yf, &yc)? < 1e-5 && diff(gf, gc)? < 1e-5, "{table:?}");
            assert!(gc.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn sliding_mask_follows_hf_semantics() -> Result<()> {
        let m = build_mask(1, 5, 0, &[], Some(2), DType::F32, &Device::Cpu)?.ok_or(Error::invalid("mask"))?;
        let v: Vec<Vec<f32>> = m.squeeze(0)?.squeeze(0)?.to_vec2()?;
        // query 3 sees keys 2 and 3 only (distance < window)
        let visible: Vec<usize> = (0..5).filter(|&j| v[3][j] == 0.0).collect();
        assert_eq!(visible, vec![2, 3]);
        Ok(())
    }

    #[test]
    fn padded_queries_never_have_empty_rows() -> Result<()> {
        let m =
            build_mask(2, 4, 0, &[2, 0], None, DType::F32, &Device::Cpu)?.ok_or(Error::invalid("mask"))?;
        let v: Vec<Vec<Vec<Vec<f32>>>> =
            m.to_vec3::<f32>().map(|_| vec![]).or_else(|_| Ok::<_, Error>(vec![]))?;
        let _ = v;
        let flat: Vec<f32> = m.flatten_all()?.to_vec1()?;
        for row in flat.chunks(4) {
            assert!(row.iter().any(|x| x.is_finite()));
        }
        // row 0, query 3 (real) must not see pad keys 0 and 1
        let r0q3 = &flat[3 * 4..4 * 4];
        assert_eq!(r0q3[0], f32::NEG_INFINITY);
        assert_eq!(r0q3[1], f32::NEG_INFINITY);
        assert_eq!(r0q3[2], 0.0);
        Ok(())
    }
}
