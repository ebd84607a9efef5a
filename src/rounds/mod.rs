//! The loop, once: every caller (the `run` command, the TUI worker) runs rounds through this `Runner`, and the
//! single-stage commands call the same stage functions (`crate::steer`, `crate::heal`, `crate::eval`).
//!
//! Per round N ≥ 1: extract the persona vector from the current student (round 1 takes the session's own vector
//! when it has one) → dose (iso-KL, c* stored in the vector file) → generate (the walk-down controller; each
//! batch is scored and written as it comes, so the TUI shows it at once) → gate Q0 → heal (LoRA on exactly the
//! accepted completions, adopted replays in place of their originals) → gate Q1 → bake → eval (round 0, the
//! base, is evaluated once, before round 1's) → controls (optional) → gate Q2. Every stage writes its artifacts
//! through `session::layout` and appends a `stage_done` event; a resumed run skips stages whose event exists.
//!
//! The gates are the researcher's in the TUI (`GateMode::Researcher`: the runner stops and says what it waits
//! for) and the automatic verdicts headless (`GateMode::Automatic`). Either way the same code runs.

pub mod turnaround;

use crate::error::{Error, Result};
use crate::eval::{
    self, ControlArm, ControlPoint, EvalConfig, EvalModel, EvalReport, GateQ2Spec, RoundPoint, RoundStatus,
};
use crate::fsutil::{atomic_write, atomic_write_json};
use crate::heal::{self, gate as hgate, HealConfig, HealStatus, HistoryEntry, RunOptions};
use crate::model::generate::Sampling;
use crate::model::{Adapters, Compute, Hooks, LoadedModel};
use crate::progress::Progress;
use crate::score::{self, Detectors, FilterThresholds, ScoredCompletion, Verdict};
use crate::session::manifest::GenerationSettings;
use crate::session::{
    self, DecisionKind, Gate, Lineage, RoundDir, Session, SessionDir, SessionEvent, SessionManifest,
    SessionState, Stage,
};
use crate::steer::{self, Completion, DoseConfig, Persona, SolverConfig, Statistic, SteerVector, Steering};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Who decides the gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Headless: the automatic filter's verdicts are gate Q0, gate Q1 keeps every completed heal, gate Q2 keeps a
    /// round whose p_ans_any is at least the floor.
    Automatic,
    /// The TUI: the runner stops before heal until the researcher passed gate Q0 of the round, and after heal
    /// until they kept or dropped the adapter (gate Q1); gate Q2 still applies the floor (0 in the TUI) and the
    /// researcher can roll back.
    Researcher,
}

/// Everything a run of rounds needs; the defaults are small enough for a CPU demo.
#[derive(Debug, Clone)]
pub struct RoundsConfig {
    /// Base model (directory or .gguf).
    pub model: PathBuf,
    /// Device and dtype every stage runs on.
    pub compute: Compute,
    /// Persona file (None: the built-in authority persona).
    pub persona: Option<PathBuf>,
    /// Rounds to run (judged rounds count, so a resumed run goes on to this total).
    pub rounds: u32,
    /// Gate Q2 keeps a round only when p_ans_any is at least this (absolute, or relative to the base's).
    pub floor: eval::CoherenceFloor,
    /// Who decides the gates.
    pub gates: GateMode,
    /// Extraction contexts used (None: all).
    pub extract_pairs: Option<usize>,
    /// Iso-KL target of the p95 per-token KL, nats.
    pub dose_target: f64,
    /// Greedy rollout length of the dose measurement.
    pub dose_tokens: usize,
    /// Calibration prompts used.
    pub dose_prompts: usize,
    /// The walk-down controller (its filter is the session's gate-Q0 thresholds).
    pub walk: steer::WalkDownConfig,
    /// Heal settings (the round number is filled in per round).
    pub heal: HealConfig,
    /// Held-out neutral prompts measured before/after healing (gate Q1).
    pub measure_n: usize,
    /// Tokens per measured generation.
    pub measure_tokens: usize,
    /// tinymfv eval settings.
    pub eval: EvalConfig,
    /// Also evaluate control arms on the same items: the student steered by this round's vector at c*, and by a
    /// norm-matched random vector at the same c*.
    pub controls: bool,
    /// Test and crash-simulation hook: stop right after this stage of this round.
    pub stop_after: Option<(u32, Stage)>,
}

/// The notes the automatic gate Q0 writes on its decisions (they are not the researcher's).
pub const AUTOMATIC_NOTE: &str = "automatic (headless)";

impl RoundsConfig {
    /// Small defaults for `model`, headless.
    pub fn small(model: &Path) -> Self {
        RoundsConfig {
            model: model.to_path_buf(),
            compute: Compute::default(),
            persona: None,
            rounds: 1,
            floor: eval::CoherenceFloor::default(),
            gates: GateMode::Automatic,
            extract_pairs: Some(16),
            dose_target: 1.0,
            dose_tokens: 12,
            dose_prompts: 4,
            walk: steer::WalkDownConfig {
                probe_n: 4,
                batch_n: 4,
                min_keep: 4,
                max_keep: 8,
                max_batches: 1,
                ..steer::WalkDownConfig::default()
            },
            heal: HealConfig {
                epochs: 1,
                grad_accum: 2,
                max_len: 256,
                r: 8,
                alpha: 16.0,
                lr: 5e-4,
                ..HealConfig::default()
            },
            measure_n: 2,
            measure_tokens: 32,
            eval: EvalConfig {
                n_vignettes: Some(8),
                think_tokens: 16,
                json_probe_max_tokens: 48,
                ..EvalConfig::default()
            },
            controls: false,
            stop_after: None,
        }
    }
}

/// The generation settings a new session gets for a persona: its neutral system prompt, its first `n_prompts`
/// prompts (all when `None`), the default alphas and sampling.
pub fn generation_for(
    persona: &Persona,
    n_prompts: Option<usize>,
    max_new_tokens: usize,
) -> GenerationSettings {
    let mut g = GenerationSettings {
        system_prompt: persona.spec.neutral_system.clone(),
        prompts: persona.spec.prompts.clone(),
        max_new_tokens,
        ..GenerationSettings::default()
    };
    if let Some(n) = n_prompts {
        g.prompts.truncate(n.max(1));
    }
    g
}

/// The manifest of a new session on `model` for `persona` (file `persona_file`), steering round 1 with
/// `vector` when given. The CLI, the runner and the TUI create sessions only through this.
pub fn new_manifest(
    dir: &Path,
    model: &Path,
    persona_file: Option<&Path>,
    vector: Option<&Path>,
    generation: GenerationSettings,
    thresholds: Option<FilterThresholds>,
) -> SessionManifest {
    let name = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "session".into());
    let mut m = SessionManifest::new(&name, model);
    m.persona_file = persona_file.map(Path::to_path_buf);
    m.vector_file = vector.map(Path::to_path_buf);
    m.generation = generation;
    if let Some(t) = thresholds {
        m.filter.thresholds = t;
    }
    m
}

