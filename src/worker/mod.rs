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

use crate::error::{Error, Result};
use crate::model::Compute;
use crate::rounds::{score_completions, GateMode, RoundsConfig, RunObserver, Stopped, Student};
use crate::score::{Detectors, FilterThresholds, ScoreCard, ScoredCompletion};
use crate::session::{self, Session, SessionEvent};
use crate::steer::Completion;
use std::collections::{BTreeMap, VecDeque};
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
    /// Run the loop on the session (the researcher as its gates) until it needs them or reaches `rounds`
    /// judged rounds: loads the student, then extract → dose → generate (streamed) and stop at gate Q0; after
    /// the researcher passed it, heal (streamed) and stop at gate Q1; after keep, bake → eval → gate Q2. The
    /// student stays loaded for replays and custom prompts of the round being curated.
    RunRounds {
        /// Judged rounds to reach (`None`: one more than are judged now, i.e. the round in progress or the next).
        rounds: Option<u32>,
    },
    /// Generate and score completions for a custom prompt of the round being curated, write them, record.
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
    /// Re-read the session log from disk (after a failed append, so the screen shows what is really saved),
    /// with the completions of `round` as they stand there.
    Refold {
        /// Round on screen.
        round: u32,
    },
    /// Read the rounds table and lineage of the session.
    RoundsStatus,
    /// Read a round's gate-Q1 report.
    ReadGateQ1 {
        /// Round.
        round: u32,
    },
    /// Read a few eval items (think text, answer probabilities) of each round's eval for the iterate screen.
    ReadEvalSamples {
        /// Rounds (0 = the base).
        rounds: Vec<u32>,
    },
    /// Cancel a queued or running job.
    Cancel(JobId),
}

/// What kind of job an event is about (the UI keys its views on this, never on a label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobTag {
    /// `RunRounds`.
    Rounds,
    /// `Generate`.
    Generate,
    /// `Replay`.
    Replay,
    /// `Rescore`.
    Rescore,
    /// `Record`.
    Record,
    /// `WriteArtifact`.
    Write,
    /// `Refold`.
    Refold,
    /// `RoundsStatus`.
    ReadRounds,
    /// `ReadGateQ1`.
    ReadGateQ1,
    /// `ReadEvalSamples`.
    ReadEvalSamples,
    /// `Cancel`.
    Cancel,
}

impl JobTag {
    /// A short label for status lines and popup titles ("Failed while …").
    pub fn label(self) -> &'static str {
        match self {
            JobTag::Rounds => "running the round",
            JobTag::Generate => "generating",
            JobTag::Replay => "replaying",
            JobTag::Rescore => "rescoring",
            JobTag::Record => "recording",
            JobTag::Write => "writing",
            JobTag::Refold => "re-reading the session log",
            JobTag::ReadRounds => "reading rounds",
            JobTag::ReadGateQ1 => "reading gate Q1",
            JobTag::ReadEvalSamples => "reading eval samples",
            JobTag::Cancel => "cancelling",
        }
    }
    /// Whether the job needs the model lane (so a failed model load explains it).
    pub fn is_model_job(self) -> bool {
        matches!(self, JobTag::Rounds | JobTag::Generate | JobTag::Replay | JobTag::Rescore)
    }
}

