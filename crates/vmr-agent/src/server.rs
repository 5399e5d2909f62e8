//! The mutual-TLS listener other agents call: authorization by the `server allow` entries
//! (kept in memory), creation of new replica VMs, and routing of every call and cycle to the
//! owner of its VM. A cycle is admitted by the owner, streamed here into the writer the owner
//! handed out, and made durable and recorded by the owner before it is acknowledged.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use vmr_proto::CycleHeader;
use vmr_proto::api::CreateReplica;
use vmr_proto::wire::{CycleAck, RemoteError};
use vmr_transport::{Authorize, ExtentStream, Handler, Peer, PeerRequest, PeerResponse, Server};

use crate::errors::{AgentError, internal, store_err};
use crate::host::Host;
use crate::util::now_ms;
use crate::vm::{Command, Registry, VmHandle};
use vmr_core::ReplicaMachine;
use vmr_proto::record::{MachineSnapshot, VmRecord};

struct Auth(Arc<Host>);

impl Authorize for Auth {
    fn authorize(&self, fingerprint: &str) -> Option<Peer> {
        self.0.allow_entry(fingerprint).map(|e| Peer {
            name: e.primary,
            fingerprint: e.fingerprint,
            trust_group: Some(e.trust_group),
            remote: None,
        })
    }
}

struct PeerHandler {
    host: Arc<Host>,
    vms: Arc<Registry>,
    /// Serialises creating new replica VMs.
    creating: tokio::sync::Mutex<()>,
}

/// Bind the replication listener from the config and serve it in the background.
pub async fn start(host: &Arc<Host>, vms: &Arc<Registry>) -> Result<SocketAddr, AgentError> {
    let addr: SocketAddr =
        host.config
            .listen
            .parse()
            .map_err(|source| AgentError::ListenAddress {
                listen: host.config.listen.clone(),
                source,
            })?;
    let server = Server::bind(
        addr,
        &host.identity,
        Arc::new(Auth(host.clone())),
        Arc::new(PeerHandler {
            host: host.clone(),
            vms: vms.clone(),
            creating: tokio::sync::Mutex::new(()),
        }),
    )
    .await
    .map_err(|e| AgentError::bind(addr, e))?;
    let local = server.local_addr();
    let shutdown = host.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = server.run(async move { shutdown.cancelled().await }).await {
            tracing::error!("replication listener stopped: {e}");
        }
    });
    Ok(local)
}

fn bad(m: impl Into<String>) -> RemoteError {
    RemoteError::BadRequest { message: m.into() }
}

/// Stream a cycle into its pending layers ([`vmr_store::LayerWriter`]). Returns the extents
/// and data bytes received; the VM's owner commits the writer.
async fn stream_into(
    writer: &mut vmr_store::LayerWriter,
    extents: &mut vmr_transport::ExtentStream,
) -> Result<(u64, u64), RemoteError> {
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(item) = extents.next().await {
        let checked = item.map_err(|e| e.to_remote())?;
        // Data bytes, as the primary counts them (a zero extent carries none).
        if let vmr_proto::ExtentData::Data(b) = &checked.extent().data {
            bytes += b.len() as u64;
        }
        count += 1;
        writer
            .put_checked(&checked)
            .await
            .map_err(crate::errors::store_err)?;
    }
    Ok((count, bytes))
}

impl PeerHandler {
    fn vm(&self, uuid: uuid::Uuid) -> Result<VmHandle, RemoteError> {
        self.vms
            .by_uuid(uuid)
            .ok_or(RemoteError::UnknownVm { vm: uuid })
    }

    /// Create the replica VM, or refresh it when it exists; true when it was created. Disk ids
    /// are checked first (sizes arrive with each cycle); a definition the store refuses is a
    /// 400 as well.
    async fn create(&self, peer: &Peer, req: CreateReplica) -> Result<bool, RemoteError> {
        vmr_proto::check_disk_ids(req.disks.iter().map(|d| d.id.as_str()))
            .map_err(|e| bad(format!("create-replica {}: {e}", req.uuid)))?;
        let _one = self.creating.lock().await;
        if let Some(h) = self.vms.by_uuid(req.uuid) {
            h.ask_peer(|r| Command::Refresh(peer.clone(), Box::new(req), r))
                .await?;
            return Ok(false);
        }
        if self.vms.get(&req.name).is_some() {
            return Err(bad(format!(
                "a different VM named {:?} already exists on this replica",
                req.name
            )));
        }
        let entry = self
            .host
            .allow_entry(&peer.fingerprint)
            .ok_or(RemoteError::Unauthorized)?;
        let store = self
            .host
            .store(std::path::Path::new(&entry.storage))
            .map_err(internal)?;
        let policy = req.retention();
        if store.vms().contains(&req.uuid) {
            // Kept by `replica remove --keep-data`: its points are the existing copy the new
            // replica VM starts from (the owner reads the latest one when it starts).
            store
                .set_definition(req.uuid, &req.launch_toml)
                .map_err(store_err)?;
            store.set_retention(req.uuid, policy).map_err(store_err)?;
        } else {
            store
                .add_vm(req.uuid, &req.launch_toml, policy)
                .map_err(store_err)?;
        }
        let rec = VmRecord {
            name: req.name.clone(),
            uuid: req.uuid,
            qmp: String::new(),
            launch_toml: req.launch_toml,
            disks: req.disks.iter().map(|d| d.id.clone()).collect(),
            enable: None,
            primary: peer.name.clone(),
            trust_group: peer.trust_group.clone(),
            frequency_secs: Some(req.frequency_secs),
            nbd: None,
            qga: None,
            failover: Default::default(),
            machine: MachineSnapshot::Replica(ReplicaMachine::new(now_ms()).snapshot()),
            rpo_alert_secs: None,
            extended: None,
            group: None,
            libvirt: None,
            fanout: Vec::new(),
            auto_failover: req.auto_failover.clone(),
            lease: Default::default(),
        };
        self.host.save_vm(&rec).map_err(internal)?;
        self.vms
            .spawn(&self.host, rec, false)
            .map_err(|e| internal(crate::util::chain(&e)))?;
        tracing::info!(vm = %req.name, uuid = %req.uuid, primary = %peer.name, "replica VM created");
        Ok(true)
    }
}