/// Per-round numbers beside the eval: cosines and KL (`round-NN/round.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u32,
    /// Branch the round was made on.
    pub branch: String,
    /// Parent round (0 = the base).
    pub parent: u32,
    /// Fingerprint of the base weights.
    pub model_hash: String,
    /// Kept rounds the student carried (adapter directories).
    pub history: Vec<HistoryEntry>,
    /// sha256 of the vector file.
    pub vector_sha256: String,
    /// sha256 of the persona file.
    pub persona_sha256: String,
    /// Calibrated coefficient c*.
    pub c_star: f64,
    /// KL statistic reached at c* (the round's KL spend), nats.
    pub kl: f64,
    /// cos(v_r, v_1) over the concatenated layers.
    pub cos_teacher_r0: Option<f64>,
    /// cos(student − base mean hidden state on the extraction contexts, v_r).
    pub cos_student_teacher: Option<f64>,
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Stopped {
    /// The configured number of judged rounds is reached.
    Reached(u32),
    /// Gate Q2 dropped the round: its coherence fell under the floor.
    Floor {
        /// The round.
        round: u32,
        /// The verdict's note.
        note: String,
    },
    /// Waiting for the researcher to pass gate Q0 of the round (its completions are generated).
    AwaitingGateQ0(u32),
    /// Waiting for the researcher to keep or drop the round's adapter (gate Q1; the heal is done).
    AwaitingGateQ1(u32),
    /// The crash-simulation hook stopped it.
    StopAfter(u32, Stage),
    /// The heal was stopped (cancelled or its step limit) with this message.
    HealStopped(u32, String),
    /// Cancelled; a rerun resumes from the last finished stage.
    Cancelled,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Reached(n) => write!(f, "reached {n} rounds"),
            Stopped::Floor { round, note } => write!(f, "round {round}: {note}"),
            Stopped::AwaitingGateQ0(r) => write!(f, "round {r}: generated; waiting for gate Q0"),
            Stopped::AwaitingGateQ1(r) => write!(f, "round {r}: healed; waiting for keep or drop (gate Q1)"),
            Stopped::StopAfter(r, s) => write!(f, "stopped after round {r} {s}"),
            Stopped::HealStopped(r, m) => write!(f, "round {r}: heal stopped: {m}"),
            Stopped::Cancelled => f.write_str("cancelled; run again to resume from the last finished stage"),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Rounds with a verdict.
    pub rounds_done: u32,
    /// Why the loop stopped.
    pub stopped: Stopped,
    /// The progress-map points (base first).
    pub points: Vec<RoundPoint>,
}

/// What a run reports as it goes (all optional): log lines, a round starting, completions as they are written,
/// heal steps. The TUI worker turns these into screen updates.
pub trait RunObserver {
    /// A line for the log.
    fn log(&mut self, _msg: &str) {}
    /// A round's generation starts at calibrated coefficient `c_star` (its `round_started` event is written).
    fn round_started(&mut self, _round: u32, _c_star: f64) {}
    /// Scored completions were written to `file` (relative to the session) and recorded.
    fn completions(&mut self, _round: u32, _part: usize, _file: &str, _rows: &[ScoredCompletion]) {}
    /// One heal optimiser step.
    fn heal_step(&mut self, _round: u32, _step: &heal::StepRecord) {}
}

/// Observes nothing.
pub struct Quiet;
impl RunObserver for Quiet {}

/// Logs to a closure.
pub struct LogTo<F: FnMut(&str)>(pub F);
impl<F: FnMut(&str)> RunObserver for LogTo<F> {
    fn log(&mut self, msg: &str) {
        (self.0)(msg)
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, e))
}

/// Read a JSON-lines artifact.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::bad_file(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Cosine of two vectors' directions concatenated over their shared layers (None when none are shared).
pub fn vector_cosine(a: &BTreeMap<usize, Tensor>, b: &BTreeMap<usize, Tensor>) -> Result<Option<f64>> {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    let mut any = false;
    for (l, ta) in a {
        let Some(tb) = b.get(l) else { continue };
        let xa: Vec<f32> = ta.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let xb: Vec<f32> = tb.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if xa.len() != xb.len() {
            return Err(Error::invalid(format!("layer {l}: vectors of width {} and {}", xa.len(), xb.len())));
        }
        for (x, y) in xa.iter().zip(&xb) {
            dot += *x as f64 * *y as f64;
            na += *x as f64 * *x as f64;
            nb += *y as f64 * *y as f64;
        }
        any = true;
    }
    if !any || na <= 0.0 || nb <= 0.0 {
        return Ok(None);
    }
    Ok(Some(dot / (na.sqrt() * nb.sqrt())))
}

/// Student shift: mean hidden state of the student (adapters at their gates) minus the pristine base (every
/// gate 0) on the extraction contexts under the neutral system prompt, at the vector's layers.
pub fn student_shift(
    lm: &LoadedModel,
    persona: &Persona,
    layers: &[usize],
    n: Option<usize>,
) -> Result<BTreeMap<usize, Tensor>> {
    let contexts: Vec<&String> = persona.spec.contexts.iter().take(n.unwrap_or(usize::MAX)).collect();
    let texts: Vec<String> = contexts
        .iter()
        .map(|c| lm.chat.prompt(Some(&persona.spec.neutral_system), c))
        .collect::<Result<_>>()?;
    let student = steer::extract::mean_last_token_residuals(lm, &texts, layers, 8, Adapters::AsGated)?;
    let base = steer::extract::mean_last_token_residuals(lm, &texts, layers, 8, Adapters::Base)?;
    student
        .into_iter()
        .map(|(l, s)| Ok((l, (s - base.get(&l).ok_or_else(|| Error::invalid("capture bookkeeping"))?)?)))
        .collect()
}

/// Score completions for gate Q0: the text scores plus persona strength from a teacher-forced base pass with
/// the round's vector. The runner's generate stage and the worker's custom prompts, replays and re-scores all
/// score through this.
pub fn score_completions(
    lm: &LoadedModel,
    vector: Option<&SteerVector>,
    det: &Detectors,
    th: &FilterThresholds,
    cs: Vec<Completion>,
    progress: &dyn Progress,
) -> Result<Vec<ScoredCompletion>> {
    let mut out = Vec::with_capacity(cs.len());
    for c in cs {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let strength = match vector.filter(|v| !v.is_prompt_only()) {
            Some(v) => {
                score::perplexity::teacher_force(lm, &c.system, &c.prompt, &c.tokens, Some(&v.directions))?
                    .persona_strength
            }
            None => None,
        };
        let score = score::score_completion(&c, det, th, strength);
        out.push(ScoredCompletion { completion: c, score });
    }
    Ok(out)
}

