//! Shared harness for the `vmreplica` end-to-end tests: real agents (the `vmreplica` binary as
//! child processes) in temp dirs on 127.0.0.1, a qemu-storage-daemon stand-in VM, a guest writer,
//! and content hashes of primary disks and replica points. Everything it starts is killed when
//! dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};
use vmr_proto::VmDefinition;
use vmr_proto::api::VmStatus;
use vmr_testkit::{ChildGuard, wait_for_path};

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_vmreplica")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Poll `f` every 100 ms until it returns true or `timeout` passes (then panic with `what`).
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One agent: its directory, address, fingerprint and process.
pub struct Agent {
    pub dir: PathBuf,
    pub name: String,
    pub addr: String,
    pub fingerprint: String,
    child: Option<ChildGuard>,
}

impl Agent {
    /// `vmreplica init` in `root/name` and start the agent.
    pub fn start(root: &Path, name: &str) -> Agent {
        let dir = root.join(name);
        let addr = format!("127.0.0.1:{}", free_port());
        let out = Command::new(exe())
            .args([
                "--dir",
                &dir.display().to_string(),
                "init",
                "--name",
                name,
                "--listen",
                &addr,
            ])
            .output()
            .expect("run init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fingerprint = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let mut a = Agent {
            dir,
            name: name.to_owned(),
            addr,
            fingerprint,
            child: None,
        };
        a.restart();
        a
    }

    /// (Re)start the agent process and wait for its control socket to answer.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let mut cmd = Command::new(exe());
        cmd.arg("--dir").arg(&self.dir).arg("agent");
        cmd.env("VMREPLICA_LOG", "info,vmreplica=debug");
        cmd.stdout(log.try_clone().expect("log")).stderr(log);
        let mut child = ChildGuard::spawn(cmd, "vmreplica agent").expect("spawn agent");
        let sock = self.dir.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                child.is_running(),
                "agent {} exited: {}",
                self.name,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "agent {} did not start: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILL the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Run a CLI command against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(exe())
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run vmreplica")
    }

    /// Run a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "vmreplica {args:?} failed ({:?}): {}\n--- agent log ---\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status row of `vm` (`status NAME --json`).
    pub fn status(&self, vm: &str) -> VmStatus {
        let out = self.ok(&["status", vm, "--json"]);
        let mut rows: Vec<VmStatus> = serde_json::from_str(&out).expect("status json");
        rows.pop().expect("one row")
    }

    /// Allow `primary` to replicate to this agent.
    pub fn allow(&self, primary: &Agent) {
        self.ok(&[
            "server",
            "allow",
            "--primary",
            &primary.name,
            "--fingerprint",
            &primary.fingerprint,
        ]);
    }
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A stand-in VM (qemu-storage-daemon) registered on a primary agent.
pub struct StandIn {
    pub def: VmDefinition,
    pub launch: PathBuf,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

impl StandIn {
    /// Create `disks` qcow2 images of `mib` MiB under `root/vm-NAME` and start the stand-in with
    /// its NBD server where `primary`'s capture will look for it.
    pub fn create(root: &Path, primary: &Agent, name: &str, disks: &[&str], mib: u64) -> StandIn {
        let dir = root.join(format!("vm-{name}"));
        std::fs::create_dir_all(&dir).expect("vm dir");
        let uuid = uuid::Uuid::new_v4();
        let mut args: Vec<String> = Vec::new();
        let mut defs = Vec::new();
        for d in disks {
            let path = dir.join(format!("{d}.qcow2"));
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&path)
                .arg(format!("{mib}M"))
                .status()
                .expect("qemu-img");
            assert!(st.success());
            args.extend([
                "--blockdev".into(),
                format!("driver=file,node-name={d}-file,filename={{disk:{d}}},discard=unmap"),
                "--blockdev".into(),
                format!("driver=qcow2,node-name={d},file={d}-file,discard=unmap"),
            ]);
            defs.push(vmr_proto::vmdef::DiskDef {
                node: (*d).to_owned(),
                path: path.display().to_string(),
            });
        }
        args.extend([
            "--chardev".into(),
            "socket,id=vmr,path={qmp},server=on,wait=off".into(),
        ]);
        args.extend(["--monitor".into(), "chardev=vmr".into()]);
        args.extend([
            "--nbd-server".into(),
            "addr.type=unix,addr.path={nbd}".into(),
        ]);
        for d in disks {
            args.extend([
                "--export".into(),
                format!("type=nbd,id=live-{d},node-name={d},name={d},writable=on"),
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
        };
        def.validate().expect("valid definition");
        let launch = dir.join(format!("{name}.toml"));
        std::fs::write(&launch, def.to_toml()).expect("write definition");
        let tag = &uuid.simple().to_string()[..8];
        let nbd = primary
            .dir
            .join("work")
            .join(tag)
            .join(format!("vmr-{tag}-nbd.sock"));
        let qmp = dir.join("qmp.sock");
        let mut s = StandIn {
            def,
            launch,
            qmp,
            nbd,
            dir,
            child: None,
        };
        s.start();
        s
    }

    /// A handle on a running stand-in for writing and hashing only (no process ownership).
    pub fn attach(def: VmDefinition, nbd: PathBuf) -> StandIn {
        StandIn {
            def,
            launch: PathBuf::new(),
            qmp: PathBuf::new(),
            nbd,
            dir: PathBuf::new(),
            child: None,
        }
    }

    /// Start (or restart) the daemon with the same images.
    pub fn start(&mut self) {
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.nbd);
        std::fs::create_dir_all(self.nbd.parent().expect("parent")).expect("work dir");
        let def = &self.def;
        let args = def
            .render_args(
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
            )
            .expect("render");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("qsd.log"))
            .expect("log");
        let mut cmd = Command::new(&def.program);
        cmd.args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = ChildGuard::spawn(cmd, "qemu-storage-daemon").expect("spawn qsd");
        wait_for_path(&self.qmp, Duration::from_secs(10)).expect("qmp socket");
        wait_for_path(&self.nbd, Duration::from_secs(10)).expect("nbd socket");
        self.child = Some(child);
    }

