//! A libvirt-managed VM through real agents and a real libvirt daemon (`PrivateLibvirt`: libvirtd
//! in a mount namespace running a TCG domain with two qcow2 disks): `vm add --libvirt` takes
//! the disks and definition from the domain, the record says it is libvirt-managed (`vm list`,
//! `status --json`, also after an agent restart), bad domains are refused with a clear error
//! and register nothing; `enable` replicates it with libvirt backup jobs: the replica's latest
//! point equals a model of every write (made through the domain's QEMU) at a cut after the
//! last write, also after the primary agent was SIGKILLed with a cycle's job held open; the
//! domain XML is stored with the replica's definition, and what is not built yet (`vm set
//! --qmp`) is refused naming the gap; a failover with no libvirt reachable on the replica is
//! refused with libvirt's reason. The second test changes the domain while it replicates (its
//! description, then a third disk attached and written: the replica's definition follows, the
//! disk is replicated from the next cycle without re-enabling or a resync) and fails over
//! through a second private daemon (the replica host's libvirt): a test copy `NAME-test` running with a new UUID on the
//! replica's overlays, the guest seeing the replicated writes, stopped and undefined; the
//! split-brain guard asking libvirt whether the primary domain runs; a real failover keeping
//! the UUID, cancelled (destroyed, undefined, replication state back), completed, and reversed
//! (the old primary resynchronised from a full backup job: only differing blocks). The
//! third runs a planned failover of a reverse through libvirt, and the fourth a mixed setup: a
//! plain-QEMU stand-in primary failing over into a libvirt host (a domain generated from its
//! QEMU definition), reversed through libvirt and failed back to QEMU.
//!
//! Needs root (a mount namespace for the private daemon): skipped with a message otherwise;
//! as root, a missing libvirt installation fails the test. The held cycle needs
//! `--features vmreplica/test-hooks` (scripts/test.sh runs every test with it); without it the
//! test fails saying so.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use vmr_proto::api::{VmEntry, VmStatus};

