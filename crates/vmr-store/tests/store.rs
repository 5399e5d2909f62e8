//! Integration tests of the replica store against real qemu-img / qemu-nbd.

mod common;

use common::*;
use vmr_proto::{CycleKind, Extent, ExtentData};
use vmr_store::{RetentionPolicy, Store, StoreError};

fn new_store(dir: &std::path::Path, hourly: u32) -> Store {
    let store = Store::open(dir).expect("open");
    let vm = vm_uuid();
    store
        .add_vm(
            vm,
            &definition(vm),
            RetentionPolicy {
                hourly,
                app_consistent_every_hours: None,
                grid: None,
            },
        )
        .expect("add vm");
    store
}

#[tokio::test]
async fn apply_chain_views_and_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 24);
    assert_eq!(store.definition(vm)?, definition(vm));
    for id in 1..=4 {
        assert!(!send(&store, vm, id).await?);
        assert_eq!(store.latest_point(vm)?, Some(id));
        assert_eq!(
            point_content(&store, vm, None)?,
            model(vm, id),
            "content after cycle {id}"
        );
    }
    // Every point still holds its own cycle's content.
    for id in 1..=4 {
        assert_eq!(
            point_content(&store, vm, Some(id))?,
            model(vm, id),
            "point {id}"
        );
    }
    let pts = store.points(vm)?;
    assert_eq!(
        pts.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(pts[3].kind, vmr_store::PointKind::AppConsistent);
    assert!(pts.iter().all(|p| p.size_on_disk > 0));
    // The monitoring summary says the same from memory.
    assert_eq!(
        store.point_summary(vm)?,
        (4, pts.iter().map(|p| p.taken_at_ms).max())
    );
    // The chain reads sensibly to an admin: relative names, qcow2 backing format.
    let layers = store.point_layers(vm, None)?;
    let chain = vmr_testkit::img::backing_chain_text(&layers[0].1)?;
    assert!(chain.contains("backing file: c000003.qcow2"), "{chain}");
    assert!(chain.contains("backing file format: qcow2"), "{chain}");
    assert!(
        chain.contains("image: base.qcow2") || chain.contains("/base.qcow2"),
        "{chain}"
    );
    for (_, p) in &layers {
        vmr_testkit::img::check(p)?;
    }

    // Re-sent cycle: accepted idempotently.
    assert!(send(&store, vm, 3).await?);
    assert!(send(&store, vm, 4).await?);
    assert_eq!(store.points(vm)?.len(), 4);
    // Wrong base.
    let (mut h, _) = cycle(vm, 6);
    h.base = Some(5);
    match store.begin_cycle(h).await {
        Err(StoreError::WrongBase {
            expected: Some(4),
            got: Some(5),
        }) => {}
        other => panic!("expected WrongBase, got {other:?}"),
    }
    // Unknown VM.
    let (mut h, _) = cycle(vm, 5);
    h.vm = uuid::Uuid::new_v4();
    assert!(matches!(
        store.begin_cycle(h).await,
        Err(StoreError::UnknownVm(_))
    ));
    // Corrupt extent: refused, pending layers discarded, a retry works.
    let (h, ex) = cycle(vm, 5);
    let mut w = store.begin_cycle(h.clone()).await?;
    w.put(&ex[0], ex[0].checksum()).await?;
    let mut bad = ex[1].checksum();
    bad[0] ^= 1;
    assert!(matches!(
        w.put(&ex[1], bad).await,
        Err(StoreError::CorruptExtent { .. })
    ));
    assert!(matches!(w.finish().await, Err(StoreError::WriterClosed)));
    assert!(
        !dir.path()
            .join(format!("vms/{vm}/disks/disk0/c000005.qcow2"))
            .exists(),
        "pending layer of the failed cycle deleted"
    );
    // Out-of-range extent.
    let mut w = store.begin_cycle(h.clone()).await?;
    let e = Extent {
        disk: 0,
        offset: DISK_SIZES[0] - 10,
        data: ExtentData::Zero(20),
    };
    assert!(matches!(
        w.put(&e, e.checksum()).await,
        Err(StoreError::InvalidCycle(
            vmr_store::CycleFault::ExtentOutOfRange { .. }
        ))
    ));
    drop(w);
    let e = Extent {
        disk: 7,
        offset: 0,
        data: ExtentData::Zero(20),
    };
    let mut w = store.begin_cycle(h.clone()).await?;
    assert!(matches!(
        w.put(&e, e.checksum()).await,
        Err(StoreError::InvalidCycle(vmr_store::CycleFault::NoSuchDisk(
            7
        )))
    ));
    drop(w);
    // A cycle interrupted after some writes (the writer dropped) leaves nothing behind.
    let mut w = store.begin_cycle(h.clone()).await?;
    w.put(&ex[0], ex[0].checksum()).await?;
    drop(w);
    assert!(!send(&store, vm, 5).await?);
    assert_eq!(store.latest_cycle(vm)?, Some(5));
    assert_eq!(store.latest_point(vm)?, Some(5));
    // A second receive while one runs waits for it (the chain lock), then is a duplicate.
    let w6 = store.begin_cycle(cycle(vm, 6).0).await?;
    let second = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        store.begin_cycle(cycle(vm, 6).0),
    )
    .await;
    assert!(second.is_err(), "second writer must wait");
    w6.abort().await;
    // Reopen: the point survives.
    drop(store);
    let store = Store::open(dir.path())?;
    store.recover().await?;
    assert_eq!(store.latest_point(vm)?, Some(5));
    assert_eq!(point_content(&store, vm, None)?, model(vm, 5));

    // Views: instant overlays, pinned, never see later cycles.
    let vdir = tempfile::tempdir()?;
    let view = store.create_view(vm, Some(3), vdir.path()).await?;
    assert_eq!(view.point, 3);
    send(&store, vm, 6).await?;
    let got: Vec<Vec<u8>> = view
        .disks
        .iter()
        .map(|(_, p)| vmr_testkit::img::raw_content(p))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(got, model(vm, 3));
    assert!(matches!(
        store.create_view(vm, Some(99), vdir.path()).await,
        Err(StoreError::NoSuchPoint(Some(99)))
    ));
    // Pinned: history 0 would drop everything but 6; 3 and below stay.
    store.set_retention(vm, RetentionPolicy::default())?;
    let dropped = store.prune(vm).await?;
    assert!(
        !dropped.contains(&3) && !dropped.contains(&1),
        "{dropped:?}"
    );
    assert!(dropped.contains(&4) && dropped.contains(&5), "{dropped:?}");
    assert_eq!(point_content(&store, vm, Some(3))?, model(vm, 3));
    assert_eq!(point_content(&store, vm, None)?, model(vm, 6));
    store.remove_view(vm, view.id)?;
    assert!(!view.disks[0].1.exists());
    store.prune(vm).await?;
    assert_eq!(
        store.points(vm)?.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![6]
    );
    assert_eq!(point_content(&store, vm, None)?, model(vm, 6));
    let u = store.usage(vm)?;
    assert_eq!(u.points.len(), 1);
    assert!(u.total_bytes >= u.points[0].1);
    // Only the live files remain: the latest point's one layer (the base file, into which
    // the later layers were merged down).
    let live = store.point_layers(vm, None)?[0].1.clone();
    let files: Vec<_> = std::fs::read_dir(live.parent().expect("dir"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files, vec![live.clone()]);
    assert_eq!(
        live.file_name().and_then(|n| n.to_str()),
        Some("base.qcow2")
    );
    Ok(())
}

