//! The crate's error type, [`NbdError`], what exactly was wrong with a server's data
//! ([`HandshakeFault`], [`ProtocolFault`]), and the recorded reason a connection died.

/// Errors returned by the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O failed.
    #[error("nbd i/o error")]
    Io(#[source] std::io::Error),
    /// The handshake failed (unexpected or malformed server data before transmission).
    #[error("nbd handshake failed: {0}")]
    Handshake(HandshakeFault),
    /// The server refused a negotiation option.
    #[error("nbd server refused option {option} (reply {reply:#x}): {message}")]
    OptionRefused {
        /// Option number (`NBD_OPT_*`).
        option: u32,
        /// Error reply type (`NBD_REP_ERR_*`).
        reply: u32,
        /// Server's message (may be empty).
        message: String,
    },
    /// Malformed or hostile server data during transmission; the connection is closed.
    #[error("nbd protocol violation: {0}")]
    Protocol(ProtocolFault),
    /// The server answered a command with an error.
    #[error("nbd {command} failed with errno {errno}: {message}")]
    Server {
        /// Command name (`read`, `write`, ...).
        command: &'static str,
        /// NBD error number (errno values: 1 EPERM, 5 EIO, 22 EINVAL, 28 ENOSPC, ...).
        errno: u32,
        /// Server's message (empty for simple replies).
        message: String,
    },
    /// A read or write is longer than [`crate::NbdClient::max_request`]; split it.
    #[error("nbd request of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Maximum accepted length.
        max: u32,
    },
    /// The range lies (partly) outside the export.
    #[error("nbd range {offset}+{len} is outside the export of {size} bytes")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// The export or this client does not support the operation.
    #[error("nbd operation not supported: {0}")]
    Unsupported(&'static str),
    /// The connection is gone (disconnected, broken or poisoned by an earlier failure).
    #[error("nbd connection closed")]
    Closed,
    /// The operation did not finish within the configured timeout.
    #[error("nbd operation timed out")]
    Timeout,
}

impl NbdError {
    /// The server's error number, for [`NbdError::Server`].
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What was wrong with the server's side of the handshake (or with what this client was asked
/// to send in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeFault {
    /// The option data this client would send does not fit the protocol's 32-bit length.
    #[error("option data of {0} bytes is too long")]
    OptionDataTooLong(usize),
    /// A name this client would send is longer than the protocol allows.
    #[error("name of {len} bytes exceeds {max}")]
    NameTooLong {
        /// The name's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The greeting does not start with `NBDMAGIC`.
    #[error("bad server magic {0:#x}")]
    BadServerMagic(u64),
    /// The server speaks the old-style negotiation only.
    #[error("old-style negotiation is not supported")]
    OldStyle,
    /// The greeting's second magic is neither `IHAVEOPT` nor the old style's.
    #[error("bad newstyle magic {0:#x}")]
    BadNewstyleMagic(u64),
    /// The server lacks fixed newstyle negotiation.
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// An option reply does not start with the reply magic.
    #[error("bad option reply magic {0:#x}")]
    BadReplyMagic(u64),
    /// An option reply answers another option than the one asked.
    #[error("option reply for option {got}, expected {expected}")]
    ReplyForOtherOption {
        /// The option the reply names.
        got: u32,
        /// The option this client sent.
        expected: u32,
    },
    /// An option reply, or a part of one, is longer or shorter than allowed.
    #[error("{what} of {len} bytes")]
    BadLength {
        /// Which reply or part.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A reply type that does not answer the option.
    #[error("unexpected reply {reply:#x} to {option}")]
    UnexpectedReply {
        /// The option (`structured reply`, `set meta context`, `go`).
        option: &'static str,
        /// The reply type (`NBD_REP_*`).
        reply: u32,
    },
    /// More replies to one option than any export justifies.
    #[error("too many {0} replies")]
    TooManyReplies(&'static str),
    /// An info reply too short to hold its type.
    #[error("info reply without type")]
    InfoWithoutType,
    /// A meta context name that is not UTF-8.
    #[error("meta context name is not utf-8")]
    ContextNameNotUtf8,
    /// The server acknowledged `NBD_OPT_GO` without the export's size and flags.
    #[error("server sent no export info before ack")]
    NoExportInfo,
    /// The export is larger than the protocol's signed 64-bit offsets allow.
    #[error("export size {0} exceeds the protocol maximum")]
    ExportTooLarge(u64),
    /// Block size constraints the spec does not allow.
    #[error(
        "invalid block size constraints: minimum {minimum}, preferred {preferred}, maximum {maximum}"
    )]
    BadBlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        maximum: u32,
    },
}

