//! The one place that knows file names: a session folder, its round folders, a heal run's folder and the
//! `--out` folder of a stage run from the command line. Everything else asks these types for paths (or for the
//! relative path an event records); `just check` fails when one of the names below appears anywhere else in
//! `src/` (see `.ci/layout`).
//!
//! ```text
//! sessions/NAME/
//!   session.toml  events.jsonl  narration.txt  refusal.txt          the manifest, the log, the pattern files
//!   rounds.json  lineage.json  gate-q2.md  progress.png/.svg        the loop's summary (rewritten per round)
//!   round-00/eval/eval.json                                         the base model's eval
//!   round-NN/                                                       one per round, N ≥ 1
//!     vector.safetensors  dose.json  walkdown.json                  extract, dose (c* lives in the vector file)
//!     completions-000.jsonl …                                       generated + scored, one file per batch
//!     scores-SEQ.json  replays/ID-rK.json  gate-q0.md               re-scores, adopted replays, gate Q0
//!     decisions.jsonl  accepted.jsonl                               gate Q0's decisions and the heal data
//!     heal/{adapter/, train/log.jsonl, train/checkpoint.safetensors, heal.json, gate-q1.md, gate-q1.json}
//!     history.json  round.json  eval/eval.json  controls.json  controls/ARM/eval.json
//! ```

use std::path::{Path, PathBuf};

/// Session manifest.
pub const MANIFEST: &str = "session.toml";
/// Session event log.
pub const EVENTS: &str = "events.jsonl";
/// Held locked (exclusively) by the one process that has the session open; names that process.
pub const LOCK: &str = "session.lock";
/// Narration pattern file copied into a new session.
pub const NARRATION: &str = "narration.txt";
/// Refusal phrase file copied into a new session.
pub const REFUSAL: &str = "refusal.txt";
/// The rounds table (progress-map points).
pub const ROUNDS_TABLE: &str = "rounds.json";
/// The lineage in a form readable without the log.
pub const LINEAGE: &str = "lineage.json";
/// Gate-Q2 report.
pub const GATE_Q2: &str = "gate-q2.md";
/// Progress map, bitmap.
pub const PROGRESS_PNG: &str = "progress.png";
/// Progress map, vector.
pub const PROGRESS_SVG: &str = "progress.svg";
/// A steering vector (directions + calibration).
pub const VECTOR: &str = "vector.safetensors";
/// The iso-KL calibration report.
pub const DOSE: &str = "dose.json";
/// The walk-down controller's report.
pub const WALKDOWN: &str = "walkdown.json";
/// Completions (one JSON object per line).
pub const COMPLETIONS: &str = "completions.jsonl";
/// Completions the walk-down filter rejected (stage `--out` folders).
pub const COMPLETIONS_REJECTED: &str = "completions_rejected.jsonl";
/// Passing completions beyond the walk-down's keep limit (stage `--out` folders).
pub const COMPLETIONS_SURPLUS: &str = "completions_surplus.jsonl";
/// Settings and provenance of a `generate` run.
pub const GENERATION: &str = "generation.json";
/// Gate-Q0 report.
pub const GATE_Q0: &str = "gate-q0.md";
/// Gate Q0's decisions, one per completion.
pub const DECISIONS: &str = "decisions.jsonl";
/// The completions heal trains on.
pub const ACCEPTED: &str = "accepted.jsonl";
/// The kept history the round's student carries, with the round on top.
pub const HISTORY: &str = "history.json";
/// Per-round numbers beside the eval.
pub const ROUND_RECORD: &str = "round.json";
/// The control arms' metrics.
pub const CONTROLS: &str = "controls.json";
/// An eval report.
pub const EVAL: &str = "eval.json";
/// Gate-Q1 report, markdown.
pub const GATE_Q1_MD: &str = "gate-q1.md";
/// Gate-Q1 report, JSON.
pub const GATE_Q1_JSON: &str = "gate-q1.json";
/// A heal run's summary.
pub const HEAL_SUMMARY: &str = "heal.json";
/// A heal run's per-step log.
pub const HEAL_LOG: &str = "log.jsonl";
/// A heal run's resumable checkpoint.
pub const HEAL_CHECKPOINT: &str = "checkpoint.safetensors";

