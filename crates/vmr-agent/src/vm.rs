//! One owner task per VM. The task holds the VM's record, its side (primary machine with its
//! capture session, or replica side with its store) and the VM processes it started;
//! everything else (control socket, peer API) sends it a [`Command`] and awaits the reply on
//! a oneshot channel. Nothing outside the task writes the VM's state, so a command can never
//! overwrite what another command did meanwhile.
//!
//! The owner also makes the VM's events (`events.rs`): after every event it handled it
//! compares what it observes (state, health, failures, missed cycles) with what it saw
//! before, raises and clears the RPO alert (`vmr_core::alert` decides; a timer wakes the
//! owner at the deadline), and emits the failover and store-full events where they happen.
//!
//! Architecture Invariant: a VM's record is written only by its owner task.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vmr_proto::CycleHeader;
use vmr_proto::api::{
    BecomeReplica, BlockHashesRequest, CreateReplica, EnableArgs, FailoverResult, PointInfo,
    ReplicaVmInfo, ReplicationMode, ReplicationState, StateChange, VmStatus,
};
use vmr_proto::wire::RemoteError;
use vmr_transport::Peer;

use crate::autofail::LeaseNote;
use crate::errors::{AgentError, FanoutRefusal, internal, store_err};
use crate::events::NewEvent;
use crate::extended::ExtendedSide;
use crate::host::Host;
use crate::owned::Observed;
use crate::owned::Vm;
use crate::primary::{Cmd, CycleDone, PrimarySide};
use crate::replica::{ReplicaCmd, ReplicaSide};
use crate::util::now_ms;
use vmr_core::autofailover::{TakeoverWatch, WatchAction, WatchEvent, WatchPhase};
use vmr_proto::event::{EventKind, Severity};
use vmr_proto::lease::TakeoverPoint;
use vmr_proto::peer::{BecameReplica, BlockHashes, ContinuedFrom, PrimaryVmState, SourceVmState};
use vmr_proto::record::VmRecord;

/// A reply channel.
pub type Reply<T> = oneshot::Sender<Result<T, AgentError>>;
/// A reply channel of a peer call.
pub type PeerReply<T> = oneshot::Sender<Result<T, RemoteError>>;

/// A failover command of the control API.
#[derive(Debug, Clone)]
pub enum FailoverCmd {
    /// `failover prepare` (primary).
    Prepare {
        /// `--shutdown`: shut the guest down first, waiting at most this long.
        shutdown: Option<std::time::Duration>,
    },
    /// `failover start` (replica).
    Start {
        /// Recovery point; latest when `None`.
        point: Option<u64>,
        /// Prepare the disks only.
        no_start: bool,
        /// Skip the split-brain guard.
        force: bool,
    },
    /// `failover test` (replica).
    Test {
        /// Recovery point; latest when `None`.
        point: Option<u64>,
    },
    /// `failover stop-test` (replica).
    StopTest {
        /// One test copy, or all.
        test_id: Option<Uuid>,
    },
    /// `failover cancel` (replica).
    Cancel,
    /// `failover complete` (replica).
    Complete,
    /// `reverse` (the failed-over replica).
    Reverse {
        /// The old primary's replication address.
        replica: Option<String>,
        /// Its certificate fingerprint.
        replica_fingerprint: Option<String>,
        /// Cycle frequency of the reversed replication.
        frequency_secs: Option<u64>,
        /// `replica` is a sibling replica that follows (fan-out's failover).
        follow: bool,
    },
}

/// A cycle's writer into its pending layers, handed from the owner to the transport handler
/// (which streams the extents into it) and back (the owner commits it).
pub type Writer = Box<vmr_store::LayerWriter>;

/// A change of a primary VM's registration (`vm set`); the control API checked the
/// definition (its name, and that the disks are its own).
pub struct VmChange {
    /// New QMP socket path.
    pub qmp: Option<String>,
    /// New definition: its TOML text and what it says.
    pub launch: Option<(String, vmr_proto::VmDefinition)>,
    /// New disks to replicate.
    pub disks: Option<Vec<String>>,
    /// New failover network settings of this host (allowed on any VM at any time).
    pub failover: FailoverChange,
    /// New guest agent socket (`Some(None)`: none); allowed on a primary VM at any time.
    pub qga: Option<Option<String>>,
}

/// A change of a VM's failover network settings on this host (`vm set --failover-*`).
#[derive(Debug, Default)]
pub struct FailoverChange {
    /// New interface settings (replace the old; empty = none).
    pub interfaces: Option<Vec<vmr_proto::FailoverInterface>>,
    /// New network arguments (empty = the definition's).
    pub network_args: Option<Vec<String>>,
}

impl FailoverChange {
    /// The settings after the change.
    pub fn apply(&self, old: &vmr_proto::FailoverSettings) -> vmr_proto::FailoverSettings {
        let mut s = old.clone();
        if let Some(i) = &self.interfaces {
            s.interfaces = i.clone();
        }
        if let Some(a) = &self.network_args {
            s.network_args = (!a.is_empty()).then(|| a.clone());
        }
        s
    }

    /// Check the new settings on their own.
    pub fn check(&self) -> Result<(), vmr_proto::FailnetError> {
        self.apply(&vmr_proto::FailoverSettings::default())
            .validate()
    }
}

/// What the owner of a VM can be asked.
pub enum Command {
    /// Replica: the primary asks for automatic failover's promise (`promise` peer call).
    Promise(Peer, PeerReply<vmr_proto::lease::PromiseResponse>),
    /// Replica: the witness answered the takeover watch's ask `seq` (or the call failed).
    WatchAnswer(u64, Result<vmr_proto::lease::WitnessResponse, String>),
    /// `unfence NAME` (primary).
    Unfence(Reply<String>),
    /// `set NAME --auto-failover off` (primary).
    AutoFailoverOff(Reply<String>),
    /// `vm remove` (`None`): unregister this primary VM (refused while replication is
    /// enabled); `replica remove` (`Some(keep_data)`): remove this replica VM and, unless
    /// `keep_data`, its recovery points. With `check` (true), only say what would be done.
    /// The owner stops after a removal.
    Remove(Option<bool>, bool, Reply<String>),
    /// `vm set`: change the registration (refused while replication is enabled). With
    /// `check` (true), only say what would change.
    Set(Box<VmChange>, bool, Reply<String>),
    /// The status row.
    Status(Reply<VmStatus>),
    /// The record (`vm list`).
    Record(Reply<VmRecord>),
    /// Pause replication.
    Pause(Reply<StateChange>),
    /// Resume replication.
    Resume(Reply<StateChange>),
    /// Disable replication.
    Disable(Reply<StateChange>),
    /// Reset the statistics window.
    ResetStats(Reply<()>),
    /// Enable replication (primary); the replica accepted the VM already.
    Enable(Box<EnableArgs>, Reply<String>),
    /// Start initial replication now (primary).
    StartInitial(Reply<StateChange>),
    /// Start or schedule a resynchronization (primary).
    ResumeResync(Option<u64>, Reply<StateChange>),
    /// Recovery points (replica), with why the VM's policy (or the one given, for
    /// `--estimate`) keeps each.
    Points(Option<vmr_store::RetentionPolicy>, Reply<Vec<PointInfo>>),
    /// `vmreplica import` (replica).
    Import(PathBuf, Reply<String>),
    /// The import task ended (the owner records its point and answers the command).
    ImportDone(
        PathBuf,
        Result<(vmr_store::RecoveryPoint, String), AgentError>,
        Reply<String>,
    ),
    /// A failover command.
    Failover(FailoverCmd, Reply<FailoverResult>),
    /// Peer: refresh an existing replica VM (`create-replica`).
    Refresh(Peer, Box<CreateReplica>, PeerReply<()>),
    /// Peer: the latest cycle held (`replica-info`), remembering the primary's address.
    ReplicaInfo(Peer, Option<String>, PeerReply<ReplicaVmInfo>),
    /// Peer: admit a cycle; the reply is the writer to stream it into and the token that ends
    /// the stream early (a failover on this replica cancels it).
    BeginCycle(
        Peer,
        Box<CycleHeader>,
        PeerReply<(Writer, CancellationToken)>,
    ),
    /// Peer: the cycle was streamed into the writer; make it durable and record it.
    FinishCycle(Writer, u64, PeerReply<()>),
    /// Peer: block hashes of the latest point (resync).
    Hashes(Peer, BlockHashesRequest, PeerReply<BlockHashes>),
    /// Peer: the primary disabled replication (`disable-replica`).
    PeerDisable(Peer, PeerReply<ReplicationState>),
    /// Peer: is the VM running here (split-brain probe)?
    PrimaryState(Peer, PeerReply<PrimaryVmState>),
    /// Peer: does the VM run here, and (on a replica that forwards it) on this host's primary
    /// (`source-vm-state`, the split-brain probe across an extended chain)?
    SourceState(Peer, PeerReply<SourceVmState>),
    /// Peer: this replica's primary failed the VM over and replicates from a point of its own
    /// (`continue-from`, extended replication).
    ContinueFrom(Peer, u64, PeerReply<ContinuedFrom>),
    /// Peer: a sibling replica of this fanned-out VM failed it over and replicates to this
    /// replica from now on (`follow`, fan-out's failover).
    Follow(Peer, PeerReply<ContinuedFrom>),
    /// Peer: become the replica of the VM (reverse after a failover).
    BecomeReplica(Peer, Box<BecomeReplica>, PeerReply<BecameReplica>),
    /// The failover network settings were applied in the live failed-over VM (the lines of
    /// the outcome); sent by the task that applied them.
    NetworkApplied(Uuid, Vec<String>),
    /// Peer handler: streaming a cycle into the store failed and its writer was aborted (the
    /// owner notes a full store and runs a failover that waited for the cycle).
    StreamFailed(RemoteError),
    /// `set --rpo-alert`: this host's RPO alert for the VM, seconds (`None` = the default).
    SetRpoAlert(Option<u64>, Reply<String>),
    /// `verify` (point, `--local`): the report as JSON (a [`vmr_proto::api::VerifyReport`]
    /// on the primary, a [`vmr_proto::api::LocalVerifyReport`] with `--local` on the replica).
    Verify(Option<u64>, bool, Reply<serde_json::Value>),
    /// `set --retain` / `set --recovery-points`: the VM's retention policy.
    SetRetention(Box<vmr_store::RetentionPolicy>, Reply<String>),
    /// `set NAME --verify-every`: how often the primary VM is verified.
    SetVerifyEvery(Option<u64>, Reply<String>),
    /// `set NAME --bandwidth`: the primary VM's sending limit (the running cycle's next
    /// reservation uses it).
    SetBandwidth(vmr_proto::bandwidth::BandwidthSchedule, Reply<String>),
    /// Stop the owner (agent shutdown).
    Shutdown(oneshot::Sender<()>),
    /// `group create|remove`: the consistency group this primary VM is a member of (`None`:
    /// none); refused when its replication is not enabled and a group is given.
    SetGroup(Option<String>, Reply<()>),
    /// A group cut asks this member for a cycle now (docs/groups.md): `Ok` when a cycle that
    /// joins the cut started or starts when the running one ends, else why not.
    GroupCycleNow(oneshot::Sender<Result<(), String>>),
    /// `group points` (replica): each committed point's id with its group tag.
    GroupTags(Reply<Vec<(u64, Option<vmr_proto::GroupTag>)>>),
    /// `group failover` (replica): the planned failover's final point (`failover prepare`'s
    /// final cycle) when it is this VM's latest committed point, else `None`.
    PlannedFinal(Reply<Option<u64>>),
    /// `enable|pause|resume|disable NAME --extended` (a replica VM's outgoing relationship).
    Extended(vmr_proto::api::ExtendedOp, Reply<String>),
    /// `pause|resume|disable NAME --replica HOST:PORT`: one relationship of a primary VM
    /// (fan-out).
    Relationship(String, Cmd, Reply<StateChange>),
    /// `set NAME --retain|--recovery-points --replica HOST:PORT`: one relationship's
    /// retention (fan-out).
    RelationshipRetention(String, Box<vmr_store::RetentionPolicy>, Reply<String>),
}

/// The handle of a VM's owner task.
#[derive(Clone)]
pub struct VmHandle {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    tx: mpsc::Sender<Command>,
    /// Replica: the incoming cycles being received (shared with the owner's `Vm`).
    pub incoming: crate::owned::Incoming,
}

