//! The replica store: per-VM directories, the catalog commit, recovery, pruning and failover
//! views; cycles are written by the one layer writer (`store/cycle.rs`) straight into a new
//! qcow2 layer per disk per cycle.
//!
//! Locking: a store-wide `std` mutex guards only the VM table. Per VM, `st` (a `std` mutex,
//! never held across `.await`) guards the in-memory catalog and staging state and serialises
//! catalog writes; `chain` (a tokio mutex) serialises the operations that open the VM's qcow2
//! chain with QEMU (a cycle being written, one prune step, recovery, view creation), because
//! QEMU's image locking forbids writing a layer that another QEMU process (the store's daemon,
//! a qemu-nbd) holds as a backing file.
//! Different VMs never wait for each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;
use vmr_proto::clock::now_ms;
use vmr_proto::store::{
    Catalog, LayerRecord, PointKind, PointRecord, RecoveryPoint, RetentionPolicy, ViewRecord,
};
use vmr_proto::{
    CheckedExtent, ChecksumScheme, CycleHeader, CycleId, CycleKind, Extent, ExtentData,
};

use crate::daemon::Daemon;
use crate::error::{Corruption, CycleFault, ImportFault, StoreError};
use crate::fsio::{self, Gate, gate_point, pause_point};
use crate::pipeline::Pipeline;
use crate::qemu::{self, Export};
use crate::retention::{Plan, PointMeta, plan, retention};
use crate::staging::{self, StageReader};
use crate::storage::{RealStorage, Storage};
use crate::{catalog, fsio::TMP_SUFFIX};

mod cycle;
mod import;
mod indexed;
mod resync;
mod source;
mod verify;

pub use cycle::LayerWriter;
pub use import::{ImageFormat, ImportImage, ImportPos, ImportProgress, find_images};
pub use source::{Change, DiskChanges, PointHold, PointKeep, PointReader};
pub use verify::{CheckKind, FileCheck};

/// Name of the VM definition file.
const DEFINITION: &str = "vm.toml";
/// Name of the catalog file.
const CATALOG: &str = "catalog.json";

/// A replica store rooted at one directory. Cheap to clone; usable from many tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .finish()
    }
}

struct Inner {
    root: PathBuf,
    fs: Arc<dyn Storage>,
    /// The store's qemu-storage-daemon, shared by every VM's layer writers.
    qsd: Arc<Daemon>,
    vms: Mutex<HashMap<Uuid, Arc<Vm>>>,
    /// The block-hash indexes loaded last (`store/indexed.rs`).
    index_cache: indexed::Cache,
}

struct Vm {
    id: Uuid,
    dir: PathBuf,
    /// The storage seam every durable write and fsync of the store goes through.
    fs: Arc<dyn Storage>,
    /// The store's qemu-storage-daemon (the layer writer exports its layers there).
    qsd: Arc<Daemon>,
    chain: Arc<tokio::sync::Mutex<()>>,
    st: Mutex<VmState>,
}

struct VmState {
    catalog: Catalog,
    receiving: Option<CycleId>,
    /// Points held in memory by readers (`store/source.rs`: an extended cycle reading a
    /// point): pinned like a view's point while held, never persisted.
    holds: std::collections::BTreeMap<CycleId, u32>,
    /// Points kept in memory (`store/source.rs`: the point an extended replica acknowledged
    /// last): never pruned themselves while kept, though older points may merge into them.
    keeps: std::collections::BTreeMap<CycleId, u32>,
}

impl VmState {
    fn latest_point(&self) -> Option<CycleId> {
        self.catalog.points.last().map(|p| p.id)
    }

