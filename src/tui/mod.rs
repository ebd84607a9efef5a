//! The terminal UI: one `State`, a pure `update`, views that only read the state, keymaps as data, and the
//! terminal loop that wires keys, the worker and a tick together. Never touches candle.
//!
//! - `action`: the action vocabulary and screens (keymap names).
//! - `keymap`: key strings, per-screen tables, merge, reverse index, docs.
//! - `app`: `State`, `Msg`, `update`, derived numbers (`app::stats`).
//! - `view`: drawing (gate-Q0 screen, popups).
//! - `terminal`: raw mode, restore on quit/error/panic/signal, the event loop, frame timing.

pub mod action;
pub mod app;
pub mod keymap;
pub mod terminal;
pub mod view;
