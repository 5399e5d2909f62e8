//! The binary cycle body (see docs/protocol.md): stream header, then Header, Extent… and End
//! frames, the frame part optionally one zstd stream. Encoding (sender side, feeding a bounded
//! channel) and incremental decoding (receiver side, pulling the HTTP body only as fast as the
//! handler consumes extents) with every length bounded.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::stream::BoxStream;
use futures::{SinkExt, Stream, StreamExt};
use vmr_proto::{CycleHeader, Extent, ExtentData};
use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

use crate::error::TransportError;

/// First four bytes of every cycle body.
pub const STREAM_MAGIC: [u8; 4] = *b"VMRC";
/// Version of the cycle body framing.
pub const STREAM_VERSION: u16 = 1;
/// Extents of at least this many data bytes are hashed (and compressed) on a blocking thread;
/// smaller ones in place on the runtime.
const OFF_RUNTIME: usize = 1 << 20;
/// Stream header flag: the frames after the stream header form one zstd stream.
pub const FLAG_ZSTD: u16 = 1;
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
/// type + count + total + digest
const END_FRAME_LEN: usize = 1 + 8 + 8 + 32;
/// Size of the body chunks the sender hands to HTTP/2.
pub(crate) const CHUNK: usize = 256 << 10;
/// Decompression step: at most this many bytes are produced per decoder call.
const SCRATCH: usize = 128 << 10;

fn protocol(msg: impl Into<String>) -> TransportError {
    TransportError::Protocol(msg.into())
}

