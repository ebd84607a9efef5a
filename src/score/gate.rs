//! The human-readable gate-Q0 report (`gate-q0.md`): filter thresholds, precision/recall of the automatic filter
//! against the researcher, the confusion table, the best-separating threshold per score, self-consistency
//! (Cohen's kappa) and example kept and dropped rows. A pure function of its inputs; the session writes it.

use super::agreement::{best_threshold, cohen_kappa_ci, fmt_threshold, pct_ci, Confusion, Feature, Labeled};
use super::{FilterThresholds, ReasonKind, ScoreCard, Verdict};
use std::fmt::Write as _;

/// One completion as the report sees it.
#[derive(Debug, Clone)]
pub struct GateItem<'a> {
    /// Completion id.
    pub id: &'a str,
    /// User prompt.
    pub prompt: &'a str,
    /// Completion text.
    pub text: &'a str,
    /// Automatic scores.
    pub score: &'a ScoreCard,
    /// The researcher's decision: `Some(true)` accepted, `Some(false)` rejected, `None` undecided.
    pub human_keep: Option<bool>,
    /// Reason tags the researcher attached.
    pub tags: &'a [String],
    /// The researcher's note.
    pub note: Option<&'a str>,
}

/// Everything the report is made of.
#[derive(Debug, Clone)]
pub struct GateInputs<'a> {
    /// Round number.
    pub round: u32,
    /// Session name.
    pub session: &'a str,
    /// Model id.
    pub model: &'a str,
    /// When it was written (RFC 3339).
    pub written_at: &'a str,
    /// Whether the researcher passed the gate with this report.
    pub passed: bool,
    /// Thresholds of the automatic filter.
    pub thresholds: &'a FilterThresholds,
    /// Every completion of the round.
    pub items: Vec<GateItem<'a>>,
    /// Blind re-decisions `(original keep, re-shown keep)`.
    pub reshow: Vec<(bool, bool)>,
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.0} %", v * 100.0)).unwrap_or_else(|| "n/a".into())
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

fn excerpt(s: &str, n: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = one_line.chars().take(n).collect();
    if one_line.chars().count() > n {
        out.push('…');
    }
    out.replace('|', "\\|")
}

