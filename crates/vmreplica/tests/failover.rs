//! End-to-end failover between two real agents on 127.0.0.1 with qemu-storage-daemon stand-in
//! VMs: test failover while cycles keep applying (the copy's content never changes), the
//! split-brain guard, unplanned failover to the latest and to an older point with each point's
//! content verified, cancel, complete, and a planned failover (prepare, start, reverse) with
//! zero data loss proven by hashes and a cycle back to the old primary.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::{FailoverResult, PointInfo, ReplicationState};

const LONG: Duration = Duration::from_secs(90);

fn failover(agent: &Agent, args: &[&str]) -> TestResult<FailoverResult> {
    let mut a = vec!["failover"];
    a.extend_from_slice(args);
    a.push("--json");
    Ok(serde_json::from_str(&agent.ok(&a)?)?)
}

fn points(agent: &Agent, vm: &str) -> TestResult<Vec<PointInfo>> {
    Ok(serde_json::from_str(&agent.ok(&["points", vm, "--json"])?)?)
}

/// A handle to write to / hash a VM started by a failover (its NBD socket).
fn started(vm: &StandIn, nbd: PathBuf) -> StandIn {
    StandIn::attach(vm.def.clone(), nbd)
}

/// The NBD socket of the live failed-over stand-in (the new primary's capture socket).
fn live_nbd(agent: &Agent, uuid: uuid::Uuid) -> PathBuf {
    nbd_socket(&agent.dir, uuid)
}

/// The NBD socket of a test copy: next to its overlays.
fn test_nbd(r: &FailoverResult) -> PathBuf {
    Path::new(&r.disks[0].1)
        .parent()
        .expect("dir")
        .join("nbd.sock")
}

/// Write, then wait for a cycle cut after the write to be applied; returns (point, hash).
fn write_and_cut(p: &Pair, vm: &StandIn, seed: u64) -> TestResult<(u64, [u8; 32])> {
    let name = &vm.def.name;
    vm.write_random("disk0", 40, seed)?;
    let cut = p.a.status(name)?.last_cycle.unwrap_or(0) + 2;
    p.wait_cycle(name, cut, LONG)?;
    let h = vm.hash("disk0")?;
    let latest = p.b.status(name)?.last_cycle.expect("applied");
    // Nothing was written after the write above: every later point has the same content.
    Ok((latest, h))
}

