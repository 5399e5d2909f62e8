//! Types of the local control API between the CLI and the agent (JSON lines over a Unix
//! socket), of agent-to-agent control requests, and the replication state, health and
//! statistics records that both show to the admin.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::state::{Health, ReplicationMode, ReplicationState};

/// Per-VM statistics over a monitoring window (`Measure-VMReplication`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicationStats {
    /// Start of the monitoring window, ms since the epoch.
    pub window_start_ms: u64,
    /// Cycles that completed.
    pub successful_cycles: u64,
    /// Cycles not completed within their interval.
    pub missed_cycles: u64,
    /// Bytes shipped by successful cycles.
    pub total_bytes: u64,
    /// Largest single cycle, bytes.
    pub max_bytes: u64,
    /// Sum of cycle latencies, ms.
    pub total_latency_ms: u64,
    /// Longest cycle, ms.
    pub max_latency_ms: u64,
    /// Failed cycle attempts.
    pub errors: u64,
    /// Bytes tracked but not yet shipped, as last measured.
    pub pending_bytes: u64,
    /// Last successful cycle, ms since the epoch.
    pub last_replication_ms: Option<u64>,
    /// Last app-consistent cycle, ms since the epoch.
    pub last_app_consistent_ms: Option<u64>,
    /// Primary: cuts taken with the guest's file systems frozen (app-consistent cycles).
    pub app_consistent_cycles: u64,
    /// Primary: the guest's file systems were frozen this long (ms, from the freeze call to
    /// the thaw's answer, the cycle transaction inside) at the last app-consistent cut.
    pub last_frozen_ms: Option<u64>,
    /// Primary: of that, the freeze call alone (the guest's fsfreeze hooks quiescing its
    /// applications, then the freeze), ms; the rest is the time the file systems were frozen,
    /// the cycle transaction inside.
    pub last_freeze_call_ms: Option<u64>,
    /// Primary: longest frozen time in the window, ms.
    pub max_frozen_ms: u64,
    /// Primary: sum of the frozen times in the window, ms (average = this / app-consistent
    /// cycles).
    pub total_frozen_ms: u64,
    /// Primary: failed freezes in the window (those cycles went on crash-consistent).
    pub quiesce_failures: u64,
    /// Primary: failed freezes since the last successful one.
    pub consecutive_quiesce_failures: u32,
    /// Primary: when the last freeze failed, ms since the epoch (cleared by a success).
    pub last_quiesce_failure_ms: Option<u64>,
    /// Primary: why the last freeze failed (cleared by a success).
    pub last_quiesce_error: Option<String>,
    /// When the last replicated (primary: acknowledged; replica: applied) point was cut, ms
    /// since the epoch: the lag is now minus this. Kept by `measure --reset`.
    pub last_point_cut_ms: Option<u64>,
    /// Primary: when the last verification (`vmreplica verify`, `--verify-every`) compared the
    /// replica with the primary, ms since the epoch. Kept by `measure --reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_ms: Option<u64>,
    /// Primary: how many 64 KiB blocks differed at that verification (0: the replica matched).
    /// Kept by `measure --reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_mismatched_blocks: Option<u64>,
}

impl ReplicationStats {
    /// Average cycle size in bytes (0 when none).
    pub fn average_bytes(&self) -> u64 {
        self.total_bytes
            .checked_div(self.successful_cycles)
            .unwrap_or(0)
    }
    /// Average cycle latency in ms (0 when none).
    pub fn average_latency_ms(&self) -> u64 {
        self.total_latency_ms
            .checked_div(self.successful_cycles)
            .unwrap_or(0)
    }
}

/// One row of `vmreplica status`, the `Get-VMReplication` view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// Replication state.
    pub state: ReplicationState,
    /// Health.
    pub health: Health,
    /// Why the health is not Normal ("" when Normal).
    pub health_reason: String,
    /// Primary or replica.
    pub mode: ReplicationMode,
    /// Cycle interval in seconds; 0 when there is none (not enabled, or continuous mode).
    pub frequency_secs: u64,
    /// Continuous mode (`--frequency continuous`): cycles back to back; `lag_ms` is the RPO
    /// achieved. Absent (false) with an interval and from older agents.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continuous: bool,
    /// Name of the primary agent.
    pub primary: String,
    /// Replica VMs: the primary agent's address (HOST:PORT) as it last reported it (what the
    /// split-brain probe calls); absent before its first call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_address: Option<String>,
    /// Address of the replica agent.
    pub replica: String,
    /// Last successful cycle, ms since the epoch.
    pub last_replication_ms: Option<u64>,
    /// Id of the last shipped (primary) or applied (replica) cycle.
    pub last_cycle: Option<u64>,
    /// Statistics over the monitoring window.
    pub stats: ReplicationStats,
    /// Progress of a running cycle: bytes done, bytes total (if known).
    pub progress: Option<(u64, u64)>,
    /// Replica VMs: the program `failover start`/`test` would run (the replicated
    /// definition's), and whether this host's `allowed-programs` lets it run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_program: Option<FailoverProgram>,
    /// Primary, ReadyForInitialReplication: when the scheduled initial replication starts (ms
    /// since the epoch; `enable --initial-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_at_ms: Option<u64>,
    /// This host's failover network settings of the VM (`vm set --failover-*`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_network: Option<crate::FailoverSettings>,
    /// The RPO alert on this host, seconds (`enable --rpo-alert`, `set --rpo-alert`; default
    /// twice the frequency); absent when replication is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_alert_secs: Option<u64>,
    /// Now minus the last point's cut time, ms (the RPO achieved); absent before a point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Primary: the running operation (initial copy, resync, export, cycle) with how far it
    /// got, for progress bars and `status --watch`; absent when nothing runs (and from older
    /// agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationProgress>,
    /// Replica VMs: committed recovery points (absent on a primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<u64>,
    /// Cut time of the latest point the replica holds, ms since the epoch: on a replica its
    /// latest committed point; on a primary the last acknowledged cycle's cut (its start, kept
    /// in the statistics across restarts), else that cycle's acknowledgement time. The
    /// replication lag is now minus this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point_ms: Option<u64>,
    /// Bytes of the last successful cycle this agent saw since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle_bytes: Option<u64>,
    /// The replica's retention policy: on a primary the one it sends, on a replica the one
    /// its store applies; absent when replication is not enabled (and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::store::RetentionPolicy>,
    /// Replica VMs: the extended (outgoing) relationship to a third host, when enabled
    /// (`enable --extended`); the row's other fields are the incoming relationship's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<ExtendedStatus>,
    /// Primary: the VM is libvirt-managed (`vm add --libvirt`): its connection, domain and last
    /// acknowledged checkpoint (absent for a QMP-captured VM and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::vmdef::LibvirtSource>,
    /// Primary, a libvirt VM with replication enabled: its backup jobs' counts since its
    /// capture was opened (another tool's job met, resyncs the checkpoint chain required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_jobs: Option<LibvirtJobs>,
    /// Replica: the libvirt domains failovers of this VM defined on this host (the
    /// failed-over domain and test copies of a VM replicated from libvirt; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_domains: Vec<FailoverDomainRef>,
    /// Primary with replication enabled: the sending limit in force and what the last cycle
    /// spent waiting for it (absent elsewhere and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthStatus>,
    /// Primary: the consistency group the VM is a member of, with the group's last cuts
    /// (absent when the VM is in no group, and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupStatus>,
    /// Primary with fan-out (issue 15 part 4): the VM's further relationships to other
    /// replicas, one row each (its `replica`, state, health, statistics); the row's own
    /// fields are the first relationship's. Empty with one relationship (and from older
    /// agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fanout: Vec<VmStatus>,
    /// Automatic failover with a witness, when on: the lease holder's side (primary) or the
    /// takeover watch (replica), with the time to a possible takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<crate::lease::LeaseStatus>,
}

