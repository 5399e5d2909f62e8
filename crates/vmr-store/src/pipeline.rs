//! Bounded pipelining of NBD writes: at most [`MAX_IN_FLIGHT`] requests and
//! [`MAX_BYTES_IN_FLIGHT`] payload bytes outstanding, whatever the size of the delta.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use vmr_nbd::NbdClient;

use crate::error::StoreError;

/// Requests outstanding at once.
pub(crate) const MAX_IN_FLIGHT: usize = 32;
/// Payload bytes outstanding at once.
pub(crate) const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;

type Pending = Pin<Box<dyn Future<Output = (u64, Result<(), StoreError>)> + Send>>;

/// A window of outstanding writes.
#[derive(Default)]
pub(crate) struct Pipeline {
    pending: FuturesUnordered<Pending>,
    bytes: u64,
    /// Ranges written since the last full drain, per disk: `(disk, start) -> end`. Kept
    /// disjoint, so that overlapping extents of one cycle land in arrival order.
    ranges: std::collections::BTreeMap<(u32, u64), u64>,
}

impl Pipeline {
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
            let c = client.clone();
            let what = what.to_owned();
            let off = offset + pos as u64;
            self.bytes += n as u64;
            self.pending.push(Box::pin(async move {
                (
                    n as u64,
                    c.write(off, piece, false)
                        .await
                        .map_err(|e| StoreError::nbd(what, e)),
                )
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
