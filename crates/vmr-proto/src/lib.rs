//! Wire, API and on-disk serde types shared by every vmreplica crate.
//!
//! Architecture Invariant: this is the only crate that derives `Serialize`/`Deserialize`;
//! everything that crosses a process, host or disk boundary is described here.

pub mod api;
pub mod bandwidth;
pub mod clock;
pub mod cycle;
pub mod event;
pub mod failnet;
pub mod lease;
pub mod machine;
pub mod peer;
pub mod record;
pub mod retain;
pub mod sockpath;
pub mod state;
pub mod store;
pub mod vmdef;
pub mod wire;

pub use cycle::{
    CheckedExtent, ChecksumMismatch, ChecksumScheme, CycleConsistency, CycleHeader, CycleId,
    CycleKind, DiskInfo, Extent, ExtentData, GroupTag, HASH_BLOCK, HeaderError, MAX_CYCLE_ID,
    MAX_DISK_ID_LEN, MAX_DISK_SIZE, MAX_DISKS, check_disk_ids, check_disks, checksum,
    checksum_blocks, valid_disk_id,
};
pub use failnet::{FailnetError, FailoverInterface, FailoverSettings, IpPrefix};
pub use uuid::Uuid;
pub use vmdef::{DefinitionFault, VmDefinition, VmDefinitionError};