impl Handler for PeerHandler {
    async fn receive_cycle(
        &self,
        peer: &Peer,
        header: CycleHeader,
        mut extents: ExtentStream,
    ) -> Result<CycleAck, RemoteError> {
        let (vm, id) = (header.vm, header.id);
        let t = std::time::Instant::now();
        let h = self.vm(vm)?;
        // The extended relationship yields to this cycle until it ends (owned.rs `Incoming`).
        let _busy = h.incoming.busy();
        // Running data-path work until it ends (heap.rs: then the heap's free memory goes back).
        let _data = self.host.activity.busy();
        let (mut writer, cancel) = h
            .ask_peer(|r| Command::BeginCycle(peer.clone(), Box::new(header), r))
            .await?;
        let streamed = tokio::select! {
            r = stream_into(&mut writer, &mut extents) => r,
            () = cancel.cancelled() => Err(RemoteError::Unavailable {
                message: format!("a failover on this replica ended cycle {id} of VM {vm}"),
            }),
        };
        let (count, bytes) = match streamed {
            Ok(c) => c,
            Err(e) => {
                // A resync keeps what arrived for the next attempt; other kinds are dropped.
                writer.abort().await;
                // The writer released the chain: the owner runs a failover that waited for
                // it, and raises `store-full` for a full store (its event; the store is its
                // business).
                h.ask_raw(Command::StreamFailed(e.clone())).await;
                return Err(e);
            }
        };
        let streamed = t.elapsed();
        h.ask_peer(|r| Command::FinishCycle(writer, bytes, r))
            .await?;
        tracing::debug!(%vm, cycle = id, extents = count, bytes, streamed_ms = streamed.as_millis() as u64, acked_ms = t.elapsed().as_millis() as u64, "cycle received (ms since its request arrived)");
        Ok(CycleAck {
            vm,
            cycle: id,
            extents: count,
            bytes,
        })
    }

    async fn call(&self, peer: &Peer, req: PeerRequest) -> Result<PeerResponse, RemoteError> {
        Ok(match req {
            PeerRequest::CreateReplica(req) => PeerResponse::CreateReplica {
                created: self.create(peer, req).await?,
            },
            PeerRequest::ReplicaInfo(r) => PeerResponse::ReplicaInfo(
                self.vm(r.uuid)?
                    .ask_peer(|reply| Command::ReplicaInfo(peer.clone(), r.listen, reply))
                    .await?,
            ),
            PeerRequest::PrimaryVmState { uuid } => PeerResponse::PrimaryVmState(
                self.vm(uuid)?
                    .ask_peer(|r| Command::PrimaryState(peer.clone(), r))
                    .await?,
            ),
            PeerRequest::SourceVmState { uuid } => PeerResponse::SourceVmState(
                self.vm(uuid)?
                    .ask_peer(|r| Command::SourceState(peer.clone(), r))
                    .await?,
            ),
            PeerRequest::ContinueFrom(req) => PeerResponse::ContinueFrom(
                self.vm(req.uuid)?
                    .ask_peer(|r| Command::ContinueFrom(peer.clone(), req.point, r))
                    .await?,
            ),
            PeerRequest::Follow { uuid } => PeerResponse::Follow(
                self.vm(uuid)?
                    .ask_peer(|r| Command::Follow(peer.clone(), r))
                    .await?,
            ),
            PeerRequest::BecomeReplica(req) => PeerResponse::BecomeReplica(
                self.vm(req.uuid)?
                    .ask_peer(|r| Command::BecomeReplica(peer.clone(), Box::new(req), r))
                    .await?,
            ),
            PeerRequest::DisableReplica { uuid } => PeerResponse::DisableReplica {
                state: self
                    .vm(uuid)?
                    .ask_peer(|r| Command::PeerDisable(peer.clone(), r))
                    .await?,
            },
            PeerRequest::Witness { call } => PeerResponse::Witness {
                lease: self
                    .host
                    .witness_call(&peer.fingerprint, &call)
                    .map_err(internal)?,
            },
            PeerRequest::Promise { uuid } => PeerResponse::Promise(
                self.vm(uuid)?
                    .ask_peer(|r| Command::Promise(peer.clone(), r))
                    .await?,
            ),
            PeerRequest::ResyncHashes(req) => PeerResponse::ResyncHashes(
                self.vm(req.uuid)?
                    .ask_peer(|r| Command::Hashes(peer.clone(), req, r))
                    .await?,
            ),
        })
    }
}