    /// Refuse a cycle that would shrink a disk: replica disks only ever grow (a grown disk
    /// needs no resync: its new layer is simply larger than the one below).
    fn check_no_shrink(&self, h: &CycleHeader) -> Result<(), StoreError> {
        if h.kind == CycleKind::Full {
            return Ok(());
        }
        let sizes: Vec<(&str, u64)> = self
            .catalog
            .points
            .last()
            .map(|p| p.layers.iter().map(|l| (l.disk.as_str(), l.size)).collect())
            .unwrap_or_default();
        for d in &h.disks {
            if let Some(&(_, was)) = sizes.iter().find(|(id, _)| *id == d.id)
                && d.size < was
            {
                return Err(StoreError::DiskShrunk {
                    disk: d.id.clone(),
                    was,
                    now: d.size,
                });
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failover view: qcow2 overlays on top of one point's layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// View id (for [`Store::remove_view`]).
    pub id: Uuid,
    /// The VM.
    pub vm: Uuid,
    /// The pinned point.
    pub point: CycleId,
    /// Overlay path per disk id.
    pub disks: Vec<(String, PathBuf)>,
}

/// Space used by one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUsage {
    /// Allocated bytes per point (its own layer files).
    pub points: Vec<(CycleId, u64)>,
    /// Allocated bytes of `staging/` (cycle files of an older version not yet replayed).
    pub staging_bytes: u64,
    /// Everything under the VM's directory.
    pub total_bytes: u64,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Name prefix of a VM directory being removed (`Store::remove_vm`).
const REMOVED_PREFIX: &str = ".removed-";

fn layer_name(id: CycleId) -> String {
    format!("c{id:06}.qcow2")
}

fn stage_id(name: &str) -> Option<CycleId> {
    name.strip_prefix('c')?.strip_suffix(".stage")?.parse().ok()
}

fn validate_header(h: &CycleHeader) -> Result<(), StoreError> {
    let bad = |f: CycleFault| Err(StoreError::InvalidCycle(f));
    if h.disks.is_empty() {
        return bad(CycleFault::NoDisks);
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &h.disks {
        if !valid_name(&d.id) || !seen.insert(d.id.as_str()) {
            return bad(CycleFault::BadDiskId(d.id.clone()));
        }
        if d.size == 0 {
            return bad(CycleFault::EmptyDisk(d.id.clone()));
        }
    }
    match (h.kind, h.base) {
        (CycleKind::Full, None) => Ok(()),
        (CycleKind::Full, Some(_)) => bad(CycleFault::FullWithBase),
        (_, None) => bad(CycleFault::NoBase),
        (_, Some(b)) if b >= h.id => bad(CycleFault::BaseNotOlder { base: b, id: h.id }),
        _ => Ok(()),
    }
}

fn check_extent(h: &CycleHeader, e: &Extent) -> Result<(), StoreError> {
    let d = h
        .disks
        .get(e.disk as usize)
        .ok_or(StoreError::InvalidCycle(CycleFault::NoSuchDisk(e.disk)))?;
    if matches!(e.data, ExtentData::Data(ref b) if b.len() as u64 > staging::MAX_EXTENT_BYTES) {
        return Err(StoreError::InvalidCycle(CycleFault::ExtentTooLarge(
            e.len(),
        )));
    }
    match e.offset.checked_add(e.len()) {
        Some(end) if end <= d.size => Ok(()),
        _ => Err(StoreError::InvalidCycle(CycleFault::ExtentOutOfRange {
            offset: e.offset,
            len: e.len(),
            disk: d.id.clone(),
            size: d.size,
        })),
    }
}

impl Vm {
    fn catalog_path(&self) -> PathBuf {
        self.dir.join(CATALOG)
    }
    fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }
    fn disk_dir(&self, disk: &str) -> PathBuf {
        self.dir.join("disks").join(disk)
    }

    /// Write `new` durably and make it the in-memory catalog (generation bumped).
    fn commit(&self, st: &mut VmState, mut new: Catalog) -> Result<(), StoreError> {
        new.generation = st.catalog.generation + 1;
        self.fs
            .write_atomic(&self.catalog_path(), &catalog::encode(&new)?)?;
        st.catalog = new;
        Ok(())
    }

    fn point_info(&self, c: &Catalog, p: &PointRecord) -> RecoveryPoint {
        RecoveryPoint {
            id: p.id,
            taken_at_ms: p.taken_at_ms,
            kind: p.kind,
            size_on_disk: p
                .layers
                .iter()
                .map(|l| fsio::allocated_bytes(&self.disk_dir(&l.disk).join(&l.file)))
                .sum(),
            views: c.views.iter().filter(|v| v.point == p.id).count() as u32,
            disks: p.layers.iter().map(|l| (l.disk.clone(), l.size)).collect(),
        }
    }

    fn load(
        id: Uuid,
        dir: PathBuf,
        fs: Arc<dyn Storage>,
        qsd: Arc<Daemon>,
    ) -> Result<Vm, StoreError> {
        let cat = catalog::read(&dir.join(CATALOG))?;
        if cat.vm != id {
            return Err(StoreError::corrupt(
                dir.join(CATALOG),
                Corruption::CatalogOfOtherVm,
            ));
        }
        Ok(Vm {
            id,
            dir,
            fs,
            qsd,
            chain: Arc::new(tokio::sync::Mutex::new(())),
            st: Mutex::new(VmState {
                catalog: cat,
                receiving: None,
                holds: Default::default(),
                keeps: Default::default(),
            }),
        })
    }
}

impl Store {
    /// Open (creating if needed) a store rooted at `root` and load every VM's catalog and
    /// staged cycles. Nothing is applied or deleted; call [`Store::recover`] next. One process
    /// owns a store root at a time.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, Arc::new(RealStorage))
    }

    /// [`Store::open`] on the fault-injecting storage backend (tests only: feature
    /// `failpoints`, never in release builds).
    #[cfg(feature = "failpoints")]
    pub fn open_with_faults(
        root: &Path,
        fs: Arc<crate::storage::FaultStorage>,
    ) -> Result<Store, StoreError> {
        Store::open_with(root, fs)
    }

    /// [`Store::open`] with another storage backend.
    pub(crate) fn open_with(root: &Path, fs: Arc<dyn Storage>) -> Result<Store, StoreError> {
        let vms_dir = root.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|e| StoreError::io("create", &vms_dir, e))?;
        let qsd = Arc::new(Daemon::new(root));
        let mut vms = HashMap::new();
        let rd = std::fs::read_dir(&vms_dir)
            .map_err(|e| StoreError::io("read directory", &vms_dir, e))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(REMOVED_PREFIX) {
                // A removal interrupted after its rename: finish it.
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            let Ok(id) = Uuid::parse_str(&name) else {
                continue;
            };
            if !e.path().join(CATALOG).exists() {
                continue; // registration never completed
            }
            vms.insert(
                id,
                Arc::new(Vm::load(id, e.path(), fs.clone(), qsd.clone())?),
            );
        }
        Ok(Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                fs,
                qsd,
                vms: Mutex::new(vms),
                index_cache: indexed::Cache::default(),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn vm(&self, id: Uuid) -> Result<Arc<Vm>, StoreError> {
        lock(&self.inner.vms)
            .get(&id)
            .cloned()
            .ok_or(StoreError::UnknownVm(id))
    }

    /// Registered VMs.
    pub fn vms(&self) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = lock(&self.inner.vms).keys().copied().collect();
        v.sort();
        v
    }

    /// Register a VM with its definition (TOML text, stored as given) and retention policy.
    pub fn add_vm(
        &self,
        vm: Uuid,
        definition_toml: &str,
        policy: RetentionPolicy,
    ) -> Result<(), StoreError> {
        check_definition(vm, definition_toml)?;
        let mut vms = lock(&self.inner.vms);
        if vms.contains_key(&vm) {
            return Err(StoreError::VmExists(vm));
        }
        let dir = self.inner.root.join("vms").join(vm.to_string());
        for d in [dir.join("staging"), dir.join("disks")] {
            std::fs::create_dir_all(&d).map_err(|e| StoreError::io("create", &d, e))?;
        }
        let fs = &self.inner.fs;
        fs.write_atomic(&dir.join(DEFINITION), definition_toml.as_bytes())?;
        let cat = Catalog {
            vm,
            generation: 1,
            retention: policy,
            points: vec![],
            views: vec![],
        };
        fs.write_atomic(&dir.join(CATALOG), &catalog::encode(&cat)?)?;
        fs.fsync_dir(&self.inner.root.join("vms"))?;
        vms.insert(
            vm,
            Arc::new(Vm {
                id: vm,
                dir,
                fs: fs.clone(),
                qsd: self.inner.qsd.clone(),
                chain: Arc::new(tokio::sync::Mutex::new(())),
                st: Mutex::new(VmState {
                    catalog: cat,
                    receiving: None,
                    holds: Default::default(),
                    keeps: Default::default(),
                }),
            }),
        );
        Ok(())
    }

    /// Forget a VM and delete its directory (catalog, definition, layers, staging):
    /// `vmreplica replica remove`. Refused while a cycle is being received; the caller (the
    /// VM's owner) makes sure no view of it exists.
    pub fn remove_vm(&self, vm: Uuid) -> Result<(), StoreError> {
        let v = {
            let mut vms = lock(&self.inner.vms);
            let v = vms.get(&vm).cloned().ok_or(StoreError::UnknownVm(vm))?;
            if let Some(id) = lock(&v.st).receiving {
                return Err(StoreError::ReceiveInProgress(id));
            }
            vms.remove(&vm);
            v
        };
        // One rename removes the VM (durable with the directory fsync); a crash while its files
        // are deleted leaves a `.removed-` directory that the next open deletes.
        let vms_dir = self.inner.root.join("vms");
        let gone = vms_dir.join(format!("{REMOVED_PREFIX}{vm}"));
        if gone.exists() {
            std::fs::remove_dir_all(&gone).map_err(|e| StoreError::io("remove", &gone, e))?;
        }
        std::fs::rename(&v.dir, &gone).map_err(|e| StoreError::io("rename", &v.dir, e))?;
        self.inner.fs.fsync_dir(&vms_dir)?;
        std::fs::remove_dir_all(&gone).map_err(|e| StoreError::io("remove", &gone, e))
    }

    /// Replace a VM's definition (TOML text).
    pub fn set_definition(&self, vm: Uuid, definition_toml: &str) -> Result<(), StoreError> {
        check_definition(vm, definition_toml)?;
        let v = self.vm(vm)?;
        let _st = lock(&v.st);
        v.fs.write_atomic(&v.dir.join(DEFINITION), definition_toml.as_bytes())
    }

    /// A VM's definition as stored (TOML text).
    pub fn definition(&self, vm: Uuid) -> Result<String, StoreError> {
        let v = self.vm(vm)?;
        let p = v.dir.join(DEFINITION);
        std::fs::read_to_string(&p).map_err(|e| StoreError::io("read", &p, e))
    }

    /// Change a VM's retention policy (takes effect at the next prune).
    pub fn set_retention(&self, vm: Uuid, policy: RetentionPolicy) -> Result<(), StoreError> {
        let v = self.vm(vm)?;
        let mut st = lock(&v.st);
        let mut c = st.catalog.clone();
        c.retention = policy;
        v.commit(&mut st, c)
    }

    /// The VM's retention policy.
    pub fn retention_policy(&self, vm: Uuid) -> Result<RetentionPolicy, StoreError> {
        Ok(lock(&self.vm(vm)?.st).catalog.retention.clone())
    }

    /// What `policy` (the VM's own policy when `None`) keeps of the committed points at
    /// `now_ms`, and why; changes nothing (`vmreplica points`, `points --estimate`).
    pub fn retention_plan(
        &self,
        vm: Uuid,
        policy: Option<&RetentionPolicy>,
        now_ms: u64,
    ) -> Result<Plan, StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let c = &st.catalog;
        Ok(plan(
            &point_metas(c),
            policy.unwrap_or(&c.retention),
            now_ms,
        ))
    }

    /// Committed recovery points, oldest first.
    pub fn points(&self, vm: Uuid) -> Result<Vec<RecoveryPoint>, StoreError> {
        let v = self.vm(vm)?;
        let c = lock(&v.st).catalog.clone();
        Ok(c.points
            .iter()
            .filter(|p| !p.pruning)
            .map(|p| v.point_info(&c, p))
            .collect())
    }

    /// Each committed point's id with the consistency group point it belongs to, oldest
    /// first, from the catalog in memory (docs/groups.md).
    pub fn group_tags(
        &self,
        vm: Uuid,
    ) -> Result<Vec<(CycleId, Option<vmr_proto::GroupTag>)>, StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        Ok(st
            .catalog
            .points
            .iter()
            .filter(|p| !p.pruning)
            .map(|p| (p.id, p.group.clone()))
            .collect())
    }

