//! How the CLI prints answers: tables for people, the agent's JSON with `--json`.

use serde_json::Value;
use vmr_proto::api::{AllowEntry, PointInfo, ReplicationMode, VmStatus};

use crate::cli::Command;
use crate::util::{fmt_bytes, fmt_time};

/// What kind of answer is being printed.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A list of [`VmStatus`] shown as Get-VMReplication.
    Status,
    /// A list of [`VmStatus`] shown as Measure-VMReplication.
    Measure,
    /// A list of [`PointInfo`].
    Points,
    /// A list of [`vmr_proto::api::VmEntry`] (`vm list`).
    VmList,
    /// Server identity and entries.
    Server,
    /// A [`vmr_proto::api::FailoverResult`] (`failover ...`, `reverse`).
    Failover,
    /// A list of [`vmr_proto::event::Event`] (`events`).
    Events,
    /// A [`vmr_proto::api::VerifyReport`] or [`vmr_proto::api::LocalVerifyReport`].
    Verify,
    /// Anything else: a message or raw JSON.
    Plain,
    /// A list of [`PointInfo`] of `points --estimate`.
    Estimate,
    /// A list of [`vmr_proto::api::GroupStatus`] (`group list`).
    Groups,
    /// A list of [`vmr_proto::api::GroupPointInfo`] (`group points`).
    GroupPoints,
}

impl Kind {
    /// The kind for a command.
    pub fn of(cmd: &Command) -> Self {
        match cmd {
            Command::Status { .. } => Kind::Status,
            Command::Vm(crate::cli::VmCmd::List) => Kind::VmList,
            Command::Measure { .. } => Kind::Measure,
            Command::Points { estimate: true, .. } => Kind::Estimate,
            Command::Points { .. } => Kind::Points,
            Command::Server(crate::cli::ServerCmd::Show) => Kind::Server,
            Command::Failover(_) | Command::Reverse { .. } => Kind::Failover,
            Command::Events { .. } => Kind::Events,
            Command::Verify { .. } => Kind::Verify,
            Command::Group(crate::cli::GroupCmd::List) => Kind::Groups,
            Command::Group(crate::cli::GroupCmd::Points { .. }) => Kind::GroupPoints,
            _ => Kind::Plain,
        }
    }
}

/// `group list` as a table.
pub fn groups_table(rows: &[vmr_proto::api::GroupStatus]) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| format!("{v} ms"));
    let mut out = format!(
        "{:<16} {:<14} {:>6} {:>6} {:>10} {:>10} {:<30}\n",
        "GROUP", "LAST POINT", "CUTS", "FAILED", "PAUSE", "MAX PAUSE", "MEMBERS"
    );
    for g in rows {
        out.push_str(&format!(
            "{:<16} {:<14} {:>6} {:>6} {:>10} {:>10} {:<30}\n",
            g.name,
            g.last_point.map_or_else(|| "-".into(), |p| p.to_string()),
            g.cuts,
            g.failed_cuts,
            ms(g.last_pause_ms),
            ms(g.max_pause_ms),
            g.members.join(",")
        ));
        if let Some(e) = &g.last_error {
            out.push_str(&format!("  last failed cut: {e}\n"));
        }
    }
    out
}

/// `group points` as a table: one line per group point, each member's point id.
pub fn group_points_table(rows: &[vmr_proto::api::GroupPointInfo]) -> String {
    let mut out = format!("{:<14} {:<24} MEMBER POINTS\n", "GROUP POINT", "CUT");
    for g in rows {
        let members: Vec<String> = g
            .members
            .iter()
            .map(|(n, id)| format!("{n}={id}"))
            .collect();
        out.push_str(&format!(
            "{:<14} {:<24} {}\n",
            g.point,
            fmt_time(g.point),
            members.join(" ")
        ));
    }
    out
}

fn opt_time(t: Option<u64>) -> String {
    t.map_or_else(|| "-".into(), fmt_time)
}

