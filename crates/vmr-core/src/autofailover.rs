//! Automatic failover with a witness (issue 18, `docs/auto-failover.md`), as three sans-IO
//! machines: the witness's lease table ([`WitnessTable`]: one lease per VM relationship,
//! granted, renewed, expired, handed over), the primary's side ([`LeaseHolder`]: renews its
//! right to run the VM and fences the VM when that right runs out), and the replica's side
//! ([`TakeoverWatch`]: takes the VM over only when the primary has been silent for the
//! configured time, no promise it gave the primary is live, and the witness hands it the
//! lease). Owns the lease arithmetic ([`LeaseParams`]).
//!
//! # The arithmetic
//!
//! Every party measures durations on its own monotonic clock; no time crosses a host. Let `L`
//! be the lease, `ρ` the largest clock-rate error of any host ([`MAX_DRIFT_PPM`]), and `F` the
//! longest a fence may take ([`FENCE_MS`]: QMP `stop`, or killing QEMU when `stop` does not
//! answer). The primary sends a renewal at its local `t0`; the witness grants it at a real time
//! after that and counts the lease out to `w0 + L` on its clock. The primary may run the VM
//! until `t0 + L - D` on its clock and fences then. In real time the primary has fenced by
//! `(L - D)/(1 - ρ) + F` after sending; the witness grants the lease to another party no
//! sooner than `L/(1 + ρ)` after it. With `D = 2ρL + F` (rounded up),
//! `(L - D)/(1 - ρ) + F <= L/(1 + ρ)` holds for every `ρ < 1`, so the VM on the primary is
//! paused before the witness can grant the replica anything. A promise from the replica (the
//! primary's second source of the right to run: the replica will not ask the witness before
//! `p0 + L` on its clock) follows the same arithmetic, and the replica never asks the witness
//! while a promise it gave is live.
//!
//! # States and events
//!
//! Primary ([`LeaseHolder`]):
//!
//! | state \ event | Start            | Tick                                  | Granted (witness or promise) | Held by peer / refused | Failed     | Unfence           |
//! |---------------|------------------|---------------------------------------|------------------------------|------------------------|------------|-------------------|
//! | Stopped       | Holding + renew  | -                                     | ignored                      | ignored                | ignored    | refused           |
//! | Holding       | refused          | renew when due; Fence at run-until    | run-until extended           | Fence                  | noted      | refused           |
//! | Fenced        | stays Fenced     | nothing                               | ignored (stays fenced)       | reason kept            | ignored    | Unfencing + renew |
//! | Unfencing     | refused          | nothing                               | Resume → Holding             | Fenced (superseded)    | Fenced     | refused           |
//!
//! Replica ([`TakeoverWatch`]):
//!
//! | state \ event | Heard     | Promise asked     | Tick                                        | Witness granted   | Witness held/failed  | Manual start                   |
//! |---------------|-----------|-------------------|---------------------------------------------|-------------------|----------------------|--------------------------------|
//! | Watching      | silence 0 | promise given     | ask the witness after silence and promises  | ignored           | ignored              | ask (refused if promise live)  |
//! | Asking        | silence 0 | refused           | give the ask up after a renew period        | Failover → TookOver | Watching           | refused                        |
//! | TookOver      | ignored   | refused, taken    | nothing                                     | ignored           | ignored              | refused                        |
//!
//! `--force` on a manual start takes the VM over without the witness (the admin's call).

use std::collections::BTreeMap;

use vmr_proto::Uuid;
use vmr_proto::lease::{
    FenceReason, HolderSnapshot, LeaseEntry, PromiseResponse, TakeoverPoint, WitnessRequest,
    WitnessResponse,
};
use vmr_proto::store::PointKind;

/// The largest clock-rate error assumed of any host, parts per million (1000 ppm = 0.1 %: an
/// NTP-disciplined clock is within 500 ppm, an undisciplined crystal within about 100 ppm).
pub const MAX_DRIFT_PPM: u64 = 1_000;
/// The longest a fence may take: QMP `stop` answered, or QEMU killed when it does not answer.
pub const FENCE_MS: u64 = 2_000;
/// The shortest `--auto-failover`.
pub const MIN_AUTO_FAILOVER_MS: u64 = 20_000;
/// The longest `--auto-failover`.
pub const MAX_AUTO_FAILOVER_MS: u64 = 3_600_000;

/// A bad `--auto-failover` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAutoFailover {
    /// Shorter than [`MIN_AUTO_FAILOVER_MS`].
    #[error(
        "--auto-failover {ms} ms is too short: at least {MIN_AUTO_FAILOVER_MS} ms (the lease is half of it and must outlast the drift margin and two renewals)"
    )]
    TooShort {
        /// The value given.
        ms: u64,
    },
    /// Longer than [`MAX_AUTO_FAILOVER_MS`].
    #[error("--auto-failover {ms} ms is too long: at most {MAX_AUTO_FAILOVER_MS} ms")]
    TooLong {
        /// The value given.
        ms: u64,
    },
}

/// The times of one relationship's automatic failover, all derived from `--auto-failover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseParams {
    /// `--auto-failover`: how long the replica must not hear the primary before it asks the
    /// witness for the lease.
    pub auto_failover_ms: u64,
    /// The lease `L` (and the replica's promise): half of `--auto-failover`.
    pub lease_ms: u64,
    /// How often the primary renews (and the replica retries an ask): a quarter of the lease.
    pub renew_ms: u64,
    /// The power-off policy: fence by killing QEMU instead of pausing it.
    pub power_off: bool,
}

/// The drift margin `D = ceil(2ρL) + F` for a lease or promise of `lease_ms`.
pub fn margin_ms(lease_ms: u64) -> u64 {
    (2 * MAX_DRIFT_PPM)
        .saturating_mul(lease_ms)
        .div_ceil(1_000_000)
        .saturating_add(FENCE_MS)
}

/// How long after sending a renewal the holder may run the VM on a grant of `lease_ms`: `L - D`
/// (0 when the margin eats the lease).
pub fn run_ms(lease_ms: u64) -> u64 {
    lease_ms.saturating_sub(margin_ms(lease_ms))
}

impl LeaseParams {
    /// The one validation of `--auto-failover`.
    pub fn from_auto_failover(ms: u64, power_off: bool) -> Result<Self, InvalidAutoFailover> {
        if ms < MIN_AUTO_FAILOVER_MS {
            return Err(InvalidAutoFailover::TooShort { ms });
        }
        if ms > MAX_AUTO_FAILOVER_MS {
            return Err(InvalidAutoFailover::TooLong { ms });
        }
        let lease_ms = ms / 2;
        Ok(LeaseParams {
            auto_failover_ms: ms,
            lease_ms,
            renew_ms: lease_ms / 4,
            power_off,
        })
    }
}

/// The point an automatic failover starts the VM from, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakeoverChoice {
    /// The point (None: the replica holds no point; `failover start` refuses as it always does).
    pub point: Option<u64>,
    /// The policy asked for an app-consistent point and the replica holds none: the latest
    /// point is taken instead (a VM started from a crash-consistent point beats no VM; the
    /// event says so).
    pub fell_back: bool,
}

