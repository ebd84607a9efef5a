//! Hooks in the layer loop: read the residual stream after chosen blocks, and add `c · v_L` after block L.
//! An empty `Hooks` is checked once per layer and costs nothing else.

use candle_core::Tensor;
use std::collections::BTreeMap;

/// Which positions a capture keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePositions {
    /// Every position: `[b, t, hidden]`.
    All,
    /// Only the last position of the input (the last real token under left padding): `[b, hidden]`.
    Last,
}

/// Capture the residual stream after each listed block.
#[derive(Debug, Clone)]
pub struct Capture {
    /// 0-based block indices.
    pub layers: Vec<usize>,
    /// Positions kept.
    pub positions: CapturePositions,
}

/// Add `coeff · vector` to the residual stream after block `layer`.
#[derive(Debug, Clone)]
pub struct Steer {
    /// 0-based block index.
    pub layer: usize,
    /// Direction `[hidden]`.
    pub vector: Tensor,
    /// One coefficient for the whole batch, or one per batch row.
    pub coeffs: Vec<f32>,
    /// Only positions with absolute index ≥ `start` are steered (0 = every position).
    pub start: usize,
}

/// All hooks for one forward pass.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Residual captures, if any.
    pub capture: Option<Capture>,
    /// Residual additions.
    pub steer: Vec<Steer>,
}

impl Hooks {
    /// No hooks.
    pub fn none() -> Self {
        Self::default()
    }
    /// Steer the given layers with per-layer vectors and one shared coefficient.
    pub fn steer(vectors: &BTreeMap<usize, Tensor>, coeff: f32) -> Self {
        Self {
            capture: None,
            steer: vectors
                .iter()
                .map(|(l, v)| Steer { layer: *l, vector: v.clone(), coeffs: vec![coeff], start: 0 })
                .collect(),
        }
    }
    /// Steer with one coefficient per batch row.
    pub fn steer_rows(vectors: &BTreeMap<usize, Tensor>, coeffs: Vec<f32>) -> Self {
        Self {
            capture: None,
            steer: vectors
                .iter()
                .map(|(l, v)| Steer { layer: *l, vector: v.clone(), coeffs: coeffs.clone(), start: 0 })
                .collect(),
        }
    }
    /// Capture the given layers.
    pub fn capture(layers: Vec<usize>, positions: CapturePositions) -> Self {
        Self { capture: Some(Capture { layers, positions }), steer: Vec::new() }
    }
    /// True when nothing is hooked.
    pub fn is_empty(&self) -> bool {
        self.capture.is_none() && self.steer.is_empty()
    }
}
