//! `vm add --libvirt` with real agents and a real libvirt daemon (`PrivateLibvirt`: libvirtd
//! in a mount namespace running a TCG domain with two qcow2 disks): the VM's disks and
//! definition come from the domain, the record says it is libvirt-managed (`vm list`,
//! `status --json`, also after an agent restart), bad domains are refused with a clear error
//! and register nothing, and what is not built yet for such a VM (replication through the
//! agent, changing its QMP socket or definition) is refused naming the gap.
//!
//! Needs root (a mount namespace for the private daemon): skipped with a message otherwise;
//! as root, a missing libvirt installation fails the test.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use vmr_proto::api::{VmEntry, VmStatus};

const DOMAIN: &str = "vmr-lv-add1";

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn vm_add_libvirt_registers_the_domain() -> TestResult {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!("SKIPPED vm_add_libvirt_registers_the_domain: a private libvirtd needs root");
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
    let o = p.a.cli(&[
        "enable",
        "web1",
        "--replica",
        &p.b.addr,
        "--replica-fingerprint",
        &p.b.fingerprint,
    ])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("libvirt-managed") && stderr(&o).contains("not built yet"),
        "{}",
        stderr(&o)
    );
    let o =
        p.a.cli(&["vm", "set", "web1", "--qmp", "/tmp/other.sock", "--yes"])?;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("not built yet"), "{}", stderr(&o));
    check(&p)?;
    assert!(p.b.statuses(None)?.is_empty(), "the replica holds nothing");

    p.a.ok(&["vm", "remove", "web1", "--yes"])?;
    p.stop()?;
    let ns = lv.mount_namespaces();
    drop(lv);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    eprintln!("vm add --libvirt test: {} ms", t0.elapsed().as_millis());
    Ok(())
}
