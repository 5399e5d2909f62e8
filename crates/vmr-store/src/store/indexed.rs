//! The store's side of the block-hash index (`crate::hash_index`): building each new point's
//! index in the layer writer's `finish` (after the layers are fsynced, before the catalog
//! rename that commits the point), removing the index files of pruned points and stray ones,
//! and answering `resync-hashes` from the latest point's index, reading only the blocks it
//! does not know.
//!
//! Crash argument (`docs/replica-store.md` §5): a point's index file is written (atomically)
//! or durably removed by the same attempt that commits the point, before the commit; a file of
//! a point that never committed is a stray that `recover` deletes and that a later commit of
//! the same id replaces or removes first. So a committed point has no index or the right one.
//! Merging a point away never changes the content of the point it merges into, whose index
//! therefore stays valid.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use super::cycle::blocking;
use super::*;
use crate::error::ToolFault;
use crate::hash_index::{self, Entry, Index, IndexError, Updates};
use crate::hashes::{BLOCK_SIZE, BlockHashes, Span, read_hashes, zero_hash};

/// Ranges `(offset, len)` allocated (data or zero clusters) in the qcow2 layer `file` itself,
/// not in its backing chain, within `range` (all of it when `None`). `qemu-img map -U`: no
/// image lock, the layer may be open for writing.
pub(super) async fn own_ranges(
    dir: &Path,
    file: &str,
    range: Option<(u64, u64)>,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut args = vec![
        "map".to_owned(),
        "-U".to_owned(),
        "--output=json".to_owned(),
        "-f".to_owned(),
        "qcow2".to_owned(),
    ];
    if let Some((start, len)) = range {
        args.push(format!("--start-offset={start}"));
        args.push(format!("--max-length={len}"));
    }
    args.push(file.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = qemu::qemu_img(dir, &args).await?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|error| StoreError::tool("qemu-img", ToolFault::Json { what: "map", error }))?;
    let mut ranges = Vec::new();
    for e in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let num = |k: &str| e.get(k).and_then(serde_json::Value::as_u64);
        let present = e.get("present").and_then(serde_json::Value::as_bool);
        if let (Some(0), Some(true), Some(start), Some(len)) =
            (num("depth"), present, num("start"), num("length"))
        {
            ranges.push((start, len));
        }
    }
    Ok(ranges)
}

/// How many loaded indexes the store keeps (a resync asks for one disk at a time).
const CACHED: usize = 2;

/// Which file an index was loaded from: a replaced file (the store only ever replaces index
/// files, by atomic rename: a new inode) or one with another trailing checksum does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: (i64, i64),
    ctime_ns: (i64, i64),
    checksum: [u8; 32],
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).ok()?;
        let m = f.metadata().ok()?;
        let mut checksum = [0u8; 32];
        f.read_exact_at(&mut checksum, m.len().checked_sub(32)?)
            .ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: (m.mtime(), m.mtime_nsec()),
            ctime_ns: (m.ctime(), m.ctime_nsec()),
            checksum,
        })
    }
}

/// The last indexes loaded, so that the many `resync-hashes` calls of one resync read and
/// check the file once, not once per call (which would cost the square of the disk size);
/// and the hashes being learnt for a point without an index.
#[derive(Default)]
pub(super) struct Cache {
    entries: Mutex<Vec<(PathBuf, FileId, Arc<Index>)>>,
    learning: Mutex<Option<Learning>>,
}

/// Block hashes that read-and-hash answers computed for one disk of a point without an index
/// (a point from before the index, or after a point that had none), gathered until every whole
/// block is known; then they become the point's index, and the cycles after it get one too.
struct Learning {
    vm: Uuid,
    disk: String,
    point: CycleId,
    size: u64,
    hashes: Vec<Option<[u8; 32]>>,
    known: usize,
}

impl Cache {
    /// `hash_index::load` through the cache: a cached index is used only while its file is
    /// the very file it was loaded from.
    fn load(
        &self,
        vm_dir: &Path,
        vm: Uuid,
        disk: &str,
        point: CycleId,
        size: u64,
    ) -> Result<Arc<Index>, IndexError> {
        let path = hash_index::path(vm_dir, disk, point);
        let before = FileId::of(&path);
        {
            let c = lock(&self.entries);
            if let Some((_, _, x)) = c.iter().find(|(p, id, x)| {
                *p == path && Some(id) == before.as_ref() && x.vm == vm && x.size == size
            }) {
                return Ok(x.clone());
            }
        }
        let x = Arc::new(hash_index::load(vm_dir, vm, disk, point, size)?);
        // Cached only when the file did not change while it was read.
        if let Some(id) = before.filter(|b| FileId::of(&path).as_ref() == Some(b)) {
            let mut c = lock(&self.entries);
            c.retain(|(p, _, _)| *p != path);
            c.insert(0, (path, id, x.clone()));
            c.truncate(CACHED);
        }
        Ok(x)
    }
}

