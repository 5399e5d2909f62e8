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
    /// The only writer of this VM's monitoring telemetry.
    pub telemetry: VmTelemetry,
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
        }
    }

    /// Stop telling the replica of a disable (replication enabled again, VM removed, agent
    /// shutdown), and wait until that task has ended.
    pub async fn stop_disable_notice(&mut self) {
        if let Some(h) = self.disable_notice.take() {
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
