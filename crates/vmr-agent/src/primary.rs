//! Primary-side driver of one VM: owns its `PrimaryMachine`, runs the cycles it asks for
//! (capture → transport → commit, or abort on any failure), persists its state, and serves the
//! control commands (pause, resume, disable, start-initial) by feeding them in as events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vmr_capture::{CaptureConfig, CaptureError, CycleMode, VmCapture};
use vmr_core::{Action, Event, Failure, InitialKind, PrimaryMachine, Schedule, primary_health};
use vmr_proto::api::{
    CreateReplica, EnableArgs, InitialMode, ReplicationMode, ReplicationState, VmRecord, VmStatus,
};
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, VmDefinition};
use vmr_transport::{Client, TransportError};

use super::Agent;
use crate::exit;
use crate::util::{coded, now_ms};

/// An admin command for a primary VM.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Start initial replication now.
    StartInitial,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Disable.
    Disable,
    /// Start (or schedule, at ms since the epoch) resynchronization.
    ResumeResync(Option<u64>),
}

/// Mutable part of a primary VM, behind one lock.
pub struct Inner {
    /// The persisted record.
    pub rec: VmRecord,
    /// The decision machine.
    pub machine: PrimaryMachine,
    /// Progress of the running cycle: (bytes done, bytes expected or 0).
    pub progress: Option<(u64, u64)>,
    /// Cancels the running cycle.
    pub cancel: CancellationToken,
    /// Actions produced outside the driver (admin commands) for the driver to carry out.
    pub pending: Vec<Action>,
    /// The next cycle is a planned failover's final cycle (consistency `Planned`).
    pub planned: bool,
}

/// A replicating primary VM and its driver task.
pub struct PrimaryVm {
    /// Locked state.
    pub inner: Mutex<Inner>,
    /// Wakes the driver.
    pub wake: Notify,
    /// Stops the driver.
    pub stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PrimaryVm {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop the driver (agent shutdown): a running cycle is aborted and merged back.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.lock().cancel.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }
}

fn schedule_of(args: &EnableArgs) -> Schedule {
    let mut s = Schedule::every(args.frequency_secs * 1000);
    s.app_consistent_every_ms = u64::from(args.app_consistent_every_hours) * 3_600_000;
    s.auto_resync = args.auto_resync;
    s.initial = match args.initial {
        InitialMode::Network => InitialKind::Network,
        InitialMode::Existing => InitialKind::Existing,
        InitialMode::Export { .. } => InitialKind::Export,
    };
    s
}

fn save(agent: &Agent, inner: &mut Inner) -> anyhow::Result<()> {
    let m = &inner.machine;
    inner.rec.state = m.state;
    inner.rec.last_cycle = m.last_cycle;
    inner.rec.stats = m.stats.clone();
    inner.rec.paused_from = m.paused_from;
    inner.rec.initial_at_ms = m.initial_at_ms;
    inner.rec.last_error = m.last_error.clone();
    agent.db().put_vm(&inner.rec)
}

/// Start the driver of an enabled VM. `restarted`: the agent came back up.
pub fn spawn(agent: &Arc<Agent>, rec: VmRecord, restarted: bool) -> anyhow::Result<Arc<PrimaryVm>> {
    let args = rec.enable.clone().context("replication is not enabled")?;
    let machine = PrimaryMachine::restore(
        schedule_of(&args),
        rec.state,
        rec.last_cycle,
        rec.stats.clone(),
        rec.initial_at_ms,
        rec.paused_from,
    );
    let vm = Arc::new(PrimaryVm {
        inner: Mutex::new(Inner {
            rec,
            machine,
            progress: None,
            cancel: CancellationToken::new(),
            pending: Vec::new(),
            planned: false,
        }),
        wake: Notify::new(),
        stop: CancellationToken::new(),
        task: Mutex::new(None),
    });
    let name = vm.lock().rec.name.clone();
    agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name, vm.clone());
    let task = tokio::spawn(drive(agent.clone(), vm.clone(), restarted));
    *vm.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    Ok(vm)
}

