//! Transport benchmark (run with `--release`): the cost of mutual TLS + HTTP/2 + cycle framing
//! (per-extent BLAKE3, end trailer) and of zstd, measured in one run on 127.0.0.1.
//!
//! One cycle of 256 MiB in 4096 extents of 64 KiB is sent, for two kinds of data
//! (incompressible random bytes, and compressible guest-like data: random 64-byte words
//! repeated 4×, half of every block zeros), by:
//! - `vmr-transport` with zstd (level 1, the default), to a server whose handler pulls and
//!   verifies every extent (checksums checked by the decoder) and drops it;
//! - `vmr-transport` without compression;
//! - a plain loopback TCP copy of the same payload bytes (write all, the reader counts them),
//!   the floor any transport pays on this machine.
//!
//! Median of 5 repeats, contenders in rotating order. Prints a markdown table.
//!
//! `cargo run --release -p vmr-transport --example transport_bench`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo, Extent, ExtentData};
use vmr_transport::{
    Client, ClientOptions, CycleAck, ExtentStream, Handler, Identity, Peer, PeerList, RemoteError,
    Server,
};

const EXTENT: usize = 64 * 1024;
const EXTENTS: usize = 4096;
const REPEATS: usize = 5;
const MIB: f64 = 1024.0 * 1024.0;

/// Drains every cycle, counting its bytes; the decoder verifies each extent's checksum.
struct Drain;

impl Handler for Drain {
    async fn receive_cycle(
        &self,
        _peer: &Peer,
        header: CycleHeader,
        mut extents: ExtentStream,
    ) -> Result<CycleAck, RemoteError> {
        let (mut count, mut bytes) = (0u64, 0u64);
        while let Some(item) = extents.next().await {
            let e = item.map_err(|e| e.to_remote())?.into_extent();
            count += 1;
            bytes += e.len();
        }
        Ok(CycleAck {
            vm: header.vm,
            cycle: header.id,
            extents: count,
            bytes,
        })
    }

    async fn call(
        &self,
        _peer: &Peer,
        req: vmr_transport::PeerRequest,
    ) -> Result<vmr_transport::PeerResponse, RemoteError> {
        Err(RemoteError::BadRequest {
            message: format!("{} is not served by this benchmark", req.method()),
        })
    }
}

/// A small deterministic generator (xorshift), so the example needs no extra crate.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn payload(compressible: bool) -> Vec<Bytes> {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    (0..EXTENTS)
        .map(|_| {
            let mut v = vec![0u8; EXTENT];
            if compressible {
                // First half: 64-byte random words each repeated 4×; second half zeros.
                for chunk in v[..EXTENT / 2].chunks_mut(256) {
                    let mut word = [0u8; 64];
                    g.fill(&mut word);
                    for w in chunk.chunks_mut(64) {
                        w.copy_from_slice(&word);
                    }
                }
            } else {
                g.fill(&mut v);
            }
            Bytes::from(v)
        })
        .collect()
}

fn header(id: u64) -> CycleHeader {
    CycleHeader {
        vm: Uuid::from_u128(1),
        id,
        base: Some(id - 1),
        kind: CycleKind::Incremental,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: 0,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            size: (EXTENT * EXTENTS * 4) as u64,
        }],
        group: None,
    }
}

async fn send_cycle(client: &Client, data: &[Bytes], id: u64, compress: bool) -> Duration {
    let extents = data.iter().enumerate().map(|(i, b)| {
        Ok::<_, std::io::Error>(Extent {
            disk: 0,
            // Every fourth 64 KiB block of the disk, as scattered guest writes are.
            offset: (i * EXTENT * 4) as u64,
            data: ExtentData::Data(b.clone()),
        })
    });
    let t = Instant::now();
    let ack = client
        .send_cycle(&header(id), futures::stream::iter(extents), compress)
        .await
        .expect("cycle sent");
    let el = t.elapsed();
    assert_eq!(ack.bytes, (EXTENT * EXTENTS) as u64);
    el
}

async fn plain_tcp(data: &[Bytes]) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let total = (EXTENT * EXTENTS) as u64;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "peer closed early");
            got += n as u64;
        }
        s.write_all(b"k").await.expect("ack");
    });
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for b in data {
        s.write_all(b).await.expect("write");
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.expect("ack");
    let el = t.elapsed();
    reader.await.expect("reader");
    el
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sd = tempfile::tempdir().expect("tempdir");
    let cd = tempfile::tempdir().expect("tempdir");
    let server_id = Identity::generate(sd.path(), "replica").expect("server identity");
    let client_id = Identity::generate(cd.path(), "primary").expect("client identity");
    let peers = PeerList(vec![Peer {
        name: "primary".into(),
        fingerprint: client_id.fingerprint().into(),
        trust_group: None,
        remote: None,
    }]);
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &server_id,
        Arc::new(peers),
        Arc::new(Drain),
    )
    .await
    .expect("bind");
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let client = Client::connect(
        &addr.to_string(),
        &client_id,
        server_id.fingerprint(),
        ClientOptions::default(),
    )
    .await
    .expect("connect");

    let mb = (EXTENT * EXTENTS) as f64 / MIB;
    println!(
        "| data | TLS + zstd | TLS, no compression | plain TCP copy | TCP / TLS-plain | TLS-plain / TLS+zstd |"
    );
    println!("|---|---|---|---|---|---|");
    let mut id = 1;
    for (label, compressible) in [("incompressible", false), ("compressible", true)] {
        let data = payload(compressible);
        // Warm-up: one of each.
        id += 1;
        send_cycle(&client, &data, id, true).await;
        id += 1;
        send_cycle(&client, &data, id, false).await;
        plain_tcp(&data).await;
        let (mut z, mut p, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..REPEATS {
            for k in 0..3 {
                match (r + k) % 3 {
                    0 => {
                        id += 1;
                        z.push(send_cycle(&client, &data, id, true).await.as_secs_f64());
                    }
                    1 => {
                        id += 1;
                        p.push(send_cycle(&client, &data, id, false).await.as_secs_f64());
                    }
                    _ => t.push(plain_tcp(&data).await.as_secs_f64()),
                }
            }
        }
        let (z, p, t) = (median(z), median(p), median(t));
        println!(
            "| {label}, {mb:.0} MiB in {EXTENTS} × 64 KiB | {:.0} ms ({:.0} MiB/s) | {:.0} ms ({:.0} MiB/s) | {:.0} ms ({:.0} MiB/s) | {:.2} | {:.2} |",
            z * 1e3,
            mb / z,
            p * 1e3,
            mb / p,
            t * 1e3,
            mb / t,
            t / p,
            p / z
        );
    }
    drop(client);
    let _ = stop.send(());
    let _ = srv.await;
}