/// A consistency group as `status` and `group list` show it (docs/groups.md). The cut
/// figures count since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupStatus {
    /// The group's name.
    pub name: String,
    /// Its members' VM names.
    pub members: Vec<String>,
    /// The last complete group point cut here.
    pub last_point: Option<u64>,
    /// The pause of the last cut that paused the members (first `stop` to last `cont`), ms.
    pub last_pause_ms: Option<u64>,
    /// The longest such pause, ms.
    pub max_pause_ms: Option<u64>,
    /// Complete group cuts.
    pub cuts: u64,
    /// Group cuts that failed (no group point for anyone).
    pub failed_cuts: u64,
    /// Why the last failed cut failed.
    pub last_error: Option<String>,
}

/// What `group failover` did: the group point and each member's failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupFailoverResult {
    /// The group point every member started at; with `planned`, the latest complete group
    /// point, which every member's planned final point is newer than or equal to.
    pub point: u64,
    /// Each member's failover (or test copy), in the group point's member order.
    pub members: Vec<FailoverResult>,
    /// Every member was prepared for a planned failover (`failover prepare`) and started at
    /// its planned final point, not at its point of the group point (docs/groups.md).
    #[serde(default)]
    pub planned: bool,
}

/// What `group prepare` did: each member prepared now (a member prepared before is not
/// listed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupPrepareResult {
    /// The group.
    pub group: String,
    /// Each member's `failover prepare` result, in the group's member order.
    pub members: Vec<FailoverResult>,
}

/// What `group reverse` did: each member reversed now (a member reversed by an earlier run
/// that stopped part way is not listed) and whether the group was formed on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupReverseResult {
    /// The group.
    pub group: String,
    /// Each member reversed now, in the group's member order.
    pub members: Vec<FailoverResult>,
    /// The group formed on this host (the new primary), as `group create` would.
    pub grouped: bool,
}

/// One complete group point on a replica (`group points NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPointInfo {
    /// The group point's id.
    pub point: u64,
    /// Each member's VM name and recovery point id.
    pub members: Vec<(String, u64)>,
}

/// A primary VM's sending limit as `status` shows it ([`VmStatus::bandwidth`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthStatus {
    /// The VM's own schedule (`--bandwidth`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::bandwidth::BandwidthSchedule>,
    /// The agent-wide schedule, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_schedule: Option<crate::bandwidth::BandwidthSchedule>,
    /// The limit in force now, bytes/s: the tighter of the VM's and the agent's; 0 = unlimited.
    pub limit: u64,
    /// How long the last (or the running) cycle waited for the limit, ms.
    pub wait_ms: u64,
    /// Bytes the last (or the running) cycle put on the wire (after compression and framing).
    pub wire_bytes: u64,
    /// From that cycle's first body byte to its last, ms.
    pub send_ms: u64,
}

/// The outgoing (extended) relationship of a replica VM, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtendedStatus {
    /// Always "extended" (monitoring outputs name the relationship).
    pub relationship: String,
    /// Replication state of the outgoing relationship.
    pub state: ReplicationState,
    /// Its health.
    pub health: Health,
    /// Why the health is not Normal ("" when Normal).
    pub health_reason: String,
    /// The extended replica's address (HOST:PORT).
    pub replica: String,
    /// Extended cycle interval in seconds.
    pub frequency_secs: u64,
    /// The last point the extended replica acknowledged.
    pub last_point_sent: Option<u64>,
    /// Cut time of that point (on the primary), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point_ms: Option<u64>,
    /// Now minus that cut time, ms (the extended replica's RPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Last successful extended cycle, ms since the epoch.
    pub last_replication_ms: Option<u64>,
    /// The point an extended cycle is shipping now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_point: Option<u64>,
    /// Data bytes the running extended cycle shipped so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_bytes: Option<u64>,
    /// Statistics of the outgoing relationship.
    pub stats: ReplicationStats,
}

/// What `vmreplica ... --extended` asks of a replica VM's extended relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum ExtendedOp {
    /// `enable NAME --extended --replica C:PORT ...` (the name in the args is the VM's).
    Enable(Box<EnableArgs>),
    /// `pause NAME --extended`.
    Pause,
    /// `resume NAME --extended`.
    Resume,
    /// `disable NAME --extended`: remove the outgoing relationship only.
    Disable,
}

/// What to do to one relationship of a primary VM ([`Request::Relationship`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelationshipOp {
    /// `start-initial NAME --replica HOST:PORT`.
    StartInitial,
    /// `resume NAME --resync [--at TIME] --replica HOST:PORT`.
    ResumeResync {
        /// Start at this time (ms since the epoch) instead of now.
        at_ms: Option<u64>,
    },
    /// `set NAME --retain SPEC | --recovery-points N --replica HOST:PORT`: this relationship's
    /// retention, sent to its replica.
    SetRetention {
        /// The new policy.
        policy: crate::store::RetentionPolicy,
    },
    /// `pause NAME --replica HOST:PORT`.
    Pause,
    /// `resume NAME --replica HOST:PORT`.
    Resume,
    /// `disable NAME --replica HOST:PORT`: end this relationship; the others go on.
    Disable,
}

/// What a running operation of a VM is ([`OperationProgress::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    /// The initial copy over the network (a full cycle).
    InitialCopy,
    /// A resynchronization (the VM's disks compared with the replica's latest point).
    Resync,
    /// The initial copy written to a file (`enable --initial export:DIR`).
    Export,
    /// An incremental cycle.
    Cycle,
    /// `vmreplica import` on the replica (disk images or an exported initial copy written as
    /// a new point).
    Import,
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OperationKind::InitialCopy => "initial copy",
            OperationKind::Resync => "resync",
            OperationKind::Export => "export",
            OperationKind::Cycle => "cycle",
            OperationKind::Import => "import",
        })
    }
}

/// How far a running operation got ([`VmStatus::operation`]). `done` of `total` is the part
/// of the VM's disks (their bytes in order, disk after disk) the operation went through, so
/// that zero ranges count too; `sent` the data bytes it shipped (or wrote) so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationProgress {
    /// What runs.
    pub kind: OperationKind,
    /// Bytes of the disks gone through.
    pub done: u64,
    /// Bytes of the disks to go through; 0 when unknown (an incremental cycle).
    pub total: u64,
    /// Data bytes shipped (or written to the export file) so far.
    pub sent: u64,
    /// When the operation started, ms since the epoch.
    pub started_ms: u64,
}