/// `vmreplica enable`.
pub async fn enable(
    agent: &Arc<Agent>,
    mut rec: VmRecord,
    args: EnableArgs,
) -> anyhow::Result<Value> {
    // Check the replica answers and accepts us before anything changes here.
    let client = connect(agent, &args).await?;
    let def = VmDefinition::from_toml(&rec.launch_toml)?;
    let create = create_request(&rec, &def, &args);
    client
        .create_replica(create)
        .await
        .context("the replica refused to create the replica VM")?;
    rec.enable = Some(args.clone());
    rec.state = ReplicationState::Disabled;
    rec.last_cycle = None;
    rec.disk_sizes = None;
    let vm = spawn(agent, rec, false)?;
    {
        let mut inner = vm.lock();
        let a = inner.machine.step(Event::Enable {
            now_ms: now_ms(),
            initial_at_ms: args.initial_at_ms,
        });
        inner.pending.extend(a);
        save(agent, &mut inner)?;
    }
    vm.wake.notify_one();
    Ok(json!(format!(
        "replication of {:?} enabled to {} every {} s{}",
        def.name,
        args.replica,
        args.frequency_secs,
        if args.initial_at_ms.is_some() {
            "; initial replication scheduled"
        } else {
            "; initial replication started"
        }
    )))
}

/// The `create-replica` request for a VM: its definition and replicated disks.
fn create_request(rec: &VmRecord, def: &VmDefinition, args: &EnableArgs) -> CreateReplica {
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
    }
}

/// Run an admin command on a primary VM.
pub async fn command(agent: &Arc<Agent>, name: &str, cmd: Cmd) -> anyhow::Result<Value> {
    let vm = agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned();
    let Some(vm) = vm else {
        return match agent.vm_record(name)? {
            None => Err(coded(exit::NOT_FOUND, format!("unknown VM {name:?}"))),
            Some(_) => Err(coded(
                exit::INVALID_STATE,
                format!("replication of {name:?} is not enabled"),
            )),
        };
    };
    let now = now_ms();
    let (before, after, actions) = {
        let mut inner = vm.lock();
        let before = inner.machine.state;
        let ev = match cmd {
            Cmd::StartInitial => Event::StartInitial { now_ms: now },
            Cmd::Pause => Event::Pause { now_ms: now },
            Cmd::Resume => Event::Resume { now_ms: now },
            Cmd::Disable => Event::Disable,
            Cmd::ResumeResync(at_ms) => Event::ResumeResync { now_ms: now, at_ms },
        };
        let actions = inner.machine.step(ev);
        if actions.contains(&Action::AbortCycle) {
            inner.cancel.cancel();
        }
        inner.pending.extend(
            actions
                .iter()
                .filter(|a| matches!(a, Action::StartCycle { .. }))
                .cloned(),
        );
        save(agent, &mut inner)?;
        (before, inner.machine.state, actions)
    };
    vm.wake.notify_one();
    let scheduled = matches!(cmd, Cmd::ResumeResync(Some(_))) && actions.contains(&Action::Persist);
    if before == after
        && !scheduled
        && !actions
            .iter()
            .any(|a| matches!(a, Action::StartCycle { .. }))
    {
        return Err(coded(
            exit::INVALID_STATE,
            format!("{name:?} is {before}; {cmd:?} does not apply"),
        ));
    }
    if matches!(cmd, Cmd::Disable) {
        agent
            .primaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        vm.stop().await;
        // Remove tracking bitmaps: replication is off, nothing should be recorded any more.
        let rec = vm.lock().rec.clone();
        if let Err(e) = stop_tracking(agent, &rec).await {
            tracing::warn!(vm = %name, "could not remove tracking bitmaps: {e:#}");
        }
        let mut rec = rec;
        rec.enable = None;
        rec.state = ReplicationState::Disabled;
        agent.db().put_vm(&rec)?;
    }
    Ok(json!(format!("{name}: {before} -> {after}")))
}

