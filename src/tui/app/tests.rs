//! Pure `update` tests: every action through its default key, worker events, ticks. No terminal, no model.
#![allow(clippy::panic)] // a test fails by panicking

use super::*;
use crate::score::{Reason, ScoreCard, ScoredCompletion, Verdict};
use crate::session::fold;
use crate::steer::{Completion, TokenTrace};
use crate::tui::keymap::Layer;

fn row(i: usize, ppl: f64, keep: bool) -> ScoredCompletion {
    let n = 6;
    let kl: Vec<f32> = (0..n).map(|t| if t == 3 + (i % 2) { 2.0 } else { 0.1 }).collect();
    ScoredCompletion {
        completion: Completion {
            id: format!("p{i:03}-a100-s{i}"),
            system: "sys".into(),
            prompt: format!("prompt {i}"),
            text: "Tell the doctor now.".into(),
            tokens: (0..n as u32).collect(),
            token_text: vec![
                "Tell".into(),
                " the".into(),
                " doctor".into(),
                " now".into(),
                ".".into(),
                "".into(),
            ],
            alpha: 1.0,
            dose: 1.0,
            seed: i as u64,
            trace: TokenTrace {
                kl_window_rmse: crate::steer::kl::window_rmse(&kl, 2),
                kl,
                nll_base: vec![1.0; n],
                dose: vec![1.0; n],
            },
            rewinds: vec![],
        },
        score: ScoreCard {
            perplexity: Some(ppl),
            repetition: 0.1,
            narration: vec![],
            refusal: vec![],
            persona_strength: None,
            kl_rmse: 0.5,
            verdict: if keep { Verdict::Keep } else { Verdict::Drop },
            reasons: if keep { vec![] } else { vec![Reason::Perplexity { value: ppl, threshold: 50.0 }] },
        },
    }
}

fn state_with(n: usize) -> State {
    let mut m = SessionManifest::new("t", std::path::Path::new("models/tiny"));
    m.generation.prompts = vec!["first".into(), "second".into()];
    let session = fold(&[SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None }]);
    let rows =
        (0..n).map(|i| row(i, [30.0, 80.0, 10.0, 60.0, 20.0][i % 5], i % 5 != 1 && i % 5 != 3)).collect();
    let mut s = State::new(Keymap::defaults().expect("default keymap"), "t", m, session, rows);
    s.model = ModelStatus::Ready { model: "tiny".into(), vector_layers: vec![] };
    s
}

/// Press keys written as a keymap would write them, space-separated; returns every job.
fn press(s: &mut State, keys: &str) -> Vec<Job> {
    let mut jobs = Vec::new();
    for k in keys.split(' ').filter(|k| !k.is_empty()) {
        let chord = KeyChord::parse(k).unwrap_or_else(|e| panic!("bad key {k}: {e}"));
        jobs.extend(update(s, Msg::Key(chord)));
    }
    jobs
}

