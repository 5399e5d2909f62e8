//! qemu-storage-daemon stand-in VMs for tests: N disks (qcow2 or raw) in a temp dir, a QMP
//! socket for the capture, a second QMP socket for the test itself, and optionally an NBD
//! server with a live writable export per disk (`vmr-live-<node>`, export name = node name) so
//! a test writer can write while cycles run. Clean stop (SIGTERM), `kill -9` and restart with
//! the same images; content hashes of a disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::harness::{HarnessError, READY_TIMEOUT, connect_nbd, wait_child_qmp_greeting};
use crate::proc::{ChildGuard, start_again_on_crash};

/// Image format of a stand-in disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 (persistent bitmaps).
    Qcow2,
    /// raw (non-persistent bitmaps only).
    Raw,
}

/// One disk of a stand-in VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Format node name (the one the capture is configured with).
    pub node: String,
    /// Image format.
    pub format: DiskFormat,
    /// Virtual size in bytes.
    pub size: u64,
}

impl DiskSpec {
    /// A disk spec.
    pub fn new(node: &str, format: DiskFormat, size: u64) -> Self {
        DiskSpec {
            node: node.to_owned(),
            format,
            size,
        }
    }
}

/// A running (or stopped) qemu-storage-daemon with its images, cleaned up on drop.
#[derive(Debug)]
pub struct QsdVm {
    dir: tempfile::TempDir,
    disks: Vec<DiskSpec>,
    nbd_socket: Option<PathBuf>,
    child: Option<ChildGuard>,
    /// A `qemu-system-x86_64 -machine none` instead of the daemon: a system emulator, whose
    /// QMP has `stop`/`cont` (no NBD server of its own: the capture starts one).
    machine: bool,
}

impl QsdVm {
    /// Create the images and start the daemon. With `nbd_socket_name`, the daemon starts its
    /// NBD server on that file in [`Self::work_dir`] and exports every disk live; pass the
    /// capture's socket name so the capture reuses that server (one NBD server per QEMU).
    pub fn start(disks: Vec<DiskSpec>, nbd_socket_name: Option<&str>) -> anyhow::Result<QsdVm> {
        let dir = tempfile::Builder::new().prefix("vmr-qsd").tempdir()?;
        let nbd_socket = nbd_socket_name.map(|n| dir.path().join("work").join(n));
        for d in &disks {
            let (fmt, path) = match d.format {
                DiskFormat::Qcow2 => ("qcow2", dir.path().join(format!("{}.qcow2", d.node))),
                DiskFormat::Raw => ("raw", dir.path().join(format!("{}.raw", d.node))),
            };
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(&path)
                .arg(d.size.to_string())
                .output()
                .context("run qemu-img")?;
            if !out.status.success() {
                bail!(
                    "qemu-img create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut vm = QsdVm {
            dir,
            disks,
            nbd_socket,
            child: None,
            machine: false,
        };
        vm.restart()?;
        Ok(vm)
    }

    /// Like [`Self::start`] without an NBD server, but the process is a
    /// `qemu-system-x86_64 -machine none` (no vCPUs, no devices): its QMP pauses and resumes
    /// the machine (`stop`, `cont`, `query-status`) as a real VM's does.
    pub fn start_machine(disks: Vec<DiskSpec>) -> anyhow::Result<QsdVm> {
        let mut vm = Self::start_stopped(disks)?;
        vm.machine = true;
        std::fs::create_dir_all(vm.work_dir())?;
        vm.restart()?;
        Ok(vm)
    }

    fn start_stopped(disks: Vec<DiskSpec>) -> anyhow::Result<QsdVm> {
        let dir = tempfile::Builder::new().prefix("vmr-qsd").tempdir()?;
        for d in &disks {
            let (fmt, path) = match d.format {
                DiskFormat::Qcow2 => ("qcow2", dir.path().join(format!("{}.qcow2", d.node))),
                DiskFormat::Raw => ("raw", dir.path().join(format!("{}.raw", d.node))),
            };
            crate::img::create(&path, fmt, d.size, None)?;
        }
        Ok(QsdVm {
            dir,
            disks,
            nbd_socket: None,
            child: None,
            machine: false,
        })
    }

    /// The temp directory holding images and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A work directory for the capture (inside the temp dir).
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The QMP socket meant for the capture.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// A second QMP socket for the test itself.
    pub fn test_qmp_socket(&self) -> PathBuf {
        self.dir.path().join("test-qmp.sock")
    }

    /// The NBD server socket, when started with one.
    pub fn nbd_socket(&self) -> Option<&Path> {
        self.nbd_socket.as_deref()
    }

    /// The disks.
    pub fn disks(&self) -> &[DiskSpec] {
        &self.disks
    }

    /// Image file of disk `node`.
    pub fn image_path(&self, node: &str) -> anyhow::Result<PathBuf> {
        let d = self.disk(node)?;
        Ok(match d.format {
            DiskFormat::Qcow2 => self.dir.path().join(format!("{node}.qcow2")),
            DiskFormat::Raw => self.dir.path().join(format!("{node}.raw")),
        })
    }

    fn disk(&self, node: &str) -> anyhow::Result<&DiskSpec> {
        self.disks
            .iter()
            .find(|d| d.node == node)
            .with_context(|| format!("no disk {node}"))
    }

    /// Export id of the live export of `node`.
    pub fn live_export_id(node: &str) -> String {
        format!("vmr-live-{node}")
    }

    /// `nbd+unix://` URI of the live export of `node` (for qemu-io / qemu-img).
    pub fn live_uri(&self, node: &str) -> anyhow::Result<String> {
        let s = self
            .nbd_socket
            .as_ref()
            .context("started without nbd server")?;
        Ok(format!("nbd+unix:///{node}?socket={}", s.display()))
    }

    /// Start (again) with the same images; the previous process must be stopped. A daemon
    /// that crashes at start is started again ([`crate::proc::START_ATTEMPTS`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.as_mut().is_some_and(|c| c.is_running()) {
            bail!("qemu-storage-daemon is still running");
        }
        let started = start_again_on_crash(
            "qemu-storage-daemon",
            || -> anyhow::Result<ChildGuard> {
                Ok(ChildGuard::spawn(self.command()?, "qemu-storage-daemon")?)
            },
            |c| Ok(self.wait_ready(c)?),
        )?;
        match started {
            Ok(child) => {
                self.child = Some(child);
                Ok(())
            }
            Err((mut child, e)) => {
                child.kill9();
                bail!("{e}; log: {}", self.log());
            }
        }
    }

