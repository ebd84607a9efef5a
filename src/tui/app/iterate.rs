//! The iterate screen's state and keys (gate Q2): the rounds table and lineage as the worker last read them, the
//! selected round, and the run in progress. Continue runs one more round in the worker; stop cancels it (its
//! finished stages stay and a later continue resumes); roll back and fork append lineage events. A few eval
//! items per round (think text, answer probabilities) are read by the worker when a round first appears and
//! stepped through beside the round's metrics.

use super::{Screen, State};
use crate::eval::{EvalSample, RoundPoint, RoundStatus};
use crate::heal::gate::GateQ1;
use crate::heal::StepRecord;
use crate::rounds::Stopped;
use crate::session::{Gate, SessionEvent};
use crate::tui::action::Action;
use crate::tui::action::Mode;
use crate::worker::{Job, JobId, JobKind};
use std::collections::BTreeMap;

/// What the iterate screen shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterateView {
    /// Progress-map points, base first.
    pub points: Vec<RoundPoint>,
    /// Kept rounds the student carries.
    pub chain: Vec<u32>,
    /// Current branch.
    pub branch: String,
    /// Selected row of the rounds table.
    pub selected: usize,
    /// How the last run ended.
    pub last_run: String,
    /// A handful of eval items per round (round → samples), as the worker read them.
    pub samples: BTreeMap<u32, Vec<EvalSample>>,
    /// Rounds whose samples were asked for and have not arrived, with the job reading them.
    pub samples_pending: BTreeMap<u32, JobId>,
    /// Index of the sample shown; kept when the round changes, so the same item can be compared over rounds
    /// (rounds evaluated with the same settings share their items).
    pub sample: usize,
}

impl IterateView {
    /// The selected point.
    pub fn current(&self) -> Option<&RoundPoint> {
        self.points.get(self.selected)
    }
    /// Rounds judged so far (every point but the base).
    pub fn judged(&self) -> u32 {
        self.points.iter().filter(|p| p.status != RoundStatus::Base).count() as u32
    }
    /// The selected round's samples (empty until the worker has read them).
    pub fn round_samples(&self) -> &[EvalSample] {
        self.current().and_then(|p| self.samples.get(&(p.round as u32))).map(Vec::as_slice).unwrap_or(&[])
    }
    /// The sample shown for the selected round (the index clamped to the samples it has) and its position.
    pub fn current_sample(&self) -> Option<(usize, &EvalSample)> {
        let all = self.round_samples();
        let i = self.sample.min(all.len().checked_sub(1)?);
        Some((i, &all[i]))
    }
    /// Whether `round` is the base or in the current chain (roll back / fork targets).
    pub fn is_kept(&self, round: u32) -> bool {
        round == 0 || self.chain.contains(&round)
    }
}

/// Open the screen and ask the worker for the rounds table.
pub fn open(s: &mut State) -> Vec<Job> {
    if s.screens.iterate().is_none() {
        s.screens.open(Screen::Iterate(IterateView { branch: "main".into(), ..IterateView::default() }));
    }
    vec![s.job(JobKind::RoundsStatus)]
}

