//! Real Linux guests (the cached Debian 12 test guest of `scripts/build-guest.sh`, see
//! `docs/real-guest.md`) as primary VMs: finding (or building) the guest, a per-VM qcow2
//! overlay on its root image, the VM definition that boots it (direct kernel boot, serial
//! console to `{dir}/serial.log`, no NIC, a second QMP monitor `{dir}/h.qmp` of the harness's
//! own), the `qemu-system-x86_64` process (killed on drop), and [`Console`]: a follower of a
//! serial log that timestamps the workload's `VMR CHECK` / `VMR SEQ` lines as they arrive.
//!
//! The guest disk is an overlay, not a copy: the primary's QEMU reads the root image through
//! it, replication reads the disk as the guest sees it (the whole backing chain), and the
//! replica stores its own full copy; the cached root image is only ever opened read-only.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vmr_proto::VmDefinition;
use vmr_proto::vmdef::DiskDef;

use super::agent::{Agent, tail};
use super::nbd::wait_qmp_greeting;
use super::{HarnessError, READY_TIMEOUT, Result, io_err};
use crate::proc::ChildGuard;

/// How long a TCG guest may take from QEMU's start to the workload's `VMR CHECK` line: 25-85 s
/// measured on 2 shared cores; generous, as other tests share the cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(360);

/// The cached guest: kernel, initramfs and root image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The guest directory (`CACHE/guest-vN`).
    pub dir: PathBuf,
}

static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);

impl GuestImage {
    /// The guest `script` (`scripts/build-guest.sh`) builds and caches: it prints the guest
    /// directory at once when the cache is there, builds it (root, network, ~3 min) when not.
    /// One build per process at a time; `$VMR_GUEST_CACHE` chooses the cache directory.
    pub fn ensure(script: &Path) -> Result<GuestImage> {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = built.as_ref().filter(|d| d.join("ready").exists()) {
            return Ok(GuestImage { dir: dir.clone() });
        }
        let out = Command::new(script)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("run {}", script.display())))?;
        if !out.status.success() {
            return Err(HarnessError::Tool {
                tool: format!(
                    "{} (the real test guest; it is built as root with network access)",
                    script.display()
                ),
                stderr: tail(&String::from_utf8_lossy(&out.stderr), 30),
            });
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let image = Self::at(&dir)?;
        *built = Some(dir);
        Ok(image)
    }

    /// The guest in `dir` (which must hold `ready`).
    pub fn at(dir: &Path) -> Result<GuestImage> {
        for f in ["ready", "vmlinuz", "initrd.img", "root.qcow2"] {
            if !dir.join(f).is_file() {
                return Err(HarnessError::Io {
                    what: format!("find the guest's {f} in {}", dir.display()),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
        }
        Ok(GuestImage {
            dir: dir.to_path_buf(),
        })
    }

    /// The kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }

    /// The root image (never written: VMs run on overlays).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
}

/// How a guest VM is set up.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// Memory, MiB.
    pub mem_mib: u64,
    /// The workload's transactions per second (`vmr.rate`).
    pub rate: u32,
    /// Run the workload (`vmr.workload=0` only checks).
    pub workload: bool,
    /// The `-machine accel=` value: `tcg` (default; KVM cannot boot Linux on the development
    /// machines, see `docs/real-guest.md`), `kvm`, or `{accel}` to let vmreplica choose when
    /// it starts the VM. `$VMR_GUEST_ACCEL` overrides the default.
    pub accel: String,
    /// `-no-shutdown` in the definition (a guest shutdown leaves QEMU running, as `failover
    /// prepare` needs): the harness's QEMU and every VM an agent starts from the replicated
    /// definition (failover, ping-pong) carry it.
    pub no_shutdown: bool,
    /// A guest agent channel through the `{qga}` placeholder (the harness's start puts it at
    /// `{dir}/qga.sock`, as vmreplica does for a VM it starts).
    pub qga: bool,
    /// A virtio NIC with this MAC on an isolated user-mode network (`restrict=on`: nothing
    /// leaves the host), as the definition's `network-args` run (a test failover drops it).
    pub nic_mac: Option<String>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            mem_mib: 512,
            rate: 20,
            workload: true,
            accel: std::env::var("VMR_GUEST_ACCEL").unwrap_or_else(|_| "tcg".to_owned()),
            no_shutdown: false,
            qga: false,
            nic_mac: None,
        }
    }
}

