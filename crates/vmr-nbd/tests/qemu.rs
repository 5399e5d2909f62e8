//! Integration tests of the NBD client against real `qemu-nbd` and `qemu-storage-daemon`
//! processes (Unix socket and TCP), with images in per-test temp dirs.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use vmr_nbd::{
    BASE_ALLOCATION, ConnectOptions, DIRTY, Endpoint, NbdClient, NbdError, STATE_ZERO, StatusExtent,
};
use vmr_testkit::ChildGuard;

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create_qcow2(dir: &Path, size_mib: u64) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
            &format!("{size_mib}M"),
        ],
    );
    img
}

/// qcow2 with an enabled persistent bitmap `b0`, then guest-like writes through qemu-io that the
/// bitmap records. Returns the image path.
fn image_with_dirty_bitmap(dir: &Path, writes: &[(u64, u64)]) -> PathBuf {
    let img = create_qcow2(dir, 64);
    let p = img.to_str().unwrap();
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", "-g", "65536", p, "b0"],
    );
    let mut args = vec!["-f".to_owned(), "qcow2".to_owned()];
    for (off, len) in writes {
        args.push("-c".to_owned());
        args.push(format!("write -P 0x5a {off} {len}"));
    }
    args.push(p.to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &refs);
    img
}

/// A TCP port for a server to bind: the harness's (below the ephemeral range, reserved by a
/// lock for this process), not the kernel's pick, which an outgoing connection of another
/// process could take as its local port before the server binds it.
fn free_port() -> u16 {
    vmr_testkit::harness::free_port().unwrap()
}

enum Net {
    Unix,
    Tcp,
}

/// Start `qemu-nbd` on `img` (qcow2); `extra` adds options such as `-B b0`.
fn qemu_nbd(dir: &Path, img: &Path, net: Net, extra: &[&str]) -> (ChildGuard, Endpoint) {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "--format=qcow2",
        "--persistent",
        "--shared=8",
        "--discard=unmap",
    ]);
    cmd.args(extra);
    let ep = match net {
        Net::Unix => {
            let sock = dir.join("nbd.sock");
            cmd.arg(format!("--socket={}", sock.display()));
            Endpoint::Unix(sock)
        }
        Net::Tcp => {
            let port = free_port();
            cmd.args(["--bind=127.0.0.1", &format!("--port={port}")]);
            Endpoint::Tcp(format!("127.0.0.1:{port}"))
        }
    };
    cmd.arg(img);
    let guard = ChildGuard::spawn(cmd, "qemu-nbd").unwrap();
    wait_ready(&ep);
    (guard, ep)
}

/// Start `qemu-storage-daemon` exporting `img` (qcow2) writable as `e`, with bitmap `bitmap`.
fn qsd(dir: &Path, img: &Path, net: Net, bitmap: Option<&str>) -> (ChildGuard, Endpoint) {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.args([
        "--blockdev",
        &format!(
            "driver=file,node-name=f0,filename={},discard=unmap",
            img.display()
        ),
        "--blockdev",
        "driver=qcow2,node-name=d0,file=f0,discard=unmap",
    ]);
    let ep = match net {
        Net::Unix => {
            let sock = dir.join("qsd.sock");
            cmd.args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", sock.display()),
            ]);
            Endpoint::Unix(sock)
        }
        Net::Tcp => {
            let port = free_port();
            cmd.args([
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            ]);
            Endpoint::Tcp(format!("127.0.0.1:{port}"))
        }
    };
    let mut export = "type=nbd,id=e,node-name=d0,name=e,writable=on".to_owned();
    if let Some(b) = bitmap {
        export.push_str(&format!(",bitmaps.0={b}"));
    }
    cmd.args(["--export", &export]);
    let guard = ChildGuard::spawn(cmd, "qemu-storage-daemon").unwrap();
    wait_ready(&ep);
    (guard, ep)
}

