//! Extended replication A → B → C between three real agents on 127.0.0.1 (the harness's
//! `Chain`) with a qemu-storage-daemon stand-in VM on A: C's latest point equals B's point of
//! the same id and A's disks at that cut; points B merged before C got them; C's agent down
//! for several extended intervals, then back without a full copy.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use vmr_proto::api::{ExtendedStatus, ReplicationState};

const LONG: Duration = Duration::from_secs(120);
const VM: &str = "web1";

/// A guest writer on A running in a thread until stopped.
struct GuestWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GuestWriter {
    fn start(vm: &StandIn, blocks_per_round: u64) -> GuestWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (def, nbd) = (vm.def.clone(), vm.nbd.clone());
        let thread = std::thread::spawn(move || {
            let vm = StandIn::attach(def, nbd);
            let mut seed = 1;
            while !s.load(Ordering::SeqCst) {
                for d in ["disk0", "disk1"] {
                    vm.write_random(d, blocks_per_round, seed)
                        .expect("guest write");
                    seed += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        GuestWriter {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
    }
}

/// A stand-in VM on A with two 64 MiB disks, some data, registered.
fn vm_on_a(ch: &Chain) -> TestResult<StandIn> {
    let vm = StandIn::create(ch.root.path(), &ch.a, VM, &["disk0", "disk1"], 64)?;
    vm.write_random("disk0", 200, 99)?;
    vm.register(&ch.a)?;
    Ok(vm)
}

/// With the writes done: wait for an A → B cycle cut after the last write, pause A, and wait
/// until B applied A's last cycle; returns its id.
fn settle(ch: &Chain, vm: &StandIn) -> TestResult<u64> {
    let name = &vm.def.name;
    ch.b.wait_status(
        name,
        LONG,
        Duration::from_millis(10),
        "a point cut after the writes",
        {
            let after = epoch_ms();
            move |s| s.last_point_ms.is_some_and(|t| t > after)
        },
    )?;
    ch.a.ok(&["pause", name])?;
    let last = ch.a.status(name)?.last_cycle.unwrap_or(0);
    ch.b.wait_cycle(name, last, LONG)?;
    Ok(last)
}

/// C's point `id`, B's point `id` and A's disks are the same.
fn assert_same(ch: &Chain, vm: &StandIn, id: u64) -> TestResult {
    let b = replica_hashes(&ch.b, vm.def.uuid, Some(id))?;
    let c = replica_hashes(&ch.c, vm.def.uuid, Some(id))?;
    assert_eq!(c.len(), vm.def.disks.len());
    assert_eq!(b, c, "C's point {id} differs from B's");
    for (disk, h) in c {
        assert_eq!(
            h,
            vm.hash(&disk)?,
            "disk {disk}: C's point {id} differs from A"
        );
    }
    Ok(())
}

/// B's outgoing (extended) relationship of the VM.
fn extended(ch: &Chain) -> TestResult<ExtendedStatus> {
    Ok(ch
        .b
        .status(VM)?
        .extended
        .ok_or("B's status shows no extended relationship")?)
}

/// Wait until B's extended relationship satisfies `pred`.
fn wait_extended(
    ch: &Chain,
    what: &str,
    pred: impl Fn(&ExtendedStatus) -> bool,
) -> TestResult<ExtendedStatus> {
    let mut last = None;
    wait_every(LONG, Duration::from_millis(50), what, || {
        let Some(x) = ch.b.status(VM)?.extended else {
            return Ok(false);
        };
        let ok = pred(&x);
        last = Some(x);
        Ok(ok)
    })?;
    Ok(last.ok_or("no status")?)
}

/// The ids of B's points, read from its store.
fn points_of(agent: &Agent, vm: &StandIn) -> TestResult<Vec<u64>> {
    Ok(vmr_store::Store::open(&agent.storage())?
        .points(vm.def.uuid)?
        .iter()
        .map(|p| p.id)
        .collect())
}

#[test]
fn a_to_b_to_c_under_a_writer() -> TestResult {
    let ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    let w = GuestWriter::start(&vm, 16);
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "2"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s", "--recovery-points", "1"])?;
    // A full copy, then incremental extended cycles while A → B goes on.
    let first = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let sent = first.last_point_sent.unwrap_or(0);
    wait_extended(&ch, "two more extended cycles", |x| {
        x.stats.successful_cycles >= 3 && x.last_point_sent > Some(sent)
    })?;
    w.stop();
    let last = settle(&ch, &vm)?;
    ch.c.wait_cycle(VM, last, LONG)?;
    assert_same(&ch, &vm, last)?;

    // B shows both relationships: incoming from A, outgoing to C.
    let st = ch.b.status(VM)?;
    assert_eq!(st.mode, vmr_proto::api::ReplicationMode::Replica);
    assert_eq!(st.last_cycle, Some(last));
    let x = st.extended.ok_or("no extended relationship")?;
    assert_eq!(x.relationship, "extended");
    assert_eq!(x.state, ReplicationState::Replicating);
    assert_eq!(x.last_point_sent, Some(last));
    assert_eq!(x.replica, ch.c.addr);
    assert_eq!(x.frequency_secs, 5);
    assert!(x.lag_ms.is_some());
    let text = ch.b.ok(&["status"])?;
    assert!(
        text.contains("extended") && text.contains(&ch.c.addr),
        "{text}"
    );
    let measure = ch.b.ok(&["measure", VM])?;
    assert!(
        measure.contains("RelationshipType          : Extended")
            && measure.contains(&format!("ExtendedLastPointSent     : {last}")),
        "{measure}"
    );
    let json: serde_json::Value = serde_json::from_str(&ch.b.ok(&["status", VM, "--json"])?)?;
    assert_eq!(json[0]["extended"]["last_point_sent"], last, "{json}");
    // C is an ordinary replica whose primary is B.
    let c = ch.c.status(VM)?;
    assert_eq!(c.mode, vmr_proto::api::ReplicationMode::Replica);
    assert_eq!(c.primary, "host-b");

    // Pause, resume and disable act on the outgoing relationship only.
    ch.b.ok(&["pause", VM, "--extended"])?;
    assert_eq!(extended(&ch)?.state, ReplicationState::Suspended);
    assert_eq!(ch.b.status(VM)?.state, ReplicationState::Replicating);
    ch.b.ok(&["resume", VM, "--extended"])?;
    assert_eq!(extended(&ch)?.state, ReplicationState::Replicating);
    ch.b.ok(&["disable", VM, "--extended"])?;
    let st = ch.b.status(VM)?;
    assert!(st.extended.is_none(), "{st:?}");
    assert_eq!(st.state, ReplicationState::Replicating);
    // Not on a primary VM.
    let out = ch.a.cli(&["pause", VM, "--extended"])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn points_b_merged_before_c_got_them_still_reach_c() -> TestResult {
    let ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    // B keeps only its latest point: every cycle merges the one before.
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "0"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    // Continuous mode is the primary's relationship's alone: refused (exit 2), nothing
    // enabled, so the interval one below is accepted.
    let out = ch.b.cli(&[
        "enable",
        VM,
        "--extended",
        "--replica",
        &ch.c.addr,
        "--replica-fingerprint",
        &ch.c.fingerprint,
        "--frequency",
        "continuous",
    ])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("continuous"),
        "{out:?}"
    );
    assert!(ch.b.status(VM)?.extended.is_none());
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    let x = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let acked = x.last_point_sent.unwrap_or(0);
    // Paused: the acknowledged point is not kept; B merges it and the points after it.
    ch.b.ok(&["pause", VM, "--extended"])?;
    let w = GuestWriter::start(&vm, 8);
    let b_last = ch.b.status(VM)?.last_cycle.unwrap_or(0);
    ch.b.wait_cycle(VM, b_last + 4, LONG)?;
    w.stop();
    let last = settle(&ch, &vm)?;
    let points = points_of(&ch.b, &vm)?;
    assert!(
        !points.contains(&acked) && !points.contains(&(acked + 1)),
        "B merged the point C acknowledged ({acked}) and the next: it holds {points:?}"
    );
    ch.b.ok(&["resume", VM, "--extended"])?;
    ch.c.wait_cycle(VM, last, LONG)?;
    assert_same(&ch, &vm, last)?;
    Ok(())
}

#[test]
fn c_down_for_several_intervals_resumes_without_a_full_copy() -> TestResult {
    let mut ch = Chain::new(exe())?;
    let vm = vm_on_a(&ch)?;
    ch.enable(VM, &["--frequency", "5s", "--recovery-points", "0"])?;
    ch.b.wait_cycle(VM, 2, LONG)?;
    ch.enable_extended(VM, &["--frequency", "5s"])?;
    let x = wait_extended(&ch, "the first extended cycle", |x| {
        x.last_point_sent.is_some()
    })?;
    let full = x.stats.total_bytes;
    let sent_before = x.stats.total_bytes;
    let a_before = ch.a.status(VM)?.stats.total_bytes;
    ch.c.stop()?;
    // A → B goes on for several extended intervals while C is down: 3 rounds of 8 blocks
    // written on A, each shipped to B (which keeps only its latest point, and the one C
    // acknowledged).
    for round in 0..3u64 {
        vm.write_seq("disk0", 100 + round * 8, 8, 1000 + round)?;
        let b_last = ch.b.status(VM)?.last_cycle.unwrap_or(0);
        ch.b.wait_cycle(VM, b_last + 2, LONG)?;
    }
    wait_extended(&ch, "extended cycles failing while C is down", |x| {
        x.stats.errors >= 3
    })?;
    let last = settle(&ch, &vm)?;
    let a_bytes = ch.a.status(VM)?.stats.total_bytes - a_before;
    ch.c.restart()?;
    ch.c.wait_cycle(VM, last, LONG)?;
    let x = wait_extended(&ch, "the extended relationship to catch up", |x| {
        x.last_point_sent == Some(last)
    })?;
    let sent = x.stats.total_bytes - sent_before;
    eprintln!(
        "extended catch-up after C was down: {sent} bytes; A shipped {a_bytes} bytes meanwhile; \
         the full copy was {full} bytes"
    );
    assert!(
        sent <= a_bytes,
        "C resumed with {sent} bytes, more than A wrote meanwhile ({a_bytes})"
    );
    assert!(
        sent <= 24 * 65536,
        "no full copy ({full} bytes): {sent} bytes for the 24 blocks written"
    );
    assert_same(&ch, &vm, last)?;
    ch.stop()?;
    Ok(())
}
