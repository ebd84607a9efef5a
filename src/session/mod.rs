//! Sessions on disk (`sessions/<name>/`): `session.toml` (manifest), `events.jsonl` (append-only, one fsynced
//! line per event) and per-round artifact folders (`round-00/…`). State is the fold of the events; resuming
//! re-folds. Artifacts are written temp + fsync + rename, and only then is the event that names them appended,
//! so a crash leaves either no event or a complete file.

pub mod event;
pub mod layout;
pub mod lineage;
pub mod manifest;
pub mod state;

use crate::error::{Error, Result};
use crate::score::{Detectors, PhraseList, RegexList, ScoreCard, ScoredCompletion};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use event::{DecisionKind, EventLog, Gate, Logged, SessionEvent, Stage};
pub use layout::{RoundDir, SessionDir};
pub use lineage::Lineage;
pub use manifest::SessionManifest;
pub use state::{fold, RoundState, SessionState};

/// Schema version of `session.toml` and of every event line this build writes. 2: one round layout for the
/// TUI and headless runs (round 0 is the base's eval, rounds from 1 steer and heal), stages and gates by name.
pub const SCHEMA_VERSION: u32 = 2;

use layout::{MANIFEST, NARRATION as NARRATION_FILE, REFUSAL as REFUSAL_FILE};

/// An open session: its folder, manifest and event log writer.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    manifest: SessionManifest,
    log: EventLog,
    /// Held for as long as the session is open: one writer per session (two would interleave log lines).
    _lock: SessionLock,
}

/// How often a busy session lock is asked again, and how long apart, before it counts as held.
const LOCK_RETRIES: u32 = 10;
const LOCK_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// An exclusive lock on `session.lock`, released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
struct SessionLock {
    _file: std::fs::File,
}

impl SessionLock {
    /// Take the session's lock, or say which process holds it.
    fn take(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = SessionDir::new(dir).lock();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::bad_file(&path, e))?;
        // A lock that is busy is asked again for a moment before it counts as held: a process that spawns a child
        // shares the lock's file with it between fork and exec, so a session just closed in this process can
        // look held for that instant (seen in the test suite, whose tests spawn children beside each other).
        let mut tries = 0;
        let taken = loop {
            match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) if tries < LOCK_RETRIES => {
                    tries += 1;
                    std::thread::sleep(LOCK_RETRY_WAIT);
                }
                other => break other,
            }
        };
        match taken {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder =
                    if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                return Err(Error::bad_file(
                    &path,
                    format!("the session is open in {holder}; close it there first (one process at a time)"),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::bad_file(&path, e)),
        }
        let me = format!("steer-heal pid {}\n", std::process::id());
        // Best effort: the name is only for the message a second opener sees; the lock is what protects.
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(me.as_bytes()));
        Ok(SessionLock { _file: file })
    }
}

/// A session as opened: the writer plus what its log folds to.
#[derive(Debug)]
pub struct Opened {
    /// The session, ready to append to.
    pub session: Session,
    /// The fold of its events.
    pub state: SessionState,
    /// The events themselves.
    pub events: Vec<Logged>,
    /// Problems survived while reading (truncated last line, unknown kinds, anomalies).
    pub warnings: Vec<String>,
}