/// What `pause`, `resume`, `resume --resync`, `start-initial` and `disable` answer: the VM's
/// replication state before and after, and the message the CLI prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// VM name.
    pub name: String,
    /// The state before the command.
    pub from: ReplicationState,
    /// The state after it.
    pub to: ReplicationState,
    /// For people (`disable` adds what the replica shows).
    pub message: String,
}

/// One VM registered on its primary (`vm list`): its definition, not its replication status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// The QMP socket reserved for vmreplica.
    pub qmp: String,
    /// The program of its definition.
    pub program: String,
    /// The disks it replicates (node names).
    pub disks: Vec<String>,
    /// Its replication state (`Disabled` when not enabled).
    pub state: ReplicationState,
    /// The replica agent's address when replication is enabled.
    pub replica: Option<String>,
    /// The host end of its qemu-guest-agent channel (`vm add --qga`, `vm set --qga`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qga: Option<String>,
    /// A libvirt-managed VM (`vm add --libvirt`): its connection and domain (`qmp` is then
    /// empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::vmdef::LibvirtSource>,
}

/// The backup-job counts of a libvirt VM's capture ([`VmStatus::libvirt_jobs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtJobs {
    /// Cycle starts that met another job holding the domain (another tool's backup).
    pub busy: u64,
    /// Consecutive such starts now (0 once a job of ours began).
    pub busy_streak: u32,
    /// When the current busy streak began (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_since_ms: Option<u64>,
    /// Cycles whose checkpoint chain had to start over (read every block).
    pub resyncs: u64,
}

/// The program a replica VM's failover would run ([`VmStatus::failover_program`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverProgram {
    /// The program the replicated definition names.
    pub program: String,
    /// `None` when it may run; otherwise why it would be refused.
    pub refused: Option<String>,
}

