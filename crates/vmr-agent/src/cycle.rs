//! One primary cycle's I/O, run in a task of its own while the VM's owner keeps serving
//! commands: open the capture and the connection (a [`Session`] the owner lends to the task
//! and gets back), reconcile with the replica, take the point-in-time view, stream the dirty
//! extents, commit or abort. The task reports an [`Outcome`]; it never touches the VM's state.

use std::sync::Arc;
use std::sync::Mutex;

use futures::StreamExt;
use vmr_capture::libvirt::{LibvirtCapture, LibvirtConfig};
use vmr_capture::qga::GuestAgent;
use vmr_capture::{CaptureConfig, CaptureError, CycleMode, Quiesce, QuiesceReport, VmCapture};
use vmr_core::{Failure, QuiesceOutcome};
use vmr_proto::api::{CreateReplica, EnableArgs, OperationKind, OperationProgress};
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, VmDefinition};
use vmr_transport::{Client, TransportError};

use crate::host::Host;
use crate::util::now_ms;
use vmr_proto::record::VmRecord;

/// What a cycle task keeps between cycles: the open capture and the replica connection.
#[derive(Default)]
pub struct Session {
    /// The VM's capture (QMP + NBD), opened on first use.
    pub capture: Option<VmCapture>,
    /// A libvirt-managed VM's capture (`vm add --libvirt`): its connection and checkpoint
    /// chain, opened on first use from the record's acknowledged checkpoint.
    pub libvirt: Option<LibvirtCapture>,
    /// The connection to the replica, opened on first use.
    pub client: Option<Client>,
    /// The guest freeze outcome of the last cycle that asked for one (taken by the owner).
    pub quiesce: Option<QuiesceOutcome>,
    /// What the last verify cycle's comparison found, or why it could not compare (taken by
    /// the owner).
    pub verify: Option<Result<vmr_proto::api::VerifyReport, Failure>>,
    /// A libvirt VM's refreshed definition TOML and replicated disks (its domain XML
    /// changed, perhaps with disks added), stored by the replica during the last cycle (taken
    /// by the owner, which records them).
    pub definition: Option<(String, Vec<String>)>,
}

/// How long a guest agent has to answer the session's sync and each thaw or status call.
pub const QGA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long `guest-fsfreeze-freeze` (with the guest's fsfreeze hooks) may take: far below the
/// 10 s after which Windows VSS gives up a freeze by itself.
pub const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);
/// Thaw attempts (thaw, then status) before a still-frozen guest is reported as an error.
pub const THAW_ATTEMPTS: u32 = 5;

/// A synchronised session with the VM's guest agent (`vm add --qga`, or `{qga}` of a VM the
/// agent started), or why there is none.
pub async fn guest_agent(rec: &VmRecord) -> Result<GuestAgent, String> {
    let Some(path) = &rec.qga else {
        return Err(
            "no guest agent channel is known for this VM (vm add --qga SOCK, or {qga} in the definition)"
                .into(),
        );
    };
    GuestAgent::connect(std::path::Path::new(path), QGA_TIMEOUT)
        .await
        .map_err(|e| crate::util::chain(&e))
}

