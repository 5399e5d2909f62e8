//! The second capture source: a libvirt-managed VM, captured through libvirt's own
//! incremental-backup API instead of our QMP transaction. A cycle is a pull-mode backup job
//! (`vmr_libvirt`): a point-in-time view of every disk with a scratch file each, exported by
//! the VM's QEMU over NBD on a Unix socket in the work directory, begun atomically with a new
//! checkpoint; the changed blocks since the last acknowledged checkpoint are the exported
//! `qemu:dirty-bitmap:backup-<disk>` context, read with our NBD client through the same
//! pipeline as a QMP cycle. Which checkpoint, what is deleted when and when only a resync is
//! correct is `vmr_core::checkpoints::CheckpointChain`; this module carries its actions out.
//!
//! [`LibvirtCycle::commit`] (after the replica's acknowledgement) ends the job and deletes the
//! older checkpoint; [`LibvirtCycle::abort`], or the next [`LibvirtCapture::begin_cycle`]
//! after a crash, ends the job and deletes the cycle's new checkpoint, so the next delta is
//! taken from the older one again: nothing is lost.
//!
//! After each acknowledged cycle the capture reads the new checkpoint's description
//! ([`LibvirtCapture::acked_xml`], recorded by the agent with the VM): when libvirt's metadata
//! of the acknowledged checkpoint is lost (a migration, a libvirtd state loss) while its bitmaps
//! remain in the images, the next cycle redefines it from that description (libvirt validates
//! the bitmaps) and stays a delta; a bitmap missing or inconsistent makes it a full resync.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmr_core::checkpoints::{BeginFailure, ChainAction, ChainEvent, ChainStats, CheckpointChain};
use vmr_libvirt::{BackupPlan, Domain, DomainDisk, Libvirt, LibvirtError};
use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};
use vmr_proto::clock::now_ms;

use crate::reader::{DiskSource, Pipeline, Want};
use crate::{CaptureError, ResyncReason};

/// Where and how to capture a libvirt domain.
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// libvirt connection URI.
    pub uri: String,
    /// Domain name.
    pub domain: String,
    /// Directory for the NBD socket and the scratch files (libvirt's QEMU writes them: it must
    /// be reachable and writable by it).
    pub work_dir: PathBuf,
    /// NBD reads in flight per cycle.
    pub max_in_flight: usize,
    /// Limit of each NBD handshake and request.
    pub timeout: Duration,
}

struct Handle {
    // kept open for the domain's life
    _lv: Libvirt,
    dom: Domain,
    /// Held by each libvirt call for as long as it runs. A caller's future dropped mid-call
    /// (a cancelled cycle) does not stop the call on its blocking thread: a `backupBegin` may
    /// still land after the cancel. Whatever is asked next waits for it, so
    /// [`LibvirtCapture::end_own_job`] sees (and ends) a job begun that late.
    calls: std::sync::Mutex<()>,
}

/// A libvirt domain being replicated: its connection and its checkpoint chain.
pub struct LibvirtCapture {
    cfg: LibvirtConfig,
    h: Arc<Handle>,
    chain: CheckpointChain,
    disks: Vec<DomainDisk>,
    /// The acked checkpoint's description (name, XML), to redefine its lost metadata.
    acked_xml: Option<(String, String)>,
}

impl std::fmt::Debug for LibvirtCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtCapture")
            .field("uri", &self.cfg.uri)
            .field("domain", &self.cfg.domain)
            .field("acked", &self.chain.acked())
            .finish()
    }
}

async fn blocking<T, F>(h: &Arc<Handle>, f: F) -> Result<T, CaptureError>
where
    T: Send + 'static,
    F: FnOnce(&Domain) -> Result<T, LibvirtError> + Send + 'static,
{
    let h = h.clone();
    tokio::task::spawn_blocking(move || {
        // a poisoned lock only means an earlier call panicked: the domain is still usable
        let _call = h.calls.lock().unwrap_or_else(|p| p.into_inner());
        f(&h.dom)
    })
    .await
    .map_err(CaptureError::LibvirtTask)?
    .map_err(CaptureError::from)
}

