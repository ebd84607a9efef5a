//! The background worker: owns the loaded model and the session writer, runs jobs off the UI thread and
//! reports `WorkerEvent`s (Started, Progress, Token…, then exactly one of Finished / Failed / Cancelled).
//!
//! Two lanes keep the UI responsive and the log ordered:
//! - the model lane runs one model job at a time on a blocking thread (load, generate, replay, rescore), FIFO,
//!   except interactive jobs (replay), which sit in a **latest-wins slot**: a newer request replaces a pending
//!   one and cancels a running one, and the slot is served before the FIFO queue. A running generation or
//!   rescore steps aside for a replay (it is stopped and re-queued at the front, reporting nothing until it
//!   runs again), so the researcher never waits for a whole prompt's batch;
//! - the record lane appends session events and artifacts in the order the UI sent them, never waiting for the
//!   model.
//!
//! `Cancel(id)` is a control message, not a job: it produces no events of its own; the target reports
//! `Cancelled`.

pub mod bridge;
pub mod vectors;

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::score::perplexity::teacher_force;
use crate::score::{score_completion, Detectors, FilterThresholds, ScoreCard, ScoredCompletion};
use crate::session::{self, Session, SessionEvent};
use crate::steer::Completion;
use candle_core::Tensor;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use bridge::{GenerateRequest, ReplayRequest};

/// Identifies a job; chosen by the sender (the UI counts up).
pub type JobId = u64;

/// A unit of work for the worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id, echoed in every event about it.
    pub id: JobId,
    /// What to do.
    pub kind: JobKind,
}

/// The kinds of work.
#[derive(Debug, Clone)]
pub enum JobKind {
    /// Load a model (directory or .gguf) and optionally a steering-vector file.
    LoadModel {
        /// Model path.
        path: PathBuf,
        /// Vector file, if any.
        vector: Option<PathBuf>,
    },
    /// Generate and score completions for one prompt, write them, record the event.
    Generate(Box<GenerateRequest>),
    /// Rewind and resample a completion (interactive: latest wins).
    Replay(Box<ReplayRequest>),
    /// Re-read the session's pattern files and score these completions again.
    Rescore {
        /// Round.
        round: u32,
        /// The completions.
        completions: Vec<Completion>,
    },
    /// Append an event to the session log.
    Record(SessionEvent),
    /// Write an artifact (temp + fsync + rename), then append its event.
    WriteArtifact {
        /// Path relative to the session folder.
        rel: String,
        /// File contents.
        contents: Vec<u8>,
        /// The event that references it.
        event: SessionEvent,
    },
    /// Run the rounds loop on the session up to `rounds` judged rounds (extract → … → eval per round), loading
    /// its own copy of the base model plus the kept rounds.
    RunRounds {
        /// Base model path.
        model: PathBuf,
        /// Judged rounds to reach.
        rounds: u32,
        /// Coherence floor of the automatic gate Q2 (the researcher can still roll back).
        floor: f64,
        /// The gate-Q0 screen's round: the researcher's new decisions on it are the round's gate Q0.
        human_round: Option<u32>,
    },
    /// Read the rounds table and lineage of the session.
    RoundsStatus,
    /// Read a round's gate-Q1 report (`round-NN/heal/gate-q1.json`).
    ReadGateQ1 {
        /// Round.
        round: u32,
    },
    /// Read a few eval items (think text, answer probabilities) of each round's eval
    /// (`round-NN/eval/eval.json`) for the iterate screen.
    ReadEvalSamples {
        /// Rounds (0 = the base).
        rounds: Vec<u32>,
    },
    /// Cancel a queued or running job.
    Cancel(JobId),
}

