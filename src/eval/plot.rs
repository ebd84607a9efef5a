//! The progress map of a run of rounds, drawn with plotters to PNG and SVG: x = authority, y = care (ln of mean
//! probability), one point per round from the unsteered base through each kept round joined in order, dropped
//! rounds as red crosses; below it the coherence panels (p_ans_any and json_is_valid with the floor, ppx_json)
//! over rounds. Also the `RoundPoint` record the loop hands in, and the rounds-file reader.
//!
//! Text in the PNG is drawn with DejaVu Sans embedded in the binary (plotters' `ab_glyph` feature needs a
//! registered font; see `font/LICENSE`); the SVG names the font family and leaves rendering to the viewer.

use super::bootstrap::{Intervals, Stat};
use super::metrics::Metrics;
use super::report::{nan_f64, opt_f64};
use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// File names written by `write_progress_map`.
pub use crate::session::layout::PROGRESS_PNG;
/// See `PROGRESS_PNG`.
pub use crate::session::layout::PROGRESS_SVG;

/// What became of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundStatus {
    /// The unsteered starting model (round 0).
    Base,
    /// Healed, evaluated and kept: part of the trajectory.
    Kept,
    /// Evaluated and dropped: shown, not joined.
    Dropped,
}

/// One round's numbers, as the progress map and gate-q2.md need them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundPoint {
    /// Round index (0 = base).
    pub round: usize,
    /// Base, kept or dropped.
    pub status: RoundStatus,
    /// ln p(Authority) (x).
    #[serde(with = "nan_f64")]
    pub authority: f64,
    /// ln p(Care) (y).
    #[serde(with = "nan_f64")]
    pub care: f64,
    /// Mass on the seven answers.
    #[serde(with = "nan_f64")]
    pub p_ans_any: f64,
    /// Fraction of json probes that parsed (None: not run).
    #[serde(with = "opt_f64", default)]
    pub json_is_valid: Option<f64>,
    /// Perplexity of the answer prefill.
    #[serde(with = "nan_f64")]
    pub ppx_json: f64,
    /// Items the eval scored.
    #[serde(default)]
    pub n: usize,
    /// Cumulative KL spent up to this round (nats).
    #[serde(with = "opt_f64", default)]
    pub kl_spent: Option<f64>,
    /// Cosine of this round's teacher vector with round 0's.
    #[serde(with = "opt_f64", default)]
    pub cos_teacher_r0: Option<f64>,
    /// Cosine of the student's shift with the teacher vector.
    #[serde(with = "opt_f64", default)]
    pub cos_student_teacher: Option<f64>,
    /// The round's control arms on the same eval items (`round-NN/controls.json`; empty when the round ran
    /// without controls, and in rounds files written before controls existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<ControlPoint>,
    /// 95 % intervals over vignettes of this eval's numbers (empty in rounds files written before them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ci: Intervals,
    /// Paired difference this − the base, on the same items (empty for the base, or when not comparable).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_base: Intervals,
    /// Paired difference this − the previous point of the trajectory (the model this round started from).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_prev: Intervals,
    /// Label of that previous point (`base`, `r2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

/// A control arm of a round: what the same eval items say under a comparison treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlArm {
    /// The round's student steered by the round's own vector at c* (the steering the round healed toward).
    Steered,
    /// The student steered by a random direction with the vector's per-layer norms at the same c*.
    Random,
    /// The student unsteered, with the positive persona as the system prompt.
    PromptOnly,
}

impl ControlArm {
    /// Every arm, in legend order.
    pub const ALL: [ControlArm; 3] = [ControlArm::Steered, ControlArm::Random, ControlArm::PromptOnly];

    /// Name in files and tables (`steered`, `random`, `prompt_only`).
    pub fn name(self) -> &'static str {
        match self {
            ControlArm::Steered => "steered",
            ControlArm::Random => "random",
            ControlArm::PromptOnly => "prompt_only",
        }
    }

    /// Legend text of the arm on the progress map.
    pub fn legend(self) -> &'static str {
        match self {
            ControlArm::Steered => "control: steered at c*",
            ControlArm::Random => "control: random vector at c*",
            ControlArm::PromptOnly => "control: prompt-only (persona prompt)",
        }
    }
}

