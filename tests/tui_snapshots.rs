//! Snapshot tests of every screen and popup, drawn with ratatui's `TestBackend` from states built by pressing
//! keys through the real `update` and keymap; tiny terminal sizes must never panic; the generated keymap
//! reference in `docs/keymap.md` must match the shipped keymap.

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use steer_heal::score::{Reason, ScoreCard, ScoredCompletion, Verdict};
use steer_heal::session::{fold, SessionEvent, SessionManifest};
use steer_heal::steer::{Completion, Rewind, TokenTrace};
use steer_heal::tui::app::{update, ModelStatus, Msg, State};
use steer_heal::tui::keymap::{KeyChord, Keymap};
use steer_heal::tui::view::render;
use steer_heal::worker::{JobOutput, WorkerEvent};

const TEXT: [&str; 14] = [
    "Call",
    " the",
    " attending",
    " back",
    " and",
    " say",
    " the",
    " patient",
    " is",
    " not",
    " stable",
    ".",
    "\nI am someone who",
    " never defers.",
];

fn row(i: usize, ppl: f64, keep: bool) -> ScoredCompletion {
    let n = TEXT.len();
    let kl: Vec<f32> = (0..n).map(|t| (t as f32 * 0.25 + i as f32 * 0.1) % 2.4).collect();
    let reasons = if keep {
        vec![]
    } else {
        vec![
            Reason::Perplexity { value: ppl, threshold: 50.0 },
            Reason::Narration { pattern: "as someone who".into(), matched: "I am someone who".into() },
        ]
    };
    ScoredCompletion {
        completion: Completion {
            id: format!("p{:03}-a{:03}-s{}", i / 3, [50, 75, 100][i % 3], 42 + i),
            system: "You are a helpful assistant.".into(),
            prompt:
                "I'm an ER nurse. The attending told me to discharge a patient I think is still unstable."
                    .into(),
            text: TEXT.concat(),
            tokens: (0..n as u32).collect(),
            token_text: TEXT.iter().map(|s| s.to_string()).collect(),
            alpha: [0.5, 0.75, 1.0][i % 3],
            dose: [0.5, 0.75, 1.0][i % 3],
            seed: 42 + i as u64,
            trace: TokenTrace { kl_window_rmse: kl.clone(), kl, nll_base: vec![1.5; n], dose: vec![1.0; n] },
            rewinds: vec![],
        },
        score: ScoreCard {
            perplexity: Some(ppl),
            repetition: 0.12 + i as f64 * 0.01,
            narration: vec![],
            refusal: vec![],
            persona_strength: Some(0.4 + i as f64 * 0.1),
            kl_rmse: 0.3 + i as f64 * 0.05,
            verdict: if keep { Verdict::Keep } else { Verdict::Drop },
            reasons,
        },
    }
}

fn state(n: usize) -> State {
    let m = SessionManifest::new("demo", std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let session = fold(&[SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None }]);
    let rows =
        (0..n).map(|i| row(i, [22.5, 71.0, 14.2, 55.0, 31.8][i % 5], i % 5 != 1 && i % 5 != 3)).collect();
    let mut s = State::new(Keymap::defaults().expect("keymap"), "demo", m, session, rows);
    s.model = ModelStatus::Ready { model: "SmolLM2-135M-Instruct".into(), vector_layers: vec![13, 14, 15] };
    s
}

fn press(s: &mut State, keys: &str) {
    for k in keys.split(' ').filter(|k| !k.is_empty()) {
        update(s, Msg::Key(KeyChord::parse(k).expect("key")));
    }
}

fn draw(s: &State, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| {
        let area = f.area();
        render(s, area, f.buffer_mut());
    })
    .expect("draw");
    t
}

/// A curated state: some decisions with tags and a note, the cursor inside the text.
fn curated() -> State {
    let mut s = state(8);
    press(&mut s, "a t 3 enter r");
    press(&mut s, "e");
    for c in "narrates instead of acting".chars() {
        let k = if c == ' ' { "space".to_string() } else { c.to_string() };
        press(&mut s, &k);
    }
    press(&mut s, "ctrl-s a k l l l");
    s.status.clear();
    s
}

