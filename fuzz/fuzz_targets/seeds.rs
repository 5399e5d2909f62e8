//! Writes the seed corpus (`fuzz/corpus/<target>/`): a handful of small valid inputs per target,
//! made by encoding real values with the crates' own encoders. Run by `scripts/fuzz.sh --seeds`
//! (`cargo fuzz run seeds`): built like a fuzz target (so it links with the fuzz build), it
//! writes the seeds at start-up, before any fuzzing, and exits. `VMR_FUZZ_SEEDS_DIR` overrides
//! where.
#![no_main]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use vmr_nbd::proto::*;
use vmr_proto::api::{EnableArgs, Request};
use vmr_proto::peer::{BecameReplica, BlockHashes, PeerRequest, PeerResponse, PrimaryVmState};
use vmr_proto::store::{Catalog, LayerRecord, PointKind, PointRecord, RetentionPolicy};
use vmr_proto::{CycleKind, DiskInfo, Extent, ExtentData};
use vmreplica_fuzz::{DIRTY_CONTEXT, block_on, chunk_size, fixed_header, split, staging_header};

const LAUNCH: &str = include_str!("../../examples/standin-vm.toml");

/// Checks that a seed gets through its target's decoder (a seed that fails early is useless).
fn check(target: &str, name: &str, bytes: &[u8]) {
    let ok = match (target, bytes.split_first()) {
        ("cycle_body", Some((&sel, body))) => block_on(vmr_transport::testing::decode_cycle(
            split(body, chunk_size(sel)),
        ))
        .is_ok(),
        ("cycle_frames", Some((&sel, frames))) => {
            let body = vmreplica_fuzz::frames_body(sel, frames).unwrap_or_default();
            block_on(vmr_transport::testing::decode_cycle(split(
                &body,
                chunk_size(sel & 0x3f),
            )))
            .is_ok()
        }
        ("staging_reader", _) => vmreplica_fuzz::read_stage(bytes).is_some(),
        ("staging_records", _) => {
            vmreplica_fuzz::read_stage(&[staging_header(&fixed_header()), bytes.to_vec()].concat())
                .is_some()
        }
        ("catalog", _) => {
            vmr_store::catalog::decode(bytes, Path::new("seed")).is_ok()
                || serde_json::from_slice::<Catalog>(bytes).is_ok()
        }
        ("control_request", _) => {
            Request::from_line(std::str::from_utf8(bytes).unwrap_or_default()).is_ok()
        }
        ("peer_request", Some((&sel, body))) => match sel % 3 {
            0 => PeerRequest::decode(body).is_ok(),
            1 => PeerResponse::decode(body).is_ok(),
            _ => serde_json::from_slice(body).is_ok_and(|v| {
                PeerRequest::from_v1(METHODS[usize::from(sel / 3) % METHODS.len()], v).is_ok()
            }),
        },
        _ => true,
    };
    assert!(ok, "seed {target}/{name} does not decode");
}

const METHODS: [&str; 5] = [
    "create-replica",
    "replica-info",
    "primary-vm-state",
    "become-replica",
    "resync-hashes",
];