/// One control arm's eval metrics (one entry of `round-NN/controls.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPoint {
    /// Which arm.
    pub arm: ControlArm,
    /// Steering coefficient the arm ran at (0 for the prompt-only arm).
    #[serde(with = "nan_f64", default)]
    pub coefficient: f64,
    /// Items the eval scored.
    #[serde(default)]
    pub n: usize,
    /// ln p(Authority).
    #[serde(with = "nan_f64")]
    pub authority: f64,
    /// ln p(Care).
    #[serde(with = "nan_f64")]
    pub care: f64,
    /// Mass on the seven answers.
    #[serde(with = "nan_f64")]
    pub p_ans_any: f64,
    /// Perplexity of the answer prefill.
    #[serde(with = "nan_f64")]
    pub ppx_json: f64,
    /// Fraction of json probes that parsed (None: not run).
    #[serde(with = "opt_f64", default)]
    pub json_is_valid: Option<f64>,
    /// 95 % intervals over vignettes of the arm's numbers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ci: Intervals,
    /// Paired difference arm − the round's own (healed) point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_round: Intervals,
    /// Paired difference steered arm − this arm (random and prompt-only arms): did steering with the round's
    /// vector move the numbers more than this control did?
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steered_minus: Intervals,
}

impl ControlPoint {
    /// An arm's point from its eval metrics.
    pub fn from_metrics(arm: ControlArm, coefficient: f64, m: &Metrics) -> Self {
        ControlPoint {
            arm,
            coefficient,
            n: m.n_rows,
            authority: m.authority,
            care: m.care,
            p_ans_any: m.p_ans_any,
            ppx_json: m.ppx_json,
            json_is_valid: m.json_is_valid,
            ci: Intervals::new(),
            vs_round: Intervals::new(),
            steered_minus: Intervals::new(),
        }
    }

    /// Whether it has a place on the progress map.
    pub fn on_map(&self) -> bool {
        self.authority.is_finite() && self.care.is_finite()
    }
}

/// Read a round's `controls.json` (a list of control points).
pub fn load_controls(path: &Path) -> Result<Vec<ControlPoint>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("not a controls file (a list of control arms): {e}")))
}

impl RoundPoint {
    /// A point from an eval's metrics; the loop fills the KL and cosine fields.
    pub fn from_metrics(round: usize, status: RoundStatus, m: &Metrics) -> Self {
        RoundPoint {
            round,
            status,
            authority: m.authority,
            care: m.care,
            p_ans_any: m.p_ans_any,
            json_is_valid: m.json_is_valid,
            ppx_json: m.ppx_json,
            n: m.n_rows,
            kl_spent: None,
            cos_teacher_r0: None,
            cos_student_teacher: None,
            controls: Vec::new(),
            ci: Intervals::new(),
            vs_base: Intervals::new(),
            vs_prev: Intervals::new(),
            prev: None,
        }
    }

    /// Short label: `base` or `r<round>`.
    pub fn label(&self) -> String {
        if self.status == RoundStatus::Base {
            "base".into()
        } else {
            format!("r{}", self.round)
        }
    }
}

/// The base point and the kept rounds, in round order: the trajectory the map joins.
pub fn trajectory(points: &[RoundPoint]) -> Vec<&RoundPoint> {
    let mut t: Vec<&RoundPoint> = points.iter().filter(|p| p.status != RoundStatus::Dropped).collect();
    t.sort_by_key(|p| (p.status != RoundStatus::Base, p.round));
    t
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RoundsFile {
    List(Vec<RoundPoint>),
    Object { rounds: Vec<RoundPoint> },
}

/// Read a rounds file: a JSON list of `RoundPoint`s, or an object with a `rounds` list.
pub fn load_rounds(path: &Path) -> Result<Vec<RoundPoint>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    let f: RoundsFile = serde_json::from_str(&text).map_err(|e| {
        Error::bad_file(
            path,
            format!("not a rounds file (a list of round points, or {{\"rounds\": [...]}}): {e}"),
        )
    })?;
    let pts = match f {
        RoundsFile::List(p) | RoundsFile::Object { rounds: p } => p,
    };
    if pts.is_empty() {
        return Err(Error::bad_file(path, "no rounds in the file"));
    }
    Ok(pts)
}

/// Register the embedded font once; plotters' text needs it.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("font/DejaVuSans.ttf"))
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the embedded plot font could not be loaded"))
    }
}

