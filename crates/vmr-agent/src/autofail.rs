//! Automatic failover's drivers (issue 18, `docs/auto-failover.md`): carries out the
//! decisions of `vmr_core::autofailover`'s [`LeaseHolder`] (the primary's right to run the
//! VM) and gives the replica's owner what it needs to carry out its [`TakeoverWatch`].
//!
//! Owns, on the primary, the per-VM **guard task** ([`spawn_guard`]): it holds the VM's
//! `LeaseHolder`, renews at the witness and asks the replica for its promise every renew
//! period, and fences the VM itself when its right to run runs out (QMP `stop`, or the VM's
//! process killed: by the power-off policy, or when `stop` is not answered within a second).
//! It is a task of its own so that no command the VM's owner runs can postpone a fence; it
//! writes nothing: what must be kept (the epoch, the fence and its reason) goes to the owner
//! as a [`LeaseNote`] on the guard's channel, and the owner writes the record. Also the lease
//! calls (to the witness, to the replica) and the process clock every lease time is measured
//! on ([`mono_ms`]).
//!
//! Also the **fence watchdog** ([`run_fence_watchdog`], `vmreplica fence-watchdog`): a process
//! of its own (its own process group) the guard starts while it holds the right to run and
//! feeds with how long the VM may still run. When the agent dies (killed, crashed, stopped) its
//! end of the pipe closes, and the watchdog fences the VM when the last right it was told of
//! runs out — unless a restarted agent's guard retires it first (pid file `fence-watchdog-<vm
//! uuid>.pid` in the agent's directory). So a dead agent does not leave its VM running while the
//! replica takes over.

use std::io::BufRead;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use vmr_capture::qmp::{Endpoint, QmpClient};
use vmr_core::autofailover::{
    FENCE_MS, HolderAction, HolderEvent, HolderPhase, HolderRefusal, LeaseHolder, LeaseParams,
    TakeoverWatch, WatchPhase,
};
use vmr_proto::lease::{
    AutoFailover, FenceReason, HolderSnapshot, LeaseStatus, PromiseResponse, WitnessRequest,
    WitnessResponse,
};
use vmr_transport::Client;

use crate::errors::AgentError;
use crate::host::Host;

/// Milliseconds of the host's boot clock (`CLOCK_BOOTTIME`) since this process first asked:
/// every lease duration is measured on it, no time crosses a host. Unlike `CLOCK_MONOTONIC`
/// (Rust's `Instant`) it counts the time the host was suspended, so a primary host that is
/// suspended and resumed finds its right to run over (and fences) instead of running on for
/// the time it slept, while the replica may have taken over meanwhile.
pub fn mono_ms() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    let now = boot_ms();
    now.saturating_sub(*BASE.get_or_init(|| now))
}

/// `CLOCK_BOOTTIME` in milliseconds (the monotonic clock should the kernel refuse it: it
/// never does on Linux 2.6.39 or newer).
fn boot_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec().max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec().max(0) as u64 / 1_000_000)
}

/// The longest the guard and the fence watchdog sleep at once: timers run on the monotonic
/// clock, which stops while the host is suspended, so a sleep that spans a suspension ends
/// late by the time slept; waking at least this often bounds how long a resumed host runs the
/// VM past the end of its right.
const MAX_SLEEP_MS: u64 = 200;

fn at(ms: u64) -> tokio::time::Instant {
    // At least 5 ms ahead: a wake-up that changed nothing is never repeated at once; at most
    // MAX_SLEEP_MS (the boot clock may run ahead of the timers' clock).
    let now = mono_ms();
    tokio::time::Instant::now()
        + Duration::from_millis(ms.saturating_sub(now).clamp(5, MAX_SLEEP_MS))
}

/// The lease parameters of `cfg` (its one validation).
pub fn params(cfg: &AutoFailover) -> Result<LeaseParams, AgentError> {
    Ok(LeaseParams::from_auto_failover(
        cfg.auto_failover_ms,
        cfg.power_off,
    )?)
}

