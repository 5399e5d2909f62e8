//! A primary VM's scheduling parameters and the one validation of `enable` arguments
//! ([`Schedule::from_enable`]): frequency, retention (recovery points or grid, [`check_retention`]), app-consistent interval, automatic
//! resynchronization window and initial replication mode; continuous mode
//! (`--frequency continuous`, [`CONTINUOUS`]): its floor between cycle starts, its missed-cycle
//! target and its retry policy.

use vmr_proto::api::{EnableArgs, InitialMode, ResyncWindow};
use vmr_proto::retain::RetentionGrid;

/// Shortest cycle interval, seconds.
pub const MIN_FREQUENCY_SECS: u64 = 5;
/// Longest cycle interval, seconds (one day).
pub const MAX_FREQUENCY_SECS: u64 = 86_400;
/// The frequency (`EnableArgs::frequency_secs`, `CreateReplica::frequency_secs`) that means
/// continuous mode (`--frequency continuous`): a new cycle starts as soon as the last one is
/// acknowledged, no sooner than [`CONTINUOUS_FLOOR_MS`] after the last one started. (0 was never
/// a valid interval, so an older record never holds it.)
pub const CONTINUOUS: u64 = vmr_proto::api::FREQUENCY_CONTINUOUS;
/// Continuous mode: the shortest time between two cycle starts, ms. A cycle with nothing to
/// ship still costs a QMP transaction, a fleecing node, a TLS request and a commit with fsyncs
/// on the replica, and each makes a recovery point; the floor bounds that idle cost (and the
/// points retention has to thin) at one a second.
pub const CONTINUOUS_FLOOR_MS: u64 = 1_000;
/// Continuous mode: the RPO target, seconds. It is the default RPO alert (twice an interval
/// means nothing without one) and the missed-cycle interval: each whole target that passes
/// without an acknowledged cycle counts one missed cycle.
pub const CONTINUOUS_TARGET_SECS: u64 = 30;
/// Continuous mode: the longest retry delay after failed cycles in a row, ms (from 1 s,
/// doubling: never a hot loop, and a replica back after a short outage is caught up quickly).
pub const CONTINUOUS_RETRY_MAX_MS: u64 = 30_000;
/// Most additional hourly recovery points (Hyper-V's limit).
pub const MAX_RECOVERY_POINTS: u32 = 24;
/// Longest app-consistent interval, hours (Hyper-V's limit).
pub const MAX_APP_CONSISTENT_HOURS: u32 = 12;

/// Scheduling parameters of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Cycle interval in ms (>= 5000); in continuous mode the floor between cycle starts
    /// ([`CONTINUOUS_FLOOR_MS`]).
    pub frequency_ms: u64,
    /// Continuous mode (`--frequency continuous`): the next cycle starts when the last one is
    /// acknowledged (no sooner than `frequency_ms` after it started), and a missed cycle is a
    /// whole [`CONTINUOUS_TARGET_SECS`] without an acknowledged one.
    pub continuous: bool,
    /// Take an app-consistent cycle this often (ms); 0 = never.
    pub app_consistent_every_ms: u64,
    /// First retry delay after a recoverable failure.
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Start a required resynchronization by itself inside this daily window.
    pub auto_resync: Option<ResyncWindow>,
    /// How initial replication gets the first copy across.
    pub initial: InitialKind,
    /// Verify the replica against the primary this often (ms, `--verify-every`); 0 = only
    /// on demand.
    pub verify_every_ms: u64,
}

/// Shortest `--verify-every`, seconds (one hour: a verification reads every disk on both
/// sides).
pub const MIN_VERIFY_EVERY_SECS: u64 = 3_600;

/// How initial replication gets the first copy across (`enable --initial`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InitialKind {
    /// A full cycle over the network.
    #[default]
    Network,
    /// The replica holds a copy already: a resync cycle (block-hash comparison).
    Existing,
    /// A full cycle written to a directory; then wait until the replica imported it.
    Export,
}

