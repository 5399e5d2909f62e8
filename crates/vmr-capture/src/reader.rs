//! The read pipeline of one cycle: walks NBD block status of each disk's point-in-time export
//! window by window, reads the wanted ranges in pieces of at most [`PIECE_SIZE`] with up to
//! `max_in_flight` reads outstanding, hands out extents in disk/offset order, and TRIMs what
//! was read (and, in the background, what will never be read) so the copy-before-write filter
//! stops copying those clusters. What was read is trimmed in batches ([`TRIM_BATCH_PIECES`]
//! pieces or [`TRIM_BATCH_SPAN`] bytes of disk at a time, everything up to the end of the last
//! extent handed out: every read before it has completed), not one TRIM per piece: each TRIM is
//! a request the VM's own QEMU serves.
//!
//! Memory is bounded by `max_in_flight × PIECE_SIZE` plus one block-status window's extent list,
//! however large the delta; and over every cycle of the process (the agent: the host) by
//! [`HOST_READ_BUDGET`]: each read takes its share of that budget before it goes out, and the
//! share travels with the data it read (the extent's `Bytes` own it) until the last copy of
//! that data is dropped, once it was sent. So the data read and not yet sent by eight cycles at
//! once is bounded as one cycle's is, not eight times as much.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::task::JoinHandle;
use vmr_nbd::{ByteBudget, NbdClient, ReadChunk, Share, StatusExtent};
use vmr_proto::{Extent, ExtentData};

use crate::{CaptureError, PIECE_SIZE, ReadFault};

/// Length asked for in one block-status request.
const STATUS_WINDOW: u64 = 1 << 30;
/// Largest single TRIM request.
const TRIM_MAX: u64 = 1 << 30;
/// TRIMs outstanding at once in the background pass.
const TRIM_IN_FLIGHT: usize = 8;
/// Trim what was read after this many pieces...
const TRIM_BATCH_PIECES: u32 = 32;
/// ...or this much disk span, whichever comes first.
const TRIM_BATCH_SPAN: u64 = 256 << 20;

/// Bytes of data read that the cycles of the process may hold at once, from the NBD read until
/// the data was sent. One cycle alone holds at most about 44 MiB (its reads in flight, the
/// extents queued for the sender, the body queued ahead of HTTP/2), so it never waits for the
/// budget; cycles running at once share it.
pub const HOST_READ_BUDGET: u64 = 96 << 20;

/// The process's budget, shared by every capture (QMP and libvirt VMs alike).
static HOST: LazyLock<Arc<ByteBudget>> = LazyLock::new(|| ByteBudget::new(HOST_READ_BUDGET));

/// Which ranges of a disk a cycle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Ranges with the dirty flag of a `qemu:dirty-bitmap:` context.
    Dirty,
    /// Everything; ranges with `NBD_STATE_ZERO` in `base:allocation` become zero extents.
    Allocated,
}