#[test]
fn test_failover_then_unplanned_with_guard_cancel_and_complete() -> TestResult {
    let p = Pair::new(exe())?;
    p.a.allow(&p.b)?; // lets the replica probe the primary (split-brain guard)
    let vm = StandIn::create(p.root.path(), &p.a, "fo1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("fo1", &["--frequency", "5s"])?;

    // Nothing to fail over to before initial replication completed. On a quick machine the
    // initial copy may be done already: then the test copy started, and it is stopped again
    // (a forgotten copy pins its point and `failover complete` below refuses).
    let out = p.b.cli(&["failover", "test", "fo1", "--json"])?;
    if out.status.success() {
        let early: FailoverResult = serde_json::from_slice(&out.stdout)?;
        let id = early.test_id.ok_or("a test copy without an id")?;
        p.b.ok(&["failover", "stop-test", "fo1", "--test-id", &id.to_string()])?;
    } else {
        assert_eq!(
            out.status.code(),
            Some(5),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let (pa, ha) = write_and_cut(&p, &vm, 11)?;
    // Test failover on the latest point: an isolated copy NAME-test.
    let t = failover(&p.b, &["test", "fo1"])?;
    assert_eq!(t.name, "fo1-test");
    assert_eq!(t.point, Some(pa));
    assert!(t.test_id.is_some() && t.qmp.is_some());
    assert_eq!(p.b.status("fo1")?.state, ReplicationState::Replicating);
    let copy = started(&vm, test_nbd(&t));
    assert_eq!(
        copy.hash("disk0")?,
        ha,
        "the test copy differs from its point"
    );
    // The copy is writable and isolated; a second copy may run at the same time.
    copy.write_random("disk0", 5, 999)?;
    let t2 = failover(&p.b, &["test", "fo1", "--point", &pa.to_string()])?;
    assert_eq!(started(&vm, test_nbd(&t2)).hash("disk0")?, ha);
    let tested = copy.hash("disk0")?;

    // Replication and applies go on; the copy never changes.
    let (pb, hb) = write_and_cut(&p, &vm, 22)?;
    assert!(pb > pa && hb != ha);
    assert_eq!(
        copy.hash("disk0")?,
        tested,
        "a cycle changed what the test copy sees"
    );
    let ids: Vec<u64> = points(&p.b, "fo1")?.iter().map(|x| x.id).collect();
    assert!(ids.contains(&pa) && ids.contains(&pb), "{ids:?}");
    p.b.ok(&[
        "failover",
        "stop-test",
        "fo1",
        "--test-id",
        &t2.test_id.expect("id").to_string(),
    ])?;

    // Split-brain guard: the primary answers and its VM runs.
    let out = p.b.cli(&["failover", "start", "fo1"])?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(p.b.status("fo1")?.state, ReplicationState::Replicating);

    // The primary's agent is gone; its host answers (connection refused), so the VM may still
    // run there: refused unless the admin knows it does not.
    let mut a = p.a;
    a.kill9();
    let out =
        p.b.cli(&["failover", "start", "fo1", "--point", "latest"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("connection refused") && err.contains("--force"),
        "{err}"
    );
    let t0 = Instant::now();
    let live = failover(&p.b, &["start", "fo1", "--point", "latest", "--force"])?;
    let took = t0.elapsed();
    assert_eq!(live.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(live.point, Some(pb));
    eprintln!(
        "unplanned failover to latest: {took:?} (agent-side {} ms)",
        live.elapsed_ms
    );
    let vm_b = started(&vm, live_nbd(&p.b, vm.def.uuid));
    assert_eq!(vm_b.hash("disk0")?, hb, "latest point content");
    vm_b.write_random("disk0", 10, 33)?;
    let st = p.b.status("fo1")?;
    assert_eq!(st.state, ReplicationState::FailedOverWaitingCompletion);

    // Cancel: what the failed-over VM wrote is discarded; the replica is untouched.
    let c = failover(&p.b, &["cancel", "fo1"])?;
    assert_eq!(c.state, ReplicationState::Replicating);
    assert_eq!(replica_hashes(&p.b, vm.def.uuid, Some(pb))?[0].1, hb);

    // Fail over to the older point instead.
    let old = failover(
        &p.b,
        &["start", "fo1", "--point", &pa.to_string(), "--force"],
    )?;
    assert_eq!(old.point, Some(pa));
    assert_eq!(
        started(&vm, live_nbd(&p.b, vm.def.uuid)).hash("disk0")?,
        ha,
        "older point content"
    );
    // The test copy still sees its own content.
    assert_eq!(copy.hash("disk0")?, tested);

    // Complete: the chosen point stays, later ones go.
    let done = failover(&p.b, &["complete", "fo1"])?;
    assert_eq!(done.state, ReplicationState::FailedOver);
    let ids: Vec<u64> = points(&p.b, "fo1")?.iter().map(|x| x.id).collect();
    assert!(ids.iter().all(|i| *i <= pa) && ids.contains(&pa), "{ids:?}");
    let st = p.b.status("fo1")?;
    assert_eq!(st.state, ReplicationState::FailedOver);
    assert_ne!(
        st.health,
        vmr_proto::api::Health::Normal,
        "health stays Warning until reverse"
    );
    // Nothing left to cancel.
    assert_eq!(
        p.b.cli(&["failover", "cancel", "fo1"])?.status.code(),
        Some(5)
    );
    p.b.ok(&["failover", "stop-test", "fo1"])?;
    assert_eq!(
        p.b.cli(&["failover", "stop-test", "fo1"])?.status.code(),
        Some(4)
    );
    drop(a);
    Ok(())
}

/// QEMU 10.0's qemu-storage-daemon can crash with SIGSEGV at start when a client connects to
/// its QMP socket at once (a race in its socket listener, fixed upstream): the agent starts the
/// program again, at most three times; a copy that never starts leaves nothing behind. The
/// test hook `test-launch-crash` makes the next N starts crash (SIGSEGV right after the spawn).
#[test]
fn a_vm_program_that_crashes_at_start_is_started_again() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "cr1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("cr1", &["--frequency", "5s"])?;
    let (pa, ha) = write_and_cut(&p, &vm, 7)?;
    let hook = p.b.dir.join("test-launch-crash");
    let copies = p.b.dir.join("fo").join(vm.def.uuid.simple().to_string());
    let test_dirs = || -> TestResult<Vec<String>> {
        let Ok(rd) = std::fs::read_dir(&copies) else {
            return Ok(Vec::new());
        };
        let mut v = Vec::new();
        for e in rd {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with("test") {
                v.push(name);
            }
        }
        Ok(v)
    };

    // Two crashes, then the third start runs: the copy is there and says so.
    std::fs::write(&hook, "2")?;
    let t = failover(&p.b, &["test", "cr1", "--point", &pa.to_string()])?;
    assert_eq!(
        std::fs::read_to_string(&hook)?.trim(),
        "0",
        "two starts crashed"
    );
    assert!(
        t.message.contains("started again") && t.message.contains("SIGSEGV, SIGSEGV"),
        "{}",
        t.message
    );
    assert_eq!(t.point, Some(pa));
    assert_eq!(started(&vm, test_nbd(&t)).hash("disk0")?, ha);
    p.b.ok(&[
        "failover",
        "stop-test",
        "cr1",
        "--test-id",
        &t.test_id.ok_or("no test id")?.to_string(),
    ])?;
    assert_eq!(test_dirs()?, Vec::<String>::new());

    // Three crashes: the agent gives up, says why, and leaves no copy and no view behind.
    std::fs::write(&hook, "3")?;
    let out = p.b.cli(&["failover", "test", "cr1", "--json"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SIGSEGV") && err.contains("at start"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&hook)?.trim(),
        "0",
        "three starts crashed"
    );
    assert_eq!(test_dirs()?, Vec::<String>::new());
    assert_eq!(p.b.status("cr1")?.state, ReplicationState::Replicating);

    // Without the hook the next copy starts at once.
    std::fs::remove_file(&hook)?;
    let t = failover(&p.b, &["test", "cr1", "--point", &pa.to_string()])?;
    assert!(!t.message.contains("started again"), "{}", t.message);
    assert_eq!(started(&vm, test_nbd(&t)).hash("disk0")?, ha);
    Ok(())
}

#[test]
fn planned_failover_loses_nothing_and_reverses() -> TestResult {
    let p = Pair::new(exe())?;
    p.a.allow(&p.b)?; // the old primary must accept the new primary (Hyper-V's prerequisite)
    let vm = StandIn::create(p.root.path(), &p.a, "pf1", &["disk0"], 64)?;
    vm.write_random("disk0", 200, 5)?;
    vm.register(&p.a)?;
    p.enable("pf1", &["--frequency", "5s"])?;
    p.wait_cycle("pf1", 1, LONG)?;
    // Bad input and wrong side.
    assert_eq!(
        p.a.cli(&["failover", "start", "pf1"])?.status.code(),
        Some(5)
    );
    assert_eq!(
        p.b.cli(&["failover", "prepare", "pf1"])?.status.code(),
        Some(5)
    );
    assert_eq!(
        p.b.cli(&["failover", "start", "nope"])?.status.code(),
        Some(4)
    );
    assert_eq!(
        p.b.cli(&["failover", "start", "pf1", "--point", "x"])?
            .status
            .code(),
        Some(2)
    );

    // The guest writes until it is shut down; the last writes are not in any cycle yet.
    vm.write_random("disk0", 30, 6)?;
    let final_hash = vm.hash("disk0")?;
    let prep = failover(&p.a, &["prepare", "pf1"])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let k = prep.point.expect("final cycle");
    assert_eq!(
        p.a.status("pf1")?.state,
        ReplicationState::PreparedForFailover
    );
    // Locked: no further cycles.
    // That time passing starts no cycle here is vmr-core's table test
    // `idle_states_start_nothing_as_time_passes`; no sleep needed.
    assert_eq!(p.a.status("pf1")?.last_cycle, Some(k));

    let t0 = Instant::now();
    let live = failover(&p.b, &["start", "pf1"])?;
    let took = t0.elapsed();
    eprintln!(
        "planned failover start: {took:?} (agent-side {} ms)",
        live.elapsed_ms
    );
    assert_eq!(live.point, Some(k));
    let pts = points(&p.b, "pf1")?;
    assert_eq!(pts.last().map(|x| x.kind.as_str()), Some("planned"));
    let vm_b = started(&vm, live_nbd(&p.b, vm.def.uuid));
    assert_eq!(
        vm_b.hash("disk0")?,
        final_hash,
        "planned failover lost writes"
    );

    // Reverse: b becomes the primary, a its replica; only new changes travel.
    let r: FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "pf1", "--frequency", "5s", "--json"])?)
            .expect("reverse json");
    assert_eq!(r.state, ReplicationState::Replicating);
    vm_b.write_random("disk0", 8, 77)?;
    let new_hash = vm_b.hash("disk0")?;
    wait_until(LONG, "a cycle back to the old primary", || {
        Ok({
            p.b.status("pf1")?.last_cycle.unwrap_or(0) >= k + 2
                && p.a.status("pf1")?.last_cycle.unwrap_or(0) >= k + 2
        })
    })?;
    let sb = p.b.status("pf1")?;
    assert_eq!(sb.mode, vmr_proto::api::ReplicationMode::Primary);
    assert_eq!(sb.state, ReplicationState::Replicating);
    assert!(
        sb.stats.total_bytes <= 8 * 65536 * 2,
        "reverse sent more than the new changes: {}",
        sb.stats.total_bytes
    );
    let sa = p.a.status("pf1")?;
    assert_eq!(sa.mode, vmr_proto::api::ReplicationMode::Replica);
    p.b.ok(&["pause", "pf1"])?;
    let back = replica_hashes(&p.a, vm.def.uuid, None)?;
    assert_eq!(
        back[0].1, new_hash,
        "the old primary's replica differs from the new primary"
    );
    Ok(())
}

#[test]
fn reverse_after_unplanned_failover_sends_only_differences() -> TestResult {
    let mut p = Pair::new(exe())?;
    p.a.allow(&p.b)?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "uf1", &["disk0"], 32)?;
    vm.write_random("disk0", 100, 3)?;
    vm.register(&p.a)?;
    p.enable("uf1", &["--frequency", "5s"])?;
    let (k, hk) = write_and_cut(&p, &vm, 4)?;

    // The primary host is lost; its VM wrote more that never left.
    p.a.kill9();
    vm.write_random("disk0", 20, 5)?;
    assert_ne!(vm.hash("disk0")?, hk);
    let live = failover(&p.b, &["start", "uf1", "--force"])?;
    assert_eq!(live.point, Some(k));
    let vm_b = started(&vm, live_nbd(&p.b, vm.def.uuid));
    assert_eq!(vm_b.hash("disk0")?, hk);
    vm_b.write_random("disk0", 8, 6)?;
    let h_new = vm_b.hash("disk0")?;

    // The old primary comes back with its VM off; reverse resyncs it from the new primary.
    vm.stop()?;
    p.a.restart()?;
    let r: FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "uf1", "--frequency", "5s", "--json"])?)
            .expect("reverse json");
    assert!(r.message.contains("resynchronised"), "{}", r.message);
    let deadline = Instant::now() + LONG;
    loop {
        let (sb, sa) = (p.b.status("uf1")?, p.a.status("uf1")?);
        if sb.state == ReplicationState::Replicating
            && sb.last_cycle.unwrap_or(0) >= k + 2
            && sa.last_cycle.unwrap_or(0) >= k + 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resync and cycle back: new primary {sb:?}\nold primary {sa:?}\n--- b log ---\n{}\n--- a log ---\n{}",
            tail(&p.b.log(), 30),
            tail(&p.a.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sb = p.b.status("uf1")?;
    assert!(
        sb.stats.total_bytes <= (20 + 8) * 65536 * 2,
        "reverse sent more than the differing blocks: {}",
        sb.stats.total_bytes
    );
    p.b.ok(&["pause", "uf1"])?;
    assert_eq!(
        replica_hashes(&p.a, vm.def.uuid, None)?[0].1,
        h_new,
        "old primary differs after reverse"
    );
    Ok(())
}

/// Failover time, command → the started VM's QMP answers, for a small and a large (sparse)
/// disk, to the latest and to an older point. `cargo test -p vmreplica --test failover --
/// --ignored --nocapture bench_`.
#[test]
#[ignore]
fn bench_failover_time() -> TestResult {
    for (label, mib) in [("64 MiB", 64u64), ("8 GiB sparse", 8192)] {
        let p = Pair::new(exe())?;
        p.a.allow(&p.b)?;
        let vm = StandIn::create(p.root.path(), &p.a, "bench", &["disk0"], mib)?;
        vm.write_random("disk0", 64, 1)?;
        vm.register(&p.a)?;
        p.enable("bench", &["--frequency", "5s"])?;
        let (older, _) = write_and_cut(&p, &vm, 2)?;
        let _pin = failover(&p.b, &["test", "bench", "--point", &older.to_string()])?;
        let (latest, _) = write_and_cut(&p, &vm, 3)?;
        assert!(latest > older);
        for (which, point) in [
            ("latest", "latest".to_owned()),
            ("older", older.to_string()),
        ] {
            let mut times = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                let r = failover(&p.b, &["start", "bench", "--point", &point, "--force"])?;
                let qmp = PathBuf::from(r.qmp.clone().expect("qmp"));
                let mut s = std::os::unix::net::UnixStream::connect(&qmp).expect("qmp connect");
                let mut buf = [0u8; 64];
                let n = std::io::Read::read(&mut s, &mut buf).expect("qmp greeting");
                assert!(n > 0);
                times.push(t0.elapsed().as_millis());
                drop(s);
                failover(&p.b, &["cancel", "bench"])?;
            }
            eprintln!(
                "BENCH failover {label:<13} {which:<6} point: {times:?} ms (command → QMP greeting)"
            );
        }
    }
    Ok(())
}

