//! Extended replication A → B → C between three real agents on 127.0.0.1 (the harness's
//! `Chain`) with a qemu-storage-daemon stand-in VM on A: C's latest point equals B's point of
//! the same id and A's disks at that cut; points B merged before C got them; C's agent down
//! for several extended intervals, then back without a full copy.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::api::{ExtendedStatus, ReplicationState};

const LONG: Duration = Duration::from_secs(120);
const VM: &str = "web1";

/// A stand-in VM on A with two 64 MiB disks, some data, registered.
fn vm_on_a(ch: &Chain) -> TestResult<StandIn> {
    let vm = StandIn::create(ch.root.path(), &ch.a, VM, &["disk0", "disk1"], 64)?;
    vm.write_random("disk0", 200, 99)?;
    vm.register(&ch.a)?;
    Ok(vm)
}

/// With the writes done: wait for a point on B cut after the last write, pause A, and wait
/// until B applied A's last cycle; returns B's newest point then (every point from the first
/// one cut after the writes holds them all). A's own count may lag B's by an acknowledgement
/// still on its way (or lost, and adopted later), so the id is B's.
fn settle(ch: &Chain, vm: &StandIn) -> TestResult<u64> {
    let name = &vm.def.name;
    let (cut, _) = ch.b.wait_status(
        name,
        LONG,
        Duration::from_millis(10),
        "a point cut after the writes",
        {
            let after = epoch_ms();
            move |s| s.last_point_ms.is_some_and(|t| t > after)
        },
    )?;
    ch.a.ok(&["pause", name])?;
    let a_last = ch.a.status(name)?.last_cycle.unwrap_or(0);
    let (s, _) =
        ch.b.wait_cycle(name, a_last.max(cut.last_cycle.unwrap_or(0)), LONG)?;
    Ok(s.last_cycle.unwrap_or(0))
}

/// C's point `id`, B's point `id` and A's disks are the same.
fn assert_same(ch: &Chain, vm: &StandIn, id: u64) -> TestResult {
    let b = replica_hashes(&ch.b, vm.def.uuid, Some(id))?;
    let c = replica_hashes(&ch.c, vm.def.uuid, Some(id))?;
    assert_eq!(c.len(), vm.def.disks.len());
    assert_eq!(b, c, "C's point {id} differs from B's");
    for (disk, h) in c {
        assert_eq!(
            h,
            vm.hash(&disk)?,
            "disk {disk}: C's point {id} differs from A"
        );
    }
    Ok(())
}

/// B's outgoing (extended) relationship of the VM.
fn extended(ch: &Chain) -> TestResult<ExtendedStatus> {
    Ok(ch
        .b
        .status(VM)?
        .extended
        .ok_or("B's status shows no extended relationship")?)
}

/// Wait until B's extended relationship satisfies `pred`.
fn wait_extended(
    ch: &Chain,
    what: &str,
    pred: impl Fn(&ExtendedStatus) -> bool,
) -> TestResult<ExtendedStatus> {
    let mut last = None;
    wait_every(LONG, Duration::from_millis(50), what, || {
        let Some(x) = ch.b.status(VM)?.extended else {
            return Ok(false);
        };
        let ok = pred(&x);
        last = Some(x);
        Ok(ok)
    })?;
    Ok(last.ok_or("no status")?)
}

/// The ids of B's points, read from its store.
fn points_of(agent: &Agent, vm: &StandIn) -> TestResult<Vec<u64>> {
    Ok(settled_store(agent, vm.def.uuid)?
        .points(vm.def.uuid)?
        .iter()
        .map(|p| p.id)
        .collect())
}

