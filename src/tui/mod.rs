//! The terminal UI: state, pure update, views, keymaps. Never touches candle.

pub mod action;
pub mod keymap;