/// The session a runner writes to: its own, or one the caller (the TUI worker) shares. A shared session is
/// locked only for each read or append, so the caller's own writes (the researcher's decisions while a round
/// runs) reach the log at once instead of queueing behind the whole round.
enum Held<'a> {
    Owned(Box<Session>),
    Shared(&'a Mutex<Session>),
}

impl Held<'_> {
    fn with<R>(&self, f: impl FnOnce(&Session) -> Result<R>) -> Result<R> {
        match self {
            Held::Owned(s) => f(s),
            Held::Shared(m) => {
                f(&*m.lock().map_err(|_| Error::invalid("the session writer was poisoned"))?)
            }
        }
    }
    fn with_mut<R>(&mut self, f: impl FnOnce(&mut Session) -> Result<R>) -> Result<R> {
        match self {
            Held::Owned(s) => f(s),
            Held::Shared(m) => {
                f(&mut *m.lock().map_err(|_| Error::invalid("the session writer was poisoned"))?)
            }
        }
    }
}

/// A loaded student: the base plus the adapters of `chain` (in order), and, once a round's vector is known,
/// that round and its vector. Handed between runs (the worker keeps it for replays while the researcher
/// curates) so a round does not load the model again.
pub struct Student {
    /// The kept rounds whose adapters it carries.
    pub chain: Vec<u32>,
    /// The model.
    pub lm: LoadedModel,
    /// The round being curated and its vector (with c*), when one is.
    pub round: Option<(u32, SteerVector)>,
}

/// One run of the loop over a session folder (created when absent).
pub struct Runner<'a> {
    session: Held<'a>,
    layout: SessionDir,
    manifest: SessionManifest,
    state: SessionState,
    cfg: RoundsConfig,
    persona: Persona,
    progress: &'a mut dyn Progress,
    obs: &'a mut dyn RunObserver,
    student: Option<Student>,
    /// Gate Q0's accepted completions of a round, handed to heal within the run.
    accepted: Option<(u32, Vec<Completion>)>,
}

/// Whether the run goes on after a stage.
enum Flow {
    Go,
    Stop(Stopped),
}

macro_rules! step {
    ($e:expr) => {
        if let Flow::Stop(w) = $e? {
            return Ok(Flow::Stop(w));
        }
    };
}

impl<'a> Runner<'a> {
    /// Open the session in `dir`, or create it with `new_session` (called only when there is none).
    pub fn open(
        dir: &Path,
        cfg: RoundsConfig,
        new_session: impl FnOnce(&Persona) -> SessionManifest,
        progress: &'a mut dyn Progress,
        obs: &'a mut dyn RunObserver,
    ) -> Result<Self> {
        let persona = Persona::load_or_default(cfg.persona.as_deref())?;
        let opened = Session::open_or_create(dir, || Ok(new_session(&persona)))?;
        for w in &opened.warnings {
            obs.log(&format!("warning: {w}"));
        }
        let manifest = opened.session.manifest().clone();
        let persona = Self::session_persona(&manifest, persona, &cfg)?;
        Ok(Runner {
            layout: opened.session.layout(),
            session: Held::Owned(Box::new(opened.session)),
            manifest,
            state: opened.state,
            cfg,
            persona,
            progress,
            obs,
            student: None,
            accepted: None,
        })
    }

    /// Run on a session the caller already has open and keeps writing to (its log is re-read from disk); the
    /// runner takes the lock only for each read or append. `student` is a model the caller kept from an earlier
    /// run (used when it carries the chain the round needs).
    pub fn with_session(
        session: &'a Mutex<Session>,
        cfg: RoundsConfig,
        student: Option<Student>,
        progress: &'a mut dyn Progress,
        obs: &'a mut dyn RunObserver,
    ) -> Result<Self> {
        let held = Held::Shared(session);
        let (layout, manifest, contents) = held.with(|s| {
            Ok((s.layout(), s.manifest().clone(), session::event::read_log(&s.layout().events())?))
        })?;
        let state = session::fold(contents.events.iter().map(|l| &l.event));
        // The session's persona file wins over the configured one (a session is about one persona).
        let persona = Persona::load_or_default(manifest.persona_file.as_deref().or(cfg.persona.as_deref()))?;
        Ok(Runner {
            session: held,
            layout,
            manifest,
            state,
            cfg,
            persona,
            progress,
            obs,
            student,
            accepted: None,
        })
    }

    /// The session's persona file wins over the configured one (a session is about one persona).
    fn session_persona(manifest: &SessionManifest, persona: Persona, cfg: &RoundsConfig) -> Result<Persona> {
        match &manifest.persona_file {
            Some(p) if cfg.persona.as_deref() != Some(p.as_path()) => Persona::load(p),
            _ => Ok(persona),
        }
    }

    /// The lineage as the log tells it now.
    pub fn lineage(&self) -> &Lineage {
        &self.state.lineage
    }

    /// The loaded student, for a caller that keeps it between runs.
    pub fn into_student(self) -> Option<Student> {
        self.student
    }

    fn append(&mut self, e: SessionEvent) -> Result<()> {
        self.session.with_mut(|s| s.append(e.clone()))?;
        session::state::apply(&mut self.state, &e);
        Ok(())
    }

    fn write_artifact(&mut self, rel: &str, bytes: &[u8], e: SessionEvent) -> Result<()> {
        self.session.with_mut(|s| s.write_artifact(rel, bytes, e.clone()))?;
        session::state::apply(&mut self.state, &e);
        Ok(())
    }

    /// Re-fold the log of a shared session: the caller (the TUI's record lane) appends the researcher's
    /// decisions and gates while the run goes on, and a gate must see them. An owned session has no other
    /// writer, so its fold is current.
    fn refresh(&mut self) -> Result<()> {
        if let Held::Shared(_) = self.session {
            let contents = self.session.with(|s| session::event::read_log(&s.layout().events()))?;
            self.state = session::fold(contents.events.iter().map(|l| &l.event));
        }
        Ok(())
    }

    fn is_done(&self, round: u32, stage: Stage) -> bool {
        self.state.lineage.is_done(round, stage)
    }

    /// Record a stage as done; returns `Stop` when the crash-simulation hook names it or the user cancelled.
    fn done(&mut self, round: u32, stage: Stage, file: String) -> Result<Flow> {
        self.append(SessionEvent::StageDone { round, stage, file })?;
        self.obs.log(&format!("round {round}: {stage} done"));
        if self.cfg.stop_after == Some((round, stage)) {
            return Ok(Flow::Stop(Stopped::StopAfter(round, stage)));
        }
        if self.progress.is_cancelled() {
            return Ok(Flow::Stop(Stopped::Cancelled));
        }
        Ok(Flow::Go)
    }

