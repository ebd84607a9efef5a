//! The AVX2 + FMA form of one query row's attention over a group's keys (`attention::run_group`), tiled so
//! that no product is reduced across lanes per key and the softmax's exponentials run eight at a time.
//!
//! The portable loop computes each score as its own 64-wide dot product, then a horizontal sum, then a libm
//! `expf`; at SmolLM2's head size the sums and the scalar exponentials cost more than the multiplications
//! (attention was 17–32 % of an eval's prefill, think and answer phases, bench/PROFILE.md). Here:
//! - scores: up to three query heads × four keys in twelve accumulators, so each key row loaded feeds three
//!   heads, and one reduction tree turns four keys' partial sums into four scores;
//! - only the keys the mask leaves visible are touched (the causal half of a prefill, a row's left padding);
//! - softmax: the vectorised `exp::exp8` (Cephes' single-precision polynomial, within 2 ulp of libm's);
//! - values: up to three heads × 32 output columns in twelve accumulators, each value row loaded once per head
//!   tile.
//!
//! Used when the head size is a multiple of 8 (every supported model's); otherwise the portable loop runs.

#![allow(unsafe_op_in_unsafe_fn)]
// Register tiles are indexed by head and lane on purpose: the loops unroll into named accumulators.
#![allow(clippy::needless_range_loop)]

use crate::exp::exp8 as exp;
use std::arch::x86_64::*;

/// Query heads per score tile and per value tile.
const NQ: usize = 3;

/// Scores, softmax and weighted values of one query row's `rep` heads. `q[h]` is head `h`'s query, `k(j)` and
/// `v(j)` key and value row `j` (each `d` long), `mask` the row's additive mask over the `s` keys, `scores` a
/// scratch of `rep · s`, `out` the `rep · d` outputs.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `d` must be a multiple of 8 and every slice at least as long as described.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn row(
    q: &[&[f32]],
    k: &[f32],
    krow: usize,
    v: &[f32],
    vrow: usize,
    s: usize,
    d: usize,
    scale: f32,
    softcap: Option<f32>,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let rep = q.len();
    out[..rep * d].iter_mut().for_each(|o| *o = 0.0);
    // The visible keys: a prefill row sees none past itself, a padded row none before its first token.
    let (lo, hi) = match mask {
        Some(m) => {
            let first = m[..s].iter().position(|x| *x != f32::NEG_INFINITY);
            match first {
                // Every key hidden (the decoder's masks never do this): no attention, a zero row.
                None => return,
                Some(f) => (f, s - m[..s].iter().rev().position(|x| *x != f32::NEG_INFINITY).unwrap_or(0)),
            }
        }
        None => (0, s),
    };
    let n = hi - lo;
    for h0 in (0..rep).step_by(NQ) {
        let nq = (rep - h0).min(NQ);
        let heads = &q[h0..h0 + nq];
        let sc = &mut scores[h0 * s..(h0 + nq) * s];
        match nq {
            3 => score_tile::<3>(heads, k, krow, lo, hi, s, d, sc),
            2 => score_tile::<2>(heads, k, krow, lo, hi, s, d, sc),
            _ => score_tile::<1>(heads, k, krow, lo, hi, s, d, sc),
        }
        for hq in 0..nq {
            let row = &mut sc[hq * s + lo..hq * s + hi];
            finish_scores(row, scale, softcap, mask.map(|m| &m[lo..hi]));
            softmax(row);
        }
        let o = &mut out[h0 * d..(h0 + nq) * d];
        let p = |hq: usize| &sc[hq * s + lo..hq * s + lo + n];
        match nq {
            3 => value_tile::<3>([p(0), p(1), p(2)], v, vrow, lo, d, o),
            2 => value_tile::<2>([p(0), p(1)], v, vrow, lo, d, o),
            _ => value_tile::<1>([p(0)], v, vrow, lo, d, o),
        }
    }
}