impl JobKind {
    /// A short label for status lines.
    pub fn label(&self) -> &'static str {
        match self {
            JobKind::LoadModel { .. } => "loading model",
            JobKind::Generate(_) => "generating",
            JobKind::Replay(_) => "replaying",
            JobKind::Rescore { .. } => "rescoring",
            JobKind::Record(_) => "recording",
            JobKind::WriteArtifact { .. } => "writing",
            JobKind::RunRounds { .. } => "running a round",
            JobKind::RoundsStatus => "reading rounds",
            JobKind::ReadGateQ1 { .. } => "reading gate Q1",
            JobKind::ReadEvalSamples { .. } => "reading eval samples",
            JobKind::Cancel(_) => "cancelling",
        }
    }
    /// Interactive jobs use the latest-wins slot.
    pub fn is_interactive(&self) -> bool {
        matches!(self, JobKind::Replay(_))
    }
    fn is_record(&self) -> bool {
        matches!(self, JobKind::Record(_) | JobKind::WriteArtifact { .. })
    }
}

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutput {
    /// A model is loaded.
    ModelLoaded {
        /// Model id.
        model: String,
        /// Its weights fingerprint.
        weights_hash: String,
        /// Number of layers.
        layers: usize,
        /// Hidden size.
        hidden: usize,
        /// Layers a steering vector was loaded for (empty: no steering).
        vector_layers: Vec<usize>,
    },
    /// Completions of one prompt, scored and recorded.
    Completions {
        /// Round.
        round: u32,
        /// Prompt index.
        prompt_index: usize,
        /// Artifact written.
        file: String,
        /// The completions with scores.
        rows: Vec<ScoredCompletion>,
    },
    /// A replay preview (not recorded until adopted).
    Replayed {
        /// Round.
        round: u32,
        /// Rewind token.
        at: usize,
        /// Replay dose.
        dose: f64,
        /// The replayed completion with scores.
        row: Box<ScoredCompletion>,
    },
    /// New scores, recorded.
    Rescored {
        /// Round.
        round: u32,
        /// Artifact written.
        file: String,
        /// Completion id → scores.
        scores: BTreeMap<String, ScoreCard>,
    },
    /// An event was appended (after its artifact, if any).
    Recorded {
        /// Its sequence number.
        seq: u64,
        /// The event.
        event: SessionEvent,
    },
    /// The rounds table (base first) and lineage, after a run or on request.
    Rounds {
        /// Progress-map points.
        points: Vec<crate::eval::RoundPoint>,
        /// Kept rounds the student carries.
        chain: Vec<u32>,
        /// Current branch.
        branch: String,
        /// How the last run ended (empty when only read).
        stopped: String,
    },
    /// A round's gate-Q1 report.
    GateQ1 {
        /// Round.
        round: u32,
        /// The report.
        report: Box<crate::heal::gate::GateQ1>,
        /// The heal run's step log (`heal/train/log.jsonl`; empty when absent), for the training curve.
        steps: Vec<crate::heal::StepRecord>,
    },
    /// A few eval items of each requested round.
    EvalSamples {
        /// Round → its samples (`eval::SAMPLES_PER_ROUND` at most).
        samples: BTreeMap<u32, Vec<crate::eval::EvalSample>>,
    },
}

/// Progress of a rounds run as worker events; cancelled with the job.
struct RoundsProgress<'a> {
    id: JobId,
    events: &'a mpsc::UnboundedSender<WorkerEvent>,
    cancel: &'a CancellationToken,
}

impl crate::progress::Progress for RoundsProgress<'_> {
    fn step(&mut self, done: u64, total: u64, msg: &str) {
        let _ = self.events.send(WorkerEvent::Progress { id: self.id, done, total, msg: msg.to_string() });
    }
    fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// What the worker tells the UI.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// A job began.
    Started {
        /// Job.
        id: JobId,
        /// What it does.
        label: &'static str,
    },
    /// A job advanced.
    Progress {
        /// Job.
        id: JobId,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
        /// What is happening.
        msg: String,
    },
    /// A token was sampled (streaming text).
    Token {
        /// Job.
        id: JobId,
        /// Batch row.
        row: usize,
        /// Its text piece.
        text: String,
    },
    /// One heal optimiser step of a rounds job (for the live training chart).
    HealStep {
        /// Job.
        id: JobId,
        /// Round being healed.
        round: u32,
        /// The step's metrics.
        record: Box<crate::heal::StepRecord>,
    },
    /// A job succeeded.
    Finished {
        /// Job.
        id: JobId,
        /// Its result.
        output: JobOutput,
    },
    /// A job failed.
    Failed {
        /// Job.
        id: JobId,
        /// One-line reason.
        error: String,
    },
    /// A job was cancelled (or superseded by a newer interactive request).
    Cancelled {
        /// Job.
        id: JobId,
    },
}

