//! The steering-vector file: per-layer directions in safetensors (`layer{i}.v`, f32 `[hidden]`) plus metadata
//! that says how the vector was made (model, weights hash, persona file hash, method, pairs, normalisation,
//! read position) and how it must be applied (hook site, operation, calibrated coefficient). Also the
//! steering arm a generation run uses: a vector, or the prompt-only control.

use super::kl::Statistic;
use super::persona::Persona;
use crate::error::{Error, Result};
use crate::model::{Hooks, LoadedModel, Model, ModelInfo};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Value of the `format` metadata key; bumped when the layout changes.
pub const VECTOR_FORMAT: &str = "steer-heal-vector/1";

/// Metadata key holding the JSON of [`VectorMeta`].
pub const META_KEY: &str = "steer_heal.vector";

/// Where in the network the vector is read and added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookSite {
    /// The residual stream after a whole block (attention and MLP applied).
    ResidualAfterBlock,
}

/// Which token's residual the extraction reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPosition {
    /// The last prompt token: the end of the assistant generation tag.
    LastPromptToken,
}

/// How the vector is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `h ← h + c·v` at every position of each listed layer.
    Add,
}

/// Per-layer normalisation of the direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Raw mean shift: c = 1 reproduces the persona-induced shift.
    None,
    /// Unit L2 norm per layer: c is in residual-norm units.
    L2,
}

/// How the directions were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Mean of persona-prompted residuals minus mean of opposite-prompted residuals.
    MeanDiff,
    /// Control: a Gaussian direction with the same per-layer norm as a mean-diff vector.
    RandomNormMatched,
    /// Control: no vector; the persona is put in the system prompt instead.
    PromptOnly,
    /// Read from a llama.cpp control-vector GGUF without steer-heal metadata.
    ImportedGguf,
}

/// The persona file a vector was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaRef {
    /// Persona name.
    pub name: String,
    /// File path or `builtin:<name>`.
    pub source: String,
    /// sha256 of the persona file.
    pub sha256: String,
}

impl PersonaRef {
    /// Reference a loaded persona.
    pub fn of(p: &Persona) -> Self {
        PersonaRef { name: p.spec.name.clone(), source: p.source.clone(), sha256: p.sha256.clone() }
    }
}

/// The iso-KL calibration stored with a vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Calibrated coefficient c*.
    pub coefficient: f64,
    /// Target value of the statistic, nats.
    pub target: f64,
    /// Statistic of per-token KL(steered ‖ base) that was targeted.
    pub statistic: Statistic,
    /// Tolerance on the statistic.
    pub tol: f64,
    /// Statistic measured at c*.
    pub achieved: f64,
    /// Whether |achieved − target| < tol.
    pub converged: bool,
    /// Whether the statistic crossed the target inside the bracket.
    pub crossed: bool,
    /// Greedy rollout length per calibration prompt.
    pub tokens: usize,
    /// Number of calibration prompts.
    pub n_prompts: usize,
}

/// Everything recorded about a vector: provenance and how to apply it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VectorMeta {
    /// Always [`VECTOR_FORMAT`].
    pub format: String,
    /// Model the vector was read from.
    pub model: ModelInfo,
    /// Architecture family of that model (llama.cpp names: `llama`, `qwen3`, `gemma3`).
    #[serde(default)]
    pub arch: String,
    /// Residual width.
    pub hidden_size: usize,
    /// Number of blocks of that model.
    pub num_layers: usize,
    /// 0-based block indices that carry a direction.
    pub layers: Vec<usize>,
    /// Where it is read and added.
    pub hook: HookSite,
    /// Which token's residual was read.
    pub read_position: ReadPosition,
    /// How it is applied.
    pub operation: Operation,
    /// Per-layer normalisation.
    pub normalization: Normalization,
    /// How it was made.
    pub method: Method,
    /// Number of contrast pairs (contexts rendered under both personas).
    pub n_pairs: usize,
    /// The persona file.
    pub persona: Option<PersonaRef>,
    /// Prompt-only arm: the system prompt that replaces the vector.
    #[serde(default)]
    pub prompt_system: Option<String>,
    /// Random control: its seed.
    #[serde(default)]
    pub random_seed: Option<u64>,
    /// L2 norm of each layer's direction, in `layers` order.
    pub norms: Vec<f32>,
    /// Iso-KL calibration, once `dose` has run.
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Tool and version that wrote it.
    pub tool: String,
}

/// A steering vector: per-layer directions (f32, CPU) and their metadata.
#[derive(Debug, Clone)]
pub struct SteerVector {
    /// Direction `[hidden]` per 0-based block index.
    pub directions: BTreeMap<usize, Tensor>,
    /// Provenance and application.
    pub meta: VectorMeta,
}

/// The llama.cpp architecture name of a loaded model.
pub fn arch_hint(lm: &LoadedModel) -> String {
    match lm.model.cfg.arch {
        crate::model::Arch::Llama => "llama",
        crate::model::Arch::Qwen3 => "qwen3",
        crate::model::Arch::Gemma3 => "gemma3",
    }
    .to_string()
}

