//! What an eval run writes: `eval.json` with the config, the headline metrics, and the raw per-item,
//! per-frame, per-option log-probabilities (with the answer case and prefill NLL) from which every metric can be
//! recomputed offline. Non-finite numbers are stored as JSON `null` and read back as NaN.

use super::data::{Condition, Foundation, Variant};
use super::json_probe::JsonProbeReport;
use super::metrics::{compute_metrics, Metrics};
use super::protocol::{AnswerCase, FrameOrder};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the `eval.json` layout.
pub const SCHEMA_VERSION: u32 = 1;
/// File name of the report inside an output directory.
pub use crate::session::layout::EVAL as EVAL_FILE;

/// Serde for f64 that writes NaN and infinities as `null` (JSON has no NaN) and reads `null` back as NaN.
pub mod nan_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Write a finite number as itself, anything else as `null`.
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    /// Read a number, or `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Serde for `[f64; 7]` with NaN as `null`.
pub mod nan_arr7 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Write each element, non-finite ones as `null`.
    pub fn serialize<S: Serializer>(x: &[f64; 7], s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<Option<f64>> = x.iter().map(|v| v.is_finite().then_some(*v)).collect();
        v.serialize(s)
    }

    /// Read seven numbers or `null`s.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 7], D::Error> {
        let v = <[Option<f64>; 7]>::deserialize(d)?;
        Ok(v.map(|x| x.unwrap_or(f64::NAN)))
    }
}

/// Serde for `Option<f64>` with non-finite values as `null` (read back as `None`).
pub mod opt_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Write `Some(finite)` as a number, anything else as `null`.
    pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match x {
            Some(v) if v.is_finite() => s.serialize_f64(*v),
            _ => s.serialize_none(),
        }
    }

    /// Read a number or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<f64>::deserialize(d)
    }
}

/// One frame (option order) of one item: how the answer slot was read and what it said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameRecord {
    /// Option order shown in the schema.
    pub order: FrameOrder,
    /// Natural, interrupted or answered elsewhere.
    pub case: AnswerCase,
    /// Log-probability (full vocabulary) of each answer word's first token at the slot, in `FOUNDATIONS` order
    /// whatever the frame's listing order; NaN when answered elsewhere.
    #[serde(with = "nan_arr7")]
    pub lp: [f64; 7],
    /// Probability mass on the seven answer tokens (0 when answered elsewhere).
    #[serde(with = "nan_f64")]
    pub pmass: f64,
    /// Mean per-token NLL (nats) of the prefill tokens; NaN when answered elsewhere.
    #[serde(with = "nan_f64")]
    pub nll_json: f64,
    /// Number of prefill tokens that NLL averages.
    pub n_prefill_tokens: usize,
    /// Think tokens generated.
    pub think_tokens: usize,
    /// Whether the think contains `</think>`.
    pub emitted_close: bool,
    /// The decoded think (special tokens kept).
    pub think_text: String,
}

/// One item (vignette × condition), both frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowRecord {
    /// Vignette id.
    pub id: String,
    /// Condition of the text.
    pub condition: Condition,
    /// Fine label (e.g. `Care (e)`).
    pub foundation: String,
    /// Coarse label.
    pub foundation_coarse: Foundation,
    /// Clifford human percentages in `FOUNDATIONS` order.
    #[serde(with = "nan_arr7")]
    pub human: [f64; 7],
    /// Forward then reversed frame.
    pub frames: Vec<FrameRecord>,
}

/// What was evaluated and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Which rewrite of the vignettes.
    pub variant: Variant,
    /// Which conditions (each vignette is scored once per condition).
    pub conditions: Vec<Condition>,
    /// Keep only the first n vignettes (None: all 132).
    pub n_vignettes: Option<usize>,
    /// Forced think length per frame, in tokens.
    pub think_tokens: usize,
    /// Most sequences (item × frame) per forward batch; the sequences are split into as few batches as this allows,
    /// of even sizes.
    pub batch_size: usize,
    /// Run the `json_is_valid` probe.
    pub json_probe: bool,
    /// Most new tokens per `json_is_valid` probe generation.
    pub json_probe_max_tokens: usize,
    /// System prompt of every eval conversation (None: the template's default). The prompt-only control arm
    /// sets a persona here; the json_is_valid probe gets it too.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// How the forced-answer suffix is rendered (`upstream` to compare with upstream tinymfv's numbers).
    #[serde(default)]
    pub suffix: super::protocol::SuffixRendering,
}