const DOMAIN: &str = "vmr-lv-add1";
const LONG: std::time::Duration = std::time::Duration::from_secs(60);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn libvirt_vm_added_and_replicated_through_agents() -> TestResult {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED libvirt_vm_added_and_replicated_through_agents: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lva").tempdir()?;
    let lv = PrivateLibvirt::start(&tmp.path().join("lv"))?;
    let mut images: Vec<PathBuf> = Vec::new();
    for (i, size) in ["16M", "8M"].iter().enumerate() {
        let p = tmp.path().join(format!("d{i}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg(size)
            .status()?;
        assert!(st.success(), "qemu-img create");
        images.push(p);
    }
    lv.start_domain(DOMAIN, &images)?;
    // A domain that is defined but not running.
    let xml = std::fs::read_to_string(lv.dir().join(format!("{DOMAIN}.xml")))?
        .replace(DOMAIN, "vmr-lv-off");
    let off = lv.dir().join("off.xml");
    std::fs::write(&off, xml)?;
    lv.virsh(&["define", &off.to_string_lossy()])?;

    let mut p = Pair::in_dir(exe(), TestDir::temp("vmr-lva-")?)?;
    let uri = lv.uri().to_owned();

    // Bad input: a clear error, exit 2, nothing registered.
    let o =
        p.a.cli(&["vm", "add", "x1", "--libvirt", "no-such", "--connect", &uri])?;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no domain"), "{}", stderr(&o));
    let o = p.a.cli(&[
        "vm",
        "add",
        "x2",
        "--libvirt",
        "vmr-lv-off",
        "--connect",
        &uri,
    ])?;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
    let o = p.a.cli(&[
        "vm",
        "add",
        "x3",
        "--libvirt",
        DOMAIN,
        "--qmp",
        "/tmp/q.sock",
    ])?;
    assert_eq!(
        o.status.code(),
        Some(2),
        "--libvirt with --qmp: {}",
        stderr(&o)
    );
    let o = p.a.cli(&[
        "vm",
        "add",
        "x4",
        "--libvirt",
        DOMAIN,
        "--connect",
        "bogus:///x",
    ])?;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let list: Vec<VmEntry> = serde_json::from_str(&p.a.json(&["vm", "list"])?)?;
    assert!(list.is_empty(), "nothing registered: {list:?}");

    // The domain registered: disks and definition from libvirt.
    p.a.ok(&["vm", "add", "web1", "--libvirt", DOMAIN, "--connect", &uri])?;
    let check = |p: &Pair| -> TestResult {
        let list: Vec<VmEntry> = serde_json::from_str(&p.a.json(&["vm", "list"])?)?;
        assert_eq!(list.len(), 1, "{list:?}");
        let e = &list[0];
        assert_eq!(e.disks, ["vda", "vdb"]);
        assert_eq!(e.program, "libvirt");
        let lvs = e
            .libvirt
            .as_ref()
            .ok_or("vm list shows no libvirt source")?;
        assert_eq!(
            (lvs.domain.as_str(), lvs.uri.as_str()),
            (DOMAIN, uri.as_str())
        );
        assert_eq!(lvs.acked_checkpoint, None);
        let uuid = lv.virsh(&["domuuid", DOMAIN])?;
        assert_eq!(e.uuid.to_string(), uuid.trim(), "the domain's UUID");
        let table = p.a.ok(&["vm", "list"])?;
        assert!(
            table.contains(&format!("libvirt domain {DOMAIN}")),
            "{table}"
        );
        let st: Vec<VmStatus> = serde_json::from_str(&p.a.json(&["status", "web1"])?)?;
        let s = st[0]
            .libvirt
            .as_ref()
            .ok_or("status --json shows no libvirt source")?;
        assert_eq!(s.domain, DOMAIN);
        Ok(())
    };
    check(&p)?;
    // The record keeps it across a restart.
    p.a.restart()?;
    check(&p)?;

    // Not built yet: refused naming the gap, nothing changed.
    let o =
        p.a.cli(&["vm", "set", "web1", "--qmp", "/tmp/other.sock", "--yes"])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("not built yet"), "{}", stderr(&o));
    check(&p)?;

    // Replication through the agent: cycles are libvirt backup jobs; the replica's latest
    // point equals the disks (a model of every write) at a cut after the last write.
    let uuid = p.a.status("web1")?.uuid;
    let mut model: Vec<Vec<u8>> = vec![vec![0u8; 16 << 20], vec![0u8; 8 << 20]];
    let write =
        |model: &mut Vec<Vec<u8>>, disk: usize, offset: u64, len: u64, pattern: u8| -> TestResult {
            lv.write_disk(DOMAIN, disk, offset, len, pattern)?;
            model[disk][offset as usize..(offset + len) as usize].fill(pattern);
            Ok(())
        };
    write(&mut model, 0, 0, 1 << 20, 0x11)?;
    write(&mut model, 1, 4 << 20, 64 << 10, 0x22)?;
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 1, LONG)?;
    let wait_cut = |p: &Pair| -> TestResult<u64> {
        let s = p.a.status("web1")?;
        let cut = s.last_cycle.unwrap_or(0) + 1 + u64::from(s.progress.is_some());
        p.wait_cycle("web1", cut, LONG)?;
        Ok(cut)
    };
    let compare = |p: &Pair, model: &[Vec<u8>], what: &str| -> TestResult {
        p.a.ok(&["pause", "web1"])?;
        let last = p.a.status("web1")?.last_cycle.unwrap_or(0);
        p.b.wait_cycle("web1", last, LONG)?;
        let got = replica_hashes(&p.b, uuid, None)?;
        assert_eq!(got.len(), 2, "{what}: {got:?}");
        for ((disk, h), m) in got.iter().zip(model) {
            assert_eq!(
                *h,
                *blake3::hash(m).as_bytes(),
                "{what}: disk {disk} differs at the cut"
            );
        }
        p.a.ok(&["resume", "web1"])?;
        Ok(())
    };
    for round in 0..3u8 {
        write(
            &mut model,
            0,
            (u64::from(round) + 2) << 20,
            192 << 10,
            0x30 + round,
        )?;
        write(&mut model, 1, u64::from(round) << 16, 4096, 0x40 + round)?;
        wait_cut(&p)?;
    }
    compare(&p, &model, "after three rounds of writes")?;
    let st = p.a.status("web1")?;
    let acked = st.libvirt.as_ref().and_then(|l| l.acked_checkpoint.clone());
    assert!(
        acked
            .as_deref()
            .is_some_and(|c| c.starts_with("vmreplica-")),
        "the acknowledged checkpoint is recorded: {acked:?}"
    );

    // Another tool's backup job holds the domain: cycle starts meet it (counted in status),
    // and once it ends the cycles go on and lose nothing.
    lv.hold_backup(DOMAIN, &["vda"])?;
    let (st, _) = p.a.wait_status(
        "web1",
        LONG,
        std::time::Duration::from_millis(200),
        "a busy start counted",
        |s| s.libvirt_jobs.is_some_and(|j| j.busy >= 1),
    )?;
    eprintln!(
        "busy: {:?}, health reason: {:?}",
        st.libvirt_jobs, st.health_reason
    );
    let (st, _) = p.a.wait_status(
        "web1",
        LONG,
        std::time::Duration::from_millis(200),
        "the busy domain as the health reason",
        |s| s.health_reason.contains("another job holds the domain"),
    )?;
    eprintln!("health: {:?} {:?}", st.health, st.health_reason);
    write(&mut model, 1, 2 << 20, 64 << 10, 0x44)?;
    lv.abort_job(DOMAIN)?;
    wait_cut(&p)?;
    compare(&p, &model, "after another tool's job")?;

    // The primary agent SIGKILLed mid-cycle (its backup job held open): nothing is lost after
    // a restart (the job is ended, the delta comes from the recorded checkpoint).
    write(&mut model, 0, 8 << 20, 1 << 20, 0x55)?;
    let hold = p.a.dir.join("test-cycle-hold");
    std::fs::write(&hold, "")?;
    vmr_testkit::wait_for_path(&p.a.dir.join("test-cycle-held"), LONG).map_err(|e| {
        format!("no cycle held (this test needs --features vmreplica/test-hooks): {e}")
    })?;
    p.a.kill9();
    std::fs::remove_file(&hold)?;
    let _ = std::fs::remove_file(p.a.dir.join("test-cycle-held"));
    write(&mut model, 1, 6 << 20, 128 << 10, 0x66)?;
    p.a.restart()?;
    wait_cut(&p)?;
    write(&mut model, 0, 12 << 20, 64 << 10, 0x77)?;
    wait_cut(&p)?;
    compare(&p, &model, "after the SIGKILL mid-cycle and a restart")?;
    let names = lv.checkpoints(DOMAIN)?;
    assert!(
        names.len() <= 2,
        "vmreplica's checkpoints on the domain: {names:?}"
    );

    // No job on the domain within 30 s (what virsh last said when it failed to answer).
    let no_job_within_30s = |what: &str| -> TestResult {
        let mut virsh = None;
        wait_until(std::time::Duration::from_secs(30), what, || {
            let job = lv.has_job(DOMAIN);
            virsh = job.as_ref().err().map(ToString::to_string);
            Ok(matches!(job, Ok(false)))
        })
        .map_err(|e| format!("{e} (virsh: {virsh:?})"))?;
        Ok(())
    };

    // Paused mid-cycle (its backup job held open): the job ends at once, not at the next
    // cycle (its scratch files would take the guest's writes for as long as the pause lasts);
    // after resume nothing is lost.
    write(&mut model, 0, 14 << 20, 256 << 10, 0x88)?;
    std::fs::write(&hold, "")?;
    vmr_testkit::wait_for_path(&p.a.dir.join("test-cycle-held"), LONG)?;
    assert!(lv.has_job(DOMAIN)?, "the held cycle's backup job runs");
    p.a.ok(&["pause", "web1"])?;
    no_job_within_30s("the cancelled cycle's backup job ended while paused")?;
    std::fs::remove_file(&hold)?;
    let _ = std::fs::remove_file(p.a.dir.join("test-cycle-held"));
    write(&mut model, 1, 7 << 20, 64 << 10, 0x99)?;
    p.a.ok(&["resume", "web1"])?;
    wait_cut(&p)?;
    compare(&p, &model, "after a pause mid-cycle and a resume")?;

    // Paused while libvirt is still inside the cycle's `backupBegin` (a slow libvirtd; the
    // hook `vmr_capture::libvirt::BEGIN_SLOW_HOOK`): the cancelled call goes on in its thread
    // and begins a job after the cancel. That job is ended too, not left running while paused.
    let work = vmr_agent::launch::work_dir(&p.a.dir, uuid).join("libvirt");
    let (slow, waiting, begun) = (
        work.join("test-backup-begin-slow-ms"),
        work.join("test-backup-begin-waiting"),
        work.join("test-backup-begun"),
    );
    write(&mut model, 0, 10 << 20, 128 << 10, 0xaa)?;
    // in place at once: a cycle beginning meanwhile reads all of it or nothing
    std::fs::write(work.join("slow.tmp"), "3000")?;
    std::fs::rename(work.join("slow.tmp"), &slow)?;
    vmr_testkit::wait_for_path(&waiting, LONG)
        .map_err(|e| format!("no backupBegin slowed (needs the test-hooks feature): {e}"))?;
    p.a.ok(&["pause", "web1"])?;
    vmr_testkit::wait_for_path(&begun, LONG)?;
    let late = std::fs::read_to_string(&begun)?;
    assert_eq!(late, "begun", "the cancelled cycle's late backupBegin");
    for f in [&slow, &waiting, &begun] {
        std::fs::remove_file(f)?;
    }
    no_job_within_30s(
        "the job begun by the cancelled cycle's late backupBegin ended while paused",
    )?;
    write(&mut model, 1, 5 << 20, 64 << 10, 0xbb)?;
    p.a.ok(&["resume", "web1"])?;
    wait_cut(&p)?;
    compare(&p, &model, "after a pause inside backupBegin and a resume")?;

    // The domain XML travelled with the definition and is stored on the replica. A failover
    // there needs the replica host's libvirt (`libvirt-connect`): one that cannot be reached
    // is refused with libvirt's reason, and nothing changes.
    let stored = vmr_store::Store::open(&p.b.storage())?.definition(uuid)?;
    let def = vmr_proto::VmDefinition::from_toml(&stored)?;
    let xml = def
        .libvirt_xml
        .ok_or("no domain XML in the replica's definition")?;
    assert!(xml.contains(&format!("<name>{DOMAIN}</name>")), "{xml}");
    let nowhere = tmp.path().join("no-daemon.sock");
    p.b.add_config(&format!(
        "libvirt-connect = \"qemu+unix:///system?socket={}\"",
        nowhere.display()
    ))?;
    p.b.restart()?;
    let o = p.b.cli(&["failover", "test", "web1"])?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("failover through libvirt at qemu+unix"),
        "{}",
        stderr(&o)
    );
    let st = p.b.status("web1")?;
    assert!(st.failover_domains.is_empty(), "{st:?}");
    assert_eq!(st.state, vmr_proto::api::ReplicationState::Replicating);

    // A disk removed from the domain's definition: the next cycle refuses, naming it, and the
    // VM stops replicating until the admin registers the domain again; the replica keeps its
    // latest point.
    let before = p.b.status("web1")?.last_cycle;
    lv.virsh(&["detach-disk", DOMAIN, "vdb", "--config"])?;
    let (st, _) = p.a.wait_status(
        "web1",
        LONG,
        std::time::Duration::from_millis(200),
        "the removed disk refused",
        |s| s.state == vmr_proto::api::ReplicationState::Error,
    )?;
    assert!(
        st.health_reason.contains("removed: [vdb]")
            && st.health_reason.contains("register the domain again"),
        "{}",
        st.health_reason
    );
    assert_eq!(p.b.status("web1")?.last_cycle, before);

    p.a.ok(&["disable", "web1"])?;
    p.a.ok(&["vm", "remove", "web1", "--yes"])?;
    p.stop()?;
    let ns = lv.mount_namespaces();
    drop(lv);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!("vm add --libvirt test: {} ms", t0.elapsed().as_millis());
    Ok(())
}

