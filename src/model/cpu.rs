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
}

/// Pin candle's thread count and thread-pool spin limit through the environment variables it reads, leaving any
/// value the user set alone. Call it first thing in `main`, before any thread starts (the variables are read when
/// candle's pools are first built, and setting the environment is only sound while the process is single-threaded).
///
/// The thread count: candle 0.11 asks for it on every CPU matmul and, unless `RAYON_NUM_THREADS` is set, re-reads
/// `/proc/cpuinfo` each time, about a third of a SmolLM2 batch-1 decode step. Asking once gives the same answer.
pub fn configure() -> CpuSettings {
    let threads_set_by_user = std::env::var_os("RAYON_NUM_THREADS").is_some();
    if !threads_set_by_user {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    let spin_limit_set_by_user = std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_some();
    if !spin_limit_set_by_user {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT.to_string());
    }
    CpuSettings {
        threads: std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        threads_set_by_user,
        spin_limit: std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap_or_default(),
        spin_limit_set_by_user,
    }
}