#[tokio::test]
async fn prune_keeps_every_remaining_point_identical() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 2);
    for id in 1..=10 {
        send(&store, vm, id).await?;
    }
    let before: Vec<(u64, [u8; 32])> = store
        .points(vm)?
        .iter()
        .map(|p| Ok((p.id, hash_disks(&point_content(&store, vm, Some(p.id))?))))
        .collect::<anyhow::Result<_>>()?;
    // Points are 20 minutes apart; with 2 hourly slots and "now" just after the latest point,
    // only a few points remain.
    let now = T0 + 10 * STEP_MS + 1000;
    let dropped = match store.prune_at(vm, now).await {
        Ok(d) => d,
        Err(e) => panic!("{e:?}"),
    };
    assert!(!dropped.is_empty());
    assert!(!dropped.contains(&10));
    let after = store.points(vm)?;
    assert!(after.len() < 10);
    for p in &after {
        let want = before
            .iter()
            .find(|(id, _)| *id == p.id)
            .expect("point existed")
            .1;
        assert_eq!(
            hash_disks(&point_content(&store, vm, Some(p.id))?),
            want,
            "point {} changed",
            p.id
        );
        assert_eq!(
            hash_disks(&point_content(&store, vm, Some(p.id))?),
            hash_disks(&model(vm, p.id))
        );
        for (_, l) in store.point_layers(vm, Some(p.id))? {
            vmr_testkit::img::check(&l)?;
        }
    }
    // Failover complete: keep one older point only.
    let keep = after[0].id;
    store.discard_points_except(vm, Some(keep)).await?;
    assert_eq!(
        store.points(vm)?.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![keep]
    );
    assert_eq!(point_content(&store, vm, None)?, model(vm, keep));
    Ok(())
}

