//! The monitoring files in `packaging/monitoring/`: the Prometheus alert rules pass
//! `promtool check rules` (Debian's `prometheus` package; `scripts/install-deps.sh full`
//! installs it), and the rules, the Grafana dashboard and the Zabbix template name only
//! series and values the agent and `status --format zabbix` produce.

use std::path::{Path, PathBuf};
use std::process::Command;

fn file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/monitoring")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every series `/metrics` serves (docs/monitoring.md lists them).
const SERIES: [&str; 15] = [
    "vmreplica_info",
    "vmreplica_up",
    "vmreplica_state_info",
    "vmreplica_health",
    "vmreplica_last_point_timestamp_seconds",
    "vmreplica_replication_lag_seconds",
    "vmreplica_frequency_seconds",
    "vmreplica_continuous",
    "vmreplica_pending_bytes",
    "vmreplica_recovery_points",
    "vmreplica_replica_store_free_bytes",
    "vmreplica_cycles_total",
    "vmreplica_shipped_bytes_total",
    "vmreplica_cycle_duration_seconds_bucket",
    "vmreplica_cycle_duration_seconds_count",
];

/// The `vmreplica_*` names a text uses.
fn names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("vmreplica_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = file("prometheus-rules.yml");
    let out = match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!(
            "promtool is not installed ({e}): run `scripts/install-deps.sh full` (Debian's \
             prometheus package) so that the alert rules are checked"
        ),
    };
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = read("prometheus-rules.yml");
    for alert in [
        "VmreplicaLagOverRpo",
        "VmreplicaHealthCritical",
        "VmreplicaAgentDown",
        "VmreplicaNoPoints",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert}");
    }
}

#[test]
fn rules_and_dashboard_use_only_served_series() {
    for f in ["prometheus-rules.yml", "grafana-dashboard.json"] {
        for name in names_in(&read(f)) {
            assert!(SERIES.contains(&name.as_str()), "{f}: {name} is not served");
        }
    }
    let d: serde_json::Value =
        serde_json::from_str(&read("grafana-dashboard.json")).expect("dashboard JSON");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    assert!(panels.iter().all(|p| p["targets"][0]["expr"].is_string()));
    assert_eq!(d["templating"]["list"][0]["name"], "vm");
}

#[test]
fn zabbix_template_picks_what_status_format_zabbix_prints() {
    let t = read("zabbix-template.yaml");
    assert!(t.starts_with("# Zabbix template") && t.contains("zabbix_export:"));
    for key in ["vmreplica.discovery", "vmreplica.status"] {
        assert!(t.contains(&format!("key: {key}")), "{key}");
    }
    assert!(
        t.contains("UserParameter=vmreplica.discovery,vmreplica status --format zabbix-discovery")
    );
    assert!(t.contains("UserParameter=vmreplica.status,vmreplica status --format zabbix"));
    // Each JSONPath names a field of `status --format zabbix` (monitor::zabbix).
    for field in [
        "lag",
        "frequency",
        "health",
        "state",
        "pending_bytes",
        "recovery_points",
    ] {
        assert!(t.contains(&format!("'$[\"{{#VM}}\"].{field}'")), "{field}");
    }
    for section in [
        "discovery_rules:",
        "item_prototypes:",
        "trigger_prototypes:",
    ] {
        assert!(t.contains(section), "{section}");
    }
}
