//! LoRA-ready linear layers: a frozen base weight plus any number of low-rank adapters, each with its own
//! scale α/r and a runtime gate c, so one model can carry several rounds at once, train one of them, or have
//! them merged into the weight.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};
use steer_heal_kernels::{blas, skinny};

/// One low-rank adapter: `y += c · (α/r) · B(A x)`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Name of the adapter (usually the round it belongs to).
    pub name: String,
    /// `A ∈ ℝ^{r×d_in}`; a candle `Var`'s tensor when trained.
    pub a: Tensor,
    /// `B ∈ ℝ^{d_out×r}`.
    pub b: Tensor,
    /// `α / r`.
    pub scale: f64,
    /// Runtime gate; 0 switches the adapter off exactly.
    pub gate: f64,
}

impl Adapter {
    /// The dense weight update `c · (α/r) · B A`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)? * (self.gate * self.scale)
    }
}

/// Which LoRA adapters a forward pass applies. A value passed with the pass, like the hooks, never a change to the
/// model's gates: a reference pass and a training pass can then share one model (and one GPU) safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Adapters<'a> {
    /// Every adapter at its gate: the model as it is.
    #[default]
    AsGated,
    /// None: the pristine base.
    Base,
    /// Every adapter at its gate but the one with this name: the KL reference of a round being healed.
    Without(&'a str),
}

impl Adapters<'_> {
    /// Whether `ad` takes part in the pass.
    pub fn applies(&self, ad: &Adapter) -> bool {
        match self {
            Adapters::AsGated => true,
            Adapters::Base => false,
            Adapters::Without(name) => ad.name != *name,
        }
    }
}

/// A linear projection `y = x Wᵀ (+ bias) + Σ adapters`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Frozen base weight `[d_out, d_in]`.
    pub weight: Tensor,
    /// Optional bias `[d_out]`.
    pub bias: Option<Tensor>,
    /// Adapters applied on top, in order.
    pub adapters: Vec<Adapter>,
}

impl LoraLinear {
    /// A plain linear with no adapters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapters: Vec::new() }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Apply to `x` of shape `[..., d_in]`, every adapter at its gate.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Adapters::AsGated)
    }

    /// Apply to `x` of shape `[..., d_in]` with the adapters `sel` picks (each at its gate).
    pub fn forward_with(&self, x: &Tensor, sel: Adapters) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, d_in))?;
        let mut y = frozen_matmul_wt(&x2, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        for ad in &self.adapters {
            if ad.gate == 0.0 || !sel.applies(ad) {
                continue;
            }
            // Scale the rank-r product, not the d_out-wide one: one small pass instead of a wide one each way. The
            // adapter may be f32 over a bf16 base (its trained copy): it runs in its own dtype, then joins y's.
            let xa = if x2.dtype() == ad.a.dtype() { x2.clone() } else { x2.to_dtype(ad.a.dtype())? };
            let low = (xa.matmul(&ad.a.t()?)? * (ad.gate * ad.scale))?;
            let up = low.matmul(&ad.b.t()?)?;
            let up = if up.dtype() == y.dtype() { up } else { up.to_dtype(y.dtype())? };
            y = (y + up)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        y.reshape(out_dims)
    }

    /// Fold every active adapter into the base weight and drop them (`W ← W + Σ c_i (α_i/r_i) B_i A_i`).
    pub fn merge(&mut self) -> Result<()> {
        let mut w = self.weight.clone();
        for ad in &self.adapters {
            if ad.gate != 0.0 {
                w = (w + ad.delta_weight()?.detach().to_dtype(self.weight.dtype())?)?;
            }
        }
        self.weight = w;
        self.adapters.clear();
        Ok(())
    }

    /// The weight as it would be with all active adapters merged, without changing the layer.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let mut copy = self.clone();
        copy.merge()?;
        Ok(copy.weight)
    }

    /// Largest singular value of one adapter's `B·A` by power iteration (for the spectral penalty).
    pub fn adapter_sigma_max(ad: &Adapter, iters: usize) -> Result<Tensor> {
        // v ← normalise(Aᵀ Bᵀ B A v); σ ≈ ‖B A v‖. Differentiable through the last product.
        let d_in = ad.a.dim(D::Minus1)?;
        let mut v = Tensor::ones((d_in, 1), ad.a.dtype(), ad.a.device())?;
        for _ in 0..iters {
            let bav = ad.b.matmul(&ad.a.matmul(&v)?)?.detach();
            let w = ad.a.t()?.matmul(&ad.b.t()?.matmul(&bav)?)?.detach();
            let n = w.sqr()?.sum_all()?.sqrt()?;
            v = w.broadcast_div(&(n + 1e-12)?)?;
        }
        ad.b.matmul(&ad.a.matmul(&v)?)?.sqr()?.sum_all()?.sqrt()
    }
}

