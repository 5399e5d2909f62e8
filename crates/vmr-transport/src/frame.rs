//! The binary cycle body (see docs/protocol.md): stream header, then Header, Extent… and End
//! frames. Stream version 2 (peer protocol 4) compresses each data extent on its own, only when
//! a cheap sample says it is worth it, and checksums extents block by block
//! ([`ChecksumScheme::Blocks`]); stream version 1 (older peers) makes the frame part one zstd
//! stream and checksums whole extents. Encoding (sender side, feeding a bounded channel) and
//! incremental decoding (receiver side, pulling the HTTP body only as fast as the handler
//! consumes extents) with every length bounded; the decoder verifies each extent exactly once
//! and hands it on as a [`CheckedExtent`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::stream::BoxStream;
use futures::{SinkExt, Stream, StreamExt};
use vmr_proto::{CheckedExtent, ChecksumScheme, CycleHeader, Extent, ExtentData};
use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

use crate::error::{ProtocolFault, TransportError};

/// First four bytes of every cycle body.
pub const STREAM_MAGIC: [u8; 4] = *b"VMRC";
/// Newest version of the cycle body framing: per-extent compression and block checksums. A
/// sender uses it on connections of peer protocol [`STREAM_V2_SINCE`] or later.
pub const STREAM_VERSION: u16 = 2;
/// The first framing: one zstd stream over all frames, whole-extent checksums.
pub const STREAM_VERSION_1: u16 = 1;
/// First peer protocol whose receivers decode stream version 2.
pub const STREAM_V2_SINCE: u16 = 4;
/// Extents of at least this many data bytes are hashed (and compressed) on a blocking thread;
/// smaller ones in place on the runtime.
const OFF_RUNTIME: usize = 1 << 20;
/// Stream header flag: version 1: the frames after the stream header form one zstd stream;
/// version 2: data extents may be zstd-compressed one by one.
pub const FLAG_ZSTD: u16 = 1;
/// Version 2 extent encoding: the data follows as it is.
const ENC_RAW: u8 = 0;
/// Version 2 extent encoding: the data follows as one zstd frame.
const ENC_ZSTD: u8 = 1;
/// Largest data extent a frame may carry.
pub const MAX_EXTENT_DATA: u64 = 64 << 20;
/// Largest Header frame JSON.
pub const MAX_HEADER_JSON: u32 = 1 << 20;

const STREAM_HEADER_LEN: usize = 8;
const FRAME_HEADER: u8 = 1;
const FRAME_EXTENT: u8 = 2;
const FRAME_END: u8 = 3;
const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;
/// type + disk + offset + kind + length + checksum
const EXTENT_FRAME_LEN: usize = 1 + 4 + 8 + 1 + 8 + 32;
/// Version 2: the version 1 extent frame + encoding + stored (payload) length.
const EXTENT_FRAME_LEN_V2: usize = EXTENT_FRAME_LEN + 1 + 8;
/// type + count + total + digest
const END_FRAME_LEN: usize = 1 + 8 + 8 + 32;
/// Size of the body chunks of frame headers (and small extents) the sender hands to HTTP/2.
pub(crate) const CHUNK: usize = 256 << 10;
/// Largest piece of an extent's payload a primary's cycle hands to HTTP/2 as one chunk: a whole
/// capture piece (`vmr_capture::PIECE_SIZE`), so that it travels as one HTTP/2 DATA frame (the
/// receiver allows frames of this size, `server::MAX_FRAME`) and the receiver takes it out of
/// the frame without copying it into an extent of its own.
pub(crate) const DATA_CHUNK: usize = 1 << 20;
/// Decompression step: at most this many bytes are produced per decoder call.
const SCRATCH: usize = 128 << 10;

fn protocol(fault: ProtocolFault) -> TransportError {
    TransportError::Protocol(fault)
}

/// Checks an extent against the header's disk table; returns its length.
fn check_extent(disks: &[u64], disk: u32, offset: u64, len: u64) -> Result<(), TransportError> {
    let size = disks.get(disk as usize).ok_or_else(|| {
        protocol(ProtocolFault::NoSuchDisk {
            disk,
            disks: disks.len(),
        })
    })?;
    match offset.checked_add(len) {
        Some(end) if end <= *size => Ok(()),
        _ => Err(protocol(ProtocolFault::ExtentOutOfRange {
            disk,
            offset,
            len,
            size: *size,
        })),
    }
}

/// The checksum scheme of a stream version.
fn scheme(version: u16) -> ChecksumScheme {
    if version >= 2 {
        ChecksumScheme::Blocks
    } else {
        ChecksumScheme::Whole
    }
}

/// Whether zstd is likely to shrink `data`: the Shannon entropy of a sample of its bytes (16
/// bytes of every 256, at most 8 KiB) is under 7 bits per byte. Random or already compressed
/// data (about 8 bits) is sent as it is, which saves the compressor's whole pass over it; data
/// with repeats that a byte histogram cannot see (a random page written twice in one extent)
/// is sent uncompressed too, the price of a check that costs a sixteenth of a pass.
pub fn worth_compressing(data: &[u8]) -> bool {
    const STEP: usize = 256;
    const TAKE: usize = 16;
    if data.len() < 1024 {
        return true;
    }
    let step = STEP.max(data.len() / 512);
    let mut hist = [0u32; 256];
    let mut n = 0u32;
    let mut pos = 0;
    while pos + TAKE <= data.len() {
        for &b in &data[pos..pos + TAKE] {
            hist[b as usize] += 1;
        }
        n += TAKE as u32;
        pos += step;
    }
    let total = f64::from(n);
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    entropy < 7.0
}

