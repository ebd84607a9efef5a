//! `e^x` over a slice, vectorised where the CPU allows (`isa::active`). The loss head's, log-softmax's and the
//! training softmax's exponentials were libm's scalar `expf`, one call per vocabulary entry per row and pass
//! (~4 % of a heal step's samples on an AVX2 EPYC). The eight-lane `exp8` (Cephes' polynomial) lives here too,
//! the one owner of the vectorised exponential (the inference attention's softmax uses it as well): within 2 ulp
//! of libm for x ≤ 0 — all these callers pass: shifts by a row's max or log-sum-exp, and log-probabilities.
//! −inf gives exactly 0.

use crate::isa::{self, Isa};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Replace every element of `xs` by its exponential.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa::active() >= Isa::Avx2 {
        // SAFETY: `isa::active` reports AVX2 only when the CPU has AVX2 and FMA.
        unsafe { avx2(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds exactly eight f32s.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        // The tail goes through the same lanes, so a value's exponential does not depend on where it sits.
        let mut buf = [0f32; 8];
        buf[..rest.len()].copy_from_slice(rest);
        // SAFETY: `buf` holds eight f32s.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), exp8(_mm256_loadu_ps(buf.as_ptr()))) };
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// `e^x` for eight lanes: Cephes' `expf` (range reduction by ln 2 in two parts, a degree-6 polynomial), within
/// 2 ulp of libm over the range a softmax feeds it (x ≤ 0). Below −87.3 (and at −inf) the result is exactly 0;
/// a NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let hi = _mm256_set1_ps(88.376_26);
    let lo = _mm256_set1_ps(-87.336_55);
    // Operand order keeps a NaN (min/max return their second operand when either is NaN).
    let xc = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
    let fx = _mm256_round_ps(
        _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
        23,
    ));
    let e = _mm256_mul_ps(y, pow2);
    _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e)
}

std::thread_local! {
    /// One row's scratch per thread, for the kernels that need the exponentials of a row beside their output.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on `e^(src_i − shift)` for a whole row, in a per-thread buffer that is reused (a fresh row of the
/// vocabulary's size per call would be an allocation of 200 KB–1 MB per row).
pub(crate) fn with_exp_row<R>(src: &[f32], shift: f32, f: impl FnOnce(&[f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        buf.clear();
        buf.extend(src.iter().map(|x| x - shift));
        exp_in_place(&mut buf);
        f(&buf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_within_2_ulp_of_libm_and_exact_at_the_ends() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 10.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1e-3);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA checked above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                let want = x.exp();
                worst = worst.max((g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32);
            }
            x += 0.0137;
        }
        assert!(worst <= 2, "{worst} ulp");
        let xs = [f32::NEG_INFINITY, -1e30, -88.0, 0.0, f32::NAN, -0.0, 1.0, -87.0];
        let mut got = [0f32; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
        assert_eq!(&got[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(got[3], 1.0);
        assert!(got[4].is_nan());
        assert_eq!(got[5], 1.0);
    }

    #[test]
    fn the_slice_exp_is_within_2_ulp_of_libm_at_every_position_and_zero_at_minus_infinity() {
        // 61 values: seven full lanes and a tail of five, so the remainder path is exercised too.
        let xs: Vec<f32> = (0..61).map(|i| -80.0 + i as f32 * 1.31).map(|x| x.min(0.0)).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (g, x) in got.iter().zip(&xs) {
            let ulp = (g.to_bits() as i64 - x.exp().to_bits() as i64).unsigned_abs();
            assert!(ulp <= 2, "exp({x}) = {g}, libm {}: {ulp} ulp", x.exp());
        }
        let mut ends = vec![f32::NEG_INFINITY, 0.0, -0.0, -1e30, f32::NEG_INFINITY];
        exp_in_place(&mut ends);
        assert_eq!(ends, vec![0.0, 1.0, 1.0, 0.0, 0.0]);
        let row = [3.0f32, 1.0, f32::NEG_INFINITY];
        let shifted = with_exp_row(&row, 3.0, |e| e.to_vec());
        assert_eq!(shifted[0], 1.0);
        assert!((shifted[1] - (-2.0f32).exp()).abs() <= 2.0 * f32::EPSILON * shifted[1]);
        assert_eq!(shifted[2], 0.0);
    }
}