/// Default most sequences per batch. Large on purpose: a think step reads every weight and the whole KV cache once
/// whatever its row count, its products go to OpenBLAS from 64 rows (`steer_heal_kernels::blas::MIN_ROWS`), and
/// OpenBLAS packs each weight once per call, so more rows per step is less time per token. The 264 sequences of the
/// classic eval run as two batches of 132. Measured on a 2-core AVX2 CPU (SmolLM2, think 64, interleaved runs):
/// 88 sequences as one batch thought in 38–44 s against 57–74 s in batches of 32; 132 as one batch in 59–61 s
/// against 72–73 s in two of 66; resident memory 3.6 GB at 132 against 1.3 GB at 32.
pub const DEFAULT_BATCH: usize = 132;

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            variant: Variant::Classic,
            conditions: vec![Condition::OtherViolate],
            n_vignettes: None,
            think_tokens: 128,
            batch_size: DEFAULT_BATCH,
            json_probe: true,
            json_probe_max_tokens: 128,
            system_prompt: None,
            suffix: super::protocol::SuffixRendering::OneConversation,
        }
    }
}

impl EvalConfig {
    /// Check values before any model work.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        if self.conditions.is_empty() {
            return Err(Error::invalid("at least one condition is needed"));
        }
        if self.n_vignettes == Some(0) {
            return Err(Error::invalid("n must be at least 1"));
        }
        if self.json_probe && self.json_probe_max_tokens == 0 {
            return Err(Error::invalid("the json_is_valid probe needs at least 1 new token"));
        }
        Ok(())
    }
}

/// Wall-clock seconds of each phase of a run, and the work it did (for speed comparisons).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Scored sequences (items × 2 frames).
    pub sequences: usize,
    /// Prompt tokens prefilled (without padding).
    pub prompt_tokens: usize,
    /// Prompt tokens including left padding.
    pub padded_prompt_tokens: usize,
    /// Prompt tokens prefilled once for both frames of an item (their common prefix), so not computed twice.
    #[serde(default)]
    pub shared_prompt_tokens: usize,
    /// Think tokens generated over all sequences.
    pub think_tokens: usize,
    /// Prompt prefill forwards.
    pub prefill_s: f64,
    /// Think decoding.
    pub think_s: f64,
    /// Suffix forwards and answer readout.
    pub answer_s: f64,
    /// The json_is_valid probe.
    pub json_probe_s: f64,
    /// Everything.
    pub total_s: f64,
}

/// The whole `eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalReport {
    /// Layout version (`SCHEMA_VERSION`).
    pub schema_version: u32,
    /// When the run finished (RFC 3339).
    pub created: String,
    /// Model id (directory or file name).
    pub model_id: String,
    /// Fingerprint of the weights evaluated (empty when unknown).
    pub weights_hash: String,
    /// Settings.
    pub config: EvalConfig,
    /// Token id scored for each answer word, `FOUNDATIONS` order.
    pub answer_token_ids: [u32; 7],
    /// Headline metrics (recomputable from `rows` and `json_probe`).
    pub metrics: Metrics,
    /// 95 % bootstrap intervals over vignettes of the headline numbers (`bootstrap::intervals` of `rows`;
    /// empty in reports written before intervals existed).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub intervals: super::bootstrap::Intervals,
    /// Raw per-item results.
    pub rows: Vec<RowRecord>,
    /// The json_is_valid probe outputs, when run.
    pub json_probe: Option<JsonProbeReport>,
    /// Where the time went.
    pub timings: Timings,
}

impl EvalReport {
    /// Metrics recomputed from the raw rows (what an offline re-analysis gets).
    pub fn recompute_metrics(&self) -> Metrics {
        compute_metrics(&self.rows, self.json_probe.as_ref().map(JsonProbeReport::fraction_valid))
    }

    /// The report's intervals: as stored, or computed from the rows for a report written without them.
    pub fn intervals(&self) -> super::bootstrap::Intervals {
        if self.intervals.is_empty() {
            super::bootstrap::intervals(&self.rows)
        } else {
            self.intervals.clone()
        }
    }

    /// Write `dir/eval.json` atomically; returns its path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(EVAL_FILE);
        crate::fsutil::atomic_write_json(&path, self)?;
        Ok(path)
    }

    /// Read an `eval.json` (a file, or a directory holding one).
    pub fn load(path: &Path) -> Result<Self> {
        let path = if path.is_dir() { path.join(EVAL_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
        let r: EvalReport = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not a valid eval report: {e}")))?;
        if r.schema_version != SCHEMA_VERSION {
            return Err(Error::bad_file(
                &path,
                format!("eval report version {} (this build reads {SCHEMA_VERSION})", r.schema_version),
            ));
        }
        for (i, row) in r.rows.iter().enumerate() {
            if row.frames.len() != 2 {
                return Err(Error::bad_file(
                    &path,
                    format!("row {i} has {} frames, expected 2", row.frames.len()),
                ));
            }
        }
        Ok(r)
    }
}