    /// The latest committed point's id.
    pub fn latest_point(&self, vm: Uuid) -> Result<Option<CycleId>, StoreError> {
        Ok(lock(&self.vm(vm)?.st).latest_point())
    }

    /// How many committed points the VM has and the latest one's cut time (ms since the
    /// epoch), from the catalog in memory: no file is read (monitoring asks this often).
    pub fn point_summary(&self, vm: Uuid) -> Result<(u64, Option<u64>), StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let live = st.catalog.points.iter().filter(|p| !p.pruning);
        let latest = live.clone().map(|p| p.taken_at_ms).max();
        Ok((live.count() as u64, latest))
    }

    /// The latest cycle the replica has (its latest point): the base the next incremental
    /// cycle must name.
    pub fn latest_cycle(&self, vm: Uuid) -> Result<Option<CycleId>, StoreError> {
        Ok(lock(&self.vm(vm)?.st).latest_point())
    }

    /// The layer file of each disk at `point` (None = latest): open these read-only, or
    /// better, make a view.
    pub fn point_layers(
        &self,
        vm: Uuid,
        point: Option<CycleId>,
    ) -> Result<Vec<(String, PathBuf)>, StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let p = find_point(&st.catalog, point)?;
        Ok(p.layers
            .iter()
            .map(|l| (l.disk.clone(), v.disk_dir(&l.disk).join(&l.file)))
            .collect())
    }

    /// Space accounting for one VM.
    pub fn usage(&self, vm: Uuid) -> Result<VmUsage, StoreError> {
        let v = self.vm(vm)?;
        let c = lock(&v.st).catalog.clone();
        Ok(VmUsage {
            points: c
                .points
                .iter()
                .map(|p| (p.id, v.point_info(&c, p).size_on_disk))
                .collect(),
            staging_bytes: fsio::allocated_tree(&v.staging_dir()),
            total_bytes: fsio::allocated_tree(&v.dir),
        })
    }

    /// Startup recovery: finish interrupted prunes, delete the pending layers of interrupted
    /// cycles (a pending resync's are kept for resuming) and stray temporary files, then
    /// replay cycle files staged by an older version of the store.
    pub async fn recover(&self) -> Result<(), StoreError> {
        // A qemu-storage-daemon a crashed store left would hold its layers' image locks.
        self.inner.qsd.kill_leftover().await?;
        for vm in self.vms() {
            let v = self.vm(vm)?;
            {
                let _chain = v.chain.lock().await;
                let pruning: Vec<CycleId> = lock(&v.st)
                    .catalog
                    .points
                    .iter()
                    .filter(|p| p.pruning)
                    .map(|p| p.id)
                    .collect();
                for id in pruning {
                    prune_one(&v, id, true).await?;
                }
                remove_strays(&v)?;
            }
            self.replay_staged(&v).await?;
        }
        Ok(())
    }

    /// Cycles an older version of the store staged (`staging/c<id>.stage`, acknowledged but
    /// not applied) go through the layer writer like any cycle, oldest first, then are deleted.
    /// One that is unreadable or no longer fits is dropped (the primary then gets `WrongBase`
    /// and resyncs).
    async fn replay_staged(&self, v: &Arc<Vm>) -> Result<(), StoreError> {
        let sdir = v.staging_dir();
        let mut files: Vec<(CycleId, PathBuf)> = match std::fs::read_dir(&sdir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    stage_id(&name).map(|id| (id, e.path()))
                })
                .collect(),
            Err(_) => return Ok(()),
        };
        files.sort();
        for (id, path) in files {
            match self.stream_stage_file(&path, Some(v.id), &|_| ()).await {
                Ok(_) => {}
                Err(e) if e.is_disk_full() => return Err(e),
                Err(e) => {
                    tracing::error!(vm = %v.id, cycle = id, error = %e, "dropping a staged cycle");
                }
            }
            let _ = std::fs::remove_file(&path);
            v.fs.fsync_dir(&sdir)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- prune

    /// Apply the retention policy now; returns the ids of the points merged away.
    pub async fn prune(&self, vm: Uuid) -> Result<Vec<CycleId>, StoreError> {
        self.prune_at(vm, now_ms()).await
    }

    /// [`Store::prune`] with an explicit clock (ms since the Unix epoch).
    pub async fn prune_at(&self, vm: Uuid, now_ms: u64) -> Result<Vec<CycleId>, StoreError> {
        let v = self.vm(vm)?;
        let candidates = {
            let st = lock(&v.st);
            let c = &st.catalog;
            let mut d = retention(&point_metas(c), &c.retention, now_ms);
            d.extend(c.points.iter().filter(|p| p.pruning).map(|p| p.id));
            d.sort_unstable();
            d
        };
        let mut dropped = Vec::new();
        for id in candidates {
            // One point per chain-lock hold: an apply waits for at most one merge.
            let _chain = v.chain.lock().await;
            if prune_one(&v, id, false).await? {
                dropped.push(id);
            }
        }
        Ok(dropped)
    }

    /// What retention decides from for one VM: its live points (oldest first) with the group
    /// point each belongs to, and its policy. The agent feeds these, for every member of a
    /// VM's consistency groups, to `vmr_core::group::group_retention` (docs/groups.md).
    pub fn retention_inputs(&self, vm: Uuid) -> Result<RetentionInputs, StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let c = &st.catalog;
        let pts = c
            .points
            .iter()
            .filter(|p| !p.pruning)
            .map(|p| {
                (
                    PointMeta {
                        id: p.id,
                        taken_at_ms: p.taken_at_ms,
                        kind: p.kind,
                    },
                    p.group.clone(),
                )
            })
            .collect();
        Ok((pts, c.retention.clone()))
    }

    /// Merge away the points `drop` names (a decision made outside the store, e.g. a
    /// consistency group's retention) and every point already marked as being pruned. The
    /// latest point, points pinned by a view and ids the VM does not hold are left alone.
    /// Returns the ids merged away.
    pub async fn prune_points(
        &self,
        vm: Uuid,
        drop: &[CycleId],
    ) -> Result<Vec<CycleId>, StoreError> {
        let v = self.vm(vm)?;
        let candidates = {
            let st = lock(&v.st);
            let c = &st.catalog;
            let latest = c.points.iter().filter(|p| !p.pruning).map(|p| p.id).max();
            let mut d: Vec<CycleId> = c
                .points
                .iter()
                .filter(|p| p.pruning || (drop.contains(&p.id) && Some(p.id) != latest))
                .map(|p| p.id)
                .collect();
            d.sort_unstable();
            d
        };
        let mut dropped = Vec::new();
        for id in candidates {
            let _chain = v.chain.lock().await;
            if prune_one(&v, id, false).await? {
                dropped.push(id);
            }
        }
        Ok(dropped)
    }

    /// Failover "complete": keep only point `keep` (None = latest), drop every other point. Points pinned by views other than `keep` make this fail.
    pub async fn discard_points_except(
        &self,
        vm: Uuid,
        keep: Option<CycleId>,
    ) -> Result<(), StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        let (keep, ids) = {
            let st = lock(&v.st);
            let keep = find_point(&st.catalog, keep)?.id;
            if let Some(view) = st.catalog.views.iter().find(|w| w.point != keep) {
                return Err(StoreError::ViewPinsPoint {
                    view: view.id,
                    point: view.point,
                });
            }
            (
                keep,
                st.catalog.points.iter().map(|p| p.id).collect::<Vec<_>>(),
            )
        };
        for id in ids.iter().rev().filter(|i| **i > keep) {
            prune_one(&v, *id, true).await?;
        }
        for id in ids.iter().filter(|i| **i < keep) {
            prune_one(&v, *id, true).await?;
        }
        Ok(())
    }

    /// Failover "complete" while the failed-over VM runs on a view of `keep`: drop every point
    /// above `keep` (newest first; nothing backs onto them). The
    /// points below `keep` are its backing chain; a running VM holds `keep`'s layers, so they
    /// cannot be merged now ([`Store::discard_points_except`] does that when nothing runs).
    pub async fn discard_points_above(&self, vm: Uuid, keep: CycleId) -> Result<(), StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        let ids = {
            let st = lock(&v.st);
            let keep = find_point(&st.catalog, Some(keep))?.id;
            if let Some(view) = st.catalog.views.iter().find(|w| w.point > keep) {
                return Err(StoreError::ViewPinsPoint {
                    view: view.id,
                    point: view.point,
                });
            }
            st.catalog
                .points
                .iter()
                .map(|p| p.id)
                .filter(|i| *i > keep)
                .collect::<Vec<_>>()
        };
        for id in ids.iter().rev() {
            prune_one(&v, *id, true).await?;
        }
        Ok(())
    }

    /// Reverse replication: make existing qcow2 images (the old primary's disks, identical to
    /// the new primary's point `id`) the VM's first point without copying them. Each disk gets
    /// a layer `base-c<id>.qcow2` backed by the image's absolute path (recorded as the layer's
    /// backing, so pruning rebases onto it). The VM must have no point yet.
    pub async fn import_point(
        &self,
        vm: Uuid,
        id: CycleId,
        taken_at_ms: u64,
        disks: &[(String, PathBuf, u64)],
    ) -> Result<RecoveryPoint, StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        if !lock(&v.st).catalog.points.is_empty() {
            return Err(StoreError::InvalidImport(ImportFault::HasPoints));
        }
        let mut layers = Vec::new();
        for (disk, image, size) in disks {
            if !valid_name(disk) || *size == 0 {
                return Err(StoreError::InvalidImport(ImportFault::BadDisk(
                    disk.clone(),
                )));
            }
            let dir = v.disk_dir(disk);
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
            let image = image
                .canonicalize()
                .map_err(|e| StoreError::io("resolve", image, e))?
                .display()
                .to_string();
            let file = format!("base-c{id:06}.qcow2");
            let _ = std::fs::remove_file(dir.join(&file));
            qemu::create_layer(&dir, &file, *size, Some(&image), false).await?;
            v.fs.fsync_file(&dir.join(&file))?;
            v.fs.fsync_dir(&dir)?;
            // Its content is an outside image's: no block-hash index (not even a stray one).
            v.clear_index(disk, id)?;
            layers.push(LayerRecord {
                disk: disk.clone(),
                size: *size,
                file,
                backing: Some(image),
            });
        }
        let mut st = lock(&v.st);
        let mut c = st.catalog.clone();
        c.points.push(PointRecord {
            id,
            taken_at_ms,
            kind: PointKind::Planned,
            layers,
            pruning: false,
            group: None,
        });
        v.commit(&mut st, c)?;
        let c = st.catalog.clone();
        let p = find_point(&c, Some(id))?;
        Ok(v.point_info(&c, p))
    }

    /// Re-adopt a failover view as a new point (failover ping-pong: this host was the VM's
    /// replica, ran it failed over on `view` and now becomes its replica again from point
    /// `id`). The view's overlays hold the view's point plus everything the VM wrote on them,
    /// so they become point `id`'s layers in the existing chain; nothing is copied. Steps
    /// (the catalog rename stays the only commit point):
    ///
    /// 1. points above the view's point are dropped (a branch the overlays are not on);
    /// 2. each overlay gets a second name `c<id>.qcow2` in its disk directory (a hard link;
    ///    on another file system a copy of the overlay, written under a temporary name,
    ///    fsynced, renamed), directory fsynced;
    /// 3. commit: point `id` (layers `c<id>.qcow2` backed by the view point's layers) is
    ///    added, the view record removed, the retention `policy` set;
    /// 4. each new layer's header is rewritten to name its backing relatively (it named the
    ///    same file by absolute path: same content either way), fsynced;
    /// 5. the overlays' old names are removed.
    ///
    /// A crash before 3 leaves the links as strays (removed by `recover`; the view and its
    /// overlays are untouched); after 3 the point exists and an absolute header is read as
    /// the relative name it equals. The new point has no block-hash index (a resync reads it).
    pub async fn readopt_view(
        &self,
        vm: Uuid,
        view: Uuid,
        id: CycleId,
        taken_at_ms: u64,
        policy: RetentionPolicy,
    ) -> Result<RecoveryPoint, StoreError> {
        let v = self.vm(vm)?;
        let _chain = v.chain.lock().await;
        let (rec, base) = {
            let st = lock(&v.st);
            let rec = st
                .catalog
                .views
                .iter()
                .find(|w| w.id == view)
                .cloned()
                .ok_or(StoreError::NoSuchView(view))?;
            if let Some(other) = st.catalog.views.iter().find(|w| w.id != view) {
                return Err(StoreError::ViewPinsPoint {
                    view: other.id,
                    point: other.point,
                });
            }
            if id <= rec.point {
                return Err(StoreError::PointNotNewer {
                    id,
                    latest: rec.point,
                });
            }
            (
                rec.clone(),
                find_point(&st.catalog, Some(rec.point))?.clone(),
            )
        };
        // 1. The points above the view's are not on the overlays' chain.
        let above: Vec<CycleId> = lock(&v.st)
            .catalog
            .points
            .iter()
            .map(|p| p.id)
            .filter(|p| *p > rec.point)
            .collect();
        for p in above.iter().rev() {
            prune_one(&v, *p, true).await?;
        }
        // 2. Second names in the store.
        let file = layer_name(id);
        let mut layers = Vec::new();
        for l in &base.layers {
            let (_, overlay) = rec
                .disks
                .iter()
                .find(|(d, _)| d == &l.disk)
                .ok_or_else(|| {
                    StoreError::corrupt(
                        v.catalog_path(),
                        Corruption::ViewLacksDisk {
                            view,
                            disk: l.disk.clone(),
                        },
                    )
                })?;
            let dir = v.disk_dir(&l.disk);
            let target = dir.join(&file);
            match std::fs::remove_file(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &target, e)),
            }
            link_or_copy(&*v.fs, Path::new(overlay), &target)?;
            v.fs.fsync_dir(&dir)?;
            v.clear_index(&l.disk, id)?;
            layers.push(LayerRecord {
                disk: l.disk.clone(),
                size: l.size,
                file: file.clone(),
                backing: Some(l.file.clone()),
            });
        }
        pause_point("readopt-linked");
        // 3. Commit.
        let point = {
            let mut st = lock(&v.st);
            let mut c = st.catalog.clone();
            c.views.retain(|w| w.id != view);
            c.retention = policy;
            c.points.push(PointRecord {
                id,
                taken_at_ms,
                kind: PointKind::Planned,
                layers: layers.clone(),
                pruning: false,
                group: None,
            });
            v.commit(&mut st, c)?;
            let c = st.catalog.clone();
            v.point_info(&c, find_point(&c, Some(id))?)
        };
        pause_point("readopt-committed");
        // 4. Relative backing names; 5. the overlays' old names go.
        for l in &layers {
            let dir = v.disk_dir(&l.disk);
            qemu::rebase_unsafe(&dir, &l.file, l.backing.as_deref()).await?;
            v.fs.fsync_file(&dir.join(&l.file))?;
        }
        for (_, overlay) in &rec.disks {
            let overlay = Path::new(overlay);
            match std::fs::remove_file(overlay) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", overlay, e)),
            }
            if let Some(d) = overlay.parent() {
                v.fs.fsync_dir(d)?;
            }
        }
        Ok(point)
    }

    // ---------------------------------------------------------------- views

    /// Create a failover view of `point` (None = latest) in `dest`: one qcow2 overlay per
    /// disk on top of the point's layer. Instant whatever the disk size; the point is pinned
    /// (never pruned) until [`Store::remove_view`].
    pub async fn create_view(
        &self,
        vm: Uuid,
        point: Option<CycleId>,
        dest: &Path,
    ) -> Result<View, StoreError> {
        let v = self.vm(vm)?;
        // Not while a prune step runs: a prune that merges a layer down into the base deletes
        // the upper layer's file, which the overlays would back onto. Waits for at most one
        // merge step (the prune releases the lock between dropped points).
        let _chain = v.chain.lock().await;
        std::fs::create_dir_all(dest).map_err(|e| StoreError::io("create", dest, e))?;
        let dest = dest
            .canonicalize()
            .map_err(|e| StoreError::io("resolve", dest, e))?;
        let id = Uuid::new_v4();
        let (p, rec) = {
            let mut st = lock(&v.st);
            let p = find_point(&st.catalog, point)?.clone();
            let disks: Vec<(String, String)> = p
                .layers
                .iter()
                .map(|l| {
                    (
                        l.disk.clone(),
                        dest.join(format!("{}.qcow2", l.disk)).display().to_string(),
                    )
                })
                .collect();
            if let Some((_, clash)) = disks.iter().find(|(_, path)| Path::new(path).exists()) {
                return Err(StoreError::io(
                    "create view",
                    clash,
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            let rec = ViewRecord {
                id,
                point: p.id,
                disks,
            };
            let mut c = st.catalog.clone();
            c.views.push(rec.clone());
            v.commit(&mut st, c)?;
            (p, rec)
        };
        let made = async {
            for (l, (_, path)) in p.layers.iter().zip(&rec.disks) {
                let backing = v.disk_dir(&l.disk).join(&l.file);
                let backing = backing.display().to_string();
                qemu::create_layer(&dest, path, l.size, Some(&backing), true).await?;
                v.fs.fsync_file(Path::new(path))?;
            }
            v.fs.fsync_dir(&dest)
        }
        .await;
        if let Err(e) = made {
            let _ = self.remove_view(vm, id);
            return Err(e);
        }
        Ok(View {
            id,
            vm,
            point: p.id,
            disks: rec
                .disks
                .iter()
                .map(|(d, p)| (d.clone(), PathBuf::from(p)))
                .collect(),
        })
    }

    /// Delete a view's overlay files and unpin its point.
    pub fn remove_view(&self, vm: Uuid, view: Uuid) -> Result<(), StoreError> {
        let v = self.vm(vm)?;
        let mut st = lock(&v.st);
        let rec = st
            .catalog
            .views
            .iter()
            .find(|w| w.id == view)
            .cloned()
            .ok_or(StoreError::NoSuchView(view))?;
        for (_, p) in &rec.disks {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", p, e)),
            }
        }
        let mut c = st.catalog.clone();
        c.views.retain(|w| w.id != view);
        v.commit(&mut st, c)
    }

    /// Views of a VM.
    pub fn views(&self, vm: Uuid) -> Result<Vec<View>, StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        Ok(st
            .catalog
            .views
            .iter()
            .map(|w| View {
                id: w.id,
                vm,
                point: w.point,
                disks: w
                    .disks
                    .iter()
                    .map(|(d, p)| (d.clone(), PathBuf::from(p)))
                    .collect(),
            })
            .collect())
    }
}