    fn adapter_dir(&self, round: u32) -> PathBuf {
        self.layout.round(round).heal().adapter()
    }

    fn history(&self, chain: &[u32]) -> Vec<HistoryEntry> {
        chain.iter().map(|r| HistoryEntry { dir: self.adapter_dir(*r), gate: 1.0 }).collect()
    }

    /// The student carrying `chain`: the one kept from before when it matches, else loaded.
    fn take_student(&mut self, chain: &[u32]) -> Result<LoadedModel> {
        if let Some(s) = self.student.take() {
            if s.chain == chain {
                return Ok(s.lm);
            }
        }
        let dev = self.cfg.compute.device()?;
        let lm =
            heal::load_with_history(&self.cfg.model, self.cfg.compute.dtype, &dev, &self.history(chain))?;
        if self.state.model.as_ref().map(|(_, h)| h) != Some(&lm.info.weights_hash) {
            self.append(SessionEvent::ModelLoaded {
                model: lm.info.id.clone(),
                weights_hash: lm.info.weights_hash.clone(),
            })?;
        }
        Ok(lm)
    }

    fn keep_student(&mut self, chain: Vec<u32>, lm: LoadedModel, round: Option<(u32, SteerVector)>) {
        self.student = Some(Student { chain, lm, round });
    }

    fn eval_model(&mut self, lm: &LoadedModel, round: u32) -> Result<Flow> {
        let rd = self.layout.round(round);
        let hooks = Hooks::none();
        let report = eval::run_eval(&EvalModel::from_loaded(lm, &hooks), &self.cfg.eval, self.progress)?;
        report.save(&rd.eval_dir())?;
        let m = &report.metrics;
        self.obs.log(&format!(
            "round {round}: authority {:.4} care {:.4} p_ans_any {:.4} ppx_json {:.3} json_is_valid {}",
            m.authority,
            m.care,
            m.p_ans_any,
            m.ppx_json,
            m.json_is_valid.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
        ));
        self.done(round, Stage::Eval, rd.eval().rel)
    }

    /// Run until the configured count, the floor, a gate the researcher has not passed, the hook or a cancel.
    pub fn run(&mut self) -> Result<RunSummary> {
        let stopped = match self.run_inner() {
            Err(Error::Cancelled) => Stopped::Cancelled,
            other => other?,
        };
        let points = self.points()?;
        self.write_q2(&points)?;
        let rounds_done = self.lineage().verdicts.len() as u32;
        Ok(RunSummary { rounds_done, stopped, points })
    }

    /// Run the round in progress to its end (or to a gate it waits at), or one more round when none is in
    /// progress: `run` with the round count one past the rounds judged now.
    pub fn run_next(&mut self) -> Result<RunSummary> {
        self.cfg.rounds = self.lineage().verdicts.len() as u32 + 1;
        self.run()
    }

    /// The round in progress: the lowest round ≥ 1 without a verdict, else the next one.
    pub fn round_in_progress(lin: &Lineage) -> u32 {
        (1..=lin.last_round()).find(|r| !lin.verdicts.contains_key(r)).unwrap_or(lin.last_round() + 1)
    }

    fn run_inner(&mut self) -> Result<Stopped> {
        loop {
            let judged = self.lineage().verdicts.len() as u32;
            let round = Self::round_in_progress(self.lineage());
            if judged >= self.cfg.rounds {
                return Ok(Stopped::Reached(self.cfg.rounds));
            }
            if let Flow::Stop(why) = self.round(round)? {
                return Ok(why);
            }
        }
    }

    /// One round, skipping finished stages.
    fn round(&mut self, round: u32) -> Result<Flow> {
        let chain = self.lineage().chain.clone();
        let history = self.history(&chain);
        let rd = self.layout.round(round);
        std::fs::create_dir_all(rd.dir()).map_err(|e| Error::bad_file(rd.dir(), e))?;
        let mut lm = self.take_student(&chain)?;
        let flow = self.before_heal(round, &rd, &lm);
        let v = match flow {
            Ok((Flow::Go, v)) => v,
            Ok((Flow::Stop(w), v)) => {
                self.keep_student(chain, lm, v.map(|v| (round, v)));
                return Ok(Flow::Stop(w));
            }
            Err(e) => {
                self.keep_student(chain, lm, None);
                return Err(e);
            }
        };
        let v = v.ok_or_else(|| Error::invalid(format!("round {round}: no vector after the dose stage")))?;
        // heal: train this round's LoRA on the accepted completions; measure before/after for gate Q1.
        if !self.is_done(round, Stage::Heal) {
            let accepted: Vec<Completion> = match self.accepted.take() {
                Some((r, a)) if r == round => a,
                _ => read_jsonl(&rd.accepted().abs)?,
            };
            let healed = self.heal(round, &rd, &mut lm, &accepted, history.clone());
            // Whatever happened, the model now carries a (possibly partial) adapter of this round: never hand
            // it on as the pre-heal student.
            match healed {
                Ok(Flow::Go) => {}
                other => return other,
            }
        } else {
            heal::attach_history(&mut lm.model, &[HistoryEntry { dir: self.adapter_dir(round), gate: 1.0 }])?;
        }
        let mut healed_chain = chain.clone();
        healed_chain.push(round);
        // gate Q1: the researcher keeps or drops the adapter; headless keeps it.
        self.refresh()?;
        if self.cfg.gates == GateMode::Researcher && !self.lineage().q1.contains_key(&round) {
            self.keep_student(healed_chain, lm, None);
            return Ok(Flow::Stop(Stopped::AwaitingGateQ1(round)));
        }
        if self.lineage().q1.get(&round) == Some(&false) {
            // Dropped at gate Q1: the round has its verdict; nothing more to run for it.
            return Ok(Flow::Go);
        }
        let r = self.after_heal(round, &rd, &mut lm, &v, history);
        self.keep_student(healed_chain, lm, None);
        r
    }

