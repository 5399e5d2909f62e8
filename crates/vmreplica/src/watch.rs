//! `vmreplica status --watch`: the live view. Owns the sampling of the agent's status every
//! interval, the rate and ETA maths over successive samples, the table layout that fits a
//! width (narrower columns first, then fewer), and the terminal handling (alternate screen,
//! in-place redraw, restored on Ctrl-C and exit; plain blocks when stdout is not a terminal).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmr_proto::api::{OperationProgress, Request, VmStatus};

use crate::exit;
use crate::util::fmt_bytes;

/// How long one status request may take before the view says the agent does not answer.
pub const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Time constant of the smoothed rates (s): a sample weighs by how much time it covers.
const TAU_SECS: f64 = 5.0;
/// Width of a snapshot when stdout is not a terminal and `COLUMNS` is not set.
const PLAIN_WIDTH: usize = 120;

// ------------------------------------------------------------------------------- maths

/// The smoothed rate after a new sample `rate` that covers `dt_secs`: an exponential moving
/// average with time constant [`TAU_SECS`]; the first sample is taken as it is.
pub fn smooth(prev: Option<f64>, rate: f64, dt_secs: f64) -> f64 {
    match prev {
        None => rate,
        Some(p) => {
            let alpha = 1.0 - (-dt_secs.max(0.0) / TAU_SECS).exp();
            p + alpha * (rate - p)
        }
    }
}

/// Seconds until `done` reaches `total` at `rate` bytes/s: `None` when the total is unknown
/// (0) or nothing moves; 0 when done.
pub fn eta_secs(done: u64, total: u64, rate: f64) -> Option<u64> {
    if total == 0 {
        return None;
    }
    if done >= total {
        return Some(0);
    }
    if !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    Some(((total - done) as f64 / rate).ceil() as u64)
}

/// Percent of `total` that `done` is (`None` when the total is unknown), at most 100.
pub fn percent(done: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| done.min(total) as f64 * 100.0 / total as f64)
}

/// A duration for a narrow column: `12s`, `3m04s`, `2h05m`, `3d04h`.
pub fn fmt_dur(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// A rate in bytes per second.
pub fn fmt_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", fmt_bytes(bytes_per_sec.max(0.0) as u64))
}

/// What one VM looked like at the last sample.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    /// Data bytes shipped or applied: the window's total plus the running operation's.
    moved: u64,
    /// The running operation's start and position.
    op: Option<(u64, u64)>,
    rate: Option<f64>,
    op_rate: Option<f64>,
}

/// Rates over successive samples, per VM.
#[derive(Debug, Default)]
pub struct Rates {
    last: HashMap<String, Sample>,
}

/// The rates of one VM at one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmRates {
    /// Data bytes per second shipped (primary) or applied (replica), smoothed; `None` before
    /// two samples.
    pub throughput: Option<f64>,
    /// How fast the running operation goes through the disks (bytes/s), for its ETA.
    pub op_rate: Option<f64>,
}

impl Rates {
    /// Take in `s`, sampled at `now_ms`; the VM's rates.
    pub fn update(&mut self, s: &VmStatus, now_ms: u64) -> VmRates {
        let op = s.operation;
        let moved = s.stats.total_bytes.saturating_add(op.map_or(0, |o| o.sent));
        let prev = self.last.get(&s.name).copied();
        let mut rate = None;
        let mut op_rate = None;
        if let Some(p) = prev
            && now_ms > p.at_ms
        {
            let dt = (now_ms - p.at_ms) as f64 / 1000.0;
            // A reset window (`measure --reset`) moves the total back: start again.
            if moved >= p.moved {
                rate = Some(smooth(p.rate, (moved - p.moved) as f64 / dt, dt));
            }
            if let (Some(o), Some((started, done))) = (op, p.op)
                && o.started_ms == started
                && o.done >= done
            {
                op_rate = Some(smooth(p.op_rate, (o.done - done) as f64 / dt, dt));
            }
        }
        // A new operation: its average since it started until two samples of it exist.
        if op_rate.is_none()
            && let Some(o) = op
            && now_ms > o.started_ms
            && o.done > 0
        {
            op_rate = Some(o.done as f64 * 1000.0 / (now_ms - o.started_ms) as f64);
        }
        self.last.insert(
            s.name.clone(),
            Sample {
                at_ms: now_ms,
                moved,
                op: op.map(|o| (o.started_ms, o.done)),
                rate,
                op_rate,
            },
        );
        VmRates {
            throughput: rate,
            op_rate,
        }
    }
}