#[test]
fn a_to_b_to_c_under_a_writer() -> TestResult {
    let ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    let w = RoundWriter::start(&vm, &["disk0", "disk1"], 16, Duration::from_millis(100), 1);
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "2"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s", "--recovery-points", "1"])?;
    // A full copy, then incremental extended cycles while A → B goes on.
    let first = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let sent = first.last_point_sent.unwrap_or(0);
    wait_extended(&ch, "two more extended cycles", |x| {
        x.stats.successful_cycles >= 3 && x.last_point_sent > Some(sent)
    })?;
    w.stop()?;
    let last = settle(&ch, &vm)?;
    ch.c.wait_cycle(VM, last, LONG)?;
    assert_same(&ch, &vm, last)?;

    // B shows both relationships: incoming from A, outgoing to C.
    let st = ch.b.status(VM)?;
    assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Replica);
    assert_eq!(st.last_cycle, Some(last));
    let x = st.extended.ok_or("no extended relationship")?;
    assert_eq!(x.relationship, "extended");
    assert_eq!(x.state, ReplicationState::Replicating);
    assert_eq!(x.last_point_sent, Some(last));
    assert_eq!(x.replica, ch.c.addr);
    assert_eq!(x.frequency_secs, 5);
    assert!(x.lag_ms.is_some());
    let text = ch.b.ok(&["status"])?;
    assert!(
        text.contains("extended") && text.contains(&ch.c.addr),
        "{text}"
    );
    let measure = ch.b.ok(&["measure", VM])?;
    assert!(
        measure.contains("RelationshipType          : Extended")
            && measure.contains(&format!("ExtendedLastPointSent     : {last}")),
        "{measure}"
    );
    let json: serde_json::Value = serde_json::from_str(&ch.b.ok(&["status", VM, "--json"])?)?;
    assert_eq!(json[0]["extended"]["last_point_sent"], last, "{json}");
    // C is an ordinary replica whose primary is B.
    let c = ch.c.status(VM)?;
    assert_eq!(c.mode, vmr_proto::api::ReplicationMode::Replica);
    assert_eq!(c.primary, "host-b");

    // Pause, resume and disable act on the outgoing relationship only.
    ch.b.ok(&["pause", VM, "--extended"])?;
    assert_eq!(extended(&ch)?.state, ReplicationState::Suspended);
    assert_eq!(ch.b.status(VM)?.state, ReplicationState::Replicating);
    ch.b.ok(&["resume", VM, "--extended"])?;
    assert_eq!(extended(&ch)?.state, ReplicationState::Replicating);
    ch.b.ok(&["disable", VM, "--extended"])?;
    let st = ch.b.status(VM)?;
    assert!(st.extended.is_none(), "{st:?}");
    assert_eq!(st.state, ReplicationState::Replicating);
    // Not on a primary VM.
    let out = ch.a.cli(&["pause", VM, "--extended"])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn points_b_merged_before_c_got_them_still_reach_c() -> TestResult {
    let ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    // B keeps only its latest point: every cycle merges the one before.
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "0"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    // Continuous mode is the primary's relationship's alone: refused (exit 2), nothing
    // enabled, so the interval one below is accepted.
    let out = ch.b.cli(&[
        "enable",
        VM,
        "--extended",
        "--replica",
        &ch.c.addr,
        "--replica-fingerprint",
        &ch.c.fingerprint,
        "--frequency",
        "continuous",
    ])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("continuous"),
        "{out:?}"
    );
    assert!(ch.b.status(VM)?.extended.is_none());
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    let x = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let acked = x.last_point_sent.unwrap_or(0);
    // Paused: the acknowledged point is not kept; B merges it and the points after it.
    ch.b.ok(&["pause", VM, "--extended"])?;
    let w = RoundWriter::start(&vm, &["disk0", "disk1"], 8, Duration::from_millis(100), 1);
    let b_last = ch.b.status(VM)?.last_cycle.unwrap_or(0);
    ch.b.wait_cycle(VM, b_last + 4, LONG)?;
    w.stop()?;
    let last = settle(&ch, &vm)?;
    let points = points_of(&ch.b, &vm)?;
    assert!(
        !points.contains(&acked) && !points.contains(&(acked + 1)),
        "B merged the point C acknowledged ({acked}) and the next: it holds {points:?}"
    );
    ch.b.ok(&["resume", VM, "--extended"])?;
    ch.c.wait_cycle(VM, last, LONG)?;
    assert_same(&ch, &vm, last)?;
    Ok(())
}

#[test]
fn c_down_for_several_intervals_resumes_without_a_full_copy() -> TestResult {
    let mut ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "0"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    let x = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let full = x.stats.total_bytes;
    let sent_before = x.stats.total_bytes;
    let a_before = ch.a.status(VM)?.stats.total_bytes;
    ch.c.stop()?;
    // A → B goes on for several extended intervals while C is down: 3 rounds of 8 blocks
    // written on A, each shipped to B (which keeps only its latest point, and the one C
    // acknowledged).
    for round in 0..3u64 {
        vm.write_seq("disk0", 100 + round * 8, 8, 1000 + round)?;
        let b_last = ch.b.status(VM)?.last_cycle.unwrap_or(0);
        ch.b.wait_cycle(VM, b_last + 2, LONG)?;
    }
    wait_extended(&ch, "extended cycles failing while C is down", |x| {
        x.stats.errors >= 3
    })?;
    let last = settle(&ch, &vm)?;
    let a_bytes = ch.a.status(VM)?.stats.total_bytes - a_before;
    ch.c.restart()?;
    ch.c.wait_cycle(VM, last, LONG)?;
    let x = wait_extended(&ch, "the extended relationship to catch up", |x| {
        x.last_point_sent == Some(last)
    })?;
    let sent = x.stats.total_bytes - sent_before;
    eprintln!(
        "extended catch-up after C was down: {sent} bytes; A shipped {a_bytes} bytes meanwhile; \
         the full copy was {full} bytes"
    );
    assert!(
        sent <= a_bytes,
        "C resumed with {sent} bytes, more than A wrote meanwhile ({a_bytes})"
    );
    assert!(
        sent <= 24 * 65536,
        "no full copy ({full} bytes): {sent} bytes for the 24 blocks written"
    );
    assert_same(&ch, &vm, last)?;
    ch.stop()?;
    Ok(())
}

/// `failover <args> --json` on `agent`.
fn failover(agent: &Agent, args: &[&str]) -> TestResult<vmr_proto::api::FailoverResult> {
    let mut a = vec!["failover"];
    a.extend_from_slice(args);
    a.push("--json");
    Ok(serde_json::from_str(&agent.ok(&a)?)?)
}

