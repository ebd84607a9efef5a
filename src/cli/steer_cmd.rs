//! Steering subcommands: extract a persona vector, dose it by iso-KL, generate steered completions with traces,
//! replay a completion from token t at a new dose, exchange llama.cpp control vectors, and benchmark steering.
//! Every artifact is written atomically under `--out`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use steer_heal::fsutil::{atomic_write, atomic_write_json};
use steer_heal::model::{self, LoadedModel};
use steer_heal::progress::{Bar, Silent};
use steer_heal::rounds::score_completions;
use steer_heal::score::Detectors;
use steer_heal::session::layout::StageOut;
use steer_heal::steer::bench::{bench_steer, BenchConfig};
use steer_heal::steer::dose::{calibrate, DoseConfig, SolverConfig};
use steer_heal::steer::extract::{extract_mean_diff, random_like, ExtractConfig};
use steer_heal::steer::generate::{generate_completions, replay, requests_for, GenConfig, Watchdog};
use steer_heal::steer::gguf::{export_gguf, import_gguf};
use steer_heal::steer::walkdown::{walk_down, Verdict, WalkDownConfig};
use steer_heal::steer::{Completion, Persona, Statistic, SteerVector, Steering};

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// Mean difference of residuals under the positive and negative persona.
    MeanDiff,
    /// Control: random direction with the mean-diff vector's per-layer norms.
    Random,
    /// Control: no vector; the positive persona goes in the system prompt.
    PromptOnly,
}

/// Sampling flags shared by `generate` and `replay`; unset flags keep the recorded or default values.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Most new tokens per completion [default: 512].
    #[arg(value_parser = super::args::count, long)]
    max_new_tokens: Option<usize>,
    /// Softmax temperature, 0 = greedy [default: 1.0].
    #[arg(value_parser = super::args::non_negative_f64, allow_negative_numbers = true, long)]
    temperature: Option<f64>,
    /// Nucleus mass [default: 0.95].
    #[arg(value_parser = super::args::mass, allow_negative_numbers = true, long)]
    top_p: Option<f64>,
    /// Keep the k most likely tokens, 0 = off [default: 64].
    #[arg(long)]
    top_k: Option<usize>,
    /// Window of the KL rmse trace, tokens [default: 8].
    #[arg(value_parser = super::args::count, long)]
    window: Option<usize>,
    /// Completions decoded together [default: 8].
    #[arg(value_parser = super::args::count, long)]
    batch_size: Option<usize>,
    /// Watch the windowed KL and rewind + replay at a lower dose when it crosses --tau.
    #[arg(long)]
    auto_rewind: bool,
    /// Watchdog threshold on the windowed KL rmse, nats.
    #[arg(value_parser = super::args::finite_f32, long, default_value_t = 1.5)]
    tau: f32,
    /// Tokens to rewind when the watchdog fires.
    #[arg(long, default_value_t = 8)]
    rewind: usize,
    /// Dose multiplier per automatic rewind.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.7)]
    rewind_factor: f64,
    /// Lowest automatic dose, as a fraction of c*.
    #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.2)]
    rewind_floor: f64,
}

impl SamplingArgs {
    /// Apply the flags given on top of `base`.
    fn apply(&self, mut base: GenConfig) -> GenConfig {
        if let Some(v) = self.max_new_tokens {
            base.sampling.max_new_tokens = v;
        }
        if let Some(v) = self.temperature {
            base.sampling.temperature = v;
        }
        if let Some(v) = self.top_p {
            base.sampling.top_p = v;
        }
        if let Some(v) = self.top_k {
            base.sampling.top_k = v;
        }
        if let Some(v) = self.window {
            base.window = v;
        }
        if let Some(v) = self.batch_size {
            base.batch_size = v;
        }
        if self.auto_rewind {
            base.watchdog = Some(Watchdog {
                tau: self.tau,
                rewind: self.rewind,
                factor: self.rewind_factor,
                floor: self.rewind_floor,
                max_rewinds: Watchdog::default().max_rewinds,
            });
        }
        base
    }
}

