//! End-to-end replication between two real agents on 127.0.0.1 with a qemu-storage-daemon
//! stand-in VM: initial replication and cycles under a concurrent writer with a content check at
//! the cut, agents killed with SIGKILL mid-cycle on either side, authentication failures,
//! pause/resume/disable, and bad input.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::api::{Health, ReplicationState};

const LONG: Duration = Duration::from_secs(90);

/// With the writer stopped: wait for a cycle cut after the last write, pause, and compare every
/// disk of the replica's latest point with the primary.
fn verify_at_cut(p: &Pair, vm: &StandIn) -> TestResult {
    let name = &vm.def.name;
    let cut = p.a.status(name)?.last_cycle.unwrap_or(0) + 2;
    p.wait_cycle(name, cut, LONG)?;
    p.a.ok(&["pause", name])?;
    let replica = replica_hashes(&p.b, vm.def.uuid, None)?;
    assert_eq!(replica.len(), vm.def.disks.len());
    for (disk, h) in replica {
        assert_eq!(
            h,
            vm.hash(&disk)?,
            "disk {disk}: replica's latest point differs from the primary"
        );
    }
    Ok(())
}

#[test]
fn replicates_two_disks_under_a_writer() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "web1", &["disk0", "disk1"], 64)?;
    vm.write_random("disk0", 200, 99)?;
    vm.register(&p.a)?;
    let w = RoundWriter::start(&vm, &["disk0", "disk1"], 32, Duration::from_millis(100), 1);
    p.enable("web1", &["--frequency", "5s", "--recovery-points", "2"])?;
    let st = p.a.status("web1")?;
    assert!(matches!(
        st.state,
        ReplicationState::InitialReplicationInProgress | ReplicationState::Replicating
    ));
    p.wait_cycle("web1", 3, LONG)?;
    assert_eq!(p.a.status("web1")?.state, ReplicationState::Replicating);
    w.stop()?;
    verify_at_cut(&p, &vm)?;

    // Statistics and points are visible to the admin.
    let m: serde_json::Value =
        serde_json::from_str(&p.a.ok(&["measure", "web1", "--json"])?).expect("json");
    assert!(
        m[0]["stats"]["successful_cycles"].as_u64().unwrap_or(0) >= 3,
        "{m}"
    );
    assert!(
        m[0]["stats"]["total_bytes"].as_u64().unwrap_or(0) > 0,
        "{m}"
    );
    let pts: serde_json::Value =
        serde_json::from_str(&p.b.ok(&["points", "web1", "--json"])?).expect("json");
    assert!(!pts.as_array().expect("array").is_empty());
    let text = p.b.ok(&["status"])?;
    assert!(text.contains("web1") && text.contains("Replica"), "{text}");
    // `measure` on the replica agrees with the primary's figures (issue 12): the same data
    // bytes, the same largest cycle (not the disk's virtual size), a real latency.
    let measure = |a: &Agent| -> TestResult<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&a.ok(&["measure", "web1", "--json"])?)?;
        Ok(v[0]["stats"].clone())
    };
    let (pa, pb) = (measure(&p.a)?, measure(&p.b)?);
    for k in ["successful_cycles", "total_bytes", "max_bytes"] {
        assert_eq!(pa[k], pb[k], "{k}: primary {pa}, replica {pb}");
    }
    assert!(
        pb["max_bytes"].as_u64().unwrap_or(0) < 2 * (64 << 20),
        "{pb}"
    );
    assert!(pb["max_latency_ms"].as_u64().unwrap_or(0) > 0, "{pb}");
    Ok(())
}

