//! vmr-nbd: vmreplica's asynchronous NBD client (tokio).
//!
//! Owns the public client API ([`NbdClient`]): connecting over a Unix socket or TCP, the
//! fixed-newstyle handshake with structured replies and meta contexts, and pipelined
//! transmission commands (`READ`, `WRITE`, `WRITE_ZEROES`, `TRIM`, `FLUSH`, `BLOCK_STATUS`,
//! `DISC`). Used on the primary to read dirty extents from QEMU's point-in-time export and on
//! the replica to write extents into images exported by `qemu-nbd` / `qemu-storage-daemon`.
//! See `docs/nbd-client.md` for the protocol subset, concurrency model and validation rules.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod budget;
mod conn;
mod error;
mod handshake;
pub mod proto;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use budget::{ByteBudget, Share};
use conn::{Reply, Shared, WriterMsg};
pub use error::{HandshakeFault, NbdError, ProtocolFault};
pub use handshake::BlockSize;
use proto::*;

/// `base:allocation` flag: the range is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the range is dirty.
pub const DIRTY: u32 = 1;

/// The meta context describing allocation (holes / zeros).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Hard cap on a single read/write payload, whatever the server allows.
pub const MAX_REQUEST_CAP: u32 = 32 << 20;

/// Largest length asked for in one `BLOCK_STATUS` by [`NbdClient::block_status_range`].
const STATUS_STEP: u64 = 1 << 30;

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP address, `"host:port"`.
    Tcp(String),
}

/// Connection parameters.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Export name (`""` = the server's default export).
    pub export: String,
    /// Meta contexts to select, e.g. `["base:allocation", "qemu:dirty-bitmap:vmr-1"]`.
    pub meta_contexts: Vec<String>,
    /// Requests outstanding at once (at least 1).
    pub max_in_flight: usize,
    /// Limit for the whole handshake and for each request; a request that times out after it
    /// was sent closes the connection.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            export: String::new(),
            meta_contexts: Vec::new(),
            max_in_flight: 16,
            timeout: Duration::from_secs(30),
        }
    }
}

/// One extent of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Start of the extent.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// Context-specific flags ([`STATE_HOLE`]/[`STATE_ZERO`] or [`DIRTY`]).
    pub flags: u32,
}

/// One piece of a read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Data at `offset`.
    Data {
        /// Start of the data.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// A hole of `len` bytes at `offset`; reads as zeros.
    Hole {
        /// Start of the hole.
        offset: u64,
        /// Length of the hole.
        len: u32,
    },
}

impl ReadChunk {
    /// Start offset of the chunk.
    pub fn offset(&self) -> u64 {
        match self {
            ReadChunk::Data { offset, .. } | ReadChunk::Hole { offset, .. } => *offset,
        }
    }

    /// Length of the chunk in bytes.
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data { data, .. } => data.len() as u64,
            ReadChunk::Hole { len, .. } => u64::from(*len),
        }
    }

    /// True for a zero-length chunk (never produced by the client).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Inner {
    size: u64,
    flags: u16,
    block_size: BlockSize,
    max_request: u32,
    contexts: HashMap<String, u32>,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<WriterMsg>,
    sem: Arc<Semaphore>,
    max_in_flight: u32,
    timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the reader; the writer drains and shuts down when its
        // channel closes.
        self.shared.fail(error::DeadReason::Closed);
    }
}