fn records(jobs: &[Job]) -> Vec<SessionEvent> {
    jobs.iter()
        .filter_map(|j| match &j.kind {
            JobKind::Record(e) | JobKind::WriteArtifact { event: e, .. } => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn decision_of(e: &SessionEvent) -> (String, DecisionKind) {
    match e {
        SessionEvent::Decision { completion, decision, .. } => (completion.clone(), *decision),
        other => panic!("not a decision: {other:?}"),
    }
}

#[test]
fn accept_and_reject_record_and_advance_to_the_next_undecided() {
    let mut s = state_with(5);
    let jobs = press(&mut s, "a");
    assert_eq!(
        records(&jobs).iter().map(decision_of).collect::<Vec<_>>(),
        vec![("p000-a100-s0".into(), DecisionKind::Accept)]
    );
    assert_eq!(s.decision("p000-a100-s0"), Some(true));
    assert_eq!(s.current_id().as_deref(), Some("p001-a100-s1"));
    let jobs = press(&mut s, "r");
    assert_eq!(decision_of(&records(&jobs)[0]), ("p001-a100-s1".into(), DecisionKind::Reject));
    assert_eq!(s.decision("p001-a100-s1"), Some(false));
    // Deciding the same way twice records nothing.
    press(&mut s, "k");
    assert!(press(&mut s, "r").is_empty());
    // Changing a decision records the new one.
    press(&mut s, "k");
    let jobs = press(&mut s, "a");
    assert_eq!(decision_of(&records(&jobs)[0]), ("p001-a100-s1".into(), DecisionKind::Accept));
}

#[test]
fn undo_takes_back_any_number_of_steps_in_reverse() {
    let mut s = state_with(5);
    press(&mut s, "a r a");
    assert_eq!(s.round_state().map(|r| r.decisions().len()), Some(3));
    let mut undone = vec![];
    for _ in 0..3 {
        let jobs = press(&mut s, "u");
        undone.push(decision_of(&records(&jobs)[0]));
    }
    assert_eq!(
        undone,
        vec![
            ("p002-a100-s2".into(), DecisionKind::Undo),
            ("p001-a100-s1".into(), DecisionKind::Undo),
            ("p000-a100-s0".into(), DecisionKind::Undo)
        ]
    );
    assert_eq!(s.round_state().map(|r| r.decisions().len()), Some(0));
    // The cursor follows what was undone.
    assert_eq!(s.current_id().as_deref(), Some("p000-a100-s0"));
    assert!(press(&mut s, "u").is_empty());
    assert_eq!(s.status, "nothing to undo");
    // ctrl-z is bound to undo as well.
    press(&mut s, "a");
    assert_eq!(decision_of(&records(&press(&mut s, "ctrl-z"))[0]).1, DecisionKind::Undo);
}

#[test]
fn navigation_keys() {
    let mut s = state_with(25);
    press(&mut s, "j j");
    assert_eq!(s.selected, 2);
    press(&mut s, "k");
    assert_eq!(s.selected, 1);
    press(&mut s, "G");
    assert_eq!(s.selected, 24);
    press(&mut s, "g g");
    assert_eq!(s.selected, 0);
    press(&mut s, "pagedown");
    assert_eq!(s.selected, PAGE);
    press(&mut s, "pageup");
    assert_eq!(s.selected, 0);
    press(&mut s, "end");
    assert_eq!(s.selected, 24);
    press(&mut s, "home up");
    assert_eq!(s.selected, 0);
    // An unfinished sequence followed by another key: the sequence is dropped, the key acts.
    press(&mut s, "g j");
    assert_eq!(s.selected, 1);
    assert!(s.pending_keys.is_empty());
}

#[test]
fn next_undecided_skips_decided_and_wraps() {
    let mut s = state_with(4);
    press(&mut s, "a a"); // 0 and 1 decided, now on 2
    press(&mut s, "j"); // on 3
    press(&mut s, "a"); // 3 decided, stays (nothing below)
    press(&mut s, "n");
    assert_eq!(s.current_id().as_deref(), Some("p002-a100-s2"));
    press(&mut s, "a n");
    assert_eq!(s.status, "every completion in view is decided");
}

#[test]
fn tags_are_pending_until_the_decision_and_re_recorded_after() {
    let mut s = state_with(3);
    press(&mut s, "t");
    assert_eq!(s.mode(), Mode::Tags);
    press(&mut s, "1 3 3 2 enter");
    assert_eq!(s.mode(), Mode::GateQ0);
    assert_eq!(s.tags_of("p000-a100-s0"), vec!["incoherent".to_string(), "repetitive".into()]);
    let jobs = press(&mut s, "r");
    match &records(&jobs)[0] {
        SessionEvent::Decision { tags, decision, .. } => {
            assert_eq!(*decision, DecisionKind::Reject);
            assert_eq!(tags, &vec!["incoherent".to_string(), "repetitive".into()]);
        }
        e => panic!("{e:?}"),
    }
    // On a decided item, new tags re-record its decision (undoable).
    press(&mut s, "k t 2 4 enter");
    let last = s.round_state().and_then(|r| r.history.last()).cloned().expect("decision");
    assert_eq!((last.keep, last.tags), (false, vec!["incoherent".to_string(), "refuses".into()]));
    press(&mut s, "u");
    assert_eq!(s.tags_of("p000-a100-s0"), vec!["incoherent".to_string(), "repetitive".into()]);
    // esc cancels without changes; tag numbers beyond the list do nothing.
    press(&mut s, "t 9 esc");
    assert_eq!(s.mode(), Mode::GateQ0);
}

#[test]
fn notes_are_typed_in_the_editor_and_saved() {
    let mut s = state_with(3);
    press(&mut s, "a k e");
    assert_eq!(s.mode(), Mode::Edit);
    // Unbound keys type: even `q` and `a`, which mean quit/accept elsewhere.
    let jobs = press(&mut s, "q u i t space a");
    assert!(jobs.is_empty() && !s.quit);
    let jobs = press(&mut s, "ctrl-s");
    match &records(&jobs)[0] {
        SessionEvent::Decision { note, decision, .. } => {
            assert_eq!(note.as_deref(), Some("quit a"));
            assert_eq!(*decision, DecisionKind::Accept);
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(s.note_of("p000-a100-s0").as_deref(), Some("quit a"));
    // esc leaves the editor without saving.
    press(&mut s, "e x esc");
    assert_eq!(s.note_of("p000-a100-s0").as_deref(), Some("quit a"));
    // Paste goes into the editor.
    press(&mut s, "j e");
    update(&mut s, Msg::Paste("pasted".into()));
    press(&mut s, "ctrl-s");
    assert_eq!(s.pending_notes.get("p001-a100-s1").map(String::as_str), Some("pasted"));
}

#[test]
fn edit_prompt_generates_from_the_new_prompt() {
    let mut s = state_with(2);
    press(&mut s, "p");
    if let Some(Popup::Edit { area, .. }) = &s.popup {
        assert_eq!(area.lines(), ["prompt 0"]);
    }
    let jobs = press(&mut s, "end ! ctrl-s");
    match &jobs[0].kind {
        JobKind::Generate(req) => {
            assert_eq!(req.prompt, "prompt 0!");
            assert_eq!(req.prompt_index, 2, "custom prompts count on after the session's 2 prompts");
        }
        k => panic!("{k:?}"),
    }
    assert!(s.generating.contains(&2));
}

#[test]
fn dose_slider_moves_in_steps_clamps_and_is_recorded_when_it_rests() {
    let mut s = state_with(2);
    press(&mut s, "] ] +");
    assert!((s.dose - 1.3).abs() < 1e-9, "{}", s.dose);
    press(&mut s, "[ -");
    assert!((s.dose - 1.1).abs() < 1e-9);
    for _ in 0..30 {
        press(&mut s, "[");
    }
    assert_eq!(s.dose, 0.0);
    for _ in 0..100 {
        press(&mut s, "]");
    }
    assert_eq!(s.dose, s.dose_max());
    assert_eq!(s.dose_max(), 4.0);
    assert!(update(&mut s, Msg::Tick { now: "t".into() }).is_empty(), "not recorded while moving");
    let jobs = update(&mut s, Msg::Tick { now: "t".into() });
    assert_eq!(records(&jobs), vec![SessionEvent::DoseChanged { round: 0, dose: 4.0 }]);
    assert!(update(&mut s, Msg::Tick { now: "t".into() }).is_empty(), "recorded once");
    assert_eq!(s.round_state().map(|r| r.dose), Some(4.0));
}

#[test]
fn token_cursor_and_jump_to_drift() {
    let mut s = state_with(2);
    press(&mut s, "l l l");
    assert_eq!(s.cursor, 3);
    press(&mut s, "h");
    assert_eq!(s.cursor, 2);
    press(&mut s, "$");
    assert_eq!(s.cursor, 5);
    press(&mut s, "l");
    assert_eq!(s.cursor, 5, "the cursor stops at the last token");
    press(&mut s, "0");
    assert_eq!(s.cursor, 0);
    // Row 0's KL peaks at token 3; the window (2 in the trace, kl_window 8 in settings) starts at 0.
    s.manifest.generation.kl_window = 2;
    press(&mut s, "d");
    assert_eq!(s.cursor, 3, "window rmse peaks at token 4 (tokens 3-4); the window starts at 3");
    // Moving to another row resets the cursor.
    press(&mut s, "j");
    assert_eq!(s.cursor, 0);
}

fn replay_done(s: &mut State, job: JobId, dose: f64) {
    let mut r = row(0, 12.0, true);
    r.completion.text = "Tell the nurse.".into();
    r.completion.rewinds.push(crate::steer::Rewind {
        at: 2,
        from_dose: 1.0,
        to_dose: dose,
        cause: "manual".into(),
    });
    update(
        s,
        Msg::Worker(WorkerEvent::Finished {
            id: job,
            output: JobOutput::Replayed { round: 0, at: 2, dose, row: Box::new(r) },
        }),
    );
}

#[test]
fn backtrack_replays_at_the_cursor_and_slider_latest_wins_and_adopts() {
    let mut s = state_with(3);
    s.model = ModelStatus::Loading;
    assert!(press(&mut s, "b").is_empty(), "no replay before the model is loaded");
    s.model = ModelStatus::Ready { model: "tiny".into(), vector_layers: vec![1] };
    press(&mut s, "l l [ [");
    let jobs = press(&mut s, "b");
    let first = match &jobs[..] {
        [Job { id, kind: JobKind::Replay(r) }] => {
            assert_eq!((r.at, r.completion.id.as_str()), (2, "p000-a100-s0"));
            assert!((r.dose - 0.8).abs() < 1e-9);
            *id
        }
        j => panic!("{j:?}"),
    };
    // Moving the slider while the replay is on screen re-requests it (the worker keeps only the latest).
    let jobs = press(&mut s, "[");
    let second = match &jobs[..] {
        [Job { id, kind: JobKind::Replay(r) }] => {
            assert!((r.dose - 0.7).abs() < 1e-9);
            assert_eq!(r.at, 2);
            *id
        }
        j => panic!("{j:?}"),
    };
    assert_ne!(first, second);
    // Tokens of the superseded job are ignored; the latest one's stream in.
    update(&mut s, Msg::Worker(WorkerEvent::Token { id: first, row: 0, text: "old".into() }));
    update(&mut s, Msg::Worker(WorkerEvent::Token { id: second, row: 0, text: " nurse".into() }));
    assert_eq!(s.replay.as_ref().map(|r| r.streamed.as_str()), Some(" nurse"));
    assert!(press(&mut s, "y").is_empty(), "cannot adopt a replay that is still running");
    replay_done(&mut s, first, 0.8);
    assert!(s.replay.as_ref().is_some_and(|r| r.result.is_none()), "a stale result is ignored");
    replay_done(&mut s, second, 0.7);
    let jobs = press(&mut s, "y");
    match &jobs[..] {
        [Job { kind: JobKind::WriteArtifact { rel, event, contents }, .. }] => {
            assert_eq!(rel, "round-00/replays/p000-a100-s0-r1.json");
            assert_eq!(
                event,
                &SessionEvent::ReplayAdopted {
                    round: 0,
                    completion: "p000-a100-s0".into(),
                    file: rel.clone(),
                    at: 2,
                    dose: 0.7
                }
            );
            let back: ScoredCompletion = serde_json::from_slice(contents).expect("artifact is a completion");
            assert_eq!(back.completion.text, "Tell the nurse.");
        }
        j => panic!("{j:?}"),
    }
    assert_eq!(s.rows[0].completion.text, "Tell the nurse.");
    assert!(s.replay.is_none());
    assert_eq!(s.round_state().map(|r| r.replays.len()), Some(1));
}

#[test]
fn discarding_a_running_replay_cancels_it() {
    let mut s = state_with(2);
    let id = press(&mut s, "b")[0].id;
    let jobs = press(&mut s, "x");
    assert!(matches!(jobs[..], [Job { kind: JobKind::Cancel(t), .. }] if t == id));
    assert!(s.replay.is_none());
    // esc discards too; a finished preview needs no cancel.
    let id = press(&mut s, "b")[0].id;
    replay_done(&mut s, id, 1.0);
    assert!(press(&mut s, "esc").is_empty());
    assert!(s.replay.is_none());
}

#[test]
fn sort_and_reverse() {
    let mut s = state_with(5); // ppl 30, 80, 10, 60, 20
    press(&mut s, "s");
    assert_eq!(s.sort, SortKey::Perplexity);
    let ppl: Vec<f64> = s.view.iter().map(|i| s.rows[*i].score.perplexity.unwrap_or(0.0)).collect();
    assert_eq!(ppl, vec![10.0, 20.0, 30.0, 60.0, 80.0]);
    press(&mut s, "S");
    let ppl: Vec<f64> = s.view.iter().map(|i| s.rows[*i].score.perplexity.unwrap_or(0.0)).collect();
    assert_eq!(ppl, vec![80.0, 60.0, 30.0, 20.0, 10.0]);
    for _ in 0..6 {
        press(&mut s, "s");
    }
    assert_eq!(s.sort, SortKey::Order, "the sort cycles back to generation order");
}

#[test]
fn filters_cycle_and_clear_and_keep_the_selection() {
    let mut s = state_with(5);
    press(&mut s, "a"); // p000 accepted, now on p001
    press(&mut s, "f");
    assert_eq!(s.filter, Filter::Undecided);
    assert_eq!(s.view.len(), 4);
    assert_eq!(s.current_id().as_deref(), Some("p001-a100-s1"));
    press(&mut s, "f");
    assert_eq!(s.filter, Filter::Accepted);
    assert_eq!(s.view.len(), 1);
    press(&mut s, "f f f");
    assert_eq!(s.filter, Filter::AutoDrop);
    assert_eq!(s.view.len(), 2);
    press(&mut s, "f f");
    assert_eq!(s.filter, Filter::Reason(ReasonKind::Perplexity));
    assert_eq!(s.view.len(), 2);
    press(&mut s, "F");
    assert_eq!((s.filter, s.view.len()), (Filter::All, 5));
    // Deciding under the undecided filter hides the row and lands on the very next one.
    press(&mut s, "g g f");
    assert_eq!(s.current_id().as_deref(), Some("p001-a100-s1"));
    press(&mut s, "r");
    assert!(s.view.iter().all(|i| s.decision(&s.rows[*i].completion.id).is_none()));
    assert_eq!(s.current_id().as_deref(), Some("p002-a100-s2"));
}

#[test]
fn stats_popup_opens_and_closes() {
    let mut s = state_with(3);
    press(&mut s, "T");
    assert_eq!(s.mode(), Mode::Stats);
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::GateQ0);
    press(&mut s, "T T");
    assert_eq!(s.mode(), Mode::GateQ0);
}

#[test]
fn write_gate_and_pass_gate_write_the_report() {
    let mut s = state_with(5);
    update(&mut s, Msg::Tick { now: "2026-02-03T04:05:06Z".into() });
    press(&mut s, "a r a a r");
    let jobs = press(&mut s, "w");
    match &jobs[..] {
        [Job { kind: JobKind::WriteArtifact { rel, contents, event }, .. }] => {
            assert_eq!(
                *rel,
                crate::session::SessionDir::new(std::path::Path::new(".")).round(0).gate_q0().rel
            );
            let md = String::from_utf8(contents.clone()).expect("utf8");
            assert!(md.contains("Status: **in progress** · written 2026-02-03T04:05:06Z"), "{md}");
            assert!(md.contains("5 completions · 5 decided · 3 accepted · 2 rejected"));
            assert!(matches!(event, SessionEvent::GateWritten { passed: false, .. }));
        }
        j => panic!("{j:?}"),
    }
    press(&mut s, "P");
    assert_eq!(s.mode(), Mode::Confirm);
    assert!(press(&mut s, "n").is_empty());
    assert_eq!(s.mode(), Mode::GateQ0);
    let jobs = press(&mut s, "P y");
    assert!(matches!(records(&jobs)[..], [SessionEvent::GateWritten { passed: true, .. }]));
    assert!(s.round_state().is_some_and(|r| r.gate_passed(Gate::Q0)));
}

#[test]
fn blind_reshow_records_and_reports_kappa() {
    let mut s = state_with(4);
    press(&mut s, "R");
    assert!(matches!(&s.popup, Some(Popup::Message { title, .. }) if title == "Blind re-show"));
    press(&mut s, "esc a r a r");
    press(&mut s, "R");
    assert_eq!(s.mode(), Mode::Reshow);
    let queue = s.screens.reshow().map(|r| r.queue.clone()).unwrap_or_default();
    assert_eq!(queue.len(), 4);
    let mut all = vec![];
    // Re-decide each the same way it was decided, except the last.
    for (i, id) in queue.iter().enumerate() {
        let orig = s.decision(id).unwrap_or(false);
        let same = i + 1 < queue.len();
        let key = if orig == same { "a" } else { "r" };
        all.extend(records(&press(&mut s, key)));
    }
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|e| matches!(e, SessionEvent::Reshown { .. })));
    assert!(s.screens.reshow().is_none());
    let k = stats::kappa(&s);
    assert_eq!((k.n, k.same), (4, 3));
    assert!(k.kappa.is_some_and(|v| (v - 0.5).abs() < 1e-9), "{k:?}");
    // Decisions themselves are untouched by the re-show.
    assert_eq!(s.round_state().map(|r| r.decisions().len()), Some(4));
    // Everything has been re-shown: another re-show has nothing to show.
    press(&mut s, "esc R");
    assert!(matches!(&s.popup, Some(Popup::Message { .. })));
}

#[test]
fn reshow_can_be_left_with_esc() {
    let mut s = state_with(3);
    press(&mut s, "a a R");
    assert_eq!(s.mode(), Mode::Reshow);
    assert!(press(&mut s, "esc").is_empty());
    assert_eq!(s.mode(), Mode::GateQ0);
}

#[test]
fn rescore_sends_every_completion() {
    let mut s = state_with(3);
    let jobs = press(&mut s, "ctrl-r");
    assert!(
        matches!(&jobs[..], [Job { kind: JobKind::Rescore { round: 0, completions }, .. }] if completions.len() == 3)
    );
    let mut new = row(0, 99.0, false);
    new.score.repetition = 0.9;
    let scores = BTreeMap::from([("p000-a100-s0".to_string(), new.score.clone())]);
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id: jobs[0].id,
            output: JobOutput::Rescored { round: 0, file: "round-00/scores-9.json".into(), scores },
        }),
    );
    assert_eq!(s.rows[0].score.repetition, 0.9);
    assert_eq!(s.round_state().map(|r| r.rescore_files.len()), Some(1));
}