/// The running A → B → C chain with a first extended cycle acknowledged: (the VM, the
/// point C acknowledged).
fn running_chain(ch: &Chain) -> TestResult<(StandIn, u64)> {
    let vm = vm_on_a(ch)?;
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "2"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s", "--recovery-points", "2"])?;
    let x = wait_extended(ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let sent = x.last_point_sent.unwrap_or(0);
    ch.c.wait_cycle(VM, sent, LONG)?;
    Ok((vm, sent))
}

#[test]
fn test_failover_on_c_while_a_to_b_to_c_runs() -> TestResult {
    let ch = Chain::new(exe())?;
    let (vm, _) = running_chain(&ch)?;
    let w = RoundWriter::start(&vm, &["disk0", "disk1"], 8, Duration::from_millis(100), 1);
    // C's point is at least one extended cycle old now; test it.
    let t = failover(&ch.c, &["test", VM])?;
    let tp = t.point.ok_or("the test copy has no point")?;
    assert_eq!(t.name, format!("{VM}-test"));
    assert_eq!(ch.c.status(VM)?.state, ReplicationState::Replicating);
    let dir = std::path::Path::new(&t.disks[0].1)
        .parent()
        .ok_or("no overlay directory")?
        .to_path_buf();
    let copy = StandIn::attach(vm.def.clone(), dir.join("nbd.sock"));
    let at_point = replica_hashes(&ch.c, vm.def.uuid, Some(tp))?;
    for (disk, h) in &at_point {
        assert_eq!(
            copy.hash(disk)?,
            *h,
            "the test copy of {disk} differs from C's point {tp}"
        );
    }
    copy.write_random("disk0", 4, 777)?;
    let tested = copy.hash("disk0")?;
    // A → B and B → C go on under the writer while the copy runs on C.
    let b_last = ch.b.status(VM)?.last_cycle.unwrap_or(0);
    wait_extended(&ch, "two extended cycles past the tested point", |x| {
        x.last_point_sent.is_some_and(|p| p > tp) && x.stats.successful_cycles >= 3
    })?;
    ch.b.wait_cycle(VM, b_last + 2, LONG)?;
    let c = ch.c.status(VM)?;
    assert!(
        c.last_cycle > Some(tp),
        "C applied nothing after {tp}: {c:?}"
    );
    assert_eq!(c.state, ReplicationState::Replicating);
    assert_eq!(
        copy.hash("disk0")?,
        tested,
        "a cycle changed what the test copy sees"
    );
    // Stop the test copy: its overlays go, the point is released, nothing else changes.
    ch.c.ok(&["failover", "stop-test", VM])?;
    assert!(!dir.exists(), "{} is left", dir.display());
    assert_eq!(
        ch.c.cli(&["failover", "stop-test", VM])?.status.code(),
        Some(4)
    );
    w.stop()?;
    let last = settle(&ch, &vm)?;
    ch.c.wait_cycle(VM, last, LONG)?;
    assert_same(&ch, &vm, last)?;
    Ok(())
}

/// `failover start VM` on C, refused (exit 5, the state unchanged): its stderr.
fn c_refuses(ch: &Chain) -> TestResult<String> {
    let out = ch.c.cli(&["failover", "start", VM])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(ch.c.status(VM)?.state, ReplicationState::Replicating);
    Ok(err)
}

#[test]
fn unplanned_failover_on_c_probes_b_and_through_b_a() -> TestResult {
    let mut ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let (vm, _) = running_chain(&ch)?;
    let last = settle(&ch, &vm)?;
    ch.c.wait_cycle(VM, last, LONG)?;
    // B answers that the VM does not run there; through B, A's VM runs: refused.
    let err = c_refuses(&ch)?;
    assert!(err.contains("runs"), "{err}");
    // A's agent is gone (its host answers: connection refused): B cannot check A, so C
    // cannot either.
    ch.a.stop()?;
    let err = c_refuses(&ch)?;
    assert!(
        err.contains("could not check its own primary") && err.contains("connection refused"),
        "{err}"
    );
    // B is gone too: C cannot reach its source; the two-host rules: refused unless forced.
    ch.b.stop()?;
    let err = c_refuses(&ch)?;
    assert!(err.contains("connection refused"), "{err}");
    let live = failover(&ch.c, &["start", VM, "--force"])?;
    assert_eq!(live.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(live.point, Some(last));
    let started = StandIn::attach(vm.def.clone(), nbd_socket(&ch.c.dir, vm.def.uuid));
    for disk in ["disk0", "disk1"] {
        assert_eq!(
            started.hash(disk)?,
            vm.hash(disk)?,
            "the VM failed over on C differs from A's {disk}"
        );
    }
    let done = failover(&ch.c, &["complete", VM])?;
    assert_eq!(done.state, ReplicationState::FailedOver);

    // B returns (A stays lost); C's VM wrote meanwhile. `reverse` on C: B, which forwarded
    // the VM to C, becomes C's replica from the failover point, without a full copy.
    started.write_seq("disk0", 300, 5, 5000)?;
    let written = 5 * 65536;
    ch.b.restart()?;
    let out = ch.c.ok(&["reverse", VM, "--frequency", "5s"])?;
    assert!(out.contains("replication reversed"), "{out}");
    let (st, _) = ch.c.wait_cycle(VM, last + 1, LONG)?;
    let cut = st.last_cycle.unwrap_or(0) + 1;
    ch.c.wait_cycle(VM, cut, LONG)?;
    ch.c.ok(&["pause", VM])?;
    let c = ch.c.status(VM)?;
    let sent = c.last_cycle.ok_or("no cycle")?;
    ch.b.wait_cycle(VM, sent, LONG)?;
    for (disk, h) in replica_hashes(&ch.b, vm.def.uuid, Some(sent))? {
        assert_eq!(
            h,
            started.hash(&disk)?,
            "B's point {sent} differs from C's VM ({disk})"
        );
    }
    eprintln!(
        "C → B after the failover on C: {} bytes; the VM wrote {written}",
        c.stats.total_bytes
    );
    assert!(
        c.stats.total_bytes <= written + 4 * 65536,
        "{} bytes shipped for {written} written",
        c.stats.total_bytes
    );
    let b = ch.b.status(VM)?;
    assert_eq!(b.primary, "host-c");
    assert!(b.extended.is_none(), "{b:?}");
    Ok(())
}

#[test]
fn kill_9_of_b_mid_extended_cycle_loses_nothing() -> TestResult {
    let mut ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    // Enough data that the first extended cycle (a full copy) takes a while.
    for (i, d) in ["disk0", "disk1"].iter().enumerate() {
        vm.write_random(d, 800, 500 + i as u64)?;
    }
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "1"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    let x = wait_extended(&ch, "an extended cycle shipping data", |x| {
        x.running_point.is_some() && x.running_bytes.unwrap_or(0) > 0
    })?;
    ch.b.kill9();
    eprintln!(
        "B killed while shipping point {:?} ({:?} bytes so far)",
        x.running_point, x.running_bytes
    );
    // A writes while B is down and after it returns.
    vm.write_random("disk0", 16, 4242)?;
    ch.b.restart()?;
    vm.write_random("disk1", 16, 4343)?;
    let last = settle(&ch, &vm)?;
    ch.c.wait_cycle(VM, last, LONG)?;
    wait_extended(&ch, "C to acknowledge A's last point", |x| {
        x.last_point_sent == Some(last)
    })?;
    assert_same(&ch, &vm, last)?;
    ch.stop()?;
    Ok(())
}

#[test]
fn unplanned_failover_on_b_continues_to_c_from_its_point() -> TestResult {
    let mut ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let vm = vm_on_a(&ch)?;
    // B and C keep several points, so that B can fail over to one older than C's latest.
    ch.enable(VM, &["--frequency", "5s", "--retain", "1s=20"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s", "--retain", "1s=20"])?;
    wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    // A few rounds of writes, each forwarded to C.
    for round in 0..3u64 {
        vm.write_seq("disk0", 200 + round * 8, 8, 2000 + round)?;
        let last = settle(&ch, &vm)?;
        wait_extended(&ch, "C to get A's last point", |x| {
            x.last_point_sent == Some(last)
        })?;
        if round < 2 {
            ch.a.ok(&["resume", VM])?;
        }
    }
    let b_points = points_of(&ch.b, &vm)?;
    let c_points = points_of(&ch.c, &vm)?;
    let common: Vec<u64> = b_points
        .iter()
        .copied()
        .filter(|p| c_points.contains(p))
        .collect();
    assert!(common.len() >= 2, "B {b_points:?}, C {c_points:?}");
    // B fails over to an older point than C's latest.
    let point = common[common.len() - 2];
    let later: Vec<u64> = c_points.iter().copied().filter(|p| *p > point).collect();
    let at_point = replica_hashes(&ch.c, vm.def.uuid, Some(point))?;
    // A is lost (stopped while paused, between cycles).
    ch.a.stop()?;
    let live = failover(
        &ch.b,
        &["start", VM, "--point", &point.to_string(), "--force"],
    )?;
    assert_eq!(live.point, Some(point));
    let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&ch.b.dir, vm.def.uuid));
    on_b.write_seq("disk1", 40, 6, 3000)?;
    let written = 6 * 65536;
    // Reverse to C: the extended relationship becomes B's own, from the failover point.
    let out = ch.b.ok(&[
        "reverse",
        VM,
        "--replica",
        &ch.c.addr,
        "--replica-fingerprint",
        &ch.c.fingerprint,
    ])?;
    assert!(
        out.contains("continues from that point") && out.contains(&format!("{later:?}")),
        "{out}"
    );
    let b = ch.b.status(VM)?;
    assert_eq!(b.mode, vmr_proto::api::ReplicationMode::Primary);
    assert!(b.extended.is_none(), "{b:?}");
    assert_eq!(b.replica, ch.c.addr);
    assert_eq!(b.frequency_secs, 5, "the extended relationship's frequency");
    // C kept the points up to the failover point (same content) and dropped the later ones.
    let kept = points_of(&ch.c, &vm)?;
    assert!(
        c_points
            .iter()
            .filter(|p| **p <= point)
            .all(|p| kept.contains(p)),
        "C kept {kept:?} of {c_points:?} (dropped {later:?})"
    );
    assert_eq!(replica_hashes(&ch.c, vm.def.uuid, Some(point))?, at_point);
    // B's cycles to C carry what the failed-over VM wrote, not a full copy.
    let (st, _) = ch.b.wait_cycle(VM, point + 1, LONG)?;
    ch.c.wait_cycle(VM, point + 1, LONG)?;
    let cut = st.last_cycle.unwrap_or(0) + 1;
    ch.b.wait_cycle(VM, cut, LONG)?;
    ch.b.ok(&["pause", VM])?;
    let b = ch.b.status(VM)?;
    let last = b.last_cycle.ok_or("no cycle")?;
    ch.c.wait_cycle(VM, last, LONG)?;
    eprintln!(
        "B → C after the failover: {} bytes in {} cycles; the VM wrote {written}",
        b.stats.total_bytes, b.stats.successful_cycles
    );
    assert!(
        b.stats.total_bytes <= written + 4 * 65536,
        "{} bytes shipped for {written} written",
        b.stats.total_bytes
    );
    for (disk, h) in replica_hashes(&ch.c, vm.def.uuid, Some(last))? {
        assert_eq!(
            h,
            on_b.hash(&disk)?,
            "C's point {last} differs from B's VM ({disk})"
        );
    }
    let c = ch.c.status(VM)?;
    assert_eq!(c.primary, "host-b");
    assert_eq!(c.state, ReplicationState::Replicating);
    Ok(())
}

/// A stopped (SIGTERM) while its cycle streams to B, with B → C running: an unplanned failover
/// on B returns within a bound (it once waited without end behind the half-received cycle).
#[test]
fn a_stopped_mid_cycle_leaves_b_free_to_fail_over() -> TestResult {
    let mut ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let vm = StandIn::create(ch.root.path(), &ch.a, VM, &["disk0"], 128)?;
    vm.register(&ch.a)?;
    ch.enable(VM, &["--frequency", "5s"])?;
    ch.b.wait_cycle(VM, 1, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    vm.write_random("disk0", 1600, 11)?;
    wait_until(LONG, "a cycle in flight", || {
        Ok(ch.a.status(VM)?.progress.is_some_and(|(d, _)| d > 0))
    })?;
    ch.a.stop()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = ch.b.dir.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            std::process::Command::new(exe())
                .arg("--dir")
                .arg(&dir)
                .args(["failover", "start", VM, "--force", "--no-start"])
                .stdin(std::process::Stdio::null())
                .output(),
        );
    });
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "failover start on B did not return within 120 s")??;
    assert!(
        out.status.success(),
        "failover start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Planned failover A → B with B → C running: between `failover start` and `reverse`, B's
/// status row for the extended relationship says the VM failed over on B (it was Normal and
/// said nothing), A's final point (the failover point) is still forwarded to C, nothing newer;
/// `reverse` to A then says the extended relationship continues from the final point, as B's
/// second relationship.
#[test]
fn planned_failover_a_to_b_forwards_the_final_point_and_says_the_vm_runs_on_b() -> TestResult {
    let ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let (vm, _) = running_chain(&ch)?;
    assert_eq!(
        extended(&ch)?.health,
        vmr_proto::api::Health::Normal,
        "{:?}",
        extended(&ch)?
    );
    // The extended relationship waits while A's last writes and final cycle arrive on B.
    ch.b.ok(&["pause", VM, "--extended"])?;
    vm.write_seq("disk1", 10, 6, 4000)?;
    let final_hashes = [vm.hash("disk0")?, vm.hash("disk1")?];
    let prep = failover(&ch.a, &["prepare", VM])?;
    let k = prep.point.ok_or("no final cycle")?;
    ch.b.wait_cycle(VM, k, LONG)?;
    let live = failover(&ch.b, &["start", VM])?;
    assert_eq!(live.point, Some(k));
    let x = extended(&ch)?;
    assert!(
        x.health_reason
            .contains(&format!("failed over on this host from point {k}")),
        "{x:?}"
    );
    // Resumed: the final point, the one the VM on B started from, still goes to C.
    ch.b.ok(&["resume", VM, "--extended"])?;
    let x = wait_extended(&ch, "C to get the final point", |x| {
        x.last_point_sent == Some(k)
    })?;
    assert_eq!(x.health, vmr_proto::api::Health::Warning, "{x:?}");
    assert!(
        x.health_reason
            .contains(&format!("the extended replica holds point {k}"))
            && x.health_reason.contains("until `reverse`"),
        "{x:?}"
    );
    let text = ch.b.ok(&["status"])?;
    assert!(text.contains("failed over on this host"), "{text}");
    // The extended relationship's own changes are events naming it.
    let ev = ch.b.ok(&["events", VM])?;
    let named = format!("(extended to {}): ", ch.c.addr);
    assert!(
        ev.lines()
            .any(|l| l.contains(&named) && l.contains("Replicating -> Suspended")),
        "{ev}"
    );
    assert!(
        ev.lines()
            .any(|l| l.contains(&named) && l.contains("health Normal -> Warning")),
        "{ev}"
    );
    for (i, (disk, h)) in replica_hashes(&ch.c, vm.def.uuid, Some(k))?
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            h, final_hashes[i],
            "C's point {k} differs from A's disks ({disk})"
        );
    }
    // The VM on B writes: its writes are not B's points, nothing more goes to C.
    let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&ch.b.dir, vm.def.uuid));
    on_b.write_seq("disk0", 300, 4, 4100)?;
    assert_eq!(extended(&ch)?.running_point, None);
    assert_eq!(points_of(&ch.c, &vm)?.last(), Some(&k));
    // Reverse to A: B replicates to A, and to C as a further relationship from point k
    // (`planned_failover_a_to_b_then_reverse_to_a_continues_to_c_without_a_full_copy`).
    let out = ch.b.ok(&["reverse", VM, "--frequency", "5s"])?;
    assert!(
        out.contains(&format!(
            "the extended replication to {} continues from point {k}",
            ch.c.addr
        )),
        "{out}"
    );
    let b = ch.b.status(VM)?;
    assert_eq!(b.mode, vmr_proto::api::ReplicationMode::Primary);
    assert!(b.extended.is_none(), "{b:?}");
    assert_eq!(b.fanout.len(), 1, "{b:?}");
    Ok(())
}

