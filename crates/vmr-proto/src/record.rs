//! The agent's persisted record of one VM (`state.db`): what the VM is, its replication
//! settings, and its decision machine as that machine's own snapshot; and the schema-1 record
//! it migrates from.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::{EnableArgs, ReplicationMode, ReplicationState, ReplicationStats};
use crate::machine::{ExtendedSnapshot, PrimarySnapshot, ReplicaSnapshot};
pub use crate::vmdef::LibvirtSource;

/// The persisted record of one VM on this host (`state.db` schema 2): what it is, its
/// replication settings, and its decision machine as the machine's own snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// QMP socket (primary).
    pub qmp: String,
    /// VM definition TOML text.
    pub launch_toml: String,
    /// Replicated disks (node names).
    pub disks: Vec<String>,
    /// Replication settings (primary), once enabled.
    pub enable: Option<EnableArgs>,
    /// Name of the primary (replica side) or this agent (primary side).
    pub primary: String,
    /// Trust group that created the replica VM (replica side).
    pub trust_group: Option<String>,
    /// Replica side: the primary's cycle interval in seconds, as its last `create-replica`
    /// said (absent in records written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_secs: Option<u64>,
    /// Primary side: the NBD socket named at `vm add --nbd` (a stand-in VM serving its disks
    /// there), which the capture reads through instead of the agent's own path
    /// (`DIR/work/<uuid>/vmr-<tag>-nbd.sock`); absent = the agent's path. Dropped when the
    /// agent starts the VM itself (failover, reverse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    /// Primary side: the host end of the VM's guest agent channel (`vm add --qga`, or the
    /// agent's own `{qga}` path when it started the VM: failover, reverse); absent = no
    /// guest agent (app-consistent cycles are then crash-consistent, `--shutdown` uses ACPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qga: Option<String>,
    /// This host's failover network settings for the VM (`vm set --failover-*`): applied when
    /// a real failover starts the VM here; kept across reverse and become-replica.
    #[serde(default, skip_serializing_if = "crate::FailoverSettings::is_empty")]
    pub failover: crate::FailoverSettings,
    /// The VM's machine; its side is the VM's mode on this host.
    pub machine: MachineSnapshot,
    /// This host's RPO alert for the VM, seconds (`set --rpo-alert`; on the primary also
    /// `enable --rpo-alert`); absent = twice the frequency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_alert_secs: Option<u64>,
    /// Replica side: the extended (outgoing) relationship that forwards this VM's recovery
    /// points to a third host (`enable --extended`), when enabled; absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<ExtendedRecord>,
    /// Primary side: the consistency group the VM is a member of (`group create`,
    /// docs/groups.md); absent = none (and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Primary side: the VM is libvirt-managed (`vm add --libvirt`) and captured through
    /// libvirt's backup API instead of QMP; absent = a QMP-captured VM (and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtSource>,
    /// Primary side, fan-out (issue 15 part 4): the VM's further relationships to other
    /// replicas, after the first (`enable`/`machine` above, relationship 1); relationship `i + 2`
    /// is `fanout[i]`. Empty = one relationship (and in older records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fanout: Vec<FanoutRecord>,
    /// Automatic failover with a witness (`docs/auto-failover.md`): its settings on either
    /// side (the primary's from `enable --auto-failover`, the replica's from the primary's
    /// `create-replica`); absent = off (and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<crate::lease::AutoFailover>,
    /// Primary side with automatic failover: the lease holder's persisted part (its epoch, and
    /// why it fenced the VM: a fenced primary stays fenced across restarts).
    #[serde(
        default,
        skip_serializing_if = "crate::lease::HolderSnapshot::is_default"
    )]
    pub lease: crate::lease::HolderSnapshot,
}

/// A further relationship of a primary VM to another replica (fan-out): its settings, its
/// machine's snapshot and the index of its tracking bitmaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutRecord {
    /// `enable` arguments of this relationship (its replica, frequency, retention, ...).
    pub args: EnableArgs,
    /// Its primary machine.
    #[serde(default)]
    pub machine: PrimarySnapshot,
    /// Index in its tracking bitmaps' and capture nodes' names (`vmr-<tag>r<slot>-...`), kept
    /// for the relationship's life so that a removal of another never renames its bitmaps.
    pub slot: u32,
}

/// The extended relationship of a replica VM: its settings and its machine's snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtendedRecord {
    /// `enable --extended` arguments (the extended replica's address and fingerprint,
    /// frequency, recovery points).
    pub args: EnableArgs,
    /// The extended relationship's machine.
    #[serde(default)]
    pub machine: ExtendedSnapshot,
}

impl VmRecord {
    /// The machine's state.
    pub fn state(&self) -> ReplicationState {
        match &self.machine {
            MachineSnapshot::Primary(s) => s.state,
            MachineSnapshot::Replica(s) => s.state,
        }
    }

    /// The machine's last replicated cycle.
    pub fn last_cycle(&self) -> Option<u64> {
        match &self.machine {
            MachineSnapshot::Primary(s) => s.last_cycle,
            MachineSnapshot::Replica(s) => s.last_cycle,
        }
    }

    /// Disk sizes at the last committed cycle (primary).
    pub fn disk_sizes(&self) -> Option<&[u64]> {
        match &self.machine {
            MachineSnapshot::Primary(s) => s.disk_sizes.as_deref(),
            MachineSnapshot::Replica(_) => None,
        }
    }

