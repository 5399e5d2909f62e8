//! Monitoring end to end (issue 14): two real agents with their monitoring listeners on
//! 127.0.0.1, a stand-in VM replicating every 5 s; `/metrics` scraped over a real socket and
//! parsed, its lag and health followed through a pause; the replica's listener behind a bearer
//! token; `vmreplica check` exit codes (OK, WARNING, CRITICAL, UNKNOWN) and the PRTG and Zabbix
//! formats from the live agent.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);

/// Print `what` when `VMR_PRINT_SCRAPE` is set (the examples in docs/monitoring.md come from
/// this).
fn show(what: &str) {
    if std::env::var_os("VMR_PRINT_SCRAPE").is_some() {
        eprintln!("{what}");
    }
}

/// One HTTP/1.1 GET over a fresh connection: (status code, body).
fn get(port: u16, path: &str, token: Option<&str>) -> TestResult<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let code = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    Ok((code, body.to_owned()))
}

/// The value of the sample `name{...}` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (lab, value) = rest.rsplit_once("} ")?;
        labels
            .iter()
            .all(|want| lab.split(',').any(|x| x == *want))
            .then(|| value.parse().ok())?
    })
}

/// `vmreplica check ARGS` on `agent`: (exit code, its one line).
fn check(agent: &Agent, args: &[&str]) -> TestResult<(i32, String)> {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = agent.cli(&all)?;
    let line = String::from_utf8(out.stdout)?;
    show(&format!("$ vmreplica {}\n{line}", all.join(" ")));
    assert_eq!(line.lines().count(), 1, "one line: {line:?}");
    Ok((
        out.status.code().ok_or("no exit code")?,
        line.trim().to_owned(),
    ))
}

