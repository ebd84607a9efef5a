//! The iterate screen (gate Q2): the progress map as a chart (x = authority, y = care; the kept trajectory joined
//! from the base, dropped rounds as crosses), the coherence numbers and the rounds table with the lineage.

use super::super::app::iterate::IterateView;
use super::super::app::State;
use crate::eval::{RoundPoint, RoundStatus};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Row, Table, Widget, Wrap};

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "–".into()
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(fmt).unwrap_or_else(|| "–".into())
}

/// `[lo, hi]` around the finite values, padded so single points sit inside the frame.
fn bounds(xs: impl Iterator<Item = f64>) -> [f64; 2] {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return [-1.0, 0.0];
    }
    let pad = ((hi - lo) * 0.1).max(0.05);
    [lo - pad, hi + pad]
}

/// Chart points `(authority, care)`.
type Xy = Vec<(f64, f64)>;

/// The kept trajectory (base, then the current chain in order) and the other judged rounds.
fn split(v: &IterateView) -> (Xy, Xy) {
    let mut path = Vec::new();
    let mut other = Vec::new();
    for p in &v.points {
        let xy = (p.authority, p.care);
        let on_path = p.status == RoundStatus::Base || v.chain.contains(&(p.round as u32));
        if on_path {
            path.push(xy);
        } else {
            other.push(xy);
        }
    }
    (path, other)
}

fn chart(v: &IterateView, area: Rect, buf: &mut Buffer) {
    let (path, other) = split(v);
    let selected: Vec<(f64, f64)> = v.current().map(|p| vec![(p.authority, p.care)]).unwrap_or_default();
    let xb = bounds(v.points.iter().map(|p| p.authority));
    let yb = bounds(v.points.iter().map(|p| p.care));
    let datasets = vec![
        Dataset::default()
            .name("kept")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::default().fg(Color::Cyan))
            .data(&path),
        Dataset::default()
            .name("dropped / left")
            .marker(Marker::Dot)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(Color::Red))
            .data(&other),
        Dataset::default()
            .name("selected")
            .marker(Marker::Block)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(Color::Yellow))
            .data(&selected),
    ];
    let label = |b: [f64; 2]| vec![Line::from(format!("{:.2}", b[0])), Line::from(format!("{:.2}", b[1]))];
    Chart::new(datasets)
        .block(Block::bordered().title(" progress map: authority → / care ↑ (ln p) "))
        .x_axis(Axis::default().title("authority").bounds(xb).labels(label(xb)))
        .y_axis(Axis::default().title("care").bounds(yb).labels(label(yb)))
        .render(area, buf);
}

fn status(v: &IterateView, p: &RoundPoint) -> String {
    let s = match p.status {
        RoundStatus::Base => "base",
        RoundStatus::Kept if v.chain.contains(&(p.round as u32)) => "kept",
        RoundStatus::Kept => "kept (left)",
        RoundStatus::Dropped => "dropped",
    };
    s.into()
}

fn table(v: &IterateView, area: Rect, buf: &mut Buffer) {
    let header =
        Row::new(["", "round", "status", "auth", "care", "p_ans", "json", "ppx", "KL", "cos v0", "cos sh"])
            .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = v.points.iter().enumerate().map(|(i, p)| {
        let row = Row::new(vec![
            if i == v.selected { "›".to_string() } else { " ".to_string() },
            p.round.to_string(),
            status(v, p),
            fmt(p.authority),
            fmt(p.care),
            fmt(p.p_ans_any),
            fmt_opt(p.json_is_valid),
            fmt(p.ppx_json),
            fmt_opt(p.kl_spent),
            fmt_opt(p.cos_teacher_r0),
            fmt_opt(p.cos_student_teacher),
        ]);
        if i == v.selected {
            row.style(Style::default().add_modifier(Modifier::REVERSED))
        } else {
            row
        }
    });
    let widths = [
        Constraint::Length(1),
        Constraint::Length(5),
        Constraint::Length(11),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    let title =
        format!(" rounds · branch {} · n = {} ", v.branch, v.points.first().map(|p| p.n).unwrap_or(0));
    Table::new(rows, widths).header(header).block(Block::bordered().title(title)).render(area, buf);
}

/// Draw the iterate screen into `area`.
pub fn main(s: &State, area: Rect, buf: &mut Buffer) {
    let Some(v) = &s.iterate else { return };
    if v.points.is_empty() {
        let text = if v.running.is_some() {
            "running the first round… (the base is evaluated first)".to_string()
        } else {
            "No rounds yet. Continue runs the base evaluation and one round (extract → dose → generate → score → \
             gate Q0 → heal → bake → eval) in the background."
                .to_string()
        };
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" iterate (gate Q2) "))
            .render(area, buf);
        return;
    }
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(area);
    chart(v, top, buf);
    table(v, bottom, buf);
}
