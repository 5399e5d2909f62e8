//! What `reverse` on a failed-over replica B does with the extended relationship B forwarded
//! the VM's points on to C (issue 15, part 3: "Planned failover A → B: afterwards the VM runs
//! on B, B replicates to A (reverse) and B → C continues without a full copy"). This module
//! owns that one decision ([`onward`]); carrying it out (the `continue-from` call to C, the
//! fan-out relationship's record, the tracking bitmap) is the agent's
//! (`vmr-agent` `failover.rs`), and the relationship then runs as any fan-out relationship
//! ([`crate::fanout`], its own [`crate::PrimaryMachine`]).
//!
//! C's chain continues with the same point ids: C holds (or is made to hold) the failover
//! point `P`, and the fan-out relationship's machine starts at `P`, so its cycles are `P + 1`,
//! `P + 2`, ... on top of C's `P`. Its first cycle carries what the VM on B wrote since it
//! started, read from the tracking bitmap B started for C at `failover start` (before the VM
//! ran); without that bitmap (a VM failed over by an older agent, or started by hand after
//! `--no-start`) the first cycle is a resync (block hashes against C's point, only differing
//! blocks shipped), never a full copy.

use vmr_proto::CycleId;
use vmr_proto::api::ReplicationState;

/// The facts [`onward`] decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnwardFacts {
    /// The reverse goes to the extended replica C itself (it takes the relationship over as
    /// the VM's first one: not this decision's case).
    pub to_extended_replica: bool,
    /// The extended relationship's state (its machine's).
    pub state: ReplicationState,
    /// The point C acknowledged last, as B's extended record holds it.
    pub acked: Option<CycleId>,
    /// The failover point `P` the VM on B started from.
    pub point: CycleId,
    /// B's newest point: C cannot hold a point newer than it (the extended relationship ships
    /// only B's points).
    pub newest: CycleId,
    /// A tracking bitmap for C was started with the VM at `failover start`.
    pub tracked: bool,
    /// The VM was failed over as a libvirt domain (captured through libvirt backup jobs:
    /// fan-out of such a VM is not built).
    pub libvirt: bool,
}

/// What becomes of the extended relationship at `reverse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onward {
    /// The reverse goes to C: the extended relationship becomes the VM's first relationship
    /// (`continue-from`, as `reverse` to the extended replica does).
    TakenOver,
    /// C holds `P` and nothing newer: a fan-out relationship to C from `P` with no call to C.
    /// `resync`: its first cycle compares block hashes (nothing tracked the VM's writes for
    /// C). `paused`: the extended relationship was paused, and so is its continuation.
    Continue {
        /// The failover point, the relationship's acknowledged cycle.
        from: CycleId,
        /// The first cycle is a resync.
        resync: bool,
        /// Created paused.
        paused: bool,
    },
    /// C may not hold `P`, or may hold points newer than it: ask C to continue from `P`
    /// (`continue-from`: it drops the points above `P`, and answers whether it holds `P`);
    /// then a fan-out relationship from `P`, resynchronising first when C does not hold `P`
    /// or nothing tracked the VM's writes ([`crate::reverse_resyncs`]).
    ContinueFrom {
        /// The failover point.
        point: CycleId,
        /// Created paused.
        paused: bool,
    },
    /// The extended relationship ends (C keeps its points); why.
    End(OnwardEnd),
}

/// Why the extended relationship cannot continue from the failed-over VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OnwardEnd {
    /// C acknowledged no point: continuing would be a full copy (enable replication to C anew
    /// from B).
    #[error("the extended replica holds no point of the VM yet (a full copy would be needed)")]
    NothingHeld,
    /// The extended relationship was disabled.
    #[error("the extended relationship is disabled")]
    Disabled,
    /// The VM runs as a libvirt domain: replicating it to a second replica is not built.
    #[error(
        "the VM runs as a libvirt domain here, and fan-out of a libvirt-managed VM is not built"
    )]
    Libvirt,
}

