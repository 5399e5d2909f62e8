//! The agent's errors: [`AgentError`] (every situation the CLI hears of, each with its exit
//! code) and how a store error or a machine's refusal reaches the remote primary
//! (`RemoteError`).

use std::path::PathBuf;

use uuid::Uuid;
use vmr_capture::CaptureError;
use vmr_capture::qmp::QmpError;
use vmr_core::{InvalidEnable, Refusal};
use vmr_durable::DurableError;
use vmr_proto::VmDefinitionError;
use vmr_proto::api::ReplicationState;
use vmr_proto::wire::RemoteError;
use vmr_store::StoreError;
use vmr_transport::{IdentityError, TransportError};

use crate::db::DbError;
use crate::exit;

/// Map a store error onto what the primary is told.
pub fn store_err(e: StoreError) -> RemoteError {
    match e {
        StoreError::WrongBase { expected, got, .. } => RemoteError::WrongBase { expected, got },
        StoreError::UnknownVm(vm) => RemoteError::UnknownVm { vm },
        ref err if err.is_disk_full() => RemoteError::DiskFull {
            message: crate::util::chain(err),
        },
        StoreError::CorruptExtent { .. } => RemoteError::CorruptExtent { index: 0 },
        // Not retryable: the primary stops in Error with this message. An invalid cycle or
        // definition is the sender's error (400), never worth a retry.
        ref err @ (StoreError::DiskShrunk { .. }
        | StoreError::InvalidCycle(_)
        | StoreError::BadHashRequest(_)
        | StoreError::InvalidImport(_)
        | StoreError::InvalidDefinition(_)
        | StoreError::DefinitionForOtherVm { .. }
        | StoreError::ViewPinsPoint { .. }
        | StoreError::NoSuchDiskIndex(_)
        | StoreError::ReadTooLarge(_)) => RemoteError::BadRequest {
            message: err.to_string(),
        },
        other => RemoteError::Internal {
            message: crate::util::chain(&other),
        },
    }
}

/// An internal failure, as the primary is told.
pub fn internal(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Internal {
        message: e.to_string(),
    }
}

/// What the primary is told when the replica's machine refuses a cycle or call.
pub fn refusal_err(r: Refusal) -> RemoteError {
    match r {
        Refusal::Paused { .. } => RemoteError::Unavailable {
            message: r.to_string(),
        },
        Refusal::WrongBase { expected, got } => RemoteError::WrongBase { expected, got },
        other => RemoteError::BadRequest {
            message: other.to_string(),
        },
    }
}

/// Why a second relationship (fan-out) cannot be added, or a command is refused while the
/// VM has several.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutRefusal {
    /// A command that is not built for a VM with several relationships.
    #[error("{0} is not built for a VM that replicates to several replicas")]
    NotBuilt(&'static str),
    /// A fan-out relationship whose record is gone.
    #[error("fan-out relationship {0} has no record")]
    NoRecord(u32),
    /// The first relationship, while further ones exist.
    #[error(
        "the first relationship cannot be disabled while the VM replicates to further \
         replicas: disable those first (disable NAME --replica HOST:PORT)"
    )]
    FirstRelationship,
    /// A libvirt-managed VM.
    #[error(
        "replicates to {0} already, and replicating a libvirt-managed VM to a second replica \
         is not built"
    )]
    Libvirt(String),
    /// A consistency group member.
    #[error(
        "replicates to {0} already, and a consistency group member replicates to one replica \
         (fan-out of a group member is not built)"
    )]
    GroupMember(String),
    /// Automatic failover.
    #[error(
        "automatic failover of a VM that replicates to several replicas is not built: enable \
         the further relationship without --auto-failover on a VM without it (`set NAME \
         --auto-failover off` first)"
    )]
    AutoFailover,
}

