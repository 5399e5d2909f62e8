//! Helpers shared by the fuzz targets and the seed generator: a runtime per input, splitting a
//! body into chunks, the in-memory NBD "server" and the fixed values the wrapping targets use.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind, DiskInfo};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = runtime();
}

/// Runs `f` to completion on this thread's current-thread runtime (time enabled), kept from one
/// input to the next so that its blocking pool (the codecs' `spawn_blocking`) is not restarted
/// every time. For futures that leave no task behind.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// Runs `f` on a fresh runtime, dropped afterwards with every task `f` spawned (the NBD
/// client's reader and writer), so nothing carries over from one input to the next.
pub fn block_on_fresh<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Chunk size for a selector byte: 1, 2, 3, 7, 64, 4096 bytes or the whole body.
pub fn chunk_size(selector: u8) -> usize {
    match selector % 7 {
        0 => 1,
        1 => 2,
        2 => 3,
        3 => 7,
        4 => 64,
        5 => 4096,
        _ => usize::MAX,
    }
}

/// Splits `body` into chunks of `size` bytes (the last one shorter).
pub fn split(body: &[u8], size: usize) -> Vec<Bytes> {
    body.chunks(size.clamp(1, body.len().max(1)))
        .map(Bytes::copy_from_slice)
        .collect()
}

/// The cycle header the wrapping targets put in front of fuzzed frames: two disks of 1 MiB
/// and 64 KiB.
pub fn fixed_header() -> CycleHeader {
    CycleHeader {
        vm: uuid::Uuid::from_u128(0x5eed),
        id: 7,
        base: Some(6),
        kind: CycleKind::Incremental,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms: 1_700_000_000_000,
        disks: vec![
            DiskInfo {
                id: "drive0".into(),
                size: 1 << 20,
            },
            DiskInfo {
                id: "drive1".into(),
                size: 64 << 10,
            },
        ],
        group: None,
    }
}

/// The stream header of a cycle body (magic, version, flags).
pub fn stream_header(version: u16, zstd: bool) -> Vec<u8> {
    let mut b = vmr_transport::STREAM_MAGIC.to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    let flags = if zstd { vmr_transport::FLAG_ZSTD } else { 0 };
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

/// A cycle body around fuzzed `frames`, as the selector byte `sel` picks: bit 7 set: stream
/// version 1 with the frames compressed as one zstd stream (a version-1 sender with
/// compression on); else stream version 2, with `FLAG_ZSTD` (extents may be packed one by
/// one) when bit 6 is set. The low six bits pick the chunk size ([`chunk_size`]).
pub fn frames_body(sel: u8, frames: &[u8]) -> Option<Vec<u8>> {
    if sel & 0x80 != 0 {
        let mut body = stream_header(vmr_transport::STREAM_VERSION_1, true);
        body.extend_from_slice(&zstd::bulk::compress(frames, 1).ok()?);
        Some(body)
    } else {
        let mut body = stream_header(vmr_transport::STREAM_VERSION, sel & 0x40 != 0);
        body.extend_from_slice(frames);
        Some(body)
    }
}

/// The checksum scheme of a body [`frames_body`] made with `sel`.
pub fn frames_scheme(sel: u8) -> vmr_proto::ChecksumScheme {
    if sel & 0x80 != 0 {
        vmr_proto::ChecksumScheme::Whole
    } else {
        vmr_proto::ChecksumScheme::Blocks
    }
}

/// The staging-file header (magic, version, JSON length, JSON, BLAKE3 of the JSON) of `h`.
pub fn staging_header(h: &CycleHeader) -> Vec<u8> {
    let json = serde_json::to_vec(h).unwrap_or_else(|e| panic!("header json: {e}"));
    let mut b = vmr_store::staging::MAGIC.to_vec();
    b.extend_from_slice(&vmr_store::staging::VERSION.to_le_bytes());
    b.extend_from_slice(&(json.len() as u32).to_le_bytes());
    b.extend_from_slice(&json);
    b.extend_from_slice(blake3::hash(&json).as_bytes());
    b
}

/// A scripted NBD server: every read returns the next bytes of the script (at most `step` at a
/// time, to exercise partial reads) and then end of file; writes are accepted and dropped.
pub struct Scripted {
    script: Bytes,
    step: usize,
}

impl Scripted {
    /// A server that answers with `script`, `step` bytes per read at most.
    pub fn new(script: &[u8], step: usize) -> Scripted {
        Scripted {
            script: Bytes::copy_from_slice(script),
            step: step.max(1),
        }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.step).min(self.script.len());
        let piece = self.script.split_to(n);
        buf.put_slice(&piece);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The dirty-bitmap context name the NBD target asks for besides `base:allocation`.
pub const DIRTY_CONTEXT: &str = "qemu:dirty-bitmap:vmr-fuzz";

/// Reads a whole staging file from memory as import does; checks what holds for an accepted
/// file. Returns the extents when the trailer verified.
pub fn read_stage(file: &[u8]) -> Option<Vec<vmr_proto::Extent>> {
    let path = std::path::Path::new("fuzz.stage");
    let mut r = vmr_store::staging::StageReader::new(file, path).ok()?;
    let mut out = Vec::new();
    loop {
        match r.next_extent() {
            Ok(Some(e)) => out.push(e.into_extent()),
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    assert!(
        matches!(r.next_extent(), Ok(None)),
        "a finished reader produced more"
    );
    let data: u64 = out
        .iter()
        .filter(|e| matches!(e.data, vmr_proto::ExtentData::Data(_)))
        .map(|e| e.len())
        .sum();
    assert!(data <= file.len() as u64, "more data than the file holds");
    Some(out)
}