/// Which of the replica's points (`(id, kind)`, any order) an automatic failover starts the VM
/// from under `policy` (`enable --auto-failover-point`): the latest; or the latest
/// app-consistent one, a planned failover's final point counting as one (the guest was shut
/// down cleanly), the latest when there is none.
pub fn takeover_point(policy: TakeoverPoint, points: &[(u64, PointKind)]) -> TakeoverChoice {
    let latest = points.iter().map(|(id, _)| *id).max();
    match policy {
        TakeoverPoint::Latest => TakeoverChoice {
            point: latest,
            fell_back: false,
        },
        TakeoverPoint::AppConsistent => {
            let consistent = points
                .iter()
                .filter(|(_, k)| matches!(k, PointKind::AppConsistent | PointKind::Planned))
                .map(|(id, _)| *id)
                .max();
            match consistent {
                Some(p) => TakeoverChoice {
                    point: Some(p),
                    fell_back: false,
                },
                None => TakeoverChoice {
                    point: latest,
                    fell_back: latest.is_some(),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The witness.

/// What the witness's driver does after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAction {
    /// Store this lease entry (before the answer is sent).
    Persist(LeaseEntry),
    /// Delete the VM's lease entry (before the answer is sent).
    Delete(Uuid),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    entry: LeaseEntry,
    expires_ms: u64,
}

/// The witness's leases, one per VM relationship.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessTable {
    leases: BTreeMap<Uuid, Lease>,
}

impl WitnessTable {
    /// No leases.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilt from the persisted entries at `now_ms` (a witness start): every lease counts as
    /// renewed now, so a restart never shortens a live lease.
    pub fn restore(entries: Vec<LeaseEntry>, now_ms: u64) -> Self {
        let leases = entries
            .into_iter()
            .map(|entry| {
                let expires_ms = now_ms.saturating_add(entry.lease_ms);
                (entry.vm, Lease { entry, expires_ms })
            })
            .collect();
        WitnessTable { leases }
    }

    /// The entries, for `status` on the witness.
    pub fn entries(&self) -> impl Iterator<Item = (&LeaseEntry, u64)> {
        self.leases.values().map(|l| (&l.entry, l.expires_ms))
    }

    /// One call from the agent `caller` (its authenticated fingerprint) at `now_ms`: the answer
    /// and what to store first.
    pub fn step(
        &mut self,
        now_ms: u64,
        caller: &str,
        request: &WitnessRequest,
    ) -> (WitnessResponse, Vec<WitnessAction>) {
        match request {
            WitnessRequest::Register {
                vm,
                replica,
                lease_ms,
            } => self.register(now_ms, caller, *vm, replica, *lease_ms),
            WitnessRequest::Renew { vm, epoch } => {
                let Some(lease) = self.leases.get_mut(vm) else {
                    return (WitnessResponse::Unknown, vec![]);
                };
                if let Some(answer) = check_party(lease, now_ms, caller) {
                    return (answer, vec![]);
                }
                if *epoch != lease.entry.epoch {
                    return (
                        WitnessResponse::Conflict {
                            reason: format!(
                                "epoch {epoch} renewed, the lease is at epoch {}",
                                lease.entry.epoch
                            ),
                        },
                        vec![],
                    );
                }
                lease.expires_ms = now_ms.saturating_add(lease.entry.lease_ms);
                (granted(&lease.entry), vec![])
            }
            WitnessRequest::Takeover { vm } => {
                let Some(lease) = self.leases.get_mut(vm) else {
                    return (WitnessResponse::Unknown, vec![]);
                };
                if !lease.entry.parties.iter().any(|p| p == caller) {
                    return (WitnessResponse::NotAParty, vec![]);
                }
                if lease.entry.holder == caller {
                    // A retried takeover whose grant was lost: the caller holds it already.
                    lease.expires_ms = now_ms.saturating_add(lease.entry.lease_ms);
                    return (granted(&lease.entry), vec![]);
                }
                if now_ms < lease.expires_ms {
                    return (held(lease, now_ms, caller), vec![]);
                }
                lease.entry.holder = caller.to_string();
                lease.entry.epoch = lease.entry.epoch.saturating_add(1);
                lease.expires_ms = now_ms.saturating_add(lease.entry.lease_ms);
                (
                    granted(&lease.entry),
                    vec![WitnessAction::Persist(lease.entry.clone())],
                )
            }
            WitnessRequest::Query { vm } => match self.leases.get(vm) {
                None => (WitnessResponse::Unknown, vec![]),
                Some(lease) if !lease.entry.parties.iter().any(|p| p == caller) => {
                    (WitnessResponse::NotAParty, vec![])
                }
                Some(lease) => (held(lease, now_ms, caller), vec![]),
            },
            WitnessRequest::Remove { vm, epoch } => {
                let Some(lease) = self.leases.get(vm) else {
                    return (WitnessResponse::Removed, vec![]);
                };
                if let Some(answer) = check_party(lease, now_ms, caller) {
                    return (answer, vec![]);
                }
                if *epoch != lease.entry.epoch {
                    return (
                        WitnessResponse::Conflict {
                            reason: format!(
                                "epoch {epoch} removed, the lease is at epoch {}",
                                lease.entry.epoch
                            ),
                        },
                        vec![],
                    );
                }
                self.leases.remove(vm);
                (WitnessResponse::Removed, vec![WitnessAction::Delete(*vm)])
            }
        }
    }

    fn register(
        &mut self,
        now_ms: u64,
        caller: &str,
        vm: Uuid,
        replica: &str,
        lease_ms: u64,
    ) -> (WitnessResponse, Vec<WitnessAction>) {
        if caller == replica {
            return (
                WitnessResponse::Conflict {
                    reason: "the primary and the replica are the same agent".into(),
                },
                vec![],
            );
        }
        if lease_ms == 0 || run_ms(lease_ms) == 0 {
            return (
                WitnessResponse::Conflict {
                    reason: format!("a lease of {lease_ms} ms does not outlast its drift margin"),
                },
                vec![],
            );
        }
        if lease_ms > MAX_AUTO_FAILOVER_MS {
            return (
                WitnessResponse::Conflict {
                    reason: format!(
                        "a lease of {lease_ms} ms is longer than the longest, {MAX_AUTO_FAILOVER_MS} ms"
                    ),
                },
                vec![],
            );
        }
        match self.leases.get_mut(&vm) {
            None => {
                let entry = LeaseEntry {
                    vm,
                    parties: [caller.to_string(), replica.to_string()],
                    holder: caller.to_string(),
                    epoch: 1,
                    lease_ms,
                };
                let answer = granted(&entry);
                self.leases.insert(
                    vm,
                    Lease {
                        entry: entry.clone(),
                        expires_ms: now_ms.saturating_add(lease_ms),
                    },
                );
                (answer, vec![WitnessAction::Persist(entry)])
            }
            Some(lease) => {
                let same = lease.entry.parties.iter().any(|p| p == caller)
                    && lease.entry.parties.iter().any(|p| p == replica);
                if !same {
                    if !lease.entry.parties.iter().any(|p| p == caller) {
                        return (WitnessResponse::NotAParty, vec![]);
                    }
                    return (
                        WitnessResponse::Conflict {
                            reason: "the VM's lease names another replica; remove it first".into(),
                        },
                        vec![],
                    );
                }
                if lease.entry.holder != caller {
                    return (held(lease, now_ms, caller), vec![]);
                }
                // The holder registers again (an `enable` repeated): a renewal, with the new
                // length if it changed.
                let mut actions = vec![];
                if lease.entry.lease_ms != lease_ms {
                    lease.entry.lease_ms = lease_ms;
                    actions.push(WitnessAction::Persist(lease.entry.clone()));
                }
                lease.expires_ms = now_ms.saturating_add(lease_ms);
                (granted(&lease.entry), actions)
            }
        }
    }
}

fn granted(entry: &LeaseEntry) -> WitnessResponse {
    WitnessResponse::Granted {
        epoch: entry.epoch,
        lease_ms: entry.lease_ms,
    }
}

fn held(lease: &Lease, now_ms: u64, caller: &str) -> WitnessResponse {
    WitnessResponse::Held {
        epoch: lease.entry.epoch,
        by_peer: lease.entry.holder != caller,
        remaining_ms: lease.expires_ms.saturating_sub(now_ms),
    }
}

/// `None` when the caller is the holder; else the answer.
fn check_party(lease: &Lease, now_ms: u64, caller: &str) -> Option<WitnessResponse> {
    if !lease.entry.parties.iter().any(|p| p == caller) {
        return Some(WitnessResponse::NotAParty);
    }
    if lease.entry.holder != caller {
        return Some(held(lease, now_ms, caller));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The primary.

/// An input of the primary's [`LeaseHolder`]. Every event carries the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderEvent {
    /// Auto-failover starts (at `enable`, or when the guard starts again): one run window
    /// counts from now, and the first renewals go out.
    Start {
        /// Now.
        now_ms: u64,
    },
    /// The beat.
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// The witness answered renewal `seq`.
    WitnessAnswer {
        /// Now.
        now_ms: u64,
        /// The renewal's number.
        seq: u64,
        /// The answer.
        answer: WitnessResponse,
    },
    /// The replica answered promise request `seq`.
    PromiseAnswer {
        /// Now.
        now_ms: u64,
        /// The request's number.
        seq: u64,
        /// The answer.
        answer: PromiseResponse,
    },
    /// Call `seq` (to the witness or the replica) failed: unreachable, timed out, an error.
    Failed {
        /// Now.
        now_ms: u64,
        /// The call's number.
        seq: u64,
        /// What went wrong.
        error: String,
    },
    /// The admin asks to run the fenced VM again (only with the witness's lease).
    Unfence {
        /// Now.
        now_ms: u64,
    },
}

/// What the primary's driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderAction {
    /// Call the witness: `Register` when `epoch` is 0, else `Renew { epoch }`; answer with
    /// [`HolderEvent::WitnessAnswer`] or [`HolderEvent::Failed`], giving up after `timeout_ms`.
    CallWitness {
        /// The call's number.
        seq: u64,
        /// The epoch held.
        epoch: u64,
        /// Give up after this long.
        timeout_ms: u64,
    },
    /// Ask the replica for a promise; answer with [`HolderEvent::PromiseAnswer`] or
    /// [`HolderEvent::Failed`], giving up after `timeout_ms`.
    AskPromise {
        /// The call's number.
        seq: u64,
        /// Give up after this long.
        timeout_ms: u64,
    },
    /// Stop the VM now (QMP `stop`, or kill QEMU when `power_off` or when `stop` does not
    /// answer within [`FENCE_MS`]); emit the event and alert; persist the snapshot.
    Fence {
        /// Why.
        reason: FenceReason,
        /// Kill QEMU instead of pausing it.
        power_off: bool,
    },
    /// The admin's unfence was granted: `cont` the paused VM; persist the snapshot.
    Resume,
    /// Persist [`LeaseHolder::snapshot`] (the epoch changed).
    Persist,
}

/// The phase of a [`LeaseHolder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderPhase {
    /// Not started.
    Stopped,
    /// Running the VM with a right to.
    Holding,
    /// The VM fenced.
    Fenced,
    /// Fenced, the admin's unfence asking the witness.
    Unfencing,
}

/// An event the holder does not take in its phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HolderRefusal {
    /// The event does not apply in this phase.
    #[error("auto-failover: {event} refused while {phase:?}")]
    Phase {
        /// The event.
        event: &'static str,
        /// The phase.
        phase: HolderPhase,
    },
    /// The replica took the VM over: the old primary never runs it again.
    #[error(
        "auto-failover: the replica took the VM over (lease epoch {epoch}); run `reverse` on the new primary to make this host its replica"
    )]
    Superseded {
        /// The epoch the replica holds.
        epoch: u64,
    },
}

/// What `status` shows of a primary's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderStatus {
    /// The phase.
    pub phase: HolderPhase,
    /// The epoch held.
    pub epoch: u64,
    /// Milliseconds the VM may still run without a renewal (0 when fenced).
    pub run_left_ms: u64,
    /// Why it is fenced.
    pub fenced: Option<FenceReason>,
    /// The last failed call's error.
    pub last_error: Option<String>,
}

/// The primary's side: its right to run the VM, renewed at the witness and at the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    params: LeaseParams,
    phase: HolderPhase,
    epoch: u64,
    run_until_ms: u64,
    witness_call: Option<(u64, u64)>,
    promise_call: Option<(u64, u64)>,
    next_seq: u64,
    next_renew_ms: u64,
    fenced: Option<FenceReason>,
    last_error: Option<String>,
}

impl LeaseHolder {
    /// A holder of the persisted `snapshot` (a fenced one stays fenced).
    pub fn restore(params: LeaseParams, snapshot: HolderSnapshot) -> Self {
        LeaseHolder {
            params,
            phase: if snapshot.fenced.is_some() {
                HolderPhase::Fenced
            } else {
                HolderPhase::Stopped
            },
            epoch: snapshot.epoch,
            run_until_ms: 0,
            witness_call: None,
            promise_call: None,
            next_seq: 1,
            next_renew_ms: 0,
            fenced: snapshot.fenced,
            last_error: None,
        }
    }

    /// What the record keeps.
    pub fn snapshot(&self) -> HolderSnapshot {
        HolderSnapshot {
            epoch: self.epoch,
            fenced: self.fenced.clone(),
        }
    }

    /// The phase.
    pub fn phase(&self) -> HolderPhase {
        self.phase
    }

    /// When the driver must step the holder next with a [`HolderEvent::Tick`] at the latest:
    /// the end of the right to run or the next renewal, whichever is first (`None` when not
    /// holding). The driver arms a timer for it; its slack is part of [`FENCE_MS`].
    pub fn next_wake_ms(&self) -> Option<u64> {
        (self.phase == HolderPhase::Holding).then(|| self.run_until_ms.min(self.next_renew_ms))
    }

    /// For `status`.
    pub fn status(&self, now_ms: u64) -> HolderStatus {
        HolderStatus {
            phase: self.phase,
            epoch: self.epoch,
            run_left_ms: match self.phase {
                HolderPhase::Holding => self.run_until_ms.saturating_sub(now_ms),
                _ => 0,
            },
            fenced: self.fenced.clone(),
            last_error: self.last_error.clone(),
        }
    }

