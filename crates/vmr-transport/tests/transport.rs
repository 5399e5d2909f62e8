//! End-to-end tests over real sockets on 127.0.0.1 with real mutual TLS and generated identities.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tempfile::TempDir;
use tokio::sync::{Barrier, mpsc, oneshot, watch};
use uuid::Uuid;
use vmr_proto::api::{BlockHashesRequest, CreateReplica, ReplicaVmInfo, ReplicationState};
use vmr_proto::peer::{BlockHashes, PrimaryVmState};
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_transport::{
    Client, ClientOptions, ConnLimits, CycleAck, ExtentStream, Handler, Identity,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Peer, PeerList, PeerRequest, PeerResponse, RemoteError,
    Server, TransportError,
};

/// The VM uuid the test handler does not know.
const UNKNOWN_VM: Uuid = Uuid::nil();
/// The VM uuid whose calls make the test handler panic.
const PANIC_VM: Uuid = Uuid::from_u128(0xdead);

/// What the handler saw of one cycle.
#[derive(Debug)]
enum Outcome {
    Done {
        header: CycleHeader,
        extents: Vec<Extent>,
        count: u64,
        /// The checksum scheme of every extent received.
        schemes: Vec<vmr_proto::ChecksumScheme>,
    },
    Failed(TransportError),
}

struct TestHandler {
    cycles: AtomicU64,
    calls: AtomicU64,
    /// Number of extents the handler has pulled so far, over all cycles.
    seen: watch::Sender<u64>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    barrier: Barrier,
}

impl Handler for TestHandler {
    async fn receive_cycle(
        &self,
        peer: &Peer,
        header: CycleHeader,
        mut extents: ExtentStream,
    ) -> Result<CycleAck, RemoteError> {
        assert_eq!(peer.name, "primary");
        self.cycles.fetch_add(1, Ordering::SeqCst);
        if header.base == Some(999) {
            return Err(RemoteError::WrongBase {
                expected: Some(1),
                got: header.base,
            });
        }
        if (100..103).contains(&header.id) {
            self.barrier.wait().await;
        }
        let keep = header.id != 64;
        let mut kept = Vec::new();
        let mut schemes = Vec::new();
        let (mut count, mut bytes) = (0u64, 0u64);
        while let Some(item) = extents.next().await {
            match item {
                Ok(c) => {
                    let again = vmr_proto::CheckedExtent::compute(c.extent().clone(), c.scheme());
                    assert_eq!(again.checksum(), c.checksum());
                    schemes.push(c.scheme());
                    let e = c.into_extent();
                    self.seen.send_modify(|n| *n += 1);
                    count += 1;
                    bytes += e.len();
                    if keep {
                        kept.push(e);
                    }
                }
                Err(e) => {
                    let remote = e.to_remote();
                    let _ = self.outcomes.send(Outcome::Failed(e));
                    return Err(remote);
                }
            }
        }
        let ack = CycleAck {
            vm: header.vm,
            cycle: header.id,
            extents: count,
            bytes,
        };
        let _ = self.outcomes.send(Outcome::Done {
            header,
            extents: kept,
            count,
            schemes,
        });
        Ok(ack)
    }

    async fn call(&self, peer: &Peer, req: PeerRequest) -> Result<PeerResponse, RemoteError> {
        assert_eq!(peer.name, "primary");
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req {
            PeerRequest::PrimaryVmState { uuid } if uuid == UNKNOWN_VM => {
                Err(RemoteError::UnknownVm { vm: uuid })
            }
            PeerRequest::PrimaryVmState { uuid } if uuid == PANIC_VM => panic!("handler bug"),
            PeerRequest::PrimaryVmState { .. } => {
                Ok(PeerResponse::PrimaryVmState(PrimaryVmState {
                    state: ReplicationState::Replicating,
                    running: true,
                }))
            }
            // Where the connection came from: the last byte of the peer's IPv4 address.
            PeerRequest::ReplicaInfo(r) if r.listen.as_deref() == Some("whoami") => {
                let last = match peer.remote.map(|a| a.ip()) {
                    Some(std::net::IpAddr::V4(ip)) => u64::from(ip.octets()[3]),
                    other => panic!("peer address {other:?}"),
                };
                Ok(PeerResponse::ReplicaInfo(ReplicaVmInfo {
                    uuid: r.uuid,
                    latest: Some(last),
                    state: ReplicationState::Replicating,
                }))
            }
            // Echoes what arrived: the listen address's length as `latest`.
            PeerRequest::ReplicaInfo(r) => Ok(PeerResponse::ReplicaInfo(ReplicaVmInfo {
                uuid: r.uuid,
                latest: r.listen.map(|l| l.len() as u64),
                state: ReplicationState::Replicating,
            })),
            PeerRequest::CreateReplica(c) => Ok(PeerResponse::CreateReplica {
                created: c.name == "new",
            }),
            PeerRequest::ResyncHashes(r) => Ok(PeerResponse::ResyncHashes(BlockHashes {
                point: r.point.unwrap_or(5),
                point_disk_size: r.disk_size,
                hashes: (r.first_block..r.first_block + r.count)
                    .map(|b| *blake3::hash(&b.to_le_bytes()).as_bytes())
                    .collect(),
            })),
            PeerRequest::DisableReplica { .. } => Ok(PeerResponse::DisableReplica {
                state: ReplicationState::Disabled,
            }),
            PeerRequest::SourceVmState { .. } => Ok(PeerResponse::SourceVmState(
                vmr_proto::peer::SourceVmState {
                    state: ReplicationState::Replicating,
                    running: false,
                    upstream: Some(vmr_proto::peer::UpstreamProbe::Lost),
                },
            )),
            PeerRequest::ContinueFrom(r) => {
                Ok(PeerResponse::ContinueFrom(vmr_proto::peer::ContinuedFrom {
                    latest: r.point,
                    resync: false,
                    discarded: vec![r.point + 1],
                }))
            }
            PeerRequest::Witness { .. } => Ok(PeerResponse::Witness {
                lease: vmr_proto::lease::WitnessResponse::Unknown,
            }),
            PeerRequest::Promise { .. } => Ok(PeerResponse::Promise(
                vmr_proto::lease::PromiseResponse::Refused { taken_over: false },
            )),
            PeerRequest::Follow { .. } => {
                Ok(PeerResponse::Follow(vmr_proto::peer::ContinuedFrom {
                    latest: 9,
                    resync: true,
                    discarded: vec![],
                }))
            }
            // A handler bug: the answer of another call.
            PeerRequest::BecomeReplica(_) => Ok(PeerResponse::CreateReplica { created: true }),
        }
    }
}