/// Progress of the running cycle, written by its task and read by `status`: what runs, how
/// far through the disks it got and how many data bytes it shipped.
#[derive(Default)]
pub struct Progress {
    op: Mutex<Option<OperationProgress>>,
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OperationProgress>> {
        // A panicking writer leaves a plain value behind: still readable.
        self.op
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status's `progress` pair: a resync's bytes compared and the disks' total, else the
    /// data bytes shipped and 0 (unknown total); (0, 0) before the operation started.
    pub fn get(&self) -> (u64, u64) {
        match *self.lock() {
            Some(p) if p.kind == OperationKind::Resync => (p.done, p.total),
            Some(p) => (p.sent, 0),
            None => (0, 0),
        }
    }

    /// The running operation, once it started.
    pub fn operation(&self) -> Option<OperationProgress> {
        *self.lock()
    }

    /// An operation of `kind` over `total` bytes of disks (0: unknown) starts at `now_ms`.
    pub fn start(&self, kind: OperationKind, total: u64, now_ms: u64) {
        *self.lock() = Some(OperationProgress {
            kind,
            done: 0,
            total,
            sent: 0,
            started_ms: now_ms,
        });
    }

    /// The operation went through `done` bytes of the disks and shipped `sent` data bytes.
    pub fn advance(&self, done: u64, sent: u64) {
        if let Some(p) = self.lock().as_mut() {
            p.done = done;
            p.sent = sent;
        }
    }

    /// Nothing runs (a new task starts).
    pub fn clear(&self) {
        *self.lock() = None;
    }
}

/// Where each disk starts when the disks' bytes are counted one disk after the other.
pub fn disk_bases(sizes: &[u64]) -> Vec<u64> {
    sizes
        .iter()
        .scan(0u64, |acc, s| {
            let base = *acc;
            *acc = acc.saturating_add(*s);
            Some(base)
        })
        .collect()
}

/// How far through the disks (counted as by [`disk_bases`]) extent `e` reaches.
pub fn position(bases: &[u64], e: &Extent) -> u64 {
    let base = bases.get(e.disk as usize).copied().unwrap_or(0);
    base.saturating_add(e.offset).saturating_add(e.len())
}

/// What a cycle task needs to know: a copy of the VM's record as the owner had it when the
/// cycle started.
pub struct CycleCtx {
    /// Host resources.
    pub host: Arc<Host>,
    /// The consistency group this cycle cuts with (docs/groups.md), when it does.
    pub group: Option<String>,
    /// Set once the cycle joined its group's cut (the owner holds a clone: a cycle that
    /// will still join needs no second one for a gathering cut).
    pub joined: Arc<std::sync::atomic::AtomicBool>,
    /// The VM's record at the start of the cycle.
    pub rec: VmRecord,
    /// The last cycle the machine holds as replicated.
    pub last_cycle: Option<u64>,
    /// The cycle is a planned failover's final cycle (consistency `Planned`).
    pub planned: bool,
    /// Reconcile with the replica before the cycle.
    pub reconcile: bool,
    /// A resync reads the replica's data instead of trusting its block-hash index (after a
    /// verification found a mismatch).
    pub read_hashes: bool,
    /// Where the task reports progress.
    pub progress: Arc<Progress>,
    /// The VM's sending limit (the agent's is `host.pace`).
    pub pace: Arc<crate::pace::VmPace>,
    /// The relationship the cycle is of (0: the first; else a fan-out slot): names its
    /// tracking bitmaps and capture nodes ([`capture_tag`]).
    pub slot: u32,
}

impl CycleCtx {
    /// The pace of a cycle body under the VM's and the agent's limits; the VM's counters of
    /// the wait start again.
    pub fn body_pace(&self) -> Arc<dyn vmr_transport::Pace> {
        self.pace.start_cycle();
        Arc::new(crate::pace::CyclePace {
            vm: self.pace.clone(),
            agent: self.host.pace.clone(),
        })
    }
}

/// What one attempted cycle came to.
pub enum Outcome {
    /// Acknowledged by the replica and committed here.
    Done {
        /// The cycle's id (a resync renumbers its cycle after the replica's latest point).
        id: u64,
        /// Data bytes shipped.
        bytes: u64,
        /// Disk sizes at the cut.
        sizes: Vec<u64>,
        /// App-consistent.
        app: bool,
        /// Bytes changed since the cut (from the tracking bitmaps).
        pending: Option<u64>,
    },
    /// Reconciliation found the replica holding another cycle than the machine thinks
    /// (a lost acknowledgement, a restart): the machine must re-plan.
    Reconciled {
        /// The replica's latest cycle.
        latest: Option<u64>,
    },
    /// The replica's latest cycle, asked for by the machine (`QueryReplica`).
    ReplicaHas {
        /// The replica's latest cycle.
        latest: Option<u64>,
    },
    /// Failed (and aborted: its changes are merged back).
    Failed(Failure),
    /// Cancelled by the owner (pause, disable, shutdown).
    Cancelled,
}

/// The `create-replica` request for a VM: its definition and replicated disks.
pub fn create_request(rec: &VmRecord, def: &VmDefinition, args: &EnableArgs) -> CreateReplica {
    CreateReplica {
        launch_toml: rec.launch_toml.clone(),
        uuid: rec.uuid,
        name: def.name.clone(),
        disks: rec
            .disks
            .iter()
            .filter(|d| !args.exclude_disks.contains(d))
            .map(|d| DiskInfo {
                id: d.clone(),
                size: 0,
            })
            .collect(),
        frequency_secs: args.frequency_secs,
        recovery_points: args.recovery_points,
        retain: args.retain.clone(),
        auto_failover: rec.auto_failover.clone(),
    }
}

/// Connect to the replica named in `args`.
pub async fn connect(host: &Host, args: &EnableArgs) -> Result<Client, TransportError> {
    Client::connect(
        &args.replica,
        &host.identity,
        &args.replica_fingerprint,
        crate::config::client_options(&host.config),
    )
    .await
}

/// The NBD socket of a primary VM's capture: the one `launch::nbd_socket` names, or, after an
/// upgrade from an agent that named work directories by the UUID's first 8 hex digits, the
/// NBD server that agent started in the VM's QEMU (`work/<tag>/vmr-<tag>-nbd.sock`) while it
/// answers and the new one does not, unless another VM registered here shares the tag (then
/// that server may be the other VM's).
/// A socket named at `vm add --nbd` comes first.
fn nbd_socket_of(host: &Host, rec: &VmRecord) -> std::path::PathBuf {
    use std::os::unix::net::UnixStream;
    if let Some(n) = &rec.nbd {
        return n.into();
    }
    let new = crate::launch::nbd_socket(&host.dir, rec.uuid);
    let legacy = crate::launch::legacy_nbd_socket(&host.dir, rec.uuid);
    if UnixStream::connect(&new).is_ok() || UnixStream::connect(&legacy).is_err() {
        return new;
    }
    let tag = crate::launch::tag(rec.uuid);
    let shared = host.load_vms().map_or(true, |vms| {
        vms.iter()
            .any(|v| v.uuid != rec.uuid && crate::launch::tag(v.uuid) == tag)
    });
    if shared {
        tracing::warn!(vm = %rec.name, socket = %legacy.display(), "an NBD server answers at the old socket path, which another VM's tag shares; not using it");
        return new;
    }
    tracing::info!(vm = %rec.name, socket = %legacy.display(), "using the NBD server an older agent started");
    legacy
}

/// The capture configuration of a primary VM.
pub fn capture_config(host: &Host, rec: &VmRecord, slot: u32) -> CaptureConfig {
    let excluded: &[String] = rec
        .enable
        .as_ref()
        .map_or(&[], |e| e.exclude_disks.as_slice());
    let mut cfg = CaptureConfig::new(
        vmr_capture::Endpoint::Unix(rec.qmp.clone().into()),
        rec.disks
            .iter()
            .filter(|d| !excluded.contains(d))
            .cloned()
            .collect(),
        crate::launch::work_dir(&host.dir, rec.uuid),
        capture_tag(rec.uuid, slot),
    );
    cfg.nbd_socket = Some(nbd_socket_of(host, rec));
    cfg.expected_sizes = rec.disk_sizes().map(<[u64]>::to_vec);
    cfg
}

/// The capture tag of relationship `slot` of VM `uuid`: the VM's tag for the first
/// relationship (the names it always had), `<tag>r<slot>` for a fan-out relationship, so that
/// each relationship has its own tracking bitmaps, fleecing nodes, jobs and NBD exports
/// (`vmr-<tag>r<slot>-*`, within QEMU's 31-character node names) and one relationship's
/// cleanup never touches another's (the names' prefixes differ).
pub fn capture_tag(uuid: uuid::Uuid, slot: u32) -> String {
    let tag = crate::launch::tag(uuid);
    if slot == 0 {
        tag
    } else {
        format!("{tag}r{slot}")
    }
}

/// Remove the tracking bitmaps of relationship `slot` of the VM (its replication disabled).
pub async fn stop_tracking(host: &Host, rec: &VmRecord, slot: u32) -> Result<(), CaptureError> {
    if rec.libvirt.is_some() {
        // its vmreplica-* checkpoint stays on the domain; the next full cycle deletes it
        return Ok(());
    }
    let mut cap = VmCapture::open(capture_config(host, rec, slot)).await?;
    cap.stop_tracking().await
}

/// How long ending a cancelled cycle's point-in-time view may take (below the 20 s an owner
/// stopping waits for its cycle task).
pub const END_VIEW_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// After a cycle was cancelled mid-way (pause, disable, the agent stopping): end its
/// point-in-time view now instead of at the next cycle. Left in place, QEMU's
/// copy-before-write filter would copy the guest's first write to each cluster into the
/// fleecing file (a libvirt job: its scratch files) for as long as replication stays paused,
/// up to the size of the disks. The dropped cycle's QMP connection may have been mid-command,
/// so a fresh one is opened: its recovery removes the view and merges the cycle's frozen
/// bitmaps back (no change is lost), and it is closed again (the next cycle opens its own).
/// Best effort: what cannot be ended now is ended by the next cycle's open, as after a crash.
pub async fn end_cancelled(host: &Host, rec: &VmRecord, slot: u32, session: &mut Session) {
    session.capture = None;
    let ended = if rec.libvirt.is_some() {
        // A libvirt job dropped mid-cycle: the capture (its chain) is opened afresh next time.
        let Some(capture) = session.libvirt.take() else {
            return;
        };
        match tokio::time::timeout(END_VIEW_LIMIT, capture.end_own_job()).await {
            Ok(Ok(ended)) => Ok(ended),
            Ok(Err(e)) => Err(crate::util::chain(&e)),
            Err(_) => Err(format!("no answer within {END_VIEW_LIMIT:?}")),
        }
    } else {
        // The sizes are not checked: a resync may have been restarting tracking.
        let mut cfg = capture_config(host, rec, slot);
        cfg.expected_sizes = None;
        match tokio::time::timeout(END_VIEW_LIMIT, VmCapture::open(cfg)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(crate::util::chain(&e)),
            Err(_) => Err(format!("no answer within {END_VIEW_LIMIT:?}")),
        }
    };
    match ended {
        Ok(true) => {
            tracing::info!(vm = %rec.name, "the cancelled cycle's point-in-time view is ended")
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(
            vm = %rec.name,
            "could not end the cancelled cycle's point-in-time view now (the next cycle's open ends what is left): {e}"
        ),
    }
}

/// How long `disable` waits for the replica to hear of it before it goes on without.
pub const TELL_DISABLED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a replica that could not be told of a disable is tried again in the background.
pub const TELL_DISABLED_RETRY: std::time::Duration = std::time::Duration::from_secs(10);
/// How long it is tried (then `vmreplica disable NAME` on the replica is the way).
pub const TELL_DISABLED_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What telling the replica of a disable reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    /// The replica VM's state afterwards.
    Shown(vmr_proto::api::ReplicationState),
    /// The replica's agent speaks an older protocol without `disable-replica`.
    Older,
    /// The replica could not be told (unreachable, refused, timed out): why.
    Unreached(String),
}

/// Tell the replica once that replication of VM `rec` was disabled here (`disable-replica`),
/// waiting at most [`TELL_DISABLED_TIMEOUT`].
pub async fn tell_replica_disabled(host: &Host, rec: &VmRecord, args: &EnableArgs) -> Told {
    let call = async {
        let c = connect(host, args).await?;
        c.disable_replica(rec.uuid).await
    };
    match tokio::time::timeout(TELL_DISABLED_TIMEOUT, call).await {
        Ok(Ok(Some(state))) => Told::Shown(state),
        Ok(Ok(None)) => Told::Older,
        Ok(Err(e)) => Told::Unreached(crate::util::chain(&e)),
        Err(_) => Told::Unreached(format!(
            "no answer within {} s",
            TELL_DISABLED_TIMEOUT.as_secs()
        )),
    }
}

/// What `disable` says about the replica.
pub fn told_message(name: &str, replica: &str, told: &Told) -> String {
    match told {
        Told::Shown(state) => format!("the replica {replica} shows {state}"),
        Told::Older => format!(
            "the replica {replica} runs an older vmreplica that cannot be told: run `vmreplica \
             disable {name}` there"
        ),
        Told::Unreached(why) => format!(
            "the replica {replica} could not be told ({why}); it is told in the background \
             (every {} s for {} h) and shows Disabled once it hears of it, or run `vmreplica \
             disable {name}` there",
            TELL_DISABLED_RETRY.as_secs(),
            TELL_DISABLED_FOR.as_secs() / 3600
        ),
    }
}

/// Keep telling the replica of a disable until it hears of it (or [`TELL_DISABLED_FOR`]
/// passed). The owner aborts it when replication is enabled again or the VM is removed.
pub fn keep_telling_replica_disabled(
    host: std::sync::Arc<Host>,
    rec: VmRecord,
    args: EnableArgs,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + TELL_DISABLED_FOR;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(TELL_DISABLED_RETRY).await;
            match tell_replica_disabled(&host, &rec, &args).await {
                Told::Unreached(why) => {
                    tracing::debug!(vm = %rec.name, replica = %args.replica, "the replica still cannot be told of the disable: {why}");
                }
                told => {
                    tracing::info!(vm = %rec.name, replica = %args.replica, "{}", told_message(&rec.name, &args.replica, &told));
                    return;
                }
            }
        }
        tracing::warn!(vm = %rec.name, replica = %args.replica, "gave up telling the replica of the disable: run `vmreplica disable {}` there", rec.name);
    })
}