/// The loaded model and its steering vectors.
pub struct ModelState {
    /// Model, tokenizer, template.
    pub lm: LoadedModel,
    /// Steering vectors by layer (empty: unsteered).
    pub vectors: BTreeMap<usize, Tensor>,
}

/// What jobs share.
struct Ctx {
    model: Mutex<Option<ModelState>>,
    session: Mutex<Session>,
    detectors: Mutex<Detectors>,
    events: mpsc::UnboundedSender<WorkerEvent>,
}

/// The loop's settings for a round started from the TUI: the short demo settings, the session's persona file
/// and control-arm choice as recorded, and the researcher as gate Q0 of `human_round` (a round they decided on
/// heals on what they accepted).
pub fn tui_rounds_config(
    model: &std::path::Path,
    manifest: &session::SessionManifest,
    rounds: u32,
    floor: f64,
    human_round: Option<u32>,
) -> crate::rounds::RoundsConfig {
    let mut cfg = crate::rounds::RoundsConfig::small(model);
    cfg.rounds = rounds;
    cfg.floor = floor;
    cfg.human_gate = human_round;
    cfg.persona = manifest.persona_file.clone();
    cfg.controls = manifest.rounds.controls;
    cfg
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::invalid("worker state is unusable after an earlier crash"))
}

/// The UI's handle on the worker.
pub struct WorkerHandle {
    /// Send jobs here (bounded, capacity 16).
    pub jobs: mpsc::Sender<Job>,
    /// The worker task; it ends after `jobs` is dropped and the running job stops.
    pub join: tokio::task::JoinHandle<()>,
}

/// Start the worker on the current tokio runtime. It takes over the session writer.
pub fn spawn(session: Session, events: mpsc::UnboundedSender<WorkerEvent>) -> Result<WorkerHandle> {
    let detectors = session.detectors()?;
    let ctx = Arc::new(Ctx {
        model: Mutex::new(None),
        session: Mutex::new(session),
        detectors: Mutex::new(detectors),
        events,
    });
    let (tx, rx) = mpsc::channel(16);
    let join = tokio::spawn(run(rx, ctx));
    Ok(WorkerHandle { jobs: tx, join })
}

struct Running {
    id: JobId,
    interactive: bool,
    cancel: CancellationToken,
    /// Set when an interactive job pushes this one aside; it is then re-queued instead of cancelled.
    preempted: Arc<AtomicBool>,
    /// A copy to re-queue, for jobs that may be pushed aside (generation, rescoring).
    requeue: Option<Job>,
    handle: tokio::task::JoinHandle<bool>,
}

/// Wait for the running job; true when it stopped because it was pushed aside.
async fn wait(r: &mut Option<Running>) -> bool {
    match r {
        Some(r) => (&mut r.handle).await.unwrap_or(false),
        None => std::future::pending::<bool>().await,
    }
}

