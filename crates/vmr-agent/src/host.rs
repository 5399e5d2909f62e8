//! What every VM's owner shares on one host: the agent directory, its config and TLS identity,
//! the state database, the event log, the in-memory authorization entries, the opened replica stores, the
//! limit on concurrent cycles, the agent-wide sending limit and the data path runtime. Nothing here holds a VM's state: that is owned by the VM's
//! task (`vm.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;
use vmr_proto::api::{AgentConfig, AllowEntry};

use crate::db::Db;
use crate::errors::AgentError;
use crate::events::EventLog;
use crate::heap::DataActivity;
use crate::pace::AgentPace;
use crate::slots::CycleSlots;
use crate::telemetry::Telemetry;
use crate::witness::Witness;
use vmr_proto::lease::{LeaseEntry, WitnessRequest, WitnessResponse};
use vmr_proto::record::VmRecord;

/// Host-wide resources of the agent.
pub struct Host {
    /// The agent directory.
    pub dir: PathBuf,
    /// Loaded config.
    pub config: AgentConfig,
    /// TLS identity.
    pub identity: vmr_transport::Identity,
    /// State database. Each VM's record is written only by that VM's owner task; the
    /// authorization entries only by the control API.
    db: Mutex<Db>,
    /// Authorization entries, loaded once and kept in step with the database, so that the
    /// authorization of a request never reads SQLite.
    allow: RwLock<Vec<AllowEntry>>,
    /// Replica stores by storage directory.
    stores: Mutex<BTreeMap<PathBuf, vmr_store::Store>>,
    /// Limits how many cycles run at once.
    pub cycle_slots: CycleSlots,
    /// The data path's running work (cycle slots held, incoming cycles); the heap's free
    /// memory is given back when it ends.
    pub activity: DataActivity,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// The event log (and its sinks).
    pub events: EventLog,
    /// Monitoring counters and recent cycles of every VM (each written by its owner).
    pub telemetry: Telemetry,
    /// The agent-wide sending limit, shared by every primary VM's cycles.
    pub pace: Arc<AgentPace>,
    /// The consistency groups' cut coordinator (docs/groups.md).
    pub groups: crate::groups::Groups,
    /// The runtime primary cycles run on, and its threads' CPU priority.
    pub data: crate::datapath::DataPathHandle,
    /// The witness role: the leases of the VM relationships this agent is the witness of
    /// (docs/auto-failover.md).
    witness: Witness,
}

