//! Failover ping-pong (issue 13, defects 1 and 2) between two real agents on 127.0.0.1 with
//! qemu-storage-daemon stand-in VMs: A→B planned failover + reverse, B→A planned + reverse,
//! A→B again, then an unplanned failover B→A + reverse and a planned one back. After every
//! step: the old primary's latest point equals the running primary's disk (hash), what the
//! guest wrote before the failover is there, the reverse shipped little (well under 10 % of
//! the disk: nothing is copied in full), each host keeps one store directory of the VM and a
//! bounded number of layers, and no agent has a zombie child (the VMs an agent started and a
//! become-replica quit are reaped).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vmr_proto::api::{FailoverResult, ReplicationMode, ReplicationState};

const LONG: Duration = Duration::from_secs(90);
const DISK_MIB: u64 = 64;
const NAME: &str = "pp1";

fn failover(agent: &Agent, args: &[&str]) -> TestResult<FailoverResult> {
    let mut a = vec!["failover"];
    a.extend_from_slice(args);
    a.push("--json");
    Ok(serde_json::from_str(&agent.ok(&a)?)?)
}

/// Zombie (state Z) children of process `pid`, from `/proc/<pid>/task/*/children`: their
/// pid and command name.
fn zombies_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
            // "pid (comm) S ...": the state follows the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if rest.split_whitespace().next() == Some("Z") {
                let comm = head.split_once('(').map_or("", |(_, c)| c);
                out.push((c, comm.to_owned()));
            }
        }
    }
    out
}

/// The VM's directories in `agent`'s store, and the layer files of its disk.
fn store_shape(agent: &Agent, uuid: uuid::Uuid) -> TestResult<(Vec<String>, usize)> {
    let vms = agent.storage().join("vms");
    let mut dirs: Vec<String> = std::fs::read_dir(&vms)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let disk = vms.join(uuid.to_string()).join("disks").join("disk0");
    let layers = std::fs::read_dir(&disk)
        .map(|r| r.flatten().count())
        .unwrap_or(0);
    Ok((dirs, layers))
}

/// End a VM through its QMP monitor (`quit`) and wait for its process to be gone.
fn quit_vm(qmp: &Path, pid: u32) -> TestResult {
    let mut s = UnixStream::connect(qmp)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?; // greeting
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    line.clear();
    r.read_line(&mut line)?;
    s.write_all(b"{\"execute\":\"quit\"}\n")?;
    wait_until(Duration::from_secs(20), "the VM process to exit", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        Ok(stat.is_empty() || stat.contains(") Z "))
    })?;
    Ok(())
}

struct Host<'a> {
    agent: &'a Agent,
}

/// What one reverse is checked for.
struct Round {
    /// The old primary's store, as it was after the first reverse.
    shape: (Vec<String>, usize),
}

/// The steps after a failover on `to` whose VM is `vm_to` (its disk `h_start` at the start):
/// the guest writes, `reverse` on `to`, then the old primary `from`'s latest point must equal
/// `vm_to`'s disk, having shipped less than 10 % of the disk; returns the VM's hash.
fn reverse_and_check(
    from: &Host,
    to: &Host,
    vm_to: &StandIn,
    seed: u64,
    expect_resync: bool,
) -> TestResult<[u8; 32]> {
    let uuid = vm_to.def.uuid;
    vm_to.write_random("disk0", 8, seed)?;
    let h = vm_to.hash("disk0")?;
    let r: FailoverResult =
        serde_json::from_str(
            &to.agent
                .ok(&["reverse", NAME, "--frequency", "5s", "--json"])?,
        )?;
    assert_eq!(
        r.message.contains("resynchronised"),
        expect_resync,
        "{}",
        r.message
    );
    let t0 = Instant::now();
    wait_until(LONG, "the old primary's latest point equals the VM", || {
        let st = from.agent.status(NAME)?;
        if st.mode != ReplicationMode::Replica || st.last_cycle.is_none() {
            return Ok(false);
        }
        Ok(replica_hashes(from.agent, uuid, None)
            .map(|v| v[0].1 == h)
            .unwrap_or(false))
    })
    .map_err(|e| {
        format!(
            "{e}\n--- {} log ---\n{}\n--- {} log ---\n{}",
            to.agent.name,
            tail(&to.agent.log(), 30),
            from.agent.name,
            tail(&from.agent.log(), 30)
        )
    })?;
    let st = to.agent.status(NAME)?;
    assert_eq!(st.mode, ReplicationMode::Primary);
    let shipped = st.stats.total_bytes;
    eprintln!(
        "reverse to {}: caught up in {:?}, {} bytes shipped ({:.2} % of the disk)",
        to.agent.name,
        t0.elapsed(),
        shipped,
        shipped as f64 * 100.0 / (DISK_MIB << 20) as f64
    );
    assert!(
        shipped < (DISK_MIB << 20) / 10,
        "the reverse shipped {shipped} bytes: a full copy?"
    );
    Ok(h)
}