/// How a transport error bears on the machine.
pub fn classify_transport(e: TransportError) -> Failure {
    use vmr_proto::wire::RemoteError as R;
    let msg = crate::util::chain(&e);
    match &e {
        TransportError::Remote(R::WrongBase { .. }) => Failure::WrongBase(msg),
        // A full replica disk or a pause on the replica: keep retrying (health is Critical
        // meanwhile) so that replication resumes by itself once the admin fixed it.
        TransportError::Remote(R::DiskFull { .. } | R::Unavailable { .. }) => {
            Failure::Retryable(msg)
        }
        _ if e.is_retryable() => Failure::Retryable(msg),
        _ => Failure::Fatal(msg),
    }
}

/// How a capture error bears on the machine.
pub fn classify_capture(e: &CaptureError) -> Failure {
    let msg = crate::util::chain(e);
    match e {
        CaptureError::ResyncRequired { .. } => Failure::ResyncRequired(msg),
        _ => Failure::Retryable(msg),
    }
}

/// The session's connection to the replica, opened if needed.
pub async fn client<'a>(
    host: &Host,
    rec: &VmRecord,
    session: &'a mut Session,
) -> Result<&'a Client, Failure> {
    // A connection that closed while idle (the peer restarted, a keep-alive went
    // unanswered) is replaced here, before the cycle uses it, rather than failing the cycle.
    if let Some(c) = &session.client
        && c.is_closed()
    {
        tracing::info!(vm = %rec.name, "the connection to the replica closed while idle: reconnecting");
        session.client = None;
    }
    if session.client.is_none() {
        let args = rec
            .enable
            .as_ref()
            .ok_or_else(|| Failure::Fatal("replication not enabled".into()))?;
        let c = connect(host, args).await.map_err(classify_transport)?;
        session.client = Some(c);
    }
    session
        .client
        .as_ref()
        .ok_or_else(|| Failure::Retryable("no connection".into()))
}