/// Checks an extent against the header's disk table; returns its length.
fn check_extent(disks: &[u64], disk: u32, offset: u64, len: u64) -> Result<(), TransportError> {
    let size = disks.get(disk as usize).ok_or_else(|| {
        protocol(format!(
            "extent names disk {disk}, cycle has {}",
            disks.len()
        ))
    })?;
    match offset.checked_add(len) {
        Some(end) if end <= *size => Ok(()),
        _ => Err(protocol(format!(
            "extent {offset}+{len} of disk {disk} exceeds its size {size}"
        ))),
    }
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

/// Encodes one cycle body into a bounded channel of chunks.
pub(crate) struct FrameEncoder {
    tx: mpsc::Sender<Bytes>,
    zstd: Option<ZstdWriter>,
    pending: Vec<u8>,
    disks: Vec<u64>,
    digest: blake3::Hasher,
    count: u64,
    total: u64,
}

impl FrameEncoder {
    /// Starts a body: sends the stream header and queues the Header frame.
    pub(crate) async fn start(
        tx: mpsc::Sender<Bytes>,
        header: &CycleHeader,
        zstd_level: Option<i32>,
    ) -> Result<FrameEncoder, TransportError> {
        let json = serde_json::to_vec(header)
            .map_err(|e| TransportError::Local(format!("cannot encode cycle header: {e}")))?;
        if json.len() > MAX_HEADER_JSON as usize {
            return Err(protocol(format!(
                "cycle header is {} bytes of json",
                json.len()
            )));
        }
        let zstd = match zstd_level {
            Some(level) => Some(
                ZstdWriter::new(Vec::with_capacity(CHUNK), level)
                    .map_err(|e| TransportError::Local(format!("zstd encoder: {e}")))?,
            ),
            None => None,
        };
        let mut sh = Vec::with_capacity(STREAM_HEADER_LEN);
        sh.put_slice(&STREAM_MAGIC);
        sh.put_u16_le(STREAM_VERSION);
        sh.put_u16_le(if zstd.is_some() { FLAG_ZSTD } else { 0 });
        let mut enc = FrameEncoder {
            tx,
            zstd,
            pending: Vec::with_capacity(CHUNK),
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
            let piece = b.split_to(b.len().min(CHUNK));
            self.tx
                .send(piece)
                .await
                .map_err(|_| TransportError::Interrupted("request body closed".into()))?;
        }
        Ok(())
    }

    /// Sends (compressing if on) everything queued in `pending`.
    async fn flush_pending(&mut self) -> Result<(), TransportError> {
        let plain = std::mem::take(&mut self.pending);
        let out = match &mut self.zstd {
            Some(z) => {
                std::io::Write::write_all(z, &plain)
                    .map_err(|e| TransportError::Local(format!("zstd: {e}")))?;
                std::mem::take(z.get_mut())
            }
            None => plain,
        };
        self.pending = Vec::with_capacity(CHUNK);
        self.send(Bytes::from(out)).await
    }

    /// Queues one extent.
    pub(crate) async fn extent(&mut self, e: Extent) -> Result<(), TransportError> {
        let len = e.len();
        if matches!(e.data, ExtentData::Data(_)) && len > MAX_EXTENT_DATA {
            return Err(protocol(format!(
                "data extent of {len} bytes exceeds {MAX_EXTENT_DATA}"
            )));
        }
        check_extent(&self.disks, e.disk, e.offset, len)?;
        let cs = match &e.data {
            ExtentData::Zero(_) => {
                let cs = e.checksum();
                put_extent_header(&mut self.pending, &e, &cs);
                if self.pending.len() >= CHUNK {
                    self.flush_pending().await?;
                }
                cs
            }
            ExtentData::Data(data) => {
                let data = data.clone();
                let mut pending = std::mem::take(&mut self.pending);
                let zstd = self.zstd.take();
                let small = data.len() < OFF_RUNTIME;
                let job = move || {
                    let cs = e.checksum();
                    put_extent_header(&mut pending, &e, &cs);
                    match zstd {
                        Some(mut z) => {
                            let r = std::io::Write::write_all(&mut z, &pending)
                                .and_then(|()| std::io::Write::write_all(&mut z, &data));
                            let out = std::mem::take(z.get_mut());
                            pending.clear();
                            (
                                cs,
                                r.map(|()| (Some(z), Bytes::from(out), Bytes::new())),
                                pending,
                            )
                        }
                        None => {
                            let head = Bytes::from(std::mem::take(&mut pending));
                            (cs, Ok((None, head, data)), pending)
                        }
                    }
                };
                // A small extent is hashed and compressed in place (tens of microseconds): a
                // hand-over to a blocking thread per 64 KiB block would cost more than the work
                // on a busy host. Large ones leave the runtime.
                let (cs, r, pending) = if small {
                    job()
                } else {
                    tokio::task::spawn_blocking(job)
                        .await
                        .map_err(|e| TransportError::Local(format!("encoder task failed: {e}")))?
                };
                self.pending = pending;
                let (zstd, first, second) =
                    r.map_err(|e| TransportError::Local(format!("zstd: {e}")))?;
                self.zstd = zstd;
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
        if let Some(z) = self.zstd.take() {
            let out = z
                .finish()
                .map_err(|e| TransportError::Local(format!("zstd: {e}")))?;
            self.send(Bytes::from(out)).await?;
        }
        Ok(())
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
                        .map_err(|e| protocol(format!("corrupt zstd stream: {e}")))?;
                    let (consumed, produced) = (inb.pos(), outb.pos());
                    self.pending.advance(consumed);
                    self.buf.extend_from_slice(&self.scratch[..produced]);
                    need_input = produced == 0 && self.pending.is_empty();
                    if produced == 0 && consumed == 0 && !self.pending.is_empty() {
                        return Err(protocol("zstd decoder made no progress"));
                    }
                }
            } else if !self.pending.is_empty() {
                self.buf.extend_from_slice(&self.pending);
                self.pending.clear();
            }
            if need_input && self.buf.len() < n && !self.next_chunk().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Incremental decoder of one cycle body.
pub(crate) struct CycleDecoder {
    src: Source,
    disks: Vec<u64>,
    index: u64,
    total: u64,
    digest: blake3::Hasher,
}

/// The body ended cleanly (the sender closed it) before the stream was complete: the sender's
/// error, not a network failure (a cut connection fails the body with `Interrupted` instead).
fn interrupted(what: &str) -> TransportError {
    TransportError::Truncated(format!("cycle stream ended {what}"))
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
            return Err(protocol("bad stream magic"));
        }
        sh.advance(4);
        let version = sh.get_u16_le();
        let flags = sh.get_u16_le();
        if version != STREAM_VERSION {
            return Err(protocol(format!("unsupported stream version {version}")));
        }
        if flags & !FLAG_ZSTD != 0 {
            return Err(protocol(format!("unknown stream flags {flags:#x}")));
        }
        if flags & FLAG_ZSTD != 0 {
            let dec = RawDecoder::new()
                .map_err(|e| TransportError::Local(format!("zstd decoder: {e}")))?;
            src.zstd = Some(Box::new(dec));
            src.scratch = vec![0; SCRATCH];
        }
        if !src.fill(5).await? {
            return Err(interrupted("before the header frame"));
        }
        if src.buf[0] != FRAME_HEADER {
            return Err(protocol(format!(
                "expected header frame, got type {}",
                src.buf[0]
            )));
        }
        let len = u32::from_le_bytes([src.buf[1], src.buf[2], src.buf[3], src.buf[4]]);
        if len > MAX_HEADER_JSON {
            return Err(protocol(format!(
                "header frame of {len} bytes exceeds {MAX_HEADER_JSON}"
            )));
        }
        if !src.fill(5 + len as usize).await? {
            return Err(interrupted("inside the header frame"));
        }
        src.buf.advance(5);
        let json = src.buf.split_to(len as usize);
        let header: CycleHeader = serde_json::from_slice(&json)
            .map_err(|e| protocol(format!("bad cycle header json: {e}")))?;
        header
            .check()
            .map_err(|e| protocol(format!("cycle header refused: {e}")))?;
        let disks = header.disks.iter().map(|d| d.size).collect();
        let dec = CycleDecoder {
            src,
            disks,
            index: 0,
            total: 0,
            digest: blake3::Hasher::new(),
        };
        Ok((header, dec))
    }

    /// Next verified extent, or `None` after a verified End frame and end of body.
    pub(crate) async fn next_extent(
        &mut self,
    ) -> Result<Option<(Extent, [u8; 32])>, TransportError> {
        if !self.src.fill(1).await? {
            return Err(interrupted("without an end frame"));
        }
        match self.src.buf[0] {
            FRAME_EXTENT => self.extent().await.map(Some),
            FRAME_END => self.end().await.map(|()| None),
            t => Err(protocol(format!("unknown frame type {t}"))),
        }
    }

    async fn extent(&mut self) -> Result<(Extent, [u8; 32]), TransportError> {
        if !self.src.fill(EXTENT_FRAME_LEN).await? {
            return Err(interrupted("inside an extent frame"));
        }
        let mut h = self.src.buf.split_to(EXTENT_FRAME_LEN);
        h.advance(1);
        let disk = h.get_u32_le();
        let offset = h.get_u64_le();
        let kind = h.get_u8();
        let len = h.get_u64_le();
        let mut cs = [0u8; 32];
        h.copy_to_slice(&mut cs);
        check_extent(&self.disks, disk, offset, len)?;
        let data = match kind {
            KIND_ZERO => ExtentData::Zero(len),
            KIND_DATA => {
                if len > MAX_EXTENT_DATA {
                    return Err(protocol(format!(
                        "data extent of {len} bytes exceeds {MAX_EXTENT_DATA}"
                    )));
                }
                if !self.src.fill(len as usize).await? {
                    return Err(interrupted("inside extent data"));
                }
                ExtentData::Data(self.src.buf.split_to(len as usize).freeze())
            }
            k => return Err(protocol(format!("unknown extent kind {k}"))),
        };
        let extent = Extent { disk, offset, data };
        let index = self.index;
        let computed = if len as usize >= OFF_RUNTIME {
            let e = extent.clone();
            tokio::task::spawn_blocking(move || e.checksum())
                .await
                .map_err(|e| TransportError::Local(format!("checksum task failed: {e}")))?
        } else {
            extent.checksum()
        };
        if computed != cs {
            tracing::warn!(index, disk, offset, "extent checksum mismatch");
            return Err(TransportError::CorruptExtent { index });
        }
        self.digest.update(&cs);
        self.index += 1;
        self.total += len;
        Ok((extent, cs))
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
            return Err(protocol(format!(
                "end frame says {count} extents / {total} bytes, received {} / {}",
                self.index, self.total
            )));
        }
        if digest != *self.digest.finalize().as_bytes() {
            return Err(protocol(
                "end frame digest does not match the extent checksums",
            ));
        }
        if self.src.fill(1).await? {
            return Err(protocol("data after the end frame"));
        }
        if self.src.zstd.is_some() && self.src.hint != 0 {
            return Err(interrupted("inside the zstd stream"));
        }
        Ok(())
    }
}

