//! The faults and their trials. Each fault gets a test bed (two real agents, one stand-in VM
//! with a 16 MiB disk replicated every 5 s, and whatever the fault needs: namespaces, a
//! tmpfs); each trial starts a guest writer (4 MiB/s of random 64 KiB writes), starts the
//! fault at a random moment of the 5 s cycle, ends it, stops the writer, waits for a cycle cut
//! after the last write and compares the replica's latest point with the primary's disk. A
//! failed trial gets a fresh bed, so one failure does not cascade into the next trials.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::Rng;
use rand::rngs::StdRng;
use vmr_nbd::Endpoint;
use vmr_proto::api::Health;
use vmr_testkit::harness::{
    Agent, Pair, READY_TIMEOUT, StandIn, TestDir, Writer, available, connect_nbd, epoch_ms,
    fill_fs, hash_image,
};

use crate::net::{self, Netns};
use crate::proxy::DelayProxy;

const VM: &str = "vm1";
const DISK: &str = "disk0";
const DISK_MIB: u64 = 16;
const FREQUENCY: &str = "5s";
const CYCLE: Duration = Duration::from_secs(5);
const WRITE_RATE: f64 = 4.0 * 1024.0 * 1024.0;
const LONG: Duration = Duration::from_secs(180);

/// One fault of the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 1: SIGKILL of the replica agent, then restart.
    KillReplica,
    /// 2: SIGKILL of the primary agent, then restart.
    KillPrimary,
    /// 3a: the link between the namespaces cut, then restored.
    NetCut,
    /// 3b: 5 % loss plus 200 ms delay each way, then removed.
    LossDelay,
    /// 4: the replica's store full, then freed.
    ReplicaFull,
    /// 5: the fleecing file system full while a view is open, then freed.
    FleeceFull,
    /// 6: a second agent on each agent's directory.
    SecondAgent,
}

impl Fault {
    /// Every fault, in table order.
    pub const ALL: [Fault; 7] = [
        Fault::KillReplica,
        Fault::KillPrimary,
        Fault::NetCut,
        Fault::LossDelay,
        Fault::ReplicaFull,
        Fault::FleeceFull,
        Fault::SecondAgent,
    ];

    /// Its number for `--only` (3 selects both network faults).
    pub fn number(self) -> u8 {
        match self {
            Fault::KillReplica => 1,
            Fault::KillPrimary => 2,
            Fault::NetCut | Fault::LossDelay => 3,
            Fault::ReplicaFull => 4,
            Fault::FleeceFull => 5,
            Fault::SecondAgent => 6,
        }
    }

    /// Its row label.
    pub fn label(self) -> &'static str {
        match self {
            Fault::KillReplica => "1. SIGKILL of the replica agent",
            Fault::KillPrimary => "2. SIGKILL of the primary agent",
            Fault::NetCut => "3a. network cut between the agents",
            Fault::LossDelay => "3b. 5 % loss + 200 ms delay",
            Fault::ReplicaFull => "4. replica store full",
            Fault::FleeceFull => "5. fleecing file system full (view open)",
            Fault::SecondAgent => "6. second agent on the same directory",
        }
    }

    /// Trials of the full campaign and of `--quick`.
    pub fn trials(self, quick: bool) -> usize {
        match (self, quick) {
            (Fault::KillReplica | Fault::KillPrimary, false) => 30,
            (Fault::NetCut | Fault::LossDelay | Fault::FleeceFull, true) => 1,
            (_, true) => 2,
            (_, false) => 10,
        }
    }
}

/// What one trial found.
#[derive(Debug, Default)]
pub struct Trial {
    /// Why it failed (None: passed).
    pub failure: Option<String>,
    /// The replica's point differed from the primary's disk at the cut.
    pub data_lost: bool,
    /// The guest writer's error, if it saw one.
    pub write_error: Option<String>,
    /// Wall time.
    pub secs: f64,
    /// A kill struck while the primary showed a cycle in flight.
    pub mid_cycle: bool,
    /// What the trial observed (e.g. packets dropped).
    pub note: Option<String>,
}

