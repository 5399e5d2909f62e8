//! End-to-end initial replication without a full copy over the network, with real agents and a
//! qemu-storage-daemon stand-in VM: from an existing copy on the replica (disk images an admin
//! copied there and imported, and the copy a replica kept after `disable`), and by external
//! media (`--initial export:DIR` on the primary, `vmreplica import` on the replica). Each ends
//! with the replica's latest point equal to the primary's disks, and counts the bytes sent.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use vmr_proto::api::ReplicationState;

const LONG: Duration = Duration::from_secs(90);
const BLOCK: u64 = 64 * 1024;

fn copy_images(vm: &StandIn, to: &Path) -> TestResult {
    std::fs::create_dir_all(to).expect("backup dir");
    for d in &vm.def.disks {
        std::fs::copy(&d.path, to.join(format!("{}.qcow2", d.node))).expect("copy image");
    }
    Ok(())
}

#[test]
fn initial_replication_from_an_existing_copy_sends_only_differences() -> TestResult {
    let p = Pair::new(exe())?;
    let disks = ["disk0", "disk1"];
    let mut vm = StandIn::create(p.root.path(), &p.a, "ex-vm", &disks, 64)?;
    let name = vm.def.name.clone();
    for (i, d) in disks.iter().enumerate() {
        vm.write_random(d, 300, 40 + i as u64)?;
    }
    // The admin's earlier copy (VM shut down), carried to the replica host.
    vm.stop()?;
    let backup = p.root.path().join("backup");
    copy_images(&vm, &backup)?;
    vm.start()?;
    // The VM went on writing since: 2 × 24 blocks differ from the copy.
    vm.write_seq("disk0", 10, 24, 41)?;
    vm.write_seq("disk1", 900, 24, 42)?;
    let differing = 2 * 24 * BLOCK;
    vm.register(&p.a)?;

    // Importing before replication is enabled: the replica does not know the VM yet.
    let early = p.b.cli(&["import", &name, &backup.display().to_string()])?;
    assert_eq!(early.status.code(), Some(4), "{early:?}");

    // Enabled with --initial existing before the copy is loaded: a clear error, no full copy.
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "the missing copy to be reported", || {
        Ok(p.state(&name)? == ReplicationState::Error)
    })?;
    let s = p.a.status(&name)?;
    assert!(
        s.health_reason.contains("vmreplica import"),
        "{}",
        s.health_reason
    );
    assert_eq!(s.stats.total_bytes, 0);
    // Import on the primary is refused: it is not the replica.
    let wrong = p.a.cli(&["import", &name, &backup.display().to_string()])?;
    assert_eq!(wrong.status.code(), Some(5), "{wrong:?}");
    // A directory without the images says what it expected.
    let empty = p.root.path().join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let none = p.b.cli(&["import", &name, &empty.display().to_string()])?;
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("disk0.qcow2"));

    let out = p.b.ok(&["import", &name, &backup.display().to_string()])?;
    assert!(out.contains("recovery point 1"), "{out}");
    p.a.ok(&["resume", &name])?;
    wait_until(LONG, "initial replication from the existing copy", || {
        Ok(p.state(&name)? == ReplicationState::Replicating)
    })?;
    let sent = p.a.status(&name)?.stats.total_bytes;
    eprintln!("existing copy: {sent} data bytes sent; {differing} bytes differed");
    assert!(
        (differing..2 * differing).contains(&sent),
        "sent {sent} bytes for {differing} differing"
    );
    assert_eq!(p.b.status(&name)?.state, ReplicationState::Replicating);
    assert_equal_at_cut(&p, &vm)?;

    // Disabled and enabled again later: the copy the replica kept is the existing copy.
    p.a.ok(&["disable", &name])?;
    vm.write_seq("disk1", 100, 8, 43)?;
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "re-enabled replication from the kept copy", || {
        Ok({
            let s = p.a.status(&name)?;
            s.state == ReplicationState::Replicating && s.last_cycle.is_some()
        })
    })?;
    // (enable starts a new statistics window)
    let sent = p.a.status(&name)?.stats.total_bytes;
    assert!(
        sent < 2 * 8 * BLOCK,
        "re-enable sent {sent} bytes for 8 changed blocks"
    );
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}