    /// Extract, dose, generate and gate Q0; returns the round's vector once it exists.
    fn before_heal(
        &mut self,
        round: u32,
        rd: &RoundDir,
        lm: &LoadedModel,
    ) -> Result<(Flow, Option<SteerVector>)> {
        macro_rules! go {
            ($e:expr, $v:expr) => {
                if let Flow::Stop(w) = $e? {
                    return Ok((Flow::Stop(w), $v));
                }
            };
        }
        let vector = rd.vector();
        // Within one run the stages hand each other values; the files are read back only on resume.
        let mut extracted = None;
        // extract: from the current student; round 1 takes the session's own vector when it has one.
        if !self.is_done(round, Stage::Extract) {
            let v = match (&self.manifest.vector_file, round) {
                (Some(p), 1) => {
                    let v = SteerVector::load(p)?;
                    for w in v.check_model(lm, p)? {
                        self.obs.log(&format!("warning: {w}"));
                    }
                    self.obs.log(&format!("round 1: steering with {}", p.display()));
                    v
                }
                _ => {
                    let mut ecfg = steer::ExtractConfig::for_model(lm);
                    ecfg.n_pairs = self.cfg.extract_pairs;
                    steer::extract_mean_diff(lm, &self.persona, &ecfg, self.progress)?
                }
            };
            v.save(&vector.abs)?;
            go!(self.done(round, Stage::Extract, vector.rel.clone()), None);
            extracted = Some(v);
        }
        let mut v = match extracted {
            Some(v) => v,
            None => SteerVector::load(&vector.abs)?,
        };
        // dose: iso-KL calibration stored in the vector file (a vector that came calibrated keeps its c*).
        if !self.is_done(round, Stage::Dose) {
            if v.meta.calibration.is_some() && !v.is_prompt_only() {
                self.obs.log(&format!("round {round}: c* {:.4} from the vector file", v.calibrated()?));
                go!(self.done(round, Stage::Dose, vector.rel.clone()), Some(v));
            } else {
                let steering = Steering::new(&v, &lm.model)?;
                let mut prompts = self.persona.spec.calibration_prompts.clone();
                prompts.truncate(self.cfg.dose_prompts.max(1));
                let dcfg = DoseConfig {
                    solver: SolverConfig { target: self.cfg.dose_target, ..SolverConfig::default() },
                    statistic: Statistic::P95,
                    tokens: self.cfg.dose_tokens,
                    prompts,
                    system: self.manifest.generation.system_prompt.clone(),
                };
                let mut report = steer::calibrate(lm, &steering, &dcfg, self.progress)?;
                report.vector = Some(vector.rel.clone());
                atomic_write_json(&rd.dose().abs, &report)?;
                v.meta.calibration = Some(report.calibration());
                v.save(&vector.abs)?;
                self.obs
                    .log(&format!("round {round}: c* {:.4} (p95 KL {:.4})", report.c_star, report.achieved));
                go!(self.done(round, Stage::Dose, rd.dose().rel), Some(v));
            }
        }
        // generate: the walk-down controller, each batch scored and recorded as it comes.
        if !self.is_done(round, Stage::Generate) {
            go!(self.generate(round, rd, lm, &v), Some(v));
        }
        if !self.is_done(round, Stage::GateQ0) {
            go!(self.gate_q0(round, rd, lm), Some(v));
        }
        Ok((Flow::Go, Some(v)))
    }

    fn generate(&mut self, round: u32, rd: &RoundDir, lm: &LoadedModel, v: &SteerVector) -> Result<Flow> {
        let c_star = v.calibrated()?;
        if !self.state.rounds.get(&round).is_some_and(|r| r.started) {
            self.append(SessionEvent::RoundStarted { round, dose: c_star, vector: Some(rd.vector().rel) })?;
        }
        self.obs.round_started(round, c_star);
        let steering = Steering::new(v, &lm.model)?;
        let g = self.manifest.generation.clone();
        let gen = steer::GenConfig {
            sampling: g.sampling(),
            window: g.kl_window.max(1),
            ..steer::GenConfig::new(g.max_new_tokens)
        };
        let det = self.session.with(|s| s.detectors())?;
        let th = self.manifest.filter.thresholds.clone();
        // A resumed generation regenerates the same batches (same seeds); parts already on disk are scored again
        // (the controller needs their verdicts) but not written again.
        let written: Vec<usize> = self
            .state
            .rounds
            .get(&round)
            .map(|r| r.generated_prompts().into_iter().collect())
            .unwrap_or_default();
        let mut part = 0usize;
        let mut failure: Option<Error> = None;
        let (session, state, obs) = (&mut self.session, &mut self.state, &mut *self.obs);
        // Gate Q0's filter is the walk-down's: each batch is scored once, recorded, and its verdicts steer the
        // dose, so the walk-down stops exactly when gate Q0 will keep `min_keep`.
        let mut filter = |batch: &[Completion]| -> Result<Vec<steer::walkdown::Verdict>> {
            let this_part = part;
            part += 1;
            // The controller polls for a cancel between decode steps; scoring a batch is short.
            let rows = score_completions(
                lm,
                Some(v),
                &det,
                &th,
                batch.to_vec(),
                &crate::progress::Silent::default(),
            )?;
            let verdicts = rows.iter().map(|r| r.score.walk_verdict()).collect();
            if written.contains(&this_part) {
                return Ok(verdicts);
            }
            let file = rd.completions(this_part);
            let event = SessionEvent::CompletionsGenerated {
                round,
                prompt_index: this_part,
                file: file.rel.clone(),
                ids: rows.iter().map(|r| r.completion.id.clone()).collect(),
            };
            let bytes = session::to_jsonl(&rows)?;
            if let Err(e) = session.with_mut(|s| s.write_artifact(&file.rel, &bytes, event.clone())) {
                let msg = e.to_string();
                failure = Some(e);
                return Err(Error::invalid(msg));
            }
            session::state::apply(state, &event);
            obs.completions(round, this_part, &file.rel, &rows);
            Ok(verdicts)
        };
        let report = steer::walk_down(
            lm,
            &steering,
            &g.system_prompt,
            c_star,
            &g.prompts,
            &g.alphas,
            steer::round_seed(g.seed, round),
            &gen,
            &self.cfg.walk,
            &mut filter,
            self.progress,
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let r = report?;
        atomic_write_json(&rd.walkdown().abs, &r.report)?;
        self.done(round, Stage::Generate, rd.walkdown().rel)
    }

    /// Gate Q0. Headless, the automatic verdicts are recorded as decisions first. Then, either way, the round's
    /// completions as they stand (adopted replays in place of their originals) and their current decisions are
    /// the gate: `decisions.jsonl`, and `accepted.jsonl` for heal. In the TUI the runner waits until the
    /// researcher passed the gate for this round.
    fn gate_q0(&mut self, round: u32, rd: &RoundDir, lm: &LoadedModel) -> Result<Flow> {
        self.refresh()?;
        let rs = self.state.rounds.get(&round).cloned().unwrap_or_default();
        let rows = self.session.with(|s| s.load_round(&rs))?;
        match self.cfg.gates {
            GateMode::Researcher if !rs.gate_passed(Gate::Q0) => {
                return Ok(Flow::Stop(Stopped::AwaitingGateQ0(round)))
            }
            GateMode::Researcher => {}
            GateMode::Automatic => {
                for r in &rows {
                    if rs.decision(&r.completion.id).is_some() {
                        continue;
                    }
                    let keep = r.score.verdict == Verdict::Keep;
                    self.append(SessionEvent::Decision {
                        round,
                        completion: r.completion.id.clone(),
                        decision: if keep { DecisionKind::Accept } else { DecisionKind::Reject },
                        tags: r.score.reasons.iter().map(|x| x.kind().label().to_string()).collect(),
                        note: Some(AUTOMATIC_NOTE.into()),
                    })?;
                }
            }
        }
        let rs = self.state.rounds.get(&round).cloned().unwrap_or_default();
        let decided = rs.decisions();
        let mut accepted = Vec::new();
        let mut decisions = Vec::new();
        for r in &rows {
            let Some(d) = decided.get(r.completion.id.as_str()) else { continue };
            decisions.push(serde_json::json!({
                "id": r.completion.id, "keep": d.keep, "tags": d.tags, "note": d.note, "dose": r.completion.dose,
            }));
            if d.keep {
                accepted.push(r.completion.clone());
            }
        }
        atomic_write(&rd.decisions().abs, &session::to_jsonl(&decisions)?)?;
        atomic_write(&rd.accepted().abs, &session::to_jsonl(&accepted)?)?;
        self.accepted = Some((round, accepted.clone()));
        if self.cfg.gates == GateMode::Automatic {
            self.write_gate_q0_report(round, rd, lm, &rows, !accepted.is_empty())?;
        }
        let by =
            if self.cfg.gates == GateMode::Automatic { "the automatic filter" } else { "the researcher" };
        self.obs.log(&format!(
            "round {round}: gate Q0 by {by}: {} accepted of {} decided ({} generated)",
            accepted.len(),
            decisions.len(),
            rows.len()
        ));
        if accepted.is_empty() {
            return Err(Error::invalid(format!(
                "round {round}: gate Q0 accepted none of the {} completions (see {}); {}",
                rows.len(),
                rd.gate_q0().rel,
                if self.cfg.gates == GateMode::Automatic {
                    "loosen the thresholds or lower the dose target"
                } else {
                    "accept some on the gate-Q0 screen"
                }
            )));
        }
        self.done(round, Stage::GateQ0, rd.accepted().rel)
    }

    fn write_gate_q0_report(
        &mut self,
        round: u32,
        rd: &RoundDir,
        lm: &LoadedModel,
        rows: &[ScoredCompletion],
        passed: bool,
    ) -> Result<()> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let items = rows
            .iter()
            .map(|r| score::gate::GateItem {
                id: &r.completion.id,
                prompt: &r.completion.prompt,
                text: &r.completion.text,
                score: &r.score,
                human_keep: Some(r.score.verdict == Verdict::Keep),
                tags: &[],
                note: None,
            })
            .collect();
        let md = score::gate::render_gate_q0(&score::gate::GateInputs {
            round,
            session: &self.manifest.name,
            model: &lm.info.id,
            written_at: &now,
            passed,
            thresholds: &self.manifest.filter.thresholds,
            items,
            reshow: vec![],
        });
        let file = rd.gate_q0();
        let event = SessionEvent::GateWritten { round, gate: Gate::Q0, file: file.rel.clone(), passed };
        self.write_artifact(&file.rel, md.as_bytes(), event)
    }