impl LibvirtCapture {
    /// Connect, look the domain up and read its disks. `acked` is the last acknowledged
    /// checkpoint from the VM's record (`None`: the first cycle is a full one).
    pub async fn open(
        cfg: LibvirtConfig,
        acked: Option<String>,
    ) -> Result<LibvirtCapture, CaptureError> {
        std::fs::create_dir_all(&cfg.work_dir).map_err(|source| CaptureError::Io {
            what: "create work directory",
            path: cfg.work_dir.display().to_string(),
            source,
        })?;
        let (uri, name) = (cfg.uri.clone(), cfg.domain.clone());
        let (h, disks) = tokio::task::spawn_blocking(move || {
            let lv = Libvirt::open(&uri)?;
            let dom = lv.domain(&name)?;
            let disks = dom.disks()?;
            Ok::<_, LibvirtError>((
                Handle {
                    _lv: lv,
                    dom,
                    calls: std::sync::Mutex::new(()),
                },
                disks,
            ))
        })
        .await
        .map_err(CaptureError::LibvirtTask)??;
        Ok(LibvirtCapture {
            cfg,
            h: Arc::new(h),
            chain: CheckpointChain::new(acked),
            disks,
            acked_xml: None,
        })
    }

    /// The recorded description of the acked checkpoint (from the VM's record, as
    /// [`LibvirtCapture::acked_xml`] gave it): lost metadata of that checkpoint is redefined
    /// from it. A description of another checkpoint is ignored.
    pub fn set_acked_xml(&mut self, xml: Option<String>) {
        self.acked_xml = xml.and_then(|x| {
            let name = vmr_libvirt::xml::checkpoint_name(&x)?;
            Some((name, x))
        });
    }

    /// The acked checkpoint's description, read after its cycle was acknowledged (record it
    /// with the VM); `None` when it could not be read.
    pub fn acked_xml(&self) -> Option<&str> {
        match (&self.acked_xml, self.chain.acked()) {
            (Some((n, x)), Some(a)) if n == a => Some(x),
            _ => None,
        }
    }

    /// The disks captured, in extent index order.
    pub fn disks(&self) -> &[DomainDisk] {
        &self.disks
    }

    /// The last acknowledged checkpoint (persist it with the VM's record after each cycle).
    pub fn acked(&self) -> Option<&str> {
        self.chain.acked()
    }

    /// Busy waits and resyncs so far.
    pub fn stats(&self) -> ChainStats {
        self.chain.stats()
    }

    /// The disks of the running domain now (its live definition), which may differ from
    /// [`LibvirtCapture::disks`] (read at open) after a disk was attached.
    pub async fn live_disks(&self) -> Result<Vec<DomainDisk>, CaptureError> {
        blocking(&self.h, |d| d.disks()).await
    }

    /// The domain's persistent XML (replicated with the disks).
    pub async fn domain_xml(&self) -> Result<String, CaptureError> {
        blocking(&self.h, |d| d.xml(true)).await
    }

    /// End this capture's backup job if it still runs: a cycle dropped mid-way (the VM's
    /// replication paused, disabled, or the agent stopping) would otherwise leave its
    /// point-in-time view copying the guest's first write to each cluster into the scratch
    /// files until the next cycle. Another tool's job is left alone. The dropped cycle's new
    /// checkpoint stays until the next start deletes it (nothing is lost: the next delta is
    /// taken from the acknowledged one). A libvirt call of the dropped cycle still running
    /// (a `backupBegin`) is waited for first, so a job it begins is ended too. Returns whether
    /// a job was ended.
    pub async fn end_own_job(&self) -> Result<bool, CaptureError> {
        let own = self.socket();
        let wait = self.cfg.timeout;
        blocking(&self.h, move |d| {
            let job = d.backup_job()?;
            if job
                .as_ref()
                .and_then(|j| j.socket.as_deref())
                .is_some_and(|s| s == own)
            {
                d.abort_job(wait)?;
                Ok(true)
            } else {
                Ok(false)
            }
        })
        .await
    }