#[tokio::test]
async fn full_resync_starts_a_new_chain() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 0);
    for id in 1..=2 {
        send(&store, vm, id).await?;
    }
    // A full cycle (resync) with a later id is accepted without a base.
    let (mut h, ex) = cycle(vm, 1);
    h.id = 3;
    h.kind = CycleKind::Full;
    let mut w = store.begin_cycle(h).await?;
    for e in &ex {
        w.put(e, e.checksum()).await?;
    }
    assert_eq!(w.finish().await?.id, 3);
    assert_eq!(point_content(&store, vm, None)?, model(vm, 1));
    store.prune(vm).await?;
    assert_eq!(
        store.points(vm)?.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(point_content(&store, vm, None)?, model(vm, 1));
    Ok(())
}

#[tokio::test]
async fn a_view_made_while_pruning_keeps_its_content() -> anyhow::Result<()> {
    // A prune that merges the layer above the base down into it deletes that layer's file; a
    // view created meanwhile of the latest point must not back onto it.
    for round in 0..6u64 {
        let dir = tempfile::tempdir()?;
        let vm = vm_uuid();
        let store = new_store(dir.path(), 0);
        for id in 1..=2 {
            send(&store, vm, id).await?;
        }
        let vdir = tempfile::tempdir()?;
        // Let the prune start first in some rounds, the view in others.
        let delay = std::time::Duration::from_millis(round * 4);
        let view_later = async {
            tokio::time::sleep(delay).await;
            store.create_view(vm, None, vdir.path()).await
        };
        let (pruned, view) = tokio::join!(store.prune(vm), view_later);
        pruned?;
        let view = view?;
        let got: Vec<Vec<u8>> = view
            .disks
            .iter()
            .map(|(_, p)| vmr_testkit::img::raw_content(p))
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(got, model(vm, 2), "round {round}");
        store.remove_view(vm, view.id)?;
    }
    Ok(())
}

