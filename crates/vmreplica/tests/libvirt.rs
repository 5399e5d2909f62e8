//! A libvirt-managed VM through real agents and a real libvirt daemon (`PrivateLibvirt`: libvirtd
//! in a mount namespace running a TCG domain with two qcow2 disks): `vm add --libvirt` takes
//! the disks and definition from the domain, the record says it is libvirt-managed (`vm list`,
//! `status --json`, also after an agent restart), bad domains are refused with a clear error
//! and register nothing; `enable` replicates it with libvirt backup jobs: the replica's latest
//! point equals a model of every write (made through the domain's QEMU) at a cut after the
//! last write, also after the primary agent was SIGKILLed with a cycle's job held open; the
//! domain XML is stored with the replica's definition, and what is not built yet (`vm set
//! --qmp`, a failover of it) is refused naming the gap.
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

    // The domain XML travelled with the definition and is stored on the replica; a failover
    // of it there is refused (failover through libvirt is not built).
    let stored = vmr_store::Store::open(&p.b.storage())?.definition(uuid)?;
    let def = vmr_proto::VmDefinition::from_toml(&stored)?;
    let xml = def
        .libvirt_xml
        .ok_or("no domain XML in the replica's definition")?;
    assert!(xml.contains(&format!("<name>{DOMAIN}</name>")), "{xml}");
    let o = p.b.cli(&["failover", "test", "web1"])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("failover through libvirt is not built"),
        "{}",
        stderr(&o)
    );

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
