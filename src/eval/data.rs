//! The tinymfv vignettes (Clifford et al. 2015, doi 10.3758/s13428-014-0551-2; MIT per the tiny-mfv dataset
//! card), embedded in the binary from `data/tinymfv/`, and the seven moral foundations they are labelled with.
//! Nothing here reads the file system at run time.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The seven answer options, in the probe-word order the protocol uses everywhere (forward frame order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Foundation {
    /// Harm or unkindness.
    Care,
    /// Cheating or reducing equality.
    Fairness,
    /// Betrayal of a group.
    Loyalty,
    /// Subversion or lack of respect for tradition.
    Authority,
    /// Degrading or disgusting acts.
    Sanctity,
    /// Bullying or dominating.
    Liberty,
    /// Clifford's "not morally wrong" control (probe word `social`).
    SocialNorms,
}

/// All seven foundations in forward order.
pub const FOUNDATIONS: [Foundation; 7] = [
    Foundation::Care,
    Foundation::Fairness,
    Foundation::Loyalty,
    Foundation::Authority,
    Foundation::Sanctity,
    Foundation::Liberty,
    Foundation::SocialNorms,
];

impl Foundation {
    /// Position in `FOUNDATIONS` (the index of every 7-vector in this module).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The word the model answers with (its first token is the one scored).
    pub fn word(self) -> &'static str {
        match self {
            Foundation::Care => "care",
            Foundation::Fairness => "fairness",
            Foundation::Loyalty => "loyalty",
            Foundation::Authority => "authority",
            Foundation::Sanctity => "sanctity",
            Foundation::Liberty => "liberty",
            Foundation::SocialNorms => "social",
        }
    }

    /// The description shown beside the option in the answer schema (tinymfv's wording).
    pub fn description(self) -> &'static str {
        match self {
            Foundation::Care => "harm or unkindness, causing pain to another",
            Foundation::Fairness => "cheating or reducing equality",
            Foundation::Loyalty => "betrayal of a group",
            Foundation::Authority => "subversion or lack of respect for tradition",
            Foundation::Sanctity => "purity, degrading or disgusting acts",
            Foundation::Liberty => "bullying or dominating",
            Foundation::SocialNorms => "weird or unusual behaviour, but not morally wrong",
        }
    }

    /// The dataset's coarse label (`human_<label>` column).
    pub fn label(self) -> &'static str {
        match self {
            Foundation::Care => "Care",
            Foundation::Fairness => "Fairness",
            Foundation::Loyalty => "Loyalty",
            Foundation::Authority => "Authority",
            Foundation::Sanctity => "Sanctity",
            Foundation::Liberty => "Liberty",
            Foundation::SocialNorms => "SocialNorms",
        }
    }

    /// Parse a coarse label; "Social Norms" (with the space some rows use) means `SocialNorms`.
    pub fn parse_label(s: &str) -> Option<Foundation> {
        let norm: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        FOUNDATIONS.into_iter().find(|f| f.label().eq_ignore_ascii_case(&norm))
    }
}

/// Which rewrite of the vignettes to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// The original Clifford et al. 2015 texts.
    Classic,
    /// Science-fiction paraphrases (same ids and labels).
    Scifi,
    /// Paraphrases with an AI as the actor.
    AiActor,
}

impl Variant {
    /// The name used in file names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Classic => "classic",
            Variant::Scifi => "scifi",
            Variant::AiActor => "ai-actor",
        }
    }

    /// Parse `classic`, `scifi` or `ai-actor`.
    pub fn parse(s: &str) -> Option<Variant> {
        [Variant::Classic, Variant::Scifi, Variant::AiActor].into_iter().find(|v| v.name() == s)
    }
}

/// Who commits the violation in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Third person: "You see someone ...". The default, as in Clifford 2015.
    OtherViolate,
    /// First person: "You ...".
    SelfViolate,
}

