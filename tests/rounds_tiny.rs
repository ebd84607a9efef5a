//! The rounds loop end to end on a tiny random model: two full headless rounds write every artifact and the
//! lineage; a run stopped right after a round's heal stage (a simulated crash, plus a torn last log line) resumes
//! to the same end state without redoing finished stages; rollback and fork move the lineage; with the human gate
//! on, heal trains on the researcher's accepted completions.

use candle_core::{DType, Device};
use std::path::Path;
use steer_heal::eval::{pick_samples, ControlArm, EvalReport, FOUNDATIONS, SAMPLES_PER_ROUND};
use steer_heal::heal::train::read_step_log;
use steer_heal::heal::StepRecord;
use steer_heal::model::tiny::{make_tiny_model, random_weights};
use steer_heal::model::{load_model, Arch, ModelConfig};
use steer_heal::progress::Silent;
use steer_heal::rounds::{
    Lineage, RoundRecord, RoundsConfig, RunSummary, Runner, AUTOMATIC_NOTE, HUMAN_GATE_FILE,
};
use steer_heal::score::{ScoredCompletion, Verdict};
use steer_heal::session::{event::read_log, DecisionKind, Session, SessionEvent};
use steer_heal::steer::Completion;
use tokenizers::{AddedToken, Tokenizer};

/// A tiny model whose tokenizer has the seven answer words as tokens (so tinymfv can score it).
fn tiny_with_answer_words(dir: &Path) {
    make_tiny_model(Arch::Llama, dir, 7).expect("tiny model");
    let tp = dir.join("tokenizer.json");
    let mut tok = Tokenizer::from_file(&tp).expect("tokenizer");
    let words: Vec<AddedToken> = FOUNDATIONS.iter().map(|f| AddedToken::from(f.word(), false)).collect();
    tok.add_tokens(words).expect("add answer words");
    tok.save(&tp, true).expect("save tokenizer");
    let cp = dir.join("config.json");
    let mut cfg = ModelConfig::from_hf_json(&cp).expect("config");
    cfg.vocab_size = tok.get_vocab_size(true);
    cfg.max_position_embeddings = 4096;
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).expect("read")).expect("json");
    v["vocab_size"] = cfg.vocab_size.into();
    v["max_position_embeddings"] = cfg.max_position_embeddings.into();
    std::fs::write(&cp, serde_json::to_string_pretty(&v).expect("json")).expect("write config");
    let w = random_weights(&cfg, 11).expect("weights");
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).expect("save weights");
}