/// Keys on the iterate screen.
pub fn action(s: &mut State, a: Action) -> Vec<Job> {
    let Some(v) = s.screens.iterate_mut() else { return vec![] };
    match a {
        Action::NextRound => v.selected = (v.selected + 1).min(v.points.len().saturating_sub(1)),
        Action::PrevRound => v.selected = v.selected.saturating_sub(1),
        Action::NextSample | Action::PrevSample => {
            let n = v.round_samples().len();
            if n == 0 {
                s.status = "no eval samples for this round yet".into();
                return vec![];
            }
            // Step from the index shown (a round with fewer samples clamps it), within the round's samples.
            let shown = v.sample.min(n - 1);
            v.sample = if a == Action::NextSample { (shown + 1).min(n - 1) } else { shown.saturating_sub(1) };
        }
        Action::Cancel => s.screens.close(Mode::Iterate),
        Action::ContinueRounds => {
            let jobs = super::run_loop(s);
            if !jobs.is_empty() {
                s.status = "preparing the next round in the background".into();
            }
            return jobs;
        }
        Action::StopRounds => match s.loop_job {
            Some(id) => {
                s.status = "stopping the round (finished stages are kept)".into();
                return vec![s.job(JobKind::Cancel(id))];
            }
            None => s.status = "no round is running".into(),
        },
        Action::RollbackRound | Action::ForkRound => {
            let Some(p) = v.current() else {
                s.status = "no rounds yet".into();
                return vec![];
            };
            let round = p.round as u32;
            if s.loop_job.is_some() {
                s.status = "stop the running round first".into();
                return vec![];
            }
            if !v.is_kept(round) {
                s.status =
                    format!("round {round} is not in the current lineage; pick the base or a kept round");
                return vec![];
            }
            let e = if a == Action::RollbackRound {
                s.status = format!("rolled back to round {round}");
                SessionEvent::Rollback { to_round: round }
            } else {
                let branch = format!("from-r{round}-{}", s.next_job);
                s.status = format!("branch `{branch}` starts from round {round}");
                SessionEvent::Fork { from_round: round, branch }
            };
            let rec = s.record(e);
            let refresh = s.job(JobKind::RoundsStatus);
            return vec![rec, refresh];
        }
        Action::OpenHeal => {
            let Some(p) = v.current() else {
                s.status = "no rounds yet".into();
                return vec![];
            };
            if p.status == RoundStatus::Base {
                s.status = "the base was not healed; pick a round".into();
                return vec![];
            }
            let round = p.round as u32;
            if s.loop_job.is_some() && s.heal_training.as_ref().is_some_and(|t| t.round == round) {
                // The round is still healing: show the live chart; the report comes when the run ends.
                s.screens.open(Screen::Heal(HealView {
                    round,
                    report: None,
                    scroll: 0,
                    note: String::new(),
                }));
                return vec![];
            }
            return vec![s.job(JobKind::ReadGateQ1 { round })];
        }
        Action::Quit => return super::quit(s),
        Action::ToggleHelp => s.popup = Some(super::Popup::Help { scroll: 0 }),
        _ => {}
    }
    vec![]
}

/// The heal screen: one round's gate-Q1 report, or its live training while the round heals.
#[derive(Debug, Clone, PartialEq)]
pub struct HealView {
    /// Round.
    pub round: u32,
    /// The report (teacher / before / after samples and metrics); `None` while the round is still healing.
    pub report: Option<GateQ1>,
    /// Vertical scroll of the samples.
    pub scroll: u16,
    /// The researcher's note, written into the keep/drop event.
    pub note: String,
}

/// The heal steps a running rounds job has streamed, for the live training chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealTraining {
    /// The rounds job.
    pub job: JobId,
    /// Round being healed.
    pub round: u32,
    /// Steps so far, in order.
    pub steps: Vec<StepRecord>,
}

impl HealTraining {
    /// Optimiser steps per second and the seconds left, from the last step's index, total and elapsed time.
    pub fn rate_and_eta(&self) -> Option<(f64, f64)> {
        let last = self.steps.last()?;
        if last.elapsed_s <= 0.0 || last.step == 0 {
            return None;
        }
        let rate = last.step as f64 / last.elapsed_s;
        let left = last.total_steps.saturating_sub(last.step) as f64 / rate;
        Some((rate, left))
    }
}

/// A gate-Q1 report arrived: show it, with its heal run's logged steps as the training curve (a live curve of
/// the same round is kept: it is as fresh).
pub fn on_gate_q1(s: &mut State, job: JobId, round: u32, report: GateQ1, steps: Vec<StepRecord>) {
    s.screens.open(Screen::Heal(HealView { round, report: Some(report), scroll: 0, note: String::new() }));
    let live = s.heal_training.as_ref().is_some_and(|t| t.round == round && !t.steps.is_empty());
    if !live && !steps.is_empty() {
        s.heal_training = Some(HealTraining { job, round, steps });
    }
}

/// A heal step of a running rounds job arrived: keep it; the first step of a round's heal opens the heal screen
/// on its live chart when the iterate screen is showing.
pub fn on_heal_step(s: &mut State, job: JobId, round: u32, record: StepRecord) {
    let fresh = !s.heal_training.as_ref().is_some_and(|t| t.job == job && t.round == round);
    if fresh {
        s.heal_training = Some(HealTraining { job, round, steps: Vec::new() });
        if s.screens.heal().is_none() && s.screens.iterate().is_some() && s.popup.is_none() {
            s.screens.open(Screen::Heal(HealView { round, report: None, scroll: 0, note: String::new() }));
        }
    }
    if let Some(t) = s.heal_training.as_mut() {
        t.steps.push(record);
    }
}

