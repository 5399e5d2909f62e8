//! Sending limits on a cycle body: the byte token bucket ([`TokenBucket`]) and the [`Pace`] a
//! caller hands to [`crate::Client::send_cycle_paced`], asked before each encoded chunk (after
//! compression and framing) goes to HTTP/2, so that the limit holds for the bytes on the wire.
//!
//! The bucket is our own rather than `governor`'s: its rate changes at run time on the next
//! reservation without losing what the bucket holds (a `governor` quota is fixed when the
//! limiter is made), and a reservation may be larger than the burst (a 256 KiB chunk under a
//! small limit): it goes into debt that later callers wait out, in the order they came.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many seconds of sending an idle bucket saves up at most (its burst).
pub const BURST_SECS: f64 = 0.1;

/// A byte token bucket whose rate is given with every reservation (0 = unlimited).
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative = reserved ahead of the rate (callers are waiting).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Option<Instant>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        TokenBucket::new()
    }
}

impl TokenBucket {
    /// An empty bucket (the first bytes under a limit wait for it).
    pub fn new() -> TokenBucket {
        TokenBucket {
            state: Mutex::new(Bucket {
                tokens: 0.0,
                last: None,
            }),
        }
    }

    /// Reserve `n` bytes at `now` under `rate` bytes/s (0 = unlimited): how long the caller
    /// must wait before sending them. The refill up to `now` uses `rate`, so a changed rate
    /// takes effect at once.
    pub fn reserve(&self, n: u64, rate: u64, now: Instant) -> Duration {
        // A poisoned lock holds a plain number: still usable.
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if rate == 0 {
            b.tokens = 0.0;
            b.last = Some(now);
            return Duration::ZERO;
        }
        let rate = rate as f64;
        let burst = (rate * BURST_SECS).max(1.0);
        let elapsed = b
            .last
            .map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = Some(now.max(b.last.unwrap_or(now)));
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }
}

/// What a paced body asks before each chunk: how long to wait before sending `n` bytes.
/// Implementations combine buckets and record the waits.
pub trait Pace: Send + Sync {
    /// Reserve `n` bytes now; the body waits the returned time before sending them.
    fn reserve(&self, n: u64) -> Duration;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_table() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let b = TokenBucket::new();
        // (at ms, bytes, rate, expected wait ms)
        let table: &[(u64, u64, u64, u64)] = &[
            // Empty at first: 1000 bytes at 1000 B/s wait a second.
            (0, 1000, 1000, 1000),
            // Debt: the next 500 wait behind them.
            (0, 500, 1000, 1500),
            // 1.5 s later the debt is paid.
            (1500, 100, 1000, 100),
            // Unlimited: no wait, and the debt is forgotten.
            (1500, 1_000_000, 0, 0),
            // Idle for long: at most the burst (100 ms of the rate) is saved up.
            (10_000, 100, 1000, 0),
            (10_000, 100, 1000, 100),
            // A changed rate applies at once: the 100 ms since refill at 10 kB/s (the 100 B
            // debt paid, 900 B saved), so 2000 B wait for 1100 B more: 110 ms.
            (10_100, 2000, 10_000, 110),
        ];
        for (i, (at, n, rate, want)) in table.iter().enumerate() {
            let got = b.reserve(*n, *rate, ms(*at));
            assert_eq!(got.as_millis() as u64, *want, "row {i}");
        }
    }

    #[test]
    fn sustained_rate_is_the_limit() {
        // A sender that sends whenever allowed: 256 KiB chunks at 8 MB/s over 10 s.
        let b = TokenBucket::new();
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            now += b.reserve(256 << 10, 8_000_000, now);
            sent += 256 << 10;
        }
        let rate = sent as f64 / (now - t0).as_secs_f64();
        assert!((rate / 8e6 - 1.0).abs() < 0.03, "{rate}");
    }
}
