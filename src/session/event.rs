//! The session's append-only event log (`events.jsonl`): the event enum, its line format, and a reader that
//! survives a process killed mid-write.
//!
//! One line per event: `{"v":1,"seq":7,"at":"2026-…Z","kind":"decision",…}`. `v` is the session schema
//! version, `seq` counts from 1, `kind` names the variant. Later stages add variants; an older build skips a
//! kind it does not know and reports it, and refuses an event whose `v` is newer than it can read.

use super::SCHEMA_VERSION;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The researcher's call on one completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Keep it for healing.
    Accept,
    /// Leave it out.
    Reject,
    /// Take back the most recent accept/reject of the round.
    Undo,
}

impl DecisionKind {
    /// Its name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            DecisionKind::Accept => "accept",
            DecisionKind::Reject => "reject",
            DecisionKind::Undo => "undo",
        }
    }
}

/// A stage of a round, in the order a round runs them (`Controls` only when the session asks for control arms).
/// On disk (`stage_done` events) each is its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The persona vector, extracted from the current student (or the session's own vector in round 1).
    Extract,
    /// Iso-KL calibration: c* stored in the vector file.
    Dose,
    /// Steered completions, generated and scored batch by batch.
    Generate,
    /// The keep/reject decision on each completion (the researcher's, or the automatic verdicts headless).
    GateQ0,
    /// The round's LoRA on the accepted completions, with its gate-Q1 report.
    Heal,
    /// The student's history with the round on top, and the round's record.
    Bake,
    /// tinymfv on the student.
    Eval,
    /// The control arms on the same items.
    Controls,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 8] = [
        Stage::Extract,
        Stage::Dose,
        Stage::Generate,
        Stage::GateQ0,
        Stage::Heal,
        Stage::Bake,
        Stage::Eval,
        Stage::Controls,
    ];
    /// Its name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Extract => "extract",
            Stage::Dose => "dose",
            Stage::Generate => "generate",
            Stage::GateQ0 => "gate_q0",
            Stage::Heal => "heal",
            Stage::Bake => "bake",
            Stage::Eval => "eval",
            Stage::Controls => "controls",
        }
    }
    /// The stage of a name (`None` for an unknown one).
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|x| x.name() == s)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The three human gates of a round. On disk each is `q0`, `q1`, `q2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Curation of the steered completions.
    Q0,
    /// Keep or drop the healed adapter.
    Q1,
    /// The round's eval against the previous rounds.
    Q2,
}

impl Gate {
    /// Its name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Q0 => "q0",
            Gate::Q1 => "q1",
            Gate::Q2 => "q2",
        }
    }
}

/// Something that happened in a session. The only thing ever appended to `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A round began at a base dose.
    RoundStarted {
        /// Round number (0-based).
        round: u32,
        /// Base steering coefficient of the round.
        dose: f64,
        /// Vector file the round steers with, when any.
        #[serde(default)]
        vector: Option<String>,
    },
    /// The worker loaded a model.
    ModelLoaded {
        /// Model id.
        model: String,
        /// Its weights fingerprint.
        weights_hash: String,
    },
    /// Completions for one prompt were generated and written to `file` (relative to the session folder).
    CompletionsGenerated {
        /// Round number.
        round: u32,
        /// Index of the prompt in the session's prompt list (custom prompts count on from there).
        prompt_index: usize,
        /// Artifact with one `ScoredCompletion` per line.
        file: String,
        /// Ids of the completions in the file.
        ids: Vec<String>,
    },
    /// Completions were scored again (new thresholds or pattern files); `file` maps id → score card.
    Rescored {
        /// Round number.
        round: u32,
        /// Artifact (JSON object id → `ScoreCard`).
        file: String,
    },
    /// The researcher accepted, rejected, or undid the last decision.
    Decision {
        /// Round number.
        round: u32,
        /// Completion id (for `undo`: the completion whose decision is taken back).
        completion: String,
        /// What was decided.
        decision: DecisionKind,
        /// Reason tags.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tags: Vec<String>,
        /// Free-text note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// The dose slider moved.
    DoseChanged {
        /// Round number.
        round: u32,
        /// New slider value.
        dose: f64,
    },
    /// A replay (backtrack to token `at`, resample at `dose`) replaced a completion; `file` holds the new one.
    ReplayAdopted {
        /// Round number.
        round: u32,
        /// Completion id.
        completion: String,
        /// Artifact with the replayed `ScoredCompletion`.
        file: String,
        /// First resampled token.
        at: usize,
        /// Dose of the replay.
        dose: f64,
    },
    /// A decided completion was shown again blind and decided again (for self-consistency).
    Reshown {
        /// Round number.
        round: u32,
        /// Completion id.
        completion: String,
        /// The blind decision (accept or reject).
        decision: DecisionKind,
    },
    /// A gate report was written.
    GateWritten {
        /// Round number.
        round: u32,
        /// Which gate.
        gate: Gate,
        /// Artifact path.
        file: String,
        /// Whether the researcher passed the gate with it.
        passed: bool,
    },
    /// A stage of the rounds loop finished and wrote its artifact (resume skips stages that have this event).
    StageDone {
        /// Round number.
        round: u32,
        /// Which stage.
        stage: Stage,
        /// Main artifact of the stage, relative to the session folder.
        file: String,
    },
    /// The keep/drop call on a round at a gate (`q1` or `q2`), with the reason.
    RoundGate {
        /// Round number.
        round: u32,
        /// Which gate.
        gate: Gate,
        /// Whether the round is kept.
        keep: bool,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// The researcher rolled the lineage back: later kept rounds leave the student (they stay on disk and in the log).
    Rollback {
        /// The kept round (0 = the base) the student returns to.
        to_round: u32,
    },
    /// A new branch of the lineage starts from a kept round.
    Fork {
        /// The kept round (0 = the base) the branch starts from.
        from_round: u32,
        /// Branch name.
        branch: String,
    },
}

/// Every `kind` this build understands; a test checks it against the enum.
pub const KNOWN_KINDS: [&str; 13] = [
    "round_started",
    "model_loaded",
    "completions_generated",
    "rescored",
    "decision",
    "dose_changed",
    "replay_adopted",
    "reshown",
    "gate_written",
    "stage_done",
    "round_gate",
    "rollback",
    "fork",
];

/// An event as stored: sequence number, time and the event.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// 1-based position in the log.
    pub seq: u64,
    /// RFC 3339 time it was appended.
    pub at: String,
    /// The event.
    pub event: SessionEvent,
}

