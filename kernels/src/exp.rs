//! `e^x` over a slice, vectorised where the CPU allows (`isa::active`). The loss head's, log-softmax's and the
//! training softmax's exponentials were libm's scalar `expf`, one call per vocabulary entry per row and pass
//! (~4 % of a heal step's samples on an AVX2 EPYC). The lanes are `attention_avx2::exp` (Cephes' polynomial),
//! within 2 ulp of libm for x ≤ 0 — all these callers pass: shifts by a row's max or log-sum-exp, and
//! log-probabilities. −inf gives exactly 0.

use crate::isa::{self, Isa};

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
    use crate::attention_avx2::exp;
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds exactly eight f32s.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp(_mm256_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        // The tail goes through the same lanes, so a value's exponential does not depend on where it sits.
        let mut buf = [0f32; 8];
        buf[..rest.len()].copy_from_slice(rest);
        // SAFETY: `buf` holds eight f32s.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), exp(_mm256_loadu_ps(buf.as_ptr()))) };
        rest.copy_from_slice(&buf[..rest.len()]);
    }
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
