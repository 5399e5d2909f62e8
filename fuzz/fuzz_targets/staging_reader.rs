//! The staging/export file reader (`c<id>.stage`: staged cycles and exported initial copies
//! that `vmreplica import` loads) on arbitrary bytes. Must never panic nor allocate beyond
//! its caps; after a valid trailer it keeps answering `None`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmreplica_fuzz::read_stage(data);
});