/// Both of B's relationships after the reverse: (its own row, to A; its fan-out row, to C).
fn b_rows(ch: &Chain) -> TestResult<(vmr_proto::api::VmStatus, vmr_proto::api::VmStatus)> {
    let st = ch.b.status(VM)?;
    let c = st
        .fanout
        .first()
        .cloned()
        .ok_or("B's status shows no fan-out relationship")?;
    Ok((st, c))
}

/// Planned failover A → B with A → B → C running under a writer on A (issue 15 part 3):
/// `failover prepare` on A, `failover start` on B (a tracking bitmap for C started with the
/// VM), `reverse` on B to A. Afterwards B replicates to A and, as a second relationship, to C
/// from the failover point: C's chain goes on with B's cycle ids after the point, without a
/// full copy (bytes shipped to C bounded by what the VM on B wrote), and both A's and C's
/// latest points equal B's running VM.
#[test]
fn planned_failover_a_to_b_then_reverse_to_a_continues_to_c_without_a_full_copy() -> TestResult {
    let ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let (vm, first) = running_chain(&ch)?;
    let w = RoundWriter::start(&vm, &["disk0", "disk1"], 8, Duration::from_millis(100), 1);
    wait_extended(&ch, "two more extended cycles under the writer", |x| {
        x.last_point_sent.is_some_and(|p| p >= first + 2)
    })?;
    w.stop()?;
    let final_hashes = [vm.hash("disk0")?, vm.hash("disk1")?];
    let prep = failover(&ch.a, &["prepare", VM])?;
    let k = prep.point.ok_or("no final cycle")?;
    ch.b.wait_cycle(VM, k, LONG)?;
    let live = failover(&ch.b, &["start", VM])?;
    assert_eq!(live.point, Some(k));
    wait_extended(&ch, "C to get the final point", |x| {
        x.last_point_sent == Some(k)
    })?;
    for (i, (disk, h)) in replica_hashes(&ch.c, vm.def.uuid, Some(k))?
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            h, final_hashes[i],
            "C's point {k} differs from A's disks ({disk})"
        );
    }
    // The VM on B writes before and after the reverse.
    let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&ch.b.dir, vm.def.uuid));
    on_b.write_seq("disk1", 50, 6, 6100)?;
    let out = ch.b.ok(&["reverse", VM, "--frequency", "5s"])?;
    assert!(
        out.contains(&format!(
            "the extended replication to {} continues from point {k} as a further \
             relationship",
            ch.c.addr
        )) && !out.contains("resynchronised"),
        "{out}"
    );
    // C's chain goes on with B's ids: its next point after A's final one is k + 1.
    let (c_first, _) = ch.c.wait_cycle(VM, k + 1, LONG)?;
    assert_eq!(c_first.last_cycle, Some(k + 1));
    on_b.write_seq("disk0", 400, 4, 6200)?;
    let written = 10 * 65536;
    let (b, c_row) = b_rows(&ch)?;
    assert_eq!(b.mode, vmr_proto::api::ReplicationMode::Primary);
    assert!(b.extended.is_none(), "{b:?}");
    assert_eq!(b.replica, ch.a.addr);
    assert_eq!(c_row.replica, ch.c.addr);
    assert_eq!(
        c_row.frequency_secs, 5,
        "the extended relationship's frequency"
    );
    // Both relationships cut after the last write (a cycle started after it), then pause.
    let (a_now, c_now) = (b.last_cycle.unwrap_or(k), c_row.last_cycle.unwrap_or(k));
    wait_every(
        LONG,
        Duration::from_millis(50),
        "cycles to A and C after the writes",
        || {
            let st = ch.b.status(VM)?;
            let c = st.fanout.first().and_then(|c| c.last_cycle).unwrap_or(0);
            Ok(st.last_cycle.unwrap_or(0) >= a_now + 2 && c >= c_now + 2)
        },
    )?;
    ch.b.ok(&["pause", VM, "--replica", &ch.a.addr])?;
    ch.b.ok(&["pause", VM, "--replica", &ch.c.addr])?;
    let (b, c_row) = b_rows(&ch)?;
    let (a_last, c_last) = (
        b.last_cycle.ok_or("no cycle")?,
        c_row.last_cycle.ok_or("no cycle")?,
    );
    ch.a.wait_cycle(VM, a_last, LONG)?;
    ch.c.wait_cycle(VM, c_last, LONG)?;
    eprintln!(
        "B → C after the planned failover: {} bytes in {} cycles; B → A: {} bytes in {} cycles; \
         the VM wrote {written}",
        c_row.stats.total_bytes,
        c_row.stats.successful_cycles,
        b.stats.total_bytes,
        b.stats.successful_cycles
    );
    assert!(
        c_row.stats.total_bytes <= written + 4 * 65536,
        "{} bytes shipped to C for {written} written",
        c_row.stats.total_bytes
    );
    // The latest points (a cycle the pause aborted may still have reached its replica: it was
    // cut after the writes too, and is adopted by the next reconciliation).
    let c_points = points_of(&ch.c, &vm)?;
    let a_points = points_of(&ch.a, &vm)?;
    assert!(
        c_points.last().is_some_and(|p| *p >= c_last),
        "C's points {c_points:?}, B's last cycle to C {c_last}"
    );
    assert!(
        a_points.last().is_some_and(|p| *p >= a_last),
        "A's points {a_points:?}, B's last cycle to A {a_last}"
    );
    for (disk, h) in replica_hashes(&ch.c, vm.def.uuid, None)? {
        assert_eq!(
            h,
            on_b.hash(&disk)?,
            "C's latest point {c_points:?} differs from B's VM ({disk})"
        );
    }
    for (disk, h) in replica_hashes(&ch.a, vm.def.uuid, None)? {
        assert_eq!(
            h,
            on_b.hash(&disk)?,
            "A's latest point {a_points:?} differs from B's VM ({disk})"
        );
    }
    let c = ch.c.status(VM)?;
    assert_eq!(c.primary, "host-b");
    assert_eq!(c.state, ReplicationState::Replicating);
    assert_eq!(ch.a.status(VM)?.primary, "host-b");
    Ok(())
}

