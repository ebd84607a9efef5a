//! Reading a steering-vector file for the worker: a safetensors file with one `[hidden]` tensor per layer, each
//! named by its layer index (`"14"`, `"layer.14"`, `"model.layers.14"`). Kept independent of the steer
//! module's own file format on purpose; the integrator can hand the worker any `BTreeMap<usize, Tensor>`.

use crate::error::{Error, Result};
use crate::model::load::read_safetensors;
use crate::model::Model;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The layer index a tensor name carries: its first dot-separated component that is a number.
pub fn layer_of(name: &str) -> Option<usize> {
    name.split('.').find_map(|p| p.parse::<usize>().ok())
}

/// Load per-layer vectors, checked against the model and moved to its device and dtype.
pub fn load_vectors(path: &Path, model: &Model) -> Result<BTreeMap<usize, Tensor>> {
    let tensors = read_safetensors(path)?;
    let h = model.cfg.hidden_size;
    let n = model.cfg.num_hidden_layers;
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let layer = layer_of(&name)
            .ok_or_else(|| Error::bad_file(path, format!("tensor `{name}` does not name a layer index")))?;
        if layer >= n {
            return Err(Error::bad_file(
                path,
                format!("tensor `{name}`: layer {layer}, the model has {n} layers"),
            ));
        }
        let v = t.flatten_all()?;
        if v.dims() != [h] {
            return Err(Error::bad_file(
                path,
                format!("tensor `{name}` has {} values, the model's hidden size is {h}", v.elem_count()),
            ));
        }
        if out.insert(layer, v.to_dtype(model.dtype())?.to_device(model.device())?).is_some() {
            return Err(Error::bad_file(path, format!("layer {layer} appears twice")));
        }
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "no vectors in the file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("14"), Some(14));
        assert_eq!(layer_of("layer.3"), Some(3));
        assert_eq!(layer_of("model.layers.12.persona"), Some(12));
        assert_eq!(layer_of("persona"), None);
    }
}