    fn socket(&self) -> PathBuf {
        self.cfg.work_dir.join("backup.sock")
    }

    fn scratch(&self, target: &str) -> PathBuf {
        self.cfg.work_dir.join(format!("scratch-{target}.qcow2"))
    }

    /// Carry out the chain's actions up to a `Begin`, which is returned.
    async fn carry_out(
        &mut self,
        acts: Vec<ChainAction>,
        resync: &mut Option<String>,
    ) -> Result<Option<(Option<String>, String)>, CaptureError> {
        let mut begin = None;
        for a in acts {
            match a {
                ChainAction::AbortJob => {
                    let wait = self.cfg.timeout;
                    blocking(&self.h, move |d| d.abort_job(wait)).await?
                }
                ChainAction::Delete(name) => {
                    match blocking(&self.h, move |d| d.delete_checkpoint(&name)).await {
                        Ok(())
                        | Err(CaptureError::Libvirt(LibvirtError::CheckpointMissing { .. })) => {}
                        Err(e) => return Err(e),
                    }
                }
                ChainAction::Begin { from, new } => begin = Some((from, new)),
                ChainAction::Wait { ms } => {
                    return Err(CaptureError::BackupBusy {
                        detail: "another job runs on the domain".into(),
                        retry_after_ms: ms,
                    });
                }
                ChainAction::Resync(cause) => *resync = Some(format!("{cause:?}")),
                // carried out by begin_cycle before anything else
                ChainAction::Redefine(_) | ChainAction::FullDisks(_) => {}
                // the caller reads `acked()` after the cycle and persists it
                ChainAction::Record(_) => {}
            }
        }
        Ok(begin)
    }

