//! Refusing non-finite numbers where they enter: a NaN in a vector, logits, a KL trace or a loss is an error
//! that says what and where, never a value that later arithmetic turns into a plausible 0.

use crate::error::{Error, Result};

/// Index and value of the first NaN or infinity in `values`.
pub fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values.iter().copied().enumerate().find(|(_, v)| !v.is_finite())
}

/// `Ok` when every value is finite; otherwise an error naming `what` (a closure, so the happy path formats
/// nothing), the element's index and its value.
pub fn ensure_finite(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    match first_non_finite(values) {
        None => Ok(()),
        Some((i, v)) => {
            Err(Error::invalid(format!("{} is {v} at element {i} (values must be finite)", what())))
        }
    }
}

/// Like `ensure_finite`, for a whole tensor (moved to the CPU as f32 only to be checked).
pub fn ensure_finite_tensor(t: &candle_core::Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let v = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    ensure_finite(&v, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_bad_element() {
        assert!(ensure_finite(&[0.0, 1.0, -2.5], || "x".into()).is_ok());
        let e = ensure_finite(&[0.0, f32::NAN, f32::INFINITY], || "tensor `layer1.v`".into())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(e, "tensor `layer1.v` is NaN at element 1 (values must be finite)");
        assert_eq!(first_non_finite(&[1.0, f32::NEG_INFINITY]), Some((1, f32::NEG_INFINITY)));
    }
}
