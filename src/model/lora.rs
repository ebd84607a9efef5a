//! LoRA-ready linear layers: a frozen base weight plus any number of low-rank adapters, each with its own
//! scale α/r and a runtime gate c, so one model can carry several rounds at once, train one of them, or have
//! them merged into the weight.

use super::codes::WeightCodes;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::Arc;
use steer_heal_kernels::blas::{self, Product};
use steer_heal_kernels::blocks::BlockRows;
use steer_heal_kernels::skinny;

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
    /// The weight's GGUF block codes, when it was read from them: a decode step's frozen product reads these
    /// (a fifth of the bytes, the same values).
    pub codes: Option<WeightCodes>,
}

impl LoraLinear {
    /// A plain linear with no adapters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapters: Vec::new(), codes: None }
    }

    /// The same layer with its weight's block codes beside it (`codes` when they fit the weight).
    pub fn with_codes(mut self, codes: Option<Arc<BlockRows>>) -> Self {
        self.codes = codes.and_then(|c| WeightCodes::for_weight(&self.weight, c));
        self
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
        let y = match self.blas_forward(&x2, sel)? {
            Some(y) => y,
            None => self.composed_forward(&x2, sel)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        y.reshape(out_dims)
    }

    /// `x Wᵀ + Σ s_i (x A_iᵀ) B_iᵀ` for `x` `[rows, d_in]`, one candle op per product, scale and sum (no bias).
    fn composed_forward(&self, x2: &Tensor, sel: Adapters) -> Result<Tensor> {
        let mut y = frozen_matmul_wt_coded(x2, &self.weight, self.codes.as_ref())?;
        for ad in self.active(sel) {
            // Scale the rank-r product, not the d_out-wide one: one small pass instead of a wide one each way. The
            // adapter may be f32 over a bf16 base (its trained copy): it runs in its own dtype, then joins y's.
            let xa = if x2.dtype() == ad.a.dtype() { x2.clone() } else { x2.to_dtype(ad.a.dtype())? };
            let low = (xa.matmul(&ad.a.t()?)? * (ad.gate * ad.scale))?;
            let up = low.matmul(&ad.b.t()?)?;
            let up = if up.dtype() == y.dtype() { up } else { up.to_dtype(y.dtype())? };
            y = (y + up)?;
        }
        Ok(y)
    }

    /// The adapters a pass with `sel` applies.
    fn active<'s>(&'s self, sel: Adapters<'s>) -> impl Iterator<Item = &'s Adapter> + 's {
        self.adapters.iter().filter(move |ad| ad.gate != 0.0 && sel.applies(ad))
    }

    /// The whole adapted projection as OpenBLAS products into one output, when it applies (`LoraProduct`): a CPU
    /// f32 layer with at least one active adapter, at most one of them trained, `blas::MIN_ROWS` rows or more and
    /// a BLAS loaded. `None`: `composed_forward` does it.
    fn blas_forward(&self, x2: &Tensor, sel: Adapters) -> Result<Option<Tensor>> {
        let active: Vec<&Adapter> = self.active(sel).collect();
        if active.is_empty() || blas::get().is_none() || x2.dim(0)? < blas::MIN_ROWS {
            return Ok(None);
        }
        let contiguous_cpu_f32 =
            |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        if !contiguous_cpu_f32(x2) || !contiguous_cpu_f32(&self.weight) {
            return Ok(None);
        }
        if active.iter().any(|ad| !contiguous_cpu_f32(&ad.a) || !contiguous_cpu_f32(&ad.b)) {
            return Ok(None);
        }
        let trains = |ad: &&Adapter| ad.a.track_op() || ad.b.track_op();
        let (trained, frozen): (Vec<&Adapter>, Vec<&Adapter>) = active.into_iter().partition(trains);
        if trained.len() > 1 || self.weight.track_op() {
            return Ok(None);
        }
        let op = LoraProduct {
            w: self.weight.clone(),
            frozen: frozen
                .iter()
                .map(|ad| (ad.a.clone(), ad.b.clone(), (ad.gate * ad.scale) as f32))
                .collect(),
            trained_scale: trained.first().map(|ad| (ad.gate * ad.scale) as f32),
            trained_u: Default::default(),
        };
        Ok(Some(match trained.first() {
            Some(ad) => x2.apply_op3(&ad.a, &ad.b, op)?,
            None if x2.track_op() => x2.apply_op1(op)?,
            None => x2.apply_op1_no_bwd(&op)?,
        }))
    }

    /// Fold every active adapter into the base weight and drop them (`W ← W + Σ c_i (α_i/r_i) B_i A_i`).
    pub fn merge(&mut self) -> Result<()> {
        let mut w = self.weight.clone();
        for ad in &self.adapters {
            if ad.gate != 0.0 {
                w = (w + ad.delta_weight()?.detach().to_dtype(self.weight.dtype())?)?;
            }
        }
        if w.id() != self.weight.id() {
            // The codes describe the old weight (they would not be read, but they would be held).
            self.codes = None;
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
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        return Ok(None);
    };
    let (Some(av), Some(bv)) = (contiguous_f32(sa, la), contiguous_f32(sb, lb)) else {
        return Ok(None);
    };
    match fast_product(av, bv, m, k, n, b_transposed) {
        Some(c) => Ok(Some(Tensor::from_vec(c, (m, n), a.device())?)),
        None => Ok(None),
    }
}

