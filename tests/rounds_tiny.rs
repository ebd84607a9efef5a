//! The rounds loop end to end on a tiny random model: two full headless rounds write every artifact and the
//! lineage; a run stopped right after a round's heal stage (a simulated crash, plus a torn last log line) resumes
//! to the same end state without redoing finished stages; rollback and fork move the lineage; with the
//! researcher's gates, the run waits for gate Q0, heal trains on exactly the researcher's accepted completions
//! (adopted replays in place of their originals), and the run waits again for the keep or drop at gate Q1.

mod common;

use candle_core::{DType, Device};
use std::path::Path;
use steer_heal::eval::{pick_samples, CoherenceFloor, ControlArm, EvalReport, SAMPLES_PER_ROUND};
use steer_heal::heal::train::read_step_log;
use steer_heal::heal::StepRecord;
use steer_heal::model::tiny::make_tiny_model;
use steer_heal::model::{load_model, Arch, Compute};
use steer_heal::progress::Silent;
use steer_heal::rounds::{
    fork, generation_for, new_manifest, read_status, rollback, GateMode, LogTo, Quiet, RoundRecord,
    RoundsConfig, RunObserver, RunSummary, Runner, Stopped, AUTOMATIC_NOTE,
};
use steer_heal::score::{FilterThresholds, ScoredCompletion, Verdict};
use steer_heal::session::event::{read_log, Logged};
use steer_heal::session::layout::{self, SessionDir};
use steer_heal::session::{DecisionKind, Gate, Lineage, Session, SessionEvent, Stage};
use steer_heal::steer::{Completion, Rewind};
use tokenizers::Tokenizer;

/// A tiny model whose tokenizer has the seven answer words as tokens (so tinymfv can score it), with room for
/// an eval prompt.
fn tiny_with_answer_words(dir: &Path) {
    make_tiny_model(Arch::Llama, dir, 7).expect("tiny model");
}

/// Random weights write gibberish: the session's filter thresholds are opened so gate Q0 keeps it.
fn open_thresholds() -> FilterThresholds {
    FilterThresholds { max_perplexity: 1e30, max_repetition: 1.01, ..FilterThresholds::default() }
}

fn tiny_config(model: &Path, rounds: u32) -> RoundsConfig {
    let mut c = RoundsConfig::small(model);
    c.compute = Compute::cpu();
    c.rounds = rounds;
    c.gates = GateMode::Automatic;
    c.floor = CoherenceFloor::Absolute(0.0); // a random model puts almost no mass on the answers
    c.extract_pairs = Some(4);
    c.dose_tokens = 4;
    c.dose_prompts = 2;
    c.walk.probe_n = 2;
    c.walk.batch_n = 2;
    c.walk.min_keep = 2;
    c.walk.max_keep = 4;
    c.walk.max_batches = 1;
    c.heal.epochs = 1;
    c.heal.grad_accum = 1;
    c.heal.r = 2;
    c.heal.alpha = 4.0;
    c.heal.max_len = 512;
    c.measure_n = 1;
    c.measure_tokens = 4;
    c.eval.n_vignettes = Some(2);
    c.eval.think_tokens = 4;
    c.eval.json_probe_max_tokens = 8;
    c.eval.batch_size = 4;
    c.controls = true;
    c
}

/// A runner on `session`, created (when absent) with two of the persona's prompts, 8 new tokens each and the
/// open thresholds.
fn runner<'a>(
    session: &Path,
    cfg: RoundsConfig,
    progress: &'a mut Silent,
    obs: &'a mut dyn RunObserver,
) -> Runner<'a> {
    let model = cfg.model.clone();
    Runner::open(
        session,
        cfg,
        |p| new_manifest(session, &model, None, None, generation_for(p, Some(2), 8), Some(open_thresholds())),
        progress,
        obs,
    )
    .expect("open")
}

fn run(session: &Path, cfg: RoundsConfig) -> RunSummary {
    let mut progress = Silent::default();
    let mut obs = Quiet;
    runner(session, cfg, &mut progress, &mut obs).run().expect("run")
}

fn logged(session: &Path) -> Vec<Logged> {
    read_log(&SessionDir::new(session).events()).expect("log").events
}

fn events(session: &Path) -> Vec<SessionEvent> {
    logged(session).into_iter().map(|l| l.event).collect()
}

fn stage_events(session: &Path) -> Vec<(u32, Stage)> {
    events(session)
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::StageDone { round, stage, .. } => Some((round, stage)),
            _ => None,
        })
        .collect()
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())).expect("read")
}

/// The round's completions as they stand (generated files, re-scores, adopted replays).
fn round_rows(session: &Path, round: u32) -> Vec<ScoredCompletion> {
    let o = Session::open(session).expect("open session");
    let rs = o.state.rounds.get(&round).cloned().unwrap_or_default();
    o.session.load_round(&rs).expect("round completions")
}

/// The automatic decisions logged for `round`.
fn automatic_decisions(session: &Path, round: u32) -> Vec<String> {
    events(session)
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Decision { round: r, completion, note: Some(n), .. }
                if r == round && n == AUTOMATIC_NOTE =>
            {
                Some(completion)
            }
            _ => None,
        })
        .collect()
}

