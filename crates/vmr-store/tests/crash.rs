//! Crash tests: a child process (this test binary re-executed) receives (straight into the
//! pending layers, committed before the acknowledgement) and prunes a scripted series of cycles; the parent SIGKILLs it at named steps (the child pauses
//! there, see `VMR_STORE_TEST_PAUSE`) and at random moments, then recovers the store and checks
//! that every point holds exactly one cycle's content and nothing acknowledged was lost.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use vmr_store::{RetentionPolicy, Store};

const CHILD_ENV: &str = "VMR_STORE_CRASH_CHILD_ROOT";
const TOTAL_CYCLES: u64 = 60;
const STEPS: [&str; 9] = [
    "cycle-layers-created",
    "cycle-writing",
    "cycle-flushed",
    "cycle-indexed",
    "cycle-committed",
    "prune-intent",
    "prune-copied",
    "prune-rebased",
    "prune-committed",
];

/// The child's body; a no-op unless run by `crash_trials`.
#[tokio::test]
async fn crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let vm = vm_uuid();
    let store = Store::open(std::path::Path::new(&root)).expect("open");
    if store.vms().is_empty() {
        store
            .add_vm(
                vm,
                &definition(vm),
                RetentionPolicy {
                    hourly: 1,
                    app_consistent_every_hours: None,
                    grid: None,
                },
            )
            .expect("add");
    }
    store.recover().await.expect("recover");
    let start = store.latest_cycle(vm).expect("latest").map_or(1, |l| l + 1);
    for id in start..=TOTAL_CYCLES.min(start + 5) {
        send(&store, vm, id).await.expect("send");
        println!("ACK {id}");
        store
            .prune_at(vm, T0 + id * STEP_MS + 1000)
            .await
            .expect("prune");
    }
    println!("DONE");
}

