//! Retention: which recovery points to keep, and why, as a pure function of the points, the
//! policy and the time (UTC only: no time zone, no DST). Two forms (docs/retention.md):
//!
//! Hyper-V's (`--recovery-points N`, [`RetentionPolicy::hourly`]):
//! * The latest point is always kept.
//! * With `hourly = n > 0`, time is cut into UTC hour slots; for the current slot and the `n`
//!   slots before it, the latest point of each slot is kept, and so is the latest
//!   app-consistent (or planned) point of each slot.
//!
//! The grid (`--retain 1h=24,1d=7`, [`RetentionPolicy::grid`]), zrepl-grid / PBS keep-* style:
//! * The latest point is always kept.
//! * Each rule `PERIOD=N` cuts time into epoch-aligned UTC periods (calendar days, ISO weeks
//!   from Monday, calendar months and years; `3h` periods start at multiples of 3 h since the
//!   epoch) and keeps the last point of each of the N most recent periods that hold a point
//!   (a period without a point does not count). With `prefer_app_consistent`, a period that
//!   holds an app-consistent (or planned) point keeps the last such point instead.
//! * Rules are independent: one point may be kept by several (its reasons list them all).
//!
//! Everything else is dropped, and so is every point already marked as being pruned. Pruning
//! the kept set again drops nothing, and pruning after every new point keeps what one prune
//! of the whole history would.

use std::collections::BTreeMap;

use vmr_proto::CycleId;
use vmr_proto::retain::{Period, PeriodUnit, RetentionGrid};
use vmr_proto::store::{PointKind, RetentionPolicy};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const WEEK_MS: u64 = 7 * DAY_MS;

/// What retention needs to know about a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointMeta {
    /// Point id.
    pub id: CycleId,
    /// Time of the cut (ms since the Unix epoch).
    pub taken_at_ms: u64,
    /// Consistency type.
    pub kind: PointKind,
}

/// Why a point is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepReason {
    /// The latest point (always kept).
    Latest,
    /// Hyper-V form: the last point of the hour slot `rank` (1 = the current hour).
    Hourly {
        /// 1-based, newest first.
        rank: u32,
    },
    /// Hyper-V form: the last app-consistent (or planned) point of hour slot `rank`.
    HourlyAppConsistent {
        /// 1-based, newest first.
        rank: u32,
    },
    /// Grid: the point kept for the `rank`-th most recent period (that holds a point) of
    /// `period`.
    Grid {
        /// The rule's period.
        period: Period,
        /// 1-based, newest first.
        rank: u32,
    },
}

impl std::fmt::Display for KeepReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepReason::Latest => f.write_str("latest"),
            KeepReason::Hourly { rank } => write!(f, "hourly #{rank}"),
            KeepReason::HourlyAppConsistent { rank } => write!(f, "hourly app-consistent #{rank}"),
            KeepReason::Grid { period, rank } => write!(f, "{period} #{rank}"),
        }
    }
}

/// What a policy keeps and drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Kept points with their reasons (never empty for a kept point), by id.
    pub keep: BTreeMap<CycleId, Vec<KeepReason>>,
    /// The ids of the points to drop, ascending. Never the latest (highest id) point.
    pub drop: Vec<CycleId>,
}

/// The ids of the points to drop, ascending. Never contains the latest (highest id) point.
pub fn retention(points: &[PointMeta], policy: &RetentionPolicy, now_ms: u64) -> Vec<CycleId> {
    plan(points, policy, now_ms).drop
}

/// Which points `policy` keeps at `now_ms`, and why; the others are to be dropped.
pub fn plan(points: &[PointMeta], policy: &RetentionPolicy, now_ms: u64) -> Plan {
    let Some(latest) = points.iter().map(|p| p.id).max() else {
        return Plan::default();
    };
    let mut keep: BTreeMap<CycleId, Vec<KeepReason>> = BTreeMap::new();
    keep.entry(latest).or_default().push(KeepReason::Latest);
    match &policy.grid {
        Some(g) => grid(points, g, &mut keep),
        None => hourly(points, policy.hourly, now_ms, &mut keep),
    }
    let mut drop: Vec<CycleId> = points
        .iter()
        .map(|p| p.id)
        .filter(|id| !keep.contains_key(id))
        .collect();
    drop.sort_unstable();
    Plan { keep, drop }
}

