//! The typed peer call decoders: `PeerRequest::decode` (a replica decodes every protocol-2
//! call body with it), `PeerResponse::decode` (a primary decodes every answer) and the
//! protocol-1 mapping `PeerRequest::from_v1`. Whatever decodes survives encode → decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmr_proto::peer::{PeerRequest, PeerResponse};

const METHODS: [&str; 6] = [
    "create-replica",
    "replica-info",
    "primary-vm-state",
    "become-replica",
    "resync-hashes",
    "unknown",
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            if let Ok(r) = PeerRequest::decode(body) {
                assert_eq!(PeerRequest::decode(&r.encode()).ok(), Some(r));
            }
        }
        1 => {
            if let Ok(r) = PeerResponse::decode(body) {
                assert_eq!(PeerResponse::decode(&r.encode()).ok(), Some(r));
            }
        }
        _ => {
            let method = METHODS[usize::from(sel / 3) % METHODS.len()];
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
                return;
            };
            if let Ok(r) = PeerRequest::from_v1(method, v) {
                let (m, v) = r.to_v1();
                assert_eq!(m, method);
                assert_eq!(PeerRequest::from_v1(m, v).ok(), Some(r));
            }
        }
    }
});
