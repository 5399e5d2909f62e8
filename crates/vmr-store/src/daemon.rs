//! The store's long-lived `qemu-storage-daemon`: started on first use, driven over QMP, it
//! opens each pending layer of a cycle as a block node (`blockdev-add`, its backing chain
//! opened read-only by QEMU from the header) and exports it writable over NBD on the daemon's
//! unix socket (`block-export-add`); when the cycle ends the export and the node are removed
//! again (`block-export-del`, `blockdev-del`), so between cycles the daemon holds no image and
//! no image lock (a prune's `qemu-img` never fights it).
//!
//! The daemon dies with the store process (`PR_SET_PDEATHSIG`, set by the thread that spawns
//! and reaps it, which lives as long as the daemon) and is killed when the store is dropped.
//! Also owns the root's QEMU lock: the store takes an exclusive `flock` on `<root>/qemu.lock`
//! before it starts any QEMU process, and every QEMU process it starts (this daemon,
//! `qemu-img`, `qemu-nbd`: [`child_setup`]) inherits that locked descriptor, so the lock is
//! free only once the store and every QEMU process it started have exited. Once
//! [`Daemon::kill_leftover`] (run by `recover`) has killed what a crashed store left (the pid
//! in `<root>/qemu-storage-daemon.pid` and every process holding the lock file) and then holds
//! the lock itself and has seen them exit, no QEMU process of a crashed store is alive, so
//! none can hold an image lock, whatever moment the crash hit (even before the pid was
//! recorded).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use vmr_capture::qmp::QmpClient;
use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};

use crate::error::{StoreError, ToolFault};
use crate::fsio::pause_point;

/// How the daemon writes a new layer's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteCache {
    /// Through the host's page cache (`cache.direct=off`): best for many small writes (a
    /// 64 KiB extent is a memory copy, the disk sees them merged at the flush).
    Buffered,
    /// `O_DIRECT` (`cache.direct=on`): for large sequential writes (an initial copy), the
    /// daemon skips the copy of every byte into the page cache (measured: about half its CPU
    /// per GiB) and the layer does not fill the host's memory with page cache. Falls back to
    /// [`WriteCache::Buffered`] where the file system refuses `O_DIRECT` (tmpfs). Durability is
    /// the same either way: the commit's NBD FLUSH and fsync still run.
    Direct,
}

/// Whether QEMU's own flushes of a new layer's file reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerFlush {
    /// They do (`cache.no-flush=false`): qcow2 orders its metadata writes with `fdatasync`s
    /// and an NBD FLUSH makes what was written durable. For a layer that outlives an
    /// interrupted cycle (a resync's, kept for the next attempt and flushed as it goes).
    Ordered,
    /// They are skipped (`cache.no-flush=true`): the layer becomes durable only by the store's
    /// fsync of its file in the commit, before the catalog names it. For a layer that is
    /// deleted unread when its cycle does not commit (a full or incremental cycle's), so no
    /// crash before that fsync can expose it. Measured: each new L2 table of a fresh layer
    /// made qcow2 `fdatasync` its file two or three times, each a device flush, while it
    /// held the image's lock, so every write in flight waited; in an initial copy the
    /// daemon's thread sat in `fdatasync` for about 40 % of the transfer with no other
    /// thread of the replication running (BENCHMARKS.md, "Reading the misses", stop 34).
    AtCommit,
}

/// Name of the file in the store root recording the running daemon.
const PID_FILE: &str = "qemu-storage-daemon.pid";
/// Name of the file in the store root the store holds an exclusive `flock` on, through one
/// descriptor every QEMU process it starts inherits (released when the last of them exits).
const LOCK_FILE: &str = "qemu.lock";
/// How far ahead of a layer's data the `preallocate` filter reserves its file (QEMU's
/// default; an O_DIRECT layer only).
const PREALLOC_STEP: u64 = 128 << 20;
/// How many times [`Daemon::start_again_on_crash`] starts a daemon that crashes at start.
const START_ATTEMPTS: usize = 3;

/// The store's socket directory in its root (the daemon's QMP and NBD sockets, the
/// `qemu-nbd` exports' sockets): never the temp dir, so a killed store leaves nothing outside
/// its root, and [`Daemon::kill_leftover`] removes what a dead store left there.
const SOCK_DIR: &str = "sock";
/// Longest socket name the store uses: `nbd-<pid>-<seq>.sock` with a 7-digit pid and a
/// 20-digit sequence number.
const LONGEST_SOCK_NAME: usize = 37;
/// glibc's allocator settings for the daemon (`mallopt` through the environment; other C
/// libraries ignore them). The daemon's NBD server allocates a buffer per write request and
/// frees it after; with glibc's defaults a 4 MiB buffer (an initial copy's extent) came from a
/// fresh mapping or from heap memory trimmed and given back after the last request, so every
/// page of it was faulted in and zeroed again per request (page faults, `clear_page`, unmaps:
/// measured 0.9 -> 0.45-0.55 s of the daemon's CPU per GiB of an initial copy without them).
/// A fixed mmap threshold of 32 MiB (QEMU's largest NBD request) keeps every request buffer on
/// the heap, and a trim threshold of 256 MiB keeps the freed buffers for the next requests:
/// the daemon holds on to its peak of request buffers (at most 64 MiB of writes in flight per
/// writer, `pipeline::MAX_BYTES_IN_FLIGHT`) instead of giving them back between requests.
const DAEMON_MALLOC_ENV: [(&str, &str); 2] = [
    ("MALLOC_MMAP_THRESHOLD_", "33554432"),
    ("MALLOC_TRIM_THRESHOLD_", "268435456"),
];
/// Limit for one QMP command and for the daemon's start.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for a previous daemon of the root to exit (SIGKILLed, it normally takes milliseconds).
pub(crate) const EXIT_WAIT: Duration = Duration::from_secs(60);

