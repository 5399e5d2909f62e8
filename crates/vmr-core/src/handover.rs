//! Where one side's machine becomes the other's: reverse replication turns a failed-over
//! replica machine into a primary machine, and the old primary hands over to a replica
//! machine when the new primary asks it to become its replica. Kept apart from both machines
//! so that neither imports the other.

use vmr_proto::CycleId;
use vmr_proto::api::ReplicationState;

use crate::primary::PrimaryMachine;
use crate::refusal::{Op, Refusal};
use crate::replica::ReplicaMachine;
use crate::schedule::Schedule;

/// What this host's replica store holds of the VM when the new primary asks it to become
/// the replica: the facts [`PrimaryMachine::become_replica`] decides on (gathered by the
/// agent from the store and the failover record; no decision of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCopy {
    /// The store does not hold the VM (this host was never its replica, or no longer is).
    Absent,
    /// The store holds the VM from when this host was its replica.
    Held {
        /// The point of the store's failover view that the VM's disks here are (the
        /// failed-over VM's overlays), if they are one.
        disks_on_view: Option<CycleId>,
        /// Views of the VM's points other than that one (test copies).
        other_views: u32,
        /// The store's latest point.
        latest: Option<CycleId>,
    },
}

/// How this host's store takes the new primary's point in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Register the VM and import this host's own images as the point (nothing copied).
    Import,
    /// Re-adopt: the failover view's overlays (point `view_point` plus what the VM wrote
    /// here) become the point's layers in the store's existing chain (nothing copied).
    Readopt {
        /// The point the view (and so the disks) is built on.
        view_point: CycleId,
    },
    /// The store already holds the point as its latest (an earlier become-replica committed
    /// it before it could answer): nothing to do in the store.
    Kept,
}

/// Outcome of [`PrimaryMachine::become_replica`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The replica machine this host runs from now on.
    pub replica: ReplicaMachine,
    /// A planned failover's handover: this primary shipped exactly the point the new primary
    /// runs from, so its disks need no resynchronization.
    pub planned: bool,
    /// How the store takes the point in.
    pub adoption: Adoption,
}

impl PrimaryMachine {
    /// The new primary (after a failover on the replica) asks this one to become its replica
    /// from recovery point `point`; `local` is what this host's store holds of the VM.
    /// Refused when replication is not enabled here, when the store holds the VM but the
    /// disks here are not its failover view (and it does not hold `point` already), when test
    /// copies run on it, or when `point` is not newer than the view's point. The caller stops
    /// this VM's driver, carries out the adoption and replaces the machine by the returned
    /// replica machine.
    pub fn become_replica(
        &self,
        now_ms: u64,
        point: CycleId,
        local: LocalCopy,
    ) -> Result<Handover, Refusal> {
        let op = Op::BecomeReplica;
        if self.state() == ReplicationState::Disabled {
            return Err(Refusal::NotEnabled { op });
        }
        let adoption = match local {
            LocalCopy::Absent => Adoption::Import,
            LocalCopy::Held {
                other_views: count @ 1..,
                ..
            } => return Err(Refusal::TestCopiesRun { op, count }),
            LocalCopy::Held {
                disks_on_view: Some(view_point),
                ..
            } if point <= view_point => {
                return Err(Refusal::PointNotNewer {
                    op,
                    point,
                    view_point,
                });
            }
            LocalCopy::Held {
                disks_on_view: Some(view_point),
                ..
            } => Adoption::Readopt { view_point },
            LocalCopy::Held {
                disks_on_view: None,
                latest: Some(l),
                ..
            } if l == point => Adoption::Kept,
            LocalCopy::Held { .. } => return Err(Refusal::StoreCopyUnrelated { op }),
        };
        Ok(Handover {
            replica: ReplicaMachine::from_point(now_ms, point),
            planned: self.state() == ReplicationState::PreparedForFailover
                && self.last_cycle() == Some(point),
            adoption,
        })
    }
}

impl ReplicaMachine {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::Event;

    /// A primary that shipped cycles 1..=7 and is PreparedForFailover at 7.
    fn prepared() -> PrimaryMachine {
        let mut m = PrimaryMachine::reversed(Schedule::every(60_000), 1_000, 6, vec![10], false);
        let _ = m.step(Event::PrepareFailover { now_ms: 2_000 });
        let _ = m.step(Event::CycleSucceeded {
            now_ms: 3_000,
            bytes: 1,
            app_consistent: false,
            pending_bytes: Some(0),
            disk_sizes: None,
        });
        m
    }

    #[test]
    fn become_replica_picks_the_adoption_from_what_the_store_holds() {
        let m = prepared();
        assert_eq!(m.state(), ReplicationState::PreparedForFailover);
        assert_eq!(m.last_cycle(), Some(7));
        let held = |disks_on_view, other_views, latest| LocalCopy::Held {
            disks_on_view,
            other_views,
            latest,
        };
        let op = Op::BecomeReplica;
        type Row = (CycleId, LocalCopy, Result<(Adoption, bool), Refusal>);
        let table: Vec<Row> = vec![
            // Never this VM's replica: import the own images (first reverse).
            (7, LocalCopy::Absent, Ok((Adoption::Import, true))),
            (5, LocalCopy::Absent, Ok((Adoption::Import, false))),
            // Disks are the store's view on point 3: re-adopt (ping-pong).
            (
                7,
                held(Some(3), 0, Some(3)),
                Ok((Adoption::Readopt { view_point: 3 }, true)),
            ),
            // Unplanned / older point: re-adopt too, resynchronised afterwards.
            (
                5,
                held(Some(3), 0, Some(4)),
                Ok((Adoption::Readopt { view_point: 3 }, false)),
            ),
            // A point not newer than the view's cannot sit on top of it.
            (
                3,
                held(Some(3), 0, Some(3)),
                Err(Refusal::PointNotNewer {
                    op,
                    point: 3,
                    view_point: 3,
                }),
            ),
            // Test copies pin points of the chain.
            (
                7,
                held(Some(3), 2, Some(3)),
                Err(Refusal::TestCopiesRun { op, count: 2 }),
            ),
            (
                7,
                held(None, 1, Some(7)),
                Err(Refusal::TestCopiesRun { op, count: 1 }),
            ),
            // The store already committed the point (an earlier attempt): keep it.
            (7, held(None, 0, Some(7)), Ok((Adoption::Kept, true))),
            // Points the disks here are not built on: refused, nothing changes.
            (
                7,
                held(None, 0, Some(3)),
                Err(Refusal::StoreCopyUnrelated { op }),
            ),
            (
                7,
                held(None, 0, None),
                Err(Refusal::StoreCopyUnrelated { op }),
            ),
        ];
        for (point, local, want) in table {
            let got = m
                .become_replica(9, point, local)
                .map(|h| (h.adoption, h.planned));
            assert_eq!(got, want, "point {point}, {local:?}");
            if let Ok(h) = m.become_replica(9, point, local) {
                assert_eq!(h.replica.state(), ReplicationState::Replicating);
                assert_eq!(h.replica.last_cycle(), Some(point));
            }
        }
        // Not enabled is refused before anything else.
        let d = PrimaryMachine::new(Schedule::every(60_000));
        assert_eq!(
            d.become_replica(1, 7, held(Some(3), 0, Some(3))),
            Err(Refusal::NotEnabled { op })
        );
    }
}
