//! Benchmark (run with `--release`): the replica-side time of one cycle, from `begin_cycle`
//! until `finish` returned the committed point (every extent verified, written into the new
//! qcow2 layer through the store's qemu-storage-daemon, flushed, fsynced, catalog committed), against a plain copy of
//! the same dirty bytes into a file (pwrite at their offsets, then fsync) and against
//! `qemu-img convert` of an image holding them into a new qcow2 (then fsync). Cases: a 1 %
//! cycle of an 8 GiB disk (64 KiB random extents), 256 MiB on a 2 GiB disk (64 KiB random and
//! 4 MiB sequential), an initial full cycle of a sparse 16 GiB disk holding 1 GiB in 4 MiB
//! pieces at random places; the fixed cost of an empty cycle; and the cost of pruning a point
//! holding 64 MiB. Prints a markdown table (median of 3).

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_store::{RetentionPolicy, Store};

fn header(vm: Uuid, id: u64, disk: u64) -> CycleHeader {
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
            size: disk,
        }],
        group: None,
    }
}

/// `total` bytes in `piece`-sized extents of a `disk`-byte disk, at random distinct slots or
/// sequential; each with its checksum (computed by the sender, outside the timing).
fn extents(disk: u64, total: u64, piece: u64, random: bool, seed: u64) -> Vec<(Extent, [u8; 32])> {
    let n = total / piece;
    let slots = disk / piece;
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
            .map(|j| (j as u8) ^ (slot as u8) ^ ((j >> 9) as u8) ^ 0x5a)
            .collect();
        let e = Extent {
            disk: 0,
            offset: slot * piece,
            data: ExtentData::Data(Bytes::from(data)),
        };
        let sum = e.checksum();
        out.push((e, sum));
    }
    out
}

fn vmdef(vm: Uuid) -> String {
    format!(
        "name = \"b\"\nuuid = \"{vm}\"\nprogram = \"x\"\nargs = []\n[[disks]]\nnode = \"disk0\"\npath = \"/x\"\n"
    )
}

async fn send(store: &Store, h: CycleHeader, ex: &[(Extent, [u8; 32])]) -> anyhow::Result<()> {
    let mut w = store.begin_cycle(h).await?;
    for (e, sum) in ex {
        w.put(e, *sum).await?;
    }
    w.finish().await?;
    Ok(())
}

/// Time of one cycle with `ex`, from `begin_cycle` to the committed point: an incremental
/// cycle on top of an empty base, or (`full`) the first full cycle.
async fn cycle_once(disk: u64, ex: &[(Extent, [u8; 32])], full: bool) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let vm = Uuid::new_v4();
    let store = Store::open(dir.path())?;
    store.add_vm(vm, &vmdef(vm), RetentionPolicy::default())?;
    let id = if full {
        1
    } else {
        send(&store, header(vm, 1, disk), &[]).await?;
        2
    };
    let t = Instant::now();
    send(&store, header(vm, id, disk), ex).await?;
    Ok(t.elapsed())
}

fn write_sparse(
    path: &std::path::Path,
    disk: u64,
    ex: &[(Extent, [u8; 32])],
) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(disk)?;
    for (e, _) in ex {
        if let ExtentData::Data(b) = &e.data {
            f.seek(SeekFrom::Start(e.offset))?;
            f.write_all(b)?;
        }
    }
    f.sync_all()?;
    Ok(())
}

/// A plain copy of the dirty bytes: pwrite each extent into a sparse file, then fsync.
fn plain_copy_once(disk: u64, ex: &[(Extent, [u8; 32])]) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let f = std::fs::File::create(dir.path().join("copy.raw"))?;
    f.set_len(disk)?;
    let t = Instant::now();
    for (e, _) in ex {
        if let ExtentData::Data(b) = &e.data {
            f.write_all_at(b, e.offset)?;
        }
    }
    f.sync_all()?;
    Ok(t.elapsed())
}

/// `qemu-img convert` of an image (`src_fmt`) holding the same bytes into a new qcow2, then
/// fsync of it.
fn convert_once(disk: u64, ex: &[(Extent, [u8; 32])], src_fmt: &str) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let raw = dir.path().join("src.raw");
    write_sparse(&raw, disk, ex)?;
    let src = if src_fmt == "qcow2" {
        let q = dir.path().join("src.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q)
            .status()?;
        anyhow::ensure!(st.success(), "qemu-img convert to qcow2 failed");
        std::fs::remove_file(&raw)?;
        q
    } else {
        raw
    };
    let out = dir.path().join("out.qcow2");
    let t = Instant::now();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", src_fmt, "-O", "qcow2", "-t", "writeback"])
        .arg(&src)
        .arg(&out)
        .status()?;
    let st2 = Command::new("sync").arg("-f").arg(&out).status()?;
    anyhow::ensure!(st.success() && st2.success(), "qemu-img convert failed");
    Ok(t.elapsed())
}