/// Folder of a round, relative to the session: `round-03`.
pub fn round_dir_name(round: u32) -> String {
    format!("round-{round:02}")
}

/// A session folder.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionDir {
    root: PathBuf,
}

impl SessionDir {
    /// The session at `root`.
    pub fn new(root: &Path) -> Self {
        SessionDir { root: root.to_path_buf() }
    }
    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `session.toml`.
    pub fn manifest(&self) -> PathBuf {
        self.root.join(MANIFEST)
    }
    /// `events.jsonl`.
    pub fn events(&self) -> PathBuf {
        self.root.join(EVENTS)
    }
    /// `session.lock`.
    pub fn lock(&self) -> PathBuf {
        self.root.join(LOCK)
    }
    /// `rounds.json`.
    pub fn rounds_table(&self) -> PathBuf {
        self.root.join(ROUNDS_TABLE)
    }
    /// `lineage.json`.
    pub fn lineage(&self) -> PathBuf {
        self.root.join(LINEAGE)
    }
    /// Round `n`'s folder.
    pub fn round(&self, n: u32) -> RoundDir {
        RoundDir { session: self.root.clone(), round: n }
    }
    /// A path relative to the session folder, as events record it.
    pub fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).display().to_string()
    }
}

/// One round's folder: every artifact of the round has its path here.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDir {
    session: PathBuf,
    round: u32,
}

impl RoundDir {
    /// The round number.
    pub fn round(&self) -> u32 {
        self.round
    }
    /// The folder, relative to the session (`round-03`).
    pub fn rel_dir(&self) -> String {
        round_dir_name(self.round)
    }
    /// The folder.
    pub fn dir(&self) -> PathBuf {
        self.session.join(self.rel_dir())
    }
    fn rel(&self, name: &str) -> String {
        format!("{}/{name}", self.rel_dir())
    }
    /// `(absolute, relative)` of a file of the round.
    fn file(&self, name: &str) -> Artifact {
        let rel = self.rel(name);
        Artifact { abs: self.session.join(&rel), rel }
    }
    /// The round's steering vector (its calibration c* inside).
    pub fn vector(&self) -> Artifact {
        self.file(VECTOR)
    }
    /// The iso-KL report.
    pub fn dose(&self) -> Artifact {
        self.file(DOSE)
    }
    /// The walk-down report.
    pub fn walkdown(&self) -> Artifact {
        self.file(WALKDOWN)
    }
    /// Generated, scored completions of batch (or custom prompt) `part`: `completions-003.jsonl`.
    pub fn completions(&self, part: usize) -> Artifact {
        self.file(&format!("completions-{part:03}.jsonl"))
    }
    /// A re-score of the round's completions, named by the log sequence number it is written at.
    pub fn rescore(&self, seq: u64) -> Artifact {
        self.file(&format!("scores-{seq}.json"))
    }
    /// The `n`-th adopted replay of completion `id`.
    pub fn replay(&self, id: &str, n: usize) -> Artifact {
        self.file(&format!("replays/{id}-r{n}.json"))
    }
    /// Gate-Q0 report.
    pub fn gate_q0(&self) -> Artifact {
        self.file(GATE_Q0)
    }
    /// Gate Q0's decisions.
    pub fn decisions(&self) -> Artifact {
        self.file(DECISIONS)
    }
    /// The completions heal trains on.
    pub fn accepted(&self) -> Artifact {
        self.file(ACCEPTED)
    }
    /// The heal run's folder.
    pub fn heal(&self) -> HealRunDir {
        HealRunDir { root: self.session.join(self.rel("heal")), rel: self.rel("heal") }
    }
    /// The student's history with this round on top.
    pub fn history(&self) -> Artifact {
        self.file(HISTORY)
    }
    /// Per-round numbers (cosines, KL spend).
    pub fn record(&self) -> Artifact {
        self.file(ROUND_RECORD)
    }
    /// The eval folder.
    pub fn eval_dir(&self) -> PathBuf {
        self.session.join(self.rel("eval"))
    }
    /// The eval report.
    pub fn eval(&self) -> Artifact {
        self.file(&format!("eval/{EVAL}"))
    }
    /// The control arms' metrics.
    pub fn controls(&self) -> Artifact {
        self.file(CONTROLS)
    }
    /// One control arm's eval folder.
    pub fn control_dir(&self, arm: &str) -> PathBuf {
        self.session.join(self.rel(&format!("controls/{arm}")))
    }
}