/// The extents of one incoming cycle, decoded lazily as the body arrives, each with its verified
/// checksum. Yields `None` only after the End frame verified (count, bytes, digest); any `Err`
/// (corrupt extent, protocol violation, peer vanished) is the last item and means: discard.
pub struct ExtentStream {
    inner: BoxStream<'static, Result<(Extent, [u8; 32]), TransportError>>,
}

impl std::fmt::Debug for ExtentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtentStream")
    }
}

impl ExtentStream {
    /// Wraps any stream (for handler tests in other crates).
    pub fn from_stream(
        s: impl Stream<Item = Result<(Extent, [u8; 32]), TransportError>> + Send + 'static,
    ) -> ExtentStream {
        ExtentStream { inner: s.boxed() }
    }

    /// Stream over a decoder; the flag turns true once the End frame verified.
    pub(crate) fn from_decoder(dec: CycleDecoder) -> (ExtentStream, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let s = futures::stream::unfold(Some(dec), move |state| {
            let flag = flag.clone();
            async move {
                let mut dec = state?;
                match dec.next_extent().await {
                    Ok(Some(item)) => Some((Ok(item), Some(dec))),
                    Ok(None) => {
                        flag.store(true, Ordering::SeqCst);
                        None
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        });
        (ExtentStream { inner: s.boxed() }, done)
    }
}

impl Stream for ExtentStream {
    type Item = Result<(Extent, [u8; 32]), TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Encodes a whole cycle body in memory (tests and tools; the client streams instead).
pub async fn encode_cycle(
    header: &CycleHeader,
    extents: Vec<Extent>,
    zstd_level: Option<i32>,
) -> Result<Vec<u8>, TransportError> {
    let (tx, rx) = mpsc::channel(4);
    let collect = rx.collect::<Vec<Bytes>>();
    let produce = async move {
        let mut enc = FrameEncoder::start(tx, header, zstd_level).await?;
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
) -> Result<(CycleHeader, Vec<(Extent, [u8; 32])>), TransportError> {
    let chunks: ChunkStream = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    let (header, dec) = CycleDecoder::start(chunks).await?;
    let (mut stream, done) = ExtentStream::from_decoder(dec);
    let mut extents = Vec::new();
    while let Some(item) = stream.next().await {
        extents.push(item?);
    }
    if !done.load(Ordering::SeqCst) {
        return Err(TransportError::Truncated(
            "cycle stream ended without a verified end frame".into(),
        ));
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
        let (tx, rx) = mpsc::channel(4);
        let collect = rx.collect::<Vec<Bytes>>();
        let produce = async move {
            let mut enc = FrameEncoder::start(tx, &header(), level).await?;
            for e in extents() {
                enc.extent(e).await?;
            }
            enc.finish().await
        };
        let (chunks, r) = futures::join!(collect, produce);
        r.expect("encode");
        chunks.concat()
    }

    async fn decode(body: Vec<u8>, chunk: usize) -> Result<Vec<Extent>, TransportError> {
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
            let (e, cs) = i?;
            assert_eq!(e.checksum(), cs);
            out.push(e);
        }
        assert!(done.load(Ordering::SeqCst));
        Ok(out)
    }

    #[tokio::test]
    async fn round_trip_plain_and_zstd() {
        for level in [None, Some(1), Some(3)] {
            let body = encode(level).await;
            for chunk in [1, 7, 16384, body.len()] {
                if chunk == 1 && body.len() > 100_000 {
                    continue;
                }
                let got = decode(body.clone(), chunk).await.expect("decode");
                assert_eq!(got, extents());
            }
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
            let got: Vec<Extent> = got.into_iter().map(|(e, _)| e).collect();
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
            Err(TransportError::Protocol(_))
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
        assert!(matches!(
            decode(body, 100).await,
            Err(TransportError::Protocol(_))
        ));

        let mut bad_magic = encode(None).await;
        bad_magic[0] = b'X';
        assert!(matches!(
            decode(bad_magic, 100).await,
            Err(TransportError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn encoder_rejects_out_of_range_extents() {
        let (tx, _rx) = mpsc::channel(100);
        let mut enc = FrameEncoder::start(tx, &header(), None)
            .await
            .expect("start");
        let e = Extent {
            disk: 1,
            offset: (1 << 20) - 10,
            data: ExtentData::Zero(11),
        };
        assert!(matches!(
            enc.extent(e).await,
            Err(TransportError::Protocol(_))
        ));
        let e = Extent {
            disk: 2,
            offset: 0,
            data: ExtentData::Zero(1),
        };
        assert!(matches!(
            enc.extent(e).await,
            Err(TransportError::Protocol(_))
        ));
    }
}
