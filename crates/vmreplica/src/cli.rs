//! Command-line grammar (clap). The names are the interface scripts rely on.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Hyper-V Replica for KVM/QEMU hosts.
#[derive(Debug, Parser)]
#[command(name = "vmreplica", version, about)]
pub struct Cli {
    /// The agent's directory (config, keys, state, control socket).
    #[arg(
        long,
        global = true,
        env = "VMREPLICA_DIR",
        default_value = "/var/lib/vmreplica"
    )]
    pub dir: PathBuf,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the agent's config and TLS identity in DIR; prints the certificate fingerprint.
    Init {
        /// This agent's name.
        #[arg(long)]
        name: String,
        /// HOST:PORT for the replication listener.
        #[arg(long)]
        listen: String,
        /// HOST:PORT peers reach this agent at, when not the listen address (e.g. with
        /// `--listen 0.0.0.0:PORT`); not a wildcard. Replicas probe it before a failover.
        #[arg(long)]
        advertise: Option<String>,
        /// Default storage directory for replica VMs (default DIR/replicas).
        #[arg(long)]
        storage: Option<PathBuf>,
        /// HOST:PORT of the monitoring listener (`/metrics`; off when not given). A
        /// non-loopback address needs --metrics-token.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Create a bearer token (DIR/metrics.token) that every monitoring request must carry.
        #[arg(long, requires = "metrics")]
        metrics_token: bool,
    },
    /// Run the agent daemon in the foreground.
    Agent,
    /// Replica server authorization entries.
    #[command(subcommand)]
    Server(ServerCmd),
    /// VMs registered on this (primary) host.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Replica VMs on this (replica) host.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Consistency groups: VMs cut at one instant, each group point existing for all of them
    /// or none (docs/groups.md).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Enable replication of a VM to a replica agent.
    Enable(Box<EnableCmd>),
    /// Start initial replication over the network now. On a terminal, a progress bar follows
    /// the copy until it ends (Ctrl-C detaches; the copy goes on).
    StartInitial {
        /// VM name.
        name: String,
        /// Without a terminal: wait for the copy to end, printing progress lines (exit code
        /// 1 when it fails).
        #[arg(long)]
        wait: bool,
        /// A VM that replicates to several replicas (fan-out): the relationship to this
        /// replica (required when there are several).
        #[arg(long, value_name = "HOST:PORT")]
        replica: Option<String>,
    },
    /// Replication state and health (Get-VMReplication).
    Status {
        /// VM name; all VMs when omitted.
        name: Option<String>,
        /// Redraw every interval (state, health, lag, last point, throughput, progress of an
        /// initial copy or resync with percentage and ETA) until Ctrl-C; without a terminal,
        /// print one plain snapshot per interval.
        #[arg(long, conflicts_with = "format")]
        watch: bool,
        /// With --watch: time between snapshots (`1s`, `500ms`, `2s`; 100 ms to 1 h).
        #[arg(long, default_value = "1s", requires = "watch", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Output for a monitoring system: `prtg` (EXE/Script Advanced JSON),
        /// `zabbix-discovery` (low-level discovery JSON), `zabbix` (item values).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Nagios/Icinga/Checkmk plugin: one status line with perfdata; exit 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN (agent unreachable, VM unknown).
    Check {
        /// VM name; all VMs when omitted.
        name: Option<String>,
        /// Lag at which a VM is WARNING: a multiple of its frequency (2x) or a duration (90s,
        /// 10m).
        #[arg(long, default_value = "2x", value_parser = parse_threshold)]
        warn_lag: Threshold,
        /// Lag at which a VM is CRITICAL (4x, 10m, ...).
        #[arg(long, default_value = "4x", value_parser = parse_threshold)]
        crit_lag: Threshold,
    },
    /// Replication statistics (Measure-VMReplication).
    Measure {
        /// VM name; all VMs when omitted.
        name: Option<String>,
        /// Reset the monitoring window after reading.
        #[arg(long)]
        reset: bool,
    },
    /// Pause replication.
    Pause {
        /// VM name.
        name: String,
        /// On a replica VM: pause its extended (outgoing) relationship only.
        #[arg(long)]
        extended: bool,
        /// A primary VM that replicates to several replicas (fan-out): the relationship to
        /// this replica (its `enable --replica` address); required when there are several.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "extended")]
        replica: Option<String>,
    },
    /// Resume replication.
    Resume {
        /// VM name.
        name: String,
        /// Start resynchronization (after lost change tracking, or to force one): only the
        /// blocks that differ from the replica's latest point are sent.
        #[arg(long)]
        resync: bool,
        /// With --resync: start at TIME (RFC 3339) instead of now.
        #[arg(long, requires = "resync")]
        at: Option<String>,
        /// With --resync, without a terminal: wait for the resync to end, printing progress
        /// lines (exit code 1 when it fails). On a terminal a progress bar follows it anyway.
        #[arg(long, requires = "resync", conflicts_with = "at")]
        wait: bool,
        /// On a replica VM: resume its extended (outgoing) relationship only.
        #[arg(long, conflicts_with = "resync")]
        extended: bool,
        /// A primary VM that replicates to several replicas (fan-out): the relationship to
        /// this replica (its `enable --replica` address); required when there are several.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "extended")]
        replica: Option<String>,
    },
    /// Run a primary VM that automatic failover fenced again: only when the witness renews the
    /// lease this host held (refused for good once the replica took the VM over: then
    /// `reverse` on the new primary makes this host its replica).
    Unfence {
        /// VM name.
        name: String,
    },
    /// Disable replication (keeps the replica's data).
    Disable {
        /// VM name.
        name: String,
        /// On a replica VM: remove its extended (outgoing) relationship only (the extended
        /// replica keeps its points).
        #[arg(long)]
        extended: bool,
        /// A primary VM that replicates to several replicas (fan-out): the relationship to
        /// this replica (its `enable --replica` address); required when there are several.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "extended")]
        replica: Option<String>,
    },
    /// Change a VM's settings on this host while replication is enabled (either side), one
    /// setting per call; or, with --agent, the agent-wide sending limit or the data path's CPU
    /// priority.
    #[command(group(clap::ArgGroup::new("setting").required(true).args([
        "rpo_alert",
        "retain",
        "recovery_points",
        "bandwidth",
        "verify_every",
        "auto_failover",
        "cpu_priority",
    ])))]
    Set {
        /// VM name (not with --agent).
        #[arg(required_unless_present = "agent", conflicts_with = "agent")]
        name: Option<String>,
        /// Raise an RPO alert when the last point is older than this (`90s`, `5m`, `1h`; at
        /// least the frequency); `default` = twice the frequency.
        #[arg(long, value_name = "DURATION")]
        rpo_alert: Option<String>,
        /// The replica's retention grid, `PERIOD=COUNT,...` (see `enable --retain`); on a
        /// primary it is sent to the replica, on a replica it applies there until the primary
        /// sends its own. Takes effect at the next prune.
        #[arg(long, value_name = "SPEC")]
        retain: Option<String>,
        /// Back to Hyper-V's form: this many additional hourly recovery points (0-24).
        #[arg(long, value_name = "N")]
        recovery_points: Option<u32>,
        /// With --retain: within a period, keep its last app-consistent point if it has one.
        #[arg(long, requires = "retain")]
        prefer_app_consistent: bool,
        /// Sending limit in bytes/s with a daily schedule, as for `enable --bandwidth`
        /// (`08:00-18:00=50M,*=0`; `0` = unlimited); on a primary VM, or with --agent the
        /// agent-wide one (written to config.toml). A running cycle uses it at once.
        #[arg(long, value_name = "SCHEDULE", value_parser = parse_bandwidth)]
        bandwidth: Option<vmr_proto::bandwidth::BandwidthSchedule>,
        /// Verify a primary VM against its replica every DURATION (`7d`, `24h`; at least
        /// `1h`), counted from the last verification (at once when there was none); `never` =
        /// only on `vmreplica verify`.
        #[arg(long, value_name = "DURATION|never")]
        verify_every: Option<String>,
        /// `off`: stop automatic failover of a primary VM (its lease is removed at the
        /// witness, the replica stops its watch). Turning it on is `enable --auto-failover`.
        #[arg(long, value_name = "off")]
        auto_failover: Option<String>,
        /// With --agent: the CPU priority of the primary's cycles (reading, hashing,
        /// compressing, encrypting, sending): `low` (nice 19) leaves the CPU to the host's VMs
        /// and lets the RPO grow while they keep it busy; `normal` (the default) competes like
        /// any process. Running cycles get it at once; written to config.toml.
        #[arg(long, value_name = "low|normal", value_parser = parse_cpu_priority, requires = "agent", conflicts_with = "name")]
        cpu_priority: Option<vmr_proto::api::CpuPriority>,
        /// Change an agent-wide setting (--bandwidth, shared by all its VMs, or
        /// --cpu-priority).
        #[arg(long, conflicts_with_all = ["rpo_alert", "retain", "recovery_points", "verify_every", "auto_failover"])]
        agent: bool,
        /// With --retain or --recovery-points on a VM that replicates to several replicas
        /// (fan-out): the relationship to this replica.
        #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["agent", "rpo_alert", "bandwidth", "verify_every"])]
        replica: Option<String>,
    },
    /// The agent's event log (Get-WinEvent): state and health changes, failed and missed
    /// cycles, RPO alerts, failovers; oldest first.
    Events {
        /// Only this VM's events.
        name: Option<String>,
        /// Only events since DURATION ago (`10m`, `2h`, `1d`) or TIME (RFC 3339).
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep printing new events until interrupted (Ctrl-C).
        #[arg(long)]
        follow: bool,
    },
    /// Recovery points of a replica VM: time, type, the space of its own layers and why the
    /// retention policy keeps it.
    Points {
        /// VM name.
        name: String,
        /// Do not show the VM's policy: say what the policy of --retain (or
        /// --recovery-points) would keep and what the kept points would then take. Nothing is
        /// applied.
        #[arg(long)]
        estimate: bool,
        /// With --estimate: a retention grid (as `enable --retain`).
        #[arg(
            long,
            value_name = "SPEC",
            requires = "estimate",
            conflicts_with = "recovery_points"
        )]
        retain: Option<String>,
        /// With --estimate: Hyper-V's form, this many additional hourly points.
        #[arg(long, value_name = "N", requires = "estimate")]
        recovery_points: Option<u32>,
        /// With --retain: prefer app-consistent points within a period.
        #[arg(long, requires = "retain")]
        prefer_app_consistent: bool,
    },
    /// On the primary: compare the replica with the primary by block hashes (a verify cycle:
    /// a new point is cut and shipped as usual, then every 64 KiB block of the cut is compared
    /// with the replica's new point, read from its disks). Changes nothing else; prints the
    /// matching and differing blocks per disk (`--json`: every differing range). Exit code 7
    /// when anything differs. On the replica, `--local` checks every layer (`qemu-img check`)
    /// and every point's block-hash index without the primary.
    Verify {
        /// VM name.
        name: String,
        /// With --local: check just this point (the layers it reads through and its index).
        /// Without: accepted only when ID is the replica's latest point, which the verify
        /// cycle brings to a new cut and compares; an older point is refused (the primary no
        /// longer has its content; see docs/verify.md).
        #[arg(long, value_name = "ID")]
        point: Option<u64>,
        /// On the replica: check the layers and indexes alone.
        #[arg(long)]
        local: bool,
    },
    /// On the replica: load a copy of a replica VM's disks from DIR: an initial copy exported
    /// by the primary (`enable --initial export:DIR`), or disk images `<disk>.qcow2|raw|img`
    /// for `enable --initial existing`.
    Import {
        /// Replica VM name.
        name: String,
        /// Directory holding the copy.
        #[arg(value_name = "DIR")]
        from: std::path::PathBuf,
    },
    /// Self-contained demonstration on this machine (two agents, a stand-in VM, a writer).
    Demo(DemoOpts),
    /// Failover: planned (prepare, start), unplanned (start, cancel, complete) and test.
    #[command(subcommand)]
    Failover(FailoverCmd),
    /// Reverse replication: the failed-over VM becomes the primary, the old primary its replica.
    Reverse {
        /// VM name.
        name: String,
        /// The old primary's agent HOST:PORT (default: the address it last reported).
        #[arg(long)]
        replica: Option<String>,
        /// The old primary's certificate fingerprint (default: its authorization entry's).
        #[arg(long)]
        replica_fingerprint: Option<String>,
        /// Cycle interval of the reversed replication, as for `enable` (5 s to 24 h; a bare
        /// number is seconds). Default 5m; when reversing to the extended replica (extended
        /// replication A → B → C, on B), that relationship's frequency.
        #[arg(long)]
        frequency: Option<String>,
        /// The host named by --replica is another replica of this fanned-out VM (fan-out's
        /// failover, the old primary lost): it follows this host, keeping its newest point,
        /// and is resynchronised against it (only differing blocks) instead of a full copy.
        #[arg(long, requires_all = ["replica", "replica_fingerprint"])]
        follow: bool,
    },
    /// The fence watchdog of automatic failover (started by the agent, never by hand): fences
    /// the VM of the QMP socket when the right to run the agent last told it of (`RUN <ms>`
    /// lines on stdin) runs out, also after the agent died; `STOP` ends it.
    #[command(hide = true)]
    FenceWatchdog {
        /// The VM's QMP socket.
        #[arg(long)]
        qmp: String,
        /// Kill the VM instead of pausing it.
        #[arg(long)]
        power_off: bool,
    },
    /// Write the man pages and shell completions generated from this grammar into DIR
    /// (packaging: `scripts/package.sh`).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory: `man/*.1` and `completions/<dir under /usr/share>/<file>`.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `failover` subcommands.