fn c_star_of(session: &Path, round: u32) -> f64 {
    let starts: Vec<f64> = events(session)
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::RoundStarted { round: r, dose, .. } if r == round => Some(dose),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 1, "round {round} starts once: {starts:?}");
    starts[0]
}

#[test]
fn two_rounds_write_every_artifact_then_resume_after_a_crash() {
    let mdir = tempfile::tempdir().expect("tempdir");
    tiny_with_answer_words(mdir.path());
    load_model(mdir.path(), Some(DType::F32), &Device::Cpu).expect("loads");
    let work = tempfile::tempdir().expect("tempdir");

    // Two full rounds.
    let s = work.path().join("full");
    let summary = run(&s, tiny_config(mdir.path(), 2));
    assert_eq!(summary.rounds_done, 2, "{}", summary.stopped);
    assert_eq!(summary.stopped, Stopped::Reached(2));
    assert_eq!(summary.points.len(), 3, "base + two rounds");
    let layout = SessionDir::new(&s);
    let log = events(&s);
    for round in [1, 2] {
        let rd = layout.round(round);
        let heal = rd.heal();
        let mut files = vec![
            rd.vector().abs,
            rd.dose().abs,
            rd.walkdown().abs,
            rd.completions(0).abs,
            rd.decisions().abs,
            rd.accepted().abs,
            rd.gate_q0().abs,
            heal.adapter().join("adapter_config.json"),
            heal.summary(),
            heal.gate_q1_md(),
            heal.gate_q1_json(),
            heal.log(),
            rd.history().abs,
            rd.record().abs,
            rd.eval().abs,
            rd.controls().abs,
        ];
        files.extend(ControlArm::ALL.iter().map(|a| rd.control_dir(a.name()).join(layout::EVAL)));
        for p in files {
            assert!(p.exists(), "missing {}", p.display());
        }
        // Generation writes one scored file per walk-down batch, nothing else: no merged completions file.
        assert!(!rd.dir().join(layout::COMPLETIONS).exists());
        assert!(!rd.dir().join("scored.jsonl").exists());
        let generated: Vec<(usize, String, Vec<String>)> = log
            .iter()
            .filter_map(|e| match e {
                SessionEvent::CompletionsGenerated { round: r, prompt_index, file, ids } if *r == round => {
                    Some((*prompt_index, file.clone(), ids.clone()))
                }
                _ => None,
            })
            .collect();
        assert!(!generated.is_empty(), "round {round} recorded its completions");
        for (i, (part, file, ids)) in generated.iter().enumerate() {
            assert_eq!(*part, i);
            assert_eq!(*file, rd.completions(i).rel);
            let rows: Vec<ScoredCompletion> = std::fs::read_to_string(rd.completions(i).abs)
                .expect("completions file")
                .lines()
                .map(|l| serde_json::from_str(l).expect("a ScoredCompletion"))
                .collect();
            assert_eq!(&rows.iter().map(|r| r.completion.id.clone()).collect::<Vec<_>>(), ids);
        }
        // Headless, the automatic verdicts are gate Q0's decisions, logged as such, one per completion.
        let rows = round_rows(&s, round);
        let mut auto = automatic_decisions(&s, round);
        let mut all: Vec<String> = rows.iter().map(|r| r.completion.id.clone()).collect();
        auto.sort();
        all.sort();
        assert_eq!(auto, all, "round {round}");
        assert!(log.iter().any(|e| matches!(e,
            SessionEvent::GateWritten { round: r, gate: Gate::Q0, passed: true, .. } if *r == round)));
        let keep = log.iter().any(|e| {
            matches!(e, SessionEvent::RoundGate { round: r, gate: Gate::Q2, keep: true, .. } if *r == round)
        });
        assert!(keep, "round {round} was kept at gate Q2");
        let controls: serde_json::Value =
            serde_json::from_slice(&bytes(&rd.controls().abs)).expect("controls.json");
        let arms: Vec<&str> =
            controls.as_array().expect("array").iter().filter_map(|a| a["arm"].as_str()).collect();
        assert_eq!(arms, ["steered", "random", "prompt_only"]);
    }
    // The session itself logs no round until the loop starts one; each round starts once, at its c*.
    assert!(!log.iter().any(|e| matches!(e, SessionEvent::RoundStarted { round: 0, .. })));
    for round in [1, 2] {
        let rec: RoundRecord =
            serde_json::from_slice(&bytes(&layout.round(round).record().abs)).expect("record");
        assert_eq!(c_star_of(&s, round), rec.c_star, "round {round}");
    }
    for p in [
        layout.round(0).eval().abs,
        s.join(layout::PROGRESS_PNG),
        s.join(layout::PROGRESS_SVG),
        s.join(layout::GATE_Q2),
        layout.rounds_table(),
        layout.lineage(),
    ] {
        assert!(p.exists(), "missing {}", p.display());
    }
    assert!(bytes(&s.join(layout::PROGRESS_PNG)).starts_with(b"\x89PNG"));
    let svg = String::from_utf8(bytes(&s.join(layout::PROGRESS_SVG))).expect("utf8");
    assert!(svg.contains("<svg"));
    // The control arms travel with their round into rounds.json, the map and gate-q2.md.
    let gate = std::fs::read_to_string(s.join(layout::GATE_Q2)).expect("gate-q2.md");
    assert!(gate.contains("## Control arms"), "{gate}");
    for p in &summary.points[1..] {
        let arms: Vec<ControlArm> = p.controls.iter().map(|c| c.arm).collect();
        assert_eq!(arms, ControlArm::ALL.to_vec(), "round {}", p.round);
        for c in &p.controls {
            assert_eq!(c.n, p.n, "the arms score the same items");
            assert!(gate.contains(&format!("| {} | {} |", p.round, c.arm.name())), "{gate}");
            if c.on_map() {
                assert!(svg.contains(&format!("\n{}\n</text>", c.arm.legend())), "svg lacks {:?}", c.arm);
            }
        }
    }
    assert!(summary.points[0].controls.is_empty(), "the base has no control arms");
    // Every point carries its 95 % intervals; every round its paired differences from the base and from the
    // model it started from; every control arm its own, arm − round, and (random, prompt-only) steered − arm.
    use steer_heal::eval::Stat;
    for p in &summary.points {
        let iv = p.ci[&Stat::PAnsAny];
        assert!(iv.lo <= iv.value && iv.value <= iv.hi && iv.resamples > 0, "round {}: {iv:?}", p.round);
        if p.round > 0 {
            assert!(p.vs_base.contains_key(&Stat::Authority) && p.vs_prev.contains_key(&Stat::Authority));
            assert_eq!(p.prev.as_deref(), Some(if p.round == 1 { "base" } else { "r1" }));
            for c in &p.controls {
                assert!(c.ci.contains_key(&Stat::Care) && c.vs_round.contains_key(&Stat::Care));
                assert_eq!(c.steered_minus.is_empty(), c.arm == ControlArm::Steered);
            }
        }
    }
    // The round's eval.json holds its own intervals, the same ones the table shows.
    let r1 = EvalReport::load(&layout.round(1).eval_dir()).expect("eval");
    assert_eq!(r1.intervals, summary.points[1].ci);
    assert!(gate.contains("Every value is shown as `value [95 % interval]`"), "{gate}");
    for p in &summary.points {
        let g: steer_heal::heal::gate::GateQ1 = match p.round {
            0 => continue,
            r => serde_json::from_slice(&bytes(&layout.round(r as u32).heal().gate_q1_json()))
                .expect("gate-q1"),
        };
        assert!(g.intervals.is_some_and(|iv| iv.prompts == g.samples.len()), "round {}", p.round);
    }
    // `report` rewrites the summaries from the artifacts alone: the same table, byte for byte, and a gate-Q1
    // report written without intervals gets them back from its sample pairs.
    let table = bytes(&layout.rounds_table());
    let q1 = layout.round(1).heal().gate_q1_json();
    let mut g: serde_json::Value = serde_json::from_slice(&bytes(&q1)).expect("json");
    let want = g["intervals"].clone();
    g.as_object_mut().expect("object").remove("intervals");
    std::fs::write(&q1, serde_json::to_vec(&g).expect("json")).expect("write");
    std::fs::remove_file(s.join(layout::GATE_Q2)).expect("rm");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"))
        .args(["report", "--session"])
        .arg(&s)
        .args(["--floor", "0"])
        .output()
        .expect("run report");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("gate Q1 intervals added") && out.contains("Verdict"), "{out}");
    assert_eq!(bytes(&layout.rounds_table()), table, "report recomputes the same rounds table");
    assert!(s.join(layout::GATE_Q2).exists());
    let back: serde_json::Value = serde_json::from_slice(&bytes(&q1)).expect("json");
    assert_eq!(back["intervals"], want, "gate-Q1 intervals recomputed from the sample pairs");
    // The iterate screen's eval samples read from a round's real eval.json: both items, with their vignette
    // text, a forced think of at most 4 tokens and, where both frames answered, a seven-way distribution.
    let report = EvalReport::load(&layout.round(1).eval_dir()).expect("eval");
    let samples = pick_samples(&report, SAMPLES_PER_ROUND);
    assert_eq!(samples.len(), 2);
    for smp in &samples {
        assert!(!smp.text.is_empty() && smp.think_tokens <= 4 && smp.cases.len() == 2, "{smp:?}");
        if let Some(p) = smp.p {
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{p:?}");
        }
    }
    // Lineage: round 2 descends from round 1 and carries its adapter.
    let rec2: RoundRecord =
        serde_json::from_slice(&bytes(&layout.round(2).record().abs)).expect("round record");
    assert_eq!(rec2.parent, 1);
    assert_eq!(rec2.history.len(), 2);
    assert_eq!(rec2.history[0].dir, layout.round(1).heal().adapter());
    assert!(rec2.history[0].dir.ends_with("round-01/heal/adapter"));
    assert_eq!(rec2.vector_sha256.len(), 64);
    assert!(rec2.cos_teacher_r0.is_some_and(|c| c.abs() <= 1.0 + 1e-9));
    assert!(rec2.cos_student_teacher.is_some_and(|c| c.is_finite()));
    // Gate Q1's columns: the student before round 1's heal is the base (KL exactly 0); before round 2's heal it
    // carries round 1's adapter, so it has moved off the base.
    for (round, moved) in [(1, false), (2, true)] {
        let g: steer_heal::heal::gate::GateQ1 =
            serde_json::from_slice(&bytes(&layout.round(round).heal().gate_q1_json())).expect("gate-q1.json");
        assert!(!g.samples.is_empty());
        for p in &g.samples {
            let before = p.before_heat.as_ref().expect("before heat");
            let after = p.after_heat.as_ref().expect("after heat");
            assert_eq!(before.tokens.len(), before.kl.len());
            assert_eq!(after.tokens.len(), after.kl.len());
            assert!(before.persona_gain.is_some() && after.kl_mean.is_some_and(|k| k.is_finite()));
            assert_eq!(before.kl.iter().any(|k| *k != 0.0), moved, "round {round}: {:?}", before.kl);
            if p.teacher.is_some() {
                let t = p.teacher_heat.as_ref().expect("teacher heat");
                assert!(
                    t.kl.len() == t.tokens.len() && t.persona_gain.is_some_and(f64::is_finite),
                    "{round}"
                );
            }
        }
    }
    let kl = summary.points.iter().map(|p| p.kl_spent.expect("kl")).collect::<Vec<_>>();
    assert!(kl[2] >= kl[1] && kl[1] >= kl[0], "cumulative KL never falls: {kl:?}");
    // Per round: extract, dose, generate, gate Q0, heal, bake, (the base's eval, once, before round 1's), eval,
    // controls.
    let full_stages = stage_events(&s);
    use Stage::*;
    let round = |r: u32| [Extract, Dose, Generate, GateQ0, Heal, Bake].into_iter().map(move |st| (r, st));
    let mut want: Vec<(u32, Stage)> = round(1).collect();
    want.extend([(0, Eval), (1, Eval), (1, Controls)]);
    want.extend(round(2));
    want.extend([(2, Eval), (2, Controls)]);
    assert_eq!(full_stages, want);
    assert_eq!(full_stages.len(), 1 + 2 * 8);

    // Rollback to round 1 drops round 2 from the student; fork from the base empties the chain; neither erases.
    {
        let mut o = Session::open(&s).expect("open session");
        assert!(rollback(&mut o, 7).is_err(), "round 7 was never kept");
        rollback(&mut o, 1).expect("rollback");
        assert_eq!(o.state.lineage.chain, vec![1]);
        fork(&mut o, 0, "alt").expect("fork");
        let l: &Lineage = &o.state.lineage;
        assert!(l.chain.is_empty());
        assert_eq!(l.branch, "alt");
        assert_eq!(l.parent, 0);
        assert_eq!(l.verdicts.len(), 2, "judged rounds stay visible");
        assert!(l.abandoned.contains(&1) && l.abandoned.contains(&2));
        // Both moves are in the log: a reopened session and the status reader fold the same lineage.
        assert_eq!(&steer_heal::session::read_saved(&s).expect("read the log").lineage, l);
        let (_, status) = read_status(&s).expect("status");
        assert_eq!(&status, l);
        assert!(layout.round(2).eval().abs.exists(), "a rollback erases nothing");
    }

    // Crash right after round 1's heal, with a torn last line in the log.
    let c = work.path().join("crash");
    let cl = SessionDir::new(&c);
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, Stage::Heal));
    let stopped = run(&c, cfg);
    assert_eq!(stopped.stopped, Stopped::StopAfter(1, Stage::Heal));
    assert!(stopped.stopped.to_string().contains("stopped after round 1 heal"), "{}", stopped.stopped);
    assert_eq!(stopped.rounds_done, 0);
    assert!(!cl.round(1).eval().abs.exists());
    assert!(!cl.round(0).eval().abs.exists(), "the base's eval comes after round 1's bake");
    let vector_before = bytes(&cl.round(1).vector().abs);
    let completions_before = bytes(&cl.round(1).completions(0).abs);
    let accepted_before = bytes(&cl.round(1).accepted().abs);
    let adapter_before = bytes(&cl.round(1).heal().adapter().join("adapter_model.safetensors"));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(cl.events()).expect("log");
        f.write_all(br#"{"v":2,"seq":999,"at":"x","kind":"stage_do"#).expect("torn write");
    }
    let resumed = run(&c, tiny_config(mdir.path(), 1));
    assert_eq!(resumed.rounds_done, 1, "{}", resumed.stopped);
    assert_eq!(resumed.stopped, Stopped::Reached(1));
    // Finished stages were skipped: their artifacts are byte-identical and each stage event is there once.
    assert_eq!(bytes(&cl.round(1).vector().abs), vector_before);
    assert_eq!(bytes(&cl.round(1).completions(0).abs), completions_before);
    assert_eq!(bytes(&cl.round(1).accepted().abs), accepted_before);
    assert_eq!(bytes(&cl.round(1).heal().adapter().join("adapter_model.safetensors")), adapter_before);
    let crash_stages = stage_events(&c);
    let full_round1: Vec<(u32, Stage)> = full_stages.iter().filter(|(r, _)| *r <= 1).cloned().collect();
    assert_eq!(crash_stages, full_round1, "same stages, each once, in order");
    c_star_of(&c, 1);
    for p in [
        cl.round(1).eval().abs,
        cl.round(1).record().abs,
        c.join(layout::PROGRESS_PNG),
        c.join(layout::PROGRESS_SVG),
        c.join(layout::GATE_Q2),
    ] {
        assert!(p.exists(), "missing {} after resume", p.display());
    }

    // The TUI worker runs the loop on the session it shares: the runner locks it only for each read or append,
    // so the researcher's own events (here one per log line) reach the log while the round runs, and the log
    // stays one consecutive sequence.
    let opened = Session::open(&c).expect("open session");
    let shared = std::sync::Mutex::new(opened.session);
    let mut progress = Silent::default();
    let mut meanwhile = 0usize;
    let (again, student) = {
        let mut obs = LogTo(|_: &str| {
            let mut s =
                shared.try_lock().expect("the runner holds the session only while it reads or writes");
            s.append(SessionEvent::DoseChanged { round: 0, dose: 1.0 }).expect("append meanwhile");
            meanwhile += 1;
        });
        let mut r = Runner::with_session(&shared, tiny_config(mdir.path(), 2), None, &mut progress, &mut obs)
            .expect("runner");
        let summary = r.run().expect("run");
        (summary, r.into_student())
    };
    assert_eq!(again.rounds_done, 2, "{}", again.stopped);
    let events = logged(&c);
    let seqs: Vec<u64> = events.iter().map(|l| l.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let first_meanwhile =
        events.iter().position(|l| matches!(l.event, SessionEvent::DoseChanged { .. })).expect("written");
    let last_round2 = events
        .iter()
        .rposition(|l| matches!(&l.event, SessionEvent::StageDone { round: 2, .. }))
        .expect("round 2 ran");
    assert!(meanwhile > 1 && first_meanwhile < last_round2, "the researcher's events waited for the round");
    // The runner hands on the student it healed (round 2 on top of round 1), for the worker to keep.
    let student = student.expect("the runner keeps the student");
    assert_eq!(student.chain, vec![1, 2]);
    // A finished run redoes nothing.
    let stages = stage_events(&c);
    let mut obs = Quiet;
    let done =
        Runner::with_session(&shared, tiny_config(mdir.path(), 2), Some(student), &mut progress, &mut obs)
            .expect("runner")
            .run()
            .expect("run");
    assert_eq!(done.stopped, Stopped::Reached(2));
    assert_eq!(stage_events(&c), stages, "a finished run redoes nothing");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

fn accepted_in(path: &Path) -> Vec<Completion> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Completion>(l).expect("completion"))
        .collect()
}

