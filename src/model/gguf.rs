//! GGUF checkpoints (placeholder until the GGUF loader lands).

use super::load::LoadedModel;
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// Load a GGUF file.
pub fn load_gguf(path: &Path, _dtype: Option<DType>, _dev: &Device) -> Result<LoadedModel> {
    Err(Error::bad_file(path, "GGUF loading is not available in this build"))
}