/// A request from the CLI to the local agent (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Add an authorization entry for a primary.
    ServerAllow {
        /// Primary's name.
        primary: String,
        /// Primary's certificate fingerprint.
        fingerprint: String,
        /// Storage directory for its VMs (default: the agent's).
        storage: Option<String>,
        /// Trust group.
        trust_group: Option<String>,
    },
    /// Revoke an authorization entry (`server deny`): kept, but authorizing nothing.
    ServerDeny {
        /// Primary's name.
        primary: String,
    },
    /// Delete an authorization entry (`server remove`); refused while replica VMs of that
    /// primary are registered.
    ServerRemove {
        /// Primary's name.
        primary: String,
    },
    /// Show the replica server configuration.
    ServerShow,
    /// Register a running VM on its primary.
    VmAdd {
        /// VM name.
        name: String,
        /// QMP socket path.
        qmp: String,
        /// VM definition TOML text.
        launch_toml: String,
        /// Disks to replicate (node names); empty = all of the definition's.
        disks: Vec<String>,
        /// The NBD socket the VM serves its disks on (a qemu-storage-daemon stand-in), when
        /// not the agent's own path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd: Option<String>,
        /// The host end of the VM's qemu-guest-agent channel (a Unix socket QEMU listens on),
        /// for app-consistent points and `failover prepare --shutdown`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qga: Option<String>,
        /// A libvirt-managed VM (`--libvirt DOMAIN [--connect URI]`): its disks and
        /// definition are taken from the domain; `qmp` and `launch_toml` are then empty.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        libvirt: Option<crate::vmdef::LibvirtSource>,
    },
    /// List registered VMs.
    VmList,
    /// Unregister a primary VM (`vm remove`): refused while its replication is enabled, and
    /// for a replica VM (`replica remove`). With `check`, only says what would be done (or
    /// why it is refused) and changes nothing: the CLI asks for confirmation in between.
    VmRemove {
        /// VM name.
        name: String,
        /// Check only; change nothing.
        #[serde(default)]
        check: bool,
    },
    /// Remove a replica VM and its recovery points (`replica remove`): refused while the
    /// primary replicates into it, while it is failed over, or while a test copy runs.
    /// `check` as for [`Request::VmRemove`].
    ReplicaRemove {
        /// VM name.
        name: String,
        /// Keep the recovery points in the store (a later `enable` from the primary starts
        /// from them).
        #[serde(default)]
        keep_data: bool,
        /// Check only; change nothing.
        #[serde(default)]
        check: bool,
    },
    /// Change a primary VM's registration (`vm set`): refused while its replication is
    /// enabled. This host's failover network settings (`failover_*`) can be changed on any VM,
    /// primary or replica, at any time. `check` as for [`Request::VmRemove`].
    VmSet {
        /// VM name.
        name: String,
        /// New QMP socket path.
        #[serde(default)]
        qmp: Option<String>,
        /// New VM definition TOML text (same name and UUID).
        #[serde(default)]
        launch_toml: Option<String>,
        /// New list of disks to replicate; empty = unchanged, or all of a new definition's.
        #[serde(default)]
        disks: Vec<String>,
        /// New failover network settings of the VM's interfaces on this host (replace the
        /// old ones; an empty list removes them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failover_interfaces: Option<Vec<crate::FailoverInterface>>,
        /// New QEMU network arguments for a real failover on this host (replace the
        /// definition's `network-args` here); an empty list goes back to the definition's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failover_network_args: Option<Vec<String>>,
        /// New guest agent socket of the VM (`--qga SOCK`; `Some("")` = none: `--no-qga`).
        /// Allowed on a primary VM in any state: each app-consistent cut opens it afresh.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qga: Option<String>,
        /// Check only; change nothing.
        #[serde(default)]
        check: bool,
    },
    /// Enable replication of a VM.
    Enable(EnableArgs),
    /// Start initial replication now.
    StartInitial {
        /// VM name.
        name: String,
    },
    /// On the replica: load a copy of a replica VM's disks from a directory, either an
    /// initial copy exported by the primary (`enable --initial export:DIR`) or disk images
    /// (`<disk>.qcow2|raw|img`) for `enable --initial existing`.
    Import {
        /// Replica VM name.
        name: String,
        /// Directory holding the copy (absolute).
        dir: String,
    },
    /// Status of one or all VMs.
    Status {
        /// VM name; all when `None`.
        name: Option<String>,
    },
    /// Statistics of one or all VMs.
    Measure {
        /// VM name; all when `None`.
        name: Option<String>,
        /// Reset the monitoring window after reading.
        reset: bool,
    },
    /// Pause replication.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume replication.
    Resume {
        /// VM name.
        name: String,
    },
    /// `unfence NAME`: a primary VM its automatic failover fenced runs again, only when the
    /// witness renews the lease it held (refused for good once the replica took over).
    Unfence {
        /// VM name.
        name: String,
    },
    /// `set NAME --auto-failover off`: a primary stops its automatic failover (the lease is
    /// removed at the witness; the replica is told with the next `create-replica`).
    AutoFailoverOff {
        /// VM name.
        name: String,
    },
    /// Start (or schedule) resynchronization of a VM waiting for it (`resume --resync`).
    ResumeResync {
        /// VM name.
        name: String,
        /// Start at this time (ms since the epoch); `None` = now.
        at_ms: Option<u64>,
    },
    /// Disable replication.
    Disable {
        /// VM name.
        name: String,
    },
    /// `vmreplica verify`: compare the replica's point with the primary's content at its cut
    /// by block hashes (primary), or check the replica's layers alone (`local`, replica).
    Verify {
        /// VM name.
        name: String,
        /// The point to verify; `None` = the latest (the only one that can be verified).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        point: Option<u64>,
        /// `--local`: on the replica, check every layer's qcow2 metadata and the stored
        /// block-hash indexes, without the primary.
        #[serde(default)]
        local: bool,
    },
    /// `group create NAME VM...` (primary): a consistency group of enabled primary VMs that
    /// share one replica agent.
    GroupCreate {
        /// Group name.
        name: String,
        /// Member VM names.
        vms: Vec<String>,
    },
    /// `group list`: every group of this agent's primary VMs, with its last cuts.
    GroupList,
    /// `group remove NAME`: the members replicate on their own again.
    GroupRemove {
        /// Group name.
        name: String,
    },
    /// `group points NAME` (replica): the group's complete points, newest first.
    GroupPoints {
        /// Group name.
        name: String,
    },
    /// `group failover NAME` (replica): fail every member over (or start a test copy of
    /// each, `test`) at one complete group point: `point`, or the latest; or, when every
    /// member was prepared for a planned failover, at each member's planned final point.
    GroupFailover {
        /// Group name.
        name: String,
        /// Test copies instead of a failover.
        #[serde(default)]
        test: bool,
        /// The group point; `None` = the latest complete one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        point: Option<u64>,
        /// Start at the latest complete group point even when members were prepared for a
        /// planned failover (their final points are then not used).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        latest_group_point: bool,
    },
    /// `group prepare NAME` (primary): `failover prepare` of every member, each checked
    /// first; members already prepared are skipped.
    GroupPrepare {
        /// Group name.
        name: String,
        /// `--shutdown`: shut each member's guest down first, waiting at most this many
        /// seconds per member; `None` = they must already be shut down.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shutdown_timeout_secs: Option<u64>,
    },
    /// `group reverse NAME` (the failed-over host, after `group failover`): reverse every
    /// member (as `reverse`), then form the group here, so the reversed replication cuts its
    /// members together.
    GroupReverse {
        /// Group name.
        name: String,
        /// The old primary's agent HOST:PORT (default: the address it reported).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<String>,
        /// The old primary's certificate fingerprint (default: its authorization entry's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica_fingerprint: Option<String>,
        /// Cycle interval of the reversed replication, seconds (default as `reverse`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        frequency_secs: Option<u64>,
    },
    /// Recovery points of a replica VM, with why retention keeps each.
    Points {
        /// VM name.
        name: String,
        /// `points --estimate`: what this policy would keep and what it would cost, instead
        /// of the VM's own policy; nothing is applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        estimate: Option<crate::store::RetentionPolicy>,
    },
    /// Planned failover, first half (on the primary): ship the final cycle and lock the VM.
    FailoverPrepare {
        /// VM name.
        name: String,
        /// `--shutdown`: shut the guest down first (guest agent, else ACPI) and wait at most
        /// this many seconds for it to be down; `None` = it must already be shut down.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shutdown_timeout_secs: Option<u64>,
    },
    /// Failover (on the replica): start the VM from a recovery point.
    FailoverStart {
        /// VM name.
        name: String,
        /// Recovery point id; `None` = latest.
        point: Option<u64>,
        /// Prepare the disks only; do not start QEMU.
        no_start: bool,
        /// Skip the split-brain guard (the primary still answers and its VM runs).
        force: bool,
    },
    /// Test failover (on the replica): an isolated copy `NAME-test`; replication goes on.
    FailoverTest {
        /// VM name.
        name: String,
        /// Recovery point id; `None` = latest.
        point: Option<u64>,
    },
    /// Remove a test failover copy.
    FailoverStopTest {
        /// VM name.
        name: String,
        /// Which copy; `None` = all of the VM's test copies.
        test_id: Option<Uuid>,
    },
    /// Undo a failover not yet completed.
    FailoverCancel {
        /// VM name.
        name: String,
    },
    /// Commit a failover: keep the chosen point, drop the others.
    FailoverComplete {
        /// VM name.
        name: String,
    },
    /// The event log (`vmreplica events`). With `follow`, the agent answers with the matching
    /// events and then one more `Ok` line per new event ([`crate::event::Event`] each; the
    /// first answer is a list) until the client closes the connection.
    Events {
        /// What to return.
        query: crate::event::EventQuery,
        /// Keep the connection and stream new events.
        follow: bool,
    },
    /// Change a VM's RPO alert on this host (`vmreplica set NAME --rpo-alert D`), either side.
    SetRpoAlert {
        /// VM name.
        name: String,
        /// Seconds; `None` = back to the default (twice the frequency).
        rpo_alert_secs: Option<u64>,
    },
    /// Change a primary VM's sending limit (`vmreplica set NAME --bandwidth S`), or with no
    /// name the agent-wide one (`vmreplica set --agent --bandwidth S`, also written into
    /// `config.toml`); the next refill of the token bucket uses it, also in a running cycle.
    SetBandwidth {
        /// VM name; `None` = the agent-wide limit.
        #[serde(default)]
        name: Option<String>,
        /// The new schedule (`*=0` = unlimited).
        bandwidth: crate::bandwidth::BandwidthSchedule,
    },
    /// Change the CPU priority of the primary's data path (`vmreplica set --agent
    /// --cpu-priority low|normal`, also written into `config.toml`); running cycles get it at
    /// once.
    SetCpuPriority {
        /// The new priority.
        priority: CpuPriority,
    },
    /// Change how often a primary VM is verified against its replica (`vmreplica set NAME
    /// --verify-every D|never`); the next verification is due that long after the last one.
    SetVerifyEvery {
        /// VM name.
        name: String,
        /// Seconds (at least an hour); `None` = only on `vmreplica verify`.
        verify_every_secs: Option<u64>,
    },
    /// Reverse replication: the failed-over VM becomes the primary, the old primary its replica.
    Reverse {
        /// VM name.
        name: String,
        /// The old primary's agent HOST:PORT (default: the address it reported).
        replica: Option<String>,
        /// The old primary's certificate fingerprint (default: its authorization entry's).
        replica_fingerprint: Option<String>,
        /// Cycle interval of the reversed replication, seconds (default 300; reversing to the
        /// extended replica: that relationship's).
        frequency_secs: Option<u64>,
        /// `replica` is a sibling replica of a fanned-out VM (fan-out's failover): it is asked
        /// to `follow` (keep its newest point, resynchronised against) instead of
        /// `become-replica`.
        #[serde(default)]
        follow: bool,
    },
    /// Change a VM's retention policy at run time (`vmreplica set NAME --retain SPEC` or
    /// `--recovery-points N`): on a primary it is saved and sent to the replica (refused,
    /// changing nothing, when the replica cannot be reached); on a replica it is set in the
    /// store until the primary sends its own again. Takes effect at the next prune.
    SetRetention {
        /// VM name.
        name: String,
        /// The new policy.
        policy: crate::store::RetentionPolicy,
    },
    /// One relationship of a primary VM that replicates to several replicas (fan-out):
    /// `pause|resume|disable|start-initial NAME --replica HOST:PORT`, `resume --resync` and
    /// `set --retain|--recovery-points` with `--replica`.
    Relationship {
        /// VM name.
        name: String,
        /// The relationship's replica address, as given to `enable --replica`.
        replica: String,
        /// What to do.
        what: RelationshipOp,
    },
    /// The extended (outgoing) relationship of a replica VM (`enable|pause|resume|disable NAME
    /// --extended`).
    Extended {
        /// Replica VM name.
        name: String,
        /// What to do.
        what: ExtendedOp,
    },
}

