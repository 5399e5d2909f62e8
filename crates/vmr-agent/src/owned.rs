//! What one VM's owner holds besides its decision machine: the VM's record (persisted in the
//! state database), its failover bookkeeping (`DIR/failover/<uuid>.json`) and the VM processes
//! it started (failed-over VMs and test copies). Only the owner task of the VM has a `Vm`, so
//! nothing else can write its state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;

use vmr_proto::api::FailoverRecord;

use crate::errors::AgentError;
use crate::host::Host;
use crate::telemetry::VmTelemetry;
use vmr_proto::record::VmRecord;

/// One VM's owned state.
pub struct Vm {
    /// Host resources.
    pub host: Arc<Host>,
    /// The persisted record.
    pub rec: VmRecord,
    /// VM processes this owner started, by pid (reaped when ended).
    pub children: BTreeMap<u32, Child>,
    /// A primary VM disabled while its replica could not be told: the task telling it in
    /// the background (aborted by [`Vm::stop_disable_notice`]).
    pub disable_notice: Option<tokio::task::JoinHandle<()>>,
    /// The same for fan-out relationships disabled while their replica could not be told.
    pub fanout_notices: Vec<tokio::task::JoinHandle<()>>,
    /// The id of the `rpo-exceeded` event while the RPO alert is raised (health reasons name
    /// it); the owner raises and clears it.
    pub rpo_alert: Option<u64>,
    /// Replica: a `store-full` event was raised and no cycle was committed since.
    pub store_full: bool,
    /// The only writer of this VM's monitoring telemetry.
    pub telemetry: VmTelemetry,
    /// Replica: incoming cycles being received (the extended relationship yields to them).
    pub incoming: Incoming,
}

/// The incoming cycles a replica VM is receiving right now, for the extended relationship to
/// yield to: the upstream relationship (the primary's RPO) goes first on this host, so an
/// extended cycle reads no further piece of its point while an incoming cycle streams, and
/// goes on when none does. Shared by the VM's handle (the peer API's receiving task holds an
/// [`IncomingBusy`] for the whole cycle, whatever its outcome) and its owner.
#[derive(Debug, Clone, Default)]
pub struct Incoming(Arc<IncomingInner>);

#[derive(Debug, Default)]
struct IncomingInner {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One incoming cycle being received; dropped when its receiving ends.
#[derive(Debug)]
pub struct IncomingBusy(Arc<IncomingInner>);

impl Incoming {
    /// Mark an incoming cycle as being received until the returned value is dropped.
    pub fn busy(&self) -> IncomingBusy {
        self.0
            .count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        IncomingBusy(self.0.clone())
    }

