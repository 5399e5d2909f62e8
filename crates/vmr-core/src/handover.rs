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

/// Outcome of [`PrimaryMachine::become_replica`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The replica machine this host runs from now on.
    pub replica: ReplicaMachine,
    /// A planned failover's handover: this primary shipped exactly the point the new primary
    /// runs from, so its disks need no resynchronization.
    pub planned: bool,
}

impl PrimaryMachine {
    /// The new primary (after a failover on the replica) asks this one to become its replica
    /// from recovery point `point`. Refused when replication is not enabled here. The caller
    /// stops this VM's driver and replaces the machine by the returned replica machine.
    pub fn become_replica(&self, now_ms: u64, point: CycleId) -> Result<Handover, Refusal> {
        if self.state() == ReplicationState::Disabled {
            return Err(Refusal::NotEnabled {
                op: Op::BecomeReplica,
            });
        }
        Ok(Handover {
            replica: ReplicaMachine::from_point(now_ms, point),
            planned: self.state() == ReplicationState::PreparedForFailover
                && self.last_cycle() == Some(point),
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
