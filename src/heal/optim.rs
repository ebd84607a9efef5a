//! AdamW over the LoRA variables with its moments held here, so a checkpoint can save and restore the
//! optimiser exactly (candle's own AdamW keeps them private), and the cosine learning-rate schedule with linear
//! warm-up.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), PyTorch's update order:
/// `θ ← θ(1 − lr·wd)`, `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
/// `θ ← θ − lr · m̂ / (√v̂ + ε)` with bias-corrected `m̂, v̂`.
pub struct AdamW {
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Optimiser steps taken.
    pub step: usize,
    /// First and second moments per variable name (f32).
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// Zero moments for the given variables.
    pub fn new(vars: &[(String, &Var)], betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for (name, v) in vars {
            let z = Tensor::zeros(v.dims(), DType::F32, v.device())?;
            moments.insert(name.clone(), (z.clone(), z));
        }
        Ok(AdamW { betas, eps, weight_decay, step: 0, moments })
    }

    /// One update at learning rate `lr` with gradients by variable name (all must be present).
    pub fn step(&mut self, vars: &[(String, &Var)], grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (name, var) in vars {
            let g = grads
                .get(name)
                .ok_or_else(|| Error::invalid(format!("no gradient for `{name}`")))?
                .to_dtype(DType::F32)?;
            let (m, v) = self
                .moments
                .get_mut(name)
                .ok_or_else(|| Error::invalid(format!("no moments for `{name}`")))?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&*m / bc1)?;
            let v_hat = (&*v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let theta = var.as_detached_tensor().to_dtype(DType::F32)?;
            let theta =
                if self.weight_decay > 0.0 { (theta * (1.0 - lr * self.weight_decay))? } else { theta };
            let next = (theta - (update * lr)?)?;
            var.set(&next.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warm-up over `ceil(ratio·total)` steps
/// reaching `peak` at the end of warm-up, then a half cosine to 0 at `total`.
pub fn cosine_lr(peak: f64, step: usize, total: usize, warmup_ratio: f64) -> f64 {
    let warm = (warmup_ratio * total as f64).ceil() as usize;
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let span = total.saturating_sub(warm).max(1);
    let progress = (step - warm) as f64 / span as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lrs: Vec<f64> = (0..20).map(|s| cosine_lr(1.0, s, 20, 0.1)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!(lrs[2] <= 1.0 && lrs[2] > 0.99);
        assert!(lrs.windows(2).skip(1).all(|w| w[1] <= w[0]));
        assert!(lrs[19] > 0.0 && lrs[19] < 0.01);
    }

    #[test]
    fn matches_a_hand_rolled_adamw_step() -> Result<()> {
        let v = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu)?;
        let vars = vec![("w".to_string(), &v)];
        let mut opt = AdamW::new(&vars, (0.9, 0.95), 1e-8, 0.1)?;
        let mut grads = BTreeMap::new();
        grads.insert("w".to_string(), Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?);
        opt.step(&vars, &grads, 0.01)?;
        opt.step(&vars, &grads, 0.01)?;
        // Two steps with a constant gradient: m̂ = g, v̂ = g², so each step moves by lr·sign(g) after decay.
        let mut want = [1.0f64, -2.0];
        for _ in 0..2 {
            for (w, g) in want.iter_mut().zip([0.5f64, -1.0]) {
                *w *= 1.0 - 0.01 * 0.1;
                *w -= 0.01 * g / (g.abs() + 1e-8);
            }
        }
        let got: Vec<f32> = v.as_tensor().to_vec1()?;
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(opt.step, 2);
        Ok(())
    }
}
