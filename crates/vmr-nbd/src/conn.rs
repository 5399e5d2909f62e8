//! The transmission engine: the cookie -> waiter map, the writer task that serialises requests
//! onto the socket, and the reader task that parses, validates and demultiplexes replies.
//!
//! Reply handling is split in two steps so no lock is held across an await: the reader copies
//! the small request facts (command, offset, length) out of the map, validates the chunk length
//! against them and reads the payload (bounded by the request's own length), then re-locks the
//! map and applies the parsed chunk. Any malformed server data kills the connection: every
//! pending and later request fails with the recorded reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::{DeadReason, NbdError, ProtocolFault};
use crate::proto::*;
use crate::{ReadChunk, StatusExtent};

/// Most descriptors accepted in one block status chunk (QEMU sends at most 1 MiB / 8).
pub(crate) const MAX_STATUS_EXTENTS: usize = 1 << 17;
/// Largest error chunk payload (`ERROR_OFFSET` with a maximal message).
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;
/// Socket buffer sizes of the reader and writer.
const IO_BUFFER: usize = 256 << 10;
/// Write payloads at least this large past the write buffer.
const DIRECT_PAYLOAD: usize = 16 << 10;

/// Successful result of one request.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Write, trim, flush, write zeroes.
    Done,
    /// Read: chunks sorted by offset, covering the range exactly.
    Read(Vec<ReadChunk>),
    /// Block status: extents of the wanted context.
    Status(Vec<StatusExtent>),
}

impl Reply {
    /// The kind of reply, for an error that names it.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Reply::Done => "completion",
            Reply::Read(_) => "read",
            Reply::Status(_) => "block_status",
        }
    }
}

/// Everything the engine knows about one request in flight.
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    want_ctx: u32,
    tx: oneshot::Sender<Result<Reply, NbdError>>,
    _permit: Option<OwnedSemaphorePermit>,
    chunks: Vec<ReadChunk>,
    covered: u64,
    extents: Option<Vec<StatusExtent>>,
    seen_ctx: Vec<u32>,
    error: Option<NbdError>,
    got_chunk: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    dead: Option<DeadReason>,
    closing: bool,
    next_cookie: u64,
}

/// State shared by the client handles and the two I/O tasks.
pub(crate) struct Shared {
    state: Mutex<State>,
    tasks: Mutex<Vec<AbortHandle>>,
    size: u64,
    structured: bool,
    context_ids: Vec<u32>,
}

/// A message for the writer task.
pub(crate) enum WriterMsg {
    /// A request header and its payload (write only).
    Request([u8; REQUEST_LEN], Option<Bytes>),
    /// `NBD_CMD_DISC`: write it, flush, shut the socket down, acknowledge.
    Disconnect([u8; REQUEST_LEN], oneshot::Sender<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn proto(fault: ProtocolFault) -> NbdError {
    NbdError::Protocol(fault)
}

/// Facts about a pending request needed to validate a chunk before reading its payload.
#[derive(Clone, Copy)]
struct ReqFacts {
    cmd: u16,
    offset: u64,
    len: u32,
}

/// A chunk payload after reading and local validation.
enum Parsed {
    None,
    Data(u64, Bytes),
    Hole(u64, u32),
    Status(u32, Vec<(u32, u32)>),
    Error(ErrorChunk),
}

impl Shared {
    pub(crate) fn new(size: u64, structured: bool, context_ids: Vec<u32>) -> Self {
        Self {
            state: Mutex::new(State {
                next_cookie: 1,
                ..State::default()
            }),
            tasks: Mutex::new(Vec::new()),
            size,
            structured,
            context_ids,
        }
    }

    /// Remember the I/O tasks so a failure can stop both; stops them at once if already dead.
    pub(crate) fn set_tasks(&self, handles: Vec<AbortHandle>) {
        let dead = lock(&self.state).dead.is_some();
        if dead {
            handles.iter().for_each(AbortHandle::abort);
        }
        *lock(&self.tasks) = handles;
    }

    /// Mark the connection dead (first reason wins), fail every pending request and stop the
    /// I/O tasks.
    pub(crate) fn fail(&self, reason: DeadReason) {
        let (pending, reason) = {
            let mut st = lock(&self.state);
            let reason = st.dead.get_or_insert(reason).clone();
            (std::mem::take(&mut st.pending), reason)
        };
        for (_, p) in pending {
            let _ = p.tx.send(Err(reason.to_error()));
        }
        for h in lock(&self.tasks).iter() {
            h.abort();
        }
    }

    /// The error for a request on a dead (or closing) connection.
    pub(crate) fn dead_error(&self) -> NbdError {
        lock(&self.state)
            .dead
            .as_ref()
            .map_or(NbdError::Closed, DeadReason::to_error)
    }

    /// Is the connection dead?
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.state).dead.is_some()
    }

