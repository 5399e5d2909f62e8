//! The NBD client against a scripted server: the input (after a first byte picking how many
//! bytes each socket read returns) is everything the server sends — greeting, option replies
//! (structured replies, meta contexts, GO with export and block size info), then simple and
//! structured replies to a READ and to BLOCK_STATUS requests. The client must never panic,
//! hang, or hand back anything but what it asked for.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmr_nbd::{BASE_ALLOCATION, ConnectOptions, NbdClient};
use vmreplica_fuzz::{DIRTY_CONTEXT, Scripted, block_on_fresh};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, script)) = data.split_first() else {
        return;
    };
    let step = [1usize, 3, 16, 4096][usize::from(sel % 4)];
    let opts = ConnectOptions {
        export: "vmr-fuzz".into(),
        meta_contexts: vec![BASE_ALLOCATION.into(), DIRTY_CONTEXT.into()],
        max_in_flight: 4,
        timeout: Duration::from_secs(5),
    };
    block_on_fresh(async move {
        let Ok(c) = NbdClient::connect_stream(Scripted::new(script, step), opts).await else {
            return;
        };
        let size = c.size();
        assert!(size <= i64::MAX as u64);
        let bs = c.block_size();
        assert!(bs.minimum.is_power_of_two() && bs.maximum >= bs.minimum);
        assert!(c.max_request() <= vmr_nbd::MAX_REQUEST_CAP);
        let len = size.min(8192).min(u64::from(c.max_request())) as u32;
        let want = size.min(1 << 20);
        // All three requests are registered (cookies 1, 2, 3) before the reader task runs, so
        // replies in the script can answer any of them in any order.
        let (read, base, dirty) = tokio::join!(
            c.read(0, len),
            c.block_status_range(BASE_ALLOCATION, 0, want),
            c.block_status_range(DIRTY_CONTEXT, 0, want),
        );
        if let Ok(b) = read {
            assert_eq!(b.len(), len as usize, "read returned another length");
        }
        for ext in [base, dirty].into_iter().flatten() {
            let mut pos = 0;
            for x in &ext {
                assert_eq!(x.offset, pos, "status extents do not tile the range");
                assert!(x.length > 0);
                pos += x.length;
            }
            assert_eq!(pos, want, "status extents do not cover the range");
        }
    });
});