#[derive(Debug, Subcommand)]
pub enum FailoverCmd {
    /// On the primary: the VM must be shut down (or `--shutdown`); ship the final cycle; lock
    /// the primary copy.
    Prepare {
        /// VM name.
        name: String,
        /// Shut the guest down first: `guest-shutdown` through its guest agent when it
        /// answers (`vm add --qga`), else ACPI `system_powerdown` (also when the guest is still
        /// up 30 s after the agent accepted), then wait until QEMU exits or reports the guest
        /// shut down. On timeout nothing changes (replication goes on) and the command fails.
        #[arg(long)]
        shutdown: bool,
        /// With `--shutdown`: how long to wait for the guest to be down (`<N>s`, `<N>m`).
        #[arg(long, default_value = "120s", requires = "shutdown", value_parser = parse_timeout)]
        timeout: u64,
    },
    /// On the replica: start the VM from a recovery point (unplanned, or planned's second half).
    Start {
        /// VM name.
        name: String,
        /// Recovery point id, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Prepare the disks only; do not start the VM.
        #[arg(long)]
        no_start: bool,
        /// Fail over even though the primary answers and its VM runs (split brain risk).
        #[arg(long)]
        force: bool,
    },
    /// On the replica: start an isolated copy NAME-test; replication goes on.
    Test {
        /// VM name.
        name: String,
        /// Recovery point id, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
    },
    /// Remove test copies (all of the VM's, or one).
    StopTest {
        /// VM name.
        name: String,
        /// The test copy id printed by `failover test`.
        #[arg(long)]
        test_id: Option<uuid::Uuid>,
    },
    /// Undo a failover not yet completed: discard what the failed-over VM wrote.
    Cancel {
        /// VM name.
        name: String,
    },
    /// Commit: keep the chosen point, drop the other recovery points.
    Complete {
        /// VM name.
        name: String,
    },
}