fn put_extent_header(out: &mut Vec<u8>, e: &Extent, cs: &[u8; 32]) {
    out.put_u8(FRAME_EXTENT);
    out.put_u32_le(e.disk);
    out.put_u64_le(e.offset);
    out.put_u8(match e.data {
        ExtentData::Data(_) => KIND_DATA,
        ExtentData::Zero(_) => KIND_ZERO,
    });
    out.put_u64_le(e.len());
    out.put_slice(cs);
}

type ZstdWriter = zstd::stream::write::Encoder<'static, Vec<u8>>;

/// How the frames of a body are compressed.
enum Compression {
    None,
    /// Version 1: one zstd stream over every frame.
    Stream(ZstdWriter),
    /// Version 2: each data extent worth it on its own.
    PerExtent(Box<zstd::bulk::Compressor<'static>>),
}

/// Encodes one cycle body into a bounded channel of chunks.
pub(crate) struct FrameEncoder {
    tx: mpsc::Sender<Bytes>,
    version: u16,
    /// `None` only while a job holds it.
    zstd: Option<Compression>,
    pending: Vec<u8>,
    /// Largest chunk of an extent's payload handed to the channel.
    data_chunk: usize,
    disks: Vec<u64>,
    digest: blake3::Hasher,
    count: u64,
    total: u64,
}

/// What encoding one data extent produced: frame bytes to send in order.
type Encoded = (Compression, [u8; 32], Bytes, Bytes);

impl FrameEncoder {
    /// Starts a body of stream `version` ([`STREAM_VERSION`] or [`STREAM_VERSION_1`]): sends
    /// the stream header and queues the Header frame. Extent payloads go to `tx` in chunks of
    /// at most `data_chunk` bytes.
    pub(crate) async fn start(
        tx: mpsc::Sender<Bytes>,
        header: &CycleHeader,
        zstd_level: Option<i32>,
        version: u16,
        data_chunk: usize,
    ) -> Result<FrameEncoder, TransportError> {
        if version != STREAM_VERSION && version != STREAM_VERSION_1 {
            return Err(TransportError::StreamVersion(version));
        }
        let json = serde_json::to_vec(header).map_err(|source| TransportError::Encode {
            what: "cycle header",
            source,
        })?;
        if json.len() > MAX_HEADER_JSON as usize {
            return Err(protocol(ProtocolFault::HeaderTooLarge {
                len: json.len() as u64,
                max: MAX_HEADER_JSON,
            }));
        }
        let zerr = TransportError::Zstd;
        let zstd = match (zstd_level, version) {
            (None, _) => Compression::None,
            (Some(level), STREAM_VERSION_1) => Compression::Stream(
                ZstdWriter::new(Vec::with_capacity(CHUNK), level).map_err(zerr)?,
            ),
            (Some(level), _) => {
                Compression::PerExtent(Box::new(zstd::bulk::Compressor::new(level).map_err(zerr)?))
            }
        };
        let mut sh = Vec::with_capacity(STREAM_HEADER_LEN);
        sh.put_slice(&STREAM_MAGIC);
        sh.put_u16_le(version);
        sh.put_u16_le(if matches!(zstd, Compression::None) {
            0
        } else {
            FLAG_ZSTD
        });
        let mut enc = FrameEncoder {
            tx,
            version,
            zstd: Some(zstd),
            pending: Vec::with_capacity(CHUNK),
            data_chunk: data_chunk.max(1),
            disks: header.disks.iter().map(|d| d.size).collect(),
            digest: blake3::Hasher::new(),
            count: 0,
            total: 0,
        };
        enc.send(Bytes::from(sh)).await?;
        enc.pending.put_u8(FRAME_HEADER);
        enc.pending.put_u32_le(json.len() as u32);
        enc.pending.put_slice(&json);
        Ok(enc)
    }

    async fn send(&mut self, mut b: Bytes) -> Result<(), TransportError> {
        while !b.is_empty() {
            let piece = b.split_to(b.len().min(self.data_chunk));
            self.tx
                .send(piece)
                .await
                .map_err(|_| TransportError::BodyClosed)?;
        }
        Ok(())
    }

    /// Sends (compressing if version 1 with zstd) everything queued in `pending`.
    async fn flush_pending(&mut self) -> Result<(), TransportError> {
        let plain = std::mem::take(&mut self.pending);
        let out = match &mut self.zstd {
            Some(Compression::Stream(z)) => {
                std::io::Write::write_all(z, &plain).map_err(TransportError::Zstd)?;
                std::mem::take(z.get_mut())
            }
            _ => plain,
        };
        self.pending = Vec::with_capacity(CHUNK);
        self.send(Bytes::from(out)).await
    }

