//! The heal screen (gate Q1): while the round heals, a live chart of loss, NLL, D and λ_eff over optimiser steps
//! with steps/s and ETA; then the round's before/after coherence and trait, and for each held-out neutral prompt
//! the teacher's steered completion, the student before healing and the healed student side by side, each under
//! its scores (coherence, persona gain, mean KL) with its tokens heat-mapped by KL to the base.

use super::super::app::iterate::HealTraining;
use super::super::app::State;
use super::heat_text;
use crate::heal::gate::TokenHeat;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Widget, Wrap};

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

/// Seconds as `1h02m`, `3m05s` or `42s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Draw the heal screen into `area`.
pub fn main(s: &State, area: Rect, buf: &mut Buffer) {
    let Some(h) = s.screens.heal() else { return };
    let training = s.heal_training.as_ref().filter(|t| t.round == h.round && !t.steps.is_empty());
    let Some(r) = &h.report else {
        // Still healing: the live chart takes the screen.
        let block = Block::bordered().title(format!(" gate Q1 · round {} · healing ", h.round));
        match training {
            Some(t) => chart(t, block, area, buf),
            None => Paragraph::new("Waiting for the first heal step…").block(block).render(area, buf),
        }
        return;
    };
    let bold = Style::default().add_modifier(Modifier::BOLD);
    // Once the report is in, the chart stays only where it leaves the samples room.
    let chart_rows = if training.is_some() && area.height >= 30 { 14 } else { 0 };
    let top_rows = if h.note.is_empty() { 4 } else { 5 };
    let [top, chart_area, rest] =
        Layout::vertical([Constraint::Length(top_rows), Constraint::Length(chart_rows), Constraint::Min(0)])
            .areas(area);
    let after = r.after.as_ref();
    let mut lines = vec![
        Line::from(vec![
            Span::styled(format!("{}: ", r.coherence_label), bold),
            Span::raw(format!("{:.3} → {}", r.before.coherence, num(after.map(|m| m.coherence)))),
        ]),
        Line::from(vec![
            Span::styled(format!("{}: ", r.trait_label), bold),
            Span::raw(format!("{} → {}", num(r.before.trait_value), num(after.and_then(|m| m.trait_value)))),
        ]),
    ];
    if !h.note.is_empty() {
        lines.push(Line::from(vec![Span::styled("note: ", bold), Span::raw(h.note.replace('\n', " "))]));
    }
    Paragraph::new(lines)
        .block(Block::bordered().title(format!(" gate Q1 · round {} · {} ", h.round, r.model)))
        .render(top, buf);
    if let Some(t) = training {
        chart(t, Block::bordered().title(" training "), chart_area, buf);
    }
    if r.samples.is_empty() {
        Paragraph::new("The report has no samples.").block(Block::bordered()).render(rest, buf);
        return;
    }
    let [prompt_row, cols] = Layout::vertical([Constraint::Length(3), Constraint::Min(0)]).areas(rest);
    // One sample at a time: scrolling past a sample's end moves to the next.
    let idx = (h.scroll as usize).min(r.samples.len() - 1);
    let sample = &r.samples[idx];
    Paragraph::new(sample.prompt.as_str())
        .wrap(Wrap { trim: true })
        .block(Block::bordered().title(format!(" prompt {}/{} ", idx + 1, r.samples.len())))
        .render(prompt_row, buf);
    let [a, b, c] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(cols);
    let max_kl = s.manifest.ui.heat_max_kl;
    for (rect, title, text, heat) in [
        (a, " teacher (steered) ", sample.teacher.as_deref().unwrap_or("–"), sample.teacher_heat.as_ref()),
        (b, " student before ", sample.before.as_str(), sample.before_heat.as_ref()),
        (c, " healed student ", sample.after.as_str(), sample.after_heat.as_ref()),
    ] {
        Paragraph::new(column_lines(text, heat, max_kl))
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(title))
            .render(rect, buf);
    }
}

/// One column: a score line (coherence, persona gain, mean KL) over the text heat-mapped by per-token KL; plain
/// text when the report carries no token data for it (reports written before they were recorded).
fn column_lines(text: &str, heat: Option<&TokenHeat>, max_kl: f64) -> Vec<Line<'static>> {
    let Some(h) = heat.filter(|h| !h.tokens.is_empty()) else {
        return text.lines().map(|l| Line::raw(l.to_string())).collect();
    };
    let dim = Style::default().add_modifier(Modifier::DIM);
    let mut lines = vec![Line::from(vec![
        Span::styled("coh ", dim),
        Span::raw(num(h.coherence)),
        Span::styled(" pers ", dim),
        Span::raw(num(h.persona_gain)),
        Span::styled(" KL ", dim),
        Span::raw(num(h.kl_mean)),
    ])];
    lines.extend(heat_text(&h.tokens, &h.kl, None, max_kl));
    lines
}

/// The training chart: a status line (step, last metrics, steps/s, ETA) over loss, NLL, D and λ_eff by step.
fn chart(t: &HealTraining, block: Block, area: Rect, buf: &mut Buffer) {
    let inner = block.inner(area);
    block.render(area, buf);
    let Some(last) = t.steps.last() else { return };
    let [status, plot] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
    let pace = match t.rate_and_eta() {
        Some((rate, eta)) => format!("{rate:.2} steps/s · ETA {}", duration(eta)),
        None => "– steps/s · ETA –".into(),
    };
    Paragraph::new(format!(
        "step {}/{} · loss {:.3} · NLL {:.3} · D {:.3} · λ_eff {:.3} · {pace} · {:.0} tok/s",
        last.step, last.total_steps, last.loss, last.nll, last.d, last.lambda_eff, last.tokens_per_s
    ))
    .render(status, buf);
    let series = |f: fn(&crate::heal::StepRecord) -> f64| -> Vec<(f64, f64)> {
        t.steps.iter().map(|r| (r.step as f64, f(r))).filter(|p| p.1.is_finite()).collect()
    };
    let lines = [
        ("loss", Color::Yellow, series(|r| r.loss)),
        ("NLL", Color::Cyan, series(|r| r.nll)),
        ("D", Color::Magenta, series(|r| r.d)),
        ("λ_eff", Color::Green, series(|r| r.lambda_eff)),
    ];
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, _, pts) in &lines {
        for (_, y) in pts {
            lo = lo.min(*y);
            hi = hi.max(*y);
        }
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    // Flat series still get a visible band.
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let x_hi = last.total_steps.max(last.step).max(2) as f64;
    let datasets = lines
        .iter()
        .map(|(name, color, pts)| {
            Dataset::default()
                .name(*name)
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::default().fg(*color))
                .data(pts)
        })
        .collect();
    Chart::new(datasets)
        // The legend names the four lines (colour alone does not survive every terminal).
        .hidden_legend_constraints((Constraint::Ratio(1, 3), Constraint::Ratio(1, 1)))
        .x_axis(
            Axis::default()
                .title("step")
                .bounds([1.0, x_hi])
                .labels([Line::from("1"), Line::from(format!("{}", x_hi as usize))]),
        )
        .y_axis(
            Axis::default()
                .bounds([lo, hi])
                .labels([Line::from(format!("{lo:.2}")), Line::from(format!("{hi:.2}"))]),
        )
        .render(plot, buf);
}
