//! `vmreplica demo`: everything on this machine, no set-up: two agents on 127.0.0.1, a
//! qemu-storage-daemon stand-in VM with two qcow2 disks, a writer acting as the guest,
//! replication at a short frequency with a live status view, then a check that the replica's
//! latest point equals the primary's disks at that cut. Every process it starts is killed on
//! exit, also on Ctrl-C.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmr_nbd::Endpoint;
use vmr_proto::VmDefinition;
use vmr_proto::api::{EnableArgs, ReplicationState, Request, VmStatus};
use vmr_testkit::harness::{
    self, Agent, READY_TIMEOUT, StandIn, StandInDisk, TestDir, Writer, connect_nbd,
    hash_export_async, hash_image_async,
};

use crate::cli::DemoOpts;
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

/// Run a blocking harness call (agent start, CLI, stand-in start) from the demo's runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The guest: a rate-limited random writer per disk (~4 MB/s each).
struct Guest {
    writers: Vec<Writer>,
}

impl Guest {
    async fn start(nbd: &Path) -> anyhow::Result<Guest> {
        let mut writers = Vec::new();
        for (i, d) in DISKS.iter().enumerate() {
            let c = connect_nbd(&Endpoint::Unix(nbd.to_path_buf()), d, READY_TIMEOUT).await?;
            let seed = 0x9e37_79b9 + i as u64;
            writers.push(Writer::spawn(c, harness::pool(seed), Some(4e6), 1, seed));
        }
        Ok(Guest { writers })
    }

    fn bytes(&self) -> u64 {
        self.writers.iter().map(Writer::bytes).sum()
    }

    /// Stop writing (flushed); the bytes written.
    async fn stop(self) -> anyhow::Result<u64> {
        let n = self.bytes();
        for w in self.writers {
            w.stop().await?;
        }
        Ok(n)
    }
}

/// Columns the demo's output uses at most: an 80-column terminal shows every line whole, and the
/// live line, rewritten in place with `\r`, never wraps.
const WIDTH: usize = 79;

/// `line` cut to [`WIDTH`] characters and padded with spaces to it (so that a shorter line
/// rewritten in place covers a longer one).
fn fit(line: &str) -> String {
    let cut: String = line.chars().take(WIDTH).collect();
    format!("{cut:<WIDTH$}")
}

/// The live status line: progress, state/health, bytes sent (in flight) and written by the
/// guest, most important first (a long state cuts the end, never the progress).
fn live_line(done: u64, target: u64, s: &VmStatus, in_flight: u64, guest_wrote: u64) -> String {
    fit(&format!(
        "{} {done}/{target} {}/{} sent {} (+{}) guest {}",
        bar(done, target, 10),
        s.state,
        s.health,
        fmt_bytes(s.stats.total_bytes),
        fmt_bytes(in_flight),
        fmt_bytes(guest_wrote),
    ))
}

/// `text` broken at spaces into lines of at most [`WIDTH`] columns (after a 11-column lead on
/// the first), the further lines starting with `indent`.
fn wrap(text: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut col = 11;
    for word in text.split(' ') {
        if col > indent.len() && col + 1 + word.chars().count() > WIDTH {
            out.push('\n');
            out.push_str(indent);
            col = indent.len();
        } else if !out.is_empty() {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.chars().count();
    }
    out
}

/// The hash check of one disk: the verdict, then each side's BLAKE3 on a line of its own.
fn hash_rows(disk: &str, primary: &[u8; 32], replica: &[u8; 32]) -> [String; 3] {
    let verdict = if primary == replica {
        "MATCH"
    } else {
        "DIFFERENT"
    };
    [
        format!("{disk}: {verdict}"),
        format!("  primary  {}", hex(primary)),
        format!("  replica  {}", hex(replica)),
    ]
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as f64 / total as f64) * width as f64) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The replica point's layers of `vm` on `agent` (`None` = latest), by disk.
fn point_layers(
    agent: &Agent,
    vm: uuid::Uuid,
) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    agent.settle(vm)?;
    let store = vmr_store::Store::open(&agent.storage())?;
    Ok(store.point_layers(vm, None)?)
}

async fn demo(opts: DemoOpts) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    // Dropped last: kills whatever still runs from it (also the failover VMs the agents start).
    let tmp = TestDir::temp("vmr-demo-")?;
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

fn status_of(agent: &Agent, name: &str) -> anyhow::Result<VmStatus> {
    Ok(blocking(|| agent.status(name))?)
}