fn ids_in(path: &Path) -> Vec<String> {
    accepted_in(path).into_iter().map(|c| c.id).collect()
}

/// What a run reports as it goes: rounds starting, completions as they are written, heal steps.
#[derive(Default)]
struct Seen {
    started: Vec<(u32, f64)>,
    completions: Vec<(u32, usize, String, Vec<ScoredCompletion>)>,
    steps: Vec<(u32, StepRecord)>,
}

impl RunObserver for Seen {
    fn round_started(&mut self, round: u32, c_star: f64) {
        self.started.push((round, c_star));
    }
    fn completions(&mut self, round: u32, part: usize, file: &str, rows: &[ScoredCompletion]) {
        self.completions.push((round, part, file.to_string(), rows.to_vec()));
    }
    fn heal_step(&mut self, round: u32, step: &StepRecord) {
        self.steps.push((round, step.clone()));
    }
}

/// What a replay the researcher adopted looks like: the tokens from `at` on resampled (here: each the next id
/// of the vocabulary), a rewind recorded at half the dose.
fn replayed(orig: &ScoredCompletion, at: usize, tok: &Tokenizer) -> ScoredCompletion {
    let vocab = tok.get_vocab_size(true) as u32;
    let mut r = orig.clone();
    let c = &mut r.completion;
    for t in &mut c.tokens[at..] {
        *t = (*t + 1) % vocab;
    }
    for (i, t) in c.tokens.iter().enumerate().skip(at) {
        c.token_text[i] = tok.decode(&[*t], false).expect("decode");
    }
    c.text = format!("{} [replayed]", tok.decode(&c.tokens, false).expect("decode"));
    c.rewinds.push(Rewind { at, from_dose: c.dose, to_dose: c.dose * 0.5, cause: "manual".into() });
    r
}