impl Want {
    fn classify(self, flags: u32) -> Class {
        match self {
            Want::Dirty if flags & vmr_nbd::DIRTY != 0 => Class::Read,
            Want::Dirty => Class::Skip,
            Want::Allocated if flags & vmr_nbd::STATE_ZERO != 0 => Class::Zero,
            Want::Allocated => Class::Read,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Read,
    Zero,
    Skip,
}

/// One disk's point-in-time export.
pub(crate) struct DiskSource {
    pub index: u32,
    pub client: NbdClient,
    pub context: String,
    pub want: Want,
    pub size: u64,
    /// TRIM what was read (and, for [`Want::Dirty`], what will never be read). Off for the
    /// first pass of a verify cycle, whose view is read whole afterwards.
    pub trim: bool,
}

struct DiskCursor {
    src: DiskSource,
    status_pos: u64,
    planned: VecDeque<(Class, u64, u64)>,
    /// Everything before this was handed out (all its reads completed).
    read_to: u64,
    /// Everything before this was trimmed (or asked to be).
    trimmed_to: u64,
    /// Pieces handed out since the last trim.
    untrimmed: u32,
}

impl DiskCursor {
    /// TRIM `[trimmed_to, read_to)` in the background when the batch is full (or `all`).
    fn trim_read(&mut self, all: bool) {
        let span = self.read_to.saturating_sub(self.trimmed_to);
        if !self.src.trim
            || span == 0
            || (!all && self.untrimmed < TRIM_BATCH_PIECES && span < TRIM_BATCH_SPAN)
        {
            return;
        }
        let (client, from) = (self.src.client.clone(), self.trimmed_to);
        tokio::spawn(async move { trim_range(&client, from, span).await });
        self.trimmed_to = self.read_to;
        self.untrimmed = 0;
    }
}

type Pending = BoxFuture<'static, Result<Vec<Extent>, CaptureError>>;

/// The next piece of a disk to read or to hand out as zeros.
struct Planned {
    client: NbdClient,
    disk: u32,
    class: Class,
    offset: u64,
    len: u64,
}

impl Planned {
    fn start(self, share: Option<Share>) -> Pending {
        let Planned {
            client,
            disk,
            class,
            offset,
            len,
        } = self;
        match class {
            Class::Read => Box::pin(read_piece(client, disk, offset, len as u32, share)),
            _ => Box::pin(zero_piece(client, disk, offset, len)),
        }
    }
}

/// Ordered, bounded, pipelined extent reader over all disks of a cycle.
pub(crate) struct Pipeline {
    disks: Vec<DiskCursor>,
    current: usize,
    inflight: FuturesOrdered<Pending>,
    ready: VecDeque<Extent>,
    max_in_flight: usize,
    bytes_read: u64,
    finished: bool,
    budget: Option<Arc<ByteBudget>>,
}

impl Pipeline {
    /// A pipeline under the process's budget when `budgeted`: for cycles whose consumer sends
    /// each extent on and keeps nothing of it (incremental and full cycles, exports). A resync
    /// or a verify keeps extents while it asks for the next (blocks hashed ahead, a block's
    /// first part until its rest arrives, and a slice keeps its whole read's share): under
    /// the budget, enough of them at once could each wait for a share that only their own
    /// kept data would give back, so they are not budgeted (their own bound is
    /// `max_in_flight` reads and what they keep: a few extents each).
    pub fn new(disks: Vec<DiskSource>, max_in_flight: usize, budgeted: bool) -> Pipeline {
        Pipeline::with_budget(disks, max_in_flight, budgeted.then(|| HOST.clone()))
    }

    pub(crate) fn with_budget(
        disks: Vec<DiskSource>,
        max_in_flight: usize,
        budget: Option<Arc<ByteBudget>>,
    ) -> Pipeline {
        Pipeline {
            disks: disks
                .into_iter()
                .map(|src| DiskCursor {
                    src,
                    status_pos: 0,
                    planned: VecDeque::new(),
                    read_to: 0,
                    trimmed_to: 0,
                    untrimmed: 0,
                })
                .collect(),
            current: 0,
            inflight: FuturesOrdered::new(),
            ready: VecDeque::new(),
            max_in_flight: max_in_flight.max(1),
            bytes_read: 0,
            finished: false,
            budget,
        }
    }

    /// Reads from here on are not under a budget (see [`Pipeline::new`]).
    pub fn unbudgeted(&mut self) {
        self.budget = None;
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Drop every outstanding request (before tearing the exports down).
    pub fn clear(&mut self) {
        self.inflight = FuturesOrdered::new();
        self.ready.clear();
    }

    pub async fn next(&mut self) -> Result<Option<Extent>, CaptureError> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                if let ExtentData::Data(b) = &e.data {
                    self.bytes_read += b.len() as u64;
                }
                if let Some(d) = self.disks.iter_mut().find(|d| d.src.index == e.disk) {
                    d.read_to = d.read_to.max(e.offset + data_len(&e.data));
                    if self.ready.is_empty() {
                        d.untrimmed += 1;
                        d.trim_read(false);
                    }
                }
                return Ok(Some(e));
            }
            if self.finished {
                for d in &mut self.disks {
                    d.trim_read(true);
                }
                return Ok(None);
            }
            while self.inflight.len() < self.max_in_flight {
                let Some(p) = self.plan_next().await? else {
                    break;
                };
                // Shares are taken in order. With reads in flight, a share that is not free
                // now waits until they were handed out (waiting for it instead could wait on
                // data of this cycle that only its own completed reads would give back);
                // with none, what holds the budget is data on its way out, which drains by
                // itself.
                let budget = self.budget.clone().filter(|_| p.class == Class::Read);
                let share = match budget {
                    None => None,
                    Some(b) if self.inflight.is_empty() => b.take(p.len).await,
                    Some(b) => match b.try_take(p.len) {
                        Some(share) => Some(share),
                        None => {
                            if let Some(d) = self.disks.get_mut(self.current) {
                                d.planned.push_front((p.class, p.offset, p.len));
                            }
                            break;
                        }
                    },
                };
                self.inflight.push_back(p.start(share));
            }
            match self.inflight.next().await {
                Some(r) => self.ready.extend(r?),
                None => self.finished = true,
            }
        }
    }