struct Setup {
    _dirs: Vec<TempDir>,
    server_id: Identity,
    client_id: Identity,
    addr: SocketAddr,
    handler: Arc<TestHandler>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), TransportError>>,
}

impl Setup {
    async fn new() -> Setup {
        Setup::with_authorized(true).await
    }

    async fn with_authorized(authorize_client: bool) -> Setup {
        Setup::build(authorize_client, ConnLimits::default()).await
    }

    async fn build(authorize_client: bool, limits: ConnLimits) -> Setup {
        let sd = tempfile::tempdir().expect("tempdir");
        let cd = tempfile::tempdir().expect("tempdir");
        let server_id = Identity::generate(sd.path(), "replica").expect("server identity");
        let client_id = Identity::generate(cd.path(), "primary").expect("client identity");
        let mut peers = vec![Peer {
            name: "someone-else".into(),
            fingerprint: "SHA256:00".into(),
            trust_group: None,
            remote: None,
        }];
        if authorize_client {
            peers.push(Peer {
                name: "primary".into(),
                fingerprint: client_id.fingerprint().into(),
                trust_group: Some("tg1".into()),
                remote: None,
            });
        }
        let (tx, outcomes) = mpsc::unbounded_channel();
        let handler = Arc::new(TestHandler {
            cycles: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            seen: watch::Sender::new(0),
            outcomes: tx,
            barrier: Barrier::new(3),
        });
        let server = Server::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &server_id,
            Arc::new(PeerList(peers)),
            handler.clone(),
        )
        .await
        .expect("bind")
        .with_limits(limits);
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Setup {
            _dirs: vec![sd, cd],
            server_id,
            client_id,
            addr,
            handler,
            outcomes,
            stop: Some(stop),
            server,
        }
    }

    async fn client(&self) -> Client {
        self.client_speaking(PROTOCOL_VERSION)
            .await
            .expect("connect")
    }

    /// A client offering protocol `version`.
    async fn client_speaking(&self, version: u16) -> Result<Client, TransportError> {
        Client::connect(
            &self.addr.to_string(),
            &self.client_id,
            self.server_id.fingerprint(),
            ClientOptions {
                protocol: version,
                ..Default::default()
            },
        )
        .await
    }

    async fn outcome(&mut self) -> Outcome {
        tokio::time::timeout(Duration::from_secs(30), self.outcomes.recv())
            .await
            .expect("handler outcome in time")
            .expect("handler outcome")
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server run");
    }
}

/// Waits until the handler has pulled `n` extents over all cycles.
async fn pulled(seen: &mut watch::Receiver<u64>, n: u64) {
    tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|s| *s >= n))
        .await
        .expect("the receiver pulls extents in time")
        .expect("handler alive");
}

fn header(id: u64, base: Option<u64>) -> CycleHeader {
    CycleHeader {
        vm: Uuid::from_u128(0x1234),
        id,
        base,
        kind: if base.is_some() {
            CycleKind::Incremental
        } else {
            CycleKind::Full
        },
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: 1_700_000_000_000,
        disks: vec![
            DiskInfo {
                id: "vda".into(),
                size: 1 << 30,
            },
            DiskInfo {
                id: "vdb".into(),
                size: 8 << 20,
            },
            DiskInfo {
                id: "vdc".into(),
                size: 1 << 40,
            },
        ],
        group: None,
    }
}

