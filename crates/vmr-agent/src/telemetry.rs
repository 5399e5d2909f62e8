//! Host-wide monitoring telemetry, in memory, since the agent started: per VM (and so per
//! replication relationship) monotonic cycle counters, a cycle-duration histogram and a
//! bounded ring of the last hour's cycles (time, bytes, duration) for charts.
//!
//! Each VM's owner task holds the only [`VmTelemetry`] writer of its VM and records what its
//! machine's statistics say changed after every event (`observe`); readers (the `/metrics`
//! scrape, a dashboard) take copies through [`Telemetry`] without asking the owner, so a busy
//! owner never slows a scrape and a scrape never reads SQLite or deserializes a record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;
use vmr_proto::api::ReplicationStats;

/// Upper bounds (seconds) of the cycle-duration histogram's buckets: cycles of a 5 s to 15 min
/// schedule, from sub-second incremental cycles to an initial copy running past the interval.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

/// How far back the ring of cycles reaches (ms).
pub const HISTORY_MS: u64 = 3_600_000;

/// Most cycles the ring keeps (a 5 s schedule makes 720 an hour; failures add to it).
pub const HISTORY_MAX: usize = 2048;

/// One finished cycle as the ring keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleSample {
    /// When it ended, ms since the epoch.
    pub end_ms: u64,
    /// Bytes shipped (primary) or applied (replica); 0 for a failed cycle.
    pub bytes: u64,
    /// How long it took, ms (0 for a failed cycle: the machine does not time failures).
    pub duration_ms: u64,
    /// It succeeded.
    pub ok: bool,
}

/// One VM's counters since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmCounters {
    /// Cycles that succeeded.
    pub success: u64,
    /// Cycle attempts that failed.
    pub failed: u64,
    /// Intervals that passed without a cycle completing in them.
    pub missed: u64,
    /// Bytes of successful cycles.
    pub shipped_bytes: u64,
    /// Sum of successful cycles' durations, seconds.
    pub duration_sum_secs: f64,
    /// Successful cycles per [`DURATION_BUCKETS`] bound (not cumulative); the last entry counts
    /// those above every bound.
    pub duration_buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Cut time (ms since the epoch) of the last successful cycle seen since the agent
    /// started: its end minus its duration.
    pub last_cut_ms: Option<u64>,
}

impl VmCounters {
    /// The histogram's buckets as prometheus-client encodes them: `(upper bound, count in
    /// this bucket alone)`, the last bound `f64::MAX` (written `+Inf`); the encoder sums them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.duration_buckets
            .iter()
            .enumerate()
            .map(|(i, n)| (DURATION_BUCKETS.get(i).copied().unwrap_or(f64::MAX), *n))
            .collect()
    }
}

#[derive(Debug, Default)]
struct VmData {
    counters: VmCounters,
    history: VecDeque<CycleSample>,
}

/// The counts of a machine's statistics that telemetry follows (what `observe` compares).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    successful: u64,
    errors: u64,
    missed: u64,
    bytes: u64,
    latency_ms: u64,
}

impl Counts {
    /// The followed counts of `stats`.
    pub fn of(stats: &ReplicationStats) -> Counts {
        Counts {
            successful: stats.successful_cycles,
            errors: stats.errors,
            missed: stats.missed_cycles,
            bytes: stats.total_bytes,
            latency_ms: stats.total_latency_ms,
        }
    }
}

/// Every VM's telemetry on this host (shared by the owners and the readers).
#[derive(Debug, Default)]
pub struct Telemetry {
    vms: RwLock<BTreeMap<Uuid, Arc<Mutex<VmData>>>>,
}

impl Telemetry {
    /// The writer of VM `uuid`'s telemetry (its owner's; a VM's owner started again, after a
    /// reverse, continues the counters).
    pub fn writer(&self, uuid: Uuid) -> VmTelemetry {
        let mut map = self.vms.write().unwrap_or_else(|p| p.into_inner());
        VmTelemetry(map.entry(uuid).or_default().clone())
    }