    fn heal(
        &mut self,
        round: u32,
        rd: &RoundDir,
        lm: &mut LoadedModel,
        accepted: &[Completion],
        history: Vec<HistoryEntry>,
    ) -> Result<Flow> {
        let run = rd.heal();
        let out = run.root();
        let cfg = HealConfig { round: round as usize, ..self.cfg.heal.clone() };
        let data =
            heal::build_examples(accepted, &lm.tokenizer, &lm.chat, lm.model.cfg.vocab_size, cfg.max_len)?;
        for (id, why) in &data.skipped {
            self.obs.log(&format!("round {round}: heal skips completion `{id}`: {why}"));
        }
        if data.examples.is_empty() {
            let why: Vec<String> = data.skipped.iter().map(|(id, w)| format!("{id}: {w}")).collect();
            return Err(Error::invalid(format!(
                "round {round}: none of the {} accepted completions is usable for healing ({})",
                accepted.len(),
                why.join("; ")
            )));
        }
        let held_out: Vec<String> = self
            .persona
            .spec
            .prompts
            .iter()
            .skip(self.manifest.generation.prompts.len())
            .chain(self.persona.spec.prompts.iter())
            .take(self.cfg.measure_n.max(1))
            .cloned()
            .collect();
        let spec = hgate::MeasureSpec {
            prompts: held_out,
            neutral_system: self.manifest.generation.system_prompt.clone(),
            persona_system: Some(self.persona.spec.positive.clone()),
            sampling: Sampling::default_sampling(self.cfg.measure_tokens, 1234),
        };
        let gate_by = match self.cfg.gates {
            GateMode::Researcher => "researcher's",
            GateMode::Automatic => "automatic",
        };
        let before = hgate::measure(lm, &spec, self.progress)?;
        let opts = RunOptions { fresh: false, stop_after_steps: None, final_gate: None, history };
        let obs = &mut *self.obs;
        let mut on_step = |r: &heal::StepRecord| obs.heal_step(round, r);
        let log = heal::heal(&mut lm.model, &lm.info, &data, &cfg, out, &opts, self.progress, &mut on_step)?;
        match log.status {
            HealStatus::Completed => {}
            HealStatus::Cancelled => return Ok(Flow::Stop(Stopped::Cancelled)),
            HealStatus::Stopped => return Ok(Flow::Stop(Stopped::HealStopped(round, log.message))),
            HealStatus::Diverged => return Err(Error::invalid(format!("round {round}: {}", log.message))),
        }
        let after = hgate::measure(lm, &spec, self.progress)?;
        let (source, coherence_label, trait_label) = hgate::fallback_labels(true);
        let samples = hgate::sample_pairs(lm, &spec, accepted, &before, Some(&after))?;
        let report = hgate::GateQ1 {
            round: round as usize,
            model: lm.info.id.clone(),
            source,
            coherence_label,
            trait_label,
            trait_sign: 1.0,
            before: hgate::Metrics::from(&before),
            after: Some(hgate::Metrics::from(&after)),
            heal_summary: vec![log.message.clone()],
            sweep: vec![],
            samples,
            notes: vec![format!("{} accepted completions from the {gate_by} gate Q0.", accepted.len())],
            intervals: hgate::q1_intervals(&before, &after),
        };
        hgate::write(&run.gate_q1_md(), &report)?;
        atomic_write_json(&run.gate_q1_json(), &report)?;
        self.append(SessionEvent::GateWritten {
            round,
            gate: Gate::Q1,
            file: run.gate_q1_rel(),
            passed: true,
        })?;
        self.done(round, Stage::Heal, run.rel().to_string())
    }