/// One call to the witness of `cfg` with this agent's identity, given up after `timeout_ms`.
pub async fn witness_call(
    host: &Host,
    cfg: &AutoFailover,
    call: WitnessRequest,
    timeout_ms: u64,
) -> Result<WitnessResponse, String> {
    let go = async {
        let c = Client::connect(
            &cfg.witness,
            &host.identity,
            &cfg.witness_fingerprint,
            crate::config::client_options(&host.config),
        )
        .await?;
        c.witness(call).await
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), go).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(format!(
            "witness {}: {}",
            cfg.witness,
            crate::util::chain(&e)
        )),
        Err(_) => Err(format!(
            "witness {}: no answer within {timeout_ms} ms",
            cfg.witness
        )),
    }
}

async fn promise_call(
    host: &Host,
    replica: &str,
    fingerprint: &str,
    vm: Uuid,
    timeout_ms: u64,
) -> Result<PromiseResponse, String> {
    let go = async {
        let c = Client::connect(
            replica,
            &host.identity,
            fingerprint,
            crate::config::client_options(&host.config),
        )
        .await?;
        c.promise(vm).await
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), go).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(format!("replica {replica}: {}", crate::util::chain(&e))),
        Err(_) => Err(format!(
            "replica {replica}: no answer within {timeout_ms} ms"
        )),
    }
}

/// A witness answer in words (for messages and events).
pub fn describe(a: &WitnessResponse) -> String {
    match a {
        WitnessResponse::Granted { epoch, lease_ms } => {
            format!("granted (epoch {epoch}, {lease_ms} ms)")
        }
        WitnessResponse::Held {
            epoch,
            by_peer,
            remaining_ms,
        } => format!(
            "held by {} (epoch {epoch}) for {remaining_ms} ms more",
            if *by_peer {
                "the other party"
            } else {
                "this agent"
            }
        ),
        WitnessResponse::Removed => "removed".into(),
        WitnessResponse::Unknown => "the witness knows no lease of this VM".into(),
        WitnessResponse::NotAParty => "this agent is not a party of the VM's lease".into(),
        WitnessResponse::Conflict { reason } => format!("conflict: {reason}"),
    }
}

/// The inode of the socket listening on `path` in one `/proc/.../net/unix` table.
fn listener_inode(table: &str, path: &str, canon: Option<&std::path::Path>) -> Option<String> {
    table.lines().skip(1).find_map(|l| {
        // Num RefCount Protocol Flags Type St Inode Path; a listener has St 01 (unconnected)
        // and the accept flag 00010000.
        let f: Vec<&str> = l.split_whitespace().collect();
        let p = *f.get(7)?;
        let named = p == path || canon.is_some_and(|c| c.as_os_str() == p);
        (named && f.get(3).is_some_and(|fl| fl.ends_with("10000")))
            .then(|| f.get(6).map(|i| (*i).to_owned()))?
    })
}

/// The pid of the process listening on the Unix socket `path` (the VM's QMP socket), found
/// without connecting (a frozen VM's full accept queue would make a connect wait for ever): the
/// listening socket's inode in `/proc/net/unix`, then the process holding it in `/proc/*/fd`.
/// `/proc/net/unix` lists the sockets of the reader's network namespace only: when the VM
/// runs in another one (the agent started in a namespace, the VM outside it, or the reverse),
/// the tables of the other namespaces processes are in (`/proc/PID/net/unix`, one per
/// `/proc/PID/ns/net`) are read too. `None` when nobody listens there.
fn listener_pid(path: &str) -> Option<i32> {
    let canon = std::fs::canonicalize(path).ok();
    let canon = canon.as_deref();
    let own = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let inode = listener_inode(&own, path, canon).or_else(|| {
        let mut seen = std::collections::HashSet::new();
        if let Ok(me) = std::fs::read_link("/proc/self/ns/net") {
            seen.insert(me);
        }
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let ns = std::fs::read_link(e.path().join("ns/net")).ok()?;
            if !seen.insert(ns) {
                return None;
            }
            let table = std::fs::read_to_string(e.path().join("net/unix")).ok()?;
            listener_inode(&table, path, canon)
        })
    })?;
    let want = format!("socket:[{inode}]");
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// Fence the VM whose QMP monitor is `qmp`: QMP `stop` (within a second); when `stop` is not
/// answered (the monitor takes one client, and the capture session holds it while replication
/// runs) or not known (a qemu-storage-daemon), SIGSTOP of the process serving the monitor: the
/// whole VM frozen, no vCPU and no I/O thread runs; with `power_off`, SIGKILL at once. Returns
/// how.
pub async fn fence_vm(qmp: &str, power_off: bool) -> String {
    let pid = listener_pid(qmp);
    if !power_off {
        let stop = async {
            let mut q = QmpClient::connect(&Endpoint::Unix(qmp.into()), Duration::from_secs(1))
                .await
                .map_err(|e| e.to_string())?;
            q.execute_value("stop", None)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_millis(FENCE_MS / 2), stop).await {
            Ok(Ok(_)) => return "paused (QMP stop)".into(),
            Ok(Err(e)) => tracing::warn!(
                qmp,
                "fence: QMP stop failed ({e}); freezing the VM's process"
            ),
            Err(_) => tracing::warn!(
                qmp,
                "fence: QMP stop not answered; freezing the VM's process"
            ),
        }
        return match pid {
            Some(pid) => match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            ) {
                Ok(()) => format!("paused (SIGSTOP of pid {pid}: QMP stop not available)"),
                Err(e) => format!("not fenced: SIGSTOP of pid {pid} failed: {e}"),
            },
            None => "not running (nothing listens on its QMP socket)".into(),
        };
    }
    match pid {
        Some(pid) => {
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                Ok(()) => format!("killed (SIGKILL of pid {pid})"),
                Err(e) => format!("not fenced: SIGKILL of pid {pid} failed: {e}"),
            }
        }
        None => "not running (nothing listens on its QMP socket)".into(),
    }
}

