//! `y = x · Wᵀ` for a few rows of `x` (a decode step: one row per sequence) against a row-major weight `[n, k]`.
//!
//! A decode step's products are a handful of rows against a weight read once: at batch 1 the time is the weight's
//! streaming from memory, at batch 16–32 it is FMAs on a weight block that is already in L1. gemm, built for large
//! products, packs the weight into panels on every call (another pass over 0.5 GB per SmolLM2 step) and splits the
//! work by rows that are not there; bench/PROFILE.md has the measurements. Here each thread takes a contiguous
//! range of weight rows, reads each row block once from memory and multiplies it with every row of `x` while it is
//! in L1: dot products of contiguous rows, so the weight needs no transpose and no packing.
//!
//! The AVX-512 and AVX2 + FMA kernels are chosen at run time (`isa::active`); the portable one is the same loop
//! nest in plain Rust. Each sums a dot product over interleaved partial sums (16 on AVX-512, 8 elsewhere, with
//! fused multiply-adds where the ISA has them), so they agree to rounding with each other and with gemm (tested
//! below against an f64 product).

use crate::blocks::BlockRows;
use crate::isa::{self, Isa};

/// Tasks per thread a product is split into: enough for the pool to balance uneven progress, few enough that
/// each task's weight rows amortise its fork.
const TASKS_PER_THREAD: usize = 4;
/// A task's weight rows are a multiple of this: whole tiles of 3 and of 4 weight rows (the AVX2 kernel's two
/// tiles, the AVX-512 kernel's one).
const TASK_ROWS_MULTIPLE: usize = 12;
/// Fewest weight rows a task takes.
const MIN_ROWS_PER_TASK: usize = 24;

/// Weight rows multiplied together in the kernel's register tile.
const NR: usize = 4;
/// Rows of `x` in the register tile (`NR × MR` accumulators of 8 lanes: 12 of the 16 AVX2 registers).
const MR: usize = 3;

/// The most rows of `x` for which this beats gemm at the active ISA (bench/PROFILE.md, `steer-heal
/// bench-kernels`, the decode bench). On AVX-512 the 16-lane kernel (`avx512`) beats gemm's AVX-512 kernels on
/// every SmolLM2 projection up to 32 rows (1.0–3.9×) and on the head up to 16; at 32 rows the head is slower
/// (13 vs 10 ms) but the step as a whole is still faster (decode at batch 32: 337–344 vs 255–266 tok/s).
pub fn max_rows() -> usize {
    match isa::active() {
        Isa::Avx512 => MAX_ROWS_AVX512,
        Isa::Avx2 => MAX_ROWS_AVX2,
        Isa::Baseline => MAX_ROWS_BASELINE,
    }
}

/// Crossover with gemm's AVX-512 kernels on SmolLM2's shapes.
const MAX_ROWS_AVX512: usize = 32;
/// Crossover with gemm's AVX2 kernels on SmolLM2's shapes (at 16 rows with the wide tile, decode 1.2× gemm).
const MAX_ROWS_AVX2: usize = 16;
/// Crossover with gemm's portable kernels.
const MAX_ROWS_BASELINE: usize = 32;

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major and contiguous, written into `y` (length `m · n`).
pub fn matmul_wt(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n, "skinny matmul: shapes do not match");
    if m == 0 || n == 0 {
        return;
    }
    let out = SyncPtr(y.as_mut_ptr());
    let isa = isa::active();
    let per_task = rows_per_task(n);
    let tasks = n.div_ceil(per_task);
    crate::on_threads(tasks, |t| {
        let j0 = t * per_task;
        let j1 = (j0 + per_task).min(n);
        let out = &out;
        // SAFETY: tasks write disjoint column ranges [j0, j1) of y, which outlives the parallel loop; weight rows
        // [j0, j1) start at row j0.
        unsafe { rows(isa, x, w.as_ptr().add(j0 * k), out.0, m, k, n, j0, j1) };
    });
}

/// Weight rows per task of a product with `n` weight rows: even shares of whole register tiles (a fixed task size
/// left a 192-row k/v projection as three tasks on two threads, a third of the product on one core alone).
fn rows_per_task(n: usize) -> usize {
    n.div_ceil(crate::threads() * TASKS_PER_THREAD)
        .next_multiple_of(TASK_ROWS_MULTIPLE)
        .max(MIN_ROWS_PER_TASK)
}

