//! The background worker that owns the model and runs jobs for the TUI.
