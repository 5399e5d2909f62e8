//! Hyper-V's health rules as pure functions of state, statistics and time.
//!
//! Critical: replication cannot proceed (error, resync required, failing attempts), or it is
//! paused on the replica. Warning: more than 20 % of cycles missed in the monitoring window,
//! more than an hour since the last replication, initial replication not done, paused on the
//! primary, failed over without reverse replication, app-consistent points failing
//! ([`QUIESCE_WARN_AFTER`] failed guest freezes in a row). Normal otherwise.

use vmr_proto::api::{Health, ReplicationState, ReplicationStats};

use crate::primary::PrimaryMachine;
use crate::replica::ReplicaMachine;

/// A health level with the reasons that led to it (empty when Normal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The level.
    pub health: Health,
    /// Human reasons, most severe first.
    pub reasons: Vec<String>,
}

impl HealthReport {
    fn from(mut items: Vec<(Health, String)>) -> Self {
        items.sort_by_key(|i| std::cmp::Reverse(i.0));
        let health = items.first().map_or(Health::Normal, |i| i.0);
        Self {
            health,
            reasons: items.into_iter().map(|i| i.1).collect(),
        }
    }

    /// Add a reason of level `health`: first when it is more severe than the report's level
    /// (which it becomes), last otherwise.
    pub fn push(&mut self, health: Health, reason: String) {
        if health > self.health {
            self.health = health;
            self.reasons.insert(0, reason);
        } else {
            self.reasons.push(reason);
        }
    }

    /// The reasons joined for one line.
    pub fn reason(&self) -> String {
        self.reasons.join("; ")
    }
}

const HOUR_MS: u64 = 3_600_000;

/// Failed guest freezes in a row after which a primary's health is Warning (its recent points
/// are crash-consistent although app-consistent ones were asked for).
pub const QUIESCE_WARN_AFTER: u32 = 3;

fn common(
    state: ReplicationState,
    stats: &ReplicationStats,
    now_ms: u64,
    items: &mut Vec<(Health, String)>,
) {
    use ReplicationState as S;
    let attempted = stats.successful_cycles + stats.missed_cycles;
    if attempted > 0 && stats.missed_cycles * 5 > attempted {
        items.push((
            Health::Warning,
            format!(
                "more than 20 percent of replication cycles were missed ({} of {})",
                stats.missed_cycles, attempted
            ),
        ));
    }
    if state == S::Replicating {
        let last = stats.last_replication_ms.unwrap_or(stats.window_start_ms);
        if now_ms.saturating_sub(last) > HOUR_MS {
            items.push((
                Health::Warning,
                "the replica is behind the primary by more than an hour".into(),
            ));
        }
    }
    match state {
        S::Error => items.push((Health::Critical, "replication is in error".into())),
        S::WaitingForStartResynchronize => {
            items.push((Health::Critical, "resynchronization required".into()))
        }
        S::ReadyForInitialReplication
        | S::InitialReplicationInProgress
        | S::WaitingForInitialReplication => items.push((
            Health::Warning,
            "initial replication is not complete".into(),
        )),
        S::FailedOverWaitingCompletion | S::FailedOver => items.push((
            Health::Warning,
            "failed over; reverse replication is not set up".into(),
        )),
        S::ResynchronizeSuspended => {
            items.push((Health::Warning, "resynchronization is paused".into()))
        }
        _ => {}
    }
}

/// Health of a VM on its primary.
pub fn primary_health(
    state: ReplicationState,
    stats: &ReplicationStats,
    consecutive_failures: u32,
    last_error: Option<&str>,
    now_ms: u64,
) -> HealthReport {
    let mut items = Vec::new();
    common(state, stats, now_ms, &mut items);
    if state == ReplicationState::Suspended {
        items.push((
            Health::Warning,
            "replication is paused on the primary".into(),
        ));
    }
    if stats.consecutive_quiesce_failures >= QUIESCE_WARN_AFTER {
        items.push((
            Health::Warning,
            format!(
                "app-consistent points are failing ({} freezes in a row; the points are crash-consistent): {}",
                stats.consecutive_quiesce_failures,
                stats
                    .last_quiesce_error
                    .as_deref()
                    .unwrap_or("unknown error")
            ),
        ));
    }
    if state == ReplicationState::WaitingForStartResynchronize {
        if let Some(e) = last_error {
            items.push((Health::Critical, format!("cause: {e}")));
        }
    } else if consecutive_failures > 0 {
        let attempts = if consecutive_failures == 1 {
            "1 failed attempt".to_owned()
        } else {
            format!("{consecutive_failures} failed attempts")
        };
        items.push((
            Health::Critical,
            format!(
                "cannot replicate ({attempts}, retrying): {}",
                last_error.unwrap_or("unknown error")
            ),
        ));
    }
    HealthReport::from(items)
}

