//! The control-socket request parser (`vmr_proto::api::Request::from_line`, what the agent
//! runs on every line a local client sends), and the VM definition TOML a `vm add` request
//! carries. Every parsed request survives to_line → from_line unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmr_proto::VmDefinition;
use vmr_proto::api::Request;

fuzz_target!(|data: &[u8]| {
    // The agent reads UTF-8 lines (an invalid one ends the connection).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Ok(req) = Request::from_line(line) else {
            continue;
        };
        let again = req
            .to_line()
            .unwrap_or_else(|e| panic!("parsed request does not encode: {e}"));
        assert!(!again.contains('\n'), "an encoded request spans lines");
        assert_eq!(Request::from_line(&again).ok(), Some(req.clone()));
        if let Request::VmAdd { launch_toml, .. } = &req {
            let _ = VmDefinition::from_toml(launch_toml);
        }
    }
});
