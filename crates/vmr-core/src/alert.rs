//! When alerts fire and clear, as pure functions of what the owner observed and the time
//! passed in: the RPO alert (lag = now minus the last point's cut time, on either side, against
//! `--rpo-alert`, default twice the frequency, or in continuous mode
//! [`crate::schedule::CONTINUOUS_TARGET_SECS`]; its deadline for the owner's timer; its health
//! item naming the event) and the rate limit of `cycle-failed` events. (Its validation is
//! [`crate::schedule::check_rpo_alert`], with the other `enable` arguments.)

use vmr_proto::api::{Health, ReplicationState};

use crate::health::HealthReport;

/// The RPO alert in ms: `rpo_alert_secs`, or twice the frequency, or for continuous mode
/// (`frequency_secs` = [`crate::schedule::CONTINUOUS`]) its RPO target
/// ([`crate::schedule::CONTINUOUS_TARGET_SECS`]).
pub fn rpo_alert_ms(frequency_secs: u64, rpo_alert_secs: Option<u64>) -> u64 {
    let default = if frequency_secs == crate::schedule::CONTINUOUS {
        crate::schedule::CONTINUOUS_TARGET_SECS
    } else {
        frequency_secs.saturating_mul(2)
    };
    rpo_alert_secs.unwrap_or(default).saturating_mul(1000)
}

/// Whether a VM in `state` is held to its RPO: replication is meant to be moving (not
/// paused by the admin, not failed over, not before its first point).
pub fn rpo_watched(state: ReplicationState) -> bool {
    use ReplicationState as S;
    matches!(
        state,
        S::Replicating | S::Resynchronizing | S::WaitingForStartResynchronize | S::Error
    )
}

/// Where a VM stands against its RPO alert at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpoVerdict {
    /// Not held to an RPO (state, or no point yet).
    NotWatched,
    /// Within it; it is exceeded at `deadline_ms` unless a new point arrives.
    Within {
        /// Now minus the last cut.
        lag_ms: u64,
        /// Last cut plus the alert.
        deadline_ms: u64,
    },
    /// Past it.
    Exceeded {
        /// Now minus the last cut.
        lag_ms: u64,
        /// By how much the lag passed the alert.
        over_ms: u64,
    },
}

/// Judge the lag: `last_cut_ms` is the last replicated point's cut time.
pub fn assess_rpo(
    state: ReplicationState,
    last_cut_ms: Option<u64>,
    rpo_ms: u64,
    now_ms: u64,
) -> RpoVerdict {
    let Some(cut) = last_cut_ms.filter(|_| rpo_watched(state) && rpo_ms > 0) else {
        return RpoVerdict::NotWatched;
    };
    let lag_ms = now_ms.saturating_sub(cut);
    let deadline_ms = cut.saturating_add(rpo_ms);
    if now_ms >= deadline_ms {
        RpoVerdict::Exceeded {
            lag_ms,
            over_ms: now_ms - deadline_ms,
        }
    } else {
        RpoVerdict::Within {
            lag_ms,
            deadline_ms,
        }
    }
}

/// A change of the RPO alert the owner must report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpoChange {
    /// Raise `rpo-exceeded`.
    Fire {
        /// The lag now.
        lag_ms: u64,
    },
    /// Raise `rpo-recovered` (a point arrived, or the VM is no longer held to its RPO).
    Clear {
        /// The lag now (`None` when no longer watched).
        lag_ms: Option<u64>,
    },
}

/// Whether the alert fires or clears: `active` is whether it is raised now.
pub fn decide_rpo(active: bool, verdict: RpoVerdict) -> Option<RpoChange> {
    match (active, verdict) {
        (false, RpoVerdict::Exceeded { lag_ms, .. }) => Some(RpoChange::Fire { lag_ms }),
        (true, RpoVerdict::Within { lag_ms, .. }) => Some(RpoChange::Clear {
            lag_ms: Some(lag_ms),
        }),
        (true, RpoVerdict::NotWatched) => Some(RpoChange::Clear { lag_ms: None }),
        _ => None,
    }
}

/// Seconds for people: "4s", "2m05s", "1h02m".
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// The health item of an exceeded RPO alert, naming the event that raised it (`None` when
/// the lag is within the alert or the alert was not raised).
pub fn rpo_health(
    verdict: RpoVerdict,
    rpo_ms: u64,
    role_is_replica: bool,
    alert_event: Option<u64>,
) -> Option<(Health, String)> {
    let (RpoVerdict::Exceeded { over_ms, .. }, Some(id)) = (verdict, alert_event) else {
        return None;
    };
    let who = if role_is_replica {
        "replica"
    } else {
        "replication"
    };
    Some((
        Health::Warning,
        format!(
            "{who} is behind its RPO alert of {} by {} (event {id})",
            human_ms(rpo_ms),
            human_ms(over_ms)
        ),
    ))
}

impl HealthReport {
    /// The report with one more item (kept most severe first).
    pub fn with(self, item: Option<(Health, String)>) -> HealthReport {
        let Some((h, reason)) = item else {
            return self;
        };
        let mut reasons = self.reasons;
        let pos = if h > self.health { 0 } else { reasons.len() };
        reasons.insert(pos, reason);
        HealthReport {
            health: self.health.max(h),
            reasons,
        }
    }
}

