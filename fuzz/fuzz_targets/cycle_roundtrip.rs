//! decode(encode(cycle)) == cycle for arbitrary valid cycles (1-3 disks, up to 12 data and zero
//! extents, plain or zstd), split into arbitrary chunk sizes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmreplica_fuzz::{block_on, chunk_size, split};

fn cycle(u: &mut Unstructured<'_>) -> Result<(CycleHeader, Vec<Extent>, Option<i32>, usize)> {
    let ndisks = u.int_in_range(1..=3u32)?;
    let mut disks = Vec::new();
    for i in 0..ndisks {
        disks.push(DiskInfo {
            id: format!("drive{i}"),
            size: u.int_in_range(1..=(1u64 << 40))?,
        });
    }
    let id = u.int_in_range(1..=1_000_000u64)?;
    let (kind, base) = if id > 1 && u.arbitrary()? {
        (CycleKind::Incremental, Some(u.int_in_range(1..=id - 1)?))
    } else {
        (CycleKind::Full, None)
    };
    let header = CycleHeader {
        vm: uuid::Uuid::from_u128(u.arbitrary()?),
        id,
        base,
        kind,
        consistency: if u.arbitrary()? {
            CycleConsistency::AppConsistent
        } else {
            CycleConsistency::CrashConsistent
        },
        taken_at_ms: u.arbitrary()?,
        disks,
        group: None,
    };
    let mut extents = Vec::new();
    for _ in 0..u.int_in_range(0..=12u32)? {
        let disk = u.int_in_range(0..=ndisks - 1)?;
        let size = header.disks[disk as usize].size;
        let data = if u.arbitrary()? {
            let n = u.int_in_range(1..=size.min(4096))? as usize;
            ExtentData::Data(Bytes::copy_from_slice(u.bytes(n.min(u.len()))?))
        } else {
            ExtentData::Zero(u.int_in_range(1..=size)?)
        };
        let len = match &data {
            ExtentData::Data(b) => b.len() as u64,
            ExtentData::Zero(n) => *n,
        };
        let offset = u.int_in_range(0..=size - len)?;
        extents.push(Extent { disk, offset, data });
    }
    let level = match u.int_in_range(0..=2u8)? {
        0 => None,
        1 => Some(1),
        _ => Some(3),
    };
    Ok((header, extents, level, chunk_size(u.arbitrary()?)))
}

fuzz_target!(|data: &[u8]| {
    let Ok((header, extents, level, chunk)) = cycle(&mut Unstructured::new(data)) else {
        return;
    };
    let body = block_on(vmr_transport::testing::encode_cycle(
        &header,
        extents.clone(),
        level,
    ))
    .unwrap_or_else(|e| panic!("a valid cycle does not encode: {e}"));
    let (h, got) = block_on(vmr_transport::testing::decode_cycle(split(&body, chunk)))
        .unwrap_or_else(|e| panic!("an encoded cycle does not decode: {e}"));
    assert_eq!(h, header);
    let got: Vec<Extent> = got
        .into_iter()
        .map(vmr_proto::CheckedExtent::into_extent)
        .collect();
    assert_eq!(got, extents);
});