    /// The daemon's command line (its old sockets removed).
    fn command(&self) -> anyhow::Result<Command> {
        let dir = self.dir.path().to_owned();
        for s in [self.qmp_socket(), self.test_qmp_socket()] {
            let _ = std::fs::remove_file(s);
        }
        let mut cmd = if self.machine {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-machine", "none", "-nodefaults", "-display", "none"]);
            c
        } else {
            Command::new("qemu-storage-daemon")
        };
        let dash = if self.machine { "-" } else { "--" };
        for d in &self.disks {
            let path = self.image_path(&d.node)?;
            cmd.arg(format!("{dash}blockdev")).arg(format!(
                "driver=file,node-name={}-file,filename={},discard=unmap",
                d.node,
                path.display()
            ));
            let fmt = match d.format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            cmd.arg(format!("{dash}blockdev")).arg(format!(
                "driver={fmt},node-name={0},file={0}-file,discard=unmap",
                d.node
            ));
        }
        for (id, sock) in [
            ("mon0", self.qmp_socket()),
            ("mon1", self.test_qmp_socket()),
        ] {
            cmd.arg(format!("{dash}chardev")).arg(format!(
                "socket,id={id},path={},server=on,wait=off",
                sock.display()
            ));
            if self.machine {
                cmd.arg("-mon").arg(format!("chardev={id},mode=control"));
            } else {
                cmd.arg("--monitor").arg(format!("chardev={id}"));
            }
        }
        if let Some(s) = &self.nbd_socket {
            if let Some(p) = s.parent() {
                std::fs::create_dir_all(p)?;
            }
            let _ = std::fs::remove_file(s);
            cmd.arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", s.display()));
            for d in &self.disks {
                cmd.arg("--export").arg(format!(
                    "type=nbd,id={},node-name={1},name={1},writable=on",
                    Self::live_export_id(&d.node),
                    d.node
                ));
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("qsd.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    /// Wait until both QMP servers and the NBD server greet (their socket files exist from
    /// bind(), before listen(): a connect in between is refused).
    fn wait_ready(&self, child: &mut ChildGuard) -> Result<(), HarnessError> {
        for p in [self.qmp_socket(), self.test_qmp_socket()] {
            wait_child_qmp_greeting(child, &p, READY_TIMEOUT)?;
        }
        if let (Some(s), Some(d)) = (&self.nbd_socket, self.disks.first()) {
            let ep = vmr_nbd::Endpoint::Unix(s.clone());
            let node = d.node.clone();
            // A thread of its own: the caller may be a task of a runtime already (the capture
            // tests are async), where a nested `block_on` panics.
            let waited = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|source| HarnessError::Io {
                                what: "build a tokio runtime".into(),
                                source,
                            })?;
                        rt.block_on(async {
                            let c = connect_nbd(&ep, &node, READY_TIMEOUT).await?;
                            c.disconnect().await.map_err(|source| HarnessError::Nbd {
                                what: "disconnect".into(),
                                source,
                            })
                        })
                    })
                    .join()
            });
            match waited {
                Ok(r) => r?,
                Err(_) => {
                    return Err(HarnessError::Io {
                        what: "wait for the NBD greeting".into(),
                        source: std::io::Error::other("the waiting thread panicked"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The daemon's stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    /// Clean shutdown (SIGTERM: bitmaps are stored into qcow2 images).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.child.take() {
            Some(mut c) => c.terminate(Duration::from_secs(20)),
            None => Ok(()),
        }
    }

    /// Unclean exit (SIGKILL).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// True while the daemon runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.is_running())
    }

    /// BLAKE3 of the whole content of `node`, read through its live NBD export (while running).
    pub fn live_hash(&self, node: &str) -> anyhow::Result<[u8; 32]> {
        let uri = self.live_uri(node)?;
        self.convert_hash(&["-f", "raw", &uri])
    }

    /// BLAKE3 of the whole content of `node`'s image file (while stopped).
    pub fn image_hash(&self, node: &str) -> anyhow::Result<[u8; 32]> {
        let fmt = match self.disk(node)?.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        };
        let path = self.image_path(node)?.display().to_string();
        self.convert_hash(&["-f", fmt, &path])
    }

    fn convert_hash(&self, src: &[&str]) -> anyhow::Result<[u8; 32]> {
        let out_path = self.dir.path().join("hash.tmp.raw");
        let out = Command::new("qemu-img")
            .arg("convert")
            .args(src)
            .args(["-O", "raw"])
            .arg(&out_path)
            .output()
            .context("run qemu-img convert")?;
        if !out.status.success() {
            bail!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = std::fs::read(&out_path)?;
        let _ = std::fs::remove_file(&out_path);
        Ok(*blake3::hash(&data).as_bytes())
    }
}

/// BLAKE3 of a byte buffer (to compare with [`QsdVm::live_hash`]).
pub fn hash_bytes(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}
