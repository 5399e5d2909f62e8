//! The per-point block-hash index: for one disk of one recovery point, the BLAKE3 hash of
//! every [`BLOCK_SIZE`] block, so that a resynchronisation's `resync-hashes` is answered
//! without reading the disk. This module owns the in-memory form ([`Index`], [`Entry`]), the
//! versioned, checksummed file format (`docs/replica-store.md` §2.3), the entries one extent
//! of a cycle yields ([`extent_entries`]) and what a cycle writer gathers ([`Updates`]); the
//! store glue (building a point's index at commit, pruning, answering hashes, learning the
//! index of a point that has none from a complete read) is `store/indexed.rs`.
//!
//! The index is an optimisation, never a source of truth: an entry is either exact or
//! [`Entry::Unknown`] (then the block is read), and a file that is missing, damaged, of another
//! version or of another point is simply not used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vmr_proto::{CycleId, Extent, ExtentData};

pub use crate::hashes::BLOCK_SIZE;

/// Directory of the index files, under the VM's directory: `hash-index/<disk>/c<id>.hidx`.
pub(crate) const DIR: &str = "hash-index";
/// Suffix of an index file.
pub(crate) const SUFFIX: &str = ".hidx";
/// Largest disk indexed, in blocks (256 GiB of 64 KiB blocks: an index of at most 132 MiB).
/// A larger disk gets no index (its resyncs read the disk).
pub const MAX_BLOCKS: u64 = 4 << 20;

const MAGIC: &[u8; 8] = b"VMRHASHX";
/// The file format version written and accepted.
pub const VERSION: u32 = 1;
const TAG_ZERO: u8 = 0;
const TAG_UNKNOWN: u8 = 1;
const TAG_HASH: u8 = 2;
/// Header bytes before the disk id: magic, version, block size, vm, point, disk size, blocks,
/// disk id length.
const FIXED_HEADER: usize = 8 + 4 + 4 + 16 + 8 + 8 + 8 + 1;

/// Why an index file is not used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The file could not be read (missing, unreadable).
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not an index file, or of another version or block size.
    #[error("{path}: not a block-hash index of version {VERSION} with {BLOCK_SIZE}-byte blocks")]
    Version {
        /// The file.
        path: PathBuf,
    },
    /// The trailing checksum does not match the content.
    #[error("{path}: checksum mismatch")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// Truncated, too long, or an unknown entry tag.
    #[error("{path}: malformed ({what})")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// A valid index, but of another VM, point, disk or disk size.
    #[error("{path}: describes {found}, not {wanted}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What it describes.
        found: String,
        /// What was looked for.
        wanted: String,
    },
    /// The disk has more blocks than an index holds ([`MAX_BLOCKS`]).
    #[error("a disk of {0} bytes is too large to index")]
    TooLarge(u64),
}

/// What the index knows of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The block is all zeros.
    Zero,
    /// Not known (partly written by an extent, the short last block of a disk, or written by
    /// an earlier attempt of a resumed resync): read the block to hash it.
    Unknown,
    /// BLAKE3 of the whole block.
    Hash([u8; 32]),
}

/// The index of one disk of one point: one [`Entry`] per block of `size` bytes (the last,
/// short block of a disk whose size is not a multiple of [`BLOCK_SIZE`] is always
/// [`Entry::Unknown`], so every known hash is of a whole block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The VM.
    pub vm: Uuid,
    /// The point.
    pub point: CycleId,
    /// The disk id.
    pub disk: String,
    /// The point's size of the disk.
    pub size: u64,
    /// One entry per block.
    pub entries: Vec<Entry>,
}

fn blocks_of(size: u64) -> Result<u64, IndexError> {
    let n = size.div_ceil(BLOCK_SIZE);
    if n > MAX_BLOCKS {
        return Err(IndexError::TooLarge(size));
    }
    Ok(n)
}

impl Index {
    /// The index of an all-zero disk (a layer without backing before any write).
    pub fn zero(vm: Uuid, point: CycleId, disk: &str, size: u64) -> Result<Index, IndexError> {
        let mut i = Index {
            vm,
            point,
            disk: disk.to_owned(),
            size: 0,
            entries: Vec::new(),
        };
        i.grow(size)?;
        Ok(i)
    }

    /// The disk grew to `size` (never shrinks): the new area reads as zeros.
    pub fn grow(&mut self, size: u64) -> Result<(), IndexError> {
        if size <= self.size {
            return Ok(());
        }
        let n = blocks_of(size)?;
        self.entries.resize(n as usize, Entry::Zero);
        self.size = size;
        if !size.is_multiple_of(BLOCK_SIZE)
            && let Some(last) = self.entries.last_mut()
        {
            *last = Entry::Unknown;
        }
        Ok(())
    }