fn check_definition(vm: Uuid, text: &str) -> Result<(), StoreError> {
    let def = vmr_proto::VmDefinition::from_toml(text)
        .map_err(|e| StoreError::InvalidDefinition(Box::new(e)))?;
    if def.uuid != vm {
        return Err(StoreError::DefinitionForOtherVm {
            found: def.uuid,
            expected: vm,
        });
    }
    Ok(())
}

/// What retention needs to know of each point (those being merged away already left out).
/// A VM's live points with the group point each belongs to, oldest first, and its retention
/// policy ([`Store::retention_inputs`]).
pub type RetentionInputs = (
    Vec<(PointMeta, Option<vmr_proto::GroupTag>)>,
    RetentionPolicy,
);

fn point_metas(c: &Catalog) -> Vec<PointMeta> {
    c.points
        .iter()
        .filter(|p| !p.pruning)
        .map(|p| PointMeta {
            id: p.id,
            taken_at_ms: p.taken_at_ms,
            kind: p.kind,
        })
        .collect()
}

fn find_point(c: &Catalog, point: Option<CycleId>) -> Result<&PointRecord, StoreError> {
    let live = c.points.iter().filter(|p| !p.pruning);
    match point {
        None => live.max_by_key(|p| p.id),
        Some(id) => live.into_iter().find(|p| p.id == id),
    }
    .ok_or(StoreError::NoSuchPoint(point))
}

