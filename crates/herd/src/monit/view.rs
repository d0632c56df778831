//! Draws the [`Model`]: the app list on the left; the selected app's workers (state, pid,
//! CPU, memory, restarts, uptime and a sparkline of CPU and memory each) and the selected
//! worker's CPU and memory over the last minute on the right; the log tail below; the keys
//! and the last action's outcome at the bottom. Every string that came from a supervisor was
//! escaped before it got here (see `poll.rs`).

use std::time::Instant;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, List, ListItem, ListState, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

use super::model::{Model, Samples};
use crate::commands::bytes;
use crate::fmt::duration_ms;

const KEYS: &str = "↑↓/jk app  Tab/←→ worker  r reload  R restart worker  +/- scale  q quit";
/// Width of a sparkline in the workers table.
const SPARK: usize = 20;

pub fn render(frame: &mut Frame, model: &Model, now: Instant) {
    let [top, logs, bottom] = Layout::vertical([
        Constraint::Percentage(55),
        Constraint::Min(5),
        Constraint::Length(2),
    ])
    .areas(frame.area());
    let [list, right] =
        Layout::horizontal([Constraint::Length(28), Constraint::Min(40)]).areas(top);
    apps(frame, model, list);
    workers(frame, model, right);
    log_tail(frame, model, logs);
    let mut status = model.status_line.clone();
    if model.polled.is_none() {
        status = "polling the apps in HERD_HOME…".into();
    }
    if let Some(age) = model.stale(now) {
        status = format!("(no poll answered for {}s) {status}", age.as_secs());
    }
    let footer = Paragraph::new(vec![
        Line::from(Span::styled(
            status,
            Style::new().add_modifier(Modifier::BOLD),
        )),
        Line::from(Span::styled(KEYS, Style::new().fg(Color::DarkGray))),
    ]);
    frame.render_widget(footer, bottom);
}

fn apps(frame: &mut Frame, model: &Model, area: Rect) {
    let items: Vec<ListItem> = model
        .apps
        .iter()
        .map(|a| {
            let text = match &a.status {
                Ok(s) => format!("{} {}/{} {}", a.name, s.ready, s.desired, s.state),
                Err(_) => format!("{} (no answer)", a.name),
            };
            ListItem::new(text)
        })
        .collect();
    let title = format!(" apps ({}) ", model.apps.len());
    let list = List::new(items)
        .block(Block::bordered().title(title))
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = ListState::default().with_selected(model.selected_index());
    frame.render_stateful_widget(list, area, &mut state);
}