/// Serialise one event as a log line (without the newline).
pub fn to_line(seq: u64, at: &str, e: &SessionEvent) -> Result<String> {
    let body =
        serde_json::to_string(e).map_err(|err| Error::invalid(format!("serialising an event: {err}")))?;
    let at = serde_json::to_string(at).map_err(|err| Error::invalid(format!("serialising a time: {err}")))?;
    // The tagged enum serialises as `{"kind":…}`; splice the envelope in front so `kind` stays readable.
    let rest =
        body.strip_prefix('{').ok_or_else(|| Error::invalid("event did not serialise to an object"))?;
    Ok(format!("{{\"v\":{SCHEMA_VERSION},\"seq\":{seq},\"at\":{at},{rest}"))
}

/// What reading a log found.
#[derive(Debug, Clone, Default)]
pub struct LogContents {
    /// Events this build understands, in order.
    pub events: Vec<Logged>,
    /// Human-readable problems that were survived (truncated last line, unknown kinds).
    pub warnings: Vec<String>,
    /// Bytes of the file that hold complete lines; anything after is a torn write.
    pub valid_len: u64,
    /// The last line is complete JSON but lacks its newline.
    pub needs_newline: bool,
    /// Highest sequence number seen, including skipped unknown kinds.
    pub last_seq: u64,
}

enum LineParse {
    Event(Logged),
    Unknown { seq: u64, kind: String },
}

fn parse_line(line: &str) -> std::result::Result<LineParse, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let ver = obj.get("v").and_then(Value::as_u64).ok_or("no schema version `v`")?;
    if ver > SCHEMA_VERSION as u64 {
        return Err(format!(
            "written by a newer steer-heal (event schema {ver}; this build reads up to {SCHEMA_VERSION})"
        ));
    }
    let seq = obj.get("seq").and_then(Value::as_u64).ok_or("no sequence number `seq`")?;
    let at = obj.get("at").and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = obj.get("kind").and_then(Value::as_str).ok_or("no event `kind`")?;
    if !KNOWN_KINDS.contains(&kind) {
        return Ok(LineParse::Unknown { seq, kind: kind.to_string() });
    }
    let event: SessionEvent =
        serde_json::from_value(v.clone()).map_err(|e| format!("bad `{kind}` event: {e}"))?;
    Ok(LineParse::Event(Logged { seq, at, event }))
}

