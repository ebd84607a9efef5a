//! Decode throughput: our decoder against candle-transformers' own (non-quantized) `llama::Llama` on the same f32
//! weights, greedy, at batch 1 and batch 16, measured in the same run. Writes a JSON of numbers.
//!
//! `cargo bench --bench decode -- [--model PATH.gguf] [--out bench/decode.json] [--new-tokens 32] [--reps 3]`
//!
//! The GGUF is dequantised and converted to a Hugging Face directory first (`convert_gguf`), so both models read
//! the very same f32 tensors; the reference loads that directory's safetensors. Timing covers decode steps only
//! (one token per row per step, after a shared-length prompt prefill); the best of `reps` runs is reported.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use std::path::PathBuf;
use std::time::Instant;
use steer_heal::model::{gguf::convert_gguf, load_model, Forward, Hooks, LogitsAt, Model, Path};

struct Args {
    model: PathBuf,
    out: PathBuf,
    new_tokens: usize,
    reps: usize,
    batches: Vec<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        out: PathBuf::from("bench/decode.json"),
        new_tokens: 32,
        reps: 3,
        batches: vec![1, 16],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            "--model" => a.model = PathBuf::from(value("--model")?),
            "--out" => a.out = PathBuf::from(value("--out")?),
            "--new-tokens" => {
                a.new_tokens = value("--new-tokens")?.parse().map_err(|e| format!("--new-tokens: {e}"))?
            }
            "--reps" => a.reps = value("--reps")?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--batches" => {
                a.batches = value("--batches")?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--batches: {e}")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()
}

/// Greedy decode with our model; returns (seconds spent in decode steps, tokens of row 0).
fn decode_ours(
    model: &Model,
    prompt: &[u32],
    batch: usize,
    n: usize,
) -> candle_core::Result<(f64, Vec<u32>)> {
    let dev = model.device();
    let ids: Vec<u32> = prompt.iter().copied().cycle().take(prompt.len() * batch).collect();
    let x = Tensor::from_vec(ids, (batch, prompt.len()), dev)?;
    let hooks = Hooks::none();
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::Last,
        path: Path::Inference,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    let mut cache = model.new_cache();
    let run = |x: &Tensor, cache: &mut steer_heal::model::KvCache| -> candle_core::Result<Tensor> {
        let out = model.forward(x, Some(cache), &f).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        out.logits.ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    };
    let mut next = argmax_rows(&run(&x, &mut cache)?)?;
    let mut row0 = vec![next[0]];
    let start = Instant::now();
    for _ in 1..n {
        let x = Tensor::from_vec(next.clone(), (batch, 1), dev)?;
        next = argmax_rows(&run(&x, &mut cache)?)?;
        row0.push(next[0]);
    }
    Ok((start.elapsed().as_secs_f64(), row0))
}