    fn get(&self, uuid: Uuid) -> Option<Arc<Mutex<VmData>>> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uuid)
            .cloned()
    }

    /// VM `uuid`'s counters (a copy).
    pub fn counters(&self, uuid: Uuid) -> Option<VmCounters> {
        let d = self.get(uuid)?;
        let d = d.lock().unwrap_or_else(|p| p.into_inner());
        Some(d.counters.clone())
    }

    /// VM `uuid`'s cycles of the last hour before `now_ms`, oldest first (for a chart).
    pub fn history(&self, uuid: Uuid, now_ms: u64) -> Vec<CycleSample> {
        let Some(d) = self.get(uuid) else {
            return Vec::new();
        };
        let d = d.lock().unwrap_or_else(|p| p.into_inner());
        d.history
            .iter()
            .filter(|s| s.end_ms + HISTORY_MS >= now_ms)
            .copied()
            .collect()
    }

    /// Forget VM `uuid` (it was removed from this host).
    pub fn forget(&self, uuid: Uuid) {
        self.vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uuid);
    }
}

/// The one writer of a VM's telemetry, held by its owner task.
#[derive(Debug)]
pub struct VmTelemetry(Arc<Mutex<VmData>>);

impl VmTelemetry {
    /// Bytes of the last successful cycle seen since the agent started.
    pub fn last_cycle_bytes(&self) -> Option<u64> {
        let d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        d.history.iter().rev().find(|s| s.ok).map(|s| s.bytes)
    }

    /// Cut time of the last successful cycle seen since the agent started (ms since the
    /// epoch).
    pub fn last_cut_ms(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters
            .last_cut_ms
    }

    /// Record what changed between a machine's statistics before an event (`before`) and
    /// after it (`after`), at `now_ms`: succeeded, failed and missed cycles, bytes and the
    /// duration of a succeeded one. A statistics window reset (counts going down) records
    /// nothing.
    pub fn observe(&self, before: Counts, after: Counts, now_ms: u64) {
        if after == before {
            return;
        }
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ok = after.successful.saturating_sub(before.successful);
        let failed = after.errors.saturating_sub(before.errors);
        let missed = after.missed.saturating_sub(before.missed);
        d.counters.failed += failed;
        d.counters.missed += missed;
        for _ in 0..failed {
            d.push(CycleSample {
                end_ms: now_ms,
                bytes: 0,
                duration_ms: 0,
                ok: false,
            });
        }
        if ok == 0 {
            return;
        }
        let bytes = after.bytes.saturating_sub(before.bytes);
        let latency_ms = after.latency_ms.saturating_sub(before.latency_ms);
        // One event completes one cycle; should it ever complete more, they share the totals.
        for i in 0..ok {
            let share = |total: u64| total / ok + u64::from(i < total % ok);
            let (b, ms) = (share(bytes), share(latency_ms));
            let secs = ms as f64 / 1000.0;
            let c = &mut d.counters;
            c.success += 1;
            c.shipped_bytes += b;
            c.duration_sum_secs += secs;
            let slot = DURATION_BUCKETS
                .iter()
                .position(|le| secs <= *le)
                .unwrap_or(DURATION_BUCKETS.len());
            c.duration_buckets[slot] += 1;
            c.last_cut_ms = Some(now_ms.saturating_sub(ms));
            d.push(CycleSample {
                end_ms: now_ms,
                bytes: b,
                duration_ms: ms,
                ok: true,
            });
        }
    }
}

