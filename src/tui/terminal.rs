//! Terminal plumbing: raw mode and the alternate screen, restored on quit, on error (a guard), on panic (a hook
//! that restores before the message prints) and on SIGTERM/SIGHUP (turned into a quit); the event loop that
//! feeds keys, worker events and ticks to `update` and draws after each; and frame timing for the benchmark.

use super::app::{on_action, update, Msg, State};
use super::keymap::{KeyChord, KeyCode};
use super::view::render;
use crate::error::{Error, Result};
use crate::worker::{Job, WorkerEvent};
use futures::StreamExt;
use ratatui::backend::Backend;
use ratatui::Terminal;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Input to the loop, from the terminal, a signal, or a benchmark script.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A key press.
    Key(KeyChord),
    /// Pasted text.
    Paste(String),
    /// The terminal changed size.
    Resize,
    /// The terminal went away (read error): quit as if the user pressed quit.
    Terminate,
    /// SIGTERM / SIGHUP: quit as if the user pressed quit, and exit with 128 + the signal.
    Signal(super::app::StopSignal),
}

/// A crossterm key event as a keymap chord (`None` for releases and keys we do not bind).
pub fn key_from_crossterm(ev: &crossterm::event::KeyEvent) -> Option<KeyChord> {
    use crossterm::event::{KeyCode as C, KeyEventKind, KeyModifiers as M};
    if ev.kind == KeyEventKind::Release {
        return None;
    }
    let code = match ev.code {
        C::Char(c) => KeyCode::Char(c),
        C::Enter => KeyCode::Enter,
        C::Esc => KeyCode::Esc,
        C::Tab => KeyCode::Tab,
        C::BackTab => KeyCode::BackTab,
        C::Backspace => KeyCode::Backspace,
        C::Delete => KeyCode::Delete,
        C::Insert => KeyCode::Insert,
        C::Home => KeyCode::Home,
        C::End => KeyCode::End,
        C::PageUp => KeyCode::PageUp,
        C::PageDown => KeyCode::PageDown,
        C::Up => KeyCode::Up,
        C::Down => KeyCode::Down,
        C::Left => KeyCode::Left,
        C::Right => KeyCode::Right,
        C::F(n) => KeyCode::F(n),
        _ => return None,
    };
    let m = ev.modifiers;
    Some(
        KeyChord {
            code,
            ctrl: m.contains(M::CONTROL),
            alt: m.contains(M::ALT),
            shift: m.contains(M::SHIFT) && code != KeyCode::BackTab,
        }
        .normalised(),
    )
}

/// Frame timings of one run.
#[derive(Debug, Clone, Default)]
pub struct FrameStats {
    /// Frames drawn.
    pub frames: u64,
    /// Longest single draw.
    pub worst_draw: Duration,
    /// For every key: time from its arrival to the end of the frame that shows its effect.
    pub key_to_frame: Vec<Duration>,
}