/// Why `enable` arguments are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEnable {
    /// Frequency below the minimum.
    #[error("frequency {secs} s is below the {MIN_FREQUENCY_SECS} s minimum")]
    FrequencyTooShort {
        /// The asked frequency.
        secs: u64,
    },
    /// Frequency above the maximum.
    #[error("frequency {secs} s is above the {MAX_FREQUENCY_SECS} s (one day) maximum")]
    FrequencyTooLong {
        /// The asked frequency.
        secs: u64,
    },
    /// Too many recovery points.
    #[error("{count} additional recovery points asked; at most {MAX_RECOVERY_POINTS} are kept")]
    TooManyRecoveryPoints {
        /// The asked count.
        count: u32,
    },
    /// App-consistent interval out of range.
    #[error(
        "an app-consistent point every {hours} h: the interval must be 1 to \
         {MAX_APP_CONSISTENT_HOURS} hours (or 0 for never)"
    )]
    AppConsistentInterval {
        /// The asked interval.
        hours: u32,
    },
    /// The automatic resynchronization window is out of range.
    #[error("automatic resynchronization window {window}: times must be 00:00 to 23:59")]
    ResyncWindow {
        /// The window.
        window: ResyncWindow,
    },
    /// The RPO alert is out of range.
    #[error(
        "RPO alert of {secs} s: it must be at least the frequency ({frequency_secs} s) and at \
         most 30 days"
    )]
    RpoAlert {
        /// The asked alert.
        secs: u64,
        /// The frequency.
        frequency_secs: u64,
    },
    /// Continuous mode asked for an extended relationship (its points are forwarded on an
    /// interval).
    #[error(
        "--frequency continuous is for the primary's relationship only: an extended \
         relationship forwards points on an interval (5 s to 24 h)"
    )]
    ContinuousExtended,
    /// `--verify-every` below the minimum.
    #[error("--verify-every {secs} s is below the {MIN_VERIFY_EVERY_SECS} s (one hour) minimum")]
    VerifyEvery {
        /// The asked interval.
        secs: u64,
    },
    /// Both retention forms were given.
    #[error(
        "--retain and --recovery-points {recovery_points} are exclusive: give the grid alone \
         (or the Hyper-V form alone)"
    )]
    RetainAndRecoveryPoints {
        /// The recovery points given besides the grid.
        recovery_points: u32,
    },
    /// A retention grid without rules.
    #[error("a --retain grid needs at least one PERIOD=COUNT rule")]
    RetainEmpty,
    /// A retention grid naming one period twice.
    #[error("retention period {period} is given twice")]
    RetainDuplicatePeriod {
        /// The period.
        period: String,
    },
    /// The export directory is not an absolute path.
    #[error("--initial export:{dir}: the directory must be an absolute path")]
    ExportDir {
        /// The directory given.
        dir: String,
    },
}

/// The one rule for a retention policy (`enable`, `set`, `points --estimate`): the Hyper-V
/// form at most [`MAX_RECOVERY_POINTS`], or a grid with rules, no period twice, and not both.
pub fn check_retention(
    recovery_points: u32,
    grid: Option<&RetentionGrid>,
) -> Result<(), InvalidEnable> {
    if recovery_points > MAX_RECOVERY_POINTS {
        return Err(InvalidEnable::TooManyRecoveryPoints {
            count: recovery_points,
        });
    }
    let Some(g) = grid else {
        return Ok(());
    };
    if recovery_points > 0 {
        return Err(InvalidEnable::RetainAndRecoveryPoints { recovery_points });
    }
    if g.rules.is_empty() {
        return Err(InvalidEnable::RetainEmpty);
    }
    for (i, r) in g.rules.iter().enumerate() {
        if g.rules[..i].iter().any(|o| o.period == r.period) {
            return Err(InvalidEnable::RetainDuplicatePeriod {
                period: r.period.to_string(),
            });
        }
    }
    Ok(())
}

/// Longest RPO alert, seconds (30 days).
pub const MAX_RPO_ALERT_SECS: u64 = 30 * 86_400;

/// The one rule for an RPO alert (`enable --rpo-alert`, `set --rpo-alert`): at least the
/// frequency (a shorter one would fire between any two cycles), at most
/// [`MAX_RPO_ALERT_SECS`]. `frequency_secs` 0 = unknown (a replica told no frequency yet):
/// only the upper bound and non-zero are checked.
pub fn check_rpo_alert(secs: u64, frequency_secs: u64) -> Result<(), InvalidEnable> {
    if secs == 0 || secs < frequency_secs || secs > MAX_RPO_ALERT_SECS {
        return Err(InvalidEnable::RpoAlert {
            secs,
            frequency_secs,
        });
    }
    Ok(())
}

/// The one rule for `--verify-every` (`enable`, `set`): at least [`MIN_VERIFY_EVERY_SECS`].
pub fn check_verify_every(secs: u64) -> Result<(), InvalidEnable> {
    if secs < MIN_VERIFY_EVERY_SECS {
        return Err(InvalidEnable::VerifyEvery { secs });
    }
    Ok(())
}