    /// Begin a cycle: a full one when no checkpoint is acknowledged (or the chain cannot be
    /// trusted: [`LibvirtCycle::resync`] says why), a delta otherwise. Another job on the
    /// domain is [`CaptureError::BackupBusy`] (nothing changed; try again later).
    pub async fn begin_cycle(&mut self) -> Result<LibvirtCycle<'_>, CaptureError> {
        let own = self.socket();
        let mut resync = None;
        // at most twice: a failed redefinition makes the chain start over (a full cycle)
        let mut tries = 0;
        let acts = loop {
            tries += 1;
            let (present, job, active) = blocking(&self.h, |d| {
                Ok((d.checkpoints()?, d.backup_job()?, d.job_active()?))
            })
            .await?;
            let own_job = job
                .as_ref()
                .and_then(|j| j.socket.as_deref())
                .is_some_and(|s| s == own);
            let uncovered = self.uncovered(&present).await;
            let ev = ChainEvent::Start {
                present,
                own_job,
                other_job: active && !own_job,
                redefinable: self.acked_xml().is_some(),
                uncovered,
                now_ms: now_ms(),
            };
            let mut acts = self.chain.step(ev).map_err(CaptureError::Chain)?;
            let Some(ChainAction::Redefine(name)) = acts.first().cloned() else {
                break acts;
            };
            acts.remove(0);
            let xml = self.acked_xml().unwrap_or_default().to_owned();
            let redefined = {
                let name = name.clone();
                blocking(&self.h, move |d| d.redefine_checkpoint(&name, &xml)).await
            };
            match redefined {
                Ok(()) => {
                    tracing::info!(domain = %self.cfg.domain, checkpoint = %name, "lost checkpoint metadata redefined from the record: the cycle stays a delta");
                    break acts;
                }
                Err(CaptureError::Libvirt(l)) if l.is_retryable() => {
                    let acts = self
                        .chain
                        .step(ChainEvent::BeginFailed {
                            failure: BeginFailure::Busy,
                            now_ms: now_ms(),
                        })
                        .map_err(CaptureError::Chain)?;
                    self.carry_out(acts, &mut resync).await?;
                    return Err(CaptureError::Libvirt(l));
                }
                Err(e) if tries < 2 => {
                    tracing::warn!(domain = %self.cfg.domain, checkpoint = %name, "the checkpoint's lost metadata cannot be redefined, the chain starts over: {e}");
                    let acts = self
                        .chain
                        .step(ChainEvent::RedefineFailed {
                            message: e.to_string(),
                            now_ms: now_ms(),
                        })
                        .map_err(CaptureError::Chain)?;
                    self.carry_out(acts, &mut resync).await?;
                }
                Err(e) => {
                    let _ = self.chain.step(ChainEvent::RedefineFailed {
                        message: e.to_string(),
                        now_ms: now_ms(),
                    });
                    return Err(e);
                }
            }
        };
        let full_disks: Vec<String> = acts
            .iter()
            .find_map(|a| match a {
                ChainAction::FullDisks(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let (from, new) = match self.carry_out(acts, &mut resync).await {
            Ok(Some(b)) => b,
            // another job: the chain began no cycle
            Err(e @ CaptureError::BackupBusy { .. }) => return Err(e),
            Ok(None) => return Err(CaptureError::NoJobBegun),
            Err(e) => {
                // a cleanup before the job failed: no job began, the chain is told so
                let _ = self.chain.step(ChainEvent::BeginFailed {
                    failure: BeginFailure::Other,
                    now_ms: now_ms(),
                });
                return Err(e);
            }
        };
        let _ = std::fs::remove_file(&own);
        let plan = BackupPlan {
            incremental: from.clone(),
            checkpoint: new,
            socket: own.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| {
                    let s = self.scratch(&d.target);
                    let _ = std::fs::remove_file(&s);
                    (d.target.clone(), s)
                })
                .collect(),
            full_disks: full_disks.clone(),
        };
        let began = {
            let plan = plan.clone();
            let work = self.cfg.work_dir.clone();
            blocking(&self.h, move |d| {
                let slowed = begin_slow_hook(&work);
                let r = d.begin_backup(&plan);
                begun_mark(&work, slowed, &r);
                r
            })
            .await
        };
        if let Err(e) = began {
            let failure = match &e {
                CaptureError::Libvirt(l) if l.is_retryable() => BeginFailure::Busy,
                CaptureError::Libvirt(l) if l.needs_resync() => BeginFailure::Resync,
                _ => BeginFailure::Other,
            };
            let acts = self
                .chain
                .step(ChainEvent::BeginFailed {
                    failure: failure.clone(),
                    now_ms: now_ms(),
                })
                .map_err(CaptureError::Chain)?;
            let mut why = None;
            self.carry_out(acts, &mut why).await?;
            return Err(match failure {
                BeginFailure::Resync => CaptureError::ResyncRequired {
                    reason: ResyncReason::CheckpointUntrusted {
                        detail: e.to_string(),
                    },
                },
                _ => e,
            });
        }
        if !full_disks.is_empty() {
            tracing::info!(domain = %self.cfg.domain, disks = ?full_disks, "disks added to the domain since the acknowledged checkpoint: read whole in this delta");
        }
        match self.connect(&own, from.is_some(), &full_disks).await {
            Ok(sources) => Ok(LibvirtCycle {
                pipeline: Pipeline::new(sources.0, self.cfg.max_in_flight, true),
                clients: sources.1,
                full: from.is_none(),
                full_disks,
                resync,
                cap: self,
                done: false,
            }),
            Err(e) => {
                self.fail().await;
                Err(e)
            }
        }
    }

    /// The captured disks the acked checkpoint (when present) has no bitmap for: from its
    /// recorded description, else libvirt's. Unknown is none (libvirt then refuses a job whose
    /// checkpoint lacks a disk's bitmap, which is a resync).
    async fn uncovered(&self, present: &[String]) -> Vec<String> {
        let Some(acked) = self.chain.acked().map(str::to_owned) else {
            return Vec::new();
        };
        if !present.contains(&acked) {
            return Vec::new();
        }
        let xml = match self.acked_xml() {
            Some(x) => x.to_owned(),
            None => {
                let n = acked.clone();
                match blocking(&self.h, move |d| d.checkpoint_xml(&n)).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(checkpoint = %acked, "reading the checkpoint's description: {e}");
                        return Vec::new();
                    }
                }
            }
        };
        match vmr_libvirt::xml::checkpoint_disks(&xml) {
            Ok(covered) => self
                .disks
                .iter()
                .filter(|d| !covered.contains(&d.target))
                .map(|d| d.target.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    async fn connect(
        &self,
        socket: &Path,
        incremental: bool,
        full_disks: &[String],
    ) -> Result<(Vec<DiskSource>, Vec<NbdClient>), CaptureError> {
        let ep = Endpoint::Unix(socket.to_path_buf());
        let (mut sources, mut clients) = (Vec::new(), Vec::new());
        for (i, d) in self.disks.iter().enumerate() {
            let (export, bitmap) = vmr_libvirt::xml::export_of(&d.target);
            let (context, want) = if incremental && !full_disks.contains(&d.target) {
                (bitmap, Want::Dirty)
            } else {
                ("base:allocation".to_string(), Want::Allocated)
            };
            let client = NbdClient::connect(
                &ep,
                ConnectOptions {
                    export,
                    meta_contexts: vec![context.clone()],
                    max_in_flight: self.cfg.max_in_flight.max(1) + 8,
                    timeout: self.cfg.timeout,
                },
            )
            .await?;
            if client.meta_context_id(&context).is_none() {
                return Err(CaptureError::NoMetaContext {
                    server: format!("libvirt's nbd export of {}", d.target),
                    context,
                });
            }
            clients.push(client.clone());
            sources.push(DiskSource {
                index: i as u32,
                size: client.size(),
                client,
                context,
                want,
                // libvirt exports the view read-only
                trim: false,
            });
        }
        Ok((sources, clients))
    }

    /// The cycle failed after its job began: end the job, drop its new checkpoint (best
    /// effort: a leftover is deleted by the next start).
    async fn fail(&mut self) {
        let acts = match self.chain.step(ChainEvent::Failed { now_ms: now_ms() }) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "libvirt cycle failure");
                return;
            }
        };
        let mut none = None;
        if let Err(e) = self.carry_out(acts, &mut none).await {
            tracing::warn!(error = %e, "cleaning up a failed libvirt backup cycle");
        }
    }
}