/// The definition of a guest VM `name` on `disk` (node `disk0`): `qemu-system-x86_64`, direct
/// kernel boot, serial console `{dir}/serial.log`, vmreplica's monitor `{qmp}` and the
/// harness's `{dir}/h.qmp` (also on a VM an agent's failover starts: see [`failover_qmp`]);
/// no NIC unless [`GuestOptions::nic_mac`], a guest agent channel (`{qga}`) when
/// [`GuestOptions::qga`], `-no-shutdown` with [`GuestOptions::no_shutdown`].
pub fn guest_definition(
    image: &GuestImage,
    name: &str,
    uuid: Uuid,
    disk: &Path,
    opts: &GuestOptions,
) -> VmDefinition {
    let mut append = format!(
        "root=/dev/vda ro console=ttyS0 quiet vmr.rate={}",
        opts.rate
    );
    if !opts.workload {
        append.push_str(" vmr.workload=0");
    }
    let args = vec![
        "-name".to_owned(),
        "{name}".to_owned(),
        "-uuid".to_owned(),
        "{uuid}".to_owned(),
        "-machine".to_owned(),
        format!("q35,accel={}", opts.accel),
        "-m".to_owned(),
        opts.mem_mib.to_string(),
        "-smp".to_owned(),
        "1".to_owned(),
        "-nodefaults".to_owned(),
        "-display".to_owned(),
        "none".to_owned(),
        "-kernel".to_owned(),
        image.kernel().display().to_string(),
        "-initrd".to_owned(),
        image.initrd().display().to_string(),
        "-append".to_owned(),
        append,
        "-blockdev".to_owned(),
        "driver=file,node-name=disk0-file,filename={disk:disk0}".to_owned(),
        "-blockdev".to_owned(),
        "driver=qcow2,node-name=disk0,file=disk0-file".to_owned(),
        "-device".to_owned(),
        "virtio-blk-pci,drive=disk0,id=vblk0".to_owned(),
        "-serial".to_owned(),
        "file:{dir}/serial.log".to_owned(),
        "-qmp".to_owned(),
        "unix:{qmp},server=on,wait=off".to_owned(),
        "-qmp".to_owned(),
        "unix:{dir}/h.qmp,server=on,wait=off".to_owned(),
    ];
    let mut args = args.to_vec();
    let network_args: Vec<String> = match &opts.nic_mac {
        Some(mac) => vec![
            "-netdev".to_owned(),
            "user,id=net0,restrict=on".to_owned(),
            "-device".to_owned(),
            format!("virtio-net-pci,netdev=net0,mac={mac}"),
        ],
        None => vec!["-nic".to_owned(), "none".to_owned()],
    };
    args.extend(network_args.iter().cloned());
    if opts.qga {
        args.extend(
            [
                "-chardev",
                "socket,path={qga},server=on,wait=off,id=qga0",
                "-device",
                "virtio-serial-pci",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]
            .map(str::to_owned),
        );
    }
    if opts.no_shutdown {
        args.push("-no-shutdown".to_owned());
    }
    VmDefinition {
        name: name.to_owned(),
        uuid,
        program: "qemu-system-x86_64".to_owned(),
        args,
        test_args: if opts.nic_mac.is_some() {
            vec!["-nic".to_owned(), "none".to_owned()]
        } else {
            vec![]
        },
        network_args: if opts.nic_mac.is_some() {
            network_args
        } else {
            vec![]
        },
        disks: vec![DiskDef {
            node: "disk0".to_owned(),
            path: disk.display().to_string(),
        }],
        libvirt_xml: None,
    }
}

/// The `{dir}` of the VM an agent's (live) failover started: `DIR/fo/<uuid>/live`.
pub fn failover_dir(agent: &Agent, uuid: Uuid) -> PathBuf {
    agent
        .dir
        .join("fo")
        .join(uuid.simple().to_string())
        .join("live")
}

/// Where a VM started by an agent's failover writes its console (`{dir}/serial.log`).
pub fn failover_serial(agent: &Agent, uuid: Uuid) -> PathBuf {
    failover_dir(agent, uuid).join("serial.log")
}