#[test]
fn scroll_help_and_quit() {
    let mut s = state_with(2);
    press(&mut s, "J J ctrl-d K");
    assert_eq!(s.detail_scroll, 2);
    press(&mut s, "?");
    assert_eq!(s.mode(), Mode::Help);
    press(&mut s, "j j k");
    assert!(matches!(s.popup, Some(Popup::Help { scroll: 1 })));
    press(&mut s, "q");
    assert!(!s.quit, "q closes the help overlay");
    assert_eq!(s.mode(), Mode::GateQ0);
    press(&mut s, "f1 esc ]");
    let jobs = press(&mut s, "q");
    assert!(s.quit);
    assert_eq!(
        records(&jobs),
        vec![SessionEvent::DoseChanged { round: 0, dose: 1.1 }],
        "quit flushes the dose"
    );
}

#[test]
fn ctrl_c_quits_even_while_editing() {
    let mut s = state_with(1);
    press(&mut s, "e h i ctrl-c");
    assert!(s.quit);
}

#[test]
fn a_user_keymap_changes_what_keys_do() {
    let mut s = state_with(3);
    let layer = Layer::parse("[gate-q0]\na = \"reject\"\nA = \"accept\"\n", std::path::Path::new("u.toml"))
        .expect("layer");
    s.keymap.merge(layer).expect("merge");
    let jobs = press(&mut s, "a");
    assert_eq!(decision_of(&records(&jobs)[0]).1, DecisionKind::Reject);
    let jobs = press(&mut s, "A");
    assert_eq!(decision_of(&records(&jobs)[0]).1, DecisionKind::Accept);
}