/// The one rule for `verify NAME --point ID` on the primary (docs/verify.md): the primary's
/// disks hold the content of now, so only a new cut can be compared; the verify cycle cuts one
/// on top of the replica's latest acknowledged point and compares every block of the new
/// point, which is that point plus the changes since. So `--point` is accepted when it names
/// that latest point (`latest`, the primary's last acknowledged cycle), and for no older one.
pub fn verify_point_accepted(asked: Option<u64>, latest: Option<u64>) -> bool {
    match asked {
        None => true,
        Some(id) => latest == Some(id),
    }
}

/// The one rule for a replication frequency (`enable`, `reverse`, the CLI's parser, the demo):
/// at least [`MIN_FREQUENCY_SECS`], at most [`MAX_FREQUENCY_SECS`].
pub fn check_frequency(secs: u64) -> Result<(), InvalidEnable> {
    if secs < MIN_FREQUENCY_SECS {
        return Err(InvalidEnable::FrequencyTooShort { secs });
    }
    if secs > MAX_FREQUENCY_SECS {
        return Err(InvalidEnable::FrequencyTooLong { secs });
    }
    Ok(())
}

impl Schedule {
    /// A schedule with the given frequency and default retry policy (1 s doubling to 60 s, but
    /// never longer than the frequency).
    pub fn every(frequency_ms: u64) -> Self {
        Self {
            frequency_ms,
            app_consistent_every_ms: 0,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000.min(frequency_ms.max(1_000)),
            auto_resync: None,
            initial: InitialKind::Network,
            verify_every_ms: 0,
            continuous: false,
        }
    }

    /// A continuous schedule: cycles back to back, no sooner than [`CONTINUOUS_FLOOR_MS`]
    /// apart; retries from 1 s doubling to [`CONTINUOUS_RETRY_MAX_MS`].
    pub fn continuous() -> Self {
        Self {
            continuous: true,
            retry_max_ms: CONTINUOUS_RETRY_MAX_MS,
            ..Self::every(CONTINUOUS_FLOOR_MS)
        }
    }

    /// The interval against which missed cycles are counted, ms: the frequency, or in
    /// continuous mode [`CONTINUOUS_TARGET_SECS`].
    pub fn miss_interval_ms(&self) -> u64 {
        if self.continuous {
            CONTINUOUS_TARGET_SECS * 1000
        } else {
            self.frequency_ms
        }
    }

    /// An extended relationship's interval, ms, from its `enable` arguments (validated like
    /// every `enable`; continuous mode is refused there).
    pub fn extended_frequency_ms(args: &EnableArgs) -> Result<u64, InvalidEnable> {
        let s = Self::from_enable(args)?;
        if s.continuous {
            return Err(InvalidEnable::ContinuousExtended);
        }
        Ok(s.frequency_ms)
    }

