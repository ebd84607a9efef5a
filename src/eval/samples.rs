//! A handful of eval items of one `eval.json` picked for review on the iterate screen: the vignette, the think
//! the model wrote before answering (forward frame), how each frame's answer slot was read, and the seven
//! answer probabilities averaged over the forward and reversed frames, beside the human label.

use super::data::{select_items, Condition, Foundation};
use super::metrics::{human_dist, row_p, row_pmass};
use super::protocol::{AnswerCase, FrameOrder};
use super::report::EvalReport;

/// Eval items kept per round for the iterate screen.
pub const SAMPLES_PER_ROUND: usize = 6;

/// Longest think kept per sample, in characters (the screen shows a few wrapped lines of it).
const MAX_THINK_CHARS: usize = 1200;

/// One eval item as the iterate screen shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSample {
    /// Position of the item in the report's rows.
    pub index: usize,
    /// Vignette id.
    pub id: String,
    /// Condition of the text.
    pub condition: Condition,
    /// Fine label (e.g. `Care (e)`).
    pub foundation: String,
    /// The dataset's coarse (human) label.
    pub label: Foundation,
    /// The vignette text shown to the model (empty when the report's config no longer selects this item).
    pub text: String,
    /// The forward frame's think, trimmed and cut to a screenful.
    pub think: String,
    /// Think tokens the forward frame generated.
    pub think_tokens: usize,
    /// How each frame's answer slot was read (forward, reversed).
    pub cases: Vec<AnswerCase>,
    /// The model's seven-way distribution, `FOUNDATIONS` order: softmax of the frames' mean log-probs (None when
    /// a frame answered elsewhere).
    pub p: Option<[f64; 7]>,
    /// The human distribution (row-normalised Clifford percentages), when the item has one.
    pub human: Option<[f64; 7]>,
    /// Probability mass on the seven answers, mean over the frames (as the round's p_ans_any counts it).
    pub p_ans_any: f64,
}

/// Row indices spread evenly over `n` rows, at most `k` of them, first row first.
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    (0..k).map(|i| i * n / k).collect()
}

/// Up to `k` items of `report`, spread evenly over its rows (the same items in every round evaluated with the
/// same settings, so a round can be compared with the base item by item).
pub fn pick_samples(report: &EvalReport, k: usize) -> Vec<EvalSample> {
    let c = &report.config;
    // The texts are not in eval.json; they come from the embedded vignettes the config selected.
    let items = select_items(c.variant, &c.conditions, c.n_vignettes).unwrap_or_default();
    spread(report.rows.len(), k)
        .into_iter()
        .map(|index| {
            let row = &report.rows[index];
            let text = items
                .iter()
                .find(|it| it.id == row.id && it.condition == row.condition)
                .map(|it| it.text.clone())
                .unwrap_or_default();
            let fwd = row.frames.iter().find(|f| f.order == FrameOrder::Forward).or(row.frames.first());
            let think: String =
                fwd.map(|f| f.think_text.trim().chars().take(MAX_THINK_CHARS).collect()).unwrap_or_default();
            EvalSample {
                index,
                id: row.id.clone(),
                condition: row.condition,
                foundation: row.foundation.clone(),
                label: row.foundation_coarse,
                text,
                think,
                think_tokens: fwd.map(|f| f.think_tokens).unwrap_or(0),
                cases: row.frames.iter().map(|f| f.case).collect(),
                p: row_p(row),
                human: human_dist(&row.human),
                p_ans_any: row_pmass(row),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::{EvalConfig, FrameRecord, RowRecord, Timings};
    use crate::eval::Variant;

    fn frame(order: FrameOrder, lp: [f64; 7], case: AnswerCase, think: &str) -> FrameRecord {
        FrameRecord {
            order,
            case,
            lp,
            pmass: lp.iter().map(|x| x.exp()).sum(),
            nll_json: 1.0,
            n_prefill_tokens: 9,
            think_tokens: 16,
            emitted_close: false,
            think_text: think.into(),
        }
    }

    #[test]
    fn samples_average_the_frames_and_carry_text_think_and_label() {
        let items = select_items(Variant::Classic, &[Condition::OtherViolate], Some(4)).expect("items");
        let ln = |p: f64| p.ln();
        let rows: Vec<RowRecord> = items
            .iter()
            .map(|it| RowRecord {
                id: it.id.clone(),
                condition: it.condition,
                foundation: it.foundation.clone(),
                foundation_coarse: it.coarse,
                human: it.human,
                frames: vec![
                    frame(
                        FrameOrder::Forward,
                        [ln(0.4), ln(0.1), ln(0.1), ln(0.1), ln(0.1), ln(0.1), ln(0.1)],
                        AnswerCase::Interrupted,
                        "  The boy is mocking someone.  ",
                    ),
                    frame(
                        FrameOrder::Reversed,
                        [ln(0.1), ln(0.1), ln(0.1), ln(0.4), ln(0.1), ln(0.1), ln(0.1)],
                        AnswerCase::Natural,
                        "reversed",
                    ),
                ],
            })
            .collect();
        let report = EvalReport {
            schema_version: 1,
            created: String::new(),
            model_id: "tiny".into(),
            weights_hash: String::new(),
            config: EvalConfig { n_vignettes: Some(4), ..EvalConfig::default() },
            answer_token_ids: [0; 7],
            metrics: crate::eval::compute_metrics(&rows, None),
            intervals: Default::default(),
            rows,
            json_probe: None,
            timings: Timings::default(),
        };
        let s = pick_samples(&report, 2);
        assert_eq!(s.iter().map(|x| x.index).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(s[1].id, items[2].id);
        assert_eq!(s[0].text, items[0].text);
        assert_eq!(s[0].label, items[0].coarse);
        assert_eq!(s[0].think, "The boy is mocking someone.");
        assert_eq!(s[0].cases, vec![AnswerCase::Interrupted, AnswerCase::Natural]);
        // Mean log-prob: care and authority ln(0.4·0.1)/2 = ln 0.2, the rest ln 0.1 → p ∝ (2, 1, 1, 2, 1, 1, 1).
        let p = s[0].p.expect("both frames answered");
        assert!((p[0] - 2.0 / 9.0).abs() < 1e-12 && (p[3] - 2.0 / 9.0).abs() < 1e-12, "{p:?}");
        assert!((p[1] - 1.0 / 9.0).abs() < 1e-12);
        assert!((s[0].p_ans_any - 1.0).abs() < 1e-12);
        assert!((s[0].human.expect("labelled").iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(spread(3, 6), vec![0, 1, 2]);
        assert_eq!(spread(132, 6), vec![0, 22, 44, 66, 88, 110]);
        assert!(spread(0, 6).is_empty());
    }
}
