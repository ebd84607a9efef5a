//! TUI subcommands: `tui` (open or create a session and curate gate Q0), `keymap-doc` (the generated keymap
//! reference) and `bench-tui` (UI latency while the worker generates, as JSON).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use steer_heal::session::{Session, SessionManifest};
use steer_heal::tui::app::State;
use steer_heal::tui::keymap::{splice_doc, KeyChord, KeyCode, Keymap};
use steer_heal::tui::terminal::{event_loop, FrameStats, Input};
use tokio::sync::mpsc;

#[derive(Subcommand)]
pub enum TuiCmd {
    /// Open a session (creating it if needed) and curate gate Q0 in the terminal.
    Tui {
        /// Session name (under --sessions-dir) or a session folder path.
        session: Option<String>,
        /// Model directory or .gguf file (required to create a session).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Persona file recorded in a new session.
        #[arg(long)]
        persona: Option<PathBuf>,
        /// Steering-vector safetensors file recorded in a new session.
        #[arg(long)]
        vector: Option<PathBuf>,
        /// Keymap file overriding the defaults (else $XDG_CONFIG_HOME/steer-heal/keymap.toml if present).
        #[arg(long)]
        keymap: Option<PathBuf>,
        /// Where named sessions live.
        #[arg(long, default_value = "sessions")]
        sessions_dir: PathBuf,
        /// Most new tokens per completion (new sessions only).
        #[arg(value_parser = super::args::count, long)]
        max_new_tokens: Option<usize>,
        #[command(flatten)]
        filter: super::args::FilterArgs,
    },
    /// Print the keymap reference as markdown, or write it between the keymap markers of a file.
    KeymapDoc {
        /// Keymap file merged over the defaults.
        #[arg(long)]
        keymap: Option<PathBuf>,
        /// File whose `<!-- keymap:start -->` … `<!-- keymap:end -->` block is replaced (created if absent).
        #[arg(long)]
        write: Option<PathBuf>,
        /// Fail if the file's block differs from the generated one instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// Measure UI latency (key press to drawn frame) while the worker generates; writes JSON.
    BenchTui {
        /// Model to generate with (default: a random Llama with SmolLM2-135M's body — hidden 576, 30 layers —
        /// and the tiny byte-level tokenizer, written to a temporary folder).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Key presses to send.
        #[arg(long, default_value_t = 300)]
        keys: usize,
        /// Milliseconds between key presses.
        #[arg(long, default_value_t = 15)]
        interval_ms: u64,
        /// Most new tokens per completion.
        #[arg(value_parser = super::args::count, long, default_value_t = 96)]
        max_new_tokens: usize,
        /// Write the JSON here as well as printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Run a TUI subcommand.
pub fn run(cmd: TuiCmd) -> Result<()> {
    match cmd {
        TuiCmd::Tui { session, model, persona, vector, keymap, sessions_dir, max_new_tokens, filter } => {
            tui(session, model, persona, vector, keymap, &sessions_dir, NewSession { max_new_tokens, filter })
        }
        TuiCmd::KeymapDoc { keymap, write, check } => keymap_doc(keymap.as_deref(), write.as_deref(), check),
        TuiCmd::BenchTui { model, keys, interval_ms, max_new_tokens, out } => {
            bench(model, keys, interval_ms, max_new_tokens, out.as_deref())
        }
    }
}

/// A bare name lives in `sessions_dir`; anything path-like is used as it is.
fn session_dir(arg: Option<&str>, sessions_dir: &Path) -> PathBuf {
    let name = arg.unwrap_or("default");
    let p = Path::new(name);
    if p.components().count() > 1 || p.is_absolute() || name == "." || name == ".." {
        p.to_path_buf()
    } else {
        sessions_dir.join(name)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")
}

fn tui(
    session: Option<String>,
    model: Option<PathBuf>,
    persona: Option<PathBuf>,
    vector: Option<PathBuf>,
    keymap: Option<PathBuf>,
    sessions_dir: &Path,
    new: NewSession,
) -> Result<()> {
    let dir = session_dir(session.as_deref(), sessions_dir);
    let keymap = Keymap::load(keymap.as_deref()).context("loading the keymap")?;
    let (state, session) = open_state(&dir, keymap, model, persona, vector, new)?;
    let rt = runtime()?;
    let (_, outcome) = rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = steer_heal::worker::spawn(session, super::compute(), tx)?;
        steer_heal::tui::terminal::run(state, worker, rx).await
    })?;
    // The terminal is restored and the worker has finished writing: say how it ended.
    if let Some(sig) = outcome.signal {
        return Err(super::Exit {
            code: 128 + sig.number(),
            message: format!("stopped by {}; what was saved is kept", sig.name()),
        }
        .into());
    }
    if outcome.not_saved > 0 {
        bail!(
            "{}: {} change(s) could not be written to the session log (the screen took them back); check the disk",
            dir.display(),
            outcome.not_saved
        );
    }
    if let Some(why) = outcome.model_failed {
        bail!("the model did not load: {why}");
    }
    Ok(())
}

/// What a new session takes from the command line (an existing one keeps its session.toml).
#[derive(Default)]
struct NewSession {
    max_new_tokens: Option<usize>,
    filter: super::args::FilterArgs,
}

/// Everything the TUI does before its first frame: open (or create) the session, check the model, read the
/// current round. The model itself loads later, in the worker.
fn open_state(
    dir: &Path,
    keymap: Keymap,
    model: Option<PathBuf>,
    persona: Option<PathBuf>,
    vector: Option<PathBuf>,
    new: NewSession,
) -> Result<(State, Session)> {
    let opened = Session::open_or_create(dir, || {
        let Some(m) = &model else {
            return Err(steer_heal::Error::invalid(format!(
                "{}: no session here yet; pass --model PATH to create one",
                dir.display()
            )));
        };
        let p = steer_heal::steer::Persona::load_or_default(persona.as_deref())?;
        let tokens = new
            .max_new_tokens
            .unwrap_or(steer_heal::session::manifest::GenerationSettings::default().max_new_tokens);
        Ok(steer_heal::rounds::new_manifest(
            dir,
            m,
            persona.as_deref(),
            vector.as_deref(),
            steer_heal::rounds::generation_for(&p, None, tokens),
            Some(new.filter.thresholds()),
        ))
    })
    .with_context(|| format!("opening session {}", dir.display()))?;
    let manifest = opened.session.manifest().clone();
    let same = |a: &Path, b: &Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    if let Some(v) = &vector {
        if !manifest.vector_file.as_deref().is_some_and(|f| same(v, f)) {
            bail!(
                "{}: the session steers round 1 with {}, not {} (a vector is chosen when a session is created: \
                 open a new session to steer with it)",
                dir.display(),
                manifest.vector_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "its own extracted vector".into()),
                v.display()
            );
        }
    }
    if let Some(m) = &model {
        if !same(m, &manifest.model) {
            bail!(
                "{}: the session uses model {}, not {} (edit session.toml to switch models)",
                dir.display(),
                manifest.model.display(),
                m.display()
            );
        }
    }
    let round = opened.state.round().cloned().unwrap_or_default();
    let rows = opened.session.load_round(&round).with_context(|| format!("reading {}", dir.display()))?;
    let name = manifest.name.clone();
    let mut state = State::new(keymap, &name, manifest, opened.state, rows);
    state.layout = opened.session.layout();
    state.warnings = opened.warnings;
    Ok((state, opened.session))
}

/// Start-up on an existing session as `steer-heal tui` does it: open the session and build the state, start the
/// worker, run the event loop to its first frame (into a sink), then quit. Process exec and the terminal's raw
/// mode switch are not included (both well under a millisecond).
fn startup_to_first_frame(rt: &tokio::runtime::Runtime, dir: &Path) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let (mut state, session) = open_state(dir, Keymap::defaults()?, None, None, None, NewSession::default())?;
    let rows = state.rows.len();
    rt.block_on(async move {
        let (tx, mut wrx) = mpsc::unbounded_channel();
        let worker = steer_heal::worker::spawn(session, super::compute(), tx)?;
        let backend = ratatui::backend::CrosstermBackend::new(std::io::sink());
        let viewport = ratatui::Viewport::Fixed(ratatui::layout::Rect::new(0, 0, 120, 40));
        let mut terminal = ratatui::Terminal::with_options(backend, ratatui::TerminalOptions { viewport })?;
        // Quit is already waiting, so the loop draws its first frame and stops.
        let (in_tx, mut in_rx) = mpsc::unbounded_channel();
        let _ = in_tx.send(Input::Terminate);
        let mut stats = FrameStats::default();
        let jobs = worker.jobs.clone();
        event_loop(&mut terminal, &mut state, &jobs, &mut wrx, &mut in_rx, &mut stats).await?;
        let first = start.elapsed();
        drop(jobs);
        drop(worker.jobs);
        let _ = worker.join.await;
        if stats.frames == 0 {
            bail!("no frame was drawn");
        }
        anyhow::Ok((first, rows))
    })
}

