//! The wire and on-disk types of automatic failover with a witness (issue 18;
//! `docs/auto-failover.md`): the witness's calls (`WitnessRequest`/`WitnessResponse`), the
//! lease entry the witness persists per VM relationship (`LeaseEntry`), and why a primary
//! fenced itself (`FenceReason`), which its record keeps so a fenced primary stays fenced
//! across restarts (`HolderSnapshot`).
//!
//! Times never cross a host boundary: every party measures durations on its own monotonic
//! clock, so clock offsets between hosts change nothing; only clock *rates* matter, and the
//! drift margin of `vmr_core::autofailover` covers them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One lease the witness keeps: one per VM relationship, naming its two parties by their
/// agents' certificate fingerprints. Persisted by the witness; the expiry is not (a restarted
/// witness counts every lease as renewed at its start, so a restart never hands a live lease
/// away).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LeaseEntry {
    /// The VM.
    pub vm: Uuid,
    /// The two agents of the relationship (fingerprints); the holder is one of them.
    pub parties: [String; 2],
    /// The agent that holds the lease now.
    pub holder: String,
    /// Counts hand-overs: 1 when registered, +1 at every hand-over.
    pub epoch: u64,
    /// The lease's length, milliseconds.
    pub lease_ms: u64,
}

/// A call to the witness. The caller is the agent whose certificate the mutual-TLS connection
/// authenticated; it is never named in the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum WitnessRequest {
    /// `enable --auto-failover` on the primary: create the VM's lease held by the caller.
    Register {
        /// The VM.
        vm: Uuid,
        /// The replica's agent (fingerprint).
        replica: String,
        /// The lease's length, milliseconds.
        lease_ms: u64,
    },
    /// The holder extends its lease.
    Renew {
        /// The VM.
        vm: Uuid,
        /// The epoch the caller holds.
        epoch: u64,
    },
    /// The other party asks for the lease: granted only once the holder's lease expired.
    Takeover {
        /// The VM.
        vm: Uuid,
    },
    /// What the witness knows of the VM's lease (for `status` and `failover start`).
    Query {
        /// The VM.
        vm: Uuid,
    },
    /// The holder ends the relationship (`disable`).
    Remove {
        /// The VM.
        vm: Uuid,
        /// The epoch the caller holds.
        epoch: u64,
    },
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub enum WitnessResponse {
    /// The caller holds the lease for `lease_ms` from when it sent the call.
    Granted {
        /// The epoch now held.
        epoch: u64,
        /// The lease's length, milliseconds.
        lease_ms: u64,
    },
    /// Someone else holds the lease.
    Held {
        /// The holder's epoch.
        epoch: u64,
        /// The holder is the caller's peer in the relationship.
        by_peer: bool,
        /// Milliseconds until the holder's lease expires (0: already expired).
        remaining_ms: u64,
    },
    /// The VM's lease was removed.
    Removed,
    /// The witness knows no lease of this VM.
    Unknown,
    /// The caller is not a party of this VM's relationship.
    NotAParty,
    /// A call that does not fit the lease (a stale epoch of the holder, a second register
    /// with other parties).
    Conflict {
        /// Why.
        reason: String,
    },
}

/// Why a primary fenced its VM (paused it; powered it off by policy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum FenceReason {
    /// Neither the witness nor the replica renewed its right to run the VM before that right
    /// ran out.
    LeaseExpired {
        /// The last renewal's error, as the driver saw it.
        last_error: Option<String>,
    },
    /// The witness says the other party holds the lease (it took the VM over).
    Superseded {
        /// The epoch the other party holds.
        epoch: u64,
    },
    /// The witness refused the lease for another reason (unknown VM, not a party, conflict).
    Refused {
        /// The witness's answer.
        answer: String,
    },
}

impl std::fmt::Display for FenceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FenceReason::LeaseExpired { last_error: None } => {
                f.write_str("the lease expired without a renewal")
            }
            FenceReason::LeaseExpired {
                last_error: Some(e),
            } => write!(f, "the lease expired without a renewal (last error: {e})"),
            FenceReason::Superseded { epoch } => {
                write!(f, "the replica took the VM over (lease epoch {epoch})")
            }
            FenceReason::Refused { answer } => write!(f, "the witness refused the lease: {answer}"),
        }
    }
}

