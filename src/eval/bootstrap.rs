//! Intervals for the tinymfv numbers: a seeded bootstrap over vignettes, one eval's values with their 95 %
//! interval and the paired difference of two evals of the same items.
//!
//! The resampling unit is the vignette (an item's conditions travel together), drawn with replacement as many
//! times as there are vignettes; each resample re-aggregates the per-row summaries exactly as `compute_metrics`
//! does (`metrics::aggregate`, the one place that aggregates). A paired difference draws one set of vignettes
//! and aggregates both evals on it, so what the two share (the items' difficulty) cancels: a model compared with
//! itself differs by exactly 0 in every resample. Intervals are percentile intervals (numpy's linear
//! interpolation) over the resamples where the number is defined.

use super::metrics::{aggregate, Aggregate, RowSummary};
use super::report::RowRecord;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::stats::{percentile_interval, Interval, LEVEL, RESAMPLES, SEED};

/// A headline number that gets an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// ln p(Authority).
    Authority,
    /// ln p(Care).
    Care,
    /// Mass on the seven answers.
    PAnsAny,
    /// Perplexity of the answer prefill.
    PpxJson,
    /// Top-1 agreement with the human labels.
    Top1,
    /// Macro informedness against the human labels.
    Informedness,
}

impl Stat {
    /// Every stat, in table order.
    pub const ALL: [Stat; 6] =
        [Stat::Authority, Stat::Care, Stat::PAnsAny, Stat::PpxJson, Stat::Top1, Stat::Informedness];

    /// Name in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Stat::Authority => "authority",
            Stat::Care => "care",
            Stat::PAnsAny => "p_ans_any",
            Stat::PpxJson => "ppx_json",
            Stat::Top1 => "top1",
            Stat::Informedness => "informedness",
        }
    }

    /// Its value in an aggregate.
    pub fn of(self, a: &Aggregate) -> f64 {
        match self {
            Stat::Authority => a.authority(),
            Stat::Care => a.care(),
            Stat::PAnsAny => a.p_ans_any,
            Stat::PpxJson => a.ppx_json,
            Stat::Top1 => a.top1_acc,
            Stat::Informedness => a.informedness,
        }
    }
}

/// Intervals by stat (a JSON object keyed by stat name).
pub type Intervals = BTreeMap<Stat, Interval>;

/// The rows of each vignette, in first-appearance order.
fn clusters(rows: &[RowRecord]) -> Vec<Vec<usize>> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_id: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let e = by_id.entry(r.id.as_str()).or_default();
        if e.is_empty() {
            order.push(r.id.as_str());
        }
        e.push(i);
    }
    order.into_iter().map(|id| by_id.remove(id).unwrap_or_default()).collect()
}

/// Each resample's row indices: the rows of `clusters.len()` vignettes drawn with replacement.
fn resamples(clusters: &[Vec<usize>], n: usize, seed: u64) -> impl Iterator<Item = Vec<usize>> + '_ {
    crate::stats::draws(clusters.len(), n, seed)
        .map(move |units| units.iter().flat_map(|u| clusters[*u].iter().copied()).collect())
}

/// One eval's numbers with 95 % intervals over vignettes (`RESAMPLES` resamples, `SEED`).
pub fn intervals(rows: &[RowRecord]) -> Intervals {
    intervals_with(rows, RESAMPLES, SEED)
}

/// `intervals` with an explicit resample count and seed.
pub fn intervals_with(rows: &[RowRecord], n: usize, seed: u64) -> Intervals {
    let s: Vec<RowSummary> = rows.iter().map(RowSummary::of).collect();
    let full = aggregate(s.iter());
    let cl = clusters(rows);
    let mut draws: BTreeMap<Stat, Vec<f64>> = Stat::ALL.iter().map(|k| (*k, Vec::with_capacity(n))).collect();
    if !cl.is_empty() {
        for idx in resamples(&cl, n, seed) {
            let a = aggregate(idx.iter().map(|i| &s[*i]));
            for (k, v) in draws.iter_mut() {
                v.push(k.of(&a));
            }
        }
    }
    draws.into_iter().map(|(k, mut v)| (k, percentile_interval(k.of(&full), &mut v))).collect()
}