#[test]
fn the_researchers_gate_q0_decisions_are_what_heal_trains_on_and_gate_q1_keeps_or_drops_the_round() {
    let mdir = tempfile::tempdir().expect("tempdir");
    tiny_with_answer_words(mdir.path());
    let tok = Tokenizer::from_file(mdir.path().join("tokenizer.json")).expect("tokenizer");
    let work = tempfile::tempdir().expect("tempdir");
    let s = work.path().join("researcher");
    let layout = SessionDir::new(&s);
    let rd = layout.round(1);
    let researcher = |rounds: u32| {
        let mut c = tiny_config(mdir.path(), rounds);
        c.gates = GateMode::Researcher;
        // The probe's two pass; one top-up batch of two more makes four completions in two files.
        c.walk.min_keep = 3;
        c
    };

    // The run generates round 1 and waits for the researcher's gate Q0; nothing is decided for them. Each batch
    // reaches the observer as it is written.
    let mut progress = Silent::default();
    let mut seen = Seen::default();
    let first = runner(&s, researcher(1), &mut progress, &mut seen).run().expect("run");
    assert_eq!(first.stopped, Stopped::AwaitingGateQ0(1));
    assert_eq!(first.rounds_done, 0);
    assert!(first.stopped.to_string().contains("waiting for gate Q0"), "{}", first.stopped);
    assert!(rd.completions(0).abs.exists() && rd.completions(1).abs.exists());
    assert!(!rd.accepted().abs.exists() && !rd.decisions().abs.exists());
    assert!(automatic_decisions(&s, 1).is_empty());
    let stages = stage_events(&s);
    assert_eq!(stages, [(1, Stage::Extract), (1, Stage::Dose), (1, Stage::Generate)]);
    // Running again while the gate is not passed waits again and generates nothing new.
    let n_events = events(&s).len();
    assert_eq!(run(&s, researcher(1)).stopped, Stopped::AwaitingGateQ0(1));
    assert_eq!(stage_events(&s), stages);
    let generated = |session: &Path| {
        events(session).iter().filter(|e| matches!(e, SessionEvent::CompletionsGenerated { .. })).count()
    };
    let n_generated = generated(&s);
    assert!(n_generated >= 2, "a probe and a top-up batch: {n_generated}");
    assert_eq!(events(&s).len(), n_events, "the waiting run logs nothing");
    assert_eq!(seen.started, vec![(1, c_star_of(&s, 1))]);
    assert_eq!(seen.completions.len(), n_generated);
    for (i, (round, part, file, rows)) in seen.completions.iter().enumerate() {
        assert_eq!((*round, *part), (1, i));
        assert_eq!(*file, rd.completions(i).rel);
        let on_disk: Vec<ScoredCompletion> = std::fs::read_to_string(rd.completions(i).abs)
            .expect("completions file")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a ScoredCompletion"))
            .collect();
        assert_eq!(rows, &on_disk, "part {i}");
    }
    assert!(seen.steps.is_empty(), "nothing healed yet");
    let headless = work.path().join("headless");
    copy_dir(&s, &headless);

    // The researcher decides: accept the first completion (with a tag and a note); accept the second, undo that
    // and reject it; accept the third and adopt a replay of it; leave the fourth undecided. Then pass gate Q0.
    let rows = round_rows(&s, 1);
    assert!(rows.len() >= 4, "the tiny walk-down keeps {} completions", rows.len());
    let ids: Vec<String> = rows.iter().map(|r| r.completion.id.clone()).collect();
    let at = rows[2].completion.tokens.len() / 2;
    assert!(at >= 1, "the third completion has {} tokens", rows[2].completion.tokens.len());
    let replay = replayed(&rows[2], at, &tok);
    assert_ne!(replay.completion.tokens, rows[2].completion.tokens);
    {
        let mut o = Session::open(&s).expect("open");
        let decide = |id: &str, decision| SessionEvent::Decision {
            round: 1,
            completion: id.into(),
            decision,
            tags: vec![],
            note: None,
        };
        for e in [
            SessionEvent::Decision {
                round: 1,
                completion: ids[0].clone(),
                decision: DecisionKind::Accept,
                tags: vec!["on-persona".into()],
                note: Some("reads right".into()),
            },
            decide(&ids[1], DecisionKind::Accept),
            decide(&ids[1], DecisionKind::Undo),
            decide(&ids[1], DecisionKind::Reject),
            decide(&ids[2], DecisionKind::Accept),
        ] {
            o.session.append(e).expect("append");
        }
        let file = rd.replay(&ids[2], 1);
        let bytes = serde_json::to_vec(&replay).expect("json");
        let adopted = SessionEvent::ReplayAdopted {
            round: 1,
            completion: ids[2].clone(),
            file: file.rel.clone(),
            at,
            dose: replay.completion.dose * 0.5,
        };
        o.session.write_artifact(&file.rel, &bytes, adopted).expect("replay");
        let gate = rd.gate_q0();
        let passed =
            SessionEvent::GateWritten { round: 1, gate: Gate::Q0, file: gate.rel.clone(), passed: true };
        o.session.write_artifact(&gate.rel, b"# Gate Q0\n", passed).expect("gate q0");
    }

    // The next run heals on exactly those decisions, streams its steps, and waits for gate Q1.
    let mut seen = Seen::default();
    let healed = runner(&s, researcher(1), &mut progress, &mut seen).run().expect("run");
    assert_eq!(healed.stopped, Stopped::AwaitingGateQ1(1));
    assert_eq!(healed.rounds_done, 0);
    assert!(healed.stopped.to_string().contains("gate Q1"), "{}", healed.stopped);
    let accepted = accepted_in(&rd.accepted().abs);
    assert_eq!(
        accepted.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![ids[0].clone(), ids[2].clone()]
    );
    assert_eq!(accepted[0], rows[0].completion);
    assert_eq!(accepted[1], replay.completion, "the adopted replay replaces its original");
    let c_star = c_star_of(&s, 1);
    assert!(c_star > 0.0);
    for c in &accepted {
        assert!(c.dose > 0.0, "{}: dose {}", c.id, c.dose);
        assert!(
            (c.dose - c.alpha * c_star).abs() <= 1e-9 * c_star,
            "{}: dose {} alpha {}",
            c.id,
            c.dose,
            c.alpha
        );
    }
    // decisions.jsonl: the current decision of every decided completion (the undecided fourth is not there),
    // with the researcher's tags and note.
    let decisions: Vec<serde_json::Value> = std::fs::read_to_string(rd.decisions().abs)
        .expect("decisions")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let calls: Vec<(String, bool)> = decisions
        .iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v["keep"].as_bool().expect("keep")))
        .collect();
    assert_eq!(calls, vec![(ids[0].clone(), true), (ids[1].clone(), false), (ids[2].clone(), true)]);
    assert_eq!(decisions[0]["tags"], serde_json::json!(["on-persona"]));
    assert_eq!(decisions[0]["note"], "reads right");
    let logged_steps = read_step_log(&rd.heal().log()).expect("step log");
    // Two examples, one epoch, no accumulation: two optimiser steps.
    assert_eq!(logged_steps.iter().map(|r| r.total_steps).collect::<Vec<_>>(), vec![2, 2]);
    assert_eq!(seen.steps, logged_steps.iter().map(|r| (1, r.clone())).collect::<Vec<_>>());
    assert!(automatic_decisions(&s, 1).is_empty(), "the researcher's decisions are not overwritten");
    assert!(rd.heal().gate_q1_md().exists() && rd.heal().gate_q1_json().exists());
    assert!(!rd.eval().abs.exists() && !rd.record().abs.exists());
    let g: steer_heal::heal::gate::GateQ1 =
        serde_json::from_slice(&bytes(&rd.heal().gate_q1_json())).expect("gate-q1.json");
    assert!(
        g.notes.iter().any(|n| n.contains("2 accepted completions from the researcher's gate Q0")),
        "{:?}",
        g.notes
    );
    // Waiting for gate Q1 does not heal again.
    let adapter = bytes(&rd.heal().adapter().join("adapter_model.safetensors"));
    let stages = stage_events(&s);
    assert_eq!(run(&s, researcher(1)).stopped, Stopped::AwaitingGateQ1(1));
    assert_eq!(stage_events(&s), stages);
    assert_eq!(bytes(&rd.heal().adapter().join("adapter_model.safetensors")), adapter);
    let dropped = work.path().join("dropped");
    copy_dir(&s, &dropped);

    // Keep at gate Q1: the next run bakes, evaluates (the base first) and judges the round.
    Session::open(&s)
        .expect("open")
        .session
        .append(SessionEvent::RoundGate { round: 1, gate: Gate::Q1, keep: true, note: Some("healed".into()) })
        .expect("append");
    let kept = run(&s, researcher(1));
    assert_eq!(kept.stopped, Stopped::Reached(1));
    assert_eq!(kept.rounds_done, 1);
    assert_eq!(kept.points.len(), 2, "base + round 1");
    assert!(rd.eval().abs.exists() && layout.round(0).eval().abs.exists() && rd.record().abs.exists());
    assert!(events(&s)
        .iter()
        .any(|e| matches!(e, SessionEvent::RoundGate { round: 1, gate: Gate::Q2, keep: true, .. })));
    let lineage = Session::open(&s).expect("open").state.lineage;
    assert_eq!(lineage.chain, vec![1]);
    assert_eq!(lineage.q1.get(&1), Some(&true));

    // Those decisions were round 1's: round 2, headless, takes the automatic verdicts of its own completions.
    let mut cfg = tiny_config(mdir.path(), 2);
    cfg.stop_after = Some((2, Stage::GateQ0));
    assert_eq!(run(&s, cfg).stopped, Stopped::StopAfter(2, Stage::GateQ0));
    let rows2 = round_rows(&s, 2);
    let keeps2: Vec<String> =
        rows2.iter().filter(|r| r.score.verdict == Verdict::Keep).map(|r| r.completion.id.clone()).collect();
    assert!(!keeps2.is_empty());
    assert_eq!(ids_in(&layout.round(2).accepted().abs), keeps2);
    assert_eq!(automatic_decisions(&s, 2).len(), rows2.len());
    assert!(automatic_decisions(&s, 1).is_empty());
    assert!(layout.round(2).gate_q0().abs.exists());

    // Drop at gate Q1 instead: the round is judged without an eval and the next run starts round 2.
    let dl = SessionDir::new(&dropped);
    Session::open(&dropped)
        .expect("open")
        .session
        .append(SessionEvent::RoundGate {
            round: 1,
            gate: Gate::Q1,
            keep: false,
            note: Some("drifted".into()),
        })
        .expect("append");
    let one = run(&dropped, researcher(1));
    assert_eq!(one.stopped, Stopped::Reached(1), "a dropped round counts as judged");
    assert_eq!(one.rounds_done, 1);
    let next = run(&dropped, researcher(2));
    assert_eq!(next.stopped, Stopped::AwaitingGateQ0(2));
    assert_eq!(next.rounds_done, 1);
    assert!(next.points.is_empty(), "nothing was evaluated: {:?}", next.points);
    assert!(!dl.round(1).eval().abs.exists() && !dl.round(1).record().abs.exists());
    assert!(dl.round(2).completions(0).abs.exists());
    c_star_of(&dropped, 2);
    let stages = stage_events(&dropped);
    assert!(!stages.iter().any(|(r, st)| *r == 1 && matches!(st, Stage::Bake | Stage::Eval)), "{stages:?}");
    let lineage = Session::open(&dropped).expect("open").state.lineage;
    assert_eq!(lineage.verdicts.get(&1), Some(&(false, Some("drifted".to_string()))));
    assert!(lineage.chain.is_empty());
    assert_eq!(lineage.parent, 0);

    // Headless on the copy taken before the researcher decided: the automatic verdicts decide, logged as such,
    // from the completions already generated.
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, Stage::GateQ0));
    assert_eq!(run(&headless, cfg).stopped, Stopped::StopAfter(1, Stage::GateQ0));
    assert_eq!(generated(&headless), n_generated, "nothing was generated again");
    let want: Vec<String> =
        rows.iter().filter(|r| r.score.verdict == Verdict::Keep).map(|r| r.completion.id.clone()).collect();
    let hl = SessionDir::new(&headless);
    assert_eq!(ids_in(&hl.round(1).accepted().abs), want);
    assert_eq!(automatic_decisions(&headless, 1).len(), rows.len());
    assert!(hl.round(1).gate_q0().abs.exists());
    assert!(events(&headless)
        .iter()
        .any(|e| matches!(e, SessionEvent::GateWritten { round: 1, gate: Gate::Q0, passed: true, .. })));
}

