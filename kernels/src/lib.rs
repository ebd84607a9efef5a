//! Training kernels with their own backward pass: RMSNorm (frozen weight), RoPE, the attention softmax with its
//! scale and additive mask folded in, and for the loss head the row-wise log-softmax and KL against a constant
//! reference.
//!
//! candle's fused CPU kernels for these have no backward pass, so the training path used to build each from
//! differentiable ops: 5–8 element-wise passes apiece, each a thread-pool hand-off and a fresh buffer, and about
//! twice that again in the backward pass (every gradient is also accumulated through a zero buffer). These do one
//! pass forward and one backward, and give the same values as the composite ops (tested below and end to end in
//! steer-heal's `tests/heal_tiny.rs`). CPU and f32 only: elsewhere the decoder keeps the composite ops (`applies`).
//! A crate of its own so that dev builds optimise these loops (steer-heal itself builds unoptimised there).
//!
//! Also here: `isa`, the run-time choice of instruction set every SIMD kernel follows; `skinny`, the few-row
//! product of a decode step; `attention`, inference attention in one pass; `blas`, OpenBLAS's sgemm for the large
//! products when the system has it; `blocks`, a weight kept in its GGUF block codes for the few-row products.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx2;
pub mod blas;
pub mod blocks;
mod exp;
pub mod isa;
pub mod skinny;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

/// Whether the fused kernels can run on `x` (CPU, f32).
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RMSNorm over the last axis with a frozen weight `[d]`: `y = x / sqrt(mean(x²) + eps) · w`. The gradient
/// flows to `x` only.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm { weight: weight.contiguous()?, eps: eps as f32 };
    x.contiguous()?.apply_op1(op)
}

/// Rotary embedding on `[b, h, t, d]` in the "rotate half" layout, with tables `[t, d/2]` or `[b, t, d/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, sign: 1.0 };
    x.contiguous()?.apply_op1(op)
}

/// `softmax(scale · scores + mask)` over the last axis of `scores` `[b, h, t, s]`, with `mask` `[1 or b, 1, t, s]`
/// (0 or −∞) held constant.
pub fn attention_probs(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let mask = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    let op = AttentionSoftmax { scale: scale as f32, mask };
    scores.contiguous()?.apply_op1(op)
}

/// The activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluActivation {
    /// `x · σ(x)` (Llama, Qwen).
    Silu,
    /// GELU with the tanh approximation, as candle's `gelu` (Gemma).
    GeluTanh,
}

/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Inputs per pass of `GluActivation::for_each`: its exponentials sit in a buffer on the stack.
const ACTIVATION_CHUNK: usize = 64;

impl GluActivation {
    /// `f(i, a(x_i), a'(x_i))` for every element of `x`, in order. Both activations are built from one
    /// exponential of a non-positive argument — σ(x) from e^{−|x|}, tanh(z) from e^{−2|z|} — taken from the
    /// vectorised lanes (`exp::exp_in_place`, within 2 ulp of libm there) a chunk at a time: libm's scalar `expf`
    /// was 1.4 % of a heal step's samples and the gated unit's backward 5 ns per element (bench/PROFILE.md).
    fn for_each(self, x: &[f32], mut f: impl FnMut(usize, f32, f32)) {
        let mut e = [0f32; ACTIVATION_CHUNK];
        for (c, xs) in x.chunks(ACTIVATION_CHUNK).enumerate() {
            let e = &mut e[..xs.len()];
            match self {
                Self::Silu => e.iter_mut().zip(xs).for_each(|(e, x)| *e = -x.abs()),
                Self::GeluTanh => e.iter_mut().zip(xs).for_each(|(e, &x)| *e = -2.0 * gelu_inner(x).abs()),
            }
            exp::exp_in_place(e);
            for (j, (&x, &e)) in xs.iter().zip(e.iter()).enumerate() {
                let (a, slope) = match self {
                    Self::Silu => {
                        // σ(x) = 1 / (1 + e^{−x}) for x ≥ 0, e^{x} / (1 + e^{x}) below: never e of a positive.
                        let s = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
                        (x * s, s * (1.0 + x * (1.0 - s)))
                    }
                    Self::GeluTanh => {
                        let t = ((1.0 - e) / (1.0 + e)).copysign(gelu_inner(x));
                        let slope = 0.5 * (1.0 + t)
                            + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
                        (0.5 * x * (1.0 + t), slope)
                    }
                };
                f(c * ACTIVATION_CHUNK + j, a, slope);
            }
        }
    }
}

