//! The replica store's catalog decoder (`catalog.json`). Anything it accepts re-encodes to
//! bytes it accepts again as the same catalog; any catalog value (structure fuzzed through its
//! JSON) with ascending point ids survives encode → decode unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmr_proto::store::Catalog;
use vmr_store::catalog::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("catalog.json");
    if let Ok(c) = decode(data, path) {
        let again = encode(&c).unwrap_or_else(|e| panic!("accepted catalog does not encode: {e}"));
        assert_eq!(decode(&again, path).ok(), Some(c));
    }
    if let Ok(c) = serde_json::from_slice::<Catalog>(data) {
        let bytes = encode(&c).unwrap_or_else(|e| panic!("catalog does not encode: {e}"));
        let ascending = c.points.windows(2).all(|w| w[0].id < w[1].id);
        match decode(&bytes, path) {
            Ok(d) => assert_eq!(d, c),
            Err(e) => assert!(!ascending, "an encoded catalog is refused: {e}"),
        }
    }
});
