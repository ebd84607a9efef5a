//! Heal subcommands: `heal` (train a round's LoRA under the KL barrier, or `--sweep` regularisers × strengths,
//! then write `gate-q1.md`), `bake` (gated merge of kept rounds), `export-peft`, `export-merged`, `bench-heal`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use steer_heal::heal::RunPaths;
use steer_heal::heal::{
    self, adapter, bench, gate, sweep, train, Agg, HealConfig, HealStatus, HistoryEntry, Reference, Reg,
    RunOptions,
};
use steer_heal::model::generate::Sampling;
use steer_heal::model::LoadedModel;
use steer_heal::progress::Bar;
use steer_heal::steer::Completion;

/// A kept round on the command line: `DIR` (gate 1) or `DIR@GATE`.
fn parse_history(s: &str) -> std::result::Result<HistoryEntry, String> {
    if let Some((dir, g)) = s.rsplit_once('@') {
        if let Ok(gate) = g.parse::<f64>() {
            return Ok(HistoryEntry { dir: PathBuf::from(dir), gate });
        }
    }
    Ok(HistoryEntry { dir: PathBuf::from(s), gate: 1.0 })
}

/// LoRA shape and loss options shared by `heal` and `bench-heal`.
#[derive(Args, Clone)]
pub struct LoraArgs {
    /// Projections to adapt, comma-separated (default: all seven attention and MLP linears).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Adapted layers start at this fraction of depth.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.2)]
    layers_from: f64,
    /// Adapted layers end at this fraction of depth.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.8)]
    layers_to: f64,
    /// LoRA rank.
    #[arg(value_parser = super::args::count, long, default_value_t = 32)]
    r: usize,
    /// LoRA α (scale α/r).
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 64.0)]
    alpha: f64,
    /// Regulariser: kl_rev, kl_fwd or nll.
    #[arg(long, default_value = "kl_rev")]
    reg: Reg,
    /// KL aggregation over completion positions: mean, rmse, p95 or max.
    #[arg(long, default_value = "rmse")]
    agg: Agg,
    /// KL reference: prev (kept rounds on, this adapter off) or base (every gate 0).
    #[arg(long, default_value = "prev")]
    reference: Reference,
    /// Barrier strength λ.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.3)]
    lambda: f64,
    /// Barrier threshold τ, nats.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.5)]
    tau: f64,
    /// λ_eff = λ·(1+round)^p.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.0, allow_negative_numbers = true)]
    lambda_round_pow: f64,
    /// Spectral penalty weight on σ_max(B·A) (0 = off).
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.0)]
    spectral_lambda: f64,
    /// AdamW weight decay.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Peak learning rate.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 1e-4)]
    lr: f64,
    /// Round index (names the adapter, scales λ).
    #[arg(long, default_value_t = 0)]
    round: usize,
    /// Seed of the adapter initialisation and data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl LoraArgs {
    fn config(&self) -> HealConfig {
        let d = HealConfig::default();
        HealConfig {
            round: self.round,
            targets: self.targets.clone().unwrap_or(d.targets.clone()),
            layer_range: (self.layers_from, self.layers_to),
            r: self.r,
            alpha: self.alpha,
            reg: self.reg,
            agg: self.agg,
            reference: self.reference,
            lambda: self.lambda,
            tau: self.tau,
            lambda_round_pow: self.lambda_round_pow,
            spectral_lambda: self.spectral_lambda,
            weight_decay: self.weight_decay,
            lr: self.lr,
            seed: self.seed,
            ..d
        }
    }
}

