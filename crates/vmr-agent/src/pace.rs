//! Sending limits in force on this host: the agent-wide limit ([`AgentPace`], in `Host`,
//! shared by every primary VM's cycles) and each primary VM's own ([`VmPace`], held by its
//! owner and lent to its cycle tasks), each a schedule (`vmr_proto::bandwidth`) read in the
//! agent's zone and a token bucket (`vmr_transport::TokenBucket`). A changed schedule is
//! used by the next reservation, also in a running cycle. [`CyclePace`] is what one cycle's
//! body asks before each chunk: both buckets, and it counts the wait and the bytes for
//! `status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vmr_proto::bandwidth::{BandwidthSchedule, TimeZone};
use vmr_transport::{Pace, TokenBucket};

use crate::util::now_ms;

/// A schedule that can be changed at run time.
#[derive(Default)]
struct Schedule(RwLock<Option<BandwidthSchedule>>);

impl Schedule {
    fn get(&self) -> Option<BandwidthSchedule> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, s: Option<BandwidthSchedule>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn limit_at(&self, unix_ms: u64, zone: TimeZone) -> u64 {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |s| s.limit_at(unix_ms, zone))
    }
}

/// The agent-wide sending limit (config key `bandwidth`, `set --agent --bandwidth`).
pub struct AgentPace {
    schedule: Schedule,
    /// The zone every schedule of this agent is read in (config key `time-zone`).
    pub zone: TimeZone,
    bucket: TokenBucket,
}

impl AgentPace {
    /// The agent's limit from its config.
    pub fn new(schedule: Option<BandwidthSchedule>, zone: TimeZone) -> AgentPace {
        let s = Schedule::default();
        s.set(schedule);
        AgentPace {
            schedule: s,
            zone,
            bucket: TokenBucket::new(),
        }
    }

    /// The schedule in force.
    pub fn schedule(&self) -> Option<BandwidthSchedule> {
        self.schedule.get()
    }

    /// Replace the schedule (`*=0` or `None`: unlimited).
    pub fn set_schedule(&self, s: Option<BandwidthSchedule>) {
        self.schedule.set(s.filter(|s| !s.is_unlimited()));
    }

    /// The agent's limit at `unix_ms`, bytes/s (0 = unlimited).
    pub fn limit_at(&self, unix_ms: u64) -> u64 {
        self.schedule.limit_at(unix_ms, self.zone)
    }
}

/// What one cycle (the last, or the running one) spent under the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleWait {
    /// Time waited for the limit, ms.
    pub wait_ms: u64,
    /// Bytes put on the wire.
    pub wire_bytes: u64,
    /// From the first body chunk to the last one's send time, ms.
    pub send_ms: u64,
}

/// A primary VM's own sending limit and what its last cycle waited for the limits.
#[derive(Default)]
pub struct VmPace {
    schedule: Schedule,
    bucket: TokenBucket,
    waited_us: AtomicU64,
    wire_bytes: AtomicU64,
    /// The first chunk's and the last chunk's send time of the current cycle.
    span: Mutex<Option<(Instant, Instant)>>,
}

impl VmPace {
    /// The VM's schedule.
    #[cfg(test)]
    fn schedule(&self) -> Option<BandwidthSchedule> {
        self.schedule.get()
    }

    /// Replace the VM's schedule (`*=0` or `None`: unlimited).
    pub fn set_schedule(&self, s: Option<BandwidthSchedule>) {
        self.schedule.set(s.filter(|s| !s.is_unlimited()));
    }

    /// The limit in force for this VM at `unix_ms` under `agent`'s: the tighter one.
    #[cfg(test)]
    fn limit_at(&self, agent: &AgentPace, unix_ms: u64) -> u64 {
        vmr_proto::bandwidth::effective_limit(
            self.schedule.limit_at(unix_ms, agent.zone),
            agent.limit_at(unix_ms),
        )
    }

    /// A new cycle starts sending: its counters start at zero.
    pub fn start_cycle(&self) {
        self.waited_us.store(0, Ordering::Relaxed);
        self.wire_bytes.store(0, Ordering::Relaxed);
        *self.span.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// What the last (or the running) cycle spent.
    pub fn last(&self) -> CycleWait {
        let span = *self.span.lock().unwrap_or_else(|p| p.into_inner());
        CycleWait {
            wait_ms: self.waited_us.load(Ordering::Relaxed) / 1000,
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            send_ms: span.map_or(0, |(a, b)| {
                b.saturating_duration_since(a).as_millis() as u64
            }),
        }
    }
}

/// The pace of one cycle's body: the VM's bucket and the agent's, each at its limit in force
/// at the reservation; the body waits for the later of the two.
pub struct CyclePace {
    /// The VM's limit.
    pub vm: Arc<VmPace>,
    /// The agent's limit.
    pub agent: Arc<AgentPace>,
}

impl Pace for CyclePace {
    fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let unix = now_ms();
        let zone = self.agent.zone;
        let vm_rate = self.vm.schedule.limit_at(unix, zone);
        let agent_rate = self.agent.limit_at(unix);
        let wait = self
            .vm
            .bucket
            .reserve(n, vm_rate, now)
            .max(self.agent.bucket.reserve(n, agent_rate, now));
        self.vm
            .waited_us
            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
        self.vm.wire_bytes.fetch_add(n, Ordering::Relaxed);
        let sent_at = now + wait;
        let mut span = self.vm.span.lock().unwrap_or_else(|p| p.into_inner());
        *span = Some(match *span {
            None => (sent_at, sent_at),
            Some((a, b)) => (a, b.max(sent_at)),
        });
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tighter_limit_holds_and_waits_are_counted() {
        let agent = Arc::new(AgentPace::new(
            Some(BandwidthSchedule::parse("*=1M").expect("parse")),
            TimeZone::default(),
        ));
        let vm = Arc::new(VmPace::default());
        vm.set_schedule(Some(BandwidthSchedule::parse("*=500K").expect("parse")));
        assert_eq!(vm.limit_at(&agent, 0), 500_000);
        let p = CyclePace {
            vm: vm.clone(),
            agent: agent.clone(),
        };
        vm.start_cycle();
        // 100 kB at 500 kB/s from an empty bucket: 200 ms.
        let w = p.reserve(100_000);
        assert!((199..=201).contains(&w.as_millis()), "{w:?}");
        let last = vm.last();
        assert_eq!(last.wire_bytes, 100_000);
        assert!((199..=201).contains(&last.wait_ms), "{last:?}");
        // Unlimited VM: the agent's 1 MB/s holds.
        vm.set_schedule(Some(BandwidthSchedule::parse("*=0").expect("parse")));
        assert_eq!(vm.schedule(), None);
        assert_eq!(vm.limit_at(&agent, 0), 1_000_000);
        agent.set_schedule(None);
        assert_eq!(vm.limit_at(&agent, 0), 0);
        assert_eq!(p.reserve(10_000_000), Duration::ZERO);
    }
}
