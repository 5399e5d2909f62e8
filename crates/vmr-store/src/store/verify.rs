//! Local verification of a replica VM's store (`vmreplica verify NAME --local`), without the
//! primary: `qemu-img check` of every layer a recovery point uses (its qcow2 metadata:
//! header, L1/L2 and refcount tables) and, for every point that has one, its block-hash index
//! file (`crate::hash_index`: version, VM, point, disk and size, and the trailing BLAKE3
//! checksum of the whole file). The data of the layers is not compared with anything here:
//! the store keeps no checksum of the data beside the index, which records what was written;
//! `vmreplica verify` on the primary compares the data itself.

use std::collections::BTreeSet;

use super::*;
use crate::hash_index;

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A qcow2 layer (`qemu-img check`).
    Qcow2,
    /// A point's block-hash index file.
    HashIndex,
}

/// The check of one file of a VM's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The disk.
    pub disk: String,
    /// The file, relative to the VM's store directory.
    pub file: String,
    /// What kind of file.
    pub kind: CheckKind,
    /// `None`: passed; else what is wrong.
    pub problem: Option<String>,
}

impl Store {
    /// Check every layer of every recovery point of `vm` with `qemu-img check`, and every
    /// point's block-hash index file that exists (a point without one is not an error: see
    /// `docs/replica-store.md` §2.3). Serialised with the VM's other chain operations (a prune
    /// does not merge layers meanwhile). Each layer is checked once, with the first point
    /// that uses it.
    pub async fn check_local(&self, vm: Uuid) -> Result<Vec<FileCheck>, StoreError> {
        self.check_local_at(vm, None).await
    }

    /// [`Store::check_local`] of one point (`verify --local --point ID`): the layers that
    /// point reads through (its own and those of the points below it, its backing chain) and
    /// its own block-hash index; `None` = every point. A point the VM does not hold is
    /// [`StoreError::NoSuchPoint`].
    pub async fn check_local_at(
        &self,
        vm: Uuid,
        point: Option<CycleId>,
    ) -> Result<Vec<FileCheck>, StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        let catalog = lock(&v.st).catalog.clone();
        if let Some(id) = point {
            find_point(&catalog, Some(id))?;
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for p in catalog
            .points
            .iter()
            .filter(|p| !p.pruning && point.is_none_or(|id| p.id <= id))
        {
            for l in &p.layers {
                if seen.insert((l.disk.clone(), l.file.clone())) {
                    let dir = v.disk_dir(&l.disk);
                    let problem = crate::qemu::qemu_img_check(&dir, &l.file).await?;
                    out.push(FileCheck {
                        disk: l.disk.clone(),
                        file: format!("disks/{}/{}", l.disk, l.file),
                        kind: CheckKind::Qcow2,
                        problem,
                    });
                }
                let idx = hash_index::path(&v.dir, &l.disk, p.id);
                if point.is_none_or(|id| id == p.id) && idx.exists() {
                    let problem = hash_index::load(&v.dir, vm, &l.disk, p.id, l.size)
                        .err()
                        .map(|e| e.to_string());
                    out.push(FileCheck {
                        disk: l.disk.clone(),
                        file: idx
                            .strip_prefix(&v.dir)
                            .unwrap_or(&idx)
                            .display()
                            .to_string(),
                        kind: CheckKind::HashIndex,
                        problem,
                    });
                }
            }
        }
        Ok(out)
    }
}
