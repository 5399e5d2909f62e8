//! [`VmCapture`] (one VM's QMP connection, tracking state and recovery) and [`CaptureCycle`]
//! (one point-in-time view being read). The QMP sequence and the failure matrix are described
//! in `docs/capture.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::qmp;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use vmr_nbd::{ConnectOptions, NbdClient};
use vmr_proto::DiskInfo;

use crate::gate::{Gate, GateOrder, GateReport, ResumeGuard};
use crate::graph::{self, NodeInfo};
use crate::names::Names;
use crate::qga::GuestAgent;
use crate::qmp::{Endpoint, QmpClient, QmpError, QmpEvent};
use crate::reader::{DiskSource, Pipeline, Want};
use crate::{
    BITMAP_GRANULARITY, CaptureError, ConfigFault, DEFAULT_MAX_IN_FLIGHT, GroupCutReason,
    ResyncReason,
};

/// How long cleanup waits for QEMU to drop an export or a job.
const GONE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest Unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What to capture from which VM.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The VM's QMP monitor reserved for vmreplica (a monitor serves one client at a time).
    pub qmp: Endpoint,
    /// Format node names of the VM's disks, e.g. `["disk0"]`; extents refer to their index.
    pub disks: Vec<String>,
    /// Directory for the fleecing temp files and the NBD socket; needs free space of the sum
    /// of the disk sizes during a cycle.
    pub work_dir: PathBuf,
    /// Short id making QEMU names unique per VM (1-16 of `[A-Za-z0-9_]`).
    pub tag: String,
    /// The NBD server socket, when not the default `work_dir/vmr-<tag>-nbd.sock` (e.g. a
    /// shorter path when that one exceeds a Unix socket path's 107 bytes); its directory is
    /// created like the work dir.
    pub nbd_socket: Option<PathBuf>,
    /// Disk sizes at the last committed cycle (from the agent's state); `None` = unknown
    /// (never replicated). `Some` also means replication was running, so missing bitmaps are
    /// reported as lost tracking rather than "not started".
    pub expected_sizes: Option<Vec<u64>>,
    /// NBD reads in flight per cycle; memory bound = this × [`crate::PIECE_SIZE`].
    pub max_in_flight: usize,
    /// Per QMP command timeout.
    pub qmp_timeout: Duration,
}

impl CaptureConfig {
    /// A configuration with default read-ahead and timeout.
    pub fn new(
        qmp: Endpoint,
        disks: Vec<String>,
        work_dir: PathBuf,
        tag: impl Into<String>,
    ) -> Self {
        CaptureConfig {
            qmp,
            disks,
            work_dir,
            tag: tag.into(),
            nbd_socket: None,
            expected_sizes: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            qmp_timeout: Duration::from_secs(30),
        }
    }
}

/// State of change tracking in QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    /// No vmreplica bitmap exists and none was expected: run a full cycle.
    NotStarted,
    /// Every disk records into bitmap `vmr-<tag>-<generation>`.
    Active {
        /// Generation of the recording bitmaps (= [`CaptureCycle::generation`] of the last
        /// committed cycle, or later if an uncommitted cycle's changes were merged into it).
        generation: u64,
    },
    /// Incremental replication is impossible; a full cycle is needed.
    Lost(ResyncReason),
}

/// What a cycle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleMode {
    /// The blocks written since the last committed cycle.
    Incremental,
    /// Every allocated block (initial replication or resync); starts tracking anew.
    Full,
    /// Like [`CycleMode::Full`] (same transaction: tracking starts anew at the cut, marker
    /// bitmap until committed, every allocated and zero range handed out), for a
    /// block-hash resynchronisation: the caller compares the blocks with the replica's and
    /// ships only those that differ. An interrupted resync leaves
    /// [`ResyncReason::InitialCopyIncomplete`] like an interrupted full cycle.
    Resync,
    /// Like [`CycleMode::Incremental`] (the dirty blocks first), but nothing of the view is
    /// trimmed, so that after the dirty extents [`CaptureCycle::read_all`] can read the whole
    /// view as it was at the cut (every allocated and zero range, like a full cycle) to
    /// compare it with the replica (`vmreplica verify`). The view costs more copy-before-write
    /// space while it is open.
    Verify,
}

/// One VM's capture side: its QMP connection, naming and recovery.
#[derive(Debug)]
pub struct VmCapture {
    cfg: CaptureConfig,
    names: Names,
    qmp: QmpClient,
    nbd_socket: PathBuf,
    /// A cycle may have left objects behind: recover before the next one.
    needs_recover: bool,
    sizes: Option<Vec<u64>>,
    /// The work directory's file system could not reserve a fleecing file (warned once).
    sparse_warned: bool,
    /// The last teardown's fleecing files being deleted on a blocking thread: the next cycle
    /// (and `open`) waits for it before it creates or reserves new ones.
    unlinking: Option<tokio::task::JoinHandle<()>>,
}

fn not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            class == "DeviceNotFound"
                || desc.contains("not found")
                || desc.contains("No such")
                || desc.contains("Cannot find")
        }
        _ => false,
    }
}

