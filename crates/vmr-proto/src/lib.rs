//! Wire, API and on-disk serde types shared by every vmreplica crate.
//!
//! Architecture Invariant: this is the only crate that derives `Serialize`/`Deserialize`;
//! everything that crosses a process, host or disk boundary is described here.

pub mod api;
pub mod cycle;
pub mod machine;
pub mod peer;
pub mod record;
pub mod store;
pub mod vmdef;
pub mod wire;

pub use cycle::{
    CycleConsistency, CycleHeader, CycleId, CycleKind, DiskInfo, Extent, ExtentData, checksum,
};
pub use vmdef::{VmDefinition, VmDefinitionError};