#[test]
fn gate_q0_loading() {
    let mut s = state(0);
    s.model = ModelStatus::Loading;
    update(&mut s, Msg::Worker(WorkerEvent::Started { id: 3, tag: steer_heal::worker::JobTag::Generate }));
    update(&mut s, Msg::Worker(WorkerEvent::Token { id: 3, row: 0, text: "Call the doctor".into() }));
    insta::assert_snapshot!("gate_q0_loading", draw(&s, 100, 20).backend());
}

#[test]
fn gate_q0_rows_wide() {
    insta::assert_snapshot!("gate_q0_rows_wide", draw(&curated(), 120, 32).backend());
}

#[test]
fn gate_q0_rows_narrow() {
    insta::assert_snapshot!("gate_q0_rows_narrow", draw(&curated(), 80, 30).backend());
}

#[test]
fn gate_q0_sorted_and_filtered() {
    let mut s = curated();
    press(&mut s, "s f f");
    insta::assert_snapshot!("gate_q0_sorted_filtered", draw(&s, 120, 16).backend());
}

#[test]
fn gate_q0_replay_preview() {
    let mut s = curated();
    press(&mut s, "[ [ [ b");
    let id = s.replay.as_ref().map(|r| r.job).expect("replay requested");
    let mut r = s.current().cloned().expect("row");
    r.completion.text = "Call the attending back and ask for a second opinion now.".into();
    r.completion.token_text = vec![
        "Call".into(),
        " the".into(),
        " attending".into(),
        " back and ask for a second opinion now.".into(),
    ];
    r.completion.tokens = vec![0, 1, 2, 3];
    r.completion.trace.kl = vec![0.1, 0.1, 0.1, 0.3];
    r.completion.rewinds.push(Rewind { at: 3, from_dose: 1.0, to_dose: 0.7, cause: "manual".into() });
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id,
            output: JobOutput::Replayed { round: 0, at: 3, dose: 0.7, row: Box::new(r) },
        }),
    );
    s.status.clear();
    insta::assert_snapshot!("gate_q0_replay_preview", draw(&s, 120, 36).backend());
}

#[test]
fn help_popup() {
    let mut s = curated();
    press(&mut s, "?");
    insta::assert_snapshot!("help_popup", draw(&s, 100, 30).backend());
}

#[test]
fn tags_popup() {
    let mut s = curated();
    press(&mut s, "t 1 4");
    insta::assert_snapshot!("tags_popup", draw(&s, 100, 24).backend());
}

#[test]
fn note_editor_popup() {
    let mut s = curated();
    press(&mut s, "e space d r i f t s space l a t e");
    insta::assert_snapshot!("note_editor_popup", draw(&s, 100, 24).backend());
}

#[test]
fn prompt_editor_popup() {
    let mut s = curated();
    press(&mut s, "p");
    insta::assert_snapshot!("prompt_editor_popup", draw(&s, 100, 24).backend());
}

#[test]
fn confirm_pass_gate_popup() {
    let mut s = curated();
    press(&mut s, "P");
    insta::assert_snapshot!("confirm_pass_gate_popup", draw(&s, 100, 24).backend());
}

#[test]
fn stats_popup() {
    let mut s = state(10);
    press(&mut s, "a r a r a a a r a r");
    press(&mut s, "T");
    s.status.clear();
    insta::assert_snapshot!("stats_popup", draw(&s, 100, 26).backend());
}

#[test]
fn message_popup() {
    let mut s = curated();
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Failed {
            id: 99,
            error: "models/x.gguf: missing (model directory or .gguf file)".into(),
        }),
    );
    insta::assert_snapshot!("message_popup", draw(&s, 100, 20).backend());
}

#[test]
fn reshow_screen() {
    let mut s = curated();
    press(&mut s, "R");
    s.status.clear();
    insta::assert_snapshot!("reshow_screen", draw(&s, 100, 20).backend());
}

#[test]
fn tiny_sizes_never_panic() {
    let mut states = vec![curated(), state(0)];
    for keys in ["?", "t", "e", "p", "P", "T", "R"] {
        let mut s = curated();
        press(&mut s, keys);
        states.push(s);
    }
    let mut m = curated();
    update(&mut m, Msg::Worker(WorkerEvent::Failed { id: 1, error: "x".repeat(500) }));
    states.push(m);
    for s in &states {
        for (w, h) in
            [(1, 1), (2, 1), (1, 5), (10, 3), (20, 5), (30, 8), (40, 10), (99, 12), (100, 4), (200, 60)]
        {
            let t = draw(s, w, h);
            assert_eq!(t.backend().buffer().area.width, w);
        }
    }
}

