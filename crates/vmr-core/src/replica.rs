//! The replica side of one VM's replication: creation and idempotent re-creation, which cycles
//! are accepted, what an applied cycle or an apply failure does to the state and statistics,
//! pause, resume and disable on the replica, import of an initial copy, resynchronization
//! begin (a resync cycle accepted) and end (applied), and failover start, test, cancel,
//! complete and reverse. Every command returns the actions to carry out or a typed
//! [`Refusal`]; the fields are private.
//!
//! # States and commands (replica)
//!
//! Replica states are `WaitingForInitialReplication` (W), `Replicating` (R),
//! `Resynchronizing` (Rs), `Suspended` (P), `Disabled` (D), `FailedOverWaitingCompletion`
//! (FW) and `FailedOver` (F); a primary-only state restored by mistake refuses every command
//! with [`Refusal::State`]. `=` means accepted without a state change.
//!
//! | command \ state        | W                  | R                   | Rs             | P (Suspended)          | D          | FW                    | F          |
//! |------------------------|--------------------|---------------------|----------------|------------------------|------------|-----------------------|------------|
//! | Recreate (create-replica) | =               | =                   | =              | =                      | R if a point exists, else W | FailedOver | FailedOver |
//! | OfferCycle full/incr.  | =                  | =                   | =              | Paused (retryable)     | Disabled   | FailedOver            | FailedOver |
//! | OfferCycle resync      | = (initial from an existing copy) | Rs   | =              | Paused (retryable)     | Disabled   | FailedOver            | FailedOver |
//! | CycleApplied           | R                  | =                   | R              | = (resume leads to R)  | =          | = (cancel leads to R) | =          |
//! | ApplyFailed            | =                  | =                   | =              | =                      | =          | =                     | =          |
//! | Imported               | R                  | =                   | State          | = (resume leads to R)  | Disabled   | FailedOver            | FailedOver |
//! | Pause                  | P                  | P                   | P              | State                  | Disabled   | FailedOver            | FailedOver |
//! | Resume                 | State              | State               | State          | state before the pause | Disabled   | FailedOver            | FailedOver |
//! | Disable                | D                  | D                   | D              | D                      | Disabled   | FailedOver            | D          |
//! | FailoverStart          | FW (needs a point) | FW                  | FW             | FW                     | Disabled   | State                 | State      |
//! | FailoverTest           | = (needs a point)  | =                   | =              | =                      | Disabled   | State                 | State      |
//! | FailoverCancel         | State              | State               | State          | State                  | State      | state before the failover | State  |
//! | FailoverComplete       | State              | State               | State          | State                  | State      | F                     | State      |
//! | Reverse                | State              | State               | State          | State                  | State      | a primary machine     | a primary machine |
//!
//! `Recovered` (the store's latest point after an agent restart) and `ResetStats` are accepted
//! in every state. Applied cycles and apply failures are facts: they update the point and the
//! statistics but never change a state that a pause or a failover set meanwhile (they only
//! change the state such a command returns to). Incremental cycles whose base is older than
//! the latest applied point, or missing, are refused with [`Refusal::WrongBase`]; the store
//! checks the exact base when it stages the cycle.

use vmr_proto::api::{ReplicationMode, ReplicationState, ReplicationStats};
use vmr_proto::machine::ReplicaSnapshot;
use vmr_proto::{CycleId, CycleKind};

use crate::failover::failover_transition;
use crate::primary::PrimaryMachine;
use crate::refusal::{Op, Refusal};
use crate::schedule::Schedule;

