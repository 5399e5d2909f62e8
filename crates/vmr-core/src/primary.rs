//! The primary side of one VM's replication: when to run a cycle, of which kind, what a
//! success or failure does to the state, retry with backoff, missed-cycle accounting, pause,
//! resume, disable, resynchronization, reconciliation with what the replica holds, and the
//! planned failover's final cycle. Every command returns the actions to carry out or a typed
//! [`Refusal`]; the fields are private, so a driver can only change the machine through events.
//!
//! # States and commands (primary)
//!
//! `-` = refused with [`Refusal::State`] (or the more specific refusal named).
//!
//! | state \ command              | Enable          | StartInitial    | Pause                   | Resume                     | ResumeResync            | Disable  | PrepareFailover             |
//! |------------------------------|-----------------|-----------------|-------------------------|----------------------------|-------------------------|----------|-----------------------------|
//! | Disabled                     | ReadyFor.. (*)  | NotEnabled      | NotEnabled              | NotEnabled                 | NotEnabled              | NotEnabled | NotEnabled                |
//! | ReadyForInitialReplication   | AlreadyEnabled  | InitialInProg.. | Suspended               | -                          | NoInitialCopy           | Disabled | -                           |
//! | InitialReplicationInProgress | AlreadyEnabled  | -               | Suspended (abort cycle) | -                          | NoInitialCopy           | Disabled | -                           |
//! | Replicating                  | AlreadyEnabled  | -               | Suspended (abort cycle) | -                          | Resynchronizing / CycleRunning | Disabled | final cycle, then PreparedForFailover |
//! | Suspended                    | AlreadyEnabled  | -               | -                       | state before the pause     | Resynchronizing         | Disabled | -                           |
//! | Error                        | AlreadyEnabled  | -               | Suspended               | Replicating / ReadyFor..   | Resynchronizing         | Disabled | -                           |
//! | WaitingForStartResynchronize | AlreadyEnabled  | -               | -                       | -                          | Resynchronizing (or at a time) | Disabled | -                     |
//! | Resynchronizing              | AlreadyEnabled  | -               | ResynchronizeSuspended  | -                          | -                       | Disabled | -                           |
//! | ResynchronizeSuspended       | AlreadyEnabled  | -               | -                       | Resynchronizing            | Resynchronizing         | Disabled | -                           |
//! | PreparedForFailover          | AlreadyEnabled  | -               | -                       | -                          | -                       | Disabled | -                           |
//!
//! (*) `Enable` starts initial replication at once (or at `initial_at_ms`). `ResetStats` is
//! accepted in every state. A planned failover's final cycle (`PrepareFailover`) aborts a
//! running cycle first; its success leads to `PreparedForFailover` (no more cycles), its failure
//! is handled like any failed cycle (a retryable one returns to `Replicating` with the error).
//! Driver events (`Tick`, `CycleSucceeded`, `CycleFailed`, `Reconciled`, `ReplicaHas`,
//! `RetargetRunning`, `Restarted`) are never refused for the state; a cycle outcome without
//! a running cycle is refused with [`Refusal::NoCycleRunning`], and so is `Quiesced` (the
//! guest freeze outcome of an app-consistent cycle: never a failed cycle; see
//! [`Event::Quiesced`]).

use vmr_proto::api::{ReplicationState, ReplicationStats};
use vmr_proto::machine::PrimarySnapshot;
use vmr_proto::{CycleId, CycleKind};

use crate::refusal::{Op, Refusal};
pub use crate::schedule::{InitialKind, Schedule};

/// Why a cycle failed, as classified by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Network, peer restart, temporary storage problem: retry with backoff.
    Retryable(String),
    /// Change tracking was lost (capture said `ResyncRequired`).
    ResyncRequired(String),
    /// The replica refused the cycle's base: an incremental cycle asks the replica what it
    /// holds and is retried (a lost acknowledgement is adopted; anything else needs a
    /// resynchronization); a resync compares again; a full cycle needs a resynchronization.
    WrongBase(String),
    /// Not recoverable by retrying (unauthorized, trust group, VM unknown on the replica).
    Fatal(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Retryable(m) | Failure::ResyncRequired(m) | Failure::WrongBase(m) => m,
            Failure::Fatal(m) => m,
        }
    }
}

/// After a failed freeze, the next app-consistent cut is tried no sooner than this (or the
/// app-consistent interval, when shorter): a guest whose agent does not answer costs a freeze
/// timeout only now and then.
pub const QUIESCE_RETRY_MS: u64 = 15 * 60 * 1000;

/// What freezing the guest's file systems around a cut gave (reported by the driver for a
/// cycle started with `app_consistent: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuiesceOutcome {
    /// The cut was taken frozen.
    Frozen {
        /// From the freeze call to the thaw's answer, ms.
        frozen_ms: u64,
        /// The freeze call alone (the guest's hooks and the freeze), ms.
        freeze_call_ms: u64,
    },
    /// The freeze failed or timed out; the cut was crash-consistent.
    Failed {
        /// Why.
        reason: String,
    },
}

/// An input to the machine. Every event carries the current time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Replication enabled; initial replication now or at a time.
    Enable {
        /// Now, ms since the epoch.
        now_ms: u64,
        /// Start initial replication at this time; `None` = at once.
        initial_at_ms: Option<u64>,
    },
    /// `start-initial`: begin initial replication now.
    StartInitial {
        /// Now.
        now_ms: u64,
    },
    /// Time passes.
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// The running cycle was acknowledged by the replica and committed on the primary.
    CycleSucceeded {
        /// Now.
        now_ms: u64,
        /// Bytes shipped.
        bytes: u64,
        /// Whether it was app-consistent.
        app_consistent: bool,
        /// Bytes tracked but not shipped yet, as measured after the commit (`None`: unknown,
        /// the last figure stays).
        pending_bytes: Option<u64>,
        /// The disks' sizes at the cycle's cut (`None`: unchanged).
        disk_sizes: Option<Vec<u64>>,
    },
    /// The running cycle failed (and was aborted, its changes merged back).
    CycleFailed {
        /// Now.
        now_ms: u64,
        /// Classified cause.
        failure: Failure,
    },
    /// The running cycle's guest freeze succeeded or failed (before its outcome). A failed
    /// freeze never fails the cycle: it goes on crash-consistent, the failure is counted, the
    /// next app-consistent cut waits [`QUIESCE_RETRY_MS`] (at most the app-consistent
    /// interval), and health is Warning after [`crate::health::QUIESCE_WARN_AFTER`] failures
    /// in a row. Refused without a running cycle.
    Quiesced {
        /// Now.
        now_ms: u64,
        /// What the freeze gave.
        outcome: QuiesceOutcome,
    },
    /// The changes tracked and not yet replicated were measured (after a failed cycle: they
    /// include the failed cycle's, merged back).
    Pending {
        /// Bytes pending.
        bytes: u64,
    },
    /// Admin pause.
    Pause {
        /// Now.
        now_ms: u64,
    },
    /// Admin resume.
    Resume {
        /// Now.
        now_ms: u64,
    },
    /// Admin `resume --resync [--at]`: start (or schedule) resynchronization. Accepted when
    /// waiting for it, suspended, resync-suspended, in error, or replicating between cycles
    /// (a forced resync).
    ResumeResync {
        /// Now.
        now_ms: u64,
        /// Start at this time instead of now.
        at_ms: Option<u64>,
    },
    /// Admin disable: a running cycle is aborted and change tracking stops.
    Disable {
        /// Now.
        now_ms: u64,
    },
    /// Reset the statistics window.
    ResetStats {
        /// Now.
        now_ms: u64,
    },
    /// Planned failover, first half: ship one final incremental cycle (consistency
    /// `Planned`, [`Action::StartCycle`] with `planned: true`) after aborting a running one;
    /// its success leads to `PreparedForFailover`.
    PrepareFailover {
        /// Now.
        now_ms: u64,
    },
    /// The replica reported the latest cycle it holds (acknowledged, staged or applied).
    /// Reconciles a lost acknowledgement: if the replica holds exactly the next cycle, the
    /// primary adopts it (the capture merged that cycle's changes back, so the next cycle
    /// carries a superset of what is needed). Any other mismatch needs a resync.
    ReplicaHas {
        /// Now.
        now_ms: u64,
        /// The replica's latest cycle.
        latest: Option<CycleId>,
    },
    /// Before running a started cycle the driver asked the replica and learnt `latest`. When
    /// it equals the machine's last cycle nothing changes (carry on with the cycle, no
    /// actions). Otherwise the started cycle is dropped (not counted as a failure), the
    /// replica's answer is applied as with [`Event::ReplicaHas`], and the machine re-plans
    /// (the returned actions may start another cycle). The driver runs the cycle it started
    /// only if [`PrimaryMachine::running_id`] is still that cycle's id.
    Reconciled {
        /// Now.
        now_ms: u64,
        /// The replica's latest cycle.
        latest: Option<CycleId>,
    },
    /// The driver numbers the running resynchronization cycle after the replica's latest
    /// point, which it learns only once the cycle runs; success records this id. Refused
    /// unless a resynchronization cycle is running, or for id 0.
    RetargetRunning {
        /// Now.
        now_ms: u64,
        /// The cycle id to use.
        id: CycleId,
    },
    /// The agent restarted: whatever was running is gone (the driver aborted it).
    Restarted {
        /// Now.
        now_ms: u64,
    },
    /// Admin `verify`: the next incremental cycle (at once when none runs, else as soon as the
    /// running one succeeded) is a verify cycle
    /// ([`Action::StartCycle`] with `verify: true`): it ships its changes as usual, then the
    /// driver compares every block of the cut with the replica's new point and reports with
    /// [`Event::Verified`]. Accepted only while replicating (not during initial replication,
    /// a resync, a pause, an error or a planned failover).
    Verify {
        /// Now.
        now_ms: u64,
    },
    /// A consistency group's cut asks for a cycle now (docs/groups.md): an incremental cycle
    /// starts at once when none runs (nothing when one runs: the driver asks again when it
    /// ends). Accepted only while replicating, like [`Event::Verify`].
    CycleNow {
        /// Now.
        now_ms: u64,
    },
    /// `set --verify-every`: verify this often from now on (ms; 0 = only on demand), checked
    /// by `check_verify_every` first. The next verification is due `every_ms` after the last
    /// one (at once when there was none). Refused when replication is not enabled.
    SetVerifyEvery {
        /// Now.
        now_ms: u64,
        /// The new interval.
        every_ms: u64,
    },
    /// The driver compared a verify cycle's cut with the replica's point (after its
    /// `CycleSucceeded`). A mismatch stops incremental cycles: the VM waits for a
    /// resynchronization (`resume --resync`), which reads the replica's data rather than its
    /// block-hash index, and health is Critical until it succeeded.
    Verified {
        /// Now.
        now_ms: u64,
        /// Blocks that differed (0: the replica matched).
        mismatched_blocks: u64,
        /// `None`: every block matched; `Some(summary)`: what differed.
        mismatch: Option<String>,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run one cycle.
    StartCycle {
        /// Cycle id to use.
        id: CycleId,
        /// The cycle it builds on (`None` for a full copy).
        base: Option<CycleId>,
        /// Full copy, incremental or resynchronization.
        kind: CycleKind,
        /// Freeze the guest's file systems around the cut.
        app_consistent: bool,
        /// A planned failover's final cycle (consistency `Planned`).
        planned: bool,
        /// A verify cycle: after its acknowledgement, compare every block of the cut with
        /// the replica's new point and report [`Event::Verified`].
        verify: bool,
    },
    /// Abort the running cycle (merging its changes back).
    AbortCycle,
    /// Stop change tracking (replication disabled).
    StopTracking,
    /// The persistent part of the machine changed: save [`PrimaryMachine::snapshot`].
    Persist,
    /// Ask the replica which cycle it holds and report it with [`Event::ReplicaHas`] (an
    /// exported initial copy waiting to be imported there).
    QueryReplica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Running {
    id: CycleId,
    kind: CycleKind,
    started_ms: u64,
    planned: bool,
    verify: bool,
}

/// The primary-side machine of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryMachine {
    state: ReplicationState,
    last_cycle: Option<CycleId>,
    disk_sizes: Option<Vec<u64>>,
    stats: ReplicationStats,
    last_error: Option<String>,
    consecutive_failures: u32,
    schedule: Schedule,
    initial_at_ms: Option<u64>,
    paused_from: Option<ReplicationState>,
    next_due_ms: u64,
    /// While replicating on schedule: the start of the oldest interval that no successful
    /// cycle has met and that is not yet counted as missed. Every whole interval that passes
    /// from here without a success counts one missed cycle at that moment, whether a cycle
    /// runs, fails, waits for a retry or cannot start (not persisted, like `next_due_ms`).
    unmet_since_ms: Option<u64>,
    running: Option<Running>,
    /// A verification was asked for (or is due) and has not reported yet (not persisted: a
    /// restart forgets an on-demand one; a scheduled one is due again by its time).
    verify_due: bool,
    /// What the last verification found differing, until a resync succeeded.
    verify_mismatch: Option<String>,
}

impl PrimaryMachine {
    /// A VM with replication disabled.
    pub fn new(schedule: Schedule) -> Self {
        Self::restore(schedule, PrimarySnapshot::default())
    }