/// What `--json` prints for an answer: the agent's value, except that a bare message (the
/// answer of `vm add`, `enable`, `server allow`, ...) becomes `{"message": "..."}`, so that
/// every command prints a JSON object or array.
pub fn json_shape(value: &Value) -> Value {
    match value {
        Value::String(s) => serde_json::json!({ "message": s }),
        Value::Null => serde_json::json!({}),
        v => v.clone(),
    }
}

/// The `--json` form of an error on stderr: its chain, exit code and the code's name.
pub fn json_error(err: &anyhow::Error, code: i32) -> Value {
    let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
    serde_json::json!({
        "error": chain.join(": "),
        "exit_code": code,
        "kind": crate::exit::name(code),
    })
}

/// Print `value` as `kind`.
pub fn print(kind: Kind, value: &Value, json: bool) {
    if let Kind::Events = kind
        && let Ok(events) = serde_json::from_value::<Vec<vmr_proto::event::Event>>(value.clone())
    {
        print_events(&events, json, true);
        return;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_shape(value)).unwrap_or_default()
        );
        return;
    }
    match kind {
        Kind::Status => match serde_json::from_value::<Vec<VmStatus>>(value.clone()) {
            Ok(rows) => print_status(&rows),
            Err(_) => print_plain(value),
        },
        Kind::Measure => match serde_json::from_value::<Vec<VmStatus>>(value.clone()) {
            Ok(rows) => print_measure(&rows),
            Err(_) => print_plain(value),
        },
        Kind::VmList => match serde_json::from_value::<Vec<vmr_proto::api::VmEntry>>(value.clone())
        {
            Ok(rows) => {
                println!(
                    "{:<14} {:<36} {:<30} {:<22} {:<16} QMP (GUEST AGENT)",
                    "NAME", "UUID", "STATE", "REPLICA", "DISKS"
                );
                for r in rows {
                    let qga = r
                        .qga
                        .as_deref()
                        .map(|q| format!(" ({q})"))
                        .unwrap_or_default();
                    println!(
                        "{:<14} {:<36} {:<30} {:<22} {:<16} {}{qga}",
                        r.name,
                        r.uuid,
                        r.state.to_string(),
                        r.replica.as_deref().unwrap_or("-"),
                        r.disks.join(","),
                        match &r.libvirt {
                            Some(lv) => format!("libvirt domain {} at {}", lv.domain, lv.uri),
                            None => r.qmp.clone(),
                        }
                    );
                }
            }
            Err(_) => print_plain(value),
        },
        Kind::Groups => {
            match serde_json::from_value::<Vec<vmr_proto::api::GroupStatus>>(value.clone()) {
                Ok(rows) => print!("{}", groups_table(&rows)),
                Err(_) => print_plain(value),
            }
        }
        Kind::GroupPoints => {
            match serde_json::from_value::<Vec<vmr_proto::api::GroupPointInfo>>(value.clone()) {
                Ok(rows) => print!("{}", group_points_table(&rows)),
                Err(_) => print_plain(value),
            }
        }
        Kind::Points | Kind::Estimate => {
            match serde_json::from_value::<Vec<PointInfo>>(value.clone()) {
                Ok(rows) => print!("{}", points_table(&rows, matches!(kind, Kind::Estimate))),
                Err(_) => print_plain(value),
            }
        }
        Kind::Server => {
            if let Some(fp) = value.get("fingerprint").and_then(Value::as_str) {
                println!(
                    "name:        {}",
                    value.get("name").and_then(Value::as_str).unwrap_or("")
                );
                println!(
                    "listen:      {}",
                    value.get("listen").and_then(Value::as_str).unwrap_or("")
                );
                println!("fingerprint: {fp}");
                if let Some(p) = value.get("cpu_priority").and_then(Value::as_str) {
                    println!("data path:   CPU priority {p}");
                }
            }
            let entries: Vec<AllowEntry> = value
                .get("allowed")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            println!(
                "{:<16} {:<16} {:<40} FINGERPRINT",
                "PRIMARY", "TRUST GROUP", "STORAGE"
            );
            for e in entries {
                println!(
                    "{:<16} {:<16} {:<40} {}{}",
                    e.primary,
                    e.trust_group,
                    e.storage,
                    e.fingerprint,
                    if e.revoked { " (revoked)" } else { "" }
                );
            }
            let leases: Vec<vmr_proto::lease::WitnessLease> = value
                .get("witness")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            if !leases.is_empty() {
                println!();
                println!("witness of (docs/auto-failover.md):");
                println!(
                    "{:<36} {:>6} {:>12} {:<73} OTHER PARTY",
                    "VM", "EPOCH", "EXPIRES IN", "HOLDER"
                );
                for l in leases {
                    let other = l
                        .entry
                        .parties
                        .iter()
                        .find(|p| **p != l.entry.holder)
                        .cloned()
                        .unwrap_or_default();
                    println!(
                        "{:<36} {:>6} {:>11}s {:<73} {}",
                        l.entry.vm,
                        l.entry.epoch,
                        l.remaining_ms / 1000,
                        l.entry.holder,
                        other
                    );
                }
            }
        }
        // Printed above when the answer is a list of events.
        Kind::Events => print_plain(value),
        Kind::Failover => {
            match serde_json::from_value::<vmr_proto::api::FailoverResult>(value.clone()) {
                Ok(r) => print_failover(&r),
                Err(_) => print_plain(value),
            }
        }
        Kind::Verify => print_verify(value),
        Kind::Plain => print_plain(value),
    }
}