impl Session {
    /// Create a new session folder with `manifest` and the default pattern files (rounds start when the loop
    /// reaches them).
    pub fn create(dir: &Path, mut manifest: SessionManifest) -> Result<Opened> {
        let mp = dir.join(MANIFEST);
        if mp.exists() {
            return Err(Error::bad_file(&mp, "a session already exists here"));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
        if manifest.filter.narration_file.is_none() {
            crate::fsutil::atomic_write(
                &dir.join(NARRATION_FILE),
                crate::score::patterns::DEFAULT_NARRATION.as_bytes(),
            )?;
            manifest.filter.narration_file = Some(NARRATION_FILE.into());
        }
        if manifest.filter.refusal_file.is_none() {
            crate::fsutil::atomic_write(
                &dir.join(REFUSAL_FILE),
                crate::score::patterns::DEFAULT_REFUSAL.as_bytes(),
            )?;
            manifest.filter.refusal_file = Some(REFUSAL_FILE.into());
        }
        manifest.validate(&mp)?;
        crate::fsutil::atomic_write(&mp, manifest.to_toml()?.as_bytes())?;
        Self::open(dir)
    }

    /// Open an existing session: check its schema, read and fold its log.
    pub fn open(dir: &Path) -> Result<Opened> {
        let mp = dir.join(MANIFEST);
        if !mp.exists() {
            return Err(Error::MissingFile { path: mp, what: "session manifest".into() });
        }
        let text = std::fs::read_to_string(&mp).map_err(|e| Error::bad_file(&mp, e))?;
        let manifest = SessionManifest::parse(&text, &mp)?;
        let lock = SessionLock::take(dir)?;
        // With the lock held no writer is using the folder: any temp file in it is left from a failed write.
        crate::fsutil::remove_stale_temps(dir)?;
        let lp = SessionDir::new(dir).events();
        let contents = event::read_log(&lp)?;
        let log = EventLog::open(&lp, &contents)?;
        let state = fold(contents.events.iter().map(|l| &l.event));
        let mut warnings = contents.warnings;
        warnings.extend(state.anomalies.iter().map(|a| format!("{}: {a}", lp.display())));
        Ok(Opened {
            session: Session { dir: dir.to_path_buf(), manifest, log, _lock: lock },
            state,
            events: contents.events,
            warnings,
        })
    }

    /// Open the session in `dir`, or create it with `manifest` when there is none.
    pub fn open_or_create(dir: &Path, manifest: impl FnOnce() -> Result<SessionManifest>) -> Result<Opened> {
        if dir.join(MANIFEST).exists() {
            Self::open(dir)
        } else {
            Self::create(dir, manifest()?)
        }
    }

    /// The session folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The session's file layout.
    pub fn layout(&self) -> SessionDir {
        SessionDir::new(&self.dir)
    }

    /// The manifest.
    pub fn manifest(&self) -> &SessionManifest {
        &self.manifest
    }

    /// The fold of the log as it is on disk now (what a crash right now would resume from).
    pub fn saved_state(&self) -> Result<SessionState> {
        read_saved(&self.dir)
    }

    /// Sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.log.next_seq()
    }

    /// Append one event (one fsynced line).
    pub fn append(&mut self, e: SessionEvent) -> Result<Logged> {
        self.log.append(e)
    }

    /// Write an artifact at `rel` (temp + fsync + rename), then append the event that references it.
    pub fn write_artifact(&mut self, rel: &str, bytes: &[u8], e: SessionEvent) -> Result<Logged> {
        let path = self.artifact_path(rel)?;
        crate::fsutil::atomic_write(&path, bytes)?;
        self.append(e)
    }

    /// Absolute path of an artifact, refusing paths that leave the session folder.
    pub fn artifact_path(&self, rel: &str) -> Result<PathBuf> {
        let p = Path::new(rel);
        if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::invalid(format!("artifact path `{rel}` must stay inside the session folder")));
        }
        Ok(self.dir.join(p))
    }

    /// A path from the manifest: relative ones are taken relative to `base`.
    fn resolve(base: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    }

    /// The narration and refusal detectors this session uses (its own files, else the built-in defaults).
    pub fn detectors(&self) -> Result<Detectors> {
        let f = &self.manifest.filter;
        let narration = match &f.narration_file {
            Some(p) => RegexList::load(&Self::resolve(&self.dir, p))?,
            None => RegexList::default_narration()?,
        };
        let refusal = match &f.refusal_file {
            Some(p) => PhraseList::load(&Self::resolve(&self.dir, p))?,
            None => PhraseList::default_refusal(),
        };
        Ok(Detectors { narration, refusal })
    }

    /// The completions of a round as they stand now: generated files, then re-scores, then adopted replays.
    pub fn load_round(&self, round: &RoundState) -> Result<Vec<ScoredCompletion>> {
        load_round(&self.dir, round)
    }
}

/// The fold of the session log in `dir` as it is on disk, without opening the session (no lock, no writes):
/// for a read-only look while another process, or this one, has it open.
pub fn read_saved(dir: &Path) -> Result<SessionState> {
    let contents = event::read_log(&SessionDir::new(dir).events())?;
    Ok(fold(contents.events.iter().map(|l| &l.event)))
}

