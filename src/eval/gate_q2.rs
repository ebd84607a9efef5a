//! The gate-Q2 artifact `gate-q2.md`: the rounds table (trait, coherence metrics, KL spent, cosines, kept or
//! dropped) and the verdict — did the trait move monotonically, in the intended direction, with coherence
//! (p_ans_any) at or above the floor, for at least `min_rounds` kept rounds in a row from the base.

use super::bootstrap::{Interval, Intervals, Stat};
use super::plot::{trajectory, ControlArm, RoundPoint, RoundStatus};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// File name of the artifact.
pub use crate::session::layout::GATE_Q2 as GATE_Q2_FILE;

/// Which progress-map axis is the trait being moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitAxis {
    /// ln p(Authority) (x).
    Authority,
    /// ln p(Care) (y).
    Care,
}

impl TraitAxis {
    /// The axis value of a round.
    pub fn value(self, p: &RoundPoint) -> f64 {
        match self {
            TraitAxis::Authority => p.authority,
            TraitAxis::Care => p.care,
        }
    }
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            TraitAxis::Authority => "authority",
            TraitAxis::Care => "care",
        }
    }
}

/// Which way the trait is meant to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Each kept round must be lower than the one before (care-over-authority lowers authority).
    Decrease,
    /// Each kept round must be higher than the one before.
    Increase,
}

/// The coherence floor on p_ans_any gate Q2 holds a round to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoherenceFloor {
    /// p_ans_any must be at least this value (`--floor`).
    Absolute(f64),
    /// p_ans_any must be at least this fraction of the base model's (`--floor-rel`, the default at 0.95): an
    /// absolute 0.95 would drop every round of a model like SmolLM2, whose base p_ans_any is about 0.27.
    Relative(f64),
}

impl Default for CoherenceFloor {
    fn default() -> Self {
        CoherenceFloor::Relative(0.95)
    }
}

impl CoherenceFloor {
    /// The p_ans_any a round needs, given the base's (NaN for a relative floor without a base value).
    pub fn threshold(self, base_p_ans_any: f64) -> f64 {
        match self {
            CoherenceFloor::Absolute(x) => x,
            CoherenceFloor::Relative(f) => f * base_p_ans_any,
        }
    }

    /// The floor in words, with its value resolved: `0.95 × base 0.268 = 0.255` or `0.5`.
    pub fn describe(self, base_p_ans_any: f64) -> String {
        match self {
            CoherenceFloor::Absolute(x) => format!("{x}"),
            CoherenceFloor::Relative(f) => {
                format!("{f} × base {} = {}", num(base_p_ans_any), num(self.threshold(base_p_ans_any)))
            }
        }
    }
}

/// The base point's p_ans_any (NaN when the points have no base).
pub fn base_p_ans_any(points: &[RoundPoint]) -> f64 {
    points.iter().find(|p| p.status == RoundStatus::Base).map(|p| p.p_ans_any).unwrap_or(f64::NAN)
}

/// What gate Q2 checks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateQ2Spec {
    /// The trait axis.
    pub axis: TraitAxis,
    /// Its intended direction.
    pub direction: Direction,
    /// Coherence floor on p_ans_any.
    pub floor: CoherenceFloor,
    /// Kept rounds in a row needed to pass.
    pub min_rounds: usize,
}

impl Default for GateQ2Spec {
    fn default() -> Self {
        GateQ2Spec {
            axis: TraitAxis::Authority,
            direction: Direction::Decrease,
            floor: CoherenceFloor::default(),
            min_rounds: 3,
        }
    }
}

/// The outcome of gate Q2.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether the run passed.
    pub passed: bool,
    /// Kept rounds in a row, from the base, that moved the trait the right way with coherence above the floor.
    pub run: usize,
    /// One line saying so, with the reason the run ended.
    pub line: String,
}

impl TraitAxis {
    /// The bootstrap stat of the axis.
    pub fn stat(self) -> Stat {
        match self {
            TraitAxis::Authority => Stat::Authority,
            TraitAxis::Care => Stat::Care,
        }
    }
}

impl Direction {
    /// Whether a paired difference moved this way: its whole 95 % interval on the intended side of 0.
    pub fn moved(self, d: &Interval) -> bool {
        match self {
            Direction::Decrease => d.hi < 0.0,
            Direction::Increase => d.lo > 0.0,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Direction::Decrease => "fell",
            Direction::Increase => "rose",
        }
    }
}

