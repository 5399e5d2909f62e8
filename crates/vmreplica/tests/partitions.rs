//! Automatic failover under real network partitions (issue 18, docs/auto-failover.md "Tests"):
//! the primary, the replica and the witness agents each in a network namespace of the test's
//! own (`vmr_testkit::harness::Partitioned`: a bridge in a fourth namespace, one address each
//! in a private test subnet blackholed on the host), links cut by iptables DROP rules inside
//! the namespaces. The VM is a qemu-storage-daemon stand-in on the primary (a fence freezes it
//! with SIGSTOP); a failover starts it on the replica.
//!
//! In every case, at no moment do both VMs run: a stamp writer in each VM (the primary's
//! stand-in, and the replica's failover VM: that writer starts with the test and connects as
//! soon as the VM serves) records its own send times (the test's monotonic clock) into the
//! VM's disk, FUA; the records read back afterwards are compared for overlap; a monitor
//! samples both processes' `/proc/PID/stat` every 5 ms. After healing, the surviving side's
//! data is intact: every acknowledged stamp is on its disk, and a failover VM's disk holds an
//! unbroken prefix of the primary's stamps at least as long as the last point known applied.
//!
//! Quick form (the default suite): the primary isolated, all three cut. Full matrix:
//! `cargo test -p vmreplica --features vmreplica/test-hooks --test partitions -- --include-ignored`.
//! Needs root (network namespaces, iptables); skipped with a message otherwise.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::{ReplicationState, VmStatus};

/// The shortest `--auto-failover` the validation allows: lease `L` 10 s, renew 2.5 s, the
/// primary's run window `L - D` 7.98 s.
const AUTO: &str = "20s";
const AUTO_S: u64 = 20;
const LEASE_S: u64 = 10;
const LONG: Duration = Duration::from_secs(90);
const DISK: &str = "disk0";
/// The disk (MiB) and the stamp regions: the primary's writer from 8 MiB, the failover VM's
/// from 20 MiB, 3072 records each (150 s at one write per 50 ms).
const DISK_MIB: u64 = 32;
const P_REGION: StampRegion = StampRegion {
    offset: 8 << 20,
    slots: 3072,
};
const R_REGION: StampRegion = StampRegion {
    offset: 20 << 20,
    slots: 3072,
};
const TAG_P: u8 = 1;
const TAG_R: u8 = 2;
const PERIOD: Duration = Duration::from_millis(50);

/// Network namespaces need root and iptables; the reason when they cannot be used.
fn unavailable() -> bool {
    match netns_unavailable() {
        Some(why) => {
            eprintln!("skipped: network namespaces unavailable: {why}");
            true
        }
        None => false,
    }
}

fn failed_over(s: &VmStatus) -> bool {
    matches!(
        s.state,
        ReplicationState::FailedOver | ReplicationState::FailedOverWaitingCompletion
    )
}

fn phase(agent: &Agent, name: &str) -> TestResult<String> {
    Ok(agent
        .status(name)?
        .auto_failover
        .ok_or("no auto-failover in status")?
        .phase)
}

/// One run: the agents in their namespaces, the stand-in enabled with automatic failover, the
/// two stamp writers and the monitor started.
struct Run {
    t: Partitioned,
    vm: StandIn,
    name: String,
    pw: Option<StampWriter>,
    rw: Option<StampWriter>,
    mon: Option<RunMonitor>,
    /// The primary's stamps `0..n0` are in a point the replica applied.
    n0: u64,
    /// When the run began (the network made).
    began: Instant,
}

