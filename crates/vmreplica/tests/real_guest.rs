//! Real-guest scenarios: the cached Debian 12 test guest (`scripts/build-guest.sh`,
//! `docs/real-guest.md`) booted under QEMU (TCG: 25-85 s a boot here) as the primary VM of two
//! real agents, its workload (SQLite WAL and rollback-journal databases and file churn with
//! checksummed, gap-free sequences) running while vmreplica replicates it; every failed-over
//! VM boots and its workload checks the disk (`VMR CHECK ok`). The sequences the primary's
//! console printed, timestamped on arrival, are the ground truth for data loss. One scenario
//! runs the guest as a libvirt domain instead (private libvirt daemons of the harness as the
//! two hosts' libvirt: `vm add --libvirt`, test and planned failover through libvirt).
//!
//! Quick form (the test command runs it): the tests not marked `#[ignore]`. Full form:
//! `scripts/real-guest.sh` (`-- --include-ignored`). A scenario is a short function on the
//! shared harness (`vmr_testkit::harness::{GuestImage, GuestVm, Console}`); put a slow one
//! behind `#[ignore = "full real-guest form"]`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::{FailoverResult, ReplicationMode, ReplicationState};

/// Initial replication of the guest disk (4 GiB virtual, ~750 MiB allocated) while it boots.
const INITIAL: Duration = Duration::from_secs(300);
const CYCLE: Duration = Duration::from_secs(120);

fn guest() -> TestResult<GuestImage> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-guest.sh");
    Ok(GuestImage::ensure(&script)?)
}

fn failover(agent: &Agent, args: &[&str]) -> TestResult<FailoverResult> {
    let mut a = vec!["failover"];
    a.extend_from_slice(args);
    a.push("--json");
    Ok(serde_json::from_str(&agent.ok(&a)?)?)
}

/// A pair of agents with a booted guest `name` replicating every `freq` from a to b (initial
/// replication done).
fn replicating_guest(name: &str, freq: &str) -> TestResult<(Pair, GuestVm)> {
    replicating_guest_opts(name, freq, GuestOptions::default())
}

/// [`replicating_guest`] with the guest's options.
fn replicating_guest_opts(
    name: &str,
    freq: &str,
    opts: GuestOptions,
) -> TestResult<(Pair, GuestVm)> {
    let image = guest()?;
    let p = Pair::new(exe())?;
    let mut vm = GuestVm::create(
        &p.root.path().join(format!("vm-{name}")),
        &image,
        name,
        opts,
    )?;
    let t0 = Instant::now();
    vm.start()?;
    let check = vm.wait_check(BOOT_TIMEOUT)?;
    assert!(check.ok, "fresh guest: {}", check.line);
    eprintln!("{name}: booted to `{}` in {:?}", check.line, t0.elapsed());
    vm.console()?.wait_seq(1, Duration::from_secs(60))?;
    vm.register(&p.a)?;
    p.enable(name, &["--frequency", freq])?;
    let t1 = Instant::now();
    p.wait_cycle(name, 1, INITIAL)?;
    eprintln!("{name}: initial replication in {:?}", t1.elapsed());
    Ok((p, vm))
}

/// Wait for `n` more cycles of `vm` applied on the replica; the longest one's latency (ms).
fn run_cycles(p: &Pair, vm: &str, n: u64) -> TestResult<u64> {
    let mut st = p.a.status(vm)?;
    let mut max_ms = 0;
    for _ in 0..n {
        let next = st.last_cycle.unwrap_or(0) + 1;
        p.wait_cycle(vm, next, CYCLE)?;
        let now = p.a.status(vm)?;
        let cycles = now.stats.successful_cycles - st.stats.successful_cycles;
        if let Some(ms) =
            (now.stats.total_latency_ms - st.stats.total_latency_ms).checked_div(cycles)
        {
            max_ms = max_ms.max(ms);
        }
        st = now;
    }
    Ok(max_ms)
}

/// How much of the workload's time was lost when the recovered state holds sequence `wal`
/// and the primary died at `end`: `end` minus when `wal` was committed, that time interpolated
/// between the primary's console lines before and at it (the lines come about every second);
/// `end` minus the last line when no line showed `wal` yet.
fn loss_after(seqs: &[Seq], wal: u64, end: Instant) -> Duration {
    let Some(i) = seqs.iter().position(|s| s.wal >= wal) else {
        return seqs
            .last()
            .map_or(Duration::ZERO, |s| end.saturating_duration_since(s.at));
    };
    let b = seqs[i];
    let committed = match i.checked_sub(1).map(|j| seqs[j]) {
        Some(a) if b.wal > a.wal => {
            let frac = (wal.saturating_sub(a.wal)) as f64 / (b.wal - a.wal) as f64;
            a.at + (b.at - a.at).mul_f64(frac.min(1.0))
        }
        _ => b.at,
    };
    end.saturating_duration_since(committed)
}

/// Workload transactions per second over the console's `VMR SEQ` lines.
fn rate(seqs: &[Seq]) -> f64 {
    match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) if b.at > a.at => (b.wal - a.wal) as f64 / (b.at - a.at).as_secs_f64(),
        _ => 0.0,
    }
}

