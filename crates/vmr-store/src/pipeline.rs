//! Bounded pipelining of NBD writes: per pipeline (one cycle's layer writer) at most
//! [`MAX_IN_FLIGHT`] requests and [`MAX_BYTES_IN_FLIGHT`] payload bytes outstanding, whatever
//! the size of the delta; and over every pipeline of the process (the agent: the host) at most
//! [`HOST_BYTES_IN_FLIGHT`] payload bytes, whatever the number of cycles being received.
//!
//! Each write runs as a task of its own that holds its share of the host's budget until the
//! server answered: it goes out at once and gives its share back without its pipeline being
//! polled, so a cycle waiting for data from its primary never holds another cycle up.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use vmr_nbd::{ByteBudget, NbdClient};

use crate::error::StoreError;

/// Requests outstanding at once.
pub(crate) const MAX_IN_FLIGHT: usize = 32;
/// Payload bytes outstanding at once.
pub(crate) const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Payload bytes outstanding at once over every pipeline of the process: one cycle alone
/// gets as much as [`MAX_BYTES_IN_FLIGHT`]; eight at once (`max-concurrent-cycles`) share it
/// instead of holding eight times as much.
pub(crate) const HOST_BYTES_IN_FLIGHT: u64 = 64 << 20;

/// The process's budget, shared by every store and cycle.
static HOST: LazyLock<Arc<ByteBudget>> = LazyLock::new(|| ByteBudget::new(HOST_BYTES_IN_FLIGHT));

/// A spawned write, aborted when its pipeline is dropped before it ended.
struct Spawned(tokio::task::JoinHandle<Result<(), StoreError>>);

impl Drop for Spawned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Pending = Pin<Box<dyn Future<Output = (u64, Result<(), StoreError>)> + Send>>;

/// A window of outstanding writes.
pub(crate) struct Pipeline {
    pending: FuturesUnordered<Pending>,
    bytes: u64,
    budget: Arc<ByteBudget>,
    /// Ranges written since the last full drain, per disk: `(disk, start) -> end`. Kept
    /// disjoint, so that overlapping extents of one cycle land in arrival order.
    ranges: std::collections::BTreeMap<(u32, u64), u64>,
}

impl Default for Pipeline {
    /// A pipeline under the process's budget.
    fn default() -> Pipeline {
        Pipeline::with_budget(HOST.clone())
    }
}

impl Pipeline {
    /// A pipeline under `budget` (tests: a budget of their own).
    pub(crate) fn with_budget(budget: Arc<ByteBudget>) -> Pipeline {
        Pipeline {
            pending: FuturesUnordered::new(),
            bytes: 0,
            budget,
            ranges: Default::default(),
        }
    }

    /// Declare the next extent's range; waits for every outstanding write first when it
    /// overlaps one issued since the last drain (later extents must win).
    pub(crate) async fn order(
        &mut self,
        disk: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let end = offset.saturating_add(len);
        let overlaps = self
            .ranges
            .range((disk, 0)..(disk, end))
            .next_back()
            .is_some_and(|(_, e)| *e > offset);
        if overlaps {
            self.drain().await?;
        }
        if self.ranges.len() > 1 << 16 {
            // Bound the bookkeeping: a full drain resets it.
            self.drain().await?;
        }
        self.ranges.insert((disk, offset), end);
        Ok(())
    }

    async fn make_room(&mut self, need: u64) -> Result<(), StoreError> {
        while !self.pending.is_empty()
            && (self.pending.len() >= MAX_IN_FLIGHT || self.bytes + need > MAX_BYTES_IN_FLIGHT)
        {
            self.next_done().await?;
        }
        Ok(())
    }

    async fn next_done(&mut self) -> Result<(), StoreError> {
        if let Some((n, res)) = self.pending.next().await {
            self.bytes -= n;
            res?;
        }
        Ok(())
    }

