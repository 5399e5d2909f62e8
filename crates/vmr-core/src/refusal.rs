//! Why a replication machine refused a command: one typed error shared by the primary and the
//! replica machine (and the failover rules), each variant naming the command and the state so
//! that the message alone tells the admin what to do. The agent maps every refusal to exit
//! code 5 ("not allowed in the current state").

use vmr_proto::CycleId;
use vmr_proto::api::{ReplicationMode, ReplicationState};

/// A command or event a machine can refuse, named as the admin (or the peer) asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `enable`.
    Enable,
    /// `start-initial`.
    StartInitial,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `resume --resync`.
    ResumeResync,
    /// `disable`.
    Disable,
    /// `failover prepare` (planned failover, primary).
    Prepare,
    /// `failover start` (replica).
    Start,
    /// `failover test` (replica).
    Test,
    /// `failover cancel` (replica).
    Cancel,
    /// `failover complete` (replica).
    Complete,
    /// `reverse` (replica).
    Reverse,
    /// `become-replica` (the old primary, asked by the new one).
    BecomeReplica,
    /// `create-replica` (the primary asks the replica).
    CreateReplica,
    /// A cycle offered by the primary (replica).
    ReceiveCycle,
    /// `import` of an initial copy or disk images (replica).
    Import,
    /// A cycle outcome or re-numbering reported by the driver.
    CycleOutcome,
    /// `replica remove` (replica).
    Remove,
    /// `verify` (primary).
    Verify,
    /// `set --verify-every` (primary).
    SetVerifyEvery,
    /// A consistency group's cut asks the member for a cycle now (primary).
    CycleNow,
    /// `continue-from` (the extended replica, asked by its source after the VM failed over
    /// there).
    ContinueFrom,
    /// `follow` (a sibling replica of a fanned-out VM, asked by the replica the VM failed
    /// over to).
    Follow,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Enable => "enable",
            Op::StartInitial => "start-initial",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::ResumeResync => "resume --resync",
            Op::Disable => "disable",
            Op::Prepare => "failover prepare",
            Op::Start => "failover start",
            Op::Test => "failover test",
            Op::Cancel => "failover cancel",
            Op::Complete => "failover complete",
            Op::Reverse => "reverse",
            Op::BecomeReplica => "become-replica",
            Op::CreateReplica => "create-replica",
            Op::ReceiveCycle => "receiving a cycle",
            Op::Import => "import",
            Op::CycleOutcome => "a cycle outcome",
            Op::Remove => "replica remove",
            Op::Verify => "verify",
            Op::SetVerifyEvery => "set --verify-every",
            Op::CycleNow => "a group cut",
            Op::ContinueFrom => "continue-from",
            Op::Follow => "follow",
        })
    }
}