    /// Stop accepting new requests (disconnect in progress).
    pub(crate) fn set_closing(&self) {
        lock(&self.state).closing = true;
    }

    /// Allocate a cookie without registering a waiter (for `NBD_CMD_DISC`).
    pub(crate) fn next_cookie(&self) -> u64 {
        let mut st = lock(&self.state);
        let c = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        c
    }

    /// Register a request; returns its cookie and the receiver of its reply.
    #[allow(clippy::type_complexity)]
    pub(crate) fn register(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        want_ctx: u32,
        permit: OwnedSemaphorePermit,
    ) -> Result<(u64, oneshot::Receiver<Result<Reply, NbdError>>), NbdError> {
        let mut st = lock(&self.state);
        if let Some(d) = &st.dead {
            return Err(d.to_error());
        }
        if st.closing {
            return Err(NbdError::Closed);
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        st.pending.insert(
            cookie,
            Pending {
                cmd,
                offset,
                len,
                want_ctx,
                tx,
                _permit: Some(permit),
                chunks: Vec::new(),
                covered: 0,
                extents: None,
                seen_ctx: Vec::new(),
                error: None,
                got_chunk: false,
            },
        );
        Ok((cookie, rx))
    }

    /// Forget a registered request (its header never reached the writer).
    pub(crate) fn unregister(&self, cookie: u64) {
        lock(&self.state).pending.remove(&cookie);
    }

    fn facts(&self, cookie: u64) -> Result<ReqFacts, NbdError> {
        let st = lock(&self.state);
        match st.pending.get(&cookie) {
            Some(p) => Ok(ReqFacts {
                cmd: p.cmd,
                offset: p.offset,
                len: p.len,
            }),
            None => Err(proto(ProtocolFault::UnknownCookie(cookie))),
        }
    }
}

/// Run the writer until the channel closes, a disconnect is written, or the socket fails.
pub(crate) async fn writer_task<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(IO_BUFFER, w);
    let res: std::io::Result<()> = async {
        while let Some(mut msg) = rx.recv().await {
            loop {
                match msg {
                    WriterMsg::Request(h, payload) => {
                        w.write_all(&h).await?;
                        match payload {
                            // A large payload goes straight to the socket after what is
                            // buffered (one more system call instead of a copy).
                            Some(p) if p.len() >= DIRECT_PAYLOAD => {
                                w.flush().await?;
                                w.get_mut().write_all(&p).await?;
                            }
                            Some(p) => w.write_all(&p).await?,
                            None => {}
                        }
                    }
                    WriterMsg::Disconnect(h, ack) => {
                        w.write_all(&h).await?;
                        w.flush().await?;
                        w.shutdown().await?;
                        let _ = ack.send(());
                        return Ok(());
                    }
                }
                // Batch whatever else is queued before flushing.
                match rx.try_recv() {
                    Ok(m) => msg = m,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        shared.fail(DeadReason::Io(e.kind(), e.to_string()));
    }
}

/// Run the reader until the stream ends or the server misbehaves, then fail everything pending.
pub(crate) async fn reader_task<R: AsyncRead + Unpin>(r: R, shared: Arc<Shared>) {
    let mut r = BufReader::with_capacity(IO_BUFFER, r);
    let reason = match read_loop(&mut r, &shared).await {
        Ok(()) => DeadReason::Closed,
        Err(e) => {
            tracing::warn!(error = %e, "nbd connection failed");
            DeadReason::from_error(&e)
        }
    };
    shared.fail(reason);
}

/// Reads exactly `n` payload bytes: what the buffer holds, then the rest straight from the
/// socket into the payload's own memory (no pass through the buffer, no zeroing first).
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    n: usize,
) -> std::io::Result<BytesMut> {
    use bytes::BufMut;
    use tokio::io::AsyncBufReadExt;
    let mut buf = BytesMut::with_capacity(n);
    let held = r.buffer();
    let k = held.len().min(n);
    buf.extend_from_slice(&held[..k]);
    r.consume(k);
    while buf.len() < n {
        let want = n - buf.len();
        let got = r.get_mut().read_buf(&mut (&mut buf).limit(want)).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

async fn read_loop<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    shared: &Shared,
) -> Result<(), NbdError> {
    loop {
        let mut magic = [0u8; 4];
        if r.read(&mut magic[..1]).await? == 0 {
            return Ok(()); // clean end of stream between replies
        }
        r.read_exact(&mut magic[1..]).await?;
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                r.read_exact(&mut rest).await?;
                let h = SimpleReply::decode_rest(&rest);
                let f = shared.facts(h.cookie)?;
                let mut payload = None;
                if f.cmd == CMD_READ && h.error == 0 && !shared.structured {
                    payload = Some(read_payload(r, f.len as usize).await?.freeze());
                }
                complete_simple(shared, h, f, payload)?;
            }
            STRUCTURED_REPLY_MAGIC if shared.structured => {
                let mut rest = [0u8; 16];
                r.read_exact(&mut rest).await?;
                let h = ChunkHeader::decode_rest(&rest);
                let f = shared.facts(h.cookie)?;
                let parsed = read_chunk(r, &h, f).await?;
                apply_chunk(shared, &h, parsed)?;
            }
            m => return Err(proto(ProtocolFault::BadReplyMagic(m))),
        }
    }
}

fn complete_simple(
    shared: &Shared,
    h: SimpleReply,
    f: ReqFacts,
    payload: Option<Bytes>,
) -> Result<(), NbdError> {
    let mut st = lock(&shared.state);
    let Some(p) = st.pending.remove(&h.cookie) else {
        return Ok(()); // failed concurrently; the connection is going down
    };
    drop(st);
    if p.got_chunk {
        return Err(proto(ProtocolFault::SimpleAfterChunks(h.cookie)));
    }
    let result = if h.error != 0 {
        Err(NbdError::Server {
            command: command_name(f.cmd),
            errno: h.error,
            message: String::new(),
        })
    } else {
        match f.cmd {
            CMD_READ => match payload {
                Some(data) => Ok(Reply::Read(vec![ReadChunk::Data {
                    offset: f.offset,
                    data,
                }])),
                None => {
                    return Err(proto(ProtocolFault::SimpleReplyNotAllowed(command_name(
                        f.cmd,
                    ))));
                }
            },
            CMD_BLOCK_STATUS => {
                return Err(proto(ProtocolFault::SimpleReplyNotAllowed(command_name(
                    f.cmd,
                ))));
            }
            _ => Ok(Reply::Done),
        }
    };
    let _ = p.tx.send(result);
    Ok(())
}

/// Validate a chunk header against its request and read the payload (never more than the
/// request itself can justify).
async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    h: &ChunkHeader,
    f: ReqFacts,
) -> Result<Parsed, NbdError> {
    let name = command_name(f.cmd);
    let bad_len = || {
        proto(ProtocolFault::ChunkLength {
            command: name,
            kind: h.kind,
            length: h.length,
        })
    };
    match h.kind {
        REPLY_TYPE_NONE => {
            if h.length != 0 {
                return Err(bad_len());
            }
            if !h.done() {
                return Err(proto(ProtocolFault::NoneChunkNotDone));
            }
            Ok(Parsed::None)
        }
        REPLY_TYPE_OFFSET_DATA if f.cmd == CMD_READ => {
            if h.length <= 8 || h.length - 8 > f.len {
                return Err(bad_len());
            }
            let mut o = [0u8; 8];
            r.read_exact(&mut o).await?;
            let off = u64::from_be_bytes(o);
            let dlen = h.length - 8;
            check_inside(f, off, u64::from(dlen))?;
            Ok(Parsed::Data(
                off,
                read_payload(r, dlen as usize).await?.freeze(),
            ))
        }
        REPLY_TYPE_OFFSET_HOLE if f.cmd == CMD_READ => {
            if h.length != 12 {
                return Err(bad_len());
            }
            let mut b = [0u8; 12];
            r.read_exact(&mut b).await?;
            let off = be64(&b[0..8]);
            let hlen = be32(&b[8..12]);
            if hlen == 0 {
                return Err(proto(ProtocolFault::EmptyHole));
            }
            check_inside(f, off, u64::from(hlen))?;
            Ok(Parsed::Hole(off, hlen))
        }
        REPLY_TYPE_BLOCK_STATUS if f.cmd == CMD_BLOCK_STATUS => {
            let max_descs = MAX_STATUS_EXTENTS.min(f.len.max(1) as usize);
            let max_len = 4 + 8 * max_descs as u64;
            if h.length < 12 || !(h.length - 4).is_multiple_of(8) || u64::from(h.length) > max_len {
                return Err(bad_len());
            }
            let mut buf = vec![0u8; h.length as usize];
            r.read_exact(&mut buf).await?;
            let (id, descs) = parse_block_status(&buf).map_err(proto)?;
            Ok(Parsed::Status(id, descs))
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            if h.length < 6 || h.length > MAX_ERROR_CHUNK {
                return Err(bad_len());
            }
            let mut buf = vec![0u8; h.length as usize];
            r.read_exact(&mut buf).await?;
            let e = parse_error_chunk(&buf, h.kind == REPLY_TYPE_ERROR_OFFSET).map_err(proto)?;
            if let (Some(off), true) = (e.offset, f.len > 0) {
                check_inside(f, off, 1)?;
            }
            Ok(Parsed::Error(e))
        }
        k if k & 0x8000 != 0 => {
            // Unknown error chunk type: the spec says treat it as an error; keep errno if sane.
            if h.length < 6 || h.length > MAX_ERROR_CHUNK {
                return Err(bad_len());
            }
            let mut buf = vec![0u8; h.length as usize];
            r.read_exact(&mut buf).await?;
            let errno = be32(&buf[0..4]);
            Ok(Parsed::Error(ErrorChunk {
                errno: if errno == 0 { 5 } else { errno },
                message: format!("unknown error chunk type {k:#x}"),
                offset: None,
            }))
        }
        k => Err(proto(ProtocolFault::UnexpectedChunk {
            command: name,
            kind: k,
        })),
    }
}

