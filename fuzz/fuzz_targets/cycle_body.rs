//! The cycle body decoder exactly as the server feeds a request body into it: the first input
//! byte picks how the body is split into HTTP/2 chunks, the rest is the body. Must never
//! panic; what it accepts is a checked header and extents inside their disks whose checksums
//! match.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_fuzz::{block_on, chunk_size, split};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let chunks = split(body, chunk_size(sel));
    if let Ok((header, extents)) = block_on(vmr_transport::testing::decode_cycle(chunks)) {
        assert!(header.check().is_ok(), "accepted a header check() refuses");
        let scheme = if u16::from_le_bytes([body[4], body[5]]) >= 2 {
            vmr_proto::ChecksumScheme::Blocks
        } else {
            vmr_proto::ChecksumScheme::Whole
        };
        for c in &extents {
            let e = c.extent();
            let again = vmr_proto::CheckedExtent::compute(e.clone(), scheme);
            assert_eq!(
                again.checksum(),
                c.checksum(),
                "accepted extent with a wrong checksum"
            );
            let size = header.disks[e.disk as usize].size;
            assert!(e.offset.checked_add(e.len()).is_some_and(|end| end <= size));
        }
    }
});