#[test]
fn init_runs_the_loop_once_and_a_judged_session_waits_on_the_iterate_screen() {
    // A session with no judged round: init asks the worker to run the loop (load, prepare round 1); the model
    // is loading; a second init queues nothing more.
    let mut s = state_with(0);
    s.model = ModelStatus::NotLoaded;
    let jobs = update(&mut s, Msg::Init);
    assert!(matches!(jobs[..], [Job { kind: JobKind::RunRounds { rounds: None }, .. }]), "{jobs:?}");
    assert_eq!(s.loop_job, Some(jobs[0].id));
    assert_eq!(s.model, ModelStatus::Loading);
    assert!(update(&mut s, Msg::Init).is_empty());
    // Round 1 judged and round 2 not started: the iterate screen opens and nothing runs until continue.
    let mut s = state_with(0);
    s.model = ModelStatus::NotLoaded;
    apply_event(
        &mut s.session,
        &SessionEvent::RoundGate { round: 1, gate: Gate::Q2, keep: true, note: None },
    );
    let jobs = update(&mut s, Msg::Init);
    assert!(matches!(jobs[..], [Job { kind: JobKind::RoundsStatus, .. }]), "{jobs:?}");
    assert_eq!(s.mode(), Mode::Iterate);
    assert_eq!(s.loop_job, None);
}

#[test]
fn screens_stack_over_gate_q0_and_the_top_one_has_the_keys() {
    let mut s = state_with(2);
    assert_eq!(s.mode(), Mode::GateQ0);
    press(&mut s, "I");
    assert_eq!(s.mode(), Mode::Iterate);
    s.screens.open(Screen::Heal(iterate::HealView {
        round: 1,
        report: None,
        scroll: 0,
        note: String::new(),
    }));
    assert_eq!(s.mode(), Mode::Heal);
    // Esc closes the heal screen: the iterate screen under it has the keys again, then gate Q0.
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::Iterate);
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::GateQ0);
    // Opening a screen again replaces it (and brings it to the top) instead of stacking a second one.
    press(&mut s, "I");
    let heal =
        |round| Screen::Heal(iterate::HealView { round, report: None, scroll: 0, note: String::new() });
    s.screens.open(heal(1));
    s.screens.open(Screen::Iterate(iterate::IterateView::default()));
    assert_eq!(s.mode(), Mode::Iterate);
    s.screens.open(heal(2));
    assert_eq!(s.screens.heal().map(|h| h.round), Some(2));
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::Iterate);
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::GateQ0, "one heal screen only");
}

