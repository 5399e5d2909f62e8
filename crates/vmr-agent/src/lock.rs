//! The agent directory's lock: one agent per `--dir`. `DIR/agent.lock` is locked with an
//! exclusive `flock` before the agent does anything else (recovery, `state.db`, binding), and
//! holds the pid of the agent that locked it, so that a second agent can name the running one.
//! The descriptor is close-on-exec: processes the agent starts (VMs, `qemu-nbd`) never hold it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::errors::AgentError;

/// Name of the lock file in the agent directory.
pub const LOCK_FILE: &str = "agent.lock";

/// The held lock of an agent directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Lock `dir` for this process, or fail at once with [`AgentError::AgentRunning`] naming the
    /// pid of the agent that holds it. Changes nothing on disk when the lock is held elsewhere.
    pub fn acquire(dir: &Path) -> Result<DirLock, AgentError> {
        let path = dir.join(LOCK_FILE);
        // std opens with O_CLOEXEC; no truncation before the lock is ours.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(AgentError::io("opening", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                // The holder writes its pid right after locking; an empty read is possible
                // only in that instant.
                let _ = file.read_to_string(&mut text);
                return Err(AgentError::AgentRunning {
                    dir: dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(AgentError::Io {
                    doing: "locking",
                    path,
                    source,
                });
            }
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(AgentError::io("writing the pid to", &path))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acquire, retrying for up to 2 s: a process another test forks in parallel holds a copy
    /// of every descriptor for the instant between its fork and its exec.
    fn acquire_soon(dir: &Path) -> Result<DirLock, AgentError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match DirLock::acquire(dir) {
                Err(AgentError::AgentRunning { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let held = DirLock::acquire(dir.path()).expect("first");
        let path = dir.path().join(LOCK_FILE);
        let before = std::fs::read(&path).expect("read");
        assert_eq!(
            String::from_utf8_lossy(&before).trim(),
            std::process::id().to_string()
        );
        let err = DirLock::acquire(dir.path()).expect_err("second");
        assert!(
            matches!(err, AgentError::AgentRunning { pid: Some(p), .. } if p == std::process::id()),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), crate::exit::AGENT_RUNNING);
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), before);
        drop(held);
        acquire_soon(dir.path()).expect("free again once dropped");
    }

    #[test]
    fn children_do_not_inherit_the_lock() {
        let dir = tempfile::tempdir().expect("dir");
        let held = DirLock::acquire(dir.path()).expect("lock");
        // A child started while the lock is held (as a VM or qemu-nbd would be) ...
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        drop(held);
        // ... must not keep it: had it inherited the descriptor, the flock would stay held
        // for the child's 30 s.
        let again = acquire_soon(dir.path());
        child.kill().expect("kill");
        child.wait().expect("reap");
        again.expect("the child holds no lock");
    }
}
