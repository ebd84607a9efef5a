//! Per-layer key/value cache for incremental decoding, with truncation so a completion can be rewound to
//! token t and replayed without recomputing its prefix.

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Growth step of the preallocated buffers, in positions: capacity is rounded up to a multiple of it and at least
/// doubles on each growth, so appending one token per step copies the cache O(log n) times instead of every step.
const GROWTH: usize = 64;

/// One layer's keys and values: buffers `[b, kv_heads, capacity, head_dim]` whose first `len` positions (the
/// cache's length) are valid. New positions are written in place; tensors that carry gradients are concatenated
/// instead, since an in-place write is invisible to autograd.
#[derive(Debug)]
pub(crate) struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims().get(2).copied().unwrap_or(0)
    }
    fn tracked(&self) -> bool {
        self.k.track_op() || self.v.track_op()
    }
}

/// Keys and values of every layer, `[b, kv_heads, len, head_dim]` each.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    pad: Vec<usize>,
}

impl Clone for KvCache {
    /// A deep copy: the buffers are written in place, so a clone sharing them would see the other's writes.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| match (l.k.copy(), l.v.copy()) {
                    (Ok(k), Ok(v)) => LayerKv { k, v },
                    // A copy only fails when memory runs out; fall back to sharing rather than panicking.
                    _ => LayerKv { k: l.k.clone(), v: l.v.clone() },
                })
            })
            .collect();
        KvCache { layers, len: self.len, pad: self.pad.clone() }
    }
}

impl KvCache {
    /// An empty cache for `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: (0..n_layers).map(|_| None).collect(), len: 0, pad: Vec::new() }
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
    /// Append this call's keys and values `[b, kv_heads, t, head_dim]` of layer `i` after the cached positions
    /// and return every position's keys and values so far. The cache's length advances in `advance`, once all
    /// layers have appended.
    pub(crate) fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let len = self.len;
        let slot =
            self.layers.get_mut(i).ok_or_else(|| Error::invalid(format!("the cache has no layer {i}")))?;
        let t = k.dim(2)?;
        let fits = |l: &LayerKv| {
            let (kd, nd) = (l.k.dims(), k.dims());
            kd.len() == 4 && nd.len() == 4 && kd[0] == nd[0] && kd[1] == nd[1] && kd[3] == nd[3]
        };
        if len == 0 {
            // A fresh prefill may have another batch size: keep the buffers only when they fit.
            if slot.as_ref().map(|l| !fits(l) || l.tracked()).unwrap_or(false) {
                *slot = None;
            }
        }
        if k.track_op() || v.track_op() || slot.as_ref().map(LayerKv::tracked).unwrap_or(false) {
            let (nk, nv) = match slot.as_ref() {
                Some(l) if len > 0 => (
                    Tensor::cat(&[&l.k.narrow(2, 0, len)?, k], 2)?,
                    Tensor::cat(&[&l.v.narrow(2, 0, len)?, v], 2)?,
                ),
                _ => (k.clone(), v.clone()),
            };
            *slot = Some(LayerKv { k: nk.clone(), v: nv.clone() });
            return Ok((nk, nv));
        }
        let need = len + t;
        let grow = match slot.as_ref() {
            None => true,
            Some(l) => l.capacity() < need,
        };
        if grow {
            let old_cap = slot.as_ref().map(LayerKv::capacity).unwrap_or(0);
            let cap = need.max(2 * old_cap).div_ceil(GROWTH) * GROWTH;
            let fresh = |cur: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                let empty = Tensor::zeros((b, h, cap - len, d), new.dtype(), new.device())?;
                Ok(match cur {
                    Some(c) if len > 0 => Tensor::cat(&[&c.narrow(2, 0, len)?, &empty], 2)?,
                    _ => Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?,
                })
            };
            let nk = fresh(slot.as_ref().map(|l| &l.k), k)?;
            let nv = fresh(slot.as_ref().map(|l| &l.v), v)?;
            *slot = Some(LayerKv { k: nk, v: nv });
        }
        let l = slot.as_ref().ok_or_else(|| Error::invalid("cache layer missing after growth"))?;
        if !fits(l) {
            return Err(Error::invalid(format!(
                "cached keys have shape {:?}, new keys {:?}",
                l.k.dims(),
                k.dims()
            )));
        }
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        Ok((l.k.narrow(2, 0, need)?, l.v.narrow(2, 0, need)?))
    }
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
    /// Drop every position at or after `len` (rewind).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::invalid(format!("cannot rewind a cache of {} positions to {len}", self.len)));
        }
        for l in self.layers.iter_mut() {
            // Differentiable caches are exact-length tensors; preallocated buffers keep their capacity and
            // positions past `len` are overwritten by the next append.
            if let Some(kv) = l.as_mut() {
                if kv.tracked() {
                    if len == 0 {
                        *l = None;
                    } else {
                        kv.k = kv.k.narrow(2, 0, len)?;
                        kv.v = kv.v.narrow(2, 0, len)?;
                    }
                }
            }
        }
        self.len = len;
        Ok(())
    }
    /// Keep only the given batch rows (e.g. to fork one completion out of a batch).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let len = self.len;
        let pick = |t: &Tensor| -> Result<Tensor> {
            let idx =
                Tensor::from_vec(rows.iter().map(|r| *r as u32).collect::<Vec<_>>(), rows.len(), t.device())?;
            // The whole buffer: index-select needs a contiguous input, and the copy keeps the capacity.
            Ok(t.index_select(&idx, 0)?)
        };
        let mut out = KvCache::new(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            out.layers[i] = match l {
                Some(l) if len > 0 => Some(LayerKv { k: pick(&l.k)?, v: pick(&l.v)? }),
                _ => None,
            };
        }
        out.len = len;
        out.pad = if self.pad.is_empty() { vec![] } else { rows.iter().map(|r| self.pad[*r]).collect() };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn step(cache: &mut KvCache, value: f32, t: usize) -> Result<Tensor> {
        let k = Tensor::full(value, (2, 1, t, 3), &Device::Cpu)?;
        let (all_k, _) = cache.append(0, &k, &k)?;
        cache.advance(t);
        Ok(all_k)
    }

    fn positions(k: &Tensor) -> Vec<f32> {
        let row: Vec<Vec<f32>> = k.get(0).and_then(|r| r.get(0)).and_then(|r| r.to_vec2()).expect("row");
        row.iter().map(|p| p[0]).collect()
    }

    #[test]
    fn appends_past_capacity_truncates_and_clones_keep_their_own_positions() -> Result<()> {
        let mut cache = KvCache::new(1);
        step(&mut cache, 1.0, 60)?;
        // crosses the first 64-position buffer
        let k = step(&mut cache, 2.0, 10)?;
        assert_eq!(k.dims(), &[2, 1, 70, 3]);
        assert_eq!(positions(&k)[58..62], [1.0, 1.0, 2.0, 2.0]);
        let snapshot = cache.clone();
        cache.truncate(61)?;
        let k = step(&mut cache, 3.0, 1)?;
        assert_eq!(positions(&k)[59..], [1.0, 2.0, 3.0]);
        // the clone made before the rewind still sees its own tokens
        let mut snapshot = snapshot;
        let k = step(&mut snapshot, 4.0, 1)?;
        assert_eq!(positions(&k)[60..], [2.0; 10].iter().chain([4.0].iter()).copied().collect::<Vec<_>>());
        let one = cache.select_rows(&[1])?;
        assert_eq!(one.len(), 62);
        Ok(())
    }
}
