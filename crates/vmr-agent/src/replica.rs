//! Replica side of the agent: the mutual-TLS server other agents send to, authorization by the
//! `server allow` entries and trust groups, writing received cycles into the replica store
//! (acknowledged only once committed as a recovery point), bookkeeping and pruning in the
//! background, and the replica VMs' state, status and recovery points.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use vmr_core::replica_health;
use vmr_proto::CycleHeader;
use vmr_proto::api::{
    CreateReplica, PointInfo, ReplicaVmInfo, ReplicationMode, ReplicationState, ReplicationStats,
    VmRecord, VmStatus,
};
use vmr_proto::wire::{CycleAck, RemoteError};
use vmr_store::{RetentionPolicy, Store, StoreError};
use vmr_transport::{Authorize, ExtentStream, Handler, Peer, Server};

use super::Agent;
use crate::util::now_ms;

/// Per replica VM: serialises applies.
#[derive(Default)]
pub struct ReplicaVm {
    apply: tokio::sync::Mutex<()>,
}

fn replica_vm(agent: &Agent, uuid: uuid::Uuid) -> Arc<ReplicaVm> {
    agent
        .replica_vms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(uuid)
        .or_default()
        .clone()
}

fn storage_of(agent: &Agent, rec: &VmRecord) -> anyhow::Result<PathBuf> {
    let entries = agent.db().allowed()?;
    let e = entries.iter().find(|e| e.primary == rec.primary);
    Ok(PathBuf::from(
        e.map_or(agent.config.storage.as_str(), |e| e.storage.as_str()),
    ))
}

pub(super) fn store_of(agent: &Agent, rec: &VmRecord) -> anyhow::Result<Store> {
    agent.store(&storage_of(agent, rec)?)
}

/// Recover every store (agent start): interrupted cycles' pending layers deleted, interrupted
/// prunes completed, cycles an older version staged replayed.
pub async fn recover_all(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let mut roots: Vec<PathBuf> = agent
        .db()
        .allowed()?
        .into_iter()
        .map(|e| PathBuf::from(e.storage))
        .collect();
    roots.push(PathBuf::from(&agent.config.storage));
    roots.sort();
    roots.dedup();
    for root in roots {
        if !root.exists() {
            continue;
        }
        let store = agent.store(&root)?;
        store
            .recover()
            .await
            .with_context(|| format!("recovering replica store {}", root.display()))?;
    }
    // Bring records in line with what the stores hold.
    let records = agent.db().vms()?;
    for mut rec in records {
        if rec.mode != ReplicationMode::Replica {
            continue;
        }
        if let Ok(store) = store_of(agent, &rec)
            && let Ok(latest) = store.latest_point(rec.uuid)
            && latest != rec.last_cycle
        {
            rec.last_cycle = latest;
            agent.db().put_vm(&rec)?;
        }
    }
    Ok(())
}

struct Auth(Arc<Agent>);

impl Authorize for Auth {
    fn authorize(&self, fingerprint: &str) -> Option<Peer> {
        match self.0.allow_entry(fingerprint) {
            Ok(Some(e)) => Some(Peer {
                name: e.primary,
                fingerprint: e.fingerprint,
                trust_group: Some(e.trust_group),
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::error!("authorization lookup failed: {e:#}");
                None
            }
        }
    }
}

struct ReplicaHandler(Arc<Agent>);

/// Bind the replication listener from the config and serve it in the background.
pub async fn start_server(agent: &Arc<Agent>) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr =
        agent.config.listen.parse().with_context(|| {
            format!("listen address {:?} is not HOST:PORT", agent.config.listen)
        })?;
    let server = Server::bind(
        addr,
        &agent.identity,
        Arc::new(Auth(agent.clone())),
        Arc::new(ReplicaHandler(agent.clone())),
    )
    .await
    .with_context(|| format!("binding the replication listener {addr}"))?;
    let local = server.local_addr();
    let shutdown = agent.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = server.run(async move { shutdown.notified().await }).await {
            tracing::error!("replication listener stopped: {e}");
        }
    });
    Ok(local)
}

pub(super) fn internal(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Internal {
        message: e.to_string(),
    }
}

pub(super) fn store_err(e: StoreError) -> RemoteError {
    match e {
        StoreError::WrongBase { expected, got, .. } => RemoteError::WrongBase { expected, got },
        StoreError::UnknownVm(vm) => RemoteError::UnknownVm { vm },
        ref err if err.is_disk_full() => RemoteError::DiskFull {
            message: crate::util::chain(err),
        },
        StoreError::CorruptExtent { .. } => RemoteError::CorruptExtent { index: 0 },
        // Not retryable: the primary stops in Error with this message.
        ref err @ StoreError::DiskShrunk { .. } => RemoteError::BadRequest {
            message: err.to_string(),
        },
        other => RemoteError::Internal {
            message: crate::util::chain(&other),
        },
    }
}