/// Weight rows a task dequantises at a time from block codes: whole tiles of every kernel, a block that stays in
/// L1 (SmolLM2's 576-wide rows: 27 KB) or L2 (1536-wide: 72 KB) while every row of `x` passes over it.
const CODED_ROWS_AT_ONCE: usize = TASK_ROWS_MULTIPLE;

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` with the weight in block codes (`blocks::BlockRows`, `n = w.rows()`,
/// `k = w.cols()`): each task dequantises a few weight rows at a time into a block of f32 and runs the f32 kernel
/// on it, so the weight is read from memory at its coded size (a fifth of f32 for Q4_1) and the result is the f32
/// kernel's on the dequantised weight, bit for bit.
pub fn matmul_wt_codes(x: &[f32], w: &BlockRows, y: &mut [f32], m: usize) {
    let (n, k) = (w.rows(), w.cols());
    assert!(x.len() == m * k && y.len() == m * n, "skinny matmul: shapes do not match");
    if m == 0 || n == 0 {
        return;
    }
    let out = SyncPtr(y.as_mut_ptr());
    let isa = isa::active();
    let per_task = rows_per_task(n);
    let tasks = n.div_ceil(per_task);
    crate::on_threads(tasks, |t| {
        let out = &out;
        let mut block = vec![0f32; CODED_ROWS_AT_ONCE * k];
        let end = ((t + 1) * per_task).min(n);
        let mut j0 = t * per_task;
        while j0 < end {
            let j1 = (j0 + CODED_ROWS_AT_ONCE).min(end);
            for (j, row) in (j0..j1).zip(block.chunks_exact_mut(k)) {
                w.dequantize_row_with(isa, j, row);
            }
            // SAFETY: the block holds rows [j0, j1) of the weight; tasks write disjoint column ranges of y, which
            // outlives the parallel loop.
            unsafe { rows(isa, x, block.as_ptr(), out.0, m, k, n, j0, j1) };
            j0 = j1;
        }
    });
}

/// A raw output pointer shared by tasks that write disjoint elements.
struct SyncPtr(*mut f32);
// SAFETY: only used for writes to disjoint elements from the tasks of one `matmul_wt` call.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// Columns `[j0, j1)` of `y` for every row of `x`, from the weight rows `[j0, j1)` that `w` points to (row `j0`
/// first, rows of `k`: the weight itself, or a task's dequantised block of it).
///
/// # Safety
/// `w` points to `(j1 − j0) · k` floats, `y` to `m · n` floats, and no other thread writes columns `[j0, j1)`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows(
    isa: Isa,
    x: &[f32],
    w: *const f32,
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        // SAFETY: `isa::active` only reports AVX-512 when the CPU has AVX-512 F (and AVX2 and FMA).
        return unsafe { avx512::rows(x, w, y, m, k, n, j0, j1) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa::active` only reports AVX2 when the CPU has AVX2 and FMA.
        return unsafe { avx2::rows(x, w, y, m, k, n, j0, j1) };
    }
    let _ = isa;
    unsafe { portable_rows(x, w, y, m, k, n, j0, j1) }
}

/// The portable loop nest (the compiler vectorises the eight partial sums with what the baseline has).
#[allow(clippy::too_many_arguments)]
unsafe fn portable_rows(
    x: &[f32],
    w: *const f32,
    y: *mut f32,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
) {
    for j in j0..j1 {
        // SAFETY: row j of the block is inside the caller's `(j1 − j0) · k` floats.
        let wr = unsafe { std::slice::from_raw_parts(w.add((j - j0) * k), k) };
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; 8];
            let mut wc = wr.chunks_exact(8);
            let mut xc = xr.chunks_exact(8);
            for (a, b) in (&mut wc).zip(&mut xc) {
                for l in 0..8 {
                    // A separate multiply and add: the baseline has no FMA (`mul_add` would be a libm call).
                    acc[l] += a[l] * b[l];
                }
            }
            let mut s = hsum8(&acc);
            for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
                s += a * b;
            }
            // SAFETY: i < m, j < n; the caller owns column j.
            unsafe { *y.add(i * n + j) = s };
        }
    }
}

