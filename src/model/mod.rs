//! What a network is: config, our own decoder with hooks and LoRA-ready projections, KV cache, tokenizer, chat
//! template, loading from local directories and GGUF files, tiny random models, and generation.
//! No training loops and no terminal code live here.

pub mod batched;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod codes;
pub mod config;
pub mod cpu;
pub mod decoder;
pub mod device;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod hook;
pub mod load;
pub mod lora;
pub mod tiny;
pub mod tokenizer;

pub use cache::KvCache;
pub use chat::{ChatTemplate, Message};
pub use config::{Activation, Arch, ModelConfig};
pub use decoder::{Forward, LogitsAt, Model, Output, Path};
pub use device::{Compute, DeviceChoice};
pub use hook::{Capture, CapturePositions, Hooks, Steer};
pub use load::{load_model, LoadedModel, ModelInfo};
pub use lora::{Adapter, Adapters, LoraLinear};
/// Training kernels with their own backward pass (the `steer-heal-kernels` crate).
pub use steer_heal_kernels as fused;
pub use tokenizer::TextTokenizer;