/// Test hook (cargo feature `test-hooks` only): while a file of this name in the capture's
/// work directory holds a number of ms, each `backupBegin` waits that long first (on its
/// blocking thread, as a slow libvirtd would), having written [`BEGIN_SLOW_MARK`]; when the
/// slowed call returns, [`BEGUN_MARK`] is written, holding `begun` or why the call failed. A
/// test cancels a cycle inside the call.
#[cfg(feature = "test-hooks")]
pub const BEGIN_SLOW_HOOK: &str = "test-backup-begin-slow-ms";
/// See [`BEGIN_SLOW_HOOK`].
#[cfg(feature = "test-hooks")]
pub const BEGIN_SLOW_MARK: &str = "test-backup-begin-waiting";
/// See [`BEGIN_SLOW_HOOK`].
#[cfg(feature = "test-hooks")]
pub const BEGUN_MARK: &str = "test-backup-begun";

#[cfg(feature = "test-hooks")]
fn begin_slow_hook(work: &Path) -> bool {
    let Some(ms) = std::fs::read_to_string(work.join(BEGIN_SLOW_HOOK))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return false;
    };
    let _ = std::fs::write(work.join(BEGIN_SLOW_MARK), "");
    std::thread::sleep(Duration::from_millis(ms));
    true
}

#[cfg(feature = "test-hooks")]
fn begun_mark(work: &Path, slowed: bool, r: &Result<(), LibvirtError>) {
    if slowed {
        let what = match r {
            Ok(()) => "begun".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let _ = std::fs::write(work.join(BEGUN_MARK), what);
    }
}

#[cfg(not(feature = "test-hooks"))]
fn begin_slow_hook(_work: &Path) -> bool {
    false
}

#[cfg(not(feature = "test-hooks"))]
fn begun_mark(_work: &Path, _slowed: bool, _r: &Result<(), LibvirtError>) {}

/// One libvirt backup job being read.
pub struct LibvirtCycle<'a> {
    cap: &'a mut LibvirtCapture,
    pipeline: Pipeline,
    clients: Vec<NbdClient>,
    full: bool,
    full_disks: Vec<String>,
    resync: Option<String>,
    done: bool,
}