/// The current time for provenance fields.
pub fn now_rfc3339() -> String {
    chrono::Local::now().to_rfc3339()
}

/// Tool name and version written into artifacts.
pub fn tool_version() -> String {
    format!("steer-heal {}", env!("CARGO_PKG_VERSION"))
}

impl SteerVector {
    /// Assemble a vector from directions, filling `layers` and `norms` in the metadata from them.
    pub fn new(directions: BTreeMap<usize, Tensor>, mut meta: VectorMeta) -> Result<Self> {
        let mut norms = Vec::with_capacity(directions.len());
        let mut out = BTreeMap::new();
        for (l, v) in directions {
            let v = v.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
            if v.elem_count() != meta.hidden_size {
                return Err(Error::invalid(format!(
                    "direction for layer {l} has {} values, hidden size is {}",
                    v.elem_count(),
                    meta.hidden_size
                )));
            }
            crate::numeric::ensure_finite_tensor(&v, || format!("the direction for layer {l}"))?;
            norms.push(v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?);
            out.insert(l, v);
        }
        meta.layers = out.keys().copied().collect();
        meta.norms = norms;
        Ok(SteerVector { directions: out, meta })
    }

    /// The prompt-only control arm: no directions, the positive persona as the system prompt.
    pub fn prompt_only(lm: &LoadedModel, persona: &Persona) -> Self {
        SteerVector {
            directions: BTreeMap::new(),
            meta: VectorMeta {
                format: VECTOR_FORMAT.into(),
                model: lm.info.clone(),
                arch: arch_hint(lm),
                hidden_size: lm.model.cfg.hidden_size,
                num_layers: lm.model.cfg.num_hidden_layers,
                layers: vec![],
                hook: HookSite::ResidualAfterBlock,
                read_position: ReadPosition::LastPromptToken,
                operation: Operation::Add,
                normalization: Normalization::None,
                method: Method::PromptOnly,
                n_pairs: 0,
                persona: Some(PersonaRef::of(persona)),
                prompt_system: Some(persona.spec.positive.clone()),
                random_seed: None,
                norms: vec![],
                calibration: None,
                created: now_rfc3339(),
                tool: tool_version(),
            },
        }
    }

    /// True for the prompt-only arm (no coefficient to scale).
    pub fn is_prompt_only(&self) -> bool {
        self.meta.method == Method::PromptOnly
    }

    /// The calibrated coefficient, or an error saying to run `dose` first.
    pub fn calibrated(&self) -> Result<f64> {
        self.meta.calibration.as_ref().map(|c| c.coefficient).ok_or_else(|| {
            Error::invalid(
                "this vector has no calibrated coefficient yet: run `steer-heal dose` or pass a coefficient",
            )
        })
    }