/// Pseudo-random but compressible: first half zeros, second half xorshift noise.
fn data(len: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = seed | 1;
    for chunk in v[len / 2..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    Bytes::from(v)
}

fn mixed_extents() -> Vec<Extent> {
    vec![
        Extent {
            disk: 0,
            offset: 0,
            data: ExtentData::Data(data(1 << 20, 1)),
        },
        Extent {
            disk: 1,
            offset: 4096,
            data: ExtentData::Zero(1 << 20),
        },
        Extent {
            disk: 2,
            offset: 1 << 39,
            data: ExtentData::Zero(1 << 30),
        },
        Extent {
            disk: 1,
            offset: 2 << 20,
            data: ExtentData::Data(data(3 << 20, 2)),
        },
        Extent {
            disk: 0,
            offset: 512 << 20,
            data: ExtentData::Data(Bytes::from_static(b"x")),
        },
        Extent {
            disk: 2,
            offset: 0,
            data: ExtentData::Data(data(65536, 3)),
        },
    ]
}

fn ok_stream(v: Vec<Extent>) -> impl futures::Stream<Item = Result<Extent, std::io::Error>> {
    futures::stream::iter(v.into_iter().map(Ok))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_round_trip_compressed_and_plain() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    assert_eq!(client.hello().peer_name, "primary");
    assert_eq!(client.hello().trust_group.as_deref(), Some("tg1"));
    // A protocol-3 client (an agent not yet upgraded) sends stream version 1: whole-extent
    // checksums, one zstd stream; the upgraded receiver decodes both.
    let old = s.client_speaking(3).await.expect("a v3 client connects");
    assert_eq!(old.hello().protocol, 3);
    let cases = [
        (1u64, true, &client, vmr_proto::ChecksumScheme::Blocks),
        (2, false, &client, vmr_proto::ChecksumScheme::Blocks),
        (3, true, &old, vmr_proto::ChecksumScheme::Whole),
        (4, false, &old, vmr_proto::ChecksumScheme::Whole),
    ];
    for (id, compress, client, scheme) in cases {
        let h = header(id, if id == 1 { None } else { Some(1) });
        let ack = client
            .send_cycle(&h, ok_stream(mixed_extents()), compress)
            .await
            .expect("send");
        let total: u64 = mixed_extents().iter().map(Extent::len).sum();
        assert_eq!(
            ack,
            CycleAck {
                vm: h.vm,
                cycle: id,
                extents: 6,
                bytes: total
            }
        );
        match s.outcome().await {
            Outcome::Done {
                header,
                extents,
                count,
                schemes,
            } => {
                assert_eq!(header, h);
                assert_eq!(count, 6);
                assert_eq!(extents, mixed_extents());
                assert_eq!(schemes, vec![scheme; 6], "cycle {id}");
            }
            Outcome::Failed(e) => panic!("cycle {id} failed: {e}"),
        }
    }
    s.shutdown().await;
}

/// 64 MiB of 4 MiB extents from a generator: the receiver sees extents while the sender is
/// still producing, proving the body streams instead of being buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cycle_streams() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    for compress in [false, true] {
        let start = *s.handler.seen.borrow();
        let seen = s.handler.seen.subscribe();
        let produced_all = Arc::new(AtomicBool::new(false));
        let produced = produced_all.clone();
        let source = futures::stream::iter(0..16u64).then(move |i| {
            let mut seen = seen.clone();
            let produced = produced.clone();
            async move {
                if i == 15 {
                    // A streamed body reaches the receiver while the sender still produces: it
                    // has pulled ten extents before the last one exists. A buffered body would
                    // not arrive at all before then.
                    pulled(&mut seen, start + 10).await;
                    produced.store(true, Ordering::SeqCst);
                }
                let d = tokio::task::spawn_blocking(move || data(4 << 20, i + 10))
                    .await
                    .expect("source");
                Ok::<_, std::io::Error>(Extent {
                    disk: 0,
                    offset: i * (4 << 20),
                    data: ExtentData::Data(d),
                })
            }
        });
        let mut h = header(64, None);
        h.disks[0].size = 64 << 20;
        let ack = client.send_cycle(&h, source, compress).await.expect("send");
        assert_eq!(ack.extents, 16);
        assert_eq!(ack.bytes, 64 << 20);
        assert!(produced_all.load(Ordering::SeqCst));
        assert!(matches!(s.outcome().await, Outcome::Done { count: 16, .. }));
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_fingerprint_is_refused() {
    let s = Setup::new().await;
    let other = tempfile::tempdir().expect("tempdir");
    let impostor = Identity::generate(other.path(), "impostor").expect("identity");
    let r = Client::connect(
        &s.addr.to_string(),
        &s.client_id,
        impostor.fingerprint(),
        ClientOptions::default(),
    )
    .await;
    match r {
        Err(TransportError::PeerFingerprint { expected, got }) => {
            assert_eq!(expected, impostor.fingerprint());
            assert_eq!(got, s.server_id.fingerprint());
        }
        other => panic!("expected PeerFingerprint, got {other:?}"),
    }
    assert!(
        !TransportError::PeerFingerprint {
            expected: String::new(),
            got: String::new()
        }
        .is_retryable()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_certificate_is_refused() {
    let s = Setup::with_authorized(false).await;
    let r = Client::connect(
        &s.addr.to_string(),
        &s.client_id,
        s.server_id.fingerprint(),
        ClientOptions::default(),
    )
    .await;
    assert!(
        matches!(r, Err(TransportError::Remote(RemoteError::Unauthorized))),
        "expected Unauthorized, got {r:?}"
    );
    assert_eq!(s.handler.cycles.load(Ordering::SeqCst), 0);
    assert_eq!(s.handler.calls.load(Ordering::SeqCst), 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_frames_are_rejected() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    let h = header(5, Some(4));
    let body = vmr_transport::testing::encode_cycle(&h, mixed_extents(), None)
        .await
        .expect("encode");
    // The untouched body is accepted.
    client
        .send_raw_cycle(Bytes::from(body.clone()))
        .await
        .expect("clean body");
    assert!(matches!(s.outcome().await, Outcome::Done { count: 6, .. }));

    // A flipped data byte in the first extent: checksum mismatch, typed.
    let mut bad = body.clone();
    let pos = body.len() / 8;
    bad[pos] ^= 0x01;
    let r = client.send_raw_cycle(Bytes::from(bad)).await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(RemoteError::CorruptExtent {
                index: 0
            }))
        ),
        "{r:?}"
    );
    assert!(matches!(
        s.outcome().await,
        Outcome::Failed(TransportError::CorruptExtent { index: 0 })
    ));

    // A flipped length byte in the End frame: protocol error after all extents.
    let mut bad = body.clone();
    let n = bad.len();
    bad[n - 40] ^= 0x01;
    let r = client.send_raw_cycle(Bytes::from(bad)).await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(RemoteError::BadRequest { .. }))
        ),
        "{r:?}"
    );
    assert!(matches!(
        s.outcome().await,
        Outcome::Failed(TransportError::Protocol(_))
    ));

    // Garbage before the header never reaches the handler.
    let cycles = s.handler.cycles.load(Ordering::SeqCst);
    let r = client
        .send_raw_cycle(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"))
        .await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(RemoteError::BadRequest { .. }))
        ),
        "{r:?}"
    );
    assert_eq!(s.handler.cycles.load(Ordering::SeqCst), cycles);

    // Compressed stream with a flipped byte: corrupt extent or protocol error, never accepted.
    let zbody = vmr_transport::testing::encode_cycle(&h, mixed_extents(), Some(3))
        .await
        .expect("encode");
    let mut bad = zbody.clone();
    let pos = zbody.len() / 2;
    bad[pos] ^= 0x20;
    let r = client.send_raw_cycle(Bytes::from(bad)).await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(
                RemoteError::CorruptExtent { .. } | RemoteError::BadRequest { .. }
            ))
        ),
        "{r:?}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishing_mid_transfer_interrupts_the_handler() {
    let mut s = Setup::new().await;
    // (1) The sending side disappears entirely (task aborted, connection dropped).
    // The sender stops half way only once the receiver has pulled an extent: the transfer has
    // begun at the receiver's end.
    let client = s.client().await;
    let (half_tx, half_rx) = oneshot::channel::<()>();
    let mut half_tx = Some(half_tx);
    let start = *s.handler.seen.borrow();
    let seen = s.handler.seen.subscribe();
    let source = futures::stream::iter(0..32u64).then(move |i| {
        let signal = if i == 8 { half_tx.take() } else { None };
        let mut seen = seen.clone();
        async move {
            if let Some(tx) = signal {
                pulled(&mut seen, start + 1).await;
                let _ = tx.send(());
                futures::future::pending::<()>().await;
            }
            Ok::<_, std::io::Error>(Extent {
                disk: 0,
                offset: i << 20,
                data: ExtentData::Data(data(1 << 20, i)),
            })
        }
    });
    let task = tokio::spawn(async move {
        let h = header(7, Some(6));
        client.send_cycle(&h, source, true).await
    });
    half_rx.await.expect("half way");
    task.abort();
    match s.outcome().await {
        Outcome::Failed(TransportError::Interrupted {
            during: "request body",
            ..
        }) => {}
        other => panic!("expected Interrupted, got {other:?}"),
    }

    // (2) The extent source fails: the client reports it, the receiver discards. The source
    // fails only once the receiver has pulled an extent; a source failing before the request
    // left would leave the receiver nothing to discard.
    let client = s.client().await;
    let start = *s.handler.seen.borrow();
    let seen = s.handler.seen.subscribe();
    let source = futures::stream::iter(0..4u64).then(move |i| {
        let mut seen = seen.clone();
        async move {
            if i == 2 {
                pulled(&mut seen, start + 1).await;
                Err(std::io::Error::other("disk read failed"))
            } else {
                Ok(Extent {
                    disk: 0,
                    offset: i << 20,
                    data: ExtentData::Data(data(1 << 20, i)),
                })
            }
        }
    });
    let r = client.send_cycle(&header(8, Some(7)), source, false).await;
    assert!(matches!(r, Err(TransportError::Source(_))), "{r:?}");
    match s.outcome().await {
        Outcome::Failed(TransportError::Interrupted {
            during: "request body",
            ..
        }) => {}
        other => panic!("expected Interrupted, got {other:?}"),
    }
    // The connection is still usable.
    client
        .primary_vm_state(Uuid::from_u128(1))
        .await
        .expect("call after abort");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_typed_error_arrives_typed() {
    let s = Setup::new().await;
    let client = s.client().await;
    // The handler refuses before reading the (8 MiB) body.
    let extents: Vec<Extent> = (0..8u64)
        .map(|i| Extent {
            disk: 0,
            offset: i << 20,
            data: ExtentData::Data(data(1 << 20, i)),
        })
        .collect();
    let r = client
        .send_cycle(&header(1000, Some(999)), ok_stream(extents), true)
        .await;
    match r {
        Err(TransportError::Remote(RemoteError::WrongBase { expected, got })) => {
            assert_eq!((expected, got), (Some(1), Some(999)));
        }
        other => panic!("expected WrongBase, got {other:?}"),
    }
    let e = TransportError::Remote(RemoteError::WrongBase {
        expected: None,
        got: None,
    });
    assert!(!e.is_retryable());
    s.shutdown().await;
}