/// Parse `--point`: a point id or `latest`.
pub fn parse_point(s: &str) -> Result<Option<u64>, String> {
    if s == "latest" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("bad point {s:?}: expected a point id or `latest`"))
}

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// Authorize a primary (Hyper-V authorization entry). Allowing a primary again updates its
    /// entry (and restores a revoked one).
    Allow {
        /// Primary's name.
        #[arg(long)]
        primary: String,
        /// Primary's certificate fingerprint (from its `vmreplica init`): `SHA256:` and 64 hex
        /// digits; upper case and `:`-separated pairs are accepted and normalised. One
        /// fingerprint authorizes one primary.
        #[arg(long)]
        fingerprint: String,
        /// Where this primary's replica VMs are stored.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Trust group (default: the primary's name).
        #[arg(long)]
        trust_group: Option<String>,
    },
    /// Revoke a primary's authorization at once (new connections and requests on open ones):
    /// the entry stays, authorizing nothing, so that the primary's replica VMs keep their
    /// storage for failover; `server allow` restores it.
    Deny {
        /// Primary's name.
        #[arg(long)]
        primary: String,
    },
    /// Delete a primary's authorization entry (refused while replica VMs of that primary are
    /// registered here: use `server deny`).
    Remove {
        /// Primary's name.
        #[arg(long)]
        primary: String,
    },
    /// Show this agent's identity and authorization entries.
    Show,
}

