//! Formatting and parsing helpers of the CLI: times and sizes.

use std::time::UNIX_EPOCH;

use vmr_agent::exit;
use vmr_agent::util::coded;

/// Format ms-since-epoch as RFC 3339 UTC (second precision).
pub fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Parse RFC 3339 into ms since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<u64> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| coded(exit::USAGE, format!("bad time {s:?}: {e}")))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

/// Human size.
pub fn fmt_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