// ------------------------------------------------------------------------------ layout

/// The columns of the view, in their order on screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Name,
    State,
    Health,
    Lag,
    Last,
    Rate,
    Progress,
    Reason,
}

impl Col {
    const ALL: [Col; 8] = [
        Col::Name,
        Col::State,
        Col::Health,
        Col::Lag,
        Col::Last,
        Col::Rate,
        Col::Progress,
        Col::Reason,
    ];
    /// Dropped in this order when the narrowest columns still do not fit.
    const DROP: [Col; 5] = [
        Col::Reason,
        Col::Last,
        Col::Rate,
        Col::Health,
        Col::Progress,
    ];
    /// Narrowed in this order (down to their minimum) before any is dropped.
    const SHRINK: [Col; 4] = [Col::Reason, Col::Progress, Col::State, Col::Name];

    fn header(self) -> &'static str {
        match self {
            Col::Name => "NAME",
            Col::State => "STATE",
            Col::Health => "HEALTH",
            Col::Lag => "LAG",
            Col::Last => "LAST POINT",
            Col::Rate => "RATE",
            Col::Progress => "PROGRESS",
            Col::Reason => "REASON",
        }
    }

    fn min(self) -> usize {
        match self {
            Col::Name => 6,
            Col::State => 17,
            Col::Health => 8,
            Col::Lag => 5,
            Col::Last => 8,
            Col::Rate => 9,
            Col::Progress => 8,
            Col::Reason => 12,
        }
    }

    fn right(self) -> bool {
        matches!(self, Col::Lag | Col::Rate)
    }
}

/// One VM's row, its cells as text (the progress cell is drawn at its column's width).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    name: String,
    state: String,
    health: String,
    lag: String,
    last: String,
    rate: String,
    progress: Progress,
    reason: String,
}

/// The progress cell's content.
#[derive(Debug, Clone, PartialEq)]
enum Progress {
    None,
    /// A known total: percent, and ETA when known.
    Part {
        percent: f64,
        eta: Option<u64>,
    },
    /// An unknown total (an incremental cycle): the bytes shipped so far.
    Bytes(u64),
}

impl Progress {
    /// The text without a bar.
    fn text(&self) -> String {
        match self {
            Progress::None => "-".into(),
            Progress::Part { percent, eta } => match eta {
                Some(e) => format!("{percent:.1}% ETA {}", fmt_dur(*e)),
                None => format!("{percent:.1}%"),
            },
            Progress::Bytes(b) => format!("+{}", fmt_bytes(*b)),
        }
    }

    /// The width it likes: with a 20-column bar when the total is known.
    fn preferred(&self) -> usize {
        let t = self.text().chars().count();
        match self {
            Progress::Part { .. } => t + 23,
            _ => t,
        }
    }

    /// Drawn at `width`: a bar before the text when there is room for one of 4 or more.
    fn draw(&self, width: usize) -> String {
        let text = self.text();
        let room = width.saturating_sub(text.chars().count() + 3);
        match self {
            Progress::Part { percent, .. } if room >= 4 => {
                let bar = room.min(20);
                let full = ((percent / 100.0) * bar as f64).floor() as usize;
                format!(
                    "[{}{}] {text}",
                    "#".repeat(full.min(bar)),
                    "-".repeat(bar - full.min(bar))
                )
            }
            _ => text,
        }
    }
}