    fn refuse(&self, event: &'static str) -> HolderRefusal {
        HolderRefusal::Phase {
            event,
            phase: self.phase,
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn renew(&mut self, now_ms: u64) -> Vec<HolderAction> {
        // A call may take until the renew period, and never past the end of the right to run.
        let timeout_ms = self
            .params
            .renew_ms
            .min(self.run_until_ms.saturating_sub(now_ms))
            .max(1);
        let w = self.seq();
        let p = self.seq();
        self.witness_call = Some((w, now_ms));
        self.promise_call = Some((p, now_ms));
        self.next_renew_ms = now_ms.saturating_add(self.params.renew_ms);
        vec![
            HolderAction::CallWitness {
                seq: w,
                epoch: self.epoch,
                timeout_ms,
            },
            HolderAction::AskPromise { seq: p, timeout_ms },
        ]
    }

    fn fence(&mut self, reason: FenceReason) -> Vec<HolderAction> {
        self.phase = HolderPhase::Fenced;
        self.fenced = Some(reason.clone());
        self.witness_call = None;
        self.promise_call = None;
        vec![HolderAction::Fence {
            reason,
            power_off: self.params.power_off,
        }]
    }

    fn extend(&mut self, sent_ms: u64, lease_ms: u64) {
        // Never longer than this host's own lease, whatever the other side says.
        let until = sent_ms.saturating_add(run_ms(lease_ms.min(self.params.lease_ms)));
        self.run_until_ms = self.run_until_ms.max(until);
    }

    /// One event.
    pub fn step(&mut self, event: HolderEvent) -> Result<Vec<HolderAction>, HolderRefusal> {
        match event {
            HolderEvent::Start { now_ms } => match self.phase {
                HolderPhase::Stopped => {
                    self.phase = HolderPhase::Holding;
                    self.run_until_ms = now_ms.saturating_add(run_ms(self.params.lease_ms));
                    Ok(self.renew(now_ms))
                }
                HolderPhase::Fenced => Ok(vec![]),
                _ => Err(self.refuse("start")),
            },
            HolderEvent::Tick { now_ms } => {
                if self.phase != HolderPhase::Holding {
                    return Ok(vec![]);
                }
                if now_ms >= self.run_until_ms {
                    return Ok(self.fence(FenceReason::LeaseExpired {
                        last_error: self.last_error.clone(),
                    }));
                }
                // A call unanswered for a renew period is lost (its late answer is ignored).
                let lost = |c: Option<(u64, u64)>| {
                    c.is_none_or(|(_, sent)| now_ms >= sent.saturating_add(self.params.renew_ms))
                };
                if now_ms >= self.next_renew_ms
                    && lost(self.witness_call)
                    && lost(self.promise_call)
                {
                    return Ok(self.renew(now_ms));
                }
                Ok(vec![])
            }
            HolderEvent::WitnessAnswer {
                now_ms: _,
                seq,
                answer,
            } => {
                let Some((s, sent)) = self.witness_call else {
                    return Ok(vec![]);
                };
                if s != seq {
                    return Ok(vec![]);
                }
                self.witness_call = None;
                match self.phase {
                    HolderPhase::Holding => match answer {
                        WitnessResponse::Granted { epoch, lease_ms } => {
                            self.extend(sent, lease_ms);
                            if epoch != self.epoch {
                                self.epoch = epoch;
                                return Ok(vec![HolderAction::Persist]);
                            }
                            Ok(vec![])
                        }
                        WitnessResponse::Held {
                            epoch,
                            by_peer: true,
                            ..
                        } => Ok(self.fence(FenceReason::Superseded { epoch })),
                        WitnessResponse::Held { by_peer: false, .. } | WitnessResponse::Removed => {
                            Ok(vec![])
                        }
                        other @ (WitnessResponse::Unknown
                        | WitnessResponse::NotAParty
                        | WitnessResponse::Conflict { .. }) => {
                            Ok(self.fence(FenceReason::Refused {
                                answer: format!("{other:?}"),
                            }))
                        }
                    },
                    HolderPhase::Unfencing => match answer {
                        WitnessResponse::Granted { epoch, lease_ms } => {
                            self.phase = HolderPhase::Holding;
                            self.fenced = None;
                            self.epoch = epoch;
                            self.run_until_ms = 0;
                            self.extend(sent, lease_ms);
                            self.next_renew_ms = sent.saturating_add(self.params.renew_ms);
                            Ok(vec![HolderAction::Resume])
                        }
                        WitnessResponse::Held {
                            epoch,
                            by_peer: true,
                            ..
                        } => {
                            self.phase = HolderPhase::Fenced;
                            self.fenced = Some(FenceReason::Superseded { epoch });
                            Ok(vec![HolderAction::Persist])
                        }
                        _ => {
                            self.phase = HolderPhase::Fenced;
                            Ok(vec![])
                        }
                    },
                    // A fenced holder stays fenced, whatever arrives late.
                    HolderPhase::Fenced | HolderPhase::Stopped => Ok(vec![]),
                }
            }
            HolderEvent::PromiseAnswer {
                now_ms: _,
                seq,
                answer,
            } => {
                let Some((s, sent)) = self.promise_call else {
                    return Ok(vec![]);
                };
                if s != seq {
                    return Ok(vec![]);
                }
                self.promise_call = None;
                if self.phase != HolderPhase::Holding {
                    return Ok(vec![]);
                }
                match answer {
                    PromiseResponse::Granted { promise_ms } => {
                        self.extend(sent, promise_ms);
                        Ok(vec![])
                    }
                    PromiseResponse::Refused { taken_over: true } => {
                        Ok(self.fence(FenceReason::Superseded {
                            epoch: self.epoch + 1,
                        }))
                    }
                    PromiseResponse::Refused { taken_over: false } => Ok(vec![]),
                }
            }
            HolderEvent::Failed {
                now_ms: _,
                seq,
                error,
            } => {
                if self.witness_call.is_some_and(|(s, _)| s == seq) {
                    self.witness_call = None;
                    if self.phase == HolderPhase::Unfencing {
                        self.phase = HolderPhase::Fenced;
                    }
                } else if self.promise_call.is_some_and(|(s, _)| s == seq) {
                    self.promise_call = None;
                } else {
                    return Ok(vec![]);
                }
                self.last_error = Some(error);
                Ok(vec![])
            }
            HolderEvent::Unfence { now_ms } => {
                if self.phase != HolderPhase::Fenced {
                    return Err(self.refuse("unfence"));
                }
                if let Some(FenceReason::Superseded { epoch }) = self.fenced {
                    return Err(HolderRefusal::Superseded { epoch });
                }
                self.phase = HolderPhase::Unfencing;
                let seq = self.seq();
                self.witness_call = Some((seq, now_ms));
                Ok(vec![HolderAction::CallWitness {
                    seq,
                    epoch: self.epoch,
                    timeout_ms: self.params.renew_ms,
                }])
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The replica.

/// An input of the replica's [`TakeoverWatch`]. Every event carries the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Auto-failover starts on the replica (at `create-replica`, or an agent start): the
    /// silence counts from now, and any promise given before counts as live for a lease.
    Start {
        /// Now.
        now_ms: u64,
    },
    /// The replica heard the primary (a cycle, a probe's answer); `fenced`: the primary says
    /// its VM is fenced, which does not count as hearing it.
    Heard {
        /// Now.
        now_ms: u64,
        /// The primary's VM is fenced.
        fenced: bool,
    },
    /// The primary asks for a promise (also hearing it); answered by
    /// [`WatchAction::AnswerPromise`].
    PromiseAsked {
        /// Now.
        now_ms: u64,
    },
    /// The beat.
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// The witness answered takeover call `seq`.
    WitnessAnswer {
        /// Now.
        now_ms: u64,
        /// The call's number.
        seq: u64,
        /// The answer.
        answer: WitnessResponse,
    },
    /// Takeover call `seq` failed.
    Failed {
        /// Now.
        now_ms: u64,
        /// The call's number.
        seq: u64,
        /// What went wrong.
        error: String,
    },
    /// `failover start` by the admin; `force`: without the witness.
    ManualStart {
        /// Now.
        now_ms: u64,
        /// `--force`.
        force: bool,
    },
}

/// What the replica's driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchAction {
    /// Answer the primary's promise request.
    AnswerPromise(PromiseResponse),
    /// Ask the witness for the lease (`Takeover`); answer with [`WatchEvent::WitnessAnswer`]
    /// or [`WatchEvent::Failed`], giving up after `timeout_ms`.
    AskWitness {
        /// The call's number.
        seq: u64,
        /// Give up after this long.
        timeout_ms: u64,
    },
    /// Fail the VM over (the unplanned failover path, the policy's point, the failover
    /// network settings); emit the event and alert.
    Failover {
        /// The lease epoch granted (`None`: forced without the witness).
        epoch: Option<u64>,
        /// The admin asked (`failover start`), not the silence.
        manual: bool,
    },
    /// The witness refused a manual start: report it to the admin.
    ManualRefused(WitnessResponse),
}

/// The phase of a [`TakeoverWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchPhase {
    /// Not started.
    Stopped,
    /// Listening for the primary.
    Watching,
    /// Asking the witness for the lease.
    Asking,
    /// The VM was failed over here.
    TookOver,
}

/// An event the watch does not take in its phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefusal {
    /// The event does not apply in this phase.
    #[error("auto-failover: {event} refused while {phase:?}")]
    Phase {
        /// The event.
        event: &'static str,
        /// The phase.
        phase: WatchPhase,
    },
    /// A promise this replica gave the primary is live: the primary may be running the VM.
    #[error(
        "auto-failover: the primary holds this replica's promise for {remaining_ms} ms more and may be running the VM; wait, or use --force"
    )]
    PromiseLive {
        /// Milliseconds until the promise expires.
        remaining_ms: u64,
    },
}

/// What `status` shows on the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchStatus {
    /// The phase.
    pub phase: WatchPhase,
    /// Milliseconds since the primary was last heard.
    pub silence_ms: u64,
    /// Milliseconds until this replica may ask the witness (0: it may now; `None` when it
    /// took over or is stopped).
    pub takeover_in_ms: Option<u64>,
    /// The witness's last answer to a takeover.
    pub last_answer: Option<WitnessResponse>,
    /// The last failed call's error.
    pub last_error: Option<String>,
}

/// The replica's side: when to ask the witness for the VM, and the promises to the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverWatch {
    params: LeaseParams,
    phase: WatchPhase,
    heard_ms: u64,
    promised_until_ms: u64,
    ask: Option<(u64, u64, bool)>,
    next_ask_ms: u64,
    next_seq: u64,
    last_answer: Option<WitnessResponse>,
    last_error: Option<String>,
}

impl TakeoverWatch {
    /// Not started.
    pub fn new(params: LeaseParams) -> Self {
        TakeoverWatch {
            params,
            phase: WatchPhase::Stopped,
            heard_ms: 0,
            promised_until_ms: 0,
            ask: None,
            next_ask_ms: 0,
            next_seq: 1,
            last_answer: None,
            last_error: None,
        }
    }

    /// The phase.
    pub fn phase(&self) -> WatchPhase {
        self.phase
    }

    /// For `status`.
    pub fn status(&self, now_ms: u64) -> WatchStatus {
        let takeover_in_ms = match self.phase {
            WatchPhase::Watching | WatchPhase::Asking => Some(
                self.heard_ms
                    .saturating_add(self.params.auto_failover_ms)
                    .max(self.promised_until_ms)
                    .saturating_sub(now_ms),
            ),
            _ => None,
        };
        WatchStatus {
            phase: self.phase,
            silence_ms: now_ms.saturating_sub(self.heard_ms),
            takeover_in_ms,
            last_answer: self.last_answer.clone(),
            last_error: self.last_error.clone(),
        }
    }

    fn refuse(&self, event: &'static str) -> WatchRefusal {
        WatchRefusal::Phase {
            event,
            phase: self.phase,
        }
    }

