//! Child processes that die with the test: [`ChildGuard`] kills (SIGKILL) and reaps its child on
//! drop, so a failing assertion never leaves a QEMU process behind.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {what}")]
pub struct SpawnError {
    /// What was being started.
    pub what: String,
    /// Why `spawn` failed.
    #[source]
    pub source: std::io::Error,
}

/// A running child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    /// Spawn `cmd`; `what` names it in errors.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self, SpawnError> {
        let child = cmd.spawn().map_err(|source| SpawnError {
            what: what.to_owned(),
            source,
        })?;
        Ok(Self {
            child: Some(child),
            what: what.to_owned(),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The child's stdout pipe (spawned with `Stdio::piped()`), once.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// Kill with SIGKILL (an unclean exit) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM and wait up to `timeout` for a clean exit, then SIGKILL.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        signal(c.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                anyhow::bail!("{} did not exit within {timeout:?} of SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait up to `timeout` for the child to exit by itself: its status (the child is then
    /// reaped and this guard empty), or `None` while it still runs.
    pub fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(c) = self.child.as_mut() else {
                return Ok(None);
            };
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The crash signal (SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE) the child died by, once it
    /// has exited by one; `None` while it runs and after any other exit.
    pub fn crashed(&mut self) -> Option<&'static str> {
        use nix::sys::signal::Signal;
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.as_mut()?.try_wait().ok()??;
        let sig = Signal::try_from(status.signal()?).ok()?;
        matches!(
            sig,
            Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGABRT | Signal::SIGILL | Signal::SIGFPE
        )
        .then(|| sig.as_str())
    }
}

/// How many times the harness starts a QEMU program that crashes at start (dead by a crash
/// signal before it was ready). qemu-storage-daemon 10.0.2 was seen to die by SIGSEGV at start
/// when a client connected to its QMP socket at once, as every readiness check here does
/// (`vmr-agent` `failover.rs` `LAUNCH_ATTEMPTS` starts a VM's program again for the same
/// reason; RELIABILITY.md). Nothing but the process exists yet, so starting it again is safe.
pub const START_ATTEMPTS: usize = 3;

/// Start a QEMU program: `spawn` starts it, `ready` waits until it serves. One that died by a
/// crash signal before it was ready is started again, at most [`START_ATTEMPTS`] starts in all
/// (`what` names it in the note on stderr). `Ok(Ok(child))` once ready; `Ok(Err((child, e)))`
/// with the last child (exited, or running but not ready) and `ready`'s error; `Err` when
/// `spawn` failed.
#[allow(clippy::type_complexity)]
pub fn start_again_on_crash<E>(
    what: &str,
    mut spawn: impl FnMut() -> Result<ChildGuard, E>,
    mut ready: impl FnMut(&mut ChildGuard) -> Result<(), E>,
) -> Result<Result<ChildGuard, (ChildGuard, E)>, E> {
    let mut crashes = Vec::new();
    loop {
        let mut child = spawn()?;
        let Err(e) = ready(&mut child) else {
            return Ok(Ok(child));
        };
        match child.crashed() {
            Some(sig) if crashes.len() + 1 < START_ATTEMPTS => {
                crashes.push(sig);
                eprintln!(
                    "{what}: crashed at start ({}); starting it again",
                    crashes.join(", ")
                );
            }
            _ => return Ok(Err((child, e))),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// Wait until `path` exists, up to `timeout`. Not a readiness check for a server socket: its
/// file exists from bind(), before listen(), and a connect in between is refused; wait for
/// the server's greeting instead (`harness::connect_nbd`, `harness::wait_qmp_greeting`).
pub fn wait_for_path(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            anyhow::bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// SIGKILL `pid` (any process, not only a child; a pid that is gone is ignored).
pub fn sigkill(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}
