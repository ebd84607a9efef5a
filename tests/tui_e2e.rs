//! End to end: the real binary in a real terminal (tmux), through the researcher's loop. Make a tiny model and
//! a vector with `extract` + `dose`, open a new session steered by it: round 1's steered completions stream
//! in; accept two, reject one (undo it and reject again), replay one from a later token at a lower dose and
//! adopt it, accept it; pass gate Q0; the heal runs and its gate-Q1 report shows; keep; the iterate screen shows
//! round 1; continue; round 2's completions appear under "round 2". The session's files say round 1 healed on
//! exactly the accepted and adopted completions, each generated at a dose > 0. Reopen: the session resumes on
//! round 2; a second opener is refused while it is open; SIGTERM quits cleanly (exit 143) and leaves the
//! alternate screen.
//!
//! Needs `tmux` (CI installs it). Set `STEER_HEAL_SKIP_TMUX=1` to skip on a machine without it.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use steer_heal::session::{Session, SessionDir};
use steer_heal::steer::{Completion, SteerVector};

const BIN: &str = env!("CARGO_BIN_EXE_steer-heal");

/// A private tmux server (its own socket), killed on drop.
struct Tmux {
    sock: String,
    /// The program's exit status, written by the wrapping shell: tmux sometimes marks a pane dead without ever
    /// recording `pane_dead_status`, so the test does not rely on it.
    status_file: std::path::PathBuf,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        let status_file =
            std::env::temp_dir().join(format!("steer-heal-e2e-{}-{tag}.status", std::process::id()));
        let _ = std::fs::remove_file(&status_file);
        Tmux { sock: format!("steer-heal-e2e-{}-{tag}", std::process::id()), status_file }
    }
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.sock).args(args).output().expect("run tmux")
    }
    fn start(&self, cmd: &str) {
        let cmd = format!("sh -c '{cmd}; echo $? > {}'", self.status_file.display());
        let out =
            self.run(&["-f", "/dev/null", "new-session", "-d", "-s", "e2e", "-x", "120", "-y", "40", &cmd]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        // Keep the pane after the program exits so its exit status and final screen can be read.
        self.run(&["set-option", "-t", "e2e", "remain-on-exit", "on"]);
    }
    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "e2e"]).stdout).into_owned()
    }
    fn pane(&self, fmt: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "e2e", fmt]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "e2e", keys]);
    }
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn wait_dead(&self, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let status = std::fs::read_to_string(&self.status_file).unwrap_or_default();
            if !status.trim().is_empty() {
                return status.trim().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "the TUI did not exit:\n{}", self.capture());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    /// Pid of the TUI itself (the child of the wrapping shell).
    fn program_pid(&self) -> String {
        let shell = self.pane("#{pane_pid}");
        let out = Command::new("pgrep").args(["-P", &shell]).output().expect("pgrep");
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.status_file);
        let _ = self.run(&["kill-server"]);
    }
}

fn tmux_available() -> bool {
    if std::env::var_os("STEER_HEAL_SKIP_TMUX").is_some() {
        return false;
    }
    let ok = Command::new("tmux").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "tmux is needed for this test (or set STEER_HEAL_SKIP_TMUX=1)");
    true
}

fn tui_command(config: &Path, session: &Path, model: &Path, vector: &Path) -> String {
    format!(
        // Random weights write gibberish: the new session's filter is opened (as `just tiny-run` does) so the
        // walk-down's probe passes, instead of walking the dose down to its floor.
        "env XDG_CONFIG_HOME={} {BIN} tui {} --model {} --vector {} --max-new-tokens 8 --max-ppl 1e30 --max-repetition 1.01",
        config.display(),
        session.display(),
        model.display(),
        vector.display()
    )
}

fn decided(screen: &str, n: usize, of: usize) -> bool {
    screen.contains(&format!("decided {n}/{of}"))
}

