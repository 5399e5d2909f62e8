//! Persisted snapshots of the `vmr-core` replication machines: what the agent stores for one
//! VM so that its primary or replica machine can be rebuilt after a restart
//! (`PrimaryMachine::snapshot` / `PrimaryMachine::restore`, same for the replica).
//!
//! Every field has a serde default, so a record written before a field existed still loads;
//! a running cycle is never part of a snapshot.

use serde::{Deserialize, Serialize};

use crate::api::{ReplicationState, ReplicationStats};

fn disabled() -> ReplicationState {
    ReplicationState::Disabled
}

fn waiting() -> ReplicationState {
    ReplicationState::WaitingForInitialReplication
}

/// The persisted part of a primary machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrimarySnapshot {
    /// Replication state.
    #[serde(default = "disabled")]
    pub state: ReplicationState,
    /// Last cycle acknowledged by the replica and committed.
    pub last_cycle: Option<u64>,
    /// Disk sizes at the last committed cycle.
    pub disk_sizes: Option<Vec<u64>>,
    /// Statistics.
    pub stats: ReplicationStats,
    /// Last error message.
    pub last_error: Option<String>,
    /// When initial replication (or a scheduled resynchronization) is due.
    pub initial_at_ms: Option<u64>,
    /// State to return to on resume.
    pub paused_from: Option<ReplicationState>,
    /// The last verification found the replica's point differing from the primary (its
    /// summary): the next resynchronization reads the replica's data instead of trusting its
    /// block-hash index. Cleared by a successful resynchronization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_mismatch: Option<String>,
}

impl Default for PrimarySnapshot {
    fn default() -> Self {
        Self {
            state: disabled(),
            last_cycle: None,
            disk_sizes: None,
            stats: ReplicationStats::default(),
            last_error: None,
            initial_at_ms: None,
            paused_from: None,
            verify_mismatch: None,
        }
    }
}

/// The persisted part of a replica machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicaSnapshot {
    /// Replication state.
    #[serde(default = "waiting")]
    pub state: ReplicationState,
    /// Latest applied cycle (recovery point).
    pub last_cycle: Option<u64>,
    /// Statistics.
    pub stats: ReplicationStats,
    /// Last apply error.
    pub last_error: Option<String>,
    /// State to return to on resume.
    pub paused_from: Option<ReplicationState>,
    /// State before a started failover (restored by cancel).
    pub before_failover: Option<ReplicationState>,
}

impl Default for ReplicaSnapshot {
    fn default() -> Self {
        Self {
            state: waiting(),
            last_cycle: None,
            stats: ReplicationStats::default(),
            last_error: None,
            paused_from: None,
            before_failover: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_load_with_defaults() {
        let p: PrimarySnapshot =
            serde_json::from_str(r#"{"state":"Replicating","last_cycle":4}"#).expect("primary");
        assert_eq!(p.state, ReplicationState::Replicating);
        assert_eq!(p.last_cycle, Some(4));
        assert_eq!(p.disk_sizes, None);
        let p: PrimarySnapshot = serde_json::from_str("{}").expect("empty primary");
        assert_eq!(p, PrimarySnapshot::default());
        assert_eq!(p.state, ReplicationState::Disabled);
        let r: ReplicaSnapshot = serde_json::from_str("{}").expect("empty replica");
        assert_eq!(r.state, ReplicationState::WaitingForInitialReplication);
        // Unknown fields from a newer version are ignored.
        let r: ReplicaSnapshot =
            serde_json::from_str(r#"{"state":"Suspended","future":1}"#).expect("newer replica");
        assert_eq!(r.state, ReplicationState::Suspended);
    }

    #[test]
    fn round_trip() {
        let p = PrimarySnapshot {
            state: ReplicationState::Suspended,
            last_cycle: Some(9),
            disk_sizes: Some(vec![1, 2]),
            stats: ReplicationStats {
                successful_cycles: 3,
                ..Default::default()
            },
            last_error: Some("x".into()),
            initial_at_ms: Some(5),
            paused_from: Some(ReplicationState::Replicating),
            verify_mismatch: Some("1 block".into()),
        };
        let text = serde_json::to_string(&p).expect("json");
        assert_eq!(
            serde_json::from_str::<PrimarySnapshot>(&text).expect("back"),
            p
        );
    }
}

/// The persisted part of an extended relationship's machine (this host, a replica, forwards
/// the VM's recovery points to a third host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtendedSnapshot {
    /// Replication state of the outgoing relationship.
    #[serde(default = "disabled")]
    pub state: ReplicationState,
    /// The last point the extended replica acknowledged (what the next cycle builds on).
    pub acked: Option<u64>,
    /// Statistics.
    pub stats: ReplicationStats,
    /// Last error message.
    pub last_error: Option<String>,
    /// State to return to on resume.
    pub paused_from: Option<ReplicationState>,
}

impl Default for ExtendedSnapshot {
    fn default() -> Self {
        Self {
            state: disabled(),
            acked: None,
            stats: ReplicationStats::default(),
            last_error: None,
            paused_from: None,
        }
    }
}