/// Wait until the NBD server at `ep` greets, not only until its socket exists or accepts: a
/// Unix socket file appears at bind(), before listen(), and clients connecting that early were
/// refused (or reset) when the tests ran in parallel.
fn wait_ready(ep: &Endpoint) {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream: Option<Box<dyn Read>> = match ep {
            Endpoint::Unix(p) => std::os::unix::net::UnixStream::connect(p).ok().map(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                Box::new(s) as Box<dyn Read>
            }),
            Endpoint::Tcp(a) => std::net::TcpStream::connect(a.as_str()).ok().map(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                Box::new(s) as Box<dyn Read>
            }),
        };
        let mut greeting = [0u8; 8];
        if let Some(mut s) = stream
            && s.read_exact(&mut greeting).is_ok()
            && &greeting == b"NBDMAGIC"
        {
            return;
        }
        assert!(Instant::now() < deadline, "no NBD server greets at {ep:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn opts(export: &str, contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        export: export.to_owned(),
        meta_contexts: contexts.iter().map(|s| (*s).to_owned()).collect(),
        max_in_flight: 16,
        timeout: Duration::from_secs(20),
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7 + 1) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Flags of `base:allocation` covering `[off, off+len)` must all have `want` set.
async fn assert_alloc_flags(c: &NbdClient, off: u64, len: u64, want: u32) {
    let x = c
        .block_status_range(BASE_ALLOCATION, off, len)
        .await
        .unwrap();
    assert_eq!(x.first().map(|e| e.offset), Some(off), "{x:?}");
    assert_eq!(x.iter().map(|e| e.length).sum::<u64>(), len, "{x:?}");
    assert!(
        x.iter().all(|e| e.flags & want == want),
        "want {want:#x} over {off}+{len}: {x:?}"
    );
}

