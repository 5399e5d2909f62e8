//! The store's typed error ([`StoreError`]) and the mapping of I/O, tool and NBD failures onto
//! it (ENOSPC anywhere becomes [`StoreError::DiskFull`]).

use std::path::PathBuf;

use uuid::Uuid;
use vmr_proto::CycleId;

/// Everything that can go wrong in the replica store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The VM is not registered in this store.
    #[error("unknown VM {0}")]
    UnknownVm(Uuid),
    /// The VM is already registered.
    #[error("VM {0} is already registered")]
    VmExists(Uuid),
    /// The cycle does not build on the replica's latest cycle: the primary must resync.
    #[error("cycle base {got:?} is not the replica's latest cycle {expected:?}")]
    WrongBase {
        /// The replica's latest cycle (its latest recovery point).
        expected: Option<CycleId>,
        /// The base the cycle names.
        got: Option<CycleId>,
    },
    /// The cycle makes a disk smaller than the replica holds it: refused, replica disks only
    /// grow.
    #[error(
        "disk {disk} shrank from {was} to {now} bytes on the primary; a replica disk is never \
         shrunk: grow the disk back on the primary, or disable and re-enable replication for a \
         new initial copy"
    )]
    DiskShrunk {
        /// Disk id.
        disk: String,
        /// Size the replica holds.
        was: u64,
        /// Size the cycle names.
        now: u64,
    },
    /// An extent's checksum did not verify; the cycle's pending layers were discarded.
    #[error("extent at disk {disk} offset {offset} failed its checksum")]
    CorruptExtent {
        /// Disk index.
        disk: u32,
        /// Byte offset.
        offset: u64,
    },
    /// The cycle header or an extent is malformed (bad disk index, out of range, ...).
    #[error("invalid cycle: {0}")]
    InvalidCycle(String),
    /// Another receive of this VM is in progress.
    #[error("a receive of cycle {0} is already in progress for this VM")]
    ReceiveInProgress(CycleId),
    /// The cycle writer was already failed or finished.
    #[error("cycle writer is no longer usable")]
    WriterClosed,
    /// No space left on the store's file system; no committed point was lost.
    #[error("no space left on the replica store")]
    DiskFull(#[source] std::io::Error),
    /// A file of the store is damaged (bad magic, version, checksum, truncation).
    #[error("corrupt store file {path}: {reason}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The requested recovery point does not exist.
    #[error("no recovery point {0:?}")]
    NoSuchPoint(Option<CycleId>),
    /// The requested view does not exist.
    #[error("no view {0}")]
    NoSuchView(Uuid),
    /// Another view pins a point the operation would change.
    #[error("point {point} is pinned by view {view}")]
    ViewPinsPoint {
        /// The view.
        view: Uuid,
        /// Its point.
        point: CycleId,
    },
    /// A point id that is not newer than the chain it would go on.
    #[error("point {id} is not newer than point {latest}")]
    PointNotNewer {
        /// The new point's id.
        id: CycleId,
        /// The point it would sit on.
        latest: CycleId,
    },
    /// The VM definition is not acceptable.
    #[error("invalid VM definition: {0}")]
    InvalidDefinition(String),
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` or `qemu-nbd` failed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The program.
        tool: &'static str,
        /// Its stderr or exit status.
        message: String,
    },
    /// A catalog could not be serialized (nothing was written).
    #[error("cannot encode the catalog")]
    Encode(#[source] serde_json::Error),
    /// A blocking task the store ran off the async runtime panicked or was cancelled.
    #[error("background task of the store failed")]
    Background(#[source] tokio::task::JoinError),
    /// A QEMU process of this store root (one a crashed store left, or one another store of
    /// the same root runs) still held the root's QEMU lock after `waited`.
    #[error("a QEMU process of another store of this root still holds {lock} after {waited:?}")]
    DaemonStillRunning {
        /// The lock file (`<root>/qemu.lock`).
        lock: PathBuf,
        /// How long the store waited.
        waited: std::time::Duration,
    },
    /// Talking to qemu-nbd failed.
    #[error("nbd i/o on {what}")]
    Nbd {
        /// Which export.
        what: String,
        /// The cause.
        #[source]
        source: vmr_nbd::NbdError,
    },
}

impl StoreError {
    /// Wrap an I/O error with context, turning ENOSPC/EDQUOT into [`StoreError::DiskFull`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_enospc(&source) {
            return StoreError::DiskFull(source);
        }
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A tool failure, turned into [`StoreError::DiskFull`] when its message says ENOSPC.
    pub(crate) fn tool(tool: &'static str, message: String) -> Self {
        if message.contains("No space left on device") || message.contains("Disk quota exceeded") {
            return StoreError::DiskFull(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        StoreError::Tool { tool, message }
    }

    /// An NBD failure; a server-side ENOSPC becomes [`StoreError::DiskFull`].
    pub(crate) fn nbd(what: impl Into<String>, source: vmr_nbd::NbdError) -> Self {
        if source.errno() == Some(libc::ENOSPC as u32) {
            return StoreError::DiskFull(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        StoreError::Nbd {
            what: what.into(),
            source,
        }
    }

    /// A durable-write failure from `vmr-durable` (ENOSPC becomes [`StoreError::DiskFull`]).
    pub(crate) fn durable(e: vmr_durable::DurableError) -> Self {
        StoreError::io(e.op, e.path, e.source)
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StoreError::CorruptFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// True for [`StoreError::DiskFull`].
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull(_))
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
}
