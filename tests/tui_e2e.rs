//! End to end: the real binary in a real terminal (tmux). Make a tiny model, open a new session, wait for the
//! completions, accept two, reject one, undo one, quit; the log holds exactly those decisions and the fold
//! has the two accepts. Reopen: the screen shows the two decisions; SIGTERM quits cleanly and leaves the
//! alternate screen.
//!
//! Needs `tmux` (CI installs it). Set `STEER_HEAL_SKIP_TMUX=1` to skip on a machine without it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use steer_heal::session::{DecisionKind, Session, SessionEvent};

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

fn tui_command(config: &Path, session: &Path, model: &Path) -> String {
    format!(
        "env XDG_CONFIG_HOME={} {BIN} tui {} --model {} --max-new-tokens 12",
        config.display(),
        session.display(),
        model.display()
    )
}

fn decided(screen: &str, n: usize) -> bool {
    screen.contains(&format!("decided {n}/24"))
}

#[test]
fn accept_two_reject_one_undo_one_quit_and_reopen() {
    if !tmux_available() {
        eprintln!("skipped: STEER_HEAL_SKIP_TMUX is set");
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let model = d.path().join("tiny");
    let out = Command::new(BIN).args(["make-tiny-model"]).arg(&model).output().expect("make-tiny-model");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let session = d.path().join("sessions").join("e2e");
    let config = d.path().join("config"); // no user keymap: the defaults apply

    let t = Tmux::new("first");
    t.start(&tui_command(&config, &session, &model));
    // The first frame appears at once; completions stream in from the worker.
    t.wait_for("the first frame", 30, |s| s.contains("steer-heal") && s.contains("session e2e"));
    let screen = t.wait_for("all 24 completions", 180, |s| s.contains("completions 24/24") && decided(s, 0));
    assert!(screen.contains("(unsteered)"), "{screen}");
    t.keys("a");
    t.wait_for("first accept", 60, |s| decided(s, 1));
    t.keys("a");
    t.wait_for("second accept", 60, |s| decided(s, 2) && s.contains("kept 2"));
    t.keys("r");
    t.wait_for("reject", 60, |s| decided(s, 3) && s.contains("kept 2"));
    t.keys("u");
    let screen = t.wait_for("undo", 60, |s| decided(s, 2) && s.contains("undid reject of p000-a100-s44"));
    assert!(screen.contains("✓ p000-a050-s42") && screen.contains("✓ p000-a075-s43"), "{screen}");
    assert!(screen.contains("· p000-a100-s44"), "{screen}");
    t.keys("q");
    assert_eq!(t.wait_dead(30), "0", "exit status");
    assert_eq!(t.pane("#{alternate_on}"), "0", "the alternate screen was left");
    drop(t);

    // Exactly those decisions are in the log, in order, and the fold has the two accepts.
    let o = Session::open(&session).expect("reopen the session");
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    let decisions: Vec<(String, DecisionKind)> = o
        .events
        .iter()
        .filter_map(|l| match &l.event {
            SessionEvent::Decision { completion, decision, .. } => Some((completion.clone(), *decision)),
            _ => None,
        })
        .collect();
    assert_eq!(
        decisions,
        vec![
            ("p000-a050-s42".to_string(), DecisionKind::Accept),
            ("p000-a075-s43".to_string(), DecisionKind::Accept),
            ("p000-a100-s44".to_string(), DecisionKind::Reject),
            ("p000-a100-s44".to_string(), DecisionKind::Undo),
        ]
    );
    let r = o.state.round().expect("round 0");
    let folded: Vec<(&str, bool)> = r.decisions().iter().map(|(k, v)| (*k, v.keep)).collect();
    assert_eq!(folded, vec![("p000-a050-s42", true), ("p000-a075-s43", true)]);
    assert_eq!(r.completion_files.len(), 8);
    drop(o);

    // Reopen in the TUI: the decisions are on screen; SIGTERM quits cleanly and restores the terminal.
    let t = Tmux::new("second");
    t.start(&format!("env XDG_CONFIG_HOME={} {BIN} tui {}", config.display(), session.display()));
    let screen = t.wait_for("the resumed session", 60, |s| decided(s, 2) && s.contains("completions 24/24"));
    assert!(screen.contains("✓ p000-a050-s42") && screen.contains("· p000-a100-s44"), "{screen}");
    t.wait_for("the model", 60, |s| s.contains("(unsteered)"));
    let pid = t.program_pid();
    assert!(!pid.is_empty(), "no TUI process under the pane's shell");
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    assert_eq!(t.wait_dead(30), "0", "SIGTERM is a clean quit");
    assert_eq!(t.pane("#{alternate_on}"), "0", "the alternate screen was left");
    drop(t);
    let o = Session::open(&session).expect("reopen");
    let n_decisions = o.events.iter().filter(|l| matches!(l.event, SessionEvent::Decision { .. })).count();
    assert_eq!(n_decisions, 4, "reopening adds no decisions");
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