/// `group` subcommands.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group (primary): its members are enabled primary VMs of this agent that
    /// replicate to the same replica agent; their incremental cycles are cut together from now
    /// on (every member paused with QMP `stop`, each VM's transaction, `cont`).
    Create {
        /// Group name (1 to 64 of A-Z a-z 0-9 . _ -).
        name: String,
        /// Member VM names (2 to 32).
        #[arg(required = true, num_args = 1..)]
        vms: Vec<String>,
    },
    /// List this agent's groups with their members, last group point and pause.
    List,
    /// Remove a group (primary): its members replicate on their own again.
    Remove {
        /// Group name.
        name: String,
    },
    /// The group's complete group points (replica), newest first: each member's recovery
    /// point id of one group point.
    Points {
        /// Group name.
        name: String,
    },
    /// Prepare every member for a planned failover (primary), as `failover prepare` does for
    /// one VM: every member is checked first (nothing is prepared when one cannot be); members
    /// already prepared are skipped; a member whose prepare fails stops the command (the ones
    /// before it stay prepared; run it again to go on).
    Prepare {
        /// Group name.
        name: String,
        /// Shut each member's guest down first, as `failover prepare --shutdown`.
        #[arg(long)]
        shutdown: bool,
        /// With `--shutdown`: how long to wait for each guest to be down (`<N>s`, `<N>m`).
        #[arg(long, default_value = "120s", requires = "shutdown", value_parser = parse_timeout)]
        timeout: u64,
    },
    /// Fail every member over at one complete group point (replica), or with --test start a
    /// test copy of each; all or none (members started before a failing one are undone).
    Failover {
        /// Group name.
        name: String,
        /// Start test copies (as `failover test`) instead of failing over.
        #[arg(long)]
        test: bool,
        /// The group point (from `group points`); default the latest complete one, or each
        /// member's planned final point when every member was prepared (`failover prepare`).
        #[arg(
            long,
            value_name = "GROUP-POINT",
            conflicts_with = "latest_group_point"
        )]
        point: Option<u64>,
        /// Start at the latest complete group point even when members were prepared for a
        /// planned failover (needed when only some were: their final cycles are not used).
        #[arg(long)]
        latest_group_point: bool,
    },
    /// Reverse every member (on the failed-over host, after `group failover`), as `reverse`
    /// does for one VM, then form the group here: the reversed replication cuts its members
    /// together. Every member is checked first (nothing is reversed when one cannot be);
    /// members already reversed by an earlier run are skipped.
    Reverse {
        /// Group name.
        name: String,
        /// The old primary's agent HOST:PORT (default: the address it last reported).
        #[arg(long)]
        replica: Option<String>,
        /// The old primary's certificate fingerprint (default: its authorization entry's).
        #[arg(long)]
        replica_fingerprint: Option<String>,
        /// Cycle interval of the reversed replication, as for `reverse`.
        #[arg(long)]
        frequency: Option<String>,
    },
}