const FO_DOMAIN: &str = "vmr-lv-fo1";

/// The failed-over domain names on `lv` (all of them with `all`, running ones otherwise).
fn domains(lv: &PrivateLibvirt, all: bool) -> TestResult<Vec<String>> {
    let mut args = vec!["list", "--name"];
    if all {
        args.push("--all");
    }
    Ok(lv
        .virsh(&args)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn failover(agent: &Agent, args: &[&str]) -> TestResult<vmr_proto::api::FailoverResult> {
    let mut a = vec!["failover"];
    a.extend_from_slice(args);
    a.push("--json");
    Ok(serde_json::from_str(&agent.ok(&a)?)?)
}

#[test]
fn libvirt_failover_through_the_replica_hosts_libvirt() -> TestResult {
    use vmr_proto::api::ReplicationState;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED libvirt_failover_through_the_replica_hosts_libvirt: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lvf").tempdir()?;
    // the primary host's libvirt and the replica host's
    let lv = PrivateLibvirt::start(&tmp.path().join("la"))?;
    let lvb = PrivateLibvirt::start(&tmp.path().join("lb"))?;
    let mut images: Vec<PathBuf> = Vec::new();
    for (i, size) in ["16M", "8M"].iter().enumerate() {
        let p = tmp.path().join(format!("d{i}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg(size)
            .status()?;
        assert!(st.success(), "qemu-img create");
        images.push(p);
    }
    lv.start_domain_with_nic(FO_DOMAIN, &images)?;
    assert!(lv.virsh(&["domiflist", FO_DOMAIN])?.contains("user"));
    let primary_uuid = lv.virsh(&["domuuid", FO_DOMAIN])?.trim().to_owned();

    let mut p = Pair::in_dir(exe(), TestDir::temp("vmr-lvf-")?)?;
    p.b.add_config(&format!("libvirt-connect = \"{}\"", lvb.uri()))?;
    p.b.restart()?;
    p.a.allow(&p.b)?; // lets the replica probe the primary (split-brain guard)
    p.a.ok(&[
        "vm",
        "add",
        "web1",
        "--libvirt",
        FO_DOMAIN,
        "--connect",
        lv.uri(),
    ])?;
    // (disk, offset, len, pattern): every write, checked in the failed-over guests
    let mut writes: Vec<(usize, u64, u64, u8)> = Vec::new();
    let write = |writes: &mut Vec<(usize, u64, u64, u8)>,
                 disk: usize,
                 offset: u64,
                 len: u64,
                 pattern: u8|
     -> TestResult {
        lv.write_disk(FO_DOMAIN, disk, offset, len, pattern)?;
        writes.push((disk, offset, len, pattern));
        Ok(())
    };
    write(&mut writes, 0, 0, 1 << 20, 0x11)?;
    write(&mut writes, 1, 4 << 20, 64 << 10, 0x22)?;
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 1, LONG)?;
    let wait_cut = |p: &Pair| -> TestResult<u64> {
        let s = p.a.status("web1")?;
        let cut = s.last_cycle.unwrap_or(0) + 1 + u64::from(s.progress.is_some());
        p.wait_cycle("web1", cut, LONG)?;
        p.b.wait_cycle("web1", cut, LONG)?;
        Ok(cut)
    };
    write(&mut writes, 0, 2 << 20, 192 << 10, 0x33)?;
    write(&mut writes, 1, 0, 4096, 0x44)?;
    // The domain's persistent definition changes (its description): the next cycle sends
    // the new XML to the replica, and a failover defines the domain as it is now.
    const DESC: &str = "refreshed-definition-mark";
    lv.virsh(&["desc", FO_DOMAIN, "--config", "--new-desc", DESC])?;
    wait_cut(&p)?;
    // A disk attached to the running domain (qcow2, persistent) is replicated from the next
    // cycle without re-enabling: the replica's next point has it, written data included.
    let added = tmp.path().join("d2.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&added)
        .arg("4M")
        .status()?;
    assert!(st.success(), "qemu-img create");
    lv.virsh(&[
        "attach-disk",
        FO_DOMAIN,
        &added.to_string_lossy(),
        "vdc",
        "--persistent",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
    ])?;
    write(&mut writes, 2, 1 << 20, 128 << 10, 0x55)?;
    write(&mut writes, 0, 3 << 20, 64 << 10, 0x56)?;
    wait_cut(&p)?;
    let sa = p.a.status("web1")?;
    assert_eq!(
        sa.state,
        ReplicationState::Replicating,
        "{}",
        sa.health_reason
    );
    // the chain goes on with deltas that include the new disk
    write(&mut writes, 2, 2 << 20, 64 << 10, 0x57)?;
    wait_cut(&p)?;
    let sa = p.a.status("web1")?;
    assert!(
        sa.libvirt_jobs.is_some_and(|j| j.resyncs == 0),
        "the disk was added without a resync: {:?}",
        sa.libvirt_jobs
    );
    let st = p.b.status("web1")?;
    let prog = st.failover_program.clone().ok_or("no failover program")?;
    assert!(
        prog.program.starts_with("libvirt at qemu+unix") && prog.refused.is_none(),
        "{prog:?}"
    );

    // A test failover: NAME-test, defined and started on the replica host's libvirt with a
    // new UUID, on the replica's overlays; the guest sees every replicated write.
    let r = failover(&p.b, &["test", "web1"])?;
    let test_name = format!("{FO_DOMAIN}-test");
    assert_eq!(r.name, test_name);
    assert!(domains(&lvb, false)?.contains(&test_name), "virsh list");
    assert_eq!(lvb.virsh(&["domstate", &test_name])?.trim(), "running");
    let test_uuid = lvb.virsh(&["domuuid", &test_name])?.trim().to_owned();
    assert!(
        lvb.virsh(&["dumpxml", "--inactive", &test_name])?
            .contains(DESC),
        "the test copy is defined from the refreshed domain XML"
    );
    assert_ne!(test_uuid, primary_uuid, "a test copy has a new UUID");
    let blk = lvb.virsh(&["domblklist", &test_name])?;
    for (_, overlay) in &r.disks {
        assert!(blk.contains(overlay.as_str()), "{blk}");
    }
    for img in &images {
        assert!(
            !blk.contains(&*img.to_string_lossy()),
            "the primary's image: {blk}"
        );
    }
    let nics = lvb.virsh(&["domiflist", &test_name])?;
    assert!(
        !nics.contains("user"),
        "a test copy has no interface: {nics}"
    );
    // what the domain's disks hold (its overlays, read beside the running guest)
    let check = |lvb: &PrivateLibvirt, dom: &str, writes: &[(usize, u64, u64, u8)]| -> TestResult {
        let blk = lvb.virsh(&["domblklist", dom])?;
        let paths: Vec<PathBuf> = blk
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let t = f.next()?;
                t.starts_with("vd").then(|| f.next().map(PathBuf::from))?
            })
            .collect();
        assert_eq!(
            paths.len(),
            3,
            "the domain's disks with the one added: {blk}"
        );
        for &(disk, off, len, pat) in writes {
            assert!(
                vmr_testkit::img::qemu_io_holds_pattern(&paths[disk], pat, off, len)?,
                "{dom}: disk {disk} at {off} does not hold {pat:#x}"
            );
        }
        Ok(())
    };
    check(&lvb, &test_name, &writes)?;
    // (the check can fail: a pattern that was never written is seen as such)
    assert!(!vmr_testkit::img::qemu_io_holds_pattern(
        std::path::Path::new(&r.disks[0].1),
        0x99,
        2 << 20,
        4096
    )?);
    let st = p.b.status("web1")?;
    assert!(
        st.failover_domains
            .iter()
            .any(|d| d.domain == test_name && d.uuid == test_uuid),
        "status --json: {:?}",
        st.failover_domains
    );
    assert_eq!(
        st.state,
        ReplicationState::Replicating,
        "a test changes nothing"
    );
    // A second test copy would have the same name: refused, nothing of it left.
    let uuid = st.uuid;
    let views = vmr_store::Store::open(&p.b.storage())?.views(uuid)?.len();
    let o = p.b.cli(&["failover", "test", "web1"])?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("already defined"), "{}", stderr(&o));
    assert_eq!(p.b.status("web1")?.failover_domains.len(), 1);
    assert_eq!(
        vmr_store::Store::open(&p.b.storage())?.views(uuid)?.len(),
        views
    );
    p.b.ok(&["failover", "stop-test", "web1"])?;
    assert!(
        !domains(&lvb, true)?.contains(&test_name),
        "the test copy is undefined"
    );
    assert!(p.b.status("web1")?.failover_domains.is_empty());

    // The split-brain guard asks the primary's agent, which asks libvirt: the domain runs.
    let o = p.b.cli(&["failover", "start", "web1"])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("still answers and its VM \"web1\" runs"),
        "{}",
        stderr(&o)
    );
    assert!(domains(&lvb, true)?.is_empty());

    // The primary domain dies after a last cycle (its agent still answers): libvirt says it
    // does not run, so the guard lets a real failover through; it keeps name and UUID.
    write(&mut writes, 0, 6 << 20, 64 << 10, 0x55)?;
    wait_cut(&p)?;
    // ... and a write on the old primary that never leaves it (replication paused): the
    // reverse's resync overwrites it with the new primary's content
    p.a.ok(&["pause", "web1"])?;
    lv.write_disk(FO_DOMAIN, 0, 0, 64 << 10, 0x56)?;
    lv.virsh(&["destroy", FO_DOMAIN])?;
    let r = failover(&p.b, &["start", "web1"])?;
    assert_eq!(r.name, FO_DOMAIN);
    assert!(domains(&lvb, false)?.contains(&FO_DOMAIN.to_owned()));
    assert_eq!(
        lvb.virsh(&["domuuid", FO_DOMAIN])?.trim(),
        primary_uuid,
        "a failover keeps the UUID"
    );
    check(&lvb, FO_DOMAIN, &writes)?;
    let nics = lvb.virsh(&["domiflist", FO_DOMAIN])?;
    assert!(
        nics.contains("user"),
        "a failover keeps the interfaces: {nics}"
    );
    let st = p.b.status("web1")?;
    assert_eq!(st.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(st.failover_domains.len(), 1, "{:?}", st.failover_domains);

    // The replica agent restarted: the failover record keeps the domain.
    p.b.restart()?;
    let st = p.b.status("web1")?;
    assert_eq!(st.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(st.failover_domains.len(), 1, "{:?}", st.failover_domains);
    assert_eq!(lvb.virsh(&["domstate", FO_DOMAIN])?.trim(), "running");

    // Cancel: destroyed and undefined, replication state back.
    p.b.ok(&["failover", "cancel", "web1"])?;
    assert!(domains(&lvb, true)?.is_empty(), "the domain is undefined");
    let st = p.b.status("web1")?;
    assert_eq!(st.state, ReplicationState::Replicating);
    assert!(st.failover_domains.is_empty());

    // Again, then complete: the domain goes on running.
    failover(&p.b, &["start", "web1"])?;
    p.b.ok(&["failover", "complete", "web1"])?;
    assert_eq!(p.b.status("web1")?.state, ReplicationState::FailedOver);
    assert!(domains(&lvb, false)?.contains(&FO_DOMAIN.to_owned()));
    check(&lvb, FO_DOMAIN, &writes)?;
    // Reverse after this unplanned failover: the old primary imports its own images (with the
    // write that never left), and the new primary resynchronises them from a full backup job
    // of its domain, shipping only the blocks that differ.
    let lvw = |writes: &mut Vec<(usize, u64, u64, u8)>,
               disk: usize,
               offset: u64,
               len: u64,
               pattern: u8|
     -> TestResult {
        lvb.write_disk(FO_DOMAIN, disk, offset, len, pattern)?;
        writes.push((disk, offset, len, pattern));
        Ok(())
    };
    lvw(&mut writes, 0, 10 << 20, 128 << 10, 0x61)?;
    lvw(&mut writes, 1, 5 << 20, 4096, 0x62)?;
    let t_rev = std::time::Instant::now();
    let r: vmr_proto::api::FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "web1", "--frequency", "5s", "--json"])?)?;
    assert!(r.message.contains("resynchronised"), "{}", r.message);
    // the old primary's unshipped block is the new primary's again (the first write, 0x11)
    let mut expect = writes.clone();
    expect.push((0, 0, 64 << 10, 0x11));
    let holds = |expect: &[(usize, u64, u64, u8)]| -> TestResult<bool> {
        let st = p.a.status("web1")?;
        if st.mode != vmr_proto::api::ReplicationMode::Replica || st.last_cycle.is_none() {
            return Ok(false);
        }
        let layers = settled_store(&p.a, uuid)?.point_layers(uuid, None)?;
        for &(disk, off, len, pat) in expect {
            if !vmr_testkit::img::qemu_io_holds_pattern(&layers[disk].1, pat, off, len)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    wait_until(
        LONG,
        "the old primary's store holds the new primary's disks",
        || {
            // (a store being merged meanwhile is read again at the next poll)
            Ok(holds(&expect).unwrap_or(false))
        },
    )
    .map_err(|e| format!("{e}\n--- B ---\n{}", tail(&p.b.log(), 30)))?;
    let st = p.b.status("web1")?;
    assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Primary);
    let shipped = st.stats.total_bytes;
    let disk_bytes = (16u64 + 8) << 20;
    eprintln!(
        "reverse after an unplanned libvirt failover: resynchronised in {:?}, {shipped} bytes \
         shipped ({:.2} % of the disks)",
        t_rev.elapsed(),
        shipped as f64 * 100.0 / disk_bytes as f64
    );
    // the differing blocks: 64 KiB reverted, 128 KiB and one 64 KiB block written on B (the
    // disks hold ~1.3 MiB of data, a full copy would ship it all)
    assert!(
        (192 << 10..=512 << 10).contains(&shipped),
        "the resync shipped {shipped} bytes: not only the differences?"
    );
    let cps = lvb.checkpoints(FO_DOMAIN)?;
    assert!(
        cps.iter().any(|c| c.starts_with("vmreplica-")),
        "the resync started a checkpoint chain on the domain: {cps:?}"
    );
    // then deltas from that chain
    lvw(&mut writes, 1, 6 << 20, 64 << 10, 0x71)?;
    let s = p.b.status("web1")?;
    let cut = s.last_cycle.unwrap_or(0) + 1 + u64::from(s.progress.is_some());
    p.b.wait_cycle("web1", cut, LONG)?;
    p.a.wait_cycle("web1", cut, LONG)?;
    let mut expect = writes.clone();
    expect.push((0, 0, 64 << 10, 0x11));
    assert!(holds(&expect)?, "a delta after the resync is missing");
    assert!(
        p.b.status("web1")?.stats.total_bytes - shipped < 256 << 10,
        "the cycle after the resync is a delta"
    );

    p.stop()?;
    let mut ns = lv.mount_namespaces();
    ns.extend(lvb.mount_namespaces());
    drop(lv);
    drop(lvb);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!(
        "failover through libvirt test: {} ms",
        t0.elapsed().as_millis()
    );
    Ok(())
}