/// `remove_vm` removes a VM and all its data with one durable rename; a removal interrupted
/// after the rename is finished by the next open; other VMs are untouched.
#[tokio::test]
async fn remove_vm_is_one_rename_and_finished_on_open() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = new_store(dir.path(), 2);
    let vm = vm_uuid();
    send(&store, vm, 1).await?;
    send(&store, vm, 2).await?;
    let other = uuid::Uuid::parse_str("0b7e2a51-33c4-4f0e-8a2b-6d5c4e3f2a10")?;
    store.add_vm(other, &definition(other), RetentionPolicy::default())?;
    send(&store, other, 1).await?;
    store.remove_vm(vm)?;
    assert!(store.latest_point(vm).is_err(), "the VM is gone");
    assert!(!dir.path().join("vms").join(vm.to_string()).exists());
    assert!(
        store.remove_vm(vm).is_err(),
        "removing it again is an error"
    );
    // An interrupted removal: the renamed directory is still there at the next open.
    let half = dir.path().join("vms").join(format!(".removed-{vm}"));
    std::fs::create_dir_all(half.join("disks"))?;
    std::fs::write(half.join("disks").join("junk"), b"x")?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert!(!half.exists(), "the next open finished the removal");
    assert_eq!(store.latest_point(other)?, Some(1));
    Ok(())
}

/// Failover ping-pong: a failover view whose overlays were written to becomes a new point of
/// the chain (`readopt_view`) without copying; a crash after the overlays were linked into
/// the store but before the commit leaves the view untouched; a header still naming its
/// backing by absolute path (a crash after the commit) prunes like a relative one; cycles
/// continue on the re-adopted point.
#[tokio::test]
async fn readopt_view_makes_the_overlays_the_new_point() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 0);
    for id in 1..=3 {
        send(&store, vm, id).await?;
    }
    store.prune(vm).await?;
    let vdir = tempfile::tempdir()?;
    let view = store.create_view(vm, None, vdir.path()).await?;
    assert_eq!(view.point, 3);
    // The failed-over VM writes.
    for (i, (_, overlay)) in view.disks.iter().enumerate() {
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!(
                "write -P 0x{:x} {} 65536",
                0x5a + i,
                4096 * (i + 1)
            ))
            .arg(overlay)
            .output()?;
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let expected: Vec<Vec<u8>> = view
        .disks
        .iter()
        .map(|(_, p)| vmr_testkit::img::raw_content(p))
        .collect::<anyhow::Result<_>>()?;
    assert_ne!(expected, model(vm, 3));
    let layer_dirs: Vec<std::path::PathBuf> = store
        .point_layers(vm, None)?
        .iter()
        .map(|(_, p)| p.parent().expect("dir").to_owned())
        .collect();

    // A crash after the links, before the commit: recovery drops the links, the view stays.
    for ((_, overlay), d) in view.disks.iter().zip(&layer_dirs) {
        std::fs::hard_link(overlay, d.join("c000010.qcow2"))?;
    }
    drop(store);
    let store = Store::open(dir.path())?;
    store.recover().await?;
    for d in &layer_dirs {
        assert!(!d.join("c000010.qcow2").exists());
    }
    assert_eq!(store.views(vm)?.len(), 1);
    for ((_, p), want) in view.disks.iter().zip(&expected) {
        assert_eq!(&vmr_testkit::img::raw_content(p)?, want);
    }

    // Not newer than the view's point: refused, nothing changes.
    assert!(matches!(
        store
            .readopt_view(vm, view.id, 3, T0, RetentionPolicy::default())
            .await,
        Err(StoreError::PointNotNewer { id: 3, latest: 3 })
    ));
    let p = store
        .readopt_view(vm, view.id, 10, T0 + 10, RetentionPolicy::default())
        .await?;
    assert_eq!(p.id, 10);
    let ids: Vec<u64> = store.points(vm)?.iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![3, 10]);
    assert!(store.views(vm)?.is_empty());
    for (_, overlay) in &view.disks {
        assert!(!overlay.exists(), "{} left", overlay.display());
    }
    assert_eq!(point_content(&store, vm, Some(10))?, expected);
    assert_eq!(point_content(&store, vm, Some(3))?, model(vm, 3));

    // As if the store crashed before the header rewrite: the backing named absolutely.
    for (disk, layer) in store.point_layers(vm, Some(10))? {
        let below = store
            .point_layers(vm, Some(3))?
            .into_iter()
            .find(|(d, _)| *d == disk)
            .expect("disk")
            .1;
        let st = std::process::Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&below)
            .arg(&layer)
            .output()?;
        assert!(st.status.success());
    }
    assert_eq!(point_content(&store, vm, Some(10))?, expected);
    assert_eq!(store.prune(vm).await?, vec![3]);
    assert_eq!(point_content(&store, vm, None)?, expected);

    // Cycles continue on the re-adopted point.
    let mut want = expected.clone();
    for e in cycle(vm, 11).1 {
        let d = &mut want[e.disk as usize];
        let o = e.offset as usize;
        match e.data {
            ExtentData::Data(b) => d[o..o + b.len()].copy_from_slice(&b),
            ExtentData::Zero(n) => d[o..o + n as usize].fill(0),
        }
    }
    send(&store, vm, 11).await?;
    store.prune(vm).await?;
    let ids: Vec<u64> = store.points(vm)?.iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![11]);
    assert_eq!(point_content(&store, vm, None)?, want);
    // One layer per disk: the chain did not grow.
    for d in &layer_dirs {
        assert_eq!(std::fs::read_dir(d)?.count(), 1, "{}", d.display());
    }
    Ok(())
}