#[test]
fn a_steered_round_is_curated_healed_kept_and_the_next_round_comes_back_to_gate_q0() {
    if !tmux_available() {
        eprintln!("skipped: STEER_HEAL_SKIP_TMUX is set");
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let (model, vector) = common::cli_tiny_model_and_vector(d.path(), true);
    let c_star = SteerVector::load(&vector).expect("vector").calibrated().expect("dosed");
    let session = d.path().join("sessions").join("e2e");
    let config = d.path().join("config"); // no user keymap: the defaults apply

    let t = Tmux::new("first");
    t.start(&tui_command(&config, &session, &model, &vector));
    t.wait_for("the first frame", 30, |s| s.contains("steer-heal") && s.contains("session e2e"));
    // Round 1's steered completions stream in (the walk-down's probe: 4), steered at c* from the file.
    let screen = t.wait_for("round 1's completions", 180, |s| {
        s.contains("completions 4/4") && decided(s, 0, 4) && s.contains("(steering L")
    });
    assert!(screen.contains("round 1 │") && screen.contains("(steering L"), "{screen}");
    assert!(screen.contains(&format!("× c* {c_star:.2}")), "{screen}");
    t.keys("a");
    t.wait_for("first accept", 60, |s| decided(s, 1, 4));
    t.keys("a");
    t.wait_for("second accept", 60, |s| decided(s, 2, 4) && s.contains("kept 2"));
    t.keys("r");
    t.wait_for("reject", 60, |s| decided(s, 3, 4) && s.contains("kept 2"));
    t.keys("u");
    t.wait_for("undo", 60, |s| decided(s, 2, 4) && s.contains("undid reject of p000-a100-s1044"));
    t.keys("r");
    t.wait_for("reject again", 60, |s| decided(s, 3, 4));
    // The fourth completion: from token 2, three dose steps down (0.7 × c*), replay, adopt, accept.
    t.keys("l");
    t.keys("l");
    for _ in 0..3 {
        t.keys("-");
    }
    t.wait_for("the slider at 0.70", 30, |s| s.contains("0.70 × c*"));
    t.keys("b");
    t.wait_for("the replay", 120, |s| s.contains("replay ready"));
    t.keys("y");
    t.wait_for("the adopted replay", 30, |s| s.contains("replaced by its replay from token 2"));
    t.keys("a");
    t.wait_for("third accept", 60, |s| decided(s, 4, 4) && s.contains("kept 3"));
    // Gate Q0: heal of round 1 runs in the background; its gate-Q1 report comes up.
    t.keys("P");
    t.wait_for("the gate-Q0 question", 30, |s| s.contains("Pass gate Q0 for round 1"));
    t.keys("y");
    t.wait_for("the gate-Q1 report", 300, |s| {
        s.contains("gate Q1 · round 1") && s.contains("healed student")
    });
    t.keys("K");
    let screen =
        t.wait_for("the iterate screen", 300, |s| s.contains("rounds · branch main") && s.contains("kept"));
    assert!(screen.lines().any(|l| l.contains(" 1 ") && l.contains("kept")), "{screen}");
    t.keys("c");
    let screen = t
        .wait_for("round 2's completions", 300, |s| s.contains("round 2 │") && s.contains("completions 4/4"));
    assert!(screen.contains("p000-a050-s2042"), "{screen}");
    t.keys("q");
    assert_eq!(t.wait_dead(30), "0", "exit status");
    assert_eq!(t.pane("#{alternate_on}"), "0", "the alternate screen was left");
    drop(t);

    // Round 1 healed on exactly the accepted completions, the adopted replay in place of its original.
    let o = Session::open(&session).expect("reopen the session");
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    let r1 = SessionDir::new(&session).round(1);
    let accepted: Vec<Completion> = steer_heal::rounds::read_jsonl(&r1.accepted().abs).expect("accepted");
    let ids: Vec<&str> = accepted.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["p000-a050-s1042", "p000-a075-s1043", "p001-a050-s1045"]);
    assert!(accepted.iter().all(|c| c.dose > 0.0), "every accepted completion was steered");
    let adopted = &accepted[2];
    assert_eq!(adopted.rewinds.len(), 1, "the replay replaced the original");
    assert_eq!(adopted.rewinds[0].at, 2);
    assert!((adopted.rewinds[0].to_dose - 0.7 * c_star).abs() < 1e-6, "{:?}", adopted.rewinds);
    let folded: Vec<(&str, bool)> =
        o.state.rounds[&1].decisions().iter().map(|(k, v)| (*k, v.keep)).collect();
    assert_eq!(
        folded,
        vec![
            ("p000-a050-s1042", true),
            ("p000-a075-s1043", true),
            ("p000-a100-s1044", false),
            ("p001-a050-s1045", true)
        ]
    );
    assert!(r1.heal().adapter().join("adapter_model.safetensors").exists(), "round 1's adapter");
    assert_eq!(o.state.lineage.chain, vec![1], "round 1 kept");
    assert!(o.state.rounds.get(&2).is_some_and(|r| r.started && !r.completion_files.is_empty()));
    drop(o);

    // A session keeps the vector it was created with: another one is refused before the terminal is touched.
    let out = Command::new(BIN).arg("tui").arg(&session).arg("--vector").arg(&model).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the session steers round 1 with") && err.lines().count() == 1, "{err}");

    // Reopen: the session resumes on round 2 (its gate Q0 not passed yet); SIGTERM quits cleanly.
    let t = Tmux::new("second");
    t.start(&format!("env XDG_CONFIG_HOME={} {BIN} tui {}", config.display(), session.display()));
    t.wait_for("the resumed round", 120, |s| {
        s.contains("round 2 │") && decided(s, 0, 4) && s.contains("(steering L")
    });
    let pid = t.program_pid();
    assert!(!pid.is_empty(), "no TUI process under the pane's shell");
    // One process per session: a second TUI and a headless run are refused, naming the one that has it, and
    // nothing is written.
    let log_before = std::fs::read(SessionDir::new(&session).events()).expect("log");
    for args in [
        vec!["tui".to_string()],
        vec!["run".into(), "--model".into(), model.display().to_string(), "--session".into()],
    ] {
        let mut c = Command::new(BIN);
        c.args(&args).arg(&session);
        let out = c.output().expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("the session is open in steer-heal pid {pid}")) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read(SessionDir::new(&session).events()).expect("log"), log_before);
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    assert_eq!(t.wait_dead(30), "143", "SIGTERM quits cleanly, with 128 + 15");
    assert_eq!(t.pane("#{alternate_on}"), "0", "the alternate screen was left");
}

