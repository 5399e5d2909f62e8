//! Resynchronization (`docs/resync.md`): after change tracking was lost (or the replica refused
//! a cycle's base), the primary cuts a point-in-time view with a new tracking generation
//! (`CycleMode::Resync`), hashes every block of it with BLAKE3, compares each hash with the
//! replica's hash of the same block of its latest recovery point, and ships only the blocks
//! that differ, as one `CycleKind::Resync` cycle based on that point. The replica applies it
//! into a new layer like any cycle, so every earlier point stays, and a resync that does not
//! finish changes nothing on the replica.
//!
//! A libvirt-managed VM's view is a full pull-mode backup job of its domain (no
//! `<incremental>`; the checkpoint chain starts over with the job's new checkpoint, committed
//! after the replica's acknowledgement), compared the same way.
//!
//! Both sides work at once and in bounded memory: a fetcher task asks the replica for the
//! hashes of [`CHUNK_BLOCKS`] blocks at a time (`resync-hashes` call) while the primary reads
//! and hashes its own blocks, up to two chunks ahead.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use vmr_capture::{CaptureError, CycleMode};
use vmr_core::Failure;
use vmr_proto::api::BlockHashesRequest;
use vmr_proto::peer::BlockHashes;
use vmr_proto::wire::RemoteError;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_store::hashes::zero_hash;
use vmr_transport::Client;

use crate::cycle::{CycleCtx, Outcome, Session, classify_capture, classify_transport};
use crate::util::now_ms;
use vmr_proto::record::VmRecord;

/// Block size compared (bytes): the dirty-bitmap granularity and qcow2 cluster size, so a
/// guest write of one cluster costs one block.
pub const BLOCK_SIZE: u64 = vmr_store::hashes::BLOCK_SIZE;
/// Hashes asked for per `resync-hashes` call (4096 × 64 KiB = 256 MiB of disk, 128 KiB of hashes).
pub const CHUNK_BLOCKS: u64 = 4096;
/// Test hook (cargo feature `test-hooks` only): a file of this name in the agent directory
/// holding a number of ms makes the resync sleep that long after each differing block it sends
/// (so a test can stop it mid-way).
#[cfg(feature = "test-hooks")]
const SLOW_HOOK: &str = "test-resync-slow-ms";

#[cfg(feature = "test-hooks")]
fn slow_hook(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(SLOW_HOOK))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
}

#[cfg(not(feature = "test-hooks"))]
fn slow_hook(_dir: &std::path::Path) -> Option<u64> {
    None
}

/// What one resync sent.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    scanned: u64,
    blocks_sent: u64,
    data_bytes: u64,
}

// ------------------------------------------------------------------------- replica side

/// The `resync-hashes` call on the replica: hash the asked blocks of the latest point of
/// replica VM `rec` (every acknowledged cycle is a point already).
pub(crate) async fn hashes(
    store: &vmr_store::Store,
    rec: &VmRecord,
    req: BlockHashesRequest,
) -> Result<BlockHashes, RemoteError> {
    let latest = store
        .latest_point(req.uuid)
        .map_err(crate::errors::store_err)?;
    if latest.is_none() {
        return Err(RemoteError::BadRequest {
            message: format!(
                "the replica holds no copy of VM {} to compare with: load one with `vmreplica \
                 import {} DIR` on the replica (disk images or an exported initial copy), or \
                 enable replication with --initial network",
                rec.uuid, rec.name
            ),
        });
    }
    if req.point.is_some() && req.point != latest {
        return Err(RemoteError::WrongBase {
            expected: latest,
            got: req.point,
        });
    }
    let h = if req.read {
        store
            .resync_hashes_read(
                req.uuid,
                &req.disk,
                req.disk_size,
                req.block_size,
                req.first_block,
                req.count,
            )
            .await
    } else {
        store
            .resync_hashes(
                req.uuid,
                &req.disk,
                req.disk_size,
                req.block_size,
                req.first_block,
                req.count,
            )
            .await
    };
    let h = h.map_err(|e| match e {
        vmr_store::StoreError::BadHashRequest(f) => RemoteError::BadRequest {
            message: f.to_string(),
        },
        other => crate::errors::store_err(other),
    })?;
    Ok(BlockHashes {
        point: h.point,
        point_disk_size: h.point_disk_size,
        hashes: h.hashes,
    })
}

