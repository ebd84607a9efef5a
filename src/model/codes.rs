//! A frozen weight's GGUF block codes kept beside its f32 tensor, for the decode step's few-row products.
//!
//! At batch 1 a decode step streams every weight once, so its speed is bytes per weight; the demo model's GGUF
//! codes its projections in 4-bit blocks (Q4_1) and its tied head in 8-bit ones (Q8_0), a fifth and a quarter of
//! f32's bytes. The products read the codes (`steer_heal_kernels::skinny::matmul_wt_codes`) and give exactly the
//! f32 kernel's result on the dequantised weight (the values are the same, bit for bit: `blocks`' notes), so
//! nothing numeric changes; everything else (prefill, training, the eval's merged copy) keeps using the tensor.
//!
//! The codes describe one tensor: they name it (`TensorId`), and a layer whose weight is replaced (a merge, a
//! bake) no longer matches them, so stale codes are never read.

use super::lora::contiguous_f32;
use candle_core::{DType, Result, Storage, Tensor, TensorId};
use std::sync::Arc;
use steer_heal_kernels::blocks::BlockRows;
use steer_heal_kernels::skinny;

/// The block codes of one weight tensor `[out, in]`.
#[derive(Debug, Clone)]
pub struct WeightCodes {
    of: TensorId,
    rows: Arc<BlockRows>,
}

impl WeightCodes {
    /// Codes for `weight`, when they can serve its products: a contiguous CPU f32 tensor of the codes' shape.
    pub fn for_weight(weight: &Tensor, rows: Arc<BlockRows>) -> Option<Self> {
        let fits = weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && weight.is_contiguous()
            && weight.dims() == [rows.rows(), rows.cols()];
        fits.then(|| Self { of: weight.id(), rows })
    }

    /// Bytes the codes hold.
    pub fn bytes(&self) -> usize {
        self.rows.bytes()
    }

    /// `x · weightᵀ` from the codes, for `x` `[rows, in]`, when they still describe `weight` and this is a decode
    /// step's product: a few rows (`skinny::max_rows`) of contiguous CPU f32, outside the autograd graph. `None`:
    /// the caller's f32 path does it.
    pub fn product(&self, x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
        if weight.id() != self.of || x.rank() != 2 || x.track_op() || !x.device().is_cpu() {
            return Ok(None);
        }
        let (m, k) = x.dims2()?;
        if m == 0 || m > skinny::max_rows() || k != self.rows.cols() {
            return Ok(None);
        }
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
        let Some(xv) = contiguous_f32(cpu, layout) else { return Ok(None) };
        let n = self.rows.rows();
        let mut y = vec![0f32; m * n];
        skinny::matmul_wt_codes(xv, &self.rows, &mut y, m);
        drop(storage);
        Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use steer_heal_kernels::blocks::Coding;

    /// A Q4_1 weight `[n, k]` quantised by candle: its codes and its dequantised tensor.
    fn q4_1_weight(n: usize, k: usize) -> Result<(Arc<BlockRows>, Tensor)> {
        let t = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::Q4_1)?;
        let rows = BlockRows::from_ggml(Coding::Q4_1, &q.data()?, n, k).map_err(candle_core::Error::wrap)?;
        Ok((Arc::new(rows), q.dequantize(&Device::Cpu)?))
    }

    #[test]
    fn serves_few_row_products_of_its_own_tensor_only() -> Result<()> {
        let (rows, w) = q4_1_weight(40, 64)?;
        let codes = WeightCodes::for_weight(&w, rows.clone()).expect("codes fit the tensor");
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu)?;
        let y = codes.product(&x, &w)?.expect("a decode step's product");
        let want = crate::model::lora::matmul_wt(&x, &w)?;
        assert_eq!(y.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "not the f32 kernel's product");
        // Another tensor (a merged weight), a graph input, too many rows, a wrong shape: not from the codes.
        let merged = (&w + 0.0)?;
        assert!(codes.product(&x, &merged)?.is_none());
        let tracked = Var::from_tensor(&x)?;
        assert!(codes.product(tracked.as_tensor(), &w)?.is_none());
        let many = Tensor::zeros((skinny::max_rows() + 1, 64), DType::F32, &Device::Cpu)?;
        assert!(codes.product(&many, &w)?.is_none());
        assert!(WeightCodes::for_weight(&w.t()?.contiguous()?, rows.clone()).is_none());
        assert!(WeightCodes::for_weight(&w.to_dtype(DType::BF16)?, rows).is_none());
        Ok(())
    }
}