/// Reset the statistics window of a primary VM.
pub fn reset_stats(agent: &Arc<Agent>, name: &str) -> anyhow::Result<()> {
    let vm = agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned();
    if let Some(vm) = vm {
        let mut inner = vm.lock();
        inner.machine.step(Event::ResetStats { now_ms: now_ms() });
        save(agent, &mut inner)?;
    }
    Ok(())
}

/// The status row of a primary VM.
pub fn status(agent: &Arc<Agent>, rec: &VmRecord, now: u64) -> VmStatus {
    let vm = agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&rec.name)
        .cloned();
    let (state, stats, fails, err, progress, last) = match &vm {
        Some(vm) => {
            let i = vm.lock();
            (
                i.machine.state,
                i.machine.stats.clone(),
                i.machine.consecutive_failures,
                i.machine.last_error.clone(),
                i.progress,
                i.machine.last_cycle,
            )
        }
        None => (
            rec.state,
            rec.stats.clone(),
            0,
            rec.last_error.clone(),
            None,
            rec.last_cycle,
        ),
    };
    let health = primary_health(state, &stats, fails, err.as_deref(), now);
    let mut health_reason = health.reason();
    if state == ReplicationState::WaitingForStartResynchronize
        && rec.initial_at_ms.is_none()
        && let Some(w) = rec.enable.as_ref().and_then(|e| e.auto_resync)
    {
        health_reason.push_str(&format!("; starts by itself in the window {w}"));
    }
    if state == ReplicationState::InitialReplicationInProgress
        && last.is_some()
        && let Some(InitialMode::Export { dir }) = rec.enable.as_ref().map(|e| &e.initial)
    {
        health_reason.push_str(&format!(
            "; initial copy exported to {dir}: load it on the replica with `vmreplica import {} \
             DIR`",
            rec.name
        ));
    }
    VmStatus {
        name: rec.name.clone(),
        uuid: rec.uuid,
        state,
        health: health.health,
        health_reason,
        mode: ReplicationMode::Primary,
        frequency_secs: rec.enable.as_ref().map_or(0, |e| e.frequency_secs),
        primary: agent.config.name.clone(),
        replica: rec
            .enable
            .as_ref()
            .map_or_else(String::new, |e| e.replica.clone()),
        last_replication_ms: stats.last_replication_ms,
        last_cycle: last,
        stats,
        progress,
    }
}

async fn connect(agent: &Agent, args: &EnableArgs) -> anyhow::Result<Client> {
    Client::connect(
        &args.replica,
        &agent.identity,
        &args.replica_fingerprint,
        Default::default(),
    )
    .await
    .with_context(|| format!("connecting to the replica {}", args.replica))
}

pub(super) fn capture_config(agent: &Agent, rec: &VmRecord) -> CaptureConfig {
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
        crate::launch::work_dir(&agent.dir, rec.uuid),
        crate::launch::tag(rec.uuid),
    );
    cfg.expected_sizes = rec.disk_sizes.clone();
    cfg
}

async fn stop_tracking(agent: &Agent, rec: &VmRecord) -> anyhow::Result<()> {
    let mut cap = VmCapture::open(capture_config(agent, rec)).await?;
    cap.stop_tracking().await?;
    Ok(())
}

/// What one attempted cycle came to.
pub(super) enum Outcome {
    Done {
        bytes: u64,
        sizes: Vec<u64>,
        app: bool,
        pending: Option<u64>,
    },
    Failed(Failure),
    Cancelled,
}

pub(super) struct Session {
    pub(super) capture: Option<VmCapture>,
    pub(super) client: Option<Client>,
}