const PF_DOMAIN: &str = "vmr-lv-pf1";

/// A planned failover of a libvirt primary: `failover prepare --shutdown` shuts the domain
/// down through libvirt (the stand-in has no guest OS, so it ignores ACPI: destroyed at the
/// timeout), ships the final cycle from the shut-off domain's disks (started paused for the
/// backup job), and the replica's failed-over domain holds every write, also those made after
/// the last scheduled cycle.
#[test]
fn libvirt_planned_failover_with_shutdown_loses_nothing() -> TestResult {
    use vmr_proto::api::{PointInfo, ReplicationState};
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED libvirt_planned_failover_with_shutdown_loses_nothing: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lvp").tempdir()?;
    let lv = PrivateLibvirt::start(&tmp.path().join("la"))?;
    let lvb = PrivateLibvirt::start(&tmp.path().join("lb"))?;
    let mut images: Vec<PathBuf> = Vec::new();
    for (i, size) in ["16M", "8M"].iter().enumerate() {
        let p = tmp.path().join(format!("d{i}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg(size)
            .status()?;
        assert!(st.success(), "qemu-img create");
        images.push(p);
    }
    lv.start_domain(PF_DOMAIN, &images)?;
    let primary_uuid = lv.virsh(&["domuuid", PF_DOMAIN])?.trim().to_owned();
    let mut p = Pair::in_dir(exe(), TestDir::temp("vmr-lvp-")?)?;
    p.b.add_config(&format!("libvirt-connect = \"{}\"", lvb.uri()))?;
    p.b.restart()?;
    // A's own libvirt is where it fails back to, at the end
    p.a.add_config(&format!("libvirt-connect = \"{}\"", lv.uri()))?;
    p.a.restart()?;
    p.a.allow(&p.b)?; // lets the replica probe the primary (split-brain guard)
    p.a.ok(&[
        "vm",
        "add",
        "web1",
        "--libvirt",
        PF_DOMAIN,
        "--connect",
        lv.uri(),
    ])?;
    let mut writes: Vec<(usize, u64, u64, u8)> = Vec::new();
    let write = |writes: &mut Vec<(usize, u64, u64, u8)>,
                 disk: usize,
                 offset: u64,
                 len: u64,
                 pattern: u8|
     -> TestResult {
        lv.write_disk(PF_DOMAIN, disk, offset, len, pattern)?;
        writes.push((disk, offset, len, pattern));
        Ok(())
    };
    write(&mut writes, 0, 0, 1 << 20, 0x11)?;
    // a long interval: only the initial copy is scheduled before the prepare
    p.enable("web1", &["--frequency", "1h"])?;
    p.wait_cycle("web1", 1, LONG)?;
    p.b.wait_cycle("web1", 1, LONG)?;
    // written after the last cycle: only the final cycle carries them
    write(&mut writes, 0, 3 << 20, 256 << 10, 0x21)?;
    write(&mut writes, 1, 1 << 20, 64 << 10, 0x31)?;

    // Without --shutdown a running domain is refused, and replication goes on.
    let o = p.a.cli(&["failover", "prepare", "web1"])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("is running"), "{}", stderr(&o));
    assert_eq!(p.a.status("web1")?.state, ReplicationState::Replicating);
    assert_eq!(lv.virsh(&["domstate", PF_DOMAIN])?.trim(), "running");

    let prep = failover(&p.a, &["prepare", "web1", "--shutdown", "--timeout", "3s"])?;
    eprintln!("prepare: {}", prep.message);
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    assert!(prep.message.contains("destroyed"), "{}", prep.message);
    let k = prep.point.ok_or("no final cycle")?;
    assert_eq!(lv.virsh(&["domstate", PF_DOMAIN])?.trim(), "shut off");
    assert_eq!(
        p.a.status("web1")?.state,
        ReplicationState::PreparedForFailover
    );

    // The replica: the final point is planned; the failover needs no --force (the primary
    // is prepared) and its domain holds every write.
    let pts: Vec<PointInfo> = serde_json::from_str(&p.b.ok(&["points", "web1", "--json"])?)?;
    assert_eq!(
        pts.last().map(|x| (x.id, x.kind.as_str())),
        Some((k, "planned")),
        "{pts:?}"
    );
    let live = failover(&p.b, &["start", "web1"])?;
    assert_eq!(live.point, Some(k));
    assert!(live.message.contains("(planned)"), "{}", live.message);
    assert_eq!(lvb.virsh(&["domstate", PF_DOMAIN])?.trim(), "running");
    assert_eq!(lvb.virsh(&["domuuid", PF_DOMAIN])?.trim(), primary_uuid);
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(
                std::path::Path::new(&live.disks[disk].1),
                pat,
                off,
                len
            )?,
            "disk {disk} at {off} does not hold {pat:#x} after the planned failover"
        );
    }

    // Reverse: the failed-over domain is captured through the replica host's libvirt, and
    // the old primary's store follows its writes.
    let uuid = p.a.status("web1")?.uuid;
    let r: vmr_proto::api::FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "web1", "--frequency", "5s", "--json"])?)?;
    // the failed-over domain has no checkpoint: its first cycle is a resync (a full backup
    // job compared with the old primary's point, only differing blocks shipped)
    assert_eq!(
        r.state,
        ReplicationState::WaitingForStartResynchronize,
        "{}",
        r.message
    );
    assert!(r.message.contains("resynchronised"), "{}", r.message);
    let st = p.b.status("web1")?;
    let src = st
        .libvirt
        .clone()
        .ok_or("the new primary has no libvirt source")?;
    assert_eq!(
        (src.domain.as_str(), src.uri.as_str()),
        (PF_DOMAIN, lvb.uri())
    );
    lvb.write_disk(PF_DOMAIN, 0, 9 << 20, 64 << 10, 0x61)?;
    lvb.write_disk(PF_DOMAIN, 1, 2 << 20, 4096, 0x62)?;
    writes.push((0, 9 << 20, 64 << 10, 0x61));
    writes.push((1, 2 << 20, 4096, 0x62));
    let s = p.b.status("web1")?;
    let cut = s.last_cycle.unwrap_or(k) + 1 + u64::from(s.progress.is_some());
    p.b.wait_cycle("web1", cut, LONG)?;
    p.a.wait_cycle("web1", cut, LONG)?;
    let layers = settled_store(&p.a, uuid)?.point_layers(uuid, None)?;
    assert_eq!(layers.len(), 2, "{layers:?}");
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(&layers[disk].1, pat, off, len)?,
            "the old primary's store: disk {disk} at {off} does not hold {pat:#x} after reverse"
        );
    }
    let cps = lvb.checkpoints(PF_DOMAIN)?;
    assert!(
        cps.iter().any(|c| c.starts_with("vmreplica-")),
        "the reverse cycles are backup jobs of the failed-over domain: {cps:?}"
    );

    // Failing back: a planned failover B -> A. A's libvirt still has the VM's own domain,
    // shut off, on its old images: the failover replaces that definition with one on A's
    // overlays (cancel restores it), vmreplica's stale checkpoints of it are forgotten.
    p.b.allow(&p.a)?; // lets A probe B
    lvb.write_disk(PF_DOMAIN, 1, 5 << 20, 64 << 10, 0x71)?;
    writes.push((1, 5 << 20, 64 << 10, 0x71));
    let prep = failover(&p.b, &["prepare", "web1", "--shutdown", "--timeout", "3s"])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let k2 = prep.point.ok_or("no final cycle on B")?;
    let domblk =
        |lv: &PrivateLibvirt| -> TestResult<String> { Ok(lv.virsh(&["domblklist", PF_DOMAIN])?) };
    assert!(domblk(&lv)?.contains(&*images[0].to_string_lossy()));
    let back = failover(&p.a, &["start", "web1"])?;
    assert_eq!(back.point, Some(k2));
    assert_eq!(lv.virsh(&["domstate", PF_DOMAIN])?.trim(), "running");
    assert_eq!(lv.virsh(&["domuuid", PF_DOMAIN])?.trim(), primary_uuid);
    let blk = domblk(&lv)?;
    assert!(blk.contains(&back.disks[0].1), "{blk}");
    assert!(!blk.contains(&*images[0].to_string_lossy()), "{blk}");
    assert!(
        !lv.checkpoints(PF_DOMAIN)?
            .iter()
            .any(|c| c.starts_with("vmreplica-")),
        "the old images' checkpoints are forgotten"
    );
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(
                std::path::Path::new(&back.disks[disk].1),
                pat,
                off,
                len
            )?,
            "disk {disk} at {off} does not hold {pat:#x} after failing back"
        );
    }
    // cancel: the old definition (on the old images) is back, shut off
    failover(&p.a, &["cancel", "web1"])?;
    assert_eq!(lv.virsh(&["domstate", PF_DOMAIN])?.trim(), "shut off");
    assert_eq!(lv.virsh(&["domuuid", PF_DOMAIN])?.trim(), primary_uuid);
    assert!(domblk(&lv)?.contains(&*images[0].to_string_lossy()));
    // again, and complete: the VM runs on A, from its overlays
    let back = failover(&p.a, &["start", "web1"])?;
    assert_eq!(back.point, Some(k2));
    p.a.ok(&["failover", "complete", "web1"])?;
    assert_eq!(p.a.status("web1")?.state, ReplicationState::FailedOver);
    assert_eq!(lv.virsh(&["domstate", PF_DOMAIN])?.trim(), "running");
    assert!(domblk(&lv)?.contains(&back.disks[0].1));

    p.stop()?;
    let mut ns = lv.mount_namespaces();
    ns.extend(lvb.mount_namespaces());
    drop(lv);
    drop(lvb);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!(
        "planned failover through libvirt test: {} ms",
        t0.elapsed().as_millis()
    );
    Ok(())
}