/// The row of `s` at `now_ms` with its rates.
pub fn row_of(s: &VmStatus, rates: VmRates, now_ms: u64) -> Row {
    let progress = match s.operation {
        Some(OperationProgress {
            done, total, sent, ..
        }) => match percent(done, total) {
            Some(p) => Progress::Part {
                percent: p,
                eta: rates.op_rate.and_then(|r| eta_secs(done, total, r)),
            },
            None => Progress::Bytes(sent),
        },
        None => Progress::None,
    };
    let rate = match (rates.throughput, s.operation) {
        (Some(r), _) => fmt_rate(r),
        (None, Some(o)) if now_ms > o.started_ms => {
            fmt_rate(o.sent as f64 * 1000.0 / (now_ms - o.started_ms) as f64)
        }
        _ => "-".into(),
    };
    Row {
        name: s.name.clone(),
        state: s.state.to_string(),
        health: s.health.to_string(),
        lag: s
            .last_replication_ms
            .map_or_else(|| "-".into(), |t| fmt_dur(now_ms.saturating_sub(t) / 1000)),
        last: s
            .last_replication_ms
            .map_or_else(|| "-".into(), |t| point_time(t, now_ms)),
        rate,
        progress,
        reason: if s.health_reason.is_empty() {
            "-".into()
        } else {
            s.health_reason.clone()
        },
    }
}

/// The state's name in at most 17 columns, for a STATE column too narrow for the longest
/// names (Hyper-V's names, shortened by words).
fn short_state(state: &str) -> &str {
    match state {
        "ReadyForInitialReplication" => "ReadyForInitial",
        "InitialReplicationInProgress" => "InitialInProgress",
        "WaitingForInitialReplication" => "WaitingForInitial",
        "WaitingForStartResynchronize" => "WaitingForResync",
        "ResynchronizeSuspended" => "ResyncSuspended",
        "FailedOverWaitingCompletion" => "FailedOverWaiting",
        "PreparedForFailover" => "PreparedFailover",
        other => other,
    }
}

/// A point's time: `HH:MM:SS` (UTC) within the last day, else its date.
fn point_time(t_ms: u64, now_ms: u64) -> String {
    let full = crate::util::fmt_time(t_ms);
    if now_ms.saturating_sub(t_ms) < 86_400_000 {
        full.get(11..19).unwrap_or(&full).to_owned()
    } else {
        full.get(..10).unwrap_or(&full).to_owned()
    }
}

impl Row {
    fn cell(&self, c: Col) -> String {
        match c {
            Col::Name => self.name.clone(),
            Col::State => self.state.clone(),
            Col::Health => self.health.clone(),
            Col::Lag => self.lag.clone(),
            Col::Last => self.last.clone(),
            Col::Rate => self.rate.clone(),
            Col::Progress => self.progress.text(),
            Col::Reason => self.reason.clone(),
        }
    }

    fn preferred(&self, c: Col) -> usize {
        match c {
            Col::Progress => self.progress.preferred(),
            // A very long name is cut rather than pushing everything else out.
            Col::Name => self.name.chars().count().min(NAME_MAX),
            _ => self.cell(c).chars().count(),
        }
    }
}

/// The widest the name column gets.
const NAME_MAX: usize = 24;

/// Separator between columns.
const SEP: &str = "  ";

/// Which columns are shown and how wide, for `rows` in `width` columns.
fn widths(rows: &[Row], width: usize) -> Vec<(Col, usize)> {
    let preferred = |c: Col| {
        rows.iter()
            .map(|r| r.preferred(c))
            .chain(std::iter::once(c.header().len()))
            .max()
            .unwrap_or(0)
    };
    let mut shown: Vec<Col> = Col::ALL.to_vec();
    let mut drops = Col::DROP.iter();
    loop {
        let mut w: Vec<(Col, usize)> = shown.iter().map(|&c| (c, preferred(c))).collect();
        let total = |w: &[(Col, usize)]| {
            w.iter().map(|(_, n)| n).sum::<usize>() + SEP.len() * w.len().saturating_sub(1)
        };
        for s in Col::SHRINK {
            let over = total(&w).saturating_sub(width);
            if over == 0 {
                break;
            }
            if let Some((_, n)) = w.iter_mut().find(|(c, _)| *c == s) {
                // The progress gives up its bar, never its percentage and ETA.
                let content = match s {
                    Col::Progress => rows
                        .iter()
                        .map(|r| r.progress.text().chars().count())
                        .max()
                        .unwrap_or(0),
                    _ => 0,
                };
                let min = s.min().max(s.header().len()).max(content).min(*n);
                *n -= over.min(*n - min);
                // A state column narrower than its longest name shows the short names: no
                // wider than the longest of those.
                if s == Col::State {
                    let short = rows
                        .iter()
                        .map(|r| short_state(&r.state).chars().count())
                        .chain(std::iter::once(s.header().len()))
                        .max()
                        .unwrap_or(0);
                    if *n < preferred(s) {
                        *n = (*n).min(short);
                    }
                }
            }
        }
        if total(&w) <= width {
            // Room left (the state jumped to its short names): back to the reason and the
            // name, up to what they want.
            for c in [Col::Reason, Col::Name] {
                let spare = width.saturating_sub(total(&w));
                if let Some((_, n)) = w.iter_mut().find(|(x, _)| *x == c) {
                    *n += spare.min(preferred(c).saturating_sub(*n));
                }
            }
            return w;
        }
        match drops.next() {
            Some(d) => shown.retain(|c| c != d),
            // Even the fewest columns at their narrowest do not fit: lines are cut.
            None => return w,
        }
    }
}