#[derive(Subcommand)]
pub enum SteerCmd {
    /// Extract a persona steering vector (or a random / prompt-only control) into OUT/vector.safetensors.
    Extract {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Persona TOML file [default: the built-in authority persona].
        #[arg(long)]
        persona: Option<PathBuf>,
        /// 0-based blocks, comma-separated [default: the 0.45–0.55 depth band].
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Use only the first N contexts [default: all].
        #[arg(value_parser = super::args::count, long)]
        n_pairs: Option<usize>,
        /// Prompts per forward pass.
        #[arg(value_parser = super::args::count, long, default_value_t = 8)]
        batch_size: usize,
        /// L2-normalise each layer's direction.
        #[arg(long)]
        normalize: bool,
        /// How to make the vector.
        #[arg(long, value_enum, default_value = "mean-diff")]
        method: MethodArg,
        /// Seed of the random control.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Random control: match the norms of this vector file instead of extracting one.
        #[arg(long)]
        like: Option<PathBuf>,
        /// Output directory (e.g. a session round folder).
        #[arg(long)]
        out: PathBuf,
        /// File name inside OUT [default: the standard vector file name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Calibrate a vector's coefficient by iso-KL; writes OUT/dose.json and stores c* in the vector file.
    Dose {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Vector file.
        #[arg(long)]
        vector: PathBuf,
        /// Persona TOML with the calibration prompts and neutral system prompt [default: built-in].
        #[arg(long)]
        persona: Option<PathBuf>,
        /// Target value of the statistic, nats.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 1.0)]
        target: f64,
        /// Statistic of per-token KL: mean, p90, p95 or max.
        #[arg(long, default_value = "p95")]
        stat: String,
        /// Tolerance on the statistic.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.05)]
        tol: f64,
        /// Greedy rollout length per prompt.
        #[arg(value_parser = super::args::count, long, default_value_t = 20)]
        tokens: usize,
        /// Use only the first N calibration prompts.
        #[arg(value_parser = super::args::count, long)]
        n_prompts: Option<usize>,
        /// Smallest coefficient tried.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.01)]
        lo: f64,
        /// Largest coefficient tried.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 16.0)]
        hi: f64,
        /// Most refinement steps.
        #[arg(long, default_value_t = 12)]
        max_iters: usize,
        /// Leave the vector file unchanged.
        #[arg(long)]
        no_update: bool,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate steered completions at alpha × c* with per-token traces into OUT/completions.jsonl.
    Generate {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Vector file (calibrated by `dose`, or give --coeff).
        #[arg(long)]
        vector: PathBuf,
        /// Persona TOML with the prompts and neutral system prompt [default: built-in].
        #[arg(long)]
        persona: Option<PathBuf>,
        /// Multiples of c*, comma-separated.
        #[arg(value_parser = super::args::finite_f64, long, value_delimiter = ',', default_value = "0.5,0.75,1.0")]
        alphas: Vec<f64>,
        /// Use the first N prompts.
        #[arg(value_parser = super::args::count, long, default_value_t = 16)]
        n_prompts: usize,
        /// Coefficient to use instead of the calibrated c*.
        #[arg(value_parser = super::args::finite_f64, long)]
        coeff: Option<f64>,
        /// Base seed; completion i gets seed + i.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Run the walk-down controller (probe, lower the dose while too few pass, top up).
        #[arg(long)]
        walk_down: bool,
        /// Walk-down: generations per probe.
        #[arg(value_parser = super::args::count, long, default_value_t = 8)]
        probe_n: usize,
        /// Walk-down: pass fraction to stop lowering the dose.
        #[arg(value_parser = super::args::finite_f64, long, default_value_t = 0.75)]
        pass_target: f64,
        /// Walk-down: generations per top-up batch.
        #[arg(long, default_value_t = 16)]
        top_up_n: usize,
        /// Walk-down: stop topping up at this many passing completions.
        #[arg(long, default_value_t = 30)]
        min_keep: usize,
        /// Walk-down: keep at most this many.
        #[arg(long, default_value_t = 64)]
        max_keep: usize,
        /// Walk-down: most top-up batches.
        #[arg(long, default_value_t = 6)]
        max_batches: usize,
        #[command(flatten)]
        filter: super::args::FilterArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Regenerate one completion from token t at a new dose, keeping the tokens before t.
    Replay {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Vector file used for the completion.
        #[arg(long)]
        vector: PathBuf,
        /// completions.jsonl holding the completion.
        #[arg(long)]
        completions: PathBuf,
        /// Completion id.
        #[arg(long)]
        id: String,
        /// First token to resample (0-based).
        #[arg(long)]
        from: usize,
        /// New coefficient.
        #[arg(value_parser = super::args::finite_f64, long, conflicts_with = "alpha")]
        dose: Option<f64>,
        /// New dose as a multiple of c*.
        #[arg(value_parser = super::args::finite_f64, long)]
        alpha: Option<f64>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Where to write the updated completions [default: rewrite --completions in place].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a vector as a llama.cpp control vector (GGUF `direction.N` for 0-based block N; block 0 cannot be).
    ExportGguf {
        /// Vector file.
        #[arg(long)]
        vector: PathBuf,
        /// Output .gguf file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a llama.cpp control vector into a steer-heal vector file.
    ImportGguf {
        /// Control-vector .gguf file.
        #[arg(long)]
        gguf: PathBuf,
        /// Model to record as provenance when the file has no steer-heal metadata.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmark decoding with steering off/on/traced and time an iso-KL calibration; writes JSON.
    BenchSteer {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Vector file [default: extract one from 16 authority pairs].
        #[arg(long)]
        vector: Option<PathBuf>,
        /// Prompts decoded together.
        #[arg(value_parser = super::args::count, long, default_value_t = 4)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Timed repetitions per arm.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Coefficient of the steered arm [default: the vector's c*, else 1].
        #[arg(value_parser = super::args::finite_f64, long)]
        coeff: Option<f64>,
        /// Skip timing the iso-KL calibration.
        #[arg(long)]
        no_dose: bool,
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn load(path: &Path) -> Result<LoadedModel> {
    model::load_model(path, super::compute().dtype, &super::device()?)
        .with_context(|| format!("loading model {}", path.display()))
}

fn load_persona(path: Option<&Path>) -> Result<Persona> {
    let p = Persona::load_or_default(path)?;
    for w in p.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(p)
}

fn load_vector(path: &Path, lm: &LoadedModel) -> Result<SteerVector> {
    let v = SteerVector::load(path)?;
    for w in v.check_model(lm, path)? {
        eprintln!("warning: {w}");
    }
    Ok(v)
}

fn read_completions(path: &Path) -> Result<Vec<Completion>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {} is not a completion", path.display(), i + 1))
        })
        .collect()
}

fn write_completions(path: &Path, cs: &[Completion]) -> Result<()> {
    atomic_write(path, &steer_heal::session::to_jsonl(cs)?)?;
    Ok(())
}

/// What `generate` used, written beside the completions so `replay` can resample the same way.
#[derive(serde::Serialize, serde::Deserialize)]
struct GenerationRecord {
    vector: PathBuf,
    c_star: f64,
    alphas: Vec<f64>,
    system: String,
    config: GenConfig,
}

/// Run a steering subcommand.
pub fn run(cmd: SteerCmd) -> Result<()> {
    match cmd {
        SteerCmd::Extract {
            model,
            persona,
            layers,
            n_pairs,
            batch_size,
            normalize,
            method,
            seed,
            like,
            out,
            name,
        } => {
            let lm = load(&model)?;
            let persona = load_persona(persona.as_deref())?;
            let mut cfg = ExtractConfig::for_model(&lm);
            if !layers.is_empty() {
                cfg.layers = layers;
            }
            cfg.n_pairs = n_pairs;
            cfg.batch_size = batch_size;
            cfg.normalize = normalize;
            let v = match (method, like) {
                (MethodArg::PromptOnly, _) => SteerVector::prompt_only(&lm, &persona),
                (MethodArg::Random, Some(like)) => random_like(&load_vector(&like, &lm)?, seed)?,
                (m, _) => {
                    let mut bar = Bar::new("extract");
                    let v = extract_mean_diff(&lm, &persona, &cfg, &mut bar)?;
                    bar.finish();
                    if matches!(m, MethodArg::Random) {
                        random_like(&v, seed)?
                    } else {
                        v
                    }
                }
            };
            let path = match &name {
                Some(n) => out.join(n),
                None => StageOut::new(&out).vector(),
            };
            v.save(&path)?;
            println!(
                "wrote {} ({:?}, layers {:?}, norms {:?})",
                path.display(),
                v.meta.method,
                v.meta.layers,
                v.meta.norms
            );
        }
        SteerCmd::Dose {
            model,
            vector,
            persona,
            target,
            stat,
            tol,
            tokens,
            n_prompts,
            lo,
            hi,
            max_iters,
            no_update,
            out,
        } => {
            let lm = load(&model)?;
            let persona = load_persona(persona.as_deref())?;
            let mut v = load_vector(&vector, &lm)?;
            let steering = Steering::new(&v, &lm.model)?;
            let mut prompts = persona.spec.calibration_prompts.clone();
            if let Some(n) = n_prompts {
                prompts.truncate(n.max(1));
            }
            let cfg = DoseConfig {
                solver: SolverConfig { target, tol, lo, hi, max_iters },
                statistic: Statistic::parse(&stat)?,
                tokens,
                prompts,
                system: persona.spec.neutral_system.clone(),
            };
            let mut bar = Bar::new("dose");
            let mut report = calibrate(&lm, &steering, &cfg, &mut bar)?;
            bar.finish();
            report.vector = Some(vector.display().to_string());
            let path = StageOut::new(&out).dose();
            atomic_write_json(&path, &report)?;
            if let Some(w) = &report.warning {
                eprintln!("warning: {w}");
            }
            if !no_update {
                v.meta.calibration = Some(report.calibration());
                v.save(&vector)?;
            }
            println!(
                "c* = {:.4} ({} = {:.4}, target {}, {} evaluations, {:.1}s); wrote {}",
                report.c_star,
                cfg.statistic,
                report.achieved,
                target,
                report.history.len(),
                report.wall_s,
                path.display()
            );
        }
        SteerCmd::Generate {
            model,
            vector,
            persona,
            alphas,
            n_prompts,
            coeff,
            seed,
            sampling,
            walk_down: walk,
            probe_n,
            pass_target,
            top_up_n,
            min_keep,
            max_keep,
            max_batches,
            filter,
            out,
        } => {
            let lm = load(&model)?;
            let persona = load_persona(persona.as_deref())?;
            let v = load_vector(&vector, &lm)?;
            let steering = Steering::new(&v, &lm.model)?;
            let c_star = match coeff {
                Some(c) => c,
                None if v.is_prompt_only() => 1.0,
                None => v.calibrated()?,
            };
            let alphas = if v.is_prompt_only() { vec![1.0] } else { alphas };
            if alphas.is_empty() {
                bail!("--alphas needs at least one value");
            }
            let mut gen = sampling.apply(GenConfig::new(512));
            gen.sampling.seed = seed;
            let system = persona.spec.neutral_system.clone();
            let prompts: Vec<String> = persona.spec.prompts.iter().take(n_prompts.max(1)).cloned().collect();
            let mut bar = Bar::new("generate");
            let record = GenerationRecord {
                vector: vector.clone(),
                c_star,
                alphas: alphas.clone(),
                system: system.clone(),
                config: gen.clone(),
            };
            if walk {
                let wd = WalkDownConfig {
                    target_pass: pass_target,
                    probe_n,
                    batch_n: top_up_n,
                    min_keep,
                    max_keep,
                    max_batches,
                    ..WalkDownConfig::default()
                };
                // Gate Q0's filter, as a session would apply it, so `--walk-down` keeps what a round would.
                let det = Detectors::defaults()?;
                let th = filter.thresholds();
                let mut scorer = |batch: &[Completion]| -> steer_heal::Result<Vec<Verdict>> {
                    let rows =
                        score_completions(&lm, Some(&v), &det, &th, batch.to_vec(), &Silent::default())?;
                    Ok(rows.iter().map(|r| r.score.walk_verdict()).collect())
                };
                let r = walk_down(
                    &lm,
                    &steering,
                    &system,
                    c_star,
                    &prompts,
                    &alphas,
                    seed,
                    &gen,
                    &wd,
                    &mut scorer,
                    &mut bar,
                )?;
                bar.finish();
                let o = StageOut::new(&out);
                write_completions(&o.completions(), &r.kept)?;
                write_completions(&o.rejected(), &r.rejected)?;
                write_completions(&o.surplus(), &r.surplus)?;
                atomic_write_json(&o.walkdown(), &r.report)?;
                atomic_write_json(&o.generation(), &record)?;
                println!(
                    "kept {} of {} (kappa {:.3}); wrote {}",
                    r.report.kept,
                    r.report.generated,
                    r.report.kappa,
                    o.completions().display()
                );
            } else {
                let reqs = requests_for(&prompts, &alphas, seed);
                let cs = generate_completions(&lm, &steering, &system, c_star, &reqs, &gen, &mut bar)?;
                bar.finish();
                let o = StageOut::new(&out);
                write_completions(&o.completions(), &cs)?;
                atomic_write_json(&o.generation(), &record)?;
                println!("wrote {} completions to {}", cs.len(), o.completions().display());
            }
        }
        SteerCmd::Replay { model, vector, completions, id, from, dose, alpha, sampling, out } => {
            let lm = load(&model)?;
            let v = load_vector(&vector, &lm)?;
            let steering = Steering::new(&v, &lm.model)?;
            let record_path =
                StageOut::new(completions.parent().unwrap_or(std::path::Path::new("."))).generation();
            let record: Option<GenerationRecord> = if record_path.exists() {
                let text = std::fs::read_to_string(&record_path)?;
                Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a generation record", record_path.display()))?,
                )
            } else {
                None
            };
            let c_star = match (&record, v.is_prompt_only()) {
                (_, true) => 1.0,
                (Some(r), _) => r.c_star,
                (None, _) => v.calibrated()?,
            };
            let gen = sampling.apply(record.map(|r| r.config).unwrap_or_else(|| GenConfig::new(512)));
            let new_dose = match (dose, alpha) {
                (Some(d), _) => d,
                (None, Some(a)) => a * c_star,
                (None, None) => bail!("give the new dose with --dose or --alpha"),
            };
            let mut all = read_completions(&completions)?;
            let idx = all
                .iter()
                .position(|c| c.id == id)
                .with_context(|| format!("{}: no completion with id `{id}`", completions.display()))?;
            let mut bar = Bar::new("replay");
            let c = replay(&lm, &steering, c_star, &all[idx], from, new_dose, &gen, &mut bar)?;
            bar.finish();
            println!("{}", c.text);
            all[idx] = c;
            let path = out.unwrap_or(completions);
            write_completions(&path, &all)?;
            eprintln!("wrote {}", path.display());
        }
        SteerCmd::ExportGguf { vector, out } => {
            let v = SteerVector::load(&vector)?;
            export_gguf(&v, &out)?;
            let scale = v.meta.calibration.as_ref().map(|c| c.coefficient).unwrap_or(1.0);
            println!(
                "wrote {} (blocks {:?} as direction.{{block}}); llama.cpp: --control-vector-scaled {} {scale:.4}",
                out.display(),
                v.meta.layers,
                out.display()
            );
        }
        SteerCmd::ImportGguf { gguf, model, out } => {
            let lm = model.as_deref().map(load).transpose()?;
            let info = lm.as_ref().map(|m| (&m.info, m.model.cfg.num_hidden_layers));
            let v = import_gguf(&gguf, info)?;
            if let Some(lm) = &lm {
                for w in v.check_model(lm, &gguf)? {
                    eprintln!("warning: {w}");
                }
            }
            v.save(&out)?;
            println!("wrote {} (layers {:?}, {:?})", out.display(), v.meta.layers, v.meta.method);
        }
        SteerCmd::BenchSteer { model, vector, batch, new_tokens, reps, coeff, no_dose, out } => {
            let lm = load(&model)?;
            let persona = Persona::default_authority()?;
            let v = match vector {
                Some(p) => load_vector(&p, &lm)?,
                None => {
                    let cfg = ExtractConfig { n_pairs: Some(16), ..ExtractConfig::for_model(&lm) };
                    extract_mean_diff(&lm, &persona, &cfg, &mut Bar::new("extract"))?
                }
            };
            if v.is_prompt_only() {
                bail!("bench-steer measures the steering hook; give a vector with directions");
            }
            let steering = Steering::new(&v, &lm.model)?;
            let coeff = coeff.or(v.meta.calibration.as_ref().map(|c| c.coefficient)).unwrap_or(1.0);
            let cfg = BenchConfig {
                batch,
                new_tokens,
                reps,
                coeff,
                prompts: persona.spec.prompts.clone(),
                system: persona.spec.neutral_system.clone(),
                dose: (!no_dose).then(|| DoseConfig {
                    solver: SolverConfig::default(),
                    statistic: Statistic::P95,
                    tokens: 20,
                    prompts: persona.spec.calibration_prompts.clone(),
                    system: persona.spec.neutral_system.clone(),
                }),
            };
            let mut bar = Bar::new("bench");
            let r = bench_steer(&lm, &steering, v.meta.layers.clone(), &cfg, &mut bar)?;
            bar.finish();
            atomic_write_json(&out, &r)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}
