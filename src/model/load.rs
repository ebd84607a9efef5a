//! Loading a model from a local Hugging Face style directory: `config.json`, single or sharded safetensors,
//! `tokenizer.json`, `tokenizer_config.json` (chat template), `generation_config.json`. No network here.

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::decoder::{Model, WeightSource};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steer_heal_kernels::blocks::BlockRows;

/// Tensors read from safetensors files, each remembered with the file it came from.
pub struct SafetensorsWeights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    dir: PathBuf,
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// Read every tensor of one safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let buf = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&buf)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dt = st_dtype(view.dtype()).ok_or_else(|| {
            Error::bad_file(path, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
        })?;
        let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu)?;
        out.insert(name, t);
    }
    Ok(out)
}

impl SafetensorsWeights {
    /// Read the weights of a model directory (sharded via `model.safetensors.index.json` or a single file).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::bad_file(&index, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::bad_file(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::MissingFile {
                    path: single,
                    what: "model weights (model.safetensors or model.safetensors.index.json)".into(),
                });
            }
            vec![single]
        };
        let mut tensors = HashMap::new();
        for f in files {
            if !f.exists() {
                return Err(Error::MissingFile { path: f, what: "weight shard named in the index".into() });
            }
            for (name, t) in read_safetensors(&f)? {
                // Multimodal Gemma-3 checkpoints nest the text model.
                let name = name.strip_prefix("language_model.").map(String::from).unwrap_or(name);
                tensors.insert(name, (t, f.clone()));
            }
        }
        Ok(Self { tensors, dir: dir.to_path_buf() })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        let (t, file) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.to_string() })?;
        if t.dims() != shape {
            return Err(Error::TensorShape {
                path: file.clone(),
                name: name.to_string(),
                got: t.dims().to_vec(),
                want: shape.to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(dev)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn origin(&self) -> &Path {
        &self.dir
    }
}

/// Tensors held in memory by name (GGUF dequantisation, random init).
pub struct MapWeights {
    /// The tensors.
    pub tensors: HashMap<String, Tensor>,
    /// The file they came from, for error messages.
    pub origin: PathBuf,
    /// Block codes some tensors were dequantised from (a GGUF's Q4_1 and Q8_0 matrices), by the same names.
    pub codes: HashMap<String, Arc<BlockRows>>,
}

impl WeightSource for MapWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.origin.clone(), name: name.to_string() })?;
        if t.dims() != shape {
            return Err(Error::TensorShape {
                path: self.origin.clone(),
                name: name.to_string(),
                got: t.dims().to_vec(),
                want: shape.to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(dev)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn codes(&self, name: &str) -> Option<Arc<BlockRows>> {
        self.codes.get(name).cloned()
    }
}

/// A model ready to use: weights, tokenizer, chat template and where it came from.
pub struct LoadedModel {
    /// The decoder.
    pub model: Model,
    /// Tokenizer with the model's special tokens.
    pub tokenizer: TextTokenizer,
    /// The model's own chat template.
    pub chat: ChatTemplate,
    /// Identity and provenance.
    pub info: ModelInfo,
}

/// Where a model came from, recorded in every artifact made with it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ModelInfo {
    /// A human id (directory or file name).
    pub id: String,
    /// Path it was loaded from.
    pub path: PathBuf,
    /// Fingerprint of config and weights (sha256 over config and sampled weight bytes).
    pub weights_hash: String,
}

/// Fingerprint files cheaply: their sizes and first/last MiB, plus the config.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = Sha256::new();
    for f in files {
        let mut fh = std::fs::File::open(f).map_err(|e| Error::bad_file(f, e))?;
        let len = fh.metadata()?.len();
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        fh.read_exact(&mut buf)?;
        h.update(&buf);
        if len as usize > buf.len() {
            fh.seek(SeekFrom::End(-(buf.len() as i64)))?;
            fh.read_exact(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

/// Default dtype for a device: f32 on CPU, bf16 on CUDA.
pub fn default_dtype(dev: &Device) -> DType {
    if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Load a model from a directory (Hugging Face layout) or a `.gguf` file.
pub fn load_model(path: &Path, dtype: Option<DType>, dev: &Device) -> Result<LoadedModel> {
    if path.is_file() && path.extension().map(|e| e == "gguf").unwrap_or(false) {
        return super::gguf::load_gguf(path, dtype, dev);
    }
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "model directory or .gguf file".into(),
        });
    }
    if !path.is_dir() {
        return Err(Error::bad_file(path, "expected a model directory or a .gguf file"));
    }
    let dtype = dtype.unwrap_or_else(|| default_dtype(dev));
    let cfg_path = path.join("config.json");
    let mut cfg = ModelConfig::from_hf_json(&cfg_path)?;
    let gen_path = path.join("generation_config.json");
    if gen_path.exists() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::bad_file(&gen_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&gen_path, format!("not valid JSON: {e}")))?;
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => cfg.eos_token_ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => {
                cfg.eos_token_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32))
            }
            _ => {}
        }
        cfg.eos_token_ids.sort();
        cfg.eos_token_ids.dedup();
    }
    let tokenizer = TextTokenizer::from_dir(path, &cfg)?;
    let chat = ChatTemplate::from_dir(path, &tokenizer)?;
    let weights = SafetensorsWeights::open(path)?;
    let model = Model::load(&cfg, &weights, dtype, dev)?;
    let mut files = vec![cfg_path];
    let mut shards: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|e| e == "safetensors").unwrap_or(false))
        .collect();
    shards.sort();
    files.extend(shards);
    let info = ModelInfo {
        id: path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
        path: path.to_path_buf(),
        weights_hash: fingerprint(&files)?,
    };
    Ok(LoadedModel { model, tokenizer, chat, info })
}
