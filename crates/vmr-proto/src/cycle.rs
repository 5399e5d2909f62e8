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
    /// The consistency group point this cycle's cut belongs to (docs/groups.md); absent for
    /// a cut of its own (and from older primaries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupTag>,
}

/// The group point a member's cycle belongs to: its members were cut inside one pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupTag {
    /// The group's name.
    pub group: String,
    /// The group point's id (the coordinator's clock at the round's start, ms).
    pub point: u64,
    /// Every member's VM UUID: the group point is complete when each holds its point.
    pub members: Vec<Uuid>,
}

/// Largest cycle id a replica accepts: ids stay exact as JSON numbers in every parser and as
/// SQLite integers, and a primary counting up one per cycle never reaches it.
pub const MAX_CYCLE_ID: CycleId = (1 << 53) - 1;
/// Most disks one cycle may describe.
pub const MAX_DISKS: usize = 64;
/// Largest virtual disk size a replica accepts: 2 PiB, the largest qcow2 image with the
/// default 64 KiB clusters (the replica's layers are qcow2).
pub const MAX_DISK_SIZE: u64 = 1 << 51;
/// Longest disk id, in bytes.
pub const MAX_DISK_ID_LEN: usize = 128;

/// Why a cycle header can never be applied (checked before anything is admitted or written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header lists no disk.
    #[error("the cycle has no disks")]
    NoDisks,
    /// More disks than [`MAX_DISKS`].
    #[error("the cycle has {count} disks; at most {MAX_DISKS} are accepted")]
    TooManyDisks {
        /// How many the header lists.
        count: usize,
    },
    /// A disk id that is empty, too long, starts with a dot or has characters other than
    /// `[A-Za-z0-9._-]`.
    #[error("disk id {id:?} is invalid (1 to 128 of [A-Za-z0-9._-], not starting with '.')")]
    BadDiskId {
        /// The id.
        id: String,
    },
    /// The same disk id twice.
    #[error("disk id {id:?} is repeated")]
    RepeatedDisk {
        /// The id.
        id: String,
    },
    /// A disk of size 0 or above [`MAX_DISK_SIZE`].
    #[error("disk {id:?} has size {size}; sizes from 1 to {MAX_DISK_SIZE} bytes are accepted")]
    DiskSize {
        /// The disk id.
        id: String,
        /// The size given.
        size: u64,
    },
    /// A cycle id of 0 or above [`MAX_CYCLE_ID`].
    #[error("cycle id {id} is out of range (1 to {MAX_CYCLE_ID})")]
    CycleId {
        /// The id given.
        id: CycleId,
    },
    /// A full cycle with a base, or another kind without one.
    #[error("a {kind:?} cycle {} a base", if *.kind == CycleKind::Full { "has no" } else { "needs" })]
    BaseKind {
        /// The cycle's kind.
        kind: CycleKind,
    },
    /// A base that is not older than the cycle.
    #[error("base {base} is not older than cycle {id}")]
    BaseNotOlder {
        /// The cycle's id.
        id: CycleId,
        /// Its base.
        base: CycleId,
    },
}

/// True when `id` is an acceptable disk id (see [`HeaderError::BadDiskId`]).
pub fn valid_disk_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DISK_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks a VM's list of disk ids (of a cycle header or a `create-replica` call): 1 to
/// [`MAX_DISKS`] valid, distinct ids.
pub fn check_disk_ids<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> Result<(), HeaderError> {
    let count = ids.len();
    if count == 0 {
        return Err(HeaderError::NoDisks);
    }
    if count > MAX_DISKS {
        return Err(HeaderError::TooManyDisks { count });
    }
    let mut seen = Vec::with_capacity(count);
    for id in ids {
        if !valid_disk_id(id) {
            return Err(HeaderError::BadDiskId { id: id.to_owned() });
        }
        if seen.contains(&id) {
            return Err(HeaderError::RepeatedDisk { id: id.to_owned() });
        }
        seen.push(id);
    }
    Ok(())
}

/// Checks a cycle's disks: [`check_disk_ids`], and sizes from 1 to [`MAX_DISK_SIZE`].
pub fn check_disks(disks: &[DiskInfo]) -> Result<(), HeaderError> {
    check_disk_ids(disks.iter().map(|d| d.id.as_str()))?;
    match disks.iter().find(|d| d.size == 0 || d.size > MAX_DISK_SIZE) {
        Some(d) => Err(HeaderError::DiskSize {
            id: d.id.clone(),
            size: d.size,
        }),
        None => Ok(()),
    }
}

