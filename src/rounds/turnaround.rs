//! Round turnaround: the wall time a researcher waits from passing gate Q0 of a round to the next round's first
//! completions on screen, stage by stage, read from the session's event log (every event carries its time). The
//! base model's eval runs once per session, during round 1's turnaround; it is reported on its own line and left
//! out of the total, so that the figure is the one every later round costs.

use crate::session::event::{Logged, SessionEvent, Stage};
use serde::Serialize;

/// One stage's share of a turnaround.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTime {
    /// What ran (e.g. "heal", "eval (round and controls)").
    pub stage: String,
    /// Wall seconds from the previous milestone to this stage's end.
    pub seconds: f64,
}

/// The turnaround from gate Q0 of `round` to round `round + 1`'s first completions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Turnaround {
    /// The round whose gate Q0 starts it.
    pub round: u32,
    /// Stages in the order they ran (the base eval excluded).
    pub stages: Vec<StageTime>,
    /// The base model's eval when it ran inside this turnaround (round 1), seconds; not in `total_s`.
    pub base_eval_s: Option<f64>,
    /// Sum of `stages`.
    pub total_s: f64,
}

fn seconds(at: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(at).ok().map(|t| t.timestamp_millis() as f64 / 1e3)
}

/// The turnaround after gate Q0 of `round`, if the log holds it whole (gate Q0 passed and the next round's first
/// completions written).
pub fn turnaround(events: &[Logged], round: u32) -> Option<Turnaround> {
    let next = round + 1;
    let mut start = None;
    let mut marks: Vec<(&'static str, f64)> = Vec::new();
    for e in events {
        let Some(t) = seconds(&e.at) else { continue };
        match &e.event {
            SessionEvent::StageDone { round: r, stage: Stage::GateQ0, .. } if *r == round => {
                start = Some(t);
                marks.clear();
            }
            _ if start.is_none() => {}
            SessionEvent::StageDone { round: r, stage, .. } => {
                let name = match (*r, stage) {
                    (r, Stage::Heal) if r == round => "heal (train the LoRA, gate Q1 measurements)",
                    (r, Stage::Bake) if r == round => "bake (merge, export)",
                    (0, Stage::Eval) => "base eval",
                    (r, Stage::Eval) if r == round => "eval (round and controls)",
                    (r, Stage::Extract) if r == next => "next extract",
                    (r, Stage::Dose) if r == next => "next dose",
                    _ => continue,
                };
                marks.push((name, t));
            }
            SessionEvent::CompletionsGenerated { round: r, .. } if *r == next => {
                marks.push(("next generation to the first completions", t));
                let start = start?;
                let mut stages = Vec::new();
                let mut base_eval_s = None;
                let mut prev = start;
                for (name, t) in marks {
                    let s = (t - prev).max(0.0);
                    prev = t;
                    if name == "base eval" {
                        base_eval_s = Some(s);
                    } else {
                        stages.push(StageTime { stage: name.into(), seconds: s });
                    }
                }
                let total_s = stages.iter().map(|s| s.seconds).sum();
                return Some(Turnaround { round, stages, base_eval_s, total_s });
            }
            _ => {}
        }
    }
    None
}

impl Turnaround {
    /// A markdown table: stage, seconds, share of the total.
    pub fn table(&self) -> String {
        let mut s =
            format!("| round {} → {} | seconds | share |\n|---|---|---|\n", self.round, self.round + 1);
        for st in &self.stages {
            s.push_str(&format!(
                "| {} | {:.1} | {:.0} % |\n",
                st.stage,
                st.seconds,
                100.0 * st.seconds / self.total_s.max(1e-9)
            ));
        }
        s.push_str(&format!(
            "| **turnaround** | **{:.1}** ({:.1} min) | |\n",
            self.total_s,
            self.total_s / 60.0
        ));
        if let Some(b) = self.base_eval_s {
            s.push_str(&format!("| base eval (once per session, not counted) | {b:.1} | |\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, at: &str, event: SessionEvent) -> Logged {
        Logged { seq, at: format!("2026-12-01T10:{at}Z"), event }
    }
    fn done(round: u32, stage: Stage) -> SessionEvent {
        SessionEvent::StageDone { round, stage, file: String::new() }
    }

    #[test]
    fn stages_are_the_gaps_between_milestones_and_the_base_eval_stands_apart() {
        let first = |round| SessionEvent::CompletionsGenerated {
            round,
            prompt_index: 0,
            file: String::new(),
            ids: vec![],
        };
        let log = vec![
            ev(1, "00:00.000", first(1)),
            ev(2, "01:00.000", done(1, Stage::Generate)),
            ev(3, "01:00.500", done(1, Stage::GateQ0)),
            ev(4, "03:00.500", done(1, Stage::Heal)),
            ev(5, "03:10.500", done(1, Stage::Bake)),
            ev(6, "07:10.500", done(0, Stage::Eval)),
            ev(7, "11:10.500", done(1, Stage::Eval)),
            ev(8, "11:30.500", done(2, Stage::Extract)),
            ev(9, "12:00.500", done(2, Stage::Dose)),
            ev(10, "12:45.500", first(2)),
            ev(11, "13:45.500", first(2)),
        ];
        let t = turnaround(&log, 1).expect("whole");
        let secs: Vec<f64> = t.stages.iter().map(|s| s.seconds).collect();
        assert_eq!(secs, vec![120.0, 10.0, 240.0, 20.0, 30.0, 45.0]);
        assert_eq!(t.base_eval_s, Some(240.0));
        assert_eq!(t.total_s, 465.0);
        assert!(t.table().contains("| **turnaround** | **465.0** (7.8 min)"));
        // Not whole: round 2 never reached its first completions.
        assert!(turnaround(&log[..9], 1).is_none());
        assert!(turnaround(&log, 2).is_none());
    }
}
