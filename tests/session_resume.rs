//! Sessions survive anything: resume re-folds to the same state, a truncated last line is reported and
//! dropped, a real `kill -9` in the middle of appending loses no acknowledged event, a newer schema is refused
//! and unknown event kinds are skipped with a warning.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use steer_heal::session::{self, DecisionKind, Session, SessionEvent, SessionManifest};

fn decision(id: &str, d: DecisionKind, note: Option<String>) -> SessionEvent {
    SessionEvent::Decision {
        round: 0,
        completion: id.into(),
        decision: d,
        tags: vec!["narrates".into()],
        note,
    }
}

/// A new session whose round 0 has started (as the loop starts a round: one `round_started` event, seq 1).
fn new_session(dir: &Path) -> session::Opened {
    let mut o =
        Session::create(dir, SessionManifest::new("t", Path::new("models/tiny"))).expect("create session");
    let l = o
        .session
        .append(session::SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None })
        .expect("start round 0");
    session::state::apply(&mut o.state, &l.event);
    o.events.push(l);
    o
}

#[test]
fn resume_refolds_to_the_same_state() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut o = new_session(d.path());
    for (id, k) in [("a", DecisionKind::Accept), ("b", DecisionKind::Reject), ("b", DecisionKind::Undo)] {
        let l = o.session.append(decision(id, k, None)).expect("append");
        session::state::apply(&mut o.state, &l.event);
    }
    drop(o.session);
    let again = Session::open(d.path()).expect("reopen");
    assert_eq!(again.state, o.state);
    let r = again.state.round().expect("round 0");
    assert_eq!(r.decision("a").map(|d| d.keep), Some(true));
    assert_eq!(r.decision("b"), None);
    assert_eq!(again.events.len(), 4);
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
}

#[test]
fn truncated_last_line_is_reported_dropped_and_repaired() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut o = new_session(d.path());
    o.session.append(decision("a", DecisionKind::Accept, None)).expect("append");
    drop(o.session);
    // Simulate a write torn by a crash: half a line, no newline.
    let log = session::SessionDir::new(d.path()).events();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("open log");
    f.write_all(br#"{"v":1,"seq":3,"at":"2026-01-01T00:00:00Z","kind":"decision","round":0,"compl"#)
        .expect("tear");
    drop(f);

    let o = Session::open(d.path()).expect("a torn tail is not fatal");
    assert_eq!(o.events.len(), 2);
    assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
    assert!(o.warnings[0].contains("events.jsonl: line 3: last line is truncated"), "{}", o.warnings[0]);
    let mut s = o.session;
    // The torn bytes were cut off, so the next event starts on a clean line with the next sequence number.
    let l = s.append(decision("b", DecisionKind::Reject, None)).expect("append after repair");
    assert_eq!(l.seq, 3);
    drop(s);
    let o = Session::open(d.path()).expect("reopen");
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert_eq!(o.events.len(), 3);
    let r = o.state.round().expect("round");
    assert_eq!(r.decision("b").map(|d| d.keep), Some(false));
}

#[test]
fn corrupt_line_in_the_middle_is_an_error_naming_file_and_line() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut o = new_session(d.path());
    o.session.append(decision("a", DecisionKind::Accept, None)).expect("append");
    drop(o.session);
    let log = session::SessionDir::new(d.path()).events();
    let text = std::fs::read_to_string(&log).expect("read");
    std::fs::write(&log, format!("garbage\n{text}")).expect("write");
    let e = Session::open(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("events.jsonl: line 1: not valid JSON"), "{e}");
}

#[test]
fn newer_schema_session_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let o = new_session(d.path());
    drop(o.session);
    let mp = session::SessionDir::new(d.path()).manifest();
    let text =
        std::fs::read_to_string(&mp).expect("read").replace("schema_version = 2", "schema_version = 3");
    std::fs::write(&mp, text).expect("write");
    let e = Session::open(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("session.toml: written by a newer steer-heal (session schema 3"), "{e}");
}

