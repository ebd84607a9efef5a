//! The iterate screen (gate Q2): the progress map as a chart (x = authority, y = care; the kept trajectory joined
//! from the base, dropped rounds as dots, the control arms as their own markers), the selected round's metrics
//! beside its control arms and one of its eval samples (vignette, think, the seven answer probabilities against
//! the human label), and the rounds table with the lineage.

use super::super::action::{Action, Mode};
use super::super::app::iterate::IterateView;
use super::super::app::State;
use super::clip;
use crate::eval::protocol::AnswerCase;
use crate::eval::{ControlArm, EvalSample, Interval, RoundPoint, RoundStatus, Stat, FOUNDATIONS};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Row, Table, Widget, Wrap};

/// Three decimals, or two significant digits in exponent form where three decimals would overflow a column
/// (a perplexity of 3e13 from a random model) or show a nonzero value as 0.000 (a p_ans_any of 3e-4).
fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x.abs() >= 1e4 || (x != 0.0 && x.abs() < 1e-3) {
        format!("{x:.1e}")
    } else {
        format!("{x:.3}")
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

/// Chart marker and colour of a control arm (the legend and the samples pane use the same).
fn arm_style(arm: ControlArm) -> (char, Color, &'static str) {
    match arm {
        ControlArm::Steered => ('▲', Color::Magenta, "steered"),
        ControlArm::Random => ('◆', Color::Gray, "random"),
        ControlArm::PromptOnly => ('■', Color::Green, "prompt"),
    }
}

/// Every round's points of one control arm.
fn arm_xy(v: &IterateView, arm: ControlArm) -> Xy {
    v.points
        .iter()
        .flat_map(|p| p.controls.iter().filter(|c| c.arm == arm && c.on_map()).map(|c| (c.authority, c.care)))
        .collect()
}

/// The 95 % interval bars of every round with intervals: authority horizontal, care vertical, each a two-point
/// line.
fn interval_bars(v: &IterateView) -> Vec<Xy> {
    let mut out = Vec::new();
    for p in v.points.iter().filter(|p| p.authority.is_finite() && p.care.is_finite()) {
        if let Some(iv) = p.ci.get(&Stat::Authority).filter(|iv| iv.lo.is_finite() && iv.hi.is_finite()) {
            out.push(vec![(iv.lo, p.care), (iv.hi, p.care)]);
        }
        if let Some(iv) = p.ci.get(&Stat::Care).filter(|iv| iv.lo.is_finite() && iv.hi.is_finite()) {
            out.push(vec![(p.authority, iv.lo), (p.authority, iv.hi)]);
        }
    }
    out
}

/// A paired difference as `-0.12[-0.18,-0.06]↓`: ↓/↑ when its 95 % interval excludes 0, `·` when it spans 0.
fn delta(d: Option<&Interval>) -> String {
    match d {
        Some(d) if d.value.is_finite() && d.lo.is_finite() && d.hi.is_finite() => {
            let mark = if d.hi < 0.0 {
                "↓"
            } else if d.lo > 0.0 {
                "↑"
            } else {
                "·"
            };
            format!("{:+.2}[{:+.2},{:+.2}]{mark}", d.value, d.lo, d.hi)
        }
        _ => "–".into(),
    }
}

fn chart(v: &IterateView, area: Rect, buf: &mut Buffer) {
    let (path, other) = split(v);
    let bars = interval_bars(v);
    let selected: Vec<(f64, f64)> = v.current().map(|p| vec![(p.authority, p.care)]).unwrap_or_default();
    let arms: Vec<(ControlArm, Xy)> =
        ControlArm::ALL.into_iter().map(|a| (a, arm_xy(v, a))).filter(|(_, xy)| !xy.is_empty()).collect();
    let controls = || arms.iter().flat_map(|(_, xy)| xy.iter().copied());
    let bar_ends = || bars.iter().flat_map(|b| b.iter().copied());
    let xb = bounds(
        v.points.iter().map(|p| p.authority).chain(controls().map(|c| c.0)).chain(bar_ends().map(|b| b.0)),
    );
    let yb =
        bounds(v.points.iter().map(|p| p.care).chain(controls().map(|c| c.1)).chain(bar_ends().map(|b| b.1)));
    // The interval bars first, so every marker draws over them.
    let mut datasets: Vec<Dataset> = bars
        .iter()
        .map(|b| {
            Dataset::default()
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::default().fg(Color::DarkGray))
                .data(b)
        })
        .collect();
    datasets.extend([
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
    ]);
    // Control arms under the selected marker, so the selection stays visible where they coincide.
    for (arm, xy) in &arms {
        let (mark, color, name) = arm_style(*arm);
        datasets.push(
            Dataset::default()
                .name(name)
                .marker(Marker::Custom(mark))
                .graph_type(GraphType::Scatter)
                .style(Style::default().fg(color))
                .data(xy),
        );
    }
    datasets.push(
        Dataset::default()
            .name("selected")
            .marker(Marker::Block)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(Color::Yellow))
            .data(&selected),
    );
    // The legend is one line in the bottom border: the chart's own legend box would cover points.
    let mut legend = vec![
        Span::raw(" "),
        Span::styled("⣀kept", Style::default().fg(Color::Cyan)),
        Span::raw(" "),
        Span::styled("•dropped", Style::default().fg(Color::Red)),
    ];
    for (arm, _) in &arms {
        let (mark, color, name) = arm_style(*arm);
        legend.push(Span::raw(" "));
        legend.push(Span::styled(format!("{mark}{name}"), Style::default().fg(color)));
    }
    if !bars.is_empty() {
        legend.push(Span::raw(" "));
        legend.push(Span::styled("⣀95%", Style::default().fg(Color::DarkGray)));
    }
    legend.push(Span::raw(" "));
    legend.push(Span::styled("█selected ", Style::default().fg(Color::Yellow)));
    let label = |b: [f64; 2]| vec![Line::from(format!("{:.2}", b[0])), Line::from(format!("{:.2}", b[1]))];
    Chart::new(datasets)
        .legend_position(None)
        .block(
            Block::bordered()
                .title(" progress map: authority → / care ↑ (ln p) ")
                .title_bottom(Line::from(legend)),
        )
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
    let header = Row::new([
        "",
        "round",
        "status",
        "auth",
        "Δauth vs prev 95%",
        "care",
        "p_ans",
        "json",
        "ppx",
        "KL",
        "cos v0",
        "cos sh",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = v.points.iter().enumerate().map(|(i, p)| {
        let row = Row::new(vec![
            if i == v.selected { "›".to_string() } else { " ".to_string() },
            p.round.to_string(),
            status(v, p),
            fmt(p.authority),
            delta(p.vs_prev.get(&Stat::Authority)),
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
        Constraint::Length(19),
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
    let Some(v) = s.screens.iterate() else { return };
    if v.points.is_empty() {
        let text = if s.loop_job.is_some() {
            "running the round… (the base is evaluated before the first round's eval)".to_string()
        } else {
            "No rounds yet. Continue prepares a round (extract → dose → generate) for gate Q0 in the background."
                .to_string()
        };
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" iterate (gate Q2) "))
            .render(area, buf);
        return;
    }
    // The table takes the rows it needs (up to half the screen); the map and the samples get the rest.
    let table_h = (v.points.len() as u16).saturating_add(3).clamp(5, (area.height / 2).max(5));
    let [top, bottom] = Layout::vertical([Constraint::Min(0), Constraint::Length(table_h)]).areas(area);
    if top.width >= 70 {
        let [map, side] =
            Layout::horizontal([Constraint::Percentage(54), Constraint::Percentage(46)]).areas(top);
        chart(v, map, buf);
        samples(s, v, side, buf);
    } else {
        chart(v, top, buf);
    }
    table(v, bottom, buf);
}

/// Greedy word wrap of `text` (whitespace collapsed) into lines of at most `width` characters, at most `max`
/// lines; a cut text ends in an ellipsis.
fn wrap(text: &str, width: usize, max: usize) -> Vec<String> {
    if width == 0 || max == 0 {
        return vec![];
    }
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut cut = false;
    for word in text.split_whitespace() {
        // A word longer than a line is split across lines.
        let mut w: Vec<char> = word.chars().collect();
        while !w.is_empty() {
            let used = cur.chars().count();
            let sep = usize::from(used > 0);
            if used + sep + w.len() <= width {
                if sep == 1 {
                    cur.push(' ');
                }
                cur.extend(w.drain(..));
            } else if used == 0 {
                cur.extend(w.drain(..width));
            } else {
                lines.push(std::mem::take(&mut cur));
            }
            if lines.len() == max {
                cut = true;
                break;
            }
        }
        if cut {
            break;
        }
    }
    if !cur.is_empty() && lines.len() < max {
        lines.push(cur);
    } else if !cur.is_empty() {
        cut = true;
    }
    if cut {
        if let Some(last) = lines.last_mut() {
            let keep = width.saturating_sub(1).min(last.chars().count());
            *last = last.chars().take(keep).collect::<String>() + "…";
        }
    }
    lines
}

/// A bar of `p` (0..1) in `width` cells with eighth-cell resolution.
fn bar(p: f64, width: usize) -> String {
    const PART: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (p.clamp(0.0, 1.0) * width as f64 * 8.0).round() as usize;
    let mut out = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) && out.chars().count() < width {
        out.push(PART[eighths % 8]);
    }
    format!("{out:<width$}")
}

fn case_name(c: AnswerCase) -> &'static str {
    match c {
        AnswerCase::Natural => "natural",
        AnswerCase::Interrupted => "interrupted",
        AnswerCase::AnsweredElsewhere => "elsewhere",
    }
}

/// One row of the metrics block: label, authority, care, p_ans_any, ppx_json.
fn metrics_row(label: String, a: f64, c: f64, p: f64, ppx: f64, style: Style) -> Line<'static> {
    Line::styled(format!("{label:<9}{:>8}{:>8}{:>7}{:>8}", fmt(a), fmt(c), fmt(p), fmt(ppx)), style)
}