/// An input to the replica machine. Every event carries the current time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// The primary asked to create the replica VM, which exists already (idempotent; a
    /// disabled replica is enabled again).
    Recreate {
        /// Now, ms since the epoch.
        now_ms: u64,
    },
    /// The primary offers a cycle: accept it (and stage it) or refuse it.
    OfferCycle {
        /// Now.
        now_ms: u64,
        /// Full, incremental or resynchronization.
        kind: CycleKind,
        /// The cycle's id.
        id: CycleId,
        /// The cycle it builds on.
        base: Option<CycleId>,
    },
    /// A staged cycle became a recovery point (one event per point).
    CycleApplied {
        /// Now.
        now_ms: u64,
        /// The point.
        id: CycleId,
        /// Bytes the cycle carried.
        bytes: u64,
        /// Whether the point is app-consistent.
        app_consistent: bool,
    },
    /// Applying a staged cycle failed (it stays staged and is retried).
    ApplyFailed {
        /// Now.
        now_ms: u64,
        /// What went wrong.
        message: String,
    },
    /// An exported initial copy or disk images were imported as point `id`.
    Imported {
        /// Now.
        now_ms: u64,
        /// The point.
        id: CycleId,
    },
    /// After an agent restart: the store's latest point.
    Recovered {
        /// Now.
        now_ms: u64,
        /// The latest point.
        latest: Option<CycleId>,
    },
    /// Admin pause on the replica.
    Pause {
        /// Now.
        now_ms: u64,
    },
    /// Admin resume on the replica.
    Resume {
        /// Now.
        now_ms: u64,
    },
    /// Admin disable on the replica.
    Disable {
        /// Now.
        now_ms: u64,
    },
    /// Reset the statistics window.
    ResetStats {
        /// Now.
        now_ms: u64,
    },
    /// `failover start`: from now on the old primary's cycles are refused.
    FailoverStart {
        /// Now.
        now_ms: u64,
    },
    /// `failover test`: checked only; the state does not change.
    FailoverTest {
        /// Now.
        now_ms: u64,
    },
    /// `failover cancel` (or a failed `failover start` undone): back to the state before.
    FailoverCancel {
        /// Now.
        now_ms: u64,
    },
    /// `failover complete` on the point the failed-over VM runs from.
    FailoverComplete {
        /// Now.
        now_ms: u64,
        /// The failover's point, the only one kept.
        point: CycleId,
    },
}

/// What the agent must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAction {
    /// The persistent part changed: save [`ReplicaMachine::snapshot`].
    Persist,
}

/// The replica-side machine of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMachine {
    state: ReplicationState,
    last_cycle: Option<CycleId>,
    stats: ReplicationStats,
    last_error: Option<String>,
    paused_from: Option<ReplicationState>,
    before_failover: Option<ReplicationState>,
}

impl ReplicaMachine {
    /// A replica VM just created by the primary: waiting for initial replication.
    pub fn new(now_ms: u64) -> Self {
        Self {
            state: ReplicationState::WaitingForInitialReplication,
            last_cycle: None,
            stats: ReplicationStats {
                window_start_ms: now_ms,
                ..Default::default()
            },
            last_error: None,
            paused_from: None,
            before_failover: None,
        }
    }

    /// A replica VM whose disks are recovery point `point` already (the old primary after a
    /// failover, becoming the replica of reverse replication).
    pub fn from_point(now_ms: u64, point: CycleId) -> Self {
        let mut m = Self::new(now_ms);
        m.state = ReplicationState::Replicating;
        m.last_cycle = Some(point);
        m
    }

    /// Rebuild from a persisted snapshot.
    pub fn restore(snapshot: ReplicaSnapshot) -> Self {
        Self {
            state: snapshot.state,
            last_cycle: snapshot.last_cycle,
            stats: snapshot.stats,
            last_error: snapshot.last_error,
            paused_from: snapshot.paused_from,
            before_failover: snapshot.before_failover,
        }
    }

    /// The persistent part, to save on [`ReplicaAction::Persist`].
    pub fn snapshot(&self) -> ReplicaSnapshot {
        ReplicaSnapshot {
            state: self.state,
            last_cycle: self.last_cycle,
            stats: self.stats.clone(),
            last_error: self.last_error.clone(),
            paused_from: self.paused_from,
            before_failover: self.before_failover,
        }
    }

    /// Current state.
    pub fn state(&self) -> ReplicationState {
        self.state
    }

    /// Latest applied point.
    pub fn last_cycle(&self) -> Option<CycleId> {
        self.last_cycle
    }

    /// Statistics.
    pub fn stats(&self) -> &ReplicationStats {
        &self.stats
    }

    /// Last apply error (cleared by the next applied cycle).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// State to return to on resume.
    pub fn paused_from(&self) -> Option<ReplicationState> {
        self.paused_from
    }

    /// State before a started failover (restored by cancel).
    pub fn before_failover(&self) -> Option<ReplicationState> {
        self.before_failover
    }