async fn demo_in(opts: &DemoOpts, exe: &Path, root: &Path) -> anyhow::Result<()> {
    println!("vmreplica demo in {}", root.display());

    // Two agents on 127.0.0.1.
    let a = blocking(|| Agent::start(exe, root, "host-a"))?;
    let b = blocking(|| Agent::start(exe, root, "host-b"))?;
    println!(
        "agents: host-a {}\n  {}\n        host-b {}\n  {}",
        a.addr, a.fingerprint, b.addr, b.fingerprint
    );
    blocking(|| b.allow(&a))?;

    // The stand-in VM: qemu-storage-daemon with two qcow2 disks (as examples/standin-vm.toml).
    let disk_bytes = opts.disk_mib << 20;
    let disks: Vec<StandInDisk> = DISKS
        .iter()
        .map(|d| StandInDisk::new(d, disk_bytes))
        .collect();
    let vm = blocking(|| StandIn::start_in(&root.join("vm"), &a.dir, "demo-vm", &disks))?;
    let def = vm.def.clone();
    let nbd = vm.nbd.clone();
    println!(
        "stand-in VM {} ({})\n  with 2 x {} qcow2 disks",
        def.name,
        def.uuid,
        fmt_bytes(disk_bytes)
    );

    // The guest writes from the start: initial replication happens under load.
    let guest = Guest::start(&nbd).await?;
    blocking(|| vm.register(&a))?;
    blocking(|| {
        a.ctl(&Request::Enable(EnableArgs {
            name: def.name.clone(),
            replica: b.addr.clone(),
            replica_fingerprint: b.fingerprint.clone(),
            frequency_secs: opts.frequency,
            recovery_points: 2,
            app_consistent_every_hours: 0,
            exclude_disks: vec![],
            compression: true,
            initial_at_ms: None,
            auto_resync: None,
            initial: Default::default(),
            rpo_alert_secs: None,
            verify_every_secs: None,
            retain: None,
            bandwidth: None,
            auto_failover: None,
        }))
    })?;
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
        let line = live_line(done, target, &s, p_done, guest.bytes());
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

    // Stop the guest's writes (flushed), then wait for a cycle whose cut is after the last write.
    let wrote = guest.stop().await?;
    // The cycle running now may have been cut before the last write: the one after it was not.
    let cut_after = status_of(&a, &def.name)?.last_cycle.unwrap_or(0) + 2;
    println!("guest writes stopped; waiting for cycle {cut_after} (taken after the last write)");
    blocking(|| {
        a.wait_cycle(
            &def.name,
            cut_after,
            Duration::from_secs(opts.frequency * 6 + 60),
        )
    })?;
    blocking(|| {
        a.ctl(&Request::Pause {
            name: def.name.clone(),
        })
    })?;
    // The replica applies in the background after acknowledging: wait for the point.
    blocking(|| b.wait_cycle(&def.name, cut_after, Duration::from_secs(60)))?;

    // Verify: primary disks (through the live exports) versus the replica's latest point.
    let layers = point_layers(&b, def.uuid)?;
    let mut all_ok = true;
    println!("\nBLAKE3 of each disk: the primary's, and the replica's latest point");
    for d in DISKS {
        let p = hash_export_async(&Endpoint::Unix(nbd.clone()), d).await?;
        let (_, layer) = layers
            .iter()
            .find(|(id, _)| id == d)
            .with_context(|| format!("replica has no {d}"))?;
        let r = hash_image_async(layer).await?;
        let ok = p == r;
        all_ok &= ok;
        for row in hash_rows(d, &p, &r) {
            println!("{row}");
        }
    }

    let pts = blocking(|| {
        b.ctl(&Request::Points {
            name: def.name.clone(),
            estimate: None,
        })
    })?;
    println!("\nrecovery points on host-b:");
    crate::output::print(crate::output::Kind::Points, &pts, false);
    let s = status_of(&a, &def.name)?;
    println!(
        "\nsummary: {} cycles, {} shipped (avg {}, max latency {} ms),\n         {} missed, {} errors; guest wrote {}",
        s.stats.successful_cycles,
        fmt_bytes(s.stats.total_bytes),
        fmt_bytes(s.stats.average_bytes()),
        s.stats.max_latency_ms,
        s.stats.missed_cycles,
        s.stats.errors,
        fmt_bytes(wrote),
    );
    if !all_ok {
        bail!("the replica's latest point differs from the primary");
    }
    println!("the replica equals the primary at the cut");
    failover_demo(opts, &a, &b, &def, &nbd).await?;
    println!(
        "demo passed: the replica equals the primary at the cut;\n  test and planned failover work"
    );
    Ok(())
}

fn failover_call(agent: &Agent, req: &Request) -> anyhow::Result<vmr_proto::api::FailoverResult> {
    Ok(serde_json::from_value(blocking(|| agent.ctl(req))?)?)
}

async fn hash_all(nbd: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut v = Vec::new();
    for d in DISKS {
        v.push(hash_export_async(&Endpoint::Unix(nbd.to_path_buf()), d).await?);
    }
    Ok(v)
}

