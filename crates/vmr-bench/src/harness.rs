//! The processes of a benchmark: the release `vmreplica` binary driven as an admin would (CLI
//! with `--dir` and `--json`), two agents on 127.0.0.1 per scenario, qemu-storage-daemon
//! stand-in VMs built like `examples/standin-vm.toml`, and a direct reader of the agents'
//! control socket (the same JSON-lines protocol the CLI speaks) for tight status polling.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use uuid::Uuid;
use vmr_proto::VmDefinition;
use vmr_proto::api::{Request, Response, VmStatus};
use vmr_testkit::{ChildGuard, wait_for_path};

/// Run `vmreplica --dir DIR --json ARGS...`; its stdout, or an error with its stderr.
pub fn vmr(exe: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .args(args)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "vmreplica {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One request over an agent's control socket (`DIR/agent.sock`), as the CLI sends it.
pub fn ctl(dir: &Path, req: &Request) -> anyhow::Result<Value> {
    let path = dir.join("agent.sock");
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("connecting to the agent at {}", path.display()))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    match serde_json::from_str::<Response>(&answer).context("bad answer from the agent")? {
        Response::Ok { value } => Ok(value),
        Response::Err { chain, .. } => bail!("agent error: {}", chain.join(": ")),
    }
}

/// Status rows (all VMs, or one) of the agent owning `dir`.
pub fn statuses(dir: &Path, name: Option<&str>) -> anyhow::Result<Vec<VmStatus>> {
    let v = ctl(
        dir,
        &Request::Status {
            name: name.map(str::to_owned),
        },
    )?;
    Ok(serde_json::from_value(v)?)
}

/// The status row of one VM.
pub fn status(dir: &Path, name: &str) -> anyhow::Result<VmStatus> {
    statuses(dir, Some(name))?
        .pop()
        .with_context(|| format!("no status row for {name}"))
}