/// What a paired difference says, in words: `moved down`, `moved up` or `no detectable move (the interval spans 0)`.
pub fn moved_words(d: &Interval) -> &'static str {
    if !(d.lo.is_finite() && d.hi.is_finite()) {
        "not comparable"
    } else if d.hi < 0.0 {
        "moved down (95 % interval below 0)"
    } else if d.lo > 0.0 {
        "moved up (95 % interval above 0)"
    } else {
        "no detectable move (the 95 % interval spans 0)"
    }
}

/// Judge the rounds. A kept round counts only when the paired 95 % interval of its trait difference from the
/// previous point of the trajectory lies wholly on the intended side of 0 and its p_ans_any is at or above the
/// floor; point estimates alone never count as a move.
pub fn verdict(points: &[RoundPoint], spec: &GateQ2Spec) -> Verdict {
    let traj = trajectory(points);
    let axis = spec.axis.name();
    let word = spec.direction.word();
    let Some(base) = traj.first().filter(|p| p.status == RoundStatus::Base) else {
        return Verdict {
            passed: false,
            run: 0,
            line: "**Verdict: FAIL** — no base (round 0) point to start from.".into(),
        };
    };
    let floor = spec.floor.threshold(base.p_ans_any);
    let mut run = 0;
    let mut stop = None;
    for p in traj.iter().skip(1) {
        let prev = p.prev.clone().unwrap_or_else(|| "the previous point".into());
        let Some(d) = p.vs_prev.get(&spec.axis.stat()).filter(|d| d.lo.is_finite() && d.hi.is_finite())
        else {
            stop = Some(format!(
                "{} has no paired interval against {prev} (evals of different items, or a rounds file without \
                 intervals), so no move can be claimed",
                p.label()
            ));
            break;
        };
        if !spec.direction.moved(d) {
            stop = Some(format!("{}: Δ {axis} vs {prev} = {} — {}", p.label(), d.show(), moved_words(d)));
            break;
        }
        if p.p_ans_any.is_nan() || floor.is_nan() || p.p_ans_any < floor {
            stop = Some(format!(
                "{} p_ans_any {:.3} is under the floor {}",
                p.label(),
                p.p_ans_any,
                spec.floor.describe(base.p_ans_any)
            ));
            break;
        }
        run += 1;
    }
    if stop.is_none() && traj.len() == 1 {
        let dropped: Vec<String> =
            points.iter().filter(|p| p.status == RoundStatus::Dropped).map(RoundPoint::label).collect();
        stop = Some(if dropped.is_empty() {
            "the base: no round has been judged yet".into()
        } else {
            format!("the base: no round was kept ({} dropped)", dropped.join(", "))
        });
    }
    let passed = run >= spec.min_rounds;
    let head = if passed { "**Verdict: PASS**" } else { "**Verdict: FAIL**" };
    let tail = match stop {
        Some(s) => format!("; the run ended at {s}"),
        None => String::new(),
    };
    let line = format!(
        "{head} — {axis} {word} from each point of the trajectory to the next, with the paired 95 % interval of \
         the difference excluding 0, and p_ans_any ≥ {}, for {run} kept round(s) in a row from the base (needs ≥ \
         {}){tail}.",
        spec.floor.describe(base.p_ans_any),
        spec.min_rounds
    );
    Verdict { passed, run, line }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "—".into()
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(num).unwrap_or_else(|| "—".into())
}

/// A value with its interval when there is one.
fn with_ci(value: f64, ci: &Intervals, k: Stat) -> String {
    match ci.get(&k) {
        Some(iv) => iv.show(),
        None => num(value),
    }
}

/// A paired difference, or `—`.
fn diff(d: &Intervals, k: Stat) -> String {
    d.get(&k).map(Interval::show).unwrap_or_else(|| "—".into())
}

