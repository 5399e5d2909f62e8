//! Benchmark (run with `--release`): `Store::resync_hashes` of a whole disk, as a resync asks
//! for it (4096 blocks of 64 KiB per call), answered from the latest point's block-hash index
//! against the read-and-hash path (the index file removed: one read-only `qemu-nbd` per call,
//! every allocated block read and hashed). The disk is written in full with pseudo-random data
//! by one full cycle (64 KiB-aligned 4 MiB extents), so the index knows every block.
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
    let header = CycleHeader {
        vm,
        id: 1,
        base: None,
        kind: CycleKind::Full,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: 0,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size,
        }],
    };
    let t = Instant::now();
    let mut w = store.begin_cycle(header).await?;
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
    let idx = dir
        .path()
        .join("vms")
        .join(vm.to_string())
        .join("hash-index/disk0/c000001.hidx");
    let idx_bytes = std::fs::metadata(&idx)?.len();
    std::fs::remove_file(&idx)?;
    let (t_read, h_read, read_indexed) = all_hashes(&store, vm, size).await?;
    anyhow::ensure!(h_index == h_read, "index and read-and-hash disagree");
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
    Ok(())
}
