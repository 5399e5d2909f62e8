//! What monitoring systems run: `vmreplica check` (a Nagios/Icinga/Checkmk plugin: one status
//! line with perfdata, exit 0/1/2/3) and `status --format prtg|zabbix-discovery|zabbix` (PRTG
//! EXE/Script Advanced JSON, Zabbix low-level discovery and item values). Each format is a
//! pure function of the status rows and the time; the runners only fetch the rows.

use std::path::Path;

use serde_json::{Value, json};
use vmr_proto::api::{Health, ReplicationMode, Request, VmStatus};

pub use crate::cli::{Format, Threshold};

/// Plugin exit codes (Nagios plugin guidelines).
pub mod plugin {
    /// OK.
    pub const OK: i32 = 0;
    /// WARNING.
    pub const WARNING: i32 = 1;
    /// CRITICAL.
    pub const CRITICAL: i32 = 2;
    /// UNKNOWN: the agent is unreachable, the VM is unknown, or the answer is unusable.
    pub const UNKNOWN: i32 = 3;
}

/// A VM's replication lag at `now_ms` in whole seconds (none before its first point).
/// What a relative lag threshold (`2x`) multiplies: the VM's interval, or for continuous mode
/// its RPO target (`vmr_core::CONTINUOUS_TARGET_SECS`, 30 s); 0 when not enabled.
fn threshold_base(s: &VmStatus) -> u64 {
    if s.continuous {
        vmr_core::CONTINUOUS_TARGET_SECS
    } else {
        s.frequency_secs
    }
}

pub fn lag_secs(s: &VmStatus, now_ms: u64) -> Option<u64> {
    s.last_point_ms.map(|t| now_ms.saturating_sub(t) / 1000)
}

fn health_code(h: Health) -> i32 {
    match h {
        Health::Normal => plugin::OK,
        Health::Warning => plugin::WARNING,
        Health::Critical => plugin::CRITICAL,
    }
}

fn word(code: i32) -> &'static str {
    match code {
        plugin::OK => "OK",
        plugin::WARNING => "WARNING",
        plugin::CRITICAL => "CRITICAL",
        _ => "UNKNOWN",
    }
}

/// A perfdata label: quoted, a quote doubled, `=` replaced (the plugin guidelines).
fn perf_label(name: &str, what: &str) -> String {
    format!("'{}_{what}'", name.replace('\'', "''").replace('=', "_"))
}

/// One row per relationship: a primary VM that replicates to several replicas (fan-out)
/// gives a row per replica, each named `NAME to HOST:PORT`; other rows are as they are.
fn relationships(rows: &[VmStatus]) -> Vec<VmStatus> {
    let mut out = Vec::new();
    for s in rows {
        if s.fanout.is_empty() {
            out.push(s.clone());
            continue;
        }
        for r in std::iter::once(s).chain(s.fanout.iter()) {
            let mut r = r.clone();
            r.name = format!("{} to {}", s.name, r.replica);
            r.fanout.clear();
            out.push(r);
        }
    }
    out
}

