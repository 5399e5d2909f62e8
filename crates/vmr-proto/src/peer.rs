//! Typed agent-to-agent control calls: one [`PeerRequest`] variant per call and the matching
//! [`PeerResponse`], their protocol-2 body encoding (a JSON head plus a binary tail, see
//! [`encode_body`]) and their mapping onto the protocol-1 JSON calls
//! (`POST /v1/call/{method}`), so that agents of both versions serve each other during a
//! rolling upgrade (docs/protocol.md).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::api::{BecomeReplica, BlockHashesReply, BlockHashesRequest, CreateReplica};
use crate::api::{ReplicaVmInfo, ReplicationState};
use crate::lease::{PromiseResponse, WitnessRequest, WitnessResponse};
pub use crate::wire::{MIN_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION};

/// Content type of protocol-2 call bodies (requests and successful answers).
pub const PEER_CONTENT_TYPE: &str = "application/vnd.vmreplica.peer";
/// Largest JSON head of a protocol-2 body.
pub const MAX_HEAD: usize = 1 << 20;

/// One 32-byte BLAKE3 block hash.
pub type BlockHash = [u8; 32];

/// A control call from one agent to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum PeerRequest {
    /// Primary → replica: create (or refresh) the replica VM.
    CreateReplica(CreateReplica),
    /// Primary → replica: the replica's latest cycle and state of one VM.
    ReplicaInfo(ReplicaInfoRequest),
    /// Replica → primary: the split-brain probe (does the primary's VM run?).
    PrimaryVmState {
        /// VM UUID.
        uuid: Uuid,
    },
    /// New primary → old primary: become the replica of the failed-over VM.
    BecomeReplica(BecomeReplica),
    /// Primary → replica: block hashes of one disk of the latest point (resynchronization).
    ResyncHashes(BlockHashesRequest),
    /// Primary → replica: replication of the VM was disabled on the primary (protocol 3,
    /// [`crate::wire::DISABLE_REPLICA_SINCE`]; never sent on an older connection).
    DisableReplica {
        /// VM UUID.
        uuid: Uuid,
    },
    /// Replica → its source (protocol 5, [`crate::wire::SOURCE_VM_STATE_SINCE`]): the
    /// split-brain probe across an extended chain. The source answers whether the VM runs on
    /// it and, when the source is itself a replica (it forwards the VM's points: A → B → C),
    /// what its own probe of its primary found: C authorizes B, not A, and learns about A
    /// through B.
    SourceVmState {
        /// VM UUID.
        uuid: Uuid,
    },
    /// Source → extended replica (protocol 5): the VM failed over on the source from
    /// `point`, which now replicates to the extended replica as the VM's primary; the replica
    /// drops its points newer than `point` and answers the point the next cycle builds on.
    ContinueFrom(ContinueFromRequest),
    /// An agent → the witness of one of its VM relationships (protocol 6,
    /// [`crate::wire::WITNESS_SINCE`]; never sent on an older connection): the automatic
    /// failover's lease calls (`docs/auto-failover.md`). The caller is the agent the
    /// connection authenticated.
    Witness {
        /// The call.
        call: WitnessRequest,
    },
    /// Primary → replica (protocol 6, [`crate::wire::WITNESS_SINCE`]; never sent on an older
    /// connection): automatic failover's promise: the replica answers whether it will not ask
    /// the witness for the VM's lease for a lease's length (`docs/auto-failover.md`). Also
    /// tells the replica it hears its primary.
    Promise {
        /// VM UUID.
        uuid: Uuid,
    },
    /// New primary → a sibling replica (protocol 7, [`crate::wire::FOLLOW_SINCE`]; never sent
    /// on an older connection): fan-out's failover. The VM replicated from one primary to
    /// several replicas; it failed over on the caller, which now replicates to this replica
    /// too. The replica keeps its newest point as the base (no point is dropped: its ids are
    /// another relationship's numbering) and takes the caller as the VM's primary; the
    /// caller's first cycle is a resynchronisation against that point (block hashes).
    Follow {
        /// VM UUID.
        uuid: Uuid,
    },
}

/// Arguments of [`PeerRequest::ContinueFrom`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContinueFromRequest {
    /// VM UUID.
    pub uuid: Uuid,
    /// The point the VM failed over from on the source.
    pub point: u64,
}