fn hashes_request(first_block: u64, count: u64) -> BlockHashesRequest {
    BlockHashesRequest {
        uuid: Uuid::from_u128(1),
        disk: "d0".into(),
        disk_size: 1 << 30,
        block_size: 1 << 16,
        first_block,
        count,
        point: Some(7),
        read: false,
    }
}

fn create_request(name: &str) -> CreateReplica {
    CreateReplica {
        launch_toml: "x = 1".into(),
        uuid: Uuid::from_u128(1),
        name: name.into(),
        disks: vec![DiskInfo {
            id: "d0".into(),
            size: 1 << 30,
        }],
        frequency_secs: 30,
        recovery_points: 0,
        retain: None,
        auto_failover: None,
    }
}

/// Every typed call and helper, its typed errors, and a handler that panics or answers the wrong
/// call; run by a client of each supported version (the version-1 client goes through the JSON
/// mapping on both sides).
async fn typed_calls(client: &Client) {
    let vm = Uuid::from_u128(1);
    let s = client.primary_vm_state(vm).await.expect("primary-vm-state");
    assert!(s.running);
    let info = client
        .replica_info(vm, Some("10.0.0.1:7000".into()))
        .await
        .expect("replica-info");
    assert_eq!((info.uuid, info.latest), (vm, Some(13)));
    let info = client.replica_info(vm, None).await.expect("replica-info");
    assert_eq!(info.latest, None);
    assert!(
        client
            .create_replica(create_request("new"))
            .await
            .expect("create")
    );
    assert!(
        !client
            .create_replica(create_request("old"))
            .await
            .expect("create")
    );
    let h = client
        .resync_hashes(hashes_request(100, 4096))
        .await
        .expect("resync-hashes");
    assert_eq!(
        (h.point, h.point_disk_size, h.hashes.len()),
        (7, 1 << 30, 4096)
    );
    assert_eq!(h.hashes[3], *blake3::hash(&103u64.to_le_bytes()).as_bytes());
    let r = client.primary_vm_state(UNKNOWN_VM).await;
    assert!(
        matches!(r, Err(TransportError::Remote(RemoteError::UnknownVm { vm })) if vm == UNKNOWN_VM),
        "{r:?}"
    );
    let r = client.primary_vm_state(PANIC_VM).await;
    assert!(
        matches!(r, Err(TransportError::Remote(RemoteError::Internal { .. }))),
        "{r:?}"
    );
    // The server refuses a handler answer of another call.
    let r = client
        .become_replica(vmr_proto::api::BecomeReplica {
            uuid: vm,
            point: 1,
            taken_at_ms: 2,
            launch_toml: String::new(),
            disks: vec![],
        })
        .await;
    assert!(
        matches!(r, Err(TransportError::Remote(RemoteError::Internal { ref message })) if message.contains("create-replica")),
        "{r:?}"
    );
    // The connection survives a panicking handler.
    client.primary_vm_state(vm).await.expect("call after panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_call_round_trip() {
    let s = Setup::new().await;
    let client = s.client().await;
    assert_eq!(client.hello().protocol, PROTOCOL_VERSION);
    typed_calls(&client).await;
    // A body that does not parse is a typed bad request.
    for body in [&b"\x05\0\0\0{}"[..], b"{\"method\":\"replica-info\"}", b""] {
        let r = client
            .send_raw_call(
                "/v2/call",
                Some(PROTOCOL_VERSION),
                "application/vnd.vmreplica.peer",
                Bytes::copy_from_slice(body),
            )
            .await;
        assert!(
            matches!(
                r,
                Err(TransportError::Remote(RemoteError::BadRequest { .. }))
            ),
            "{r:?}"
        );
    }
    s.shutdown().await;
}

/// `disable-replica` exists from protocol 3 on: sent on a connection that speaks it, never on
/// an older one (an older agent would answer 400: it does not know the call), where the typed
/// client answers "not supported" without a request.
/// `source-vm-state` and `continue-from` are sent only on connections of protocol 5 or later:
/// on an older one `source_vm_state` answers `None` and `continue_from` a protocol error,
/// neither sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_calls_only_on_connections_that_have_them() {
    let s = Setup::new().await;
    let vm = Uuid::from_u128(1);
    let client = s.client().await;
    let st = client.source_vm_state(vm).await.expect("v5 call");
    assert_eq!(
        st.and_then(|v| v.upstream),
        Some(vmr_proto::peer::UpstreamProbe::Lost)
    );
    let c = client.continue_from(vm, 7).await.expect("v5 call");
    assert_eq!((c.latest, c.discarded), (7, vec![8]));
    let old = s
        .client_speaking(4)
        .await
        .expect("an older client connects");
    let before = s.handler.calls.load(Ordering::SeqCst);
    assert_eq!(old.source_vm_state(vm).await.expect("not sent"), None);
    assert!(matches!(
        old.continue_from(vm, 7).await,
        Err(TransportError::PeerTooOld { needs: 5, .. })
    ));
    assert_eq!(
        s.handler.calls.load(Ordering::SeqCst),
        before,
        "v4 sent one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_replica_only_on_connections_that_have_it() {
    let s = Setup::new().await;
    let vm = Uuid::from_u128(1);
    let client = s.client().await;
    let before = s.handler.calls.load(Ordering::SeqCst);
    assert_eq!(
        client.disable_replica(vm).await.expect("v3 call"),
        Some(ReplicationState::Disabled)
    );
    assert_eq!(s.handler.calls.load(Ordering::SeqCst), before + 1);
    for v in [1, 2] {
        let old = s
            .client_speaking(v)
            .await
            .expect("an older client connects");
        assert_eq!(old.hello().protocol, v);
        let before = s.handler.calls.load(Ordering::SeqCst);
        assert_eq!(old.disable_replica(vm).await.expect("not sent"), None);
        assert_eq!(
            s.handler.calls.load(Ordering::SeqCst),
            before,
            "v{v} sent it"
        );
    }
    // What a version-2 agent answers to a method it does not know: a typed bad request.
    let r = client
        .send_raw_call(
            "/v2/call",
            Some(PROTOCOL_VERSION),
            "application/vnd.vmreplica.peer",
            vmr_proto::peer::encode_body(b"{\"method\":\"no-such-call\",\"uuid\":\"x\"}", &[])
                .into(),
        )
        .await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(RemoteError::BadRequest { .. }))
        ),
        "{r:?}"
    );
    s.shutdown().await;
}