/// Unplanned failover of a real guest under its workload: the primary's QEMU and agent are
/// killed; the failed-over VM boots, its file system journal is replayed (initramfs fsck), its
/// databases pass `integrity_check`, gap-free with checksums; the loss is at most one interval
/// plus one cycle's time (+ 3 s: the 1 s SEQ granularity, console polling, TCG jitter).
/// The guest has a NIC and a guest agent channel (`{qga}`): the replica host's failover network
/// settings are applied in the failed-over guest (systemd-networkd there) and its agent reports
/// the address on the interface.
#[test]
fn unplanned_failover_of_a_real_guest_loses_at_most_an_interval() -> TestResult {
    let interval = Duration::from_secs(10);
    let mac = "52:54:00:12:34:56";
    let opts = GuestOptions {
        qga: true,
        nic_mac: Some(mac.to_owned()),
        ..GuestOptions::default()
    };
    let (mut p, mut vm) = replicating_guest_opts("rg-unplanned", "10s", opts)?;
    // The replica host's failover network settings (Hyper-V's Failover TCP/IP).
    p.b.ok(&[
        "vm",
        "set",
        vm.name(),
        "--failover-ip",
        &format!("{mac}=10.2.0.5/24"),
        "--failover-ip",
        &format!("{mac}=fd00:2::5/64"),
        "--failover-gateway",
        &format!("{mac}=10.2.0.1"),
        "--failover-dns",
        &format!("{mac}=10.2.0.2"),
    ])?;
    let max_cycle_ms = run_cycles(&p, vm.name(), 3)?;
    let uuid = vm.def.uuid;
    // Lose the host mid-interval, not right after a cycle: 5 more console lines (~5 s).
    for _ in 0..5 {
        let wal = vm.console()?.seqs().last().map_or(0, |s| s.wal);
        vm.console()?.wait_seq(wal + 1, Duration::from_secs(30))?;
    }

    // The primary host is lost: its VM and agent die at once.
    let t_kill = Instant::now();
    vm.kill9();
    p.a.kill9();
    let console = vm.console()?;
    console.settle(Duration::from_secs(10))?;
    let seqs = console.seqs();
    let last = *seqs
        .last()
        .ok_or("no VMR SEQ line on the primary's console")?;
    let applied = p.b.status(vm.name())?.last_cycle;

    let t0 = Instant::now();
    let live = failover(&p.b, &["start", vm.name(), "--force"])?;
    assert_eq!(live.state, ReplicationState::FailedOverWaitingCompletion);
    assert_eq!(live.point, applied, "latest point");
    let fo_console = Console::follow(&failover_serial(&p.b, uuid))?;
    let check = fo_console.wait_check(BOOT_TIMEOUT).map_err(|e| {
        format!(
            "{e}\n--- failed-over VM log ---\n{}",
            std::fs::read_to_string(failover_serial(&p.b, uuid).with_file_name("vm.log"))
                .unwrap_or_default()
        )
    })?;
    eprintln!(
        "failed-over VM: `{}` {:?} after failover start",
        check.line,
        check.at - t0
    );
    assert!(check.ok, "failed-over guest: {}", check.line);
    assert!(check.wal > 0, "nothing of the workload was replicated");
    // `failover start` answered once the settings were applied in the guest.
    eprintln!("failover network: {:?}", live.network);
    assert_eq!(live.network.len(), 1, "{:?}", live.network);
    assert!(
        live.network[0].contains("configured with networkd"),
        "{:?}",
        live.network
    );
    let qga = failover_serial(&p.b, uuid).with_file_name("qga.sock");
    let addrs = guest_addresses(&qga, mac)?;
    assert!(
        addrs.iter().any(|a| a == "10.2.0.5/24") && addrs.iter().any(|a| a == "fd00:2::5/64"),
        "the failed-over guest's agent reports {addrs:?} on {mac}"
    );
    assert!(
        check.wal <= last.wal + 40 && check.journal <= last.journal + 40,
        "the failed-over VM holds more than the primary wrote: {} vs last {last:?}",
        check.line
    );

    // The older of the two databases' states is what was recovered.
    let loss = loss_after(&seqs, check.wal.min(check.journal), t_kill);
    let bound = interval + Duration::from_millis(max_cycle_ms) + Duration::from_secs(3);
    eprintln!(
        "REAL-GUEST unplanned: last SEQ on the primary wal={} journal={} file={}; recovered \
         wal={} journal={} files={}; lost {} transactions = {:.1} s of workload at {:.1} tx/s \
         (bound {:.1} s = interval {} s + longest cycle {} ms + 3 s)",
        last.wal,
        last.journal,
        last.file,
        check.wal,
        check.journal,
        check.files,
        last.wal.saturating_sub(check.wal),
        loss.as_secs_f64(),
        rate(&seqs),
        bound.as_secs_f64(),
        interval.as_secs(),
        max_cycle_ms
    );
    assert!(
        loss <= bound,
        "lost {loss:?} of workload, more than {bound:?}"
    );
    p.b.stop()?;
    Ok(())
}

/// `qemu-img compare` (guest-visible content, through backing chains; images others hold are
/// read with `-U`): whether `a` and `b` are identical, and its message.
fn same_content(a: &Path, b: &Path) -> TestResult<(bool, String)> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => Ok((true, text)),
        Some(1) => Ok((false, text)),
        _ => Err(format!("qemu-img compare failed: {text}").into()),
    }
}

