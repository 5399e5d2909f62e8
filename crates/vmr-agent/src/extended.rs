//! The extended (outgoing) relationship of a replica VM, as its owner runs it: this host
//! forwards the VM's committed recovery points to a third host (`enable NAME --extended`).
//! The `ExtendedMachine` (vmr-core) decides; this module carries its actions out. An extended
//! cycle runs in a task of its own, like a primary cycle (`cycle.rs`), with another source:
//! the replica store's newest point, held against pruning while it is read, and the clusters
//! its qcow2 chain says changed since the point the extended replica acknowledged
//! (`vmr_store::Store::changes_since`), read through read-only exports of the point. The
//! transport and the extended replica's side are those of any cycle. Incoming cycles keep
//! being applied meanwhile: the hold only stops retention from merging the held layers.

use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmr_core::{ExtAction, ExtEvent, ExtSchedule, ExtendedMachine, Failure};
use vmr_proto::api::{CreateReplica, EnableArgs, ExtendedStatus, OperationKind, ReplicationState};
use vmr_proto::record::{ExtendedRecord, VmRecord};
use vmr_proto::store::PointKind;
use vmr_proto::{CycleConsistency, CycleHeader, CycleId, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_transport::Client;

use crate::cycle::{Progress, classify_transport};
use crate::errors::AgentError;
use crate::host::Host;
use crate::owned::Vm;
use crate::util::now_ms;

/// The largest extent an extended cycle sends (data is read in pieces of at most this).
const EXTENT_MAX: u64 = 4 << 20;

/// What one extended cycle came to.
pub enum ExtOutcome {
    /// Acknowledged by the extended replica.
    Done {
        /// The point shipped.
        point: CycleId,
        /// Data bytes shipped.
        bytes: u64,
        /// The point's cut time.
        cut_ms: u64,
        /// The shipped point, kept from retention from before its read hold ended (so that
        /// no prune can merge it before the owner records it).
        keep: Option<vmr_store::PointKeep>,
    },
    /// The extended replica holds another point than the machine's acknowledged one.
    Reconciled {
        /// Its latest point.
        latest: Option<CycleId>,
    },
    /// Failed.
    Failed(Failure),
    /// Cancelled (pause, disable, shutdown).
    Cancelled,
}

/// A finished extended cycle task: its outcome and the connection it borrowed.
pub struct ExtDone {
    outcome: ExtOutcome,
    client: Option<Client>,
}

/// The extended relationship of one replica VM.
pub struct ExtendedSide {
    machine: ExtendedMachine,
    args: EnableArgs,
    client: Option<Client>,
    running: Option<(CancellationToken, JoinHandle<ExtDone>)>,
    pending: Vec<ExtAction>,
    progress: Arc<Progress>,
    /// The point the extended replica acknowledged, kept from retention while the
    /// relationship runs (not while paused or disabled) so that the next cycle carries only
    /// what changed since it.
    keep: Option<vmr_store::PointKeep>,
}

fn schedule(args: &EnableArgs) -> Result<ExtSchedule, AgentError> {
    // The one validation of `enable` arguments (frequency, recovery points); continuous mode
    // is refused for an extended relationship.
    let ms = vmr_core::Schedule::extended_frequency_ms(args)?;
    Ok(ExtSchedule::every(ms))
}

impl ExtendedSide {
    /// The extended relationship of `vm` as persisted, if enabled (the agent started: a cycle
    /// that ran is gone).
    pub fn restore(vm: &Vm) -> Option<ExtendedSide> {
        let x = vm.rec.extended.as_ref()?;
        let sched = match schedule(&x.args) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, "the stored extended replication settings are invalid: {}", crate::util::chain(&e));
                return None;
            }
        };
        let mut machine = ExtendedMachine::restore(sched, x.machine.clone());
        let pending = machine
            .step(ExtEvent::Restarted { now_ms: now_ms() })
            .unwrap_or_default();
        Some(ExtendedSide {
            machine,
            args: x.args.clone(),
            client: None,
            running: None,
            pending,
            progress: Arc::new(Progress::default()),
            keep: None,
        })
    }

    /// `enable NAME --extended`: start the relationship (the first cycle is a full copy).
    pub fn enable(vm: &mut Vm, args: EnableArgs) -> Result<ExtendedSide, AgentError> {
        let mut machine = ExtendedMachine::new(schedule(&args)?);
        let pending = machine.step(ExtEvent::Enable { now_ms: now_ms() })?;
        vm.rec.extended = Some(ExtendedRecord {
            args: args.clone(),
            machine: machine.snapshot(),
        });
        vm.save()?;
        Ok(ExtendedSide {
            machine,
            args,
            client: None,
            running: None,
            pending,
            progress: Arc::new(Progress::default()),
            keep: None,
        })
    }

    /// The machine.
    pub fn machine(&self) -> &ExtendedMachine {
        &self.machine
    }

    fn save(&self, vm: &mut Vm) {
        if let Some(x) = vm.rec.extended.as_mut() {
            x.machine = self.machine.snapshot();
        }
        if let Err(e) = vm.save() {
            tracing::error!(vm = %vm.rec.name, "saving the extended relationship: {}", crate::util::chain(&e));
        }
    }

    fn newest(vm: &Vm) -> Option<CycleId> {
        vm.host
            .store_of(&vm.rec)
            .ok()
            .and_then(|s| s.latest_point(vm.rec.uuid).ok().flatten())
    }

    fn step(&mut self, ev: ExtEvent) -> Result<(), AgentError> {
        let acts = self.machine.step(ev)?;
        self.pending.extend(acts);
        Ok(())
    }

    /// An admin command (`pause|resume|disable NAME --extended`); carried out at once.
    pub async fn admin(
        &mut self,
        vm: &mut Vm,
        ev: ExtEvent,
    ) -> Result<ReplicationState, AgentError> {
        self.step(ev)?;
        self.carry_out(vm);
        if self.machine.state() == ReplicationState::Disabled {
            self.stop().await;
        }
        Ok(self.machine.state())
    }

    /// Time passed: feed a tick with the store's newest point and carry out what the machine
    /// asks.
    pub fn tick(&mut self, vm: &mut Vm) {
        if self.pending.is_empty() && self.running.is_none() {
            let ev = ExtEvent::Tick {
                now_ms: now_ms(),
                newest: Self::newest(vm),
            };
            if let Err(e) = self.step(ev) {
                tracing::debug!(vm = %vm.rec.name, "extended machine refused a tick: {e}");
            }
        }
        self.carry_out(vm);
    }

    /// Tell the machine whether the VM runs on this host from a failover, and from which
    /// point (the VM's failover record): after a failover command, at the owner's start and
    /// after `enable --extended`.
    pub fn sync_source_failover(&mut self, vm: &mut Vm) {
        let point = match vm.failover() {
            Ok(fr) => fr.live.map(|l| l.point),
            Err(e) => {
                tracing::warn!(vm = %vm.rec.name, "reading the failover record: {}", crate::util::chain(&e));
                return;
            }
        };
        if point != self.machine.source_failover() {
            tracing::info!(vm = %vm.rec.name, ?point, relationship = "extended", "the VM's failover on this host changed");
            if let Err(e) = self.step(ExtEvent::SourceFailover {
                now_ms: now_ms(),
                point,
            }) {
                tracing::debug!(vm = %vm.rec.name, "extended machine refused the failover: {e}");
            }
            self.carry_out(vm);
        }
    }

    /// Keep the acknowledged point while the relationship runs; release it otherwise.
    fn sync_keep(&mut self, vm: &Vm) {
        use ReplicationState as S;
        let want = match self.machine.state() {
            S::Suspended | S::Disabled => None,
            _ => self.machine.acked(),
        };
        if self.keep.as_ref().map(vmr_store::PointKeep::point) == want {
            return;
        }
        self.keep = want.and_then(|p| {
            let kept = vm
                .host
                .store_of(&vm.rec)
                .map_err(|e| crate::util::chain(&e))
                .and_then(|s| {
                    s.keep_point(vm.rec.uuid, p)
                        .map_err(|e| crate::util::chain(&e))
                });
            match kept {
                Ok(k) => Some(k),
                Err(e) => {
                    // Merged already (paused meanwhile): the next cycle covers the union.
                    tracing::debug!(vm = %vm.rec.name, point = p, "cannot keep the acknowledged point: {e}");
                    None
                }
            }
        });
    }

    /// Carry out the pending actions.
    pub fn carry_out(&mut self, vm: &mut Vm) {
        self.carry_out_actions(vm);
        self.sync_keep(vm);
    }

    fn carry_out_actions(&mut self, vm: &mut Vm) {
        while !self.pending.is_empty() {
            match self.pending.remove(0) {
                ExtAction::Persist => self.save(vm),
                ExtAction::AbortCycle => {
                    if let Some((cancel, _)) = &self.running {
                        cancel.cancel();
                    }
                }
                a @ ExtAction::StartCycle { .. } if self.running.is_some() => {
                    self.pending.insert(0, a);
                    break;
                }
                ExtAction::StartCycle { point, base } => self.start(vm, point, base),
            }
        }
    }

    fn start(&mut self, vm: &Vm, point: CycleId, base: Option<CycleId>) {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let host = vm.host.clone();
        let rec = vm.rec.clone();
        let args = self.args.clone();
        let client = self.client.take();
        let progress = self.progress.clone();
        let incoming = vm.incoming.clone();
        progress.clear();
        // On the data path runtime, like a primary's cycle (`cpu-priority`).
        let handle = host.data.clone().spawn(async move {
            let mut client = client;
            let outcome = tokio::select! {
                o = run(&host, &rec, &args, &mut client, (point, base), &progress, &incoming) => o,
                _ = token.cancelled() => ExtOutcome::Cancelled,
            };
            if matches!(outcome, ExtOutcome::Failed(_)) {
                client = None;
            }
            ExtDone { outcome, client }
        });
        self.running = Some((cancel, handle));
    }

    /// The running task, to wait for.
    pub fn running(&mut self) -> Option<&mut JoinHandle<ExtDone>> {
        self.running.as_mut().map(|(_, h)| h)
    }

    /// The running task ended: feed its outcome to the machine.
    pub fn cycle_done(&mut self, vm: &mut Vm, done: Result<ExtDone, tokio::task::JoinError>) {
        self.running = None;
        self.progress.clear();
        let now = now_ms();
        let ev = match done {
            Ok(d) => {
                self.client = d.client;
                match d.outcome {
                    ExtOutcome::Done {
                        point,
                        bytes,
                        cut_ms,
                        keep,
                    } => {
                        self.keep = keep;
                        tracing::info!(vm = %vm.rec.name, point, bytes, relationship = "extended", "extended cycle acknowledged");
                        Some(ExtEvent::CycleSucceeded {
                            now_ms: now,
                            point,
                            bytes,
                            cut_ms,
                        })
                    }
                    ExtOutcome::Reconciled { latest } => Some(ExtEvent::Reconciled {
                        now_ms: now,
                        latest,
                        newest: Self::newest(vm),
                    }),
                    ExtOutcome::Failed(failure) => {
                        tracing::warn!(vm = %vm.rec.name, relationship = "extended", "extended cycle failed: {failure:?}");
                        Some(ExtEvent::CycleFailed {
                            now_ms: now,
                            failure,
                        })
                    }
                    ExtOutcome::Cancelled => None,
                }
            }
            Err(e) => Some(ExtEvent::CycleFailed {
                now_ms: now,
                failure: Failure::Retryable(format!("the extended cycle task ended: {e}")),
            }),
        };
        if let Some(ev) = ev
            && self.machine.running_point().is_some()
            && let Err(e) = self.step(ev)
        {
            tracing::debug!(vm = %vm.rec.name, "extended machine refused an outcome: {e}");
        }
        self.carry_out(vm);
    }

    /// Stop a running cycle (disable, shutdown).
    pub async fn stop(&mut self) {
        if let Some((cancel, handle)) = self.running.take() {
            cancel.cancel();
            let _ = handle.await;
        }
    }

    /// Stop a running cycle and let the machine forget it (it plans again at its next tick):
    /// before `reverse` to the extended replica, which takes the relationship over.
    pub async fn halt(&mut self, vm: &mut Vm) {
        self.stop().await;
        self.progress.clear();
        if let Err(e) = self.step(ExtEvent::Restarted { now_ms: now_ms() }) {
            tracing::debug!(vm = %vm.rec.name, "extended machine refused a halt: {e}");
        }
        self.carry_out(vm);
    }

    /// The extended replica, HOST:PORT.
    pub fn replica(&self) -> &str {
        &self.args.replica
    }

    /// What the owner compares for the outgoing relationship's events (its state and health).
    pub fn observe(&self, now: u64) -> crate::owned::Observed {
        let h = self.machine.health(now);
        crate::owned::Observed {
            state: self.machine.state(),
            health: h.health,
            reason: h.reason(),
            errors: 0,
            missed: 0,
            last_error: None,
        }
    }

    /// The outgoing relationship's status.
    pub fn status(&self, now: u64) -> ExtendedStatus {
        let m = &self.machine;
        let st = m.stats();
        let h = m.health(now);
        ExtendedStatus {
            relationship: "extended".to_owned(),
            state: m.state(),
            health: h.health,
            health_reason: h.reason(),
            replica: self.args.replica.clone(),
            frequency_secs: self.args.frequency_secs,
            last_point_sent: m.acked(),
            last_point_ms: st.last_point_cut_ms,
            lag_ms: st.last_point_cut_ms.map(|c| now.saturating_sub(c)),
            last_replication_ms: st.last_replication_ms,
            running_point: m.running_point(),
            running_bytes: self
                .running
                .as_ref()
                .and_then(|_| self.progress.operation())
                .map(|p| p.sent),
            stats: st.clone(),
        }
    }
}