/// The latest cycle the replica holds of this VM (`replica-info`).
pub async fn replica_latest(
    host: &Host,
    rec: &VmRecord,
    session: &mut Session,
) -> Result<Option<u64>, Failure> {
    let c = client(host, rec, session).await?;
    match c
        .replica_info(
            rec.uuid,
            Some(crate::config::reported_address(&host.config)),
        )
        .await
    {
        Ok(info) => Ok(info.latest),
        Err(e) => {
            session.client = None;
            Err(classify_transport(e))
        }
    }
}

/// Make sure the replica VM exists with this VM's disks (idempotent on the replica).
pub async fn create_replica(
    host: &Host,
    rec: &VmRecord,
    session: &mut Session,
) -> Result<(), Failure> {
    let args = rec
        .enable
        .clone()
        .ok_or_else(|| Failure::Fatal("not enabled".into()))?;
    let def =
        VmDefinition::from_toml(&rec.launch_toml).map_err(|e| Failure::Fatal(e.to_string()))?;
    let create = create_request(rec, &def, &args);
    let c = client(host, rec, session).await?;
    if let Err(e) = c.create_replica(create).await {
        session.client = None;
        return Err(classify_transport(e));
    }
    Ok(())
}

/// Before a cycle on `ctx.last_cycle`: ask the replica what it holds. `Some` when the
/// machine must re-plan (a lost acknowledgement, a restart) or the replica cannot be asked.
pub async fn reconcile(ctx: &CycleCtx, session: &mut Session) -> Option<Outcome> {
    match replica_latest(&ctx.host, &ctx.rec, session).await {
        Ok(latest) if latest != ctx.last_cycle => Some(Outcome::Reconciled { latest }),
        Ok(_) => None,
        Err(f) => Some(Outcome::Failed(f)),
    }
}

