//! steer-heal: persona steering, curation, LoRA healing and evaluation of small language models.
//!
//! Module map:
//! - `error`: the library error type.
//! - `fsutil`: atomic, fsynced file writes.
//! - `progress`: progress and cancellation shared by all stages.
//! - `model`: our decoder (Llama / Qwen3 / Gemma-3) with hooks and LoRA-ready projections, loading, generation.
//! - `steer`: persona vectors, iso-KL dosing, steered generation, replay.
//! - `score`: gate-Q0 automatic filter scores.
//! - `session`: on-disk session state (manifest, event log, artifacts).
//! - `heal`: LoRA healing with a KL barrier, bake, export.
//! - `eval`: tinymfv evaluation.
//! - `stats`: seeded bootstrap and Wilson intervals the gates share.
//! - `worker`: background jobs for the TUI.
//! - `tui`: the terminal UI (no candle).

pub mod error;
pub mod eval;
pub mod fsutil;
pub mod heal;
pub mod model;
pub mod numeric;
pub mod progress;
pub mod rounds;
pub mod score;
pub mod session;
pub mod stats;
pub mod steer;
pub mod tui;
pub mod worker;

pub use error::{Error, Result};
