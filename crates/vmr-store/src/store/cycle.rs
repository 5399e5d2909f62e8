//! The one layer writer for every kind of cycle (full/initial, incremental, resync, import):
//! admission (duplicate, wrong base, shrink, one receive at a time) in one place, the pending
//! qcow2 layer per disk created when the cycle begins, each extent taken as a
//! [`CheckedExtent`] (verified once, on arrival, by whoever received it) and written into the pending layer as it arrives (pipelined)
//! through an NBD export of the store's long-lived qemu-storage-daemon (`daemon.rs`), and at the end NBD flush, fsync and the catalog rename that commits the
//! point. [`LayerWriter::finish`] returns only after that commit, so the caller acknowledges a
//! cycle only once it is a recovery point.
//!
//! A writer holds the VM's `chain` lock from `begin_cycle` to its end: its layers back onto the
//! latest point's, which a prune step must not merge or delete meanwhile (and QEMU's image locks
//! would refuse it anyway).

use tokio::sync::OwnedMutexGuard;

use crate::hash_index;

use super::*;
use crate::daemon::{DaemonExport, LayerFlush, WriteCache};

/// Flush the pending layers of a resync after this many bytes written, so that an interrupted
/// resync that is resumed later loses little.
const RESYNC_FLUSH_EVERY: u64 = 32 << 20;
/// For a layer written through the page cache: start the writeback of its dirty pages after
/// this many bytes (summed over the cycle's disks), so that the device writes during the
/// stream and the commit's fsync finds little left to write.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Extents at least this large are hashed on a blocking thread, off the async runtime.
const HASH_OFF_RUNTIME: usize = 256 << 10;

/// What admission decided for a cycle header.
enum Admit {
    /// The replica already has this cycle (or a newer one).
    Duplicate,
    /// New layers are to be written; for a resync `resume` holds the pending layers to continue.
    Write {
        layers: Vec<LayerRecord>,
        resume: bool,
    },
}

/// Writes one cycle straight into its pending qcow2 layers ([`Store::begin_cycle`]).
pub struct LayerWriter {
    vm: Arc<Vm>,
    header: CycleHeader,
    open: Option<Open>,
    duplicate: bool,
    resumed: bool,
    puts: u64,
    writebacks: u64,
}

struct Open {
    layers: Vec<NewLayer>,
    exports: Vec<DaemonExport>,
    pipe: Pipeline,
    since_flush: u64,
    /// Bytes written through the page cache since the last writeback was started.
    since_writeback: u64,
    /// The writeback started last (`fsio::start_writeback` of the buffered layers), if any:
    /// a new one starts only once it returned.
    writeback: Option<tokio::task::JoinHandle<()>>,
    /// The block-hash index entries of what was written (`hash_index`).
    index: hash_index::Updates,
    chain: OwnedMutexGuard<()>,
}

struct NewLayer {
    dir: PathBuf,
    rec: LayerRecord,
    /// A layer created empty without backing reads as zeros: zero extents are skipped.
    reads_zero: bool,
}

impl std::fmt::Debug for LayerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerWriter")
            .field("vm", &self.vm.id)
            .field("cycle", &self.header.id)
            .field("duplicate", &self.duplicate)
            .field("resumed", &self.resumed)
            .finish()
    }
}

/// Run blocking file-system work (fsync) off the async runtime.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StoreError::Background)?
}

/// The block-hash index entries of a checked extent: from the block hashes its checksum scheme
/// produced (no pass over the data), else one BLAKE3 pass (on a blocking thread when large).
async fn index_entries(c: &CheckedExtent) -> Result<Vec<(u64, hash_index::Entry)>, StoreError> {
    if let Some(blocks) = c.block_hashes() {
        return Ok(hash_index::entries_from_blocks(c.extent(), blocks));
    }
    let big = matches!(&c.extent().data, ExtentData::Data(b) if b.len() >= HASH_OFF_RUNTIME);
    if big {
        let e = c.extent().clone();
        tokio::task::spawn_blocking(move || hash_index::extent_entries(&e))
            .await
            .map_err(StoreError::Background)
    } else {
        Ok(hash_index::extent_entries(c.extent()))
    }
}

