//! Inference attention in one pass: `softmax(scale · q kᵀ (soft-capped) + mask) v` for every query row, with
//! grouped key/value heads, read straight from the KV cache's buffers and written in the `[b, t, heads · d]`
//! layout the output projection takes.
//!
//! The composed version is two batched matmuls and four element-wise passes. On a decode step the matmuls are
//! `b · kv_heads` gemm calls of 3 × 64 × s each (5 760 calls per SmolLM2 step at batch 32): packing and thread
//! hand-offs, not arithmetic, so attention took about twice the time of all the projections together
//! (bench/PROFILE.md). Here each (row, head) is one task over its keys: dot products, the softmax and the weighted
//! sum of values on one score row in L1, keys the mask hides skipped (half of a causal prefill).
//!
//! The loops are written with eight partial sums and compiled twice, for AVX2 + FMA and for the baseline, chosen
//! at run time (`isa::active`). Inference only: no backward pass (the training path keeps its own ops).

use crate::isa::{self, Isa};
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Attention output `[b, t, nh · d]` for queries `q` `[b, nh, t, d]`, keys and values `[b, nkv, s, d]` (any strides
/// with contiguous rows of `d`: the cache's narrowed buffers), an additive `mask` `[1 or b, 1, t, s]` (`None`:
/// every key visible) and Gemma's optional soft-capping of the scores. CPU, f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    attention_at(isa::active(), q, k, v, mask, scale, softcap)
}

/// Whether `attention` is faster than the composed ops for `b` sequences of `t` new query rows over `nkv` key
/// heads of size `d`. The tiled AVX2 row kernel (head sizes that are multiples of 8) always is (bench-kernels: 0.046
/// vs 0.078 ms per SmolLM2 layer even at one sequence's decode step); the portable loop only with enough (row, key
/// head) tasks to pay for the fork (0.11 vs 0.08 ms at batch 1).
pub fn preferred(b: usize, nkv: usize, t: usize, d: usize) -> bool {
    (isa::active() >= Isa::Avx2 && d.is_multiple_of(8)) || t > 1 || b * nkv >= 8
}

/// `attention` on the given ISA path.
fn attention_at(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, s, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    let q = q.contiguous()?;
    let mask = match mask {
        Some(m) => {
            let (mb, one, mt, ms) = m.dims4()?;
            if (mb != 1 && mb != b) || one != 1 || mt != t || ms != s {
                candle_core::bail!("attention: mask {:?} does not fit [b, 1, {t}, {s}]", m.dims());
            }
            Some((m.to_dtype(DType::F32)?.contiguous()?, mb))
        }
        None => None,
    };
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let ms = mask.as_ref().map(|(m, _)| m.storage_and_layout());
    let (
        Storage::Cpu(CpuStorage::F32(qv)),
        Storage::Cpu(CpuStorage::F32(kv)),
        Storage::Cpu(CpuStorage::F32(vv)),
    ) = (&*qs, &*ks, &*vs)
    else {
        candle_core::bail!("attention: CPU f32 tensors only");
    };
    let mv: Option<&[f32]> = match &ms {
        Some((st, l)) => match &**st {
            Storage::Cpu(CpuStorage::F32(m)) => Some(&m[l.start_offset()..]),
            _ => candle_core::bail!("attention: the mask is not CPU f32"),
        },
        None => None,
    };
    let kv_at = |l: &Layout| -> Result<KvView> {
        let st = l.stride();
        if st[3] != 1 {
            candle_core::bail!("attention: key/value rows must be contiguous");
        }
        Ok(KvView { start: l.start_offset(), batch: st[0], head: st[1], row: st[2] })
    };
    let mask_rows = mask.as_ref().map(|(_, mb)| *mb).unwrap_or(0);
    let (kview, vview) = (kv_at(kl)?, kv_at(vl)?);
    let q0 = ql.start_offset();
    let mut out = vec![0f32; b * t * nh * d];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let params = Params { scale: scale as f32, softcap: softcap.map(|c| c as f32) };
    // One task per (batch row, key/value head): its query heads share every key and value row while it is in
    // L1 (a decode step is bound by reading the cache). A long prefill also splits its queries, so that both cores
    // have work at batch 1.
    let rep = nh / nkv;
    let q_chunk = if b * nkv >= 16 { t } else { t.div_ceil(8).max(1) };
    let chunks = t.div_ceil(q_chunk);
    crate::on_threads(b * nkv * chunks, |task| {
        let (bg, c) = (task / chunks, task % chunks);
        let (bi, g) = (bg / nkv, bg % nkv);
        let (i0, i1) = (c * q_chunk, ((c + 1) * q_chunk).min(t));
        let rows = Rows {
            k: kv,
            kbase: kview.start + bi * kview.batch + g * kview.head,
            krow: kview.row,
            v: vv,
            vbase: vview.start + bi * vview.batch + g * vview.head,
            vrow: vview.row,
            s,
            d,
        };
        let mut scores = vec![0f32; rep * s];
        for i in i0..i1 {
            // Query heads g·rep .. (g+1)·rep of row i, `t · d` apart.
            let q = Queries { q: qv, base: q0 + ((bi * nh + g * rep) * t + i) * d, stride: t * d, rep };
            let mrow = mv.map(|m| {
                let r = if mask_rows == 1 { 0 } else { bi };
                &m[(r * t + i) * s..][..s]
            });
            let out_ptr = &out_ptr;
            // SAFETY: the rep · d outputs of (bi, i, heads of g) are written by this task only; `out` outlives it.
            let orow = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.0.add(((bi * t + i) * nh + g * rep) * d), rep * d)
            };
            run_group(isa, &params, &q, &rows, mrow, &mut scores, orow);
        }
    });
    drop((qs, ks, vs, ms));
    Tensor::from_vec(out, (b, t, nh * d), q.device())
}