impl Request {
    /// Parses one control-socket line (the agent's only decoder of what a local client sends).
    pub fn from_line(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// The control-socket line for this request (without the newline).
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// One VM process (or prepared disk set) a failover created on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverVm {
    /// Name the VM runs as (`NAME`, or `NAME-test`).
    pub name: String,
    /// The store view holding its overlays (also the test copy's id).
    pub view: Uuid,
    /// The recovery point it started from.
    pub point: u64,
    /// Disk node and overlay path.
    pub disks: Vec<(String, String)>,
    /// QMP socket, when started.
    pub qmp: Option<String>,
    /// QEMU process id, when started.
    pub pid: Option<u32>,
    /// A test failover copy.
    pub test: bool,
    /// What applying this host's failover network settings in the guest gave, one line per
    /// interface (empty: none set, or not applied yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<String>,
    /// The libvirt domain this failover defined and started (a libvirt-managed VM), instead
    /// of a QEMU process of the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<FailoverDomainRef>,
    /// A second tracking bitmap, for the extended replica this host forwards the VM to, was
    /// started with the VM (before it ran): the fan-out relationship a `reverse` continues the
    /// extended relationship as reads the VM's writes from it (docs/extended.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended_tracking: bool,
}

/// A domain a failover defined on this host's libvirt (`failover start`/`test` of a
/// libvirt-managed VM); cancel and stop-test destroy and undefine it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverDomainRef {
    /// The connection URI it was defined at.
    pub uri: String,
    /// The domain's name (`NAME`, or `NAME-test`).
    pub domain: String,
    /// Its UUID (the primary's for a failover, a new one for a test copy).
    pub uuid: String,
    /// The definition this failover replaced (the VM's own, shut off, on a host that ran it
    /// before: failing back), restored by `cancel`; absent when the domain was new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_xml: Option<String>,
}

/// Failover bookkeeping of one VM on a replica host (`DIR/failover/<uuid>.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// The VM.
    pub vm: Uuid,
    /// State before the failover (restored by cancel).
    pub before: Option<ReplicationState>,
    /// The failed-over VM (live failover).
    pub live: Option<FailoverVm>,
    /// Test failover copies.
    pub tests: Vec<FailoverVm>,
    /// The primary agent's replication listener, as it last reported it.
    pub primary_listen: Option<String>,
    /// The failover was a planned one (the latest point is the primary's final cycle).
    pub planned: bool,
}

/// What a failover command reached (`--json` output of `failover ...` and `reverse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverResult {
    /// VM name (the test copy's name for `failover test`).
    pub name: String,
    /// Replication state of the VM on this host afterwards.
    pub state: ReplicationState,
    /// Chosen recovery point (or the final cycle for `prepare`).
    pub point: Option<u64>,
    /// Disks the VM runs on (overlay paths), node name and path.
    pub disks: Vec<(String, String)>,
    /// QMP socket of the started VM.
    pub qmp: Option<String>,
    /// QEMU process id of the started VM.
    pub pid: Option<u32>,
    /// Test copy id (`failover test`), for `stop-test --test-id`.
    pub test_id: Option<Uuid>,
    /// Milliseconds from the command to the started VM's QMP answering.
    pub elapsed_ms: u64,
    /// Human summary.
    pub message: String,
    /// `failover start`: the outcome of this host's failover network settings in the guest,
    /// one line per interface (empty when none are set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<String>,
}

/// Agent-to-agent: the new primary asks the old primary to become the replica of a VM whose
/// disks are identical to recovery point `point` (reverse replication after a planned failover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BecomeReplica {
    /// VM UUID.
    pub uuid: Uuid,
    /// The cut both sides hold.
    pub point: u64,
    /// Time of that cut, ms since the epoch.
    pub taken_at_ms: u64,
    /// VM definition TOML text.
    pub launch_toml: String,
    /// Replicated disks (node names) and sizes.
    pub disks: Vec<crate::DiskInfo>,
}

/// The frequency (`EnableArgs::frequency_secs`, `CreateReplica::frequency_secs`,
/// `VmStatus::frequency_secs`) of continuous mode (`--frequency continuous`): cycles back to
/// back. 0 was never a valid interval; a replica learns it only on a connection of protocol
/// [`crate::wire::CONTINUOUS_SINCE`] or later.
pub const FREQUENCY_CONTINUOUS: u64 = 0;

/// Arguments of `vmreplica enable`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnableArgs {
    /// VM name.
    pub name: String,
    /// Replica agent address HOST:PORT.
    pub replica: String,
    /// Replica agent certificate fingerprint.
    pub replica_fingerprint: String,
    /// Cycle interval in seconds (5 to 86400), or [`FREQUENCY_CONTINUOUS`].
    pub frequency_secs: u64,
    /// Additional hourly recovery points to keep.
    pub recovery_points: u32,
    /// Take an app-consistent point every this many hours (0 = never).
    pub app_consistent_every_hours: u32,
    /// Disks not to replicate.
    pub exclude_disks: Vec<String>,
    /// Compress cycles on the wire.
    pub compression: bool,
    /// Start initial replication at this time (ms since the epoch); `None` = now.
    pub initial_at_ms: Option<u64>,
    /// Start a required resynchronization by itself inside this daily window (Hyper-V's
    /// automatic resynchronization); `None` = only on `resume --resync`.
    #[serde(default)]
    pub auto_resync: Option<ResyncWindow>,
    /// How the first copy reaches the replica.
    #[serde(default)]
    pub initial: InitialMode,
    /// Raise an RPO alert when the last point is older than this, seconds (`--rpo-alert`);
    /// `None` = twice the frequency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_alert_secs: Option<u64>,
    /// Verify the replica against the primary by block hashes every this many seconds
    /// (`--verify-every`, `docs/verify.md`); `None` = only on `vmreplica verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_every_secs: Option<u64>,
    /// The replica's grid retention policy (`--retain`), instead of `recovery_points` (which
    /// is then 0); absent = Hyper-V's hourly form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<crate::retain::RetentionGrid>,
    /// This VM's sending limit with its daily schedule (`--bandwidth`; `vmreplica set NAME
    /// --bandwidth` changes it at run time); `None` = unlimited (the agent's limit still holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<crate::bandwidth::BandwidthSchedule>,
    /// Automatic failover with a witness (`--auto-failover`, `docs/auto-failover.md`); `None`
    /// = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<crate::lease::AutoFailover>,
}

