//! Capture through libvirt's incremental-backup API against a real, private libvirt daemon
//! (`vmr_testkit::harness::PrivateLibvirt`) running a TCG domain with two qcow2 disks. Writes
//! reach the disks through the domain's own QEMU (`qemu-io` on the virtio devices), and the
//! test keeps a model of every disk: after each cycle the replica (extents applied to plain
//! files) must equal the model at the cut, including writes made while a cycle was read
//! (they belong to the next one). Covers the full first cycle, deltas, an aborted cycle, a
//! cycle whose capture was dropped mid-read (the job left running) and a process SIGKILLed
//! mid-cycle (this test re-run as a child), another tool's backup job holding the domain (counted, retried), a vanished
//! checkpoint with its bitmaps (its recorded description cannot be redefined: a resync), lost
//! checkpoint metadata whose bitmap stays in the images with a stale record (a resync, then a
//! new name) and with the record's description (redefined: the cycle stays a delta), libvirtd
//! restarted mid-cycle, and a non-qcow2 disk (a clear error).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use vmr_capture::CaptureError;
use vmr_capture::libvirt::{LibvirtCapture, LibvirtConfig};
use vmr_libvirt::LibvirtError;
use vmr_proto::ExtentData;
use vmr_testkit::harness::{PrivateLibvirt, libvirt_unavailable, processes_in_namespaces};

const DOMAIN: &str = "vmr-lv-web1";
const SIZES: [u64; 2] = [16 << 20, 8 << 20];

struct Disks {
    model: Vec<Vec<u8>>,
    replica: Vec<PathBuf>,
}

impl Disks {
    fn write(
        &mut self,
        lv: &PrivateLibvirt,
        disk: usize,
        off: u64,
        len: u64,
        p: u8,
    ) -> anyhow::Result<()> {
        lv.write_disk(DOMAIN, disk, off, len, p)?;
        self.model[disk][off as usize..(off + len) as usize].fill(p);
        Ok(())
    }

    fn assert_replica_equals(&self, model: &[Vec<u8>], what: &str) -> anyhow::Result<()> {
        for (i, p) in self.replica.iter().enumerate() {
            let got = std::fs::read(p)?;
            if got.len() != model[i].len() || got != model[i] {
                let first = got.iter().zip(&model[i]).position(|(a, b)| a != b);
                bail!(
                    "{what}: replica disk {i} differs from the source at the cut (first at {first:?})"
                );
            }
        }
        Ok(())
    }
}

fn config(work: &Path, uri: &str) -> LibvirtConfig {
    LibvirtConfig {
        uri: uri.to_string(),
        domain: DOMAIN.to_string(),
        work_dir: work.to_path_buf(),
        max_in_flight: 4,
        timeout: Duration::from_secs(30),
    }
}

/// Read a cycle whole into the replica files; `during` runs after the cut, before reading.
/// Returns (full, bytes read).
async fn run_cycle(
    cap: &mut LibvirtCapture,
    disks: &mut Disks,
    lv: &PrivateLibvirt,
    during: &[(usize, u64, u64, u8)],
) -> anyhow::Result<(bool, u64)> {
    let t0 = std::time::Instant::now();
    let mut cyc = cap.begin_cycle().await?;
    let view = t0.elapsed();
    let cut = disks.model.clone();
    for &(d, off, len, p) in during {
        disks.write(lv, d, off, len, p)?;
    }
    assert_eq!(
        cyc.sizes(),
        disks
            .model
            .iter()
            .map(|m| m.len() as u64)
            .collect::<Vec<_>>()
    );
    let files: Vec<std::fs::File> = disks
        .replica
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .collect::<Result<_, _>>()?;
    while let Some(e) = cyc.next_extent().await? {
        let f = &files[e.disk as usize];
        match &e.data {
            ExtentData::Data(b) => f.write_all_at(b, e.offset)?,
            ExtentData::Zero(n) => f.write_all_at(&vec![0u8; *n as usize], e.offset)?,
        }
    }
    let full = cyc.is_full();
    let read = cyc.bytes_read();
    disks.assert_replica_equals(&cut, "cycle")?;
    cyc.commit().await?;
    // The acknowledged cycle's job has ended when commit returns: the next cycle can begin at
    // once (libvirt ends a backup job after QEMU reports its block jobs cancelled).
    assert!(!lv.has_job(DOMAIN)?, "a job is left after commit");
    // figures for the report: the backup job's start (view ready) and the whole cycle
    eprintln!(
        "cycle full={full} bytes={read} view_ms={} total_ms={}",
        view.as_millis(),
        t0.elapsed().as_millis()
    );
    Ok((full, read))
}