/// A padded [lo, hi] range around finite values (a unit range around 0 when there are none).
fn padded_range(vals: impl Iterator<Item = f64>, min_span: f64) -> (f64, f64) {
    let v: Vec<f64> = vals.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (-1.0, 1.0);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(min_span);
    let mid = (hi + lo) / 2.0;
    (mid - span * 0.6, mid + span * 0.6)
}

const KEPT: RGBColor = RGBColor(31, 90, 180);
const DROPPED: RGBColor = RGBColor(200, 30, 30);
const JSON_C: RGBColor = RGBColor(30, 140, 60);
const FLOOR_C: RGBColor = RGBColor(230, 120, 0);

/// Colour of a control arm (the same in the map and the coherence panel).
fn arm_color(arm: ControlArm) -> RGBColor {
    match arm {
        ControlArm::Steered => RGBColor(200, 90, 0),
        ControlArm::Random => RGBColor(110, 110, 110),
        ControlArm::PromptOnly => RGBColor(0, 150, 150),
    }
}

/// A control arm's marker outline around backend pixel `(x, y)`: a triangle (steered), a square (random) or a
/// diamond (prompt-only), outlined so a real round's filled circle stays visible beneath.
fn arm_shape(arm: ControlArm, (x, y): (i32, i32)) -> Vec<(i32, i32)> {
    match arm {
        ControlArm::Steered => vec![(x, y - 7), (x + 7, y + 5), (x - 7, y + 5), (x, y - 7)],
        ControlArm::Random => {
            vec![(x - 5, y - 5), (x + 5, y - 5), (x + 5, y + 5), (x - 5, y + 5), (x - 5, y - 5)]
        }
        ControlArm::PromptOnly => vec![(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y), (x, y - 7)],
    }
}

/// The 95 % interval bars of a point on the map: authority's horizontal, care's vertical (only those whose ends
/// are finite).
fn map_bars(ci: &Intervals, x: f64, y: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    if let Some(iv) = ci.get(&Stat::Authority).filter(|iv| iv.lo.is_finite() && iv.hi.is_finite()) {
        out.push(vec![(iv.lo, y), (iv.hi, y)]);
    }
    if let Some(iv) = ci.get(&Stat::Care).filter(|iv| iv.lo.is_finite() && iv.hi.is_finite()) {
        out.push(vec![(x, iv.lo), (x, iv.hi)]);
    }
    out
}

/// The interval ends of one stat over points and their arms (for the axis ranges).
fn ci_ends(points: &[RoundPoint], k: Stat) -> Vec<f64> {
    let ends = |ci: &Intervals| ci.get(&k).map(|iv| vec![iv.lo, iv.hi]).unwrap_or_default();
    points
        .iter()
        .flat_map(|p| ends(&p.ci).into_iter().chain(p.controls.iter().flat_map(|c| ends(&c.ci))))
        .collect()
}

/// Every round's control points of one arm, with their round.
fn arm_points(points: &[RoundPoint], arm: ControlArm) -> Vec<(&RoundPoint, &ControlPoint)> {
    points.iter().flat_map(|p| p.controls.iter().filter(move |c| c.arm == arm).map(move |c| (p, c))).collect()
}

