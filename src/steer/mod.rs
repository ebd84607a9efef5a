//! Steering: personas, mean-difference vectors, iso-KL dosing, steered generation with incoherence traces,
//! backtrack/replay, the walk-down controller, llama.cpp control-vector exchange and a benchmark.
//! Plain library code; no terminal.

pub mod bench;
pub mod completion;
pub mod dose;
pub mod extract;
pub mod generate;
pub mod gguf;
pub mod kl;
pub mod persona;
pub mod vector;
pub mod walkdown;

pub use completion::{Completion, Rewind, TokenTrace};
pub use dose::{calibrate, DoseConfig, DoseReport, SolverConfig};
pub use extract::{extract_mean_diff, random_like, ExtractConfig};
pub use generate::{
    completion_id, custom_prompt_seed, generate_completions, replay, round_seed, GenConfig, Request, Watchdog,
};
pub use kl::{KlStats, Statistic};
pub use persona::Persona;
pub use vector::{SteerVector, Steering, VectorMeta};
pub use walkdown::{walk_down, Scorer, WalkDownConfig};