/// The plugin's answer for `rows` at `now_ms`: its exit code and its one line.
pub fn check_report(
    rows: &[VmStatus],
    now_ms: u64,
    warn: Threshold,
    crit: Threshold,
) -> (i32, String) {
    let mut code = plugin::OK;
    let mut problems = Vec::new();
    let mut perf = Vec::new();
    let vms = rows.len();
    let rows = &relationships(rows);
    for s in rows {
        let mut vm_code = health_code(s.health);
        let mut why = Vec::new();
        if vm_code != plugin::OK {
            let reason = s.health_reason.split(';').next().unwrap_or("").trim();
            why.push(if reason.is_empty() {
                format!("health {}", s.health)
            } else {
                format!("health {} ({reason})", s.health)
            });
        }
        let base = threshold_base(s);
        let (w, c) = (warn.secs(base), crit.secs(base));
        let lag = lag_secs(s, now_ms);
        if let Some(lag) = lag.filter(|_| base > 0) {
            let over = match (w, c) {
                (_, Some(c)) if lag >= c => Some((plugin::CRITICAL, c)),
                (Some(w), _) if lag >= w => Some((plugin::WARNING, w)),
                _ => None,
            };
            if let Some((lc, limit)) = over {
                vm_code = vm_code.max(lc);
                why.push(format!("lag {lag}s >= {limit}s"));
            }
        }
        if vm_code != plugin::OK {
            problems.push(format!("{} {}: {}", s.name, word(vm_code), why.join(", ")));
        }
        code = code.max(vm_code);
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        if let Some(lag) = lag {
            perf.push(format!(
                "{}={lag}s;{};{};0;",
                perf_label(&s.name, "lag"),
                opt(w),
                opt(c)
            ));
        }
        if s.mode == ReplicationMode::Primary {
            perf.push(format!(
                "{}={}B;;;0;",
                perf_label(&s.name, "pending"),
                s.stats.pending_bytes
            ));
        }
    }
    let summary = if rows.is_empty() {
        "no VMs on this host".to_owned()
    } else if problems.is_empty() {
        let n = vms;
        let extra = rows.len() - vms;
        format!(
            "{n} VM{} replicating normally{}",
            if n == 1 { "" } else { "s" },
            if extra > 0 {
                format!(" ({} relationships)", rows.len())
            } else {
                String::new()
            }
        )
    } else {
        problems.join("; ")
    };
    let mut line = format!("VMREPLICA {} - {summary}", word(code));
    if !perf.is_empty() {
        line.push_str(" | ");
        line.push_str(&perf.join(" "));
    }
    (code, line)
}

/// The plugin's UNKNOWN line for an error.
pub fn check_unknown(err: &anyhow::Error) -> String {
    let msg = format!("{err:#}").replace(['\n', '|'], " ");
    format!("VMREPLICA UNKNOWN - {msg}")
}

/// Run `vmreplica check`: print its line, return its exit code.
pub fn check(dir: &Path, name: Option<String>, warn: Threshold, crit: Threshold) -> i32 {
    match rows(dir, name) {
        Ok(rows) => {
            let (code, line) = check_report(&rows, vmr_agent::util::now_ms(), warn, crit);
            println!("{line}");
            code
        }
        Err(e) => {
            println!("{}", check_unknown(&e));
            plugin::UNKNOWN
        }
    }
}

fn rows(dir: &Path, name: Option<String>) -> anyhow::Result<Vec<VmStatus>> {
    let v = crate::client::call(dir, &Request::Status { name })?;
    Ok(serde_json::from_value(v)?)
}

/// PRTG EXE/Script Advanced JSON: per VM the channels lag, pending, health and last cycle
/// size, with PRTG's limits (lag: warning at `warn`, error at `crit`; health: warning at 1,
/// error at 2).
pub fn prtg(rows: &[VmStatus], now_ms: u64, warn: Threshold, crit: Threshold) -> Value {
    let mut result = Vec::new();
    for s in rows {
        let mut lag = json!({
            "channel": format!("{} lag", s.name),
            "value": lag_secs(s, now_ms).unwrap_or(0),
            "unit": "TimeSeconds",
        });
        let base = threshold_base(s);
        if let (Some(w), Some(c)) = (warn.secs(base), crit.secs(base)) {
            lag["limitmode"] = json!(1);
            lag["limitmaxwarning"] = json!(w);
            lag["limitmaxerror"] = json!(c);
        }
        result.push(lag);
        result.push(json!({
            "channel": format!("{} pending", s.name),
            "value": s.stats.pending_bytes,
            "unit": "BytesDisk",
        }));
        result.push(json!({
            "channel": format!("{} health", s.name),
            "value": health_code(s.health),
            "unit": "Custom",
            "customunit": "0 ok, 1 warn, 2 crit",
            "limitmode": 1,
            "limitmaxwarning": 0,
            "limitmaxerror": 1,
        }));
        result.push(json!({
            "channel": format!("{} last cycle size", s.name),
            "value": s.last_cycle_bytes.unwrap_or(0),
            "unit": "BytesDisk",
        }));
    }
    let (_, line) = check_report(rows, now_ms, warn, crit);
    let text = line
        .split(" | ")
        .next()
        .unwrap_or("")
        .trim_start_matches("VMREPLICA ")
        .to_owned();
    json!({"prtg": {"result": result, "text": text}})
}

