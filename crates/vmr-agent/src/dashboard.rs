//! The web dashboard on the monitoring listener (read-only, server-side HTML, no JavaScript):
//! `/` (every VM with role, peer, state, health and reason, lag against its RPO alert, last
//! point, recovery points, the last hour's throughput as an inline SVG chart, and the host's
//! newest events) and `/vm/NAME` or `/vm/UUID` (one VM's status, statistics window, running
//! operation, events, failover network settings and the CLI commands to run next). Pages
//! refresh themselves every [`REFRESH_SECS`]; the style sheet is inline (compiled in).
//!
//! Served by `http::start` beside `/metrics`, behind the same token check (a browser sends the
//! token as the password of HTTP Basic), from one [`Monitor::gather`] per page: the same
//! gather as a scrape, plus the telemetry ring and one event-log query. Every string from a VM
//! (name, peer, reason, event text) goes through [`esc`].

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use vmr_proto::api::{Health, OperationKind, ReplicationMode, ReplicationState, VmStatus};
use vmr_proto::event::{Event, EventQuery, Severity};

use crate::http::{Monitor, MonitorRouter, VmView};
use crate::telemetry::CycleSample;
use crate::util::now_ms;

/// Seconds between a page's own reloads (`<meta http-equiv="refresh">`).
pub const REFRESH_SECS: u32 = 5;

/// Newest host events on `/`.
pub const OVERVIEW_EVENTS: u32 = 20;

/// Newest events of one VM on its page.
pub const VM_EVENTS: u32 = 30;

/// Minutes of the throughput chart (one bar per minute).
const CHART_MINUTES: usize = 60;

const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// The dashboard's routes.
pub fn routes() -> MonitorRouter {
    Router::new()
        .route("/", get(overview))
        .route("/vm/{id}", get(detail))
}

/// `s` with `&`, `<`, `>`, `"` and `'` replaced by HTML entities (safe in text and in quoted
/// attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as one URL path segment (every byte but the unreserved ones percent-encoded).
fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `s` as one shell word (single-quoted unless plain).
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'/'))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// RFC 3339 UTC, second precision.
fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// A `<time>` element of `ms`.
fn time_el(ms: u64) -> String {
    let t = fmt_time(ms);
    format!("<time datetime=\"{t}\">{}</time>", t.replace('T', " "))
}

/// Human size (binary units).
fn fmt_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Human duration of `ms` (`850 ms`, `12 s`, `3 min 4 s`, `2 h 5 min`).
fn fmt_dur(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if s < 60 {
        format!("{s} s")
    } else if s < 3600 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else if s % 3600 < 60 {
        format!("{} h", s / 3600)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

fn health_class(h: Health) -> &'static str {
    match h {
        Health::Normal => "ok",
        Health::Warning => "warn",
        Health::Critical => "crit",
    }
}

fn severity_class(s: Severity) -> &'static str {
    match s {
        Severity::Info => "ok",
        Severity::Warning => "warn",
        Severity::Critical => "crit",
    }
}

