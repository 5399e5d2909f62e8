//! Agents as child processes: `vmreplica init` + `vmreplica agent` in a directory, driven
//! through the CLI and the control socket; a primary/replica [`Pair`]; the [`TestDir`] that
//! holds them and kills whatever still runs from it when dropped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmr_proto::api::{Request, Response, VmStatus};

use super::{HarnessError, Result, io_err, wait_every};
use crate::proc::ChildGuard;

/// A port of 127.0.0.1 for a listener a test starts later (an agent, a server), free now and
/// kept free for it until this process ends.
///
/// The kernel's own pick (`bind` to port 0) comes from the ephemeral range, from which it also
/// gives every outgoing connection its local port: between this call and the listener's
/// `bind`, a connection of any process on the host could take it ("Address already in use",
/// seen in a stressed round). So the port comes from below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), where no connection gets a port by itself, and
/// is reserved against the other test processes by an exclusive `flock` on
/// `$TMPDIR/vmr-test-ports/PORT.lock`, held until this process exits. Falls back to the kernel's
/// pick when that range is too small.
pub fn free_port() -> Result<u16> {
    static HELD: std::sync::Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> =
        std::sync::Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (first, last) = (10_000u16, low.saturating_sub(1));
    if last > first + 1000 {
        let dir = std::env::temp_dir().join("vmr-test-ports");
        std::fs::create_dir_all(&dir).map_err(io_err("create the test port lock directory"))?;
        let span = u32::from(last - first) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span {
            let port = (u32::from(first) + (start + i) % span) as u16;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(format!("{port}.lock")))
                .map_err(io_err("open a test port lock file"))?;
            let Ok(lock) =
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            else {
                continue;
            };
            // Reserved against the other test processes; free on the host right now?
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            HELD.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(lock);
            return Ok(port);
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("find a free port on 127.0.0.1"))
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One agent: its directory, address, fingerprint and process.
#[derive(Debug)]
pub struct Agent {
    /// Its directory.
    pub dir: PathBuf,
    /// Its name (`init --name`).
    pub name: String,
    /// The address to reach its replication listener at (`127.0.0.1:PORT` unless started with
    /// [`Agent::start_on`]).
    pub addr: String,
    /// The listener's port.
    pub port: u16,
    /// Its certificate fingerprint.
    pub fingerprint: String,
    exe: PathBuf,
    /// What starts the agent process instead of `exe` (a wrapper that runs `exe` in a network
    /// namespace); the CLI always runs `exe` directly.
    launcher: Option<PathBuf>,
    child: Option<ChildGuard>,
    /// Extra environment of the agent process (test hooks), from the next (re)start.
    env: Vec<(String, String)>,
}

impl Agent {
    /// `vmreplica init` in `root/name` (listening on a free port of 127.0.0.1) and start the
    /// agent; returns once its control socket answers.
    pub fn start(exe: &Path, root: &Path, name: &str) -> Result<Agent> {
        Self::start_on(exe, root, name, "127.0.0.1", None)
    }

    /// Like [`Agent::start`], listening on `ip` (a loopback address such as `127.0.0.2`, or
    /// the wildcard `0.0.0.0`, then reached at 127.0.0.1) and `port` (a free one when `None`).
    pub fn start_on(
        exe: &Path,
        root: &Path,
        name: &str,
        ip: &str,
        port: Option<u16>,
    ) -> Result<Agent> {
        let dir = root.join(name);
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let listen = format!("{ip}:{port}");
        let reach = if ip == "0.0.0.0" { "127.0.0.1" } else { ip };
        let addr = format!("{reach}:{port}");
        let mut a = Agent {
            dir,
            name: name.to_owned(),
            addr,
            port,
            fingerprint: String::new(),
            exe: exe.to_path_buf(),
            launcher: None,
            child: None,
            env: Vec::new(),
        };
        let out = a.ok(&["init", "--name", name, "--listen", &listen])?;
        a.fingerprint = out.trim().to_owned();
        a.restart()?;
        Ok(a)
    }

    /// Like [`Agent::start_on`] on `ip:port`, the agent process started by `launcher` (e.g. a
    /// [`super::Net3::wrapper`] that runs `exe` inside a network namespace owning `ip`), now
    /// and at every restart; the CLI runs `exe` on the host, over the control socket.
    pub fn start_launched(
        exe: &Path,
        launcher: &Path,
        root: &Path,
        name: &str,
        ip: &str,
        port: u16,
    ) -> Result<Agent> {
        let dir = root.join(name);
        let listen = format!("{ip}:{port}");
        let mut a = Agent {
            dir,
            name: name.to_owned(),
            addr: listen.clone(),
            port,
            fingerprint: String::new(),
            exe: exe.to_path_buf(),
            launcher: Some(launcher.to_path_buf()),
            child: None,
            env: Vec::new(),
        };
        let out = a.ok(&["init", "--name", name, "--listen", &listen])?;
        a.fingerprint = out.trim().to_owned();
        a.restart()?;
        Ok(a)
    }

    /// Add top-level `lines` (`key = value`, one per line) to the agent's `config.toml`, before
    /// its first table (`[events]`, which `init` writes): a key after a table header would
    /// belong to that table. Takes effect at the next (re)start.
    pub fn add_config(&self, lines: &str) -> Result<()> {
        let cfg = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&cfg).map_err(io_err("reading config.toml"))?;
        let at = text
            .match_indices('\n')
            .map(|(i, _)| i + 1)
            .find(|&i| text[i..].starts_with('['))
            .unwrap_or(text.len());
        let mut out = String::with_capacity(text.len() + lines.len() + 1);
        out.push_str(&text[..at]);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(lines);
        if !lines.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&text[at..]);
        std::fs::write(&cfg, out).map_err(io_err("writing config.toml"))?;
        Ok(())
    }

    /// Set `key=value` in the agent process's environment (a test hook such as the store's
    /// `VMR_STORE_TEST_IMPORT_SLOW_MS`); takes effect at the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// (Re)start the agent process and wait until its control socket answers a status request.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open the agent log"))?;
        let log2 = log.try_clone().map_err(io_err("open the agent log"))?;
        let mut cmd = Command::new(self.launcher.as_ref().unwrap_or(&self.exe));
        cmd.arg("--dir").arg(&self.dir).arg("agent");
        // VMREPLICA_LOG in the test's (or the benchmark runner's) environment overrides the
        // agents' log filter, e.g. to see the transport's or the capture's debug lines.
        let filter = std::env::var("VMREPLICA_LOG")
            .unwrap_or_else(|_| "info,vmreplica=debug,vmr_agent=debug,vmr_store=debug".into());
        cmd.env("VMREPLICA_LOG", filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log);
        let mut child = ChildGuard::spawn(cmd, "vmreplica agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctl(&Request::Status { name: None }).is_ok() {
                break;
            }
            let reason = if !child.is_running() {
                "it exited"
            } else if Instant::now() > deadline {
                "its control socket did not answer within 30 s"
            } else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            return Err(HarnessError::AgentStart {
                dir: self.dir.clone(),
                reason: reason.to_owned(),
                log: self.log(),
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// The agent's pid (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// SIGKILL the agent (an unclean exit).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// Stop the agent cleanly (SIGTERM; SIGKILL after 20 s, reported as an error).
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut c) => c
                .terminate(Duration::from_secs(20))
                .map_err(|e| HarnessError::Exited {
                    what: format!("agent {} ({e})", self.name),
                    log: tail(&self.log(), 40),
                }),
            None => Ok(()),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The storage directory of its replica VMs (the default of `server allow`).
    pub fn storage(&self) -> PathBuf {
        self.dir.join("replicas")
    }

    /// Run `vmreplica --dir DIR ARGS...`, whatever its exit status.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.exe)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("run {}", self.exe.display())))
    }

    /// Start `vmreplica --dir DIR ARGS...` without waiting for it (stdout and stderr piped),
    /// for a command a test acts around while it runs.
    pub fn spawn_cli(&self, args: &[&str]) -> Result<std::process::Child> {
        Command::new(&self.exe)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("run {}", self.exe.display())))
    }

    /// Run a CLI command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            return Err(HarnessError::Cli {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                log: tail(&self.log(), 40),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Self::ok`] with the global `--json` flag: machine-readable output.
    pub fn json(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    /// One request over the control socket (`DIR/agent.sock`), as the CLI sends it.
    pub fn ctl(&self, req: &Request) -> Result<Value> {
        let path = self.dir.join("agent.sock");
        let mut s =
            UnixStream::connect(&path).map_err(io_err(format!("connect to {}", path.display())))?;
        let json = |source| HarnessError::Json {
            what: format!("the control socket of {}", self.name),
            source,
        };
        let mut line = serde_json::to_string(req).map_err(json)?;
        line.push('\n');
        s.write_all(line.as_bytes())
            .map_err(io_err("send a control request"))?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(io_err("read a control answer"))?;
        match serde_json::from_str::<Response>(&answer).map_err(json)? {
            Response::Ok { value } => Ok(value),
            Response::Err { chain, .. } => Err(HarnessError::Agent {
                chain: chain.join(": "),
            }),
        }
    }

    /// Status rows of every VM (`None`) or of one.
    pub fn statuses(&self, vm: Option<&str>) -> Result<Vec<VmStatus>> {
        let v = self.ctl(&Request::Status {
            name: vm.map(str::to_owned),
        })?;
        serde_json::from_value(v).map_err(|source| HarnessError::Json {
            what: format!("the status of {}", self.name),
            source,
        })
    }

    /// Wait until the replica VM `vm` (UUID) has no prune running, before its store is read
    /// from outside this agent: a prune right after a commit may still copy into, merge down
    /// or delete the layers of the point `status` already shows, and the VM's owner answers
    /// `points` only after it (docs/agent.md, "One owner per VM"). Nothing to wait for when the
    /// agent is stopped or the VM is not a replica here (the agent refuses `points`).
    pub fn settle(&self, vm: uuid::Uuid) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        let Some(name) = self
            .statuses(None)?
            .into_iter()
            .find(|s| s.uuid == vm)
            .map(|s| s.name)
        else {
            return Ok(());
        };
        match self.ctl(&Request::Points {
            name,
            estimate: None,
        }) {
            Ok(_) | Err(HarnessError::Agent { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The status row of `vm`.
    pub fn status(&self, vm: &str) -> Result<VmStatus> {
        self.statuses(Some(vm))?
            .pop()
            .ok_or_else(|| HarnessError::NoStatusRow { vm: vm.to_owned() })
    }

    /// This (primary) agent's consistency groups (`group list`).
    pub fn groups(&self) -> Result<Vec<vmr_proto::api::GroupStatus>> {
        let v = self.ctl(&Request::GroupList)?;
        serde_json::from_value(v).map_err(|source| HarnessError::Json {
            what: format!("the groups of {}", self.name),
            source,
        })
    }

    /// This (replica) agent's complete points of group `name`, newest first (`group points`).
    pub fn group_points(&self, name: &str) -> Result<Vec<vmr_proto::api::GroupPointInfo>> {
        let v = self.ctl(&Request::GroupPoints {
            name: name.to_owned(),
        })?;
        serde_json::from_value(v).map_err(|source| HarnessError::Json {
            what: format!("the points of group {name} on {}", self.name),
            source,
        })
    }

    /// Allow `primary` to replicate to this agent (`server allow`).
    pub fn allow(&self, primary: &Agent) -> Result<()> {
        self.ok(&[
            "server",
            "allow",
            "--primary",
            &primary.name,
            "--fingerprint",
            &primary.fingerprint,
        ])
        .map(drop)
    }

    /// Poll this agent's status of `vm` every `every` until `pred` holds; the row and when its
    /// answer arrived (a VM's owner answers only between its commands, so that can be well
    /// after the change: timings use [`Agent::wait_cycle_recorded`]).
    pub fn wait_status(
        &self,
        vm: &str,
        timeout: Duration,
        every: Duration,
        what: &str,
        pred: impl Fn(&VmStatus) -> bool,
    ) -> Result<(VmStatus, Instant)> {
        let mut seen = None;
        let r = wait_every(timeout, every, what, || {
            let s = self.status(vm)?;
            let answered = Instant::now();
            let ok = pred(&s);
            seen = Some((s, answered));
            Ok(ok)
        });
        match (r, seen) {
            (Ok(()), Some(s)) => Ok(s),
            (Ok(()), None) => Err(HarnessError::NoStatusRow { vm: vm.to_owned() }),
            (Err(HarnessError::Timeout { what, after, last }), Some((s, _))) => {
                Err(HarnessError::Timeout {
                    what: format!(
                        "{what} (last seen: {} {}, last cycle {:?}, {})",
                        s.state, s.health, s.last_cycle, s.health_reason
                    ),
                    after,
                    last,
                })
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Wait until this agent reports cycle `id` (or later) of `vm` done (committed on a
    /// primary, applied on a replica); the row and when it was read (polled every 10 ms).
    pub fn wait_cycle(&self, vm: &str, id: u64, timeout: Duration) -> Result<(VmStatus, Instant)> {
        self.wait_status(
            vm,
            timeout,
            Duration::from_millis(10),
            &format!("cycle {id} of {vm} on {}", self.name),
            |s| s.last_cycle.unwrap_or(0) >= id,
        )
    }

    /// Wait for cycle `id` of `vm` as [`Agent::wait_cycle`] does and return how long after
    /// `since_ms` (ms since the epoch, this host's clock) this agent recorded it: its own
    /// `last_replication_ms`, set as the cycle was committed (replica) or acknowledged
    /// (primary). A poll's instant is no measure of that: the VM's owner answers a status only
    /// between its commands, so a poll sent during the commit is answered after it.
    pub fn wait_cycle_recorded(
        &self,
        vm: &str,
        id: u64,
        timeout: Duration,
        since_ms: u64,
    ) -> Result<(VmStatus, Duration)> {
        let (s, _) = self.wait_cycle(vm, id, timeout)?;
        let at = s
            .last_replication_ms
            .ok_or_else(|| HarnessError::NoCycleTime { vm: vm.to_owned() })?;
        Ok((s, Duration::from_millis(at.saturating_sub(since_ms))))
    }
}

/// The directory a harness run lives in: a temp dir (removed on drop; kept after a panic when
/// `VMR_E2E_KEEP` is set) or a given one (left in place). On drop, every process whose command
/// line names the directory is killed first: VMs an agent started for a failover outlive the
/// agent on purpose, and a test may panic before it learnt their pids.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl TestDir {
    /// A new temp dir named `prefix…`.
    pub fn temp(prefix: &str) -> Result<TestDir> {
        let t = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(io_err("create a temp dir"))?;
        Ok(TestDir {
            path: t.path().to_path_buf(),
            temp: Some(t),
        })
    }

    /// A given directory (created if missing), not removed on drop.
    pub fn given(path: &Path) -> Result<TestDir> {
        std::fs::create_dir_all(path).map_err(io_err(format!("create {}", path.display())))?;
        Ok(TestDir {
            path: path.to_path_buf(),
            temp: None,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the temp dir after drop; its path.
    pub fn keep(mut self) -> PathBuf {
        if let Some(t) = self.temp.take() {
            // The TempDir no longer deletes; `self` still kills leftovers on drop.
            let _ = t.keep();
        }
        self.path.clone()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_processes_under(&self.path);
        if std::thread::panicking()
            && std::env::var_os("VMR_E2E_KEEP").is_some()
            && let Some(t) = self.temp.take()
        {
            eprintln!("kept {}", t.keep().display());
        }
    }
}

/// SIGKILL every process (but this one) whose command line names `dir` or a path under it;
/// how many. Reads `/proc`, so it finds processes whatever started them.
pub fn kill_processes_under(dir: &Path) -> usize {
    let Some(d) = dir.to_str() else {
        return 0;
    };
    let under = format!("{}/", d.trim_end_matches('/'));
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline.split(|b| *b == 0).any(|arg| {
            let arg = String::from_utf8_lossy(arg);
            arg == d || arg.contains(&under)
        });
        if names_dir {
            crate::proc::sigkill(pid);
            n += 1;
        }
    }
    n
}

/// Two agents in one directory: `a` (primary) and `b` (replica, allowing `a`).
#[derive(Debug)]
pub struct Pair {
    /// The primary, `host-a`.
    pub a: Agent,
    /// The replica, `host-b`.
    pub b: Agent,
    /// Their directory (dropped last: kills leftovers).
    pub root: TestDir,
}

impl Pair {
    /// Start both agents in a new temp dir and authorize a on b.
    pub fn new(exe: &Path) -> Result<Pair> {
        Self::in_dir(exe, TestDir::temp("vmr-e2e-")?)
    }

    /// Start both agents in `root` and authorize a on b.
    pub fn in_dir(exe: &Path, root: TestDir) -> Result<Pair> {
        let a = Agent::start(exe, root.path(), "host-a")?;
        let b = Agent::start(exe, root.path(), "host-b")?;
        b.allow(&a)?;
        Ok(Pair { a, b, root })
    }

    /// `enable VM` from a to b with extra arguments.
    pub fn enable(&self, vm: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "enable",
            vm,
            "--replica",
            &self.b.addr,
            "--replica-fingerprint",
            &self.b.fingerprint,
        ];
        args.extend_from_slice(extra);
        self.a.ok(&args).map(drop)
    }

    /// Wait until the primary reports cycle `id` committed and the replica applied it.
    pub fn wait_cycle(&self, vm: &str, id: u64, timeout: Duration) -> Result<()> {
        self.a.wait_cycle(vm, id, timeout)?;
        self.b.wait_cycle(vm, id, timeout)?;
        Ok(())
    }

    /// Wait until the replica holds a point of `vm` cut strictly after `after_ms` (ms since
    /// the epoch, this host's clock, which the primary's cut times use too): with the writes
    /// done before `after_ms` was read, that point holds all of them. A cycle's number says
    /// less: the primary may adopt a cycle the replica committed before its acknowledgement
    /// was lost (cut before the writes ended) as the next one. Returns the replica's row.
    pub fn wait_point_cut_after(
        &self,
        vm: &str,
        after_ms: u64,
        timeout: Duration,
    ) -> Result<VmStatus> {
        self.b
            .wait_status(
                vm,
                timeout,
                Duration::from_millis(10),
                &format!("a point of {vm} cut after {after_ms} on {}", self.b.name),
                |s| s.last_point_ms.is_some_and(|t| t > after_ms),
            )
            .map(|(s, _)| s)
    }

    /// The primary's replication state of `vm`.
    pub fn state(&self, vm: &str) -> Result<vmr_proto::api::ReplicationState> {
        Ok(self.a.status(vm)?.state)
    }

    /// Stop both agents cleanly.
    pub fn stop(&mut self) -> Result<()> {
        let a = self.a.stop();
        let b = self.b.stop();
        a.and(b)
    }
}

/// Three agents in one directory for extended replication: `a` (primary), `b` (its replica,
/// allowing `a`) and `c` (the extended replica, allowing `b` only).
#[derive(Debug)]
pub struct Chain {
    /// The primary, `host-a`.
    pub a: Agent,
    /// The replica that forwards, `host-b`.
    pub b: Agent,
    /// The extended replica, `host-c`.
    pub c: Agent,
    /// Their directory (dropped last: kills leftovers).
    pub root: TestDir,
}

impl Chain {
    /// Start the three agents in a new temp dir; b allows a, c allows b.
    pub fn new(exe: &Path) -> Result<Chain> {
        Chain::in_dir(exe, TestDir::temp("vmr-e2e-")?)
    }

    /// Start the three agents in `root` (e.g. a benchmark run's directory); b allows a, c
    /// allows b.
    pub fn in_dir(exe: &Path, root: TestDir) -> Result<Chain> {
        let a = Agent::start(exe, root.path(), "host-a")?;
        let b = Agent::start(exe, root.path(), "host-b")?;
        let c = Agent::start(exe, root.path(), "host-c")?;
        b.allow(&a)?;
        c.allow(&b)?;
        Ok(Chain { a, b, c, root })
    }

    /// `enable VM` from a to b with extra arguments.
    pub fn enable(&self, vm: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "enable",
            vm,
            "--replica",
            &self.b.addr,
            "--replica-fingerprint",
            &self.b.fingerprint,
        ];
        args.extend_from_slice(extra);
        self.a.ok(&args).map(drop)
    }

    /// `enable VM --extended` on b, to c, with extra arguments.
    pub fn enable_extended(&self, vm: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "enable",
            vm,
            "--extended",
            "--replica",
            &self.c.addr,
            "--replica-fingerprint",
            &self.c.fingerprint,
        ];
        args.extend_from_slice(extra);
        self.b.ok(&args).map(drop)
    }

    /// Let each replica probe its source (the split-brain guard across the chain: C asks B,
    /// B asks A): a allows b, b allows c.
    pub fn allow_probes(&self) -> Result<()> {
        self.a.allow(&self.b)?;
        self.b.allow(&self.c)
    }

    /// Stop the three agents cleanly.
    pub fn stop(&mut self) -> Result<()> {
        let a = self.a.stop();
        let b = self.b.stop();
        let c = self.c.stop();
        a.and(b).and(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_reserved() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("port range")
            .split_whitespace()
            .next()
            .expect("low end")
            .parse()
            .expect("number");
        let ports: Vec<u16> = (0..8).map(|_| free_port().expect("port")).collect();
        for p in &ports {
            assert!(*p < low, "port {p} is in the ephemeral range from {low}");
            // Another test process cannot reserve it: its lock is held (flock conflicts
            // between separate opens, in this process too).
            let f = std::fs::File::open(
                std::env::temp_dir()
                    .join("vmr-test-ports")
                    .join(format!("{p}.lock")),
            )
            .expect("lock file");
            assert!(
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
                "port {p} is not reserved"
            );
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }

    #[test]
    fn dropping_the_dir_kills_processes_that_name_it_and_only_those() {
        let dir = TestDir::temp("vmr-kill-").expect("dir");
        let marker = dir.path().join("marker");
        let spawn = |arg: &Path| {
            Command::new("sh")
                .args(["-c", "sleep 60; true"])
                .arg(arg)
                .spawn()
                .expect("sh")
        };
        let mut inside = spawn(&marker);
        let other = tempfile::tempdir().expect("other");
        let mut outside = spawn(other.path());
        // /proc shows the new command line once exec is done.
        wait_every(
            Duration::from_secs(10),
            Duration::from_millis(10),
            "sh to exec",
            || {
                let cmd = std::fs::read(format!("/proc/{}/cmdline", inside.id()))
                    .map_err(io_err("read cmdline"))?;
                Ok(String::from_utf8_lossy(&cmd).contains("marker"))
            },
        )
        .expect("exec");
        drop(dir);
        let st = inside.wait().expect("wait");
        assert!(!st.success(), "killed: {st:?}");
        assert!(outside.try_wait().expect("try_wait").is_none(), "untouched");
        outside.kill().expect("kill");
        outside.wait().expect("reap");
    }
}

/// Automatic failover's three agents (docs/auto-failover.md): a primary `host-a` on
/// 127.0.0.1, a replica `host-b` on 127.0.0.2 and a witness `host-w` on 127.0.0.3, distinct
/// ports and directories; b allows a (replication), w allows a and b (the lease calls).
#[derive(Debug)]
pub struct Witnessed {
    /// The primary.
    pub a: Agent,
    /// The replica.
    pub b: Agent,
    /// The witness.
    pub w: Agent,
    /// Their directory (dropped last: kills leftovers).
    pub root: TestDir,
}

impl Witnessed {
    /// Start the three agents in a new temp dir with their authorizations.
    pub fn new(exe: &Path) -> Result<Witnessed> {
        let root = TestDir::temp("vmr-e2e-")?;
        let a = Agent::start_on(exe, root.path(), "host-a", "127.0.0.1", None)?;
        let b = Agent::start_on(exe, root.path(), "host-b", "127.0.0.2", None)?;
        let w = Agent::start_on(exe, root.path(), "host-w", "127.0.0.3", None)?;
        b.allow(&a)?;
        w.allow(&a)?;
        w.allow(&b)?;
        Ok(Witnessed { a, b, w, root })
    }

    /// `enable VM` on the primary to the replica with automatic failover after `auto`,
    /// witnessed by the witness ([`enable_witnessed`]).
    pub fn enable(&self, vm: &str, auto: &str, extra: &[&str]) -> Result<()> {
        enable_witnessed([&self.a, &self.b, &self.w], vm, auto, extra)
    }

    /// Stop the three agents cleanly.
    pub fn stop(&mut self) -> Result<()> {
        self.a.stop()?;
        self.b.stop()?;
        self.w.stop()
    }
}

/// `enable VM` on the primary `a` to the replica `b` with `--auto-failover auto`, witnessed
/// by `w` (its address and fingerprint), then `extra` (the three agents of [`Witnessed`] or of
/// `Partitioned`).
pub fn enable_witnessed(
    [a, b, w]: [&Agent; 3],
    vm: &str,
    auto: &str,
    extra: &[&str],
) -> Result<()> {
    let mut args = vec![
        "enable",
        vm,
        "--replica",
        &b.addr,
        "--replica-fingerprint",
        &b.fingerprint,
        "--auto-failover",
        auto,
        "--witness",
        &w.addr,
        "--witness-fingerprint",
        &w.fingerprint,
    ];
    args.extend_from_slice(extra);
    a.ok(&args).map(drop)
}