/// A planned failover from `from` (VM `vm`, its guest writes first) to `to`: prepare, start
/// (the started VM has every write), then [`reverse_and_check`]. Returns the VM now running on
/// `to` (started by its agent) and the failover's answer.
fn planned(
    from: &Host,
    to: &Host,
    vm: &StandIn,
    seed: u64,
) -> TestResult<(StandIn, FailoverResult)> {
    vm.write_random("disk0", 30, seed)?;
    let before = vm.hash("disk0")?;
    let prep = failover(from.agent, &["prepare", NAME])?;
    assert_eq!(prep.state, ReplicationState::PreparedForFailover);
    let k = prep.point.expect("final cycle");
    let live = failover(to.agent, &["start", NAME])?;
    assert_eq!(live.point, Some(k));
    let vm_to = StandIn::attach(vm.def.clone(), nbd_socket(&to.agent.dir, vm.def.uuid));
    assert_eq!(
        vm_to.hash("disk0")?,
        before,
        "the planned failover lost writes"
    );
    reverse_and_check(from, to, &vm_to, seed + 1, false)?;
    Ok((vm_to, live))
}

/// No agent keeps a zombie child. A child that has just exited is a zombie until its waiter
/// (a tool's `output()`, the store daemon's thread, tokio's reaper of a dropped `qemu-nbd`)
/// reaps it, which takes a moment: a zombie counts only if it is still there after 10 s (one
/// the agent never waits for, as the VM a become-replica quit was, stays forever).
fn no_zombies(p: &Pair) -> TestResult {
    for a in [&p.a, &p.b] {
        let pid = a.pid();
        wait_until(Duration::from_secs(10), "no zombie children", || {
            Ok(zombies_of(pid).is_empty())
        })
        .map_err(|e| {
            let z = zombies_of(pid);
            // What the agent's log says about those processes.
            let log = a.log();
            let about: Vec<&str> = log
                .lines()
                .filter(|l| z.iter().any(|(p, _)| l.contains(&format!("pid={p}"))))
                .collect();
            format!("{}: {e}: zombies {z:?}; log: {about:#?}", a.name)
        })?;
    }
    Ok(())
}

fn check_shape(p: &Pair, uuid: uuid::Uuid, rounds: &[Round; 2]) -> TestResult {
    for (a, r) in [&p.a, &p.b].into_iter().zip(rounds) {
        let (dirs, layers) = store_shape(a, uuid)?;
        assert_eq!(
            dirs, r.shape.0,
            "{}: the store's VM directories changed",
            a.name
        );
        assert!(
            layers <= 3,
            "{}: {layers} layers of disk0: the chain grows",
            a.name
        );
    }
    Ok(())
}