async fn drive(agent: Arc<Agent>, vm: Arc<PrimaryVm>, restarted: bool) {
    let mut session = Session {
        capture: None,
        client: None,
    };
    let mut pending: Vec<Action> = Vec::new();
    if restarted {
        let mut inner = vm.lock();
        pending = inner.machine.step(Event::Restarted { now_ms: now_ms() });
    }
    let mut synced = false;
    loop {
        if vm.stop.is_cancelled() {
            break;
        }
        pending.extend(std::mem::take(&mut vm.lock().pending));
        if pending.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = vm.wake.notified() => {}
                _ = vm.stop.cancelled() => break,
            }
            let mut inner = vm.lock();
            pending = inner.machine.step(Event::Tick { now_ms: now_ms() });
        }
        for action in std::mem::take(&mut pending) {
            match action {
                Action::Persist => {
                    let mut inner = vm.lock();
                    if let Err(e) = save(&agent, &mut inner) {
                        tracing::error!("saving state: {e:#}");
                    }
                }
                Action::AbortCycle | Action::StopTracking => {}
                Action::QueryReplica => match replica_latest(&agent, &vm, &mut session).await {
                    Ok(latest) => {
                        let mut inner = vm.lock();
                        let acts = inner.machine.step(Event::ReplicaHas {
                            now_ms: now_ms(),
                            latest,
                        });
                        if inner.machine.state == ReplicationState::Replicating {
                            tracing::info!(vm = %inner.rec.name, "the replica imported the initial copy");
                        }
                        pending.extend(acts);
                    }
                    Err(f) => tracing::warn!("asking the replica for its latest cycle: {f:?}"),
                },
                Action::StartCycle {
                    id,
                    base,
                    kind,
                    app_consistent,
                } => {
                    let cancel = {
                        let mut inner = vm.lock();
                        inner.cancel = CancellationToken::new();
                        inner.progress = Some((0, 0));
                        inner.cancel.clone()
                    };
                    // Reconcile with the replica first (a lost acknowledgement, a restart).
                    if kind != CycleKind::Resync && (!synced || base.is_some()) {
                        match sync_with_replica(&agent, &vm, &mut session).await {
                            Ok(Some(follow)) => {
                                // The machine changed its view: abandon this start and re-plan.
                                let mut inner = vm.lock();
                                inner.progress = None;
                                let now = now_ms();
                                let mut acts = inner.machine.step(Event::CycleFailed {
                                    now_ms: now,
                                    failure: Failure::Retryable(
                                        "re-planning after reconciling with the replica".into(),
                                    ),
                                });
                                acts.extend(inner.machine.step(follow));
                                inner.machine.consecutive_failures = 0;
                                inner.machine.last_error = None;
                                acts.extend(inner.machine.step(Event::Tick { now_ms: now }));
                                pending = acts;
                                synced = true;
                                break;
                            }
                            Ok(None) => synced = true,
                            Err(failure) => {
                                let mut inner = vm.lock();
                                inner.progress = None;
                                pending = inner.machine.step(Event::CycleFailed {
                                    now_ms: now_ms(),
                                    failure,
                                });
                                break;
                            }
                        }
                    }
                    let permit = agent.cycle_slots.clone().acquire_owned().await;
                    let outcome = tokio::select! {
                        o = async {
                            let export = vm.lock().rec.enable.as_ref().and_then(|e| match &e.initial {
                                InitialMode::Export { dir } if kind == CycleKind::Full => Some(dir.clone()),
                                _ => None,
                            });
                            if kind == CycleKind::Resync {
                                super::resync::run(&agent, &vm, &mut session, id).await
                            } else if let Some(dir) = export {
                                super::export::run(&agent, &vm, &mut session, id, std::path::Path::new(&dir)).await
                            } else {
                                run_cycle(&agent, &vm, &mut session, id, base, kind, app_consistent).await
                            }
                        } => o,
                        _ = cancel.cancelled() => Outcome::Cancelled,
                    };
                    drop(permit);
                    let mut inner = vm.lock();
                    inner.progress = None;
                    let now = now_ms();
                    pending = match outcome {
                        Outcome::Done {
                            bytes,
                            sizes,
                            app,
                            pending,
                        } => {
                            inner.rec.disk_sizes = Some(sizes);
                            tracing::info!(vm = %inner.rec.name, cycle = id, bytes, "cycle replicated");
                            let acts = inner.machine.step(Event::CycleSucceeded {
                                now_ms: now,
                                bytes,
                                app_consistent: app,
                            });
                            if let Some(p) = pending {
                                inner.machine.stats.pending_bytes = p;
                            }
                            acts
                        }
                        Outcome::Failed(failure) => {
                            tracing::warn!(vm = %inner.rec.name, cycle = id, "cycle failed: {failure:?}");
                            inner.machine.step(Event::CycleFailed {
                                now_ms: now,
                                failure,
                            })
                        }
                        Outcome::Cancelled => {
                            // The session's capture aborted or will be cleaned on the next open.
                            session.capture = None;
                            Vec::new()
                        }
                    };
                    break;
                }
            }
        }
    }
    // Dropping the capture while a cycle is open leaves leftovers that the next open merges back.
    if let Some(cap) = session.capture.take() {
        drop(cap);
    }
}

