//! Fan-out (issue 15 part 4): the decisions of a primary VM that replicates to several replicas
//! at once, one relationship each (docs/extended.md, "Fan-out"). This module owns two small
//! decisions the owner task asks for: which relationship a command names ([`resolve`]), and
//! which relationship may start a cycle now ([`turns`], [`may_start`]). Each relationship's
//! own decisions are its [`crate::PrimaryMachine`]'s.

/// What [`resolve`] could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// The VM has several relationships and the command named none.
    #[error("the VM replicates to several replicas: name one")]
    Ambiguous,
    /// No relationship goes to the replica named.
    #[error("no relationship to that replica")]
    NoSuch,
}

/// The relationship (its index in `replicas`, the VM's replicas in relationship order) that a
/// command acting on one relationship means: the one whose replica is `wanted`, or with no
/// `wanted` the only one.
pub fn resolve(replicas: &[&str], wanted: Option<&str>) -> Result<usize, Unresolved> {
    match wanted {
        None if replicas.len() == 1 => Ok(0),
        None => Err(Unresolved::Ambiguous),
        Some(w) => replicas
            .iter()
            .position(|r| *r == w)
            .ok_or(Unresolved::NoSuch),
    }
}

/// The order in which `n` relationships get their turn to start a cycle: from `next`
/// (the one after the relationship whose cycle ended last) round the list, so that a frequent
/// relationship never starves a rare one.
pub fn turns(n: usize, next: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (next + k) % n.max(1))
}

/// Whether relationship `turn` may start a cycle now, given which relationships' cycle tasks
/// run: with one relationship always; with several only while no other one's runs (each
/// cycle's capture holds the VM's QMP monitor, which takes one connection at a time). A
/// paused, disabled or failed relationship runs no task, so it never holds another back.
pub fn may_start(running: &[bool], turn: usize) -> bool {
    running.len() <= 1 || !running.iter().enumerate().any(|(i, r)| *r && i != turn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VM's replicas, the one named, and what `resolve` says.
    type Case<'a> = (&'a [&'a str], Option<&'a str>, Result<usize, Unresolved>);

    #[test]
    fn a_command_names_one_relationship_or_is_refused() {
        let cases: &[Case] = &[
            (&["b:1"], None, Ok(0)),
            (&["b:1"], Some("b:1"), Ok(0)),
            (&["b:1"], Some("c:1"), Err(Unresolved::NoSuch)),
            (&["b:1", "c:1"], None, Err(Unresolved::Ambiguous)),
            (&["b:1", "c:1"], Some("b:1"), Ok(0)),
            (&["b:1", "c:1"], Some("c:1"), Ok(1)),
            (&["b:1", "c:1"], Some("d:1"), Err(Unresolved::NoSuch)),
        ];
        for (replicas, wanted, want) in cases {
            assert_eq!(&resolve(replicas, *wanted), want, "{replicas:?} {wanted:?}");
        }
    }

    #[test]
    fn turns_start_after_the_last_one_and_cover_all() {
        assert_eq!(turns(1, 0).collect::<Vec<_>>(), [0]);
        assert_eq!(turns(2, 0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(turns(2, 1).collect::<Vec<_>>(), [1, 0]);
        assert_eq!(turns(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        // `next` past the end (the last relationship was removed) wraps.
        assert_eq!(turns(2, 3).collect::<Vec<_>>(), [1, 0]);
        assert_eq!(turns(0, 0).count(), 0);
    }

    #[test]
    fn a_relationship_starts_only_while_no_other_runs() {
        let cases: &[(&[bool], usize, bool)] = &[
            // one relationship: its own task is the PrimarySide's concern
            (&[false], 0, true),
            (&[true], 0, true),
            (&[false, false], 0, true),
            (&[false, false], 1, true),
            (&[true, false], 1, false),
            (&[false, true], 0, false),
            // its own running task does not close its gate (the side waits for it itself)
            (&[true, false], 0, true),
            (&[false, false, true], 0, false),
            (&[false, false, true], 2, true),
        ];
        for (running, turn, want) in cases {
            assert_eq!(may_start(running, *turn), *want, "{running:?} {turn}");
        }
    }
}