fn put(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    check(target, name, bytes);
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

fn extents() -> Vec<Vec<Extent>> {
    vec![
        vec![],
        vec![Extent {
            disk: 0,
            offset: 4096,
            data: ExtentData::Data(Bytes::from_static(b"vmreplica fuzz seed data block")),
        }],
        vec![
            Extent {
                disk: 0,
                offset: 0,
                data: ExtentData::Data(Bytes::from(vec![0xa5; 512])),
            },
            Extent {
                disk: 1,
                offset: 8192,
                data: ExtentData::Zero(65536 - 8192),
            },
            Extent {
                disk: 0,
                offset: (1 << 20) - 3,
                data: ExtentData::Data(Bytes::from_static(b"end")),
            },
        ],
    ]
}

fn cycles(root: &Path) {
    let v1 = vmr_transport::STREAM_VERSION_1;
    let v2 = vmr_transport::STREAM_VERSION;
    for (i, ext) in extents().into_iter().enumerate() {
        for (zi, (level, version)) in [(None, v2), (Some(1), v2), (Some(1), v1)]
            .into_iter()
            .enumerate()
        {
            let body = block_on(vmr_transport::testing::encode_cycle_version(
                &fixed_header(),
                ext.clone(),
                level,
                version,
            ))
            .unwrap_or_else(|e| panic!("encode: {e}"));
            let mut seed = vec![6 - 2 * zi as u8];
            seed.extend_from_slice(&body);
            put(root, "cycle_body", &format!("seed-{i}-{zi}"), &seed);
        }
        // The frames as a plain body of each version has them; the target adds the stream
        // header (and, for version 1 with bit 7, compresses them itself).
        for (zi, (sel, version)) in [(6u8, v2), (0x40 | 5, v2), (0x80 | 5, v1)]
            .into_iter()
            .enumerate()
        {
            let body = block_on(vmr_transport::testing::encode_cycle_version(
                &fixed_header(),
                ext.clone(),
                None,
                version,
            ))
            .unwrap_or_else(|e| panic!("encode: {e}"));
            let mut seed = vec![sel];
            seed.extend_from_slice(&body[8..]);
            put(root, "cycle_frames", &format!("seed-{i}-{zi}"), &seed);
        }
    }
    let full = {
        let mut h = fixed_header();
        h.kind = CycleKind::Full;
        h.base = None;
        h
    };
    let body = block_on(vmr_transport::testing::encode_cycle(&full, vec![], None))
        .unwrap_or_else(|e| panic!("encode: {e}"));
    put(
        root,
        "cycle_body",
        "seed-full",
        &[[6u8].as_slice(), &body].concat(),
    );
    for (i, s) in [
        &b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10"[..],
        &[0xffu8; 64][..],
        &(0u8..=255).collect::<Vec<_>>()[..],
    ]
    .into_iter()
    .enumerate()
    {
        put(root, "cycle_roundtrip", &format!("seed-{i}"), s);
    }
}

fn staging(root: &Path) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let header = fixed_header();
    let head_len = staging_header(&header).len();
    for (i, ext) in extents().into_iter().enumerate() {
        let p = dir.path().join(format!("c{i}.stage"));
        let mut w = vmr_store::staging::StageFileWriter::create(&p, &header)
            .unwrap_or_else(|e| panic!("create: {e}"));
        for e in &ext {
            w.put(e, &e.checksum())
                .unwrap_or_else(|e| panic!("put: {e}"));
        }
        w.finish().unwrap_or_else(|e| panic!("finish: {e}"));
        let file = std::fs::read(&p).unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!(
            vmreplica_fuzz::read_stage(&file).map(|v| v.len()),
            Some(ext.len())
        );
        put(root, "staging_reader", &format!("seed-{i}"), &file);
        put(
            root,
            "staging_records",
            &format!("seed-{i}"),
            &file[head_len..],
        );
    }
}

/// One option reply.
fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = ChunkHeader {
        flags,
        kind,
        cookie,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(payload);
    b
}

/// What qemu-nbd would send for the nbd_client target's session: the handshake granting both
/// contexts on a `size`-byte export, then (cookie 1) the 8 KiB read (or an EIO error reply),
/// (cookie 2) base:allocation status and (cookie 3) dirty-bitmap status.
fn nbd_session(size: u64, read: Read) -> Vec<u8> {
    let mut s = NBD_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    for (id, name) in [(1u32, vmr_nbd::BASE_ALLOCATION), (2, DIRTY_CONTEXT)] {
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        s.extend(opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &d));
    }
    s.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH).to_be_bytes());
    s.extend(opt_reply(OPT_GO, REP_INFO, &info));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    s.extend(opt_reply(OPT_GO, REP_INFO, &bs));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let len = size.min(8192);
    if read == Read::Error {
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"EIO");
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &e));
    } else if read == Read::DataAndHole {
        let half = len / 2;
        let mut d = 0u64.to_be_bytes().to_vec();
        d.extend(std::iter::repeat_n(0x5a, half as usize));
        s.extend(chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &d));
        let mut h = half.to_be_bytes().to_vec();
        h.extend_from_slice(&((len - half) as u32).to_be_bytes());
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &h));
    } else {
        let mut d = 0u64.to_be_bytes().to_vec();
        d.extend(std::iter::repeat_n(0x5a, len as usize));
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &d));
    }
    let want = size.min(1 << 20);
    for (cookie, ctx) in [(2u64, 1u32), (3, 2)] {
        let mut p = ctx.to_be_bytes().to_vec();
        let first = (want / 2).max(1) as u32;
        p.extend_from_slice(&first.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        if u64::from(first) < want {
            p.extend_from_slice(&((want - u64::from(first)) as u32).to_be_bytes());
            p.extend_from_slice(&3u32.to_be_bytes());
        }
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p));
    }
    s
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Read {
    Data,
    DataAndHole,
    Error,
}