/// Strides of a key or value tensor `[b, nkv, s, d]`.
#[derive(Clone, Copy)]
struct KvView {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

struct Params {
    scale: f32,
    softcap: Option<f32>,
}

/// The keys and values one query row attends to.
struct Rows<'a> {
    k: &'a [f32],
    kbase: usize,
    krow: usize,
    v: &'a [f32],
    vbase: usize,
    vrow: usize,
    s: usize,
    d: usize,
}

struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows of the output.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// The query heads of one group at one row.
struct Queries<'a> {
    q: &'a [f32],
    base: usize,
    stride: usize,
    rep: usize,
}

impl Queries<'_> {
    #[inline(always)]
    fn head(&self, r: usize, d: usize) -> &[f32] {
        &self.q[self.base + r * self.stride..][..d]
    }
}

fn run_group(
    isa: Isa,
    p: &Params,
    q: &Queries,
    r: &Rows,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        if r.d.is_multiple_of(8) && q.rep <= MAX_REP {
            let heads: [&[f32]; MAX_REP] =
                std::array::from_fn(|h| if h < q.rep { q.head(h, r.d) } else { &[] });
            let (k, v) = (&r.k[r.kbase..], &r.v[r.vbase..]);
            // SAFETY: `isa::active` reports AVX2 only when the CPU has AVX2 and FMA; d is a multiple of 8, and the
            // key/value views hold `s` rows `krow`/`vrow` apart (checked where the views were made).
            return unsafe {
                crate::attention_avx2::row(
                    &heads[..q.rep],
                    k,
                    r.krow,
                    v,
                    r.vrow,
                    r.s,
                    r.d,
                    p.scale,
                    p.softcap,
                    mask,
                    scores,
                    out,
                )
            };
        }
        // SAFETY: as above.
        return unsafe { group_avx2(p, q, r, mask, scores, out) };
    }
    let _ = isa;
    group(p, q, r, mask, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2(
    p: &Params,
    q: &Queries,
    r: &Rows,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    group(p, q, r, mask, scores, out)
}

/// One row of a group's query heads: scores over the visible keys (each key row read once for all heads), the
/// softmax per head, the weighted sum of values (each value row read once).
#[inline(always)]
fn group(p: &Params, q: &Queries, r: &Rows, mask: Option<&[f32]>, scores: &mut [f32], out: &mut [f32]) {
    let (s, d, rep) = (r.s, r.d, q.rep);
    let mut max = [f32::NEG_INFINITY; MAX_REP];
    let rep_max = rep.min(MAX_REP);
    for j in 0..s {
        let m = mask.map(|m| m[j]).unwrap_or(0.0);
        if m == f32::NEG_INFINITY {
            for h in 0..rep {
                scores[h * s + j] = f32::NEG_INFINITY;
            }
            continue;
        }
        let krow = &r.k[r.kbase + j * r.krow..][..d];
        for h in 0..rep {
            let mut x = dot(q.head(h, d), krow) * p.scale;
            if let Some(c) = p.softcap {
                x = (x / c).tanh() * c;
            }
            x += m;
            scores[h * s + j] = x;
            if h < rep_max {
                max[h] = max[h].max(x);
            }
        }
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for h in 0..rep {
        let row = &mut scores[h * s..(h + 1) * s];
        let mx = if h < rep_max { max[h] } else { row.iter().copied().fold(f32::NEG_INFINITY, f32::max) };
        if mx == f32::NEG_INFINITY {
            // Every key hidden (the decoder's masks never do this): no attention, a zero row.
            row.iter_mut().for_each(|e| *e = 0.0);
            continue;
        }
        let mut sum = 0f32;
        for e in row.iter_mut() {
            *e = if *e == f32::NEG_INFINITY { 0.0 } else { (*e - mx).exp() };
            sum += *e;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|e| *e *= inv);
    }
    for j in 0..s {
        let vrow = &r.v[r.vbase + j * r.vrow..][..d];
        for h in 0..rep {
            let w = scores[h * s + j];
            if w == 0.0 {
                continue;
            }
            for (o, x) in out[h * d..(h + 1) * d].iter_mut().zip(vrow) {
                *o += w * x;
            }
        }
    }
}

/// Query heads per key/value head whose running maxima live on the stack (more fall back to a second pass).
const MAX_REP: usize = 16;

/// A dot product over 32 interleaved partial sums: four independent 8-lane chains, so the additions of one key's
/// 64 products do not wait on each other (vectorised with what the enclosing function enables).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ac, bc) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..32 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut acc8 = [0f32; 8];
    for l in 0..8 {
        acc8[l] = (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
    }
    let (ac, bc) = (ar.chunks_exact(8), br.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc8[l] += x[l] * y[l];
        }
    }
    let q = [acc8[0] + acc8[4], acc8[1] + acc8[5], acc8[2] + acc8[6], acc8[3] + acc8[7]];
    (q[0] + q[2]) + (q[1] + q[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The composed ops the decoder used before, in f64 for the reference.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
        cap: Option<f64>,
    ) -> Tensor {
        let (b, nh, t, d) = q.dims4().expect("q");
        let nkv = k.dim(1).expect("k");
        let rep = nh / nkv;
        let s = k.dim(2).expect("s");
        let f = |x: &Tensor| x.to_dtype(DType::F64).expect("f64");
        let (q, k, v) = (f(q), f(&k.contiguous().expect("k")), f(&v.contiguous().expect("v")));
        let qg = q.reshape((b, nkv, rep * t, d)).expect("qg");
        let raw = qg.matmul(&k.t().expect("kt")).expect("qk").reshape((b, nh, t, s)).expect("raw");
        let mut sc = (raw * scale).expect("scale");
        if let Some(c) = cap {
            sc = (((sc / c).expect("c").tanh().expect("tanh")) * c).expect("cap");
        }
        if let Some(m) = mask {
            sc = sc.broadcast_add(&f(m)).expect("mask");
        }
        let max = sc.max_keepdim(D::Minus1).expect("max");
        let e = sc.broadcast_sub(&max).expect("sub").exp().expect("exp");
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).expect("sum")).expect("div");
        let out = p.reshape((b, nkv, rep * t, s)).expect("p").matmul(&v).expect("pv");
        out.reshape((b, nh, t, d)).expect("o").transpose(1, 2).expect("t").reshape((b, t, nh * d)).expect("r")
    }

    fn causal_pad_mask(b: usize, t: usize, s: usize, pad: &[usize]) -> Tensor {
        let off = s - t;
        let mut m = vec![0f32; b * t * s];
        for r in 0..b {
            for i in 0..t {
                for j in 0..s {
                    if j > off + i || (j < pad[r] && j != off + i) {
                        m[(r * t + i) * s + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).expect("mask")
    }

    #[test]
    fn matches_the_composed_ops_on_every_isa_path() -> Result<()> {
        let dev = Device::Cpu;
        // (b, nh, nkv, t, s, d, padded, softcap): a prefill with padding, a decode step on a strided cache view, an
        // odd head size, soft-capping, and no mask.
        let cases = [
            (3, 6, 2, 5, 5, 16, true, None),
            (2, 9, 3, 1, 37, 64, true, None),
            (1, 4, 4, 7, 9, 13, false, Some(50.0)),
            (2, 4, 2, 1, 11, 8, false, None),
            // Gemma-sized heads (four query heads per key head, d 256) with soft-capping, and eight query heads
            // per key head (tiles of 3 + 3 + 2).
            (1, 4, 1, 6, 41, 256, true, Some(30.0)),
            (2, 8, 1, 3, 23, 32, true, None),
        ];
        for &(b, nh, nkv, t, s, d, padded, cap) in &cases {
            let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
            // Keys and values as a narrowed view of a larger buffer, like the cache's.
            let kbuf = Tensor::randn(0f32, 1.0, (b, nkv, s + 6, d), &dev)?;
            let vbuf = Tensor::randn(0f32, 1.0, (b, nkv, s + 6, d), &dev)?;
            let (k, v) = (kbuf.narrow(2, 0, s)?, vbuf.narrow(2, 0, s)?);
            let pad: Vec<usize> = (0..b).map(|r| if padded { r % 3 } else { 0 }).collect();
            let mask = if t == 1 && !padded { None } else { Some(causal_pad_mask(b, t, s, &pad)) };
            let scale = 1.0 / (d as f64).sqrt();
            let want = composed(&q, &k, &v, mask.as_ref(), scale, cap);
            let mut paths = vec![Isa::Baseline];
            if isa::detected() >= Isa::Avx2 {
                paths.push(Isa::Avx2);
            }
            for isa in paths {
                let got = attention_at(isa, &q, &k, &v, mask.as_ref(), scale, cap)?;
                let diff = (got.to_dtype(DType::F64)? - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-5, "case {:?}: off by {diff} at {isa}", (b, nh, nkv, t, s, d));
            }
        }
        Ok(())
    }
}
