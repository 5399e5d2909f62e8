//! Typed errors of the transport: identity files, connection, TLS pinning, framing, remote errors.

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
    /// An identity file does not hold what it should.
    #[error("invalid identity file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
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
    Protocol(String),
    /// Extent number `index` did not match its checksum.
    #[error("extent {index} failed checksum verification")]
    CorruptExtent {
        /// Position of the extent in the cycle stream (0-based).
        index: u64,
    },
    /// The peer vanished or the stream ended before it was complete.
    #[error("transfer interrupted: {0}")]
    Interrupted(String),
    /// The sender ended the body cleanly before it was complete (no End frame): its error.
    #[error("body ended before it was complete: {0}")]
    Truncated(String),
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
    /// A local resource failed (compression context, runtime task).
    #[error("local failure: {0}")]
    Local(String),
}

impl TransportError {
    /// True when trying the same operation again (possibly after reconnecting) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Interrupted(_)
            | TransportError::Timeout(_)
            | TransportError::CorruptExtent { .. } => true,
            TransportError::Remote(e) => e.is_retryable(),
            TransportError::Tls(_)
            | TransportError::PeerFingerprint { .. }
            | TransportError::Protocol(_)
            | TransportError::Truncated(_)
            | TransportError::Source(_)
            | TransportError::PeerTooOld { .. }
            | TransportError::Local(_) => false,
        }
    }

    /// The typed error a handler should answer with when its extent stream failed.
    pub fn to_remote(&self) -> RemoteError {
        match self {
            TransportError::Remote(e) => e.clone(),
            TransportError::CorruptExtent { index } => RemoteError::CorruptExtent { index: *index },
            TransportError::Protocol(m) => RemoteError::BadRequest { message: m.clone() },
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

    #[test]
    fn retryability_and_remote_mapping() {
        assert!(TransportError::Interrupted("x".into()).is_retryable());
        assert!(TransportError::CorruptExtent { index: 1 }.is_retryable());
        assert!(!TransportError::Protocol("x".into()).is_retryable());
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
            TransportError::Protocol("bad".into()).to_remote(),
            RemoteError::BadRequest { .. }
        ));
        assert!(matches!(
            TransportError::Interrupted("gone".into()).to_remote(),
            RemoteError::Internal { .. }
        ));
        // A body the sender ended early is its error; a cut transfer is retryable.
        let cut = TransportError::Truncated("no end frame".into());
        assert!(!cut.is_retryable());
        assert_eq!(cut.to_remote().status_code(), 400);
        assert!(
            TransportError::Interrupted("reset".into())
                .to_remote()
                .is_retryable()
        );
    }
}