/// What the guard tells the VM's owner (which writes the record and answers `status`). The
/// notes of one step go out in order and the lease's status last, so the owner shows a phase
/// only once it has acted on what led to it (a "fenced" beside a replicating state was seen
/// when the guard published its status itself).
#[derive(Debug)]
pub enum LeaseNote {
    /// What `status` shows of the lease now.
    Status(LeaseStatus),
    /// Keep this snapshot (the epoch changed).
    Snapshot(HolderSnapshot),
    /// The VM was fenced: keep the snapshot, stop replicating, emit the event.
    Fenced {
        /// The snapshot to keep.
        snapshot: HolderSnapshot,
        /// Why.
        reason: FenceReason,
        /// How (paused, killed).
        how: String,
    },
    /// The admin's unfence was granted and the VM resumed: keep the snapshot, replicate again.
    Resumed {
        /// The snapshot to keep.
        snapshot: HolderSnapshot,
        /// How the VM was resumed (or why it could not be).
        how: String,
    },
}

enum GuardMsg {
    Witness {
        seq: u64,
        answer: Result<WitnessResponse, String>,
    },
    Promise {
        seq: u64,
        answer: Result<PromiseResponse, String>,
    },
    Unfence(oneshot::Sender<Result<String, AgentError>>),
    Stop(oneshot::Sender<()>),
}

/// What a guard needs of its VM.
pub struct GuardSetup {
    /// The host (identity, client options).
    pub host: Arc<Host>,
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: Uuid,
    /// The VM's QMP socket (what is fenced).
    pub qmp: String,
    /// The settings.
    pub cfg: AutoFailover,
    /// The replica agent's address.
    pub replica: String,
    /// The replica agent's fingerprint.
    pub replica_fingerprint: String,
    /// The persisted holder.
    pub snapshot: HolderSnapshot,
}

/// The owner's handle of a primary VM's guard task.
pub struct GuardHandle {
    tx: mpsc::UnboundedSender<GuardMsg>,
    /// The guard's notes to the owner.
    pub notes: mpsc::UnboundedReceiver<LeaseNote>,
    /// The lease's status as of the last [`LeaseNote::Status`] the owner took.
    status: LeaseStatus,
}

impl GuardHandle {
    /// For `status`: what the owner has been told so far.
    pub fn status(&self) -> LeaseStatus {
        self.status.clone()
    }

    /// The owner took a [`LeaseNote::Status`].
    pub fn set_status(&mut self, status: LeaseStatus) {
        self.status = status;
    }

