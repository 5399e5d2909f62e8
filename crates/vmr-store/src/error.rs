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
    InvalidCycle(CycleFault),
    /// A block-hash request (resync) outside what the store answers.
    #[error("invalid hash request: {0}")]
    BadHashRequest(HashRequestFault),
    /// An import that cannot be done as asked (images, a staged cycle, reverse replication's
    /// adoption of existing disks).
    #[error("invalid import: {0}")]
    InvalidImport(ImportFault),
    /// A point's disk has data to hash but no layer holds it (the catalog and the files
    /// disagree).
    #[error("no layer to hash")]
    NoLayerToHash,
    /// A point reader was asked for a disk index the point does not have.
    #[error("no disk index {0} in the point")]
    NoSuchDiskIndex(usize),
    /// A point reader was asked for more bytes at once than one NBD read carries.
    #[error("read of {0} bytes is larger than one read")]
    ReadTooLarge(u64),
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
        /// What is wrong (boxed: errors that carry a `StoreError` and a path stay under
        /// `clippy::result_large_err`'s 128 bytes).
        reason: Box<Corruption>,
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
    InvalidDefinition(Box<vmr_proto::VmDefinitionError>),
    /// The VM definition names another VM.
    #[error("invalid VM definition: definition is for VM {found}, not {expected}")]
    DefinitionForOtherVm {
        /// The UUID the definition names.
        found: Uuid,
        /// The VM it was given for.
        expected: Uuid,
    },
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
    /// `qemu-img`, `qemu-nbd` or `qemu-storage-daemon` failed.
    #[error("{tool} failed: {fault}")]
    Tool {
        /// The program.
        tool: &'static str,
        /// How.
        fault: ToolFault,
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

/// What is wrong with a cycle's header or one of its extents.
#[derive(Debug, thiserror::Error)]
pub enum CycleFault {
    /// The header lists no disk.
    #[error("cycle has no disks")]
    NoDisks,
    /// A disk id that is not a valid name, or listed twice.
    #[error("disk id {0:?} invalid or repeated")]
    BadDiskId(String),
    /// A disk of size 0.
    #[error("disk {0:?} has size 0")]
    EmptyDisk(String),
    /// A full cycle that names a base.
    #[error("a full cycle has no base")]
    FullWithBase,
    /// An incremental or resync cycle without a base.
    #[error("an incremental cycle needs a base")]
    NoBase,
    /// A base that is not older than the cycle.
    #[error("base {base} is not older than cycle {id}")]
    BaseNotOlder {
        /// The base.
        base: CycleId,
        /// The cycle.
        id: CycleId,
    },
    /// An extent names a disk index the header does not have.
    #[error("extent names disk index {0}")]
    NoSuchDisk(u32),
    /// A data extent larger than a staging record holds.
    #[error("data extent of {0} bytes is too large")]
    ExtentTooLarge(u64),
    /// An extent that runs past its disk's end.
    #[error("extent {offset}+{len} beyond disk {disk:?} of {size} bytes")]
    ExtentOutOfRange {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk id.
        disk: String,
        /// The disk's size.
        size: u64,
    },
    /// The header does not encode as JSON (for a staging file).
    #[error("header does not encode: {0}")]
    HeaderEncode(serde_json::Error),
    /// The header's JSON is larger than a staging file holds.
    #[error("cycle header too large")]
    HeaderTooLarge,
}

/// What is wrong with a block-hash request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashRequestFault {
    /// A block size that is not a power of two within the limits.
    #[error("block size {size} is not a power of two between {min} and {max}")]
    BlockSize {
        /// The size asked for.
        size: u64,
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
    /// No block, or more than one call answers.
    #[error("{count} blocks asked for; 1 to {max} per call")]
    Count {
        /// Blocks asked for.
        count: u64,
        /// The most per call.
        max: u64,
    },
    /// Blocks past the disk's end.
    #[error("blocks {first}+{count} beyond a disk of {blocks} blocks")]
    Beyond {
        /// The first block asked for.
        first: u64,
        /// How many.
        count: u64,
        /// The disk's blocks.
        blocks: u64,
    },
}

/// Why an import cannot be done as asked.
#[derive(Debug, thiserror::Error)]
pub enum ImportFault {
    /// No image of a disk in the directory.
    #[error("no image for disk {disk:?} in {}: expected {disk}.qcow2, {disk}.raw or {disk}.img", .dir.display())]
    NoImage {
        /// The disk id.
        disk: String,
        /// The directory.
        dir: PathBuf,
    },
    /// More than one image of a disk in the directory.
    #[error("more than one image for disk {disk:?} in {}", .dir.display())]
    ManyImages {
        /// The disk id.
        disk: String,
        /// The directory.
        dir: PathBuf,
    },
    /// Nothing to import.
    #[error("no images to import")]
    NoImages,
    /// A staged cycle that is not a full initial copy, for a VM without points.
    #[error("{} holds a {kind:?} cycle; only a full initial copy can be imported", .path.display())]
    NotFull {
        /// The staging file.
        path: PathBuf,
        /// Its cycle's kind.
        kind: vmr_proto::CycleKind,
    },
    /// The replica already holds the staged cycle or a newer one.
    #[error("the replica already holds cycle {0} or a newer one; nothing to import")]
    AlreadyHeld(CycleId),
    /// Existing images are adopted only by a VM without points.
    #[error("import needs a VM without recovery points")]
    HasPoints,
    /// A disk id that is not a valid name, or a disk of size 0.
    #[error("disk id {0:?} invalid or size 0")]
    BadDisk(String),
}

/// How `qemu-img`, `qemu-nbd` or `qemu-storage-daemon` failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolFault {
    /// The program could not be started.
    #[error("cannot run it: {0}")]
    Spawn(std::io::Error),
    /// It exited unsuccessfully: what it wrote to stderr, and what it was doing.
    #[error("{stderr} ({context})")]
    Exited {
        /// Its stderr, trimmed.
        stderr: String,
        /// Its arguments or the export, and its exit status where known.
        context: String,
    },
    /// Its JSON output does not parse.
    #[error("bad {what} json: {error}")]
    Json {
        /// Which output (`info`, `map`).
        what: &'static str,
        /// serde's error.
        error: serde_json::Error,
    },
    /// A `qemu-img map` entry without its start or length.
    #[error("map entry without start/length")]
    MapEntry,
    /// A QMP command of the daemon, or the QMP connection, failed.
    #[error("{command}: {error}")]
    Qmp {
        /// The command (`connect` for the connection).
        command: String,
        /// What QMP said (boxed: a `QmpError` is large, and a [`StoreError`] travels
        /// inside larger errors).
        error: Box<vmr_capture::qmp::QmpError>,
    },
    /// The daemon exited while it started.
    #[error("exited at start")]
    ExitedAtStart,
    /// The daemon died by a crash signal while it started, every time it was started.
    #[error("crashed at start ({signal}), {starts} start(s)")]
    CrashedAtStart {
        /// The signal of the last start (`SIGSEGV`...).
        signal: &'static str,
        /// How many times it was started.
        starts: usize,
    },
    /// The daemon's sockets did not appear in time.
    #[error("sockets did not appear")]
    NoSockets,
    /// A `qemu-nbd` export's socket did not appear in time.
    #[error("socket did not appear for {0}")]
    NoSocket(String),
    /// The daemon is not running.
    #[error("not running")]
    NotRunning,
    /// The daemon stopped while a layer was being exported.
    #[error("stopped while exporting")]
    StoppedWhileExporting,
    /// No file node options were left to try (none was given).
    #[error("no file options to try")]
    NoFileOptions,
    /// A block job vanished before it concluded.
    #[error("job {0} vanished")]
    JobVanished(String),
    /// A block job did not conclude in time.
    #[error("job {0} did not end")]
    JobTimeout(String),
    /// Creating a layer failed in the daemon (QEMU's message).
    #[error("creating a layer: {0}")]
    CreateFailed(String),
    /// The thread that starts the daemon could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The thread that starts the daemon ended without an answer.
    #[error("spawn thread ended")]
    ThreadEnded,
    /// `qemu-nbd` was not started.
    #[error("not started")]
    NotStarted,
    /// `qemu-nbd` did not exit after its export was finished.
    #[error("did not exit for {0}")]
    NoExit(String),
    /// Waiting for `qemu-nbd` failed.
    #[error("wait: {0}")]
    Wait(std::io::Error),
}