/// Whether a cycle failure makes a `cycle-failed` event: the first in a row, every
/// `every`th in a row, and one whose error differs from the last reported one.
pub fn report_failure(
    consecutive: u32,
    error: &str,
    last_reported: Option<&str>,
    every: u32,
) -> bool {
    consecutive == 1
        || (every > 0 && consecutive > 0 && consecutive.is_multiple_of(every))
        || last_reported.is_none_or(|l| l != error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    #[test]
    fn the_rpo_alert_defaults_to_twice_the_frequency() {
        assert_eq!(rpo_alert_ms(5, None), 10_000);
        assert_eq!(rpo_alert_ms(5, Some(30)), 30_000);
        // Continuous mode: twice "no interval" means nothing; its target is the default.
        assert_eq!(rpo_alert_ms(crate::schedule::CONTINUOUS, None), 30_000);
        assert_eq!(rpo_alert_ms(crate::schedule::CONTINUOUS, Some(5)), 5_000);
    }

    #[test]
    fn rpo_verdicts() {
        // (state, last cut, rpo, now) -> verdict
        let table: &[(S, Option<u64>, u64, u64, RpoVerdict)] = &[
            (S::Replicating, None, 10_000, 50_000, RpoVerdict::NotWatched),
            (
                S::Suspended,
                Some(0),
                10_000,
                50_000,
                RpoVerdict::NotWatched,
            ),
            (
                S::FailedOver,
                Some(0),
                10_000,
                50_000,
                RpoVerdict::NotWatched,
            ),
            (
                S::ReadyForInitialReplication,
                Some(0),
                10_000,
                50_000,
                RpoVerdict::NotWatched,
            ),
            (S::Replicating, Some(0), 0, 50_000, RpoVerdict::NotWatched),
            (
                S::Replicating,
                Some(40_000),
                10_000,
                45_000,
                RpoVerdict::Within {
                    lag_ms: 5_000,
                    deadline_ms: 50_000,
                },
            ),
            // Exactly at the deadline: exceeded (the timer fires then).
            (
                S::Replicating,
                Some(40_000),
                10_000,
                50_000,
                RpoVerdict::Exceeded {
                    lag_ms: 10_000,
                    over_ms: 0,
                },
            ),
            (
                S::Error,
                Some(40_000),
                10_000,
                54_000,
                RpoVerdict::Exceeded {
                    lag_ms: 14_000,
                    over_ms: 4_000,
                },
            ),
            (
                S::WaitingForStartResynchronize,
                Some(40_000),
                10_000,
                41_000,
                RpoVerdict::Within {
                    lag_ms: 1_000,
                    deadline_ms: 50_000,
                },
            ),
            // A clock that went back: lag 0, within.
            (
                S::Resynchronizing,
                Some(40_000),
                10_000,
                30_000,
                RpoVerdict::Within {
                    lag_ms: 0,
                    deadline_ms: 50_000,
                },
            ),
        ];
        for (i, (state, cut, rpo, now, want)) in table.iter().enumerate() {
            assert_eq!(assess_rpo(*state, *cut, *rpo, *now), *want, "row {i}");
        }
    }

    #[test]
    fn rpo_fires_once_and_clears_once() {
        let within = RpoVerdict::Within {
            lag_ms: 1,
            deadline_ms: 2,
        };
        let over = RpoVerdict::Exceeded {
            lag_ms: 12,
            over_ms: 2,
        };
        let table = [
            (false, RpoVerdict::NotWatched, None),
            (false, within, None),
            (false, over, Some(RpoChange::Fire { lag_ms: 12 })),
            (true, over, None),
            (true, within, Some(RpoChange::Clear { lag_ms: Some(1) })),
            (
                true,
                RpoVerdict::NotWatched,
                Some(RpoChange::Clear { lag_ms: None }),
            ),
        ];
        for (i, (active, v, want)) in table.into_iter().enumerate() {
            assert_eq!(decide_rpo(active, v), want, "row {i}");
        }
    }

    #[test]
    fn the_health_reason_names_the_event() {
        let over = RpoVerdict::Exceeded {
            lag_ms: 14_000,
            over_ms: 4_000,
        };
        assert_eq!(
            rpo_health(over, 10_000, true, Some(42)),
            Some((
                Health::Warning,
                "replica is behind its RPO alert of 10s by 4s (event 42)".into()
            ))
        );
        assert_eq!(rpo_health(over, 10_000, true, None), None);
        let within = RpoVerdict::Within {
            lag_ms: 1,
            deadline_ms: 2,
        };
        assert_eq!(rpo_health(within, 10_000, false, Some(1)), None);
        let r = HealthReport {
            health: Health::Critical,
            reasons: vec!["replication is in error".into()],
        }
        .with(rpo_health(over, 10_000, false, Some(7)));
        assert_eq!(r.health, Health::Critical);
        assert_eq!(
            r.reason(),
            "replication is in error; replication is behind its RPO alert of 10s by 4s (event 7)"
        );
        let n = HealthReport {
            health: Health::Normal,
            reasons: vec![],
        }
        .with(rpo_health(over, 120_000, false, Some(7)));
        assert_eq!(n.health, Health::Warning);
        assert_eq!(human_ms(125_000), "2m05s");
        assert_eq!(human_ms(3_720_000), "1h02m");
    }

    #[test]
    fn cycle_failures_are_rate_limited() {
        // (consecutive, error, last reported, every) -> report
        let table: &[(u32, &str, Option<&str>, u32, bool)] = &[
            (1, "refused", None, 10, true),
            (1, "refused", Some("refused"), 10, true),
            (2, "refused", Some("refused"), 10, false),
            (9, "refused", Some("refused"), 10, false),
            (10, "refused", Some("refused"), 10, true),
            (11, "refused", Some("refused"), 10, false),
            (20, "refused", Some("refused"), 10, true),
            (5, "disk full", Some("refused"), 10, true),
            (5, "refused", None, 10, true),
            (7, "refused", Some("refused"), 0, false),
        ];
        for (i, (n, err, last, every, want)) in table.iter().enumerate() {
            assert_eq!(report_failure(*n, err, *last, *every), *want, "row {i}");
        }
    }
}