/// Read a round's completions from `dir` (see `Session::load_round`).
pub fn load_round(dir: &Path, round: &RoundState) -> Result<Vec<ScoredCompletion>> {
    let mut rows: Vec<ScoredCompletion> = Vec::new();
    for f in &round.completion_files {
        let path = dir.join(&f.file);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
        let first = rows.len();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let sc: ScoredCompletion = serde_json::from_str(line)
                .map_err(|e| Error::bad_file(&path, format!("line {}: {e}", i + 1)))?;
            rows.push(sc);
        }
        // The log names the completions each file was written with; a file changed since would silently drop
        // completions (and the decisions on them).
        let held: std::collections::BTreeSet<&str> =
            rows[first..].iter().map(|r| r.completion.id.as_str()).collect();
        let missing: Vec<&str> = f.ids.iter().map(String::as_str).filter(|id| !held.contains(id)).collect();
        if !missing.is_empty() {
            return Err(Error::bad_file(
                &path,
                format!(
                    "lacks {} of the {} completions the session log says it was written with ({}); it was changed \
                     after it was written — restore it",
                    missing.len(),
                    f.ids.len(),
                    short_list(&missing)
                ),
            ));
        }
    }
    // Every decision must be on a completion that exists: one that is not would vanish from the gate's count.
    let known: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.completion.id.as_str()).collect();
    let orphans: Vec<&str> = round.decisions().into_keys().filter(|id| !known.contains(id)).collect();
    if !orphans.is_empty() {
        let files: Vec<&str> = round.completion_files.iter().map(|f| f.file.as_str()).collect();
        return Err(Error::bad_file(
            SessionDir::new(dir).events(),
            format!(
                "decides {} completion(s) that no completions file of the round holds ({}; files: {})",
                orphans.len(),
                short_list(&orphans),
                if files.is_empty() { "none".to_string() } else { files.join(", ") }
            ),
        ));
    }
    let index = |rows: &Vec<ScoredCompletion>, id: &str| rows.iter().position(|r| r.completion.id == id);
    for f in &round.rescore_files {
        let path = dir.join(f);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
        let scores: BTreeMap<String, ScoreCard> = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not a score map: {e}")))?;
        for (id, s) in scores {
            if let Some(i) = index(&rows, &id) {
                rows[i].score = s;
            }
        }
    }
    for r in &round.replays {
        let path = dir.join(&r.file);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::bad_file(&path, e))?;
        let sc: ScoredCompletion = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not a completion: {e}")))?;
        match index(&rows, &r.completion) {
            Some(i) => rows[i] = sc,
            None => {
                return Err(Error::bad_file(&path, format!("replays unknown completion `{}`", r.completion)))
            }
        }
    }
    Ok(rows)
}

/// The first few of a list of ids, for a one-line message.
fn short_list(ids: &[&str]) -> String {
    let mut s = ids.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > 3 {
        s.push_str(&format!(" and {} more", ids.len() - 3));
    }
    s
}

/// Serialise rows as JSON lines (the completions, decisions and accepted artifacts).
pub fn to_jsonl<T: serde::Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, r).map_err(|e| Error::invalid(format!("serialising a row: {e}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_open_folds_the_same_state() -> Result<()> {
        let d = tempfile::tempdir()?;
        let dir = d.path().join("s1");
        let mut o = Session::create(&dir, SessionManifest::new("s1", Path::new("m.gguf")))?;
        assert!(dir.join(NARRATION_FILE).exists() && dir.join(REFUSAL_FILE).exists());
        let e = SessionEvent::Decision {
            round: 0,
            completion: "a".into(),
            decision: DecisionKind::Accept,
            tags: vec![],
            note: None,
        };
        let l = o.session.append(e)?;
        assert_eq!(l.seq, 1);
        state::apply(&mut o.state, &l.event);
        // One process at a time: a second opener is told who has it, and nothing is written.
        let busy = Session::open(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(busy.contains("the session is open in steer-heal pid"), "{busy}");
        assert_eq!(read_saved(&dir)?, o.state, "a read-only look needs no lock");
        let Opened { session, state: folded, .. } = o;
        drop(session);
        let again = Session::open(&dir)?;
        assert_eq!(again.state, folded);
        assert!(again.warnings.is_empty());
        drop(again);
        assert!(Session::create(&dir, SessionManifest::new("s1", Path::new("m"))).is_err());
        Ok(())
    }

    #[test]
    fn artifacts_cannot_escape_the_session() -> Result<()> {
        let d = tempfile::tempdir()?;
        let o = Session::create(d.path(), SessionManifest::new("s", Path::new("m")))?;
        assert!(o.session.artifact_path("../x").is_err());
        assert!(o.session.artifact_path("/etc/x").is_err());
        assert!(o.session.artifact_path(&o.session.layout().round(0).dose().rel).is_ok());
        Ok(())
    }

    #[test]
    fn edited_pattern_file_is_used_and_a_broken_one_is_reported() -> Result<()> {
        let d = tempfile::tempdir()?;
        let o = Session::create(d.path(), SessionManifest::new("s", Path::new("m")))?;
        std::fs::write(d.path().join(NARRATION_FILE), "\\bverily\\b\n")?;
        let det = o.session.detectors()?;
        assert_eq!(det.narration.len(), 1);
        std::fs::write(d.path().join(NARRATION_FILE), "[oops\n")?;
        let e = o.session.detectors().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("narration.txt: line 1: bad pattern"), "{e}");
        Ok(())
    }
}