/// `vm` subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Register a running VM on its primary. Checked at once: the QMP socket answers, every
    /// disk to replicate is a block node of that QEMU, and it opens the definition's image.
    Add {
        /// VM name (must match the definition's name).
        name: String,
        /// The VM's QMP socket reserved for vmreplica (not with --libvirt).
        #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
        qmp: Option<PathBuf>,
        /// The VM definition (TOML) (not with --libvirt).
        #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
        launch: Option<PathBuf>,
        /// A libvirt-managed VM: the running domain DOMAIN, whose disks (file-backed qcow2
        /// images, all replicated, named by target) and definition (its UUID and persistent
        /// XML) are taken from libvirt; its cycles are libvirt backup jobs. Resync, verify,
        /// export and failover of it are not built yet (docs/libvirt.md).
        #[arg(long, value_name = "DOMAIN", conflicts_with_all = ["disks", "nbd", "qga"])]
        libvirt: Option<String>,
        /// The libvirt connection URI of --libvirt.
        #[arg(
            long,
            value_name = "URI",
            requires = "libvirt",
            default_value = "qemu:///system"
        )]
        connect: String,
        /// Disk node to replicate (repeat); default all disks of the definition.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// The NBD socket the VM already serves its disks on (a qemu-storage-daemon stand-in
        /// started with `--nbd-server addr.type=unix,addr.path=SOCK`); vmreplica reads the
        /// disks through it. Without it vmreplica uses its own socket
        /// (DIR/work/<uuid>/vmr-<uuid8>-nbd.sock), which it starts in a real VM itself.
        #[arg(long, value_name = "SOCK")]
        nbd: Option<PathBuf>,
        /// The host end of the VM's qemu-guest-agent channel (QEMU started with
        /// `-chardev socket,path=SOCK,server=on,wait=off,id=qga0 -device virtio-serial
        /// -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`): used for
        /// app-consistent points (`enable --app-consistent-every`) and `failover prepare
        /// --shutdown`. Without it those fall back to crash-consistent points and ACPI.
        #[arg(long, value_name = "SOCK")]
        qga: Option<PathBuf>,
    },
    /// List registered VMs.
    List,
    /// Unregister a primary VM (the VM and its disks are not touched). Refused while its
    /// replication is enabled (`vmreplica disable NAME` first) and for a replica VM
    /// (`vmreplica replica remove NAME`). Asks for confirmation on a terminal.
    Remove {
        /// VM name.
        name: String,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Change a registered primary VM: its QMP socket, its definition (same name and UUID) or
    /// the disks to replicate (refused while its replication is enabled; asks for
    /// confirmation on a terminal); or, on any VM (primary or replica) at any time, this host's
    /// failover network settings (--failover-*, --replica-network-args); or, on a primary VM
    /// at any time, its guest agent socket (--qga, --no-qga).
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args([
        "qmp",
        "launch",
        "disks",
        "failover_ip",
        "failover_gateway",
        "failover_dns",
        "failover_clear",
        "replica_network_args",
        "qga",
        "no_qga",
    ])))]
    Set {
        /// VM name.
        name: String,
        /// The VM's QMP socket reserved for vmreplica.
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// The VM definition (TOML); without --disk, all its disks are replicated.
        #[arg(long)]
        launch: Option<PathBuf>,
        /// Disk node to replicate (repeat); replaces the list.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Failover network setting for this host: a static address the guest gets when a
        /// real failover starts the VM here, `[MAC=]ADDR/PREFIX` (IPv4 or IPv6; repeat;
        /// without MAC: the guest's only interface). The --failover-* options given together
        /// replace all earlier ones; never applied to a test failover.
        #[arg(long = "failover-ip", value_name = "[MAC=]ADDR/PREFIX")]
        failover_ip: Vec<String>,
        /// Failover default gateway, `[MAC=]ADDR` (one per address family and interface).
        #[arg(long = "failover-gateway", value_name = "[MAC=]ADDR")]
        failover_gateway: Vec<String>,
        /// Failover DNS server, `[MAC=]ADDR` (repeat).
        #[arg(long = "failover-dns", value_name = "[MAC=]ADDR")]
        failover_dns: Vec<String>,
        /// Remove this host's failover network settings of the VM.
        #[arg(long, conflicts_with_all = ["failover_ip", "failover_gateway", "failover_dns"])]
        failover_clear: bool,
        /// QEMU network arguments for a real failover on this host, replacing the definition's
        /// `network-args` (e.g. another bridge); split at white space; "" goes back to the
        /// definition's.
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        replica_network_args: Option<String>,
        /// The host end of the VM's qemu-guest-agent channel (as for `vm add --qga`); allowed
        /// while replication runs (the next app-consistent cut uses it).
        #[arg(long, value_name = "SOCK")]
        qga: Option<PathBuf>,
        /// Forget the VM's guest agent socket (app-consistent cuts then fail and fall back to
        /// crash-consistent points; `failover prepare --shutdown` uses ACPI).
        #[arg(long, conflicts_with = "qga")]
        no_qga: bool,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `replica` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// Remove a replica VM and its recovery points. Refused while its primary replicates into
    /// it (disable replication first, or pause it here), while it is failed over, and while a
    /// test copy runs. Asks for confirmation on a terminal.
    Remove {
        /// Replica VM name.
        name: String,
        /// Keep the recovery points in the store: enabling replication of the VM again
        /// starts from them.
        #[arg(long)]
        keep_data: bool,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `enable` arguments.
#[derive(Debug, Args)]
pub struct EnableCmd {
    /// VM name.
    pub name: String,
    /// Replica agent HOST:PORT.
    #[arg(long)]
    pub replica: String,
    /// Replica agent's certificate fingerprint.
    #[arg(long)]
    pub replica_fingerprint: String,
    /// Cycle interval: 30s, 5m, 15m or any <N>s, <N>m, <N>h from 5 s to 24 h; a bare number is
    /// seconds. `continuous`: a new cycle as soon as the last one is acknowledged (at most one a
    /// second; RPO alert default 30 s; docs/continuous.md).
    #[arg(long, default_value = "5m")]
    pub frequency: String,
    /// Additional hourly recovery points to keep (0-24 like Hyper-V).
    #[arg(long, default_value_t = 0)]
    pub recovery_points: u32,
    /// Keep a grid of points instead: `PERIOD=COUNT,...`, the last point of each of the COUNT
    /// most recent PERIODs (UTC) that hold one, e.g. `1h=24,1d=7,1w=4,1mo=12`. Units: `s`,
    /// `min`, `h`, `d`, `w` (ISO weeks), `mo` (calendar months), `y`; `m` is refused as
    /// ambiguous. The latest point is always kept. Exclusive with --recovery-points.
    #[arg(long, value_name = "SPEC", conflicts_with = "recovery_points")]
    pub retain: Option<String>,
    /// With --retain: within a period, keep its last app-consistent (or planned) point if it
    /// has one, rather than its last point.
    #[arg(long, requires = "retain")]
    pub prefer_app_consistent: bool,
    /// Take an app-consistent point every <H>h.
    #[arg(long)]
    pub app_consistent_every: Option<String>,
    /// Disk node not to replicate (repeat).
    #[arg(long = "exclude-disk")]
    pub exclude_disks: Vec<String>,
    /// Send cycles uncompressed.
    #[arg(long)]
    pub no_compression: bool,
    /// Start initial replication at TIME (RFC 3339, e.g. 2026-11-25T22:00:00Z) instead of now.
    #[arg(long)]
    pub initial_at: Option<String>,
    /// Start a required resynchronization by itself inside the daily window HH:MM-HH:MM (UTC;
    /// without a value Hyper-V's 18:30-06:00).
    #[arg(long, value_name = "WINDOW", num_args = 0..=1, default_missing_value = "18:30-06:00")]
    pub auto_resync: Option<String>,
    /// How the first copy reaches the replica: `network` (a full copy, the default),
    /// `existing` (the replica already holds a copy: only differing blocks are sent),
    /// `follow` (the replica is another replica of this VM, which failed over here: it
    /// follows this host, keeping its newest point, and only differing blocks are sent) or
    /// `export:DIR` (written to DIR here, loaded on the replica with `vmreplica import`).
    #[arg(long, value_name = "MODE", default_value = "network")]
    pub initial: String,
    /// Raise an RPO alert when the last acknowledged point is older than this (`90s`, `5m`,
    /// `1h`; at least the frequency; default twice the frequency). Change it later with
    /// `vmreplica set NAME --rpo-alert`.
    #[arg(long, value_name = "DURATION")]
    pub rpo_alert: Option<String>,
    /// Verify the replica against the primary by block hashes every DURATION (`7d`, `24h`;
    /// at least `1h`): the next cycle after it is due is a verify cycle (`vmreplica verify`).
    #[arg(long, value_name = "DURATION")]
    pub verify_every: Option<String>,
    /// Sending limit of this VM in bytes/s with a daily schedule in the agent's time zone
    /// (config `time-zone`, UTC by default): `HH:MM-HH:MM=RATE,...,*=RATE` or `RATE`; RATE
    /// with K, M, G (10^3, 10^6, 10^9) or Ki, Mi, Gi; 0 = unlimited; `*` = the rest of the day
    /// (unlimited when not given). E.g. `08:00-18:00=50M,*=0`. Change it later with
    /// `vmreplica set NAME --bandwidth`.
    #[arg(long, value_name = "SCHEDULE", value_parser = parse_bandwidth)]
    pub bandwidth: Option<vmr_proto::bandwidth::BandwidthSchedule>,
    /// Without a terminal, when the initial copy starts at once: wait for it (or the export)
    /// to end, printing progress lines (exit code 1 when it fails). On a terminal a progress
    /// bar follows it anyway.
    #[arg(long, conflicts_with = "initial_at")]
    pub wait: bool,
    /// Automatic failover with a witness (docs/auto-failover.md): when the replica has not
    /// heard this primary for DURATION (20s to 1h) and the witness grants it the VM's lease,
    /// the replica starts the VM; this primary pauses (fences) its VM when it can renew its
    /// right to run neither at the witness nor at the replica. Needs --witness and
    /// --witness-fingerprint.
    #[arg(long, value_name = "DURATION", requires_all = ["witness", "witness_fingerprint"])]
    pub auto_failover: Option<String>,
    /// The witness agent, HOST:PORT (a third agent that allows this host and the replica with
    /// `server allow`).
    #[arg(long, value_name = "HOST:PORT", requires = "auto_failover")]
    pub witness: Option<String>,
    /// The witness agent's certificate fingerprint.
    #[arg(long, value_name = "FP", requires = "auto_failover")]
    pub witness_fingerprint: Option<String>,
    /// How automatic failover fences this primary's VM: `pause` (QMP `stop`, the default; the
    /// VM's process is frozen with SIGSTOP when `stop` is not answered) or `power-off` (the
    /// VM's QEMU killed).
    #[arg(long, value_name = "pause|power-off", requires = "auto_failover")]
    pub fence: Option<String>,
    /// Which point an automatic failover starts the VM from: `latest` (the default: the least
    /// data lost) or `app-consistent` (the latest point taken with the guest's file systems
    /// frozen, or a planned failover's final point; the latest point when the replica holds
    /// none, and the event says so).
    #[arg(long, value_name = "latest|app-consistent", requires = "auto_failover")]
    pub auto_failover_point: Option<String>,
    /// Run on a replica VM: extended replication, forwarding its recovery points to the
    /// third host given by --replica (which authorizes this host with `server allow`); the
    /// first extended cycle copies the newest point, later ones only what changed.
    #[arg(long)]
    pub extended: bool,
}

/// `demo` options.
#[derive(Debug, Args)]
pub struct DemoOpts {
    /// Number of incremental cycles to watch before verifying.
    #[arg(long, default_value_t = 4)]
    pub cycles: u32,
    /// Cycle interval, as for `enable`: 5s to 24h (`<N>s`, `<N>m`, `<N>h`; a bare number is
    /// seconds).
    #[arg(long, default_value = "5s", value_parser = parse_frequency)]
    pub frequency: u64,
    /// Size of each stand-in disk in MiB.
    #[arg(long, default_value_t = 256)]
    pub disk_mib: u64,
    /// Keep the demo directory instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// Parse `enable --frequency`: `continuous` (continuous mode,
/// [`vmr_proto::api::FREQUENCY_CONTINUOUS`]) or an interval ([`parse_frequency`]).
pub fn parse_enable_frequency(s: &str) -> Result<u64, String> {
    if s.trim() == "continuous" {
        return Ok(vmr_proto::api::FREQUENCY_CONTINUOUS);
    }
    parse_frequency(s).map_err(|e| format!("{e} (or continuous)"))
}

/// Parse a frequency: `<N>s`, `<N>m`, `<N>h` or a bare number of seconds, checked by
/// `vmr-core`'s one rule (at least 5 s, at most a day). Every command that takes a frequency
/// (`enable`, `reverse`, `demo`) parses it here.
pub fn parse_frequency(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600)
    } else {
        (t, 1)
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("bad frequency {s:?}: expected 30s, 5m, 15m or <N>s, <N>m, <N>h (5 s to 24 h)")
    })?;
    let secs = n.saturating_mul(mult);
    vmr_core::schedule::check_frequency(secs).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(secs)
}