/// Continuous mode (`create-replica` with frequency 0) goes only to a replica whose protocol
/// knows it; an older one (which would take 0 s for an interval) is never asked, and the
/// client says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_create_replica_only_on_connections_that_have_it() {
    let s = Setup::new().await;
    let continuous = CreateReplica {
        frequency_secs: vmr_proto::api::FREQUENCY_CONTINUOUS,
        ..create_request("new")
    };
    let client = s.client().await;
    let before = s.handler.calls.load(Ordering::SeqCst);
    assert!(
        client
            .create_replica(continuous.clone())
            .await
            .expect("a current replica knows continuous mode")
    );
    assert_eq!(s.handler.calls.load(Ordering::SeqCst), before + 1);
    for v in MIN_PROTOCOL_VERSION..vmr_proto::wire::CONTINUOUS_SINCE {
        let old = s
            .client_speaking(v)
            .await
            .expect("an older client connects");
        let before = s.handler.calls.load(Ordering::SeqCst);
        let e = old
            .create_replica(continuous.clone())
            .await
            .expect_err("refused on an older connection");
        assert!(
            matches!(
                e,
                TransportError::PeerTooOld { peer, needs, .. }
                    if peer == v && needs == vmr_proto::wire::CONTINUOUS_SINCE
            ),
            "v{v}: {e:?}"
        );
        assert!(e.to_string().contains("continuous"), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(
            s.handler.calls.load(Ordering::SeqCst),
            before,
            "v{v} sent it"
        );
        // An interval still goes to an older replica.
        old.create_replica(create_request("old"))
            .await
            .expect("an interval on an older connection");
    }
    s.shutdown().await;
}