#[test]
fn metrics_check_and_formats_follow_replication() -> TestResult {
    let mut p = Pair::new(exe())?;
    let pa = with_metrics(&mut p.a, None)?;
    let token = "s3cret-token-for-the-test";
    let pb = with_metrics(&mut p.b, Some(token))?;
    let vm = StandIn::create(p.root.path(), &p.a, "web1", &["disk0"], 16)?;
    vm.write_random("disk0", 100, 5)?;
    vm.register(&p.a)?;
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 3, LONG)?;

    // The primary's series.
    let (code, text) = get(pa, "/metrics", None)?;
    assert_eq!(code, 200, "{text}");
    show(&text);
    let uuid = format!("uuid=\"{}\"", vm.def.uuid);
    let peer = format!("peer=\"{}\"", p.b.addr);
    let a = ["vm=\"web1\"", &uuid, "role=\"primary\"", &peer];
    assert_eq!(sample(&text, "vmreplica_up", &a), Some(1.0), "{text}");
    assert_eq!(sample(&text, "vmreplica_health", &a), Some(0.0), "{text}");
    let mut st = a.to_vec();
    st.push("state=\"Replicating\"");
    assert_eq!(
        sample(&text, "vmreplica_state_info", &st),
        Some(1.0),
        "{text}"
    );
    let lag = sample(&text, "vmreplica_replication_lag_seconds", &a).ok_or("no lag")?;
    assert!((0.0..15.0).contains(&lag), "lag {lag}\n{text}");
    let cut = sample(&text, "vmreplica_last_point_timestamp_seconds", &a).ok_or("no point")?;
    assert!(cut > 1.7e9, "{cut}");
    let mut ok = a.to_vec();
    ok.push("result=\"success\"");
    assert!(
        sample(&text, "vmreplica_cycles_total", &ok).unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "vmreplica_shipped_bytes_total", &a).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(sample(&text, "vmreplica_cycle_duration_seconds_count", &a).unwrap_or(0.0) >= 2.0);
    assert!(
        sample(&text, "vmreplica_pending_bytes", &a).is_some(),
        "{text}"
    );
    assert!(text.contains("vmreplica_info{version=\""), "{text}");
    assert!(text.ends_with("# EOF\n"));

    // The replica's, behind its token.
    assert_eq!(get(pb, "/metrics", None)?.0, 401);
    assert_eq!(get(pb, "/metrics", Some("wrong"))?.0, 401);
    let (code, text) = get(pb, "/metrics", Some(token))?;
    assert_eq!(code, 200, "{text}");
    let b = ["vm=\"web1\"", "role=\"replica\"", "peer=\"host-a\""];
    assert!(
        sample(&text, "vmreplica_recovery_points", &b).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "vmreplica_replica_store_free_bytes", &b).unwrap_or(0.0) > 0.0);
    assert_eq!(sample(&text, "vmreplica_health", &b), Some(0.0), "{text}");
    assert_eq!(get(pb, "/nothing", Some(token))?.0, 404);

    // check: OK now.
    let (code, line) = check(&p.a, &[])?;
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with("VMREPLICA OK - ") && line.contains("'web1_lag'="),
        "{line}"
    );

    // PRTG and Zabbix from the live agent.
    let out = p.a.ok(&["status", "--format", "prtg"])?;
    show(&out);
    let prtg: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(prtg["prtg"]["result"][0]["channel"], "web1 lag", "{prtg}");
    assert_eq!(prtg["prtg"]["result"][0]["limitmaxerror"], 20, "{prtg}");
    let out = p.b.ok(&["status", "--format", "zabbix-discovery"])?;
    show(&out);
    let lld: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(lld[0]["{#VM}"], "web1");
    assert_eq!(lld[0]["{#ROLE}"], "replica");
    let out = p.b.ok(&["status", "--format", "zabbix"])?;
    show(&out);
    let items: serde_json::Value = serde_json::from_str(&out)?;
    assert!(
        items["web1"]["recovery_points"].as_u64().unwrap_or(0) >= 1,
        "{items}"
    );

    // Paused: health Warning at once, the lag grows past two intervals.
    p.a.ok(&["pause", "web1"])?;
    let (_, text) = get(pa, "/metrics", None)?;
    assert_eq!(sample(&text, "vmreplica_health", &a), Some(1.0), "{text}");
    let mut suspended = a.to_vec();
    suspended.push("state=\"Suspended\"");
    assert_eq!(sample(&text, "vmreplica_state_info", &suspended), Some(1.0));
    wait_until(Duration::from_secs(60), "the lag to pass 11 s", || {
        let (_, text) = get(pa, "/metrics", None).map_err(|e| HarnessError::Io {
            what: "scraping /metrics".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(sample(&text, "vmreplica_replication_lag_seconds", &a).unwrap_or(0.0) > 11.0)
    })?;
    let (code, line) = check(&p.a, &["web1"])?;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("VMREPLICA WARNING - web1 WARNING: health Warning"),
        "{line}"
    );
    assert!(line.contains("lag "), "over 2x the frequency: {line}");
    let (code, line) = check(&p.a, &["--crit-lag", "10s"])?;
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("VMREPLICA CRITICAL - web1 CRITICAL"),
        "{line}"
    );

    // UNKNOWN: a VM this host does not have, an agent that is not running.
    let (code, line) = check(&p.a, &["nosuch"])?;
    assert_eq!(code, 3, "{line}");
    assert!(line.starts_with("VMREPLICA UNKNOWN - "), "{line}");
    p.b.stop()?;
    let (code, line) = check(&p.b, &[])?;
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("cannot reach the vmreplica agent"), "{line}");
    let out = p.b.ok(&["status", "--format", "prtg"])?;
    show(&out);
    let prtg: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(prtg["prtg"]["error"], 1, "{prtg}");
    Ok(())
}

#[test]
fn init_refuses_a_wide_listener_without_a_token() -> TestResult {
    let root = TestDir::temp("vmr-metrics-init-")?;
    let run = |dir: &str, extra: &[&str]| -> TestResult<std::process::Output> {
        let mut c = std::process::Command::new(exe());
        c.arg("--dir").arg(root.path().join(dir)).args([
            "init",
            "--name",
            "a",
            "--listen",
            "127.0.0.1:1",
        ]);
        Ok(c.args(extra).output()?)
    };
    let out = run("wide", &["--metrics", "0.0.0.0:9464"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-token"), "{err}");
    assert!(!root.path().join("wide").exists());
    let out = run("wide", &["--metrics", "0.0.0.0:9464", "--metrics-token"])?;
    assert!(out.status.success(), "{out:?}");
    let cfg = std::fs::read_to_string(root.path().join("wide/config.toml"))?;
    assert!(
        cfg.contains("metrics-listen = \"0.0.0.0:9464\"")
            && cfg.contains("metrics-token-file = \"metrics.token\""),
        "{cfg}"
    );
    let token = std::fs::read_to_string(root.path().join("wide/metrics.token"))?;
    assert_eq!(token.trim().len(), 64);
    // --metrics-token alone is a usage error.
    let out = run("lonely", &["--metrics-token"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
