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
//! | BeginImport            | = (importing)      | = (importing)       | State          | = (importing)          | Disabled   | FailedOver            | FailedOver |
//! | Pause                  | P                  | P                   | P              | State                  | Disabled   | FailedOver            | FailedOver |
//! | Resume                 | State              | State               | State          | state before the pause | Disabled   | FailedOver            | FailedOver |
//! | Disable                | D                  | D                   | D              | D                      | Disabled   | FailedOver            | D          |
//! | FailoverStart          | FW (needs a point) | FW                  | FW             | FW                     | Disabled   | State                 | State      |
//! | FailoverTest           | = (needs a point)  | =                   | =              | =                      | Disabled   | State                 | State      |
//! | FailoverCancel         | State              | State               | State          | State                  | State      | state before the failover | State  |
//! | FailoverComplete       | State              | State               | State          | State                  | State      | F                     | State      |
//! | ContinueFrom (`continue_from`) | R (needs a point) | R          | R              | Paused                 | Disabled   | FailedOver            | FailedOver |
//! | Reverse                | State              | State               | State          | State                  | State      | a primary machine     | a primary machine |
//! | check_remove (`replica remove`) | Active   | Active              | Active         | ok                     | ok         | FailedOver            | FailedOver |
//!
//! While an import runs (`BeginImport` until `Imported` or `ImportFailed`; not persisted),
//! OfferCycle, Disable, FailoverStart, FailoverTest, check_remove and BeginImport are refused
//! with [`Refusal::Importing`]; pause and resume go on.
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
use crate::refusal::{Op, Refusal};

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
        /// Data bytes the cycle carried (zero extents count nothing, as on the primary).
        bytes: u64,
        /// From the cycle's cut on the primary to its commit here (the primary's clock may
        /// differ; 0 when it is ahead).
        latency_ms: u64,
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
    /// `vmreplica import` begins (the store writes the copy as a new point meanwhile):
    /// accepted where [`ReplicaEvent::Imported`] would be; until it ends, cycles, disable,
    /// failover, removal and a second import are refused with [`Refusal::Importing`].
    BeginImport {
        /// Now.
        now_ms: u64,
    },
    /// The import that began failed; nothing was added.
    ImportFailed {
        /// Now.
        now_ms: u64,
    },
    /// An exported initial copy or disk images were imported as point `id` (ends an import
    /// that began).
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