impl ToolFault {
    /// Whether the tool said the file system is full (or the quota exhausted).
    fn says_no_space(&self) -> bool {
        let says =
            |t: &str| t.contains("No space left on device") || t.contains("Disk quota exceeded");
        match self {
            ToolFault::Exited { stderr, .. } => says(stderr),
            ToolFault::CreateFailed(m) => says(m),
            _ => self.qmp_desc().is_some_and(says),
        }
    }

    /// QEMU's description of a failed QMP command, if this is one.
    pub(crate) fn qmp_desc(&self) -> Option<&str> {
        match self {
            ToolFault::Qmp { error, .. } => error.desc(),
            _ => None,
        }
    }
}

/// What is wrong with a damaged store file.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// The catalog is not a catalog's JSON.
    #[error("not a catalog: {0}")]
    NotCatalog(serde_json::Error),
    /// A catalog format this build does not read.
    #[error("unsupported catalog format {found} (this build reads {reads})")]
    CatalogFormat {
        /// The file's format.
        found: u32,
        /// The format this build reads.
        reads: u32,
    },
    /// The catalog's body does not encode again (for its checksum).
    #[error("cannot re-encode: {0}")]
    ReEncode(serde_json::Error),
    /// The catalog's checksum does not match its body.
    #[error("catalog checksum mismatch")]
    CatalogChecksum,
    /// The catalog's points are not in ascending id order.
    #[error("points not in ascending id order")]
    PointOrder,
    /// A catalog larger than any catalog.
    #[error("catalog of {0} bytes is too large")]
    CatalogTooLarge(u64),
    /// The catalog is another VM's.
    #[error("catalog names another VM")]
    CatalogOfOtherVm,
    /// A staging file without its magic.
    #[error("bad staging magic")]
    StagingMagic,
    /// A staging version this build does not read.
    #[error("unsupported staging version {0}")]
    StagingVersion(u32),
    /// A staging header larger than allowed.
    #[error("staging header too large")]
    StagingHeaderTooLarge,
    /// The staging header's checksum does not match.
    #[error("staging header checksum mismatch")]
    StagingHeaderChecksum,
    /// The staging header is not a cycle header.
    #[error("bad header json: {0}")]
    StagingHeaderJson(serde_json::Error),
    /// The trailer's counts differ from the records read.
    #[error("trailer count mismatch")]
    TrailerCount,
    /// The trailer's chain checksum differs from the records read.
    #[error("trailer checksum mismatch")]
    TrailerChecksum,
    /// The trailer does not end with the end magic.
    #[error("bad end magic")]
    EndMagic,
    /// Bytes after the trailer.
    #[error("bytes after trailer")]
    AfterTrailer,
    /// A record's data longer than allowed.
    #[error("extent of {0} bytes too large")]
    ExtentTooLarge(u64),
    /// A record tag this build does not know.
    #[error("unknown record tag {0}")]
    RecordTag(u8),
    /// The staging file ends early.
    #[error("truncated staging file")]
    Truncated,
    /// The staging file does not end with a trailer.
    #[error("staging file has no trailer")]
    NoTrailer,
    /// A staged cycle of another VM.
    #[error("staged cycle of another VM")]
    StagedForOtherVm,
    /// A view's record lacks a disk its point has.
    #[error("view {view} lacks disk {disk}")]
    ViewLacksDisk {
        /// The view.
        view: Uuid,
        /// The disk id.
        disk: String,
    },
    /// A layer's recorded backing file is not the one the catalog says.
    #[error("backing {found:?} is not {expected:?}")]
    Backing {
        /// What the qcow2 header records.
        found: Option<String>,
        /// What the catalog says.
        expected: String,
    },
    /// A layer's recorded backing is neither of the two files it can be during a prune.
    #[error("backing {found:?} is neither {either:?} nor {or:?}")]
    BackingNeither {
        /// What the qcow2 header records.
        found: Option<String>,
        /// One file it can be.
        either: String,
        /// The other.
        or: String,
    },
    /// A layer's recorded backing is neither the layer below nor that layer's own backing.
    #[error("backing {found:?} is neither {layer:?} nor {base:?}")]
    BackingNeitherBase {
        /// What the qcow2 header records.
        found: Option<String>,
        /// The layer below.
        layer: String,
        /// Its backing (`None`: the bottom of the chain).
        base: Option<String>,
    },
    /// The layer a cycle would create is already a committed point's.
    #[error("layer to create is already committed")]
    LayerCommitted,
    /// A layer yielded another number of block hashes than asked.
    #[error("read {got} block hashes for {want}")]
    HashCount {
        /// Hashes read.
        got: usize,
        /// Hashes asked for.
        want: usize,
    },
    /// A path without a parent directory.
    #[error("path has no parent directory")]
    NoParent,
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

    /// A tool failure, turned into [`StoreError::DiskFull`] when the tool says ENOSPC.
    pub(crate) fn tool(tool: &'static str, fault: ToolFault) -> Self {
        if fault.says_no_space() {
            return StoreError::DiskFull(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        StoreError::Tool { tool, fault }
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

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: Corruption) -> Self {
        StoreError::CorruptFile {
            path: path.into(),
            reason: Box::new(reason),
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