impl Vm {
    fn index_file(&self, disk: &str, point: CycleId) -> PathBuf {
        hash_index::path(&self.dir, disk, point)
    }

    /// Remove the index files of point `p`, which left the catalog. Best effort: a file left
    /// behind is a stray that `recover` deletes.
    pub(super) fn remove_point_index(&self, p: &PointRecord) {
        for l in &p.layers {
            let f = self.index_file(&l.disk, p.id);
            if !f.exists() {
                continue;
            }
            let r = self.fs.remove_file(&f).and_then(|()| match f.parent() {
                Some(d) => self.fs.fsync_dir(d),
                None => Ok(()),
            });
            if let Err(e) = r {
                tracing::warn!(vm = %self.id, point = p.id, "removing a hash index: {e}");
            }
        }
    }

    /// Delete every index file that is not of a point of `c` (and temporary files). Caller
    /// holds `chain` (no writer is building an index).
    pub(super) fn remove_stray_indexes(&self, c: &Catalog) -> Result<(), StoreError> {
        let Ok(rd) = std::fs::read_dir(self.dir.join(hash_index::DIR)) else {
            return Ok(());
        };
        for d in rd.flatten() {
            let disk = d.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            let mut removed = false;
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let keep = hash_index::point_of(&name).is_some_and(|id| {
                    c.points
                        .iter()
                        .any(|p| p.id == id && p.layers.iter().any(|l| l.disk == disk))
                });
                if !keep {
                    tracing::info!(path = %f.path().display(), "removing a stray hash index");
                    std::fs::remove_file(f.path())
                        .map_err(|e| StoreError::io("remove", f.path(), e))?;
                    removed = true;
                }
            }
            if removed {
                self.fs.fsync_dir(&d.path())?;
            }
        }
        Ok(())
    }

    /// Write `index` as its point's index file (creating the directories durably).
    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let path = self.prepared_index_path(index)?;
        self.fs.write_atomic(&path, &index.encode())
    }

    /// Write `index` as its point's index file, visible at once but not yet durable (see
    /// [`write_cycle_index`]); returns its path.
    fn write_index_visible(&self, index: &Index) -> Result<PathBuf, StoreError> {
        let path = self.prepared_index_path(index)?;
        // A file of that name (an attempt of this id that did not commit, which writeback may
        // have made durable) goes durably first: a power loss must not bring it back under
        // the point this write's rename does not make durable.
        if path.exists() {
            self.fs.remove_file(&path)?;
            if let Some(d) = path.parent() {
                self.fs.fsync_dir(d)?;
            }
        }
        self.fs.write_visible(&path, &index.encode())?;
        Ok(path)
    }

    /// The path of `index`'s file, its directories created durably when missing.
    fn prepared_index_path(&self, index: &Index) -> Result<PathBuf, StoreError> {
        let path = self.index_file(&index.disk, index.point);
        let root = self.dir.join(hash_index::DIR);
        let dir = root.join(&index.disk);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
            self.fs.fsync_dir(&root)?;
            self.fs.fsync_dir(&self.dir)?;
        }
        Ok(path)
    }

    /// Make sure `disk` at `point` has no index file, durably.
    pub(super) fn clear_index(&self, disk: &str, point: CycleId) -> Result<(), StoreError> {
        let path = self.index_file(disk, point);
        if !path.exists() {
            return Ok(());
        }
        self.fs.remove_file(&path)?;
        match path.parent() {
            Some(d) => self.fs.fsync_dir(d),
            None => Ok(()),
        }
    }
}

