//! The primary side of one VM, as its owner runs it: the `PrimaryMachine` decides, this module
//! carries its actions out. A cycle runs in a task of its own (`cycle.rs`) so that the owner
//! keeps answering commands; the task gets the [`Session`] lent and gives it back with its
//! [`Outcome`], which the owner feeds to the machine. Admin commands (pause, resume, disable,
//! start-initial, resume --resync) are events of the machine; a refusal is the machine's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmr_core::{Action, Event, Failure, PrimaryMachine, Schedule, primary_health};
use vmr_proto::CycleKind;
use vmr_proto::api::{
    BandwidthStatus, EnableArgs, InitialMode, ReplicationMode, ReplicationState, VmStatus,
};
use vmr_proto::machine::PrimarySnapshot;
use vmr_proto::record::MachineSnapshot;

use crate::cycle::{CycleCtx, Outcome, Progress, Session};
use crate::errors::AgentError;
use crate::owned::{Observed, Vm};
use crate::pace::VmPace;
use crate::telemetry::Counts;
use crate::util::now_ms;

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

/// What the last verify cycle's comparison gave: the report, or why it could not compare.
pub type Verified = Result<vmr_proto::api::VerifyReport, String>;

/// Where a `vmreplica verify` waits for its report (as JSON).
pub type VerifyWaiter = tokio::sync::oneshot::Sender<Result<serde_json::Value, AgentError>>;

/// How often time passes for a primary machine (retries and schedules are this precise).
pub const TICK: Duration = Duration::from_millis(200);

/// A finished cycle task: its outcome and the session it borrowed.
pub struct CycleDone {
    /// What the cycle came to.
    pub outcome: Outcome,
    /// The session, back to the owner.
    pub session: Session,
    /// After a failed cycle: the changes now pending (the failed cycle's merged back), when
    /// the capture is still open to ask.
    pub pending: Option<u64>,
}

/// The primary side of a VM whose replication is enabled.
pub struct PrimarySide {
    /// Which relationship of the VM this side runs: 0 the first (`rec.enable` and
    /// `rec.machine`), else the fan-out relationship of this slot (`rec.fanout`).
    slot: u32,
    /// The VM has more than one relationship: cycles wait while another relationship's
    /// cycle runs (`gate_closed`, set by the owner) and close their capture when they end,
    /// since QEMU's QMP monitor takes one connection at a time (docs/extended.md, fan-out).
    shared: bool,
    /// Another relationship's cycle task runs: start no cycle now.
    gate_closed: bool,
    machine: PrimaryMachine,
    /// `None` while a cycle task has it.
    session: Option<Session>,
    /// A libvirt VM: its capture's backup-job counts at the end of the last cycle.
    libvirt_jobs: Option<vmr_proto::api::LibvirtJobs>,
    running: Option<(CancellationToken, JoinHandle<CycleDone>)>,
    /// The cycle the running task runs.
    started: Option<Started>,
    progress: Arc<Progress>,
    /// The VM's sending limit (kept in step with the record's `--bandwidth`) and what the
    /// last cycle waited for it.
    pace: Arc<VmPace>,
    /// Reconciled with the replica since the owner started.
    synced: bool,
    /// Actions the machine asked for that are not carried out yet.
    pending: Vec<Action>,
    /// The QMP monitor the planned failover's final cycle captures through instead of the
    /// VM's (a qemu-storage-daemon on the images once QEMU exited); cleared when that cycle
    /// ends.
    capture_from: Option<PathBuf>,
    /// The last verify cycle's comparison, until the owner takes it.
    verified: Option<Verified>,
    /// `vmreplica verify` commands waiting for the verify cycle's report.
    verify_waiters: Vec<VerifyWaiter>,
    /// A group cut asked for a cycle while one ran: ask the machine again when it ends.
    group_wanted: bool,
    /// The running task's cycle cuts with its group and has not joined a cut yet (it joins
    /// the one gathering now).
    will_join: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// The validated schedule of `args` (`enable`, `reverse`): a usage error when invalid.
pub fn schedule_of(args: &EnableArgs) -> Result<Schedule, AgentError> {
    Ok(Schedule::from_enable(args)?)
}

/// Test hook (cargo feature `test-hooks` only): a file of this name in the agent directory
/// holding a number of milliseconds sets the app-consistent interval of the VMs enabled while
/// it exists (`enable` accepts whole hours only), so that a test sees many app-consistent
/// cycles and can measure the frozen times.
#[cfg(feature = "test-hooks")]
const APP_CONSISTENT_HOOK: &str = "test-app-consistent-every-ms";

#[cfg(feature = "test-hooks")]
fn app_consistent_hook(dir: &std::path::Path, schedule: &mut Schedule) {
    if let Ok(text) = std::fs::read_to_string(dir.join(APP_CONSISTENT_HOOK))
        && let Ok(ms) = text.trim().parse::<u64>()
    {
        tracing::warn!(ms, "test hook: app-consistent interval set");
        schedule.app_consistent_every_ms = ms;
    }
}

#[cfg(not(feature = "test-hooks"))]
fn app_consistent_hook(_dir: &std::path::Path, _schedule: &mut Schedule) {}

/// A started cycle, remembered so that it can be run after a reconciliation kept it.
#[derive(Debug, Clone, Copy)]
struct Started {
    id: u64,
    base: Option<u64>,
    kind: CycleKind,
    app_consistent: bool,
    planned: bool,
    verify: bool,
}

impl PrimarySide {
    fn with(machine: PrimaryMachine, pending: Vec<Action>) -> PrimarySide {
        PrimarySide {
            slot: 0,
            shared: false,
            gate_closed: false,
            machine,
            session: Some(Session::default()),
            libvirt_jobs: None,
            running: None,
            started: None,
            progress: Arc::new(Progress::default()),
            pace: Arc::new(VmPace::default()),
            synced: false,
            pending,
            capture_from: None,
            verified: None,
            verify_waiters: Vec::new(),
            group_wanted: false,
            will_join: None,
        }
    }

