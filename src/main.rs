//! steer-heal binary: parse the command line, run one subcommand, print errors as one line.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    // Before any thread starts: candle reads these settings when it builds its thread pools.
    if let Err(e) = steer_heal::model::cpu::configure() {
        eprintln!("steer-heal: error: {e}");
        return ExitCode::FAILURE;
    }
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<cli::Exit>() {
                eprintln!("steer-heal: {exit}");
                return ExitCode::from(exit.code);
            }
            // One line a researcher can act on: the outermost context plus its causes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("steer-heal: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