/// The heal concept's subcommands, flattened into the top-level command list.
#[derive(Subcommand)]
pub enum HealCmd {
    /// Train this round's LoRA on accepted completions under the KL barrier and write gate-q1.md.
    ///
    /// The student sees the neutral prompt and learns the steered completion; the student is measured before and
    /// after on fresh neutral generations. Resumes from OUT's checkpoint if there is one; Ctrl-C stops cleanly.
    Heal(Box<HealArgs>),
    /// Gated bake: merge kept rounds' adapters into the base at their gates (a Hugging Face directory).
    Bake {
        /// Base model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// A round's adapter directory, optionally `@GATE` (repeatable; gate 0 leaves it out exactly).
        #[arg(long = "adapter", value_parser = parse_history, required = true)]
        adapters: Vec<HistoryEntry>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Export an adapter in PEFT layout (from a run, an adapter directory or a checkpoint).
    ExportPeft {
        /// Run directory, adapter directory or train/checkpoint.safetensors.
        #[arg(long)]
        from: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Value for `base_model_name_or_path` (default: the model the run trained on).
        #[arg(long)]
        base_model: Option<String>,
    },
    /// Export a heal run's model (base + kept rounds + its adapter) merged, as a Hugging Face directory.
    ExportMerged {
        /// Heal run directory (with heal.json and adapter/).
        #[arg(long)]
        run: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Base model path, if it moved since the run.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Gate of this round's adapter.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 1.0)]
        gate: f64,
    },
    /// Benchmark heal training tokens/s (reference pass + forward + backward + AdamW) and write JSON.
    BenchHeal(Box<BenchArgs>),
}

/// Arguments of `heal`.
#[derive(Args)]
pub struct HealArgs {
    /// Base model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Accepted completions (JSONL, one Completion per line).
    #[arg(long)]
    completions: PathBuf,
    /// Run directory (checkpoints, log, adapter, heal.json, gate-q1.md).
    #[arg(long)]
    out: PathBuf,
    /// A kept earlier round: adapter directory, optionally `@GATE` (repeatable, in order).
    #[arg(long, value_parser = parse_history)]
    history: Vec<HistoryEntry>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Passes over the data.
    #[arg(value_parser = super::args::count, long, default_value_t = 2)]
    epochs: usize,
    /// Examples per optimiser step.
    #[arg(value_parser = super::args::count, long, default_value_t = 4)]
    grad_accum: usize,
    /// Examples per padded forward/backward pass (speed only; the step's gradient is unchanged).
    #[arg(value_parser = super::args::count, long, default_value_t = 4)]
    micro_batch: usize,
    /// Longest training sequence in tokens.
    #[arg(value_parser = super::args::count, long, default_value_t = 1024)]
    max_len: usize,
    /// Checkpoint every N optimiser steps (0 = only at the end).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Ignore and overwrite an existing checkpoint.
    #[arg(long)]
    fresh: bool,
    /// Stop after this many optimiser steps (resumable).
    #[arg(long)]
    max_steps: Option<usize>,
    #[command(flatten)]
    gate: GateArgs,
    /// Sweep regularisers × strengths instead of one run (each arm in OUT/sweep/).
    #[arg(long)]
    sweep: bool,
    /// Sweep regularisers, comma-separated: kl_rev, kl_rev_mean, kl_rev_rmse, kl_fwd, nll, spectral, wd.
    #[arg(long, value_delimiter = ',', default_value = "nll,kl_rev,kl_fwd")]
    sweep_regs: Vec<sweep::SweepReg>,
    /// Sweep strengths (λ, spectral weight or weight decay), comma-separated.
    #[arg(value_parser = super::args::finite_f64, long, value_delimiter = ',', default_value = "0.1,0.3,1.0")]
    sweep_strengths: Vec<f64>,
}

/// Arguments of `bench-heal`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// JSON output file.
    #[arg(long)]
    out: PathBuf,
    /// Tokens per sequence.
    #[arg(value_parser = super::args::count, long, default_value_t = 256)]
    seq_len: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Timed steps.
    #[arg(value_parser = super::args::count, long, default_value_t = 5)]
    steps: usize,
    /// Sequences per step, through the model together (the peer script uses 4; on a 2-core CPU 1 is as fast).
    #[arg(value_parser = super::args::count, long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    lora: LoraArgs,
    /// Also run the same steps on the composite path (candle's differentiable ops only) and report its speed
    /// and how far its losses are from the training path's.
    #[arg(long)]
    compare_composite: bool,
}

/// How the student is measured for gate-q1.md.
#[derive(Args, Clone)]
pub struct GateArgs {
    /// Skip measuring and gate-q1.md.
    #[arg(long)]
    no_gate: bool,
    /// Held-out neutral prompts, one per line (default: the first prompts of the completions file).
    #[arg(long)]
    eval_prompts: Option<PathBuf>,
    /// How many prompts to measure on.
    #[arg(value_parser = super::args::count, long, default_value_t = 4)]
    eval_n: usize,
    /// New tokens per measured generation.
    #[arg(value_parser = super::args::count, long, default_value_t = 48)]
    eval_tokens: usize,
    /// Persona system prompt, for persona strength (the trait); without it the trait is left unmeasured.
    #[arg(long)]
    persona: Option<String>,
}