    /// Whether cycles (and a resynchronization's block-hash requests) are accepted now.
    pub fn accepts_cycles(&self) -> Result<(), Refusal> {
        self.receiving(Op::ReceiveCycle)
    }

    fn receiving(&self, op: Op) -> Result<(), Refusal> {
        use ReplicationState as S;
        let state = self.state;
        match state {
            S::WaitingForInitialReplication | S::Replicating | S::Resynchronizing => Ok(()),
            S::Suspended => Err(Refusal::Paused { op, state }),
            S::Disabled => Err(Refusal::Disabled { op }),
            S::FailedOverWaitingCompletion | S::FailedOver => {
                Err(Refusal::FailedOver { op, state })
            }
            _ => Err(Refusal::State { op, state }),
        }
    }

    /// Where the replica goes when replication proceeds again (create-replica on a disabled
    /// replica, resume without a remembered state).
    fn proceeding(&self) -> ReplicationState {
        if self.last_cycle.is_some() {
            ReplicationState::Replicating
        } else {
            ReplicationState::WaitingForInitialReplication
        }
    }

    /// Reverse replication: this host's failed-over VM becomes the primary, its disks
    /// identical to `point`; `resync` when the old primary's disks may differ. Refused unless
    /// failed over. The caller replaces this machine by the returned one.
    pub fn reverse(
        &self,
        now_ms: u64,
        schedule: Schedule,
        point: CycleId,
        disk_sizes: Vec<u64>,
        resync: bool,
    ) -> Result<PrimaryMachine, Refusal> {
        self.check_reverse()?;
        Ok(PrimaryMachine::reversed(
            schedule, now_ms, point, disk_sizes, resync,
        ))
    }

    /// Whether `reverse` is allowed now (checked before any I/O).
    pub fn check_reverse(&self) -> Result<(), Refusal> {
        failover_transition(ReplicationMode::Replica, self.state, Op::Reverse, true).map(|_| ())
    }

