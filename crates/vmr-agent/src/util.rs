//! Small shared helpers of the agent: the clock and error chains.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error and its sources on one line, outermost first (the one formatter of every crate).
pub use vmr_transport::error_chain as chain;