/// Rows at or below which `x·Wᵀ` is computed as `(W·xᵀ)ᵀ`: for the 2–32 rows of a batched decode step candle's
/// gemm is ~2× faster with the weight as the left operand (release build, SmolLM2 shapes: 0.28 vs 0.47 ms for
/// 16×576·576×1536, 13 vs 26 ms for the 49152-row tied head); one row is a gemv either way (the plain order is a
/// little faster on the head), and prefill-sized inputs are faster in the plain order.
const FEW_ROWS: usize = 32;

/// `x·Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`, choosing the faster kernel for the row count
/// (`fast_product`), else gemm in the faster operand order.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() && !w.track_op() {
        if let Some(y) = tensor_product(x, w, true)? {
            return Ok(y);
        }
    }
    gemm_matmul_wt(x, w)
}

/// `x·Wᵀ` through candle's matmul (gemm), in the operand order that is faster for the row count.
pub fn gemm_matmul_wt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.dim(0)?;
    if rows > 1 && rows <= FEW_ROWS {
        w.matmul(&x.t()?)?.t()
    } else {
        x.matmul(&w.t()?)
    }
}

/// `a · bᵀ` (`b_transposed`, `b` `[n, k]`) or `a · b` (`b` `[k, n]`) on contiguous f32 elements, by the kernel that
/// is faster than gemm at this size, if one is: our few-row kernel for a decode step's rows
/// (`steer_heal_kernels::skinny`, `a · bᵀ` only), the system's OpenBLAS for `blas::MIN_ROWS` rows and more when
/// one is loaded (`steer_heal_kernels::blas`). `None`: gemm does it. The one dispatch of every frozen-weight
/// product, with or without autograd.
fn fast_product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, b_transposed: bool) -> Option<Vec<f32>> {
    if m == 0 {
        return None;
    }
    if b_transposed && m <= skinny::max_rows() {
        let mut y = vec![0f32; m * n];
        skinny::matmul_wt(a, b, &mut y, m, k, n);
        return Some(y);
    }
    let lib = blas::get()?;
    if m < blas::MIN_ROWS {
        return None;
    }
    lib.sgemm_new(a, b, m, k, n, b_transposed)
}

/// `fast_product` on two tensors when both are contiguous 2-D CPU f32 with matching inner sizes.
fn tensor_product(a: &Tensor, b: &Tensor, b_transposed: bool) -> candle_core::Result<Option<Tensor>> {
    if !a.device().is_cpu() || a.rank() != 2 || b.rank() != 2 {
        return Ok(None);
    }
    let (m, k) = a.dims2()?;
    let (n, kb) = if b_transposed { b.dims2()? } else { (b.dim(1)?, b.dim(0)?) };
    if k != kb {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*sa, &*sb) else {
        return Ok(None);
    };
    let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets()) else {
        return Ok(None);
    };
    match fast_product(&av[a0..a1], &bv[b0..b1], m, k, n, b_transposed) {
        Some(c) => Ok(Some(Tensor::from_vec(c, (m, n), a.device())?)),
        None => Ok(None),
    }
}