impl VmData {
    fn push(&mut self, s: CycleSample) {
        while self
            .history
            .front()
            .is_some_and(|f| f.end_ms + HISTORY_MS < s.end_ms)
            || self.history.len() >= HISTORY_MAX
        {
            self.history.pop_front();
        }
        self.history.push_back(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(successful: u64, errors: u64, missed: u64, bytes: u64, latency_ms: u64) -> Counts {
        Counts {
            successful,
            errors,
            missed,
            bytes,
            latency_ms,
        }
    }

    #[test]
    fn successes_failures_and_missed_intervals_are_counted_from_the_stats() {
        let t = Telemetry::default();
        let vm = Uuid::from_u128(7);
        let w = t.writer(vm);
        w.observe(counts(0, 0, 0, 0, 0), counts(1, 0, 0, 4096, 3_000), 100_000);
        w.observe(
            counts(1, 0, 0, 4096, 3_000),
            counts(1, 1, 2, 4096, 3_000),
            160_000,
        );
        w.observe(
            counts(1, 1, 2, 4096, 3_000),
            counts(2, 1, 2, 5096, 3_400),
            170_000,
        );
        let c = t.counters(vm).expect("counters");
        assert_eq!(
            (c.success, c.failed, c.missed, c.shipped_bytes),
            (2, 1, 2, 5096)
        );
        assert!(
            (c.duration_sum_secs - 3.4).abs() < 1e-9,
            "{}",
            c.duration_sum_secs
        );
        assert_eq!(c.last_cut_ms, Some(169_600));
        // 0.4 s in the 0.5 bucket, 3 s in the 5 bucket; the last bucket is +Inf.
        let b = c.buckets();
        assert_eq!(b[0], (0.5, 1));
        assert_eq!(b[2], (2.5, 0));
        assert_eq!(b[3], (5.0, 1));
        assert_eq!(*b.last().expect("inf"), (f64::MAX, 0));
        assert_eq!(b.len(), DURATION_BUCKETS.len() + 1);
        // A window reset (counts going down) adds nothing; the counters stay monotonic.
        w.observe(counts(2, 1, 2, 5096, 3_400), counts(0, 0, 0, 0, 0), 180_000);
        assert_eq!(t.counters(vm).expect("counters"), c);
        let h = t.history(vm, 180_000);
        assert_eq!(
            h.iter().map(|s| (s.ok, s.bytes)).collect::<Vec<_>>(),
            vec![(true, 4096), (false, 0), (true, 1000)]
        );
        // A second writer (the owner started again) continues the same counters.
        let w2 = t.writer(vm);
        w2.observe(counts(0, 0, 0, 0, 0), counts(1, 0, 0, 1, 1), 190_000);
        assert_eq!(t.counters(vm).expect("counters").success, 3);
        t.forget(vm);
        assert!(t.counters(vm).is_none());
    }

    #[test]
    fn the_ring_keeps_the_last_hour_and_is_bounded() {
        let t = Telemetry::default();
        let vm = Uuid::from_u128(1);
        let w = t.writer(vm);
        let mut before = Counts::default();
        // 3000 cycles 5 s apart: over four hours.
        for i in 0..3000u64 {
            let after = counts(i + 1, 0, 0, (i + 1) * 10, (i + 1) * 100);
            w.observe(before, after, 1_000_000 + i * 5_000);
            before = after;
        }
        let now = 1_000_000 + 2999 * 5_000;
        let h = t.history(vm, now);
        assert_eq!(h.len(), 721, "one hour of 5 s cycles, both ends");
        assert!(h.windows(2).all(|p| p[0].end_ms < p[1].end_ms));
        assert_eq!(h.last().map(|s| s.end_ms), Some(now));
        // Later reads drop what aged out even without new cycles.
        assert_eq!(t.history(vm, now + HISTORY_MS).len(), 1);
        // Failures at one instant cannot grow the ring past its bound.
        w.observe(
            before,
            Counts {
                errors: 5000,
                ..before
            },
            now,
        );
        assert_eq!(t.history(vm, now).len(), HISTORY_MAX);
        assert_eq!(t.counters(vm).expect("c").failed, 5000);
    }
}