/// Set the flag on the first Ctrl-C (training stops after saving); a second Ctrl-C exits at once.
fn cancel_on_ctrl_c(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nsteer-heal: stopping after the current step (Ctrl-C again to quit now)");
                flag.store(true, Ordering::Relaxed);
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
}

fn load(model: &Path, history: &[HistoryEntry]) -> Result<LoadedModel> {
    anyhow::Ok(heal::load_with_history(model, super::compute().dtype, &super::device()?, history)?)
        .with_context(|| format!("loading {}", model.display()))
}

/// Run a heal subcommand.
pub fn run(cmd: HealCmd) -> Result<()> {
    match cmd {
        HealCmd::Heal(args) => {
            let HealArgs {
                model,
                completions,
                out,
                history,
                lora,
                epochs,
                grad_accum,
                micro_batch,
                max_len,
                checkpoint_every,
                fresh,
                max_steps,
                gate,
                sweep,
                sweep_regs,
                sweep_strengths,
            } = *args;
            let cfg =
                HealConfig { epochs, grad_accum, micro_batch, max_len, checkpoint_every, ..lora.config() };
            let mut lm = load(&model, &history)?;
            cfg.validate(&lm.model.cfg)?;
            let comps = heal::read_completions(&completions)?;
            let data =
                heal::build_examples(&comps, &lm.tokenizer, &lm.chat, lm.model.cfg.vocab_size, cfg.max_len)?;
            for (id, why) in &data.skipped {
                eprintln!("steer-heal: skipping completion `{id}`: {why}");
            }
            if data.examples.is_empty() {
                bail!("{}: no usable completions", completions.display());
            }
            eprintln!(
                "steer-heal: {} examples ({} tokens, {} truncated), {} steps, r {} on layers {:?}",
                data.examples.len(),
                data.tokens(),
                data.truncated,
                train::total_steps(data.examples.len(), &cfg),
                cfg.r,
                cfg.layers(lm.model.cfg.num_hidden_layers)
            );
            let mut bar = Bar::new("heal");
            cancel_on_ctrl_c(bar.cancel.clone());
            let spec = (!gate.no_gate).then(|| measure_spec(&gate, &comps)).transpose()?;
            let before = match &spec {
                Some(s) => Some(gate::measure(&lm, s, &mut bar)?),
                None => None,
            };
            let opts = RunOptions { fresh, stop_after_steps: max_steps, final_gate: None, history };
            if sweep {
                let Some(spec) = spec else { bail!("--sweep needs the gate measurement; drop --no-gate") };
                let before = before.context("measurement before healing")?;
                let arms = sweep::arms(&cfg, &sweep_regs, &sweep_strengths)?;
                let results = sweep::run_sweep(&mut lm, &data, &arms, &out, &spec, &opts, &mut bar)?;
                bar.finish();
                write_gate(&out, &mut lm, &spec, &cfg, &comps, &gate, &before, None, &results)?;
                println!("wrote {}", RunPaths::at(&out).gate_q1_md().display());
                return Ok(());
            }
            let log = heal::heal(&mut lm.model, &lm.info, &data, &cfg, &out, &opts, &mut bar, &mut |_| {})?;
            bar.finish();
            println!("{} ({:.1} tokens/s, {:.3} steps/s)", log.message, log.tokens_per_s, log.steps_per_s);
            match log.status {
                HealStatus::Completed => {}
                HealStatus::Diverged => bail!("{}", log.message),
                HealStatus::Cancelled | HealStatus::Stopped => return Ok(()),
            }
            if let (Some(spec), Some(before)) = (spec, before) {
                let after = gate::measure(&lm, &spec, &mut bar)?;
                write_gate(&out, &mut lm, &spec, &cfg, &comps, &gate, &before, Some((&after, &log)), &[])?;
                println!("wrote {}", RunPaths::at(&out).gate_q1_md().display());
            }
        }
        HealCmd::Bake { model, adapters, out } => {
            let lm = load(&model, &adapters)?;
            let gates = adapter::gates(&lm.model);
            heal::export_merged(&lm, &out, &serde_json::json!({"bake": adapters, "gates": gates}))?;
            println!(
                "wrote {} ({} rounds baked)",
                out.display(),
                gates.values().filter(|g| **g != 0.0).count()
            );
        }
        HealCmd::ExportPeft { from, out, base_model } => {
            let (ad, mut meta) = read_adapter(&from)?;
            if let Some(b) = base_model {
                meta.base_model = b;
            }
            heal::save_peft(&ad, &out, &meta)?;
            println!(
                "wrote {} ({} projections, r {}, alpha {})",
                out.display(),
                ad.pairs.len(),
                ad.r,
                ad.alpha
            );
        }
        HealCmd::ExportMerged { run, out, model, gate } => {
            let log = read_heal_log(&run)?;
            let model = model.unwrap_or_else(|| log.model.path.clone());
            let mut lm = load(&model, &log.history)?;
            let (ad, _) = heal::load_peft(&run.join("adapter"))?;
            ad.attach(&mut lm.model, gate)?;
            heal::export_merged(
                &lm,
                &out,
                &serde_json::json!({"run": run, "history": log.history, "gate": gate}),
            )?;
            println!("wrote {}", out.display());
        }
        HealCmd::BenchHeal(args) => {
            let BenchArgs { model, out, seq_len, prompt_len, steps, batch, lora, compare_composite } = *args;
            let mut lm = load(&model, &[])?;
            let spec = bench::BenchSpec { seq_len, prompt_len, steps, batch, cfg: lora.config() };
            let res = bench::bench_heal(&mut lm, &spec, compare_composite)?;
            steer_heal::fsutil::atomic_write_json(&out, &res)?;
            println!(
                "{:.1} tokens/s ({:.1} without the reference pass), {:.3} steps/s; wrote {}",
                res.tokens_per_s,
                res.tokens_per_s_without_reference,
                res.steps_per_s,
                out.display()
            );
            if let (Some(c), Some(d)) = (&res.composite, res.composite_max_rel_loss_diff) {
                println!(
                    "composite path: {:.1} tokens/s ({:.1} without the reference pass); step losses differ by at most {d:.2e} (relative)",
                    c.tokens_per_s, c.tokens_per_s_without_reference
                );
            }
        }
    }
    Ok(())
}

