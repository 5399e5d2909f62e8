//! Thin wrappers around the QEMU tools the store drives: `qemu-img` (create, info, map,
//! rebase) and `qemu-nbd` exports reached with the vmr-nbd client (for pruning's copy-up,
//! block hashes and imports; cycles are written through the daemon of `daemon.rs`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};

use crate::error::{StoreError, ToolFault};

/// Run `qemu-img` with `args` in `cwd`; returns stdout. An image lock held by another process
/// is waited for (up to 10 s): after a crash, the tools the previous store process started die
/// with it (`PR_SET_PDEATHSIG`), but not always before the restarted store's recovery runs.
pub(crate) async fn qemu_img(cwd: &Path, args: &[&str]) -> Result<String, StoreError> {
    let mut tries = 0;
    loop {
        match qemu_img_once(cwd, args).await {
            Err(StoreError::Tool {
                fault: ToolFault::Exited { ref stderr, .. },
                ..
            }) if tries < 100 && stderr.contains("Failed to get") && stderr.contains("lock") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

async fn qemu_img_once(cwd: &Path, args: &[&str]) -> Result<String, StoreError> {
    let mut cmd = Command::new("qemu-img");
    let _lock = die_with_parent(&mut cmd, cwd);
    let out = cmd
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| StoreError::tool("qemu-img", ToolFault::Spawn(e)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(StoreError::tool(
            "qemu-img",
            ToolFault::Exited {
                stderr,
                context: args.join(" "),
            },
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img check -U` of the qcow2 layer `file` in `dir` (its own metadata: header, L1/L2
/// and refcount tables; not its backing files' data). `None` when it passed (leaked clusters,
/// which an interrupted write leaves and which cost only space, pass); otherwise what
/// `qemu-img` said. Running `qemu-img` at all failing is an error.
pub(crate) async fn qemu_img_check(dir: &Path, file: &str) -> Result<Option<String>, StoreError> {
    let mut cmd = Command::new("qemu-img");
    let _lock = die_with_parent(&mut cmd, dir);
    let out = cmd
        .args(["check", "-U", "-f", "qcow2", file])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| StoreError::tool("qemu-img", ToolFault::Spawn(e)))?;
    // 0: no errors; 3: leaked clusters only; 2: corruptions; 1: not checkable (e.g. the
    // header is damaged); 63: the format does not support checks.
    Ok(match out.status.code() {
        Some(0 | 3) => None,
        code => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = text.trim();
            Some(format!(
                "qemu-img check exited with {}: {}",
                code.map_or_else(|| "a signal".to_owned(), |c| c.to_string()),
                if text.is_empty() { "no output" } else { text }
            ))
        }
    })
}

/// Create a qcow2 layer `file` in `dir`, on top of `backing` (a file name in the same
/// directory, stored relative) when given. `unsafe_backing` skips opening the backing file.
pub(crate) async fn create_layer(
    dir: &Path,
    file: &str,
    size: u64,
    backing: Option<&str>,
    unsafe_backing: bool,
) -> Result<(), StoreError> {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
        if unsafe_backing {
            args.push("-u");
        }
    }
    args.extend([file, size.as_str()]);
    qemu_img(dir, &args).await.map(|_| ())
}

/// The backing file name recorded in a qcow2 header (`None` for no backing).
pub(crate) async fn backing_of(dir: &Path, file: &str) -> Result<Option<String>, StoreError> {
    let out = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", file]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|error| {
        StoreError::tool(
            "qemu-img",
            ToolFault::Json {
                what: "info",
                error,
            },
        )
    })?;
    Ok(v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_owned))
}

/// Ranges `(offset, len)` of `file` that are allocated in its direct backing layer and not in
/// `file` itself (`qemu-img map` depth 1, present).
pub(crate) async fn ranges_in_backing(
    dir: &Path,
    file: &str,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let out = qemu_img(dir, &["map", "--output=json", "-f", "qcow2", file]).await?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|error| StoreError::tool("qemu-img", ToolFault::Json { what: "map", error }))?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let depth = e.get("depth").and_then(|d| d.as_u64());
        let present = e.get("present").and_then(|d| d.as_bool()).unwrap_or(false);
        let (Some(start), Some(len)) = (
            e.get("start").and_then(|d| d.as_u64()),
            e.get("length").and_then(|d| d.as_u64()),
        ) else {
            return Err(StoreError::tool("qemu-img", ToolFault::MapEntry));
        };
        if depth == Some(1) && present {
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    Ok(ranges)
}

/// Rewrite the backing file name of `file` without touching data (`rebase -u`).
pub(crate) async fn rebase_unsafe(
    dir: &Path,
    file: &str,
    backing: Option<&str>,
) -> Result<(), StoreError> {
    match backing {
        Some(b) => {
            qemu_img(
                dir,
                &[
                    "rebase", "-q", "-u", "-f", "qcow2", "-b", b, "-F", "qcow2", file,
                ],
            )
            .await
        }
        None => qemu_img(dir, &["rebase", "-q", "-u", "-f", "qcow2", "-b", "", file]).await,
    }
    .map(|_| ())
}

/// Write every cluster `file` has (data and zeros) into its direct backing layer
/// (`qemu-img commit -d`: `file` keeps its clusters). The chain seen through `file` does not
/// change; afterwards the backing layer alone reads as `file` did. Idempotent.
pub(crate) async fn commit_into_backing(dir: &Path, file: &str) -> Result<(), StoreError> {
    qemu_img(
        dir,
        &["commit", "-q", "-d", "-f", "qcow2", "-t", "writeback", file],
    )
    .await
    .map(|_| ())
}

/// Make the tool die (SIGKILL) when the store process dies, so that a crashed store never
/// leaves a qemu-nbd behind that waits forever for its first client while holding the image
/// lock (the death signal follows the spawning thread; tokio spawns from runtime worker
/// threads, which live as long as the runtime), and let it inherit the root's QEMU lock when
/// this process holds it for the store containing `path`, so that the next store's recovery
/// waits for its exit (`daemon.rs`). Returns that lock: keep it until the spawn is done.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command, path: &Path) -> Option<std::sync::Arc<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let lock = crate::daemon::held_lock_for(path);
    let fd = lock.as_ref().map(|l| l.as_raw_fd());
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (`child_setup`), touching no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || crate::daemon::child_setup(parent, fd));
    }
    lock
}

static SOCK_SEQ: AtomicU64 = AtomicU64::new(0);

/// How an export opens its image.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// A store layer, writable.
    Writable,
    /// A committed store layer, read-only without image locks.
    SharedLayer,
    /// An outside image of this format, read-only with image locks.
    Image(&'a str),
}

/// A writable `qemu-nbd` export of one image and a connected client.
pub(crate) struct Export {
    /// The qemu-nbd process; taken (and waited for) by `finish` or `abort`, else killed and
    /// reaped when the export is dropped.
    child: Reaped,
    sock: PathBuf,
    /// The connected client.
    pub client: NbdClient,
    what: String,
}

impl Export {
    /// Export `image` (qcow2) writable on a fresh unix socket in the socket directory of the
    /// store rooted at `root` and connect to it.
    pub(crate) async fn start(root: &Path, image: &Path) -> Result<Export, StoreError> {
        Export::start_with(root, image, false, Vec::new()).await
    }

    /// Export `image` (qcow2) read-only without taking image locks (`--force-share`: for
    /// reading committed layers, whose content never changes, while the store may copy up
    /// into them), with the given meta contexts.
    pub(crate) async fn start_read_only(
        root: &Path,
        image: &Path,
        meta_contexts: Vec<String>,
    ) -> Result<Export, StoreError> {
        Export::start_with(root, image, true, meta_contexts).await
    }

    /// Export an image from outside the store (`format` `qcow2` or `raw`) read-only, with
    /// image locking (nobody may write it meanwhile), for importing it.
    pub(crate) async fn start_image(
        root: &Path,
        image: &Path,
        format: &str,
        meta_contexts: Vec<String>,
    ) -> Result<Export, StoreError> {
        Export::start_inner(root, image, Mode::Image(format), meta_contexts).await
    }

    async fn start_with(
        root: &Path,
        image: &Path,
        read_only: bool,
        meta_contexts: Vec<String>,
    ) -> Result<Export, StoreError> {
        let mode = if read_only {
            Mode::SharedLayer
        } else {
            Mode::Writable
        };
        Export::start_inner(root, image, mode, meta_contexts).await
    }

    async fn start_inner(
        root: &Path,
        image: &Path,
        mode: Mode<'_>,
        meta_contexts: Vec<String>,
    ) -> Result<Export, StoreError> {
        let sock = crate::daemon::make_sock_dir(root)?.join(format!(
            "nbd-{}-{}.sock",
            std::process::id(),
            SOCK_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&sock);
        let what = image.display().to_string();
        let mut cmd = Command::new("qemu-nbd");
        let _lock = die_with_parent(&mut cmd, image);
        match mode {
            Mode::SharedLayer => {
                // force-share: no image locks, so the store may still copy up into the layer
                // (its content does not change) while it is being read.
                let escaped = image.display().to_string().replace(',', ",,");
                cmd.arg("--read-only")
                    .arg("--shared=2")
                    .arg("--image-opts")
                    .arg("--aio=threads")
                    .arg("--socket")
                    .arg(&sock)
                    .arg(format!(
                        "driver=qcow2,force-share=on,file.driver=file,file.filename={escaped}"
                    ));
            }
            Mode::Image(format) => {
                cmd.arg("--read-only")
                    .arg(format!("--format={format}"))
                    .arg("--aio=threads")
                    .arg("--socket")
                    .arg(&sock)
                    .arg(image);
            }
            Mode::Writable => {
                cmd.arg("--cache=writeback")
                    .arg("--discard=unmap")
                    .arg("--format=qcow2")
                    .arg("--aio=threads")
                    .arg("--socket")
                    .arg(&sock)
                    .arg(image);
            }
        }
        // Guarded from here: a start cancelled while it waits for the socket or the
        // connection (its future dropped) still kills and reaps this qemu-nbd.
        let mut guard = Reaped(Some(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| StoreError::tool("qemu-nbd", ToolFault::Spawn(e)))?,
        ));
        let Some(child) = guard.0.as_mut() else {
            return Err(StoreError::tool("qemu-nbd", ToolFault::NotStarted));
        };
        tracing::debug!(pid = child.id().unwrap_or(0), what = %what, "qemu-nbd spawned");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Ok(Some(_)) = child.try_wait() {
                let stderr = stderr_of(child).await;
                return Err(StoreError::tool(
                    "qemu-nbd",
                    ToolFault::Exited {
                        stderr,
                        context: format!("exporting {what}"),
                    },
                ));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(StoreError::tool(
                    "qemu-nbd",
                    ToolFault::NoSocket(what.clone()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let opts = ConnectOptions {
            max_in_flight: 32,
            meta_contexts,
            ..ConnectOptions::default()
        };
        let ep = Endpoint::Unix(sock.clone());
        let connected = loop {
            // The socket file appears at bind(), just before listen(): retry a refusal, unless
            // qemu-nbd has exited meanwhile (e.g. it could not open the image: its socket file
            // stays, nobody listens); then its own error is the answer, and it is reaped now,
            // not left a zombie until the deadline.
            match NbdClient::connect(&ep, opts.clone()).await {
                Err(vmr_nbd::NbdError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && tokio::time::Instant::now() < deadline =>
                {
                    if let Ok(Some(st)) = child.try_wait() {
                        let stderr = stderr_of(child).await;
                        let _ = std::fs::remove_file(&sock);
                        return Err(StoreError::tool(
                            "qemu-nbd",
                            ToolFault::Exited {
                                stderr,
                                context: format!("{st}, exporting {what}"),
                            },
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                other => break other,
            }
        };
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill().await;
                let _ = std::fs::remove_file(&sock);
                return Err(StoreError::nbd(what, e));
            }
        };
        tracing::debug!(pid = child.id().unwrap_or(0), what = %what, "qemu-nbd export started");
        Ok(Export {
            child: guard,
            sock,
            client,
            what,
        })
    }

    /// Largest request length to use.
    pub(crate) fn chunk(&self) -> u64 {
        u64::from(self.client.max_request().clamp(4096, 32 << 20))
    }

    /// FLUSH, disconnect and wait for qemu-nbd to exit cleanly.
    pub(crate) async fn finish(mut self) -> Result<(), StoreError> {
        let res = async {
            self.client
                .flush()
                .await
                .map_err(|e| StoreError::nbd(self.what.clone(), e))?;
            self.client
                .clone()
                .disconnect()
                .await
                .map_err(|e| StoreError::nbd(self.what.clone(), e))?;
            let Some(child) = self.child.0.as_mut() else {
                return Ok(());
            };
            let st = tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .map_err(|_| StoreError::tool("qemu-nbd", ToolFault::NoExit(self.what.clone())))?
                .map_err(|e| StoreError::tool("qemu-nbd", ToolFault::Wait(e)))?;
            if !st.success() {
                let stderr = stderr_of(child).await;
                return Err(StoreError::tool(
                    "qemu-nbd",
                    ToolFault::Exited {
                        stderr,
                        context: format!("{st}, {}", self.what),
                    },
                ));
            }
            Ok(())
        }
        .await;
        let _ = std::fs::remove_file(&self.sock);
        if let Some(mut child) = self.child.0.take()
            && res.is_err()
        {
            let _ = child.kill().await;
        }
        res
    }

    /// Kill qemu-nbd without flushing (error path).
    pub(crate) async fn abort(mut self) {
        if let Some(mut child) = self.child.0.take() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        if let Some(pid) = self.child.0.as_ref().and_then(Child::id) {
            tracing::debug!(pid, what = %self.what, "qemu-nbd export dropped");
        }
    }
}

/// A child process that is killed and waited for when dropped, by a task of the runtime
/// (tokio's own reaping of a `kill_on_drop` child is best effort: it runs on a later SIGCHLD,
/// and was seen to leave a zombie of the agent for as long as no other child ended); without
/// a runtime, `kill_on_drop` kills it.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = child.kill().await;
            });
        }
    }
}

async fn stderr_of(child: &mut Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut s)).await;
    }
    s.trim().to_owned()
}