impl ReplicaHandler {
    /// The replica VM record for `uuid`, checked against the peer's trust group.
    fn authorized_vm(&self, peer: &Peer, uuid: uuid::Uuid) -> Result<VmRecord, RemoteError> {
        let rec = self
            .0
            .vm_by_uuid(uuid)
            .map_err(internal)?
            .filter(|r| r.mode == ReplicationMode::Replica)
            .ok_or(RemoteError::UnknownVm { vm: uuid })?;
        if rec.trust_group != peer.trust_group {
            tracing::warn!(peer = %peer.name, vm = %uuid, "refused: peer is not in the VM's trust group");
            return Err(RemoteError::TrustGroup {
                message: format!(
                    "replica VM {uuid} belongs to trust group {:?}; primary {:?} is in {:?}",
                    rec.trust_group, peer.name, peer.trust_group
                ),
            });
        }
        Ok(rec)
    }

    async fn create(&self, peer: &Peer, req: CreateReplica) -> Result<Value, RemoteError> {
        let agent = &self.0;
        if let Some(rec) = agent.vm_by_uuid(req.uuid).map_err(internal)? {
            let rec = self.authorized_vm(peer, rec.uuid)?;
            // Idempotent: refresh definition and policy.
            let store = store_of(agent, &rec).map_err(internal)?;
            store
                .set_definition(rec.uuid, &req.launch_toml)
                .map_err(store_err)?;
            store
                .set_retention(
                    rec.uuid,
                    RetentionPolicy {
                        hourly: req.recovery_points,
                        app_consistent_every_hours: None,
                    },
                )
                .map_err(store_err)?;
            let mut rec = rec;
            if rec.state == ReplicationState::Disabled {
                rec.state = if rec.last_cycle.is_some() {
                    ReplicationState::Replicating
                } else {
                    ReplicationState::WaitingForInitialReplication
                };
            }
            rec.launch_toml = req.launch_toml;
            agent.db().put_vm(&rec).map_err(internal)?;
            return Ok(json!({ "created": false }));
        }
        if agent.vm_record(&req.name).map_err(internal)?.is_some() {
            return Err(RemoteError::BadRequest {
                message: format!(
                    "a different VM named {:?} already exists on this replica",
                    req.name
                ),
            });
        }
        let entry = agent
            .db()
            .allowed()
            .map_err(internal)?
            .into_iter()
            .find(|e| e.fingerprint == peer.fingerprint)
            .ok_or(RemoteError::Unauthorized)?;
        let store = agent
            .store(std::path::Path::new(&entry.storage))
            .map_err(internal)?;
        store
            .add_vm(
                req.uuid,
                &req.launch_toml,
                RetentionPolicy {
                    hourly: req.recovery_points,
                    app_consistent_every_hours: None,
                },
            )
            .map_err(store_err)?;
        let rec = VmRecord {
            name: req.name.clone(),
            uuid: req.uuid,
            mode: ReplicationMode::Replica,
            qmp: String::new(),
            launch_toml: req.launch_toml,
            disks: req.disks.iter().map(|d| d.id.clone()).collect(),
            enable: None,
            state: ReplicationState::WaitingForInitialReplication,
            paused_from: None,
            last_cycle: None,
            disk_sizes: None,
            stats: ReplicationStats {
                window_start_ms: now_ms(),
                ..Default::default()
            },
            initial_at_ms: None,
            primary: peer.name.clone(),
            trust_group: peer.trust_group.clone(),
            last_error: None,
        };
        agent.db().put_vm(&rec).map_err(internal)?;
        tracing::info!(vm = %req.name, uuid = %req.uuid, primary = %peer.name, "replica VM created");
        Ok(json!({ "created": true }))
    }
}

impl Handler for ReplicaHandler {
    async fn receive_cycle(
        &self,
        peer: &Peer,
        header: CycleHeader,
        mut extents: ExtentStream,
    ) -> Result<CycleAck, RemoteError> {
        let agent = self.0.clone();
        let rec = self.authorized_vm(peer, header.vm)?;
        if rec.state == ReplicationState::Suspended {
            return Err(RemoteError::Unavailable {
                message: "replication is paused on the replica".into(),
            });
        }
        if matches!(
            rec.state,
            ReplicationState::FailedOverWaitingCompletion | ReplicationState::FailedOver
        ) {
            return Err(RemoteError::BadRequest {
                message: format!("the replica VM is {}", rec.state),
            });
        }
        let store = store_of(&agent, &rec).map_err(internal)?;
        if header.kind == vmr_proto::CycleKind::Resync {
            return super::resync::receive(&agent, &store, header, extents).await;
        }
        let (vm, id) = (header.vm, header.id);
        let mut writer = store.begin_cycle(header).await.map_err(store_err)?;
        if writer.is_duplicate() {
            // The replica already holds this cycle id: the primary's reconciliation
            // (replica-info) prevents sending one, so this is a stale retry. Refuse it rather
            // than acknowledge content we did not store.
            return Err(RemoteError::WrongBase {
                expected: store.latest_cycle(vm).ok().flatten(),
                got: Some(id),
            });
        }
        let (mut count, mut bytes) = (0u64, 0u64);
        while let Some(item) = extents.next().await {
            let (extent, sum) = item.map_err(|e| e.to_remote())?;
            bytes += extent.len();
            count += 1;
            writer.put(&extent, sum).await.map_err(store_err)?;
        }
        let point = writer.finish().await.map_err(store_err)?;
        // Committed as a recovery point: acknowledge now, bookkeeping and pruning in the
        // background.
        let agent2 = agent.clone();
        tokio::spawn(async move {
            committed(&agent2, vm, point, bytes).await;
        });
        Ok(CycleAck {
            vm,
            cycle: id,
            extents: count,
            bytes,
        })
    }