/// Planned failover A → B, then `reverse` on B to the extended replica C (instead of A): C's
/// chain continues from A's final point, the one B failed over from (same id, same content),
/// and B's cycles to C carry what the VM on B wrote, not a full copy; the bitmap started for
/// C as a further relationship is removed. (`reverse` to A instead gives both relationships:
/// `planned_failover_a_to_b_then_reverse_to_a_continues_to_c_without_a_full_copy`.)
#[test]
fn planned_failover_a_to_b_then_reverse_to_c_continues_without_a_full_copy() -> TestResult {
    let ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let (vm, _) = running_chain(&ch)?;
    vm.write_seq("disk0", 20, 5, 5000)?;
    let final_hashes = [vm.hash("disk0")?, vm.hash("disk1")?];
    let prep = failover(&ch.a, &["prepare", VM])?;
    let k = prep.point.ok_or("no final cycle")?;
    ch.b.wait_cycle(VM, k, LONG)?;
    let live = failover(&ch.b, &["start", VM])?;
    assert_eq!(live.point, Some(k));
    // The final point reaches C (forwarded although the VM now runs on B).
    wait_extended(&ch, "C to get the final point", |x| {
        x.last_point_sent == Some(k)
    })?;
    let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&ch.b.dir, vm.def.uuid));
    on_b.write_seq("disk1", 50, 6, 5100)?;
    let written = 6 * 65536;
    let out = ch.b.ok(&[
        "reverse",
        VM,
        "--replica",
        &ch.c.addr,
        "--replica-fingerprint",
        &ch.c.fingerprint,
    ])?;
    assert!(
        out.contains("continues from that point") && out.contains("[]"),
        "{out}"
    );
    let b = ch.b.status(VM)?;
    assert_eq!(b.mode, vmr_proto::api::ReplicationMode::Primary);
    assert_eq!(b.replica, ch.c.addr);
    assert!(b.extended.is_none(), "{b:?}");
    assert!(b.fanout.is_empty(), "{b:?}");
    // The bitmap started for C at `failover start` tracks for no relationship: removed.
    assert!(
        ch.b.log()
            .contains("removed the extended replica's tracking bitmap"),
        "{}",
        tail(&ch.b.log(), 30)
    );
    // C still holds A's final point as it was.
    for (i, (disk, h)) in replica_hashes(&ch.c, vm.def.uuid, Some(k))?
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            h, final_hashes[i],
            "C's point {k} differs from A's disks ({disk})"
        );
    }
    let (st, _) = ch.b.wait_cycle(VM, k + 1, LONG)?;
    let last = st.last_cycle.ok_or("no cycle")?;
    ch.b.ok(&["pause", VM])?;
    let b = ch.b.status(VM)?;
    let last = b.last_cycle.unwrap_or(last);
    ch.c.wait_cycle(VM, last, LONG)?;
    eprintln!(
        "B → C after the planned failover: {} bytes in {} cycles; the VM wrote {written}",
        b.stats.total_bytes, b.stats.successful_cycles
    );
    assert!(
        b.stats.total_bytes <= written + 4 * 65536,
        "{} bytes shipped for {written} written",
        b.stats.total_bytes
    );
    for (disk, h) in replica_hashes(&ch.c, vm.def.uuid, Some(last))? {
        assert_eq!(
            h,
            on_b.hash(&disk)?,
            "C's point {last} differs from B's VM ({disk})"
        );
    }
    assert_eq!(ch.c.status(VM)?.primary, "host-b");
    Ok(())
}