    /// The next piece of work, in order; `None` when all disks are planned.
    async fn plan_next(&mut self) -> Result<Option<Planned>, CaptureError> {
        loop {
            let Some(d) = self.disks.get_mut(self.current) else {
                return Ok(None);
            };
            if let Some((class, off, len)) = d.planned.pop_front() {
                let piece = match class {
                    Class::Read => len.min(u64::from(PIECE_SIZE)),
                    _ => len,
                };
                if piece < len {
                    d.planned.push_front((class, off + piece, len - piece));
                }
                return Ok(Some(Planned {
                    client: d.src.client.clone(),
                    disk: d.src.index,
                    class,
                    offset: off,
                    len: piece,
                }));
            }
            if d.status_pos >= d.src.size {
                self.current += 1;
                continue;
            }
            let ask = (d.src.size - d.status_pos).min(STATUS_WINDOW) as u32;
            let got = d
                .src
                .client
                .block_status(&d.src.context, d.status_pos, ask)
                .await?;
            let before = d.status_pos;
            for StatusExtent {
                offset,
                length,
                flags,
            } in got
            {
                let end = offset.saturating_add(length).min(d.src.size);
                if end <= d.status_pos {
                    continue;
                }
                if offset > d.status_pos {
                    return Err(CaptureError::Protocol(ReadFault::StatusGap {
                        at: offset,
                        after: d.status_pos,
                    }));
                }
                let start = d.status_pos;
                let class = d.src.want.classify(flags);
                if class != Class::Skip {
                    match d.planned.back_mut() {
                        Some((c, o, l)) if *c == class && *o + *l == start => *l += end - start,
                        _ => d.planned.push_back((class, start, end - start)),
                    }
                }
                d.status_pos = end;
            }
            if d.status_pos == before {
                return Err(CaptureError::Protocol(ReadFault::EmptyStatus(before)));
            }
        }
    }
}

async fn read_piece(
    client: NbdClient,
    disk: u32,
    offset: u64,
    len: u32,
    mut share: Option<Share>,
) -> Result<Vec<Extent>, CaptureError> {
    let chunks = client.read_chunks(offset, len).await?;
    // Trimmed in batches once handed out (`DiskCursor::trim_read`).
    let mut extents = chunks_to_extents(disk, offset, len, chunks)?;
    // Each piece of data carries its part of the share; holes give theirs back now.
    if let Some(share) = share.as_mut() {
        for e in &mut extents {
            if let ExtentData::Data(b) = &mut e.data
                && let Some(part) = share.split(b.len() as u64)
            {
                *b = part.lease(std::mem::take(b));
            }
        }
    }
    Ok(extents)
}

async fn zero_piece(
    client: NbdClient,
    disk: u32,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>, CaptureError> {
    trim_range(&client, offset, len).await;
    Ok(vec![Extent {
        disk,
        offset,
        data: ExtentData::Zero(len),
    }])
}

async fn trim_range(client: &NbdClient, offset: u64, len: u64) {
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(TRIM_MAX);
        if let Err(e) = client.trim(pos, n as u32).await {
            tracing::debug!(offset = pos, len = n, error = %e, "trim failed");
            return;
        }
        pos += n;
    }
}

