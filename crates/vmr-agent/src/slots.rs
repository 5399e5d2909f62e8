//! The host's cycle slots: at most `max-concurrent-cycles` primary cycles hold one at once.
//! A held slot counts as running data-path work ([`crate::heap::DataActivity`]), so the heap's
//! free memory goes back to the kernel when the last one is given back (and nothing streams in).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::heap::{Busy, DataActivity};

/// Cycle slots shared by every primary VM of the host.
#[derive(Debug)]
pub struct CycleSlots {
    free: Arc<Semaphore>,
    activity: DataActivity,
}

/// One running cycle's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct CycleSlot {
    /// `None` only if the semaphore were closed, which nothing does.
    _permit: Option<OwnedSemaphorePermit>,
    _busy: Busy,
}

impl CycleSlots {
    /// `max` slots (at least 1: the config loader refuses 0).
    pub fn new(max: usize, activity: DataActivity) -> CycleSlots {
        CycleSlots {
            free: Arc::new(Semaphore::new(max.max(1))),
            activity,
        }
    }

    /// Wait for a free slot.
    pub async fn acquire(&self) -> CycleSlot {
        let permit = self.free.clone().acquire_owned().await.ok();
        CycleSlot {
            _permit: permit,
            _busy: self.activity.busy(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_bound_the_cycles_and_count_as_running_work() {
        let activity = DataActivity::default();
        let slots = CycleSlots::new(2, activity.clone());
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        let incoming = activity.busy();
        assert_eq!(activity.running(), 3);
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), slots.acquire());
        assert!(third.await.is_err(), "a third slot while two are held");
        drop(a);
        let c = slots.acquire().await;
        drop((b, c, incoming));
        assert_eq!(activity.running(), 0);
    }
}
