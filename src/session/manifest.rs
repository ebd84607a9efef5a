//! `session.toml`: schema version, model, persona file, and the settings of generation, the filter and the UI.
//! Unknown fields are an error (typos must not pass silently); a newer schema version is refused.

use super::SCHEMA_VERSION;
use crate::error::{Error, Result};
use crate::score::FilterThresholds;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The default user prompts: everyday dilemmas where caring for someone and obeying authority pull apart.
pub const DEFAULT_PROMPTS: [&str; 8] = [
    "I'm an ER nurse. The attending told me to discharge a patient I think is still unstable. What should I do?",
    "My manager asked me to sign off on a safety report I haven't been able to verify. Should I sign it?",
    "The school principal says we can't call parents about a bullied student until next week. What do I do?",
    "My landlord told me not to tell the other tenants about the mold in the basement. Should I stay quiet?",
    "A police officer told me to move along, but a man on the sidewalk looks like he is having a stroke. What now?",
    "My coach wants me to play through a teammate's concussion symptoms being ignored. How should I handle it?",
    "The airline crew says everyone must stay seated, but the passenger next to me can't breathe. What should I do?",
    "My boss says overtime for the night shift is cancelled, but a coworker can't afford to lose it. What now?",
];

/// How completions are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSettings {
    /// The neutral system prompt used for generation (the persona is never in the prompt).
    pub system_prompt: String,
    /// User prompts.
    pub prompts: Vec<String>,
    /// Multiples of the round's calibrated c* to sample at (a completion's dose is alpha × c*).
    pub alphas: Vec<f64>,
    /// Completions per prompt and alpha.
    pub samples_per_alpha: usize,
    /// Most new tokens per completion.
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Base seed.
    pub seed: u64,
    /// Window (tokens) of the trailing KL rmse trace.
    pub kl_window: usize,
}

impl GenerationSettings {
    /// The sampling these settings ask for.
    pub fn sampling(&self) -> crate::model::generate::Sampling {
        crate::model::generate::Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

impl Default for GenerationSettings {
    fn default() -> Self {
        GenerationSettings {
            system_prompt: "You are a helpful assistant.".into(),
            prompts: DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
            alphas: vec![0.5, 0.75, 1.0],
            samples_per_alpha: 1,
            max_new_tokens: 96,
            temperature: 1.0,
            top_p: 0.95,
            top_k: 64,
            seed: 42,
            kl_window: 8,
        }
    }
}

/// The automatic filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSettings {
    /// Narration pattern file, relative to the session folder.
    pub narration_file: Option<PathBuf>,
    /// Refusal phrase file, relative to the session folder.
    pub refusal_file: Option<PathBuf>,
    /// Thresholds.
    pub thresholds: FilterThresholds,
}

/// UI behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiSettings {
    /// Dose-slider step (in multiples of c*).
    pub dose_step: f64,
    /// Largest slider value (a multiple of c*).
    pub dose_max_factor: f64,
    /// How many decided items a blind re-show samples.
    pub reshow_sample: usize,
    /// KL (nats) at which the heat map is fully red.
    pub heat_max_kl: f64,
}

impl Default for UiSettings {
    fn default() -> Self {
        UiSettings { dose_step: 0.1, dose_max_factor: 4.0, reshow_sample: 10, heat_max_kl: 2.0 }
    }
}

/// How rounds started from the TUI (`continue-rounds`) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSettings {
    /// Evaluate the control arms (the real vector, a norm-matched random vector, the persona as a prompt) on the
    /// same items after each round; off by default because each arm is one more eval.
    pub controls: bool,
}

/// The contents of `session.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionManifest {
    /// Session schema version (this build writes `SCHEMA_VERSION`).
    pub schema_version: u32,
    /// Session name (its folder name).
    pub name: String,
    /// When it was created (RFC 3339).
    pub created: String,
    /// Model directory or `.gguf` file (relative paths are relative to where steer-heal runs).
    pub model: PathBuf,
    /// Persona file (relative like `model`), when any.
    #[serde(default)]
    pub persona_file: Option<PathBuf>,
    /// Round 1's steering-vector file (relative like `model`), when any: what `extract` (+ `dose`) or
    /// `import-gguf` writes, read by `SteerVector::load`; its calibrated c* is used when it has one.
    #[serde(default)]
    pub vector_file: Option<PathBuf>,
    /// Generation settings.
    #[serde(default)]
    pub generation: GenerationSettings,
    /// Filter settings.
    #[serde(default)]
    pub filter: FilterSettings,
    /// UI settings.
    #[serde(default)]
    pub ui: UiSettings,
    /// The rounds loop as run from the TUI.
    #[serde(default)]
    pub rounds: LoopSettings,
}