/// How many differing ranges per disk the table shows (`--json` has all).
const RANGES_SHOWN: usize = 8;

fn print_verify(value: &Value) {
    if let Ok(r) = serde_json::from_value::<vmr_proto::api::VerifyReport>(value.clone()) {
        println!(
            "{}: point {} (cut {}) compared with the primary, {} KiB blocks",
            r.name,
            r.point,
            fmt_time(r.cut_ms),
            r.block_size >> 10
        );
        println!(
            "{:<16} {:>10} {:>10} {:>10}  FIRST DIFFERING RANGES (offset+length)",
            "DISK", "BLOCKS", "MATCH", "DIFFER"
        );
        for d in &r.disks {
            let mut shown: Vec<String> = d
                .mismatched
                .iter()
                .take(RANGES_SHOWN)
                .map(|(o, l)| format!("{o}+{l}"))
                .collect();
            if d.mismatched.len() > RANGES_SHOWN {
                shown.push(format!("... {} more", d.mismatched.len() - RANGES_SHOWN));
            }
            println!(
                "{:<16} {:>10} {:>10} {:>10}  {}",
                d.disk,
                d.blocks,
                d.blocks - d.mismatched_blocks,
                d.mismatched_blocks,
                if shown.is_empty() {
                    "-".to_owned()
                } else {
                    shown.join(", ")
                }
            );
        }
        return;
    }
    if let Ok(r) = serde_json::from_value::<vmr_proto::api::LocalVerifyReport>(value.clone()) {
        println!("{}: {} files checked", r.name, r.checks.len());
        println!("{:<16} {:<11} {:<6} FILE", "DISK", "KIND", "RESULT");
        for c in &r.checks {
            println!(
                "{:<16} {:<11} {:<6} {}{}",
                c.disk,
                c.kind,
                if c.ok { "ok" } else { "FAILED" },
                c.file,
                if c.ok {
                    String::new()
                } else {
                    format!(": {}", c.detail)
                }
            );
        }
        return;
    }
    print_plain(value);
}