impl CycleHeader {
    /// Checks the bounds every applicable header keeps: 1 to [`MAX_DISKS`] disks with valid,
    /// distinct ids and sizes from 1 to [`MAX_DISK_SIZE`]; an id from 1 to [`MAX_CYCLE_ID`];
    /// a base exactly when the kind needs one, older than the cycle. (Extents are checked
    /// against these disk sizes as they arrive.)
    pub fn check(&self) -> Result<(), HeaderError> {
        check_disks(&self.disks)?;
        if self.id == 0 || self.id > MAX_CYCLE_ID {
            return Err(HeaderError::CycleId { id: self.id });
        }
        match (self.kind, self.base) {
            (CycleKind::Full, None) => Ok(()),
            (CycleKind::Full, Some(_)) | (_, None) => {
                Err(HeaderError::BaseKind { kind: self.kind })
            }
            (_, Some(base)) if base >= self.id => {
                Err(HeaderError::BaseNotOlder { id: self.id, base })
            }
            _ => Ok(()),
        }
    }
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

/// Size of the blocks that the block checksum scheme, the replica's block-hash index and a
/// resynchronisation's comparison hash one by one (each its own BLAKE3 hash).
pub const HASH_BLOCK: u64 = 64 << 10;

/// How the checksum of an extent is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumScheme {
    /// [`checksum`]: BLAKE3 over place, kind, length and all the data in one message. Cycle
    /// bodies of stream version 1 (peer protocols 1-3) and the staging format.
    Whole,
    /// [`checksum_blocks`]: BLAKE3 over a domain tag, place, kind, length and the BLAKE3 hash
    /// of each piece of the data cut at [`HASH_BLOCK`] boundaries of the disk. Cycle bodies of
    /// stream version 2 (peer protocol 4). Verifying it yields the hash of every whole block
    /// the extent covers in the same pass over the data, which the replica's block-hash index
    /// needs: one BLAKE3 pass per byte on the replica instead of two.
    Blocks,
}

/// Domain tag of [`ChecksumScheme::Blocks`], so that its checksums can never equal a
/// [`ChecksumScheme::Whole`] checksum of other data.
const BLOCKS_TAG: &[u8] = b"vmreplica extent checksum, blocks of 65536\0";

/// The [`ChecksumScheme::Blocks`] checksum of an extent and the hash of every whole
/// [`HASH_BLOCK`] block it covers, as `(block index in the disk, BLAKE3 of the block)`.
pub fn checksum_blocks(
    disk: u32,
    offset: u64,
    data: &ExtentData,
) -> ([u8; 32], Vec<(u64, [u8; 32])>) {
    let mut h = blake3::Hasher::new();
    h.update(BLOCKS_TAG);
    h.update(&disk.to_le_bytes());
    h.update(&offset.to_le_bytes());
    let mut whole = Vec::new();
    match data {
        ExtentData::Data(b) => {
            h.update(&[0u8]);
            h.update(&(b.len() as u64).to_le_bytes());
            let mut pos = 0usize;
            while pos < b.len() {
                let at = offset + pos as u64;
                let to_boundary = (HASH_BLOCK - at % HASH_BLOCK) as usize;
                let n = to_boundary.min(b.len() - pos);
                let piece = *blake3::hash(&b[pos..pos + n]).as_bytes();
                h.update(&piece);
                if n as u64 == HASH_BLOCK {
                    whole.push((at / HASH_BLOCK, piece));
                }
                pos += n;
            }
        }
        ExtentData::Zero(n) => {
            h.update(&[1u8]);
            h.update(&n.to_le_bytes());
        }
    }
    (*h.finalize().as_bytes(), whole)
}

/// The checksum of an extent did not match the one it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("checksum mismatch in the extent of disk {disk} at offset {offset}")]
pub struct ChecksumMismatch {
    /// The extent's disk index.
    pub disk: u32,
    /// The extent's offset.
    pub offset: u64,
}