impl FrameStats {
    /// Worst key-to-frame latency.
    pub fn worst_key(&self) -> Duration {
        self.key_to_frame.iter().copied().max().unwrap_or_default()
    }
    /// The q-quantile (0..=1) of key-to-frame latency.
    pub fn key_quantile(&self, q: f64) -> Duration {
        let mut v = self.key_to_frame.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn draw<B: Backend>(t: &mut Terminal<B>, s: &State, stats: &mut FrameStats) -> Result<()>
where
    B::Error: std::fmt::Display,
{
    let t0 = Instant::now();
    t.draw(|f| {
        let area = f.area();
        render(s, area, f.buffer_mut());
    })
    .map_err(|e| Error::Io(std::io::Error::other(format!("drawing the terminal: {e}"))))?;
    stats.frames += 1;
    stats.worst_draw = stats.worst_draw.max(t0.elapsed());
    Ok(())
}

async fn send_all(jobs: &mpsc::Sender<Job>, batch: Vec<Job>) -> Result<()> {
    for j in batch {
        jobs.send(j).await.map_err(|_| Error::invalid("the background worker stopped"))?;
    }
    Ok(())
}

/// Most worker events folded into one frame: token streams arrive faster than frames are useful.
const COALESCE: usize = 256;

/// Run the loop until the state asks to quit or input ends: each input, worker event or tick goes through
/// `update`, its jobs go to the worker, then one frame is drawn.
pub async fn event_loop<B: Backend>(
    terminal: &mut Terminal<B>,
    state: &mut State,
    jobs: &mpsc::Sender<Job>,
    worker: &mut mpsc::UnboundedReceiver<WorkerEvent>,
    input: &mut mpsc::UnboundedReceiver<Input>,
    stats: &mut FrameStats,
) -> Result<()>
where
    B::Error: std::fmt::Display,
{
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    send_all(jobs, update(state, Msg::Init)).await?;
    draw(terminal, state, stats)?;
    let mut worker_open = true;
    loop {
        let mut key_at = None;
        tokio::select! {
            // Keys first: the researcher's input must never queue behind a token stream.
            biased;
            inp = input.recv() => match inp {
                Some(Input::Key(k)) => {
                    key_at = Some(Instant::now());
                    send_all(jobs, update(state, Msg::Key(k))).await?;
                }
                Some(Input::Paste(p)) => send_all(jobs, update(state, Msg::Paste(p))).await?,
                Some(Input::Resize) => {
                    terminal.autoresize().map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
                    send_all(jobs, update(state, Msg::Resize)).await?;
                }
                Some(Input::Terminate) => {
                    send_all(jobs, on_action(state, super::action::Action::Quit)).await?;
                }
                Some(Input::Signal(n)) => {
                    state.signal = Some(n);
                    send_all(jobs, on_action(state, super::action::Action::Quit)).await?;
                }
                None => break,
            },
            ev = worker.recv(), if worker_open => match ev {
                Some(ev) => {
                    send_all(jobs, update(state, Msg::Worker(ev))).await?;
                    for _ in 0..COALESCE {
                        match worker.try_recv() {
                            Ok(ev) => send_all(jobs, update(state, Msg::Worker(ev))).await?,
                            Err(_) => break,
                        }
                    }
                }
                None => worker_open = false,
            },
            _ = tick.tick() => send_all(jobs, update(state, Msg::Tick { now: now_rfc3339() })).await?,
        }
        if state.quit {
            break;
        }
        draw(terminal, state, stats)?;
        if let Some(t0) = key_at {
            stats.key_to_frame.push(t0.elapsed());
        }
    }
    Ok(())
}

fn restore_terminal() {
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
    ratatui::restore();
}

/// Restores the terminal when dropped, so every exit path (including `?`) leaves a usable shell.
struct RestoreGuard;

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Take over the terminal and run the TUI until quit; the worker is then given time to finish writing.
/// Returns how the session ended (the caller turns it into the exit status).
pub async fn run(
    mut state: State,
    worker: crate::worker::WorkerHandle,
    mut worker_rx: mpsc::UnboundedReceiver<WorkerEvent>,
) -> Result<(FrameStats, super::app::Outcome)> {
    // Our hook runs after ratatui's (which restores the screen first) and also turns bracketed paste off.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
        previous(info);
    }));
    let mut terminal =
        ratatui::try_init().map_err(|e| Error::Io(std::io::Error::other(format!("terminal: {e}"))))?;
    let guard = RestoreGuard;
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableBracketedPaste);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel();
    let keys_tx = in_tx.clone();
    let reader = tokio::spawn(async move {
        let mut events = crossterm::event::EventStream::new();
        while let Some(ev) = events.next().await {
            let input = match ev {
                Ok(crossterm::event::Event::Key(k)) => key_from_crossterm(&k).map(Input::Key),
                Ok(crossterm::event::Event::Paste(p)) => Some(Input::Paste(p)),
                Ok(crossterm::event::Event::Resize(..)) => Some(Input::Resize),
                Ok(_) => None,
                Err(_) => Some(Input::Terminate),
            };
            if let Some(i) = input {
                if keys_tx.send(i).is_err() {
                    break;
                }
            }
        }
    });
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
        else {
            return;
        };
        let n = tokio::select! {
            _ = term.recv() => super::app::StopSignal::Term,
            _ = hup.recv() => super::app::StopSignal::Hup,
        };
        let _ = in_tx.send(Input::Signal(n));
    });
    let mut stats = FrameStats::default();
    let result =
        event_loop(&mut terminal, &mut state, &worker.jobs, &mut worker_rx, &mut in_rx, &mut stats).await;
    reader.abort();
    signals.abort();
    drop(guard);
    // Let queued records reach the log; a running generation is cancelled by the worker's shutdown.
    drop(worker.jobs);
    let mut join = worker.join;
    if tokio::time::timeout(Duration::from_secs(2), &mut join).await.is_err() {
        eprintln!("steer-heal: waiting for the worker to finish writing the session…");
        let _ = join.await;
    }
    result.map(|_| (stats, state.outcome()))
}