const MX_VM: &str = "vmr-mx1";

/// Write `len` bytes of `pattern` at `offset` of a stand-in's disk `disk` through its live NBD
/// export (as its guest would).
fn standin_write(
    sock: &std::path::Path,
    disk: &str,
    offset: u64,
    len: u64,
    pattern: u8,
) -> TestResult {
    let url = format!("nbd+unix:///{disk}?socket={}", sock.display());
    vmr_testkit::img::qemu_io_write_pattern(
        std::path::Path::new(&url),
        "raw",
        pattern,
        offset,
        len,
    )?;
    Ok(())
}

/// Mixed setups (issue 16 part 4): a plain-QEMU primary (a qemu-storage-daemon stand-in on
/// host A, no libvirt there) fails over (planned) into host B, whose agent manages VMs through
/// libvirt (`libvirt-connect`): B defines a domain generated from the replicated QEMU
/// definition on its overlays and starts it (`virsh list`), with every write; `reverse` on B
/// captures that domain through libvirt back to A (writes made in the domain reach A's
/// store); failing back (a planned failover on B: the domain shut down through libvirt, the
/// final cycle from it; `failover start` on A) starts the stand-in with QEMU on A, holding
/// every write.
#[test]
fn plain_qemu_primary_fails_over_into_libvirt_and_back() -> TestResult {
    use vmr_proto::api::{PointInfo, ReplicationState};
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED plain_qemu_primary_fails_over_into_libvirt_and_back: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lvm").tempdir()?;
    // only the replica host B has libvirt
    let lvb = PrivateLibvirt::start(&tmp.path().join("lb"))?;
    let mut p = Pair::in_dir(exe(), TestDir::temp("vmr-lvm-")?)?;
    p.b.add_config(&format!("libvirt-connect = \"{}\"", lvb.uri()))?;
    p.b.restart()?;
    p.a.allow(&p.b)?;
    let vm = StandIn::create(p.root.path(), &p.a, MX_VM, &["disk0", "disk1"], 16)?;
    vm.register(&p.a)?;
    let uuid = vm.def.uuid;
    let sock_a = nbd_socket(&p.a.dir, uuid);
    // (disk index, offset, len, pattern): every write, checked after each step
    let mut writes: Vec<(usize, u64, u64, u8)> = Vec::new();
    let disk_names = ["disk0", "disk1"];
    for &(d, off, len, pat) in &[
        (0usize, 0u64, 1u64 << 20, 0x11u8),
        (1, 4 << 20, 64 << 10, 0x12),
    ] {
        standin_write(&sock_a, disk_names[d], off, len, pat)?;
        writes.push((d, off, len, pat));
    }
    p.enable(MX_VM, &["--frequency", "1h"])?;
    p.wait_cycle(MX_VM, 1, LONG)?;
    p.b.wait_cycle(MX_VM, 1, LONG)?;
    let st = p.b.status(MX_VM)?;
    let prog = st.failover_program.clone().ok_or("no failover program")?;
    assert!(
        prog.program.contains("generated from the QEMU definition") && prog.refused.is_none(),
        "{prog:?}"
    );
    // A test failover: the generated domain as NAME-test with a new UUID, stopped again.
    let t = failover(&p.b, &["test", MX_VM])?;
    let test_name = format!("{MX_VM}-test");
    assert_eq!(t.name, test_name);
    assert_eq!(lvb.virsh(&["domstate", &test_name])?.trim(), "running");
    assert_ne!(
        lvb.virsh(&["domuuid", &test_name])?.trim(),
        uuid.to_string(),
        "a test copy has a new UUID"
    );
    p.b.ok(&["failover", "stop-test", MX_VM])?;
    assert!(
        domains(&lvb, true)?.is_empty(),
        "the test copy is undefined"
    );
    assert_eq!(p.b.status(MX_VM)?.state, ReplicationState::Replicating);
    // written after the initial copy: only the planned failover's final cycle carries them
    for &(d, off, len, pat) in &[
        (0usize, 3u64 << 20, 256u64 << 10, 0x21u8),
        (1, 1 << 20, 4096, 0x22),
    ] {
        standin_write(&sock_a, disk_names[d], off, len, pat)?;
        writes.push((d, off, len, pat));
    }

    // 1. Planned failover A → B: the domain is generated, defined and started by B's libvirt.
    let prep = failover(&p.a, &["prepare", MX_VM])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let k = prep.point.ok_or("no final cycle")?;
    let t_fo = std::time::Instant::now();
    let live = failover(&p.b, &["start", MX_VM])?;
    let fo_ms = t_fo.elapsed().as_millis();
    assert_eq!(live.point, Some(k));
    assert!(live.message.contains("libvirt domain"), "{}", live.message);
    assert!(
        domains(&lvb, false)?.contains(&MX_VM.to_owned()),
        "virsh list"
    );
    assert_eq!(lvb.virsh(&["domstate", MX_VM])?.trim(), "running");
    assert_eq!(lvb.virsh(&["domuuid", MX_VM])?.trim(), uuid.to_string());
    let blk = lvb.virsh(&["domblklist", MX_VM])?;
    for (i, (_, overlay)) in live.disks.iter().enumerate() {
        let target = ["vda", "vdb"][i];
        assert!(
            blk.lines()
                .any(|l| l.contains(target) && l.contains(overlay.as_str())),
            "{target} on {overlay}: {blk}"
        );
    }
    let dumped = lvb.virsh(&["dumpxml", MX_VM])?;
    assert!(dumped.contains("generated by vmreplica"), "{dumped}");
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(
                std::path::Path::new(&live.disks[disk].1),
                pat,
                off,
                len
            )?,
            "disk {disk} at {off} does not hold {pat:#x} in the failed-over domain"
        );
    }
    // negative check: a pattern never written is not there
    assert!(!vmr_testkit::img::qemu_io_holds_pattern(
        std::path::Path::new(&live.disks[0].1),
        0x21,
        0,
        4096
    )?);

    // 2. Reverse on B: the generated domain is captured through B's libvirt to A.
    let r: vmr_proto::api::FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", MX_VM, "--frequency", "5s", "--json"])?)?;
    // the failed-over domain has no checkpoint: its first cycle is a resync (a full backup
    // job compared with the old primary's point, only differing blocks shipped)
    assert_eq!(
        r.state,
        ReplicationState::WaitingForStartResynchronize,
        "{}",
        r.message
    );
    assert!(r.message.contains("resynchronised"), "{}", r.message);
    let src =
        p.b.status(MX_VM)?
            .libvirt
            .ok_or("the new primary has no libvirt source")?;
    assert_eq!((src.domain.as_str(), src.uri.as_str()), (MX_VM, lvb.uri()));
    for &(d, off, len, pat) in &[
        (0usize, 9u64 << 20, 64u64 << 10, 0x31u8),
        (1, 2 << 20, 4096, 0x32),
    ] {
        lvb.write_disk(MX_VM, d, off, len, pat)?;
        writes.push((d, off, len, pat));
    }
    let s = p.b.status(MX_VM)?;
    let cut = s.last_cycle.unwrap_or(k) + 1 + u64::from(s.progress.is_some());
    p.b.wait_cycle(MX_VM, cut, LONG)?;
    p.a.wait_cycle(MX_VM, cut, LONG)?;
    let layers = settled_store(&p.a, uuid)?.point_layers(uuid, None)?;
    assert_eq!(layers.len(), 2, "{layers:?}");
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(&layers[disk].1, pat, off, len)?,
            "A's store: disk {disk} at {off} does not hold {pat:#x} after reverse"
        );
    }
    let cps = lvb.checkpoints(MX_VM)?;
    assert!(
        cps.iter().any(|c| c.starts_with("vmreplica-")),
        "the reverse cycles are backup jobs of the generated domain: {cps:?}"
    );

    // 3. Fail back: a planned failover on B (through libvirt), started with QEMU on A.
    lvb.write_disk(MX_VM, 0, 12 << 20, 64 << 10, 0x41)?;
    writes.push((0, 12 << 20, 64 << 10, 0x41));
    let prep = failover(&p.b, &["prepare", MX_VM, "--shutdown", "--timeout", "3s"])?;
    assert_eq!(
        prep.state,
        ReplicationState::PreparedForFailover,
        "{}",
        prep.message
    );
    let k2 = prep.point.ok_or("no final cycle")?;
    assert_eq!(lvb.virsh(&["domstate", MX_VM])?.trim(), "shut off");
    let pts: Vec<PointInfo> = serde_json::from_str(&p.a.ok(&["points", MX_VM, "--json"])?)?;
    assert_eq!(
        pts.last().map(|x| (x.id, x.kind.as_str())),
        Some((k2, "planned")),
        "{pts:?}"
    );
    let back = failover(&p.a, &["start", MX_VM])?;
    assert_eq!(back.point, Some(k2));
    assert!(!back.message.contains("libvirt"), "{}", back.message);
    let a_status = p.a.status(MX_VM)?;
    assert_eq!(
        a_status.state,
        ReplicationState::FailedOverWaitingCompletion
    );
    for &(disk, off, len, pat) in &writes {
        assert!(
            vmr_testkit::img::qemu_io_holds_pattern(
                std::path::Path::new(&back.disks[disk].1),
                pat,
                off,
                len
            )?,
            "disk {disk} at {off} does not hold {pat:#x} after failing back to QEMU on A"
        );
    }
    // the VM runs on A with QEMU and its guest sees exactly what the domain on B had when it
    // was shut down (B's overlays, the domain shut off)
    for (i, d) in disk_names.iter().enumerate() {
        assert_eq!(
            hash_export(&nbd_socket(&p.a.dir, uuid), d)?,
            hash_image(std::path::Path::new(&live.disks[i].1))?,
            "{d} on A differs from the domain's disk on B"
        );
    }

    p.stop()?;
    let ns = lvb.mount_namespaces();
    drop(lvb);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!(
        "mixed plain-QEMU/libvirt test: {} ms (failover start into libvirt {fo_ms} ms)",
        t0.elapsed().as_millis()
    );
    Ok(())
}