impl VmCapture {
    /// Connect to QEMU, make sure vmreplica's NBD server runs, and clean up everything an agent
    /// that died mid-cycle left behind (exports, nodes, jobs, temp files named `vmr-<tag>-*`;
    /// frozen bitmaps are merged back into the active one so no change is lost).
    pub async fn open(cfg: CaptureConfig) -> Result<VmCapture, CaptureError> {
        let names = Names::new(&cfg.tag)?;
        if cfg.disks.is_empty() {
            return Err(CaptureError::Config(ConfigFault::NoDisks));
        }
        for (i, d) in cfg.disks.iter().enumerate() {
            if cfg.disks[..i].contains(d) {
                return Err(CaptureError::Config(ConfigFault::DuplicateDisk(d.clone())));
            }
        }
        if let Some(s) = &cfg.expected_sizes
            && s.len() != cfg.disks.len()
        {
            return Err(CaptureError::Config(ConfigFault::SizeCount {
                sizes: s.len(),
                disks: cfg.disks.len(),
            }));
        }
        std::fs::create_dir_all(&cfg.work_dir).map_err(|source| CaptureError::Io {
            what: "cannot create work dir",
            path: cfg.work_dir.display().to_string(),
            source,
        })?;
        let nbd_socket = match &cfg.nbd_socket {
            Some(s) => {
                if let Some(parent) = s.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| CaptureError::Io {
                        what: "cannot create the NBD socket's directory",
                        path: parent.display().to_string(),
                        source,
                    })?;
                }
                s.clone()
            }
            None => names.nbd_socket(&cfg.work_dir),
        };
        if nbd_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(CaptureError::Config(ConfigFault::SocketPathTooLong(
                nbd_socket,
            )));
        }
        let qmp = QmpClient::connect(&cfg.qmp, cfg.qmp_timeout)
            .await
            .map_err(CaptureError::qmp("connect"))?;
        let sizes = cfg.expected_sizes.clone();
        let mut vm = VmCapture {
            cfg,
            names,
            qmp,
            nbd_socket,
            needs_recover: true,
            sizes,
            sparse_warned: false,
            unlinking: None,
        };
        vm.ensure_nbd_server().await?;
        vm.recover().await?;
        vm.settle_unlink().await;
        vm.query_disks().await?;
        Ok(vm)
    }

    /// The naming scheme in use.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The QMP connection (for diagnostics and tests; do not interleave with a cycle).
    pub fn qmp(&mut self) -> &mut QmpClient {
        &mut self.qmp
    }

    /// The state of change tracking.
    pub async fn tracking(&mut self) -> Result<Tracking, CaptureError> {
        if self.needs_recover {
            self.recover().await?;
        }
        let disks = self.query_disks().await?;
        Ok(graph::analyse(&self.names, &disks, self.sizes.as_deref()))
    }

    /// Current virtual sizes of the disks, in configuration order.
    pub async fn disk_sizes(&mut self) -> Result<Vec<u64>, CaptureError> {
        Ok(self.query_disks().await?.iter().map(|d| d.size).collect())
    }

    /// Bytes recorded as changed and not yet shipped: the dirty count of every vmreplica
    /// tracking bitmap of every disk (QEMU counts in bytes, at bitmap granularity).
    pub async fn pending_bytes(&mut self) -> Result<u64, CaptureError> {
        let disks = self.query_disks().await?;
        Ok(disks
            .iter()
            .map(|d| {
                graph::tracking_bitmaps(&self.names, d)
                    .iter()
                    .map(|(_, b)| b.count)
                    .sum::<u64>()
            })
            .sum())
    }

    /// Remove every vmreplica bitmap (replication disabled); the next cycle must be full.
    pub async fn stop_tracking(&mut self) -> Result<(), CaptureError> {
        self.recover().await?;
        let disks = self.query_disks().await?;
        let mut actions = Vec::new();
        for d in &disks {
            for b in d.bitmaps.iter().filter(|b| self.names.owns(&b.name)) {
                actions.push(remove_action(&d.name, &b.name));
            }
        }
        self.transaction(actions, "remove tracking bitmaps").await?;
        self.sizes = None;
        Ok(())
    }

    /// Cut all disks at one instant and open the point-in-time view for reading.
    ///
    /// `Incremental` fails with [`CaptureError::ResyncRequired`] when tracking is lost (never a
    /// silent full copy) and with [`CaptureError::NotTracking`] before the first full cycle.
    pub async fn begin_cycle(&mut self, mode: CycleMode) -> Result<CaptureCycle<'_>, CaptureError> {
        let (cycle, _) = self.begin_cycle_quiesced(mode, None).await?;
        Ok(cycle)
    }

    /// [`Self::begin_cycle`] with the guest's file systems frozen around the cut when `quiesce`
    /// gives a synchronised guest agent session: `guest-fsfreeze-freeze` (its fsfreeze hooks
    /// run) right before the cycle transaction, `guest-fsfreeze-thaw` right after it, in every
    /// path (a failed or timed-out freeze, a failed transaction), retried until
    /// `guest-fsfreeze-status` says thawed. A failed freeze never stops the cycle: it is cut
    /// crash-consistent and the report says why. Fleecing targets are prepared before the
    /// freeze, the view is exposed after the thaw, so the frozen time holds the transaction only.
    pub async fn begin_cycle_quiesced(
        &mut self,
        mode: CycleMode,
        quiesce: Option<Quiesce<'_>>,
    ) -> Result<(CaptureCycle<'_>, QuiesceReport), CaptureError> {
        self.begin_cycle_gated(mode, quiesce, None).await
    }

    /// [`Self::begin_cycle_quiesced`] as one member of a consistency group's cut when `gate`
    /// is given: prepared up to the transaction, the capture reports ready and follows the
    /// coordinator's orders (pause the VM, run the transaction, resume it); see
    /// [`crate::gate`]. A VM it paused is resumed in every path.
    pub async fn begin_cycle_gated(
        &mut self,
        mode: CycleMode,
        quiesce: Option<Quiesce<'_>>,
        gate: Option<&mut Gate>,
    ) -> Result<(CaptureCycle<'_>, QuiesceReport), CaptureError> {
        if self.needs_recover {
            self.recover().await?;
        }
        let disks = self.query_disks().await?;
        let state = graph::analyse(&self.names, &disks, self.sizes.as_deref());
        let (frozen, generation) = match (mode, state) {
            (CycleMode::Incremental | CycleMode::Verify, Tracking::Active { generation }) => {
                (Some(generation), generation + 1)
            }
            (CycleMode::Incremental | CycleMode::Verify, Tracking::NotStarted) => {
                return Err(CaptureError::NotTracking);
            }
            (CycleMode::Incremental | CycleMode::Verify, Tracking::Lost(reason)) => {
                return Err(CaptureError::ResyncRequired { reason });
            }
            (CycleMode::Full | CycleMode::Resync, _) => {
                let max = disks
                    .iter()
                    .flat_map(|d| graph::tracking_bitmaps(&self.names, d))
                    .map(|(g, _)| g)
                    .max()
                    .unwrap_or(0);
                (None, max + 1)
            }
        };
        // The last cycle's fleecing files are gone (and their space free) before new ones.
        self.settle_unlink().await;
        self.check_free_space(&disks)?;

        // From here on objects exist in QEMU; a failure (or a drop) leaves them for recover(),
        // which runs right away on error (and again before the next cycle if that fails too).
        self.needs_recover = true;
        let mut report = QuiesceReport::NotAsked;
        let (sources, infos, whole) = match self
            .cut_and_expose(
                mode,
                &disks,
                frozen,
                generation,
                (quiesce, gate),
                &mut report,
            )
            .await
        {
            Ok(x) => x,
            Err(e) => {
                if let Err(r) = self.recover().await {
                    tracing::warn!(error = %r, "recovery after a failed cycle start failed");
                }
                return Err(e);
            }
        };
        let trims = sources
            .iter()
            .filter(|s| s.want == Want::Dirty && s.trim)
            .map(crate::reader::spawn_trim_unread)
            .collect();
        let clients = sources
            .iter()
            .chain(whole.iter())
            .map(|s| s.client.clone())
            .collect();
        let budgeted = matches!(mode, CycleMode::Incremental | CycleMode::Full);
        let pipeline = Pipeline::new(sources, self.cfg.max_in_flight, budgeted);
        Ok((
            CaptureCycle {
                vm: self,
                disks: infos,
                mode,
                generation,
                frozen,
                pipeline,
                trims,
                clients,
                whole,
                shipped: false,
            },
            report,
        ))
    }

    /// Steps 2-5 of `begin_cycle`: fleecing targets, the cycle transaction, snapshot nodes,
    /// exports and NBD connections (for a verify cycle, a second connection per disk for the
    /// whole-view pass).
    async fn cut_and_expose(
        &mut self,
        mode: CycleMode,
        disks: &[NodeInfo],
        frozen: Option<u64>,
        generation: u64,
        (quiesce, mut gate): (Option<Quiesce<'_>>, Option<&mut Gate>),
        report: &mut QuiesceReport,
    ) -> Result<(Vec<DiskSource>, Vec<DiskInfo>, Vec<DiskSource>), CaptureError> {
        for (i, d) in disks.iter().enumerate() {
            let path = self.names.fleece_file(&self.cfg.work_dir, i);
            let f = std::fs::File::create(&path).map_err(|source| CaptureError::Io {
                what: "cannot create fleecing file",
                path: path.display().to_string(),
                source,
            })?;
            self.reserve(&f, &path, d.size)?;
            // discard=ignore: a TRIM of the snapshot still tells copy-before-write to stop
            // copying those clusters, but does not punch holes into the reserved file (one
            // file-system operation per TRIM in the VM's QEMU, and the reservation undone).
            // cache.no-flush: the fleecing file is scratch that no crash needs (an interrupted
            // cycle merges its bitmap back and the file is deleted), so QEMU never fdatasyncs
            // it; without this, deleting the node at the cycle's end flushed every copied
            // cluster to the disk first (seconds per GiB copied, in the VM's QEMU).
            let add = qmp::blockdev_add(qmp::BlockdevOptions::raw {
                base: qmp::BlockdevOptionsBase {
                    discard: Some(qmp::BlockdevDiscardOptions::ignore),
                    cache: Some(scratch_cache()),
                    ..node_base(&self.names.tmp_node(i))
                },
                raw: qmp::BlockdevOptionsRaw {
                    base: qmp::BlockdevOptionsGenericFormat {
                        file: qmp::BlockdevRef::definition(Box::new(qmp::BlockdevOptions::file {
                            base: qmp::BlockdevOptionsBase {
                                discard: Some(qmp::BlockdevDiscardOptions::ignore),
                                cache: Some(scratch_cache()),
                                ..empty_base()
                            },
                            file: file_options(path.display().to_string()),
                        })),
                    },
                    offset: None,
                    size: None,
                },
            });
            self.exec(&add, "add fleecing target").await?;
        }

        // THE CYCLE POINT: one transaction over all disks.
        let mut actions = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            if frozen.is_none() {
                for b in d.bitmaps.iter().filter(|b| self.names.owns(&b.name)) {
                    actions.push(remove_action(&d.name, &b.name));
                }
            }
            actions.push(add_action(
                &d.name,
                &self.names.bitmap(generation),
                d.persistent_capable(),
                false,
            ));
            match frozen {
                Some(g) => actions.push(qmp::TransactionAction::block_dirty_bitmap_disable(
                    qmp::BlockDirtyBitmapWrapper {
                        data: bitmap_ref(&d.name, &self.names.bitmap(g)),
                    },
                )),
                None => actions.push(add_action(
                    &d.name,
                    &self.names.full_marker(generation),
                    d.persistent_capable(),
                    true,
                )),
            }
            actions.push(backup_action(&d.name, &self.names, i));
        }
        // A group member: pause with the others first (docs/groups.md). The guard resumes
        // the VM if this future is dropped while it is paused.
        let mut paused = None;
        let mut guard: Option<ResumeGuard> = None;
        if let Some(g) = gate.as_deref_mut() {
            g.report(GateReport::Ready).await;
            match g.order().await {
                Some(GateOrder::Stop) => {
                    let r = self.pause().await;
                    let was = matches!(r, Ok(true));
                    if was {
                        guard = Some(ResumeGuard::armed(
                            self.cfg.qmp.clone(),
                            self.cfg.qmp_timeout,
                        ));
                    }
                    g.report(GateReport::Stopped(r)).await;
                    paused = Some(was);
                    if g.order().await != Some(GateOrder::Cut) {
                        let c = self.resume(was).await;
                        if let Some(r) = guard.take() {
                            r.disarm();
                        }
                        g.report(GateReport::Continued(c)).await;
                        return Err(CaptureError::GroupCut {
                            reason: GroupCutReason::MemberNotPaused,
                        });
                    }
                }
                Some(GateOrder::Alone) => {}
                _ => {
                    return Err(CaptureError::GroupCut {
                        reason: GroupCutReason::CoordinatorGone,
                    });
                }
            }
        }
        let cut = match quiesce {
            None => self.transaction(actions, "cycle transaction").await,
            Some(q) => {
                let (cut, r) = q
                    .around(self.transaction(actions, "cycle transaction"))
                    .await;
                *report = r;
                cut
            }
        };
        if let (Some(was), Some(g)) = (paused, gate) {
            g.report(GateReport::Cut(
                cut.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            ))
            .await;
            // Resume when told (all members cut), or at once when the coordinator is gone.
            if let Some(GateOrder::Cont { grouped }) = g.order().await {
                g.grouped = grouped && cut.is_ok();
            }
            let c = self.resume(was).await;
            if let Some(r) = guard.take() {
                r.disarm();
            }
            g.report(GateReport::Continued(c)).await;
        }
        cut?;

        let mut sources = Vec::with_capacity(disks.len());
        let mut infos = Vec::with_capacity(disks.len());
        let mut whole = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let access = self.names.access_node(i);
            let add = qmp::blockdev_add(qmp::BlockdevOptions::snapshot_access {
                base: qmp::BlockdevOptionsBase {
                    discard: Some(qmp::BlockdevDiscardOptions::unmap),
                    ..node_base(&access)
                },
                snapshot_access: qmp::BlockdevOptionsGenericFormat {
                    file: qmp::BlockdevRef::reference(self.names.filter_node(i)),
                },
            });
            self.exec(&add, "add snapshot-access node").await?;
            let export = self.names.export(i);
            let bitmaps = frozen.map(|g| {
                vec![qmp::BlockDirtyBitmapOrStr::external(bitmap_ref(
                    &d.name,
                    &self.names.bitmap(g),
                ))]
            });
            let add = qmp::block_export_add(qmp::BlockExportOptions::nbd {
                base: qmp::BlockExportOptionsBase {
                    id: export.clone(),
                    node_name: access,
                    writable: Some(true),
                    writethrough: None,
                    iothread: None,
                    fixed_iothread: None,
                },
                nbd: qmp::BlockExportOptionsNbd {
                    base: qmp::BlockExportOptionsNbdBase {
                        name: Some(export.clone()),
                        description: None,
                    },
                    bitmaps,
                    allocation_depth: None,
                },
            });
            self.exec(&add, "export point-in-time view").await?;
            let (context, want) = match frozen {
                Some(g) => (
                    format!("qemu:dirty-bitmap:{}", self.names.bitmap(g)),
                    Want::Dirty,
                ),
                None => (vmr_nbd::BASE_ALLOCATION.to_owned(), Want::Allocated),
            };
            let trim = mode != CycleMode::Verify;
            sources.push(
                Self::connect_view(self.view_endpoint(), &export, d, i, (context, want, trim))
                    .await?,
            );
            if mode == CycleMode::Verify {
                let all = vmr_nbd::BASE_ALLOCATION.to_owned();
                whole.push(
                    Self::connect_view(
                        self.view_endpoint(),
                        &export,
                        d,
                        i,
                        (all, Want::Allocated, true),
                    )
                    .await?,
                );
            }
            infos.push(DiskInfo {
                id: d.name.clone(),
                size: d.size,
            });
        }
        Ok((sources, infos, whole))
    }

    /// How to connect to the point-in-time exports: the NBD socket and connection options
    /// (a plain value, so that connecting does not hold a reference to `self` across awaits).
    fn view_endpoint(&self) -> (Endpoint, usize, Duration) {
        (
            Endpoint::Unix(self.nbd_socket.clone()),
            self.cfg.max_in_flight.max(1) + 8,
            self.cfg.qmp_timeout,
        )
    }

    /// One NBD connection to disk `d`'s point-in-time export with meta context `context`.
    async fn connect_view(
        (endpoint, max_in_flight, timeout): (Endpoint, usize, Duration),
        export: &str,
        d: &NodeInfo,
        i: usize,
        (context, want, trim): (String, Want, bool),
    ) -> Result<DiskSource, CaptureError> {
        let opts = ConnectOptions {
            export: export.to_owned(),
            meta_contexts: vec![context.clone()],
            max_in_flight,
            timeout,
        };
        let client = NbdClient::connect(&endpoint, opts).await?;
        if client.meta_context_id(&context).is_none() {
            return Err(CaptureError::NoMetaContext {
                server: "qemu's nbd server".into(),
                context,
            });
        }
        if client.size() != d.size {
            return Err(CaptureError::ViewSize {
                disk: d.name.clone(),
                view: client.size(),
                size: d.size,
            });
        }
        Ok(DiskSource {
            index: i as u32,
            client,
            context,
            want,
            size: d.size,
            trim,
        })
    }

    /// Reserve the whole of a fleecing file (`fallocate`), so that copy-before-write into it can
    /// never meet a full file system while the view is open: a guest write must never fail
    /// because of replication, and other VMs' views or other files cannot take the space once
    /// the cycle has begun. Where it cannot be reserved the cycle does not start (the tracked
    /// changes stay for the next attempt). A file system without `fallocate` gets a sparse file
    /// (as before) and one warning.
    fn reserve(&mut self, f: &std::fs::File, path: &Path, size: u64) -> Result<(), CaptureError> {
        use nix::errno::Errno;
        use nix::fcntl::{FallocateFlags, fallocate};
        let len = i64::try_from(size).map_err(|_| CaptureError::DiskTooLarge(size))?;
        match fallocate(
            std::os::fd::AsRawFd::as_raw_fd(f),
            FallocateFlags::empty(),
            0,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::ENOSPC) => {
                let available = nix::sys::statvfs::statvfs(&self.cfg.work_dir)
                    .map(|st| {
                        #[allow(clippy::unnecessary_cast)]
                        let a = (st.blocks_available() as u64)
                            .saturating_mul(st.fragment_size() as u64);
                        a
                    })
                    .unwrap_or(0);
                Err(CaptureError::InsufficientSpace {
                    dir: self.cfg.work_dir.display().to_string(),
                    needed: size,
                    available,
                })
            }
            Err(Errno::EOPNOTSUPP) => {
                if !self.sparse_warned {
                    self.sparse_warned = true;
                    tracing::warn!(dir = %self.cfg.work_dir.display(), "the file system of the work directory cannot reserve space (fallocate); fleecing files are sparse, so a full file system during a cycle would fail guest writes");
                }
                f.set_len(size).map_err(|source| CaptureError::Io {
                    what: "cannot size fleecing file",
                    path: path.display().to_string(),
                    source,
                })
            }
            Err(e) => Err(CaptureError::Io {
                what: "cannot reserve space for the fleecing file",
                path: path.display().to_string(),
                source: std::io::Error::from(e),
            }),
        }
    }

    fn check_free_space(&self, disks: &[NodeInfo]) -> Result<(), CaptureError> {
        let needed: u64 = disks.iter().map(|d| d.size).sum();
        let st = nix::sys::statvfs::statvfs(&self.cfg.work_dir).map_err(|e| CaptureError::Io {
            what: "cannot statvfs",
            path: self.cfg.work_dir.display().to_string(),
            source: std::io::Error::from(e),
        })?;
        #[allow(clippy::unnecessary_cast)]
        let available = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        if available < needed {
            return Err(CaptureError::InsufficientSpace {
                dir: self.cfg.work_dir.display().to_string(),
                needed,
                available,
            });
        }
        Ok(())
    }

    async fn exec<C: qapi::Command>(
        &mut self,
        cmd: &C,
        during: &str,
    ) -> Result<C::Ok, CaptureError> {
        self.qmp
            .execute(cmd)
            .await
            .map_err(CaptureError::qmp(during))
    }

    async fn query(&mut self, name: &str, args: Option<Value>) -> Result<Value, CaptureError> {
        self.qmp
            .execute_value(name, args)
            .await
            .map_err(CaptureError::qmp(name))
    }

    /// QMP `stop`: `Ok(true)` paused, `Ok(false)` when the monitor has no `stop` (a
    /// qemu-storage-daemon: no vCPUs to pause).
    async fn pause(&mut self) -> Result<bool, String> {
        match self.qmp.execute_value("stop", None).await {
            Ok(_) => Ok(true),
            Err(crate::qmp::QmpError::Command { class, .. }) if class == "CommandNotFound" => {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// QMP `cont` when `paused`.
    async fn resume(&mut self, paused: bool) -> Result<(), String> {
        if !paused {
            return Ok(());
        }
        self.qmp
            .execute_value("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn transaction(
        &mut self,
        actions: Vec<qmp::TransactionAction>,
        during: &str,
    ) -> Result<(), CaptureError> {
        if actions.is_empty() {
            return Ok(());
        }
        self.exec(
            &qmp::transaction {
                actions,
                properties: None,
            },
            during,
        )
        .await?;
        Ok(())
    }

    async fn all_nodes(&mut self) -> Result<Vec<NodeInfo>, CaptureError> {
        let v = self
            .query("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        graph::parse_nodes(&v)
    }

    /// The configured disks' nodes, in configuration order.
    async fn query_disks(&mut self) -> Result<Vec<NodeInfo>, CaptureError> {
        let mut all = self.all_nodes().await?;
        let mut out = Vec::with_capacity(self.cfg.disks.len());
        for name in &self.cfg.disks {
            let i = all
                .iter()
                .position(|n| &n.name == name)
                .ok_or_else(|| CaptureError::DiskNotFound(name.clone()))?;
            out.push(all.swap_remove(i));
        }
        Ok(out)
    }

    async fn ensure_nbd_server(&mut self) -> Result<(), CaptureError> {
        let sock = self.nbd_socket.clone();
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            tracing::debug!(socket = %sock.display(), "reusing running nbd server");
            return Ok(());
        }
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CaptureError::Io {
                    what: "cannot remove stale socket",
                    path: sock.display().to_string(),
                    source,
                });
            }
        }
        let cmd = qmp::nbd_server_start {
            addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
                data: qmp::UnixSocketAddress {
                    path: sock.display().to_string(),
                    abstract_: None,
                    tight: None,
                },
            }),
            max_connections: None,
            tls_authz: None,
            tls_creds: None,
        };
        match self.qmp.execute(&cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.desc().is_some_and(|d| d.contains("already running")) => {
                Err(CaptureError::ForeignNbdServer {
                    socket: sock.display().to_string(),
                })
            }
            Err(source) => Err(CaptureError::Qmp {
                during: "start nbd server".into(),
                source,
            }),
        }
    }

    /// Remove every `vmr-<tag>-*` export, node, job and temp file, and merge frozen bitmaps
    /// back into the recording one. Idempotent.
    async fn recover(&mut self) -> Result<(), CaptureError> {
        self.cleanup_graph().await?;
        let disks = self.query_disks().await?;
        let mut actions = Vec::new();
        for d in &disks {
            let tb = graph::tracking_bitmaps(&self.names, d);
            let Some((_, newest)) = tb.last() else {
                continue;
            };
            if tb.len() < 2 || !newest.recording || tb.iter().any(|(_, b)| b.inconsistent || b.busy)
            {
                continue;
            }
            let older: Vec<&str> = tb[..tb.len() - 1]
                .iter()
                .map(|(_, b)| b.name.as_str())
                .collect();
            tracing::info!(disk = %d.name, into = %newest.name, from = ?older, "merging unshipped bitmaps");
            // never an empty source list: QEMU 10.0 crashes on it
            actions.push(qmp::TransactionAction::block_dirty_bitmap_merge(
                qmp::BlockDirtyBitmapMergeWrapper {
                    data: qmp::BlockDirtyBitmapMerge {
                        node: d.name.clone(),
                        target: newest.name.clone(),
                        bitmaps: older
                            .iter()
                            .map(|n| qmp::BlockDirtyBitmapOrStr::local((*n).to_owned()))
                            .collect(),
                    },
                },
            ));
            for n in older {
                actions.push(remove_action(&d.name, n));
            }
        }
        self.transaction(actions, "merge frozen bitmaps").await?;
        self.needs_recover = false;
        Ok(())
    }

    /// Tear down exports, snapshot nodes, jobs, fleecing nodes and files of this VM.
    async fn cleanup_graph(&mut self) -> Result<(), CaptureError> {
        let t = std::time::Instant::now();
        let mut exports = graph::parse_exports(&self.query("query-block-exports", None).await?)?;
        exports.retain(|e| self.names.owns(e));
        for id in exports {
            let pred = {
                let id = id.clone();
                move |e: &QmpEvent| {
                    e.name == "BLOCK_EXPORT_DELETED" && e.str_field("id") == Some(id.as_str())
                }
            };
            self.qmp.discard_events(&pred);
            let del = qmp::block_export_del {
                id: id.clone(),
                mode: Some(qmp::BlockExportRemoveMode::hard),
            };
            match self.qmp.execute(&del).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => continue,
                Err(source) => {
                    return Err(CaptureError::Qmp {
                        during: "delete export".into(),
                        source,
                    });
                }
            }
            self.wait_gone(&pred, &id, "query-block-exports", graph::parse_exports)
                .await?;
        }
        let nodes = self.all_nodes().await?;
        let access: Vec<String> = nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| n.starts_with(&self.names.access_node(0)[..self.names.prefix().len() + 1]))
            .collect();
        let exports_ms = t.elapsed().as_millis() as u64;
        for n in access {
            self.del_node(&n).await?;
        }
        let access_ms = t.elapsed().as_millis() as u64;
        let mut jobs = graph::parse_jobs(&self.query("query-block-jobs", None).await?)?;
        jobs.retain(|(j, _)| self.names.owns(j));
        for (id, status) in jobs {
            let pred = {
                let id = id.clone();
                move |e: &QmpEvent| {
                    e.name == "JOB_STATUS_CHANGE"
                        && e.str_field("id") == Some(id.as_str())
                        && e.str_field("status") == Some("null")
                }
            };
            self.qmp.discard_events(&pred);
            let r = if status == "concluded" {
                self.qmp
                    .execute_value("job-dismiss", Some(json!({"id": id})))
                    .await
            } else {
                self.qmp
                    .execute(&qmp::block_job_cancel {
                        device: id.clone(),
                        force: Some(true),
                    })
                    .await
                    .map(|_| Value::Null)
            };
            match r {
                Ok(_) => {}
                Err(e) if not_found(&e) => continue,
                Err(source) => {
                    return Err(CaptureError::Qmp {
                        during: "cancel fleecing job".into(),
                        source,
                    });
                }
            }
            let jobs_ids =
                |v: &Value| graph::parse_jobs(v).map(|j| j.into_iter().map(|(i, _)| i).collect());
            self.wait_gone(&pred, &id, "query-block-jobs", jobs_ids)
                .await?;
        }
        let jobs_ms = t.elapsed().as_millis() as u64;
        let rest: Vec<String> = self
            .all_nodes()
            .await?
            .into_iter()
            .map(|n| n.name)
            .filter(|n| self.names.owns(n))
            .collect();
        for n in rest {
            self.del_node(&n).await?;
        }
        let nodes_ms = t.elapsed().as_millis() as u64;
        // Everything this VM's cycles named is gone: no buffered event can be waited for again.
        self.qmp.clear_events();
        self.unlink_fleece_files().await;
        tracing::debug!(
            exports_ms,
            access_ms,
            jobs_ms,
            nodes_ms,
            "view torn down (ms since the teardown started)"
        );
        Ok(())
    }

    /// Delete this VM's fleecing files on a blocking thread, without waiting for it. Deleting a
    /// file that copy-before-write filled waits for the kernel's writeback of its pages: in the
    /// row 1 benchmark (4 GiB copied per cycle) 2.5-7 s, during which the agent's runtime
    /// thread was blocked (and the cycle's commit waited). QEMU no longer has the files open.
    async fn unlink_fleece_files(&mut self) {
        self.settle_unlink().await;
        let files: Vec<PathBuf> = match std::fs::read_dir(&self.cfg.work_dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|f| self.names.is_fleece_file(f))
                })
                .map(|e| e.path())
                .collect(),
            Err(_) => return,
        };
        if files.is_empty() {
            return;
        }
        self.unlinking = Some(tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            for f in &files {
                if let Err(e) = std::fs::remove_file(f)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %f.display(), error = %e, "cannot delete a fleecing file");
                }
            }
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "fleecing files deleted"
            );
        }));
    }

    /// Wait for the fleecing files' deletion started by the last teardown, if any.
    async fn settle_unlink(&mut self) {
        if let Some(h) = self.unlinking.take() {
            let _ = h.await;
        }
    }

    async fn del_node(&mut self, node: &str) -> Result<(), CaptureError> {
        match self
            .qmp
            .execute(&qmp::blockdev_del {
                node_name: node.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(source) => Err(CaptureError::Qmp {
                during: format!("delete node {node}"),
                source,
            }),
        }
    }

    /// Wait for an event (fast path) or until `query` no longer lists `id`.
    async fn wait_gone(
        &mut self,
        pred: &(dyn Fn(&QmpEvent) -> bool + Send + Sync),
        id: &str,
        query: &str,
        parse: impl Fn(&Value) -> Result<Vec<String>, CaptureError>,
    ) -> Result<(), CaptureError> {
        let deadline = tokio::time::Instant::now() + GONE_TIMEOUT;
        loop {
            match self.qmp.wait_event(pred, Duration::from_millis(100)).await {
                Ok(_) => return Ok(()),
                Err(QmpError::Timeout { .. }) => {}
                Err(source) => {
                    return Err(CaptureError::Qmp {
                        during: format!("wait for {id}"),
                        source,
                    });
                }
            }
            let v = self.query(query, None).await?;
            if !parse(&v)?.iter().any(|x| x == id) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CaptureError::Timeout(id.to_string()));
            }
        }
    }
}