impl JobKind {
    /// Its tag.
    pub fn tag(&self) -> JobTag {
        match self {
            JobKind::RunRounds { .. } => JobTag::Rounds,
            JobKind::Generate(_) => JobTag::Generate,
            JobKind::Replay(_) => JobTag::Replay,
            JobKind::Rescore { .. } => JobTag::Rescore,
            JobKind::Record(_) => JobTag::Record,
            JobKind::WriteArtifact { .. } => JobTag::Write,
            JobKind::Refold { .. } => JobTag::Refold,
            JobKind::RoundsStatus => JobTag::ReadRounds,
            JobKind::ReadGateQ1 { .. } => JobTag::ReadGateQ1,
            JobKind::ReadEvalSamples { .. } => JobTag::ReadEvalSamples,
            JobKind::Cancel(_) => JobTag::Cancel,
        }
    }
    /// A short label for status lines.
    pub fn label(&self) -> &'static str {
        self.tag().label()
    }
    /// Interactive jobs use the latest-wins slot.
    pub fn is_interactive(&self) -> bool {
        matches!(self, JobKind::Replay(_))
    }
    fn is_record(&self) -> bool {
        matches!(self, JobKind::Record(_) | JobKind::WriteArtifact { .. } | JobKind::Refold { .. })
    }
}

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutput {
    /// Completions of one custom prompt, scored and recorded.
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
        /// Replay dose (absolute: alpha × c*).
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
    /// The session as saved on disk (`Refold`).
    Refolded {
        /// The fold of the log file.
        state: Box<crate::session::SessionState>,
        /// The round's completions as saved.
        round: u32,
        /// Its rows.
        rows: Vec<ScoredCompletion>,
    },
    /// The rounds table (base first) and lineage, after a run or on request.
    Rounds {
        /// Progress-map points.
        points: Vec<crate::eval::RoundPoint>,
        /// Kept rounds the student carries.
        chain: Vec<u32>,
        /// Current branch.
        branch: String,
        /// How the last run ended (`None` when only read).
        stopped: Option<Stopped>,
    },
    /// A round's gate-Q1 report.
    GateQ1 {
        /// Round.
        round: u32,
        /// The report.
        report: Box<crate::heal::gate::GateQ1>,
        /// The heal run's step log (empty when absent), for the training curve.
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

/// A rounds run's reports as worker events.
struct RoundsObserver<'a> {
    id: JobId,
    events: &'a mpsc::UnboundedSender<WorkerEvent>,
}

impl RunObserver for RoundsObserver<'_> {
    fn log(&mut self, msg: &str) {
        let _ =
            self.events.send(WorkerEvent::Progress { id: self.id, done: 0, total: 0, msg: msg.to_string() });
    }
    fn round_started(&mut self, round: u32, c_star: f64) {
        let _ = self.events.send(WorkerEvent::RoundStarted { id: self.id, round, c_star });
    }
    fn completions(&mut self, round: u32, part: usize, file: &str, rows: &[ScoredCompletion]) {
        let _ = self.events.send(WorkerEvent::Completions {
            id: self.id,
            round,
            part,
            file: file.to_string(),
            rows: rows.to_vec(),
        });
    }
    fn heal_step(&mut self, round: u32, step: &crate::heal::StepRecord) {
        let _ =
            self.events.send(WorkerEvent::HealStep { id: self.id, round, record: Box::new(step.clone()) });
    }
}

