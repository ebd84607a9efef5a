//! Persona files (TOML): the positive persona, its matched opposite, the neutral system prompt used for steered
//! generation and healing, the extraction contexts, the generation prompts and the dosing prompts. The default
//! "authority" pair ships inside the binary so it is always available.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The default persona file, embedded at build time.
pub const DEFAULT_PERSONA_TOML: &str = include_str!("../../personas/authority.toml");

/// Name under which the embedded default is recorded in provenance.
pub const DEFAULT_PERSONA_SOURCE: &str = "builtin:authority";

/// Fewest extraction contexts a persona file may hold: fewer gives a mean difference dominated by noise.
pub const MIN_CONTEXTS: usize = 8;

/// Fewest generation prompts a persona file may hold.
pub const MIN_PROMPTS: usize = 4;

/// Dosing prompts used when a persona file gives none: a fact, the same in another script with an emoji, a
/// story request and a formal-proof request, so the dose is measured on varied text.
pub fn default_calibration_prompts() -> Vec<String> {
    vec![
        "Tell me one interesting fact about the Eiffel Tower.".into(),
        "告诉我一个关于埃菲尔铁塔的有趣事实 🗼".into(),
        "Write a short greentext story about a cat who learns to open the fridge.".into(),
        "In Lean 4, prove that the integral of x from 0 to 1 equals 1/2.".into(),
    ]
}

/// The fields of a persona file, as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaSpec {
    /// Short name (used in file names and provenance).
    pub name: String,
    /// One sentence saying what the axis is.
    #[serde(default)]
    pub description: String,
    /// System prompt carrying the persona the vector points towards.
    pub positive: String,
    /// System prompt carrying the matched opposite.
    pub negative: String,
    /// System prompt for steered generation and healing (the persona is never in the prompt there).
    pub neutral_system: String,
    /// User messages rendered under both personas for extraction.
    pub contexts: Vec<String>,
    /// Everyday moral-dilemma user prompts for steered generation.
    pub prompts: Vec<String>,
    /// User prompts for iso-KL dosing.
    #[serde(default = "default_calibration_prompts")]
    pub calibration_prompts: Vec<String>,
}

/// A validated persona with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Persona {
    /// The file's content.
    pub spec: PersonaSpec,
    /// File path, or `builtin:authority` for the embedded default.
    pub source: String,
    /// sha256 of the file bytes, recorded in every vector made from it.
    pub sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl Persona {
    /// The embedded default "authority" persona.
    pub fn default_authority() -> Result<Self> {
        Self::parse(DEFAULT_PERSONA_TOML, DEFAULT_PERSONA_SOURCE)
    }

    /// Read and validate a persona file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Load `path` when given, else the embedded default.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(p) => Self::load(p),
            None => Self::default_authority(),
        }
    }

    /// Parse and validate persona TOML; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let spec: PersonaSpec = toml::from_str(text).map_err(|e| {
            // toml's message names the field and line; keep it on one line.
            let msg = e.message().trim().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            Error::bad_file(PathBuf::from(source), format!("not a valid persona file: {msg}{at}"))
        })?;
        validate(&spec, source)?;
        Ok(Persona { spec, source: source.to_string(), sha256: sha256_hex(text.as_bytes()) })
    }

    /// Advice on the persona-writing rules (matched length, no negation) that does not stop a run.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (p, n) = (word_count(&self.spec.positive), word_count(&self.spec.negative));
        let ratio = p.max(n) as f64 / p.min(n).max(1) as f64;
        if ratio > 1.25 {
            out.push(format!(
                "{}: `positive` has {p} words and `negative` {n}; matched lengths keep length out of the vector",
                self.source
            ));
        }
        for (field, text) in [("positive", &self.spec.positive), ("negative", &self.spec.negative)] {
            if let Some(w) = negation_word(text) {
                out.push(format!(
                    "{}: `{field}` uses the negation \"{w}\"; write the opposite trait directly",
                    self.source
                ));
            }
        }
        out
    }
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