/// The tanh argument of the GELU approximation, `√(2/π) (x + 0.044715 x³)`.
fn gelu_inner(x: f32) -> f32 {
    SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
}

/// The gated MLP's `act(gate) ⊙ up`, same-shaped inputs, gradients to both.
pub fn glu(gate: &Tensor, up: &Tensor, act: GluActivation) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("gated unit: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims());
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Glu { act })
}

/// Row-wise log-softmax over the last axis.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

/// Which KL `kl_rows` computes, per row of log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlDirection {
    /// KL(student ‖ reference) = Σ p_s (log p_s − log p_r).
    StudentToReference,
    /// KL(reference ‖ student) = Σ p_r (log p_r − log p_s).
    ReferenceToStudent,
}

/// Per-row KL `[n]` between student log-probabilities `[n, v]` (differentiable) and a constant reference `[n, v]`.
pub fn kl_rows(student: &Tensor, reference: &Tensor, direction: KlDirection) -> Result<Tensor> {
    if student.dims() != reference.dims() || student.rank() != 2 {
        candle_core::bail!(
            "kl: student {:?} and reference {:?} must be the same [n, v]",
            student.dims(),
            reference.dims()
        );
    }
    let op = KlRows { reference: reference.to_dtype(DType::F32)?.contiguous()?, direction };
    student.contiguous()?.apply_op1(op)
}

/// The heal loss head in one kernel: per row of `logits` `[n, v]`, the NLL of `targets[i]` and the KL between the
/// row's softmax and the constant `reference` log-probabilities, as `[n, 2]` (column 0 NLL, column 1 KL). The
/// log-probabilities themselves are never written: forward and backward are one exponential per logit each,
/// where the composite ops take four and a dozen full-size passes.
pub fn nll_and_kl(
    logits: &Tensor,
    reference: &Tensor,
    targets: &[u32],
    direction: KlDirection,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if reference.dims() != [n, v] || targets.len() != n {
        candle_core::bail!(
            "loss head: logits [{n}, {v}], reference {:?} and {} targets do not match",
            reference.dims(),
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|t| **t as usize >= v) {
        candle_core::bail!("loss head: target {t} is outside the vocabulary of {v}");
    }
    let op = NllKl {
        reference: reference.to_dtype(DType::F32)?.contiguous()?,
        targets: targets.to_vec(),
        direction,
    };
    logits.contiguous()?.apply_op1(op)
}

/// The contiguous f32 data of a CPU storage.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

/// Run `f` on the contiguous f32 data of a tensor the op holds (weight, tables, mask).
fn with_held<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: a held tensor is not on the CPU");
    };
    f(f32_slice(cpu, layout, op)?)
}

/// Fill `out` row by row (rows of `d`), in parallel when there is enough work to pay for the hand-off.
fn for_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    for_rows_costing(out, d, d, f)
}

/// `for_rows` where producing one output row reads `cost` input elements (a short row may summarise a
/// vocabulary-wide one), which is what decides whether to go parallel.
fn for_rows_costing(out: &mut [f32], d: usize, cost: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let rows = out.len() / d.max(1);
    if rows.saturating_mul(cost) < 1 << 15 || rows < 2 {
        out.chunks_mut(d.max(1)).enumerate().for_each(|(r, row)| f(r, row));
        return;
    }
    let per = rows.div_ceil(4 * threads()).max(1);
    let base = RowsPtr(out.as_mut_ptr());
    on_threads(rows.div_ceil(per), |c| {
        let (r0, r1) = (c * per, ((c + 1) * per).min(rows));
        let base = &base;
        // SAFETY: each task takes its own rows [r0, r1) of `out`, which outlives the call.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(r0 * d), (r1 - r0) * d) };
        chunk.chunks_mut(d).enumerate().for_each(|(j, row)| f(r0 + j, row));
    });
}

/// `out`'s start, shared by the tasks of one `for_rows_costing` call, which write disjoint rows.
struct RowsPtr(*mut f32);
// SAFETY: only used for disjoint rows within one call.
unsafe impl Sync for RowsPtr {}