fn tiny_config(model: &Path, rounds: u32) -> RoundsConfig {
    let mut c = RoundsConfig::small(model);
    c.rounds = rounds;
    c.floor = 0.0; // a random model puts almost no mass on the answers
    c.extract_pairs = Some(4);
    c.dose_tokens = 4;
    c.dose_prompts = 2;
    c.n_prompts = 2;
    c.max_new_tokens = 8;
    c.walk.probe_n = 2;
    c.walk.batch_n = 2;
    c.walk.min_keep = 2;
    c.walk.max_keep = 4;
    c.walk.max_batches = 1;
    // Random weights write gibberish: open the coherence filters so the loop has data to heal on.
    c.walk_max_ppl = 1e30;
    c.thresholds.max_perplexity = 1e30;
    c.thresholds.max_repetition = 1.01;
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

fn run(session: &Path, cfg: RoundsConfig) -> RunSummary {
    let mut progress = Silent::default();
    let mut log = |_: &str| {};
    Runner::open(session, cfg, &mut progress, &mut log).expect("open").run().expect("run")
}

fn events(session: &Path) -> Vec<SessionEvent> {
    read_log(&session.join("events.jsonl")).expect("log").events.into_iter().map(|l| l.event).collect()
}

fn stage_events(session: &Path) -> Vec<(u32, String)> {
    events(session)
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::StageDone { round, stage, .. } => Some((round, stage)),
            _ => None,
        })
        .collect()
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
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
    assert_eq!(summary.points.len(), 3, "base + two rounds");
    for r in ["round-01", "round-02"] {
        for f in [
            "vector.safetensors",
            "dose.json",
            "completions.jsonl",
            "walkdown.json",
            "scored.jsonl",
            "decisions.jsonl",
            "accepted.jsonl",
            "gate-q0.md",
            "heal/adapter/adapter_config.json",
            "heal/heal.json",
            "heal/gate-q1.md",
            "history.json",
            "round.json",
            "eval/eval.json",
            "controls.json",
            "controls/steered/eval.json",
            "controls/random/eval.json",
            "controls/prompt_only/eval.json",
        ] {
            let p = s.join(r).join(f);
            assert!(p.exists(), "missing {}", p.display());
        }
        let controls: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(s.join(r).join("controls.json")).expect("controls.json"),
        )
        .expect("json");
        let arms: Vec<&str> =
            controls.as_array().expect("array").iter().filter_map(|a| a["arm"].as_str()).collect();
        assert_eq!(arms, ["steered", "random", "prompt_only"]);
    }
    for f in [
        "round-00/eval/eval.json",
        "progress.png",
        "progress.svg",
        "gate-q2.md",
        "rounds.json",
        "lineage.json",
    ] {
        assert!(s.join(f).exists(), "missing {f}");
    }
    assert!(sha(&s.join("progress.png")).starts_with(b"\x89PNG"));
    let svg = String::from_utf8(sha(&s.join("progress.svg"))).expect("utf8");
    assert!(svg.contains("<svg"));
    // The control arms travel with their round into rounds.json, the map and gate-q2.md.
    let gate = std::fs::read_to_string(s.join("gate-q2.md")).expect("gate-q2.md");
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
    // The iterate screen's eval samples read from a round's real eval.json: both items, with their vignette
    // text, a forced think of at most 4 tokens and, where both frames answered, a seven-way distribution.
    let report = EvalReport::load(&s.join("round-01/eval")).expect("eval");
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
        serde_json::from_slice(&sha(&s.join("round-02/round.json"))).expect("round record");
    assert_eq!(rec2.parent, 1);
    assert_eq!(rec2.history.len(), 2);
    assert!(rec2.history[0].dir.ends_with("round-01/heal/adapter"));
    assert_eq!(rec2.vector_sha256.len(), 64);
    assert!(rec2.cos_teacher_r0.is_some_and(|c| c.abs() <= 1.0 + 1e-9));
    assert!(rec2.cos_student_teacher.is_some_and(|c| c.is_finite()));
    // Gate Q1's columns: the student before round 1's heal is the base (KL exactly 0); before round 2's heal it
    // carries round 1's adapter, so it has moved off the base.
    for (r, moved) in [("round-01", false), ("round-02", true)] {
        let g: steer_heal::heal::gate::GateQ1 =
            serde_json::from_slice(&sha(&s.join(r).join("heal/gate-q1.json"))).expect("gate-q1.json");
        assert!(!g.samples.is_empty());
        for p in &g.samples {
            let before = p.before_heat.as_ref().expect("before heat");
            let after = p.after_heat.as_ref().expect("after heat");
            assert_eq!(before.tokens.len(), before.kl.len());
            assert_eq!(after.tokens.len(), after.kl.len());
            assert!(before.persona_gain.is_some() && after.kl_mean.is_some_and(|k| k.is_finite()));
            assert_eq!(before.kl.iter().any(|k| *k != 0.0), moved, "{r}: {:?}", before.kl);
            if p.teacher.is_some() {
                let t = p.teacher_heat.as_ref().expect("teacher heat");
                assert!(t.kl.len() == t.tokens.len() && t.persona_gain.is_some_and(f64::is_finite), "{r}");
            }
        }
    }
    let kl = summary.points.iter().map(|p| p.kl_spent.expect("kl")).collect::<Vec<_>>();
    assert!(kl[2] >= kl[1] && kl[1] >= kl[0], "cumulative KL never falls: {kl:?}");
    let full_stages = stage_events(&s);
    assert_eq!(full_stages.len(), 1 + 2 * 9, "{full_stages:?}");

    // Rollback to round 1 drops round 2 from the student; fork from the base empties the chain; neither erases.
    {
        let mut progress = Silent::default();
        let mut log = |_: &str| {};
        let mut r = Runner::open(&s, tiny_config(mdir.path(), 2), &mut progress, &mut log).expect("open");
        assert!(r.rollback(7).is_err(), "round 7 was never kept");
        r.rollback(1).expect("rollback");
        assert_eq!(r.lineage().chain, vec![1]);
        r.fork(0, "alt").expect("fork");
        let l: Lineage = r.lineage();
        assert!(l.chain.is_empty());
        assert_eq!(l.branch, "alt");
        assert_eq!(l.verdicts.len(), 2, "judged rounds stay visible");
    }

    // Crash right after round 1's heal, with a torn last line in the log.
    let c = work.path().join("crash");
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, "heal".into()));
    let stopped = run(&c, cfg);
    assert!(stopped.stopped.contains("stopped after round 1 heal"), "{}", stopped.stopped);
    assert_eq!(stopped.rounds_done, 0);
    assert!(!c.join("round-01/eval/eval.json").exists());
    let vector_before = sha(&c.join("round-01/vector.safetensors"));
    let adapter_before = sha(&c.join("round-01/heal/adapter/adapter_model.safetensors"));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(c.join("events.jsonl")).expect("log");
        f.write_all(br#"{"v":1,"seq":999,"at":"x","kind":"stage_do"#).expect("torn write");
    }
    let resumed = run(&c, tiny_config(mdir.path(), 1));
    assert_eq!(resumed.rounds_done, 1, "{}", resumed.stopped);
    // Finished stages were skipped: their artifacts are byte-identical and each stage event is there once.
    assert_eq!(sha(&c.join("round-01/vector.safetensors")), vector_before);
    assert_eq!(sha(&c.join("round-01/heal/adapter/adapter_model.safetensors")), adapter_before);
    let crash_stages = stage_events(&c);
    let full_round1: Vec<(u32, String)> = full_stages.iter().filter(|(r, _)| *r <= 1).cloned().collect();
    assert_eq!(crash_stages, full_round1, "same stages, each once, in order");
    for f in ["round-01/eval/eval.json", "round-01/round.json", "progress.png", "progress.svg", "gate-q2.md"]
    {
        assert!(c.join(f).exists(), "missing {f} after resume");
    }

    // The TUI worker runs the loop on the session it shares: the runner locks it only for each read or append,
    // so the researcher's own events (here one per progress line) reach the log while the round runs, and the
    // log stays one consecutive sequence.
    let opened = Session::open(&c).expect("open session");
    let shared = std::sync::Mutex::new(opened.session);
    let mut progress = Silent::default();
    let mut meanwhile = 0usize;
    let mut log = |_: &str| {
        let mut s = shared.try_lock().expect("the runner holds the session only while it reads or writes");
        s.append(SessionEvent::DoseChanged { round: 0, dose: 1.0 }).expect("append meanwhile");
        meanwhile += 1;
    };
    let again = Runner::with_session(&shared, tiny_config(mdir.path(), 2), &mut progress, &mut log)
        .expect("runner")
        .run()
        .expect("run");
    assert_eq!(again.rounds_done, 2, "{}", again.stopped);
    let events = read_log(&c.join("events.jsonl")).expect("log").events;
    let seqs: Vec<u64> = events.iter().map(|l| l.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let first_meanwhile =
        events.iter().position(|l| matches!(l.event, SessionEvent::DoseChanged { .. })).expect("written");
    let last_round2 = events
        .iter()
        .rposition(|l| matches!(&l.event, SessionEvent::StageDone { round: 2, .. }))
        .expect("round 2 ran");
    assert!(meanwhile > 1 && first_meanwhile < last_round2, "the researcher's events waited for the round");
    // A finished run redoes nothing.
    let stages = stage_events(&c);
    let mut log = |_: &str| {};
    Runner::with_session(&shared, tiny_config(mdir.path(), 2), &mut progress, &mut log)
        .expect("runner")
        .run()
        .expect("run");
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

fn ids_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Completion>(l).expect("completion").id)
        .collect()
}