/// The harness's own QMP monitor of a VM an agent's failover started (`{dir}/h.qmp`): for
/// [`harness_qmp`] (`system_powerdown`, `query-status`).
pub fn failover_qmp(agent: &Agent, uuid: Uuid) -> PathBuf {
    failover_dir(agent, uuid).join("h.qmp")
}

/// A real guest VM the harness runs (`qemu-system-x86_64`), killed on drop.
#[derive(Debug)]
pub struct GuestVm {
    /// Its definition.
    pub def: VmDefinition,
    /// The definition file (`vm add --launch`).
    pub launch: PathBuf,
    /// vmreplica's QMP socket (`{qmp}`).
    pub qmp: PathBuf,
    /// The harness's own QMP socket (`{dir}/h.qmp`).
    pub harness_qmp: PathBuf,
    /// The serial console log.
    pub serial: PathBuf,
    /// Its overlay disk.
    pub disk: PathBuf,
    opts: GuestOptions,
    dir: PathBuf,
    child: Option<ChildGuard>,
    console: Option<Console>,
}

impl GuestVm {
    /// A VM `name` in `vmdir` (created): an overlay `vmdir/NAME-disk0.qcow2` on the guest's
    /// root image and the definition `vmdir/NAME.toml`; not started.
    pub fn create(
        vmdir: &Path,
        image: &GuestImage,
        name: &str,
        opts: GuestOptions,
    ) -> Result<GuestVm> {
        std::fs::create_dir_all(vmdir).map_err(io_err(format!("create {}", vmdir.display())))?;
        let disk = vmdir.join(format!("{name}-disk0.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.root())
            .arg(&disk)
            .output()
            .map_err(io_err("run qemu-img"))?;
        if !out.status.success() {
            return Err(HarnessError::Tool {
                tool: format!("qemu-img create (overlay {})", disk.display()),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let def = guest_definition(image, name, Uuid::new_v4(), &disk, &opts);
        def.validate()?;
        let launch = vmdir.join(format!("{name}.toml"));
        std::fs::write(&launch, def.to_toml())
            .map_err(io_err(format!("write {}", launch.display())))?;
        Ok(GuestVm {
            def,
            launch,
            qmp: vmdir.join(format!("{name}.qmp")),
            harness_qmp: vmdir.join("h.qmp"),
            serial: vmdir.join("serial.log"),
            disk,
            opts,
            dir: vmdir.to_path_buf(),
            child: None,
            console: None,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// QEMU's own output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start QEMU (a fresh console log); returns once both QMP monitors greet. The guest
    /// boots on its own: wait for it with [`Self::console`].
    pub fn start(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
        for f in [&self.qmp, &self.harness_qmp, &self.serial] {
            let _ = std::fs::remove_file(f);
        }
        let def = &self.def;
        let accel = if self.opts.accel == "{accel}" {
            "tcg"
        } else {
            &self.opts.accel
        };
        let qga = self.qga().display().to_string();
        let args = def.render_args_qga(
            &self.qmp.display().to_string(),
            "",
            Some(&qga),
            accel,
            false,
            &|n| {
                def.disks
                    .iter()
                    .find(|d| d.node == n)
                    .map(|d| d.path.clone())
            },
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open the guest's QEMU log"))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("open the guest's QEMU log"))?;
        let mut cmd = Command::new(&def.program);
        cmd.args(args).stdin(Stdio::null()).stdout(log2).stderr(log);
        let mut child = ChildGuard::spawn(cmd, "qemu-system-x86_64 guest VM")?;
        let ready = wait_qmp_greeting(&self.qmp, READY_TIMEOUT)
            .and_then(|()| wait_qmp_greeting(&self.harness_qmp, READY_TIMEOUT));
        if let Err(e) = ready {
            let what = format!("qemu-system-x86_64 {} did not greet ({e})", def.name);
            child.kill9();
            return Err(HarnessError::Exited {
                what,
                log: self.log(),
            });
        }
        self.child = Some(child);
        self.console = Some(Console::follow(&self.serial)?);
        Ok(())
    }

    /// The guest agent socket (`{qga}`, used when [`GuestOptions::qga`]).
    pub fn qga(&self) -> PathBuf {
        self.qmp.with_file_name("qga.sock")
    }

    /// The console of the running (or last) start.
    pub fn console(&self) -> Result<&Console> {
        self.console.as_ref().ok_or_else(|| HarnessError::Exited {
            what: format!("guest {} (never started)", self.def.name),
            log: String::new(),
        })
    }

    /// Wait for the workload's `VMR CHECK` line of this boot (also fails early when QEMU
    /// exits).
    pub fn wait_check(&mut self, timeout: Duration) -> Result<Check> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice =
                Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now()));
            match self.console()?.wait_check(slice) {
                Ok(c) => return Ok(c),
                Err(HarnessError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
            if !self.running() {
                return Err(HarnessError::Exited {
                    what: format!("guest {} before its VMR CHECK line", self.def.name),
                    log: format!(
                        "{}\n--- console ---\n{}",
                        self.log(),
                        self.console()?.tail(30)
                    ),
                });
            }
        }
    }

    /// Whether QEMU runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// QEMU's pid (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// SIGKILL QEMU (the host loses the VM; the disk is as the guest left it, crash-consistent;
    /// persistent bitmaps are not stored).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// One QMP command on the harness's own monitor; its `return` value.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value> {
        harness_qmp(&self.harness_qmp, command)
    }

    /// ACPI power button (`system_powerdown` on the harness's monitor): the guest shuts down.
    pub fn powerdown(&self) -> Result<()> {
        self.qmp("system_powerdown").map(drop)
    }

    /// Wait until QEMU exits (after a guest shutdown without `-no-shutdown`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            return Err(HarnessError::Exited {
                what: format!("guest {} (not running)", self.def.name),
                log: self.log(),
            });
        };
        match c.wait_timeout(timeout) {
            Ok(Some(st)) => Ok(st),
            Ok(None) => {
                let tail = self.console().map(|c| c.tail(20)).unwrap_or_default();
                self.child = Some(c);
                Err(HarnessError::Timeout {
                    what: format!("QEMU of guest {} to exit; console:\n{tail}", self.def.name),
                    after: timeout,
                    last: None,
                })
            }
            Err(source) => Err(HarnessError::Io {
                what: "wait for the guest's QEMU".to_owned(),
                source,
            }),
        }
    }

    /// `vm add` on `primary` (vmreplica's monitor, the definition file).
    pub fn register(&self, primary: &Agent) -> Result<()> {
        let qmp = self.qmp.display().to_string();
        let launch = self.launch.display().to_string();
        let qga = self.qga().display().to_string();
        let mut args = vec![
            "vm",
            "add",
            &self.def.name,
            "--qmp",
            &qmp,
            "--launch",
            &launch,
        ];
        if self.opts.qga {
            args.extend(["--qga", &qga]);
        }
        primary.ok(&args).map(drop)
    }
}

/// The IPv4 and IPv6 addresses (`ADDR/PREFIX`) the guest agent at `socket` reports on the
/// interface with MAC `mac` (`guest-network-get-interfaces`; the session is synchronised with
/// `guest-sync-delimited` first, past whatever an earlier client left in the channel).
pub fn guest_addresses(socket: &Path, mac: &str) -> Result<Vec<String>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(io_err(format!("connect to {}", socket.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err("set a guest agent read timeout"))?;
    let id: u32 = rand::random::<u32>() >> 1;
    // A leading 0xFF byte resets an agent that was in the middle of reading a request.
    let mut req = vec![0xffu8];
    req.extend_from_slice(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
            .as_bytes(),
    );
    s.write_all(&req)
        .map_err(io_err("write to the guest agent"))?;
    let mut r = BufReader::new(s.try_clone().map_err(io_err("clone a socket"))?);
    // Skip to the delimiter (0xFF), then to the answer carrying our id.
    let mut byte = [0u8; 1];
    loop {
        r.read_exact(&mut byte)
            .map_err(io_err("read the guest agent's delimiter"))?;
        if byte[0] == 0xff {
            break;
        }
    }
    let mut line = String::new();
    let read = |r: &mut BufReader<std::os::unix::net::UnixStream>, line: &mut String| {
        line.clear();
        r.read_line(line)
            .map_err(io_err("read from the guest agent"))
    };
    loop {
        read(&mut r, &mut line)?;
        if line.contains(&id.to_string()) {
            break;
        }
    }
    s.write_all(b"{\"execute\":\"guest-network-get-interfaces\"}\n")
        .map_err(io_err("write to the guest agent"))?;
    read(&mut r, &mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|source| HarnessError::Json {
            what: "guest-network-get-interfaces".to_owned(),
            source,
        })?;
    let none = Vec::new();
    let ifaces = v["return"].as_array().unwrap_or(&none);
    Ok(ifaces
        .iter()
        .filter(|i| i["hardware-address"].as_str() == Some(mac))
        .flat_map(|i| i["ip-addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["ip-address"].as_str()?,
                a["prefix"].as_u64()?
            ))
        })
        .collect())
}

/// One synchronous QMP command (capabilities negotiated first) on `socket`; its `return`.
pub fn harness_qmp(socket: &Path, command: &str) -> Result<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(io_err(format!("connect to {}", socket.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err("set a QMP read timeout"))?;
    let mut r = BufReader::new(s.try_clone().map_err(io_err("clone a QMP socket"))?);
    let answer = |r: &mut BufReader<std::os::unix::net::UnixStream>| -> Result<serde_json::Value> {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).map_err(io_err("read from QMP"))?;
            if line.is_empty() {
                return Err(HarnessError::Exited {
                    what: format!("QMP {} (closed)", socket.display()),
                    log: String::new(),
                });
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|source| HarnessError::Json {
                    what: "QMP".to_owned(),
                    source,
                })?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(HarnessError::Agent {
                    chain: format!("QMP {command}: {e}"),
                });
            }
            // The greeting and events.
        }
    };
    let mut greeting = String::new();
    r.read_line(&mut greeting)
        .map_err(io_err("read the QMP greeting"))?;
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(io_err("write to QMP"))?;
    answer(&mut r)?;
    s.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .map_err(io_err("write to QMP"))?;
    answer(&mut r)
}