fn workers(frame: &mut Frame, model: &Model, area: Rect) {
    let Some(app) = model.selected_app() else {
        let text = "no apps running in HERD_HOME (start one with `herd start`)";
        frame.render_widget(Paragraph::new(text).block(Block::bordered()), area);
        return;
    };
    let status = match &app.status {
        Ok(s) => s,
        Err(why) => {
            let block = Block::bordered().title(format!(" {} ", app.name));
            frame.render_widget(
                Paragraph::new(format!("no answer: {why}")).block(block),
                area,
            );
            return;
        }
    };
    let title = format!(
        " {} — {} {}, {}/{} ready, supervisor pid {}, up {} ",
        app.name,
        status.kind,
        status.state,
        status.ready,
        status.desired,
        status.pid,
        duration_ms(status.uptime_ms)
    );
    let [table_area, charts] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(8)]).areas(area);
    let header = Row::new([
        "inst",
        "pid",
        "state",
        "cpu",
        "memory",
        "restarts",
        "uptime",
        "cpu (1m)",
        "memory (1m)",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let empty = Samples::default();
    let rows: Vec<Row> = status
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let samples = model
                .history
                .get(&(app.name.to_string(), w.instance))
                .unwrap_or(&empty);
            let cpu: Vec<f64> = samples.cpu.iter().copied().collect();
            let mem: Vec<f64> = samples.memory.iter().map(|&m| m as f64).collect();
            let pid = if w.pid == 0 {
                "-".to_string()
            } else {
                w.pid.to_string()
            };
            let row = Row::new(vec![
                Cell::from(w.instance.to_string()),
                Cell::from(pid),
                Cell::from(w.state.as_str()),
                Cell::from(format!("{:.1}%", w.cpu_percent)),
                Cell::from(bytes(w.memory_bytes)),
                Cell::from(w.restarts.to_string()),
                Cell::from(duration_ms(w.uptime_ms)),
                Cell::from(spark(&cpu, 100.0)),
                Cell::from(spark_range(&mem)),
            ]);
            if i == model.instance {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(SPARK as u16),
        Constraint::Length(SPARK as u16),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(title));
    frame.render_widget(table, table_area);
    selected_charts(frame, model, charts);
}

/// The selected worker's CPU and memory over the last minute, full width.
fn selected_charts(frame: &mut Frame, model: &Model, area: Rect) {
    let (Some(app), Some(instance)) = (model.selected.as_ref(), model.selected_instance()) else {
        return;
    };
    let Some(samples) = model.history.get(&(app.to_string(), instance)) else {
        return;
    };
    let [cpu_area, mem_area] =
        Layout::vertical([Constraint::Length(4), Constraint::Length(4)]).areas(area);
    // Tenths of a percent, so that an idle worker's 0.3% still shows.
    let cpu: Vec<u64> = samples.cpu.iter().map(|c| (c * 10.0) as u64).collect();
    let peak = samples.cpu.iter().copied().fold(0.0, f64::max);
    let cpu_chart = Sparkline::default()
        .block(Block::bordered().title(format!(
            " worker {instance}: cpu, peak {peak:.1}% in the last minute "
        )))
        .data(&cpu)
        .max(cpu.iter().copied().max().unwrap_or(0).max(10))
        .style(Style::new().fg(Color::Green));
    frame.render_widget(cpu_chart, cpu_area);
    let kib: Vec<u64> = samples.memory.iter().map(|m| m / 1024).collect();
    let top = samples.memory.iter().copied().max().unwrap_or(0);
    let mem_chart = Sparkline::default()
        .block(Block::bordered().title(format!(
            " worker {instance}: memory, peak {} in the last minute ",
            bytes(top)
        )))
        .data(&kib)
        .style(Style::new().fg(Color::Cyan));
    frame.render_widget(mem_chart, mem_area);
}

fn log_tail(frame: &mut Frame, model: &Model, area: Rect) {
    let height = area.height.saturating_sub(2) as usize;
    let (title, lines): (String, Vec<Line>) = match (&model.logs, &model.selected) {
        (Some((app, Ok(lines))), Some(selected)) if app == selected => (
            format!(" logs: {app} "),
            lines[lines.len().saturating_sub(height)..]
                .iter()
                .map(|l| Line::from(l.as_str()))
                .collect(),
        ),
        (Some((app, Err(why))), Some(selected)) if app == selected => {
            (format!(" logs: {app} "), vec![Line::from(why.as_str())])
        }
        (_, Some(selected)) => (format!(" logs: {selected} "), vec![Line::from("…")]),
        (_, None) => (" logs ".into(), Vec::new()),
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

/// A text sparkline of the last [`SPARK`] values, scaled to their peak (at least `floor`,
/// so that noise near zero stays flat).
pub fn spark(values: &[f64], floor: f64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &values[values.len().saturating_sub(SPARK)..];
    let peak = tail.iter().copied().fold(floor, f64::max);
    tail.iter()
        .map(|&v| {
            let level = (v.max(0.0) / peak * 7.0).round() as usize;
            BARS[level.min(7)]
        })
        .collect()
}

/// A text sparkline of the last [`SPARK`] values between their low and their peak: memory
/// moves little against its size, so a scale from zero would show a flat full bar. A steady
/// value is a flat middle line.
pub fn spark_range(values: &[f64]) -> String {
    let tail = &values[values.len().saturating_sub(SPARK)..];
    let low = tail.iter().copied().fold(f64::INFINITY, f64::min);
    let high = tail.iter().copied().fold(0.0, f64::max);
    if high - low <= high * 0.001 {
        return "▄".repeat(tail.len());
    }
    let shifted: Vec<f64> = tail.iter().map(|v| v - low).collect();
    spark(&shifted, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_to_the_peak_and_keep_the_newest() {
        assert_eq!(spark(&[0.0, 50.0, 100.0], 100.0), "▁▅█");
        assert_eq!(spark(&[0.1, 0.2], 100.0), "▁▁", "idle stays flat");
        let many: Vec<f64> = (0..30).map(f64::from).collect();
        let s = spark(&many, 1.0);
        assert_eq!(s.chars().count(), SPARK);
        assert!(s.ends_with('█'));
        assert_eq!(spark(&[], 1.0), "");
        assert_eq!(spark_range(&[5e7, 5e7, 5e7]), "▄▄▄", "steady memory");
        assert_eq!(spark_range(&[4e7, 5e7, 6e7]), "▁▅█");
        assert_eq!(spark_range(&[]), "");
    }
}
