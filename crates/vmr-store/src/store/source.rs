//! A VM's committed points as the source of an extended cycle (this host forwards its copy to
//! a third host): hold a point against pruning while it is read ([`PointHold`], in memory
//! only, so a crash never leaves a point pinned), say which clusters changed since an older
//! point from the qcow2 chain ([`Store::changes_since`]) and read the held point's data through
//! read-only `qemu-nbd` exports ([`PointReader`]).
//!
//! Which clusters changed since point `P`: a point's layer holds exactly what its cycle wrote
//! (data or zero clusters) on top of the layer below. Pruning a point merges its layer into
//! the next newer point's layer (or makes the whole base the newer point's layer), so a change
//! made after `P` always stays in a layer of a point newer than `P`, whatever retention merged
//! meanwhile. The changes since `P` are therefore the clusters allocated in the layers, on the
//! held point's backing chain, of the points newer than `P`: `qemu-img map` of those layers
//! alone (the chain cut below them, so the older layers and the base are not even opened)
//! gives each range's depth in them (depth 0 = the held point's layer), and a range present
//! there changed. When every layer of the chain is newer than `P`
//! (`P` pruned together with the base it sat on, or a new chain after a full copy) nothing in
//! the chain is shared with `P`: every range counts as changed (data, or zeros where the chain
//! holds none). Merged layers make this a superset of the exact changes, never a subset.
//!
//! So that the next cycle stays small, the forwarding side keeps the point the extended
//! replica acknowledged ([`PointKeep`], in memory): retention never drops a kept point itself
//! (newer points still merge up into the layers above it, older ones down into it), so its
//! layer boundary survives and the changes since it are the layers above it. Without a keep
//! (the relationship paused, or a point merged before it was kept) the rule above still gives
//! a correct, larger cycle: at worst every range of the disk.

use bytes::Bytes;

use super::*;
use crate::error::ToolFault;

/// A point pinned against pruning and merging while it is read (dropping it releases it).
/// Cycles keep being applied on top of it.
pub struct PointHold {
    vm: Arc<Vm>,
    point: CycleId,
    /// Per disk: id, size, the held layer's file and the layers of its backing chain inside
    /// the store (point id, file), newest (the held point) first.
    disks: Vec<HeldDisk>,
}

struct HeldDisk {
    disk: String,
    size: u64,
    dir: PathBuf,
    file: String,
    chain: Vec<(CycleId, String)>,
}

impl std::fmt::Debug for PointHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointHold")
            .field("vm", &self.vm.id)
            .field("point", &self.point)
            .finish()
    }
}

impl PointHold {
    /// The held point.
    pub fn point(&self) -> CycleId {
        self.point
    }

    /// The held point's disks: id and size, in the catalog's order.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.disks
            .iter()
            .map(|d| (d.disk.clone(), d.size))
            .collect()
    }
}

impl Drop for PointHold {
    fn drop(&mut self) {
        let mut st = lock(&self.vm.st);
        if let Some(n) = st.holds.get_mut(&self.point) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.holds.remove(&self.point);
            }
        }
    }
}

/// A point retention must not drop while kept (dropping it releases it). Unlike a
/// [`PointHold`], older points may still be merged into it.
pub struct PointKeep {
    vm: Arc<Vm>,
    point: CycleId,
}

impl std::fmt::Debug for PointKeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointKeep")
            .field("vm", &self.vm.id)
            .field("point", &self.point)
            .finish()
    }
}

impl PointKeep {
    /// The kept point.
    pub fn point(&self) -> CycleId {
        self.point
    }
}

impl Drop for PointKeep {
    fn drop(&mut self) {
        let mut st = lock(&self.vm.st);
        if let Some(n) = st.keeps.get_mut(&self.point) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.keeps.remove(&self.point);
            }
        }
    }
}

/// One changed range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The range reads as zeros at the held point (send a zero extent, no data).
    pub zero: bool,
}

/// The changed ranges of one disk, in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChanges {
    /// Disk id.
    pub disk: String,
    /// Its size at the held point.
    pub size: u64,
    /// Changed ranges.
    pub changes: Vec<Change>,
}

impl DiskChanges {
    /// Bytes of data (not zeros) in the changes.
    pub fn data_bytes(&self) -> u64 {
        self.changes.iter().filter(|c| !c.zero).map(|c| c.len).sum()
    }
}

/// Read-only exports of a held point's disks (one `qemu-nbd` per disk, no image locks: the
/// layers of a committed point never change while it is held).
pub struct PointReader {
    exports: Vec<Export>,
}

impl PointReader {
    /// Read `len` bytes at `offset` of disk index `disk` (as in [`PointHold::disks`]); `len`
    /// at most [`PointReader::max_read`].
    pub async fn read(&self, disk: usize, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let e = self
            .exports
            .get(disk)
            .ok_or(StoreError::NoSuchDiskIndex(disk))?;
        let len = u32::try_from(len).map_err(|_| StoreError::ReadTooLarge(len))?;
        e.client
            .read(offset, len)
            .await
            .map_err(|err| StoreError::nbd(format!("point disk {disk}"), err))
    }