/// `failover prepare` while a cycle is in flight: the machine aborts that cycle (its changes are
/// merged back) and ships the final, planned cycle, which carries everything (the demo found a
/// prepare that refused to start the planned cycle while the aborted one was still ending).
#[test]
fn prepare_while_a_cycle_runs_ships_everything() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "busy1", &["disk0"], 128)?;
    vm.register(&p.a)?;
    p.enable("busy1", &["--frequency", "5s"])?;
    p.wait_cycle("busy1", 1, LONG)?;
    // A large change set, so that the next cycle takes a while to ship.
    vm.write_random("disk0", 1500, 21)?;
    let final_hash = vm.hash("disk0")?;
    wait_until(LONG, "a cycle in flight", || {
        Ok(p.a.status("busy1")?.progress.is_some())
    })?;
    let prep = failover(&p.a, &["prepare", "busy1"])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let k = prep.point.expect("final cycle");
    p.b.wait_cycle("busy1", k, LONG)?;
    // The replica's split-brain probe reaches the prepared primary (it is not running).
    p.a.allow(&p.b)?;
    let live = failover(&p.b, &["start", "busy1", "--no-start"])?;
    assert_eq!(live.point, Some(k));
    let on_b = replica_hashes(&p.b, vm.def.uuid, Some(k))?;
    assert_eq!(on_b, vec![("disk0".to_owned(), final_hash)]);
    Ok(())
}