impl VmState {
    /// The admission rules of every kind of cycle, in one place. `pending` is the VM's pending
    /// resync record (for resuming it).
    fn admit(
        &self,
        v: &Vm,
        h: &CycleHeader,
        pending: Option<&resync::Pending>,
    ) -> Result<Admit, StoreError> {
        let latest = self.latest_point();
        if latest.is_some_and(|l| h.id <= l) {
            return Ok(Admit::Duplicate);
        }
        if h.kind != CycleKind::Full && h.base != latest {
            return Err(StoreError::WrongBase {
                expected: latest,
                got: h.base,
            });
        }
        self.check_no_shrink(h)?;
        if let Some(r) = self.receiving {
            return Err(StoreError::ReceiveInProgress(r));
        }
        let top = self.catalog.points.last();
        let referenced: std::collections::BTreeSet<(&str, &str)> = self
            .catalog
            .points
            .iter()
            .flat_map(|p| p.layers.iter().map(|l| (l.disk.as_str(), l.file.as_str())))
            .collect();
        let mut layers = Vec::new();
        for d in &h.disks {
            let prev = match (top, h.kind) {
                (Some(p), k) if k != CycleKind::Full => p
                    .layers
                    .iter()
                    .find(|l| l.disk == d.id)
                    .map(|l| l.file.clone()),
                _ => None,
            };
            let file = match (h.kind, &prev, top) {
                (CycleKind::Resync, _, Some(t)) => format!("rs{:06}.qcow2", t.id),
                (_, Some(_), _) => layer_name(h.id),
                (_, None, None) => "base.qcow2".to_owned(),
                (_, None, Some(_)) => format!("base-{}", layer_name(h.id)),
            };
            if referenced.contains(&(d.id.as_str(), file.as_str())) {
                return Err(StoreError::corrupt(
                    v.disk_dir(&d.id).join(&file),
                    Corruption::LayerCommitted,
                ));
            }
            layers.push(LayerRecord {
                disk: d.id.clone(),
                size: d.size,
                file,
                backing: prev,
            });
        }
        let resume = h.kind == CycleKind::Resync
            && pending.is_some_and(|p| {
                Some(p.base) == latest
                    && p.layers == layers
                    && p.layers
                        .iter()
                        .all(|l| v.disk_dir(&l.disk).join(&l.file).is_file())
            });
        Ok(Admit::Write { layers, resume })
    }
}

impl Store {
    /// Start a cycle of any kind: admit it (a cycle the replica already has is a
    /// duplicate: [`LayerWriter::is_duplicate`], nothing is written and `finish` returns the
    /// latest point; an incremental or resync cycle whose base is not the latest point is
    /// [`StoreError::WrongBase`]), create the pending qcow2 layer of each disk on top of the
    /// chain's top and open it for writing. A resync on the same base as an interrupted one
    /// continues in its layers ([`LayerWriter::resumed`]).
    pub async fn begin_cycle(&self, header: CycleHeader) -> Result<LayerWriter, StoreError> {
        let v = self.vm(header.vm)?;
        validate_header(&header)?;
        let chain = v.chain.clone().lock_owned().await;
        let pending = v.pending();
        let admitted = {
            let mut st = lock(&v.st);
            let a = st.admit(&v, &header, pending.as_ref())?;
            if let Admit::Write { resume, .. } = &a {
                if !resume && pending.is_some() {
                    v.drop_pending(&st);
                }
                st.receiving = Some(header.id);
            }
            a
        };
        let (records, resume) = match admitted {
            Admit::Duplicate => {
                return Ok(LayerWriter {
                    vm: v,
                    header,
                    open: None,
                    duplicate: true,
                    resumed: false,
                    puts: 0,
                    writebacks: 0,
                });
            }
            Admit::Write { layers, resume } => (layers, resume),
        };
        let layers: Vec<NewLayer> = records
            .into_iter()
            .map(|rec| NewLayer {
                dir: v.disk_dir(&rec.disk),
                reads_zero: rec.backing.is_none() && !resume,
                rec,
            })
            .collect();
        let disks = header.disks.len();
        match open_layers(&v, &header, &layers, resume).await {
            Ok(exports) => Ok(LayerWriter {
                vm: v,
                header,
                open: Some(Open {
                    layers,
                    exports,
                    pipe: Pipeline::default(),
                    since_flush: 0,
                    since_writeback: 0,
                    writeback: None,
                    index: hash_index::Updates::new(disks, resume),
                    chain,
                }),
                duplicate: false,
                resumed: resume,
                puts: 0,
                writebacks: 0,
            }),
            Err(e) => {
                let mut st = lock(&v.st);
                st.receiving = None;
                if header.kind == CycleKind::Resync {
                    v.drop_pending(&st);
                } else {
                    remove_layers(&layers);
                }
                Err(e)
            }
        }
    }
}