/// PRTG's error answer.
pub fn prtg_error(err: &anyhow::Error) -> Value {
    json!({"prtg": {"error": 1, "text": format!("{err:#}")}})
}

/// Zabbix low-level discovery: one object per VM with its macros.
pub fn zabbix_discovery(rows: &[VmStatus]) -> Value {
    Value::Array(
        rows.iter()
            .map(|s| {
                json!({
                    "{#VM}": s.name,
                    "{#UUID}": s.uuid.to_string(),
                    "{#ROLE}": role(s),
                    "{#PEER}": peer(s),
                })
            })
            .collect(),
    )
}

fn role(s: &VmStatus) -> &'static str {
    match s.mode {
        ReplicationMode::Primary => "primary",
        ReplicationMode::Replica => "replica",
    }
}

fn peer(s: &VmStatus) -> &str {
    match s.mode {
        ReplicationMode::Primary => &s.replica,
        ReplicationMode::Replica => &s.primary,
    }
}

/// Zabbix item values: an object by VM name (a master item; the template's dependent items
/// pick each value with JSONPath `$["VM"].lag`).
pub fn zabbix(rows: &[VmStatus], now_ms: u64) -> Value {
    let mut out = serde_json::Map::new();
    for s in rows {
        out.insert(
            s.name.clone(),
            json!({
                "role": role(s),
                "state": s.state.to_string(),
                "health": health_code(s.health),
                "health_reason": s.health_reason,
                "lag": lag_secs(s, now_ms),
                "frequency": s.frequency_secs,
                "continuous": s.continuous,
                "pending_bytes": s.stats.pending_bytes,
                "last_cycle_bytes": s.last_cycle_bytes,
                "recovery_points": s.recovery_points,
                "last_point": s.last_point_ms.map(|t| t / 1000),
            }),
        );
    }
    Value::Object(out)
}