/// `x·Wᵀ` with `W` frozen: the gradient flows to `x` only. candle's own matmul backward always computes the
/// weight's gradient too (a full `xᵀ·g` product plus a weight-sized buffer), even for a constant weight; on a
/// training step that is a third of every frozen projection's work, the tied vocabulary head included.
/// For an input outside the autograd graph this is the plain product.
pub fn frozen_matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() || w.track_op() || x.rank() != 2 || w.rank() != 2 {
        return matmul_wt(x, w);
    }
    x.apply_op1(FrozenMatmulWt { w: w.clone() })
}

/// The custom op behind `frozen_matmul_wt`; it holds the frozen weight `[out, in]`.
struct FrozenMatmulWt {
    w: Tensor,
}

impl FrozenMatmulWt {
    /// `(batch, m, n, k)` of the product and the layout of `Wᵀ` as a strided view of the weight's storage.
    fn dims(&self, x_layout: &Layout, w_layout: &Layout) -> Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        Ok(((1, m, n, k), w_layout.transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenMatmulWt {
    fn name(&self) -> &'static str {
        "frozen-matmul-wt"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU");
        };
        let (bmnk, wt_layout) = self.dims(x_layout, w_layout)?;
        let (_, m, n, k) = bmnk;
        if let (CpuStorage::F32(xv), CpuStorage::F32(wv)) = (x, w) {
            if let (Some((x0, x1)), Some((w0, w1))) =
                (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
            {
                if let Some(y) = fast_product(&xv[x0..x1], &wv[w0..w1], m, k, n, true) {
                    return Ok((CpuStorage::F32(y), Shape::from((m, n))));
                }
            }
        }
        Ok((x.matmul(w, bmnk, x_layout, &wt_layout)?, Shape::from((m, n))))
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("frozen matmul: the weight is not on the GPU");
        };
        let (bmnk, wt_layout) = self.dims(x_layout, w_layout)?;
        Ok((x.matmul(w, bmnk, x_layout, &wt_layout)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        // y = x Wᵀ ⇒ ∂L/∂x = (∂L/∂y) W; no gradient for the frozen W.
        if !grad_y.track_op() {
            if let Some(g) = tensor_product(&grad_y.contiguous()?, &self.w, false)? {
                return Ok(Some(g));
            }
        }
        Ok(Some(grad_y.matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn merged_weight_equals_adapter_forward() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let mut lin = LoraLinear::new(w, None);
        for (i, gate) in [1.0, 0.5, 0.0].into_iter().enumerate() {
            lin.adapters.push(Adapter {
                name: format!("r{i}"),
                a: Tensor::randn(0f32, 1.0, (2, 4), &dev)?,
                b: Tensor::randn(0f32, 1.0, (6, 2), &dev)?,
                scale: 2.0,
                gate,
            });
        }
        let x = Tensor::randn(0f32, 1.0, (3, 5, 4), &dev)?;
        let y1 = lin.forward(&x)?;
        let mut merged = lin.clone();
        merged.merge()?;
        let y2 = merged.forward(&x)?;
        let diff = (y1 - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "diff {diff}");
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_candle_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        for rows in [3usize, 40] {
            let x = candle_core::Var::randn(0f32, 1.0, (rows, 5), &dev)?;
            let y_ref = x.as_tensor().matmul(&w.t()?)?;
            let y = frozen_matmul_wt(x.as_tensor(), &w)?;
            let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "forward diff {diff} at {rows} rows");
            let g_ref = y_ref.sqr()?.sum_all()?.backward()?;
            let g = y.sqr()?.sum_all()?.backward()?;
            let (g_ref, g) = (g_ref.get(&x).expect("ref grad"), g.get(&x).expect("grad"));
            let diff = (g - g_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradient diff {diff} at {rows} rows");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn all_gates_zero_gives_the_base_back_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let mut lin = LoraLinear::new(w.clone(), None);
        lin.adapters.push(Adapter {
            name: "r0".into(),
            a: Tensor::randn(0f32, 1.0, (2, 4), &dev)?,
            b: Tensor::randn(0f32, 1.0, (3, 2), &dev)?,
            scale: 2.0,
            gate: 0.0,
        });
        lin.merge()?;
        let same = (lin.weight - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0);
        Ok(())
    }
}
