//! Benchmark (run with `--release`): apply throughput of a staged 256 MiB cycle into a 2 GiB
//! disk chain (64 KiB random extents, and 4 MiB sequential extents) versus `qemu-img convert`
//! writing the same bytes into a qcow2, and the cost of pruning a point holding 64 MiB.
//! Prints a markdown table (median of 3).

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_store::{RetentionPolicy, Store};

const DISK: u64 = 2 << 30;

fn header(vm: Uuid, id: u64) -> CycleHeader {
    CycleHeader {
        vm,
        id,
        base: (id > 1).then(|| id - 1),
        kind: if id == 1 {
            CycleKind::Full
        } else {
            CycleKind::Incremental
        },
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: id * 3_600_000,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size: DISK,
        }],
    }
}

fn extents(total: u64, piece: u64, random: bool, seed: u64) -> Vec<Extent> {
    let n = total / piece;
    let slots = DISK / piece;
    let mut s = seed;
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let start = (seed % 4) * (total / piece);
    for i in 0..n {
        let slot = if random {
            loop {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let c = (s >> 20) % slots;
                if used.insert(c) {
                    break c;
                }
            }
        } else {
            start + i
        };
        let data: Vec<u8> = (0..piece)
            .map(|j| (j as u8) ^ (slot as u8) ^ 0x5a)
            .collect();
        out.push(Extent {
            disk: 0,
            offset: slot * piece,
            data: ExtentData::Data(Bytes::from(data)),
        });
    }
    out
}

fn vmdef(vm: Uuid) -> String {
    format!(
        "name = \"b\"\nuuid = \"{vm}\"\nprogram = \"x\"\nargs = []\n[[disks]]\nnode = \"disk0\"\npath = \"/x\"\n"
    )
}

async fn stage(store: &Store, h: CycleHeader, ex: &[Extent]) -> anyhow::Result<()> {
    let mut w = store.begin_receive(h)?;
    for e in ex {
        w.put(e, e.checksum()).await?;
    }
    w.finish().await?;
    Ok(())
}

/// Apply time of one cycle with `ex` on top of an empty 2 GiB base.
async fn apply_once(ex: &[Extent]) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let vm = Uuid::new_v4();
    let store = Store::open(dir.path())?;
    store.add_vm(vm, &vmdef(vm), RetentionPolicy::default())?;
    stage(&store, header(vm, 1), &[]).await?;
    store.apply_pending(vm).await?;
    stage(&store, header(vm, 2), ex).await?;
    let t = Instant::now();
    store.apply_pending(vm).await?;
    Ok(t.elapsed())
}

/// `qemu-img convert` of a sparse raw file holding the same bytes into a qcow2.
fn convert_once(ex: &[Extent]) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let raw = dir.path().join("src.raw");
    let mut f = std::fs::File::create(&raw)?;
    f.set_len(DISK)?;
    for e in ex {
        if let ExtentData::Data(b) = &e.data {
            f.seek(SeekFrom::Start(e.offset))?;
            f.write_all(b)?;
        }
    }
    f.sync_all()?;
    let out = dir.path().join("out.qcow2");
    let t = Instant::now();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", "-t", "writeback"])
        .arg(&raw)
        .arg(&out)
        .status()?;
    let st2 = Command::new("sync").arg("-f").arg(&out).status()?;
    anyhow::ensure!(st.success() && st2.success(), "qemu-img convert failed");
    Ok(t.elapsed())
}

/// Prune of a point holding 64 MiB (random 64 KiB) under a small newer point.
async fn prune_once() -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let vm = Uuid::new_v4();
    let store = Store::open(dir.path())?;
    store.add_vm(vm, &vmdef(vm), RetentionPolicy::default())?;
    stage(&store, header(vm, 1), &[]).await?;
    stage(&store, header(vm, 2), &extents(64 << 20, 64 << 10, true, 7)).await?;
    stage(&store, header(vm, 3), &extents(1 << 20, 64 << 10, true, 9)).await?;
    store.apply_pending(vm).await?;
    let t = Instant::now();
    let dropped = store.prune_at(vm, 3 * 3_600_000).await?;
    anyhow::ensure!(dropped == vec![1, 2], "unexpected prune {dropped:?}");
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib = 256.0;
    println!(
        "| case | vmr-store apply (median of 3) | qemu-img convert (median of 3) | MiB/s store | MiB/s convert | store/convert time |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, piece, random) in [
        ("256 MiB, 64 KiB random extents", 64u64 << 10, true),
        ("256 MiB, 4 MiB sequential extents", 4 << 20, false),
    ] {
        let ex = extents(256 << 20, piece, random, 1);
        let mut a = Vec::new();
        let mut c = Vec::new();
        for _ in 0..3 {
            a.push(apply_once(&ex).await?);
            c.push(convert_once(&ex)?);
        }
        let (a, c) = (median(a), median(c));
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} | {:.0} | {:.2} |",
            a.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            mib / a.as_secs_f64(),
            mib / c.as_secs_f64(),
            a.as_secs_f64() / c.as_secs_f64()
        );
    }
    let mut p = Vec::new();
    for _ in 0..3 {
        p.push(prune_once().await?);
    }
    let p = median(p);
    println!(
        "| prune one point holding 64 MiB (64 KiB random) | {:.0} ms | | {:.0} | | |",
        p.as_secs_f64() * 1e3,
        64.0 / p.as_secs_f64()
    );
    Ok(())
}
