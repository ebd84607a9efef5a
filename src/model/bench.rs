//! The few-row product of a decode step, our kernel (`steer_heal_kernels::skinny`) against gemm (candle's matmul
//! in its faster operand order), on a model's projection shapes and its vocabulary head, at 1–64 rows. Both run in
//! the same process, interleaved, best of `reps`, at the ISA `STEER_HEAL_ISA` leaves active: where
//! `skinny::max_rows` comes from (bench/PROFILE.md). Ours is also timed reading the weight from Q4_1 block codes,
//! as it does for a GGUF's projections (`model::codes`).

use super::lora::{gemm_matmul_wt, matmul_wt};
use super::ModelConfig;
use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;
use steer_heal_kernels::blocks::{BlockRows, Coding};
use steer_heal_kernels::{isa, skinny};

/// One shape at one row count.
#[derive(Debug, Clone, Serialize)]
pub struct MatmulRow {
    /// Which projection.
    pub shape: String,
    pub in_features: usize,
    pub out_features: usize,
    pub rows: usize,
    /// Best time of our few-row kernel, ms (timed up to 64 rows).
    pub ours_ms: Option<f64>,
    /// Best time of our few-row kernel reading the weight as Q4_1 block codes (a GGUF's projections), ms (timed
    /// where `ours_ms` is).
    pub ours_q4_1_ms: Option<f64>,
    /// Best time of gemm, ms.
    pub gemm_ms: f64,
    /// Best time of the system's OpenBLAS, ms (when loaded).
    pub blas_ms: Option<f64>,
    /// gemm ÷ the fastest (> 1: gemm is slower).
    pub gemm_over_best: f64,
    /// What `matmul_wt` uses at this size: "ours", "blas" or "gemm".
    pub used: String,
    /// Largest difference between the dispatching entry point and gemm.
    pub max_abs_diff: f32,
}

/// Attention at one shape: our one-pass kernel against the composed ops the decoder used before.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRow {
    /// What the shape is (a decode step or a prefill).
    pub case: String,
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub ours_ms: f64,
    pub composed_ms: f64,
    pub composed_over_ours: f64,
    pub max_abs_diff: f32,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct MatmulBench {
    /// Which library does the large products (`model::cpu::blas_summary`).
    pub blas: String,
    pub isa: String,
    pub isa_detected: String,
    pub cpu_features: Vec<&'static str>,
    pub reps: usize,
    pub results: Vec<MatmulRow>,
    pub attention: Vec<AttentionRow>,
}

/// The composed attention: batched matmuls, scale, mask, softmax, batched matmul, transpose.
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (nkv, s) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    let raw = q.reshape((b, nkv, rep * t, d))?.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
    let sc = (raw * scale)?;
    let sc = match mask {
        Some(m) => sc.broadcast_add(m)?,
        None => sc,
    };
    let p = candle_nn::ops::softmax_last_dim(&sc)?;
    let out = p.reshape((b, nkv, rep * t, s))?.matmul(v)?;
    Ok(out.reshape((b, nh, t, d))?.transpose(1, 2)?.reshape((b, t, nh * d))?)
}

/// Time attention at a decode step (batch 32, 240 cached keys: the eval's think) and a prefill (batch 32 × 173).
fn bench_attention(cfg: &ModelConfig, reps: usize) -> Result<Vec<AttentionRow>> {
    let dev = Device::Cpu;
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let mut out = Vec::new();
    for (case, b, t, s) in
        [("decode step", 32usize, 1usize, 240usize), ("decode step", 1, 1, 240), ("prefill", 32, 173, 173)]
    {
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
        // Keys and values as the cache holds them: a narrowed view of a larger buffer.
        let k = Tensor::randn(0f32, 1.0, (b, nkv, s + 64, d), &dev)?.narrow(2, 0, s)?;
        let v = Tensor::randn(0f32, 1.0, (b, nkv, s + 64, d), &dev)?.narrow(2, 0, s)?;
        let mask = super::decoder::build_mask(b, t, s - t, &[], None, candle_core::DType::F32, &dev)?;
        let scale = cfg.attn_scale();
        let ours = || -> Result<f64> {
            let t0 = Instant::now();
            std::hint::black_box(steer_heal_kernels::attention::attention(
                &q,
                &k,
                &v,
                mask.as_ref(),
                scale,
                None,
            )?);
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        };
        let composed = || -> Result<f64> {
            let t0 = Instant::now();
            std::hint::black_box(composed_attention(&q, &k, &v, mask.as_ref(), scale)?);
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        };
        ours()?;
        composed()?;
        let (mut bo, mut bc) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..reps.max(1) {
            bo = bo.min(ours()?);
            bc = bc.min(composed()?);
        }
        let a = steer_heal_kernels::attention::attention(&q, &k, &v, mask.as_ref(), scale, None)?;
        let c = composed_attention(&q, &k, &v, mask.as_ref(), scale)?;
        let diff = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        out.push(AttentionRow {
            case: case.into(),
            batch: b,
            queries: t,
            keys: s,
            ours_ms: bo,
            composed_ms: bc,
            composed_over_ours: bc / bo,
            max_abs_diff: diff,
        });
    }
    Ok(out)
}

