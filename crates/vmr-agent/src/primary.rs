//! The primary side of one VM, as its owner runs it: the `PrimaryMachine` decides, this module
//! carries its actions out. A cycle runs in a task of its own (`cycle.rs`) so that the owner
//! keeps answering commands; the task gets the [`Session`] lent and gives it back with its
//! [`Outcome`], which the owner feeds to the machine. Admin commands (pause, resume, disable,
//! start-initial, resume --resync) are events of the machine; a refusal is the machine's.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmr_core::{Action, Event, Failure, InitialKind, PrimaryMachine, Schedule, primary_health};
use vmr_proto::CycleKind;
use vmr_proto::api::{EnableArgs, InitialMode, ReplicationMode, ReplicationState, VmStatus};

use crate::cycle::{CycleCtx, Outcome, Progress, Session};
use crate::exit;
use crate::owned::Vm;
use crate::util::{coded, now_ms};

/// An admin command for a primary VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A finished cycle task: its outcome and the session it borrowed.
pub struct CycleDone {
    /// What the cycle came to.
    pub outcome: Outcome,
    /// The session, back to the owner.
    pub session: Session,
}

/// The primary side of a VM whose replication is enabled.
pub struct PrimarySide {
    machine: PrimaryMachine,
    /// `None` while a cycle task has it.
    session: Option<Session>,
    running: Option<(CancellationToken, JoinHandle<CycleDone>)>,
    progress: Arc<Progress>,
    /// Reconciled with the replica since the owner started.
    synced: bool,
    /// Actions the machine asked for that are not carried out yet.
    pending: Vec<Action>,
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

impl PrimarySide {
    /// The primary side of `vm` as persisted, when replication is enabled. `restarted`: the
    /// agent came back up (whatever was running is gone).
    pub fn restore(vm: &Vm, restarted: bool) -> Option<PrimarySide> {
        let args = vm.rec.enable.as_ref()?;
        let rec = &vm.rec;
        let mut machine = PrimaryMachine::restore(
            schedule_of(args),
            rec.state,
            rec.last_cycle,
            rec.stats.clone(),
            rec.initial_at_ms,
            rec.paused_from,
        );
        let pending = if restarted {
            machine.step(Event::Restarted { now_ms: now_ms() })
        } else {
            Vec::new()
        };
        Some(PrimarySide {
            machine,
            session: Some(Session::default()),
            running: None,
            progress: Arc::new(Progress::default()),
            synced: false,
            pending,
        })
    }

    /// The machine's state.
    pub fn state(&self) -> ReplicationState {
        self.machine.state
    }

    /// The last cycle acknowledged and committed.
    pub fn last_cycle(&self) -> Option<u64> {
        self.machine.last_cycle
    }

    /// Copy the machine's persistent part into the record and save it.
    fn save(&self, vm: &mut Vm) -> anyhow::Result<()> {
        let m = &self.machine;
        vm.rec.state = m.state;
        vm.rec.last_cycle = m.last_cycle;
        vm.rec.stats = m.stats.clone();
        vm.rec.paused_from = m.paused_from;
        vm.rec.initial_at_ms = m.initial_at_ms;
        vm.rec.last_error = m.last_error.clone();
        vm.save()
    }

    /// Enable replication (the replica accepted the VM already).
    pub fn enable(vm: &mut Vm, args: EnableArgs) -> anyhow::Result<PrimarySide> {
        vm.rec.enable = Some(args.clone());
        vm.rec.state = ReplicationState::Disabled;
        vm.rec.last_cycle = None;
        vm.rec.disk_sizes = None;
        let mut side = PrimarySide {
            machine: PrimaryMachine::new(schedule_of(&args)),
            session: Some(Session::default()),
            running: None,
            progress: Arc::new(Progress::default()),
            synced: false,
            pending: Vec::new(),
        };
        let acts = side.machine.step(Event::Enable {
            now_ms: now_ms(),
            initial_at_ms: args.initial_at_ms,
        });
        side.pending.extend(acts);
        side.save(vm)?;
        Ok(side)
    }

    /// When the owner should wake up next for this side.
    pub fn next_wake(&self) -> Duration {
        if !self.pending.is_empty() {
            return Duration::ZERO;
        }
        // A tick at least every 200 ms keeps retries and schedules on time.
        Duration::from_millis(200)
    }