/// Create (unless resuming) and export the pending layers.
async fn open_layers(
    v: &Arc<Vm>,
    header: &CycleHeader,
    layers: &[NewLayer],
    resume: bool,
) -> Result<Vec<DaemonExport>, StoreError> {
    // Each disk's layer created (`blockdev-create`, unless resuming), opened and exported by
    // the daemon, concurrently. A full cycle (initial copy) is large extents written once in
    // order: its layers are written with O_DIRECT (no copy of each byte into the page cache);
    // the others' small scattered extents go through the page cache (measured in
    // BENCHMARKS.md: O_DIRECT made a 1 % cycle of 64 KiB extents slower).
    let (cache, flush) = layer_options(header.kind);
    let started = futures::future::join_all(layers.iter().map(|l| async move {
        let path = l.dir.join(&l.rec.file);
        if resume {
            return v.qsd.export(&path).await;
        }
        std::fs::create_dir_all(&l.dir).map_err(|e| StoreError::io("create", &l.dir, e))?;
        // Not referenced by the catalog (checked): a leftover of an interrupted cycle.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove", &path, e)),
        }
        v.qsd
            .create_and_export(&path, l.rec.size, l.rec.backing.as_deref(), cache, flush)
            .await
    }))
    .await;
    let mut exports = Vec::new();
    let mut first_err = None;
    for r in started {
        match r {
            Ok(x) => exports.push(x),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if first_err.is_none() && !resume && header.kind == CycleKind::Resync {
        // A resync's layers survive an interruption for the next attempt: durable now.
        if let Err(e) = record_resync_layers(v, header, layers).await {
            first_err = Some(e);
        }
    }
    if let Some(e) = first_err {
        for x in exports {
            v.qsd.abort(x).await;
        }
        return Err(e);
    }
    pause_point("cycle-layers-created");
    Ok(exports)
}

/// How a cycle of `kind` writes its new layers. QEMU's own flushes of the file are skipped
/// where the layer is deleted unread unless its cycle commits (full, incremental): the commit
/// fsyncs it before the catalog names it. A resync's layers outlive an interruption, so they
/// keep qcow2's ordering and the periodic NBD FLUSHes that make what arrived durable for the
/// next attempt.
fn layer_options(kind: CycleKind) -> (WriteCache, LayerFlush) {
    match kind {
        CycleKind::Full => (WriteCache::Direct, LayerFlush::AtCommit),
        CycleKind::Incremental => (WriteCache::Buffered, LayerFlush::AtCommit),
        CycleKind::Resync => (WriteCache::Buffered, LayerFlush::Ordered),
    }
}

/// Start the writeback of the layers written through the page cache, on a blocking thread
/// (a hint: a failure is only logged; the commit's fsync reports what matters).
fn start_writeback(layers: &[NewLayer], exports: &[DaemonExport]) -> tokio::task::JoinHandle<()> {
    let files: Vec<PathBuf> = layers
        .iter()
        .zip(exports)
        .filter(|(_, x)| !x.direct)
        .map(|(l, _)| l.dir.join(&l.rec.file))
        .collect();
    tokio::task::spawn_blocking(move || {
        for f in files {
            if let Err(e) = fsio::start_writeback(&f) {
                tracing::debug!(error = %e, "starting a layer's writeback failed");
            }
        }
    })
}

/// fsync each layer file and its directory (on a blocking thread).
async fn fsync_layers(v: &Arc<Vm>, layers: &[NewLayer]) -> Result<(), StoreError> {
    let files: Vec<(PathBuf, PathBuf)> = layers
        .iter()
        .map(|l| (l.dir.join(&l.rec.file), l.dir.clone()))
        .collect();
    let fs = v.fs.clone();
    blocking(move || {
        for (f, d) in files {
            fs.fsync_file(&f)?;
            fs.fsync_dir(&d)?;
        }
        Ok(())
    })
    .await
}

/// Make a new resync's (empty) layers durable and record them in `resync-pending`.
async fn record_resync_layers(
    v: &Arc<Vm>,
    header: &CycleHeader,
    layers: &[NewLayer],
) -> Result<(), StoreError> {
    fsync_layers(v, layers).await?;
    let base = header.base.ok_or(StoreError::NoSuchPoint(None))?;
    v.write_pending(&resync::Pending {
        base,
        layers: layers.iter().map(|l| l.rec.clone()).collect(),
    })
}

fn remove_layers(layers: &[NewLayer]) {
    for l in layers {
        let _ = std::fs::remove_file(l.dir.join(&l.rec.file));
    }
}

impl LayerWriter {
    /// True when the replica already had this cycle: nothing is written.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }

    /// True when this resync continues an earlier, interrupted attempt's layers.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The cycle being received.
    pub fn header(&self) -> &CycleHeader {
        &self.header
    }

    /// How many times the writer started the writeback of its layers written through the
    /// page cache during the stream (every 8 MiB; none for `O_DIRECT` layers).
    pub fn writebacks_started(&self) -> u64 {
        self.writebacks
    }

    /// Verify `checksum` (a [`ChecksumScheme::Whole`] checksum) against the extent, then
    /// [`LayerWriter::put_checked`]. For extents that were not verified on their way here.
    pub async fn put(&mut self, extent: &Extent, checksum: [u8; 32]) -> Result<(), StoreError> {
        let e = extent.clone();
        let big = matches!(&e.data, ExtentData::Data(b) if b.len() >= HASH_OFF_RUNTIME);
        let r = if big {
            tokio::task::spawn_blocking(move || {
                CheckedExtent::verify(e, checksum, ChecksumScheme::Whole)
            })
            .await
            .map_err(StoreError::Background)?
        } else {
            CheckedExtent::verify(e, checksum, ChecksumScheme::Whole)
        };
        match r {
            Ok(c) => self.put_checked(&c).await,
            Err(m) => {
                self.close_failed().await;
                Err(StoreError::CorruptExtent {
                    disk: m.disk,
                    offset: m.offset,
                })
            }
        }
    }

    /// Write a checked extent (its checksum was verified once, on arrival) into its disk's
    /// pending layer (pipelined: returns once the write is queued). Any failure ends the
    /// writer like [`LayerWriter::abort`].
    pub async fn put_checked(&mut self, checked: &CheckedExtent) -> Result<(), StoreError> {
        if self.duplicate {
            return check_extent(&self.header, checked.extent());
        }
        if self.open.is_none() {
            return Err(StoreError::WriterClosed);
        }
        let res = self.put_inner(checked).await;
        if res.is_err() {
            self.close_failed().await;
        }
        res
    }

    async fn put_inner(&mut self, checked: &CheckedExtent) -> Result<(), StoreError> {
        let extent = checked.extent();
        check_extent(&self.header, extent)?;
        let entries = index_entries(checked).await?;
        let resync = self.header.kind == CycleKind::Resync;
        let o = self.open.as_mut().ok_or(StoreError::WriterClosed)?;
        let i = extent.disk as usize;
        let (Some(l), Some(x)) = (o.layers.get(i), o.exports.get(i)) else {
            return Err(StoreError::InvalidCycle(CycleFault::NoSuchDisk(
                extent.disk,
            )));
        };
        o.pipe
            .order(extent.disk, extent.offset, extent.len())
            .await?;
        o.index.record(extent.disk, entries);
        match &extent.data {
            ExtentData::Data(b) => {
                o.pipe
                    .write(&x.client, &l.rec.file, extent.offset, b.clone(), x.chunk())
                    .await?
            }
            ExtentData::Zero(_) if l.reads_zero => {}
            ExtentData::Zero(n) => {
                o.pipe
                    .zero(&x.client, &l.rec.file, extent.offset, *n, x.chunk())
                    .await?
            }
        }
        if !x.direct {
            o.since_writeback += extent.len();
            if o.since_writeback >= WRITEBACK_EVERY
                && o.writeback.as_ref().is_none_or(|h| h.is_finished())
            {
                o.since_writeback = 0;
                o.writeback = Some(start_writeback(&o.layers, &o.exports));
                self.writebacks += 1;
            }
        }
        if resync {
            o.since_flush += extent.len();
            if o.since_flush >= RESYNC_FLUSH_EVERY {
                o.pipe.drain().await?;
                for (x, l) in o.exports.iter().zip(&o.layers) {
                    x.client
                        .flush()
                        .await
                        .map_err(|e| StoreError::nbd(l.rec.file.clone(), e))?;
                }
                o.since_flush = 0;
            }
        }
        self.puts += 1;
        if self.puts == 2 {
            pause_point("cycle-writing");
        }
        Ok(())
    }

    /// The whole cycle arrived: wait for every write, NBD FLUSH each layer, fsync the layers
    /// and their directories, then commit the point with the catalog rename. Returns the
    /// committed point: only now may the cycle be acknowledged. For a duplicate, the latest
    /// point.
    pub async fn finish(mut self) -> Result<RecoveryPoint, StoreError> {
        if self.duplicate {
            let st = lock(&self.vm.st);
            let p = find_point(&st.catalog, None)?;
            return Ok(self.vm.point_info(&st.catalog, p));
        }
        let Some(mut o) = self.open.take() else {
            return Err(StoreError::WriterClosed);
        };
        match commit(&self.vm, &self.header, &mut o).await {
            Ok(p) => {
                lock(&self.vm.st).receiving = None;
                Ok(p)
            }
            Err(e) => {
                let resync = self.header.kind == CycleKind::Resync;
                abort_open(&self.vm, self.header.id, o, resync).await;
                Err(e)
            }
        }
    }

    /// End the cycle without committing it. A resync keeps (flushes) its layers for the next
    /// attempt on the same base; every other kind deletes its pending layers.
    pub async fn abort(mut self) {
        if let Some(o) = self.open.take() {
            let resync = self.header.kind == CycleKind::Resync;
            abort_open(&self.vm, self.header.id, o, resync).await;
        }
    }

    async fn close_failed(&mut self) {
        if let Some(o) = self.open.take() {
            let resync = self.header.kind == CycleKind::Resync;
            abort_open(&self.vm, self.header.id, o, resync).await;
        }
    }
}

/// Flush, fsync and commit an open cycle (see [`LayerWriter::finish`]).
async fn commit(
    vm: &Arc<Vm>,
    header: &CycleHeader,
    o: &mut Open,
) -> Result<RecoveryPoint, StoreError> {
    let t = std::time::Instant::now();
    let records: Vec<LayerRecord> = o.layers.iter().map(|l| l.rec.clone()).collect();
    let updates = std::mem::take(&mut o.index);
    let resumed = updates.resumed;
    // The point's block-hash index is built and written while the layers are flushed: it
    // needs only the previous point's index and this cycle's entries, and an index file
    // of a point the catalog does not hold is a stray (removed by recovery, rewritten or
    // durably removed by the next commit of that id). A resumed resync's index needs the
    // flushed layers' own map, so it is written after them.
    let index = async {
        let t = std::time::Instant::now();
        indexed::write_cycle_index(vm, header, records, updates)
            .await
            .map(|files| (files, t.elapsed()))
    };
    let (flushed, indexed) = if resumed {
        match flush_layers(vm, o).await {
            Ok(f) => (Ok(f), index.await),
            Err(e) => return Err(e),
        }
    } else {
        tokio::join!(flush_layers(vm, o), index)
    };
    let (t_drained, t_closed, t_synced) = flushed?;
    let (index_files, t_index) = indexed?;
    pause_point("cycle-indexed");
    gate_point(Gate::Commit, header.id).await;
    let t_indexed = t.elapsed();
    let v = vm.clone();
    let point = PointRecord {
        id: header.id,
        taken_at_ms: header.taken_at_ms,
        kind: PointKind::from(header.consistency),
        layers: o.layers.iter().map(|l| l.rec.clone()).collect(),
        pruning: false,
        group: header.group.clone(),
    };
    let header = header.clone();
    let resync = header.kind == CycleKind::Resync;
    let info = blocking(move || {
        let mut st = lock(&v.st);
        let latest = st.latest_point();
        let fits = match header.kind {
            CycleKind::Full => latest < Some(header.id),
            _ => latest == header.base,
        };
        if !fits {
            return Err(StoreError::WrongBase {
                expected: latest,
                got: header.base,
            });
        }
        let mut c = st.catalog.clone();
        c.points.push(point.clone());
        v.commit(&mut st, c)?;
        if resync {
            let _ = v.fs.remove_file(&v.pending_path());
            let _ = v.fs.fsync_dir(&v.dir);
        }
        Ok(v.point_info(&st.catalog, &point))
    })
    .await?;
    pause_point("cycle-committed");
    indexed::sync_indexes(vm, index_files);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        vm = %vm.id,
        cycle = info.id,
        drained_ms = ms(t_drained),
        closed_ms = ms(t_closed),
        synced_ms = ms(t_synced),
        index_ms = ms(t_index),
        indexed_ms = ms(t_indexed),
        committed_ms = ms(t.elapsed()),
        "cycle commit phases (ms since the commit started)"
    );
    Ok(info)
}