/// The extended replica's answer to [`PeerRequest::ContinueFrom`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContinuedFrom {
    /// The point it holds now: the base of the source's next cycle.
    pub latest: u64,
    /// It does not hold the source's point: the source resynchronises (block hashes).
    pub resync: bool,
    /// The points it dropped (newer than the source's point).
    pub discarded: Vec<u64>,
}

/// Arguments of [`PeerRequest::ReplicaInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfoRequest {
    /// VM UUID.
    pub uuid: Uuid,
    /// The primary agent's listen address (HOST:PORT), remembered for the split-brain probe.
    #[serde(default)]
    pub listen: Option<String>,
}

/// The answer to a [`PeerRequest`], of the same variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerResponse {
    /// Answer to [`PeerRequest::CreateReplica`].
    CreateReplica {
        /// False when the replica VM already existed (its definition and policy were refreshed).
        created: bool,
    },
    /// Answer to [`PeerRequest::ReplicaInfo`].
    ReplicaInfo(ReplicaVmInfo),
    /// Answer to [`PeerRequest::PrimaryVmState`].
    PrimaryVmState(PrimaryVmState),
    /// Answer to [`PeerRequest::BecomeReplica`].
    BecomeReplica(BecameReplica),
    /// Answer to [`PeerRequest::ResyncHashes`].
    ResyncHashes(BlockHashes),
    /// Answer to [`PeerRequest::DisableReplica`]: the replica VM's state afterwards.
    DisableReplica {
        /// Its state (Disabled, or the failover state it keeps).
        state: ReplicationState,
    },
    /// Answer to [`PeerRequest::SourceVmState`].
    SourceVmState(SourceVmState),
    /// Answer to [`PeerRequest::ContinueFrom`].
    ContinueFrom(ContinuedFrom),
    /// Answer to [`PeerRequest::Witness`].
    Witness {
        /// The witness's answer.
        lease: WitnessResponse,
    },
    /// Answer to [`PeerRequest::Promise`].
    Promise(PromiseResponse),
    /// Answer to [`PeerRequest::Follow`]: the point kept as the base (`latest`), `resync`
    /// always true, `discarded` always empty.
    Follow(ContinuedFrom),
}

/// The source's view of a VM across an extended chain (answer to `source-vm-state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVmState {
    /// The VM's replication state on the source.
    pub state: ReplicationState,
    /// True when the VM runs on the source (its own VM as a primary, or a live failed-over
    /// VM when the source is a replica).
    pub running: bool,
    /// What the source's own probe of its primary found; `None` when the source is the VM's
    /// primary itself.
    pub upstream: Option<UpstreamProbe>,
}

/// What a forwarding replica's split-brain probe of its own primary found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "probe", rename_all = "kebab-case")]
pub enum UpstreamProbe {
    /// The primary answered.
    Answered {
        /// Its VM runs.
        running: bool,
        /// The VM's state on the primary.
        state: ReplicationState,
    },
    /// Nothing answers at the primary's address (host or network unreachable, no answer in
    /// time).
    Lost,
    /// The probe could not be made or its answer cannot be trusted.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The primary's view of one of its VMs (split-brain probe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryVmState {
    /// The VM's replication state on the primary.
    pub state: ReplicationState,
    /// True when the VM process runs (a VM prepared for failover counts as not running).
    pub running: bool,
}

/// The old primary's answer once it became the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BecameReplica {
    /// Its new state (replicating).
    pub state: ReplicationState,
    /// The point both sides start from.
    pub point: u64,
    /// True when its disks differ from that point and the new primary must resynchronize.
    pub resync: bool,
}

/// Block hashes of one disk of the replica's latest recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    /// The recovery point hashed (the replica's latest): the resync cycle's base.
    pub point: u64,
    /// The replica's size of the disk (0 if the point has no such disk).
    pub point_disk_size: u64,
    /// One BLAKE3 hash per asked block, in block order.
    pub hashes: Vec<BlockHash>,
}

