//! A consistency group member's cut (`begin_cycle_gated`, docs/groups.md) against real QEMU
//! processes, the test playing the coordinator: a system emulator (`qemu-system-x86_64
//! -machine none`) is really paused by `stop` between its report and its transaction and
//! running again after `cont`; two members are cut inside one pause and tagged grouped; a
//! member told to resume without a transaction resumes, fails with `GroupCut` and loses
//! nothing (its next cycle carries every change); a coordinator that is gone means no cut and
//! no pause left behind; a cut dropped while its VM is paused (the cycle task cancelled)
//! resumes the VM. A qemu-storage-daemon (no vCPUs, no `stop`) counts as stopped.

mod common;

use common::*;
use tokio::sync::mpsc;
use vmr_capture::gate::{Gate, GateOrder, GateReport};
use vmr_capture::{CaptureError, CycleMode, GroupCutReason, VmCapture};
use vmr_testkit::harness::harness_qmp;
use vmr_testkit::qsd::{DiskFormat, DiskSpec, QsdVm};

/// A gate and the coordinator's ends of it.
fn gate() -> (Gate, mpsc::Sender<GateOrder>, mpsc::Receiver<GateReport>) {
    let (otx, orx) = mpsc::channel(4);
    let (rtx, rrx) = mpsc::channel(4);
    (
        Gate {
            orders: orx,
            reports: rtx,
            grouped: false,
        },
        otx,
        rrx,
    )
}

/// `query-status`'s `running` through the test's own monitor.
fn running(vm: &QsdVm) -> bool {
    let sock = vm.test_qmp_socket();
    std::thread::scope(|s| {
        s.spawn(|| harness_qmp(&sock, "query-status").expect("query-status")["running"] == true)
            .join()
            .expect("query thread")
    })
}

/// Read a cycle whole (into a throw-away replica) and commit it.
async fn ship(mut c: vmr_capture::CaptureCycle<'_>, size: u64) {
    Replica::new(&[size]).apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
}