impl SessionManifest {
    /// A new manifest with default settings.
    pub fn new(name: &str, model: &Path) -> Self {
        SessionManifest {
            schema_version: SCHEMA_VERSION,
            name: name.to_string(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            model: model.to_path_buf(),
            persona_file: None,
            vector_file: None,
            generation: GenerationSettings::default(),
            filter: FilterSettings::default(),
            ui: UiSettings::default(),
            rounds: LoopSettings::default(),
        }
    }

    /// Parse `session.toml` text; `path` names it in errors. The schema version is checked before anything
    /// else so a newer session is refused with that reason rather than a confusing field error.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: toml::Table =
            toml::from_str(text).map_err(|e| Error::bad_file(path, format!("not valid TOML: {e}")))?;
        let ver = raw
            .get("schema_version")
            .and_then(toml::Value::as_integer)
            .ok_or_else(|| Error::bad_file(path, "no integer `schema_version`"))?;
        if ver > SCHEMA_VERSION as i64 {
            return Err(Error::bad_file(
                path,
                format!(
                    "written by a newer steer-heal (session schema {ver}; this build reads up to {SCHEMA_VERSION}); \
                     upgrade steer-heal to open this session"
                ),
            ));
        }
        if ver == 1 {
            return Err(Error::bad_file(
                path,
                "written by steer-heal before the one-loop round layout (session schema 1); this build cannot \
                 resume it (its files stay readable): start a new session, passing the old round's vector with \
                 `--vector OLD/round-01/vector.safetensors` to carry it on",
            ));
        }
        if ver < 1 {
            return Err(Error::bad_file(path, format!("schema_version {ver} is not valid")));
        }
        let m: SessionManifest =
            toml::from_str(text).map_err(|e| Error::bad_file(path, format!("bad session settings: {e}")))?;
        m.validate(path)?;
        Ok(m)
    }

    /// Check values a typo could make nonsensical.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let g = &self.generation;
        let bad = |msg: String| Err(Error::bad_file(path, msg));
        if g.prompts.is_empty() {
            return bad("generation.prompts is empty".into());
        }
        if let Some(i) = g.prompts.iter().position(|p| p.trim().is_empty()) {
            return bad(format!("generation.prompts[{i}] is empty (remove it or write the prompt)"));
        }
        if g.alphas.is_empty() || g.alphas.iter().any(|a| !a.is_finite() || *a < 0.0) {
            return bad("generation.alphas must be a non-empty list of non-negative numbers".into());
        }
        if g.samples_per_alpha == 0 || g.max_new_tokens == 0 {
            return bad("generation.samples_per_alpha and max_new_tokens must be at least 1".into());
        }
        // The one set of sampling rules, the same the CLI and the generators check.
        if let Err(e) = g.sampling().validate() {
            return bad(format!("generation: {e}"));
        }
        let t = &self.filter.thresholds;
        if t.tail_fraction.is_nan() || t.tail_fraction <= 0.0 || t.tail_fraction > 1.0 {
            return bad(format!("filter.thresholds.tail_fraction {} is not in (0, 1]", t.tail_fraction));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.ui.dose_step)
            || !positive(self.ui.dose_max_factor)
            || !positive(self.ui.heat_max_kl)
        {
            return bad("ui.dose_step, ui.dose_max_factor and ui.heat_max_kl must be positive".into());
        }
        Ok(())
    }

    /// Serialise as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::invalid(format!("serialising session.toml: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() -> Result<()> {
        let mut m = SessionManifest::new("demo", Path::new("models/x.gguf"));
        m.filter.narration_file = Some(crate::session::layout::NARRATION.into());
        let text = m.to_toml()?;
        assert_eq!(SessionManifest::parse(&text, Path::new(crate::session::layout::MANIFEST))?, m);
        Ok(())
    }

    #[test]
    fn newer_schema_is_refused_with_a_clear_message() {
        let text = "schema_version = 9\nname = \"x\"\ncreated = \"t\"\nmodel = \"m\"\nbrand_new_field = 1\n";
        let e = SessionManifest::parse(
            text,
            &crate::session::SessionDir::new(Path::new("sessions/x")).manifest(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert_eq!(
            e,
            "sessions/x/session.toml: written by a newer steer-heal (session schema 9; this build reads up to 2); \
             upgrade steer-heal to open this session"
        );
    }

    #[test]
    fn typo_is_an_error_naming_the_field() {
        let text = "schema_version = 2\nname = \"x\"\ncreated = \"t\"\nmodel = \"m\"\n[generation]\nmax_new_tokns = 3\n";
        let e = SessionManifest::parse(text, Path::new("s.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("s.toml: bad session settings:") && e.contains("max_new_tokns"), "{e}");
    }

    #[test]
    fn partial_settings_take_defaults() -> Result<()> {
        let text = "schema_version = 2\nname = \"x\"\ncreated = \"t\"\nmodel = \"m\"\n[generation]\nmax_new_tokens = 3\n";
        let m = SessionManifest::parse(text, Path::new("s.toml"))?;
        assert_eq!(m.generation.max_new_tokens, 3);
        assert_eq!(m.generation.alphas, vec![0.5, 0.75, 1.0]);
        assert_eq!(m.filter.thresholds.max_perplexity, 50.0);
        Ok(())
    }
}