/// Turn a structured read reply into extents, checking it covers exactly `[offset, offset+len)`.
fn chunks_to_extents(
    disk: u32,
    offset: u64,
    len: u32,
    mut chunks: Vec<ReadChunk>,
) -> Result<Vec<Extent>, CaptureError> {
    chunks.sort_by_key(ReadChunk::offset);
    let mut pos = offset;
    let mut out: Vec<Extent> = Vec::with_capacity(chunks.len());
    for c in chunks {
        if c.offset() != pos {
            return Err(CaptureError::Protocol(ReadFault::ChunkMisplaced {
                at: c.offset(),
                expected: pos,
            }));
        }
        pos += c.len();
        let data = match c {
            ReadChunk::Data { data, .. } => ExtentData::Data(data),
            ReadChunk::Hole { len, .. } => ExtentData::Zero(u64::from(len)),
        };
        if data_len(&data) == 0 {
            continue;
        }
        // merge adjacent holes
        if let (
            Some(Extent {
                data: ExtentData::Zero(n),
                ..
            }),
            ExtentData::Zero(m),
        ) = (out.last_mut(), &data)
        {
            *n += m;
            continue;
        }
        out.push(Extent {
            disk,
            offset: pos - data_len(&data),
            data,
        });
    }
    if pos != offset + u64::from(len) {
        return Err(CaptureError::Protocol(ReadFault::ShortRead {
            len,
            offset,
            got: pos - offset,
        }));
    }
    Ok(out)
}

fn data_len(d: &ExtentData) -> u64 {
    match d {
        ExtentData::Data(b) => b.len() as u64,
        ExtentData::Zero(n) => *n,
    }
}