/// A version-1 agent (old primary) calling a version-2 agent (upgraded replica) during a rolling
/// upgrade: hello, the JSON calls by method name with hex hashes, and the typed client pinned to
/// version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_client_and_v2_server() {
    let s = Setup::new().await;
    let client = s.client_speaking(1).await.expect("a v1 client connects");
    assert_eq!(client.hello().protocol, 1);
    typed_calls(&client).await;
    // The exact JSON a version-1 agent sends and reads.
    let vm = Uuid::from_u128(1);
    let raw = |method: &str, body: serde_json::Value| {
        let path = format!("/v1/call/{method}");
        let c = client.clone();
        async move {
            let b = c
                .send_raw_call(&path, Some(1), "application/json", body.to_string().into())
                .await?;
            Ok::<serde_json::Value, TransportError>(
                serde_json::from_slice(&b).expect("json answer"),
            )
        }
    };
    let v = raw(
        "replica-info",
        serde_json::json!({ "uuid": vm, "listen": "h:1" }),
    )
    .await
    .expect("replica-info");
    assert_eq!(
        v,
        serde_json::json!({ "uuid": vm, "latest": 3, "state": "Replicating" })
    );
    let v = raw("primary-vm-state", serde_json::json!({ "uuid": vm }))
        .await
        .expect("primary-vm-state");
    assert_eq!(
        v,
        serde_json::json!({ "state": "Replicating", "running": true })
    );
    let v = raw(
        "resync-hashes",
        serde_json::to_value(hashes_request(0, 2)).expect("json"),
    )
    .await
    .expect("resync-hashes");
    let hex: String = blake3::hash(&0u64.to_le_bytes()).to_hex().to_string()
        + blake3::hash(&1u64.to_le_bytes()).to_hex().as_str();
    assert_eq!(
        v,
        serde_json::json!({ "point": 7, "point_disk_size": 1u64 << 30, "hashes": hex })
    );
    for (method, body) in [
        ("nope", serde_json::json!({})),
        ("replica-info", serde_json::json!({ "uuid": "not-a-uuid" })),
        ("primary-vm-state", serde_json::json!(null)),
    ] {
        let r = raw(method, body).await;
        assert!(
            matches!(
                r,
                Err(TransportError::Remote(RemoteError::BadRequest { .. }))
            ),
            "{method}: {r:?}"
        );
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_versions_are_refused() {
    let s = Setup::new().await;
    for v in [MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        match s.client_speaking(v).await {
            Err(TransportError::Remote(e @ RemoteError::ProtocolVersion { got, min, max })) => {
                assert_eq!(
                    (got, min, max),
                    (Some(v), MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
                );
                assert_eq!(
                    e.to_string(),
                    format!(
                        "protocol version {v} not supported: the remote agent speaks versions 1 to {PROTOCOL_VERSION}"
                    )
                );
            }
            other => panic!("version {v}: expected ProtocolVersion, got {other:?}"),
        }
    }
    // A call without (or with a garbled) version header is refused too, and reaches no handler.
    let client = s.client().await;
    let before = s.handler.calls.load(Ordering::SeqCst);
    let body = PeerRequest::PrimaryVmState {
        uuid: Uuid::from_u128(1),
    }
    .encode();
    for version in [None, Some(PROTOCOL_VERSION + 1)] {
        let r = client
            .send_raw_call(
                "/v2/call",
                version,
                "application/vnd.vmreplica.peer",
                body.clone().into(),
            )
            .await;
        assert!(
            matches!(
                r,
                Err(TransportError::Remote(RemoteError::ProtocolVersion { got, .. })) if got == version
            ),
            "{r:?}"
        );
    }
    assert_eq!(s.handler.calls.load(Ordering::SeqCst), before);
    let ok = client
        .send_raw_call(
            "/v2/call",
            Some(PROTOCOL_VERSION),
            "application/vnd.vmreplica.peer",
            body.into(),
        )
        .await
        .expect("the same call with the version header");
    assert!(matches!(
        PeerResponse::decode(&ok),
        Ok(PeerResponse::PrimaryVmState(_))
    ));
    s.shutdown().await;
}

/// Three cycles whose handlers wait for each other, plus calls, all on one connection: this
/// only completes if the streams really run concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_one_connection() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    let mut tasks = Vec::new();
    for id in 100..103u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.send_cycle(
                &header(id, Some(id - 1)),
                ok_stream(mixed_extents()),
                id % 2 == 0,
            )
            .await
            .map(|a| a.cycle)
        }));
    }
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.primary_vm_state(Uuid::from_u128(i + 1)).await })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks))
        .await
        .expect("concurrent cycles finish");
    let mut ids: Vec<u64> = results
        .into_iter()
        .map(|r| r.expect("task").expect("cycle"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![100, 101, 102]);
    for c in calls {
        c.await.expect("task").expect("call");
    }
    for _ in 0..3 {
        assert!(matches!(s.outcome().await, Outcome::Done { count: 6, .. }));
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_typed_and_retryable() {
    let d = tempfile::tempdir().expect("tempdir");
    let id = Identity::generate(d.path(), "primary").expect("identity");
    // Nobody listening.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let r = Client::connect(
        &addr.to_string(),
        &id,
        id.fingerprint(),
        ClientOptions::default(),
    )
    .await;
    match r {
        Err(e @ TransportError::Connect { .. }) => assert!(e.is_retryable()),
        other => panic!("expected Connect, got {other:?}"),
    }
    // A listener that never speaks TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let opts = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let r = Client::connect(
        &silent.local_addr().expect("addr").to_string(),
        &id,
        id.fingerprint(),
        opts,
    )
    .await;
    match r {
        Err(e @ TransportError::Timeout(_)) => assert!(e.is_retryable()),
        other => panic!("expected Timeout, got {other:?}"),
    }
}