/// `verify`'s answer says something differs or failed its check: what, for the error (exit
/// code 7); `None` when everything matched or the answer is not a verification report.
pub fn verify_failed(value: &Value) -> Option<String> {
    if let Ok(r) = serde_json::from_value::<vmr_proto::api::VerifyReport>(value.clone()) {
        let n = r.mismatched_blocks();
        return (n > 0).then(|| {
            format!(
                "{}: the replica's point {} differs from the primary in {n} block(s): {}; \
                 `vmreplica resume --resync {}` repairs it",
                r.name,
                r.point,
                r.summary(4),
                r.name
            )
        });
    }
    if let Ok(r) = serde_json::from_value::<vmr_proto::api::LocalVerifyReport>(value.clone()) {
        let bad: Vec<&str> = r
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.file.as_str())
            .collect();
        return (!bad.is_empty()).then(|| {
            format!(
                "{}: {} file(s) failed their check: {}",
                r.name,
                bad.len(),
                bad.join(", ")
            )
        });
    }
    None
}

fn print_failover(r: &vmr_proto::api::FailoverResult) {
    println!("{}", r.message);
    println!("name:   {}", r.name);
    println!("state:  {}", r.state);
    if let Some(p) = r.point {
        println!("point:  {p}");
    }
    if let Some(t) = r.test_id {
        println!("test id: {t}");
    }
    if let Some(q) = &r.qmp {
        println!("qmp:    {q} (pid {})", r.pid.unwrap_or(0));
    }
    for (d, p) in &r.disks {
        println!("disk:   {d} {p}");
    }
    println!("took:   {} ms", r.elapsed_ms);
}

/// Events: one JSON object per line with `--json`; otherwise a table (its header before
/// the first batch).
pub fn print_events(events: &[vmr_proto::event::Event], json: bool, header: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        for e in events {
            let _ = writeln!(out, "{}", e.to_json().unwrap_or_default());
        }
    } else {
        if header {
            let _ = writeln!(
                out,
                "{:>6} {:<21} {:<8} {:<14} {:<22} MESSAGE",
                "ID", "TIME", "SEVERITY", "VM", "KIND"
            );
        }
        for e in events {
            let _ = writeln!(
                out,
                "{:>6} {:<21} {:<8} {:<14} {:<22} {}",
                e.id,
                fmt_time(e.time_ms),
                e.severity.to_string(),
                e.vm.as_ref().map_or("-", |v| v.name.as_str()),
                e.kind.as_str(),
                e.message
            );
        }
    }
    let _ = out.flush();
}

fn print_plain(value: &Value) {
    match value {
        Value::String(s) => println!("{s}"),
        Value::Object(o) if o.get("message").is_some_and(Value::is_string) => {
            println!("{}", o["message"].as_str().unwrap_or_default());
        }
        Value::Null => {}
        v => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

/// The `points` table (with `estimate`, the `points --estimate` one) and its total line.
fn points_table(rows: &[PointInfo], estimate: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let because = |p: &PointInfo| {
        if p.kept_because.is_empty() {
            if estimate { "-" } else { "- (pruned next)" }.to_owned()
        } else {
            p.kept_because.join(", ")
        }
    };
    let own: u64 = rows.iter().map(|p| p.size_bytes).sum();
    if estimate {
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<17} {:>10} {:<5} {:>10} KEPT BECAUSE",
            "ID", "TIME", "TYPE", "SIZE", "KEEP", "AFTER"
        );
        for p in rows {
            let _ = writeln!(
                out,
                "{:<8} {:<22} {:<17} {:>10} {:<5} {:>10} {}",
                p.id,
                fmt_time(p.time_ms),
                p.kind,
                fmt_bytes(p.size_bytes),
                if p.kept_because.is_empty() {
                    "drop"
                } else {
                    "keep"
                },
                p.estimated_bytes.map_or_else(|| "-".to_owned(), fmt_bytes),
                because(p)
            );
        }
        let kept = rows.iter().filter(|p| !p.kept_because.is_empty()).count();
        let after: u64 = rows.iter().filter_map(|p| p.estimated_bytes).sum();
        let _ = writeln!(
            out,
            "keeps {kept} of {} points; {} now, at most {} after (dropped layers merge into \
             the kept point above them)",
            rows.len(),
            fmt_bytes(own),
            fmt_bytes(after)
        );
    } else {
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<17} {:>10} KEPT BECAUSE",
            "ID", "TIME", "TYPE", "SIZE"
        );
        for p in rows {
            let _ = writeln!(
                out,
                "{:<8} {:<22} {:<17} {:>10} {}",
                p.id,
                fmt_time(p.time_ms),
                p.kind,
                fmt_bytes(p.size_bytes),
                because(p)
            );
        }
        let _ = writeln!(out, "{} points, {}", rows.len(), fmt_bytes(own));
    }
    out
}

