//! Block hashes of a recovery point, for resynchronisation: BLAKE3 of each fixed-size block of
//! one disk as the point shows it (through its qcow2 chain), computed by reading the point's
//! layer through a read-only, lock-free `qemu-nbd`. The primary computes the same hashes over
//! its point-in-time view and ships only the blocks whose hashes differ.
//!
//! A block is `[i × block_size, min((i + 1) × block_size, disk_size))` where `disk_size` is the
//! size the *caller* names (the primary's current size): bytes beyond the point's own disk size,
//! and every byte of a disk the point does not have, read as zeros. Ranges that block status
//! reports as zero are hashed without being read. Reads are pipelined (up to
//! [`READS_IN_FLIGHT`] pieces of at most [`PIECE`] bytes), so memory stays bounded.
//!
//! `Store::resync_hashes` (`store/resync.rs`) first answers from the point's block-hash index
//! (`crate::hash_index`, `store/indexed.rs`), reading only the blocks the index does not know;
//! without a usable index it reads and hashes the whole range as described above. This module
//! knows nothing of the store: it hashes what it is given.

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use vmr_proto::CycleId;

use crate::error::{HashRequestFault, StoreError};
use crate::qemu::Export;

/// The resync block size (bytes): the block the primary and the replica hash and compare, the
/// block of the replica's hash index. The dirty-bitmap granularity and qcow2 cluster size, so a
/// guest write of one cluster costs one block (measured choice: `docs/resync.md`).
pub const BLOCK_SIZE: u64 = vmr_proto::HASH_BLOCK;
/// Smallest block size accepted.
pub const MIN_BLOCK: u64 = 4 << 10;
/// Largest block size accepted.
pub const MAX_BLOCK: u64 = 4 << 20;
/// Most hashes returned by one `Store::resync_hashes` call.
pub const MAX_BLOCKS_PER_CALL: u64 = 16384;
/// Bytes read per NBD request.
pub const PIECE: u64 = 4 << 20;
/// NBD reads outstanding at once.
pub const READS_IN_FLIGHT: usize = 8;

/// The hashes of a run of blocks of one disk of a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    /// The point they describe.
    pub point: CycleId,
    /// The point's size of this disk (0 when the point has no such disk).
    pub point_disk_size: u64,
    /// One BLAKE3 hash per block, from the first block asked for.
    pub hashes: Vec<[u8; 32]>,
    /// How many of them came from the point's hash index without reading the disk (0 when
    /// the index was not usable and every block was read).
    pub indexed: u64,
}

/// BLAKE3 of `len` zero bytes.
pub fn zero_hash(len: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// Hash `data` (which starts at block `first`'s start) block by block; the last block may be
/// short (end of disk).
pub fn hash_blocks(data: &[u8], block_size: u64) -> Vec<[u8; 32]> {
    data.chunks(block_size.max(1) as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

/// Check a hash request's shape; returns the number of blocks it covers.
pub fn check_request(
    disk_size: u64,
    block_size: u64,
    first_block: u64,
    count: u64,
) -> Result<u64, StoreError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(StoreError::BadHashRequest(HashRequestFault::BlockSize {
            size: block_size,
            min: MIN_BLOCK,
            max: MAX_BLOCK,
        }));
    }
    if count == 0 || count > MAX_BLOCKS_PER_CALL {
        return Err(StoreError::BadHashRequest(HashRequestFault::Count {
            count,
            max: MAX_BLOCKS_PER_CALL,
        }));
    }
    let blocks = disk_size.div_ceil(block_size);
    match first_block.checked_add(count) {
        Some(end) if end <= blocks => Ok(count),
        _ => Err(StoreError::BadHashRequest(HashRequestFault::Beyond {
            first: first_block,
            count,
            blocks,
        })),
    }
}

/// Hash `count` blocks from `first_block` of a disk of `disk_size` bytes whose content is
/// `layer` (of `layer_size` bytes; zeros beyond it, all zeros without a layer).
pub(crate) async fn hash_layer(
    root: &std::path::Path,
    layer: Option<&std::path::Path>,
    layer_size: u64,
    disk_size: u64,
    block_size: u64,
    first_block: u64,
    count: u64,
) -> Result<Vec<[u8; 32]>, StoreError> {
    let start = first_block * block_size;
    let end = ((first_block + count) * block_size).min(disk_size);
    // The part of the range the point has data for; the rest is zeros.
    let data_end = end.min(layer_size);
    // Blocks overlapping the point's disk are read (a block the point's disk ends inside
    // gets a zero tail); blocks wholly beyond it read as zeros.
    let read_end = end.min(data_end.div_ceil(block_size) * block_size);
    let mut hashes = Vec::with_capacity(count as usize);
    if start < read_end {
        let Some(layer) = layer else {
            return Err(StoreError::NoLayerToHash);
        };
        let x =
            Export::start_read_only(root, layer, vec![vmr_nbd::BASE_ALLOCATION.to_owned()]).await?;
        let span = Span {
            start,
            end: read_end,
            data_end,
            block_size,
        };
        let r = read_hashes(&x, layer, &[span], &mut hashes).await;
        x.abort().await;
        r?;
    }
    let mut pos = start + hashes.len() as u64 * block_size;
    while pos < end {
        let n = (end - pos).min(block_size);
        hashes.push(zero_hash(n));
        pos += n;
    }
    Ok(hashes)
}

/// A block-aligned range to hash.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    /// First byte (block aligned).
    pub(crate) start: u64,
    /// End of the hashed range (block aligned, or the caller's disk end).
    pub(crate) end: u64,
    /// End of the point's data; bytes from here to `end` are zeros.
    pub(crate) data_end: u64,
    pub(crate) block_size: u64,
}

