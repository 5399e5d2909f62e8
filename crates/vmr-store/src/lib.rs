//! vmr-store: the replica side of vmreplica. It receives one cycle of a VM's changes into a
//! durable staging file, applies it through QEMU (`qemu-img` + `qemu-nbd` + the vmr-nbd
//! client) into a new qcow2 layer per disk, commits the recovery point in a checksummed
//! catalog, prunes old points by merging layers, and makes instant failover views.
//!
//! See `docs/replica-store.md` for the on-disk layout, the file formats and the crash-safety
//! argument.

pub mod catalog;
mod error;
mod fsio;
pub mod hashes;
mod pipeline;
mod qemu;
pub mod retention;
pub mod staging;
mod store;

pub use error::StoreError;
pub use retention::{PointMeta, retention};
pub use store::{
    ImageFormat, ImportImage, ResyncWriter, StagingWriter, Store, View, VmUsage, find_images,
};
pub use vmr_proto::store::{PointKind, RecoveryPoint, RetentionPolicy};
