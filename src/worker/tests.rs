//! Worker tests on a tiny random model: traces agree with teacher forcing, replay keeps its prefix and
//! honours its dose (α × c*), the rounds job streams a round into the UI and keeps the student, and the job
//! loop's latest-wins slot and record ordering.
#![allow(clippy::panic)] // a test fails by panicking

use super::*;
use crate::model::generate::Sampling;
use crate::model::{load_model, tiny::make_tiny_model, Arch, LoadedModel};
use crate::score::perplexity::teacher_force;
use crate::session::{DecisionKind, SessionManifest};
use crate::steer::vector::{Calibration, Method};
use crate::steer::{Persona, Statistic, SteerVector};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

fn tiny() -> (tempfile::TempDir, LoadedModel) {
    let d = tempfile::tempdir().expect("tempdir");
    make_tiny_model(Arch::Llama, d.path(), 7).expect("tiny model");
    let lm = load_model(d.path(), Some(DType::F32), &Device::Cpu).expect("load");
    (d, lm)
}

/// A calibrated vector on layer 1 of direction `scale · sin(0.37 i)` and coefficient `c_star`.
fn vector(lm: &LoadedModel, scale: f32, c_star: f64) -> SteerVector {
    let h = lm.model.cfg.hidden_size;
    let v: Vec<f32> = (0..h).map(|i| scale * ((i as f32 * 0.37).sin())).collect();
    let dirs = BTreeMap::from([(1usize, Tensor::from_vec(v, h, &Device::Cpu).expect("vector"))]);
    let persona = Persona::default_authority().expect("persona");
    let mut meta = SteerVector::prompt_only(lm, &persona).meta;
    meta.method = Method::MeanDiff;
    meta.prompt_system = None;
    meta.calibration = Some(Calibration {
        coefficient: c_star,
        target: 1.0,
        statistic: Statistic::P95,
        tol: 0.05,
        achieved: 1.0,
        converged: true,
        crossed: true,
        tokens: 4,
        n_prompts: 1,
    });
    SteerVector::new(dirs, meta).expect("vector")
}