    /// Feed one event; returns the actions to carry out, or why the command is refused (a
    /// refused command changes nothing).
    pub fn step(&mut self, event: ReplicaEvent) -> Result<Vec<ReplicaAction>, Refusal> {
        use ReplicaEvent as E;
        use ReplicationState as S;
        let state = self.state;
        let persist = Ok(vec![ReplicaAction::Persist]);
        let failed_over = |op| Err(Refusal::FailedOver { op, state });
        match event {
            E::Recreate { now_ms: _ } => match state {
                S::Disabled => {
                    self.state = self.proceeding();
                    persist
                }
                S::FailedOverWaitingCompletion | S::FailedOver => failed_over(Op::CreateReplica),
                S::WaitingForInitialReplication
                | S::Replicating
                | S::Resynchronizing
                | S::Suspended => Ok(Vec::new()),
                _ => Err(Refusal::State {
                    op: Op::CreateReplica,
                    state,
                }),
            },
            E::OfferCycle {
                now_ms: _,
                kind,
                id: _,
                base,
            } => {
                self.receiving(Op::ReceiveCycle)?;
                if kind == CycleKind::Incremental && (base.is_none() || base < self.last_cycle) {
                    return Err(Refusal::WrongBase {
                        expected: self.last_cycle,
                        got: base,
                    });
                }
                if kind == CycleKind::Resync && state == S::Replicating {
                    self.state = S::Resynchronizing;
                    return persist;
                }
                Ok(Vec::new())
            }
            E::CycleApplied {
                now_ms,
                id,
                bytes,
                app_consistent,
            } => {
                let st = &mut self.stats;
                st.successful_cycles += 1;
                st.total_bytes += bytes;
                st.max_bytes = st.max_bytes.max(bytes);
                st.last_replication_ms = Some(now_ms);
                if app_consistent {
                    st.last_app_consistent_ms = Some(now_ms);
                }
                self.last_cycle = Some(id);
                self.last_error = None;
                self.point_arrived();
                persist
            }
            E::ApplyFailed { now_ms: _, message } => {
                self.stats.errors += 1;
                self.last_error = Some(message);
                persist
            }
            E::Imported { now_ms, id } => {
                match state {
                    S::WaitingForInitialReplication | S::Replicating | S::Suspended => {}
                    S::Disabled => return Err(Refusal::Disabled { op: Op::Import }),
                    S::FailedOverWaitingCompletion | S::FailedOver => {
                        return failed_over(Op::Import);
                    }
                    _ => {
                        return Err(Refusal::State {
                            op: Op::Import,
                            state,
                        });
                    }
                }
                self.last_cycle = Some(id);
                self.stats.last_replication_ms = Some(now_ms);
                self.last_error = None;
                self.point_arrived();
                persist
            }
            E::Recovered { now_ms: _, latest } => {
                if latest == self.last_cycle {
                    return Ok(Vec::new());
                }
                self.last_cycle = latest;
                persist
            }
            E::Pause { now_ms: _ } => match state {
                S::WaitingForInitialReplication | S::Replicating | S::Resynchronizing => {
                    self.paused_from = Some(state);
                    self.state = S::Suspended;
                    persist
                }
                S::Disabled => Err(Refusal::Disabled { op: Op::Pause }),
                S::FailedOverWaitingCompletion | S::FailedOver => failed_over(Op::Pause),
                _ => Err(Refusal::State {
                    op: Op::Pause,
                    state,
                }),
            },
            E::Resume { now_ms: _ } => match state {
                S::Suspended => {
                    self.state = match self.paused_from.take() {
                        Some(s) => s,
                        None => self.proceeding(),
                    };
                    persist
                }
                S::Disabled => Err(Refusal::Disabled { op: Op::Resume }),
                S::FailedOverWaitingCompletion | S::FailedOver => failed_over(Op::Resume),
                _ => Err(Refusal::State {
                    op: Op::Resume,
                    state,
                }),
            },
            E::Disable { now_ms: _ } => match state {
                S::Disabled => Err(Refusal::Disabled { op: Op::Disable }),
                S::FailedOverWaitingCompletion => failed_over(Op::Disable),
                S::WaitingForInitialReplication
                | S::Replicating
                | S::Resynchronizing
                | S::Suspended
                | S::FailedOver => {
                    self.state = S::Disabled;
                    self.paused_from = None;
                    self.before_failover = None;
                    persist
                }
                _ => Err(Refusal::State {
                    op: Op::Disable,
                    state,
                }),
            },
            E::ResetStats { now_ms } => {
                self.stats = ReplicationStats {
                    window_start_ms: now_ms,
                    last_replication_ms: self.stats.last_replication_ms,
                    last_app_consistent_ms: self.stats.last_app_consistent_ms,
                    ..Default::default()
                };
                persist
            }
            E::FailoverStart { now_ms: _ } => {
                let next = failover_transition(
                    ReplicationMode::Replica,
                    state,
                    Op::Start,
                    self.last_cycle.is_some(),
                )?;
                self.before_failover = Some(state);
                self.state = next;
                persist
            }
            E::FailoverTest { now_ms: _ } => {
                failover_transition(
                    ReplicationMode::Replica,
                    state,
                    Op::Test,
                    self.last_cycle.is_some(),
                )?;
                Ok(Vec::new())
            }
            E::FailoverCancel { now_ms: _ } => {
                failover_transition(ReplicationMode::Replica, state, Op::Cancel, true)?;
                self.state = match self.before_failover.take() {
                    Some(s) => s,
                    None => self.proceeding(),
                };
                persist
            }
            E::FailoverComplete { now_ms: _, point } => {
                let next =
                    failover_transition(ReplicationMode::Replica, state, Op::Complete, true)?;
                self.state = next;
                self.before_failover = None;
                self.paused_from = None;
                self.last_cycle = Some(point);
                persist
            }
        }
    }

    /// A new point exists: waiting for initial replication or resynchronizing ends, directly
    /// or (paused, failed over) in the state a resume or cancel returns to.
    fn point_arrived(&mut self) {
        use ReplicationState as S;
        let done = |s: S| match s {
            S::WaitingForInitialReplication | S::Resynchronizing => S::Replicating,
            s => s,
        };
        match self.state {
            S::Suspended => self.paused_from = self.paused_from.map(done),
            S::FailedOverWaitingCompletion => self.before_failover = self.before_failover.map(done),
            s => self.state = done(s),
        }
    }
}