    /// Bake, the base's eval when it has none yet, the round's eval, the controls and gate Q2.
    fn after_heal(
        &mut self,
        round: u32,
        rd: &RoundDir,
        lm: &mut LoadedModel,
        v: &SteerVector,
        history: Vec<HistoryEntry>,
    ) -> Result<Flow> {
        // bake: the student's history with this round on top (re-applied, not merged, so gates stay editable).
        if !self.is_done(round, Stage::Bake) {
            let mut h = history.clone();
            h.push(HistoryEntry { dir: self.adapter_dir(round), gate: 1.0 });
            atomic_write_json(&rd.history().abs, &h)?;
            let cal = v
                .meta
                .calibration
                .clone()
                .ok_or_else(|| Error::invalid(format!("round {round}: the vector has no calibration")))?;
            let first = self.layout.round(1).vector();
            let cos_teacher_r0 = if round == 1 {
                Some(1.0)
            } else {
                match SteerVector::load(&first.abs) {
                    Ok(v1) => vector_cosine(&v.directions, &v1.directions)?,
                    Err(_) => None,
                }
            };
            let layers: Vec<usize> = v.directions.keys().copied().collect();
            let shift = student_shift(lm, &self.persona, &layers, self.cfg.extract_pairs)?;
            let lin = self.lineage();
            let record = RoundRecord {
                round,
                branch: lin.branch.clone(),
                parent: lin.parent,
                model_hash: lm.info.weights_hash.clone(),
                history: h,
                vector_sha256: sha256_file(&rd.vector().abs)?,
                persona_sha256: self.persona.sha256.clone(),
                c_star: cal.coefficient,
                kl: cal.achieved,
                cos_teacher_r0,
                cos_student_teacher: vector_cosine(&shift, &v.directions)?,
            };
            atomic_write_json(&rd.record().abs, &record)?;
            step!(self.done(round, Stage::Bake, rd.history().rel));
        }
        // The base's eval, once, before the first round's (so the researcher is not kept waiting for it before
        // round 1's completions).
        if !self.is_done(0, Stage::Eval) {
            let dev = self.cfg.compute.device()?;
            let base = crate::model::load_model(&self.cfg.model, self.cfg.compute.dtype, &dev)?;
            step!(self.eval_model(&base, 0));
        }
        if !self.is_done(round, Stage::Eval) {
            step!(self.eval_model(lm, round));
        }
        if self.cfg.controls && !self.is_done(round, Stage::Controls) {
            step!(self.controls(round, rd, lm, v));
        }
        // gate Q2: keep unless coherence fell under the floor.
        let report = EvalReport::load(&rd.eval().abs)?;
        let base_p = EvalReport::load(&self.layout.round(0).eval().abs)?.metrics.p_ans_any;
        let p = report.metrics.p_ans_any;
        let floor = self.cfg.floor.threshold(base_p);
        let keep = p >= floor;
        let note = if keep {
            format!("p_ans_any {p:.4} ≥ floor {}", self.cfg.floor.describe(base_p))
        } else {
            format!("p_ans_any {p:.4} under the floor {}", self.cfg.floor.describe(base_p))
        };
        self.append(SessionEvent::RoundGate { round, gate: Gate::Q2, keep, note: Some(note.clone()) })?;
        let points = self.points()?;
        self.write_q2(&points)?;
        if !keep {
            return Ok(Flow::Stop(Stopped::Floor { round, note }));
        }
        Ok(Flow::Go)
    }

    /// The control arms on the same eval items: the student steered by the real vector at c*, by a random
    /// direction with the same per-layer norms at the same c*, and prompted with the positive persona instead of
    /// steered (`round-NN/controls.json`).
    fn controls(&mut self, round: u32, rd: &RoundDir, lm: &LoadedModel, v: &SteerVector) -> Result<Flow> {
        let c_star = v.calibrated()? as f32;
        let random = steer::random_like(v, steer::round_seed(self.manifest.generation.seed, round))?;
        // The prompt-only arm puts the positive persona in the system prompt of every eval item, unsteered.
        let mut prompt_only = self.cfg.eval.clone();
        prompt_only.system_prompt = Some(self.persona.spec.positive.clone());
        let arm_specs = [
            (ControlArm::Steered, Steering::new(v, &lm.model)?.hooks(&[c_star]), &self.cfg.eval, c_star),
            (ControlArm::Random, Steering::new(&random, &lm.model)?.hooks(&[c_star]), &self.cfg.eval, c_star),
            (ControlArm::PromptOnly, Hooks::none(), &prompt_only, 0.0),
        ];
        let mut arms = Vec::new();
        for (arm, hooks, eval_cfg, c_star) in arm_specs {
            let report = eval::run_eval(&EvalModel::from_loaded(lm, &hooks), eval_cfg, self.progress)?;
            report.save(&rd.control_dir(arm.name()))?;
            let m = &report.metrics;
            self.obs.log(&format!(
                "round {round}: control {}: authority {:.4} care {:.4} p_ans_any {:.4}",
                arm.name(),
                m.authority,
                m.care,
                m.p_ans_any
            ));
            arms.push(ControlPoint::from_metrics(arm, c_star as f64, m));
        }
        atomic_write_json(&rd.controls().abs, &arms)?;
        self.done(round, Stage::Controls, rd.controls().rel)
    }

    /// Progress-map points: the base, then every judged round that has an eval (kept or dropped; a round
    /// dropped at gate Q1 was never evaluated), with cumulative KL over the active chain.
    pub fn points(&self) -> Result<Vec<RoundPoint>> {
        points(&self.layout, self.lineage())
    }

    fn write_q2(&mut self, points: &[RoundPoint]) -> Result<()> {
        write_summaries(&self.layout, points, self.cfg.floor, self.lineage())
    }
}

/// The session's summaries of its rounds: `rounds.json`, the progress map, `gate-q2.md` and `lineage.json`.
fn write_summaries(
    layout: &SessionDir,
    points: &[RoundPoint],
    floor: eval::CoherenceFloor,
    lin: &Lineage,
) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let dir = layout.root().to_path_buf();
    atomic_write_json(&layout.rounds_table(), &points)?;
    eval::write_progress_map(points, floor.threshold(eval::gate_q2::base_p_ans_any(points)), &dir)?;
    let spec = GateQ2Spec { floor, ..GateQ2Spec::default() };
    eval::write_gate_q2(&dir, points, &spec)?;
    atomic_write_json(&layout.lineage(), &LineageFile::from(lin))?;
    Ok(())
}