fn empty_base() -> qmp::BlockdevOptionsBase {
    qmp::BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name: None,
        read_only: None,
    }
}

/// The cache mode of a fleecing file's nodes: the page cache, and flushes ignored.
fn scratch_cache() -> qmp::BlockdevCacheOptions {
    qmp::BlockdevCacheOptions {
        direct: Some(false),
        no_flush: Some(true),
    }
}

fn node_base(name: &str) -> qmp::BlockdevOptionsBase {
    qmp::BlockdevOptionsBase {
        node_name: Some(name.to_owned()),
        discard: Some(qmp::BlockdevDiscardOptions::unmap),
        ..empty_base()
    }
}

fn file_options(filename: String) -> qmp::BlockdevOptionsFile {
    qmp::BlockdevOptionsFile {
        filename,
        aio: None,
        aio_max_batch: None,
        drop_cache: None,
        locking: None,
        pr_manager: None,
        x_check_cache_dropped: None,
    }
}

fn bitmap_ref(node: &str, name: &str) -> qmp::BlockDirtyBitmap {
    qmp::BlockDirtyBitmap {
        node: node.to_owned(),
        name: name.to_owned(),
    }
}

fn remove_action(node: &str, name: &str) -> qmp::TransactionAction {
    qmp::TransactionAction::block_dirty_bitmap_remove(qmp::BlockDirtyBitmapWrapper {
        data: bitmap_ref(node, name),
    })
}

