//! Typed errors of the transport: identity files, connection, TLS pinning, framing
//! ([`ProtocolFault`]), remote errors.

use std::path::PathBuf;

use vmr_proto::wire::RemoteError;

/// Failure to create or load an agent identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing an identity file failed.
    #[error("identity file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing an identity file atomically failed.
    #[error("writing identity file")]
    Write(#[source] vmr_durable::DurableError),
    /// An identity file is not PEM, or holds no certificate or private key.
    #[error("invalid identity file {path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it lacks or what could not be parsed.
        what: IdentityFault,
    },
    /// Generating the certificate failed.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
}

/// Everything that can go wrong moving a request to a peer agent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not bind, connect or talk to the socket.
    #[error("connection to {addr} failed")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS configuration or handshake failure (other than a fingerprint mismatch).
    #[error("tls failure")]
    Tls(#[source] rustls::Error),
    /// The peer presented a certificate other than the pinned one.
    #[error("peer certificate fingerprint mismatch: expected {expected}, got {got}")]
    PeerFingerprint {
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint of the certificate the peer presented.
        got: String,
    },
    /// The remote agent answered with a typed error.
    #[error("remote error")]
    Remote(#[source] RemoteError),
    /// The byte stream or HTTP exchange violated the protocol.
    #[error("protocol violation: {0}")]
    Protocol(ProtocolFault),
    /// Extent number `index` did not match its checksum.
    #[error("extent {index} failed checksum verification")]
    CorruptExtent {
        /// Position of the extent in the cycle stream (0-based).
        index: u64,
    },
    /// The peer vanished or the connection broke before the exchange was complete.
    #[error("transfer interrupted ({during}): {}", error_chain(.cause.as_ref()))]
    Interrupted {
        /// What was being sent or received.
        during: &'static str,
        /// HTTP/2's or the connection's error.
        cause: BoxError,
    },
    /// The request body's channel closed under the sender: the peer answered early or the
    /// connection died (the response says which).
    #[error("transfer interrupted: request body closed")]
    BodyClosed,
    /// The sender ended the body cleanly before it was complete (no End frame): its error.
    #[error("body ended before it was complete: cycle stream ended {0}")]
    Truncated(&'static str),
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The caller's extent source failed while sending.
    #[error("extent source failed")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The peer speaks a protocol older than a request needs (the request was not sent).
    #[error(
        "the peer agent speaks protocol {peer}; {what} needs protocol {needs} or later \
         (upgrade vmreplica on the peer)"
    )]
    PeerTooOld {
        /// What needs the newer protocol.
        what: &'static str,
        /// The protocol the connection speaks.
        peer: u16,
        /// The protocol it needs.
        needs: u16,
    },
    /// `host` of a peer address is neither a DNS name nor an IP address.
    #[error("bad host {host:?}")]
    BadHost {
        /// The host part of the address.
        host: String,
        /// Why it is not a server name.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// An HTTP request could not be built (a bug: the parts are this crate's own).
    #[error("cannot build the http request")]
    BuildRequest(#[source] http::Error),
    /// Encoding a JSON body or header failed.
    #[error("cannot encode {what}")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The local zstd compressor or decompressor failed (not the peer's data).
    #[error("local zstd failure")]
    Zstd(#[source] std::io::Error),
    /// A blocking task (checksums, compression) panicked or was cancelled.
    #[error("{what} task failed")]
    TaskFailed {
        /// What the task did.
        what: &'static str,
        /// tokio's error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A stream version this sender cannot encode.
    #[error("cannot encode stream version {0}")]
    StreamVersion(u16),
    /// The cycle encoder was used again after one of its calls failed.
    #[error("cycle encoder used after a failure")]
    EncoderFailed,
}

/// A boxed error of another crate (hyper's, http-body's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources on one line, outermost first (`a: b: c`): how every crate of
/// vmreplica shows an error to a log, a peer or an admin.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// What could not be parsed in an identity file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFault {
    /// The file holds no PEM section of the kind needed (certificate or private key), or a
    /// broken one.
    #[error("{0}")]
    Pem(rustls::pki_types::pem::Error),
    /// The generated private key is none of the DER forms rustls knows (its own message).
    #[error("private key: {0}")]
    KeyDer(&'static str),
}

/// How a cycle body or an exchange with a peer violated the protocol (`docs/protocol.md`).
/// Each names the one thing that was wrong; the texts are what the peer is answered with.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolFault {
    /// The body does not start with the stream magic.
    #[error("bad stream magic")]
    StreamMagic,
    /// A stream version this receiver does not decode.
    #[error("unsupported stream version {0}")]
    StreamVersion(u16),
    /// Stream flags this receiver does not know.
    #[error("unknown stream flags {0:#x}")]
    StreamFlags(u16),
    /// The first frame is not the Header frame.
    #[error("expected header frame, got type {0}")]
    NotHeaderFrame(u8),
    /// The Header frame's JSON is longer than allowed.
    #[error("header frame of {len} bytes exceeds {max}")]
    HeaderTooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The Header frame is not a cycle header.
    #[error("bad cycle header json: {0}")]
    HeaderJson(serde_json::Error),
    /// The cycle header can never be applied.
    #[error("cycle header refused: {0}")]
    HeaderRefused(vmr_proto::HeaderError),
    /// A frame type this receiver does not know.
    #[error("unknown frame type {0}")]
    FrameType(u8),
    /// An extent names a disk the header does not list.
    #[error("extent names disk {disk}, cycle has {disks}")]
    NoSuchDisk {
        /// The disk index.
        disk: u32,
        /// How many disks the header lists.
        disks: usize,
    },
    /// An extent runs past its disk's end.
    #[error("extent {offset}+{len} of disk {disk} exceeds its size {size}")]
    ExtentOutOfRange {
        /// The disk index.
        disk: u32,
        /// The extent's offset.
        offset: u64,
        /// The extent's length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// A data extent longer than any sender sends.
    #[error("data extent of {len} bytes exceeds {max}")]
    ExtentTooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A zero extent that claims an encoding or stored bytes.
    #[error("zero extent with encoding {encoding} and {stored} stored bytes")]
    ZeroExtentEncoding {
        /// The encoding byte.
        encoding: u8,
        /// The stored length.
        stored: u64,
    },
    /// A data extent whose encoding and stored length do not fit.
    #[error("data extent of {len} bytes with encoding {encoding} and {stored} stored bytes")]
    DataExtentEncoding {
        /// The extent's length.
        len: u64,
        /// The encoding byte.
        encoding: u8,
        /// The stored length.
        stored: u64,
    },
    /// An extent kind this receiver does not know.
    #[error("unknown extent kind {0}")]
    ExtentKind(u8),
    /// The compressed stream (framing 1) does not decode.
    #[error("corrupt zstd stream: {0}")]
    ZstdStream(std::io::Error),
    /// The compressed stream (framing 1) decodes to nothing from input it was given.
    #[error("zstd decoder made no progress")]
    ZstdStalled,
    /// A compressed extent (framing 2) does not decode.
    #[error("corrupt zstd extent: {0}")]
    ZstdExtent(std::io::Error),
    /// A compressed extent decodes to another length than its frame says.
    #[error("zstd extent holds {got} bytes, its frame says {len}")]
    ZstdExtentLength {
        /// What it decoded to.
        got: u64,
        /// What the frame says.
        len: u64,
    },
    /// The End frame's counts differ from what arrived.
    #[error("end frame says {count} extents / {total} bytes, received {got_count} / {got_total}")]
    EndCounts {
        /// Extents the End frame counts.
        count: u64,
        /// Bytes the End frame counts.
        total: u64,
        /// Extents received.
        got_count: u64,
        /// Bytes received.
        got_total: u64,
    },
    /// The End frame's digest differs from the checksums that arrived.
    #[error("end frame digest does not match the extent checksums")]
    EndDigest,
    /// Bytes after the End frame.
    #[error("data after the end frame")]
    DataAfterEnd,
    /// The TLS session did not negotiate HTTP/2.
    #[error("server did not negotiate h2")]
    NoH2,
    /// The hello answered a protocol version this client does not speak.
    #[error("peer answered protocol {answered}; we speak {min} to {max}")]
    HelloVersion {
        /// The version answered.
        answered: u16,
        /// The oldest this client speaks.
        min: u16,
        /// The version it offered.
        max: u16,
    },
    /// A JSON answer that does not parse as what was asked for.
    #[error("bad response json: {0}")]
    ResponseJson(serde_json::Error),
    /// A control call's answer that does not decode as its call's answer.
    #[error("bad {method} answer: {error}")]
    BadAnswer {
        /// The call.
        method: &'static str,
        /// What was wrong with it.
        error: vmr_proto::peer::PeerCodecError,
    },
    /// A control call answered with another call's answer.
    #[error("unexpected {0} answer")]
    UnexpectedAnswer(&'static str),
    /// `resync-hashes` answered another number of hashes than asked.
    #[error("resync-hashes answered {got} hashes for {want} blocks")]
    HashCount {
        /// Hashes answered.
        got: usize,
        /// Blocks asked for.
        want: u64,
    },
    /// An HTTP error status without the typed error body every agent sends.
    #[error("http {status} without a typed error: {body}")]
    UntypedHttpError {
        /// The status.
        status: u16,
        /// The start of the body (lossy UTF-8, at most 200 bytes).
        body: String,
    },
    /// A response body larger than any answer.
    #[error("response body exceeds {0} bytes")]
    ResponseTooLarge(usize),
}

impl TransportError {
    /// True when trying the same operation again (possibly after reconnecting) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Interrupted { .. }
            | TransportError::BodyClosed
            | TransportError::Timeout(_)
            | TransportError::CorruptExtent { .. } => true,
            TransportError::Remote(e) => e.is_retryable(),
            TransportError::Tls(_)
            | TransportError::PeerFingerprint { .. }
            | TransportError::Protocol(_)
            | TransportError::Truncated(_)
            | TransportError::Source(_)
            | TransportError::PeerTooOld { .. }
            | TransportError::BadHost { .. }
            | TransportError::BuildRequest(_)
            | TransportError::Encode { .. }
            | TransportError::Zstd(_)
            | TransportError::TaskFailed { .. }
            | TransportError::StreamVersion(_)
            | TransportError::EncoderFailed => false,
        }
    }

    /// The typed error a handler should answer with when its extent stream failed.
    pub fn to_remote(&self) -> RemoteError {
        match self {
            TransportError::Remote(e) => e.clone(),
            TransportError::CorruptExtent { index } => RemoteError::CorruptExtent { index: *index },
            TransportError::Protocol(f) => RemoteError::BadRequest {
                message: f.to_string(),
            },
            e @ TransportError::Truncated(_) => RemoteError::BadRequest {
                message: e.to_string(),
            },
            other => RemoteError::Internal {
                message: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interrupted() -> TransportError {
        TransportError::Interrupted {
            during: "request body",
            cause: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        }
    }

    #[test]
    fn an_interruption_says_its_cause_chain() {
        let e = TransportError::Interrupted {
            during: "response body",
            cause: Box::new(DbgChain),
        };
        assert_eq!(
            e.to_string(),
            "transfer interrupted (response body): outer: inner"
        );
    }

    /// An error with one source, for [`chain`].
    #[derive(Debug)]
    struct DbgChain;
    impl std::fmt::Display for DbgChain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer")
        }
    }
    impl std::error::Error for DbgChain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }
    #[derive(Debug)]
    struct Inner;
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("inner")
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn retryability_and_remote_mapping() {
        assert!(interrupted().is_retryable());
        assert!(TransportError::BodyClosed.is_retryable());
        assert!(TransportError::CorruptExtent { index: 1 }.is_retryable());
        assert!(!TransportError::Protocol(ProtocolFault::StreamMagic).is_retryable());
        assert!(!TransportError::Remote(RemoteError::Unauthorized).is_retryable());
        assert!(
            TransportError::Remote(RemoteError::Unavailable {
                message: "busy".into()
            })
            .is_retryable()
        );
        assert_eq!(
            TransportError::CorruptExtent { index: 4 }.to_remote(),
            RemoteError::CorruptExtent { index: 4 }
        );
        assert!(matches!(
            TransportError::Protocol(ProtocolFault::EndDigest).to_remote(),
            RemoteError::BadRequest { .. }
        ));
        assert!(matches!(
            interrupted().to_remote(),
            RemoteError::Internal { .. }
        ));
        // A body the sender ended early is its error; a cut transfer is retryable.
        let cut = TransportError::Truncated("without an end frame");
        assert!(!cut.is_retryable());
        assert_eq!(cut.to_remote().status_code(), 400);
        assert!(interrupted().to_remote().is_retryable());
    }
}