/// A body or a protocol-1 JSON value that does not describe a valid call or answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerCodecError {
    /// The body is shorter than its length prefix says.
    #[error("peer body truncated: {len} bytes")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The JSON head is larger than [`MAX_HEAD`].
    #[error("peer body head of {len} bytes exceeds {MAX_HEAD}")]
    HeadTooLarge {
        /// The announced head length.
        len: usize,
    },
    /// The JSON head does not parse as the expected type.
    #[error("peer body head is invalid")]
    Json(#[source] serde_json::Error),
    /// A protocol-1 call names a method this version does not know.
    #[error("unknown method {0:?}")]
    UnknownMethod(String),
    /// A protocol-1 body is not a JSON object.
    #[error("the body of {method:?} is not a JSON object")]
    NotAnObject {
        /// The method.
        method: String,
    },
    /// The binary tail does not hold what the head announces.
    #[error("binary tail of {len} bytes, expected {expected}")]
    Tail {
        /// Tail bytes received.
        len: usize,
        /// Tail bytes the head announces.
        expected: usize,
    },
    /// A protocol-1 answer's hex hashes are not lowercase hex of whole 32-byte hashes.
    #[error("hashes are not hex of 32-byte hashes")]
    BadHex,
    /// The answer is of another call than the request.
    #[error("answer {got:?} to a {expected:?} request")]
    Mismatch {
        /// The request's method.
        expected: &'static str,
        /// The answer's method.
        got: &'static str,
    },
}

/// The JSON head of a [`PeerResponse`]: the response without its binary payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
enum ResponseHead {
    CreateReplica {
        created: bool,
    },
    ReplicaInfo(ReplicaVmInfo),
    PrimaryVmState(PrimaryVmState),
    BecomeReplica(BecameReplica),
    ResyncHashes {
        point: u64,
        point_disk_size: u64,
        count: u64,
    },
    DisableReplica {
        state: ReplicationState,
    },
    SourceVmState(SourceVmState),
    ContinueFrom(ContinuedFrom),
    Witness {
        lease: WitnessResponse,
    },
    Promise {
        promise: PromiseResponse,
    },
    Follow(ContinuedFrom),
}

/// Frames a protocol-2 body: `u32` LE length of `head`, `head` (JSON), then `tail` (binary).
pub fn encode_body(head: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + head.len() + tail.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(tail);
    out
}

/// Splits a protocol-2 body into its JSON head and binary tail.
pub fn decode_body(body: &[u8]) -> Result<(&[u8], &[u8]), PeerCodecError> {
    let truncated = PeerCodecError::Truncated { len: body.len() };
    let (len, rest) = body.split_first_chunk::<4>().ok_or(truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_HEAD {
        return Err(PeerCodecError::HeadTooLarge { len });
    }
    if rest.len() < len {
        return Err(PeerCodecError::Truncated { len: body.len() });
    }
    Ok(rest.split_at(len))
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain derived types into memory cannot fail (string keys only).
    serde_json::to_vec(v).unwrap_or_default()
}

impl PeerRequest {
    /// The call's method name (the protocol-1 route `/v1/call/{method}`).
    pub fn method(&self) -> &'static str {
        match self {
            PeerRequest::CreateReplica(_) => "create-replica",
            PeerRequest::ReplicaInfo(_) => "replica-info",
            PeerRequest::PrimaryVmState { .. } => "primary-vm-state",
            PeerRequest::BecomeReplica(_) => "become-replica",
            PeerRequest::ResyncHashes(_) => "resync-hashes",
            PeerRequest::DisableReplica { .. } => "disable-replica",
            PeerRequest::SourceVmState { .. } => "source-vm-state",
            PeerRequest::ContinueFrom(_) => "continue-from",
            PeerRequest::Witness { .. } => "witness",
            PeerRequest::Promise { .. } => "promise",
            PeerRequest::Follow { .. } => "follow",
        }
    }

    /// The protocol-2 request body (the JSON head; requests have no binary tail).
    pub fn encode(&self) -> Vec<u8> {
        encode_body(&to_json(self), &[])
    }

    /// Parses a protocol-2 request body.
    pub fn decode(body: &[u8]) -> Result<PeerRequest, PeerCodecError> {
        let (head, tail) = decode_body(body)?;
        if !tail.is_empty() {
            return Err(PeerCodecError::Tail {
                len: tail.len(),
                expected: 0,
            });
        }
        serde_json::from_slice(head).map_err(PeerCodecError::Json)
    }

    /// The protocol-1 form: method name and JSON body.
    pub fn to_v1(&self) -> (&'static str, Value) {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.remove("method");
        }
        (self.method(), v)
    }

    /// Maps a protocol-1 call (`method` and its JSON body) onto the typed request.
    pub fn from_v1(method: &str, body: Value) -> Result<PeerRequest, PeerCodecError> {
        const KNOWN: [&str; 8] = [
            "create-replica",
            "replica-info",
            "primary-vm-state",
            "become-replica",
            "resync-hashes",
            "disable-replica",
            "source-vm-state",
            "continue-from",
        ];
        if !KNOWN.contains(&method) {
            return Err(PeerCodecError::UnknownMethod(method.to_string()));
        }
        let Value::Object(mut m) = body else {
            return Err(PeerCodecError::NotAnObject {
                method: method.to_string(),
            });
        };
        m.insert("method".into(), Value::String(method.to_string()));
        serde_json::from_value(Value::Object(m)).map_err(PeerCodecError::Json)
    }
}

