//! Process-wide CPU runtime settings for candle, applied once at start-up before any worker thread exists.

/// How many `pause` spins candle's element-wise thread pool waits before parking, unless the user set
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`. candle's default (25 000, about half a millisecond) keeps a pool worker pinned
/// to a core after every element-wise op, where it competes with the gemm threads of the next matmul; on 2 cores
/// that cut heal training throughput by a quarter to a half (bench/PROFILE.md). 500 was the best of 25 000, 5 000,
/// 2 000 and 500 for training and no worse for decoding.
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 500;

/// What `configure` decided, for benchmark reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSettings {
    /// Threads candle's kernels use (`RAYON_NUM_THREADS`).
    pub threads: String,
    /// Whether the user had set `RAYON_NUM_THREADS` already.
    pub threads_set_by_user: bool,
    /// `CANDLE_BARRIER_POOL_SPIN_LIMIT` in effect.
    pub spin_limit: String,
    /// Whether the user had set the spin limit already.
    pub spin_limit_set_by_user: bool,
    /// The instruction-set level the kernels and gemm run with (`STEER_HEAL_ISA` caps it).
    pub isa: Isa,
    /// The widest level the CPU has.
    pub isa_detected: Isa,
    /// Which library does the large f32 products: the BLAS loaded (its name, kernels and path), or gemm and why.
    pub blas: String,
}

/// What `blas` reports: the loaded BLAS (MKL or OpenBLAS, its kernels and file), or why gemm does the large products.
pub fn blas_summary() -> String {
    match steer_heal_kernels::blas::get() {
        Some(b) => format!("{} ({} kernels) from {}", b.library.name(), b.core, b.path),
        None => format!(
            "gemm ({})",
            steer_heal_kernels::blas::unavailable_reason().unwrap_or_else(|| "no BLAS".into())
        ),
    }
}

pub use steer_heal_kernels::isa::{self, Isa};

/// A CPU setting refused at start-up: `STEER_HEAL_ISA` is not one of the levels (or gemm reads it differently), or
/// `STEER_HEAL_BLAS` names a library that does not load.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IsaError(pub String);

/// Pin candle's thread count and thread-pool spin limit through the environment variables it reads, leaving any
/// value the user set alone. Call it first thing in `main`, before any thread starts (the variables are read when
/// candle's pools are first built, and setting the environment is only sound while the process is single-threaded).
///
/// The thread count: candle 0.11 asks for it on every CPU matmul and, unless `RAYON_NUM_THREADS` is set, re-reads
/// `/proc/cpuinfo` each time, about a third of a SmolLM2 batch-1 decode step. Asking once gives the same answer.
///
/// The instruction set: `STEER_HEAL_ISA` (auto, avx512, avx2, baseline) caps what the kernels and gemm pick at run
/// time; an unknown value is an error here, before any kernel runs.
pub fn configure() -> Result<CpuSettings, IsaError> {
    let isa = isa::check().map_err(IsaError)?;
    let threads_set_by_user = std::env::var_os("RAYON_NUM_THREADS").is_some();
    if !threads_set_by_user {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    let spin_limit_set_by_user = std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_some();
    if !spin_limit_set_by_user {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT.to_string());
    }
    steer_heal_kernels::blas::configure_env(isa, &std::env::var("RAYON_NUM_THREADS").unwrap_or_default());
    // A library the user named must load (and loading it now, while the process is single-threaded, starts its
    // threads with the settings above).
    steer_heal_kernels::blas::check().map_err(IsaError)?;
    Ok(CpuSettings {
        threads: std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        threads_set_by_user,
        spin_limit: std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap_or_default(),
        spin_limit_set_by_user,
        isa,
        isa_detected: isa::detected(),
        blas: blas_summary(),
    })
}