/// `base` (a model of point `since`, or zeros for `None`) with the changes of the held point
/// since `since` applied, read through the point reader.
async fn apply_changes(
    store: &Store,
    hold: &vmr_store::PointHold,
    since: Option<u64>,
    mut base: Vec<Vec<u8>>,
) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
    let changes = store.changes_since(hold, since).await?;
    let reader = store.read_point(hold).await?;
    let mut data = 0;
    for (i, d) in changes.iter().enumerate() {
        data += d.data_bytes();
        for c in &d.changes {
            let (o, n) = (c.offset as usize, c.len as usize);
            if c.zero {
                base[i][o..o + n].fill(0);
                continue;
            }
            let mut off = c.offset;
            while off < c.offset + c.len {
                let len = (c.offset + c.len - off).min(reader.max_read());
                let b = reader.read(i, off, len).await?;
                base[i][off as usize..(off + len) as usize].copy_from_slice(&b);
                off += len;
            }
        }
    }
    reader.close().await;
    Ok((base, data))
}

/// The changes since a point come from the layers newer than it alone: the layers at and below
/// it are not even opened (a map of the whole chain costs CPU in proportion to the disk and the
/// chain's depth, on the host that also receives cycles). With those files moved away the
/// changes are still found, and they rebuild the held point once the files are back.
#[tokio::test]
async fn changes_since_a_point_read_only_the_newer_layers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 2);
    for id in 1..=5 {
        send(&store, vm, id).await?;
    }
    let hold = store.hold_point(vm, None).await?;
    assert_eq!(hold.point(), 5);
    let mut moved = Vec::new();
    for id in 1..=3 {
        for (_, path) in store.point_layers(vm, Some(id))? {
            let away = path.with_extension("away");
            std::fs::rename(&path, &away)?;
            moved.push((path, away));
        }
    }
    let changes = store.changes_since(&hold, Some(3)).await?;
    assert!(
        changes.iter().any(|d| !d.changes.is_empty()),
        "points 4 and 5 changed something: {changes:?}"
    );
    for (path, away) in &moved {
        std::fs::rename(away, path)?;
    }
    let (got, _) = apply_changes(&store, &hold, Some(3), model(vm, 3)).await?;
    assert_eq!(got, model(vm, 5), "changes since 3 on top of 3");
    Ok(())
}

