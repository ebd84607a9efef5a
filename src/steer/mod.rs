//! Steering: personas, mean-difference vectors, iso-KL dosing, steered generation with incoherence traces,
//! backtrack/replay. Plain library code; no terminal.

pub mod completion;

pub use completion::{Completion, Rewind, TokenTrace};
