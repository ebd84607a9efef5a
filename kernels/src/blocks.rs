//! A frozen weight kept in its GGUF block codes, for the decode step's few-row products (`skinny::matmul_wt_codes`).
//!
//! A decode step at batch 1 streams every weight from memory once per token, so its speed is the bytes per
//! weight: 4 as f32, 0.75 as ggml's Q4_1 (a 4-bit code per value, an f32 scale and offset per 32 values), 1.125
//! as Q8_0. The demo model's GGUF stores its projections as Q4_1 and its embedding (the tied head) as Q8_0; the
//! loader also dequantises them to f32 for everything else (prefill, training, the eval's merged copy).
//!
//! The values are the same ones, bit for bit: Q4_1's `q·d + m` and Q8_0's `q·d` multiply a code of at most 8 bits
//! by an f16 scale (at most 11 significant bits), which f32 holds exactly, so the one rounding is the offset's
//! add, the same in candle's dequantiser (`to_float`), here, and in a fused multiply-add. A product from the codes
//! therefore equals the f32 kernel's product on the dequantised weight exactly (tested in `skinny`).

use crate::isa::{self, Isa};

/// Values per block in both codings.
pub const BLOCK: usize = 32;

/// How a row's blocks are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// ggml's Q4_1: per block an f16 scale `d`, an f16 offset `m` and 16 bytes of 4-bit codes (value `j` in the
    /// low nibble of byte `j`, value `16 + j` in its high nibble): `w = q·d + m`.
    Q4_1,
    /// ggml's Q8_0: per block an f16 scale `d` and 32 signed bytes: `w = q·d`.
    Q8_0,
}

impl Coding {
    /// Bytes of one block in a GGUF file.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Coding::Q4_1 => 20,
            Coding::Q8_0 => 34,
        }
    }

    /// Bytes of one block's codes.
    fn code_bytes(self) -> usize {
        match self {
            Coding::Q4_1 => 16,
            Coding::Q8_0 => 32,
        }
    }
}

/// Why ggml data cannot be read as block rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError(pub String);

impl std::fmt::Display for BlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BlockError {}

/// A row-major weight `[rows, cols]` as block codes, scales (and offsets) split into their own arrays (f32, so
/// the kernel broadcasts them without a conversion).
#[derive(Debug, Clone)]
pub struct BlockRows {
    coding: Coding,
    rows: usize,
    cols: usize,
    /// Per block, row-major: `d`.
    scale: Vec<f32>,
    /// Per block: `m` (Q4_1), empty for Q8_0.
    offset: Vec<f32>,
    /// Per block: the codes, `code_bytes` each.
    codes: Vec<u8>,
}