/// Unplanned failover on B (A lost) to a point older than C's latest, then `reverse` to A when
/// A is back (its VM off): B replicates to A (a resync: A's disks went on after the point) and
/// continues to C as a second relationship through `continue-from` (C drops its points after
/// the failover point and keeps that one), shipping C only what the VM on B wrote.
#[test]
fn unplanned_failover_on_b_then_reverse_to_a_continues_to_c_from_its_point() -> TestResult {
    let mut ch = Chain::new(exe())?;
    ch.allow_probes()?;
    let mut vm = vm_on_a(&ch)?;
    ch.enable(VM, &["--frequency", "5s", "--retain", "1s=20"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s", "--retain", "1s=20"])?;
    wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    for round in 0..2u64 {
        vm.write_seq("disk0", 200 + round * 8, 8, 7000 + round)?;
        let last = settle(&ch, &vm)?;
        wait_extended(&ch, "C to get A's last point", |x| {
            x.last_point_sent == Some(last)
        })?;
        if round < 1 {
            ch.a.ok(&["resume", VM])?;
        }
    }
    let b_points = points_of(&ch.b, &vm)?;
    let c_points = points_of(&ch.c, &vm)?;
    let common: Vec<u64> = b_points
        .iter()
        .copied()
        .filter(|p| c_points.contains(p))
        .collect();
    assert!(common.len() >= 2, "B {b_points:?}, C {c_points:?}");
    let point = common[common.len() - 2];
    let later: Vec<u64> = c_points.iter().copied().filter(|p| *p > point).collect();
    let at_point = replica_hashes(&ch.c, vm.def.uuid, Some(point))?;
    // A is lost; B fails over to the older point, and its VM writes.
    ch.a.kill9();
    let live = failover(
        &ch.b,
        &["start", VM, "--point", &point.to_string(), "--force"],
    )?;
    assert_eq!(live.point, Some(point));
    let on_b = StandIn::attach(vm.def.clone(), nbd_socket(&ch.b.dir, vm.def.uuid));
    on_b.write_seq("disk1", 40, 6, 7100)?;
    let written = 6 * 65536;
    // A comes back with its VM off; reverse to A.
    vm.stop()?;
    ch.a.restart()?;
    let out = ch.b.ok(&["reverse", VM, "--frequency", "5s"])?;
    assert!(
        out.contains(&format!(
            "the extended replication to {} continues from point {point}",
            ch.c.addr
        )) && out.contains(&format!("it dropped the later points {later:?}")),
        "{out}"
    );
    let (b, c_row) = b_rows(&ch)?;
    assert_eq!(b.mode, vmr_proto::api::ReplicationMode::Primary);
    assert_eq!(c_row.replica, ch.c.addr);
    // C kept the failover point as it was (and dropped the later ones: the message).
    assert_eq!(replica_hashes(&ch.c, vm.def.uuid, Some(point))?, at_point);
    // Both relationships cut after the VM's writes, then pause.
    wait_every(LONG, Duration::from_millis(50), "cycles to A and C", || {
        let st = ch.b.status(VM)?;
        let c = st.fanout.first().and_then(|c| c.last_cycle).unwrap_or(0);
        Ok(st.state == ReplicationState::Replicating
            && st.last_cycle.unwrap_or(0) >= point + 2
            && c >= point + 2)
    })?;
    ch.b.ok(&["pause", VM, "--replica", &ch.a.addr])?;
    ch.b.ok(&["pause", VM, "--replica", &ch.c.addr])?;
    let (b, c_row) = b_rows(&ch)?;
    ch.a.wait_cycle(VM, b.last_cycle.ok_or("no cycle")?, LONG)?;
    ch.c.wait_cycle(VM, c_row.last_cycle.ok_or("no cycle")?, LONG)?;
    eprintln!(
        "B → C after the unplanned failover: {} bytes in {} cycles; B → A: {} bytes; the VM \
         wrote {written}",
        c_row.stats.total_bytes, c_row.stats.successful_cycles, b.stats.total_bytes
    );
    assert!(
        c_row.stats.total_bytes <= written + 4 * 65536,
        "{} bytes shipped to C for {written} written",
        c_row.stats.total_bytes
    );
    for (who, agent) in [("A", &ch.a), ("C", &ch.c)] {
        for (disk, h) in replica_hashes(agent, vm.def.uuid, None)? {
            assert_eq!(
                h,
                on_b.hash(&disk)?,
                "{who}'s latest point differs from B's VM ({disk})"
            );
        }
    }
    assert_eq!(ch.c.status(VM)?.primary, "host-b");
    Ok(())
}