/// Why a new point gets no block-hash index.
#[derive(Debug, thiserror::Error)]
enum NoIndex {
    /// The previous point's index is not usable, or the disk is too large.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Writing the file failed.
    #[error("writing it: {0}")]
    Write(#[from] StoreError),
    /// The clusters an earlier attempt of a resumed resync wrote could not be listed.
    #[error("the resumed layer's own clusters are unknown")]
    ResumedMap,
}

/// The index of `layer` (of cycle `header`, disk number `i`) once the cycle commits: all zero
/// for a layer without backing, else the previous point's index (of `prev_size` bytes) grown
/// to the layer's size; blocks `earlier` (clusters an interrupted attempt of a resumed resync
/// wrote) unknown; then this cycle's entries.
fn build_index(
    v: &Vm,
    header: &CycleHeader,
    i: usize,
    layer: &LayerRecord,
    prev_size: Option<u64>,
    earlier: &[(u64, u64)],
    updates: &Updates,
) -> Result<Index, IndexError> {
    let mut index = match (&layer.backing, header.base, prev_size) {
        (None, _, _) => Index::zero(v.id, header.id, &layer.disk, layer.size)?,
        (Some(_), Some(base), Some(size)) => {
            let mut x = hash_index::load(&v.dir, v.id, &layer.disk, base, size)?;
            x.point = header.id;
            x.grow(layer.size)?;
            x
        }
        (Some(b), _, _) => {
            return Err(IndexError::Mismatch {
                path: v.disk_dir(&layer.disk).join(&layer.file),
                found: format!("a layer on {b}"),
                wanted: "a previous point with this disk".to_owned(),
            });
        }
    };
    for (off, len) in earlier {
        index.forget(*off, *len);
    }
    updates.apply(i, &mut index);
    Ok(index)
}

/// Build and write the index of every disk of cycle `header` (layers `layers`), which is about
/// to be committed as a point: called by the layer writer before the catalog rename (beside
/// the layers' flush). A disk whose index cannot be built or written (no usable index of the
/// previous point, too large, an I/O error) gets none: a file of that name (from an attempt
/// that never committed) is removed durably, so the point never commits with an index that
/// is not its own. Fails only when that removal fails.
///
/// The files are written visible but not durable (no fsync on the cycle's path: the index is
/// a checked cache, and its fsync competed with the layers' for the journal); returns them,
/// for [`sync_indexes`] after the commit. A power loss before that may lose an index, never a
/// point: a missing or damaged index is not used.
pub(super) async fn write_cycle_index(
    vm: &Arc<Vm>,
    header: &CycleHeader,
    layers: Vec<LayerRecord>,
    updates: Updates,
) -> Result<Vec<PathBuf>, StoreError> {
    let prev_sizes: Vec<Option<u64>> = {
        let st = lock(&vm.st);
        let prev = header
            .base
            .and_then(|b| st.catalog.points.iter().find(|p| p.id == b));
        layers
            .iter()
            .map(|l| {
                prev.and_then(|p| p.layers.iter().find(|x| x.disk == l.disk))
                    .map(|x| x.size)
            })
            .collect()
    };
    // A resumed resync's layers hold what earlier attempts wrote: those blocks are unknown.
    let mut earlier: Vec<Option<Vec<(u64, u64)>>> = Vec::new();
    for l in &layers {
        if !updates.resumed {
            earlier.push(Some(Vec::new()));
            continue;
        }
        match own_ranges(&vm.disk_dir(&l.disk), &l.file, None).await {
            Ok(r) => earlier.push(Some(r)),
            Err(e) => {
                tracing::warn!(vm = %vm.id, disk = %l.disk, "no hash index: {e}");
                earlier.push(None);
            }
        }
    }
    let v = vm.clone();
    let header = header.clone();
    blocking(move || {
        let mut files = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let written = match &earlier[i] {
                Some(e) => build_index(&v, &header, i, l, prev_sizes[i], e, &updates)
                    .map_err(NoIndex::from)
                    .and_then(|x| v.write_index_visible(&x).map_err(NoIndex::from)),
                None => Err(NoIndex::ResumedMap),
            };
            match written {
                Ok(path) => files.push(path),
                Err(why) => {
                    // Points from before the index have none, nor their successors: not news.
                    let quiet = matches!(&why, NoIndex::Index(IndexError::Read { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound);
                    if quiet {
                        tracing::debug!(vm = %v.id, point = header.id, disk = %l.disk, "no hash index: {why}");
                    } else {
                        tracing::warn!(vm = %v.id, point = header.id, disk = %l.disk, "no hash index: {why}");
                    }
                    v.clear_index(&l.disk, header.id)?;
                }
            }
        }
        Ok(files)
    })
    .await
}

/// Make the index files a commit wrote with [`write_cycle_index`] durable (file, then
/// directory), in the background once the point is committed. A file pruned meanwhile is
/// gone, not an error; another failure is logged (a power loss may then cost that index).
pub(super) fn sync_indexes(vm: &Arc<Vm>, files: Vec<PathBuf>) {
    if files.is_empty() {
        return;
    }
    let fs = vm.fs.clone();
    let id = vm.id;
    let sync = move || {
        for f in &files {
            if !f.exists() {
                continue;
            }
            let synced = fs
                .fsync_file(f)
                .and_then(|()| f.parent().map_or(Ok(()), |d| fs.fsync_dir(d)));
            if let Err(e) = synced {
                tracing::warn!(vm = %id, "making the block-hash index {} durable: {e}", f.display());
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => drop(h.spawn_blocking(sync)),
        Err(_) => sync(),
    }
}

impl Store {
    /// Learn from a read-and-hash answer: `hashes` of blocks from `first_block` (of
    /// `block_size`, for a disk of `disk_size` bytes) read from `layer` for the latest point
    /// `point`. Only the point's own layer counts (not a pending resync's); once every whole
    /// block of the disk is known, the point gets its index, written under the VM's state
    /// lock after checking that the point is still in the catalog with that disk and size and
    /// has no index (so no commit of the same id can interleave). Best effort.
    pub(crate) async fn learn_hashes(
        &self,
        vm: Uuid,
        disk: &str,
        point: CycleId,
        layer: Option<&Path>,
        (disk_size, block_size, first_block): (u64, u64, u64),
        hashes: &[[u8; 32]],
    ) {
        let (Some(layer), true, Ok(v)) = (layer, block_size == BLOCK_SIZE, self.vm(vm)) else {
            return;
        };
        let size = {
            let st = lock(&v.st);
            let own = find_point(&st.catalog, None).ok().and_then(|p| {
                (p.id == point)
                    .then(|| p.layers.iter().find(|l| l.disk == disk))
                    .flatten()
                    .filter(|l| v.disk_dir(disk).join(&l.file) == layer)
                    .map(|l| l.size)
            });
            match own {
                Some(s) if s.div_ceil(BLOCK_SIZE) <= hash_index::MAX_BLOCKS => s,
                _ => return,
            }
        };
        let whole = (size / BLOCK_SIZE) as usize;
        if whole == 0 {
            return;
        }
        let done = {
            let mut g = lock(&self.inner.index_cache.learning);
            let same = g.as_ref().is_some_and(|x| {
                x.vm == vm && x.disk == disk && x.point == point && x.size == size
            });
            if !same {
                *g = Some(Learning {
                    vm,
                    disk: disk.to_owned(),
                    point,
                    size,
                    hashes: vec![None; whole],
                    known: 0,
                });
            }
            let Some(x) = g.as_mut() else {
                return;
            };
            for (k, h) in hashes.iter().enumerate() {
                let b = first_block as usize + k;
                if b < whole && (b as u64 + 1) * BLOCK_SIZE <= disk_size {
                    if x.hashes[b].is_none() {
                        x.known += 1;
                    }
                    x.hashes[b] = Some(*h);
                }
            }
            if x.known < whole {
                return;
            }
            g.take()
        };
        let Some(x) = done else {
            return;
        };
        let zero_full = zero_hash(BLOCK_SIZE);
        let Ok(mut index) = Index::zero(vm, point, disk, size) else {
            return;
        };
        for (b, h) in x.hashes.iter().enumerate() {
            if let Some(h) = h {
                index.set(
                    b as u64,
                    if *h == zero_full {
                        Entry::Zero
                    } else {
                        Entry::Hash(*h)
                    },
                );
            }
        }
        let disk = disk.to_owned();
        let written = blocking(move || {
            let st = lock(&v.st);
            let still = st.catalog.points.iter().any(|p| {
                p.id == point && p.layers.iter().any(|l| l.disk == disk && l.size == size)
            });
            if !still || hash_index::load(&v.dir, vm, &disk, point, size).is_ok() {
                return Ok(false);
            }
            v.write_index(&index)?;
            drop(st);
            Ok(true)
        })
        .await;
        match written {
            Ok(true) => tracing::info!(%vm, point, "built a block-hash index from a full read"),
            Ok(false) => {}
            Err(e) => tracing::warn!(%vm, point, "writing a learnt block-hash index: {e}"),
        }
    }

    /// [`Store::resync_hashes`] from the latest point's hash index: `None` when there is no
    /// usable index (another block size, no index file, a damaged or mismatching one, the disk
    /// not in the point), then the caller reads and hashes the disk. Blocks the index does not
    /// know, and with a pending resync on the latest point every block its layer holds itself,
    /// are read through the layer (one export for all of them).
    pub(crate) async fn hashes_from_index(
        &self,
        vm: Uuid,
        disk: &str,
        disk_size: u64,
        block_size: u64,
        first_block: u64,
        count: u64,
    ) -> Result<Option<BlockHashes>, StoreError> {
        if block_size != BLOCK_SIZE {
            return Ok(None);
        }
        let v = self.vm(vm)?;
        let dir = v.disk_dir(disk);
        let (point, base, pending) = {
            let st = lock(&v.st);
            let p = find_point(&st.catalog, None)?;
            let Some(base) = p.layers.iter().find(|l| l.disk == disk).cloned() else {
                return Ok(None);
            };
            let pending = v
                .pending()
                .filter(|x| x.base == p.id)
                .and_then(|x| x.layers.into_iter().find(|l| l.disk == disk))
                .filter(|l| dir.join(&l.file).is_file());
            (p.id, base, pending)
        };
        let index = match self
            .inner
            .index_cache
            .load(&v.dir, vm, disk, point, base.size)
        {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(%vm, disk, point, "hash index not used: {e}");
                return Ok(None);
            }
        };
        let bs = BLOCK_SIZE;
        let start = first_block * bs;
        let end = ((first_block + count) * bs).min(disk_size);
        let (layer, layer_size) = match &pending {
            Some(l) => (dir.join(&l.file), l.size),
            None => (dir.join(&base.file), base.size),
        };
        // Blocks the pending resync's layer holds itself: read them.
        let mut own = BTreeSet::new();
        if let Some(l) = &pending {
            match own_ranges(&dir, &l.file, Some((start, end - start))).await {
                Ok(r) => {
                    for (off, len) in r {
                        let last = (off + len).div_ceil(bs);
                        own.extend((off / bs).max(first_block)..last.min(first_block + count));
                    }
                }
                Err(e) => {
                    tracing::debug!(%vm, disk, "hash index not used: {e}");
                    return Ok(None);
                }
            }
        }
        let zero_full = zero_hash(bs);
        let mut hashes = vec![[0u8; 32]; count as usize];
        let mut unknown: Vec<u64> = Vec::new();
        for k in 0..count {
            let b = first_block + k;
            let len = bs.min(disk_size - b * bs);
            let known = if own.contains(&b) {
                None
            } else if b * bs >= index.size {
                Some(if len == bs { zero_full } else { zero_hash(len) })
            } else {
                match index.entries.get(b as usize) {
                    Some(Entry::Zero) if len == bs => Some(zero_full),
                    Some(Entry::Hash(h)) if len == bs => Some(*h),
                    _ => None,
                }
            };
            match known {
                Some(h) => hashes[k as usize] = h,
                None => unknown.push(b),
            }
        }
        if !unknown.is_empty() {
            let mut spans: Vec<Span> = Vec::new();
            for &b in &unknown {
                match spans.last_mut() {
                    Some(s) if s.end == b * bs => {
                        s.end = ((b + 1) * bs).min(disk_size);
                        s.data_end = s.end.min(layer_size);
                    }
                    _ => {
                        let end = ((b + 1) * bs).min(disk_size);
                        spans.push(Span {
                            start: b * bs,
                            end,
                            data_end: end.min(layer_size),
                            block_size: bs,
                        });
                    }
                }
            }
            let x = Export::start_read_only(
                &self.inner.root,
                &layer,
                vec![vmr_nbd::BASE_ALLOCATION.to_owned()],
            )
            .await?;
            let mut read = Vec::with_capacity(unknown.len());
            let r = read_hashes(&x, &layer, &spans, &mut read).await;
            x.abort().await;
            r?;
            if read.len() != unknown.len() {
                return Err(StoreError::corrupt(
                    &layer,
                    Corruption::HashCount {
                        got: read.len(),
                        want: unknown.len(),
                    },
                ));
            }
            for (b, h) in unknown.iter().zip(read) {
                hashes[(b - first_block) as usize] = h;
            }
        }
        Ok(Some(BlockHashes {
            point,
            point_disk_size: layer_size,
            hashes,
            indexed: count - unknown.len() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use vmr_proto::{CycleConsistency, DiskInfo};

    const BS: u64 = BLOCK_SIZE;

    fn vm_id() -> Uuid {
        Uuid::from_u128(0x6c1f_6d7e_5a8b_4d67_9d3e_2b1f_1c0a_9e01)
    }

    fn store(dir: &Path) -> Store {
        let vm = vm_id();
        let s = Store::open(dir).expect("open");
        let def = format!(
            "name = \"web1\"\nuuid = \"{vm}\"\nprogram = \"qemu-storage-daemon\"\nargs = []\n\
             [[disks]]\nnode = \"disk0\"\npath = \"/x/d0.qcow2\"\n\
             [[disks]]\nnode = \"disk1\"\npath = \"/x/d1.qcow2\"\n"
        );
        s.add_vm(vm, &def, RetentionPolicy::default()).expect("add");
        s
    }

    /// The expected content of each disk (grown as the cycles say).
    struct Model(Vec<Vec<u8>>);

    impl Model {
        fn apply(&mut self, h: &CycleHeader, ex: &[Extent]) {
            for (i, d) in h.disks.iter().enumerate() {
                if self.0.len() <= i {
                    self.0.push(Vec::new());
                }
                if h.kind == CycleKind::Full {
                    self.0[i].clear();
                }
                let want = d.size as usize;
                if self.0[i].len() < want {
                    self.0[i].resize(want, 0);
                }
            }
            for e in ex {
                let d = &mut self.0[e.disk as usize];
                let o = e.offset as usize;
                match &e.data {
                    ExtentData::Data(b) => d[o..o + b.len()].copy_from_slice(b),
                    ExtentData::Zero(n) => d[o..o + *n as usize].fill(0),
                }
            }
        }

        /// Hashes of every block of disk `i` as a primary of `disk_size` bytes asks for them.
        fn hashes(&self, i: usize, disk_size: u64) -> Vec<[u8; 32]> {
            let mut c = self.0[i].clone();
            c.resize(disk_size as usize, 0);
            crate::hashes::hash_blocks(&c, BS)
        }
    }

    fn header(id: CycleId, kind: CycleKind, sizes: &[u64]) -> CycleHeader {
        CycleHeader {
            vm: vm_id(),
            id,
            base: (kind != CycleKind::Full).then(|| id - 1),
            kind,
            consistency: CycleConsistency::CrashConsistent,
            taken_at_ms: 1_700_000_000_000 + id,
            disks: sizes
                .iter()
                .enumerate()
                .map(|(i, s)| DiskInfo {
                    id: format!("disk{i}"),
                    size: *s,
                })
                .collect(),
            group: None,
        }
    }

    fn data(disk: u32, offset: u64, len: u64, fill: u8) -> Extent {
        let v: Vec<u8> = (0..len)
            .map(|i| fill.wrapping_add((i / 4096) as u8))
            .collect();
        Extent {
            disk,
            offset,
            data: ExtentData::Data(Bytes::from(v)),
        }
    }

    fn zero(disk: u32, offset: u64, len: u64) -> Extent {
        Extent {
            disk,
            offset,
            data: ExtentData::Zero(len),
        }
    }

    async fn put_all(w: &mut LayerWriter, ex: &[Extent]) {
        for e in ex {
            w.put(e, e.checksum()).await.expect("put");
        }
    }

    async fn send(s: &Store, m: &mut Model, h: CycleHeader, ex: Vec<Extent>) {
        let mut w = s.begin_cycle(h.clone()).await.expect("begin");
        put_all(&mut w, &ex).await;
        w.finish().await.expect("finish");
        m.apply(&h, &ex);
    }

    /// Ask for every block of each disk (at `sizes`, the primary's sizes); check against the
    /// model. Returns the blocks answered from the index per disk.
    async fn check(s: &Store, m: &Model, sizes: &[u64]) -> Vec<u64> {
        let mut indexed = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let disk = format!("disk{i}");
            let blocks = size.div_ceil(BS);
            let h = s
                .resync_hashes(vm_id(), &disk, *size, BS, 0, blocks)
                .await
                .expect("hashes");
            assert_eq!(h.hashes, m.hashes(i, *size), "{disk}");
            // A part from the middle too.
            let part = s
                .resync_hashes(vm_id(), &disk, *size, BS, 3, 5)
                .await
                .expect("hashes");
            assert_eq!(part.hashes, m.hashes(i, *size)[3..8], "{disk} part");
            indexed.push(h.indexed);
        }
        indexed
    }

    /// Every known entry of the latest point's index equals a fresh hash of the model.
    fn index_matches(s: &Store, m: &Model, point: CycleId) -> usize {
        let v = s.vm(vm_id()).expect("vm");
        let mut known = 0;
        for (i, d) in m.0.iter().enumerate() {
            let disk = format!("disk{i}");
            let x = hash_index::load(&v.dir, vm_id(), &disk, point, d.len() as u64)
                .expect("index of the point");
            let fresh = m.hashes(i, d.len() as u64);
            for (b, e) in x.entries.iter().enumerate() {
                match e {
                    Entry::Hash(h) => {
                        assert_eq!(*h, fresh[b], "{disk} block {b}");
                        known += 1;
                    }
                    Entry::Zero => {
                        assert_eq!(zero_hash(BS), fresh[b], "{disk} block {b}");
                        known += 1;
                    }
                    Entry::Unknown => {}
                }
            }
        }
        known
    }

    fn index_files(s: &Store) -> Vec<String> {
        let v = s.vm(vm_id()).expect("vm");
        let mut out = Vec::new();
        for d in std::fs::read_dir(v.dir.join(hash_index::DIR))
            .expect("index dir")
            .flatten()
        {
            for f in std::fs::read_dir(d.path()).expect("dir").flatten() {
                out.push(format!(
                    "{}/{}",
                    d.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn index_follows_every_kind_of_cycle_and_falls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let mut m = Model(Vec::new());
        // Initial: disk1's size is not a multiple of the block; aligned, unaligned and zero
        // extents.
        let sizes = [32 * BS, 16 * BS + 4096];
        send(
            &s,
            &mut m,
            header(1, CycleKind::Full, &sizes),
            vec![
                data(0, 0, 4 * BS, 1),
                data(0, 6 * BS + 100, 3 * BS, 2),
                zero(0, 20 * BS, 2 * BS),
                data(1, 15 * BS, BS + 4096, 3),
                data(1, 2 * BS, BS, 4),
            ],
        )
        .await;
        let known = index_matches(&s, &m, 1);
        assert!(known > 40, "{known} known entries");
        let got = check(&s, &m, &sizes).await;
        assert!(got[0] >= 28 && got[1] >= 14, "{got:?}");
        // Incremental: partial blocks, a zero extent over data, later extents winning.
        send(
            &s,
            &mut m,
            header(2, CycleKind::Incremental, &sizes),
            vec![
                data(0, BS / 2, BS, 5),
                zero(0, 2 * BS, BS),
                data(0, 10 * BS, 2 * BS, 6),
                data(0, 10 * BS, BS, 7),
                zero(0, 11 * BS + 10, 20),
                data(1, 0, 4096, 8),
            ],
        )
        .await;
        index_matches(&s, &m, 2);
        check(&s, &m, &sizes).await;
        // Disk growth (disk0 32 -> 40 blocks, disk1 to a block multiple) with writes in the
        // new area; a primary whose disk is larger still reads zeros beyond.
        let grown = [40 * BS, 20 * BS];
        send(
            &s,
            &mut m,
            header(3, CycleKind::Incremental, &grown),
            vec![data(0, 35 * BS, 2 * BS, 9), data(1, 17 * BS, BS, 10)],
        )
        .await;
        index_matches(&s, &m, 3);
        // Unknown: disk0 blocks 0, 1, 6, 9, 11 (partly written); disk1 block 0 (partly
        // written) and 16 (the old short last block).
        assert_eq!(check(&s, &m, &grown).await, vec![35, 18]);
        check(&s, &m, &[44 * BS, 20 * BS + 100]).await;
        // A resync cycle, interrupted once: while pending, its layer's own blocks are read;
        // the resumed attempt rewrites one block the first attempt wrote.
        let h4 = header(4, CycleKind::Resync, &grown);
        let first = vec![data(0, 1, 3 * BS, 11), data(1, 5 * BS, BS, 12)];
        let mut w = s.begin_cycle(h4.clone()).await.expect("begin");
        put_all(&mut w, &first).await;
        w.abort().await;
        let mut pend = Model(m.0.clone());
        pend.apply(&h4, &first);
        check(&s, &pend, &grown).await;
        let second = vec![data(1, 5 * BS, BS, 13), data(0, 30 * BS, BS, 14)];
        let mut w = s.begin_cycle(h4.clone()).await.expect("begin");
        assert!(w.resumed());
        put_all(&mut w, &second).await;
        w.finish().await.expect("finish");
        m.apply(&h4, &first);
        m.apply(&h4, &second);
        index_matches(&s, &m, 4);
        // The first attempt's blocks 0-3 of disk0 are unknown now; block 5 of disk1 and 30 of
        // disk0 were written whole by the second.
        assert_eq!(check(&s, &m, &grown).await, vec![33, 18]);
        // Merging the older points into the latest keeps the latest index; theirs go.
        let dropped = s.prune(vm_id()).await.expect("prune");
        assert_eq!(dropped, vec![1, 2, 3]);
        assert_eq!(
            index_files(&s),
            vec!["disk0/c000004.hidx", "disk1/c000004.hidx"]
        );
        index_matches(&s, &m, 4);
        assert_eq!(check(&s, &m, &grown).await, vec![33, 18]);
        // A damaged index is not used: every block is read, the hashes are still right. (A
        // reopened store: the index loaded above is cached while its file is the same.)
        let f = hash_index::path(&s.vm(vm_id()).expect("vm").dir, "disk0", 4);
        let mut b = std::fs::read(&f).expect("read");
        b[100] ^= 0x40;
        std::fs::write(&f, &b).expect("write");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        let v = s.vm(vm_id()).expect("vm");
        let got = check(&s, &m, &grown).await;
        assert_eq!(got[0], 0, "damaged index used");
        assert!(got[1] > 0);
        // That full read taught the store every block: the point has a good index again.
        index_matches(&s, &m, 4);
        assert_eq!(check(&s, &m, &grown).await, vec![40, 18]);
        // Without the previous point's index the next point has none either (and a stale
        // file of the same id, from an attempt that never committed, is removed first).
        std::fs::remove_file(&f).expect("remove");
        let mut stale = Index::zero(vm_id(), 5, "disk0", 40 * BS).expect("zero");
        stale.set(30, Entry::Hash([9; 32]));
        v.write_index(&stale).expect("stale");
        send(
            &s,
            &mut m,
            header(5, CycleKind::Incremental, &grown),
            vec![data(0, 0, BS, 15), data(1, 0, BS, 16)],
        )
        .await;
        assert!(
            !hash_index::path(&v.dir, "disk0", 5).exists(),
            "stale index"
        );
        let got = check(&s, &m, &grown).await;
        assert_eq!(got[0], 0);
        assert!(got[1] > 0);
        assert_eq!(check(&s, &m, &grown).await, vec![40, 19], "learnt");
        // Hashes of a pending resync's layer are not learnt as the point's.
        std::fs::remove_file(hash_index::path(&v.dir, "disk0", 5)).expect("remove");
        let h6 = header(6, CycleKind::Resync, &grown);
        let mut w = s.begin_cycle(h6.clone()).await.expect("begin");
        let ex6 = vec![data(0, 0, BS, 18)];
        put_all(&mut w, &ex6).await;
        w.abort().await;
        let mut pend = Model(m.0.clone());
        pend.apply(&h6, &ex6);
        assert_eq!(check(&s, &pend, &grown).await[0], 0);
        assert!(
            !hash_index::path(&v.dir, "disk0", 5).exists(),
            "learnt a pending layer"
        );
        // A later full cycle starts a new chain from all zeros: indexed again.
        send(
            &s,
            &mut m,
            header(7, CycleKind::Full, &grown),
            vec![data(0, 0, 8 * BS, 17)],
        )
        .await;
        index_matches(&s, &m, 7);
        let got = check(&s, &m, &grown).await;
        assert_eq!(got, vec![40, 20]);
    }

    #[tokio::test]
    async fn an_imported_point_has_no_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let img = dir.path().join("old.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg((8 * BS).to_string())
            .status()
            .expect("qemu-img");
        assert!(st.success());
        // A stray index of the same id (say, of a point discarded earlier) must not be used.
        let v = s.vm(vm_id()).expect("vm");
        let mut stray = Index::zero(vm_id(), 3, "disk0", 8 * BS).expect("zero");
        stray.set(0, Entry::Hash([1; 32]));
        v.write_index(&stray).expect("write");
        s.import_point(vm_id(), 3, 0, &[("disk0".to_owned(), img, 8 * BS)])
            .await
            .expect("import");
        let h = s
            .resync_hashes(vm_id(), "disk0", 8 * BS, BS, 0, 8)
            .await
            .expect("hashes");
        assert_eq!(h.indexed, 0);
        assert_eq!(h.hashes, vec![zero_hash(BS); 8]);
    }

    /// A cycle's index is written visible, not durable; a file of the same id that an
    /// earlier attempt left (and writeback may have made durable) is removed durably first,
    /// so a power loss before the background fsync leaves no index rather than that one.
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_visible_index_write_never_lets_a_power_loss_bring_back_another_attempts_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = Arc::new(crate::storage::FaultStorage::default());
        let s = Store::open_with_faults(dir.path(), fs.clone()).expect("open");
        let vm = vm_id();
        let def = format!(
            "name = \"web1\"\nuuid = \"{vm}\"\nprogram = \"qemu-storage-daemon\"\nargs = []\n\
             [[disks]]\nnode = \"disk0\"\npath = \"/x/d0.qcow2\"\n"
        );
        s.add_vm(vm, &def, RetentionPolicy::default()).expect("add");
        let v = s.vm(vm).expect("vm");
        // The earlier attempt's index of point 3, durable.
        let stray = Index::zero(vm, 3, "disk0", 8 * BS).expect("zero");
        v.write_index(&stray).expect("stray");
        // This attempt's index of point 3: other content.
        let mut own = stray.clone();
        own.entries[1] = Entry::Hash([7; 32]);
        let path = v.write_index_visible(&own).expect("visible");
        let read = |p: &Path| {
            std::fs::read(p)
                .ok()
                .map(|b| Index::decode(p, &b).expect("decode"))
        };
        assert_eq!(read(&path), Some(own.clone()), "visible at once");
        fs.power_loss();
        assert_eq!(
            read(&path),
            None,
            "lost, not replaced by the other attempt's index"
        );
        // Written again and made durable, it survives.
        let path = v.write_index_visible(&own).expect("visible");
        sync_indexes(&v, vec![path.clone()]);
        fs.power_loss();
        assert_eq!(read(&path), Some(own));
    }
    #[tokio::test]
    async fn recovery_removes_the_index_of_an_uncommitted_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let mut m = Model(Vec::new());
        let sizes = [8 * BS, 8 * BS];
        send(
            &s,
            &mut m,
            header(1, CycleKind::Full, &sizes),
            vec![data(0, 0, BS, 1)],
        )
        .await;
        // What a crash between the index write and the catalog rename of cycle 2 leaves.
        let v = s.vm(vm_id()).expect("vm");
        let orphan = Index::zero(vm_id(), 2, "disk0", 8 * BS).expect("zero");
        v.write_index(&orphan).expect("write");
        drop((s, v));
        let s = Store::open(dir.path()).expect("reopen");
        s.recover().await.expect("recover");
        assert_eq!(
            index_files(&s),
            vec!["disk0/c000001.hidx", "disk1/c000001.hidx"]
        );
        assert_eq!(check(&s, &m, &sizes).await, vec![8, 8]);
    }
}