fn add_action(node: &str, name: &str, persistent: bool, disabled: bool) -> qmp::TransactionAction {
    qmp::TransactionAction::block_dirty_bitmap_add(qmp::BlockDirtyBitmapAddWrapper {
        data: qmp::BlockDirtyBitmapAdd {
            node: node.to_owned(),
            name: name.to_owned(),
            granularity: Some(BITMAP_GRANULARITY),
            persistent: Some(persistent),
            disabled: disabled.then_some(true),
        },
    })
}

fn backup_action(node: &str, names: &Names, i: usize) -> qmp::TransactionAction {
    qmp::TransactionAction::blockdev_backup(qmp::BlockdevBackupWrapper {
        data: qmp::BlockdevBackup {
            target: names.tmp_node(i),
            base: qmp::BackupCommon {
                device: node.to_owned(),
                job_id: Some(names.job(i)),
                sync: qmp::MirrorSyncMode::none,
                auto_dismiss: Some(true),
                auto_finalize: Some(true),
                filter_node_name: Some(names.filter_node(i)),
                bitmap: None,
                bitmap_mode: None,
                compress: None,
                discard_source: None,
                on_source_error: None,
                on_target_error: None,
                speed: None,
                x_perf: None,
            },
        },
    })
}

/// A guest agent session and the limits of one app-consistent cut
/// ([`VmCapture::begin_cycle_quiesced`]).
#[derive(Debug)]
pub struct Quiesce<'g> {
    /// A synchronised session with the VM's guest agent.
    pub agent: &'g mut GuestAgent,
    /// How long `guest-fsfreeze-freeze` (with the guest's hooks) may take.
    pub freeze_timeout: Duration,
    /// Thaw attempts (each: thaw, then status) before giving up.
    pub thaw_attempts: u32,
}

