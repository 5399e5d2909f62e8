//! The split-brain guard of an unplanned `failover start` with real agents on loopback
//! addresses: the replica probes the primary where its calls come from (a wildcard listen
//! address is never probed), or at the address it reports when that is a specific one, and
//! never itself; a running primary VM refuses the failover, a stopped primary agent lets it
//! proceed.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::api::ReplicationState;

const LONG: Duration = Duration::from_secs(90);

/// The address the replica recorded to probe the primary of `vm` at.
fn probe_address(replica: &Agent, vm: &StandIn) -> TestResult<Option<String>> {
    let path = replica
        .dir
        .join("failover")
        .join(format!("{}.json", vm.def.uuid));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    Ok(v["primary_listen"].as_str().map(str::to_owned))
}

/// Both agents authorize each other; a stand-in VM on `a` replicates to `b` until a cycle
/// is applied.
fn replicate(root: &TestDir, a: &Agent, b: &Agent, name: &str) -> TestResult<StandIn> {
    b.allow(a)?;
    a.allow(b)?; // lets the replica probe the primary
    let vm = StandIn::create(root.path(), a, name, &["disk0"], 16)?;
    vm.register(a)?;
    a.ok(&[
        "enable",
        name,
        "--replica",
        &b.addr,
        "--replica-fingerprint",
        &b.fingerprint,
        "--frequency",
        "5s",
    ])?;
    a.wait_cycle(name, 1, LONG)?;
    b.wait_cycle(name, 1, LONG)?;
    Ok(vm)
}

fn refused(b: &Agent, vm: &str) -> TestResult<String> {
    let out = b.cli(&["failover", "start", vm])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(b.status(vm)?.state, ReplicationState::Replicating);
    Ok(err)
}

#[test]
fn wildcard_primary_is_probed_where_its_calls_come_from() -> TestResult {
    let root = TestDir::temp("vmr-sb-")?;
    let mut a = Agent::start_on(exe(), root.path(), "host-a", "0.0.0.0", None)?;
    let b = Agent::start_on(exe(), root.path(), "host-b", "127.0.0.3", None)?;
    let vm = replicate(&root, &a, &b, "sb1")?;
    // Never the wildcard: the address a's calls came from, with a's port.
    let probe = probe_address(&b, &vm)?;
    assert_eq!(probe, Some(format!("127.0.0.1:{}", a.port)));
    // a's VM runs: refused.
    let err = refused(&b, "sb1")?;
    assert!(err.contains("still answers and its VM"), "{err}");
    // The primary agent is gone but its host answers (connection refused): its VM may still
    // run, so the failover is refused unless the admin says otherwise.
    a.kill9();
    let err = refused(&b, "sb1")?;
    assert!(err.contains("connection refused"), "{err}");
    let out = b.ok(&["failover", "start", "sb1", "--no-start", "--force"])?;
    assert_eq!(
        b.status("sb1")?.state,
        ReplicationState::FailedOverWaitingCompletion,
        "{out}"
    );
    Ok(())
}

#[test]
fn equal_ports_probe_reaches_the_primary_not_the_replica_itself() -> TestResult {
    let root = TestDir::temp("vmr-sb-")?;
    let a = Agent::start_on(exe(), root.path(), "host-a", "127.0.0.2", None)?;
    let b = Agent::start_on(exe(), root.path(), "host-b", "127.0.0.3", Some(a.port))?;
    let vm = replicate(&root, &a, &b, "sb2")?;
    // a's connections come from its listen address (it binds to it), so both the report and
    // the connection name 127.0.0.2.
    assert_eq!(probe_address(&b, &vm)?, Some(a.addr.clone()));
    // Refused because a's VM runs (not because the probe reached b, which would be another
    // identity answering).
    let err = refused(&b, "sb2")?;
    assert!(
        err.contains("still answers and its VM") && err.contains(&a.addr),
        "{err}"
    );
    Ok(())
}

#[test]
fn advertise_must_name_a_host() -> TestResult {
    let root = TestDir::temp("vmr-sb-")?;
    for bad in ["0.0.0.0:7000", "[::]:7000", "no-port"] {
        let dir = root.path().join("x");
        let out = std::process::Command::new(exe())
            .arg("--dir")
            .arg(&dir)
            .args(["init", "--name", "x", "--listen", "0.0.0.0:7000"])
            .args(["--advertise", bad])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--advertise"), "{err}");
        assert!(!dir.join("config.toml").exists());
    }
    Ok(())
}
