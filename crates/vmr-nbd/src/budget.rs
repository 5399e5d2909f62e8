//! A budget of payload bytes shared by every user of NBD requests in a process (the agent:
//! the host): the primary's reads (`vmr-capture`, data read and not yet sent) and the
//! replica's writes (`vmr-store`, writes not yet answered) each have one, so that the data in
//! flight is bounded per host whatever the number of cycles running at once. Owns the
//! accounting: a [`Share`] is taken before a request goes out and given back when it is
//! dropped; [`Share::lease`] hands it to the data itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Payload bytes that requests may hold together.
#[derive(Debug)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: u64,
    /// Bytes held now and the most ever held together, counted apart from the semaphore.
    held: AtomicU64,
    peak: AtomicU64,
}

impl ByteBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            sem: Arc::new(Semaphore::new(
                usize::try_from(total).unwrap_or(Semaphore::MAX_PERMITS),
            )),
            total,
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The permits standing for `n` bytes: all of the budget for more than it holds, so that
    /// a request larger than the budget still goes out (alone).
    fn permits(&self, n: u64) -> u32 {
        u32::try_from(n.min(self.total)).unwrap_or(u32::MAX)
    }

    fn share(self: &Arc<ByteBudget>, n: u64, permit: OwnedSemaphorePermit) -> Share {
        let now = self.held.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Share {
            budget: self.clone(),
            n,
            permit: Some(permit),
        }
    }

    /// `n` bytes of the budget, waiting until enough were given back (in the order asked).
    /// `None` only if the semaphore were closed, which it never is.
    pub async fn take(self: &Arc<ByteBudget>, n: u64) -> Option<Share> {
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(self.permits(n))
            .await
            .ok()?;
        Some(self.share(n, permit))
    }

    /// `n` bytes of the budget if they are free now.
    pub fn try_take(self: &Arc<ByteBudget>, n: u64) -> Option<Share> {
        let permit = self
            .sem
            .clone()
            .try_acquire_many_owned(self.permits(n))
            .ok()?;
        Some(self.share(n, permit))
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// The most bytes ever held together under this budget.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Bytes of a [`ByteBudget`] held by one request; given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<ByteBudget>,
    n: u64,
    permit: Option<OwnedSemaphorePermit>,
}

impl Share {
    /// `k` bytes of this share as a share of their own (`None` when it holds fewer).
    pub fn split(&mut self, k: u64) -> Option<Share> {
        if k > self.n {
            return None;
        }
        let part = self
            .permit
            .as_mut()?
            .split(self.budget.permits(k) as usize)?;
        self.n -= k;
        Some(Share {
            budget: self.budget.clone(),
            n: k,
            permit: Some(part),
        })
    }

    /// `data` owning this share: the share is given back when the last slice of it is
    /// dropped, wherever the data went in the meantime.
    pub fn lease(self, data: Bytes) -> Bytes {
        Bytes::from_owner(Leased { data, _share: self })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// Data that owns a share.
struct Leased {
    data: Bytes,
    _share: Share,
}

impl AsRef<[u8]> for Leased {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares add up, split shares and leased data give their bytes back when dropped, and
    /// a share that is not free is not taken.
    #[tokio::test]
    async fn shares_are_counted_until_their_data_is_dropped() {
        let b = ByteBudget::new(10);
        let mut s = b.take(8).await.expect("take");
        assert!(b.try_take(4).is_none(), "only 2 bytes are free");
        let part = s.split(3).expect("split");
        assert!(s.split(6).is_none(), "5 bytes left in the share");
        let data = part.lease(Bytes::from_static(b"abc"));
        let slice = data.slice(1..);
        drop(s);
        assert_eq!(b.held(), 3);
        drop(data);
        assert_eq!(b.held(), 3, "a slice still holds the data");
        assert_eq!(&slice[..], b"bc");
        drop(slice);
        assert_eq!(b.held(), 0);
        assert_eq!(b.peak(), 8);
        let all = b.try_take(10).expect("the whole budget is free again");
        drop(all);
        // A request larger than the budget goes out alone.
        let big = b.take(25).await.expect("take more than the budget");
        assert!(b.try_take(1).is_none());
        drop(big);
        assert_eq!(b.held(), 0);
    }
}
