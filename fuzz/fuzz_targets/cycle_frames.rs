//! The cycle frame decoder behind a valid stream header, so every input reaches the frames:
//! bit 7 of the first byte compresses the frames as one zstd stream (as a sender with
//! compression on does), the low bits pick the chunk size; the rest are the frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_fuzz::{block_on, chunk_size, split, stream_header};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frames)) = data.split_first() else {
        return;
    };
    let zstd = sel & 0x80 != 0;
    let mut body = stream_header(zstd);
    if zstd {
        match zstd::bulk::compress(frames, 1) {
            Ok(c) => body.extend_from_slice(&c),
            Err(_) => return,
        }
    } else {
        body.extend_from_slice(frames);
    }
    let chunks = split(&body, chunk_size(sel & 0x7f));
    if let Ok((header, extents)) = block_on(vmr_transport::testing::decode_cycle(chunks)) {
        assert!(header.check().is_ok(), "accepted a header check() refuses");
        for (e, cs) in &extents {
            assert_eq!(e.checksum(), *cs, "accepted extent with a wrong checksum");
        }
    }
});
