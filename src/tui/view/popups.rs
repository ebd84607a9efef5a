//! Popups drawn over the screen: help (generated from the merged keymap), reason-tag picker, text editor,
//! confirmation, suggested thresholds and agreement, and messages.

use super::centered;
use crate::score::agreement::{fmt_threshold, pct_ci};
use crate::tui::action::{Action, Mode};
use crate::tui::app::{stats, EditTarget, State};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget, Wrap};
use ratatui_textarea::TextArea;
use std::collections::BTreeSet;

const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);
const KEY: Style = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);

fn frame(area: Rect, w: u16, h: u16, title: String, buf: &mut Buffer) -> (Rect, Block<'static>) {
    let r = centered(area, w, h);
    Clear.render(r, buf);
    (r, Block::new().borders(Borders::ALL).border_style(Style::new().fg(Color::Cyan)).title(title))
}

fn hint(s: &State, mode: Mode, items: &[(Action, &str)]) -> Line<'static> {
    let mut spans = Vec::new();
    for (a, what) in items {
        spans.push(Span::styled(s.keymap.hint(mode, *a), KEY));
        spans.push(Span::raw(format!(" {what}  ")));
    }
    Line::from(spans)
}

/// The help overlay: every binding of every screen, from the merged keymap.
pub fn help(s: &State, scroll: u16, area: Rect, buf: &mut Buffer) {
    let w = area.width.saturating_sub(4).min(96);
    let h = area.height.saturating_sub(2);
    let sources = s.keymap.sources().join(" + ");
    let (r, block) = frame(area, w, h, format!(" keys — {sources} "), buf);
    let mut lines = Vec::new();
    for (mode, rows) in s.keymap.help_rows() {
        lines.push(Line::from(Span::styled(format!("{} [{}]", mode.title(), mode.name()), BOLD)));
        for (keys, a) in rows {
            lines.push(Line::from(vec![
                Span::styled(format!("  {keys:<22}"), KEY),
                Span::raw(format!(" {:<18} {}", a.name(), a.description())),
            ]));
        }
        lines.push(Line::default());
    }
    Paragraph::new(lines).block(block).scroll((scroll, 0)).render(r, buf);
}

/// The reason-tag picker.
pub fn tags(s: &State, ticked: &BTreeSet<usize>, area: Rect, buf: &mut Buffer) {
    let id = s.current_id().unwrap_or_default();
    let h = s.tags.len() as u16 + 4;
    let (r, block) = frame(area, 48, h, format!(" reason tags · {id} "), buf);
    let mut lines: Vec<Line> = s
        .tags
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let on = ticked.contains(&i);
            Line::from(vec![
                Span::styled(s.keymap.hint(Mode::Tags, Action::ToggleTag(i as u8 + 1)), KEY),
                Span::raw(if on { " [x] " } else { " [ ] " }),
                Span::styled(t.clone(), if on { BOLD } else { Style::new() }),
            ])
        })
        .collect();
    lines.push(Line::default());
    lines.push(hint(s, Mode::Tags, &[(Action::Confirm, "apply"), (Action::Cancel, "cancel")]));
    Paragraph::new(lines).block(block).render(r, buf);
}

/// The text editor popup.
pub fn edit(
    target: EditTarget,
    completion: Option<&str>,
    text: &TextArea<'static>,
    area: Rect,
    buf: &mut Buffer,
) {
    let title = match target {
        EditTarget::Note => format!(" note on {} — ctrl-s save · esc cancel ", completion.unwrap_or("")),
        EditTarget::Prompt => " prompt — ctrl-s generate completions from it · esc cancel ".to_string(),
        EditTarget::RoundNote => " note on the round (gate Q1) — ctrl-s save · esc cancel ".to_string(),
    };
    let w = area.width.saturating_sub(8).min(90);
    let (r, block) = frame(area, w, 10, title, buf);
    let inner = block.inner(r);
    block.render(r, buf);
    Widget::render(text, inner, buf);
}