    /// The largest read to ask for.
    pub fn max_read(&self) -> u64 {
        self.exports
            .iter()
            .map(Export::chunk)
            .min()
            .unwrap_or(4 << 20)
    }

    /// Stop the exports.
    pub async fn close(self) {
        for e in self.exports {
            e.abort().await;
        }
    }
}

/// The layers (point id, file) of the chain under `file` of `disk` (newest first), as the
/// catalog records the layers' backings; the walk stops at a layer without backing or with a
/// backing outside the store.
fn chain_of(c: &Catalog, disk: &str, file: &str) -> Vec<(CycleId, String)> {
    let mut out = Vec::new();
    let mut cur = Some(file.to_owned());
    while let Some(f) = cur.take() {
        let Some((id, layer)) = c.points.iter().find_map(|p| {
            p.layers
                .iter()
                .find(|l| l.disk == disk && l.file == f)
                .map(|l| (p.id, l))
        }) else {
            break;
        };
        if out.iter().any(|(seen, _)| *seen == id) {
            break;
        }
        out.push((id, f));
        cur = layer.backing.clone();
    }
    out
}

/// A `json:` image name that opens `layers` (files in the disk's directory, newest first) as a
/// qcow2 chain with no backing below the last: a range none of them allocates is not present.
fn cut_chain(layers: &[(CycleId, String)]) -> String {
    let mut node = serde_json::Value::Null;
    for (_, file) in layers.iter().rev() {
        node = serde_json::json!({
            "driver": "qcow2",
            "file": { "driver": "file", "filename": file },
            "backing": node,
        });
    }
    format!("json:{node}")
}

/// Which ranges of a `qemu-img map` of a chain of `chain_len` layers changed, given that its
/// top `newer` layers are newer than the point compared with; `None` for `newer` = a full copy
/// (allocated data only).
fn changed_ranges(
    map: &serde_json::Value,
    newer: Option<usize>,
    chain_len: usize,
) -> Result<Vec<Change>, StoreError> {
    let mut out: Vec<Change> = Vec::new();
    for e in map.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(start), Some(len)) = (
            e.get("start").and_then(|d| d.as_u64()),
            e.get("length").and_then(|d| d.as_u64()),
        ) else {
            return Err(StoreError::tool("qemu-img", ToolFault::MapEntry));
        };
        let depth = e.get("depth").and_then(|d| d.as_u64()).unwrap_or(u64::MAX);
        let present = e.get("present").and_then(|d| d.as_bool()).unwrap_or(true);
        let data = e.get("data").and_then(|d| d.as_bool()).unwrap_or(false);
        let zero = !present || !data;
        let changed = match newer {
            None => present && data,
            Some(k) if k >= chain_len => true,
            Some(k) => present && depth < k as u64,
        };
        if !changed || len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.offset + last.len == start && last.zero == zero => last.len += len,
            _ => out.push(Change {
                offset: start,
                len,
                zero,
            }),
        }
    }
    Ok(out)
}