fn print_status(rows: &[VmStatus]) {
    println!(
        "{:<14} {:<30} {:<9} {:<8} {:>6} {:>11} {:<14} {:<22} {:<21} HEALTH REASON",
        "NAME",
        "STATE",
        "HEALTH",
        "MODE",
        "FREQ",
        "LAG/RPO",
        "PRIMARY",
        "REPLICA",
        "LAST REPLICATION"
    );
    for r in rows {
        let lag = r
            .lag_ms
            .map_or_else(|| "-".to_owned(), |l| format!("{}s", l / 1000));
        let rpo = r
            .rpo_alert_secs
            .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        println!(
            "{:<14} {:<30} {:<9} {:<8} {:>6} {:>11} {:<14} {:<22} {:<21} {}",
            r.name,
            r.state.to_string(),
            r.health.to_string(),
            format!("{:?}", r.mode),
            freq_cell(r),
            format!("{lag}/{rpo}"),
            match &r.primary_address {
                Some(a) => format!("{} ({a})", r.primary),
                None => r.primary.clone(),
            },
            r.replica,
            opt_time(r.last_replication_ms),
            health_reason(r)
        );
        if let Some(x) = &r.extended {
            print_extended_row(x);
        }
        for (i, f) in r.fanout.iter().enumerate() {
            print_fanout_row(i + 2, f);
        }
        if let Some(line) = bandwidth_line(r) {
            println!("{:<14} {line}", "");
        }
        if let Some(a) = &r.auto_failover {
            println!("{:<14} AutoFailover: {}", "", auto_failover_line(a));
        }
    }
}

/// The FREQ column: the interval, or `cont` for continuous mode (whose RPO is the lag).
fn freq_cell(r: &VmStatus) -> String {
    if r.continuous {
        "cont".to_owned()
    } else {
        format!("{}s", r.frequency_secs)
    }
}

/// The second row of a replica VM that forwards its points (`enable --extended`): the
/// outgoing relationship, from this host to the extended replica.
fn print_extended_row(x: &vmr_proto::api::ExtendedStatus) {
    let lag = x
        .lag_ms
        .map_or_else(|| "-".to_owned(), |l| format!("{}s", l / 1000));
    let sent = x
        .last_point_sent
        .map_or_else(|| "none".to_owned(), |p| p.to_string());
    let reason = if x.health_reason.is_empty() {
        String::new()
    } else {
        format!("{}; ", x.health_reason)
    };
    println!(
        "{:<14} {:<30} {:<9} {:<8} {:>5}s {:>11} {:<14} {:<22} {:<21} {reason}last point sent {sent}",
        " \u{2514} extended",
        x.state.to_string(),
        x.health.to_string(),
        "Extended",
        x.frequency_secs,
        format!("{lag}/-"),
        "(this host)",
        x.replica,
        opt_time(x.last_replication_ms),
    );
}