impl EnableArgs {
    /// The replica's retention policy these arguments ask for.
    pub fn retention(&self) -> crate::store::RetentionPolicy {
        crate::store::RetentionPolicy {
            hourly: if self.retain.is_some() {
                0
            } else {
                self.recovery_points
            },
            app_consistent_every_hours: None,
            grid: self.retain.clone(),
        }
    }
}

/// How initial replication gets the first copy to the replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum InitialMode {
    /// A full copy over the network (allocated data only).
    #[default]
    Network,
    /// The replica already holds a copy (kept from earlier replication, or imported from disk
    /// images with `vmreplica import`): compare block hashes and send only what differs.
    Existing,
    /// The replica is another replica of this VM (fan-out's failover: the VM failed over
    /// here from a primary that replicated it to both): it is asked to `follow` this host
    /// (it keeps its newest point and takes this host as the VM's primary) instead of
    /// `create-replica`, then compared block by block as `Existing`.
    Follow,
    /// Write the initial copy to this directory on the primary (external media); the replica
    /// loads it with `vmreplica import`, then the changes tracked meanwhile follow.
    Export {
        /// Directory to write the copy to.
        dir: String,
    },
}

impl InitialMode {
    /// Parse the `--initial` argument: `network`, `existing`, `follow` or `export:DIR`.
    pub fn parse(s: &str) -> Result<InitialMode, String> {
        match s {
            "network" => Ok(InitialMode::Network),
            "existing" => Ok(InitialMode::Existing),
            "follow" => Ok(InitialMode::Follow),
            _ => match s.strip_prefix("export:") {
                Some(dir) if !dir.is_empty() => Ok(InitialMode::Export {
                    dir: dir.to_owned(),
                }),
                _ => Err(format!(
                    "bad --initial {s:?}: expected network, existing, follow or export:DIR"
                )),
            },
        }
    }
}

/// File name of the manifest of an exported initial copy.
pub const EXPORT_MANIFEST: &str = "vmreplica-export.json";

/// Whether `name` is a plain file name (no path separators, not `.`/`..`, not hidden).
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && !name.contains(['/', '\\', '\0'])
}

/// Manifest of an initial copy exported to a directory (`vmreplica-export.json`, format 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExportManifest {
    /// Format version, 1.
    pub format: u32,
    /// The VM.
    pub vm: Uuid,
    /// Its name on the primary.
    pub name: String,
    /// The exported (full) cycle's id.
    pub cycle: u64,
    /// The cycle file in the directory (staging format 1, checksummed).
    pub file: String,
    /// Hex BLAKE3 of the whole cycle file.
    pub file_blake3: String,
    /// Data bytes in it.
    pub bytes: u64,
}

/// A daily time window in UTC, `start` inclusive, `end` exclusive, in minutes after midnight.
/// `start > end` wraps over midnight (Hyper-V's default 18:30-06:00); `start == end` is the
/// whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncWindow {
    /// Minutes after midnight UTC at which the window opens (0-1439).
    pub start_min: u16,
    /// Minutes after midnight UTC at which it closes (0-1439).
    pub end_min: u16,
}

impl ResyncWindow {
    /// Hyper-V's default automatic resynchronization window, 18:30-06:00.
    pub const HYPERV_DEFAULT: ResyncWindow = ResyncWindow {
        start_min: 18 * 60 + 30,
        end_min: 6 * 60,
    };

    /// Parse `HH:MM-HH:MM` (24-hour clock, UTC).
    pub fn parse(s: &str) -> Result<ResyncWindow, String> {
        let bad = || format!("bad time window {s:?}: expected HH:MM-HH:MM (UTC), e.g. 18:30-06:00");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let hm = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        Ok(ResyncWindow {
            start_min: hm(a).ok_or_else(bad)?,
            end_min: hm(b).ok_or_else(bad)?,
        })
    }

    /// Whether `now_ms` (ms since the Unix epoch) falls inside the window.
    pub fn contains(&self, now_ms: u64) -> bool {
        let m = ((now_ms / 60_000) % 1440) as u16;
        let (a, b) = (self.start_min, self.end_min);
        match a.cmp(&b) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => a <= m && m < b,
            std::cmp::Ordering::Greater => m >= a || m < b,
        }
    }
}

impl std::fmt::Display for ResyncWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} UTC",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60
        )
    }
}

/// The agent's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Success, with a request-specific JSON value.
    Ok {
        /// The value.
        value: serde_json::Value,
    },
    /// Failure, with the error chain (outermost first) and an exit code for the CLI.
    Err {
        /// Each error of the chain.
        chain: Vec<String>,
        /// Exit code the CLI should use.
        code: i32,
    },
}

/// What `vmreplica verify` found for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskVerify {
    /// Disk id.
    pub disk: String,
    /// The disk's size at the cut, bytes.
    pub size: u64,
    /// Blocks compared (64 KiB each; the last may be shorter).
    pub blocks: u64,
    /// Blocks whose hashes differ.
    pub mismatched_blocks: u64,
    /// The differing byte ranges as (offset, length), merged, in order (all of them).
    pub mismatched: Vec<(u64, u64)>,
}

/// The result of `vmreplica verify NAME` (primary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// VM name.
    pub name: String,
    /// The replica's recovery point compared (the verify cycle's own point).
    pub point: u64,
    /// When the cut was taken, ms since the epoch.
    pub cut_ms: u64,
    /// Block size compared, bytes.
    pub block_size: u64,
    /// Per disk.
    pub disks: Vec<DiskVerify>,
}

impl VerifyReport {
    /// Differing blocks over all disks.
    pub fn mismatched_blocks(&self) -> u64 {
        self.disks.iter().map(|d| d.mismatched_blocks).sum()
    }

    /// One line per disk: counts and the first `first` ranges.
    pub fn summary(&self, first: usize) -> String {
        let mut out = Vec::new();
        for d in &self.disks {
            let mut line = format!(
                "{}: {} of {} blocks differ",
                d.disk, d.mismatched_blocks, d.blocks
            );
            if !d.mismatched.is_empty() {
                let shown: Vec<String> = d
                    .mismatched
                    .iter()
                    .take(first)
                    .map(|(o, l)| format!("{o}+{l}"))
                    .collect();
                line.push_str(&format!(" (bytes {}", shown.join(", ")));
                if d.mismatched.len() > first {
                    line.push_str(&format!(", and {} more ranges", d.mismatched.len() - first));
                }
                line.push(')');
            }
            out.push(line);
        }
        out.join("; ")
    }
}

