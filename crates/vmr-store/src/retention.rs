//! Retention: which recovery points to drop, as a pure function of the points, the policy and
//! the time (Hyper-V semantics).
//!
//! * The latest point is always kept.
//! * With `hourly = n > 0`, time is cut into UTC hour slots; for the current slot and the `n`
//!   slots before it, the latest point of each slot is kept, and so is the latest
//!   app-consistent (or planned) point of each slot.
//! * Everything else is dropped, and so is every point already marked as being pruned.

use vmr_proto::CycleId;
use vmr_proto::store::{PointKind, RetentionPolicy};

const HOUR_MS: u64 = 3_600_000;

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

/// The ids of the points to drop, ascending. Never contains the latest (highest id) point.
pub fn retention(points: &[PointMeta], policy: &RetentionPolicy, now_ms: u64) -> Vec<CycleId> {
    let Some(latest) = points.iter().map(|p| p.id).max() else {
        return Vec::new();
    };
    let mut keep = std::collections::BTreeSet::from([latest]);
    if policy.hourly > 0 {
        let now_slot = now_ms / HOUR_MS;
        let first_slot = now_slot.saturating_sub(u64::from(policy.hourly));
        let mut best: std::collections::BTreeMap<u64, PointMeta> = Default::default();
        let mut best_app: std::collections::BTreeMap<u64, PointMeta> = Default::default();
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
        keep.extend(best.values().chain(best_app.values()).map(|p| p.id));
    }
    let mut drop: Vec<CycleId> = points
        .iter()
        .map(|p| p.id)
        .filter(|id| !keep.contains(id))
        .collect();
    drop.sort_unstable();
    drop
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
}