/// Threads the CPU kernels split work over: candle's (`model::cpu::configure` pins it).
pub(crate) fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Run tasks `0..n` on candle's CPU thread pool (its barrier pool, in which the calling thread takes part): the
/// pool every candle op runs on. Handing our kernels to a second pool (rayon's) cost a sleep and a wake-up of its
/// threads per call, a few hundred per decode step: batch-1 decode 48 → 65 tok/s on a 2-core Xeon when the
/// few-row products moved over (bench/PROFILE.md). Called from inside the pool, the tasks run inline. The tasks
/// must not call candle ops: the calling thread takes part unflagged, and a nested call from it would wait on the
/// pool's own lock (every task here works on slices only).
pub(crate) fn on_threads(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// A fresh buffer shaped like `a`, filled row by row (rows of the last axis) from the matching rows of `a` and
/// `b`, two same-shaped contiguous inputs: the shape of every gradient kernel here.
fn map_row_pairs(
    op: &str,
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (f32_slice(a, al, op)?, f32_slice(b, bl, op)?);
    if a.len() != b.len() {
        candle_core::bail!("{op}: the two inputs differ in size");
    }
    let d = last_dim(al)?;
    let mut out = vec![0f32; a.len()];
    for_rows(&mut out, d, |r, o| f(&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d], o));
    Ok((CpuStorage::F32(out), al.shape().clone()))
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused kernel: empty last axis"),
    }
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = sum_f64(x, x, x, |v, _, _| v * v) / x.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

/// `Σ term(a_i, b_i, c_i)` over equal-length slices, each f32 term summed in f64 in eight running sums: one
/// chain of dependent f64 adds per row made RMSNorm's backward 2.6 ns per element, a latency-bound loop
/// (bench/PROFILE.md, eleventh pass).
fn sum_f64(a: &[f32], b: &[f32], c: &[f32], term: impl Fn(f32, f32, f32) -> f32) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for j in 0..LANES {
            acc[j] += term(x[j], y[j], z[j]) as f64;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for ((x, y), z) in ra.iter().zip(rb).zip(rc) {
        sum += term(*x, *y, *z) as f64;
    }
    sum
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let d = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        with_held(&self.weight, self.name(), |w| {
            if w.len() != d {
                candle_core::bail!("rms norm: weight has {} entries, input rows have {d}", w.len());
            }
            for_rows(&mut y, d, |r, yr| {
                let xr = &x[r * d..(r + 1) * d];
                let inv = inv_rms(xr, self.eps);
                for ((o, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                    *o = xi * inv * wi;
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let grad = RmsNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &grad)?))
    }
}

/// `∂L/∂x` of RMSNorm: with `r = 1/rms(x)` and `u = g ⊙ w`, `dx = r·u − x · r³ · mean(u ⊙ x)`.
struct RmsNormGrad {
    weight: Tensor,
    eps: f32,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_held(&self.weight, self.name(), |w| {
            map_row_pairs(self.name(), (xs, xl), (gs, gl), |xr, gr, out| {
                let inv = inv_rms(xr, self.eps);
                let dot = sum_f64(xr, gr, w, |xi, gi, wi| gi * wi * xi) as f32;
                let k = inv * inv * inv * dot / xr.len() as f32;
                for (((o, xi), gi), wi) in out.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = inv * gi * wi - xi * k;
                }
            })
        })
    }
}