    async fn call(&self, peer: &Peer, method: &str, body: Value) -> Result<Value, RemoteError> {
        match method {
            "create-replica" => {
                let req: CreateReplica =
                    serde_json::from_value(body).map_err(|e| RemoteError::BadRequest {
                        message: format!("create-replica: {e}"),
                    })?;
                self.create(peer, req).await
            }
            "replica-info" => {
                let uuid: uuid::Uuid = body
                    .get("uuid")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| RemoteError::BadRequest {
                        message: "replica-info needs a uuid".into(),
                    })?;
                let rec = self.authorized_vm(peer, uuid)?;
                if let Some(listen) = body.get("listen").and_then(Value::as_str) {
                    super::failover::remember_primary(&self.0, uuid, listen);
                }
                let store = store_of(&self.0, &rec).map_err(internal)?;
                let latest = store.latest_cycle(uuid).map_err(store_err)?;
                serde_json::to_value(ReplicaVmInfo {
                    uuid,
                    latest,
                    state: rec.state,
                })
                .map_err(internal)
            }
            "primary-vm-state" => {
                let uuid: uuid::Uuid = body
                    .get("uuid")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| RemoteError::BadRequest {
                        message: "primary-vm-state needs a uuid".into(),
                    })?;
                super::failover::primary_vm_state(&self.0, uuid).await
            }
            "become-replica" => {
                let req: vmr_proto::api::BecomeReplica =
                    serde_json::from_value(body).map_err(|e| RemoteError::BadRequest {
                        message: format!("become-replica: {e}"),
                    })?;
                super::failover::become_replica(&self.0, peer, req).await
            }
            "resync-hashes" => {
                super::resync::hashes_call(&self.0, |uuid| self.authorized_vm(peer, uuid), body)
                    .await
            }
            other => Err(RemoteError::BadRequest {
                message: format!("unknown method {other:?}"),
            }),
        }
    }
}

/// Bookkeeping after a cycle was committed as `point` (and acknowledged): statistics, state,
/// then pruning by the retention policy. Serialised per VM.
pub(super) async fn committed(
    agent: &Arc<Agent>,
    vm: uuid::Uuid,
    point: vmr_store::RecoveryPoint,
    bytes: u64,
) {
    let rv = replica_vm(agent, vm);
    let _guard = rv.apply.lock().await;
    let Ok(Some(mut rec)) = agent.vm_by_uuid(vm) else {
        return;
    };
    let store = match store_of(agent, &rec) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%vm, "no store: {e:#}");
            return;
        }
    };
    let now = now_ms();
    rec.last_cycle = rec.last_cycle.max(Some(point.id));
    if rec.state == ReplicationState::WaitingForInitialReplication {
        rec.state = ReplicationState::Replicating;
    }
    rec.stats.successful_cycles += 1;
    rec.stats.total_bytes += bytes;
    rec.stats.max_bytes = rec.stats.max_bytes.max(bytes);
    rec.stats.last_replication_ms = Some(now);
    if point.kind == vmr_store::PointKind::AppConsistent {
        rec.stats.last_app_consistent_ms = Some(now);
    }
    rec.last_error = None;
    if let Err(e) = store.prune(vm).await {
        tracing::warn!(%vm, "pruning failed (retried after the next cycle): {e}");
    }
    if let Err(e) = agent.db().put_vm(&rec) {
        tracing::error!(%vm, "saving replica state: {e:#}");
    }
}