/// The paired difference `a − b` of two evals of the same items, with 95 % intervals over vignettes. The items
/// are matched by (vignette, condition); evals of different item sets cannot be paired (an error saying so).
pub fn paired_difference(a: &[RowRecord], b: &[RowRecord]) -> Result<Intervals> {
    paired_difference_with(a, b, RESAMPLES, SEED)
}

/// `paired_difference` with an explicit resample count and seed.
pub fn paired_difference_with(a: &[RowRecord], b: &[RowRecord], n: usize, seed: u64) -> Result<Intervals> {
    let key = |r: &RowRecord| (r.id.clone(), r.condition);
    let b_at: BTreeMap<_, usize> = b.iter().enumerate().map(|(i, r)| (key(r), i)).collect();
    if a.len() != b.len() || b_at.len() != b.len() {
        return Err(Error::invalid(format!(
            "the two evals hold different items ({} and {}): only evals of the same items can be paired",
            a.len(),
            b.len()
        )));
    }
    let mut pair = Vec::with_capacity(a.len());
    for r in a {
        let j = b_at.get(&key(r)).ok_or_else(|| {
            Error::invalid(format!(
                "item `{}` is in one eval and not the other: only evals of the same items can be paired",
                r.id
            ))
        })?;
        pair.push(*j);
    }
    let sa: Vec<RowSummary> = a.iter().map(RowSummary::of).collect();
    let sb: Vec<RowSummary> = pair.iter().map(|j| RowSummary::of(&b[*j])).collect();
    let (fa, fb) = (aggregate(sa.iter()), aggregate(sb.iter()));
    let cl = clusters(a);
    let mut draws: BTreeMap<Stat, Vec<f64>> = Stat::ALL.iter().map(|k| (*k, Vec::with_capacity(n))).collect();
    for idx in resamples(&cl, n, seed) {
        let ra = aggregate(idx.iter().map(|i| &sa[*i]));
        let rb = aggregate(idx.iter().map(|i| &sb[*i]));
        for (k, v) in draws.iter_mut() {
            v.push(k.of(&ra) - k.of(&rb));
        }
    }
    Ok(draws.into_iter().map(|(k, mut v)| (k, percentile_interval(k.of(&fa) - k.of(&fb), &mut v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data::{Condition, Foundation};
    use crate::eval::protocol::{AnswerCase, FrameOrder};
    use crate::eval::report::FrameRecord;

    /// A row whose both frames put mass `m` on the answers, shaped toward `top`, labelled `label`.
    fn row(id: &str, m: f64, top: usize, label: usize) -> RowRecord {
        let mut probs = [0.1 * m; 7];
        probs[top] = 0.4 * m;
        let frame = |order| FrameRecord {
            order,
            case: AnswerCase::Interrupted,
            lp: probs.map(f64::ln),
            pmass: probs.iter().sum(),
            nll_json: 1.0 - m,
            n_prefill_tokens: 12,
            think_tokens: 8,
            emitted_close: false,
            think_text: String::new(),
        };
        let mut human = [0.0; 7];
        human[label] = 100.0;
        RowRecord {
            id: id.into(),
            condition: Condition::OtherViolate,
            foundation: "Care (e)".into(),
            foundation_coarse: Foundation::Care,
            human,
            frames: vec![frame(FrameOrder::Forward), frame(FrameOrder::Reversed)],
        }
    }

    /// Rows with answer mass spread over [0.2, 0.8] by a fixed pattern.
    fn rows(n: usize) -> Vec<RowRecord> {
        (0..n)
            .map(|i| row(&format!("v{i}"), 0.2 + 0.6 * ((i * 37) % 11) as f64 / 10.0, i % 7, (i * 3) % 7))
            .collect()
    }

    /// Two vignettes with answer mass x1 < x2: every resample's mean is x1, (x1 + x2)/2 or x2 (chance 1/4, 1/2,
    /// 1/4), so with 2000 resamples the 2.5th and 97.5th percentiles are exactly x1 and x2.
    #[test]
    fn two_vignettes_give_the_hand_computed_interval() {
        let r = vec![row("a", 0.2, 0, 0), row("b", 0.6, 0, 0)];
        let iv = intervals_with(&r, 2000, SEED)[&Stat::PAnsAny];
        assert!((iv.value - 0.4).abs() < 1e-12, "{iv:?}");
        assert!((iv.lo - 0.2).abs() < 1e-12 && (iv.hi - 0.6).abs() < 1e-12, "{iv:?}");
        // One vignette: every resample is the vignette itself.
        let one = intervals_with(&r[..1], 100, SEED)[&Stat::PAnsAny];
        assert_eq!((one.lo, one.hi), (one.value, one.value));
    }

    /// The same seed draws the same vignettes: recomputing the mean by hand over those draws gives the interval.
    #[test]
    fn intervals_follow_the_seeded_draws() {
        let r = rows(12);
        let iv = intervals_with(&r, 500, 7)[&Stat::PAnsAny];
        let pm: Vec<f64> = r.iter().map(|x| x.frames[0].pmass).collect();
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let mut means: Vec<f64> =
            (0..500).map(|_| (0..12).map(|_| pm[rng.random_range(0..12)]).sum::<f64>() / 12.0).collect();
        let want = percentile_interval(iv.value, &mut means);
        assert!((iv.lo - want.lo).abs() < 1e-12 && (iv.hi - want.hi).abs() < 1e-12, "{iv:?} vs {want:?}");
        assert_eq!(iv.resamples, 500);
    }

    #[test]
    fn intervals_shrink_with_more_vignettes() {
        let (small, large) = (intervals(&rows(11)), intervals(&rows(176)));
        for k in [Stat::PAnsAny, Stat::Authority, Stat::Care, Stat::PpxJson] {
            let (ws, wl) = (small[&k].width(), large[&k].width());
            assert!(wl < 0.5 * ws, "{}: width {wl} at n = 176 vs {ws} at n = 11", k.name());
            assert!(small[&k].lo <= small[&k].value && small[&k].value <= small[&k].hi);
        }
    }

    #[test]
    fn a_model_paired_with_itself_differs_by_exactly_zero() {
        let r = rows(20);
        let d = paired_difference(&r, &r).expect("same items");
        for k in Stat::ALL {
            let iv = d[&k];
            assert_eq!((iv.value, iv.lo, iv.hi), (0.0, 0.0, 0.0), "{}", k.name());
            assert!(!iv.excludes_zero());
        }
    }

    #[test]
    fn pairing_cancels_what_the_items_share() {
        // b = a with every row's answer mass lowered by 0.05: the unpaired intervals overlap, the paired
        // difference is tight around 0.05 and excludes 0.
        let a = rows(40);
        let b: Vec<RowRecord> = a
            .iter()
            .map(|r| {
                let m = r.frames[0].pmass - 0.05;
                row(&r.id, m, 0, 0)
            })
            .collect();
        let d = paired_difference(&a, &b).expect("same items")[&Stat::PAnsAny];
        assert!((d.value - 0.05).abs() < 1e-9 && d.excludes_zero() && d.width() < 1e-9, "{d:?}");
        let (ia, ib) = (intervals(&a)[&Stat::PAnsAny], intervals(&b)[&Stat::PAnsAny]);
        assert!(ib.hi > ia.lo, "the unpaired intervals overlap: {ia:?} {ib:?}");
        let mut other = a.clone();
        other[3].id = "elsewhere".into();
        let err = paired_difference(&a, &other).expect_err("different items").to_string();
        assert!(err.contains("same items"), "{err}");
    }
}