/// The shared parts of a run.
pub struct Ctx {
    /// The vmreplica binary.
    pub exe: PathBuf,
    /// The run's directory.
    pub root: PathBuf,
    /// Async runtime for the guest writer.
    pub rt: tokio::runtime::Runtime,
    /// Incompressible data for the writer.
    pub pool: bytes::Bytes,
}

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, mib: u64) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(at)?;
        net::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &at.display().to_string(),
            ],
        )?;
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A test bed. Fields drop in order: the agents and VM (and every process naming the bed's
/// directory) first, then the mounts, the proxy and the namespaces.
struct Bed {
    vm: StandIn,
    pair: Pair,
    mounts: Vec<Mount>,
    proxy: Option<DelayProxy>,
    net: Option<Netns>,
    dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.vm.kill9();
        self.pair.a.kill9();
        self.pair.b.kill9();
        vmr_testkit::harness::kill_processes_under(&self.dir);
        self.mounts.clear();
        self.proxy = None;
        self.net = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    fn new(ctx: &Ctx, fault: Fault, n: usize) -> anyhow::Result<Bed> {
        let dir = ctx.root.join(format!("f{}-{n}", fault.number()));
        let td = TestDir::given(&dir)?;
        let mut mounts = Vec::new();
        let mut net = None;
        let pair = match fault {
            Fault::NetCut | Fault::LossDelay => {
                let ns = Netns::create()?;
                let wa = ns.wrapper(&dir, &ns.a, &ctx.exe)?;
                let wb = ns.wrapper(&dir, &ns.b, &ctx.exe)?;
                let a = Agent::start_on(&wa, &dir, "host-a", net::ADDR_A, None)?;
                let b = Agent::start_on(&wb, &dir, "host-b", net::ADDR_B, None)?;
                b.allow(&a)?;
                net = Some(ns);
                Pair { a, b, root: td }
            }
            _ => Pair::in_dir(&ctx.exe, td)?,
        };
        let mut pair = pair;
        if fault == Fault::ReplicaFull {
            pair.b.stop()?;
            mounts.push(Mount::tmpfs(&pair.b.storage(), 64)?);
            pair.b.restart()?;
        }
        if fault == Fault::FleeceFull {
            mounts.push(Mount::tmpfs(&pair.a.dir.join("work"), 64)?);
        }
        let vm = StandIn::create(&dir, &pair.a, VM, &[DISK], DISK_MIB)?;
        vm.write_random(DISK, 64, 1)?;
        vm.register(&pair.a)?;
        let mut bed = Bed {
            vm,
            pair,
            mounts,
            proxy: None,
            net,
            dir,
        };
        let replica = match &bed.net {
            Some(ns) => {
                let target = bed.pair.b.addr.parse()?;
                let p = DelayProxy::start(Some(&Netns::path(&ns.a)), net::ADDR_A, target)?;
                let a = p.addr.to_string();
                bed.proxy = Some(p);
                a
            }
            None => bed.pair.b.addr.clone(),
        };
        bed.pair.a.ok(&[
            "enable",
            VM,
            "--replica",
            &replica,
            "--replica-fingerprint",
            &bed.pair.b.fingerprint,
            "--frequency",
            FREQUENCY,
        ])?;
        bed.pair.wait_cycle(VM, 1, LONG)?;
        Ok(bed)
    }

    fn last(&self, primary: bool) -> anyhow::Result<u64> {
        let ag = if primary { &self.pair.a } else { &self.pair.b };
        Ok(ag.status(VM)?.last_cycle.unwrap_or(0))
    }

    /// Hashes of the replica's latest point, read from outside while the agent runs: after
    /// the prune that follows the last commit ([`vmr_testkit::harness::Agent::settle`]), and
    /// read again when the layers changed meanwhile (a new cycle's commit and prune).
    fn replica_hash(&self) -> anyhow::Result<[u8; 32]> {
        let uuid = self.vm.def.uuid;
        let layers = || -> anyhow::Result<Vec<(String, PathBuf)>> {
            Ok(vmr_store::Store::open(&self.pair.b.storage())?.point_layers(uuid, None)?)
        };
        for _ in 0..50 {
            // the prune after the last commit may still change the layers `status` showed
            self.pair.b.settle(uuid)?;
            let before = layers()?;
            let Some((_, layer)) = before.iter().find(|(d, _)| d == DISK) else {
                bail!("the replica's latest point has no {DISK}");
            };
            let h = hash_image(layer);
            if layers()? == before
                && let Ok(h) = h
            {
                return Ok(h);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the replica's layers kept changing while hashed")
    }
}

fn sleep_ms(rng: &mut StdRng, lo: u64, hi: u64) {
    std::thread::sleep(Duration::from_millis(rng.gen_range(lo..hi)));
}

/// Run the trials of `fault`; their outcomes (a bed that cannot be built fails every trial
/// left).
pub fn run(ctx: &Ctx, fault: Fault, trials: usize, rng: &mut StdRng) -> Vec<Trial> {
    let mut out = Vec::new();
    let mut bed: Option<Bed> = None;
    let mut beds = 0;
    while out.len() < trials {
        let t0 = Instant::now();
        if bed.is_none() {
            beds += 1;
            match Bed::new(ctx, fault, beds) {
                Ok(b) => bed = Some(b),
                Err(e) => {
                    let why = format!("test bed: {e:#}");
                    eprintln!("vmr-faults: {}: {why}", fault.label());
                    while out.len() < trials {
                        out.push(Trial {
                            failure: Some(why.clone()),
                            ..Trial::default()
                        });
                    }
                    break;
                }
            }
        }
        let Some(b) = bed.as_mut() else { break };
        let mut t = trial(ctx, b, fault, rng);
        t.secs = t0.elapsed().as_secs_f64();
        let n = out.len() + 1;
        match &t.failure {
            None => eprintln!(
                "vmr-faults: {} trial {n}/{trials}: ok ({:.0} s)",
                fault.label(),
                t.secs
            ),
            Some(why) => {
                eprintln!(
                    "vmr-faults: {} trial {n}/{trials}: FAILED: {why}",
                    fault.label()
                );
                if let Some(b) = &bed {
                    let kept = ctx
                        .root
                        .join(format!("failed-f{}-trial{n}", fault.number()));
                    for ag in [&b.pair.a, &b.pair.b] {
                        let _ = std::fs::create_dir_all(&kept);
                        let _ = std::fs::write(kept.join(format!("{}.log", ag.name)), ag.log());
                    }
                    eprintln!("vmr-faults: agent logs kept in {}", kept.display());
                }
                bed = None;
            }
        }
        out.push(t);
    }
    out
}

fn trial(ctx: &Ctx, bed: &mut Bed, fault: Fault, rng: &mut StdRng) -> Trial {
    let mut t = Trial::default();
    let writer = {
        let _g = ctx.rt.enter();
        let ep = Endpoint::Unix(bed.vm.nbd.clone());
        match ctx.rt.block_on(connect_nbd(&ep, DISK, READY_TIMEOUT)) {
            Ok(c) => Writer::spawn(c, ctx.pool.clone(), Some(WRITE_RATE), 1, rng.r#gen()),
            Err(e) => {
                t.failure = Some(format!("connect the guest writer: {e}"));
                return t;
            }
        }
    };
    // A random moment of the cycle period.
    sleep_ms(rng, 0, CYCLE.as_millis() as u64);
    let faulted = inject(ctx, bed, fault, rng, &mut t);
    let wrote = writer.bytes();
    if let Err(e) = ctx.rt.block_on(writer.stop()) {
        t.write_error = Some(format!("{e:#}"));
    }
    let checked = faulted.and_then(|()| {
        ensure!(wrote > 0, "the guest writer wrote nothing");
        check_at_cut(bed, &mut t)
    });
    if let Err(e) = checked {
        t.failure = Some(format!("{e:#}"));
    } else if let Some(w) = &t.write_error {
        t.failure = Some(format!("guest write error: {w}"));
    }
    t
}

/// Wait for a cycle cut after the last write (committed on the primary, applied on the
/// replica) and compare the replica's latest point with the primary's disk.
fn check_at_cut(bed: &Bed, t: &mut Trial) -> anyhow::Result<()> {
    // A point cut after now holds every write. (Not "the cycle after the one running now": a
    // retried cycle's number may be adopted from the replica, which committed it before its
    // acknowledgement was lost, with a cut from before the last writes.)
    let after = epoch_ms();
    let cut = bed
        .pair
        .wait_point_cut_after(VM, after, LONG)
        .context("replication did not recover")?
        .last_cycle
        .unwrap_or(0);
    let primary = bed.vm.hash(DISK)?;
    let replica = bed.replica_hash()?;
    if primary != replica {
        t.data_lost = true;
        bail!(
            "the replica's latest point (cycle {cut}, cut after the last write) differs from the primary's disk"
        );
    }
    Ok(())
}

/// Wait until the primary's health is not Critical (the previous trial's failures are over),
/// so that the Critical health a fault must cause is this trial's.
fn settle(bed: &Bed) -> anyhow::Result<()> {
    bed.pair
        .a
        .wait_status(
            VM,
            Duration::from_secs(60),
            Duration::from_millis(100),
            "the primary's health to leave Critical before the fault",
            |s| s.health != Health::Critical,
        )
        .map(drop)
        .map_err(Into::into)
}

/// Half the kills wait for a cycle in flight (then 0-30 ms more), the others strike at once
/// (the random moment already passed); whether the primary showed a cycle in flight just
/// before the kill.
fn kill_moment(bed: &Bed, rng: &mut StdRng) -> bool {
    let running = || bed.pair.a.status(VM).is_ok_and(|s| s.progress.is_some());
    if rng.gen_bool(0.5) {
        let deadline = Instant::now() + CYCLE * 2;
        while !running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        sleep_ms(rng, 0, 30);
    }
    running()
}

fn inject(
    ctx: &Ctx,
    bed: &mut Bed,
    fault: Fault,
    rng: &mut StdRng,
    t: &mut Trial,
) -> anyhow::Result<()> {
    match fault {
        Fault::KillReplica => {
            t.mid_cycle = kill_moment(bed, rng);
            bed.pair.b.kill9();
            sleep_ms(rng, 0, 2000);
            bed.pair.b.restart()?;
        }
        Fault::KillPrimary => {
            t.mid_cycle = kill_moment(bed, rng);
            bed.pair.a.kill9();
            sleep_ms(rng, 0, 2000);
            bed.pair.a.restart()?;
        }
        Fault::NetCut => {
            settle(bed)?;
            let ns = bed.net.as_mut().context("no namespaces")?;
            ns.set_cut(true)?;
            // Long enough for cycles to fail on the cut link and the keep-alive to notice.
            let cut = Duration::from_millis(rng.gen_range(12_000..20_000));
            let t0 = Instant::now();
            let seen = bed.pair.a.wait_status(
                VM,
                cut,
                Duration::from_millis(200),
                "the primary to show the cut link",
                |s| s.health == Health::Critical && s.health_reason.contains("cannot replicate"),
            );
            std::thread::sleep(cut.saturating_sub(t0.elapsed()));
            bed.net.as_mut().context("no namespaces")?.set_cut(false)?;
            let (s, _) = seen.with_context(|| format!("a {:.0} s cut link", cut.as_secs_f64()))?;
            t.note = Some(format!("shown as: {}", s.health_reason));
        }
        Fault::LossDelay => {
            let before = bed.last(true)?;
            let proxy = bed.proxy.as_ref().context("no proxy")?;
            proxy.set_delay(Duration::from_millis(200));
            bed.net.as_mut().context("no namespaces")?.set_loss(true)?;
            // Replication goes on under the impairment: two cycles commit through it.
            let went_on = bed
                .pair
                .a
                .wait_cycle(VM, before + 2, Duration::from_secs(90));
            let drops = bed.net.as_ref().context("no namespaces")?.loss_drops();
            bed.net.as_mut().context("no namespaces")?.set_loss(false)?;
            let delayed = bed.proxy.as_ref().map_or(0, DelayProxy::delayed_bytes);
            if let Some(p) = &bed.proxy {
                p.set_delay(Duration::ZERO);
            }
            went_on.context("cycles under 5 % loss and 200 ms delay")?;
            let drops = drops?;
            ensure!(drops > 0, "the loss rules dropped no packet");
            ensure!(delayed > 0, "the proxy delayed nothing");
            t.note = Some(format!(
                "{drops} packets dropped, {} KiB delayed",
                delayed / 1024
            ));
        }
        Fault::ReplicaFull => {
            settle(bed)?;
            let store = bed.pair.b.storage();
            let ballast = store.join("ballast");
            // The replica may write meanwhile: a ballast that no longer fits is tried again
            // with what is free then.
            let mut tries = 0;
            loop {
                let fill = available(&store)?.saturating_sub(2 << 20);
                let r = net::run(
                    "fallocate",
                    &["-l", &fill.to_string(), &ballast.display().to_string()],
                );
                tries += 1;
                match r {
                    Ok(()) => break,
                    Err(e) if tries >= 20 => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            let seen = bed.pair.a.wait_status(
                VM,
                Duration::from_secs(60),
                Duration::from_millis(200),
                "the primary to show the replica's full store",
                |s| s.health == Health::Critical && s.health_reason.contains("disk full"),
            );
            let (a, b) = (bed.last(true), bed.last(false));
            std::fs::remove_file(&ballast)?;
            seen?;
            let (a, b) = (a?, b?);
            ensure!(
                a <= b,
                "the primary counts cycle {a} done, the replica holds only {b}"
            );
        }
        Fault::FleeceFull => fleece_full(bed, rng)?,
        Fault::SecondAgent => {
            for ag in [&bed.pair.b, &bed.pair.a] {
                second_agent(&ctx.exe, ag)?;
                sleep_ms(rng, 0, 1000);
            }
        }
    }
    Ok(())
}

/// Hold the next cycle's view open (test hook), take every free byte of the fleecing file
/// system meanwhile, let the held cycle finish, see the next one refused for want of space,
/// free the space.
fn fleece_full(bed: &mut Bed, rng: &mut StdRng) -> anyhow::Result<()> {
    let work = bed.pair.a.dir.join("work");
    let hold = bed.pair.a.dir.join("test-cycle-hold");
    settle(bed)?;
    // The view stays open while this file exists.
    std::fs::write(&hold, "")?;
    let before = bed.last(true)?;
    // The hook marks the hold once the view is open (its space reserved).
    let opened = vmr_testkit::wait_for_path(
        &bed.pair.a.dir.join("test-cycle-held"),
        Duration::from_secs(60),
    );
    let mut ballast = Vec::new();
    let filled = opened.and_then(|_| {
        sleep_ms(rng, 0, 500);
        fill_fs(&work, &mut ballast, Duration::from_secs(20))?;
        ensure!(
            bed.pair.a.status(VM)?.progress.is_some(),
            "the held cycle's view closed before the file system was full"
        );
        std::fs::remove_file(&hold)?;
        bed.pair
            .a
            .wait_cycle(VM, before + 1, Duration::from_secs(60))
            .context("the held cycle with a full file system")?;
        // Its fleecing file gave its whole reservation back (TRIMs punch no holes into it):
        // paused, take that too; resumed, the next cycle cannot reserve its view.
        bed.pair.a.ok(&["pause", VM])?;
        bed.pair.a.wait_status(
            VM,
            Duration::from_secs(60),
            Duration::from_millis(20),
            "no cycle running while paused",
            |s| s.progress.is_none(),
        )?;
        fill_fs(&work, &mut ballast, Duration::from_secs(20))?;
        bed.pair.a.ok(&["resume", VM])?;
        bed.pair
            .a
            .wait_status(
                VM,
                Duration::from_secs(60),
                Duration::from_millis(100),
                "a cycle refused for want of space",
                |s| s.health == Health::Critical && s.health_reason.contains("free space"),
            )
            .context("the next cycle with no space left")?;
        Ok(())
    });
    let _ = std::fs::remove_file(&hold);
    for f in &ballast {
        std::fs::remove_file(f)?;
    }
    filled
}

/// Start `vmreplica agent` on a running agent's directory: it must exit at once with code 6
/// naming the running agent, which keeps serving.
fn second_agent(exe: &Path, running: &Agent) -> anyhow::Result<()> {
    let err = running.dir.join("second-agent.err");
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("--dir")
        .arg(&running.dir)
        .arg("agent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("a second agent on {} ran for 10 s", running.dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    ensure!(
        status.code() == Some(6),
        "a second agent on {} exited with {status}: {}",
        running.dir.display(),
        stderr.trim()
    );
    ensure!(
        stderr.contains("already serves") && stderr.contains(&format!("pid {}", running.pid())),
        "the second agent's error does not name the running one: {}",
        stderr.trim()
    );
    ensure!(
        took < Duration::from_secs(5),
        "the second agent took {took:?} to exit"
    );
    running
        .status(VM)
        .context("the running agent after a second one")?;
    Ok(())
}