/// `vmreplica import NAME DIR` on the replica: load an exported initial copy (its manifest
/// names the cycle file; the VM must match and the file's BLAKE3 must verify) or disk images
/// (`<disk>.qcow2|raw|img`) as a new recovery point. Serialised with applies of the VM.
pub async fn import(
    agent: &Arc<Agent>,
    mut rec: VmRecord,
    dir: &std::path::Path,
) -> anyhow::Result<Value> {
    let rv = replica_vm(agent, rec.uuid);
    let _guard = rv.apply.lock().await;
    let store = store_of(agent, &rec)?;
    let manifest_path = dir.join(vmr_proto::api::EXPORT_MANIFEST);
    let (point, what) = if manifest_path.exists() {
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let m: vmr_proto::api::ExportManifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        if m.format != 1 {
            anyhow::bail!(
                "{}: unsupported format {}",
                manifest_path.display(),
                m.format
            );
        }
        if m.vm != rec.uuid {
            return Err(crate::util::coded(
                crate::exit::INVALID_STATE,
                format!(
                    "the copy in {} is of VM {} ({:?}), not of {:?} ({})",
                    dir.display(),
                    m.vm,
                    m.name,
                    rec.name,
                    rec.uuid
                ),
            ));
        }
        if !vmr_proto::api::valid_file_name(&m.file) {
            anyhow::bail!("{}: bad file name {:?}", manifest_path.display(), m.file);
        }
        let file = dir.join(&m.file);
        let sum = blake3_file(&file)?;
        if sum != m.file_blake3 {
            anyhow::bail!(
                "{} is damaged: its BLAKE3 is {sum}, the manifest says {}",
                file.display(),
                m.file_blake3
            );
        }
        let p = store
            .import_cycle_file(&file)
            .await
            .with_context(|| format!("importing {}", file.display()))?;
        (p, format!("the initial copy exported by {:?}", m.name))
    } else {
        let images = vmr_store::find_images(dir, &rec.disks)?;
        let p = store
            .import_images(rec.uuid, &images)
            .await
            .with_context(|| format!("importing disk images from {}", dir.display()))?;
        (p, format!("{} disk image(s)", images.len()))
    };
    rec.last_cycle = Some(point.id);
    if rec.state == ReplicationState::WaitingForInitialReplication {
        rec.state = ReplicationState::Replicating;
    }
    rec.stats.last_replication_ms = Some(now_ms());
    agent.db().put_vm(&rec)?;
    tracing::info!(vm = %rec.name, point = point.id, dir = %dir.display(), "imported {what}");
    Ok(json!(format!(
        "imported {what} from {} as recovery point {} of {}",
        dir.display(),
        point.id,
        rec.name
    )))
}

/// Hex BLAKE3 of a file, streamed.
pub fn blake3_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// Set a replica VM's state (pause/resume/disable on the replica).
pub fn set_state(
    agent: &Arc<Agent>,
    mut rec: VmRecord,
    state: ReplicationState,
) -> anyhow::Result<Value> {
    let before = rec.state;
    rec.state = state;
    agent.db().put_vm(&rec)?;
    Ok(json!(format!("{}: {before} -> {state}", rec.name)))
}

/// Reset a replica VM's statistics window.
pub fn reset_stats(agent: &Arc<Agent>, uuid: uuid::Uuid) -> anyhow::Result<()> {
    if let Some(mut rec) = agent.vm_by_uuid(uuid)?
        && rec.mode == ReplicationMode::Replica
    {
        rec.stats = ReplicationStats {
            window_start_ms: now_ms(),
            last_replication_ms: rec.stats.last_replication_ms,
            last_app_consistent_ms: rec.stats.last_app_consistent_ms,
            ..Default::default()
        };
        agent.db().put_vm(&rec)?;
    }
    Ok(())
}

/// Recovery points of a replica VM.
pub fn points(agent: &Arc<Agent>, rec: &VmRecord) -> anyhow::Result<Vec<PointInfo>> {
    let store = store_of(agent, rec)?;
    Ok(store
        .points(rec.uuid)?
        .into_iter()
        .map(|p| PointInfo {
            id: p.id,
            time_ms: p.taken_at_ms,
            kind: serde_json::to_value(p.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            size_bytes: p.size_on_disk,
        })
        .collect())
}

/// The status row of a replica VM.
pub fn status(agent: &Arc<Agent>, rec: &VmRecord, now: u64) -> VmStatus {
    let h = replica_health(rec.state, &rec.stats, now);
    let mut reason = h.reason();
    if let Some(e) = &rec.last_error {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&format!("last apply failed: {e}"));
    }
    VmStatus {
        name: rec.name.clone(),
        uuid: rec.uuid,
        state: rec.state,
        health: if rec.last_error.is_some() {
            vmr_proto::api::Health::Critical
        } else {
            h.health
        },
        health_reason: reason,
        mode: ReplicationMode::Replica,
        frequency_secs: 0,
        primary: rec.primary.clone(),
        replica: agent.config.name.clone(),
        last_replication_ms: rec.stats.last_replication_ms,
        last_cycle: rec.last_cycle,
        stats: rec.stats.clone(),
        progress: None,
    }
}