impl Condition {
    /// The name used in file names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Condition::OtherViolate => "other_violate",
            Condition::SelfViolate => "self_violate",
        }
    }

    /// Parse `other_violate` or `self_violate`.
    pub fn parse(s: &str) -> Option<Condition> {
        [Condition::OtherViolate, Condition::SelfViolate].into_iter().find(|c| c.name() == s)
    }
}

/// The embedded JSONL text of one variant and condition, with its file name for error messages.
pub fn embedded(variant: Variant, condition: Condition) -> (&'static str, &'static str) {
    use Condition::*;
    use Variant::*;
    match (variant, condition) {
        (Classic, OtherViolate) => (
            "data/tinymfv/vignettes_classic_other_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_classic_other_violate.jsonl"),
        ),
        (Classic, SelfViolate) => (
            "data/tinymfv/vignettes_classic_self_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_classic_self_violate.jsonl"),
        ),
        (Scifi, OtherViolate) => (
            "data/tinymfv/vignettes_scifi_other_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_scifi_other_violate.jsonl"),
        ),
        (Scifi, SelfViolate) => (
            "data/tinymfv/vignettes_scifi_self_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_scifi_self_violate.jsonl"),
        ),
        (AiActor, OtherViolate) => (
            "data/tinymfv/vignettes_ai-actor_other_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_ai-actor_other_violate.jsonl"),
        ),
        (AiActor, SelfViolate) => (
            "data/tinymfv/vignettes_ai-actor_self_violate.jsonl",
            include_str!("../../data/tinymfv/vignettes_ai-actor_self_violate.jsonl"),
        ),
    }
}

/// One line of a tinymfv JSONL file (the `ai_*` judge columns are diagnostic only and not read).
#[derive(Debug, Clone, Deserialize)]
struct RawRow {
    id: String,
    foundation: String,
    foundation_coarse: String,
    wrong: f64,
    text: String,
    #[serde(rename = "human_Care")]
    human_care: f64,
    #[serde(rename = "human_Fairness")]
    human_fairness: f64,
    #[serde(rename = "human_Loyalty")]
    human_loyalty: f64,
    #[serde(rename = "human_Authority")]
    human_authority: f64,
    #[serde(rename = "human_Sanctity")]
    human_sanctity: f64,
    #[serde(rename = "human_Liberty")]
    human_liberty: f64,
    #[serde(rename = "human_SocialNorms")]
    human_social_norms: f64,
}

/// One row of a vignettes file, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VignetteRow {
    /// 16-hex id shared by every variant and condition of the same item.
    pub id: String,
    /// Fine label, e.g. `Care (e)`.
    pub foundation: String,
    /// Coarse label.
    pub coarse: Foundation,
    /// Mean wrongness rating.
    pub wrong: f64,
    /// The vignette text.
    pub text: String,
    /// Clifford human percentages in `FOUNDATIONS` order (not normalised).
    pub human: [f64; 7],
}

/// Parse a tinymfv JSONL text; `origin` names the file in errors.
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<VignetteRow>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: RawRow = serde_json::from_str(line)
            .map_err(|e| Error::bad_file(origin, format!("line {}: {e}", i + 1)))?;
        let coarse = Foundation::parse_label(&r.foundation_coarse).ok_or_else(|| {
            Error::bad_file(
                origin,
                format!("line {}: unknown foundation_coarse `{}`", i + 1, r.foundation_coarse),
            )
        })?;
        let human = [
            r.human_care,
            r.human_fairness,
            r.human_loyalty,
            r.human_authority,
            r.human_sanctity,
            r.human_liberty,
            r.human_social_norms,
        ];
        if human.iter().any(|h| !h.is_finite() || *h < 0.0) {
            return Err(Error::bad_file(
                origin,
                format!("line {}: human_* values must be finite and ≥ 0", i + 1),
            ));
        }
        out.push(VignetteRow {
            id: r.id,
            foundation: r.foundation,
            coarse,
            wrong: r.wrong,
            text: r.text,
            human,
        });
    }
    Ok(out)
}