    /// Rebuild from a persisted snapshot after an agent restart. A cycle that was running is
    /// gone (feed [`Event::Restarted`] to plan again).
    pub fn restore(schedule: Schedule, snapshot: PrimarySnapshot) -> Self {
        Self {
            state: snapshot.state,
            last_cycle: snapshot.last_cycle,
            disk_sizes: snapshot.disk_sizes,
            stats: snapshot.stats,
            last_error: snapshot.last_error,
            consecutive_failures: 0,
            schedule,
            initial_at_ms: snapshot.initial_at_ms,
            paused_from: snapshot.paused_from,
            next_due_ms: 0,
            unmet_since_ms: None,
            running: None,
            verify_due: false,
            verify_mismatch: snapshot.verify_mismatch,
        }
    }

    /// The persistent part, to save on [`Action::Persist`].
    pub fn snapshot(&self) -> PrimarySnapshot {
        PrimarySnapshot {
            state: self.state,
            last_cycle: self.last_cycle,
            disk_sizes: self.disk_sizes.clone(),
            stats: self.stats.clone(),
            last_error: self.last_error.clone(),
            initial_at_ms: self.initial_at_ms,
            paused_from: self.paused_from,
            verify_mismatch: self.verify_mismatch.clone(),
        }
    }

    /// Reverse replication: this host's failed-over VM becomes the primary, its disks
    /// identical to recovery point `point`. With `resync` (the old primary's disks may differ:
    /// an unplanned failover) a resynchronization starts at once; otherwise incremental
    /// cycles follow `point`.
    pub fn reversed(
        schedule: Schedule,
        now_ms: u64,
        point: CycleId,
        disk_sizes: Vec<u64>,
        resync: bool,
    ) -> Self {
        let mut m = Self::new(schedule);
        m.state = if resync {
            ReplicationState::WaitingForStartResynchronize
        } else {
            ReplicationState::Replicating
        };
        m.last_cycle = Some(point);
        m.disk_sizes = Some(disk_sizes);
        m.stats.window_start_ms = now_ms;
        m.initial_at_ms = resync.then_some(now_ms);
        m.next_due_ms = now_ms;
        m
    }

    /// Current state.
    pub fn state(&self) -> ReplicationState {
        self.state
    }

    /// A verification was asked for (or is due) and has not reported yet.
    pub fn verify_pending(&self) -> bool {
        self.verify_due
    }

    /// When the last verification reported, ms since the epoch.
    pub fn last_verify_ms(&self) -> Option<u64> {
        self.stats.last_verify_ms
    }

    /// What the last verification found differing (until a resynchronization succeeded):
    /// while set, a resynchronization must read the replica's data, not its hash index.
    pub fn verify_mismatch(&self) -> Option<&str> {
        self.verify_mismatch.as_deref()
    }

    /// Whether the running cycle is a verify cycle.
    pub fn running_verify(&self) -> bool {
        self.running.is_some_and(|r| r.verify)
    }

    /// Last cycle acknowledged by the replica and committed.
    pub fn last_cycle(&self) -> Option<CycleId> {
        self.last_cycle
    }

    /// Disk sizes at the last committed cycle.
    pub fn disk_sizes(&self) -> Option<&[u64]> {
        self.disk_sizes.as_deref()
    }

    /// Statistics.
    pub fn stats(&self) -> &ReplicationStats {
        &self.stats
    }

    /// Last error message, if the last attempt failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Consecutive failed attempts.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Scheduling.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// When initial replication is due (ReadyForInitialReplication), or when a scheduled
    /// resynchronization is due (WaitingForStartResynchronize).
    pub fn initial_at_ms(&self) -> Option<u64> {
        self.initial_at_ms
    }

    /// State to return to on resume.
    pub fn paused_from(&self) -> Option<ReplicationState> {
        self.paused_from
    }

    /// Whether a cycle is running, and since when.
    pub fn running_since(&self) -> Option<u64> {
        self.running.map(|r| r.started_ms)
    }

    /// Kind of the running cycle.
    pub fn running_kind(&self) -> Option<CycleKind> {
        self.running.map(|r| r.kind)
    }

    /// Id of the running cycle.
    pub fn running_id(&self) -> Option<CycleId> {
        self.running.map(|r| r.id)
    }

    /// Whether the running cycle is a planned failover's final cycle.
    pub fn preparing_failover(&self) -> bool {
        self.running.is_some_and(|r| r.planned)
    }

    /// When the next cycle is due (ms since the epoch), when one is scheduled.
    pub fn next_due_ms(&self) -> Option<u64> {
        match self.state {
            ReplicationState::Replicating
            | ReplicationState::InitialReplicationInProgress
            | ReplicationState::Resynchronizing
                if self.running.is_none() =>
            {
                Some(self.next_due_ms)
            }
            ReplicationState::ReadyForInitialReplication
            | ReplicationState::WaitingForStartResynchronize => self.initial_at_ms,
            _ => None,
        }
    }

    /// An exported initial copy waits to be imported on the replica.
    pub fn awaiting_import(&self) -> bool {
        self.state == ReplicationState::InitialReplicationInProgress
            && self.schedule.initial == InitialKind::Export
            && self.last_cycle.is_some()
    }

    /// Feed one event; returns the actions to carry out, in order, or why the command is
    /// refused (a refused command changes nothing).
    pub fn step(&mut self, event: Event) -> Result<Vec<Action>, Refusal> {
        use ReplicationState as S;
        let mut out = Vec::new();
        let state = self.state;
        let refuse = |op| Err(Refusal::State { op, state });
        match event {
            Event::Enable {
                now_ms,
                initial_at_ms,
            } => {
                if state != S::Disabled {
                    return Err(Refusal::AlreadyEnabled { state });
                }
                self.stats = ReplicationStats {
                    window_start_ms: now_ms,
                    ..Default::default()
                };
                self.last_cycle = None;
                self.disk_sizes = None;
                self.last_error = None;
                self.consecutive_failures = 0;
                self.paused_from = None;
                self.verify_due = false;
                self.verify_mismatch = None;
                self.initial_at_ms = Some(initial_at_ms.unwrap_or(now_ms));
                self.state = S::ReadyForInitialReplication;
                out.push(Action::Persist);
                self.tick(now_ms, &mut out);
            }
            Event::StartInitial { now_ms } => match state {
                S::ReadyForInitialReplication => {
                    self.initial_at_ms = Some(now_ms);
                    self.tick(now_ms, &mut out);
                }
                S::Disabled => {
                    return Err(Refusal::NotEnabled {
                        op: Op::StartInitial,
                    });
                }
                _ => return refuse(Op::StartInitial),
            },
            Event::Tick { now_ms } => self.tick(now_ms, &mut out),
            Event::Quiesced { now_ms, outcome } => {
                if self.running.is_none() {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                }
                let st = &mut self.stats;
                match outcome {
                    QuiesceOutcome::Frozen {
                        frozen_ms,
                        freeze_call_ms,
                    } => {
                        st.app_consistent_cycles += 1;
                        st.last_frozen_ms = Some(frozen_ms);
                        st.last_freeze_call_ms = Some(freeze_call_ms);
                        st.max_frozen_ms = st.max_frozen_ms.max(frozen_ms);
                        st.total_frozen_ms += frozen_ms;
                        st.consecutive_quiesce_failures = 0;
                        st.last_quiesce_failure_ms = None;
                        st.last_quiesce_error = None;
                    }
                    QuiesceOutcome::Failed { reason } => {
                        st.quiesce_failures += 1;
                        st.consecutive_quiesce_failures =
                            st.consecutive_quiesce_failures.saturating_add(1);
                        st.last_quiesce_failure_ms = Some(now_ms);
                        st.last_quiesce_error = Some(reason);
                        out.push(Action::Persist);
                    }
                }
            }
            Event::CycleSucceeded {
                now_ms,
                bytes,
                app_consistent,
                pending_bytes,
                disk_sizes,
            } => {
                let Some(run) = self.running.take() else {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                };
                self.account_missed(now_ms);
                let latency = now_ms.saturating_sub(run.started_ms);
                let st = &mut self.stats;
                st.successful_cycles += 1;
                st.total_bytes += bytes;
                st.max_bytes = st.max_bytes.max(bytes);
                st.total_latency_ms += latency;
                st.max_latency_ms = st.max_latency_ms.max(latency);
                st.last_replication_ms = Some(now_ms);
                st.last_point_cut_ms = Some(run.started_ms);
                if app_consistent {
                    st.last_app_consistent_ms = Some(now_ms);
                }
                if let Some(p) = pending_bytes {
                    st.pending_bytes = p;
                }
                if disk_sizes.is_some() {
                    self.disk_sizes = disk_sizes;
                }
                self.last_cycle = Some(run.id);
                self.last_error = None;
                self.consecutive_failures = 0;
                if run.planned {
                    // The final cycle of a planned failover: the primary copy is locked.
                    self.state = S::PreparedForFailover;
                    out.push(Action::Persist);
                    return Ok(out);
                }
                let exported = state == S::InitialReplicationInProgress
                    && run.kind == CycleKind::Full
                    && self.schedule.initial == InitialKind::Export;
                if exported {
                    // The copy is on its way by other means: wait for the replica's import.
                    self.next_due_ms = now_ms;
                    out.push(Action::Persist);
                    return Ok(out);
                }
                if matches!(state, S::InitialReplicationInProgress | S::Resynchronizing) {
                    self.state = S::Replicating;
                }
                if run.kind == CycleKind::Resync {
                    // Every block was compared with what the replica holds and the
                    // differing ones were sent: a verification's mismatch is repaired.
                    self.verify_mismatch = None;
                }
                self.next_due_ms = (run.started_ms + self.schedule.frequency_ms).max(now_ms);
                if self.verify_due && !run.verify {
                    // `verify` was asked while this cycle ran: the verify cycle follows now.
                    self.next_due_ms = now_ms;
                }
                // This cycle met the current interval: the next one starts when it is due.
                self.unmet_since_ms = None;
                self.account_missed(now_ms);
                out.push(Action::Persist);
            }
            Event::Pending { bytes } => self.stats.pending_bytes = bytes,
            Event::CycleFailed { now_ms, failure } => {
                let Some(run) = self.running.take() else {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                };
                if self.fail(run, now_ms, failure) {
                    out.push(Action::QueryReplica);
                }
                out.push(Action::Persist);
            }
            Event::Pause { now_ms } => {
                let next = match state {
                    S::Resynchronizing => S::ResynchronizeSuspended,
                    S::Replicating
                    | S::InitialReplicationInProgress
                    | S::ReadyForInitialReplication
                    | S::Error => {
                        self.paused_from = Some(state);
                        S::Suspended
                    }
                    S::Disabled => return Err(Refusal::NotEnabled { op: Op::Pause }),
                    _ => return refuse(Op::Pause),
                };
                self.account_missed(now_ms);
                self.state = next;
                self.account_missed(now_ms);
                if self.running.take().is_some() {
                    out.push(Action::AbortCycle);
                }
                out.push(Action::Persist);
            }
            Event::Resume { now_ms } => {
                match state {
                    S::ResynchronizeSuspended => self.state = S::Resynchronizing,
                    S::Suspended => {
                        self.state = match self.paused_from.take() {
                            Some(S::Error) | None => self.after_error(),
                            Some(s) => s,
                        };
                    }
                    S::Error => {
                        self.state = self.after_error();
                        self.last_error = None;
                    }
                    S::Disabled => return Err(Refusal::NotEnabled { op: Op::Resume }),
                    _ => return refuse(Op::Resume),
                }
                self.next_due_ms = now_ms;
                self.consecutive_failures = 0;
                out.push(Action::Persist);
                self.tick(now_ms, &mut out);
            }
            Event::ResumeResync { now_ms, at_ms } => {
                let op = Op::ResumeResync;
                match state {
                    S::WaitingForStartResynchronize
                    | S::Suspended
                    | S::ResynchronizeSuspended
                    | S::Error => {
                        if self.last_cycle.is_none() {
                            return Err(Refusal::NoInitialCopy { op });
                        }
                    }
                    S::Replicating if self.running.is_some() => {
                        return Err(Refusal::CycleRunning { op });
                    }
                    S::Replicating => {}
                    S::ReadyForInitialReplication | S::InitialReplicationInProgress => {
                        return Err(Refusal::NoInitialCopy { op });
                    }
                    S::Disabled => return Err(Refusal::NotEnabled { op }),
                    _ => return refuse(op),
                }
                self.paused_from = None;
                self.consecutive_failures = 0;
                match at_ms.filter(|t| *t > now_ms) {
                    Some(t) => {
                        self.state = S::WaitingForStartResynchronize;
                        self.initial_at_ms = Some(t);
                    }
                    None => {
                        self.state = S::Resynchronizing;
                        self.initial_at_ms = None;
                        self.next_due_ms = now_ms;
                    }
                }
                out.push(Action::Persist);
                self.tick(now_ms, &mut out);
            }
            Event::Disable { now_ms } => {
                if state == S::Disabled {
                    return Err(Refusal::NotEnabled { op: Op::Disable });
                }
                self.account_missed(now_ms);
                if self.running.take().is_some() {
                    out.push(Action::AbortCycle);
                }
                self.state = S::Disabled;
                self.unmet_since_ms = None;
                self.last_cycle = None;
                self.disk_sizes = None;
                self.paused_from = None;
                self.initial_at_ms = None;
                self.last_error = None;
                self.consecutive_failures = 0;
                out.push(Action::StopTracking);
                out.push(Action::Persist);
            }
            Event::ResetStats { now_ms } => {
                self.stats = ReplicationStats {
                    window_start_ms: now_ms,
                    last_replication_ms: self.stats.last_replication_ms,
                    last_app_consistent_ms: self.stats.last_app_consistent_ms,
                    last_point_cut_ms: self.stats.last_point_cut_ms,
                    last_verify_ms: self.stats.last_verify_ms,
                    last_verify_mismatched_blocks: self.stats.last_verify_mismatched_blocks,
                    pending_bytes: self.stats.pending_bytes,
                    ..Default::default()
                };
                out.push(Action::Persist);
            }
            Event::PrepareFailover { now_ms } => {
                crate::failover::failover_transition(
                    vmr_proto::api::ReplicationMode::Primary,
                    state,
                    Op::Prepare,
                    self.last_cycle.is_some(),
                )?;
                if let Some(run) = self.running {
                    if run.planned {
                        return Err(Refusal::CycleRunning { op: Op::Prepare });
                    }
                    self.running = None;
                    self.account_missed(now_ms);
                    out.push(Action::AbortCycle);
                }
                self.start(now_ms, CycleKind::Incremental, true, &mut out);
            }
            Event::ReplicaHas { now_ms, latest } => self.replica_has(now_ms, latest, &mut out),
            Event::Reconciled { now_ms, latest } => {
                if latest == self.last_cycle && !self.awaiting_import() {
                    return Ok(out);
                }
                let planned = self.running.take().is_some_and(|r| r.planned);
                self.replica_has(now_ms, latest, &mut out);
                if self.running.is_none() {
                    if planned && self.state == S::Replicating {
                        self.start(now_ms, CycleKind::Incremental, true, &mut out);
                    } else {
                        self.tick(now_ms, &mut out);
                    }
                }
            }
            Event::RetargetRunning { now_ms: _, id: 0 } => {
                return Err(Refusal::BadCycleId { id: 0 });
            }
            Event::RetargetRunning { now_ms: _, id } => match self.running.as_mut() {
                Some(r) if r.kind == CycleKind::Resync => r.id = id,
                Some(_) => return Err(Refusal::NotResync),
                None => {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                }
            },
            Event::Restarted { now_ms } => {
                self.running = None;
                self.next_due_ms = now_ms;
                if state == S::InitialReplicationInProgress && self.last_cycle.is_none() {
                    // The full copy restarts from the beginning.
                    self.initial_at_ms = Some(now_ms);
                }
                self.tick(now_ms, &mut out);
            }
            Event::Verify { now_ms } => {
                match state {
                    S::Disabled => return Err(Refusal::NotEnabled { op: Op::Verify }),
                    S::Replicating if !self.preparing_failover() => {}
                    _ => return refuse(Op::Verify),
                }
                self.verify_due = true;
                if self.running.is_none() {
                    self.account_missed(now_ms);
                    self.start(now_ms, CycleKind::Incremental, false, &mut out);
                }
            }
            Event::CycleNow { now_ms } => {
                match state {
                    S::Disabled => return Err(Refusal::NotEnabled { op: Op::CycleNow }),
                    S::Replicating if !self.preparing_failover() => {}
                    _ => return refuse(Op::CycleNow),
                }
                if self.running.is_none() {
                    self.account_missed(now_ms);
                    self.start(now_ms, CycleKind::Incremental, false, &mut out);
                }
            }
            Event::SetVerifyEvery {
                now_ms: _,
                every_ms,
            } => {
                if state == S::Disabled {
                    return Err(Refusal::NotEnabled {
                        op: Op::SetVerifyEvery,
                    });
                }
                self.schedule.verify_every_ms = every_ms;
            }
            Event::Verified {
                now_ms,
                mismatched_blocks,
                mismatch,
            } => {
                self.verify_due = false;
                self.stats.last_verify_ms = Some(now_ms);
                self.stats.last_verify_mismatched_blocks = Some(mismatched_blocks);
                if let Some(m) = mismatch {
                    self.last_error = Some(format!(
                        "verification found the replica differing from the primary: {m}; \
                         `resume --resync` repairs it"
                    ));
                    self.verify_mismatch = Some(m);
                    if self.state == S::Replicating {
                        self.state = S::WaitingForStartResynchronize;
                        self.initial_at_ms = None;
                        self.account_missed(now_ms);
                    }
                }
                out.push(Action::Persist);
            }
        }
        if self.state != S::Replicating {
            self.verify_due = false;
        }
        Ok(out)
    }