/// Defect 3 with a real guest: a clean guest shutdown (ACPI power button through the harness's
/// own monitor; QEMU runs without `-no-shutdown`, so it exits and stores its bitmaps), then
/// `failover prepare` ships the final cycle from the images; the replica's planned point is
/// the primary's disk exactly (zero loss), and the failed-over VM boots with every sequence
/// the primary's console showed.
#[test]
#[ignore = "full real-guest form (scripts/real-guest.sh): with the unplanned scenario beside it the quick form would take 5 min"]
fn prepare_after_a_clean_shutdown_loses_nothing() -> TestResult {
    let (p, mut vm) = replicating_guest("rg-planned", "10s")?;
    p.a.allow(&p.b)?; // the replica's split-brain probe of the primary
    run_cycles(&p, vm.name(), 1)?;
    let t0 = Instant::now();
    vm.powerdown()?;
    let st = vm.wait_exit(Duration::from_secs(180))?;
    eprintln!(
        "rg-planned: guest shut down, QEMU exited ({st}) in {:?}",
        t0.elapsed()
    );
    vm.console()?.settle(Duration::from_secs(10))?;
    let last = *vm
        .console()?
        .seqs()
        .last()
        .ok_or("no VMR SEQ line on the primary's console")?;

    let t1 = Instant::now();
    let prep = failover(&p.a, &["prepare", vm.name()])?;
    eprintln!(
        "rg-planned: prepare took {:?}: {}",
        t1.elapsed(),
        prep.message
    );
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    assert!(prep.message.contains("images"), "{}", prep.message);
    let k = prep.point.ok_or("no final cycle")?;
    p.b.wait_cycle(vm.name(), k, CYCLE)?;
    let live = failover(&p.b, &["start", vm.name()])?;
    assert_eq!(live.point, Some(k));
    // Zero loss: the planned point is the primary's disk as the shut-down guest left it.
    let layers = vmr_store::Store::open(&p.b.storage())?.point_layers(vm.def.uuid, Some(k))?;
    let (same, text) = same_content(&vm.disk, &layers[0].1)?;
    assert!(
        same,
        "the planned point differs from the primary's disk: {text}"
    );

    let fo_console = Console::follow(&failover_serial(&p.b, vm.def.uuid))?;
    let check = fo_console.wait_check(BOOT_TIMEOUT)?;
    eprintln!(
        "REAL-GUEST planned after shutdown: last SEQ on the primary wal={} journal={} file={}; \
         failed-over VM `{}`",
        last.wal, last.journal, last.file, check.line
    );
    assert!(check.ok, "failed-over guest: {}", check.line);
    assert!(
        check.wal >= last.wal && check.journal >= last.journal && check.files >= last.file,
        "the failed-over VM lacks what the primary's console showed: {} vs {last:?}",
        check.line
    );
    Ok(())
}

/// A guest `name` with a guest agent channel (`{dir}/qga.sock`, beside vmreplica's monitor,
/// registered with `vm add --qga`) replicating every `freq` from a to b with `extra` enable
/// arguments (initial replication done); `app_consistent_every_ms` sets the agent's test hook.
fn replicating_guest_with_agent(
    name: &str,
    freq: &str,
    opts: GuestOptions,
    extra: &[&str],
    app_consistent_every_ms: Option<u64>,
) -> TestResult<(Pair, GuestVm)> {
    let image = guest()?;
    let p = Pair::new(exe())?;
    let mut vm = GuestVm::create(
        &p.root.path().join(format!("vm-{name}")),
        &image,
        name,
        opts,
    )?;
    vm.def.args.extend(
        [
            "-chardev",
            "socket,path={dir}/qga.sock,server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        .map(str::to_owned),
    );
    std::fs::write(&vm.launch, vm.def.to_toml())?;
    let qga = vm.qmp.with_file_name("qga.sock");
    let t0 = Instant::now();
    vm.start()?;
    let check = vm.wait_check(BOOT_TIMEOUT)?;
    assert!(check.ok, "fresh guest: {}", check.line);
    eprintln!("{name}: booted to `{}` in {:?}", check.line, t0.elapsed());
    vm.console()?.wait_seq(1, Duration::from_secs(60))?;
    p.a.ok(&[
        "vm",
        "add",
        name,
        "--qmp",
        &vm.qmp.display().to_string(),
        "--qga",
        &qga.display().to_string(),
        "--launch",
        &vm.launch.display().to_string(),
    ])?;
    if let Some(ms) = app_consistent_every_ms {
        // the agent's test hook (feature test-hooks): app-consistent cycles this often
        std::fs::write(p.a.dir.join("test-app-consistent-every-ms"), ms.to_string())?;
    }
    let mut args = vec!["--frequency", freq];
    args.extend_from_slice(extra);
    p.enable(name, &args)?;
    let t1 = Instant::now();
    p.wait_cycle(name, 1, INITIAL)?;
    eprintln!("{name}: initial replication in {:?}", t1.elapsed());
    Ok((p, vm))
}

fn points(agent: &Agent, vm: &str) -> TestResult<Vec<vmr_proto::api::PointInfo>> {
    Ok(serde_json::from_str(&agent.ok(&["points", vm, "--json"])?)?)
}

/// What a point's disk looks like to tools that do not replay anything.
struct DiskAsFound {
    /// `e2fsck -fn` exit status and output.
    fsck_code: i32,
    fsck: String,
    /// Sizes of the workload's SQLite side files (`None`: absent).
    wal_len: Option<u64>,
    journal_len: Option<u64>,
}

/// Convert a failover overlay to a raw temp file and look at it: `e2fsck -fn` (no journal
/// replay, no change) and the sizes of `wal.db-wal` and `journal.db-journal` (debugfs).
fn inspect(disk: &str, tmp: &Path) -> TestResult<DiskAsFound> {
    let raw = tmp.join("point.raw");
    let _ = std::fs::remove_file(&raw);
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", disk])
        .arg(&raw)
        .output()?;
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()?;
    let ls = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /var/lib/vmr"])
        .arg(&raw)
        .output()?;
    let listing = String::from_utf8_lossy(&ls.stdout).into_owned();
    // `ls -l` lines: inode, mode, (uid, gid), size, date, time, name
    let size_of = |name: &str| {
        listing.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.last() == Some(&name))
                .then(|| f.get(f.len().checked_sub(4)?)?.parse::<u64>().ok())
                .flatten()
        })
    };
    assert!(size_of("wal.db").is_some(), "no wal.db in: {listing}");
    let found = DiskAsFound {
        fsck_code: fsck.status.code().unwrap_or(-1),
        fsck: format!(
            "{}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        ),
        wal_len: size_of("wal.db-wal"),
        journal_len: size_of("journal.db-journal"),
    };
    std::fs::remove_file(&raw)?;
    Ok(found)
}