    /// Queue writes of `data` at `offset`, split into `chunk`-sized requests.
    pub(crate) async fn write(
        &mut self,
        client: &NbdClient,
        what: &str,
        offset: u64,
        data: Bytes,
        chunk: u64,
    ) -> Result<(), StoreError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(chunk as usize);
            let piece = data.slice(pos..pos + n);
            self.make_room(n as u64).await?;
            // The budget's semaphore is never closed.
            let held = self
                .budget
                .take(n as u64)
                .await
                .ok_or(StoreError::WriterClosed)?;
            let c = client.clone();
            let what = what.to_owned();
            let off = offset + pos as u64;
            self.bytes += n as u64;
            let task = Spawned(tokio::spawn(async move {
                let r = c
                    .write(off, piece, false)
                    .await
                    .map_err(|e| StoreError::nbd(what, e));
                drop(held);
                r
            }));
            self.pending.push(Box::pin(async move {
                let mut task = task;
                let r = match (&mut task.0).await {
                    Ok(r) => r,
                    Err(e) => Err(StoreError::Background(e)),
                };
                (n as u64, r)
            }));
            pos += n;
        }
        Ok(())
    }

    /// Queue WRITE_ZEROES over `[offset, offset+len)` (explicit zero writes when the server
    /// cannot write zeroes).
    pub(crate) async fn zero(
        &mut self,
        client: &NbdClient,
        what: &str,
        offset: u64,
        len: u64,
        chunk: u64,
    ) -> Result<(), StoreError> {
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(chunk);
            let off = offset + pos;
            if client.can_write_zeroes() {
                self.make_room(0).await?;
                let c = client.clone();
                let what = what.to_owned();
                let n32 = n as u32;
                self.pending.push(Box::pin(async move {
                    (
                        0,
                        c.write_zeroes(off, n32, false, false)
                            .await
                            .map_err(|e| StoreError::nbd(what, e)),
                    )
                }));
            } else {
                self.write(client, what, off, Bytes::from(vec![0u8; n as usize]), chunk)
                    .await?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Wait for every outstanding request.
    pub(crate) async fn drain(&mut self) -> Result<(), StoreError> {
        self.ranges.clear();
        let mut first = Ok(());
        while !self.pending.is_empty() {
            if let Err(e) = self.next_done().await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::daemon::Daemon;

    const MIB: u64 = 1 << 20;

    fn image(dir: &Path, name: &str, size: u64) {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", name, &size.to_string()])
            .current_dir(dir)
            .output()
            .expect("run qemu-img");
        assert!(out.status.success(), "{out:?}");
    }

    fn piece(seed: u8) -> Bytes {
        Bytes::from(
            (0..4 * MIB as usize)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<u8>>(),
        )
    }

    /// Two cycles' pipelines writing at once stay within the budget they share (each alone
    /// may hold up to MAX_BYTES_IN_FLIGHT), every write lands, and the budget is whole again
    /// once they drained.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelines_share_one_budget_for_the_bytes_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        image(d, "a.qcow2", 64 * MIB);
        image(d, "b.qcow2", 64 * MIB);
        let qsd = Arc::new(Daemon::new(d));
        let xa = qsd.export(&d.join("a.qcow2")).await.expect("export a");
        let xb = qsd.export(&d.join("b.qcow2")).await.expect("export b");
        let budget = ByteBudget::new(16 * MIB);
        let run = |x: &crate::daemon::DaemonExport, seed: u8| {
            let client = x.client.clone();
            let budget = budget.clone();
            // Made before the first write, so that the writes are queued faster than the
            // daemon answers them.
            let data = piece(seed);
            async move {
                let mut pipe = Pipeline::with_budget(budget);
                for i in 0..12u64 {
                    pipe.order(0, i * 4 * MIB, 4 * MIB).await?;
                    pipe.write(&client, "layer", i * 4 * MIB, data.clone(), 4 * MIB)
                        .await?;
                }
                pipe.drain().await
            }
        };
        let (ra, rb) = tokio::join!(run(&xa, 1), run(&xb, 2));
        ra.expect("pipeline a");
        rb.expect("pipeline b");
        assert!(
            budget.peak() <= 16 * MIB,
            "{} MiB were in flight at once under a 16 MiB budget",
            budget.peak() / MIB
        );
        assert!(budget.peak() >= 4 * MIB, "nothing was ever in flight");
        assert_eq!(budget.held(), 0);
        for (x, seed) in [(&xa, 1u8), (&xb, 2u8)] {
            for i in [0u64, 5, 11] {
                let got = x
                    .client
                    .read(i * 4 * MIB, 4 * MIB as u32)
                    .await
                    .expect("read back");
                assert!(got == piece(seed), "piece {i} of image {seed} differs");
            }
        }
        qsd.finish(xa).await.expect("finish a");
        qsd.finish(xb).await.expect("finish b");
        qsd.stop();
    }

    /// A pipeline dropped with writes outstanding (a cycle aborted mid-stream) gives its share
    /// of the budget back: the next cycle is not held up by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_pipeline_gives_its_share_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        image(d, "a.qcow2", 64 * MIB);
        let qsd = Arc::new(Daemon::new(d));
        let x = qsd.export(&d.join("a.qcow2")).await.expect("export");
        let budget = ByteBudget::new(16 * MIB);
        let mut pipe = Pipeline::with_budget(budget.clone());
        let data = piece(3);
        for i in 0..4u64 {
            pipe.write(&x.client, "layer", i * 4 * MIB, data.clone(), 4 * MIB)
                .await
                .expect("queue");
        }
        assert!(budget.held() > 0, "nothing outstanding to give back");
        drop(pipe);
        let t = Instant::now();
        while budget.held() > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} bytes of a dropped pipeline still held",
                budget.held()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut next = Pipeline::with_budget(budget.clone());
        next.write(&x.client, "layer", 0, piece(4), 4 * MIB)
            .await
            .expect("write");
        next.drain().await.expect("drain");
        qsd.finish(x).await.expect("finish");
        qsd.stop();
    }
}