/// Background pass TRIMming every range of a disk that the cycle will not read (non-dirty
/// ranges of an incremental cycle), so that guest writes there cost no copy-before-write.
/// Only for `Want::Dirty`: the dirty-bitmap context does not change when the snapshot is
/// trimmed, whereas `base:allocation` of trimmed ranges becomes unreadable.
pub(crate) fn spawn_trim_unread(src: &DiskSource) -> JoinHandle<()> {
    let client = src.client.clone();
    let context = src.context.clone();
    let size = src.size;
    let want = src.want;
    tokio::spawn(async move {
        let mut pos = 0u64;
        while pos < size {
            let ask = (size - pos).min(STATUS_WINDOW) as u32;
            let got = match client.block_status(&context, pos, ask).await {
                Ok(g) if !g.is_empty() => g,
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "block status for trim pass failed");
                    return;
                }
            };
            let mut skips = Vec::new();
            for x in got {
                let end = x.offset.saturating_add(x.length).min(size);
                if end <= pos {
                    continue;
                }
                if want.classify(x.flags) == Class::Skip {
                    skips.push((x.offset.max(pos), end - x.offset.max(pos)));
                }
                pos = end;
            }
            futures::stream::iter(skips)
                .for_each_concurrent(TRIM_IN_FLIGHT, |(o, l)| {
                    let c = client.clone();
                    async move { trim_range(&c, o, l).await }
                })
                .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;
    use vmr_nbd::ConnectOptions;
    use vmr_testkit::qsd::{DiskFormat, DiskSpec, QsdVm};

    const MIB: u64 = 1 << 20;

    /// Two cycles read at once while what they handed out is still on its way (dropped a
    /// little later, as a sender does once the data went out): together they hold no more
    /// than the budget they share (each alone may hold its reads in flight and its queue),
    /// every byte arrives intact, and the budget is whole again once the data is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cycles_share_one_budget_for_the_data_they_read() {
        let size = 32 * MIB;
        let vm = QsdVm::start(
            vec![
                DiskSpec::new("d0", DiskFormat::Qcow2, size),
                DiskSpec::new("d1", DiskFormat::Qcow2, size),
            ],
            Some("nbd.sock"),
        )
        .expect("start qsd");
        let sock = vm.nbd_socket().expect("nbd socket").to_owned();
        let connect = |node: &str| {
            let opts = ConnectOptions {
                export: node.to_owned(),
                meta_contexts: vec!["base:allocation".to_owned()],
                ..ConnectOptions::default()
            };
            let sock = sock.clone();
            async move {
                NbdClient::connect(&crate::Endpoint::Unix(sock), opts)
                    .await
                    .expect("connect")
            }
        };
        let images: Vec<Vec<u8>> = (0..2u8)
            .map(|seed| {
                (0..size as usize)
                    .map(|i| (i as u8).wrapping_mul(7) ^ seed ^ ((i >> 16) as u8))
                    .collect()
            })
            .collect();
        for (i, img) in images.iter().enumerate() {
            let c = connect(&format!("d{i}")).await;
            for (n, piece) in img.chunks(4 * MIB as usize).enumerate() {
                c.write((n as u64) * 4 * MIB, Bytes::copy_from_slice(piece), false)
                    .await
                    .expect("write");
            }
            c.flush().await.expect("flush");
        }
        let budget = ByteBudget::new(16 * MIB);
        let mut runs = Vec::new();
        for i in 0..2u32 {
            let client = connect(&format!("d{i}")).await;
            let budget = budget.clone();
            runs.push(tokio::spawn(async move {
                let src = DiskSource {
                    index: i,
                    client,
                    context: "base:allocation".to_owned(),
                    want: Want::Allocated,
                    size,
                    trim: false,
                };
                let mut pipe = Pipeline::with_budget(vec![src], 8, Some(budget));
                let mut image = vec![0u8; size as usize];
                let mut sending = Vec::new();
                while let Some(e) = pipe.next().await.expect("next") {
                    if let ExtentData::Data(b) = &e.data {
                        let at = e.offset as usize;
                        image[at..at + b.len()].copy_from_slice(b);
                    }
                    sending.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        drop(e);
                    }));
                }
                for s in sending {
                    s.await.expect("sent");
                }
                image
            }));
        }
        for (i, r) in runs.into_iter().enumerate() {
            let image = r.await.expect("run");
            assert!(image == images[i], "disk {i} read differs");
        }
        assert!(
            budget.peak() <= 16 * MIB,
            "{} MiB of read data held at once under a 16 MiB budget",
            budget.peak() / MIB
        );
        assert!(budget.peak() >= 4 * MIB, "no read was ever budgeted");
        assert_eq!(
            budget.held(),
            0,
            "shares still held after the data was dropped"
        );
    }

    #[test]
    fn chunks_cover_exactly() {
        let c = vec![
            ReadChunk::Hole { offset: 8, len: 4 },
            ReadChunk::Data {
                offset: 0,
                data: Bytes::from_static(&[1; 8]),
            },
            ReadChunk::Hole { offset: 12, len: 4 },
        ];
        let e = chunks_to_extents(1, 0, 16, c).expect("cover");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].offset, 0);
        assert_eq!(
            e[1],
            Extent {
                disk: 1,
                offset: 8,
                data: ExtentData::Zero(8)
            }
        );
        let gap = vec![ReadChunk::Data {
            offset: 4,
            data: Bytes::from_static(&[1; 4]),
        }];
        assert!(chunks_to_extents(0, 0, 8, gap).is_err());
        let short = vec![ReadChunk::Data {
            offset: 0,
            data: Bytes::from_static(&[1; 4]),
        }];
        assert!(chunks_to_extents(0, 0, 8, short).is_err());
    }

    #[test]
    fn classification() {
        assert_eq!(Want::Dirty.classify(1), Class::Read);
        assert_eq!(Want::Dirty.classify(0), Class::Skip);
        assert_eq!(
            Want::Allocated.classify(vmr_nbd::STATE_ZERO | vmr_nbd::STATE_HOLE),
            Class::Zero
        );
        assert_eq!(Want::Allocated.classify(0), Class::Read);
    }
}