#[test]
fn the_loops_round_streams_into_gate_q0_and_its_c_star_scales_the_dose() {
    let mut s = state_with(0);
    s.loop_job = Some(5);
    update(&mut s, Msg::Worker(WorkerEvent::RoundStarted { id: 5, round: 2, c_star: 8.0 }));
    assert_eq!(s.round, 2);
    assert_eq!(s.c_star(), 8.0);
    let file = "round-02/completions-000.jsonl".to_string();
    let rows = vec![row(1, 20.0, true), row(2, 30.0, true)];
    update(&mut s, Msg::Worker(WorkerEvent::Completions { id: 5, round: 2, part: 0, file, rows }));
    assert_eq!(s.rows.len(), 2);
    assert_eq!(s.round_state().map(|r| r.completion_files.len()), Some(1));
    // The slider is a multiple of c*: two steps down from 1 replay at 0.8 × 8.
    s.model = ModelStatus::Ready { model: "tiny".into(), vector_layers: vec![1] };
    press(&mut s, "- -");
    let jobs = press(&mut s, "b");
    match &jobs[..] {
        [Job { kind: JobKind::Replay(r), .. }] => assert!((r.dose - 6.4).abs() < 1e-9, "{}", r.dose),
        other => panic!("{other:?}"),
    }
    // Passing gate Q0 writes the gate; once it is recorded the loop resumes (heal).
    let jobs = press(&mut s, "P y");
    let write = jobs.iter().find_map(|j| match &j.kind {
        JobKind::WriteArtifact { event, .. } => Some(event.clone()),
        _ => None,
    });
    let Some(event) = write else { panic!("no gate write in {jobs:?}") };
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id: 5,
            output: JobOutput::Rounds {
                points: vec![],
                chain: vec![],
                branch: "main".into(),
                stopped: Some(Stopped::AwaitingGateQ0(2)),
            },
        }),
    );
    assert_eq!(s.loop_job, None);
    let jobs = update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished { id: 99, output: JobOutput::Recorded { seq: 9, event } }),
    );
    assert!(matches!(jobs[..], [Job { kind: JobKind::RunRounds { rounds: None }, .. }]), "{jobs:?}");
    assert_eq!(s.mode(), Mode::Heal);
    // A gate recorded while a run still goes: that run ending at the gate runs the loop on (once).
    let run = s.loop_job.expect("the heal run");
    let event = SessionEvent::RoundGate { round: 2, gate: Gate::Q1, keep: true, note: None };
    let recorded = JobOutput::Recorded { seq: 10, event };
    assert!(update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 98, output: recorded })).is_empty());
    let waiting = JobOutput::Rounds {
        points: vec![],
        chain: vec![],
        branch: "main".into(),
        stopped: Some(Stopped::AwaitingGateQ1(2)),
    };
    let jobs = update(&mut s, Msg::Worker(WorkerEvent::Finished { id: run, output: waiting }));
    assert!(matches!(jobs[..], [Job { kind: JobKind::RunRounds { rounds: None }, .. }]), "{jobs:?}");
    assert!(!s.resume_after_run);
}

#[test]
fn worker_events_update_the_screen_state() {
    let mut s = state_with(1);
    s.generating.insert(1);
    update(&mut s, Msg::Worker(WorkerEvent::Started { id: 7, tag: JobTag::Generate }));
    update(&mut s, Msg::Worker(WorkerEvent::Progress { id: 7, done: 8, total: 32, msg: "prompt 1".into() }));
    assert_eq!(s.jobs.get(&7).map(|j| (j.done, j.total)), Some((8, 32)));
    update(&mut s, Msg::Worker(WorkerEvent::Token { id: 7, row: 0, text: "Hel".into() }));
    update(&mut s, Msg::Worker(WorkerEvent::Token { id: 7, row: 0, text: "lo".into() }));
    assert_eq!(s.live.as_ref().and_then(|l| l.1.get(&0)).map(String::as_str), Some("Hello"));
    let rows = vec![row(7, 20.0, true), row(8, 90.0, false)];
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id: 7,
            output: JobOutput::Completions {
                round: 0,
                prompt_index: 1,
                file: "round-00/completions-001.jsonl".into(),
                rows,
            },
        }),
    );
    assert_eq!(s.rows.len(), 3);
    assert_eq!(s.current_id().as_deref(), Some("p000-a100-s0"), "arrivals do not move the selection");
    assert!(s.generating.is_empty() && s.jobs.is_empty() && s.live.is_none());
    assert_eq!(s.round_state().map(|r| r.completion_files.len()), Some(1));
    // Failures show as a message popup; a rounds job that fails before the model is ready says the model
    // failed, and a later failure never hides that first message.
    s.model = ModelStatus::Loading;
    s.loop_job = Some(9);
    update(&mut s, Msg::Worker(WorkerEvent::Started { id: 9, tag: JobTag::Rounds }));
    update(&mut s, Msg::Worker(WorkerEvent::Failed { id: 9, error: "m.gguf: missing".into() }));
    assert_eq!(s.model, ModelStatus::Failed("m.gguf: missing".into()));
    assert!(
        matches!(&s.popup, Some(Popup::Message { title, text }) if title == "Failed while running the round" && text == "m.gguf: missing")
    );
    update(&mut s, Msg::Worker(WorkerEvent::Started { id: 11, tag: JobTag::Replay }));
    update(&mut s, Msg::Worker(WorkerEvent::Failed { id: 11, error: "the model is not loaded".into() }));
    match &s.popup {
        Some(Popup::Message { title, text }) => {
            assert_eq!(title, "Failed while running the round");
            assert!(
                text.starts_with("m.gguf: missing") && text.contains("the model is not loaded"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    press(&mut s, "esc");
    update(
        &mut s,
        Msg::Worker(WorkerEvent::ModelReady {
            id: 10,
            model: "tiny".into(),
            vector_layers: vec![2],
            round: Some((1, 4.0)),
        }),
    );
    assert_eq!(s.model, ModelStatus::Ready { model: "tiny".into(), vector_layers: vec![2] });
}

#[test]
fn status_messages_expire() {
    let mut s = state_with(2);
    press(&mut s, "a");
    assert!(!s.status.is_empty());
    for _ in 0..=STATUS_TICKS {
        update(&mut s, Msg::Tick { now: "t".into() });
    }
    assert!(s.status.is_empty());
}

#[test]
fn warnings_from_opening_are_shown() {
    let mut s = state_with(1);
    s.warnings = vec!["events.jsonl: line 9: last line is truncated".into()];
    update(&mut s, Msg::Init);
    assert!(matches!(&s.popup, Some(Popup::Message { text, .. }) if text.contains("truncated")));
}

fn point(round: usize, status: crate::eval::RoundStatus, auth: f64) -> crate::eval::RoundPoint {
    crate::eval::RoundPoint {
        round,
        status,
        authority: auth,
        care: -4.3 + 0.1 * round as f64,
        p_ans_any: 0.25,
        json_is_valid: Some(0.0),
        ppx_json: 14.0,
        n: 8,
        kl_spent: Some(round as f64),
        cos_teacher_r0: None,
        cos_student_teacher: None,
        controls: vec![],
        ci: Default::default(),
        vs_base: Default::default(),
        vs_prev: Default::default(),
        prev: None,
    }
}

/// The iterate screen with base, kept round 1 and dropped round 2, as the worker would report them.
fn iterate_state() -> State {
    use crate::eval::RoundStatus::*;
    let mut s = state_with(2);
    let jobs = press(&mut s, "I");
    assert!(matches!(jobs[..], [Job { kind: JobKind::RoundsStatus, .. }]), "{jobs:?}");
    let output = JobOutput::Rounds {
        points: vec![point(0, Base, -5.56), point(1, Kept, -5.68), point(2, Dropped, -5.9)],
        chain: vec![1],
        branch: "main".into(),
        stopped: None,
    };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: jobs[0].id, output }));
    s
}