static SEQ: AtomicU64 = AtomicU64::new(0);

/// One store's daemon (not running until first used).
pub(crate) struct Daemon {
    root: PathBuf,
    running: tokio::sync::Mutex<Option<Running>>,
    /// The running daemon's process, also for the paths that have no runtime.
    pid: std::sync::Mutex<Option<Proc>>,
    /// A pidfd of the last daemon this store spawned: the next start waits for it to have
    /// exited (a stop gives up waiting after a while).
    last: std::sync::Mutex<Option<Arc<OwnedFd>>>,
    /// The root's QEMU lock, once taken (kept until the store is dropped).
    lock: std::sync::Mutex<Option<Arc<std::fs::File>>>,
    /// Unit tests: this many of the next starts die by SIGSEGV right after the spawn, as
    /// qemu-storage-daemon 10.0.2 was seen to at start.
    #[cfg(test)]
    crash_next_starts: std::sync::atomic::AtomicUsize,
}

/// The QEMU locks this process holds, by store root (for the tools' spawns).
static HELD: std::sync::Mutex<Vec<(PathBuf, std::sync::Weak<std::fs::File>)>> =
    std::sync::Mutex::new(Vec::new());

/// The socket directory of the store rooted at `root`: `<root>/sock`, or, when a socket
/// there could exceed the `sun_path` limit, the shortened directory of the one rule
/// (`vmr_proto::sockpath::socket_dir`).
pub(crate) fn sock_dir(root: &Path) -> PathBuf {
    vmr_proto::sockpath::socket_dir(root.join(SOCK_DIR), root, LONGEST_SOCK_NAME)
}

/// [`sock_dir`], created (mode 0700) if missing.
pub(crate) fn make_sock_dir(root: &Path) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = sock_dir(root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| StoreError::io("create the socket directory", &dir, e))?;
    Ok(dir)
}