fn ack_id(line: &str) -> u64 {
    let at = line.find("ACK ").unwrap_or(0) + 4;
    line[at..].trim().parse().expect("ack id")
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_orphans_gone(pid: u32, root: &std::path::Path) {
    // qemu-nbd children exit on their own once the killed child's sockets close; qemu-img
    // children (working in a disk directory of the store) get SIGKILL with their parent.
    let tag = format!("vmr-store-{pid}-");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let busy = std::fs::read_dir("/proc").map(|rd| {
            rd.flatten().any(|e| {
                let by_tag = std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&tag))
                    .unwrap_or(false);
                let by_cwd = std::fs::read_link(e.path().join("cwd"))
                    .map(|c| c.starts_with(root))
                    .unwrap_or(false);
                by_tag || by_cwd
            })
        });
        if !busy.unwrap_or(false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run one child; kill it at `step` (or after `delay`). Returns the acked ids, whether the
/// child finished the whole series and whether it paused at `step`.
fn run_child(
    root: &std::path::Path,
    step: Option<&str>,
    delay: Duration,
) -> (Vec<u64>, bool, bool) {
    run_child_with(root, step, delay, &|| {})
}

/// [`run_child`], running `at_pause` while the child is paused at `step` (before the kill).
fn run_child_with(
    root: &std::path::Path,
    step: Option<&str>,
    delay: Duration,
    at_pause: &dyn Fn(),
) -> (Vec<u64>, bool, bool) {
    // Owned directly to read its pipes; `Kill` SIGKILLs and reaps it on every path.
    let exe = std::env::current_exe().expect("exe");
    let mut cmd = Command::new(exe);
    cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = step {
        cmd.env("VMR_STORE_TEST_PAUSE", s);
    }
    let mut c = Kill(cmd.spawn().expect("spawn"));
    let c = &mut c.0;
    let pid = c.id();
    let (tx, rx) = mpsc::channel::<String>();
    let out = c.stdout.take().expect("stdout");
    let err = c.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    let t1 = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t2 = std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    let deadline = Instant::now()
        + if step.is_some() {
            Duration::from_secs(30)
        } else {
            delay
        };
    let mut acks = Vec::new();
    let mut done = false;
    let mut paused = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("ACK ") => acks.push(ack_id(&l)),
            Ok(l) if l.contains("DONE") => done = true,
            Ok(l) if l.contains("PAUSED") => {
                paused = true;
                at_pause();
                break;
            }
            Ok(l) if l.contains("panicked") => panic!("child panicked: {l}"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = c.kill();
    let _ = c.wait();
    let _ = t1.join();
    let _ = t2.join();
    while let Ok(l) = rx.try_recv() {
        if l.contains("ACK ") {
            acks.push(ack_id(&l));
        }
        if l.contains("DONE") {
            done = true;
        }
        assert!(!l.contains("panicked"), "child panicked: {l}");
    }
    wait_orphans_gone(pid, root);
    (acks, done, paused)
}

async fn verify(
    root: &std::path::Path,
    last_acked: u64,
    models: &mut HashMap<u64, [u8; 32]>,
) -> anyhow::Result<u64> {
    let vm = vm_uuid();
    let store = Store::open(root)?;
    if store.vms().is_empty() {
        assert_eq!(last_acked, 0, "registered VM lost");
        return Ok(0);
    }
    store.recover().await?;
    // Nothing the killed store started (daemon, qemu-img, qemu-nbd) is alive any more: no
    // QEMU process holds the root's QEMU lock now. (A fork of this test process not yet
    // exec'd, started by the test running beside, holds a copy for a moment: not counted.)
    let left = qemu_holders(root);
    assert!(left.is_empty(), "left after recover: {left:?}");
    let Some(latest) = store.latest_point(vm)? else {
        assert_eq!(last_acked, 0, "acked cycles lost");
        return Ok(0);
    };
    assert!(
        latest >= last_acked,
        "latest point {latest} < acked {last_acked}"
    );
    let mut want = |id: u64| {
        *models
            .entry(id)
            .or_insert_with(|| hash_disks(&model(vm, id)))
    };
    // The latest point, through a failover view.
    let vdir = tempfile::tempdir()?;
    let view = store.create_view(vm, None, vdir.path()).await?;
    let got: Vec<Vec<u8>> = view
        .disks
        .iter()
        .map(|(_, p)| vmr_testkit::img::raw_content(p))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        hash_disks(&got),
        want(latest),
        "latest point {latest} is not cycle {latest}"
    );
    store.remove_view(vm, view.id)?;
    // The latest point's block hashes (from its hash index) are those of its cycle.
    let latest_content = model(vm, latest);
    for (i, content) in latest_content.iter().enumerate() {
        let size = content.len() as u64;
        let bs = vmr_store::hashes::BLOCK_SIZE;
        let h = store
            .resync_hashes(vm, &format!("disk{i}"), size, bs, 0, size.div_ceil(bs))
            .await?;
        assert_eq!(
            h.hashes,
            vmr_store::hashes::hash_blocks(content, bs),
            "hashes of disk{i} at point {latest}"
        );
        assert!(h.indexed > 0, "disk{i} at point {latest} has no hash index");
    }
    // Only committed points have index files.
    let ids: Vec<u64> = store.points(vm)?.iter().map(|p| p.id).collect();
    let idx = root.join("vms").join(vm.to_string()).join("hash-index");
    for d in std::fs::read_dir(&idx)?.flatten() {
        for f in std::fs::read_dir(d.path())?.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let id: Option<u64> = name
                .strip_prefix('c')
                .and_then(|n| n.strip_suffix(".hidx"))
                .and_then(|n| n.parse().ok());
            assert!(
                id.is_some_and(|id| ids.contains(&id)),
                "index file {name} of no point ({ids:?})"
            );
        }
    }
    // Every other point holds exactly its own cycle.
    for p in store.points(vm)? {
        assert_eq!(
            hash_disks(&point_content(&store, vm, Some(p.id))?),
            want(p.id),
            "point {}",
            p.id
        );
        for (_, l) in store.point_layers(vm, Some(p.id))? {
            vmr_testkit::img::check(&l)?;
        }
    }
    // No pending layer of an interrupted cycle survived recovery.
    let mut files = 0;
    for d in std::fs::read_dir(root.join("vms").join(vm.to_string()).join("disks"))?.flatten() {
        files += std::fs::read_dir(d.path())?.count();
    }
    let layers: usize = store
        .points(vm)?
        .iter()
        .map(|p| store.point_layers(vm, Some(p.id)).map(|l| l.len()))
        .sum::<Result<usize, _>>()?;
    assert!(files <= layers, "{files} layer files for {layers} layers");
    Ok(latest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_trials() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let mut models = HashMap::new();
    let mut trials = 0;
    let mut seed = 0x5eed_u64;
    for round in 0..3 {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("store");
        let mut last_acked = 0;
        let mut plan: Vec<Option<&str>> = STEPS.iter().map(|s| Some(*s)).collect();
        plan.extend([None, None, None, None]);
        for step in plan {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407 + round);
            let delay = Duration::from_millis(50 + (seed >> 33) % 900);
            let (acks, done, paused) = run_child(&root, step, delay);
            if let Some(s) = step {
                assert!(paused || done, "the child never reached step {s}");
            }
            if let Some(a) = acks.iter().max() {
                last_acked = last_acked.max(*a);
            }
            let latest = verify(&root, last_acked, &mut models).await?;
            eprintln!(
                "round {round} kill at {:?}: acked {acks:?}, latest {latest}",
                step.map_or(format!("{delay:?}"), str::to_owned)
            );
            trials += 1;
        }
    }
    assert!(trials >= 30);
    Ok(())
}

/// QEMU processes holding `<root>/qemu.lock` open (by device and inode), with their `comm`.
fn qemu_holders(root: &std::path::Path) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(root.join("qemu.lock")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
        }) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            if comm.starts_with("qemu") {
                found.push((pid, comm.trim().to_owned()));
            }
        }
    }
    found
}

/// A store killed after spawning its daemon but before recording its pid: the next store's
/// recovery finds the daemon by the lock it holds, and the next store writes cycles at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_before_recording_its_daemon() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("store");
    let daemons = std::sync::Mutex::new(Vec::new());
    let (acks, _, paused) = run_child_with(&root, Some("daemon-spawned"), Duration::ZERO, &|| {
        *daemons.lock().expect("lock") = qemu_holders(&root)
    });
    assert!(paused, "the child never reached daemon-spawned");
    assert!(acks.is_empty());
    // The store's daemon holds the lock (with the store process).
    let daemons = daemons.into_inner().expect("lock");
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    assert!(daemons[0].1.starts_with("qemu-storage"), "{daemons:?}");
    assert!(
        !root.join("qemu-storage-daemon.pid").exists(),
        "the pid was recorded before the pause"
    );
    let mut models = HashMap::new();
    let started = Instant::now();
    assert_eq!(verify(&root, 0, &mut models).await?, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(qemu_holders(&root).is_empty(), "{:?}", qemu_holders(&root));
    // The next store writes (and acknowledges) its cycles.
    let (acks, _, _) = run_child(&root, None, Duration::from_secs(120));
    assert_eq!(acks, (1..=6).collect::<Vec<u64>>());
    assert_eq!(verify(&root, 6, &mut models).await?, 6);
    Ok(())
}
