//! Failover decisions as a pure function: which replication state a failover operation
//! (prepare, start, test, cancel, complete, reverse) leads to from the current state and
//! mode, following Hyper-V's rules, or why it is refused. The primary and replica machines
//! apply them; the agent carries out what they decide.

use vmr_proto::api::{ReplicationMode, ReplicationState};

use crate::refusal::{Op, Refusal};

/// The state `op` (one of [`Op::Prepare`], [`Op::Start`], [`Op::Test`], [`Op::Cancel`],
/// [`Op::Complete`], [`Op::Reverse`]) leads to (for `Test`: the unchanged state; for `Cancel`:
/// `Replicating`, which the replica machine replaces by the state before the failover), or
/// why it is refused. `has_point`: the replica holds at least one recovery point.
pub fn failover_transition(
    mode: ReplicationMode,
    state: ReplicationState,
    op: Op,
    has_point: bool,
) -> Result<ReplicationState, Refusal> {
    use ReplicationMode as M;
    use ReplicationState as S;
    let side = |wanted: M| {
        if mode == wanted {
            Ok(())
        } else {
            Err(Refusal::WrongSide {
                op,
                wanted,
                actual: mode,
            })
        }
    };
    let refuse = || Err(Refusal::State { op, state });
    match op {
        Op::Prepare => {
            side(M::Primary)?;
            match state {
                S::Replicating if has_point => Ok(S::PreparedForFailover),
                S::Replicating => Err(Refusal::NoInitialCopy { op }),
                S::Disabled => Err(Refusal::NotEnabled { op }),
                _ => refuse(),
            }
        }
        Op::Start | Op::Test => {
            side(M::Replica)?;
            match state {
                S::Replicating
                | S::Suspended
                | S::Resynchronizing
                | S::ResynchronizeSuspended
                | S::WaitingForInitialReplication => {
                    if !has_point {
                        return Err(Refusal::NoInitialCopy { op });
                    }
                    Ok(if op == Op::Start {
                        S::FailedOverWaitingCompletion
                    } else {
                        state
                    })
                }
                S::Disabled => Err(Refusal::Disabled { op }),
                _ => refuse(),
            }
        }
        Op::Cancel => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::Replicating),
                _ => refuse(),
            }
        }
        Op::Complete => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::FailedOver),
                _ => refuse(),
            }
        }
        Op::Reverse => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion | S::FailedOver => Ok(S::Replicating),
                _ => refuse(),
            }
        }
        _ => refuse(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Op as O;
    use ReplicationMode as M;
    use ReplicationState as S;

    #[test]
    fn table() {
        // (mode, state, op, has_point, expected: Some(state) or None = refused)
        let rows: &[(M, S, O, bool, Option<S>)] = &[
            (
                M::Primary,
                S::Replicating,
                O::Prepare,
                true,
                Some(S::PreparedForFailover),
            ),
            (M::Primary, S::Suspended, O::Prepare, true, None),
            (
                M::Primary,
                S::InitialReplicationInProgress,
                O::Prepare,
                false,
                None,
            ),
            (M::Replica, S::Replicating, O::Prepare, true, None),
            (
                M::Replica,
                S::Replicating,
                O::Start,
                true,
                Some(S::FailedOverWaitingCompletion),
            ),
            (
                M::Replica,
                S::Suspended,
                O::Start,
                true,
                Some(S::FailedOverWaitingCompletion),
            ),
            (
                M::Replica,
                S::WaitingForInitialReplication,
                O::Start,
                false,
                None,
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Start,
                true,
                None,
            ),
            (M::Replica, S::FailedOver, O::Start, true, None),
            (M::Primary, S::Replicating, O::Start, true, None),
            (
                M::Replica,
                S::Replicating,
                O::Test,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::Replicating, O::Test, false, None),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Test,
                true,
                None,
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Cancel,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::FailedOver, O::Cancel, true, None),
            (M::Replica, S::Replicating, O::Cancel, true, None),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Complete,
                true,
                Some(S::FailedOver),
            ),
            (M::Replica, S::Replicating, O::Complete, true, None),
            (
                M::Replica,
                S::FailedOver,
                O::Reverse,
                true,
                Some(S::Replicating),
            ),
            (
                M::Replica,
                S::FailedOverWaitingCompletion,
                O::Reverse,
                true,
                Some(S::Replicating),
            ),
            (M::Replica, S::Replicating, O::Reverse, true, None),
            (M::Primary, S::PreparedForFailover, O::Reverse, true, None),
        ];
        for (mode, state, op, has, want) in rows {
            let got = failover_transition(*mode, *state, *op, *has).ok();
            assert_eq!(got, *want, "{mode:?} {state} {op:?} has_point={has}");
        }
    }

    #[test]
    fn refusals_explain() {
        let e =
            failover_transition(M::Primary, S::Replicating, O::Start, true).expect_err("refused");
        assert!(e.to_string().contains("Replica"), "{e}");
        let e = failover_transition(M::Replica, S::WaitingForInitialReplication, O::Start, false)
            .expect_err("refused");
        assert_eq!(e, Refusal::NoInitialCopy { op: O::Start });
        assert!(e.to_string().contains("initial replication"), "{e}");
    }
}