/// A symbol beside the health's word (the word carries the meaning; colour and symbol help).
fn health_mark(h: Health) -> &'static str {
    match h {
        Health::Normal => "\u{25cf}",
        Health::Warning => "\u{25b2}",
        Health::Critical => "\u{2716}",
    }
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;padding:.6rem 1rem;color:#1b1f24;background:#f6f7f9}\
h1{font-size:1.25rem;margin:.2rem 0}h2{font-size:1.05rem;margin:1.2rem 0 .4rem}\
header p,footer{color:#57606a;font-size:.85rem;margin:.2rem 0}\
a{color:#0b5cad}\
.scroll{overflow-x:auto}\
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9rem}\
th,td{border-bottom:1px solid #d8dee4;padding:.35rem .5rem;text-align:left;vertical-align:top}\
th{background:#eef1f4;font-weight:600;white-space:nowrap}\
td.num{text-align:right;white-space:nowrap}\
.h{font-weight:600;white-space:nowrap}.reason{display:block;font-size:.8rem;color:#424a53;max-width:26rem}\
:not(tr).ok{color:#116329}:not(tr).warn{color:#9a6700}:not(tr).crit{color:#b3261e}\
:not(tr).unknown{color:#57606a}\
tr.vm.warn td:first-child{box-shadow:inset 4px 0 #d4a72c}tr.vm.crit td:first-child{box-shadow:inset 4px 0 #cf222e}\
tr.vm.ok td:first-child{box-shadow:inset 4px 0 #2da44e}\
.bar{display:inline-block;width:6rem;height:.6rem;background:#e6e9ed;border-radius:.3rem;overflow:hidden;vertical-align:middle}\
.bar span{display:block;height:100%;background:#2da44e}.bar span.over{background:#cf222e}\
.lagtext{display:block;font-size:.8rem;white-space:nowrap}\
svg.chart{width:200px;height:56px;display:block}svg.chart text{font-size:8px;fill:#57606a}\
svg.chart rect.b{fill:#0969da}svg.chart rect.f{fill:#cf222e}svg.chart line{stroke:#8c959f;stroke-width:.5}\
dl.fields{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .8rem;background:#fff;padding:.5rem;margin:0}\
dl.fields dt{font-weight:600}dl.fields dd{margin:0;overflow-wrap:anywhere}\
pre{background:#fff;border:1px solid #d8dee4;padding:.5rem;overflow-x:auto}\
progress{width:12rem}\
@media (max-width:700px){body{padding:.4rem}table{font-size:.8rem}th,td{padding:.25rem .3rem}\
.hide-narrow{display:none}.bar{width:4rem}dl.fields{grid-template-columns:1fr}}";

/// The page around `body`.
fn page(title: &str, host: &str, now: u64, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>{title} \u{2013} vmreplica {host}</title><style>{STYLE}</style></head><body>\
         <header><h1>{title}</h1><p>Agent <b>{host}</b> \u{b7} {time} \u{b7} this page \
         refreshes itself every {REFRESH_SECS} s \u{b7} <a href=\"/\">all VMs</a> \u{b7} \
         <a href=\"/metrics\">metrics</a></p></header>{body}\
         <footer>vmreplica {version}, read-only.</footer></body></html>\n",
        title = esc(title),
        host = esc(host),
        time = time_el(now),
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// The lag against the RPO alert: a bar filled to lag / RPO and the figures.
fn lag_cell(st: &VmStatus, now: u64) -> String {
    let lag = st
        .lag_ms
        .or_else(|| st.last_point_ms.map(|t| now.saturating_sub(t)));
    let Some(lag) = lag else {
        return "<span class=\"lagtext\">no point yet</span>".to_owned();
    };
    match st.rpo_alert_secs.filter(|r| *r > 0) {
        Some(rpo) => {
            let rpo_ms = rpo.saturating_mul(1000);
            let pct = (lag.saturating_mul(100) / rpo_ms).min(100);
            let over = lag > rpo_ms;
            format!(
                "<span class=\"bar\" title=\"lag {} of the RPO alert {}\"><span{} \
                 style=\"width:{pct}%\"></span></span><span class=\"lagtext{}\">{} / {}{}</span>",
                fmt_dur(lag),
                fmt_dur(rpo_ms),
                if over { " class=\"over\"" } else { "" },
                if over { " crit" } else { "" },
                fmt_dur(lag),
                fmt_dur(rpo_ms),
                if over { " (over the RPO alert)" } else { "" },
            )
        }
        None => format!("<span class=\"lagtext\">{}</span>", fmt_dur(lag)),
    }
}

/// The last hour's throughput: bytes per minute as bars (failed cycles as red marks), with
/// the largest minute and the time axis labelled.
fn chart(history: &[CycleSample], now: u64) -> String {
    const MIN: u64 = 60_000;
    let mut bytes = [0u64; CHART_MINUTES];
    let mut failed = [false; CHART_MINUTES];
    let mut cycles = 0usize;
    for s in history {
        let ago = usize::try_from(now.saturating_sub(s.end_ms) / MIN).unwrap_or(usize::MAX);
        let Some(slot) = CHART_MINUTES.checked_sub(ago + 1) else {
            continue;
        };
        cycles += 1;
        if s.ok {
            bytes[slot] += s.bytes;
        } else {
            failed[slot] = true;
        }
    }
    let max = bytes.iter().copied().max().unwrap_or(0);
    let total: u64 = bytes.iter().sum();
    let mut bars = String::new();
    for (i, b) in bytes.iter().enumerate() {
        let x = 10 + i * 3;
        if *b > 0 && max > 0 {
            let h = ((*b as f64 / max as f64) * 34.0).max(1.0);
            let _ = write!(
                bars,
                "<rect class=\"b\" x=\"{x}\" y=\"{:.1}\" width=\"2.5\" height=\"{h:.1}\"/>",
                46.0 - h
            );
        }
        if failed[i] {
            let _ = write!(
                bars,
                "<rect class=\"f\" x=\"{x}\" y=\"46\" width=\"2.5\" height=\"2\"/>"
            );
        }
    }
    let top = if cycles == 0 {
        "no cycles in the last hour".to_owned()
    } else {
        format!("bytes/min (max {})", fmt_bytes(max))
    };
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 200 56\" role=\"img\" data-cycles=\"{cycles}\" \
         data-bytes=\"{total}\"><title>Bytes per minute over the last hour: {cycles} cycles, \
         {} in all</title><text x=\"10\" y=\"8\">{top}</text>\
         <line x1=\"10\" y1=\"46\" x2=\"190\" y2=\"46\"/>{bars}\
         <text x=\"10\" y=\"55\">\u{2212}60 min</text>\
         <text x=\"190\" y=\"55\" text-anchor=\"end\">now</text></svg>",
        fmt_bytes(total)
    )
}

/// The health cell: word, symbol and reason.
fn health_cell(st: Option<&VmStatus>) -> String {
    match st {
        Some(st) => format!(
            "<span class=\"h {}\">{} {}</span>{}",
            health_class(st.health),
            health_mark(st.health),
            st.health,
            if st.health_reason.is_empty() {
                String::new()
            } else {
                format!("<span class=\"reason\">{}</span>", esc(&st.health_reason))
            }
        ),
        None => "<span class=\"h unknown\">? Unknown</span><span class=\"reason\">the VM's \
                 owner did not answer in time</span>"
            .to_owned(),
    }
}

/// The events table (newest first).
fn events_table(events: &[Event], id: &str) -> String {
    if events.is_empty() {
        return format!("<p id=\"{id}\" class=\"none\">No events.</p>");
    }
    let mut out = format!(
        "<div class=\"scroll\"><table id=\"{id}\"><thead><tr><th>Time</th><th>Severity</th>\
         <th>VM</th><th class=\"hide-narrow\">Kind</th><th>Message</th></tr></thead><tbody>"
    );
    for e in events.iter().rev() {
        let vm = e.vm.as_ref().map_or_else(
            || "<i>host</i>".to_owned(),
            |v| {
                format!(
                    "<a href=\"/vm/{}\">{}</a>",
                    url_segment(&v.name),
                    esc(&v.name)
                )
            },
        );
        let _ = write!(
            out,
            "<tr class=\"event {sev}\" data-kind=\"{kind}\"><td>{time}</td>\
             <td class=\"{sev}\">{severity}</td><td>{vm}</td><td class=\"hide-narrow\">{kind}</td>\
             <td>{msg}</td></tr>",
            sev = severity_class(e.severity),
            kind = esc(&e.kind.to_string()),
            time = time_el(e.time_ms),
            severity = e.severity,
            msg = esc(&e.message),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// One VM row of `/` with its chart.
pub struct OverviewRow {
    /// The VM as the gather saw it.
    pub view: VmView,
    /// Its cycles of the last hour.
    pub history: Vec<CycleSample>,
}

/// The `/` page.
pub fn render_overview(host: &str, rows: &[OverviewRow], events: &[Event], now: u64) -> String {
    let mut body = String::new();
    let (mut n, mut w, mut c) = (0, 0, 0);
    for r in rows {
        match r.view.status.as_ref().map(|s| s.health) {
            Some(Health::Normal) => n += 1,
            Some(Health::Warning) => w += 1,
            Some(Health::Critical) | None => c += 1,
        }
    }
    let _ = write!(
        body,
        "<p id=\"summary\">{} VMs: <span class=\"ok\">{n} Normal</span>, \
         <span class=\"warn\">{w} Warning</span>, <span class=\"crit\">{c} Critical or not \
         answering</span>.</p>",
        rows.len()
    );
    body.push_str("<h2>Virtual machines</h2>");
    if rows.is_empty() {
        body.push_str(
            "<p id=\"vms\" class=\"none\">No VMs on this host yet (<code>vmreplica vm add</code>, \
             <code>vmreplica enable</code>).</p>",
        );
    } else {
        body.push_str(
            "<div class=\"scroll\"><table id=\"vms\"><thead><tr><th>VM</th><th>Role</th>\
             <th class=\"hide-narrow\">Peer</th><th>State</th><th>Health</th>\
             <th>Lag / RPO alert</th><th class=\"hide-narrow\">Last point</th>\
             <th class=\"hide-narrow\">Points</th><th class=\"hide-narrow\">Last hour</th>\
             </tr></thead><tbody>",
        );
        for r in rows {
            let v = &r.view;
            let st = v.status.as_ref();
            let class = st.map_or("unknown", |s| health_class(s.health));
            let _ = write!(
                body,
                "<tr class=\"vm {class}\" data-vm=\"{name}\" data-state=\"{state}\" \
                 data-health=\"{health}\"><td><a href=\"/vm/{href}\">{name}</a></td>\
                 <td>{role}</td><td class=\"hide-narrow\">{peer}</td><td>{state}</td>\
                 <td>{hc}</td><td>{lag}</td><td class=\"hide-narrow\">{last}</td>\
                 <td class=\"num hide-narrow\">{points}</td><td class=\"hide-narrow\">{chart}</td></tr>",
                name = esc(&v.name),
                href = url_segment(&v.name),
                state = st.map_or_else(|| "?".to_owned(), |s| s.state.to_string()),
                health = st.map_or_else(|| "Unknown".to_owned(), |s| s.health.to_string()),
                role = if v.role.is_empty() { "?" } else { v.role },
                peer = esc(&v.peer),
                hc = health_cell(st),
                lag = st.map_or_else(String::new, |s| lag_cell(s, now)),
                last = st
                    .and_then(|s| s.last_point_ms)
                    .map_or_else(|| "\u{2013}".to_owned(), time_el),
                points = st
                    .and_then(|s| s.recovery_points)
                    .map_or_else(|| "\u{2013}".to_owned(), |p| p.to_string()),
                chart = chart(&r.history, now),
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let _ = write!(
        body,
        "<h2>Recent events</h2><p>The newest {OVERVIEW_EVENTS} of this agent's event log \
         (<code>vmreplica events</code>).</p>"
    );
    body.push_str(&events_table(events, "events"));
    page("Replication", host, now, &body)
}

/// The commands an admin would run next for a VM in its state, with why.
pub fn next_commands(st: &VmStatus) -> Vec<(String, &'static str)> {
    use ReplicationState as S;
    let n = shell_word(&st.name);
    let c = |args: &str| format!("vmreplica {args}");
    let mut out = Vec::new();
    match (st.mode, st.state) {
        (ReplicationMode::Primary, S::ReadyForInitialReplication) => out.push((
            c(&format!("start-initial {n}")),
            "start the initial copy now",
        )),
        (ReplicationMode::Primary, S::InitialReplicationInProgress | S::Resynchronizing) => out
            .push((
                c(&format!("status {n} --watch")),
                "follow the copy's progress",
            )),
        (ReplicationMode::Primary, S::Replicating) => {
            out.push((c(&format!("measure {n}")), "replication statistics"));
            out.push((c(&format!("pause {n}")), "pause replication"));
            out.push((
                c(&format!("failover prepare {n} --shutdown")),
                "planned failover: shut the VM down and ship the final cycle",
            ));
        }
        (ReplicationMode::Primary, S::Suspended | S::ResynchronizeSuspended) => {
            out.push((c(&format!("resume {n}")), "resume replication"));
        }
        (ReplicationMode::Primary, S::WaitingForStartResynchronize | S::Error) => out.push((
            c(&format!("resume {n} --resync")),
            "resynchronize: only the blocks that differ are sent",
        )),
        (ReplicationMode::Primary, S::PreparedForFailover) => out.push((
            c(&format!("failover start {n}")),
            "on the replica host: start the VM from the final cycle",
        )),
        (ReplicationMode::Replica, S::Replicating | S::PreparedForFailover) => {
            out.push((
                c(&format!("failover test {n}")),
                "start an isolated test copy; replication goes on",
            ));
            out.push((
                c(&format!("failover start {n}")),
                "run the VM here from its latest point",
            ));
        }
        (ReplicationMode::Replica, S::FailedOverWaitingCompletion) => {
            out.push((
                c(&format!("failover complete {n}")),
                "keep this point and drop the others",
            ));
            out.push((
                c(&format!("failover cancel {n}")),
                "discard what the failed-over VM wrote",
            ));
        }
        (ReplicationMode::Replica, S::FailedOver) => out.push((
            c(&format!("reverse {n}")),
            "replicate back to the old primary",
        )),
        _ => {}
    }
    out.push((c(&format!("status {n}")), "this status in the terminal"));
    out.push((c(&format!("events {n}")), "the VM's event log"));
    out
}

fn field(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, "<dt>{name}</dt><dd>{value}</dd>");
}

fn opt_time(ms: Option<u64>) -> String {
    ms.map_or_else(|| "\u{2013}".to_owned(), time_el)
}

/// The `/vm/NAME` page of a VM whose owner answered.
pub fn render_detail(
    host: &str,
    v: &VmView,
    history: &[CycleSample],
    events: &[Event],
    now: u64,
) -> String {
    let mut b = String::new();
    let Some(st) = &v.status else {
        let _ = write!(
            b,
            "<p id=\"status\" class=\"unknown\">The owner of {} did not answer within its \
             deadline; this page tries again at its next refresh.</p>",
            esc(&v.name)
        );
        b.push_str(&events_table(events, "events"));
        return page(&v.name, host, now, &b);
    };
    let mut f = String::new();
    field(&mut f, "UUID", &v.uuid.to_string());
    field(&mut f, "Role", v.role);
    field(
        &mut f,
        "State",
        &format!("<span id=\"state\">{}</span>", st.state),
    );
    field(&mut f, "Health", &health_cell(Some(st)));
    field(
        &mut f,
        "Frequency",
        &if st.continuous {
            "continuous".to_owned()
        } else if st.frequency_secs > 0 {
            fmt_dur(st.frequency_secs * 1000)
        } else {
            "\u{2013}".to_owned()
        },
    );
    field(&mut f, "Lag / RPO alert", &lag_cell(st, now));
    field(&mut f, "Last point", &opt_time(st.last_point_ms));
    field(
        &mut f,
        "Last replication",
        &opt_time(st.last_replication_ms),
    );
    field(
        &mut f,
        "Last cycle",
        &st.last_cycle
            .map_or_else(|| "\u{2013}".to_owned(), |c| c.to_string()),
    );
    if let Some(bytes) = st.last_cycle_bytes {
        field(&mut f, "Last cycle size", &fmt_bytes(bytes));
    }
    field(&mut f, "Primary", &esc(&st.primary));
    if let Some(a) = &st.primary_address {
        field(&mut f, "Primary address", &esc(a));
    }
    field(&mut f, "Replica", &esc(&st.replica));
    if let Some(p) = st.recovery_points {
        field(&mut f, "Recovery points", &p.to_string());
    }
    if let Some(free) = v.store_free_bytes {
        field(&mut f, "Replica store free", &fmt_bytes(free));
    }
    if let Some(t) = st.initial_at_ms {
        field(&mut f, "Initial replication at", &time_el(t));
    }
    if let Some(p) = &st.failover_program {
        field(
            &mut f,
            "Failover program",
            &format!(
                "<code>{}</code>{}",
                esc(&p.program),
                p.refused.as_ref().map_or_else(String::new, |r| format!(
                    " <span class=\"crit\">refused: {}</span>",
                    esc(r)
                ))
            ),
        );
    }
    let _ = write!(
        b,
        "<h2>Status</h2><dl class=\"fields\" id=\"status\">{f}</dl>"
    );

    b.push_str("<h2>Running operation</h2>");
    match &st.operation {
        Some(op) => {
            let kind = match op.kind {
                OperationKind::InitialCopy => "initial copy",
                OperationKind::Resync => "resynchronization",
                OperationKind::Export => "export of the initial copy",
                OperationKind::Cycle => "cycle",
                OperationKind::Import => "import of a copy",
            };
            let progress = if op.total > 0 {
                let pct = (op.done as f64 / op.total as f64 * 100.0).min(100.0);
                format!(
                    "<progress max=\"100\" value=\"{pct:.0}\">{pct:.0} %</progress> \
                     <b id=\"percent\">{pct:.1} %</b> ({} of {})",
                    fmt_bytes(op.done),
                    fmt_bytes(op.total)
                )
            } else {
                format!("{} gone through", fmt_bytes(op.done))
            };
            let _ = write!(
                b,
                "<p id=\"operation\">{kind}: {progress}; {} sent; started {} ({} ago).</p>",
                fmt_bytes(op.sent),
                time_el(op.started_ms),
                fmt_dur(now.saturating_sub(op.started_ms)),
            );
        }
        None => b.push_str("<p id=\"operation\">None.</p>"),
    }

    let s = &st.stats;
    let mut w = String::new();
    field(&mut w, "Window start", &opt_time(Some(s.window_start_ms)));
    field(
        &mut w,
        "Successful cycles",
        &s.successful_cycles.to_string(),
    );
    field(&mut w, "Missed cycles", &s.missed_cycles.to_string());
    field(&mut w, "Failed attempts", &s.errors.to_string());
    field(&mut w, "Bytes", &fmt_bytes(s.total_bytes));
    field(&mut w, "Largest cycle", &fmt_bytes(s.max_bytes));
    if let Some(avg) = s.total_latency_ms.checked_div(s.successful_cycles) {
        field(&mut w, "Average cycle time", &fmt_dur(avg));
    }
    field(&mut w, "Longest cycle time", &fmt_dur(s.max_latency_ms));
    if st.mode == ReplicationMode::Primary {
        field(&mut w, "Pending", &fmt_bytes(s.pending_bytes));
        field(
            &mut w,
            "App-consistent cycles",
            &s.app_consistent_cycles.to_string(),
        );
        field(
            &mut w,
            "Last app-consistent",
            &opt_time(s.last_app_consistent_ms),
        );
    }
    let _ = write!(
        b,
        "<h2>Statistics window</h2><p>Since the window started (<code>vmreplica measure \
         {} --reset</code> starts a new one).</p><dl class=\"fields\" id=\"stats\">{w}</dl>",
        esc(&shell_word(&st.name))
    );

    let mut t = String::new();
    if let Some(c) = &v.counters {
        field(&mut t, "Succeeded", &c.success.to_string());
        field(&mut t, "Failed", &c.failed.to_string());
        field(&mut t, "Missed", &c.missed.to_string());
        field(&mut t, "Bytes", &fmt_bytes(c.shipped_bytes));
    }
    let _ = write!(
        b,
        "<h2>Last hour</h2>{}<dl class=\"fields\" id=\"telemetry\">{t}</dl>",
        chart(history, now)
    );

    b.push_str("<h2>Failover network settings</h2>");
    match st.failover_network.as_ref().filter(|n| !n.is_empty()) {
        None => b.push_str(
            "<p id=\"failover-network\">None on this host (the guest keeps its own network \
             configuration).</p>",
        ),
        Some(n) => {
            b.push_str("<ul id=\"failover-network\">");
            for i in &n.interfaces {
                let list = |v: Vec<String>| {
                    if v.is_empty() {
                        "\u{2013}".to_owned()
                    } else {
                        esc(&v.join(", "))
                    }
                };
                let _ = write!(
                    b,
                    "<li>{}: addresses {}; gateways {}; DNS {}</li>",
                    i.mac.as_deref().map_or_else(
                        || "the only interface".to_owned(),
                        |m| format!("interface {}", esc(m))
                    ),
                    list(
                        i.addresses
                            .iter()
                            .map(|a| format!("{}/{}", a.addr, a.prefix))
                            .collect()
                    ),
                    list(i.gateways.iter().map(ToString::to_string).collect()),
                    list(i.dns.iter().map(ToString::to_string).collect()),
                );
            }
            if let Some(args) = &n.network_args {
                let _ = write!(
                    b,
                    "<li>QEMU network arguments: <code>{}</code></li>",
                    esc(&args.join(" "))
                );
            }
            b.push_str("</ul>");
        }
    }

    b.push_str("<h2>Next commands</h2><pre id=\"commands\">");
    for (cmd, why) in next_commands(st) {
        let _ = writeln!(b, "{}    <span class=\"unknown\"># {why}</span>", esc(&cmd));
    }
    b.push_str("</pre>");

    let _ = write!(b, "<h2>Recent events</h2><p>The newest {VM_EVENTS}.</p>");
    b.push_str(&events_table(events, "events"));
    page(&v.name, host, now, &b)
}

/// The 404 page of an unknown VM.
pub fn render_not_found(host: &str, id: &str, now: u64) -> String {
    page(
        "VM not found",
        host,
        now,
        &format!(
            "<p id=\"not-found\">No VM named <b>{}</b> (nor with that UUID) on this host. \
             <a href=\"/\">All VMs</a>.</p>",
            esc(id)
        ),
    )
}

fn html(code: StatusCode, text: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// The newest events matching `q`; none (logged) when the log fails.
async fn events(m: &Monitor, q: EventQuery) -> Vec<Event> {
    m.host.events.query(q).await.unwrap_or_else(|e| {
        tracing::warn!("dashboard: {e}");
        Vec::new()
    })
}

async fn overview(State(m): State<Arc<Monitor>>) -> Response {
    let (views, evs) = futures::join!(
        m.gather(),
        events(
            &m,
            EventQuery {
                limit: Some(OVERVIEW_EVENTS),
                ..Default::default()
            }
        )
    );
    let now = now_ms();
    let rows: Vec<OverviewRow> = views
        .into_iter()
        .map(|view| OverviewRow {
            history: m.host.telemetry.history(view.uuid, now),
            view,
        })
        .collect();
    html(
        StatusCode::OK,
        render_overview(&m.host.config.name, &rows, &evs, now),
    )
}

async fn detail(State(m): State<Arc<Monitor>>, Path(id): Path<String>) -> Response {
    let handle = m.vms.get(&id).or_else(|| {
        uuid::Uuid::parse_str(&id)
            .ok()
            .and_then(|u| m.vms.by_uuid(u))
    });
    let host = &m.host.config.name;
    let Some(handle) = handle else {
        return html(StatusCode::NOT_FOUND, render_not_found(host, &id, now_ms()));
    };
    let (views, evs) = futures::join!(
        m.gather(),
        events(
            &m,
            EventQuery {
                vm: Some(handle.name.clone()),
                limit: Some(VM_EVENTS),
                ..Default::default()
            }
        )
    );
    let now = now_ms();
    match views.into_iter().find(|v| v.uuid == handle.uuid) {
        Some(v) => {
            let history = m.host.telemetry.history(v.uuid, now);
            html(StatusCode::OK, render_detail(host, &v, &history, &evs, now))
        }
        // Removed meanwhile.
        None => html(StatusCode::NOT_FOUND, render_not_found(host, &id, now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use vmr_proto::event::{EVENT_FORMAT, EventKind, EventVm};

    fn status(name: &str, state: &str, health: Health, reason: &str) -> VmStatus {
        serde_json::from_value(serde_json::json!({
            "name": name, "uuid": Uuid::from_u128(1), "state": state,
            "health": health, "health_reason": reason, "mode": "Primary", "frequency_secs": 5,
            "primary": "host-a", "replica": "127.0.0.1:9443", "last_replication_ms": null,
            "last_cycle": 4, "stats": vmr_proto::api::ReplicationStats::default(),
            "progress": null, "rpo_alert_secs": 10, "lag_ms": 4000,
            "last_point_ms": 96_000
        }))
        .expect("a status")
    }

    fn view(name: &str, st: Option<VmStatus>) -> VmView {
        VmView {
            name: name.into(),
            uuid: Uuid::from_u128(1),
            role: "primary",
            peer: "127.0.0.1:9443".into(),
            status: st,
            counters: None,
            store_free_bytes: None,
        }
    }

    fn event(name: &str, msg: &str) -> Event {
        Event {
            version: EVENT_FORMAT,
            id: 7,
            time_ms: 90_000,
            host: "host-a".into(),
            vm: Some(EventVm {
                name: name.into(),
                uuid: Uuid::from_u128(1),
                role: ReplicationMode::Primary,
                state: ReplicationState::Suspended,
            }),
            kind: EventKind::StateChanged,
            severity: Severity::Warning,
            message: msg.into(),
            fields: Default::default(),
        }
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(url_segment("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(url_segment("web-1.x_y"), "web-1.x_y");
        assert_eq!(shell_word("web1"), "web1");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn a_hostile_name_reason_and_event_are_escaped_everywhere() {
        let evil = "<script>alert(1)</script>";
        let st = status(evil, "Suspended", Health::Warning, "<img src=x onerror=y>");
        let rows = vec![OverviewRow {
            view: view(evil, Some(st.clone())),
            history: Vec::new(),
        }];
        let ev = [event(evil, "paused <b>by</b> \"admin\"")];
        let pages = [
            render_overview("<h>", &rows, &ev, 100_000),
            render_detail("<h>", &rows[0].view, &[], &ev, 100_000),
            render_not_found("<h>", evil, 100_000),
        ];
        for p in &pages {
            assert!(!p.contains("<script>"), "{p}");
            assert!(!p.contains("<img"), "{p}");
            assert!(!p.contains("<b>by"), "{p}");
            assert!(!p.contains("<h>"), "{p}");
        }
        assert!(pages[0].contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(pages[0].contains("href=\"/vm/%3Cscript%3Ealert%281%29%3C%2Fscript%3E\""));
        assert!(pages[0].contains("&lt;img src=x onerror=y&gt;"));
        assert!(pages[0].contains("paused &lt;b&gt;by&lt;/b&gt; &quot;admin&quot;"));
        // The command line quotes the name for the shell, then escapes it for HTML.
        assert!(
            pages[1].contains("vmreplica resume &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;"),
            "{}",
            pages[1]
        );
    }

    #[test]
    fn the_overview_shows_each_vm_and_works_empty() {
        let empty = render_overview("host-a", &[], &[], 100_000);
        assert!(empty.contains("No VMs on this host yet"), "{empty}");
        assert!(empty.contains("No events."));
        assert!(empty.contains(&format!(
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">"
        )));
        assert!(empty.contains("refreshes itself every 5 s"));

        let rows = vec![
            OverviewRow {
                view: view(
                    "web1",
                    Some(status("web1", "Replicating", Health::Normal, "")),
                ),
                history: vec![
                    CycleSample {
                        end_ms: 40_000,
                        bytes: 4096,
                        duration_ms: 300,
                        ok: true,
                    },
                    CycleSample {
                        end_ms: 99_000,
                        bytes: 1024,
                        duration_ms: 300,
                        ok: true,
                    },
                    CycleSample {
                        end_ms: 99_500,
                        bytes: 0,
                        duration_ms: 0,
                        ok: false,
                    },
                ],
            },
            OverviewRow {
                view: view("db1", None),
                history: Vec::new(),
            },
        ];
        let p = render_overview("host-a", &rows, &[event("web1", "paused")], 100_000);
        assert!(
            p.contains(
                "<tr class=\"vm ok\" data-vm=\"web1\" data-state=\"Replicating\" \
                 data-health=\"Normal\">"
            ),
            "{p}"
        );
        assert!(p.contains("data-vm=\"db1\" data-state=\"?\" data-health=\"Unknown\""));
        // Lag 4 s of a 10 s RPO alert: 40 %.
        assert!(p.contains("style=\"width:40%\""), "{p}");
        assert!(p.contains("4 s / 10 s"));
        // Two minutes with bytes (4 KiB the largest), one failed mark.
        assert!(p.contains("data-cycles=\"3\" data-bytes=\"5120\""), "{p}");
        assert_eq!(p.matches("<rect class=\"b\"").count(), 2);
        assert_eq!(p.matches("<rect class=\"f\"").count(), 1);
        assert!(p.contains("bytes/min (max 4.0 KiB)"));
        assert!(
            p.contains("<tr class=\"event warn\" data-kind=\"state-changed\">"),
            "{p}"
        );
        assert!(p.contains("1 Normal"), "{p}");
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(fmt_dur(850), "850 ms");
        assert_eq!(fmt_dur(12_400), "12 s");
        assert_eq!(fmt_dur(60_000), "1 min");
        assert_eq!(fmt_dur(184_000), "3 min 4 s");
        assert_eq!(fmt_dur(3_600_000), "1 h");
        assert_eq!(fmt_dur(7_500_000), "2 h 5 min");
    }

    #[test]
    fn over_the_rpo_alert_the_bar_is_full_and_says_so() {
        let mut st = status("web1", "Suspended", Health::Warning, "paused");
        st.lag_ms = Some(25_000);
        let cell = lag_cell(&st, 100_000);
        assert!(cell.contains("width:100%"), "{cell}");
        assert!(cell.contains("class=\"over\""), "{cell}");
        assert!(cell.contains("25 s / 10 s (over the RPO alert)"), "{cell}");
    }

    #[test]
    fn next_commands_follow_the_state() {
        let cmds = |state: &str| {
            next_commands(&status("web1", state, Health::Warning, ""))
                .into_iter()
                .map(|(c, _)| c)
                .collect::<Vec<_>>()
        };
        assert!(
            cmds("WaitingForStartResynchronize").contains(&"vmreplica resume web1 --resync".into())
        );
        assert!(cmds("Suspended").contains(&"vmreplica resume web1".into()));
        assert!(
            cmds("ReadyForInitialReplication").contains(&"vmreplica start-initial web1".into())
        );
        assert!(cmds("Replicating").contains(&"vmreplica pause web1".into()));
        let mut replica = status("web1", "FailedOverWaitingCompletion", Health::Warning, "");
        replica.mode = ReplicationMode::Replica;
        let c: Vec<String> = next_commands(&replica)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        assert!(
            c.contains(&"vmreplica failover complete web1".into()),
            "{c:?}"
        );
        assert_eq!(c.last().map(String::as_str), Some("vmreplica events web1"));
    }

    #[test]
    fn the_detail_page_shows_the_operation_and_the_fields() {
        let mut st = status("web1", "Resynchronizing", Health::Normal, "");
        st.operation = Some(vmr_proto::api::OperationProgress {
            kind: OperationKind::Resync,
            done: 1 << 20,
            total: 4 << 20,
            sent: 4096,
            started_ms: 90_000,
        });
        let p = render_detail("host-a", &view("web1", Some(st)), &[], &[], 100_000);
        assert!(
            p.contains("resynchronization: <progress max=\"100\" value=\"25\">"),
            "{p}"
        );
        assert!(p.contains("<b id=\"percent\">25.0 %</b>"), "{p}");
        assert!(p.contains("<span id=\"state\">Resynchronizing</span>"));
        assert!(p.contains("vmreplica status web1 --watch"));
        assert!(p.contains("None on this host"));
        let p = render_detail("host-a", &view("web1", None), &[], &[], 100_000);
        assert!(p.contains("did not answer"), "{p}");
    }

    #[test]
    fn a_continuous_vm_shows_continuous_for_its_frequency() {
        let st = status("web1", "Replicating", Health::Normal, "");
        let p = render_detail("host-a", &view("web1", Some(st.clone())), &[], &[], 100_000);
        assert!(p.contains("<dt>Frequency</dt><dd>5 s</dd>"), "{p}");
        let mut st = st;
        st.frequency_secs = 0;
        st.continuous = true;
        let p = render_detail("host-a", &view("web1", Some(st)), &[], &[], 100_000);
        assert!(p.contains("<dt>Frequency</dt><dd>continuous</dd>"), "{p}");
    }
}