/// The eight partial sums added in the order the AVX2 kernel adds its lanes.
fn hsum8(a: &[f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let d = [q[0] + q[2], q[1] + q[3]];
    d[0] + d[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Above this many rows of `x`, the tile is 3 weight rows × 4 input rows (12 accumulators, 3 weight vectors
    /// and one input vector fill the 16 registers exactly; fewer passes over `x` per weight block); up to it,
    /// `NR × MR` (4 × 3), which streams more weight rows per pass for the bandwidth-bound small batches
    /// (decode bench, capped to AVX2 on an AVX-512 Xeon: b16 201–208 → 242–247 tok/s with the wide tile, b1 and
    /// b8 slower with it).
    const WIDE_ABOVE: usize = 8;
    /// Weight rows of the wide tile.
    const NR_WIDE: usize = 3;
    /// Rows of `x` in the wide tile.
    const MR_WIDE: usize = 4;

    /// Columns `[j0, j1)` of `y`: blocks of weight rows, each multiplied with all of `x` in tiles of a few rows
    /// while it sits in L1.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as `super::rows`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        if m > WIDE_ABOVE {
            while j + NR_WIDE <= j1 {
                tile_rows::<NR_WIDE, MR_WIDE>(x, w.add((j - j0) * k), y, m, k, n, j);
                j += NR_WIDE;
            }
        } else {
            while j + NR <= j1 {
                tile_rows::<NR, MR>(x, w.add((j - j0) * k), y, m, k, n, j);
                j += NR;
            }
        }
        while j < j1 {
            tile_rows::<1, MR>(x, w.add((j - j0) * k), y, m, k, n, j);
            j += 1;
        }
    }

    /// Weight rows `[j, j + R)` (`w` points to row `j`) against every row of `x`, `S` rows of `x` at a time
    /// (`S` ≤ 4).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_rows<const R: usize, const S: usize>(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        m: usize,
        k: usize,
        n: usize,
        j: usize,
    ) {
        let mut i = 0;
        while i + S <= m {
            unsafe { tile::<S, R>(x, w, y, k, n, i, j) };
            i += S;
        }
        match m - i {
            3 => unsafe { tile::<3, R>(x, w, y, k, n, i, j) },
            2 => unsafe { tile::<2, R>(x, w, y, k, n, i, j) },
            1 => unsafe { tile::<1, R>(x, w, y, k, n, i, j) },
            _ => {}
        }
    }

    /// The `M × R` register tile: rows `[i, i + M)` of `x` against weight rows `[j, j + R)`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize, const R: usize>(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        k: usize,
        n: usize,
        i: usize,
        j: usize,
    ) {
        let xp = x.as_ptr();
        let wp = w;
        let mut acc = [[_mm256_setzero_ps(); R]; M];
        let k8 = k / 8 * 8;
        let mut p = 0;
        while p < k8 {
            let mut wv = [_mm256_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                // SAFETY: r < R rows of the tile's weight block and p + 8 <= k.
                *v = unsafe { _mm256_loadu_ps(wp.add(r * k + p)) };
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + ii) < m and p + 8 <= k, inside x.
                let xv = unsafe { _mm256_loadu_ps(xp.add((i + ii) * k + p)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(*v, xv, *a);
                }
            }
            p += 8;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                let mut s = hsum(*a);
                for q in k8..k {
                    // SAFETY: inside the rows of x and w.
                    s = unsafe { (*wp.add(r * k + q)).mul_add(*xp.add((i + ii) * k + q), s) };
                }
                // SAFETY: (i + ii) < m, (j + r) < n; the caller owns these columns.
                unsafe { *y.add((i + ii) * n + j + r) = s };
            }
        }
    }

    /// Lanes 0..8 summed as `hsum8` does: (l, l + 4) pairs, then (0, 2) and (1, 3), then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::NR;
    use std::arch::x86_64::*;

    /// Rows of `x` in the AVX-512 register tile: `NR × MR512` accumulators of 16 lanes, 24 of the 32 registers,
    /// beside the four weight vectors and one input vector of each step.
    const MR512: usize = 6;

    /// As `avx2::rows`, 16 lanes wide and six input rows per tile.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; as `super::rows`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        while j + NR <= j1 {
            unsafe { tile_rows::<NR>(x, w.add((j - j0) * k), y, m, k, n, j) };
            j += NR;
        }
        while j < j1 {
            unsafe { tile_rows::<1>(x, w.add((j - j0) * k), y, m, k, n, j) };
            j += 1;
        }
    }

    /// Weight rows `[j, j + R)` (`w` points to row `j`) against every row of `x`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile_rows<const R: usize>(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        m: usize,
        k: usize,
        n: usize,
        j: usize,
    ) {
        let mut i = 0;
        while i + MR512 <= m {
            unsafe { tile::<MR512, R>(x, w, y, k, n, i, j) };
            i += MR512;
        }
        // SAFETY (each arm): rows [i, m) of x exist.
        match m - i {
            5 => unsafe { tile::<5, R>(x, w, y, k, n, i, j) },
            4 => unsafe { tile::<4, R>(x, w, y, k, n, i, j) },
            3 => unsafe { tile::<3, R>(x, w, y, k, n, i, j) },
            2 => unsafe { tile::<2, R>(x, w, y, k, n, i, j) },
            1 => unsafe { tile::<1, R>(x, w, y, k, n, i, j) },
            _ => {}
        }
    }

    /// The `M × R` register tile: rows `[i, i + M)` of `x` against weight rows `[j, j + R)`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<const M: usize, const R: usize>(
        x: &[f32],
        w: *const f32,
        y: *mut f32,
        k: usize,
        n: usize,
        i: usize,
        j: usize,
    ) {
        let xp = x.as_ptr();
        let wp = w;
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let k16 = k / 16 * 16;
        let mut p = 0;
        while p < k16 {
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                // SAFETY: r < R rows of the tile's weight block and p + 16 <= k.
                *v = unsafe { _mm512_loadu_ps(wp.add(r * k + p)) };
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + ii) < m and p + 16 <= k, inside x.
                let xv = unsafe { _mm512_loadu_ps(xp.add((i + ii) * k + p)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(*v, xv, *a);
                }
            }
            p += 16;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*a);
                for q in k16..k {
                    // SAFETY: inside the rows of x and w.
                    s = unsafe { (*wp.add(r * k + q)).mul_add(*xp.add((i + ii) * k + q), s) };
                }
                // SAFETY: (i + ii) < m, (j + r) < n; the caller owns these columns.
                unsafe { *y.add((i + ii) * n + j + r) = s };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator (no rand dependency in this crate).
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn matches_an_f64_product_on_every_isa_path_and_shape() {
        // Shapes with every remainder: rows not a multiple of 3, weight rows not of 4 or 64, k not of 8.
        for &(m, k, n) in &[
            (1, 576, 1536),
            (16, 576, 192),
            (5, 37, 131),
            (32, 64, 7),
            (2, 8, 1),
            (3, 1536, 65),
            (7, 40, 9),
            (11, 584, 130),
        ] {
            let x = data(m * k, 1 + m as u32);
            let w = data(n * k, 7 + n as u32);
            let want = reference(&x, &w, m, k, n);
            let mut isas = vec![Isa::Baseline];
            if isa::detected() >= Isa::Avx2 {
                isas.push(Isa::Avx2);
            }
            if isa::detected() >= Isa::Avx512 {
                isas.push(Isa::Avx512);
            }
            let mut outs = Vec::new();
            for &isa in &isas {
                let mut y = vec![f32::NAN; m * n];
                let ptr = SyncPtr(y.as_mut_ptr());
                // The whole range in one call, as one task would see it.
                unsafe { rows(isa, &x, w.as_ptr(), ptr.0, m, k, n, 0, n) };
                let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-4 * (k as f64).sqrt(), "{isa} m {m} k {k} n {n}: off by {worst}");
                outs.push(y);
            }
            // And the threaded entry point gives the active path's values.
            let mut y = vec![0f32; m * n];
            matmul_wt(&x, &w, &mut y, m, k, n);
            let active = isas.iter().position(|&i| i == isa::active()).expect("the active path was run");
            assert_eq!(y, outs[active], "the threaded entry point at {}", isa::active());
        }
    }

    #[test]
    fn a_product_from_block_codes_is_the_f32_product_on_the_dequantised_weight() {
        use crate::blocks::{self, Coding};
        // Rows below, at and past a task's and a dequantised block's size; row counts of every tile remainder.
        for coding in [Coding::Q4_1, Coding::Q8_0] {
            for &(m, k, n) in &[(1, 576, 1536), (16, 64, 200), (5, 96, 13), (32, 32, 49), (3, 1536, 37)] {
                let (w, _) = blocks::tests::quantised(coding, n, k, n as u64);
                let dense = w.dequantize();
                let x = data(m * k, 3 + m as u32);
                let mut want = vec![0f32; m * n];
                matmul_wt(&x, &dense, &mut want, m, k, n);
                let mut got = vec![f32::NAN; m * n];
                matmul_wt_codes(&x, &w, &mut got, m);
                assert_eq!(got, want, "{coding:?} m {m} k {k} n {n} at {}", isa::active());
            }
        }
    }
}