/// Set in the environment of this test binary re-run as the process the test SIGKILLs
/// mid-cycle: `URI|WORK|ACKED`.
const CHILD_ENV: &str = "VMR_LIBVIRT_TEST_CHILD";

/// The killed process (this test, re-run with [`CHILD_ENV`]): begins a cycle from `ACKED`,
/// reads one extent, says `HELD` and waits to be killed.
async fn killed_child(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.splitn(3, '|');
    let (Some(uri), Some(work), Some(acked)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("bad {CHILD_ENV}: {spec}");
    };
    let mut cap = LibvirtCapture::open(config(Path::new(work), uri), Some(acked.into())).await?;
    let mut cyc = cap.begin_cycle().await?;
    let _ = cyc.next_extent().await?;
    println!("HELD");
    use std::io::Write;
    std::io::stdout().flush()?;
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// Run this test binary as [`killed_child`] and SIGKILL it once its cycle is held.
fn kill_mid_cycle(uri: &str, work: &Path, acked: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "libvirt_backup_cycles",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, format!("{uri}|{}|{acked}", work.display()))
    .stdout(std::process::Stdio::piped());
    let mut child = vmr_testkit::ChildGuard::spawn(cmd, "capture child")?;
    let out = child.take_stdout().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // libtest's "test NAME ... " precedes it on the line
            if line.trim_end().ends_with("HELD") {
                let _ = tx.send(());
                break;
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let err = std::fs::read_to_string(work.join("child.err")).unwrap_or_default();
        bail!("the child did not hold a cycle within 60 s: {err}");
    }
    child.kill9();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_backup_cycles() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return killed_child(&spec).await;
    }
    if let Some(why) = libvirt_unavailable() {
        bail!("this test needs a private libvirt daemon: {why}");
    }
    let t0 = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("vmr-lv").tempdir()?;
    let mut lv = PrivateLibvirt::start(&tmp.path().join("lv"))?;
    let mut images = Vec::new();
    let mut replica = Vec::new();
    for (i, size) in SIZES.iter().enumerate() {
        let img = tmp.path().join(format!("disk{i}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg(size.to_string())
            .status()?;
        assert!(st.success(), "qemu-img create");
        images.push(img);
        let r = tmp.path().join(format!("replica{i}.raw"));
        std::fs::File::create(&r)?.set_len(*size)?;
        replica.push(r);
    }
    lv.start_domain(DOMAIN, &images)
        .context("start the domain")?;
    let mut disks = Disks {
        model: SIZES.iter().map(|s| vec![0u8; *s as usize]).collect(),
        replica,
    };
    disks.write(&lv, 0, 0, 64 << 10, 0x41)?;
    disks.write(&lv, 1, 1 << 20, 128 << 10, 0x42)?;

    let work = tmp.path().join("work");
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), None).await?;
    assert_eq!(
        cap.disks()
            .iter()
            .map(|d| d.target.as_str())
            .collect::<Vec<_>>(),
        ["vda", "vdb"]
    );
    assert!(cap.domain_xml().await?.contains(DOMAIN));

    // 1: the full first cycle, with a write after the cut
    let (full, _) = run_cycle(&mut cap, &mut disks, &lv, &[(0, 4 << 20, 64 << 10, 0x43)]).await?;
    assert!(full, "the first cycle is full");
    assert_eq!(cap.acked(), Some("vmreplica-1"));
    assert_eq!(lv.checkpoints(DOMAIN)?, ["vmreplica-1"]);

    // 2: a delta carries the write made during cycle 1 and new ones, and nothing else
    disks.write(&lv, 1, 0, 64 << 10, 0x44)?;
    let (full, read) =
        run_cycle(&mut cap, &mut disks, &lv, &[(1, 6 << 20, 64 << 10, 0x45)]).await?;
    assert!(!full);
    assert_eq!(read, 2 * (64 << 10), "only the changed clusters are read");
    assert_eq!(cap.acked(), Some("vmreplica-2"));
    assert_eq!(
        lv.checkpoints(DOMAIN)?,
        ["vmreplica-2"],
        "the older checkpoint is deleted"
    );

    // 3: an aborted cycle loses nothing: the next delta is from the older checkpoint
    disks.write(&lv, 0, 8 << 20, 64 << 10, 0x46)?;
    let cyc = cap.begin_cycle().await?;
    cyc.abort().await?;
    assert!(!lv.has_job(DOMAIN)?, "a job is left after abort");
    assert_eq!(cap.acked(), Some("vmreplica-2"));
    assert_eq!(lv.checkpoints(DOMAIN)?, ["vmreplica-2"]);
    let (full, _) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full);

    // 4: the capture dropped mid-cycle (the agent killed): its job stays on the domain; a new
    // capture from the recorded checkpoint ends it and loses nothing
    let acked = cap.acked().map(String::from);
    disks.write(&lv, 1, 2 << 20, 192 << 10, 0x47)?;
    {
        let mut cyc = cap.begin_cycle().await?;
        let _ = cyc.next_extent().await?;
        drop(cyc);
    }
    drop(cap);
    assert!(lv.virsh(&["domjobinfo", DOMAIN])?.contains("Backup"));
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), acked).await?;
    disks.write(&lv, 0, 12 << 20, 64 << 10, 0x48)?;
    let (full, _) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full);
    assert_eq!(lv.checkpoints(DOMAIN)?.len(), 1);

    // 4b: the same with a process SIGKILLed mid-cycle (its libvirt and NBD connections cut)
    let acked = cap.acked().map(String::from).context("acked")?;
    disks.write(&lv, 1, 4 << 20, 64 << 10, 0x50)?;
    kill_mid_cycle(lv.uri(), &work, &acked)?;
    assert!(lv.virsh(&["domjobinfo", DOMAIN])?.contains("Backup"));
    assert_eq!(
        lv.checkpoints(DOMAIN)?.len(),
        2,
        "the killed cycle's checkpoint"
    );
    let (full, read) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full);
    assert_eq!(read, 64 << 10);
    assert_eq!(lv.checkpoints(DOMAIN)?.len(), 1);

    // 5: another tool's backup job holds the domain: the cycle waits (counted), then runs
    lv.hold_backup(DOMAIN, &["vda"])?;
    disks.write(&lv, 0, 14 << 20, 64 << 10, 0x49)?;
    match cap.begin_cycle().await {
        Err(CaptureError::BackupBusy { retry_after_ms, .. }) => assert!(retry_after_ms > 0),
        other => bail!("expected BackupBusy, got {other:?}"),
    }
    match cap.begin_cycle().await {
        Err(CaptureError::BackupBusy { .. }) => {}
        other => bail!("expected BackupBusy, got {other:?}"),
    }
    assert_eq!(cap.stats().busy, 2);
    assert_eq!(cap.stats().busy_streak, 2);
    lv.abort_job(DOMAIN)?;
    run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert_eq!(cap.stats().busy_streak, 0);

    // 6: the acknowledged checkpoint vanished with its bitmaps (deleted by someone): its
    // recorded description cannot be redefined (libvirt finds no bitmap): a full resync,
    // never a delta from the wrong place
    let acked = cap.acked().map(String::from).context("acked")?;
    assert!(
        cap.acked_xml()
            .is_some_and(|x| x.contains(&format!("<name>{acked}</name>"))),
        "the acked checkpoint's description is kept"
    );
    lv.virsh(&["checkpoint-delete", DOMAIN, &acked])?;
    disks.write(&lv, 1, 7 << 20, 64 << 10, 0x4a)?;
    {
        let cyc = cap.begin_cycle().await?;
        assert!(cyc.is_full());
        assert!(
            cyc.resync()
                .is_some_and(|r| r.contains(&acked) && r.contains("RedefineRefused")),
            "{:?}",
            cyc.resync()
        );
        cyc.abort().await?;
    }
    assert_eq!(cap.acked(), None);
    for r in &disks.replica {
        // a resync rewrites everything: start the replica over to prove it
        std::fs::File::create(r)?.set_len(std::fs::metadata(r)?.len())?;
    }
    let (full, _) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(full);
    assert_eq!(cap.stats().resyncs, 1);
    assert_eq!(cap.stats().redefines, 1);

    // 6b: libvirt's metadata of the acked checkpoint lost while its bitmap stays in the
    // images, and a record one checkpoint behind: the name the chain picks is the orphan
    // bitmap's ("Bitmap already exists"): a resync, then a new name, never a delta
    let acked = cap.acked().map(String::from).context("acked")?;
    lv.virsh(&["checkpoint-delete", "--metadata", DOMAIN, &acked])?;
    let k: u64 = acked.trim_start_matches("vmreplica-").parse()?;
    drop(cap);
    let stale = Some(format!("vmreplica-{}", k - 1));
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), stale).await?;
    disks.write(&lv, 0, 9 << 20, 64 << 10, 0x4e)?;
    match cap.begin_cycle().await {
        Err(CaptureError::ResyncRequired { reason }) => eprintln!("orphan bitmap: {reason}"),
        Ok(c) => {
            let full = c.is_full();
            c.abort().await?;
            bail!("a job began on an orphan bitmap's name (full: {full})");
        }
        Err(e) => bail!("expected ResyncRequired, got {e:?}"),
    }
    let (full, _) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(full);
    assert_eq!(cap.acked(), Some(format!("vmreplica-{}", k + 1).as_str()));

    // 6c: libvirt's metadata of the acked checkpoint lost (a migration, a libvirtd state
    // loss) while its bitmaps stay in the images, after an agent restart with the record's
    // checkpoint and description: the metadata is redefined from the record (libvirt checks
    // the bitmaps) and the cycle stays a delta that reads only what changed
    let acked = cap.acked().map(String::from).context("acked")?;
    let xml = cap
        .acked_xml()
        .map(String::from)
        .context("the acked checkpoint's description")?;
    lv.virsh(&["checkpoint-delete", "--metadata", DOMAIN, &acked])?;
    assert!(lv.checkpoints(DOMAIN)?.is_empty());
    drop(cap);
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), Some(acked.clone())).await?;
    cap.set_acked_xml(Some(xml));
    disks.write(&lv, 1, 6 << 20, 64 << 10, 0x4f)?;
    let (full, read) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full, "the redefined checkpoint gives a delta");
    assert_eq!(read, 64 << 10, "only the changed clusters are read");
    assert_eq!((cap.stats().redefines, cap.stats().resyncs), (1, 0));
    assert_eq!(lv.checkpoints(DOMAIN)?.len(), 1);
    assert!(lv.checkpoints(DOMAIN)?[0] != acked);

    // 7: libvirtd restarted mid-cycle: the capture's connection is gone, the domain and its
    // job are taken over by the new daemon; a capture opened again from the recorded
    // checkpoint ends what is left and loses nothing, and the chain goes on with deltas
    disks.write(&lv, 0, 10 << 20, 128 << 10, 0x4b)?;
    {
        let mut cyc = cap.begin_cycle().await?;
        let _ = cyc.next_extent().await?;
        lv.restart()?;
        // reading may go on (QEMU serves the export) or fail; the cycle is not shipped (the
        // replica never acknowledges it) and ending its job cannot reach the old daemon
        while let Ok(Some(_)) = cyc.next_extent().await {}
        cyc.abort().await?;
    }
    let acked = cap.acked().map(String::from);
    drop(cap);
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), acked).await?;
    disks.write(&lv, 1, 3 << 20, 64 << 10, 0x4c)?;
    run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    disks.write(&lv, 1, 5 << 20, 64 << 10, 0x4d)?;
    let (full, read) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full, "deltas go on after the restart");
    assert_eq!(read, 64 << 10);
    assert_eq!(lv.checkpoints(DOMAIN)?.len(), 1);

    // 8: a disk attached to the running domain (qcow2, persistent): a capture opened again
    // on every disk continues the chain from the recorded checkpoint, which has no bitmap for
    // the new disk: the job backs it up whole (backupmode='full': only what was written is
    // read) while the others stay deltas, and the new checkpoint covers it, so the next cycle
    // is a delta on all three
    let added = tmp.path().join("disk2.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&added)
        .arg((4u64 << 20).to_string())
        .status()?;
    assert!(st.success(), "qemu-img create");
    lv.virsh(&[
        "attach-disk",
        DOMAIN,
        &added.to_string_lossy(),
        "vdc",
        "--persistent",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
    ])?;
    disks.model.push(vec![0u8; 4 << 20]);
    let r = tmp.path().join("replica2.raw");
    std::fs::File::create(&r)?.set_len(4 << 20)?;
    disks.replica.push(r);
    let acked = cap.acked().map(String::from).context("acked")?;
    let xml = cap.acked_xml().map(String::from);
    drop(cap);
    let mut cap = LibvirtCapture::open(config(&work, lv.uri()), Some(acked)).await?;
    cap.set_acked_xml(xml);
    assert_eq!(cap.disks().len(), 3);
    disks.write(&lv, 2, 1 << 20, 128 << 10, 0x51)?;
    disks.write(&lv, 0, 1 << 20, 64 << 10, 0x52)?;
    let (full, read) = run_cycle(&mut cap, &mut disks, &lv, &[(2, 0, 4096, 0x53)]).await?;
    assert!(!full, "a delta, with the added disk whole");
    assert_eq!(
        read,
        (128 << 10) + (64 << 10),
        "the added disk's data and the delta"
    );
    assert_eq!(cap.stats().resyncs, 0);
    disks.write(&lv, 2, 3 << 20, 64 << 10, 0x54)?;
    let (full, read) = run_cycle(&mut cap, &mut disks, &lv, &[]).await?;
    assert!(!full);
    // the write made during the previous cycle (a 4 KiB write dirties one 64 KiB cluster of
    // the bitmap's granularity) and the new one
    assert_eq!(
        read,
        (64 << 10) + (64 << 10),
        "a delta on the added disk too"
    );

    // a domain with a raw disk is refused with a clear error
    let raw = tmp.path().join("raw.img");
    std::fs::File::create(&raw)?.set_len(1 << 20)?;
    let rawdef = tmp.path().join("raw.xml");
    std::fs::write(
        &rawdef,
        format!(
            "<domain type='qemu'><name>vmr-lv-raw</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            raw.display()
        ),
    )?;
    lv.virsh(&["define", &rawdef.to_string_lossy()])?;
    let mut c = config(&work, lv.uri());
    c.domain = "vmr-lv-raw".into();
    match LibvirtCapture::open(c, None).await {
        Err(CaptureError::Libvirt(LibvirtError::NotQcow2 { disk, format })) => {
            assert_eq!((disk.as_str(), format.as_str()), ("vda", "raw"));
        }
        other => bail!("expected NotQcow2, got {other:?}"),
    }
    let mut c = config(&work, lv.uri());
    c.domain = "no-such-domain".into();
    assert!(matches!(
        LibvirtCapture::open(c, None).await,
        Err(CaptureError::Libvirt(LibvirtError::NoDomain { .. }))
    ));

    drop(cap);
    let namespaces = lv.mount_namespaces();
    assert_eq!(namespaces.len(), 2, "one per daemon start: {namespaces:?}");
    let before = processes_in_namespaces(&namespaces);
    assert!(
        before.len() >= 2,
        "libvirtd and the domain's QEMU: {before:?}"
    );
    drop(lv);
    assert_eq!(
        processes_in_namespaces(&namespaces),
        Vec::<u32>::new(),
        "every libvirt and QEMU process ended"
    );
    eprintln!("libvirt_backup_cycles: {:?}", t0.elapsed());
    Ok(())
}