/// Check that `[off, off+len)` lies inside the request's range.
fn check_inside(f: ReqFacts, off: u64, len: u64) -> Result<(), NbdError> {
    let req_end = f.offset + u64::from(f.len);
    match off.checked_add(len) {
        Some(end) if off >= f.offset && end <= req_end => Ok(()),
        _ => Err(proto(ProtocolFault::ChunkOutsideRequest {
            offset: off,
            len,
            req_offset: f.offset,
            req_len: f.len,
        })),
    }
}

/// Most read reply chunks accepted for a request of `len` bytes.
fn max_read_chunks(len: u32) -> usize {
    len as usize / 256 + 64
}

fn apply_chunk(shared: &Shared, h: &ChunkHeader, parsed: Parsed) -> Result<(), NbdError> {
    let mut st = lock(&shared.state);
    let Some(p) = st.pending.get_mut(&h.cookie) else {
        return Ok(()); // failed concurrently; the connection is going down
    };
    p.got_chunk = true;
    match parsed {
        Parsed::None => {}
        Parsed::Data(off, data) => {
            let n = data.len() as u64;
            account_read(p, n)?;
            p.chunks.push(ReadChunk::Data { offset: off, data });
        }
        Parsed::Hole(off, len) => {
            account_read(p, u64::from(len))?;
            p.chunks.push(ReadChunk::Hole { offset: off, len });
        }
        Parsed::Status(id, descs) => {
            if !shared.context_ids.contains(&id) {
                return Err(proto(ProtocolFault::UnknownContext(id)));
            }
            if p.seen_ctx.contains(&id) {
                return Err(proto(ProtocolFault::DuplicateContext(id)));
            }
            p.seen_ctx.push(id);
            if id == p.want_ctx {
                p.extents = Some(status_extents(p.offset, p.len, shared.size, &descs)?);
            }
        }
        Parsed::Error(e) => {
            if p.error.is_none() {
                p.error = Some(NbdError::Server {
                    command: command_name(p.cmd),
                    errno: e.errno,
                    message: e.message,
                });
            }
        }
    }
    if !h.done() {
        return Ok(());
    }
    let Some(mut p) = st.pending.remove(&h.cookie) else {
        return Ok(());
    };
    drop(st);
    let result = match p.error.take() {
        Some(e) => Err(e),
        None => match p.cmd {
            CMD_READ => Ok(Reply::Read(finish_read(
                p.offset,
                p.len,
                std::mem::take(&mut p.chunks),
            )?)),
            CMD_BLOCK_STATUS => match p.extents.take() {
                Some(x) => Ok(Reply::Status(x)),
                None => return Err(proto(ProtocolFault::MissingContext)),
            },
            _ => Ok(Reply::Done),
        },
    };
    let _ = p.tx.send(result);
    Ok(())
}

