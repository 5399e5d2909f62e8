//! Pending resynchronisation layers: a resync cycle is written (by the one layer writer,
//! `cycle.rs`) straight into one new qcow2 layer per disk on top of the latest point (the
//! resync's base) while it streams in. The
//! layers are no recovery point until the whole cycle has arrived: only then does the catalog
//! write commit them as one. A resync cut short (pause, network failure, either agent killed)
//! leaves them as the VM's *pending resync*, recorded in `DIR/<vm>/resync-pending`, and the
//! next attempt on the same base continues in them: the replica's block hashes for a resync
//! are those of the pending layers, so every block that already arrived compares equal and is
//! not sent again. Also the replica's block hashes of a resync or a verification
//! (`resync_hashes`, `resync_hashes_read`), computed by `crate::hashes`.
//!
//! Crash argument: correctness never depends on what the pending layers hold. The primary
//! compares *every* block of its new point-in-time view with them and sends each block that
//! differs, so whatever subset of an earlier attempt's writes reached the disk (qcow2 stays a
//! valid image after a crash; unflushed clusters are merely leaked), the committed point
//! equals the view. Until that commit every earlier point is untouched.

use super::*;
use crate::hashes::{BlockHashes, check_request, hash_layer};

/// Record of the pending resync, next to the catalog.
const PENDING: &str = "resync-pending";

/// The pending resync of one VM: its base point and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The point the resync builds on.
    pub(super) base: CycleId,
    /// Its layers (one per disk).
    pub(super) layers: Vec<LayerRecord>,
}

fn pending_text(p: &Pending) -> String {
    let mut s = format!("vmr-resync-pending 1\nbase {}\n", p.base);
    for l in &p.layers {
        s.push_str(&format!(
            "layer {} {} {} {}\n",
            l.disk,
            l.size,
            l.file,
            l.backing.as_deref().unwrap_or("-")
        ));
    }
    s
}

fn parse_pending(s: &str) -> Option<Pending> {
    let mut lines = s.lines();
    if lines.next()? != "vmr-resync-pending 1" {
        return None;
    }
    let base = lines.next()?.strip_prefix("base ")?.parse().ok()?;
    let mut layers = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        let [tag, disk, size, file, backing] = f.as_slice() else {
            return None;
        };
        if *tag != "layer" || !valid_name(disk) || !valid_name(file) {
            return None;
        }
        layers.push(LayerRecord {
            disk: (*disk).to_owned(),
            size: size.parse().ok()?,
            file: (*file).to_owned(),
            backing: (*backing != "-").then(|| (*backing).to_owned()),
        });
    }
    Some(Pending { base, layers })
}

impl Vm {
    pub(super) fn pending_path(&self) -> PathBuf {
        self.dir.join(PENDING)
    }

    /// The recorded pending resync (an unreadable record counts as none).
    pub(super) fn pending(&self) -> Option<Pending> {
        let s = std::fs::read_to_string(self.pending_path()).ok()?;
        parse_pending(&s)
    }

