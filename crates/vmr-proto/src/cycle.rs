//! One replication cycle as it travels from capture to the replica store: its header (which
//! cycle, which base, which disks, how consistent) and its extents (offset, data or zeros,
//! checksum).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifier of a cycle within one VM's replication; strictly increasing on the primary.
pub type CycleId = u64;

/// What a cycle contains relative to its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CycleKind {
    /// The whole disk content (initial replication); has no base.
    Full,
    /// Only the blocks changed since the base cycle.
    Incremental,
    /// Blocks found different by a block-hash comparison against the replica.
    Resync,
}

/// How consistent the cycle's cut is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CycleConsistency {
    /// Taken while the guest ran: like a power cut.
    CrashConsistent,
    /// Taken with the guest's file systems frozen by the guest agent.
    AppConsistent,
    /// The final cycle of a planned failover, taken with the VM shut down.
    Planned,
}

/// One disk of a VM as a cycle describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Stable disk key within the VM (the primary's block node name).
    pub id: String,
    /// Virtual size in bytes at the cycle's cut.
    pub size: u64,
}

/// Header of one cycle: everything except the extents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleHeader {
    /// The replicated VM.
    pub vm: Uuid,
    /// This cycle's id.
    pub id: CycleId,
    /// The cycle this one builds on; `None` only for [`CycleKind::Full`].
    pub base: Option<CycleId>,
    /// Full, incremental or resync.
    pub kind: CycleKind,
    /// Crash-, app-consistent or planned.
    pub consistency: CycleConsistency,
    /// Time of the cut, milliseconds since the Unix epoch.
    pub taken_at_ms: u64,
    /// The VM's disks, in the order extents refer to them by index.
    pub disks: Vec<DiskInfo>,
}

/// The payload of one extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// These bytes, `len()` of them.
    Data(bytes::Bytes),
    /// This many bytes read as zeros.
    Zero(u64),
}

/// One changed extent of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Index into [`CycleHeader::disks`].
    pub disk: u32,
    /// Byte offset in the disk.
    pub offset: u64,
    /// The new content.
    pub data: ExtentData,
}

impl Extent {
    /// Number of bytes the extent covers.
    pub fn len(&self) -> u64 {
        match &self.data {
            ExtentData::Data(b) => b.len() as u64,
            ExtentData::Zero(n) => *n,
        }
    }

    /// True when the extent covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The extent's checksum, see [`checksum`].
    pub fn checksum(&self) -> [u8; 32] {
        checksum(self.disk, self.offset, &self.data)
    }
}

/// Per-extent checksum: BLAKE3 over disk index, offset, kind, length and data (little endian),
/// so that a payload moved to another place or disk does not verify either.
pub fn checksum(disk: u32, offset: u64, data: &ExtentData) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&disk.to_le_bytes());
    h.update(&offset.to_le_bytes());
    match data {
        ExtentData::Data(b) => {
            h.update(&[0u8]);
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        ExtentData::Zero(n) => {
            h.update(&[1u8]);
            h.update(&n.to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_binds_place_and_kind() {
        let d = ExtentData::Data(bytes::Bytes::from_static(&[0u8; 8]));
        let z = ExtentData::Zero(8);
        assert_ne!(checksum(0, 0, &d), checksum(0, 0, &z));
        assert_ne!(checksum(0, 0, &d), checksum(0, 8, &d));
        assert_ne!(checksum(0, 0, &d), checksum(1, 0, &d));
        assert_eq!(
            checksum(2, 4096, &z),
            checksum(2, 4096, &ExtentData::Zero(8))
        );
    }

    #[test]
    fn header_round_trips_as_json() {
        let h = CycleHeader {
            vm: Uuid::nil(),
            id: 7,
            base: Some(6),
            kind: CycleKind::Incremental,
            consistency: CycleConsistency::AppConsistent,
            taken_at_ms: 1,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                size: 1 << 30,
            }],
        };
        let s = serde_json::to_string(&h).expect("serialize");
        assert!(s.contains("\"app-consistent\""));
        let back: CycleHeader = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, h);
    }
}