#[test]
fn exported_initial_copy_is_imported_and_the_changes_follow() -> TestResult {
    let p = Pair::new(exe())?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "media-vm", &["disk0"], 64)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 400, 50)?;
    vm.register(&p.a)?;
    let media = p.root.path().join("media");
    let media_arg = format!("export:{}", media.display());
    let bad = p.a.cli(&[
        "enable",
        &name,
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
        "--initial",
        "export",
    ])?;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    p.enable(&name, &["--frequency", "5s", "--initial", &media_arg])?;
    let manifest = media.join("vmreplica-export.json");
    wait_until(LONG, "the export", || Ok(manifest.exists()))?;
    wait_until(LONG, "the primary to wait for the import", || {
        Ok({
            let s = p.a.status(&name)?;
            s.last_cycle == Some(1) && s.health_reason.contains("vmreplica import")
        })
    })?;
    let s = p.a.status(&name)?;
    assert_eq!(s.state, ReplicationState::InitialReplicationInProgress);
    // Nothing went over the network, and nothing goes while the copy travels.
    let on_replica = p.b.status(&name)?;
    assert_eq!(
        on_replica.state,
        ReplicationState::WaitingForInitialReplication
    );
    assert_eq!(on_replica.last_cycle, None);
    // The guest writes on meanwhile.
    vm.write_seq("disk0", 600, 20, 51)?;
    // Until the import, the machine only asks the replica (vmr-core's
    // `exported_initial_copy_waits_for_the_import`); no sleep needed.
    assert_eq!(
        p.state(&name)?,
        ReplicationState::InitialReplicationInProgress
    );

    // A copy damaged on the way is refused and loads nothing.
    let damaged = p.root.path().join("damaged");
    std::fs::create_dir_all(&damaged).expect("dir");
    for e in std::fs::read_dir(&media).expect("media").flatten() {
        std::fs::copy(e.path(), damaged.join(e.file_name())).expect("copy");
    }
    let stage = std::fs::read_dir(&damaged)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "stage"))
        .expect("cycle file");
    let mut bytes = std::fs::read(&stage).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&stage, bytes).expect("write");
    let r =
        p.b.cli(&["import", &name, &damaged.display().to_string()])?;
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("damaged"),
        "{r:?}"
    );
    assert_eq!(p.b.status(&name)?.last_cycle, None);

    let out = p.b.ok(&["import", &name, &media.display().to_string()])?;
    assert!(out.contains("recovery point 1"), "{out}");
    let before = p.a.status(&name)?.stats.total_bytes;
    wait_until(LONG, "replication after the import", || {
        Ok({
            let s = p.a.status(&name)?;
            s.state == ReplicationState::Replicating && s.last_cycle.unwrap_or(0) >= 2
        })
    })?;
    let sent = p.a.status(&name)?.stats.total_bytes - before;
    assert!(
        (20 * BLOCK..2 * 20 * BLOCK).contains(&sent),
        "the first cycle after the import sent {sent} bytes; 20 blocks changed"
    );
    assert_equal_at_cut(&p, &vm)?;
    vm.stop()?;
    Ok(())
}

/// `vmreplica import` runs in a task of the VM's owner: `status` answers meanwhile and shows
/// the import's progress, the CLI prints progress lines (not a terminal), and what must wait
/// for the import (disable, removal, a second import) is refused with a clear reason.
#[test]
fn an_import_shows_its_progress_and_holds_off_what_must_wait() -> TestResult {
    let mut p = Pair::new(exe())?;
    // The store sleeps 120 ms after each extent it imports (test hook of the store).
    p.b.set_env("VMR_STORE_TEST_IMPORT_SLOW_MS", "120");
    p.b.restart()?;
    let mut vm = StandIn::create(p.root.path(), &p.a, "slow-import", &["disk0"], 64)?;
    let name = vm.def.name.clone();
    vm.write_random("disk0", 60, 7)?;
    vm.stop()?;
    let backup = p.root.path().join("backup");
    copy_images(&vm, &backup)?;
    vm.start()?;
    vm.register(&p.a)?;
    p.enable(&name, &["--frequency", "5s", "--initial", "existing"])?;
    wait_until(LONG, "the missing copy to be reported", || {
        Ok(p.state(&name)? == ReplicationState::Error)
    })?;

    let dir = backup.display().to_string();
    std::thread::scope(|s| -> TestResult {
        let import = s.spawn(|| p.b.cli(&["import", &name, &dir]));
        // While it runs: the status answers, with the import's progress.
        let mut seen = None;
        wait_until(LONG, "the import's progress in the status", || {
            let st = p.b.status(&name)?;
            seen = st.operation.filter(|o| {
                o.kind == vmr_proto::api::OperationKind::Import && o.done > 0 && o.done < o.total
            });
            Ok(seen.is_some())
        })?;
        let o = seen.expect("seen");
        assert_eq!(o.total, 64 << 20, "{o:?}");
        // What must wait for the import is refused, and says why.
        for args in [
            vec!["disable", name.as_str()],
            vec!["replica", "remove", name.as_str(), "--yes"],
            vec!["import", name.as_str(), dir.as_str()],
        ] {
            let out = p.b.cli(&args)?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(5), "{args:?}: {err}");
            assert!(err.contains("while an import"), "{args:?}: {err}");
        }
        let out = import.join().expect("import thread")?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("recovery point 1"), "{stdout}");
        // It ran for more than 5 s: plain progress lines on stderr.
        assert!(
            stderr.contains(&format!("{name}: import ")) && stderr.contains('%'),
            "{stderr}"
        );
        Ok(())
    })?;
    assert_eq!(p.b.status(&name)?.operation, None);
    p.a.ok(&["resume", &name])?;
    wait_until(LONG, "replication after the import", || {
        Ok(p.state(&name)? == ReplicationState::Replicating)
    })?;
    assert_equal_at_cut(&p, &vm)?;
    Ok(())
}