    /// Files of the pending resync (kept by stray removal).
    pub(super) fn pending_files(&self) -> Vec<PathBuf> {
        self.pending()
            .map(|p| {
                p.layers
                    .iter()
                    .map(|l| self.disk_dir(&l.disk).join(&l.file))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn write_pending(&self, p: &Pending) -> Result<(), StoreError> {
        let path = self.pending_path();
        self.fs.write_atomic(&path, pending_text(p).as_bytes())
    }

    /// Forget the pending resync and delete its layers (never one the catalog references).
    pub(super) fn drop_pending(&self, st: &VmState) {
        if let Some(p) = self.pending() {
            for l in &p.layers {
                let used = st.catalog.points.iter().any(|q| {
                    q.layers
                        .iter()
                        .any(|x| x.disk == l.disk && x.file == l.file)
                });
                if !used {
                    let _ = std::fs::remove_file(self.disk_dir(&l.disk).join(&l.file));
                }
            }
        }
        let _ = self.fs.remove_file(&self.pending_path());
        let _ = self.fs.fsync_dir(&self.dir);
    }
}

impl Store {
    /// The layer a resync of `vm` compares `disk` against: the pending resync's when it is on
    /// top of the latest point, else the latest point's. With the layer, its disk size.
    pub fn resync_layer(
        &self,
        vm: Uuid,
        disk: &str,
    ) -> Result<(CycleId, Option<(PathBuf, u64)>), StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let p = find_point(&st.catalog, None)?;
        let of = |ls: &[LayerRecord]| {
            ls.iter()
                .find(|l| l.disk == disk)
                .map(|l| (v.disk_dir(&l.disk).join(&l.file), l.size))
        };
        if let Some(pending) = v.pending().filter(|x| x.base == p.id)
            && let Some(found) = of(&pending.layers)
            && found.0.is_file()
        {
            return Ok((p.id, Some(found)));
        }
        Ok((p.id, of(&p.layers)))
    }
}

impl Store {
    /// Hashes of `count` blocks of `block_size` bytes of disk `disk` (of `disk_size` bytes)
    /// of the latest point, from block `first_block`, for a resync. When a pending resync on
    /// top of the latest point holds the disk, its layer is hashed instead, so blocks an
    /// interrupted attempt already delivered compare equal. Answered from the latest point's
    /// block-hash index when it has a usable one (only unknown blocks, and the pending layer's
    /// own blocks, are read: [`BlockHashes::indexed`]); otherwise every block is read and
    /// hashed, and a complete read of the point's own layer becomes its index.
    pub async fn resync_hashes(
        &self,
        vm: Uuid,
        disk: &str,
        disk_size: u64,
        block_size: u64,
        first_block: u64,
        count: u64,
    ) -> Result<BlockHashes, StoreError> {
        self.block_hashes(vm, disk, (disk_size, block_size, first_block, count), true)
            .await
    }

    /// [`Self::resync_hashes`] without the block-hash index: every block is read through
    /// the layer and hashed (`vmreplica verify`, and a resync after a verification found a
    /// mismatch: the index records what the cycles wrote, not what the layer holds now).
    pub async fn resync_hashes_read(
        &self,
        vm: Uuid,
        disk: &str,
        disk_size: u64,
        block_size: u64,
        first_block: u64,
        count: u64,
    ) -> Result<BlockHashes, StoreError> {
        self.block_hashes(vm, disk, (disk_size, block_size, first_block, count), false)
            .await
    }

    async fn block_hashes(
        &self,
        vm: Uuid,
        disk: &str,
        (disk_size, block_size, first_block, count): (u64, u64, u64, u64),
        use_index: bool,
    ) -> Result<BlockHashes, StoreError> {
        check_request(disk_size, block_size, first_block, count)?;
        if use_index
            && let Some(h) = self
                .hashes_from_index(vm, disk, disk_size, block_size, first_block, count)
                .await?
        {
            return Ok(h);
        }
        let (point, layer) = self.resync_layer(vm, disk)?;
        let point_disk_size = layer.as_ref().map_or(0, |(_, s)| *s);
        let hashes = hash_layer(
            self.root(),
            layer.as_ref().map(|(p, _)| p.as_path()),
            point_disk_size,
            disk_size,
            block_size,
            first_block,
            count,
        )
        .await?;
        self.learn_hashes(
            vm,
            disk,
            point,
            layer.as_ref().map(|(p, _)| p.as_path()),
            (disk_size, block_size, first_block),
            &hashes,
        )
        .await;
        Ok(BlockHashes {
            point,
            point_disk_size,
            hashes,
            indexed: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_record_round_trips() {
        let p = Pending {
            base: 7,
            layers: vec![
                LayerRecord {
                    disk: "disk0".into(),
                    size: 1 << 30,
                    file: "rs000007.qcow2".into(),
                    backing: Some("c000007.qcow2".into()),
                },
                LayerRecord {
                    disk: "new".into(),
                    size: 4096,
                    file: "rs000007.qcow2".into(),
                    backing: None,
                },
            ],
        };
        assert_eq!(parse_pending(&pending_text(&p)), Some(p));
        assert_eq!(parse_pending("garbage"), None);
        assert_eq!(
            parse_pending("vmr-resync-pending 1\nbase 1\nlayer ../x 1 f -\n"),
            None
        );
    }
}