    /// Whether no incoming cycle is being received.
    pub fn is_idle(&self) -> bool {
        self.0.count.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// Wait until no incoming cycle is being received (at once when none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a drop between the check and the wait wakes it.
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for IncomingBusy {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// What the owner compares before and after each event it handled (its events come from the
/// differences).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Replication state.
    pub state: vmr_proto::api::ReplicationState,
    /// Health level.
    pub health: vmr_proto::api::Health,
    /// Why.
    pub reason: String,
    /// Failed cycle attempts (primary) or applies (replica) in the statistics window.
    pub errors: u64,
    /// Missed cycles in the window.
    pub missed: u64,
    /// The last error, while failing.
    pub last_error: Option<String>,
}

impl Vm {
    /// Own `rec`.
    pub fn new(host: Arc<Host>, rec: VmRecord) -> Vm {
        Vm {
            telemetry: host.telemetry.writer(rec.uuid),
            host,
            rec,
            children: BTreeMap::new(),
            disable_notice: None,
            fanout_notices: Vec::new(),
            rpo_alert: None,
            store_full: false,
            incoming: Incoming::default(),
        }
    }

    /// The RPO alert on this host in seconds: the record's (`set --rpo-alert`), else the one
    /// given at `enable`, else twice the frequency; `None` while the frequency is unknown
    /// (replication not enabled here).
    pub fn rpo_alert_secs(&self) -> Option<u64> {
        let freq = match self.rec.mode() {
            vmr_proto::api::ReplicationMode::Primary => {
                self.rec.enable.as_ref().map(|e| e.frequency_secs)
            }
            vmr_proto::api::ReplicationMode::Replica => self.rec.frequency_secs,
        }?;
        let given =
            self.rec
                .rpo_alert_secs
                .or(self.rec.enable.as_ref().and_then(|e| e.rpo_alert_secs));
        Some(vmr_core::rpo_alert_ms(freq, given) / 1000)
    }

    /// Where the VM stands against its RPO alert now.
    pub fn rpo_verdict(
        &self,
        state: vmr_proto::api::ReplicationState,
        stats: &vmr_proto::api::ReplicationStats,
        now_ms: u64,
    ) -> vmr_core::RpoVerdict {
        let rpo_ms = self.rpo_alert_secs().unwrap_or(0) * 1000;
        vmr_core::assess_rpo(state, stats.last_point_cut_ms, rpo_ms, now_ms)
    }

    /// The RPO alert's health item (with the raising event's id), if raised and exceeded.
    pub fn rpo_health(
        &self,
        state: vmr_proto::api::ReplicationState,
        stats: &vmr_proto::api::ReplicationStats,
        now_ms: u64,
    ) -> Option<(vmr_proto::api::Health, String)> {
        vmr_core::rpo_health(
            self.rpo_verdict(state, stats, now_ms),
            self.rpo_alert_secs().unwrap_or(0) * 1000,
            self.rec.mode() == vmr_proto::api::ReplicationMode::Replica,
            self.rpo_alert,
        )
    }

    /// The `lag_ms` of the status row: now minus the last point's cut.
    pub fn lag_ms(stats: &vmr_proto::api::ReplicationStats, now_ms: u64) -> Option<u64> {
        stats.last_point_cut_ms.map(|c| now_ms.saturating_sub(c))
    }

    /// The VM as its events name it.
    pub fn event_vm(&self, state: vmr_proto::api::ReplicationState) -> vmr_proto::event::EventVm {
        vmr_proto::event::EventVm {
            name: self.rec.name.clone(),
            uuid: self.rec.uuid,
            role: self.rec.mode(),
            state,
        }
    }

    /// Stop telling the replica of a disable (replication enabled again, VM removed, agent
    /// shutdown), and wait until that task has ended.
    pub async fn stop_disable_notice(&mut self) {
        if let Some(h) = self.disable_notice.take() {
            h.abort();
            let _ = h.await;
        }
        for h in self.fanout_notices.drain(..) {
            h.abort();
            let _ = h.await;
        }
    }

    /// Reap the VM processes this owner started that exited on their own (a guest shut down,
    /// a crash): no zombie is left until the agent exits. The `Child` stays in the table (it
    /// keeps the exit status, so no later signal can reach a reused pid) until the process's
    /// failover bookkeeping ends it.
    pub fn reap_children(&mut self) {
        for c in self.children.values_mut() {
            // Reaps an exited child once; afterwards it only reads the kept status.
            let _ = c.try_wait();
        }
    }

    /// Write the record to the state database.
    pub fn save(&self) -> Result<(), AgentError> {
        self.host.save_vm(&self.rec)
    }

    fn failover_path(&self) -> PathBuf {
        self.host
            .dir
            .join("failover")
            .join(format!("{}.json", self.rec.uuid))
    }

    /// The failover bookkeeping of the VM (empty when none).
    pub fn failover(&self) -> Result<FailoverRecord, AgentError> {
        let p = self.failover_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| AgentError::Json {
                doing: "reading",
                path: p,
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FailoverRecord {
                vm: self.rec.uuid,
                ..Default::default()
            }),
            Err(e) => Err(AgentError::io("reading", p)(e)),
        }
    }

    /// Save the failover bookkeeping durably.
    pub fn save_failover(&self, fr: &FailoverRecord) -> Result<(), AgentError> {
        let p = self.failover_path();
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(AgentError::io("creating", d))?;
        }
        let bytes = serde_json::to_vec_pretty(fr).map_err(|source| AgentError::JsonEncode {
            what: "the failover record",
            source,
        })?;
        vmr_durable::write_atomic(&p, &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_incoming_cycle() {
        let inc = Incoming::default();
        // Idle at once when nothing is received.
        inc.idle().await;
        let a = inc.busy();
        let b = inc.busy();
        let waiter = tokio::spawn({
            let inc = inc.clone();
            async move { inc.idle().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one cycle still streams");
        assert!(!inc.is_idle());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the last cycle ended")
            .expect("no panic");
        assert!(inc.is_idle());
    }
}