#[test]
fn the_researchers_gate_q0_decisions_are_what_heal_trains_on_and_headless_ignores_them() {
    let mdir = tempfile::tempdir().expect("tempdir");
    tiny_with_answer_words(mdir.path());
    let work = tempfile::tempdir().expect("tempdir");
    let s = work.path().join("human");
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, "score".into()));
    run(&s, cfg);
    // The researcher decides on the gate-Q0 screen (its round 0, the TUI's default): accept the first
    // completion; accept the second, undo that, and reject it (its current decision: reject).
    let rows: Vec<ScoredCompletion> = std::fs::read_to_string(s.join("round-01/scored.jsonl"))
        .expect("scored")
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect();
    assert!(rows.len() >= 2, "the tiny walk-down keeps {} completions", rows.len());
    let auto_keeps = rows.iter().filter(|r| r.score.verdict == Verdict::Keep).count();
    assert!(auto_keeps >= 2, "the open thresholds keep {auto_keeps}");
    let ids: Vec<String> = rows.iter().map(|r| r.completion.id.clone()).collect();
    {
        let mut opened = Session::open(&s).expect("open");
        let decide = |id: &str, decision| SessionEvent::Decision {
            round: 0,
            completion: id.into(),
            decision,
            tags: vec![],
            note: None,
        };
        for e in [
            SessionEvent::CompletionsGenerated {
                round: 0,
                prompt_index: 0,
                file: "round-01/scored.jsonl".into(),
                ids: ids.clone(),
            },
            decide(&ids[0], DecisionKind::Accept),
            decide(&ids[1], DecisionKind::Accept),
            decide(&ids[1], DecisionKind::Undo),
            decide(&ids[1], DecisionKind::Reject),
        ] {
            opened.session.append(e).expect("append");
        }
    }
    let headless = work.path().join("headless");
    copy_dir(&s, &headless);

    // From the TUI (human gate on round 0): round 1 heals on the one accepted completion, and streams its steps.
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.human_gate = Some(0);
    cfg.stop_after = Some((1, "heal".into()));
    let mut progress = Silent::default();
    let mut log = |_: &str| {};
    let mut streamed: Vec<(u32, StepRecord)> = Vec::new();
    let mut sink = |round: u32, r: &StepRecord| streamed.push((round, r.clone()));
    let summary = Runner::open(&s, cfg, &mut progress, &mut log)
        .expect("open")
        .on_heal_step(&mut sink)
        .run()
        .expect("run");
    assert!(summary.stopped.contains("stopped after round 1 heal"), "{}", summary.stopped);
    assert_eq!(ids_in(&s.join("round-01/accepted.jsonl")), vec![ids[0].clone()]);
    let logged = read_step_log(&s.join("round-01/heal/train/log.jsonl")).expect("step log");
    // One example, one epoch, no accumulation: one optimiser step.
    assert_eq!(logged.iter().map(|r| r.total_steps).collect::<Vec<_>>(), vec![1]);
    assert_eq!(streamed, logged.iter().map(|r| (1, r.clone())).collect::<Vec<_>>());
    let automatic = events(&s)
        .iter()
        .filter(|e| matches!(e, SessionEvent::Decision { note: Some(n), .. } if n == AUTOMATIC_NOTE))
        .count();
    assert_eq!(automatic, 0, "the researcher's decisions are not overwritten");
    assert!(s.join("round-01").join(HUMAN_GATE_FILE).exists());

    // Those decisions are used once: round 2, with nothing new decided, takes the automatic verdicts.
    let mut cfg = tiny_config(mdir.path(), 2);
    cfg.human_gate = Some(0);
    cfg.stop_after = Some((2, "gate_q0".into()));
    run(&s, cfg);
    let keeps2: Vec<String> = std::fs::read_to_string(s.join("round-02/scored.jsonl"))
        .expect("scored")
        .lines()
        .map(|l| serde_json::from_str::<ScoredCompletion>(l).expect("row"))
        .filter(|r| r.score.verdict == Verdict::Keep)
        .map(|r| r.completion.id)
        .collect();
    assert_eq!(ids_in(&s.join("round-02/accepted.jsonl")), keeps2);
    assert!(!s.join("round-02").join(HUMAN_GATE_FILE).exists());

    // Headless on the same log: the automatic verdicts decide.
    let mut cfg = tiny_config(mdir.path(), 1);
    cfg.stop_after = Some((1, "gate_q0".into()));
    run(&headless, cfg);
    let want: Vec<String> =
        rows.iter().filter(|r| r.score.verdict == Verdict::Keep).map(|r| r.completion.id.clone()).collect();
    assert_eq!(ids_in(&headless.join("round-01/accepted.jsonl")), want);
}
