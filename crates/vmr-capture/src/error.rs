//! Capture errors and the reasons that force a full resynchronisation.

use crate::qmp::QmpError;

/// Why incremental replication cannot continue and a full (re)synchronisation is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncReason {
    /// The disk has no vmreplica dirty bitmap (QEMU crashed, or it was removed externally).
    BitmapMissing {
        /// Disk node name.
        disk: String,
    },
    /// The bitmap is marked inconsistent (QEMU exited uncleanly while it was loaded) or is not
    /// recording.
    BitmapInconsistent {
        /// Disk node name.
        disk: String,
    },
    /// The disk's size differs from the one at the last committed cycle.
    DiskSizeChanged {
        /// Disk node name.
        disk: String,
        /// Size at the last committed cycle.
        was: u64,
        /// Size now.
        now: u64,
    },
    /// A raw disk keeps its bitmap only in memory; QEMU has restarted since.
    RawDiskRestarted {
        /// Disk node name.
        disk: String,
    },
    /// A full cycle was started but never committed (agent died or the cycle was aborted).
    InitialCopyIncomplete {
        /// Disk node name.
        disk: String,
    },
    /// A libvirt-managed VM's checkpoint chain cannot be trusted: the acknowledged checkpoint
    /// is gone (libvirt's metadata lost, the domain migrated) or libvirt found it inconsistent.
    CheckpointUntrusted {
        /// The checkpoint and what happened to it.
        detail: String,
    },
}

impl std::fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResyncReason::BitmapMissing { disk } => {
                write!(
                    f,
                    "change tracking of disk {disk} was lost (no dirty bitmap; QEMU crashed or it was removed)"
                )
            }
            ResyncReason::BitmapInconsistent { disk } => write!(
                f,
                "change tracking of disk {disk} is unreliable (bitmap inconsistent after an unclean QEMU exit)"
            ),
            ResyncReason::DiskSizeChanged { disk, was, now } => {
                write!(f, "disk {disk} changed size from {was} to {now} bytes")
            }
            ResyncReason::RawDiskRestarted { disk } => write!(
                f,
                "raw disk {disk} cannot keep change tracking across a QEMU restart (non-persistent bitmap)"
            ),
            ResyncReason::CheckpointUntrusted { detail } => {
                write!(
                    f,
                    "the libvirt checkpoint chain cannot be trusted: {detail}"
                )
            }
            ResyncReason::InitialCopyIncomplete { disk } => {
                write!(f, "the full copy of disk {disk} was not completed")
            }
        }
    }
}