/// `frozen_matmul_wt`, from `W`'s block codes when it has them and this is a decode step's product.
pub fn frozen_matmul_wt_coded(x: &Tensor, w: &Tensor, codes: Option<&WeightCodes>) -> Result<Tensor> {
    if let Some(c) = codes {
        if let Some(y) = c.product(x, w)? {
            return Ok(y);
        }
    }
    frozen_matmul_wt(x, w)
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
        if let (Some(xv), Some(wv)) = (contiguous_f32(x, x_layout), contiguous_f32(w, w_layout)) {
            if let Some(y) = fast_product(xv, wv, m, k, n, true) {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
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

/// One adapted projection `y = x Wᵀ + Σ s_i (x A_iᵀ) B_iᵀ` as OpenBLAS products written into one output, with
/// one backward pass that writes `dx`, `dA` and `dB`.
///
/// Why: composed from candle ops, each adapter costs two gemm products, a scale, a `d_out`-wide add and a fresh
/// output forward, and as many again backward (gradients through the add, both products and the scale), on ~200
/// adapted projections per training pass. Here the rank-r products accumulate into the frozen product's output
/// (β = 1) and the gradients are five products, the input's accumulated the same way.
///
/// The frozen weight and the frozen adapters (earlier rounds', or every adapter of a reference pass) are held
/// by the op; the trained adapter's `A` `[r, d_in]` and `B` `[d_out, r]` are its second and third arguments
/// when there is one (`trained_scale`), so candle's backward hands their gradients to the optimiser.
struct LoraProduct {
    /// Frozen base weight `[d_out, d_in]`.
    w: Tensor,
    /// Frozen adapters: `A`, `B` and the factor `gate · α/r`.
    frozen: Vec<(Tensor, Tensor, f32)>,
    /// The trained adapter's `gate · α/r`, when the op has one (as its second and third arguments).
    trained_scale: Option<f32>,
    /// The forward pass's `s_t (x A_tᵀ)` `[m, r]` for the trained adapter, kept for `dB = Gᵀ · s_t (x A_tᵀ)`
    /// so the backward does not compute it again (one of its five rank-r products).
    trained_u: std::sync::Mutex<Option<Vec<f32>>>,
}

/// The elements of f32 CPU storage under a contiguous layout; `None` for another dtype or a strided layout.
pub(super) fn contiguous_f32<'s>(s: &'s CpuStorage, l: &Layout) -> Option<&'s [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((o0, o1))) => Some(&v[o0..o1]),
        _ => None,
    }
}

/// A copy of a small tensor's f32 elements (the trained adapter's `A` and `B`; the weight and activations are
/// read in place, `with_f32`).
fn copy_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the contiguous f32 elements of a CPU tensor without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(storage_f32(s, layout)?),
        _ => candle_core::bail!("lora product: an operand is not contiguous CPU f32"),
    }
}

/// The contiguous f32 elements of a storage argument of a custom op.
fn storage_f32<'s>(s: &'s CpuStorage, l: &Layout) -> Result<&'s [f32]> {
    contiguous_f32(s, l)
        .ok_or_else(|| candle_core::Error::Msg("lora product: an operand is not contiguous CPU f32".into()))
}

