//! The rounds loop (gate Q2): per round, re-extract the persona vector from the current student (base + kept
//! rounds' adapters), dose it by iso-KL, generate with the walk-down controller, score, pass gate Q0
//! (automatic verdicts headless; from the TUI, the researcher's accepts when they decided the round), heal, bake
//! the history, evaluate; then keep or drop the round and redraw the progress map and `gate-q2.md`. Every stage writes its artifact atomically under `round-NN/` and appends a
//! `stage_done` event; a resumed run skips stages whose event exists. Stage work is the other modules' library
//! functions; this module only sequences them and records lineage.
//!
//! - `lineage`: the fold of `stage_done` / `round_gate` / `rollback` / `fork` events.

pub mod lineage;

use crate::error::{Error, Result};
use crate::eval::{
    self, ControlArm, ControlPoint, EvalConfig, EvalModel, EvalReport, GateQ2Spec, RoundPoint, RoundStatus,
};
use crate::fsutil::{atomic_write, atomic_write_json};
use crate::heal::{self, gate as hgate, HealConfig, HealStatus, HistoryEntry, RunOptions};
use crate::model::generate::Sampling;
use crate::model::{Hooks, LoadedModel};
use crate::progress::Progress;
use crate::score::{self, FilterThresholds, ScoredCompletion, Verdict};
use crate::session::{self, DecisionKind, Session, SessionEvent, SessionManifest};
use crate::steer::{self, Completion, DoseConfig, Persona, SolverConfig, Statistic, SteerVector, Steering};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use lineage::Lineage;

/// The stages of a round, in order (`controls` only when `RoundsConfig::controls` is set).
pub const STAGES: [&str; 9] =
    ["extract", "dose", "generate", "score", "gate_q0", "heal", "bake", "eval", "controls"];

/// Everything a run of rounds needs; the defaults are small enough for a CPU demo.
#[derive(Debug, Clone)]
pub struct RoundsConfig {
    /// Base model (directory or .gguf).
    pub model: PathBuf,
    /// Persona file (None: the built-in authority persona).
    pub persona: Option<PathBuf>,
    /// Rounds to run (not counting the base evaluation).
    pub rounds: u32,
    /// Stop when p_ans_any falls under this.
    pub floor: f64,
    /// Extraction contexts used (None: all).
    pub extract_pairs: Option<usize>,
    /// Iso-KL target of the p95 per-token KL, nats.
    pub dose_target: f64,
    /// Greedy rollout length of the dose measurement.
    pub dose_tokens: usize,
    /// Calibration prompts used.
    pub dose_prompts: usize,
    /// Steering prompts used for generation.
    pub n_prompts: usize,
    /// New tokens per steered completion.
    pub max_new_tokens: usize,
    /// Multiples of c* to generate at.
    pub alphas: Vec<f64>,
    /// The walk-down controller.
    pub walk: steer::WalkDownConfig,
    /// Walk-down coherence filter: highest tail perplexity.
    pub walk_max_ppl: f64,
    /// Gate-Q0 automatic filter.
    pub thresholds: FilterThresholds,
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
    /// Base seed.
    pub seed: u64,
    /// Test and crash-simulation hook: stop right after this stage of this round.
    pub stop_after: Option<(u32, String)>,
    /// Gate Q0 by the researcher, from the TUI: the gate-Q0 screen's round. When the log holds researcher
    /// decisions on it made since the loop last passed a gate Q0, the round in progress heals on the completions
    /// they accepted instead of the automatic verdicts (each set of decisions is used once). `None` headless.
    pub human_gate: Option<u32>,
}

/// The marker a researcher-gated round writes beside `accepted.jsonl`.
pub const HUMAN_GATE_FILE: &str = "gate-q0-human.json";

/// The note on the decisions the loop records for its automatic gate Q0 (they are not the researcher's).
pub const AUTOMATIC_NOTE: &str = "automatic (headless)";

