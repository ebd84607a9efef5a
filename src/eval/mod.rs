//! tinymfv evaluation and coherence metrics (science.md §3), and the round-level outputs built on them: the
//! progress map (PNG/SVG) and the gate-Q2 report. Owns `data/tinymfv/` (embedded at build time). Uses the model
//! runtime only through `model::{Model, Decoder, ChatTemplate, TextTokenizer}`; no terminal code here.
//!
//! - `data`: the vignettes and the seven foundations.
//! - `protocol`: prompts, suffix, answer-token ids, think classification.
//! - `runner`: batched, cached scoring of a model → `EvalReport`.
//! - `metrics`: every headline number from the raw rows.
//! - `bootstrap`: 95 % intervals over vignettes, and paired differences of two evals of the same items.
//! - `json_probe`: the json_is_valid free-generation probe.
//! - `report`: `eval.json` (save, load, recompute).
//! - `plot`: `RoundPoint` (with its control arms) and the progress map.
//! - `gate_q2`: `gate-q2.md` and the monotonic-with-coherence verdict.
//! - `samples`: a few items of a report (think text, answer probabilities) for the iterate screen.

pub mod bootstrap;
pub mod data;
pub mod gate_q2;
pub mod json_probe;
pub mod metrics;
pub mod plot;
pub mod protocol;
pub mod report;
pub mod runner;
pub mod samples;

pub use bootstrap::{Interval, Intervals, Stat};
pub use data::{Condition, Foundation, Variant, FOUNDATIONS};
pub use gate_q2::{verdict, write_gate_q2, CoherenceFloor, Direction, GateQ2Spec, TraitAxis, Verdict};
pub use metrics::{compute_metrics, Metrics};
pub use plot::{load_rounds, write_progress_map, ControlArm, ControlPoint, RoundPoint, RoundStatus};
pub use report::{EvalConfig, EvalReport, FrameRecord, RowRecord, DEFAULT_BATCH};
pub use runner::{run_eval, EvalModel};
pub use samples::{pick_samples, EvalSample, SAMPLES_PER_ROUND};