async fn next(r: &mut mpsc::Receiver<GateReport>) -> GateReport {
    r.recv().await.expect("a report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_paused_around_their_transactions_and_resumed_in_every_path() {
    let size = 4 * MIB;
    let machine = QsdVm::start_machine(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)])
        .expect("start qemu-system-x86_64");
    let daemon = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "gd");
    let mut m = VmCapture::open(config(&machine, "gm"))
        .await
        .expect("open machine");
    let mut d = VmCapture::open(config(&daemon, "gd"))
        .await
        .expect("open daemon");
    // Full cycles first (tracking starts), outside any group.
    for cap in [&mut m, &mut d] {
        let c = cap.begin_cycle(CycleMode::Full).await.expect("full");
        ship(c, size).await;
    }
    assert!(running(&machine));

    // 1. Both members cut inside one pause.
    let (mut gm, om, mut rm) = gate();
    let (mut gd, od, mut rd) = gate();
    let coordinator = async {
        assert_eq!(next(&mut rm).await, GateReport::Ready);
        assert_eq!(next(&mut rd).await, GateReport::Ready);
        om.send(GateOrder::Stop).await.expect("order");
        od.send(GateOrder::Stop).await.expect("order");
        assert_eq!(next(&mut rm).await, GateReport::Stopped(Ok(true)));
        // The daemon has no vCPUs and no `stop`: nothing to pause.
        assert_eq!(next(&mut rd).await, GateReport::Stopped(Ok(false)));
        let paused = !running(&machine);
        om.send(GateOrder::Cut).await.expect("order");
        od.send(GateOrder::Cut).await.expect("order");
        assert_eq!(next(&mut rm).await, GateReport::Cut(Ok(())));
        assert_eq!(next(&mut rd).await, GateReport::Cut(Ok(())));
        let still_paused = !running(&machine);
        om.send(GateOrder::Cont { grouped: true })
            .await
            .expect("order");
        od.send(GateOrder::Cont { grouped: true })
            .await
            .expect("order");
        assert_eq!(next(&mut rm).await, GateReport::Continued(Ok(())));
        assert_eq!(next(&mut rd).await, GateReport::Continued(Ok(())));
        (paused, still_paused)
    };
    let (a, b, (paused, still_paused)) = tokio::join!(
        m.begin_cycle_gated(CycleMode::Incremental, None, Some(&mut gm)),
        d.begin_cycle_gated(CycleMode::Incremental, None, Some(&mut gd)),
        coordinator
    );
    assert!(
        paused && still_paused,
        "the machine was paused from stop to cont"
    );
    assert!(running(&machine), "and runs again");
    let (a, _) = a.expect("machine cut");
    let (b, _) = b.expect("daemon cut");
    ship(a, size).await;
    ship(b, size).await;
    assert!(gm.grouped && gd.grouped);

    // 2. Told to resume without a transaction (another member failed): resumed, no cut, and
    //    the changes stay for the next cycle.
    let live = live_client(&daemon, "disk0").await;
    live.write(0, bytes::Bytes::from(vec![7u8; 65536]), false)
        .await
        .expect("write");
    let (mut gm, om, mut rm) = gate();
    let coordinator = async {
        assert_eq!(next(&mut rm).await, GateReport::Ready);
        om.send(GateOrder::Stop).await.expect("order");
        assert_eq!(next(&mut rm).await, GateReport::Stopped(Ok(true)));
        assert!(!running(&machine));
        om.send(GateOrder::Cont { grouped: false })
            .await
            .expect("order");
        assert_eq!(next(&mut rm).await, GateReport::Continued(Ok(())));
    };
    let (r, ()) = tokio::join!(
        async {
            m.begin_cycle_gated(CycleMode::Incremental, None, Some(&mut gm))
                .await
                .err()
        },
        coordinator
    );
    assert!(
        matches!(
            r,
            Some(CaptureError::GroupCut {
                reason: GroupCutReason::MemberNotPaused
            })
        ),
        "{r:?}"
    );
    assert!(running(&machine), "resumed although no transaction ran");
    assert!(!gm.grouped);
    // The daemon's member: a coordinator that is gone before any order: no cut, no pause.
    let (mut gd, od, rd) = gate();
    drop((od, rd));
    let r = d
        .begin_cycle_gated(CycleMode::Incremental, None, Some(&mut gd))
        .await
        .err();
    assert!(
        matches!(
            r,
            Some(CaptureError::GroupCut {
                reason: GroupCutReason::CoordinatorGone
            })
        ),
        "{r:?}"
    );
    // The next plain cycle carries the write made before the abandoned cut.
    let mut c = d
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("next cycle");
    let mut replica = Replica::new(&[size]);
    let (_, bytes) = replica.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    assert!(bytes >= 65536, "the change was kept: {bytes} bytes");
    assert_eq!(&replica.disks[0][..65536], &[7u8; 65536][..]);
    let c = m
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("machine again");
    ship(c, size).await;
    assert!(running(&machine));

    // 3. The member's cycle dropped while its VM is paused (its task cancelled): the VM is
    //    resumed once the capture's monitor connection is gone.
    let (mut gm, om, mut rm) = gate();
    {
        let cut = m.begin_cycle_gated(CycleMode::Incremental, None, Some(&mut gm));
        tokio::pin!(cut);
        tokio::select! {
            _ = &mut cut => panic!("the cut ended without orders"),
            r = next(&mut rm) => assert_eq!(r, GateReport::Ready),
        }
        om.send(GateOrder::Stop).await.expect("order");
        tokio::select! {
            _ = &mut cut => panic!("the cut ended without a transaction order"),
            r = next(&mut rm) => assert_eq!(r, GateReport::Stopped(Ok(true))),
        }
        assert!(!running(&machine));
    }
    drop(m);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !running(&machine) {
        assert!(
            std::time::Instant::now() < deadline,
            "the paused VM was not resumed after its cut was dropped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