/// Parse a CPU priority (`set --agent --cpu-priority`).
pub fn parse_cpu_priority(s: &str) -> Result<vmr_proto::api::CpuPriority, String> {
    vmr_proto::api::CpuPriority::parse(s).ok_or_else(|| format!("{s:?}: `low` or `normal`"))
}

/// Parse a bandwidth schedule (`enable --bandwidth`, `set --bandwidth`).
pub fn parse_bandwidth(s: &str) -> Result<vmr_proto::bandwidth::BandwidthSchedule, String> {
    vmr_proto::bandwidth::BandwidthSchedule::parse(s).map_err(|e| e.to_string())
}

/// Parse a duration in whole seconds: `<N>s`, `<N>m`, `<N>h`, `<N>d`, or anything
/// `humantime` reads (`1h 30m`); a bare number is seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(t)
        .map(|d| d.as_secs())
        .map_err(|e| format!("bad duration {s:?}: {e} (e.g. 90s, 5m, 2h, 1d)"))
}

/// Parse a timeout: `<N>s`, `<N>m` or a bare number of seconds, 1 s to 1 h.
pub fn parse_timeout(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else {
        (t, 1)
    };
    let secs = num
        .parse::<u64>()
        .map_err(|_| format!("bad timeout {s:?}: expected <N>s or <N>m, e.g. 120s"))?
        .saturating_mul(mult);
    if !(1..=3600).contains(&secs) {
        return Err(format!("timeout {s:?} out of range (1 s to 1 h)"));
    }
    Ok(secs)
}

