//! Capture benchmark against a qemu-storage-daemon stand-in VM with a 2 GiB qcow2 disk.
//!
//! For N MiB dirty (random 64 KiB blocks): one capture cycle (begin → all extents read →
//! commit) versus a plain pipelined read of the same ranges from the live export; and a
//! writer's random 64 KiB write throughput while a cycle's snapshot is open versus with no
//! cycle. Median of 3 runs; prints a markdown table.
//!
//! `cargo run --release -p vmr-capture --example capture_bench`

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use vmr_capture::{CaptureConfig, CycleMode, DEFAULT_MAX_IN_FLIGHT, Endpoint, Names, VmCapture};
use vmr_nbd::{ConnectOptions, NbdClient};
use vmr_testkit::qsd::{DiskFormat, DiskSpec, QsdVm};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 2 << 30;
const RUNS: usize = 3;
const WRITE_SECS: f64 = 1.5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn dirty(c: &NbdClient, rng: &mut rand::rngs::StdRng, mib: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    while (set.len() as u64) < mib * MIB / BLOCK {
        set.insert(rng.gen_range(0..SIZE / BLOCK) * BLOCK);
    }
    let data = Bytes::from(vec![0x5au8; BLOCK as usize]);
    futures::stream::iter(set.iter().copied())
        .map(|o| {
            let c = c.clone();
            let d = data.clone();
            async move { c.write(o, d, false).await }
        })
        .buffer_unordered(16)
        .for_each(|r| async move { r.expect("dirty write") })
        .await;
    set
}

/// Coalesced ranges of the blocks, split at 4 MiB like the capture.
fn ranges(blocks: &BTreeSet<u64>) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b => *l += BLOCK,
            _ => out.push((b, BLOCK)),
        }
    }
    let mut split = Vec::new();
    for (mut o, mut l) in out {
        while l > 0 {
            let n = l.min(4 * MIB);
            split.push((o, n as u32));
            o += n;
            l -= n;
        }
    }
    split
}

async fn plain_read(c: &NbdClient, r: &[(u64, u32)]) -> Duration {
    let t = Instant::now();
    futures::stream::iter(r.iter().copied())
        .map(|(o, l)| {
            let c = c.clone();
            async move { c.read(o, l).await }
        })
        .buffered(DEFAULT_MAX_IN_FLIGHT)
        .for_each(|r| async move {
            r.expect("read");
        })
        .await;
    t.elapsed()
}

/// Random 64 KiB writes (4 in flight) for WRITE_SECS; MiB/s.
async fn write_for(c: &NbdClient, seed: u64) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = Instant::now();
    let mut n = 0u64;
    let data = Bytes::from(vec![0xa5u8; BLOCK as usize]);
    while t.elapsed().as_secs_f64() < WRITE_SECS {
        let offs: Vec<u64> = (0..4)
            .map(|_| rng.gen_range(0..SIZE / BLOCK) * BLOCK)
            .collect();
        futures::future::try_join_all(offs.into_iter().map(|o| c.write(o, data.clone(), false)))
            .await
            .expect("write");
        n += 4;
    }
    (n * BLOCK) as f64 / MIB as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tag = "bench";
    let sock = Names::new(tag)?.nbd_socket(std::path::Path::new(""));
    let vm = QsdVm::start(
        vec![DiskSpec::new("disk0", DiskFormat::Qcow2, SIZE)],
        Some(sock.to_str().unwrap_or("vmr-bench-nbd.sock")),
    )?;
    let nbd = Endpoint::Unix(vm.nbd_socket().map(|p| p.to_owned()).unwrap_or_default());
    let live = NbdClient::connect(
        &nbd,
        ConnectOptions {
            export: "disk0".into(),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let cfg = CaptureConfig::new(
        Endpoint::Unix(vm.qmp_socket()),
        vec!["disk0".into()],
        vm.work_dir(),
        tag,
    );
    let mut cap = VmCapture::open(cfg).await?;
    let mut c = cap.begin_cycle(CycleMode::Full).await?;
    while c.next_extent().await?.is_some() {}
    c.commit().await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);

    println!(
        "| dirty | extents | capture cycle ms | capture MiB/s | plain read ms | plain MiB/s | capture/plain time | writer MiB/s idle | writer MiB/s snapshot open | open/idle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for mib in [64u64, 256] {
        let (mut cap_ms, mut plain_ms, mut idle, mut open, mut extents) =
            (vec![], vec![], vec![], vec![], 0);
        for run in 0..RUNS {
            let blocks = dirty(&live, &mut rng, mib).await;
            let r = ranges(&blocks);
            extents = r.len();
            // plain read of the same ranges from the live disk (page cache equally warm)
            plain_ms.push(plain_read(&live, &r).await.as_secs_f64() * 1e3);
            let t = Instant::now();
            let mut c = cap.begin_cycle(CycleMode::Incremental).await?;
            let mut bytes = 0;
            while let Some(e) = c.next_extent().await? {
                bytes += e.len();
            }
            c.commit().await?;
            cap_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(bytes, mib * MIB, "captured bytes");

            // writer: no cycle, then with a snapshot open (dirty set of this size)
            idle.push(write_for(&live, run as u64).await);
            let _ = dirty(&live, &mut rng, mib).await;
            let mut c = cap.begin_cycle(CycleMode::Incremental).await?;
            open.push(write_for(&live, 100 + run as u64).await);
            while c.next_extent().await?.is_some() {}
            c.commit().await?;
            // drain what the writers dirtied so the next run starts from this run's size
            let mut c = cap.begin_cycle(CycleMode::Incremental).await?;
            while c.next_extent().await?.is_some() {}
            c.commit().await?;
        }
        let (cm, pm, im, om) = (median(cap_ms), median(plain_ms), median(idle), median(open));
        let mibf = mib as f64;
        println!(
            "| {mib} MiB | {extents} | {cm:.0} | {:.0} | {pm:.0} | {:.0} | {:.2} | {im:.0} | {om:.0} | {:.2} |",
            mibf / (cm / 1e3),
            mibf / (pm / 1e3),
            cm / pm,
            om / im
        );
    }
    drop(cap);
    Ok(())
}