/// What the worker tells the UI.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// A job began.
    Started {
        /// Job.
        id: JobId,
        /// What kind of job it is.
        tag: JobTag,
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
    /// A rounds job began generating round `round` at calibrated coefficient `c_star`.
    RoundStarted {
        /// Job.
        id: JobId,
        /// Round.
        round: u32,
        /// Its c*.
        c_star: f64,
    },
    /// A rounds job wrote and recorded a batch of scored completions.
    Completions {
        /// Job.
        id: JobId,
        /// Round.
        round: u32,
        /// Batch index.
        part: usize,
        /// Artifact, relative to the session.
        file: String,
        /// The completions.
        rows: Vec<ScoredCompletion>,
    },
    /// The student of a round is loaded and kept for replays and custom prompts.
    ModelReady {
        /// Job.
        id: JobId,
        /// Model id.
        model: String,
        /// Layers the round's vector steers (empty: none yet).
        vector_layers: Vec<usize>,
        /// The round being curated and its c*, when there is one.
        round: Option<(u32, f64)>,
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

/// What jobs share.
struct Ctx {
    student: Mutex<Option<Student>>,
    session: Mutex<Session>,
    detectors: Mutex<Detectors>,
    compute: Compute,
    events: mpsc::UnboundedSender<WorkerEvent>,
}

/// The loop's settings for rounds run from the TUI: the short demo settings, the session's persona file and
/// control-arm choice as recorded, the researcher as the gates, no coherence floor (the researcher rolls back).
pub fn tui_rounds_config(manifest: &session::SessionManifest, rounds: u32, compute: Compute) -> RoundsConfig {
    let mut cfg = RoundsConfig::small(&manifest.model);
    cfg.rounds = rounds;
    cfg.floor = crate::eval::CoherenceFloor::Absolute(0.0);
    cfg.gates = GateMode::Researcher;
    cfg.persona = manifest.persona_file.clone();
    cfg.controls = manifest.rounds.controls;
    cfg.compute = compute;
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

/// Start the worker on the current tokio runtime. It takes over the session writer; every model it loads goes on
/// `compute`.
pub fn spawn(
    session: Session,
    compute: Compute,
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> Result<WorkerHandle> {
    spawn_with_student(session, compute, None, events)
}

/// `spawn` with a student already loaded (benchmarks and tests that curate without running a round first).
pub fn spawn_with_student(
    session: Session,
    compute: Compute,
    student: Option<Student>,
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> Result<WorkerHandle> {
    let detectors = session.detectors()?;
    let ctx = Arc::new(Ctx {
        student: Mutex::new(student),
        session: Mutex::new(session),
        detectors: Mutex::new(detectors),
        compute,
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
    let _ = ctx.events.send(WorkerEvent::Started { id, tag: job.kind.tag() });
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

/// A custom prompt's completions file: its part index, or, when that file exists (a part the loop wrote, or an
/// earlier try), the next free part.
fn unique_part(session: &Session, round: u32, part: usize) -> Result<String> {
    let rd = session.layout().round(round);
    let mut p = part;
    while rd.completions(p).abs.exists() {
        p += 1;
    }
    Ok(rd.completions(p).rel)
}

/// The round's student and vector for a curation job on `round`.
fn curating(guard: &Option<Student>, round: u32) -> Result<(&Student, &crate::steer::SteerVector)> {
    let st = guard.as_ref().ok_or_else(|| {
        Error::invalid("the model is not loaded yet (the round is still being prepared, or its load failed)")
    })?;
    match &st.round {
        Some((r, v)) if *r == round => Ok((st, v)),
        Some((r, _)) => {
            Err(Error::invalid(format!("the loaded model is curating round {r}, not round {round}")))
        }
        None => Err(Error::invalid(format!("round {round} is not being curated (its gate Q0 has passed)"))),
    }
}

/// Progress that only carries the job's cancel token.
struct CancelOnly<'a>(&'a CancellationToken);
impl crate::progress::Progress for CancelOnly<'_> {
    fn step(&mut self, _done: u64, _total: u64, _msg: &str) {}
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

fn run_job(ctx: &Ctx, id: JobId, kind: JobKind, cancel: &CancellationToken) -> Result<JobOutput> {
    let send = |e: WorkerEvent| {
        let _ = ctx.events.send(e);
    };
    match kind {
        JobKind::RunRounds { rounds } => {
            let manifest = lock(&ctx.session)?.manifest().clone();
            // `None`: the runner finishes the round in progress, or runs one more.
            let cfg = tui_rounds_config(&manifest, rounds.unwrap_or(0), ctx.compute);
            let kept = lock(&ctx.student)?.take();
            if kept.is_none() {
                send(WorkerEvent::Progress {
                    id,
                    done: 0,
                    total: 0,
                    msg: format!("loading {}", manifest.model.display()),
                });
            }
            let mut progress = RoundsProgress { id, events: &ctx.events, cancel };
            let mut obs = RoundsObserver { id, events: &ctx.events };
            // The runner locks the session only per read or append: decisions recorded meanwhile are written
            // at once, not after the round.
            let mut runner =
                crate::rounds::Runner::with_session(&ctx.session, cfg, kept, &mut progress, &mut obs)?;
            let summary = match rounds {
                Some(_) => runner.run(),
                None => runner.run_next(),
            };
            let (chain, branch) = (runner.lineage().chain.clone(), runner.lineage().branch.clone());
            let student = runner.into_student();
            if let Some(st) = &student {
                send(WorkerEvent::ModelReady {
                    id,
                    model: st.lm.info.id.clone(),
                    vector_layers: st
                        .round
                        .as_ref()
                        .map(|(_, v)| v.directions.keys().copied().collect())
                        .unwrap_or_default(),
                    round: st.round.as_ref().and_then(|(r, v)| v.calibrated().ok().map(|c| (*r, c))),
                });
            }
            *lock(&ctx.student)? = student;
            let summary = summary?;
            Ok(JobOutput::Rounds { points: summary.points, chain, branch, stopped: Some(summary.stopped) })
        }
        JobKind::Generate(req) => {
            let guard = lock(&ctx.student)?;
            let (st, v) = curating(&guard, req.round)?;
            let rows = req.alphas.len() * req.samples_per_alpha.max(1);
            let total = (rows * req.sampling.max_new_tokens) as u64;
            let mut done = 0u64;
            let is_cancelled = || cancel.is_cancelled();
            let cs = bridge::generate_completions(&st.lm, v, &req, &is_cancelled, &mut |row, text| {
                done += 1;
                send(WorkerEvent::Token { id, row, text: text.to_string() });
                if done.is_multiple_of(8) {
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
            let scored = score_completions(&st.lm, Some(v), &det, &th, cs, &CancelOnly(cancel))?;
            drop(guard);
            let mut s = lock(&ctx.session)?;
            let file = unique_part(&s, req.round, req.prompt_index)?;
            let event = SessionEvent::CompletionsGenerated {
                round: req.round,
                prompt_index: req.prompt_index,
                file: file.clone(),
                ids: scored.iter().map(|r| r.completion.id.clone()).collect(),
            };
            s.write_artifact(&file, &session::to_jsonl(&scored)?, event)?;
            Ok(JobOutput::Completions {
                round: req.round,
                prompt_index: req.prompt_index,
                file,
                rows: scored,
            })
        }
        JobKind::Replay(req) => {
            let guard = lock(&ctx.student)?;
            let (st, v) = curating(&guard, req.round)?;
            let is_cancelled = || cancel.is_cancelled();
            let c = bridge::replay_completion(&st.lm, v, &req, &is_cancelled, &mut |text| {
                send(WorkerEvent::Token { id, row: 0, text: text.to_string() })
            })?;
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let det = lock(&ctx.detectors)?.clone();
            let th = lock(&ctx.session)?.manifest().filter.thresholds.clone();
            let row = score_completions(&st.lm, Some(v), &det, &th, vec![c], &CancelOnly(cancel))?
                .pop()
                .ok_or_else(|| Error::invalid("scoring lost the replay"))?;
            Ok(JobOutput::Replayed { round: req.round, at: req.at, dose: req.dose, row: Box::new(row) })
        }
        JobKind::Rescore { round, completions } => {
            let det = lock(&ctx.session)?.detectors()?;
            *lock(&ctx.detectors)? = det.clone();
            let th: FilterThresholds = lock(&ctx.session)?.manifest().filter.thresholds.clone();
            let guard = lock(&ctx.student)?;
            let n = completions.len() as u64;
            // Without the round's model, text scores and traces still give every score but persona strength.
            let scored = match curating(&guard, round) {
                Ok((st, v)) => {
                    score_completions(&st.lm, Some(v), &det, &th, completions, &CancelOnly(cancel))?
                }
                Err(_) => completions
                    .into_iter()
                    .map(|c| {
                        let score = crate::score::score_completion(&c, &det, &th, None);
                        ScoredCompletion { completion: c, score }
                    })
                    .collect(),
            };
            drop(guard);
            send(WorkerEvent::Progress { id, done: n, total: n, msg: "scored".into() });
            let scores: BTreeMap<String, ScoreCard> =
                scored.into_iter().map(|r| (r.completion.id, r.score)).collect();
            let mut s = lock(&ctx.session)?;
            let rel = s.layout().round(round).rescore(s.next_seq()).rel;
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
        JobKind::Refold { round } => {
            let s = lock(&ctx.session)?;
            let state = s.saved_state()?;
            let rows = match state.rounds.get(&round) {
                Some(r) => s.load_round(r)?,
                None => vec![],
            };
            Ok(JobOutput::Refolded { state: Box::new(state), round, rows })
        }
        JobKind::RoundsStatus => {
            let s = lock(&ctx.session)?;
            let (points, lineage) = crate::rounds::read_status(s.dir())?;
            Ok(JobOutput::Rounds { points, chain: lineage.chain, branch: lineage.branch, stopped: None })
        }
        JobKind::ReadGateQ1 { round } => {
            let run = lock(&ctx.session)?.layout().round(round).heal();
            let path = run.gate_q1_json();
            let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
            let report = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e))?;
            let log = run.log();
            let steps = if log.exists() { crate::heal::train::read_step_log(&log)? } else { vec![] };
            Ok(JobOutput::GateQ1 { round, report: Box::new(report), steps })
        }
        JobKind::ReadEvalSamples { rounds } => {
            let layout = lock(&ctx.session)?.layout();
            let mut samples = BTreeMap::new();
            for round in rounds {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let report = crate::eval::EvalReport::load(&layout.round(round).eval().abs)?;
                samples.insert(round, crate::eval::pick_samples(&report, crate::eval::SAMPLES_PER_ROUND));
            }
            Ok(JobOutput::EvalSamples { samples })
        }
        JobKind::Cancel(_) => Err(Error::invalid("cancel is a control message, not a job")),
    }
}

#[cfg(test)]
mod tests;
