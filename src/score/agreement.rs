//! How well the automatic filter agrees with the researcher, and how well the researcher agrees with themself.
//!
//! "Positive" means keep: the filter says `Keep`, the researcher accepted.
//! - precision = TP / (TP + FP), recall = TP / (TP + FN), agreement = (TP + TN) / n.
//! - Best-separating threshold of one score: the cut that maximises balanced accuracy
//!   `(TPR + TNR) / 2` between accepted and rejected items (candidate cuts are midpoints between neighbours).
//! - Cohen's kappa of blind re-decisions: `κ = (p_o − p_e) / (1 − p_e)`, `p_e = Σ_label p_first · p_second`.

use super::{ScoreCard, Verdict};
use crate::stats::{bootstrap, wilson, Interval};
use serde::{Deserialize, Serialize};

/// One human-labelled item: its automatic scores and whether the researcher accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Labeled<'a> {
    /// The automatic scores.
    pub score: &'a ScoreCard,
    /// The researcher accepted (kept) it.
    pub human_keep: bool,
}

/// Counts of the filter's verdict against the human decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Filter keep, human accept.
    pub tp: usize,
    /// Filter keep, human reject.
    pub fp: usize,
    /// Filter drop, human accept.
    pub fn_: usize,
    /// Filter drop, human reject.
    pub tn: usize,
}

impl Confusion {
    /// Count the filter's verdicts against human labels.
    pub fn from_labeled(items: &[Labeled]) -> Self {
        let mut c = Confusion::default();
        for it in items {
            match (it.score.verdict == Verdict::Keep, it.human_keep) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }
    /// Count predictions against truth from pairs `(predicted keep, human keep)`.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut c = Confusion::default();
        for (p, h) in pairs {
            match (p, h) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }
    /// Number of items.
    pub fn total(&self) -> usize {
        self.tp + self.fp + self.fn_ + self.tn
    }
    /// TP / (TP + FP); `None` when the filter kept nothing.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fp)
    }
    /// TP / (TP + FN); `None` when the researcher accepted nothing.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// (TP + TN) / n; `None` when empty.
    pub fn agreement(&self) -> Option<f64> {
        ratio(self.tp + self.tn, self.total())
    }
    /// Precision with its 95 % Wilson interval (NaN when the filter kept nothing).
    pub fn precision_ci(&self) -> Interval {
        wilson(self.tp, self.tp + self.fp)
    }
    /// Recall with its 95 % Wilson interval (NaN when the researcher accepted nothing).
    pub fn recall_ci(&self) -> Interval {
        wilson(self.tp, self.tp + self.fn_)
    }
    /// Mean of the true-positive and true-negative rates; `None` unless both classes occur.
    pub fn balanced_accuracy(&self) -> Option<f64> {
        let tpr = ratio(self.tp, self.tp + self.fn_)?;
        let tnr = ratio(self.tn, self.tn + self.fp)?;
        Some((tpr + tnr) / 2.0)
    }
}

fn ratio(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// A numeric score a threshold can be put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Tail perplexity (keep below).
    Perplexity,
    /// Repetition fraction (keep below).
    Repetition,
    /// KL rmse (keep below).
    KlRmse,
    /// Persona strength (keep above).
    PersonaStrength,
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 4] =
        [Feature::Perplexity, Feature::Repetition, Feature::KlRmse, Feature::PersonaStrength];
    /// The value of this feature on a score card.
    pub fn value(self, s: &ScoreCard) -> Option<f64> {
        match self {
            Feature::Perplexity => s.perplexity,
            Feature::Repetition => Some(s.repetition),
            Feature::KlRmse => Some(s.kl_rmse),
            Feature::PersonaStrength => s.persona_strength,
        }
        .filter(|v| v.is_finite())
    }
    /// True when smaller values are the ones to keep.
    pub fn keep_below(self) -> bool {
        !matches!(self, Feature::PersonaStrength)
    }
    /// Column name.
    pub fn label(self) -> &'static str {
        match self {
            Feature::Perplexity => "perplexity",
            Feature::Repetition => "repetition",
            Feature::KlRmse => "kl rmse",
            Feature::PersonaStrength => "persona strength",
        }
    }
}