/// The `create-replica` request for the extended replica: the VM's definition and the held
/// point's disks, with the extended relationship's frequency and retention.
fn create_request(rec: &VmRecord, args: &EnableArgs, disks: &[(String, u64)]) -> CreateReplica {
    let name = vmr_proto::VmDefinition::from_toml(&rec.launch_toml)
        .map_or_else(|_| rec.name.clone(), |d| d.name);
    CreateReplica {
        launch_toml: rec.launch_toml.clone(),
        uuid: rec.uuid,
        name,
        disks: disks
            .iter()
            .map(|(id, size)| DiskInfo {
                id: id.clone(),
                size: *size,
            })
            .collect(),
        frequency_secs: args.frequency_secs,
        recovery_points: args.recovery_points,
        retain: args.retain.clone(),
        auto_failover: None,
    }
}

fn store_failure(e: &vmr_store::StoreError) -> Failure {
    Failure::Retryable(format!(
        "reading the replica store: {}",
        crate::util::chain(e)
    ))
}

/// One extended cycle: ask the extended replica what it holds, hold the newest point, ship
/// the changes since the acknowledged one (all allocated data for the first), release.
async fn run(
    host: &Arc<Host>,
    rec: &VmRecord,
    args: &EnableArgs,
    client: &mut Option<Client>,
    (point, base): (CycleId, Option<CycleId>),
    progress: &Progress,
    incoming: &crate::owned::Incoming,
) -> ExtOutcome {
    if client.is_none() {
        match crate::cycle::connect(host, args).await {
            Ok(c) => *client = Some(c),
            Err(e) => return ExtOutcome::Failed(classify_transport(e)),
        }
    }
    let Some(c) = client.clone() else {
        return ExtOutcome::Failed(Failure::Retryable("no connection".into()));
    };
    let started = std::time::Instant::now();
    let store = match host.store_of(rec) {
        Ok(s) => s,
        Err(e) => return ExtOutcome::Failed(Failure::Fatal(crate::util::chain(&e))),
    };
    // Hold the newest point (the one the machine saw, or a newer one that arrived since).
    let hold = match store.hold_point(rec.uuid, None).await {
        Ok(h) => h,
        Err(e) => return ExtOutcome::Failed(store_failure(&e)),
    };
    let held = started.elapsed();
    let id = hold.point();
    if id < point {
        return ExtOutcome::Failed(Failure::Retryable(format!(
            "the store's newest point {id} is older than point {point}"
        )));
    }
    let disks = hold.disks();
    if base.is_none()
        && let Err(e) = c.create_replica(create_request(rec, args, &disks)).await
    {
        return ExtOutcome::Failed(classify_transport(e));
    }
    match c
        .replica_info(
            rec.uuid,
            Some(crate::config::reported_address(&host.config)),
        )
        .await
    {
        Ok(info) if info.latest != base => {
            return ExtOutcome::Reconciled {
                latest: info.latest,
            };
        }
        Ok(_) => {}
        Err(e) => return ExtOutcome::Failed(classify_transport(e)),
    }
    let asked = started.elapsed();
    let meta = match store.points(rec.uuid) {
        Ok(p) => p.into_iter().find(|p| p.id == id),
        Err(e) => return ExtOutcome::Failed(store_failure(&e)),
    };
    let (cut_ms, kind) = meta.map_or((0, PointKind::CrashConsistent), |p| (p.taken_at_ms, p.kind));
    // The upstream relationship first: the map of the changes and the exports (qemu-img and
    // qemu-nbd runs) wait while an incoming cycle streams into this host.
    incoming.idle().await;
    let changes = match store.changes_since(&hold, base).await {
        Ok(c) => c,
        Err(e) => return ExtOutcome::Failed(store_failure(&e)),
    };
    let mapped = started.elapsed();
    let reader = match store.read_point(&hold).await {
        Ok(r) => r,
        Err(e) => return ExtOutcome::Failed(store_failure(&e)),
    };
    tracing::debug!(
        vm = %rec.name,
        point = id,
        held_ms = held.as_millis() as u64,
        asked_ms = asked.as_millis() as u64,
        mapped_ms = mapped.as_millis() as u64,
        exported_ms = started.elapsed().as_millis() as u64,
        "extended cycle set up (ms since it started)"
    );
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base,
        kind: if base.is_some() {
            CycleKind::Incremental
        } else {
            CycleKind::Full
        },
        consistency: match kind {
            PointKind::CrashConsistent => CycleConsistency::CrashConsistent,
            PointKind::AppConsistent => CycleConsistency::AppConsistent,
            PointKind::Planned => CycleConsistency::Planned,
        },
        taken_at_ms: cut_ms,
        disks: disks
            .iter()
            .map(|(d, size)| DiskInfo {
                id: d.clone(),
                size: *size,
            })
            .collect(),
        group: None,
    };
    let total: u64 = changes.iter().map(|d| d.data_bytes()).sum();
    progress.start(
        if base.is_some() {
            OperationKind::Cycle
        } else {
            OperationKind::InitialCopy
        },
        total,
        now_ms(),
    );
    let piece = reader.max_read().min(EXTENT_MAX);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Extent, vmr_store::StoreError>>(1);
    let producer = async {
        let tx = tx;
        let mut sent = 0u64;
        for (i, d) in changes.iter().enumerate() {
            let disk = i as u32;
            for ch in &d.changes {
                let mut off = ch.offset;
                let end = ch.offset + ch.len;
                while off < end {
                    let len = (end - off).min(if ch.zero { 64 << 20 } else { piece });
                    // The upstream relationship first: no piece is read while an incoming
                    // cycle streams into this host.
                    incoming.idle().await;
                    let data = if ch.zero {
                        ExtentData::Zero(len)
                    } else {
                        match reader.read(i, off, len).await {
                            Ok(b) => {
                                sent += len;
                                ExtentData::Data(b)
                            }
                            Err(e) => {
                                let f = store_failure(&e);
                                let _ = tx.send(Err(e)).await;
                                return Err(f);
                            }
                        }
                    };
                    progress.advance(sent, sent);
                    if tx
                        .send(Ok(Extent {
                            disk,
                            offset: off,
                            data,
                        }))
                        .await
                        .is_err()
                    {
                        return Err(Failure::Retryable("the transfer ended early".into()));
                    }
                    off += len;
                }
            }
        }
        Ok(sent)
    };
    // Pieces already read wait too: none goes to the encoder (and on to C, whose work shares
    // the host's CPU when C is local) while an incoming cycle streams.
    let gated = tokio_stream::wrappers::ReceiverStream::new(rx).then(|e| async move {
        incoming.idle().await;
        e
    });
    let consumer = c.send_cycle_paced(
        &header,
        gated.boxed(),
        args.compression,
        None,
        vmr_transport::BodyQueue::Yielding,
    );
    let (produced, acked) = tokio::join!(producer, consumer);
    reader.close().await;
    let keep = store.keep_point(rec.uuid, id).ok();
    drop(hold);
    match (produced, acked) {
        (Ok(bytes), Ok(_)) => ExtOutcome::Done {
            point: id,
            bytes,
            cut_ms,
            keep,
        },
        (Err(f), _) => ExtOutcome::Failed(f),
        (_, Err(e)) => ExtOutcome::Failed(classify_transport(e)),
    }
}