    /// Queues one extent.
    pub(crate) async fn extent(&mut self, e: Extent) -> Result<(), TransportError> {
        let len = e.len();
        if matches!(e.data, ExtentData::Data(_)) && len > MAX_EXTENT_DATA {
            return Err(protocol(ProtocolFault::ExtentTooLarge {
                len,
                max: MAX_EXTENT_DATA,
            }));
        }
        check_extent(&self.disks, e.disk, e.offset, len)?;
        let version = self.version;
        let cs = match &e.data {
            ExtentData::Zero(_) => {
                let cs = CheckedExtent::compute(e.clone(), scheme(version)).checksum();
                put_extent_header(&mut self.pending, &e, &cs);
                if version >= 2 {
                    self.pending.put_u8(ENC_RAW);
                    self.pending.put_u64_le(0);
                }
                if self.pending.len() >= CHUNK {
                    self.flush_pending().await?;
                }
                cs
            }
            ExtentData::Data(data) => {
                let small = data.len() < OFF_RUNTIME;
                let data = data.clone();
                let pending = std::mem::take(&mut self.pending);
                let zstd = self.zstd.take().ok_or(TransportError::EncoderFailed)?;
                let job = move || encode_data(e, data, zstd, pending, version);
                // A small extent is hashed and compressed in place (tens of microseconds): a
                // hand-over to a blocking thread per 64 KiB block would cost more than the work
                // on a busy host. Large ones leave the runtime.
                let r = if small {
                    job()
                } else {
                    tokio::task::spawn_blocking(job).await.map_err(|source| {
                        TransportError::TaskFailed {
                            what: "extent encoder",
                            source,
                        }
                    })?
                };
                let (zstd, cs, first, second) = r?;
                self.zstd = Some(zstd);
                self.send(first).await?;
                self.send(second).await?;
                cs
            }
        };
        self.digest.update(&cs);
        self.count += 1;
        self.total += len;
        Ok(())
    }