// ------------------------------------------------------------------------- primary side

/// The replica's hashes of up to [`CHUNK_BLOCKS`] blocks of `disk` from `first_block`, of
/// its latest point (refused unless that is `point`, when given); `read`: hashed from the
/// point's data, not its block-hash index. Returns the point hashed and the hashes.
pub(crate) async fn fetch(
    client: &Client,
    uuid: uuid::Uuid,
    disk: &DiskInfo,
    first_block: u64,
    point: Option<u64>,
    read: bool,
) -> Result<(u64, Vec<[u8; 32]>), Failure> {
    let blocks = disk.size.div_ceil(BLOCK_SIZE);
    let req = BlockHashesRequest {
        uuid,
        disk: disk.id.clone(),
        disk_size: disk.size,
        block_size: BLOCK_SIZE,
        first_block,
        count: CHUNK_BLOCKS.min(blocks - first_block),
        point,
        read,
    };
    let r = client
        .resync_hashes(req)
        .await
        .map_err(classify_transport)?;
    Ok((r.point, r.hashes))
}

/// One block of the primary's view.
pub(crate) enum Block {
    Zero(u64),
    Data(Bytes),
}

/// Extents whose blocks are hashed at once (the view's reads go on meanwhile).
const HASH_AHEAD: usize = 2;
/// Blocks of at least this many data bytes in all are hashed on a blocking thread (the other
/// core), smaller batches in place.
const HASH_OFF_RUNTIME: u64 = 1 << 20;

/// A batch of blocks with the primary's hash of each.
pub(crate) type Hashed = Vec<(u64, Block, [u8; 32])>;

/// The primary's hash of every block of `blocks`.
fn hash_blocks(blocks: Vec<(u64, Block)>) -> Hashed {
    let zero_full = zero_hash(BLOCK_SIZE);
    blocks
        .into_iter()
        .map(|(index, block)| {
            let h = match &block {
                Block::Zero(n) if *n == BLOCK_SIZE => zero_full,
                Block::Zero(n) => zero_hash(*n),
                Block::Data(b) => *blake3::hash(b).as_bytes(),
            };
            (index, block, h)
        })
        .collect()
}

/// Hashing of one extent's blocks: done in place, or running on a blocking thread.
pub(crate) enum Hashing {
    Ready(Hashed),
    Running(tokio::task::JoinHandle<Hashed>),
}

impl Hashing {
    pub(crate) fn start(blocks: Vec<(u64, Block)>) -> Hashing {
        let data: u64 = blocks
            .iter()
            .map(|(_, b)| match b {
                Block::Data(d) => d.len() as u64,
                Block::Zero(_) => 0,
            })
            .sum();
        if data >= HASH_OFF_RUNTIME {
            Hashing::Running(tokio::task::spawn_blocking(move || hash_blocks(blocks)))
        } else {
            Hashing::Ready(hash_blocks(blocks))
        }
    }

    pub(crate) async fn get(self) -> Result<Hashed, Failure> {
        match self {
            Hashing::Ready(h) => Ok(h),
            Hashing::Running(j) => j
                .await
                .map_err(|e| Failure::Retryable(format!("hashing task failed: {e}"))),
        }
    }
}

/// Turns the capture's extents of one disk (in order, tiling the disk) into whole blocks.
pub(crate) struct Assembler {
    disk: u32,
    size: u64,
    pos: u64,
    buf: Option<Vec<u8>>,
}

impl Assembler {
    pub(crate) fn new(disk: u32, size: u64) -> Self {
        Assembler {
            disk,
            size,
            pos: 0,
            buf: None,
        }
    }

    fn block_len(&self, start: u64) -> u64 {
        BLOCK_SIZE.min(self.size - start)
    }

