//! The one end-to-end harness of vmreplica, shared by the `vmreplica` e2e tests, the benchmark
//! runner (`vmr-bench`) and `vmreplica demo`: real agents (the `vmreplica` binary, whose path
//! the caller passes, as child processes with `init` + `agent` in their own directories on
//! 127.0.0.1), qemu-storage-daemon stand-in VMs, guest writers over NBD, and content hashes of
//! disks and replica points. Agents are driven only through the CLI and the control socket.
//!
//! Every wait is for a condition with a deadline, never a sleep that assumes something
//! happened: a server socket counts as ready when its server greets (NBD: the client handshake
//! succeeds; QMP: the greeting line arrives; agent: a status request is answered). Everything
//! started is killed on drop, also processes the agents started that outlive them (failover
//! VMs): [`TestDir`] kills every process whose command line names its directory. Real Linux
//! guests (`guest`) boot the cached test guest of `scripts/build-guest.sh` under QEMU. A private
//! libvirt daemon (`libvirt`) runs libvirt-managed test domains. A three-host network in
//! namespaces (`partition`) runs automatic failover's agents behind links a test cuts; stamp
//! writers and a process monitor (`stamps`) give the evidence that two VMs never ran at once.

mod agent;
mod guest;
mod libvirt;
mod meter;
mod nbd;
mod partition;
mod space;
mod stamps;
mod standin;
mod writer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use agent::{
    Agent, Chain, Pair, TestDir, Witnessed, enable_witnessed, free_port, kill_processes_under, tail,
};
pub use guest::{
    BOOT_TIMEOUT, Check, Console, GuestImage, GuestOptions, GuestVm, Seq, failover_dir,
    failover_qmp, failover_serial, guest_addresses, guest_definition, harness_qmp, parse_check,
    parse_seq,
};
pub use libvirt::{MountNamespaces, PrivateLibvirt, libvirt_unavailable, processes_in_namespaces};
pub use meter::Meter;
pub use nbd::{
    connect_nbd, hash_export, hash_export_async, hash_image, hash_image_async,
    wait_child_qmp_greeting, wait_qmp_greeting, write_noise, write_random, write_seq,
};
pub use partition::{
    Host, Net3, PARTITION_PORT, Partitioned, netns_unavailable, remove_stale_namespaces,
};
pub use space::{available, fill_fs};
pub use stamps::{
    Found, RunMonitor, STAMP_SLOT, Stamp, StampRegion, StampWriter, Timeline, pid_with_arg,
    read_stamps_image, read_stamps_nbd, running,
};
pub use standin::{StandIn, StandInDisk, nbd_socket};
pub use writer::{BLOCK, RoundWriter, Writer, WriterStats, pool, slice};

/// How long a started server may take to greet (generous: parallel tests share few cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// An error of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A process could not be started.
    #[error(transparent)]
    Spawn(#[from] crate::proc::SpawnError),
    /// A file system or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `vmreplica` command exited unsuccessfully.
    #[error("vmreplica {args} failed ({status}): {stderr}\n--- agent log (tail) ---\n{log}")]
    Cli {
        /// The arguments after `--dir DIR`.
        args: String,
        /// Its exit status.
        status: String,
        /// Its stderr.
        stderr: String,
        /// The last lines of the agent's log.
        log: String,
    },
    /// An agent exited or did not answer its control socket in time.
    #[error("the agent in {dir} did not start: {reason}\n--- agent log ---\n{log}", dir = dir.display())]
    AgentStart {
        /// The agent's directory.
        dir: PathBuf,
        /// Exited, or timed out.
        reason: String,
        /// Its log.
        log: String,
    },
    /// The agent answered a control request with an error.
    #[error("agent error: {chain}")]
    Agent {
        /// The agent's error chain, joined.
        chain: String,
    },
    /// Output that should have been JSON of a known shape was not.
    #[error("bad JSON from {what}")]
    Json {
        /// Whose output.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The agent has no status row for the VM.
    #[error("no status row for {vm}")]
    NoStatusRow {
        /// The VM.
        vm: String,
    },
    /// The VM's status shows a cycle but not when the agent recorded it.
    #[error("the status of {vm} has a cycle but no time of it")]
    NoCycleTime {
        /// The VM.
        vm: String,
    },
    /// A condition did not hold before its deadline.
    #[error("timed out after {after:?} waiting for {what}{}", last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// The condition.
        what: String,
        /// The timeout.
        after: Duration,
        /// The last error seen while polling, if any.
        last: Option<String>,
    },
    /// An NBD connection or request failed.
    #[error("NBD {what}")]
    Nbd {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: vmr_nbd::NbdError,
    },
    /// An external tool (qemu-img) failed.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// The command line.
        tool: String,
        /// Its stderr.
        stderr: String,
    },
    /// A process the harness started exited early.
    #[error("{what} exited early; log:\n{log}")]
    Exited {
        /// Which process.
        what: String,
        /// Its log.
        log: String,
    },
    /// The stand-in VM's definition is invalid.
    #[error("stand-in VM definition")]
    Definition(#[from] vmr_proto::vmdef::VmDefinitionError),
    /// A guest writer task failed or panicked.
    #[error("guest writer task")]
    Writer(#[from] tokio::task::JoinError),
    /// A guest writer thread ([`RoundWriter`]) panicked.
    #[error("guest writer thread panicked")]
    WriterThread,
}

/// A `Result` of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Now, ms since the Unix epoch (the clock the agents' cut times use).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Poll `f` every 100 ms until it returns `Ok(true)` or `timeout` passes. An `Err` from `f`
/// counts as "not yet" (an agent restarting, a socket not yet there) and is reported with the
/// timeout if it was the last answer.
pub fn wait_until(timeout: Duration, what: &str, f: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_every(timeout, Duration::from_millis(100), what, f)
}

/// [`wait_until`] with a chosen polling interval; returns when the condition was seen.
pub fn wait_every(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                after: timeout,
                last,
            });
        }
        std::thread::sleep(every);
    }
}

/// A current-thread Tokio runtime for the synchronous helpers.
pub(crate) fn rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("build a tokio runtime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            Ok(n >= 3)
        })
        .expect("condition holds");
        assert_eq!(n, 3);
    }

    #[test]
    fn wait_until_times_out_with_the_last_error() {
        let e = wait_every(
            Duration::from_millis(50),
            Duration::from_millis(10),
            "never",
            || {
                Err(HarnessError::NoStatusRow {
                    vm: "vm9".to_owned(),
                })
            },
        )
        .expect_err("times out");
        let text = e.to_string();
        assert!(text.contains("never") && text.contains("vm9"), "{text}");
    }
}
