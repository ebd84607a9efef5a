//! The heal screen (gate Q1): the round's before/after coherence and trait, then for each held-out neutral prompt
//! the teacher's steered completion, the student before healing and the healed student side by side.

use super::super::app::State;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

/// Draw the heal screen into `area`.
pub fn main(s: &State, area: Rect, buf: &mut Buffer) {
    let Some(h) = &s.heal else { return };
    let r = &h.report;
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let [top, rest] = Layout::vertical([Constraint::Length(4), Constraint::Min(0)]).areas(area);
    let after = r.after.as_ref();
    let lines = vec![
        Line::from(vec![
            Span::styled(format!("{}: ", r.coherence_label), bold),
            Span::raw(format!("{:.3} → {}", r.before.coherence, num(after.map(|m| m.coherence)))),
        ]),
        Line::from(vec![
            Span::styled(format!("{}: ", r.trait_label), bold),
            Span::raw(format!("{} → {}", num(r.before.trait_value), num(after.and_then(|m| m.trait_value)))),
        ]),
    ];
    Paragraph::new(lines)
        .block(Block::bordered().title(format!(" gate Q1 · round {} · {} ", h.round, r.model)))
        .render(top, buf);
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
    for (rect, title, text) in [
        (a, " teacher (steered) ", sample.teacher.as_deref().unwrap_or("–")),
        (b, " student before ", sample.before.as_str()),
        (c, " healed student ", sample.after.as_str()),
    ] {
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(title))
            .render(rect, buf);
    }
}