#[test]
fn a_session_from_before_the_one_loop_layout_is_refused_with_how_to_carry_it_on() {
    // A schema-1 session as a705e25 wrote it (the TUI's round 0 in completions-pNNN files).
    let d = tempfile::tempdir().expect("tempdir");
    let mp = session::SessionDir::new(d.path()).manifest();
    std::fs::write(
        &mp,
        "schema_version = 1\nname = \"old\"\ncreated = \"t\"\nmodel = \"m\"\n[generation]\ndose = 1.0\n",
    )
    .expect("write");
    let e = Session::open(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("session.toml: written by steer-heal before the one-loop round layout"), "{e}");
    assert!(
        e.contains("start a new session") && e.contains("--vector OLD/round-01/vector.safetensors"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn newer_event_version_is_refused_and_unknown_kinds_are_skipped() {
    let d = tempfile::tempdir().expect("tempdir");
    let o = new_session(d.path());
    drop(o.session);
    let log = session::SessionDir::new(d.path()).events();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("open");
    f.write_all(b"{\"v\":1,\"seq\":2,\"at\":\"t\",\"kind\":\"heal_finished\",\"round\":0,\"loss\":0.4}\n")
        .expect("w");
    drop(f);
    let o = Session::open(d.path()).expect("unknown kinds are not fatal");
    assert_eq!(o.events.len(), 1);
    assert_eq!(o.warnings.len(), 1);
    assert!(o.warnings[0].contains("event kind `heal_finished` is from a newer steer-heal; skipped"));
    // The skipped event's sequence number is not reused.
    let mut s = o.session;
    assert_eq!(s.append(decision("a", DecisionKind::Accept, None)).expect("append").seq, 3);
    drop(s);
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("open");
    f.write_all(b"{\"v\":7,\"seq\":4,\"at\":\"t\",\"kind\":\"decision\"}\n").expect("w");
    drop(f);
    let e = Session::open(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("line 4: written by a newer steer-heal (event schema 7"), "{e}");
}

const CHILD_ENV: &str = "STEER_HEAL_TEST_CHILD_SESSION";

/// Not a test on its own: the child process of `kill_9_mid_write_loses_no_acknowledged_event`. It appends
/// large events forever and prints each sequence number once its line is fsynced.
#[test]
#[ignore]
fn child_appends_forever() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let mut o = Session::open(Path::new(&dir)).expect("child open");
    let note = "x".repeat(64 * 1024); // big lines keep the child inside write and fsync most of the time
    let out = std::io::stdout();
    for i in 0.. {
        let l = o
            .session
            .append(decision(&format!("c{i}"), DecisionKind::Accept, Some(note.clone())))
            .expect("append");
        let mut lock = out.lock();
        writeln!(lock, "{}", l.seq).expect("stdout");
        lock.flush().expect("flush");
    }
}

#[test]
fn kill_9_mid_write_loses_no_acknowledged_event() {
    let d = tempfile::tempdir().expect("tempdir");
    let o = new_session(d.path());
    drop(o.session);
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--ignored", "--exact", "child_appends_forever", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = 0u64;
    let start = Instant::now();
    while acked < 8 && start.elapsed() < Duration::from_secs(60) {
        match lines.next() {
            Some(Ok(l)) => {
                if let Ok(n) = l.trim().parse::<u64>() {
                    acked = n;
                }
            }
            _ => break,
        }
    }
    // SIGKILL while the child is in the middle of its next appends.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    for l in lines.map_while(Result::ok) {
        if let Ok(n) = l.trim().parse::<u64>() {
            acked = acked.max(n);
        }
    }
    assert!(acked >= 8, "child acknowledged only {acked} events");

    let o = Session::open(d.path()).expect("open after kill -9");
    let seqs: Vec<u64> = o.events.iter().map(|e| e.seq).collect();
    assert!(seqs.len() as u64 >= acked, "lost acknowledged events: {} < {acked}", seqs.len());
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "sequence has gaps");
    assert!(o.warnings.len() <= 1, "{:?}", o.warnings);
    eprintln!(
        "kill -9 after {acked} acknowledged: {} events on disk, torn tail: {}",
        seqs.len(),
        o.warnings.len()
    );
    let decided = o.state.round().map(|r| r.decisions().len()).unwrap_or(0);
    assert_eq!(decided, seqs.len() - 1);
    // And the session keeps working.
    let mut s = o.session;
    let l = s.append(decision("after", DecisionKind::Reject, None)).expect("append after kill");
    assert_eq!(l.seq, seqs.len() as u64 + 1);
}
