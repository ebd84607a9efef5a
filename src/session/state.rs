//! `SessionState = fold(events)`: what a session knows, rebuilt from its log. Pure: no files are read here
//! (artifacts are referenced by path and loaded by `Session`).

use super::event::{DecisionKind, Gate, SessionEvent};
use super::lineage::Lineage;
use std::collections::{BTreeMap, BTreeSet};

/// One accept/reject as it stands in a round's decision history.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRecord {
    /// Completion id.
    pub completion: String,
    /// True for accept, false for reject.
    pub keep: bool,
    /// Reason tags.
    pub tags: Vec<String>,
    /// Note.
    pub note: Option<String>,
}

/// A completions artifact of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionFile {
    /// Prompt index it was generated for.
    pub prompt_index: usize,
    /// Path relative to the session folder.
    pub file: String,
    /// Ids it holds.
    pub ids: Vec<String>,
}

/// An adopted replay.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayRecord {
    /// Completion id it replaced.
    pub completion: String,
    /// Artifact with the new completion.
    pub file: String,
    /// First resampled token.
    pub at: usize,
    /// Replay dose.
    pub dose: f64,
}

/// A written gate report.
#[derive(Debug, Clone, PartialEq)]
pub struct GateRecord {
    /// Which gate.
    pub gate: Gate,
    /// Artifact path.
    pub file: String,
    /// Passed with it.
    pub passed: bool,
}

/// Everything known about one round.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundState {
    /// Whether its `round_started` event is logged (the loop began generating it).
    pub started: bool,
    /// The round's calibrated coefficient c* (a completion's dose is alpha × c*).
    pub base_dose: f64,
    /// Current dose-slider value, as a multiple of c* (1 = the calibrated dose).
    pub dose: f64,
    /// Completions artifacts, in order.
    pub completion_files: Vec<CompletionFile>,
    /// Re-score artifacts, in order (later ones win).
    pub rescore_files: Vec<String>,
    /// Accept/reject history; `undo` pops from the end, so the current decision of a completion is its last
    /// entry here.
    pub history: Vec<DecisionRecord>,
    /// Adopted replays, in order.
    pub replays: Vec<ReplayRecord>,
    /// Blind re-decisions `(completion, keep)`.
    pub reshown: Vec<(String, bool)>,
    /// Gate reports written.
    pub gates: Vec<GateRecord>,
}

impl RoundState {
    /// The current decision on a completion, if any.
    pub fn decision(&self, id: &str) -> Option<&DecisionRecord> {
        self.history.iter().rev().find(|d| d.completion == id)
    }
    /// Current decisions of every decided completion.
    pub fn decisions(&self) -> BTreeMap<&str, &DecisionRecord> {
        let mut m = BTreeMap::new();
        for d in &self.history {
            m.insert(d.completion.as_str(), d);
        }
        m
    }
    /// Prompt indices that already have completions.
    pub fn generated_prompts(&self) -> BTreeSet<usize> {
        self.completion_files.iter().map(|f| f.prompt_index).collect()
    }
    /// Whether this gate was passed.
    pub fn gate_passed(&self, gate: Gate) -> bool {
        self.gates.iter().any(|g| g.gate == gate && g.passed)
    }
}

/// The fold of a session's events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionState {
    /// Rounds by number.
    pub rounds: BTreeMap<u32, RoundState>,
    /// The latest round started.
    pub current_round: u32,
    /// Last model loaded `(id, weights hash)`.
    pub model: Option<(String, String)>,
    /// Events that did not fit the state (e.g. an undo with nothing to undo), described.
    pub anomalies: Vec<String>,
    /// Stages done, gate verdicts, the kept chain and branch.
    pub lineage: Lineage,
}

impl SessionState {
    /// The current round (empty if none started).
    pub fn round(&self) -> Option<&RoundState> {
        self.rounds.get(&self.current_round)
    }
}

