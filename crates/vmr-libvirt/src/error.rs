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
    /// The domain's XML could not be understood.
    #[error("domain XML: {reason}")]
    DomainXml {
        /// Why.
        reason: String,
    },
    /// A plain-QEMU definition that cannot be made into a domain (a bad `-m` or `-smp`).
    #[error("the QEMU definition cannot be made into a libvirt domain: {reason}")]
    QemuDefinition {
        /// Why.
        reason: String,
    },
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
        reason: String,
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