/// RoPE as a rotation of each `(x_i, x_{i+d/2})` pair by the position's angle; `sign = −1` rotates back, which
/// is also the backward pass (the rotation's transpose).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    sign: f32,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (b, h, t, d) = l.shape().dims4()?;
        let half = d / 2;
        if d % 2 != 0 {
            candle_core::bail!("rope: odd head dimension {d}");
        }
        let batched = match self.cos.dims() {
            [tt, hh] if *tt == t && *hh == half => false,
            [bb, tt, hh] if *bb == b && *tt == t && *hh == half => true,
            other => candle_core::bail!("rope: tables {other:?} do not fit input [{b}, {h}, {t}, {d}]"),
        };
        let mut y = vec![0f32; x.len()];
        with_held(&self.cos, self.name(), |cos| {
            with_held(&self.sin, self.name(), |sin| {
                for_rows(&mut y, d, |r, yr| {
                    let ti = r % t;
                    let tr = if batched { (r / (h * t)) * t + ti } else { ti };
                    let (c, sn) = (&cos[tr * half..(tr + 1) * half], &sin[tr * half..(tr + 1) * half]);
                    let xr = &x[r * d..(r + 1) * d];
                    let (x1, x2) = xr.split_at(half);
                    let (y1, y2) = yr.split_at_mut(half);
                    for i in 0..half {
                        let s = self.sign * sn[i];
                        y1[i] = x1[i] * c[i] - x2[i] * s;
                        y2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                });
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope { cos: self.cos.clone(), sin: self.sin.clone(), sign: -self.sign };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// `softmax(scale · x + mask)` over the last axis; see `attention_probs`.
struct AttentionSoftmax {
    scale: f32,
    mask: Option<Tensor>,
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax-with-backward"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let (b, h, t, s) = l.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        let row = |r: usize, yr: &mut [f32], m: Option<&[f32]>| {
            let xr = &x[r * s..(r + 1) * s];
            let mut max = f32::NEG_INFINITY;
            for (j, (o, xi)) in yr.iter_mut().zip(xr).enumerate() {
                *o = xi * self.scale + m.map_or(0.0, |m| m[j]);
                max = max.max(*o);
            }
            yr.iter_mut().for_each(|o| *o -= max);
            exp::exp_in_place(yr);
            let sum: f64 = yr.iter().map(|o| *o as f64).sum();
            let inv = (1.0 / sum) as f32;
            yr.iter_mut().for_each(|o| *o *= inv);
        };
        match &self.mask {
            None => for_rows(&mut y, s, |r, yr| row(r, yr, None)),
            Some(mask) => with_held(mask, self.name(), |m| {
                let rows = match mask.dims() {
                    [mb, 1, mt, ms] if (*mb == 1 || *mb == b) && *mt == t && *ms == s => *mb,
                    other => candle_core::bail!(
                        "attention softmax: mask {other:?} does not fit [{b}, {h}, {t}, {s}]"
                    ),
                };
                for_rows(&mut y, s, |r, yr| {
                    let mr = if rows == 1 { r % t } else { (r / (h * t)) * t + r % t };
                    row(r, yr, Some(&m[mr * s..(mr + 1) * s]))
                });
                Ok(())
            })?,
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let grad = SoftmaxGrad { scale: self.scale };
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &grad)?))
    }
}

/// `∂L/∂x` of `softmax(scale · x + mask)`: `scale · y ⊙ (g − Σ g ⊙ y)`.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_row_pairs(self.name(), (ys, yl), (gs, gl), |yr, gr, out| {
            let dot = yr.iter().zip(gr).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32;
            for ((o, yi), gi) in out.iter_mut().zip(yr).zip(gr) {
                *o = self.scale * yi * (gi - dot);
            }
        })
    }
}