async fn run(mut rx: mpsc::Receiver<Job>, ctx: Arc<Ctx>) {
    // Record lane: one task appending in arrival order.
    let (rec_tx, mut rec_rx) = mpsc::unbounded_channel::<Job>();
    let rec_ctx = ctx.clone();
    let recorder = tokio::spawn(async move {
        while let Some(job) = rec_rx.recv().await {
            let c = rec_ctx.clone();
            let never = AtomicBool::new(false);
            let _ =
                tokio::task::spawn_blocking(move || execute(&c, job, CancellationToken::new(), &never)).await;
        }
    });
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut slot: Option<Job> = None;
    let mut running: Option<Running> = None;
    loop {
        if running.is_none() {
            if let Some(job) = slot.take().or_else(|| queue.pop_front()) {
                let cancel = CancellationToken::new();
                let c = ctx.clone();
                let (id, interactive) = (job.id, job.kind.is_interactive());
                let requeue =
                    matches!(job.kind, JobKind::Generate(_) | JobKind::Rescore { .. }).then(|| job.clone());
                let (token, preempted) = (cancel.clone(), Arc::new(AtomicBool::new(false)));
                let flag = preempted.clone();
                let handle = tokio::task::spawn_blocking(move || execute(&c, job, token, &flag));
                running = Some(Running { id, interactive, cancel, preempted, requeue, handle });
            }
        }
        tokio::select! {
            msg = rx.recv() => match msg {
                None => break,
                Some(job) => match job.kind {
                    JobKind::Cancel(target) => {
                        if let Some(r) = running.as_ref().filter(|r| r.id == target) {
                            r.cancel.cancel();
                        } else if let Some(pos) = queue.iter().position(|j| j.id == target) {
                            queue.remove(pos);
                            let _ = ctx.events.send(WorkerEvent::Cancelled { id: target });
                        } else if slot.as_ref().is_some_and(|j| j.id == target) {
                            slot = None;
                            let _ = ctx.events.send(WorkerEvent::Cancelled { id: target });
                        }
                    }
                    ref k if k.is_record() => {
                        let _ = rec_tx.send(job);
                    }
                    ref k if k.is_interactive() => {
                        // Latest wins: drop the pending request, stop the running one.
                        if let Some(old) = slot.replace(job) {
                            let _ = ctx.events.send(WorkerEvent::Cancelled { id: old.id });
                        }
                        match running.as_ref() {
                            Some(r) if r.interactive => r.cancel.cancel(),
                            // Generation steps aside for the researcher's replay and resumes after it.
                            Some(r) if r.requeue.is_some() => {
                                r.preempted.store(true, Ordering::SeqCst);
                                r.cancel.cancel();
                            }
                            _ => {}
                        }
                    }
                    _ => queue.push_back(job),
                },
            },
            pushed_aside = wait(&mut running) => {
                if let Some(job) = running.take().and_then(|r| r.requeue).filter(|_| pushed_aside) {
                    queue.push_front(job);
                }
            }
        }
    }
    // Shutdown: nothing new starts; the running job is asked to stop and awaited so its writes complete.
    for j in queue.drain(..).chain(slot.take()) {
        let _ = ctx.events.send(WorkerEvent::Cancelled { id: j.id });
    }
    if let Some(r) = running.take() {
        r.cancel.cancel();
        let _ = r.handle.await;
    }
    drop(rec_tx);
    let _ = recorder.await;
}

/// Run one job to its single terminal event. A job stopped because it was pushed aside sends none and
/// returns true: it will run again from the start and report then.
fn execute(ctx: &Ctx, job: Job, cancel: CancellationToken, preempted: &AtomicBool) -> bool {
    let id = job.id;
    let _ = ctx.events.send(WorkerEvent::Started { id, label: job.kind.label() });
    let ev = match run_job(ctx, id, job.kind, &cancel) {
        Ok(output) => WorkerEvent::Finished { id, output },
        Err(Error::Cancelled) if preempted.load(Ordering::SeqCst) => {
            let _ = ctx.events.send(WorkerEvent::Progress {
                id,
                done: 0,
                total: 0,
                msg: "paused for a replay".into(),
            });
            return true;
        }
        Err(Error::Cancelled) => WorkerEvent::Cancelled { id },
        Err(e) => WorkerEvent::Failed { id, error: e.to_string() },
    };
    let _ = ctx.events.send(ev);
    false
}

fn score_all(
    ms: &ModelState,
    det: &Detectors,
    th: &FilterThresholds,
    cs: Vec<Completion>,
    cancel: &CancellationToken,
) -> Result<Vec<ScoredCompletion>> {
    let mut out = Vec::with_capacity(cs.len());
    for c in cs {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let strength = if ms.vectors.is_empty() {
            None
        } else {
            teacher_force(&ms.lm, &c.system, &c.prompt, &c.tokens, Some(&ms.vectors))?.persona_strength
        };
        let score = score_completion(&c, det, th, strength);
        out.push(ScoredCompletion { completion: c, score });
    }
    Ok(out)
}

fn unique_rel(session: &Session, rel: String) -> Result<String> {
    if !session.artifact_path(&rel)?.exists() {
        return Ok(rel);
    }
    let (stem, ext) = rel.rsplit_once('.').unwrap_or((rel.as_str(), ""));
    Ok(format!("{stem}-{}.{ext}", session.next_seq()))
}