/// A yes/no question.
pub fn confirm(s: &State, question: &str, area: Rect, buf: &mut Buffer) {
    let h = question.lines().count() as u16 + 4;
    let (r, block) = frame(area, 64, h, " confirm ".into(), buf);
    let mut lines: Vec<Line> = question.lines().map(|l| Line::from(l.to_string())).collect();
    lines.push(Line::default());
    lines.push(hint(s, Mode::Confirm, &[(Action::Confirm, "yes"), (Action::Cancel, "no")]));
    Paragraph::new(lines).block(block).wrap(Wrap { trim: false }).render(r, buf);
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "–".into())
}

/// Suggested thresholds, the filter against the researcher, and self-consistency.
pub fn stats(s: &State, area: Rect, buf: &mut Buffer) {
    let c = stats::confusion(s);
    let k = stats::kappa(s);
    let th = &s.manifest.filter.thresholds;
    let (r, block) = frame(area, 76, 20, " gate Q0 · filter vs your decisions ".into(), buf);
    let mut lines = vec![
        Line::from(vec![
            Span::styled("filter in use ", BOLD),
            Span::raw(format!(
                "ppl < {} · rep < {} · no narration · no refusal",
                th.max_perplexity, th.max_repetition
            )),
        ]),
        Line::from(format!(
            "precision {} · recall {}  (95 % Wilson)",
            pct_ci(&c.precision_ci()),
            pct_ci(&c.recall_ci())
        )),
        Line::from(format!("agreement {}  (n = {}, positive = keep)", pct(c.agreement()), c.total())),
        Line::from(Span::styled("               you accepted  you rejected", BOLD)),
        Line::from(format!("  filter keep  {:>12}  {:>12}", c.tp, c.fp)),
        Line::from(format!("  filter drop  {:>12}  {:>12}", c.fn_, c.tn)),
        Line::default(),
        Line::from(Span::styled("best-separating threshold per score", BOLD)),
    ];
    for (f, sug) in stats::suggestions(s) {
        lines.push(Line::from(match sug {
            Some(t) => format!(
                "  {:<17} {:<34} bal.acc {:>4}{}",
                f.label(),
                t.rule(),
                pct(Some(t.balanced_accuracy)),
                if t.separates_cleanly() { "  clean" } else { "" }
            ),
            None => format!("  {:<17} needs accepted and rejected items", f.label()),
        }));
    }
    lines.push(Line::default());
    lines.push(Line::from(match k.kappa {
        Some(v) => format!(
            "self-consistency: {} re-shown blind, {} same · Cohen's κ {}{}",
            k.n,
            k.same,
            fmt_threshold(v),
            k.ci.map(|iv| format!(" [{:.2}, {:.2}]", iv.lo, iv.hi)).unwrap_or_default()
        ),
        None if k.n > 0 => {
            format!("self-consistency: {} re-shown blind, {} same · κ undefined (one label)", k.n, k.same)
        }
        None => format!(
            "self-consistency: nothing re-shown yet ({} starts a blind re-show)",
            s.keymap.hint(Mode::GateQ0, Action::StartReshow)
        ),
    }));
    lines.push(Line::default());
    lines.push(hint(s, Mode::Stats, &[(Action::Cancel, "close")]));
    Paragraph::new(lines).block(block).render(r, buf);
}

/// An error or information message.
pub fn message(s: &State, title: &str, text: &str, area: Rect, buf: &mut Buffer) {
    let w = area.width.saturating_sub(8).min(80);
    let body_w = w.saturating_sub(2).max(1) as usize;
    let body_h: usize = text.lines().map(|l| l.chars().count().div_ceil(body_w).max(1)).sum();
    let (r, block) = frame(area, w, body_h as u16 + 4, format!(" {title} "), buf);
    let mut lines: Vec<Line> = text.lines().map(|l| Line::from(l.to_string())).collect();
    lines.push(Line::default());
    lines.push(hint(s, Mode::Message, &[(Action::Cancel, "close")]));
    Paragraph::new(lines).block(block).wrap(Wrap { trim: false }).render(r, buf);
}