fn keymap_doc(keymap: Option<&Path>, write: Option<&Path>, check: bool) -> Result<()> {
    let km = match keymap {
        Some(p) => Keymap::load(Some(p))?,
        None => Keymap::defaults()?,
    };
    let table = km.markdown();
    let Some(path) = write else {
        print!("{table}");
        return Ok(());
    };
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = splice_doc(&old, &table);
    if check {
        if new != old {
            bail!(
                "{}: the keymap table is out of date; run `steer-heal keymap-doc --write {}`",
                path.display(),
                path.display()
            );
        }
        return Ok(());
    }
    steer_heal::fsutil::atomic_write(path, new.as_bytes())?;
    println!("wrote the keymap table into {}", path.display());
    Ok(())
}

/// Keys the benchmark presses in a loop: navigation, cursor, sorting, filtering, dose, decisions and undo.
fn bench_keys() -> Vec<KeyChord> {
    let c = KeyChord::char;
    vec![
        c('j'),
        c('j'),
        c('l'),
        c('l'),
        c('l'),
        c('h'),
        c('k'),
        c(']'),
        c('['),
        c('s'),
        c('S'),
        c('f'),
        c('F'),
        c('a'),
        c('u'),
        c('r'),
        c('u'),
        c('T'),
        KeyChord::new(KeyCode::Esc),
        c('?'),
        KeyChord::new(KeyCode::Esc),
        c('n'),
        c('J'),
        c('K'),
    ]
}