#[test]
fn iterate_keys_continue_stop_rollback_fork() {
    let mut s = iterate_state();
    assert_eq!(s.mode(), Mode::Iterate);
    // Continue runs round 3 (two judged so far) in the worker; a second continue while it runs does nothing.
    // It carries the gate-Q0 screen's round, whose new decisions are the round's gate Q0.
    let jobs = press(&mut s, "c");
    let run_id = match &jobs[..] {
        [Job { id, kind: JobKind::RunRounds { rounds: None } }] => *id,
        other => panic!("{other:?}"),
    };
    assert!(press(&mut s, "c").is_empty());
    // Stop cancels that job; rollback is refused while it runs.
    assert!(matches!(press(&mut s, "s")[..], [Job { kind: JobKind::Cancel(id), .. }] if id == run_id));
    assert!(records(&press(&mut s, "b")).is_empty());
    let output = JobOutput::Rounds {
        points: iterate_state().screens.iterate().expect("view").points.clone(),
        chain: vec![1],
        branch: "main".into(),
        stopped: Some(Stopped::Cancelled),
    };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id: run_id, output }));
    assert!(s.status.starts_with("cancelled"));
    // Round 2 was dropped: neither a rollback nor a fork target.
    press(&mut s, "j j");
    assert!(records(&press(&mut s, "b f")).is_empty());
    assert!(s.status.contains("not in the current lineage"), "{}", s.status);
    // Round 1 is kept: roll back to it; the base: fork from it.
    press(&mut s, "k");
    assert_eq!(records(&press(&mut s, "b")), vec![SessionEvent::Rollback { to_round: 1 }]);
    press(&mut s, "k k");
    let forks = records(&press(&mut s, "f"));
    assert!(matches!(&forks[..], [SessionEvent::Fork { from_round: 0, .. }]), "{forks:?}");
    // Esc goes back to gate Q0.
    press(&mut s, "esc");
    assert_eq!(s.mode(), Mode::GateQ0);
}

fn gate_q1_report() -> crate::heal::gate::GateQ1 {
    use crate::heal::gate::{GateQ1, Metrics, SamplePair};
    GateQ1 {
        round: 1,
        model: "tiny".into(),
        source: "fallback".into(),
        coherence_label: "coherence".into(),
        trait_label: "persona strength".into(),
        trait_sign: 1.0,
        before: Metrics { coherence: -2.01, trait_value: Some(-0.138) },
        after: Some(Metrics { coherence: -2.21, trait_value: Some(-0.113) }),
        heal_summary: vec![],
        sweep: vec![],
        samples: vec![
            SamplePair {
                prompt: "p1".into(),
                teacher: Some("t1".into()),
                before: "b1".into(),
                after: "a1".into(),
                ..SamplePair::default()
            },
            SamplePair {
                prompt: "p2".into(),
                teacher: None,
                before: "b2".into(),
                after: "a2".into(),
                ..SamplePair::default()
            },
        ],
        intervals: None,
        notes: vec![],
    }
}