#[test]
fn opening_a_missing_session_without_a_model_is_a_clear_error() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN).arg("tui").arg(d.path().join("nope")).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope: no session here yet; pass --model PATH to create one"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_bad_user_keymap_is_a_clear_error_before_the_terminal_is_touched() {
    let d = tempfile::tempdir().expect("tempdir");
    let km = d.path().join("keys.toml");
    std::fs::write(&km, "[gate-q0]\n\"a\" = \"launch\"\n").expect("write");
    let out =
        Command::new(BIN).arg("tui").arg(d.path().join("s")).arg("--keymap").arg(&km).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys.toml: [gate-q0] key \"a\": unknown action `launch`"), "{err}");
}

/// Disk full during curation (a 2 MiB tmpfs in a private mount namespace, filled while the TUI runs): the
/// append that fails leaves the log as it was, the screen says the decision was not saved and shows what the
/// disk holds, and once there is room again the session goes on and reopens without a torn line.
#[test]
fn a_full_disk_during_curation_loses_no_decision_and_never_corrupts_the_log() {
    if !tmux_available() {
        eprintln!("skipped: STEER_HEAL_SKIP_TMUX is set");
        return;
    }
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    let nsenter = Command::new("nsenter").arg("--version").output();
    if !probe.is_ok_and(|s| s.success()) || !nsenter.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no private mount namespace here (unshare -m, nsenter), so no small disk to fill");
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let (model, vector) = common::cli_tiny_model_and_vector(d.path(), false);
    let config = d.path().join("config");
    // Round 1's completions, on an ordinary disk first.
    let session = d.path().join("s");
    let t = Tmux::new("disk-a");
    t.start(&tui_command(&config, &session, &model, &vector));
    t.wait_for("round 1's completions", 120, |s| s.contains("round 1 │") && s.contains("completions 4/4"));
    t.keys("q");
    assert_eq!(t.wait_dead(30), "0");
    drop(t);
    // The same session on a small disk of its own.
    let mnt = d.path().join("small");
    let saved = d.path().join("saved");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let script = d.path().join("disk.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\nmount -t tmpfs -o size=2m tmpfs {m}\ncp -a {s} {m}/s\nset +e\nenv XDG_CONFIG_HOME={c} {BIN} tui {m}/s\nrc=$?\ncp -a {m}/s {o}\nexit $rc\n",
            m = mnt.display(),
            s = session.display(),
            c = config.display(),
            o = saved.display()
        ),
    )
    .expect("script");
    let t = Tmux::new("disk-b");
    t.start(&format!("unshare -m sh {}", script.display()));
    t.wait_for("the session on the small disk", 60, |s| s.contains("round 1 │") && decided(s, 0, 4));
    // Fill the disk from inside the TUI's mount namespace.
    let ns = t.program_pid();
    assert!(!ns.is_empty(), "no process in the namespace");
    let fill = format!("dd if=/dev/zero of={}/filler bs=4096 2>/dev/null; true", mnt.display());
    let st = Command::new("nsenter").args(["-t", &ns, "-m", "sh", "-c", &fill]).status().expect("nsenter");
    assert!(st.success());
    // Decide back and forth until an append crosses into a page the disk no longer has.
    let mut failed = None;
    for _ in 0..80 {
        t.keys("a");
        t.keys("k");
        t.keys("r");
        t.keys("k");
        std::thread::sleep(Duration::from_millis(60));
        let screen = t.capture();
        if screen.contains("Failed while recording") {
            failed = Some(screen);
            break;
        }
    }
    let screen = failed.unwrap_or_else(|| panic!("no append failed on a full disk:\n{}", t.capture()));
    assert!(screen.contains("No space left on device") && screen.contains("Not saved:"), "{screen}");
    eprintln!("{screen}");
    // Room again: the log was cut back, so the next decisions land as whole lines.
    let st = Command::new("nsenter")
        .args(["-t", &ns, "-m", "rm", "-f", &format!("{}/filler", mnt.display())])
        .status()
        .expect("nsenter");
    assert!(st.success());
    t.keys("Escape");
    t.wait_for("the popup closed", 10, |s| !s.contains("Failed while recording"));
    t.keys("n");
    t.keys("a");
    let screen = t.wait_for("the decision after the disk has room", 30, |s| s.contains(" accepted p0"));
    let shown: usize = (0..=4).find(|n| decided(&screen, *n, 4)).expect("decided count on screen");
    t.keys("q");
    assert_eq!(t.wait_dead(60), "1", "a session with an unsaved change exits non-zero");
    drop(t);
    let o = Session::open(&saved).expect("the session reopens");
    assert!(o.warnings.is_empty(), "no torn or glued line: {:?}", o.warnings);
    assert_eq!(o.state.rounds[&1].decisions().len(), shown, "the screen showed what the disk holds");
}
