//! The primary's data path runtime: the threads that carry cycles (capture reads, hashing,
//! compression, encryption, sending), kept apart from the control plane's runtime so that
//! their CPU priority can be lowered (`cpu-priority = "low"`) without slowing the control
//! socket, the peer API, the leases or the monitoring listener. Owns that runtime, the ids of
//! its threads and the priority they run at.
//!
//! A thread is registered and given the priority in force when it starts (workers and
//! blocking threads alike, both on the thread itself), and forgotten when it stops; a changed
//! priority is applied to every registered thread under the same lock, so no thread misses it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use vmr_proto::api::CpuPriority;

use crate::errors::AgentError;

/// The data path's threads and the priority they run at.
struct Threads {
    /// The nice value the agent started with: what `normal` keeps.
    base: i32,
    inner: Mutex<ThreadsInner>,
}

#[derive(Default)]
struct ThreadsInner {
    priority: CpuPriority,
    tids: BTreeSet<i32>,
}

impl Threads {
    fn lock(&self) -> std::sync::MutexGuard<'_, ThreadsInner> {
        // Nothing is left half-done under this lock: a panic cannot poison a useful state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On a thread that starts: register it and give it the priority in force.
    fn started(&self) {
        let tid = nix::unistd::gettid().as_raw();
        let mut inner = self.lock();
        inner.tids.insert(tid);
        if let Err(e) = set_nice(tid, inner.priority.nice(self.base)) {
            tracing::warn!(error = %e, tid, "cannot set a data path thread's CPU priority");
        }
    }

    /// On a thread that stops.
    fn stopped(&self) {
        let tid = nix::unistd::gettid().as_raw();
        self.lock().tids.remove(&tid);
    }
}

/// The calling thread's nice value (`getpriority(PRIO_PROCESS, 0)`).
#[allow(unsafe_code)]
fn own_nice() -> std::io::Result<i32> {
    // SAFETY: errno is this thread's; getpriority reads no memory of ours. -1 is a valid nice
    // value, so errno tells an error apart.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        let e = std::io::Error::last_os_error();
        if n == -1 && e.raw_os_error() != Some(0) {
            Err(e)
        } else {
            Ok(n)
        }
    }
}

