//! Evidence that two VMs never ran at once: a [`StampWriter`] (a guest writer that stamps its
//! own monotonic send times into a VM's disk, one 4 KiB record per write, FUA) and a
//! [`RunMonitor`] (samples `/proc/PID/stat` of the two VM processes every few ms). Both use
//! one clock: the test process's monotonic clock, counted from a shared base [`Instant`] (the
//! VMs are processes of the same machine). Afterwards the records read back from each disk say
//! when each VM processed writes, and [`Timeline`] compares them for overlap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmr_nbd::Endpoint;

use super::{HarnessError, Result, io_err, rt};

/// Bytes per record (one slot of the disk).
pub const STAMP_SLOT: u64 = 4096;
const MAGIC: &[u8; 8] = b"VMRSTAMP";

/// One write of a [`StampWriter`]: what it stamped and when it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The writer's tag (which VM it wrote to).
    pub tag: u8,
    /// 0, 1, 2, ... (slot `first + seq`).
    pub seq: u64,
    /// When it was sent, ns since the base.
    pub sent_ns: u64,
    /// When the VM acknowledged it (stable, FUA), ns since the base; `None`: no answer
    /// within the write timeout (the VM frozen or gone).
    pub acked_ns: Option<u64>,
}

/// A region of a disk the stamps go to: `slots` records from byte `offset`.
#[derive(Debug, Clone, Copy)]
pub struct StampRegion {
    /// Byte offset of slot 0.
    pub offset: u64,
    /// Number of slots (the writer stops when they are used up).
    pub slots: u64,
}

fn encode(tag: u8, seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut b = vec![(seq as u8) | 1; STAMP_SLOT as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8] = tag;
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&sent_ns.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u8, u64, u64)> {
    if b.len() < 32 || &b[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let sent = u64::from_le_bytes(b[24..32].try_into().ok()?);
    // The filler must be whole: a torn record is reported as foreign (seq u64::MAX).
    let fill = (seq as u8) | 1;
    if b[32..].iter().any(|&x| x != fill) {
        return Some((b[8], u64::MAX, sent));
    }
    Some((b[8], seq, sent))
}

/// Records found in a region: (tag, seq, sent_ns) by slot order; `seq == u64::MAX` marks a torn
/// record.
pub type Found = Vec<(u8, u64, u64)>;

fn parse(data: &[u8]) -> Found {
    data.chunks(STAMP_SLOT as usize)
        .filter_map(decode)
        .collect()
}

/// A writer thread stamping records into one export of a VM's NBD server every `period`,
/// reconnecting (until stopped) whenever the server does not answer: it may be started before
/// the VM exists (a failover VM), and keeps trying while the VM is frozen.
#[derive(Debug)]
pub struct StampWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<Stamp>>>,
}