fn read_heal_log(run: &Path) -> Result<train::HealLog> {
    let p = train::RunPaths::at(run).summary();
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: no heal run here", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a heal log", p.display()))
}

/// An adapter from a run directory, an adapter directory or a checkpoint file.
fn read_adapter(from: &Path) -> Result<(heal::LoraAdapter, heal::AdapterMeta)> {
    let meta = |name: String, round: Option<usize>, base: String, hash: Option<String>| heal::AdapterMeta {
        schema_version: train::SCHEMA_VERSION,
        name,
        round,
        default_gate: 1.0,
        base_model: base,
        base_weights_hash: hash,
    };
    if from.is_file() {
        let (ad, step, cfg) = train::adapter_from_checkpoint(from)?;
        eprintln!("steer-heal: exporting the checkpoint of step {step}");
        let m = meta(ad.name.clone(), Some(cfg.round), "unknown".into(), None);
        return Ok((ad, m));
    }
    if from.join(heal::peft::CONFIG_FILE).exists() {
        let (ad, m) = heal::load_peft(from)?;
        let m = m.unwrap_or_else(|| meta(ad.name.clone(), None, "unknown".into(), None));
        return Ok((ad, m));
    }
    let paths = train::RunPaths::at(from);
    let log = read_heal_log(from)?;
    let base = log.model.id.clone();
    if paths.adapter().join(heal::peft::CONFIG_FILE).exists() {
        let (ad, m) = heal::load_peft(&paths.adapter())?;
        return Ok((
            ad,
            m.unwrap_or_else(|| meta(log.config.adapter_name(), Some(log.config.round), base, None)),
        ));
    }
    let (ad, step, cfg) = train::adapter_from_checkpoint(&paths.checkpoint())?;
    eprintln!("steer-heal: the run is not finished; exporting its checkpoint of step {step}");
    Ok((ad, meta(cfg.adapter_name(), Some(cfg.round), base, Some(log.model.weights_hash))))
}