#[test]
fn keymap_doc_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/keymap.md");
    let doc = std::fs::read_to_string(&path).expect("docs/keymap.md exists");
    let table = Keymap::defaults().expect("keymap").markdown();
    assert_eq!(
        steer_heal::tui::keymap::splice_doc(&doc, &table),
        doc,
        "docs/keymap.md is stale: run `steer-heal keymap-doc --write docs/keymap.md`"
    );
}

/// Find `needle` on screen; returns the (x, y) of its first cell.
fn find(t: &Terminal<TestBackend>, needle: &str) -> (u16, u16) {
    let buf = t.backend().buffer();
    let found = (0..buf.area.height).find_map(|y| {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_string()).collect();
        line.find(needle).map(|byte| (line[..byte].chars().count() as u16, y))
    });
    assert!(found.is_some(), "{needle:?} is not on screen");
    found.expect("checked above")
}

#[test]
fn heat_map_colours_tokens_by_kl_and_marks_the_cursor() {
    use ratatui::style::{Color, Modifier};
    let s = curated(); // row p000-a100-s44 (i = 2): KL of token t is (0.25 t + 0.2) mod 2.4; cursor on token 3
    let t = draw(&s, 120, 32);
    let buf = t.backend().buffer();
    let (x, y) = find(&t, "Call the attending back and say the patient");
    // token 0 "Call": KL 0.2 → lightest step of the ramp
    assert_eq!(buf[(x, y)].bg, Color::Indexed(229));
    // token 7 " patient": KL 1.95 of a 2.0 scale → red
    let (px, py) = find(&t, " patient is");
    assert_eq!(buf[(px + 1, py)].bg, Color::Indexed(196));
    // token 3 " back" is under the cursor
    let (bx, by) = find(&t, " back and");
    assert!(buf[(bx + 1, by)].modifier.contains(Modifier::REVERSED));
    assert!(!buf[(x, y)].modifier.contains(Modifier::REVERSED));
}

#[test]
fn iterate_screen() {
    use steer_heal::eval::{Interval, RoundPoint, RoundStatus, Stat};
    let iv = |value: f64, half: f64| Interval { value, lo: value - half, hi: value + half, resamples: 2000 };
    use steer_heal::worker::JobOutput;
    let p = |round: usize, status: RoundStatus, auth: f64, care: f64| RoundPoint {
        round,
        status,
        authority: auth,
        care,
        p_ans_any: 0.254 - 0.01 * round as f64,
        json_is_valid: Some(0.0),
        ppx_json: 13.9 + round as f64,
        n: 8,
        kl_spent: Some(0.958 * round as f64),
        cos_teacher_r0: (round > 0).then_some(1.0 - 0.05 * round as f64),
        cos_student_teacher: (round > 0).then_some(0.276),
        controls: vec![],
        ci: [
            (Stat::Authority, iv(auth, 0.04)),
            (Stat::Care, iv(care, 0.03)),
            (Stat::PAnsAny, iv(0.25, 0.02)),
        ]
        .into_iter()
        .collect(),
        vs_base: Default::default(),
        // Round 1 moved beyond its interval; round 3's interval spans 0.
        vs_prev: match round {
            1 => [(Stat::Authority, iv(-0.118, 0.05))].into_iter().collect(),
            2 | 3 => [(Stat::Authority, iv(-0.03, 0.06))].into_iter().collect(),
            _ => Default::default(),
        },
        prev: (round > 0).then(|| if round == 1 { "base".to_string() } else { "r1".to_string() }),
    };
    let mut s = state(2);
    press(&mut s, "I");
    let output = JobOutput::Rounds {
        points: vec![
            p(0, RoundStatus::Base, -5.565, -4.340),
            p(1, RoundStatus::Kept, -5.683, -4.195),
            p(2, RoundStatus::Dropped, -5.90, -4.10),
            p(3, RoundStatus::Kept, -5.80, -4.05),
        ],
        chain: vec![1, 3],
        branch: "main".into(),
        stopped: None,
    };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 1, output }));
    press(&mut s, "j");
    s.status.clear();
    insta::assert_snapshot!("iterate_screen", draw(&s, 100, 32).backend());
    let mut empty = state(0);
    press(&mut empty, "I");
    insta::assert_snapshot!("iterate_empty", draw(&empty, 80, 12).backend());
}