fn nbd(root: &Path) {
    for (i, (size, structured, step)) in [
        (1u64 << 20, Read::DataAndHole, 3u8),
        (4096, Read::Data, 2),
        (65536, Read::DataAndHole, 0),
        (8192, Read::Error, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut seed = vec![step];
        seed.extend(nbd_session(size, structured));
        put(root, "nbd_client", &format!("seed-{i}"), &seed);
    }
    let mut err = vec![0u8];
    err.extend_from_slice(&5u32.to_be_bytes());
    err.extend_from_slice(&3u16.to_be_bytes());
    err.extend_from_slice(b"bad");
    put(root, "nbd_parsers", "seed-error", &err);
    let mut err_off = err.clone();
    err_off[0] = 1;
    err_off.extend_from_slice(&4096u64.to_be_bytes());
    put(root, "nbd_parsers", "seed-error-offset", &err_off);
    let mut bs = vec![2u8];
    for v in [1u32, 65536, 0, 4096, 3] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    put(root, "nbd_parsers", "seed-status", &bs);
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie: 9,
        length: 4104,
    };
    put(
        root,
        "nbd_parsers",
        "seed-chunk",
        &[[3u8].as_slice(), &h.encode()[4..]].concat(),
    );
    let r = SimpleReply {
        error: 0,
        cookie: 9,
    };
    put(
        root,
        "nbd_parsers",
        "seed-simple",
        &[[3u8].as_slice(), &r.encode()[4..]].concat(),
    );
    let q = vmr_nbd::proto::Request {
        flags: 0,
        cmd: CMD_BLOCK_STATUS,
        cookie: 2,
        offset: 0,
        length: 1 << 20,
    };
    put(
        root,
        "nbd_parsers",
        "seed-request",
        &[[4u8].as_slice(), &q.encode()].concat(),
    );
}

fn catalog(root: &Path) {
    let mut c = Catalog {
        vm: uuid::Uuid::from_u128(0x5eed),
        generation: 3,
        retention: RetentionPolicy {
            hourly: 0,
            app_consistent_every_hours: Some(2),
            grid: vmr_proto::retain::RetentionGrid::parse("1h=24,1d=7,1w=4,1mo=12", true).ok(),
        },
        points: vec![],
        views: vec![],
    };
    put(
        root,
        "catalog",
        "seed-empty",
        &vmr_store::catalog::encode(&c).unwrap_or_default(),
    );
    for id in [41u64, 42] {
        c.points.push(PointRecord {
            id,
            taken_at_ms: 1_700_000_000_000 + id,
            kind: if id % 2 == 0 {
                PointKind::AppConsistent
            } else {
                PointKind::CrashConsistent
            },
            layers: vec![LayerRecord {
                disk: "drive0".into(),
                size: 1 << 20,
                file: format!("c{id:06}.qcow2"),
                backing: Some("base.qcow2".into()),
            }],
            pruning: id == 41,
            group: None,
        });
    }
    let bytes = vmr_store::catalog::encode(&c).unwrap_or_default();
    put(root, "catalog", "seed-points", &bytes);
    // The bare catalog member, for the structure half of the target.
    put(
        root,
        "catalog",
        "seed-body",
        &serde_json::to_vec(&c).unwrap_or_default(),
    );
}

