//! Command line: one subcommand per pipeline stage, all headless; the TUI is one more subcommand.
//! Each concept's subcommands live in their own file and are flattened into one command list here.

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use steer_heal::model::device::parse_dtype;
use steer_heal::model::{Compute, DeviceChoice};

/// `--device` and `--dtype`, shared by every command that runs a model.
#[derive(Args, Clone, Copy, Debug)]
pub struct ComputeArgs {
    /// Device: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU).
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceChoice,
    /// Weights dtype: f32, bf16 or f16 [default: the file's, f32 for quantized GGUF].
    #[arg(long, global = true, value_parser = parse_dtype)]
    dtype: Option<DType>,
}

impl ComputeArgs {
    /// The choice as the library takes it.
    pub fn compute(&self) -> Compute {
        Compute { device: self.device, dtype: self.dtype }
    }
}

mod args;

/// An exit with a particular status (128 + signal for a TUI stopped by a signal) and a message.
#[derive(Debug)]
pub struct Exit {
    /// Process exit status.
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}
mod eval_cmd;
mod heal_cmd;
mod model_cmd;
mod rounds_cmd;
mod steer_cmd;
mod tui_cmd;

#[derive(Parser)]
#[command(name = "steer-heal", version, about = "Persona steering, curation and LoRA healing for small LMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// The device and dtype of this process, set once from `--device` / `--dtype` before any command runs.
static COMPUTE: std::sync::OnceLock<Compute> = std::sync::OnceLock::new();

/// The device and dtype every command loads its model with.
pub fn compute() -> Compute {
    COMPUTE.get().copied().unwrap_or_default()
}

/// The candle device of `compute()`, or an error that names the flag.
pub fn device() -> Result<candle_core::Device> {
    Ok(compute().device()?)
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Model(model_cmd::ModelCmd),
    #[command(flatten)]
    Tui(tui_cmd::TuiCmd),
    #[command(flatten)]
    Heal(heal_cmd::HealCmd),
    #[command(flatten)]
    Eval(eval_cmd::EvalCmd),
    #[command(flatten)]
    Steer(Box<steer_cmd::SteerCmd>),
    #[command(flatten)]
    Rounds(rounds_cmd::RoundsCmd),
}

/// Parse arguments and run.
pub fn run() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // Help and version print as clap prints them; a bad flag is one line naming it (clap's first line), exit 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad arguments").trim_start_matches("error: ");
            return Err(Exit { code: 2, message: format!("error: {first} (see --help)") }.into());
        }
    };
    let _ = COMPUTE.set(cli.compute.compute());
    match cli.cmd {
        Command::Model(c) => model_cmd::run(c),
        Command::Tui(c) => tui_cmd::run(c),
        Command::Heal(c) => heal_cmd::run(c),
        Command::Eval(c) => eval_cmd::run(c),
        Command::Steer(c) => steer_cmd::run(*c),
        Command::Rounds(c) => rounds_cmd::run(c),
    }
}