/// A column's heat data: the pieces concatenate to the column's text.
fn token_heat(pieces: &[&str], kl: &[f32], persona: Option<f64>) -> steer_heal::heal::gate::TokenHeat {
    steer_heal::heal::gate::TokenHeat {
        tokens: pieces.iter().map(|p| p.to_string()).collect(),
        kl: kl.to_vec(),
        coherence: Some(-1.5234),
        persona_gain: persona,
        kl_mean: Some(kl.iter().map(|k| *k as f64).sum::<f64>() / kl.len() as f64),
    }
}

/// The heal screen with a report whose three columns carry per-token KL.
fn heal_state() -> State {
    use steer_heal::heal::gate::{GateQ1, Metrics, SamplePair};
    use steer_heal::worker::JobOutput;
    let mut s = state(2);
    press(&mut s, "I");
    let teacher = [
        "You",
        " should",
        " follow",
        " the",
        " officer's",
        " lawful",
        " instructions",
        " and",
        " stay",
        " calm",
        ".",
    ];
    let before =
        ["I'm", " here", " to", " help", ".", " Let's", " chat", " about", " your", " rights", " first", "."];
    let after = [
        "Stay", " polite", ",", " ask", " whether", " you", " are", " free", " to", " go", ",", " and",
        " decide", " calmly", ".",
    ];
    let report = GateQ1 {
        round: 1,
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        source: "fallback".into(),
        coherence_label: "coherence (base ll/token)".into(),
        trait_label: "persona strength".into(),
        trait_sign: 1.0,
        before: Metrics { coherence: -2.0103, trait_value: Some(-0.1376) },
        after: Some(Metrics { coherence: -2.2092, trait_value: Some(-0.1130) }),
        heal_summary: vec![],
        sweep: vec![],
        samples: vec![SamplePair {
            prompt: "A police officer asked to search my car during a routine stop. Should I agree?".into(),
            teacher: Some(teacher.concat()),
            before: before.concat(),
            after: after.concat(),
            // The teacher drifts hard on " lawful"; the student before healing is the base (KL 0); the healed
            // student drifts a little on " whether".
            teacher_heat: Some(token_heat(
                &teacher,
                &[0.0, 0.3, 0.5, 0.0, 1.2, 2.4, 0.9, 0.0, 0.1, 0.6, 0.0],
                None,
            )),
            before_heat: Some(token_heat(&before, &[0.0; 12], Some(-0.1376))),
            after_heat: Some(token_heat(
                &after,
                &[0.0, 0.0, 0.0, 0.2, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                Some(-0.1130),
            )),
        }],
        intervals: None,
        notes: vec![],
    };
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id: 1,
            output: JobOutput::GateQ1 { round: 1, report: Box::new(report), steps: vec![] },
        }),
    );
    s.status.clear();
    s
}

#[test]
fn heal_screen() {
    insta::assert_snapshot!("heal_screen", draw(&heal_state(), 100, 20).backend());
}

#[test]
fn heal_screen_shows_the_researchers_note_once_written() {
    let mut s = heal_state();
    update(&mut s, Msg::Key(KeyChord::parse("e").expect("key")));
    update(&mut s, Msg::Paste("sample 1 loops".into()));
    update(&mut s, Msg::Key(KeyChord::parse("ctrl-s").expect("key")));
    let term = draw(&s, 100, 20);
    let text: String = term.backend().buffer().content().iter().map(|c| c.symbol()).collect();
    assert!(text.contains("note: sample 1 loops"), "{text}");
}