/// The persistent bitmaps of `image` and whether each is marked in use (`qemu-img info`).
fn bitmaps(image: &Path) -> TestResult<Vec<(String, bool)>> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let none = Vec::new();
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap_or(&none);
    Ok(list
        .iter()
        .map(|b| {
            let in_use = b["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "in-use"));
            (b["name"].as_str().unwrap_or("").to_owned(), in_use)
        })
        .collect())
}

/// Defect 3: the VM's QEMU exited after a clean shutdown (the default without `-no-shutdown`,
/// and libvirt's): `failover prepare` ships the final cycle from the images themselves (a
/// qemu-storage-daemon on them loads the persistent bitmaps the clean exit stored), and the
/// replica's planned point holds every write (hashes). A daemon that crashes at start (QEMU
/// 10.0's start-up race) is started again, at most three starts.
#[test]
fn prepare_after_qemu_exited_ships_the_final_cycle_from_the_images() -> TestResult {
    let p = Pair::new(exe())?;
    p.a.allow(&p.b)?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "gone1", &["disk0", "disk1"], 32)?;
    vm.write_random("disk0", 100, 1)?;
    vm.register(&p.a)?;
    p.enable("gone1", &["--frequency", "5s"])?;
    p.wait_cycle("gone1", 1, LONG)?;
    // Writes no cycle carried yet, then the VM's process exits cleanly (bitmaps stored).
    vm.write_random("disk0", 30, 2)?;
    vm.write_random("disk1", 20, 3)?;
    let want = vec![
        ("disk0".to_owned(), vm.hash("disk0")?),
        ("disk1".to_owned(), vm.hash("disk1")?),
    ];
    vm.stop()?;
    // QEMU 10.0's start-up crash (SIGSEGV before its QMP answers; test hook: the next N starts
    // crash), three times: the agent gives up, says why, and replication stays as it was.
    let hook = p.a.dir.join("test-image-daemon-crash");
    std::fs::write(&hook, "3")?;
    let out = p.a.cli(&["failover", "prepare", "gone1"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SIGSEGV, SIGSEGV, SIGSEGV (3 starts)") && err.contains("at start"),
        "{err}"
    );
    assert_eq!(p.state("gone1")?, ReplicationState::Replicating);
    // Twice, then the third start runs: the final cycle ships and the answer says so.
    std::fs::write(&hook, "2")?;
    let prep = failover(&p.a, &["prepare", "gone1"])?;
    assert_eq!(std::fs::read_to_string(&hook)?.trim(), "0");
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    assert!(prep.message.contains("images"), "{}", prep.message);
    assert!(
        prep.message.contains("started again") && prep.message.contains("SIGSEGV, SIGSEGV)"),
        "{}",
        prep.message
    );
    let k = prep.point.expect("final cycle");
    // The daemon is gone again and stored its bitmaps: the images are free and consistent.
    for (_, image) in vm.disks() {
        let bms = bitmaps(&image)?;
        assert!(!bms.is_empty(), "no bitmap left in {}", image.display());
        assert!(bms.iter().all(|(_, in_use)| !in_use), "{bms:?}");
    }
    p.b.wait_cycle("gone1", k, LONG)?;
    let live = failover(&p.b, &["start", "gone1"])?;
    assert_eq!(live.point, Some(k));
    assert_eq!(
        replica_hashes(&p.b, vm.def.uuid, Some(k))?,
        want,
        "the final cycle from the images lost writes"
    );
    // Reverse: the old primary takes its images (which the daemon left with their bitmaps) in
    // as the point; only what the failed-over VM writes travels back.
    let vm_b = started(&vm, live_nbd(&p.b, vm.def.uuid));
    let r: FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "gone1", "--frequency", "5s", "--json"])?)?;
    assert_eq!(r.state, ReplicationState::Replicating);
    vm_b.write_random("disk1", 6, 4)?;
    let new_hash = vm_b.hash("disk1")?;
    wait_until(LONG, "a cycle back to the old primary", || {
        Ok(p.a.status("gone1")?.last_cycle.unwrap_or(0) >= k + 2)
    })?;
    assert!(
        p.b.status("gone1")?.stats.total_bytes <= 6 * 65536 * 2,
        "reverse sent more than the new changes"
    );
    p.b.ok(&["pause", "gone1"])?;
    let back = replica_hashes(&p.a, vm.def.uuid, None)?;
    assert_eq!(back[0].1, want[0].1);
    assert_eq!(back[1].1, new_hash);
    Ok(())
}

