//! The witness role of the agent (automatic failover, `docs/auto-failover.md`): every agent
//! answers `witness` peer calls for the VM relationships that register with it, from agents its
//! authorization entries name (the peer listener's mutual TLS with pinned fingerprints). Owns
//! the host's `vmr_core::autofailover::WitnessTable` and its durable copy (the state database's
//! `witness_leases`): a lease change is in SQLite before its answer leaves, and the table is
//! rebuilt from SQLite at start with every lease counted as renewed then, so a restart never
//! hands a live lease away. Time is this process's monotonic clock.

use std::sync::Mutex;
use std::time::Instant;

use vmr_core::autofailover::{WitnessAction, WitnessTable};
use vmr_proto::lease::{LeaseEntry, WitnessRequest, WitnessResponse};

use crate::db::{Db, DbError};

/// The host's witness: its lease table, one lock for the table and its writes.
pub struct Witness {
    table: Mutex<WitnessTable>,
    started: Instant,
}

impl Witness {
    /// The table of the persisted `entries`, every lease counted as renewed now.
    pub fn restore(entries: Vec<LeaseEntry>) -> Self {
        Witness {
            table: Mutex::new(WitnessTable::restore(entries, 0)),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// One call from the agent of fingerprint `caller`: the table decides, `db` stores what
    /// changed, then the answer. When storing fails the table is left as it was and the error
    /// returned (the caller retries; nothing was granted).
    pub fn call(
        &self,
        db: &Db,
        caller: &str,
        req: &WitnessRequest,
    ) -> Result<WitnessResponse, DbError> {
        // A poisoned lock holds no half-done change: the table is restored on every failure.
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let before = table.clone();
        let (answer, actions) = table.step(self.now_ms(), caller, req);
        for a in &actions {
            let stored = match a {
                WitnessAction::Persist(entry) => db.put_lease(entry),
                WitnessAction::Delete(vm) => db.delete_lease(*vm),
            };
            if let Err(e) = stored {
                *table = before;
                return Err(e);
            }
        }
        if !actions.is_empty() {
            tracing::info!(?req, caller, ?answer, "witness: lease changed");
        }
        Ok(answer)
    }

    /// The leases with the milliseconds each has left, for `server show`.
    pub fn leases(&self) -> Vec<(LeaseEntry, u64)> {
        let now = self.now_ms();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .entries()
            .map(|(e, expires)| (e.clone(), expires.saturating_sub(now)))
            .collect()
    }
}