struct Glu {
    act: GluActivation,
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "gated-unit-with-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(gs, gl, self.name())?, f32_slice(us, ul, self.name())?);
        let mut y = vec![0f32; g.len()];
        let d = last_dim(gl)?;
        for_rows(&mut y, d, |r, yr| {
            let (gr, ur) = (&g[r * d..(r + 1) * d], &u[r * d..(r + 1) * d]);
            self.act.for_each(gr, |i, a, _| yr[i] = a * ur[i]);
        });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let pair = GluGrad { act: self.act, u: u.contiguous()?, grad: grad.clone() };
        // Both gradients in one pass, one block after the other: [2, ...] → (dgate, dup), each a contiguous
        // view, so the projections' backward reads them in place (side by side in the last axis they were
        // strided, and each was copied).
        let both = g.contiguous()?.apply_op1_no_bwd(&pair)?;
        let dgate = both.get(0)?;
        let dup = both.get(1)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `∂L/∂gate = grad · up · act'(gate)` and `∂L/∂up = grad · act(gate)`, as `[2, ...gate's shape]`: all of
/// `∂L/∂gate`, then all of `∂L/∂up`.
struct GluGrad {
    act: GluActivation,
    u: Tensor,
    grad: Tensor,
}

impl CustomOp1 for GluGrad {
    fn name(&self) -> &'static str {
        "gated-unit-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, self.name())?;
        let d = last_dim(gl)?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        let du_base = RowsPtr(dup.as_mut_ptr());
        with_held(&self.u, self.name(), |u| {
            with_held(&self.grad, self.name(), |dy| {
                // Rows of ∂L/∂gate drive the split; each task writes the same rows of ∂L/∂up.
                for_rows(dgate, d, |r, dg| {
                    let (gr, ur, dr) =
                        (&g[r * d..(r + 1) * d], &u[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                    let du_base = &du_base;
                    // SAFETY: row r of ∂L/∂up, the same row this task owns of ∂L/∂gate; `out` outlives the call.
                    let du = unsafe { std::slice::from_raw_parts_mut(du_base.0.add(r * d), d) };
                    self.act.for_each(gr, |i, a, slope| {
                        dg[i] = dr[i] * ur[i] * slope;
                        du[i] = dr[i] * a;
                    });
                });
                Ok(())
            })
        })?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "log-softmax-with-backward"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let v = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, v, |r, yr| {
            let xr = &x[r * v..(r + 1) * v];
            let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = exp::with_exp_row(xr, max, |e| e.iter().map(|e| *e as f64).sum());
            // (x − max) − ln Σ, as the composite ops round it: folding max into one log-sum-exp first would
            // round at the logits' magnitude and shift every log-prob of the row by up to an ulp of it.
            let ln_sum = sum.ln() as f32;
            yr.iter_mut().zip(xr).for_each(|(o, xi)| *o = (xi - max) - ln_sum);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &LogSoftmaxGrad)?))
    }
}

/// `∂L/∂x` of log-softmax: `g − exp(y) · Σ g`.
struct LogSoftmaxGrad;

impl CustomOp2 for LogSoftmaxGrad {
    fn name(&self) -> &'static str {
        "log-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_row_pairs(self.name(), (ys, yl), (gs, gl), |yr, gr, out| {
            let total = gr.iter().map(|gi| *gi as f64).sum::<f64>() as f32;
            out.copy_from_slice(yr);
            exp::exp_in_place(out);
            for (o, gi) in out.iter_mut().zip(gr) {
                *o = gi - *o * total;
            }
        })
    }
}

/// Per-row KL against a held reference; see `kl_rows`.
struct KlRows {
    reference: Tensor,
    direction: KlDirection,
}

impl KlRows {
    fn rows<'a>(&self, s: &'a [f32], l: &Layout) -> Result<(usize, usize, &'a [f32])> {
        let (n, v) = l.shape().dims2()?;
        if self.reference.dims() != [n, v] {
            candle_core::bail!("kl: reference {:?} does not fit student [{n}, {v}]", self.reference.dims());
        }
        Ok((n, v, s))
    }
}

impl CustomOp1 for KlRows {
    fn name(&self) -> &'static str {
        "kl-rows-with-backward"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v, s) = self.rows(f32_slice(st, l, self.name())?, l)?;
        let mut kl = vec![0f32; n];
        with_held(&self.reference, self.name(), |r| {
            for_rows_costing(&mut kl, 1, v, |i, o| {
                let (sr, rr) = (&s[i * v..(i + 1) * v], &r[i * v..(i + 1) * v]);
                o[0] = match self.direction {
                    KlDirection::StudentToReference => exp::with_exp_row(sr, 0.0, |p| {
                        p.iter().zip(sr.iter().zip(rr)).map(|(p, (a, b))| (p * (a - b)) as f64).sum::<f64>()
                            as f32
                    }),
                    KlDirection::ReferenceToStudent => exp::with_exp_row(rr, 0.0, |q| {
                        q.iter().zip(sr.iter().zip(rr)).map(|(q, (a, b))| (q * (b - a)) as f64).sum::<f64>()
                            as f32
                    }),
                };
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(kl), Shape::from(n)))
    }

    fn bwd(&self, s: &Tensor, _kl: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let grad = KlRowsGrad { reference: self.reference.clone(), direction: self.direction };
        Ok(Some(s.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &grad)?))
    }
}

/// `∂L/∂s` of the per-row KL with row gradients `g` `[n]`: `g_i · p_s (s − r + 1)` for KL(s ‖ r),
/// `−g_i · p_r` for KL(r ‖ s).
struct KlRowsGrad {
    reference: Tensor,
    direction: KlDirection,
}

