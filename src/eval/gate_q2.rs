//! The gate-Q2 artifact `gate-q2.md`: the rounds table (trait, coherence metrics, KL spent, cosines, kept or
//! dropped) and the verdict — did the trait move monotonically, in the intended direction, with coherence
//! (p_ans_any) at or above the floor, for at least `min_rounds` kept rounds in a row from the base.

use super::plot::{trajectory, RoundPoint, RoundStatus};
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

/// Judge the rounds.
pub fn verdict(points: &[RoundPoint], spec: &GateQ2Spec) -> Verdict {
    let traj = trajectory(points);
    let axis = spec.axis.name();
    let word = match spec.direction {
        Direction::Decrease => "fell",
        Direction::Increase => "rose",
    };
    let Some(base) = traj.first().filter(|p| p.status == RoundStatus::Base) else {
        return Verdict {
            passed: false,
            run: 0,
            line: "**Verdict: FAIL** — no base (round 0) point to start from.".into(),
        };
    };
    let floor = spec.floor.threshold(base.p_ans_any);
    let mut prev = spec.axis.value(base);
    let mut run = 0;
    let mut stop = None;
    for p in traj.iter().skip(1) {
        let v = spec.axis.value(p);
        let moved = match spec.direction {
            Direction::Decrease => v < prev,
            Direction::Increase => v > prev,
        };
        if !(v.is_finite() && prev.is_finite()) {
            stop = Some(format!("{} has no finite {axis}", p.label()));
            break;
        }
        if !moved {
            stop = Some(format!("{} {axis} did not follow ({prev:.3} → {v:.3})", p.label()));
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
        prev = v;
    }
    let passed = run >= spec.min_rounds;
    let head = if passed { "**Verdict: PASS**" } else { "**Verdict: FAIL**" };
    let tail = match stop {
        Some(s) => format!("; the run ended at {s}"),
        None => String::new(),
    };
    let line = format!(
        "{head} — {axis} {word} monotonically with p_ans_any ≥ {} for {run} kept round(s) in a row from the base \
         (needs ≥ {}){tail}.",
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

/// The markdown text of gate-q2.md.
pub fn gate_q2_markdown(points: &[RoundPoint], spec: &GateQ2Spec) -> String {
    let v = verdict(points, spec);
    let n = points.iter().map(|p| p.n).max().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(s, "# Gate Q2: does the trait move over rounds while coherence holds?\n");
    let _ = writeln!(s, "{}\n", v.line);
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
        "| round | status | authority | care | p_ans_any | json_is_valid | ppx_json | KL spent | cos(v_r, v_0) | cos(student, teacher) | n |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<&RoundPoint> = points.iter().collect();
    rows.sort_by_key(|p| (p.round, p.status != RoundStatus::Base));
    for p in rows {
        let status = match p.status {
            RoundStatus::Base => "base",
            RoundStatus::Kept => "kept",
            RoundStatus::Dropped => "dropped",
        };
        let _ = writeln!(
            s,
            "| {} | {status} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.round,
            num(p.authority),
            num(p.care),
            num(p.p_ans_any),
            opt(p.json_is_valid),
            num(p.ppx_json),
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

/// The control arms' table, when any round has them: each arm beside its round's real (healed) point, with the
/// arm's authority and care relative to that point.
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
         own (real) point.\n"
    );
    let _ = writeln!(
        s,
        "| round | arm | coefficient | authority | Δ authority | care | Δ care | p_ans_any | json_is_valid | ppx_json | n |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for p in rows {
        for c in &p.controls {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.round,
                c.arm.name(),
                num(c.coefficient),
                num(c.authority),
                num(c.authority - p.authority),
                num(c.care),
                num(c.care - p.care),
                num(c.p_ans_any),
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

    fn pt(round: usize, status: RoundStatus, authority: f64, p_ans_any: f64) -> RoundPoint {
        RoundPoint {
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
        }
    }

    #[test]
    fn three_falling_coherent_rounds_pass_and_dropped_rounds_are_ignored() {
        let pts = vec![
            pt(0, RoundStatus::Base, -2.0, 0.99),
            pt(1, RoundStatus::Kept, -2.2, 0.98),
            pt(2, RoundStatus::Dropped, -1.0, 0.50),
            pt(2, RoundStatus::Kept, -2.3, 0.97),
            pt(3, RoundStatus::Kept, -2.5, 0.96),
        ];
        let v = verdict(&pts, &GateQ2Spec::default());
        assert!(v.passed, "{}", v.line);
        assert_eq!(v.run, 3);
        let md = gate_q2_markdown(&pts, &GateQ2Spec::default());
        assert!(md.contains("| 2 | dropped | -1.000 |"), "{md}");
        assert!(md.contains("**Verdict: PASS**"));
        assert!(!md.contains("Control arms"), "no controls, no controls table");
    }

    #[test]
    fn control_arms_are_listed_beside_their_round() {
        use crate::eval::plot::{ControlArm, ControlPoint};
        let mut r1 = pt(1, RoundStatus::Kept, -2.2, 0.98);
        let arm = |arm, authority, care| ControlPoint {
            arm,
            coefficient: if arm == ControlArm::PromptOnly { 0.0 } else { 4.5 },
            n: 132,
            authority,
            care,
            p_ans_any: 0.9,
            ppx_json: 3.5,
            json_is_valid: None,
        };
        r1.controls = vec![
            arm(ControlArm::Steered, -2.5, -0.8),
            arm(ControlArm::Random, -2.1, -1.0),
            arm(ControlArm::PromptOnly, -2.0, -1.25),
        ];
        let md = gate_q2_markdown(&[pt(0, RoundStatus::Base, -2.0, 0.99), r1], &GateQ2Spec::default());
        assert!(md.contains("## Control arms"), "{md}");
        // Δ authority = -2.5 − (-2.2); Δ care = -0.8 − (-1.0).
        assert!(
            md.contains(
                "| 1 | steered | 4.500 | -2.500 | -0.300 | -0.800 | 0.200 | 0.900 | — | 3.500 | 132 |"
            ),
            "{md}"
        );
        assert!(md.contains("| 1 | random | 4.500 | -2.100 | 0.100 |"), "{md}");
        assert!(md.contains("| 1 | prompt_only | 0.000 | -2.000 | 0.200 | -1.250 | -0.250 |"), "{md}");
    }

    #[test]
    fn coherence_under_the_floor_or_a_reversal_ends_the_run() {
        let pts = vec![
            pt(0, RoundStatus::Base, -2.0, 0.99),
            pt(1, RoundStatus::Kept, -2.2, 0.98),
            pt(2, RoundStatus::Kept, -2.4, 0.90),
            pt(3, RoundStatus::Kept, -2.6, 0.97),
        ];
        let v = verdict(&pts, &GateQ2Spec::default());
        assert!(!v.passed);
        assert_eq!(v.run, 1);
        assert!(v.line.contains("r2 p_ans_any 0.900 is under the floor"), "{}", v.line);
        let rising = vec![pt(0, RoundStatus::Base, -2.0, 0.99), pt(1, RoundStatus::Kept, -1.9, 0.99)];
        let v = verdict(&rising, &GateQ2Spec::default());
        assert_eq!(v.run, 0);
        assert!(v.line.contains("did not follow"));
        let up = GateQ2Spec { direction: Direction::Increase, min_rounds: 1, ..GateQ2Spec::default() };
        assert!(verdict(&rising, &up).passed);
    }
}