/// App-consistent recovery points on a real guest: the first incremental cycle after enable is
/// cut with the guest frozen by qemu-ga (its fsfreeze hook quiesced the workload first), the
/// replica labels that point app-consistent, and its disk as found needs no recovery: `e2fsck
/// -fn` is clean (ext4's freeze cleared needs_recovery) and the WAL database has no `-wal`
/// content to replay and the journal database no hot journal, while a crash-consistent point
/// of the same VM needs journal recovery. The frozen time is printed.
#[test]
fn app_consistent_point_of_a_real_guest_needs_no_recovery() -> TestResult {
    let name = "rg-appcons";
    let (mut p, mut vm) = replicating_guest_with_agent(
        name,
        "10s",
        GuestOptions::default(),
        &["--app-consistent-every", "1h", "--recovery-points", "2"],
        None,
    )?;
    // The first incremental cycle freezes.
    let (st, _) = p.a.wait_status(
        name,
        CYCLE,
        Duration::from_millis(100),
        "an app-consistent cycle",
        |s| s.stats.app_consistent_cycles >= 1 || s.stats.quiesce_failures >= 1,
    )?;
    assert_eq!(
        (st.stats.app_consistent_cycles, st.stats.quiesce_failures),
        (1, 0),
        "the freeze failed: {:?}",
        st.stats.last_quiesce_error
    );
    let frozen_ms = st.stats.last_frozen_ms.ok_or("no frozen time")?;
    let call_ms = st.stats.last_freeze_call_ms.ok_or("no freeze call time")?;
    assert!(call_ms <= frozen_ms);
    let app_id = st.last_cycle.ok_or("no cycle")?;
    p.b.wait_cycle(name, app_id, CYCLE)?;
    // and a crash-consistent one after it
    p.wait_cycle(name, app_id + 1, CYCLE)?;
    let quiesced = std::fs::read_to_string(&vm.serial)?
        .lines()
        .filter(|l| l.starts_with("VMR QUIESCED"))
        .count();
    assert!(quiesced >= 1, "the workload was never quiesced by the hook");
    let pts = points(&p.b, name)?;
    let app = pts
        .iter()
        .find(|x| x.id == app_id)
        .ok_or("the app-consistent point was pruned")?;
    assert_eq!(app.kind, "app-consistent", "{pts:?}");
    let crash = pts
        .iter()
        .rfind(|x| x.id > app_id)
        .ok_or("no later point")?;
    assert_eq!(crash.kind, "crash-consistent", "{pts:?}");
    let crash_id = crash.id;

    // The primary host is lost; look at both points' disks as a failover finds them.
    vm.kill9();
    p.a.kill9();
    let tmp = p.root.path().to_path_buf();
    let fo = failover(
        &p.b,
        &[
            "start",
            name,
            "--point",
            &crash_id.to_string(),
            "--no-start",
            "--force",
        ],
    )?;
    let crash_disk = inspect(&fo.disks[0].1, &tmp)?;
    failover(&p.b, &["cancel", name])?;
    let fo = failover(
        &p.b,
        &[
            "start",
            name,
            "--point",
            &app_id.to_string(),
            "--no-start",
            "--force",
        ],
    )?;
    assert_eq!(fo.point, Some(app_id));
    let app_disk = inspect(&fo.disks[0].1, &tmp)?;
    eprintln!(
        "REAL-GUEST app-consistent: point {app_id} frozen {frozen_ms} ms (freeze call to thaw \
         answer: {call_ms} ms hooks and freeze, {} ms file systems frozen with the cut); e2fsck -fn exit {} (crash-consistent point {crash_id}: exit {}, {}); wal.db-wal \
         {:?} bytes (crash-consistent: {:?}); journal.db-journal {:?} (crash-consistent: {:?})",
        frozen_ms - call_ms,
        app_disk.fsck_code,
        crash_disk.fsck_code,
        if crash_disk.fsck.contains("journal recovery") {
            "needs journal recovery"
        } else {
            "no journal recovery"
        },
        app_disk.wal_len,
        crash_disk.wal_len,
        app_disk.journal_len,
        crash_disk.journal_len,
    );
    assert!(
        crash_disk.fsck.contains("journal recovery"),
        "a crash-consistent point of a mounted ext4 needs journal recovery:\n{}",
        crash_disk.fsck
    );
    assert_eq!(app_disk.fsck_code, 0, "e2fsck -fn:\n{}", app_disk.fsck);
    assert!(
        !app_disk.fsck.contains("journal recovery"),
        "app-consistent point:\n{}",
        app_disk.fsck
    );
    assert!(
        app_disk.wal_len.unwrap_or(0) == 0,
        "WAL content to replay in the app-consistent point: {:?}",
        app_disk.wal_len
    );
    assert!(
        app_disk.journal_len.unwrap_or(0) == 0,
        "hot journal in the app-consistent point: {:?}",
        app_disk.journal_len
    );
    p.b.stop()?;
    Ok(())
}