/// An extent whose checksum was verified against the one it arrived with, or computed from
/// data read locally: the only way to hand an extent to the replica store, so that each byte
/// is verified exactly once on its way (the decoder of a cycle body verifies; the store
/// trusts a `CheckedExtent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedExtent {
    extent: Extent,
    checksum: [u8; 32],
    scheme: ChecksumScheme,
    blocks: Option<Vec<(u64, [u8; 32])>>,
}

impl CheckedExtent {
    /// Computes the checksum of `extent` (data this process read itself).
    pub fn compute(extent: Extent, scheme: ChecksumScheme) -> CheckedExtent {
        let (checksum, blocks) = match (scheme, &extent.data) {
            (ChecksumScheme::Blocks, ExtentData::Data(_)) => {
                let (c, b) = checksum_blocks(extent.disk, extent.offset, &extent.data);
                (c, Some(b))
            }
            (ChecksumScheme::Blocks, ExtentData::Zero(_)) => (
                checksum_blocks(extent.disk, extent.offset, &extent.data).0,
                None,
            ),
            (ChecksumScheme::Whole, _) => (extent.checksum(), None),
        };
        CheckedExtent {
            extent,
            checksum,
            scheme,
            blocks,
        }
    }

    /// Verifies `extent` against `expected` under `scheme`.
    pub fn verify(
        extent: Extent,
        expected: [u8; 32],
        scheme: ChecksumScheme,
    ) -> Result<CheckedExtent, ChecksumMismatch> {
        let c = CheckedExtent::compute(extent, scheme);
        if c.checksum == expected {
            Ok(c)
        } else {
            Err(ChecksumMismatch {
                disk: c.extent.disk,
                offset: c.extent.offset,
            })
        }
    }

    /// The extent.
    pub fn extent(&self) -> &Extent {
        &self.extent
    }

    /// Its checksum (under [`CheckedExtent::scheme`]).
    pub fn checksum(&self) -> [u8; 32] {
        self.checksum
    }

    /// The scheme it was checked with.
    pub fn scheme(&self) -> ChecksumScheme {
        self.scheme
    }

    /// The hash of every whole [`HASH_BLOCK`] block of a data extent, `(block index, hash)`,
    /// when the checksum scheme produced them ([`ChecksumScheme::Blocks`]); `None` otherwise
    /// (and for zero extents).
    pub fn block_hashes(&self) -> Option<&[(u64, [u8; 32])]> {
        self.blocks.as_deref()
    }