/// Health of a VM on its replica.
pub fn replica_health(
    state: ReplicationState,
    stats: &ReplicationStats,
    now_ms: u64,
) -> HealthReport {
    let mut items = Vec::new();
    common(state, stats, now_ms, &mut items);
    if state == ReplicationState::Suspended {
        items.push((
            Health::Critical,
            "replication is paused on the replica".into(),
        ));
    }
    HealthReport::from(items)
}

impl PrimaryMachine {
    /// Health of this primary VM now.
    pub fn health(&self, now_ms: u64) -> HealthReport {
        primary_health(
            self.state(),
            self.stats(),
            self.consecutive_failures(),
            self.last_error(),
            now_ms,
        )
    }
}

impl ReplicaMachine {
    /// Health of this replica VM now; a failing apply is Critical.
    pub fn health(&self, now_ms: u64) -> HealthReport {
        let mut items = Vec::new();
        common(self.state(), self.stats(), now_ms, &mut items);
        if self.state() == ReplicationState::Suspended {
            items.push((
                Health::Critical,
                "replication is paused on the replica".into(),
            ));
        }
        if let Some(e) = self.last_error() {
            items.push((Health::Critical, format!("last apply failed: {e}")));
        }
        HealthReport::from(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn stats(ok: u64, missed: u64, last: Option<u64>) -> ReplicationStats {
        ReplicationStats {
            successful_cycles: ok,
            missed_cycles: missed,
            last_replication_ms: last,
            ..Default::default()
        }
    }

    #[test]
    fn primary_table() {
        let now = 10 * HOUR_MS;
        let recent = Some(now - 1_000);
        let table: Vec<(S, ReplicationStats, u32, Health, &str)> = vec![
            (S::Replicating, stats(10, 0, recent), 0, Health::Normal, ""),
            (S::Replicating, stats(8, 2, recent), 0, Health::Normal, ""),
            (
                S::Replicating,
                stats(7, 3, recent),
                0,
                Health::Warning,
                "20 percent",
            ),
            (
                S::Replicating,
                stats(10, 0, Some(now - 2 * HOUR_MS)),
                0,
                Health::Warning,
                "more than an hour",
            ),
            (
                S::Replicating,
                stats(10, 0, recent),
                2,
                Health::Critical,
                "cannot replicate",
            ),
            (
                S::Suspended,
                stats(10, 0, recent),
                0,
                Health::Warning,
                "paused on the primary",
            ),
            (
                S::InitialReplicationInProgress,
                stats(0, 0, None),
                0,
                Health::Warning,
                "initial",
            ),
            (
                S::WaitingForStartResynchronize,
                stats(1, 0, recent),
                0,
                Health::Critical,
                "resynchronization",
            ),
            (S::Error, stats(1, 0, recent), 0, Health::Critical, "error"),
        ];
        for (state, st, fails, want, why) in table {
            let r = primary_health(state, &st, fails, Some("boom"), now);
            assert_eq!(r.health, want, "{state:?} {st:?}");
            assert!(
                r.reason().contains(why),
                "{state:?}: {:?} lacks {why:?}",
                r.reason()
            );
        }
    }

    #[test]
    fn machine_health() {
        let mut r = ReplicaMachine::new(0);
        assert_eq!(r.health(1).health, Health::Warning, "initial not done");
        r.step(crate::ReplicaEvent::CycleApplied {
            now_ms: 1,
            id: 1,
            bytes: 1,
            latency_ms: 0,
            app_consistent: false,
        })
        .expect("applied");
        assert_eq!(r.health(2).health, Health::Normal);
        r.step(crate::ReplicaEvent::ApplyFailed {
            now_ms: 3,
            message: "disk full".into(),
        })
        .expect("recorded");
        let h = r.health(4);
        assert_eq!(h.health, Health::Critical);
        assert!(h.reason().contains("disk full"), "{}", h.reason());
        let mut p = PrimaryMachine::new(crate::Schedule::every(30_000));
        p.step(crate::Event::Enable {
            now_ms: 0,
            initial_at_ms: None,
        })
        .expect("enabled");
        assert_eq!(p.health(1).health, Health::Warning);
    }

    #[test]
    fn replica_pause_is_critical() {
        let r = replica_health(S::Suspended, &stats(1, 0, Some(0)), 1);
        assert_eq!(r.health, Health::Critical);
        let r = replica_health(S::FailedOverWaitingCompletion, &stats(1, 0, Some(0)), 1);
        assert_eq!(r.health, Health::Warning);
    }
}
