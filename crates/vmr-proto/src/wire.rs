//! Types carried between agents by the transport (acks, typed remote errors; see docs/protocol.md).
//!
//! The transport (`vmr-transport`) moves these as JSON in HTTP/2 request and response bodies; the
//! binary cycle frame format itself is not serde and lives in the transport.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cycle::CycleId;

/// Version of the agent-to-agent protocol (HTTP routes, call encoding and cycle framing) this
/// build speaks: 7 = version 6 plus the `follow` call (fan-out's failover), 6 = version 5 plus the `witness` call (automatic failover's leases), 5 = version 4 plus continuous mode (`create-replica` with frequency
/// [`crate::api::FREQUENCY_CONTINUOUS`]) and the `source-vm-state` and `continue-from` calls,
/// 4 = version 3 plus cycle bodies of stream version 2 (per-extent compression,
/// block checksums), 3 = version 2 plus the `disable-replica` call, 2 = typed calls
/// (`vmr_proto::peer`), 1 = JSON calls by method name.
pub const PROTOCOL_VERSION: u16 = 7;

/// First protocol version whose replicas know continuous mode: a primary sends a
/// `create-replica` with frequency [`crate::api::FREQUENCY_CONTINUOUS`] only on a connection
/// speaking at least this version (an older replica would take 0 s for an interval).
pub const CONTINUOUS_SINCE: u16 = 5;

/// First protocol version with the `disable-replica` call: a caller sends it only on a
/// connection speaking at least this version (an older peer does not know the call).
pub const DISABLE_REPLICA_SINCE: u16 = 3;

/// First protocol version with the `source-vm-state` call (the split-brain probe across an
/// extended chain; an older connection gets `primary-vm-state` instead) and the
/// `continue-from` call (never sent on an older connection).
pub const SOURCE_VM_STATE_SINCE: u16 = 5;

/// First protocol version with the `witness` call (automatic failover's leases at a witness
/// agent, `docs/auto-failover.md`): never sent on an older connection.
pub const WITNESS_SINCE: u16 = 6;

/// First protocol version with the `follow` call (fan-out's failover: a sibling replica
/// follows the new primary, `docs/extended.md`): never sent on an older connection.
pub const FOLLOW_SINCE: u16 = 7;

/// Oldest protocol version this build still serves and speaks (the previous one), so that a
/// rolling upgrade of two hosts never stops replication.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// HTTP header carrying the sender's protocol version on every request.
pub const PROTOCOL_HEADER: &str = "vmr-protocol";

/// Sent by the server in answer to a client's hello: who the server thinks the client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the server speaks with this client: the client's own version when
    /// the server supports it (a server of version 1 always answers 1).
    pub protocol: u16,
    /// The server's software version (crate version).
    pub software: String,
    /// The name under which the server authorized the client.
    pub peer_name: String,
    /// The client's trust group as the server knows it.
    pub trust_group: Option<String>,
}

/// The receiver's acknowledgement of one complete, verified and staged cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleAck {
    /// The replicated VM.
    pub vm: Uuid,
    /// The acknowledged cycle.
    pub cycle: CycleId,
    /// Number of extents received.
    pub extents: u64,
    /// Bytes covered by those extents (data and zero extents).
    pub bytes: u64,
}

/// A typed error returned by the remote agent, carried as the JSON body of a non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum RemoteError {
    /// The peer's certificate is not authorized on the remote agent.
    #[error("peer not authorized")]
    Unauthorized,
    /// The remote agent does not replicate this VM.
    #[error("unknown vm {vm}")]
    UnknownVm {
        /// The VM asked for.
        vm: Uuid,
    },
    /// The cycle's base is not the replica's latest cycle.
    #[error("wrong base cycle: replica has {expected:?}, cycle builds on {got:?}")]
    WrongBase {
        /// The base the replica would accept (its latest cycle).
        expected: Option<CycleId>,
        /// The base the cycle named.
        got: Option<CycleId>,
    },
    /// Extent number `index` (0-based, in stream order) did not verify.
    #[error("extent {index} failed checksum verification")]
    CorruptExtent {
        /// Position of the extent in the cycle stream.
        index: u64,
    },
    /// The remote store has no space left.
    #[error("remote disk full: {message}")]
    DiskFull {
        /// Details.
        message: String,
    },
    /// The request crosses trust groups or violates the trust group policy.
    #[error("trust group violation: {message}")]
    TrustGroup {
        /// Details.
        message: String,
    },
    /// The request was malformed (bad JSON, bad framing, unknown method).
    #[error("bad request: {message}")]
    BadRequest {
        /// Details.
        message: String,
    },
    /// The remote agent is temporarily unable to serve this (busy, shutting down); retry later.
    #[error("remote agent unavailable: {message}")]
    Unavailable {
        /// Details.
        message: String,
    },
    /// The request's protocol version (header `vmr-protocol`) is missing or outside what the
    /// remote agent speaks.
    #[error(
        "protocol version {} not supported: the remote agent speaks versions {min} to {max}",
        got.map_or_else(|| "(none)".to_string(), |v| v.to_string())
    )]
    ProtocolVersion {
        /// The version the request carried, `None` if missing or unparseable.
        got: Option<u16>,
        /// The oldest version the remote agent speaks.
        min: u16,
        /// The newest version the remote agent speaks.
        max: u16,
    },
    /// Anything else that went wrong on the remote side.
    #[error("remote internal error: {message}")]
    Internal {
        /// Details.
        message: String,
    },
}

impl RemoteError {
    /// The HTTP status code the error travels with.
    pub fn status_code(&self) -> u16 {
        match self {
            RemoteError::Unauthorized => 403,
            RemoteError::UnknownVm { .. } => 404,
            RemoteError::WrongBase { .. } => 409,
            RemoteError::CorruptExtent { .. } => 422,
            RemoteError::DiskFull { .. } => 507,
            RemoteError::TrustGroup { .. } => 403,
            RemoteError::BadRequest { .. } => 400,
            RemoteError::ProtocolVersion { .. } => 400,
            RemoteError::Unavailable { .. } => 503,
            RemoteError::Internal { .. } => 500,
        }
    }

    /// True when sending the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RemoteError::CorruptExtent { .. }
                | RemoteError::Unavailable { .. }
                | RemoteError::Internal { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_error_round_trips_tagged() {
        let errs = [
            RemoteError::Unauthorized,
            RemoteError::UnknownVm { vm: Uuid::nil() },
            RemoteError::WrongBase {
                expected: Some(3),
                got: None,
            },
            RemoteError::CorruptExtent { index: 9 },
            RemoteError::DiskFull {
                message: "x".into(),
            },
            RemoteError::TrustGroup {
                message: "y".into(),
            },
            RemoteError::BadRequest {
                message: "z".into(),
            },
            RemoteError::Unavailable {
                message: "u".into(),
            },
            RemoteError::ProtocolVersion {
                got: Some(9),
                min: 1,
                max: 2,
            },
            RemoteError::Internal {
                message: "w".into(),
            },
        ];
        for e in errs {
            let s = serde_json::to_string(&e).expect("serialize");
            assert!(s.contains("\"error\":"), "{s}");
            let back: RemoteError = serde_json::from_str(&s).expect("parse");
            assert_eq!(back, e);
            assert!(back.status_code() >= 400);
        }
        let s = serde_json::to_string(&RemoteError::WrongBase {
            expected: None,
            got: Some(1),
        })
        .expect("serialize");
        assert_eq!(s, r#"{"error":"wrong-base","expected":null,"got":1}"#);
    }
}