/// Wait for every write of `o`, then NBD FLUSH and close each layer in the daemon
/// (concurrently) and fsync the layer files and their directories. Returns when the drain,
/// the close and the fsync ended, in time since the call.
async fn flush_layers(
    vm: &Arc<Vm>,
    o: &mut Open,
) -> Result<
    (
        std::time::Duration,
        std::time::Duration,
        std::time::Duration,
    ),
    StoreError,
> {
    let t = std::time::Instant::now();
    let drained = o.pipe.drain().await;
    let t_drained = t.elapsed();
    let exports = std::mem::take(&mut o.exports);
    if let Err(e) = drained {
        for x in exports {
            vm.qsd.abort(x).await;
        }
        return Err(e);
    }
    // FLUSH, disconnect and close of every disk's layer in the daemon, concurrently.
    for r in futures::future::join_all(exports.into_iter().map(|x| vm.qsd.finish(x))).await {
        r?;
    }
    let t_closed = t.elapsed();
    fsync_layers(vm, &o.layers).await?;
    pause_point("cycle-flushed");
    Ok((t_drained, t_closed, t.elapsed()))
}

/// Close an unfinished cycle: a resync's layers are flushed and kept, others' exports killed
/// and layers deleted. Releases the receive slot, then the chain lock.
async fn abort_open(vm: &Vm, id: CycleId, mut o: Open, keep: bool) {
    let _ = o.pipe.drain().await;
    for x in std::mem::take(&mut o.exports) {
        if keep {
            if let Err(e) = vm.qsd.finish(x).await {
                tracing::warn!(vm = %vm.id, "closing the pending resync layers: {e}");
            }
        } else {
            vm.qsd.abort(x).await;
        }
    }
    if !keep {
        remove_layers(&o.layers);
    }
    let mut st = lock(&vm.st);
    if st.receiving == Some(id) {
        st.receiving = None;
    }
    drop(st);
    drop(o.chain);
}

