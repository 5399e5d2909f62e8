//! The staging/export reader's records and trailer behind a valid header (the header's BLAKE3
//! checksum would stop almost every mutation before the records otherwise).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_fuzz::{fixed_header, read_stage, staging_header};

fuzz_target!(|data: &[u8]| {
    let mut file = staging_header(&fixed_header());
    file.extend_from_slice(data);
    read_stage(&file);
});
