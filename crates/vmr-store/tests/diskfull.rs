//! A full file system stops a cycle with `StoreError::DiskFull`, loses nothing committed,
//! deletes the cycle's pending layers, and a resend succeeds once space is freed. Uses a small tmpfs (needs root; skipped
//! with a printed reason otherwise).

mod common;

use std::io::Write;
use std::process::Command;

use bytes::Bytes;
use common::*;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_store::{RetentionPolicy, Store};

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn disk_full_apply_resumes_after_space_is_freed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !matches!(ok, Ok(s) if s.success()) {
        eprintln!("skipping: cannot mount a tmpfs here ({ok:?})");
        return Ok(());
    }
    let _m = Mount(mnt.clone());
    let vm = vm_uuid();
    let store = Store::open(&mnt.join("store"))?;
    store.add_vm(vm, &definition(vm), RetentionPolicy::default())?;
    // Cycle 1: a full cycle of 12 MiB of data on a 32 MiB disk (plus a small second disk).
    let header = CycleHeader {
        vm,
        id: 1,
        base: None,
        kind: CycleKind::Full,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: T0,
        disks: vec![
            DiskInfo {
                id: "disk0".into(),
                size: 32 << 20,
            },
            DiskInfo {
                id: "disk1".into(),
                size: 1 << 20,
            },
        ],
        group: None,
    };
    let extents: Vec<Extent> = (0..12u64)
        .map(|i| Extent {
            disk: 0,
            offset: i * (2 << 20),
            data: ExtentData::Data(Bytes::from(vec![(i as u8) | 0x40; 1 << 20])),
        })
        .collect();
    // Fill the file system, then leave ~3 MiB: not enough for the 12 MiB layer.
    let ballast_path = mnt.join("ballast");
    let mut ballast = std::fs::File::create(&ballast_path)?;
    let chunk = vec![0xAAu8; 1 << 20];
    let mut written = 0u64;
    while ballast.write_all(&chunk).is_ok() {
        written += 1 << 20;
    }
    ballast.set_len(written.saturating_sub(3 << 20))?;
    ballast.sync_all()?;
    let res = async {
        let mut w = store.begin_cycle(header.clone()).await?;
        for e in &extents {
            w.put(e, e.checksum()).await?;
        }
        w.finish().await
    }
    .await;
    let err = res.expect_err("the cycle must fail on a full disk");
    assert!(err.is_disk_full(), "expected DiskFull, got {err:?}");
    // Nothing committed, nothing acknowledged, the pending layer deleted; the store still reads.
    assert!(
        !mnt.join(format!("store/vms/{vm}/disks/disk0/base.qcow2"))
            .exists()
    );
    assert_eq!(store.latest_point(vm)?, None);
    assert!(store.points(vm)?.is_empty());
    // Free space; a reopen + recover + resend commits it.
    drop(ballast);
    std::fs::remove_file(&ballast_path)?;
    drop(store);
    let store = Store::open(&mnt.join("store"))?;
    store.recover().await?;
    let mut w = store.begin_cycle(header).await?;
    for e in &extents {
        w.put(e, e.checksum()).await?;
    }
    assert_eq!(w.finish().await?.id, 1);
    assert_eq!(store.latest_point(vm)?, Some(1));
    let content = point_content(&store, vm, None)?;
    for e in &extents {
        let ExtentData::Data(b) = &e.data else {
            unreachable!()
        };
        let o = e.offset as usize;
        assert_eq!(&content[0][o..o + b.len()], &b[..]);
    }
    assert_eq!(content[0].iter().filter(|b| **b != 0).count(), 12 << 20);
    Ok(())
}