/// Defect 3's refusals: the QMP socket is gone but the VM's process still holds its images
/// (QEMU's image locking refuses the daemon: said clearly, nothing changes), and a VM whose
/// process was killed (bitmaps inconsistent: a full resynchronisation is needed, said so,
/// never a silent wrong delta).
#[test]
fn prepare_from_images_refuses_images_in_use_and_lost_tracking() -> TestResult {
    let p = Pair::new(exe())?;
    let mut busy = StandIn::create(p.root.path(), &p.a, "busy2", &["disk0"], 16)?;
    let mut killed = StandIn::create(p.root.path(), &p.a, "killed2", &["disk0"], 16)?;
    for vm in [&busy, &killed] {
        vm.write_random("disk0", 20, 1)?;
        vm.register(&p.a)?;
        p.enable(vm.name(), &["--frequency", "5s"])?;
    }
    p.wait_cycle("busy2", 1, LONG)?;
    p.wait_cycle("killed2", 1, LONG)?;

    // Its monitor is unreachable (the socket removed), the process runs on.
    std::fs::remove_file(&busy.qmp)?;
    let out = p.a.cli(&["failover", "prepare", "busy2"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "prepared while the VM runs");
    assert!(
        err.contains("in use") && err.contains("busy2-disk0.qcow2"),
        "{err}"
    );
    assert_eq!(p.state("busy2")?, ReplicationState::Replicating);
    busy.stop()?;

    // Killed: the bitmaps on disk are marked in use (inconsistent).
    killed.write_random("disk0", 5, 2)?;
    killed.kill9();
    let out = p.a.cli(&["failover", "prepare", "killed2"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "prepared without reliable tracking");
    assert!(err.contains("resynchronisation"), "{err}");
    assert_ne!(p.state("killed2")?, ReplicationState::PreparedForFailover);
    for (_, image) in killed.disks() {
        // The daemon that found out is gone: the image is free.
        let out = std::process::Command::new("qemu-img")
            .arg("info")
            .arg(&image)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The agent was killed while its daemon ran on the images (prepare interrupted): the daemon
/// still holds them. The next `prepare` ends it (its socket is the agent's own) and goes on.
#[test]
fn prepare_ends_a_daemon_an_earlier_agent_left_on_the_images() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "left1", &["disk0"], 16)?;
    vm.write_random("disk0", 20, 1)?;
    vm.register(&p.a)?;
    p.enable("left1", &["--frequency", "5s"])?;
    p.wait_cycle("left1", 1, LONG)?;
    vm.write_random("disk0", 10, 2)?;
    let want = vm.hash("disk0")?;
    vm.stop()?;
    // What the agent's daemon looks like: its monitor where the agent puts it.
    let id = vm.def.uuid.simple().to_string();
    let qmp = vmr_proto::sockpath::socket_path(
        p.a.dir
            .join("work")
            .join(&id)
            .join(format!("vmr-{}-prep.qmp", &id[..8])),
        &p.a.dir,
        &format!("vmr-{id}-prep.qmp"),
    );
    std::fs::create_dir_all(qmp.parent().expect("dir"))?;
    let image = vm.disks()[0].1.clone();
    let mut cmd = std::process::Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=f0")
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp.display()
        ))
        .arg("--monitor")
        .arg("chardev=m");
    let mut left = vmr_testkit::proc::ChildGuard::spawn(cmd, "leftover daemon")?;
    wait_qmp_greeting(&qmp, LONG)?;
    let prep = failover(&p.a, &["prepare", "left1"])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    assert!(!left.is_running(), "the leftover daemon still runs");
    let k = prep.point.expect("final cycle");
    p.b.wait_cycle("left1", k, LONG)?;
    assert_eq!(replica_hashes(&p.b, vm.def.uuid, Some(k))?[0].1, want);
    Ok(())
}