    /// Primary or replica on this host.
    pub fn mode(&self) -> ReplicationMode {
        match self.machine {
            MachineSnapshot::Primary(_) => ReplicationMode::Primary,
            MachineSnapshot::Replica(_) => ReplicationMode::Replica,
        }
    }
}

/// A VM's machine as persisted: which side this host is on, and that side's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "side", rename_all = "snake_case")]
pub enum MachineSnapshot {
    /// This host is the VM's primary.
    Primary(PrimarySnapshot),
    /// This host holds the VM's replica.
    Replica(ReplicaSnapshot),
}

/// A VM record as `state.db` schema 1 stored it (the machine's fields loose in the record);
/// read only to migrate a schema-1 database to schema 2.
#[derive(Debug, Clone, Deserialize)]
pub struct VmRecordV1 {
    name: String,
    uuid: Uuid,
    mode: ReplicationMode,
    qmp: String,
    launch_toml: String,
    disks: Vec<String>,
    enable: Option<EnableArgs>,
    state: ReplicationState,
    paused_from: Option<ReplicationState>,
    last_cycle: Option<u64>,
    disk_sizes: Option<Vec<u64>>,
    stats: ReplicationStats,
    initial_at_ms: Option<u64>,
    primary: String,
    trust_group: Option<String>,
    last_error: Option<String>,
}

impl From<VmRecordV1> for VmRecord {
    fn from(r: VmRecordV1) -> VmRecord {
        let machine = match r.mode {
            ReplicationMode::Primary => MachineSnapshot::Primary(PrimarySnapshot {
                state: r.state,
                last_cycle: r.last_cycle,
                disk_sizes: r.disk_sizes,
                stats: r.stats,
                last_error: r.last_error,
                initial_at_ms: r.initial_at_ms,
                paused_from: r.paused_from,
                ..Default::default()
            }),
            ReplicationMode::Replica => MachineSnapshot::Replica(ReplicaSnapshot {
                state: r.state,
                last_cycle: r.last_cycle,
                stats: r.stats,
                last_error: r.last_error,
                paused_from: r.paused_from,
                before_failover: None,
            }),
        };
        VmRecord {
            name: r.name,
            uuid: r.uuid,
            qmp: r.qmp,
            launch_toml: r.launch_toml,
            disks: r.disks,
            enable: r.enable,
            primary: r.primary,
            trust_group: r.trust_group,
            frequency_secs: None,
            nbd: None,
            qga: None,
            failover: Default::default(),
            machine,
            rpo_alert_secs: None,
            extended: None,
            group: None,
            libvirt: None,
            fanout: Vec::new(),
            auto_failover: None,
            lease: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        VmRecord {
            name: "web1".into(),
            uuid: Uuid::nil(),
            qmp: "/run/web1.qmp".into(),
            launch_toml: String::new(),
            disks: vec!["disk0".into()],
            enable: None,
            primary: "host-a".into(),
            trust_group: None,
            frequency_secs: None,
            nbd: None,
            qga: None,
            failover: Default::default(),
            machine: MachineSnapshot::Primary(Default::default()),
            rpo_alert_secs: None,
            extended: None,
            group: None,
            libvirt: None,
            fanout: Vec::new(),
            auto_failover: None,
            lease: Default::default(),
        }
    }

    #[test]
    fn a_record_without_libvirt_loads_and_stays_without_it() {
        let json = serde_json::to_string(&record()).expect("encode");
        // what an agent before `vm add --libvirt` wrote
        assert!(!json.contains("libvirt"), "{json}");
        let back: VmRecord = serde_json::from_str(&json).expect("an old record loads");
        assert_eq!(back.libvirt, None);
    }

    #[test]
    fn a_record_without_fanout_loads_and_fanout_relationships_round_trip() {
        let json = serde_json::to_string(&record()).expect("encode");
        // what an agent before fan-out wrote
        assert!(!json.contains("fanout"), "{json}");
        let back: VmRecord = serde_json::from_str(&json).expect("an old record loads");
        assert!(back.fanout.is_empty());
        let mut rec = record();
        let args: EnableArgs = serde_json::from_value(serde_json::json!({
            "name": "web1", "replica": "host-c:9443", "replica_fingerprint": "SHA256:c",
            "frequency_secs": 30, "recovery_points": 4, "app_consistent_every_hours": 0,
            "exclude_disks": [], "compression": true, "initial_at_ms": null
        }))
        .expect("args");
        rec.fanout.push(FanoutRecord {
            args,
            machine: PrimarySnapshot::default(),
            slot: 1,
        });
        let json = serde_json::to_string(&rec).expect("encode");
        let back: VmRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, rec);
    }

    #[test]
    fn the_libvirt_source_and_acknowledged_checkpoint_round_trip() {
        let mut rec = record();
        rec.libvirt = Some(LibvirtSource {
            uri: "qemu:///system".into(),
            domain: "web1".into(),
            acked_checkpoint: Some("vmreplica-3".into()),
            acked_checkpoint_xml: Some(
                "<domaincheckpoint><name>vmreplica-3</name></domaincheckpoint>".into(),
            ),
        });
        let json = serde_json::to_string(&rec).expect("encode");
        let back: VmRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, rec);
        // before its first acknowledged cycle the checkpoint is absent
        let lv: LibvirtSource =
            serde_json::from_str(r#"{"uri":"qemu:///system","domain":"web1"}"#).expect("decode");
        assert_eq!(lv.acked_checkpoint, None);
    }
}