/// The workload's check line (`VMR CHECK ok wal=N journal=M files=K` or `VMR CHECK bad ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `ok`: databases and files consistent and gap-free.
    pub ok: bool,
    /// Last WAL database sequence.
    pub wal: u64,
    /// Last rollback-journal database sequence.
    pub journal: u64,
    /// Last churned file sequence.
    pub files: u64,
    /// The whole line.
    pub line: String,
    /// When it arrived.
    pub at: Instant,
}

/// A `VMR SEQ wal=N journal=M file=K` line: what the workload had committed when it printed
/// it, and when it arrived at the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq {
    /// WAL database sequence.
    pub wal: u64,
    /// Rollback-journal database sequence.
    pub journal: u64,
    /// File sequence.
    pub file: u64,
    /// Arrival time.
    pub at: Instant,
}

fn field(words: &[&str], key: &str) -> Option<u64> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Parse a `VMR CHECK` line.
pub fn parse_check(line: &str, at: Instant) -> Option<Check> {
    let rest = line.trim().strip_prefix("VMR CHECK ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let ok = words.first() == Some(&"ok");
    Some(Check {
        ok,
        wal: field(&words, "wal").unwrap_or(0),
        journal: field(&words, "journal").unwrap_or(0),
        files: field(&words, "files").unwrap_or(0),
        line: line.trim().to_owned(),
        at,
    })
}

/// Parse a `VMR SEQ` line.
pub fn parse_seq(line: &str, at: Instant) -> Option<Seq> {
    let rest = line.trim().strip_prefix("VMR SEQ ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    Some(Seq {
        wal: field(&words, "wal")?,
        journal: field(&words, "journal")?,
        file: field(&words, "file")?,
        at,
    })
}

