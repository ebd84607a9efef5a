//! The `json_is_valid` coherence probe (ours; tinymfv has none): three long single-turn prompts in different
//! registers (a logistics report, a poem, a table of figures), each with a yes/no question and a request to
//! reply in JSON `{"ans": true|false}`. The model generates freely (greedy, bounded); the metric is the
//! fraction of outputs whose first parseable JSON object has a boolean `ans`. It catches collapse that the
//! forced prefill of p_ans_any can hide: no JSON at all, prose instead of the format, gibberish, loops.

use super::runner::EvalModel;
use crate::error::{Error, Result};
use crate::model::generate::{generate, Sampling};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tail every probe ends with. Its example is itself valid (a model that copies it passes): the probe checks
/// that free generation still produces well-formed JSON after a long prompt, not that the answer is right.
/// SmolLM2-135M-Instruct answers all three with `{"ans":true}`; with "either true or false" wording it answered
/// only two of three in JSON, which leaves no room to see coherence fall.
pub const JSON_TAIL: &str = "\n\nReply in JSON, like this: {\"ans\": true}";

/// The probe texts (without the tail): a long passage in a different register each time (a logistics report,
/// a poem, a table of figures) and a yes/no question about it.
pub const JSON_PROBES: [&str; 3] = [
    "Here is a report from a river crossing. The ferry can carry at most 1,000 kg on each crossing, and every \
crossing takes twenty minutes. On the near bank waited a tractor of 640 kg, two pallets of roof tiles of 310 kg \
each, a water tank of 420 kg, four sacks of seed of 45 kg each, and the farmer, who weighs 80 kg and rode on every \
crossing because nobody else could steer. On the first crossing the farmer took the tractor and two sacks of seed. \
On the second he took both pallets of tiles. On the third he took the water tank and the last two sacks. The ferry \
came back empty apart from the farmer each time, and by noon everything stood on the far bank, where his \
daughter checked the load against her list and found nothing missing.\n\nQuestion: according to the report, did \
everything reach the far bank in three loaded crossings?",
    "Read this short poem.\n\nThe lamps along the harbour wall\nlean out to hear the water call;\n\
the gulls have folded up their cries\nand tucked them under cloudy skies.\nA rope complains, a hull replies,\n\
the tide counts slowly to the sea,\nand every boat that sleeps in line\nis dreaming it is still a tree.\n\n\
The poem describes a harbour at night. The lamps, the gulls, the rope and the hull are all given human actions: \
they lean, listen, fold, complain and reply. The last two lines turn from the sounds of the harbour to the boats \
themselves, which remember the forests their timber came from.\n\nQuestion: does the poem mention gulls?",
    "A weather station in a small valley town recorded these monthly rainfall totals last year, in millimetres: \
January 88, February 74, March 61, April 47, May 35, June 22, July 14, August 19, September 33, October 58, \
November 81, December 95. The wet season runs from late autumn to early spring, when storms come in from the \
west and the hills around the valley push the clouds up until they rain out. In summer a ridge of high pressure \
sits over the region and the river falls to its lowest level of the year. The total for the year was 627 mm, an \
average of a little over 52 mm a month.\n\nQuestion: was July the driest month of the year?",
];

/// Said before each passage, so the format is known before the long text.
pub const JSON_HEAD: &str = "Read the text below and answer the yes/no question at the end in JSON.\n\n";

/// The full text of probe `i`, head and tail included.
pub fn probe_prompt(i: usize) -> Option<String> {
    JSON_PROBES.get(i).map(|p| format!("{JSON_HEAD}{p}{JSON_TAIL}"))
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

/// Generate greedily from every probe in one batch (with the model's hooks and an optional system prompt) and
/// parse the answers.
pub fn run_json_probe(
    m: &EvalModel,
    system: Option<&str>,
    max_new_tokens: usize,
    progress: &mut dyn Progress,
) -> Result<JsonProbeReport> {
    let (model, tokenizer, hooks) = (m.model, m.tokenizer, m.hooks);
    let mut prompts = Vec::new();
    for i in 0..JSON_PROBES.len() {
        let text = probe_prompt(i).ok_or_else(|| Error::invalid("probe index out of range"))?;
        prompts.push(tokenizer.encode(&m.chat.prompt(system, &text)?)?);
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
            assert!(p.ends_with(JSON_TAIL));
        }
    }
}
