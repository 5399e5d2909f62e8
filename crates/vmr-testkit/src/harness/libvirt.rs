//! A private libvirt daemon for tests: `libvirtd` as root in a mount namespace of its own
//! (`unshare -m`) in which the test's directories are bind-mounted over libvirt's state,
//! configuration, cache and log directories, with its sockets in the test's directory. The
//! host's libvirt state is never read or changed, and everything it starts (QEMU) lives in
//! that namespace, so dropping the [`PrivateLibvirt`] kills all of it (every process in the
//! namespaces its daemons ran in). Domains are driven with `virsh` (setup only: vmreplica
//! itself talks to libvirt through its API). Domains are stand-ins with no guest OS
//! ([`PrivateLibvirt::start_domain`]) or the real test guest
//! ([`PrivateLibvirt::start_guest_domain`], its console in the daemon's own log directory).
//! See `docs/libvirt.md`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::READY_TIMEOUT;
use super::guest::{GuestImage, GuestOptions};
use crate::proc::ChildGuard;

/// libvirt's host directories replaced inside the daemon's namespace.
const HOST_DIRS: [&str; 4] = [
    "/etc/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
];

/// Why a private daemon cannot run here (`None`: it can): not root, or libvirtd, virsh,
/// unshare or libvirt's directories missing (`scripts/install-deps.sh full` installs them).
pub fn libvirt_unavailable() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return Some("a private libvirtd needs root (mount namespace)".into());
    }
    for bin in ["/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/unshare"] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} is missing (scripts/install-deps.sh full)"));
        }
    }
    for d in HOST_DIRS {
        if !Path::new(d).is_dir() {
            return Some(format!(
                "{d} is missing (libvirt-daemon-driver-qemu not installed)"
            ));
        }
    }
    None
}

/// `libvirtd` in a mount namespace of its own with `dir`'s subdirectories over libvirt's.
fn spawn_daemon(dir: &Path) -> anyhow::Result<ChildGuard> {
    let d = dir.display();
    let mut script = String::from("set -e\n");
    for (host, sub) in HOST_DIRS.iter().zip(["etc", "lib", "cache", "log"]) {
        script.push_str(&format!("mount --bind '{d}/{sub}' {host}\n"));
    }
    // /run/libvirt (the running domains' state, kept across a restart): the test's `run`
    // bound over it, on a private /run where the host has no /run/libvirt
    script.push_str(&format!(
        "if [ ! -d /run/libvirt ]; then mount -t tmpfs tmpfs /run; mkdir /run/libvirt; fi\nmount --bind '{d}/run' /run/libvirt\nexec /usr/sbin/libvirtd --config '{d}/libvirtd.conf' --pid '{d}/libvirtd.pid'\n"
    ));
    let mut cmd = Command::new("/usr/bin/unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::fs::File::create(dir.join("libvirtd.out"))?)
        .stderr(std::fs::File::create(dir.join("libvirtd.err"))?);
    Ok(ChildGuard::spawn(cmd, "libvirtd")?)
}

/// The mount namespace of process `pid` (`mnt:[inode]`).
fn mount_namespace(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Mount namespaces named by their `mnt:[inode]`, each kept alive by an open file of it.
///
/// The kernel reuses a freed namespace's inode number: once a daemon's namespace is gone, the
/// next `unshare -m` (another test's daemon, running in parallel) may get the same name. An
/// open `/proc/PID/ns/mnt` holds the namespace, so while this value lives its names mean the
/// namespaces they were taken from (a check after a drop never sees another test's daemon).
#[derive(Debug, Clone, Default)]
pub struct MountNamespaces {
    ids: Vec<String>,
    pins: Vec<Arc<File>>,
}

impl MountNamespaces {
    /// Add `pid`'s mount namespace (pinned) unless it is already here.
    fn add_of(&mut self, pid: u32) {
        let Ok(file) = File::open(format!("/proc/{pid}/ns/mnt")) else {
            return;
        };
        // named after opening: the open file holds the namespace the name is read from
        if let Some(id) = mount_namespace(pid)
            && !self.ids.contains(&id)
        {
            self.ids.push(id);
            self.pins.push(Arc::new(file));
        }
    }

    /// How many namespaces.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// No namespace.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Add every namespace of `other`.
    pub fn extend(&mut self, other: MountNamespaces) {
        for (id, pin) in other.ids.into_iter().zip(other.pins) {
            if !self.ids.contains(&id) {
                self.ids.push(id);
                self.pins.push(pin);
            }
        }
    }
}

/// The processes in any of the mount namespaces `ns` (a daemon's and its QEMUs').
pub fn processes_in_namespaces(ns: &MountNamespaces) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| mount_namespace(*pid).is_some_and(|m| ns.ids.contains(&m)))
        .collect()
}