fn measure_spec(g: &GateArgs, comps: &[Completion]) -> Result<gate::MeasureSpec> {
    let prompts: Vec<String> = match &g.eval_prompts {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => {
            let mut seen = BTreeSet::new();
            comps.iter().filter(|c| seen.insert(c.prompt.clone())).map(|c| c.prompt.clone()).collect()
        }
    };
    if prompts.is_empty() {
        bail!("no evaluation prompts");
    }
    let neutral_system = comps.first().map(|c| c.system.clone()).unwrap_or_default();
    Ok(gate::MeasureSpec {
        prompts: prompts.into_iter().take(g.eval_n.max(1)).collect(),
        neutral_system,
        persona_system: g.persona.clone(),
        sampling: Sampling::default_sampling(g.eval_tokens, 1234),
    })
}

#[allow(clippy::too_many_arguments)]
fn write_gate(
    out: &Path,
    lm: &mut LoadedModel,
    spec: &gate::MeasureSpec,
    cfg: &HealConfig,
    comps: &[Completion],
    g: &GateArgs,
    before: &gate::Measurement,
    after: Option<(&gate::Measurement, &train::HealLog)>,
    sweep: &[sweep::ArmResult],
) -> Result<()> {
    let (source, coh_label, trait_label) = gate::fallback_labels(g.persona.is_some());
    let mut notes = Vec::new();
    if g.eval_prompts.is_none() {
        notes.push(
            "The measured prompts are the training prompts (no --eval-prompts file was given), not held out."
                .into(),
        );
    }
    let mut heal_summary = vec![format!(
        "reg {} · agg {} · reference {} · λ {} (λ_eff {:.4}) · τ {} · r {} α {} · lr {} · epochs {} · accum {}",
        cfg.reg,
        cfg.agg,
        cfg.reference,
        cfg.lambda,
        cfg.lambda_eff(),
        cfg.tau,
        cfg.r,
        cfg.alpha,
        cfg.lr,
        cfg.epochs,
        cfg.grad_accum
    )];
    // In a sweep, "after" is the arm run with the given config when there is one, else the best-ranked arm.
    let before_m = gate::Metrics::from(before);
    // Each arm's slope with its interval over the prompts, paired with the same before measurement.
    let sweep_rows: Vec<gate::SweepRow> = sweep
        .iter()
        .map(|r| gate::SweepRow {
            slope_ci: gate::slope_interval(before, &r.measurement, 1.0),
            ..r.row.clone()
        })
        .collect();
    let chosen: Option<&gate::Measurement> = match after {
        Some((m, log)) => {
            heal_summary.push(log.message.clone());
            if let Some(l) = &log.last {
                heal_summary.push(format!(
                    "last step: loss {:.4} · NLL {:.4} · D {:.4} · {:.1} tokens/s",
                    l.loss, l.nll, l.d, l.tokens_per_s
                ));
            }
            Some(m)
        }
        None => {
            let rows: Vec<gate::SweepRow> = sweep_rows.clone();
            let same = sweep.iter().find(|r| {
                r.log.config.reg == cfg.reg
                    && r.log.config.agg == cfg.agg
                    && r.log.config.lambda == cfg.lambda
                    && r.log.config.spectral_lambda == 0.0
            });
            let best = gate::rank_sweep(&rows, &before_m, 1.0)
                .first()
                .and_then(|(row, _)| sweep.iter().find(|r| r.row.label == row.label));
            let pick = same.or(best);
            if let Some(p) = pick {
                notes.push(format!("\"After\" and the samples are the sweep arm `{}`.", p.row.label));
            }
            pick.map(|p| &p.measurement)
        }
    };
    let samples = gate::sample_pairs(lm, spec, comps, before, chosen)?;
    let report = gate::GateQ1 {
        round: cfg.round,
        model: lm.info.id.clone(),
        source,
        coherence_label: coh_label,
        trait_label,
        trait_sign: 1.0,
        before: before_m,
        after: chosen.map(gate::Metrics::from),
        heal_summary,
        sweep: sweep_rows,
        samples,
        notes,
        intervals: chosen.and_then(|a| gate::q1_intervals(before, a)),
    };
    gate::write(&RunPaths::at(out).gate_q1_md(), &report)?;
    steer_heal::fsutil::atomic_write_json(&RunPaths::at(out).gate_q1_json(), &report)?;
    Ok(())
}