/// Planned failover with `failover prepare --shutdown`: vmreplica shuts the guest down through
/// its guest agent (QEMU `-no-shutdown` keeps the stopped VM: `prepare` reads its disks
/// through it), ships the final cycle, and the failed-over VM holds exactly what the primary's
/// workload committed before it stopped (its last `VMR SEQ` line, printed on SIGTERM).
#[test]
#[ignore = "full real-guest form (scripts/real-guest.sh): the quick form keeps the unplanned and the app-consistent scenarios (prepare --shutdown's decisions are table-tested, its timeout e2e-tested with a stand-in)"]
fn planned_failover_with_shutdown_loses_nothing() -> TestResult {
    let name = "rg-shutdown";
    let opts = GuestOptions {
        no_shutdown: true,
        ..GuestOptions::default()
    };
    let (mut p, vm) = replicating_guest_with_agent(name, "10s", opts, &[], None)?;
    let uuid = vm.def.uuid;
    run_cycles(&p, name, 1)?;
    let t0 = Instant::now();
    let prep = failover(&p.a, &["prepare", name, "--shutdown", "--timeout", "180s"])?;
    let took = t0.elapsed();
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let serial = std::fs::read_to_string(&vm.serial)?;
    assert!(
        serial.lines().any(|l| l.starts_with("VMR STOPPED")),
        "the workload was not stopped by a shutdown:\n{}",
        vm.console()?.tail(20)
    );
    let last = *vm.console()?.seqs().last().ok_or("no VMR SEQ line")?;
    let st = vm.qmp("query-status")?;
    assert_eq!(st["status"], "shutdown", "{st}");
    assert!(
        p.a.log()
            .contains("guest-shutdown sent through the guest agent"),
        "the guest was not asked through its agent"
    );

    // The replica's split-brain probe reaches the prepared primary (it is not running).
    p.a.allow(&p.b)?;
    let live = failover(&p.b, &["start", name])?;
    assert_eq!(live.point, prep.point, "the planned point");
    let fo_console = Console::follow(&failover_serial(&p.b, uuid))?;
    let check = fo_console.wait_check(BOOT_TIMEOUT)?;
    eprintln!(
        "REAL-GUEST planned --shutdown: prepare took {:.1} s (guest shutdown + final cycle); \
         primary's last SEQ wal={} journal={} file={}; failed-over `{}`",
        took.as_secs_f64(),
        last.wal,
        last.journal,
        last.file,
        check.line
    );
    assert!(check.ok, "failed-over guest: {}", check.line);
    assert_eq!(
        (check.wal, check.journal, check.files),
        (last.wal, last.journal, last.file),
        "planned failover lost or invented writes"
    );
    p.b.stop()?;
    Ok(())
}

/// The frozen time of app-consistent cuts on a real guest under its workload, over many cuts:
/// the agent's test hook makes every incremental cycle app-consistent (`enable` takes whole
/// hours). Every freeze must succeed and stay below the 8 s freeze timeout; the percentiles
/// are printed (the goal, < 100 ms at p99, is for KVM guests; TCG is slower).
#[test]
#[ignore = "full real-guest form"]
fn app_consistent_frozen_time_of_a_real_guest() -> TestResult {
    const CUTS: u64 = 20;
    let name = "rg-frozen";
    let (mut p, _vm) = replicating_guest_with_agent(
        name,
        "5s",
        GuestOptions::default(),
        &["--app-consistent-every", "1h"],
        Some(1),
    )?;
    let mut frozen = Vec::new();
    let mut seen = p.a.status(name)?.stats.app_consistent_cycles;
    while (frozen.len() as u64) < CUTS {
        let (st, _) = p.a.wait_status(
            name,
            CYCLE,
            Duration::from_millis(50),
            "the next app-consistent cycle",
            |s| s.stats.app_consistent_cycles > seen || s.stats.quiesce_failures > 0,
        )?;
        assert_eq!(
            st.stats.quiesce_failures, 0,
            "a freeze failed: {:?}",
            st.stats.last_quiesce_error
        );
        seen = st.stats.app_consistent_cycles;
        let all = st.stats.last_frozen_ms.ok_or("no frozen time")?;
        let call = st.stats.last_freeze_call_ms.ok_or("no freeze call time")?;
        frozen.push((all, all.saturating_sub(call)));
    }
    let pcts = |mut v: Vec<u64>| {
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        (at(0.5), at(0.9), at(0.99), v[v.len() - 1])
    };
    let total = pcts(frozen.iter().map(|f| f.0).collect());
    let fs = pcts(frozen.iter().map(|f| f.1).collect());
    eprintln!(
        "REAL-GUEST frozen time over {} app-consistent cuts, ms (p50/p90/p99/max): freeze call \
         to thaw answer {total:?}; file systems frozen with the cut {fs:?}; all (total, fs): \
         {frozen:?}",
        frozen.len()
    );
    assert!(total.3 < 8_000, "a freeze outlasted the freeze timeout");
    let pts = points(&p.b, name)?;
    assert_eq!(
        pts.last().map(|x| x.kind.as_str()),
        Some("app-consistent"),
        "{pts:?}"
    );
    p.b.stop()?;
    Ok(())
}