/// Give `from` the second name `to` (a hard link); across file systems, copy it under a
/// temporary name, fsync and rename. The caller fsyncs `to`'s directory.
fn link_or_copy(fs: &dyn Storage, from: &Path, to: &Path) -> Result<(), StoreError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut tmp = to.as_os_str().to_owned();
            tmp.push(TMP_SUFFIX);
            let tmp = PathBuf::from(tmp);
            std::fs::copy(from, &tmp).map_err(|e| StoreError::io("copy", from, e))?;
            fs.fsync_file(&tmp)?;
            std::fs::rename(&tmp, to).map_err(|e| StoreError::io("rename", &tmp, e))
        }
        Err(e) => Err(StoreError::io("link", from, e)),
    }
}

/// The backing name in `file`'s header, an absolute path to a file of the same directory
/// read as that file's name (a re-adopted layer's header before its rewrite, see
/// [`Store::readopt_view`]: the same file either way).
async fn header_backing(dir: &Path, file: &str) -> Result<Option<String>, StoreError> {
    let b = qemu::backing_of(dir, file).await?;
    Ok(b.map(|b| {
        let p = Path::new(&b);
        let same_dir = p.is_absolute()
            && p.parent().is_some_and(|parent| {
                parent == dir
                    || parent
                        .canonicalize()
                        .ok()
                        .is_some_and(|c| Some(c) == dir.canonicalize().ok())
            });
        match p.file_name() {
            Some(name) if same_dir => name.to_string_lossy().into_owned(),
            _ => b,
        }
    }))
}

