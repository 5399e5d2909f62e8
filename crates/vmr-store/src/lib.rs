//! vmr-store: the replica side of vmreplica. It writes each incoming cycle of a VM's changes
//! straight into a new qcow2 layer per disk through QEMU (`qemu-img` + a long-lived
//! `qemu-storage-daemon` driven over QMP + the vmr-nbd client), commits the recovery point in a checksummed catalog before the cycle is
//! acknowledged, prunes old points by merging layers, and makes instant failover views. The
//! staging format survives only as the container of an initial copy on external media.
//!
//! See `docs/replica-store.md` for the on-disk layout, the file formats and the crash-safety
//! argument.

pub mod catalog;
mod daemon;
mod error;
mod fsio;
pub mod hash_index;
pub mod hashes;
mod pipeline;
mod qemu;
pub mod retention;
pub mod staging;
mod storage;
mod store;

pub use error::{Corruption, CycleFault, HashRequestFault, ImportFault, StoreError, ToolFault};
pub use retention::{KeepReason, Plan, PointMeta, estimate_sizes, plan, retention};
#[cfg(feature = "failpoints")]
pub use storage::FaultStorage;
pub use store::{
    Change, CheckKind, DiskChanges, FileCheck, ImageFormat, ImportImage, ImportPos, ImportProgress,
    LayerWriter, PointHold, PointKeep, PointReader, Store, View, VmUsage, find_images,
};
pub use vmr_proto::store::{PointKind, RecoveryPoint, RetentionPolicy};