    /// Where `resume` leads from an error: replicating if a copy exists, else initial
    /// replication again.
    fn after_error(&self) -> ReplicationState {
        if self.last_cycle.is_some() {
            ReplicationState::Replicating
        } else {
            ReplicationState::ReadyForInitialReplication
        }
    }

    /// Record a failed cycle; true when the replica must be asked what it holds (an
    /// incremental cycle whose base it refused: most often its acknowledgement was lost while
    /// the replica still committed it, and the replica's answer adopts that cycle).
    fn fail(&mut self, run: Running, now_ms: u64, failure: Failure) -> bool {
        use ReplicationState as S;
        self.account_missed(now_ms);
        self.stats.errors += 1;
        self.consecutive_failures += 1;
        self.last_error = Some(if run.planned {
            format!(
                "the planned failover's final cycle failed: {}",
                failure.message()
            )
        } else {
            failure.message().to_owned()
        });
        // A resync compares against whatever the replica holds: a refused base or lost
        // tracking just means comparing again.
        // An incremental cycle's refused base is not a lost change: the replica holds another
        // point than the primary thinks. Retried after the replica's answer (`ReplicaHas`),
        // which adopts the cycle the replica committed without acknowledging it, or asks for a
        // resynchronization when the replica holds anything else. (The driver also asks before
        // every incremental cycle.)
        let ask = run.kind == CycleKind::Incremental && matches!(failure, Failure::WrongBase(_));
        let failure = match failure {
            Failure::ResyncRequired(m) | Failure::WrongBase(m) if run.kind == CycleKind::Resync => {
                Failure::Retryable(m)
            }
            Failure::WrongBase(m) if ask => Failure::Retryable(m),
            f => f,
        };
        match failure {
            Failure::Retryable(_) => {
                let shift = self.consecutive_failures.saturating_sub(1).min(16);
                let delay = self
                    .schedule
                    .retry_base_ms
                    .saturating_mul(1u64 << shift)
                    .min(self.schedule.retry_max_ms);
                self.next_due_ms = now_ms + delay;
            }
            Failure::ResyncRequired(_) | Failure::WrongBase(_) => {
                self.state = S::WaitingForStartResynchronize;
                self.initial_at_ms = None;
            }
            Failure::Fatal(_) => self.state = S::Error,
        }
        ask
    }

    fn replica_has(&mut self, now_ms: u64, latest: Option<CycleId>, out: &mut Vec<Action>) {
        use ReplicationState as S;
        if self.awaiting_import() {
            if latest.is_some() && latest >= self.last_cycle {
                // Imported (or the replica moved past it: the next cycle resyncs).
                self.state = S::Replicating;
                self.next_due_ms = now_ms;
                out.push(Action::Persist);
                self.tick(now_ms, out);
            }
            return;
        }
        if self.running.is_some() || latest == self.last_cycle {
            return;
        }
        let next = self.last_cycle.map_or(1, |c| c + 1);
        if latest == Some(next) {
            self.last_cycle = latest;
            if self.state == S::InitialReplicationInProgress {
                self.state = S::Replicating;
                self.next_due_ms = now_ms;
            }
            out.push(Action::Persist);
        } else if matches!(self.state, S::Replicating | S::Suspended) {
            self.state = S::WaitingForStartResynchronize;
            self.paused_from = None;
            self.initial_at_ms = None;
            self.last_error = Some(format!(
                "the replica holds cycle {latest:?} but the primary's last cycle is {:?}",
                self.last_cycle
            ));
            out.push(Action::Persist);
        }
    }

    fn initial_cycle_kind(&self) -> CycleKind {
        match self.schedule.initial {
            InitialKind::Existing => CycleKind::Resync,
            InitialKind::Network | InitialKind::Export => CycleKind::Full,
        }
    }

    /// Count the intervals missed up to `now_ms` (see `unmet_since_ms`). Only the incremental
    /// cadence of a replicating VM has intervals to miss: in any other state nothing is counted
    /// and the count starts afresh when the VM replicates again.
    fn account_missed(&mut self, now_ms: u64) {
        if self.state != ReplicationState::Replicating {
            self.unmet_since_ms = None;
            return;
        }
        let every = self.schedule.miss_interval_ms().max(1);
        let since = self
            .unmet_since_ms
            .get_or_insert(self.next_due_ms.max(now_ms));
        if now_ms >= *since + every {
            let n = (now_ms - *since) / every;
            self.stats.missed_cycles += n;
            *since += n * every;
        }
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        use ReplicationState as S;
        self.account_missed(now_ms);
        if self.running.is_some() {
            return;
        }
        match self.state {
            S::ReadyForInitialReplication if self.initial_at_ms.is_some_and(|t| t <= now_ms) => {
                self.state = S::InitialReplicationInProgress;
                self.next_due_ms = now_ms;
                out.push(Action::Persist);
                self.start(now_ms, self.initial_cycle_kind(), false, out);
            }
            S::InitialReplicationInProgress if self.next_due_ms <= now_ms => {
                if self.awaiting_import() {
                    self.next_due_ms = now_ms + self.schedule.frequency_ms.clamp(5_000, 60_000);
                    out.push(Action::QueryReplica);
                } else {
                    self.start(now_ms, self.initial_cycle_kind(), false, out);
                }
            }
            S::Replicating if self.next_due_ms <= now_ms => {
                let every = self.schedule.verify_every_ms;
                if every > 0
                    && self
                        .stats
                        .last_verify_ms
                        .is_none_or(|t| now_ms.saturating_sub(t) >= every)
                {
                    self.verify_due = true;
                }
                self.start(now_ms, CycleKind::Incremental, false, out);
            }
            S::WaitingForStartResynchronize
                if self.initial_at_ms.is_some_and(|t| t <= now_ms)
                    || (self.initial_at_ms.is_none()
                        && self.last_cycle.is_some()
                        && self
                            .schedule
                            .auto_resync
                            .is_some_and(|w| w.contains(now_ms))) =>
            {
                self.state = S::Resynchronizing;
                self.initial_at_ms = None;
                self.next_due_ms = now_ms;
                out.push(Action::Persist);
                self.start(now_ms, CycleKind::Resync, false, out);
            }
            S::Resynchronizing if self.next_due_ms <= now_ms => {
                self.start(now_ms, CycleKind::Resync, false, out);
            }
            _ => {}
        }
    }

