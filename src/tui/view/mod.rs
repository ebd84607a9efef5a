//! Views: `render(&State, Rect, &mut Buffer)` draws the whole screen from the state alone. Layout degrades on
//! small terminals (list and detail stack vertically, then parts collapse to nothing) and never panics.

pub mod gate_q0;
pub mod heal;
pub mod iterate;
pub mod popups;

use super::app::{Popup, Screen, State};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

/// Draw everything.
pub fn render(s: &State, area: Rect, buf: &mut Buffer) {
    if area.width == 0 || area.height == 0 {
        return;
    }
    let [header, main, progress, hints] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    gate_q0::header(s, header, buf);
    // The top screen is drawn; the gate-Q0 screen is the one under every other.
    match s.screens.top() {
        Some(Screen::Heal(_)) => heal::main(s, main, buf),
        Some(Screen::Iterate(_)) => iterate::main(s, main, buf),
        Some(Screen::Reshow(_)) => gate_q0::reshow(s, main, buf),
        None => gate_q0::main(s, main, buf),
    }
    gate_q0::progress_line(s, progress, buf);
    gate_q0::hint_line(s, hints, buf);
    match &s.popup {
        None => {}
        Some(Popup::Help { scroll }) => popups::help(s, *scroll, area, buf),
        Some(Popup::Tags { ticked }) => popups::tags(s, ticked, area, buf),
        Some(Popup::Edit { target, area: text, completion }) => {
            popups::edit(*target, completion.as_deref(), text, area, buf)
        }
        Some(Popup::Confirm { question, .. }) => popups::confirm(s, question, area, buf),
        Some(Popup::Stats) => popups::stats(s, area, buf),
        Some(Popup::Message { title, text }) => popups::message(s, title, text, area, buf),
    }
}

/// A rectangle of `w` × `h` cells centred in `area`, clamped to it.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

/// Background colour of a token with KL `kl` on a scale that is fully red at `max`; `None` when negligible.
pub fn heat(kl: f32, max: f64) -> Option<Color> {
    let t = (kl as f64 / max.max(1e-9)).clamp(0.0, 1.0);
    if t < 0.05 {
        return None;
    }
    // Light yellow → red on the 256-colour cube: readable with black text at every step.
    const RAMP: [u8; 6] = [229, 222, 215, 209, 203, 196];
    let i = ((t * RAMP.len() as f64).ceil() as usize).clamp(1, RAMP.len()) - 1;
    Some(Color::Indexed(RAMP[i]))
}

/// Text lines of `pieces` (token texts) with each piece's background coloured by its KL in `kl` (missing values
/// count as 0) on a scale fully red at `max_kl`; the `cursor` piece reversed. Newlines inside pieces break lines.
pub fn heat_text(pieces: &[String], kl: &[f32], cursor: Option<usize>, max_kl: f64) -> Vec<Line<'static>> {
    let mut lines: Vec<Line> = vec![Line::default()];
    for (i, piece) in pieces.iter().enumerate() {
        let mut style = match heat(kl.get(i).copied().unwrap_or(0.0), max_kl) {
            Some(bg) => Style::new().bg(bg).fg(Color::Black),
            None => Style::new(),
        };
        if cursor == Some(i) {
            style = style.add_modifier(Modifier::REVERSED | Modifier::BOLD);
        }
        // An empty piece still needs a visible cell under the cursor.
        let text = if piece.is_empty() && cursor == Some(i) { "▏" } else { piece.as_str() };
        for (k, part) in text.split('\n').enumerate() {
            if k > 0 {
                lines.push(Line::default());
            }
            if !part.is_empty() {
                if let Some(l) = lines.last_mut() {
                    l.spans.push(Span::styled(part.to_string(), style));
                }
            }
        }
    }
    lines
}

/// A one-line sparkline of `xs` squeezed (by max-pooling) into `width` cells, scaled to `max`.
pub fn sparkline(xs: &[f32], width: usize, max: f64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if xs.is_empty() || width == 0 {
        return String::new();
    }
    let cells = width.min(xs.len());
    (0..cells)
        .map(|c| {
            let lo = c * xs.len() / cells;
            let hi = ((c + 1) * xs.len() / cells).max(lo + 1);
            let m = xs[lo..hi].iter().copied().fold(0f32, f32::max) as f64;
            let i = ((m / max.max(1e-9)).clamp(0.0, 1.0) * 7.0).round() as usize;
            BARS[i]
        })
        .collect()
}

/// Cut a string to `n` characters with an ellipsis.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    if n == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(n - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_ramp() {
        assert_eq!(heat(0.0, 2.0), None);
        assert_eq!(heat(0.05, 2.0), None);
        assert_eq!(heat(2.0, 2.0), Some(Color::Indexed(196)));
        assert_eq!(heat(9.0, 2.0), Some(Color::Indexed(196)));
        assert_eq!(heat(0.2, 2.0), Some(Color::Indexed(229)));
    }

    #[test]
    fn sparkline_pools_and_scales() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 0.0], 4, 2.0), "▁▅█▁");
        assert_eq!(sparkline(&[0.0, 2.0, 0.0, 0.0], 2, 2.0), "█▁");
        assert_eq!(sparkline(&[], 5, 1.0), "");
    }

    #[test]
    fn centered_clamps() {
        let r = centered(Rect::new(0, 0, 10, 3), 40, 20);
        assert_eq!(r, Rect::new(0, 0, 10, 3));
        let r = centered(Rect::new(0, 0, 100, 30), 40, 10);
        assert_eq!(r, Rect::new(30, 10, 40, 10));
    }
}