/// The persisted part of a primary's lease holder: its epoch and whether it fenced. A fenced
/// primary stays fenced after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HolderSnapshot {
    /// The epoch held (0: never granted).
    pub epoch: u64,
    /// Why the VM was fenced, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<FenceReason>,
}

impl HolderSnapshot {
    /// Never granted and not fenced (what a record without auto-failover keeps).
    pub fn is_default(&self) -> bool {
        *self == HolderSnapshot::default()
    }
}

/// The replica's answer to a primary asking it for a promise not to take the VM over (the
/// primary's second source of the right to run, besides the witness's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub enum PromiseResponse {
    /// The replica will not ask the witness for the lease for `promise_ms` from when it
    /// received the call.
    Granted {
        /// The promise's length, milliseconds.
        promise_ms: u64,
    },
    /// No promise: the replica is asking the witness for the lease, or took the VM over.
    Refused {
        /// The replica took the VM over (the primary fences at once).
        taken_over: bool,
    },
}

/// One lease an agent keeps as a witness, as `server show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WitnessLease {
    /// The lease.
    #[serde(flatten)]
    pub entry: LeaseEntry,
    /// Milliseconds until it expires without a renewal (0: expired; the other party may take
    /// it).
    pub remaining_ms: u64,
}

/// A VM relationship's automatic failover settings (`enable --auto-failover DURATION --witness
/// HOST:PORT --witness-fingerprint FP [--fence power-off]`): kept in both parties' records (the
/// primary sends them to the replica with `create-replica`). `vmr_core::autofailover::
/// LeaseParams::from_auto_failover` is their one validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AutoFailover {
    /// `--auto-failover`: how long the replica must not hear the primary before it asks the
    /// witness for the lease, milliseconds.
    pub auto_failover_ms: u64,
    /// The witness agent's peer address, HOST:PORT.
    pub witness: String,
    /// The witness agent's certificate fingerprint.
    pub witness_fingerprint: String,
    /// `--fence power-off`: fence by killing QEMU instead of pausing it.
    #[serde(default)]
    pub power_off: bool,
    /// `--auto-failover-point`: which point an automatic failover starts the VM from (absent
    /// in records written before it: the latest).
    #[serde(default)]
    pub point: TakeoverPoint,
}

/// Which recovery point an automatic failover starts the VM from (`enable
/// --auto-failover-point`); the choice among the replica's points is
/// `vmr_core::autofailover::takeover_point`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TakeoverPoint {
    /// The latest applied point (crash-consistent or better): the least data lost.
    #[default]
    Latest,
    /// The latest app-consistent point (guest file systems frozen, or a planned failover's
    /// final point); the latest point when the replica holds none.
    AppConsistent,
}

impl TakeoverPoint {
    /// The option's spelling (`latest`, `app-consistent`).
    pub fn as_str(self) -> &'static str {
        match self {
            TakeoverPoint::Latest => "latest",
            TakeoverPoint::AppConsistent => "app-consistent",
        }
    }
}

/// What `status` shows of a VM's automatic failover, on either side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LeaseStatus {
    /// `primary` (the lease holder's side) or `replica` (the takeover watch).
    pub side: String,
    /// The side's phase: primary `holding`, `fenced`, `unfencing`, `stopped`; replica
    /// `watching`, `asking`, `took-over`, `stopped`.
    pub phase: String,
    /// The witness, HOST:PORT.
    pub witness: String,
    /// `--auto-failover`, milliseconds.
    pub auto_failover_ms: u64,
    /// `--auto-failover-point`: the point a takeover starts the VM from.
    pub point: TakeoverPoint,
    /// Primary: the lease epoch held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Primary: milliseconds the VM may still run without a renewal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_left_ms: Option<u64>,
    /// Primary: why the VM was fenced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<FenceReason>,
    /// Replica: milliseconds since the primary was last heard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silence_ms: Option<u64>,
    /// Replica: milliseconds until it may ask the witness for the lease (0: it may now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeover_in_ms: Option<u64>,
    /// The last failed lease call's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
