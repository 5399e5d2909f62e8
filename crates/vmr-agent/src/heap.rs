//! The agent's heap policy (glibc's allocator): buffers kept mapped while cycles run, and the
//! free memory given back to the kernel when the last running cycle ends.
//!
//! The data path allocates a buffer per extent (up to 4 MiB: NBD reads, the received
//! extents, TLS records) and frees it once the extent is sent or written. With glibc's default
//! (dynamic) thresholds such buffers were mapped, or the heap's top trimmed, after each one, so
//! every byte of the next one was faulted in and zeroed again: 4-5 % of the agents' CPU in an
//! initial copy. [`keep_buffers_mapped`] serves buffers up to 16 MiB from the heap and gives
//! freed memory back only beyond 64 MiB at the top of an arena; at most 4 arenas (2 per core),
//! so that memory one thread freed is found by the next thread's buffer instead of each thread
//! keeping its own.
//!
//! The price of those thresholds is that the memory of a burst of cycles stayed with the
//! process: with 100 VMs at 30 s (BENCHMARKS.md row 7) the agent's resident memory rose by
//! 25 MB in the first burst and never came down, and each later burst added a little more
//! (fragments of the arenas). So when the data path has nothing left running (no primary
//! cycle, no replica cycle streaming in: [`DataActivity`]), every free page of every arena goes
//! back to the kernel (`malloc_trim`), off the async runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set the allocator's thresholds; call before the runtime's threads exist.
#[allow(unsafe_code)]
pub(crate) fn keep_buffers_mapped() {
    // SAFETY: `mallopt` only sets allocator parameters; called before the runtime's threads
    // exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// The host's running data-path work (primary cycles, incoming replica cycles); when the last
/// piece of it ends, the heap's free pages go back to the kernel.
#[derive(Debug, Clone, Default)]
pub struct DataActivity(Arc<ActivityInner>);

#[derive(Debug, Default)]
struct ActivityInner {
    running: AtomicUsize,
    trimmer: Trimmer,
}

/// One piece of running data-path work; dropped when it ends.
#[derive(Debug)]
pub struct Busy(Arc<ActivityInner>);

impl DataActivity {
    /// Count a piece of work as running until the returned value is dropped.
    pub fn busy(&self) -> Busy {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }

    /// Pieces of work running now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.trimmer.give_back_free_memory();
        }
    }
}

/// Gives the heap's free pages back, one pass at a time.
#[derive(Debug, Default)]
struct Trimmer {
    running: Arc<AtomicBool>,
}

impl Trimmer {
    /// Return every free page of the heap to the kernel on a blocking thread of the current
    /// runtime, unless a pass is already running (or there is no runtime: nothing is done).
    fn give_back_free_memory(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = self.running.clone();
        rt.spawn_blocking(move || {
            trim();
            running.store(false, Ordering::Release);
        });
    }
}

#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` only walks the allocator's own free lists (under its arena locks)
    // and releases free pages; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_anon_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").expect("status");
        s.lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon")
    }

    /// Resident memory is process-wide: the measurement runs in a process of its own, so that
    /// no other test's allocations move it.
    #[test]
    fn a_burst_freed_below_the_trim_threshold_is_given_back() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--ignored", "--exact", "heap::tests::burst_in_own_process"])
            .args(["--test-threads", "1", "--nocapture"])
            .output()
            .expect("run the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "the measurement failed:\n{text}"
        );
    }

    #[test]
    #[ignore = "run by a_burst_freed_below_the_trim_threshold_is_given_back in a process of its own"]
    fn burst_in_own_process() {
        keep_buffers_mapped();
        let before = rss_anon_kib();
        // 32 MiB in 256 KiB buffers, as a burst of cycles holds its extents, each followed by
        // a small allocation that outlives it (the agent's records, connections, logs): the
        // freed buffers are holes between them, not free space at the heap's top
        let mut kept_small = Vec::new();
        let mut held = Vec::new();
        for i in 0..128u8 {
            held.push(vec![i | 1; 256 << 10]);
            kept_small.push(vec![i; 64]);
        }
        let peak = rss_anon_kib();
        assert!(peak >= before + 30 * 1024, "{before} -> {peak} KiB");
        drop(held);
        let kept = rss_anon_kib();
        // below the 64 MiB trim threshold, free() keeps it (what the pass is for)
        assert!(
            kept >= before + 24 * 1024,
            "{before} -> {peak} -> {kept} KiB"
        );
        let t = Trimmer::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            t.give_back_free_memory();
            while t.running.load(Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let after = rss_anon_kib();
        assert!(
            after <= before + 4 * 1024,
            "{before} -> {peak} -> {kept} -> {after} KiB after the pass"
        );
        drop(kept_small);
    }
}