/// Where a domain of [`PrivateLibvirt::start_guest_domain`] writes its console, in the
/// daemon's namespace (`/var/log/libvirt` is the daemon's own `DIR/log`).
const GUEST_CONSOLE_DIR: &str = "/var/log/libvirt";

/// How long [`PrivateLibvirt::stop`] waits for the killed processes to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A libvirt daemon of the test's own.
#[derive(Debug)]
pub struct PrivateLibvirt {
    dir: PathBuf,
    uri: String,
    daemon: ChildGuard,
    /// Every mount namespace a daemon of this test ran in (its QEMUs stay in the one they
    /// were started from, also across a restart), pinned.
    namespaces: MountNamespaces,
}

impl PrivateLibvirt {
    /// Start the daemon with everything under `dir` (which must be short: socket paths) and
    /// wait until it answers.
    pub fn start(dir: &Path) -> anyhow::Result<PrivateLibvirt> {
        if let Some(why) = libvirt_unavailable() {
            bail!("{why}");
        }
        let dir = dir.to_path_buf();
        for sub in ["etc", "lib", "cache", "log", "run", "sock"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        std::fs::write(
            dir.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{d}/sock\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:{d}/libvirtd.log\"\n"
            ),
        )?;
        // no security driver, ownership changes, cgroups or virtlogd: nothing outside the
        // dir; QEMU in the daemon's namespace (not a per-domain one), where the harness finds it
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "security_driver = \"none\"\nuser = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\ncgroup_controllers = [ ]\nstdio_handler = \"file\"\nnamespaces = [ ]\n",
        )?;
        let daemon = spawn_daemon(&dir)?;
        let mut lv = PrivateLibvirt {
            uri: format!("qemu+unix:///system?socket={d}/sock/libvirt-sock"),
            dir,
            daemon,
            namespaces: MountNamespaces::default(),
        };
        lv.wait_ready()?;
        Ok(lv)
    }

    /// The mount namespaces of this test's daemons and QEMUs
    /// ([`processes_in_namespaces`] finds what runs in them).
    pub fn mount_namespaces(&self) -> MountNamespaces {
        self.namespaces.clone()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.virsh(&["version"]).is_ok() {
                // the daemon answers from its own namespace (unshare and sh exec'ed it)
                self.namespaces.add_of(self.daemon.pid());
                return Ok(());
            }
            if Instant::now() > deadline || !self.daemon.is_running() {
                let err =
                    std::fs::read_to_string(self.dir.join("libvirtd.err")).unwrap_or_default();
                bail!("private libvirtd did not answer within {READY_TIMEOUT:?}: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the daemon (SIGTERM) and start it again on the same directories; its domains keep
    /// running and the new daemon takes them over, as after `systemctl restart libvirtd`.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.terminate(Duration::from_secs(20))?;
        self.daemon = spawn_daemon(&self.dir)?;
        self.wait_ready()
    }

    /// The connection URI of this daemon.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The daemon's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run `virsh -c URI ARGS`: its stdout, or an error with its stderr.
    pub fn virsh(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("/usr/bin/virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .context("run virsh")?;
        if !out.status.success() {
            bail!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Define and start domain `name` (TCG, no guest OS: its firmware idles) with the
    /// given qcow2 disks as virtio `vda`, `vdb`, ...
    pub fn start_domain(&self, name: &str, disks: &[PathBuf]) -> anyhow::Result<()> {
        self.define_and_start(name, disks, false)
    }

    /// [`Self::start_domain`] with a network interface (user-mode networking: no bridge or
    /// libvirt network is needed), for what a failover does to interfaces.
    pub fn start_domain_with_nic(&self, name: &str, disks: &[PathBuf]) -> anyhow::Result<()> {
        self.define_and_start(name, disks, true)
    }

    fn define_and_start(&self, name: &str, disks: &[PathBuf], nic: bool) -> anyhow::Result<()> {
        let mut x = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>"
        );
        for (i, p) in disks.iter().enumerate() {
            let target = format!("vd{}", (b'a' + i as u8) as char);
            x.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
                p.display()
            ));
        }
        if nic {
            x.push_str("<interface type='user'><model type='virtio'/></interface>");
        }
        // free PCIe ports for disks hot-plugged by a test (`virsh attach-disk`)
        x.push_str("<controller type='pci' index='0' model='pcie-root'/><controller type='pci' index='8' model='pcie-root-port'/><controller type='pci' index='9' model='pcie-root-port'/>");
        x.push_str("<memballoon model='none'/></devices></domain>");
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, x)?;
        let f = file.to_string_lossy().into_owned();
        self.virsh(&["define", &f])?;
        self.virsh(&["start", name])?;
        Ok(())
    }

    /// Define and start domain `name` booting the real test guest (`docs/real-guest.md`): a
    /// qcow2 overlay `DIR/NAME-disk0.qcow2` on the guest's root image as its one disk `vda`
    /// (virtio, the root file system; the cached image is only read), direct kernel boot of
    /// the guest's kernel and initramfs with the harness's command line (`vmr.rate`,
    /// `vmr.workload` from `opts`), ACPI (the guest powers down on the power button), `opts`'s
    /// memory, one vCPU, no NIC, and its serial console (ttyS0) appended to a file under
    /// `/var/log/libvirt` (see [`Self::console_log`]). The domain type is `kvm` when
    /// `opts.accel` is `kvm` (`$VMR_GUEST_ACCEL`), `qemu` (TCG) otherwise. Returns the overlay.
    ///
    /// The console path is in the domain XML, so every copy of the domain a failover defines
    /// on another private daemon writes to the same path in *that* daemon's namespace:
    /// `/var/log/libvirt` is each daemon's own `DIR/log`, as if on another host.
    pub fn start_guest_domain(
        &self,
        name: &str,
        image: &GuestImage,
        opts: &GuestOptions,
    ) -> anyhow::Result<PathBuf> {
        let disk = self.dir.join(format!("{name}-disk0.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.root())
            .arg(&disk)
            .output()
            .context("run qemu-img")?;
        if !out.status.success() {
            bail!(
                "qemu-img create (overlay {}): {}",
                disk.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let kind = if opts.accel == "kvm" { "kvm" } else { "qemu" };
        let mut cmdline = format!(
            "root=/dev/vda ro console=ttyS0 quiet vmr.rate={}",
            opts.rate
        );
        if !opts.workload {
            cmdline.push_str(" vmr.workload=0");
        }
        let x = format!(
            "<domain type='{kind}'><name>{name}</name><memory unit='MiB'>{mem}</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>\
             <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>\
             <features><acpi/><apic/></features><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
             <serial type='file'><source path='{GUEST_CONSOLE_DIR}/{name}-console.log' append='on'/>\
             <target port='0'/></serial><memballoon model='none'/></devices></domain>",
            mem = opts.mem_mib,
            kernel = image.kernel().display(),
            initrd = image.initrd().display(),
            disk = disk.display(),
        );
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, x)?;
        let f = file.to_string_lossy().into_owned();
        self.virsh(&["define", &f])?;
        self.virsh(&["start", name])?;
        Ok(disk)
    }

    /// Where this daemon's copy of a domain defined by [`Self::start_guest_domain`] as `name`
    /// writes its serial console, seen from the test (for `Console::follow`): `DIR/log/NAME-console.log`.
    /// A failed-over copy (also a test copy `NAME-test`) keeps the path of the domain it was
    /// made from.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.dir.join("log").join(format!("{name}-console.log"))
    }

    /// Write `len` bytes of `pattern` at `offset` of the domain's disk number `disk` while it
    /// runs, as a guest would: through the disk's own block backend in the domain's QEMU
    /// (HMP `qemu-io` on the virtio device, via libvirt's monitor passthrough).
    pub fn write_disk(
        &self,
        domain: &str,
        disk: usize,
        offset: u64,
        len: u64,
        pattern: u8,
    ) -> anyhow::Result<()> {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend \"write -P {pattern} {offset} {len}\""
        );
        let out = self.virsh(&["qemu-monitor-command", domain, "--hmp", &cmd])?;
        if out.contains("rror") {
            bail!("qemu-io on {domain} disk {disk}: {}", out.trim());
        }
        Ok(())
    }

    /// Start a pull-mode backup job of another tool (no checkpoint) on the domain's `targets`,
    /// holding the domain until [`Self::abort_job`].
    pub fn hold_backup(&self, domain: &str, targets: &[&str]) -> anyhow::Result<()> {
        let d = self.dir.display();
        let mut x = format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{d}/other-tool.sock'/><disks>"
        );
        for t in targets {
            x.push_str(&format!(
                "<disk name='{t}' backup='yes' type='file'><scratch file='{d}/other-{t}.qcow2'/></disk>"
            ));
        }
        x.push_str("</disks></domainbackup>");
        let file = self.dir.join("other-backup.xml");
        std::fs::write(&file, x)?;
        self.virsh(&["backup-begin", domain, &file.to_string_lossy()])?;
        Ok(())
    }

    /// End the domain's job (`virsh domjobabort`) and wait until libvirt reports none: a
    /// backup job ends only after QEMU reports its block jobs cancelled, after the abort has
    /// returned.
    pub fn abort_job(&self, domain: &str) -> anyhow::Result<()> {
        self.virsh(&["domjobabort", domain])?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.has_job(domain)? {
            if Instant::now() >= deadline {
                bail!("the aborted job of {domain} still runs after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Whether a job runs on the domain: `virsh domjobinfo` names a job type other than None,
    /// or a backup job is present (`virsh backup-dumpxml`; domjobinfo may still say None for a
    /// moment after `backupBegin` returned).
    pub fn has_job(&self, domain: &str) -> anyhow::Result<bool> {
        let info = self.virsh(&["domjobinfo", domain])?;
        let kind = info
            .lines()
            .find_map(|l| l.strip_prefix("Job type:"))
            .map(str::trim)
            .context("domjobinfo names no job type")?;
        if kind != "None" {
            return Ok(true);
        }
        let out = Command::new("/usr/bin/virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(["backup-dumpxml", domain])
            .output()
            .context("run virsh")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(true)
        } else if err.contains("no domain backup job") || err.contains("backup job id not found") {
            Ok(false)
        } else {
            bail!("virsh backup-dumpxml {domain}: {}", err.trim())
        }
    }

    /// The domain's checkpoint names.
    pub fn checkpoints(&self, domain: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .virsh(&["checkpoint-list", domain, "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Stop every domain and the daemon; kill whatever still names the directory.
    pub fn stop(&mut self) {
        if let Ok(list) = self.virsh(&["list", "--name"]) {
            for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.virsh(&["destroy", name]);
            }
        }
        let _ = self.daemon.terminate(Duration::from_secs(10));
        for pid in processes_in_namespaces(&self.namespaces) {
            crate::proc::sigkill(pid);
        }
        super::kill_processes_under(&self.dir);
        // A killed process is listed until it has exited (a QEMU may still be closing its
        // files): wait for that, so that whoever checks after `stop` sees the end state.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !processes_in_namespaces(&self.namespaces).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateLibvirt {
    fn drop(&mut self) {
        self.stop();
    }
}