impl Run {
    /// `vm_in_ns`: the stand-in runs in the primary's namespace (as on a real host), else in
    /// the test's (the host's) namespace while the agent runs in its own.
    fn new(name: &str, mono_offsets_s: [Option<i64>; 3], vm_in_ns: bool) -> TestResult<Run> {
        let began = Instant::now();
        let t = Partitioned::new(exe(), mono_offsets_s)?;
        let mut vm = StandIn::create(t.root.path(), &t.a, name, &[DISK], DISK_MIB)?;
        // The VM runs on the primary's host: in its namespace.
        if vm_in_ns {
            let qsd = t.net.wrapper(
                t.root.path(),
                Host::Primary,
                std::path::Path::new("qemu-storage-daemon"),
                None,
            )?;
            vm.set_launcher(&qsd);
            vm.start()?;
        }
        // Allocate the stamp regions before the first cycle: stamps overwrite in place.
        vm.write_seq(DISK, 128, 384, 7)?;
        vm.register(&t.a)?;
        t.enable(name, AUTO, &["--frequency", "5s"])?;
        t.b.wait_cycle(name, 1, LONG)?;
        // The primary's commit of the first (full) cycle done before the stamp writer first
        // connects: twice in about 40 runs a writer connecting and writing during that commit
        // saw the stand-in's QMP monitor stop answering (the commit's command, then
        // `qmp_capabilities`, 30 s timeouts) while its NBD export went on answering; no cycle
        // followed. Not understood yet (docs/auto-failover.md, "Tests").
        t.a.wait_cycle(name, 1, LONG)?;
        t.a.wait_status(
            name,
            LONG,
            Duration::from_millis(100),
            "the primary holds the lease",
            |s| {
                s.auto_failover
                    .as_ref()
                    .is_some_and(|a| a.phase == "holding" && a.epoch == Some(1))
            },
        )?;
        let base = Instant::now();
        let r_sock = nbd_socket(&t.b.dir, vm.def.uuid);
        let pw = StampWriter::start(vm.nbd.clone(), DISK, TAG_P, P_REGION, base, PERIOD);
        let rw = StampWriter::start(r_sock.clone(), DISK, TAG_R, R_REGION, base, PERIOD);
        let mon = RunMonitor::start(vm.pid(), r_sock.display().to_string(), base);
        wait_until(Duration::from_secs(30), "stamps on the primary", || {
            Ok(pw.acked() >= 10)
        })?;
        let n0 = pw.acked();
        let after = epoch_ms();
        if let Err(e) = t.b.wait_status(
            name,
            LONG,
            Duration::from_millis(50),
            "a point cut after the first stamps",
            |s| s.last_point_ms.is_some_and(|p| p > after),
        ) {
            eprintln!(
                "--- primary log ---\n{}\n--- replica log ---\n{}",
                tail(&t.a.log(), 80),
                tail(&t.b.log(), 80)
            );
            return Err(e.into());
        }
        Ok(Run {
            t,
            vm,
            name: name.to_owned(),
            pw: Some(pw),
            rw: Some(rw),
            mon: Some(mon),
            n0,
            began,
        })
    }

    /// Poll until the replica took the VM over (or `timeout`); when it was seen.
    fn wait_takeover(&self, timeout: Duration) -> TestResult<Instant> {
        let (_, at) = self.t.b.wait_status(
            &self.name,
            timeout,
            Duration::from_millis(50),
            "the replica takes the VM over",
            failed_over,
        )?;
        Ok(at)
    }

    /// Wait until the primary fenced; when it was seen.
    fn wait_fenced(&self, timeout: Duration) -> TestResult<Instant> {
        let (_, at) = self.t.a.wait_status(
            &self.name,
            timeout,
            Duration::from_millis(50),
            "the primary fences",
            |s| {
                s.auto_failover
                    .as_ref()
                    .is_some_and(|a| a.phase == "fenced")
            },
        )?;
        Ok(at)
    }

    /// The assertion window of a "nothing happens" case: `--auto-failover` + one lease + 5 s
    /// from `cut`, sampled every 500 ms: the primary holds the lease, its VM runs, the replica
    /// did not take over.
    fn nothing_happens(&self, cut: Instant) -> TestResult {
        let window = Duration::from_secs(AUTO_S + LEASE_S + 5);
        while cut.elapsed() < window {
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(phase(&self.t.a, &self.name)?, "holding");
            assert!(running(self.vm.pid()), "the primary's VM stopped");
            assert!(!failed_over(&self.t.b.status(&self.name)?), "took over");
        }
        Ok(())
    }

    /// Heal every link and wait for a point cut after the heal on the replica (replication
    /// resumed in the old direction).
    fn heal_and_replicate(&mut self) -> TestResult {
        self.t.net.heal()?;
        let after = epoch_ms();
        self.t.b.wait_status(
            &self.name,
            LONG,
            Duration::from_millis(100),
            "a point cut after the heal",
            |s| s.last_point_ms.is_some_and(|p| p > after),
        )?;
        Ok(())
    }

