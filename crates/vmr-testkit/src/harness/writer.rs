//! Guest writers on a stand-in's live NBD exports: [`Writer`], random 64 KiB writes of
//! incompressible data (`depth` in flight, optionally rate-limited), counting bytes and recording
//! each write's latency, on the caller's Tokio runtime; and [`RoundWriter`], a few random blocks
//! per disk in rounds on a thread of its own, for tests that need changes to replicate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use vmr_nbd::NbdClient;

use super::standin::StandIn;
use super::{HarnessError, Result};

/// Block size of the guest writes.
pub const BLOCK: u64 = 64 * 1024;
const POOL: usize = 16 << 20;

/// Incompressible data to slice writes from (so zstd on the wire gains nothing, like
/// encrypted or already compressed guest data).
pub fn pool(seed: u64) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; POOL + (4 << 20)];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

/// A random 4 KiB-aligned slice of `len` bytes of `pool`.
pub fn slice(pool: &Bytes, rng: &mut impl Rng, len: u64) -> Bytes {
    let at = rng.gen_range(0..POOL / 4096) * 4096;
    pool.slice(at..at + len as usize)
}

/// Write latencies recorded since the last [`Writer::take_stats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriterStats {
    /// Latency of each write, microseconds, in completion order.
    pub latencies_us: Vec<u64>,
}

impl WriterStats {
    /// The `q` quantile (0..=1, nearest rank) of the latencies, microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v.get(rank - 1).copied()
    }
}

/// A running guest writer; [`Writer::stop`] flushes and disconnects.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Writer {
    /// Random 64 KiB writes over the whole export of `c`, `depth` in flight, at most `rate`
    /// bytes/s. Must be called within a Tokio runtime.
    pub fn spawn(c: NbdClient, pool: Bytes, rate: Option<f64>, depth: usize, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let (s, b, l) = (stop.clone(), bytes.clone(), lat.clone());
        let depth = depth.max(1);
        let task = tokio::spawn(async move {
            let nbd = |what: &str| {
                let what = what.to_owned();
                move |source| HarnessError::Nbd { what, source }
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let blocks = (c.size() / BLOCK).max(1);
            let t0 = Instant::now();
            let mut done = 0u64;
            while !s.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..depth)
                    .map(|_| {
                        let off = rng.gen_range(0..blocks) * BLOCK;
                        let data = slice(&pool, &mut rng, BLOCK);
                        let c = &c;
                        async move {
                            let t = Instant::now();
                            c.write(off, data, false).await?;
                            Ok::<_, vmr_nbd::NbdError>(t.elapsed())
                        }
                    })
                    .collect();
                let took = futures::future::try_join_all(batch)
                    .await
                    .map_err(nbd("write"))?;
                l.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(took.iter().map(|d| d.as_micros() as u64));
                done += depth as u64 * BLOCK;
                b.fetch_add(depth as u64 * BLOCK, Ordering::Relaxed);
                if let Some(r) = rate {
                    let due = Duration::from_secs_f64(done as f64 / r);
                    let el = t0.elapsed();
                    if due > el {
                        tokio::time::sleep(due - el).await;
                    }
                }
            }
            c.flush().await.map_err(nbd("flush"))?;
            c.disconnect().await.map_err(nbd("disconnect"))?;
            Ok(())
        });
        Writer {
            stop,
            bytes,
            lat,
            task,
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The latencies recorded since the last call (and forget them).
    pub fn take_stats(&self) -> WriterStats {
        WriterStats {
            latencies_us: std::mem::take(
                &mut *self.lat.lock().unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }

    /// Stop, flush and disconnect; the writer's error, if it failed.
    pub async fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// A guest writer in rounds on a thread of its own: each round writes `blocks` random 64 KiB
/// blocks (contents from a seed that grows by one per disk per round) on each of its disks, then
/// sleeps. Stops at [`RoundWriter::stop`] or when dropped.
#[derive(Debug)]
pub struct RoundWriter {
    stop: Arc<AtomicBool>,
    blocks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RoundWriter {
    /// Starts writing to `disks` of `vm`: `blocks` blocks per disk per round, a round every
    /// `every`, the first round's contents from `seed`.
    pub fn start(
        vm: &StandIn,
        disks: &[&str],
        blocks: u64,
        every: Duration,
        seed: u64,
    ) -> RoundWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), written.clone());
        let vm = StandIn::attach(vm.def.clone(), vm.nbd.clone());
        let disks: Vec<String> = disks.iter().map(|d| (*d).to_owned()).collect();
        let thread = std::thread::spawn(move || {
            let mut seed = seed;
            while !s.load(Ordering::SeqCst) {
                for d in &disks {
                    vm.write_random(d, blocks, seed)?;
                    n.fetch_add(blocks, Ordering::SeqCst);
                    seed += 1;
                }
                std::thread::sleep(every);
            }
            Ok(())
        });
        RoundWriter {
            stop,
            blocks: written,
            thread: Some(thread),
        }
    }

    /// Blocks written so far, over all disks.
    pub fn written(&self) -> u64 {
        self.blocks.load(Ordering::SeqCst)
    }

    /// Stops after the round in progress; the writer's error, if a write failed.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| HarnessError::WriterThread)?,
            None => Ok(()),
        }
    }
}

impl Drop for RoundWriter {
    fn drop(&mut self) {
        // A test that fails before it stops the writer: the thread ends with it.
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let s = WriterStats {
            latencies_us: (1..=100).rev().collect(),
        };
        assert_eq!(s.quantile_us(0.5), Some(50));
        assert_eq!(s.quantile_us(0.99), Some(99));
        assert_eq!(s.quantile_us(1.0), Some(100));
        assert_eq!(s.quantile_us(0.0), Some(1));
        assert_eq!(WriterStats::default().quantile_us(0.5), None);
    }
}