/// What an extended replica does when its source, the VM's first replica, failed over and
/// continues replicating to it from the point it chose (`continue-from`; decided by
/// [`ReplicaMachine::continue_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continued {
    /// Drop every point newer than this one (the source's history after its failover point,
    /// which its failed-over VM replaced); `None`: drop nothing.
    pub discard_above: Option<CycleId>,
    /// The point the replica holds afterwards: the base of the source's next cycle.
    pub latest: CycleId,
    /// The replica does not hold the source's point: the source resynchronises (block hashes
    /// against `latest`) instead of sending only what its VM wrote.
    pub resync: bool,
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
    /// An import runs (not persisted: an agent restart ends it, and the store discards its
    /// unfinished layers).
    importing: bool,
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
            importing: false,
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
            importing: false,
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

    /// Whether an import runs.
    pub fn importing(&self) -> bool {
        self.importing
    }

    /// Whether cycles (and a resynchronization's block-hash requests) are accepted now.
    pub fn accepts_cycles(&self) -> Result<(), Refusal> {
        self.receiving(Op::ReceiveCycle)
    }

    /// Refuse `op` while an import runs.
    fn not_importing(&self, op: Op) -> Result<(), Refusal> {
        if self.importing {
            Err(Refusal::Importing { op })
        } else {
            Ok(())
        }
    }

    fn receiving(&self, op: Op) -> Result<(), Refusal> {
        use ReplicationState as S;
        let state = self.state;
        self.not_importing(op)?;
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

    /// Whether an import may begin now: waiting for initial replication, replicating or
    /// paused, and no other import running.
    fn import_allowed(&self) -> Result<(), Refusal> {
        use ReplicationState as S;
        let (op, state) = (Op::Import, self.state);
        self.not_importing(op)?;
        match state {
            S::WaitingForInitialReplication | S::Replicating | S::Suspended => Ok(()),
            S::Disabled => Err(Refusal::Disabled { op }),
            S::FailedOverWaitingCompletion | S::FailedOver => {
                Err(Refusal::FailedOver { op, state })
            }
            _ => Err(Refusal::State { op, state }),
        }
    }

    /// Whether `replica remove` is allowed now: when replication into this VM is disabled
    /// or paused here; not while the primary replicates into it (`Active`) nor while it is
    /// failed over (its disks are the running VM's).
    pub fn check_remove(&self) -> Result<(), Refusal> {
        use ReplicationState as S;
        let (op, state) = (Op::Remove, self.state);
        self.not_importing(op)?;
        match state {
            S::Disabled | S::Suspended => Ok(()),
            S::WaitingForInitialReplication | S::Replicating | S::Resynchronizing => {
                Err(Refusal::Active { op, state })
            }
            S::FailedOverWaitingCompletion | S::FailedOver => {
                Err(Refusal::FailedOver { op, state })
            }
            _ => Err(Refusal::State { op, state }),
        }
    }

    /// `continue-from`: this replica's primary is itself a replica that forwarded the VM's
    /// points here (extended replication A → B → C); the VM failed over on it from `point`,
    /// and it now replicates to this host as an ordinary primary. `held`: the points the store
    /// holds. Points above `point` are the old history that the failed-over VM replaced: they
    /// go, the rest stay. When `point` itself is held, the source's next cycle builds on it
    /// (only what its VM wrote travels); otherwise on the newest held point below it (or, when
    /// every held point is newer, on the newest, which is then kept), with a resynchronisation.
    /// Refused while failed over here, disabled, paused, importing, or holding no point (the
    /// relationship starts anew with `enable` then). The caller discards, then feeds nothing
    /// else: the machine's latest point is already `latest`.
    pub fn continue_from(
        &mut self,
        point: CycleId,
        held: &[CycleId],
    ) -> Result<Continued, Refusal> {
        let op = Op::ContinueFrom;
        self.receiving(op)?;
        let below = held.iter().copied().filter(|p| *p <= point).max();
        let newest = held.iter().copied().max();
        let c = match (below, newest) {
            (_, None) => {
                return Err(Refusal::NoInitialCopy { op });
            }
            // `b` is the newest held point not above `point`: the points above `b` are
            // exactly those above `point`.
            (Some(b), Some(n)) => Continued {
                discard_above: (n > point).then_some(b),
                latest: b,
                resync: b != point,
            },
            (None, Some(n)) => Continued {
                discard_above: None,
                latest: n,
                resync: true,
            },
        };
        self.last_cycle = Some(c.latest);
        if matches!(
            self.state,
            ReplicationState::Resynchronizing | ReplicationState::WaitingForInitialReplication
        ) {
            // A resync of the old history is over; the new primary's cycles build on `latest`.
            self.state = ReplicationState::Replicating;
        }
        Ok(c)
    }

    /// `follow` (fan-out's failover): the VM replicated from one primary to several replicas,
    /// failed over on another of them, and that sibling replicates to this host now. Its point
    /// ids number another relationship's cycles (each relationship counts its own), so no id
    /// is compared: every held point stays, the newest is the base, and the sibling's first
    /// cycle is a resynchronisation against it (block hashes: only differing blocks travel;
    /// the resync cycle's id comes after the base). `held`: the points the store holds;
    /// `from_own_primary`: the caller is this replica's primary already (extended
    /// replication: `continue-from` is the call); `same_storage`: the caller's authorization
    /// entry names the directory that holds this VM's points (a replica VM's store is found
    /// through its primary's entry, and the caller becomes the primary). Refused while failed over here (its disks
    /// are a running VM's), disabled, importing, or holding no point; a replica paused by its
    /// old primary is taken over (the new primary decides from here on).
    pub fn follow(
        &mut self,
        held: &[CycleId],
        from_own_primary: bool,
        same_storage: bool,
    ) -> Result<Continued, Refusal> {
        let op = Op::Follow;
        if from_own_primary {
            return Err(Refusal::FollowOwnPrimary);
        }
        if !same_storage {
            return Err(Refusal::FollowOtherStorage);
        }
        if self.state != ReplicationState::Suspended {
            self.receiving(op)?;
        }
        self.not_importing(op)?;
        let latest = held
            .iter()
            .copied()
            .max()
            .ok_or(Refusal::NoInitialCopy { op })?;
        self.last_cycle = Some(latest);
        self.state = ReplicationState::Replicating;
        self.paused_from = None;
        Ok(Continued {
            discard_above: None,
            latest,
            resync: true,
        })
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
                latency_ms,
                app_consistent,
            } => {
                let st = &mut self.stats;
                st.successful_cycles += 1;
                st.total_bytes += bytes;
                st.max_bytes = st.max_bytes.max(bytes);
                st.total_latency_ms += latency_ms;
                st.max_latency_ms = st.max_latency_ms.max(latency_ms);
                st.last_replication_ms = Some(now_ms);
                st.last_point_cut_ms = Some(now_ms.saturating_sub(latency_ms));
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
            E::BeginImport { now_ms: _ } => {
                self.import_allowed()?;
                self.importing = true;
                Ok(Vec::new())
            }
            E::ImportFailed { now_ms: _ } => {
                self.importing = false;
                Ok(Vec::new())
            }
            E::Imported { now_ms, id } => {
                if !self.importing {
                    self.import_allowed()?;
                }
                self.importing = false;
                self.last_cycle = Some(id);
                self.stats.last_replication_ms = Some(now_ms);
                self.stats.last_point_cut_ms = Some(now_ms);
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
            E::Disable { now_ms: _ } if self.importing => {
                Err(Refusal::Importing { op: Op::Disable })
            }
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
                    last_point_cut_ms: self.stats.last_point_cut_ms,
                    ..Default::default()
                };
                persist
            }
            E::FailoverStart { now_ms: _ } => {
                self.not_importing(Op::Start)?;
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
                self.not_importing(Op::Test)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;
    use ReplicaEvent as E;
    use ReplicationState as S;

    /// A replica restored in `state`: point 3 unless waiting for initial replication; paused
    /// from Replicating; failed over from Replicating.
    fn in_state(state: S) -> ReplicaMachine {
        ReplicaMachine::restore(ReplicaSnapshot {
            state,
            last_cycle: (state != S::WaitingForInitialReplication).then_some(3),
            paused_from: (state == S::Suspended).then_some(S::Replicating),
            before_failover: (state == S::FailedOverWaitingCompletion).then_some(S::Replicating),
            ..Default::default()
        })
    }

    /// The commands of the table, in column order; `None` = `reverse` (checked, not stepped).
    fn commands(now_ms: u64) -> Vec<(&'static str, Option<ReplicaEvent>)> {
        vec![
            ("recreate", Some(E::Recreate { now_ms })),
            (
                "offer incremental",
                Some(E::OfferCycle {
                    now_ms,
                    kind: CycleKind::Incremental,
                    id: 4,
                    base: Some(3),
                }),
            ),
            (
                "offer resync",
                Some(E::OfferCycle {
                    now_ms,
                    kind: CycleKind::Resync,
                    id: 4,
                    base: Some(3),
                }),
            ),
            (
                "applied",
                Some(E::CycleApplied {
                    now_ms,
                    id: 4,
                    bytes: 10,
                    latency_ms: 0,
                    app_consistent: false,
                }),
            ),
            (
                "apply failed",
                Some(E::ApplyFailed {
                    now_ms,
                    message: "boom".into(),
                }),
            ),
            ("imported", Some(E::Imported { now_ms, id: 4 })),
            ("pause", Some(E::Pause { now_ms })),
            ("resume", Some(E::Resume { now_ms })),
            ("disable", Some(E::Disable { now_ms })),
            ("failover start", Some(E::FailoverStart { now_ms })),
            ("failover test", Some(E::FailoverTest { now_ms })),
            ("failover cancel", Some(E::FailoverCancel { now_ms })),
            (
                "failover complete",
                Some(E::FailoverComplete { now_ms, point: 3 }),
            ),
            (
                "recovered",
                Some(E::Recovered {
                    now_ms,
                    latest: Some(3),
                }),
            ),
            ("reset stats", Some(E::ResetStats { now_ms })),
            ("reverse", None),
        ]
    }

    #[test]
    fn follow_table() {
        let kept = |latest| {
            Ok(Continued {
                discard_above: None,
                latest,
                resync: true,
            })
        };
        // (state, held points, the caller is the own primary, what the replica does); the
        // caller's entry names the VM's storage
        type Row<'a> = (
            ReplicationState,
            &'a [CycleId],
            bool,
            Result<Continued, Refusal>,
        );
        let rows: &[Row] = &[
            // The newest point is the base whatever the ids: nothing dropped, always a resync.
            (S::Replicating, &[3, 5, 7], false, kept(7)),
            (S::Replicating, &[40], false, kept(40)),
            (S::Resynchronizing, &[3, 5], false, kept(5)),
            (S::WaitingForInitialReplication, &[2], false, kept(2)),
            // Paused by the old primary: the new one takes it over.
            (S::Suspended, &[3, 5], false, kept(5)),
            // Nothing to keep.
            (
                S::Replicating,
                &[],
                false,
                Err(Refusal::NoInitialCopy { op: Op::Follow }),
            ),
            // The extended replica's own source: continue-from is the call.
            (
                S::Replicating,
                &[3, 5],
                true,
                Err(Refusal::FollowOwnPrimary),
            ),
            // Its disks are a running VM's here, or replication was disabled.
            (
                S::FailedOver,
                &[3, 5],
                false,
                Err(Refusal::FailedOver {
                    op: Op::Follow,
                    state: S::FailedOver,
                }),
            ),
            (
                S::FailedOverWaitingCompletion,
                &[3, 5],
                false,
                Err(Refusal::FailedOver {
                    op: Op::Follow,
                    state: S::FailedOverWaitingCompletion,
                }),
            ),
            (
                S::Disabled,
                &[3, 5],
                false,
                Err(Refusal::Disabled { op: Op::Follow }),
            ),
        ];
        for (state, held, own, want) in rows {
            let mut m = in_state(*state);
            let before = m.snapshot();
            let got = m.follow(held, *own, true);
            assert_eq!(&got, want, "{state}, held {held:?}, own primary {own}");
            match got {
                Ok(c) => {
                    assert_eq!(m.last_cycle(), Some(c.latest), "{state}");
                    assert_eq!(m.state(), S::Replicating, "{state}");
                }
                // A refusal changes nothing.
                Err(_) => assert_eq!(m.snapshot(), before, "{state}"),
            }
        }
        // A caller whose entry stores replica VMs elsewhere: refused, nothing changes (its
        // points would not be found through the new primary's entry).
        let mut m = in_state(S::Replicating);
        let before = m.snapshot();
        assert_eq!(
            m.follow(&[3, 5], false, false),
            Err(Refusal::FollowOtherStorage)
        );
        assert_eq!(m.snapshot(), before);
    }

    #[test]
    fn continue_from_table() {
        // (held points, the source's failover point, what the replica does)
        let c = |discard_above, latest, resync| Continued {
            discard_above,
            latest,
            resync,
        };
        let rows: &[(&[CycleId], CycleId, Result<Continued, ()>)] = &[
            // The point is held: later points go, the next cycle is incremental from it.
            (&[3, 5, 7, 9], 7, Ok(c(Some(7), 7, false))),
            (&[3, 5, 7], 7, Ok(c(None, 7, false))),
            // Not held (merged, or never shipped): later points go, resync on the one below.
            (&[3, 5, 8, 9], 7, Ok(c(Some(5), 5, true))),
            (&[3, 5], 7, Ok(c(None, 5, true))),
            // Every held point is newer: nothing in common to keep; resync on the newest.
            (&[8, 9], 7, Ok(c(None, 9, true))),
            // Nothing held: refused.
            (&[], 7, Err(())),
        ];
        for (held, point, want) in rows {
            let mut m = in_state(S::Replicating);
            let got = m.continue_from(*point, held).map_err(|_| ());
            assert_eq!(got, *want, "held {held:?}, point {point}");
            if let Ok(c) = got {
                assert_eq!(m.last_cycle(), Some(c.latest));
                assert_eq!(m.state(), S::Replicating);
            }
        }
        // Which states accept it; a refusal changes nothing.
        for (state, ok) in [
            (S::WaitingForInitialReplication, true),
            (S::Replicating, true),
            (S::Resynchronizing, true),
            (S::Suspended, false),
            (S::Disabled, false),
            (S::FailedOverWaitingCompletion, false),
            (S::FailedOver, false),
        ] {
            let mut m = in_state(state);
            let before = m.snapshot();
            let r = m.continue_from(7, &[5, 7, 9]);
            assert_eq!(r.is_ok(), ok, "{state}: {r:?}");
            if ok {
                assert_eq!(m.state(), S::Replicating, "{state}");
            } else {
                assert_eq!(m.snapshot(), before, "{state}");
            }
        }
    }

    #[test]
    fn an_import_begins_where_imported_is_accepted() {
        for (state, ok) in [
            (S::WaitingForInitialReplication, true),
            (S::Replicating, true),
            (S::Resynchronizing, false),
            (S::Suspended, true),
            (S::Disabled, false),
            (S::FailedOverWaitingCompletion, false),
            (S::FailedOver, false),
        ] {
            let mut m = in_state(state);
            let before = m.snapshot();
            let r = m.step(E::BeginImport { now_ms: 5 });
            assert_eq!(r.is_ok(), ok, "{state}: {r:?}");
            assert_eq!(m.importing(), ok, "{state}");
            // Beginning changes no persisted field.
            assert_eq!(m.snapshot(), before, "{state}");
        }
    }

    #[test]
    fn an_import_in_progress_holds_off_cycles_disable_failover_removal_and_another_import() {
        let mut m = in_state(S::Replicating);
        m.step(E::BeginImport { now_ms: 1 }).expect("begin");
        let importing = |op| Err(Refusal::Importing { op });
        let offer = E::OfferCycle {
            now_ms: 2,
            kind: CycleKind::Incremental,
            id: 4,
            base: Some(3),
        };
        assert_eq!(m.step(offer), importing(Op::ReceiveCycle));
        assert_eq!(
            m.accepts_cycles(),
            Err(Refusal::Importing {
                op: Op::ReceiveCycle
            })
        );
        assert_eq!(m.step(E::Disable { now_ms: 2 }), importing(Op::Disable));
        assert_eq!(m.step(E::FailoverStart { now_ms: 2 }), importing(Op::Start));
        assert_eq!(m.step(E::FailoverTest { now_ms: 2 }), importing(Op::Test));
        assert_eq!(m.step(E::BeginImport { now_ms: 2 }), importing(Op::Import));
        assert_eq!(m.check_remove(), Err(Refusal::Importing { op: Op::Remove }));
        assert_eq!(m.state(), S::Replicating, "refusals change nothing");
        // Pause and resume go on meanwhile; the import's point lands in the paused state.
        m.step(E::Pause { now_ms: 3 }).expect("pause");
        m.step(E::Imported { now_ms: 4, id: 9 }).expect("imported");
        assert!(!m.importing());
        assert_eq!((m.state(), m.last_cycle()), (S::Suspended, Some(9)));
        m.step(E::Resume { now_ms: 5 }).expect("resume");
        let next = E::OfferCycle {
            now_ms: 6,
            kind: CycleKind::Incremental,
            id: 10,
            base: Some(9),
        };
        m.step(next).expect("cycles again after the import");

        // A failed import ends it too and adds nothing.
        let mut m = in_state(S::WaitingForInitialReplication);
        m.step(E::BeginImport { now_ms: 1 }).expect("begin");
        assert_eq!(m.step(E::ImportFailed { now_ms: 2 }), Ok(Vec::new()));
        assert!(!m.importing());
        assert_eq!(m.last_cycle(), None);
        assert_eq!(m.state(), S::WaitingForInitialReplication);
        m.step(E::Disable { now_ms: 3 }).expect("disable after it");
    }

    #[test]
    fn an_import_does_not_survive_a_restore() {
        let mut m = in_state(S::Replicating);
        m.step(E::BeginImport { now_ms: 1 }).expect("begin");
        let back = ReplicaMachine::restore(m.snapshot());
        assert!(!back.importing());
    }

    #[test]
    fn remove_only_when_disabled_or_paused_here() {
        for (state, want) in [
            (S::WaitingForInitialReplication, Some("active")),
            (S::Replicating, Some("active")),
            (S::Resynchronizing, Some("active")),
            (S::Suspended, None),
            (S::Disabled, None),
            (S::FailedOverWaitingCompletion, Some("failed over")),
            (S::FailedOver, Some("failed over")),
        ] {
            let m = in_state(state);
            match (m.check_remove(), want) {
                (Ok(()), None) => {}
                (Err(r), Some(w)) => {
                    assert!(r.to_string().contains(w), "{state}: {r}");
                    assert!(r.to_string().starts_with("replica remove"), "{r}");
                }
                (got, want) => panic!("{state}: {got:?}, wanted {want:?}"),
            }
            // A check changes nothing.
            assert_eq!(m.state(), state);
        }
    }

    #[test]
    fn state_command_table() {
        type Want = Result<S, Refusal>;
        use Op as O;
        let st = |op, state| Err(Refusal::State { op, state });
        let paused = |op| {
            Err(Refusal::Paused {
                op,
                state: S::Suspended,
            })
        };
        let dis = |op| Err(Refusal::Disabled { op });
        let fo = |op, state| Err(Refusal::FailedOver { op, state });
        let nic = |op| Err(Refusal::NoInitialCopy { op });
        let (w, r, rs, p, d, fw, f) = (
            S::WaitingForInitialReplication,
            S::Replicating,
            S::Resynchronizing,
            S::Suspended,
            S::Disabled,
            S::FailedOverWaitingCompletion,
            S::FailedOver,
        );
        // Columns as in `commands`.
        let table: Vec<(S, [Want; 16])> = vec![
            (
                w,
                [
                    Ok(w),
                    Ok(w),
                    Ok(w),
                    Ok(r),
                    Ok(w),
                    Ok(r),
                    Ok(p),
                    st(O::Resume, w),
                    Ok(d),
                    nic(O::Start),
                    nic(O::Test),
                    st(O::Cancel, w),
                    st(O::Complete, w),
                    Ok(w),
                    Ok(w),
                    st(O::Reverse, w),
                ],
            ),
            (
                r,
                [
                    Ok(r),
                    Ok(r),
                    Ok(rs),
                    Ok(r),
                    Ok(r),
                    Ok(r),
                    Ok(p),
                    st(O::Resume, r),
                    Ok(d),
                    Ok(fw),
                    Ok(r),
                    st(O::Cancel, r),
                    st(O::Complete, r),
                    Ok(r),
                    Ok(r),
                    st(O::Reverse, r),
                ],
            ),
            (
                rs,
                [
                    Ok(rs),
                    Ok(rs),
                    Ok(rs),
                    Ok(r),
                    Ok(rs),
                    st(O::Import, rs),
                    Ok(p),
                    st(O::Resume, rs),
                    Ok(d),
                    Ok(fw),
                    Ok(rs),
                    st(O::Cancel, rs),
                    st(O::Complete, rs),
                    Ok(rs),
                    Ok(rs),
                    st(O::Reverse, rs),
                ],
            ),
            (
                p,
                [
                    Ok(p),
                    paused(O::ReceiveCycle),
                    paused(O::ReceiveCycle),
                    Ok(p),
                    Ok(p),
                    Ok(p),
                    st(O::Pause, p),
                    Ok(r),
                    Ok(d),
                    Ok(fw),
                    Ok(p),
                    st(O::Cancel, p),
                    st(O::Complete, p),
                    Ok(p),
                    Ok(p),
                    st(O::Reverse, p),
                ],
            ),
            (
                d,
                [
                    Ok(r),
                    dis(O::ReceiveCycle),
                    dis(O::ReceiveCycle),
                    Ok(d),
                    Ok(d),
                    dis(O::Import),
                    dis(O::Pause),
                    dis(O::Resume),
                    dis(O::Disable),
                    dis(O::Start),
                    dis(O::Test),
                    st(O::Cancel, d),
                    st(O::Complete, d),
                    Ok(d),
                    Ok(d),
                    st(O::Reverse, d),
                ],
            ),
            (
                fw,
                [
                    fo(O::CreateReplica, fw),
                    fo(O::ReceiveCycle, fw),
                    fo(O::ReceiveCycle, fw),
                    Ok(fw),
                    Ok(fw),
                    fo(O::Import, fw),
                    fo(O::Pause, fw),
                    fo(O::Resume, fw),
                    fo(O::Disable, fw),
                    st(O::Start, fw),
                    st(O::Test, fw),
                    Ok(r),
                    Ok(f),
                    Ok(fw),
                    Ok(fw),
                    Ok(fw),
                ],
            ),
            (
                f,
                [
                    fo(O::CreateReplica, f),
                    fo(O::ReceiveCycle, f),
                    fo(O::ReceiveCycle, f),
                    Ok(f),
                    Ok(f),
                    fo(O::Import, f),
                    fo(O::Pause, f),
                    fo(O::Resume, f),
                    Ok(d),
                    st(O::Start, f),
                    st(O::Test, f),
                    st(O::Cancel, f),
                    st(O::Complete, f),
                    Ok(f),
                    Ok(f),
                    Ok(f),
                ],
            ),
            (
                // A primary-only state restored by mistake: commands are refused.
                S::Error,
                [
                    st(O::CreateReplica, S::Error),
                    st(O::ReceiveCycle, S::Error),
                    st(O::ReceiveCycle, S::Error),
                    Ok(S::Error),
                    Ok(S::Error),
                    st(O::Import, S::Error),
                    st(O::Pause, S::Error),
                    st(O::Resume, S::Error),
                    st(O::Disable, S::Error),
                    st(O::Start, S::Error),
                    st(O::Test, S::Error),
                    st(O::Cancel, S::Error),
                    st(O::Complete, S::Error),
                    Ok(S::Error),
                    Ok(S::Error),
                    st(O::Reverse, S::Error),
                ],
            ),
        ];
        let mut checked = 0;
        for (state, wants) in table {
            for ((what, event), want) in commands(1_000).into_iter().zip(wants) {
                let mut m = in_state(state);
                let before = m.clone();
                let got = match event {
                    Some(e) => m.step(e).map(|_| m.state()),
                    None => m
                        .reverse(1_000, Schedule::every(30_000), 3, vec![], false)
                        .map(|_| m.state()),
                };
                assert_eq!(got, want, "{state} x {what}");
                if got.is_err() {
                    assert_eq!(m, before, "{state} x {what}: a refusal changed the machine");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 8 * 16);
    }

    /// Bug (a): `resume` on a failed-over replica used to put it back to Replicating, so the
    /// old primary's cycles were accepted over the failed-over VM's point.
    #[test]
    fn regression_a_resume_during_failover_is_refused() {
        let mut m = in_state(S::Replicating);
        m.step(E::FailoverStart { now_ms: 1 }).expect("failover");
        assert_eq!(m.state(), S::FailedOverWaitingCompletion);
        let e = m.step(E::Resume { now_ms: 2 }).expect_err("refused");
        assert_eq!(
            e,
            Refusal::FailedOver {
                op: Op::Resume,
                state: S::FailedOverWaitingCompletion
            }
        );
        assert!(e.to_string().contains("FailedOverWaitingCompletion"), "{e}");
        assert_eq!(m.state(), S::FailedOverWaitingCompletion);
        assert!(m.accepts_cycles().is_err());
    }

    /// Bug (b): a disabled replica used to accept (and apply) cycles.
    #[test]
    fn regression_b_disabled_replica_refuses_cycles() {
        let mut m = in_state(S::Replicating);
        m.step(E::Disable { now_ms: 1 }).expect("disable");
        for kind in [CycleKind::Full, CycleKind::Incremental, CycleKind::Resync] {
            let e = m
                .step(E::OfferCycle {
                    now_ms: 2,
                    kind,
                    id: 4,
                    base: Some(3),
                })
                .expect_err("refused");
            assert_eq!(
                e,
                Refusal::Disabled {
                    op: Op::ReceiveCycle
                }
            );
            assert!(!e.is_retryable());
        }
        assert!(m.accepts_cycles().is_err());
        // Enabling again from the primary re-creates it with its point.
        m.step(E::Recreate { now_ms: 3 }).expect("recreate");
        assert_eq!(m.state(), S::Replicating);
        assert!(m.accepts_cycles().is_ok());
    }

    /// The replica's statistics count what the primary's do: data bytes and the latency from
    /// the cut to the commit (issue 12: it showed 0 ms and the full disk as the largest cycle).
    #[test]
    fn applied_cycles_count_bytes_and_latency_like_the_primary() {
        let mut m = ReplicaMachine::new(0);
        m.step(E::OfferCycle {
            now_ms: 1,
            kind: CycleKind::Full,
            id: 1,
            base: None,
        })
        .expect("offer");
        for (id, bytes, latency_ms) in [(1, 300, 900), (2, 100, 300)] {
            m.step(E::CycleApplied {
                now_ms: 10 * id,
                id,
                bytes,
                latency_ms,
                app_consistent: false,
            })
            .expect("applied");
        }
        let st = m.stats();
        assert_eq!(
            (st.successful_cycles, st.total_bytes, st.max_bytes),
            (2, 400, 300)
        );
        assert_eq!((st.max_latency_ms, st.average_latency_ms()), (900, 600));
    }

    /// Bug (c): an apply finishing after a pause (or a failover start) used to overwrite the
    /// state with Replicating.
    #[test]
    fn regression_c_applied_cycle_keeps_pause_and_failover() {
        let applied = |id| E::CycleApplied {
            now_ms: 10,
            id,
            bytes: 5,
            latency_ms: 0,
            app_consistent: true,
        };
        // Initial copy staged, then paused before its apply finished.
        let mut m = ReplicaMachine::new(0);
        m.step(E::OfferCycle {
            now_ms: 1,
            kind: CycleKind::Full,
            id: 1,
            base: None,
        })
        .expect("accepted");
        m.step(E::Pause { now_ms: 2 }).expect("pause");
        m.step(applied(1)).expect("applied");
        assert_eq!(m.state(), S::Suspended);
        assert_eq!(m.last_cycle(), Some(1));
        assert_eq!(m.stats().successful_cycles, 1);
        assert_eq!(m.stats().last_app_consistent_ms, Some(10));
        // Resume goes where the applied point leads, not back to waiting.
        m.step(E::Resume { now_ms: 11 }).expect("resume");
        assert_eq!(m.state(), S::Replicating);
        // A failover started while a cycle was applying.
        m.step(E::FailoverStart { now_ms: 12 }).expect("failover");
        m.step(applied(2)).expect("applied");
        assert_eq!(m.state(), S::FailedOverWaitingCompletion);
        assert_eq!(m.last_cycle(), Some(2));
        // Resync finished during a failover: cancel returns to Replicating.
        let mut m = in_state(S::Replicating);
        m.step(E::OfferCycle {
            now_ms: 1,
            kind: CycleKind::Resync,
            id: 4,
            base: Some(3),
        })
        .expect("resync");
        assert_eq!(m.state(), S::Resynchronizing);
        m.step(E::FailoverStart { now_ms: 2 }).expect("failover");
        m.step(applied(4)).expect("applied");
        assert_eq!(m.state(), S::FailedOverWaitingCompletion);
        m.step(E::FailoverCancel { now_ms: 3 }).expect("cancel");
        assert_eq!(m.state(), S::Replicating);
    }

    #[test]
    fn cancel_restores_the_state_before_the_failover() {
        let mut m = in_state(S::Suspended);
        m.step(E::FailoverStart { now_ms: 1 }).expect("failover");
        assert_eq!(m.before_failover(), Some(S::Suspended));
        m.step(E::FailoverCancel { now_ms: 2 }).expect("cancel");
        assert_eq!(m.state(), S::Suspended);
        // Still paused: resume returns to what was paused.
        m.step(E::Resume { now_ms: 3 }).expect("resume");
        assert_eq!(m.state(), S::Replicating);
    }

    #[test]
    fn complete_keeps_only_the_failover_point_then_reverse() {
        let mut m = in_state(S::Replicating);
        m.step(E::CycleApplied {
            now_ms: 1,
            id: 5,
            bytes: 1,
            latency_ms: 0,
            app_consistent: false,
        })
        .expect("applied");
        m.step(E::FailoverStart { now_ms: 2 }).expect("failover");
        m.step(E::FailoverComplete {
            now_ms: 3,
            point: 4,
        })
        .expect("complete");
        assert_eq!(m.state(), S::FailedOver);
        assert_eq!(m.last_cycle(), Some(4));
        assert_eq!(m.before_failover(), None);
        let p = m
            .reverse(4, Schedule::every(30_000), 4, vec![1, 2], true)
            .expect("reverse");
        assert_eq!(p.state(), S::WaitingForStartResynchronize);
        assert_eq!(p.last_cycle(), Some(4));
        assert_eq!(p.disk_sizes(), Some(&[1, 2][..]));
        assert!(m.check_reverse().is_ok());
    }

    #[test]
    fn stale_or_baseless_incrementals_are_refused() {
        let mut m = in_state(S::Replicating);
        for base in [None, Some(2)] {
            assert_eq!(
                m.step(E::OfferCycle {
                    now_ms: 1,
                    kind: CycleKind::Incremental,
                    id: 4,
                    base,
                }),
                Err(Refusal::WrongBase {
                    expected: Some(3),
                    got: base
                })
            );
        }
        // A base ahead of the applied point: staged cycles may still be applying.
        assert!(
            m.step(E::OfferCycle {
                now_ms: 1,
                kind: CycleKind::Incremental,
                id: 6,
                base: Some(5),
            })
            .is_ok()
        );
    }

    #[test]
    fn paused_replica_refusal_is_retryable_and_says_so() {
        let mut m = in_state(S::Replicating);
        m.step(E::Pause { now_ms: 1 }).expect("pause");
        let e = m.accepts_cycles().expect_err("paused");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("paused on the replica"), "{e}");
    }

    #[test]
    fn statistics_and_snapshot() {
        let mut m = ReplicaMachine::new(100);
        for (id, bytes) in [(1, 50), (2, 10)] {
            m.step(E::CycleApplied {
                now_ms: 200 + id,
                id,
                bytes,
                latency_ms: 0,
                app_consistent: false,
            })
            .expect("applied");
        }
        m.step(E::ApplyFailed {
            now_ms: 300,
            message: "no space".into(),
        })
        .expect("failed");
        let st = m.stats();
        assert_eq!(
            (
                st.successful_cycles,
                st.total_bytes,
                st.max_bytes,
                st.errors
            ),
            (2, 60, 50, 1)
        );
        assert_eq!(st.last_replication_ms, Some(202));
        assert_eq!(m.last_error(), Some("no space"));
        let r = ReplicaMachine::restore(m.snapshot());
        assert_eq!(r, m);
        m.step(E::ResetStats { now_ms: 400 }).expect("reset");
        assert_eq!(m.stats().successful_cycles, 0);
        assert_eq!(m.stats().window_start_ms, 400);
        assert_eq!(m.stats().last_replication_ms, Some(202));
        // The next applied cycle clears the error.
        m.step(E::CycleApplied {
            now_ms: 500,
            id: 3,
            bytes: 1,
            latency_ms: 0,
            app_consistent: false,
        })
        .expect("applied");
        assert_eq!(m.last_error(), None);
    }
}