/// `failover prepare --shutdown` on a VM that never goes down (a stand-in: no guest, no
/// `system_powerdown`, no guest agent): after the timeout it fails with exit 5 and a message
/// saying so, and nothing changed: replication goes on (a later cycle is shipped).
#[test]
fn prepare_shutdown_timeout_changes_nothing() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "stays1", &["disk0"], 64)?;
    vm.register(&p.a)?;
    p.enable("stays1", &["--frequency", "5s"])?;
    p.wait_cycle("stays1", 1, LONG)?;
    let t0 = Instant::now();
    let out = p.a.cli(&[
        "failover",
        "prepare",
        "stays1",
        "--shutdown",
        "--timeout",
        "3s",
    ])?;
    let waited = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("did not shut down within 3 s") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(waited >= Duration::from_secs(3), "{waited:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    let st = p.a.status("stays1")?;
    assert_eq!(st.state, ReplicationState::Replicating);
    // the driver runs again: the next cycle ships
    vm.write_random("disk0", 1, 3)?;
    p.wait_cycle("stays1", st.last_cycle.unwrap_or(1) + 1, LONG)?;
    // --timeout needs --shutdown
    let out =
        p.a.cli(&["failover", "prepare", "stays1", "--timeout", "3s"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

/// Whether the replica's log says that it admitted cycle `id` (debug level).
fn admitted(agent: &Agent, id: u64) -> bool {
    agent
        .log()
        .lines()
        .any(|l| l.contains("cycle admitted") && l.contains(&format!("cycle={id} ")))
}

/// Slow down the primary's next data cycle, write, and wait until the replica receives it;
/// returns the cycle's id and the content it carries.
fn slow_cycle_in_flight(p: &Pair, vm: &StandIn, seed: u64) -> TestResult<(u64, [u8; 32])> {
    let name = &vm.def.name;
    std::fs::write(p.a.dir.join("test-cycle-slow-ms"), "1000")?;
    vm.write_random("disk0", 20, seed)?;
    let h = vm.hash("disk0")?;
    // The primary ships data (only the write above is pending, so it is this write's cycle),
    // whose base is the replica's latest cycle: its id is the next one.
    wait_until(LONG, "a data cycle in flight", || {
        Ok(p.a.status(name)?.progress.is_some_and(|(done, _)| done > 0))
    })?;
    let id = p.b.status(name)?.last_cycle.expect("applied") + 1;
    wait_until(LONG, "the replica receiving the cycle", || {
        Ok(admitted(&p.b, id))
    })?;
    Ok((id, h))
}

/// A failover (and `verify --local`) while the replica receives a cycle. The cycle's writer
/// holds the VM's chain until the handler hands it back through the VM owner's queue, so a
/// command that waited for the chain inside the owner deadlocked (found by reading after a
/// hang in the extended tests). Now a test failover and `verify --local` wait outside the owner
/// for the cycle to end, and the copy starts from it; a real failover ends the cycle at once
/// and starts from the point before it.
#[test]
fn failover_while_the_replica_receives_a_cycle() -> TestResult {
    let mut p = Pair::new(exe())?;
    p.b.set_env("VMREPLICA_LOG", "info,vmr_agent=debug");
    p.b.restart()?;
    let vm = StandIn::create(p.root.path(), &p.a, "rx1", &["disk0"], 64)?;
    vm.register(&p.a)?;
    p.enable("rx1", &["--frequency", "5s"])?;
    write_and_cut(&p, &vm, 5)?;
    const WAITS: &str = "the command waits for the cycle being received to end";

    // Test failover: waits for the cycle (the owner answers status meanwhile).
    let (k, hk) = slow_cycle_in_flight(&p, &vm, 6)?;
    assert_eq!(p.b.status("rx1")?.state, ReplicationState::Replicating);
    let mut test = p.b.spawn_cli(&["failover", "test", "rx1", "--json"])?;
    let deferred = wait_until(LONG, "the test failover deferred", || {
        Ok(p.b.log().matches(WAITS).count() == 1)
    });
    let mut check = p.b.spawn_cli(&["verify", "rx1", "--local", "--json"])?;
    let deferred = deferred.and_then(|()| {
        wait_until(LONG, "verify --local deferred", || {
            Ok(p.b.log().matches(WAITS).count() == 2)
        })
    });
    std::fs::remove_file(p.a.dir.join("test-cycle-slow-ms"))?;
    // Both end once the cycle does (the owner used to hang here for good).
    let ended = wait_until(LONG, "the test failover's and verify's end", || {
        Ok(!matches!(test.try_wait(), Ok(None)) && !matches!(check.try_wait(), Ok(None)))
    });
    if ended.is_err() {
        let _ = test.kill();
        let _ = check.kill();
    }
    let (out, checked) = (test.wait_with_output()?, check.wait_with_output()?);
    deferred?;
    ended?;
    for o in [&out, &checked] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let t: FailoverResult = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        t.point,
        Some(k),
        "the test copy starts from the cycle it waited for"
    );
    assert_eq!(started(&vm, test_nbd(&t)).hash("disk0")?, hk);
    p.b.ok(&["failover", "stop-test", "rx1"])?;

    // Real failover: ends the cycle in flight and starts from the point before it.
    let (base, hb) = {
        let l = p.b.status("rx1")?.last_cycle.expect("applied");
        (l, vm.hash("disk0")?)
    };
    let (k2, _) = slow_cycle_in_flight(&p, &vm, 7)?;
    assert_eq!(k2, base + 1);
    let live = failover(&p.b, &["start", "rx1", "--force"])?;
    assert_eq!(live.point, Some(base));
    assert_eq!(live.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(p.b.log().matches(WAITS).count(), 3);
    assert_eq!(started(&vm, live_nbd(&p.b, vm.def.uuid)).hash("disk0")?, hb);
    let ids: Vec<u64> = points(&p.b, "rx1")?.iter().map(|x| x.id).collect();
    assert!(!ids.contains(&k2), "{ids:?}");
    Ok(())
}