impl CustomOp2 for KlRowsGrad {
    fn name(&self) -> &'static str {
        "kl-rows-grad"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = f32_slice(ss, sl, self.name())?;
        let g = f32_slice(gs, gl, self.name())?;
        let (n, v) = sl.shape().dims2()?;
        if g.len() != n {
            candle_core::bail!("kl grad: {} row gradients for {n} rows", g.len());
        }
        let mut ds = vec![0f32; s.len()];
        with_held(&self.reference, self.name(), |r| {
            for_rows(&mut ds, v, |i, out| {
                let (sr, rr, gi) = (&s[i * v..(i + 1) * v], &r[i * v..(i + 1) * v], g[i]);
                match self.direction {
                    KlDirection::StudentToReference => {
                        out.copy_from_slice(sr);
                        exp::exp_in_place(out);
                        for ((o, a), b) in out.iter_mut().zip(sr).zip(rr) {
                            *o = gi * *o * (a - b + 1.0);
                        }
                    }
                    KlDirection::ReferenceToStudent => {
                        out.copy_from_slice(rr);
                        exp::exp_in_place(out);
                        out.iter_mut().for_each(|o| *o *= -gi);
                    }
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(ds), sl.shape().clone()))
    }
}

/// NLL and KL per row from logits; see `nll_and_kl`.
struct NllKl {
    reference: Tensor,
    targets: Vec<u32>,
    direction: KlDirection,
}

impl CustomOp1 for NllKl {
    fn name(&self) -> &'static str {
        "nll-kl-head-with-backward"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n * 2];
        with_held(&self.reference, self.name(), |r| {
            for_rows_costing(&mut out, 2, v, |i, o| {
                let (xr, rr) = (&x[i * v..(i + 1) * v], &r[i * v..(i + 1) * v]);
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // With e = exp(x − max) and S = Σ e: log p = x − max − ln S, and
                // KL(p ‖ r) = Σ e (x − max − r) / S − ln S, all in the one exponential pass.
                let (sum, tilt) = exp::with_exp_row(xr, max, |e| {
                    let (mut sum, mut tilt) = (0f64, 0f64);
                    for (e, (xi, ri)) in e.iter().zip(xr.iter().zip(rr)) {
                        sum += *e as f64;
                        tilt += (e * ((xi - max) - ri)) as f64;
                    }
                    (sum, tilt)
                });
                let ln_sum = sum.ln();
                // log p = (x − max) − ln S, rounded like `LogSoftmax`.
                let ln_s = ln_sum as f32;
                o[0] = (max - xr[self.targets[i] as usize]) + ln_s;
                o[1] = match self.direction {
                    KlDirection::StudentToReference => (tilt / sum - ln_sum) as f32,
                    KlDirection::ReferenceToStudent => exp::with_exp_row(rr, 0.0, |q| {
                        q.iter()
                            .zip(xr.iter().zip(rr))
                            .map(|(q, (xi, ri))| (q * (ri - ((xi - max) - ln_s))) as f64)
                            .sum::<f64>() as f32
                    }),
                };
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let grad = NllKlGrad {
            reference: self.reference.clone(),
            targets: self.targets.clone(),
            direction: self.direction,
            out: out.contiguous()?,
            g: g.to_dtype(DType::F32)?.contiguous()?,
        };
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(&grad)?))
    }
}

/// `∂L/∂x` of the loss head from the row gradients `g = (g_nll, g_kl)`, with `p = softmax(x)`, `s = log p`:
/// NLL gives `g_nll (p − 1[target])`; KL(p ‖ r) gives `g_kl · p (s − r − KL)`; KL(r ‖ p) gives `g_kl (p − q)`,
/// `q = exp(r)`. The log-sum-exp is recovered from the forward output as `NLL + x[target]`.
struct NllKlGrad {
    reference: Tensor,
    targets: Vec<u32>,
    direction: KlDirection,
    out: Tensor,
    g: Tensor,
}

impl CustomOp1 for NllKlGrad {
    fn name(&self) -> &'static str {
        "nll-kl-head-grad"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let (_, v) = l.shape().dims2()?;
        let mut dx = vec![0f32; x.len()];
        with_held(&self.reference, self.name(), |r| {
            with_held(&self.out, self.name(), |out| {
                with_held(&self.g, self.name(), |g| {
                    for_rows(&mut dx, v, |i, d| {
                        let (xr, rr) = (&x[i * v..(i + 1) * v], &r[i * v..(i + 1) * v]);
                        let t = self.targets[i] as usize;
                        let (nll, kl, gn, gk) = (out[2 * i], out[2 * i + 1], g[2 * i], g[2 * i + 1]);
                        let lse = nll + xr[t];
                        // p = exp(x − lse) first, in place, then the row's factor.
                        d.iter_mut().zip(xr).for_each(|(o, xi)| *o = xi - lse);
                        exp::exp_in_place(d);
                        match self.direction {
                            KlDirection::StudentToReference => {
                                let shift = lse + kl;
                                for ((o, xi), ri) in d.iter_mut().zip(xr).zip(rr) {
                                    *o *= gn + gk * (xi - shift - ri);
                                }
                            }
                            KlDirection::ReferenceToStudent => exp::with_exp_row(rr, 0.0, |q| {
                                for (o, q) in d.iter_mut().zip(q) {
                                    *o = *o * (gn + gk) - gk * q;
                                }
                            }),
                        }
                        d[t] -= gn;
                    });
                    Ok(())
                })
            })
        })?;
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Value and input gradient of `fused` and `composite` on the same input, under a random linear read-out:
    /// largest differences relative to the composite's largest magnitude (at least 1).
    fn compare(
        x: &Var,
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composite: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f32, f32)> {
        let yf = fused(x.as_tensor())?;
        let yc = composite(x.as_tensor())?;
        let probe = Tensor::randn(0f32, 1.0, yc.shape(), x.device())?;
        let gf = (&yf * &probe)?.sum_all()?.backward()?;
        let gc = (&yc * &probe)?.sum_all()?.backward()?;
        let (gf, gc) = (gf.get(x).expect("fused grad"), gc.get(x).expect("composite grad"));
        let scale =
            |t: &Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0)) };
        assert!(gc.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok((max_diff(&yf, &yc)? / scale(&yc)?, max_diff(gf, gc)? / scale(gc)?))
    }