/// The distinct `(name, in, out)` products of one block plus the head.
fn shapes(cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut v = vec![
        (format!("q {h}→{q}"), h, q),
        (format!("k/v {h}→{kv}"), h, kv),
        (format!("o {q}→{h}"), q, h),
        (format!("gate/up {h}→{i}"), h, i),
        (format!("down {i}→{h}"), i, h),
        (format!("head {h}→{}", cfg.vocab_size), h, cfg.vocab_size),
    ];
    v.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
    v
}

/// Time our kernel and gemm on `cfg`'s shapes at each of `rows`.
pub fn bench_matmul(cfg: &ModelConfig, rows: &[usize], reps: usize) -> Result<MatmulBench> {
    let dev = Device::Cpu;
    let mut results = Vec::new();
    for (shape, k, n) in shapes(cfg) {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let coded = BlockRows::from_ggml(Coding::Q4_1, &q.data()?, n, k).map_err(Error::invalid)?;
        for &m in rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; m * n];
            let mut ours = || {
                let t = Instant::now();
                skinny::matmul_wt(&xv, &wv, &mut y, m, k, n);
                t.elapsed().as_secs_f64() * 1e3
            };
            let mut yq = vec![0f32; m * n];
            let mut ours_q4_1 = || {
                let t = Instant::now();
                skinny::matmul_wt_codes(&xv, &coded, &mut yq, m);
                t.elapsed().as_secs_f64() * 1e3
            };
            let gemm = || -> Result<f64> {
                let t = Instant::now();
                std::hint::black_box(gemm_matmul_wt(&x, &w)?);
                Ok(t.elapsed().as_secs_f64() * 1e3)
            };
            // OpenBLAS where `matmul_wt` would use it (from `blas::MIN_ROWS` rows).
            let mut c = vec![0f32; m * n];
            let mut blas = || -> Result<Option<f64>> {
                let Some(lib) =
                    steer_heal_kernels::blas::get().filter(|_| m >= steer_heal_kernels::blas::MIN_ROWS)
                else {
                    return Ok(None);
                };
                let t = Instant::now();
                let done = lib.sgemm(&xv, &wv, &mut c, m, k, n, true);
                Ok(done.then(|| t.elapsed().as_secs_f64() * 1e3))
            };
            let time_ours = m <= 64;
            // Warm each up, then interleave.
            if time_ours {
                ours();
                ours_q4_1();
            }
            gemm()?;
            blas()?;
            let (mut best_ours, mut best_gemm, mut best_blas) = (None::<f64>, f64::INFINITY, None::<f64>);
            let mut best_q4_1 = None::<f64>;
            let min = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.min(b)));
            for _ in 0..reps.max(1) {
                if time_ours {
                    best_ours = min(best_ours, ours());
                    best_q4_1 = min(best_q4_1, ours_q4_1());
                }
                best_gemm = best_gemm.min(gemm()?);
                if let Some(t) = blas()? {
                    best_blas = min(best_blas, t);
                }
            }
            let diff =
                (matmul_wt(&x, &w)? - gemm_matmul_wt(&x, &w)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let used = if m <= skinny::max_rows() {
                "ours"
            } else if best_blas.is_some() {
                "blas"
            } else {
                "gemm"
            };
            let best = [best_ours, best_blas].into_iter().flatten().fold(best_gemm, f64::min);
            results.push(MatmulRow {
                shape: shape.clone(),
                in_features: k,
                out_features: n,
                rows: m,
                ours_ms: best_ours,
                ours_q4_1_ms: best_q4_1,
                gemm_ms: best_gemm,
                blas_ms: best_blas,
                gemm_over_best: best_gemm / best,
                used: used.into(),
                max_abs_diff: diff,
            });
        }
    }
    let attention = bench_attention(cfg, reps)?;
    Ok(MatmulBench {
        blas: super::cpu::blas_summary(),
        attention,
        isa: isa::active().name().into(),
        isa_detected: isa::detected().name().into(),
        cpu_features: isa::cpu_features(),
        reps,
        results,
    })
}

impl MatmulBench {
    /// A markdown table of the run.
    pub fn table(&self) -> String {
        let mut s = format!(
            "ISA {} (CPU has {}), large products by {}, best of {}\n\n| shape | rows | ours ms | ours from Q4_1 ms | gemm ms | OpenBLAS ms | gemm / best | used |\n|---|---|---|---|---|---|---|---|\n",
            self.isa, self.isa_detected, self.blas, self.reps
        );
        let ms = |x: Option<f64>| x.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into());
        for r in &self.results {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {} | {:.2} | {} |\n",
                r.shape,
                r.rows,
                ms(r.ours_ms),
                ms(r.ours_q4_1_ms),
                r.gemm_ms,
                ms(r.blas_ms),
                r.gemm_over_best,
                r.used
            ));
        }
        s.push_str("\n| attention | batch | queries | keys | ours ms | composed ms | composed / ours |\n|---|---|---|---|---|---|---|\n");
        for a in &self.attention {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.2} |\n",
                a.case, a.batch, a.queries, a.keys, a.ours_ms, a.composed_ms, a.composed_over_ours
            ));
        }
        s
    }
}
