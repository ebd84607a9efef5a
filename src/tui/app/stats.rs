//! Numbers the screen shows, derived from `State` only: progress (decided / total, kept, auto-agreement), the
//! filter's precision/recall and suggested thresholds against the decisions so far, self-consistency (kappa)
//! from blind re-shows, and the gate-Q0 report text.

use super::State;
use crate::score::agreement::{
    best_threshold, cohen_kappa, cohen_kappa_ci, Confusion, Feature, Labeled, ThresholdSuggestion,
};
use crate::score::gate::{render_gate_q0, GateInputs, GateItem};

/// The progress line's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Completions in the round so far.
    pub total: usize,
    /// Completions planned for the round.
    pub planned: usize,
    /// Decided.
    pub decided: usize,
    /// Accepted.
    pub kept: usize,
    /// Share of decided items where the filter agrees with the researcher.
    pub agreement: Option<f64>,
}

/// Items the researcher decided, with their scores.
pub fn labeled(s: &State) -> Vec<Labeled<'_>> {
    s.rows
        .iter()
        .filter_map(|r| s.decision(&r.completion.id).map(|k| Labeled { score: &r.score, human_keep: k }))
        .collect()
}

/// Progress numbers.
pub fn progress(s: &State) -> Progress {
    let l = labeled(s);
    let c = Confusion::from_labeled(&l);
    Progress {
        total: s.rows.len(),
        planned: s.planned().max(s.rows.len()),
        decided: l.len(),
        kept: l.iter().filter(|x| x.human_keep).count(),
        agreement: c.agreement(),
    }
}

/// The filter against the researcher.
pub fn confusion(s: &State) -> Confusion {
    Confusion::from_labeled(&labeled(s))
}

/// The best cut on each score.
pub fn suggestions(s: &State) -> Vec<(Feature, Option<ThresholdSuggestion>)> {
    let l = labeled(s);
    Feature::ALL.iter().map(|f| (*f, best_threshold(&l, *f))).collect()
}

/// Self-consistency numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kappa {
    /// Re-shown items whose original decision still stands.
    pub n: usize,
    /// Of those, decided the same way.
    pub same: usize,
    /// Cohen's kappa, when defined.
    pub kappa: Option<f64>,
    /// Its 95 % bootstrap interval over the re-shown items, when defined.
    pub ci: Option<crate::stats::Interval>,
}

/// Pairs `(current decision, blind re-decision)` of re-shown items.
pub fn reshow_pairs(s: &State) -> Vec<(bool, bool)> {
    let Some(r) = s.round_state() else { return vec![] };
    r.reshown.iter().filter_map(|(id, again)| r.decision(id).map(|d| (d.keep, *again))).collect()
}

/// Cohen's kappa of the blind re-shows.
pub fn kappa(s: &State) -> Kappa {
    let pairs = reshow_pairs(s);
    Kappa {
        n: pairs.len(),
        same: pairs.iter().filter(|(a, b)| a == b).count(),
        kappa: cohen_kappa(&pairs),
        ci: cohen_kappa_ci(&pairs),
    }
}

/// The `gate-q0.md` text for the round as it stands.
pub fn gate_markdown(s: &State, passed: bool) -> String {
    let tags: Vec<Vec<String>> = s.rows.iter().map(|r| s.tags_of(&r.completion.id)).collect();
    let notes: Vec<Option<String>> = s.rows.iter().map(|r| s.note_of(&r.completion.id)).collect();
    let items = s
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| GateItem {
            id: &r.completion.id,
            prompt: &r.completion.prompt,
            text: &r.completion.text,
            score: &r.score,
            human_keep: s.decision(&r.completion.id),
            tags: &tags[i],
            note: notes[i].as_deref(),
        })
        .collect();
    let model = match &s.model {
        super::ModelStatus::Ready { model, .. } => model.clone(),
        _ => s.manifest.model.display().to_string(),
    };
    render_gate_q0(&GateInputs {
        round: s.round,
        session: &s.session_name,
        model: &model,
        written_at: &s.now,
        passed,
        thresholds: &s.manifest.filter.thresholds,
        items,
        reshow: reshow_pairs(s),
    })
}
