//! Gate-Q0 automatic scores of a steered completion: tail perplexity under the base model, repetition,
//! first-person trait narration, refusal, persona strength and KL rmse, and the keep/drop verdict with every
//! reason. Also the agreement statistics between that verdict and the researcher, and the `gate-q0.md` report.
//! Plain library code: no terminal, no session writes (the caller stores what this returns).

pub mod agreement;
pub mod gate;
pub mod patterns;
pub mod perplexity;
pub mod repetition;

use crate::steer::Completion;
use serde::{Deserialize, Serialize};

pub use patterns::{PatternMatch, PhraseList, RegexList};

/// Thresholds of the automatic filter; the defaults are the research code's (`ppl_tau` 50, `rep_tau` 0.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterThresholds {
    /// Drop when the base-model perplexity of the completion's tail is at or above this.
    #[serde(default = "default_ppl")]
    pub max_perplexity: f64,
    /// Drop when the repetition fraction is at or above this.
    #[serde(default = "default_rep")]
    pub max_repetition: f64,
    /// Fraction of the completion's last tokens the perplexity is taken over.
    #[serde(default = "default_tail")]
    pub tail_fraction: f64,
    /// Drop when the KL rmse of the generation trace is at or above this (off when absent).
    #[serde(default)]
    pub max_kl_rmse: Option<f64>,
    /// Drop when the persona strength is below this (off when absent).
    #[serde(default)]
    pub min_persona_strength: Option<f64>,
}

fn default_ppl() -> f64 {
    50.0
}
fn default_rep() -> f64 {
    0.3
}
fn default_tail() -> f64 {
    0.25
}

impl Default for FilterThresholds {
    fn default() -> Self {
        FilterThresholds {
            max_perplexity: default_ppl(),
            max_repetition: default_rep(),
            tail_fraction: default_tail(),
            max_kl_rmse: None,
            min_persona_strength: None,
        }
    }
}

/// The automatic filter's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Passes every filter.
    Keep,
    /// Fails at least one filter.
    Drop,
}

/// Why the filter dropped a completion. Each carries the value that tripped it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// The completion has no tokens.
    Empty,
    /// Tail perplexity at or above the threshold.
    Perplexity {
        /// Measured perplexity.
        value: f64,
        /// Threshold it met or exceeded.
        threshold: f64,
    },
    /// Repetition fraction at or above the threshold.
    Repetition {
        /// Measured fraction.
        value: f64,
        /// Threshold it met or exceeded.
        threshold: f64,
    },
    /// A narration pattern matched.
    Narration {
        /// The pattern (a line of the pattern file).
        pattern: String,
        /// The text it matched.
        matched: String,
    },
    /// A refusal phrase occurs.
    Refusal {
        /// The phrase found.
        phrase: String,
    },
    /// KL rmse at or above the (optional) threshold.
    KlRmse {
        /// Measured rmse, nats.
        value: f64,
        /// Threshold it met or exceeded.
        threshold: f64,
    },
    /// Persona strength below the (optional) threshold.
    WeakPersona {
        /// Measured projection.
        value: f64,
        /// Threshold it fell below.
        threshold: f64,
    },
}

/// The kind of a `Reason`, without its numbers (for filters and counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// See `Reason::Empty`.
    Empty,
    /// See `Reason::Perplexity`.
    Perplexity,
    /// See `Reason::Repetition`.
    Repetition,
    /// See `Reason::Narration`.
    Narration,
    /// See `Reason::Refusal`.
    Refusal,
    /// See `Reason::KlRmse`.
    KlRmse,
    /// See `Reason::WeakPersona`.
    WeakPersona,
}

impl ReasonKind {
    /// Every kind, in display order.
    pub const ALL: [ReasonKind; 7] = [
        ReasonKind::Empty,
        ReasonKind::Perplexity,
        ReasonKind::Repetition,
        ReasonKind::Narration,
        ReasonKind::Refusal,
        ReasonKind::KlRmse,
        ReasonKind::WeakPersona,
    ];
    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            ReasonKind::Empty => "empty",
            ReasonKind::Perplexity => "ppl",
            ReasonKind::Repetition => "rep",
            ReasonKind::Narration => "narrates",
            ReasonKind::Refusal => "refuses",
            ReasonKind::KlRmse => "kl",
            ReasonKind::WeakPersona => "weak",
        }
    }
}

impl Reason {
    /// The kind of this reason.
    pub fn kind(&self) -> ReasonKind {
        match self {
            Reason::Empty => ReasonKind::Empty,
            Reason::Perplexity { .. } => ReasonKind::Perplexity,
            Reason::Repetition { .. } => ReasonKind::Repetition,
            Reason::Narration { .. } => ReasonKind::Narration,
            Reason::Refusal { .. } => ReasonKind::Refusal,
            Reason::KlRmse { .. } => ReasonKind::KlRmse,
            Reason::WeakPersona { .. } => ReasonKind::WeakPersona,
        }
    }
    /// One human line, e.g. `ppl 73.1 ≥ 50`.
    pub fn describe(&self) -> String {
        match self {
            Reason::Empty => "empty completion".into(),
            Reason::Perplexity { value, threshold } => format!("ppl {value:.1} ≥ {threshold}"),
            Reason::Repetition { value, threshold } => format!("repetition {value:.2} ≥ {threshold}"),
            Reason::Narration { matched, .. } => format!("narrates: \"{matched}\""),
            Reason::Refusal { phrase } => format!("refuses: \"{phrase}\""),
            Reason::KlRmse { value, threshold } => format!("kl rmse {value:.2} ≥ {threshold}"),
            Reason::WeakPersona { value, threshold } => format!("persona {value:.2} < {threshold}"),
        }
    }
}

