//! The agent (a library under the `vmreplica` binary): one per host, primary for some VMs and replica for others.
//!
//! It owns the state database, the control socket the CLI talks to, the mutual-TLS listener
//! other agents send cycles to, one driver task per replicating primary VM, and the replica
//! stores. Decisions are made by `vmr-core`'s machines; this module only carries them out.
//!
//! Architecture Invariant: a primary VM's machine is only stepped while holding its lock, and
//! every `Persist` action is written to SQLite before the next cycle starts.

pub mod config;
mod control;
pub mod db;
mod export;
mod failover;
pub mod launch;
mod primary;
mod replica;
mod resync;
pub mod util;

/// Exit codes of the `vmreplica` command (see README.md, "Exit codes"). The agent attaches
/// them to its errors so that the CLI exits with the code the control API answered.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed.
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: i32 = 2;
    /// The local agent is not running or not reachable.
    pub const NO_AGENT: i32 = 3;
    /// The named VM (or entry) does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// The operation is not allowed in the current state.
    pub const INVALID_STATE: i32 = 5;
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::Notify;
use vmr_proto::api::{AgentConfig, AllowEntry, ReplicationMode, VmRecord};

use crate::config::load_config;

/// Shared agent state.
pub struct Agent {
    /// The agent directory.
    pub dir: PathBuf,
    /// Loaded config.
    pub config: AgentConfig,
    /// TLS identity.
    pub identity: vmr_transport::Identity,
    /// State database.
    pub db: Mutex<db::Db>,
    /// Primary VMs with replication enabled: their driver handles.
    pub primaries: Mutex<BTreeMap<String, Arc<primary::PrimaryVm>>>,
    /// Replica stores by storage directory.
    pub stores: Mutex<BTreeMap<PathBuf, vmr_store::Store>>,
    /// Limits how many cycles run at once.
    pub cycle_slots: Arc<tokio::sync::Semaphore>,
    /// Signalled on shutdown.
    pub shutdown: Arc<Notify>,
    /// Per replica VM apply serialisation and statistics.
    pub replica_vms: Mutex<BTreeMap<uuid::Uuid, Arc<replica::ReplicaVm>>>,
}

impl Agent {
    /// Lock the database (poisoning is not recoverable state corruption: the data is in SQLite).
    pub fn db(&self) -> std::sync::MutexGuard<'_, db::Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Find a VM record by name.
    pub fn vm_record(&self, name: &str) -> anyhow::Result<Option<VmRecord>> {
        Ok(self.db().vms()?.into_iter().find(|r| r.name == name))
    }

    /// Find a VM record by UUID.
    pub fn vm_by_uuid(&self, uuid: uuid::Uuid) -> anyhow::Result<Option<VmRecord>> {
        Ok(self.db().vms()?.into_iter().find(|r| r.uuid == uuid))
    }

    /// The authorization entry for a fingerprint.
    pub fn allow_entry(&self, fingerprint: &str) -> anyhow::Result<Option<AllowEntry>> {
        Ok(self
            .db()
            .allowed()?
            .into_iter()
            .find(|e| e.fingerprint == fingerprint))
    }

    /// The replica store at `root`, opened once.
    pub fn store(&self, root: &Path) -> anyhow::Result<vmr_store::Store> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(root) {
            return Ok(s.clone());
        }
        let s = vmr_store::Store::open(root)
            .with_context(|| format!("opening replica store {}", root.display()))?;
        stores.insert(root.to_path_buf(), s.clone());
        Ok(s)
    }
}

/// Run the agent until SIGINT/SIGTERM.
pub fn run_blocking(dir: &Path) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMREPLICA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Structured logs: VMREPLICA_LOG_FORMAT=json gives one JSON object per event (for journald
    // or a log shipper); the default is human-readable text.
    if std::env::var("VMREPLICA_LOG_FORMAT").is_ok_and(|f| f == "json") {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(dir))
}

async fn run(dir: &Path) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir)?;
    let config = load_config(&dir)?;
    let identity = vmr_transport::Identity::load(&dir).context("loading the TLS identity")?;
    let db = db::Db::open(&dir.join("state.db"))?;
    let agent = Arc::new(Agent {
        dir: dir.clone(),
        cycle_slots: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_cycles.max(1),
        )),
        config,
        identity,
        db: Mutex::new(db),
        primaries: Mutex::new(BTreeMap::new()),
        stores: Mutex::new(BTreeMap::new()),
        shutdown: Arc::new(Notify::new()),
        replica_vms: Mutex::new(BTreeMap::new()),
    });

    // Replica side first: recover the stores (interrupted cycles, prunes, old staged cycles).
    replica::recover_all(&agent).await?;
    let server = replica::start_server(&agent).await?;
    let control = control::start(&agent).await?;

    // Primary side: resume every enabled VM (an in-flight cycle was merged back by capture).
    let records = agent.db().vms()?;
    for rec in records {
        if rec.mode == ReplicationMode::Primary && rec.enable.is_some() {
            primary::spawn(&agent, rec, true)?;
        }
    }
    tracing::info!(name = %agent.config.name, listen = %server, control = %control.display(), "agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    agent.shutdown.notify_waiters();
    let handles: Vec<_> = {
        let p = agent.primaries.lock().unwrap_or_else(|p| p.into_inner());
        p.values().cloned().collect()
    };
    for vm in handles {
        vm.stop().await;
    }
    let _ = std::fs::remove_file(control);
    Ok(())
}