/// The same loop with candle-transformers' llama.
fn decode_reference(
    model: &llama::Llama,
    cfg: &llama::Config,
    prompt: &[u32],
    batch: usize,
    n: usize,
) -> candle_core::Result<(f64, Vec<u32>)> {
    let dev = Device::Cpu;
    let ids: Vec<u32> = prompt.iter().copied().cycle().take(prompt.len() * batch).collect();
    let x = Tensor::from_vec(ids, (batch, prompt.len()), &dev)?;
    let mut cache = llama::Cache::new(true, DType::F32, cfg, &dev)?;
    let mut next = argmax_rows(&model.forward(&x, 0, &mut cache)?)?;
    let mut row0 = vec![next[0]];
    let start = Instant::now();
    for pos in prompt.len()..prompt.len() + n - 1 {
        let x = Tensor::from_vec(next.clone(), (batch, 1), &dev)?;
        next = argmax_rows(&model.forward(&x, pos, &mut cache)?)?;
        row0.push(next[0]);
    }
    Ok((start.elapsed().as_secs_f64(), row0))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Sustained read bandwidth in bytes/s: every available thread sums its share of a buffer far larger than the
/// caches (the access pattern of a batch-1 decode step streaming the weights); best of five passes.
fn read_bandwidth() -> f64 {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let buf: Vec<f32> = (0..64usize << 20).map(|i| (i % 7) as f32).collect();
    let chunk = buf.len().div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // Eight independent accumulators so the sum is bound by memory, not by add latency.
                        let mut acc = [0f32; 8];
                        for block in c.chunks_exact(8) {
                            for (a, x) in acc.iter_mut().zip(block) {
                                *a += *x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((buf.len() * 4) as f64 / secs);
    }
    best
}

use steer_heal::heal::bench::peak_rss_mib;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // Other work on the machine moves these numbers a lot; record how busy it was.
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    // As the steer-heal binary does: pin candle's thread count and pool spin limit (src/model/cpu.rs).
    let cpu = steer_heal::model::cpu::configure()?;
    let dev = Device::Cpu;
    let tmp = std::env::temp_dir().join(format!("steer-heal-bench-{}", std::process::id()));
    eprintln!("converting {} to f32 safetensors in {}", args.model.display(), tmp.display());
    convert_gguf(&args.model, &tmp)?;
    // Ours as the tool loads it (the GGUF itself: its projections' block codes serve the decode steps); the
    // reference from the same weights dequantised to f32, which is what it reads.
    let ours = load_model(&args.model, Some(DType::F32), &dev)?;
    let cfg: llama::LlamaConfig = serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json"))?)?;
    let cfg = cfg.into_config(false);
    let weights = candle_core::safetensors::load(tmp.join("model.safetensors"), &dev)?;
    // Bytes a batch-1 step must stream: every weight once (the tied head is stored once).
    let weight_bytes: usize = weights.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let reference = llama::Llama::load(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg)?;
    let _ = std::fs::remove_dir_all(&tmp);

    let prompt_text = ours.chat.prompt(None, "What is the capital of France?")?;
    let prompt = ours.tokenizer.encode(&prompt_text)?;
    let n = args.new_tokens.max(2);
    let steps = (n - 1) as f64;
    let mut results = Vec::new();
    let mut rates = std::collections::HashMap::new();
    let mut agree = true;
    for &b in &args.batches {
        // Warm-up run of each (allocator, thread pool), then the best of `reps`.
        let (_, ours_tokens) = decode_ours(&ours.model, &prompt, b, n)?;
        let (_, ref_tokens) = decode_reference(&reference, &cfg, &prompt, b, n)?;
        agree &= ours_tokens == ref_tokens;
        let mut best_ours = f64::INFINITY;
        let mut best_ref = f64::INFINITY;
        for rep in 0..args.reps {
            // Alternate which goes first, so neither always runs right after the other's allocations.
            if rep % 2 == 0 {
                best_ours = best_ours.min(decode_ours(&ours.model, &prompt, b, n)?.0);
                best_ref = best_ref.min(decode_reference(&reference, &cfg, &prompt, b, n)?.0);
            } else {
                best_ref = best_ref.min(decode_reference(&reference, &cfg, &prompt, b, n)?.0);
                best_ours = best_ours.min(decode_ours(&ours.model, &prompt, b, n)?.0);
            }
        }
        for (name, secs) in [("steer-heal", best_ours), ("candle-transformers llama", best_ref)] {
            let tps = b as f64 * steps / secs;
            eprintln!("{name:>26}  batch {b:>2}: {tps:8.1} tokens/s  ({:.2} ms/step)", 1e3 * secs / steps);
            rates.insert((name, b), tps);
            results.push(serde_json::json!({
                "implementation": name, "batch": b, "tokens_per_s": tps, "ms_per_step": 1e3 * secs / steps,
            }));
        }
    }
    let bandwidth = read_bandwidth();
    let bound = bandwidth / weight_bytes as f64;
    let ours_bytes = ours.model.weight_bytes_per_token();
    let ours_bound = bandwidth / ours_bytes as f64;
    let ours_b1 = rates.get(&("steer-heal", 1)).copied();
    eprintln!(
        "read bandwidth {:.1} GB/s, weights {:.3} GB per token ⇒ batch-1 bound {bound:.1} tokens/s; ours {}",
        bandwidth / 1e9,
        weight_bytes as f64 / 1e9,
        ours_b1
            .map(|r| format!("{r:.1} tokens/s = {:.0} % of the bound", 100.0 * r / bound))
            .unwrap_or_default()
    );
    eprintln!(
        "ours reads {:.3} GB per token (block codes where the file has them) ⇒ its own bound {ours_bound:.1} \
         tokens/s{}",
        ours_bytes as f64 / 1e9,
        ours_b1.map(|r| format!(", {:.0} % of it", 100.0 * r / ours_bound)).unwrap_or_default()
    );
    let ratio = |a: (&str, usize), b: (&str, usize)| match (rates.get(&a), rates.get(&b)) {
        (Some(x), Some(y)) => serde_json::json!(x / y),
        _ => serde_json::Value::Null,
    };
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "dtype": "f32",
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_average_at_start": load_average,
        "rayon_num_threads": cpu.threads,
        "rayon_num_threads_set_by_user": cpu.threads_set_by_user,
        "barrier_pool_spin_limit": cpu.spin_limit,
        "barrier_pool_spin_limit_set_by_user": cpu.spin_limit_set_by_user,
        "isa": cpu.isa.name(),
        "isa_detected": cpu.isa_detected.name(),
        "blas": cpu.blas,
        "cpu_features": steer_heal_kernels::isa::cpu_features(),
        "profile": "bench (release, cargo bench)",
        "prompt_tokens": prompt.len(),
        "new_tokens": n,
        "timed_steps": n - 1,
        "reps": args.reps,
        "greedy_tokens_agree": agree,
        "results": results,
        "ours_batch1_vs_reference_batch1": ratio(("steer-heal", 1), ("candle-transformers llama", 1)),
        "ours_batch16_vs_reference_batch16": ratio(("steer-heal", 16), ("candle-transformers llama", 16)),
        "ours_batch16_vs_ours_batch1": ratio(("steer-heal", 16), ("steer-heal", 1)),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes_per_token": weight_bytes,
        "batch1_bandwidth_bound_tokens_per_s": bound,
        "ours_batch1_fraction_of_bound": ours_b1.map(|r| r / bound),
        "ours_weight_bytes_per_token": ours_bytes,
        "ours_batch1_bandwidth_bound_tokens_per_s": ours_bound,
        "ours_batch1_fraction_of_own_bound": ours_b1.map(|r| r / ours_bound),
        "peak_rss_mib": peak_rss_mib(),
    });
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    steer_heal::fsutil::atomic_write_json(&args.out, &report)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