    /// The primary side of `vm` as persisted, when replication is enabled. `restarted`: the
    /// agent came back up (whatever was running is gone).
    pub fn restore(vm: &Vm, restarted: bool) -> Option<PrimarySide> {
        let args = vm.rec.enable.as_ref()?;
        let schedule = match schedule_of(args) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, "the stored replication settings are invalid: {}", crate::util::chain(&e));
                return None;
            }
        };
        let snap = match &vm.rec.machine {
            MachineSnapshot::Primary(s) => s.clone(),
            MachineSnapshot::Replica(_) => PrimarySnapshot::default(),
        };
        let mut machine = PrimaryMachine::restore(schedule, snap);
        let pending = if restarted {
            machine
                .step(Event::Restarted { now_ms: now_ms() })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(Self::with(machine, pending))
    }

    /// The fan-out relationship `f` of `vm` as persisted.
    pub fn restore_fanout(
        vm: &Vm,
        f: &vmr_proto::record::FanoutRecord,
        restarted: bool,
    ) -> Option<PrimarySide> {
        let schedule = match schedule_of(&f.args) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, replica = %f.args.replica, "the stored settings of a fan-out relationship are invalid: {}", crate::util::chain(&e));
                return None;
            }
        };
        let mut machine = PrimaryMachine::restore(schedule, f.machine.clone());
        let pending = if restarted {
            machine
                .step(Event::Restarted { now_ms: now_ms() })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut side = Self::with(machine, pending);
        side.slot = f.slot;
        Some(side)
    }

    /// Add a fan-out relationship (a second, third... replica of a VM that replicates
    /// already; the replica accepted the VM already).
    pub fn enable_fanout(vm: &mut Vm, args: EnableArgs) -> Result<PrimarySide, AgentError> {
        let schedule = schedule_of(&args)?;
        let mut machine = PrimaryMachine::new(schedule);
        let acts = machine.step(Event::Enable {
            now_ms: now_ms(),
            initial_at_ms: args.initial_at_ms,
        })?;
        let slot = vm.rec.fanout.iter().map(|f| f.slot).max().unwrap_or(0) + 1;
        vm.rec.fanout.push(vmr_proto::record::FanoutRecord {
            args,
            machine: machine.snapshot(),
            slot,
        });
        let mut side = Self::with(machine, acts);
        side.slot = slot;
        side.save(vm)?;
        Ok(side)
    }

    /// The owner says whether the VM has more than one relationship, and whether another
    /// relationship's cycle task runs now.
    pub fn set_gate(&mut self, shared: bool, closed: bool) {
        self.shared = shared;
        self.gate_closed = closed;
        if shared
            && self.running.is_none()
            && let Some(s) = self.session.as_mut()
        {
            // A capture kept open from before the VM had several relationships holds the
            // QMP monitor another relationship's cycle needs.
            s.capture = None;
        }
    }

    /// This relationship's replication settings.
    pub fn args<'a>(&self, vm: &'a Vm) -> Option<&'a EnableArgs> {
        if self.slot == 0 {
            vm.rec.enable.as_ref()
        } else {
            vm.rec
                .fanout
                .iter()
                .find(|f| f.slot == self.slot)
                .map(|f| &f.args)
        }
    }

    fn args_mut<'a>(&self, vm: &'a mut Vm) -> Option<&'a mut EnableArgs> {
        if self.slot == 0 {
            vm.rec.enable.as_mut()
        } else {
            vm.rec
                .fanout
                .iter_mut()
                .find(|f| f.slot == self.slot)
                .map(|f| &mut f.args)
        }
    }

    /// This relationship's replica address (`HOST:PORT`).
    pub fn replica<'a>(&self, vm: &'a Vm) -> &'a str {
        self.args(vm).map_or("", |a| a.replica.as_str())
    }

    /// The primary side of a VM whose replication was just reversed onto this host.
    pub fn reversed(machine: PrimaryMachine) -> PrimarySide {
        Self::with(machine, vec![Action::Persist])
    }

    /// The machine.
    pub fn machine(&self) -> &PrimaryMachine {
        &self.machine
    }

    /// The machine's state.
    pub fn state(&self) -> ReplicationState {
        self.machine.state()
    }

    /// Save the machine's snapshot in the record.
    fn save(&self, vm: &mut Vm) -> Result<(), AgentError> {
        if self.slot == 0 {
            return save_snapshot(vm, self.machine.snapshot());
        }
        let snap = self.machine.snapshot();
        if let Some(f) = vm.rec.fanout.iter_mut().find(|f| f.slot == self.slot) {
            f.machine = snap;
        }
        vm.save()
    }

    /// Enable replication (the replica accepted the VM already).
    pub fn enable(vm: &mut Vm, args: EnableArgs) -> Result<PrimarySide, AgentError> {
        let mut schedule = schedule_of(&args)?;
        app_consistent_hook(&vm.host.dir, &mut schedule);
        let mut machine = PrimaryMachine::new(schedule);
        let acts = machine.step(Event::Enable {
            now_ms: now_ms(),
            initial_at_ms: args.initial_at_ms,
        })?;
        vm.rec.enable = Some(args);
        let side = Self::with(machine, acts);
        side.save(vm)?;
        Ok(side)
    }

    /// Carry out what the machine asked for and is not done yet (after an event the owner
    /// fed outside this side, e.g. enable).
    pub fn flush(&mut self, vm: &mut Vm) {
        self.carry_out(vm);
    }

    /// `set --verify-every`: the machine's schedule from now on, and the replication settings
    /// that rebuild it after a restart. `None` = only on `vmreplica verify`.
    pub fn set_verify_every(
        &mut self,
        vm: &mut Vm,
        every_secs: Option<u64>,
    ) -> Result<(), AgentError> {
        if let Some(s) = every_secs {
            vmr_core::check_verify_every(s)?;
        }
        let acts = self.machine.step(Event::SetVerifyEvery {
            now_ms: now_ms(),
            every_ms: every_secs.unwrap_or(0).saturating_mul(1000),
        })?;
        self.pending.extend(acts);
        if let Some(args) = self.args_mut(vm) {
            args.verify_every_secs = every_secs;
        }
        vm.save()?;
        Ok(())
    }

    fn step(&mut self, vm: &Vm, ev: Event) {
        let before = Counts::of(self.machine.stats());
        match self.machine.step(ev) {
            Ok(acts) => self.pending.extend(acts),
            Err(r) => tracing::debug!(vm = %vm.rec.name, "machine refused: {r}"),
        }
        // The agent's per-VM counters (`/metrics` cycle totals) are the first relationship's;
        // a fan-out relationship's own statistics are its machine's.
        if self.slot == 0 {
            vm.telemetry
                .observe(before, Counts::of(self.machine.stats()), now_ms());
        }
    }

    /// Time passed: feed a tick and carry out what the machine asks.
    pub fn tick(&mut self, vm: &mut Vm) {
        // While the machine's cycle runs, a tick only counts the intervals that cycle overran
        // (a throttled or slow cycle shows missed cycles as they pass, not when it ends); it
        // starts nothing.
        if self.pending.is_empty()
            && (self.running.is_none() || self.machine.running_since().is_some())
        {
            self.step(vm, Event::Tick { now_ms: now_ms() });
        }
        self.carry_out(vm);
    }

    /// True while a task of this side runs.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether a cycle task runs.
    pub fn running(&mut self) -> Option<&mut JoinHandle<CycleDone>> {
        self.running.as_mut().map(|(_, h)| h)
    }

    /// Carry out the pending actions.
    fn carry_out(&mut self, vm: &mut Vm) {
        while !self.pending.is_empty() {
            let action = self.pending.remove(0);
            match action {
                Action::Persist => {
                    if let Err(e) = self.save(vm) {
                        tracing::error!(vm = %vm.rec.name, "saving state: {}", crate::util::chain(&e));
                    }
                }
                Action::AbortCycle => {
                    if let Some((cancel, _)) = &self.running {
                        cancel.cancel();
                    }
                }
                Action::StopTracking => {}
                Action::QueryReplica => self.start_task(vm, None, true),
                Action::StartCycle { .. } if self.running.is_some() || self.gate_closed => {
                    // The machine aborted the running cycle: start this one when that task
                    // has ended (`cycle_done` carries on).
                    self.pending.insert(0, action);
                    break;
                }
                Action::StartCycle {
                    id,
                    base,
                    kind,
                    app_consistent,
                    planned,
                    verify,
                } => {
                    let s = Started {
                        id,
                        base,
                        kind,
                        app_consistent,
                        planned,
                        verify,
                    };
                    let reconcile = !self.synced || base.is_some();
                    self.start_task(vm, Some(s), reconcile);
                }
            }
        }
    }

    /// A group cut asks for a cycle now (docs/groups.md): the machine decides; a running
    /// cycle is waited for (the next starts when it ends). `Err`: why this member cannot
    /// take part.
    pub fn cycle_now(&mut self, vm: &mut Vm) -> Result<(), String> {
        if self.running.is_some() || self.machine.running_id().is_some() {
            // A running cycle that has not cut yet joins the gathering cut itself; one past
            // its cut (or not cutting with the group) is followed by one that does.
            let joins = self
                .will_join
                .as_ref()
                .is_some_and(|j| !j.load(std::sync::atomic::Ordering::Relaxed));
            if !joins {
                self.group_wanted = true;
            }
            return Ok(());
        }
        match self.machine.step(Event::CycleNow { now_ms: now_ms() }) {
            Ok(acts) => {
                self.pending.extend(acts);
                self.carry_out(vm);
                Ok(())
            }
            Err(r) => Err(r.to_string()),
        }
    }

    /// Lend the session to a task running one cycle (or, with `None`, asking the replica
    /// which cycle it holds).
    fn start_task(&mut self, vm: &Vm, cycle: Option<Started>, reconcile: bool) {
        if self.running.is_some() {
            tracing::error!(vm = %vm.rec.name, "a cycle was asked for while one runs");
            return;
        }
        let mut session = self.session.take().unwrap_or_default();
        let cancel = CancellationToken::new();
        self.progress.clear();
        self.started = cycle;
        let mut rec = vm.rec.clone();
        if self.slot != 0 {
            // The cycle code reads the relationship's settings from the record it is lent.
            rec.enable = self.args(vm).cloned();
            rec.machine = MachineSnapshot::Primary(self.machine.snapshot());
            rec.group = None;
        }
        rec.fanout.clear();
        if let Some(qmp) = &self.capture_from {
            // The final cycle from the images: the daemon's monitor, the agent's NBD socket.
            rec.qmp = qmp.display().to_string();
            rec.nbd = None;
        }
        self.pace
            .set_schedule(rec.enable.as_ref().and_then(|e| e.bandwidth.clone()));
        // A group member's incremental cycle cuts with the group; any other cycle (full,
        // resync, verify, export, a planned failover's final one) leaves a gathering cut.
        let group = rec.group.clone();
        let gated = group.is_some()
            && self.capture_from.is_none()
            && cycle.is_some_and(|c| c.kind == CycleKind::Incremental && !c.planned && !c.verify)
            && !matches!(
                rec.enable.as_ref().map(|e| &e.initial),
                Some(InitialMode::Export { .. })
            );
        if let (Some(g), Some(_), false) = (&group, cycle, gated) {
            vm.host.groups.leave(
                g,
                rec.uuid,
                "its next cycle is not an incremental one (full, resync, verify or final)",
            );
        }
        let joined = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.will_join = gated.then(|| joined.clone());
        let ctx = CycleCtx {
            host: vm.host.clone(),
            group: if gated { group.clone() } else { None },
            joined,
            rec,
            last_cycle: self.machine.last_cycle(),
            planned: cycle.is_some_and(|c| c.planned),
            reconcile,
            read_hashes: self.machine.verify_mismatch().is_some(),
            progress: self.progress.clone(),
            pace: self.pace.clone(),
            slot: self.slot,
        };
        let shared = self.shared;
        let token = cancel.clone();
        // On the data path runtime: the cycle's per-byte work, and everything it spawns, runs
        // at the data path's CPU priority (`cpu-priority`).
        let handle = vm.host.data.clone().spawn(async move {
            let outcome = match cycle {
                None => match crate::cycle::replica_latest(&ctx.host, &ctx.rec, &mut session).await
                {
                    Ok(latest) => Outcome::ReplicaHas { latest },
                    Err(f) => Outcome::Failed(f),
                },
                Some(c) => {
                    let permit = ctx.host.cycle_slots.acquire().await;
                    let o = tokio::select! {
                        o = run_cycle(&ctx, &mut session, c) => o,
                        _ = token.cancelled() => Outcome::Cancelled,
                    };
                    drop(permit);
                    o
                }
            };
            if let Some(g) = &ctx.group
                && !ctx.joined.load(std::sync::atomic::Ordering::Relaxed)
            {
                // Ended before its cut: a round gathering for it goes on without it.
                ctx.host
                    .groups
                    .leave(g, ctx.rec.uuid, "its cycle ended before the cut");
            }
            if matches!(outcome, Outcome::Cancelled) {
                // The dropped cycle's view is ended now, not at the next cycle.
                crate::cycle::end_cancelled(&ctx.host, &ctx.rec, ctx.slot, &mut session).await;
            }
            let mut pending = None;
            if let (Outcome::Failed(_), Some(c)) = (&outcome, session.capture.as_mut()) {
                pending = c.pending_bytes().await.ok();
            }
            if shared {
                // Another relationship's capture connects next: free the QMP monitor.
                session.capture = None;
            }
            CycleDone {
                outcome,
                session,
                pending,
            }
        });
        self.running = Some((cancel, handle));
    }

    /// A cycle task finished.
    pub fn cycle_done(&mut self, vm: &mut Vm, done: Result<CycleDone, tokio::task::JoinError>) {
        self.running = None;
        self.will_join = None;
        let started = self.started.take();
        let now = now_ms();
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, "cycle task ended abnormally: {e}");
                self.session = Some(Session::default());
                self.step(
                    vm,
                    Event::CycleFailed {
                        now_ms: now,
                        failure: Failure::Retryable(format!("cycle task ended abnormally: {e}")),
                    },
                );
                self.carry_out(vm);
                return;
            }
        };
        let mut session = done.session;
        let compared = session.verify.take();
        if let Some(outcome) = session.quiesce.take()
            && self.machine.running_id().is_some()
        {
            self.step(
                vm,
                Event::Quiesced {
                    now_ms: now,
                    outcome,
                },
            );
        }
        if let Some((toml, disks)) = session.definition.take() {
            // the replica stores this definition now (a libvirt domain's XML changed, perhaps
            // with disks added, replicated from now on)
            vm.rec.launch_toml = toml;
            vm.rec.disks = disks;
            if let Err(e) = vm.save() {
                tracing::error!(vm = %vm.rec.name, "could not record the refreshed definition: {e}");
            }
        }
        if let Some(c) = &session.libvirt {
            let st = c.stats();
            self.libvirt_jobs = Some(vmr_proto::api::LibvirtJobs {
                busy: st.busy,
                busy_streak: st.busy_streak,
                busy_since_ms: st.busy_since_ms,
                resyncs: st.resyncs,
            });
        }
        self.session = Some(session);
        if started.is_some_and(|s| s.planned) && self.capture_from.take().is_some() {
            // Its capture talked to the images' daemon, which goes now: the next cycle opens
            // the VM's own monitor again.
            if let Some(s) = self.session.as_mut() {
                s.capture = None;
            }
        }
        match done.outcome {
            Outcome::Done {
                id,
                bytes,
                sizes,
                app,
                pending,
            } => {
                self.synced = true;
                // A libvirt VM: persist the checkpoint the replica acknowledged, so that an
                // agent restart continues the chain from it.
                // With it its description, from which lost libvirt metadata is redefined.
                let capture = self.session.as_ref().and_then(|s| s.libvirt.as_ref());
                let acked = capture.and_then(|c| c.acked().map(str::to_owned));
                let acked_xml = capture.and_then(|c| c.acked_xml().map(str::to_owned));
                if let Some(lv) = vm.rec.libvirt.as_mut()
                    && acked.is_some()
                    && (lv.acked_checkpoint != acked || lv.acked_checkpoint_xml != acked_xml)
                {
                    lv.acked_checkpoint = acked;
                    lv.acked_checkpoint_xml = acked_xml;
                    if let Err(e) = vm.save() {
                        tracing::error!(vm = %vm.rec.name, "could not record the acknowledged checkpoint: {e}");
                    }
                }
                if self.machine.running_id().is_some_and(|r| r != id) {
                    self.step(vm, Event::RetargetRunning { now_ms: now, id });
                }
                tracing::info!(vm = %vm.rec.name, cycle = id, bytes, "cycle replicated");
                self.step(
                    vm,
                    Event::CycleSucceeded {
                        now_ms: now,
                        bytes,
                        app_consistent: app,
                        pending_bytes: pending,
                        disk_sizes: Some(sizes),
                    },
                );
                match compared {
                    Some(Ok(report)) => {
                        let n = report.mismatched_blocks();
                        let mismatch = (n > 0).then(|| {
                            format!(
                                "point {}: {n} block(s) of 64 KiB differ ({})",
                                report.point,
                                report.summary(4)
                            )
                        });
                        self.step(
                            vm,
                            Event::Verified {
                                now_ms: now_ms(),
                                mismatched_blocks: n,
                                mismatch,
                            },
                        );
                        self.verified = Some(Ok(report));
                    }
                    Some(Err(f)) => {
                        tracing::warn!(vm = %vm.rec.name, cycle = id, "the verify cycle replicated but its comparison failed (the next cycle verifies again): {f:?}");
                        self.verified = Some(Err(format!(
                            "cycle {id} replicated, but comparing it failed: {}",
                            failure_text(&f)
                        )));
                    }
                    None => {}
                }
            }
            Outcome::Reconciled { latest } => {
                self.synced = true;
                if latest != self.machine.last_cycle() {
                    tracing::info!(
                        vm = %vm.rec.name,
                        replica = ?latest,
                        ours = ?self.machine.last_cycle(),
                        "the replica's latest point is not our last acknowledged cycle (an \
                         acknowledgement was lost, or the replica changed): taking the replica's"
                    );
                }
                self.step(
                    vm,
                    Event::Reconciled {
                        now_ms: now,
                        latest,
                    },
                );
                // The machine kept the started cycle: run it now.
                if let Some(s) = started
                    && self.machine.running_id() == Some(s.id)
                {
                    self.carry_out(vm);
                    self.start_task(vm, Some(s), false);
                    return;
                }
            }
            Outcome::ReplicaHas { latest } => {
                self.step(
                    vm,
                    Event::ReplicaHas {
                        now_ms: now,
                        latest,
                    },
                );
                if self.machine.state() == ReplicationState::Replicating {
                    tracing::info!(vm = %vm.rec.name, "the replica holds the initial copy");
                }
            }
            Outcome::Failed(failure) => {
                tracing::warn!(vm = %vm.rec.name, "cycle failed: {failure:?}");
                if let Some(bytes) = done.pending {
                    self.step(vm, Event::Pending { bytes });
                }
                self.step(
                    vm,
                    Event::CycleFailed {
                        now_ms: now,
                        failure,
                    },
                );
            }
            // The machine asked for the abort (`AbortCycle`): it has moved on already.
            Outcome::Cancelled => {}
        }
        self.carry_out(vm);
        if self.group_wanted && self.running.is_none() {
            self.group_wanted = false;
            if let Err(why) = self.cycle_now(vm)
                && let Some(g) = vm.rec.group.clone()
            {
                vm.host.groups.leave(&g, vm.rec.uuid, &why);
            }
        }
        self.settle_verify(started.is_some_and(|s| s.verify));
    }

    /// Answer the waiting `verify` commands once their verification reported, failed or was
    /// dropped by the machine (the VM left Replicating). `verify_ended`: the cycle that just
    /// ended was a verify cycle.
    fn settle_verify(&mut self, verify_ended: bool) {
        if self.verify_waiters.is_empty() {
            return;
        }
        let answer = match &self.verified {
            Some(Ok(r)) => serde_json::to_value(r).map_err(|source| AgentError::JsonEncode {
                what: "the verification report",
                source,
            }),
            Some(Err(reason)) => Err(AgentError::VerifyFailed {
                reason: reason.clone(),
            }),
            None if !self.machine.verify_pending() => Err(AgentError::VerifyFailed {
                reason: format!(
                    "the verification did not run: the VM is {}{}",
                    self.machine.state(),
                    self.machine
                        .last_error()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
            }),
            None if verify_ended && self.machine.running_id().is_none() => {
                Err(AgentError::VerifyFailed {
                    reason: format!(
                        "the verify cycle failed ({}); it is tried again as the next cycle",
                        self.machine.last_error().unwrap_or("no error recorded")
                    ),
                })
            }
            None => return,
        };
        for w in self.verify_waiters.drain(..) {
            let _ = w.send(match &answer {
                Ok(v) => Ok(v.clone()),
                Err(AgentError::VerifyFailed { reason }) => Err(AgentError::VerifyFailed {
                    reason: reason.clone(),
                }),
                Err(e) => Err(AgentError::VerifyFailed {
                    reason: e.to_string(),
                }),
            });
        }
    }

    /// Run an admin command; the machine refuses what does not apply in its state.
    pub async fn command(
        &mut self,
        vm: &mut Vm,
        cmd: Cmd,
    ) -> Result<vmr_proto::api::StateChange, AgentError> {
        let name = vm.rec.name.clone();
        let now = now_ms();
        let before = self.machine.state();
        let ev = match cmd {
            Cmd::StartInitial => Event::StartInitial { now_ms: now },
            Cmd::Pause => Event::Pause { now_ms: now },
            Cmd::Resume => Event::Resume { now_ms: now },
            Cmd::Disable => Event::Disable { now_ms: now },
            Cmd::ResumeResync(at_ms) => Event::ResumeResync { now_ms: now, at_ms },
        };
        let counts = Counts::of(self.machine.stats());
        let actions = self.machine.step(ev)?;
        if self.slot == 0 {
            vm.telemetry
                .observe(counts, Counts::of(self.machine.stats()), now);
        }
        let after = self.machine.state();
        self.pending.extend(actions);
        self.carry_out(vm);
        self.settle_verify(false);
        if cmd == Cmd::Disable {
            self.stop().await;
            // Remove tracking bitmaps: replication is off, nothing should be recorded any more.
            if let Err(e) = crate::cycle::stop_tracking(&vm.host, &vm.rec, self.slot).await {
                tracing::warn!(vm = %name, "could not remove tracking bitmaps: {e:#}");
            }
            if self.slot != 0 {
                // A fan-out relationship ends with its record; the VM's others go on.
                let Some(i) = vm.rec.fanout.iter().position(|f| f.slot == self.slot) else {
                    return Err(AgentError::FanoutRefused {
                        name,
                        reason: crate::errors::FanoutRefusal::NoRecord(self.slot),
                    });
                };
                let args = vm.rec.fanout.remove(i).args;
                vm.save()?;
                let told = crate::cycle::tell_replica_disabled(&vm.host, &vm.rec, &args).await;
                if let crate::cycle::Told::Unreached(why) = &told {
                    tracing::warn!(vm = %name, replica = %args.replica, "the replica could not be told of the disable (told in the background): {why}");
                    vm.fanout_notices
                        .retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                    vm.fanout_notices
                        .push(crate::cycle::keep_telling_replica_disabled(
                            vm.host.clone(),
                            vm.rec.clone(),
                            args.clone(),
                        ));
                }
                return Ok(vmr_proto::api::StateChange {
                    message: format!(
                        "{name} (to {}): {before} -> {after}; {}",
                        args.replica,
                        crate::cycle::told_message(&name, &args.replica, &told)
                    ),
                    name,
                    from: before,
                    to: after,
                });
            }
            let told = match vm.rec.enable.take() {
                Some(args) => {
                    let told = crate::cycle::tell_replica_disabled(&vm.host, &vm.rec, &args).await;
                    if let crate::cycle::Told::Unreached(why) = &told {
                        tracing::warn!(vm = %name, replica = %args.replica, "the replica could not be told of the disable (told in the background): {why}");
                        vm.disable_notice = Some(crate::cycle::keep_telling_replica_disabled(
                            vm.host.clone(),
                            vm.rec.clone(),
                            args.clone(),
                        ));
                    }
                    format!(
                        "; {}",
                        crate::cycle::told_message(&name, &args.replica, &told)
                    )
                }
                None => String::new(),
            };
            self.save(vm)?;
            return Ok(vmr_proto::api::StateChange {
                message: format!("{name}: {before} -> {after}{told}"),
                name,
                from: before,
                to: after,
            });
        }
        Ok(vmr_proto::api::StateChange {
            message: format!("{name}: {before} -> {after}"),
            name,
            from: before,
            to: after,
        })
    }

    /// The last verify cycle's comparison, once (the owner emits its event).
    pub fn take_verified(&mut self) -> Option<Verified> {
        self.verified.take()
    }

    /// `vmreplica verify`: the machine decides whether a verify may run; the verify cycle
    /// starts now, or right after the cycle running now. `reply` gets the report (or why
    /// there is none) when it ends; the owner keeps answering meanwhile.
    pub fn start_verify(&mut self, vm: &mut Vm, reply: VerifyWaiter) {
        let now = now_ms();
        match self.machine.step(Event::Verify { now_ms: now }) {
            Ok(acts) => {
                self.verified = None;
                self.verify_waiters.push(reply);
                self.pending.extend(acts);
                self.carry_out(vm);
            }
            Err(r) => {
                let _ = reply.send(Err(AgentError::Refused(r)));
            }
        }
    }

    /// Reset the statistics window.
    pub fn reset_stats(&mut self, vm: &mut Vm) -> Result<(), AgentError> {
        self.machine.step(Event::ResetStats { now_ms: now_ms() })?;
        self.save(vm)
    }

    /// Stop (disable, shutdown, hand-over): a running cycle task is cancelled (its changes
    /// merged back) and waited for, the capture is closed so that its QMP monitor is free, and
    /// nothing pending is carried out. The machine is not told: the caller replaces it, or
    /// feeds it what follows ([`PrimarySide::resume_after_stop`]).
    pub async fn stop(&mut self) {
        self.pending.clear();
        if let Some((cancel, handle)) = self.running.take() {
            cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
            self.started = None;
        }
        self.session = Some(Session::default());
    }

    /// After [`PrimarySide::stop`] when the side carries on: a cycle the machine thought
    /// running is gone, so it plans again.
    pub fn resume_after_stop(&mut self, vm: &mut Vm) {
        if self.machine.running_id().is_some() {
            self.step(vm, Event::Restarted { now_ms: now_ms() });
        }
        self.carry_out(vm);
    }

    /// Planned failover, first half (the VM is shut down): the machine asks for one final
    /// incremental cycle with consistency `Planned`; it is run here and waited for. Returns
    /// the final cycle's id once the VM is `PreparedForFailover`. `from`: the QMP monitor to
    /// capture the final cycle through instead of the VM's (the daemon on its images).
    pub async fn prepare_failover(
        &mut self,
        vm: &mut Vm,
        from: Option<PathBuf>,
    ) -> Result<u64, AgentError> {
        self.capture_from = from;
        let r = self.prepare_failover_inner(vm).await;
        if self.capture_from.take().is_some()
            && let Some(s) = self.session.as_mut()
        {
            s.capture = None;
        }
        r
    }

    async fn prepare_failover_inner(&mut self, vm: &mut Vm) -> Result<u64, AgentError> {
        let acts = match self
            .machine
            .step(Event::PrepareFailover { now_ms: now_ms() })
        {
            Ok(a) => a,
            Err(r) => {
                self.resume_after_stop(vm);
                return Err(AgentError::Refused(r));
            }
        };
        self.pending.extend(acts);
        self.carry_out(vm);
        let started = self.running.is_some();
        while let Some((_, handle)) = self.running.as_mut() {
            let done = handle.await;
            self.cycle_done(vm, done);
            if !self.machine.preparing_failover() {
                break;
            }
        }
        if self.machine.state() == ReplicationState::PreparedForFailover
            && let Some(id) = self.machine.last_cycle()
        {
            tracing::info!(vm = %vm.rec.name, cycle = id, "final planned cycle replicated; prepared for failover");
            return Ok(id);
        }
        let reason = match self.machine.last_error() {
            Some(e) => e.to_owned(),
            // The owner holds a relationship's cycle back while another one's runs.
            None if !started => "the final cycle did not start: another relationship's cycle \
                                 held the VM's monitor"
                .to_owned(),
            None => "unknown error".to_owned(),
        };
        Err(AgentError::FinalCycleFailed { reason })
    }

    /// The status row.
    pub fn status(&self, vm: &Vm, primary_name: &str, now: u64) -> VmStatus {
        let rec = &vm.rec;
        let m = &self.machine;
        let state = m.state();
        let stats = m.stats().clone();
        let health = primary_health(state, &stats, m.consecutive_failures(), m.last_error(), now)
            .with(vm.rpo_health(state, &stats, now));
        let mut health_reason = health.reason();
        if state == ReplicationState::WaitingForStartResynchronize
            && m.initial_at_ms().is_none()
            && let Some(w) = self.args(vm).and_then(|e| e.auto_resync)
        {
            health_reason.push_str(&format!("; starts by itself in the window {w}"));
        }
        if state == ReplicationState::InitialReplicationInProgress
            && m.last_cycle().is_some()
            && let Some(InitialMode::Export { dir }) = self.args(vm).map(|e| &e.initial)
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
        let operation = self
            .running
            .as_ref()
            .filter(|_| m.running_since().is_some())
            .and_then(|_| self.progress.operation());
        let last_point_ms = stats
            .last_point_cut_ms
            .or(if self.slot == 0 {
                vm.telemetry.last_cut_ms()
            } else {
                None
            })
            .or(stats.last_replication_ms);
        VmStatus {
            name: rec.name.clone(),
            uuid: rec.uuid,
            state,
            health: health.health,
            health_reason,
            mode: ReplicationMode::Primary,
            frequency_secs: self.args(vm).map_or(0, |e| e.frequency_secs),
            continuous: self
                .args(vm)
                .is_some_and(|e| e.frequency_secs == vmr_core::CONTINUOUS),
            primary: primary_name.to_owned(),
            primary_address: None,
            replica: self
                .args(vm)
                .map_or_else(String::new, |e| e.replica.clone()),
            last_replication_ms: stats.last_replication_ms,
            last_cycle: m.last_cycle(),
            progress,
            failover_program: None,
            initial_at_ms: m
                .initial_at_ms()
                .filter(|_| state == ReplicationState::ReadyForInitialReplication),
            failover_network: (!rec.failover.is_empty()).then(|| rec.failover.clone()),
            rpo_alert_secs: vm.rpo_alert_secs(),
            lag_ms: Vm::lag_ms(&stats, now),
            stats,
            operation,
            recovery_points: None,
            last_point_ms,
            last_cycle_bytes: if self.slot == 0 {
                vm.telemetry.last_cycle_bytes()
            } else {
                None
            },
            retention: self.args(vm).map(EnableArgs::retention),
            extended: None,
            libvirt: rec.libvirt.clone(),
            libvirt_jobs: self.libvirt_jobs,
            failover_domains: Vec::new(),
            bandwidth: Some(self.bandwidth_status(vm, now)),
            group: None,
            fanout: Vec::new(),
            auto_failover: None,
        }
    }

    /// A new schedule for the VM's sending limit (`set --bandwidth`): the next reservation of
    /// the running cycle, if any, uses it.
    pub fn set_bandwidth(&self, s: Option<vmr_proto::bandwidth::BandwidthSchedule>) {
        self.pace.set_schedule(s);
    }

    /// The sending limit in force at `now` and what the last cycle waited for it.
    fn bandwidth_status(&self, vm: &Vm, now: u64) -> BandwidthStatus {
        let agent = &vm.host.pace;
        let schedule = self
            .args(vm)
            .and_then(|e| e.bandwidth.clone())
            .filter(|s| !s.is_unlimited());
        let own = schedule.as_ref().map_or(0, |s| s.limit_at(now, agent.zone));
        let last = self.pace.last();
        BandwidthStatus {
            schedule,
            agent_schedule: agent.schedule(),
            limit: vmr_proto::bandwidth::effective_limit(own, agent.limit_at(now)),
            wait_ms: last.wait_ms,
            wire_bytes: last.wire_bytes,
            send_ms: last.send_ms,
        }
    }

    /// What the owner compares between events.
    pub fn observe(&self, vm: &Vm, now: u64) -> Observed {
        let m = &self.machine;
        let state = m.state();
        let stats = m.stats();
        let health = primary_health(state, stats, m.consecutive_failures(), m.last_error(), now)
            .with(vm.rpo_health(state, stats, now));
        Observed {
            state,
            health: health.health,
            reason: health.reason(),
            errors: stats.errors,
            missed: stats.missed_cycles,
            last_error: m.last_error().map(str::to_owned),
        }
    }

    /// The machine's state and statistics (the RPO alert's inputs).
    pub fn rpo_inputs(&self) -> (ReplicationState, &vmr_proto::api::ReplicationStats) {
        (self.machine.state(), self.machine.stats())
    }
}