impl BlockRows {
    /// Read ggml's blocks of a `[rows, cols]` weight (GGUF's tensor data, rows of `cols / 32` blocks).
    pub fn from_ggml(coding: Coding, data: &[u8], rows: usize, cols: usize) -> Result<Self, BlockError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(BlockError(format!("{cols} columns are not whole blocks of {BLOCK}")));
        }
        let blocks = rows * cols / BLOCK;
        let size = coding.ggml_block_bytes();
        if data.len() != blocks * size {
            return Err(BlockError(format!(
                "{} bytes for {rows} × {cols} values in {coding:?} blocks of {size} bytes (want {})",
                data.len(),
                blocks * size
            )));
        }
        let cb = coding.code_bytes();
        let f16_at = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut scale = Vec::with_capacity(blocks);
        let mut offset = Vec::with_capacity(if coding == Coding::Q4_1 { blocks } else { 0 });
        let mut codes = Vec::with_capacity(blocks * cb);
        for b in data.chunks_exact(size) {
            scale.push(f16_at(b, 0));
            match coding {
                Coding::Q4_1 => {
                    offset.push(f16_at(b, 2));
                    codes.extend_from_slice(&b[4..]);
                }
                Coding::Q8_0 => codes.extend_from_slice(&b[2..]),
            }
        }
        Ok(Self { coding, rows, cols, scale, offset, codes })
    }

    /// The coding.
    pub fn coding(&self) -> Coding {
        self.coding
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: what a product reads.
    pub fn bytes(&self) -> usize {
        (self.scale.len() + self.offset.len()) * 4 + self.codes.len()
    }

    /// The same weight with its rows reordered: row `i` of the result is row `order[i]` of this one (the loader's
    /// Q/K unpermutation).
    pub fn with_rows_in_order(&self, order: &[usize]) -> Result<Self, BlockError> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(BlockError(format!("a row order of {} for {} rows", order.len(), self.rows)));
        }
        let per_row = self.cols / BLOCK;
        let cb = self.coding.code_bytes() * per_row;
        let pick_f32 = |v: &[f32]| -> Vec<f32> {
            if v.is_empty() {
                return Vec::new();
            }
            order.iter().flat_map(|&r| v[r * per_row..(r + 1) * per_row].iter().copied()).collect()
        };
        Ok(Self {
            coding: self.coding,
            rows: self.rows,
            cols: self.cols,
            scale: pick_f32(&self.scale),
            offset: pick_f32(&self.offset),
            codes: order.iter().flat_map(|&r| self.codes[r * cb..(r + 1) * cb].iter().copied()).collect(),
        })
    }

    /// Row `j` as f32 values into `out` (length `cols`), with the active instruction set.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        self.dequantize_row_with(isa::active(), j, out)
    }

    /// The whole weight as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (j, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(j, row);
        }
        out
    }

    /// `dequantize_row` on a given instruction set (`isa` at most the detected one).
    pub(crate) fn dequantize_row_with(&self, isa: Isa, j: usize, out: &mut [f32]) {
        assert!(j < self.rows && out.len() == self.cols, "block rows: row {j} or its length is out of range");
        let per_row = self.cols / BLOCK;
        let b0 = j * per_row;
        let scale = &self.scale[b0..b0 + per_row];
        let cb = self.coding.code_bytes();
        let codes = &self.codes[b0 * cb..(b0 + per_row) * cb];
        match self.coding {
            Coding::Q4_1 => {
                let offset = &self.offset[b0..b0 + per_row];
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx512 {
                    // SAFETY: `isa` ≤ detected, so the CPU has AVX-512 F; the slices hold `per_row` blocks.
                    return unsafe { simd::q4_1_avx512(scale, offset, codes, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx2 {
                    // SAFETY: as above, with AVX2.
                    return unsafe { simd::q4_1_avx2(scale, offset, codes, out) };
                }
                for (((o, q), d), m) in
                    out.chunks_exact_mut(BLOCK).zip(codes.chunks_exact(16)).zip(scale).zip(offset)
                {
                    for (jj, c) in q.iter().enumerate() {
                        o[jj] = (c & 0x0F) as f32 * d + m;
                        o[jj + 16] = (c >> 4) as f32 * d + m;
                    }
                }
            }
            Coding::Q8_0 => {
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx512 {
                    // SAFETY: as above.
                    return unsafe { simd::q8_0_avx512(scale, codes, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx2 {
                    // SAFETY: as above.
                    return unsafe { simd::q8_0_avx2(scale, codes, out) };
                }
                for ((o, q), d) in out.chunks_exact_mut(BLOCK).zip(codes.chunks_exact(32)).zip(scale) {
                    for (v, c) in o.iter_mut().zip(q) {
                        *v = (*c as i8) as f32 * d;
                    }
                }
            }
        }
    }
}

/// The dequantisers, one block (32 values) per step. Q4_1's `q·d + m` is one fused multiply-add: `q·d` is exact,
/// so the fused form rounds once, where candle's multiply-then-add does, to the same value (tested).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F; `codes` holds 16 bytes and `out` 32 values per entry of `scale` and `offset`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn q4_1_avx512(scale: &[f32], offset: &[f32], codes: &[u8], out: &mut [f32]) {
        let nibble = _mm512_set1_epi32(0x0F);
        for (b, (&d, &m)) in scale.iter().zip(offset).enumerate() {
            // SAFETY: block b's 16 code bytes and 32 outputs are inside the slices.
            unsafe {
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(b * 16).cast()));
                let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, nibble));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
                let o = out.as_mut_ptr().add(b * 32);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(lo, d, m));
                _mm512_storeu_ps(o.add(16), _mm512_fmadd_ps(hi, d, m));
            }
        }
    }

    /// # Safety
    /// AVX2; as `q4_1_avx512`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_1_avx2(scale: &[f32], offset: &[f32], codes: &[u8], out: &mut [f32]) {
        let nibble = _mm256_set1_epi32(0x0F);
        for (b, (&d, &m)) in scale.iter().zip(offset).enumerate() {
            // SAFETY: as in `q4_1_avx512`.
            unsafe {
                let p = codes.as_ptr().add(b * 16);
                let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let o = out.as_mut_ptr().add(b * 32);
                for half in 0..2 {
                    let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(half * 8).cast()));
                    let lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, nibble));
                    let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(q));
                    _mm256_storeu_ps(o.add(half * 8), _mm256_fmadd_ps(lo, d, m));
                    _mm256_storeu_ps(o.add(16 + half * 8), _mm256_fmadd_ps(hi, d, m));
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 F; `codes` holds 32 bytes and `out` 32 values per entry of `scale`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn q8_0_avx512(scale: &[f32], codes: &[u8], out: &mut [f32]) {
        for (b, &d) in scale.iter().enumerate() {
            // SAFETY: block b's 32 code bytes and 32 outputs are inside the slices.
            unsafe {
                let d = _mm512_set1_ps(d);
                for half in 0..2 {
                    let q =
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(codes.as_ptr().add(b * 32 + half * 16).cast()));
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(b * 32 + half * 16),
                        _mm512_mul_ps(_mm512_cvtepi32_ps(q), d),
                    );
                }
            }
        }
    }

    /// # Safety
    /// AVX2; as `q8_0_avx512`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_0_avx2(scale: &[f32], codes: &[u8], out: &mut [f32]) {
        for (b, &d) in scale.iter().enumerate() {
            // SAFETY: as in `q8_0_avx512`.
            unsafe {
                let d = _mm256_set1_ps(d);
                for quarter in 0..4 {
                    let at = b * 32 + quarter * 8;
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(codes.as_ptr().add(at).cast()));
                    _mm256_storeu_ps(out.as_mut_ptr().add(at), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Every instruction set this CPU can run.
    pub(crate) fn isas() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= isa::detected()).collect()
    }

    /// A weight quantised by candle (ggml's own quantiser), as block rows and as candle dequantises it.
    pub(crate) fn quantised(coding: Coding, rows: usize, cols: usize, seed: u64) -> (BlockRows, Vec<f32>) {
        let dev = Device::Cpu;
        let n = rows * cols;
        // Deterministic values with a spread of magnitudes per block.
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let t = (i as u64).wrapping_mul(6_364_136_223_846_793_005).wrapping_add(seed) >> 33;
                ((t % 2001) as f32 / 1000.0 - 1.0) * (1.0 + (i / 32 % 7) as f32)
            })
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &dev).expect("tensor");
        let dt = match coding {
            Coding::Q4_1 => GgmlDType::Q4_1,
            Coding::Q8_0 => GgmlDType::Q8_0,
        };
        let q = QTensor::quantize(&t, dt).expect("quantise");
        let bytes = q.data().expect("bytes").into_owned();
        let candle: Vec<f32> =
            q.dequantize(&dev).expect("dequantise").flatten_all().expect("flat").to_vec1().expect("vec");
        (BlockRows::from_ggml(coding, &bytes, rows, cols).expect("blocks"), candle)
    }

    #[test]
    fn dequantises_bit_for_bit_as_candle_on_every_isa() {
        for coding in [Coding::Q4_1, Coding::Q8_0] {
            let (rows, cols) = (5, 96);
            let (w, candle) = quantised(coding, rows, cols, 3);
            assert_eq!(w.bytes(), rows * cols / BLOCK * if coding == Coding::Q4_1 { 24 } else { 36 });
            for isa in isas() {
                let mut got = vec![f32::NAN; rows * cols];
                for (j, row) in got.chunks_exact_mut(cols).enumerate() {
                    w.dequantize_row_with(isa, j, row);
                }
                let same = got.iter().zip(&candle).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{coding:?} on {isa}: not candle's values");
            }
        }
    }

    #[test]
    fn reorders_rows_and_refuses_bad_data() {
        let (w, candle) = quantised(Coding::Q4_1, 4, 64, 9);
        let r = w.with_rows_in_order(&[2, 0, 3, 1]).expect("order");
        let got = r.dequantize();
        for (i, &from) in [2usize, 0, 3, 1].iter().enumerate() {
            assert_eq!(got[i * 64..(i + 1) * 64], candle[from * 64..(from + 1) * 64]);
        }
        assert!(w.with_rows_in_order(&[0, 1, 2]).is_err());
        assert!(w.with_rows_in_order(&[0, 1, 2, 4]).is_err());
        assert!(BlockRows::from_ggml(Coding::Q4_1, &[0; 40], 2, 32).is_ok());
        assert!(BlockRows::from_ggml(Coding::Q4_1, &[0; 39], 2, 32).is_err());
        assert!(BlockRows::from_ggml(Coding::Q8_0, &[0; 34], 1, 30).is_err());
    }
}