/// Why a command is not allowed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The command does not apply in this state.
    #[error("{op} is not allowed while the VM is {state}")]
    State {
        /// The command.
        op: Op,
        /// The current state.
        state: ReplicationState,
    },
    /// The command runs on the other host.
    #[error("{op} runs on the VM's {wanted:?} host; this host is its {actual:?}")]
    WrongSide {
        /// The command.
        op: Op,
        /// The side it must run on.
        wanted: ReplicationMode,
        /// This host's side.
        actual: ReplicationMode,
    },
    /// No recovery point exists yet.
    #[error("{op} needs a recovery point, but initial replication has not completed yet")]
    NoInitialCopy {
        /// The command.
        op: Op,
    },
    /// Replication is not enabled (primary).
    #[error("{op}: replication of this VM is not enabled (enable it first)")]
    NotEnabled {
        /// The command.
        op: Op,
    },
    /// Replication is enabled already (primary).
    #[error("replication of this VM is already enabled ({state}); disable it first")]
    AlreadyEnabled {
        /// The current state.
        state: ReplicationState,
    },
    /// Replication of the VM was disabled on the replica.
    #[error(
        "{op}: replication of this VM is disabled on the replica; enabling it again on the \
         primary re-creates it"
    )]
    Disabled {
        /// The command.
        op: Op,
    },
    /// Paused (on the replica, for cycles; or on the side the command ran on).
    #[error(
        "{op}: replication is paused on the replica ({state}); it continues after `vmreplica \
         resume` there"
    )]
    Paused {
        /// The command.
        op: Op,
        /// The paused state.
        state: ReplicationState,
    },
    /// Replication into the replica VM is active (the primary still sends cycles).
    #[error(
        "{op}: replication into this replica VM is active ({state}); disable it first \
         (`vmreplica disable NAME` on its primary, or here), or pause it here"
    )]
    Active {
        /// The command.
        op: Op,
        /// The current state.
        state: ReplicationState,
    },
    /// The replica VM is failed over: the old primary's cycles are refused.
    #[error(
        "{op}: the replica VM is failed over ({state}); complete or cancel the failover, or \
         reverse replication"
    )]
    FailedOver {
        /// The command.
        op: Op,
        /// The failover state.
        state: ReplicationState,
    },
    /// `follow` from this replica's own primary: it forwarded the VM here (extended
    /// replication), so its point ids are this replica's and `continue-from` keeps the
    /// common points instead of a resynchronisation.
    #[error(
        "follow: this replica replicates from the caller already (extended replication): \
         reverse to it without --follow (continue-from keeps the common points)"
    )]
    FollowOwnPrimary,
    /// `follow` from a caller whose authorization entry stores replica VMs elsewhere than
    /// the directory holding this VM's points (a replica VM's store is its primary's entry's).
    #[error(
        "follow: the caller's authorization entry stores replica VMs in another directory \
         than this VM's points: `server allow` it with the --storage of the VM's primary"
    )]
    FollowOtherStorage,
    /// `reverse --follow` named the extended replica this host forwards the VM to.
    #[error(
        "reverse --follow names the extended replica this host forwards the VM to: reverse to \
         it without --follow (it continues from the failover point)"
    )]
    FollowExtended,
    /// A cycle's base is not what the replica holds.
    #[error("the cycle builds on {got:?} but the replica's latest applied point is {expected:?}")]
    WrongBase {
        /// The replica's latest applied point.
        expected: Option<CycleId>,
        /// The cycle's base.
        got: Option<CycleId>,
    },
    /// A cycle is running; the command must wait for it.
    #[error("{op} is not allowed while a replication cycle is running; try again after it")]
    CycleRunning {
        /// The command.
        op: Op,
    },
    /// An import into the replica VM runs; the command must wait for it.
    #[error("{op} is not allowed while an import into this replica VM runs; try again after it")]
    Importing {
        /// The command.
        op: Op,
    },
    /// No cycle is running (a stale outcome from the driver).
    #[error("{op}: no replication cycle is running (the state is {state})")]
    NoCycleRunning {
        /// The command.
        op: Op,
        /// The current state.
        state: ReplicationState,
    },
    /// Cycle ids start at 1.
    #[error("cycle id {id} is not valid (cycle ids start at 1)")]
    BadCycleId {
        /// The id given.
        id: CycleId,
    },
    /// The running cycle cannot be renumbered (only a resynchronization can).
    #[error("only a running resynchronization cycle can be renumbered")]
    NotResync,
    /// become-replica: this host's replica store keeps recovery points of the VM (from when
    /// this host was its replica), but the VM's disks here are not a failover view of them.
    #[error(
        "{op}: this host's replica store keeps recovery points of the VM from when it was its \
         replica, but the VM's disks here are not built on them (nothing was changed)"
    )]
    StoreCopyUnrelated {
        /// The command.
        op: Op,
    },
    /// become-replica: test copies run on this host's recovery points of the VM.
    #[error(
        "{op}: {count} test copy/copies run on this host's recovery points of the VM; stop \
         them first (`vmreplica failover stop-test NAME`)"
    )]
    TestCopiesRun {
        /// The command.
        op: Op,
        /// How many.
        count: u32,
    },
    /// become-replica: the new primary's point is not newer than the one this host's disks
    /// are built on.
    #[error(
        "{op}: the new primary's point {point} is not newer than point {view_point}, which \
         this host's disks are built on"
    )]
    PointNotNewer {
        /// The command.
        op: Op,
        /// The new primary's point.
        point: CycleId,
        /// The point of this host's failover view.
        view_point: CycleId,
    },
}

impl Refusal {
    /// Whether the sender should simply retry later (the replica is paused): the primary keeps
    /// retrying with backoff, health is Critical meanwhile.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Refusal::Paused { .. })
    }
}