/// Round axes label whole rounds only.
fn round_tick(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 && *x >= 0.0 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_map<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, points: &[RoundPoint]) -> DrawResult<DB> {
    let n = points.iter().map(|p| p.n).max().unwrap_or(0);
    let controls = || points.iter().flat_map(|p| p.controls.iter());
    let (x0, x1) = padded_range(
        points
            .iter()
            .map(|p| p.authority)
            .chain(controls().map(|c| c.authority))
            .chain(ci_ends(points, Stat::Authority)),
        0.2,
    );
    let (y0, y1) = padded_range(
        points.iter().map(|p| p.care).chain(controls().map(|c| c.care)).chain(ci_ends(points, Stat::Care)),
        0.2,
    );
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Progress map (tinymfv, n = {n} items)"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("authority = ln p(Authority)")
        .y_desc("care = ln p(Care)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let traj: Vec<(f64, f64)> = trajectory(points)
        .into_iter()
        .filter(|p| p.authority.is_finite() && p.care.is_finite())
        .map(|p| (p.authority, p.care))
        .collect();
    chart
        .draw_series(LineSeries::new(traj.clone(), KEPT.stroke_width(2)))?
        .label("base → kept rounds")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], KEPT.stroke_width(2)));
    // 95 % intervals (bootstrap over vignettes) as error bars in each point's colour, drawn beneath the markers.
    let mut bars: Vec<(Vec<(f64, f64)>, RGBColor)> = Vec::new();
    for p in points.iter().filter(|p| p.authority.is_finite() && p.care.is_finite()) {
        let c = match p.status {
            RoundStatus::Base => BLACK,
            RoundStatus::Kept => KEPT,
            RoundStatus::Dropped => DROPPED,
        };
        bars.extend(map_bars(&p.ci, p.authority, p.care).into_iter().map(|b| (b, c)));
        for a in p.controls.iter().filter(|a| a.on_map()) {
            bars.extend(map_bars(&a.ci, a.authority, a.care).into_iter().map(|b| (b, arm_color(a.arm))));
        }
    }
    if !bars.is_empty() {
        chart
            .draw_series(bars.into_iter().map(|(b, c)| PathElement::new(b, c.mix(0.6).stroke_width(1))))?
            .label("95 % intervals (bootstrap over vignettes)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6).stroke_width(1)));
    }
    chart.draw_series(
        trajectory(points).into_iter().filter(|p| p.authority.is_finite() && p.care.is_finite()).map(|p| {
            let c = if p.status == RoundStatus::Base { BLACK } else { KEPT };
            EmptyElement::at((p.authority, p.care))
                + Circle::new((0, 0), 6, c.filled())
                + Text::new(p.label(), (8, -16), ("sans-serif", 14))
        }),
    )?;
    let dropped: Vec<&RoundPoint> = points
        .iter()
        .filter(|p| p.status == RoundStatus::Dropped && p.authority.is_finite() && p.care.is_finite())
        .collect();
    chart
        .draw_series(dropped.iter().map(|p| {
            EmptyElement::at((p.authority, p.care))
                + Cross::new((0, 0), 7, DROPPED.stroke_width(3))
                + Text::new(
                    format!("{} (dropped)", p.label()),
                    (8, -16),
                    ("sans-serif", 14).into_font().color(&DROPPED),
                )
        }))?
        .label("dropped round")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, DROPPED.stroke_width(3)));
    // Control arms beside each round's real point: what the same items say steered without healing, under a
    // random direction, or with the persona only prompted. Only arms that exist get a legend entry.
    for arm in ControlArm::ALL {
        let pts: Vec<(&RoundPoint, &ControlPoint)> =
            arm_points(points, arm).into_iter().filter(|(_, c)| c.on_map()).collect();
        if pts.is_empty() {
            continue;
        }
        let color = arm_color(arm);
        chart
            .draw_series(pts.iter().map(|(p, c)| {
                EmptyElement::at((c.authority, c.care))
                    + PathElement::new(arm_shape(arm, (0, 0)), color.stroke_width(2))
                    + Text::new(p.label(), (8, 4), ("sans-serif", 12).into_font().color(&color))
            }))?
            .label(arm.legend())
            .legend(move |(x, y)| PathElement::new(arm_shape(arm, (x + 10, y)), color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// One coherence metric over rounds: kept/base points joined, dropped ones as crosses.
fn draw_over_rounds<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    points: &[RoundPoint],
    value: impl Fn(&RoundPoint) -> Option<f64>,
    color: RGBColor,
    name: &str,
) -> DrawResult<DB> {
    let line: Vec<(f64, f64)> = trajectory(points)
        .into_iter()
        .filter_map(|p| value(p).filter(|v| v.is_finite()).map(|v| (p.round as f64, v)))
        .collect();
    chart
        .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
        .label(name.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart.draw_series(line.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))?;
    chart.draw_series(
        points
            .iter()
            .filter(|p| p.status == RoundStatus::Dropped)
            .filter_map(|p| value(p).filter(|v| v.is_finite()).map(|v| (p.round as f64, v)))
            .map(|(x, y)| Cross::new((x, y), 5, DROPPED.stroke_width(2))),
    )?;
    Ok(())
}

fn draw_coherence<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    points: &[RoundPoint],
    floor: f64,
) -> DrawResult<DB> {
    let max_round = points.iter().map(|p| p.round).max().unwrap_or(0) as f64;
    let (left, right) = area.split_horizontally(area.dim_in_pixel().0 / 2);
    let mut rates = ChartBuilder::on(&left)
        .caption("coherence: answer mass and JSON validity", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.3..max_round + 0.3, 0.0..1.05)?;
    rates
        .configure_mesh()
        .x_desc("round")
        .x_label_formatter(&round_tick)
        .label_style(("sans-serif", 12))
        .draw()?;
    rates
        .draw_series(DashedLineSeries::new(
            vec![(-0.3, floor), (max_round + 0.3, floor)],
            6,
            4,
            FLOOR_C.stroke_width(2),
        ))?
        .label(format!("floor {floor:.3}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FLOOR_C.stroke_width(2)));
    draw_over_rounds(&mut rates, points, |p| Some(p.p_ans_any), KEPT, "p_ans_any")?;
    // p_ans_any's 95 % intervals as vertical bars at each round.
    rates.draw_series(points.iter().filter_map(|p| {
        let iv = p.ci.get(&Stat::PAnsAny).filter(|iv| iv.lo.is_finite() && iv.hi.is_finite())?;
        let c = if p.status == RoundStatus::Dropped { DROPPED } else { KEPT };
        let x = p.round as f64;
        Some(PathElement::new(vec![(x, iv.lo), (x, iv.hi)], c.mix(0.6).stroke_width(1)))
    }))?;
    draw_over_rounds(&mut rates, points, |p| p.json_is_valid, JSON_C, "json_is_valid")?;
    // The control arms' answer mass at their round, with the map's markers (the map's legend names them).
    for arm in ControlArm::ALL {
        rates.draw_series(
            arm_points(points, arm).into_iter().filter(|(_, c)| c.p_ans_any.is_finite()).map(|(p, c)| {
                EmptyElement::at((p.round as f64, c.p_ans_any))
                    + PathElement::new(arm_shape(arm, (0, 0)), arm_color(arm).stroke_width(2))
            }),
        )?;
    }
    rates
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    let (p0, p1) = padded_range(points.iter().map(|p| p.ppx_json), 0.5);
    let mut ppx = ChartBuilder::on(&right)
        .caption("coherence: ppx_json (prefill perplexity)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.3..max_round + 0.3, p0.max(0.0)..p1)?;
    ppx.configure_mesh()
        .x_desc("round")
        .x_label_formatter(&round_tick)
        .label_style(("sans-serif", 12))
        .draw()?;
    draw_over_rounds(&mut ppx, points, |p| Some(p.ppx_json), RGBColor(120, 60, 160), "ppx_json")?;
    ppx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// Draw the whole figure (map on top, coherence panels below) on any plotters backend.
fn draw_figure<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    points: &[RoundPoint],
    floor: f64,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let h = root.dim_in_pixel().1;
    let (top, bottom) = root.split_vertically(h * 62 / 100);
    draw_map(&top, points)?;
    draw_coherence(&bottom, points, floor)?;
    root.present()?;
    Ok(())
}

/// Figure size in pixels.
const SIZE: (u32, u32) = (1000, 900);

/// The progress figure as SVG text.
pub fn progress_svg(points: &[RoundPoint], floor: f64) -> Result<String> {
    ensure_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw_figure(root, points, floor)
            .map_err(|e| Error::invalid(format!("drawing the progress map: {e}")))?;
    }
    Ok(svg)
}

/// Write `progress.png` and `progress.svg` into `dir`, each atomically; returns their paths.
pub fn write_progress_map(points: &[RoundPoint], floor: f64, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if points.is_empty() {
        return Err(Error::invalid("no rounds to plot"));
    }
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
    let svg_path = dir.join(PROGRESS_SVG);
    crate::fsutil::atomic_write(&svg_path, progress_svg(points, floor)?.as_bytes())?;
    let png_path = dir.join(PROGRESS_PNG);
    // The bitmap backend picks the encoder from the extension, so the temporary name ends in .png too.
    let tmp = dir.join(format!(".{PROGRESS_PNG}.{}.tmp.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        draw_figure(root, points, floor)
            .map_err(|e| Error::bad_file(&png_path, format!("drawing failed: {e}")))?;
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::bad_file(&tmp, e))?;
    std::fs::rename(&tmp, &png_path).map_err(|e| Error::bad_file(&png_path, e))?;
    Ok((png_path, svg_path))
}