/// A further row of a primary VM that replicates to several replicas (fan-out): relationship
/// `n` (the VM's row is relationship 1), to the replica it names.
fn print_fanout_row(n: usize, f: &VmStatus) {
    let lag = f
        .lag_ms
        .map_or_else(|| "-".to_owned(), |l| format!("{}s", l / 1000));
    println!(
        "{:<14} {:<30} {:<9} {:<8} {:>6} {:>11} {:<14} {:<22} {:<21} {}",
        format!(" \u{2514} fan-out {n}"),
        f.state.to_string(),
        f.health.to_string(),
        "Primary",
        freq_cell(f),
        format!("{lag}/-"),
        f.primary,
        f.replica,
        opt_time(f.last_replication_ms),
        health_reason(f)
    );
}

/// The line under a primary VM's row when a sending limit is set or its last cycle waited
/// for one.
fn bandwidth_line(r: &VmStatus) -> Option<String> {
    let b = r.bandwidth.as_ref()?;
    if b.schedule.is_none() && b.agent_schedule.is_none() && b.wait_ms == 0 {
        return None;
    }
    let limit = if b.limit == 0 {
        "unlimited".to_owned()
    } else {
        format!("{}/s", vmr_proto::bandwidth::rate_text(b.limit))
    };
    let sched = |s: &Option<vmr_proto::bandwidth::BandwidthSchedule>| {
        s.as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    };
    let rate = if b.send_ms > 0 {
        format!(
            ", {:.2} MB/s on the wire",
            b.wire_bytes as f64 / 1e3 / b.send_ms as f64
        )
    } else {
        String::new()
    };
    Some(format!(
        "bandwidth: {limit} now (VM {}, agent {}); last cycle waited {:.1} s for it, {} bytes \
         in {:.1} s{rate}",
        sched(&b.schedule),
        sched(&b.agent_schedule),
        b.wait_ms as f64 / 1000.0,
        b.wire_bytes,
        b.send_ms as f64 / 1000.0,
    ))
}

/// The health reason, with the time a scheduled initial replication starts.
fn health_reason(r: &VmStatus) -> String {
    match r.initial_at_ms {
        Some(at) => format!(
            "{}; initial replication scheduled for {}",
            r.health_reason,
            fmt_time(at)
        ),
        None => r.health_reason.clone(),
    }
}

