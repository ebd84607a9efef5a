//! Rounds subcommands: `run` (the whole loop headless, resumable), `rollback` and `fork` of a session's lineage.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use steer_heal::progress::Bar;
use steer_heal::rounds::{generation_for, new_manifest, LogTo, RoundsConfig, Runner};

/// Logs like `run`, and cancels the run when `round`'s first completions are written.
struct StopAtFirstCompletions {
    round: u32,
    cancel: Arc<AtomicBool>,
    reached: bool,
}

impl steer_heal::rounds::RunObserver for StopAtFirstCompletions {
    fn log(&mut self, msg: &str) {
        eprintln!("steer-heal: {msg}");
    }
    fn completions(
        &mut self,
        round: u32,
        _part: usize,
        _file: &str,
        _rows: &[steer_heal::score::ScoredCompletion],
    ) {
        if round == self.round {
            self.reached = true;
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// Settings of `run`; the defaults are the small CPU demo settings.
#[derive(Args)]
pub struct RunArgs {
    /// Session folder (created when absent; an existing one is resumed).
    #[arg(long)]
    session: PathBuf,
    /// Base model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Persona TOML [default: the built-in authority persona].
    #[arg(long)]
    persona: Option<PathBuf>,
    /// Steering-vector file (from `extract` + `dose`, or `import-gguf`) round 1 steers with, instead of
    /// extracting its own (new sessions only).
    #[arg(long)]
    vector: Option<PathBuf>,

    /// Rounds to run (judged rounds count, so a resumed run goes on to this total).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Gate Q2's coherence floor: the loop stops at a round under it.
    #[command(flatten)]
    floor: super::args::FloorArgs,
    /// Steering prompts used for generation (new sessions only; a session keeps its session.toml).
    #[arg(value_parser = super::args::count, long, default_value_t = 4)]
    n_prompts: usize,
    /// New tokens per steered completion (new sessions only).
    #[arg(value_parser = super::args::count, long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Extraction contexts used.
    #[arg(value_parser = super::args::count, long, default_value_t = 16)]
    extract_pairs: usize,
    /// Iso-KL target (p95 per-token KL), nats.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 1.0)]
    dose_target: f64,
    /// Walk-down: generations per probe and per top-up batch.
    #[arg(value_parser = super::args::count, long, default_value_t = 4)]
    probe_n: usize,
    /// Walk-down: stop topping up at this many passing completions.
    #[arg(long, default_value_t = 4)]
    min_keep: usize,
    /// Walk-down: keep at most this many passing completions.
    #[arg(value_parser = super::args::count, long, default_value_t = 8)]
    max_keep: usize,
    /// Walk-down: most top-up batches after the probes.
    #[arg(long, default_value_t = 1)]
    max_batches: usize,
    #[command(flatten)]
    filter: super::args::FilterArgs,
    /// Heal epochs.
    #[arg(value_parser = super::args::count, long, default_value_t = 1)]
    epochs: usize,
    /// LoRA rank.
    #[arg(value_parser = super::args::count, long, default_value_t = 8)]
    r: usize,
    /// Heal learning rate.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 5e-4)]
    lr: f64,
    /// tinymfv vignettes per eval.
    #[arg(value_parser = super::args::count, long, default_value_t = 8)]
    eval_n: usize,
    /// Forced think tokens per eval frame.
    #[arg(long, default_value_t = 16)]
    think: usize,
    /// Token budget of each json_is_valid probe.
    #[arg(long, default_value_t = 48)]
    json_probe_tokens: usize,
    /// Held-out prompts measured before/after healing.
    #[arg(long, default_value_t = 2)]
    measure_n: usize,
    /// Also evaluate control arms on the same items (real vector at c*, norm-matched random vector at c*).
    #[arg(long)]
    controls: bool,
}

/// The rounds concept's subcommands, flattened into the top-level command list.
#[derive(Subcommand)]
pub enum RoundsCmd {
    /// Run the rounds loop headless: extract → dose → generate → score → gate Q0 → heal → bake → eval, per round.
    Run(Box<RunArgs>),
    /// Round turnaround: run a fresh session (the `run` settings) until round 2's first completions, then report
    /// the wall time from gate Q0 of round 1 to them, per stage, from the session's event log (JSON + a table).
    BenchRound {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// JSON output file.
        #[arg(long, default_value = "bench/turnaround.json")]
        out: PathBuf,
    },
    /// Roll a session's student back to a kept round (0 = the base); later rounds stay visible.
    Rollback {
        /// Session folder.
        #[arg(long)]
        session: PathBuf,
        /// Kept round to return to.
        #[arg(long)]
        to: u32,
    },
    /// Rewrite a session's summaries from its artifacts: rounds.json with 95 % intervals and paired differences,
    /// gate-q2.md, the progress map, and the intervals of gate-Q1 reports written without them.
    Report {
        /// Session folder.
        #[arg(long)]
        session: PathBuf,
        #[command(flatten)]
        floor: super::args::FloorArgs,
    },
    /// Fork a new lineage branch from a kept round (0 = the base).
    Fork {
        /// Session folder.
        #[arg(long)]
        session: PathBuf,
        /// Kept round to branch from.
        #[arg(long)]
        from: u32,
        /// Branch name.
        #[arg(long)]
        branch: String,
    },
}

/// The first Ctrl-C stops the loop at the next check (finished stages are kept; a rerun resumes); a second quits.
fn stop_on_ctrl_c(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nsteer-heal: stopping (Ctrl-C again to quit now); rerun the same command to resume"
                );
                flag.store(true, Ordering::Relaxed);
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
}

fn config(a: &RunArgs) -> RoundsConfig {
    let mut c = RoundsConfig::small(&a.model);
    c.persona = a.persona.clone();
    c.rounds = a.rounds;
    c.floor = a.floor.floor();
    c.compute = super::compute();
    c.extract_pairs = Some(a.extract_pairs);
    c.dose_target = a.dose_target;
    c.walk.probe_n = a.probe_n;
    c.walk.batch_n = a.probe_n;
    c.walk.min_keep = a.min_keep;
    c.walk.max_keep = a.max_keep.max(a.min_keep);
    c.walk.max_batches = a.max_batches;
    c.heal.epochs = a.epochs;
    c.heal.r = a.r;
    c.heal.alpha = 2.0 * a.r as f64;
    c.heal.lr = a.lr;
    c.eval.n_vignettes = Some(a.eval_n);
    c.eval.think_tokens = a.think;
    c.eval.json_probe_max_tokens = a.json_probe_tokens;
    c.measure_n = a.measure_n;
    c.controls = a.controls;
    c
}

/// The session at `dir`, which must exist (rollback and fork edit a lineage; they never create one).
fn existing(dir: &std::path::Path) -> Result<steer_heal::session::Opened> {
    steer_heal::session::Session::open(dir).with_context(|| format!("opening session {}", dir.display()))
}

/// Open (or create, with `run`'s settings) the session `a` names.
fn open_runner<'a>(
    a: &RunArgs,
    progress: &'a mut dyn steer_heal::progress::Progress,
    obs: &'a mut dyn steer_heal::rounds::RunObserver,
) -> Result<Runner<'a>> {
    let new_session = |persona: &steer_heal::steer::Persona| {
        let thresholds = a.filter.thresholds();
        new_manifest(
            &a.session,
            &a.model,
            a.persona.as_deref(),
            a.vector.as_deref(),
            generation_for(persona, Some(a.n_prompts), a.max_new_tokens),
            Some(thresholds),
        )
    };
    Runner::open(&a.session, config(a), new_session, progress, obs)
        .with_context(|| format!("opening session {}", a.session.display()))
}