/// Headers that can never be applied are refused with a 400 (not retryable) before the handler
/// sees them; a correct cycle afterwards is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unapplicable_headers_are_refused_before_the_handler() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    let mut huge_disk = header(5, Some(4));
    huge_disk.disks[0].size = 1 << 63;
    let max_id = header(u64::MAX, Some(4));
    let mut no_disks = header(5, Some(4));
    no_disks.disks.clear();
    let mut bad_disk_id = header(5, Some(4));
    bad_disk_id.disks[1].id = "../../etc".into();
    let mut repeated = header(5, Some(4));
    repeated.disks[1].id = "vda".into();
    let base_not_older = header(5, Some(5));
    let cycles = s.handler.cycles.load(Ordering::SeqCst);
    for h in [
        huge_disk,
        max_id,
        no_disks,
        bad_disk_id,
        repeated,
        base_not_older,
    ] {
        let body = vmr_transport::testing::encode_cycle(&h, Vec::new(), None)
            .await
            .expect("encode");
        let r = client.send_raw_cycle(Bytes::from(body)).await;
        match r {
            Err(TransportError::Remote(e @ RemoteError::BadRequest { .. })) => {
                assert_eq!(e.status_code(), 400);
                assert!(!e.is_retryable());
            }
            other => panic!("{h:?}: expected BadRequest, got {other:?}"),
        }
    }
    assert_eq!(
        s.handler.cycles.load(Ordering::SeqCst),
        cycles,
        "the handler never saw them"
    );
    // An extent beyond its disk (the encoder refuses one, so the header is edited after
    // encoding: same length, smaller disk): 400 as well.
    let e = Extent {
        disk: 1,
        offset: (8 << 20) - 512,
        data: ExtentData::Zero(512),
    };
    let body = vmr_transport::testing::encode_cycle(&header(5, Some(4)), vec![e], None)
        .await
        .expect("encode");
    let (from, to) = (&b"\"size\":8388608"[..], &b"\"size\":8388000"[..]);
    let at = body
        .windows(from.len())
        .position(|w| w == from)
        .expect("disk 1's size in the header");
    let mut body = body;
    body[at..at + to.len()].copy_from_slice(to);
    let r = client.send_raw_cycle(Bytes::from(body)).await;
    assert!(
        matches!(
            r,
            Err(TransportError::Remote(RemoteError::BadRequest { .. }))
        ),
        "{r:?}"
    );
    assert!(matches!(
        s.outcome().await,
        Outcome::Failed(TransportError::Protocol(_))
    ));
    // The next correct cycle goes through.
    client
        .send_cycle(&header(5, Some(4)), ok_stream(mixed_extents()), false)
        .await
        .expect("a correct cycle afterwards");
    assert!(matches!(s.outcome().await, Outcome::Done { count: 6, .. }));
    s.shutdown().await;
}