/// The common data-path checks: round trip, write zeroes, trim, flush, bounds.
async fn data_path(c: &NbdClient) {
    let size = c.size();
    assert_eq!(size, 64 * MIB);
    assert!(!c.is_read_only() && c.can_trim() && c.can_write_zeroes() && c.can_flush());
    assert!(c.meta_context_id(BASE_ALLOCATION).is_some());
    assert!(c.max_request() >= 4 * MIB as u32);

    // Round trip: aligned, unaligned, and the last bytes of the export.
    for (i, (off, len)) in [
        (0u64, 65536usize),
        (3 * MIB + 123, 10_000),
        (size - 4096, 4096),
        (MIB, 4 * MIB as usize),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64, len);
        c.write(off, data.clone(), i == 1).await.unwrap();
        let back = c.read(off, len as u32).await.unwrap();
        assert!(back == data, "mismatch at {off}+{len}");
    }
    // Unwritten space reads as zeros (hole chunks).
    let z = c.read(40 * MIB, 1 << 20).await.unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let chunks = c.read_chunks(40 * MIB, 1 << 20).await.unwrap();
    assert!(
        chunks
            .iter()
            .all(|ch| matches!(ch, vmr_nbd::ReadChunk::Hole { .. })),
        "{chunks:?}"
    );

    // Write zeroes over written data -> reads zero, block status says zero.
    c.write_zeroes(MIB, 2 * MIB as u32, false, false)
        .await
        .unwrap();
    assert!(
        c.read(MIB, 2 * MIB as u32)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_alloc_flags(c, MIB, 2 * MIB, STATE_ZERO).await;
    // The neighbouring data is intact.
    assert!(
        c.read(3 * MIB, 65536).await.unwrap()
            == pattern(3, 4 * MIB as usize).slice(2 * MIB as usize..2 * MIB as usize + 65536)
    );

    // Trim -> zero (qcow2 without backing discards to zero clusters / holes).
    c.trim(3 * MIB, 2 * MIB as u32).await.unwrap();
    assert!(
        c.read(3 * MIB, 2 * MIB as u32)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_alloc_flags(c, 3 * MIB, 2 * MIB, STATE_ZERO).await;
    // Allocated data is reported as non-zero.
    let x = c.block_status(BASE_ALLOCATION, 0, 65536).await.unwrap();
    assert_eq!(x[0].offset, 0);
    assert_eq!(x[0].flags & STATE_ZERO, 0, "{x:?}");

    c.flush().await.unwrap();

    // Bounds are checked locally.
    assert!(matches!(
        c.read(size - 10, 11).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.read(size, 1).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.write(size, Bytes::from_static(b"x"), false).await,
        Err(NbdError::OutOfRange { .. })
    ));
    let too_big = c.max_request() + 1;
    assert!(matches!(
        c.read(0, too_big).await,
        Err(NbdError::TooLarge { .. })
    ));
    // The connection still works after all of the above.
    assert_eq!(c.read(size - 4096, 4096).await.unwrap(), pattern(2, 4096));
}

/// 64 concurrent writes then 64 concurrent reads, all pipelined on one connection.
async fn pipelined(c: &NbdClient) {
    let len = 256 * 1024usize;
    let writes = (0..64u64).map(|i| {
        let c = c.clone();
        async move { c.write(i * len as u64, pattern(100 + i, len), false).await }
    });
    for r in join_all(writes).await {
        r.unwrap();
    }
    let reads = (0..64u64).map(|i| {
        let c = c.clone();
        async move { (i, c.read(i * len as u64, len as u32).await) }
    });
    for (i, r) in join_all(reads).await {
        assert!(
            r.unwrap() == pattern(100 + i, len),
            "request {i} read wrong data"
        );
    }
}

/// Dirty-bitmap block status must return exactly the dirtied ranges.
async fn dirty_ranges(c: &NbdClient, ctx: &str) -> Vec<(u64, u64)> {
    assert!(
        c.meta_context_id(ctx).is_some(),
        "context {ctx} not granted"
    );
    let x = c.block_status_range(ctx, 0, c.size()).await.unwrap();
    // Extents tile the whole export.
    let mut pos = 0;
    for e in &x {
        assert_eq!(e.offset, pos);
        pos += e.length;
    }
    assert_eq!(pos, c.size());
    x.iter()
        .filter(|e| e.flags & DIRTY != 0)
        .map(|e: &StatusExtent| (e.offset, e.length))
        .collect()
}

const DIRTY_WRITES: [(u64, u64); 3] = [(MIB, 65536), (5 * MIB, 131072), (20 * MIB + 4096, 4096)];
/// `DIRTY_WRITES` rounded out to the 64 KiB bitmap granularity.
const DIRTY_EXPECTED: [(u64, u64); 3] = [(MIB, 65536), (5 * MIB, 131072), (20 * MIB, 65536)];

#[tokio::test]
async fn qemu_nbd_unix_data_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2(dir.path(), 64);
    let (_g, ep) = qemu_nbd(dir.path(), &img, Net::Unix, &[]);
    let c = NbdClient::connect(&ep, opts("", &[BASE_ALLOCATION]))
        .await
        .unwrap();
    data_path(&c).await;
    c.disconnect().await.unwrap();
    // Data survived the connection.
    let c = NbdClient::connect(&ep, opts("", &[])).await.unwrap();
    assert_eq!(c.read(0, 65536).await.unwrap(), pattern(0, 65536));
    assert!(matches!(
        c.block_status(BASE_ALLOCATION, 0, 4096).await,
        Err(NbdError::Unsupported(_))
    ));
}