    /// The admin's unfence: answered once the witness answered.
    pub async fn unfence(&self, name: &str) -> Result<String, AgentError> {
        let (tx, rx) = oneshot::channel();
        let gone = || AgentError::NoAutoFailover {
            name: name.to_owned(),
        };
        self.tx.send(GuardMsg::Unfence(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Stop the guard (auto-failover off, disable, agent stop): no more renewals, no fence.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(GuardMsg::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Start the guard of a primary VM: restored from `setup.snapshot` (a fenced VM stays fenced;
/// otherwise one run window counts from now and the first renewals go out).
pub fn spawn_guard(setup: GuardSetup) -> Result<GuardHandle, AgentError> {
    let params = params(&setup.cfg)?;
    let holder = LeaseHolder::restore(params, setup.snapshot.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let (note_tx, notes) = mpsc::unbounded_channel();
    let note_tx = late_notes_hook(&setup.host.dir, note_tx);
    let g = Guard {
        setup,
        params,
        holder,
        tx: tx.clone(),
        rx,
        notes: note_tx,
        unfence: None,
        watchdog: None,
    };
    let status = g.lease_status();
    retire_old_watchdog(&g.setup.host, g.setup.uuid, &g.setup.qmp);
    tokio::spawn(g.run());
    Ok(GuardHandle { tx, notes, status })
}

/// Test hook (cargo feature `test-hooks` only): a file of this name in the agent directory
/// holding a number of ms, present when the guard starts, makes its notes reach the owner
/// that much later (in order), as if the owner were slow to take them: a test can look at
/// the status in between.
#[cfg(feature = "test-hooks")]
const LATE_NOTES_HOOK: &str = "test-lease-notes-late-ms";

#[cfg(feature = "test-hooks")]
fn late_notes_hook(
    dir: &std::path::Path,
    to_owner: mpsc::UnboundedSender<LeaseNote>,
) -> mpsc::UnboundedSender<LeaseNote> {
    let Some(ms) = std::fs::read_to_string(dir.join(LATE_NOTES_HOOK))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return to_owner;
    };
    tracing::warn!(ms, "test hook: the guard's notes reach the owner late");
    let (tx, mut rx) = mpsc::unbounded_channel::<LeaseNote>();
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            if to_owner.send(n).is_err() {
                break;
            }
        }
    });
    tx
}

#[cfg(not(feature = "test-hooks"))]
fn late_notes_hook(
    _dir: &std::path::Path,
    to_owner: mpsc::UnboundedSender<LeaseNote>,
) -> mpsc::UnboundedSender<LeaseNote> {
    to_owner
}

struct Guard {
    setup: GuardSetup,
    params: LeaseParams,
    holder: LeaseHolder,
    tx: mpsc::UnboundedSender<GuardMsg>,
    rx: mpsc::UnboundedReceiver<GuardMsg>,
    notes: mpsc::UnboundedSender<LeaseNote>,
    unfence: Option<oneshot::Sender<Result<String, AgentError>>>,
    /// The fence watchdog's pipe while holding, and the last end of the right it was told.
    watchdog: Option<(tokio::process::ChildStdin, u64)>,
}

/// How much later than the guard the watchdog fences (the guard stops it first; both within
/// [`FENCE_MS`] of the end of the right to run).
const WATCHDOG_GRACE_MS: u64 = 300;

fn watchdog_pidfile(host: &Host, vm: Uuid) -> std::path::PathBuf {
    host.dir.join(format!("fence-watchdog-{vm}.pid"))
}

/// SIGKILL the fence watchdog an earlier agent process left for `vm` (its pid file names it,
/// and its command line says it is one, of this VM's monitor).
fn retire_old_watchdog(host: &Host, vm: Uuid, qmp: &str) {
    let file = watchdog_pidfile(host, vm);
    let Some(pid) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("fence-watchdog") && cmdline.contains(qmp) {
        tracing::info!(%vm, pid, "auto-failover: retiring the fence watchdog of an earlier agent process");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(&file);
}

/// Start a fence watchdog for the VM of `qmp`; its pipe.
fn spawn_watchdog(
    host: &Host,
    vm: Uuid,
    qmp: &str,
    power_off: bool,
) -> Option<tokio::process::ChildStdin> {
    let exe = std::env::current_exe().ok()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["fence-watchdog", "--qmp", qmp]);
    if power_off {
        cmd.arg("--power-off");
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%vm, "auto-failover: the fence watchdog did not start: {e}");
            return None;
        }
    };
    if let Some(pid) = child.id() {
        let _ = std::fs::write(watchdog_pidfile(host, vm), pid.to_string());
    }
    let stdin = child.stdin.take();
    // Reaped when it ends (told to stop, or after a fence).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    stdin
}

/// `vmreplica fence-watchdog --qmp PATH [--power-off]`: reads `RUN <ms>` (the VM may run this
/// much longer) and `STOP` (exit, fencing nothing) lines on stdin from the agent's guard; when
/// the last right runs out — the agent alive or not (its end of the pipe closed) — fences the VM
/// of the QMP socket `qmp` as the guard does, and exits. Blocking.
pub fn run_fence_watchdog(qmp: &str, power_off: bool) -> Result<(), AgentError> {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    // The deadline on the boot clock (mono_ms), waited for in slices of at most MAX_SLEEP_MS:
    // a suspension of the host counts as time the right ran out in.
    let mut deadline: Option<u64> = None;
    let slice = |d: u64| Duration::from_millis(d.saturating_sub(mono_ms()).min(MAX_SLEEP_MS));
    loop {
        let got = match deadline {
            Some(d) if mono_ms() >= d => break,
            Some(d) => rx.recv_timeout(slice(d)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(l) if l.trim() == "STOP" => return Ok(()),
            Ok(l) => {
                if let Some(ms) = l
                    .trim()
                    .strip_prefix("RUN ")
                    .and_then(|m| m.parse::<u64>().ok())
                {
                    deadline = Some(mono_ms().saturating_add(ms));
                }
            }
            // The agent is gone: the last right it had stands, no longer.
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(d) = deadline {
                    while mono_ms() < d {
                        std::thread::sleep(slice(d));
                    }
                }
                break;
            }
            // A slice ended: the loop checks the deadline.
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::System {
            doing: "starting a runtime for the fence",
            source,
        })?;
    let how = rt.block_on(fence_vm(qmp, power_off));
    eprintln!("vmreplica fence-watchdog: the right to run the VM of {qmp} ran out: {how}");
    Ok(())
}

fn phase_name(p: HolderPhase) -> &'static str {
    match p {
        HolderPhase::Stopped => "stopped",
        HolderPhase::Holding => "holding",
        HolderPhase::Fenced => "fenced",
        HolderPhase::Unfencing => "unfencing",
    }
}

impl Guard {
    async fn run(mut self) {
        if self.holder.phase() == HolderPhase::Stopped {
            self.step(HolderEvent::Start { now_ms: mono_ms() }).await;
        }
        loop {
            self.feed_watchdog().await;
            self.publish();
            let wake = self.holder.next_wake_ms().map(at);
            let msg = tokio::select! {
                () = async {
                    match wake {
                        Some(w) => tokio::time::sleep_until(w).await,
                        None => std::future::pending().await,
                    }
                } => None,
                m = self.rx.recv() => match m {
                    Some(m) => Some(m),
                    None => break,
                },
            };
            let now_ms = mono_ms();
            let event = match msg {
                None => HolderEvent::Tick { now_ms },
                Some(GuardMsg::Stop(ack)) => {
                    self.stop_watchdog().await;
                    let _ = ack.send(());
                    break;
                }
                Some(GuardMsg::Witness { seq, answer }) => match answer {
                    Ok(answer) => HolderEvent::WitnessAnswer {
                        now_ms,
                        seq,
                        answer,
                    },
                    Err(error) => HolderEvent::Failed { now_ms, seq, error },
                },
                Some(GuardMsg::Promise { seq, answer }) => match answer {
                    Ok(answer) => HolderEvent::PromiseAnswer {
                        now_ms,
                        seq,
                        answer,
                    },
                    Err(error) => HolderEvent::Failed { now_ms, seq, error },
                },
                Some(GuardMsg::Unfence(reply)) => {
                    if self.unfence.is_some() {
                        let _ = reply.send(Err(self.refused(HolderRefusal::Phase {
                            event: "unfence",
                            phase: HolderPhase::Unfencing,
                        })));
                        continue;
                    }
                    self.unfence = Some(reply);
                    HolderEvent::Unfence { now_ms }
                }
            };
            self.step(event).await;
        }
    }

