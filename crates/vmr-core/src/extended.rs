//! The extended (outgoing) relationship of a replica VM: this host, the VM's replica, forwards
//! its committed recovery points to a third host. The machine decides when an extended cycle
//! runs and what it builds on (the point the extended replica acknowledged last), what its
//! outcomes do (statistics, retry with backoff, a fatal error), pause, resume and disable.
//! It never blocks the incoming relationship: it only reads points the replica side made.
//!
//! An extended cycle ships the replica's newest point `N` (its id is kept: the third host's
//! points carry the same ids) as the changes since the acknowledged point `P` (a full copy
//! when there is none). The driver asks the extended replica which point it holds before each
//! cycle; a different answer (a lost acknowledgement, a restart, a replica that was reset) is
//! adopted with [`ExtEvent::Reconciled`] and the cycle re-planned on it.
//!
//! # States and commands
//!
//! | state \ command              | Enable         | Pause                 | Resume                   | Disable  |
//! |------------------------------|----------------|-----------------------|--------------------------|----------|
//! | Disabled                     | ReadyFor..     | NotEnabled            | NotEnabled               | NotEnabled |
//! | ReadyForInitialReplication   | AlreadyEnabled | Suspended             | -                        | Disabled |
//! | InitialReplicationInProgress | AlreadyEnabled | Suspended (abort)     | -                        | Disabled (abort) |
//! | Replicating                  | AlreadyEnabled | Suspended (abort)     | -                        | Disabled (abort) |
//! | Suspended                    | AlreadyEnabled | -                     | state before the pause   | Disabled |
//! | Error                        | AlreadyEnabled | Suspended             | Replicating / ReadyFor.. | Disabled |
//!
//! `-` = refused with [`Refusal::State`]. Driver events (`Tick`, `CycleSucceeded`,
//! `CycleFailed`, `Reconciled`, `Restarted`, `ResetStats`, `SourceFailover`) are never refused
//! for the state; a
//! cycle outcome without a running cycle is refused with [`Refusal::NoCycleRunning`].

use vmr_proto::CycleId;
use vmr_proto::api::{Health, ReplicationState, ReplicationStats};
use vmr_proto::machine::ExtendedSnapshot;

use crate::health::{HealthReport, primary_health};
use crate::primary::Failure;
use crate::refusal::{Op, Refusal};