/// Read `events.jsonl`. A bad last line without its newline is a torn write (warning); a bad line anywhere
/// else, or one from a newer schema, is an error naming the file and line.
pub fn read_log(path: &Path) -> Result<LogContents> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LogContents::default()),
        Err(e) => return Err(Error::bad_file(path, e)),
    };
    let mut out = LogContents::default();
    let mut start = 0usize;
    let mut line_no = 0usize;
    while start < bytes.len() {
        line_no += 1;
        let end = bytes[start..].iter().position(|b| *b == b'\n').map(|i| start + i);
        let terminated = end.is_some();
        let stop = end.unwrap_or(bytes.len());
        let raw = &bytes[start..stop];
        let text = String::from_utf8_lossy(raw);
        let next = if terminated { stop + 1 } else { stop };
        if text.trim().is_empty() {
            if terminated {
                out.valid_len = next as u64;
            }
            start = next;
            continue;
        }
        match parse_line(text.trim()) {
            Ok(LineParse::Event(l)) => {
                out.last_seq = out.last_seq.max(l.seq);
                out.events.push(l);
                out.valid_len = next as u64;
                out.needs_newline = !terminated;
            }
            Ok(LineParse::Unknown { seq, kind }) => {
                out.last_seq = out.last_seq.max(seq);
                out.warnings.push(format!(
                    "{}: line {line_no}: event kind `{kind}` is from a newer steer-heal; skipped",
                    path.display()
                ));
                out.valid_len = next as u64;
                out.needs_newline = !terminated;
            }
            Err(reason) if !terminated => {
                // Only the very last write can be torn: the writer appends a whole line and its newline at once.
                out.warnings.push(format!(
                    "{}: line {line_no}: last line is truncated ({} bytes, {reason}); the event being written when \
                     the process stopped was lost",
                    path.display(),
                    raw.len()
                ));
            }
            Err(reason) => {
                return Err(Error::bad_file(path, format!("line {line_no}: {reason}")));
            }
        }
        start = next;
    }
    Ok(out)
}

/// The open, append-only event log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: std::fs::File,
    next_seq: u64,
    /// Bytes that hold complete, durable lines. A failed append cuts the file back to this length, so a full
    /// disk never leaves half a line for the next append to glue onto.
    len: u64,
    /// A failed append could not cut its partial line off yet (the cut itself failed): the next append cuts
    /// first, and refuses to write while it cannot.
    torn: bool,
    /// Tests: the next append writes only this many bytes and then fails as a full disk does.
    #[cfg(test)]
    fail_after: Option<usize>,
}