/// Keys on the heal screen: keep or drop the round (a `round_gate` event at `q1`), scroll, back.
pub fn heal_action(s: &mut State, a: Action) -> Vec<Job> {
    let Some(h) = s.screens.heal_mut() else { return vec![] };
    match a {
        Action::ScrollDown => h.scroll = h.scroll.saturating_add(1),
        Action::ScrollUp => h.scroll = h.scroll.saturating_sub(1),
        Action::Cancel => s.screens.close(Mode::Heal),
        Action::EditNote => {
            let area = super::editor(&h.note);
            s.popup = Some(super::Popup::Edit {
                target: super::EditTarget::RoundNote,
                completion: None,
                area: Box::new(area),
            });
        }
        Action::StopRounds => match s.loop_job {
            Some(id) => {
                s.status = "stopping the round (heal checkpoints; continue resumes)".into();
                return vec![s.job(JobKind::Cancel(id))];
            }
            None => s.status = "no round is running".into(),
        },
        Action::KeepRound | Action::DropRound => {
            let keep = a == Action::KeepRound;
            let round = h.round;
            let Some(report) = h.report.as_ref() else {
                s.status = format!("round {round} is still healing; judge it when its report is in");
                return vec![];
            };
            let (b, after) = (report.before, report.after);
            let mut note = format!(
                "researcher at the heal screen: coherence {:.3} → {}",
                b.coherence,
                after.map(|m| format!("{:.3}", m.coherence)).unwrap_or_else(|| "–".into())
            );
            if !h.note.is_empty() {
                note = format!("{} ({note})", h.note);
            }
            s.status = format!("round {round} {} at gate Q1", if keep { "kept" } else { "dropped" });
            s.screens.close(Mode::Heal);
            // Once the verdict is on disk the loop goes on (see the `Recorded` output in `update`).
            let rec = s.record(SessionEvent::RoundGate { round, gate: Gate::Q1, keep, note: Some(note) });
            return vec![rec];
        }
        Action::Quit => return super::quit(s),
        Action::ToggleHelp => s.popup = Some(super::Popup::Help { scroll: 0 }),
        _ => {}
    }
    vec![]
}

/// A job failed or was cancelled without a rounds table: if it was reading samples, the next rounds table asks
/// again.
pub fn job_ended(s: &mut State, id: JobId) {
    if let Some(v) = s.screens.iterate_mut() {
        v.samples_pending.retain(|_, job| *job != id);
    }
}

/// Eval samples arrived from the worker: keep them by round.
pub fn on_samples(s: &mut State, id: JobId, samples: BTreeMap<u32, Vec<EvalSample>>) {
    let Some(v) = s.screens.iterate_mut() else { return };
    v.samples_pending.retain(|_, job| *job != id);
    v.samples.extend(samples);
}

/// A rounds table arrived from the worker.
/// When the run that was healing ends and its heal screen is still on the live chart, ask for the report.
pub fn on_rounds(
    s: &mut State,
    id: JobId,
    points: Vec<RoundPoint>,
    chain: Vec<u32>,
    branch: String,
    stopped: Option<Stopped>,
) -> Vec<Job> {
    let mut jobs = vec![];
    let _ = id;
    let Some(v) = s.screens.iterate_mut() else { return jobs };
    if let Some(st) = stopped {
        v.last_run = st.to_string();
    }
    v.selected = v.selected.min(points.len().saturating_sub(1));
    // Rounds new to the screen get their eval samples read in the background (each round's eval is final
    // once the round is in the table, so samples are read once).
    let mut missing: Vec<u32> = points
        .iter()
        .map(|p| p.round as u32)
        .filter(|r| !v.samples.contains_key(r) && !v.samples_pending.contains_key(r))
        .collect();
    missing.dedup();
    v.points = points;
    v.chain = chain;
    v.branch = branch;
    if !missing.is_empty() {
        let job = s.job(JobKind::ReadEvalSamples { rounds: missing.clone() });
        if let Some(v) = s.screens.iterate_mut() {
            v.samples_pending.extend(missing.into_iter().map(|r| (r, job.id)));
        }
        jobs.push(job);
    }
    jobs
}
