//! The gate-Q0 screen: header (session, model, dose slider), the completion list with score columns, the
//! detail pane (prompt, KL heat-map text with the token cursor, KL sparkline, dose trace, scores, decision,
//! replay preview), the progress line and key hints. Also the blind re-show screen.

use super::{clip, heat_text, sparkline};
use crate::score::{ScoredCompletion, Verdict};
use crate::tui::action::{Action, Mode};
use crate::tui::app::{stats, ModelStatus, State};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, Borders, Cell, Paragraph, Row, StatefulWidget, Table, TableState, Widget, Wrap,
};

const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| if v.abs() >= 1000.0 { format!("{v:.0}") } else { format!("{v:.digits$}") })
        .unwrap_or_else(|| "–".into())
}

/// `L13–15` for a contiguous band, else `L3,7,9`.
fn layer_list(layers: &[usize]) -> String {
    match (layers.first(), layers.last()) {
        (Some(a), Some(b)) if b - a + 1 == layers.len() && layers.len() > 1 => format!("L{a}–{b}"),
        _ => format!("L{}", layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")),
    }
}

/// The top line: session, round, model, dose slider.
pub fn header(s: &State, area: Rect, buf: &mut Buffer) {
    let model = match &s.model {
        ModelStatus::NotLoaded => "not loaded".to_string(),
        ModelStatus::Loading => "loading…".to_string(),
        ModelStatus::Ready { model, vector_layers } if vector_layers.is_empty() => {
            format!("{model} (unsteered)")
        }
        ModelStatus::Ready { model, vector_layers } => {
            format!("{model} (steering {})", layer_list(vector_layers))
        }
        ModelStatus::Failed(_) => "FAILED to load".to_string(),
    };
    let max = s.dose_max();
    let cells = 10usize;
    let filled = ((s.dose / max).clamp(0.0, 1.0) * cells as f64).round() as usize;
    let slider = format!("{}{}", "■".repeat(filled), "□".repeat(cells - filled));
    let line = Line::from(vec![
        Span::styled(" steer-heal ", BOLD.fg(Color::Black).bg(Color::Cyan)),
        Span::raw(format!(" session {} │ round {} │ model {} │ dose ", s.session_name, s.round, model)),
        Span::styled(slider, Style::new().fg(Color::Yellow)),
        Span::raw(format!(" {:.2} × c* {:.2}", s.dose, s.c_star())),
    ]);
    Paragraph::new(line).render(area, buf);
}

/// List and detail side by side (wide) or stacked (narrow).
pub fn main(s: &State, area: Rect, buf: &mut Buffer) {
    if area.height == 0 || area.width == 0 {
        return;
    }
    let (list, detail) = if area.width >= 100 {
        let [a, b] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
        (a, b)
    } else {
        let [a, b] = Layout::vertical([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(area);
        (a, b)
    };
    list_pane(s, list, buf);
    detail_pane(s, detail, buf);
}

fn decision_cell(d: Option<bool>) -> Cell<'static> {
    match d {
        Some(true) => Cell::from("✓").style(Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)),
        Some(false) => Cell::from("✗").style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
        None => Cell::from("·").style(DIM),
    }
}

fn list_pane(s: &State, area: Rect, buf: &mut Buffer) {
    let title = format!(
        " completions {}/{} · filter: {} · sort: {}{} ",
        s.view.len(),
        s.rows.len(),
        s.filter.label(),
        s.sort.label(),
        if s.sort_desc { "↓" } else { "↑" }
    );
    let block = Block::new().borders(Borders::ALL).title(title);
    let header = Row::new(vec!["", "id", "auto", "ppl", "rep", "kl", "pers", "reasons"]).style(BOLD);
    let rows: Vec<Row> = s
        .view
        .iter()
        .map(|i| {
            let r = &s.rows[*i];
            let sc = &r.score;
            let verdict = match sc.verdict {
                Verdict::Keep => Cell::from("keep").style(Style::new().fg(Color::Green)),
                Verdict::Drop => Cell::from("drop").style(Style::new().fg(Color::Red)),
            };
            let mut reasons: Vec<&str> = sc.reasons.iter().map(|x| x.kind().label()).collect();
            reasons.dedup();
            Row::new(vec![
                decision_cell(s.decision(&r.completion.id)),
                Cell::from(r.completion.id.clone()),
                verdict,
                Cell::from(fmt_opt(sc.perplexity, 1)),
                Cell::from(format!("{:.2}", sc.repetition)),
                Cell::from(format!("{:.2}", sc.kl_rmse)),
                Cell::from(fmt_opt(sc.persona_strength, 2)),
                Cell::from(reasons.join(" ")),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(1),
        Constraint::Length(15),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(5),
        Constraint::Min(3),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut ts = TableState::default().with_selected((!s.view.is_empty()).then_some(s.selected));
    StatefulWidget::render(table, area, buf, &mut ts);
}

/// Text lines of a completion with each token's background coloured by its KL; the cursor token reversed.
pub fn heat_lines(r: &ScoredCompletion, cursor: Option<usize>, max_kl: f64) -> Vec<Line<'static>> {
    let c = &r.completion;
    if c.token_text.len() == c.tokens.len() && !c.token_text.is_empty() {
        heat_text(&c.token_text, &c.trace.kl, cursor, max_kl)
    } else {
        heat_text(std::slice::from_ref(&c.text), &c.trace.kl, cursor, max_kl)
    }
}

fn dose_trace(r: &ScoredCompletion) -> String {
    let c = &r.completion;
    let mut s = format!("dose {:.2} (α {:.2})", c.dose, c.alpha);
    for rw in &c.rewinds {
        s.push_str(&format!(" → {:.2} from token {} ({})", rw.to_dose, rw.at, rw.cause));
    }
    s
}

fn score_lines(s: &State, r: &ScoredCompletion) -> Vec<Line<'static>> {
    let sc = &r.score;
    let mut out = vec![Line::from(vec![
        Span::styled("scores ", BOLD),
        Span::raw(format!(
            "ppl {} · rep {:.2} · kl rmse {:.2} · persona {} · filter ",
            fmt_opt(sc.perplexity, 1),
            sc.repetition,
            sc.kl_rmse,
            fmt_opt(sc.persona_strength, 2)
        )),
        match sc.verdict {
            Verdict::Keep => Span::styled("KEEP", BOLD.fg(Color::Green)),
            Verdict::Drop => Span::styled("DROP", BOLD.fg(Color::Red)),
        },
    ])];
    for reason in &sc.reasons {
        out.push(Line::from(Span::styled(format!("  · {}", reason.describe()), Style::new().fg(Color::Red))));
    }
    let id = &r.completion.id;
    let decided = match s.decision(id) {
        Some(true) => Span::styled("accepted", BOLD.fg(Color::Green)),
        Some(false) => Span::styled("rejected", BOLD.fg(Color::Red)),
        None => Span::styled("undecided", DIM),
    };
    let tags = s.tags_of(id);
    let mut line = vec![Span::styled("decision ", BOLD), decided];
    if !tags.is_empty() {
        line.push(Span::raw(format!(" · tags: {}", tags.join(", "))));
    }
    out.push(Line::from(line));
    if let Some(n) = s.note_of(id) {
        out.push(Line::from(vec![Span::styled("note ", BOLD), Span::raw(n)]));
    }
    out
}

fn detail_pane(s: &State, area: Rect, buf: &mut Buffer) {
    let max_kl = s.manifest.ui.heat_max_kl;
    let Some(r) = s.current() else {
        let mut lines = vec![Line::from(match &s.model {
            ModelStatus::Loading | ModelStatus::NotLoaded => {
                "Loading the model; completions appear as they are generated…"
            }
            ModelStatus::Failed(_) => "The model failed to load; see the message.",
            ModelStatus::Ready { .. } if s.rows.is_empty() && s.loop_job.is_some() => {
                "Generating completions…"
            }
            ModelStatus::Ready { .. } if s.rows.is_empty() => {
                "No completions: the round is not being prepared (see the message; I then c runs it again)."
            }
            ModelStatus::Ready { .. } => "No completion matches the filter.",
        })];
        if let Some((_, live)) = &s.live {
            for (row, text) in live {
                lines.push(Line::default());
                lines.push(Line::from(Span::styled(format!("row {row}:"), DIM)));
                lines.push(Line::from(text.clone()));
            }
        }
        Paragraph::new(lines)
            .block(Block::new().borders(Borders::ALL).title(" detail "))
            .wrap(Wrap { trim: false })
            .render(area, buf);
        return;
    };
    let c = &r.completion;
    let n = c.tokens.len();
    let cursor = s.cursor.min(n.saturating_sub(1));
    let title = format!(" {} · α {:.2} · {} tokens ", c.id, c.alpha, n);
    let inner_w = area.width.saturating_sub(2) as usize;
    let mut lines: Vec<Line> =
        vec![Line::from(vec![Span::styled("prompt ", BOLD), Span::styled(c.prompt.clone(), DIM)])];
    lines.push(Line::default());
    lines.extend(heat_lines(r, Some(cursor), max_kl));
    lines.push(Line::default());
    let spark_w = inner_w.saturating_sub(4);
    lines.push(Line::from(vec![
        Span::styled("KL  ", BOLD),
        Span::raw(sparkline(&c.trace.kl, spark_w, max_kl)),
    ]));
    if n > 0 {
        let tok = c.token_text.get(cursor).cloned().unwrap_or_default();
        let at = |v: &Vec<f32>| v.get(cursor).map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
        lines.push(Line::from(format!(
            "cursor token {}/{} {:?} · kl {} · window {} · base nll {} · dose {}",
            cursor,
            n,
            clip(&tok, 16),
            at(&c.trace.kl),
            at(&c.trace.kl_window_rmse),
            at(&c.trace.nll_base),
            at(&c.trace.dose)
        )));
    }
    lines.push(Line::from(dose_trace(r)));
    lines.extend(score_lines(s, r));
    if let Some(rp) = s.replay.as_ref().filter(|rp| rp.completion == c.id) {
        lines.push(Line::default());
        let state = if rp.result.is_some() {
            format!(
                "ready — {} adopt · {} discard",
                s.keymap.hint(Mode::GateQ0, Action::AdoptReplay),
                s.keymap.hint(Mode::GateQ0, Action::DiscardReplay)
            )
        } else {
            "running…".into()
        };
        lines.push(Line::from(Span::styled(
            format!("replay from token {} at dose {:.2}: {state}", rp.at, rp.dose),
            BOLD.fg(Color::Magenta),
        )));
        match &rp.result {
            Some(res) => {
                lines.extend(heat_lines(res, None, max_kl));
                lines.extend(score_lines_brief(res));
            }
            None => {
                let prefix: String = c.token_text.iter().take(rp.at).cloned().collect();
                lines.push(Line::from(vec![Span::styled(prefix, DIM), Span::raw(rp.streamed.clone())]));
            }
        }
    }
    Paragraph::new(Text::from(lines))
        .block(Block::new().borders(Borders::ALL).title(title))
        .wrap(Wrap { trim: false })
        .scroll((s.detail_scroll, 0))
        .render(area, buf);
}

fn score_lines_brief(r: &ScoredCompletion) -> Vec<Line<'static>> {
    let sc = &r.score;
    vec![Line::from(format!(
        "replay scores: ppl {} · rep {:.2} · kl rmse {:.2} · filter {}",
        fmt_opt(sc.perplexity, 1),
        sc.repetition,
        sc.kl_rmse,
        if sc.verdict == Verdict::Keep { "keep" } else { "drop" }
    ))]
}

/// The blind re-show screen: prompt and text only, no scores or earlier decision.
pub fn reshow(s: &State, area: Rect, buf: &mut Buffer) {
    let Some(rs) = s.screens.reshow() else { return };
    let id = rs.queue.get(rs.pos);
    let row = id.and_then(|id| s.rows.iter().find(|r| &r.completion.id == id));
    let title = format!(" blind re-show {}/{} — decide again without scores ", rs.pos + 1, rs.queue.len());
    let mut lines = Vec::new();
    if let Some(r) = row {
        lines.push(Line::from(vec![
            Span::styled("prompt ", BOLD),
            Span::styled(r.completion.prompt.clone(), DIM),
        ]));
        lines.push(Line::default());
        lines.extend(r.completion.text.split('\n').map(|l| Line::from(l.to_string())));
    }
    Paragraph::new(lines)
        .block(Block::new().borders(Borders::ALL).title(title))
        .wrap(Wrap { trim: false })
        .scroll((s.detail_scroll, 0))
        .render(area, buf);
}

/// Decided / total, kept, auto-agreement, filter share and running jobs.
pub fn progress_line(s: &State, area: Rect, buf: &mut Buffer) {
    let p = stats::progress(s);
    let agree = p.agreement.map(|a| format!("{:.0}%", a * 100.0)).unwrap_or_else(|| "–".into());
    let mut spans = vec![
        Span::styled(format!(" decided {}/{}", p.decided, p.total), BOLD),
        Span::raw(if p.planned > p.total {
            format!(" ({} coming) │ kept {} │ auto-agree {agree}", p.planned - p.total, p.kept)
        } else {
            format!(" │ kept {} │ auto-agree {agree}", p.kept)
        }),
    ];
    if let Some(k) = stats::kappa(s).kappa {
        spans.push(Span::raw(format!(" │ κ {k:.2}")));
    }
    if s.round_state().is_some_and(|r| r.gate_passed(crate::session::Gate::Q0)) {
        spans.push(Span::styled(" │ gate Q0 passed", BOLD.fg(Color::Green)));
    }
    for j in s.jobs.values() {
        let pct = if j.total > 0 {
            format!(" {:.0}%", 100.0 * j.done as f64 / j.total as f64)
        } else {
            String::new()
        };
        let detail = if j.tag == crate::worker::JobTag::Rounds && !j.msg.is_empty() {
            format!(": {}", j.msg.chars().take(48).collect::<String>())
        } else {
            String::new()
        };
        spans
            .push(Span::styled(format!(" │ {}{pct}{detail}", j.tag.label()), Style::new().fg(Color::Yellow)));
    }
    let queued = s.generating.len();
    if queued > 0 {
        spans.push(Span::styled(format!(" │ {queued} prompts to go"), Style::new().fg(Color::Yellow)));
    }
    Paragraph::new(Line::from(spans)).style(Style::new().bg(Color::Indexed(236))).render(area, buf);
}

/// The status message, or the most useful keys of the current mode.
pub fn hint_line(s: &State, area: Rect, buf: &mut Buffer) {
    if !s.status.is_empty() {
        Paragraph::new(Line::from(vec![Span::styled(" › ", BOLD), Span::raw(s.status.clone())]))
            .render(area, buf);
        return;
    }
    // Hints describe the screen under any popup; popups carry their own key hints.
    let mode = s.screens.mode();
    let wanted: &[(Action, &str)] = match mode {
        Mode::Heal => &[
            (Action::KeepRound, "keep round"),
            (Action::DropRound, "drop round"),
            (Action::EditNote, "note"),
            (Action::StopRounds, "stop"),
            (Action::ScrollDown, "next sample"),
            (Action::ScrollUp, "prev sample"),
            (Action::Cancel, "back"),
        ],
        Mode::Iterate => &[
            (Action::ContinueRounds, "continue"),
            (Action::StopRounds, "stop"),
            (Action::RollbackRound, "rollback"),
            (Action::ForkRound, "fork"),
            (Action::OpenHeal, "heal"),
            (Action::NextRound, "next"),
            (Action::PrevRound, "prev"),
            (Action::NextSample, "sample+"),
            (Action::PrevSample, "sample−"),
            (Action::Cancel, "back"),
        ],
        Mode::Reshow => &[(Action::Accept, "accept"), (Action::Reject, "reject"), (Action::Cancel, "stop")],
        _ => &[
            (Action::Accept, "accept"),
            (Action::Reject, "reject"),
            (Action::Undo, "undo"),
            (Action::NextUndecided, "next undecided"),
            (Action::TagReasons, "tags"),
            (Action::EditNote, "note"),
            (Action::Backtrack, "backtrack"),
            (Action::DoseDown, "dose−"),
            (Action::DoseUp, "dose+"),
            (Action::ToggleStats, "stats"),
        ],
    };
    let mut spans = vec![Span::raw(" ")];
    for (a, label) in wanted.iter().chain(&[(Action::ToggleHelp, "help"), (Action::Quit, "quit")]) {
        spans.push(Span::styled(s.keymap.hint(mode, *a), BOLD.fg(Color::Cyan)));
        spans.push(Span::raw(format!(" {label}  ")));
    }
    Paragraph::new(Line::from(spans)).render(area, buf);
}