/// What `vmreplica verify NAME --local` checked of one file (replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalCheck {
    /// Disk id.
    pub disk: String,
    /// The file checked (a qcow2 layer or a point's block-hash index), relative to the VM's
    /// store directory.
    pub file: String,
    /// `qcow2` (`qemu-img check`) or `hash-index` (its version, identity and checksum).
    pub kind: String,
    /// Passed.
    pub ok: bool,
    /// What the check said when it failed (empty when it passed).
    pub detail: String,
}

/// The result of `vmreplica verify NAME --local` (replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalVerifyReport {
    /// VM name.
    pub name: String,
    /// Every file checked.
    pub checks: Vec<LocalCheck>,
}

/// A recovery point as shown by `vmreplica points`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// Point id (the cycle id).
    pub id: u64,
    /// Time of the cut, ms since the epoch.
    pub time_ms: u64,
    /// crash-consistent, app-consistent or planned.
    pub kind: String,
    /// Bytes on disk of the point's own layers.
    pub size_bytes: u64,
    /// Why the retention policy keeps the point (`latest`, `1h #3`, `hourly #2`, `view`
    /// when only a failover view pins it); empty: the policy drops it (at the next prune, or
    /// with `--estimate`, if that policy were applied). Absent from older agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_because: Vec<String>,
    /// `points --estimate`: the point's size once the policy is applied (its own layers plus
    /// those of the dropped points merged into it; an upper bound); absent for a point the
    /// policy drops and without `--estimate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
}

/// One authorization entry of the replica server (`server allow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    /// Primary's name.
    pub primary: String,
    /// Primary's certificate fingerprint.
    pub fingerprint: String,
    /// Storage directory for this primary's VMs.
    pub storage: String,
    /// Trust group (defaults to the primary's name).
    pub trust_group: String,
    /// Revoked (`server deny`): the fingerprint authorizes nothing; the entry stays so that
    /// the primary's replica VMs keep their storage (failover, recovery). `server allow`
    /// restores it.
    #[serde(default)]
    pub revoked: bool,
}

/// Agent-to-agent control request: the primary asks the replica to create the replica VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateReplica {
    /// VM definition TOML text.
    pub launch_toml: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// VM name.
    pub name: String,
    /// Disks (id and size).
    pub disks: Vec<crate::DiskInfo>,
    /// Cycle interval, seconds, or [`FREQUENCY_CONTINUOUS`] (sent only on connections of
    /// protocol [`crate::wire::CONTINUOUS_SINCE`] or later).
    pub frequency_secs: u64,
    /// Hourly recovery points to keep.
    pub recovery_points: u32,
    /// The grid retention policy (`--retain`), which replaces `recovery_points` when present.
    /// Older replicas ignore it (and keep `recovery_points`, 0 with a grid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<crate::retain::RetentionGrid>,
    /// Automatic failover's settings: the replica runs its takeover watch with them (absent:
    /// off, and from older primaries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<crate::lease::AutoFailover>,
}

impl CreateReplica {
    /// The retention policy the primary asks for.
    pub fn retention(&self) -> crate::store::RetentionPolicy {
        crate::store::RetentionPolicy {
            hourly: if self.retain.is_some() {
                0
            } else {
                self.recovery_points
            },
            app_consistent_every_hours: None,
            grid: self.retain.clone(),
        }
    }
}

/// Agent-to-agent: the replica's view of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaVmInfo {
    /// VM UUID.
    pub uuid: Uuid,
    /// Latest applied cycle.
    pub latest: Option<u64>,
    /// Replica-side state.
    pub state: ReplicationState,
}

/// Agent-to-agent (`resync-hashes`): the primary asks the replica for the block hashes of one
/// disk of its latest recovery point (resynchronization).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHashesRequest {
    /// VM UUID.
    pub uuid: Uuid,
    /// Disk id.
    pub disk: String,
    /// The disk's size on the primary (blocks beyond the replica's size hash as zeros).
    pub disk_size: u64,
    /// Block size in bytes (a power of two, 4 KiB to 4 MiB).
    pub block_size: u64,
    /// First block.
    pub first_block: u64,
    /// Number of blocks (at most 16384 per call).
    pub count: u64,
    /// The point the earlier calls of this resync used; refused if it is no longer the latest.
    pub point: Option<u64>,
    /// Read and hash the point's data instead of answering from its block-hash index
    /// (verification, and a resynchronization after a verification found a mismatch: the
    /// index records what was written, not what the layer holds now).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read: bool,
}

/// Answer to [`BlockHashesRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHashesReply {
    /// The recovery point hashed (the replica's latest): the resync cycle's base.
    pub point: u64,
    /// The replica's size of the disk (0 if the point has no such disk).
    pub point_disk_size: u64,
    /// Lowercase hex of the concatenated 32-byte BLAKE3 hashes, one per block.
    pub hashes: String,
}

/// The agent's configuration file (`DIR/config.toml`), written by `vmreplica init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// This agent's name (the primary name replicas authorize).
    pub name: String,
    /// HOST:PORT the replication listener binds.
    pub listen: String,
    /// HOST:PORT peers reach this agent at, when it differs from `listen` (`init --advertise`;
    /// never a wildcard). Reported to replicas for their split-brain probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Default storage directory for replica VMs.
    pub storage: String,
    /// How many VMs may run a cycle at the same time.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_cycles: usize,
    /// The programs this agent may start for a failed-over or test VM, as patterns on the
    /// program's file name (`*` matches any run of characters). A replicated definition naming
    /// any other program is refused.
    #[serde(default = "default_allowed_programs")]
    pub allowed_programs: Vec<String>,
    /// The event log's bounds and the event sinks (`[events]`).
    #[serde(default)]
    pub events: crate::event::EventsConfig,
    /// HOST:PORT of the monitoring listener (`/metrics`); none (the default) serves nothing.
    /// A non-loopback address needs `metrics-token-file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// File holding the bearer token every monitoring request must carry
    /// (`Authorization: Bearer TOKEN`); relative to the agent directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_file: Option<String>,
    /// The agent-wide sending limit with its daily schedule, shared by all of this agent's
    /// primary VMs (`bandwidth = "08:00-18:00=50M,*=0"`; `vmreplica set --agent --bandwidth`
    /// changes it at run time and writes it here); absent = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<crate::bandwidth::BandwidthSchedule>,
    /// The zone bandwidth schedules are read in: `UTC` (the default) or a fixed offset like
    /// `+01:00`.
    #[serde(default, skip_serializing_if = "is_utc")]
    pub time_zone: crate::bandwidth::TimeZone,
    /// The libvirt connection URI a failover of a libvirt-managed VM defines and starts its
    /// domain on, on this (replica) host (`libvirt-connect = "qemu:///system"`, the default
    /// when absent). See docs/libvirt.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_connect: Option<String>,
    /// The CPU priority of the primary's data path (`cpu-priority = "low"`; `vmreplica set
    /// --agent --cpu-priority` changes it at run time and writes it here); absent = normal.
    #[serde(default, skip_serializing_if = "CpuPriority::is_normal")]
    pub cpu_priority: CpuPriority,
}