    /// The extent, giving up the rest.
    pub fn into_extent(self) -> Extent {
        self.extent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_checksum_yields_whole_block_hashes_and_binds_place() {
        let data: Vec<u8> = (0..(3 * HASH_BLOCK as usize))
            .map(|i| (i % 251) as u8)
            .collect();
        let b = bytes::Bytes::from(data);
        // Unaligned: a partial piece, one whole block, a partial piece.
        let off = HASH_BLOCK / 2;
        let d = ExtentData::Data(b.slice(..2 * HASH_BLOCK as usize));
        let (c, whole) = checksum_blocks(0, off, &d);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, 1);
        let blk = &b[(HASH_BLOCK / 2) as usize..(HASH_BLOCK / 2 + HASH_BLOCK) as usize];
        assert_eq!(whole[0].1, *blake3::hash(blk).as_bytes());
        assert_ne!(c, checksum_blocks(0, off + 1, &d).0);
        assert_ne!(c, checksum_blocks(1, off, &d).0);
        assert_ne!(c, checksum(0, off, &d));
        // Aligned: every block whole.
        let d3 = ExtentData::Data(b.clone());
        let (_, w3) = checksum_blocks(2, 0, &d3);
        assert_eq!(w3.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        // Zeros: no blocks; different from data and from the whole scheme.
        let z = ExtentData::Zero(HASH_BLOCK);
        assert!(checksum_blocks(0, 0, &z).1.is_empty());
        assert_ne!(checksum_blocks(0, 0, &z).0, checksum(0, 0, &z));
    }

    #[test]
    fn checked_extent_verifies_under_its_scheme_only() {
        let e = Extent {
            disk: 0,
            offset: 0,
            data: ExtentData::Data(bytes::Bytes::from(vec![7u8; 100_000])),
        };
        for scheme in [ChecksumScheme::Whole, ChecksumScheme::Blocks] {
            let good = CheckedExtent::compute(e.clone(), scheme);
            let ok = CheckedExtent::verify(e.clone(), good.checksum(), scheme).expect("verifies");
            assert_eq!(ok, good);
            let mut bad = good.checksum();
            bad[0] ^= 1;
            assert_eq!(
                CheckedExtent::verify(e.clone(), bad, scheme),
                Err(ChecksumMismatch { disk: 0, offset: 0 })
            );
        }
        let blocks = CheckedExtent::compute(e.clone(), ChecksumScheme::Blocks);
        assert_eq!(blocks.block_hashes().map(<[_]>::len), Some(1));
        assert!(
            CheckedExtent::compute(e, ChecksumScheme::Whole)
                .block_hashes()
                .is_none()
        );
    }

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

    fn hdr(
        id: CycleId,
        base: Option<CycleId>,
        kind: CycleKind,
        disks: &[(&str, u64)],
    ) -> CycleHeader {
        CycleHeader {
            vm: Uuid::nil(),
            id,
            base,
            kind,
            consistency: CycleConsistency::CrashConsistent,
            taken_at_ms: 1,
            disks: disks
                .iter()
                .map(|(id, size)| DiskInfo {
                    id: (*id).into(),
                    size: *size,
                })
                .collect(),
            group: None,
        }
    }

    #[test]
    fn header_bounds_table() {
        use CycleKind::{Full, Incremental as Inc, Resync};
        let d0 = [("disk0", 1u64 << 30)];
        let many: Vec<(String, u64)> = (0..=MAX_DISKS).map(|i| (format!("d{i}"), 512)).collect();
        let many: Vec<(&str, u64)> = many.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let long = "x".repeat(MAX_DISK_ID_LEN + 1);
        let ok = |r: Result<(), HeaderError>| r.is_ok();
        // (header, accepted)
        let rows: Vec<(CycleHeader, bool)> = vec![
            (hdr(1, None, Full, &d0), true),
            (hdr(2, Some(1), Inc, &d0), true),
            (hdr(9, Some(3), Resync, &d0), true),
            (hdr(MAX_CYCLE_ID, Some(MAX_CYCLE_ID - 1), Inc, &d0), true),
            (hdr(MAX_CYCLE_ID + 1, Some(1), Inc, &d0), false),
            (hdr(u64::MAX, Some(1), Inc, &d0), false),
            (hdr(u64::MAX, None, Full, &d0), false),
            (hdr(0, None, Full, &d0), false),
            (hdr(2, Some(2), Inc, &d0), false),
            (hdr(2, Some(3), Inc, &d0), false),
            (hdr(2, None, Inc, &d0), false),
            (hdr(2, None, Resync, &d0), false),
            (hdr(2, Some(1), Full, &d0), false),
            (hdr(1, None, Full, &[]), false),
            (hdr(1, None, Full, &many[..MAX_DISKS]), true),
            (hdr(1, None, Full, &many), false),
            (hdr(1, None, Full, &[("disk0", MAX_DISK_SIZE)]), true),
            (hdr(1, None, Full, &[("disk0", MAX_DISK_SIZE + 1)]), false),
            (hdr(1, None, Full, &[("disk0", 1 << 63)]), false),
            (hdr(1, None, Full, &[("disk0", u64::MAX)]), false),
            (hdr(1, None, Full, &[("disk0", 0)]), false),
            (hdr(1, None, Full, &[("", 512)]), false),
            (hdr(1, None, Full, &[("../etc", 512)]), false),
            (hdr(1, None, Full, &[(".hidden", 512)]), false),
            (hdr(1, None, Full, &[("a/b", 512)]), false),
            (hdr(1, None, Full, &[(long.as_str(), 512)]), false),
            (hdr(1, None, Full, &[("a", 512), ("a", 512)]), false),
        ];
        for (h, want) in &rows {
            assert_eq!(ok(h.check()), *want, "{h:?}: {:?}", h.check());
        }
        assert_eq!(
            hdr(1, None, Full, &[("disk0", 1 << 63)]).check(),
            Err(HeaderError::DiskSize {
                id: "disk0".into(),
                size: 1 << 63
            })
        );
        assert!(
            HeaderError::CycleId { id: u64::MAX }
                .to_string()
                .contains("out of range")
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
            group: None,
        };
        let s = serde_json::to_string(&h).expect("serialize");
        assert!(s.contains("\"app-consistent\""));
        let back: CycleHeader = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, h);
    }
}
