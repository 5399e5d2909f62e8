//! Fan-out's failover on the new primary: how `reverse` treats the host it names. A VM that
//! replicated from A to B and C (fan-out) failed over on B; `reverse` on B names a host, and
//! what B asks it depends on what that host is to the VM (docs/extended.md, "Fan-out's
//! failover"). This module owns that decision; the replica's side of `follow` is
//! [`crate::ReplicaMachine::follow`].

use vmr_proto::CycleId;

use crate::refusal::Refusal;

/// What `reverse` asks the host it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseWay {
    /// The old primary: `become-replica` (its VM stops being the primary).
    BecomeReplica,
    /// The extended replica this host forwarded the VM to: `continue-from` the failover point
    /// (its point ids are this host's, so the common points are kept by id).
    ContinueFrom,
    /// A sibling replica of a fanned-out VM (`reverse --follow`): `follow`, then a
    /// resynchronisation against its newest point (its ids are another relationship's).
    Follow,
}

/// The way of `reverse`: `to_extended`, the named host is the extended replica this host
/// forwards the VM to (its fingerprint is the one of `enable --extended`); `follow`, the admin
/// said the named host is a sibling replica. A sibling named without `--follow` is asked to
/// `become-replica` and refuses it (it is no primary of the VM): nothing changes, and the
/// error says so.
pub fn reverse_way(to_extended: bool, follow: bool) -> Result<ReverseWay, Refusal> {
    match (to_extended, follow) {
        (true, true) => Err(Refusal::FollowExtended),
        (true, false) => Ok(ReverseWay::ContinueFrom),
        (false, true) => Ok(ReverseWay::Follow),
        (false, false) => Ok(ReverseWay::BecomeReplica),
    }
}

/// Where the new primary's machine starts after the sibling answered `follow` with the point
/// it keeps (`kept`): acknowledged at `kept`, so that the reconciliation before the first
/// cycle (`replica-info`) finds nothing to adopt, and in resynchronisation, whose cycle's base
/// is the sibling's newest point and whose id comes after it. The failover point's id (this
/// host's numbering) is never sent as a base. Returns (the acknowledged point, resync).
pub fn follow_start(kept: CycleId) -> (CycleId, bool) {
    (kept, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_way_table() {
        let rows = [
            (false, false, Ok(ReverseWay::BecomeReplica)),
            (true, false, Ok(ReverseWay::ContinueFrom)),
            (false, true, Ok(ReverseWay::Follow)),
            (true, true, Err(Refusal::FollowExtended)),
        ];
        for (to_extended, follow, want) in rows {
            assert_eq!(
                reverse_way(to_extended, follow),
                want,
                "to the extended replica {to_extended}, --follow {follow}"
            );
        }
    }

    #[test]
    fn a_follower_is_resynchronised_against_the_point_it_kept() {
        // B failed over at its own cycle 40; C kept A→C's cycle 7: B's machine starts
        // acknowledged at 7 (C's id), never at 40, and resynchronises.
        for kept in [1, 7, 40, 1000] {
            assert_eq!(follow_start(kept), (kept, true));
        }
    }
}