/// After the hash check: a test failover on host-b (its content checked against the primary),
/// then a planned failover (prepare on host-a, start on host-b, hashes), reverse replication
/// and one cycle back to host-a. The VMs the agents start outlive them on purpose; the demo's
/// directory kills them when dropped.
async fn failover_demo(
    opts: &DemoOpts,
    a: &Agent,
    b: &Agent,
    def: &VmDefinition,
    nbd: &Path,
) -> anyhow::Result<()> {
    let name = def.name.clone();
    let primary = hash_all(nbd).await?;
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
    check("test copy vs primary", &hash_all(&tnbd).await?)?;
    blocking(|| {
        b.ctl(&Request::FailoverStopTest {
            name: name.clone(),
            test_id: t.test_id,
        })
    })?;
    println!("  test copy removed");

    println!("\nplanned failover host-a -> host-b:");
    blocking(|| a.allow(b))?;
    blocking(|| a.ctl(&Request::Resume { name: name.clone() }))?;
    let prep = failover_call(
        a,
        &Request::FailoverPrepare {
            name: name.clone(),
            shutdown_timeout_secs: None,
        },
    )?;
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
    println!(
        "  start on host-b: {} from point {}, {};\n  QMP answered {} ms after the command",
        live.name,
        live.point.unwrap_or(0),
        live.state,
        live.elapsed_ms
    );
    let bnbd = harness::nbd_socket(&b.dir, def.uuid);
    check(
        "failed-over VM vs primary's last content (zero data loss)",
        &hash_all(&bnbd).await?,
    )?;
    // The failed-over VM's guest writes 1 MiB: that, and only that, must travel back.
    {
        let c = connect_nbd(&Endpoint::Unix(bnbd.clone()), DISKS[0], READY_TIMEOUT).await?;
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
            replica: Some(a.addr.clone()),
            replica_fingerprint: None,
            frequency_secs: Some(opts.frequency),
            follow: false,
        },
    )?;
    println!("  reverse: {}", wrap(&rev.message, "    "));
    let k = live.point.unwrap_or(0);
    let timeout = Duration::from_secs(opts.frequency * 6 + 60);
    let (sb, _) = blocking(|| b.wait_cycle(&name, k + 1, timeout))?;
    let (sa, _) = blocking(|| a.wait_cycle(&name, k + 1, timeout))?;
    println!(
        "  cycle {} replicated back host-b -> host-a ({} sent);\n  host-b {:?} {}, host-a {:?} {}",
        sb.last_cycle.unwrap_or(0),
        fmt_bytes(sb.stats.total_bytes),
        sb.mode,
        sb.state,
        sa.mode,
        sa.state
    );
    let layers = point_layers(a, def.uuid)?;
    let mut back = Vec::new();
    for d in DISKS {
        let (_, layer) = layers
            .iter()
            .find(|(id, _)| id == d)
            .with_context(|| format!("host-a has no {d}"))?;
        back.push(hash_image_async(layer).await?);
    }
    let now = hash_all(&bnbd).await?;
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

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ReplicationState, health: vmr_proto::api::Health, sent: u64) -> VmStatus {
        let mut s: VmStatus = serde_json::from_value(serde_json::json!({
            "name": "demo-vm", "uuid": uuid::Uuid::nil(), "state": state, "health": health,
            "health_reason": "", "mode": "Primary", "frequency_secs": 5, "primary": "host-a",
            "replica": "127.0.0.1:1", "last_replication_ms": null, "last_cycle": null,
            "stats": vmr_proto::api::ReplicationStats::default(), "progress": null
        }))
        .expect("a status");
        s.stats.total_bytes = sent;
        s
    }

    #[test]
    fn the_live_line_and_the_hash_table_fit_80_columns() {
        use vmr_proto::api::Health;
        let big = 1023 << 30;
        let worst = status(
            ReplicationState::InitialReplicationInProgress,
            Health::Critical,
            big,
        );
        let line = live_line(9, 12, &worst, big, big);
        assert_eq!(line.chars().count(), WIDTH, "{line:?}");
        // A usual line is whole (nothing cut): progress, state, bytes and the guest's writes.
        let usual = status(ReplicationState::Replicating, Health::Normal, 123 << 20);
        let line = live_line(3, 4, &usual, 4 << 20, 400 << 20);
        assert!(
            line.starts_with(
                "[#######...] 3/4 Replicating/Normal sent 123.0 MiB (+4.0 MiB) guest 400.0 MiB"
            ),
            "{line:?}"
        );
        assert_eq!(line.chars().count(), WIDTH);
        let rows = hash_rows("disk1", &[0xab; 32], &[0xab; 32]);
        assert_eq!(rows[0], "disk1: MATCH");
        assert!(rows.iter().all(|r| r.chars().count() <= WIDTH), "{rows:?}");
        assert_eq!(
            hash_rows("disk1", &[1; 32], &[2; 32])[0],
            "disk1: DIFFERENT"
        );
        let msg = "replication reversed: \"demo-vm\" now replicates from here to 127.0.0.1:38677 every 5 s, starting after point 8";
        let wrapped = format!("  reverse: {}", wrap(msg, "    "));
        assert!(
            wrapped.lines().all(|l| l.chars().count() <= WIDTH) && wrapped.lines().count() == 2,
            "{wrapped}"
        );
        assert_eq!(wrapped.replace("\n    ", " "), format!("  reverse: {msg}"));
    }
}
