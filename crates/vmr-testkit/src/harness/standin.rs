//! qemu-storage-daemon stand-in VMs registered on a primary agent: qcow2 disks, a VM
//! definition (`--launch` TOML, like `examples/standin-vm.toml`) whose QMP socket is the one
//! vmreplica uses and whose NBD server sits where the primary's capture looks for it, with a
//! live writable export per disk for the guest writer, and a QMP monitor of the harness's own
//! (outside the definition) for looking at the block graph.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use uuid::Uuid;
use vmr_nbd::Endpoint;
use vmr_proto::VmDefinition;
use vmr_proto::vmdef::DiskDef;

use super::agent::Agent;
use super::nbd::{
    connect_nbd, hash_export, wait_child_qmp_greeting, write_noise, write_random, write_seq,
};
use super::{HarnessError, READY_TIMEOUT, Result, io_err, rt};
#[cfg(test)]
use crate::proc::START_ATTEMPTS;
use crate::proc::{ChildGuard, start_again_on_crash};

/// The NBD socket a primary agent in `agent_dir` expects VM `uuid`'s QEMU to serve
/// (`work/<uuid>/vmr-<tag>-nbd.sock`, uuid = all 32 hex digits, tag = the first 8; when that
/// exceeds 107 bytes, `<runtime>/vmreplica/<blake3(agent dir)[..16]>/vmr-<uuid>.sock`): the
/// agent's documented layout (`vmr_agent::launch::nbd_socket`), by the same rule
/// (`vmr_proto::sockpath::socket_path`).
pub fn nbd_socket(agent_dir: &Path, uuid: Uuid) -> PathBuf {
    let id = uuid.simple().to_string();
    vmr_proto::sockpath::socket_path(
        agent_dir
            .join("work")
            .join(&id)
            .join(format!("vmr-{}-nbd.sock", &id[..8])),
        agent_dir,
        &format!("vmr-{id}.sock"),
    )
}

/// A disk of a stand-in VM.
#[derive(Debug, Clone)]
pub struct StandInDisk {
    /// Node name (also the NBD export name).
    pub node: String,
    /// Virtual size in bytes (ignored for an existing image).
    pub size: u64,
    /// qcow2 `preallocation=metadata` (writes never allocate clusters).
    pub prealloc: bool,
    /// Use this existing qcow2 image instead of creating one.
    pub existing: Option<PathBuf>,
}

impl StandInDisk {
    /// A new sparse qcow2 disk.
    pub fn new(node: &str, size: u64) -> Self {
        Self {
            node: node.to_owned(),
            size,
            prealloc: false,
            existing: None,
        }
    }
}

