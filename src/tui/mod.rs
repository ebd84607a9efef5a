//! The terminal UI: state, pure update, views, keymaps. Never touches candle.