    /// Feed one extent; returns the blocks it completed as (block index, block).
    pub(crate) fn push(&mut self, e: Extent) -> Result<Vec<(u64, Block)>, Failure> {
        if e.disk != self.disk || e.offset != self.pos || e.offset + e.len() > self.size {
            return Err(Failure::Retryable(format!(
                "capture extent {}+{} of disk {} out of order (expected disk {} at {})",
                e.offset,
                e.len(),
                e.disk,
                self.disk,
                self.pos
            )));
        }
        let mut out = Vec::new();
        let mut off = 0u64;
        let total = e.len();
        while off < total {
            let start = self.pos - self.pos % BLOCK_SIZE;
            let blen = self.block_len(start);
            let in_block = self.pos - start;
            let n = (blen - in_block).min(total - off);
            match &e.data {
                ExtentData::Data(b) => {
                    let piece = b.slice(off as usize..(off + n) as usize);
                    if in_block == 0 && n == blen && self.buf.is_none() {
                        out.push((start / BLOCK_SIZE, Block::Data(piece)));
                        self.pos += n;
                        off += n;
                        continue;
                    }
                    let buf = self.buf.get_or_insert_with(|| vec![0u8; blen as usize]);
                    buf[in_block as usize..(in_block + n) as usize].copy_from_slice(&piece);
                }
                ExtentData::Zero(_) => {}
            }
            self.pos += n;
            off += n;
            if self.pos == start + blen {
                let b = match self.buf.take() {
                    Some(v) => Block::Data(Bytes::from(v)),
                    None => Block::Zero(blen),
                };
                out.push((start / BLOCK_SIZE, b));
            }
        }
        Ok(out)
    }

    pub(crate) fn done(&self) -> bool {
        self.pos == self.size
    }
}