/// The CPU priority of the threads that carry the primary's cycles (capture reads, hashing,
/// compression, encryption, sending). The agent's control plane always runs at normal
/// priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPriority {
    /// Like every other process (the agent's own nice value, 0 unless its service sets
    /// `Nice=`): cycles take the CPU they need, also from VMs.
    #[default]
    Normal,
    /// Nice 19: cycles use the CPU the host's VMs leave idle. On a host whose VMs keep the
    /// CPUs busy, cycles take longer and the RPO grows (the RPO alert says so).
    Low,
}

impl CpuPriority {
    /// The nice value the data path's threads run at, for an agent started at nice `base`:
    /// `normal` keeps the agent's own (0 unless its service sets `Nice=`), `low` is 19.
    pub fn nice(self, base: i32) -> i32 {
        match self {
            CpuPriority::Normal => base,
            CpuPriority::Low => 19,
        }
    }

    /// True for the default.
    pub fn is_normal(&self) -> bool {
        *self == CpuPriority::Normal
    }

    /// Parse `normal` or `low` (the CLI's and config's spelling).
    pub fn parse(s: &str) -> Option<CpuPriority> {
        match s {
            "normal" => Some(CpuPriority::Normal),
            "low" => Some(CpuPriority::Low),
            _ => None,
        }
    }
}

impl std::fmt::Display for CpuPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuPriority::Normal => "normal",
            CpuPriority::Low => "low",
        })
    }
}

fn is_utc(z: &crate::bandwidth::TimeZone) -> bool {
    z.offset_min == 0
}

fn default_concurrency() -> usize {
    8
}

/// The default of [`AgentConfig::allowed_programs`]: QEMU's system emulators and
/// `qemu-storage-daemon`.
pub fn default_allowed_programs() -> Vec<String> {
    vec!["qemu-system-*".to_owned(), "qemu-storage-daemon".to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const DAY: u64 = 1440 * MIN;

    #[test]
    fn control_lines_round_trip_and_refuse_garbage() {
        let r = Request::Status {
            name: Some("vm\nname".into()),
        };
        let line = r.to_line().expect("line");
        assert!(!line.contains('\n'));
        assert_eq!(Request::from_line(&line).expect("parse"), r);
        assert_eq!(
            Request::from_line(r#"{"op":"vm-list"}"#).expect("parse"),
            Request::VmList
        );
        for bad in [
            "",
            "{",
            r#"{"op":"no-such-op"}"#,
            r#"{"op":"status","name":7}"#,
        ] {
            assert!(Request::from_line(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn config_bandwidth_and_time_zone() {
        let base = "name = \"a\"\nlisten = \"127.0.0.1:1\"\nstorage = \"/s\"\n";
        let cfg: AgentConfig = toml::from_str(base).expect("plain");
        assert_eq!(cfg.bandwidth, None);
        assert_eq!(cfg.time_zone.offset_min, 0);
        let text = format!("{base}bandwidth = \"08:00-18:00=50M,*=0\"\ntime-zone = \"+01:00\"\n");
        let cfg: AgentConfig = toml::from_str(&text).expect("with bandwidth");
        assert_eq!(
            cfg.bandwidth.as_ref().map(ToString::to_string).as_deref(),
            Some("08:00-18:00=50M,*=0")
        );
        assert_eq!(cfg.time_zone.offset_min, 60);
        let back = toml::to_string(&cfg).expect("encode");
        assert!(back.contains("time-zone = \"+01:00\""), "{back}");
        for bad in [
            format!("{base}time-zone = \"CET\"\n"),
            format!("{base}bandwidth = \"08:00-18:00=5M,17:00-19:00=1M\"\n"),
        ] {
            assert!(toml::from_str::<AgentConfig>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_cpu_priority() {
        let base = "name = \"a\"\nlisten = \"127.0.0.1:1\"\nstorage = \"/s\"\n";
        let cfg: AgentConfig = toml::from_str(base).expect("plain");
        assert_eq!(cfg.cpu_priority, CpuPriority::Normal);
        assert!(
            !toml::to_string(&cfg)
                .expect("encode")
                .contains("cpu-priority")
        );
        let cfg: AgentConfig =
            toml::from_str(&format!("{base}cpu-priority = \"low\"\n")).expect("low");
        assert_eq!(cfg.cpu_priority, CpuPriority::Low);
        assert_eq!(cfg.cpu_priority.nice(0), 19);
        assert_eq!(cfg.cpu_priority.nice(5), 19);
        assert_eq!(CpuPriority::Normal.nice(0), 0);
        assert_eq!(CpuPriority::Normal.nice(5), 5);
        let back = toml::to_string(&cfg).expect("encode");
        assert!(back.contains("cpu-priority = \"low\""), "{back}");
        assert!(
            toml::from_str::<AgentConfig>(&format!("{base}cpu-priority = \"idle\"\n")).is_err()
        );
        for p in [CpuPriority::Normal, CpuPriority::Low] {
            assert_eq!(CpuPriority::parse(&p.to_string()), Some(p));
        }
        assert_eq!(CpuPriority::parse("high"), None);
    }

    #[test]
    fn resync_window_parse_and_contains() {
        let w = ResyncWindow::parse("18:30-06:00").expect("parse");
        assert_eq!(w, ResyncWindow::HYPERV_DEFAULT);
        assert_eq!(w.to_string(), "18:30-06:00 UTC");
        let day = 20_000 * DAY;
        // (window, minute of day, inside)
        let table: &[(&str, u64, bool)] = &[
            ("18:30-06:00", 18 * 60 + 29, false),
            ("18:30-06:00", 18 * 60 + 30, true),
            ("18:30-06:00", 23 * 60 + 59, true),
            ("18:30-06:00", 0, true),
            ("18:30-06:00", 5 * 60 + 59, true),
            ("18:30-06:00", 6 * 60, false),
            ("18:30-06:00", 12 * 60, false),
            ("01:00-03:00", 60, true),
            ("01:00-03:00", 180, false),
            ("01:00-03:00", 59, false),
            ("00:00-00:00", 0, true),
            ("00:00-00:00", 777, true),
        ];
        for &(text, minute, inside) in table {
            let w = ResyncWindow::parse(text).expect("parse");
            assert_eq!(
                w.contains(day + minute * MIN + 59_999),
                inside,
                "{text} at minute {minute}"
            );
        }
        for bad in [
            "",
            "18:30",
            "24:00-01:00",
            "10:60-11:00",
            "a:b-c:d",
            "18:30-6",
        ] {
            assert!(ResyncWindow::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn enable_args_without_auto_resync_still_parse() {
        let old = r#"{"name":"a","replica":"h:1","replica_fingerprint":"f","frequency_secs":30,
            "recovery_points":0,"app_consistent_every_hours":0,"exclude_disks":[],
            "compression":true,"initial_at_ms":null}"#;
        let a: EnableArgs = serde_json::from_str(old).expect("old record");
        assert_eq!(a.auto_resync, None);
    }
}