/// What happened to the guest's file systems around a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuiesceReport {
    /// No freeze was asked for: a crash-consistent cut.
    NotAsked,
    /// The cut was taken with every file system frozen: an app-consistent point.
    Frozen {
        /// File systems frozen.
        filesystems: u64,
        /// From the start of the freeze call to the thaw's answer.
        frozen: Duration,
        /// The freeze call alone: the guest's fsfreeze hooks (applications quiescing, not yet
        /// frozen) and the freeze itself; `frozen` minus this is the time the file systems were
        /// frozen, with the cycle transaction inside.
        freeze_call: Duration,
        /// Thaw attempts used.
        thaw_attempts: u32,
        /// The guest could not be confirmed thawed (an error to report loudly).
        thaw_error: Option<String>,
    },
    /// The freeze failed or timed out: the cut was crash-consistent.
    Failed {
        /// Why.
        reason: String,
        /// From the start of the freeze call to the thaw's answer (the guest may have been
        /// partly frozen for this long).
        frozen: Duration,
        /// The guest could not be confirmed thawed.
        thaw_error: Option<String>,
    },
}

impl QuiesceReport {
    /// Whether the cut is app-consistent.
    pub fn app_consistent(&self) -> bool {
        matches!(self, QuiesceReport::Frozen { .. })
    }
}