impl Drop for LayerWriter {
    fn drop(&mut self) {
        let Some(o) = self.open.take() else {
            return;
        };
        let vm = self.vm.clone();
        let id = self.header.id;
        let keep = self.header.kind == CycleKind::Resync;
        // Dropped mid-stream (the connection went away): close in the background; the VM
        // counts as receiving (and the chain stays locked) until then, so the next attempt
        // does not open the layers while qemu-nbd still holds them.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { abort_open(&vm, id, o, keep).await });
            }
            Err(_) => {
                // No runtime to close the nodes over QMP: stop the daemon (a new one starts
                // on next use), so that it holds no image lock.
                vm.qsd.stop();
                let Open { layers, chain, .. } = o;
                if !keep {
                    remove_layers(&layers);
                }
                let mut st = lock(&vm.st);
                if st.receiving == Some(id) {
                    st.receiving = None;
                }
                drop(st);
                drop(chain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::{CycleConsistency, DiskInfo};

    fn header(
        id: CycleId,
        base: Option<CycleId>,
        kind: CycleKind,
        disks: &[(&str, u64)],
    ) -> CycleHeader {
        CycleHeader {
            vm: Uuid::nil(),
            id,
            base,
            kind,
            consistency: CycleConsistency::CrashConsistent,
            taken_at_ms: 0,
            disks: disks
                .iter()
                .map(|(d, s)| DiskInfo {
                    id: (*d).to_owned(),
                    size: *s,
                })
                .collect(),
            group: None,
        }
    }

    fn vm(dir: &Path, points: &[(CycleId, &str)]) -> Vm {
        let points = points
            .iter()
            .map(|(id, file)| PointRecord {
                id: *id,
                taken_at_ms: 0,
                kind: PointKind::CrashConsistent,
                layers: vec![LayerRecord {
                    disk: "d0".into(),
                    size: 1 << 20,
                    file: (*file).to_owned(),
                    backing: None,
                }],
                pruning: false,
                group: None,
            })
            .collect();
        Vm {
            id: Uuid::nil(),
            dir: dir.to_owned(),
            fs: Arc::new(crate::storage::RealStorage),
            qsd: Arc::new(crate::daemon::Daemon::new(dir)),
            chain: Arc::new(tokio::sync::Mutex::new(())),
            st: Mutex::new(VmState {
                catalog: Catalog {
                    vm: Uuid::nil(),
                    generation: 1,
                    retention: RetentionPolicy::default(),
                    points,
                    views: vec![],
                },
                receiving: None,
                holds: Default::default(),
                keeps: Default::default(),
            }),
        }
    }

    fn layers(a: Result<Admit, StoreError>) -> Vec<(String, String, Option<String>)> {
        match a {
            Ok(Admit::Write { layers, .. }) => layers
                .into_iter()
                .map(|l| (l.disk, l.file, l.backing))
                .collect(),
            Ok(Admit::Duplicate) => panic!("unexpected duplicate"),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn only_a_resync_keeps_qemus_flushes_of_its_layers() {
        // A resync's layers are kept after an interruption and resumed: QEMU must order and
        // flush them. The others' are deleted unread unless the commit's fsync ran.
        use CycleKind::*;
        assert_eq!(
            layer_options(Full),
            (WriteCache::Direct, LayerFlush::AtCommit)
        );
        assert_eq!(
            layer_options(Incremental),
            (WriteCache::Buffered, LayerFlush::AtCommit)
        );
        assert_eq!(
            layer_options(Resync),
            (WriteCache::Buffered, LayerFlush::Ordered)
        );
    }

    #[test]
    fn admission_is_one_table_for_every_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = vm(dir.path(), &[]);
        let v = vm(dir.path(), &[(1, "base.qcow2"), (2, "c000002.qcow2")]);
        let admit = |v: &Vm, h: CycleHeader| lock(&v.st).admit(v, &h, None);
        let one = [("d0", 1 << 20)];
        use CycleKind::*;
        // First full cycle: base.qcow2 without backing.
        assert_eq!(
            layers(admit(&empty, header(1, None, Full, &one))),
            vec![(s("d0"), s("base.qcow2"), None)]
        );
        // An incremental on an empty replica has the wrong base.
        assert!(matches!(
            admit(&empty, header(2, Some(1), Incremental, &one)),
            Err(StoreError::WrongBase {
                expected: None,
                got: Some(1)
            })
        ));
        // Duplicates, whatever the kind.
        for (id, base, kind) in [
            (2, Some(1), Incremental),
            (1, None, Full),
            (2, Some(1), Resync),
        ] {
            assert!(matches!(
                admit(&v, header(id, base, kind, &one)),
                Ok(Admit::Duplicate)
            ));
        }
        // Wrong base for incremental and resync alike.
        for kind in [Incremental, Resync] {
            assert!(matches!(
                admit(&v, header(5, Some(1), kind, &one)),
                Err(StoreError::WrongBase {
                    expected: Some(2),
                    got: Some(1)
                })
            ));
        }
        // Incremental: on top of the latest layer; a new disk starts its own chain.
        assert_eq!(
            layers(admit(
                &v,
                header(3, Some(2), Incremental, &[("d0", 1 << 20), ("d1", 4096)])
            )),
            vec![
                (s("d0"), s("c000003.qcow2"), Some(s("c000002.qcow2"))),
                (s("d1"), s("base-c000003.qcow2"), None)
            ]
        );
        // A later full cycle starts a new chain; a resync writes rs<base>.
        assert_eq!(
            layers(admit(&v, header(7, None, Full, &one))),
            vec![(s("d0"), s("base-c000007.qcow2"), None)]
        );
        assert_eq!(
            layers(admit(&v, header(3, Some(2), Resync, &one))),
            vec![(s("d0"), s("rs000002.qcow2"), Some(s("c000002.qcow2")))]
        );
        // Shrinking a disk is refused; a second receive is refused.
        assert!(matches!(
            admit(&v, header(3, Some(2), Incremental, &[("d0", 4096)])),
            Err(StoreError::DiskShrunk { .. })
        ));
        lock(&v.st).receiving = Some(3);
        assert!(matches!(
            admit(&v, header(3, Some(2), Incremental, &one)),
            Err(StoreError::ReceiveInProgress(3))
        ));
        lock(&v.st).receiving = None;
        // A pending resync on the same base with its files present is resumed.
        let rs = LayerRecord {
            disk: s("d0"),
            size: 1 << 20,
            file: s("rs000002.qcow2"),
            backing: Some(s("c000002.qcow2")),
        };
        let pending = resync::Pending {
            base: 2,
            layers: vec![rs],
        };
        let h = header(3, Some(2), Resync, &one);
        let resumed = |v: &Vm| {
            matches!(
                lock(&v.st).admit(v, &h, Some(&pending)),
                Ok(Admit::Write { resume: true, .. })
            )
        };
        assert!(!resumed(&v), "layer file missing: not resumed");
        std::fs::create_dir_all(dir.path().join("disks/d0")).expect("mkdir");
        std::fs::write(dir.path().join("disks/d0/rs000002.qcow2"), b"x").expect("write");
        assert!(resumed(&v));
    }
}