    /// Validate `enable` arguments (the only place they are checked) and build the schedule.
    pub fn from_enable(args: &EnableArgs) -> Result<Schedule, InvalidEnable> {
        let secs = args.frequency_secs;
        let continuous = secs == CONTINUOUS;
        if !continuous {
            check_frequency(secs)?;
        }
        check_retention(args.recovery_points, args.retain.as_ref())?;
        let hours = args.app_consistent_every_hours;
        if hours > MAX_APP_CONSISTENT_HOURS {
            return Err(InvalidEnable::AppConsistentInterval { hours });
        }
        if let Some(w) = args.auto_resync
            && (w.start_min >= 1440 || w.end_min >= 1440)
        {
            return Err(InvalidEnable::ResyncWindow { window: w });
        }
        if let Some(rpo) = args.rpo_alert_secs {
            check_rpo_alert(rpo, secs)?;
        }
        if let Some(v) = args.verify_every_secs {
            check_verify_every(v)?;
        }
        let initial = match &args.initial {
            InitialMode::Network => InitialKind::Network,
            // A sibling replica that follows holds a copy: resynchronised against.
            InitialMode::Existing | InitialMode::Follow => InitialKind::Existing,
            InitialMode::Export { dir } => {
                if !std::path::Path::new(dir).is_absolute() {
                    return Err(InvalidEnable::ExportDir { dir: dir.clone() });
                }
                InitialKind::Export
            }
        };
        let mut s = if continuous {
            Schedule::continuous()
        } else {
            Schedule::every(secs * 1000)
        };
        s.app_consistent_every_ms = u64::from(hours) * 3_600_000;
        s.auto_resync = args.auto_resync;
        s.initial = initial;
        s.verify_every_ms = args.verify_every_secs.unwrap_or(0).saturating_mul(1000);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_point_is_accepted_only_for_the_latest_point() {
        for (asked, latest, ok) in [
            (None, None, true),
            (None, Some(7), true),
            (Some(7), Some(7), true),
            (Some(6), Some(7), false),
            (Some(8), Some(7), false),
            (Some(1), None, false),
        ] {
            assert_eq!(
                verify_point_accepted(asked, latest),
                ok,
                "{asked:?} {latest:?}"
            );
        }
    }

    #[test]
    fn the_rpo_alert_is_at_least_the_frequency_and_at_most_30_days() {
        assert!(check_rpo_alert(10, 5).is_ok());
        assert!(check_rpo_alert(5, 5).is_ok());
        assert!(check_rpo_alert(4, 5).is_err());
        assert!(check_rpo_alert(0, 0).is_err());
        assert!(check_rpo_alert(MAX_RPO_ALERT_SECS + 1, 5).is_err());
        assert!(check_rpo_alert(7, 0).is_ok());
    }

    fn args() -> EnableArgs {
        EnableArgs {
            name: "vm".into(),
            replica: "127.0.0.1:1".into(),
            replica_fingerprint: "fp".into(),
            frequency_secs: 30,
            recovery_points: 0,
            app_consistent_every_hours: 0,
            exclude_disks: vec![],
            compression: true,
            initial_at_ms: None,
            auto_resync: None,
            initial: InitialMode::Network,
            rpo_alert_secs: None,
            verify_every_secs: None,
            retain: None,
            bandwidth: None,
            auto_failover: None,
        }
    }

    fn grid(spec: &str) -> Option<RetentionGrid> {
        RetentionGrid::parse(spec, false).ok()
    }

    #[test]
    fn enable_table() {
        type Case = (&'static str, fn(&mut EnableArgs), Option<InvalidEnable>);
        let cases: Vec<Case> = vec![
            ("defaults", |_| {}, None),
            ("5 s is the minimum", |a| a.frequency_secs = 5, None),
            (
                "4 s is too short",
                |a| a.frequency_secs = 4,
                Some(InvalidEnable::FrequencyTooShort { secs: 4 }),
            ),
            ("0 is continuous", |a| a.frequency_secs = CONTINUOUS, None),
            (
                "continuous with an RPO alert of 1 s",
                |a| {
                    a.frequency_secs = CONTINUOUS;
                    a.rpo_alert_secs = Some(1);
                },
                None,
            ),
            (
                "continuous with an RPO alert of 0 s",
                |a| {
                    a.frequency_secs = CONTINUOUS;
                    a.rpo_alert_secs = Some(0);
                },
                Some(InvalidEnable::RpoAlert {
                    secs: 0,
                    frequency_secs: 0,
                }),
            ),
            (
                "1 s is too short",
                |a| a.frequency_secs = 1,
                Some(InvalidEnable::FrequencyTooShort { secs: 1 }),
            ),
            ("one day", |a| a.frequency_secs = 86_400, None),
            (
                "a second more than a day",
                |a| a.frequency_secs = 86_401,
                Some(InvalidEnable::FrequencyTooLong { secs: 86_401 }),
            ),
            (
                "more than a day",
                |a| a.frequency_secs = u64::MAX,
                Some(InvalidEnable::FrequencyTooLong { secs: u64::MAX }),
            ),
            ("rpo alert 60 s", |a| a.rpo_alert_secs = Some(60), None),
            (
                "verify weekly",
                |a| a.verify_every_secs = Some(7 * 86_400),
                None,
            ),
            ("verify hourly", |a| a.verify_every_secs = Some(3_600), None),
            (
                "verify more often than hourly",
                |a| a.verify_every_secs = Some(3_599),
                Some(InvalidEnable::VerifyEvery { secs: 3_599 }),
            ),
            (
                "rpo alert = frequency",
                |a| a.rpo_alert_secs = Some(30),
                None,
            ),
            (
                "rpo alert below the frequency",
                |a| a.rpo_alert_secs = Some(29),
                Some(InvalidEnable::RpoAlert {
                    secs: 29,
                    frequency_secs: 30,
                }),
            ),
            ("24 points", |a| a.recovery_points = 24, None),
            (
                "25 points",
                |a| a.recovery_points = 25,
                Some(InvalidEnable::TooManyRecoveryPoints { count: 25 }),
            ),
            (
                "a grid",
                |a| a.retain = grid("1h=24,1d=7,1w=4,1mo=12"),
                None,
            ),
            (
                "a grid and recovery points",
                |a| {
                    a.retain = grid("1h=24");
                    a.recovery_points = 2;
                },
                Some(InvalidEnable::RetainAndRecoveryPoints { recovery_points: 2 }),
            ),
            (
                "an empty grid",
                |a| {
                    a.retain = Some(RetentionGrid {
                        rules: vec![],
                        prefer_app_consistent: true,
                    })
                },
                Some(InvalidEnable::RetainEmpty),
            ),
            (
                "a period twice",
                |a| {
                    let mut g = grid("1h=24").expect("grid");
                    g.rules.push(g.rules[0]);
                    a.retain = Some(g);
                },
                Some(InvalidEnable::RetainDuplicatePeriod {
                    period: "1h".into(),
                }),
            ),
            (
                "app every 12 h",
                |a| a.app_consistent_every_hours = 12,
                None,
            ),
            (
                "app every 13 h",
                |a| a.app_consistent_every_hours = 13,
                Some(InvalidEnable::AppConsistentInterval { hours: 13 }),
            ),
            (
                "window",
                |a| a.auto_resync = Some(ResyncWindow::HYPERV_DEFAULT),
                None,
            ),
            (
                "window out of range",
                |a| {
                    a.auto_resync = Some(ResyncWindow {
                        start_min: 1440,
                        end_min: 0,
                    })
                },
                Some(InvalidEnable::ResyncWindow {
                    window: ResyncWindow {
                        start_min: 1440,
                        end_min: 0,
                    },
                }),
            ),
            (
                "absolute export dir",
                |a| {
                    a.initial = InitialMode::Export {
                        dir: "/media/usb".into(),
                    }
                },
                None,
            ),
            (
                "relative export dir",
                |a| a.initial = InitialMode::Export { dir: "usb".into() },
                Some(InvalidEnable::ExportDir { dir: "usb".into() }),
            ),
        ];
        for (what, edit, want) in cases {
            let mut a = args();
            edit(&mut a);
            assert_eq!(Schedule::from_enable(&a).err(), want, "{what}");
        }
    }

    #[test]
    fn schedule_fields() {
        let mut a = args();
        a.frequency_secs = 300;
        a.app_consistent_every_hours = 4;
        a.auto_resync = Some(ResyncWindow::HYPERV_DEFAULT);
        a.initial = InitialMode::Existing;
        let s = Schedule::from_enable(&a).expect("valid");
        assert_eq!(s.frequency_ms, 300_000);
        assert_eq!(s.app_consistent_every_ms, 4 * 3_600_000);
        assert_eq!(s.auto_resync, Some(ResyncWindow::HYPERV_DEFAULT));
        assert_eq!(s.initial, InitialKind::Existing);
        assert_eq!(s.retry_max_ms, 60_000);
        assert!(!s.continuous);
        assert_eq!(s.miss_interval_ms(), 300_000);
        // A sibling replica that follows (fan-out's failover) is resynchronised, as an
        // existing copy.
        a.initial = InitialMode::parse("follow").expect("parses");
        assert_eq!(a.initial, InitialMode::Follow);
        let s = Schedule::from_enable(&a).expect("valid");
        assert_eq!(s.initial, InitialKind::Existing);
    }

    #[test]
    fn continuous_schedule_fields() {
        let mut a = args();
        a.frequency_secs = CONTINUOUS;
        a.app_consistent_every_hours = 1;
        a.verify_every_secs = Some(3_600);
        let s = Schedule::from_enable(&a).expect("valid");
        assert!(s.continuous);
        assert_eq!(s.frequency_ms, CONTINUOUS_FLOOR_MS);
        assert_eq!(s.miss_interval_ms(), CONTINUOUS_TARGET_SECS * 1000);
        assert_eq!(s.retry_base_ms, 1_000);
        assert_eq!(s.retry_max_ms, CONTINUOUS_RETRY_MAX_MS);
        assert_eq!(s.app_consistent_every_ms, 3_600_000);
        assert_eq!(s.verify_every_ms, 3_600_000);
        // An extended relationship forwards on an interval.
        assert_eq!(
            Schedule::extended_frequency_ms(&a),
            Err(InvalidEnable::ContinuousExtended)
        );
        a.frequency_secs = 300;
        assert_eq!(Schedule::extended_frequency_ms(&a), Ok(300_000));
    }
}