#[test]
fn heal_screen_keeps_or_drops_the_round_with_a_note() {
    let mut s = iterate_state();
    // The base has no heal report.
    assert!(press(&mut s, "h").is_empty());
    press(&mut s, "j");
    let jobs = press(&mut s, "h");
    let id = match &jobs[..] {
        [Job { id, kind: JobKind::ReadGateQ1 { round: 1 } }] => *id,
        other => panic!("{other:?}"),
    };
    let steps = vec![step_record(1, 2, 0.5), step_record(2, 2, 1.0)];
    let output = JobOutput::GateQ1 { round: 1, report: Box::new(gate_q1_report()), steps: steps.clone() };
    update(&mut s, Msg::Worker(WorkerEvent::Finished { id, output }));
    assert_eq!(s.mode(), Mode::Heal);
    // The logged heal steps are the screen's training curve.
    assert_eq!(s.heal_training.as_ref().map(|t| (t.round, t.steps.clone())), Some((1, steps)));
    press(&mut s, "j j j");
    assert_eq!(s.screens.heal().map(|h| h.scroll), Some(3));
    // `e` opens the note editor; esc throws the text away, ctrl-s keeps it for the decision.
    press(&mut s, "e");
    assert!(matches!(s.popup, Some(Popup::Edit { target: EditTarget::RoundNote, .. })));
    press(&mut s, "x y z");
    press(&mut s, "esc");
    assert_eq!(s.screens.heal().map(|h| h.note.as_str()), Some(""));
    press(&mut s, "e");
    update(&mut s, Msg::Paste("loops in sample 2".into()));
    press(&mut s, "ctrl-s");
    assert!(s.popup.is_none());
    assert_eq!(s.screens.heal().map(|h| h.note.as_str()), Some("loops in sample 2"));
    let jobs = press(&mut s, "D");
    match &records(&jobs)[..] {
        [SessionEvent::RoundGate { round: 1, gate, keep: false, note: Some(note) }] => {
            assert_eq!(*gate, Gate::Q1);
            assert!(note.starts_with("loops in sample 2"), "{note}");
            assert!(note.contains("-2.010 → -2.210"), "{note}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.mode(), Mode::Iterate);
    // Once the verdict is on disk the loop goes on (a drop: the next round; a keep: bake and eval).
    let event = records(&jobs)[0].clone();
    let jobs = update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished { id: 77, output: JobOutput::Recorded { seq: 4, event } }),
    );
    assert!(matches!(jobs[..], [Job { kind: JobKind::RunRounds { rounds: None }, .. }]), "{jobs:?}");
}

fn step_record(step: usize, total: usize, elapsed_s: f64) -> crate::heal::StepRecord {
    crate::heal::StepRecord {
        step,
        total_steps: total,
        epoch: 0,
        loss: 2.0 - 0.1 * step as f64,
        nll: 1.8 - 0.1 * step as f64,
        d: 0.05 * step as f64,
        kl_mean: 0.04 * step as f64,
        barrier: 0.0,
        spectral: 0.0,
        lambda_eff: 1.5,
        lr: 1e-3,
        grad_norm: 0.7,
        tokens: 120,
        tokens_per_s: 240.0,
        elapsed_s,
    }
}

#[test]
fn heal_steps_land_in_state_open_the_live_chart_and_stop_cancels_the_run() {
    let mut s = iterate_state();
    let jobs = press(&mut s, "c");
    let run_id = match &jobs[..] {
        [Job { id, kind: JobKind::RunRounds { rounds: None } }] => *id,
        other => panic!("{other:?}"),
    };
    for (i, t) in [(1, 0.5), (2, 1.0)] {
        let e = WorkerEvent::HealStep { id: run_id, round: 3, record: Box::new(step_record(i, 8, t)) };
        assert!(update(&mut s, Msg::Worker(e)).is_empty());
    }
    let t = s.heal_training.as_ref().expect("training kept");
    assert_eq!((t.job, t.round, t.steps.len()), (run_id, 3, 2));
    assert_eq!(t.steps[1], step_record(2, 8, 1.0));
    // 2 steps in 1 s: 2 steps/s, 6 steps left → 3 s.
    assert_eq!(t.rate_and_eta(), Some((2.0, 3.0)));
    // The first step opened the heal screen on the live chart; there is no report to judge yet.
    assert_eq!(s.mode(), Mode::Heal);
    assert!(s.screens.heal().is_some_and(|h| h.round == 3 && h.report.is_none()));
    assert!(records(&press(&mut s, "K")).is_empty());
    assert!(s.status.contains("still healing"), "{}", s.status);
    // Stop cancels the rounds job from the heal screen.
    assert!(matches!(press(&mut s, "s")[..], [Job { kind: JobKind::Cancel(id), .. }] if id == run_id));
    // When the run ends, the live heal screen asks for the round's report.
    let output = JobOutput::Rounds {
        points: vec![
            point(0, crate::eval::RoundStatus::Base, -5.56),
            point(3, crate::eval::RoundStatus::Kept, -5.6),
        ],
        chain: vec![1, 3],
        branch: "main".into(),
        stopped: Some(Stopped::AwaitingGateQ1(3)),
    };
    let jobs = update(&mut s, Msg::Worker(WorkerEvent::Finished { id: run_id, output }));
    // (and, round 3 being new to the screen, for its eval samples).
    assert!(matches!(jobs[..], [Job { kind: JobKind::ReadGateQ1 { round: 3 }, .. }, ..]), "{jobs:?}");
    // Closing the screen and a later step of the same heal does not reopen it.
    press(&mut s, "esc");
    let e = WorkerEvent::HealStep { id: run_id, round: 3, record: Box::new(step_record(3, 8, 1.5)) };
    update(&mut s, Msg::Worker(e));
    assert_eq!(s.mode(), Mode::Iterate);
    assert_eq!(s.heal_training.as_ref().map(|t| t.steps.len()), Some(3));
    // A run that fails frees continue again.
    let jobs = press(&mut s, "c");
    let failed = jobs.first().map(|j| j.id).expect("a new run");
    update(&mut s, Msg::Worker(WorkerEvent::Failed { id: failed, error: "no model".into() }));
    press(&mut s, "esc");
    assert!(matches!(press(&mut s, "c")[..], [Job { kind: JobKind::RunRounds { .. }, .. }]));
}

fn eval_sample(index: usize, id: &str) -> crate::eval::EvalSample {
    crate::eval::EvalSample {
        index,
        id: id.into(),
        condition: crate::eval::Condition::OtherViolate,
        foundation: "Care (e)".into(),
        label: crate::eval::Foundation::Care,
        text: "You see a teenage boy chuckling at an amputee he passes by.".into(),
        think: "The boy mocks someone in pain.".into(),
        think_tokens: 16,
        cases: vec![crate::eval::protocol::AnswerCase::Interrupted; 2],
        p: Some([0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
        human: None,
        p_ans_any: 0.3,
    }
}

#[test]
fn eval_samples_are_read_once_per_round_and_the_sample_keys_step_through_them() {
    use crate::eval::RoundStatus::*;
    use crate::tui::keymap::{Layer, VIM_KEYMAP};
    let mut s = state_with(2);
    let jobs = press(&mut s, "I");
    let table = || JobOutput::Rounds {
        points: vec![point(0, Base, -5.56), point(1, Kept, -5.68), point(2, Dropped, -5.9)],
        chain: vec![1],
        branch: "main".into(),
        stopped: None,
    };
    // The first table asks the worker for every round's samples; a second table while they load asks nothing.
    let jobs = update(&mut s, Msg::Worker(WorkerEvent::Finished { id: jobs[0].id, output: table() }));
    let read = match &jobs[..] {
        [Job { id, kind: JobKind::ReadEvalSamples { rounds } }] if *rounds == vec![0, 1, 2] => *id,
        other => panic!("{other:?}"),
    };
    assert!(update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 900, output: table() })).is_empty());
    // The keys the keymap names for stepping samples.
    let next = s.keymap.hint(Mode::Iterate, Action::NextSample);
    let prev = s.keymap.hint(Mode::Iterate, Action::PrevSample);
    assert_eq!((next.as_str(), prev.as_str()), ("n", "p"));
    press(&mut s, &next);
    assert!(s.status.contains("no eval samples"), "{}", s.status);
    let samples: std::collections::BTreeMap<u32, Vec<crate::eval::EvalSample>> = [
        (0, (0..3).map(|i| eval_sample(i * 3, &format!("b{i}"))).collect()),
        (1, (0..2).map(|i| eval_sample(i * 3, &format!("r{i}"))).collect()),
        (2, vec![]),
    ]
    .into();
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished { id: read, output: JobOutput::EvalSamples { samples } }),
    );
    let shown = |s: &State| {
        let v = s.screens.iterate().expect("iterate");
        v.current_sample().map(|(i, x)| (v.current().map(|p| p.round), i, x.id.clone()))
    };
    assert_eq!(shown(&s), Some((Some(0), 0, "b0".into())));
    press(&mut s, &format!("{next} {next}"));
    assert_eq!(shown(&s), Some((Some(0), 2, "b2".into())));
    press(&mut s, &next);
    assert_eq!(shown(&s), Some((Some(0), 2, "b2".into())), "stops at the last sample");
    press(&mut s, &prev);
    assert_eq!(shown(&s), Some((Some(0), 1, "b1".into())));
    // The next round shows the same item position (so an item can be compared over rounds), clamped to what
    // the round has.
    press(&mut s, "j");
    assert_eq!(shown(&s), Some((Some(1), 1, "r1".into())));
    press(&mut s, &next);
    assert_eq!(shown(&s), Some((Some(1), 1, "r1".into())));
    press(&mut s, &prev);
    assert_eq!(shown(&s), Some((Some(1), 0, "r0".into())));
    press(&mut s, &prev);
    assert_eq!(shown(&s), Some((Some(1), 0, "r0".into())), "stops at the first sample");
    // A new round in a later table is read on its own.
    let mut t = table();
    if let JobOutput::Rounds { points, .. } = &mut t {
        points.push(point(3, Kept, -5.7));
    }
    let jobs = update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 901, output: t }));
    assert!(
        matches!(&jobs[..], [Job { kind: JobKind::ReadEvalSamples { rounds }, .. }] if *rounds == vec![3])
    );
    // A failed read is asked for again with the next table.
    let failed = jobs[0].id;
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Failed { id: failed, error: "round-03/eval/eval.json: gone".into() }),
    );
    s.popup = None;
    let mut t = table();
    if let JobOutput::Rounds { points, .. } = &mut t {
        points.push(point(3, Kept, -5.7));
    }
    let jobs = update(&mut s, Msg::Worker(WorkerEvent::Finished { id: 902, output: t }));
    assert!(
        matches!(&jobs[..], [Job { kind: JobKind::ReadEvalSamples { rounds }, .. }] if *rounds == vec![3])
    );
    // The vim keymap adds N for the previous sample.
    let mut km = crate::tui::keymap::Keymap::defaults().expect("defaults");
    km.merge(Layer::parse(VIM_KEYMAP, std::path::Path::new("keymaps/vim.toml")).expect("vim"))
        .expect("merge");
    s.keymap = km;
    press(&mut s, "k n");
    assert_eq!(shown(&s), Some((Some(0), 1, "b1".into())));
    press(&mut s, "N");
    assert_eq!(shown(&s), Some((Some(0), 0, "b0".into())));
}

