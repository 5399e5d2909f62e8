//! Mutual-TLS HTTP/2 transport between vmreplica agents.
//!
//! Owns everything between two agents' sockets: agent identities (self-signed certificates pinned
//! by fingerprint), the TLS verifiers, the HTTP/2 server and client, and the binary cycle framing
//! (optionally zstd-compressed, per-extent BLAKE3 checksums). The wire format is specified in
//! `docs/protocol.md`; the types it carries live in `vmr_proto::wire` and `vmr_proto::peer`
//! (typed control calls, served to protocol-1 callers through their JSON mapping), and the
//! sending limit on a cycle body (`pace`: a byte token bucket asked before each encoded chunk).
//!
//! Checksum policy: the transport verifies every extent's checksum and the end-of-stream summary
//! while decoding, and still hands each checksum to the handler (so the store can persist it).
//! An [`ExtentStream`] yields `None` only after the End frame verified; a handler must commit a
//! cycle only then and discard its staging on any `Err` item.

mod client;
mod error;
mod frame;
mod identity;
mod pace;
mod server;
mod tls;

pub use client::{BodyQueue, Client, ClientOptions};
pub use error::{
    BoxError, IdentityError, IdentityFault, ProtocolFault, TransportError, error_chain,
};
pub use frame::{
    ExtentStream, FLAG_ZSTD, MAX_EXTENT_DATA, MAX_HEADER_JSON, STREAM_MAGIC, STREAM_V2_SINCE,
    STREAM_VERSION, STREAM_VERSION_1, worth_compressing,
};
pub use identity::{CERT_FILE, Identity, KEY_FILE, fingerprint};
pub use pace::{BURST_SECS, Pace, TokenBucket};
pub use server::{Authorize, ConnLimits, Handler, Peer, PeerList, Server};
pub use vmr_proto::peer::{PeerRequest, PeerResponse};
pub use vmr_proto::wire::{
    CycleAck, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION, RemoteError,
};

/// Helpers for tests and tools; not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::frame::{decode_cycle, encode_cycle, encode_cycle_version};
}