    /// Set one block's entry; a short last block stays unknown, blocks beyond the disk are
    /// ignored.
    pub fn set(&mut self, block: u64, e: Entry) {
        let whole = self.size / BLOCK_SIZE;
        if block < whole {
            self.entries[block as usize] = e;
        } else if let Some(x) = self.entries.get_mut(block as usize) {
            *x = Entry::Unknown;
        }
    }

    /// Mark every block overlapping `[offset, offset + len)` unknown.
    pub fn forget(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let end = (offset.saturating_add(len)).div_ceil(BLOCK_SIZE);
        for b in first..end.min(self.entries.len() as u64) {
            self.entries[b as usize] = Entry::Unknown;
        }
    }

    /// The file bytes (format version [`VERSION`], checksum last).
    pub fn encode(&self) -> Vec<u8> {
        let known = self
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Hash(_)))
            .count();
        let mut b = Vec::with_capacity(
            FIXED_HEADER + self.disk.len() + self.entries.len() + known * 32 + 32,
        );
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b.extend_from_slice(self.vm.as_bytes());
        b.extend_from_slice(&self.point.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        // Disk ids are at most 128 bytes (`valid_name`).
        b.push(self.disk.len().min(255) as u8);
        b.extend_from_slice(&self.disk.as_bytes()[..self.disk.len().min(255)]);
        for e in &self.entries {
            match e {
                Entry::Zero => b.push(TAG_ZERO),
                Entry::Unknown => b.push(TAG_UNKNOWN),
                Entry::Hash(h) => {
                    b.push(TAG_HASH);
                    b.extend_from_slice(h);
                }
            }
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Parse and check a file's bytes (`path` only names it in errors).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Index, IndexError> {
        let malformed = |what| IndexError::Malformed {
            path: path.to_owned(),
            what,
        };
        if bytes.len() < FIXED_HEADER + 32 || &bytes[..8] != MAGIC {
            return Err(IndexError::Version {
                path: path.to_owned(),
            });
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(IndexError::Checksum {
                path: path.to_owned(),
            });
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(8) != VERSION || u64::from(u32_at(12)) != BLOCK_SIZE {
            return Err(IndexError::Version {
                path: path.to_owned(),
            });
        }
        let mut vm = [0u8; 16];
        vm.copy_from_slice(&body[16..32]);
        let point = u64_at(32);
        let size = u64_at(40);
        let blocks = u64_at(48);
        if blocks_of(size)? != blocks {
            return Err(malformed("block count does not match the disk size"));
        }
        let dlen = body[56] as usize;
        let mut pos = FIXED_HEADER;
        let disk = body
            .get(pos..pos + dlen)
            .and_then(|d| std::str::from_utf8(d).ok())
            .ok_or_else(|| malformed("disk id"))?
            .to_owned();
        pos += dlen;
        let mut entries = Vec::with_capacity(blocks as usize);
        while pos < body.len() {
            let e = match body[pos] {
                TAG_ZERO => Entry::Zero,
                TAG_UNKNOWN => Entry::Unknown,
                TAG_HASH => {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(
                        body.get(pos + 1..pos + 33)
                            .ok_or_else(|| malformed("truncated hash"))?,
                    );
                    pos += 32;
                    Entry::Hash(h)
                }
                _ => return Err(malformed("unknown entry tag")),
            };
            pos += 1;
            entries.push(e);
        }
        if entries.len() as u64 != blocks {
            return Err(malformed("entry count"));
        }
        Ok(Index {
            vm: Uuid::from_bytes(vm),
            point,
            disk,
            size,
            entries,
        })
    }
}

/// The index file of `disk` at `point` under the VM directory `vm_dir`.
pub(crate) fn path(vm_dir: &Path, disk: &str, point: CycleId) -> PathBuf {
    vm_dir
        .join(DIR)
        .join(disk)
        .join(format!("c{point:06}{SUFFIX}"))
}

/// The point id an index file name names (`c<id>.hidx`).
pub(crate) fn point_of(name: &str) -> Option<CycleId> {
    name.strip_prefix('c')?.strip_suffix(SUFFIX)?.parse().ok()
}

/// Read the index of `disk` at `point` of `vm`, whose size the catalog says is `size`; any
/// difference (VM, point, disk, size, version, checksum) is an error and the index unused.
pub fn load(
    vm_dir: &Path,
    vm: Uuid,
    disk: &str,
    point: CycleId,
    size: u64,
) -> Result<Index, IndexError> {
    let p = path(vm_dir, disk, point);
    let read = |source| IndexError::Read {
        path: p.clone(),
        source,
    };
    let blocks = blocks_of(size)?;
    let max = FIXED_HEADER as u64 + 255 + blocks * 33 + 32;
    let len = std::fs::metadata(&p).map_err(read)?.len();
    if len > max {
        return Err(IndexError::Malformed {
            path: p,
            what: "too long for the disk",
        });
    }
    let bytes = std::fs::read(&p).map_err(read)?;
    let i = Index::decode(&p, &bytes)?;
    if i.vm != vm || i.point != point || i.disk != disk || i.size != size {
        return Err(IndexError::Mismatch {
            path: p,
            found: format!(
                "vm {} point {} disk {} of {}",
                i.vm, i.point, i.disk, i.size
            ),
            wanted: format!("vm {vm} point {point} disk {disk} of {size}"),
        });
    }
    Ok(i)
}

/// The entries one extent of a cycle yields, in block order: every whole block it covers
/// (its hash, or [`Entry::Zero`] for a zero extent) and [`Entry::Unknown`] for a block it
/// covers only partly. One BLAKE3 pass over a data extent.
pub fn extent_entries(e: &Extent) -> Vec<(u64, Entry)> {
    let len = e.len();
    if len == 0 {
        return Vec::new();
    }
    let start = e.offset;
    let end = start + len;
    let first = start / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    let mut out = Vec::with_capacity((last - first + 1) as usize);
    for b in first..=last {
        let (bs, be) = (b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
        let entry = if bs < start || be > end {
            Entry::Unknown
        } else {
            match &e.data {
                ExtentData::Zero(_) => Entry::Zero,
                ExtentData::Data(d) => {
                    let o = (bs - start) as usize;
                    Entry::Hash(*blake3::hash(&d[o..o + BLOCK_SIZE as usize]).as_bytes())
                }
            }
        };
        out.push((b, entry));
    }
    out
}

/// The entries of [`extent_entries`] from the whole-block hashes a block checksum yielded
/// ([`vmr_proto::CheckedExtent::block_hashes`]), without a pass over the data: a block the
/// list holds is `Hash`, every other block the extent touches (only partly) is `Unknown`.
pub fn entries_from_blocks(e: &Extent, blocks: &[(u64, [u8; 32])]) -> Vec<(u64, Entry)> {
    let len = e.len();
    if len == 0 {
        return Vec::new();
    }
    let first = e.offset / BLOCK_SIZE;
    let last = (e.offset + len - 1) / BLOCK_SIZE;
    let mut known = blocks.iter().peekable();
    (first..=last)
        .map(|b| {
            while known.next_if(|(k, _)| *k < b).is_some() {}
            match known.next_if(|(k, _)| *k == b) {
                Some((_, h)) => (b, Entry::Hash(*h)),
                None => (b, Entry::Unknown),
            }
        })
        .collect()
}

/// What a cycle writer gathered: per disk of the cycle, the latest entry of each block an
/// extent touched (later extents win, as they do on disk).
#[derive(Debug, Default)]
pub(crate) struct Updates {
    per_disk: Vec<BTreeMap<u64, Entry>>,
    /// The cycle continues an interrupted resync's layers: what earlier attempts wrote there
    /// is not in these updates.
    pub(crate) resumed: bool,
}

impl Updates {
    /// Updates of a cycle of `disks` disks.
    pub(crate) fn new(disks: usize, resumed: bool) -> Updates {
        Updates {
            per_disk: vec![BTreeMap::new(); disks],
            resumed,
        }
    }

    /// Record one extent's entries (in the order the extents were written).
    pub(crate) fn record(&mut self, disk: u32, entries: Vec<(u64, Entry)>) {
        if let Some(m) = self.per_disk.get_mut(disk as usize) {
            m.extend(entries);
        }
    }

    /// Apply disk `disk`'s updates to `index`.
    pub(crate) fn apply(&self, disk: usize, index: &mut Index) {
        if let Some(m) = self.per_disk.get(disk) {
            for (b, e) in m {
                index.set(*b, *e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_from_blocks_equal_a_pass_over_the_data() {
        let data: Vec<u8> = (0..(3 * BLOCK_SIZE as usize + 100))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        for offset in [0, BLOCK_SIZE / 2, BLOCK_SIZE, 5 * BLOCK_SIZE - 100] {
            let e = Extent {
                disk: 0,
                offset,
                data: ExtentData::Data(bytes::Bytes::from(data.clone())),
            };
            let c = vmr_proto::CheckedExtent::compute(e.clone(), vmr_proto::ChecksumScheme::Blocks);
            let blocks = c.block_hashes().expect("block hashes");
            assert_eq!(
                entries_from_blocks(&e, blocks),
                extent_entries(&e),
                "offset {offset}"
            );
        }
    }
    use bytes::Bytes;

    fn data(offset: u64, len: usize, fill: u8) -> Extent {
        Extent {
            disk: 0,
            offset,
            data: ExtentData::Data(Bytes::from(vec![fill; len])),
        }
    }

    #[test]
    fn file_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = Uuid::from_u128(7);
        let mut i = Index::zero(vm, 9, "disk0", 5 * BLOCK_SIZE + 100).expect("zero");
        assert_eq!(i.entries.len(), 6);
        assert_eq!(i.entries[5], Entry::Unknown, "short last block");
        i.set(1, Entry::Hash([3; 32]));
        i.set(5, Entry::Hash([4; 32]));
        assert_eq!(i.entries[5], Entry::Unknown, "a short block is never known");
        let p = path(dir.path(), "disk0", 9);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let bytes = i.encode();
        std::fs::write(&p, &bytes).expect("write");
        assert_eq!(
            load(dir.path(), vm, "disk0", 9, 5 * BLOCK_SIZE + 100).expect("load"),
            i
        );
        // Another point, size, VM or disk: not used.
        assert!(matches!(
            load(dir.path(), vm, "disk0", 9, 6 * BLOCK_SIZE),
            Err(IndexError::Mismatch { .. })
        ));
        std::fs::copy(&p, path(dir.path(), "disk0", 10)).expect("copy");
        assert!(matches!(
            load(dir.path(), vm, "disk0", 10, 5 * BLOCK_SIZE + 100),
            Err(IndexError::Mismatch { .. })
        ));
        assert!(matches!(
            load(dir.path(), Uuid::nil(), "disk0", 9, 5 * BLOCK_SIZE + 100),
            Err(IndexError::Mismatch { .. })
        ));
        // A flipped bit, a truncation, another version.
        let mut bad = bytes.clone();
        bad[FIXED_HEADER + 10] ^= 1;
        assert!(matches!(
            Index::decode(&p, &bad),
            Err(IndexError::Checksum { .. })
        ));
        assert!(Index::decode(&p, &bytes[..bytes.len() - 1]).is_err());
        let mut v2 = bytes[..bytes.len() - 32].to_vec();
        v2[8] = 2;
        let sum = blake3::hash(&v2);
        v2.extend_from_slice(sum.as_bytes());
        assert!(matches!(
            Index::decode(&p, &v2),
            Err(IndexError::Version { .. })
        ));
        assert!(matches!(
            load(dir.path(), vm, "disk1", 9, 100),
            Err(IndexError::Read { .. })
        ));
        assert!(matches!(
            Index::zero(vm, 1, "d", (MAX_BLOCKS + 1) * BLOCK_SIZE),
            Err(IndexError::TooLarge(_))
        ));
    }

    #[test]
    fn extents_give_whole_blocks_and_unknown_edges() {
        let bs = BLOCK_SIZE;
        // Aligned, two whole blocks.
        let e = data(bs, 2 * bs as usize, 5);
        let got = extent_entries(&e);
        let h = *blake3::hash(&vec![5u8; bs as usize]).as_bytes();
        assert_eq!(got, vec![(1, Entry::Hash(h)), (2, Entry::Hash(h))]);
        // Unaligned: partial edges unknown, the middle block hashed.
        let e = data(bs / 2, 2 * bs as usize, 6);
        let got = extent_entries(&e);
        let h = *blake3::hash(&vec![6u8; bs as usize]).as_bytes();
        assert_eq!(
            got,
            vec![
                (0, Entry::Unknown),
                (1, Entry::Hash(h)),
                (2, Entry::Unknown)
            ]
        );
        // Inside one block.
        assert_eq!(
            extent_entries(&data(bs + 10, 100, 1)),
            vec![(1, Entry::Unknown)]
        );
        // Zero extents.
        let z = Extent {
            disk: 0,
            offset: 0,
            data: ExtentData::Zero(bs + 1),
        };
        assert_eq!(
            extent_entries(&z),
            vec![(0, Entry::Zero), (1, Entry::Unknown)]
        );
    }

    #[test]
    fn growth_is_zero_and_later_extents_win() {
        let vm = Uuid::nil();
        let mut i = Index::zero(vm, 1, "d", 2 * BLOCK_SIZE + 7).expect("zero");
        i.set(0, Entry::Hash([1; 32]));
        i.grow(4 * BLOCK_SIZE).expect("grow");
        assert_eq!(
            i.entries,
            vec![
                Entry::Hash([1; 32]),
                Entry::Zero,
                Entry::Unknown,
                Entry::Zero
            ]
        );
        let mut u = Updates::new(1, false);
        u.record(0, vec![(1, Entry::Hash([2; 32])), (3, Entry::Unknown)]);
        u.record(0, vec![(1, Entry::Unknown), (3, Entry::Hash([3; 32]))]);
        u.apply(0, &mut i);
        assert_eq!(i.entries[1], Entry::Unknown);
        assert_eq!(i.entries[3], Entry::Hash([3; 32]));
        i.forget(BLOCK_SIZE * 3 + 1, 1);
        assert_eq!(i.entries[3], Entry::Unknown);
    }
}
