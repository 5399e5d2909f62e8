//! How the resync block size was chosen (run with `--release`): for block sizes 4 KiB to
//! 1 MiB, (1) the BLAKE3 throughput of hashing 1 GiB in blocks of that size on this machine
//! (both sides of a resync hash every block of the disk), and (2) for the change pattern of
//! benchmark scenario 8 (1 % of the 64 KiB blocks of an 8 GiB disk, at random) and for
//! sequential 4 MiB runs of the same total, the bytes a resync sends (every block that holds
//! a change) plus the hash traffic (32 bytes per block, sent hex-encoded: 64). Prints a
//! markdown table.
//!
//! `cargo run --release -p vmr-store --example resync_block_size`

use std::collections::BTreeSet;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const DISK: u64 = 8 * GIB;
const CHANGE: u64 = 64 * KIB;

/// xorshift, deterministic, no extra crate.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Offsets of the changed 64 KiB blocks: `random` ones, or sequential 4 MiB runs.
fn changes(random: bool) -> Vec<u64> {
    let count = DISK / CHANGE / 100;
    let mut g = Gen(0x5eed_1234_abcd_9876);
    let mut set = BTreeSet::new();
    if random {
        while (set.len() as u64) < count {
            set.insert(g.next() % (DISK / CHANGE) * CHANGE);
        }
    } else {
        let per_run = 4 * MIB / CHANGE;
        while (set.len() as u64) < count {
            let start = g.next() % (DISK / (4 * MIB)) * 4 * MIB;
            for i in 0..per_run {
                set.insert(start + i * CHANGE);
            }
        }
    }
    set.into_iter().collect()
}

/// Bytes sent for `changes` with blocks of `bs`: each touched block whole.
fn sent(changes: &[u64], bs: u64) -> u64 {
    let touched: BTreeSet<u64> = changes
        .iter()
        .flat_map(|&o| (o / bs)..=((o + CHANGE - 1) / bs))
        .collect();
    touched.len() as u64 * bs
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn main() {
    let mut data = vec![0u8; GIB as usize];
    let mut g = Gen(42);
    for c in data.chunks_mut(8) {
        c.copy_from_slice(&g.next().to_le_bytes());
    }
    let random = changes(true);
    let runs = changes(false);
    println!(
        "| block size | BLAKE3 GiB/s (1 GiB, this machine) | hashes for 8 GiB (hex) | sent, 1 % random 64 KiB | sent, 1 % in 4 MiB runs |"
    );
    println!("|---|---|---|---|---|");
    for bs in [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB] {
        // Best of 3, to keep other load out of the figure.
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let mut x = 0u8;
            for block in data.chunks(bs as usize) {
                x ^= blake3::hash(block).as_bytes()[0];
            }
            std::hint::black_box(x);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "| {} KiB | {:.2} | {} | {} | {} |",
            bs / KIB,
            1.0 / best,
            mib(DISK / bs * 64),
            mib(sent(&random, bs)),
            mib(sent(&runs, bs)),
        );
    }
}