impl RoundsConfig {
    /// Small defaults for `model`.
    pub fn small(model: &Path) -> Self {
        RoundsConfig {
            model: model.to_path_buf(),
            persona: None,
            rounds: 1,
            floor: 0.95,
            extract_pairs: Some(16),
            dose_target: 1.0,
            dose_tokens: 12,
            dose_prompts: 4,
            n_prompts: 4,
            max_new_tokens: 48,
            alphas: vec![1.0],
            walk: steer::WalkDownConfig {
                probe_n: 4,
                batch_n: 4,
                min_keep: 4,
                max_keep: 8,
                max_batches: 1,
                ..steer::WalkDownConfig::default()
            },
            walk_max_ppl: 50.0,
            thresholds: FilterThresholds::default(),
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
            seed: 42,
            stop_after: None,
            human_gate: None,
        }
    }
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
    /// cos(v_r, v_0) over the concatenated layers.
    pub cos_teacher_r0: Option<f64>,
    /// cos(student − base mean hidden state on the extraction contexts, v_r).
    pub cos_student_teacher: Option<f64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Rounds with a gate-Q2 verdict.
    pub rounds_done: u32,
    /// Why the loop stopped.
    pub stopped: String,
    /// The progress-map points (base first).
    pub points: Vec<RoundPoint>,
}

fn rel(round: u32, name: &str) -> String {
    format!("{}/{name}", session::round_dir(round))
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

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).map_err(|e| Error::bad_file(path, e))?;
        buf.push(b'\n');
    }
    atomic_write(path, &buf)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
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
    lm: &mut LoadedModel,
    persona: &Persona,
    layers: &[usize],
    n: Option<usize>,
) -> Result<BTreeMap<usize, Tensor>> {
    let contexts: Vec<&String> = persona.spec.contexts.iter().take(n.unwrap_or(usize::MAX)).collect();
    let texts: Vec<String> = contexts
        .iter()
        .map(|c| lm.chat.prompt(Some(&persona.spec.neutral_system), c))
        .collect::<Result<_>>()?;
    let student = steer::extract::mean_last_token_residuals(lm, &texts, layers, 8)?;
    let saved = heal::adapter::zero_all_gates(&mut lm.model);
    let base = steer::extract::mean_last_token_residuals(lm, &texts, layers, 8);
    heal::adapter::restore_gates(&mut lm.model, &saved);
    let base = base?;
    student
        .into_iter()
        .map(|(l, s)| Ok((l, (s - base.get(&l).ok_or_else(|| Error::invalid("capture bookkeeping"))?)?)))
        .collect()
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

/// A receiver of heal optimiser steps with their round.
pub type HealStepSink<'s> = dyn FnMut(u32, &heal::StepRecord) + 's;

/// One run of the loop over a session folder (created when absent).
pub struct Runner<'a> {
    session: Held<'a>,
    events: Vec<SessionEvent>,
    cfg: RoundsConfig,
    persona: Persona,
    progress: &'a mut dyn Progress,
    log: &'a mut dyn FnMut(&str),
    /// Sees every heal optimiser step with its round (the TUI charts them live).
    heal_steps: Option<&'a mut HealStepSink<'a>>,
}

/// Whether the run goes on after a stage.
enum Flow {
    Go,
    Stop(String),
}

