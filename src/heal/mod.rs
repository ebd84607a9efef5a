//! Healing (gate Q1): distil accepted steered completions into a LoRA trained from the neutral prompt under a
//! KL barrier to the previous model, then bake or export it. Plain library code: no terminal, no async.
//!
//! - `config`: every knob and its default (`HealConfig`, `Reg`, `Agg`, `Reference`).
//! - `data`: completions → token sequences with the loss mask.
//! - `adapter`: one round's LoRA (frozen or trainable), attaching, gating, detaching.
//! - `loss`: NLL, per-position KL, aggregation, barrier.
//! - `optim`: our AdamW (checkpointable moments) and the cosine schedule.
//! - `train`: the loop with checkpoints, resume, cancel, divergence stop, JSONL log, `HealLog`.
//! - `bake`: gated bake and base + history loading.
//! - `peft`: PEFT-layout adapter export and import.
//! - `export`: the merged model as a Hugging Face directory.
//! - `gate`: before/after measurement and the `gate-q1.md` artifact, including the sweep table.
//! - `sweep`: `heal --sweep` over regularisers × strengths.
//! - `bench`: training throughput benchmark.
//! - `st_io`: atomic safetensors with metadata.

pub mod adapter;
pub mod bake;
pub mod bench;
pub mod config;
pub mod data;
pub mod export;
pub mod gate;
pub mod loss;
pub mod optim;
pub mod peft;
pub mod st_io;
pub mod sweep;
pub mod train;

pub use adapter::{LoraAdapter, Site, TrainableLora};
pub use bake::{attach_history, bake, load_with_history, merge_attached, HistoryEntry};
pub use config::{Agg, HealConfig, Reference, Reg};
pub use data::{build_examples, read_completions, Dataset, Example};
pub use export::export_merged;
pub use peft::{load_peft, save_peft, AdapterMeta};
pub use train::{heal, HealLog, HealStatus, RunOptions, RunPaths, StepRecord};
