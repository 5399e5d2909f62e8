//! Cycles against a real qemu-storage-daemon while a writer keeps writing: each cycle applied
//! to a replica equals the disk at its cut; abort loses nothing; two disks are cut at one
//! instant; qcow2 and raw; the fleecing files are never flushed.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use vmr_capture::qmp::QmpClient;
use vmr_capture::{CaptureError, CycleMode, Endpoint, Tracking, VmCapture};
use vmr_testkit::qsd::{DiskFormat, DiskSpec};

async fn cycles_under_writer(fmt: DiskFormat, tag: &str) {
    let size = 64 * MIB;
    let vm = start_vm(vec![DiskSpec::new("disk0", fmt, size)], tag);
    let writer_client = live_client(&vm, "disk0").await;
    let ref_client = live_client(&vm, "disk0").await;
    let mut cap = VmCapture::open(config(&vm, tag)).await.expect("open");
    assert_eq!(
        cap.tracking().await.expect("tracking"),
        Tracking::NotStarted
    );
    assert!(matches!(
        cap.begin_cycle(CycleMode::Incremental).await,
        Err(CaptureError::NotTracking)
    ));

    let w = Writer::start(vec![writer_client], 0, size, 1);
    let_write(&w, 50).await;
    let mut replica = Replica::new(&[size]);
    let modes = [
        CycleMode::Full,
        CycleMode::Incremental,
        CycleMode::Incremental,
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        let pause = w.lock.lock().await;
        let mut cycle = cap.begin_cycle(mode).await.expect("begin");
        let reference = read_all(&ref_client).await;
        drop(pause);
        // the writer overwrites blocks while the view is read
        let_write(&w, 40).await;
        assert_eq!(cycle.disks()[0].size, size);
        let (extents, bytes) = replica.apply_cycle(&mut cycle).await;
        assert_eq!(cycle.bytes_read(), bytes);
        let generation = cycle.generation();
        cycle.commit().await.expect("commit");
        assert!(
            replica.disks[0] == reference,
            "cycle {i} ({mode:?}) differs from the disk at its cut"
        );
        if mode == CycleMode::Incremental {
            assert!(
                extents > 0 && bytes > 0,
                "incremental cycle {i} carried nothing"
            );
            assert!(
                bytes < size / 2,
                "incremental cycle {i} carried {bytes} bytes"
            );
        }
        assert_eq!(
            cap.tracking().await.expect("tracking"),
            Tracking::Active { generation }
        );
    }
    w.stop().await;
    assert_eq!(
        cap.tracking().await.expect("tracking"),
        Tracking::Active { generation: 3 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_cycles_match_the_cut() {
    cycles_under_writer(DiskFormat::Qcow2, "q").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_cycles_match_the_cut() {
    cycles_under_writer(DiskFormat::Raw, "r").await;
}

async fn write_region(c: &vmr_nbd::NbdClient, lo: u64, blocks: u64, fill: u8) {
    for b in 0..blocks {
        c.write(
            lo + b * 128 * 1024,
            Bytes::from(vec![fill.wrapping_add(b as u8); 64 * 1024]),
            false,
        )
        .await
        .expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_early_commit_keep_every_change() {
    let size = 32 * MIB;
    let vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "ab");
    let live = live_client(&vm, "disk0").await;
    let mut cap = VmCapture::open(config(&vm, "ab")).await.expect("open");
    let mut replica = Replica::new(&[size]);
    write_region(&live, 0, 8, 1).await;
    let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full");
    replica.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");

    // region A, then a cycle aborted after reading part of it
    write_region(&live, 4 * MIB, 32, 10).await;
    let mut c = cap
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("begin");
    assert!(c.next_extent().await.expect("extent").is_some());
    c.abort().await.expect("abort");
    // region B, then a cycle "committed" too early: aborted, Incomplete
    write_region(&live, 12 * MIB, 32, 50).await;
    let mut c = cap
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("begin");
    assert!(c.next_extent().await.expect("extent").is_some());
    assert!(matches!(c.commit().await, Err(CaptureError::Incomplete)));
    // region C, then a full read
    write_region(&live, 20 * MIB, 32, 90).await;
    let mut c = cap
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("begin");
    let reference = read_all(&live).await;
    let (_, bytes) = replica.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    assert_eq!(
        bytes,
        3 * 32 * 64 * 1024,
        "A, B and C each carry 32 blocks of 64 KiB"
    );
    assert!(
        replica.disks[0] == reference,
        "changes of aborted cycles were lost"
    );
}

/// A cycle makes QEMU send events nobody waits for (its fleecing job's `JOB_STATUS_CHANGE`s,
/// `BLOCK_JOB_CANCELLED`). They must not pile up in the VM's QMP connection from cycle to cycle:
/// kept, they reached the old bound of 4096 per VM (about 2 MB) after 90 minutes at 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_nobody_waits_for_do_not_pile_up() {
    let size = 8 * MIB;
    let vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "ev");
    let live = live_client(&vm, "disk0").await;
    let mut cap = VmCapture::open(config(&vm, "ev")).await.expect("open");
    let mut replica = Replica::new(&[size]);
    let mut counts = Vec::new();
    for i in 0..6u64 {
        write_region(&live, i * MIB, 4, i as u8 + 1).await;
        let mut c = cap.begin_cycle(nth_mode(i)).await.expect("begin");
        replica.apply_cycle(&mut c).await;
        c.commit().await.expect("commit");
        counts.push(cap.qmp().buffered_events());
    }
    // every cycle's teardown deletes the job and the export it waited for, so at most the
    // events QEMU sent after that (the commit's last command) are still buffered
    assert!(
        counts.iter().all(|&n| n <= 2),
        "QMP events buffered after each of 6 cycles: {counts:?}"
    );
    assert!(
        replica.disks[0] == read_all(&live).await,
        "the replica differs from the disk"
    );
}

/// The first cycle of a run is the full one, the others incremental.
fn nth_mode(i: u64) -> CycleMode {
    if i == 0 {
        CycleMode::Full
    } else {
        CycleMode::Incremental
    }
}

fn counter_max(disk: &[u8]) -> u64 {
    (0..16)
        .map(|b| {
            let o = b * 64 * 1024;
            u64::from_le_bytes(disk[o..o + 8].try_into().expect("8 bytes"))
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_are_cut_at_one_instant() {
    let size = 8 * MIB;
    let vm = start_vm(
        vec![
            DiskSpec::new("disk0", DiskFormat::Qcow2, size),
            DiskSpec::new("disk1", DiskFormat::Raw, size),
        ],
        "cg",
    );
    let d0 = live_client(&vm, "disk0").await;
    let d1 = live_client(&vm, "disk1").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    // counter n goes to disk0, then to disk1: a consistent cut has disk0 == disk1 or disk1 + 1
    let writer = tokio::spawn(async move {
        let mut n = 1u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let off = (n % 16) * 64 * 1024;
            let buf = Bytes::from(n.to_le_bytes().repeat(8192));
            d0.write(off, buf.clone(), false).await.expect("w0");
            d1.write(off, buf, false).await.expect("w1");
            n += 1;
        }
        n
    });
    let mut cap = VmCapture::open(config(&vm, "cg")).await.expect("open");
    let mut replica = Replica::new(&[size, size]);
    let mut last = 0;
    for i in 0..6 {
        let mut c = cap.begin_cycle(nth_mode(i)).await.expect("begin");
        replica.apply_cycle(&mut c).await;
        c.commit().await.expect("commit");
        let (c0, c1) = (
            counter_max(&replica.disks[0]),
            counter_max(&replica.disks[1]),
        );
        assert!(
            c0 == c1 || c0 == c1 + 1,
            "cycle {i}: disk0 counter {c0}, disk1 counter {c1}"
        );
        assert!(c0 > last, "writer made no progress before cycle {i}");
        last = c0;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.await.expect("writer");
    assert!(n > 10);
}

/// A verify cycle (`CycleMode::Verify`) while a writer keeps writing: its dirty extents bring a
/// replica to the cut like an incremental cycle, and after them `read_all` hands out the whole
/// view exactly as it was at the cut (nothing of it was trimmed, so copy-before-write kept
/// every overwritten block), which `vmreplica verify` compares with the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_cycle_reads_the_whole_cut_under_a_writer() {
    let size = 32 * MIB;
    let tag = "v";
    let vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], tag);
    let writer_client = live_client(&vm, "disk0").await;
    let ref_client = live_client(&vm, "disk0").await;
    let mut cap = VmCapture::open(config(&vm, tag)).await.expect("open");
    let w = Writer::start(vec![writer_client], 0, size, 7);
    let_write(&w, 50).await;
    let mut replica = Replica::new(&[size]);
    let mut full = cap.begin_cycle(CycleMode::Full).await.expect("full");
    replica.apply_cycle(&mut full).await;
    assert!(
        full.read_all().is_err(),
        "read_all is for verify cycles only"
    );
    full.commit().await.expect("commit full");
    let_write(&w, 50).await;

    let pause = w.lock.lock().await;
    let mut cycle = cap.begin_cycle(CycleMode::Verify).await.expect("verify");
    let reference = read_all(&ref_client).await;
    drop(pause);
    let_write(&w, 40).await;
    assert!(
        matches!(cycle.read_all(), Err(CaptureError::Incomplete)),
        "the cycle's own extents come first"
    );
    let (_, dirty) = replica.apply_cycle(&mut cycle).await;
    assert!(dirty > 0 && dirty < size / 2, "dirty bytes {dirty}");
    assert!(
        replica.disks[0] == reference,
        "the dirty extents reach the cut"
    );
    // The writer goes on while the whole view is read.
    let_write(&w, 40).await;
    cycle.read_all().expect("read_all");
    let mut whole = Replica::new(&[size]);
    let (_, bytes) = whole.apply_cycle(&mut cycle).await;
    assert!(
        bytes >= dirty,
        "the whole view carries at least the dirty data"
    );
    assert!(whole.disks[0] == reference, "the whole view is the cut");
    assert!(cycle.read_all().is_err(), "once");
    let generation = cycle.generation();
    cycle.commit().await.expect("commit verify");
    w.stop().await;
    assert_eq!(
        cap.tracking().await.expect("tracking"),
        Tracking::Active { generation }
    );
}

/// The fleecing files are scratch: QEMU opens them with flushes ignored (`cache.no-flush`), so
/// tearing a cycle's view down does not first write every copied cluster back to the disk (in
/// the row 1 benchmark that took 6-15 s per cycle in the VM's QEMU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleecing_files_are_never_flushed() {
    let size = 16 * MIB;
    let vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "nf");
    let mut cap = VmCapture::open(config(&vm, "nf")).await.expect("open");
    let c = cap.begin_cycle(CycleMode::Full).await.expect("full");
    let mut q = QmpClient::connect(
        &Endpoint::Unix(vm.test_qmp_socket()),
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("test monitor");
    let nodes = q
        .execute_value("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .expect("query-named-block-nodes");
    let fleece: Vec<&Value> = nodes
        .as_array()
        .expect("list")
        .iter()
        .filter(|n| n["file"].as_str().is_some_and(|f| f.ends_with(".fleece")))
        .collect();
    // The raw node and the file node under it.
    assert!(fleece.len() >= 2, "no fleecing nodes in {nodes}");
    for n in fleece {
        assert_eq!(n["cache"]["no-flush"], json!(true), "{n}");
    }
    c.abort().await.expect("abort");
}