/// Run one resync cycle. `id` is the machine's id; the cycle is renumbered after the replica's
/// latest point when needed.
pub(crate) async fn run(ctx: &CycleCtx, session: &mut Session, id: u64) -> Outcome {
    let rec = &ctx.rec;
    let Some(args) = rec.enable.clone() else {
        return Outcome::Failed(Failure::Fatal("not enabled".into()));
    };
    if ctx.last_cycle.is_none() {
        // Initial replication from an existing copy: make sure the replica VM exists.
        if let Err(f) = crate::cycle::create_replica(&ctx.host, rec, session).await {
            return Outcome::Failed(f);
        }
    }
    let slow = slow_hook(&ctx.host.dir);
    if rec.libvirt.is_some() {
        let client = match crate::cycle::client(&ctx.host, rec, session).await {
            Ok(c) => c.clone(),
            Err(f) => return Outcome::Failed(f),
        };
        return run_libvirt(ctx, session, &client, (&args, id, slow)).await;
    }
    if session.capture.is_none() {
        // Tracking is being restarted: do not insist on the old sizes.
        let mut cfg = crate::cycle::capture_config(&ctx.host, rec, ctx.slot);
        cfg.expected_sizes = None;
        match vmr_capture::VmCapture::open(cfg).await {
            Ok(c) => session.capture = Some(c),
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let client = match crate::cycle::client(&ctx.host, rec, session).await {
        Ok(c) => c.clone(),
        Err(f) => return Outcome::Failed(f),
    };
    let Some(capture) = session.capture.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let (outcome, reset_capture, reset_client) =
        resync_with(ctx, capture, &client, rec, &args, id, slow).await;
    if reset_capture {
        session.capture = None;
    }
    if reset_client {
        session.client = None;
    }
    outcome
}

/// The resync on an open capture and connection; also says whether the capture and the
/// connection must be reopened.
async fn resync_with(
    ctx: &CycleCtx,
    capture: &mut vmr_capture::VmCapture,
    client: &Client,
    rec: &VmRecord,
    args: &vmr_proto::api::EnableArgs,
    id: u64,
    slow: Option<u64>,
) -> (Outcome, bool, bool) {
    let taken_at_ms = now_ms();
    let mut cycle = match capture.begin_cycle(CycleMode::Resync).await {
        Ok(c) => c,
        Err(e) => {
            return (Outcome::Failed(classify_capture(&e)), true, false);
        }
    };
    let disks = cycle.disks().to_vec();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    let (id, produced, sent) = match compare_and_ship(
        ctx,
        client,
        rec,
        args,
        (id, taken_at_ms),
        slow,
        disks,
        &mut cycle,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => {
            let reset = cycle.abort().await.is_err();
            return (Outcome::Failed(f), reset, true);
        }
    };
    match (produced, sent) {
        (Ok(c), Ok(_ack)) => match cycle.commit().await {
            Ok(()) => (done(rec, id, c, sizes), false, false),
            Err(e) => crate::cycle::commit_failed(&e),
        },
        (p, s) => crate::cycle::failed(p, s, cycle, "resync").await,
    }
}

/// A finished resync's outcome (logged).
fn done(rec: &VmRecord, id: u64, c: Counts, sizes: Vec<u64>) -> Outcome {
    tracing::info!(
        vm = %rec.name, cycle = id, scanned = c.scanned, blocks_sent = c.blocks_sent,
        data_bytes = c.data_bytes, "resynchronization done"
    );
    Outcome::Done {
        id,
        bytes: c.data_bytes,
        sizes,
        app: false,
        pending: None,
    }
}

/// A libvirt-managed VM's resync (`rec.libvirt`): the checkpoint chain starts over with a
/// full pull-mode backup job (no `<incremental>`, a new checkpoint created atomically with
/// it), whose export is the point-in-time view hashed and compared block by block like the
/// QMP view; the job's checkpoint is committed strictly after the replica's
/// acknowledgement, so the next cycles are deltas from it. Any failure ends the job and
/// deletes its checkpoint: the next attempt is a resync again.
async fn run_libvirt(
    ctx: &CycleCtx,
    session: &mut Session,
    client: &Client,
    (args, id, slow): (&vmr_proto::api::EnableArgs, u64, Option<u64>),
) -> Outcome {
    let rec = &ctx.rec;
    let Some(lv) = &rec.libvirt else {
        return Outcome::Failed(Failure::Fatal("not a libvirt VM".into()));
    };
    // a resync starts the chain over: no acknowledged checkpoint, stale ones are deleted
    session.libvirt = None;
    let cfg = crate::cycle::libvirt_config(&ctx.host, rec, lv);
    let capture = match vmr_capture::libvirt::LibvirtCapture::open(cfg, None).await {
        Ok(c) => session.libvirt.insert(c),
        Err(e) => return Outcome::Failed(classify_capture(&e)),
    };
    let (outcome, reset_capture, reset_client) =
        libvirt_with(ctx, capture, client, (args, id, slow)).await;
    if reset_capture {
        session.libvirt = None;
    }
    if reset_client {
        session.client = None;
    }
    outcome
}

/// [`run_libvirt`] on an open capture; also says whether the capture and the connection must
/// be reopened.
async fn libvirt_with(
    ctx: &CycleCtx,
    capture: &mut vmr_capture::libvirt::LibvirtCapture,
    client: &Client,
    (args, id, slow): (&vmr_proto::api::EnableArgs, u64, Option<u64>),
) -> (Outcome, bool, bool) {
    let rec = &ctx.rec;
    let taken_at_ms = now_ms();
    let mut cycle = match capture.begin_cycle().await {
        Ok(c) => c,
        Err(e) => {
            let busy = matches!(e, CaptureError::BackupBusy { .. });
            return (Outcome::Failed(classify_capture(&e)), !busy, false);
        }
    };
    // The comparison hashes extents ahead and keeps them meanwhile.
    cycle.keeps_extents();
    let sizes = cycle.sizes();
    if sizes.len() != rec.disks.len() {
        let _ = cycle.abort().await;
        return (
            Outcome::Failed(Failure::Fatal(format!(
                "the domain has {} replicated disks, the VM's record {}",
                sizes.len(),
                rec.disks.len()
            ))),
            true,
            false,
        );
    }
    let disks: Vec<DiskInfo> = rec
        .disks
        .iter()
        .zip(&sizes)
        .map(|(d, s)| DiskInfo {
            id: d.clone(),
            size: *s,
        })
        .collect();
    let shipped = compare_and_ship(
        ctx,
        client,
        rec,
        args,
        (id, taken_at_ms),
        slow,
        disks,
        &mut cycle,
    )
    .await;
    let (id, produced, sent) = match shipped {
        Ok(r) => r,
        Err(f) => {
            let _ = cycle.abort().await;
            return (Outcome::Failed(f), true, true);
        }
    };
    match (produced, sent) {
        (Ok(c), Ok(_ack)) => match cycle.commit().await {
            Ok(()) => (done(rec, id, c, sizes), false, false),
            Err(e) => crate::cycle::commit_failed(&e),
        },
        (p, s) => {
            if let Err(e) = cycle.abort().await {
                tracing::warn!(vm = %rec.name, cycle = id, "ending the libvirt backup job: {e}");
            }
            let reset_client = s.is_err();
            let f = match (p, s) {
                (Err(Some(f)), _) => f,
                (_, Err(e)) => classify_transport(e),
                _ => Failure::Retryable("resync ended early".into()),
            };
            (Outcome::Failed(f), true, reset_client)
        }
    }
}

/// What a resync's producer and transfer gave, with the cycle's id.
type Shipped = (
    u64,
    Result<Counts, Option<Failure>>,
    Result<vmr_transport::CycleAck, vmr_transport::TransportError>,
);

/// Compare the view `cycle` (extents in order, tiling each disk of `disks`) with the
/// replica's latest point block by block and ship the differing blocks as one resync cycle.
/// `Err`: the replica's hashes could not be had (nothing was sent).
#[allow(clippy::too_many_arguments)]
async fn compare_and_ship<S: crate::cycle::ExtentSource + Send>(
    ctx: &CycleCtx,
    client: &Client,
    rec: &VmRecord,
    args: &vmr_proto::api::EnableArgs,
    (id, taken_at_ms): (u64, u64),
    slow: Option<u64>,
    disks: Vec<DiskInfo>,
    cycle: &mut S,
) -> Result<Shipped, Failure> {
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    let total: u64 = sizes.iter().sum();
    // The base: the replica's latest point, learned with the first chunk of hashes.
    let read = ctx.read_hashes;
    let first = fetch(client, rec.uuid, &disks[0], 0, None, read).await?;
    let base = first.0;
    let id = id.max(base + 1);
    ctx.progress
        .start(vmr_proto::api::OperationKind::Resync, total, taken_at_ms);
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base: Some(base),
        kind: CycleKind::Resync,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms,
        disks: disks.clone(),
        group: None,
    };
    tracing::info!(vm = %rec.name, cycle = id, base, bytes = total, "resynchronization started");

    // Replica hashes, fetched ahead of the comparison.
    let (htx, mut hrx) = tokio::sync::mpsc::channel::<Result<Vec<[u8; 32]>, Failure>>(2);
    let fetcher = {
        let client = client.clone();
        let disks = disks.clone();
        let uuid = rec.uuid;
        tokio::spawn(async move {
            let mut first = Some(first.1);
            for d in &disks {
                let blocks = d.size.div_ceil(BLOCK_SIZE);
                let mut b = 0;
                while b < blocks {
                    let r = match first.take() {
                        Some(h) => Ok(h),
                        None => fetch(&client, uuid, d, b, Some(base), read)
                            .await
                            .map(|x| x.1),
                    };
                    let failed = r.is_err();
                    let n = r.as_ref().map_or(0, |h| h.len() as u64);
                    if htx.send(r).await.is_err() || failed {
                        return;
                    }
                    b += n;
                }
            }
        })
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Extent, CaptureError>>(4);
    let producer = async {
        let tx = tx;
        let mut counts = Counts::default();
        let mut theirs: std::collections::VecDeque<[u8; 32]> = Default::default();
        let mut asm: Vec<Assembler> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| Assembler::new(i as u32, d.size))
            .collect();
        // The blocks of the next few extents are hashed (on the other core) while this task
        // compares and sends the ones before, in order.
        let mut ahead: std::collections::VecDeque<(u32, Hashing)> = Default::default();
        let mut ended = false;
        loop {
            while !ended && ahead.len() < HASH_AHEAD {
                let e = match cycle.next_extent().await {
                    Ok(Some(e)) => e,
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(e) => {
                        let f = classify_capture(&e);
                        let _ = tx.send(Err(e)).await;
                        return Err(Some(f));
                    }
                };
                let disk = e.disk;
                let Some(a) = asm.get_mut(disk as usize) else {
                    return Err(Some(Failure::Retryable("extent of an unknown disk".into())));
                };
                let blocks = a.push(e).map_err(Some)?;
                ahead.push_back((disk, Hashing::start(blocks)));
            }
            let Some((disk, hashing)) = ahead.pop_front() else {
                break;
            };
            for (index, block, ours) in hashing.get().await.map_err(Some)? {
                if theirs.is_empty() {
                    match hrx.recv().await {
                        Some(Ok(h)) => theirs.extend(h),
                        Some(Err(f)) => return Err(Some(f)),
                        None => {
                            return Err(Some(Failure::Retryable(
                                "replica hashes ended early".into(),
                            )));
                        }
                    }
                }
                let Some(their) = theirs.pop_front() else {
                    return Err(Some(Failure::Retryable("no replica hash".into())));
                };
                let offset = index * BLOCK_SIZE;
                let len = match &block {
                    Block::Zero(n) => *n,
                    Block::Data(b) => b.len() as u64,
                };
                counts.scanned += len;
                if ours != their {
                    counts.blocks_sent += 1;
                    let data = match block {
                        Block::Zero(n) => ExtentData::Zero(n),
                        Block::Data(b) => {
                            counts.data_bytes += b.len() as u64;
                            ExtentData::Data(b)
                        }
                    };
                    if tx.send(Ok(Extent { disk, offset, data })).await.is_err() {
                        return Err(None);
                    }
                    if let Some(ms) = slow {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
                ctx.progress.advance(counts.scanned, counts.data_bytes);
            }
        }
        if !asm.iter().all(Assembler::done) || !theirs.is_empty() {
            return Err(Some(Failure::Retryable(
                "the view and the replica's hashes do not cover the same blocks".into(),
            )));
        }
        Ok(counts)
    };
    let consumer = client.send_cycle_paced(
        &header,
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        args.compression,
        Some(ctx.body_pace()),
        vmr_transport::BodyQueue::Ahead,
    );
    let (produced, sent) = tokio::join!(producer, consumer);
    fetcher.abort();
    Ok((id, produced, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(off: u64, len: usize, v: u8) -> Extent {
        Extent {
            disk: 0,
            offset: off,
            data: ExtentData::Data(Bytes::from(vec![v; len])),
        }
    }

    #[test]
    fn assembler_makes_whole_blocks() {
        let size = 3 * BLOCK_SIZE + 100;
        let mut a = Assembler::new(0, size);
        // a whole block, zero-copy
        let out = a.push(data(0, BLOCK_SIZE as usize, 1)).expect("push");
        assert!(matches!(out.as_slice(), [(0, Block::Data(b))] if b.len() as u64 == BLOCK_SIZE));
        // half zeros, half data inside block 1, then zeros to the end of block 2
        let z = Extent {
            disk: 0,
            offset: BLOCK_SIZE,
            data: ExtentData::Zero(BLOCK_SIZE / 2),
        };
        assert!(a.push(z).expect("push").is_empty());
        let out = a
            .push(data(BLOCK_SIZE + BLOCK_SIZE / 2, 10, 7))
            .expect("push");
        assert!(out.is_empty());
        let z = Extent {
            disk: 0,
            offset: BLOCK_SIZE + BLOCK_SIZE / 2 + 10,
            data: ExtentData::Zero(BLOCK_SIZE + BLOCK_SIZE / 2 - 10),
        };
        let out = a.push(z).expect("push");
        assert_eq!(out.len(), 2);
        match &out[0] {
            (1, Block::Data(b)) => {
                assert_eq!(b.len() as u64, BLOCK_SIZE);
                assert_eq!(b[(BLOCK_SIZE / 2) as usize], 7);
                assert_eq!(b[0], 0);
            }
            _ => panic!("block 1 should be data"),
        }
        assert!(matches!(out[1], (2, Block::Zero(n)) if n == BLOCK_SIZE));
        // the short tail block
        let out = a.push(data(3 * BLOCK_SIZE, 100, 9)).expect("push");
        assert!(matches!(out.as_slice(), [(3, Block::Data(b))] if b.len() == 100));
        assert!(a.done());
        // out of order is refused
        assert!(a.push(data(0, 1, 1)).is_err());
    }
}