/// Delete every file the catalog does not reference: half-written layers, merged-away layers,
/// temporary files, staged cycles already applied. Caller holds `chain`.
fn remove_strays(v: &Vm) -> Result<(), StoreError> {
    let st = lock(&v.st);
    let mut keep: std::collections::BTreeSet<PathBuf> = Default::default();
    for p in &st.catalog.points {
        for l in &p.layers {
            keep.insert(v.disk_dir(&l.disk).join(&l.file));
        }
    }
    keep.extend(v.pending_files());
    let disks = v.dir.join("disks");
    if let Ok(rd) = std::fs::read_dir(&disks) {
        for d in rd.flatten() {
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            let mut removed = false;
            for f in files.flatten() {
                if !keep.contains(&f.path()) {
                    tracing::info!(path = %f.path().display(), "removing stray layer");
                    std::fs::remove_file(f.path())
                        .map_err(|e| StoreError::io("remove", f.path(), e))?;
                    removed = true;
                }
            }
            if removed {
                v.fs.fsync_dir(&d.path())?;
            }
        }
    }
    // In `staging/` only complete cycle files of an older version are kept (replayed next).
    let sdir = v.staging_dir();
    if let Ok(rd) = std::fs::read_dir(&sdir) {
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if stage_id(&name).is_none() {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
    let _ = std::fs::remove_file(v.dir.join(format!("{CATALOG}{TMP_SUFFIX}")));
    v.remove_stray_indexes(&st.catalog)?;
    v.fs.fsync_dir(&sdir)
}

// -------------------------------------------------------------------- prune

/// Merge point `id` away. Returns false when it is (now) not eligible. With `force`, pinned
/// and latest checks are skipped except that pinned points are never dropped. Caller holds
/// `chain`.
async fn prune_one(v: &Arc<Vm>, id: CycleId, force: bool) -> Result<bool, StoreError> {
    // 1. Eligibility and the prune intent, under the state lock.
    let (point, upper, above, merge_down) = {
        let mut st = lock(&v.st);
        let c = &st.catalog;
        let Some(i) = c.points.iter().position(|p| p.id == id) else {
            return Ok(false);
        };
        let is_latest = i + 1 == c.points.len();
        let pinned_here = c.views.iter().any(|w| w.point == id)
            || st.holds.contains_key(&id)
            || st.keeps.contains_key(&id);
        let pinned_above =
            c.views.iter().any(|w| w.point > id) || st.holds.range(id + 1..).next().is_some();
        if pinned_here || (!force && (is_latest || pinned_above)) {
            return Ok(false);
        }
        let point = c.points[i].clone();
        let upper = c.points.get(i + 1).cloned();
        let above: Vec<PointRecord> = c.points.iter().skip(i + 2).cloned().collect();
        // A base layer (no backing) holds the whole disk: rather than copying all of it up
        // into the (small) layer above, that layer is merged down into it, and the base file
        // becomes the upper point's layer. Only when nothing outside the catalog refers to the
        // upper layer's file: no view on the upper point or above it (overlays back onto it by
        // path) and no pending resync (its layers back onto the latest point's). The rule
        // reads only the catalog and the pending record, so a restarted prune picks the same
        // way; both ways keep the chain's content, so even a mix stays correct.
        let merge_down = upper.as_ref().is_some_and(|u| {
            !c.views.iter().any(|w| w.point >= u.id) && st.holds.range(u.id..).next().is_none()
        }) && v.pending().is_none();
        if !point.pruning {
            let mut nc = c.clone();
            nc.points[i].pruning = true;
            v.commit(&mut st, nc)?;
        }
        (point, upper, above, merge_down)
    };
    pause_point("prune-intent");
    gate_point(Gate::Prune, id).await;
    // 2. Per disk: copy the dropped layer's clusters up into the layer above, then rebase the
    //    upper layer onto the dropped layer's backing.
    let mut rebased = Vec::new();
    // (disk, base file that becomes the upper point's layer, upper layer file to delete)
    let mut merged_down: Vec<(String, String, String)> = Vec::new();
    for l in &point.layers {
        let Some(u) = upper.as_ref().and_then(|u| {
            u.layers
                .iter()
                .find(|ul| ul.disk == l.disk && ul.backing.as_deref() == Some(&l.file))
        }) else {
            continue;
        };
        let dir = v.disk_dir(&l.disk);
        let actual = header_backing(&dir, &u.file).await?;
        if merge_down && l.backing.is_none() {
            if actual.as_deref() != Some(l.file.as_str()) {
                return Err(StoreError::corrupt(
                    dir.join(&u.file),
                    Corruption::Backing {
                        found: actual,
                        expected: l.file.clone(),
                    },
                ));
            }
            qemu::commit_into_backing(&dir, &u.file).await?;
            fsync_file_off(&v.fs, dir.join(&l.file)).await?;
            pause_point("prune-copied");
            // The layer that sat on the upper one now sits on the base file (same content).
            if let Some(w) = above
                .iter()
                .flat_map(|p| &p.layers)
                .find(|w| w.disk == l.disk && w.backing.as_deref() == Some(&u.file))
            {
                let wa = header_backing(&dir, &w.file).await?;
                if wa.as_deref() == Some(u.file.as_str()) {
                    qemu::rebase_unsafe(&dir, &w.file, Some(&l.file)).await?;
                    fsync_file_off(&v.fs, dir.join(&w.file)).await?;
                } else if wa.as_deref() != Some(l.file.as_str()) {
                    return Err(StoreError::corrupt(
                        dir.join(&w.file),
                        Corruption::BackingNeither {
                            found: wa,
                            either: u.file.clone(),
                            or: l.file.clone(),
                        },
                    ));
                }
            }
            merged_down.push((u.disk.clone(), l.file.clone(), u.file.clone()));
            continue;
        }
        if actual.as_deref() == Some(l.file.as_str()) {
            copy_up(&v.fs, v.qsd.root(), &dir, &u.file).await?;
            pause_point("prune-copied");
            qemu::rebase_unsafe(&dir, &u.file, l.backing.as_deref()).await?;
            fsync_file_off(&v.fs, dir.join(&u.file)).await?;
        } else if actual != l.backing {
            return Err(StoreError::corrupt(
                dir.join(&u.file),
                Corruption::BackingNeitherBase {
                    found: actual,
                    layer: l.file.clone(),
                    base: l.backing.clone(),
                },
            ));
        }
        rebased.push((u.disk.clone(), l.backing.clone()));
    }
    pause_point("prune-rebased");
    // 3. Commit: drop the point, record the new backings.
    {
        let mut st = lock(&v.st);
        let mut c = st.catalog.clone();
        c.points.retain(|p| p.id != id);
        if let Some(up) = upper
            .as_ref()
            .and_then(|u| c.points.iter_mut().find(|p| p.id == u.id))
        {
            for (disk, backing) in &rebased {
                if let Some(l) = up.layers.iter_mut().find(|l| &l.disk == disk) {
                    l.backing = backing.clone();
                }
            }
            for (disk, base, _) in &merged_down {
                if let Some(l) = up.layers.iter_mut().find(|l| &l.disk == disk) {
                    l.file = base.clone();
                    l.backing = None;
                }
            }
        }
        for (disk, base, old) in &merged_down {
            for l in c.points.iter_mut().flat_map(|p| p.layers.iter_mut()) {
                if &l.disk == disk && l.backing.as_deref() == Some(old.as_str()) {
                    l.backing = Some(base.clone());
                }
            }
        }
        v.commit(&mut st, c)?;
    }
    pause_point("prune-committed");
    v.remove_point_index(&point);
    // 4. Delete the merged layers: the dropped point's, or the upper layer merged down.
    let mut gone: Vec<(&str, &str)> = Vec::new();
    for l in &point.layers {
        match merged_down.iter().find(|(d, _, _)| *d == l.disk) {
            Some((_, _, old)) => gone.push((&l.disk, old)),
            None => gone.push((&l.disk, &l.file)),
        }
    }
    for (disk, file) in gone {
        let dir = v.disk_dir(disk);
        // Unlinking a layer of gigabytes frees its extents, which can take a while: off the
        // runtime too.
        let path = dir.join(file);
        cycle::blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", path, e)),
        })
        .await?;
        v.fs.fsync_dir(&dir)?;
    }
    Ok(true)
}