/// Poll `dir`'s status of `name` every `every` until `pred` holds; returns the row and when.
pub fn wait_status(
    dir: &Path,
    name: &str,
    timeout: Duration,
    every: Duration,
    pred: impl Fn(&VmStatus) -> bool,
) -> anyhow::Result<(VmStatus, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if let Ok(s) = status(dir, name) {
            if pred(&s) {
                return Ok((s, now));
            }
            if now > deadline {
                bail!(
                    "{name} did not reach the wanted state within {timeout:?}: {} {} last cycle {:?} ({})",
                    s.state,
                    s.health,
                    s.last_cycle,
                    s.health_reason
                );
            }
        } else if now > deadline {
            bail!("{name}: no status within {timeout:?}");
        }
        std::thread::sleep(every);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running `vmreplica agent`.
pub struct Agent {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Replication listener port on 127.0.0.1.
    pub port: u16,
    /// Certificate fingerprint.
    pub fingerprint: String,
    guard: ChildGuard,
}

impl Agent {
    fn create(exe: &Path, dir: &Path, name: &str) -> anyhow::Result<Agent> {
        let port = free_port()?;
        let out = vmr(
            exe,
            dir,
            &[
                "init",
                "--name",
                name,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
        )?;
        let fingerprint = out
            .lines()
            .rev()
            .map(|l| l.trim().trim_matches('"'))
            .find(|l| !l.is_empty())
            .context("init printed no fingerprint")?
            .to_owned();
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--dir")
            .arg(dir)
            .arg("agent")
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = ChildGuard::spawn(cmd, "vmreplica agent")?;
        let sock = dir.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&sock).is_err() {
            if !guard.is_running() || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                bail!("the agent in {} did not start:\n{log}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Agent {
            dir: dir.to_path_buf(),
            port,
            fingerprint,
            guard,
        })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Stop the agent (SIGTERM, then SIGKILL after 20 s).
    pub fn stop(&mut self) {
        let _ = self.guard.terminate(Duration::from_secs(20));
    }
}

/// Two agents (host-a primary, host-b replica authorizing host-a) in `root`.
pub struct Pair {
    /// Scenario directory.
    pub root: PathBuf,
    /// Primary agent.
    pub a: Agent,
    /// Replica agent.
    pub b: Agent,
    /// The vmreplica binary.
    pub exe: PathBuf,
}

impl Pair {
    /// Create and start both agents under `root`.
    pub fn new(exe: &Path, root: &Path) -> anyhow::Result<Pair> {
        std::fs::create_dir_all(root)?;
        let a = Agent::create(exe, &root.join("host-a"), "host-a")?;
        let b = Agent::create(exe, &root.join("host-b"), "host-b")?;
        vmr(
            exe,
            &b.dir,
            &[
                "server",
                "allow",
                "--primary",
                "host-a",
                "--fingerprint",
                &a.fingerprint,
            ],
        )?;
        Ok(Pair {
            root: root.to_path_buf(),
            a,
            b,
            exe: exe.to_path_buf(),
        })
    }

    /// `vmreplica` on the primary.
    pub fn on_a(&self, args: &[&str]) -> anyhow::Result<String> {
        vmr(&self.exe, &self.a.dir, args)
    }

    /// `vmreplica` on the replica.
    pub fn on_b(&self, args: &[&str]) -> anyhow::Result<String> {
        vmr(&self.exe, &self.b.dir, args)
    }

    /// Register `vm` on the primary (`vm add`).
    pub fn add(&self, vm: &Vm) -> anyhow::Result<()> {
        self.on_a(&[
            "vm",
            "add",
            &vm.name,
            "--qmp",
            &vm.qmp.display().to_string(),
            "--launch",
            &vm.launch.display().to_string(),
        ])?;
        Ok(())
    }

    /// `vmreplica enable NAME --frequency F` towards host-b.
    pub fn enable(&self, name: &str, frequency: &str, points: u32) -> anyhow::Result<()> {
        self.on_a(&[
            "enable",
            name,
            "--replica",
            &format!("127.0.0.1:{}", self.b.port),
            "--replica-fingerprint",
            &self.b.fingerprint,
            "--frequency",
            frequency,
            "--recovery-points",
            &points.to_string(),
        ])?;
        Ok(())
    }

    /// Wait until the replica has applied cycle `id` (or later) of `name`.
    pub fn wait_applied(&self, name: &str, id: u64, timeout: Duration) -> anyhow::Result<Instant> {
        Ok(
            wait_status(&self.b.dir, name, timeout, Duration::from_millis(10), |s| {
                s.last_cycle.unwrap_or(0) >= id
            })?
            .1,
        )
    }

    /// Wait until the primary has committed cycle `id` (or later) of `name`.
    pub fn wait_committed(
        &self,
        name: &str,
        id: u64,
        timeout: Duration,
    ) -> anyhow::Result<(VmStatus, Instant)> {
        wait_status(&self.a.dir, name, timeout, Duration::from_millis(10), |s| {
            s.last_cycle.unwrap_or(0) >= id
        })
    }

    /// Stop both agents.
    pub fn stop(&mut self) {
        self.a.stop();
        self.b.stop();
    }
}

/// A disk of a stand-in VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Node name (also the NBD export name).
    pub node: String,
    /// Virtual size.
    pub size: u64,
    /// qcow2 `preallocation=metadata` (writes never allocate clusters).
    pub prealloc: bool,
    /// Use this existing image instead of creating one.
    pub existing: Option<PathBuf>,
}

impl DiskSpec {
    /// A new sparse qcow2 disk.
    pub fn new(node: &str, size: u64) -> Self {
        Self {
            node: node.into(),
            size,
            prealloc: false,
            existing: None,
        }
    }
}

/// A qemu-storage-daemon stand-in VM, registered nowhere yet.
pub struct Vm {
    /// Name.
    pub name: String,
    /// QMP socket reserved for vmreplica.
    pub qmp: PathBuf,
    /// NBD socket the guest writer and the capture use.
    pub nbd: PathBuf,
    /// Disk images, by node.
    pub disks: Vec<(String, PathBuf)>,
    /// The definition file.
    pub launch: PathBuf,
    guard: ChildGuard,
}

impl Vm {
    /// The qemu-storage-daemon's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Stop the VM (SIGTERM; images stay).
    pub fn stop(&mut self) {
        let _ = self.guard.terminate(Duration::from_secs(10));
    }
}

/// `qemu-img ARGS`, failing with its stderr.
pub fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Start a stand-in VM named `name` whose files live in `vmdir`; its NBD socket is where the
/// primary agent in `agent_dir` expects it (`work/<tag>/vmr-<tag>-nbd.sock`).
pub fn start_vm(
    agent_dir: &Path,
    vmdir: &Path,
    name: &str,
    disks: &[DiskSpec],
) -> anyhow::Result<Vm> {
    std::fs::create_dir_all(vmdir)?;
    let uuid = Uuid::new_v4();
    let mut paths = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for d in disks {
        let path = match &d.existing {
            Some(p) => p.clone(),
            None => {
                let p = vmdir.join(format!("{name}-{}.qcow2", d.node));
                let pre = if d.prealloc {
                    "preallocation=metadata"
                } else {
                    "preallocation=off"
                };
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    pre,
                    &p.display().to_string(),
                    &d.size.to_string(),
                ])?;
                p
            }
        };
        let n = &d.node;
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name={n}-file,filename={{disk:{n}}},discard=unmap"
        ));
        args.push("--blockdev".into());
        args.push(format!(
            "driver=qcow2,node-name={n},file={n}-file,discard=unmap"
        ));
        paths.push((n.clone(), path));
    }
    args.extend(
        [
            "--chardev",
            "socket,id=vmr,path={qmp},server=on,wait=off",
            "--monitor",
            "chardev=vmr",
            "--nbd-server",
            "addr.type=unix,addr.path={nbd}",
        ]
        .map(String::from),
    );
    for d in disks {
        args.push("--export".into());
        args.push(format!(
            "type=nbd,id=live-{n},node-name={n},name={n},writable=on",
            n = d.node
        ));
    }
    let mut toml = format!(
        "name = {name:?}\nuuid = \"{uuid}\"\nprogram = \"qemu-storage-daemon\"\nargs = [\n"
    );
    for a in &args {
        toml.push_str(&format!("  {a:?},\n"));
    }
    toml.push_str("]\n");
    for (n, p) in &paths {
        toml.push_str(&format!(
            "\n[[disks]]\nnode = {n:?}\npath = {:?}\n",
            p.display().to_string()
        ));
    }
    let def = VmDefinition::from_toml(&toml).context("the stand-in definition")?;
    let launch = vmdir.join(format!("{name}.toml"));
    std::fs::write(&launch, &toml)?;
    let tag = uuid.simple().to_string()[..8].to_owned();
    let nbd = agent_dir
        .join("work")
        .join(&tag)
        .join(format!("vmr-{tag}-nbd.sock"));
    if let Some(p) = nbd.parent() {
        std::fs::create_dir_all(p)?;
    }
    let qmp = vmdir.join(format!("{name}.qmp"));
    let rendered = def.render_args(
        &qmp.display().to_string(),
        &nbd.display().to_string(),
        "tcg",
        false,
        &|n| {
            paths
                .iter()
                .find(|(node, _)| node == n)
                .map(|(_, p)| p.display().to_string())
        },
    )?;
    let log = std::fs::File::create(vmdir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(&def.program);
    cmd.args(rendered)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let guard = ChildGuard::spawn(cmd, "qemu-storage-daemon stand-in VM")?;
    wait_for_path(&qmp, Duration::from_secs(20))?;
    wait_for_path(&nbd, Duration::from_secs(20))?;
    Ok(Vm {
        name: name.to_owned(),
        qmp,
        nbd,
        disks: paths,
        launch,
        guard,
    })
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ut: f64 = f.get(11).context("no utime")?.parse()?;
    let st: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((ut + st) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident set size (VmHWM) of a process, bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?;
    Ok(kb * 1024)
}