/// Every automatic score of one completion, and the verdict they give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreCard {
    /// Perplexity of the last `tail_fraction` of tokens under the base model; `None` without a base-NLL trace.
    pub perplexity: Option<f64>,
    /// Repetition fraction (max over n = 2..4 of the most frequent word/char n-gram's share).
    pub repetition: f64,
    /// Narration pattern matches.
    pub narration: Vec<PatternMatch>,
    /// Refusal phrase matches.
    pub refusal: Vec<PatternMatch>,
    /// Projection of the mean hidden state on the persona vector; `None` when no vector was given.
    pub persona_strength: Option<f64>,
    /// Root-mean-square of the per-token KL(steered ‖ base), nats.
    pub kl_rmse: f64,
    /// The automatic verdict.
    pub verdict: Verdict,
    /// Every reason for a `Drop` (empty for `Keep`).
    pub reasons: Vec<Reason>,
}

impl ScoreCard {
    /// Whether one of the reasons has this kind.
    pub fn has_reason(&self, kind: ReasonKind) -> bool {
        self.reasons.iter().any(|r| r.kind() == kind)
    }

    /// This card as the walk-down controller's verdict: the same keep/drop, its tail perplexity as the value
    /// (0 without a trace; JSON has no NaN), and its reasons in one line.
    pub fn walk_verdict(&self) -> crate::steer::walkdown::Verdict {
        let reason = if self.reasons.is_empty() {
            "kept by the filter".to_string()
        } else {
            self.reasons.iter().map(Reason::describe).collect::<Vec<_>>().join("; ")
        };
        let value = self.perplexity.filter(|p| p.is_finite()).unwrap_or(0.0);
        crate::steer::walkdown::Verdict { pass: self.verdict == Verdict::Keep, value, reason }
    }
}

/// A completion with its scores: one line of a round's `completions-*.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredCompletion {
    /// The completion.
    pub completion: Completion,
    /// Its automatic scores.
    pub score: ScoreCard,
}

/// The text detectors of the filter (narration patterns and refusal phrases).
#[derive(Debug, Clone)]
pub struct Detectors {
    /// First-person trait narration patterns.
    pub narration: RegexList,
    /// Refusal phrases.
    pub refusal: PhraseList,
}

impl Detectors {
    /// The shipped defaults.
    pub fn defaults() -> crate::Result<Self> {
        Ok(Detectors { narration: RegexList::default_narration()?, refusal: PhraseList::default_refusal() })
    }
}

/// Root-mean-square of a trace (0 for an empty one): `sqrt(mean(x²))`.
pub fn rmse(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let ss: f64 = xs.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    (ss / xs.len() as f64).sqrt()
}