#[test]
fn failover_ping_pong_reverses_without_a_full_copy() -> TestResult {
    let t_start = Instant::now();
    let mut p = Pair::new(exe())?;
    p.a.allow(&p.b)?;
    let mut vm = StandIn::create(p.root.path(), &p.a, NAME, &["disk0"], DISK_MIB)?;
    vm.write_random("disk0", 100, 1)?;
    vm.register(&p.a)?;
    p.enable(NAME, &["--frequency", "5s"])?;
    p.wait_cycle(NAME, 1, LONG)?;
    let uuid = vm.def.uuid;

    // 1. A→B planned + reverse (A imports its own images).
    let (vm_b, live_b) = {
        let (a, b) = (Host { agent: &p.a }, Host { agent: &p.b });
        planned(&a, &b, &vm, 10)?
    };
    // The harness's stand-in on A was quit by become-replica.
    vm.kill9();
    no_zombies(&p)?;
    let shapes = [
        Round {
            shape: store_shape(&p.a, uuid)?,
        },
        Round {
            shape: store_shape(&p.b, uuid)?,
        },
    ];
    assert_eq!(shapes[0].shape.0, vec![uuid.to_string()]);
    assert_eq!(shapes[1].shape.0, vec![uuid.to_string()]);
    eprintln!("round 1 done at {:?}", t_start.elapsed());

    // 2. B→A planned + reverse: B re-adopts the overlays its VM ran on.
    let (vm_a, _live_a) = {
        let (a, b) = (Host { agent: &p.a }, Host { agent: &p.b });
        planned(&b, &a, &vm_b, 20)?
    };
    no_zombies(&p)?;
    check_shape(&p, uuid, &shapes)?;
    eprintln!("round 2 done at {:?}", t_start.elapsed());

    // 3. A→B planned again: A re-adopts.
    let (vm_b, live_b3) = {
        let (a, b) = (Host { agent: &p.a }, Host { agent: &p.b });
        planned(&a, &b, &vm_a, 30)?
    };
    no_zombies(&p)?;
    check_shape(&p, uuid, &shapes)?;
    drop(live_b);
    eprintln!("round 3 done at {:?}", t_start.elapsed());

    // 4. Unplanned B→A: B's host is lost after its VM wrote more that never left.
    let (_, hb_cut) = {
        let latest = p.a.status(NAME)?.last_cycle.expect("point");
        vm_b.write_random("disk0", 12, 40)?;
        let cut = p.b.status(NAME)?.last_cycle.unwrap_or(0) + 2;
        p.b.wait_cycle(NAME, cut, LONG)?;
        p.a.wait_cycle(NAME, cut, LONG)?;
        (latest, vm_b.hash("disk0")?)
    };
    p.b.kill9();
    vm_b.write_random("disk0", 6, 41)?; // never shipped
    let live = failover(&p.a, &["start", NAME, "--force"])?;
    let vm_a = StandIn::attach(vm.def.clone(), nbd_socket(&p.a.dir, uuid));
    assert_eq!(
        vm_a.hash("disk0")?,
        hb_cut,
        "the failover point lost shipped writes"
    );
    let _ = live;
    // B comes back with its VM off.
    let qmp = PathBuf::from(live_b3.qmp.clone().expect("qmp"));
    quit_vm(&qmp, live_b3.pid.expect("pid"))?;
    p.b.restart()?;
    {
        let (a, b) = (Host { agent: &p.a }, Host { agent: &p.b });
        reverse_and_check(&b, &a, &vm_a, 42, true)?;
    }
    no_zombies(&p)?;
    check_shape(&p, uuid, &shapes)?;
    eprintln!("round 4 done at {:?}", t_start.elapsed());

    // 5. A→B planned back: A re-adopts again.
    {
        let (a, b) = (Host { agent: &p.a }, Host { agent: &p.b });
        planned(&a, &b, &vm_a, 50)?;
    }
    no_zombies(&p)?;
    check_shape(&p, uuid, &shapes)?;
    eprintln!("ping-pong done in {:?}", t_start.elapsed());
    p.stop()?;
    Ok(())
}
