//! Shared test scenario: deterministic cycles for a two-disk VM and an in-memory model of the
//! expected disk contents after each cycle.
#![allow(dead_code)]

use bytes::Bytes;
use uuid::Uuid;
use vmr_proto::{CycleConsistency, CycleHeader, CycleId, CycleKind, DiskInfo, Extent, ExtentData};

pub const DISK_SIZES: [u64; 2] = [4 << 20, 2 << 20];
pub const T0: u64 = 1_700_000_000_000 - (1_700_000_000_000 % 3_600_000);
pub const STEP_MS: u64 = 20 * 60_000;

pub fn vm_uuid() -> Uuid {
    Uuid::parse_str("6c1f6d7e-5a8b-4d67-9d3e-2b1f1c0a9e01").expect("uuid")
}

pub fn definition(vm: Uuid) -> String {
    format!(
        "name = \"web1\"\nuuid = \"{vm}\"\nprogram = \"qemu-storage-daemon\"\nargs = []\n\
         [[disks]]\nnode = \"disk0\"\npath = \"/var/lib/vm/d0.qcow2\"\n\
         [[disks]]\nnode = \"disk1\"\npath = \"/var/lib/vm/d1.qcow2\"\n"
    )
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Cycle `id` (1 = full, base None; others incremental on id-1) with deterministic extents.
pub fn cycle(vm: Uuid, id: CycleId) -> (CycleHeader, Vec<Extent>) {
    let mut rng = Rng(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xABCD);
    let consistency = if id.is_multiple_of(4) {
        CycleConsistency::AppConsistent
    } else {
        CycleConsistency::CrashConsistent
    };
    let header = CycleHeader {
        vm,
        id,
        base: if id == 1 { None } else { Some(id - 1) },
        kind: if id == 1 {
            CycleKind::Full
        } else {
            CycleKind::Incremental
        },
        consistency,
        taken_at_ms: T0 + id * STEP_MS,
        disks: DISK_SIZES
            .iter()
            .enumerate()
            .map(|(i, s)| DiskInfo {
                id: format!("disk{i}"),
                size: *s,
            })
            .collect(),
        group: None,
    };
    let mut extents = Vec::new();
    let n = if id == 1 { 12 } else { 4 + rng.next() % 6 };
    for _ in 0..n {
        let disk = (rng.next() % 2) as u32;
        let size = DISK_SIZES[disk as usize];
        // Unaligned offsets and lengths exercise partial-cluster copy-on-write.
        let len = 512 + rng.next() % (192 << 10);
        let offset = rng.next() % (size - len);
        if rng.next().is_multiple_of(5) && id != 1 {
            extents.push(Extent {
                disk,
                offset,
                data: ExtentData::Zero(len),
            });
        } else {
            let fill = (id as u8).wrapping_mul(31).wrapping_add(rng.next() as u8) | 1;
            let data: Vec<u8> = (0..len)
                .map(|i| fill.wrapping_add((i / 512) as u8))
                .collect();
            extents.push(Extent {
                disk,
                offset,
                data: ExtentData::Data(Bytes::from(data)),
            });
        }
    }
    (header, extents)
}

/// Expected raw content of each disk after applying cycles 1..=upto.
pub fn model(vm: Uuid, upto: CycleId) -> Vec<Vec<u8>> {
    let mut disks: Vec<Vec<u8>> = DISK_SIZES.iter().map(|s| vec![0u8; *s as usize]).collect();
    for id in 1..=upto {
        for e in cycle(vm, id).1 {
            let d = &mut disks[e.disk as usize];
            let o = e.offset as usize;
            match e.data {
                ExtentData::Data(b) => d[o..o + b.len()].copy_from_slice(&b),
                ExtentData::Zero(n) => d[o..o + n as usize].fill(0),
            }
        }
    }
    disks
}

pub fn hash_disks(disks: &[Vec<u8>]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for d in disks {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Receive cycle `id` and commit it; returns whether it was a duplicate.
pub async fn send(
    store: &vmr_store::Store,
    vm: Uuid,
    id: CycleId,
) -> Result<bool, vmr_store::StoreError> {
    let (h, ex) = cycle(vm, id);
    let mut w = store.begin_cycle(h).await?;
    let dup = w.is_duplicate();
    for e in &ex {
        w.put(e, e.checksum()).await?;
    }
    w.finish().await?;
    Ok(dup)
}

/// Content of one point's disks read through its layers' backing chains.
pub fn point_content(
    store: &vmr_store::Store,
    vm: Uuid,
    point: Option<CycleId>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let layers = store.point_layers(vm, point)?;
    let mut out = Vec::new();
    for (_, path) in layers {
        out.push(vmr_testkit::img::raw_content(&path)?);
    }
    Ok(out)
}