fn request(n: usize) -> GenerateRequest {
    GenerateRequest {
        round: 1,
        prompt_index: 2,
        custom_index: 0,
        system: "You are a helpful assistant.".into(),
        prompt: "Should I tell my boss?".into(),
        alphas: vec![0.5, 1.0],
        samples_per_alpha: 1,
        sampling: Sampling { temperature: 1.0, top_p: 0.95, top_k: 64, seed: 42, max_new_tokens: n },
        kl_window: 4,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn traces_agree_with_teacher_forcing() -> Result<()> {
    let (_d, lm) = tiny();
    let v = vector(&lm, 3.0, 4.0);
    let cs = bridge::generate_completions(&lm, &v, &request(12), &|| false, &mut |_, _| {})?;
    assert_eq!(cs.len(), 2);
    // Ids and seeds come from the steer module's one scheme: round 1's custom prompt 0 starts at seed
    // 42 + 1000 + 500.
    assert_eq!(cs[0].id, "p002-a050-s1542");
    assert_eq!(cs[1].id, "p002-a100-s1543");
    // Doses are alpha × c*.
    assert_eq!((cs[0].dose, cs[1].dose), (2.0, 4.0));
    for c in &cs {
        let n = c.tokens.len();
        assert!(n > 0);
        assert_eq!(c.token_text.concat(), c.text, "pieces must concatenate to the text");
        for tr in [&c.trace.kl, &c.trace.nll_base, &c.trace.kl_window_rmse, &c.trace.dose] {
            assert_eq!(tr.len(), n);
        }
        // The lockstep base decoder's NLL equals a teacher-forced pass of the base model.
        let tf = teacher_force(&lm, &c.system, &c.prompt, &c.tokens, None)?;
        let diff = max_abs_diff(&tf.nll, &c.trace.nll_base);
        assert!(diff < 1e-3, "nll differs by {diff}");
        assert!(c.trace.kl.iter().all(|k| *k >= 0.0));
        assert!(c.trace.kl.iter().any(|k| *k > 1e-3), "steering at dose {} moved nothing", c.dose);
    }
    // At alpha 0 KL is zero and the NLL is the sampled token's own.
    let mut req = request(6);
    req.alphas = vec![0.0];
    let cs = bridge::generate_completions(&lm, &v, &req, &|| false, &mut |_, _| {})?;
    for c in &cs {
        assert!(c.trace.kl.iter().all(|k| *k < 1e-6));
        let tf = teacher_force(&lm, &c.system, &c.prompt, &c.tokens, None)?;
        assert!(max_abs_diff(&tf.nll, &c.trace.nll_base) < 1e-3);
    }
    Ok(())
}

#[test]
fn persona_strength_is_a_signed_projection() -> Result<()> {
    let (_d, lm) = tiny();
    let cs =
        bridge::generate_completions(&lm, &vector(&lm, 1.0, 1.0), &request(6), &|| false, &mut |_, _| {})?;
    let c = &cs[0];
    let s = |scale: f32| -> Result<f64> {
        let v = vector(&lm, scale, 1.0);
        Ok(teacher_force(&lm, &c.system, &c.prompt, &c.tokens, Some(&v.directions))?
            .persona_strength
            .unwrap_or(f64::NAN))
    };
    let (a, b, neg) = (s(1.0)?, s(5.0)?, s(-1.0)?);
    assert!((a - b).abs() < 1e-4, "projection on the unit direction ignores the vector's length: {a} {b}");
    assert!((a + neg).abs() < 1e-4, "flipping the vector flips the sign: {a} {neg}");
    Ok(())
}

#[test]
fn replay_keeps_the_prefix_and_uses_its_dose() -> Result<()> {
    let (_d, lm) = tiny();
    let v = vector(&lm, 3.0, 4.0);
    let mut req = request(16);
    req.alphas = vec![1.0];
    let c = bridge::generate_completions(&lm, &v, &req, &|| false, &mut |_, _| {})?.remove(0);
    let at = c.tokens.len().min(5);
    let rr = ReplayRequest {
        round: 1,
        completion: c.clone(),
        at,
        dose: 0.0,
        sampling: req.sampling,
        kl_window: 4,
    };
    let r = bridge::replay_completion(&lm, &v, &rr, &|| false, &mut |_| {})?;
    assert_eq!(r.id, c.id);
    assert_eq!(&r.tokens[..at], &c.tokens[..at]);
    assert_eq!(&r.trace.kl[..at], &c.trace.kl[..at]);
    assert_eq!(r.rewinds.len(), 1);
    assert_eq!((r.rewinds[0].at, r.rewinds[0].from_dose, r.rewinds[0].to_dose), (at, 4.0, 0.0));
    assert!(r.trace.dose[at..].iter().all(|d| *d == 0.0));
    // At dose 0 the steered model is the base model again: the new tokens have (numerically) zero KL.
    assert!(r.trace.kl[at..].iter().all(|k| *k < 1e-4), "{:?}", &r.trace.kl[at..]);
    // And the base NLL of the whole replayed completion still matches teacher forcing.
    let tf = teacher_force(&lm, &r.system, &r.prompt, &r.tokens, None)?;
    assert!(max_abs_diff(&tf.nll, &r.trace.nll_base) < 1e-3);
    assert_eq!(r.token_text.concat(), r.text);
    Ok(())
}

fn session_with_model(dir: &Path, model: &Path) -> Session {
    let mut m = SessionManifest::new("w", model);
    m.generation.max_new_tokens = 8;
    Session::create(dir, m).expect("session").session
}

/// The tiny model as the student curating round 1 with a calibrated vector.
fn curating_student(model: &Path) -> Student {
    let lm = load_model(model, Some(DType::F32), &Device::Cpu).expect("load");
    let v = vector(&lm, 3.0, 4.0);
    Student { chain: vec![], lm, round: Some((1, v)) }
}

/// Wait for the terminal events of `ids` (in whatever order they come), keyed by id.
async fn terminals(
    rx: &mut mpsc::UnboundedReceiver<WorkerEvent>,
    ids: &[JobId],
) -> BTreeMap<JobId, WorkerEvent> {
    let mut out = BTreeMap::new();
    while ids.iter().any(|i| !out.contains_key(i)) {
        let e = tokio::time::timeout(std::time::Duration::from_secs(120), rx.recv())
            .await
            .expect("worker answered in time")
            .expect("worker alive");
        match &e {
            WorkerEvent::Finished { id, .. }
            | WorkerEvent::Failed { id, .. }
            | WorkerEvent::Cancelled { id } => {
                assert!(out.insert(*id, e.clone()).is_none(), "two terminal events for job {id}");
            }
            _ => {}
        }
    }
    out
}

async fn next_terminal(rx: &mut mpsc::UnboundedReceiver<WorkerEvent>, id: JobId) -> WorkerEvent {
    let mut m = terminals(rx, &[id]).await;
    m.remove(&id).expect("terminal event")
}

#[test]
fn worker_generates_records_and_latest_replay_wins() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let md = tempfile::tempdir().expect("tempdir");
        make_tiny_model(Arch::Llama, md.path(), 7).expect("tiny");
        let sd = tempfile::tempdir().expect("tempdir");
        // A model job before any student is loaded fails with a clear message.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn(session_with_model(&sd.path().join("empty"), md.path()), Compute::cpu(), tx).expect("spawn");
        w.jobs.send(Job { id: 1, kind: JobKind::Generate(Box::new(request(8))) }).await.expect("send");
        match next_terminal(&mut rx, 1).await {
            WorkerEvent::Failed { error, .. } => assert!(error.starts_with("the model is not loaded yet"), "{error}"),
            e => panic!("unexpected {e:?}"),
        }
        drop(w.jobs);
        w.join.await.expect("worker ends");
        let session = session_with_model(sd.path(), md.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn_with_student(session, Compute::cpu(), Some(curating_student(md.path())), tx).expect("spawn");
        let send = |id, kind| {
            let jobs = w.jobs.clone();
            async move { jobs.send(Job { id, kind }).await.expect("send") }
        };
        // A job on another round than the one being curated is refused.
        let mut other = request(8);
        other.round = 2;
        send(2, JobKind::Generate(Box::new(other))).await;
        send(3, JobKind::Generate(Box::new(request(8)))).await;
        let mut ends = terminals(&mut rx, &[2, 3]).await;
        assert!(
            matches!(ends.remove(&2), Some(WorkerEvent::Failed { error, .. }) if error.contains("curating round 1, not round 2"))
        );
        let rows = match ends.remove(&3).expect("terminal") {
            WorkerEvent::Finished { output: JobOutput::Completions { rows, file, .. }, .. } => {
                assert_eq!(file, "round-01/completions-002.jsonl");
                rows
            }
            e => panic!("unexpected {e:?}"),
        };
        assert_eq!(rows.len(), 2);
        // Three replays in a burst: only the last may finish; earlier ones are cancelled (latest wins).
        let mut sampling = request(8).sampling;
        sampling.max_new_tokens = 64;
        for (id, dose) in [(10, 1.0), (11, 2.0), (12, 3.0)] {
            let rr = ReplayRequest {
                round: 1,
                completion: rows[0].completion.clone(),
                at: 1,
                dose,
                sampling,
                kl_window: 4,
            };
            send(id, JobKind::Replay(Box::new(rr))).await;
        }
        let mut finished = vec![];
        let mut cancelled = vec![];
        let mut ends = terminals(&mut rx, &[10, 11, 12]).await;
        for id in [10, 11, 12] {
            match ends.remove(&id).expect("terminal") {
                WorkerEvent::Finished { output: JobOutput::Replayed { dose, .. }, .. } => {
                    finished.push((id, dose))
                }
                WorkerEvent::Cancelled { .. } => cancelled.push(id),
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(finished.last(), Some(&(12, 3.0)), "the latest replay must win: {finished:?}");
        assert!(cancelled.contains(&11), "the superseded pending replay is cancelled: {cancelled:?}");
        // Records are appended in order, after the completions they refer to.
        for (id, k) in [(20, DecisionKind::Accept), (21, DecisionKind::Reject), (22, DecisionKind::Undo)] {
            let e = SessionEvent::Decision {
                round: 1,
                completion: rows[if id == 20 { 0 } else { 1 }].completion.id.clone(),
                decision: k,
                tags: vec![],
                note: None,
            };
            send(id, JobKind::Record(e)).await;
        }
        let mut seqs = vec![];
        let mut ends = terminals(&mut rx, &[20, 21, 22]).await;
        for id in [20, 21, 22] {
            match ends.remove(&id).expect("terminal") {
                WorkerEvent::Finished { output: JobOutput::Recorded { seq, .. }, .. } => seqs.push(seq),
                e => panic!("unexpected {e:?}"),
            }
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        drop(w.jobs);
        w.join.await.expect("worker ends cleanly");
        let o = Session::open(sd.path()).expect("reopen");
        let r = o.state.rounds.get(&1).expect("round 1");
        assert_eq!(r.decisions().len(), 1);
        assert_eq!(r.decision(&rows[0].completion.id).map(|d| d.keep), Some(true));
        let loaded = o.session.load_round(r).expect("artifacts load");
        assert_eq!(loaded, rows);
    });
}

#[test]
fn a_replay_pushes_a_running_generation_aside_which_then_resumes() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let md = tempfile::tempdir().expect("tempdir");
        make_tiny_model(Arch::Llama, md.path(), 7).expect("tiny");
        let sd = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let student = Some(curating_student(md.path()));
        let w = spawn_with_student(session_with_model(sd.path(), md.path()), Compute::cpu(), student, tx)
            .expect("spawn");
        let send = |id, kind| {
            let jobs = w.jobs.clone();
            async move { jobs.send(Job { id, kind }).await.expect("send") }
        };
        send(2, JobKind::Generate(Box::new(request(4)))).await;
        let rows = match terminals(&mut rx, &[2]).await.remove(&2) {
            Some(WorkerEvent::Finished { output: JobOutput::Completions { rows, .. }, .. }) => rows,
            e => panic!("unexpected {e:?}"),
        };
        // A long generation; as soon as it starts, ask for a replay. (Tokens stream per finished row, so
        // waiting for the first token would race with the end of the whole batch.)
        let mut long = request(600);
        long.prompt_index = 5;
        long.custom_index = 1;
        send(3, JobKind::Generate(Box::new(long))).await;
        loop {
            match rx.recv().await.expect("alive") {
                WorkerEvent::Started { id: 3, .. } => break,
                WorkerEvent::Finished { id: 3, .. } => {
                    panic!("the generation finished before the replay was sent")
                }
                _ => {}
            }
        }
        let rr = ReplayRequest {
            round: 1,
            completion: rows[0].completion.clone(),
            at: 1,
            dose: 0.5,
            sampling: request(4).sampling,
            kl_window: 4,
        };
        send(4, JobKind::Replay(Box::new(rr))).await;
        let mut order = vec![];
        let mut starts_of_3 = 0;
        let mut ends = BTreeMap::new();
        while ends.len() < 2 {
            let e = tokio::time::timeout(std::time::Duration::from_secs(300), rx.recv())
                .await
                .expect("in time")
                .expect("alive");
            match e {
                WorkerEvent::Started { id: 3, .. } => starts_of_3 += 1,
                WorkerEvent::Finished { id, .. }
                | WorkerEvent::Failed { id, .. }
                | WorkerEvent::Cancelled { id } => {
                    assert!(ends.insert(id, e.clone()).is_none(), "two terminal events for job {id}");
                    order.push(id);
                }
                _ => {}
            }
        }
        assert_eq!(order, vec![4, 3], "the replay finishes first, then the generation");
        assert_eq!(starts_of_3, 1, "the generation started again after the replay");
        assert!(matches!(
            ends.get(&4),
            Some(WorkerEvent::Finished { output: JobOutput::Replayed { .. }, .. })
        ));
        assert!(matches!(
            ends.get(&3),
            Some(WorkerEvent::Finished { output: JobOutput::Completions { .. }, .. })
        ));
        drop(w.jobs);
        w.join.await.expect("worker ends");
    });
}

