//! End-to-end failover network settings with real agents and a qemu-storage-daemon stand-in:
//! `vm set --failover-*` on the replica and on the primary (any state), their validation,
//! `status` showing them, `--replica-network-args` replacing the definition's network run for a
//! real failover (and not for a test failover), and the outcome line of `failover start` when
//! the definition has no guest agent channel. The guest side (a real guest configuring its
//! interface) is in `real_guest.rs`.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::api::FailoverResult;

#[test]
fn failover_network_settings_are_kept_per_host_and_used_by_a_real_failover() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "net1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("net1", &["--frequency", "5s"])?;
    vm.write_random("disk0", 8, 3)?;
    p.wait_cycle("net1", 1, Duration::from_secs(90))?;

    // Bad values: usage errors (exit 2), nothing recorded.
    for bad in [
        &["--failover-ip", "10.2.0.5"][..],
        &["--failover-ip", "10.2.0.5/33"],
        &["--failover-gateway", "10.2.0.1"],
        &[
            "--failover-ip",
            "10.2.0.5/24",
            "--failover-gateway",
            "fd00::1",
        ],
        &["--failover-ip", "52:54:00:zz:00:01=10.2.0.5/24"],
    ] {
        let mut a = vec!["vm", "set", "net1"];
        a.extend_from_slice(bad);
        let out = p.b.cli(&a)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        // Refused by the settings' own check, not by the argument parser.
        assert!(
            err.contains("address") || err.contains("gateway") || err.contains("MAC"),
            "{bad:?}: {err}"
        );
    }
    assert!(p.b.status("net1")?.failover_network.is_none());

    // On the replica VM, while it replicates; no question asked (not a registration change).
    let said = p.b.ok(&[
        "vm",
        "set",
        "net1",
        "--failover-ip",
        "10.2.0.5/24",
        "--failover-ip",
        "fd00::5/64",
        "--failover-gateway",
        "10.2.0.1",
        "--failover-dns",
        "10.2.0.2",
        "--replica-network-args",
        "--object throttle-group,id=dr0,x-bps-total=0",
    ])?;
    assert!(said.contains("10.2.0.5/24"), "{said}");
    let st = p.b.status("net1")?;
    let f = st.failover_network.expect("shown");
    assert_eq!(f.interfaces.len(), 1);
    assert_eq!(f.interfaces[0].addresses.len(), 2);
    assert_eq!(
        f.network_args.as_deref(),
        Some(
            &[
                "--object".to_owned(),
                "throttle-group,id=dr0,x-bps-total=0".to_owned()
            ][..]
        )
    );
    let text = p.b.ok(&["measure", "net1"])?;
    assert!(
        text.contains("FailoverNetwork           : the only interface: 10.2.0.5/24"),
        "{text}"
    );

    // On the primary too, while replication is enabled (for a failover back to it).
    p.a.ok(&["vm", "set", "net1", "--failover-ip", "10.1.0.5/24"])?;
    assert_eq!(
        p.a.status("net1")?
            .failover_network
            .expect("primary's")
            .interfaces[0]
            .addresses[0]
            .to_string(),
        "10.1.0.5/24"
    );
    // A registration change is still refused while replication is enabled.
    let out =
        p.a.cli(&["vm", "set", "net1", "--qmp", "/nonexistent.qmp", "--yes"])?;
    assert_eq!(out.status.code(), Some(5));

    // A test failover: no replacement network, no settings applied.
    let t: FailoverResult =
        serde_json::from_str(&p.b.ok(&["failover", "test", "net1", "--json"])?)?;
    assert!(!t.message.contains("dr0"), "{}", t.message);
    assert!(t.network.is_empty());
    p.b.ok(&["failover", "stop-test", "net1"])?;

    // A real failover (the primary still runs: --force): started with this host's network
    // arguments; without a {qga} channel the settings cannot be applied and it says so.
    let r: FailoverResult =
        serde_json::from_str(&p.b.ok(&["failover", "start", "net1", "--force", "--json"])?)?;
    assert!(r.message.contains("throttle-group,id=dr0"), "{}", r.message);
    assert_eq!(r.network.len(), 1, "{:?}", r.network);
    assert!(
        r.network[0].contains("no guest agent channel"),
        "{:?}",
        r.network
    );
    assert!(r.pid.is_some());

    // Cleared: nothing shown any more.
    p.b.ok(&[
        "vm",
        "set",
        "net1",
        "--failover-clear",
        "--replica-network-args",
        "",
    ])?;
    assert!(p.b.status("net1")?.failover_network.is_none());
    p.b.ok(&["failover", "cancel", "net1"])?;
    Ok(())
}