/// What `reverse` does with the extended relationship (see [`Onward`]).
pub fn onward(f: OnwardFacts) -> Onward {
    if f.to_extended_replica {
        return Onward::TakenOver;
    }
    if f.state == ReplicationState::Disabled {
        return Onward::End(OnwardEnd::Disabled);
    }
    if f.libvirt {
        return Onward::End(OnwardEnd::Libvirt);
    }
    let paused = f.state == ReplicationState::Suspended;
    match f.acked {
        None => Onward::End(OnwardEnd::NothingHeld),
        // C's points are B's, and B's newest is P: C holds exactly P, nothing to drop.
        Some(a) if a == f.point && f.point == f.newest => Onward::Continue {
            from: f.point,
            resync: !f.tracked,
            paused,
        },
        // C's record says P, but B had newer points (an unplanned failover to an older point):
        // an acknowledgement of a newer one may have been lost; or C is behind or ahead of P.
        Some(_) => Onward::ContinueFrom {
            point: f.point,
            paused,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn facts(state: S, acked: Option<CycleId>, point: CycleId, newest: CycleId) -> OnwardFacts {
        OnwardFacts {
            to_extended_replica: false,
            state,
            acked,
            point,
            newest,
            tracked: true,
            libvirt: false,
        }
    }

    #[test]
    fn the_extended_relationship_at_reverse() {
        let cont = |from, resync, paused| Onward::Continue {
            from,
            resync,
            paused,
        };
        let cf = |point, paused| Onward::ContinueFrom { point, paused };
        let untracked = OnwardFacts {
            tracked: false,
            ..facts(S::Replicating, Some(7), 7, 7)
        };
        let lv = OnwardFacts {
            libvirt: true,
            ..facts(S::Replicating, Some(7), 7, 7)
        };
        let to_c = OnwardFacts {
            to_extended_replica: true,
            ..facts(S::Replicating, Some(7), 7, 7)
        };
        let rows: &[(&str, OnwardFacts, Onward)] = &[
            // planned failover: P is A's final point, B's newest, and C holds it
            (
                "planned, C holds P",
                facts(S::Replicating, Some(7), 7, 7),
                cont(7, false, false),
            ),
            (
                "planned, C holds P, relationship paused",
                facts(S::Suspended, Some(7), 7, 7),
                cont(7, false, true),
            ),
            (
                "C holds P, its last cycle failed (C down): the relationship retries",
                facts(S::Error, Some(7), 7, 7),
                cont(7, false, false),
            ),
            (
                "no bitmap for C: the first cycle is a resync",
                untracked,
                cont(7, true, false),
            ),
            // C behind P (the final point not forwarded yet): C resyncs on what it holds
            (
                "C behind P",
                facts(S::Replicating, Some(5), 7, 7),
                cf(7, false),
            ),
            (
                "C behind P, paused",
                facts(S::Suspended, Some(5), 7, 7),
                cf(7, true),
            ),
            // unplanned failover to an older point: C drops what it had after it
            (
                "unplanned, C ahead of P",
                facts(S::Replicating, Some(9), 7, 9),
                cf(7, false),
            ),
            (
                "unplanned, C's record says P but B had newer points (a lost ack)",
                facts(S::Replicating, Some(7), 7, 9),
                cf(7, false),
            ),
            (
                "unplanned, C behind P",
                facts(S::Replicating, Some(3), 7, 9),
                cf(7, false),
            ),
            // ends
            (
                "C holds nothing",
                facts(S::InitialReplicationInProgress, None, 7, 7),
                Onward::End(OnwardEnd::NothingHeld),
            ),
            (
                "C holds nothing, never started",
                facts(S::ReadyForInitialReplication, None, 7, 7),
                Onward::End(OnwardEnd::NothingHeld),
            ),
            (
                "disabled",
                facts(S::Disabled, Some(7), 7, 7),
                Onward::End(OnwardEnd::Disabled),
            ),
            ("libvirt domain", lv, Onward::End(OnwardEnd::Libvirt)),
            ("reverse to C itself", to_c, Onward::TakenOver),
        ];
        for (what, f, want) in rows {
            assert_eq!(onward(*f), *want, "{what}");
        }
    }
}