/// Hyper-V's form: the current hour slot and the `hours` before it.
fn hourly(
    points: &[PointMeta],
    hours: u32,
    now_ms: u64,
    keep: &mut BTreeMap<CycleId, Vec<KeepReason>>,
) {
    if hours == 0 {
        return;
    }
    let now_slot = now_ms / HOUR_MS;
    let first_slot = now_slot.saturating_sub(u64::from(hours));
    let mut best: BTreeMap<u64, PointMeta> = BTreeMap::new();
    let mut best_app: BTreeMap<u64, PointMeta> = BTreeMap::new();
    for p in points {
        let slot = (p.taken_at_ms / HOUR_MS).min(now_slot);
        if slot < first_slot {
            continue;
        }
        let newer = |cur: Option<&PointMeta>| {
            cur.is_none_or(|c| (p.taken_at_ms, p.id) > (c.taken_at_ms, c.id))
        };
        if newer(best.get(&slot)) {
            best.insert(slot, *p);
        }
        if p.kind != PointKind::CrashConsistent && newer(best_app.get(&slot)) {
            best_app.insert(slot, *p);
        }
    }
    let rank = |slot: u64| u32::try_from(now_slot - slot + 1).unwrap_or(u32::MAX);
    // Newest slot first, so that a point's reasons read in rank order.
    for (slot, p) in best.iter().rev() {
        keep.entry(p.id)
            .or_default()
            .push(KeepReason::Hourly { rank: rank(*slot) });
    }
    for (slot, p) in best_app.iter().rev() {
        if best.get(slot).map(|b| b.id) != Some(p.id) {
            keep.entry(p.id)
                .or_default()
                .push(KeepReason::HourlyAppConsistent { rank: rank(*slot) });
        }
    }
}

/// The grid: every rule on its own.
fn grid(points: &[PointMeta], g: &RetentionGrid, keep: &mut BTreeMap<CycleId, Vec<KeepReason>>) {
    let mut newest_first: Vec<&PointMeta> = points.iter().collect();
    newest_first.sort_by_key(|p| std::cmp::Reverse((p.taken_at_ms, p.id)));
    for rule in &g.rules {
        // (period index, the period's chosen point), newest period first.
        let mut chosen: Vec<(u64, &PointMeta)> = Vec::new();
        for p in &newest_first {
            let b = period_index(rule.period, p.taken_at_ms);
            match chosen.last_mut() {
                Some((last, c)) if *last == b => {
                    // An older point of the same period: it replaces the chosen one only when
                    // it is app-consistent, preferred, and the chosen one is not.
                    if g.prefer_app_consistent
                        && c.kind == PointKind::CrashConsistent
                        && p.kind != PointKind::CrashConsistent
                    {
                        *c = p;
                    }
                }
                _ => {
                    if chosen.len() >= rule.keep as usize {
                        break;
                    }
                    chosen.push((b, p));
                }
            }
        }
        for (i, (_, p)) in chosen.iter().enumerate() {
            keep.entry(p.id).or_default().push(KeepReason::Grid {
                period: rule.period,
                rank: u32::try_from(i + 1).unwrap_or(u32::MAX),
            });
        }
    }
}

/// The space each point would take once `plan` is carried out: a dropped point's layers are
/// merged into the next point above it, so a kept point's estimate is its own size plus the
/// sizes of the dropped points directly below it (an upper bound: clusters written in both
/// layers are counted twice). `sizes` are (point id, allocated bytes of its own layers).
/// Dropped points are absent from the answer.
pub fn estimate_sizes(sizes: &[(CycleId, u64)], plan: &Plan) -> BTreeMap<CycleId, u64> {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    let mut out = BTreeMap::new();
    let mut carried = 0u64;
    for (id, size) in sorted {
        if plan.keep.contains_key(&id) {
            out.insert(id, size.saturating_add(carried));
            carried = 0;
        } else {
            carried = carried.saturating_add(size);
        }
    }
    out
}