/// A file's absolute path and its path relative to the session (what events record).
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// Absolute (or as given) path.
    pub abs: PathBuf,
    /// Relative to the session folder.
    pub rel: String,
}

/// A heal run's folder (in a session: `round-NN/heal`; from the CLI: `heal --out DIR`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealRunDir {
    root: PathBuf,
    rel: String,
}

impl HealRunDir {
    /// A heal run at `root` (outside a session).
    pub fn at(root: &Path) -> Self {
        HealRunDir { root: root.to_path_buf(), rel: root.display().to_string() }
    }
    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The folder, as events record it.
    pub fn rel(&self) -> &str {
        &self.rel
    }
    /// The PEFT adapter folder.
    pub fn adapter(&self) -> PathBuf {
        self.root.join("adapter")
    }
    /// The training folder (log and checkpoint).
    pub fn train(&self) -> PathBuf {
        self.root.join("train")
    }
    /// Per-step log.
    pub fn log(&self) -> PathBuf {
        self.train().join(HEAL_LOG)
    }
    /// Resumable checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.train().join(HEAL_CHECKPOINT)
    }
    /// Run summary.
    pub fn summary(&self) -> PathBuf {
        self.root.join(HEAL_SUMMARY)
    }
    /// Gate-Q1 report, markdown.
    pub fn gate_q1_md(&self) -> PathBuf {
        self.root.join(GATE_Q1_MD)
    }
    /// Gate-Q1 report, JSON.
    pub fn gate_q1_json(&self) -> PathBuf {
        self.root.join(GATE_Q1_JSON)
    }
    /// Gate-Q1 report, as events record it.
    pub fn gate_q1_rel(&self) -> String {
        format!("{}/{GATE_Q1_MD}", self.rel)
    }
}

/// The `--out` folder of a stage run from the command line (`extract`, `dose`, `generate`).
#[derive(Debug, Clone, PartialEq)]
pub struct StageOut {
    root: PathBuf,
}

impl StageOut {
    /// The folder `root`.
    pub fn new(root: &Path) -> Self {
        StageOut { root: root.to_path_buf() }
    }
    /// The vector file.
    pub fn vector(&self) -> PathBuf {
        self.root.join(VECTOR)
    }
    /// The dose report.
    pub fn dose(&self) -> PathBuf {
        self.root.join(DOSE)
    }
    /// Kept (or all) completions.
    pub fn completions(&self) -> PathBuf {
        self.root.join(COMPLETIONS)
    }
    /// Rejected completions.
    pub fn rejected(&self) -> PathBuf {
        self.root.join(COMPLETIONS_REJECTED)
    }
    /// Surplus completions.
    pub fn surplus(&self) -> PathBuf {
        self.root.join(COMPLETIONS_SURPLUS)
    }
    /// The walk-down report.
    pub fn walkdown(&self) -> PathBuf {
        self.root.join(WALKDOWN)
    }
    /// The generation record.
    pub fn generation(&self) -> PathBuf {
        self.root.join(GENERATION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_paths_are_relative_to_the_session_and_absolute_under_it() {
        let s = SessionDir::new(Path::new("/s"));
        let r = s.round(3);
        assert_eq!(r.vector().rel, "round-03/vector.safetensors");
        assert_eq!(r.vector().abs, Path::new("/s/round-03/vector.safetensors"));
        assert_eq!(r.completions(7).rel, "round-03/completions-007.jsonl");
        assert_eq!(r.heal().gate_q1_rel(), "round-03/heal/gate-q1.md");
        assert_eq!(r.heal().log(), Path::new("/s/round-03/heal/train/log.jsonl"));
        assert_eq!(r.eval().rel, "round-03/eval/eval.json");
        assert_eq!(s.rel(&r.eval().abs), "round-03/eval/eval.json");
    }
}
