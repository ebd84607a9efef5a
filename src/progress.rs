//! Progress reporting and cancellation shared by every pipeline stage: the headless CLI shows a progress
//! bar, the TUI worker forwards the same calls as messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Receives progress from a stage and tells it whether to stop.
pub trait Progress: Send {
    /// `done` of `total` units finished; `msg` says what is happening.
    fn step(&mut self, done: u64, total: u64, msg: &str);
    /// True when the user asked to stop; stages check it between units of work.
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// Progress that goes nowhere (tests, nested stages).
#[derive(Debug, Default, Clone)]
pub struct Silent {
    /// Cancellation flag, shared with whoever may cancel.
    pub cancel: Arc<AtomicBool>,
}

impl Progress for Silent {
    fn step(&mut self, _done: u64, _total: u64, _msg: &str) {}
    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// An indicatif progress bar on stderr for headless subcommands.
pub struct Bar {
    bar: indicatif::ProgressBar,
    /// Cancellation flag (set by a signal handler, if any).
    pub cancel: Arc<AtomicBool>,
}

impl Bar {
    /// A new bar with a label.
    pub fn new(label: &str) -> Self {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_prefix(label.to_string());
        Bar { bar, cancel: Arc::new(AtomicBool::new(false)) }
    }
    /// Finish and leave the bar on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

impl Progress for Bar {
    fn step(&mut self, done: u64, total: u64, msg: &str) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        self.bar.set_message(msg.to_string());
    }
    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