/// Errors of the capture API.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A QMP command or the QMP connection failed.
    #[error("qmp failure during {during}")]
    Qmp {
        /// The step that failed.
        during: String,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// The NBD connection to the point-in-time view failed.
    #[error("nbd read of the point-in-time view failed")]
    Nbd(#[from] vmr_nbd::NbdError),
    /// Incremental capture is impossible; a full cycle is needed.
    #[error("full resynchronisation required: {reason}")]
    ResyncRequired {
        /// Why.
        reason: ResyncReason,
    },
    /// The consistency group's cut this cycle took part in ordered no transaction (another
    /// member failed, or the coordinator is gone); the VM was resumed.
    #[error("group cut abandoned: {reason}")]
    GroupCut {
        /// Why.
        reason: GroupCutReason,
    },
    /// An incremental cycle was asked for but tracking never started.
    #[error("change tracking has not started; run a full cycle first")]
    NotTracking,
    /// The configuration is unusable.
    #[error("invalid capture configuration: {0}")]
    Config(ConfigFault),
    /// A configured disk node does not exist in QEMU.
    #[error("disk node {0} not found in qemu")]
    DiskNotFound(String),
    /// Not enough free space for the fleecing files (they could fill up and fail guest writes).
    #[error(
        "not enough free space in {dir} for the point-in-time view: {needed} bytes needed (sum of disk sizes), {available} available"
    )]
    InsufficientSpace {
        /// The work directory.
        dir: String,
        /// Bytes required.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// An NBD server not started by vmreplica runs in this QEMU.
    #[error(
        "qemu already runs an nbd server that is not vmreplica's ({socket} does not answer); stop it or share it"
    )]
    ForeignNbdServer {
        /// The socket vmreplica expected.
        socket: String,
    },
    /// A file operation in the work directory failed.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A QMP query answered with a shape this code does not understand.
    #[error("unexpected qemu answer: {what}: {reply}")]
    BadQmpReply {
        /// What was expected.
        what: &'static str,
        /// The answer.
        reply: serde_json::Value,
    },
    /// The view's NBD export lacks the block status context the cycle reads.
    #[error("{server} did not accept meta context {context}")]
    NoMetaContext {
        /// Whose export (QEMU's, or libvirt's of a target).
        server: String,
        /// The context.
        context: String,
    },
    /// The point-in-time view of a disk has another size than the disk.
    #[error("snapshot of {disk} is {view} bytes, disk is {size}")]
    ViewSize {
        /// The disk node.
        disk: String,
        /// The view's size.
        view: u64,
        /// The disk's size.
        size: u64,
    },
    /// A disk larger than a file can be (its fleecing file cannot be reserved).
    #[error("disk size {0} does not fit a file length")]
    DiskTooLarge(u64),
    /// `read_all` outside a verify cycle, or twice.
    #[error("read_all is only for a verify cycle, once")]
    NotVerifyCycle,
    /// A blocking libvirt call's task panicked or was cancelled.
    #[error("libvirt call task failed")]
    LibvirtTask(#[source] tokio::task::JoinError),
    /// The checkpoint chain refused an event (a driver bug; nothing changed).
    #[error("checkpoint chain refused an event")]
    Chain(#[source] vmr_core::checkpoints::ChainRefusal),
    /// The checkpoint chain began no backup job where it had to.
    #[error("the chain began no job")]
    NoJobBegun,
    /// The NBD server returned data that does not cover the requested range.
    #[error("malformed nbd read reply: {0}")]
    Protocol(ReadFault),
    /// `commit` was called before every extent was read; the cycle was aborted instead.
    #[error("cycle committed before all extents were read; it was aborted instead")]
    Incomplete,
    /// A libvirt call failed (see `vmr_libvirt::LibvirtError`).
    #[error(transparent)]
    Libvirt(#[from] vmr_libvirt::LibvirtError),
    /// Another job (another tool's backup) holds the libvirt domain: nothing was captured,
    /// the cycle is tried again after `retry_after_ms`.
    #[error("another job holds the domain ({detail}); retrying in {retry_after_ms} ms")]
    BackupBusy {
        /// What was seen.
        detail: String,
        /// When to try again.
        retry_after_ms: u64,
    },
    /// A cleanup step did not finish in time: a QEMU object (node, job, export) stayed.
    #[error("timeout waiting for {0} to go away")]
    Timeout(String),
}

/// Why a consistency group's cut was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupCutReason {
    /// Another member of the group could not be paused.
    #[error("another member could not be paused")]
    MemberNotPaused,
    /// The group's coordinator is gone.
    #[error("the group coordinator is gone")]
    CoordinatorGone,
}

/// What is wrong with a capture configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigFault {
    /// No disk is configured.
    #[error("no disks")]
    NoDisks,
    /// A disk node is listed twice.
    #[error("disk {0} listed twice")]
    DuplicateDisk(String),
    /// The expected sizes do not match the disks one for one.
    #[error("{sizes} expected sizes for {disks} disks")]
    SizeCount {
        /// Sizes given.
        sizes: usize,
        /// Disks configured.
        disks: usize,
    },
    /// The NBD socket's path is longer than a Unix socket's may be.
    #[error("work dir path too long for a unix socket: {0}")]
    SocketPathTooLong(std::path::PathBuf),
    /// The tag is not 1 to 16 ASCII letters, digits or underscores.
    #[error("tag {tag:?} must be 1 to {max} ascii letters, digits or underscores")]
    BadTag {
        /// The tag.
        tag: String,
        /// Its longest length.
        max: usize,
    },
}

/// How an NBD answer did not describe the view as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadFault {
    /// A block status extent starts past where the previous one ended.
    #[error("block status extent at {at} leaves a gap after {after}")]
    StatusGap {
        /// Where the extent starts.
        at: u64,
        /// Where the previous one ended.
        after: u64,
    },
    /// A block status reply that moved nothing forward.
    #[error("empty block status reply at {0}")]
    EmptyStatus(u64),
    /// A read chunk in another place than the one that follows.
    #[error("read chunk at {at} where {expected} was expected")]
    ChunkMisplaced {
        /// Where it is.
        at: u64,
        /// Where it should be.
        expected: u64,
    },
    /// A read that returned another length than asked.
    #[error("read of {len} bytes at {offset} returned {got} bytes")]
    ShortRead {
        /// Bytes asked for.
        len: u32,
        /// Where.
        offset: u64,
        /// Bytes returned.
        got: u64,
    },
}

impl CaptureError {
    pub(crate) fn qmp(during: impl Into<String>) -> impl FnOnce(QmpError) -> CaptureError {
        let during = during.into();
        move |source| CaptureError::Qmp { during, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_well() {
        let r = ResyncReason::DiskSizeChanged {
            disk: "disk0".into(),
            was: 1,
            now: 2,
        };
        assert_eq!(r.to_string(), "disk disk0 changed size from 1 to 2 bytes");
        let e = CaptureError::ResyncRequired {
            reason: ResyncReason::RawDiskRestarted { disk: "d".into() },
        };
        assert!(
            e.to_string()
                .starts_with("full resynchronisation required: raw disk d")
        );
    }
}