/// Ask the replica what it holds; returns an event for the machine if that changes anything.
async fn sync_with_replica(
    agent: &Agent,
    vm: &PrimaryVm,
    session: &mut Session,
) -> Result<Option<Event>, Failure> {
    let last = vm.lock().machine.last_cycle;
    let latest = replica_latest(agent, vm, session).await?;
    if latest == last {
        return Ok(None);
    }
    Ok(Some(Event::ReplicaHas {
        now_ms: now_ms(),
        latest,
    }))
}

/// The latest cycle the replica holds of this VM (`replica-info`).
async fn replica_latest(
    agent: &Agent,
    vm: &PrimaryVm,
    session: &mut Session,
) -> Result<Option<u64>, Failure> {
    let rec = vm.lock().rec.clone();
    let client = client(agent, &rec, session).await?;
    let info = client
        .replica_info(rec.uuid, Some(agent.config.listen.clone()))
        .await
        .map_err(|e| {
            session.client = None;
            classify_transport(e)
        })?;
    Ok(info.latest)
}

pub(super) async fn client<'a>(
    agent: &Agent,
    rec: &VmRecord,
    session: &'a mut Session,
) -> Result<&'a Client, Failure> {
    if session.client.is_none() {
        let args = rec
            .enable
            .as_ref()
            .ok_or_else(|| Failure::Fatal("replication not enabled".into()))?;
        let c = Client::connect(
            &args.replica,
            &agent.identity,
            &args.replica_fingerprint,
            Default::default(),
        )
        .await
        .map_err(classify_transport)?;
        session.client = Some(c);
    }
    session
        .client
        .as_ref()
        .ok_or_else(|| Failure::Retryable("no connection".into()))
}

