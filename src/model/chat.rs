//! The model's own Jinja chat template, rendered with minijinja: generation prompts, continuing a final
//! assistant message, and the marker that closes an assistant turn.

use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(s: impl Into<String>) -> Self {
        Message { role: "system".into(), content: s.into() }
    }
    /// A user message.
    pub fn user(s: impl Into<String>) -> Self {
        Message { role: "user".into(), content: s.into() }
    }
    /// An assistant message.
    pub fn assistant(s: impl Into<String>) -> Self {
        Message { role: "assistant".into(), content: s.into() }
    }
}

/// A chat template ready to render.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SENTINEL: &str = "\u{1}SENTINEL\u{1}";

impl ChatTemplate {
    /// Build from template source and the tokenizer's special tokens.
    pub fn new(source: impl Into<String>, tok: &TextTokenizer) -> Result<Self> {
        let t = ChatTemplate {
            source: source.into(),
            bos_token: tok.bos_token.clone().unwrap_or_default(),
            eos_token: tok.eos_token.clone().unwrap_or_default(),
        };
        // Fail at load time, not at the first prompt.
        t.render(&[Message::user("hi")], true)?;
        Ok(t)
    }

    /// Read the template from `tokenizer_config.json` (string or named list) or `chat_template.jinja`.
    pub fn from_dir(dir: &Path, tok: &TextTokenizer) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let s = std::fs::read_to_string(&jinja).map_err(|e| Error::bad_file(&jinja, e))?;
            return Self::new(s, tok).map_err(|e| Error::bad_file(&jinja, e));
        }
        let tc = dir.join("tokenizer_config.json");
        let src = if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::bad_file(&tc, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&tc, format!("not valid JSON: {e}")))?;
            match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|e| e.get("template"))
                    .and_then(Value::as_str)
                    .map(String::from),
                _ => None,
            }
        } else {
            None
        };
        let src = src.unwrap_or_else(|| CHATML.to_string());
        Self::new(src, tok).map_err(|e| Error::bad_file(&tc, e))
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render messages; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| "26 Nov 2026".to_string());
        env.add_template("chat", &self.source).map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// Render so the text ends inside the final assistant message (the model continues it), like Hugging Face's
    /// `continue_final_message=True`.
    pub fn render_continue(&self, messages: &[Message]) -> Result<String> {
        let last = messages.last().ok_or_else(|| Error::Template("no messages to continue".into()))?;
        if last.role != "assistant" {
            return Err(Error::Template("continue needs a final assistant message".into()));
        }
        let mut msgs = messages.to_vec();
        let n = msgs.len();
        msgs[n - 1].content = SENTINEL.to_string();
        let full = self.render(&msgs, false)?;
        let cut = full
            .rfind(SENTINEL)
            .ok_or_else(|| Error::Template("template drops the final assistant message".into()))?;
        Ok(format!("{}{}", &full[..cut], last.content))
    }

    /// The text that closes an assistant turn (e.g. `<|im_end|>\n` or `<end_of_turn>\n`).
    pub fn assistant_end(&self) -> Result<String> {
        let full = self.render(&[Message::user("hi"), Message::assistant(SENTINEL)], false)?;
        let at = full
            .rfind(SENTINEL)
            .ok_or_else(|| Error::Template("template drops the assistant message".into()))?;
        Ok(full[at + SENTINEL.len()..].to_string())
    }

    /// Render a prompt: optional system message, one user message, ending at the assistant header.
    pub fn prompt(&self, system: Option<&str>, user: &str) -> Result<String> {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message::system(s));
        }
        msgs.push(Message::user(user));
        self.render(&msgs, true)
    }
}