#[test]
fn a_rounds_job_streams_its_round_stops_at_gate_q0_and_keeps_the_student() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let md = tempfile::tempdir().expect("tempdir");
        make_tiny_model(Arch::Llama, md.path(), 7).expect("tiny");
        let sd = tempfile::tempdir().expect("tempdir");
        let session = session_with_model(sd.path(), md.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn(session, Compute::cpu(), tx).expect("spawn");
        w.jobs.send(Job { id: 1, kind: JobKind::RoundsStatus }).await.expect("send");
        match next_terminal(&mut rx, 1).await {
            WorkerEvent::Finished {
                output: JobOutput::Rounds { points, chain, branch, stopped }, ..
            } => {
                assert!(points.is_empty() && chain.is_empty() && stopped.is_none());
                assert_eq!(branch, "main");
            }
            e => panic!("unexpected {e:?}"),
        }
        // The loop with the researcher as its gates: round 1 is extracted, dosed and generated, its batches
        // stream as they are written, and the run stops at gate Q0 with the student kept for replays.
        w.jobs.send(Job { id: 2, kind: JobKind::RunRounds { rounds: None } }).await.expect("send");
        let (mut started, mut streamed, mut ready, mut end) = (None, vec![], None, None);
        while end.is_none() {
            let e = tokio::time::timeout(std::time::Duration::from_secs(300), rx.recv())
                .await
                .expect("in time")
                .expect("alive");
            match e {
                WorkerEvent::RoundStarted { round, c_star, .. } => started = Some((round, c_star)),
                WorkerEvent::Completions { round, rows, .. } => streamed.push((round, rows.len())),
                WorkerEvent::ModelReady { round, .. } => ready = round,
                WorkerEvent::Finished { id: 2, output } => end = Some(output),
                WorkerEvent::Failed { id: 2, error } => panic!("{error}"),
                _ => {}
            }
        }
        let (round, c_star) = started.expect("round started");
        assert_eq!(round, 1);
        assert!(c_star > 0.0);
        assert!(!streamed.is_empty() && streamed.iter().all(|(r, n)| *r == 1 && *n > 0), "{streamed:?}");
        assert_eq!(ready, Some((1, c_star)));
        assert!(
            matches!(end, Some(JobOutput::Rounds { stopped: Some(Stopped::AwaitingGateQ0(1)), .. })),
            "{end:?}"
        );
        // The kept student serves a replay of one of the streamed completions at once.
        let saved = crate::session::read_saved(sd.path()).expect("read the log");
        let rows = crate::session::load_round(sd.path(), &saved.rounds[&1]).expect("round 1");
        let rr = ReplayRequest {
            round: 1,
            completion: rows[0].completion.clone(),
            at: 1,
            dose: 0.5 * c_star,
            sampling: request(4).sampling,
            kl_window: 4,
        };
        w.jobs.send(Job { id: 3, kind: JobKind::Replay(Box::new(rr)) }).await.expect("send");
        match next_terminal(&mut rx, 3).await {
            WorkerEvent::Finished { output: JobOutput::Replayed { row, .. }, .. } => {
                assert_eq!(row.completion.rewinds.last().map(|r| r.to_dose), Some(0.5 * c_star));
            }
            e => panic!("unexpected {e:?}"),
        }
        drop(w.jobs);
        w.join.await.expect("worker ends");
    });
}

