//! vmr-libvirt: what vmreplica does to a libvirt-managed VM, through libvirt's own API (the
//! `virt` crate's C bindings, never `virsh` text). It owns: connecting to a libvirt URI,
//! looking a domain up, reading its XML and the disks vmreplica can replicate (target, qcow2
//! image path, format), the domain's checkpoints (vmreplica names its own `vmreplica-<n>` and
//! never touches others), a pull-mode backup job (`virDomainBackupBegin`: the point-in-time
//! view of every disk, exported over NBD on a Unix socket with a scratch file per disk, with
//! `<incremental>` = a checkpoint and a new checkpoint created atomically with it), ending
//! that job (`virDomainAbortJob`) and deleting a checkpoint; on a replica host, defining,
//! starting, destroying and undefining a failed-over domain from the replicated XML
//! (`xml::failover_xml`), also from a domain XML generated from a plain-QEMU definition
//! (`generate::domain_from_qemu`, mixed setups).
//!
//! Which checkpoint a cycle starts from, what is deleted after an acknowledgement and when a
//! chain cannot be trusted are decisions: they live in `vmr_core::checkpoints` (sans-IO). The
//! capture cycle that reads the exports is `vmr_capture::libvirt`. See `docs/libvirt.md`.
//!
//! Every call blocks on the libvirt daemon: async callers run them in `spawn_blocking`.

mod domain;
mod error;
pub mod generate;
pub mod xml;

pub use domain::{BackupJob, Domain, Libvirt};
pub use error::{FailoverDiskFault, LibvirtError, QemuFault, XmlFault};
pub use xml::{BackupPlan, DomainDisk, FailoverDomain};

/// Prefix of every checkpoint vmreplica creates; others are never touched.
pub const CHECKPOINT_PREFIX: &str = "vmreplica-";
