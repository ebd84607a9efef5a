//! Editable detector files: narration regexes and refusal phrases, one per line, `#` comments.
//! Defaults ship inside the binary (`narration.txt`, `refusal.txt` beside this file); a session copies them
//! next to its `session.toml` so the researcher can edit them per session.

use crate::error::{Error, Result};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The shipped narration patterns.
pub const DEFAULT_NARRATION: &str = include_str!("narration.txt");
/// The shipped refusal phrases.
pub const DEFAULT_REFUSAL: &str = include_str!("refusal.txt");

/// One detector hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternMatch {
    /// The pattern or phrase (a line of the file).
    pub pattern: String,
    /// The text it matched.
    pub matched: String,
    /// Byte offset of the match in the (normalised) text.
    pub at: usize,
}

/// Straighten curly apostrophes and quotes so one pattern covers both typings.
pub fn normalise(text: &str) -> String {
    text.replace(['\u{2019}', '\u{2018}', '\u{02BC}'], "'")
}

/// Non-comment, non-blank lines with their 1-based line numbers.
fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// A list of case-insensitive regular expressions (the narration detector).
#[derive(Debug, Clone)]
pub struct RegexList {
    patterns: Vec<(String, Regex)>,
}

impl RegexList {
    /// Parse a pattern file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let mut patterns = Vec::new();
        for (line, p) in entries(text) {
            let re = RegexBuilder::new(p)
                .case_insensitive(true)
                .build()
                .map_err(|e| Error::bad_file(source, format!("line {line}: bad pattern `{p}`: {e}")))?;
            patterns.push((p.to_string(), re));
        }
        Ok(RegexList { patterns })
    }
    /// Read a pattern file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
        Self::parse(&text, path)
    }
    /// The shipped narration patterns.
    pub fn default_narration() -> Result<Self> {
        Self::parse(DEFAULT_NARRATION, Path::new("<built-in narration.txt>"))
    }
    /// Number of patterns.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }
    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
    /// The first match of every pattern that matches.
    pub fn find_all(&self, text: &str) -> Vec<PatternMatch> {
        let t = normalise(text);
        self.patterns
            .iter()
            .filter_map(|(p, re)| {
                re.find(&t).map(|m| PatternMatch {
                    pattern: p.clone(),
                    matched: m.as_str().to_string(),
                    at: m.start(),
                })
            })
            .collect()
    }
}

/// A list of case-insensitive plain phrases (the refusal detector).
#[derive(Debug, Clone)]
pub struct PhraseList {
    phrases: Vec<String>,
}

impl PhraseList {
    /// Parse a phrase file's text (phrases are lower-cased; nothing can be malformed).
    pub fn parse(text: &str) -> Self {
        PhraseList { phrases: entries(text).map(|(_, p)| normalise(&p.to_lowercase())).collect() }
    }
    /// Read a phrase file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
        Ok(Self::parse(&text))
    }
    /// The shipped refusal phrases.
    pub fn default_refusal() -> Self {
        Self::parse(DEFAULT_REFUSAL)
    }
    /// Number of phrases.
    pub fn len(&self) -> usize {
        self.phrases.len()
    }
    /// True when there are no phrases.
    pub fn is_empty(&self) -> bool {
        self.phrases.is_empty()
    }
    /// Every phrase that occurs, with its first position.
    pub fn find_all(&self, text: &str) -> Vec<PatternMatch> {
        let t = normalise(&text.to_lowercase());
        self.phrases
            .iter()
            .filter_map(|p| {
                t.find(p.as_str()).map(|at| PatternMatch { pattern: p.clone(), matched: p.clone(), at })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(text: &str) -> usize {
        RegexList::default_narration().map(|r| r.find_all(text).len()).unwrap_or(usize::MAX)
    }

    #[test]
    fn narration_examples_from_the_research_code_match() {
        for s in [
            "I am someone who looks after people.",
            "As someone who cares, I would help.",
            "I don't defer to managers when lives are at stake.",
            "I never defer to authority.",
            "My principle is simple.",
            "I always stick to what is right.",
            "I refuse to obey an unjust order.",
            "I refuse to defer.",
            "I’m someone who speaks up.", // curly apostrophe
        ] {
            assert!(hits(s) > 0, "no narration hit for {s:?}");
        }
    }

    #[test]
    fn enacting_text_does_not_match() {
        for s in [
            "Call the doctor now and tell them the dose is wrong; the patient comes first.",
            "Someone who is hurt needs help, so go to the nurse's station.",
            "You should not defer to the manager here.",
        ] {
            assert_eq!(hits(s), 0, "false narration hit for {s:?}");
        }
    }

    #[test]
    fn refusal_phrases() {
        let p = PhraseList::default_refusal();
        assert!(p.len() >= 20);
        let m = p.find_all("Sorry. As an AI, I can’t assist with that.");
        let found: Vec<&str> = m.iter().map(|m| m.pattern.as_str()).collect();
        assert_eq!(found, vec!["as an ai", "i can't assist"]);
        assert_eq!(m[0].at, 7);
        assert!(p.find_all("Tell your supervisor today.").is_empty());
    }

    #[test]
    fn bad_regex_names_file_and_line() {
        let e = RegexList::parse(
            "# c\n\nok\n(unclosed\n",
            &Path::new("sess").join(crate::session::layout::NARRATION),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.starts_with("sess/narration.txt: line 4: bad pattern `(unclosed`"), "{e}");
    }

    #[test]
    fn user_file_replaces_defaults() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("n.txt");
        std::fs::write(&p, "# mine\n\\bbehold\\b\n")?;
        let r = RegexList::load(&p)?;
        assert_eq!(r.len(), 1);
        assert_eq!(r.find_all("BEHOLD me")[0].matched, "BEHOLD");
        assert!(r.find_all("I am someone who cares").is_empty());
        Ok(())
    }
}