/// Render `gate-q0.md`.
pub fn render_gate_q0(g: &GateInputs) -> String {
    let mut s = String::new();
    let decided: Vec<&GateItem> = g.items.iter().filter(|i| i.human_keep.is_some()).collect();
    let labeled: Vec<Labeled> = decided
        .iter()
        .filter_map(|i| i.human_keep.map(|h| Labeled { score: i.score, human_keep: h }))
        .collect();
    let accepted = decided.iter().filter(|i| i.human_keep == Some(true)).count();
    let auto_keep = g.items.iter().filter(|i| i.score.verdict == Verdict::Keep).count();
    let conf = Confusion::from_labeled(&labeled);
    let _ = writeln!(s, "# Gate Q0 — round {} of session `{}`\n", g.round, g.session);
    let _ = writeln!(
        s,
        "Status: **{}** · written {} · model `{}`\n",
        if g.passed { "PASSED" } else { "in progress" },
        g.written_at,
        g.model
    );
    let _ = writeln!(s, "## Filter in use\n");
    let _ = writeln!(s, "| score | rule |\n|---|---|");
    let _ = writeln!(
        s,
        "| tail perplexity (last {:.0} % of tokens) | keep if < {} |",
        g.thresholds.tail_fraction * 100.0,
        g.thresholds.max_perplexity
    );
    let _ = writeln!(s, "| repetition fraction | keep if < {} |", g.thresholds.max_repetition);
    let _ = writeln!(s, "| narration patterns | keep if none match |");
    let _ = writeln!(s, "| refusal phrases | keep if none occur |");
    if let Some(t) = g.thresholds.max_kl_rmse {
        let _ = writeln!(s, "| KL rmse | keep if < {t} |");
    }
    if let Some(t) = g.thresholds.min_persona_strength {
        let _ = writeln!(s, "| persona strength | keep if ≥ {t} |");
    }
    let _ = writeln!(s, "\n## Progress\n");
    let _ = writeln!(
        s,
        "{} completions · {} decided · {} accepted · {} rejected · filter keeps {}\n",
        g.items.len(),
        decided.len(),
        accepted,
        decided.len() - accepted,
        auto_keep
    );
    let _ = writeln!(s, "## Automatic filter vs researcher\n");
    let _ = writeln!(
        s,
        "Precision {} · recall {} · agreement {} (positive = keep; n = {}; 95 % Wilson intervals)\n",
        pct_ci(&conf.precision_ci()),
        pct_ci(&conf.recall_ci()),
        pct(conf.agreement()),
        conf.total()
    );
    let _ = writeln!(s, "| | researcher accepted | researcher rejected |\n|---|---|---|");
    let _ = writeln!(s, "| filter keep | {} | {} |", conf.tp, conf.fp);
    let _ = writeln!(s, "| filter drop | {} | {} |", conf.fn_, conf.tn);
    let _ = writeln!(s, "\n### Reasons among decided items\n");
    let _ = writeln!(s, "| reason | accepted | rejected |\n|---|---|---|");
    for k in ReasonKind::ALL {
        let a = decided.iter().filter(|i| i.human_keep == Some(true) && i.score.has_reason(k)).count();
        let r = decided.iter().filter(|i| i.human_keep == Some(false) && i.score.has_reason(k)).count();
        if a + r > 0 {
            let _ = writeln!(s, "| {} | {a} | {r} |", k.label());
        }
    }
    let _ = writeln!(s, "\n## Suggested thresholds\n");
    let _ = writeln!(
        s,
        "| score | best cut | balanced accuracy | separates cleanly | n |\n|---|---|---|---|---|"
    );
    for f in Feature::ALL {
        match best_threshold(&labeled, f) {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} % | {} | {} |",
                    f.label(),
                    t.rule(),
                    t.balanced_accuracy * 100.0,
                    if t.separates_cleanly() { "yes" } else { "no" },
                    t.n
                );
            }
            None => {
                let _ = writeln!(s, "| {} | needs accepted and rejected items | – | – | – |", f.label());
            }
        }
    }
    let _ = writeln!(s, "\n## Self-consistency (blind re-show)\n");
    if g.reshow.is_empty() {
        let _ = writeln!(s, "No items re-shown yet.");
    } else {
        let same = g.reshow.iter().filter(|(a, b)| a == b).count();
        let kappa = cohen_kappa_ci(&g.reshow)
            .map(|k| {
                format!("{:.2} [{:.2}, {:.2}] (95 % bootstrap over the re-shown items)", k.value, k.lo, k.hi)
            })
            .unwrap_or_else(|| "undefined (a single label in both passes)".into());
        let _ = writeln!(
            s,
            "{} items re-shown blind · {} same decision · Cohen's kappa {}",
            g.reshow.len(),
            same,
            kappa
        );
    }
    for (title, want) in
        [("Examples kept by the researcher", true), ("Examples rejected by the researcher", false)]
    {
        let _ = writeln!(s, "\n## {title}\n");
        let rows: Vec<&&GateItem> = decided.iter().filter(|i| i.human_keep == Some(want)).take(5).collect();
        if rows.is_empty() {
            let _ = writeln!(s, "None yet.");
            continue;
        }
        let _ = writeln!(
            s,
            "| id | ppl | rep | kl | filter | reasons | tags | text |\n|---|---|---|---|---|---|---|---|"
        );
        for i in rows {
            let reasons: Vec<&str> = i.score.reasons.iter().map(|r| r.kind().label()).collect();
            let mut tags = i.tags.join(", ");
            if let Some(n) = i.note {
                if !tags.is_empty() {
                    tags.push_str("; ");
                }
                tags.push_str(&format!("note: {}", excerpt(n, 60)));
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} |",
                i.id,
                num(i.score.perplexity, 1),
                fmt_threshold(i.score.repetition),
                i.score.kl_rmse,
                if i.score.verdict == Verdict::Keep { "keep" } else { "drop" },
                reasons.join(" "),
                tags,
                excerpt(i.text, 160)
            );
        }
        let _ = writeln!(s);
        if let Some(first) = decided.iter().find(|i| i.human_keep == Some(want)) {
            let _ = writeln!(s, "Prompt of `{}`: {}", first.id, excerpt(first.prompt, 200));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::Reason;

    fn card(ppl: f64) -> ScoreCard {
        let drop = ppl >= 50.0;
        ScoreCard {
            perplexity: Some(ppl),
            repetition: 0.1,
            narration: vec![],
            refusal: vec![],
            persona_strength: None,
            kl_rmse: 0.4,
            verdict: if drop { Verdict::Drop } else { Verdict::Keep },
            reasons: if drop { vec![Reason::Perplexity { value: ppl, threshold: 50.0 }] } else { vec![] },
        }
    }

    #[test]
    fn report_has_every_section_and_the_numbers() {
        let cards = [card(10.0), card(20.0), card(80.0), card(30.0)];
        let th = FilterThresholds::default();
        let tags = vec!["incoherent".to_string()];
        let human = [Some(true), Some(true), Some(false), None];
        let items = cards
            .iter()
            .zip(human)
            .enumerate()
            .map(|(i, (c, h))| GateItem {
                id: ["a", "b", "c", "d"][i],
                prompt: "Should I?",
                text: "Some | text",
                score: c,
                human_keep: h,
                tags: if i == 2 { &tags } else { &[] },
                note: None,
            })
            .collect();
        let g = GateInputs {
            round: 0,
            session: "s",
            model: "tiny",
            written_at: "2026-01-01T00:00:00Z",
            passed: true,
            thresholds: &th,
            items,
            reshow: vec![(true, true), (false, false), (true, false)],
        };
        let md = render_gate_q0(&g);
        assert!(md.contains("Status: **PASSED**"));
        assert!(md.contains("4 completions · 3 decided · 2 accepted · 1 rejected · filter keeps 3"));
        assert!(
            md.contains("Precision 100 % [34–100 %] · recall 100 % [34–100 %] · agreement 100 % (positive = keep; n = 3; 95 % Wilson intervals)"),
            "{md}"
        );
        assert!(md.contains("| filter keep | 2 | 0 |"));
        assert!(md.contains("| filter drop | 0 | 1 |"));
        assert!(md.contains("| perplexity | keep if perplexity < 50.0 | 100 % | yes | 3 |"), "{md}");
        assert!(md.contains("3 items re-shown blind · 2 same decision · Cohen's kappa 0.40"), "{md}");
        assert!(md.contains("| c | 80.0 | 0.100 | 0.40 | drop | ppl | incoherent | Some \\| text |"), "{md}");
    }
}