    /// Stop the writers and the monitor; check that the VMs never ran at once and that the
    /// surviving side's data is intact (`taken_over`: the failover VM survives, else the
    /// primary's VM).
    fn check(mut self, taken_over: bool) -> TestResult<Timeline> {
        let p_log = self.pw.take().ok_or("no writer")?.finish();
        let r_log = self.rw.take().ok_or("no writer")?.finish();
        let tl = self.mon.take().ok_or("no monitor")?.finish();
        // The primary's VM is read from its image (it may be frozen: SIGKILL it first).
        let image = self
            .vm
            .disks()
            .into_iter()
            .find(|(n, _)| n == DISK)
            .map(|(_, p)| p)
            .ok_or("no disk")?;
        if taken_over {
            self.vm.kill9();
        }
        let p_found = read_stamps_image(&image, P_REGION)?;
        let mine = |found: &Found, log: &[Stamp], tag: u8| -> TestResult<Vec<u64>> {
            let mut seqs = Vec::new();
            for &(t, seq, sent) in found {
                assert_eq!(t, tag, "a foreign record in the region");
                let rec = log
                    .iter()
                    .find(|s| s.seq == seq)
                    .ok_or_else(|| format!("record {seq} (torn or unknown) on disk"))?;
                assert_eq!(
                    rec.sent_ns, sent,
                    "record {seq} differs from what was written"
                );
                seqs.push(seq);
            }
            for s in log.iter().filter(|s| s.acked_ns.is_some()) {
                assert!(
                    seqs.contains(&s.seq),
                    "acknowledged stamp {} is not on the disk",
                    s.seq
                );
            }
            Ok(seqs)
        };
        let p_seqs = mine(&p_found, &p_log, TAG_P)?;
        assert_eq!(tl.both, 0, "both VMs ran in {} samples: {tl:?}", tl.both);
        eprintln!(
            "{}: {} samples, primary stamps {} ({} on disk), failover VM stamps {}",
            self.name,
            tl.samples,
            p_log.len(),
            p_seqs.len(),
            r_log.len()
        );
        if taken_over {
            let sock = nbd_socket(&self.t.b.dir, self.vm.def.uuid);
            let r_found = read_stamps_nbd(&sock, DISK, R_REGION)?;
            let r_seqs = mine(&r_found, &r_log, TAG_R)?;
            let r_start = r_found
                .iter()
                .map(|r| r.2)
                .min()
                .ok_or("the failover VM has no stamps")?;
            // The primary processed its last stamp on disk at the latest when it was
            // acknowledged, or (unanswered) when the monitor first saw it stopped.
            let p_end = p_seqs
                .iter()
                .filter_map(|q| p_log.iter().find(|s| s.seq == *q))
                .map(|s| s.acked_ns.or(tl.first_stopped_ns).unwrap_or(u64::MAX))
                .max()
                .unwrap_or(0);
            eprintln!(
                "{}: the primary's last write done at {:.3} s, the failover VM's first sent at {:.3} s, first seen running at {:?}",
                self.name,
                p_end as f64 / 1e9,
                r_start as f64 / 1e9,
                tl.second_first_running_ns.map(|n| n as f64 / 1e9)
            );
            assert!(
                p_end < r_start,
                "the VMs' writes overlap: {p_end} >= {r_start}"
            );
            if let (Some(stop), Some(start)) = (tl.first_stopped_ns, tl.second_first_running_ns) {
                assert!(
                    stop < start,
                    "the failover VM ran before the primary's stopped"
                );
            }
            assert!(!r_seqs.is_empty());
            // The failover VM's disk: an unbroken prefix of the primary's stamps, at least the
            // ones in the point known applied.
            let carried = read_stamps_nbd(&sock, DISK, P_REGION)?;
            let mut got: Vec<u64> = carried.iter().map(|r| r.1).collect();
            got.sort_unstable();
            for (i, seq) in got.iter().enumerate() {
                assert_eq!(*seq, i as u64, "the replica point is not a prefix: {got:?}");
            }
            assert!(
                got.len() as u64 >= self.n0,
                "the replica point holds {} stamps, fewer than the {} applied",
                got.len(),
                self.n0
            );
            for &(_, seq, sent) in &carried {
                let rec = p_log.iter().find(|s| s.seq == seq).ok_or("unknown stamp")?;
                assert_eq!(rec.sent_ns, sent);
            }
        } else {
            assert!(r_log.is_empty(), "a failover VM answered writes: {r_log:?}");
            assert!(tl.second_first_running_ns.is_none(), "{tl:?}");
        }
        self.t.stop()?;
        eprintln!(
            "{}: the run took {:.1} s",
            self.name,
            self.began.elapsed().as_secs_f64()
        );
        Ok(tl)
    }
}