/// Remove every socket a dead store of `root` left in its socket directory (call only with
/// the root's QEMU lock held: then no process of an earlier store can still serve one).
fn clear_sock_dir(root: &Path) {
    let dir = sock_dir(root);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| !t.is_dir()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The held QEMU lock of the store whose root contains `path` (a tool's image or working
/// directory), if this process holds it.
pub(crate) fn held_lock_for(path: &Path) -> Option<Arc<std::fs::File>> {
    let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    held.iter()
        .filter(|(root, _)| path.starts_with(root))
        .find_map(|(_, l)| l.upgrade())
}

/// In a child the store forks, before exec (async-signal-safe calls only): keep `lock_fd`
/// (the root's locked QEMU lock) open across exec, make the child die (SIGKILL) with the
/// thread that spawns it, and refuse to exec if the store process `parent` already died
/// (the death signal would never come).
#[allow(unsafe_code)]
pub(crate) fn child_setup(parent: i32, lock_fd: Option<i32>) -> std::io::Result<()> {
    // SAFETY: fcntl(2), prctl(2) and getppid(2) are async-signal-safe and pass no memory.
    unsafe {
        if let Some(fd) = lock_fd {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

struct Running {
    qmp: QmpClient,
    nbd_sock: PathBuf,
    qmp_sock: PathBuf,
    pid: u32,
}

/// One pending layer opened in the daemon and exported writable, with a connected client.
pub(crate) struct DaemonExport {
    node: String,
    /// The nodes under `node` when the daemon created the layer, top first (a preallocate
    /// filter, then the protocol node): added explicitly, so deleted explicitly too, in order.
    below: Vec<String>,
    /// The connected client.
    pub client: NbdClient,
    what: String,
    /// Whether the layer's file is open with `O_DIRECT` ([`WriteCache::Direct`] granted); if
    /// not, the writer starts its writeback during the stream.
    pub direct: bool,
    /// The daemon, to release the nodes if the export is dropped without `finish`/`abort`
    /// (a cancelled future): the daemon must not keep the layer and its chain open.
    daemon: Option<Arc<Daemon>>,
}

impl Drop for DaemonExport {
    fn drop(&mut self) {
        let Some(daemon) = self.daemon.take() else {
            return;
        };
        let node = std::mem::take(&mut self.node);
        let below = std::mem::take(&mut self.below);
        /// Stops the daemon if the release below never completes (its runtime shut down).
        struct Unfinished(Option<Arc<Daemon>>);
        impl Drop for Unfinished {
            fn drop(&mut self) {
                if let Some(d) = self.0.take() {
                    d.stop();
                }
            }
        }
        let mut guard = Unfinished(Some(daemon.clone()));
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    daemon.release(&node, &below).await;
                    let _disarmed = guard.0.take();
                });
            }
            Err(_) => drop(guard),
        }
    }
}

fn qmp_err(command: &str, error: vmr_capture::qmp::QmpError) -> StoreError {
    StoreError::tool(
        "qemu-storage-daemon",
        ToolFault::Qmp {
            command: command.to_owned(),
            error: Box::new(error),
        },
    )
}

impl Daemon {
    /// A daemon for the store rooted at `root`, started on first use.
    pub(crate) fn new(root: &Path) -> Daemon {
        Daemon {
            root: root.to_owned(),
            running: tokio::sync::Mutex::new(None),
            pid: std::sync::Mutex::new(None),
            last: std::sync::Mutex::new(None),
            lock: std::sync::Mutex::new(None),
            #[cfg(test)]
            crash_next_starts: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The root of the store this daemon serves.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Arc<std::fs::File>>> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The root's QEMU lock, taken first if not held yet: waits (at most [`EXIT_WAIT`]) for
    /// every QEMU process of an earlier store of the root (and those in `exited`, and the
    /// last daemon this store spawned) to have exited. Call with `running` locked.
    async fn hold_lock(
        &self,
        mut exited: Vec<Arc<OwnedFd>>,
    ) -> Result<Arc<std::fs::File>, StoreError> {
        if let Some(l) = self.held().clone() {
            return Ok(l);
        }
        exited.extend(self.last_spawned());
        let file = Arc::new(take_lock(self.root.join(LOCK_FILE), exited).await?);
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|(_, l)| l.strong_count() > 0);
        held.push((self.root.clone(), Arc::downgrade(&file)));
        *self.held() = Some(file.clone());
        Ok(file)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Proc>> {
        self.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kill every QEMU process a crashed store of this root left and wait until they have
    /// exited: the daemon the pid file records (if that pid still has the recorded start time)
    /// and every process holding `<root>/qemu.lock`; then take that lock (blocking, at most
    /// [`EXIT_WAIT`]) and wait for the killed processes' exit. Once the lock is ours no QEMU
    /// process started by an earlier store of the root is alive (each held the lock from
    /// before its exec), so none holds an image lock. Removes the recorded sockets and the pid
    /// file. Nothing happens when this store holds the lock already.
    pub(crate) async fn kill_leftover(&self) -> Result<(), StoreError> {
        let running = self.running.lock().await;
        if self.held().is_some() {
            // Ours: no QEMU process of another store of the root can run.
            return Ok(());
        }
        let path = self.root.join(PID_FILE);
        let record = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = record.lines();
        let (pid, qmp, nbd, started) = (
            lines.next().and_then(|p| p.trim().parse::<i32>().ok()),
            lines.next(),
            lines.next(),
            lines.next().and_then(|p| p.trim().parse::<u64>().ok()),
        );
        let lock = self.root.join(LOCK_FILE);
        let mut found = lock_holders(&lock);
        if let (Some(pid), Some(started)) = (pid, started) {
            found.push((pid, started));
        }
        found.sort_unstable();
        found.dedup();
        let mut killed = Vec::new();
        for (pid, started) in found {
            if let Some(fd) = pidfd_open(pid)
                // The pidfd names the process we found, not a later one with its pid.
                && start_time(pid) == Some(started)
            {
                pidfd_kill(&fd);
                killed.push(Arc::new(fd));
            }
        }
        self.hold_lock(killed).await?;
        drop(running);
        clear_sock_dir(&self.root);
        // Sockets a store before the socket directory recorded in the temp dir.
        for sock in [qmp, nbd].into_iter().flatten() {
            let _ = std::fs::remove_file(sock);
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    fn last_spawned(&self) -> Option<Arc<OwnedFd>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`Self::start`], again (at most [`START_ATTEMPTS`] starts) when the daemon died by a
    /// crash signal while it started. qemu-storage-daemon 10.0.2 was seen to die by SIGSEGV at
    /// start when a client connected to its QMP socket at once, as this one does (`vmr-agent`
    /// `failover.rs` `LAUNCH_ATTEMPTS`, RELIABILITY.md); nothing is open in it yet, so starting
    /// it again is safe.
    async fn start_again_on_crash(&self) -> Result<Running, StoreError> {
        let mut starts = 1;
        loop {
            match self.start().await {
                Err(StoreError::Tool {
                    fault: ToolFault::CrashedAtStart { signal, .. },
                    ..
                }) if starts < START_ATTEMPTS => {
                    tracing::warn!(
                        root = %self.root.display(),
                        signal,
                        starts,
                        "qemu-storage-daemon crashed at start; starting it again"
                    );
                    starts += 1;
                }
                Err(StoreError::Tool {
                    fault: ToolFault::CrashedAtStart { signal, .. },
                    ..
                }) => {
                    return Err(StoreError::tool(
                        "qemu-storage-daemon",
                        ToolFault::CrashedAtStart { signal, starts },
                    ));
                }
                r => return r,
            }
        }
    }

    async fn start(&self) -> Result<Running, StoreError> {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let socks = make_sock_dir(&self.root)?;
        let qmp_sock = socks.join(format!("qsd-{tag}.qmp"));
        let nbd_sock = socks.join(format!("qsd-{tag}.nbd"));
        let _ = std::fs::remove_file(&qmp_sock);
        let _ = std::fs::remove_file(&nbd_sock);
        // Wait for the previous daemon of the root to be gone; the daemon holds the lock too.
        let lock = self.hold_lock(Vec::new()).await?;
        let mut cmd = std::process::Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp_sock.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_sock.display()))
            .envs(DAEMON_MALLOC_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = Proc::spawn(cmd, lock)?;
        let pid = child.pid;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = child.pidfd.clone();
        pause_point("daemon-spawned");
        #[cfg(test)]
        if self
            .crash_next_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            tests::segv(pid);
            while !child.exited() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let started = start_time(pid as i32).unwrap_or_default();
        // Recorded before any QMP command: a daemon that opens an image is always recorded.
        let record = self.root.join(PID_FILE);
        if let Err(e) = std::fs::write(
            &record,
            format!(
                "{pid}\n{}\n{}\n{started}\n",
                qmp_sock.display(),
                nbd_sock.display()
            ),
        ) {
            child.kill_and_wait();
            return Err(StoreError::io("write", record, e));
        }
        let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
        let ep = Endpoint::Unix(qmp_sock.clone());
        let qmp = loop {
            if child.exited() {
                let _ = std::fs::remove_file(&qmp_sock);
                let _ = std::fs::remove_file(&nbd_sock);
                let fault = match child.crash_signal() {
                    Some(signal) => ToolFault::CrashedAtStart { signal, starts: 1 },
                    None => ToolFault::ExitedAtStart,
                };
                return Err(StoreError::tool("qemu-storage-daemon", fault));
            }
            if qmp_sock.exists() && nbd_sock.exists() {
                match QmpClient::connect(&ep, QMP_TIMEOUT).await {
                    Ok(c) => break c,
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        child.kill_and_wait();
                        return Err(qmp_err("connect", e));
                    }
                    Err(_) => {}
                }
            } else if tokio::time::Instant::now() > deadline {
                child.kill_and_wait();
                return Err(StoreError::tool(
                    "qemu-storage-daemon",
                    ToolFault::NoSockets,
                ));
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        };
        *self.child() = Some(child);
        Ok(Running {
            qmp,
            nbd_sock,
            qmp_sock,
            pid,
        })
    }

    /// Stop the daemon (it holds no node once every writer has ended); the next use starts a
    /// new one.
    pub(crate) fn stop(&self) {
        if let Some(c) = self.child().take() {
            c.kill_and_wait();
        }
        if let Ok(mut r) = self.running.try_lock()
            && let Some(r) = r.take()
        {
            let _ = std::fs::remove_file(&r.qmp_sock);
            let _ = std::fs::remove_file(&r.nbd_sock);
            // Only the store that started a daemon removes the record (another process may
            // have opened the same root only to read it).
            let _ = std::fs::remove_file(self.root.join(PID_FILE));
        }
    }

    /// Run a QMP command, starting the daemon first if needed. A daemon that stopped
    /// answering is killed (the next command starts a new one).
    async fn execute(&self, name: &str, args: Value) -> Result<Value, StoreError> {
        let mut g = self.running.lock().await;
        if g.is_none() {
            *g = Some(self.start_again_on_crash().await?);
        }
        let Some(r) = g.as_mut() else {
            return Err(StoreError::tool(
                "qemu-storage-daemon",
                ToolFault::NotRunning,
            ));
        };
        r.qmp.discard_events(|_| true);
        match r.qmp.execute_value(name, Some(args)).await {
            Ok(v) => Ok(v),
            Err(e @ vmr_capture::qmp::QmpError::Command { .. }) => Err(qmp_err(name, e)),
            Err(e) => {
                let pid = r.pid;
                let _ = std::fs::remove_file(&r.qmp_sock);
                let _ = std::fs::remove_file(&r.nbd_sock);
                *g = None;
                let mut c = self.child();
                if c.as_ref().map(|c| c.pid) == Some(pid)
                    && let Some(c) = c.take()
                {
                    c.kill_and_wait();
                }
                Err(qmp_err(name, e))
            }
        }
    }

    async fn nbd_sock(&self) -> Option<PathBuf> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|r| r.nbd_sock.clone())
    }

    /// Open the qcow2 layer `image` (its backing chain read-only) and export it writable;
    /// returns a connected client.
    pub(crate) async fn export(self: &Arc<Self>, image: &Path) -> Result<DaemonExport, StoreError> {
        let what = image.display().to_string();
        self.export_node(
            json!({ "driver": "file", "filename": what, "aio": "threads" }),
            Vec::new(),
            what,
            false,
        )
        .await
    }

    /// Create the qcow2 layer `image` of `size` bytes on top of `backing` (a file name in the
    /// same directory, recorded relative) with `blockdev-create` jobs (no process start), open
    /// it (its file with `cache`, QEMU's flushes of it as `flush` says) and export it
    /// writable.
    pub(crate) async fn create_and_export(
        self: &Arc<Self>,
        image: &Path,
        size: u64,
        backing: Option<&str>,
        cache: WriteCache,
        flush: LayerFlush,
    ) -> Result<DaemonExport, StoreError> {
        let what = image.display().to_string();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let file_node = format!("vmrf{n}");
        self.run_job(
            &format!("vmrc{n}"),
            json!({ "driver": "file", "filename": what, "size": 0 }),
        )
        .await?;
        // The file node's options, best first: O_DIRECT (asked for) with the thread pool
        // (measured no slower than io_uring or native AIO for 4 MiB writes), then the page
        // cache with io_uring (measured 10-15 % less daemon CPU than the thread pool for 64 KiB
        // writes: no hand-over to a worker thread per request), then the thread pool. A choice
        // the host refuses (O_DIRECT on tmpfs, io_uring disabled by the kernel, a QEMU built
        // without it) fails `blockdev-add` at once and the next is tried.
        let tries: &[(bool, &str)] = match cache {
            WriteCache::Direct => &[(true, "threads"), (false, "io_uring"), (false, "threads")],
            WriteCache::Buffered => &[(false, "io_uring"), (false, "threads")],
        };
        let no_flush = flush == LayerFlush::AtCommit;
        let mut direct = false;
        let mut added = Err(StoreError::tool(
            "qemu-storage-daemon",
            ToolFault::NoFileOptions,
        ));
        for &(d, aio) in tries {
            added = self
                .execute(
                    "blockdev-add",
                    json!({ "driver": "file", "node-name": file_node, "filename": what,
                            "aio": aio, "cache": { "direct": d, "no-flush": no_flush } }),
                )
                .await;
            if added.is_ok() {
                direct = d;
                break;
            }
            tracing::debug!(
                what,
                direct = d,
                aio,
                "file options refused, trying the next"
            );
        }
        added?;
        let mut opts = json!({ "driver": "qcow2", "file": file_node, "size": size,
                               "cluster-size": 65536 });
        if let (Some(b), Some(o)) = (backing, opts.as_object_mut()) {
            o.insert("backing-file".into(), json!(b));
            o.insert("backing-fmt".into(), json!("qcow2"));
        }
        if let Err(e) = self.run_job(&format!("vmrq{n}"), opts).await {
            self.del_node(&file_node).await;
            return Err(e);
        }
        let mut below = vec![file_node.clone()];
        if direct {
            // An O_DIRECT write that extends the file waits under the inode's exclusive lock
            // on ext4 (and XFS) until it completes, so the layer's writes, each appending new
            // clusters, went to the disk one at a time (the daemon's threads sampled blocked in
            // `ext4_file_write_iter`). QEMU's `preallocate` filter reserves the file ahead of
            // the writes in 128 MiB steps (zeroed, i_size set), so they land inside the file
            // and run in parallel; closing the node truncates the file back to its data.
            let pre = format!("vmrp{n}");
            match self
                .execute(
                    "blockdev-add",
                    json!({ "driver": "preallocate", "node-name": pre, "file": file_node,
                            "prealloc-size": PREALLOC_STEP }),
                )
                .await
            {
                Ok(_) => below.insert(0, pre),
                Err(e) => tracing::debug!(what, "no preallocate filter: {e}"),
            }
        }
        self.export_node(json!(below[0]), below, what, direct).await
    }

    /// Run a `blockdev-create` job to its end and dismiss it.
    async fn run_job(&self, id: &str, options: Value) -> Result<(), StoreError> {
        self.execute(
            "blockdev-create",
            json!({ "job-id": id, "options": options }),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
        loop {
            let jobs = self.execute("query-jobs", json!({})).await?;
            let job = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j.get("id") == Some(&json!(id))))
                .cloned();
            let Some(job) = job else {
                return Err(StoreError::tool(
                    "qemu-storage-daemon",
                    ToolFault::JobVanished(id.to_string()),
                ));
            };
            if job.get("status") == Some(&json!("concluded")) {
                self.execute("job-dismiss", json!({ "id": id })).await?;
                return match job.get("error").and_then(Value::as_str) {
                    None => Ok(()),
                    Some(e) => Err(StoreError::tool(
                        "qemu-storage-daemon",
                        ToolFault::CreateFailed(e.to_owned()),
                    )),
                };
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self
                    .execute("job-cancel", json!({ "id": id, "force": true }))
                    .await;
                return Err(StoreError::tool(
                    "qemu-storage-daemon",
                    ToolFault::JobTimeout(id.to_string()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn export_node(
        self: &Arc<Self>,
        file: Value,
        below: Vec<String>,
        what: String,
        direct: bool,
    ) -> Result<DaemonExport, StoreError> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let node = format!("vmr{n}");
        let added = self
            .execute(
                "blockdev-add",
                json!({
                    "driver": "qcow2",
                    "node-name": node,
                    "discard": "unmap",
                    "cache": { "direct": direct, "no-flush": false },
                    "file": file,
                }),
            )
            .await;
        if let Err(e) = added {
            for b in &below {
                self.del_node(b).await;
            }
            return Err(e);
        }
        let res = async {
            self.execute(
                "block-export-add",
                json!({ "type": "nbd", "id": node, "node-name": node, "name": node,
                        "writable": true }),
            )
            .await?;
            let sock = self.nbd_sock().await.ok_or_else(|| {
                StoreError::tool("qemu-storage-daemon", ToolFault::StoppedWhileExporting)
            })?;
            let opts = ConnectOptions {
                export: node.clone(),
                max_in_flight: 32,
                ..ConnectOptions::default()
            };
            NbdClient::connect(&Endpoint::Unix(sock), opts)
                .await
                .map_err(|e| StoreError::nbd(what.clone(), e))
        }
        .await;
        match res {
            Ok(client) => Ok(DaemonExport {
                node,
                below,
                client,
                what,
                direct,
                daemon: Some(self.clone()),
            }),
            Err(e) => {
                self.release(&node, &below).await;
                Err(e)
            }
        }
    }

    /// Remove the export (dropping any connection) and close the node (and the protocol node
    /// the daemon created it on). A node that cannot be closed makes the daemon be stopped,
    /// so that no image stays open.
    async fn release(&self, node: &str, below: &[String]) {
        let _ = self
            .execute("block-export-del", json!({ "id": node, "mode": "hard" }))
            .await;
        self.del_node(node).await;
        for b in below {
            self.del_node(b).await;
        }
    }

    /// `blockdev-del`, retried while the node is still in use (an export lets go of its node
    /// once its connections have closed).
    async fn del_node(&self, node: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .execute("blockdev-del", json!({ "node-name": node }))
                .await
            {
                Ok(_) => return,
                Err(StoreError::Tool { fault, .. })
                    if fault.qmp_desc().is_some_and(|d| d.contains("in use"))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(StoreError::Tool { fault, .. })
                    if fault
                        .qmp_desc()
                        .is_some_and(|d| d.contains("Failed to find")) =>
                {
                    return;
                }
                Err(e) => {
                    tracing::warn!(node, "closing a layer in qemu-storage-daemon: {e}");
                    self.stop();
                    return;
                }
            }
        }
    }

    /// FLUSH, disconnect, remove the export and close the node (the layer's data is on disk
    /// and the daemon holds no lock on it or its backing chain any more).
    pub(crate) async fn finish(&self, mut x: DaemonExport) -> Result<(), StoreError> {
        // Released below; if this future is dropped first, the export's drop releases it.
        let flushed = x
            .client
            .flush()
            .await
            .map_err(|e| StoreError::nbd(x.what.clone(), e));
        let _ = x.client.clone().disconnect().await;
        self.release(&x.node, &x.below).await;
        x.daemon = None;
        flushed
    }

    /// Drop the export and close the node without flushing (error path).
    pub(crate) async fn abort(&self, mut x: DaemonExport) {
        let _ = x.client.clone().disconnect().await;
        self.release(&x.node, &x.below).await;
        x.daemon = None;
    }
}

impl DaemonExport {
    /// Largest request length to use.
    pub(crate) fn chunk(&self) -> u64 {
        u64::from(self.client.max_request().clamp(4096, 32 << 20))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(unsafe_code)]
fn kill(pid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The daemon process, spawned and reaped by a thread of its own: `PR_SET_PDEATHSIG` follows
/// the spawning thread, so that thread lives exactly as long as the daemon (a runtime worker
/// could end earlier and take the daemon with it).
struct Proc {
    pid: u32,
    exited: Arc<AtomicBool>,
    /// The signal that ended it (0: none, or still running); set before `exited`.
    signal: Arc<AtomicI32>,
    /// A pidfd of the process (readable once it has exited).
    pidfd: Option<Arc<OwnedFd>>,
}

impl Proc {
    /// Spawn `cmd`, inheriting the locked `lock`.
    fn spawn(mut cmd: std::process::Command, lock: Arc<std::fs::File>) -> Result<Proc, StoreError> {
        die_with_parent(&mut cmd, lock.as_raw_fd());
        let exited = Arc::new(AtomicBool::new(false));
        let done = exited.clone();
        let signal = Arc::new(AtomicI32::new(0));
        let ended_by = signal.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("vmr-qsd".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    drop(lock);
                    // Not reaped before the wait below, so the pid is still this child's.
                    let pidfd = pidfd_open(child.id() as i32).map(Arc::new);
                    let _ = tx.send(Ok((child.id(), pidfd)));
                    if let Ok(status) = child.wait() {
                        use std::os::unix::process::ExitStatusExt;
                        ended_by.store(status.signal().unwrap_or(0), Ordering::SeqCst);
                    }
                    done.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    drop(lock);
                    done.store(true, Ordering::SeqCst);
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::tool("qemu-storage-daemon", ToolFault::Thread(e)))?;
        let (pid, pidfd) = rx
            .recv()
            .map_err(|_| StoreError::tool("qemu-storage-daemon", ToolFault::ThreadEnded))?
            .map_err(|e| StoreError::tool("qemu-storage-daemon", ToolFault::Spawn(e)))?;
        Ok(Proc {
            pid,
            exited,
            signal,
            pidfd,
        })
    }

    fn exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// The crash signal (SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE) it died by, once exited.
    fn crash_signal(&self) -> Option<&'static str> {
        if !self.exited() {
            return None;
        }
        match self.signal.load(Ordering::SeqCst) {
            libc::SIGSEGV => Some("SIGSEGV"),
            libc::SIGBUS => Some("SIGBUS"),
            libc::SIGABRT => Some("SIGABRT"),
            libc::SIGILL => Some("SIGILL"),
            libc::SIGFPE => Some("SIGFPE"),
            _ => None,
        }
    }

    /// SIGKILL and wait (up to 10 s) until it has been reaped.
    fn kill_and_wait(&self) {
        if self.exited() {
            return;
        }
        // The reaper thread has not reaped it yet, so the pid is still ours.
        kill(self.pid as i32);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.exited() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The daemon keeps the root's QEMU lock and dies with its spawning thread ([`child_setup`]).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command, lock_fd: i32) {
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (`child_setup`), touching no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, Some(lock_fd)));
    }
}

/// Open (creating it) the lock file `path`, take its exclusive `flock` (blocking, in a thread
/// of its own) and wait until every process in `exited` (pidfds) has exited, at most
/// [`EXIT_WAIT`] in all. If that elapses the thread lets go of the lock once it gets it.
async fn take_lock(path: PathBuf, exited: Vec<Arc<OwnedFd>>) -> Result<std::fs::File, StoreError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vmr-qsd-lock".into())
        .spawn(move || {
            let got = flock_exclusive(&file).map(|()| {
                for fd in &exited {
                    wait_exited(fd);
                }
                file
            });
            // Dropped (unlocked) here if the caller stopped waiting.
            let _ = tx.send(got);
        })
        .map_err(|e| StoreError::io("start a thread to lock", &path, e))?;
    match tokio::time::timeout(EXIT_WAIT, rx).await {
        Ok(Ok(Ok(file))) => Ok(file),
        Ok(Ok(Err(e))) => Err(StoreError::io("lock", path, e)),
        Ok(Err(_)) => Err(StoreError::io(
            "lock",
            path,
            std::io::Error::other("the locking thread ended"),
        )),
        Err(_) => Err(StoreError::DaemonStillRunning {
            lock: path,
            waited: EXIT_WAIT,
        }),
    }
}

#[allow(unsafe_code)]
fn flock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor this function borrows; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Block until the process of `pidfd` has exited (its pidfd polls readable).
#[allow(unsafe_code)]
fn wait_exited(pidfd: &OwnedFd) {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// A pidfd of `pid`, if that process exists.
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes two integers; a non-negative result is a new descriptor
    // owned by nobody else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor this process owns and nothing else closes.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILL the process of `pidfd` (no pid reuse can redirect it).
#[allow(unsafe_code)]
fn pidfd_kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) with a null siginfo reads no memory.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// A process's start time (clock ticks after boot, `/proc/<pid>/stat` field 22): with the pid
/// it names one process, not a later one given the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Processes other than this one that hold the file `lock` open, with their start times.
fn lock_holders(lock: &Path) -> Vec<(i32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(lock) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    // A fork of this process that has not exec'd yet (any thread of it starting any child)
    // holds copies of all its descriptors, this lock's included, for a moment: it is not a
    // QEMU process of a previous store and must not be killed.
    let my_exe = std::fs::read_link("/proc/self/exe").ok();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if my_exe.is_some() && std::fs::read_link(p.path().join("exe")).ok() == my_exe {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
        });
        if holds && let Some(t) = start_time(pid) {
            found.push((pid, t));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// SIGSEGV to `pid` (a daemon this test's store just spawned and has not reaped).
    #[allow(unsafe_code)]
    pub(super) fn segv(pid: u32) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGSEGV);
        }
    }

    fn two_layers(d: &Path) {
        for args in [
            &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"][..],
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "1M",
            ][..],
        ] {
            assert!(qemu_img(d, args).status.success());
        }
    }

    /// A daemon that dies by a crash signal at start is started again, at most three times;
    /// after three crashes the error says so.
    #[tokio::test]
    async fn a_daemon_that_crashes_at_start_is_started_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        two_layers(d);
        let qsd = Arc::new(Daemon::new(d));
        qsd.crash_next_starts.store(2, Ordering::SeqCst);
        let x = qsd
            .export(&d.join("top.qcow2"))
            .await
            .expect("the third start serves");
        assert_eq!(qsd.crash_next_starts.load(Ordering::SeqCst), 0);
        x.client
            .write(0, Bytes::from(vec![7u8; 65536]), false)
            .await
            .expect("write");
        qsd.finish(x).await.expect("finish");
        qsd.stop();
        qsd.crash_next_starts.store(3, Ordering::SeqCst);
        let e = qsd
            .export(&d.join("top.qcow2"))
            .await
            .err()
            .expect("three crashes fail the start");
        assert!(
            matches!(
                e,
                StoreError::Tool {
                    fault: ToolFault::CrashedAtStart {
                        signal: "SIGSEGV",
                        starts: 3
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        // The next start (no crash) serves again, and no crashed daemon left its sockets.
        let x = qsd.export(&d.join("top.qcow2")).await.expect("export");
        qsd.finish(x).await.expect("finish");
        qsd.stop();
        let left: Vec<_> = std::fs::read_dir(sock_dir(d))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }

    fn qemu_img(dir: &Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run qemu-img")
    }

    #[tokio::test]
    async fn a_finished_export_holds_its_data_and_no_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        two_layers(d);
        let qsd = Arc::new(Daemon::new(d));
        for round in 0..2u8 {
            let x = qsd.export(&d.join("top.qcow2")).await.expect("export");
            // While exported, the layer is locked for writing by the daemon.
            let busy = qemu_img(d, &["rebase", "-q", "-u", "-b", "", "top.qcow2"]);
            assert!(!busy.status.success(), "layer not locked while exported");
            x.client
                .write(
                    65536 * u64::from(round),
                    Bytes::from(vec![round + 1; 65536]),
                    false,
                )
                .await
                .expect("write");
            qsd.finish(x).await.expect("finish");
        }
        // An export dropped without finish or abort (a cancelled future) is released too.
        drop(qsd.export(&d.join("top.qcow2")).await.expect("export"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !qemu_img(
            d,
            &[
                "rebase",
                "-q",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        )
        .status
        .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "dropped export kept the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Released: another process may write it (and its backing) now.
        let raw = d.join("out.raw");
        let out = qemu_img(
            d,
            &[
                "convert",
                "-O",
                "raw",
                "top.qcow2",
                raw.to_str().expect("utf8"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let bytes = std::fs::read(&raw).expect("read");
        assert!(bytes[..65536].iter().all(|b| *b == 1));
        assert!(bytes[65536..131072].iter().all(|b| *b == 2));
        assert!(bytes[131072..].iter().all(|b| *b == 0));
        let free = qemu_img(d, &["commit", "-q", "-d", "top.qcow2"]);
        assert!(free.status.success(), "{free:?}");
    }

    /// The file node of the daemon's (only) new layer, as QEMU reports it.
    async fn layer_file_node(qsd: &Arc<Daemon>) -> Value {
        let nodes = qsd
            .execute("query-named-block-nodes", json!({}))
            .await
            .expect("query");
        let files: Vec<Value> = nodes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| {
                        n["node-name"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("vmrf"))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    /// The `cache.no-flush` of the file node of the daemon's (only) new layer.
    async fn file_no_flush(qsd: &Arc<Daemon>) -> Value {
        layer_file_node(qsd).await["cache"]["no-flush"].clone()
    }

    #[tokio::test]
    async fn a_created_layer_has_the_header_qemu_img_would_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert!(
            qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"])
                .status
                .success()
        );
        let qsd = Arc::new(Daemon::new(d));
        let x = qsd
            .create_and_export(
                &d.join("c000002.qcow2"),
                4 << 20,
                Some("base.qcow2"),
                WriteCache::Buffered,
                LayerFlush::Ordered,
            )
            .await
            .expect("create");
        assert_eq!(x.client.size(), 4 << 20);
        assert_eq!(
            file_no_flush(&qsd).await,
            json!(false),
            "QEMU's flushes kept"
        );
        x.client
            .write(3 << 20, Bytes::from(vec![7u8; 4096]), false)
            .await
            .expect("write");
        qsd.finish(x).await.expect("finish");
        let out = qemu_img(d, &["info", "--output=json", "c000002.qcow2"]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual-size"], 4 << 20);
        assert_eq!(v["cluster-size"], 65536);
        assert_eq!(v["backing-filename"], "base.qcow2");
        assert_eq!(v["backing-filename-format"], "qcow2");
        let check = qemu_img(d, &["check", "c000002.qcow2"]);
        assert!(check.status.success(), "{check:?}");
        // Create another, abort it: the daemon keeps serving.
        std::fs::remove_file(d.join("c000002.qcow2")).expect("remove");
        let y = qsd
            .create_and_export(
                &d.join("c000002.qcow2"),
                4 << 20,
                None,
                WriteCache::Buffered,
                LayerFlush::AtCommit,
            )
            .await
            .expect("create again");
        assert!(!y.direct);
        assert_eq!(
            file_no_flush(&qsd).await,
            json!(true),
            "QEMU's flushes skipped"
        );
        qsd.abort(y).await;
        assert!(qsd.running.lock().await.is_some(), "daemon still serves");
    }

    #[tokio::test]
    async fn a_direct_layer_is_open_with_o_direct_and_takes_unaligned_writes() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let d = dir.path();
        let qsd = Arc::new(Daemon::new(d));
        let x = qsd
            .create_and_export(
                &d.join("c000001.qcow2"),
                8 << 20,
                None,
                WriteCache::Direct,
                LayerFlush::AtCommit,
            )
            .await
            .expect("create");
        // The daemon reports the cache mode it opened the layer's file with.
        let nodes = qsd
            .execute("query-named-block-nodes", json!({}))
            .await
            .expect("query");
        let file = layer_file_node(&qsd).await;
        assert_eq!(file["cache"]["direct"], json!(x.direct), "{file}");
        // /var/tmp is a disk file system (ext4 on the machines this runs on): O_DIRECT holds.
        assert!(x.direct, "O_DIRECT refused on /var/tmp");
        // Between the layer and its file sits the preallocate filter.
        let drivers: Vec<&str> = nodes
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["drv"].as_str()).collect())
            .unwrap_or_default();
        assert!(drivers.contains(&"preallocate"), "{drivers:?}");
        // The daemon runs with the allocator settings that keep request buffers mapped.
        let pid = qsd.child().as_ref().map(|c| c.pid).expect("running");
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        for (k, v) in DAEMON_MALLOC_ENV {
            let want = format!("{k}={v}");
            assert!(
                env.split(|b| *b == 0).any(|e| e == want.as_bytes()),
                "{want} not in the daemon's environment"
            );
        }
        // A large aligned write and two unaligned ones (QEMU reads, modifies, writes).
        let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        x.client
            .write(1 << 20, Bytes::from(big.clone()), false)
            .await
            .expect("write big");
        x.client
            .write(12345, Bytes::from(vec![9u8; 1000]), false)
            .await
            .expect("write unaligned");
        x.client
            .write((5 << 20) + 7, Bytes::from(vec![3u8; 70_000]), false)
            .await
            .expect("write unaligned after it");
        // Written ahead of the data while open (the filter's step), ...
        let len = || {
            std::fs::metadata(d.join("c000001.qcow2"))
                .expect("stat")
                .len()
        };
        x.client.flush().await.expect("flush");
        assert!(len() >= PREALLOC_STEP, "not preallocated: {} bytes", len());
        qsd.finish(x).await.expect("finish");
        // ... and cut back to the data when the layer is closed.
        assert!(
            len() < 6 << 20,
            "preallocation left in the file: {} bytes",
            len()
        );
        let out = qemu_img(
            d,
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "c000001.qcow2",
                "out.raw",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let raw = std::fs::read(d.join("out.raw")).expect("read");
        let mut want = vec![0u8; 8 << 20];
        want[1 << 20..5 << 20].copy_from_slice(&big);
        want[12345..13345].fill(9);
        want[(5 << 20) + 7..(5 << 20) + 7 + 70_000].fill(3);
        assert!(raw == want, "the layer holds what was written");
        let check = qemu_img(d, &["check", "c000001.qcow2"]);
        assert!(check.status.success(), "{check:?}");
    }

    #[tokio::test]
    async fn a_daemon_left_behind_is_killed_and_cleaned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let left = Daemon::new(dir.path());
        left.execute("query-version", json!({}))
            .await
            .expect("start");
        let pid = left.child().as_ref().map(|c| c.pid).expect("running");
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        // Its sockets are in the root's socket directory, none in the temp dir.
        let socks = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let sdir = dir.path().join(SOCK_DIR);
        assert_eq!(sock_dir(dir.path()), sdir);
        let mut names = socks(&sdir);
        names.sort();
        let tag = format!("{}-", std::process::id());
        assert!(
            names.len() == 2
                && names
                    .iter()
                    .all(|n| n.starts_with("qsd-") && n.contains(&tag)),
            "{names:?}"
        );
        assert!(
            !socks(&std::env::temp_dir())
                .iter()
                .any(|n| n.starts_with("vmr-qsd-") && n.contains(&tag)),
            "a daemon socket in the temp dir"
        );
        // An export's socket left by a dead store.
        std::fs::write(sdir.join("nbd-1-1.sock"), b"").expect("write");
        // The daemon (and only it) holds the root's lock.
        let lock = dir.path().join(LOCK_FILE);
        let holders: Vec<i32> = lock_holders(&lock).into_iter().map(|h| h.0).collect();
        assert_eq!(holders, vec![pid as i32]);
        // The store process "dies": its own descriptor of the lock is gone, the daemon runs on.
        *left.held() = None;
        let next = Daemon::new(dir.path());
        next.kill_leftover().await.expect("kill leftover");
        // Returned only once the daemon has exited: reaped, or a zombie not yet reaped.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "the leftover daemon still runs: {state}"
        );
        assert!(lock_holders(&lock).is_empty());
        assert!(!dir.path().join(PID_FILE).exists());
        assert!(socks(&sdir).is_empty(), "left: {:?}", socks(&sdir));
        // The next daemon starts at once (the lock is free).
        next.execute("query-version", json!({}))
            .await
            .expect("start next");
        drop(next);
        // A pid file naming another process (its start time differs) is not followed.
        std::fs::write(
            dir.path().join(PID_FILE),
            format!(
                "{}\n/nonexistent.qmp\n/nonexistent.nbd\n1\n",
                std::process::id()
            ),
        )
        .expect("write");
        Daemon::new(dir.path())
            .kill_leftover()
            .await
            .expect("kill leftover");
        assert!(!dir.path().join(PID_FILE).exists());
    }

    #[tokio::test]
    async fn a_second_daemon_of_the_root_waits_for_the_first_to_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Daemon::new(dir.path());
        first
            .execute("query-version", json!({}))
            .await
            .expect("start");
        let second = Arc::new(Daemon::new(dir.path()));
        let s2 = second.clone();
        let waiting =
            tokio::spawn(async move { s2.execute("query-version", json!({})).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "two daemons ran for one root");
        drop(first);
        assert!(
            waiting.await.expect("join"),
            "the second daemon did not start"
        );
    }
}