    fn refused(&self, refusal: HolderRefusal) -> AgentError {
        AgentError::Lease {
            name: self.setup.name.clone(),
            refusal,
        }
    }

    async fn step(&mut self, event: HolderEvent) {
        let before = self.holder.phase();
        match self.holder.step(event) {
            Ok(actions) => self.carry_out(actions).await,
            Err(refusal) => {
                if let Some(r) = self.unfence.take() {
                    let _ = r.send(Err(self.refused(refusal)));
                }
                return;
            }
        }
        // The status goes out before the unfence is answered, and the owner takes the notes
        // before it answers the admin: a `status` right after "unfenced" must not still say
        // "unfencing" (a stressed round saw it).
        self.publish();
        if before == HolderPhase::Unfencing
            && let Some(r) = self.unfence.take()
        {
            match self.holder.phase() {
                HolderPhase::Holding => {
                    let _ = r.send(Ok(format!(
                        "{}: unfenced: the witness renewed the lease (epoch {}); the VM runs and replication resumes",
                        self.setup.name,
                        self.holder.snapshot().epoch
                    )));
                }
                HolderPhase::Unfencing => self.unfence = Some(r),
                _ => {
                    let reason = self
                        .holder
                        .status(mono_ms())
                        .fenced
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "no answer".into());
                    let _ = r.send(Err(AgentError::UnfenceRefused {
                        name: self.setup.name.clone(),
                        reason,
                    }));
                }
            }
        }
    }

