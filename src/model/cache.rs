//! Per-layer key/value cache for incremental decoding, with truncation so a completion can be rewound to
//! token t and replayed without recomputing its prefix.

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Keys and values of every layer, `[b, kv_heads, len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    len: usize,
    pad: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![(None, None); n_layers], len: 0, pad: Vec::new() }
    }
    /// Number of cached positions (the next call's position offset).
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Left padding the cache was built with.
    pub fn pad(&self) -> &[usize] {
        &self.pad
    }
    pub(crate) fn set_pad(&mut self, pad: Vec<usize>) {
        self.pad = pad;
    }
    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut (Option<Tensor>, Option<Tensor>) {
        &mut self.layers[i]
    }
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
    /// Drop every position at or after `len` (rewind).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::invalid(format!("cannot rewind a cache of {} positions to {len}", self.len)));
        }
        if len == self.len {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut() {
            if len == 0 {
                *k = None;
                *v = None;
            } else {
                if let Some(t) = k.as_mut() {
                    *t = t.narrow(2, 0, len)?;
                }
                if let Some(t) = v.as_mut() {
                    *t = t.narrow(2, 0, len)?;
                }
            }
        }
        self.len = len;
        Ok(())
    }
    /// Keep only the given batch rows (e.g. to fork one completion out of a batch).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let dev_idx = |t: &Tensor| -> Result<Tensor> {
            let idx =
                Tensor::from_vec(rows.iter().map(|r| *r as u32).collect::<Vec<_>>(), rows.len(), t.device())?;
            Ok(t.index_select(&idx, 0)?)
        };
        let mut out = KvCache::new(self.layers.len());
        for (i, (k, v)) in self.layers.iter().enumerate() {
            out.layers[i] = (k.as_ref().map(dev_idx).transpose()?, v.as_ref().map(dev_idx).transpose()?);
        }
        out.len = self.len;
        out.pad = if self.pad.is_empty() { vec![] } else { rows.iter().map(|r| self.pad[*r]).collect() };
        Ok(out)
    }
}
