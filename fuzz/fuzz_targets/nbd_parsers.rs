//! The NBD pure header and payload parsers (`vmr_nbd::proto`): structured reply error and
//! block status payloads, and the fixed headers, which must decode what they encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmr_nbd::proto::{
    ChunkHeader, MAX_STRING, REQUEST_LEN, Request, SimpleReply, parse_block_status,
    parse_error_chunk,
};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, p)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 | 1 => {
            if let Ok(e) = parse_error_chunk(p, sel % 5 == 1) {
                assert_ne!(e.errno, 0);
                assert!(p.len() <= 6 + MAX_STRING + 8);
                assert_eq!(e.offset.is_some(), sel % 5 == 1);
            }
        }
        2 => {
            if let Ok((_, descs)) = parse_block_status(p) {
                assert_eq!(descs.len() * 8 + 4, p.len());
            }
        }
        3 => {
            if let Ok(b) = <[u8; 16]>::try_from(p) {
                let h = ChunkHeader::decode_rest(&b);
                assert_eq!(&h.encode()[4..], &b[..]);
            } else if let Ok(b) = <[u8; 12]>::try_from(p) {
                let r = SimpleReply::decode_rest(&b);
                assert_eq!(&r.encode()[4..], &b[..]);
            }
        }
        _ => {
            if let Ok(b) = <[u8; REQUEST_LEN]>::try_from(p)
                && let Ok(r) = Request::decode(&b)
            {
                assert_eq!(r.encode(), b);
            }
        }
    }
});