const LQ_DOMAIN: &str = "vmr-lv-lq1";

/// Command lines (NUL-separated arguments joined with spaces) of the running processes whose
/// command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            out.push(line);
        }
    }
    out
}

/// The other direction of a mixed setup: a VM replicated from a libvirt domain fails over on a
/// host without libvirt (no `libvirt-connect`, `qemu:///system` not answering): QEMU is
/// started from a command line made from the domain XML (its virtio disks on the overlays
/// with the block nodes named by target, its user-mode NIC; none for a test copy), holding
/// every replicated write; `stop-test` and `cancel` end it.
#[test]
fn libvirt_domain_fails_over_with_plain_qemu_on_a_host_without_libvirt() -> TestResult {
    use vmr_proto::api::ReplicationState;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED libvirt_domain_fails_over_with_plain_qemu_on_a_host_without_libvirt: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let system = Command::new("virsh")
        .args(["-c", "qemu:///system", "-q", "uri"])
        .output()?;
    if system.status.success() {
        eprintln!(
            "SKIPPED libvirt_domain_fails_over_with_plain_qemu_on_a_host_without_libvirt: this \
             host's qemu:///system answers, so a failover here goes through it"
        );
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lvq").tempdir()?;
    let lv = PrivateLibvirt::start(&tmp.path().join("la"))?;
    let mut images: Vec<PathBuf> = Vec::new();
    for (i, size) in ["16M", "8M"].iter().enumerate() {
        let p = tmp.path().join(format!("d{i}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg(size)
            .status()?;
        assert!(st.success(), "qemu-img create");
        images.push(p);
    }
    lv.start_domain_with_nic(LQ_DOMAIN, &images)?;
    let mut p = Pair::in_dir(exe(), TestDir::temp("vmr-lvq-")?)?;
    p.a.allow(&p.b)?;
    p.a.ok(&[
        "vm",
        "add",
        "web1",
        "--libvirt",
        LQ_DOMAIN,
        "--connect",
        lv.uri(),
    ])?;
    let mut writes: Vec<(usize, u64, u64, u8)> = Vec::new();
    for &(d, off, len, pat) in &[
        (0usize, 0u64, 1u64 << 20, 0x11u8),
        (1, 4 << 20, 64 << 10, 0x12),
    ] {
        lv.write_disk(LQ_DOMAIN, d, off, len, pat)?;
        writes.push((d, off, len, pat));
    }
    p.enable("web1", &["--frequency", "5s"])?;
    p.wait_cycle("web1", 1, LONG)?;
    p.b.wait_cycle("web1", 1, LONG)?;
    lv.write_disk(LQ_DOMAIN, 0, 3 << 20, 128 << 10, 0x21)?;
    writes.push((0, 3 << 20, 128 << 10, 0x21));
    let s = p.a.status("web1")?;
    let cut = s.last_cycle.unwrap_or(0) + 1 + u64::from(s.progress.is_some());
    p.wait_cycle("web1", cut, LONG)?;
    p.b.wait_cycle("web1", cut, LONG)?;
    let holds = |disks: &[(String, String)]| -> TestResult {
        for &(disk, off, len, pat) in &writes {
            assert!(
                vmr_testkit::img::qemu_io_holds_pattern(
                    std::path::Path::new(&disks[disk].1),
                    pat,
                    off,
                    len
                )?,
                "disk {disk} at {off} does not hold {pat:#x}"
            );
        }
        Ok(())
    };

    // A test copy: QEMU from the domain XML, no NIC.
    let t = failover(&p.b, &["test", "web1"])?;
    assert!(!t.message.contains("libvirt domain"), "{}", t.message);
    let procs = processes_with(&t.disks[0].1);
    assert_eq!(procs.len(), 1, "{procs:?}");
    let cmd = &procs[0];
    assert!(
        cmd.contains("qemu-system-x86_64") && cmd.contains("virtio-blk-pci,drive=vda"),
        "{cmd}"
    );
    assert!(
        cmd.contains("-nic none") && !cmd.contains("-nic user"),
        "{cmd}"
    );
    holds(&t.disks)?;
    p.b.ok(&["failover", "stop-test", "web1"])?;
    assert!(
        processes_with(&t.disks[0].1).is_empty(),
        "the test copy ended"
    );

    // A real failover (the primary domain gone, after a write that never left it): its NIC
    // kept, then cancelled.
    p.a.ok(&["pause", "web1"])?;
    lv.write_disk(LQ_DOMAIN, 0, 0, 64 << 10, 0x56)?;
    lv.virsh(&["destroy", LQ_DOMAIN])?;
    let r = failover(&p.b, &["start", "web1"])?;
    assert_eq!(
        p.b.status("web1")?.state,
        ReplicationState::FailedOverWaitingCompletion
    );
    let procs = processes_with(&r.disks[1].1);
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert!(
        procs[0].contains("-nic user,model=virtio-net-pci"),
        "{}",
        procs[0]
    );
    holds(&r.disks)?;
    p.b.ok(&["failover", "cancel", "web1"])?;
    assert!(processes_with(&r.disks[1].1).is_empty(), "cancel ended it");
    assert_eq!(p.b.status("web1")?.state, ReplicationState::Replicating);

    // Again, then reverse: the QEMU VM is captured through its QMP monitor (block nodes named
    // by target) and the old libvirt primary's images are resynchronised: its unshipped
    // block goes back to the new primary's content, and little travels.
    let r = failover(&p.b, &["start", "web1"])?;
    holds(&r.disks)?;
    let rev: vmr_proto::api::FailoverResult =
        serde_json::from_str(&p.b.ok(&["reverse", "web1", "--frequency", "5s", "--json"])?)?;
    assert!(rev.message.contains("resynchronised"), "{}", rev.message);
    let uuid = p.b.status("web1")?.uuid;
    let mut expect = writes.clone();
    expect.push((0, 0, 64 << 10, 0x11));
    wait_until(
        LONG,
        "the old libvirt primary's store holds the QEMU VM's disks",
        || {
            let st = p.a.status("web1")?;
            if st.mode != vmr_proto::api::ReplicationMode::Replica || st.last_cycle.is_none() {
                return Ok(false);
            }
            let Ok(layers) =
                settled_store(&p.a, uuid).and_then(|s| Ok(s.point_layers(uuid, None)?))
            else {
                return Ok(false);
            };
            for &(disk, off, len, pat) in &expect {
                if !vmr_testkit::img::qemu_io_holds_pattern(&layers[disk].1, pat, off, len)
                    .unwrap_or(false)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .map_err(|e| format!("{e}\n--- B ---\n{}", tail(&p.b.log(), 30)))?;
    let shipped = p.b.status("web1")?.stats.total_bytes;
    eprintln!("reverse from the QEMU VM to the libvirt host: {shipped} bytes shipped");
    assert!(
        shipped <= 256 << 10,
        "the resync shipped {shipped} bytes: not only the differences?"
    );

    p.stop()?;
    let ns = lv.mount_namespaces();
    drop(lv);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!(
        "libvirt domain to plain QEMU test: {} ms",
        t0.elapsed().as_millis()
    );
    Ok(())
}