/// The selected round's metrics beside its control arms, and one of its eval samples.
fn samples(s: &State, v: &IterateView, area: Rect, buf: &mut Buffer) {
    let Some(p) = v.current() else { return };
    let round = p.round as u32;
    let all = v.round_samples();
    let keys = format!(
        "{}/{}",
        s.keymap.hint(Mode::Iterate, Action::NextSample),
        s.keymap.hint(Mode::Iterate, Action::PrevSample)
    );
    let title = match v.current_sample() {
        Some((i, _)) => format!(" {} eval samples · {}/{} · {keys} ", p.label(), i + 1, all.len()),
        None => format!(" {} eval samples ", p.label()),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    block.render(area, buf);
    let w = inner.width as usize;
    let h = inner.height as usize;
    let dim = Style::default().add_modifier(Modifier::DIM);
    let mut lines: Vec<Line> = vec![Line::styled(
        format!("{:<9}{:>8}{:>8}{:>7}{:>8}", "", "auth", "care", "p_ans", "ppx"),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    lines.push(metrics_row(
        format!("{} {}", p.label(), status(v, p).split(' ').next().unwrap_or("")),
        p.authority,
        p.care,
        p.p_ans_any,
        p.ppx_json,
        Style::default().fg(Color::Cyan),
    ));
    let span = |ci: &crate::eval::Intervals, k: Stat| {
        ci.get(&k)
            .filter(|iv| iv.lo.is_finite() && iv.hi.is_finite())
            .map(|iv| format!("[{:.2},{:.2}]", iv.lo, iv.hi))
            .unwrap_or_else(|| "–".into())
    };
    if !p.ci.is_empty() {
        lines.push(Line::styled(
            clip(
                &format!(
                    "  95%: auth {} care {} p_ans {}",
                    span(&p.ci, Stat::Authority),
                    span(&p.ci, Stat::Care),
                    span(&p.ci, Stat::PAnsAny)
                ),
                w,
            ),
            dim,
        ));
    }
    for c in &p.controls {
        let (mark, color, name) = arm_style(c.arm);
        lines.push(metrics_row(
            format!("{mark} {name}"),
            c.authority,
            c.care,
            c.p_ans_any,
            c.ppx_json,
            Style::default().fg(color),
        ));
    }
    // Did steering with the vector move authority more than each control? (paired, 95 %)
    for c in p.controls.iter().filter(|c| !c.steered_minus.is_empty()) {
        let (_, color, name) = arm_style(c.arm);
        lines.push(Line::styled(
            clip(&format!("  steered−{name} Δauth {}", delta(c.steered_minus.get(&Stat::Authority))), w),
            Style::default().fg(color),
        ));
    }
    let Some((_, smp)) = v.current_sample() else {
        let why = if v.samples_pending.contains_key(&round) {
            "reading this round's eval samples…"
        } else {
            "no eval samples for this round"
        };
        lines.push(Line::styled(why, dim));
        Paragraph::new(lines).render(inner, buf);
        return;
    };
    lines.push(Line::styled(
        clip(
            &format!("item {} · {} · {} · {}", smp.index + 1, smp.foundation, smp.condition.name(), smp.id),
            w,
        ),
        Style::default().add_modifier(Modifier::BOLD),
    ));
    let cases: Vec<&str> = smp.cases.iter().map(|c| case_name(*c)).collect();
    lines.push(Line::styled(
        clip(&format!("answer slot {} · p_ans {}", cases.join("/"), fmt(smp.p_ans_any)), w),
        dim,
    ));
    // Bars take seven lines when they fit beside a few of text and think; else two compact lines of numbers.
    let room = h.saturating_sub(lines.len());
    let bars_full = room >= 7 + 3;
    let bars_h = if bars_full { 7 } else { 2 };
    let rest = room.saturating_sub(bars_h);
    let text_h = if rest >= 4 { 2 } else { rest.min(1) };
    let think_h = rest.saturating_sub(text_h);
    for l in wrap(&smp.text, w, text_h) {
        lines.push(Line::styled(l, Style::default().add_modifier(Modifier::ITALIC)));
    }
    let think = format!("think ({} tok): {}", smp.think_tokens, smp.think);
    for l in wrap(&think, w, think_h) {
        lines.push(Line::styled(l, Style::default().fg(Color::Gray)));
    }
    lines.extend(prob_lines(smp, w, bars_full));
    Paragraph::new(lines).render(inner, buf);
}

/// The seven answer probabilities (forward/reverse averaged) against the human distribution: one bar line
/// per option with the human label marked `»` (and the human percentage after it) and the model's top answer
/// bold, or one compact line.
fn prob_lines(smp: &EvalSample, w: usize, full: bool) -> Vec<Line<'static>> {
    let Some(p) = smp.p else {
        return vec![Line::styled(
            "no seven-way answer (a frame answered elsewhere)",
            Style::default().fg(Color::Red),
        )];
    };
    let top = crate::eval::metrics::argmax7(&p);
    if !full {
        let parts: Vec<String> = FOUNDATIONS
            .iter()
            .map(|f| {
                let mark = if *f == smp.label { "»" } else { "" };
                format!("{mark}{}:{:.2}", &f.word()[..3], p[f.index()])
            })
            .collect();
        return wrap(&parts.join(" "), w, 2).into_iter().map(Line::raw).collect();
    }
    let bar_w = w.saturating_sub(1 + 9 + 1 + 5 + 6).clamp(1, 24);
    FOUNDATIONS
        .iter()
        .map(|f| {
            let i = f.index();
            let human = smp.human.map(|h| format!(" h{:>3.0}%", h[i] * 100.0)).unwrap_or_default();
            let mark = if *f == smp.label { "»" } else { " " };
            let mut style =
                if *f == smp.label { Style::default().fg(Color::Yellow) } else { Style::default() };
            if i == top {
                style = style.add_modifier(Modifier::BOLD);
            }
            Line::from(vec![
                Span::styled(format!("{mark}{:<9} ", f.word()), style),
                Span::styled(bar(p[i], bar_w), Style::default().fg(Color::Cyan)),
                Span::styled(format!(" {:.2}", p[i]), style),
                Span::styled(human, Style::default().add_modifier(Modifier::DIM)),
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_fills_lines_splits_long_words_and_marks_a_cut() {
        assert_eq!(wrap("a bb  ccc\n dd", 6, 5), vec!["a bb", "ccc dd"]);
        assert_eq!(wrap("abcdefgh", 3, 5), vec!["abc", "def", "gh"]);
        assert_eq!(wrap("one two three four", 8, 2), vec!["one two", "three…"]);
        assert_eq!(wrap("one two three", 8, 1), vec!["one two…"]);
        assert!(wrap("x", 0, 3).is_empty());
    }

    #[test]
    fn numbers_fit_their_columns_and_small_ones_do_not_read_as_zero() {
        assert_eq!(fmt(-5.2749), "-5.275");
        assert_eq!(fmt(15.836), "15.836");
        assert_eq!(fmt(30144212834135.098), "3.0e13");
        assert_eq!(fmt(0.000301), "3.0e-4");
        assert_eq!(fmt(0.0), "0.000");
        assert_eq!(fmt(f64::NAN), "–");
    }

    #[test]
    fn bars_scale_to_the_width_in_eighths() {
        assert_eq!(bar(1.0, 4), "████");
        assert_eq!(bar(0.5, 4), "██  ");
        assert_eq!(bar(0.0625, 4), "▎   ");
        assert_eq!(bar(0.0, 3), "   ");
    }
}