#[tokio::test]
async fn qemu_nbd_tcp_pipelined() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2(dir.path(), 64);
    let (_g, ep) = qemu_nbd(dir.path(), &img, Net::Tcp, &[]);
    let c = NbdClient::connect(&ep, opts("", &[BASE_ALLOCATION]))
        .await
        .unwrap();
    pipelined(&c).await;
    // Smaller window than requests: still all correct.
    let narrow = NbdClient::connect(
        &ep,
        ConnectOptions {
            max_in_flight: 3,
            ..opts("", &[])
        },
    )
    .await
    .unwrap();
    pipelined(&narrow).await;
    narrow.disconnect().await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_dirty_bitmap(dir.path(), &DIRTY_WRITES);
    let (_g, ep) = qemu_nbd(
        dir.path(),
        &img,
        Net::Unix,
        &["--read-only", "-B", "b0", "--allocation-depth"],
    );
    let ctx = "qemu:dirty-bitmap:b0";
    let c = NbdClient::connect(
        &ep,
        opts(
            "",
            &[BASE_ALLOCATION, ctx, "qemu:allocation-depth", "nope:x"],
        ),
    )
    .await
    .unwrap();
    assert!(c.is_read_only());
    assert_eq!(c.meta_context_id("nope:x"), None);
    assert_eq!(dirty_ranges(&c, ctx).await, DIRTY_EXPECTED.to_vec());
    // Read the dirty data back.
    for (off, len) in DIRTY_WRITES {
        assert!(
            c.read(off, len as u32)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0x5a)
        );
    }
    assert!(matches!(
        c.write(0, Bytes::from_static(b"x"), false).await,
        Err(NbdError::Unsupported(_))
    ));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qsd_unix_data_path_and_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_dirty_bitmap(dir.path(), &DIRTY_WRITES);
    run(
        "qemu-img",
        &["bitmap", "--disable", img.to_str().unwrap(), "b0"],
    );
    let (_g, ep) = qsd(dir.path(), &img, Net::Unix, Some("b0"));
    let ctx = "qemu:dirty-bitmap:b0";
    let c = NbdClient::connect(&ep, opts("e", &[BASE_ALLOCATION, ctx]))
        .await
        .unwrap();
    assert_eq!(dirty_ranges(&c, ctx).await, DIRTY_EXPECTED.to_vec());
    data_path(&c).await;
    c.disconnect().await.unwrap();
    // Unknown export name is refused with the server's message.
    match NbdClient::connect(&ep, opts("nosuch", &[])).await {
        Err(NbdError::OptionRefused { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn qsd_tcp_pipelined_and_data_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2(dir.path(), 64);
    let (_g, ep) = qsd(dir.path(), &img, Net::Tcp, None);
    let c = NbdClient::connect(&ep, opts("e", &[BASE_ALLOCATION]))
        .await
        .unwrap();
    data_path(&c).await;
    pipelined(&c).await;
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn server_killed_mid_request() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2(dir.path(), 64);
    // Allocate data so reads carry payload.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64M",
            img.to_str().unwrap(),
        ],
    );
    let (mut g, ep) = qemu_nbd(dir.path(), &img, Net::Unix, &[]);
    let c = NbdClient::connect(&ep, opts("", &[])).await.unwrap();
    let batches = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let c = c.clone();
        let batches = batches.clone();
        tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                let batch =
                    (0..8u64).map(|i| c.read((done * 8 + i) % 16 * 4 * MIB, 4 * MIB as u32));
                for r in join_all(batch).await {
                    if let Err(e) = r {
                        return (done, e);
                    }
                }
                done += 1;
                batches.store(done, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    // Kill the server while requests are in flight: once a batch has finished (on a loaded
    // machine that can take longer than any fixed pause), the next one is on the wire.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while batches.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no batch finished in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    g.kill9();
    let (done, err) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("requests hung after the server died")
        .unwrap();
    assert!(done > 0, "no batch finished before the kill");
    assert!(matches!(err, NbdError::Closed | NbdError::Io(_)), "{err:?}");
    assert!(!c.is_connected());
    assert!(matches!(
        c.read(0, 4096).await,
        Err(NbdError::Closed | NbdError::Io(_))
    ));
}