/// Run a rounds subcommand.
pub fn run(cmd: RoundsCmd) -> Result<()> {
    match cmd {
        RoundsCmd::Run(a) => {
            let started = Instant::now();
            let mut bar = Bar::new("rounds");
            stop_on_ctrl_c(bar.cancel.clone());
            let mut log = LogTo(|s: &str| eprintln!("steer-heal: {s}"));
            let mut runner = open_runner(&a, &mut bar, &mut log)?;
            let summary = runner.run()?;
            bar.finish();
            println!(
                "{} ({} rounds judged, {:.0} s)",
                summary.stopped,
                summary.rounds_done,
                started.elapsed().as_secs_f64()
            );
            println!("round  status   authority    care  p_ans_any  ppx_json  json_ok  kl_spent  cos_v0  cos_shift");
            for p in &summary.points {
                let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
                println!(
                    "{:>5}  {:<7} {:>10.4} {:>7.4} {:>10.4} {:>9.3} {:>8} {:>9} {:>7} {:>10}",
                    p.round,
                    format!("{:?}", p.status).to_lowercase(),
                    p.authority,
                    p.care,
                    p.p_ans_any,
                    p.ppx_json,
                    f(p.json_is_valid),
                    f(p.kl_spent),
                    f(p.cos_teacher_r0),
                    f(p.cos_student_teacher)
                );
            }
            println!(
                "wrote the progress map, the gate-Q2 report, the rounds table and the lineage in {}",
                a.session.display()
            );
        }
        RoundsCmd::BenchRound { run: a, out } => {
            let mut a = a;
            a.rounds = a.rounds.max(2);
            let mut bar = Bar::new("bench-round");
            stop_on_ctrl_c(bar.cancel.clone());
            // Round 2's first completions end the measurement: the observer cancels the run there.
            let mut obs = StopAtFirstCompletions { round: 2, cancel: bar.cancel.clone(), reached: false };
            let mut runner = open_runner(&a, &mut bar, &mut obs)?;
            let summary = runner.run()?;
            drop(runner);
            bar.finish();
            if !obs.reached {
                anyhow::bail!("the run stopped before round 2's first completions: {}", summary.stopped);
            }
            let layout = steer_heal::session::SessionDir::new(&a.session);
            let log = steer_heal::session::event::read_log(&layout.events())
                .with_context(|| format!("reading the event log of {}", a.session.display()))?;
            let t = steer_heal::rounds::turnaround::turnaround(&log.events, 1).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: the log does not hold gate Q0 of round 1 through round 2's first completions",
                    a.session.display()
                )
            })?;
            print!("{}", t.table());
            // What the binary's start-up (`model::cpu::configure`) chose.
            let cpu = steer_heal::model::cpu::isa::active();
            let report = serde_json::json!({
                "session": a.session.display().to_string(),
                "model": a.model.display().to_string(),
                "settings": {
                    "n_prompts": a.n_prompts, "max_new_tokens": a.max_new_tokens, "epochs": a.epochs,
                    "eval_n": a.eval_n, "think": a.think,
                },
                "isa": cpu.name(),
                "isa_detected": steer_heal::model::cpu::isa::detected().name(),
                "blas": steer_heal::model::cpu::blas_summary(),
                "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
                "turnaround": t,
            });
            steer_heal::fsutil::atomic_write_json(&out, &report)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        RoundsCmd::Report { session, floor } => {
            let floor = floor.floor();
            let r = steer_heal::rounds::write_report(&session, floor)
                .with_context(|| format!("reporting session {}", session.display()))?;
            for p in &r.gate_q1_updated {
                println!("gate Q1 intervals added: {}", p.display());
            }
            let spec = steer_heal::eval::GateQ2Spec { floor, ..Default::default() };
            println!("{}", steer_heal::eval::verdict(&r.points, &spec).line);
            println!("wrote the rounds table, gate-q2.md and the progress map in {}", session.display());
        }
        RoundsCmd::Rollback { session, to } => {
            let mut runner = existing(&session)?;
            steer_heal::rounds::rollback(&mut runner, to)?;
            println!("rolled back to round {to}; the next round starts from it");
        }
        RoundsCmd::Fork { session, from, branch } => {
            let mut runner = existing(&session)?;
            steer_heal::rounds::fork(&mut runner, from, &branch)?;
            println!("branch `{branch}` starts from round {from}");
        }
    }
    Ok(())
}