fn print_measure(rows: &[VmStatus]) {
    for r in rows {
        let s = &r.stats;
        println!("Name                      : {}", r.name);
        println!("State                     : {}", r.state);
        println!(
            "Health                    : {} {}",
            r.health,
            health_reason(r)
        );
        println!("Mode                      : {:?}", r.mode);
        if let Some(p) = &r.retention {
            println!("Retention                 : {p}");
        }
        println!(
            "MonitoringStartTime       : {}",
            fmt_time(s.window_start_ms)
        );
        println!(
            "LastReplicationTime       : {}",
            opt_time(s.last_replication_ms)
        );
        println!(
            "LastAppConsistentTime     : {}",
            opt_time(s.last_app_consistent_ms)
        );
        println!("SuccessfulReplicationCount: {}", s.successful_cycles);
        println!("MissedReplicationCount    : {}", s.missed_cycles);
        println!(
            "AverageReplicationSize    : {}",
            fmt_bytes(s.average_bytes())
        );
        println!("MaximumReplicationSize    : {}", fmt_bytes(s.max_bytes));
        println!("AverageReplicationLatency : {} ms", s.average_latency_ms());
        println!("MaximumReplicationLatency : {} ms", s.max_latency_ms);
        println!("PendingReplicationSize    : {}", fmt_bytes(s.pending_bytes));
        println!("ReplicationErrors         : {}", s.errors);
        if r.mode == ReplicationMode::Primary
            && (s.app_consistent_cycles > 0 || s.quiesce_failures > 0)
        {
            println!("AppConsistentCount        : {}", s.app_consistent_cycles);
            let avg = s
                .total_frozen_ms
                .checked_div(s.app_consistent_cycles)
                .unwrap_or(0);
            println!(
                "GuestFrozenTime           : last {} ms, average {avg} ms, maximum {} ms",
                s.last_frozen_ms.map_or("-".to_owned(), |m| m.to_string()),
                s.max_frozen_ms
            );
            if let (Some(all), Some(call)) = (s.last_frozen_ms, s.last_freeze_call_ms) {
                println!(
                    "LastFreezeBreakdown       : {call} ms hooks and freeze, {} ms file systems frozen with the cut",
                    all.saturating_sub(call)
                );
            }
            println!("FailedFreezeCount         : {}", s.quiesce_failures);
            if let Some(e) = &s.last_quiesce_error {
                println!("LastFreezeError           : {e}");
            }
        }
        if let Some(f) = &r.failover_program {
            match &f.refused {
                None => println!("FailoverProgram           : {} (allowed)", f.program),
                Some(why) => println!("FailoverProgram           : {} (REFUSED: {why})", f.program),
            }
        }
        if let Some(f) = &r.failover_network {
            for i in &f.interfaces {
                println!("FailoverNetwork           : {i}");
            }
            if let Some(a) = &f.network_args {
                println!("FailoverNetworkArgs       : {}", a.join(" "));
            }
        }
        if let Some(a) = &r.auto_failover {
            println!("AutoFailover              : {}", auto_failover_line(a));
        }
        if let Some(x) = &r.extended {
            // Measure-VMReplication -ReplicationRelationshipType Extended.
            let s = &x.stats;
            println!("RelationshipType          : Extended (to {})", x.replica);
            println!("ExtendedState             : {}", x.state);
            println!(
                "ExtendedHealth            : {} {}",
                x.health, x.health_reason
            );
            println!(
                "ExtendedLastPointSent     : {}",
                x.last_point_sent
                    .map_or_else(|| "none".to_owned(), |p| p.to_string())
            );
            println!(
                "ExtendedLastReplication   : {}",
                opt_time(s.last_replication_ms)
            );
            println!("ExtendedSuccessfulCount   : {}", s.successful_cycles);
            println!(
                "ExtendedAverageSize       : {}",
                fmt_bytes(s.average_bytes())
            );
            println!("ExtendedMaximumSize       : {}", fmt_bytes(s.max_bytes));
            println!("ExtendedErrors            : {}", s.errors);
        }
        if !r.fanout.is_empty() {
            // The rows above are relationship 1's; each further one (fan-out) follows.
            println!("Replica                   : {} (relationship 1)", r.replica);
        }
        for (i, f) in r.fanout.iter().enumerate() {
            let s = &f.stats;
            println!(
                "RelationshipType          : FanOut {} (to {})",
                i + 2,
                f.replica
            );
            println!("FanOutState               : {}", f.state);
            println!(
                "FanOutHealth              : {} {}",
                f.health,
                health_reason(f)
            );
            if let Some(p) = &f.retention {
                println!("FanOutRetention           : {p}");
            }
            println!(
                "FanOutLastReplication     : {}",
                opt_time(s.last_replication_ms)
            );
            println!("FanOutSuccessfulCount     : {}", s.successful_cycles);
            println!("FanOutMissedCount         : {}", s.missed_cycles);
            println!(
                "FanOutAverageSize         : {}",
                fmt_bytes(s.average_bytes())
            );
            println!("FanOutMaximumSize         : {}", fmt_bytes(s.max_bytes));
            println!("FanOutPendingSize         : {}", fmt_bytes(s.pending_bytes));
            println!("FanOutErrors              : {}", s.errors);
        }
        println!();
    }
}