/// Copy into `file` every cluster that its direct backing layer has and it lacks, reading it
/// through `file` itself (so the visible content never changes), then flush.
async fn copy_up(
    fs: &Arc<dyn Storage>,
    root: &Path,
    dir: &Path,
    file: &str,
) -> Result<(), StoreError> {
    let ranges = qemu::ranges_in_backing(dir, file).await?;
    if ranges.is_empty() {
        return Ok(());
    }
    let x = Export::start(root, &dir.join(file)).await?;
    let res = async {
        let mut pipe = Pipeline::default();
        let chunk = x.chunk().min(4 << 20);
        let r = async {
            for (off, len) in ranges {
                let mut pos = 0;
                while pos < len {
                    let n = (len - pos).min(chunk);
                    let chunks = x
                        .client
                        .read_chunks(off + pos, n as u32)
                        .await
                        .map_err(|e| StoreError::nbd(file, e))?;
                    for c in chunks {
                        match c {
                            vmr_nbd::ReadChunk::Data { offset, data } => {
                                pipe.write(&x.client, file, offset, data, chunk).await?
                            }
                            vmr_nbd::ReadChunk::Hole { offset, len } => {
                                pipe.zero(&x.client, file, offset, u64::from(len), chunk)
                                    .await?
                            }
                        }
                    }
                    pos += n;
                }
            }
            Ok(())
        }
        .await;
        let d = pipe.drain().await;
        r.and(d)
    }
    .await;
    match res {
        Ok(()) => x.finish().await,
        Err(e) => {
            x.abort().await;
            Err(e)
        }
    }?;
    fsync_file_off(fs, dir.join(file)).await
}

/// fsync a file off the async runtime. After a merge it may write gigabytes back, and a
/// runtime thread blocked that long stalls every other task of the agent: other VMs' cycles
/// and the peer connections' keep-alives (a primary whose pings went unanswered dropped its
/// connection and counted its next cycle as failed).
async fn fsync_file_off(fs: &Arc<dyn Storage>, path: PathBuf) -> Result<(), StoreError> {
    let fs = fs.clone();
    cycle::blocking(move || fs.fsync_file(&path)).await
}
