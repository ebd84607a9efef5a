//! Sessions on disk: manifest, append-only event log, per-round artifacts.