    /// Time passed: feed a tick and carry out what the machine asks.
    pub fn tick(&mut self, vm: &mut Vm) {
        if self.pending.is_empty() && self.running.is_none() {
            let acts = self.machine.step(Event::Tick { now_ms: now_ms() });
            self.pending.extend(acts);
        }
        self.carry_out(vm);
    }

    /// Whether a cycle task runs.
    pub fn running(&mut self) -> Option<&mut JoinHandle<CycleDone>> {
        self.running.as_mut().map(|(_, h)| h)
    }

    /// Carry out the pending actions, up to the first cycle start.
    fn carry_out(&mut self, vm: &mut Vm) {
        while !self.pending.is_empty() {
            let action = self.pending.remove(0);
            match action {
                Action::Persist => {
                    if let Err(e) = self.save(vm) {
                        tracing::error!(vm = %vm.rec.name, "saving state: {e:#}");
                    }
                }
                Action::AbortCycle => {
                    if let Some((cancel, _)) = &self.running {
                        cancel.cancel();
                    }
                }
                Action::StopTracking => {}
                Action::QueryReplica => self.start_task(vm, None),
                Action::StartCycle {
                    id,
                    base,
                    kind,
                    app_consistent,
                } => {
                    self.start_task(vm, Some((id, base, kind, app_consistent)));
                }
            }
        }
    }

    /// Lend the session to a task running one cycle (or, with `None`, asking the replica
    /// which cycle it holds).
    fn start_task(&mut self, vm: &Vm, cycle: Option<(u64, Option<u64>, CycleKind, bool)>) {
        let Some(mut session) = self.session.take() else {
            tracing::error!(vm = %vm.rec.name, "a cycle was asked for while one runs");
            return;
        };
        let cancel = CancellationToken::new();
        self.progress.set(0, 0);
        let ctx = CycleCtx {
            host: vm.host.clone(),
            rec: vm.rec.clone(),
            last_cycle: self.machine.last_cycle,
            planned: false,
            reconcile: !self.synced || cycle.is_some_and(|(_, base, _, _)| base.is_some()),
            progress: self.progress.clone(),
        };
        let token = cancel.clone();
        let handle = tokio::spawn(async move {
            let outcome = match cycle {
                None => match crate::cycle::replica_latest(&ctx.host, &ctx.rec, &mut session)
                    .await
                {
                    Ok(latest) => Outcome::Reconciled { latest },
                    Err(f) => Outcome::Failed(f),
                },
                Some((id, base, kind, app)) => {
                    let permit = ctx.host.cycle_slots.clone().acquire_owned().await;
                    let o = tokio::select! {
                        o = crate::cycle::run(&ctx, &mut session, id, base, kind, app) => o,
                        _ = token.cancelled() => Outcome::Cancelled,
                    };
                    drop(permit);
                    o
                }
            };
            if matches!(outcome, Outcome::Cancelled) {
                // Dropping a capture mid-cycle leaves leftovers the next open merges back.
                session.capture = None;
            }
            CycleDone { outcome, session }
        });
        self.running = Some((cancel, handle));
    }

