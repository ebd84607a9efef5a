//! Training examples from accepted completions: the student sees the chat template with the neutral system
//! prompt and the user prompt, ending at the assistant header, followed by the steered completion's tokens; the
//! loss covers only the completion tokens. Sequences longer than `max_len` lose the end of their completion.

use crate::error::{Error, Result};
use crate::model::{ChatTemplate, TextTokenizer};
use crate::steer::Completion;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Id of the completion it came from.
    pub id: String,
    /// Prompt tokens followed by completion tokens.
    pub ids: Vec<u32>,
    /// Number of prompt tokens; positions `prompt_len..` are the completion, the loss targets.
    pub prompt_len: usize,
}

impl Example {
    /// Completion tokens trained on.
    pub fn completion_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// Examples plus what was dropped and why.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Usable examples, in input order.
    pub examples: Vec<Example>,
    /// `(completion id, reason)` for every completion left out.
    pub skipped: Vec<(String, String)>,
    /// Completions whose completion tokens were cut at `max_len`.
    pub truncated: usize,
}

impl Dataset {
    /// Fingerprint of the exact token sequences (a checkpoint only resumes on the same data).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for e in &self.examples {
            h.update((e.ids.len() as u64).to_le_bytes());
            h.update((e.prompt_len as u64).to_le_bytes());
            for t in &e.ids {
                h.update(t.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())[..16].to_string()
    }

    /// Total tokens over all examples (one epoch).
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }
}

/// Read completions from a JSONL file (one `Completion` per line; blank lines ignored).
pub fn read_completions(path: &Path) -> Result<Vec<Completion>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::MissingFile { path: path.to_path_buf(), what: "completions JSONL".into() }
        }
        _ => Error::bad_file(path, e),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let c: Completion = serde_json::from_str(line)
            .map_err(|e| Error::bad_file(path, format!("line {}: not a completion ({e})", i + 1)))?;
        out.push(c);
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "no completions in the file"));
    }
    Ok(out)
}

/// Build training examples: `chat.prompt(Some(system), prompt)` then the completion's tokens, cut to `max_len`.
/// Completions with no tokens, with ids outside the vocabulary, or whose prompt alone fills `max_len` are skipped
/// and reported.
pub fn build_examples(
    completions: &[Completion],
    tok: &TextTokenizer,
    chat: &ChatTemplate,
    vocab_size: usize,
    max_len: usize,
) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for c in completions {
        if c.tokens.is_empty() {
            ds.skipped.push((c.id.clone(), "no completion tokens".into()));
            continue;
        }
        if let Some(bad) = c.tokens.iter().find(|t| **t as usize >= vocab_size) {
            ds.skipped.push((
                c.id.clone(),
                format!("token id {bad} is outside the model's vocabulary of {vocab_size}"),
            ));
            continue;
        }
        let text = chat.prompt(Some(&c.system), &c.prompt)?;
        let prompt = tok.encode(&text)?;
        if prompt.is_empty() || prompt.len() + 1 > max_len {
            ds.skipped.push((
                c.id.clone(),
                format!("prompt of {} tokens leaves no room under max_len {max_len}", prompt.len()),
            ));
            continue;
        }
        let room = max_len - prompt.len();
        if c.tokens.len() > room {
            ds.truncated += 1;
        }
        let mut ids = prompt.clone();
        ids.extend_from_slice(&c.tokens[..c.tokens.len().min(room)]);
        ds.examples.push(Example { id: c.id.clone(), ids, prompt_len: prompt.len() });
    }
    Ok(ds)
}