/// `s` in exactly `width` columns: cut with `…` or padded.
fn fit(s: &str, width: usize, right: bool) -> String {
    let n = s.chars().count();
    if n > width {
        if width == 0 {
            return String::new();
        }
        let mut cut: String = s.chars().take(width - 1).collect();
        cut.push('…');
        cut
    } else if right {
        format!("{s:>width$}")
    } else {
        format!("{s:<width$}")
    }
}

/// `s` cut to `width` columns (trailing spaces dropped).
fn clip(s: &str, width: usize) -> String {
    s.chars()
        .take(width)
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// The table (header first) of `rows` in at most `width` columns per line.
pub fn layout(rows: &[Row], width: usize) -> Vec<String> {
    let cols = widths(rows, width);
    let line = |cells: Vec<String>| clip(&cells.join(SEP), width);
    let mut out = vec![line(
        cols.iter()
            .map(|&(c, w)| fit(c.header(), w, c.right()))
            .collect(),
    )];
    for r in rows {
        out.push(line(
            cols.iter()
                .map(|&(c, w)| match c {
                    Col::Progress => fit(&r.progress.draw(w), w, false),
                    Col::State if r.state.chars().count() > w => {
                        fit(short_state(&r.state), w, false)
                    }
                    _ => fit(&r.cell(c), w, c.right()),
                })
                .collect(),
        ));
    }
    out
}

/// The lines of one snapshot: a title, then the table or what went wrong.
pub fn frame(
    title: &str,
    answer: &Result<Vec<Row>, String>,
    width: usize,
    height: Option<usize>,
) -> Vec<String> {
    let mut lines = vec![clip(title, width)];
    match answer {
        Ok(rows) if rows.is_empty() => lines.push(clip("no VMs", width)),
        Ok(rows) => lines.extend(layout(rows, width)),
        // "retrying" first: a long error is cut at the width.
        Err(e) => lines.push(clip(&format!("retrying: {e}"), width)),
    }
    // On a terminal nothing may scroll: what does not fit is counted on the last line.
    if let Some(h) = height
        && lines.len() > h
        && h >= 2
    {
        let hidden = lines.len() - (h - 1);
        lines.truncate(h - 1);
        lines.push(clip(&format!("… {hidden} more lines"), width));
    }
    lines
}

// ---------------------------------------------------------------------------- terminal

/// The alternate screen with the cursor hidden while it lives; the terminal is given back on
/// drop (also when the view ends with an error).
struct Screen;

impl Screen {
    fn enter() -> Screen {
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        let _ = out.flush();
        Screen
    }

    /// Redraw in place: every line cleared to its end, then the rest of the screen.
    fn draw(&self, lines: &[String]) {
        let mut buf = String::from("\x1b[H");
        for l in lines {
            buf.push_str(l);
            buf.push_str("\x1b[K\r\n");
        }
        buf.push_str("\x1b[J");
        let mut out = std::io::stdout();
        let _ = out.write_all(buf.as_bytes());
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

/// Now, ms since the epoch.
pub use vmr_proto::clock::now_ms;

/// Ask the agent for the status of `name` (all VMs when `None`), from a blocking thread.
pub async fn sample(dir: PathBuf, name: Option<String>) -> anyhow::Result<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        crate::client::call_within(&dir, &Request::Status { name }, Some(CALL_LIMIT))
    })
    .await?
}