/// Parse `--interval`: a duration (`1s`, `500ms`, `2m`; a bare number is seconds), 100 ms to
/// 1 h.
pub fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("bad interval {s:?}: {e} (e.g. 1s, 500ms)"))?,
    };
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("interval {s:?} out of range (100 ms to 1 h)"));
    }
    Ok(d)
}

/// Parse `<H>h` (hours).
pub fn parse_hours(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let n = t.strip_suffix('h').unwrap_or(t);
    n.parse()
        .map_err(|_| format!("bad interval {s:?}: expected <H>h, e.g. 4h"))
}

/// A lag threshold: a multiple of the VM's frequency (`2x`) or a duration (`90s`, `10m`,
/// `1h`, bare seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// This many times the frequency.
    Times(f64),
    /// Seconds.
    Secs(u64),
}

impl Threshold {
    /// The threshold in seconds for a VM replicating every `frequency_secs` (None when it is
    /// relative and the VM has no frequency: not enabled).
    pub fn secs(self, frequency_secs: u64) -> Option<u64> {
        match self {
            Threshold::Times(_) if frequency_secs == 0 => None,
            Threshold::Times(x) => Some((x * frequency_secs as f64).ceil() as u64),
            Threshold::Secs(s) => Some(s),
        }
    }
}

/// Parse a threshold (`2x`, `1.5x`, `90s`, `10m`, `1h`, `90`).
pub fn parse_threshold(s: &str) -> Result<Threshold, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "bad threshold {s:?}: expected a multiple of the frequency (2x) or a duration (90s, 10m, 1h)"
        )
    };
    if let Some(x) = t.strip_suffix('x') {
        let x: f64 = x.parse().map_err(|_| bad())?;
        if !(x.is_finite() && x > 0.0) {
            return Err(bad());
        }
        return Ok(Threshold::Times(x));
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok(Threshold::Secs(n.saturating_mul(mult)))
}