    /// Queues the End frame and flushes everything.
    pub(crate) async fn finish(mut self) -> Result<(), TransportError> {
        let (count, total) = (self.count, self.total);
        let digest = *self.digest.finalize().as_bytes();
        self.pending.put_u8(FRAME_END);
        self.pending.put_u64_le(count);
        self.pending.put_u64_le(total);
        self.pending.put_slice(&digest);
        self.flush_pending().await?;
        if let Some(Compression::Stream(z)) = self.zstd.take() {
            let out = z.finish().map_err(TransportError::Zstd)?;
            self.send(Bytes::from(out)).await?;
        }
        Ok(())
    }
}

/// Checksums one data extent (`data` is its payload) and frames it after what `pending`
/// holds: returns the compression state, the checksum and the bytes to send (the second is
/// the raw data itself when it goes uncompressed, so it is never copied).
fn encode_data(
    e: Extent,
    data: Bytes,
    zstd: Compression,
    mut pending: Vec<u8>,
    version: u16,
) -> Result<Encoded, TransportError> {
    let zerr = TransportError::Zstd;
    let cs = CheckedExtent::compute(e.clone(), scheme(version)).checksum();
    put_extent_header(&mut pending, &e, &cs);
    match zstd {
        Compression::Stream(mut z) => {
            std::io::Write::write_all(&mut z, &pending).map_err(zerr)?;
            std::io::Write::write_all(&mut z, &data).map_err(zerr)?;
            let out = std::mem::take(z.get_mut());
            Ok((Compression::Stream(z), cs, Bytes::from(out), Bytes::new()))
        }
        Compression::PerExtent(mut c) => {
            let packed = if worth_compressing(&data) {
                let out = c.compress(&data).map_err(zerr)?;
                // Keep it only when it saves at least 1/16.
                (out.len() < data.len() - data.len() / 16).then_some(out)
            } else {
                None
            };
            let (enc, payload) = match packed {
                Some(out) => (ENC_ZSTD, Bytes::from(out)),
                None => (ENC_RAW, data),
            };
            pending.put_u8(enc);
            pending.put_u64_le(payload.len() as u64);
            Ok((Compression::PerExtent(c), cs, Bytes::from(pending), payload))
        }
        Compression::None => {
            if version >= 2 {
                pending.put_u8(ENC_RAW);
                pending.put_u64_le(data.len() as u64);
            }
            Ok((Compression::None, cs, Bytes::from(pending), data))
        }
    }
}

/// The body chunks as they arrive.
pub(crate) type ChunkStream = BoxStream<'static, Result<Bytes, TransportError>>;

/// Bytes of a body, decompressed on demand, with at most `n + one chunk` buffered.
struct Source {
    chunks: ChunkStream,
    pending: Bytes,
    zstd: Option<Box<RawDecoder<'static>>>,
    /// Last decoder hint; 0 when a zstd frame just ended.
    hint: usize,
    scratch: Vec<u8>,
    buf: BytesMut,
}

impl Source {
    async fn next_chunk(&mut self) -> Result<bool, TransportError> {
        loop {
            match self.chunks.next().await {
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => {
                    self.pending = b;
                    return Ok(true);
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(false),
            }
        }
    }

    /// Reads exactly `n` raw (never decompressed) bytes into `buf`.
    async fn fill_raw(&mut self, n: usize) -> Result<bool, TransportError> {
        while self.buf.len() < n {
            if self.pending.is_empty() && !self.next_chunk().await? {
                return Ok(false);
            }
            let take = (n - self.buf.len()).min(self.pending.len());
            self.buf.extend_from_slice(&self.pending.split_to(take));
        }
        Ok(true)
    }

    /// Makes at least `n` decoded bytes available in `buf`; `false` at end of body.
    async fn fill(&mut self, n: usize) -> Result<bool, TransportError> {
        if self.buf.len() >= n {
            return Ok(true);
        }
        self.buf.reserve(n - self.buf.len());
        while self.buf.len() < n {
            let mut need_input = self.pending.is_empty();
            if let Some(dec) = &mut self.zstd {
                if !self.pending.is_empty() || self.hint != 0 {
                    let want = (n - self.buf.len()).min(SCRATCH);
                    let mut inb = InBuffer::around(&self.pending);
                    let mut outb = OutBuffer::around(&mut self.scratch[..want]);
                    self.hint = dec
                        .run(&mut inb, &mut outb)
                        .map_err(|e| protocol(ProtocolFault::ZstdStream(e)))?;
                    let (consumed, produced) = (inb.pos(), outb.pos());
                    self.pending.advance(consumed);
                    self.buf.extend_from_slice(&self.scratch[..produced]);
                    need_input = produced == 0 && self.pending.is_empty();
                    if produced == 0 && consumed == 0 && !self.pending.is_empty() {
                        return Err(protocol(ProtocolFault::ZstdStalled));
                    }
                }
            } else if !self.pending.is_empty() {
                // Only what is asked for: the rest stays in `pending`, where `take` can hand
                // out a payload without copying it.
                let take = (n - self.buf.len()).min(self.pending.len());
                self.buf.extend_from_slice(&self.pending.split_to(take));
            }
            if need_input && self.buf.len() < n && !self.next_chunk().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Source {
    /// The next `n` decoded bytes; without a zstd stream, a slice of the received chunk when
    /// it holds them all (no copy). `None` at end of body.
    async fn take(&mut self, n: usize) -> Result<Option<Bytes>, TransportError> {
        if self.zstd.is_none() && self.buf.is_empty() {
            if self.pending.is_empty() && !self.next_chunk().await? {
                return Ok(None);
            }
            if self.pending.len() >= n {
                return Ok(Some(self.pending.split_to(n)));
            }
        }
        if !self.fill(n).await? {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(n).freeze()))
    }
}

/// Incremental decoder of one cycle body.
pub(crate) struct CycleDecoder {
    src: Source,
    version: u16,
    /// Version 2 with [`FLAG_ZSTD`]: decompresses extents packed one by one.
    unpack: Option<Box<zstd::bulk::Decompressor<'static>>>,
    disks: Vec<u64>,
    index: u64,
    total: u64,
    digest: blake3::Hasher,
}

/// The body ended cleanly (the sender closed it) before the stream was complete: the sender's
/// error, not a network failure (a cut connection fails the body with `Interrupted` instead).
fn interrupted(what: &'static str) -> TransportError {
    TransportError::Truncated(what)
}

impl CycleDecoder {
    /// Reads the stream header and the Header frame.
    pub(crate) async fn start(
        chunks: ChunkStream,
    ) -> Result<(CycleHeader, CycleDecoder), TransportError> {
        let mut src = Source {
            chunks,
            pending: Bytes::new(),
            zstd: None,
            hint: 0,
            scratch: Vec::new(),
            buf: BytesMut::new(),
        };
        if !src.fill_raw(STREAM_HEADER_LEN).await? {
            return Err(interrupted("inside the stream header"));
        }
        let mut sh = src.buf.split_to(STREAM_HEADER_LEN);
        if sh[..4] != STREAM_MAGIC {
            return Err(protocol(ProtocolFault::StreamMagic));
        }
        sh.advance(4);
        let version = sh.get_u16_le();
        let flags = sh.get_u16_le();
        if version != STREAM_VERSION && version != STREAM_VERSION_1 {
            return Err(protocol(ProtocolFault::StreamVersion(version)));
        }
        if flags & !FLAG_ZSTD != 0 {
            return Err(protocol(ProtocolFault::StreamFlags(flags)));
        }
        let zerr = TransportError::Zstd;
        let mut unpack = None;
        if flags & FLAG_ZSTD != 0 {
            if version == STREAM_VERSION_1 {
                src.zstd = Some(Box::new(RawDecoder::new().map_err(zerr)?));
                src.scratch = vec![0; SCRATCH];
            } else {
                unpack = Some(Box::new(zstd::bulk::Decompressor::new().map_err(zerr)?));
            }
        }
        if !src.fill(5).await? {
            return Err(interrupted("before the header frame"));
        }
        if src.buf[0] != FRAME_HEADER {
            return Err(protocol(ProtocolFault::NotHeaderFrame(src.buf[0])));
        }
        let len = u32::from_le_bytes([src.buf[1], src.buf[2], src.buf[3], src.buf[4]]);
        if len > MAX_HEADER_JSON {
            return Err(protocol(ProtocolFault::HeaderTooLarge {
                len: u64::from(len),
                max: MAX_HEADER_JSON,
            }));
        }
        if !src.fill(5 + len as usize).await? {
            return Err(interrupted("inside the header frame"));
        }
        src.buf.advance(5);
        let json = src.buf.split_to(len as usize);
        let header: CycleHeader =
            serde_json::from_slice(&json).map_err(|e| protocol(ProtocolFault::HeaderJson(e)))?;
        header
            .check()
            .map_err(|e| protocol(ProtocolFault::HeaderRefused(e)))?;
        let disks = header.disks.iter().map(|d| d.size).collect();
        let dec = CycleDecoder {
            src,
            version,
            unpack,
            disks,
            index: 0,
            total: 0,
            digest: blake3::Hasher::new(),
        };
        Ok((header, dec))
    }

    /// The next extent with its checksum check started but not awaited (a large one runs on a
    /// blocking thread, so that the next one can be received meanwhile); `None` after the End
    /// frame verified.
    async fn next_unverified(&mut self) -> Result<Option<Verifying>, TransportError> {
        if !self.src.fill(1).await? {
            return Err(interrupted("without an end frame"));
        }
        match self.src.buf[0] {
            FRAME_EXTENT => self.extent().await.map(Some),
            FRAME_END => self.end().await.map(|()| None),
            t => Err(protocol(ProtocolFault::FrameType(t))),
        }
    }

    async fn extent(&mut self) -> Result<Verifying, TransportError> {
        let frame_len = if self.version >= 2 {
            EXTENT_FRAME_LEN_V2
        } else {
            EXTENT_FRAME_LEN
        };
        if !self.src.fill(frame_len).await? {
            return Err(interrupted("inside an extent frame"));
        }
        let mut h = self.src.buf.split_to(frame_len);
        h.advance(1);
        let disk = h.get_u32_le();
        let offset = h.get_u64_le();
        let kind = h.get_u8();
        let len = h.get_u64_le();
        let mut cs = [0u8; 32];
        h.copy_to_slice(&mut cs);
        let (enc, stored) = if self.version >= 2 {
            (h.get_u8(), h.get_u64_le())
        } else {
            (ENC_RAW, len)
        };
        check_extent(&self.disks, disk, offset, len)?;
        let data = match kind {
            KIND_ZERO if enc == ENC_RAW && (self.version < 2 || stored == 0) => {
                ExtentData::Zero(len)
            }
            KIND_ZERO => {
                return Err(protocol(ProtocolFault::ZeroExtentEncoding {
                    encoding: enc,
                    stored,
                }));
            }
            KIND_DATA => {
                if len > MAX_EXTENT_DATA {
                    return Err(protocol(ProtocolFault::ExtentTooLarge {
                        len,
                        max: MAX_EXTENT_DATA,
                    }));
                }
                let packed = match enc {
                    ENC_RAW if stored == len => false,
                    ENC_ZSTD if self.unpack.is_some() && stored > 0 && stored <= len => true,
                    _ => {
                        return Err(protocol(ProtocolFault::DataExtentEncoding {
                            len,
                            encoding: enc,
                            stored,
                        }));
                    }
                };
                let Some(payload) = self.src.take(stored as usize).await? else {
                    return Err(interrupted("inside extent data"));
                };
                match (packed, self.unpack.as_mut()) {
                    (true, Some(unpack)) => {
                        let out = unpack
                            .decompress(&payload, len as usize)
                            .map_err(|e| protocol(ProtocolFault::ZstdExtent(e)))?;
                        if out.len() as u64 != len {
                            return Err(protocol(ProtocolFault::ZstdExtentLength {
                                got: out.len() as u64,
                                len,
                            }));
                        }
                        ExtentData::Data(Bytes::from(out))
                    }
                    // `packed` is only true when `unpack` is there (checked above).
                    _ => ExtentData::Data(payload),
                }
            }
            k => return Err(protocol(ProtocolFault::ExtentKind(k))),
        };
        let extent = Extent { disk, offset, data };
        let index = self.index;
        let scheme = scheme(self.version);
        let check = if len as usize >= OFF_RUNTIME {
            Check::Running(tokio::task::spawn_blocking(move || {
                CheckedExtent::verify(extent, cs, scheme)
            }))
        } else {
            Check::Done(CheckedExtent::verify(extent, cs, scheme))
        };
        // The End frame's digest covers the checksums as sent; a mismatch of the data itself
        // surfaces when this extent's check is awaited, before any later extent is handed out.
        self.digest.update(&cs);
        self.index += 1;
        self.total += len;
        Ok(Verifying {
            check,
            index,
            disk,
            offset,
        })
    }

    async fn end(&mut self) -> Result<(), TransportError> {
        if !self.src.fill(END_FRAME_LEN).await? {
            return Err(interrupted("inside the end frame"));
        }
        let mut h = self.src.buf.split_to(END_FRAME_LEN);
        h.advance(1);
        let count = h.get_u64_le();
        let total = h.get_u64_le();
        let mut digest = [0u8; 32];
        h.copy_to_slice(&mut digest);
        if count != self.index || total != self.total {
            return Err(protocol(ProtocolFault::EndCounts {
                count,
                total,
                got_count: self.index,
                got_total: self.total,
            }));
        }
        if digest != *self.digest.finalize().as_bytes() {
            return Err(protocol(ProtocolFault::EndDigest));
        }
        if self.src.fill(1).await? {
            return Err(protocol(ProtocolFault::DataAfterEnd));
        }
        if self.src.zstd.is_some() && self.src.hint != 0 {
            return Err(interrupted("inside the zstd stream"));
        }
        Ok(())
    }
}

/// Extents whose checksum check runs while the next one is received.
const VERIFY_AHEAD: usize = 2;

/// A large extent's check on a blocking thread, or a small one's result.
enum Check {
    Running(tokio::task::JoinHandle<Result<CheckedExtent, vmr_proto::ChecksumMismatch>>),
    Done(Result<CheckedExtent, vmr_proto::ChecksumMismatch>),
}

/// A received extent whose checksum check was started.
struct Verifying {
    check: Check,
    index: u64,
    disk: u32,
    offset: u64,
}

impl Verifying {
    async fn verified(self) -> Result<CheckedExtent, TransportError> {
        let r = match self.check {
            Check::Running(h) => h.await.map_err(|source| TransportError::TaskFailed {
                what: "checksum",
                source,
            })?,
            Check::Done(r) => r,
        };
        let (index, disk, offset) = (self.index, self.disk, self.offset);
        r.map_err(|_| {
            tracing::warn!(index, disk, offset, "extent checksum mismatch");
            TransportError::CorruptExtent { index }
        })
    }
}

/// The extents of one incoming cycle, decoded lazily as the body arrives, each with its verified
/// checksum. Yields `None` only after the End frame verified (count, bytes, digest); any `Err`
/// (corrupt extent, protocol violation, peer vanished) is the last item and means: discard.
pub struct ExtentStream {
    inner: BoxStream<'static, Result<CheckedExtent, TransportError>>,
}

impl std::fmt::Debug for ExtentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtentStream")
    }
}

impl ExtentStream {
    /// Wraps any stream (for handler tests in other crates).
    pub fn from_stream(
        s: impl Stream<Item = Result<CheckedExtent, TransportError>> + Send + 'static,
    ) -> ExtentStream {
        ExtentStream { inner: s.boxed() }
    }

