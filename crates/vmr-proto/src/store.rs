//! Types of the replica store's on-disk catalog (owned by vmr-store's format; see
//! docs/replica-store.md): the per-VM recovery-point catalog with its layers, views and
//! retention policy, and the recovery-point summary the store hands to its callers.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cycle::{CycleConsistency, CycleId};

/// Current format version of `catalog.json`.
pub const CATALOG_FORMAT: u32 = 1;

/// How many recovery points a replica keeps: Hyper-V's "recovery history" (`hourly`), or a
/// grid (`grid`, `--retain`; `hourly` is then 0 and ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionPolicy {
    /// Additional hourly recovery points kept besides the latest (Hyper-V: 0..=24, default 0;
    /// larger values are allowed).
    pub hourly: u32,
    /// How often the primary takes an app-consistent point (hours); informational for the
    /// store, which keeps app-consistent points within the hourly window either way.
    #[serde(default)]
    pub app_consistent_every_hours: Option<u32>,
    /// The grid policy (`--retain`); when set, it alone decides (docs/retention.md). Absent
    /// from catalogs written before it existed, and not written when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<crate::retain::RetentionGrid>,
}

impl std::fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.grid {
            Some(g) => write!(f, "grid {g}"),
            None => write!(f, "{} hourly recovery points", self.hourly),
        }
    }
}

/// The consistency type of a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// Like a power cut.
    CrashConsistent,
    /// Guest file systems were frozen.
    AppConsistent,
    /// Final cycle of a planned failover (VM shut down).
    Planned,
}

impl From<CycleConsistency> for PointKind {
    fn from(c: CycleConsistency) -> Self {
        match c {
            CycleConsistency::CrashConsistent => PointKind::CrashConsistent,
            CycleConsistency::AppConsistent => PointKind::AppConsistent,
            CycleConsistency::Planned => PointKind::Planned,
        }
    }
}

/// The whole `catalog.json` file: format version, checksum and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CatalogFile {
    /// [`CATALOG_FORMAT`] of the writer.
    pub format: u32,
    /// Lowercase hex BLAKE3 of the compact JSON encoding of `catalog`.
    pub checksum: String,
    /// The catalog itself.
    pub catalog: Catalog,
}

/// One replicated VM's recovery-point catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Catalog {
    /// The VM.
    pub vm: Uuid,
    /// Incremented at every write of the catalog.
    pub generation: u64,
    /// The retention policy in force.
    pub retention: RetentionPolicy,
    /// Committed recovery points, oldest first (ascending id).
    pub points: Vec<PointRecord>,
    /// Failover views that pin points.
    pub views: Vec<ViewRecord>,
}

/// One committed recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PointRecord {
    /// The cycle id that created the point.
    pub id: CycleId,
    /// Time of the cycle's cut (ms since the Unix epoch).
    pub taken_at_ms: u64,
    /// Consistency type.
    pub kind: PointKind,
    /// The point's layer per disk.
    pub layers: Vec<LayerRecord>,
    /// Set while the point is being merged away (prune intent); such a point is dropped by
    /// the next recovery whatever the policy says.
    #[serde(default)]
    pub pruning: bool,
    /// The consistency group point the cycle's cut belongs to (docs/groups.md); committed by
    /// the same catalog rename as the point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::GroupTag>,
}

/// The qcow2 layer holding one disk's state at one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LayerRecord {
    /// Disk id (the primary's node name).
    pub disk: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// File name inside `disks/<disk>/`.
    pub file: String,
    /// File name of the backing layer in the same directory, `None` for a base layer.
    pub backing: Option<String>,
}

/// A failover view: qcow2 overlays outside the store on top of one point's layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ViewRecord {
    /// View id.
    pub id: Uuid,
    /// The pinned point.
    pub point: CycleId,
    /// Overlay paths per disk (disk id, absolute path).
    pub disks: Vec<(String, String)>,
}

/// A recovery point as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoveryPoint {
    /// The cycle id (point id).
    pub id: CycleId,
    /// Time of the cut (ms since the Unix epoch).
    pub taken_at_ms: u64,
    /// Crash-consistent, app-consistent or planned.
    pub kind: PointKind,
    /// Allocated bytes of the point's own layer files.
    pub size_on_disk: u64,
    /// Number of views pinning the point.
    pub views: u32,
    /// Disk ids and virtual sizes.
    pub disks: Vec<(String, u64)>,
}
