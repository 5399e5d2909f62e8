//! The replication state, health and side of a VM (Hyper-V's `VMReplicationState`,
//! `ReplicationHealth` and `ReplicationMode`), which the control API, the machines' snapshots
//! and the events all name; `api` re-exports them.

use serde::{Deserialize, Serialize};

/// Hyper-V's replication states (`VMReplicationState`), by their PowerShell names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    /// Replication is not enabled.
    Disabled,
    /// Enabled; initial replication has not started (scheduled or manual).
    ReadyForInitialReplication,
    /// The primary is sending the initial copy.
    InitialReplicationInProgress,
    /// The replica waits for (or receives) the initial copy.
    WaitingForInitialReplication,
    /// Cycles are being shipped.
    Replicating,
    /// Paused by the admin.
    Suspended,
    /// A non-recoverable error stopped replication.
    Error,
    /// Change tracking was lost or the replica refused the base: a resync must be started.
    WaitingForStartResynchronize,
    /// A resync is running.
    Resynchronizing,
    /// A resync was paused.
    ResynchronizeSuspended,
    /// Planned failover: the primary shipped its final cycle and is locked.
    PreparedForFailover,
    /// The replica runs the VM from a point; not yet completed or cancelled.
    FailedOverWaitingCompletion,
    /// Failover completed.
    FailedOver,
}

impl std::fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Replication health, Hyper-V's three levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// All good.
    Normal,
    /// Needs attention soon.
    Warning,
    /// Replication is not protecting the VM.
    Critical,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Which side of a replication relationship this host is for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMode {
    /// This host runs the VM and ships cycles.
    Primary,
    /// This host receives cycles.
    Replica,
}