    /// Serialise to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut data: Vec<(String, Vec<u8>)> = Vec::new();
        for (l, v) in &self.directions {
            let vals: Vec<f32> = v.to_vec1()?;
            data.push((format!("layer{l}.v"), vals.iter().flat_map(|x| x.to_le_bytes()).collect()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(name, bytes)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![self.meta.hidden_size],
                    bytes,
                )
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::invalid(format!("tensor {name}: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta_json = serde_json::to_string(&self.meta).map_err(|e| Error::invalid(e.to_string()))?;
        let info = HashMap::from([
            ("format".to_string(), VECTOR_FORMAT.to_string()),
            (META_KEY.to_string(), meta_json),
        ]);
        safetensors::serialize(views, Some(info)).map_err(|e| Error::invalid(format!("safetensors: {e}")))
    }

    /// Write atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::atomic_write(path, &self.to_bytes()?)
    }

    /// Read a vector file, checking its format, metadata and every tensor.
    pub fn load(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
        Self::from_bytes(&buf, path)
    }

    /// Parse safetensors bytes; `path` names the file in errors.
    pub fn from_bytes(buf: &[u8], path: &Path) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(buf)
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(buf)
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
        let info = header.metadata().clone().unwrap_or_default();
        match info.get("format") {
            Some(f) if f == VECTOR_FORMAT => {}
            Some(f) => {
                return Err(Error::bad_file(
                    path,
                    format!("vector format `{f}` is not supported (want {VECTOR_FORMAT})"),
                ))
            }
            None => {
                return Err(Error::bad_file(
                    path,
                    "no steer-heal vector metadata (`format` key missing); is this a steering vector file?",
                ))
            }
        }
        let json = info
            .get(META_KEY)
            .ok_or_else(|| Error::bad_file(path, format!("metadata key `{META_KEY}` missing")))?;
        let meta: VectorMeta = serde_json::from_str(json)
            .map_err(|e| Error::bad_file(path, format!("metadata `{META_KEY}` is not valid: {e}")))?;
        let mut directions = BTreeMap::new();
        for (name, view) in st.tensors() {
            let layer = name
                .strip_prefix("layer")
                .and_then(|s| s.strip_suffix(".v"))
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::bad_file(path, format!("unexpected tensor `{name}` (want `layer{{i}}.v`)"))
                })?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{name}` is {:?}, want F32", view.dtype()),
                ));
            }
            if view.shape() != [meta.hidden_size] {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, metadata says hidden size {}",
                        view.shape(),
                        meta.hidden_size
                    ),
                ));
            }
            let t = Tensor::from_raw_buffer(view.data(), DType::F32, &[meta.hidden_size], &Device::Cpu)?;
            crate::numeric::ensure_finite_tensor(&t, || format!("tensor `{name}`"))
                .map_err(|e| Error::bad_file(path, e))?;
            directions.insert(layer, t);
        }
        let found: Vec<usize> = directions.keys().copied().collect();
        if found != meta.layers {
            return Err(Error::bad_file(
                path,
                format!("metadata lists layers {:?} but the file holds tensors for {:?}", meta.layers, found),
            ));
        }
        if let Some(&l) = meta.layers.iter().find(|l| **l >= meta.num_layers) {
            return Err(Error::bad_file(
                path,
                format!("layer {l} is outside the model's {} blocks", meta.num_layers),
            ));
        }
        if let Some(c) = &meta.calibration {
            if !c.coefficient.is_finite() || c.coefficient < 0.0 || !c.achieved.is_finite() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "calibration coefficient c* = {} (achieved {}) is not a finite, non-negative number",
                        c.coefficient, c.achieved
                    ),
                ));
            }
        }
        if meta.method == Method::PromptOnly && meta.prompt_system.is_none() {
            return Err(Error::bad_file(path, "prompt-only vector without `prompt_system`"));
        }
        Ok(SteerVector { directions, meta })
    }

    /// Check the vector fits a model; returns warnings (different weights) and errors on shape mismatches.
    pub fn check_model(&self, lm: &LoadedModel, path: &Path) -> Result<Vec<String>> {
        let cfg = &lm.model.cfg;
        if self.meta.hidden_size != cfg.hidden_size {
            return Err(Error::bad_file(
                path,
                format!(
                    "vector hidden size {} does not match the model's {}",
                    self.meta.hidden_size, cfg.hidden_size
                ),
            ));
        }
        if let Some(&l) = self.meta.layers.iter().find(|l| **l >= cfg.num_hidden_layers) {
            return Err(Error::bad_file(
                path,
                format!("layer {l} is outside the model's {} blocks", cfg.num_hidden_layers),
            ));
        }
        let mut warn = Vec::new();
        if self.meta.model.weights_hash != lm.info.weights_hash {
            warn.push(format!(
                "{}: made with model {} (weights {}), applying to {} (weights {})",
                path.display(),
                self.meta.model.id,
                self.meta.model.weights_hash,
                lm.info.id,
                lm.info.weights_hash
            ));
        }
        Ok(warn)
    }
}

/// A steering arm ready for a model: directions on the model's device, or a persona system prompt.
#[derive(Debug, Clone)]
pub struct Steering {
    directions: BTreeMap<usize, Tensor>,
    persona_system: Option<String>,
}

impl Steering {
    /// Prepare a vector for `model` (moves directions to its device and dtype).
    pub fn new(v: &SteerVector, model: &Model) -> Result<Self> {
        let mut directions = BTreeMap::new();
        for (l, d) in &v.directions {
            if *l >= model.cfg.num_hidden_layers {
                return Err(Error::invalid(format!("vector layer {l} is outside the model's blocks")));
            }
            directions.insert(*l, d.to_device(model.device())?.to_dtype(model.dtype())?);
        }
        let persona_system = if v.is_prompt_only() { v.meta.prompt_system.clone() } else { None };
        Ok(Steering { directions, persona_system })
    }

    /// An arm from raw directions (tests, benchmarks).
    pub fn from_directions(directions: BTreeMap<usize, Tensor>) -> Self {
        Steering { directions, persona_system: None }
    }

    /// True for the prompt-only arm.
    pub fn is_prompt_only(&self) -> bool {
        self.persona_system.is_some()
    }

    /// The system prompt of the steered side: the persona for the prompt-only arm, else the neutral one.
    pub fn steered_system<'a>(&'a self, neutral: &'a str) -> &'a str {
        self.persona_system.as_deref().unwrap_or(neutral)
    }

    /// Hooks adding `coeffs[row] · v_L` to each batch row (no hooks for the prompt-only arm).
    pub fn hooks(&self, coeffs: &[f32]) -> Hooks {
        if self.directions.is_empty() {
            return Hooks::none();
        }
        if coeffs.windows(2).all(|w| w[0] == w[1]) {
            return Hooks::steer(&self.directions, coeffs.first().copied().unwrap_or(0.0));
        }
        Hooks::steer_rows(&self.directions, coeffs.to_vec())
    }
}