#[derive(Debug, Default)]
struct ConsoleState {
    lines: Vec<(Instant, String)>,
    check: Option<Check>,
    seqs: Vec<Seq>,
    error: Option<String>,
    /// How far the file has been read.
    offset: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<ConsoleState>,
    changed: Condvar,
    stop: AtomicBool,
}

/// Follows a serial log file (which may not exist yet) in a thread, polling every 20 ms, and
/// timestamps each line as it arrives. Stops when dropped.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Console {
    /// Start following `path`.
    pub fn follow(path: &Path) -> Result<Console> {
        let shared = Arc::new(Shared {
            state: Mutex::new(ConsoleState::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let p2 = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("vmr-console".to_owned())
            .spawn(move || follow_loop(&p2, &s2))
            .map_err(io_err("start a console follower thread"))?;
        Ok(Console {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// The followed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until `f` (on the state) gives a value.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&ConsoleState) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                let tail = tail_of(&st.lines, 20);
                return Err(HarnessError::Timeout {
                    what: format!(
                        "{what} on the console {}; its last lines:\n{tail}",
                        self.path.display()
                    ),
                    after: timeout,
                    last: st.error.clone(),
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The `VMR CHECK` line (the first of this console).
    pub fn wait_check(&self, timeout: Duration) -> Result<Check> {
        self.wait_for(timeout, "the workload's VMR CHECK line", |s| {
            s.check.clone()
        })
    }

    /// Wait for a `VMR SEQ` line with at least `wal` committed; that line.
    pub fn wait_seq(&self, wal: u64, timeout: Duration) -> Result<Seq> {
        self.wait_for(timeout, &format!("VMR SEQ wal>={wal}"), |s| {
            s.seqs.iter().find(|q| q.wal >= wal).copied()
        })
    }

    /// Every `VMR SEQ` line so far.
    pub fn seqs(&self) -> Vec<Seq> {
        self.lock().seqs.clone()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        tail_of(&self.lock().lines, n)
    }

    /// Read what the file holds now (e.g. right after the VM was killed) before returning:
    /// waits until the follower has passed the file's current end.
    pub fn settle(&self, timeout: Duration) -> Result<()> {
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        self.wait_for(timeout, "the follower to catch up", |s| {
            (s.offset >= len).then_some(())
        })
    }
}

fn tail_of(lines: &[(Instant, String)], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn follow_loop(path: &Path, shared: &Shared) {
    let mut off = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        let got = (|| -> std::io::Result<Vec<u8>> {
            let mut f = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            if len < off {
                // Truncated (QEMU restarted on the same file): from the start.
                off = 0;
                partial.clear();
            }
            f.seek(SeekFrom::Start(off))?;
            let mut out = Vec::new();
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            off += out.len() as u64;
            Ok(out)
        })();
        let now = Instant::now();
        match got {
            Ok(bytes) => {
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.offset = off;
                if !bytes.is_empty() {
                    partial.extend_from_slice(&bytes);
                    while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                        let raw: Vec<u8> = partial.drain(..=i).collect();
                        let line = String::from_utf8_lossy(&raw)
                            .trim_end_matches(['\r', '\n'])
                            .to_owned();
                        if st.check.is_none()
                            && let Some(c) = parse_check(&line, now)
                        {
                            st.check = Some(c);
                        }
                        if let Some(s) = parse_seq(&line, now) {
                            st.seqs.push(s);
                        }
                        st.lines.push((now, line));
                    }
                }
                drop(st);
                shared.changed.notify_all();
            }
            Err(e) => {
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.error = Some(format!("read {}: {e}", path.display()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_the_workload_lines() {
        let t = Instant::now();
        let c = parse_check("VMR CHECK ok wal=12 journal=11 files=12\r", t).expect("check");
        assert!(c.ok && c.wal == 12 && c.journal == 11 && c.files == 12);
        let b = parse_check("VMR CHECK bad wal.db sequence has a gap", t).expect("bad");
        assert!(!b.ok);
        let s = parse_seq("VMR SEQ wal=5 journal=5 file=6", t).expect("seq");
        assert_eq!((s.wal, s.journal, s.file), (5, 5, 6));
        assert!(parse_seq("VMR SEQ wal=5", t).is_none());
        assert!(parse_check("[  1.0] VMR", t).is_none());
    }

    #[test]
    fn the_console_follows_a_file_as_it_grows() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("serial.log");
        let con = Console::follow(&p).expect("follow");
        assert!(con.wait_check(Duration::from_millis(50)).is_err());
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(b"boot noise\nVMR CHECK ok wal=0 journal=0 files=0\nVMR SEQ wal=3 jour")
            .expect("write");
        let c = con.wait_check(Duration::from_secs(10)).expect("check");
        assert!(c.ok && c.wal == 0);
        f.write_all(b"nal=3 file=3\nVMR SEQ wal=9 journal=9 file=9\n")
            .expect("write");
        let s = con.wait_seq(4, Duration::from_secs(10)).expect("seq");
        assert_eq!(s.wal, 9);
        con.settle(Duration::from_secs(10)).expect("settle");
        assert_eq!(con.seqs().len(), 2);
        assert!(con.tail(1).contains("wal=9"));
    }
}
