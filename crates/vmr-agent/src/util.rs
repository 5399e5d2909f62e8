//! Small shared helpers of the agent: the clock, error chains, and what a QEMU program that
//! died at start died of.

/// Milliseconds since the Unix epoch.
pub use vmr_proto::clock::now_ms;

/// An error and its sources on one line, outermost first (the one formatter of every crate).
pub use vmr_transport::error_chain as chain;

/// How many times the agent starts a QEMU program (a failover's VM, the image daemon of
/// `failover prepare`) that dies by a crash signal before its QMP answered, before it gives
/// up. A stressed run saw qemu-storage-daemon 10.0.2 die by SIGSEGV in glib at start (a freed
/// GSource attached), most likely QEMU's QIONetListener race between the monitor's I/O thread
/// taking over the QMP socket and the main thread accepting a client that connected at once
/// (fixed upstream by "qio: Protect NetListener callback with mutex"). It happens before the
/// program touched a guest or a bitmap, so starting it again is safe (docs/failover.md, step 4).
pub const START_ATTEMPTS: usize = 3;

/// The name of the crash signal (SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE) a process that
/// exited with `status` died by; `None` for an exit or any other signal.
pub fn crash_signal(status: &std::process::ExitStatus) -> Option<&'static str> {
    use nix::sys::signal::Signal::*;
    use std::os::unix::process::ExitStatusExt;
    let sig = nix::sys::signal::Signal::try_from(status.signal()?).ok()?;
    matches!(sig, SIGSEGV | SIGBUS | SIGABRT | SIGILL | SIGFPE).then(|| sig.as_str())
}

/// Test hook (cargo feature `test-hooks` only): a file `hook` in the agent directory `dir`
/// holding a number N makes the next N starts it guards crash at start, as QEMU's start-up
/// race does. True when this start is to crash (the count is then one less).
#[cfg(feature = "test-hooks")]
pub fn crash_at_start_hook(dir: &std::path::Path, hook: &str) -> bool {
    let path = dir.join(hook);
    let Some(n) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n > 0)
    else {
        return false;
    };
    let _ = std::fs::write(&path, (n - 1).to_string());
    tracing::warn!(hook, "test hook: the program crashes at start");
    true
}

/// Without the `test-hooks` feature no start is made to crash.
#[cfg(not(feature = "test-hooks"))]
pub fn crash_at_start_hook(_dir: &std::path::Path, _hook: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn only_crash_signals_count_as_a_crash() {
        let signalled = |s: i32| std::process::ExitStatus::from_raw(s);
        assert_eq!(crash_signal(&signalled(11)), Some("SIGSEGV"));
        assert_eq!(crash_signal(&signalled(6)), Some("SIGABRT"));
        assert_eq!(crash_signal(&signalled(9)), None, "SIGKILL is not a crash");
        assert_eq!(crash_signal(&signalled(15)), None, "SIGTERM is not a crash");
        assert_eq!(crash_signal(&signalled(1 << 8)), None, "exit code 1");
    }
}
