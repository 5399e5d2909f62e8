//! End-to-end resynchronization with real agents and a qemu-storage-daemon stand-in VM: the
//! stand-in is killed with SIGKILL (change tracking lost), the primary waits in
//! WaitingForStartResynchronize, `resume --resync` makes the replica equal to the primary while
//! sending only the differing blocks, a resync paused mid-way leaves the replica's points
//! untouched and completes after `resume`, and the recovery points from before stay readable
//! with their old content.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::api::{Health, ReplicationState};

const LONG: Duration = Duration::from_secs(90);

#[test]
fn lost_tracking_resync_sends_only_differences_resumes_and_keeps_old_points() -> TestResult {
    let p = Pair::new(exe())?;
    // Slow the resync down (ms per differing block) so that it can be paused mid-way.
    std::fs::write(p.a.dir.join("test-resync-slow-ms"), "40").expect("test hook");
    let disks = ["disk0", "disk1"];
    let mut vm = StandIn::create(p.root.path(), &p.a, "rs-vm", &disks, 64)?;
    let name = vm.def.name.clone();
    for (i, d) in disks.iter().enumerate() {
        vm.write_random(d, 400, 100 + i as u64)?;
    }
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s", "--recovery-points", "2"])?;
    p.wait_cycle(&name, 2, LONG)?;

    // Pin an older point with a test failover copy (a view): retention keeps a pinned point,
    // and the resync must leave it readable with its content.
    p.a.ok(&["pause", &name])?;
    let old = p.b.status(&name)?.last_cycle.expect("a point");
    let out = p.b.ok(&[
        "failover",
        "test",
        &name,
        "--point",
        &old.to_string(),
        "--json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).expect("failover json");
    assert!(v["pid"].as_u64().is_some(), "the test copy runs: {v}");
    let old_hashes = replica_hashes(&p.b, vm.def.uuid, Some(old))?;
    p.a.ok(&["resume", &name])?;
    vm.write_random("disk0", 50, 7)?;
    p.wait_cycle(&name, old + 1, LONG)?;

    // QEMU dies uncleanly and comes back: tracking is lost. Then exactly 2 × 160 blocks
    // change: disk0's at its start, disk1's near its end.
    vm.kill9();
    vm.start()?;
    vm.write_seq("disk0", 0, 160, 9)?;
    vm.write_seq("disk1", 800, 160, 9)?;
    let differing = 2 * 160 * 64 * 1024;
    wait_until(LONG, "WaitingForStartResynchronize", || {
        Ok(p.state(&name)? == ReplicationState::WaitingForStartResynchronize)
    })?;
    let s = p.a.status(&name)?;
    assert_eq!(s.health, Health::Critical);
    assert!(
        s.health_reason.contains("resynchronization required"),
        "{}",
        s.health_reason
    );
    assert!(
        s.health_reason.contains("tracking"),
        "reason names the cause: {}",
        s.health_reason
    );
    // Nothing is replicated meanwhile.
    let replica_latest = p.b.status(&name)?.last_cycle;
    let before = replica_hashes(&p.b, vm.def.uuid, replica_latest)?;
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(
        p.state(&name)?,
        ReplicationState::WaitingForStartResynchronize
    );
    // A plain resume does not start it; a replica-side resync is refused.
    assert!(!p.a.cli(&["resume", &name])?.status.success());
    assert!(!p.b.cli(&["resume", &name, "--resync"])?.status.success());

    // Start it, pause it once disk0 has been compared: the replica's points are untouched.
    let bytes_before = p.a.status(&name)?.stats.total_bytes;
    p.a.ok(&["resume", &name, "--resync"])?;
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let s = p.a.status(&name)?;
        if s.state == ReplicationState::Resynchronizing
            && s.progress.is_some_and(|(d, t)| t > 0 && d * 10 > t * 6)
        {
            break;
        }
        assert!(
            s.state == ReplicationState::Resynchronizing && std::time::Instant::now() < deadline,
            "resync did not run or ended too early: {s:?}\n{}\n---replica---\n{}",
            tail(&p.a.log(), 40),
            tail(&p.b.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.a.ok(&["pause", &name])?;
    assert_eq!(p.state(&name)?, ReplicationState::ResynchronizeSuspended);
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(
        p.b.status(&name)?.last_cycle,
        replica_latest,
        "a paused resync committed nothing"
    );
    assert_eq!(replica_hashes(&p.b, vm.def.uuid, replica_latest)?, before);

    // Resume: it continues from what the replica already received (disk0's blocks are not
    // sent again) and completes.
    p.a.ok(&["resume", &name])?;
    wait_until(LONG, "the resync to finish", || {
        Ok(p.state(&name)? == ReplicationState::Replicating)
    })?;
    let sent = p.a.status(&name)?.stats.total_bytes - bytes_before;
    eprintln!("resumed resync sent {sent} data bytes; {differing} bytes differed");
    assert!(
        p.b.log().contains("resumed=true"),
        "the replica continued the pending resync:\n{}",
        tail(&p.b.log(), 30)
    );
    assert!(
        sent > 0 && sent * 10 < differing * 6,
        "the resumed resync sent {sent} bytes; a full comparison sends {differing}"
    );
    assert_equal_at_cut(&p, &vm)?;

    // The point from before the resync is still there, with its old content.
    assert_eq!(
        replica_hashes(&p.b, vm.def.uuid, Some(old))?,
        old_hashes,
        "the pinned point from before the resync changed"
    );
    assert_ne!(replica_hashes(&p.b, vm.def.uuid, None)?, old_hashes);
    p.b.ok(&["failover", "stop-test", &name])?;
    Ok(())
}

#[test]
fn auto_resync_starts_by_itself_inside_its_window() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "auto-vm", &["disk0"], 32)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 100, 3)?;
    vm.register(&p.a)?;
    // A bad window is refused before anything is enabled.
    let bad = p.a.cli(&[
        "enable",
        &name,
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--auto-resync",
        "25:00-01:00",
    ])?;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HH:MM-HH:MM"));
    assert_eq!(p.a.status(&name)?.state, ReplicationState::Disabled);
    // 00:00-00:00 is the whole day: the resync starts as soon as it is required.
    p.enable(
        &name,
        &["--frequency", "5s", "--auto-resync", "00:00-00:00"],
    )?;
    p.wait_cycle(&name, 2, LONG)?;
    vm.kill9();
    vm.start()?;
    vm.write_seq("disk0", 0, 16, 4)?;
    // WaitingForStartResynchronize is passed through without a command; the copy converges.
    wait_until(LONG, "the automatic resync to be committed", || {
        Ok(p.b.log().contains("resync committed"))
    })?;
    wait_until(LONG, "replicating again", || {
        Ok(p.state(&name)? == ReplicationState::Replicating)
    })?;
    assert!(
        p.a.log().contains("resynchronization started"),
        "{}",
        tail(&p.a.log(), 30)
    );
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}

/// Resize disk `disk` of a stopped stand-in with `qemu-img resize` (as an admin would with the
/// VM shut down), then start it again.
fn resize_offline(vm: &mut StandIn, disk: &str, mib: u64) -> TestResult {
    vm.stop()?;
    let path = &vm
        .def
        .disks
        .iter()
        .find(|d| d.node == disk)
        .expect("disk")
        .path;
    let st = std::process::Command::new("qemu-img")
        .args([
            "resize",
            "-q",
            "--shrink",
            "-f",
            "qcow2",
            path,
            &format!("{mib}M"),
        ])
        .status()
        .expect("qemu-img");
    assert!(st.success());
    vm.start()?;
    Ok(())
}

#[test]
fn grown_disk_replicates_without_resync_and_shrink_is_refused() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "grow-vm", &["disk0"], 32)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 100, 5)?;
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 2, LONG)?;

    // Grow 32 -> 48 MiB and write into the new area (blocks 600.. are beyond 32 MiB).
    resize_offline(&mut vm, "disk0", 48)?;
    vm.write_seq("disk0", 600, 16, 6)?;
    assert_equal_at_cut(&p, &vm)?;
    p.a.ok(&["resume", &name])?;
    assert_eq!(p.state(&name)?, ReplicationState::Replicating);
    assert!(
        !p.a.log().contains("resynchronization started"),
        "a grown disk must not need a resync:\n{}",
        tail(&p.a.log(), 30)
    );
    let layers = settled_store(&p.b, vm.def.uuid)?
        .point_layers(vm.def.uuid, None)
        .expect("layers");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&layers[0].1)
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["virtual-size"].as_u64(), Some(48 << 20));

    // Shrink 48 -> 40 MiB: tracking is lost, and the replica refuses to shrink its copy with
    // a clear error; its points stay as they were.
    let before = replica_hashes(&p.b, vm.def.uuid, None)?;
    resize_offline(&mut vm, "disk0", 40)?;
    wait_until(
        LONG,
        "WaitingForStartResynchronize after the shrink",
        || Ok(p.state(&name)? == ReplicationState::WaitingForStartResynchronize),
    )?;
    assert!(p.a.status(&name)?.health_reason.contains("size"));
    p.a.ok(&["resume", &name, "--resync"])?;
    wait_until(LONG, "the shrink to be refused", || {
        Ok(p.state(&name)? == ReplicationState::Error)
    })?;
    let s = p.a.status(&name)?;
    assert!(
        s.health_reason.contains("shrank from 50331648 to 41943040"),
        "{}",
        s.health_reason
    );
    assert_eq!(replica_hashes(&p.b, vm.def.uuid, None)?, before);
    Ok(())
}