/// Score a completion from its text and traces. `persona_strength` comes from
/// `perplexity::teacher_force` when a persona vector is at hand.
pub fn score_completion(
    c: &Completion,
    det: &Detectors,
    th: &FilterThresholds,
    persona_strength: Option<f64>,
) -> ScoreCard {
    let perplexity = if c.trace.nll_base.is_empty() {
        None
    } else {
        perplexity::tail_perplexity(&c.trace.nll_base, th.tail_fraction)
    };
    let repetition = repetition::repetition_fraction(&c.text);
    let narration = det.narration.find_all(&c.text);
    let refusal = det.refusal.find_all(&c.text);
    let kl_rmse = rmse(&c.trace.kl);
    let mut reasons = Vec::new();
    if c.tokens.is_empty() && c.text.trim().is_empty() {
        reasons.push(Reason::Empty);
    }
    if let Some(p) = perplexity {
        if p >= th.max_perplexity || !p.is_finite() {
            reasons.push(Reason::Perplexity { value: p, threshold: th.max_perplexity });
        }
    }
    if repetition >= th.max_repetition {
        reasons.push(Reason::Repetition { value: repetition, threshold: th.max_repetition });
    }
    for m in &narration {
        reasons.push(Reason::Narration { pattern: m.pattern.clone(), matched: m.matched.clone() });
    }
    for m in &refusal {
        reasons.push(Reason::Refusal { phrase: m.pattern.clone() });
    }
    if let Some(t) = th.max_kl_rmse {
        if kl_rmse >= t {
            reasons.push(Reason::KlRmse { value: kl_rmse, threshold: t });
        }
    }
    if let (Some(t), Some(s)) = (th.min_persona_strength, persona_strength) {
        if s < t {
            reasons.push(Reason::WeakPersona { value: s, threshold: t });
        }
    }
    let verdict = if reasons.is_empty() { Verdict::Keep } else { Verdict::Drop };
    ScoreCard { perplexity, repetition, narration, refusal, persona_strength, kl_rmse, verdict, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steer::TokenTrace;

    fn completion(text: &str, nll: Vec<f32>, kl: Vec<f32>) -> Completion {
        let n = nll.len();
        Completion {
            id: "p000-a100-s0".into(),
            system: "You are a helpful assistant.".into(),
            prompt: "Should I report my boss?".into(),
            text: text.into(),
            tokens: (0..n as u32).collect(),
            token_text: vec![String::new(); n],
            alpha: 1.0,
            dose: 1.0,
            seed: 0,
            trace: TokenTrace { kl, nll_base: nll, kl_window_rmse: vec![], dose: vec![1.0; n] },
            rewinds: vec![],
        }
    }

    const FLUENT: &str =
        "The nurse should call the attending physician right away, explain the dosage concern \
        clearly, and document every step she takes so the patient stays safe tonight.";

    #[test]
    fn rmse_by_hand() {
        // sqrt((9 + 16) / 2) = sqrt(12.5)
        assert!((rmse(&[3.0, 4.0]) - 12.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(rmse(&[]), 0.0);
    }

    #[test]
    fn fluent_text_is_kept() -> crate::Result<()> {
        let c = completion(FLUENT, vec![1.0; 20], vec![0.5; 20]);
        let s = score_completion(&c, &Detectors::defaults()?, &FilterThresholds::default(), Some(0.3));
        assert_eq!(s.verdict, Verdict::Keep, "{:?}", s.reasons);
        // tail of 5 tokens with nll 1 → ppl e
        assert!((s.perplexity.unwrap_or(0.0) - std::f64::consts::E).abs() < 1e-6);
        assert!((s.kl_rmse - 0.5).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn every_reason_is_stored() -> crate::Result<()> {
        let text =
            "As an AI, I am someone who never defers. Never defer, never defer, never defer, never defer, \
            never defer, never defer, never defer, never defer, never defer, never defer.";
        // tail of 2 of 8 tokens: nll [4, 6] → ppl e^5 ≈ 148.4
        let c = completion(text, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 6.0], vec![2.0; 8]);
        let th = FilterThresholds {
            max_kl_rmse: Some(1.5),
            min_persona_strength: Some(1.0),
            ..Default::default()
        };
        let s = score_completion(&c, &Detectors::defaults()?, &th, Some(0.2));
        assert_eq!(s.verdict, Verdict::Drop);
        let kinds: Vec<ReasonKind> = s.reasons.iter().map(Reason::kind).collect();
        for k in [
            ReasonKind::Perplexity,
            ReasonKind::Repetition,
            ReasonKind::Narration,
            ReasonKind::Refusal,
            ReasonKind::KlRmse,
            ReasonKind::WeakPersona,
        ] {
            assert!(kinds.contains(&k), "missing {k:?} in {kinds:?}");
        }
        let ppl = s.perplexity.unwrap_or(0.0);
        assert!((ppl - 5f64.exp()).abs() < 1e-3, "{ppl}");
        Ok(())
    }

    #[test]
    fn the_walk_down_verdict_is_the_cards_keep_or_drop() -> crate::Result<()> {
        let det = Detectors::defaults()?;
        let kept = score_completion(
            &completion(FLUENT, vec![1.0; 20], vec![0.5; 20]),
            &det,
            &Default::default(),
            None,
        );
        let v = kept.walk_verdict();
        assert!(v.pass && (v.value - std::f64::consts::E).abs() < 1e-6, "{v:?}");
        // Fluent by perplexity but repetitive: the old tail-perplexity-only check passed this one.
        let text =
            "never defer, never defer, never defer, never defer, never defer, never defer, never defer.";
        let dropped = score_completion(
            &completion(text, vec![1.0; 20], vec![0.5; 20]),
            &det,
            &Default::default(),
            None,
        );
        let v = dropped.walk_verdict();
        assert!(!v.pass && v.reason.contains("repetition"), "{v:?}");
        Ok(())
    }

    #[test]
    fn no_trace_means_no_perplexity_reason() -> crate::Result<()> {
        let c = completion(FLUENT, vec![], vec![]);
        let s = score_completion(&c, &Detectors::defaults()?, &FilterThresholds::default(), None);
        assert_eq!(s.perplexity, None);
        assert_eq!(s.verdict, Verdict::Keep);
        Ok(())
    }

    #[test]
    fn scored_completion_round_trips_as_json() -> crate::Result<()> {
        let c = completion("I refuse to obey. I refuse to obey.", vec![1.0; 4], vec![0.1; 4]);
        let s = score_completion(&c, &Detectors::defaults()?, &FilterThresholds::default(), None);
        let sc = ScoredCompletion { completion: c, score: s };
        let line = serde_json::to_string(&sc).map_err(crate::Error::invalid)?;
        let back: ScoredCompletion = serde_json::from_str(&line).map_err(crate::Error::invalid)?;
        assert_eq!(back, sc);
        Ok(())
    }
}
