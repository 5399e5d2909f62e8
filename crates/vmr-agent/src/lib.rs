//! The agent (a library under the `vmreplica` binary): one per host, primary for some VMs and replica for others.
//!
//! It owns the state database, the control socket the CLI talks to, the mutual-TLS listener
//! other agents send cycles to, and one owner task per VM (`vm.rs`) that holds the VM's
//! record, its decision machine and its capture session or store. Decisions are made by
//! `vmr-core`'s machines; this crate carries them out.
//!
//! Layers, lowest first (a module imports only modules below it): `exit`, `util`, `heap` →
//! `slots`, `db` → `sinks` → `events` → `errors` → `telemetry` → `config`, `launch`, `lock`,
//! `host` → `owned`, `cycle` → `resync`, `export` → `replica` → `primary` → `failover` →
//! `autofail` → `vm` → `server`, `control`, `http` → `dashboard` → this file.
//!
//! Architecture Invariant: a VM's record is written only by its owner task, and every
//! `Persist` action is written to SQLite before the next cycle starts.

mod autofail;
pub mod config;
mod control;
mod cycle;
mod dashboard;
mod datapath;
pub mod db;
mod errors;
pub mod events;
pub mod exit;
mod export;
mod extended;
mod failover;
mod groups;
mod guestnet;
mod heap;
mod host;
mod http;
mod imaged;
pub mod launch;
mod lock;
mod lvfailover;
mod lvprepare;
mod owned;
mod pace;
mod primary;
mod replica;
mod resync;
mod server;
mod shutdown;
mod sinks;
mod slots;
pub mod telemetry;
pub mod util;
mod verify;
mod vm;
mod witness;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use crate::errors::{AgentError, FanoutRefusal};

use crate::config::load_config;
use crate::host::Host;
use crate::vm::{Command, Registry};

/// `vmreplica fence-watchdog` (started by the agent's auto-failover guard, never by hand):
/// fences the VM of the QMP socket `qmp` when the right to run the agent last told it of runs
/// out (`docs/auto-failover.md`).
pub fn run_fence_watchdog(qmp: &str, power_off: bool) -> Result<(), AgentError> {
    autofail::run_fence_watchdog(qmp, power_off)
}

/// Run the agent until SIGINT/SIGTERM.
pub fn run_blocking(dir: &Path) -> Result<(), AgentError> {
    // Before anything else (recovery, state.db, binding): one agent per directory. A missing
    // directory is reported by the config loader below ("run `vmreplica init` first").
    let _lock = if dir.is_dir() {
        Some(lock::DirLock::acquire(dir)?)
    } else {
        None
    };
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
    heap::keep_buffers_mapped();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| AgentError::System {
            doing: "starting the async runtime",
            source,
        })?;
    // Cycles run on a runtime of their own whose threads' CPU priority follows
    // `cpu-priority`; it outlives the control plane's, whose shutdown ends the cycles first.
    let data = datapath::DataPath::start()?;
    let r = rt.block_on(run(dir, data.handle()));
    drop(rt);
    drop(data);
    r
}

async fn run(dir: &Path, data: datapath::DataPathHandle) -> Result<(), AgentError> {
    let dir = std::path::absolute(dir).map_err(AgentError::io("resolving", dir))?;
    let config = load_config(&dir)?;
    config::check_key_mode(&dir)?;
    let metrics = config::metrics_config(&dir, &config)?;
    let identity = vmr_transport::Identity::load(&dir).map_err(|source| AgentError::Identity {
        doing: "loading",
        source,
    })?;
    let db = db::Db::open(&dir.join("state.db"))?;
    data.set_priority(config.cpu_priority)?;
    let host = Arc::new(Host::open(dir.clone(), config, identity, db, data)?);
    let vms = Arc::new(Registry::default());

    // Replica side first: replay staged cycles so that what was acknowledged is applied.
    for root in host.storage_roots() {
        if !root.exists() {
            continue;
        }
        let store = host.store(&root)?;
        store
            .recover()
            .await
            .map_err(|source| AgentError::RecoverStore {
                root: root.clone(),
                source,
            })?;
    }
    // One owner per VM; a primary resumes its cycles (an in-flight one was merged back).
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rec in host.load_vms()? {
        if let Some(g) = &rec.group {
            groups.entry(g.clone()).or_default().push(rec.name.clone());
        }
        vms.spawn(&host, rec, true)?;
    }
    for (g, members) in groups {
        host.groups.set_members(&g, members);
    }
    // A group cut asks its members' owners for a cycle now.
    if let Some(mut nudges) = host.groups.take_nudges() {
        let vms = vms.clone();
        tokio::spawn(async move {
            while let Some(n) = nudges.recv().await {
                match vms.by_uuid(n.vm) {
                    Some(h) => {
                        if !h.ask_raw(Command::GroupCycleNow(n.reply)).await {
                            tracing::debug!(vm = %n.vm, "a group member's owner is gone");
                        }
                    }
                    None => {
                        let _ = n.reply.send(Err("the VM is not registered".into()));
                    }
                }
            }
        });
    }
    let server = server::start(&host, &vms).await?;
    let control = control::start(Arc::new(control::Control {
        host: host.clone(),
        vms: vms.clone(),
    }))
    .await?;
    let monitor = match &metrics {
        None => None,
        Some(mc) => {
            let m = Arc::new(http::Monitor::new(
                host.clone(),
                vms.clone(),
                mc.token.clone(),
            ));
            Some(http::start(m, mc, dashboard::routes()).await?)
        }
    };
    if let Some(addr) = monitor {
        tracing::info!(%addr, token = metrics.as_ref().is_some_and(|m| m.token.is_some()), "monitoring listener ready");
    }
    tracing::info!(name = %host.config.name, listen = %server, control = %control.display(), "agent ready");
    host.events.emit(events::NewEvent::new(
        None,
        vmr_proto::event::EventKind::AgentStarted,
        vmr_proto::event::Severity::Info,
        format!(
            "agent {} started ({} VMs)",
            host.config.name,
            vms.all().len()
        ),
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::System {
            doing: "listening for SIGTERM",
            source,
        })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    host.events.emit(events::NewEvent::new(
        None,
        vmr_proto::event::EventKind::AgentStopped,
        vmr_proto::event::Severity::Info,
        format!("agent {} stopping", host.config.name),
    ));
    host.shutdown.cancel();
    for h in vms.all() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if h.ask_raw(Command::Shutdown(tx)).await {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(20), rx).await;
        }
    }
    let _ = std::fs::remove_file(control);
    // The writer thread stores what is queued (the stop event too) before the process ends.
    let _ = host
        .events
        .query(vmr_proto::event::EventQuery {
            limit: Some(1),
            ..Default::default()
        })
        .await;
    Ok(())
}
