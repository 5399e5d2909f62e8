//! Benchmark (run with `--release`): `Store::resync_hashes` of a whole disk, as a resync asks
//! for it (4096 blocks of 64 KiB per call), answered from the latest point's block-hash index
//! against the read-and-hash path (the index file removed: one read-only `qemu-nbd` per call,
//! every allocated block read and hashed). The disk is written in full with pseudo-random data
//! by one full cycle (64 KiB-aligned 4 MiB extents), so the index knows every block. Also the
//! time of a small incremental cycle (one 64 KiB extent) on that disk, whose commit reads the
//! previous point's index and writes the new one (median of 5), beside the same cycle on a
//! 64 MiB disk (an index of 1024 entries).
//!
//! `cargo run --release -p vmr-store --example hash_index_bench -- [GiB]` (default 2; needs
//! that much free space under `$TMPDIR`, default `/var/tmp`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_store::hashes::BLOCK_SIZE;
use vmr_store::{RetentionPolicy, Store};

const PIECE: u64 = 4 << 20;
const CHUNK: u64 = 4096;

fn vmdef(vm: Uuid) -> String {
    format!(
        "name = \"bench\"\nuuid = \"{vm}\"\nprogram = \"qemu-storage-daemon\"\nargs = []\n\
         [[disks]]\nnode = \"disk0\"\npath = \"/x/disk0.qcow2\"\n"
    )
}

fn piece(seed: u64) -> Bytes {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(PIECE as usize);
    while v.len() < PIECE as usize {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    Bytes::from(v)
}

fn header(vm: Uuid, id: u64, size: u64) -> CycleHeader {
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
        taken_at_ms: id,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size,
        }],
        group: None,
    }
}

/// Median time of 5 incremental cycles of one 64 KiB extent, from `begin_cycle` to the
/// committed point, starting at cycle `next`.
async fn small_cycles(store: &Store, vm: Uuid, size: u64, next: u64) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for id in next..next + 5 {
        let e = Extent {
            disk: 0,
            offset: (id * 7919 % (size / BLOCK_SIZE)) * BLOCK_SIZE,
            data: ExtentData::Data(piece(id).slice(..BLOCK_SIZE as usize)),
        };
        let sum = e.checksum();
        let t = Instant::now();
        let mut w = store.begin_cycle(header(vm, id, size)).await?;
        w.put(&e, sum).await?;
        w.finish().await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[2])
}

async fn all_hashes(
    store: &Store,
    vm: Uuid,
    size: u64,
) -> anyhow::Result<(Duration, Vec<[u8; 32]>, u64)> {
    let blocks = size.div_ceil(BLOCK_SIZE);
    let t = Instant::now();
    let mut out = Vec::with_capacity(blocks as usize);
    let mut indexed = 0;
    let mut first = 0;
    while first < blocks {
        let n = CHUNK.min(blocks - first);
        let h = store
            .resync_hashes(vm, "disk0", size, BLOCK_SIZE, first, n)
            .await?;
        indexed += h.indexed;
        out.extend(h.hashes);
        first += n;
    }
    Ok((t.elapsed(), out, indexed))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let gib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2);
    let size = gib << 30;
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let store = Store::open(dir.path())?;
    let vm = Uuid::new_v4();
    store.add_vm(vm, &vmdef(vm), RetentionPolicy::default())?;
    let t = Instant::now();
    let mut w = store.begin_cycle(header(vm, 1, size)).await?;
    for i in 0..size / PIECE {
        let e = Extent {
            disk: 0,
            offset: i * PIECE,
            data: ExtentData::Data(piece(i)),
        };
        let sum = e.checksum();
        w.put(&e, sum).await?;
    }
    w.finish().await?;
    eprintln!("wrote {gib} GiB in {:?}", t.elapsed());
    let (t_index, h_index, indexed) = all_hashes(&store, vm, size).await?;
    let t_small = small_cycles(&store, vm, size, 2).await?;
    let small_store = Store::open(&dir.path().join("small"))?;
    let vm2 = Uuid::new_v4();
    small_store.add_vm(vm2, &vmdef(vm2), RetentionPolicy::default())?;
    let mut w = small_store.begin_cycle(header(vm2, 1, 64 << 20)).await?;
    for i in 0..16 {
        let e = Extent {
            disk: 0,
            offset: i * PIECE,
            data: ExtentData::Data(piece(i)),
        };
        let sum = e.checksum();
        w.put(&e, sum).await?;
    }
    w.finish().await?;
    let t_small64 = small_cycles(&small_store, vm2, 64 << 20, 2).await?;
    let (_, h_after, _) = all_hashes(&store, vm, size).await?;
    anyhow::ensure!(h_after.len() == h_index.len());
    let idx = dir
        .path()
        .join("vms")
        .join(vm.to_string())
        .join("hash-index/disk0/c000006.hidx");
    let idx_bytes = std::fs::metadata(&idx)?.len();
    std::fs::remove_file(&idx)?;
    let (t_read, h_read, read_indexed) = all_hashes(&store, vm, size).await?;
    anyhow::ensure!(h_after == h_read, "index and read-and-hash disagree");
    anyhow::ensure!(read_indexed == 0 && indexed == h_index.len() as u64);
    let rate = |d: Duration| size as f64 / d.as_secs_f64() / f64::from(1 << 30);
    println!("| disk | from the index | read and hash | speed-up | index file |");
    println!("|---|---|---|---|---|");
    println!(
        "| {gib} GiB, all blocks written | {:.0} ms ({:.1} GiB/s) | {:.0} ms ({:.2} GiB/s) | {:.0}x | {:.1} MiB |",
        t_index.as_secs_f64() * 1e3,
        rate(t_index),
        t_read.as_secs_f64() * 1e3,
        rate(t_read),
        t_read.as_secs_f64() / t_index.as_secs_f64(),
        idx_bytes as f64 / f64::from(1 << 20)
    );
    println!(
        "\nincremental cycle of one 64 KiB extent, begin to committed (median of 5): {:.0} ms on \
         the {gib} GiB disk, {:.0} ms on a 64 MiB disk",
        t_small.as_secs_f64() * 1e3,
        t_small64.as_secs_f64() * 1e3
    );
    Ok(())
}