/// Raw dot products `q[h] · k(j)` of `Q` heads against keys `lo..hi`, into `sc[h · s + j]`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn score_tile<const Q: usize>(
    q: &[&[f32]],
    k: &[f32],
    krow: usize,
    lo: usize,
    hi: usize,
    s: usize,
    d: usize,
    sc: &mut [f32],
) {
    let kp = k.as_ptr();
    let qp: [*const f32; Q] = std::array::from_fn(|h| q[h].as_ptr());
    let mut j = lo;
    while j + 4 <= hi {
        let mut acc = [[_mm256_setzero_ps(); 4]; Q];
        let rows: [*const f32; 4] = std::array::from_fn(|kk| kp.add((j + kk) * krow));
        let mut c = 0;
        while c < d {
            let kv: [__m256; 4] = std::array::from_fn(|kk| _mm256_loadu_ps(rows[kk].add(c)));
            for h in 0..Q {
                let qv = _mm256_loadu_ps(qp[h].add(c));
                for kk in 0..4 {
                    acc[h][kk] = _mm256_fmadd_ps(qv, kv[kk], acc[h][kk]);
                }
            }
            c += 8;
        }
        for h in 0..Q {
            let [a0, a1, a2, a3] = acc[h];
            let t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            let r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            _mm_storeu_ps(sc.as_mut_ptr().add(h * s + j), r);
        }
        j += 4;
    }
    while j < hi {
        let row = kp.add(j * krow);
        for h in 0..Q {
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < d {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp[h].add(c)), _mm256_loadu_ps(row.add(c)), acc);
                c += 8;
            }
            sc[h * s + j] = hsum(acc);
        }
        j += 1;
    }
}

/// Scale, soft-cap and mask raw scores in place.
#[target_feature(enable = "avx2,fma")]
unsafe fn finish_scores(row: &mut [f32], scale: f32, softcap: Option<f32>, mask: Option<&[f32]>) {
    match softcap {
        Some(c) => row.iter_mut().for_each(|x| *x = (*x * scale / c).tanh() * c),
        None => row.iter_mut().for_each(|x| *x *= scale),
    }
    if let Some(m) = mask {
        row.iter_mut().zip(m).for_each(|(x, m)| *x += *m);
    }
}

/// Softmax of one score row in place (masked entries, `-inf`, become exactly 0).
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax(row: &mut [f32]) {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m = _mm256_set1_ps(mx);
    let mut sum = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut total = hsum(sum);
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [f32::NEG_INFINITY; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m));
        _mm256_storeu_ps(buf.as_mut_ptr(), e);
        rest.copy_from_slice(&buf[..rest.len()]);
        total += buf[..rest.len()].iter().sum::<f32>();
    }
    let inv = 1.0 / total;
    row.iter_mut().for_each(|e| *e *= inv);
}

/// `out[h] = Σ_j p[h][j] · v(lo + j)` for `Q` heads, 32 (else 8) output columns at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn value_tile<const Q: usize>(
    p: [&[f32]; Q],
    v: &[f32],
    vrow: usize,
    lo: usize,
    d: usize,
    out: &mut [f32],
) {
    let n = p[0].len();
    let vp = v.as_ptr().add(lo * vrow);
    let op = out.as_mut_ptr();
    let mut c = 0;
    while c + 32 <= d {
        let mut acc = [[_mm256_setzero_ps(); 4]; Q];
        for j in 0..n {
            let row = vp.add(j * vrow + c);
            let vv: [__m256; 4] = std::array::from_fn(|u| _mm256_loadu_ps(row.add(8 * u)));
            for h in 0..Q {
                let w = _mm256_set1_ps(*p[h].get_unchecked(j));
                for u in 0..4 {
                    acc[h][u] = _mm256_fmadd_ps(w, vv[u], acc[h][u]);
                }
            }
        }
        for h in 0..Q {
            for u in 0..4 {
                _mm256_storeu_ps(op.add(h * d + c + 8 * u), acc[h][u]);
            }
        }
        c += 32;
    }
    while c < d {
        let mut acc = [_mm256_setzero_ps(); Q];
        for j in 0..n {
            let vv = _mm256_loadu_ps(vp.add(j * vrow + c));
            for h in 0..Q {
                acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(*p[h].get_unchecked(j)), vv, acc[h]);
            }
        }
        for h in 0..Q {
            _mm256_storeu_ps(op.add(h * d + c), acc[h]);
        }
        c += 8;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}