/// The BLAS the op runs on (`blas_forward` only builds the op when there is one).
fn lib() -> Result<&'static blas::Blas> {
    blas::get().ok_or_else(|| candle_core::Error::Msg("lora product: no BLAS loaded".into()))
}

/// `Some(v)` or the op's error for a product OpenBLAS refused (sizes beyond a C `int`).
fn done<T>(v: Option<T>) -> Result<T> {
    v.ok_or_else(|| candle_core::Error::Msg("lora product: a product too large for the BLAS".into()))
}

/// `Ok` or the op's error for a product OpenBLAS refused (`done`).
fn check(ok: bool) -> Result<()> {
    done(ok.then_some(()))
}

impl LoraProduct {
    /// `x Wᵀ + Σ_frozen s (x Aᵀ) Bᵀ (+ s_t (x A_tᵀ) B_tᵀ)` for `x` `[m, k]`.
    fn forward(&self, x: &[f32], m: usize, trained: Option<(&[f32], &[f32])>) -> Result<(Vec<f32>, Shape)> {
        let lib = lib()?;
        let (n, k) = self.w.dims2()?;
        if x.len() != m * k {
            candle_core::bail!("lora product: input has {} elements, expected {m} × {k}", x.len());
        }
        let mut y = with_f32(&self.w, |w| done(lib.product_new(Product::new(m, n, k).bt(), x, w)))?;
        let mut add = |a: &[f32], b: &[f32], s: f32| -> Result<Vec<f32>> {
            let r = a.len() / k;
            let u = done(lib.product_new(Product::new(m, r, k).bt().scaled(s), x, a))?;
            check(lib.product_into(Product::new(m, n, r).bt(), &u, b, 1.0, &mut y))?;
            Ok(u)
        };
        for (a, b, s) in &self.frozen {
            with_f32(a, |a| with_f32(b, |b| add(a, b, *s)))?;
        }
        if let (Some((a, b)), Some(s)) = (trained, self.trained_scale) {
            let u = add(a, b, s)?;
            *self.trained_u.lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
        }
        Ok((y, Shape::from((m, n))))
    }

    /// The gradients for `G = ∂L/∂y` `[m, n]`: `dx = G W + Σ s (G B) A` when `x` needs one, and for the trained
    /// adapter `dA = s (G B)ᵀ x`, `dB = s Gᵀ (x Aᵀ)`.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        trained: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lib = lib()?;
        let (n, k) = self.w.dims2()?;
        let m = x.dim(0)?;
        let grad = grad.contiguous()?;
        let dev = x.device();
        with_f32(&grad, |g| {
            with_f32(x, |xv| {
                // G B_i scaled, for each adapter: [m, r_i] (the trained one's is `dA`'s factor too).
                let gb = |b: &[f32], s: f32| {
                    done(lib.product_new(Product::new(m, b.len() / n, n).scaled(s), g, b))
                };
                let mut d_a = None;
                let mut d_b = None;
                let mut gb_trained = None;
                if let (Some((a, b)), Some(s)) = (trained, self.trained_scale) {
                    let r = a.dim(0)?;
                    let (av, bv) = (copy_f32(a)?, copy_f32(b)?);
                    let gbt = gb(&bv, s)?;
                    if a.track_op() {
                        let v = done(lib.product_new(Product::new(r, k, m).at(), &gbt, xv))?;
                        d_a = Some(Tensor::from_vec(v, (r, k), dev)?);
                    }
                    if b.track_op() {
                        let kept = self.trained_u.lock().unwrap_or_else(|e| e.into_inner()).take();
                        let u = match kept {
                            Some(u) if u.len() == m * r => u,
                            _ => done(lib.product_new(Product::new(m, r, k).bt().scaled(s), xv, &av))?,
                        };
                        let v = done(lib.product_new(Product::new(n, r, m).at(), g, &u))?;
                        d_b = Some(Tensor::from_vec(v, (n, r), dev)?);
                    }
                    gb_trained = Some((gbt, av));
                }
                let d_x = if x.track_op() {
                    let mut dx = with_f32(&self.w, |w| done(lib.product_new(Product::new(m, k, n), g, w)))?;
                    for (a, b, s) in &self.frozen {
                        let gbf = with_f32(b, |b| gb(b, *s))?;
                        let r = gbf.len() / m;
                        with_f32(a, |a| {
                            check(lib.product_into(Product::new(m, k, r), &gbf, a, 1.0, &mut dx))
                        })?;
                    }
                    if let Some((gbt, av)) = &gb_trained {
                        let r = gbt.len() / m;
                        check(lib.product_into(Product::new(m, k, r), gbt, av, 1.0, &mut dx))?;
                    }
                    Some(Tensor::from_vec(dx, (m, k), dev)?)
                } else {
                    None
                };
                Ok((d_x, d_a, d_b))
            })
        })
    }
}

