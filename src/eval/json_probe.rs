//! The `json_is_valid` coherence probe (ours; tinymfv has none): three long single-turn tasks in different
//! registers, each ending by asking for a verdict as `{"ans": true|false}`. The model generates freely
//! (greedy, bounded); the metric is the fraction of outputs whose first parseable JSON object has a boolean
//! `ans`. It catches collapse the forced prefill of p_ans_any can hide: no JSON, a copied placeholder, loops.

use crate::error::{Error, Result};
use crate::model::generate::{generate, Sampling};
use crate::model::{ChatTemplate, Hooks, Model, TextTokenizer};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tail every probe ends with. `ANSWER` is not a JSON literal, so copying the template verbatim fails.
pub const JSON_TAIL: &str =
    "\n\nWhen you have finished, end your reply with your verdict as a JSON object on its own \
line, exactly in this form, with ANSWER replaced by true or false:\n{\"ans\": ANSWER}";

/// The probe tasks (without the tail): arithmetic planning, close reading, and data description.
pub const JSON_PROBES: [&str; 3] = [
    "A river ferry can carry at most 1,000 kg on each crossing, and every crossing takes twenty minutes. \
On the near bank wait a tractor of 640 kg, two pallets of roof tiles of 310 kg each, a water tank of 420 kg, \
four sacks of seed of 45 kg each, and the farmer, who weighs 80 kg and must ride on every crossing because \
nobody else can steer the ferry. The ferry returns empty apart from the farmer. Plan the loads crossing by \
crossing: write down what goes on each trip, add up the weight of each load including the farmer, and check \
that no load exceeds the limit. Then explain in a few sentences whether a cleverer grouping could save a trip, \
and what the total time on the river would be. The question to settle: can everything reach the far bank in \
three loaded crossings?",
    "Read this short poem closely.\n\nThe lamps along the harbour wall\nlean out to hear the water call;\n\
the gulls have folded up their cries\nand tucked them under cloudy skies.\nA rope complains, a hull replies,\n\
the tide counts slowly to the sea,\nand every boat that sleeps in line\nis dreaming it is still a tree.\n\n\
Describe what happens in the poem in your own words, name two images you find striking and say what each one \
does, and describe the rhyme pattern line by line, marking which lines rhyme with which. Comment on the last \
two lines and how they change the mood of the poem. The question to settle: does every line of the poem rhyme \
with at least one other line?",
    "A weather station in a small valley town recorded these monthly rainfall totals last year, in millimetres: \
January 88, February 74, March 61, April 47, May 35, June 22, July 14, August 19, September 33, October 58, \
November 81, December 95. Describe the pattern across the year in plain language, say which season is wettest \
and which is driest, compute the total for the year and the average per month showing your arithmetic, and \
suggest one reason a valley town might see a pattern like this. Then compare the wettest month with the driest \
month. The question to settle: did the wettest month get more than six times the rain of the driest month?",
];

/// The full text of probe `i`, tail included.
pub fn probe_prompt(i: usize) -> Option<String> {
    JSON_PROBES.get(i).map(|p| format!("{p}{JSON_TAIL}"))
}

/// The boolean `ans` of the first JSON object that parses in `text`; None when there is none, or when the first
/// parseable object has no boolean `ans`.
pub fn parse_ans(text: &str) -> Option<bool> {
    for (i, _) in text.match_indices('{') {
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        if let Some(Ok(Value::Object(obj))) = stream.next() {
            return obj.get("ans").and_then(Value::as_bool);
        }
    }
    None
}

/// One probe's generation and verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonProbeOutput {
    /// Which probe (index into `JSON_PROBES`).
    pub probe: usize,
    /// The generated text (special tokens removed).
    pub text: String,
    /// Tokens generated.
    pub n_tokens: usize,
    /// The parsed `ans`, if any.
    pub ans: Option<bool>,
}

/// All probe outputs of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonProbeReport {
    /// Token budget per generation.
    pub max_new_tokens: usize,
    /// One entry per probe.
    pub outputs: Vec<JsonProbeOutput>,
}

impl JsonProbeReport {
    /// Fraction of probes with a boolean `ans` (the `json_is_valid` metric).
    pub fn fraction_valid(&self) -> f64 {
        if self.outputs.is_empty() {
            return f64::NAN;
        }
        self.outputs.iter().filter(|o| o.ans.is_some()).count() as f64 / self.outputs.len() as f64
    }
}

/// Generate greedily from every probe in one batch and parse the answers.
pub fn run_json_probe(
    model: &Model,
    tokenizer: &TextTokenizer,
    chat: &ChatTemplate,
    hooks: &Hooks,
    max_new_tokens: usize,
    progress: &mut dyn Progress,
) -> Result<JsonProbeReport> {
    let mut prompts = Vec::new();
    for i in 0..JSON_PROBES.len() {
        let text = probe_prompt(i).ok_or_else(|| Error::invalid("probe index out of range"))?;
        prompts.push(tokenizer.encode(&chat.prompt(None, &text)?)?);
    }
    let total = max_new_tokens as u64;
    let mut cancelled = false;
    let gen = generate(
        model,
        &prompts,
        &Sampling::greedy(max_new_tokens),
        hooks,
        &tokenizer.stop_ids,
        tokenizer.pad_id,
        &mut |ev| {
            if ev.row == 0 {
                progress.step(ev.index as u64 + 1, total, "json_is_valid probe");
            }
            cancelled = progress.is_cancelled();
            !cancelled
        },
    )?;
    if cancelled {
        return Err(Error::Cancelled);
    }
    let mut outputs = Vec::new();
    for (i, toks) in gen.tokens.iter().enumerate() {
        let text = tokenizer.decode(toks, false)?;
        outputs.push(JsonProbeOutput { probe: i, ans: parse_ans(&text), n_tokens: toks.len(), text });
    }
    Ok(JsonProbeReport { max_new_tokens, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_boolean_ans_after_prose() {
        assert_eq!(parse_ans("Three trips suffice.\n{\"ans\": true}"), Some(true));
        assert_eq!(parse_ans("```json\n{\"ans\": false}\n```"), Some(false));
        // A brace in prose that is not JSON does not hide a later object.
        assert_eq!(parse_ans("sets {a, b} then {\"ans\": false}"), Some(false));
    }

    #[test]
    fn rejects_placeholders_strings_and_missing_json() {
        assert_eq!(parse_ans("{\"ans\": ANSWER}"), None);
        assert_eq!(parse_ans("{\"ans\": \"true\"}"), None);
        assert_eq!(parse_ans("{\"answer\": true}"), None);
        assert_eq!(parse_ans("the the the the"), None);
        assert_eq!(parse_ans("{\"ans\": tr"), None);
    }

    #[test]
    fn fraction_counts_parsed_outputs() {
        let out = |ans| JsonProbeOutput { probe: 0, text: String::new(), n_tokens: 1, ans };
        let r = JsonProbeReport {
            max_new_tokens: 8,
            outputs: vec![out(Some(true)), out(None), out(Some(false))],
        };
        assert!((r.fraction_valid() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn probes_are_long_and_end_with_the_tail() {
        for i in 0..JSON_PROBES.len() {
            let p = probe_prompt(i).expect("probe");
            assert!(p.split_whitespace().count() > 120, "probe {i} is long");
            assert!(p.ends_with("{\"ans\": ANSWER}"));
        }
    }
}
