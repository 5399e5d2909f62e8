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
        reason: String,
    },
    /// An incremental cycle was asked for but tracking never started.
    #[error("change tracking has not started; run a full cycle first")]
    NotTracking,
    /// The configuration is unusable.
    #[error("invalid capture configuration: {0}")]
    Config(String),
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
    /// QEMU reported something this code does not understand.
    #[error("unexpected qemu state: {0}")]
    Unexpected(String),
    /// The NBD server returned data that does not cover the requested range.
    #[error("malformed nbd read reply: {0}")]
    Protocol(String),
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
    /// A cleanup step did not finish in time.
    #[error("timeout waiting for {0}")]
    Timeout(String),
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