/// Every error the agent reports to the CLI (through the control API) or to its binary. Each
/// variant is one situation; [`AgentError::exit_code`] gives the documented exit code (README.md,
/// "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    // ------------------------------------------------------------ not found (4)
    /// No VM of that name on this host.
    #[error("unknown VM {name:?} (see `vmreplica vm list`)")]
    UnknownVm {
        /// The VM name.
        name: String,
    },
    /// `failover stop-test` without a test copy (of that id).
    #[error("{name:?} has no test failover copy{}", .id.map(|i| format!(" {i}")).unwrap_or_default())]
    NoTestCopy {
        /// The VM name.
        name: String,
        /// The test copy asked for (all when none).
        id: Option<Uuid>,
    },

    /// `failover start/test --point N` of a point the replica does not hold.
    #[error(
        "VM {name:?} has no recovery point {point} (points: {}; see `vmreplica points {name}`)",
        if .points.is_empty() { "none yet".to_owned() } else { .points.iter().map(u64::to_string).collect::<Vec<_>>().join(", ") }
    )]
    NoSuchPoint {
        /// The VM name.
        name: String,
        /// The point asked for.
        point: u64,
        /// The points it holds.
        points: Vec<u64>,
    },

    /// `server deny`/`server remove` of a primary without an authorization entry.
    #[error("no authorization entry for primary {primary:?} (see `vmreplica server show`)")]
    UnknownAllowEntry {
        /// The primary's name.
        primary: String,
    },

    // ------------------------------------------------------------ invalid state (5)
    /// `server allow` with a fingerprint another primary's entry holds.
    #[error(
        "fingerprint {fingerprint} is already authorized for primary {primary:?}; one \
         certificate authorizes one primary (`server remove --primary {primary}` first)"
    )]
    DuplicateFingerprint {
        /// The fingerprint (normalised).
        fingerprint: String,
        /// The primary whose entry holds it.
        primary: String,
    },
    /// `server remove` while replica VMs of that primary are registered.
    #[error(
        "replica VMs of primary {primary:?} are registered here ({}); their storage is the \
         entry's: revoke it with `server deny --primary {primary}` instead",
        .vms.join(", ")
    )]
    AllowEntryInUse {
        /// The primary's name.
        primary: String,
        /// Its replica VMs on this host.
        vms: Vec<String>,
    },
    /// The VM's decision machine refused the operation.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A primary-side operation asked on the replica.
    #[error("{name:?} is a replica VM on this host; run {what} on its primary")]
    OnReplica {
        /// The VM name.
        name: String,
        /// The command, as the user names it.
        what: String,
    },
    /// A replica-side operation asked on the primary.
    #[error("{name:?} is a primary VM on this host; run {what} on its replica")]
    OnPrimary {
        /// The VM name.
        name: String,
        /// The command, as the user names it.
        what: String,
    },
    /// `resync` asked on the replica.
    #[error("{name:?} is a replica VM on this host; resynchronize from its primary")]
    ResyncOnReplica {
        /// The VM name.
        name: String,
    },
    /// `enable` asked on the replica.
    #[error("{name:?} is a replica VM on this host")]
    EnableOnReplica {
        /// The VM name.
        name: String,
    },
    /// `points` asked where the VM is not a replica.
    #[error("{name:?} is not a replica VM on this host; run `points` on its replica")]
    PointsNotReplica {
        /// The VM name.
        name: String,
    },
    /// `import` asked where the VM is not a replica.
    #[error(
        "{name:?} is not a replica VM on this host; enable replication on its primary first (the \
         replica VM is created then), and import here"
    )]
    ImportNotReplica {
        /// The VM name.
        name: String,
    },
    /// `set --bandwidth` on a VM that is not a primary with replication enabled.
    #[error(
        "{name:?} is not a primary VM with replication enabled on this host: its sending limit \
         is set on its primary, after `vmreplica enable`"
    )]
    BandwidthNotPrimary {
        /// The VM name.
        name: String,
    },
    /// Replication of the VM is not enabled.
    #[error("replication of {name:?} is not enabled")]
    NotEnabled {
        /// The VM name.
        name: String,
    },
    /// A command that acts on one relationship of a VM that replicates to several replicas
    /// (fan-out) did not say which (`--replica HOST:PORT`).
    #[error("{name:?} replicates to {replicas}: say which relationship with --replica HOST:PORT")]
    AmbiguousRelationship {
        /// The VM name.
        name: String,
        /// Its replicas' addresses, comma-separated.
        replicas: String,
    },
    /// `--replica HOST:PORT` names no relationship of the VM.
    #[error("{name:?} does not replicate to {replica} (its replicas: {replicas})")]
    NoSuchRelationship {
        /// The VM name.
        name: String,
        /// The address given.
        replica: String,
        /// Its replicas' addresses, comma-separated.
        replicas: String,
    },
    /// A second relationship (fan-out) cannot be added, or a command is refused while the VM
    /// has several.
    #[error("{name:?}: {reason}")]
    FanoutRefused {
        /// The VM name.
        name: String,
        /// Why.
        reason: FanoutRefusal,
    },
    /// `enable` on a VM that replicates already.
    #[error("replication of {name:?} is already enabled ({state})")]
    AlreadyEnabled {
        /// The VM name.
        name: String,
        /// The replication state.
        state: ReplicationState,
    },
    /// `vm add --libvirt`: the domain could not be used (no such domain, not running, a disk
    /// that is not a qcow2 file, libvirt unreachable).
    #[error("libvirt domain {domain:?} (at {uri})")]
    LibvirtDomain {
        /// The domain name.
        domain: String,
        /// The connection URI.
        uri: String,
        /// What libvirt or the disk check said.
        #[source]
        source: vmr_libvirt::LibvirtError,
    },
    /// An operation not built yet for a libvirt-managed VM (docs/libvirt.md, "State of this
    /// work").
    #[error(
        "{name:?} is a libvirt-managed VM (domain {domain:?}): {what} is not built yet for \
         libvirt VMs (docs/libvirt.md)"
    )]
    LibvirtNotBuilt {
        /// The VM name.
        name: String,
        /// Its domain.
        domain: String,
        /// What was asked for.
        what: &'static str,
    },
    /// A failover cannot start the replicated definition on this host
    /// ([`vmr_core::failover_launcher`]'s refusal).
    #[error("cannot fail {name:?} over on this host")]
    FailoverLauncher {
        /// The VM name.
        name: String,
        /// Why.
        #[source]
        source: vmr_core::LauncherRefusal,
    },
    /// A VM replicated from a libvirt domain cannot be started with plain QEMU on this host
    /// (no libvirt here): its domain XML has something plain QEMU is not started with.
    #[error(
        "{name:?} was replicated from a libvirt domain and this host has no libvirt (no \
         libvirt-connect in config.toml and qemu:///system does not answer): it cannot be started \
         with plain QEMU from its domain XML"
    )]
    DomainToQemu {
        /// The VM name.
        name: String,
        /// What in the domain XML.
        #[source]
        source: vmr_libvirt::LibvirtError,
    },
    /// Failover through libvirt: a libvirt call on this host failed (connecting, defining,
    /// starting, destroying or undefining the failed-over domain).
    #[error("failover through libvirt at {uri}: {doing} domain {domain:?}")]
    FailoverDomain {
        /// The connection URI (`libvirt-connect` in config.toml).
        uri: String,
        /// What was being done.
        doing: &'static str,
        /// The domain.
        domain: String,
        /// What libvirt said.
        source: vmr_libvirt::LibvirtError,
    },
    /// A VM of that name or UUID is registered.
    #[error("VM {name:?} ({uuid}) is already registered")]
    AlreadyRegistered {
        /// The VM name.
        name: String,
        /// The VM UUID.
        uuid: Uuid,
    },
    /// `vm remove`/`vm set` while the VM's replication is enabled.
    #[error(
        "replication of {name:?} is enabled ({state}): {why}; run `vmreplica disable {name}` \
         first"
    )]
    VmReplicating {
        /// The VM name.
        name: String,
        /// The replication state.
        state: ReplicationState,
        /// What the change would break.
        why: String,
    },
    /// `vm remove`/`vm set` on a replica VM.
    #[error(
        "{name:?} is a replica VM on this host, not a registered primary VM: remove it (and its \
         recovery points) with `vmreplica replica remove {name}`"
    )]
    VmIsReplica {
        /// The VM name.
        name: String,
    },
    /// `replica remove` on a primary VM.
    #[error(
        "{name:?} is a primary VM on this host: unregister it with `vmreplica vm remove {name}`"
    )]
    VmIsPrimary {
        /// The VM name.
        name: String,
    },
    /// `replica remove` while failover VMs or test copies of the VM exist.
    #[error(
        "{name:?} has failover copies on this host ({}): stop them first (`vmreplica failover \
         stop-test {name}`, or cancel the failover)",
        .copies.join(", ")
    )]
    FailoverCopies {
        /// The VM name.
        name: String,
        /// The copies (names, or view ids).
        copies: Vec<String>,
    },
    /// `init` on a directory that holds an agent.
    #[error("{} already holds an agent (config.toml exists)", .dir.display())]
    AgentExists {
        /// The directory.
        dir: PathBuf,
    },
    /// Failover: there is no failed-over VM.
    #[error("{name:?} has no failed-over VM")]
    NoFailedOverVm {
        /// The VM name.
        name: String,
    },
    /// `failover complete` while a test copy pins another recovery point.
    #[error(
        "test copy {view} (point {point}) pins another recovery point; `failover stop-test` it first"
    )]
    TestPinsPoint {
        /// The test copy (its view id).
        view: Uuid,
        /// The recovery point.
        point: u64,
    },
    /// `reverse` while the failed-over VM does not run.
    #[error(
        "the failed-over VM {name:?} is not running; reverse needs it running with change \
         tracking (failover start without --no-start)"
    )]
    FailedOverNotRunning {
        /// The VM name.
        name: String,
    },
    /// Split-brain guard: the primary answers and its VM runs.
    #[error(
        "the primary {primary} ({addr}) still answers and its VM {name:?} runs ({state}); shut it \
         down (or `failover prepare` it) first, or pass --force"
    )]
    PrimaryRuns {
        /// The primary agent's name.
        primary: String,
        /// The primary agent's address.
        addr: String,
        /// The VM name.
        name: String,
        /// The replication state.
        state: ReplicationState,
    },
    /// Split-brain guard: the primary's VM state cannot be checked, for another reason than
    /// the primary being unreachable.
    #[error(
        "cannot check whether the primary {primary} ({addr}) still runs the VM: {reason}; make \
         sure it does not (shut it down, or `failover prepare` it), then pass --force"
    )]
    PrimaryUnchecked {
        /// The primary agent's name.
        primary: String,
        /// The address probed.
        addr: String,
        /// Why the probe failed.
        reason: String,
    },
    /// `failover prepare` while the guest runs.
    #[error(
        "{name:?} is running ({status}); shut the guest down first (e.g. `system_powerdown` with \
         QEMU's -no-shutdown, or `stop`)"
    )]
    VmStillRunning {
        /// The VM name.
        name: String,
        /// The status QEMU reports.
        status: String,
    },
    /// `failover prepare --shutdown`: the guest did not go down in time.
    #[error(
        "{name:?} did not shut down within {waited_s} s (asked through: {asked}); nothing was \
         changed: replication goes on. Shut the guest down by hand and run `failover prepare` \
         again, or give a longer --timeout"
    )]
    ShutdownTimedOut {
        /// The VM name.
        name: String,
        /// Seconds waited.
        waited_s: u64,
        /// How the guest was asked.
        asked: &'static str,
    },
    /// The guest shutdown machine refused an event (a bug).
    #[error("guest shutdown")]
    ShutdownRefused(#[source] vmr_core::shutdown::ShutdownRefusal),
    /// `import` of a copy of another VM.
    #[error("the copy in {} is of VM {vm} ({vm_name:?}), not of {name:?} ({uuid})", .dir.display())]
    ImportOtherVm {
        /// The directory.
        dir: PathBuf,
        /// The VM the copy is of.
        vm: Uuid,
        /// The name of the VM the copy is of.
        vm_name: String,
        /// The VM name.
        name: String,
        /// The VM UUID.
        uuid: Uuid,
    },

    // ------------------------------------------------------------ usage (2)
    /// The enable arguments are invalid.
    #[error(transparent)]
    InvalidEnable(#[from] InvalidEnable),
    /// A bad `--auto-failover` value.
    #[error(transparent)]
    InvalidAutoFailover(#[from] vmr_core::autofailover::InvalidAutoFailover),
    /// `--auto-failover` on a libvirt-managed VM (its fence is not built).
    #[error(
        "{name:?} is libvirt-managed: automatic failover fences QEMU through its QMP monitor, which is not built for libvirt VMs"
    )]
    AutoFailoverLibvirt {
        /// The VM name.
        name: String,
    },
    /// `unfence` or `set --auto-failover off` on a VM without automatic failover.
    #[error("{name:?} has no automatic failover here (see `vmreplica enable --auto-failover`)")]
    NoAutoFailover {
        /// The VM name.
        name: String,
    },
    /// The lease holder refused the command (not fenced, or the replica took the VM over).
    #[error("{name}: {refusal}")]
    Lease {
        /// The VM name.
        name: String,
        /// The holder's refusal.
        refusal: vmr_core::autofailover::HolderRefusal,
    },
    /// The unfence's renewal was not granted.
    #[error("{name}: unfence refused, the VM stays fenced: {reason}")]
    UnfenceRefused {
        /// The VM name.
        name: String,
        /// The witness's answer or the call's error.
        reason: String,
    },
    /// `failover start` on a replica with automatic failover: the witness did not grant the
    /// lease (the primary holds it) or could not be asked.
    #[error(
        "{name}: the witness did not grant the VM's lease ({reason}); the primary may be running the VM. Wait, or pass --force (the admin's call: nothing checks then that the VM does not run twice)"
    )]
    LeaseNotGranted {
        /// The VM name.
        name: String,
        /// The witness's answer, or why it could not be asked.
        reason: String,
    },
    /// `failover start` while a promise this replica gave the primary is live.
    #[error("{name}: {refusal}")]
    Watch {
        /// The VM name.
        name: String,
        /// The watch's refusal.
        refusal: vmr_core::autofailover::WatchRefusal,
    },
    /// This host's `--replica-network-args` cannot replace the replicated definition's.
    #[error(
        "this host's failover network-args (vm set --replica-network-args) do not fit the replicated definition"
    )]
    ReplicaNetworkArgs(#[source] vmr_proto::VmDefinitionError),
    /// `vm set --failover-*` with invalid settings.
    #[error("invalid failover network settings")]
    FailoverSettings(#[source] vmr_proto::FailnetError),
    /// `server allow` with something that is not a fingerprint.
    #[error("{fingerprint:?} is not a certificate fingerprint (SHA256:<64 hex>)")]
    BadFingerprint {
        /// What was given.
        fingerprint: String,
    },
    /// `vm add` with an invalid definition.
    #[error("invalid --launch file")]
    BadDefinition(#[source] VmDefinitionError),
    /// `vm add NAME` with a definition of another name.
    #[error("the definition names the VM {def_name:?}, not {name:?}")]
    DefinitionName {
        /// The name in the definition.
        def_name: String,
        /// The VM name.
        name: String,
    },
    /// `vm set --launch` with a definition of another VM (UUID).
    #[error(
        "the definition is of VM {new}, but {name:?} is {old}: the UUID is the VM's identity \
         (register that VM with `vm add`)"
    )]
    DefinitionUuid {
        /// The VM name.
        name: String,
        /// The registered UUID.
        old: Uuid,
        /// The definition's UUID.
        new: Uuid,
    },
    /// `vm add --disk` naming a disk the definition lacks.
    #[error("--disk {disk:?} is not a disk of the definition")]
    DiskNotInDefinition {
        /// The disk id.
        disk: String,
    },
    /// `vm add` with an unusable VM name.
    #[error("bad VM name {name:?}: {reason} (1 to 64 printable characters, no '/')")]
    BadVmName {
        /// The name (its first 64 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `init` with an unusable agent name.
    #[error("bad agent name {name:?}")]
    BadAgentName {
        /// The VM name.
        name: String,
    },
    /// `init --listen` (or `--metrics`, `metrics-listen`) that is not HOST:PORT.
    #[error("{flag} {listen:?} is not HOST:PORT (e.g. 0.0.0.0:9443, 10.0.0.2:9443 or host-b:9443)")]
    BadListen {
        /// Which setting.
        flag: &'static str,
        /// What was given.
        listen: String,
    },
    /// `init --listen` (or `--metrics`, `metrics-listen`) with a host name that does not
    /// resolve.
    #[error("{flag} {listen:?}: host name {host:?} does not resolve")]
    ListenUnresolved {
        /// Which setting.
        flag: &'static str,
        /// What was given.
        listen: String,
        /// The host name.
        host: String,
        /// The resolver's error (none: it answered no address).
        #[source]
        source: Option<std::io::Error>,
    },
    /// `init --advertise` with an address peers cannot reach.
    #[error("--advertise {advertise:?} cannot be advertised: {reason}")]
    BadAdvertise {
        /// What was given.
        advertise: String,
        /// Why not.
        reason: vmr_core::UnusableProbe,
    },
    /// `reverse` without a known address of the old primary.
    #[error("the old primary's address is unknown: pass --replica HOST:PORT")]
    OldPrimaryAddressUnknown,
    /// `reverse` without a known fingerprint of the old primary.
    #[error("pass --replica-fingerprint")]
    OldPrimaryFingerprintUnknown,
    /// `reverse --follow` without the sibling replica's address and fingerprint.
    #[error(
        "reverse --follow names the sibling replica that follows: pass --replica HOST:PORT and \
         --replica-fingerprint FP"
    )]
    FollowNeedsReplica,

    // ------------------------------------------------------------ failure (1)
    /// The config file cannot be read.
    #[error("cannot read {} ({err}); run `vmreplica init --dir {}` first", .path.display(), .dir.display())]
    ConfigUnreadable {
        /// The file.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// The config file does not parse.
    #[error("{} is not a valid agent config", .path.display())]
    ConfigInvalid {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: toml::de::Error,
    },
    /// A config value is out of range.
    #[error("{}: `{key}` {reason}", .path.display())]
    ConfigValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The TLS key is readable or writable by group or others.
    #[error(
        "{} has mode {mode:o}: group or others can read the agent's private key; `chmod 600 {}` \
         (and replace the identity if others may have read it)",
        .path.display(), .path.display()
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The config cannot be encoded.
    #[error("encoding the agent config")]
    ConfigEncode(#[source] toml::ser::Error),
    /// The config's listen address is not HOST:PORT.
    #[error("listen address {listen:?} is not HOST:PORT")]
    ListenAddress {
        /// What was given.
        listen: String,
        /// The cause.
        source: std::net::AddrParseError,
    },
    /// Another agent holds the agent directory's lock (`DIR/agent.lock`).
    #[error(
        "another vmreplica agent{} already serves {}; stop it first (its lock is {}/agent.lock)",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .dir.display(), .dir.display()
    )]
    AgentRunning {
        /// The agent directory.
        dir: PathBuf,
        /// The running agent's pid, as its lock file names it.
        pid: Option<u32>,
    },
    /// Another agent serves the control socket.
    #[error("another agent is already serving {}", .path.display())]
    ControlSocketBusy {
        /// The file.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("{doing} {}", .path.display())]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The data path's threads could not be given a CPU priority (raising it back needs
    /// `CAP_SYS_NICE`).
    #[error(
        "cannot run the data path at CPU priority {priority} (nice {nice}){}",
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ": raising it back needs CAP_SYS_NICE; set `cpu-priority` in config.toml and restart the agent"
        } else {
            ""
        }
    )]
    CpuPriority {
        /// The priority asked for.
        priority: vmr_proto::api::CpuPriority,
        /// Its nice value.
        nice: i32,
        /// The cause.
        source: std::io::Error,
    },
    /// A system facility (runtime, signal handler) could not be set up.
    #[error("{doing}")]
    System {
        /// What was being done.
        doing: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{doing} {}", .path.display())]
    Json {
        /// What was being done.
        doing: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Encoding a JSON value failed.
    #[error("encoding {what}")]
    JsonEncode {
        /// The command, as the user names it.
        what: &'static str,
        /// The cause.
        source: serde_json::Error,
    },
    /// The state database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The event log.
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    /// A replica store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Opening a replica store failed.
    #[error("opening replica store {}", .root.display())]
    OpenStore {
        /// The storage directory.
        root: PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// Recovering a replica store failed.
    #[error("recovering replica store {}", .root.display())]
    RecoverStore {
        /// The storage directory.
        root: PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// Durable file writes.
    #[error(transparent)]
    Durable(#[from] DurableError),
    /// Capture (QEMU block jobs, NBD).
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The TLS identity.
    #[error("{doing} the TLS identity")]
    Identity {
        /// What was being done.
        doing: &'static str,
        /// The cause.
        source: IdentityError,
    },
    /// The replicated VM definition (stored on the replica) is invalid.
    #[error("the replicated VM definition is invalid")]
    ReplicatedDefinition(#[source] VmDefinitionError),
    /// The VM's own definition does not parse or render.
    #[error(transparent)]
    Definition(#[from] VmDefinitionError),
    /// The VM's owner task has stopped.
    #[error("the owner of VM {name:?} has stopped")]
    OwnerStopped {
        /// The VM name.
        name: String,
    },
    /// The monitoring listener would listen beyond this host without a bearer token.
    #[error(
        "the monitoring listener {listen} is not a loopback address, so it needs a bearer token: \
         set metrics-token-file in config.toml, or create the agent with `vmreplica init \
         --metrics {listen} --metrics-token` (or listen on 127.0.0.1)"
    )]
    MetricsNeedsToken {
        /// The address.
        listen: std::net::SocketAddr,
    },
    /// The monitoring listener's token file cannot be used.
    #[error("metrics token file {path}: {reason}")]
    MetricsToken {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// Binding the monitoring listener failed.
    #[error("cannot bind the monitoring listener {addr}: {err}")]
    BindMetrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The reason.
        err: std::io::Error,
    },
    /// Binding the replication listener failed.
    #[error("cannot bind {addr}: {err}")]
    BindListener {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// The reason.
        err: std::io::Error,
    },
    /// Setting up the replication listener failed (other than binding).
    #[error("setting up the replication listener {addr}")]
    ListenerSetup {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: TransportError,
    },
    /// `enable`: the replica cannot be reached.
    #[error("connecting to the replica {replica}")]
    ConnectReplica {
        /// The replica agent's address.
        replica: String,
        /// The cause.
        source: TransportError,
    },
    /// `enable`: the replica does not authorize this agent's certificate.
    #[error(
        "this agent is not authorized on the replica {replica}: run `vmreplica server allow \
         --primary {primary} --fingerprint {fingerprint}` on the replica"
    )]
    NotAuthorizedOnReplica {
        /// The replica agent's address.
        replica: String,
        /// This agent's name.
        primary: String,
        /// This agent's certificate fingerprint.
        fingerprint: String,
    },
    /// `enable`: the replica refused the replica VM.
    #[error("the replica refused to create the replica VM")]
    CreateReplica(#[source] TransportError),
    /// `reverse`: the old primary cannot be reached.
    #[error("connecting to the old primary {addr}")]
    ConnectOldPrimary {
        /// The primary agent's address.
        addr: String,
        /// The cause.
        source: TransportError,
    },
    /// `reverse`: the old primary refused.
    #[error("the old primary refused to become the replica")]
    BecomeReplica(#[source] TransportError),
    /// `reverse --follow`: the sibling replica refused to follow (nothing changed).
    #[error("the sibling replica refused to follow this host (nothing changed)")]
    Follow(#[source] TransportError),
    /// `reverse`: the failover point is gone.
    #[error("the failover point is gone from the store")]
    FailoverPointGone {
        /// The recovery point.
        point: u64,
    },
    /// `failover prepare`: the final planned cycle failed.
    #[error("the final cycle failed: {reason}")]
    FinalCycleFailed {
        /// The machine's last error.
        reason: String,
    },
    /// `failover prepare`: the final cycle could not be shipped because the VM's change
    /// tracking is lost or unreliable (e.g. its QEMU was killed instead of shut down).
    #[error(
        "{name:?}: the final cycle cannot be shipped from the images: {reason}; a full \
         resynchronisation is needed (start the VM, `vmreplica resume {name} --resync`, let it \
         complete, shut the guest down and prepare again; or fail over unplanned to the latest \
         point)"
    )]
    FinalCycleNeedsResync {
        /// The VM name.
        name: String,
        /// The machine's last error.
        reason: String,
    },
    /// `failover prepare`: the VM's monitor is there but does not answer; the VM may run.
    #[error(
        "{name:?}: its QMP monitor {qmp} does not answer ({reason}); the VM may still run: shut \
         it down (or end its process) before `failover prepare`"
    )]
    VmMonitorUnresponsive {
        /// The VM name.
        name: String,
        /// The QMP socket.
        qmp: String,
        /// Why.
        reason: String,
    },
    /// `failover prepare` from the images: a running process holds one (QEMU's image locking
    /// refused the agent's qemu-storage-daemon).
    #[error(
        "{name:?}: its QMP monitor {qmp} is gone but image {image} is in use by another process \
         (the VM may still run without that monitor): shut it down before `failover prepare`: \
         {detail}"
    )]
    ImagesInUse {
        /// The VM name.
        name: String,
        /// The QMP socket that did not answer.
        qmp: String,
        /// The locked image.
        image: String,
        /// qemu-storage-daemon's message.
        detail: String,
    },
    /// `failover prepare` from the images: the agent's qemu-storage-daemon on them failed.
    #[error("qemu-storage-daemon on the images of {name:?} {what}: {detail}")]
    ImageDaemon {
        /// The VM name.
        name: String,
        /// What failed (`did not start`, `did not stop cleanly`, ...).
        what: &'static str,
        /// Its output or the cause.
        detail: String,
    },
    /// `vm add`: the VM's QMP monitor does not answer (the VM is not running, or not with
    /// that monitor, or another client holds it).
    #[error(
        "the VM's QMP socket {qmp} does not answer: a VM is registered only while it runs with \
         that monitor reserved for vmreplica (e.g. -qmp unix:{qmp},server=on,wait=off)"
    )]
    VmNotAnswering {
        /// The QMP socket.
        qmp: String,
        /// The cause.
        source: QmpError,
    },
    /// `vm add`: listing the VM's block nodes failed.
    #[error("listing the block nodes of the VM at {qmp}")]
    QueryNodes {
        /// The QMP socket.
        qmp: String,
        /// The cause.
        source: QmpError,
    },
    /// `vm add`: a disk of the definition is not a block node of the running VM.
    #[error(
        "disk {node:?} of the definition is not a block node of the VM at {qmp} (its nodes: \
         {nodes}); name the disk's format node with -blockdev ...,node-name={node}"
    )]
    DiskNodeMissing {
        /// The definition's node name.
        node: String,
        /// The QMP socket.
        qmp: String,
        /// The node names the VM has.
        nodes: String,
    },
    /// `vm add`: a disk node of the running VM opens another image than the definition says.
    #[error(
        "disk {node:?}: the VM opens {qemu:?}, the definition says {definition:?} (a failover \
         would start the VM from the wrong path)"
    )]
    DiskPathMismatch {
        /// The node name.
        node: String,
        /// The definition's path.
        definition: String,
        /// The image QEMU reports for the node.
        qemu: String,
    },
    /// `vm add --nbd` or `--qga` with a path a Unix socket cannot have.
    #[error("{option} {path:?}: {reason}")]
    BadNbdSocket {
        /// The option (`--nbd`, `--qga`).
        option: &'static str,
        /// What was given.
        path: String,
        /// Why not.
        reason: &'static str,
    },
    /// Failover: the VM command cannot be built.
    #[error("building the VM command from the replicated definition")]
    LaunchCommand(#[source] Box<AgentError>),
    /// Failover: the replicated definition names a program this host does not allow.
    #[error(
        "the replicated definition's program {program:?} is not allowed on this host: its file \
         name matches none of `allowed-programs` = {allowed:?} in {}",
        .config.display()
    )]
    ProgramNotAllowed {
        /// The program the definition names.
        program: String,
        /// The allowed patterns.
        allowed: Vec<String>,
        /// The config file holding them.
        config: PathBuf,
    },
    /// Failover: the allowed program does not exist.
    #[error(
        "the replicated definition's program {program:?} cannot be found (an absolute path \
         that exists, or a name on the agent's PATH)"
    )]
    ProgramNotFound {
        /// The program the definition names.
        program: String,
    },
    /// Failover: the VM program cannot be started.
    #[error("starting {program}")]
    SpawnVm {
        /// The VM program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Failover: the VM exited at start.
    #[error("{program} exited ({status}) at start:\n{log}")]
    VmExited {
        /// The VM program.
        program: String,
        /// The status QEMU reports.
        status: std::process::ExitStatus,
        /// The end of the VM's log.
        log: String,
    },
    /// Failover: the VM's QMP socket did not answer in time.
    #[error("the VM's QMP socket {} did not answer", .path.display())]
    QmpTimeout {
        /// The file.
        path: PathBuf,
    },
    /// Failover: adding the change-tracking bitmap failed.
    #[error("starting change tracking on {node}")]
    StartTracking {
        /// The disk node.
        node: String,
        /// The cause.
        source: QmpError,
    },
    /// Failover: `cont` failed.
    #[error("resuming the VM")]
    ResumeVm(#[source] QmpError),
    /// Failover: creating the overlays failed.
    #[error("creating the failover overlays")]
    CreateOverlays(#[source] StoreError),
    /// Import: the manifest's format is not supported.
    #[error("{}: unsupported format {format}", .path.display())]
    ManifestFormat {
        /// The file.
        path: PathBuf,
        /// The format the manifest names.
        format: u32,
    },
    /// Import: the manifest names a file that is not a plain file name.
    #[error("{}: bad file name {file:?}", .path.display())]
    ManifestFileName {
        /// The file.
        path: PathBuf,
        /// The file name the manifest names.
        file: String,
    },
    /// Import: the copy's checksum does not match its manifest.
    #[error("{} is damaged: its BLAKE3 is {got}, the manifest says {expected}", .path.display())]
    CopyDamaged {
        /// The file.
        path: PathBuf,
        /// The BLAKE3 of the file.
        got: String,
        /// The BLAKE3 the manifest names.
        expected: String,
    },
    /// Import: the store refused the copy.
    #[error("importing {}", .path.display())]
    Import {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// Import: the store refused the disk images.
    #[error("importing disk images from {}", .dir.display())]
    ImportImages {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[source] tokio::task::JoinError),
    /// `verify`: the verify cycle or its comparison failed (nothing was compared).
    #[error("verification failed: {reason}")]
    VerifyFailed {
        /// Why.
        reason: String,
    },
    /// `verify --point`: only the latest point can be compared with the primary.
    #[error(
        "{name:?}: point {point} cannot be verified: the primary's disks hold the content of \
         now only, so `vmreplica verify` compares a new cut on top of the replica's latest \
         point (run it without --point, or with the latest point's id); `vmreplica verify \
         {name} --local --point {point}` on the replica checks that point's layers"
    )]
    VerifyPoint {
        /// The VM.
        name: String,
        /// The point asked for.
        point: u64,
    },
    /// `verify` without `--local` on the replica, or with `--local` on the primary.
    #[error("{name:?}: {what}")]
    VerifyWrongSide {
        /// The VM.
        name: String,
        /// What to do instead.
        what: &'static str,
    },
    /// `verify --local`: the store could not check the VM's files.
    #[error("checking the replica's files")]
    VerifyLocal(#[source] StoreError),
    /// `group create` refused: the group cannot be formed as asked (docs/groups.md).
    #[error("group create")]
    Group(#[from] vmr_core::group::GroupRefusal),
    /// A replica VM was to be made a group member.
    #[error("{name:?} is a replica VM on this host; a group's members are primary VMs")]
    GroupMemberReplica {
        /// The VM.
        name: String,
    },
    /// `group failover --point`: no complete group point of this id (or none at all).
    #[error("group {name:?} has no complete group point {}", point.map_or_else(|| "yet".to_owned(), |p| p.to_string()))]
    NoGroupPoint {
        /// The group.
        name: String,
        /// The group point asked for.
        point: Option<u64>,
    },
    /// `group reverse`: a member's reverse is refused by its machine's rule; nothing was
    /// reversed.
    #[error("group {group:?}: member {member:?} cannot be reversed; nothing was reversed")]
    GroupMemberRefused {
        /// The group.
        group: String,
        /// The member.
        member: String,
        /// Its machine's refusal.
        #[source]
        refusal: vmr_core::Refusal,
    },
    /// `group failover`: some members were prepared for a planned failover, some not.
    #[error(transparent)]
    GroupPartlyPrepared(#[from] vmr_core::group::GroupFailoverRefusal),
    /// `group prepare`: a member's prepare is refused by its machine's rule; nothing was
    /// prepared.
    #[error(
        "group {group:?}: member {member:?} cannot be prepared for a planned failover; nothing was prepared"
    )]
    GroupPrepareRefused {
        /// The group.
        group: String,
        /// The member.
        member: String,
        /// Its machine's refusal.
        #[source]
        refusal: vmr_core::Refusal,
    },
    /// `group reverse`: a member named by the group points' tags is not registered here.
    #[error("group {group:?}: member {uuid} is not a VM of this agent")]
    GroupMemberMissing {
        /// The group.
        group: String,
        /// The member's UUID.
        uuid: Uuid,
    },
    /// No group of this name.
    #[error("no group named {name:?}")]
    UnknownGroup {
        /// The group.
        name: String,
    },
}

impl AgentError {
    /// The CLI exit code of this error (README.md, "Exit codes").
    pub fn exit_code(&self) -> i32 {
        use AgentError::*;
        match self {
            UnknownVm { .. }
            | NoTestCopy { .. }
            | UnknownAllowEntry { .. }
            | NoSuchPoint { .. }
            | UnknownGroup { .. }
            | GroupMemberMissing { .. }
            | NoGroupPoint { .. }
            | NoSuchRelationship { .. } => exit::NOT_FOUND,
            Refused(_)
            | GroupMemberRefused { .. }
            | GroupPartlyPrepared(_)
            | GroupPrepareRefused { .. }
            | DuplicateFingerprint { .. }
            | AllowEntryInUse { .. }
            | OnReplica { .. }
            | OnPrimary { .. }
            | ResyncOnReplica { .. }
            | EnableOnReplica { .. }
            | PointsNotReplica { .. }
            | ImportNotReplica { .. }
            | BandwidthNotPrimary { .. }
            | NotEnabled { .. }
            | AlreadyEnabled { .. }
            | AlreadyRegistered { .. }
            | LibvirtNotBuilt { .. }
            | FailoverLauncher { .. }
            | DomainToQemu { .. }
            | VmReplicating { .. }
            | VmIsReplica { .. }
            | VmIsPrimary { .. }
            | NotAuthorizedOnReplica { .. }
            | FailoverCopies { .. }
            | AgentExists { .. }
            | NoFailedOverVm { .. }
            | TestPinsPoint { .. }
            | FailedOverNotRunning { .. }
            | PrimaryRuns { .. }
            | PrimaryUnchecked { .. }
            | VmStillRunning { .. }
            | VmMonitorUnresponsive { .. }
            | ImagesInUse { .. }
            | FinalCycleNeedsResync { .. }
            | VerifyPoint { .. }
            | VerifyWrongSide { .. }
            | ShutdownTimedOut { .. }
            | ImportOtherVm { .. }
            | GroupMemberReplica { .. }
            | AmbiguousRelationship { .. }
            | FanoutRefused { .. }
            | NoAutoFailover { .. }
            | Lease { .. }
            | UnfenceRefused { .. }
            | LeaseNotGranted { .. }
            | Watch { .. } => exit::INVALID_STATE,
            InvalidEnable(_)
            | InvalidAutoFailover(_)
            | AutoFailoverLibvirt { .. }
            | Group(_)
            | FailoverSettings(_)
            | ReplicaNetworkArgs(_)
            | BadFingerprint { .. }
            | BadDefinition(_)
            | DefinitionName { .. }
            | DefinitionUuid { .. }
            | DiskNotInDefinition { .. }
            | DiskNodeMissing { .. }
            | DiskPathMismatch { .. }
            | BadNbdSocket { .. }
            | LibvirtDomain { .. }
            | BadAgentName { .. }
            | BadVmName { .. }
            | BadListen { .. }
            | ListenUnresolved { .. }
            | MetricsNeedsToken { .. }
            | BadAdvertise { .. }
            | OldPrimaryAddressUnknown
            | OldPrimaryFingerprintUnknown
            | FollowNeedsReplica => exit::USAGE,
            ConfigUnreadable { .. }
            | ConfigInvalid { .. }
            | ConfigEncode(_)
            | ConfigValue { .. }
            | KeyExposed { .. }
            | ListenerSetup { .. }
            | ListenAddress { .. }
            | Io { .. }
            | System { .. }
            | CpuPriority { .. }
            | Json { .. }
            | JsonEncode { .. }
            | Db(_)
            | Events(_)
            | Store(_)
            | OpenStore { .. }
            | RecoverStore { .. }
            | Durable(_)
            | Capture(_)
            | Identity { .. }
            | ReplicatedDefinition(_)
            | Definition(_)
            | OwnerStopped { .. }
            | BindListener { .. }
            | BindMetrics { .. }
            | MetricsToken { .. }
            | ConnectReplica { .. }
            | CreateReplica(_)
            | ConnectOldPrimary { .. }
            | BecomeReplica(_)
            | Follow(_)
            | FailoverPointGone { .. }
            | FinalCycleFailed { .. }
            | VerifyFailed { .. }
            | VerifyLocal(_)
            | ImageDaemon { .. }
            | VmNotAnswering { .. }
            | QueryNodes { .. }
            | ShutdownRefused(_)
            | LaunchCommand(_)
            | ProgramNotAllowed { .. }
            | ProgramNotFound { .. }
            | SpawnVm { .. }
            | FailoverDomain { .. }
            | VmExited { .. }
            | QmpTimeout { .. }
            | StartTracking { .. }
            | ResumeVm(_)
            | CreateOverlays(_)
            | ManifestFormat { .. }
            | ManifestFileName { .. }
            | CopyDamaged { .. }
            | Import { .. }
            | ImportImages { .. }
            | Task(_) => exit::FAILURE,
            AgentRunning { .. } | ControlSocketBusy { .. } => exit::AGENT_RUNNING,
        }
    }

    /// A failure of the replication listener's `bind`: "cannot bind ADDR: reason".
    pub fn bind(addr: std::net::SocketAddr, e: TransportError) -> AgentError {
        match e {
            TransportError::Connect { source, .. } => {
                AgentError::BindListener { addr, err: source }
            }
            source => AgentError::ListenerSetup { addr, source },
        }
    }

    /// An io error with the path and what was being done.
    pub fn io(
        doing: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io {
            doing,
            path,
            source,
        }
    }

    /// The error and its sources, outermost first (what the control API answers).
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.to_string()];
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            out.push(e.to_string());
            src = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::PermissionDenied)
    }

    #[test]
    fn exit_codes_follow_the_readme() {
        let name = || "web".to_owned();
        assert_eq!(AgentError::UnknownVm { name: name() }.exit_code(), 4);
        assert_eq!(
            AgentError::NoTestCopy {
                name: name(),
                id: None
            }
            .exit_code(),
            4
        );
        let refusal = Refusal::State {
            op: vmr_core::Op::Complete,
            state: ReplicationState::Replicating,
        };
        assert_eq!(AgentError::from(refusal).exit_code(), 5);
        assert_eq!(
            AgentError::OnReplica {
                name: name(),
                what: "Pause".into()
            }
            .exit_code(),
            5
        );
        assert_eq!(AgentError::NotEnabled { name: name() }.exit_code(), 5);
        assert_eq!(
            AgentError::from(InvalidEnable::FrequencyTooShort { secs: 1 }).exit_code(),
            2
        );
        assert_eq!(
            AgentError::BadFingerprint {
                fingerprint: "x".into()
            }
            .exit_code(),
            2
        );
        assert_eq!(AgentError::OldPrimaryAddressUnknown.exit_code(), 2);
        assert_eq!(
            AgentError::io("reading", "/nowhere")(io_err()).exit_code(),
            1
        );
        assert_eq!(AgentError::OwnerStopped { name: name() }.exit_code(), 1);
    }

    #[test]
    fn invalid_cycles_and_definitions_are_client_errors() {
        for e in [
            StoreError::InvalidCycle(vmr_store::CycleFault::NoDisks),
            StoreError::DefinitionForOtherVm {
                found: uuid::Uuid::from_u128(1),
                expected: uuid::Uuid::from_u128(2),
            },
            StoreError::BadHashRequest(vmr_store::HashRequestFault::Count { count: 0, max: 1 }),
            StoreError::InvalidImport(vmr_store::ImportFault::NoImages),
        ] {
            let r = store_err(e);
            assert_eq!(r.status_code(), 400, "{r:?}");
            assert!(!r.is_retryable());
        }
        assert_eq!(
            store_err(StoreError::WriterClosed).status_code(),
            500,
            "a local failure stays an internal error"
        );
    }

    #[test]
    fn messages_keep_their_wording_and_chain() {
        let e = AgentError::BadFingerprint {
            fingerprint: "abc".into(),
        };
        assert_eq!(
            e.to_string(),
            "\"abc\" is not a certificate fingerprint (SHA256:<64 hex>)"
        );
        let e = AgentError::OnReplica {
            name: "web".into(),
            what: "`failover prepare`".into(),
        };
        assert_eq!(
            e.to_string(),
            "\"web\" is a replica VM on this host; run `failover prepare` on its primary"
        );
        // The io error is the second link of the chain the control API answers.
        let e = AgentError::io("reading", "/x/manifest.json")(io_err());
        let chain = e.chain();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0], "reading /x/manifest.json");
        assert_eq!(chain[1], io_err().to_string());
        assert_eq!(
            AgentError::NoTestCopy {
                name: "web".into(),
                id: None
            }
            .to_string(),
            "\"web\" has no test failover copy"
        );
    }
}
