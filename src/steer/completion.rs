//! A steered completion and its per-token traces: the unit the filter scores, the researcher curates in gate Q0,
//! and the healer trains on. Shared by `steer`, `score`, `session`, `tui` and `heal`.

use serde::{Deserialize, Serialize};

/// One rewind of a completion: tokens from `at` on were resampled at `to_dose`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rewind {
    /// First resampled token index.
    pub at: usize,
    /// Dose before the rewind.
    pub from_dose: f64,
    /// Dose the replay used.
    pub to_dose: f64,
    /// `manual` (researcher) or `auto` (windowed-KL watchdog).
    pub cause: String,
}

/// Per-token traces, each the length of `Completion::tokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenTrace {
    /// KL(steered ‖ base) of the next-token distribution at this token, nats.
    pub kl: Vec<f32>,
    /// Negative log-likelihood of the token under the base (unsteered) model, nats.
    pub nll_base: Vec<f32>,
    /// Root-mean-square of `kl` over a trailing window ending at this token.
    pub kl_window_rmse: Vec<f32>,
    /// The steering coefficient this token was sampled at.
    pub dose: Vec<f32>,
}

/// A generated completion with everything needed to score, show, replay and train on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Stable id within a round (e.g. `p03-a075-s42`).
    pub id: String,
    /// System prompt used at generation (the neutral one; the persona is never in the prompt).
    pub system: String,
    /// User prompt.
    pub prompt: String,
    /// Decoded completion text.
    pub text: String,
    /// Completion token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Text of each token, for heat maps.
    pub token_text: Vec<String>,
    /// Multiple of the calibrated coefficient it started at.
    pub alpha: f64,
    /// Coefficient it started at (`alpha × c*`).
    pub dose: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Per-token traces.
    pub trace: TokenTrace,
    /// Rewinds applied, in order.
    #[serde(default)]
    pub rewinds: Vec<Rewind>,
}