/// The threshold on one feature that best separates accepted from rejected items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdSuggestion {
    /// The feature.
    pub feature: Feature,
    /// Keep when the value is below (or, for persona strength, above) this.
    pub threshold: f64,
    /// Balanced accuracy of that cut on the decided items.
    pub balanced_accuracy: f64,
    /// The confusion table of that cut.
    pub confusion: Confusion,
    /// Items that had the feature.
    pub n: usize,
}

impl ThresholdSuggestion {
    /// True when the cut puts every accepted item on one side and every rejected item on the other.
    pub fn separates_cleanly(&self) -> bool {
        self.confusion.fp == 0 && self.confusion.fn_ == 0
    }
    /// `keep if ppl < 41.2` style text.
    pub fn rule(&self) -> String {
        let op = if self.feature.keep_below() { "<" } else { ">" };
        format!("keep if {} {op} {}", self.feature.label(), fmt_threshold(self.threshold))
    }
}

/// Format a threshold with about three significant digits.
pub fn fmt_threshold(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// The best cut on `feature`; `None` unless both accepted and rejected items have the feature.
pub fn best_threshold(items: &[Labeled], feature: Feature) -> Option<ThresholdSuggestion> {
    let mut pts: Vec<(f64, bool)> =
        items.iter().filter_map(|it| feature.value(it.score).map(|v| (v, it.human_keep))).collect();
    if !pts.iter().any(|p| p.1) || !pts.iter().any(|p| !p.1) {
        return None;
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut values: Vec<f64> = pts.iter().map(|p| p.0).collect();
    values.dedup();
    // Candidate cuts: below everything, midpoints, above everything.
    let mut cuts = Vec::with_capacity(values.len() + 1);
    cuts.push(values[0] - 1.0);
    for w in values.windows(2) {
        cuts.push((w[0] + w[1]) / 2.0);
    }
    cuts.push(values[values.len() - 1] + 1.0);
    let mut best: Option<ThresholdSuggestion> = None;
    for cut in cuts {
        let keep = |v: f64| if feature.keep_below() { v < cut } else { v > cut };
        let conf = Confusion::from_pairs(pts.iter().map(|(v, h)| (keep(*v), *h)));
        let Some(ba) = conf.balanced_accuracy() else { continue };
        let better = match &best {
            None => true,
            Some(b) => ba > b.balanced_accuracy + 1e-12,
        };
        if better {
            best = Some(ThresholdSuggestion {
                feature,
                threshold: cut,
                balanced_accuracy: ba,
                confusion: conf,
                n: pts.len(),
            });
        }
    }
    best
}

/// Cohen's kappa of two labelings of the same items, `pairs = (first, second)`.
/// `None` when empty or when chance agreement is 1 (both passes used a single label), where κ is undefined.
pub fn cohen_kappa(pairs: &[(bool, bool)]) -> Option<f64> {
    let n = pairs.len();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let agree = pairs.iter().filter(|(a, b)| a == b).count() as f64 / nf;
    let a1 = pairs.iter().filter(|(a, _)| *a).count() as f64 / nf;
    let b1 = pairs.iter().filter(|(_, b)| *b).count() as f64 / nf;
    let pe = a1 * b1 + (1.0 - a1) * (1.0 - b1);
    if (1.0 - pe).abs() < 1e-12 {
        return None;
    }
    Some((agree - pe) / (1.0 - pe))
}

/// Cohen's kappa with a 95 % bootstrap interval over the re-shown items (resamples where κ is undefined are left
/// out); `None` when κ itself is undefined.
pub fn cohen_kappa_ci(pairs: &[(bool, bool)]) -> Option<Interval> {
    cohen_kappa(pairs)?;
    Some(bootstrap(pairs.len(), |idx| {
        let sample: Vec<(bool, bool)> = idx.iter().map(|i| pairs[*i]).collect();
        cohen_kappa(&sample).unwrap_or(f64::NAN)
    }))
}

/// A proportion as `80 % [49–94 %]` (`–` when undefined).
pub fn pct_ci(iv: &Interval) -> String {
    if !iv.value.is_finite() {
        return "–".into();
    }
    format!("{:.0} % [{:.0}–{:.0} %]", iv.value * 100.0, iv.lo * 100.0, iv.hi * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::Reason;

    fn card(ppl: f64, keep: bool) -> ScoreCard {
        ScoreCard {
            perplexity: Some(ppl),
            repetition: 0.1,
            narration: vec![],
            refusal: vec![],
            persona_strength: Some(ppl / 10.0),
            kl_rmse: 0.2,
            verdict: if keep { Verdict::Keep } else { Verdict::Drop },
            reasons: if keep { vec![] } else { vec![Reason::Perplexity { value: ppl, threshold: 50.0 }] },
        }
    }

    #[test]
    fn confusion_by_hand() {
        // filter keeps ppl 10, 20, 60(no: drop) ...
        let cards =
            [card(10.0, true), card(20.0, true), card(30.0, true), card(60.0, false), card(70.0, false)];
        let human = [true, false, true, true, false];
        let items: Vec<Labeled> =
            cards.iter().zip(human).map(|(s, h)| Labeled { score: s, human_keep: h }).collect();
        let c = Confusion::from_labeled(&items);
        assert_eq!(c, Confusion { tp: 2, fp: 1, fn_: 1, tn: 1 });
        assert_eq!(c.precision(), Some(2.0 / 3.0));
        assert_eq!(c.recall(), Some(2.0 / 3.0));
        assert_eq!(c.agreement(), Some(0.6));
        // TPR 2/3, TNR 1/2
        assert!((c.balanced_accuracy().unwrap_or(0.0) - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn best_threshold_finds_the_clean_cut() {
        let cards =
            [card(12.0, true), card(25.0, true), card(31.0, true), card(44.0, true), card(90.0, false)];
        let human = [true, true, true, false, false];
        let items: Vec<Labeled> =
            cards.iter().zip(human).map(|(s, h)| Labeled { score: s, human_keep: h }).collect();
        let s = best_threshold(&items, Feature::Perplexity).expect("both classes present");
        // accepted ≤ 31, rejected ≥ 44: the midpoint 37.5 separates them
        assert_eq!(s.threshold, 37.5);
        assert!(s.separates_cleanly());
        assert_eq!(s.balanced_accuracy, 1.0);
        assert_eq!(s.rule(), "keep if perplexity < 37.5");
        // persona strength = ppl/10 is keep-above; rejected ones are the larger values, so no clean cut
        let p = best_threshold(&items, Feature::PersonaStrength).expect("both classes");
        assert!(!p.separates_cleanly());
    }

    #[test]
    fn best_threshold_needs_both_classes() {
        let cards = [card(12.0, true), card(25.0, true)];
        let items: Vec<Labeled> = cards.iter().map(|s| Labeled { score: s, human_keep: true }).collect();
        assert!(best_threshold(&items, Feature::Perplexity).is_none());
    }

    #[test]
    fn kappa_by_hand() {
        // 4 keep/keep, 1 keep/drop, 1 drop/keep, 4 drop/drop: p_o 0.8, p_e 0.5 → κ 0.6
        let mut pairs = vec![(true, true); 4];
        pairs.push((true, false));
        pairs.push((false, true));
        pairs.extend(vec![(false, false); 4]);
        assert!((cohen_kappa(&pairs).unwrap_or(0.0) - 0.6).abs() < 1e-12);
        assert_eq!(cohen_kappa(&[(true, true), (true, true)]), None);
        assert_eq!(cohen_kappa(&[(true, false), (false, true)]), Some(-1.0));
        assert_eq!(cohen_kappa(&[]), None);
        // Its interval holds the value and stays within [-1, 1]; ten agreeing pairs more make it narrower.
        let iv = cohen_kappa_ci(&pairs).expect("defined");
        assert!((iv.value - 0.6).abs() < 1e-12 && iv.lo < 0.6 && iv.hi <= 1.0 && iv.lo >= -1.0, "{iv:?}");
        let mut more = pairs.clone();
        for _ in 0..4 {
            more.extend_from_slice(&pairs);
        }
        assert!(cohen_kappa_ci(&more).expect("defined").width() < iv.width());
        assert!(cohen_kappa_ci(&[(true, true)]).is_none());
    }

    #[test]
    fn precision_and_recall_carry_wilson_intervals() {
        let c = Confusion { tp: 8, fp: 2, fn_: 0, tn: 5 };
        assert_eq!(pct_ci(&c.precision_ci()), "80 % [49–94 %]");
        assert_eq!(pct_ci(&c.recall_ci()), "100 % [68–100 %]");
        assert_eq!(pct_ci(&Confusion::default().precision_ci()), "–");
    }
}