/// A stand-in VM (qemu-storage-daemon); its process, if this handle started it, is killed on
/// drop.
#[derive(Debug)]
pub struct StandIn {
    /// Its definition (name, UUID, disks).
    pub def: VmDefinition,
    /// The definition file (`--launch`).
    pub launch: PathBuf,
    /// The QMP socket reserved for vmreplica.
    pub qmp: PathBuf,
    /// The NBD socket (live exports, one per disk, named by node).
    pub nbd: PathBuf,
    dir: PathBuf,
    /// What starts the daemon instead of its program (a wrapper running it in a network
    /// namespace), from the next (re)start.
    launcher: Option<PathBuf>,
    child: Option<ChildGuard>,
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(io_err("run qemu-img (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(HarnessError::Tool {
            tool: format!("qemu-img {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

impl StandIn {
    /// `disks` new qcow2 disks of `mib` MiB under `root/vm-NAME`, started with the NBD server
    /// where `primary`'s capture looks for it.
    pub fn create(
        root: &Path,
        primary: &Agent,
        name: &str,
        disks: &[&str],
        mib: u64,
    ) -> Result<StandIn> {
        let specs: Vec<StandInDisk> = disks
            .iter()
            .map(|d| StandInDisk::new(d, mib << 20))
            .collect();
        Self::start_in(&root.join(format!("vm-{name}")), &primary.dir, name, &specs)
    }

    /// Create the disks (`VMDIR/NAME-NODE.qcow2`, unless existing), the definition
    /// (`VMDIR/NAME.toml`) and start the VM; its QMP socket is `VMDIR/NAME.qmp`, its NBD
    /// socket where the primary agent in `agent_dir` expects it. Several VMs may share a dir.
    pub fn start_in(
        vmdir: &Path,
        agent_dir: &Path,
        name: &str,
        disks: &[StandInDisk],
    ) -> Result<StandIn> {
        Self::start_with_uuid(vmdir, agent_dir, name, disks, Uuid::new_v4())
    }

    /// [`Self::start_in`] with a chosen VM UUID.
    pub fn start_with_uuid(
        vmdir: &Path,
        agent_dir: &Path,
        name: &str,
        disks: &[StandInDisk],
        uuid: Uuid,
    ) -> Result<StandIn> {
        std::fs::create_dir_all(vmdir).map_err(io_err(format!("create {}", vmdir.display())))?;
        let mut args: Vec<String> = Vec::new();
        let mut defs = Vec::new();
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
                    let ps = p.display().to_string();
                    qemu_img(&[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        pre,
                        &ps,
                        &d.size.to_string(),
                    ])?;
                    p
                }
            };
            let n = &d.node;
            args.extend([
                "--blockdev".into(),
                format!("driver=file,node-name={n}-file,filename={{disk:{n}}},discard=unmap"),
                "--blockdev".into(),
                format!("driver=qcow2,node-name={n},file={n}-file,discard=unmap"),
            ]);
            defs.push(DiskDef {
                node: n.clone(),
                path: path.display().to_string(),
            });
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
            args.extend([
                "--export".into(),
                format!(
                    "type=nbd,id=live-{n},node-name={n},name={n},writable=on",
                    n = d.node
                ),
            ]);
        }
        let def = VmDefinition {
            name: name.to_owned(),
            uuid,
            program: "qemu-storage-daemon".into(),
            args,
            test_args: vec![],
            network_args: vec![],
            disks: defs,
            libvirt_xml: None,
        };
        def.validate()?;
        let launch = vmdir.join(format!("{name}.toml"));
        std::fs::write(&launch, def.to_toml())
            .map_err(io_err(format!("write {}", launch.display())))?;
        let mut s = StandIn {
            nbd: nbd_socket(agent_dir, uuid),
            qmp: vmdir.join(format!("{name}.qmp")),
            def,
            launch,
            dir: vmdir.to_path_buf(),
            launcher: None,
            child: None,
        };
        s.start()?;
        Ok(s)
    }

    /// A handle on a VM someone else runs (e.g. one a failover started), for writing and
    /// hashing through its NBD socket only.
    pub fn attach(def: VmDefinition, nbd: PathBuf) -> StandIn {
        StandIn {
            def,
            launch: PathBuf::new(),
            qmp: PathBuf::new(),
            nbd,
            dir: PathBuf::new(),
            launcher: None,
            child: None,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Disk nodes and image paths.
    pub fn disks(&self) -> Vec<(String, PathBuf)> {
        self.def
            .disks
            .iter()
            .map(|d| (d.node.clone(), PathBuf::from(&d.path)))
            .collect()
    }

    /// The daemon's pid (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.def.name))
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start the daemon through `launcher` (e.g. a [`super::Net3::wrapper`] of
    /// `qemu-storage-daemon`: the VM on a host of a namespace network) from the next
    /// [`Self::start`].
    pub fn set_launcher(&mut self, launcher: &Path) {
        self.launcher = Some(launcher.to_path_buf());
    }

    /// Start (or restart) the daemon with the same images; returns once its QMP server and
    /// its NBD server greet.
    pub fn start(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.nbd);
        if let Some(p) = self.nbd.parent() {
            std::fs::create_dir_all(p).map_err(io_err(format!("create {}", p.display())))?;
        }
        let def = &self.def;
        let mut args = def.render_args(
            &self.qmp.display().to_string(),
            &self.nbd.display().to_string(),
            "tcg",
            false,
            &|n| {
                def.disks
                    .iter()
                    .find(|d| d.node == n)
                    .map(|d| d.path.clone())
            },
        )?;
        // The harness's own monitor (not in the definition: a failover never starts it).
        args.extend([
            "--chardev".into(),
            format!(
                "socket,id=harness,path={},server=on,wait=off",
                self.harness_qmp().display()
            ),
            "--monitor".into(),
            "chardev=harness".into(),
        ]);
        let spawn = || {
            let _ = std::fs::remove_file(self.harness_qmp());
            let _ = std::fs::remove_file(&self.qmp);
            let _ = std::fs::remove_file(&self.nbd);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .map_err(io_err("open the stand-in's log"))?;
            let log2 = log.try_clone().map_err(io_err("open the stand-in's log"))?;
            let mut cmd = match &self.launcher {
                Some(l) => Command::new(l),
                None => Command::new(&def.program),
            };
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(log2)
                .stderr(log);
            Ok(ChildGuard::spawn(cmd, "qemu-storage-daemon stand-in VM")?)
        };
        let what = format!("stand-in VM {}", def.name);
        match start_again_on_crash(&what, spawn, |c| self.wait_ready(c))? {
            Ok(child) => {
                self.child = Some(child);
                Ok(())
            }
            Err((mut child, e)) => {
                let what = if child.is_running() {
                    format!("qemu-storage-daemon {} did not greet ({e})", self.def.name)
                } else {
                    format!("qemu-storage-daemon {}", self.def.name)
                };
                child.kill9();
                Err(HarnessError::Exited {
                    what,
                    log: self.log(),
                })
            }
        }
    }

    fn wait_ready(&self, child: &mut ChildGuard) -> Result<()> {
        wait_child_qmp_greeting(child, &self.qmp, READY_TIMEOUT)?;
        if let Some(d) = self.def.disks.first() {
            let ep = Endpoint::Unix(self.nbd.clone());
            rt()?.block_on(async {
                let c = connect_nbd(&ep, &d.node, READY_TIMEOUT).await?;
                c.disconnect().await.map_err(|source| HarnessError::Nbd {
                    what: "disconnect".into(),
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// SIGKILL the daemon (an unclean exit: persistent bitmaps become inconsistent).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// Clean shutdown (SIGTERM: persistent bitmaps are stored), within 20 s.
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut c) => c
                .terminate(Duration::from_secs(20))
                .map_err(|e| HarnessError::Exited {
                    what: format!("qemu-storage-daemon {} ({e})", self.def.name),
                    log: self.log(),
                }),
            None => Ok(()),
        }
    }

    fn harness_qmp(&self) -> PathBuf {
        self.dir.join(format!("{}.hqmp", self.def.name))
    }

    /// One QMP command on the harness's own monitor (beside the one vmreplica holds); its
    /// `return` value. E.g. `query-named-block-nodes` to see what a capture left in the graph.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value> {
        super::guest::harness_qmp(&self.harness_qmp(), command)
    }

    /// `vm add` on `primary`.
    pub fn register(&self, primary: &Agent) -> Result<()> {
        primary
            .ok(&[
                "vm",
                "add",
                &self.def.name,
                "--qmp",
                &self.qmp.display().to_string(),
                "--launch",
                &self.launch.display().to_string(),
            ])
            .map(drop)
    }

    /// Write `blocks` random 64 KiB blocks (contents from `seed`) to `disk` (live export).
    pub fn write_random(&self, disk: &str, blocks: u64, seed: u64) -> Result<()> {
        write_random(&self.nbd, disk, blocks, seed)
    }

    /// Write `count` consecutive 64 KiB blocks from block `first` of `disk` (live export).
    pub fn write_seq(&self, disk: &str, first: u64, count: u64, seed: u64) -> Result<()> {
        write_seq(&self.nbd, disk, first, count, seed)
    }

    /// Write `count` consecutive 64 KiB blocks of incompressible bytes from block `first` of
    /// `disk` (live export).
    pub fn write_noise(&self, disk: &str, first: u64, count: u64, seed: u64) -> Result<()> {
        write_noise(&self.nbd, disk, first, count, seed)
    }

    /// BLAKE3 of `disk`'s content as the guest sees it.
    pub fn hash(&self, disk: &str) -> Result<[u8; 32]> {
        hash_export(&self.nbd, disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_greets_when_started_and_keeps_its_content_across_restarts() {
        let root = tempfile::tempdir().expect("root");
        let agent_dir = root.path().join("host-a");
        let mut vm = StandIn::start_in(
            &root.path().join("vms"),
            &agent_dir,
            "t1",
            &[StandInDisk::new("disk0", 4 << 20)],
        )
        .expect("start");
        assert!(vm.nbd.starts_with(&agent_dir));
        vm.write_seq("disk0", 2, 3, 5).expect("write");
        let h = vm.hash("disk0").expect("hash");
        assert_ne!(h, *blake3::hash(&vec![0u8; 4 << 20]).as_bytes());
        // The harness's own monitor answers beside vmreplica's.
        let nodes = vm.qmp("query-named-block-nodes").expect("harness monitor");
        assert!(
            nodes
                .as_array()
                .expect("array")
                .iter()
                .any(|n| n["node-name"] == "disk0"),
            "{nodes}"
        );
        for _ in 0..3 {
            vm.stop().expect("clean stop");
            vm.start().expect("restart");
            assert_eq!(vm.hash("disk0").expect("hash"), h);
        }
    }

    /// A daemon that dies by a crash signal at start is started again (at most
    /// [`START_ATTEMPTS`] starts), as qemu-storage-daemon 10.0.2 can when its QMP socket is
    /// connected to at once; one that crashes every time fails the start.
    #[test]
    fn a_stand_in_that_crashes_at_start_is_started_again() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("root");
        let mut vm = StandIn::start_in(
            &root.path().join("vms"),
            &root.path().join("host-a"),
            "t2",
            &[StandInDisk::new("disk0", 4 << 20)],
        )
        .expect("start");
        vm.stop().expect("clean stop");
        // The launcher crashes (SIGSEGV) while its count of crashes left is above zero.
        let left = root.path().join("crashes-left");
        let launcher = root.path().join("launcher");
        std::fs::write(
            &launcher,
            format!(
                "#!/bin/sh\nn=$(cat {0})\nif [ \"$n\" -gt 0 ]; then echo $((n - 1)) > {0}; kill -SEGV $$; fi\nexec qemu-storage-daemon \"$@\"\n",
                left.display()
            ),
        )
        .expect("write the launcher");
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        vm.set_launcher(&launcher);
        std::fs::write(&left, format!("{}", START_ATTEMPTS - 1)).expect("write");
        vm.start().expect("the last start serves");
        assert_eq!(std::fs::read_to_string(&left).expect("read").trim(), "0");
        vm.hash("disk0").expect("hash");
        vm.stop().expect("clean stop");
        std::fs::write(&left, format!("{START_ATTEMPTS}")).expect("write");
        let e = vm.start().expect_err("crashes every time");
        assert!(matches!(e, HarnessError::Exited { .. }), "{e:?}");
        assert_eq!(std::fs::read_to_string(&left).expect("read").trim(), "0");
    }
}
