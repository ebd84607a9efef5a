//! The library's one error type. Every variant names the file or input it is about, so the binary can print a
//! single line a researcher can act on.

use std::path::{Path, PathBuf};

/// Errors from the model runtime and pipeline stages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file exists but its content is not what we need (garbled JSON, truncated tensor data, ...).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// A required file is absent.
    #[error("{}: missing ({what})", path.display())]
    MissingFile { path: PathBuf, what: String },
    /// A tensor is absent from the weights.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has the wrong shape for the config.
    #[error("{}: tensor `{name}` has shape {got:?}, the config needs {want:?}", path.display())]
    TensorShape { path: PathBuf, name: String, got: Vec<usize>, want: Vec<usize> },
    /// The architecture named by a config is not one we implement.
    #[error("{}: unknown architecture `{arch}` (supported: llama, qwen3, gemma3_text)", path.display())]
    UnknownArch { path: PathBuf, arch: String },
    /// An argument or input value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template failure.
    #[error("chat template: {0}")]
    Template(String),
    /// The run was cancelled by the user.
    #[error("cancelled")]
    Cancelled,
    /// Tensor math failure from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A file-level problem with a human reason.
    pub fn bad_file(path: impl AsRef<Path>, reason: impl std::fmt::Display) -> Self {
        Error::BadFile { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
    /// An invalid input value.
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
    /// Wrap a tokenizer crate error.
    pub fn tokenizer(e: impl std::fmt::Display) -> Self {
        Error::Tokenizer(e.to_string())
    }
}