impl CustomOp1 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, _) = x_layout.shape().dims2()?;
        let (y, shape) = self.forward(storage_f32(x, x_layout)?, m, None)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(x, None, grad_y)?.0)
    }
}

impl CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product-trained"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, _) = x_layout.shape().dims2()?;
        let trained = (storage_f32(a, a_layout)?, storage_f32(b, b_layout)?);
        let (y, shape) = self.forward(storage_f32(x, x_layout)?, m, Some(trained))?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, Some((a, b)), grad_y)
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

    /// The BLAS path of an adapted projection equals the composed candle ops in value and in every gradient: a
    /// trained adapter over a frozen one (gate ½) with and without an input gradient, the frozen ones alone with
    /// and without one (a reference pass), and `Adapters::Without` leaving the trained one out.
    #[test]
    fn blas_lora_product_matches_the_composed_ops_in_value_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, r, rows) = (40, 24, 4, blas::MIN_ROWS + 6);
        let mut lin = LoraLinear::new(Tensor::randn(0f32, 1.0, (n, k), &dev)?, None);
        lin.adapters.push(Adapter {
            name: "r0".into(),
            a: Tensor::randn(0f32, 1.0, (r, k), &dev)?,
            b: Tensor::randn(0f32, 1.0, (n, r), &dev)?,
            scale: 2.0,
            gate: 0.5,
        });
        let a = candle_core::Var::randn(0f32, 1.0, (r + 1, k), &dev)?;
        let b = candle_core::Var::randn(0f32, 1.0, (n, r + 1), &dev)?;
        lin.adapters.push(Adapter {
            name: "r1".into(),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.75,
            gate: 1.0,
        });
        let x = candle_core::Var::randn(0f32, 1.0, (rows, k), &dev)?;
        let frozen_x = x.as_tensor().detach();
        let max_diff =
            |p: &Tensor, q: &Tensor| -> Result<f32> { (p - q)?.abs()?.max_all()?.to_scalar::<f32>() };
        for (input, sel) in [
            (x.as_tensor(), Adapters::AsGated),
            (&frozen_x, Adapters::AsGated),
            (x.as_tensor(), Adapters::Without("r1")),
            (&frozen_x, Adapters::Without("r1")),
        ] {
            let case = format!("input tracked {}, {sel:?}", input.track_op());
            let fused = lin.blas_forward(input, sel)?;
            assert_eq!(
                fused.is_some(),
                blas::get().is_some(),
                "{case}: the BLAS path is taken when there is a BLAS"
            );
            let Some(y) = fused else { continue };
            let y_ref = lin.composed_forward(input, sel)?;
            let scale = y_ref.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(max_diff(&y, &y_ref)? < 1e-5 * scale, "{case}: forward");
            // A loss whose gradient is not uniform, so every product of the backward pass is exercised.
            let weights = Tensor::randn(0f32, 1.0, (rows, n), &dev)?;
            let g = (&y * &weights)?.sum_all()?.backward()?;
            let g_ref = (&y_ref * &weights)?.sum_all()?.backward()?;
            for (var, what) in [(&x, "x"), (&a, "A"), (&b, "B")] {
                match (g.get(var.as_tensor()), g_ref.get(var.as_tensor())) {
                    (Some(got), Some(want)) => {
                        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                        assert!(scale > 0.0, "{case}: d{what} is not zero");
                        assert!(max_diff(got, want)? < 1e-5 * scale, "{case}: d{what}");
                    }
                    (None, None) => {}
                    (got, want) => panic!("{case}: d{what} present {} vs {}", got.is_some(), want.is_some()),
                }
            }
        }
        // An input below `blas::MIN_ROWS` rows goes the composed way.
        assert!(lin.blas_forward(&x.as_tensor().narrow(0, 0, 8)?, Adapters::AsGated)?.is_none());
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
