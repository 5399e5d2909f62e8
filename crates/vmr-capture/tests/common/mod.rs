//! Shared helpers of the capture integration tests: stand-in VM setup, an in-memory replica
//! that cycles are applied to, a background writer that can be paused, live disk reads.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use vmr_capture::{CaptureConfig, CaptureCycle, Endpoint, Names};
use vmr_nbd::{ConnectOptions, NbdClient};
use vmr_proto::ExtentData;
use vmr_testkit::qsd::{DiskSpec, QsdVm};

pub const MIB: u64 = 1 << 20;

/// Start a stand-in VM whose NBD server sits where the capture expects it (live exports on).
pub fn start_vm(disks: Vec<DiskSpec>, tag: &str) -> QsdVm {
    let names = Names::new(tag).expect("tag");
    let sock = names.nbd_socket(std::path::Path::new(""));
    let name = sock.to_str().expect("utf8").to_owned();
    QsdVm::start(disks, Some(&name)).expect("start qsd")
}

/// The capture configuration for `vm`: its work dir must contain the NBD socket.
pub fn config(vm: &QsdVm, tag: &str) -> CaptureConfig {
    CaptureConfig::new(
        Endpoint::Unix(vm.qmp_socket()),
        vm.disks().iter().map(|d| d.node.clone()).collect(),
        vm.work_dir(),
        tag,
    )
}

pub async fn live_client(vm: &QsdVm, node: &str) -> NbdClient {
    let sock = vm.nbd_socket().expect("nbd").to_owned();
    let opts = ConnectOptions {
        export: node.to_owned(),
        ..ConnectOptions::default()
    };
    NbdClient::connect(&Endpoint::Unix(sock), opts)
        .await
        .expect("connect live export")
}

/// Whole content of a disk through its live export.
pub async fn read_all(c: &NbdClient) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.size() as usize);
    let mut pos = 0;
    while pos < c.size() {
        let n = (c.size() - pos).min(4 * MIB) as u32;
        out.extend_from_slice(&c.read(pos, n).await.expect("read live"));
        pos += u64::from(n);
    }
    out
}

/// An in-memory replica of all disks.
#[derive(Clone, PartialEq, Eq)]
pub struct Replica {
    pub disks: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replica({} disks)", self.disks.len())
    }
}

impl Replica {
    pub fn new(sizes: &[u64]) -> Self {
        Replica {
            disks: sizes.iter().map(|&s| vec![0u8; s as usize]).collect(),
        }
    }

    /// Read a whole cycle and apply it; returns (extents, data bytes).
    pub async fn apply_cycle(&mut self, cycle: &mut CaptureCycle<'_>) -> (u64, u64) {
        let (mut n, mut bytes) = (0, 0);
        while let Some(e) = cycle.next_extent().await.expect("next extent") {
            n += 1;
            let d = &mut self.disks[e.disk as usize];
            let off = e.offset as usize;
            match &e.data {
                ExtentData::Data(b) => {
                    assert!(b.len() <= vmr_capture::PIECE_SIZE as usize);
                    d[off..off + b.len()].copy_from_slice(b);
                    bytes += b.len() as u64;
                }
                ExtentData::Zero(z) => d[off..off + *z as usize].fill(0),
            }
        }
        (n, bytes)
    }
}

/// A background writer doing random 64 KiB writes to some disks' live exports; `pause()`
/// returns a guard during which no write is in flight.
pub struct Writer {
    pub lock: Arc<tokio::sync::Mutex<()>>,
    stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Write random blocks within `[lo, hi)` of each client in turn.
    pub fn start(clients: Vec<NbdClient>, lo: u64, hi: u64, seed: u64) -> Writer {
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (l, s, w) = (lock.clone(), stop.clone(), writes.clone());
        let handle = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let blocks = (hi - lo) / (64 * 1024);
            while !s.load(Ordering::Relaxed) {
                let _g = l.lock().await;
                for c in &clients {
                    let off = lo + rng.gen_range(0..blocks) * 64 * 1024;
                    let mut buf = vec![0u8; 64 * 1024];
                    rng.fill(&mut buf[..]);
                    c.write(off, Bytes::from(buf), false)
                        .await
                        .expect("writer write");
                    w.fetch_add(1, Ordering::Relaxed);
                }
                drop(_g);
                tokio::task::yield_now().await;
            }
        });
        Writer {
            lock,
            stop,
            writes,
            handle,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("writer task");
    }
}

/// Give the writer some time to write.
pub async fn let_write(w: &Writer, min_writes: u64) {
    let start = w.writes.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while w.writes.load(Ordering::Relaxed) < start + min_writes
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