    async fn carry_out(&mut self, actions: Vec<HolderAction>) {
        for a in actions {
            match a {
                HolderAction::CallWitness {
                    seq,
                    epoch,
                    timeout_ms,
                } => {
                    let call = if epoch == 0 {
                        WitnessRequest::Register {
                            vm: self.setup.uuid,
                            replica: self.setup.replica_fingerprint.clone(),
                            lease_ms: self.params.lease_ms,
                        }
                    } else {
                        WitnessRequest::Renew {
                            vm: self.setup.uuid,
                            epoch,
                        }
                    };
                    let (host, cfg, tx) = (
                        self.setup.host.clone(),
                        self.setup.cfg.clone(),
                        self.tx.clone(),
                    );
                    tokio::spawn(async move {
                        let answer = witness_call(&host, &cfg, call, timeout_ms).await;
                        let _ = tx.send(GuardMsg::Witness { seq, answer });
                    });
                }
                HolderAction::AskPromise { seq, timeout_ms } => {
                    let (host, tx) = (self.setup.host.clone(), self.tx.clone());
                    let (replica, fp, vm) = (
                        self.setup.replica.clone(),
                        self.setup.replica_fingerprint.clone(),
                        self.setup.uuid,
                    );
                    tokio::spawn(async move {
                        let answer = promise_call(&host, &replica, &fp, vm, timeout_ms).await;
                        let _ = tx.send(GuardMsg::Promise { seq, answer });
                    });
                }
                HolderAction::Fence { reason, power_off } => {
                    self.stop_watchdog().await;
                    let how = fence_vm(&self.setup.qmp, power_off).await;
                    tracing::error!(vm = %self.setup.name, %reason, %how, "auto-failover: fenced");
                    let _ = self.notes.send(LeaseNote::Fenced {
                        snapshot: self.holder.snapshot(),
                        reason,
                        how,
                    });
                }
                HolderAction::Resume => {
                    let how = resume_vm(&self.setup.qmp).await;
                    let _ = self.notes.send(LeaseNote::Resumed {
                        snapshot: self.holder.snapshot(),
                        how,
                    });
                }
                HolderAction::Persist => {
                    let _ = self.notes.send(LeaseNote::Snapshot(self.holder.snapshot()));
                }
            }
        }
    }

    async fn stop_watchdog(&mut self) {
        if let Some((mut w, _)) = self.watchdog.take() {
            use tokio::io::AsyncWriteExt;
            let _ = w.write_all(b"STOP\n").await;
            let _ = w.flush().await;
            let _ = std::fs::remove_file(watchdog_pidfile(&self.setup.host, self.setup.uuid));
        }
    }

    /// While holding, the watchdog runs and knows when the right to run ends.
    async fn feed_watchdog(&mut self) {
        use tokio::io::AsyncWriteExt;
        if self.holder.phase() != HolderPhase::Holding {
            return;
        }
        let now = mono_ms();
        let until = now + self.holder.status(now).run_left_ms;
        if self.watchdog.is_none() {
            let s = &self.setup;
            self.watchdog =
                spawn_watchdog(&s.host, s.uuid, &s.qmp, s.cfg.power_off).map(|w| (w, 0));
        }
        if let Some((w, told)) = &mut self.watchdog
            && *told != until
        {
            let line = format!("RUN {}\n", until - now + WATCHDOG_GRACE_MS);
            if let Err(e) = w.write_all(line.as_bytes()).await {
                tracing::error!(vm = %self.setup.name, "auto-failover: the fence watchdog is gone: {e}");
                self.watchdog = None;
            } else {
                *told = until;
            }
        }
    }

