//! steer-heal binary: parse the command line, run one subcommand, print errors as one line.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    pin_thread_count();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
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

/// candle 0.11 asks for its thread count on every CPU matmul and, unless `RAYON_NUM_THREADS` is set, re-reads
/// `/proc/cpuinfo` each time: about a third of a SmolLM2 batch-1 decode step. Ask once (same answer candle would
/// give) and pin it, before any thread starts.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