    #[test]
    fn log_softmax_and_kl_match_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (6usize, 9000usize);
        let x = Var::randn(0f32, 3.0, (n, v), &dev)?;
        let composite_ls = |x: &Tensor| -> Result<Tensor> {
            let max = x.max_keepdim(D::Minus1)?.detach();
            let z = x.broadcast_sub(&max)?;
            z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)
        };
        let (dy, dg) = compare(&x, log_softmax, composite_ls)?;
        assert!(dy < 1e-5 && dg < 1e-5, "log-softmax: value {dy}, gradient {dg}");
        let reference = composite_ls(&Tensor::randn(0f32, 3.0, (n, v), &dev)?)?;
        for dir in [KlDirection::StudentToReference, KlDirection::ReferenceToStudent] {
            let (dy, dg) = compare(
                &x,
                |x| kl_rows(&log_softmax(x)?, &reference, dir),
                |x| {
                    let s = composite_ls(x)?;
                    match dir {
                        KlDirection::StudentToReference => (s.exp()? * (&s - &reference)?)?.sum(D::Minus1),
                        KlDirection::ReferenceToStudent => {
                            (reference.exp()? * (&reference - &s)?)?.sum(D::Minus1)
                        }
                    }
                },
            )?;
            // The KL of two random 9000-way distributions is ~10 nats, summed in f32 in a different order by
            // each side: 1e-4 absolute (1e-5 relative) was occasionally exceeded on unseeded inputs, and so was
            // 1e-5 relative for its gradient (1.15e-5 seen about once in a hundred runs).
            assert!(dy < 1e-3 && dg < 5e-5, "{dir:?}: value {dy}, gradient {dg}");
        }
        Ok(())
    }

    #[test]
    fn the_loss_head_matches_log_softmax_gather_and_kl() -> Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (5usize, 7000usize);
        let x = Var::randn(0f32, 3.0, (n, v), &dev)?;
        let reference = log_softmax(&Tensor::randn(0f32, 3.0, (n, v), &dev)?)?;
        let targets: Vec<u32> = vec![0, 6999, 17, 3500, 17];
        let t = Tensor::new(targets.as_slice(), &dev)?.unsqueeze(1)?;
        for dir in [KlDirection::StudentToReference, KlDirection::ReferenceToStudent] {
            let (dy, dg) = compare(
                &x,
                |x| nll_and_kl(x, &reference, &targets, dir),
                |x| {
                    let s = log_softmax(x)?;
                    let nll = s.gather(&t, 1)?.neg()?;
                    let kl = kl_rows(&s, &reference, dir)?.unsqueeze(1)?;
                    Tensor::cat(&[&nll, &kl], 1)
                },
            )?;
            assert!(dy < 2e-4 && dg < 1e-5, "{dir:?}: value {dy}, gradient {dg}");
        }
        assert!(nll_and_kl(x.as_tensor(), &reference, &[0, 1, 2, 3, 7000], KlDirection::StudentToReference)
            .is_err());
        Ok(())
    }

    #[test]
    fn gated_units_match_silu_and_gelu_times_up_in_both_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let g = Var::randn(0f32, 3.0, (2, 50, 96), &dev)?;
        let u = Var::randn(0f32, 1.0, (2, 50, 96), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 50, 96), &dev)?;
        for act in [GluActivation::Silu, GluActivation::GeluTanh] {
            let yf = glu(g.as_tensor(), u.as_tensor(), act)?;
            let a = match act {
                GluActivation::Silu => g.as_tensor().silu()?,
                GluActivation::GeluTanh => g.as_tensor().gelu()?,
            };
            let yc = (a * u.as_tensor())?;
            assert!(max_diff(&yf, &yc)? < 1e-5, "{act:?} value {}", max_diff(&yf, &yc)?);
            let gf = (&yf * &probe)?.sum_all()?.backward()?;
            let gc = (&yc * &probe)?.sum_all()?.backward()?;
            for v in [&g, &u] {
                let (a, b) = (gf.get(v).expect("fused grad"), gc.get(v).expect("composite grad"));
                assert!(max_diff(a, b)? < 1e-4, "{act:?} gradient diff {}", max_diff(a, b)?);
            }
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![2usize, 5, 8], vec![3, 700, 64]] {
            let x = Var::randn(0f32, 2.0, dims.as_slice(), &dev)?;
            let w = Tensor::randn(1f32, 0.3, dims[dims.len() - 1], &dev)?;
            let (dy, dg) = compare(
                &x,
                |x| rms_norm(x, &w, 1e-5),
                |x| {
                    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?.broadcast_mul(&w)
                },
            )?;
            assert!(dy < 1e-5 && dg < 1e-4, "{dims:?}: value {dy}, gradient {dg}");
        }
        Ok(())
    }

    #[test]
    fn attention_softmax_matches_the_composite_ops_with_and_without_a_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t) = (2usize, 3usize, 30usize);
        let x = Var::randn(0f32, 3.0, (b, h, t, t), &dev)?;
        // Causal, and a per-row mask that also hides the first key from row 1's later queries.
        let causal: Vec<f32> =
            (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let causal = Tensor::from_vec(causal.clone(), (1, 1, t, t), &dev)?;
        let mut padded: Vec<f32> = causal.flatten_all()?.to_vec1()?;
        padded.extend(causal.flatten_all()?.to_vec1::<f32>()?);
        for q in 1..t {
            padded[t * t + q * t] = f32::NEG_INFINITY;
        }
        let padded = Tensor::from_vec(padded, (2, 1, t, t), &dev)?;
        for mask in [None, Some(&causal), Some(&padded)] {
            let (dy, dg) = compare(
                &x,
                |x| attention_probs(x, 0.125, mask),
                |x| {
                    let s = (x * 0.125)?;
                    let s = match mask {
                        Some(m) => s.broadcast_add(m)?,
                        None => s,
                    };
                    let max = s.max_keepdim(D::Minus1)?.detach();
                    let e = s.broadcast_sub(&max)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
                },
            )?;
            assert!(dy < 1e-6 && dg < 1e-5, "mask {:?}: value {dy}, gradient {dg}", mask.map(|m| m.dims4()));
        }
        Ok(())
    }
}
