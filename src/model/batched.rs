//! The training path's attention products — `q·kᵀ` and `p·v`, one small product per (sequence, key-value head) —
//! on the BLAS, forward and backward.
//!
//! Why: candle's batched matmul runs them on gemm, and its backward as two more batched gemm products plus
//! transposed views. On a heal step at 4 × 128 tokens on SmolLM2 those 60 backward products took 0.17 s a step
//! (about 53 GFLOP/s on a 2-core Xeon) where the frozen projections' BLAS products reach 250 (bench/PROFILE.md,
//! eleventh pass). Each batch entry is one BLAS call with the transposes as flags, so no operand is copied.
//!
//! Without a BLAS (or off the CPU, or for another dtype) it is candle's matmul, which the tests compare it with.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use steer_heal_kernels::blas::{self, Blas, Product};

/// `a · bᵀ` (`b_transposed`: `b` `[batch, n, k]`) or `a · b` (`b` `[batch, k, n]`) for `a` `[batch, m, k]`, with
/// gradients to both.
pub fn batched_product(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    let on_blas = blas::get().is_some()
        && a.device().is_cpu()
        && a.dtype() == candle_core::DType::F32
        && b.dtype() == candle_core::DType::F32
        && a.rank() == 3
        && b.rank() == 3;
    if !on_blas {
        return if b_transposed { a.matmul(&b.t()?) } else { a.matmul(b) };
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, BatchedProduct { b_transposed })
}

/// The custom op behind `batched_product`.
struct BatchedProduct {
    b_transposed: bool,
}

/// Sizes of one batch entry's product `[m, k] · op(b)[k, n]` and the batch.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl BatchedProduct {
    fn dims(&self, a: &Layout, b: &Layout) -> Result<Dims> {
        let (batch, m, k) = a.shape().dims3()?;
        let (bb, b1, b2) = b.shape().dims3()?;
        let (n, kb) = if self.b_transposed { (b1, b2) } else { (b2, b1) };
        if bb != batch || kb != k {
            candle_core::bail!("batched product: {:?} against {:?}", a.dims(), b.dims());
        }
        Ok(Dims { batch, m, n, k })
    }
}

/// The BLAS, which `batched_product` checked is loaded.
fn lib() -> Result<&'static Blas> {
    blas::get().ok_or_else(|| candle_core::Error::Msg("batched product: no BLAS loaded".into()))
}

/// The contiguous f32 elements of a CPU storage.
fn elements<'s>(s: &'s CpuStorage, l: &Layout) -> Result<&'s [f32]> {
    super::lora::contiguous_f32(s, l)
        .ok_or_else(|| candle_core::Error::Msg("batched product: an operand is not contiguous f32".into()))
}

/// Runs `f` on a CPU tensor's contiguous f32 elements.
fn with_elements<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(elements(s, layout)?),
        _ => candle_core::bail!("batched product: an operand is not on the CPU"),
    }
}

/// `out[i] = op(a[i]) · op(b[i])` for every batch entry `i`, `p` giving one entry's product; `a` and `b` hold
/// `batch` entries of equal size each.
fn per_entry(p: Product, batch: usize, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let lib = lib()?;
    let (sa, sb, sc) = (p.m * p.k, p.k * p.n, p.m * p.n);
    if a.len() != batch * sa || b.len() != batch * sb {
        candle_core::bail!(
            "batched product: operands of {} and {} elements for {batch} entries",
            a.len(),
            b.len()
        );
    }
    let mut out = vec![0f32; batch * sc];
    for (i, c) in out.chunks_mut(sc).enumerate() {
        if !lib.product_into(p, &a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb], 0.0, c) {
            candle_core::bail!("batched product: a product too large for the BLAS");
        }
    }
    Ok(out)
}

impl CustomOp2 for BatchedProduct {
    fn name(&self) -> &'static str {
        "batched-product"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { batch, m, n, k } = self.dims(al, bl)?;
        let p = Product::new(m, n, k);
        let p = if self.b_transposed { p.bt() } else { p };
        let c = per_entry(p, batch, elements(a, al)?, elements(b, bl)?)?;
        Ok((CpuStorage::F32(c), Shape::from((batch, m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Dims { batch, m, n, k } = self.dims(a.layout(), b.layout())?;
        let grad = grad.contiguous()?;
        let dev = a.device();
        with_elements(&grad, |g| {
            // ∂a = G · op(b)ᵀ: G [m, n] against b stored [n, k] (op(b) = bᵀ) or [k, n].
            let da = if a.track_op() {
                let p = Product::new(m, k, n);
                let p = if self.b_transposed { p } else { p.bt() };
                let v = with_elements(b, |bv| per_entry(p, batch, g, bv))?;
                Some(Tensor::from_vec(v, (batch, m, k), dev)?)
            } else {
                None
            };
            // ∂b: Gᵀ · a (stored [n, k]) when op(b) = bᵀ, else aᵀ · G (stored [k, n]).
            let db = if b.track_op() {
                let v = with_elements(a, |av| {
                    if self.b_transposed {
                        per_entry(Product::new(n, k, m).at(), batch, g, av)
                    } else {
                        per_entry(Product::new(k, n, m).at(), batch, av, g)
                    }
                })?;
                let shape = if self.b_transposed { (batch, n, k) } else { (batch, k, n) };
                Some(Tensor::from_vec(v, shape, dev)?)
            } else {
                None
            };
            Ok((da, db))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Both layouts, value and both gradients, against candle's matmul (the attention's shapes, shrunk). The op
    /// runs where a BLAS is loaded (`just test` fetches one; its AVX2 pass runs with `STEER_HEAL_BLAS=off`, where
    /// this checks the fallback).
    #[test]
    fn batched_products_match_candles_matmul_in_value_and_both_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for b_transposed in [true, false] {
            let a = Var::randn(0f32, 1.0, (6, 48, 16), &dev)?;
            let b_shape = if b_transposed { (6, 40, 16) } else { (6, 16, 40) };
            let b = Var::randn(0f32, 1.0, b_shape, &dev)?;
            let probe = Tensor::randn(0f32, 1.0, (6, 48, 40), &dev)?;
            let ours = batched_product(a.as_tensor(), b.as_tensor(), b_transposed)?;
            let theirs = if b_transposed {
                a.as_tensor().matmul(&b.as_tensor().t()?)?
            } else {
                a.as_tensor().matmul(b.as_tensor())?
            };
            assert!(max_diff(&ours, &theirs)? < 1e-4, "value, b_transposed {b_transposed}");
            let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
            let g_theirs = (&theirs * &probe)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let (x, y) = (g_ours.get(v).expect("ours"), g_theirs.get(v).expect("candle's"));
                assert_eq!(x.dims(), y.dims());
                assert!(max_diff(x, y)? < 1e-4, "gradient, b_transposed {b_transposed}: {}", max_diff(x, y)?);
            }
        }
        Ok(())
    }
}