/// Prune of a point holding 64 MiB (random 64 KiB) under a small newer point.
async fn prune_once() -> anyhow::Result<Duration> {
    let disk = 2 << 30;
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let vm = Uuid::new_v4();
    let store = Store::open(dir.path())?;
    store.add_vm(vm, &vmdef(vm), RetentionPolicy::default())?;
    send(&store, header(vm, 1, disk), &[]).await?;
    let a = extents(disk, 64 << 20, 64 << 10, true, 7);
    send(&store, header(vm, 2, disk), &a).await?;
    let b = extents(disk, 1 << 20, 64 << 10, true, 9);
    send(&store, header(vm, 3, disk), &b).await?;
    let t = Instant::now();
    let dropped = store.prune_at(vm, 3 * 3_600_000).await?;
    anyhow::ensure!(dropped == vec![1, 2], "unexpected prune {dropped:?}");
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// User + system CPU seconds of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`: the store's
/// qemu-storage-daemon once it has been reaped, i.e. once its store was dropped).
#[allow(unsafe_code)]
fn cpu(who: i32) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and keeps no pointer.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// `--cpu`: only the store's cycles of the 1 % case and of the initial case, 5 times each,
/// with the CPU seconds per GiB of this process (the store: receiving side's agent part) and
/// of its qemu-storage-daemon (the set-up's empty base cycle included, which is small).
async fn cpu_mode() -> anyhow::Result<()> {
    println!(
        "| case | wall (median of 5) | store process CPU s/GiB | qemu-storage-daemon CPU s/GiB |"
    );
    println!("|---|---|---|---|");
    let cases: [(&str, u64, u64, u64, bool); 2] = [
        (
            "1 % of 8 GiB, 64 KiB random, incremental",
            8 << 30,
            82 << 20,
            64 << 10,
            false,
        ),
        (
            "initial: 1 GiB in 4 MiB pieces on 16 GiB, full",
            16 << 30,
            1 << 30,
            4 << 20,
            true,
        ),
    ];
    for (name, disk, total, piece, full) in cases {
        let ex = extents(disk, total, piece, true, 1);
        let (mut w, mut s, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let _ = Command::new("sync").status();
            let (s0, d0) = (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_CHILDREN));
            w.push(cycle_once(disk, &ex, full).await?);
            s.push(cpu(libc::RUSAGE_SELF) - s0);
            d.push(cpu(libc::RUSAGE_CHILDREN) - d0);
        }
        let gib = total as f64 / f64::from(1 << 30);
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "| {name} | {:.0} ms | {:.2} | {:.2} |",
            ms(median(w)),
            med(s) / gib,
            med(d) / gib
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--cpu") {
        return cpu_mode().await;
    }
    println!(
        "| case | vmr-store cycle to committed | plain copy + fsync | qemu-img convert + fsync | MiB/s store | store speed / plain copy | store speed / convert |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cases: [(&str, u64, u64, u64, bool, bool); 4] = [
        (
            "1 % of an 8 GiB disk (82 MiB, 64 KiB random), incremental",
            8 << 30,
            82 << 20,
            64 << 10,
            true,
            false,
        ),
        (
            "256 MiB of a 2 GiB disk, 64 KiB random, incremental",
            2 << 30,
            256 << 20,
            64 << 10,
            true,
            false,
        ),
        (
            "256 MiB of a 2 GiB disk, 4 MiB sequential, incremental",
            2 << 30,
            256 << 20,
            4 << 20,
            false,
            false,
        ),
        (
            "initial: 16 GiB sparse disk holding 1 GiB in 4 MiB pieces, full",
            16 << 30,
            1 << 30,
            4 << 20,
            true,
            true,
        ),
    ];
    for (name, disk, total, piece, random, full) in cases {
        let ex = extents(disk, total, piece, random, 1);
        let (mut a, mut p, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            a.push(cycle_once(disk, &ex, full).await?);
            p.push(plain_copy_once(disk, &ex)?);
            c.push(convert_once(disk, &ex, if full { "qcow2" } else { "raw" })?);
        }
        let (a, p, c) = (median(a), median(p), median(c));
        let mib = total as f64 / f64::from(1 << 20);
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} | {:.2} | {:.2} |",
            ms(a),
            ms(p),
            ms(c),
            mib / a.as_secs_f64(),
            p.as_secs_f64() / a.as_secs_f64(),
            c.as_secs_f64() / a.as_secs_f64(),
        );
    }
    // The fixed cost of a cycle: an empty incremental cycle of one disk (blockdev-create,
    // daemon node and export set-up and teardown, flush, fsyncs, catalog commit).
    let mut f = Vec::new();
    for _ in 0..5 {
        f.push(cycle_once(2 << 30, &[], false).await?);
    }
    println!(
        "| empty incremental cycle, one disk (fixed cost per cycle, median of 5) | {:.0} ms | | | | | |",
        ms(median(f))
    );
    let mut p = Vec::new();
    for _ in 0..3 {
        p.push(prune_once().await?);
    }
    let p = median(p);
    println!(
        "| prune of points 1 and 2 (64 MiB, 64 KiB random) | {:.0} ms | | | {:.0} | | |",
        ms(p),
        64.0 / p.as_secs_f64()
    );
    Ok(())
}