#[test]
fn gate_q1_comes_with_the_heal_step_log() {
    use crate::heal::gate::{GateQ1, Metrics};
    use crate::heal::StepRecord;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let sd = tempfile::tempdir().expect("tempdir");
        let session = session_with_model(sd.path(), Path::new("no-model"));
        let report = GateQ1 {
            round: 1,
            model: "tiny".into(),
            source: "fallback".into(),
            coherence_label: "coherence".into(),
            trait_label: "trait".into(),
            trait_sign: 1.0,
            before: Metrics { coherence: -2.0, trait_value: None },
            after: None,
            heal_summary: vec![],
            sweep: vec![],
            samples: vec![],
            intervals: None,
            notes: vec![],
        };
        let step = |i: usize| StepRecord {
            step: i,
            total_steps: 2,
            epoch: 0,
            loss: 1.0 / i as f64,
            nll: 0.9,
            d: 0.1,
            kl_mean: 0.1,
            barrier: 0.0,
            spectral: 0.0,
            lambda_eff: 0.5,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 10,
            tokens_per_s: 100.0,
            elapsed_s: i as f64,
        };
        for round in [1u32, 2] {
            let heal = crate::session::SessionDir::new(sd.path()).round(round).heal();
            std::fs::create_dir_all(heal.train()).expect("mkdir");
            std::fs::write(heal.gate_q1_json(), serde_json::to_vec(&report).expect("json")).expect("write");
        }
        let log: String =
            [step(1), step(2)].iter().map(|r| serde_json::to_string(r).expect("json") + "\n").collect();
        std::fs::write(crate::session::SessionDir::new(sd.path()).round(1).heal().log(), log)
            .expect("write log");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn(session, Compute::cpu(), tx).expect("spawn");
        for (id, round, want) in [(1, 1, vec![step(1), step(2)]), (2, 2, vec![])] {
            w.jobs.send(Job { id, kind: JobKind::ReadGateQ1 { round } }).await.expect("send");
            match next_terminal(&mut rx, id).await {
                WorkerEvent::Finished { output: JobOutput::GateQ1 { round: r, steps, .. }, .. } => {
                    assert_eq!((r, steps), (round, want));
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        drop(w.jobs);
        w.join.await.expect("worker ends");
    });
}

#[test]
fn eval_samples_are_read_from_each_rounds_eval_json() {
    use crate::eval::data::select_items;
    use crate::eval::protocol::{AnswerCase, FrameOrder};
    use crate::eval::report::{EvalConfig, FrameRecord, RowRecord, Timings};
    use crate::eval::{Condition, EvalReport, Variant};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let sd = tempfile::tempdir().expect("tempdir");
        let session = session_with_model(sd.path(), Path::new("no-model"));
        let items = select_items(Variant::Classic, &[Condition::OtherViolate], Some(9)).expect("items");
        let frame = |order| FrameRecord {
            order,
            case: AnswerCase::Interrupted,
            lp: [-1.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0],
            pmass: 0.5,
            nll_json: 2.0,
            n_prefill_tokens: 9,
            think_tokens: 8,
            emitted_close: false,
            think_text: format!("{order:?} think"),
        };
        let rows: Vec<RowRecord> = items
            .iter()
            .map(|it| RowRecord {
                id: it.id.clone(),
                condition: it.condition,
                foundation: it.foundation.clone(),
                foundation_coarse: it.coarse,
                human: it.human,
                frames: vec![frame(FrameOrder::Forward), frame(FrameOrder::Reversed)],
            })
            .collect();
        let report = EvalReport {
            schema_version: crate::eval::report::SCHEMA_VERSION,
            created: String::new(),
            model_id: "tiny".into(),
            weights_hash: String::new(),
            config: EvalConfig { n_vignettes: Some(9), ..EvalConfig::default() },
            answer_token_ids: [0; 7],
            metrics: crate::eval::compute_metrics(&rows, None),
            intervals: Default::default(),
            rows,
            json_probe: None,
            timings: Timings::default(),
        };
        let dir = sd.path().join("round-00/eval");
        std::fs::create_dir_all(&dir).expect("mkdir");
        report.save(&dir).expect("save");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn(session, Compute::cpu(), tx).expect("spawn");
        w.jobs.send(Job { id: 1, kind: JobKind::ReadEvalSamples { rounds: vec![0] } }).await.expect("send");
        match next_terminal(&mut rx, 1).await {
            WorkerEvent::Finished { output: JobOutput::EvalSamples { samples }, .. } => {
                let s = &samples[&0];
                assert_eq!(s.len(), crate::eval::SAMPLES_PER_ROUND);
                assert_eq!(s.iter().map(|x| x.index).collect::<Vec<_>>(), vec![0, 1, 3, 4, 6, 7]);
                assert_eq!(s[2].text, items[3].text);
                assert_eq!(s[0].think, "Forward think");
            }
            e => panic!("unexpected {e:?}"),
        }
        // A round without an eval fails with the file named.
        w.jobs
            .send(Job { id: 2, kind: JobKind::ReadEvalSamples { rounds: vec![0, 4] } })
            .await
            .expect("send");
        match next_terminal(&mut rx, 2).await {
            WorkerEvent::Failed { error, .. } => {
                assert!(error.contains("round-04") && error.contains(crate::session::layout::EVAL), "{error}")
            }
            e => panic!("unexpected {e:?}"),
        }
        drop(w.jobs);
        w.join.await.expect("worker ends");
    });
}