    fn start(&mut self, now_ms: u64, kind: CycleKind, planned: bool, out: &mut Vec<Action>) {
        let id = self.last_cycle.map_or(1, |c| c + 1);
        let base = if kind == CycleKind::Full {
            None
        } else {
            self.last_cycle
        };
        // The first app-consistent cut is the first incremental cycle after the full copy,
        // then one every `every`; after a failed freeze, not before the retry delay.
        let every = self.schedule.app_consistent_every_ms;
        let app_consistent = every > 0
            && !planned
            && kind == CycleKind::Incremental
            && self
                .stats
                .last_app_consistent_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= every)
            && self
                .stats
                .last_quiesce_failure_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= every.min(QUIESCE_RETRY_MS));
        // A verify cycle is an incremental cycle (never app-consistent: the guest is not
        // frozen for a cycle whose comparison reads every disk afterwards).
        let verify = self.verify_due && kind == CycleKind::Incremental && !planned;
        let app_consistent = app_consistent && !verify;
        self.running = Some(Running {
            id,
            kind,
            started_ms: now_ms,
            planned,
            verify,
        });
        out.push(Action::StartCycle {
            id,
            base,
            kind,
            app_consistent,
            planned,
            verify,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;
    use vmr_proto::api::{Health, ResyncWindow};
    use vmr_proto::machine::PrimarySnapshot;

    const F: u64 = 30_000;

    /// Feed an event that must be accepted.
    trait Run {
        fn run(&mut self, e: Event) -> Vec<Action>;
    }

    impl Run for PrimaryMachine {
        fn run(&mut self, e: Event) -> Vec<Action> {
            let what = format!("{e:?} in {}", self.state());
            self.step(e)
                .unwrap_or_else(|r| panic!("{what} refused: {r}"))
        }
    }

    fn enabled() -> PrimaryMachine {
        let mut m = PrimaryMachine::new(Schedule::every(F));
        let a = m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        assert_eq!(
            a.last(),
            Some(&Action::StartCycle {
                id: 1,
                base: None,
                kind: CycleKind::Full,
                app_consistent: false,
                planned: false,
                verify: false,
            })
        );
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        m
    }

    fn start_of(a: &[Action]) -> Option<(CycleId, Option<CycleId>, CycleKind)> {
        a.iter().find_map(|x| match x {
            Action::StartCycle { id, base, kind, .. } => Some((*id, *base, *kind)),
            _ => None,
        })
    }

    /// States in which time passing must start no cycle (what end-to-end tests used to check
    /// by sleeping): paused, locked for a planned failover, disabled, in a fatal error,
    /// initial replication scheduled for later, a resynchronization waiting for the admin.
    #[test]
    fn idle_states_start_nothing_as_time_passes() {
        use vmr_proto::machine::PrimarySnapshot;
        let later = 10 * 3_600_000;
        let table: &[(S, Option<u64>, &str)] = &[
            (S::Suspended, None, "paused"),
            (
                S::PreparedForFailover,
                None,
                "locked after the planned failover's final cycle",
            ),
            (S::Disabled, None, "disabled"),
            (S::Error, None, "stopped by a fatal error"),
            (
                S::ReadyForInitialReplication,
                Some(later),
                "initial replication scheduled later",
            ),
            (
                S::WaitingForStartResynchronize,
                None,
                "waiting for `resume --resync`",
            ),
        ];
        for &(state, initial_at_ms, what) in table {
            let mut m = PrimaryMachine::restore(
                Schedule::every(F),
                PrimarySnapshot {
                    state,
                    last_cycle: Some(3),
                    initial_at_ms,
                    ..Default::default()
                },
            );
            let mut now = 1_000;
            while now < later - F {
                let acts = m
                    .step(Event::Tick { now_ms: now })
                    .expect("a tick is never refused");
                assert!(
                    start_of(&acts).is_none(),
                    "{what}: a tick at {now} ms started a cycle: {acts:?}"
                );
                assert_eq!(m.state(), state, "{what}: a tick changed the state");
                now += F / 3;
            }
        }
    }

    #[test]
    fn initial_then_incremental_on_schedule() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 10_000,
            bytes: 100,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(m.last_cycle(), Some(1));
        assert!(start_of(&m.run(Event::Tick { now_ms: 29_999 })).is_none());
        assert_eq!(
            start_of(&m.run(Event::Tick { now_ms: 30_000 })),
            Some((2, Some(1), CycleKind::Incremental))
        );
        // While running, no second cycle starts.
        assert!(start_of(&m.run(Event::Tick { now_ms: 45_000 })).is_none());
        m.run(Event::CycleSucceeded {
            now_ms: 31_000,
            bytes: 50,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.stats().successful_cycles, 2);
        assert_eq!(m.stats().max_bytes, 100);
        assert_eq!(m.next_due_ms(), Some(60_000));
    }

    #[test]
    fn a_group_cut_starts_a_cycle_now_only_while_replicating_and_idle() {
        // Not enabled: refused.
        let mut m = PrimaryMachine::new(Schedule::every(F));
        assert!(matches!(
            m.step(Event::CycleNow { now_ms: 1 }),
            Err(Refusal::NotEnabled { op: Op::CycleNow })
        ));
        // Initial replication running: refused, nothing changes.
        let mut m = enabled();
        assert!(matches!(
            m.step(Event::CycleNow { now_ms: 2 }),
            Err(Refusal::State {
                op: Op::CycleNow,
                ..
            })
        ));
        m.run(Event::CycleSucceeded {
            now_ms: 10_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        // Replicating and idle: at once, long before it is due.
        let a = m.run(Event::CycleNow { now_ms: 10_001 });
        assert_eq!(start_of(&a), Some((2, Some(1), CycleKind::Incremental)));
        // A cycle runs: nothing more.
        assert!(start_of(&m.run(Event::CycleNow { now_ms: 10_002 })).is_none());
        assert_eq!(m.running_id(), Some(2));
        // Paused: refused.
        m.run(Event::Pause { now_ms: 10_003 });
        assert!(m.step(Event::CycleNow { now_ms: 10_004 }).is_err());
    }

    #[test]
    fn scheduled_initial_replication_waits() {
        let mut m = PrimaryMachine::new(Schedule::every(F));
        let a = m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: Some(100_000),
        });
        assert!(start_of(&a).is_none());
        assert_eq!(m.state(), S::ReadyForInitialReplication);
        assert!(start_of(&m.run(Event::Tick { now_ms: 99_999 })).is_none());
        assert_eq!(
            start_of(&m.run(Event::Tick { now_ms: 100_000 })).map(|s| s.2),
            Some(CycleKind::Full)
        );
    }

    #[test]
    fn start_initial_overrides_schedule() {
        let mut m = PrimaryMachine::new(Schedule::every(F));
        m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: Some(1_000_000),
        });
        assert!(start_of(&m.run(Event::StartInitial { now_ms: 5 })).is_some());
    }

    #[test]
    fn slow_cycle_counts_missed_slots() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        m.run(Event::Tick { now_ms: 30_000 });
        m.run(Event::Tick { now_ms: 60_000 }); // one interval late
        m.run(Event::Tick { now_ms: 95_000 }); // two
        m.run(Event::CycleSucceeded {
            now_ms: 100_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.stats().missed_cycles, 2);
        // Next cycle starts at once: the schedule slipped.
        assert!(start_of(&m.run(Event::Tick { now_ms: 100_000 })).is_some());
    }

    /// A link that stays cut: every attempt fails and waits for its retry, and each interval
    /// that passes without a success is counted missed when it ends, not when the link heals.
    #[test]
    fn an_outage_counts_each_missed_interval_as_it_passes() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        let mut now = 30_000; // the next cycle is due
        let mut missed_seen = Vec::new();
        while now < 30_000 + 270_000 {
            if start_of(&m.run(Event::Tick { now_ms: now })).is_some() {
                m.run(Event::CycleFailed {
                    now_ms: now + 100,
                    failure: Failure::Retryable("connection refused".into()),
                });
            }
            if now % F == 0 {
                missed_seen.push(m.stats().missed_cycles);
            }
            now += 200;
        }
        // 4.5 minutes at 30 s: the eight whole intervals that ended without a success, counted
        // one by one as each ended.
        assert_eq!(m.stats().missed_cycles, 8);
        assert_eq!(missed_seen[..4], [0, 1, 2, 3]);
        let h = m.health(now);
        assert_eq!(h.health, vmr_proto::api::Health::Critical);
        assert!(h.reason().contains("missed"), "{}", h.reason());
    }

    /// What is pending is measured at every failure, not only after a success.
    #[test]
    fn pending_is_measured_at_a_failure() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: Some(3 << 20),
            disk_sizes: None,
        });
        assert!(start_of(&m.run(Event::Tick { now_ms: 30_000 })).is_some());
        m.run(Event::Pending { bytes: 256 << 20 });
        m.run(Event::CycleFailed {
            now_ms: 30_100,
            failure: Failure::Retryable("connection refused".into()),
        });
        assert_eq!(m.stats().pending_bytes, 256 << 20);
    }

    /// A cycle that hangs (a cut link not yet noticed) counts its missed intervals while it runs.
    #[test]
    fn a_hung_cycle_counts_missed_intervals_while_it_runs() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert!(start_of(&m.run(Event::Tick { now_ms: 30_000 })).is_some());
        m.run(Event::Tick { now_ms: 59_999 });
        assert_eq!(m.stats().missed_cycles, 0);
        m.run(Event::Tick { now_ms: 60_000 });
        assert_eq!(m.stats().missed_cycles, 1);
        m.run(Event::Tick { now_ms: 95_000 });
        assert_eq!(m.stats().missed_cycles, 2);
    }

    /// After an agent restart nothing of the time it was down is counted as missed at once
    /// (the schedule restarts from the moment the agent runs again).
    #[test]
    fn a_restored_machine_counts_from_now() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        let mut r = PrimaryMachine::restore(Schedule::every(F), m.snapshot());
        r.run(Event::Tick { now_ms: 10_000_000 });
        assert_eq!(r.stats().missed_cycles, 0);
    }

    #[test]
    fn retryable_failure_backs_off_and_keeps_ids() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(
            start_of(&m.run(Event::Tick { now_ms: 30_000 })),
            Some((2, Some(1), CycleKind::Incremental))
        );
        m.run(Event::CycleFailed {
            now_ms: 30_100,
            failure: Failure::Retryable("net".into()),
        });
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(m.consecutive_failures(), 1);
        assert!(start_of(&m.run(Event::Tick { now_ms: 31_000 })).is_none());
        assert_eq!(
            start_of(&m.run(Event::Tick { now_ms: 31_100 })),
            Some((2, Some(1), CycleKind::Incremental))
        );
        m.run(Event::CycleFailed {
            now_ms: 31_200,
            failure: Failure::Retryable("net".into()),
        });
        // Second failure: 2 s.
        assert!(start_of(&m.run(Event::Tick { now_ms: 33_100 })).is_none());
        assert!(start_of(&m.run(Event::Tick { now_ms: 33_200 })).is_some());
        m.run(Event::CycleSucceeded {
            now_ms: 34_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.consecutive_failures(), 0);
        assert_eq!(m.stats().errors, 2);
        assert_eq!(m.last_cycle(), Some(2));
    }

    #[test]
    fn a_refused_base_asks_the_replica_which_adopts_an_unacknowledged_cycle_or_resyncs() {
        // The acknowledgement of cycle 2 was lost while the replica committed it; the retry
        // (cycle 2 again, on base 1) is refused: the replica's answer decides.
        for (latest, want, adopted) in [
            (Some(2), S::Replicating, Some(2)),
            (Some(1), S::Replicating, Some(1)),
            (Some(5), S::WaitingForStartResynchronize, Some(1)),
            (None, S::WaitingForStartResynchronize, Some(1)),
        ] {
            let mut m = enabled();
            m.run(Event::CycleSucceeded {
                now_ms: 1_000,
                bytes: 1,
                app_consistent: false,
                pending_bytes: None,
                disk_sizes: None,
            });
            let a = m.run(Event::Tick { now_ms: 30_000 });
            assert_eq!(start_of(&a).map(|s| (s.0, s.1)), Some((2, Some(1))));
            let a = m.run(Event::CycleFailed {
                now_ms: 30_001,
                failure: Failure::WrongBase("base 1 != 2".into()),
            });
            assert!(a.contains(&Action::QueryReplica), "{a:?}");
            assert_eq!(m.state(), S::Replicating, "not a resync yet");
            m.run(Event::ReplicaHas {
                now_ms: 30_002,
                latest,
            });
            assert_eq!((m.state(), m.last_cycle()), (want, adopted), "{latest:?}");
            if want == S::Replicating {
                let next = adopted.map_or(1, |c| c + 1);
                let a = m.run(Event::Tick { now_ms: 1_000_000 });
                assert_eq!(start_of(&a).map(|s| (s.0, s.1)), Some((next, adopted)));
            }
        }
    }

    #[test]
    fn failures_by_class() {
        let table = [
            (
                Failure::ResyncRequired("bitmap inconsistent".into()),
                S::WaitingForStartResynchronize,
            ),
            (Failure::Fatal("unauthorized".into()), S::Error),
        ];
        for (failure, want) in table {
            let mut m = enabled();
            m.run(Event::CycleSucceeded {
                now_ms: 1_000,
                bytes: 1,
                app_consistent: false,
                pending_bytes: None,
                disk_sizes: None,
            });
            m.run(Event::Tick { now_ms: 30_000 });
            m.run(Event::CycleFailed {
                now_ms: 30_001,
                failure,
            });
            assert_eq!(m.state(), want);
            assert!(
                start_of(&m.run(Event::Tick { now_ms: 1_000_000 })).is_none(),
                "{want:?} must not retry"
            );
        }
    }

    #[test]
    fn pause_aborts_and_resume_continues() {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        m.run(Event::Tick { now_ms: 30_000 });
        let a = m.run(Event::Pause { now_ms: 30_500 });
        assert!(a.contains(&Action::AbortCycle));
        assert_eq!(m.state(), S::Suspended);
        assert!(start_of(&m.run(Event::Tick { now_ms: 90_000 })).is_none());
        let a = m.run(Event::Resume { now_ms: 100_000 });
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(start_of(&a), Some((2, Some(1), CycleKind::Incremental)));
    }

    #[test]
    fn disable_stops_tracking() {
        let mut m = enabled();
        let a = m.run(Event::Disable { now_ms: 0 });
        assert_eq!(
            a,
            vec![Action::AbortCycle, Action::StopTracking, Action::Persist]
        );
        assert_eq!(m.state(), S::Disabled);
        assert!(m.run(Event::Tick { now_ms: 1_000_000 }).is_empty());
    }

    #[test]
    fn restart_mid_initial_restarts_full_copy() {
        let mut m = enabled();
        let mut r = PrimaryMachine::restore(*m.schedule(), m.snapshot());
        let a = r.run(Event::Restarted { now_ms: 5_000 });
        assert_eq!(start_of(&a), Some((1, None, CycleKind::Full)));
        // The original machine is unaffected.
        assert!(m.run(Event::Tick { now_ms: 5_000 }).is_empty());
    }

    #[test]
    fn lost_ack_is_adopted_and_divergence_needs_resync() {
        let mut m = enabled();
        m.run(Event::CycleFailed {
            now_ms: 10,
            failure: Failure::Retryable("ack lost".into()),
        });
        // The replica did receive the full copy.
        let a = m.run(Event::ReplicaHas {
            now_ms: 20,
            latest: Some(1),
        });
        assert_eq!(a, vec![Action::Persist]);
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(m.last_cycle(), Some(1));
        assert_eq!(
            start_of(&m.run(Event::Tick { now_ms: 20 })),
            Some((2, Some(1), CycleKind::Incremental))
        );
        m.run(Event::CycleSucceeded {
            now_ms: 30,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        // Same view: nothing to do.
        assert!(
            m.run(Event::ReplicaHas {
                now_ms: 40,
                latest: Some(2)
            })
            .is_empty()
        );
        // The replica lost data: resync.
        m.run(Event::ReplicaHas {
            now_ms: 50,
            latest: Some(1),
        });
        assert_eq!(m.state(), S::WaitingForStartResynchronize);
    }

    /// Replicating, then tracking lost at t=30 001: waiting for a resync.
    fn needs_resync() -> PrimaryMachine {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        m.run(Event::Tick { now_ms: 30_000 });
        m.run(Event::CycleFailed {
            now_ms: 30_001,
            failure: Failure::ResyncRequired("bitmap missing".into()),
        });
        assert_eq!(m.state(), S::WaitingForStartResynchronize);
        m
    }

    #[test]
    fn resync_table() {
        // (events after needs_resync, expected state, expected start kind of the last event)
        type Case = (&'static str, Vec<Event>, S, Option<CycleKind>);
        let cases: Vec<Case> = vec![
            (
                "waits without a command",
                vec![Event::Tick { now_ms: 10_000_000 }],
                S::WaitingForStartResynchronize,
                None,
            ),
            (
                "resume --resync starts at once",
                vec![Event::ResumeResync {
                    now_ms: 40_000,
                    at_ms: None,
                }],
                S::Resynchronizing,
                Some(CycleKind::Resync),
            ),
            (
                "scheduled resync waits for its time",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: Some(100_000),
                    },
                    Event::Tick { now_ms: 99_999 },
                ],
                S::WaitingForStartResynchronize,
                None,
            ),
            (
                "scheduled resync starts when due",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: Some(100_000),
                    },
                    Event::Tick { now_ms: 100_000 },
                ],
                S::Resynchronizing,
                Some(CycleKind::Resync),
            ),
            (
                "pause suspends the resync",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: None,
                    },
                    Event::Pause { now_ms: 41_000 },
                    Event::Tick { now_ms: 10_000_000 },
                ],
                S::ResynchronizeSuspended,
                None,
            ),
            (
                "resume continues the resync",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: None,
                    },
                    Event::Pause { now_ms: 41_000 },
                    Event::Resume { now_ms: 50_000 },
                ],
                S::Resynchronizing,
                Some(CycleKind::Resync),
            ),
            (
                "a failed resync is retried, not abandoned",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: None,
                    },
                    Event::CycleFailed {
                        now_ms: 40_100,
                        failure: Failure::WrongBase("base moved".into()),
                    },
                    Event::Tick { now_ms: 41_100 },
                ],
                S::Resynchronizing,
                Some(CycleKind::Resync),
            ),
            (
                "a successful resync returns to replicating",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: None,
                    },
                    Event::CycleSucceeded {
                        now_ms: 45_000,
                        bytes: 10,
                        app_consistent: false,
                        pending_bytes: None,
                        disk_sizes: None,
                    },
                    Event::Tick { now_ms: 75_000 },
                ],
                S::Replicating,
                Some(CycleKind::Incremental),
            ),
            (
                "restart mid-resync restarts it",
                vec![
                    Event::ResumeResync {
                        now_ms: 40_000,
                        at_ms: None,
                    },
                    Event::Restarted { now_ms: 60_000 },
                ],
                S::Resynchronizing,
                Some(CycleKind::Resync),
            ),
        ];
        for (what, events, state, kind) in cases {
            let mut m = needs_resync();
            let mut last = Vec::new();
            for e in events {
                last = m.run(e);
            }
            assert_eq!(m.state(), state, "{what}");
            assert_eq!(start_of(&last).map(|s| s.2), kind, "{what}");
        }
    }

    #[test]
    fn initial_from_an_existing_copy_is_a_resync() {
        let mut sched = Schedule::every(F);
        sched.initial = InitialKind::Existing;
        let mut m = PrimaryMachine::new(sched);
        let a = m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        assert_eq!(start_of(&a), Some((1, None, CycleKind::Resync)));
        // The replica's point moved meanwhile: compare again, do not give up.
        m.run(Event::CycleFailed {
            now_ms: 100,
            failure: Failure::WrongBase("base moved".into()),
        });
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        let a = m.run(Event::Tick { now_ms: 1_100 });
        assert_eq!(start_of(&a).map(|s| s.2), Some(CycleKind::Resync));
        // No copy on the replica at all: a clear error, then resume tries again.
        m.run(Event::CycleFailed {
            now_ms: 1_200,
            failure: Failure::Fatal("the replica holds no copy".into()),
        });
        assert_eq!(m.state(), S::Error);
        let a = m.run(Event::Resume { now_ms: 2_000 });
        assert_eq!(start_of(&a).map(|s| s.2), Some(CycleKind::Resync));
        m.run(Event::RetargetRunning { now_ms: 0, id: 7 });
        m.run(Event::CycleSucceeded {
            now_ms: 3_000,
            bytes: 10,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!((m.state(), m.last_cycle()), (S::Replicating, Some(7)));
        let a = m.run(Event::Tick { now_ms: 3_000 + F });
        assert_eq!(start_of(&a), Some((8, Some(7), CycleKind::Incremental)));
    }

    #[test]
    fn exported_initial_copy_waits_for_the_import() {
        let mut sched = Schedule::every(F);
        sched.initial = InitialKind::Export;
        let mut m = PrimaryMachine::new(sched);
        let a = m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        assert_eq!(start_of(&a), Some((1, None, CycleKind::Full)));
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 10,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        assert!(m.awaiting_import());
        // No cycle is started while waiting; the replica is asked now and then.
        let a = m.run(Event::Tick { now_ms: 1_000 });
        assert_eq!(a, vec![Action::QueryReplica]);
        assert!(m.run(Event::Tick { now_ms: 1_500 }).is_empty());
        let a = m.run(Event::ReplicaHas {
            now_ms: 2_000,
            latest: None,
        });
        assert!(a.is_empty());
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        // A restart keeps waiting (the copy is not exported again).
        let a = m.run(Event::Restarted { now_ms: 3_000 });
        assert_eq!(a, vec![Action::QueryReplica]);
        // Imported: incremental cycles from the exported one, carrying what changed meanwhile.
        let a = m.run(Event::ReplicaHas {
            now_ms: 4_000,
            latest: Some(1),
        });
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(start_of(&a), Some((2, Some(1), CycleKind::Incremental)));
    }

    #[test]
    fn auto_resync_window_table() {
        const H: u64 = 3_600_000;
        // Cycles at 00:00:01 UTC of a day; the window is Hyper-V's 18:30-06:00.
        let day = 20_000 * 24 * H;
        // (what, window, tick time after the failure, expected state)
        type Case = (&'static str, Option<ResyncWindow>, u64, S);
        let cases: Vec<Case> = vec![
            (
                "no window: waits for the admin",
                None,
                day + 20 * H,
                S::WaitingForStartResynchronize,
            ),
            (
                "outside the window: waits",
                Some(ResyncWindow::HYPERV_DEFAULT),
                day + 12 * H,
                S::WaitingForStartResynchronize,
            ),
            (
                "inside the window (evening): starts",
                Some(ResyncWindow::HYPERV_DEFAULT),
                day + 19 * H,
                S::Resynchronizing,
            ),
            (
                "inside the window (after midnight): starts",
                Some(ResyncWindow::HYPERV_DEFAULT),
                day + 24 * H + 2 * H,
                S::Resynchronizing,
            ),
        ];
        for (what, window, at, state) in cases {
            let mut sched = Schedule::every(30_000);
            sched.auto_resync = window;
            let mut m = PrimaryMachine::new(sched);
            m.run(Event::Enable {
                now_ms: day,
                initial_at_ms: None,
            });
            m.run(Event::CycleSucceeded {
                now_ms: day + 1_000,
                bytes: 1,
                app_consistent: false,
                pending_bytes: None,
                disk_sizes: None,
            });
            m.run(Event::Tick {
                now_ms: day + 30_000,
            });
            m.run(Event::CycleFailed {
                now_ms: day + 30_001,
                failure: Failure::ResyncRequired("bitmap missing".into()),
            });
            assert_eq!(m.state(), S::WaitingForStartResynchronize, "{what}");
            let acts = m.run(Event::Tick { now_ms: at });
            assert_eq!(m.state(), state, "{what}");
            let kind = (state == S::Resynchronizing).then_some(CycleKind::Resync);
            assert_eq!(start_of(&acts).map(|s| s.2), kind, "{what}");
        }
        // A paused resync is not restarted by the window; nor is a VM never replicated.
        let mut sched = Schedule::every(30_000);
        sched.auto_resync = Some(ResyncWindow::parse("00:00-00:00").expect("window"));
        let mut m = PrimaryMachine::new(sched);
        m.run(Event::Enable {
            now_ms: day,
            initial_at_ms: Some(day + 10 * H),
        });
        m.run(Event::Tick { now_ms: day + H });
        assert_eq!(m.state(), S::ReadyForInitialReplication);
    }

    #[test]
    fn resync_cycle_numbering_and_forced_resync() {
        let mut m = needs_resync();
        let a = m.run(Event::ResumeResync {
            now_ms: 40_000,
            at_ms: None,
        });
        assert_eq!(start_of(&a), Some((2, Some(1), CycleKind::Resync)));
        // The replica held cycle 4 already: the driver numbers the resync 5.
        m.run(Event::RetargetRunning { now_ms: 0, id: 5 });
        m.run(Event::CycleSucceeded {
            now_ms: 41_000,
            bytes: 10,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.last_cycle(), Some(5));
        assert_eq!(m.stats().total_bytes, 11);
        // Id 0 is refused.
        m.run(Event::ResumeResync {
            now_ms: 41_100,
            at_ms: None,
        });
        assert_eq!(
            m.step(Event::RetargetRunning { now_ms: 0, id: 0 }),
            Err(Refusal::BadCycleId { id: 0 })
        );
        m.run(Event::CycleSucceeded {
            now_ms: 41_200,
            bytes: 0,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        assert_eq!(m.last_cycle(), Some(6));
        // A forced resync while replicating between cycles.
        let a = m.run(Event::ResumeResync {
            now_ms: 41_500,
            at_ms: None,
        });
        assert_eq!(start_of(&a), Some((7, Some(6), CycleKind::Resync)));
        // Not accepted before initial replication or while a cycle runs.
        let mut fresh = PrimaryMachine::new(Schedule::every(F));
        assert_eq!(
            fresh.step(Event::ResumeResync {
                now_ms: 1,
                at_ms: None
            }),
            Err(Refusal::NotEnabled {
                op: Op::ResumeResync
            })
        );
        let mut busy = enabled();
        assert_eq!(
            busy.step(Event::ResumeResync {
                now_ms: 1,
                at_ms: None
            }),
            Err(Refusal::NoInitialCopy {
                op: Op::ResumeResync
            })
        );
        assert_eq!(busy.state(), S::InitialReplicationInProgress);
    }

    #[test]
    fn app_consistent_every_interval() {
        let mut s = Schedule::every(F);
        s.app_consistent_every_ms = 3_600_000;
        let mut m = PrimaryMachine::new(s);
        m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        m.run(Event::CycleSucceeded {
            now_ms: 1,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        let a = m.run(Event::Tick { now_ms: 30_000 });
        assert!(matches!(
            a.last(),
            Some(Action::StartCycle {
                app_consistent: true,
                ..
            })
        ));
        m.run(Event::CycleSucceeded {
            now_ms: 30_001,
            bytes: 1,
            app_consistent: true,
            pending_bytes: None,
            disk_sizes: None,
        });
        let a = m.run(Event::Tick { now_ms: 60_000 });
        assert!(matches!(
            a.last(),
            Some(Action::StartCycle {
                app_consistent: false,
                ..
            })
        ));
        let a = m.run(Event::Tick { now_ms: 0 });
        assert!(a.is_empty());
    }

    /// Which cycles ask for a freeze, and what freeze outcomes do, as a table: each row is
    /// (time of the tick that starts a cycle, the freeze outcome reported or `None` when the
    /// cycle is not asked to freeze, whether the cut is expected app-consistent).
    #[test]
    fn quiesce_table() {
        const H: u64 = 3_600_000;
        let mut s = Schedule::every(F);
        s.app_consistent_every_ms = 4 * H;
        let mut m = PrimaryMachine::new(s);
        m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        // the full copy never freezes
        m.run(Event::CycleSucceeded {
            now_ms: 1,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        let fail = |r: &str| {
            Some(QuiesceOutcome::Failed {
                reason: r.to_owned(),
            })
        };
        let ok = |ms| {
            Some(QuiesceOutcome::Frozen {
                frozen_ms: ms,
                freeze_call_ms: ms / 2,
            })
        };
        #[allow(clippy::type_complexity)]
        let table: Vec<(u64, bool, Option<QuiesceOutcome>, u32, Health)> = vec![
            // the first incremental cycle after enable is app-consistent; its freeze fails
            (F, true, fail("agent timeout"), 1, Health::Normal),
            // retried only after QUIESCE_RETRY_MS
            (2 * F, false, None, 1, Health::Normal),
            (
                F + QUIESCE_RETRY_MS,
                true,
                fail("agent timeout"),
                2,
                Health::Normal,
            ),
            (
                F + 2 * QUIESCE_RETRY_MS,
                true,
                fail("frozen hook"),
                3,
                Health::Warning,
            ),
            (
                F + 2 * QUIESCE_RETRY_MS + F,
                false,
                None,
                3,
                Health::Warning,
            ),
            // a success resets the failures and the health
            (F + 3 * QUIESCE_RETRY_MS, true, ok(40), 0, Health::Normal),
            // then one every 4 h after the last app-consistent point
            (F + 3 * QUIESCE_RETRY_MS + F, false, None, 0, Health::Normal),
            (
                F + 3 * QUIESCE_RETRY_MS + 4 * H + 2,
                true,
                ok(60),
                0,
                Health::Normal,
            ),
        ];
        for (now, asked, outcome, fails, health) in table {
            let a = m.run(Event::Tick { now_ms: now });
            let got = a.iter().find_map(|x| match x {
                Action::StartCycle { app_consistent, .. } => Some(*app_consistent),
                _ => None,
            });
            assert_eq!(got, Some(asked), "at {now}: {a:?}");
            let frozen = matches!(outcome, Some(QuiesceOutcome::Frozen { .. }));
            if let Some(o) = outcome {
                let failed = matches!(o, QuiesceOutcome::Failed { .. });
                let acts = m.run(Event::Quiesced {
                    now_ms: now,
                    outcome: o,
                });
                assert_eq!(acts.contains(&Action::Persist), failed, "at {now}");
            }
            m.run(Event::CycleSucceeded {
                now_ms: now + 2,
                bytes: 1,
                app_consistent: frozen,
                pending_bytes: None,
                disk_sizes: None,
            });
            assert_eq!(m.stats().consecutive_quiesce_failures, fails, "at {now}");
            // (the long gaps between the ticks also count missed cycles: look at this reason)
            let h = m.health(now + 3);
            let warned = h
                .reasons
                .iter()
                .any(|r| r.contains("app-consistent points are failing"));
            assert_eq!(warned, health == Health::Warning, "at {now}: {h:?}");
            if warned {
                assert!(h.health >= Health::Warning);
            }
            assert_eq!(
                m.state(),
                S::Replicating,
                "a failed freeze never stops replication"
            );
        }
        let st = m.stats();
        assert_eq!(st.app_consistent_cycles, 2);
        assert_eq!(st.quiesce_failures, 3);
        assert_eq!(
            (st.last_frozen_ms, st.max_frozen_ms, st.total_frozen_ms),
            (Some(60), 60, 100)
        );
        assert_eq!(st.last_quiesce_error, None);
        // without a running cycle the report is refused and changes nothing
        let before = m.clone();
        assert!(matches!(
            m.step(Event::Quiesced {
                now_ms: 1,
                outcome: QuiesceOutcome::Frozen {
                    frozen_ms: 1,
                    freeze_call_ms: 1,
                },
            }),
            Err(Refusal::NoCycleRunning { .. })
        ));
        assert_eq!(m, before);
    }

    /// A planned failover's final cycle and a resync never freeze.
    #[test]
    fn planned_and_resync_never_freeze() {
        let mut s = Schedule::every(F);
        s.app_consistent_every_ms = 3_600_000;
        let mut m = PrimaryMachine::new(s);
        m.run(Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        });
        m.run(Event::CycleSucceeded {
            now_ms: 1,
            bytes: 1,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        let a = m.run(Event::PrepareFailover { now_ms: 10 });
        assert!(a.iter().any(|x| matches!(
            x,
            Action::StartCycle {
                planned: true,
                app_consistent: false,
                ..
            }
        )));
    }

    /// A machine restored in `state` between cycles (last cycle 3 once initial replication is
    /// done; paused from Replicating).
    fn in_state(state: S) -> PrimaryMachine {
        let done = !matches!(
            state,
            S::Disabled | S::ReadyForInitialReplication | S::InitialReplicationInProgress
        );
        PrimaryMachine::restore(
            Schedule::every(F),
            PrimarySnapshot {
                state,
                last_cycle: done.then_some(3),
                initial_at_ms: (state == S::ReadyForInitialReplication).then_some(u64::MAX),
                paused_from: (state == S::Suspended).then_some(S::Replicating),
                ..Default::default()
            },
        )
    }

    /// The admin commands of the table, in column order.
    #[derive(Debug, Clone, Copy)]
    enum Cmd {
        Enable,
        StartInitial,
        Pause,
        Resume,
        ResumeResync,
        Disable,
        PrepareFailover,
        ResetStats,
    }

    const COMMANDS: [Cmd; 8] = [
        Cmd::Enable,
        Cmd::StartInitial,
        Cmd::Pause,
        Cmd::Resume,
        Cmd::ResumeResync,
        Cmd::Disable,
        Cmd::PrepareFailover,
        Cmd::ResetStats,
    ];

    fn command(cmd: Cmd, now_ms: u64) -> Event {
        match cmd {
            Cmd::Enable => Event::Enable {
                now_ms,
                initial_at_ms: None,
            },
            Cmd::StartInitial => Event::StartInitial { now_ms },
            Cmd::Pause => Event::Pause { now_ms },
            Cmd::Resume => Event::Resume { now_ms },
            Cmd::ResumeResync => Event::ResumeResync {
                now_ms,
                at_ms: None,
            },
            Cmd::Disable => Event::Disable { now_ms },
            Cmd::PrepareFailover => Event::PrepareFailover { now_ms },
            Cmd::ResetStats => Event::ResetStats { now_ms },
        }
    }

    #[test]
    fn state_command_table() {
        type Want = Result<S, Refusal>;
        let st = |op, state| Err(Refusal::State { op, state });
        let ne = |op| Err(Refusal::NotEnabled { op });
        let ae = |state| Err(Refusal::AlreadyEnabled { state });
        let nic = |op| Err(Refusal::NoInitialCopy { op });
        use Op as O;
        // Columns: Enable, StartInitial, Pause, Resume, ResumeResync, Disable, PrepareFailover,
        // ResetStats.
        let table: Vec<(S, [Want; 8])> = vec![
            (
                S::Disabled,
                [
                    Ok(S::InitialReplicationInProgress),
                    ne(O::StartInitial),
                    ne(O::Pause),
                    ne(O::Resume),
                    ne(O::ResumeResync),
                    ne(O::Disable),
                    ne(O::Prepare),
                    Ok(S::Disabled),
                ],
            ),
            (
                S::ReadyForInitialReplication,
                [
                    ae(S::ReadyForInitialReplication),
                    Ok(S::InitialReplicationInProgress),
                    Ok(S::Suspended),
                    st(O::Resume, S::ReadyForInitialReplication),
                    nic(O::ResumeResync),
                    Ok(S::Disabled),
                    st(O::Prepare, S::ReadyForInitialReplication),
                    Ok(S::ReadyForInitialReplication),
                ],
            ),
            (
                S::InitialReplicationInProgress,
                [
                    ae(S::InitialReplicationInProgress),
                    st(O::StartInitial, S::InitialReplicationInProgress),
                    Ok(S::Suspended),
                    st(O::Resume, S::InitialReplicationInProgress),
                    nic(O::ResumeResync),
                    Ok(S::Disabled),
                    st(O::Prepare, S::InitialReplicationInProgress),
                    Ok(S::InitialReplicationInProgress),
                ],
            ),
            (
                S::Replicating,
                [
                    ae(S::Replicating),
                    st(O::StartInitial, S::Replicating),
                    Ok(S::Suspended),
                    st(O::Resume, S::Replicating),
                    Ok(S::Resynchronizing),
                    Ok(S::Disabled),
                    Ok(S::Replicating), // the final cycle runs
                    Ok(S::Replicating),
                ],
            ),
            (
                S::Suspended,
                [
                    ae(S::Suspended),
                    st(O::StartInitial, S::Suspended),
                    st(O::Pause, S::Suspended),
                    Ok(S::Replicating),
                    Ok(S::Resynchronizing),
                    Ok(S::Disabled),
                    st(O::Prepare, S::Suspended),
                    Ok(S::Suspended),
                ],
            ),
            (
                S::Error,
                [
                    ae(S::Error),
                    st(O::StartInitial, S::Error),
                    Ok(S::Suspended),
                    Ok(S::Replicating),
                    Ok(S::Resynchronizing),
                    Ok(S::Disabled),
                    st(O::Prepare, S::Error),
                    Ok(S::Error),
                ],
            ),
            (
                S::WaitingForStartResynchronize,
                [
                    ae(S::WaitingForStartResynchronize),
                    st(O::StartInitial, S::WaitingForStartResynchronize),
                    st(O::Pause, S::WaitingForStartResynchronize),
                    st(O::Resume, S::WaitingForStartResynchronize),
                    Ok(S::Resynchronizing),
                    Ok(S::Disabled),
                    st(O::Prepare, S::WaitingForStartResynchronize),
                    Ok(S::WaitingForStartResynchronize),
                ],
            ),
            (
                S::Resynchronizing,
                [
                    ae(S::Resynchronizing),
                    st(O::StartInitial, S::Resynchronizing),
                    Ok(S::ResynchronizeSuspended),
                    st(O::Resume, S::Resynchronizing),
                    st(O::ResumeResync, S::Resynchronizing),
                    Ok(S::Disabled),
                    st(O::Prepare, S::Resynchronizing),
                    Ok(S::Resynchronizing),
                ],
            ),
            (
                S::ResynchronizeSuspended,
                [
                    ae(S::ResynchronizeSuspended),
                    st(O::StartInitial, S::ResynchronizeSuspended),
                    st(O::Pause, S::ResynchronizeSuspended),
                    Ok(S::Resynchronizing),
                    Ok(S::Resynchronizing),
                    Ok(S::Disabled),
                    st(O::Prepare, S::ResynchronizeSuspended),
                    Ok(S::ResynchronizeSuspended),
                ],
            ),
            (
                S::PreparedForFailover,
                [
                    ae(S::PreparedForFailover),
                    st(O::StartInitial, S::PreparedForFailover),
                    st(O::Pause, S::PreparedForFailover),
                    st(O::Resume, S::PreparedForFailover),
                    st(O::ResumeResync, S::PreparedForFailover),
                    Ok(S::Disabled),
                    st(O::Prepare, S::PreparedForFailover),
                    Ok(S::PreparedForFailover),
                ],
            ),
        ];
        let mut checked = 0;
        for (state, wants) in table {
            for (op, want) in COMMANDS.into_iter().zip(wants) {
                let mut m = in_state(state);
                let before = m.clone();
                let got = m.step(command(op, 1_000)).map(|_| m.state());
                assert_eq!(got, want, "{state} x {op:?}");
                if got.is_err() {
                    assert_eq!(m, before, "{state} x {op:?}: a refusal changed the machine");
                    // The message names the state or the missing precondition.
                    let msg = got.expect_err("refused").to_string();
                    assert!(!msg.is_empty());
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 80);
    }

    #[test]
    fn commands_while_a_cycle_runs() {
        let mut m = in_state(S::Replicating);
        assert!(start_of(&m.run(Event::Tick { now_ms: 1 })).is_some());
        let before = m.clone();
        assert_eq!(
            m.step(Event::ResumeResync {
                now_ms: 2,
                at_ms: None
            }),
            Err(Refusal::CycleRunning {
                op: Op::ResumeResync
            })
        );
        assert_eq!(m, before);
        let a = m.run(Event::Pause { now_ms: 3 });
        assert_eq!(a, vec![Action::AbortCycle, Action::Persist]);
        assert_eq!(m.state(), S::Suspended);
        assert_eq!(m.running_since(), None);
    }

    #[test]
    fn refusal_messages_name_the_state() {
        let mut m = in_state(S::PreparedForFailover);
        let e = m.step(Event::Pause { now_ms: 1 }).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "pause is not allowed while the VM is PreparedForFailover"
        );
        let mut m = in_state(S::Replicating);
        let e = m
            .step(Event::Enable {
                now_ms: 1,
                initial_at_ms: None,
            })
            .expect_err("refused");
        assert!(
            e.to_string().contains("already enabled (Replicating)"),
            "{e}"
        );
    }

    fn replicating() -> PrimaryMachine {
        let mut m = enabled();
        m.run(Event::CycleSucceeded {
            now_ms: 1_000,
            bytes: 10,
            app_consistent: false,
            pending_bytes: Some(7),
            disk_sizes: Some(vec![100, 200]),
        });
        assert_eq!(m.state(), S::Replicating);
        m
    }

    #[test]
    fn cycle_success_records_pending_bytes_and_disk_sizes() {
        let mut m = replicating();
        assert_eq!(m.stats().pending_bytes, 7);
        assert_eq!(m.disk_sizes(), Some(&[100, 200][..]));
        m.run(Event::Tick { now_ms: 30_000 });
        m.run(Event::CycleSucceeded {
            now_ms: 31_000,
            bytes: 5,
            app_consistent: false,
            pending_bytes: None,
            disk_sizes: None,
        });
        // Unknown figures keep the last ones.
        assert_eq!(m.stats().pending_bytes, 7);
        assert_eq!(m.disk_sizes(), Some(&[100, 200][..]));
        assert_eq!(m.stats().total_bytes, 15);
        assert_eq!(m.snapshot().disk_sizes, Some(vec![100, 200]));
        // A stale outcome is refused and changes nothing.
        let before = m.clone();
        assert!(matches!(
            m.step(Event::CycleSucceeded {
                now_ms: 32_000,
                bytes: 5,
                app_consistent: false,
                pending_bytes: Some(1),
                disk_sizes: None,
            }),
            Err(Refusal::NoCycleRunning { .. })
        ));
        assert_eq!(m, before);
    }

    fn planned_of(a: &[Action]) -> Option<(CycleId, Option<CycleId>, bool)> {
        a.iter().find_map(|x| match x {
            Action::StartCycle {
                id, base, planned, ..
            } => Some((*id, *base, *planned)),
            _ => None,
        })
    }

    #[test]
    fn planned_failover_ships_a_final_cycle_then_locks() {
        let mut m = replicating();
        // A regular cycle is running: it is aborted, the final cycle takes its place.
        m.run(Event::Tick { now_ms: 30_000 });
        let a = m.run(Event::PrepareFailover { now_ms: 30_500 });
        assert_eq!(a.first(), Some(&Action::AbortCycle));
        assert_eq!(planned_of(&a), Some((2, Some(1), true)));
        assert!(m.preparing_failover());
        // A second prepare waits for the first.
        assert_eq!(
            m.step(Event::PrepareFailover { now_ms: 30_600 }),
            Err(Refusal::CycleRunning { op: Op::Prepare })
        );
        // Ticks do not start anything else.
        assert!(m.run(Event::Tick { now_ms: 90_000 }).is_empty());
        let a = m.run(Event::CycleSucceeded {
            now_ms: 91_000,
            bytes: 3,
            app_consistent: false,
            pending_bytes: Some(0),
            disk_sizes: None,
        });
        assert_eq!(a, vec![Action::Persist]);
        assert_eq!(m.state(), S::PreparedForFailover);
        assert_eq!(m.last_cycle(), Some(2));
        assert_eq!(m.stats().successful_cycles, 2);
        // No more cycles.
        assert!(m.run(Event::Tick { now_ms: 10_000_000 }).is_empty());
        assert!(m.run(Event::Restarted { now_ms: 10_000_001 }).is_empty());
        // The new primary's handover is planned only for exactly this point.
        assert!(
            m.become_replica(1, 2, crate::handover::LocalCopy::Absent)
                .expect("handover")
                .planned
        );
        assert!(
            !m.become_replica(1, 1, crate::handover::LocalCopy::Absent)
                .expect("handover")
                .planned
        );
        let h = m
            .become_replica(5, 2, crate::handover::LocalCopy::Absent)
            .expect("handover");
        assert_eq!(h.replica.state(), S::Replicating);
        assert_eq!(h.replica.last_cycle(), Some(2));
    }

    #[test]
    fn planned_failover_failure_returns_to_replicating() {
        let mut m = replicating();
        let a = m.run(Event::PrepareFailover { now_ms: 2_000 });
        assert_eq!(planned_of(&a), Some((2, Some(1), true)));
        m.run(Event::CycleFailed {
            now_ms: 2_500,
            failure: Failure::Retryable("replica unreachable".into()),
        });
        assert_eq!(m.state(), S::Replicating);
        assert!(!m.preparing_failover());
        assert!(
            m.last_error()
                .is_some_and(|e| e.contains("final cycle") && e.contains("unreachable")),
            "{:?}",
            m.last_error()
        );
        // Regular cycles resume (not planned ones).
        let a = m.run(Event::Tick { now_ms: 60_000 });
        assert_eq!(planned_of(&a), Some((2, Some(1), false)));
        // Not before initial replication.
        let mut fresh = enabled();
        assert_eq!(
            fresh.step(Event::PrepareFailover { now_ms: 1 }),
            Err(Refusal::State {
                op: Op::Prepare,
                state: S::InitialReplicationInProgress
            })
        );
    }

    #[test]
    fn reconciled_replans_without_counting_a_failure() {
        let mut m = replicating();
        let a = m.run(Event::Tick { now_ms: 30_000 });
        assert_eq!(start_of(&a), Some((2, Some(1), CycleKind::Incremental)));
        // Same view: carry on with the started cycle.
        assert!(
            m.run(Event::Reconciled {
                now_ms: 30_001,
                latest: Some(1)
            })
            .is_empty()
        );
        assert_eq!(m.running_id(), Some(2));
        // The replica holds cycle 2 already (a lost acknowledgement): adopt, start 3 at once.
        let a = m.run(Event::Reconciled {
            now_ms: 30_002,
            latest: Some(2),
        });
        assert_eq!(start_of(&a), Some((3, Some(2), CycleKind::Incremental)));
        assert_eq!(m.last_cycle(), Some(2));
        assert_eq!(m.stats().errors, 0);
        assert_eq!(m.consecutive_failures(), 0);
        assert_eq!(m.last_error(), None);
        // The replica lost data: resync required, nothing started.
        let a = m.run(Event::Reconciled {
            now_ms: 30_003,
            latest: Some(1),
        });
        assert_eq!(start_of(&a), None);
        assert_eq!(m.state(), S::WaitingForStartResynchronize);
        assert_eq!(m.running_since(), None);
        assert_eq!(m.stats().errors, 0);
    }

    #[test]
    fn reconciled_during_prepare_keeps_preparing() {
        let mut m = replicating();
        m.run(Event::PrepareFailover { now_ms: 2_000 });
        let a = m.run(Event::Reconciled {
            now_ms: 2_001,
            latest: Some(2),
        });
        assert_eq!(planned_of(&a), Some((3, Some(2), true)));
        assert!(m.preparing_failover());
    }

    #[test]
    fn retarget_only_renumbers_a_running_resync() {
        let mut m = replicating();
        assert!(matches!(
            m.step(Event::RetargetRunning { now_ms: 1, id: 9 }),
            Err(Refusal::NoCycleRunning { .. })
        ));
        m.run(Event::Tick { now_ms: 30_000 });
        let before = m.clone();
        assert_eq!(
            m.step(Event::RetargetRunning { now_ms: 1, id: 9 }),
            Err(Refusal::NotResync)
        );
        assert_eq!(m, before);
    }

    #[test]
    fn disable_twice_is_refused_and_reenable_starts_over() {
        let mut m = replicating();
        m.run(Event::Disable { now_ms: 5_000 });
        assert_eq!(m.snapshot().last_cycle, None);
        assert_eq!(m.disk_sizes(), None);
        assert_eq!(
            m.step(Event::Disable { now_ms: 5_001 }),
            Err(Refusal::NotEnabled { op: Op::Disable })
        );
        let a = m.run(Event::Enable {
            now_ms: 6_000,
            initial_at_ms: None,
        });
        assert_eq!(start_of(&a), Some((1, None, CycleKind::Full)));
    }

    #[test]
    fn snapshot_round_trip_drops_the_running_cycle() {
        let mut m = replicating();
        m.run(Event::Tick { now_ms: 30_000 });
        m.run(Event::Pause { now_ms: 31_000 });
        m.run(Event::Resume { now_ms: 32_000 });
        assert!(m.running_since().is_some());
        let snap = m.snapshot();
        let r = PrimaryMachine::restore(*m.schedule(), snap.clone());
        assert_eq!(r.running_since(), None);
        assert_eq!(r.snapshot(), snap);
        assert_eq!(r.state(), S::Replicating);
        assert_eq!(r.last_cycle(), Some(1));
    }

    #[test]
    fn reversed_primary_continues_or_resyncs() {
        let mut m = PrimaryMachine::reversed(Schedule::every(F), 1_000, 7, vec![10], false);
        assert_eq!(m.state(), S::Replicating);
        let a = m.run(Event::Restarted { now_ms: 1_000 });
        assert_eq!(start_of(&a), Some((8, Some(7), CycleKind::Incremental)));
        let mut m = PrimaryMachine::reversed(Schedule::every(F), 1_000, 7, vec![10], true);
        assert_eq!(m.state(), S::WaitingForStartResynchronize);
        let a = m.run(Event::Restarted { now_ms: 1_000 });
        assert_eq!(start_of(&a), Some((8, Some(7), CycleKind::Resync)));
        assert_eq!(m.state(), S::Resynchronizing);
        // A disabled primary cannot hand over.
        let d = PrimaryMachine::new(Schedule::every(F));
        assert_eq!(
            d.become_replica(1, 1, crate::handover::LocalCopy::Absent),
            Err(Refusal::NotEnabled {
                op: Op::BecomeReplica
            })
        );
    }
}

#[cfg(test)]
mod verify_tests {
    //! `verify`: when it may run, the verify cycle, its outcome, the resync that repairs a
    //! mismatch, and `--verify-every`.
    use super::*;
    use ReplicationState as S;
    use vmr_proto::api::Health;
    use vmr_proto::machine::PrimarySnapshot;

    const F: u64 = 30_000;

    fn restored(state: S, schedule: Schedule) -> PrimaryMachine {
        let done = !matches!(
            state,
            S::Disabled | S::ReadyForInitialReplication | S::InitialReplicationInProgress
        );
        PrimaryMachine::restore(
            schedule,
            PrimarySnapshot {
                state,
                last_cycle: done.then_some(3),
                initial_at_ms: (state == S::ReadyForInitialReplication).then_some(u64::MAX),
                paused_from: (state == S::Suspended).then_some(S::Replicating),
                ..Default::default()
            },
        )
    }

    fn verify_start(a: &[Action]) -> Option<(CycleId, Option<CycleId>, CycleKind, bool)> {
        a.iter().find_map(|x| match x {
            Action::StartCycle {
                id,
                base,
                kind,
                verify,
                ..
            } => Some((*id, *base, *kind, *verify)),
            _ => None,
        })
    }

    fn ok(m: &mut PrimaryMachine, e: Event) -> Vec<Action> {
        m.step(e.clone())
            .unwrap_or_else(|r| panic!("{e:?} refused: {r}"))
    }

    fn succeed(m: &mut PrimaryMachine, now_ms: u64) {
        ok(
            m,
            Event::CycleSucceeded {
                now_ms,
                bytes: 1,
                app_consistent: false,
                pending_bytes: None,
                disk_sizes: None,
            },
        );
    }

    /// Which states accept `verify`: only Replicating between or during cycles, and not
    /// while a planned failover's final cycle runs.
    #[test]
    fn verify_state_table() {
        let table: &[(S, Result<(), Refusal>)] = &[
            (S::Replicating, Ok(())),
            (S::Disabled, Err(Refusal::NotEnabled { op: Op::Verify })),
            (
                S::ReadyForInitialReplication,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::ReadyForInitialReplication,
                }),
            ),
            (
                S::InitialReplicationInProgress,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::InitialReplicationInProgress,
                }),
            ),
            (
                S::Suspended,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::Suspended,
                }),
            ),
            (
                S::Error,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::Error,
                }),
            ),
            (
                S::WaitingForStartResynchronize,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::WaitingForStartResynchronize,
                }),
            ),
            (
                S::Resynchronizing,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::Resynchronizing,
                }),
            ),
            (
                S::ResynchronizeSuspended,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::ResynchronizeSuspended,
                }),
            ),
            (
                S::PreparedForFailover,
                Err(Refusal::State {
                    op: Op::Verify,
                    state: S::PreparedForFailover,
                }),
            ),
        ];
        for (state, want) in table {
            let mut m = restored(*state, Schedule::every(F));
            let before = m.clone();
            match (m.step(Event::Verify { now_ms: 5_000 }), want) {
                (Ok(a), Ok(())) => {
                    assert_eq!(
                        verify_start(&a),
                        Some((4, Some(3), CycleKind::Incremental, true)),
                        "{state}"
                    );
                    assert!(m.verify_pending() && m.running_verify(), "{state}");
                }
                (Err(r), Err(w)) => {
                    assert_eq!(&r, w, "{state}");
                    assert_eq!(m, before, "a refused verify changes nothing ({state})");
                }
                (got, want) => panic!("{state}: got {got:?}, want {want:?}"),
            }
        }
        // Not during a planned failover's final cycle.
        let mut m = restored(S::Replicating, Schedule::every(F));
        ok(&mut m, Event::PrepareFailover { now_ms: 1 });
        assert_eq!(
            m.step(Event::Verify { now_ms: 2 }),
            Err(Refusal::State {
                op: Op::Verify,
                state: S::Replicating
            })
        );
    }

    /// A matching verify: the cycle is a normal incremental cycle marked `verify`, never
    /// app-consistent; its report keeps the VM replicating and records the time.
    #[test]
    fn matching_verify_keeps_replicating() {
        let mut s = Schedule::every(F);
        s.app_consistent_every_ms = 1;
        let mut m = restored(S::Replicating, s);
        let a = ok(&mut m, Event::Verify { now_ms: 10_000 });
        assert!(a.iter().any(|x| matches!(
            x,
            Action::StartCycle {
                verify: true,
                app_consistent: false,
                ..
            }
        )));
        succeed(&mut m, 11_000);
        assert!(m.verify_pending(), "pending until the comparison reports");
        ok(
            &mut m,
            Event::Verified {
                now_ms: 12_000,
                mismatched_blocks: 0,
                mismatch: None,
            },
        );
        assert_eq!(m.state(), S::Replicating);
        assert!(!m.verify_pending());
        assert_eq!(m.last_verify_ms(), Some(12_000));
        assert_eq!(m.verify_mismatch(), None);
        // The next scheduled cycle is an ordinary one.
        let a = ok(&mut m, Event::Tick { now_ms: 50_000 });
        assert_eq!(
            verify_start(&a),
            Some((5, Some(4), CycleKind::Incremental, false))
        );
    }

    /// A mismatch: Critical, no more incremental cycles, `resume --resync` runs a resync that
    /// must read the replica's data, and its success repairs it.
    #[test]
    fn mismatch_waits_for_a_resync_that_repairs_it() {
        let mut m = restored(S::Replicating, Schedule::every(F));
        ok(&mut m, Event::Verify { now_ms: 10_000 });
        succeed(&mut m, 11_000);
        let a = ok(
            &mut m,
            Event::Verified {
                now_ms: 12_000,
                mismatched_blocks: 1,
                mismatch: Some("disk0: 1 of 512 blocks differ".into()),
            },
        );
        assert!(a.contains(&Action::Persist));
        assert_eq!(m.state(), S::WaitingForStartResynchronize);
        assert_eq!(m.verify_mismatch(), Some("disk0: 1 of 512 blocks differ"));
        assert_eq!(m.stats().last_verify_mismatched_blocks, Some(1));
        // `measure --reset` keeps the last verification.
        ok(&mut m, Event::ResetStats { now_ms: 12_500 });
        assert_eq!(m.stats().last_verify_mismatched_blocks, Some(1));
        assert_eq!(m.last_verify_ms(), Some(12_000));
        let h = crate::primary_health(
            m.state(),
            m.stats(),
            m.consecutive_failures(),
            m.last_error(),
            13_000,
        );
        assert_eq!(h.health, Health::Critical);
        assert!(
            h.reason().contains("1 of 512 blocks differ"),
            "{}",
            h.reason()
        );
        // Time passing starts nothing, and verify is refused meanwhile.
        assert!(ok(&mut m, Event::Tick { now_ms: 500_000 }).is_empty());
        assert!(m.step(Event::Verify { now_ms: 500_001 }).is_err());
        // The mark survives a restart.
        let mut m = PrimaryMachine::restore(Schedule::every(F), m.snapshot());
        assert_eq!(m.verify_mismatch(), Some("disk0: 1 of 512 blocks differ"));
        let a = ok(
            &mut m,
            Event::ResumeResync {
                now_ms: 600_000,
                at_ms: None,
            },
        );
        assert_eq!(
            verify_start(&a),
            Some((5, Some(4), CycleKind::Resync, false))
        );
        // A failed resync keeps the mark.
        ok(
            &mut m,
            Event::CycleFailed {
                now_ms: 600_100,
                failure: Failure::Retryable("network".into()),
            },
        );
        assert!(m.verify_mismatch().is_some());
        let a = ok(&mut m, Event::Tick { now_ms: 700_000 });
        assert_eq!(verify_start(&a).map(|x| x.2), Some(CycleKind::Resync));
        succeed(&mut m, 700_500);
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(m.verify_mismatch(), None);
    }

    /// `verify` while a cycle runs marks the next cycle; a failed verify cycle is retried as a
    /// verify cycle; a pause forgets the request.
    #[test]
    fn verify_during_a_cycle_failure_and_pause() {
        let mut m = restored(S::Replicating, Schedule::every(F));
        let a = ok(&mut m, Event::Tick { now_ms: 1_000 });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(false));
        assert!(ok(&mut m, Event::Verify { now_ms: 1_500 }).is_empty());
        assert!(m.verify_pending() && !m.running_verify());
        succeed(&mut m, 2_000);
        let a = ok(&mut m, Event::Tick { now_ms: 2_100 });
        assert_eq!(
            verify_start(&a).map(|x| x.3),
            Some(true),
            "the verify cycle follows at once"
        );
        ok(
            &mut m,
            Event::CycleFailed {
                now_ms: 31_500,
                failure: Failure::Retryable("network".into()),
            },
        );
        assert!(m.verify_pending());
        let a = ok(&mut m, Event::Tick { now_ms: 40_000 });
        assert_eq!(
            verify_start(&a).map(|x| x.3),
            Some(true),
            "the retry verifies"
        );
        ok(&mut m, Event::Pause { now_ms: 40_100 });
        assert!(!m.verify_pending());
        let a = ok(&mut m, Event::Resume { now_ms: 40_200 });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(false));
    }

    /// `--verify-every`: the first incremental cycle verifies (no verification yet), then one
    /// cycle per interval counted from the last report.
    #[test]
    fn verify_every_schedules_verify_cycles() {
        const H: u64 = 3_600_000;
        let mut s = Schedule::every(F);
        s.verify_every_ms = H;
        let mut m = restored(S::Replicating, s);
        let a = ok(&mut m, Event::Tick { now_ms: 1_000 });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(true));
        succeed(&mut m, 2_000);
        ok(
            &mut m,
            Event::Verified {
                now_ms: 3_000,
                mismatched_blocks: 0,
                mismatch: None,
            },
        );
        let mut t = 31_000;
        let mut verified_at = Vec::new();
        while t < 3 * H {
            let a = ok(&mut m, Event::Tick { now_ms: t });
            if let Some((_, _, _, v)) = verify_start(&a) {
                succeed(&mut m, t + 10);
                if v {
                    verified_at.push(t);
                    ok(
                        &mut m,
                        Event::Verified {
                            now_ms: t + 20,
                            mismatched_blocks: 0,
                            mismatch: None,
                        },
                    );
                }
            }
            t += F;
        }
        // Due an hour after the last report (3 000 ms), at the first cycle from then on.
        assert_eq!(verified_at.len(), 2, "{verified_at:?}");
        assert!(verified_at[0] >= 3_000 + H && verified_at[0] < 3_000 + H + F);
        assert!(verified_at[1] >= verified_at[0] + 20 + H);
    }

    /// `set --verify-every` changes the interval at run time: a VM that never verified
    /// verifies at its next cycle; 0 stops scheduled verifications; a disabled VM refuses it.
    #[test]
    fn set_verify_every_changes_the_schedule_at_run_time() {
        const H: u64 = 3_600_000;
        let mut m = restored(S::Replicating, Schedule::every(F));
        let a = ok(&mut m, Event::Tick { now_ms: 1_000 });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(false), "no verify yet");
        succeed(&mut m, 2_000);
        ok(
            &mut m,
            Event::SetVerifyEvery {
                now_ms: 3_000,
                every_ms: H,
            },
        );
        assert_eq!(m.schedule().verify_every_ms, H);
        let a = ok(&mut m, Event::Tick { now_ms: 2_000 + F });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(true), "due at once");
        succeed(&mut m, 2_100 + F);
        ok(
            &mut m,
            Event::Verified {
                now_ms: 2_200 + F,
                mismatched_blocks: 0,
                mismatch: None,
            },
        );
        ok(
            &mut m,
            Event::SetVerifyEvery {
                now_ms: 2_300 + F,
                every_ms: 0,
            },
        );
        let a = ok(&mut m, Event::Tick { now_ms: 10 * H });
        assert_eq!(verify_start(&a).map(|x| x.3), Some(false), "never again");

        let mut d = PrimaryMachine::new(Schedule::every(F));
        assert_eq!(
            d.step(Event::SetVerifyEvery {
                now_ms: 1,
                every_ms: H,
            }),
            Err(Refusal::NotEnabled {
                op: Op::SetVerifyEvery
            })
        );
    }

    /// Continuous mode's machine: enabled with `--frequency continuous`, its full copy done
    /// at 2 s (the next cycle is due at once).
    fn continuous() -> PrimaryMachine {
        let mut sched = Schedule::continuous();
        sched.app_consistent_every_ms = 20_000;
        sched.verify_every_ms = 7_200_000;
        let mut m = PrimaryMachine::new(sched);
        ok(
            &mut m,
            Event::Enable {
                now_ms: 0,
                initial_at_ms: None,
            },
        );
        succeed(&mut m, 2_000);
        assert_eq!(m.state(), S::Replicating);
        m
    }

    /// What a tick starts: (id, app-consistent, verify).
    fn started(a: &[Action]) -> Option<(CycleId, bool, bool)> {
        a.iter().find_map(|x| match x {
            Action::StartCycle {
                id,
                app_consistent,
                verify,
                ..
            } => Some((*id, *app_consistent, *verify)),
            _ => None,
        })
    }

    /// Continuous mode, step by step: a cycle starts as soon as the last one is acknowledged
    /// but no sooner than 1 s after the last start (the floor); the first incremental cycle is
    /// app-consistent, then one each app-consistent interval (20 s here); a verify cycle when `--verify-every` is due; a
    /// failure backs off from 1 s; pause aborts and starts nothing; resume starts at once; a
    /// missed cycle is each whole 30 s (the RPO target) without an acknowledged cycle.
    #[test]
    fn continuous_table() {
        #[derive(Debug)]
        enum E {
            Tick,
            Ok,
            Fail,
            Pause,
            Resume,
        }
        // (time, event, the cycle it must start (None: none), missed cycles after it, state)
        type Row = (u64, E, Option<(CycleId, bool, bool)>, u64, S);
        let table: &[Row] = &[
            // Acknowledged at 2 s: the next cycle is due at once, and so is the first
            // verification: a verify cycle (never frozen).
            (2_000, E::Tick, Some((2, false, true)), 0, S::Replicating),
            (2_400, E::Ok, None, 0, S::Replicating),
            // The floor: no start before 1 s after the last one (2 s).
            (2_600, E::Tick, None, 0, S::Replicating),
            // The first app-consistent cut.
            (3_000, E::Tick, Some((3, true, false)), 0, S::Replicating),
            (3_100, E::Ok, None, 0, S::Replicating),
            (3_900, E::Tick, None, 0, S::Replicating),
            (4_000, E::Tick, Some((4, false, false)), 0, S::Replicating),
            // A slow cycle (3 s): the next starts on the acknowledgement's tick.
            (7_000, E::Ok, None, 0, S::Replicating),
            (7_000, E::Tick, Some((5, false, false)), 0, S::Replicating),
            // Failures back off 1 s, 2 s, 4 s: no hot loop.
            (7_100, E::Fail, None, 0, S::Replicating),
            (8_000, E::Tick, None, 0, S::Replicating),
            (8_100, E::Tick, Some((5, false, false)), 0, S::Replicating),
            (8_200, E::Fail, None, 0, S::Replicating),
            (10_000, E::Tick, None, 0, S::Replicating),
            (10_200, E::Tick, Some((5, false, false)), 0, S::Replicating),
            (10_300, E::Fail, None, 0, S::Replicating),
            (14_200, E::Tick, None, 0, S::Replicating),
            (14_300, E::Tick, Some((5, false, false)), 0, S::Replicating),
            // This attempt hangs: 30 s (the RPO target) after the last acknowledged cycle
            // (7 s) one missed cycle is counted, and another each 30 s.
            (36_900, E::Tick, None, 0, S::Replicating),
            (37_000, E::Tick, None, 1, S::Replicating),
            (67_000, E::Tick, None, 2, S::Replicating),
            (68_000, E::Ok, None, 2, S::Replicating),
            // 20 s since the last app-consistent cut: this one is frozen.
            (68_000, E::Tick, Some((6, true, false)), 2, S::Replicating),
            // Pause aborts the running cycle; time passing starts nothing, misses nothing.
            (68_500, E::Pause, None, 2, S::Suspended),
            (200_000, E::Tick, None, 2, S::Suspended),
            // Resume starts a cycle at once (the aborted app-consistent cut is taken now).
            (
                200_000,
                E::Resume,
                Some((6, true, false)),
                2,
                S::Replicating,
            ),
            (200_300, E::Ok, None, 2, S::Replicating),
            (201_000, E::Tick, Some((7, false, false)), 2, S::Replicating),
            (201_100, E::Ok, None, 2, S::Replicating),
            // 20 s after the last frozen cut, the next one.
            (220_300, E::Tick, Some((8, true, false)), 2, S::Replicating),
        ];
        let mut m = continuous();
        let mut frozen = false;
        for (now, e, want, missed, state) in table {
            let now_ms = *now;
            let what = format!("{e:?} at {now_ms}");
            let acts = match e {
                E::Tick => ok(&mut m, Event::Tick { now_ms }),
                E::Ok => {
                    let a = ok(
                        &mut m,
                        Event::CycleSucceeded {
                            now_ms,
                            bytes: 1,
                            app_consistent: frozen,
                            pending_bytes: None,
                            disk_sizes: None,
                        },
                    );
                    if m.schedule().verify_every_ms > 0 && m.verify_pending() {
                        ok(
                            &mut m,
                            Event::Verified {
                                now_ms,
                                mismatched_blocks: 0,
                                mismatch: None,
                            },
                        );
                    }
                    a
                }
                E::Fail => ok(
                    &mut m,
                    Event::CycleFailed {
                        now_ms,
                        failure: Failure::Retryable("replica agent stopped".into()),
                    },
                ),
                E::Pause => ok(&mut m, Event::Pause { now_ms }),
                E::Resume => ok(&mut m, Event::Resume { now_ms }),
            };
            assert_eq!(started(&acts), *want, "{what}: started");
            if let Some((_, app, _)) = want {
                frozen = *app;
            }
            assert_eq!(m.stats().missed_cycles, *missed, "{what}: missed");
            assert_eq!(m.state(), *state, "{what}: state");
        }
    }

    /// Continuous mode's retry delays double from 1 s and stop at 30 s: a replica that is away
    /// for minutes costs one attempt every 30 s, not one per tick.
    #[test]
    fn continuous_retries_back_off_to_30_s() {
        let mut m = continuous();
        let mut now = 2_000;
        let mut delays = Vec::new();
        let mut last_fail: Option<u64> = None;
        while delays.len() < 8 {
            if started(&ok(&mut m, Event::Tick { now_ms: now })).is_some() {
                if let Some(f) = last_fail {
                    delays.push(now - f);
                }
                ok(
                    &mut m,
                    Event::CycleFailed {
                        now_ms: now,
                        failure: Failure::Retryable("connection refused".into()),
                    },
                );
                last_fail = Some(now);
            }
            now += 100;
        }
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        // Back: the next attempt succeeds and cycles follow at the floor again.
        assert!(
            started(&ok(
                &mut m,
                Event::Tick {
                    now_ms: now + 30_000
                }
            ))
            .is_some()
        );
        succeed(&mut m, now + 30_100);
        assert_eq!(m.consecutive_failures(), 0);
        assert!(
            started(&ok(
                &mut m,
                Event::Tick {
                    now_ms: now + 31_000
                }
            ))
            .is_some()
        );
    }
}