impl<'a> Runner<'a> {
    /// Open (or create) the session in `dir` for `cfg`.
    pub fn open(
        dir: &Path,
        cfg: RoundsConfig,
        progress: &'a mut dyn Progress,
        log: &'a mut dyn FnMut(&str),
    ) -> Result<Self> {
        let persona = Persona::load_or_default(cfg.persona.as_deref())?;
        let name =
            dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "session".into());
        let opened = Session::open_or_create(dir, || Ok(SessionManifest::new(&name, &cfg.model)))?;
        for w in &opened.warnings {
            log(&format!("warning: {w}"));
        }
        let events = opened.events.into_iter().map(|l| l.event).collect();
        Ok(Runner {
            session: Held::Owned(Box::new(opened.session)),
            events,
            cfg,
            persona,
            progress,
            log,
            heal_steps: None,
        })
    }

    /// Run on a session the caller already has open and keeps writing to (its log is re-read from disk for the
    /// lineage); the runner takes the lock only for each read or append.
    pub fn with_session(
        session: &'a Mutex<Session>,
        cfg: RoundsConfig,
        progress: &'a mut dyn Progress,
        log: &'a mut dyn FnMut(&str),
    ) -> Result<Self> {
        let persona = Persona::load_or_default(cfg.persona.as_deref())?;
        let held = Held::Shared(session);
        let contents = held.with(|s| crate::session::event::read_log(&s.dir().join(session::EVENTS)))?;
        let events = contents.events.into_iter().map(|l| l.event).collect();
        Ok(Runner { session: held, events, cfg, persona, progress, log, heal_steps: None })
    }

    /// Pass every heal optimiser step (with its round) to `sink`, e.g. to stream it to a UI.
    pub fn on_heal_step(mut self, sink: &'a mut HealStepSink<'a>) -> Self {
        self.heal_steps = Some(sink);
        self
    }

    /// The lineage as the log tells it now.
    pub fn lineage(&self) -> Lineage {
        Lineage::fold(&self.events)
    }

    fn path(&self, rel: &str) -> Result<PathBuf> {
        self.session.with(|s| s.artifact_path(rel))
    }

    fn append(&mut self, e: SessionEvent) -> Result<()> {
        self.session.with_mut(|s| s.append(e.clone()))?;
        self.events.push(e);
        Ok(())
    }

    /// Record a stage as done; returns `Stop` when the crash-simulation hook names it or the user cancelled.
    fn done(&mut self, round: u32, stage: &str, file: String) -> Result<Flow> {
        self.append(SessionEvent::StageDone { round, stage: stage.into(), file })?;
        (self.log)(&format!("round {round}: {stage} done"));
        if self.cfg.stop_after.as_ref().is_some_and(|(r, s)| *r == round && s == stage) {
            return Ok(Flow::Stop(format!("stopped after round {round} {stage}")));
        }
        if self.progress.is_cancelled() {
            return Ok(Flow::Stop("cancelled".into()));
        }
        Ok(Flow::Go)
    }

    /// Adapter directory of a round's heal run.
    fn adapter_dir(&self, round: u32) -> Result<PathBuf> {
        Ok(heal::train::RunPaths::new(&self.path(&rel(round, "heal"))?).adapter())
    }

    fn history(&self, chain: &[u32]) -> Result<Vec<HistoryEntry>> {
        chain.iter().map(|r| Ok(HistoryEntry { dir: self.adapter_dir(*r)?, gate: 1.0 })).collect()
    }

    fn load_student(&self, history: &[HistoryEntry]) -> Result<LoadedModel> {
        heal::load_with_history(&self.cfg.model, None, &Device::Cpu, history)
    }

    fn eval_model(&mut self, lm: &LoadedModel, round: u32) -> Result<Flow> {
        let dir = self.path(&rel(round, "eval"))?;
        let hooks = Hooks::none();
        let report = eval::run_eval(&EvalModel::from_loaded(lm, &hooks), &self.cfg.eval, self.progress)?;
        let file = report.save(&dir)?;
        let m = &report.metrics;
        (self.log)(&format!(
            "round {round}: authority {:.4} care {:.4} p_ans_any {:.4} ppx_json {:.3} json_is_valid {}",
            m.authority,
            m.care,
            m.p_ans_any,
            m.ppx_json,
            m.json_is_valid.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
        ));
        let dir = self.session.with(|s| Ok(s.dir().to_path_buf()))?;
        let rel_file = file.strip_prefix(&dir).unwrap_or(&file).display().to_string();
        self.done(round, "eval", rel_file)
    }

    /// Run until the configured count, the coherence floor, the hook or a cancel stops it.
    pub fn run(mut self) -> Result<RunSummary> {
        let stopped = match self.run_inner() {
            Err(Error::Cancelled) => {
                "cancelled; run again to resume from the last finished stage".to_string()
            }
            other => other?,
        };
        let points = self.points()?;
        self.write_q2(&points)?;
        let rounds_done = self.lineage().verdicts.len() as u32;
        Ok(RunSummary { rounds_done, stopped, points })
    }

    fn run_inner(&mut self) -> Result<String> {
        if !self.lineage().is_done(0, "eval") {
            let lm = self.load_student(&[])?;
            self.append(SessionEvent::ModelLoaded {
                model: lm.info.id.clone(),
                weights_hash: lm.info.weights_hash.clone(),
            })?;
            if let Flow::Stop(why) = self.eval_model(&lm, 0)? {
                return Ok(why);
            }
        }
        loop {
            let lin = self.lineage();
            let judged = lin.verdicts.len() as u32;
            // The round in progress is the highest one without a gate-Q2 verdict, else a new one.
            let round = match (1..=lin.last_round()).find(|r| !lin.verdicts.contains_key(r)) {
                Some(r) => r,
                None => lin.last_round() + 1,
            };
            if judged >= self.cfg.rounds {
                return Ok(format!("reached {} rounds", self.cfg.rounds));
            }
            match self.round(round)? {
                Flow::Go => {}
                Flow::Stop(why) => return Ok(why),
            }
            let lin = self.lineage();
            if let Some((false, Some(note))) = lin.verdicts.get(&round) {
                if note.contains("floor") {
                    return Ok(format!("round {round}: {note}"));
                }
            }
        }
    }

    /// One round, skipping finished stages.
    fn round(&mut self, round: u32) -> Result<Flow> {
        let lin = self.lineage();
        let history = self.history(&lin.chain)?;
        let dir = self.path(&session::round_dir(round))?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::bad_file(&dir, e))?;
        // No `round_started` here: that event moves the TUI's gate-Q0 screen to a round; the loop's rounds are
        // tracked by their `stage_done` events instead.
        let mut lm = self.load_student(&history)?;
        let vector_path = self.path(&rel(round, "vector.safetensors"))?;
        macro_rules! step {
            ($e:expr) => {
                if let Flow::Stop(w) = $e? {
                    return Ok(Flow::Stop(w));
                }
            };
        }
        // extract: from the current student.
        if !self.lineage().is_done(round, "extract") {
            let mut ecfg = steer::ExtractConfig::for_model(&lm);
            ecfg.n_pairs = self.cfg.extract_pairs;
            let v = steer::extract_mean_diff(&lm, &self.persona, &ecfg, self.progress)?;
            v.save(&vector_path)?;
            step!(self.done(round, "extract", rel(round, "vector.safetensors")));
        }
        // dose: iso-KL calibration stored in the vector file.
        if !self.lineage().is_done(round, "dose") {
            let mut v = SteerVector::load(&vector_path)?;
            let steering = Steering::new(&v, &lm.model)?;
            let mut prompts = self.persona.spec.calibration_prompts.clone();
            prompts.truncate(self.cfg.dose_prompts.max(1));
            let dcfg = DoseConfig {
                solver: SolverConfig { target: self.cfg.dose_target, ..SolverConfig::default() },
                statistic: Statistic::P95,
                tokens: self.cfg.dose_tokens,
                prompts,
                system: self.persona.spec.neutral_system.clone(),
            };
            let mut report = steer::calibrate(&lm, &steering, &dcfg, self.progress)?;
            report.vector = Some(vector_path.display().to_string());
            atomic_write_json(&self.path(&rel(round, "dose.json"))?, &report)?;
            v.meta.calibration = Some(report.calibration());
            v.save(&vector_path)?;
            (self.log)(&format!("round {round}: c* {:.4} (p95 KL {:.4})", report.c_star, report.achieved));
            step!(self.done(round, "dose", rel(round, "dose.json")));
        }
        let v = SteerVector::load(&vector_path)?;
        // generate: the walk-down controller.
        if !self.lineage().is_done(round, "generate") {
            let steering = Steering::new(&v, &lm.model)?;
            let c_star = v.calibrated()?;
            let mut gen = steer::GenConfig::new(self.cfg.max_new_tokens);
            gen.sampling.seed = self.cfg.seed + round as u64;
            let prompts: Vec<String> =
                self.persona.spec.prompts.iter().take(self.cfg.n_prompts.max(1)).cloned().collect();
            let mut scorer = steer::CoherenceScorer {
                max_ppl: self.cfg.walk_max_ppl,
                ..steer::CoherenceScorer::default()
            };
            let r = steer::walk_down(
                &lm,
                &steering,
                &self.persona.spec.neutral_system,
                c_star,
                &prompts,
                &self.cfg.alphas,
                self.cfg.seed + 1000 * round as u64,
                &gen,
                &self.cfg.walk,
                &mut scorer,
                self.progress,
            )?;
            let mut all = r.kept.clone();
            all.extend(r.rejected.iter().cloned());
            write_jsonl(&self.path(&rel(round, "completions.jsonl"))?, &all)?;
            atomic_write_json(&self.path(&rel(round, "walkdown.json"))?, &r.report)?;
            step!(self.done(round, "generate", rel(round, "completions.jsonl")));
        }
        // score: the gate-Q0 filter scores, with persona strength from the teacher-forced base pass.
        if !self.lineage().is_done(round, "score") {
            let comps: Vec<Completion> = read_jsonl(&self.path(&rel(round, "completions.jsonl"))?)?;
            let det = self.session.with(|s| s.detectors())?;
            let mut rows = Vec::with_capacity(comps.len());
            for c in comps {
                let tf = score::perplexity::teacher_force(
                    &lm,
                    &c.system,
                    &c.prompt,
                    &c.tokens,
                    Some(&v.directions),
                )?;
                let card = score::score_completion(&c, &det, &self.cfg.thresholds, tf.persona_strength);
                rows.push(ScoredCompletion { completion: c, score: card });
            }
            atomic_write(&self.path(&rel(round, "scored.jsonl"))?, &session::to_jsonl(&rows)?)?;
            step!(self.done(round, "score", rel(round, "scored.jsonl")));
        }
        // gate Q0: the researcher's decisions when the TUI runs the loop and they decided this round; else the
        // automatic verdict is the decision.
        if !self.lineage().is_done(round, "gate_q0") {
            step!(self.gate_q0(round, &lm));
        }
        // heal: train this round's LoRA on the accepted completions; measure before/after for gate-q1.md.
        let heal_dir = self.path(&rel(round, "heal"))?;
        if !self.lineage().is_done(round, "heal") {
            let accepted: Vec<Completion> = read_jsonl(&self.path(&rel(round, "accepted.jsonl"))?)?;
            step!(self.heal(round, &mut lm, &accepted, &heal_dir, history.clone()));
        } else {
            heal::attach_history(
                &mut lm.model,
                &[HistoryEntry { dir: self.adapter_dir(round)?, gate: 1.0 }],
            )?;
        }
        // bake: the student's history with this round on top (re-applied, not merged, so gates stay editable).
        if !self.lineage().is_done(round, "bake") {
            let mut h = history.clone();
            h.push(HistoryEntry { dir: self.adapter_dir(round)?, gate: 1.0 });
            atomic_write_json(&self.path(&rel(round, "history.json"))?, &h)?;
            let dose: steer::DoseReport = read_json(&self.path(&rel(round, "dose.json"))?)?;
            let v0 = if round == 1 {
                None
            } else {
                SteerVector::load(&self.path(&rel(1, "vector.safetensors"))?).ok()
            };
            let cos_teacher_r0 = match &v0 {
                Some(v0) => vector_cosine(&v.directions, &v0.directions)?,
                None => Some(1.0),
            };
            let layers: Vec<usize> = v.directions.keys().copied().collect();
            let shift = student_shift(&mut lm, &self.persona, &layers, self.cfg.extract_pairs)?;
            let lin = self.lineage();
            let record = RoundRecord {
                round,
                branch: lin.branch.clone(),
                parent: lin.parent,
                model_hash: lm.info.weights_hash.clone(),
                history: h,
                vector_sha256: sha256_file(&vector_path)?,
                persona_sha256: self.persona.sha256.clone(),
                c_star: dose.c_star,
                kl: dose.achieved,
                cos_teacher_r0,
                cos_student_teacher: vector_cosine(&shift, &v.directions)?,
            };
            atomic_write_json(&self.path(&rel(round, "round.json"))?, &record)?;
            step!(self.done(round, "bake", rel(round, "history.json")));
        }
        if !self.lineage().is_done(round, "eval") {
            step!(self.eval_model(&lm, round));
        }
        if self.cfg.controls && !self.lineage().is_done(round, "controls") {
            step!(self.controls(round, &lm, &v));
        }
        // gate Q2, headless: keep unless coherence fell under the floor.
        let report = EvalReport::load(&self.path(&rel(round, "eval/eval.json"))?)?;
        let p = report.metrics.p_ans_any;
        let (keep, note) = if p >= self.cfg.floor {
            (true, format!("p_ans_any {p:.4} ≥ floor {}", self.cfg.floor))
        } else {
            (false, format!("p_ans_any {p:.4} under the floor {}", self.cfg.floor))
        };
        self.append(SessionEvent::RoundGate { round, gate: "q2".into(), keep, note: Some(note) })?;
        let points = self.points()?;
        self.write_q2(&points)?;
        Ok(Flow::Go)
    }

    /// The control arms on the same eval items: the student steered by the real vector at c*, by a random
    /// direction with the same per-layer norms at the same c*, and prompted with the positive persona instead of
    /// steered (`round-NN/controls.json`).
    fn controls(&mut self, round: u32, lm: &LoadedModel, v: &SteerVector) -> Result<Flow> {
        let c_star = v.calibrated()? as f32;
        let random = steer::random_like(v, self.cfg.seed + round as u64)?;
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
            report.save(&self.path(&rel(round, &format!("controls/{}", arm.name())))?)?;
            let m = &report.metrics;
            (self.log)(&format!(
                "round {round}: control {}: authority {:.4} care {:.4} p_ans_any {:.4}",
                arm.name(),
                m.authority,
                m.care,
                m.p_ans_any
            ));
            arms.push(ControlPoint::from_metrics(arm, c_star as f64, m));
        }
        atomic_write_json(&self.path(&rel(round, "controls.json"))?, &arms)?;
        self.done(round, "controls", rel(round, "controls.json"))
    }

    /// With `human_gate` naming the gate-Q0 screen's round and researcher decisions on it logged after the
    /// loop's last gate-Q0 stage: that round, the completions they accept (current decision, after undos and
    /// replays) and how many they decided.
    fn human_accepted(&self) -> Result<Option<(u32, Vec<Completion>, usize)>> {
        let Some(source) = self.cfg.human_gate else { return Ok(None) };
        let is_human = |e: &SessionEvent| {
            matches!(e, SessionEvent::Decision { round, note, .. }
                if *round == source && note.as_deref() != Some(AUTOMATIC_NOTE))
        };
        let last_gate = self
            .events
            .iter()
            .rposition(|e| matches!(e, SessionEvent::StageDone { stage, .. } if stage == "gate_q0"));
        let last_human = self.events.iter().rposition(is_human);
        match (last_human, last_gate) {
            (None, _) => return Ok(None),
            (Some(h), Some(g)) if h < g => return Ok(None),
            _ => {}
        }
        let state = session::fold(&self.events);
        let Some(rs) = state.rounds.get(&source) else { return Ok(None) };
        let decided: BTreeMap<&str, bool> = rs
            .decisions()
            .into_iter()
            .filter(|(_, d)| d.note.as_deref() != Some(AUTOMATIC_NOTE))
            .map(|(id, d)| (id, d.keep))
            .collect();
        if decided.is_empty() {
            return Ok(None);
        }
        let rows = self.session.with(|s| s.load_round(rs))?;
        let accepted: Vec<Completion> = rows
            .into_iter()
            .filter(|r| decided.get(r.completion.id.as_str()) == Some(&true))
            .map(|r| r.completion)
            .collect();
        Ok(Some((source, accepted, decided.len())))
    }

    /// Gate Q0 by the researcher's decisions on gate-Q0 round `source`: write `decisions.jsonl`,
    /// `accepted.jsonl` and `gate-q0-human.json` (which marks the round as researcher-gated); the loop's own
    /// completions of the round are not used.
    fn human_gate_q0(
        &mut self,
        round: u32,
        source: u32,
        accepted: Vec<Completion>,
        decided: usize,
    ) -> Result<Flow> {
        let state = session::fold(&self.events);
        let decisions: Vec<serde_json::Value> = state
            .rounds
            .get(&source)
            .map(|rs| {
                rs.decisions()
                    .into_iter()
                    .filter(|(_, d)| d.note.as_deref() != Some(AUTOMATIC_NOTE))
                    .map(|(id, d)| serde_json::json!({"id": id, "keep": d.keep, "tags": d.tags, "note": d.note}))
                    .collect()
            })
            .unwrap_or_default();
        write_jsonl(&self.path(&rel(round, "decisions.jsonl"))?, &decisions)?;
        write_jsonl(&self.path(&rel(round, "accepted.jsonl"))?, &accepted)?;
        (self.log)(&format!(
            "round {round}: gate Q0 by the researcher (gate-Q0 round {source}): {} accepted of {decided} decided",
            accepted.len()
        ));
        if accepted.is_empty() {
            return Err(Error::invalid(format!(
                "round {round}: the researcher accepted none of the {decided} decided completions of gate-Q0 round \
                 {source}; accept some on the gate-Q0 screen"
            )));
        }
        let file = rel(round, HUMAN_GATE_FILE);
        atomic_write_json(
            &self.path(&file)?,
            &serde_json::json!({"from_round": source, "decided": decided, "accepted": accepted.len()}),
        )?;
        self.done(round, "gate_q0", file)
    }

    fn gate_q0(&mut self, round: u32, lm: &LoadedModel) -> Result<Flow> {
        if let Some((source, accepted, decided)) = self.human_accepted()? {
            return self.human_gate_q0(round, source, accepted, decided);
        }
        let rows: Vec<ScoredCompletion> = read_jsonl(&self.path(&rel(round, "scored.jsonl"))?)?;
        let mut accepted = Vec::new();
        let mut decisions = Vec::new();
        for r in &rows {
            let keep = r.score.verdict == Verdict::Keep;
            let reasons: Vec<String> = r.score.reasons.iter().map(|x| x.describe()).collect();
            decisions.push(serde_json::json!({"id": r.completion.id, "keep": keep, "reasons": reasons}));
            self.append(SessionEvent::Decision {
                round,
                completion: r.completion.id.clone(),
                decision: if keep { DecisionKind::Accept } else { DecisionKind::Reject },
                tags: r.score.reasons.iter().map(|x| x.kind().label().to_string()).collect(),
                note: Some(AUTOMATIC_NOTE.into()),
            })?;
            if keep {
                accepted.push(r.completion.clone());
            }
        }
        write_jsonl(&self.path(&rel(round, "decisions.jsonl"))?, &decisions)?;
        write_jsonl(&self.path(&rel(round, "accepted.jsonl"))?, &accepted)?;
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
        let session_name = self.session.with(|s| Ok(s.manifest().name.clone()))?;
        let md = score::gate::render_gate_q0(&score::gate::GateInputs {
            round,
            session: &session_name,
            model: &lm.info.id,
            written_at: &now,
            passed: !accepted.is_empty(),
            thresholds: &self.cfg.thresholds,
            items,
            reshow: vec![],
        });
        let file = session::gate_q0_file(round);
        atomic_write(&self.path(&file)?, md.as_bytes())?;
        self.append(SessionEvent::GateWritten {
            round,
            gate: "q0".into(),
            file: file.clone(),
            passed: !accepted.is_empty(),
        })?;
        if accepted.is_empty() {
            return Err(Error::invalid(format!(
                "round {round}: the automatic filter kept none of {} completions (see {file}); loosen the thresholds or \
                 lower the dose target",
                rows.len()
            )));
        }
        self.done(round, "gate_q0", file)
    }

    fn heal(
        &mut self,
        round: u32,
        lm: &mut LoadedModel,
        accepted: &[Completion],
        out: &Path,
        history: Vec<HistoryEntry>,
    ) -> Result<Flow> {
        let cfg = HealConfig { round: round as usize, ..self.cfg.heal.clone() };
        let data =
            heal::build_examples(accepted, &lm.tokenizer, &lm.chat, lm.model.cfg.vocab_size, cfg.max_len)?;
        for (id, why) in &data.skipped {
            (self.log)(&format!("round {round}: heal skips completion `{id}`: {why}"));
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
            .skip(self.cfg.n_prompts)
            .chain(self.persona.spec.prompts.iter())
            .take(self.cfg.measure_n.max(1))
            .cloned()
            .collect();
        let spec = hgate::MeasureSpec {
            prompts: held_out,
            neutral_system: self.persona.spec.neutral_system.clone(),
            persona_system: Some(self.persona.spec.positive.clone()),
            sampling: Sampling::default_sampling(self.cfg.measure_tokens, 1234),
        };
        let gate_by =
            if self.path(&rel(round, HUMAN_GATE_FILE))?.exists() { "researcher's" } else { "automatic" };
        let before = hgate::measure(lm, &spec, self.progress)?;
        let opts = RunOptions { fresh: false, stop_after_steps: None, final_gate: None, history };
        let sink = &mut self.heal_steps;
        let mut on_step = |r: &heal::StepRecord| {
            if let Some(f) = sink.as_mut() {
                f(round, r)
            }
        };
        let log = heal::heal(&mut lm.model, &lm.info, &data, &cfg, out, &opts, self.progress, &mut on_step)?;
        match log.status {
            HealStatus::Completed => {}
            HealStatus::Cancelled | HealStatus::Stopped => return Ok(Flow::Stop(log.message)),
            HealStatus::Diverged => return Err(Error::invalid(format!("round {round}: {}", log.message))),
        }
        let after = hgate::measure(lm, &spec, self.progress)?;
        let (source, coherence_label, trait_label) = hgate::fallback_labels(true);
        let mut samples = Vec::new();
        for (i, b) in before.samples.iter().enumerate() {
            let teacher = accepted.iter().find(|c| c.prompt == b.prompt);
            let a = after.samples.get(i);
            let teacher_heat = match teacher {
                Some(c) => hgate::teacher_heat(lm, &spec, c)?,
                None => None,
            };
            samples.push(hgate::SamplePair {
                prompt: b.prompt.clone(),
                teacher: teacher.map(|c| c.text.clone()),
                before: b.text.clone(),
                after: a.map(|s| s.text.clone()).unwrap_or_default(),
                teacher_heat,
                before_heat: b.heat.clone(),
                after_heat: a.and_then(|s| s.heat.clone()),
            });
        }
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
        };
        hgate::write(&out.join("gate-q1.md"), &report)?;
        atomic_write_json(&out.join("gate-q1.json"), &report)?;
        self.append(SessionEvent::GateWritten {
            round,
            gate: "q1".into(),
            file: rel(round, "heal/gate-q1.md"),
            passed: true,
        })?;
        self.done(round, "heal", rel(round, "heal"))
    }

    /// Progress-map points: the base, then every judged round (kept or dropped), with cumulative KL over the
    /// active chain.
    pub fn points(&self) -> Result<Vec<RoundPoint>> {
        let lin = self.lineage();
        let mut points = Vec::new();
        if lin.is_done(0, "eval") {
            let r = EvalReport::load(&self.path(&rel(0, "eval/eval.json"))?)?;
            let mut p = RoundPoint::from_metrics(0, RoundStatus::Base, &r.metrics);
            p.kl_spent = Some(0.0);
            points.push(p);
        }
        let mut spent = 0.0;
        for (round, (keep, _)) in &lin.verdicts {
            let r = EvalReport::load(&self.path(&rel(*round, "eval/eval.json"))?)?;
            let rec: RoundRecord = read_json(&self.path(&rel(*round, "round.json"))?)?;
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
            if lin.is_done(*round, "controls") {
                p.controls = eval::plot::load_controls(&self.path(&rel(*round, "controls.json"))?)?;
            }
            points.push(p);
        }
        Ok(points)
    }

    fn write_q2(&mut self, points: &[RoundPoint]) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let dir = self.session.with(|s| Ok(s.dir().to_path_buf()))?;
        atomic_write_json(&dir.join("rounds.json"), &points)?;
        eval::write_progress_map(points, self.cfg.floor, &dir)?;
        let spec = GateQ2Spec { floor: self.cfg.floor, ..GateQ2Spec::default() };
        eval::write_gate_q2(&dir, points, &spec)?;
        atomic_write_json(&dir.join("lineage.json"), &LineageFile::from(&self.lineage()))?;
        Ok(())
    }

    /// Roll the student back to a kept round (0 = the base); later rounds stay on disk and in the log.
    pub fn rollback(&mut self, to_round: u32) -> Result<()> {
        if !self.lineage().is_kept(to_round) {
            return Err(Error::invalid(format!(
                "round {to_round} was not kept; roll back to the base (0) or a kept round"
            )));
        }
        self.append(SessionEvent::Rollback { to_round })
    }

    /// Start a branch from a kept round.
    pub fn fork(&mut self, from_round: u32, branch: &str) -> Result<()> {
        if !self.lineage().is_kept(from_round) {
            return Err(Error::invalid(format!(
                "round {from_round} was not kept; fork from the base (0) or a kept round"
            )));
        }
        self.append(SessionEvent::Fork { from_round, branch: branch.into() })
    }
}

/// The rounds table (`rounds.json`, empty before the first round) and the lineage folded from the event log.
pub fn read_status(dir: &Path) -> Result<(Vec<RoundPoint>, Lineage)> {
    let contents = crate::session::event::read_log(&dir.join(session::EVENTS))?;
    let lineage = Lineage::fold(contents.events.iter().map(|l| &l.event));
    let rp = dir.join("rounds.json");
    let points = if rp.exists() { read_json(&rp)? } else { Vec::new() };
    Ok((points, lineage))
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