/// Run `status --format F` (not `table`): print the format's JSON; PRTG's error JSON (exit
/// 0: PRTG reads the error from it) when the agent cannot answer, else the error.
pub fn status(dir: &Path, name: Option<String>, format: Format) -> anyhow::Result<()> {
    let now = vmr_agent::util::now_ms();
    let (warn, crit) = (Threshold::Times(2.0), Threshold::Times(4.0));
    let value = match (format, rows(dir, name)) {
        (Format::Prtg, Ok(rows)) => prtg(&rows, now, warn, crit),
        (Format::Prtg, Err(e)) => prtg_error(&e),
        (Format::ZabbixDiscovery, rows) => zabbix_discovery(&rows?),
        (Format::Zabbix, rows) => zabbix(&rows?, now),
        (Format::Table, rows) => serde_json::to_value(rows?)?,
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_threshold;

    const NOW: u64 = 1_000_000_000;

    fn row(name: &str, mode: ReplicationMode, health: Health, lag: Option<u64>) -> VmStatus {
        let mut s: VmStatus = serde_json::from_value(json!({
            "name": name, "uuid": uuid::Uuid::from_u128(1), "state": "Replicating",
            "health": health, "health_reason": "", "mode": mode, "frequency_secs": 30,
            "primary": "host-a", "replica": "10.0.0.2:9443", "last_replication_ms": null,
            "last_cycle": null, "stats": vmr_proto::api::ReplicationStats::default(),
            "progress": null
        }))
        .expect("a status");
        s.last_point_ms = lag.map(|l| NOW - l * 1000);
        s.stats.pending_bytes = 3 << 20;
        s.last_cycle_bytes = Some(4096);
        s
    }

    const W: Threshold = Threshold::Times(2.0);

    /// A VM replicating to two replicas (fan-out): a verdict and perfdata per relationship,
    /// each named `NAME to HOST:PORT`; the worst one decides.
    #[test]
    fn check_names_each_relationship_of_a_fanned_out_vm() {
        let mut vm = row("web1", ReplicationMode::Primary, Health::Normal, Some(12));
        let mut c = row("web1", ReplicationMode::Primary, Health::Normal, Some(20));
        c.replica = "10.0.0.3:9443".into();
        vm.fanout = vec![c.clone()];
        let (code, line) = check_report(std::slice::from_ref(&vm), NOW, W, C);
        assert_eq!(code, plugin::OK);
        assert!(
            line.starts_with("VMREPLICA OK - 1 VM replicating normally (2 relationships) | ")
                && line.contains("'web1 to 10.0.0.2:9443_lag'=12s")
                && line.contains("'web1 to 10.0.0.3:9443_lag'=20s"),
            "{line}"
        );
        c.health = Health::Critical;
        c.health_reason = "cannot replicate".into();
        vm.fanout = vec![c];
        let (code, line) = check_report(&[vm], NOW, W, C);
        assert_eq!(code, plugin::CRITICAL);
        assert!(
            line.starts_with(
                "VMREPLICA CRITICAL - web1 to 10.0.0.3:9443 CRITICAL: health Critical (cannot replicate)"
            ),
            "{line}"
        );
    }
    const C: Threshold = Threshold::Times(4.0);

    #[test]
    fn thresholds_parse_relative_and_absolute() {
        assert_eq!(parse_threshold("2x"), Ok(Threshold::Times(2.0)));
        assert_eq!(parse_threshold("1.5x"), Ok(Threshold::Times(1.5)));
        assert_eq!(parse_threshold("90s"), Ok(Threshold::Secs(90)));
        assert_eq!(parse_threshold("10m"), Ok(Threshold::Secs(600)));
        assert_eq!(parse_threshold("1h"), Ok(Threshold::Secs(3600)));
        assert_eq!(parse_threshold("45"), Ok(Threshold::Secs(45)));
        for bad in ["", "x", "0x", "-1x", "0s", "10d", "inf x", "NaNx"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
        assert_eq!(Threshold::Times(1.5).secs(30), Some(45));
        assert_eq!(Threshold::Times(2.0).secs(0), None);
        assert_eq!(Threshold::Secs(90).secs(0), Some(90));
    }

    /// A continuous VM has no interval: relative thresholds are multiples of its RPO target
    /// (30 s), so `2x` warns at 60 s of lag.
    #[test]
    fn continuous_vms_are_judged_against_their_rpo_target() {
        let mut s = row("cdp", ReplicationMode::Primary, Health::Normal, Some(61));
        s.frequency_secs = 0;
        s.continuous = true;
        let (code, line) = check_report(std::slice::from_ref(&s), NOW, W, C);
        assert_eq!(code, plugin::WARNING, "{line}");
        assert!(line.contains("lag 61s >= 60s"), "{line}");
        s.last_point_ms = Some(NOW - 3_000);
        let (code, _) = check_report(std::slice::from_ref(&s), NOW, W, C);
        assert_eq!(code, plugin::OK);
        let z = zabbix(std::slice::from_ref(&s), NOW);
        assert_eq!(z["cdp"]["continuous"], json!(true));
        assert_eq!(z["cdp"]["frequency"], json!(0));
    }

    #[test]
    fn check_is_one_line_with_perfdata_and_the_worst_code() {
        let ok = row("web1", ReplicationMode::Primary, Health::Normal, Some(12));
        let (code, line) = check_report(std::slice::from_ref(&ok), NOW, W, C);
        assert_eq!(code, plugin::OK);
        assert_eq!(
            line,
            "VMREPLICA OK - 1 VM replicating normally | 'web1_lag'=12s;60;120;0; 'web1_pending'=3145728B;;;0;"
        );
        // Lag over the warning threshold; a replica has no pending bytes.
        let late = row("db'1", ReplicationMode::Replica, Health::Normal, Some(75));
        let (code, line) = check_report(&[ok.clone(), late], NOW, W, C);
        assert_eq!(code, plugin::WARNING);
        assert_eq!(
            line,
            "VMREPLICA WARNING - db'1 WARNING: lag 75s >= 60s | 'web1_lag'=12s;60;120;0; 'web1_pending'=3145728B;;;0; 'db''1_lag'=75s;60;120;0;"
        );
        // Absolute thresholds, over the critical one.
        let (code, line) = check_report(
            &[row(
                "web1",
                ReplicationMode::Primary,
                Health::Normal,
                Some(700),
            )],
            NOW,
            Threshold::Secs(90),
            Threshold::Secs(600),
        );
        assert_eq!(code, plugin::CRITICAL);
        assert!(
            line.starts_with(
                "VMREPLICA CRITICAL - web1 CRITICAL: lag 700s >= 600s | 'web1_lag'=700s;90;600;0;"
            ),
            "{line}"
        );
        // Health maps too, with its first reason.
        let mut paused = row("web1", ReplicationMode::Primary, Health::Warning, Some(1));
        paused.health_reason = "replication is paused; more".into();
        let (code, line) = check_report(&[paused], NOW, W, C);
        assert_eq!(code, plugin::WARNING);
        assert!(
            line.starts_with(
                "VMREPLICA WARNING - web1 WARNING: health Warning (replication is paused) |"
            ),
            "{line}"
        );
        let (code, line) = check_report(&[], NOW, W, C);
        assert_eq!(
            (code, line.as_str()),
            (plugin::OK, "VMREPLICA OK - no VMs on this host")
        );
        let e = anyhow::anyhow!("cannot reach the vmreplica agent | at x\nline 2");
        assert_eq!(
            check_unknown(&e),
            "VMREPLICA UNKNOWN - cannot reach the vmreplica agent   at x line 2"
        );
    }

    #[test]
    fn prtg_json_has_the_documented_shape() {
        let rows = [row(
            "web1",
            ReplicationMode::Primary,
            Health::Warning,
            Some(12),
        )];
        let v = prtg(&rows, NOW, W, C);
        // PRTG EXE/Script Advanced: {"prtg":{"result":[channels],"text":...}}.
        let golden = json!({"prtg": {"result": [
            {"channel": "web1 lag", "value": 12, "unit": "TimeSeconds", "limitmode": 1,
             "limitmaxwarning": 60, "limitmaxerror": 120},
            {"channel": "web1 pending", "value": 3145728, "unit": "BytesDisk"},
            {"channel": "web1 health", "value": 1, "unit": "Custom",
             "customunit": "0 ok, 1 warn, 2 crit", "limitmode": 1, "limitmaxwarning": 0,
             "limitmaxerror": 1},
            {"channel": "web1 last cycle size", "value": 4096, "unit": "BytesDisk"}
        ], "text": "WARNING - web1 WARNING: health Warning"}});
        assert_eq!(v, golden);
        assert_eq!(
            prtg_error(&anyhow::anyhow!("agent down")),
            json!({"prtg": {"error": 1, "text": "agent down"}})
        );
    }

    #[test]
    fn zabbix_discovery_and_values_have_the_documented_shape() {
        let rows = [
            row("web1", ReplicationMode::Primary, Health::Normal, Some(12)),
            row("db1", ReplicationMode::Replica, Health::Critical, None),
        ];
        // Low-level discovery: a JSON array of macro objects (Zabbix 4.2 and later).
        assert_eq!(
            zabbix_discovery(&rows),
            json!([
                {"{#VM}": "web1", "{#UUID}": "00000000-0000-0000-0000-000000000001",
                 "{#ROLE}": "primary", "{#PEER}": "10.0.0.2:9443"},
                {"{#VM}": "db1", "{#UUID}": "00000000-0000-0000-0000-000000000001",
                 "{#ROLE}": "replica", "{#PEER}": "host-a"}
            ])
        );
        assert_eq!(
            zabbix(&rows, NOW),
            json!({
                "web1": {"role": "primary", "state": "Replicating", "health": 0,
                         "health_reason": "", "lag": 12, "frequency": 30,
                         "continuous": false, "pending_bytes": 3145728, "last_cycle_bytes": 4096,
                         "recovery_points": null, "last_point": (NOW - 12_000) / 1000},
                "db1": {"role": "replica", "state": "Replicating", "health": 2,
                        "health_reason": "", "lag": null, "frequency": 30,
                        "continuous": false, "pending_bytes": 3145728, "last_cycle_bytes": 4096,
                        "recovery_points": null, "last_point": null}
            })
        );
    }
}