/// `setpriority(PRIO_PROCESS, tid, nice)`: on Linux the nice value of that one thread.
#[allow(unsafe_code)]
fn set_nice(tid: i32, nice: i32) -> std::io::Result<()> {
    let id =
        libc::id_t::try_from(tid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: setpriority reads no memory of ours; a wrong id only makes it fail.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, id, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The nice value in a `/proc/.../stat` line: field 19, counted after the ")" that ends the
/// command name.
#[cfg(test)]
fn stat_nice(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
}

/// The data path runtime, owned by `run_blocking`: dropped after the control plane's runtime.
pub struct DataPath {
    rt: tokio::runtime::Runtime,
    threads: Arc<Threads>,
}

impl DataPath {
    /// Start the runtime (two workers, like the control plane's), at normal priority: the nice
    /// value of the calling thread (the agent's own).
    pub fn start() -> Result<DataPath, AgentError> {
        let base = own_nice().map_err(|source| AgentError::System {
            doing: "reading the agent's CPU priority",
            source,
        })?;
        let threads = Arc::new(Threads {
            base,
            inner: Mutex::new(ThreadsInner::default()),
        });
        let (on_start, on_stop) = (threads.clone(), threads.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmr-data")
            .enable_all()
            .on_thread_start(move || on_start.started())
            .on_thread_stop(move || on_stop.stopped())
            .build()
            .map_err(|source| AgentError::System {
                doing: "starting the data path runtime",
                source,
            })?;
        Ok(DataPath { rt, threads })
    }

    /// What the host keeps: where to spawn cycles and how to change their priority.
    pub fn handle(&self) -> DataPathHandle {
        DataPathHandle {
            rt: self.rt.handle().clone(),
            threads: self.threads.clone(),
        }
    }
}

/// Spawns onto the data path runtime and sets its threads' priority.
#[derive(Clone)]
pub struct DataPathHandle {
    rt: tokio::runtime::Handle,
    threads: Arc<Threads>,
}

impl DataPathHandle {
    /// Run `f` on the data path: everything it spawns (blocking work, connection tasks) runs
    /// there too.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(f)
    }

    /// The priority in force.
    pub fn priority(&self) -> CpuPriority {
        self.threads.lock().priority
    }

    /// The nice value `priority` means for this agent.
    pub fn nice_of(&self, priority: CpuPriority) -> i32 {
        priority.nice(self.threads.base)
    }

    /// Give every data path thread, present and future, `priority`. Raising it back (low →
    /// normal) needs `CAP_SYS_NICE` (or a fitting `RLIMIT_NICE`); without it nothing changes
    /// and the error says so.
    pub fn set_priority(&self, priority: CpuPriority) -> Result<(), AgentError> {
        let mut inner = self.threads.lock();
        let before = inner.priority;
        let mut done = Vec::new();
        for &tid in &inner.tids {
            match set_nice(tid, priority.nice(self.threads.base)) {
                Ok(()) => done.push(tid),
                // A thread that ended before it could deregister.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => {
                    for &t in &done {
                        let _ = set_nice(t, before.nice(self.threads.base));
                    }
                    return Err(AgentError::CpuPriority {
                        priority,
                        nice: priority.nice(self.threads.base),
                        source,
                    });
                }
            }
        }
        inner.priority = priority;
        Ok(())
    }

    /// The nice value of each data path thread now.
    #[cfg(test)]
    fn nice_values(&self) -> Vec<(i32, i32)> {
        let inner = self.threads.lock();
        inner
            .tids
            .iter()
            .filter_map(|&tid| {
                let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
                Some((tid, stat_nice(&stat)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `n` blocking jobs of 20 ms at once on the data path (so that blocking threads exist).
    fn blocking_jobs(h: &DataPathHandle, n: usize) {
        h.rt.block_on(async {
            let jobs: Vec<_> = (0..n)
                .map(|_| {
                    tokio::task::spawn_blocking(|| {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    })
                })
                .collect();
            for j in jobs {
                j.await.expect("join");
            }
        });
    }

    #[test]
    fn every_data_path_thread_runs_at_the_priority_in_force() {
        let dp = DataPath::start().expect("start");
        let h = dp.handle();
        // Some work on the workers and on blocking threads, so threads exist.
        blocking_jobs(&h, 4);
        let base = own_nice().expect("own nice");
        assert_eq!(h.nice_of(CpuPriority::Normal), base);
        let before = h.nice_values();
        assert!(before.len() >= 2, "{before:?}");
        assert!(before.iter().all(|&(_, n)| n == base), "{before:?}");

        h.set_priority(CpuPriority::Low).expect("lower");
        assert_eq!(h.priority(), CpuPriority::Low);
        let low = h.nice_values();
        assert!(low.iter().all(|&(_, n)| n == 19), "{low:?}");
        // Threads started after the change get it too: more blocking jobs at once than there
        // are blocking threads yet.
        blocking_jobs(&h, 4);
        blocking_jobs(&h, 12);
        assert!(h.nice_values().len() > low.len());
        assert!(h.nice_values().iter().all(|&(_, n)| n == 19));
        // This test's thread (not a data path thread) is untouched.
        let own = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let own_nice = stat_nice(&own).expect("nice");
        assert_eq!(own_nice, base);

        // Back to normal: needs CAP_SYS_NICE; either it works, or it fails and changes nothing.
        match h.set_priority(CpuPriority::Normal) {
            Ok(()) => {
                assert_eq!(h.priority(), CpuPriority::Normal);
                assert!(h.nice_values().iter().all(|&(_, n)| n == base));
            }
            Err(AgentError::CpuPriority { .. }) => {
                assert_eq!(h.priority(), CpuPriority::Low);
                assert!(h.nice_values().iter().all(|&(_, n)| n == 19));
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// An agent started at a nice value of its own (a service's `Nice=5`): `normal` keeps it,
    /// never raises the data path above the agent.
    #[test]
    fn normal_keeps_the_agents_own_nice_value() {
        let seen = std::thread::spawn(|| {
            set_nice(nix::unistd::gettid().as_raw(), 5).expect("lower this thread");
            let dp = DataPath::start().expect("start");
            let h = dp.handle();
            blocking_jobs(&h, 1);
            let started = h.nice_values();
            h.set_priority(CpuPriority::Normal).expect("normal");
            let normal = h.nice_values();
            let low = h.set_priority(CpuPriority::Low).map(|()| h.nice_values());
            (h.nice_of(CpuPriority::Normal), started, normal, low)
        })
        .join()
        .expect("thread");
        let (base, started, normal, low) = seen;
        assert_eq!(base, 5);
        assert!(started.iter().all(|&(_, n)| n == 5), "{started:?}");
        assert!(normal.iter().all(|&(_, n)| n == 5), "{normal:?}");
        let low = low.expect("low");
        assert!(low.iter().all(|&(_, n)| n == 19), "{low:?}");
    }
}
