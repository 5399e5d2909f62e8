//! An agent that dies mid-cycle (cycle and capture dropped without commit/abort) leaves
//! exports, nodes, a job and a frozen bitmap behind; the next open cleans them all and the next
//! cycle carries every change.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use vmr_capture::qmp::QmpClient;
use vmr_capture::{CycleMode, Endpoint, ResyncReason, Tracking, VmCapture};
use vmr_testkit::qsd::{DiskFormat, DiskSpec, QsdVm};

/// (exports, nodes, jobs, bitmaps with recording flag) named `vmr-<tag>-*`.
async fn leftovers(
    vm: &QsdVm,
    prefix: &str,
) -> (Vec<String>, Vec<String>, Vec<String>, Vec<(String, bool)>) {
    let mut q = QmpClient::connect(
        &Endpoint::Unix(vm.test_qmp_socket()),
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("test monitor");
    let ids = |v: &Value, k: &str| -> Vec<String> {
        v.as_array()
            .expect("list")
            .iter()
            .filter_map(|x| x.get(k).and_then(Value::as_str))
            .filter(|s| s.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    let exports = ids(
        &q.execute_value("query-block-exports", None)
            .await
            .expect("q"),
        "id",
    );
    let jobs = ids(
        &q.execute_value("query-block-jobs", None).await.expect("q"),
        "device",
    );
    let nodes_v = q
        .execute_value("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .expect("q");
    let nodes = ids(&nodes_v, "node-name");
    let mut bitmaps = Vec::new();
    for n in nodes_v.as_array().expect("list") {
        if n["node-name"] == "disk0" {
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                let name = b["name"].as_str().expect("name").to_owned();
                if name.starts_with(prefix) {
                    bitmaps.push((name, b["recording"].as_bool().expect("recording")));
                }
            }
        }
    }
    bitmaps.sort();
    (exports, nodes, jobs, bitmaps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_agent_leftovers_are_cleaned_and_nothing_is_lost() {
    let size = 16 * MIB;
    let vm = start_vm(vec![DiskSpec::new("disk0", DiskFormat::Qcow2, size)], "lo");
    let live = live_client(&vm, "disk0").await;
    let mut replica = Replica::new(&[size]);
    let mut cap = VmCapture::open(config(&vm, "lo")).await.expect("open");
    let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full");
    replica.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    for b in 0..16u64 {
        live.write(b * 512 * 1024, Bytes::from(vec![3u8; 64 * 1024]), false)
            .await
            .expect("w");
    }
    let mut c = cap
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("begin");
    assert!(c.next_extent().await.expect("extent").is_some());
    // the agent dies
    drop(c);
    drop(cap);
    let (e, n, j, b) = leftovers(&vm, "vmr-lo-").await;
    assert_eq!(e, vec!["vmr-lo-e0"]);
    assert_eq!(j, vec!["vmr-lo-j0"]);
    assert!(
        n.contains(&"vmr-lo-a0".to_owned()) && n.contains(&"vmr-lo-t0".to_owned()),
        "{n:?}"
    );
    assert_eq!(
        b,
        vec![
            ("vmr-lo-1".to_owned(), false),
            ("vmr-lo-2".to_owned(), true)
        ]
    );
    assert!(
        std::fs::read_dir(vm.work_dir())
            .expect("dir")
            .flatten()
            .any(|f| f.file_name().to_string_lossy().ends_with(".fleece"))
    );

    for b in 0..16u64 {
        live.write(
            8 * MIB + b * 256 * 1024,
            Bytes::from(vec![4u8; 64 * 1024]),
            false,
        )
        .await
        .expect("w");
    }
    let mut cap = VmCapture::open(config(&vm, "lo")).await.expect("reopen");
    let (e, n, j, b) = leftovers(&vm, "vmr-lo-").await;
    assert!(
        e.is_empty() && n.is_empty() && j.is_empty(),
        "{e:?} {n:?} {j:?}"
    );
    assert_eq!(b, vec![("vmr-lo-2".to_owned(), true)]);
    assert!(
        !std::fs::read_dir(vm.work_dir())
            .expect("dir")
            .flatten()
            .any(|f| f.file_name().to_string_lossy().ends_with(".fleece"))
    );
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Active { generation: 2 }
    );
    let mut c = cap
        .begin_cycle(CycleMode::Incremental)
        .await
        .expect("begin");
    let reference = read_all(&live).await;
    let (_, bytes) = replica.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    assert_eq!(bytes, 32 * 64 * 1024);
    assert!(
        replica.disks[0] == reference,
        "changes of the dead agent's cycle were lost"
    );

    // a full cycle that dies is not mistaken for working tracking
    let c = cap.begin_cycle(CycleMode::Full).await.expect("full");
    drop(c);
    drop(cap);
    let mut cap = VmCapture::open(config(&vm, "lo")).await.expect("reopen");
    assert_eq!(
        cap.tracking().await.expect("t"),
        Tracking::Lost(ResyncReason::InitialCopyIncomplete {
            disk: "disk0".into()
        })
    );
    let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full again");
    let mut fresh = Replica::new(&[size]);
    fresh.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    assert!(fresh.disks[0] == read_all(&live).await);
    let (_, _, _, b) = leftovers(&vm, "vmr-lo-").await;
    assert_eq!(b.len(), 1, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_starts_its_own_nbd_server_and_rejects_a_foreign_one() {
    // no NBD server in the daemon: the capture starts one in its work dir
    let vm = QsdVm::start(
        vec![DiskSpec::new("disk0", DiskFormat::Qcow2, 4 * MIB)],
        None,
    )
    .expect("qsd");
    let mut cap = VmCapture::open(config(&vm, "ns")).await.expect("open");
    let mut c = cap.begin_cycle(CycleMode::Full).await.expect("full");
    let mut r = Replica::new(&[4 * MIB]);
    r.apply_cycle(&mut c).await;
    c.commit().await.expect("commit");
    drop(cap);
    // reopen: the server is ours and running
    let cap = VmCapture::open(config(&vm, "ns")).await.expect("reopen");
    drop(cap);
    // another tag finds a server it did not start
    let r = VmCapture::open(config(&vm, "other")).await;
    assert!(
        matches!(r, Err(vmr_capture::CaptureError::ForeignNbdServer { .. })),
        "{r:?}"
    );
}