impl Quiesce<'_> {
    /// Freeze, run `cut`, thaw (in every path), and say what happened. A failed freeze still
    /// runs `cut` (crash-consistent), after the thaw.
    async fn around<T>(self, cut: impl std::future::Future<Output = T>) -> (T, QuiesceReport) {
        let agent = self.agent;
        let start = std::time::Instant::now();
        let froze = agent.fsfreeze_freeze(self.freeze_timeout).await;
        let freeze_call = start.elapsed();
        match froze {
            Ok(filesystems) => {
                let out = cut.await;
                let thawed = agent.thaw_until_thawed(self.thaw_attempts).await;
                let (thaw_attempts, thaw_error, frozen) = match thawed {
                    Ok((n, answered)) => (n, None, answered.duration_since(start)),
                    Err(e) => (self.thaw_attempts, Some(error_chain(&e)), start.elapsed()),
                };
                (
                    out,
                    QuiesceReport::Frozen {
                        filesystems,
                        frozen,
                        freeze_call,
                        thaw_attempts,
                        thaw_error,
                    },
                )
            }
            Err(e) => {
                // A timed-out or failed freeze may have frozen some file systems (or freeze
                // them later): thaw before the cut, whatever the answer was.
                let thawed = agent.thaw_until_thawed(self.thaw_attempts).await;
                let frozen = match &thawed {
                    Ok((_, answered)) => answered.duration_since(start),
                    Err(_) => start.elapsed(),
                };
                let out = cut.await;
                (
                    out,
                    QuiesceReport::Failed {
                        reason: error_chain(&e),
                        frozen,
                        thaw_error: thawed.err().map(|t| error_chain(&t)),
                    },
                )
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// One point-in-time view of all disks of a VM, being read.
pub struct CaptureCycle<'a> {
    vm: &'a mut VmCapture,
    disks: Vec<DiskInfo>,
    mode: CycleMode,
    generation: u64,
    frozen: Option<u64>,
    pipeline: Pipeline,
    trims: Vec<JoinHandle<()>>,
    clients: Vec<NbdClient>,
    /// A verify cycle's whole-view connections, until [`CaptureCycle::read_all`].
    whole: Vec<DiskSource>,
    /// The cycle's own extents were all handed out ([`CaptureCycle::read_all`] went on).
    shipped: bool,
}

impl std::fmt::Debug for CaptureCycle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureCycle")
            .field("disks", &self.disks)
            .field("mode", &self.mode)
            .field("generation", &self.generation)
            .field("bytes_read", &self.pipeline.bytes_read())
            .finish()
    }
}