/// An NBD client connection. Cheap to clone (`Arc` inside), `Send + Sync`; concurrent calls
/// are pipelined on the one connection, at most `max_in_flight` at a time.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.inner.size)
            .field("flags", &self.inner.flags)
            .field("contexts", &self.inner.contexts)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connect to `ep` and negotiate per `opts`.
    pub async fn connect(ep: &Endpoint, opts: ConnectOptions) -> Result<NbdClient, NbdError> {
        let limit = opts.timeout;
        match ep {
            Endpoint::Unix(path) => {
                let s = tokio::time::timeout(limit, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| NbdError::Timeout)??;
                Self::connect_stream(s, opts).await
            }
            Endpoint::Tcp(addr) => {
                let s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr.as_str()))
                    .await
                    .map_err(|_| NbdError::Timeout)??;
                s.set_nodelay(true)?;
                Self::connect_stream(s, opts).await
            }
        }
    }

    /// Negotiate over an already connected stream (any transport, e.g. a test duplex pipe).
    pub async fn connect_stream<S>(
        mut stream: S,
        opts: ConnectOptions,
    ) -> Result<NbdClient, NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = tokio::time::timeout(
            opts.timeout,
            handshake::negotiate(&mut stream, &opts.export, &opts.meta_contexts),
        )
        .await
        .map_err(|_| NbdError::Timeout)??;
        let max_in_flight = u32::try_from(opts.max_in_flight.clamp(1, 1 << 16)).unwrap_or(1 << 16);
        let max_request = info.block_size.maximum.min(MAX_REQUEST_CAP);
        let shared = Arc::new(Shared::new(
            info.size,
            info.structured,
            info.contexts.values().copied().collect(),
        ));
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(conn::reader_task(rd, shared.clone()));
        let writer = tokio::spawn(conn::writer_task(wr, rx, shared.clone()));
        shared.set_tasks(vec![reader.abort_handle(), writer.abort_handle()]);
        tracing::debug!(
            size = info.size,
            flags = info.flags,
            structured = info.structured,
            "nbd connected"
        );
        Ok(NbdClient {
            inner: Arc::new(Inner {
                size: info.size,
                flags: info.flags,
                block_size: info.block_size,
                max_request,
                contexts: info.contexts,
                shared,
                writer: tx,
                sem: Arc::new(Semaphore::new(max_in_flight as usize)),
                max_in_flight,
                timeout: opts.timeout,
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Transmission flags the server sent (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.inner.flags
    }

    /// Block size constraints (server's, or defaults 1 / 4096 / 32 MiB).
    pub fn block_size(&self) -> BlockSize {
        self.inner.block_size
    }

    /// Largest length accepted by [`read`](Self::read) / [`write`](Self::write):
    /// `min(block_size().maximum, 32 MiB)`.
    pub fn max_request(&self) -> u32 {
        self.inner.max_request
    }

    /// True when the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.flags & TFLAG_READ_ONLY != 0
    }

    /// True when the server accepts `TRIM`.
    pub fn can_trim(&self) -> bool {
        self.inner.flags & TFLAG_SEND_TRIM != 0
    }

    /// True when the server accepts `WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.inner.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }

    /// True when the server accepts `FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.inner.flags & TFLAG_SEND_FLUSH != 0
    }

    /// True when the server accepts the FUA flag.
    pub fn can_fua(&self) -> bool {
        self.inner.flags & TFLAG_SEND_FUA != 0
    }

    /// Id the server assigned to a selected meta context, if it granted it.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.inner.contexts.get(name).copied()
    }

    /// True while the connection can still carry requests.
    pub fn is_connected(&self) -> bool {
        !self.inner.shared.is_dead()
    }

    /// Read `len` bytes at `offset`; holes read as zeros.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        let chunks = self.read_chunks(offset, len).await?;
        if let [ReadChunk::Data { data, .. }] = chunks.as_slice() {
            return Ok(data.clone());
        }
        let mut buf = BytesMut::zeroed(len as usize);
        for c in &chunks {
            if let ReadChunk::Data { offset: o, data } = c {
                // The engine already checked that chunks tile the range; stay panic-free anyway.
                let at = usize::try_from(o.wrapping_sub(offset)).unwrap_or(usize::MAX);
                let dst = at
                    .checked_add(data.len())
                    .and_then(|end| buf.get_mut(at..end))
                    .ok_or(NbdError::Protocol(ProtocolFault::ReadChunkOutside))?;
                dst.copy_from_slice(data);
            }
        }
        Ok(buf.freeze())
    }

    /// Read `len` bytes at `offset` as the server sent them: data and hole chunks, sorted by
    /// offset, tiling the range exactly.
    pub async fn read_chunks(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, NbdError> {
        self.check_payload(u64::from(len))?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match self.submit(CMD_READ, 0, offset, len, None, 0).await? {
            Reply::Read(chunks) => Ok(chunks),
            other => Err(NbdError::Protocol(ProtocolFault::WrongReply {
                command: command_name(CMD_READ),
                got: other.kind(),
            })),
        }
    }

    /// Write `data` at `offset`; `fua` forces it to stable storage before the reply.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        if self.is_read_only() {
            return Err(NbdError::Unsupported("write to a read-only export"));
        }
        let len = data.len() as u64;
        self.check_payload(len)?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let flags = self.fua_flag(fua)?;
        self.submit(CMD_WRITE, flags, offset, len as u32, Some(data), 0)
            .await?;
        Ok(())
    }

    /// Write zeros over `[offset, offset+len)`; `no_hole` forbids punching a hole.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), NbdError> {
        if self.is_read_only() {
            return Err(NbdError::Unsupported("write zeroes to a read-only export"));
        }
        if !self.can_write_zeroes() {
            return Err(NbdError::Unsupported("write zeroes"));
        }
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        let mut flags = self.fua_flag(fua)?;
        if no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        self.submit(CMD_WRITE_ZEROES, flags, offset, len, None, 0)
            .await?;
        Ok(())
    }

    /// Discard `[offset, offset+len)`.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        if self.is_read_only() {
            return Err(NbdError::Unsupported("trim on a read-only export"));
        }
        if !self.can_trim() {
            return Err(NbdError::Unsupported("trim"));
        }
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        self.submit(CMD_TRIM, 0, offset, len, None, 0).await?;
        Ok(())
    }

    /// Flush the server's write cache.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Err(NbdError::Unsupported("flush"));
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None, 0).await?;
        Ok(())
    }

    /// One `BLOCK_STATUS` request; returns the extents of `context` starting at `offset`
    /// (possibly covering less than `len`; the last extent may run past it, never past the
    /// export end).
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, NbdError> {
        let id = self.meta_context_id(context).ok_or(NbdError::Unsupported(
            "block status for a meta context not negotiated",
        ))?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match self
            .submit(CMD_BLOCK_STATUS, 0, offset, len, None, id)
            .await?
        {
            Reply::Status(x) => Ok(x),
            other => Err(NbdError::Protocol(ProtocolFault::WrongReply {
                command: command_name(CMD_BLOCK_STATUS),
                got: other.kind(),
            })),
        }
    }

    /// Loop [`block_status`](Self::block_status) until `[offset, offset+len)` is covered;
    /// `len` may exceed `u32`. Extents are clipped to the range and adjacent extents with equal
    /// flags are merged.
    pub async fn block_status_range(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, NbdError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let align = u64::from(self.inner.block_size.minimum.max(1));
        let step = (STATUS_STEP / align).max(1) * align;
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(step) as u32;
            let got = self.block_status(context, pos, ask).await?;
            for x in got {
                let xe = (x.offset + x.length).min(end);
                if x.offset >= xe {
                    continue;
                }
                match out.last_mut() {
                    Some(l) if l.flags == x.flags && l.offset + l.length == x.offset => {
                        l.length = xe - l.offset
                    }
                    _ => out.push(StatusExtent {
                        offset: x.offset,
                        length: xe - x.offset,
                        flags: x.flags,
                    }),
                }
                pos = xe;
            }
        }
        Ok(out)
    }

    /// Wait for outstanding requests, send `NBD_CMD_DISC` and close the connection. Other
    /// clones of this client fail with [`NbdError::Closed`] afterwards. A connection that is
    /// already closed is not an error.
    pub async fn disconnect(self) -> Result<(), NbdError> {
        let inner = &self.inner;
        if inner.shared.is_dead() {
            return Ok(());
        }
        inner.shared.set_closing();
        let res = async {
            let _all =
                tokio::time::timeout(inner.timeout, inner.sem.acquire_many(inner.max_in_flight))
                    .await
                    .map_err(|_| NbdError::Timeout)?
                    .map_err(|_| NbdError::Closed)?;
            let hdr = Request {
                flags: 0,
                cmd: CMD_DISC,
                cookie: inner.shared.next_cookie(),
                offset: 0,
                length: 0,
            };
            let (ack_tx, ack_rx) = oneshot::channel();
            inner
                .writer
                .send(WriterMsg::Disconnect(hdr.encode(), ack_tx))
                .map_err(|_| inner.shared.dead_error())?;
            tokio::time::timeout(inner.timeout, ack_rx)
                .await
                .map_err(|_| NbdError::Timeout)?
                .map_err(|_| inner.shared.dead_error())
        }
        .await;
        inner.shared.fail(error::DeadReason::Closed);
        res
    }

    fn check_payload(&self, len: u64) -> Result<(), NbdError> {
        if len > u64::from(self.inner.max_request) {
            return Err(NbdError::TooLarge {
                len,
                max: self.inner.max_request,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                offset,
                len,
                size: self.inner.size,
            }),
        }
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, NbdError> {
        match (fua, self.can_fua()) {
            (false, _) => Ok(0),
            (true, true) => Ok(CMD_FLAG_FUA),
            (true, false) => Err(NbdError::Unsupported("fua")),
        }
    }

    /// Register, send and await one request under the in-flight limit and the timeout.
    async fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
        want_ctx: u32,
    ) -> Result<Reply, NbdError> {
        let inner = &self.inner;
        let mut sent = false;
        let fut = async {
            let permit = inner
                .sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| NbdError::Closed)?;
            let (cookie, rx) = inner.shared.register(cmd, offset, len, want_ctx, permit)?;
            let hdr = Request {
                flags,
                cmd,
                cookie,
                offset,
                length: len,
            };
            if inner
                .writer
                .send(WriterMsg::Request(hdr.encode(), payload))
                .is_err()
            {
                inner.shared.unregister(cookie);
                return Err(inner.shared.dead_error());
            }
            sent = true;
            rx.await.map_err(|_| inner.shared.dead_error())?
        };
        let res = tokio::time::timeout(inner.timeout, fut).await;
        match res {
            Ok(r) => r,
            Err(_) => {
                if sent {
                    tracing::warn!(
                        command = command_name(cmd),
                        offset,
                        len,
                        "nbd request timed out; closing connection"
                    );
                    inner.shared.fail(error::DeadReason::Timeout);
                }
                Err(NbdError::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests;