    fn ask(&mut self, now_ms: u64, manual: bool) -> Vec<WatchAction> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.phase = WatchPhase::Asking;
        self.ask = Some((seq, now_ms, manual));
        vec![WatchAction::AskWitness {
            seq,
            timeout_ms: self.params.renew_ms,
        }]
    }

    fn back_to_watching(&mut self, now_ms: u64) {
        self.phase = WatchPhase::Watching;
        self.ask = None;
        self.next_ask_ms = now_ms.saturating_add(self.params.renew_ms);
    }

    /// One event.
    pub fn step(&mut self, event: WatchEvent) -> Result<Vec<WatchAction>, WatchRefusal> {
        match event {
            WatchEvent::Start { now_ms } => {
                if self.phase != WatchPhase::Stopped {
                    return Err(self.refuse("start"));
                }
                self.phase = WatchPhase::Watching;
                self.heard_ms = now_ms;
                self.promised_until_ms = now_ms.saturating_add(self.params.lease_ms);
                Ok(vec![])
            }
            WatchEvent::Heard { now_ms, fenced } => {
                if !fenced && matches!(self.phase, WatchPhase::Watching | WatchPhase::Asking) {
                    self.heard_ms = self.heard_ms.max(now_ms);
                }
                Ok(vec![])
            }
            WatchEvent::PromiseAsked { now_ms } => match self.phase {
                WatchPhase::Watching => {
                    self.heard_ms = self.heard_ms.max(now_ms);
                    self.promised_until_ms = self
                        .promised_until_ms
                        .max(now_ms.saturating_add(self.params.lease_ms));
                    Ok(vec![WatchAction::AnswerPromise(PromiseResponse::Granted {
                        promise_ms: self.params.lease_ms,
                    })])
                }
                WatchPhase::Asking | WatchPhase::Stopped => {
                    self.heard_ms = self.heard_ms.max(now_ms);
                    Ok(vec![WatchAction::AnswerPromise(PromiseResponse::Refused {
                        taken_over: false,
                    })])
                }
                WatchPhase::TookOver => {
                    Ok(vec![WatchAction::AnswerPromise(PromiseResponse::Refused {
                        taken_over: true,
                    })])
                }
            },
            WatchEvent::Tick { now_ms } => match self.phase {
                WatchPhase::Watching => {
                    let silent =
                        now_ms >= self.heard_ms.saturating_add(self.params.auto_failover_ms);
                    if silent && now_ms >= self.promised_until_ms && now_ms >= self.next_ask_ms {
                        return Ok(self.ask(now_ms, false));
                    }
                    Ok(vec![])
                }
                WatchPhase::Asking => {
                    if let Some((_, sent, _)) = self.ask
                        && now_ms >= sent.saturating_add(self.params.renew_ms)
                    {
                        self.last_error = Some("the witness did not answer in time".into());
                        self.back_to_watching(now_ms);
                    }
                    Ok(vec![])
                }
                WatchPhase::Stopped | WatchPhase::TookOver => Ok(vec![]),
            },
            WatchEvent::WitnessAnswer {
                now_ms,
                seq,
                answer,
            } => {
                let Some((s, _, manual)) = self.ask else {
                    return Ok(vec![]);
                };
                if s != seq || self.phase != WatchPhase::Asking {
                    return Ok(vec![]);
                }
                self.last_answer = Some(answer.clone());
                match answer {
                    WitnessResponse::Granted { epoch, .. } => {
                        self.phase = WatchPhase::TookOver;
                        self.ask = None;
                        Ok(vec![WatchAction::Failover {
                            epoch: Some(epoch),
                            manual,
                        }])
                    }
                    other => {
                        self.back_to_watching(now_ms);
                        // Held: ask again when the witness says the lease runs out (its clock,
                        // so only a hint), at the latest after a renew period.
                        if let WitnessResponse::Held { remaining_ms, .. } = other {
                            self.next_ask_ms =
                                now_ms.saturating_add(remaining_ms.clamp(1, self.params.renew_ms));
                        }
                        if manual {
                            Ok(vec![WatchAction::ManualRefused(other)])
                        } else {
                            Ok(vec![])
                        }
                    }
                }
            }
            WatchEvent::Failed { now_ms, seq, error } => {
                if self.ask.is_some_and(|(s, _, _)| s == seq) && self.phase == WatchPhase::Asking {
                    self.last_error = Some(error);
                    self.back_to_watching(now_ms);
                }
                Ok(vec![])
            }
            WatchEvent::ManualStart { now_ms, force } => {
                if force {
                    if self.phase == WatchPhase::TookOver {
                        return Err(self.refuse("failover start --force"));
                    }
                    self.phase = WatchPhase::TookOver;
                    self.ask = None;
                    return Ok(vec![WatchAction::Failover {
                        epoch: None,
                        manual: true,
                    }]);
                }
                if self.phase != WatchPhase::Watching {
                    return Err(self.refuse("failover start"));
                }
                if now_ms < self.promised_until_ms {
                    return Err(WatchRefusal::PromiseLive {
                        remaining_ms: self.promised_until_ms - now_ms,
                    });
                }
                Ok(self.ask(now_ms, true))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_point_follows_the_policy() {
        use PointKind::{AppConsistent as A, CrashConsistent as C, Planned as Pl};
        use TakeoverPoint::{AppConsistent, Latest};
        let choice = |point: Option<u64>, fell_back: bool| TakeoverChoice { point, fell_back };
        type Row<'a> = (TakeoverPoint, &'a [(u64, PointKind)], TakeoverChoice);
        let table: &[Row] = &[
            // policy, the replica's points, the choice
            (Latest, &[], choice(None, false)),
            (Latest, &[(3, C), (5, A), (9, C)], choice(Some(9), false)),
            (Latest, &[(9, C), (3, C)], choice(Some(9), false)),
            (AppConsistent, &[], choice(None, false)),
            (
                AppConsistent,
                &[(3, C), (5, A), (9, C)],
                choice(Some(5), false),
            ),
            (
                AppConsistent,
                &[(5, A), (7, A), (9, C)],
                choice(Some(7), false),
            ),
            (AppConsistent, &[(7, A), (5, A)], choice(Some(7), false)),
            (
                AppConsistent,
                &[(3, A), (8, Pl), (9, C)],
                choice(Some(8), false),
            ),
            (AppConsistent, &[(3, C), (9, C)], choice(Some(9), true)),
        ];
        for (policy, points, want) in table {
            assert_eq!(
                takeover_point(*policy, points),
                *want,
                "{policy:?} {points:?}"
            );
        }
    }

    const P: &str = "fp-primary";
    const R: &str = "fp-replica";
    const X: &str = "fp-stranger";

    fn vm() -> Uuid {
        Uuid::from_u128(0x18)
    }

    fn params() -> LeaseParams {
        LeaseParams::from_auto_failover(60_000, false).expect("accepted")
    }

    fn register(t: &mut WitnessTable, now: u64) -> (WitnessResponse, Vec<WitnessAction>) {
        t.step(
            now,
            P,
            &WitnessRequest::Register {
                vm: vm(),
                replica: R.into(),
                lease_ms: 30_000,
            },
        )
    }

    // ----- the arithmetic -----------------------------------------------------------------

    #[test]
    fn params_from_auto_failover() {
        let p = params();
        assert_eq!(
            (p.auto_failover_ms, p.lease_ms, p.renew_ms),
            (60_000, 30_000, 7_500)
        );
        // D = ceil(2 * 0.001 * 30 s) + F = 60 ms + 2 s.
        assert_eq!(margin_ms(30_000), 2_060);
        assert_eq!(run_ms(30_000), 27_940);
        assert_eq!(
            LeaseParams::from_auto_failover(19_999, false),
            Err(InvalidAutoFailover::TooShort { ms: 19_999 })
        );
        assert_eq!(
            LeaseParams::from_auto_failover(3_600_001, false),
            Err(InvalidAutoFailover::TooLong { ms: 3_600_001 })
        );
        // The shortest still leaves two renewals inside the run window.
        let p = LeaseParams::from_auto_failover(MIN_AUTO_FAILOVER_MS, true).expect("accepted");
        assert!(run_ms(p.lease_ms) >= 2 * p.renew_ms);
        assert!(p.power_off);
    }

    #[test]
    fn margin_covers_drift_both_ways() {
        // (L - D)/(1 - ρ) + F <= L/(1 + ρ), in exact integer arithmetic (ppm units).
        for lease in [10_000u64, 30_000, 300_000, 1_800_000] {
            let rho = MAX_DRIFT_PPM as u128;
            let m = 1_000_000u128;
            let run = run_ms(lease) as u128;
            // fence_real = run * m/(m - rho) + F; grant_real = lease * m/(m + rho)
            let lhs = run * m * (m + rho) + FENCE_MS as u128 * (m - rho) * (m + rho);
            let rhs = lease as u128 * m * (m - rho);
            assert!(lhs <= rhs, "lease {lease}: margin too small");
        }
    }

    // ----- the witness ----------------------------------------------------------------------

    #[test]
    fn witness_register() {
        let mut t = WitnessTable::new();
        let (a, acts) = register(&mut t, 1_000);
        assert_eq!(
            a,
            WitnessResponse::Granted {
                epoch: 1,
                lease_ms: 30_000
            }
        );
        assert!(matches!(&acts[..], [WitnessAction::Persist(e)] if e.holder == P && e.epoch == 1));
        // Again by the holder: a renewal, nothing stored.
        let (a, acts) = register(&mut t, 2_000);
        assert!(matches!(a, WitnessResponse::Granted { epoch: 1, .. }));
        assert!(acts.is_empty());
        // By the replica naming the primary: the primary holds it.
        let (a, _) = t.step(
            2_000,
            R,
            &WitnessRequest::Register {
                vm: vm(),
                replica: P.into(),
                lease_ms: 30_000,
            },
        );
        assert!(matches!(a, WitnessResponse::Held { by_peer: true, .. }));
        // A stranger, or another replica.
        let (a, _) = t.step(
            2_000,
            X,
            &WitnessRequest::Register {
                vm: vm(),
                replica: R.into(),
                lease_ms: 30_000,
            },
        );
        assert_eq!(a, WitnessResponse::NotAParty);
        let (a, acts) = t.step(
            2_000,
            P,
            &WitnessRequest::Register {
                vm: vm(),
                replica: X.into(),
                lease_ms: 30_000,
            },
        );
        assert!(matches!(a, WitnessResponse::Conflict { .. }));
        assert!(acts.is_empty());
        // Self as replica; a lease the margin eats.
        let mut t = WitnessTable::new();
        let (a, _) = t.step(
            0,
            P,
            &WitnessRequest::Register {
                vm: vm(),
                replica: P.into(),
                lease_ms: 30_000,
            },
        );
        assert!(matches!(a, WitnessResponse::Conflict { .. }));
        let (a, _) = t.step(
            0,
            P,
            &WitnessRequest::Register {
                vm: vm(),
                replica: R.into(),
                lease_ms: FENCE_MS,
            },
        );
        assert!(matches!(a, WitnessResponse::Conflict { .. }));
        // Lengths from a peer are bounded (no overflow in the margin's arithmetic either).
        for lease_ms in [MAX_AUTO_FAILOVER_MS + 1, u64::MAX] {
            let (a, _) = t.step(
                0,
                P,
                &WitnessRequest::Register {
                    vm: vm(),
                    replica: R.into(),
                    lease_ms,
                },
            );
            assert!(matches!(a, WitnessResponse::Conflict { .. }), "{lease_ms}");
        }
        assert_eq!(
            run_ms(u64::MAX),
            u64::MAX - FENCE_MS - (u64::MAX / 1_000_000 + 1)
        );
        assert_eq!(t.entries().count(), 0);
    }

    #[test]
    fn witness_renew_takeover_table() {
        // (caller, request, at ms, expected answer) in order on one table registered at 0.
        let renew = |epoch| WitnessRequest::Renew { vm: vm(), epoch };
        let take = WitnessRequest::Takeover { vm: vm() };
        let other = WitnessRequest::Renew {
            vm: Uuid::from_u128(7),
            epoch: 1,
        };
        let mut t = WitnessTable::new();
        register(&mut t, 0);
        let held = |remaining_ms, by_peer, epoch| WitnessResponse::Held {
            epoch,
            by_peer,
            remaining_ms,
        };
        let g = |epoch| WitnessResponse::Granted {
            epoch,
            lease_ms: 30_000,
        };
        let rows: Vec<(&str, WitnessRequest, u64, WitnessResponse, bool)> = vec![
            (P, renew(1), 10_000, g(1), false),
            (
                P,
                renew(2),
                10_000,
                WitnessResponse::Conflict {
                    reason: String::new(),
                },
                false,
            ),
            (X, renew(1), 10_000, WitnessResponse::NotAParty, false),
            (P, other.clone(), 10_000, WitnessResponse::Unknown, false),
            (R, renew(1), 10_000, held(30_000, true, 1), false),
            (R, take.clone(), 39_999, held(1, true, 1), false),
            (X, take.clone(), 40_000, WitnessResponse::NotAParty, false),
            (R, take.clone(), 40_000, g(2), true),
            // The old holder is told the peer holds it; the new one's retried takeover is
            // granted again without a hand-over.
            (P, renew(1), 40_001, held(29_999, true, 2), false),
            (P, take.clone(), 40_001, held(29_999, true, 2), false),
            (R, take.clone(), 41_000, g(2), false),
            (R, renew(2), 42_000, g(2), false),
            (P, take.clone(), 71_999, held(1, true, 2), false),
            (P, take.clone(), 72_000, g(3), true),
        ];
        for (i, (caller, req, at, want, persists)) in rows.into_iter().enumerate() {
            let (got, acts) = t.step(at, caller, &req);
            match (&want, &got) {
                (WitnessResponse::Conflict { .. }, WitnessResponse::Conflict { .. }) => {}
                _ => assert_eq!(got, want, "row {i}"),
            }
            assert_eq!(!acts.is_empty(), persists, "row {i}: {acts:?}");
        }
    }

    #[test]
    fn witness_restart_never_hands_a_live_lease_away() {
        let mut t = WitnessTable::new();
        register(&mut t, 0);
        let entries: Vec<LeaseEntry> = t.entries().map(|(e, _)| e.clone()).collect();
        // The witness restarts with a fresh monotonic clock near zero, long "before" the
        // old expiry in the old clock's terms: the lease counts from the restart.
        let mut t = WitnessTable::restore(entries, 5);
        let take = WitnessRequest::Takeover { vm: vm() };
        assert!(matches!(
            t.step(30_004, R, &take).0,
            WitnessResponse::Held {
                remaining_ms: 1,
                ..
            }
        ));
        assert!(matches!(
            t.step(30_005, R, &take).0,
            WitnessResponse::Granted { epoch: 2, .. }
        ));
    }

    #[test]
    fn witness_query_and_remove() {
        let mut t = WitnessTable::new();
        let q = WitnessRequest::Query { vm: vm() };
        assert_eq!(t.step(0, P, &q).0, WitnessResponse::Unknown);
        register(&mut t, 0);
        assert_eq!(
            t.step(1_000, P, &q).0,
            WitnessResponse::Held {
                epoch: 1,
                by_peer: false,
                remaining_ms: 29_000
            }
        );
        assert!(matches!(
            t.step(1_000, R, &q).0,
            WitnessResponse::Held { by_peer: true, .. }
        ));
        assert_eq!(t.step(1_000, X, &q).0, WitnessResponse::NotAParty);
        let rm = |epoch| WitnessRequest::Remove { vm: vm(), epoch };
        assert!(matches!(
            t.step(1_000, R, &rm(1)).0,
            WitnessResponse::Held { .. }
        ));
        assert!(matches!(
            t.step(1_000, P, &rm(3)).0,
            WitnessResponse::Conflict { .. }
        ));
        let (a, acts) = t.step(1_000, P, &rm(1));
        assert_eq!(a, WitnessResponse::Removed);
        assert_eq!(acts, vec![WitnessAction::Delete(vm())]);
        assert_eq!(t.step(1_000, P, &rm(1)).0, WitnessResponse::Removed);
        assert_eq!(t.step(1_000, P, &q).0, WitnessResponse::Unknown);
    }

    // ----- the primary ----------------------------------------------------------------------

    fn holder() -> LeaseHolder {
        LeaseHolder::restore(params(), HolderSnapshot::default())
    }

    /// The numbers of the two calls of a renewal.
    fn calls(acts: &[HolderAction]) -> (u64, u64) {
        match acts {
            [
                HolderAction::CallWitness { seq: w, .. },
                HolderAction::AskPromise { seq: p, .. },
            ] => (*w, *p),
            other => panic!("not a renewal: {other:?}"),
        }
    }

    fn granted(epoch: u64) -> WitnessResponse {
        WitnessResponse::Granted {
            epoch,
            lease_ms: 30_000,
        }
    }

    #[test]
    fn holder_renews_and_fences_at_run_until() {
        let mut h = holder();
        let (w, _) = calls(
            &h.step(HolderEvent::Start { now_ms: 1_000 })
                .expect("accepted"),
        );
        // Register answered: epoch 1, persisted.
        let acts = h
            .step(HolderEvent::WitnessAnswer {
                now_ms: 1_100,
                seq: w,
                answer: granted(1),
            })
            .expect("accepted");
        assert_eq!(acts, vec![HolderAction::Persist]);
        assert_eq!(h.snapshot().epoch, 1);
        assert_eq!(h.next_wake_ms(), Some(1_000 + 7_500));
        assert!(
            h.step(HolderEvent::Tick { now_ms: 8_499 })
                .expect("accepted")
                .is_empty()
        );
        let acts = h
            .step(HolderEvent::Tick { now_ms: 8_500 })
            .expect("accepted");
        let (w, p) = calls(&acts);
        assert!(matches!(
            acts[0],
            HolderAction::CallWitness {
                epoch: 1,
                timeout_ms: 7_500,
                ..
            }
        ));
        // Neither answers: the right counts from the last granted call's send time (1 000).
        for seq in [w, p] {
            h.step(HolderEvent::Failed {
                now_ms: 9_000,
                seq,
                error: "unreachable".into(),
            })
            .expect("accepted");
        }
        calls(
            &h.step(HolderEvent::Tick { now_ms: 16_000 })
                .expect("accepted"),
        );
        // Unanswered calls are lost after a renew period: renewed again, still running.
        calls(
            &h.step(HolderEvent::Tick {
                now_ms: 1_000 + 27_939,
            })
            .expect("accepted"),
        );
        assert_eq!(h.phase(), HolderPhase::Holding);
        let acts = h
            .step(HolderEvent::Tick {
                now_ms: 1_000 + 27_940,
            })
            .expect("accepted");
        assert_eq!(
            acts,
            vec![HolderAction::Fence {
                reason: FenceReason::LeaseExpired {
                    last_error: Some("unreachable".into())
                },
                power_off: false
            }]
        );
        assert_eq!(h.phase(), HolderPhase::Fenced);
        assert_eq!(h.status(30_000).run_left_ms, 0);
        assert_eq!(h.next_wake_ms(), None);
    }

    #[test]
    fn holder_runs_on_either_grant() {
        // Witness isolated: the replica's promises keep the VM running.
        let mut h = holder();
        let mut now = 0;
        let (_, mut p) = calls(
            &h.step(HolderEvent::Start { now_ms: now })
                .expect("accepted"),
        );
        for _ in 0..40 {
            h.step(HolderEvent::PromiseAnswer {
                now_ms: now + 10,
                seq: p,
                answer: PromiseResponse::Granted { promise_ms: 30_000 },
            })
            .expect("accepted");
            now += 7_500;
            let acts = h.step(HolderEvent::Tick { now_ms: now }).expect("accepted");
            p = calls(&acts).1;
        }
        assert_eq!(h.phase(), HolderPhase::Holding);
        // A promise longer than this host's lease does not stretch the run window.
        let mut h = holder();
        let (_, p) = calls(&h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted"));
        h.step(HolderEvent::PromiseAnswer {
            now_ms: 1,
            seq: p,
            answer: PromiseResponse::Granted {
                promise_ms: 3_600_000,
            },
        })
        .expect("accepted");
        assert_eq!(h.status(0).run_left_ms, run_ms(30_000));
    }

    #[test]
    fn holder_flapping_links() {
        // Every other renewal lost on both links: one grant per two periods (15 s) is inside
        // the run window (27.94 s), so the VM never fences.
        let mut h = holder();
        let mut now = 0;
        let (mut w, mut p) = calls(
            &h.step(HolderEvent::Start { now_ms: now })
                .expect("accepted"),
        );
        for i in 0..100 {
            if i % 2 == 0 {
                h.step(HolderEvent::WitnessAnswer {
                    now_ms: now + 50,
                    seq: w,
                    answer: granted(0),
                })
                .expect("accepted");
            } else {
                for seq in [w, p] {
                    h.step(HolderEvent::Failed {
                        now_ms: now + 50,
                        seq,
                        error: "reset".into(),
                    })
                    .expect("accepted");
                }
            }
            now += 7_500;
            (w, p) = calls(&h.step(HolderEvent::Tick { now_ms: now }).expect("accepted"));
        }
        assert_eq!(h.phase(), HolderPhase::Holding);
        // Three lost in a row (22.5 s after the last grant's send, plus one more period) is
        // more than the window: fenced, and a grant arriving after that changes nothing.
        for _ in 0..3 {
            for seq in [w, p] {
                h.step(HolderEvent::Failed {
                    now_ms: now + 50,
                    seq,
                    error: "reset".into(),
                })
                .expect("accepted");
            }
            now += 7_500;
            let acts = h.step(HolderEvent::Tick { now_ms: now }).expect("accepted");
            if acts.len() == 2 {
                (w, p) = calls(&acts);
            }
        }
        let acts = h
            .step(HolderEvent::Tick {
                now_ms: now + 7_500,
            })
            .expect("accepted");
        assert!(
            h.phase() == HolderPhase::Fenced || matches!(acts[..], [HolderAction::Fence { .. }])
        );
        assert!(
            h.step(HolderEvent::WitnessAnswer {
                now_ms: now + 7_600,
                seq: w,
                answer: granted(1)
            })
            .expect("accepted")
            .is_empty()
        );
        assert_eq!(h.phase(), HolderPhase::Fenced);
    }

    #[test]
    fn holder_late_answer_of_a_lost_call_is_ignored() {
        let mut h = holder();
        let (w1, _) = calls(&h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted"));
        // No answer for a renew period: lost, a new renewal goes out.
        let (w2, _) = calls(
            &h.step(HolderEvent::Tick { now_ms: 7_500 })
                .expect("accepted"),
        );
        assert_ne!(w1, w2);
        h.step(HolderEvent::WitnessAnswer {
            now_ms: 7_600,
            seq: w1,
            answer: granted(1),
        })
        .expect("accepted");
        assert_eq!(h.status(7_600).run_left_ms, run_ms(30_000) - 7_600);
        h.step(HolderEvent::WitnessAnswer {
            now_ms: 7_700,
            seq: w2,
            answer: granted(1),
        })
        .expect("accepted");
        assert_eq!(h.status(7_700).run_left_ms, run_ms(30_000) - 200);
    }

    #[test]
    fn holder_fences_on_refusals() {
        let cases: Vec<(WitnessResponse, FenceReason)> = vec![
            (
                WitnessResponse::Held {
                    epoch: 2,
                    by_peer: true,
                    remaining_ms: 30_000,
                },
                FenceReason::Superseded { epoch: 2 },
            ),
            (
                WitnessResponse::Unknown,
                FenceReason::Refused {
                    answer: "Unknown".into(),
                },
            ),
            (
                WitnessResponse::NotAParty,
                FenceReason::Refused {
                    answer: "NotAParty".into(),
                },
            ),
        ];
        for (answer, reason) in cases {
            let mut h = holder();
            let (w, _) = calls(&h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted"));
            let acts = h
                .step(HolderEvent::WitnessAnswer {
                    now_ms: 5,
                    seq: w,
                    answer,
                })
                .expect("accepted");
            assert_eq!(
                acts,
                vec![HolderAction::Fence {
                    reason: reason.clone(),
                    power_off: false
                }]
            );
            assert_eq!(h.snapshot().fenced, Some(reason));
        }
        // The replica says it took over: fenced at once, also with power-off policy.
        let mut h = LeaseHolder::restore(
            LeaseParams::from_auto_failover(60_000, true).expect("accepted"),
            HolderSnapshot {
                epoch: 1,
                fenced: None,
            },
        );
        let (_, p) = calls(&h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted"));
        let acts = h
            .step(HolderEvent::PromiseAnswer {
                now_ms: 5,
                seq: p,
                answer: PromiseResponse::Refused { taken_over: true },
            })
            .expect("accepted");
        assert!(matches!(
            acts[..],
            [HolderAction::Fence {
                power_off: true,
                ..
            }]
        ));
        // A promise refused while the replica asks the witness changes nothing by itself.
        let mut h = holder();
        let (_, p) = calls(&h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted"));
        assert!(
            h.step(HolderEvent::PromiseAnswer {
                now_ms: 5,
                seq: p,
                answer: PromiseResponse::Refused { taken_over: false },
            })
            .expect("accepted")
            .is_empty()
        );
        assert_eq!(h.phase(), HolderPhase::Holding);
    }

    #[test]
    fn holder_phase_table() {
        // (phase, event, Ok(phase after) or Err).
        let fenced_expired = HolderSnapshot {
            epoch: 1,
            fenced: Some(FenceReason::LeaseExpired { last_error: None }),
        };
        let fenced_superseded = HolderSnapshot {
            epoch: 1,
            fenced: Some(FenceReason::Superseded { epoch: 2 }),
        };
        let make = |phase: HolderPhase| -> LeaseHolder {
            match phase {
                HolderPhase::Stopped => holder(),
                HolderPhase::Holding => {
                    let mut h = holder();
                    h.step(HolderEvent::Start { now_ms: 0 }).expect("accepted");
                    h
                }
                HolderPhase::Fenced => LeaseHolder::restore(params(), fenced_expired.clone()),
                HolderPhase::Unfencing => {
                    let mut h = LeaseHolder::restore(params(), fenced_expired.clone());
                    h.step(HolderEvent::Unfence { now_ms: 0 })
                        .expect("accepted");
                    h
                }
            }
        };
        use HolderPhase::*;
        let rows: Vec<(HolderPhase, HolderEvent, Option<HolderPhase>)> = vec![
            (Stopped, HolderEvent::Start { now_ms: 1 }, Some(Holding)),
            (Stopped, HolderEvent::Tick { now_ms: 1 }, Some(Stopped)),
            (Stopped, HolderEvent::Unfence { now_ms: 1 }, None),
            (Holding, HolderEvent::Start { now_ms: 1 }, None),
            (Holding, HolderEvent::Unfence { now_ms: 1 }, None),
            (Holding, HolderEvent::Tick { now_ms: 27_940 }, Some(Fenced)),
            (Fenced, HolderEvent::Start { now_ms: 1 }, Some(Fenced)),
            (Fenced, HolderEvent::Tick { now_ms: 1 }, Some(Fenced)),
            (Fenced, HolderEvent::Unfence { now_ms: 1 }, Some(Unfencing)),
            (Unfencing, HolderEvent::Start { now_ms: 1 }, None),
            (Unfencing, HolderEvent::Unfence { now_ms: 1 }, None),
            (
                Unfencing,
                HolderEvent::Tick { now_ms: 99_999 },
                Some(Unfencing),
            ),
        ];
        for (i, (phase, event, want)) in rows.into_iter().enumerate() {
            let mut h = make(phase);
            let before = h.clone();
            match (h.step(event), want) {
                (Ok(_), Some(after)) => assert_eq!(h.phase(), after, "row {i}"),
                (Err(_), None) => assert_eq!(h, before, "row {i}: a refusal changes nothing"),
                (got, want) => panic!("row {i}: {got:?}, wanted {want:?}"),
            }
        }
        // A fenced holder restored from its record stays fenced at start.
        let mut h = LeaseHolder::restore(params(), fenced_expired.clone());
        assert!(
            h.step(HolderEvent::Start { now_ms: 0 })
                .expect("accepted")
                .is_empty()
        );
        assert_eq!(h.phase(), Fenced);
        // Unfence granted: resumed; refused by the peer's hold: superseded; failed: fenced.
        let unfence = |answer: Option<WitnessResponse>| {
            let mut h = LeaseHolder::restore(params(), fenced_expired.clone());
            let acts = h
                .step(HolderEvent::Unfence { now_ms: 100 })
                .expect("accepted");
            let [HolderAction::CallWitness { seq, epoch: 1, .. }] = acts[..] else {
                panic!("{acts:?}")
            };
            let acts = match answer {
                Some(answer) => h
                    .step(HolderEvent::WitnessAnswer {
                        now_ms: 150,
                        seq,
                        answer,
                    })
                    .expect("accepted"),
                None => h
                    .step(HolderEvent::Failed {
                        now_ms: 150,
                        seq,
                        error: "down".into(),
                    })
                    .expect("accepted"),
            };
            (h, acts)
        };
        let (h, acts) = unfence(Some(granted(1)));
        assert_eq!(acts, vec![HolderAction::Resume]);
        assert_eq!(h.phase(), Holding);
        assert_eq!(h.snapshot().fenced, None);
        assert_eq!(h.status(100).run_left_ms, run_ms(30_000));
        let (h, acts) = unfence(Some(WitnessResponse::Held {
            epoch: 2,
            by_peer: true,
            remaining_ms: 5,
        }));
        assert_eq!(acts, vec![HolderAction::Persist]);
        assert_eq!(
            h.snapshot().fenced,
            Some(FenceReason::Superseded { epoch: 2 })
        );
        let (h, acts) = unfence(None);
        assert!(acts.is_empty());
        assert_eq!(h.phase(), Fenced);
        // Superseded: never again, a typed refusal.
        let mut h = LeaseHolder::restore(params(), fenced_superseded);
        assert_eq!(
            h.step(HolderEvent::Unfence { now_ms: 0 }),
            Err(HolderRefusal::Superseded { epoch: 2 })
        );
    }

    // ----- the replica ----------------------------------------------------------------------

    fn watch_at(now: u64) -> TakeoverWatch {
        let mut w = TakeoverWatch::new(params());
        w.step(WatchEvent::Start { now_ms: now }).expect("accepted");
        w
    }

    fn ask_seq(acts: &[WatchAction]) -> u64 {
        match acts {
            [WatchAction::AskWitness { seq, .. }] => *seq,
            other => panic!("not an ask: {other:?}"),
        }
    }

    #[test]
    fn watch_asks_after_silence_and_promises() {
        let mut w = watch_at(0);
        // A promise at 20 s lives to 50 s; the silence since 20 s reaches 60 s at 80 s.
        assert_eq!(
            w.step(WatchEvent::PromiseAsked { now_ms: 20_000 })
                .expect("accepted"),
            vec![WatchAction::AnswerPromise(PromiseResponse::Granted {
                promise_ms: 30_000
            })]
        );
        assert_eq!(w.status(20_000).takeover_in_ms, Some(60_000));
        assert!(
            w.step(WatchEvent::Tick { now_ms: 79_999 })
                .expect("accepted")
                .is_empty()
        );
        // A fenced primary heard does not count.
        w.step(WatchEvent::Heard {
            now_ms: 79_000,
            fenced: true,
        })
        .expect("accepted");
        let seq = ask_seq(
            &w.step(WatchEvent::Tick { now_ms: 80_000 })
                .expect("accepted"),
        );
        assert_eq!(w.phase(), WatchPhase::Asking);
        // While asking: no promise.
        assert_eq!(
            w.step(WatchEvent::PromiseAsked { now_ms: 80_001 })
                .expect("accepted"),
            vec![WatchAction::AnswerPromise(PromiseResponse::Refused {
                taken_over: false
            })]
        );
        let acts = w
            .step(WatchEvent::WitnessAnswer {
                now_ms: 80_010,
                seq,
                answer: granted(2),
            })
            .expect("accepted");
        assert_eq!(
            acts,
            vec![WatchAction::Failover {
                epoch: Some(2),
                manual: false
            }]
        );
        assert_eq!(w.phase(), WatchPhase::TookOver);
        assert_eq!(
            w.step(WatchEvent::PromiseAsked { now_ms: 80_020 })
                .expect("accepted"),
            vec![WatchAction::AnswerPromise(PromiseResponse::Refused {
                taken_over: true
            })]
        );
        assert_eq!(w.status(80_020).takeover_in_ms, None);
    }

    #[test]
    fn watch_start_counts_promises_given_before() {
        // After a restart the replica does not know its old promises: one lease from the start
        // is assumed, and the silence counts from the start too.
        let mut w = watch_at(1_000);
        assert_eq!(w.status(1_000).takeover_in_ms, Some(60_000));
        assert!(
            w.step(WatchEvent::Tick { now_ms: 60_999 })
                .expect("accepted")
                .is_empty()
        );
        ask_seq(
            &w.step(WatchEvent::Tick { now_ms: 61_000 })
                .expect("accepted"),
        );
    }

    #[test]
    fn watch_refused_or_failed_asks_retry() {
        let cases = [
            Some(WitnessResponse::Held {
                epoch: 1,
                by_peer: true,
                remaining_ms: 10_000,
            }),
            Some(WitnessResponse::Unknown),
            None,
        ];
        for case in cases {
            let mut w = watch_at(0);
            let seq = ask_seq(
                &w.step(WatchEvent::Tick { now_ms: 60_000 })
                    .expect("accepted"),
            );
            let acts = match case {
                Some(answer) => w
                    .step(WatchEvent::WitnessAnswer {
                        now_ms: 60_100,
                        seq,
                        answer,
                    })
                    .expect("accepted"),
                None => w
                    .step(WatchEvent::Failed {
                        now_ms: 60_100,
                        seq,
                        error: "witness unreachable".into(),
                    })
                    .expect("accepted"),
            };
            assert!(acts.is_empty());
            assert_eq!(w.phase(), WatchPhase::Watching);
            // Promises are given again; the next ask waits a renew period and the promise.
            w.step(WatchEvent::PromiseAsked { now_ms: 60_200 })
                .expect("accepted");
            assert!(
                w.step(WatchEvent::Tick { now_ms: 67_600 })
                    .expect("accepted")
                    .is_empty()
            );
        }
        // Unanswered for a renew period: given up, and its late grant is ignored.
        let mut w = watch_at(0);
        let seq = ask_seq(
            &w.step(WatchEvent::Tick { now_ms: 60_000 })
                .expect("accepted"),
        );
        w.step(WatchEvent::Tick { now_ms: 67_500 })
            .expect("accepted");
        assert_eq!(w.phase(), WatchPhase::Watching);
        assert!(
            w.step(WatchEvent::WitnessAnswer {
                now_ms: 67_600,
                seq,
                answer: granted(2)
            })
            .expect("accepted")
            .is_empty()
        );
        assert_eq!(w.phase(), WatchPhase::Watching);
        // The next ask (the witness answers the holder's retry with a grant again).
        let seq = ask_seq(
            &w.step(WatchEvent::Tick { now_ms: 75_000 })
                .expect("accepted"),
        );
        assert!(matches!(
            w.step(WatchEvent::WitnessAnswer {
                now_ms: 75_001,
                seq,
                answer: granted(2)
            })
            .expect("accepted")[..],
            [WatchAction::Failover { .. }]
        ));
    }

    #[test]
    fn watch_manual_start() {
        // A live promise: refused with the time left.
        let mut w = watch_at(0);
        w.step(WatchEvent::PromiseAsked { now_ms: 10_000 })
            .expect("accepted");
        assert_eq!(
            w.step(WatchEvent::ManualStart {
                now_ms: 20_000,
                force: false
            }),
            Err(WatchRefusal::PromiseLive {
                remaining_ms: 20_000
            })
        );
        assert_eq!(w.phase(), WatchPhase::Watching);
        // After it: asks the witness even though the primary was heard recently.
        let seq = ask_seq(
            &w.step(WatchEvent::ManualStart {
                now_ms: 40_000,
                force: false,
            })
            .expect("accepted"),
        );
        assert_eq!(
            w.step(WatchEvent::ManualStart {
                now_ms: 40_001,
                force: false
            }),
            Err(WatchRefusal::Phase {
                event: "failover start",
                phase: WatchPhase::Asking
            })
        );
        let held = WitnessResponse::Held {
            epoch: 1,
            by_peer: true,
            remaining_ms: 9_000,
        };
        assert_eq!(
            w.step(WatchEvent::WitnessAnswer {
                now_ms: 40_010,
                seq,
                answer: held.clone()
            })
            .expect("accepted"),
            vec![WatchAction::ManualRefused(held)]
        );
        let seq = ask_seq(
            &w.step(WatchEvent::ManualStart {
                now_ms: 50_000,
                force: false,
            })
            .expect("accepted"),
        );
        assert_eq!(
            w.step(WatchEvent::WitnessAnswer {
                now_ms: 50_010,
                seq,
                answer: granted(2)
            })
            .expect("accepted"),
            vec![WatchAction::Failover {
                epoch: Some(2),
                manual: true
            }]
        );
        // --force: at once, promise or not; not twice.
        let mut w = watch_at(0);
        w.step(WatchEvent::PromiseAsked { now_ms: 10 })
            .expect("accepted");
        assert_eq!(
            w.step(WatchEvent::ManualStart {
                now_ms: 20,
                force: true
            })
            .expect("accepted"),
            vec![WatchAction::Failover {
                epoch: None,
                manual: true
            }]
        );
        assert!(
            w.step(WatchEvent::ManualStart {
                now_ms: 30,
                force: true
            })
            .is_err()
        );
    }

    #[test]
    fn watch_phase_table() {
        use WatchPhase::*;
        let make = |phase: WatchPhase| -> TakeoverWatch {
            let mut w = TakeoverWatch::new(params());
            match phase {
                Stopped => {}
                Watching => {
                    w.step(WatchEvent::Start { now_ms: 0 }).expect("accepted");
                }
                Asking => {
                    w.step(WatchEvent::Start { now_ms: 0 }).expect("accepted");
                    w.step(WatchEvent::Tick { now_ms: 60_000 })
                        .expect("accepted");
                }
                TookOver => {
                    w.step(WatchEvent::Start { now_ms: 0 }).expect("accepted");
                    w.step(WatchEvent::ManualStart {
                        now_ms: 1,
                        force: true,
                    })
                    .expect("accepted");
                }
            }
            w
        };
        let rows: Vec<(WatchPhase, WatchEvent, Option<WatchPhase>)> = vec![
            (Stopped, WatchEvent::Start { now_ms: 1 }, Some(Watching)),
            (Stopped, WatchEvent::Tick { now_ms: 999_999 }, Some(Stopped)),
            (
                Stopped,
                WatchEvent::ManualStart {
                    now_ms: 1,
                    force: false,
                },
                None,
            ),
            (Watching, WatchEvent::Start { now_ms: 1 }, None),
            (
                Watching,
                WatchEvent::Heard {
                    now_ms: 1,
                    fenced: false,
                },
                Some(Watching),
            ),
            (
                Watching,
                WatchEvent::Tick { now_ms: 59_999 },
                Some(Watching),
            ),
            (Watching, WatchEvent::Tick { now_ms: 60_000 }, Some(Asking)),
            (Asking, WatchEvent::Start { now_ms: 1 }, None),
            (
                Asking,
                WatchEvent::Heard {
                    now_ms: 60_001,
                    fenced: false,
                },
                Some(Asking),
            ),
            (Asking, WatchEvent::Tick { now_ms: 60_001 }, Some(Asking)),
            (Asking, WatchEvent::Tick { now_ms: 67_500 }, Some(Watching)),
            (
                Asking,
                WatchEvent::ManualStart {
                    now_ms: 60_001,
                    force: false,
                },
                None,
            ),
            (
                Asking,
                WatchEvent::ManualStart {
                    now_ms: 60_001,
                    force: true,
                },
                Some(TookOver),
            ),
            (TookOver, WatchEvent::Start { now_ms: 1 }, None),
            (
                TookOver,
                WatchEvent::Tick { now_ms: 999_999 },
                Some(TookOver),
            ),
            (
                TookOver,
                WatchEvent::Heard {
                    now_ms: 2,
                    fenced: false,
                },
                Some(TookOver),
            ),
            (
                TookOver,
                WatchEvent::ManualStart {
                    now_ms: 2,
                    force: false,
                },
                None,
            ),
            (
                TookOver,
                WatchEvent::ManualStart {
                    now_ms: 2,
                    force: true,
                },
                None,
            ),
        ];
        for (i, (phase, event, want)) in rows.into_iter().enumerate() {
            let mut w = make(phase);
            let before = w.clone();
            match (w.step(event), want) {
                (Ok(_), Some(after)) => assert_eq!(w.phase(), after, "row {i}"),
                (Err(_), None) => assert_eq!(w, before, "row {i}: a refusal changes nothing"),
                (got, want) => panic!("row {i}: {got:?}, wanted {want:?}"),
            }
        }
    }

    // ----- the three together, with drifting and skewed clocks ------------------------------

    /// A simulated run: real time in 1 ms steps; each host's clock has its own offset (skew)
    /// and rate (drift); calls cross links the scenario cuts and heals; every machine gets the
    /// time of its own clock only.
    mod sim {
        use super::*;

        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub enum Node {
            P,
            W,
            R,
        }

        #[derive(Clone, Copy, Debug)]
        pub struct Clock {
            pub offset_ms: u64,
            pub ppm: i64,
        }

        impl Clock {
            fn at(&self, real: u64) -> u64 {
                let drift = (real as i128 * self.ppm as i128) / 1_000_000;
                (self.offset_ms as i128 + real as i128 + drift) as u64
            }
        }

        enum Msg {
            ToWitness {
                from: Node,
                seq: u64,
                req: WitnessRequest,
            },
            HolderAnswer(u64, WitnessResponse),
            HolderPromise(u64, PromiseResponse),
            HolderFailed(u64),
            PromiseAsk(u64),
            WatchAnswer(u64, WitnessResponse),
            WatchFailed(u64),
        }

        pub struct Outcome {
            pub fenced_at: Option<u64>,
            pub failover_at: Option<u64>,
        }

        /// One-way latency: 1 ms, so that the latency hides none of the drift margin (with the
        /// margin's drift term removed, the partition and flapping runs fail).
        const LAT: u64 = 1;

        /// `link(real, a, b)`: the link is up; `alive(real)`: the primary host is up.
        pub fn run(
            auto_failover_ms: u64,
            clocks: [Clock; 3],
            end: u64,
            link: &dyn Fn(u64, Node, Node) -> bool,
            alive: &dyn Fn(u64) -> bool,
        ) -> Outcome {
            let params =
                LeaseParams::from_auto_failover(auto_failover_ms, false).expect("accepted");
            let [cp, cw, cr] = clocks;
            let mut holder = LeaseHolder::restore(params, HolderSnapshot::default());
            let mut watch = TakeoverWatch::new(params);
            let mut table = WitnessTable::new();
            let mut queue: Vec<(u64, Node, Msg)> = vec![];
            let mut out = Outcome {
                fenced_at: None,
                failover_at: None,
            };
            let mut hacts = holder
                .step(HolderEvent::Start { now_ms: cp.at(0) })
                .expect("accepted");
            let mut wacts = watch
                .step(WatchEvent::Start { now_ms: cr.at(0) })
                .expect("accepted");
            for real in 0..end {
                // Carry out the actions of the last step.
                for a in hacts.drain(..) {
                    match a {
                        HolderAction::CallWitness {
                            seq,
                            epoch,
                            timeout_ms,
                        } => {
                            let req = if epoch == 0 {
                                WitnessRequest::Register {
                                    vm: vm(),
                                    replica: R.into(),
                                    lease_ms: params.lease_ms,
                                }
                            } else {
                                WitnessRequest::Renew { vm: vm(), epoch }
                            };
                            queue.push((
                                real + LAT,
                                Node::W,
                                Msg::ToWitness {
                                    from: Node::P,
                                    seq,
                                    req,
                                },
                            ));
                            queue.push((real + timeout_ms, Node::P, Msg::HolderFailed(seq)));
                        }
                        HolderAction::AskPromise { seq, timeout_ms } => {
                            queue.push((real + LAT, Node::R, Msg::PromiseAsk(seq)));
                            queue.push((real + timeout_ms, Node::P, Msg::HolderFailed(seq)));
                        }
                        HolderAction::Fence { .. } => {
                            out.fenced_at.get_or_insert(real);
                        }
                        HolderAction::Resume | HolderAction::Persist => {}
                    }
                }
                for a in wacts.drain(..) {
                    match a {
                        WatchAction::AskWitness { seq, timeout_ms } => {
                            queue.push((
                                real + LAT,
                                Node::W,
                                Msg::ToWitness {
                                    from: Node::R,
                                    seq,
                                    req: WitnessRequest::Takeover { vm: vm() },
                                },
                            ));
                            queue.push((real + timeout_ms, Node::R, Msg::WatchFailed(seq)));
                        }
                        WatchAction::Failover { .. } => {
                            out.failover_at.get_or_insert(real);
                        }
                        WatchAction::AnswerPromise(_) | WatchAction::ManualRefused(_) => {
                            unreachable!("answered where asked")
                        }
                    }
                }
                let up = alive(real);
                // Deliver what is due; a message crossing a cut link (or to a dead host) is lost.
                let (due, rest): (Vec<_>, Vec<_>) =
                    queue.drain(..).partition(|(at, _, _)| *at <= real);
                queue = rest;
                for (_, to, msg) in due {
                    match msg {
                        Msg::ToWitness { from, seq, req } => {
                            if !link(real, from, Node::W) || (from == Node::P && !up) {
                                continue;
                            }
                            let caller = if from == Node::P { P } else { R };
                            let (answer, _) = table.step(cw.at(real), caller, &req);
                            let back = if from == Node::P {
                                Msg::HolderAnswer(seq, answer)
                            } else {
                                Msg::WatchAnswer(seq, answer)
                            };
                            queue.push((real + LAT, from, back));
                        }
                        Msg::PromiseAsk(seq) => {
                            if !link(real, Node::P, Node::R) || !up {
                                continue;
                            }
                            let acts = watch
                                .step(WatchEvent::PromiseAsked {
                                    now_ms: cr.at(real),
                                })
                                .expect("accepted");
                            let [WatchAction::AnswerPromise(answer)] = &acts[..] else {
                                panic!("{acts:?}")
                            };
                            queue.push((
                                real + LAT,
                                Node::P,
                                Msg::HolderPromise(seq, answer.clone()),
                            ));
                        }
                        Msg::HolderAnswer(seq, answer) => {
                            if up && link(real, Node::W, Node::P) {
                                hacts.extend(
                                    holder
                                        .step(HolderEvent::WitnessAnswer {
                                            now_ms: cp.at(real),
                                            seq,
                                            answer,
                                        })
                                        .expect("accepted"),
                                );
                            }
                        }
                        Msg::HolderPromise(seq, answer) => {
                            if up && link(real, Node::R, Node::P) {
                                hacts.extend(
                                    holder
                                        .step(HolderEvent::PromiseAnswer {
                                            now_ms: cp.at(real),
                                            seq,
                                            answer,
                                        })
                                        .expect("accepted"),
                                );
                            }
                        }
                        Msg::HolderFailed(seq) => {
                            if up {
                                hacts.extend(
                                    holder
                                        .step(HolderEvent::Failed {
                                            now_ms: cp.at(real),
                                            seq,
                                            error: "timed out".into(),
                                        })
                                        .expect("accepted"),
                                );
                            }
                        }
                        Msg::WatchAnswer(seq, answer) => {
                            if link(real, Node::W, Node::R) {
                                wacts.extend(
                                    watch
                                        .step(WatchEvent::WitnessAnswer {
                                            now_ms: cr.at(real),
                                            seq,
                                            answer,
                                        })
                                        .expect("accepted"),
                                );
                            }
                        }
                        Msg::WatchFailed(seq) => {
                            wacts.extend(
                                watch
                                    .step(WatchEvent::Failed {
                                        now_ms: cr.at(real),
                                        seq,
                                        error: "timed out".into(),
                                    })
                                    .expect("accepted"),
                            );
                        }
                    }
                    let _ = to;
                }
                if up {
                    hacts.extend(
                        holder
                            .step(HolderEvent::Tick {
                                now_ms: cp.at(real),
                            })
                            .expect("accepted"),
                    );
                }
                wacts.extend(
                    watch
                        .step(WatchEvent::Tick {
                            now_ms: cr.at(real),
                        })
                        .expect("accepted"),
                );
            }
            out
        }
    }

    use sim::{Clock, Node};

    /// Skews of hours and rates at the assumed limit, both ways.
    fn clock_sets() -> Vec<[Clock; 3]> {
        let c = |offset_ms, ppm| Clock { offset_ms, ppm };
        let d = MAX_DRIFT_PPM as i64;
        vec![
            [c(0, 0), c(0, 0), c(0, 0)],
            [c(7_200_000, d), c(0, -d), c(3_600_000, -d)],
            [c(5, -d), c(86_400_000, d), c(1, d)],
            [c(123_456, d), c(0, -d), c(9_999_999, d)],
        ]
    }

    /// At no moment do both VMs run: the primary's fence (which takes up to [`FENCE_MS`]; the
    /// 1 ms of the simulation's step is the driver's timer slack) ends before the replica
    /// starts, or the primary host was dead by then.
    fn assert_never_both(o: &sim::Outcome, died_at: Option<u64>, what: &str) {
        if let Some(f) = o.failover_at {
            let stopped = match (o.fenced_at, died_at) {
                (Some(x), Some(d)) => (x + FENCE_MS).min(d),
                (Some(x), None) => x + FENCE_MS,
                (None, Some(d)) => d,
                (None, None) => panic!("{what}: failover at {f} with the primary running"),
            };
            assert!(
                stopped <= f + 1,
                "{what}: the primary stopped at {stopped}, the replica started at {f}"
            );
        }
    }

    #[test]
    fn partitions_with_skewed_and_drifting_clocks() {
        const CUT: u64 = 40_000;
        type Link = Box<dyn Fn(u64, Node, Node) -> bool>;
        let involves = |n: Node| move |a: Node, b: Node| a == n || b == n;
        // (name, link, fence expected, failover expected)
        let cases: Vec<(&str, Link, bool, bool)> = vec![
            ("healthy", Box::new(|_, _, _| true), false, false),
            (
                "primary isolated",
                Box::new(move |t, a, b| t < CUT || !involves(Node::P)(a, b)),
                true,
                true,
            ),
            (
                "replica isolated",
                Box::new(move |t, a, b| t < CUT || !involves(Node::R)(a, b)),
                false,
                false,
            ),
            (
                "witness isolated",
                Box::new(move |t, a, b| t < CUT || !involves(Node::W)(a, b)),
                false,
                false,
            ),
            (
                "primary-replica cut",
                Box::new(move |t, a, b| {
                    t < CUT || !(involves(Node::P)(a, b) && involves(Node::R)(a, b))
                }),
                false,
                false,
            ),
            ("all cut", Box::new(move |t, _, _| t < CUT), true, false),
            // The replica stops hearing the primary long before the primary loses the
            // witness: the replica keeps asking, and the lease's expiry at the witness (not
            // the silence) decides when it gets it.
            (
                "primary-replica cut, then primary-witness",
                Box::new(move |t, a, b| {
                    let pr = involves(Node::P)(a, b) && involves(Node::R)(a, b);
                    let pw = involves(Node::P)(a, b) && involves(Node::W)(a, b);
                    !((t >= CUT && pr) || (t >= 2 * CUT && pw))
                }),
                true,
                true,
            ),
        ];
        for af in [MIN_AUTO_FAILOVER_MS, 60_000] {
            for clocks in clock_sets() {
                for (name, link, fence, failover) in &cases {
                    let what = format!("{name}, --auto-failover {af}, clocks {clocks:?}");
                    let o = sim::run(af, clocks, 2 * CUT + 3 * af, link.as_ref(), &|_| true);
                    assert_eq!(o.fenced_at.is_some(), *fence, "{what}: fenced");
                    assert_eq!(o.failover_at.is_some(), *failover, "{what}: failover");
                    assert_never_both(&o, None, &what);
                    if let Some(f) = o.failover_at {
                        // Within --auto-failover + one lease of the (last) cut.
                        let cut = if o.fenced_at.is_some_and(|x| x > 2 * CUT) {
                            2 * CUT
                        } else {
                            CUT
                        };
                        assert!(
                            f - cut <= af + af / 2,
                            "{what}: failover {} ms after",
                            f - cut
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn primary_host_dies() {
        const DIES: u64 = 40_000;
        for af in [MIN_AUTO_FAILOVER_MS, 60_000] {
            for clocks in clock_sets() {
                let what = format!("--auto-failover {af}, clocks {clocks:?}");
                let o = sim::run(af, clocks, DIES + 3 * af, &|_, _, _| true, &|t| t < DIES);
                let f = o
                    .failover_at
                    .unwrap_or_else(|| panic!("{what}: no failover"));
                assert_never_both(&o, Some(DIES), &what);
                // The bound the docs give: --auto-failover + one lease period.
                assert!(f - DIES <= af + af / 2, "{what}: {} ms", f - DIES);
                eprintln!("takeover {} ms after the primary died: {what}", f - DIES);
                // And never before the silence: the replica waits --auto-failover.
                assert!(
                    f - DIES + af / 4 >= af * 999 / 1000,
                    "{what}: {} ms",
                    f - DIES
                );
            }
        }
    }

    #[test]
    fn flapping_links_never_run_both() {
        // Each link flips up or down at pseudo-random times 0.1 s to 20 s apart.
        let (mut fences, mut failovers) = (0, 0);
        for seed in 1..=6u64 {
            let flips = |salt: u64| {
                let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(salt);
                let mut t = 0;
                let mut v = vec![];
                while t < 400_000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    t += 100 + (x >> 33) % 20_000;
                    v.push(t);
                }
                v
            };
            let pr = flips(1);
            let pw = flips(2);
            let rw = flips(3);
            let up = |v: &Vec<u64>, t: u64| v.partition_point(|&f| f <= t) % 2 == 0;
            let link = move |t: u64, a: Node, b: Node| {
                let v = match (a, b) {
                    (Node::P, Node::R) | (Node::R, Node::P) => &pr,
                    (Node::P, Node::W) | (Node::W, Node::P) => &pw,
                    _ => &rw,
                };
                up(v, t)
            };
            for clocks in clock_sets() {
                let o = sim::run(MIN_AUTO_FAILOVER_MS, clocks, 400_000, &link, &|_| true);
                assert_never_both(&o, None, &format!("seed {seed}, clocks {clocks:?}"));
                fences += usize::from(o.fenced_at.is_some());
                failovers += usize::from(o.failover_at.is_some());
            }
        }
        // The pattern must exercise both sides' decisions, or the test proves nothing.
        assert!(
            fences > 0 && failovers > 0,
            "{fences} fences, {failovers} failovers"
        );
        eprintln!("flapping: {fences} fences, {failovers} failovers in 24 runs");
    }
}