/// The GPU's default dtype on the CPU: a whole headless round with bf16 weights (extract, dose, generate, heal
/// with its f32 adapter, bake, eval) through the non-fused paths a GPU takes.
#[test]
fn a_whole_round_runs_with_bf16_weights() {
    let d = tempfile::tempdir().expect("tempdir");
    let model = d.path().join("tiny");
    make_tiny_model(Arch::Llama, &model, 3).expect("tiny");
    let session = d.path().join("s");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"))
        .args(["--dtype", "bf16", "run", "--session"])
        .arg(&session)
        .arg("--model")
        .arg(&model)
        .args(common::FAST_TINY_ROUND)
        .args(["--extract-pairs", "4"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (points, lineage) = read_status(&session).expect("status");
    assert_eq!(lineage.chain, vec![1], "round 1 healed and kept");
    assert!(points.iter().all(|p| p.authority.is_finite()), "{points:?}");
}

/// One owner of "passes": the walk-down counts by gate Q0's filter. With the session's repetition threshold at its
/// default, the tiny model's gibberish is judged by exactly the score cards written beside it (the old tail
/// perplexity check, opened here, passed all of it), the dose walks down while too few pass, and gate Q0 accepts
/// what the filter kept.
#[test]
fn the_walk_down_counts_what_gate_q0s_filter_keeps() {
    let mdir = tempfile::tempdir().expect("tempdir");
    tiny_with_answer_words(mdir.path());
    let work = tempfile::tempdir().expect("tempdir");
    let s = work.path().join("filter");
    let th = FilterThresholds { max_perplexity: 1e30, ..FilterThresholds::default() };
    let open = |cfg: RoundsConfig, progress: &mut Silent| {
        let model = cfg.model.clone();
        let mut obs = Quiet;
        let manifest = |p: &steer_heal::steer::Persona| {
            new_manifest(&s, &model, None, None, generation_for(p, Some(2), 8), Some(th.clone()))
        };
        Runner::open(&s, cfg, manifest, progress, &mut obs).expect("open").run()
    };
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, Stage::Generate));
    let walk = cfg.walk;
    let mut progress = Silent::default();
    open(cfg, &mut progress).expect("generate");

    let rd = SessionDir::new(&s).round(1);
    let report: steer_heal::steer::walkdown::WalkDownReport =
        serde_json::from_str(&std::fs::read_to_string(&rd.walkdown().abs).expect("walkdown.json"))
            .expect("json");
    let session = Session::open(&s).expect("open");
    let rows = session.session.load_round(&session.state.rounds[&1]).expect("rows");
    drop(session); // the session lock: the run below opens it again
    assert_eq!(report.verdicts.len(), rows.len(), "every written completion was judged once");
    for (id, v) in &report.verdicts {
        let row = rows.iter().find(|r| &r.completion.id == id).expect("a judged completion is on disk");
        assert_eq!(v.pass, row.score.verdict == Verdict::Keep, "{id}: {v:?} vs {:?}", row.score.reasons);
    }
    let keep: Vec<String> =
        rows.iter().filter(|r| r.score.verdict == Verdict::Keep).map(|r| r.completion.id.clone()).collect();
    assert_eq!(report.kept, keep.len().min(walk.max_keep));
    let repetitive =
        rows.iter().filter(|r| r.score.has_reason(steer_heal::score::ReasonKind::Repetition)).count();
    assert!(repetitive > 0, "the default repetition threshold drops some of the tiny model's text");
    // A probe below the target pass fraction lowers the dose for the next one, down to the floor.
    for w in report.steps.windows(2) {
        let failed = (w[0].passed as f64) < walk.target_pass * w[0].n as f64;
        if w[0].phase == "probe" && failed && w[0].kappa > walk.floor + 1e-12 {
            assert!(w[1].kappa < w[0].kappa, "{:?}", report.steps);
        }
    }

    // Gate Q0 (automatic) accepts exactly the filter's keeps, or says it kept none.
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, Stage::GateQ0));
    let mut progress = Silent::default();
    match open(cfg, &mut progress) {
        Ok(_) => assert_eq!(ids_in(&rd.accepted().abs), keep),
        Err(e) => assert!(keep.is_empty() && e.to_string().contains("accepted none"), "{e}"),
    }
}