fn run_job(ctx: &Ctx, id: JobId, kind: JobKind, cancel: &CancellationToken) -> Result<JobOutput> {
    let send = |e: WorkerEvent| {
        let _ = ctx.events.send(e);
    };
    match kind {
        JobKind::LoadModel { path, vector } => {
            let dev = candle_core::Device::cuda_if_available(0)?;
            send(WorkerEvent::Progress { id, done: 0, total: 1, msg: format!("loading {}", path.display()) });
            let lm = crate::model::load_model(&path, None, &dev)?;
            let vectors = match &vector {
                Some(p) => vectors::load_vectors(p, &lm.model)?,
                None => BTreeMap::new(),
            };
            let out = JobOutput::ModelLoaded {
                model: lm.info.id.clone(),
                weights_hash: lm.info.weights_hash.clone(),
                layers: lm.model.cfg.num_hidden_layers,
                hidden: lm.model.cfg.hidden_size,
                vector_layers: vectors.keys().copied().collect(),
            };
            let event = SessionEvent::ModelLoaded {
                model: lm.info.id.clone(),
                weights_hash: lm.info.weights_hash.clone(),
            };
            *lock(&ctx.model)? = Some(ModelState { lm, vectors });
            lock(&ctx.session)?.append(event)?;
            Ok(out)
        }
        JobKind::Generate(req) => {
            let guard = lock(&ctx.model)?;
            let ms = guard.as_ref().ok_or_else(|| Error::invalid("the model is not loaded"))?;
            let rows = req.alphas.len() * req.samples_per_alpha.max(1);
            let total = (rows * req.sampling.max_new_tokens) as u64;
            let mut done = 0u64;
            let vectors = (!ms.vectors.is_empty()).then_some(&ms.vectors);
            let is_cancelled = || cancel.is_cancelled();
            let cs = bridge::generate_completions(&ms.lm, vectors, &req, &is_cancelled, &mut |row, text| {
                done += 1;
                send(WorkerEvent::Token { id, row, text: text.to_string() });
                if done % 8 == 0 {
                    send(WorkerEvent::Progress {
                        id,
                        done,
                        total,
                        msg: format!("prompt {}", req.prompt_index),
                    });
                }
            })?;
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let det = lock(&ctx.detectors)?.clone();
            let th = lock(&ctx.session)?.manifest().filter.thresholds.clone();
            let scored = score_all(ms, &det, &th, cs, cancel)?;
            drop(guard);
            let mut s = lock(&ctx.session)?;
            let rel = unique_rel(&s, session::completions_file(req.round, req.prompt_index))?;
            let event = SessionEvent::CompletionsGenerated {
                round: req.round,
                prompt_index: req.prompt_index,
                file: rel.clone(),
                ids: scored.iter().map(|r| r.completion.id.clone()).collect(),
            };
            s.write_artifact(&rel, &session::to_jsonl(&scored)?, event)?;
            Ok(JobOutput::Completions {
                round: req.round,
                prompt_index: req.prompt_index,
                file: rel,
                rows: scored,
            })
        }
        JobKind::Replay(req) => {
            let guard = lock(&ctx.model)?;
            let ms = guard.as_ref().ok_or_else(|| Error::invalid("the model is not loaded"))?;
            let vectors = (!ms.vectors.is_empty()).then_some(&ms.vectors);
            let is_cancelled = || cancel.is_cancelled();
            let c = bridge::replay_completion(&ms.lm, vectors, &req, &is_cancelled, &mut |text| {
                send(WorkerEvent::Token { id, row: 0, text: text.to_string() })
            })?;
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let det = lock(&ctx.detectors)?.clone();
            let th = lock(&ctx.session)?.manifest().filter.thresholds.clone();
            let row = score_all(ms, &det, &th, vec![c], cancel)?
                .pop()
                .ok_or_else(|| Error::invalid("scoring lost the replay"))?;
            Ok(JobOutput::Replayed { round: req.round, at: req.at, dose: req.dose, row: Box::new(row) })
        }
        JobKind::Rescore { round, completions } => {
            let det = lock(&ctx.session)?.detectors()?;
            *lock(&ctx.detectors)? = det.clone();
            let th = lock(&ctx.session)?.manifest().filter.thresholds.clone();
            let guard = lock(&ctx.model)?;
            let n = completions.len() as u64;
            let scored = match guard.as_ref() {
                Some(ms) => score_all(ms, &det, &th, completions, cancel)?,
                // Without a model, text scores and traces still give every score but persona strength.
                None => completions
                    .into_iter()
                    .map(|c| {
                        let score = score_completion(&c, &det, &th, None);
                        ScoredCompletion { completion: c, score }
                    })
                    .collect(),
            };
            drop(guard);
            send(WorkerEvent::Progress { id, done: n, total: n, msg: "scored".into() });
            let scores: BTreeMap<String, ScoreCard> =
                scored.into_iter().map(|r| (r.completion.id, r.score)).collect();
            let mut s = lock(&ctx.session)?;
            let rel = format!("{}/scores-{}.json", session::round_dir(round), s.next_seq());
            let bytes =
                serde_json::to_vec_pretty(&scores).map_err(|e| Error::invalid(format!("scores: {e}")))?;
            s.write_artifact(&rel, &bytes, SessionEvent::Rescored { round, file: rel.clone() })?;
            Ok(JobOutput::Rescored { round, file: rel, scores })
        }
        JobKind::Record(event) => {
            let l = lock(&ctx.session)?.append(event)?;
            Ok(JobOutput::Recorded { seq: l.seq, event: l.event })
        }
        JobKind::WriteArtifact { rel, contents, event } => {
            let l = lock(&ctx.session)?.write_artifact(&rel, &contents, event)?;
            Ok(JobOutput::Recorded { seq: l.seq, event: l.event })
        }
        JobKind::RunRounds { model, rounds, floor, human_round } => {
            let manifest = lock(&ctx.session)?.manifest().clone();
            let cfg = tui_rounds_config(&model, &manifest, rounds, floor, human_round);
            let mut progress = RoundsProgress { id, events: &ctx.events, cancel };
            let mut log = |m: &str| send(WorkerEvent::Progress { id, done: 0, total: 0, msg: m.to_string() });
            let mut on_step = |round: u32, r: &crate::heal::StepRecord| {
                send(WorkerEvent::HealStep { id, round, record: Box::new(r.clone()) })
            };
            // The runner locks the session only per read or append: decisions recorded meanwhile are written
            // at once, not after the round.
            let summary = crate::rounds::Runner::with_session(&ctx.session, cfg, &mut progress, &mut log)?
                .on_heal_step(&mut on_step)
                .run()?;
            let dir = lock(&ctx.session)?.dir().to_path_buf();
            let (_, after) = crate::rounds::read_status(&dir)?;
            Ok(JobOutput::Rounds {
                points: summary.points,
                chain: after.chain,
                branch: after.branch,
                stopped: summary.stopped,
            })
        }
        JobKind::RoundsStatus => {
            let s = lock(&ctx.session)?;
            let (points, lineage) = crate::rounds::read_status(s.dir())?;
            Ok(JobOutput::Rounds {
                points,
                chain: lineage.chain,
                branch: lineage.branch,
                stopped: String::new(),
            })
        }
        JobKind::ReadGateQ1 { round } => {
            let path = lock(&ctx.session)?
                .artifact_path(&format!("{}/heal/gate-q1.json", session::round_dir(round)))?;
            let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
            let report = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e))?;
            let log = path.with_file_name("train").join("log.jsonl");
            let steps = if log.exists() { crate::heal::train::read_step_log(&log)? } else { vec![] };
            Ok(JobOutput::GateQ1 { round, report: Box::new(report), steps })
        }
        JobKind::ReadEvalSamples { rounds } => {
            let paths = {
                let s = lock(&ctx.session)?;
                let rel = |r: u32| format!("{}/eval/eval.json", session::round_dir(r));
                rounds.iter().map(|r| Ok((*r, s.artifact_path(&rel(*r))?))).collect::<Result<Vec<_>>>()?
            };
            let mut samples = BTreeMap::new();
            for (round, path) in paths {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let report = crate::eval::EvalReport::load(&path)?;
                samples.insert(round, crate::eval::pick_samples(&report, crate::eval::SAMPLES_PER_ROUND));
            }
            Ok(JobOutput::EvalSamples { samples })
        }
        JobKind::Cancel(_) => Err(Error::invalid("cancel is a control message, not a job")),
    }
}

#[cfg(test)]
mod tests;