/// What was wrong with the server's data during transmission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolFault {
    /// A reply does not start with a reply magic this connection accepts.
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u32),
    /// A reply names a cookie of no pending request.
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    /// A simple reply to a request that already had structured chunks.
    #[error("simple reply after structured chunks for cookie {0}")]
    SimpleAfterChunks(u64),
    /// A successful simple reply to a command that needs structured replies.
    #[error("successful simple reply to {0}, which needs structured replies")]
    SimpleReplyNotAllowed(&'static str),
    /// A chunk whose length does not fit its type and request.
    #[error("{command} reply chunk type {kind} has invalid length {length}")]
    ChunkLength {
        /// The request's command.
        command: &'static str,
        /// The chunk type (`NBD_REPLY_TYPE_*`).
        kind: u16,
        /// The chunk's length.
        length: u32,
    },
    /// A chunk type that does not answer the command.
    #[error("unexpected chunk type {kind} for {command}")]
    UnexpectedChunk {
        /// The request's command.
        command: &'static str,
        /// The chunk type.
        kind: u16,
    },
    /// An `NBD_REPLY_TYPE_NONE` chunk that does not end the reply.
    #[error("none chunk without the done flag")]
    NoneChunkNotDone,
    /// A hole chunk of length 0.
    #[error("zero-length hole chunk")]
    EmptyHole,
    /// A chunk's range lies (partly) outside the request's.
    #[error("chunk range {offset}+{len} outside the requested {req_offset}+{req_len}")]
    ChunkOutsideRequest {
        /// The chunk's offset.
        offset: u64,
        /// The chunk's length.
        len: u64,
        /// The request's offset.
        req_offset: u64,
        /// The request's length.
        req_len: u32,
    },
    /// The read reply's chunks cover more bytes than were asked for.
    #[error("read reply chunks cover more than the requested length")]
    ReadOvercovered,
    /// More read reply chunks than a request of its length justifies.
    #[error("too many read reply chunks")]
    TooManyChunks,
    /// The read reply's chunks leave a gap or overlap.
    #[error("read reply chunks leave a gap or overlap at {0}")]
    ReadGap(u64),
    /// The read reply's chunks end elsewhere than the request.
    #[error("read reply chunks end at {end}, not at {expected}")]
    ReadEnd {
        /// Where the chunks end.
        end: u64,
        /// Where the request ends.
        expected: u64,
    },
    /// A read chunk that does not fit the buffer of the request it answers.
    #[error("read chunk outside the requested range")]
    ReadChunkOutside,
    /// Block status for a context id the handshake did not give.
    #[error("block status for unknown context id {0}")]
    UnknownContext(u32),
    /// A second block status chunk for one context of one request.
    #[error("duplicate block status chunk for context id {0}")]
    DuplicateContext(u32),
    /// The block status reply ended without the context that was asked for.
    #[error("block status reply lacks the requested context")]
    MissingContext,
    /// A block status chunk whose payload is not a context id and whole descriptors.
    #[error("block status chunk has invalid length {0}")]
    StatusChunkLength(usize),
    /// A block status chunk without descriptors.
    #[error("block status chunk without descriptors")]
    NoDescriptors,
    /// A block status descriptor of length 0.
    #[error("zero-length block status descriptor")]
    EmptyDescriptor,
    /// A block status descriptor that starts past the request or the export.
    #[error("block status descriptor at {0} beyond the requested range")]
    DescriptorBeyondRange(u64),
    /// An error chunk too short for its error number and message length.
    #[error("error chunk too short ({0} bytes)")]
    ErrorChunkShort(usize),
    /// An error chunk whose message is longer than the protocol allows.
    #[error("error message length {len} exceeds {max}")]
    ErrorMessageTooLong {
        /// The message's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An error chunk whose length does not match its message length.
    #[error("error chunk length {len} does not match message length {message_len}")]
    ErrorChunkLength {
        /// The chunk's payload length.
        len: usize,
        /// The message length it states.
        message_len: usize,
    },
    /// An error chunk whose error number is 0.
    #[error("error chunk with error number 0")]
    ErrorNumberZero,
    /// The connection completed a request with a reply of another command's kind.
    #[error("unexpected {got} reply to {command}")]
    WrongReply {
        /// The request's command.
        command: &'static str,
        /// The kind of reply it got.
        got: &'static str,
    },
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::Io(e)
    }
}

/// Why a connection stopped serving requests; turned into an [`NbdError`] for every request
/// that was pending or arrives later.
#[derive(Debug, Clone)]
pub(crate) enum DeadReason {
    /// Socket error (kind and message of the original error).
    Io(std::io::ErrorKind, String),
    /// The server sent malformed data.
    Protocol(ProtocolFault),
    /// A request timed out; the connection was abandoned.
    Timeout,
    /// Orderly disconnect, or end of stream.
    Closed,
}

impl DeadReason {
    /// Record the reason an error killed the connection.
    pub(crate) fn from_error(e: &NbdError) -> Self {
        match e {
            NbdError::Io(io) => DeadReason::Io(io.kind(), io.to_string()),
            NbdError::Protocol(f) => DeadReason::Protocol(f.clone()),
            NbdError::Timeout => DeadReason::Timeout,
            _ => DeadReason::Closed,
        }
    }

    /// The error a request sees on a connection that died for this reason.
    pub(crate) fn to_error(&self) -> NbdError {
        match self {
            DeadReason::Io(kind, msg) => NbdError::Io(std::io::Error::new(*kind, msg.clone())),
            DeadReason::Protocol(f) => NbdError::Protocol(f.clone()),
            DeadReason::Timeout | DeadReason::Closed => NbdError::Closed,
        }
    }
}