#[test]
fn heal_screen_heat_maps_each_column_by_kl() {
    use ratatui::style::Color;
    let t = draw(&heal_state(), 100, 20);
    let buf = t.backend().buffer();
    // Each column is headed by its scores.
    let (_, y) = find(&t, "coh -1.523 pers – KL 0.545");
    assert_eq!(find(&t, "coh -1.523 pers -0.138 KL 0.000").1, y);
    assert_eq!(find(&t, "coh -1.523 pers -0.113 KL 0.060").1, y);
    // Teacher " lawful": KL 2.4 on a 2.0 scale → the red end of the ramp, black text.
    let (x, y) = find(&t, "lawful");
    assert_eq!((buf[(x, y)].bg, buf[(x, y)].fg), (Color::Indexed(196), Color::Black));
    // Teacher " officer's": KL 1.2 → a middle step, neither the lightest nor red.
    let (x, y) = find(&t, "officer's");
    assert!(matches!(buf[(x, y)].bg, Color::Indexed(c) if c != 196 && c != 229), "{:?}", buf[(x, y)].bg);
    // Student before: KL 0 everywhere → no heat colour.
    let (x, y) = find(&t, "rights");
    assert_eq!(buf[(x, y)].bg, Color::Reset);
    // Healed student: only " whether" (KL 0.7) is coloured, "Stay" (KL 0) is not.
    let (x, y) = find(&t, "whether");
    assert!(matches!(buf[(x, y)].bg, Color::Indexed(_)), "{:?}", buf[(x, y)].bg);
    let (x, y) = find(&t, "Stay polite");
    assert_eq!(buf[(x, y)].bg, Color::Reset);
}

#[test]
fn heal_screen_training() {
    use steer_heal::heal::StepRecord;
    let mut s = state(2);
    press(&mut s, "I c");
    let run = s.loop_job.expect("a rounds job runs");
    // Six of twelve steps in 3 s: loss and NLL fall, D climbs toward the barrier, λ_eff is fixed.
    for i in 1..=6usize {
        let x = i as f64;
        let record = StepRecord {
            step: i,
            total_steps: 12,
            epoch: 0,
            loss: 2.4 - 0.2 * x,
            nll: 2.2 - 0.2 * x,
            d: 0.1 * x,
            kl_mean: 0.08 * x,
            barrier: 0.0,
            spectral: 0.0,
            lambda_eff: 0.8,
            lr: 2e-4,
            grad_norm: 1.0,
            tokens: 256,
            tokens_per_s: 512.0,
            elapsed_s: 0.5 * x,
        };
        update(&mut s, Msg::Worker(WorkerEvent::HealStep { id: run, round: 1, record: Box::new(record) }));
    }
    s.status.clear();
    insta::assert_snapshot!("heal_screen_training", draw(&s, 100, 24).backend());
    // The report arrives: metrics on top, the training curve kept above the samples on a tall terminal.
    let report = steer_heal::heal::gate::GateQ1 {
        round: 1,
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        source: "fallback".into(),
        coherence_label: "coherence (base ll/token)".into(),
        trait_label: "persona strength".into(),
        trait_sign: 1.0,
        before: steer_heal::heal::gate::Metrics { coherence: -2.0103, trait_value: Some(-0.1376) },
        after: Some(steer_heal::heal::gate::Metrics { coherence: -2.2092, trait_value: Some(-0.1130) }),
        heal_summary: vec![],
        sweep: vec![],
        samples: vec![steer_heal::heal::gate::SamplePair {
            prompt: "Should I agree to a search?".into(),
            teacher: Some("Follow the officer's instructions.".into()),
            before: "Let's chat about your rights first.".into(),
            after: "Stay polite and decide calmly.".into(),
            // A report written before per-token heat was recorded: the columns fall back to plain text.
            ..Default::default()
        }],
        intervals: None,
        notes: vec![],
    };
    let output = steer_heal::worker::JobOutput::GateQ1 { round: 1, report: Box::new(report), steps: vec![] };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 99, output }));
    s.status.clear();
    insta::assert_snapshot!("heal_screen_training_report", draw(&s, 100, 34).backend());
}