fn kill_mid_cycle(p: &mut Pair, replica_side: bool) -> TestResult {
    let vm = StandIn::create(p.root.path(), &p.a, "db1", &["disk0"], 128)?;
    vm.register(&p.a)?;
    p.enable("db1", &["--frequency", "5s"])?;
    p.wait_cycle("db1", 1, LONG)?;
    // A large change set, so that the next cycle takes a while to ship.
    vm.write_random("disk0", 1200, 7)?;
    let w = RoundWriter::start(&vm, &["disk0"], 16, Duration::from_millis(100), 1);
    wait_until(LONG, "a cycle in flight", || {
        Ok(p.a.status("db1")?.progress.is_some_and(|(d, _)| d > 0))
    })?;
    let before = p.a.status("db1")?.last_cycle.unwrap_or(0);
    let killed = if replica_side { p.b.pid() } else { p.a.pid() };
    if replica_side {
        // The replica's store daemon serves the cycle from sockets in the store's directory.
        let socks = store_sockets(&p.b.storage());
        assert!(
            socks.iter().any(|s| s.starts_with("qsd-")),
            "no daemon socket in the store: {socks:?}"
        );
        p.b.kill9();
    } else {
        p.a.kill9();
    }
    std::thread::sleep(Duration::from_millis(500));
    // The killed agent (and the QEMU processes that died with it) left no socket in the
    // temp dir (issue 12).
    let left = temp_sockets_of(killed);
    assert!(left.is_empty(), "sockets left in the temp dir: {left:?}");
    if replica_side {
        p.b.restart()?;
    } else {
        p.a.restart()?;
    }
    // Replication resumes by itself and moves on.
    p.wait_cycle("db1", before + 2, LONG)?;
    if replica_side {
        // What the killed agent's store left in its socket directory was removed at start.
        let tag = format!("-{killed}-");
        let socks = store_sockets(&p.b.storage());
        assert!(
            !socks.iter().any(|s| s.contains(&tag)),
            "the dead store's sockets are still there: {socks:?}"
        );
    }
    w.stop()?;
    verify_at_cut(p, &vm)?;
    let st = p.a.status("db1")?;
    assert!(st.stats.successful_cycles >= 1);
    Ok(())
}

#[test]
fn replica_agent_killed_mid_cycle_loses_nothing() -> TestResult {
    let mut p = Pair::new(exe())?;
    kill_mid_cycle(&mut p, true)?;
    Ok(())
}

#[test]
fn primary_agent_killed_mid_cycle_resumes() -> TestResult {
    let mut p = Pair::new(exe())?;
    kill_mid_cycle(&mut p, false)?;
    Ok(())
}

/// The primary keeps its connection to the replica between cycles. When that connection
/// closed while idle (here: the replica agent restarted; in the benchmark of row 1: keep-alives
/// unanswered while the replica merged gigabytes), the next cycle reconnects instead of failing:
/// no failed cycle and no Critical health for an idle reconnect.
#[test]
fn a_connection_closed_between_cycles_fails_no_cycle() -> TestResult {
    let mut p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "idle1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("idle1", &["--frequency", "5s"])?;
    p.wait_cycle("idle1", 2, LONG)?;
    // Between cycles (paused, so that no cycle runs while the replica is away).
    p.a.ok(&["pause", "idle1"])?;
    let before = p.a.status("idle1")?;
    assert_eq!(before.stats.errors, 0, "{}", before.health_reason);
    p.b.kill9();
    p.b.restart()?;
    vm.write_random("disk0", 10, 3)?;
    p.a.ok(&["resume", "idle1"])?;
    let next = before.last_cycle.unwrap_or(0) + 1;
    p.wait_cycle("idle1", next, LONG)?;
    let st = p.a.status("idle1")?;
    assert_eq!(
        st.stats.errors, 0,
        "a cycle failed on the closed connection: {}",
        st.health_reason
    );
    Ok(())
}

