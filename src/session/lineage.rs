//! Round lineage, part of the one fold of the session's events (`SessionState::lineage`): which stages of which
//! round are done, which rounds were kept or dropped (gates Q1 and Q2), and the active chain of kept rounds after
//! rollbacks and forks. Pure; no I/O.

use super::event::{Gate, SessionEvent, Stage};
use std::collections::{BTreeMap, BTreeSet};

/// The lineage of a session as its events tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lineage {
    /// Finished stages per round, with the artifact each wrote.
    pub done: BTreeMap<u32, BTreeMap<Stage, String>>,
    /// The researcher's gate-Q1 call per round (kept or dropped), before gate Q2.
    pub q1: BTreeMap<u32, bool>,
    /// Keep/drop per round: set by gate `q2`; a later drop at any gate (the researcher at `q1`) overrides it.
    pub verdicts: BTreeMap<u32, (bool, Option<String>)>,
    /// The kept rounds the student carries now, in order (after rollbacks and forks).
    pub chain: Vec<u32>,
    /// Rounds that left the chain through a rollback or fork (still on disk and in the log).
    pub abandoned: BTreeSet<u32>,
    /// Current branch name (`main` until a fork).
    pub branch: String,
    /// The round the next round descends from (0 = the base).
    pub parent: u32,
}

impl Default for Lineage {
    fn default() -> Self {
        Lineage {
            done: BTreeMap::new(),
            q1: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            chain: Vec::new(),
            abandoned: BTreeSet::new(),
            branch: "main".into(),
            parent: 0,
        }
    }
}

impl Lineage {
    /// Fold the events, in order.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a SessionEvent>) -> Self {
        let mut l = Lineage::default();
        for e in events {
            l.apply(e);
        }
        l
    }

    /// Apply one event.
    pub fn apply(&mut self, e: &SessionEvent) {
        let l = self;
        {
            match e {
                SessionEvent::StageDone { round, stage, file } => {
                    l.done.entry(*round).or_default().insert(*stage, file.clone());
                }
                SessionEvent::RoundGate { round, gate: Gate::Q1, keep, .. } if *keep => {
                    l.q1.insert(*round, true);
                }
                SessionEvent::RoundGate { round, gate: Gate::Q2, keep, note } => {
                    l.verdicts.insert(*round, (*keep, note.clone()));
                    if *keep && !l.chain.contains(round) {
                        l.chain.push(*round);
                    }
                    if *keep {
                        l.parent = *round;
                    }
                }
                // The researcher dropping a round at gate Q1 (after looking at the healed student) takes it out.
                SessionEvent::RoundGate { round, gate, keep: false, note } => {
                    if *gate == Gate::Q1 {
                        l.q1.insert(*round, false);
                    }
                    l.verdicts.insert(*round, (false, note.clone()));
                    l.chain.retain(|r| r != round);
                    if l.parent == *round {
                        l.parent = l.chain.last().copied().unwrap_or(0);
                    }
                }
                SessionEvent::Rollback { to_round } => l.cut_to(*to_round),
                SessionEvent::Fork { from_round, branch } => {
                    l.cut_to(*from_round);
                    l.branch = branch.clone();
                }
                _ => {}
            }
        }
    }

    /// Keep the chain up to and including `to` (0 = the base: empty chain).
    fn cut_to(&mut self, to: u32) {
        let keep_len = if to == 0 {
            0
        } else {
            self.chain.iter().position(|r| *r == to).map_or(self.chain.len(), |i| i + 1)
        };
        for r in self.chain.drain(keep_len..) {
            self.abandoned.insert(r);
        }
        self.parent = if to == 0 { 0 } else { self.chain.last().copied().unwrap_or(0) };
    }

    /// Whether `stage` of `round` has finished.
    pub fn is_done(&self, round: u32, stage: Stage) -> bool {
        self.done.get(&round).is_some_and(|m| m.contains_key(&stage))
    }

    /// The highest round number that has any event (0 when none).
    pub fn last_round(&self) -> u32 {
        let a = self.done.keys().next_back().copied().unwrap_or(0);
        let b = self.verdicts.keys().next_back().copied().unwrap_or(0);
        a.max(b)
    }

    /// Whether the researcher can roll back to or fork from `round` (the base or a kept round).
    pub fn is_kept(&self, round: u32) -> bool {
        round == 0 || self.verdicts.get(&round).is_some_and(|v| v.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(round: u32, keep: bool) -> SessionEvent {
        SessionEvent::RoundGate { round, gate: Gate::Q2, keep, note: None }
    }

    #[test]
    fn rollback_and_fork_cut_the_chain_but_keep_history() {
        let events = vec![
            SessionEvent::StageDone {
                round: 1,
                stage: Stage::Extract,
                file: crate::session::SessionDir::new(std::path::Path::new(".")).round(1).vector().rel,
            },
            gate(1, true),
            gate(2, false),
            gate(3, true),
            SessionEvent::Rollback { to_round: 1 },
            gate(4, true),
            SessionEvent::Fork { from_round: 0, branch: "alt".into() },
        ];
        let l = Lineage::fold(&events);
        assert!(l.is_done(1, Stage::Extract));
        assert!(!l.is_done(1, Stage::Dose));
        assert_eq!(l.chain, Vec::<u32>::new());
        assert_eq!(l.abandoned, BTreeSet::from([1, 3, 4]));
        assert_eq!(l.branch, "alt");
        assert_eq!(l.parent, 0);
        assert!(!l.is_kept(2));
        assert!(l.is_kept(3));
        let dropped_at_q1 = Lineage::fold(&[
            gate(1, true),
            gate(2, true),
            SessionEvent::RoundGate { round: 2, gate: Gate::Q1, keep: false, note: Some("drifted".into()) },
        ]);
        assert_eq!(dropped_at_q1.chain, vec![1]);
        assert_eq!(dropped_at_q1.parent, 1);
        assert!(!dropped_at_q1.is_kept(2));
        let before_fork = Lineage::fold(&events[..6]);
        assert_eq!(before_fork.chain, vec![1, 4]);
        assert_eq!(before_fork.parent, 4);
        assert_eq!(before_fork.last_round(), 4);
    }
}
