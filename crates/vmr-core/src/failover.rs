//! Failover decisions as a pure function: which replication state a failover operation
//! (prepare, start, test, cancel, complete, reverse) leads to from the current state and
//! mode, following Hyper-V's rules, or why it is refused. The agent carries them out.

use vmr_proto::api::{ReplicationMode, ReplicationState};

/// A failover operation asked by the admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverOp {
    /// Planned failover, first half (primary).
    Prepare,
    /// Start the VM from a point (replica).
    Start,
    /// Test failover (replica): the state does not change.
    Test,
    /// Undo a started, not completed failover (replica).
    Cancel,
    /// Commit a failover (replica).
    Complete,
    /// Reverse replication (the failed-over side becomes the primary).
    Reverse,
}

/// Why an operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverRefusal {
    /// Run on the other host.
    #[error("{op:?} runs on the {wanted:?}; this host is the VM's {actual:?}")]
    WrongSide {
        /// The operation.
        op: FailoverOp,
        /// The side it must run on.
        wanted: ReplicationMode,
        /// This host's side.
        actual: ReplicationMode,
    },
    /// Not allowed in the current state.
    #[error("{op:?} is not allowed while the VM is {state}")]
    State {
        /// The operation.
        op: FailoverOp,
        /// The current state.
        state: ReplicationState,
    },
    /// Initial replication has not completed: no point to start from.
    #[error("initial replication has not completed; there is no recovery point yet")]
    NoInitialCopy,
}

/// The state `op` leads to (for `Test`: the unchanged state), or why it is refused.
/// `has_point`: the replica holds at least one recovery point.
pub fn failover_transition(
    mode: ReplicationMode,
    state: ReplicationState,
    op: FailoverOp,
    has_point: bool,
) -> Result<ReplicationState, FailoverRefusal> {
    use ReplicationMode as M;
    use ReplicationState as S;
    let side = |wanted: M| {
        if mode == wanted {
            Ok(())
        } else {
            Err(FailoverRefusal::WrongSide {
                op,
                wanted,
                actual: mode,
            })
        }
    };
    let refuse = || Err(FailoverRefusal::State { op, state });
    match op {
        FailoverOp::Prepare => {
            side(M::Primary)?;
            match state {
                S::Replicating => Ok(S::PreparedForFailover),
                _ => refuse(),
            }
        }
        FailoverOp::Start | FailoverOp::Test => {
            side(M::Replica)?;
            match state {
                S::Replicating
                | S::Suspended
                | S::Resynchronizing
                | S::ResynchronizeSuspended
                | S::WaitingForInitialReplication => {
                    if !has_point {
                        return Err(FailoverRefusal::NoInitialCopy);
                    }
                    Ok(if op == FailoverOp::Start {
                        S::FailedOverWaitingCompletion
                    } else {
                        state
                    })
                }
                _ => refuse(),
            }
        }
        FailoverOp::Cancel => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::Replicating),
                _ => refuse(),
            }
        }
        FailoverOp::Complete => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion => Ok(S::FailedOver),
                _ => refuse(),
            }
        }
        FailoverOp::Reverse => {
            side(M::Replica)?;
            match state {
                S::FailedOverWaitingCompletion | S::FailedOver => Ok(S::Replicating),
                _ => refuse(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailoverOp as O;
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
        assert_eq!(e, FailoverRefusal::NoInitialCopy);
    }
}