#[test]
fn refuses_wrong_fingerprint_and_unauthorized_primary() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "app1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    // Wrong replica fingerprint: the primary refuses the replica's certificate.
    let out = p.a.cli(&[
        "enable",
        "app1",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.a.fingerprint,
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fingerprint"), "{err}");
    assert_eq!(p.a.status("app1")?.state, ReplicationState::Disabled);

    // A primary the replica did not authorize is refused by the replica.
    let c = Agent::start(exe(), p.root.path(), "host-c")?;
    let vm_c = StandIn::create(p.root.path(), &c, "app2", &["disk0"], 16)?;
    vm_c.register(&c)?;
    let out = c.cli(&[
        "enable",
        "app2",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("unauthorized") || err.contains("not authorized"),
        "{err}"
    );
    assert!(
        p.b.log().contains("host-c")
            || p.b.log().to_lowercase().contains("unauthorized")
            || p.b.log().contains("refused")
    );
    Ok(())
}

#[test]
fn pause_resume_disable_and_bad_input() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "ops1", &["disk0"], 16)?;
    vm.register(&p.a)?;

    // Bad input: clear errors with documented exit codes, nothing changes.
    let out = p.a.cli(&["status", "nosuch"])?;
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p.a.cli(&[
        "enable",
        "ops1",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--frequency",
        "3s",
    ])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 s"));
    let out = p.a.cli(&["pause", "nosuch"])?;
    assert_eq!(out.status.code(), Some(4));

    p.enable("ops1", &["--frequency", "5s"])?;
    p.wait_cycle("ops1", 2, LONG)?;

    // Pause on the primary: Suspended, Warning, no cycles.
    p.a.ok(&["pause", "ops1"])?;
    let st = p.a.status("ops1")?;
    assert_eq!(st.state, ReplicationState::Suspended);
    assert_eq!(st.health, Health::Warning);
    let paused_at = st.last_cycle;
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(p.a.status("ops1")?.last_cycle, paused_at);
    assert_eq!(
        p.a.cli(&["pause", "ops1"])?.status.code(),
        Some(5),
        "pausing twice is an invalid state"
    );

    // Resume: cycles continue and carry what was written meanwhile.
    vm.write_random("disk0", 20, 5)?;
    p.a.ok(&["resume", "ops1"])?;
    p.wait_cycle("ops1", paused_at.unwrap_or(0) + 1, LONG)?;

    // Pause on the replica is Critical there.
    p.b.ok(&["pause", "ops1"])?;
    let st = p.b.status("ops1")?;
    assert_eq!(st.state, ReplicationState::Suspended);
    assert_eq!(st.health, Health::Critical);
    p.b.ok(&["resume", "ops1"])?;

    // Disable: the primary stops and says so.
    p.a.ok(&["disable", "ops1"])?;
    let st = p.a.status("ops1")?;
    assert_eq!(st.state, ReplicationState::Disabled);
    let last = st.last_cycle;
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(p.a.status("ops1")?.last_cycle, last);
    Ok(())
}

/// vmreplica's names in the stand-in's block graph: nodes, jobs and exports named `vmr-*`,
/// as seen through the harness's own monitor.
fn ours_in_graph(vm: &StandIn) -> TestResult<Vec<String>> {
    let mut ours = Vec::new();
    for (command, field) in [
        ("query-named-block-nodes", "node-name"),
        ("query-block-jobs", "device"),
        ("query-block-exports", "id"),
    ] {
        let answer = vm.qmp(command)?;
        for item in answer.as_array().ok_or("QMP answered no array")? {
            if let Some(name) = item[field].as_str()
                && name.starts_with("vmr-")
            {
                ours.push(format!("{command}: {name}"));
            }
        }
    }
    Ok(ours)
}

/// A cycle that `pause` cancels mid-way ends its point-in-time view at once, not at the next
/// cycle: while replication is paused nothing of vmreplica's stays in the VM's block graph
/// (its copy-before-write filter would copy every first guest write per cluster into the
/// fleecing file for as long as the pause lasts), and no fleecing file stays on disk. The
/// changes of the dropped cycle are not lost: after `resume` the replica equals the primary.
#[test]
fn pause_mid_cycle_ends_the_point_in_time_view() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "cut1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("cut1", &["--frequency", "5s"])?;
    p.wait_cycle("cut1", 2, LONG)?;
    assert_eq!(ours_in_graph(&vm)?, Vec::<String>::new(), "between cycles");

    // The next cycle holds its view open (test hook) with changes under it.
    vm.write_random("disk0", 20, 7)?;
    let hold = p.a.dir.join("test-cycle-hold");
    let held = p.a.dir.join("test-cycle-held");
    std::fs::write(&hold, "")?;
    vmr_testkit::wait_for_path(&held, LONG).map_err(|e| {
        format!("no cycle held (this test needs --features vmreplica/test-hooks): {e}")
    })?;
    let open = ours_in_graph(&vm)?;
    assert!(
        open.iter().any(|n| n.starts_with("query-block-exports")),
        "the held cycle's view is exported: {open:?}"
    );
    vm.write_random("disk0", 20, 8)?;

    // Paused: the cancelled cycle's view goes (the hold is still in place, so no cycle can
    // come back to it).
    p.a.ok(&["pause", "cut1"])?;
    let mut left = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "the cancelled cycle's view gone",
        || {
            left = ours_in_graph(&vm).unwrap_or_else(|e| vec![e.to_string()]);
            Ok(left.is_empty())
        },
    )
    .map_err(|e| format!("{e}; left in the graph while paused: {left:?}"))?;
    let mut fleece = Vec::new();
    for dir in std::fs::read_dir(p.a.dir.join("work"))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir)? {
            let name = f?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".fleece") {
                fleece.push(name);
            }
        }
    }
    assert_eq!(fleece, Vec::<String>::new(), "fleecing files while paused");
    std::fs::remove_file(&hold)?;
    let _ = std::fs::remove_file(&held);

    // Nothing lost: the first cycles after resume carry the dropped cycle's changes.
    vm.write_random("disk0", 20, 9)?;
    p.a.ok(&["resume", "cut1"])?;
    verify_at_cut(&p, &vm)?;
    Ok(())
}