/// A body that ends cleanly before its End frame is the sender's error (400, not retryable);
/// a transfer cut by the network stays retryable (see
/// `peer_vanishing_mid_transfer_interrupts_the_handler`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_ending_before_its_end_frame_is_a_client_error() {
    let mut s = Setup::new().await;
    let client = s.client().await;
    let body = vmr_transport::testing::encode_cycle(&header(5, Some(4)), mixed_extents(), None)
        .await
        .expect("encode");
    // Cut inside the stream header, inside the header frame, inside an extent, before End.
    for cut in [3, 9, body.len() / 2, body.len() - 50] {
        let r = client
            .send_raw_cycle(Bytes::copy_from_slice(&body[..cut]))
            .await;
        match r {
            Err(TransportError::Remote(e @ RemoteError::BadRequest { .. })) => {
                assert_eq!(e.status_code(), 400);
                assert!(!TransportError::Remote(e).is_retryable());
            }
            other => panic!("cut at {cut}: expected BadRequest, got {other:?}"),
        }
    }
    // The two cuts after the header reached the handler, which saw the truncation.
    for _ in 0..2 {
        match s.outcome().await {
            Outcome::Failed(e @ TransportError::Truncated(_)) => assert!(!e.is_retryable()),
            other => panic!("expected Truncated, got {other:?}"),
        }
    }
    s.shutdown().await;
}

/// The handler learns the address a peer's connection comes from; a client bound to a local
/// address (as an agent listening on a specific address is) comes from that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_the_peers_address_and_clients_bind() {
    let s = Setup::new().await;
    let whoami = |c: Client| async move {
        c.replica_info(Uuid::from_u128(1), Some("whoami".into()))
            .await
            .expect("replica-info")
            .latest
    };
    assert_eq!(whoami(s.client().await).await, Some(1));
    let bound = Client::connect(
        &s.addr.to_string(),
        &s.client_id,
        s.server_id.fingerprint(),
        ClientOptions {
            bind: Some("127.0.0.2".parse().expect("ip")),
            ..Default::default()
        },
    )
    .await
    .expect("connect from 127.0.0.2");
    assert_eq!(whoami(bound).await, Some(2));
    // A source address that is not (or no longer) this host's: the system's choice instead.
    let fallback = Client::connect(
        &s.addr.to_string(),
        &s.client_id,
        s.server_id.fingerprint(),
        ClientOptions {
            bind: Some("192.0.2.1".parse().expect("ip")),
            ..Default::default()
        },
    )
    .await
    .expect("connect despite an unusable source address");
    assert_eq!(whoami(fallback).await, Some(1));
    s.shutdown().await;
}

/// How many of `socks` the server has closed (a read sees end of file or a reset).
async fn closed_by_server(socks: &mut [tokio::net::TcpStream]) -> usize {
    let mut n = 0;
    for s in socks.iter_mut() {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(1), s.peek(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => n += 1,
            _ => {}
        }
    }
    n
}

/// Raw TCP connections from 127.0.0.9 to `addr`.
async fn flood(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut socks = Vec::new();
    for _ in 0..n {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.9:0".parse().expect("addr"))
            .expect("bind 127.0.0.9");
        socks.push(sock.connect(addr).await.expect("connect"));
    }
    socks
}

/// Connections that never complete a handshake are capped per source and closed after the
/// handshake timeout; an unauthorized certificate is answered and then closed; a legitimate
/// peer from another address gets through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_and_closed() {
    let limits = ConnLimits {
        per_source: 8,
        total: 64,
        handshake_timeout: Duration::from_millis(1500),
        unauthorized_linger: Duration::from_millis(300),
        ..ConnLimits::default()
    };
    let s = Setup::build(true, limits).await;
    let t0 = tokio::time::Instant::now();
    let mut socks = flood(s.addr, 100).await;
    // All but 8 are closed at once.
    let closed = loop {
        let closed = closed_by_server(&mut socks).await;
        if closed >= 92 || t0.elapsed() > Duration::from_millis(1200) {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(closed, 92, "closed within {:?}", t0.elapsed());
    // A legitimate peer (from 127.0.0.1) gets through meanwhile, with more connections than
    // the per-source limit (authorized connections do not count: a primary keeps one per VM).
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(s.client().await);
    }
    for c in &clients {
        c.primary_vm_state(Uuid::from_u128(1)).await.expect("call");
    }
    // The 8 held ones are closed once the handshake timeout passed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while closed_by_server(&mut socks).await < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle handshakes stay open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(socks);
    // An unknown certificate: answered 403, then the connection is closed.
    let d = tempfile::tempdir().expect("tempdir");
    let stranger = Identity::generate(d.path(), "stranger").expect("identity");
    let r = Client::connect(
        &s.addr.to_string(),
        &stranger,
        s.server_id.fingerprint(),
        ClientOptions::default(),
    )
    .await;
    assert!(
        matches!(r, Err(TransportError::Remote(RemoteError::Unauthorized))),
        "{r:?}"
    );
    s.shutdown().await;
}

/// `follow` (fan-out's failover) exists from protocol 7 on: answered on a connection that
/// speaks it, refused by the client without a request on an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_only_on_connections_that_have_it() {
    let s = Setup::new().await;
    let vm = Uuid::from_u128(1);
    let client = s.client().await;
    let c = client.follow(vm).await.expect("v7 call");
    assert_eq!((c.latest, c.resync, c.discarded), (9, true, vec![]));
    let old = s
        .client_speaking(6)
        .await
        .expect("an older client connects");
    let before = s.handler.calls.load(Ordering::SeqCst);
    assert!(matches!(
        old.follow(vm).await,
        Err(TransportError::PeerTooOld { needs: 7, .. })
    ));
    assert_eq!(s.handler.calls.load(Ordering::SeqCst), before);
    s.shutdown().await;
}