fn control(root: &Path) {
    let uuid = uuid::Uuid::from_u128(0x5eed);
    let reqs = [
        Request::VmList,
        Request::Status {
            name: Some("demo-vm".into()),
        },
        Request::VmAdd {
            name: "demo-vm".into(),
            qmp: "/run/vmr/demo-vm.qmp".into(),
            launch_toml: LAUNCH.into(),
            disks: vec!["disk0".into()],
            nbd: Some("/run/vmr/demo-vm-nbd.sock".into()),
            qga: Some("/run/vmr/demo-vm-qga.sock".into()),
            libvirt: None,
        },
        Request::VmAdd {
            name: "lv-vm".into(),
            qmp: String::new(),
            launch_toml: String::new(),
            disks: vec![],
            nbd: None,
            qga: None,
            libvirt: Some(vmr_proto::record::LibvirtSource {
                uri: "qemu:///system".into(),
                domain: "lv-vm".into(),
                acked_checkpoint: None,
                acked_checkpoint_xml: None,
            }),
        },
        Request::ServerAllow {
            primary: "host-a".into(),
            fingerprint: format!("SHA256:{}", "ab".repeat(32)),
            storage: None,
            trust_group: Some("g".into()),
        },
        Request::Enable(EnableArgs {
            name: "demo-vm".into(),
            replica: "10.0.0.2:7443".into(),
            replica_fingerprint: format!("SHA256:{}", "cd".repeat(32)),
            frequency_secs: 30,
            recovery_points: 4,
            app_consistent_every_hours: 0,
            exclude_disks: vec![],
            compression: true,
            initial_at_ms: None,
            auto_resync: None,
            auto_failover: None,
            initial: Default::default(),
            rpo_alert_secs: Some(120),
            verify_every_secs: Some(7 * 86400),
            retain: None,
            bandwidth: vmr_proto::bandwidth::BandwidthSchedule::parse("08:00-18:00=50M,*=0").ok(),
        }),
        Request::SetRetention {
            name: "demo-vm".into(),
            policy: vmr_proto::store::RetentionPolicy {
                grid: vmr_proto::retain::RetentionGrid::parse("10s=3,1min=2", false).ok(),
                ..Default::default()
            },
        },
        Request::FailoverStart {
            name: "demo-vm".into(),
            point: Some(42),
            no_start: false,
            force: false,
        },
        Request::Extended {
            name: "demo-vm".into(),
            what: vmr_proto::api::ExtendedOp::Pause,
        },
        Request::SetBandwidth {
            name: Some("demo-vm".into()),
            bandwidth: vmr_proto::bandwidth::BandwidthSchedule {
                ranges: vec![vmr_proto::bandwidth::BandwidthRange {
                    start_min: 22 * 60,
                    end_min: 6 * 60,
                    limit: 8 << 20,
                }],
                rest: 50_000_000,
            },
        },
    ];
    for (i, r) in reqs.iter().enumerate() {
        let line = r.to_line().unwrap_or_default();
        put(
            root,
            "control_request",
            &format!("seed-{i}"),
            line.as_bytes(),
        );
    }
    let peer_reqs = [
        PeerRequest::PrimaryVmState { uuid },
        PeerRequest::ReplicaInfo(vmr_proto::peer::ReplicaInfoRequest {
            uuid,
            listen: Some("10.0.0.1:7443".into()),
        }),
        PeerRequest::CreateReplica(vmr_proto::api::CreateReplica {
            launch_toml: LAUNCH.into(),
            uuid,
            name: "demo-vm".into(),
            disks: vec![DiskInfo {
                id: "disk0".into(),
                size: 1 << 30,
            }],
            frequency_secs: 30,
            recovery_points: 0,
            retain: vmr_proto::retain::RetentionGrid::parse("1h=24,1d=7,1w=4,1mo=12", true).ok(),
            auto_failover: Some(vmr_proto::lease::AutoFailover {
                auto_failover_ms: 60_000,
                witness: "10.0.0.3:7443".into(),
                witness_fingerprint: format!("SHA256:{}", "ef".repeat(32)),
                power_off: false,
                point: vmr_proto::lease::TakeoverPoint::AppConsistent,
            }),
        }),
        PeerRequest::ResyncHashes(vmr_proto::api::BlockHashesRequest {
            uuid,
            disk: "disk0".into(),
            disk_size: 1 << 30,
            block_size: 1 << 20,
            first_block: 0,
            count: 4,
            point: Some(42),
            read: true,
        }),
        PeerRequest::Witness {
            call: vmr_proto::lease::WitnessRequest::Register {
                vm: uuid,
                replica: "SHA256:00".into(),
                lease_ms: 30_000,
            },
        },
        PeerRequest::Witness {
            call: vmr_proto::lease::WitnessRequest::Renew { vm: uuid, epoch: 2 },
        },
    ];
    for (i, r) in peer_reqs.iter().enumerate() {
        put(
            root,
            "peer_request",
            &format!("seed-req-{i}"),
            &[[0u8].as_slice(), &r.encode()].concat(),
        );
        let (method, v) = r.to_v1();
        let sel = 2 + 3 * METHODS.iter().position(|m| *m == method).unwrap_or(0) as u8;
        let body = serde_json::to_vec(&v).unwrap_or_default();
        put(
            root,
            "peer_request",
            &format!("seed-v1-{i}"),
            &[[sel].as_slice(), &body].concat(),
        );
    }
    let answers = [
        PeerResponse::CreateReplica { created: true },
        PeerResponse::PrimaryVmState(PrimaryVmState {
            state: vmr_proto::api::ReplicationState::Replicating,
            running: true,
        }),
        PeerResponse::BecomeReplica(BecameReplica {
            state: vmr_proto::api::ReplicationState::Replicating,
            point: 42,
            resync: false,
        }),
        PeerResponse::ResyncHashes(BlockHashes {
            point: 42,
            point_disk_size: 1 << 30,
            hashes: vec![[7u8; 32], [9u8; 32]],
        }),
        PeerResponse::Witness {
            lease: vmr_proto::lease::WitnessResponse::Held {
                epoch: 2,
                by_peer: true,
                remaining_ms: 1_500,
            },
        },
    ];
    for (i, r) in answers.iter().enumerate() {
        put(
            root,
            "peer_request",
            &format!("seed-resp-{i}"),
            &[[1u8].as_slice(), &r.encode()].concat(),
        );
    }
}

fn write_all() {
    let root = std::env::var_os("VMR_FUZZ_SEEDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    cycles(&root);
    staging(&root);
    nbd(&root);
    catalog(&root);
    control(&root);
    println!("seeds written under {}", root.display());
}

/// Writes the seeds and ends the process before libFuzzer starts fuzzing.
fn seed_and_exit() {
    write_all();
    std::process::exit(0);
}

libfuzzer_sys::fuzz_target!(
    init: seed_and_exit(),
    |_data: &[u8]| {}
);