fn account_read(p: &mut Pending, n: u64) -> Result<(), NbdError> {
    p.covered += n;
    if p.covered > u64::from(p.len) {
        return Err(proto(ProtocolFault::ReadOvercovered));
    }
    if p.chunks.len() >= max_read_chunks(p.len) {
        return Err(proto(ProtocolFault::TooManyChunks));
    }
    Ok(())
}

/// Sort read chunks and require that they tile `[offset, offset+len)` exactly.
fn finish_read(
    offset: u64,
    len: u32,
    mut chunks: Vec<ReadChunk>,
) -> Result<Vec<ReadChunk>, NbdError> {
    chunks.sort_by_key(ReadChunk::offset);
    let mut pos = offset;
    for c in &chunks {
        if c.offset() != pos {
            return Err(proto(ProtocolFault::ReadGap(pos)));
        }
        pos += c.len();
    }
    if pos != offset + u64::from(len) {
        return Err(proto(ProtocolFault::ReadEnd {
            end: pos,
            expected: offset + u64::from(len),
        }));
    }
    Ok(chunks)
}

/// Turn block status descriptors into extents starting at `offset`; every descriptor must be
/// non-empty and start inside the requested range; the last one may run past it (clipped to
/// the export size).
fn status_extents(
    offset: u64,
    len: u32,
    size: u64,
    descs: &[(u32, u32)],
) -> Result<Vec<StatusExtent>, NbdError> {
    let req_end = offset + u64::from(len);
    let mut out = Vec::with_capacity(descs.len());
    let mut pos = offset;
    for &(dlen, flags) in descs {
        if dlen == 0 {
            return Err(proto(ProtocolFault::EmptyDescriptor));
        }
        if pos >= req_end || pos >= size {
            return Err(proto(ProtocolFault::DescriptorBeyondRange(pos)));
        }
        let end = (pos + u64::from(dlen)).min(size);
        out.push(StatusExtent {
            offset: pos,
            length: end - pos,
            flags,
        });
        pos = end;
    }
    if out.is_empty() {
        return Err(proto(ProtocolFault::NoDescriptors));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_tiling() {
        let d = |o: u64, n: usize| ReadChunk::Data {
            offset: o,
            data: Bytes::from(vec![1u8; n]),
        };
        let h = |o: u64, n: u32| ReadChunk::Hole { offset: o, len: n };
        let ok = finish_read(100, 30, vec![h(110, 10), d(100, 10), d(120, 10)]).unwrap();
        assert_eq!(
            ok.iter().map(ReadChunk::offset).collect::<Vec<_>>(),
            vec![100, 110, 120]
        );
        assert!(finish_read(100, 30, vec![d(100, 10), d(120, 10)]).is_err()); // gap
        assert!(finish_read(100, 30, vec![d(100, 20), d(110, 20)]).is_err()); // overlap
        assert!(finish_read(100, 30, vec![d(100, 20)]).is_err()); // short
        assert!(finish_read(100, 0, vec![]).is_ok());
    }

    #[test]
    fn status_validation() {
        let x = status_extents(0, 100, 1000, &[(50, 1), (50, 0)]).unwrap();
        assert_eq!(x.len(), 2);
        assert_eq!((x[1].offset, x[1].length), (50, 50));
        // Last descriptor may run past the request but is clipped to the export.
        let x = status_extents(900, 50, 1000, &[(4096, 3)]).unwrap();
        assert_eq!((x[0].offset, x[0].length), (900, 100));
        // A descriptor starting past the request is invalid.
        assert!(status_extents(0, 100, 1000, &[(100, 0), (10, 0)]).is_err());
        assert!(status_extents(0, 100, 1000, &[(0, 0)]).is_err());
        assert!(status_extents(0, 100, 1000, &[]).is_err());
    }

    #[test]
    fn inside_checks() {
        let f = ReqFacts {
            cmd: CMD_READ,
            offset: 4096,
            len: 4096,
        };
        assert!(check_inside(f, 4096, 4096).is_ok());
        assert!(check_inside(f, 4095, 10).is_err());
        assert!(check_inside(f, 8000, 200).is_err());
        assert!(check_inside(f, u64::MAX, 2).is_err());
    }
}
