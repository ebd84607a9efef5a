//! Model subcommands: make tiny models, chat once, convert and fetch checkpoints.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;
use steer_heal::model::{self, generate::Sampling, Arch, Hooks};

#[derive(Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Llama,
    Qwen3,
    Gemma3,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen3 => Arch::Qwen3,
            ArchArg::Gemma3 => Arch::Gemma3,
        }
    }
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a deterministic tiny random model directory (config, safetensors, tokenizer, chat template).
    MakeTinyModel {
        /// Architecture family.
        #[arg(long, value_enum, default_value = "llama")]
        arch: ArchArg,
        /// Random seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output directory.
        out_dir: PathBuf,
    },
    /// Chat with a model once: render the chat template, generate, print the reply.
    Chat {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Optional system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The user message.
        prompt: String,
    },
    /// Convert a GGUF file to a Hugging Face directory (config, f32 safetensors, tokenizer, chat template).
    Convert {
        /// The .gguf file.
        model: PathBuf,
        /// Output directory (created if absent).
        out_dir: PathBuf,
    },
}

/// Run a model subcommand.
pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::MakeTinyModel { arch, seed, out_dir } => {
            model::tiny::make_tiny_model(arch.into(), &out_dir, seed)
                .with_context(|| format!("making tiny model in {}", out_dir.display()))?;
            println!("wrote {}", out_dir.display());
        }
        ModelCmd::Chat { model: path, system, max_new_tokens, temperature, seed, prompt } => {
            let dev = Device::Cpu;
            let lm = model::load_model(&path, None, &dev)?;
            let text = lm.chat.prompt(system.as_deref(), &prompt)?;
            let ids = lm.tokenizer.encode(&text)?;
            let s = Sampling { temperature, top_p: 0.95, top_k: 64, seed, max_new_tokens };
            let gen = model::generate::generate(
                &lm.model,
                &[ids],
                &s,
                &Hooks::none(),
                &lm.tokenizer.stop_ids,
                lm.tokenizer.pad_id,
                &mut |_| true,
            )?;
            println!("{}", lm.tokenizer.decode(&gen.tokens[0], false)?);
        }
        ModelCmd::Convert { model: path, out_dir } => {
            model::gguf::convert_gguf(&path, &out_dir)?;
            println!("wrote {}", out_dir.display());
        }
    }
    Ok(())
}