impl PeerResponse {
    /// The method of the request this answers.
    pub fn method(&self) -> &'static str {
        match self {
            PeerResponse::CreateReplica { .. } => "create-replica",
            PeerResponse::ReplicaInfo(_) => "replica-info",
            PeerResponse::PrimaryVmState(_) => "primary-vm-state",
            PeerResponse::BecomeReplica(_) => "become-replica",
            PeerResponse::ResyncHashes(_) => "resync-hashes",
            PeerResponse::DisableReplica { .. } => "disable-replica",
            PeerResponse::SourceVmState(_) => "source-vm-state",
            PeerResponse::ContinueFrom(_) => "continue-from",
            PeerResponse::Witness { .. } => "witness",
            PeerResponse::Promise(_) => "promise",
            PeerResponse::Follow(_) => "follow",
        }
    }

    /// `Ok(self)` if this answers `req`, else [`PeerCodecError::Mismatch`].
    pub fn answering(self, req: &PeerRequest) -> Result<PeerResponse, PeerCodecError> {
        if self.method() == req.method() {
            Ok(self)
        } else {
            Err(PeerCodecError::Mismatch {
                expected: req.method(),
                got: self.method(),
            })
        }
    }

    /// The protocol-2 answer body: the JSON head, then for `ResyncHashes` the hashes as
    /// concatenated raw 32-byte values.
    pub fn encode(&self) -> Vec<u8> {
        let head = match self {
            PeerResponse::CreateReplica { created } => {
                ResponseHead::CreateReplica { created: *created }
            }
            PeerResponse::ReplicaInfo(i) => ResponseHead::ReplicaInfo(i.clone()),
            PeerResponse::PrimaryVmState(s) => ResponseHead::PrimaryVmState(s.clone()),
            PeerResponse::BecomeReplica(b) => ResponseHead::BecomeReplica(b.clone()),
            PeerResponse::DisableReplica { state } => {
                ResponseHead::DisableReplica { state: *state }
            }
            PeerResponse::SourceVmState(s) => ResponseHead::SourceVmState(s.clone()),
            PeerResponse::ContinueFrom(c) => ResponseHead::ContinueFrom(c.clone()),
            PeerResponse::Witness { lease } => ResponseHead::Witness {
                lease: lease.clone(),
            },
            PeerResponse::Promise(p) => ResponseHead::Promise { promise: p.clone() },
            PeerResponse::Follow(c) => ResponseHead::Follow(c.clone()),
            PeerResponse::ResyncHashes(h) => {
                let head = ResponseHead::ResyncHashes {
                    point: h.point,
                    point_disk_size: h.point_disk_size,
                    count: h.hashes.len() as u64,
                };
                return encode_body(&to_json(&head), h.hashes.as_flattened());
            }
        };
        encode_body(&to_json(&head), &[])
    }

    /// Parses a protocol-2 answer body.
    pub fn decode(body: &[u8]) -> Result<PeerResponse, PeerCodecError> {
        let (head, tail) = decode_body(body)?;
        let head: ResponseHead = serde_json::from_slice(head).map_err(PeerCodecError::Json)?;
        let no_tail = |r: PeerResponse| {
            if tail.is_empty() {
                Ok(r)
            } else {
                Err(PeerCodecError::Tail {
                    len: tail.len(),
                    expected: 0,
                })
            }
        };
        match head {
            ResponseHead::CreateReplica { created } => {
                no_tail(PeerResponse::CreateReplica { created })
            }
            ResponseHead::ReplicaInfo(i) => no_tail(PeerResponse::ReplicaInfo(i)),
            ResponseHead::PrimaryVmState(s) => no_tail(PeerResponse::PrimaryVmState(s)),
            ResponseHead::BecomeReplica(b) => no_tail(PeerResponse::BecomeReplica(b)),
            ResponseHead::DisableReplica { state } => {
                no_tail(PeerResponse::DisableReplica { state })
            }
            ResponseHead::SourceVmState(s) => no_tail(PeerResponse::SourceVmState(s)),
            ResponseHead::ContinueFrom(c) => no_tail(PeerResponse::ContinueFrom(c)),
            ResponseHead::Witness { lease } => no_tail(PeerResponse::Witness { lease }),
            ResponseHead::Promise { promise } => no_tail(PeerResponse::Promise(promise)),
            ResponseHead::Follow(c) => no_tail(PeerResponse::Follow(c)),
            ResponseHead::ResyncHashes {
                point,
                point_disk_size,
                count,
            } => {
                let expected = usize::try_from(count)
                    .ok()
                    .and_then(|c| c.checked_mul(32))
                    .unwrap_or(usize::MAX);
                if tail.len() != expected {
                    return Err(PeerCodecError::Tail {
                        len: tail.len(),
                        expected,
                    });
                }
                let (hashes, _) = tail.as_chunks::<32>();
                Ok(PeerResponse::ResyncHashes(BlockHashes {
                    point,
                    point_disk_size,
                    hashes: hashes.to_vec(),
                }))
            }
        }
    }

    /// The protocol-1 answer JSON (block hashes as lowercase hex, as `BlockHashesReply`).
    pub fn to_v1(&self) -> Value {
        match self {
            PeerResponse::CreateReplica { created } => serde_json::json!({ "created": created }),
            PeerResponse::ReplicaInfo(i) => serde_json::to_value(i).unwrap_or(Value::Null),
            PeerResponse::PrimaryVmState(s) => serde_json::to_value(s).unwrap_or(Value::Null),
            PeerResponse::BecomeReplica(b) => serde_json::to_value(b).unwrap_or(Value::Null),
            PeerResponse::DisableReplica { state } => serde_json::json!({ "state": state }),
            PeerResponse::SourceVmState(s) => serde_json::to_value(s).unwrap_or(Value::Null),
            PeerResponse::ContinueFrom(c) => serde_json::to_value(c).unwrap_or(Value::Null),
            PeerResponse::Witness { lease } => serde_json::to_value(lease).unwrap_or(Value::Null),
            PeerResponse::Promise(p) => serde_json::to_value(p).unwrap_or(Value::Null),
            PeerResponse::Follow(c) => serde_json::to_value(c).unwrap_or(Value::Null),
            PeerResponse::ResyncHashes(h) => serde_json::to_value(BlockHashesReply {
                point: h.point,
                point_disk_size: h.point_disk_size,
                hashes: to_hex(&h.hashes),
            })
            .unwrap_or(Value::Null),
        }
    }

    /// Reads a protocol-1 answer `v` to `req`.
    pub fn from_v1(req: &PeerRequest, v: Value) -> Result<PeerResponse, PeerCodecError> {
        let json = PeerCodecError::Json;
        Ok(match req {
            PeerRequest::CreateReplica(_) => {
                #[derive(Deserialize)]
                struct Created {
                    created: bool,
                }
                let c: Created = serde_json::from_value(v).map_err(json)?;
                PeerResponse::CreateReplica { created: c.created }
            }
            PeerRequest::ReplicaInfo(_) => {
                PeerResponse::ReplicaInfo(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::PrimaryVmState { .. } => {
                PeerResponse::PrimaryVmState(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::BecomeReplica(_) => {
                PeerResponse::BecomeReplica(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::SourceVmState { .. } => {
                PeerResponse::SourceVmState(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::ContinueFrom(_) => {
                PeerResponse::ContinueFrom(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::Witness { .. } => PeerResponse::Witness {
                lease: serde_json::from_value(v).map_err(json)?,
            },
            PeerRequest::Promise { .. } => {
                PeerResponse::Promise(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::Follow { .. } => {
                PeerResponse::Follow(serde_json::from_value(v).map_err(json)?)
            }
            PeerRequest::DisableReplica { .. } => {
                #[derive(Deserialize)]
                struct Disabled {
                    state: ReplicationState,
                }
                let d: Disabled = serde_json::from_value(v).map_err(json)?;
                PeerResponse::DisableReplica { state: d.state }
            }
            PeerRequest::ResyncHashes(_) => {
                let r: BlockHashesReply = serde_json::from_value(v).map_err(json)?;
                PeerResponse::ResyncHashes(BlockHashes {
                    point: r.point,
                    point_disk_size: r.point_disk_size,
                    hashes: from_hex(&r.hashes).ok_or(PeerCodecError::BadHex)?,
                })
            }
        })
    }
}

fn to_hex(hashes: &[BlockHash]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(hashes.len() * 64);
    for b in hashes.as_flattened() {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<BlockHash>> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let (chunks, rest) = s.as_bytes().as_chunks::<64>();
    if !rest.is_empty() {
        return None;
    }
    chunks
        .iter()
        .map(|c| {
            let mut h = [0u8; 32];
            for (out, pair) in h.iter_mut().zip(c.as_chunks::<2>().0) {
                *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
            }
            Some(h)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskInfo;

    fn requests() -> Vec<PeerRequest> {
        let uuid = Uuid::from_u128(7);
        let disks = vec![DiskInfo {
            id: "d0".into(),
            size: 1 << 20,
        }];
        vec![
            PeerRequest::CreateReplica(CreateReplica {
                launch_toml: "x = 1".into(),
                uuid,
                name: "vm".into(),
                disks: disks.clone(),
                frequency_secs: 30,
                recovery_points: 0,
                retain: crate::retain::RetentionGrid::parse("1h=24,1d=7,1mo=12", true).ok(),
                auto_failover: Some(crate::lease::AutoFailover {
                    auto_failover_ms: 60_000,
                    witness: "10.0.0.3:9443".into(),
                    witness_fingerprint: "SHA256:ww".into(),
                    power_off: true,
                    point: crate::lease::TakeoverPoint::AppConsistent,
                }),
            }),
            PeerRequest::ReplicaInfo(ReplicaInfoRequest {
                uuid,
                listen: Some("127.0.0.1:1".into()),
            }),
            PeerRequest::PrimaryVmState { uuid },
            PeerRequest::BecomeReplica(BecomeReplica {
                uuid,
                point: 4,
                taken_at_ms: 5,
                launch_toml: "y = 2".into(),
                disks,
            }),
            PeerRequest::ResyncHashes(BlockHashesRequest {
                uuid,
                disk: "d0".into(),
                disk_size: 1 << 20,
                block_size: 1 << 16,
                first_block: 0,
                count: 16,
                point: None,
                read: true,
            }),
            PeerRequest::DisableReplica { uuid },
            PeerRequest::SourceVmState { uuid },
            PeerRequest::ContinueFrom(ContinueFromRequest { uuid, point: 7 }),
            PeerRequest::Witness {
                call: WitnessRequest::Register {
                    vm: uuid,
                    replica: "SHA256:bb".into(),
                    lease_ms: 30_000,
                },
            },
            PeerRequest::Witness {
                call: WitnessRequest::Renew { vm: uuid, epoch: 3 },
            },
            PeerRequest::Witness {
                call: WitnessRequest::Takeover { vm: uuid },
            },
            PeerRequest::Promise { uuid },
            PeerRequest::Promise { uuid },
            PeerRequest::Follow { uuid },
        ]
    }

    fn responses() -> Vec<PeerResponse> {
        vec![
            PeerResponse::CreateReplica { created: true },
            PeerResponse::ReplicaInfo(ReplicaVmInfo {
                uuid: Uuid::from_u128(7),
                latest: Some(3),
                state: ReplicationState::Replicating,
            }),
            PeerResponse::PrimaryVmState(PrimaryVmState {
                state: ReplicationState::Replicating,
                running: false,
            }),
            PeerResponse::BecomeReplica(BecameReplica {
                state: ReplicationState::Replicating,
                point: 4,
                resync: true,
            }),
            PeerResponse::ResyncHashes(BlockHashes {
                point: 4,
                point_disk_size: 1 << 20,
                hashes: (0..16u8).map(|i| [i.wrapping_mul(37); 32]).collect(),
            }),
            PeerResponse::DisableReplica {
                state: ReplicationState::Disabled,
            },
            PeerResponse::SourceVmState(SourceVmState {
                state: ReplicationState::Replicating,
                running: false,
                upstream: Some(UpstreamProbe::Answered {
                    running: true,
                    state: ReplicationState::Replicating,
                }),
            }),
            PeerResponse::ContinueFrom(ContinuedFrom {
                latest: 5,
                resync: true,
                discarded: vec![8, 9],
            }),
            PeerResponse::Witness {
                lease: WitnessResponse::Held {
                    epoch: 2,
                    by_peer: true,
                    remaining_ms: 1_500,
                },
            },
            PeerResponse::Witness {
                lease: WitnessResponse::Conflict { reason: "x".into() },
            },
            PeerResponse::Witness {
                lease: WitnessResponse::Granted {
                    epoch: 2,
                    lease_ms: 30_000,
                },
            },
            PeerResponse::Promise(PromiseResponse::Granted { promise_ms: 10_000 }),
            PeerResponse::Promise(PromiseResponse::Refused { taken_over: true }),
            PeerResponse::Follow(ContinuedFrom {
                latest: 7,
                resync: true,
                discarded: vec![],
            }),
        ]
    }

    #[test]
    fn disable_replica_wire_form() {
        let uuid = Uuid::from_u128(7);
        let (head, _) = decode_body(&PeerRequest::DisableReplica { uuid }.encode())
            .map(|(h, t)| (h.to_vec(), t.len()))
            .expect("frame");
        let v: Value = serde_json::from_slice(&head).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"method": "disable-replica", "uuid": uuid.to_string()})
        );
        let answer = PeerResponse::DisableReplica {
            state: ReplicationState::Disabled,
        };
        assert_eq!(answer.to_v1(), serde_json::json!({"state": "Disabled"}));
    }

    #[test]
    fn requests_round_trip_in_both_versions() {
        for r in requests() {
            assert_eq!(PeerRequest::decode(&r.encode()).expect("v2"), r);
            let (method, body) = r.to_v1();
            assert_eq!(method, r.method());
            assert!(body.get("method").is_none(), "{body}");
            if matches!(
                r,
                PeerRequest::Witness { .. }
                    | PeerRequest::Promise { .. }
                    | PeerRequest::Follow { .. }
            ) {
                // Protocol 6 and later only: no protocol-1 route.
                assert!(matches!(
                    PeerRequest::from_v1(method, body),
                    Err(PeerCodecError::UnknownMethod(_))
                ));
                continue;
            }
            assert_eq!(PeerRequest::from_v1(method, body).expect("v1"), r);
        }
    }

    #[test]
    fn every_upstream_probe_round_trips() {
        let req = PeerRequest::SourceVmState {
            uuid: Uuid::from_u128(7),
        };
        for upstream in [
            None,
            Some(UpstreamProbe::Lost),
            Some(UpstreamProbe::Failed {
                reason: "refused".into(),
            }),
        ] {
            let resp = PeerResponse::SourceVmState(SourceVmState {
                state: ReplicationState::Replicating,
                running: upstream.is_none(),
                upstream,
            });
            assert_eq!(PeerResponse::decode(&resp.encode()).expect("v2"), resp);
            assert_eq!(PeerResponse::from_v1(&req, resp.to_v1()).expect("v1"), resp);
        }
    }

    #[test]
    fn responses_round_trip_in_both_versions() {
        for (req, resp) in requests().iter().zip(responses()) {
            assert_eq!(PeerResponse::decode(&resp.encode()).expect("v2"), resp);
            let back = PeerResponse::from_v1(req, resp.to_v1()).expect("v1");
            assert_eq!(back.clone().answering(req).expect("same call"), resp);
        }
    }

    #[test]
    fn hashes_travel_as_raw_bytes_and_v1_as_hex() {
        let h = BlockHashes {
            point: 1,
            point_disk_size: 2,
            hashes: vec![[0xab; 32], [0x01; 32]],
        };
        let body = PeerResponse::ResyncHashes(h).encode();
        let (head, tail) = decode_body(&body).expect("frame");
        assert_eq!(tail.len(), 64);
        assert_eq!(&tail[..32], &[0xab; 32]);
        assert!(!String::from_utf8_lossy(head).contains("abab"));
        let v1 = PeerResponse::ResyncHashes(BlockHashes {
            point: 1,
            point_disk_size: 2,
            hashes: vec![[0xab; 32]],
        })
        .to_v1();
        assert_eq!(v1["hashes"], Value::String("ab".repeat(32)));
    }

    #[test]
    fn a_chunk_of_hashes_is_half_the_size_of_its_hex() {
        // One `resync-hashes` chunk of the agent: 4096 blocks.
        let r = PeerResponse::ResyncHashes(BlockHashes {
            point: 12345,
            point_disk_size: 8 << 30,
            hashes: (0..4096u32).map(|i| [i.to_le_bytes()[0]; 32]).collect(),
        });
        let v2 = r.encode().len();
        let v1 = serde_json::to_vec(&r.to_v1()).expect("json").len();
        assert!(v2 > 4096 * 32 && v2 < 4096 * 32 + 128, "{v2}");
        assert!(v1 > 4096 * 64, "{v1}");
    }

    #[test]
    fn the_protocol_1_wire_form_is_unchanged() {
        // What a version-1 agent sends and expects, byte for byte in meaning.
        let uuid = Uuid::from_u128(9);
        let r = PeerRequest::from_v1(
            "replica-info",
            serde_json::json!({ "uuid": uuid, "listen": "h:1" }),
        )
        .expect("parse");
        assert_eq!(
            r,
            PeerRequest::ReplicaInfo(ReplicaInfoRequest {
                uuid,
                listen: Some("h:1".into())
            })
        );
        let r = PeerRequest::from_v1("primary-vm-state", serde_json::json!({ "uuid": uuid }))
            .expect("parse");
        assert_eq!(r, PeerRequest::PrimaryVmState { uuid });
        let v = PeerResponse::PrimaryVmState(PrimaryVmState {
            state: ReplicationState::Replicating,
            running: true,
        })
        .to_v1();
        assert_eq!(v["running"], Value::Bool(true));
        assert!(v.get("answer").is_none());
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        assert!(matches!(
            PeerRequest::from_v1("nope", serde_json::json!({})),
            Err(PeerCodecError::UnknownMethod(_))
        ));
        assert!(matches!(
            PeerRequest::from_v1("replica-info", serde_json::json!(3)),
            Err(PeerCodecError::NotAnObject { .. })
        ));
        assert!(matches!(
            PeerRequest::from_v1("replica-info", serde_json::json!({ "uuid": "x" })),
            Err(PeerCodecError::Json(_))
        ));
        assert!(matches!(
            PeerRequest::decode(&[1, 0]),
            Err(PeerCodecError::Truncated { .. })
        ));
        assert!(matches!(
            PeerRequest::decode(&[9, 0, 0, 0, b'{']),
            Err(PeerCodecError::Truncated { .. })
        ));
        assert!(matches!(
            PeerRequest::decode(&encode_body(b"{}", &[])),
            Err(PeerCodecError::Json(_))
        ));
        assert!(matches!(
            PeerRequest::decode(&u32::MAX.to_le_bytes()),
            Err(PeerCodecError::HeadTooLarge { .. })
        ));
        let mut body = PeerResponse::ResyncHashes(BlockHashes {
            point: 1,
            point_disk_size: 2,
            hashes: vec![[1; 32]],
        })
        .encode();
        body.pop();
        assert!(matches!(
            PeerResponse::decode(&body),
            Err(PeerCodecError::Tail {
                len: 31,
                expected: 32
            })
        ));
        let body = encode_body(
            &to_json(&ResponseHead::CreateReplica { created: true }),
            &[1],
        );
        assert!(matches!(
            PeerResponse::decode(&body),
            Err(PeerCodecError::Tail { .. })
        ));
        let req = PeerRequest::PrimaryVmState { uuid: Uuid::nil() };
        assert!(matches!(
            PeerResponse::CreateReplica { created: true }.answering(&req),
            Err(PeerCodecError::Mismatch { .. })
        ));
        let bad = serde_json::json!({ "point": 1, "point_disk_size": 2, "hashes": "zz" });
        let resync = &requests()[4];
        assert!(matches!(
            PeerResponse::from_v1(resync, bad),
            Err(PeerCodecError::BadHex)
        ));
        let odd = serde_json::json!({ "point": 1, "point_disk_size": 2, "hashes": "ab" });
        assert!(matches!(
            PeerResponse::from_v1(resync, odd),
            Err(PeerCodecError::BadHex)
        ));
    }
}