    /// SIGKILL the daemon (an unclean exit: bitmaps become inconsistent).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// Clean shutdown (bitmaps are stored).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.terminate(Duration::from_secs(20)).expect("clean exit");
        }
    }

    /// `vm add` on `primary`.
    pub fn register(&self, primary: &Agent) {
        primary.ok(&[
            "vm",
            "add",
            &self.def.name,
            "--qmp",
            &self.qmp.display().to_string(),
            "--launch",
            &self.launch.display().to_string(),
        ]);
    }

    /// Write `blocks` random 64 KiB blocks (pattern from `seed`) to `disk` through the live export.
    pub fn write_random(&self, disk: &str, blocks: u64, seed: u64) {
        let rt = rt();
        rt.block_on(async {
            let c = NbdClient::connect(
                &Endpoint::Unix(self.nbd.clone()),
                ConnectOptions {
                    export: disk.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("connect");
            let n = c.size() / 65536;
            let mut x = seed | 1;
            for i in 0..blocks {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut data = vec![(x % 251) as u8; 65536];
                data[..16].copy_from_slice(&[seed.to_le_bytes(), i.to_le_bytes()].concat());
                c.write((x % n) * 65536, data.into(), false)
                    .await
                    .expect("write");
            }
            c.flush().await.expect("flush");
            c.disconnect().await.expect("disconnect");
        });
    }

    /// BLAKE3 of `disk`'s content as the guest sees it.
    pub fn hash(&self, disk: &str) -> [u8; 32] {
        rt().block_on(hash_export(&Endpoint::Unix(self.nbd.clone()), disk))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn hash_export(ep: &Endpoint, export: &str) -> [u8; 32] {
    let c = NbdClient::connect(
        ep,
        ConnectOptions {
            export: export.into(),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    let mut h = blake3::Hasher::new();
    let mut off = 0;
    while off < c.size() {
        let n = (4u64 << 20).min(c.size() - off) as u32;
        h.update(&c.read(off, n).await.expect("read"));
        off += u64::from(n);
    }
    c.disconnect().await.expect("disconnect");
    *h.finalize().as_bytes()
}

/// BLAKE3 of a qcow2 image (with its backing chain), read through a read-only qemu-nbd.
pub fn hash_image(path: &Path) -> [u8; 32] {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("n.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--read-only", "--format=qcow2", "--shared=1"])
        .arg(format!("--socket={}", sock.display()))
        .arg(path);
    let _g = ChildGuard::spawn(cmd, "qemu-nbd").expect("qemu-nbd");
    wait_for_path(&sock, Duration::from_secs(10)).expect("socket");
    rt().block_on(hash_export(&Endpoint::Unix(sock.clone()), ""))
}

/// Hashes of every disk of the replica's point (`None` = latest), by disk id.
pub fn replica_hashes(
    replica: &Agent,
    vm: uuid::Uuid,
    point: Option<u64>,
) -> Vec<(String, [u8; 32])> {
    let store = vmr_store::Store::open(&replica.dir.join("replicas")).expect("open store");
    let layers = store.point_layers(vm, point).expect("point layers");
    layers
        .into_iter()
        .map(|(d, p)| (d, hash_image(&p)))
        .collect()
}

/// Two agents, `a` (primary) and `b` (replica, allowing `a`), in one temp dir.
pub struct Pair {
    pub a: Agent,
    pub b: Agent,
    pub root: TestDir,
}

/// A temp dir kept after a failed test when `VMR_E2E_KEEP` is set (for reading agent logs).
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new("/nonexistent"), |t| t.path())
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && std::env::var_os("VMR_E2E_KEEP").is_some()
            && let Some(t) = self.0.take()
        {
            eprintln!("kept {}", t.keep().display());
        }
    }
}

impl Pair {
    /// Start both agents and authorize a on b.
    pub fn new() -> Pair {
        let root = TestDir(Some(
            tempfile::Builder::new()
                .prefix("vmr-e2e-")
                .tempdir()
                .expect("tempdir"),
        ));
        let a = Agent::start(root.path(), "host-a");
        let b = Agent::start(root.path(), "host-b");
        b.allow(&a);
        Pair { a, b, root }
    }

    /// `enable NAME` from a to b with extra arguments.
    pub fn enable(&self, vm: &str, extra: &[&str]) {
        let mut args = vec![
            "enable",
            vm,
            "--replica",
            &self.b.addr,
            "--replica-fingerprint",
            &self.b.fingerprint,
        ];
        args.extend_from_slice(extra);
        self.a.ok(&args);
    }

    /// Wait until the primary reports cycle `id` committed and the replica applied it.
    pub fn wait_cycle(&self, vm: &str, id: u64, timeout: Duration) {
        wait_until(
            timeout,
            &format!("cycle {id} of {vm} on the primary"),
            || self.a.status(vm).last_cycle.unwrap_or(0) >= id,
        );
        wait_until(
            timeout,
            &format!("cycle {id} of {vm} applied on the replica"),
            || self.b.status(vm).last_cycle.unwrap_or(0) >= id,
        );
    }
}

/// Write `count` consecutive 64 KiB blocks from block `first` of `disk` (content from `seed`)
/// through the stand-in's live export: exactly `count` blocks differ afterwards.
pub fn write_seq(vm: &StandIn, disk: &str, first: u64, count: u64, seed: u64) {
    rt().block_on(async {
        let c = NbdClient::connect(
            &Endpoint::Unix(vm.nbd.clone()),
            ConnectOptions {
                export: disk.into(),
                ..Default::default()
            },
        )
        .await
        .expect("connect");
        for i in first..first + count {
            let mut data = vec![(seed as u8) ^ (i as u8) | 1; 65536];
            data[..16].copy_from_slice(&[seed.to_le_bytes(), i.to_le_bytes()].concat());
            c.write(i * 65536, data.into(), false).await.expect("write");
        }
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });
}

/// The primary's replication state of `vm`.
pub fn state(p: &Pair, vm: &str) -> vmr_proto::api::ReplicationState {
    p.a.status(vm).state
}

/// Wait for a cycle cut after the last write, pause replication (it stays paused), and compare
/// the replica's latest point with the primary's disks.
pub fn assert_equal_at_cut(p: &Pair, vm: &StandIn) {
    const LONG: Duration = Duration::from_secs(90);
    let name = &vm.def.name;
    let cut = p.a.status(name).last_cycle.unwrap_or(0) + 1;
    p.wait_cycle(name, cut, LONG);
    p.a.ok(&["pause", name]);
    let last = p.a.status(name).last_cycle.unwrap_or(0);
    wait_until(LONG, "the replica to apply the last cycle", || {
        p.b.status(name).last_cycle.unwrap_or(0) >= last
    });
    for (disk, h) in replica_hashes(&p.b, vm.def.uuid, None) {
        assert_eq!(h, vm.hash(&disk), "disk {disk} differs at the cut");
    }
}