fn negation_word(s: &str) -> Option<&'static str> {
    let lower = s.to_lowercase();
    let words: Vec<&str> =
        lower.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).collect();
    ["not", "never", "no", "don't", "doesn't", "won't", "isn't", "aren't", "nor"]
        .into_iter()
        .find(|neg| words.contains(neg))
}

fn validate(spec: &PersonaSpec, source: &str) -> Result<()> {
    let bad = |field: &str, why: String| {
        Err(Error::bad_file(PathBuf::from(source), format!("field `{field}`: {why}")))
    };
    for (field, text) in [
        ("name", &spec.name),
        ("positive", &spec.positive),
        ("negative", &spec.negative),
        ("neutral_system", &spec.neutral_system),
    ] {
        if text.trim().is_empty() {
            return bad(field, "must not be empty".into());
        }
    }
    if spec.name.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
        return bad("name", format!("`{}` must use only letters, digits, `-` and `_`", spec.name));
    }
    if spec.positive.trim() == spec.negative.trim() {
        return bad("negative", "is identical to `positive`; the two personas must be opposites".into());
    }
    for (field, list, min) in [
        ("contexts", &spec.contexts, MIN_CONTEXTS),
        ("prompts", &spec.prompts, MIN_PROMPTS),
        ("calibration_prompts", &spec.calibration_prompts, 1),
    ] {
        if list.len() < min {
            return bad(field, format!("needs at least {min} entries, found {}", list.len()));
        }
        let mut seen = HashSet::new();
        for (i, item) in list.iter().enumerate() {
            if item.trim().is_empty() {
                return bad(field, format!("entry {} is empty", i + 1));
            }
            if !seen.insert(item.trim()) {
                return bad(field, format!("entry {} repeats an earlier entry: \"{item}\"", i + 1));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_persona_is_complete() -> Result<()> {
        let p = Persona::default_authority()?;
        assert_eq!(p.spec.name, "authority");
        assert!(p.spec.contexts.len() >= 64, "{}", p.spec.contexts.len());
        assert!(p.spec.prompts.len() >= 32, "{}", p.spec.prompts.len());
        assert_eq!(p.spec.calibration_prompts.len(), 4);
        assert!(p.warnings().is_empty(), "{:?}", p.warnings());
        assert_eq!(p.sha256.len(), 64);
        Ok(())
    }

    fn minimal(contexts: usize) -> String {
        let ctx: Vec<String> = (0..contexts).map(|i| format!("\"context {i}\"")).collect();
        format!(
            "name = \"t\"\npositive = \"You are bold.\"\nnegative = \"You are timid.\"\nneutral_system = \"Hi.\"\n\
             contexts = [{}]\nprompts = [\"a\", \"b\", \"c\", \"d\"]\n",
            ctx.join(", ")
        )
    }

    #[test]
    fn too_few_contexts_names_file_and_field() {
        let err = Persona::parse(&minimal(3), "my.toml").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("my.toml") && err.contains("`contexts`") && err.contains("found 3"), "{err}");
        assert!(Persona::parse(&minimal(8), "my.toml").is_ok());
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let text = minimal(8).replace("neutral_system = \"Hi.\"\n", "");
        let err = Persona::parse(&text, "p.toml").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("p.toml") && err.contains("neutral_system"), "{err}");
        let text = format!("{}postive = \"typo\"\n", minimal(8));
        let err = Persona::parse(&text, "p.toml").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("postive"), "{err}");
    }

    #[test]
    fn duplicates_and_identical_personas_are_rejected() {
        let text = minimal(8).replace("\"context 1\"", "\"context 0\"");
        let err = Persona::parse(&text, "p.toml").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`contexts`") && err.contains("entry 2 repeats"), "{err}");
        let text = minimal(8).replace("You are timid.", "You are bold.");
        let err = Persona::parse(&text, "p.toml").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("`negative`"), "{err}");
    }

    #[test]
    fn warnings_flag_negation_and_length() -> Result<()> {
        let text =
            minimal(8).replace("You are timid.", "You are not bold at all in any situation whatsoever.");
        let p = Persona::parse(&text, "p.toml")?;
        let w = p.warnings().join("\n");
        assert!(w.contains("negation \"not\""), "{w}");
        assert!(w.contains("words"), "{w}");
        Ok(())
    }
}
