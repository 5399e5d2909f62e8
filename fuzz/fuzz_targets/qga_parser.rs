//! The guest agent client's parser of guest output (untrusted: the guest controls every
//! byte): fed in chunks of a size the first byte picks, it must never panic, never buffer more
//! than one bounded message plus a chunk, and every message it returns must be a JSON value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmr_capture::qga::{MAX_MESSAGE, Parser};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let step = [1usize, 7, 64, 4096][usize::from(sel % 4)];
    let mut p = Parser::new();
    for chunk in bytes.chunks(step) {
        p.push(chunk);
        // every call consumes bytes or ends with Ok(None): this loop ends
        while !matches!(p.next_item(), Ok(None)) {}
        assert!(p.buffered() <= MAX_MESSAGE + step);
    }
});