impl std::fmt::Debug for LibvirtCycle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtCycle")
            .field("full", &self.full)
            .field("resync", &self.resync)
            .finish()
    }
}

impl LibvirtCycle<'_> {
    /// For a consumer that keeps extents while it asks for the next (a block-hash resync
    /// hashing ahead): reads from here on are not under the process's budget for read data
    /// (`reader::Pipeline::new` says why). Call it before the first extent.
    pub fn keeps_extents(&mut self) {
        self.pipeline.unbudgeted();
    }

    /// A full copy (the first cycle, or a resync).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Disks read whole in this delta (added to the domain since the acked checkpoint).
    pub fn full_disks(&self) -> &[String] {
        &self.full_disks
    }

    /// Why the chain was started over, when it was.
    pub fn resync(&self) -> Option<&str> {
        self.resync.as_deref()
    }

    /// The size of every disk's view, in extent index order.
    pub fn sizes(&self) -> Vec<u64> {
        self.clients.iter().map(|c| c.size()).collect()
    }

    /// The next extent (disks in order, offsets ascending); `None` when the cycle is read.
    pub async fn next_extent(&mut self) -> Result<Option<vmr_proto::Extent>, CaptureError> {
        self.pipeline.next().await
    }

    /// Bytes of data handed out so far.
    pub fn bytes_read(&self) -> u64 {
        self.pipeline.bytes_read()
    }

    async fn disconnect(&mut self) {
        self.pipeline.clear();
        for c in self.clients.drain(..) {
            if let Err(e) = c.disconnect().await {
                tracing::debug!(error = %e, "nbd disconnect");
            }
        }
    }

    /// Call only after the replica durably acknowledged every extent: ends the job and deletes
    /// the older checkpoint. A cycle not read to the end is aborted instead
    /// ([`CaptureError::Incomplete`]).
    pub async fn commit(mut self) -> Result<(), CaptureError> {
        self.done = true;
        if !self.pipeline.is_finished() {
            self.disconnect().await;
            self.cap.fail().await;
            return Err(CaptureError::Incomplete);
        }
        self.disconnect().await;
        let acts = self
            .cap
            .chain
            .step(ChainEvent::Acknowledged { now_ms: now_ms() })
            .map_err(CaptureError::Chain)?;
        let mut none = None;
        self.cap.carry_out(acts, &mut none).await?;
        // the new acked checkpoint's description, to redefine its metadata if it is lost
        self.cap.acked_xml = None;
        if let Some(name) = self.cap.chain.acked().map(str::to_owned) {
            let n = name.clone();
            match blocking(&self.cap.h, move |d| d.checkpoint_xml(&n)).await {
                Ok(x) => match vmr_libvirt::xml::redefinable_checkpoint(&x) {
                    Ok(x) => self.cap.acked_xml = Some((name, x)),
                    Err(e) => tracing::warn!(checkpoint = %name, "checkpoint description: {e}"),
                },
                Err(e) => {
                    tracing::warn!(checkpoint = %name, "reading the checkpoint's description: {e}")
                }
            }
        }
        Ok(())
    }

    /// End the job and drop its new checkpoint: the next delta is taken from the older one.
    pub async fn abort(mut self) -> Result<(), CaptureError> {
        self.done = true;
        self.disconnect().await;
        self.cap.fail().await;
        Ok(())
    }
}

impl Drop for LibvirtCycle<'_> {
    fn drop(&mut self) {
        if !self.done {
            // the job stays until the next begin_cycle finds it as ours and ends it
            tracing::warn!("a libvirt backup cycle was dropped without commit or abort");
        }
    }
}