/// Run the cycle the machine asked for: reconcile first when asked, then a resync, an
/// export to a directory, or a cycle over the network.
async fn run_cycle(ctx: &CycleCtx, session: &mut Session, c: Started) -> Outcome {
    if ctx.reconcile
        && c.kind != CycleKind::Resync
        && let Some(o) = crate::cycle::reconcile(ctx, session).await
    {
        return o;
    }
    let export = ctx.rec.enable.as_ref().and_then(|e| match &e.initial {
        InitialMode::Export { dir } if c.kind == CycleKind::Full => Some(dir.clone()),
        _ => None,
    });
    if ctx.rec.libvirt.is_some() {
        // (a resync is a full backup job compared block by block: resync.rs)
        let what = if c.verify && c.base.is_some() {
            Some("a verify cycle")
        } else if export.is_some() {
            Some("an initial copy exported to a directory")
        } else {
            None
        };
        if let Some(what) = what {
            return Outcome::Failed(Failure::Fatal(format!(
                "{what} is not built yet for libvirt-managed VMs (docs/libvirt.md)"
            )));
        }
    }
    if c.kind == CycleKind::Resync {
        crate::resync::run(ctx, session, c.id).await
    } else if c.verify
        && let Some(base) = c.base
    {
        crate::verify::run(ctx, session, c.id, base).await
    } else if let Some(dir) = export {
        crate::export::run(ctx, session, c.id, std::path::Path::new(&dir)).await
    } else {
        crate::cycle::run_incremental(ctx, session, c.id, c.base, c.kind, c.app_consistent).await
    }
}