/// Run the view until Ctrl-C (or SIGTERM), which ends it with exit code 0. An unknown VM on
/// the first sample is an error; later, an agent that went away or an error is shown on the
/// view's line and asked again every interval.
pub fn run(dir: &Path, name: Option<String>, interval: Duration, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(watch(dir.to_path_buf(), name, interval, json));
    // A request the agent never answered must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    r
}

async fn watch(
    dir: PathBuf,
    name: Option<String>,
    interval: Duration,
    json: bool,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !json;
    let screen = tty.then(Screen::enter);
    let mut rates = Rates::default();
    let mut answered = false;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let what = name.as_deref().unwrap_or("all VMs").to_owned();
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = ticks.tick() => {}
        }
        let got = tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            r = sample(dir.clone(), name.clone()) => r,
        };
        let now = now_ms();
        let answer = match got {
            Ok(v) => {
                answered = true;
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                    continue;
                }
                let rows: Vec<VmStatus> = serde_json::from_value(v)?;
                Ok(rows
                    .iter()
                    .map(|s| row_of(s, rates.update(s, now), now))
                    .collect::<Vec<_>>())
            }
            Err(e) => {
                let code = crate::util::exit_code(&e);
                if !answered && code != exit::NO_AGENT {
                    return Err(e);
                }
                if json {
                    eprintln!("{}", crate::output::json_error(&e, code));
                    continue;
                }
                Err(format!("{e:#}"))
            }
        };
        let title = format!(
            "vmreplica status: {what}, every {}, {} UTC{}",
            humantime::format_duration(interval),
            crate::util::fmt_time(now).get(11..19).unwrap_or(""),
            if tty { " (Ctrl-C to quit)" } else { "" }
        );
        match &screen {
            Some(s) => {
                let (rows, cols) = console::Term::stdout().size();
                // The last column stays free: a full line would wrap on some terminals.
                let lines = frame(
                    &title,
                    &answer,
                    usize::from(cols).saturating_sub(1).max(20),
                    Some(usize::from(rows).max(3)),
                );
                s.draw(&lines);
            }
            None => {
                let width = std::env::var("COLUMNS")
                    .ok()
                    .and_then(|c| c.parse::<usize>().ok())
                    .filter(|w| *w >= 20)
                    .unwrap_or(PLAIN_WIDTH);
                let mut block = frame(&title, &answer, width, None).join("\n");
                block.push_str("\n\n");
                let mut out = std::io::stdout();
                out.write_all(block.as_bytes())?;
                out.flush()?;
            }
        }
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::api::{Health, OperationKind, ReplicationState};

    fn status(name: &str, state: ReplicationState, health: Health, reason: &str) -> VmStatus {
        let mut s: VmStatus = serde_json::from_value(serde_json::json!({
            "name": name, "uuid": uuid::Uuid::nil(), "state": state, "health": health,
            "health_reason": reason, "mode": "Primary", "frequency_secs": 30,
            "primary": "host-a", "replica": "127.0.0.1:1", "last_replication_ms": null,
            "last_cycle": null, "stats": vmr_proto::api::ReplicationStats::default(),
            "progress": null
        }))
        .expect("a status");
        s.last_replication_ms = Some(NOW - 75_000);
        s
    }

    const NOW: u64 = 1_764_700_000_000;

    fn op(done: u64, total: u64, sent: u64, started_ms: u64) -> Option<OperationProgress> {
        Some(OperationProgress {
            kind: OperationKind::InitialCopy,
            done,
            total,
            sent,
            started_ms,
        })
    }

    /// A row of every state, a long name, a long reason, an initial copy and a cycle.
    fn every_state() -> Vec<Row> {
        use ReplicationState as S;
        let states = [
            S::Disabled,
            S::ReadyForInitialReplication,
            S::InitialReplicationInProgress,
            S::WaitingForInitialReplication,
            S::Replicating,
            S::Suspended,
            S::Error,
            S::WaitingForStartResynchronize,
            S::Resynchronizing,
            S::ResynchronizeSuspended,
            S::PreparedForFailover,
            S::FailedOverWaitingCompletion,
            S::FailedOver,
        ];
        let mut rows = Vec::new();
        for (i, st) in states.into_iter().enumerate() {
            let name = if i == 2 {
                "a-very-long-virtual-machine-name-of-the-accounting-department".to_owned()
            } else {
                format!("vm{i}")
            };
            let reason = if i == 6 {
                "the replica refused the cycle: no space left on device (store /var/lib/vmreplica/replicas, 12 MiB free); the next cycle retries in 30 s"
            } else {
                ""
            };
            let health = if reason.is_empty() {
                Health::Normal
            } else {
                Health::Critical
            };
            let mut s = status(&name, st, health, reason);
            let mut rates = VmRates::default();
            if st == S::InitialReplicationInProgress {
                s.operation = op(1 << 30, 4 << 30, 900 << 20, NOW - 60_000);
                rates.op_rate = Some(20.0 * 1024.0 * 1024.0);
                rates.throughput = Some(15.0 * 1024.0 * 1024.0);
            }
            if st == S::Replicating {
                s.operation = op(0, 0, 3 << 20, NOW - 1_000);
            }
            rows.push(row_of(&s, rates, NOW));
        }
        rows
    }

    #[test]
    fn every_width_fits_without_wrapping() {
        let rows = every_state();
        for width in [40, 60, 80, 120, 200] {
            let lines = layout(&rows, width);
            assert_eq!(lines.len(), rows.len() + 1);
            for l in &lines {
                assert!(
                    l.chars().count() <= width,
                    "width {width}: {} columns: {l:?}",
                    l.chars().count()
                );
            }
            let all = lines.join("\n");
            // Name, state and lag are always there, in full or cut.
            assert!(lines[0].starts_with("NAME"), "{all}");
            assert!(
                lines[0].contains("STATE") && lines[0].contains("LAG"),
                "{all}"
            );
            if width >= 60 {
                // The initial copy's percentage is never dropped from 60 columns on.
                assert!(all.contains("25.0%"), "width {width}:\n{all}");
                assert!(all.contains("HEALTH"), "width {width}:\n{all}");
            }
            eprintln!("--- {width}\n{all}");
        }
    }

    #[test]
    fn narrow_widths_cut_and_drop_before_wide_ones() {
        let rows = every_state();
        let header = |w: usize| layout(&rows, w)[0].clone();
        // 200 columns: everything, the reason whole, the long name cut at 24 columns.
        let wide = layout(&rows, 200).join("\n");
        assert!(header(200).contains("REASON") && header(200).contains("LAST POINT"));
        assert!(wide.contains("a-very-long-virtual-mac… "), "{wide}");
        assert!(wide.contains("no space left on device (store"), "{wide}");
        assert!(
            wide.contains("[#####---------------] 25.0% ETA 2m34s"),
            "{wide}"
        );
        // 120: the reason is cut (with …) before anything else goes.
        let mid = layout(&rows, 120).join("\n");
        assert!(header(120).contains("REASON") && header(120).contains("LAST POINT"));
        assert!(mid.contains('…'), "{mid}");
        assert!(!mid.contains("retries in 30 s"), "{mid}");
        // 80: the reason and then the last point are dropped; rate and progress stay.
        let h80 = header(80);
        assert!(!h80.contains("REASON"), "{h80}");
        assert!(h80.contains("RATE") && h80.contains("PROGRESS"), "{h80}");
        let all80 = layout(&rows, 80).join("\n");
        assert!(all80.contains("25.0% ETA 2m34s"), "{all80}");
        assert!(all80.contains("15.0 MiB/s"), "{all80}");
        // 60: fewer columns still, the progress stays.
        let h60 = header(60);
        assert!(h60.contains("PROGRESS") && !h60.contains("RATE"), "{h60}");
    }

    #[test]
    fn progress_cells() {
        let p = Progress::Part {
            percent: 45.2,
            eta: Some(80),
        };
        assert_eq!(p.text(), "45.2% ETA 1m20s");
        assert_eq!(p.draw(15), "45.2% ETA 1m20s");
        assert_eq!(p.draw(22), "[#---] 45.2% ETA 1m20s");
        assert_eq!(p.draw(200).chars().filter(|c| *c == '#').count(), 9);
        assert_eq!(Progress::Bytes(3 << 20).text(), "+3.0 MiB");
        assert_eq!(Progress::None.draw(30), "-");
        let done = Progress::Part {
            percent: 100.0,
            eta: Some(0),
        };
        assert_eq!(done.draw(30), "[##############] 100.0% ETA 0s");
    }

    #[test]
    fn eta_and_rate_maths() {
        assert_eq!(eta_secs(0, 0, 100.0), None);
        assert_eq!(eta_secs(50, 100, 0.0), None);
        assert_eq!(eta_secs(50, 100, f64::NAN), None);
        assert_eq!(eta_secs(100, 100, 0.0), Some(0));
        assert_eq!(eta_secs(150, 100, 1.0), Some(0));
        assert_eq!(eta_secs(0, 100, 10.0), Some(10));
        assert_eq!(eta_secs(1, 100, 10.0), Some(10));
        assert_eq!(eta_secs(0, 100, 30.0), Some(4));
        assert_eq!(percent(1, 4), Some(25.0));
        assert_eq!(percent(5, 4), Some(100.0));
        assert_eq!(percent(5, 0), None);
        assert_eq!(smooth(None, 10.0, 1.0), 10.0);
        // A sample of one time constant moves the average 63 % of the way.
        let s = smooth(Some(0.0), 100.0, TAU_SECS);
        assert!((s - 63.2).abs() < 0.1, "{s}");
        assert_eq!(smooth(Some(7.0), 100.0, 0.0), 7.0);
        for (secs, text) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m00s"),
            (3599, "59m59s"),
            (3600, "1h00m"),
            (86_399, "23h59m"),
            (90_000, "1d01h"),
        ] {
            assert_eq!(fmt_dur(secs), text);
        }
        assert_eq!(fmt_rate(1536.0), "1.5 KiB/s");
        assert_eq!(fmt_rate(-1.0), "0 B/s");
    }

    #[test]
    fn rates_follow_samples() {
        let mut rates = Rates::default();
        let mut s = status(
            "db1",
            ReplicationState::InitialReplicationInProgress,
            Health::Normal,
            "",
        );
        s.operation = op(0, 100 << 20, 0, NOW);
        // First sample: no throughput yet, no operation rate (nothing done).
        let r = rates.update(&s, NOW);
        assert_eq!(r, VmRates::default());
        // One second later 10 MiB went through and 8 MiB were shipped.
        s.operation = op(10 << 20, 100 << 20, 8 << 20, NOW);
        let r = rates.update(&s, NOW + 1000);
        assert_eq!(r.throughput, Some((8 << 20) as f64));
        assert_eq!(r.op_rate, Some((10 << 20) as f64));
        let row = row_of(&s, r, NOW + 1000);
        assert_eq!(
            row.progress,
            Progress::Part {
                percent: 10.0,
                eta: Some(9)
            }
        );
        assert_eq!(row.rate, "8.0 MiB/s");
        // The copy ends: its bytes move into the window's total, the rate goes on smoothly.
        s.operation = None;
        s.stats.total_bytes = 16 << 20;
        let r = rates.update(&s, NOW + 2000);
        let t = r.throughput.expect("a rate");
        assert!(t > (8 << 20) as f64 * 0.9, "{t}");
        assert_eq!(r.op_rate, None);
        // A reset window starts the rate again.
        s.stats.total_bytes = 0;
        assert_eq!(rates.update(&s, NOW + 3000).throughput, None);
        // An operation first seen mid-way: its average since it started.
        let mut t2 = status("db2", ReplicationState::Resynchronizing, Health::Normal, "");
        t2.operation = op(30 << 20, 60 << 20, 1 << 20, NOW - 3000);
        let r = rates.update(&t2, NOW);
        assert_eq!(r.op_rate, Some((10 << 20) as f64));
        assert_eq!(row_of(&t2, r, NOW).lag, "1m15s");
    }

    #[test]
    fn frames_fit_the_screen() {
        let rows = every_state();
        let f = frame("title", &Ok(rows.clone()), 80, Some(10));
        assert_eq!(f.len(), 10);
        assert!(f[9].contains("more lines"), "{f:?}");
        let e = frame(
            "title",
            &Err("cannot reach the vmreplica agent".into()),
            80,
            Some(24),
        );
        assert_eq!(e[1], "retrying: cannot reach the vmreplica agent");
        assert_eq!(frame("t", &Ok(vec![]), 80, None)[1], "no VMs");
        assert_eq!(
            frame("t", &Ok(rows.clone()), 80, None).len(),
            rows.len() + 2
        );
    }
}