#[test]
fn scheduled_initial_replication_and_start_initial() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "later1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable(
        "later1",
        &["--frequency", "5s", "--initial-at", "2099-01-01T00:00:00Z"],
    )?;
    let st = p.a.status("later1")?;
    assert_eq!(st.state, ReplicationState::ReadyForInitialReplication);
    assert_eq!(st.health, Health::Warning, "{}", st.health_reason);
    // The status shows when it starts (issue 12), as JSON and as text.
    assert_eq!(st.initial_at_ms, Some(4_070_908_800_000));
    let text = p.a.ok(&["status", "later1"])?;
    assert!(
        text.contains("initial replication scheduled for 2099-01-01T00:00:00Z"),
        "{text}"
    );
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(p.a.status("later1")?.last_cycle, None);
    p.a.ok(&["start-initial", "later1"])?;
    p.wait_cycle("later1", 2, LONG)?;
    let st = p.a.status("later1")?;
    assert_eq!(st.state, ReplicationState::Replicating);
    assert_eq!(st.health, Health::Normal, "{}", st.health_reason);
    Ok(())
}

#[test]
fn replica_vm_accepts_only_its_trust_group() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "tg1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("tg1", &["--frequency", "5s"])?;
    p.wait_cycle("tg1", 1, LONG)?;

    // A second primary, authorized on the replica but in another trust group, claims the same VM.
    let c = Agent::start(exe(), p.root.path(), "host-c")?;
    p.b.ok(&[
        "server",
        "allow",
        "--primary",
        "host-c",
        "--fingerprint",
        &c.fingerprint,
        "--trust-group",
        "other",
    ])?;
    // host-c runs a VM with the same name and UUID (`vm add` registers only a VM that runs).
    let disks: Vec<StandInDisk> = vm
        .def
        .disks
        .iter()
        .map(|d| StandInDisk::new(&d.node, 16 << 20))
        .collect();
    let copy = StandIn::start_with_uuid(
        &p.root.path().join("vm-tg1-copy"),
        &c.dir,
        "tg1",
        &disks,
        vm.def.uuid,
    )?;
    copy.register(&c)?;
    let out = c.cli(&[
        "enable",
        "tg1",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trust group"), "{err}");
    // The rightful primary goes on.
    let last = p.a.status("tg1")?.last_cycle.unwrap_or(0);
    p.wait_cycle("tg1", last + 1, LONG)?;
    Ok(())
}

/// A primary agent stopped cleanly (SIGTERM) while a large cycle streams: the replica ends
/// the half-received cycle and an unplanned failover there goes through within a bound (a
/// failover once waited without end behind such a cycle, seen in an extended-replication run).
#[test]
fn a_primary_stopped_mid_cycle_leaves_the_replica_free_to_fail_over() -> TestResult {
    let mut p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "st1", &["disk0"], 128)?;
    vm.register(&p.a)?;
    p.enable("st1", &["--frequency", "5s"])?;
    p.wait_cycle("st1", 1, LONG)?;
    vm.write_random("disk0", 1200, 11)?;
    let w = RoundWriter::start(&vm, &["disk0"], 16, Duration::from_millis(100), 1);
    wait_until(LONG, "a cycle in flight", || {
        Ok(p.a.status("st1")?.progress.is_some_and(|(d, _)| d > 0))
    })?;
    p.a.stop()?;
    w.stop()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = p.b.dir.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            std::process::Command::new(exe())
                .arg("--dir")
                .arg(&dir)
                .args(["failover", "start", "st1", "--force", "--no-start"])
                .stdin(std::process::Stdio::null())
                .output(),
        );
    });
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "failover start on the replica did not return within 120 s")??;
    assert!(
        out.status.success(),
        "failover start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
