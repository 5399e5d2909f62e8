//! Free space of a file system, and filling one up with ballast files (full-disk fault tests
//! and the fault campaign).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{HarnessError, Result};

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn available(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| HarnessError::Io {
        what: format!("statvfs {}", path.display()),
        source: e.into(),
    })?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Fill the file system holding `dir` with ballast files in `dir` (their paths are pushed to
/// `ballast`, for the caller to remove) until less than 1 MiB stays free for five looks in a
/// row 20 ms apart (space another process frees meanwhile is taken too), within `limit`.
pub fn fill_fs(dir: &Path, ballast: &mut Vec<PathBuf>, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut full_for = 0;
    while full_for < 5 {
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: format!("the file system of {} to be full", dir.display()),
                after: limit,
                last: None,
            });
        }
        let free = available(dir)?;
        if free < (1 << 20) {
            full_for += 1;
        } else {
            full_for = 0;
            let f = dir.join(format!("ballast{}", ballast.len()));
            // It may fail when the space shrank meanwhile; the loop tries again.
            let _ = Command::new("fallocate")
                .args(["-l", &free.to_string()])
                .arg(&f)
                .status();
            if f.exists() {
                ballast.push(f);
            }
        }
        // A poll of the free space, not a wait for an event: other writers change it.
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
