//! Verification end to end (issue 17, part 5) with real agents and a qemu-storage-daemon
//! stand-in VM: `verify` after replication matches; a block of the replica's newest layer
//! corrupted behind the store's back (with `qemu-io`, the replica agent stopped) is reported
//! with its exact range, exit code 7, a Critical `verify-mismatch` event and Critical health;
//! `resume --resync` repairs it (the resync reads the replica's data, not its hash index, which
//! does not know the corruption) and `verify` matches again; `verify --local` passes on the
//! healthy replica and fails on a layer whose qcow2 header is broken.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vmr_proto::api::{Health, LocalVerifyReport, ReplicationState, VerifyReport};
use vmr_proto::event::{Event, EventKind, Severity};

const LONG: Duration = Duration::from_secs(90);
/// 64 KiB blocks of a 32 MiB disk.
const BLOCKS: u64 = 32 * 16;
/// Where the test corrupts the replica: block 16 of disk1.
const BAD_OFFSET: u64 = 16 * 65536;

/// `vmreplica --json verify ARGS...` on `agent`: its exit code and its report.
fn verify(agent: &Agent, args: &[&str]) -> TestResult<(Option<i32>, String, String)> {
    let mut a = vec!["--json", "verify"];
    a.extend_from_slice(args);
    let out = agent.cli(&a)?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn report(stdout: &str) -> VerifyReport {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not a report ({e}): {stdout}"))
}

/// The replica's point ids, ascending (its store's catalog).
fn point_ids(p: &Pair, vm: &StandIn) -> TestResult<Vec<u64>> {
    let mut ids: Vec<u64> = settled_store(&p.b, vm.def.uuid)?
        .points(vm.def.uuid)?
        .iter()
        .map(|x| x.id)
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// The layer file of `disk` of the replica's latest point (read with the agent stopped).
fn latest_layer(p: &Pair, vm: &StandIn, disk: &str) -> TestResult<std::path::PathBuf> {
    let layers = settled_store(&p.b, vm.def.uuid)?.point_layers(vm.def.uuid, None)?;
    Ok(layers
        .into_iter()
        .find(|(d, _)| d == disk)
        .map(|(_, l)| l)
        .expect("the point has the disk"))
}

#[test]
fn verify_matches_reports_a_corrupt_block_and_resync_repairs_it() -> TestResult {
    let mut p = Pair::new(exe())?;
    let disks = ["disk0", "disk1"];
    let vm = StandIn::create(p.root.path(), &p.a, "vf-vm", &disks, 32)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 120, 1)?;
    vm.write_random("disk1", 60, 2)?;
    vm.register(&p.a)?;
    // --verify-every is validated on enable.
    let bad = p.a.cli(&[
        "enable",
        &name,
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--verify-every",
        "10m",
    ])?;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--verify-every"));
    // Every point kept: `verify --local --point` checks one of several.
    p.enable(
        &name,
        &[
            "--frequency",
            "5s",
            "--verify-every",
            "7d",
            "--retain",
            "1s=1000",
        ],
    )?;
    p.wait_cycle(&name, 2, LONG)?;
    // --verify-every: the first incremental cycle after the initial copy was a verify cycle.
    wait_until(LONG, "the scheduled verification", || {
        Ok(p.a.status(&name)?.stats.last_verify_mismatched_blocks == Some(0))
    })?;
    assert!(
        p.a.log().contains("verification compared every block"),
        "{}",
        tail(&p.a.log(), 30)
    );
    // Blocks written since the last cycle: the verify cycle ships them first.
    vm.write_seq("disk0", 200, 8, 3)?;

    // 1. A healthy replica matches.
    let (code, out, err) = verify(&p.a, &[&name])?;
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", tail(&p.a.log(), 30));
    let r = report(&out);
    assert_eq!(r.disks.len(), 2);
    assert!(
        r.disks
            .iter()
            .all(|d| d.blocks == BLOCKS && d.mismatched_blocks == 0)
    );
    assert_eq!(
        p.b.status(&name)?.last_cycle,
        Some(r.point),
        "the verify cycle's point"
    );
    assert_eq!(p.state(&name)?, ReplicationState::Replicating);
    let table = p.a.ok(&["verify", &name])?;
    assert!(
        table.contains("disk1") && table.contains("DIFFER"),
        "{table}"
    );

    // `--point` naming the latest point: accepted, the verify cycle brings it to a new cut
    // and compares that (a scheduled cycle between reading the latest point and asking makes
    // it an older one: asked again then).
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let latest = p.a.status(&name)?.last_cycle.expect("a point");
        let (code, out, err) = verify(&p.a, &[&name, "--point", &latest.to_string()])?;
        if code == Some(0) {
            assert!(report(&out).point > latest, "{out}");
            break;
        }
        assert_eq!(code, Some(5), "{out}\n{err}");
        assert_ne!(p.a.status(&name)?.last_cycle, Some(latest), "{err}");
        assert!(std::time::Instant::now() < deadline, "{err}");
    }

    // Refusals: an older point, the replica without --local, --local on the primary.
    let (code, _, err) = verify(&p.a, &[&name, "--point", "1"])?;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("cannot be verified"), "{err}");
    let (code, _, err) = verify(&p.b, &[&name])?;
    assert_eq!(code, Some(5), "{err}");
    let (code, _, err) = verify(&p.a, &[&name, "--local"])?;
    assert_eq!(code, Some(5), "{err}");

    // 2. `verify --local` on the healthy replica.
    let (code, out, err) = verify(&p.b, &[&name, "--local"])?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let local: LocalVerifyReport = serde_json::from_str(&out)?;
    assert!(local.checks.iter().all(|c| c.ok), "{local:?}");
    for d in disks {
        assert!(
            local
                .checks
                .iter()
                .any(|c| c.disk == d && c.kind == "qcow2"),
            "{local:?}"
        );
    }

    // `--local --point`: that point's chain and its own index only; an unknown point exits 4.
    let ids = point_ids(&p, &vm)?;
    assert!(ids.len() >= 2, "{ids:?}");
    let one = ids[ids.len() - 2];
    let (code, out, err) = verify(&p.b, &[&name, "--local", "--point", &one.to_string()])?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let just: LocalVerifyReport = serde_json::from_str(&out)?;
    let count =
        |r: &LocalVerifyReport, kind: &str| r.checks.iter().filter(|c| c.kind == kind).count();
    assert!(
        count(&just, "qcow2") < count(&local, "qcow2"),
        "{just:?}\n{local:?}"
    );
    assert!(count(&just, "hash-index") <= disks.len(), "{just:?}");
    let (code, _, err) = verify(&p.b, &[&name, "--local", "--point", "999999"])?;
    assert_eq!(code, Some(4), "{err}");

    // 3. Corrupt one block of disk1 in the replica's newest layer, behind the store's back.
    p.a.ok(&["pause", &name])?;
    let corrupted_point = p.b.status(&name)?.last_cycle;
    p.b.stop()?;
    let layer = latest_layer(&p, &vm, "disk1")?;
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0x5a {BAD_OFFSET} 65536"))
        .arg(&layer)
        .output()?;
    assert!(io.status.success(), "qemu-io: {io:?}");
    p.b.restart()?;
    assert_eq!(p.b.status(&name)?.last_cycle, corrupted_point);
    p.a.ok(&["resume", &name])?;

    let (code, out, err) = verify(&p.a, &[&name])?;
    assert_eq!(code, Some(7), "{out}\n{err}\n{}", tail(&p.a.log(), 30));
    let r = report(&out);
    let d1 = r.disks.iter().find(|d| d.disk == "disk1").expect("disk1");
    assert_eq!(d1.mismatched, vec![(BAD_OFFSET, 65536)], "{r:?}");
    assert_eq!(d1.mismatched_blocks, 1);
    let d0 = r.disks.iter().find(|d| d.disk == "disk0").expect("disk0");
    assert_eq!(d0.mismatched_blocks, 0, "{r:?}");
    assert!(err.contains("resume --resync"), "{err}");
    // Critical until repaired; no cycles meanwhile.
    let s = p.a.status(&name)?;
    assert_eq!(s.state, ReplicationState::WaitingForStartResynchronize);
    assert_eq!(s.health, Health::Critical);
    assert!(s.health_reason.contains("differ"), "{}", s.health_reason);
    assert_eq!(
        s.stats.last_verify_mismatched_blocks,
        Some(1),
        "status --json shows it"
    );
    assert!(s.stats.last_verify_ms.is_some());
    // The event, with the range in its body.
    let events: Vec<Event> =
        p.a.json(&["events", &name])?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
    let e = events
        .iter()
        .find(|e| e.kind == EventKind::VerifyMismatch)
        .unwrap_or_else(|| panic!("no verify-mismatch event: {events:?}"));
    assert_eq!(e.severity, Severity::Critical);
    assert_eq!(e.fields["point"], serde_json::json!(r.point));
    assert_eq!(e.fields["mismatched_blocks"], serde_json::json!(1));
    assert_eq!(
        e.fields["ranges"]["disk1"],
        serde_json::json!([[BAD_OFFSET, 65536]]),
        "{e:?}"
    );
    assert!(events.iter().any(|e| e.kind == EventKind::ResyncRequired));

    // 4. `resume --resync` repairs it; verify matches again.
    p.a.ok(&["resume", &name, "--resync"])?;
    wait_until(LONG, "the repairing resync to finish", || {
        Ok(p.state(&name)? == ReplicationState::Replicating)
    })?;
    assert!(
        p.a.log().contains("resynchronization done"),
        "{}",
        tail(&p.a.log(), 30)
    );
    let (code, out, err) = verify(&p.a, &[&name])?;
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", tail(&p.a.log(), 30));
    assert_eq!(report(&out).mismatched_blocks(), 0);
    let s = p.a.status(&name)?;
    assert_eq!(s.health, Health::Normal);
    assert_eq!(s.stats.last_verify_mismatched_blocks, Some(0));
    assert_equal_at_cut(&p, &vm)?;

    // 5. A layer whose qcow2 header is broken fails `verify --local` (exit code 7).
    let layer = latest_layer(&p, &vm, "disk0")?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&layer)?;
        f.write_all_at(b"XXXX", 0)?;
        f.sync_all()?;
    }
    let (code, out, err) = verify(&p.b, &[&name, "--local"])?;
    assert_eq!(code, Some(7), "{out}\n{err}");
    let local: LocalVerifyReport = serde_json::from_str(&out)?;
    let broken = layer
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let failed: Vec<_> = local.checks.iter().filter(|c| !c.ok).collect();
    assert_eq!(failed.len(), 1, "{local:?}");
    assert!(
        failed[0].file.ends_with(&broken) && failed[0].kind == "qcow2",
        "{local:?}"
    );
    assert!(err.contains(&broken), "{err}");
    // A point below the broken layer does not read through it: its check passes.
    let ids = point_ids(&p, &vm)?;
    let below = ids[ids.len() - 2];
    let (code, out, err) = verify(&p.b, &[&name, "--local", "--point", &below.to_string()])?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    p.stop()?;
    Ok(())
}

