//! The errors of libvirt calls, one variant per situation a caller handles differently.

/// What went wrong talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The connection URI could not be opened.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// No domain of that name.
    #[error("libvirt has no domain {name:?}")]
    NoDomain {
        /// The name asked for.
        name: String,
    },
    /// A name or path that cannot be passed to libvirt (an interior NUL byte).
    #[error("invalid {what} {value:?}: contains a NUL byte")]
    InvalidName {
        /// Which argument.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The domain's XML could not be understood (boxed, as is [`LibvirtError::QemuDefinition`]'s
    /// fault: this error is carried inside larger ones, which `clippy::result_large_err` keeps
    /// under 128 bytes).
    #[error("domain XML: {0}")]
    DomainXml(Box<XmlFault>),
    /// A plain-QEMU definition that cannot be made into a domain (a bad `-m` or `-smp`), or a
    /// domain that cannot be started with plain QEMU.
    #[error("the QEMU definition cannot be made into a libvirt domain: {0}")]
    QemuDefinition(Box<QemuFault>),
    /// A disk whose image is not qcow2: libvirt checkpoints (persistent dirty bitmaps) need
    /// qcow2.
    #[error(
        "disk {disk} of the domain is {format}, not qcow2: libvirt checkpoints need qcow2 images (convert it with qemu-img convert -O qcow2 while the domain is shut off)"
    )]
    NotQcow2 {
        /// Target name (`vda`).
        disk: String,
        /// Its format.
        format: String,
    },
    /// A disk that is not a plain file (a block device, network disk).
    #[error(
        "disk {disk} of the domain is not a file-backed image ({kind}); vmreplica replicates file-backed qcow2 disks"
    )]
    NotFile {
        /// Target name.
        disk: String,
        /// The disk's `type`.
        kind: String,
    },
    /// The domain has no disk vmreplica can replicate.
    #[error("the domain has no file-backed disk")]
    NoDisks,
    /// Another job (another tool's backup, a migration) holds the domain. Retryable: the cycle
    /// waits and tries again.
    #[error("another job holds the domain ({detail}); the cycle will retry")]
    Busy {
        /// What libvirt said or the job seen.
        detail: String,
    },
    /// A checkpoint the chain needs does not exist (deleted by someone, lost with libvirt's
    /// metadata after a migration or a state loss): the next cycle must be a resync.
    #[error("checkpoint {name} is missing: a resynchronization is required")]
    CheckpointMissing {
        /// Its name.
        name: String,
    },
    /// libvirt or QEMU found a checkpoint's bitmap inconsistent (after a host crash): the
    /// next cycle must be a resync, never a delta from a damaged bitmap.
    #[error("checkpoint {name} is inconsistent: a resynchronization is required ({message})")]
    CheckpointInconsistent {
        /// Its name.
        name: String,
        /// libvirt's message.
        message: String,
    },
    /// The domain is not running (a backup job needs a running domain).
    #[error("domain {name} is not running")]
    NotRunning {
        /// Its name.
        name: String,
    },
    /// A failover's disks do not match the replicated domain definition.
    #[error("failover domain: disk {disk}: {reason}")]
    FailoverDisk {
        /// Target name.
        disk: String,
        /// What does not match.
        reason: FailoverDiskFault,
    },
    /// Any other failed call, with the call's name and libvirt's message.
    #[error("libvirt {call} failed: {message}")]
    Call {
        /// The API called.
        call: &'static str,
        /// libvirt's message.
        message: String,
    },
}

/// What could not be understood in a domain's or a checkpoint's XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlFault {
    /// Not XML.
    #[error("{0}")]
    Parse(roxmltree::Error),
    /// Another root element than expected.
    #[error("root element is <{found}>, not <{expected}>")]
    WrongRoot {
        /// The element expected.
        expected: &'static str,
        /// The element found.
        found: String,
    },
    /// A disk without a target device name.
    #[error("a <disk> without <target dev=...>")]
    DiskWithoutTarget,
    /// A file disk without its file.
    #[error("disk {0} has no <source file=...>")]
    DiskWithoutSource(String),
    /// The domain definition has no name.
    #[error("the domain definition has no <name>")]
    NoName,
    /// The domain's UUID is not a UUID.
    #[error("domain UUID {0:?} is not a UUID")]
    BadUuid(String),
}

/// Why a definition cannot be carried between plain QEMU and libvirt.
#[derive(Debug, thiserror::Error)]
pub enum QemuFault {
    /// `-m` with a size unit QEMU does not know.
    #[error("-m {0:?}: unknown size unit")]
    MemoryUnit(String),
    /// `-m` that is not a memory size.
    #[error("-m {0:?}: not a memory size")]
    MemorySize(String),
    /// A CPU count that is not a positive number.
    #[error("-smp {what}={value:?}: not a positive number")]
    CpuCount {
        /// Which count (`cpus`, `sockets`, ...).
        what: String,
        /// The value given.
        value: String,
    },
    /// An option that needs a value is the last argument.
    #[error("{0} has no value (the last argument)")]
    NoValue(String),
    /// A domain's `<memory>` that is not a number.
    #[error("<memory> {0:?} is not a number")]
    DomainMemory(String),
    /// A domain's `<memory>` unit libvirt does not know.
    #[error("<memory unit={0:?}>: unknown unit")]
    DomainMemoryUnit(String),
    /// The domain's XML is not XML.
    #[error("{0}")]
    Xml(roxmltree::Error),
    /// A UEFI domain (firmware or loader).
    #[error(
        "UEFI firmware (<os firmware='efi'> or <loader>): starting it with plain QEMU is not built"
    )]
    Uefi,
    /// A disk on another bus than virtio.
    #[error("disk {disk} is on the {bus:?} bus: only virtio disks are started with plain QEMU")]
    DiskBus {
        /// The disk's target name.
        disk: String,
        /// Its bus.
        bus: String,
    },
    /// A bridge interface without its bridge.
    #[error("interface {0} (bridge) has no <source bridge>")]
    BridgeWithoutSource(usize),
    /// An interface of a type plain QEMU cannot stand in for.
    #[error(
        "interface {index} is of type {kind:?}: a libvirt {kind} has no plain-QEMU equivalent on a host without libvirt (only user and bridge interfaces)"
    )]
    InterfaceType {
        /// The interface's position.
        index: usize,
        /// Its type.
        kind: String,
    },
}

/// How a failover's disk does not match the replicated domain definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FailoverDiskFault {
    /// The plan names a disk the definition lacks.
    #[error("the replicated domain definition has no such disk")]
    NotInDefinition,
    /// The definition has a disk whose replicated image is not on this host.
    #[error("no replicated image of it on this host")]
    NoImage,
}

impl LibvirtError {
    /// The cycle may simply be tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LibvirtError::Busy { .. })
    }

    /// The checkpoint chain cannot be trusted: only a full resynchronization is correct.
    pub fn needs_resync(&self) -> bool {
        matches!(
            self,
            LibvirtError::CheckpointMissing { .. } | LibvirtError::CheckpointInconsistent { .. }
        )
    }
}