/// The index of the UTC period of length `period` holding time `t_ms` (ms since the epoch):
/// epoch-aligned multiples for seconds to days, ISO weeks (from Monday 00:00 UTC; the epoch
/// was a Thursday), calendar months and years.
pub fn period_index(period: Period, t_ms: u64) -> u64 {
    let n = u64::from(period.n.max(1));
    match period.unit {
        PeriodUnit::Second => t_ms / (n * SECOND_MS),
        PeriodUnit::Minute => t_ms / (n * MINUTE_MS),
        PeriodUnit::Hour => t_ms / (n * HOUR_MS),
        PeriodUnit::Day => t_ms / (n * DAY_MS),
        PeriodUnit::Week => (t_ms + 3 * DAY_MS) / (n * WEEK_MS),
        PeriodUnit::Month => month_index(t_ms) / n,
        PeriodUnit::Year => month_index(t_ms) / (12 * n),
    }
}

/// Months since January 1970 of time `t_ms` (UTC, proleptic Gregorian calendar).
fn month_index(t_ms: u64) -> u64 {
    let (y, m) = year_month(t_ms / DAY_MS);
    (y - 1970) * 12 + (m - 1)
}

/// The UTC year and month (1-12) of day `days` since 1970-01-01 (the civil-from-days
/// computation on 400-year eras of 146097 days, March-based years).
fn year_month(days: u64) -> (u64, u64) {
    // Day 0 of the era count is 0000-03-01; 1970-01-01 is day 719468 of it.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PointKind::{AppConsistent as A, CrashConsistent as C, Planned as P};

    const M: u64 = 60_000;
    const H: u64 = HOUR_MS;

    fn pts(spec: &[(CycleId, u64, PointKind)]) -> Vec<PointMeta> {
        spec.iter()
            .map(|&(id, t, kind)| PointMeta {
                id,
                taken_at_ms: t,
                kind,
            })
            .collect()
    }

    fn pol(hourly: u32) -> RetentionPolicy {
        RetentionPolicy {
            hourly,
            app_consistent_every_hours: None,
            grid: None,
        }
    }

    #[test]
    fn table() {
        let base = 100 * H;
        // (name, points, hourly, now, expected drops)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<(CycleId, u64, PointKind)>, u32, u64, Vec<CycleId>)> = vec![
            ("empty", vec![], 3, base, vec![]),
            (
                "single point is latest",
                vec![(1, base, C)],
                0,
                base,
                vec![],
            ),
            (
                "history 0 keeps only latest",
                vec![(1, base, C), (2, base + M, A), (3, base + 2 * M, C)],
                0,
                base + 3 * M,
                vec![1, 2],
            ),
            (
                "latest kept even if ancient",
                vec![(1, 0, C), (2, H, C)],
                2,
                base,
                vec![1],
            ),
            (
                "one per hour slot, the latest within each",
                vec![
                    (1, base + 10 * M, C),
                    (2, base + 50 * M, C),
                    (3, base + H + 5 * M, C),
                    (4, base + H + 55 * M, C),
                    (5, base + 2 * H + M, C),
                ],
                2,
                base + 2 * H + 2 * M,
                vec![1, 3],
            ),
            (
                "slots older than the window are dropped",
                vec![
                    (1, base, C),
                    (2, base + H, C),
                    (3, base + 2 * H, C),
                    (4, base + 3 * H, C),
                ],
                1,
                base + 3 * H + M,
                vec![1, 2],
            ),
            (
                "app-consistent kept within the window besides the slot's latest",
                vec![
                    (1, base + M, A),
                    (2, base + 30 * M, C),
                    (3, base + H + M, C),
                ],
                1,
                base + H + 2 * M,
                vec![],
            ),
            (
                "app-consistent outside the window dropped",
                vec![(1, base + M, A), (2, base + H, C), (3, base + 3 * H, C)],
                1,
                base + 3 * H + M,
                vec![1, 2],
            ),
            (
                "current hour: latest app-consistent survives until the hour ends",
                vec![
                    (1, base + M, C),
                    (2, base + 2 * M, A),
                    (3, base + 3 * M, C),
                    (4, base + 4 * M, C),
                ],
                1,
                base + 5 * M,
                vec![1, 3],
            ),
            (
                "planned counts like app-consistent",
                vec![(1, base + M, P), (2, base + 2 * M, C)],
                1,
                base + 3 * M,
                vec![],
            ),
            (
                "two app-consistent in one slot keep the newer",
                vec![(1, base + M, A), (2, base + 2 * M, A), (3, base + 3 * M, C)],
                4,
                base + 4 * M,
                vec![1],
            ),
            (
                "future timestamps count as the current slot",
                vec![(1, base + 2 * H, C), (2, base + 3 * H, C)],
                3,
                base,
                vec![1],
            ),
            (
                "24 hourly points over a day of 5-minute cycles",
                (0..(26 * 12))
                    .map(|i| (i + 1, base + i * 5 * M, C))
                    .collect(),
                24,
                base + 26 * H,
                (1..=(26 * 12))
                    .filter(|id| {
                        let slot = (id - 1) * 5 * M / H;
                        // kept: last point of slots 2..=25 (the 24 slots before the current) and latest
                        !((id - 1) % 12 == 11 && slot >= 2) && *id != 26 * 12
                    })
                    .collect(),
            ),
        ];
        for (name, spec, hourly, now, want) in cases {
            let got = retention(&pts(&spec), &pol(hourly), now);
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn never_drops_latest_and_is_idempotent() {
        let mut seed = 0x1234_5678u64;
        for _ in 0..200 {
            let n = (seed % 40) as usize + 1;
            let mut t = 0;
            let mut v = Vec::new();
            for i in 0..n {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t += (seed >> 33) % (2 * H);
                let kind = if (seed >> 20).is_multiple_of(3) { A } else { C };
                v.push(PointMeta {
                    id: i as u64 + 1,
                    taken_at_ms: t,
                    kind,
                });
            }
            let policy = pol((seed % 6) as u32);
            let now = t + (seed >> 40) % H;
            let drop = retention(&v, &policy, now);
            assert!(!drop.contains(&(n as u64)));
            let rest: Vec<PointMeta> = v
                .iter()
                .copied()
                .filter(|p| !drop.contains(&p.id))
                .collect();
            assert!(retention(&rest, &policy, now).is_empty(), "not idempotent");
        }
    }

    fn grid(spec: &str, prefer_app: bool) -> RetentionPolicy {
        RetentionPolicy {
            grid: Some(RetentionGrid::parse(spec, prefer_app).expect("spec")),
            ..RetentionPolicy::default()
        }
    }

    fn reasons(plan: &Plan) -> Vec<(CycleId, String)> {
        plan.keep
            .iter()
            .map(|(id, r)| {
                let r: Vec<String> = r.iter().map(ToString::to_string).collect();
                (*id, r.join(", "))
            })
            .collect()
    }

    const S: u64 = 1_000;
    const D: u64 = DAY_MS;

    #[test]
    fn calendar() {
        // (time, year, month) on both sides of month and year ends, leap days included.
        for (t, y, m) in [
            (0, 1970, 1),
            (1_706_745_599_999, 2024, 1),
            (1_706_745_600_000, 2024, 2),
            (1_709_208_000_000, 2024, 2),
            (1_709_251_200_000, 2024, 3),
            (1_677_628_799_999, 2023, 2),
            (1_677_628_800_000, 2023, 3),
            (951_782_400_000, 2000, 2),
            (1_767_225_599_999, 2025, 12),
            (1_767_225_600_000, 2026, 1),
            (1_796_247_600_000, 2026, 12),
        ] {
            assert_eq!(year_month(t / D), (y, m), "time {t}");
        }
        let week = |t| {
            period_index(
                Period {
                    n: 1,
                    unit: PeriodUnit::Week,
                },
                t,
            )
        };
        // 2026-11-30 is a Monday: its first millisecond starts a week.
        assert_eq!(week(1_795_996_800_000), week(1_795_996_799_999) + 1);
        assert_eq!(week(1_795_996_800_000), week(1_795_996_800_000 + 7 * D - 1));
        // 1970-01-05 was the first Monday after the epoch.
        assert_eq!(week(4 * D - 1), 0);
        assert_eq!(week(4 * D), 1);
    }

    #[test]
    fn grid_table() {
        // Jan 31 2024 23:59:59.999 / Feb 1 00:00 / Feb 29 / Mar 1 (2024 is a leap year).
        let jan31 = 1_706_745_599_999;
        let feb1 = 1_706_745_600_000;
        let feb29 = 1_709_208_000_000;
        let mar1 = 1_709_251_200_000;
        let base = 1_000 * D;
        // (name, points, spec, prefer app-consistent, expected kept ids with reasons)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<(CycleId, u64, PointKind)>,
            &str,
            bool,
            Vec<(CycleId, &str)>,
        )> = vec![
            ("empty", vec![], "1h=3", false, vec![]),
            (
                "latest alone",
                vec![(1, base, C)],
                "1h=3",
                false,
                vec![(1, "latest, 1h #1")],
            ),
            (
                "last point of each of the N most recent periods",
                vec![
                    (1, base + 10 * M, C),
                    (2, base + 50 * M, C),
                    (3, base + H + 5 * M, C),
                    (4, base + H + 55 * M, C),
                    (5, base + 2 * H + M, C),
                    (6, base + 2 * H + 2 * M, C),
                ],
                "1h=2",
                false,
                vec![(4, "1h #2"), (6, "latest, 1h #1")],
            ),
            (
                "a point exactly on a boundary starts the new period",
                vec![(1, base + H - 1, C), (2, base + H, C), (3, base + H + M, C)],
                "1h=2",
                false,
                vec![(1, "1h #2"), (3, "latest, 1h #1")],
            ),
            (
                "periods without points do not count",
                vec![(1, base, C), (2, base + 5 * H, C), (3, base + 9 * H, C)],
                "1h=2",
                false,
                vec![(2, "1h #2"), (3, "latest, 1h #1")],
            ),
            (
                "one point counts for several rules",
                vec![
                    (1, base + 23 * H + 30 * M, C),
                    (2, base + D + H, C),
                    (3, base + D + 2 * H, C),
                    (4, base + D + 2 * H + 10 * M, C),
                ],
                "1h=2,1d=2",
                false,
                vec![(1, "1d #2"), (2, "1h #2"), (4, "latest, 1h #1, 1d #1")],
            ),
            (
                "seconds and minutes",
                (0..12).map(|i| (i + 1, base + i * 5 * S, C)).collect(),
                "10s=3,1min=2",
                false,
                // 10 s periods: ids (1,2) (3,4) ... (11,12); one minute: all.
                vec![
                    (8, "10s #3"),
                    (10, "10s #2"),
                    (12, "latest, 10s #1, 1min #1"),
                ],
            ),
            (
                "months of unequal length, the leap day included",
                vec![
                    (1, jan31, C),
                    (2, feb1, C),
                    (3, feb29, C),
                    (4, mar1, C),
                    (5, mar1 + D, C),
                ],
                "1mo=3",
                false,
                vec![(1, "1mo #3"), (3, "1mo #2"), (5, "latest, 1mo #1")],
            ),
            (
                "two-month periods from January 1970",
                vec![(1, jan31, C), (2, feb1, C), (3, feb29, C), (4, mar1, C)],
                "2mo=5",
                false,
                vec![(3, "2mo #2"), (4, "latest, 2mo #1")],
            ),
            (
                "years",
                vec![
                    (1, 1_767_225_599_999, C),
                    (2, 1_767_225_600_000, C),
                    (3, 1_796_247_600_000, C),
                ],
                "1y=2",
                false,
                vec![(1, "1y #2"), (3, "latest, 1y #1")],
            ),
            (
                "app-consistent preferred within a period, the latest kept anyway",
                vec![
                    (1, base + M, C),
                    (2, base + 2 * M, A),
                    (3, base + 3 * M, A),
                    (4, base + 4 * M, C),
                    (5, base + H + M, C),
                    (6, base + H + 2 * M, C),
                ],
                "1h=2",
                true,
                vec![(3, "1h #2"), (6, "latest, 1h #1")],
            ),
            (
                "without the preference the period's last point wins",
                vec![(1, base + M, A), (2, base + 2 * M, C), (3, base + H, C)],
                "1h=2",
                false,
                vec![(2, "1h #2"), (3, "latest, 1h #1")],
            ),
            (
                "planned counts as app-consistent",
                vec![(1, base + M, P), (2, base + 2 * M, C), (3, base + H, C)],
                "1h=2",
                true,
                vec![(1, "1h #2"), (3, "latest, 1h #1")],
            ),
            (
                "the current period's app-consistent point is kept beside the latest",
                vec![(1, base + M, A), (2, base + 2 * M, C)],
                "1h=1",
                true,
                vec![(1, "1h #1"), (2, "latest")],
            ),
            (
                "ties in time are broken by id",
                vec![(1, base, C), (2, base, C), (3, base + H, C)],
                "1h=2",
                false,
                vec![(2, "1h #2"), (3, "latest, 1h #1")],
            ),
        ];
        for (name, spec, rules, prefer, want) in cases {
            let policy = grid(rules, prefer);
            let points = pts(&spec);
            // `now` does not matter to the grid.
            let plan = plan(&points, &policy, base + 100 * D);
            let want: Vec<(CycleId, String)> =
                want.into_iter().map(|(i, r)| (i, r.to_owned())).collect();
            assert_eq!(reasons(&plan), want, "case {name}");
            let kept: Vec<CycleId> = plan.keep.keys().copied().collect();
            let mut all: Vec<CycleId> = kept.iter().chain(&plan.drop).copied().collect();
            all.sort_unstable();
            assert_eq!(
                all,
                points.iter().map(|p| p.id).collect::<Vec<_>>(),
                "case {name}"
            );
        }
    }

    #[test]
    fn hourly_reasons() {
        let base = 100 * H;
        let points = pts(&[
            (1, base + M, A),
            (2, base + 30 * M, C),
            (3, base + H + M, C),
            (4, base + H + 2 * M, C),
        ]);
        let p = plan(&points, &pol(1), base + H + 3 * M);
        assert_eq!(
            reasons(&p),
            vec![
                (1, "hourly app-consistent #2".to_owned()),
                (2, "hourly #2".to_owned()),
                (4, "latest, hourly #1".to_owned())
            ]
        );
    }

    /// Random histories under random grids: the latest is kept, pruning the kept set again
    /// drops nothing, and pruning after every new point keeps what one prune of the whole
    /// history keeps.
    #[test]
    fn grid_is_idempotent_and_incremental() {
        let specs = [
            "1h=3",
            "10s=3,1min=2",
            "1h=24,1d=7,1w=4,1mo=12",
            "2h=2,1d=1",
            "1d=3,1mo=2,1y=1",
            "30min=4,1w=2",
        ];
        let mut seed = 0x9e37_79b9u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        for round in 0..300 {
            let spec = specs[round % specs.len()];
            let policy = grid(spec, round % 2 == 1);
            let n = (next() % 60) as usize + 1;
            let step = [5 * S, 7 * M, 3 * H, 2 * D, 9 * D][(next() % 5) as usize];
            let mut t = 1_700_000_000_000 + next() % D;
            let mut all = Vec::new();
            let mut incremental: Vec<PointMeta> = Vec::new();
            for i in 0..n {
                t += next() % (2 * step) + 1;
                let kind = if next() % 4 == 0 { A } else { C };
                let p = PointMeta {
                    id: i as u64 + 1,
                    taken_at_ms: t,
                    kind,
                };
                all.push(p);
                incremental.push(p);
                let drop = retention(&incremental, &policy, t);
                assert!(!drop.contains(&p.id), "latest dropped ({spec})");
                incremental.retain(|q| !drop.contains(&q.id));
            }
            let once = plan(&all, &policy, t);
            let kept: Vec<CycleId> = once.keep.keys().copied().collect();
            let inc: Vec<CycleId> = incremental.iter().map(|p| p.id).collect();
            assert_eq!(inc, kept, "incremental differs from one prune ({spec})");
            let again = plan(&incremental, &policy, t);
            assert!(again.drop.is_empty(), "not idempotent ({spec})");
            assert_eq!(again.keep, once.keep, "reasons changed ({spec})");
        }
    }

    #[test]
    fn estimates_carry_dropped_layers_up() {
        let points = pts(&[
            (1, 0, C),
            (2, H, C),
            (3, H + M, C),
            (4, 2 * H, C),
            (5, 2 * H + M, C),
        ]);
        let p = plan(&points, &grid("1h=2", false), 0);
        assert_eq!(p.drop, vec![1, 2, 4]);
        let est = estimate_sizes(&[(1, 1000), (2, 10), (3, 20), (4, 30), (5, 40)], &p);
        assert_eq!(est, BTreeMap::from([(3, 1030), (5, 70)]));
    }
}