impl StampWriter {
    /// Start writing to export `export` at `sock`, records tagged `tag` in `region`.
    pub fn start(
        sock: PathBuf,
        export: &str,
        tag: u8,
        region: StampRegion,
        base: Instant,
        period: Duration,
    ) -> StampWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let acked_n = Arc::new(AtomicU64::new(0));
        let count = acked_n.clone();
        let export = export.to_owned();
        let handle = std::thread::spawn(move || {
            let mut log = Vec::new();
            let Ok(rt) = rt() else {
                return log;
            };
            let ep = Endpoint::Unix(sock);
            let ns = |i: Instant| i.saturating_duration_since(base).as_nanos() as u64;
            let mut seq = 0;
            while !st.load(Ordering::Relaxed) && seq < region.slots {
                let opts = vmr_nbd::ConnectOptions {
                    export: export.clone(),
                    ..Default::default()
                };
                let c = match rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        vmr_nbd::NbdClient::connect(&ep, opts),
                    )
                    .await
                }) {
                    Ok(Ok(c)) => c,
                    _ => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                while !st.load(Ordering::Relaxed) && seq < region.slots {
                    let sent = ns(Instant::now());
                    let data = encode(tag, seq, sent);
                    let w = rt.block_on(async {
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            c.write(region.offset + seq * STAMP_SLOT, data.into(), true),
                        )
                        .await
                    });
                    let acked = matches!(w, Ok(Ok(()))).then(|| ns(Instant::now()));
                    log.push(Stamp {
                        tag,
                        seq,
                        sent_ns: sent,
                        acked_ns: acked,
                    });
                    seq += 1;
                    if acked.is_none() {
                        break;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(period);
                }
            }
            log
        });
        StampWriter {
            stop,
            acked: acked_n,
            handle: Some(handle),
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stop the writer (after the write in flight, if any) and return its log.
    pub fn finish(mut self) -> Vec<Stamp> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for StampWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The records in `region` of export `export` at `sock` (a running VM).
pub fn read_stamps_nbd(sock: &Path, export: &str, region: StampRegion) -> Result<Found> {
    rt()?.block_on(async {
        let ep = Endpoint::Unix(sock.to_path_buf());
        let c = super::connect_nbd(&ep, export, super::READY_TIMEOUT).await?;
        let mut out = Vec::new();
        let chunk = 256 * STAMP_SLOT;
        let end = region.offset + region.slots * STAMP_SLOT;
        let mut at = region.offset;
        while at < end {
            let len = chunk.min(end - at);
            let d = c
                .read(at, len as u32)
                .await
                .map_err(|source| HarnessError::Nbd {
                    what: "read stamps".into(),
                    source,
                })?;
            out.extend(parse(&d));
            at += len;
        }
        let _ = c.disconnect().await;
        Ok(out)
    })
}

/// The records in `region` of the qcow2 image `image` (read with `qemu-img convert -U`,
/// whether or not a process holds it; the stamps are written FUA).
pub fn read_stamps_image(image: &Path, region: StampRegion) -> Result<Found> {
    let out = tempfile::NamedTempFile::new().map_err(io_err("a temp file"))?;
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(out.path())
        .output()
        .map_err(io_err("run qemu-img convert"))?;
    if !o.status.success() {
        return Err(HarnessError::Tool {
            tool: format!("qemu-img convert {}", image.display()),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        });
    }
    let raw = std::fs::read(out.path()).map_err(io_err("read the raw image"))?;
    let start = (region.offset as usize).min(raw.len());
    let end = ((region.offset + region.slots * STAMP_SLOT) as usize).min(raw.len());
    Ok(parse(&raw[start..end]))
}

/// Whether process `pid` runs: it exists, is not a zombie and is not stopped (a fence freezes
/// a stand-in VM with SIGSTOP: state `T`).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X" | "T" | "t")),
        Err(_) => false,
    }
}

/// The pid of a process (not this one) whose command line contains `needle`.
pub fn pid_with_arg(needle: &str) -> Option<u32> {
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// What a [`RunMonitor`] saw.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Samples taken.
    pub samples: u64,
    /// Samples in which both VMs ran (must be 0).
    pub both: u64,
    /// The last sample with the first VM running, ns since the base.
    pub first_last_running_ns: Option<u64>,
    /// The first sample with the first VM not running.
    pub first_stopped_ns: Option<u64>,
    /// The first sample with the second VM running.
    pub second_first_running_ns: Option<u64>,
}

/// Samples every 5 ms whether the first VM (`pid`) and the second (found by a command-line
/// argument, once it exists) run.
#[derive(Debug)]
pub struct RunMonitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Timeline>>,
}

impl RunMonitor {
    /// Start sampling.
    pub fn start(first: u32, second_arg: String, base: Instant) -> RunMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut t = Timeline::default();
            let mut second: Option<u32> = None;
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                let now = base.elapsed().as_nanos() as u64;
                let a = running(first);
                if second.is_none() && n.is_multiple_of(4) {
                    second = pid_with_arg(&second_arg);
                }
                n += 1;
                let b = second.is_some_and(running);
                t.samples += 1;
                if a {
                    t.first_last_running_ns = Some(now);
                } else if t.first_stopped_ns.is_none() {
                    t.first_stopped_ns = Some(now);
                }
                if b && t.second_first_running_ns.is_none() {
                    t.second_first_running_ns = Some(now);
                }
                if a && b {
                    t.both += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            t
        });
        RunMonitor {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and return what was seen.
    pub fn finish(mut self) -> Timeline {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RunMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_torn_one_is_flagged() {
        let b = encode(7, 42, 123_456);
        assert_eq!(decode(&b), Some((7, 42, 123_456)));
        let mut torn = b.clone();
        torn[4000] ^= 0xff;
        assert_eq!(decode(&torn), Some((7, u64::MAX, 123_456)));
        assert_eq!(decode(&vec![0u8; 4096]), None);
        let two = [encode(1, 0, 5), vec![0u8; 4096], encode(1, 2, 9)].concat();
        assert_eq!(parse(&two), vec![(1, 0, 5), (1, 2, 9)]);
    }
}