#[test]
fn a_decision_the_disk_refused_is_shown_as_not_saved() {
    let mut s = state_with(3);
    let first = press(&mut s, "a");
    let second = press(&mut s, "a");
    let third = press(&mut s, "r");
    assert_eq!(s.decision("p001-a100-s1"), Some(true), "shown at once");
    let recorded = |j: &Job, seq: u64| {
        let event = records(std::slice::from_ref(j))[0].clone();
        Msg::Worker(WorkerEvent::Finished { id: j.id, output: JobOutput::Recorded { seq, event } })
    };
    // The first is saved, the second fails (disk full), the third lands once there is room again.
    update(&mut s, recorded(&first[0], 2));
    let jobs = update(
        &mut s,
        Msg::Worker(WorkerEvent::Failed {
            id: second[0].id,
            error: "sessions/t/events.jsonl: No space left on device; the event was not saved".into(),
        }),
    );
    assert!(s.status.starts_with("NOT SAVED: accept p001-a100-s1"), "{}", s.status);
    match &s.popup {
        Some(Popup::Message { title, text }) => {
            assert_eq!(title, "Failed while recording");
            assert!(
                text.contains("No space left") && text.contains("Not saved: accept p001-a100-s1"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    let refold = match jobs.as_slice() {
        [Job { id, kind: JobKind::Refold { round: 0 } }] => *id,
        other => panic!("{other:?}"),
    };
    update(&mut s, recorded(&third[0], 3));
    // A decision made after the re-read was asked for stays on screen until its own append answers.
    s.popup = None;
    let late = press(&mut s, "home r");
    assert_eq!(records(&late).len(), 1);
    let (late_id, _) = decision_of(&records(&late)[0]);
    assert_eq!(late_id, "p000-a100-s0");
    // What the disk holds: round 0 started, the first accept and the third's reject.
    let mut on_disk = fold(&[SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None }]);
    apply_event(&mut on_disk, &records(&first)[0]);
    apply_event(&mut on_disk, &records(&third)[0]);
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Finished {
            id: refold,
            output: JobOutput::Refolded { state: Box::new(on_disk), round: 0, rows: vec![] },
        }),
    );
    assert_eq!(s.decision("p001-a100-s1"), None, "the refused accept is not shown as saved");
    assert_eq!(s.decision("p002-a100-s2"), Some(false));
    assert!(s.saving.contains_key(&late[0].id), "still waiting for its append");
    assert_eq!(s.saving.len(), 1);
}

#[test]
fn warnings_stay_on_screen_and_the_outcome_says_how_it_ended() {
    let mut s = state_with(2);
    s.warnings = vec!["events.jsonl: line 9: last line is truncated".into()];
    s.model = ModelStatus::NotLoaded;
    update(&mut s, Msg::Init);
    update(
        &mut s,
        Msg::Worker(WorkerEvent::ModelReady {
            id: 1,
            model: "tiny".into(),
            vector_layers: vec![],
            round: None,
        }),
    );
    // Ticks (the status line's clock) do not clear it either.
    for _ in 0..40 {
        update(&mut s, Msg::Tick { now: "t".into() });
    }
    update(
        &mut s,
        Msg::Worker(WorkerEvent::Failed { id: 99, error: "round-01/eval/eval.json: gone".into() }),
    );
    match &s.popup {
        Some(Popup::Message { title, text }) => {
            assert_eq!(title, "Session opened with warnings");
            assert!(text.contains("last line is truncated") && text.contains("eval.json: gone"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.outcome(), Outcome::default(), "a clean quit");
    s.model = ModelStatus::Failed("m.gguf: corrupt".into());
    s.signal = Some(StopSignal::Term);
    assert_eq!(
        s.outcome(),
        Outcome {
            signal: Some(StopSignal::Term),
            model_failed: Some("m.gguf: corrupt".into()),
            not_saved: 0
        }
    );
}
