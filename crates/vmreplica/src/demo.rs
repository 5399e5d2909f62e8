//! `vmreplica demo`: everything on this machine, no set-up: two agents on 127.0.0.1, a
//! qemu-storage-daemon stand-in VM with two qcow2 disks, a writer acting as the guest,
//! replication at a short frequency with a live status view, then a check that the replica's
//! latest point equals the primary's disks at that cut. Every process it starts is killed on
//! exit, also on Ctrl-C.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmr_nbd::{ConnectOptions, Endpoint, NbdClient};
use vmr_proto::VmDefinition;
use vmr_proto::api::{EnableArgs, ReplicationState, Request, VmStatus};
use vmr_testkit::{ChildGuard, wait_for_path};

use crate::cli::DemoOpts;
use crate::client::call;
use crate::util::fmt_bytes;

const DISKS: [&str; 2] = ["disk0", "disk1"];

/// Run the demo.
pub fn run(opts: DemoOpts) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            r = demo(opts) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; every process the demo started was stopped"),
        }
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("running qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn spawn_agent(exe: &Path, dir: &Path) -> anyhow::Result<ChildGuard> {
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--dir")
        .arg(dir)
        .arg("agent")
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut g = ChildGuard::spawn(cmd, "vmreplica agent")?;
    let sock = vmr_agent::config::socket_path(dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if !g.is_running() || Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            bail!("the agent in {} did not start:\n{log}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(g)
}

/// Read a whole NBD export and hash it (BLAKE3).
pub async fn hash_export(ep: &Endpoint, export: &str) -> anyhow::Result<[u8; 32]> {
    let c = NbdClient::connect(
        ep,
        ConnectOptions {
            export: export.into(),
            ..Default::default()
        },
    )
    .await?;
    let size = c.size();
    let piece = 4u64 << 20;
    let mut h = blake3::Hasher::new();
    let mut off = 0;
    while off < size {
        let n = piece.min(size - off) as u32;
        let data = c.read(off, n).await?;
        h.update(&data);
        off += u64::from(n);
    }
    c.disconnect().await?;
    Ok(*h.finalize().as_bytes())
}

/// Hash a qcow2 image (with its backing chain) by serving it read-only with qemu-nbd.
pub async fn hash_image(path: &Path, sock: &Path) -> anyhow::Result<[u8; 32]> {
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--read-only")
        .arg("--format=qcow2")
        .arg("--shared=1")
        .arg(format!("--socket={}", sock.display()))
        .arg(path);
    let _g = ChildGuard::spawn(cmd, "qemu-nbd")?;
    wait_for_path(sock, Duration::from_secs(10))?;
    let r = hash_export(&Endpoint::Unix(sock.to_path_buf()), "").await;
    let _ = std::fs::remove_file(sock);
    r
}

struct Writer {
    running: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_writer(nbd: PathBuf, disk_bytes: u64) -> Writer {
    let running = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let (r, s, b) = (running.clone(), stop.clone(), bytes.clone());
    let task = tokio::spawn(async move {
        let mut clients = Vec::new();
        for d in DISKS {
            let opts = ConnectOptions {
                export: d.into(),
                ..Default::default()
            };
            clients.push(NbdClient::connect(&Endpoint::Unix(nbd.clone()), opts).await?);
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let blocks = disk_bytes / 65536;
        let mut counter = 0u64;
        while !s.load(Ordering::SeqCst) {
            if !r.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // 16 random 64 KiB writes (~1 MiB) to each disk, ~8 MiB/s in all.
            for c in &clients {
                for _ in 0..16 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    counter += 1;
                    let block = seed % blocks;
                    let mut data = vec![(counter % 251) as u8; 65536];
                    data[..8].copy_from_slice(&counter.to_le_bytes());
                    c.write(block * 65536, data.into(), false).await?;
                    b.fetch_add(65536, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for c in clients {
            c.flush().await?;
            c.disconnect().await?;
        }
        Ok(())
    });
    Writer {
        running,
        stop,
        bytes,
        task,
    }
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as f64 / total as f64) * width as f64) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn status_of(dir: &Path, name: &str) -> anyhow::Result<VmStatus> {
    let v = call(
        dir,
        &Request::Status {
            name: Some(name.into()),
        },
    )?;
    let mut rows: Vec<VmStatus> = serde_json::from_value(v)?;
    rows.pop().context("no status row")
}

async fn demo(opts: DemoOpts) -> anyhow::Result<()> {
    if opts.frequency < 5 {
        bail!("--frequency must be at least 5 s");
    }
    let exe = std::env::current_exe()?;
    let tmp = tempfile::Builder::new().prefix("vmr-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    let r = demo_in(&opts, &exe, &root).await;
    if r.is_err() || opts.keep {
        let kept = tmp.keep();
        eprintln!(
            "demo files kept in {} (agent logs: host-a/agent.log, host-b/agent.log)",
            kept.display()
        );
    }
    r
}

async fn demo_in(opts: &DemoOpts, exe: &Path, root: &Path) -> anyhow::Result<()> {
    let root = root.to_path_buf();
    println!("vmreplica demo in {}", root.display());
    let (a, b, vmdir) = (root.join("host-a"), root.join("host-b"), root.join("vm"));
    std::fs::create_dir_all(&vmdir)?;

    // Two agents on 127.0.0.1.
    let (pa, pb) = (free_port()?, free_port()?);
    let fa = vmr_agent::config::create(&a, "host-a", &format!("127.0.0.1:{pa}"), None)?;
    let fb = vmr_agent::config::create(&b, "host-b", &format!("127.0.0.1:{pb}"), None)?;
    let _agent_a = spawn_agent(exe, &a)?;
    let _agent_b = spawn_agent(exe, &b)?;
    println!("agents: host-a 127.0.0.1:{pa} ({fa})\n        host-b 127.0.0.1:{pb} ({fb})");
    call(
        &b,
        &Request::ServerAllow {
            primary: "host-a".into(),
            fingerprint: fa.clone(),
            storage: None,
            trust_group: None,
        },
    )?;

    // The stand-in VM: qemu-storage-daemon with two qcow2 disks.
    let disk_bytes = opts.disk_mib << 20;
    let mut def = VmDefinition::from_toml(include_str!("../../../examples/standin-vm.toml"))?;
    def.uuid = uuid::Uuid::new_v4();
    for d in &mut def.disks {
        let p = vmdir.join(format!("{}.qcow2", d.node));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p.display().to_string(),
            &disk_bytes.to_string(),
        ])?;
        d.path = p.display().to_string();
    }
    let launch = vmdir.join("demo-vm.toml");
    std::fs::write(&launch, def.to_toml())?;
    let qmp = vmdir.join("qmp.sock");
    let nbd = vmr_agent::launch::nbd_socket(&a, def.uuid);
    let paths = def.disks.clone();
    let cmd = vmr_agent::launch::command(
        &def,
        &|n| paths.iter().find(|d| d.node == n).map(|d| d.path.clone()),
        &qmp,
        &nbd,
        false,
        &vmdir.join("qsd.log"),
    )?;
    let _vm = ChildGuard::spawn(cmd, "qemu-storage-daemon stand-in VM")?;
    wait_for_path(&qmp, Duration::from_secs(10))?;
    wait_for_path(&nbd, Duration::from_secs(10))?;
    println!(
        "stand-in VM {} ({}) with 2 x {} qcow2 disks",
        def.name,
        def.uuid,
        fmt_bytes(disk_bytes)
    );

    // The guest writes from the start: initial replication happens under load.
    let writer = start_writer(nbd.clone(), disk_bytes);
    call(
        &a,
        &Request::VmAdd {
            name: def.name.clone(),
            qmp: qmp.display().to_string(),
            launch_toml: def.to_toml(),
            disks: vec![],
        },
    )?;
    call(
        &a,
        &Request::Enable(EnableArgs {
            name: def.name.clone(),
            replica: format!("127.0.0.1:{pb}"),
            replica_fingerprint: fb.clone(),
            frequency_secs: opts.frequency,
            recovery_points: 2,
            app_consistent_every_hours: 0,
            exclude_disks: vec![],
            compression: true,
            initial_at_ms: None,
            auto_resync: None,
            initial: Default::default(),
        }),
    )?;
    println!(
        "replication enabled: every {} s, 2 hourly recovery points\n",
        opts.frequency
    );

    // Live status until the wanted number of incremental cycles went through.
    let target = 1 + u64::from(opts.cycles);
    let deadline = Instant::now()
        + Duration::from_secs(60 + opts.frequency * (u64::from(opts.cycles) + 4) * 3);
    let mut last = None;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let s = status_of(&a, &def.name)?;
        let done = s.last_cycle.unwrap_or(0);
        let (p_done, _) = s.progress.unwrap_or((0, 0));
        let line = format!(
            "{} cycles {done}/{target}  {:<28} {:<8} sent {:>10}  in flight {:>10}  guest wrote {:>10} ",
            bar(done, target, 20),
            s.state.to_string(),
            s.health.to_string(),
            fmt_bytes(s.stats.total_bytes),
            fmt_bytes(p_done),
            fmt_bytes(writer.bytes.load(Ordering::Relaxed)),
        );
        // A live line on a terminal; one line per finished cycle in a log.
        if tty {
            print!("\r{line}");
            std::io::stdout().flush().ok();
        } else if last != s.last_cycle {
            println!("{line}");
        }
        if last != s.last_cycle {
            last = s.last_cycle;
        }
        if done >= target {
            break;
        }
        if matches!(
            s.state,
            ReplicationState::Error | ReplicationState::WaitingForStartResynchronize
        ) {
            bail!("replication stopped: {} ({})", s.state, s.health_reason);
        }
        if Instant::now() > deadline {
            bail!(
                "replication did not reach {target} cycles in time: {} {}",
                s.state,
                s.health_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!();

    // Stop the guest's writes, then wait for a cycle whose cut is after the last write.
    writer.running.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cut_after = status_of(&a, &def.name)?.last_cycle.unwrap_or(0) + 2;
    println!("guest writes stopped; waiting for cycle {cut_after} (taken after the last write)");
    let wait_until = Instant::now() + Duration::from_secs(opts.frequency * 6 + 60);
    loop {
        let s = status_of(&a, &def.name)?;
        if s.last_cycle.unwrap_or(0) >= cut_after {
            break;
        }
        if Instant::now() > wait_until {
            bail!(
                "cycle {cut_after} did not arrive: {} {}",
                s.state,
                s.health_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    call(
        &a,
        &Request::Pause {
            name: def.name.clone(),
        },
    )?;
    // The replica applies in the background after acknowledging: wait for the point.
    let wait_until = Instant::now() + Duration::from_secs(60);
    loop {
        let v = call(
            &b,
            &Request::Status {
                name: Some(def.name.clone()),
            },
        )?;
        let rows: Vec<VmStatus> = serde_json::from_value(v)?;
        if rows.first().and_then(|r| r.last_cycle).unwrap_or(0) >= cut_after {
            break;
        }
        if Instant::now() > wait_until {
            bail!("the replica did not apply cycle {cut_after} in time");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Verify: primary disks (through the live exports) versus the replica's latest point.
    let storage = b.join("replicas");
    let store = vmr_store::Store::open(&storage)?;
    let layers = store.point_layers(def.uuid, None)?;
    let mut all_ok = true;
    println!(
        "\n{:<6} {:<66} {:<66}",
        "DISK", "PRIMARY (BLAKE3)", "REPLICA LATEST POINT (BLAKE3)"
    );
    for (i, d) in DISKS.iter().enumerate() {
        let p = hash_export(&Endpoint::Unix(nbd.clone()), d).await?;
        let (_, layer) = layers
            .iter()
            .find(|(id, _)| id == d)
            .with_context(|| format!("replica has no {d}"))?;
        let r = hash_image(layer, &root.join(format!("check{i}.sock"))).await?;
        let ok = p == r;
        all_ok &= ok;
        println!(
            "{d:<6} {:<66} {:<66} {}",
            hex(&p),
            hex(&r),
            if ok { "MATCH" } else { "DIFFERENT" }
        );
    }
    writer.stop.store(true, Ordering::SeqCst);
    let _ = writer.task.await;

    let pts = call(
        &b,
        &Request::Points {
            name: def.name.clone(),
        },
    )?;
    println!("\nrecovery points on host-b:");
    crate::output::print(crate::output::Kind::Points, &pts, false);
    let s = status_of(&a, &def.name)?;
    println!(
        "\nsummary: {} cycles, {} shipped (avg {}, max latency {} ms), {} missed, {} errors; guest wrote {}",
        s.stats.successful_cycles,
        fmt_bytes(s.stats.total_bytes),
        fmt_bytes(s.stats.average_bytes()),
        s.stats.max_latency_ms,
        s.stats.missed_cycles,
        s.stats.errors,
        fmt_bytes(writer.bytes.load(Ordering::Relaxed)),
    );
    if !all_ok {
        bail!("the replica's latest point differs from the primary");
    }
    println!("the replica equals the primary at the cut");
    failover_demo(opts, &a, &b, &def, &nbd, pa).await?;
    println!(
        "demo passed: the replica equals the primary at the cut; test and planned failover work"
    );
    Ok(())
}

/// Ends the VM processes the failover part started (they outlive the agents on purpose).
#[derive(Default)]
struct Pids(Vec<u32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for pid in &self.0 {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn failover_call(dir: &Path, req: &Request) -> anyhow::Result<vmr_proto::api::FailoverResult> {
    Ok(serde_json::from_value(call(dir, req)?)?)
}

/// After the hash check: a test failover on host-b (its content checked against the primary),
/// then a planned failover (prepare on host-a, start on host-b, hashes), reverse replication
/// and one cycle back to host-a.
async fn failover_demo(
    opts: &DemoOpts,
    a: &Path,
    b: &Path,
    def: &VmDefinition,
    nbd: &Path,
    port_a: u16,
) -> anyhow::Result<()> {
    let name = def.name.clone();
    let mut pids = Pids::default();
    let primary: Vec<[u8; 32]> = {
        let mut v = Vec::new();
        for d in DISKS {
            v.push(hash_export(&Endpoint::Unix(nbd.to_path_buf()), d).await?);
        }
        v
    };
    let check = |label: &str, got: &[[u8; 32]]| -> anyhow::Result<()> {
        let ok = got == primary.as_slice();
        println!(
            "  {label}: {}",
            if ok {
                "MATCH (every disk)"
            } else {
                "DIFFERENT"
            }
        );
        if !ok {
            bail!("{label} differs from the primary");
        }
        Ok(())
    };

    println!("\ntest failover on host-b (isolated copy, replication goes on):");
    let t = failover_call(
        b,
        &Request::FailoverTest {
            name: name.clone(),
            point: None,
        },
    )?;
    pids.0.extend(t.pid);
    println!(
        "  {} started from point {} in {} ms",
        t.name,
        t.point.unwrap_or(0),
        t.elapsed_ms
    );
    let tnbd = t
        .disks
        .first()
        .and_then(|(_, p)| Path::new(p).parent())
        .context("test copy has no disks")?
        .join("nbd.sock");
    let mut got = Vec::new();
    for d in DISKS {
        got.push(hash_export(&Endpoint::Unix(tnbd.clone()), d).await?);
    }
    check("test copy vs primary", &got)?;
    call(
        b,
        &Request::FailoverStopTest {
            name: name.clone(),
            test_id: t.test_id,
        },
    )?;
    println!("  test copy removed");

    println!("\nplanned failover host-a -> host-b:");
    call(
        a,
        &Request::ServerAllow {
            primary: "host-b".into(),
            fingerprint: server_fingerprint(b)?,
            storage: None,
            trust_group: None,
        },
    )?;
    call(a, &Request::Resume { name: name.clone() })?;
    let prep = failover_call(a, &Request::FailoverPrepare { name: name.clone() })?;
    println!(
        "  prepare on host-a: final cycle {} shipped, {} ({} ms)",
        prep.point.unwrap_or(0),
        prep.state,
        prep.elapsed_ms
    );
    let live = failover_call(
        b,
        &Request::FailoverStart {
            name: name.clone(),
            point: None,
            no_start: false,
            force: false,
        },
    )?;
    pids.0.extend(live.pid);
    println!(
        "  start on host-b: {} from point {}, {}; QMP answered {} ms after the command",
        live.name,
        live.point.unwrap_or(0),
        live.state,
        live.elapsed_ms
    );
    let bnbd = vmr_agent::launch::nbd_socket(b, def.uuid);
    let mut got = Vec::new();
    for d in DISKS {
        got.push(hash_export(&Endpoint::Unix(bnbd.clone()), d).await?);
    }
    check(
        "failed-over VM vs primary's last content (zero data loss)",
        &got,
    )?;
    // The failed-over VM's guest writes 1 MiB: that, and only that, must travel back.
    {
        let c = NbdClient::connect(
            &Endpoint::Unix(bnbd.clone()),
            ConnectOptions {
                export: DISKS[0].into(),
                ..Default::default()
            },
        )
        .await?;
        for i in 0..16u64 {
            c.write(i * 3 * 65536, vec![0xa5u8; 65536].into(), false)
                .await?;
        }
        c.flush().await?;
        c.disconnect().await?;
    }
    let rev = failover_call(
        b,
        &Request::Reverse {
            name: name.clone(),
            replica: Some(format!("127.0.0.1:{port_a}")),
            replica_fingerprint: None,
            frequency_secs: Some(opts.frequency),
        },
    )?;
    println!("  reverse: {}", rev.message);
    let k = live.point.unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(opts.frequency * 6 + 60);
    loop {
        let sb = status_of(b, &name)?;
        let sa = status_of(a, &name)?;
        if sb.last_cycle.unwrap_or(0) > k && sa.last_cycle.unwrap_or(0) > k {
            println!(
                "  cycle {} replicated back host-b -> host-a ({} sent); host-b {:?} {}, host-a {:?} {}",
                sb.last_cycle.unwrap_or(0),
                fmt_bytes(sb.stats.total_bytes),
                sb.mode,
                sb.state,
                sa.mode,
                sa.state
            );
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no cycle back after reverse: host-b {} {}",
                sb.state,
                sb.health_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let store = vmr_store::Store::open(&a.join("replicas"))?;
    let layers = store.point_layers(def.uuid, None)?;
    let mut back = Vec::new();
    let mut now = Vec::new();
    for (i, d) in DISKS.iter().enumerate() {
        let (_, layer) = layers
            .iter()
            .find(|(id, _)| id == d)
            .with_context(|| format!("host-a has no {d}"))?;
        back.push(hash_image(layer, &a.join(format!("back{i}.sock"))).await?);
        now.push(hash_export(&Endpoint::Unix(bnbd.clone()), d).await?);
    }
    let ok = back == now;
    println!(
        "  host-a's latest point vs the VM on host-b: {}",
        if ok {
            "MATCH (every disk)"
        } else {
            "DIFFERENT"
        }
    );
    if !ok {
        bail!("after reverse, host-a's replica differs from host-b");
    }
    Ok(())
}

fn server_fingerprint(dir: &Path) -> anyhow::Result<String> {
    let v = call(dir, &Request::ServerShow)?;
    v.get("fingerprint")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
        .context("no fingerprint")
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