/// One scored unit: a vignette in one condition.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    /// Vignette id.
    pub id: String,
    /// Which condition's text this is.
    pub condition: Condition,
    /// Fine label.
    pub foundation: String,
    /// Coarse label.
    pub coarse: Foundation,
    /// The text shown to the model.
    pub text: String,
    /// Human percentages in `FOUNDATIONS` order.
    pub human: [f64; 7],
}

/// The items of an eval: the first `n` vignettes (file order, after joining the requested conditions on `id`),
/// each in every requested condition, conditions outermost (as tinymfv orders them).
pub fn select_items(variant: Variant, conditions: &[Condition], n: Option<usize>) -> Result<Vec<EvalItem>> {
    if conditions.is_empty() {
        return Err(Error::invalid("at least one condition is needed (other_violate or self_violate)"));
    }
    let mut per_cond: Vec<(Condition, Vec<VignetteRow>)> = Vec::new();
    for &c in conditions {
        if per_cond.iter().any(|(pc, _)| *pc == c) {
            continue;
        }
        let (name, text) = embedded(variant, c);
        per_cond.push((c, parse_jsonl(text, name)?));
    }
    // Inner join on id, in the order of the first condition's file.
    let base = &per_cond[0].1;
    let mut ids: Vec<&str> = base.iter().map(|r| r.id.as_str()).collect();
    ids.retain(|id| per_cond.iter().all(|(_, rows)| rows.iter().any(|r| r.id == *id)));
    if let Some(n) = n {
        if n == 0 {
            return Err(Error::invalid("--n must be at least 1"));
        }
        ids.truncate(n);
    }
    let mut items = Vec::new();
    for (c, rows) in &per_cond {
        for id in &ids {
            let r = rows
                .iter()
                .find(|r| r.id == *id)
                .ok_or_else(|| Error::invalid(format!("vignette {id} missing from {}", c.name())))?;
            items.push(EvalItem {
                id: r.id.clone(),
                condition: *c,
                foundation: r.foundation.clone(),
                coarse: r.coarse,
                text: r.text.clone(),
                human: r.human,
            });
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_models_answer_words_are_the_foundations_words() {
        let words: Vec<&str> = FOUNDATIONS.iter().map(|f| f.word()).collect();
        assert_eq!(words, crate::model::tiny::ANSWER_WORDS);
    }

    #[test]
    fn every_embedded_file_has_132_rows_with_clifford_class_counts() -> Result<()> {
        for v in [Variant::Classic, Variant::Scifi, Variant::AiActor] {
            for c in [Condition::OtherViolate, Condition::SelfViolate] {
                let (name, text) = embedded(v, c);
                let rows = parse_jsonl(text, name)?;
                assert_eq!(rows.len(), 132, "{name}");
                let mut counts = [0usize; 7];
                for r in &rows {
                    counts[r.coarse.index()] += 1;
                }
                // Care 32, Fairness 17, Loyalty 16, Authority 17, Sanctity 17, Liberty 17, SocialNorms 16.
                assert_eq!(counts, [32, 17, 16, 17, 17, 17, 16], "{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn select_joins_conditions_and_keeps_file_order() -> Result<()> {
        let items =
            select_items(Variant::Classic, &[Condition::OtherViolate, Condition::SelfViolate], Some(3))?;
        assert_eq!(items.len(), 6);
        assert_eq!(items[0].id, items[3].id);
        assert!(items[0].text.starts_with("You see a teenage boy"));
        assert!(items[3].text.starts_with("You chuckle"));
        assert_eq!(items[0].condition, Condition::OtherViolate);
        assert_eq!(items[5].condition, Condition::SelfViolate);
        Ok(())
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let err = parse_jsonl("{\"id\": 1}\n", "x.jsonl").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("x.jsonl: line 1:"), "{err}");
    }

    #[test]
    fn social_norms_label_with_space_parses() {
        assert_eq!(Foundation::parse_label("Social Norms"), Some(Foundation::SocialNorms));
        assert_eq!(Foundation::parse_label("Authority"), Some(Foundation::Authority));
        assert_eq!(Foundation::parse_label("Purity"), None);
    }
}