/// One line of `status` about automatic failover: the lease holder's side or the takeover
/// watch, with the time to a possible takeover.
pub fn auto_failover_line(a: &vmr_proto::lease::LeaseStatus) -> String {
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    let mut l = format!(
        "{} {} (witness {}, after {} of silence, from the {} point)",
        a.side,
        a.phase,
        a.witness,
        secs(a.auto_failover_ms),
        a.point.as_str()
    );
    if let Some(e) = a.epoch {
        l.push_str(&format!("; lease epoch {e}"));
    }
    if let Some(r) = a.run_left_ms
        && a.phase == "holding"
    {
        l.push_str(&format!("; runs {} more without a renewal", secs(r)));
    }
    if let Some(f) = &a.fenced {
        l.push_str(&format!("; FENCED: {f}"));
    }
    if let Some(s) = a.silence_ms {
        l.push_str(&format!("; primary last heard {} ago", secs(s)));
    }
    if let Some(t) = a.takeover_in_ms {
        l.push_str(&format!("; takeover possible in {}", secs(t)));
    }
    if let Some(e) = &a.last_error {
        l.push_str(&format!("; last: {e}"));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_tables_show_each_group_and_point() {
        let g = vmr_proto::api::GroupStatus {
            name: "db".into(),
            members: vec!["a".into(), "b".into()],
            last_point: Some(42),
            last_pause_ms: Some(3),
            max_pause_ms: Some(9),
            cuts: 5,
            failed_cuts: 1,
            last_error: Some("member 1 left".into()),
        };
        let t = groups_table(&[g]);
        assert!(
            t.contains("db") && t.contains("a,b") && t.contains("3 ms"),
            "{t}"
        );
        assert!(
            t.contains("9 ms") && t.contains("last failed cut: member 1 left"),
            "{t}"
        );
        let p = group_points_table(&[vmr_proto::api::GroupPointInfo {
            point: 1_700_000_000_000,
            members: vec![("a".into(), 7), ("b".into(), 3)],
        }]);
        assert!(p.contains("1700000000000") && p.contains("a=7 b=3"), "{p}");
    }

    #[test]
    fn points_tables_show_reasons_and_estimates() {
        let row = |id, because: &[&str], est| PointInfo {
            id,
            time_ms: 1_796_247_600_000 + id * 5_000,
            kind: "crash-consistent".into(),
            size_bytes: 1 << 20,
            kept_because: because.iter().map(|s| (*s).to_owned()).collect(),
            estimated_bytes: est,
        };
        let rows = vec![
            row(1, &[], None),
            row(2, &["10s #2"], Some(2 << 20)),
            row(3, &["latest", "10s #1"], Some(1 << 20)),
        ];
        let t = points_table(&rows, false);
        assert!(t.contains("KEPT BECAUSE"), "{t}");
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("- (pruned next)")),
            "{t}"
        );
        assert!(
            t.lines()
                .nth(3)
                .is_some_and(|l| l.ends_with("latest, 10s #1")),
            "{t}"
        );
        assert!(t.ends_with("3 points, 3.0 MiB\n"), "{t}");
        let e = points_table(&rows, true);
        assert!(
            e.lines().nth(1).is_some_and(|l| l.contains(" drop ")),
            "{e}"
        );
        assert!(
            e.lines()
                .nth(2)
                .is_some_and(|l| l.contains(" keep ") && l.contains("2.0 MiB")),
            "{e}"
        );
        assert!(
            e.contains("keeps 2 of 3 points; 3.0 MiB now, at most 3.0 MiB after"),
            "{e}"
        );
    }

    #[test]
    fn json_answers_are_objects_or_arrays() {
        assert_eq!(
            json_shape(&Value::String("VM \"a\" registered".into())),
            serde_json::json!({"message": "VM \"a\" registered"})
        );
        assert_eq!(json_shape(&Value::Null), serde_json::json!({}));
        let rows = serde_json::json!([{"name": "a"}]);
        assert_eq!(json_shape(&rows), rows);
    }

    #[test]
    fn json_errors_carry_the_chain_code_and_its_name() {
        let e = crate::util::coded(crate::exit::NOT_FOUND, "unknown VM \"x\"").context("status");
        assert_eq!(
            json_error(&e, 4),
            serde_json::json!({"error": "status: unknown VM \"x\"", "exit_code": 4, "kind": "not-found"})
        );
    }
}