/// A failure's message.
fn failure_text(f: &Failure) -> &str {
    match f {
        Failure::Retryable(m) | Failure::ResyncRequired(m) | Failure::WrongBase(m) => m,
        Failure::Fatal(m) => m,
    }
}

/// Save a primary machine's snapshot in the VM's record.
pub fn save_snapshot(vm: &mut Vm, snap: PrimarySnapshot) -> Result<(), AgentError> {
    vm.rec.machine = MachineSnapshot::Primary(snap);
    vm.save()
}

/// The status row of a primary VM whose replication is not enabled.
pub fn disabled_status(vm: &Vm, primary_name: &str, now: u64) -> VmStatus {
    let rec = &vm.rec;
    let snap = match &rec.machine {
        MachineSnapshot::Primary(s) => s.clone(),
        MachineSnapshot::Replica(_) => PrimarySnapshot::default(),
    };
    let health = primary_health(snap.state, &snap.stats, 0, snap.last_error.as_deref(), now);
    let lag_ms = Vm::lag_ms(&snap.stats, now);
    VmStatus {
        name: rec.name.clone(),
        uuid: rec.uuid,
        state: snap.state,
        health: health.health,
        health_reason: health.reason(),
        mode: ReplicationMode::Primary,
        frequency_secs: 0,
        continuous: false,
        primary: primary_name.to_owned(),
        primary_address: None,
        replica: String::new(),
        last_replication_ms: snap.stats.last_replication_ms,
        last_cycle: snap.last_cycle,
        stats: snap.stats,
        progress: None,
        failover_program: None,
        initial_at_ms: None,
        failover_network: (!rec.failover.is_empty()).then(|| rec.failover.clone()),
        rpo_alert_secs: None,
        lag_ms,
        operation: None,
        recovery_points: None,
        last_point_ms: None,
        last_cycle_bytes: None,
        retention: None,
        extended: None,
        libvirt: rec.libvirt.clone(),
        libvirt_jobs: None,
        failover_domains: Vec::new(),
        bandwidth: None,
        group: None,
        fanout: Vec::new(),
        auto_failover: None,
    }
}

/// What the owner compares between events, for a primary VM whose replication is not enabled.
pub fn disabled_observe(vm: &Vm, now: u64) -> Observed {
    let snap = match &vm.rec.machine {
        MachineSnapshot::Primary(s) => s.clone(),
        MachineSnapshot::Replica(_) => PrimarySnapshot::default(),
    };
    let health = primary_health(snap.state, &snap.stats, 0, snap.last_error.as_deref(), now);
    Observed {
        state: snap.state,
        health: health.health,
        reason: health.reason(),
        errors: snap.stats.errors,
        missed: snap.stats.missed_cycles,
        last_error: None,
    }
}