/// Hash the blocks of each of `spans` (all of one block size) of an export, in order,
/// appending to `out`. Reads are pipelined across spans.
pub(crate) async fn read_hashes(
    x: &Export,
    layer: &std::path::Path,
    spans: &[Span],
    out: &mut Vec<[u8; 32]>,
) -> Result<(), StoreError> {
    let what = layer.display().to_string();
    let Some(bs) = spans.first().map(|s| s.block_size) else {
        return Ok(());
    };
    let piece = PIECE.max(bs);
    // (offset, length, bytes of data before the zero tail) of every piece, in order.
    let mut pieces = spans.iter().flat_map(|s| {
        let mut next = s.start;
        std::iter::from_fn(move || {
            (next < s.end).then(|| {
                let (off, len) = (next, (s.end - next).min(piece));
                next += len;
                (off, len, (off + len).min(s.data_end).saturating_sub(off))
            })
        })
    });
    let mut inflight = FuturesOrdered::new();
    loop {
        while inflight.len() < READS_IN_FLIGHT {
            let Some((off, len, read_len)) = pieces.next() else {
                break;
            };
            let c = x.client.clone();
            let what = what.clone();
            inflight.push_back(async move {
                let nbd = |e| StoreError::nbd(what.clone(), e);
                let zero_hashes = || {
                    let mut v = Vec::new();
                    let mut p = off;
                    while p < off + len {
                        let n = (off + len - p).min(bs);
                        v.push(zero_hash(n));
                        p += n;
                    }
                    v
                };
                if read_len == 0 {
                    return Ok(zero_hashes());
                }
                let st = c
                    .block_status(vmr_nbd::BASE_ALLOCATION, off, read_len as u32)
                    .await
                    .map_err(nbd)?;
                let mut zero_to = off;
                for e in &st {
                    if e.flags & vmr_nbd::STATE_ZERO == 0 || e.offset > zero_to {
                        break;
                    }
                    zero_to = e.offset + e.length;
                }
                if zero_to >= off + read_len {
                    return Ok(zero_hashes());
                }
                let data = c.read(off, read_len as u32).await.map_err(nbd)?;
                let mut buf = data.to_vec();
                buf.resize(len as usize, 0);
                Ok::<_, StoreError>(hash_blocks(&buf, bs))
            });
        }
        match inflight.next().await {
            Some(r) => out.extend(r?),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_hash_matches_hashing_zeros() {
        assert_eq!(zero_hash(65536), *blake3::hash(&[0u8; 65536]).as_bytes());
        assert_eq!(
            zero_hash(100_000),
            *blake3::hash(&vec![0u8; 100_000]).as_bytes()
        );
        assert_eq!(zero_hash(0), *blake3::hash(&[]).as_bytes());
    }

    #[test]
    fn blocks_split_with_short_tail() {
        let data = vec![7u8; 10_000];
        let h = hash_blocks(&data, 4096);
        assert_eq!(h.len(), 3);
        assert_eq!(h[2], *blake3::hash(&data[8192..]).as_bytes());
    }

    #[test]
    fn requests_are_bounded() {
        assert_eq!(check_request(1 << 20, 65536, 0, 16).ok(), Some(16));
        assert_eq!(check_request((1 << 20) + 1, 65536, 16, 1).ok(), Some(1));
        assert!(check_request(1 << 20, 65536, 15, 2).is_err());
        assert!(check_request(1 << 20, 65536, u64::MAX, 2).is_err());
        assert!(check_request(1 << 20, 65537, 0, 1).is_err());
        assert!(check_request(1 << 20, 1024, 0, 1).is_err());
        assert!(check_request(1 << 40, 65536, 0, MAX_BLOCKS_PER_CALL + 1).is_err());
        assert!(check_request(1 << 20, 65536, 0, 0).is_err());
    }
}