impl Store {
    /// Hold point `point` (None = the latest) of `vm`: it and every point below it are not
    /// pruned or merged until the hold is dropped (cycles are still applied on top). Waits for
    /// a running prune step to end.
    pub async fn hold_point(
        &self,
        vm: Uuid,
        point: Option<CycleId>,
    ) -> Result<PointHold, StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        let mut st = lock(&v.st);
        let p = find_point(&st.catalog, point)?.clone();
        let disks = p
            .layers
            .iter()
            .map(|l| HeldDisk {
                disk: l.disk.clone(),
                size: l.size,
                dir: v.disk_dir(&l.disk),
                file: l.file.clone(),
                chain: chain_of(&st.catalog, &l.disk, &l.file),
            })
            .collect();
        *st.holds.entry(p.id).or_insert(0) += 1;
        drop(st);
        Ok(PointHold {
            vm: v.clone(),
            point: p.id,
            disks,
        })
    }

    /// Keep point `point` of `vm` from being pruned until the keep is dropped. Fails when the
    /// point does not exist (any more).
    pub fn keep_point(&self, vm: Uuid, point: CycleId) -> Result<PointKeep, StoreError> {
        let v = self.vm(vm)?;
        let mut st = lock(&v.st);
        let id = find_point(&st.catalog, Some(point))?.id;
        *st.keeps.entry(id).or_insert(0) += 1;
        drop(st);
        Ok(PointKeep { vm: v, point: id })
    }

    /// The ranges of each disk of the held point that changed since point `since` (`None`:
    /// everything allocated, for a first full copy), from the catalog and `qemu-img map`
    /// (see the module doc). `since` need not exist any more: retention may have merged it.
    pub async fn changes_since(
        &self,
        hold: &PointHold,
        since: Option<CycleId>,
    ) -> Result<Vec<DiskChanges>, StoreError> {
        let mut out = Vec::new();
        for d in &hold.disks {
            let newer = since.map(|s| d.chain.iter().filter(|(id, _)| *id > s).count());
            let changes = if newer == Some(0) {
                Vec::new()
            } else {
                // Only the layers newer than `since` can hold a change: map those alone (the
                // chain cut below them), not the whole chain down to its base. The deep map
                // costs CPU in proportion to the disk and the chain's depth (hundreds of ms
                // for 8 GiB under a dozen points), the cut one in proportion to the changes.
                let cut = match newer {
                    Some(k) if k < d.chain.len() => Some(cut_chain(&d.chain[..k])),
                    _ => None,
                };
                // A `json:` image names its format itself; a file needs `-f`.
                let image: &[&str] = match &cut {
                    Some(json) => &[json],
                    None => &["-f", "qcow2", &d.file],
                };
                let args = [&["map", "--output=json", "-U"][..], image].concat();
                let text = qemu::qemu_img(&d.dir, &args).await?;
                let map: serde_json::Value = serde_json::from_str(&text).map_err(|error| {
                    StoreError::tool("qemu-img", ToolFault::Json { what: "map", error })
                })?;
                changed_ranges(&map, newer, d.chain.len())?
            };
            out.push(DiskChanges {
                disk: d.disk.clone(),
                size: d.size,
                changes,
            });
        }
        Ok(out)
    }

    /// Read-only exports of the held point's disks.
    pub async fn read_point(&self, hold: &PointHold) -> Result<PointReader, StoreError> {
        let mut exports = Vec::new();
        for d in &hold.disks {
            match Export::start_read_only(&self.inner.root, &d.dir.join(&d.file), Vec::new()).await
            {
                Ok(e) => exports.push(e),
                Err(e) => {
                    PointReader { exports }.close().await;
                    return Err(e);
                }
            }
        }
        Ok(PointReader { exports })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(id: CycleId, file: &str, backing: Option<&str>) -> PointRecord {
        PointRecord {
            id,
            taken_at_ms: id,
            kind: PointKind::CrashConsistent,
            layers: vec![LayerRecord {
                disk: "d".into(),
                size: 1 << 20,
                file: file.into(),
                backing: backing.map(str::to_owned),
            }],
            pruning: false,
            group: None,
        }
    }

    #[test]
    fn the_chain_follows_the_recorded_backings_not_the_ids() {
        let c = Catalog {
            vm: Uuid::nil(),
            generation: 1,
            retention: RetentionPolicy::default(),
            // A full copy at 4 started a new chain; 2 was merged down into the base.
            points: vec![
                rec(3, "base.qcow2", None),
                rec(4, "c000004.qcow2", None),
                rec(5, "c000005.qcow2", Some("c000004.qcow2")),
                rec(6, "c000006.qcow2", Some("c000005.qcow2")),
            ],
            views: vec![],
        };
        let ids = |f: &str, disk: &str| -> Vec<CycleId> {
            chain_of(&c, disk, f)
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(ids("c000006.qcow2", "d"), vec![6, 5, 4]);
        assert_eq!(ids("base.qcow2", "d"), vec![3]);
        assert_eq!(ids("c000006.qcow2", "other"), Vec::<CycleId>::new());
        assert_eq!(
            chain_of(&c, "d", "c000005.qcow2"),
            vec![(5, "c000005.qcow2".into()), (4, "c000004.qcow2".into())]
        );
    }

    #[test]
    fn changed_ranges_by_depth() {
        let map = json!([
            {"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
            {"start": 65536, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false},
            {"start": 131072, "length": 65536, "depth": 2, "present": true, "zero": false, "data": true},
            {"start": 196608, "length": 65536, "depth": 3, "present": false, "zero": true, "data": false},
        ]);
        let ch = |offset, len, zero| Change { offset, len, zero };
        // Two layers newer than the acknowledged point: depth 0 and 1 changed.
        assert_eq!(
            changed_ranges(&map, Some(2), 3).expect("map"),
            vec![ch(0, 65536, false), ch(65536, 65536, true)]
        );
        // Every layer newer: everything, zeros where nothing is allocated.
        assert_eq!(
            changed_ranges(&map, Some(3), 3).expect("map"),
            vec![
                ch(0, 65536, false),
                ch(65536, 65536, true),
                ch(131072, 65536, false),
                ch(196608, 65536, true)
            ]
        );
        // A full copy: allocated data only.
        assert_eq!(
            changed_ranges(&map, None, 3).expect("map"),
            vec![ch(0, 65536, false), ch(131072, 65536, false)]
        );
        assert!(changed_ranges(&json!([{"start": 0}]), None, 1).is_err());
    }
}