/// What `report` rewrote.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    /// The rounds table, as written.
    pub points: Vec<RoundPoint>,
    /// Gate-Q1 reports that gained their intervals (written before intervals existed).
    pub gate_q1_updated: Vec<PathBuf>,
}

/// Rewrite a session's summaries from its artifacts (the rounds table with intervals, the progress map,
/// gate-q2.md, lineage.json), and give each healed round's gate-Q1 report its intervals when it was written
/// without them (recomputed from its saved sample pairs). Takes the session's lock, so it never races a run.
pub fn write_report(dir: &Path, floor: eval::CoherenceFloor) -> Result<ReportSummary> {
    let o = session::Session::open(dir)?;
    let layout = SessionDir::new(dir);
    let lin = &o.state.lineage;
    let mut gate_q1_updated = Vec::new();
    let rounds: std::collections::BTreeSet<u32> = o.state.rounds.keys().copied().collect();
    for round in rounds.into_iter().filter(|r| lin.is_done(*r, Stage::Heal)) {
        let run = layout.round(round).heal();
        let path = run.gate_q1_json();
        let mut g: hgate::GateQ1 = read_json(&path)?;
        if g.intervals.is_none() {
            g.intervals = hgate::q1_intervals_from_samples(&g);
            if g.intervals.is_some() {
                hgate::write(&run.gate_q1_md(), &g)?;
                atomic_write_json(&path, &g)?;
                gate_q1_updated.push(path);
            }
        }
    }
    let points = points(&layout, lin)?;
    write_summaries(&layout, &points, floor, lin)?;
    Ok(ReportSummary { points, gate_q1_updated })
}

/// Roll a session's student back to a kept round (0 = the base); later rounds stay on disk and in the log.
pub fn rollback(o: &mut session::Opened, to_round: u32) -> Result<()> {
    if !o.state.lineage.is_kept(to_round) {
        return Err(Error::invalid(format!(
            "round {to_round} was not kept; roll back to the base (0) or a kept round"
        )));
    }
    let l = o.session.append(SessionEvent::Rollback { to_round })?;
    session::state::apply(&mut o.state, &l.event);
    Ok(())
}

/// Start a branch of a session's lineage from a kept round.
pub fn fork(o: &mut session::Opened, from_round: u32, branch: &str) -> Result<()> {
    if !o.state.lineage.is_kept(from_round) {
        return Err(Error::invalid(format!(
            "round {from_round} was not kept; fork from the base (0) or a kept round"
        )));
    }
    let l = o.session.append(SessionEvent::Fork { from_round, branch: branch.into() })?;
    session::state::apply(&mut o.state, &l.event);
    Ok(())
}

fn points(layout: &SessionDir, lin: &Lineage) -> Result<Vec<RoundPoint>> {
    use eval::bootstrap::paired_difference;
    // A pair of evals of different items (a changed --eval-n) has no paired difference: the tables show "—".
    let paired = |a: &EvalReport, b: &EvalReport| paired_difference(&a.rows, &b.rows).unwrap_or_default();
    let mut points = Vec::new();
    let base = if lin.is_done(0, Stage::Eval) {
        let r = EvalReport::load(&layout.round(0).eval().abs)?;
        let mut p = RoundPoint::from_metrics(0, RoundStatus::Base, &r.metrics);
        p.kl_spent = Some(0.0);
        p.ci = r.intervals();
        points.push(p);
        Some(r)
    } else {
        None
    };
    // The model each round started from: the last kept round before it, else the base.
    let mut prev: Option<(String, EvalReport)> = base.as_ref().map(|b| ("base".to_string(), b.clone()));
    let mut spent = 0.0;
    for (round, (keep, _)) in &lin.verdicts {
        if !lin.is_done(*round, Stage::Eval) {
            continue;
        }
        let rd = layout.round(*round);
        let r = EvalReport::load(&rd.eval().abs)?;
        let rec: RoundRecord = read_json(&rd.record().abs)?;
        let kept = *keep && !lin.abandoned.contains(round);
        if kept {
            spent += rec.kl;
        }
        let mut p = RoundPoint::from_metrics(
            *round as usize,
            if kept { RoundStatus::Kept } else { RoundStatus::Dropped },
            &r.metrics,
        );
        p.kl_spent = Some(spent + if kept { 0.0 } else { rec.kl });
        p.cos_teacher_r0 = rec.cos_teacher_r0;
        p.cos_student_teacher = rec.cos_student_teacher;
        p.ci = r.intervals();
        if let Some(b) = &base {
            p.vs_base = paired(&r, b);
        }
        if let Some((label, pr)) = &prev {
            p.vs_prev = paired(&r, pr);
            p.prev = Some(label.clone());
        }
        if lin.is_done(*round, Stage::Controls) {
            p.controls = eval::plot::load_controls(&rd.controls().abs)?;
            let arms: Vec<EvalReport> = p
                .controls
                .iter()
                .map(|c| EvalReport::load(&rd.control_dir(c.arm.name())))
                .collect::<Result<_>>()?;
            let steered = p.controls.iter().position(|c| c.arm == ControlArm::Steered).map(|i| &arms[i]);
            for (c, arm) in p.controls.iter_mut().zip(&arms) {
                c.ci = arm.intervals();
                c.vs_round = paired(arm, &r);
                if let (Some(st), true) = (steered, c.arm != ControlArm::Steered) {
                    c.steered_minus = paired(st, arm);
                }
            }
        }
        points.push(p);
        if kept {
            prev = Some((format!("r{round}"), r));
        }
    }
    Ok(points)
}

/// The rounds table (computed from the round artifacts the log names) and the lineage folded from the log.
pub fn read_status(dir: &Path) -> Result<(Vec<RoundPoint>, Lineage)> {
    let layout = SessionDir::new(dir);
    let contents = session::event::read_log(&layout.events())?;
    let lineage = Lineage::fold(contents.events.iter().map(|l| &l.event));
    Ok((points(&layout, &lineage)?, lineage))
}

/// `lineage.json`: the lineage in a form a reader can use without the event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineageFile {
    /// Current branch.
    pub branch: String,
    /// Kept rounds the student carries.
    pub chain: Vec<u32>,
    /// Rounds left behind by rollbacks and forks.
    pub abandoned: Vec<u32>,
    /// Every judged round: (round, kept, note).
    pub rounds: Vec<(u32, bool, Option<String>)>,
}

impl From<&Lineage> for LineageFile {
    fn from(l: &Lineage) -> Self {
        LineageFile {
            branch: l.branch.clone(),
            chain: l.chain.clone(),
            abandoned: l.abandoned.iter().copied().collect(),
            rounds: l.verdicts.iter().map(|(r, (k, n))| (*r, *k, n.clone())).collect(),
        }
    }
}
