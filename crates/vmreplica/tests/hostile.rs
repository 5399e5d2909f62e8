//! Hostile and broken input on the peer API of real agents, at the HTTP level: an authorized
//! but misbehaving caller (its own identity, allowed with `server allow`) sends what a correct
//! primary never would. Cycles that can never be applied and invalid `create-replica` calls
//! are refused with 400 before anything is acknowledged or written, and the VM is not stuck
//! afterwards; `primary-vm-state` answers only the VM's own replica (403 otherwise).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use uuid::Uuid;
use vmr_proto::api::CreateReplica;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo};
use vmr_transport::{Client, ClientOptions, Identity, RemoteError, TransportError};

const LONG: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A caller with its own identity in `dir`, allowed on `agent` as `name` in `trust_group`.
fn intruder(agent: &Agent, dir: &std::path::Path, name: &str, trust_group: &str) -> Identity {
    let id = Identity::generate(dir, name).expect("identity");
    agent
        .ok(&[
            "server",
            "allow",
            "--primary",
            name,
            "--fingerprint",
            id.fingerprint(),
            "--trust-group",
            trust_group,
            "--storage",
            &agent.storage().display().to_string(),
        ])
        .expect("server allow");
    id
}

async fn connect(agent: &Agent, id: &Identity) -> Client {
    Client::connect(
        &agent.addr,
        id,
        &agent.fingerprint,
        ClientOptions::default(),
    )
    .await
    .expect("connect")
}

fn expect_400<T: std::fmt::Debug>(what: &str, r: Result<T, TransportError>) {
    match r {
        Err(TransportError::Remote(e @ RemoteError::BadRequest { .. })) => {
            assert_eq!(e.status_code(), 400, "{what}");
            assert!(!e.is_retryable(), "{what}");
        }
        other => panic!("{what}: expected 400 BadRequest, got {other:?}"),
    }
}

#[test]
fn unapplicable_cycles_and_invalid_calls_are_400_and_nothing_sticks() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "h1", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("h1", &["--frequency", "5s"])?;
    p.wait_cycle("h1", 1, LONG)?;
    let last = p.b.status("h1")?.last_cycle.unwrap_or(0);
    // In the VM's trust group (the primary's name is its default): a stolen key, or a bug.
    let keys = p.root.path().join("intruder");
    let id = intruder(&p.b, &keys, "host-x", "host-a");
    let uuid = vm.def.uuid;
    let header = |id: u64, base: Option<u64>, size: u64| CycleHeader {
        vm: uuid,
        id,
        base,
        kind: if base.is_some() {
            CycleKind::Incremental
        } else {
            CycleKind::Full
        },
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: 1,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size,
        }],
        group: None,
    };
    runtime().block_on(async {
        let c = connect(&p.b, &id).await;
        for (what, h) in [
            ("disk size 2^63", header(last + 1, Some(last), 1 << 63)),
            ("cycle id u64::MAX", header(u64::MAX, Some(last), 16 << 20)),
            ("full cycle id u64::MAX", header(u64::MAX, None, 16 << 20)),
        ] {
            let body = vmr_transport::testing::encode_cycle(&h, Vec::new(), None)
                .await
                .expect("encode");
            expect_400(what, c.send_raw_cycle(Bytes::from(body)).await);
        }
        // A body that ends before its End frame.
        let body = vmr_transport::testing::encode_cycle(
            &header(last + 1, Some(last), 16 << 20),
            Vec::new(),
            None,
        )
        .await
        .expect("encode");
        expect_400(
            "body without End frame",
            c.send_raw_cycle(Bytes::copy_from_slice(&body[..body.len() - 8]))
                .await,
        );
        // create-replica with no disks, an invalid disk id, an invalid definition.
        let other = Uuid::from_u128(0x5eed);
        let create = |disks: &[&str], toml: String| CreateReplica {
            launch_toml: toml,
            uuid: other,
            name: "intruded".into(),
            disks: disks
                .iter()
                .map(|d| DiskInfo {
                    id: (*d).into(),
                    size: 0,
                })
                .collect(),
            frequency_secs: 30,
            recovery_points: 0,
            retain: None,
            auto_failover: None,
        };
        let mut def = vm.def.clone();
        def.uuid = other;
        def.name = "intruded".into();
        let good_toml = def.to_toml();
        expect_400(
            "no disks",
            c.create_replica(create(&[], good_toml.clone())).await,
        );
        expect_400(
            "invalid disk id",
            c.create_replica(create(&["../../x"], good_toml.clone()))
                .await,
        );
        expect_400(
            "invalid definition",
            c.create_replica(create(&["disk0"], "this is [not toml".into()))
                .await,
        );
        expect_400(
            "definition of another VM",
            c.create_replica(create(&["disk0"], vm.def.to_toml())).await,
        );
        // The same for the existing VM (a refresh): refused before anything changes.
        let mut refresh = create(&["disk0"], "[broken".into());
        refresh.uuid = uuid;
        refresh.name = "h1".into();
        expect_400(
            "refresh with an invalid definition",
            c.create_replica(refresh).await,
        );
    });
    // Nothing was acknowledged or recorded, and the VM goes on.
    assert_eq!(p.b.status("h1")?.last_cycle, Some(last));
    assert!(
        p.b.statuses(Some("intruded"))
            .map_or(true, |v| v.is_empty())
    );
    p.wait_cycle("h1", last + 1, LONG)?;
    let st = p.b.status("h1")?;
    assert!(st.last_cycle.unwrap_or(0) > last, "{st:?}");
    Ok(())
}

