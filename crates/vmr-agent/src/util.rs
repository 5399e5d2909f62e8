//! Small shared helpers of the agent: the clock, error chains, and a QEMU program that dies at
//! start: what it died of, and starting it again.

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

/// Start a QEMU program with `start`, and start it again when it died by a crash signal before
/// its QMP answered (`crashed` names the signal of such an error; any other error is final at
/// once), at most [`START_ATTEMPTS`] starts in all. `again` runs before each further start
/// (the dead start's sockets removed). `what` names the program in the log, `vm` the VM.
///
/// Returns the running start's value with the crash signals of the starts before it (none,
/// normally); or the last start's error with the crash signals of every start, the last one
/// included when it crashed.
pub async fn start_again_on_crash<T, E, F: Future<Output = Result<T, E>>>(
    what: &str,
    vm: &str,
    mut start: impl FnMut() -> F,
    crashed: impl Fn(&E) -> Option<&'static str>,
    mut again: impl FnMut(),
) -> Result<(T, Vec<&'static str>), (E, Vec<&'static str>)> {
    let mut crashes = Vec::new();
    loop {
        let e = match start().await {
            Ok(t) => {
                if !crashes.is_empty() {
                    tracing::warn!(vm, ?crashes, "{what} runs after crashing at start");
                }
                return Ok((t, crashes));
            }
            Err(e) => e,
        };
        let Some(signal) = crashed(&e) else {
            return Err((e, crashes));
        };
        crashes.push(signal);
        if crashes.len() >= START_ATTEMPTS {
            return Err((e, crashes));
        }
        tracing::warn!(
            vm,
            attempt = crashes.len() + 1,
            of = START_ATTEMPTS,
            "{what} crashed at start before its QMP answered ({}); starting it again",
            crashes.join(", ")
        );
        again();
    }
}

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

    /// A fake start: its outcomes in order (`Err(Some(sig))` a crash, `Err(None)` another
    /// failure); counts the starts and the `again` calls.
    async fn run(
        outcomes: &[Result<u32, Option<&'static str>>],
    ) -> (
        Result<(u32, Vec<&'static str>), (Option<&'static str>, Vec<&'static str>)>,
        usize,
        usize,
    ) {
        let mut starts = 0;
        let mut agains = 0;
        let r = start_again_on_crash(
            "the program",
            "vm1",
            || {
                starts += 1;
                let outcome = outcomes[starts - 1];
                async move { outcome }
            },
            |e: &Option<&'static str>| *e,
            || agains += 1,
        )
        .await;
        (r, starts, agains)
    }

    #[tokio::test]
    async fn a_program_that_crashes_at_start_is_started_again_at_most_three_times() {
        let segv = Err(Some("SIGSEGV"));
        // Runs at once: one start, no crashes.
        assert_eq!(run(&[Ok(7)]).await, (Ok((7, vec![])), 1, 0));
        // Crashes twice, then runs: its value and both signals.
        assert_eq!(
            run(&[segv, Err(Some("SIGABRT")), Ok(7)]).await,
            (Ok((7, vec!["SIGSEGV", "SIGABRT"])), 3, 2)
        );
        // Crashes every time: the third crash is final, no fourth start.
        assert_eq!(
            run(&[segv, segv, segv, Ok(7)]).await,
            (Err((Some("SIGSEGV"), vec!["SIGSEGV"; 3])), 3, 2)
        );
        // Any other failure is final at once, after a crash too.
        assert_eq!(run(&[Err(None), Ok(7)]).await, (Err((None, vec![])), 1, 0));
        assert_eq!(
            run(&[segv, Err(None), Ok(7)]).await,
            (Err((None, vec!["SIGSEGV"])), 2, 1)
        );
    }
}