impl VmHandle {
    /// Send a command built around a reply channel and wait for the reply.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || AgentError::OwnerStopped {
            name: self.name.clone(),
        };
        self.tx.send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Send a command without waiting for a reply; false when the owner has stopped.
    pub async fn ask_raw(&self, cmd: Command) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Send a peer command and wait for the reply.
    pub async fn ask_peer<T>(
        &self,
        make: impl FnOnce(PeerReply<T>) -> Command,
    ) -> Result<T, RemoteError> {
        let (tx, rx) = oneshot::channel();
        let gone = || RemoteError::Unavailable {
            message: format!("the agent is stopping VM {}", self.uuid),
        };
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Every VM's handle, by name and by UUID.
#[derive(Default)]
pub struct Registry {
    by_name: Mutex<BTreeMap<String, VmHandle>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VmHandle>> {
        self.by_name.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle of VM `name`.
    pub fn get(&self, name: &str) -> Option<VmHandle> {
        self.lock().get(name).cloned()
    }

    /// The handle of VM `uuid`.
    pub fn by_uuid(&self, uuid: Uuid) -> Option<VmHandle> {
        self.lock().values().find(|h| h.uuid == uuid).cloned()
    }

    /// Forget the handle of VM `name` (its owner stopped after `vm remove`).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Every handle, by name.
    pub fn all(&self) -> Vec<VmHandle> {
        self.lock().values().cloned().collect()
    }

    /// Start the owner of `rec` (which the caller saved) and register it. Fails when a VM of
    /// that name or UUID is registered.
    pub fn spawn(
        &self,
        host: &Arc<Host>,
        rec: VmRecord,
        restarted: bool,
    ) -> Result<VmHandle, AgentError> {
        let mut map = self.lock();
        if let Some(h) = map
            .values()
            .find(|h| h.name == rec.name || h.uuid == rec.uuid)
        {
            return Err(AgentError::AlreadyRegistered {
                name: h.name.clone(),
                uuid: h.uuid,
            });
        }
        let (tx, rx) = mpsc::channel(64);
        let mut vm = Vm::new(host.clone(), rec);
        let handle = VmHandle {
            name: vm.rec.name.clone(),
            uuid: vm.rec.uuid,
            tx,
            incoming: crate::owned::Incoming::default(),
        };
        vm.incoming = handle.incoming.clone();
        let extended = match vm.rec.mode() {
            ReplicationMode::Replica => ExtendedSide::restore(&vm).map(Box::new),
            ReplicationMode::Primary => None,
        };
        let side = match vm.rec.mode() {
            ReplicationMode::Primary => {
                Side::Primary(PrimarySide::restore(&vm, restarted).map(Box::new))
            }
            ReplicationMode::Replica => Side::Replica(Box::new(ReplicaSide::restore(&vm))),
        };
        let fanout = match &side {
            Side::Primary(Some(_)) => vm
                .rec
                .fanout
                .iter()
                .filter_map(|f| PrimarySide::restore_fanout(&vm, f, restarted))
                .collect(),
            _ => Vec::new(),
        };
        let owner = Owner {
            vm,
            side,
            fanout,
            next_turn: 0,
            fanout_seen: Vec::new(),
            extended,
            rx,
            me: handle.tx.downgrade(),
            seen: None,
            failure_run: 0,
            failure_reported: None,
            rpo_deadline: None,
            receiving: None,
            deferred: std::collections::VecDeque::new(),
            committing: None,
            pruning: None,
            guard: None,
            watch: None,
        };
        tokio::spawn(owner.run());
        map.insert(handle.name.clone(), handle.clone());
        Ok(handle)
    }
}

enum Side {
    /// Primary; `None` while replication is not enabled.
    Primary(Option<Box<PrimarySide>>),
    Replica(Box<ReplicaSide>),
}

/// The key of a replica's extended relationship among the further relationships an owner
/// watches for events (a replica address never has this form).
const EXTENDED_KEY: &str = "extended";

struct Owner {
    vm: Vm,
    side: Side,
    /// A primary VM's further relationships (fan-out, `rec.fanout`), each its own machine,
    /// schedule and cycle task; the first relationship is `side`.
    fanout: Vec<PrimarySide>,
    /// Which relationship gets the first turn to start a cycle (0: the first, `i + 1`:
    /// `fanout[i]`): the one after the relationship whose cycle ended last, so that a frequent
    /// relationship never starves a rare one.
    next_turn: usize,
    /// What the owner observed of each further relationship after the last event: each
    /// fan-out relationship by its replica address, the extended one as [`EXTENDED_KEY`]
    /// (their state and health changes are events too).
    fanout_seen: Vec<(String, Observed)>,
    /// A replica VM's extended (outgoing) relationship, when enabled.
    extended: Option<Box<ExtendedSide>>,
    rx: mpsc::Receiver<Command>,
    /// The owner's own channel, for tasks it starts that report back (weak: the registry's
    /// handle keeps the channel open, not the owner itself).
    me: mpsc::WeakSender<Command>,
    /// What the owner observed after the last event it handled.
    seen: Option<Observed>,
    /// Failures since the last success (for the rate limit of `cycle-failed`).
    failure_run: u32,
    /// The error of the last `cycle-failed` event, while failing.
    failure_reported: Option<String>,
    /// When the RPO alert fires unless a point arrives first.
    rpo_deadline: Option<tokio::time::Instant>,
    /// A replica cycle being streamed into the store: its token ends the stream early. Its
    /// writer holds the VM's chain lock until the handler hands it back (`FinishCycle`) or
    /// aborts it (`StreamFailed`).
    receiving: Option<CancellationToken>,
    /// Commands that wait for the cycle in flight ([`waits_for_chain`]): they need the chain
    /// the cycle's writer holds, and the writer comes back only through this owner's queue,
    /// so the owner must not wait for the lock inside a command.
    deferred: std::collections::VecDeque<Command>,
    /// Replica: the commit of a received cycle (drain, flush, fsync, catalog rename; seconds
    /// for a layer of several GiB written through the page cache), in a task of its own so
    /// that it never holds up `status` (see [`answers_while_pruning`]). Every other command,
    /// the extended relationship and the owner's stop wait for it first, as for `pruning`.
    committing: Option<Committing>,
    /// Replica: the prune that follows a committed cycle, running in a task of its own so that
    /// a merge of a large layer never holds up `status` (see [`answers_while_pruning`]). Every
    /// other command, the extended relationship and the owner's stop wait for it first, so
    /// they see the store as they did when the owner pruned inline.
    pruning: Option<tokio::task::JoinHandle<()>>,
    /// Primary with automatic failover: the guard task that renews the lease and fences.
    guard: Option<crate::autofail::GuardHandle>,
    /// Replica with automatic failover: the takeover watch and its settings.
    watch: Option<Box<(TakeoverWatch, vmr_proto::lease::AutoFailover)>>,
}

async fn wait_note(g: &mut Option<crate::autofail::GuardHandle>) -> Option<LeaseNote> {
    match g {
        Some(g) => g.notes.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_deadline(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn wait_cycle(side: &mut Side) -> Result<CycleDone, tokio::task::JoinError> {
    match side {
        Side::Primary(Some(p)) => match p.running() {
            Some(h) => h.await,
            None => std::future::pending().await,
        },
        _ => std::future::pending().await,
    }
}

/// The next fan-out relationship's cycle task to end: its index and what it came to.
async fn wait_fanout(
    sides: &mut [PrimarySide],
) -> (usize, Result<CycleDone, tokio::task::JoinError>) {
    use std::future::Future;
    std::future::poll_fn(|cx| {
        for (i, p) in sides.iter_mut().enumerate() {
            if let Some(h) = p.running()
                && let std::task::Poll::Ready(r) = std::pin::Pin::new(h).poll(cx)
            {
                return std::task::Poll::Ready((i, r));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A received cycle being committed by a task of its own ([`Owner::committing`]), with what
/// its acknowledgement needs.
struct Committing {
    task: tokio::task::JoinHandle<Result<vmr_store::RecoveryPoint, vmr_store::StoreError>>,
    id: u64,
    kind: vmr_proto::CycleKind,
    bytes: u64,
    reply: PeerReply<()>,
    started: std::time::Instant,
}

/// The commit's outcome; a task that ended abnormally is reported as its join error.
type CommitOutcome =
    Result<Result<vmr_store::RecoveryPoint, vmr_store::StoreError>, tokio::task::JoinError>;

async fn wait_commit(c: &mut Option<Committing>) -> CommitOutcome {
    match c {
        Some(c) => (&mut c.task).await,
        None => std::future::pending().await,
    }
}

async fn wait_prune(p: &mut Option<tokio::task::JoinHandle<()>>) {
    match p {
        Some(h) => {
            let _ = h.await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_extended(
    x: &mut Option<Box<ExtendedSide>>,
) -> Result<crate::extended::ExtDone, tokio::task::JoinError> {
    match x.as_mut().and_then(|x| x.running()) {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

impl Owner {
    async fn run(mut self) {
        if self.vm.rec.mode() == ReplicationMode::Replica {
            self.reconcile_replica();
        }
        if let Some(x) = &mut self.extended {
            x.sync_source_failover(&mut self.vm);
        }
        self.start_auto();
        // Time passes for the machine on a steady beat that commands cannot postpone.
        let mut beat = tokio::time::interval(crate::primary::TICK);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Whatever the last event asked for is carried out before the next one.
            self.drive_primaries(false);
            if let Some(x) = &mut self.extended
                && self.pruning.is_none()
                && self.committing.is_none()
            {
                x.carry_out(&mut self.vm);
            }
            self.watch();
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None => break,
                    Some(Command::Shutdown(ack)) => {
                        self.finish_commit().await;
                        self.finish_prune().await;
                        // The guard is not stopped: its fence watchdog outlives the agent and
                        // fences the VM when its right to run ends, unless the agent is back.
                        self.vm.stop_disable_notice().await;
                        if let Side::Primary(Some(p)) = &mut self.side {
                            p.stop().await;
                        }
                        for p in &mut self.fanout {
                            p.stop().await;
                        }
                        if let Some(x) = &mut self.extended {
                            x.stop().await;
                        }
                        let _ = ack.send(());
                        break;
                    }
                    Some(Command::Remove(replica, check, reply)) => {
                        self.finish_commit().await;
                        self.finish_prune().await;
                        if !check {
                            self.vm.stop_disable_notice().await;
                        }
                        let r = match replica {
                            None => self.remove(check),
                            Some(keep_data) => self.remove_replica(keep_data, check).await,
                        };
                        let removed = r.is_ok() && !check;
                        let _ = reply.send(r);
                        if removed {
                            if let Some(x) = &mut self.extended {
                                x.stop().await;
                            }
                            self.vm.host.telemetry.forget(self.vm.rec.uuid);
                            break;
                        }
                    }
                    Some(cmd) => self.handle(cmd).await,
                },
                done = wait_commit(&mut self.committing) => {
                    if let Some(c) = self.committing.take() {
                        self.committed(c, done).await;
                    }
                }
                () = wait_prune(&mut self.pruning) => {
                    self.pruning = None;
                }
                done = wait_cycle(&mut self.side) => {
                    if let Side::Primary(Some(p)) = &mut self.side {
                        p.cycle_done(&mut self.vm, done);
                        if let Some(Ok(report)) = p.take_verified() {
                            self.verify_event(&report);
                        }
                    }
                    self.next_turn = 1;
                }
                (i, done) = wait_fanout(&mut self.fanout) => {
                    if let Some(p) = self.fanout.get_mut(i) {
                        p.cycle_done(&mut self.vm, done);
                        let _ = p.take_verified();
                    }
                    self.next_turn = i + 2;
                }
                done = wait_extended(&mut self.extended) => {
                    if let Some(x) = &mut self.extended {
                        x.cycle_done(&mut self.vm, done);
                    }
                }
                note = wait_note(&mut self.guard) => match note {
                    Some(n) => self.lease_note(n).await,
                    None => {
                        tracing::error!(vm = %self.vm.rec.name, "auto-failover: the guard task ended");
                        self.guard = None;
                    }
                },
                _ = wait_deadline(self.rpo_deadline) => {
                    // `watch` at the top of the loop raises the alert.
                    self.rpo_deadline = None;
                }
                _ = beat.tick() => {
                    self.vm.reap_children();
                    self.drive_primaries(true);
                    if let Some(x) = &mut self.extended
                        && self.pruning.is_none()
                        && self.committing.is_none()
                    {
                        x.tick(&mut self.vm);
                    }
                    self.watch_step(WatchEvent::Tick { now_ms: crate::autofail::mono_ms() }).await;
                }
            }
        }
    }

    /// Carry out what the primary relationships' machines asked for (and, with `tick`, feed
    /// them the time). With several relationships, a relationship starts a cycle only while no
    /// other relationship's cycle task runs (QEMU's QMP monitor takes one connection at a
    /// time, and each cycle's capture holds one); the relationships take turns, starting
    /// after the one whose cycle ended last. A paused, disabled or failing relationship runs
    /// no task, so it never holds another back.
    fn drive_primaries(&mut self, tick: bool) {
        let Side::Primary(Some(first)) = &mut self.side else {
            return;
        };
        let n = 1 + self.fanout.len();
        for turn in vmr_core::fanout::turns(n, self.next_turn) {
            let running: Vec<bool> = std::iter::once(first.is_running())
                .chain(self.fanout.iter().map(PrimarySide::is_running))
                .collect();
            let open = vmr_core::fanout::may_start(&running, turn);
            let side = if turn == 0 {
                &mut **first
            } else {
                &mut self.fanout[turn - 1]
            };
            side.set_gate(n > 1, !open);
            if tick {
                side.tick(&mut self.vm);
            } else {
                side.flush(&mut self.vm);
            }
        }
    }

    /// The relationship `replica` names (0: the first, `i + 1`: `fanout[i]`); with no
    /// `replica`, the only relationship, or an error naming the VM's replicas when it has
    /// several.
    fn relationship(&self, replica: Option<&str>) -> Result<usize, AgentError> {
        let Side::Primary(Some(first)) = &self.side else {
            return match replica {
                None => Ok(0),
                Some(_) => Err(self.not_enabled()),
            };
        };
        let mut all = vec![first.replica(&self.vm)];
        all.extend(self.fanout.iter().map(|p| p.replica(&self.vm)));
        vmr_core::fanout::resolve(&all, replica).map_err(|u| match u {
            vmr_core::fanout::Unresolved::Ambiguous => self.ambiguous(),
            vmr_core::fanout::Unresolved::NoSuch => AgentError::NoSuchRelationship {
                name: self.vm.rec.name.clone(),
                replica: replica.unwrap_or_default().to_owned(),
                replicas: all.join(", "),
            },
        })
    }

    /// With several relationships (fan-out), the commands that would act on one of them and
    /// cannot name it are refused here, naming the VM's replicas (`None`: answered); `pause`,
    /// `resume` and `disable` name one with `--replica` ([`Command::Relationship`]).
    fn refuse_ambiguous(&self, cmd: Command) -> Option<Command> {
        if self.fanout.is_empty() {
            return Some(cmd);
        }
        let not_built = |what: &'static str| AgentError::FanoutRefused {
            name: self.vm.rec.name.clone(),
            reason: FanoutRefusal::NotBuilt(what),
        };
        match cmd {
            Command::StartInitial(r) | Command::ResumeResync(_, r) => {
                let _ = r.send(Err(self.ambiguous()));
            }
            Command::SetRetention(_, r) => {
                let _ = r.send(Err(self.ambiguous()));
            }
            Command::SetVerifyEvery(_, r) => {
                let _ = r.send(Err(not_built("`set --verify-every`")));
            }
            Command::SetBandwidth(_, r) => {
                let _ = r.send(Err(not_built("`set --bandwidth`")));
            }
            Command::Verify(_, _, r) => {
                let _ = r.send(Err(not_built("`verify`")));
            }
            Command::SetGroup(Some(_), r) => {
                let _ = r.send(Err(not_built("a consistency group")));
            }
            cmd => return Some(cmd),
        }
        None
    }

    /// The error of a command that must name one of the VM's relationships.
    fn ambiguous(&self) -> AgentError {
        let mut all: Vec<&str> = self
            .vm
            .rec
            .enable
            .iter()
            .map(|a| a.replica.as_str())
            .collect();
        all.extend(self.vm.rec.fanout.iter().map(|f| f.args.replica.as_str()));
        AgentError::AmbiguousRelationship {
            name: self.vm.rec.name.clone(),
            replicas: all.join(", "),
        }
    }

    /// An admin command on relationship `rel` (see [`Owner::relationship`]).
    async fn relationship_cmd(&mut self, rel: usize, cmd: Cmd) -> Result<StateChange, AgentError> {
        if rel == 0 {
            if cmd == Cmd::Disable && !self.fanout.is_empty() {
                return Err(AgentError::FanoutRefused {
                    name: self.vm.rec.name.clone(),
                    reason: FanoutRefusal::FirstRelationship,
                });
            }
            let r = self.primary_cmd(cmd).await;
            if cmd == Cmd::Disable
                && r.is_ok()
                && let Side::Primary(p) = &mut self.side
            {
                *p = None;
            }
            return r;
        }
        let i = rel - 1;
        if cmd == Cmd::Disable {
            // Removing its bitmaps opens the VM's monitor: no other relationship's cycle may
            // hold it meanwhile (their cycles are cancelled, their changes merged back, and
            // they plan again).
            if let Side::Primary(Some(p)) = &mut self.side {
                p.stop().await;
            }
            for (j, p) in self.fanout.iter_mut().enumerate() {
                if j != i {
                    p.stop().await;
                }
            }
        }
        let r = self.fanout[i].command(&mut self.vm, cmd).await;
        if cmd == Cmd::Disable {
            if r.is_ok() {
                self.fanout.remove(i);
            }
            if let Side::Primary(Some(p)) = &mut self.side {
                p.resume_after_stop(&mut self.vm);
            }
            for p in &mut self.fanout {
                p.resume_after_stop(&mut self.vm);
            }
        }
        r
    }

    /// Pause every further relationship that replicates (fan-out), for `why`: their running
    /// cycles are stopped first (their changes merged back). Returns the replicas paused.
    async fn pause_further(&mut self, why: &str) -> Vec<String> {
        let mut paused = Vec::new();
        for i in 0..self.fanout.len() {
            self.fanout[i].stop().await;
            let replica = self.fanout[i].replica(&self.vm).to_owned();
            match self.fanout[i].command(&mut self.vm, Cmd::Pause).await {
                Ok(_) => {
                    tracing::info!(vm = %self.vm.rec.name, relationship = %replica, "paused for {why}");
                    paused.push(replica);
                }
                // Already paused (or not replicating): nothing to undo later.
                Err(e) => {
                    tracing::info!(vm = %self.vm.rec.name, relationship = %replica, "not paused for {why}: {e}");
                }
            }
            self.fanout[i].resume_after_stop(&mut self.vm);
        }
        // Their cycles are stopped: the first relationship's gate, which the owner closed
        // while one of them ran, opens now (a planned failover's final cycle starts at once
        // instead of waiting for the owner's next turn).
        if let Side::Primary(Some(first)) = &mut self.side {
            let running: Vec<bool> = std::iter::once(first.is_running())
                .chain(self.fanout.iter().map(PrimarySide::is_running))
                .collect();
            first.set_gate(running.len() > 1, !vmr_core::fanout::may_start(&running, 0));
        }
        paused
    }

    /// Emit an event about this VM.
    fn emit(&self, kind: EventKind, severity: Severity, message: String) -> NewEvent {
        let state = self.observe(now_ms()).state;
        NewEvent::new(Some(self.vm.event_vm(state)), kind, severity, message)
    }

    fn observe(&self, now: u64) -> Observed {
        match &self.side {
            Side::Primary(Some(p)) => p.observe(&self.vm, now),
            Side::Primary(None) => crate::primary::disabled_observe(&self.vm, now),
            Side::Replica(r) => r.observe(&self.vm, now),
        }
    }

    /// After each handled event: raise or clear the RPO alert, set its timer, and emit what
    /// changed since the last look.
    fn watch(&mut self) {
        let now = now_ms();
        let verdict = match &self.side {
            Side::Primary(Some(p)) => {
                let (state, stats) = p.rpo_inputs();
                self.vm.rpo_verdict(state, stats, now)
            }
            Side::Primary(None) => vmr_core::RpoVerdict::NotWatched,
            Side::Replica(r) => {
                let (state, stats) = r.rpo_inputs();
                self.vm.rpo_verdict(state, stats, now)
            }
        };
        let rpo_ms = self.vm.rpo_alert_secs().unwrap_or(0) * 1000;
        let name = self.vm.rec.name.clone();
        let log = &self.vm.host.events;
        match vmr_core::decide_rpo(self.vm.rpo_alert.is_some(), verdict) {
            Some(vmr_core::RpoChange::Fire { lag_ms }) => {
                let e = self
                    .emit(
                        EventKind::RpoExceeded,
                        Severity::Warning,
                        format!(
                            "{name}: the last point is {} old, past the RPO alert of {}",
                            vmr_core::alert::human_ms(lag_ms),
                            vmr_core::alert::human_ms(rpo_ms)
                        ),
                    )
                    .field("lag_ms", lag_ms)
                    .field("rpo_ms", rpo_ms);
                self.vm.rpo_alert = Some(log.emit(e));
            }
            Some(vmr_core::RpoChange::Clear { lag_ms }) => {
                let alert = self.vm.rpo_alert.take();
                let msg = match lag_ms {
                    Some(l) => format!(
                        "{name}: back within the RPO alert of {} (the last point is {} old)",
                        vmr_core::alert::human_ms(rpo_ms),
                        vmr_core::alert::human_ms(l)
                    ),
                    None => format!("{name}: no longer held to its RPO alert"),
                };
                let mut e = self
                    .emit(EventKind::RpoRecovered, Severity::Info, msg)
                    .field("rpo_ms", rpo_ms)
                    .field("alert", alert);
                if let Some(l) = lag_ms {
                    e = e.field("lag_ms", l);
                }
                log.emit(e);
            }
            None => {}
        }
        self.rpo_deadline = match verdict {
            vmr_core::RpoVerdict::Within { deadline_ms, .. } => Some(
                tokio::time::Instant::now()
                    + std::time::Duration::from_millis(deadline_ms.saturating_sub(now)),
            ),
            _ => None,
        };
        self.watch_fanout(now);
        let obs = self.observe(now);
        let Some(prev) = self.seen.replace(obs.clone()) else {
            return;
        };
        let log = &self.vm.host.events;
        if obs.state != prev.state {
            let severity = match obs.state {
                ReplicationState::Error => Severity::Critical,
                _ => Severity::Info,
            };
            log.emit(
                self.emit(
                    EventKind::StateChanged,
                    severity,
                    format!("{name}: {} -> {}", prev.state, obs.state),
                )
                .field("from", prev.state.to_string())
                .field("to", obs.state.to_string()),
            );
            if obs.state == ReplicationState::WaitingForStartResynchronize {
                log.emit(
                    self.emit(
                        EventKind::ResyncRequired,
                        Severity::Critical,
                        format!(
                            "{name}: resynchronization required (`vmreplica resume --resync {name}`){}",
                            obs.last_error
                                .as_deref()
                                .map(|e| format!(": {e}"))
                                .unwrap_or_default()
                        ),
                    )
                    .field("error", obs.last_error.clone()),
                );
            }
        }
        if obs.health != prev.health {
            let reason = if obs.reason.is_empty() {
                "healthy".to_owned()
            } else {
                obs.reason.clone()
            };
            log.emit(
                self.emit(
                    EventKind::HealthChanged,
                    Severity::of_health(obs.health),
                    format!("{name}: health {} -> {}: {reason}", prev.health, obs.health),
                )
                .field("from", prev.health.to_string())
                .field("to", obs.health.to_string())
                .field("reason", obs.reason.clone()),
            );
        }
        if obs.errors > prev.errors
            && let Some(err) = &obs.last_error
        {
            let n = u32::try_from(obs.errors - prev.errors).unwrap_or(u32::MAX);
            self.failure_run = self.failure_run.saturating_add(n);
            let every = self.vm.host.config.events.failure_every;
            if vmr_core::report_failure(
                self.failure_run,
                err,
                self.failure_reported.as_deref(),
                every,
            ) {
                log.emit(
                    self.emit(
                        EventKind::CycleFailed,
                        Severity::Warning,
                        format!(
                            "{name}: cycle failed ({} in a row): {err}",
                            self.failure_run
                        ),
                    )
                    .field("consecutive", self.failure_run)
                    .field("error", err.clone()),
                );
                self.failure_reported = Some(err.clone());
            }
        }
        if obs.last_error.is_none() {
            self.failure_run = 0;
            self.failure_reported = None;
        }
        if obs.missed > prev.missed {
            log.emit(
                self.emit(
                    EventKind::CycleMissed,
                    Severity::Warning,
                    format!(
                        "{name}: {} cycle(s) missed their interval ({} in the window)",
                        obs.missed - prev.missed,
                        obs.missed
                    ),
                )
                .field("missed", obs.missed),
            );
        }
    }

    /// The further relationships' state and health changes since the last event, as events
    /// naming the relationship: each fan-out relationship (`NAME (to HOST:PORT)`, field
    /// `relationship` = its replica's address) and a replica's extended relationship (`NAME
    /// (extended to HOST:PORT)`, field `relationship` = `extended`). Their failures and missed
    /// cycles show in their health; the RPO alert is the VM's own relationship's.
    fn watch_fanout(&mut self, now: u64) {
        let mut current: Vec<(String, Observed)> = self
            .fanout
            .iter()
            .map(|p| (p.replica(&self.vm).to_owned(), p.observe(&self.vm, now)))
            .collect();
        if let Some(x) = &self.extended {
            current.push((EXTENDED_KEY.to_owned(), x.observe(now)));
        }
        let prev = std::mem::replace(&mut self.fanout_seen, current.clone());
        let name = &self.vm.rec.name;
        let log = &self.vm.host.events;
        for (key, obs) in &current {
            let Some((_, was)) = prev.iter().find(|(r, _)| r == key) else {
                continue;
            };
            let (label, relationship) = match &self.extended {
                Some(x) if key == EXTENDED_KEY => (
                    format!("extended to {}", x.replica()),
                    "extended".to_owned(),
                ),
                _ => (format!("to {key}"), key.clone()),
            };
            if obs.state != was.state {
                let severity = match obs.state {
                    ReplicationState::Error | ReplicationState::WaitingForStartResynchronize => {
                        Severity::Critical
                    }
                    _ => Severity::Info,
                };
                log.emit(
                    self.emit(
                        EventKind::StateChanged,
                        severity,
                        format!("{name} ({label}): {} -> {}", was.state, obs.state),
                    )
                    .field("from", was.state.to_string())
                    .field("to", obs.state.to_string())
                    .field("relationship", relationship.clone()),
                );
            }
            if obs.health != was.health {
                let reason = if obs.reason.is_empty() {
                    "healthy".to_owned()
                } else {
                    obs.reason.clone()
                };
                log.emit(
                    self.emit(
                        EventKind::HealthChanged,
                        Severity::of_health(obs.health),
                        format!(
                            "{name} ({label}): health {} -> {}: {reason}",
                            was.health, obs.health
                        ),
                    )
                    .field("from", was.health.to_string())
                    .field("to", obs.health.to_string())
                    .field("reason", obs.reason.clone())
                    .field("relationship", relationship),
                );
            }
        }
    }

    /// A replica store without room for a cycle: one `store-full` event until a cycle is
    /// committed again.
    fn note_store(&mut self, r: &Result<(), &RemoteError>) {
        match r {
            Err(RemoteError::DiskFull { .. }) if !self.vm.store_full => {
                self.vm.store_full = true;
                let msg = match r {
                    Err(e) => e.to_string(),
                    Ok(()) => String::new(),
                };
                let name = self.vm.rec.name.clone();
                let e = self
                    .emit(
                        EventKind::StoreFull,
                        Severity::Critical,
                        format!("{name}: the replica store is full: {msg}"),
                    )
                    .field("error", msg);
                self.vm.host.events.emit(e);
            }
            Ok(()) => self.vm.store_full = false,
            _ => {}
        }
    }

    /// The event of a failover command that succeeded.
    fn failover_event(&self, f: &FailoverCmd, res: &FailoverResult) {
        let name = &self.vm.rec.name;
        let (kind, what) = match f {
            FailoverCmd::Prepare { .. } => (
                EventKind::FailoverPrepared,
                "planned failover prepared: final cycle shipped",
            ),
            FailoverCmd::Start { .. } => (EventKind::FailoverStarted, "failover started"),
            FailoverCmd::Test { .. } => (EventKind::FailoverTestStarted, "test failover started"),
            FailoverCmd::StopTest { .. } => {
                (EventKind::FailoverTestStopped, "test failover stopped")
            }
            FailoverCmd::Cancel => (EventKind::FailoverCancelled, "failover cancelled"),
            FailoverCmd::Complete => (EventKind::FailoverCompleted, "failover completed"),
            FailoverCmd::Reverse { .. } => (EventKind::Reversed, "replication reversed"),
        };
        let point = res
            .point
            .map(|p| format!(" (recovery point {p})"))
            .unwrap_or_default();
        let mut e = self
            .emit(kind, Severity::Warning, format!("{name}: {what}{point}"))
            .field("point", res.point)
            .field("state", res.state.to_string());
        if let Some(t) = res.test_id {
            e = e.field("copy", t.to_string());
        }
        self.vm.host.events.emit(e);
    }

    /// `verify`: on the primary, a verify cycle (`point` must be `None` or name the latest
    /// acknowledged point: `vmr_core::verify_point_accepted`); with `local`, on the replica,
    /// the store's own checks (of one point with `point`).
    async fn verify(&mut self, point: Option<u64>, local: bool, reply: Reply<serde_json::Value>) {
        if let (Side::Primary(Some(p)), false) = (&mut self.side, local)
            && vmr_core::verify_point_accepted(point, p.machine().last_cycle())
        {
            // Answered when the verify cycle ends; the owner keeps serving meanwhile.
            p.start_verify(&mut self.vm, reply);
            return;
        }
        let r = self.verify_other(point, local).await;
        let _ = reply.send(r);
    }

    /// `verify` answered at once: `--local` on the replica, and the refusals.
    async fn verify_other(
        &mut self,
        point: Option<u64>,
        local: bool,
    ) -> Result<serde_json::Value, AgentError> {
        let name = self.vm.rec.name.clone();
        fn json(v: impl serde::Serialize) -> Result<serde_json::Value, AgentError> {
            serde_json::to_value(v).map_err(|source| AgentError::JsonEncode {
                what: "the verification report",
                source,
            })
        }
        match (&mut self.side, local) {
            (Side::Replica(r), true) => {
                let rep = r.verify_local(&self.vm, point).await?;
                json(&rep)
            }
            (Side::Replica(_), false) => Err(AgentError::VerifyWrongSide {
                name,
                what: "`verify` compares with the primary and runs there; on the replica, \
                       `verify --local` checks the layers alone",
            }),
            (Side::Primary(_), true) => Err(AgentError::VerifyWrongSide {
                name,
                what: "`verify --local` checks a replica's layers and runs on the replica",
            }),
            (Side::Primary(None), false) => Err(self.not_enabled()),
            (Side::Primary(Some(_)), false) => Err(AgentError::VerifyPoint {
                name,
                point: point.unwrap_or_default(),
            }),
        }
    }

    /// A verification that found differing blocks: one Critical `verify-mismatch` event with
    /// every differing range.
    fn verify_event(&self, r: &vmr_proto::api::VerifyReport) {
        let n = r.mismatched_blocks();
        if n == 0 {
            return;
        }
        let name = &self.vm.rec.name;
        let ranges: serde_json::Map<String, serde_json::Value> = r
            .disks
            .iter()
            .map(|d| (d.disk.clone(), serde_json::json!(d.mismatched)))
            .collect();
        let e = self
            .emit(
                EventKind::VerifyMismatch,
                Severity::Critical,
                format!(
                    "{name}: verification of point {} found {n} differing block(s): {} \
                     (`vmreplica resume --resync {name}` repairs it)",
                    r.point,
                    r.summary(4)
                ),
            )
            .field("point", r.point)
            .field("mismatched_blocks", n)
            .field("ranges", serde_json::Value::Object(ranges));
        self.vm.host.events.emit(e);
    }

    /// `set --rpo-alert`.
    fn set_rpo_alert(&mut self, secs: Option<u64>) -> Result<String, AgentError> {
        let freq = match self.vm.rec.mode() {
            ReplicationMode::Primary => self.vm.rec.enable.as_ref().map(|e| e.frequency_secs),
            ReplicationMode::Replica => self.vm.rec.frequency_secs,
        };
        if let Some(s) = secs {
            vmr_core::check_rpo_alert(s, freq.unwrap_or(0))?;
        }
        self.vm.rec.rpo_alert_secs = secs;
        self.vm.save()?;
        Ok(match self.vm.rpo_alert_secs() {
            Some(s) => format!("RPO alert of {} is {s} s", self.vm.rec.name),
            None => format!(
                "RPO alert of {} saved; it applies once replication is enabled",
                self.vm.rec.name
            ),
        })
    }

    /// `set --retain` / `set --recovery-points`: on a primary, sent to the replica first (the
    /// way `enable` sends it: a `create-replica` refresh, which changes nothing else there)
    /// and saved only once the replica took it; on a replica, set in its store. Either way it
    /// takes effect at the next prune.
    /// `set --retain|--recovery-points --replica` on fan-out relationship `i`: saved in its
    /// settings and sent to its replica (refused, changing nothing, when it cannot be reached).
    async fn set_fanout_retention(
        &mut self,
        i: usize,
        policy: vmr_store::RetentionPolicy,
    ) -> Result<String, AgentError> {
        vmr_core::check_retention(policy.hourly, policy.grid.as_ref())?;
        let name = self.vm.rec.name.clone();
        let Some(mut args) = self.fanout.get(i).and_then(|p| p.args(&self.vm)).cloned() else {
            return Err(AgentError::NotEnabled { name });
        };
        args.recovery_points = policy.hourly;
        args.retain = policy.grid.clone();
        let def = vmr_proto::VmDefinition::from_toml(&self.vm.rec.launch_toml)?;
        let client = crate::cycle::connect(&self.vm.host, &args)
            .await
            .map_err(|source| AgentError::ConnectReplica {
                replica: args.replica.clone(),
                source,
            })?;
        client
            .create_replica(crate::cycle::create_request(&self.vm.rec, &def, &args))
            .await
            .map_err(AgentError::CreateReplica)?;
        let replica = args.replica.clone();
        if let Some(f) = self
            .vm
            .rec
            .fanout
            .iter_mut()
            .find(|f| f.args.replica == replica)
        {
            f.args = args;
        }
        self.vm.save()?;
        Ok(format!(
            "retention of {name} on {replica} is {policy}; the replica applies it at its next prune"
        ))
    }

    async fn set_retention(
        &mut self,
        policy: vmr_store::RetentionPolicy,
    ) -> Result<String, AgentError> {
        vmr_core::check_retention(policy.hourly, policy.grid.as_ref())?;
        let name = self.vm.rec.name.clone();
        match self.vm.rec.mode() {
            ReplicationMode::Primary => {
                let mut args = self
                    .vm
                    .rec
                    .enable
                    .clone()
                    .ok_or_else(|| AgentError::NotEnabled { name: name.clone() })?;
                args.recovery_points = policy.hourly;
                args.retain = policy.grid.clone();
                let def = vmr_proto::VmDefinition::from_toml(&self.vm.rec.launch_toml)?;
                let client =
                    crate::cycle::connect(&self.vm.host, &args)
                        .await
                        .map_err(|source| AgentError::ConnectReplica {
                            replica: args.replica.clone(),
                            source,
                        })?;
                client
                    .create_replica(crate::cycle::create_request(&self.vm.rec, &def, &args))
                    .await
                    .map_err(AgentError::CreateReplica)?;
                self.vm.rec.enable = Some(args);
                self.vm.save()?;
                Ok(format!(
                    "retention of {name} is {policy}; the replica applies it at its next prune"
                ))
            }
            ReplicationMode::Replica => {
                let store = self.vm.host.store_of(&self.vm.rec)?;
                store.set_retention(self.vm.rec.uuid, policy.clone())?;
                Ok(format!(
                    "retention of {name} is {policy} on this replica (applied at the next prune; \
                     the primary's own policy replaces it when it sends it again)"
                ))
            }
        }
    }

    /// `set --bandwidth`: the primary VM's sending limit, kept in its replication settings.
    fn set_bandwidth(
        &mut self,
        schedule: vmr_proto::bandwidth::BandwidthSchedule,
    ) -> Result<String, AgentError> {
        let name = self.vm.rec.name.clone();
        let Side::Primary(Some(p)) = &self.side else {
            return Err(AgentError::BandwidthNotPrimary { name });
        };
        let Some(args) = self.vm.rec.enable.as_mut() else {
            return Err(AgentError::BandwidthNotPrimary { name });
        };
        let keep = (!schedule.is_unlimited()).then(|| schedule.clone());
        args.bandwidth = keep.clone();
        self.vm.save()?;
        p.set_bandwidth(keep);
        Ok(format!(
            "bandwidth limit of {name} is {schedule} (time zone {}); the agent-wide limit also \
             holds",
            self.vm.host.pace.zone
        ))
    }

    /// A replica VM's record follows what its store holds (agent start: applied staged
    /// cycles may have made new points).
    fn reconcile_replica(&mut self) {
        let Ok(store) = self.vm.host.store_of(&self.vm.rec) else {
            return;
        };
        if let Ok(latest) = store.latest_point(self.vm.rec.uuid)
            && let Side::Replica(r) = &mut self.side
        {
            r.recovered(&mut self.vm, latest);
        }
    }

    /// `enable|pause|resume|disable NAME --extended`: the replica VM's outgoing relationship
    /// (its own machine; the incoming relationship is not touched).
    async fn extended_cmd(
        &mut self,
        what: vmr_proto::api::ExtendedOp,
    ) -> Result<String, AgentError> {
        use vmr_core::ExtEvent;
        use vmr_proto::api::ExtendedOp;
        let name = self.vm.rec.name.clone();
        if self.vm.rec.mode() != ReplicationMode::Replica {
            return Err(AgentError::OnPrimary {
                name,
                what: "extended replication (`--extended`)".into(),
            });
        }
        let now = now_ms();
        let (ev, op) = match what {
            ExtendedOp::Enable(args) => {
                if let Some(x) = &self.extended {
                    return Err(AgentError::Refused(vmr_core::Refusal::AlreadyEnabled {
                        state: x.machine().state(),
                    }));
                }
                let to = args.replica.clone();
                let mut x = ExtendedSide::enable(&mut self.vm, *args)?;
                x.sync_source_failover(&mut self.vm);
                self.extended = Some(Box::new(x));
                return Ok(format!(
                    "extended replication of {name} to {to} enabled: the first extended cycle \
                     copies the newest recovery point"
                ));
            }
            ExtendedOp::Pause => (ExtEvent::Pause { now_ms: now }, "paused"),
            ExtendedOp::Resume => (ExtEvent::Resume { now_ms: now }, "resumed"),
            ExtendedOp::Disable => (ExtEvent::Disable { now_ms: now }, "disabled"),
        };
        let Some(x) = &mut self.extended else {
            return Err(AgentError::NotEnabled {
                name: format!("{name} (extended)"),
            });
        };
        let state = x.admin(&mut self.vm, ev).await?;
        if state == ReplicationState::Disabled {
            self.extended = None;
            self.vm.rec.extended = None;
            self.vm.save()?;
        }
        Ok(format!("extended replication of {name} {op} ({state})"))
    }

    fn not_enabled(&self) -> AgentError {
        AgentError::NotEnabled {
            name: self.vm.rec.name.clone(),
        }
    }

    fn wrong_mode(&self, what: &str) -> AgentError {
        let name = self.vm.rec.name.clone();
        let what = what.to_owned();
        match self.vm.rec.mode() {
            ReplicationMode::Primary => AgentError::OnPrimary { name, what },
            ReplicationMode::Replica => AgentError::OnReplica { name, what },
        }
    }

    /// The one authorization of every peer call on this VM (the transport authorized the
    /// caller's certificate already). Calls addressed to the replica side (cycles,
    /// `create-replica` refresh, `replica-info`, `resync-hashes`) need a replica VM here and a
    /// caller of the trust group that created it. Calls addressed to the primary side
    /// (`primary-vm-state`, `become-replica`) of a primary VM are answered only to its own
    /// replica (the fingerprint it replicates to); on a replica VM, only to its trust group.
    /// Anything else is 403 (`TrustGroup`).
    fn authorize(&self, peer: &Peer, to: ReplicationMode) -> Result<(), RemoteError> {
        let rec = &self.vm.rec;
        let mode = rec.mode();
        if to == ReplicationMode::Replica && mode != ReplicationMode::Replica {
            return Err(RemoteError::UnknownVm { vm: rec.uuid });
        }
        let (allowed, whose) = match mode {
            ReplicationMode::Replica => (
                rec.trust_group == peer.trust_group,
                format!("belongs to trust group {:?}", rec.trust_group),
            ),
            ReplicationMode::Primary => (
                rec.enable
                    .as_ref()
                    .is_some_and(|a| a.replica_fingerprint == peer.fingerprint),
                "answers only its own replica".to_owned(),
            ),
        };
        if allowed {
            return Ok(());
        }
        tracing::warn!(peer = %peer.name, vm = %rec.uuid, ?mode, "refused: peer is not in the VM's trust group");
        Err(RemoteError::TrustGroup {
            message: format!(
                "{mode:?} VM {} {whose}; peer {:?} is in {:?}",
                rec.uuid, peer.name, peer.trust_group
            ),
        })
    }

    fn trust(&self, peer: &Peer) -> Result<(), RemoteError> {
        self.authorize(peer, ReplicationMode::Replica)
    }

    async fn handle(&mut self, cmd: Command) {
        if !answers_while_pruning(&cmd) {
            self.finish_commit().await;
            self.finish_prune().await;
        }
        // A command that needs the VM's chain waits outside the owner while a cycle is being
        // received (see `deferred`). A real failover ends that cycle at once (the old
        // primary's cycles are refused from then on anyway); the others let it finish (a test
        // copy may then start from it).
        if let Some(token) = &self.receiving
            && waits_for_chain(&cmd)
        {
            if matches!(cmd, Command::Failover(FailoverCmd::Start { .. }, _)) {
                token.cancel();
            }
            tracing::info!(vm = %self.vm.rec.name, "the command waits for the cycle being received to end");
            self.deferred.push_back(cmd);
            return;
        }
        if let Some(w) = self.watch.as_mut()
            && matches!(
                cmd,
                Command::BeginCycle(..)
                    | Command::FinishCycle(..)
                    | Command::ReplicaInfo(..)
                    | Command::Refresh(..)
                    | Command::Hashes(..)
            )
        {
            let _ = w.0.step(WatchEvent::Heard {
                now_ms: crate::autofail::mono_ms(),
                fenced: false,
            });
        }
        let Some(cmd) = self.refuse_ambiguous(cmd) else {
            return;
        };
        let primary_name = self.vm.host.config.name.clone();
        match cmd {
            Command::Promise(peer, reply) => {
                let r = self.trust(&peer).map(|()| self.promise());
                let _ = reply.send(r);
            }
            Command::WatchAnswer(seq, answer) => {
                let now_ms = crate::autofail::mono_ms();
                let ev = match answer {
                    Ok(answer) => WatchEvent::WitnessAnswer {
                        now_ms,
                        seq,
                        answer,
                    },
                    Err(error) => WatchEvent::Failed { now_ms, seq, error },
                };
                self.watch_step(ev).await;
            }
            Command::Unfence(reply) => {
                let r = match &self.guard {
                    Some(g) => g.unfence(&self.vm.rec.name).await,
                    None => Err(AgentError::NoAutoFailover {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                // The guard sent its notes (the VM resumed, the new phase) before its answer:
                // they are acted on before the admin hears it, so a `status` right after shows
                // them.
                while let Some(n) = self.guard.as_mut().and_then(|g| g.notes.try_recv().ok()) {
                    self.lease_note(n).await;
                }
                let _ = reply.send(r);
            }
            Command::AutoFailoverOff(reply) => {
                let r = self.auto_failover_off().await;
                let _ = reply.send(r);
            }
            Command::Status(reply) => {
                let now = now_ms();
                let st = match &self.side {
                    Side::Primary(Some(p)) => p.status(&self.vm, &primary_name, now),
                    Side::Primary(None) => {
                        crate::primary::disabled_status(&self.vm, &primary_name, now)
                    }
                    Side::Replica(r) => r.status(&self.vm, &primary_name, now),
                };
                let mut st = st;
                st.auto_failover = match (&self.guard, &self.watch) {
                    (Some(g), _) => Some(g.status()),
                    (None, Some(w)) => Some(crate::autofail::watch_status(&w.0, &w.1)),
                    (None, None) => None,
                };
                st.extended = self.extended.as_ref().map(|x| x.status(now));
                st.fanout = self
                    .fanout
                    .iter()
                    .map(|p| p.status(&self.vm, &primary_name, now))
                    .collect();
                st.group =
                    self.vm.rec.group.as_ref().map(|g| {
                        self.vm.host.groups.status(g).unwrap_or_else(|| {
                            vmr_proto::api::GroupStatus {
                                name: g.clone(),
                                ..Default::default()
                            }
                        })
                    });
                let _ = reply.send(Ok(st));
            }
            Command::Record(reply) => {
                let _ = reply.send(Ok(self.vm.rec.clone()));
            }
            Command::Relationship(replica, cmd, reply) => {
                let r = match self.relationship(Some(&replica)) {
                    Ok(rel) => self.relationship_cmd(rel, cmd).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::RelationshipRetention(replica, policy, reply) => {
                let r = match self.relationship(Some(&replica)) {
                    Ok(0) => self.set_retention(*policy).await,
                    Ok(rel) => self.set_fanout_retention(rel - 1, *policy).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Pause(reply) | Command::Resume(reply) | Command::Disable(reply)
                if !self.fanout.is_empty() =>
            {
                let _ = reply.send(Err(self.ambiguous()));
            }
            Command::Pause(reply) => {
                let r = self.admin(Cmd::Pause, ReplicaCmd::Pause).await;
                let _ = reply.send(r);
            }
            Command::Resume(reply) => {
                let r = if matches!(self.side, Side::Primary(_))
                    && self.vm.rec.lease.fenced.is_some()
                {
                    Err(AgentError::Lease {
                        name: self.vm.rec.name.clone(),
                        refusal: vmr_core::autofailover::HolderRefusal::Phase {
                            event: "resume (use `vmreplica unfence`)",
                            phase: vmr_core::autofailover::HolderPhase::Fenced,
                        },
                    })
                } else {
                    self.admin(Cmd::Resume, ReplicaCmd::Resume).await
                };
                let _ = reply.send(r);
            }
            Command::Disable(reply) => {
                let r = self.admin(Cmd::Disable, ReplicaCmd::Disable).await;
                if r.is_ok()
                    && let Side::Primary(p) = &mut self.side
                {
                    *p = None;
                    if let Some(g) = self.guard.take() {
                        g.stop().await;
                    }
                }
                let _ = reply.send(r);
            }
            Command::ResetStats(reply) => {
                let r = match &mut self.side {
                    Side::Primary(Some(p)) => p.reset_stats(&mut self.vm),
                    Side::Primary(None) => Ok(()),
                    Side::Replica(r) => r.reset_stats(&mut self.vm),
                };
                let _ = reply.send(r);
            }
            Command::Enable(args, reply) => {
                let r = self.enable(*args).await;
                if r.is_ok() {
                    self.start_auto();
                }
                let _ = reply.send(r);
            }
            Command::StartInitial(reply) => {
                let r = self.primary_cmd(Cmd::StartInitial).await;
                let _ = reply.send(r);
            }
            Command::ResumeResync(at, reply) => {
                let r = match self.vm.rec.mode() {
                    ReplicationMode::Replica => Err(AgentError::ResyncOnReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                    ReplicationMode::Primary => self.primary_cmd(Cmd::ResumeResync(at)).await,
                };
                let _ = reply.send(r);
            }
            Command::SetGroup(group, reply) => {
                let r = match (&self.side, &group) {
                    (Side::Primary(None), Some(_)) => Err(self.not_enabled()),
                    (Side::Replica(_), Some(_)) => Err(AgentError::GroupMemberReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                    _ => {
                        self.vm.rec.group = group;
                        self.vm.save()
                    }
                };
                let _ = reply.send(r);
            }
            Command::GroupCycleNow(reply) => {
                let r = match &mut self.side {
                    Side::Primary(Some(p)) => p.cycle_now(&mut self.vm),
                    Side::Primary(None) => Err("its replication is not enabled".to_owned()),
                    Side::Replica(_) => Err("it is a replica VM here".to_owned()),
                };
                let _ = reply.send(r);
            }
            Command::GroupTags(reply) => {
                let r = match &self.side {
                    Side::Replica(_) => self
                        .vm
                        .host
                        .store_of(&self.vm.rec)
                        .and_then(|s| Ok(s.group_tags(self.vm.rec.uuid)?)),
                    Side::Primary(_) => Err(AgentError::PointsNotReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                let _ = reply.send(r);
            }
            Command::PlannedFinal(reply) => {
                let r = match &self.side {
                    Side::Replica(_) => self
                        .vm
                        .host
                        .store_of(&self.vm.rec)
                        .and_then(|s| Ok(s.points(self.vm.rec.uuid)?))
                        .map(|p| {
                            p.last()
                                .filter(|p| p.kind == vmr_store::PointKind::Planned)
                                .map(|p| p.id)
                        }),
                    Side::Primary(_) => Err(AgentError::PointsNotReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                let _ = reply.send(r);
            }
            Command::Points(estimate, reply) => {
                let r = match &self.side {
                    Side::Replica(r) => r.points(&self.vm, estimate.as_ref()),
                    Side::Primary(_) => Err(AgentError::PointsNotReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                let _ = reply.send(r);
            }
            Command::Import(dir, reply) => {
                let job = match &mut self.side {
                    Side::Replica(r) => r.begin_import(&mut self.vm, &dir),
                    Side::Primary(_) => Err(AgentError::ImportNotReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                match job {
                    Ok(job) => {
                        // The import runs in a task of its own; the owner keeps answering.
                        let me = self.me.clone();
                        tokio::spawn(async move {
                            let outcome = job.run().await;
                            if let Some(tx) = me.upgrade() {
                                let _ = tx.send(Command::ImportDone(dir, outcome, reply)).await;
                            }
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::ImportDone(dir, outcome, reply) => {
                let r = match &mut self.side {
                    Side::Replica(r) => r.import_done(&mut self.vm, &dir, outcome),
                    Side::Primary(_) => Err(AgentError::ImportNotReplica {
                        name: self.vm.rec.name.clone(),
                    }),
                };
                let _ = reply.send(r);
            }
            Command::StreamFailed(e) => {
                self.note_store(&Err(&e));
                self.received().await;
            }
            Command::Extended(what, reply) => {
                let r = self.extended_cmd(what).await;
                let _ = reply.send(r);
            }
            Command::SetRpoAlert(secs, reply) => {
                let r = self.set_rpo_alert(secs);
                let _ = reply.send(r);
            }
            Command::Verify(point, local, reply) => self.verify(point, local, reply).await,
            Command::SetRetention(policy, reply) => {
                let r = self.set_retention(*policy).await;
                let _ = reply.send(r);
            }
            Command::SetVerifyEvery(secs, reply) => {
                let name = self.vm.rec.name.clone();
                let r = match &mut self.side {
                    Side::Primary(Some(p)) => {
                        p.set_verify_every(&mut self.vm, secs).map(|()| match secs {
                            Some(s) => format!(
                                "{name} is verified every {s} s (the next verification is due \
                                 that long after the last one, at once when there was none)"
                            ),
                            None => format!("{name} is verified only on `vmreplica verify`"),
                        })
                    }
                    Side::Primary(None) => {
                        Err(AgentError::Refused(vmr_core::Refusal::NotEnabled {
                            op: vmr_core::Op::SetVerifyEvery,
                        }))
                    }
                    Side::Replica(_) => Err(AgentError::Refused(vmr_core::Refusal::WrongSide {
                        op: vmr_core::Op::SetVerifyEvery,
                        wanted: ReplicationMode::Primary,
                        actual: ReplicationMode::Replica,
                    })),
                };
                let _ = reply.send(r);
            }
            Command::SetBandwidth(schedule, reply) => {
                let r = self.set_bandwidth(schedule);
                let _ = reply.send(r);
            }
            Command::Failover(f, reply) => self.failover_cmd(f, reply).await,
            Command::NetworkApplied(view, lines) => {
                if let Ok(mut fr) = self.vm.failover()
                    && let Some(live) = fr.live.as_mut()
                    && live.view == view
                {
                    live.network = lines;
                    if let Err(e) = self.vm.save_failover(&fr) {
                        tracing::warn!(vm = %self.vm.rec.name, error = %crate::util::chain(&e), "cannot record the failover network outcome");
                    }
                }
            }
            Command::Refresh(peer, req, reply) => {
                let r = match self.trust(&peer) {
                    Err(e) => Err(e),
                    Ok(()) => match &mut self.side {
                        Side::Replica(r) => r.refresh(&mut self.vm, *req),
                        Side::Primary(_) => Err(RemoteError::UnknownVm {
                            vm: self.vm.rec.uuid,
                        }),
                    },
                };
                // Automatic failover's settings may have changed with the primary's.
                if self.watch.as_ref().map(|w| &w.1) != self.vm.rec.auto_failover.as_ref() {
                    self.watch = None;
                    self.start_auto();
                }
                let _ = reply.send(r);
            }
            Command::ReplicaInfo(peer, listen, reply) => {
                let r = self.trust(&peer).and_then(|()| {
                    let seen = peer.remote.map(|a| a.ip());
                    if let Some(a) = vmr_core::probe_address(listen.as_deref(), seen) {
                        crate::failover::remember_primary(&self.vm, &a);
                    }
                    let store = self.vm.host.store_of(&self.vm.rec).map_err(internal)?;
                    let latest = store.latest_cycle(self.vm.rec.uuid).map_err(store_err)?;
                    let state = match &self.side {
                        Side::Replica(r) => r.machine().state(),
                        Side::Primary(_) => self.vm.rec.state(),
                    };
                    Ok(ReplicaVmInfo {
                        uuid: self.vm.rec.uuid,
                        latest,
                        state,
                    })
                });
                let _ = reply.send(r);
            }
            Command::BeginCycle(peer, header, reply) => {
                let t = std::time::Instant::now();
                let id = header.id;
                let r = if !self.deferred.is_empty() {
                    // A command waits for the chain: no new cycle takes it first.
                    Err(RemoteError::Unavailable {
                        message: format!(
                            "a command for VM {} waits on this replica (failover, verify)",
                            self.vm.rec.name
                        ),
                    })
                } else {
                    self.begin_cycle(&peer, *header).await
                };
                if let Err(e) = &r {
                    self.note_store(&Err(e));
                }
                tracing::debug!(vm = %self.vm.rec.name, cycle = id, ms = t.elapsed().as_millis() as u64, "cycle admitted, layers open");
                let r = r.map(|w| {
                    let token = CancellationToken::new();
                    self.receiving = Some(token.clone());
                    (w, token)
                });
                let _ = reply.send(r);
            }
            Command::FinishCycle(writer, bytes, reply) => {
                // The cycle stays `receiving` (commands that need the chain keep waiting)
                // until the commit task ends ([`Owner::committed`]).
                let (id, kind) = (writer.header().id, writer.header().kind);
                self.committing = Some(Committing {
                    task: tokio::spawn(writer.finish()),
                    id,
                    kind,
                    bytes,
                    reply,
                    started: std::time::Instant::now(),
                });
            }
            Command::Hashes(peer, req, reply) => {
                let r = match self.trust(&peer) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let accepts = match &self.side {
                            Side::Replica(r) => r.accepts_cycles(),
                            Side::Primary(_) => Err(RemoteError::UnknownVm { vm: req.uuid }),
                        };
                        match accepts
                            .and_then(|()| self.vm.host.store_of(&self.vm.rec).map_err(internal))
                        {
                            Ok(store) => crate::resync::hashes(&store, &self.vm.rec, req).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                let _ = reply.send(r);
            }
            Command::PeerDisable(peer, reply) => {
                let r = self.trust(&peer).and_then(|()| match &mut self.side {
                    Side::Replica(side) => side.disabled_by_primary(&mut self.vm),
                    Side::Primary(_) => Err(RemoteError::UnknownVm {
                        vm: self.vm.rec.uuid,
                    }),
                });
                if r.is_ok() {
                    self.watch = None;
                }
                let _ = reply.send(r);
            }
            Command::PrimaryState(peer, reply) => {
                if let Err(e) = self.authorize(&peer, ReplicationMode::Primary) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let state = match &self.side {
                    Side::Primary(Some(p)) => p.state(),
                    _ => self.vm.rec.state(),
                };
                let v = crate::failover::primary_vm_state(&self.vm, state).await;
                let _ = reply.send(Ok(v));
            }
            Command::SourceState(peer, reply) => {
                // A replica answers only the extended replica it forwards the VM to; a
                // primary only its own replica.
                let allowed = match self.vm.rec.mode() {
                    ReplicationMode::Replica => self
                        .vm
                        .rec
                        .extended
                        .as_ref()
                        .is_some_and(|x| x.args.replica_fingerprint == peer.fingerprint)
                        .then_some(())
                        .ok_or_else(|| RemoteError::TrustGroup {
                            message: format!(
                                "replica VM {} answers source-vm-state only to the extended \
                                 replica it forwards to; peer {:?} is not it",
                                self.vm.rec.uuid, peer.name
                            ),
                        }),
                    ReplicationMode::Primary => self.authorize(&peer, ReplicationMode::Primary),
                };
                if let Err(e) = allowed {
                    let _ = reply.send(Err(e));
                    return;
                }
                let state = match &self.side {
                    Side::Primary(Some(p)) => p.state(),
                    Side::Replica(r) => r.machine().state(),
                    Side::Primary(None) => self.vm.rec.state(),
                };
                let fr = match self.vm.failover() {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = reply.send(Err(internal(crate::util::chain(&e))));
                        return;
                    }
                };
                let live_runs = crate::failover::live_runs(&mut self.vm, &fr);
                // The probe of this host's primary may take seconds: not in the owner.
                let (host, rec) = (self.vm.host.clone(), self.vm.rec.clone());
                tokio::spawn(async move {
                    let v = crate::failover::source_vm_state(host, rec, fr, state, live_runs).await;
                    let _ = reply.send(Ok(v));
                });
            }
            Command::ContinueFrom(peer, point, reply) => {
                let r = match self.trust(&peer) {
                    Err(e) => Err(e),
                    // Only this replica's own primary (the forwarding replica) may ask.
                    Ok(()) if peer.name != self.vm.rec.primary => Err(RemoteError::TrustGroup {
                        message: format!(
                            "continue-from: replica VM {} replicates from {:?}, not from {:?}",
                            self.vm.rec.uuid, self.vm.rec.primary, peer.name
                        ),
                    }),
                    Ok(()) => match &mut self.side {
                        Side::Replica(side) => side.continue_from(&mut self.vm, point).await,
                        Side::Primary(_) => Err(RemoteError::UnknownVm {
                            vm: self.vm.rec.uuid,
                        }),
                    },
                };
                let _ = reply.send(r);
            }
            Command::Follow(peer, reply) => {
                // The caller is authorized by the VM's trust group, as any primary of it.
                let r = match self.trust(&peer) {
                    Err(e) => Err(e),
                    Ok(()) => match &mut self.side {
                        Side::Replica(side) => side.follow(&mut self.vm, &peer).await,
                        Side::Primary(_) => Err(RemoteError::UnknownVm {
                            vm: self.vm.rec.uuid,
                        }),
                    },
                };
                let _ = reply.send(r);
            }
            Command::BecomeReplica(peer, req, reply) => {
                // The extended replica failed the VM over and reverses to this host, which
                // forwarded the VM to it.
                if let Side::Replica(side) = &mut self.side
                    && self
                        .vm
                        .rec
                        .extended
                        .as_ref()
                        .is_some_and(|x| x.args.replica_fingerprint == peer.fingerprint)
                {
                    if let Some(x) = self.extended.as_mut() {
                        x.halt(&mut self.vm).await;
                    }
                    let r = side
                        .become_replica_of_extended(&mut self.vm, &peer, &req)
                        .await;
                    if r.is_ok() {
                        self.extended = None;
                    }
                    let _ = reply.send(r);
                    return;
                }
                if let Err(e) = self.authorize(&peer, ReplicationMode::Primary) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let side = match &mut self.side {
                    Side::Primary(p) => p.as_deref_mut(),
                    Side::Replica(_) => None,
                };
                // A VM automatic failover fenced here (paused or frozen) is ended first: its
                // images become the replica's, its writes after the cut are resynced away.
                if self.vm.rec.lease.fenced.is_some() {
                    crate::autofail::end_fenced_vm(&self.vm.rec.qmp).await;
                }
                // A fanned-out VM's further relationships end with its primary side (the
                // record drops them): their cycles stop first (a capture holds the VM's QMP
                // monitor); the new primary replicates to those replicas, if at all
                // (`enable --initial follow` there). A refused hand-over lets them go on.
                for p in &mut self.fanout {
                    p.stop().await;
                }
                let r = crate::failover::become_replica(&mut self.vm, side, &peer, *req).await;
                let r = r.map(|(v, machine)| {
                    self.side = Side::Replica(Box::new(ReplicaSide::with(machine)));
                    v
                });
                if r.is_ok() {
                    self.fanout.clear();
                } else {
                    for p in &mut self.fanout {
                        p.resume_after_stop(&mut self.vm);
                    }
                }
                // The old primary's guard (fenced) ends with its primary side.
                if r.is_ok()
                    && let Some(g) = self.guard.take()
                {
                    g.stop().await;
                }
                let _ = reply.send(r);
            }
            Command::Set(change, check, reply) => {
                let _ = reply.send(self.set(*change, check));
            }
            Command::Remove(_, _, reply) => {
                // Answered by `run`, which stops the owner after a removal.
                let _ = reply.send(Err(AgentError::OwnerStopped {
                    name: self.vm.rec.name.clone(),
                }));
            }
            Command::Shutdown(ack) => {
                let _ = ack.send(());
            }
        }
    }

    /// The cycle in flight ended (committed or aborted): its writer released the chain, so
    /// the commands that waited for it run now, in the order they came.
    async fn received(&mut self) {
        self.receiving = None;
        while let Some(cmd) = self.deferred.pop_front() {
            Box::pin(self.handle(cmd)).await;
        }
    }

    /// Carry out a failover command and reply (a started VM's network settings are applied
    /// in a task of their own, which replies).
    async fn failover_cmd(&mut self, f: FailoverCmd, reply: Reply<FailoverResult>) {
        let started = matches!(
            f,
            FailoverCmd::Start {
                no_start: false,
                ..
            }
        );
        let r = self.failover(f.clone()).await;
        if let Some(x) = &mut self.extended {
            x.sync_source_failover(&mut self.vm);
        }
        if let Ok(res) = &r {
            self.failover_event(&f, res);
        }
        match r {
            Ok(res) if started && !self.vm.rec.failover.interfaces.is_empty() => {
                self.apply_network(res, reply);
            }
            r => {
                let _ = reply.send(r);
            }
        }
    }

    /// Why this VM's registration cannot change now: a replica VM, or replication enabled
    /// (`why`: what the change would break).
    fn registration_fixed(&self, why: impl FnOnce() -> String) -> Result<(), AgentError> {
        let name = self.vm.rec.name.clone();
        match &self.side {
            Side::Replica(_) => Err(AgentError::VmIsReplica { name }),
            Side::Primary(Some(p)) => Err(AgentError::VmReplicating {
                name,
                state: p.state(),
                why: why(),
            }),
            Side::Primary(None) if self.vm.rec.enable.is_some() => Err(AgentError::VmReplicating {
                name,
                state: self.vm.rec.state(),
                why: why(),
            }),
            Side::Primary(None) => Ok(()),
        }
    }

    /// `vm set --qga`/`--no-qga` is for a primary VM: on a replica the agent sets the socket
    /// itself, to the failed-over VM's (`{qga}`).
    fn check_qga_change(&self) -> Result<(), AgentError> {
        match self.vm.rec.mode() {
            ReplicationMode::Primary => Ok(()),
            ReplicationMode::Replica => Err(self.wrong_mode("vm set --qga")),
        }
    }

    /// `vm remove`: delete the record of a primary VM whose replication is disabled (and its
    /// work directory when empty); the VM and its disks are not touched.
    fn remove(&mut self, check: bool) -> Result<String, AgentError> {
        self.registration_fixed(|| {
            "removing it would leave its change tracking in QEMU and its replica without a \
             primary"
                .to_owned()
        })?;
        let (name, uuid) = (self.vm.rec.name.clone(), self.vm.rec.uuid);
        if check {
            return Ok(format!(
                "unregister VM {name:?} ({uuid}) from this agent (the VM and its disks are not \
                 touched)"
            ));
        }
        self.vm.host.delete_vm(&name)?;
        // Only an empty directory goes: a stand-in may keep its NBD socket there.
        let _ = std::fs::remove_dir(crate::launch::work_dir(&self.vm.host.dir, uuid));
        tracing::info!(vm = %name, %uuid, "VM removed (vm remove)");
        Ok(format!(
            "VM {name:?} ({uuid}) removed; the VM and its disks are untouched"
        ))
    }

    /// `replica remove`: delete the record of a replica VM whose replication is disabled or
    /// paused here and that has no failover VM or test copy, its failover bookkeeping and,
    /// unless `keep_data`, its recovery points.
    async fn remove_replica(&mut self, keep_data: bool, check: bool) -> Result<String, AgentError> {
        let (name, uuid) = (self.vm.rec.name.clone(), self.vm.rec.uuid);
        let Side::Replica(side) = &self.side else {
            return Err(AgentError::VmIsPrimary { name });
        };
        side.machine().check_remove()?;
        let fr = self.vm.failover()?;
        let store = self.vm.host.store_of(&self.vm.rec)?;
        let mut copies: Vec<String> = fr
            .live
            .iter()
            .chain(&fr.tests)
            .map(|c| c.name.clone())
            .collect();
        if copies.is_empty() {
            copies = store
                .views(uuid)
                .unwrap_or_default()
                .iter()
                .map(|v| format!("view {}", v.id))
                .collect();
        }
        if !copies.is_empty() {
            return Err(AgentError::FailoverCopies { name, copies });
        }
        let points = store.points(uuid).map(|p| p.len()).unwrap_or(0);
        let root = store.root().display().to_string();
        if check {
            return Ok(if keep_data {
                format!(
                    "remove replica VM {name:?} ({uuid}), keeping its {points} recovery point(s) \
                     in {root}"
                )
            } else {
                format!(
                    "remove replica VM {name:?} ({uuid}) and delete its {points} recovery \
                     point(s) from {root}"
                )
            });
        }
        if !keep_data {
            match store.remove_vm(uuid) {
                Ok(()) | Err(vmr_store::StoreError::UnknownVm(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let fo = crate::launch::failover_dir(&self.vm.host.dir, uuid);
        if fo.exists() {
            std::fs::remove_dir_all(&fo).map_err(AgentError::io("removing", &fo))?;
        }
        let fr_path = self
            .vm
            .host
            .dir
            .join("failover")
            .join(format!("{uuid}.json"));
        match std::fs::remove_file(&fr_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io("removing", &fr_path)(e)),
        }
        self.vm.host.delete_vm(&name)?;
        tracing::info!(vm = %name, %uuid, keep_data, "replica VM removed (replica remove)");
        Ok(if keep_data {
            format!(
                "replica VM {name:?} ({uuid}) removed; its {points} recovery point(s) stay in {root}"
            )
        } else {
            format!("replica VM {name:?} ({uuid}) and its {points} recovery point(s) removed")
        })
    }

    /// `vm set`: change the QMP socket, the definition (same name and UUID) or the disks of a
    /// primary VM whose replication is disabled.
    fn set(&mut self, change: VmChange, check: bool) -> Result<String, AgentError> {
        let registration =
            change.qmp.is_some() || change.launch.is_some() || change.disks.is_some();
        if !registration {
            return self.set_settings(&change.failover, change.qga, check);
        }
        self.registration_fixed(|| {
            let mut why = Vec::new();
            if change.qmp.is_some() {
                why.push("its change tracking lives in the QEMU behind the current QMP socket");
            }
            if change.launch.is_some() || change.disks.is_some() {
                why.push("the replica holds the definition and disks it was enabled with");
            }
            why.join("; ")
        })?;
        let old = &self.vm.rec;
        let mut rec = old.clone();
        let mut what = Vec::new();
        if let Some(qmp) = change.qmp
            && qmp != old.qmp
        {
            what.push(format!("qmp {} -> {}", old.qmp, qmp));
            rec.qmp = qmp;
        }
        if let Some((toml, def)) = &change.launch {
            if def.uuid != old.uuid {
                return Err(AgentError::DefinitionUuid {
                    name: old.name.clone(),
                    old: old.uuid,
                    new: def.uuid,
                });
            }
            if *toml != old.launch_toml {
                what.push("definition replaced".to_owned());
                rec.launch_toml = toml.clone();
            }
        }
        let disks = match (change.disks, &change.launch) {
            (Some(d), None) => {
                // The disks must be the registered definition's.
                let def = vmr_proto::VmDefinition::from_toml(&old.launch_toml)?;
                if let Some(d) = d.iter().find(|d| !def.disks.iter().any(|x| &x.node == *d)) {
                    return Err(AgentError::DiskNotInDefinition { disk: d.clone() });
                }
                Some(d)
            }
            (Some(d), Some(_)) => Some(d),
            (None, Some((_, def))) => Some(def.disks.iter().map(|d| d.node.clone()).collect()),
            (None, None) => None,
        };
        if let Some(d) = disks
            && d != old.disks
        {
            what.push(format!("disks {} -> {}", old.disks.join(","), d.join(",")));
            rec.disks = d;
        }
        let failover = change.failover.apply(&old.failover);
        if failover != old.failover {
            what.push(describe_failover(&failover));
            rec.failover = failover;
        }
        if let Some(qga) = change.qga {
            self.check_qga_change()?;
            if qga != old.qga {
                what.push(describe_qga(qga.as_deref()));
                rec.qga = qga;
            }
        }
        let name = old.name.clone();
        if what.is_empty() {
            return Ok(format!("VM {name:?}: nothing to change"));
        }
        let what = what.join("; ");
        if check {
            return Ok(format!("change VM {name:?}: {what}"));
        }
        let before = std::mem::replace(&mut self.vm.rec, rec);
        if let Err(e) = self.vm.save() {
            self.vm.rec = before;
            return Err(e);
        }
        tracing::info!(vm = %name, "VM changed (vm set): {what}");
        Ok(format!("VM {name:?} changed: {what}"))
    }

    /// After `failover start` started the VM: apply this host's failover network settings in
    /// the guest, in a task of its own (the guest boots first; the owner keeps answering), which
    /// then answers the command with the outcome and reports it back to the owner.
    fn apply_network(&mut self, mut res: FailoverResult, reply: Reply<FailoverResult>) {
        let name = self.vm.rec.name.clone();
        let interfaces = self.vm.rec.failover.interfaces.clone();
        let live = self.vm.failover().ok().and_then(|f| f.live);
        let (Some(qga), Some(live)) = (crate::failover::live_qga(&self.vm), live) else {
            let line = "failover network settings not applied: the VM definition has no guest \
                        agent channel ({qga}); set the guest's addresses by hand"
                .to_owned();
            tracing::warn!(vm = %name, "{line}");
            res.message.push_str(&format!("\n{line}"));
            res.network = vec![line];
            let _ = reply.send(Ok(res));
            return;
        };
        let me = self.me.clone();
        tokio::spawn(async move {
            let lines = match crate::guestnet::apply(&qga, &interfaces, crate::guestnet::AGENT_WAIT)
                .await
            {
                Ok(outcomes) => outcomes.iter().map(ToString::to_string).collect(),
                Err(e) => vec![format!(
                    "failover network settings not applied: {}",
                    crate::util::chain(&e)
                )],
            };
            for l in &lines {
                tracing::info!(vm = %name, "failover network: {l}");
            }
            res.message
                .push_str(&format!("\nfailover network: {}", lines.join("; ")));
            res.network = lines.clone();
            let _ = reply.send(Ok(res));
            if let Some(tx) = me.upgrade() {
                let _ = tx.send(Command::NetworkApplied(live.view, lines)).await;
            }
        });
    }

    /// `vm set --failover-*` alone: this host's failover network settings, on any VM (primary
    /// or replica) in any state; they take effect at the next real failover to this host.
    /// `vm set` of the settings allowed at any time: this host's failover network settings
    /// (any VM) and the guest agent socket (a primary VM; each app-consistent cut opens it
    /// afresh, so a running cycle keeps the session it has).
    fn set_settings(
        &mut self,
        change: &FailoverChange,
        qga: Option<Option<String>>,
        check: bool,
    ) -> Result<String, AgentError> {
        let name = self.vm.rec.name.clone();
        let mut rec = self.vm.rec.clone();
        let mut what = Vec::new();
        let new = change.apply(&rec.failover);
        if new != rec.failover {
            what.push(describe_failover(&new));
            rec.failover = new;
        }
        if let Some(qga) = qga {
            self.check_qga_change()?;
            if qga != rec.qga {
                what.push(describe_qga(qga.as_deref()));
                rec.qga = qga;
            }
        }
        if what.is_empty() {
            return Ok(format!("VM {name:?}: nothing to change"));
        }
        let what = what.join("; ");
        if check {
            return Ok(format!("change VM {name:?}: {what}"));
        }
        let before = std::mem::replace(&mut self.vm.rec, rec);
        if let Err(e) = self.vm.save() {
            self.vm.rec = before;
            return Err(e);
        }
        tracing::info!(vm = %name, "VM changed (vm set): {what}");
        Ok(format!("VM {name:?} changed: {what}"))
    }

    async fn admin(&mut self, p: Cmd, r: ReplicaCmd) -> Result<StateChange, AgentError> {
        match &mut self.side {
            Side::Primary(_) => self.primary_cmd(p).await,
            Side::Replica(side) => side.set(&mut self.vm, r),
        }
    }

    async fn primary_cmd(&mut self, cmd: Cmd) -> Result<StateChange, AgentError> {
        match &mut self.side {
            Side::Primary(Some(p)) => p.command(&mut self.vm, cmd).await,
            Side::Primary(None) => Err(self.not_enabled()),
            Side::Replica(_) => Err(self.wrong_mode(&format!("{cmd:?}"))),
        }
    }

    /// Start automatic failover's driver when the record has it on: the primary's guard
    /// (while replication is enabled) or the replica's takeover watch (until the VM is failed
    /// over here).
    fn start_auto(&mut self) {
        let Some(cfg) = self.vm.rec.auto_failover.clone() else {
            return;
        };
        let name = self.vm.rec.name.clone();
        match &self.side {
            Side::Primary(Some(p)) if p.state() != ReplicationState::Disabled => {
                if self.guard.is_some() {
                    return;
                }
                let Some(args) = self.vm.rec.enable.clone() else {
                    return;
                };
                let setup = crate::autofail::GuardSetup {
                    host: self.vm.host.clone(),
                    name: name.clone(),
                    uuid: self.vm.rec.uuid,
                    qmp: self.vm.rec.qmp.clone(),
                    cfg,
                    replica: args.replica,
                    replica_fingerprint: args.replica_fingerprint,
                    snapshot: self.vm.rec.lease.clone(),
                };
                match crate::autofail::spawn_guard(setup) {
                    Ok(g) => self.guard = Some(g),
                    Err(e) => tracing::error!(vm = %name, "auto-failover not started: {e}"),
                }
            }
            Side::Replica(r) => {
                let failed_over = matches!(
                    r.machine().state(),
                    ReplicationState::FailedOver
                        | ReplicationState::FailedOverWaitingCompletion
                        | ReplicationState::Disabled
                );
                if self.watch.is_some() || failed_over {
                    return;
                }
                match crate::autofail::params(&cfg) {
                    Ok(params) => {
                        let mut w = TakeoverWatch::new(params);
                        let _ = w.step(WatchEvent::Start {
                            now_ms: crate::autofail::mono_ms(),
                        });
                        self.watch = Some(Box::new((w, cfg)));
                    }
                    Err(e) => tracing::error!(vm = %name, "auto-failover not started: {e}"),
                }
            }
            Side::Primary(_) => {}
        }
    }

    /// The replica's answer to the primary's promise request.
    fn promise(&mut self) -> vmr_proto::lease::PromiseResponse {
        use vmr_proto::lease::PromiseResponse;
        let failed_over = matches!(
            self.vm.rec.state(),
            ReplicationState::FailedOver | ReplicationState::FailedOverWaitingCompletion
        );
        let Some(w) = self.watch.as_mut() else {
            return PromiseResponse::Refused {
                taken_over: failed_over,
            };
        };
        let acts =
            w.0.step(WatchEvent::PromiseAsked {
                now_ms: crate::autofail::mono_ms(),
            })
            .unwrap_or_default();
        acts.into_iter()
            .find_map(|a| match a {
                WatchAction::AnswerPromise(p) => Some(p),
                _ => None,
            })
            .unwrap_or(PromiseResponse::Refused {
                taken_over: failed_over,
            })
    }

    /// One event of the replica's takeover watch, its actions carried out: an ask goes to the
    /// witness in a task that reports back ([`Command::WatchAnswer`]); a granted lease fails
    /// the VM over through `failover start`'s own path (latest point, this host's failover
    /// network settings), with an event.
    async fn watch_step(&mut self, ev: WatchEvent) {
        let Some(w) = self.watch.as_mut() else {
            return;
        };
        let acts = match w.0.step(ev) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(vm = %self.vm.rec.name, "takeover watch: {e}");
                return;
            }
        };
        let cfg = w.1.clone();
        for a in acts {
            match a {
                WatchAction::AskWitness { seq, timeout_ms } => {
                    tracing::warn!(vm = %self.vm.rec.name, "auto-failover: the primary was silent for {} ms; asking the witness for the lease", cfg.auto_failover_ms);
                    let (host, me, vm) = (self.vm.host.clone(), self.me.clone(), self.vm.rec.uuid);
                    tokio::spawn(async move {
                        let answer = crate::autofail::witness_call(
                            &host,
                            &cfg,
                            vmr_proto::lease::WitnessRequest::Takeover { vm },
                            timeout_ms,
                        )
                        .await;
                        if let Some(me) = me.upgrade() {
                            let _ = me.send(Command::WatchAnswer(seq, answer)).await;
                        }
                    });
                    return;
                }
                WatchAction::Failover {
                    epoch,
                    manual: false,
                } => {
                    self.auto_takeover(epoch).await;
                    return;
                }
                _ => {}
            }
        }
    }

    /// The witness granted the replica the lease: fail over as `failover start` does, from
    /// the point the relationship's policy names (`vmr_core::autofailover::takeover_point`).
    async fn auto_takeover(&mut self, epoch: Option<u64>) {
        let name = self.vm.rec.name.clone();
        let epoch_s = epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into());
        let policy = self.watch.as_ref().map(|w| w.1.point).unwrap_or_default();
        // The store's points; an error leaves the choice to `failover start` (the latest
        // point), which reports the store's error itself.
        let points: Vec<(u64, vmr_store::PointKind)> = self
            .vm
            .host
            .store_of(&self.vm.rec)
            .and_then(|s| Ok(s.points(self.vm.rec.uuid)?))
            .map(|ps| ps.iter().map(|p| (p.id, p.kind)).collect())
            .unwrap_or_default();
        let choice = vmr_core::autofailover::takeover_point(policy, &points);
        let which = match (policy, choice.fell_back) {
            (TakeoverPoint::Latest, _) => "the latest point".to_owned(),
            (TakeoverPoint::AppConsistent, false) => "the latest app-consistent point".to_owned(),
            (TakeoverPoint::AppConsistent, true) => {
                "the latest point (the policy asks for an app-consistent point and this replica holds none)".to_owned()
            }
        };
        let e = self
            .emit(
                EventKind::AutoFailover,
                Severity::Critical,
                format!(
                    "{name}: automatic failover: the primary was silent and the witness granted this replica the lease (epoch {epoch_s}); starting the VM from {which}"
                ),
            )
            .field("epoch", epoch)
            .field("point-policy", policy.as_str());
        self.vm.host.events.emit(e);
        let (tx, rx) = oneshot::channel();
        let start = FailoverCmd::Start {
            point: choice.point,
            no_start: false,
            force: false,
        };
        Box::pin(self.handle(Command::Failover(start, tx))).await;
        let host = self.vm.host.clone();
        let evm = self.vm.event_vm(self.observe(now_ms()).state);
        tokio::spawn(async move {
            let (sev, msg) = match rx.await {
                Ok(Ok(r)) => (
                    Severity::Critical,
                    format!(
                        "{name}: automatic failover started the VM from recovery point {}",
                        r.point.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                    ),
                ),
                Ok(Err(e)) => (
                    Severity::Critical,
                    format!("{name}: automatic failover could not start the VM: {e}"),
                ),
                Err(_) => return,
            };
            host.events
                .emit(NewEvent::new(Some(evm), EventKind::AutoFailover, sev, msg));
        });
    }

    /// `failover start` on a replica with automatic failover: the lease first (the watch
    /// decides; the witness is asked here, while the admin waits). Returns the `force` the
    /// failover runs with: true once the lease is this replica's (or `--force`).
    async fn manual_lease(&mut self, force: bool) -> Result<bool, AgentError> {
        let name = self.vm.rec.name.clone();
        let Some(w) = self.watch.as_mut() else {
            return Ok(force);
        };
        if w.0.phase() == WatchPhase::TookOver {
            return Ok(true);
        }
        let now_ms = crate::autofail::mono_ms();
        let acts =
            w.0.step(WatchEvent::ManualStart { now_ms, force })
                .map_err(|refusal| AgentError::Watch {
                    name: name.clone(),
                    refusal,
                })?;
        for a in acts {
            match a {
                WatchAction::Failover { .. } => return Ok(true),
                WatchAction::AskWitness { seq, timeout_ms } => {
                    let call = vmr_proto::lease::WitnessRequest::Takeover {
                        vm: self.vm.rec.uuid,
                    };
                    let r =
                        crate::autofail::witness_call(&self.vm.host, &w.1, call, timeout_ms).await;
                    let now_ms = crate::autofail::mono_ms();
                    let ev = match &r {
                        Ok(answer) => WatchEvent::WitnessAnswer {
                            now_ms,
                            seq,
                            answer: answer.clone(),
                        },
                        Err(error) => WatchEvent::Failed {
                            now_ms,
                            seq,
                            error: error.clone(),
                        },
                    };
                    let acts = w.0.step(ev).unwrap_or_default();
                    for b in acts {
                        match b {
                            WatchAction::Failover { .. } => return Ok(true),
                            WatchAction::ManualRefused(answer) => {
                                return Err(AgentError::LeaseNotGranted {
                                    name,
                                    reason: crate::autofail::describe(&answer),
                                });
                            }
                            _ => {}
                        }
                    }
                    return Err(AgentError::LeaseNotGranted {
                        name,
                        reason: r.err().unwrap_or_else(|| "no answer".into()),
                    });
                }
                _ => {}
            }
        }
        Err(AgentError::LeaseNotGranted {
            name,
            reason: "the witness was not asked".into(),
        })
    }

    /// What the guard says: the owner keeps it in the record and acts on a fence (replication
    /// paused, the event) and on an unfence (replication resumed).
    async fn lease_note(&mut self, n: LeaseNote) {
        let name = self.vm.rec.name.clone();
        match n {
            LeaseNote::Status(s) => {
                if let Some(g) = &mut self.guard {
                    g.set_status(s);
                }
            }
            LeaseNote::Snapshot(s) => {
                self.vm.rec.lease = s;
                if let Err(e) = self.vm.save() {
                    tracing::error!(vm = %name, "auto-failover: the lease epoch was not saved: {e}");
                }
            }
            LeaseNote::Fenced {
                snapshot,
                reason,
                how,
            } => {
                self.vm.rec.lease = snapshot;
                if let Err(e) = self.vm.save() {
                    tracing::error!(vm = %name, "auto-failover: the fence was not saved: {e}");
                }
                if let Err(e) = self.primary_cmd(Cmd::Pause).await {
                    tracing::warn!(vm = %name, "auto-failover: pausing replication after the fence: {e}");
                }
                let e = self
                    .emit(
                        EventKind::Fenced,
                        Severity::Critical,
                        format!(
                            "{name}: fenced by automatic failover: {reason}; the VM was {how}; replication paused (`vmreplica unfence {name}` when the witness is back)"
                        ),
                    )
                    .field("reason", reason.to_string())
                    .field("how", how);
                self.vm.host.events.emit(e);
            }
            LeaseNote::Resumed { snapshot, how } => {
                self.vm.rec.lease = snapshot;
                if let Err(e) = self.vm.save() {
                    tracing::error!(vm = %name, "auto-failover: the unfence was not saved: {e}");
                }
                if let Err(e) = self.primary_cmd(Cmd::Resume).await {
                    tracing::warn!(vm = %name, "auto-failover: resuming replication after the unfence: {e}");
                }
                let e = self.emit(
                    EventKind::AutoFailover,
                    Severity::Warning,
                    format!(
                        "{name}: unfenced by the admin with the witness's lease; the VM was {how}"
                    ),
                );
                self.vm.host.events.emit(e);
            }
        }
    }

    /// `set NAME --auto-failover off` (primary): the guard stops, the lease is removed at the
    /// witness, the replica is told (its watch stops).
    async fn auto_failover_off(&mut self) -> Result<String, AgentError> {
        let name = self.vm.rec.name.clone();
        let Some(cfg) = self.vm.rec.auto_failover.clone() else {
            return Err(AgentError::NoAutoFailover { name });
        };
        if !matches!(self.side, Side::Primary(_)) {
            return Err(self.wrong_mode("`set --auto-failover off`"));
        }
        if let Some(g) = self.guard.take() {
            g.stop().await;
        }
        let epoch = self.vm.rec.lease.epoch;
        let fenced = self.vm.rec.lease.fenced.is_some();
        let removed = crate::autofail::witness_call(
            &self.vm.host,
            &cfg,
            vmr_proto::lease::WitnessRequest::Remove {
                vm: self.vm.rec.uuid,
                epoch,
            },
            5_000,
        )
        .await;
        self.vm.rec.auto_failover = None;
        self.vm.rec.lease = Default::default();
        self.vm.save()?;
        let mut told = "the replica is told with its next create-replica".to_owned();
        if let (Some(args), Ok(def)) = (
            self.vm.rec.enable.clone(),
            vmr_proto::VmDefinition::from_toml(&self.vm.rec.launch_toml),
        ) && let Ok(c) = crate::cycle::connect(&self.vm.host, &args).await
            && c.create_replica(crate::cycle::create_request(&self.vm.rec, &def, &args))
                .await
                .is_ok()
        {
            told = "the replica stopped its watch".to_owned();
        }
        Ok(format!(
            "{name}: automatic failover off ({}; {told}){}",
            match removed {
                Ok(a) => format!("the witness: {}", crate::autofail::describe(&a)),
                Err(e) => format!("the lease was not removed at the witness: {e}"),
            },
            if fenced {
                "; the VM stays paused as fenced: resume it yourself (QMP `cont`) and `vmreplica resume` replication"
            } else {
                ""
            }
        ))
    }

    async fn enable(&mut self, args: EnableArgs) -> Result<String, AgentError> {
        let mut fanout = false;
        match &self.side {
            Side::Replica(_) => {
                return Err(AgentError::EnableOnReplica {
                    name: self.vm.rec.name.clone(),
                });
            }
            Side::Primary(Some(p)) if p.state() != ReplicationState::Disabled => {
                // A VM that replicates already gets a further relationship to another
                // replica (fan-out); to the same replica it is enabled already.
                let same = p.replica(&self.vm) == args.replica
                    || self
                        .fanout
                        .iter()
                        .any(|f| f.replica(&self.vm) == args.replica);
                if same {
                    return Err(AgentError::AlreadyEnabled {
                        name: self.vm.rec.name.clone(),
                        state: p.state(),
                    });
                }
                let refused = |reason: fn(String) -> FanoutRefusal| AgentError::FanoutRefused {
                    name: self.vm.rec.name.clone(),
                    reason: reason(p.replica(&self.vm).to_string()),
                };
                if self.vm.rec.libvirt.is_some() {
                    return Err(refused(FanoutRefusal::Libvirt));
                }
                if self.vm.rec.group.is_some() {
                    return Err(refused(FanoutRefusal::GroupMember));
                }
                fanout = true;
            }
            Side::Primary(_) => {}
        }
        crate::primary::schedule_of(&args)?;
        if let Some(cfg) = &args.auto_failover {
            crate::autofail::params(cfg)?;
            if self.vm.rec.libvirt.is_some() {
                return Err(AgentError::AutoFailoverLibvirt {
                    name: self.vm.rec.name.clone(),
                });
            }
        }
        if fanout && (args.auto_failover.is_some() || self.vm.rec.auto_failover.is_some()) {
            // The guard fences the VM for its one lease; further relationships would go on
            // replicating a fenced VM's (or a taken-over VM's) disks in the old direction.
            return Err(AgentError::FanoutRefused {
                name: self.vm.rec.name.clone(),
                reason: FanoutRefusal::AutoFailover,
            });
        }
        // A disable the replica has not heard of yet must not reach it after this enable.
        self.vm.stop_disable_notice().await;
        // Check the replica answers and accepts us before anything changes here.
        let def = vmr_proto::VmDefinition::from_toml(&self.vm.rec.launch_toml)?;
        let host = &self.vm.host;
        let unauthorized = |e: &vmr_transport::TransportError| {
            matches!(
                e,
                vmr_transport::TransportError::Remote(RemoteError::Unauthorized)
            )
            .then(|| AgentError::NotAuthorizedOnReplica {
                replica: args.replica.clone(),
                primary: host.config.name.clone(),
                fingerprint: host.identity.fingerprint().to_owned(),
            })
        };
        let client = crate::cycle::connect(host, &args).await.map_err(|source| {
            unauthorized(&source).unwrap_or_else(|| AgentError::ConnectReplica {
                replica: args.replica.clone(),
                source,
            })
        })?;
        let mut rec = self.vm.rec.clone();
        rec.auto_failover = args.auto_failover.clone();
        if args.initial == vmr_proto::api::InitialMode::Follow {
            // Fan-out's failover: the replica holds the VM already (of the old primary); it
            // keeps its newest point and takes this host as the VM's primary.
            let c = client
                .follow(rec.uuid)
                .await
                .map_err(|e| unauthorized(&e).unwrap_or(AgentError::Follow(e)))?;
            tracing::info!(vm = %rec.name, replica = %args.replica, kept = c.latest, "the sibling replica follows; its first cycle is a resync against its newest point");
        } else {
            let create = crate::cycle::create_request(&rec, &def, &args);
            client
                .create_replica(create)
                .await
                .map_err(|e| unauthorized(&e).unwrap_or(AgentError::CreateReplica(e)))?;
        }
        if fanout {
            let side = PrimarySide::enable_fanout(&mut self.vm, args.clone())?;
            self.fanout.push(side);
        } else {
            if self.vm.rec.auto_failover != args.auto_failover {
                // A new relationship's lease starts from nothing.
                self.vm.rec.lease = Default::default();
            }
            self.vm.rec.auto_failover = args.auto_failover.clone();
            let side = PrimarySide::enable(&mut self.vm, args.clone())?;
            self.side = Side::Primary(Some(Box::new(side)));
        }
        Ok(format!(
            "replication of {:?} enabled to {} {}{}{}",
            def.name,
            args.replica,
            if args.frequency_secs == vmr_core::CONTINUOUS {
                "continuously".to_owned()
            } else {
                format!("every {} s", args.frequency_secs)
            },
            if args.initial_at_ms.is_some() {
                "; initial replication scheduled"
            } else {
                "; initial replication started"
            },
            if fanout {
                format!(
                    " (a further relationship: the VM replicates to {} replicas)",
                    1 + self.fanout.len()
                )
            } else {
                String::new()
            }
        ))
    }

    async fn failover(&mut self, f: FailoverCmd) -> Result<FailoverResult, AgentError> {
        if let FailoverCmd::Prepare { shutdown } = f {
            match &self.side {
                Side::Primary(Some(_)) => {}
                Side::Primary(None) => return Err(self.not_enabled()),
                Side::Replica(_) => return Err(self.wrong_mode("`failover prepare`")),
            }
            // A fanned-out VM's planned failover goes to its first relationship's replica; the
            // further relationships are paused first (their replicas keep their points; after
            // the failover the new primary makes them follow it: `enable --initial follow`),
            // and resumed if the preparation fails.
            let paused = self.pause_further("the planned failover").await;
            let r = match &mut self.side {
                Side::Primary(Some(p)) => crate::failover::prepare(&mut self.vm, p, shutdown).await,
                _ => Err(self.not_enabled()),
            };
            match r {
                Ok(mut res) => {
                    if !paused.is_empty() {
                        res.message.push_str(&format!(
                            "; paused the further relationships to {} (after the failover, \
                             `enable NAME --replica HOST:PORT --initial follow` on the new \
                             primary makes each follow it without a full copy)",
                            paused.join(", ")
                        ));
                    }
                    return Ok(res);
                }
                Err(e) => {
                    for i in 0..self.fanout.len() {
                        let replica = self.fanout[i].replica(&self.vm).to_owned();
                        if paused.contains(&replica) {
                            let _ = self.fanout[i].command(&mut self.vm, Cmd::Resume).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
        if !matches!(self.side, Side::Replica(_)) {
            return Err(self.wrong_mode("this"));
        }
        // With automatic failover a real failover takes the lease first (the witness's grant
        // stands for the split-brain probe); `--force` overrides both.
        let f = match f {
            FailoverCmd::Start {
                point,
                no_start,
                force,
            } => FailoverCmd::Start {
                point,
                no_start,
                force: self.manual_lease(force).await?,
            },
            other => other,
        };
        let Side::Replica(side) = &mut self.side else {
            return Err(self.wrong_mode("this"));
        };
        match f {
            // Answered above; on a replica it is the wrong side.
            FailoverCmd::Prepare { .. } => Err(AgentError::OnReplica {
                name: self.vm.rec.name.clone(),
                what: "`failover prepare`".to_owned(),
            }),
            FailoverCmd::Start {
                point,
                no_start,
                force,
            } => crate::failover::start(&mut self.vm, side, point, no_start, force, false).await,

            FailoverCmd::Test { point } => {
                crate::failover::start(&mut self.vm, side, point, false, true, true).await
            }
            FailoverCmd::StopTest { test_id } => {
                crate::failover::stop_test(&mut self.vm, test_id).await
            }
            FailoverCmd::Cancel => crate::failover::cancel(&mut self.vm, side).await,
            FailoverCmd::Complete => crate::failover::complete(&mut self.vm, side).await,
            FailoverCmd::Reverse {
                replica,
                replica_fingerprint,
                frequency_secs,
                follow,
            } => {
                // Reversing to the extended replica takes its relationship over: no extended
                // cycle may run meanwhile (a failed reverse lets the next tick start one).
                if let Some(x) = self.extended.as_mut() {
                    x.halt(&mut self.vm).await;
                }
                let (r, machine) = crate::failover::reverse(
                    &mut self.vm,
                    side,
                    replica,
                    replica_fingerprint,
                    frequency_secs,
                    follow,
                )
                .await?;
                if self.vm.rec.extended.is_none() {
                    self.extended = None;
                }
                // Reverse starts a new relationship: automatic failover is enabled for it
                // anew (`enable --auto-failover` after a disable), never inherited.
                self.watch = None;
                if self.vm.rec.auto_failover.take().is_some() {
                    self.vm.rec.lease = Default::default();
                    self.vm.save()?;
                }
                self.side = Side::Primary(Some(Box::new(PrimarySide::reversed(machine))));
                // The extended relationship continued as a further relationship (to C).
                self.fanout = self
                    .vm
                    .rec
                    .fanout
                    .iter()
                    .filter_map(|f| PrimarySide::restore_fanout(&self.vm, f, false))
                    .collect();
                Ok(r)
            }
        }
    }

    async fn begin_cycle(
        &mut self,
        peer: &Peer,
        header: CycleHeader,
    ) -> Result<Writer, RemoteError> {
        self.trust(peer)?;
        let Side::Replica(r) = &mut self.side else {
            return Err(RemoteError::UnknownVm { vm: header.vm });
        };
        r.admit(&mut self.vm, &header)?;
        let store = self.vm.host.store_of(&self.vm.rec).map_err(internal)?;
        let (vm, id, kind) = (header.vm, header.id, header.kind);
        let writer = store.begin_cycle(header).await.map_err(store_err)?;
        if writer.is_duplicate() {
            // The replica already holds this cycle id: the primary's reconciliation
            // (replica-info) prevents sending one, so this is a stale retry. Refuse it rather
            // than acknowledge content this attempt did not store.
            writer.abort().await;
            return Err(RemoteError::WrongBase {
                expected: store.latest_cycle(vm).ok().flatten(),
                got: Some(id),
            });
        }
        if kind == vmr_proto::CycleKind::Resync {
            tracing::info!(vm = %self.vm.rec.name, cycle = id, resumed = writer.resumed(), "receiving a resync");
        }
        Ok(Box::new(writer))
    }

    /// The commit task of a streamed cycle ended (flush, fsync, catalog rename): on success
    /// the point exists, is acknowledged at once and recorded (status shows it from here on),
    /// and retention prunes what it no longer keeps; then the commands that waited for the
    /// cycle run.
    async fn committed(&mut self, c: Committing, done: CommitOutcome) {
        let r = match done {
            Ok(Ok(point)) => {
                if c.kind == vmr_proto::CycleKind::Resync {
                    tracing::info!(vm = %self.vm.rec.name, cycle = c.id, "resync committed");
                }
                Ok(point)
            }
            Ok(Err(e)) => {
                let msg = crate::util::chain(&e);
                tracing::error!(vm = %self.vm.rec.name, cycle = c.id, "committing the cycle failed: {msg}");
                if let Side::Replica(r) = &mut self.side {
                    r.commit_failed(&mut self.vm, msg);
                }
                Err(store_err(e))
            }
            Err(e) => {
                let msg = format!("the commit task ended abnormally: {e}");
                tracing::error!(vm = %self.vm.rec.name, cycle = c.id, "{msg}");
                if let Side::Replica(r) = &mut self.side {
                    r.commit_failed(&mut self.vm, msg);
                }
                Err(internal(e))
            }
        };
        self.note_store(&r.as_ref().map(|_| ()));
        match r {
            Ok(point) => {
                let _ = c.reply.send(Ok(()));
                let ms = c.started.elapsed().as_millis() as u64;
                if let Side::Replica(r) = &mut self.side {
                    r.record_point(&mut self.vm, &point, c.bytes);
                }
                tracing::debug!(vm = %self.vm.rec.name, cycle = point.id, commit_ms = ms, "cycle committed");
                self.start_prune();
                if point.kind == vmr_store::PointKind::Planned {
                    tracing::info!(vm = %self.vm.rec.name, point = point.id, "the planned failover's final cycle is committed");
                }
            }
            Err(e) => {
                let _ = c.reply.send(Err(e));
            }
        }
        self.received().await;
    }

    /// Wait for the commit in flight, if any, and carry out its end.
    async fn finish_commit(&mut self) {
        if let Some(mut c) = self.committing.take() {
            let done = (&mut c.task).await;
            Box::pin(self.committed(c, done)).await;
        }
    }

    /// Drop the points the retention policy no longer keeps, in a task of its own
    /// ([`Owner::pruning`]; a failure is retried after the next cycle).
    fn start_prune(&mut self) {
        let name = self.vm.rec.name.clone();
        let store = match self.vm.host.store_of(&self.vm.rec) {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(vm = %name, "no store to prune: {e:#}");
                return;
            }
        };
        let uuid = self.vm.rec.uuid;
        self.pruning = Some(tokio::spawn(async move {
            let t = std::time::Instant::now();
            let res = match crate::replica::group_prune_plan(&store, uuid, now_ms()) {
                Some(drop) => store.prune_points(uuid, &drop).await,
                None => store.prune(uuid).await,
            };
            match res {
                Ok(dropped) => {
                    tracing::debug!(vm = %name, ?dropped, ms = t.elapsed().as_millis() as u64, "pruned");
                }
                Err(e) => {
                    tracing::warn!(vm = %name, "pruning failed (retried after the next cycle): {e}");
                }
            }
        }));
    }

    /// Wait for the prune in flight, if any.
    async fn finish_prune(&mut self) {
        if let Some(h) = self.pruning.take()
            && let Err(e) = h.await
        {
            tracing::error!(vm = %self.vm.rec.name, "the prune task ended abnormally: {e}");
        }
    }
}

/// Whether the owner answers `cmd` while a prune or a commit runs: the status row and the
/// record, which neither changes (a prune never merges the latest point, and the status counts
/// a point being merged as gone; a point being committed shows once it is committed). `points` and the group reads wait, so that they list what retention
/// kept.
fn answers_while_pruning(cmd: &Command) -> bool {
    matches!(cmd, Command::Status(_) | Command::Record(_))
}

/// Whether `cmd` needs the VM's qcow2 chain on a replica (a failover's view, `verify --local`,
/// `continue-from`'s discard), which a cycle being received holds until it ends.
fn waits_for_chain(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Failover(FailoverCmd::Start { .. } | FailoverCmd::Test { .. }, _)
            | Command::Verify(_, true, _)
            | Command::ContinueFrom(..)
            | Command::Follow(..)
    )
}

/// One line saying what a VM's failover network settings on this host are.
fn describe_qga(qga: Option<&str>) -> String {
    match qga {
        Some(q) => format!("guest agent socket {q}"),
        None => "no guest agent socket".to_owned(),
    }
}

fn describe_failover(s: &vmr_proto::FailoverSettings) -> String {
    let mut parts = Vec::new();
    if s.interfaces.is_empty() {
        parts.push("no failover network settings".to_owned());
    } else {
        let i: Vec<String> = s.interfaces.iter().map(ToString::to_string).collect();
        parts.push(format!("failover network {}", i.join("; ")));
    }
    match &s.network_args {
        Some(a) => parts.push(format!("failover network-args {}", a.join(" "))),
        None => parts.push("failover network-args from the definition".to_owned()),
    }
    parts.join("; ")
}