/// An input to the extended machine. Every event carries the current time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtEvent {
    /// `enable --extended`: the first extended cycle (a full copy of the newest point) runs
    /// as soon as a point exists.
    Enable {
        /// Now, ms since the epoch.
        now_ms: u64,
    },
    /// Time passes; `newest` is the newest committed point of the replica store.
    Tick {
        /// Now.
        now_ms: u64,
        /// The replica's newest point.
        newest: Option<CycleId>,
    },
    /// The running cycle was acknowledged by the extended replica.
    CycleSucceeded {
        /// Now.
        now_ms: u64,
        /// The point it shipped (the newest when it read it: may be newer than the one
        /// started).
        point: CycleId,
        /// Data bytes shipped.
        bytes: u64,
        /// The shipped point's cut time (on the primary), ms since the epoch.
        cut_ms: u64,
    },
    /// The running cycle failed.
    CycleFailed {
        /// Now.
        now_ms: u64,
        /// Classified cause.
        failure: Failure,
    },
    /// Before running the started cycle the driver asked the extended replica, which holds
    /// `latest`. Equal to the machine's acknowledged point: nothing changes (run the cycle).
    /// Otherwise the started cycle is dropped, `latest` becomes the acknowledged point and the
    /// machine re-plans (the returned actions may start another cycle at once).
    Reconciled {
        /// Now.
        now_ms: u64,
        /// The extended replica's latest point.
        latest: Option<CycleId>,
        /// The replica's newest point.
        newest: Option<CycleId>,
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
    /// Admin disable of the extended relationship.
    Disable {
        /// Now.
        now_ms: u64,
    },
    /// Reset the statistics window.
    ResetStats {
        /// Now.
        now_ms: u64,
    },
    /// The agent restarted: a cycle that was running is gone.
    Restarted {
        /// Now.
        now_ms: u64,
    },
    /// The VM failed over on this host from point `point` (`Some`), or runs here no more
    /// (`None`: failover cancelled). Fed by the driver whenever it changes (it is not
    /// persisted: the driver feeds it again after a restart). While the VM runs here from a
    /// failover, the points of this host's store newer than `point` are no longer the VM's
    /// history: no extended cycle ships one (the failover point itself and older ones still
    /// go, so that the extended replica holds the point a later `reverse` continues from),
    /// and the health says the relationship waits for `reverse`.
    SourceFailover {
        /// Now.
        now_ms: u64,
        /// The failover point, or `None`.
        point: Option<CycleId>,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtAction {
    /// Ship point `point` as the changes since `base` (`None`: a full copy). Before it runs,
    /// ask the extended replica which point it holds and report [`ExtEvent::Reconciled`].
    StartCycle {
        /// The replica's point to ship (its id is the cycle's id).
        point: CycleId,
        /// The point the extended replica acknowledged last.
        base: Option<CycleId>,
    },
    /// Abort the running cycle.
    AbortCycle,
    /// Save [`ExtendedMachine::snapshot`].
    Persist,
}

/// How often and how patiently the extended relationship replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtSchedule {
    /// Extended cycle interval, ms.
    pub frequency_ms: u64,
    /// First retry delay after a failure.
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
}

impl ExtSchedule {
    /// Every `frequency_ms`, retries from 1 s doubling up to the interval (at most 5 min).
    pub fn every(frequency_ms: u64) -> ExtSchedule {
        ExtSchedule {
            frequency_ms,
            retry_base_ms: 1000,
            retry_max_ms: frequency_ms.clamp(5_000, 300_000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Running {
    point: CycleId,
    base: Option<CycleId>,
    started_ms: u64,
}

/// The extended relationship's machine of one replica VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendedMachine {
    state: ReplicationState,
    acked: Option<CycleId>,
    stats: ReplicationStats,
    last_error: Option<String>,
    consecutive_failures: u32,
    paused_from: Option<ReplicationState>,
    schedule: ExtSchedule,
    next_due_ms: u64,
    running: Option<Running>,
    /// The VM runs on this host from a failover at this point ([`ExtEvent::SourceFailover`]).
    source_failover: Option<CycleId>,
}

impl ExtendedMachine {
    /// A relationship not enabled yet.
    pub fn new(schedule: ExtSchedule) -> Self {
        Self::restore(schedule, ExtendedSnapshot::default())
    }

    /// Rebuild from a snapshot (feed [`ExtEvent::Restarted`] next).
    pub fn restore(schedule: ExtSchedule, s: ExtendedSnapshot) -> Self {
        Self {
            state: s.state,
            acked: s.acked,
            stats: s.stats,
            last_error: s.last_error,
            consecutive_failures: 0,
            paused_from: s.paused_from,
            schedule,
            next_due_ms: 0,
            running: None,
            source_failover: None,
        }
    }

    /// The persistent part.
    pub fn snapshot(&self) -> ExtendedSnapshot {
        ExtendedSnapshot {
            state: self.state,
            acked: self.acked,
            stats: self.stats.clone(),
            last_error: self.last_error.clone(),
            paused_from: self.paused_from,
        }
    }

    /// State of the outgoing relationship.
    pub fn state(&self) -> ReplicationState {
        self.state
    }

    /// The point the extended replica acknowledged last.
    pub fn acked(&self) -> Option<CycleId> {
        self.acked
    }

    /// Statistics.
    pub fn stats(&self) -> &ReplicationStats {
        &self.stats
    }

    /// The last error, while failing.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Failures in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// The point a running cycle ships.
    pub fn running_point(&self) -> Option<CycleId> {
        self.running.map(|r| r.point)
    }

    /// The schedule.
    pub fn schedule(&self) -> &ExtSchedule {
        &self.schedule
    }

    /// The point the VM failed over from on this host, while it runs here.
    pub fn source_failover(&self) -> Option<CycleId> {
        self.source_failover
    }

    /// Health of the outgoing relationship now: a primary's rules, and while the VM runs here
    /// from a failover, a warning that the relationship ships nothing newer than the failover
    /// point until `reverse`.
    pub fn health(&self, now_ms: u64) -> HealthReport {
        let mut h = primary_health(
            self.state,
            &self.stats,
            self.consecutive_failures,
            self.last_error.as_deref(),
            now_ms,
        );
        if let Some(p) = self.source_failover {
            let held = match self.acked {
                Some(a) if a >= p => format!("the extended replica holds point {p}"),
                _ => format!("point {p} is still to be forwarded"),
            };
            h.push(
                Health::Warning,
                format!(
                    "the VM failed over on this host from point {p} ({held}); nothing newer is \
                     forwarded until `reverse`"
                ),
            );
        }
        h
    }

    /// Feed one event; the actions to carry out, or why the command is refused (a refused
    /// command changes nothing).
    pub fn step(&mut self, event: ExtEvent) -> Result<Vec<ExtAction>, Refusal> {
        use ReplicationState as S;
        let state = self.state;
        let refuse = |op| Err(Refusal::State { op, state });
        let mut out = Vec::new();
        match event {
            ExtEvent::Enable { now_ms } => {
                if state != S::Disabled {
                    return Err(Refusal::AlreadyEnabled { state });
                }
                *self = Self::new(self.schedule);
                self.stats.window_start_ms = now_ms;
                self.state = S::ReadyForInitialReplication;
                self.next_due_ms = now_ms;
                out.push(ExtAction::Persist);
            }
            ExtEvent::Tick { now_ms, newest } => self.tick(now_ms, newest, &mut out),
            ExtEvent::SourceFailover { now_ms, point } => {
                if point != self.source_failover {
                    self.source_failover = point;
                    // Look again at once: the failover point may still be to forward.
                    self.next_due_ms = self.next_due_ms.min(now_ms);
                }
            }
            ExtEvent::Reconciled {
                now_ms,
                latest,
                newest,
            } => {
                if latest == self.acked {
                    return Ok(out);
                }
                self.running = None;
                self.acked = latest;
                if latest.is_some() && state == S::InitialReplicationInProgress {
                    self.state = S::Replicating;
                }
                out.push(ExtAction::Persist);
                self.next_due_ms = now_ms;
                self.tick(now_ms, newest, &mut out);
            }
            ExtEvent::CycleSucceeded {
                now_ms,
                point,
                bytes,
                cut_ms,
            } => {
                let Some(run) = self.running.take() else {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                };
                let latency = now_ms.saturating_sub(run.started_ms);
                let st = &mut self.stats;
                st.successful_cycles += 1;
                st.total_bytes += bytes;
                st.max_bytes = st.max_bytes.max(bytes);
                st.total_latency_ms += latency;
                st.max_latency_ms = st.max_latency_ms.max(latency);
                st.last_replication_ms = Some(now_ms);
                st.last_point_cut_ms = Some(cut_ms);
                self.acked = Some(point.max(run.point));
                self.last_error = None;
                self.consecutive_failures = 0;
                if state == S::InitialReplicationInProgress {
                    self.state = S::Replicating;
                }
                self.next_due_ms = run.started_ms + self.schedule.frequency_ms;
                out.push(ExtAction::Persist);
            }
            ExtEvent::CycleFailed { now_ms, failure } => {
                if self.running.take().is_none() {
                    return Err(Refusal::NoCycleRunning {
                        op: Op::CycleOutcome,
                        state,
                    });
                }
                self.stats.errors += 1;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                match failure {
                    Failure::Fatal(m) => {
                        self.last_error = Some(m);
                        self.state = S::Error;
                    }
                    Failure::Retryable(m) | Failure::ResyncRequired(m) | Failure::WrongBase(m) => {
                        self.last_error = Some(m);
                        let shift = self.consecutive_failures.saturating_sub(1).min(16);
                        self.next_due_ms = now_ms
                            + self
                                .schedule
                                .retry_base_ms
                                .saturating_mul(1 << shift)
                                .min(self.schedule.retry_max_ms);
                    }
                }
                out.push(ExtAction::Persist);
            }
            ExtEvent::Pause { now_ms: _ } => match state {
                S::ReadyForInitialReplication
                | S::InitialReplicationInProgress
                | S::Replicating
                | S::Error => {
                    self.paused_from = Some(state);
                    self.state = S::Suspended;
                    if self.running.take().is_some() {
                        out.push(ExtAction::AbortCycle);
                    }
                    out.push(ExtAction::Persist);
                }
                S::Disabled => return Err(Refusal::NotEnabled { op: Op::Pause }),
                _ => return refuse(Op::Pause),
            },
            ExtEvent::Resume { now_ms } => match state {
                S::Suspended | S::Error => {
                    let back = match self.paused_from.take() {
                        Some(S::Error) | None => None,
                        Some(s) => Some(s),
                    };
                    self.state = back.unwrap_or(if self.acked.is_some() {
                        S::Replicating
                    } else {
                        S::ReadyForInitialReplication
                    });
                    if self.state == S::InitialReplicationInProgress {
                        self.state = S::ReadyForInitialReplication;
                    }
                    self.consecutive_failures = 0;
                    self.next_due_ms = now_ms;
                    out.push(ExtAction::Persist);
                }
                S::Disabled => return Err(Refusal::NotEnabled { op: Op::Resume }),
                _ => return refuse(Op::Resume),
            },
            ExtEvent::Disable { now_ms: _ } => {
                if state == S::Disabled {
                    return Err(Refusal::NotEnabled { op: Op::Disable });
                }
                if self.running.take().is_some() {
                    out.push(ExtAction::AbortCycle);
                }
                *self = Self::new(self.schedule);
                out.push(ExtAction::Persist);
            }
            ExtEvent::ResetStats { now_ms } => {
                self.stats = ReplicationStats {
                    window_start_ms: now_ms,
                    last_replication_ms: self.stats.last_replication_ms,
                    last_point_cut_ms: self.stats.last_point_cut_ms,
                    ..Default::default()
                };
                out.push(ExtAction::Persist);
            }
            ExtEvent::Restarted { now_ms } => {
                self.running = None;
                self.next_due_ms = now_ms;
                if state == S::InitialReplicationInProgress {
                    self.state = S::ReadyForInitialReplication;
                }
            }
        }
        Ok(out)
    }

    fn tick(&mut self, now_ms: u64, newest: Option<CycleId>, out: &mut Vec<ExtAction>) {
        use ReplicationState as S;
        if self.running.is_some() || self.next_due_ms > now_ms {
            return;
        }
        let Some(point) = newest else {
            return;
        };
        if self.source_failover.is_some_and(|p| point > p) {
            // The VM runs here from an older point: the newer ones are not its history.
            return;
        }
        match self.state {
            S::ReadyForInitialReplication | S::InitialReplicationInProgress => {
                if self.state == S::ReadyForInitialReplication {
                    self.state = S::InitialReplicationInProgress;
                    out.push(ExtAction::Persist);
                }
                self.start(now_ms, point, out);
            }
            S::Replicating if self.acked.is_some_and(|a| a >= point) => {
                // Nothing newer to forward: look again at the next interval.
                self.next_due_ms = now_ms + self.schedule.frequency_ms;
            }
            S::Replicating => self.start(now_ms, point, out),
            _ => {}
        }
    }

    fn start(&mut self, now_ms: u64, point: CycleId, out: &mut Vec<ExtAction>) {
        let base = self.acked.filter(|a| *a < point);
        self.running = Some(Running {
            point,
            base,
            started_ms: now_ms,
        });
        out.push(ExtAction::StartCycle { point, base });
    }

    /// The running cycle's base, for the driver's reconciliation.
    pub fn running_base(&self) -> Option<Option<CycleId>> {
        self.running.map(|r| r.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    const F: u64 = 30_000;

    fn enabled() -> ExtendedMachine {
        let mut m = ExtendedMachine::new(ExtSchedule::every(F));
        assert_eq!(
            m.step(ExtEvent::Enable { now_ms: 0 }),
            Ok(vec![ExtAction::Persist])
        );
        m
    }

    fn start_of(a: &[ExtAction]) -> Option<(CycleId, Option<CycleId>)> {
        a.iter().find_map(|x| match x {
            ExtAction::StartCycle { point, base } => Some((*point, *base)),
            _ => None,
        })
    }

    fn tick(m: &mut ExtendedMachine, now_ms: u64, newest: Option<CycleId>) -> Vec<ExtAction> {
        m.step(ExtEvent::Tick { now_ms, newest }).expect("tick")
    }

    fn ok(m: &mut ExtendedMachine, now_ms: u64) {
        let point = m.running_point().expect("a cycle runs");
        m.step(ExtEvent::CycleSucceeded {
            now_ms,
            point,
            bytes: 10,
            cut_ms: now_ms,
        })
        .expect("success");
    }

    #[test]
    fn first_cycle_is_a_full_copy_of_the_newest_point_once_one_exists() {
        let mut m = enabled();
        assert_eq!(start_of(&tick(&mut m, 1, None)), None);
        assert_eq!(m.state(), S::ReadyForInitialReplication);
        assert_eq!(start_of(&tick(&mut m, 2, Some(7))), Some((7, None)));
        assert_eq!(m.state(), S::InitialReplicationInProgress);
        ok(&mut m, 3);
        assert_eq!((m.state(), m.acked()), (S::Replicating, Some(7)));
        assert_eq!(m.stats().successful_cycles, 1);
    }

    /// Table: the VM failed over on this host at point `fo` (acked, newest, fo, what the next
    /// tick starts, the health then): the failover point and older ones are still forwarded
    /// (a planned failover's final point), newer ones are not (no longer the VM's history);
    /// the health is Warning and says so until the failover ends.
    #[test]
    fn a_failover_on_this_host_forwards_up_to_its_point_and_warns() {
        type Started = Option<(CycleId, Option<CycleId>)>;
        let table: &[(CycleId, CycleId, CycleId, Started, &str)] = &[
            // Planned failover: A's final point 9 arrived, C has 8: 9 is forwarded.
            (
                8,
                9,
                9,
                Some((9, Some(8))),
                "point 9 is still to be forwarded",
            ),
            // C has the failover point already: nothing to do.
            (9, 9, 9, None, "the extended replica holds point 9"),
            // Unplanned failover to an older point: the newer points stay here.
            (7, 9, 8, None, "point 8 is still to be forwarded"),
            (8, 9, 8, None, "the extended replica holds point 8"),
        ];
        for (acked, newest, fo, want, says) in table {
            let mut m = enabled();
            tick(&mut m, 1, Some(*acked));
            ok(&mut m, 2);
            assert_eq!(m.health(3).health, Health::Normal, "{m:?}");
            m.step(ExtEvent::SourceFailover {
                now_ms: 3,
                point: Some(*fo),
            })
            .expect("failover is never refused");
            assert_eq!(m.source_failover(), Some(*fo));
            // At once, before the interval is due: the failover point may be to forward.
            assert_eq!(start_of(&tick(&mut m, 4, Some(*newest))), *want, "{m:?}");
            let h = m.health(5);
            assert_eq!(h.health, Health::Warning, "{h:?}");
            assert!(
                h.reason().contains(says) && h.reason().contains("until `reverse`"),
                "{h:?}"
            );
            if want.is_some() {
                ok(&mut m, 6);
                assert_eq!(m.acked(), Some(*fo));
                assert!(m.health(7).reason().contains("holds point"));
            }
            // Failover cancelled: the newest point goes again at the next due tick.
            m.step(ExtEvent::SourceFailover {
                now_ms: 8,
                point: None,
            })
            .expect("never refused");
            assert_eq!(m.health(9).health, Health::Normal);
            let next = start_of(&tick(&mut m, 9 + F, Some(*newest)));
            assert_eq!(
                next,
                (m.acked() < Some(*newest)).then_some((*newest, m.acked()))
            );
        }
    }

    /// A failing relationship keeps its Critical level when the failover warning is added.
    #[test]
    fn the_failover_warning_does_not_hide_a_failure() {
        let mut m = enabled();
        tick(&mut m, 1, Some(7));
        m.step(ExtEvent::CycleFailed {
            now_ms: 2,
            failure: Failure::Retryable("refused".into()),
        })
        .expect("failure");
        m.step(ExtEvent::SourceFailover {
            now_ms: 3,
            point: Some(7),
        })
        .expect("never refused");
        let h = m.health(4);
        assert_eq!(h.health, Health::Critical);
        assert_eq!(h.reasons.len(), 3, "{h:?}");
        assert!(h.reasons[2].contains("failed over on this host"), "{h:?}");
    }

    /// Table: (acked, newest, what the next due tick starts).
    #[test]
    fn each_cycle_ships_the_newest_point_since_the_acknowledged_one() {
        type Started = Option<(CycleId, Option<CycleId>)>;
        let table: &[(CycleId, Option<CycleId>, Started)] = &[
            (7, Some(8), Some((8, Some(7)))),
            // Points the replica made meanwhile (and maybe pruned) are covered by one cycle.
            (7, Some(15), Some((15, Some(7)))),
            // Nothing newer: no cycle.
            (7, Some(7), None),
            (7, None, None),
        ];
        for (acked, newest, want) in table {
            let mut m = enabled();
            tick(&mut m, 1, Some(*acked));
            ok(&mut m, 2);
            assert_eq!(start_of(&tick(&mut m, F - 1, *newest)), None, "not due yet");
            assert_eq!(
                start_of(&tick(&mut m, F + 1, *newest)),
                *want,
                "{acked} {newest:?}"
            );
        }
    }

    #[test]
    fn reconciliation_adopts_what_the_extended_replica_holds() {
        let mut m = enabled();
        tick(&mut m, 1, Some(3));
        ok(&mut m, 2);
        let a = tick(&mut m, F + 1, Some(9));
        assert_eq!(start_of(&a), Some((9, Some(3))));
        // Same answer: run the cycle as started.
        let same = m.step(ExtEvent::Reconciled {
            now_ms: F + 2,
            latest: Some(3),
            newest: Some(9),
        });
        assert_eq!(same, Ok(vec![]));
        assert_eq!(m.running_point(), Some(9));
        // A lost acknowledgement: the replica holds 9 already; nothing to send.
        let a = m
            .step(ExtEvent::Reconciled {
                now_ms: F + 3,
                latest: Some(9),
                newest: Some(9),
            })
            .expect("reconciled");
        assert_eq!(start_of(&a), None);
        assert_eq!((m.acked(), m.running_point()), (Some(9), None));
        // The extended replica lost everything: a full copy.
        let a = m
            .step(ExtEvent::Reconciled {
                now_ms: 2 * F,
                latest: None,
                newest: Some(12),
            })
            .expect("reconciled");
        assert_eq!(start_of(&a), Some((12, None)));
    }

    #[test]
    fn failures_back_off_and_a_fatal_one_stops_until_resume() {
        let mut m = enabled();
        tick(&mut m, 1, Some(3));
        ok(&mut m, 2);
        tick(&mut m, F + 1, Some(4));
        m.step(ExtEvent::CycleFailed {
            now_ms: F + 2,
            failure: Failure::Retryable("down".into()),
        })
        .expect("failed");
        assert_eq!(m.last_error(), Some("down"));
        assert_eq!(start_of(&tick(&mut m, F + 2 + 999, Some(4))), None);
        assert_eq!(
            start_of(&tick(&mut m, F + 2 + 1000, Some(4))),
            Some((4, Some(3)))
        );
        m.step(ExtEvent::CycleFailed {
            now_ms: F + 1003,
            failure: Failure::Retryable("down".into()),
        })
        .expect("failed");
        // Doubled.
        assert_eq!(start_of(&tick(&mut m, F + 1003 + 1999, Some(4))), None);
        assert!(start_of(&tick(&mut m, F + 1003 + 2000, Some(4))).is_some());
        m.step(ExtEvent::CycleFailed {
            now_ms: 2 * F,
            failure: Failure::Fatal("unauthorized".into()),
        })
        .expect("failed");
        assert_eq!(m.state(), S::Error);
        assert_eq!(start_of(&tick(&mut m, 10 * F, Some(4))), None);
        m.step(ExtEvent::Resume { now_ms: 10 * F }).expect("resume");
        assert_eq!(m.state(), S::Replicating);
        assert_eq!(start_of(&tick(&mut m, 10 * F, Some(4))), Some((4, Some(3))));
    }

    /// Table: state x admin command -> accepted (new state) or refused.
    #[test]
    fn admin_commands_by_state() {
        let paused = |from: Option<S>| {
            let mut m = enabled();
            if from == Some(S::Replicating) {
                tick(&mut m, 1, Some(1));
                ok(&mut m, 2);
            }
            m.step(ExtEvent::Pause { now_ms: 3 }).expect("pause");
            m
        };
        let mut replicating = enabled();
        tick(&mut replicating, 1, Some(1));
        ok(&mut replicating, 2);
        let mut running = replicating.clone();
        tick(&mut running, F + 1, Some(2));
        let disabled = ExtendedMachine::new(ExtSchedule::every(F));
        type Cmd = fn(u64) -> ExtEvent;
        let pause: Cmd = |now_ms| ExtEvent::Pause { now_ms };
        let resume: Cmd = |now_ms| ExtEvent::Resume { now_ms };
        let disable: Cmd = |now_ms| ExtEvent::Disable { now_ms };
        let enable: Cmd = |now_ms| ExtEvent::Enable { now_ms };
        /// What, the machine, the command, the state it leads to (or refused), aborts.
        type Row = (&'static str, ExtendedMachine, Cmd, Result<S, ()>, bool);
        let table: Vec<Row> = vec![
            (
                "replicating",
                replicating.clone(),
                pause,
                Ok(S::Suspended),
                false,
            ),
            ("running", running.clone(), pause, Ok(S::Suspended), true),
            ("running", running.clone(), disable, Ok(S::Disabled), true),
            ("replicating", replicating.clone(), resume, Err(()), false),
            ("replicating", replicating.clone(), enable, Err(()), false),
            (
                "paused",
                paused(Some(S::Replicating)),
                resume,
                Ok(S::Replicating),
                false,
            ),
            (
                "paused initial",
                paused(None),
                resume,
                Ok(S::ReadyForInitialReplication),
                false,
            ),
            ("paused", paused(None), pause, Err(()), false),
            ("paused", paused(None), disable, Ok(S::Disabled), false),
            ("disabled", disabled.clone(), pause, Err(()), false),
            ("disabled", disabled.clone(), resume, Err(()), false),
            ("disabled", disabled.clone(), disable, Err(()), false),
            (
                "disabled",
                disabled,
                enable,
                Ok(S::ReadyForInitialReplication),
                false,
            ),
        ];
        for (what, mut m, cmd, want, aborts) in table {
            let before = m.clone();
            let ev = cmd(5 * F);
            match (m.step(ev.clone()), want) {
                (Ok(a), Ok(s)) => {
                    assert_eq!(m.state(), s, "{what}: {ev:?}");
                    assert_eq!(a.contains(&ExtAction::AbortCycle), aborts, "{what}: {ev:?}");
                    assert!(a.contains(&ExtAction::Persist), "{what}: {ev:?}");
                }
                (Err(_), Err(())) => assert_eq!(m, before, "{what}: a refusal changes nothing"),
                (got, want) => panic!("{what}: {ev:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_paused_relationship_starts_nothing_and_outcomes_need_a_cycle() {
        let mut m = enabled();
        tick(&mut m, 1, Some(1));
        ok(&mut m, 2);
        m.step(ExtEvent::Pause { now_ms: 3 }).expect("pause");
        assert_eq!(start_of(&tick(&mut m, 100 * F, Some(50))), None);
        assert!(
            m.step(ExtEvent::CycleSucceeded {
                now_ms: 4,
                point: 2,
                bytes: 1,
                cut_ms: 1
            })
            .is_err()
        );
        // Restored from its snapshot after a restart: the same decisions.
        let mut r = ExtendedMachine::restore(ExtSchedule::every(F), m.snapshot());
        r.step(ExtEvent::Restarted { now_ms: 5 })
            .expect("restarted");
        assert_eq!((r.state(), r.acked()), (S::Suspended, Some(1)));
        r.step(ExtEvent::Resume { now_ms: 6 }).expect("resume");
        assert_eq!(start_of(&tick(&mut r, 6, Some(50))), Some((50, Some(1))));
    }
}