fn bench(
    model: Option<PathBuf>,
    keys: usize,
    interval_ms: u64,
    max_new_tokens: usize,
    out: Option<&Path>,
) -> Result<()> {
    let tmp = tempfile_dir()?;
    let model = match model {
        Some(m) => m,
        None => {
            let m = tmp.join("random-smollm-body");
            random_model(&m)?;
            m
        }
    };
    let mut manifest = SessionManifest::new("bench", &model);
    manifest.generation.max_new_tokens = max_new_tokens;
    let opened = Session::create(&tmp.join("session"), manifest.clone())?;
    let state =
        State::new(Keymap::defaults()?, "bench", opened.session.manifest().clone(), opened.state, vec![]);
    let rt = runtime()?;
    let script = bench_keys();
    let (stats, busy_keys, gen_tokens, elapsed) = rt.block_on(async move {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let (tx, mut wrx) = mpsc::unbounded_channel();
        let worker = steer_heal::worker::spawn(opened.session, super::compute(), tx)?;
        let (in_tx, mut in_rx) = mpsc::unbounded_channel();
        // Render exactly as the real terminal does (escape sequences and all), into a sink.
        let backend = ratatui::backend::CrosstermBackend::new(std::io::sink());
        let viewport = ratatui::Viewport::Fixed(ratatui::layout::Rect::new(0, 0, 120, 40));
        let mut terminal = ratatui::Terminal::with_options(backend, ratatui::TerminalOptions { viewport })?;
        let mut state = state;
        let start = Instant::now();
        let feeder = tokio::spawn(async move {
            // Give the model time to load and generation to start, then type.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            for i in 0..keys {
                let _ = in_tx.send(Input::Key(script[i % script.len()]));
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
            }
            let _ = in_tx.send(Input::Terminate);
        });
        // Taps on both channels: count keys that arrive while a model job (load, generate, replay) runs.
        let busy = Arc::new(AtomicBool::new(false));
        let busy_keys = Arc::new(AtomicUsize::new(0));
        let (tap_tx, mut tap_rx) = mpsc::unbounded_channel();
        let (b, bk) = (busy.clone(), busy_keys.clone());
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                if matches!(i, Input::Key(_)) && b.load(Ordering::Relaxed) {
                    bk.fetch_add(1, Ordering::Relaxed);
                }
                if tap_tx.send(i).is_err() {
                    break;
                }
            }
        });
        let (wtx, mut wtap) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            use steer_heal::worker::WorkerEvent as W;
            let mut running = std::collections::BTreeSet::new();
            while let Some(ev) = wrx.recv().await {
                match &ev {
                    W::Started { id, tag } if tag.is_model_job() => {
                        running.insert(*id);
                    }
                    W::Finished { id, .. } | W::Failed { id, .. } | W::Cancelled { id } => {
                        running.remove(id);
                    }
                    _ => {}
                }
                busy.store(!running.is_empty(), Ordering::Relaxed);
                if wtx.send(ev).is_err() {
                    break;
                }
            }
        });
        let mut stats = FrameStats::default();
        let jobs = worker.jobs.clone();
        let res = event_loop(&mut terminal, &mut state, &jobs, &mut wtap, &mut tap_rx, &mut stats).await;
        let _ = feeder.await;
        drop(jobs);
        drop(worker.jobs);
        let _ = worker.join.await;
        res?;
        if let steer_heal::tui::app::ModelStatus::Failed(e) = &state.model {
            bail!("the model failed to load: {e}");
        }
        if let Some(steer_heal::tui::app::Popup::Message { title, text }) = &state.popup {
            bail!("{title}: {text}");
        }
        let tokens = state.rows.iter().map(|r| r.completion.tokens.len()).sum::<usize>();
        anyhow::Ok((stats, busy_keys.load(Ordering::Relaxed), tokens, start.elapsed()))
    })?;
    // Start-up on the session just used (it now holds completions and decisions); best of three.
    let mut startups = Vec::new();
    let mut startup_rows = 0;
    for _ in 0..3 {
        let (t, rows) = startup_to_first_frame(&rt, &tmp.join("session"))?;
        startups.push(t);
        startup_rows = rows;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let json = serde_json::json!({
        "benchmark": "tui key-to-frame latency while the worker generates",
        "model": model.display().to_string(),
        "terminal": "120x40, CrosstermBackend writing to a sink",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "keys": stats.key_to_frame.len(),
        "keys_while_model_busy": busy_keys,
        "frames": stats.frames,
        "worst_key_to_frame_ms": ms(stats.worst_key()),
        "p50_key_to_frame_ms": ms(stats.key_quantile(0.5)),
        "p99_key_to_frame_ms": ms(stats.key_quantile(0.99)),
        "worst_draw_ms": ms(stats.worst_draw),
        "tokens_generated": gen_tokens,
        "seconds": elapsed.as_secs_f64(),
        "target_ms": 16.0,
        "startup_to_first_frame_ms": startups.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "startup_best_ms": startups.iter().map(|d| ms(*d)).fold(f64::INFINITY, f64::min),
        "startup_session_rows": startup_rows,
        "startup_target_ms": 1000.0,
    });
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    if let Some(p) = out {
        steer_heal::fsutil::atomic_write(p, text.as_bytes())?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// A random Llama with SmolLM2-135M's layer shapes (so generation costs about what the real model's body
/// costs) and the tiny tokenizer, in Hugging Face layout.
fn random_model(dir: &Path) -> Result<()> {
    use steer_heal::model::{tiny, Arch};
    std::fs::create_dir_all(dir)?;
    let tok = tiny::tiny_tokenizer(Arch::Llama)?;
    let mut cfg = tiny::tiny_config(Arch::Llama, tok.get_vocab_size(true), &tok);
    cfg.hidden_size = 576;
    cfg.intermediate_size = 1536;
    cfg.num_hidden_layers = 30;
    cfg.num_attention_heads = 9;
    cfg.num_key_value_heads = 3;
    cfg.head_dim = 64;
    cfg.sliding_layers = vec![false; 30];
    let weights = tiny::random_weights(&cfg, 7)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg.to_hf_value())?)?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving the tokenizer: {e}"))?;
    let tc = serde_json::json!({"chat_template": steer_heal::model::chat::CHATML, "bos_token": null,
        "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string())?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// A fresh private temporary folder (the binary has no tempfile dependency).
fn tempfile_dir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("steer-heal-bench-{}", std::process::id()));
    if p.exists() {
        std::fs::remove_dir_all(&p)?;
    }
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