/// The primary isolated from both: it fences within its run window (+ a renew period), the
/// replica takes the VM over within `--auto-failover` + one lease, after the fence. Healed, the
/// old primary stays fenced. `offsets`: monotonic clock shifts of the three hosts.
fn primary_isolated(name: &str, offsets: [Option<i64>; 3], vm_in_ns: bool) -> TestResult {
    let mut r = Run::new(name, offsets, vm_in_ns)?;
    r.t.net.isolate(Host::Primary)?;
    let cut = Instant::now();
    let fenced = r.wait_fenced(Duration::from_secs(20))?;
    let took = r.wait_takeover(Duration::from_secs(AUTO_S + LEASE_S + 10))?;
    let (f, k) = (fenced - cut, took - cut);
    eprintln!(
        "BENCH partition {name} (--auto-failover {AUTO}): primary isolated → fenced after {:.1} s, the replica took over after {:.1} s",
        f.as_secs_f64(),
        k.as_secs_f64()
    );
    assert!(f <= Duration::from_secs(12), "fenced after {f:?}");
    assert!(
        k <= Duration::from_secs(AUTO_S + LEASE_S),
        "took over after {k:?}, past --auto-failover + one lease"
    );
    assert!(
        k >= Duration::from_secs(LEASE_S),
        "took over after {k:?}: before the lease could have expired"
    );
    assert!(
        !running(r.vm.pid()),
        "the primary's VM runs after the fence"
    );
    // The failover VM serves: let its writer land stamps, then heal.
    let rw_acked = || r.rw.as_ref().map_or(0, StampWriter::acked);
    wait_until(Duration::from_secs(30), "stamps on the failover VM", || {
        Ok(rw_acked() >= 10)
    })?;
    r.t.net.heal()?;
    // Healed, the old primary stays fenced; the admin's `unfence` asks the witness, which
    // says the replica holds the lease now: refused for good.
    let out = r.t.a.cli(&["unfence", name])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "unfence after the takeover: {err}"
    );
    assert!(err.contains("took the VM over"), "{err}");
    assert_eq!(phase(&r.t.a, name)?, "fenced");
    assert!(!running(r.vm.pid()));
    r.check(true)?;
    Ok(())
}

/// All three links cut: the primary fences within its run window; the replica cannot reach
/// the witness and never starts the VM (window: `--auto-failover` + one lease + 5 s). Healed,
/// the admin's `unfence` (the witness renews the primary's epoch) runs the VM again and
/// replication resumes; the primary's disk holds every acknowledged stamp.
fn all_cut(name: &str) -> TestResult {
    let mut r = Run::new(name, [None; 3], true)?;
    r.t.net.cut_all()?;
    let cut = Instant::now();
    let fenced = r.wait_fenced(Duration::from_secs(20))? - cut;
    eprintln!(
        "partition {name}: all cut → fenced after {:.1} s",
        fenced.as_secs_f64()
    );
    assert!(fenced <= Duration::from_secs(12), "fenced after {fenced:?}");
    assert!(!running(r.vm.pid()));
    let window = Duration::from_secs(AUTO_S + LEASE_S + 5);
    while cut.elapsed() < window {
        std::thread::sleep(Duration::from_millis(500));
        assert!(!failed_over(&r.t.b.status(name)?), "the replica took over");
        assert_eq!(phase(&r.t.a, name)?, "fenced");
    }
    // The admin unfences as soon as the primary reaches the witness again, while the replica
    // still cannot: the primary renews its lease, and the replica, once back, is refused.
    // (Healing every link at once would race them: the replica, silent from the primary for
    // longer than `--auto-failover`, asks the witness too, and whichever asks first wins; a
    // stressed run of this test once saw the replica win, refusing the unfence.)
    r.t.net.set_cut(Host::Primary, Host::Witness, false)?;
    let out = r.t.a.ok(&["unfence", name])?;
    assert!(out.contains("unfenced"), "{out}");
    assert!(running(r.vm.pid()), "the VM does not run after the unfence");
    r.t.net.heal()?;
    let after = epoch_ms();
    r.t.b.wait_status(
        name,
        LONG,
        Duration::from_millis(100),
        "a point cut after the unfence",
        |s| s.last_point_ms.is_some_and(|p| p > after),
    )?;
    r.check(false)?;
    Ok(())
}

