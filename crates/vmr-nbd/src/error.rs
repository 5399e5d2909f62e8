//! The crate's error type, [`NbdError`], and the recorded reason a connection died.

/// Errors returned by the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O failed.
    #[error("nbd i/o error")]
    Io(#[source] std::io::Error),
    /// The handshake failed (unexpected or malformed server data before transmission).
    #[error("nbd handshake failed: {0}")]
    Handshake(String),
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
    Protocol(String),
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
    Protocol(String),
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
            NbdError::Protocol(m) => DeadReason::Protocol(m.clone()),
            NbdError::Timeout => DeadReason::Timeout,
            _ => DeadReason::Closed,
        }
    }

    /// The error a request sees on a connection that died for this reason.
    pub(crate) fn to_error(&self) -> NbdError {
        match self {
            DeadReason::Io(kind, msg) => NbdError::Io(std::io::Error::new(*kind, msg.clone())),
            DeadReason::Protocol(m) => NbdError::Protocol(m.clone()),
            DeadReason::Timeout | DeadReason::Closed => NbdError::Closed,
        }
    }
}
