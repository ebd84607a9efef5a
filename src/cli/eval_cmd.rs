//! Eval subcommands: score a model on tinymfv (headless, with a progress bar) and draw the progress map and
//! gate-Q2 report from a rounds file.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use steer_heal::eval::protocol::SuffixRendering;
use steer_heal::eval::{
    self, gate_q2, Condition, Direction, EvalConfig, EvalModel, GateQ2Spec, TraitAxis, Variant,
};
use steer_heal::model::{self, Hooks};
use steer_heal::progress::Bar;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Score a model on the tinymfv moral-foundations vignettes; writes OUT/eval.json.
    Eval {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Only the first N vignettes (default: all 132). Reports always state n.
        #[arg(value_parser = super::args::count, long)]
        n: Option<usize>,
        /// Forced think length per frame, in tokens.
        #[arg(long, default_value_t = 128)]
        think: usize,
        /// Vignette rewrite: classic, scifi or ai-actor.
        #[arg(long, default_value = "classic")]
        variant: String,
        /// Comma-separated conditions: other_violate, self_violate.
        #[arg(long, default_value = "other_violate")]
        conditions: String,
        /// Most sequences (item × frame) per batch (split into even batches).
        #[arg(value_parser = super::args::count, long, default_value_t = eval::DEFAULT_BATCH)]
        batch_size: usize,
        /// Token budget of each json_is_valid probe generation.
        #[arg(long, default_value_t = 128)]
        json_probe_tokens: usize,
        /// Skip the json_is_valid probe.
        #[arg(long)]
        no_json_probe: bool,
        /// System prompt for every eval conversation (e.g. a persona for a prompt-only control).
        #[arg(long)]
        system: Option<String>,
        /// How the forced-answer suffix is rendered: one-conversation (ours) or upstream (upstream tinymfv's:
        /// "Just answer" as a separate conversation; lower p_ans_any on SmolLM2), to compare with upstream.
        #[arg(long, default_value = "one-conversation")]
        suffix: SuffixRendering,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw the progress map (PNG + SVG) and write gate-q2.md from a rounds file.
    Plot {
        /// JSON list of round points (or {"rounds": [...]}).
        #[arg(long)]
        rounds: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        floor: super::args::FloorArgs,
        /// Trait axis the gate judges: authority or care.
        #[arg(long, default_value = "authority")]
        axis: String,
        /// Intended direction of the trait: decrease or increase.
        #[arg(long, default_value = "decrease")]
        direction: String,
        /// Kept rounds in a row needed to pass.
        #[arg(long, default_value_t = 3)]
        min_rounds: usize,
    },
}

fn parse_conditions(s: &str) -> Result<Vec<Condition>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match Condition::parse(part) {
            Some(c) => out.push(c),
            None => bail!("unknown condition `{part}` (expected other_violate or self_violate)"),
        }
    }
    if out.is_empty() {
        bail!("--conditions needs at least one of other_violate, self_violate");
    }
    Ok(out)
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "n/a".into()
    }
}

/// Run an eval subcommand.
pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Eval {
            model: path,
            n,
            think,
            variant,
            conditions,
            batch_size,
            json_probe_tokens,
            no_json_probe,
            system,
            suffix,
            out,
        } => {
            let variant = Variant::parse(&variant).with_context(|| {
                format!("unknown variant `{variant}` (expected classic, scifi or ai-actor)")
            })?;
            let cfg = EvalConfig {
                variant,
                conditions: parse_conditions(&conditions)?,
                n_vignettes: n,
                think_tokens: think,
                batch_size,
                json_probe: !no_json_probe,
                json_probe_max_tokens: json_probe_tokens,
                system_prompt: system,
                suffix,
            };
            cfg.validate()?;
            let dev = super::device()?;
            let lm = model::load_model(&path, super::compute().dtype, &dev)
                .with_context(|| format!("loading the model {}", path.display()))?;
            let hooks = Hooks::none();
            let target = EvalModel::from_loaded(&lm, &hooks);
            let mut bar = Bar::new("eval");
            let report = eval::run_eval(&target, &cfg, &mut bar)?;
            bar.finish();
            let file = report.save(&out)?;
            let m = &report.metrics;
            println!(
                "tinymfv {} {} n={} items ({} scored), think={}: authority={} care={} p_ans_any={} ppx_json={} \
                 top1={} json_is_valid={}",
                cfg.variant.name(),
                cfg.conditions.iter().map(|c| c.name()).collect::<Vec<_>>().join("+"),
                m.n_rows,
                m.n_scored,
                cfg.think_tokens,
                fmt(m.authority),
                fmt(m.care),
                fmt(m.p_ans_any),
                fmt(m.ppx_json),
                fmt(m.top1_acc),
                m.json_is_valid.map(fmt).unwrap_or_else(|| "not run".into()),
            );
            println!(
                "cases: {} natural, {} interrupted, {} answered elsewhere; {:.1} s (prefill {:.1}, think {:.1}, \
                 answer {:.1}, json probe {:.1}); wrote {}",
                m.cases.natural,
                m.cases.interrupted,
                m.cases.answered_elsewhere,
                report.timings.total_s,
                report.timings.prefill_s,
                report.timings.think_s,
                report.timings.answer_s,
                report.timings.json_probe_s,
                file.display()
            );
        }
        EvalCmd::Plot { rounds, out, floor, axis, direction, min_rounds } => {
            let floor = floor.floor();
            let axis = match axis.as_str() {
                "authority" => TraitAxis::Authority,
                "care" => TraitAxis::Care,
                other => bail!("unknown axis `{other}` (expected authority or care)"),
            };
            let direction = match direction.as_str() {
                "decrease" => Direction::Decrease,
                "increase" => Direction::Increase,
                other => bail!("unknown direction `{other}` (expected decrease or increase)"),
            };
            let points = eval::load_rounds(&rounds)?;
            let (png, svg) =
                eval::write_progress_map(&points, floor.threshold(gate_q2::base_p_ans_any(&points)), &out)?;
            let spec = GateQ2Spec { axis, direction, floor, min_rounds };
            let md = eval::write_gate_q2(&out, &points, &spec)?;
            println!("{}", gate_q2::verdict(&points, &spec).line);
            println!("wrote {}, {}, {}", png.display(), svg.display(), md.display());
        }
    }
    Ok(())
}
