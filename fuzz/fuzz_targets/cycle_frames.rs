//! The cycle frame decoder behind a valid stream header, so every input reaches the frames:
//! the first byte picks the stream version, compression and chunk size (`frames_body`); the
//! rest are the frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_fuzz::{block_on, chunk_size, frames_body, frames_scheme, split};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frames)) = data.split_first() else {
        return;
    };
    let Some(body) = frames_body(sel, frames) else {
        return;
    };
    let chunks = split(&body, chunk_size(sel & 0x3f));
    if let Ok((header, extents)) = block_on(vmr_transport::testing::decode_cycle(chunks)) {
        assert!(header.check().is_ok(), "accepted a header check() refuses");
        for c in &extents {
            let again = vmr_proto::CheckedExtent::compute(c.extent().clone(), frames_scheme(sel));
            assert_eq!(
                again.checksum(),
                c.checksum(),
                "accepted extent with a wrong checksum"
            );
        }
    }
});