/// `set --verify-every` at run time: a VM enabled without it verifies at its next cycle once
/// it is set; the one rule (at least an hour) holds; `never` stops it; a replica refuses it.
#[test]
fn set_verify_every_schedules_verification_at_run_time() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "vf-set", &["disk0"], 16)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 40, 3)?;
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s"])?;
    p.wait_cycle(&name, 2, LONG)?;
    assert_eq!(p.a.status(&name)?.stats.last_verify_ms, None);
    let short = p.a.cli(&["set", &name, "--verify-every", "30m"])?;
    assert_eq!(short.status.code(), Some(2), "{short:?}");
    assert!(String::from_utf8_lossy(&short.stderr).contains("--verify-every"));
    let on_replica = p.b.cli(&["set", &name, "--verify-every", "1h"])?;
    assert_eq!(on_replica.status.code(), Some(5), "{on_replica:?}");
    let out = p.a.ok(&["set", &name, "--verify-every", "1h"])?;
    assert!(out.contains("verified every 3600 s"), "{out}");
    wait_until(LONG, "the verification set at run time", || {
        Ok(p.a.status(&name)?.stats.last_verify_mismatched_blocks == Some(0))
    })?;
    let out = p.a.ok(&["set", &name, "--verify-every", "never"])?;
    assert!(out.contains("only on `vmreplica verify`"), "{out}");
    Ok(())
}