/// Host `h` isolated, or the primary–replica link cut (`None`): nothing happens for
/// `--auto-failover` + one lease + 5 s; healed, replication resumes.
fn nothing_happens(name: &str, h: Option<Host>) -> TestResult {
    let mut r = Run::new(name, [None; 3], true)?;
    match h {
        Some(h) => r.t.net.isolate(h)?,
        None => r.t.net.set_cut(Host::Primary, Host::Replica, true)?,
    }
    let cut = Instant::now();
    r.nothing_happens(cut)?;
    if h.is_none() {
        // The replica asked the witness after its silence and was refused.
        let e =
            r.t.b
                .status(name)?
                .auto_failover
                .and_then(|a| a.last_error)
                .unwrap_or_default();
        assert!(e.contains("held by the other party"), "{e}");
    }
    eprintln!(
        "partition {name}: nothing happened in {:.1} s",
        cut.elapsed().as_secs_f64()
    );
    r.heal_and_replicate()?;
    r.check(false)?;
    Ok(())
}

#[test]
fn quick_primary_isolated_fences_then_the_replica_takes_over() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    primary_isolated("pi", [None; 3], true)
}

#[test]
fn quick_all_three_cut_the_primary_fences_and_nobody_runs() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    all_cut("ac")
}

#[test]
#[ignore = "full partition matrix"]
fn replica_isolated_nothing_happens() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    nothing_happens("ri", Some(Host::Replica))
}

#[test]
#[ignore = "full partition matrix"]
fn witness_isolated_nothing_happens() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    nothing_happens("wi", Some(Host::Witness))
}

#[test]
#[ignore = "full partition matrix"]
fn primary_replica_link_cut_nothing_happens() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    nothing_happens("pr", None)
}

/// The stand-in VM in the host's network namespace while the primary agent runs in its own:
/// the fence still finds the process serving the VM's QMP socket (`/proc/net/unix` lists
/// only the reader's namespace; the fence reads the other namespaces' tables too) and
/// freezes it before the replica takes over. Without that, the fence reported the VM "not
/// running" and the replica started it while it ran (seen when this test was written).
#[test]
#[ignore = "full partition matrix"]
fn vm_outside_the_agents_namespace_is_still_fenced() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    primary_isolated("vo", [None; 3], false)
}

/// The primary's monotonic clock as the host's, the replica's 1 day ahead, the witness's 5 h
/// ahead (Linux time namespaces; the wall clocks are the one host's and not skewed): the
/// primary isolated fences before the replica takes over, within the same bounds.
#[test]
#[ignore = "full partition matrix"]
fn clock_skew_primary_isolated() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    primary_isolated("sk", [None, Some(86_400), Some(18_000)], true)
}

/// The primary–witness and primary–replica links flap (each cut 2.5 s, healed 2.5 s, the two
/// a quarter period apart: the renew period is 2.5 s) for 40 s, then heal; after
/// `--auto-failover` + one lease more, whichever side runs holds its data, and the two never
/// ran at once.
#[test]
#[ignore = "full partition matrix"]
fn flapping_links_never_run_both() -> TestResult {
    if unavailable() {
        return Ok(());
    }
    let name = "fl";
    let mut r = Run::new(name, [None; 3], true)?;
    let start = Instant::now();
    let period = Duration::from_millis(5_000);
    while start.elapsed() < Duration::from_secs(40) {
        let ph = start.elapsed().as_millis() as u64 % period.as_millis() as u64;
        r.t.net.set_cut(Host::Primary, Host::Witness, ph < 2_500)?;
        r.t.net
            .set_cut(Host::Primary, Host::Replica, (1_250..3_750).contains(&ph))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    r.t.net.heal()?;
    let healed = Instant::now();
    while healed.elapsed() < Duration::from_secs(AUTO_S + LEASE_S) {
        std::thread::sleep(Duration::from_millis(500));
        if failed_over(&r.t.b.status(name)?) {
            break;
        }
    }
    let taken = failed_over(&r.t.b.status(name)?);
    let p = phase(&r.t.a, name)?;
    eprintln!("partition {name}: after flapping: taken over {taken}, primary {p}");
    if taken {
        wait_until(Duration::from_secs(30), "stamps on the failover VM", || {
            Ok(r.rw.as_ref().map_or(0, StampWriter::acked) >= 10)
        })?;
    } else if p == "holding" {
        assert!(running(r.vm.pid()));
    }
    r.check(taken)?;
    Ok(())
}