/// The VM directories in `agent`'s store.
fn store_dirs(agent: &Agent) -> TestResult<Vec<String>> {
    let mut dirs: Vec<String> = std::fs::read_dir(agent.storage().join("vms"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// What one ping-pong round measured.
struct RoundFigures {
    boot: Duration,
    reverse_bytes: u64,
    took: Duration,
}

/// One planned failover round of the ping-pong: the guest running on `from` (its console
/// `console`, the harness's monitor `hqmp`) is shut down cleanly, `from` prepares, `to`
/// starts it and it boots with every sequence the workload wrote; `reverse` on `to`, a cycle
/// after it applied on `from`, little shipped and no new store directory; then a few cycles
/// under the workload. Returns the console of the VM now running on `to`.
fn ping_pong_round(
    from: &Agent,
    to: &Agent,
    name: &str,
    uuid: uuid::Uuid,
    console: &Console,
    hqmp: &Path,
) -> TestResult<(Console, RoundFigures)> {
    let t_round = Instant::now();
    let route = format!("{}→{}", from.name, to.name);
    // 1. A clean guest shutdown; QEMU stays (-no-shutdown).
    harness_qmp(hqmp, "system_powerdown")?;
    wait_until(
        Duration::from_secs(180),
        &format!("{route}: the guest to shut down (query-status: shutdown)"),
        || {
            let st = harness_qmp(hqmp, "query-status")?;
            Ok(st.get("status").and_then(|s| s.as_str()) == Some("shutdown"))
        },
    )
    .map_err(|e| format!("{e}\n--- console ---\n{}", console.tail(20)))?;
    // 2. What the workload wrote last. A workload that reports its last commit on SIGTERM
    // (`VMR STOPPED` after its last SEQ line) gives the exact last sequences; an older one
    // may have committed up to one second (at most `vmr.rate` = 20 transactions) after its
    // last SEQ line.
    console.settle(Duration::from_secs(10))?;
    let last = *console
        .seqs()
        .last()
        .ok_or("no VMR SEQ line on the primary's console")?;
    let exact = console.tail(usize::MAX).contains("VMR STOPPED");

    // 3. Planned failover.
    let prep = failover(from, &["prepare", name])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover, "{route}");
    let k = prep.point.ok_or("no final cycle")?;
    let t_start = Instant::now();
    let live = failover(to, &["start", name])?;
    assert_eq!(live.point, Some(k), "{route}: not the planned point");
    let fo_console = Console::follow(&failover_serial(to, uuid))?;
    let check = fo_console.wait_check(BOOT_TIMEOUT).map_err(|e| {
        format!(
            "{e}\n--- failed-over VM log ---\n{}",
            std::fs::read_to_string(failover_dir(to, uuid).join("vm.log")).unwrap_or_default()
        )
    })?;
    let boot = check.at - t_start;
    assert!(check.ok, "{route}: failed-over guest: {}", check.line);
    if exact {
        assert_eq!(
            (check.wal, check.journal, check.files),
            (last.wal, last.journal, last.file),
            "{route}: the planned failover lost writes: {} vs last {last:?}",
            check.line
        );
    } else {
        assert!(
            check.wal >= last.wal && check.journal >= last.journal && check.files >= last.file,
            "{route}: the planned failover lost writes: {} vs last {last:?}",
            check.line
        );
        assert!(
            check.wal <= last.wal + 25 && check.journal <= last.journal + 25,
            "{route}: more than one second of writes after the last SEQ line: {} vs {last:?}",
            check.line
        );
    }

    // 4. Reverse: the old primary takes the point in without a copy.
    to.ok(&["reverse", name, "--frequency", "5s"])?;
    let (st, _) = to.wait_cycle(name, k + 1, CYCLE)?;
    from.wait_cycle(name, k + 1, CYCLE)?;
    assert_eq!(st.mode, ReplicationMode::Primary, "{route}");
    assert_eq!(from.status(name)?.mode, ReplicationMode::Replica, "{route}");
    let reverse_bytes = st.stats.total_bytes;
    assert!(
        reverse_bytes < 100 << 20,
        "{route}: the reverse shipped {reverse_bytes} bytes (the disk holds ~750 MiB): a full copy?"
    );
    for a in [from, to] {
        assert_eq!(
            store_dirs(a)?,
            vec![uuid.to_string()],
            "{route}: {}'s store has other VM directories",
            a.name
        );
    }

    // 5. The workload runs on under replication for a few cycles.
    let wal = fo_console.seqs().last().map_or(check.wal, |s| s.wal);
    from.wait_cycle(name, k + 4, 3 * CYCLE)?;
    fo_console.wait_seq(wal + 1, Duration::from_secs(30))?;
    let now = *fo_console.seqs().last().ok_or("no VMR SEQ line")?;
    let figures = RoundFigures {
        boot,
        reverse_bytes,
        took: t_round.elapsed(),
    };
    eprintln!(
        "REAL-GUEST ping-pong {route}: last SEQ wal={} journal={} file={}{}; failed-over VM \
         `{}` {:.1} s after failover start (loss 0); reverse shipped {} bytes ({:.2} MiB, \
         {:.1} % of ~750 MiB) in cycle {}; workload at wal={} after 3 more cycles; round {:.1} s",
        last.wal,
        last.journal,
        last.file,
        if exact { " (last commit)" } else { "" },
        check.line,
        boot.as_secs_f64(),
        reverse_bytes,
        reverse_bytes as f64 / (1u64 << 20) as f64,
        reverse_bytes as f64 * 100.0 / (750u64 << 20) as f64,
        k + 1,
        now.wal,
        figures.took.as_secs_f64()
    );
    Ok((fo_console, figures))
}

/// Failover ping-pong of a real guest under its workload (issue 13): replicated every 5 s,
/// planned failover A→B + reverse, B→A + reverse, A→B + reverse. Each time the guest shuts
/// down cleanly (ACPI; `-no-shutdown` in the definition keeps QEMU for `failover prepare`,
/// also on the VMs the agents start from the replicated definition), the failed-over VM boots
/// with every sequence the workload wrote (zero loss, file system and databases consistent),
/// each reverse ships only what the guest wrote since its failover, and each host keeps one
/// store directory of the VM.
#[test]
#[ignore = "full real-guest form"]
fn failover_ping_pong_of_a_real_guest_loses_nothing() -> TestResult {
    let name = "rg-pingpong";
    let t0 = Instant::now();
    let image = guest()?;
    let mut p = Pair::new(exe())?;
    p.a.allow(&p.b)?; // B's reverse calls A; B's failover start probes A
    let opts = GuestOptions {
        no_shutdown: true,
        ..GuestOptions::default()
    };
    let mut vm = GuestVm::create(
        &p.root.path().join(format!("vm-{name}")),
        &image,
        name,
        opts,
    )?;
    let uuid = vm.def.uuid;
    vm.start()?;
    let check = vm.wait_check(BOOT_TIMEOUT)?;
    assert!(check.ok, "fresh guest: {}", check.line);
    let first_boot = t0.elapsed();
    vm.console()?.wait_seq(1, Duration::from_secs(60))?;
    vm.register(&p.a)?;
    p.enable(name, &["--frequency", "5s"])?;
    let t1 = Instant::now();
    p.wait_cycle(name, 1, INITIAL)?;
    let initial = t1.elapsed();
    run_cycles(&p, name, 2)?;

    let (c1, r1) = ping_pong_round(&p.a, &p.b, name, uuid, vm.console()?, &vm.harness_qmp)?;
    assert!(
        !vm.running(),
        "the old primary's QEMU outlived become-replica"
    );
    let (c2, r2) = ping_pong_round(&p.b, &p.a, name, uuid, &c1, &failover_qmp(&p.b, uuid))?;
    drop(c1);
    let (_c3, r3) = ping_pong_round(&p.a, &p.b, name, uuid, &c2, &failover_qmp(&p.a, uuid))?;
    let rounds = [r1, r2, r3];
    eprintln!(
        "REAL-GUEST ping-pong: first boot {:.1} s, initial replication {:.1} s; failed-over \
         boots {:?} s; reverse bytes {:?}; rounds {:?} s; loss 0 each time; total {:.1} s",
        first_boot.as_secs_f64(),
        initial.as_secs_f64(),
        rounds
            .each_ref()
            .map(|r| (r.boot.as_secs_f64() * 10.0).round() / 10.0),
        rounds.each_ref().map(|r| r.reverse_bytes),
        rounds
            .each_ref()
            .map(|r| (r.took.as_secs_f64() * 10.0).round() / 10.0),
        t0.elapsed().as_secs_f64()
    );
    p.stop()?;
    Ok(())
}

/// The running domains on a private libvirt daemon (`virsh list --name`; `--all` with `all`).
fn lv_domains(lv: &PrivateLibvirt, all: bool) -> TestResult<Vec<String>> {
    let mut args = vec!["list", "--name"];
    if all {
        args.push("--all");
    }
    Ok(lv
        .virsh(&args)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Issue 16 with the real guest under libvirt: the guest boots as a domain of a private
/// libvirt daemon (host A: qcow2 overlay on the guest's root image, TCG unless
/// `$VMR_GUEST_ACCEL=kvm`) with its workload running; `vm add --libvirt`, `enable` at 5 s
/// (initial replication through a full backup job), 3 cycles under the workload; `failover
/// test` on B (a second private daemon, `libvirt-connect`): `NAME-test` in `virsh list` there,
/// it boots on the replica's overlays and its workload's check passes, `stop-test` undefines
/// it; `failover prepare --shutdown` powers the guest down through libvirt (ACPI: the guest
/// shuts down, its workload prints its last commit and `VMR STOPPED`; not destroyed at the
/// timeout), ships the final cycle; `failover start` on B runs the domain there (same UUID),
/// it boots and its check holds exactly the primary's last sequences (zero loss); `reverse` on
/// B captures it through B's libvirt without a full copy while the workload runs on.
#[test]
#[ignore = "full real-guest form"]
fn libvirt_real_guest_test_and_planned_failover_lose_nothing() -> TestResult {
    use std::os::unix::fs::MetadataExt;
    const NAME: &str = "rg-lv";
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!(
            "SKIPPED libvirt_real_guest_test_and_planned_failover_lose_nothing: a private libvirtd needs root"
        );
        return Ok(());
    }
    if let Some(why) = libvirt_unavailable() {
        return Err(format!("this test needs a private libvirt daemon: {why}").into());
    }
    let t0 = Instant::now();
    let image = guest()?;
    // short: the daemons' socket paths are under it
    let tmp = tempfile::Builder::new().prefix("vmr-lvg").tempdir()?;
    let lv = PrivateLibvirt::start(&tmp.path().join("la"))?;
    let lvb = PrivateLibvirt::start(&tmp.path().join("lb"))?;
    let opts = GuestOptions::default();
    let primary_disk = lv.start_guest_domain(NAME, &image, &opts)?;
    let primary_uuid = lv.virsh(&["domuuid", NAME])?.trim().to_owned();
    let console = Console::follow(&lv.console_log(NAME))?;
    let check = console.wait_check(BOOT_TIMEOUT)?;
    assert!(check.ok, "fresh guest: {}", check.line);
    let first_boot = t0.elapsed();
    eprintln!(
        "{NAME}: booted under libvirt to `{}` in {first_boot:?}",
        check.line
    );
    console.wait_seq(1, Duration::from_secs(60))?;

    let mut p = Pair::new(exe())?;
    p.b.add_config(&format!("libvirt-connect = \"{}\"", lvb.uri()))?;
    p.b.restart()?;
    p.a.allow(&p.b)?; // the replica's split-brain probe of the primary
    p.a.ok(&["vm", "add", NAME, "--libvirt", NAME, "--connect", lv.uri()])?;
    p.enable(NAME, &["--frequency", "5s"])?;
    let t1 = Instant::now();
    p.wait_cycle(NAME, 1, INITIAL)?;
    let initial = t1.elapsed();
    eprintln!("{NAME}: initial replication in {initial:?}");
    let max_cycle_ms = run_cycles(&p, NAME, 3)?;

    // Test failover on the replica host's libvirt: NAME-test boots on the replica's overlays.
    let t2 = Instant::now();
    let r = failover(&p.b, &["test", NAME])?;
    let test_name = format!("{NAME}-test");
    assert_eq!(r.name, test_name);
    assert!(
        lv_domains(&lvb, false)?.contains(&test_name),
        "virsh list on the replica host: {:?}",
        lv_domains(&lvb, true)?
    );
    assert_ne!(
        lvb.virsh(&["domuuid", &test_name])?.trim(),
        primary_uuid,
        "a test copy has a new UUID"
    );
    // on the replica's overlays, not the primary's disk
    let blk = lvb.virsh(&["domblklist", &test_name])?;
    assert!(
        r.disks
            .iter()
            .all(|(_, overlay)| blk.contains(overlay.as_str()))
            && !blk.contains(&*primary_disk.to_string_lossy()),
        "{blk}"
    );
    // the copy's console: the domain XML's path, in the replica daemon's log directory
    let test_console = Console::follow(&lvb.console_log(NAME))?;
    let test_check = test_console.wait_check(BOOT_TIMEOUT).map_err(|e| {
        format!(
            "{e}\n--- replica libvirtd's QEMU log ---\n{}",
            std::fs::read_to_string(lvb.dir().join(format!("log/qemu/{test_name}.log")))
                .unwrap_or_default()
        )
    })?;
    let test_boot = test_check.at - t2;
    assert!(test_check.ok, "test copy: {}", test_check.line);
    assert!(test_check.wal > 0, "nothing of the workload was replicated");
    p.b.ok(&["failover", "stop-test", NAME])?;
    assert!(
        !lv_domains(&lvb, true)?.contains(&test_name),
        "stop-test leaves no test domain: {:?}",
        lv_domains(&lvb, true)?
    );
    drop(test_console);
    // the failed-over domain will write to the same file: start it empty
    std::fs::remove_file(lvb.console_log(NAME))?;
    let wal = console.seqs().last().map_or(0, |s| s.wal);
    console.wait_seq(wal + 1, Duration::from_secs(30))?;

    // Planned failover: the real guest shuts down on ACPI through libvirt.
    let t3 = Instant::now();
    let prep = failover(&p.a, &["prepare", NAME, "--shutdown", "--timeout", "180s"])?;
    let prep_took = t3.elapsed();
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    assert!(
        prep.message.contains("the guest shut down (ACPI)") && !prep.message.contains("destroyed"),
        "the guest did not shut down on ACPI: {}",
        prep.message
    );
    assert_eq!(lv.virsh(&["domstate", NAME])?.trim(), "shut off");
    console.settle(Duration::from_secs(10))?;
    assert!(
        console.tail(usize::MAX).contains("VMR STOPPED"),
        "the workload was not stopped by a shutdown:\n{}",
        console.tail(20)
    );
    let last = *console
        .seqs()
        .last()
        .ok_or("no VMR SEQ line on the primary's console")?;
    let k = prep.point.ok_or("no final cycle")?;
    p.b.wait_cycle(NAME, k, CYCLE)?;

    let t4 = Instant::now();
    let live = failover(&p.b, &["start", NAME])?;
    assert_eq!(live.point, Some(k), "the planned point");
    assert!(
        lv_domains(&lvb, false)?.contains(&NAME.to_owned()),
        "virsh list on the replica host: {:?}",
        lv_domains(&lvb, true)?
    );
    assert_eq!(lvb.virsh(&["domuuid", NAME])?.trim(), primary_uuid);
    let fo_console = Console::follow(&lvb.console_log(NAME))?;
    let fo_check = fo_console.wait_check(BOOT_TIMEOUT).map_err(|e| {
        format!(
            "{e}\n--- replica libvirtd's QEMU log ---\n{}",
            std::fs::read_to_string(lvb.dir().join(format!("log/qemu/{NAME}.log")))
                .unwrap_or_default()
        )
    })?;
    let fo_boot = fo_check.at - t4;
    assert!(fo_check.ok, "failed-over guest: {}", fo_check.line);
    assert_eq!(
        (fo_check.wal, fo_check.journal, fo_check.files),
        (last.wal, last.journal, last.file),
        "planned failover through libvirt lost or invented writes"
    );

    // Reverse: the failed-over domain is captured through B's libvirt; the old primary takes
    // the planned point in without a copy, and the workload goes on under replication.
    p.b.ok(&["reverse", NAME, "--frequency", "5s"])?;
    let (st, _) = p.b.wait_cycle(NAME, k + 1, CYCLE)?;
    p.a.wait_cycle(NAME, k + 1, CYCLE)?;
    assert_eq!(st.mode, ReplicationMode::Primary);
    assert_eq!(p.a.status(NAME)?.mode, ReplicationMode::Replica);
    let src = st
        .libvirt
        .clone()
        .ok_or("the new primary has no libvirt source")?;
    assert_eq!((src.domain.as_str(), src.uri.as_str()), (NAME, lvb.uri()));
    let reverse_bytes = st.stats.total_bytes;
    assert!(
        reverse_bytes < 100 << 20,
        "the reverse shipped {reverse_bytes} bytes (the disk holds ~750 MiB): a full copy?"
    );
    let wal = fo_console.seqs().last().map_or(fo_check.wal, |s| s.wal);
    p.a.wait_cycle(NAME, k + 3, 3 * CYCLE)?;
    fo_console.wait_seq(wal + 1, Duration::from_secs(30))?;
    assert!(
        lvb.checkpoints(NAME)?
            .iter()
            .any(|c| c.starts_with("vmreplica-")),
        "the reverse cycles are backup jobs of the failed-over domain"
    );
    eprintln!(
        "REAL-GUEST libvirt: first boot {:.1} s, initial replication {:.1} s, longest 5 s cycle \
         {max_cycle_ms} ms; test copy `{}` {:.1} s after failover test; prepare --shutdown \
         {:.1} s ({}); primary's last SEQ wal={} journal={} file={}; failed-over `{}` {:.1} s \
         after failover start (loss 0); reverse shipped {reverse_bytes} bytes in cycle {}; \
         total {:.1} s",
        first_boot.as_secs_f64(),
        initial.as_secs_f64(),
        test_check.line,
        test_boot.as_secs_f64(),
        prep_took.as_secs_f64(),
        prep.message,
        last.wal,
        last.journal,
        last.file,
        fo_check.line,
        fo_boot.as_secs_f64(),
        k + 1,
        t0.elapsed().as_secs_f64()
    );
    p.stop()?;
    let mut ns = lv.mount_namespaces();
    ns.extend(lvb.mount_namespaces());
    drop(lv);
    drop(lvb);
    let left = processes_in_namespaces(&ns);
    assert!(left.is_empty(), "processes left: {left:?}");
    Ok(())
}
