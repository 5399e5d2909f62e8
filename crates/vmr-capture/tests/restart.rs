//! Tracking across QEMU restarts: a clean restart keeps qcow2 tracking; `kill -9` makes an
//! incremental cycle fail with ResyncRequired; a raw disk after any restart needs a resync.

mod common;

use bytes::Bytes;
use common::*;
use vmr_capture::{CaptureError, CycleMode, ResyncReason, Tracking, VmCapture};
use vmr_testkit::qsd::{DiskFormat, DiskSpec};

async fn write_some(vm: &vmr_testkit::qsd::QsdVm, lo: u64, fill: u8) {
    let c = live_client(vm, "disk0").await;
    for b in 0..8u64 {
        c.write(
            lo + b * 256 * 1024,
            Bytes::from(vec![fill; 64 * 1024]),
            false,
        )
        .await
        .expect("write");
    }
    c.disconnect().await.expect("disc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_clean_restart_keeps_tracking_and_kill9_requires_resync() {
    let size = 16 * MIB;
    let mut vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "rs");
    let mut replica = Replica::new(&[size]);
    write_some(&vm, 0, 7).await;
    {
        let mut cap = VmCapture::open(config(&vm, "rs")).await.expect("open");
        let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full");
        replica.apply_cycle(&mut c).await;
        c.commit().await.expect("commit");
    }
    write_some(&vm, 4 * MIB, 8).await;
    vm.stop().expect("clean stop");
    vm.restart().expect("restart");
    let mut cfg = config(&vm, "rs");
    cfg.expected_sizes = Some(vec![size]);
    {
        let mut cap = VmCapture::open(cfg.clone()).await.expect("open");
        assert_eq!(
            cap.tracking().await.expect("t"),
            Tracking::Active { generation: 1 }
        );
        let mut c = cap
            .begin_cycle(CycleMode::Incremental)
            .await
            .expect("incremental after restart");
        let (_, bytes) = replica.apply_cycle(&mut c).await;
        c.commit().await.expect("commit");
        assert_eq!(bytes, 8 * 64 * 1024, "the writes made before the restart");
        let reference = read_all(&live_client(&vm, "disk0").await).await;
        assert!(replica.disks[0] == reference);
    }
    // clean restart stores generation 2; a crash right after loading it marks it in-use
    vm.stop().expect("clean stop");
    vm.restart().expect("restart");
    vm.kill9();
    vm.restart().expect("restart after kill");
    let mut cap = VmCapture::open(cfg.clone()).await.expect("open");
    let reason = ResyncReason::BitmapInconsistent {
        disk: "disk0".into(),
    };
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Lost(reason.clone())
    );
    match cap.begin_cycle(CycleMode::Incremental).await {
        Err(CaptureError::ResyncRequired { reason: r }) => assert_eq!(r, reason),
        other => panic!("expected resync, got {other:?}"),
    }
    let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full resync");
    let mut fresh = Replica::new(&[size]);
    fresh.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    assert!(fresh.disks[0] == replica.disks[0]);
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Active { generation: 3 }
    );
    drop(cap);
    // a bitmap created at runtime does not survive a crash at all
    vm.kill9();
    vm.restart().expect("restart after kill");
    let mut cap = VmCapture::open(cfg).await.expect("open");
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Lost(ResyncReason::BitmapMissing {
            disk: "disk0".into()
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_disk_restart_requires_resync() {
    let size = 8 * MIB;
    let mut vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Raw, size)], "rw");
    {
        let mut cap = VmCapture::open(config(&vm, "rw")).await.expect("open");
        let c = cap.begin_cycle(CycleMode::Full).await.expect("full");
        let mut r = Replica::new(&[size]);
        let mut c = c;
        r.apply_cycle(&mut c).await;
        c.commit().await.expect("commit");
        assert_eq!(
            cap.tracking().await.expect("t"),
            Tracking::Active { generation: 1 }
        );
    }
    vm.stop().expect("stop");
    vm.restart().expect("restart");
    let mut cfg = config(&vm, "rw");
    cfg.expected_sizes = Some(vec![size]);
    let mut cap = VmCapture::open(cfg).await.expect("open");
    let reason = ResyncReason::RawDiskRestarted {
        disk: "disk0".into(),
    };
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Lost(reason.clone())
    );
    assert!(matches!(
        cap.begin_cycle(CycleMode::Incremental).await,
        Err(CaptureError::ResyncRequired { reason: r }) if r == reason
    ));
}