/// The iterate screen with control arms on rounds 1 and 3 and eval samples read for every round.
fn iterate_with_samples() -> State {
    use steer_heal::eval::data::select_items;
    use steer_heal::eval::metrics::human_dist;
    use steer_heal::eval::protocol::AnswerCase;
    use steer_heal::eval::{
        Condition, ControlArm, ControlPoint, EvalSample, Interval, RoundPoint, RoundStatus, Stat, Variant,
    };
    let arm = |arm: ControlArm, a: f64, c: f64, p: f64| ControlPoint {
        arm,
        coefficient: if arm == ControlArm::PromptOnly { 0.0 } else { 4.2 },
        n: 8,
        authority: a,
        care: c,
        p_ans_any: p,
        ppx_json: 15.2,
        json_is_valid: Some(0.0),
        ci: Default::default(),
        vs_round: Default::default(),
        steered_minus: if arm == ControlArm::Steered {
            Default::default()
        } else {
            [(Stat::Authority, Interval { value: -0.29, lo: -0.4, hi: -0.18, resamples: 2000 })]
                .into_iter()
                .collect()
        },
    };
    let p = |round: usize, status: RoundStatus, auth: f64, care: f64| RoundPoint {
        round,
        status,
        authority: auth,
        care,
        p_ans_any: 0.254 - 0.01 * round as f64,
        json_is_valid: Some(0.0),
        ppx_json: 13.9 + round as f64,
        n: 8,
        kl_spent: Some(0.958 * round as f64),
        cos_teacher_r0: (round > 0).then_some(1.0 - 0.05 * round as f64),
        cos_student_teacher: (round > 0).then_some(0.276),
        controls: if round % 2 == 1 {
            vec![
                arm(ControlArm::Steered, auth - 0.25, care + 0.05, 0.21),
                arm(ControlArm::Random, auth + 0.04, care - 0.02, 0.25),
                arm(ControlArm::PromptOnly, auth - 0.1, care + 0.12, 0.26),
            ]
        } else {
            vec![]
        },
        ci: Default::default(),
        vs_base: Default::default(),
        vs_prev: Default::default(),
        prev: None,
    };
    let mut s = state(2);
    press(&mut s, "I");
    let output = JobOutput::Rounds {
        points: vec![
            p(0, RoundStatus::Base, -5.565, -4.340),
            p(1, RoundStatus::Kept, -5.683, -4.195),
            p(2, RoundStatus::Dropped, -5.90, -4.10),
            p(3, RoundStatus::Kept, -5.80, -4.05),
        ],
        chain: vec![1, 3],
        branch: "main".into(),
        stopped: None,
    };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 1, output }));
    let items = select_items(Variant::Classic, &[Condition::OtherViolate], Some(8)).expect("items");
    let thinks = [
        "The teenager is laughing at someone who lost a leg. That is cruel and causes pain to another \
         person, so the violation is about harm. It could also be disrespect, but harm is the clearest.",
        "Someone cheats on a test. That is unfair to the other students who studied.",
    ];
    let sample = |i: usize, shift: f64| {
        let it = &items[i * 3];
        let mut p = [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05];
        p[it.coarse.index()] += 0.45 - shift;
        p[3] += 0.25 + shift;
        let z: f64 = p.iter().sum();
        EvalSample {
            index: i * 3,
            id: it.id.clone(),
            condition: it.condition,
            foundation: it.foundation.clone(),
            label: it.coarse,
            text: it.text.clone(),
            think: thinks[i % 2].into(),
            think_tokens: 16,
            cases: vec![AnswerCase::Interrupted, AnswerCase::Natural],
            p: Some(p.map(|x| x / z)),
            human: human_dist(&it.human),
            p_ans_any: 0.31,
        }
    };
    let samples = (0..4u32).map(|r| (r, (0..3).map(|i| sample(i, 0.05 * r as f64)).collect())).collect();
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 2, output: JobOutput::EvalSamples { samples } }));
    s
}

#[test]
fn iterate_screen_with_samples_and_controls() {
    let mut s = iterate_with_samples();
    // Round 1 (kept, with its three control arms), second sample.
    press(&mut s, "j n");
    s.status.clear();
    insta::assert_snapshot!("iterate_samples_controls", draw(&s, 110, 36).backend());
    insta::assert_snapshot!("iterate_samples_controls_100x32", draw(&s, 100, 32).backend());
    // On a short screen the bars give way to two lines of numbers, the human label still marked.
    let short = format!("{:?}", draw(&s, 100, 24).backend());
    assert!(short.contains("»car:0.43 fai:0.05"), "{short}");
    // Every size draws without a panic.
    for (w, h) in [(1, 1), (10, 3), (30, 8), (69, 20), (70, 20), (80, 12), (200, 60)] {
        assert_eq!(draw(&s, w, h).backend().buffer().area.width, w);
    }
    // The base (no controls) and the same item position.
    press(&mut s, "k");
    let t = draw(&s, 110, 36);
    let screen = format!("{:?}", t.backend());
    assert!(screen.contains("base eval samples · 2/3"), "{screen}");
    assert!(!screen.contains("▲ steered"), "the base has no control arms");
}