/// The markdown text of gate-q2.md.
pub fn gate_q2_markdown(points: &[RoundPoint], spec: &GateQ2Spec) -> String {
    let v = verdict(points, spec);
    let n = points.iter().map(|p| p.n).max().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(s, "# Gate Q2: does the trait move over rounds while coherence holds?\n");
    let _ = writeln!(s, "{}\n", v.line);
    for line in control_verdicts(points, spec) {
        let _ = writeln!(s, "{line}\n");
    }
    let _ = writeln!(
        s,
        "Trait axis: {} ({}), coherence floor p_ans_any ≥ {}, tinymfv items per eval: n = {n}. Authority and care \
         are ln of the mean probability the model names that foundation; compare only at equal n.\n",
        spec.axis.name(),
        match spec.direction {
            Direction::Decrease => "should decrease",
            Direction::Increase => "should increase",
        },
        spec.floor.describe(base_p_ans_any(points))
    );
    let _ = writeln!(
        s,
        "Every value is shown as `value [95 % interval]`: a seeded bootstrap over vignettes ({} resamples). A Δ \
         is a paired difference on the same items (this eval − the other, each resample drawing the same \
         vignettes for both); a move is claimed only when its interval excludes 0. `prev` is the model the \
         round started from (the last kept round before it, or the base).\n",
        super::bootstrap::RESAMPLES
    );
    let _ = writeln!(
        s,
        "| round | status | authority | Δ authority vs prev | Δ authority vs base | care | Δ care vs base | p_ans_any | Δ p_ans_any vs base | ppx_json | top-1 | informedness | json_is_valid | KL spent | cos(v_r, v_0) | cos(student, teacher) | n |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<&RoundPoint> = points.iter().collect();
    rows.sort_by_key(|p| (p.round, p.status != RoundStatus::Base));
    for p in rows {
        let status = match p.status {
            RoundStatus::Base => "base",
            RoundStatus::Kept => "kept",
            RoundStatus::Dropped => "dropped",
        };
        let prev = match &p.prev {
            Some(l) if !p.vs_prev.is_empty() => format!("{} (vs {l})", diff(&p.vs_prev, Stat::Authority)),
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {status} | {} | {prev} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.round,
            with_ci(p.authority, &p.ci, Stat::Authority),
            diff(&p.vs_base, Stat::Authority),
            with_ci(p.care, &p.ci, Stat::Care),
            diff(&p.vs_base, Stat::Care),
            with_ci(p.p_ans_any, &p.ci, Stat::PAnsAny),
            diff(&p.vs_base, Stat::PAnsAny),
            with_ci(p.ppx_json, &p.ci, Stat::PpxJson),
            p.ci.get(&Stat::Top1).map(Interval::show).unwrap_or_else(|| "—".into()),
            p.ci.get(&Stat::Informedness).map(Interval::show).unwrap_or_else(|| "—".into()),
            opt(p.json_is_valid),
            opt(p.kl_spent),
            opt(p.cos_teacher_r0),
            opt(p.cos_student_teacher),
            p.n
        );
    }
    controls_markdown(&mut s, points);
    let _ = writeln!(s, "\nThe progress map is in `progress.png` / `progress.svg` beside this file.");
    s
}

/// One sentence per round with controls: did steering with the round's vector move the trait more than the
/// random vector and more than the persona prompt, judged by the paired interval of steered − control?
fn control_verdicts(points: &[RoundPoint], spec: &GateQ2Spec) -> Vec<String> {
    let mut rows: Vec<&RoundPoint> = points.iter().filter(|p| !p.controls.is_empty()).collect();
    rows.sort_by_key(|p| p.round);
    let axis = spec.axis.name();
    let mut out = Vec::new();
    for p in rows {
        let mut parts = Vec::new();
        for c in p.controls.iter().filter(|c| c.arm != ControlArm::Steered) {
            let Some(d) = c.steered_minus.get(&spec.axis.stat()) else { continue };
            let judged = if spec.direction.moved(d) {
                format!("the vector moved {axis} more than the {} control", c.arm.name())
            } else if !(d.lo.is_finite() && d.hi.is_finite()) {
                format!("not comparable with the {} control", c.arm.name())
            } else {
                format!("indistinguishable from (or weaker than) the {} control", c.arm.name())
            };
            parts.push(format!("steered − {} = {} → {judged}", c.arm.name(), d.show()));
        }
        if !parts.is_empty() {
            out.push(format!("**Controls, {}** ({axis}): {}.", p.label(), parts.join("; ")));
        }
    }
    out
}

/// The control arms' table, when any round has them: each arm beside its round's real (healed) point, with the
/// arm's numbers, their paired differences from that point, and steered − arm.
fn controls_markdown(s: &mut String, points: &[RoundPoint]) {
    let mut rows: Vec<&RoundPoint> = points.iter().filter(|p| !p.controls.is_empty()).collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by_key(|p| p.round);
    let _ = writeln!(
        s,
        "\n## Control arms\n\nThe same eval items under comparison treatments: `steered` = the round's student steered \
         by the round's vector at c*, `random` = steered by a random direction with the same per-layer norms at the \
         same c*, `prompt_only` = unsteered with the positive persona as the system prompt. Δ = arm − the round's \
         own (real) point; `steered −` = the steered arm − this arm; both paired on the same items, with 95 % \
         intervals.\n"
    );
    let _ = writeln!(
        s,
        "| round | arm | coefficient | authority | Δ authority | steered − arm (authority) | care | Δ care | steered − arm (care) | p_ans_any | Δ p_ans_any | json_is_valid | ppx_json | n |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in rows {
        for c in &p.controls {
            let delta = |k: Stat, v: f64, own: f64| match c.vs_round.get(&k) {
                Some(iv) => iv.show(),
                None => num(v - own),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.round,
                c.arm.name(),
                num(c.coefficient),
                with_ci(c.authority, &c.ci, Stat::Authority),
                delta(Stat::Authority, c.authority, p.authority),
                diff(&c.steered_minus, Stat::Authority),
                with_ci(c.care, &c.ci, Stat::Care),
                delta(Stat::Care, c.care, p.care),
                diff(&c.steered_minus, Stat::Care),
                with_ci(c.p_ans_any, &c.ci, Stat::PAnsAny),
                delta(Stat::PAnsAny, c.p_ans_any, p.p_ans_any),
                opt(c.json_is_valid),
                num(c.ppx_json),
                c.n
            );
        }
    }
}

/// Write `dir/gate-q2.md` atomically; returns its path.
pub fn write_gate_q2(dir: &Path, points: &[RoundPoint], spec: &GateQ2Spec) -> Result<PathBuf> {
    if points.is_empty() {
        return Err(Error::invalid("no rounds to summarise"));
    }
    let path = dir.join(GATE_Q2_FILE);
    crate::fsutil::atomic_write(&path, gate_q2_markdown(points, spec).as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::plot::ControlPoint;

    fn iv(value: f64, half: f64) -> Interval {
        Interval { value, lo: value - half, hi: value + half, resamples: 2000 }
    }

    /// A point whose paired authority difference from `prev` is `d ± half`.
    fn pt(
        round: usize,
        status: RoundStatus,
        authority: f64,
        p_ans_any: f64,
        d: Option<(f64, f64)>,
    ) -> RoundPoint {
        let mut p = RoundPoint {
            round,
            status,
            authority,
            care: -1.0,
            p_ans_any,
            json_is_valid: Some(1.0),
            ppx_json: 3.0,
            n: 132,
            kl_spent: Some(0.3 * round as f64),
            cos_teacher_r0: None,
            cos_student_teacher: None,
            controls: vec![],
            ci: Intervals::new(),
            vs_base: Intervals::new(),
            vs_prev: Intervals::new(),
            prev: None,
        };
        p.ci.insert(Stat::Authority, iv(authority, 0.05));
        if let Some((d, half)) = d {
            p.vs_prev.insert(Stat::Authority, iv(d, half));
            p.prev = Some(if round == 1 { "base".into() } else { format!("r{}", round - 1) });
        }
        p
    }

    #[test]
    fn three_rounds_that_fell_beyond_their_intervals_pass_and_dropped_rounds_are_ignored() {
        let pts = vec![
            pt(0, RoundStatus::Base, -2.0, 0.99, None),
            pt(1, RoundStatus::Kept, -2.2, 0.98, Some((-0.2, 0.05))),
            pt(2, RoundStatus::Dropped, -1.0, 0.50, Some((1.0, 0.1))),
            pt(2, RoundStatus::Kept, -2.3, 0.97, Some((-0.1, 0.05))),
            pt(3, RoundStatus::Kept, -2.5, 0.96, Some((-0.2, 0.05))),
        ];
        let v = verdict(&pts, &GateQ2Spec::default());
        assert!(v.passed, "{}", v.line);
        assert_eq!(v.run, 3);
        let md = gate_q2_markdown(&pts, &GateQ2Spec::default());
        assert!(
            md.contains("| 2 | dropped | -1.000 [-1.050, -0.950] | 1.000 [0.900, 1.100] (vs r1) |"),
            "{md}"
        );
        assert!(md.contains("**Verdict: PASS**"));
        assert!(
            md.contains("interval of the difference excluding 0"),
            "the verdict says what a move means: {md}"
        );
        assert!(!md.contains("Control arms"), "no controls, no controls table");
    }

    #[test]
    fn a_fall_inside_its_interval_is_no_move() {
        // r2's point estimate fell (-2.2 → -2.25), but its paired interval spans 0: the run ends there.
        let pts = vec![
            pt(0, RoundStatus::Base, -2.0, 0.99, None),
            pt(1, RoundStatus::Kept, -2.2, 0.98, Some((-0.2, 0.05))),
            pt(2, RoundStatus::Kept, -2.25, 0.98, Some((-0.05, 0.08))),
        ];
        let v = verdict(&pts, &GateQ2Spec { min_rounds: 1, ..GateQ2Spec::default() });
        assert_eq!(v.run, 1);
        assert!(
            v.line.contains("r2: Δ authority vs r1 = -0.050 [-0.130, 0.030] — no detectable move"),
            "{}",
            v.line
        );
        // Without intervals (an old rounds file) nothing can be claimed.
        let mut old = pts.clone();
        old[1].vs_prev.clear();
        let v = verdict(&old, &GateQ2Spec { min_rounds: 1, ..GateQ2Spec::default() });
        assert!(!v.passed && v.run == 0 && v.line.contains("no paired interval"), "{}", v.line);
        // Only a dropped round: the verdict says so.
        let mut dropped = pts[..2].to_vec();
        dropped[1].status = RoundStatus::Dropped;
        let v = verdict(&dropped, &GateQ2Spec::default());
        assert!(v.line.contains("the run ended at the base: no round was kept (r1 dropped)"), "{}", v.line);
    }

    #[test]
    fn control_arms_are_listed_beside_their_round_with_the_steered_contrast() {
        let mut r1 = pt(1, RoundStatus::Kept, -2.2, 0.98, Some((-0.2, 0.05)));
        let arm = |arm, authority, care, steered_minus: Option<(f64, f64)>| {
            let mut c = ControlPoint {
                arm,
                coefficient: if arm == ControlArm::PromptOnly { 0.0 } else { 4.5 },
                n: 132,
                authority,
                care,
                p_ans_any: 0.9,
                ppx_json: 3.5,
                json_is_valid: None,
                ci: Intervals::new(),
                vs_round: Intervals::new(),
                steered_minus: Intervals::new(),
            };
            c.vs_round.insert(Stat::Authority, iv(authority - -2.2, 0.04));
            if let Some((d, h)) = steered_minus {
                c.steered_minus.insert(Stat::Authority, iv(d, h));
            }
            c
        };
        r1.controls = vec![
            arm(ControlArm::Steered, -2.5, -0.8, None),
            arm(ControlArm::Random, -2.1, -1.0, Some((-0.4, 0.1))),
            arm(ControlArm::PromptOnly, -2.0, -1.25, Some((-0.5, 0.6))),
        ];
        let md = gate_q2_markdown(&[pt(0, RoundStatus::Base, -2.0, 0.99, None), r1], &GateQ2Spec::default());
        assert!(md.contains("## Control arms"), "{md}");
        // Δ authority = -2.5 − (-2.2) with its interval; Δ care falls back to the point difference.
        assert!(
            md.contains("| 1 | steered | 4.500 | -2.500 | -0.300 [-0.340, -0.260] | — | -0.800 | 0.200 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | random | 4.500 | -2.100 | 0.100 [0.060, 0.140] | -0.400 [-0.500, -0.300] |"),
            "{md}"
        );
        assert!(
            md.contains("steered − random = -0.400 [-0.500, -0.300] → the vector moved authority more than the random control"),
            "{md}"
        );
        assert!(
            md.contains("steered − prompt_only = -0.500 [-1.100, 0.100] → indistinguishable from (or weaker than) the prompt_only control"),
            "{md}"
        );
    }

    #[test]
    fn coherence_under_the_relative_floor_ends_the_run() {
        let pts = vec![
            pt(0, RoundStatus::Base, -2.0, 0.30, None),
            pt(1, RoundStatus::Kept, -2.2, 0.29, Some((-0.2, 0.05))),
            pt(2, RoundStatus::Kept, -2.4, 0.27, Some((-0.2, 0.05))),
        ];
        // 0.95 × 0.30 = 0.285: r1 holds, r2 does not.
        let v = verdict(&pts, &GateQ2Spec::default());
        assert_eq!(v.run, 1);
        assert!(
            v.line.contains("r2 p_ans_any 0.270 is under the floor 0.95 × base 0.300 = 0.285"),
            "{}",
            v.line
        );
        let abs = GateQ2Spec { floor: CoherenceFloor::Absolute(0.2), min_rounds: 2, ..GateQ2Spec::default() };
        assert!(verdict(&pts, &abs).passed);
        let up = GateQ2Spec { direction: Direction::Increase, min_rounds: 1, ..abs };
        let v = verdict(&pts, &up);
        assert!(!v.passed && v.line.contains("moved down"), "{}", v.line);
    }
}
