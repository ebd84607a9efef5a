//! Command line: one subcommand per pipeline stage, all headless; the TUI is one more subcommand.
//! Each concept's subcommands live in their own file and are flattened into one command list here.

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    let cli = Cli::parse();
    match cli.cmd {
        Command::Model(c) => model_cmd::run(c),
        Command::Tui(c) => tui_cmd::run(c),
        Command::Heal(c) => heal_cmd::run(c),
        Command::Eval(c) => eval_cmd::run(c),
        Command::Steer(c) => steer_cmd::run(*c),
        Command::Rounds(c) => rounds_cmd::run(c),
    }
}
