//! Small shared helpers of the agent: the clock, error chains, file hashes.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::errors::AgentError;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error and its sources on one line, outermost first.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Hex BLAKE3 of a file, streamed.
pub fn blake3_file(path: &std::path::Path) -> Result<String, AgentError> {
    let mut f = std::fs::File::open(path).map_err(AgentError::io("opening", path))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).map_err(AgentError::io("reading", path))?;
    Ok(h.finalize().to_hex().to_string())
}