#[tokio::test]
async fn changes_since_a_point_cover_what_pruning_merged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 2);
    for id in 1..=6 {
        send(&store, vm, id).await?;
    }
    let hold = store.hold_point(vm, None).await?;
    assert_eq!(hold.point(), 6);
    let (got, small) = apply_changes(&store, &hold, Some(3), model(vm, 3)).await?;
    assert_eq!(got, model(vm, 6), "changes since 3 on top of 3");
    let (full, all) = apply_changes(
        &store,
        &hold,
        None,
        vec![vec![0; 4 << 20], vec![0; 2 << 20]],
    )
    .await?;
    assert_eq!(full, model(vm, 6), "a full copy of 6");
    assert!(small < all, "incremental {small} bytes, full {all}");
    let (none, zero) = apply_changes(&store, &hold, Some(6), model(vm, 6)).await?;
    assert_eq!((none, zero), (model(vm, 6), 0));
    // Held: nothing at or below 6 is pruned, and cycles are still applied on top.
    let now = T0 + 8 * STEP_MS + 1000;
    send(&store, vm, 7).await?;
    send(&store, vm, 8).await?;
    let dropped = store.prune_at(vm, now).await?;
    assert!(dropped.iter().all(|d| *d > 6), "{dropped:?}");
    let (got, _) = apply_changes(&store, &hold, Some(3), model(vm, 3)).await?;
    assert_eq!(
        got,
        model(vm, 6),
        "still readable while newer points arrive"
    );
    drop(hold);
    // Released: retention merges 3 (and more) away; the changes since 3 still rebuild 8.
    let dropped = store.prune_at(vm, now).await?;
    assert!(dropped.contains(&3), "{dropped:?}");
    let hold = store.hold_point(vm, None).await?;
    assert_eq!(hold.point(), 8);
    let (got, _) = apply_changes(&store, &hold, Some(3), model(vm, 3)).await?;
    assert_eq!(got, model(vm, 8), "changes since the pruned 3");
    let (got, _) = apply_changes(&store, &hold, Some(1), model(vm, 1)).await?;
    assert_eq!(got, model(vm, 8), "changes since the pruned base 1");
    drop(hold);
    // A kept point survives retention (the point an extended replica acknowledged); the
    // changes since it stay the layers above it.
    let keep = store.keep_point(vm, 8)?;
    assert!(store.keep_point(vm, 3).is_err(), "3 is gone");
    for id in 9..=11 {
        send(&store, vm, id).await?;
    }
    let dropped = store.prune_at(vm, T0 + 12 * STEP_MS).await?;
    assert!(!dropped.contains(&8), "{dropped:?}");
    assert!(dropped.contains(&9) || dropped.contains(&10), "{dropped:?}");
    let hold = store.hold_point(vm, None).await?;
    let (got, kept_bytes) = apply_changes(&store, &hold, Some(8), model(vm, 8)).await?;
    assert_eq!(got, model(vm, 11), "changes since the kept 8");
    let (_, full_bytes) = apply_changes(
        &store,
        &hold,
        None,
        vec![vec![0; 4 << 20], vec![0; 2 << 20]],
    )
    .await?;
    assert!(kept_bytes < full_bytes, "{kept_bytes} < {full_bytes}");
    drop((hold, keep));
    Ok(())
}

/// An incremental cycle's layer goes through the page cache; the writer starts its writeback
/// every 8 MiB during the stream, so that the commit's fsync is left little to write. The
/// point's content is the last data written.
#[tokio::test]
async fn an_incremental_layer_is_written_back_during_the_stream() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = vm_uuid();
    let store = new_store(dir.path(), 24);
    send(&store, vm, 1).await?;
    let (h, _) = cycle(vm, 2);
    let mut w = store.begin_cycle(h).await?;
    let disk0 = DISK_SIZES[0];
    let mut last = Vec::new();
    for pass in 0..5u8 {
        last = (0..disk0).map(|i| (i / 4096) as u8 ^ pass).collect();
        let e = Extent {
            disk: 0,
            offset: 0,
            data: ExtentData::Data(last.clone().into()),
        };
        w.put(&e, e.checksum()).await?;
    }
    // 20 MiB written: at least one writeback, at most one per 8 MiB.
    let started = w.writebacks_started();
    assert!((1..=2).contains(&started), "writebacks started: {started}");
    assert_eq!(w.finish().await?.id, 2);
    let content = point_content(&store, vm, None)?;
    assert_eq!(content[0], last);
    assert_eq!(content[1], model(vm, 1)[1]);
    Ok(())
}