impl EventLog {
    /// Open for appending after `contents` (from `read_log` of the same file): a torn tail is cut off and a
    /// missing final newline is added, so the next line starts clean.
    pub fn open(path: &Path, contents: &LogContents) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::bad_file(path, e))?;
        let len = file.metadata().map_err(|e| Error::bad_file(path, e))?.len();
        if len > contents.valid_len {
            file.set_len(contents.valid_len).map_err(|e| Error::bad_file(path, e))?;
        }
        use std::io::Seek;
        let mut len = file.seek(std::io::SeekFrom::End(0)).map_err(|e| Error::bad_file(path, e))?;
        if contents.needs_newline {
            file.write_all(b"\n").map_err(|e| Error::bad_file(path, e))?;
            len += 1;
        }
        file.sync_all().map_err(|e| Error::bad_file(path, e))?;
        Ok(EventLog {
            path: path.to_path_buf(),
            file,
            next_seq: contents.last_seq + 1,
            len,
            torn: false,
            #[cfg(test)]
            fail_after: None,
        })
    }

    /// Append one event as one line, then fsync; returns what was stored. On failure the file is as it was
    /// before the call (the partial line is cut off) and the event is not stored: the caller must not show it
    /// as saved.
    pub fn append(&mut self, event: SessionEvent) -> Result<Logged> {
        if self.torn {
            self.cut_back().map_err(|e| {
                Error::bad_file(
                    &self.path,
                    format!("a failed write left a partial line that cannot be cut off: {e}"),
                )
            })?;
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut line = to_line(self.next_seq, &at, &event)?;
        line.push('\n');
        // One write of the whole line: a kill can tear only this line, never an earlier one.
        let written = self.write_line(line.as_bytes());
        if let Err(e) = written {
            // Disk full (or any write error): cut the partial line back now; if even that fails, remember it.
            self.torn = self.cut_back().is_err();
            return Err(Error::bad_file(&self.path, format!("{e}; the event was not saved")));
        }
        self.len += line.len() as u64;
        let logged = Logged { seq: self.next_seq, at, event };
        self.next_seq += 1;
        Ok(logged)
    }

    #[cfg(not(test))]
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.file.write_all(line)?;
        self.file.sync_data()
    }

    #[cfg(test)]
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if let Some(n) = self.fail_after.take() {
            self.file.write_all(&line[..n.min(line.len())])?;
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        self.file.write_all(line)?;
        self.file.sync_data()
    }

    /// Cut the file back to its last complete line and put the write position there.
    fn cut_back(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.set_len(self.len)?;
        self.file.seek(std::io::SeekFrom::Start(self.len))?;
        self.file.sync_data()?;
        self.torn = false;
        Ok(())
    }

    /// Sequence number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every variant; extending the enum without extending this list fails `every_kind_is_known`.
    pub(crate) fn one_of_each() -> Vec<SessionEvent> {
        vec![
            SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None },
            SessionEvent::ModelLoaded { model: "m".into(), weights_hash: "h".into() },
            SessionEvent::CompletionsGenerated { round: 0, prompt_index: 0, file: "f".into(), ids: vec![] },
            SessionEvent::Rescored { round: 0, file: "s".into() },
            SessionEvent::Decision {
                round: 0,
                completion: "c".into(),
                decision: DecisionKind::Accept,
                tags: vec![],
                note: None,
            },
            SessionEvent::DoseChanged { round: 0, dose: 0.5 },
            SessionEvent::ReplayAdopted {
                round: 0,
                completion: "c".into(),
                file: "r".into(),
                at: 3,
                dose: 0.5,
            },
            SessionEvent::Reshown { round: 0, completion: "c".into(), decision: DecisionKind::Reject },
            SessionEvent::GateWritten { round: 0, gate: Gate::Q0, file: "g".into(), passed: false },
            SessionEvent::StageDone { round: 1, stage: Stage::Heal, file: "round-01/heal".into() },
            SessionEvent::RoundGate { round: 1, gate: Gate::Q2, keep: true, note: Some("n".into()) },
            SessionEvent::Rollback { to_round: 0 },
            SessionEvent::Fork { from_round: 0, branch: "b".into() },
        ]
    }

    #[test]
    fn every_kind_is_known() -> Result<()> {
        let kinds: Vec<String> = one_of_each()
            .iter()
            .map(|e| {
                let v = serde_json::to_value(e).map_err(Error::invalid)?;
                Ok(v["kind"].as_str().unwrap_or_default().to_string())
            })
            .collect::<Result<_>>()?;
        assert_eq!(kinds, KNOWN_KINDS.to_vec());
        Ok(())
    }

    #[test]
    fn line_format_round_trips() -> Result<()> {
        for (i, e) in one_of_each().into_iter().enumerate() {
            let line = to_line(i as u64 + 1, "2026-01-01T00:00:00.000Z", &e)?;
            assert!(line.starts_with(&format!("{{\"v\":2,\"seq\":{},\"at\":", i + 1)), "{line}");
            match parse_line(&line) {
                Ok(LineParse::Event(l)) => assert_eq!(l.event, e),
                _ => return Err(Error::invalid(format!("did not parse back: {line}"))),
            }
        }
        Ok(())
    }

    #[test]
    fn a_failed_append_leaves_the_file_as_it_was() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = crate::session::SessionDir::new(d.path()).events();
        let mut log = EventLog::open(&p, &read_log(&p)?)?;
        let decide = |c: &str| SessionEvent::Decision {
            round: 1,
            completion: c.into(),
            decision: DecisionKind::Accept,
            tags: vec![],
            note: None,
        };
        log.append(decide("a"))?;
        let before = std::fs::read(&p)?;
        // The disk fills after 9 bytes of the next line (`{"v":2,"s`).
        log.fail_after = Some(9);
        let e = log.append(decide("b")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&p.display().to_string()) && e.contains("not saved"), "{e}");
        assert_eq!(std::fs::read(&p)?, before, "the partial line is cut back");
        // Space again: the next append is a whole line with the sequence number the failed one did not use.
        let l = log.append(decide("c"))?;
        assert_eq!(l.seq, 2);
        let back = read_log(&p)?;
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
        let ids: Vec<_> = back
            .events
            .iter()
            .map(|l| match &l.event {
                SessionEvent::Decision { completion, .. } => completion.clone(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(ids, ["a", "c"]);
        Ok(())
    }

    #[test]
    fn decision_names_are_the_logged_ones() -> Result<()> {
        for d in [DecisionKind::Accept, DecisionKind::Reject, DecisionKind::Undo] {
            assert_eq!(serde_json::to_value(d).map_err(Error::invalid)?, d.name());
        }
        Ok(())
    }

    #[test]
    fn decision_line_is_readable() -> Result<()> {
        let e = SessionEvent::Decision {
            round: 0,
            completion: "p001-a100-s42".into(),
            decision: DecisionKind::Reject,
            tags: vec!["narrates".into()],
            note: Some("says it defies".into()),
        };
        assert_eq!(
            to_line(5, "T", &e)?,
            r#"{"v":2,"seq":5,"at":"T","kind":"decision","round":0,"completion":"p001-a100-s42","decision":"reject","tags":["narrates"],"note":"says it defies"}"#
        );
        Ok(())
    }
}
