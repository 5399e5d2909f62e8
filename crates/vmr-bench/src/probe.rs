//! Machine speed probe: a fixed amount of single-threaded work, timed before every scenario
//! (and before each timed pair of scenario 4), so that a reader can tell a slower machine from
//! slower code when a figure differs between runs, or between the start and the end of one run.
//!
//! Three rates, each of work that vmreplica's data path does per byte: BLAKE3 hashing of
//! memory the cache holds, copying memory that is already mapped, and touching memory freshly
//! mapped (page faults; on a virtual machine whose freed memory goes back to its host, also the
//! host's work to hand it out again). This machine has no CPU performance counters, so the
//! probe stands in for instruction rates the kernel cannot give.

use std::fmt;
use std::hint::black_box;
use std::time::Instant;

/// Bytes hashed per probe (an 8 MiB buffer hashed 32 times).
const HASH_BYTES: usize = 256 << 20;
/// The hash buffer: larger than a core's L2 cache here, smaller than the shared L3.
const HASH_BUF: usize = 8 << 20;
/// Size of each of the two buffers the copy probe copies between.
const COPY_BUF: usize = 256 << 20;
/// Copy passes.
const COPY_PASSES: usize = 2;
/// Freshly mapped bytes touched once per page.
const FRESH_BYTES: usize = 256 << 20;
const PAGE: usize = 4096;

/// One probe's rates, bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub hash: f64,
    pub copy: f64,
    pub fresh: f64,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hash {:.2}, copy {:.1}, fresh memory {:.2} GB/s",
            self.hash / 1e9,
            self.copy / 1e9,
            self.fresh / 1e9
        )
    }
}

/// Runs the probe (about half a second) on the calling thread.
pub fn measure() -> Probe {
    Probe {
        hash: hash_rate(),
        copy: copy_rate(),
        fresh: fresh_rate(),
    }
}

fn rate(bytes: usize, t: Instant) -> f64 {
    bytes as f64 / t.elapsed().as_secs_f64().max(1e-9)
}

fn hash_rate() -> f64 {
    let buf: Vec<u8> = (0..HASH_BUF).map(|i| (i * 131 % 251) as u8).collect();
    let t = Instant::now();
    for _ in 0..HASH_BYTES / HASH_BUF {
        black_box(blake3::hash(black_box(&buf)));
    }
    rate(HASH_BYTES, t)
}

fn copy_rate() -> f64 {
    // Both buffers written once before the clock starts, so only the copy is timed.
    let src = vec![7u8; COPY_BUF];
    let mut dst = vec![1u8; COPY_BUF];
    let t = Instant::now();
    for _ in 0..COPY_PASSES {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    rate(COPY_BUF * COPY_PASSES, t)
}

fn fresh_rate() -> f64 {
    let t = Instant::now();
    // Zeroed allocations of this size are fresh anonymous mappings: every page faults on its
    // first write.
    let mut buf = vec![0u8; FRESH_BYTES];
    for i in (0..FRESH_BYTES).step_by(PAGE) {
        buf[i] = 1;
    }
    black_box(&mut buf);
    let r = rate(FRESH_BYTES, t);
    drop(buf);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rate_is_positive_and_finite_and_shown_in_gb_per_s() {
        let p = measure();
        for r in [p.hash, p.copy, p.fresh] {
            assert!(r.is_finite() && r > 1e6, "{p:?}");
        }
        let s = Probe {
            hash: 4.25e9,
            copy: 10.04e9,
            fresh: 1.5e9,
        }
        .to_string();
        assert_eq!(s, "hash 4.25, copy 10.0, fresh memory 1.50 GB/s");
    }
}