#[test]
fn primary_vm_state_answers_only_the_vms_replica() -> TestResult {
    let p = Pair::new(exe())?;
    p.a.allow(&p.b)?; // the replica may probe the primary (split-brain guard)
    let vm = StandIn::create(p.root.path(), &p.a, "h2", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("h2", &["--frequency", "30s"])?;
    let keys = p.root.path().join("intruder");
    // Another agent, authorized on the primary but in another trust group.
    let id = intruder(&p.a, &keys, "host-x", "other");
    let replica_id = Identity::load(&p.b.dir)?;
    runtime().block_on(async {
        let c = connect(&p.a, &id).await;
        match c.primary_vm_state(vm.def.uuid).await {
            Err(TransportError::Remote(e @ RemoteError::TrustGroup { .. })) => {
                assert_eq!(e.status_code(), 403);
            }
            other => panic!("expected 403, got {other:?}"),
        }
        // The VM's replica is answered.
        let c = connect(&p.a, &replica_id).await;
        let st = c
            .primary_vm_state(vm.def.uuid)
            .await
            .expect("the replica's probe");
        assert!(st.running, "{st:?}");
    });
    Ok(())
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// 500 raw TCP connections from one address that never complete a TLS handshake: the agent
/// closes all but a few at once (its fd count stays bounded) and replication goes on.
#[test]
fn a_connection_flood_is_bounded_and_the_primary_gets_through() -> TestResult {
    let p = Pair::new(exe())?;
    let vm = StandIn::create(p.root.path(), &p.a, "h3", &["disk0"], 16)?;
    vm.register(&p.a)?;
    p.enable("h3", &["--frequency", "5s"])?;
    p.wait_cycle("h3", 1, LONG)?;
    let pid = p.b.pid();
    let before = fd_count(pid);
    let addr: std::net::SocketAddr = p.b.addr.parse()?;
    let mut socks = Vec::new();
    for _ in 0..500 {
        let s = socket2_connect(addr)?;
        socks.push(s);
    }
    // Wait (bounded) until the agent closed what it does not hold.
    let t0 = std::time::Instant::now();
    let mut closed = 0;
    while t0.elapsed() < Duration::from_secs(5) {
        closed = socks.iter().filter(|s| closed_by_peer(s)).count();
        if closed >= 500 - 64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = fd_count(pid);
    eprintln!(
        "agent fds: {before} before, {during} with 500 connections open ({closed} closed by the agent)"
    );
    assert!(
        during <= before + 64 + 16,
        "{during} fds with 500 connections open (was {before})"
    );
    // The primary gets through meanwhile.
    let last = p.b.status("h3")?.last_cycle.unwrap_or(0);
    p.wait_cycle("h3", last + 1, LONG)?;
    drop(socks);
    Ok(())
}

/// A blocking TCP connection from 127.0.0.9 (another source than the primary's 127.0.0.1).
fn socket2_connect(addr: std::net::SocketAddr) -> TestResult<std::net::TcpStream> {
    let rt = runtime();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind("127.0.0.9:0".parse().expect("addr"))?;
        sock.connect(addr).await
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The peer closed (or reset) the connection.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}