pub(super) fn classify_transport(e: TransportError) -> Failure {
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

pub(super) fn classify_capture(e: &CaptureError) -> Failure {
    let msg = crate::util::chain(e);
    match e {
        CaptureError::ResyncRequired { .. } => Failure::ResyncRequired(msg),
        _ => Failure::Retryable(msg),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_cycle(
    agent: &Agent,
    vm: &PrimaryVm,
    session: &mut Session,
    id: u64,
    base: Option<u64>,
    kind: CycleKind,
    app_consistent: bool,
) -> Outcome {
    let rec = vm.lock().rec.clone();
    let Some(args) = rec.enable.clone() else {
        return Outcome::Failed(Failure::Fatal("not enabled".into()));
    };
    if kind == CycleKind::Full {
        // Idempotent on the replica; makes sure the replica VM exists with our disks.
        if let Err(f) = create_replica(agent, &rec, session).await {
            return Outcome::Failed(f);
        }
    }
    if session.capture.is_none() {
        match VmCapture::open(capture_config(agent, &rec)).await {
            Ok(c) => session.capture = Some(c),
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let client = match client(agent, &rec, session).await {
        Ok(c) => c.clone(),
        Err(f) => return Outcome::Failed(f),
    };
    let Some(capture) = session.capture.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let (outcome, reset_capture, reset_client) = cycle_with(
        vm,
        capture,
        &client,
        &rec,
        &args,
        id,
        base,
        kind,
        app_consistent,
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

/// One cycle on an open capture and connection. Returns the outcome and whether the capture
/// and the connection must be reopened.
#[allow(clippy::too_many_arguments)]
async fn cycle_with(
    vm: &PrimaryVm,
    capture: &mut VmCapture,
    client: &Client,
    rec: &VmRecord,
    args: &EnableArgs,
    id: u64,
    base: Option<u64>,
    kind: CycleKind,
    app_consistent: bool,
) -> (Outcome, bool, bool) {
    let mode = if kind == CycleKind::Full {
        CycleMode::Full
    } else {
        CycleMode::Incremental
    };
    let taken_at_ms = now_ms();
    let mut cycle = match capture.begin_cycle(mode).await {
        Ok(c) => c,
        Err(e) => return (Outcome::Failed(classify_capture(&e)), true, false),
    };
    let disks = cycle.disks().to_vec();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    if app_consistent {
        // Quiescing through the guest agent (guest-fsfreeze) is not built yet: like Hyper-V
        // when VSS fails, take a crash-consistent point and say so.
        tracing::warn!(vm = %rec.name, "app-consistent point requested; guest-agent quiescing is not supported yet, taking a crash-consistent point");
    }
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base,
        kind,
        consistency: if vm.lock().planned {
            CycleConsistency::Planned
        } else {
            CycleConsistency::CrashConsistent
        },
        taken_at_ms,
        disks,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Extent, CaptureError>>(4);
    let producer = async {
        // Owning the sender here ends the stream when the producer finishes.
        let tx = tx;
        let mut sent = 0u64;
        loop {
            match cycle.next_extent().await {
                Ok(Some(e)) => {
                    // Bytes of data shipped; zero extents cost a few bytes on the wire.
                    if let vmr_proto::ExtentData::Data(b) = &e.data {
                        sent += b.len() as u64;
                    }
                    if let Ok(mut i) = vm.inner.lock() {
                        i.progress = Some((sent, 0));
                    }
                    if tx.send(Ok(e)).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(None) => return Ok(sent),
                Err(e) => {
                    let f = classify_capture(&e);
                    let _ = tx.send(Err(e)).await;
                    return Err(Some(f));
                }
            }
        }
    };
    let consumer = client.send_cycle(
        &header,
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        args.compression,
    );
    let (produced, sent) = tokio::join!(producer, consumer);
    match (produced, sent) {
        (Ok(bytes), Ok(_ack)) => match cycle.commit().await {
            Ok(()) => {
                let pending = capture.pending_bytes().await.ok();
                (
                    Outcome::Done {
                        bytes,
                        sizes,
                        app: false,
                        pending,
                    },
                    false,
                    false,
                )
            }
            // The replica has the cycle; the primary could not drop the frozen bitmap. The next
            // open merges it back, and reconciliation adopts the acknowledged cycle.
            Err(e) => (
                Outcome::Failed(Failure::Retryable(format!(
                    "commit after acknowledgement failed: {e}"
                ))),
                true,
                false,
            ),
        },
        (p, s) => {
            let mut reset_client = false;
            let failure = match (p, s) {
                (Err(Some(f)), _) => f,
                (_, Err(e)) => {
                    reset_client = true;
                    classify_transport(e)
                }
                _ => Failure::Retryable("cycle ended early".into()),
            };
            let mut reset_capture = false;
            if let Err(e) = cycle.abort().await {
                tracing::warn!("abort failed (the next open merges back): {e}");
                reset_capture = true;
            }
            (Outcome::Failed(failure), reset_capture, reset_client)
        }
    }
}

pub(super) async fn create_replica(
    agent: &Agent,
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
    let c = client(agent, rec, session).await?;
    c.create_replica(create).await.map_err(|e| {
        session.client = None;
        classify_transport(e)
    })?;
    Ok(())
}

/// The machine's current state of a primary VM.
pub fn state_of(vm: &PrimaryVm) -> ReplicationState {
    vm.lock().machine.state
}

/// Planned failover: stop a VM's driver (a running cycle is aborted and merged back) so that
/// its QMP monitor is free; [`restart_driver`] undoes it.
pub async fn stop_driver(agent: &Arc<Agent>, name: &str) -> anyhow::Result<Arc<PrimaryVm>> {
    let vm = agent
        .primaries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned()
        .ok_or_else(|| {
            coded(
                exit::INVALID_STATE,
                format!("replication of {name:?} is not enabled"),
            )
        })?;
    vm.stop().await;
    Ok(vm)
}

/// Start the driver of a VM stopped by [`stop_driver`] again.
pub fn restart_driver(agent: &Arc<Agent>, vm: &PrimaryVm) -> anyhow::Result<()> {
    let rec = vm.lock().rec.clone();
    spawn(agent, rec, true)?;
    Ok(())
}

/// Planned failover, first half, on a VM stopped by [`stop_driver`]: ship one final
/// incremental cycle with consistency `Planned` and leave the VM `PreparedForFailover` (no
/// more cycles). On failure the driver is started again. Returns the final cycle's id.
pub async fn prepare_failover(agent: &Arc<Agent>, vm: Arc<PrimaryVm>) -> anyhow::Result<u64> {
    let name = vm.lock().rec.name.clone();
    let name = name.as_str();
    let last = vm.lock().machine.last_cycle;
    let mut session = Session {
        capture: None,
        client: None,
    };
    let shipped = async {
        let Some(base) = last else {
            anyhow::bail!("initial replication has not completed");
        };
        if let Some(ev) = sync_with_replica(agent, &vm, &mut session)
            .await
            .map_err(|f| anyhow::anyhow!("reaching the replica: {f:?}"))?
        {
            anyhow::bail!("the replica does not hold this primary's last cycle ({ev:?})");
        }
        let id = base + 1;
        vm.lock().planned = true;
        let out = run_cycle(
            agent,
            &vm,
            &mut session,
            id,
            Some(base),
            CycleKind::Incremental,
            false,
        )
        .await;
        vm.lock().planned = false;
        match out {
            Outcome::Done { bytes, sizes, .. } => Ok((id, bytes, sizes)),
            Outcome::Failed(f) => Err(anyhow::anyhow!("the final cycle failed: {f:?}")),
            Outcome::Cancelled => Err(anyhow::anyhow!("the final cycle was cancelled")),
        }
    }
    .await;
    drop(session);
    match shipped {
        Ok((id, bytes, sizes)) => {
            let mut inner = vm.lock();
            let now = now_ms();
            inner.rec.disk_sizes = Some(sizes);
            let m = &mut inner.machine;
            m.last_cycle = Some(id);
            m.stats.successful_cycles += 1;
            m.stats.total_bytes += bytes;
            m.stats.max_bytes = m.stats.max_bytes.max(bytes);
            m.stats.last_replication_ms = Some(now);
            m.state = ReplicationState::PreparedForFailover;
            m.last_error = None;
            save(agent, &mut inner)?;
            tracing::info!(vm = %name, cycle = id, bytes, "final planned cycle replicated; prepared for failover");
            Ok(id)
        }
        Err(e) => {
            restart_driver(agent, &vm)?;
            Err(e)
        }
    }
}
