//! Safetensors files with string metadata, written atomically: adapters, checkpoints and merged weights all go
//! through here so every artifact is either the old file or the new one after a crash.

use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor's raw little-endian bytes, ready for `safetensors::serialize`.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw(t: &Tensor) -> Result<RawTensor> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, data) = match t.dtype() {
        DType::F32 => {
            let v: Vec<f32> = flat.to_vec1()?;
            (safetensors::Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        DType::F16 => {
            let v: Vec<half::f16> = flat.to_vec1()?;
            (safetensors::Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = flat.to_vec1()?;
            (safetensors::Dtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        DType::F64 => {
            let v: Vec<f64> = flat.to_vec1()?;
            (safetensors::Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        other => return Err(Error::invalid(format!("cannot save a {other:?} tensor"))),
    };
    Ok(RawTensor { dtype, shape, data })
}

/// Serialise named tensors (sorted by name) with optional metadata to safetensors bytes.
pub fn to_bytes(tensors: &BTreeMap<String, Tensor>, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        views.push((name.clone(), raw(t)?));
    }
    let meta: Option<HashMap<String, String>> =
        if metadata.is_empty() { None } else { Some(metadata.clone().into_iter().collect()) };
    safetensors::serialize(views, meta).map_err(|e| Error::invalid(format!("safetensors serialisation: {e}")))
}

/// Atomically write named tensors with metadata to `path`.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    atomic_write(path, &to_bytes(tensors, metadata)?)
}

/// Read every tensor of a safetensors file onto `dev`, with its metadata.
pub fn load(path: &Path, dev: &Device) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let buf = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&buf)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&buf)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
    let metadata: BTreeMap<String, String> =
        header.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dt = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => {
                return Err(Error::bad_file(path, format!("tensor `{name}` has unsupported dtype {other:?}")))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu)?.to_device(dev)?;
        out.insert(name, t);
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip_bitwise() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("x.safetensors");
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), Tensor::new(&[[1.5f32, -2.25], [3.0, 1e-30]], &Device::Cpu)?);
        t.insert("b".to_string(), Tensor::new(&[7f64], &Device::Cpu)?);
        let mut m = BTreeMap::new();
        m.insert("format".to_string(), "pt".to_string());
        save(&p, &t, &m)?;
        let (back, meta) = load(&p, &Device::Cpu)?;
        assert_eq!(meta, m);
        let a: Vec<Vec<f32>> = back["a"].to_vec2()?;
        assert_eq!(a, vec![vec![1.5, -2.25], vec![3.0, 1e-30]]);
        assert_eq!(back["b"].to_vec1::<f64>()?, vec![7.0]);
        Ok(())
    }

    #[test]
    fn garbage_is_a_clear_error() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("bad.safetensors");
        std::fs::write(&p, b"not safetensors at all")?;
        let e = load(&p, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("bad.safetensors") && e.contains("not a valid safetensors"), "{e}");
        Ok(())
    }
}