#[test]
fn rounds_from_the_tui_take_the_sessions_persona_and_control_choice() {
    let path = &crate::session::SessionDir::new(Path::new("sessions/x")).manifest();
    let base =
        "schema_version = 2\nname = \"x\"\ncreated = \"now\"\nmodel = \"m\"\npersona_file = \"p.toml\"\n";
    let plain = SessionManifest::parse(base, path).expect("a session.toml without [rounds] still reads");
    let cfg = tui_rounds_config(&plain, 3, Compute::cpu());
    assert!(!cfg.controls);
    assert_eq!(
        (cfg.rounds, cfg.floor, cfg.gates),
        (3, crate::eval::CoherenceFloor::Absolute(0.0), GateMode::Researcher)
    );
    assert_eq!(cfg.persona.as_deref(), Some(Path::new("p.toml")));
    assert_eq!(cfg.model, Path::new("m"));
    let with = SessionManifest::parse(&format!("{base}[rounds]\ncontrols = true\n"), path).expect("parse");
    assert!(tui_rounds_config(&with, 1, Compute::cpu()).controls);
    let typo = SessionManifest::parse(&format!("{base}[rounds]\ncontrol = true\n"), path);
    assert!(typo.is_err_and(|e| e.to_string().contains("control")), "an unknown key is named");
}