    /// The lease's status goes to the owner, after the notes of the step that led to it.
    fn publish(&self) {
        let _ = self.notes.send(LeaseNote::Status(self.lease_status()));
    }

    fn lease_status(&self) -> LeaseStatus {
        let s = self.holder.status(mono_ms());
        LeaseStatus {
            side: "primary".into(),
            phase: phase_name(s.phase).into(),
            witness: self.setup.cfg.witness.clone(),
            auto_failover_ms: self.params.auto_failover_ms,
            point: self.setup.cfg.point,
            epoch: Some(s.epoch),
            run_left_ms: Some(s.run_left_ms),
            fenced: s.fenced,
            silence_ms: None,
            takeover_in_ms: None,
            last_error: s.last_error,
        }
    }
}

/// SIGKILL of a fenced VM's process (become-replica: its images become the replica's), and a
/// wait (at most 5 s) until nothing listens on its QMP socket.
pub async fn end_fenced_vm(qmp: &str) {
    if let Some(pid) = listener_pid(qmp) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while listener_pid(qmp).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A fenced VM runs again: SIGCONT of its process (a VM frozen by SIGSTOP), then QMP `cont` (a
/// VM paused by QMP `stop`); how it went.
async fn resume_vm(qmp: &str) -> String {
    let Some(pid) = listener_pid(qmp) else {
        return "not resumed: nothing listens on its QMP socket (a killed VM must be started again by the admin)".into();
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    );
    let go = async {
        let mut q = QmpClient::connect(&Endpoint::Unix(qmp.into()), Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        q.execute_value("cont", None)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), go).await {
        Ok(Ok(_)) => format!("resumed (SIGCONT of pid {pid}, QMP cont)"),
        Ok(Err(e)) => format!("resumed (SIGCONT of pid {pid}; QMP cont: {e})"),
        Err(_) => format!("resumed (SIGCONT of pid {pid}; QMP cont not answered)"),
    }
}

/// What `status` shows of a replica's takeover watch.
pub fn watch_status(w: &TakeoverWatch, cfg: &AutoFailover) -> LeaseStatus {
    let s = w.status(mono_ms());
    LeaseStatus {
        side: "replica".into(),
        phase: match s.phase {
            WatchPhase::Stopped => "stopped",
            WatchPhase::Watching => "watching",
            WatchPhase::Asking => "asking",
            WatchPhase::TookOver => "took-over",
        }
        .into(),
        witness: cfg.witness.clone(),
        auto_failover_ms: cfg.auto_failover_ms,
        point: cfg.point,
        epoch: None,
        run_left_ms: None,
        fenced: None,
        silence_ms: Some(s.silence_ms),
        takeover_in_ms: s.takeover_in_ms,
        last_error: s
            .last_error
            .or_else(|| s.last_answer.as_ref().map(describe)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/vm.qmp
0000000000000000: 00000003 00000000 00000000 0001 03 4243 /run/vm.qmp
0000000000000000: 00000002 00000000 00010000 0001 01 4244 /run/other.qmp
";

    #[test]
    fn listener_inode_finds_only_the_listening_socket_of_the_path() {
        assert_eq!(
            listener_inode(TABLE, "/run/vm.qmp", None).as_deref(),
            Some("4242")
        );
        assert_eq!(listener_inode(TABLE, "/run/none.qmp", None), None);
        // A connected socket of the path is not its listener.
        let connected: String = TABLE
            .lines()
            .filter(|l| !l.contains(" 4242 "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(listener_inode(&connected, "/run/vm.qmp", None), None);
        // Named through a symlinked directory: its canonical path is in the table.
        assert_eq!(
            listener_inode(
                TABLE,
                "/var/run/vm.qmp",
                Some(std::path::Path::new("/run/vm.qmp"))
            )
            .as_deref(),
            Some("4242")
        );
    }
}