/// Apply one event. Pure and total: an event that does not fit is recorded in `anomalies`, never a panic.
pub fn apply(s: &mut SessionState, e: &SessionEvent) {
    s.lineage.apply(e);
    match e {
        SessionEvent::RoundStarted { round, dose, .. } => {
            let r = s.rounds.entry(*round).or_default();
            r.started = true;
            r.base_dose = *dose;
            r.dose = 1.0;
            s.current_round = s.current_round.max(*round);
        }
        SessionEvent::ModelLoaded { model, weights_hash } => {
            s.model = Some((model.clone(), weights_hash.clone()));
        }
        SessionEvent::CompletionsGenerated { round, prompt_index, file, ids } => {
            s.rounds.entry(*round).or_default().completion_files.push(CompletionFile {
                prompt_index: *prompt_index,
                file: file.clone(),
                ids: ids.clone(),
            });
        }
        SessionEvent::Rescored { round, file } => {
            s.rounds.entry(*round).or_default().rescore_files.push(file.clone());
        }
        SessionEvent::Decision { round, completion, decision, tags, note } => {
            let r = s.rounds.entry(*round).or_default();
            match decision {
                DecisionKind::Accept | DecisionKind::Reject => r.history.push(DecisionRecord {
                    completion: completion.clone(),
                    keep: *decision == DecisionKind::Accept,
                    tags: tags.clone(),
                    note: note.clone(),
                }),
                DecisionKind::Undo => match r.history.pop() {
                    Some(d) if d.completion == *completion => {}
                    Some(d) => s.anomalies.push(format!(
                        "round {round}: undo names `{completion}` but the last decision was on `{}`",
                        d.completion
                    )),
                    None => s.anomalies.push(format!("round {round}: undo with no decision to undo")),
                },
            }
        }
        SessionEvent::DoseChanged { round, dose } => {
            s.rounds.entry(*round).or_default().dose = *dose;
        }
        SessionEvent::ReplayAdopted { round, completion, file, at, dose } => {
            s.rounds.entry(*round).or_default().replays.push(ReplayRecord {
                completion: completion.clone(),
                file: file.clone(),
                at: *at,
                dose: *dose,
            });
        }
        SessionEvent::Reshown { round, completion, decision } => {
            let r = s.rounds.entry(*round).or_default();
            match decision {
                DecisionKind::Accept | DecisionKind::Reject => {
                    r.reshown.push((completion.clone(), *decision == DecisionKind::Accept))
                }
                DecisionKind::Undo => s.anomalies.push(format!("round {round}: a re-show cannot be an undo")),
            }
        }
        SessionEvent::GateWritten { round, gate, file, passed } => {
            s.rounds.entry(*round).or_default().gates.push(GateRecord {
                gate: *gate,
                file: file.clone(),
                passed: *passed,
            });
        }
        // Folded into `lineage` above; a round they name exists.
        SessionEvent::StageDone { round, .. } | SessionEvent::RoundGate { round, .. } => {
            s.rounds.entry(*round).or_default();
        }
        SessionEvent::Rollback { .. } | SessionEvent::Fork { .. } => {}
    }
}

/// Fold events into a state, from empty.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a SessionEvent>) -> SessionState {
    let mut s = SessionState::default();
    for e in events {
        apply(&mut s, e);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(id: &str, d: DecisionKind) -> SessionEvent {
        SessionEvent::Decision { round: 0, completion: id.into(), decision: d, tags: vec![], note: None }
    }

    #[test]
    fn undo_pops_decisions_in_reverse_order() {
        use DecisionKind::*;
        let events = vec![
            SessionEvent::RoundStarted { round: 0, dose: 2.0, vector: None },
            decide("a", Accept),
            decide("b", Reject),
            decide("a", Reject), // change of mind
            decide("a", Undo),   // back to accept
            decide("b", Undo),   // b undecided
            decide("c", Accept),
        ];
        let s = fold(&events);
        let r = s.round().expect("round 0");
        assert_eq!(r.decision("a").map(|d| d.keep), Some(true));
        assert_eq!(r.decision("b"), None);
        assert_eq!(r.decision("c").map(|d| d.keep), Some(true));
        assert_eq!(r.decisions().len(), 2);
        assert!(s.anomalies.is_empty());
        assert_eq!(r.base_dose, 2.0);
    }

    #[test]
    fn fold_is_replayable_prefix_by_prefix() {
        use DecisionKind::*;
        let events = [
            SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None },
            decide("a", Accept),
            SessionEvent::DoseChanged { round: 0, dose: 0.7 },
            decide("b", Reject),
        ];
        // Applying events one by one equals folding them all: resume = re-fold.
        let mut s = SessionState::default();
        for (i, e) in events.iter().enumerate() {
            apply(&mut s, e);
            assert_eq!(s, fold(&events[..=i]));
        }
        assert_eq!(s.round().map(|r| r.dose), Some(0.7));
    }

    #[test]
    fn stray_undo_is_an_anomaly_not_a_panic() {
        let s = fold(&[decide("x", DecisionKind::Undo)]);
        assert_eq!(s.anomalies.len(), 1);
    }

    #[test]
    fn rounds_and_gates() {
        let s = fold(&[
            SessionEvent::RoundStarted { round: 0, dose: 1.0, vector: None },
            SessionEvent::GateWritten { round: 0, gate: Gate::Q0, file: "g".into(), passed: false },
            SessionEvent::GateWritten { round: 0, gate: Gate::Q0, file: "g".into(), passed: true },
            SessionEvent::RoundStarted { round: 1, dose: 0.8, vector: None },
            SessionEvent::Reshown { round: 0, completion: "a".into(), decision: DecisionKind::Reject },
        ]);
        assert_eq!(s.current_round, 1);
        assert!(s.rounds[&0].gate_passed(Gate::Q0));
        assert!(!s.rounds[&1].gate_passed(Gate::Q0));
        assert_eq!(s.rounds[&0].reshown, vec![("a".to_string(), false)]);
    }
}