impl Host {
    /// Open the host's resources.
    pub fn open(
        dir: PathBuf,
        config: AgentConfig,
        identity: vmr_transport::Identity,
        db: Db,
        data: crate::datapath::DataPathHandle,
    ) -> Result<Host, AgentError> {
        let allow = db.allowed()?;
        let witness = Witness::restore(db.leases()?);
        let events = EventLog::open(&dir.join("state.db"), &config.name, &config.events)?;
        let pace = Arc::new(AgentPace::new(config.bandwidth.clone(), config.time_zone));
        let activity = DataActivity::default();
        Ok(Host {
            dir,
            // At least 1: `load_config` refuses 0.
            cycle_slots: CycleSlots::new(config.max_concurrent_cycles, activity.clone()),
            activity,
            config,
            identity,
            db: Mutex::new(db),
            allow: RwLock::new(allow),
            stores: Mutex::new(BTreeMap::new()),
            shutdown: CancellationToken::new(),
            events,
            telemetry: Telemetry::default(),
            pace,
            groups: crate::groups::Groups::default(),
            data,
            witness,
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        // A poisoned lock holds no half-written state: every write is one SQLite transaction.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One `witness` call from the agent of fingerprint `caller` (the lease change stored
    /// before the answer).
    pub fn witness_call(
        &self,
        caller: &str,
        req: &WitnessRequest,
    ) -> Result<WitnessResponse, AgentError> {
        Ok(self.witness.call(&self.db(), caller, req)?)
    }

    /// The leases this agent keeps as a witness, each with the milliseconds it has left.
    pub fn witness_leases(&self) -> Vec<(LeaseEntry, u64)> {
        self.witness.leases()
    }

    /// Save a VM record. Called only by the VM's owner (and by the registry when it creates
    /// or removes the VM).
    pub fn save_vm(&self, rec: &VmRecord) -> Result<(), AgentError> {
        Ok(self.db().put_vm(rec)?)
    }

    /// Delete a VM's record (`vm remove`, `replica remove`). Called only by the VM's owner,
    /// which stops right after.
    pub fn delete_vm(&self, name: &str) -> Result<(), AgentError> {
        self.db().delete_vm(name)?;
        Ok(())
    }

    /// Every VM record (agent start).
    pub fn load_vms(&self) -> Result<Vec<VmRecord>, AgentError> {
        Ok(self.db().vms()?)
    }

    /// Add or replace an authorization entry (database first, then the in-memory copy); a
    /// fingerprint another primary's entry holds is refused.
    pub fn put_allow(&self, entry: AllowEntry) -> Result<(), AgentError> {
        if let Some(other) = self
            .allowed()
            .into_iter()
            .find(|e| e.fingerprint == entry.fingerprint && e.primary != entry.primary)
        {
            return Err(AgentError::DuplicateFingerprint {
                fingerprint: entry.fingerprint,
                primary: other.primary,
            });
        }
        self.db().put_allow(&entry)?;
        let mut allow = self.allow.write().unwrap_or_else(|p| p.into_inner());
        allow.retain(|e| e.primary != entry.primary);
        allow.push(entry);
        allow.sort_by(|a, b| a.primary.cmp(&b.primary));
        Ok(())
    }

    /// Revoke the entry of `primary` (`server deny`): from now on its fingerprint authorizes
    /// nothing, also on connections already open; the entry (its storage) stays.
    pub fn revoke_allow(&self, primary: &str) -> Result<AllowEntry, AgentError> {
        let mut entry = self
            .allowed()
            .into_iter()
            .find(|e| e.primary == primary)
            .ok_or_else(|| AgentError::UnknownAllowEntry {
                primary: primary.to_owned(),
            })?;
        entry.revoked = true;
        self.put_allow(entry.clone())?;
        Ok(entry)
    }

    /// Delete the entry of `primary` (`server remove`; the caller checks that no replica VM
    /// needs it).
    pub fn remove_allow(&self, primary: &str) -> Result<(), AgentError> {
        if !self.db().remove_allow(primary)? {
            return Err(AgentError::UnknownAllowEntry {
                primary: primary.to_owned(),
            });
        }
        self.allow
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.primary != primary);
        Ok(())
    }

    /// All authorization entries.
    pub fn allowed(&self) -> Vec<AllowEntry> {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The authorization entry for a certificate fingerprint (never a revoked one).
    pub fn allow_entry(&self, fingerprint: &str) -> Option<AllowEntry> {
        self.allow
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| e.fingerprint == fingerprint && !e.revoked)
            .cloned()
    }

    /// The storage directory of replica VMs of `primary` (its `server allow` entry, or the
    /// agent's default storage).
    pub fn storage_of(&self, primary: &str) -> PathBuf {
        self.allow
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| e.primary == primary)
            .map_or_else(
                || PathBuf::from(&self.config.storage),
                |e| PathBuf::from(&e.storage),
            )
    }

    /// The replica store at `root`, opened once.
    pub fn store(&self, root: &Path) -> Result<vmr_store::Store, AgentError> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(root) {
            return Ok(s.clone());
        }
        let s = vmr_store::Store::open(root).map_err(|source| AgentError::OpenStore {
            root: root.to_path_buf(),
            source,
        })?;
        stores.insert(root.to_path_buf(), s.clone());
        Ok(s)
    }

    /// The store holding replica VM `rec`.
    pub fn store_of(&self, rec: &VmRecord) -> Result<vmr_store::Store, AgentError> {
        self.store(&self.storage_of(&rec.primary))
    }

    /// Every storage directory replica VMs can live in.
    pub fn storage_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self
            .allowed()
            .into_iter()
            .map(|e| PathBuf::from(e.storage))
            .collect();
        roots.push(PathBuf::from(&self.config.storage));
        roots.sort();
        roots.dedup();
        roots
    }
}