    /// A cycle task finished.
    pub fn cycle_done(&mut self, vm: &mut Vm, done: Result<CycleDone, tokio::task::JoinError>) {
        self.running = None;
        let now = now_ms();
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, "cycle task ended abnormally: {e}");
                self.session = Some(Session::default());
                let acts = self.machine.step(Event::CycleFailed {
                    now_ms: now,
                    failure: Failure::Retryable(format!("cycle task ended abnormally: {e}")),
                });
                self.pending.extend(acts);
                self.carry_out(vm);
                return;
            }
        };
        self.session = Some(done.session);
        let acts = match done.outcome {
            Outcome::Done {
                id,
                bytes,
                sizes,
                app,
                pending,
            } => {
                vm.rec.disk_sizes = Some(sizes);
                self.synced = true;
                self.machine.retarget_running(id);
                tracing::info!(vm = %vm.rec.name, cycle = id, bytes, "cycle replicated");
                let acts = self.machine.step(Event::CycleSucceeded {
                    now_ms: now,
                    bytes,
                    app_consistent: app,
                });
                if let Some(p) = pending {
                    self.machine.stats.pending_bytes = p;
                }
                acts
            }
            Outcome::Reconciled { latest } => {
                self.synced = true;
                if self.machine.running_since().is_some() {
                    // The machine changed its view: abandon this start and re-plan.
                    let mut acts = self.machine.step(Event::CycleFailed {
                        now_ms: now,
                        failure: Failure::Retryable(
                            "re-planning after reconciling with the replica".into(),
                        ),
                    });
                    acts.extend(self.machine.step(Event::ReplicaHas {
                        now_ms: now,
                        latest,
                    }));
                    self.machine.consecutive_failures = 0;
                    self.machine.last_error = None;
                    acts
                } else {
                    let acts = self.machine.step(Event::ReplicaHas {
                        now_ms: now,
                        latest,
                    });
                    if self.machine.state == ReplicationState::Replicating {
                        tracing::info!(vm = %vm.rec.name, "the replica holds the initial copy");
                    }
                    acts
                }
            }
            Outcome::Failed(failure) => {
                tracing::warn!(vm = %vm.rec.name, "cycle failed: {failure:?}");
                self.machine.step(Event::CycleFailed {
                    now_ms: now,
                    failure,
                })
            }
            Outcome::Cancelled => Vec::new(),
        };
        self.pending.extend(acts);
        self.carry_out(vm);
    }

    /// Run an admin command. A command the machine does not take in this state is refused.
    pub async fn command(&mut self, vm: &mut Vm, cmd: Cmd) -> anyhow::Result<String> {
        let name = vm.rec.name.clone();
        let now = now_ms();
        let before = self.machine.state;
        let ev = match cmd {
            Cmd::StartInitial => Event::StartInitial { now_ms: now },
            Cmd::Pause => Event::Pause { now_ms: now },
            Cmd::Resume => Event::Resume { now_ms: now },
            Cmd::Disable => Event::Disable,
            Cmd::ResumeResync(at_ms) => Event::ResumeResync { now_ms: now, at_ms },
        };
        let actions = self.machine.step(ev);
        let after = self.machine.state;
        let scheduled =
            matches!(cmd, Cmd::ResumeResync(Some(_))) && actions.contains(&Action::Persist);
        let took = before != after
            || scheduled
            || actions
                .iter()
                .any(|a| matches!(a, Action::StartCycle { .. }));
        self.pending.extend(actions);
        self.carry_out(vm);
        if !took {
            return Err(coded(
                exit::INVALID_STATE,
                format!("{name:?} is {before}; {cmd:?} does not apply"),
            ));
        }
        if cmd == Cmd::Disable {
            self.stop().await;
            // Remove tracking bitmaps: replication is off, nothing should be recorded any more.
            if let Err(e) = crate::cycle::stop_tracking(&vm.host, &vm.rec).await {
                tracing::warn!(vm = %name, "could not remove tracking bitmaps: {e:#}");
            }
            vm.rec.enable = None;
            vm.rec.state = ReplicationState::Disabled;
            vm.save()?;
        }
        Ok(format!("{name}: {before} -> {after}"))
    }

    /// Reset the statistics window.
    pub fn reset_stats(&mut self, vm: &mut Vm) -> anyhow::Result<()> {
        self.machine.step(Event::ResetStats { now_ms: now_ms() });
        self.save(vm)
    }

    /// Stop: a running cycle is cancelled (its changes merged back) and waited for.
    pub async fn stop(&mut self) {
        self.pending.clear();
        if let Some((cancel, handle)) = self.running.take() {
            cancel.cancel();
            match tokio::time::timeout(Duration::from_secs(20), handle).await {
                Ok(Ok(done)) => self.session = Some(done.session),
                _ => self.session = Some(Session::default()),
            }
        }
        // Close the capture so that its QMP monitor is free.
        self.session = Some(Session::default());
    }

    /// Planned failover, first half (the VM is shut down and no cycle runs): ship one final
    /// incremental cycle with consistency `Planned` and leave the VM `PreparedForFailover`.
    /// Returns the final cycle's id. On failure the machine is as before.
    pub async fn prepare_failover(&mut self, vm: &mut Vm) -> anyhow::Result<u64> {
        self.stop().await;
        let Some(base) = self.machine.last_cycle else {
            anyhow::bail!("initial replication has not completed");
        };
        let mut session = Session::default();
        let latest = crate::cycle::replica_latest(&vm.host, &vm.rec, &mut session)
            .await
            .map_err(|f| anyhow::anyhow!("reaching the replica: {f:?}"))?;
        if latest != Some(base) {
            anyhow::bail!(
                "the replica holds cycle {latest:?}, not this primary's last cycle {base}; \
                 let replication catch up first"
            );
        }
        let id = base + 1;
        let ctx = CycleCtx {
            host: vm.host.clone(),
            rec: vm.rec.clone(),
            last_cycle: Some(base),
            planned: true,
            reconcile: false,
            progress: self.progress.clone(),
        };
        let out =
            crate::cycle::run(&ctx, &mut session, id, Some(base), CycleKind::Incremental, false)
                .await;
        drop(session);
        match out {
            Outcome::Done { bytes, sizes, .. } => {
                vm.rec.disk_sizes = Some(sizes);
                let now = now_ms();
                let m = &mut self.machine;
                m.last_cycle = Some(id);
                m.stats.successful_cycles += 1;
                m.stats.total_bytes += bytes;
                m.stats.max_bytes = m.stats.max_bytes.max(bytes);
                m.stats.last_replication_ms = Some(now);
                m.state = ReplicationState::PreparedForFailover;
                m.last_error = None;
                self.save(vm)?;
                tracing::info!(vm = %vm.rec.name, cycle = id, bytes, "final planned cycle replicated; prepared for failover");
                Ok(id)
            }
            Outcome::Failed(f) => Err(anyhow::anyhow!("the final cycle failed: {f:?}")),
            Outcome::Reconciled { .. } | Outcome::Cancelled => {
                Err(anyhow::anyhow!("the final cycle was cancelled"))
            }
        }
    }

    /// The status row.
    pub fn status(&self, vm: &Vm, primary_name: &str, now: u64) -> VmStatus {
        let rec = &vm.rec;
        let m = &self.machine;
        let state = m.state;
        let stats = m.stats.clone();
        let health = primary_health(
            state,
            &stats,
            m.consecutive_failures,
            m.last_error.as_deref(),
            now,
        );
        let mut health_reason = health.reason();
        if state == ReplicationState::WaitingForStartResynchronize
            && m.initial_at_ms.is_none()
            && let Some(w) = rec.enable.as_ref().and_then(|e| e.auto_resync)
        {
            health_reason.push_str(&format!("; starts by itself in the window {w}"));
        }
        if state == ReplicationState::InitialReplicationInProgress
            && m.last_cycle.is_some()
            && let Some(InitialMode::Export { dir }) = rec.enable.as_ref().map(|e| &e.initial)
        {
            health_reason.push_str(&format!(
                "; initial copy exported to {dir}: load it on the replica with `vmreplica \
                 import {} DIR`",
                rec.name
            ));
        }
        let progress = self
            .running
            .as_ref()
            .filter(|_| m.running_since().is_some())
            .map(|_| self.progress.get());
        VmStatus {
            name: rec.name.clone(),
            uuid: rec.uuid,
            state,
            health: health.health,
            health_reason,
            mode: ReplicationMode::Primary,
            frequency_secs: rec.enable.as_ref().map_or(0, |e| e.frequency_secs),
            primary: primary_name.to_owned(),
            replica: rec
                .enable
                .as_ref()
                .map_or_else(String::new, |e| e.replica.clone()),
            last_replication_ms: stats.last_replication_ms,
            last_cycle: m.last_cycle,
            stats,
            progress,
        }
    }
}

/// The status row of a primary VM whose replication is not enabled.
pub fn disabled_status(vm: &Vm, primary_name: &str, now: u64) -> VmStatus {
    let rec = &vm.rec;
    let health = primary_health(rec.state, &rec.stats, 0, rec.last_error.as_deref(), now);
    VmStatus {
        name: rec.name.clone(),
        uuid: rec.uuid,
        state: rec.state,
        health: health.health,
        health_reason: health.reason(),
        mode: ReplicationMode::Primary,
        frequency_secs: 0,
        primary: primary_name.to_owned(),
        replica: String::new(),
        last_replication_ms: rec.stats.last_replication_ms,
        last_cycle: rec.last_cycle,
        stats: rec.stats.clone(),
        progress: None,
    }
}