/// `status --format`: the machine formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The table (or `--json`).
    Table,
    /// PRTG EXE/Script Advanced sensor JSON.
    Prtg,
    /// Zabbix low-level discovery JSON.
    ZabbixDiscovery,
    /// Zabbix item values (JSON by VM name, for dependent items).
    Zabbix,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies() {
        assert_eq!(parse_timeout("120s"), Ok(120));
        assert_eq!(parse_timeout("2m"), Ok(120));
        assert_eq!(parse_timeout("90"), Ok(90));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("2h").is_err());
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("5m"), Ok(300));
        assert_eq!(parse_duration_secs("1d"), Ok(86_400));
        assert_eq!(parse_duration_secs("12"), Ok(12));
        assert!(parse_duration_secs("soon").is_err());
        assert_eq!(parse_frequency("30s"), Ok(30));
        assert_eq!(parse_frequency("5m"), Ok(300));
        assert_eq!(parse_frequency("15m"), Ok(900));
        assert_eq!(parse_frequency("7"), Ok(7));
        assert!(parse_frequency("4s").is_err());
        // At most a day, whatever the unit; a bare number is seconds.
        assert_eq!(parse_frequency("24h"), Ok(86_400));
        assert_eq!(parse_frequency("1440m"), Ok(86_400));
        assert_eq!(parse_frequency("86400"), Ok(86_400));
        for long in ["25h", "1441m", "86401", "86401s", "99999999999999h"] {
            let e = parse_frequency(long).expect_err(long);
            assert!(e.contains("one day"), "{long}: {e}");
        }
        assert!(parse_frequency("fast").is_err());
        // Continuous mode is `enable`'s alone; 0 stays refused (it is not a spelling of it).
        assert!(parse_frequency("continuous").is_err());
        assert_eq!(parse_enable_frequency("continuous"), Ok(0));
        assert_eq!(parse_enable_frequency(" continuous "), Ok(0));
        assert_eq!(parse_enable_frequency("30s"), Ok(30));
        for bad in ["0", "0s", "Continuous", "cont"] {
            let e = parse_enable_frequency(bad).expect_err(bad);
            assert!(e.contains("continuous"), "{bad}: {e}");
        }
        assert!(parse_frequency("").is_err());
        assert_eq!(parse_interval("1s"), Ok(std::time::Duration::from_secs(1)));
        assert_eq!(parse_interval("2"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(
            parse_interval("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["10ms", "2h", "soon", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_hours("4h"), Ok(4));
        assert!(parse_hours("x").is_err());
        assert_eq!(parse_point("latest"), Ok(None));
        assert_eq!(parse_point("12"), Ok(Some(12)));
        assert!(parse_point("-1").is_err());
    }

    #[test]
    fn demo_takes_the_frequency_syntax_of_enable() {
        use clap::Parser;
        let freq = |f: &str| match Cli::try_parse_from(["vmreplica", "demo", "--frequency", f]) {
            Ok(Cli {
                command: Command::Demo(d),
                ..
            }) => Ok(d.frequency),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.exit_code()),
        };
        assert_eq!(freq("5s"), Ok(5));
        assert_eq!(freq("7"), Ok(7));
        assert_eq!(freq("1m"), Ok(60));
        // Too short, too long, not a frequency: a usage error (exit 2).
        for bad in ["3", "4s", "25h", "fast"] {
            assert_eq!(freq(bad), Err(2), "{bad}");
        }
        match Cli::try_parse_from(["vmreplica", "demo"]) {
            Ok(Cli {
                command: Command::Demo(d),
                ..
            }) => assert_eq!(d.frequency, 5),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_takes_one_setting_of_a_vm_or_of_the_agent() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let mut v = vec!["vmreplica", "set"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v) {
                Ok(Cli {
                    command:
                        Command::Set {
                            name,
                            rpo_alert,
                            bandwidth,
                            agent,
                            ..
                        },
                    ..
                }) => Ok((name, rpo_alert, bandwidth.map(|b| b.to_string()), agent)),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.exit_code()),
            }
        };
        assert_eq!(
            parse(&["web1", "--bandwidth", "08:00-18:00=50M"]),
            Ok((
                Some("web1".into()),
                None,
                Some("08:00-18:00=50M,*=0".into()),
                false
            ))
        );
        assert_eq!(
            parse(&["web1", "--rpo-alert", "5m"]),
            Ok((Some("web1".into()), Some("5m".into()), None, false))
        );
        assert_eq!(
            parse(&["--agent", "--bandwidth", "1M"]),
            Ok((None, None, Some("*=1M".into()), true))
        );
        match Cli::try_parse_from(["vmreplica", "set", "--agent", "--cpu-priority", "low"]) {
            Ok(Cli {
                command:
                    Command::Set {
                        name: None,
                        cpu_priority: Some(p),
                        agent: true,
                        ..
                    },
                ..
            }) => assert_eq!(p, vmr_proto::api::CpuPriority::Low),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["web1"][..],
            &["--agent"],
            &["--cpu-priority", "low"],
            &["web1", "--cpu-priority", "low"],
            &["--agent", "--cpu-priority", "idle"],
            &["--agent", "--cpu-priority", "low", "--bandwidth", "1M"],
            &["--agent", "--retain", "1h=2"],
            &["--agent", "--verify-every", "1d"],
            &["--agent", "--rpo-alert", "5m"],
            &["web1", "--agent", "--bandwidth", "1M"],
            &["web1", "--rpo-alert", "5m", "--bandwidth", "1M"],
            &["web1", "--bandwidth", "08:00-18:00=5M,17:00-19:00=1M"],
            &["web1", "--bandwidth", "fast"],
            &["--bandwidth", "1M"],
        ] {
            assert_eq!(parse(bad), Err(2), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