/// Run a full or incremental cycle over the network.
pub async fn run_incremental(
    ctx: &CycleCtx,
    session: &mut Session,
    id: u64,
    base: Option<u64>,
    kind: CycleKind,
    app_consistent: bool,
) -> Outcome {
    let rec = &ctx.rec;
    session.quiesce = None;
    let Some(args) = rec.enable.clone() else {
        return Outcome::Failed(Failure::Fatal("not enabled".into()));
    };
    if kind == CycleKind::Full {
        // Idempotent on the replica; makes sure the replica VM exists with our disks.
        if let Err(f) = create_replica(&ctx.host, rec, session).await {
            return Outcome::Failed(f);
        }
    }
    if rec.libvirt.is_some() {
        return run_libvirt(ctx, session, (id, base, kind), &args).await;
    }
    if session.capture.is_none() {
        match VmCapture::open(capture_config(&ctx.host, rec, ctx.slot)).await {
            Ok(c) => session.capture = Some(c),
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let client = match client(&ctx.host, rec, session).await {
        Ok(c) => c.clone(),
        Err(f) => return Outcome::Failed(f),
    };
    let Some(capture) = session.capture.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let rec = &ctx.rec;
    let mut agent = None;
    if app_consistent {
        match guest_agent(rec).await {
            Ok(a) => agent = Some(a),
            Err(reason) => {
                tracing::warn!(vm = %rec.name, "app-consistent point not possible, taking a crash-consistent one: {reason}");
                session.quiesce = Some(QuiesceOutcome::Failed { reason });
            }
        }
    }
    let (outcome, reset_capture, reset_client) = cycle_with(
        ctx,
        capture,
        &client,
        &args,
        (id, base, kind),
        agent.as_mut(),
        &mut session.quiesce,
    )
    .await;
    if reset_capture {
        session.capture = None;
    }
    if reset_client {
        session.client = None;
    }
    outcome
}

/// NBD reads in flight of a libvirt cycle.
pub const LIBVIRT_IN_FLIGHT: usize = 8;
/// Limit of each NBD handshake and request of a libvirt cycle.
pub const LIBVIRT_NBD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The libvirt capture configuration of a libvirt-managed VM: its backup job's socket and
/// scratch files in `DIR/work/<uuid>/libvirt`.
pub fn libvirt_config(
    host: &Host,
    rec: &VmRecord,
    lv: &vmr_proto::record::LibvirtSource,
) -> LibvirtConfig {
    LibvirtConfig {
        uri: lv.uri.clone(),
        domain: lv.domain.clone(),
        work_dir: crate::launch::work_dir(&host.dir, rec.uuid).join("libvirt"),
        max_in_flight: LIBVIRT_IN_FLIGHT,
        timeout: LIBVIRT_NBD_TIMEOUT,
    }
}

/// A full or incremental cycle of a libvirt-managed VM: a pull-mode backup job
/// (`LibvirtCapture`) instead of the QMP transaction. A full cycle starts the checkpoint chain
/// over; an incremental one continues it from the record's acknowledged checkpoint (the
/// session's chain keeps it between cycles; the owner persists it after each acknowledged
/// cycle). When the chain itself starts over (its checkpoint vanished or was refused), the
/// cycle reads every block of every disk (zeroes as zero extents) and is still sent as the
/// incremental cycle the machine planned: it rewrites the whole disk on top of the base, so
/// the point is exact. The job's checkpoint is committed strictly after the replica's
/// acknowledgement; any failure aborts the cycle, so the next delta comes from the older
/// checkpoint.
async fn run_libvirt(
    ctx: &CycleCtx,
    session: &mut Session,
    (id, base, kind): (u64, Option<u64>, CycleKind),
    args: &EnableArgs,
) -> Outcome {
    let rec = &ctx.rec;
    let Some(lv) = &rec.libvirt else {
        return Outcome::Failed(Failure::Fatal("not a libvirt VM".into()));
    };
    if kind == CycleKind::Full {
        // a full cycle starts the chain over: stale checkpoints of ours are deleted
        session.libvirt = None;
    }
    if session.libvirt.is_none() {
        let acked = match kind {
            CycleKind::Full => None,
            _ => lv.acked_checkpoint.clone(),
        };
        let known = acked.is_some();
        match LibvirtCapture::open(libvirt_config(&ctx.host, rec, lv), acked).await {
            Ok(mut c) => {
                if known {
                    c.set_acked_xml(lv.acked_checkpoint_xml.clone());
                }
                session.libvirt = Some(c);
            }
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let client = match client(&ctx.host, rec, session).await {
        Ok(c) => c.clone(),
        Err(f) => return Outcome::Failed(f),
    };
    let mut disks = rec.disks.clone();
    if let Some(capture) = session.libvirt.as_ref() {
        match refresh_definition(rec, capture, &client, args).await {
            Ok(Some((toml, now))) => {
                if now != disks {
                    // disks added: the capture is opened again on every disk, its chain
                    // continuing from the same acknowledged checkpoint
                    let acked = capture.acked().map(str::to_owned);
                    let acked_xml = capture.acked_xml().map(str::to_owned);
                    session.libvirt = None;
                    match LibvirtCapture::open(libvirt_config(&ctx.host, rec, lv), acked).await {
                        Ok(mut c) => {
                            c.set_acked_xml(acked_xml);
                            session.libvirt = Some(c);
                        }
                        Err(e) => {
                            session.definition = Some((toml, now));
                            return Outcome::Failed(classify_capture(&e));
                        }
                    }
                    disks = now.clone();
                }
                session.definition = Some((toml, now));
            }
            Ok(None) => {}
            Err(f) => {
                session.libvirt = None;
                return Outcome::Failed(f);
            }
        }
    }
    let Some(capture) = session.libvirt.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let (outcome, reset) =
        libvirt_cycle(ctx, capture, &client, (id, base, kind), args, &disks).await;
    if reset {
        session.libvirt = None;
    }
    outcome
}

/// Before a libvirt VM's cycle: compare the domain's persistent XML and disks with the
/// recorded definition (`vmr_core::checkpoints::definition_change`). A changed XML with the
/// same disks is sent to the replica (`create-replica` refreshes its stored definition, which
/// a failover defines the domain from) and returned as the definition TOML for the owner to
/// record, with the replicated disks. Disks added after the recorded ones are added to the
/// definition and the replicated disks (replicated from this cycle on: the store gives each a
/// full first layer, the capture reads it whole); a disk removed (or reordered) fails the
/// cycle, naming the disks, until the admin registers the domain again.
async fn refresh_definition(
    rec: &VmRecord,
    capture: &LibvirtCapture,
    client: &Client,
    args: &EnableArgs,
) -> Result<Option<(String, Vec<String>)>, Failure> {
    use vmr_core::checkpoints::{DefinitionChange, definition_change};
    let xml = capture
        .domain_xml()
        .await
        .map_err(|e| classify_capture(&e))?;
    let mut def =
        VmDefinition::from_toml(&rec.launch_toml).map_err(|e| Failure::Fatal(e.to_string()))?;
    // the domain XML's disks (a disk that is not a qcow2 file is the capture's error)
    let disks = vmr_libvirt::xml::parse_disks(&xml).map_err(|e| {
        Failure::Fatal(format!(
            "the domain's definition changed and cannot be replicated: {e}"
        ))
    })?;
    let targets: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
    // The replicated disks by target: the recorded XML's. A domain generated from a plain-QEMU
    // definition (a failover into a libvirt host, then reverse) names its disks vda, vdb, ...
    // while the replicated disks keep their ids (disk0, ...), and its record may hold no XML
    // yet: the capture maps the domain's disks to the ids by position, and so does this.
    let recorded: Vec<String> = match def
        .libvirt_xml
        .as_deref()
        .and_then(|x| vmr_libvirt::xml::parse_disks(x).ok())
    {
        Some(d) => d.into_iter().map(|d| d.target).collect(),
        None if targets.len() >= rec.disks.len() => targets[..rec.disks.len()].to_vec(),
        None => rec.disks.clone(),
    };
    match definition_change(def.libvirt_xml.as_deref(), &recorded, &xml, &targets) {
        DefinitionChange::Unchanged => Ok(None),
        DefinitionChange::DisksChanged { added, removed } => Err(Failure::Fatal(format!(
            "the domain's disks changed (added: [{}], removed: [{}]; replicated: [{}]): only disks added after the replicated ones are replicated without re-enabling; register the domain again (disable, vm remove, vm add --libvirt, enable)",
            added.join(", "),
            removed.join(", "),
            rec.disks.join(", ")
        ))),
        change @ (DefinitionChange::Refresh | DefinitionChange::DisksAdded(_)) => {
            def.libvirt_xml = Some(xml);
            for d in &mut def.disks {
                if let Some(now) = disks.iter().find(|x| x.target == d.node) {
                    d.path = now.path.display().to_string();
                }
            }
            let mut replicated = rec.disks.clone();
            if let DefinitionChange::DisksAdded(added) = &change {
                // attached to the definition only (`--config`): not in the running domain's
                // backup jobs yet; the definition is refreshed once the domain runs with them
                let live = capture
                    .live_disks()
                    .await
                    .map_err(|e| classify_capture(&e))?;
                if let Some(t) = added.iter().find(|t| !live.iter().any(|d| &d.target == *t)) {
                    tracing::info!(vm = %rec.name, disk = %t, "a disk added to the domain's definition is not in the running domain yet: replicated once it is");
                    return Ok(None);
                }
                for t in added {
                    if let Some(d) = disks.iter().find(|x| &x.target == t) {
                        def.disks.push(vmr_proto::vmdef::DiskDef {
                            node: t.clone(),
                            path: d.path.display().to_string(),
                        });
                    }
                    replicated.push(t.clone());
                }
                tracing::info!(vm = %rec.name, added = ?added, "disks added to the domain: replicated from this cycle on");
            }
            def.validate()
                .map_err(|e| Failure::Fatal(format!("the refreshed definition: {e}")))?;
            let toml = def.to_toml();
            let mut refreshed = rec.clone();
            refreshed.launch_toml = toml.clone();
            refreshed.disks = replicated.clone();
            client
                .create_replica(create_request(&refreshed, &def, args))
                .await
                .map_err(classify_transport)?;
            tracing::info!(vm = %rec.name, "the domain's definition changed: the replica holds the new one");
            Ok(Some((toml, replicated)))
        }
    }
}

/// Where a cycle's extents come from: a QMP capture cycle (incremental, full or verify) or a
/// libvirt backup job. [`ship`] streams either to the replica.
pub(crate) trait ExtentSource {
    /// The next extent to ship, `None` at the end of the cut.
    fn next_extent(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Extent>, CaptureError>> + Send;
}

impl ExtentSource for vmr_capture::CaptureCycle<'_> {
    fn next_extent(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Extent>, CaptureError>> + Send {
        vmr_capture::CaptureCycle::next_extent(self)
    }
}

impl ExtentSource for vmr_capture::libvirt::LibvirtCycle<'_> {
    fn next_extent(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Extent>, CaptureError>> + Send {
        vmr_capture::libvirt::LibvirtCycle::next_extent(self)
    }
}

/// The producer's side of [`ship`]: the data bytes read and when reading ended (since
/// `started`), or its failure (`None`: the transfer stopped taking extents).
pub(crate) type Produced = Result<(u64, std::time::Duration), Option<Failure>>;

/// Stream the extents of `source` to the replica as the cycle `header` describes, read and
/// sent concurrently (a queue of a few extents between them), under the VM's sending limit;
/// the progress counters follow the reading. Returns the producer's and the transfer's results.
pub(crate) async fn ship<S: ExtentSource>(
    ctx: &CycleCtx,
    client: &Client,
    header: &CycleHeader,
    source: &mut S,
    compression: bool,
    started: std::time::Instant,
) -> (Produced, Result<vmr_transport::CycleAck, TransportError>) {
    let sizes: Vec<u64> = header.disks.iter().map(|d| d.size).collect();
    let bases = disk_bases(&sizes);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Extent, CaptureError>>(4);
    let producer = async {
        // Owning the sender here ends the stream when the producer finishes.
        let tx = tx;
        let mut sent = 0u64;
        loop {
            match source.next_extent().await {
                Ok(Some(e)) => {
                    // Bytes of data shipped; zero extents cost a few bytes on the wire.
                    if let vmr_proto::ExtentData::Data(b) = &e.data {
                        sent += b.len() as u64;
                    }
                    ctx.progress.advance(position(&bases, &e), sent);
                    copy_slow_hook(&ctx.host.dir, header.kind).await;
                    if tx.send(Ok(e)).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(None) => return Ok((sent, started.elapsed())),
                Err(e) => {
                    let f = classify_capture(&e);
                    let _ = tx.send(Err(e)).await;
                    return Err(Some(f));
                }
            }
        }
    };
    let consumer = client.send_cycle_paced(
        header,
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        compression,
        Some(ctx.body_pace()),
        vmr_transport::BodyQueue::Ahead,
    );
    tokio::join!(producer, consumer)
}

/// One cycle of a libvirt VM on an open capture and connection. Returns the outcome and
/// whether the capture must be reopened.
async fn libvirt_cycle(
    ctx: &CycleCtx,
    capture: &mut LibvirtCapture,
    client: &Client,
    (id, base, kind): (u64, Option<u64>, CycleKind),
    args: &EnableArgs,
    replicated: &[String],
) -> (Outcome, bool) {
    let rec = &ctx.rec;
    let taken_at_ms = now_ms();
    let started = std::time::Instant::now();
    let mut cycle = match capture.begin_cycle().await {
        Ok(c) => c,
        Err(e) => {
            let f = classify_capture(&e);
            return (
                Outcome::Failed(f),
                !matches!(e, CaptureError::BackupBusy { .. }),
            );
        }
    };
    if let Some(why) = cycle.resync() {
        tracing::warn!(vm = %rec.name, cycle = id, "the checkpoint chain started over ({why}): this cycle reads every block");
    }
    hold_hook(&ctx.host.dir).await;
    let sizes = cycle.sizes();
    if sizes.len() != replicated.len() {
        let _ = cycle.abort().await;
        return (
            Outcome::Failed(Failure::Fatal(format!(
                "the domain has {} replicated disks, the VM's record {}: register it again (vm remove, vm add --libvirt)",
                sizes.len(),
                replicated.len()
            ))),
            false,
        );
    }
    if !cycle.full_disks().is_empty() {
        tracing::info!(vm = %rec.name, cycle = id, disks = ?cycle.full_disks(), "disks added to the domain: read whole in this cycle");
    }
    let disks: Vec<DiskInfo> = replicated
        .iter()
        .zip(&sizes)
        .map(|(d, s)| DiskInfo {
            id: d.clone(),
            size: *s,
        })
        .collect();
    if kind == CycleKind::Full {
        ctx.progress
            .start(OperationKind::InitialCopy, sizes.iter().sum(), taken_at_ms);
    } else {
        ctx.progress.start(OperationKind::Cycle, 0, taken_at_ms);
    }
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base,
        kind,
        consistency: if ctx.planned {
            CycleConsistency::Planned
        } else {
            CycleConsistency::CrashConsistent
        },
        taken_at_ms,
        disks,
        // A libvirt-captured VM is never a group member (`group create` refuses it).
        group: None,
    };
    let (produced, sent) = ship(ctx, client, &header, &mut cycle, args.compression, started).await;
    match (produced, sent) {
        (Ok((bytes, _)), Ok(_ack)) => match cycle.commit().await {
            Ok(()) => {
                tracing::debug!(vm = %rec.name, cycle = id, bytes, ms = started.elapsed().as_millis() as u64, "libvirt cycle acknowledged and committed");
                (
                    Outcome::Done {
                        id,
                        bytes,
                        sizes,
                        app: false,
                        pending: None,
                    },
                    false,
                )
            }
            Err(e) => {
                // the replica has the cycle; reconciliation adopts it, the chain is reopened
                (commit_failed(&e).0, true)
            }
        },
        (p, s) => {
            if let Err(e) = cycle.abort().await {
                tracing::warn!(vm = %rec.name, cycle = id, "ending the libvirt backup job: {e}");
            }
            let f = match (p, s) {
                (Err(Some(f)), _) => f,
                (_, Err(e)) => classify_transport(e),
                _ => Failure::Retryable("the cycle's stream ended early".into()),
            };
            (Outcome::Failed(f), false)
        }
    }
}

/// Test hook (cargo feature `test-hooks` only): while a file of this name exists in the agent
/// directory, each incremental or full cycle keeps its point-in-time view open before it is
/// read (at most [`HOLD_MAX`]); the test that created the file removes it to let the cycle go on.
/// While a cycle holds, [`HELD_MARK`] exists: the view is open (its space reserved).
#[cfg(feature = "test-hooks")]
const HOLD_HOOK: &str = "test-cycle-hold";
/// See [`HOLD_HOOK`].
#[cfg(feature = "test-hooks")]
const HELD_MARK: &str = "test-cycle-held";
#[cfg(feature = "test-hooks")]
const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

#[cfg(feature = "test-hooks")]
async fn hold_hook(dir: &std::path::Path) {
    if !dir.join(HOLD_HOOK).exists() {
        return;
    }
    let mark = dir.join(HELD_MARK);
    let _ = std::fs::write(&mark, "");
    let until = tokio::time::Instant::now() + HOLD_MAX;
    while dir.join(HOLD_HOOK).exists() && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&mark);
}

#[cfg(not(feature = "test-hooks"))]
async fn hold_hook(_dir: &std::path::Path) {}

/// Test hook (cargo feature `test-hooks` only): a file of this name in the agent directory
/// holding a VM name makes that VM's next cycle cut as the group point fail right after the
/// cut (aborted, as a transfer failure would), once: the file is removed. A test sees the
/// other members' points of that group point on the replica, never complete.
#[cfg(feature = "test-hooks")]
const GROUP_FAIL_HOOK: &str = "test-group-fail-after-cut";

#[cfg(feature = "test-hooks")]
fn group_fail_hook(dir: &std::path::Path, vm: &str) -> bool {
    let path = dir.join(GROUP_FAIL_HOOK);
    match std::fs::read_to_string(&path) {
        Ok(name) if name.trim() == vm => {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(
                vm,
                "test hook: the group member's cycle fails after the cut"
            );
            true
        }
        _ => false,
    }
}

#[cfg(not(feature = "test-hooks"))]
fn group_fail_hook(_dir: &std::path::Path, _vm: &str) -> bool {
    false
}

/// Test hook (cargo feature `test-hooks` only): a file of this name in the agent directory
/// holding a number of ms makes a full cycle (an initial copy) sleep that long after each
/// extent it reads, so that a test can watch it run.
#[cfg(feature = "test-hooks")]
const COPY_SLOW_HOOK: &str = "test-copy-slow-ms";
/// Test hook (cargo feature `test-hooks` only): like [`COPY_SLOW_HOOK`] for every other
/// cycle (incremental, verify), so that a test can act while the replica receives one.
#[cfg(feature = "test-hooks")]
const CYCLE_SLOW_HOOK: &str = "test-cycle-slow-ms";

#[cfg(feature = "test-hooks")]
async fn copy_slow_hook(dir: &std::path::Path, kind: CycleKind) {
    let hook = if kind == CycleKind::Full {
        COPY_SLOW_HOOK
    } else {
        CYCLE_SLOW_HOOK
    };
    if let Some(ms) = std::fs::read_to_string(dir.join(hook))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "test-hooks"))]
async fn copy_slow_hook(_dir: &std::path::Path, _kind: CycleKind) {}

/// One cycle on an open capture and connection, with the guest frozen around the cut when
/// `agent` is given (its outcome goes to `quiesce`). Returns the outcome and whether the
/// capture and the connection must be reopened.
async fn cycle_with(
    ctx: &CycleCtx,
    capture: &mut VmCapture,
    client: &Client,
    args: &EnableArgs,
    (id, base, kind): (u64, Option<u64>, CycleKind),
    agent: Option<&mut GuestAgent>,
    quiesce: &mut Option<QuiesceOutcome>,
) -> (Outcome, bool, bool) {
    let rec = &ctx.rec;
    let mode = if kind == CycleKind::Full {
        CycleMode::Full
    } else {
        CycleMode::Incremental
    };
    let taken_at_ms = now_ms();
    let started = std::time::Instant::now();
    let mut joined = match (&ctx.group, kind) {
        (Some(g), CycleKind::Incremental) => join_group(ctx, g),
        _ => None,
    };
    // A paused guest cannot answer its guest agent: a group member's cut is crash-consistent.
    let agent = match agent {
        Some(_) if joined.is_some() => {
            *quiesce = Some(QuiesceOutcome::Failed {
                reason: "a consistency group member's cut is crash-consistent (its guest is \
                         paused with the group, where it cannot freeze)"
                    .into(),
            });
            None
        }
        a => a,
    };
    let freeze = agent.map(|agent| Quiesce {
        agent,
        freeze_timeout: FREEZE_TIMEOUT,
        thaw_attempts: THAW_ATTEMPTS,
    });
    let (mut cycle, report) = match capture
        .begin_cycle_gated(mode, freeze, joined.as_mut().map(|j| &mut j.gate))
        .await
    {
        Ok(c) => c,
        Err(e) => return (Outcome::Failed(classify_capture(&e)), true, false),
    };
    // The group point's tag, when every member's transaction succeeded inside the pause.
    let group = joined.and_then(|j| j.gate.grouped.then_some(j.tag));
    if group.is_some() && group_fail_hook(&ctx.host.dir, &rec.name) {
        let reset = cycle.abort().await.is_err();
        return (
            Outcome::Failed(Failure::Retryable(
                "test hook: the group member's cycle failed after the cut".into(),
            )),
            reset,
            false,
        );
    }
    let app = report_quiesce(&rec.name, id, &report, quiesce);
    let view_ready = started.elapsed();
    // Test hook: keep the point-in-time view open while a test fills the fleecing file system.
    hold_hook(&ctx.host.dir).await;
    let disks = cycle.disks().to_vec();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    if kind == CycleKind::Full {
        ctx.progress
            .start(OperationKind::InitialCopy, sizes.iter().sum(), taken_at_ms);
    } else {
        ctx.progress.start(OperationKind::Cycle, 0, taken_at_ms);
    }
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base,
        kind,
        consistency: if ctx.planned {
            CycleConsistency::Planned
        } else if app {
            CycleConsistency::AppConsistent
        } else {
            CycleConsistency::CrashConsistent
        },
        taken_at_ms,
        disks,
        group,
    };
    let (produced, sent) = ship(ctx, client, &header, &mut cycle, args.compression, started).await;
    let acked = started.elapsed();
    match (produced, sent) {
        (Ok((bytes, read_done)), Ok(_ack)) => match cycle.commit().await {
            Ok(()) => {
                tracing::debug!(
                    vm = %rec.name,
                    cycle = id,
                    bytes,
                    view_ms = view_ready.as_millis() as u64,
                    read_ms = read_done.as_millis() as u64,
                    ack_ms = acked.as_millis() as u64,
                    commit_ms = started.elapsed().as_millis() as u64,
                    "cycle phases (ms since the cycle started)"
                );
                let pending = capture.pending_bytes().await.ok();
                (
                    Outcome::Done {
                        id,
                        bytes,
                        sizes,
                        app,
                        pending,
                    },
                    false,
                    false,
                )
            }
            // The replica has the cycle; the primary could not drop the frozen bitmap. The next
            // open merges it back, and reconciliation adopts the acknowledged cycle.
            Err(e) => commit_failed(&e),
        },
        (p, s) => failed(p, s, cycle, "cycle").await,
    }
}

/// Join the cut of group `g` (its members are the VMs whose records name it, in UUID
/// order); `None`: cut alone.
fn join_group(ctx: &CycleCtx, g: &str) -> Option<crate::groups::Joined> {
    let mut members: Vec<uuid::Uuid> = match ctx.host.load_vms() {
        Ok(vms) => vms
            .iter()
            .filter(|r| r.group.as_deref() == Some(g))
            .map(|r| r.uuid)
            .collect(),
        Err(e) => {
            tracing::warn!(vm = %ctx.rec.name, group = g, "reading the group's members failed, cutting alone: {}", crate::util::chain(&e));
            return None;
        }
    };
    members.sort();
    let j = ctx.host.groups.join(g, ctx.rec.uuid, members);
    if j.is_some() {
        ctx.joined.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    j
}

/// Log what the guest freeze around a cut gave and keep it for the machine; returns whether
/// the cut is app-consistent.
fn report_quiesce(
    vm: &str,
    cycle: u64,
    report: &QuiesceReport,
    quiesce: &mut Option<QuiesceOutcome>,
) -> bool {
    match report {
        QuiesceReport::NotAsked => {}
        QuiesceReport::Frozen {
            filesystems,
            frozen,
            freeze_call,
            thaw_attempts,
            thaw_error,
        } => {
            let frozen_ms = frozen.as_millis() as u64;
            let freeze_call_ms = freeze_call.as_millis() as u64;
            let fs_frozen_ms = frozen_ms.saturating_sub(freeze_call_ms);
            tracing::info!(
                vm,
                cycle,
                frozen_ms,
                freeze_call_ms,
                fs_frozen_ms,
                filesystems,
                thaw_attempts,
                "app-consistent cut: guest frozen for {frozen_ms} ms from the freeze call to the \
                 thaw's answer ({freeze_call_ms} ms hooks and freeze, {fs_frozen_ms} ms file \
                 systems frozen with the cut)"
            );
            if let Some(e) = thaw_error {
                tracing::error!(
                    vm,
                    cycle,
                    "the guest's file systems may still be frozen: thaw failed {THAW_ATTEMPTS} times: {e}"
                );
            }
            *quiesce = Some(QuiesceOutcome::Frozen {
                frozen_ms,
                freeze_call_ms,
            });
        }
        QuiesceReport::Failed {
            reason,
            frozen,
            thaw_error,
        } => {
            tracing::warn!(
                vm,
                cycle,
                after_ms = frozen.as_millis() as u64,
                "guest freeze failed, the point is crash-consistent: {reason}"
            );
            if let Some(e) = thaw_error {
                tracing::error!(
                    vm,
                    cycle,
                    "the guest's file systems may still be frozen: thaw failed {THAW_ATTEMPTS} times: {e}"
                );
            }
            *quiesce = Some(QuiesceOutcome::Failed {
                reason: reason.clone(),
            });
        }
    }
    report.app_consistent()
}

/// A cycle acknowledged by the replica whose frozen bitmap could not be dropped here: the next
/// open of the capture merges it back, and reconciliation adopts the acknowledged cycle.
/// Returns the outcome and whether the capture and the connection must be reopened.
pub fn commit_failed(e: &CaptureError) -> (Outcome, bool, bool) {
    (
        Outcome::Failed(Failure::Retryable(format!(
            "commit after acknowledgement failed: {e}"
        ))),
        true,
        false,
    )
}

/// A cycle (of any kind) whose producer or transfer failed: classify the failure, abort the
/// cycle (its changes are merged back), and say whether the capture and the connection must be
/// reopened.
pub async fn failed<T, A>(
    produced: Result<T, Option<Failure>>,
    sent: Result<A, TransportError>,
    cycle: vmr_capture::CaptureCycle<'_>,
    what: &str,
) -> (Outcome, bool, bool) {
    let mut reset_client = false;
    let failure = match (produced, sent) {
        (Err(Some(f)), _) => f,
        (_, Err(e)) => {
            reset_client = true;
            classify_transport(e)
        }
        _ => Failure::Retryable(format!("{what} ended early")),
    };
    let mut reset_capture = false;
    if let Err(e) = cycle.abort().await {
        tracing::warn!("abort failed (the next open merges back): {e}");
        reset_capture = true;
    }
    (Outcome::Failed(failure), reset_capture, reset_client)
}