    /// Stream over a decoder; the flag turns true once the End frame verified.
    pub(crate) fn from_decoder(dec: CycleDecoder) -> (ExtentStream, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        // Up to VERIFY_AHEAD extents are checked while the next is received; they are handed
        // out in order, and any error is the last item.
        let start = (Some(dec), std::collections::VecDeque::<Verifying>::new());
        let s = futures::stream::unfold(start, move |(mut dec, mut queue)| {
            let flag = flag.clone();
            async move {
                while queue.len() < VERIFY_AHEAD {
                    let Some(d) = dec.as_mut() else { break };
                    match d.next_unverified().await {
                        Ok(Some(v)) => queue.push_back(v),
                        Ok(None) => dec = None,
                        Err(e) => return Some((Err(e), (None, Default::default()))),
                    }
                }
                match queue.pop_front() {
                    Some(v) => match v.verified().await {
                        Ok(c) => Some((Ok(c), (dec, queue))),
                        Err(e) => Some((Err(e), (None, Default::default()))),
                    },
                    None if dec.is_none() => {
                        flag.store(true, Ordering::SeqCst);
                        None
                    }
                    None => None,
                }
            }
        });
        (ExtentStream { inner: s.boxed() }, done)
    }
}

impl Stream for ExtentStream {
    type Item = Result<CheckedExtent, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Encodes a whole cycle body of the newest stream version in memory (tests and tools; the
/// client streams instead).
pub async fn encode_cycle(
    header: &CycleHeader,
    extents: Vec<Extent>,
    zstd_level: Option<i32>,
) -> Result<Vec<u8>, TransportError> {
    encode_cycle_version(header, extents, zstd_level, STREAM_VERSION).await
}

/// [`encode_cycle`] in a given stream version (what an older peer sends).
pub async fn encode_cycle_version(
    header: &CycleHeader,
    extents: Vec<Extent>,
    zstd_level: Option<i32>,
    version: u16,
) -> Result<Vec<u8>, TransportError> {
    let (tx, rx) = mpsc::channel(4);
    let collect = rx.collect::<Vec<Bytes>>();
    let produce = async move {
        let mut enc = FrameEncoder::start(tx, header, zstd_level, version, DATA_CHUNK).await?;
        for e in extents {
            enc.extent(e).await?;
        }
        enc.finish().await
    };
    let (chunks, r) = futures::join!(collect, produce);
    r?;
    Ok(chunks.concat())
}

/// Decodes a whole cycle body handed over as `chunks` (as they would arrive from HTTP/2) through
/// the same decoder the server feeds a request body into: the header and every verified extent
/// with its checksum, or the first error. Tests, tools and fuzzing; the server streams instead.
pub async fn decode_cycle(
    chunks: Vec<Bytes>,
) -> Result<(CycleHeader, Vec<CheckedExtent>), TransportError> {
    let chunks: ChunkStream = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    let (header, dec) = CycleDecoder::start(chunks).await?;
    let (mut stream, done) = ExtentStream::from_decoder(dec);
    let mut extents = Vec::new();
    while let Some(item) = stream.next().await {
        extents.push(item?);
    }
    if !done.load(Ordering::SeqCst) {
        return Err(TransportError::Truncated("without a verified end frame"));
    }
    Ok((header, extents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::{CycleConsistency, CycleKind, DiskInfo};

    fn header() -> CycleHeader {
        CycleHeader {
            vm: uuid::Uuid::nil(),
            id: 2,
            base: Some(1),
            kind: CycleKind::Incremental,
            consistency: CycleConsistency::CrashConsistent,
            taken_at_ms: 5,
            disks: vec![
                DiskInfo {
                    id: "a".into(),
                    size: 1 << 30,
                },
                DiskInfo {
                    id: "b".into(),
                    size: 1 << 20,
                },
            ],
            group: None,
        }
    }

    fn extents() -> Vec<Extent> {
        vec![
            Extent {
                disk: 0,
                offset: 0,
                data: ExtentData::Data(Bytes::from(vec![7u8; 300_000])),
            },
            Extent {
                disk: 1,
                offset: 4096,
                data: ExtentData::Zero(65536),
            },
            Extent {
                disk: 0,
                offset: 1 << 20,
                data: ExtentData::Data(Bytes::from(
                    (0..2_000_000u32).map(|i| i as u8).collect::<Vec<_>>(),
                )),
            },
        ]
    }

    async fn encode(level: Option<i32>) -> Vec<u8> {
        encode_v(level, STREAM_VERSION).await
    }

    async fn encode_v(level: Option<i32>, version: u16) -> Vec<u8> {
        let (tx, rx) = mpsc::channel(4);
        let collect = rx.collect::<Vec<Bytes>>();
        let produce = async move {
            let mut enc = FrameEncoder::start(tx, &header(), level, version, CHUNK).await?;
            for e in extents() {
                enc.extent(e).await?;
            }
            enc.finish().await
        };
        let (chunks, r) = futures::join!(collect, produce);
        r.expect("encode");
        chunks.concat()
    }

    fn body_version(head: &[u8]) -> u16 {
        u16::from_le_bytes([head[4], head[5]])
    }

    async fn decode(body: Vec<u8>, chunk: usize) -> Result<Vec<Extent>, TransportError> {
        let body_head: Vec<u8> = body.iter().copied().take(8).chain([0; 8]).collect();
        let chunks: Vec<Result<Bytes, TransportError>> = body
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let (h, dec) = CycleDecoder::start(futures::stream::iter(chunks).boxed()).await?;
        assert_eq!(h, header());
        let (s, done) = ExtentStream::from_decoder(dec);
        let items: Vec<_> = s.collect().await;
        let mut out = Vec::new();
        for i in items {
            let c = i?;
            let scheme = if body_version(&body_head) >= 2 {
                ChecksumScheme::Blocks
            } else {
                ChecksumScheme::Whole
            };
            assert_eq!(
                CheckedExtent::compute(c.extent().clone(), scheme).checksum(),
                c.checksum()
            );
            out.push(c.into_extent());
        }
        assert!(done.load(Ordering::SeqCst));
        Ok(out)
    }

    /// A payload of up to `DATA_CHUNK` bytes is sent as one chunk; when it arrives as one (one
    /// HTTP/2 DATA frame), the extent handed out is a slice of that chunk, not a copy.
    #[tokio::test]
    async fn a_payload_that_arrives_in_one_chunk_is_handed_out_without_a_copy() {
        let data: Vec<u8> = (0..DATA_CHUNK as u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let extent = Extent {
            disk: 0,
            offset: 0,
            data: ExtentData::Data(Bytes::from(data.clone())),
        };
        let (tx, rx) = mpsc::channel(100);
        let collect = rx.collect::<Vec<Bytes>>();
        let produce = async move {
            let mut enc =
                FrameEncoder::start(tx, &header(), None, STREAM_VERSION, DATA_CHUNK).await?;
            enc.extent(extent).await?;
            enc.finish().await
        };
        let (chunks, r) = futures::join!(collect, produce);
        r.expect("encode");
        let whole = chunks
            .iter()
            .find(|c| c.len() == DATA_CHUNK)
            .expect("the payload is one chunk")
            .clone();
        let (_, dec) =
            CycleDecoder::start(futures::stream::iter(chunks.into_iter().map(Ok)).boxed())
                .await
                .expect("start");
        let (s, _) = ExtentStream::from_decoder(dec);
        let got: Vec<_> = s.collect().await;
        assert_eq!(got.len(), 1);
        let got = got
            .into_iter()
            .next()
            .expect("one")
            .expect("valid")
            .into_extent();
        let ExtentData::Data(payload) = got.data else {
            panic!("a data extent")
        };
        assert_eq!(&payload[..], &data[..]);
        assert_eq!(payload.as_ptr(), whole.as_ptr(), "the payload was copied");
    }

    #[tokio::test]
    async fn round_trip_plain_and_zstd() {
        for version in [STREAM_VERSION_1, STREAM_VERSION] {
            for level in [None, Some(1), Some(3)] {
                let body = encode_v(level, version).await;
                for chunk in [1, 7, 16384, body.len()] {
                    if chunk == 1 && body.len() > 100_000 {
                        continue;
                    }
                    let got = decode(body.clone(), chunk).await.expect("decode");
                    assert_eq!(got, extents());
                }
            }
        }
    }

    #[tokio::test]
    async fn version_2_compresses_only_what_is_worth_it() {
        let random: Vec<u8> = {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        assert!(!worth_compressing(&random));
        assert!(worth_compressing(&text));
        assert!(worth_compressing(&[0u8; 65536]));
        for (data, max, min) in [(&random, 66_000, 65_536), (&text, 8_000, 0)] {
            let e = Extent {
                disk: 0,
                offset: 65536,
                data: ExtentData::Data(Bytes::from(data.clone())),
            };
            let body = encode_cycle(&header(), vec![e.clone()], Some(1))
                .await
                .expect("encode");
            assert!(
                (min..max).contains(&body.len()),
                "body of {} bytes",
                body.len()
            );
            let (_, got) = decode_cycle(vec![Bytes::from(body)]).await.expect("decode");
            assert_eq!(got[0].extent(), &e);
            // Version 2 checksums block by block and hands the block hashes on.
            assert_eq!(
                got[0].block_hashes(),
                Some(&[(1u64, *blake3::hash(data).as_bytes())][..])
            );
        }
    }

    #[tokio::test]
    async fn decode_cycle_reads_what_encode_cycle_wrote() {
        for level in [None, Some(1)] {
            let body = encode_cycle(&header(), extents(), level)
                .await
                .expect("encode");
            let chunks = body.chunks(5000).map(Bytes::copy_from_slice).collect();
            let (h, got) = decode_cycle(chunks).await.expect("decode");
            assert_eq!(h, header());
            let got: Vec<Extent> = got.into_iter().map(CheckedExtent::into_extent).collect();
            assert_eq!(got, extents());
            let cut = body[..body.len() - 1].to_vec();
            assert!(matches!(
                decode_cycle(vec![Bytes::from(cut)]).await,
                Err(TransportError::Truncated(_))
            ));
        }
    }

    #[tokio::test]
    async fn flipped_byte_is_detected() {
        let body = encode(None).await;
        // A byte inside the first extent's data.
        let mut bad = body.clone();
        bad[200_000] ^= 1;
        assert!(matches!(
            decode(bad, 4096).await,
            Err(TransportError::CorruptExtent { index: 0 })
        ));
        // Every single-byte flip after the stream header fails somehow, never panics.
        let mut failures = 0;
        for pos in (8..body.len()).step_by(body.len() / 97) {
            let mut bad = body.clone();
            bad[pos] ^= 0x40;
            if decode(bad, 65536).await.is_err() {
                failures += 1;
            }
        }
        assert!(failures > 90, "{failures}");
    }

    #[tokio::test]
    async fn flipped_compressed_byte_is_detected() {
        let body = encode(Some(3)).await;
        for pos in (8..body.len()).step_by(body.len() / 50 + 1) {
            let mut bad = body.clone();
            bad[pos] ^= 0x10;
            assert!(decode(bad, 4096).await.is_err(), "flip at {pos} undetected");
        }
    }

    #[tokio::test]
    async fn truncation_is_the_senders_error() {
        for level in [None, Some(1)] {
            let body = encode(level).await;
            for cut in [3, 8, 20, body.len() / 2, body.len() - 1] {
                let r = decode(body[..cut].to_vec(), 1000).await;
                assert!(
                    matches!(r, Err(TransportError::Truncated(_))),
                    "cut {cut}: {r:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn huge_lengths_are_protocol_errors() {
        let mut body = Vec::new();
        body.put_slice(&STREAM_MAGIC);
        body.put_u16_le(STREAM_VERSION);
        body.put_u16_le(0);
        body.put_u8(FRAME_HEADER);
        body.put_u32_le(u32::MAX);
        assert!(matches!(
            decode(body, 100).await,
            Err(TransportError::Protocol(ProtocolFault::HeaderTooLarge {
                len: 0xffff_ffff,
                max: MAX_HEADER_JSON
            }))
        ));

        let json = serde_json::to_vec(&header()).expect("json");
        let mut body = Vec::new();
        body.put_slice(&STREAM_MAGIC);
        body.put_u16_le(STREAM_VERSION);
        body.put_u16_le(0);
        body.put_u8(FRAME_HEADER);
        body.put_u32_le(json.len() as u32);
        body.put_slice(&json);
        body.put_u8(FRAME_EXTENT);
        body.put_u32_le(0);
        body.put_u64_le(0);
        body.put_u8(KIND_DATA);
        body.put_u64_le(1 << 29);
        body.put_slice(&[0; 32]);
        body.put_u8(ENC_RAW);
        body.put_u64_le(1 << 29);
        assert!(matches!(
            decode(body, 100).await,
            Err(TransportError::Protocol(ProtocolFault::ExtentTooLarge {
                len: 0x2000_0000,
                max: MAX_EXTENT_DATA
            }))
        ));

        let mut bad_magic = encode(None).await;
        bad_magic[0] = b'X';
        assert!(matches!(
            decode(bad_magic, 100).await,
            Err(TransportError::Protocol(ProtocolFault::StreamMagic))
        ));
    }

    #[tokio::test]
    async fn encoder_rejects_out_of_range_extents() {
        let (tx, _rx) = mpsc::channel(100);
        let mut enc = FrameEncoder::start(tx, &header(), None, STREAM_VERSION, DATA_CHUNK)
            .await
            .expect("start");
        let e = Extent {
            disk: 1,
            offset: (1 << 20) - 10,
            data: ExtentData::Zero(11),
        };
        assert!(matches!(
            enc.extent(e).await,
            Err(TransportError::Protocol(ProtocolFault::ExtentOutOfRange {
                disk: 1,
                size: 0x10_0000,
                ..
            }))
        ));
        let e = Extent {
            disk: 2,
            offset: 0,
            data: ExtentData::Zero(1),
        };
        assert!(matches!(
            enc.extent(e).await,
            Err(TransportError::Protocol(ProtocolFault::NoSuchDisk {
                disk: 2,
                disks: 2
            }))
        ));
    }
}