impl CaptureCycle<'_> {
    /// The disks at the cut, in extent index order.
    pub fn disks(&self) -> &[DiskInfo] {
        &self.disks
    }

    /// Generation of the bitmaps recording since this cut; [`Tracking::Active`] reports it
    /// after [`Self::commit`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Incremental or full.
    pub fn mode(&self) -> CycleMode {
        self.mode
    }

    /// The next extent (disks in order, offsets ascending); `None` when the cycle is read.
    /// Data extents are at most [`crate::PIECE_SIZE`]; zero ranges come as `ExtentData::Zero`.
    pub async fn next_extent(&mut self) -> Result<Option<vmr_proto::Extent>, CaptureError> {
        self.pipeline.next().await
    }

    /// Bytes of data handed out so far.
    pub fn bytes_read(&self) -> u64 {
        self.pipeline.bytes_read()
    }

    /// A verify cycle whose extents were all read: from now on [`Self::next_extent`] hands
    /// out the whole view (every allocated range as data, zero ranges as zero extents, disks
    /// in order, like a full cycle), as it was at the cut. [`Self::commit`] may follow before
    /// that pass ends.
    pub fn read_all(&mut self) -> Result<(), CaptureError> {
        if self.mode != CycleMode::Verify || self.shipped {
            return Err(CaptureError::NotVerifyCycle);
        }
        if !self.pipeline.is_finished() {
            return Err(CaptureError::Incomplete);
        }
        self.shipped = true;
        let whole = std::mem::take(&mut self.whole);
        self.pipeline = Pipeline::new(whole, self.vm.cfg.max_in_flight, false);
        Ok(())
    }

    async fn teardown(&mut self) -> Result<(), CaptureError> {
        for t in self.trims.drain(..) {
            t.abort();
            let _ = t.await;
        }
        self.pipeline.clear();
        for c in self.clients.drain(..) {
            if let Err(e) = c.disconnect().await {
                tracing::debug!(error = %e, "nbd disconnect");
            }
        }
        self.vm.cleanup_graph().await
    }

    /// Call only after the replica durably acknowledged every extent: drops the frozen bitmap
    /// and tears the view down. Committing a cycle that was not read to the end aborts it
    /// instead and returns [`CaptureError::Incomplete`].
    pub async fn commit(mut self) -> Result<(), CaptureError> {
        if !self.shipped && !self.pipeline.is_finished() {
            self.abort_inner().await?;
            return Err(CaptureError::Incomplete);
        }
        let disks: Vec<String> = self.disks.iter().map(|d| d.id.clone()).collect();
        let names = self.vm.names.clone();
        if self.frozen.is_none() {
            // full cycle: the marker is not in use by the export; drop it first so that a
            // failing teardown does not force another full copy
            let acts = disks
                .iter()
                .map(|d| remove_action(d, &names.full_marker(self.generation)))
                .collect();
            self.vm.transaction(acts, "commit full cycle").await?;
        }
        self.teardown().await?;
        if let Some(g) = self.frozen {
            let acts = disks
                .iter()
                .map(|d| remove_action(d, &names.bitmap(g)))
                .collect();
            self.vm.transaction(acts, "drop frozen bitmaps").await?;
        }
        self.vm.sizes = Some(self.disks.iter().map(|d| d.size).collect());
        self.vm.needs_recover = false;
        Ok(())
    }

    /// Tear the view down and merge the frozen bitmap back into the active one: the next cycle
    /// contains everything this one had. An aborted full cycle leaves tracking
    /// [`ResyncReason::InitialCopyIncomplete`].
    pub async fn abort(mut self) -> Result<(), CaptureError> {
        self.abort_inner().await
    }

    async fn abort_inner(&mut self) -> Result<(), CaptureError> {
        for t in self.trims.drain(..) {
            t.abort();
        }
        self.pipeline.clear();
        for c in self.clients.drain(..) {
            let _ = c.disconnect().await;
        }
        self.vm.recover().await
    }
}

impl Drop for CaptureCycle<'_> {
    fn drop(&mut self) {
        // the QEMU side is cleaned by the next recover(); stop background work now
        for t in &self.trims {
            t.abort();
        }
    }
}
