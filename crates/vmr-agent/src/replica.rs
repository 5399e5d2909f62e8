//! The replica side of one VM, as its owner runs it: admitting or refusing a cycle, recording
//! applied cycles, pause/resume/disable, recovery points, `vmreplica import` (the job its
//! task runs, and its progress), status. The
//! cycle's bytes are streamed into the store by the transport handler (`server.rs`) between
//! the owner's admission and its commit; the state is only ever written here, by the owner.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use vmr_core::{Refusal, ReplicaEvent, ReplicaMachine, replica_health};
use vmr_proto::CycleHeader;
use vmr_proto::api::{
    CreateReplica, OperationKind, PointInfo, ReplicationMode, ReplicationState, VmStatus,
};
use vmr_proto::wire::RemoteError;
use vmr_store::RecoveryPoint;

use vmr_proto::machine::ReplicaSnapshot;
use vmr_proto::record::MachineSnapshot;

use crate::cycle::Progress;
use crate::errors::{AgentError, internal, refusal_err, store_err};
use crate::owned::{Observed, Vm};
use crate::telemetry::Counts;
use crate::util::now_ms;

/// The replica side of a VM.
pub struct ReplicaSide {
    machine: ReplicaMachine,
    /// A running import's progress (written by its task, read by `status`).
    progress: Arc<Progress>,
}

/// The work of one `vmreplica import`, run in a task of its own: load an exported initial
/// copy (its manifest names the cycle file; the VM must match and the file's BLAKE3 must
/// verify) or disk images (`<disk>.qcow2|raw|img`) as a new recovery point.
pub struct ImportJob {
    store: vmr_store::Store,
    dir: PathBuf,
    uuid: uuid::Uuid,
    name: String,
    disks: Vec<String>,
    progress: Arc<Progress>,
}

impl ImportJob {
    /// Import; the point and what was imported.
    pub async fn run(self) -> Result<(RecoveryPoint, String), AgentError> {
        let dir = &self.dir;
        let progress = &self.progress;
        let started = now_ms();
        let report = |p: vmr_store::ImportPos| {
            if progress.operation().is_none() {
                progress.start(OperationKind::Import, p.total, started);
            }
            progress.advance(p.done, p.written);
        };
        let manifest_path = dir.join(vmr_proto::api::EXPORT_MANIFEST);
        if !manifest_path.exists() {
            let images = vmr_store::find_images(dir, &self.disks)?;
            let p = self
                .store
                .import_images(self.uuid, &images, &report)
                .await
                .map_err(|source| AgentError::ImportImages {
                    dir: dir.to_path_buf(),
                    source,
                })?;
            return Ok((p, format!("{} disk image(s)", images.len())));
        }
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(AgentError::io("reading", &manifest_path))?;
        let m: vmr_proto::api::ExportManifest =
            serde_json::from_str(&text).map_err(|source| AgentError::Json {
                doing: "parsing",
                path: manifest_path.clone(),
                source,
            })?;
        if m.format != 1 {
            return Err(AgentError::ManifestFormat {
                path: manifest_path,
                format: m.format,
            });
        }
        if m.vm != self.uuid {
            return Err(AgentError::ImportOtherVm {
                dir: dir.to_path_buf(),
                vm: m.vm,
                vm_name: m.name,
                name: self.name.clone(),
                uuid: self.uuid,
            });
        }
        if !vmr_proto::api::valid_file_name(&m.file) {
            return Err(AgentError::ManifestFileName {
                path: manifest_path,
                file: m.file,
            });
        }
        let file = dir.join(&m.file);
        let f2 = file.clone();
        let sum = tokio::task::spawn_blocking(move || crate::export::blake3_file(&f2))
            .await
            .map_err(AgentError::Task)??;
        if sum != m.file_blake3 {
            return Err(AgentError::CopyDamaged {
                path: file,
                got: sum,
                expected: m.file_blake3,
            });
        }
        let p = self
            .store
            .import_cycle_file(&file, &report)
            .await
            .map_err(|source| AgentError::Import {
                path: file.clone(),
                source,
            })?;
        Ok((p, format!("the initial copy exported by {:?}", m.name)))
    }
}

impl ReplicaSide {
    /// The replica side of `vm` as persisted.
    pub fn restore(vm: &Vm) -> ReplicaSide {
        let snap = match &vm.rec.machine {
            MachineSnapshot::Replica(s) => s.clone(),
            MachineSnapshot::Primary(_) => ReplicaSnapshot::default(),
        };
        Self::with(ReplicaMachine::restore(snap))
    }

    /// A replica side around `machine` (a new replica VM, or one taken over from a primary).
    pub fn with(machine: ReplicaMachine) -> ReplicaSide {
        ReplicaSide {
            machine,
            progress: Arc::default(),
        }
    }

    /// The machine.
    pub fn machine(&self) -> &ReplicaMachine {
        &self.machine
    }

    /// Feed an event; persist the snapshot when the machine asks.
    pub fn step(&mut self, vm: &mut Vm, ev: ReplicaEvent) -> Result<(), Refusal> {
        let before = Counts::of(self.machine.stats());
        let acts = self.machine.step(ev)?;
        vm.telemetry
            .observe(before, Counts::of(self.machine.stats()), now_ms());
        if !acts.is_empty() {
            vm.rec.machine = MachineSnapshot::Replica(self.machine.snapshot());
            if let Err(e) = vm.save() {
                tracing::error!(vm = %vm.rec.name, "saving replica state: {}", crate::util::chain(&e));
            }
        }
        Ok(())
    }

    /// `continue-from` (extended replication: this host's primary, itself a replica, failed
    /// the VM over and replicates from its point now): the machine decides on the store's
    /// points ([`ReplicaMachine::continue_from`]); the points it drops are discarded before the
    /// decision is kept, so a refusal or a failed discard changes nothing.
    pub async fn continue_from(
        &mut self,
        vm: &mut Vm,
        point: u64,
    ) -> Result<vmr_proto::peer::ContinuedFrom, RemoteError> {
        let store = vm.host.store_of(&vm.rec).map_err(crate::errors::internal)?;
        let held: Vec<u64> = store
            .points(vm.rec.uuid)
            .map_err(crate::errors::store_err)?
            .iter()
            .map(|p| p.id)
            .collect();
        let mut m = self.machine.clone();
        let c = m.continue_from(point, &held).map_err(refusal_err)?;
        let mut discarded = Vec::new();
        if let Some(keep) = c.discard_above {
            store
                .discard_points_above(vm.rec.uuid, keep)
                .await
                .map_err(crate::errors::store_err)?;
            discarded = held.iter().copied().filter(|p| *p > keep).collect();
        }
        self.machine = m;
        vm.rec.machine = MachineSnapshot::Replica(self.machine.snapshot());
        vm.save().map_err(crate::errors::internal)?;
        tracing::info!(vm = %vm.rec.name, point, latest = c.latest, resync = c.resync, ?discarded, "continue-from: the source failed over and replicates from its point");
        Ok(vmr_proto::peer::ContinuedFrom {
            latest: c.latest,
            resync: c.resync,
            discarded,
        })
    }

    /// `follow` (fan-out's failover): a sibling replica of this VM failed it over and
    /// replicates to this host now. The machine decides on the store's points
    /// ([`ReplicaMachine::follow`]: all kept, the newest is the base of the sibling's
    /// resynchronisation); then the caller is the VM's primary (name, trust group), so that
    /// the split-brain guard and `status` name it. Nothing is dropped.
    pub async fn follow(
        &mut self,
        vm: &mut Vm,
        peer: &vmr_transport::Peer,
    ) -> Result<vmr_proto::peer::ContinuedFrom, RemoteError> {
        let store = vm.host.store_of(&vm.rec).map_err(internal)?;
        let held: Vec<u64> = store
            .points(vm.rec.uuid)
            .map_err(store_err)?
            .iter()
            .map(|p| p.id)
            .collect();
        let mut m = self.machine.clone();
        let same_storage = vm.host.storage_of(&peer.name) == vm.host.storage_of(&vm.rec.primary);
        let c = m
            .follow(&held, peer.name == vm.rec.primary, same_storage)
            .map_err(refusal_err)?;
        let old = std::mem::replace(&mut vm.rec.primary, peer.name.clone());
        vm.rec.trust_group = peer.trust_group.clone();
        self.machine = m;
        vm.rec.machine = MachineSnapshot::Replica(self.machine.snapshot());
        vm.save().map_err(internal)?;
        tracing::info!(vm = %vm.rec.name, primary = %peer.name, old_primary = %old, base = c.latest, "follow: a sibling replica failed the VM over; it is this replica's primary now (resync against the newest point)");
        Ok(vmr_proto::peer::ContinuedFrom {
            latest: c.latest,
            resync: c.resync,
            discarded: Vec::new(),
        })
    }

    /// `become-replica` from the extended replica this host forwards the VM to (it failed the
    /// VM over and reverses to this host, A → B → C with A lost): the same decision as
    /// [`ReplicaSide::continue_from`] on this store's points (later ones dropped), then the
    /// extended replica is this VM's primary (name, trust group, definition) and the
    /// forwarding ends.
    pub async fn become_replica_of_extended(
        &mut self,
        vm: &mut Vm,
        peer: &vmr_transport::Peer,
        req: &vmr_proto::api::BecomeReplica,
    ) -> Result<vmr_proto::peer::BecameReplica, RemoteError> {
        let c = self.continue_from(vm, req.point).await?;
        let store = vm.host.store_of(&vm.rec).map_err(internal)?;
        store
            .set_definition(vm.rec.uuid, &req.launch_toml)
            .map_err(store_err)?;
        vm.rec.launch_toml = req.launch_toml.clone();
        vm.rec.primary = peer.name.clone();
        vm.rec.trust_group = peer.trust_group.clone();
        vm.rec.extended = None;
        vm.save().map_err(internal)?;
        tracing::info!(vm = %vm.rec.name, primary = %peer.name, point = c.latest, resync = c.resync, "became the replica of the extended replica");
        Ok(vmr_proto::peer::BecameReplica {
            state: self.machine.state(),
            point: c.latest,
            resync: c.resync,
        })
    }

    /// The primary disabled replication (`disable-replica`): the machine's `Disable`. Already
    /// disabled is no error; a failed-over VM keeps its state (the primary no longer owns it).
    /// The state afterwards.
    pub fn disabled_by_primary(
        &mut self,
        vm: &mut Vm,
    ) -> Result<vmr_proto::api::ReplicationState, RemoteError> {
        match self.step(vm, ReplicaEvent::Disable { now_ms: now_ms() }) {
            Ok(()) | Err(Refusal::Disabled { .. } | Refusal::FailedOver { .. }) => {
                tracing::info!(vm = %vm.rec.name, state = %self.machine.state(), "the primary disabled replication");
                Ok(self.machine.state())
            }
            Err(r) => Err(refusal_err(r)),
        }
    }

    /// Refresh the definition and policy of an existing replica VM (`create-replica` is
    /// idempotent) and take a Disabled replica back.
    pub fn refresh(&mut self, vm: &mut Vm, req: CreateReplica) -> Result<(), RemoteError> {
        // A definition that cannot be used is refused (400) before anything changes.
        let bad = |message: String| RemoteError::BadRequest { message };
        let def = vmr_proto::VmDefinition::from_toml(&req.launch_toml)
            .map_err(|e| bad(format!("invalid VM definition: {}", crate::util::chain(&e))))?;
        if def.uuid != vm.rec.uuid {
            return Err(bad(format!(
                "the definition is of VM {}, not {}",
                def.uuid, vm.rec.uuid
            )));
        }
        self.step(vm, ReplicaEvent::Recreate { now_ms: now_ms() })
            .map_err(refusal_err)?;
        let store = vm.host.store_of(&vm.rec).map_err(internal)?;
        store
            .set_definition(vm.rec.uuid, &req.launch_toml)
            .map_err(store_err)?;
        store
            .set_retention(vm.rec.uuid, req.retention())
            .map_err(store_err)?;
        vm.rec.launch_toml = req.launch_toml;
        if !req.disks.is_empty() {
            // a libvirt domain's disks added on the primary: replicated from its next cycle
            vm.rec.disks = req.disks.iter().map(|d| d.id.clone()).collect();
        }
        vm.rec.frequency_secs = Some(req.frequency_secs);
        vm.rec.auto_failover = req.auto_failover;
        vm.save().map_err(internal)
    }

    /// May this cycle be received now? (The machine decides; the store checks the exact base
    /// when it opens the cycle.)
    pub fn admit(&mut self, vm: &mut Vm, header: &CycleHeader) -> Result<(), RemoteError> {
        self.step(
            vm,
            ReplicaEvent::OfferCycle {
                now_ms: now_ms(),
                kind: header.kind,
                id: header.id,
                base: header.base,
            },
        )
        .map_err(refusal_err)
    }

    /// Whether block hashes may be served now (a resynchronization is accepted).
    pub fn accepts_cycles(&self) -> Result<(), RemoteError> {
        self.machine.accepts_cycles().map_err(refusal_err)
    }

    /// Committing a cycle failed (it is not acknowledged; the primary sends it again).
    pub fn commit_failed(&mut self, vm: &mut Vm, message: String) {
        let ev = ReplicaEvent::ApplyFailed {
            now_ms: now_ms(),
            message,
        };
        if let Err(r) = self.step(vm, ev) {
            tracing::debug!(vm = %vm.rec.name, "machine refused: {r}");
        }
    }

    /// Record a committed point (a cycle of any kind). The machine never changes a state set
    /// meanwhile by pause, disable or failover.
    pub fn record_point(&mut self, vm: &mut Vm, p: &RecoveryPoint, bytes: u64) {
        let now = now_ms();
        let ev = ReplicaEvent::CycleApplied {
            now_ms: now,
            id: p.id,
            bytes,
            latency_ms: now.saturating_sub(p.taken_at_ms),
            app_consistent: p.kind == vmr_store::PointKind::AppConsistent,
        };
        if let Err(r) = self.step(vm, ev) {
            tracing::debug!(vm = %vm.rec.name, "machine refused: {r}");
        }
    }

    /// The store's latest point after an agent restart.
    pub fn recovered(&mut self, vm: &mut Vm, latest: Option<u64>) {
        if let Err(r) = self.step(
            vm,
            ReplicaEvent::Recovered {
                now_ms: now_ms(),
                latest,
            },
        ) {
            tracing::debug!(vm = %vm.rec.name, "machine refused: {r}");
        }
    }

    /// Pause, resume or disable on the replica.
    pub fn set(
        &mut self,
        vm: &mut Vm,
        cmd: ReplicaCmd,
    ) -> Result<vmr_proto::api::StateChange, AgentError> {
        let before = self.machine.state();
        let now = now_ms();
        let ev = match cmd {
            ReplicaCmd::Pause => ReplicaEvent::Pause { now_ms: now },
            ReplicaCmd::Resume => ReplicaEvent::Resume { now_ms: now },
            ReplicaCmd::Disable => ReplicaEvent::Disable { now_ms: now },
        };
        self.step(vm, ev)?;
        let to = self.machine.state();
        Ok(vmr_proto::api::StateChange {
            name: vm.rec.name.clone(),
            from: before,
            to,
            message: format!("{}: {before} -> {to}", vm.rec.name),
        })
    }

    /// Reset the statistics window.
    pub fn reset_stats(&mut self, vm: &mut Vm) -> Result<(), AgentError> {
        self.step(vm, ReplicaEvent::ResetStats { now_ms: now_ms() })
            .map_err(AgentError::Refused)
    }

    /// Recovery points.
    /// With `estimate`, what that policy would keep and what it would cost (nothing is
    /// applied); else why the VM's own policy keeps each point.
    pub fn points(
        &self,
        vm: &Vm,
        estimate: Option<&vmr_store::RetentionPolicy>,
    ) -> Result<Vec<PointInfo>, AgentError> {
        if let Some(p) = estimate {
            vmr_core::check_retention(p.hourly, p.grid.as_ref())?;
        }
        let store = vm.host.store_of(&vm.rec)?;
        let points = store.points(vm.rec.uuid)?;
        let mut plan = store.retention_plan(vm.rec.uuid, estimate, now_ms())?;
        // The store never merges away a point a failover view pins, nor one below it: kept
        // with no reason of the policy's.
        if let Some(pinned) = points.iter().filter(|p| p.views > 0).map(|p| p.id).max() {
            for p in points.iter().filter(|p| p.id <= pinned) {
                plan.keep.entry(p.id).or_default();
            }
        }
        // A consistency group's member: its group points follow the group's decision
        // (`group_prune_plan`, what the next prune does), shown as their reason; a point that
        // decision drops is pruned next whatever its own policy says.
        let mut group_point: std::collections::BTreeMap<u64, String> = Default::default();
        if estimate.is_none()
            && let Some(drop) = group_prune_plan(&store, vm.rec.uuid, now_ms())
        {
            for (id, tag) in store.group_tags(vm.rec.uuid)? {
                if drop.contains(&id) {
                    if plan.keep.get(&id).is_some_and(|r| !r.is_empty()) {
                        plan.keep.remove(&id);
                    }
                } else if let Some(t) = tag {
                    plan.keep.entry(id).or_default();
                    group_point.insert(id, format!("group {} point {}", t.group, t.point));
                }
            }
        }
        let sizes: Vec<(u64, u64)> = points.iter().map(|p| (p.id, p.size_on_disk)).collect();
        let estimated = vmr_store::estimate_sizes(&sizes, &plan);
        Ok(points
            .into_iter()
            .map(|p| {
                let mut kept_because: Vec<String> = match plan.keep.get(&p.id) {
                    Some(r) if r.is_empty() && !group_point.contains_key(&p.id) => {
                        vec!["view".to_owned()]
                    }
                    Some(r) => r.iter().map(ToString::to_string).collect(),
                    None => Vec::new(),
                };
                if let Some(g) = group_point.get(&p.id) {
                    kept_because.push(g.clone());
                }
                PointInfo {
                    id: p.id,
                    time_ms: p.taken_at_ms,
                    kind: serde_json::to_value(p.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    size_bytes: p.size_on_disk,
                    estimated_bytes: estimate.and_then(|_| estimated.get(&p.id).copied()),
                    kept_because,
                }
            })
            .collect())
    }

    /// `vmreplica verify NAME --local [--point ID]`: check every layer of every point
    /// (`qemu-img check`) and every point's block-hash index file, without the primary; with
    /// `point`, only the layers that point reads through and its own index.
    pub async fn verify_local(
        &self,
        vm: &Vm,
        point: Option<u64>,
    ) -> Result<vmr_proto::api::LocalVerifyReport, AgentError> {
        let store = vm.host.store_of(&vm.rec)?;
        let checks = match store.check_local_at(vm.rec.uuid, point).await {
            Ok(c) => c,
            Err(vmr_store::StoreError::NoSuchPoint(_)) => {
                return Err(AgentError::NoSuchPoint {
                    name: vm.rec.name.clone(),
                    point: point.unwrap_or_default(),
                    points: store
                        .points(vm.rec.uuid)
                        .map(|ps| ps.iter().map(|p| p.id).collect())
                        .unwrap_or_default(),
                });
            }
            Err(e) => return Err(AgentError::VerifyLocal(e)),
        };
        Ok(vmr_proto::api::LocalVerifyReport {
            name: vm.rec.name.clone(),
            checks: checks
                .into_iter()
                .map(|c| vmr_proto::api::LocalCheck {
                    disk: c.disk,
                    file: c.file,
                    kind: match c.kind {
                        vmr_store::CheckKind::Qcow2 => "qcow2".into(),
                        vmr_store::CheckKind::HashIndex => "hash-index".into(),
                    },
                    ok: c.problem.is_none(),
                    detail: c.problem.unwrap_or_default(),
                })
                .collect(),
        })
    }

    /// `vmreplica import NAME DIR` begins: the machine decides whether it may (then cycles,
    /// disable, failover and removal wait for its end); the returned job does the work in a
    /// task of its own, so the owner keeps answering (`status` shows the import's progress),
    /// and its outcome comes back to [`ReplicaSide::import_done`].
    pub fn begin_import(&mut self, vm: &mut Vm, dir: &Path) -> Result<ImportJob, AgentError> {
        let store = vm.host.store_of(&vm.rec)?;
        self.step(vm, ReplicaEvent::BeginImport { now_ms: now_ms() })?;
        self.progress.clear();
        Ok(ImportJob {
            store,
            dir: dir.to_path_buf(),
            uuid: vm.rec.uuid,
            name: vm.rec.name.clone(),
            disks: vm.rec.disks.clone(),
            progress: self.progress.clone(),
        })
    }

    /// The import ended: the point is recorded (or the failure ends the import with nothing
    /// added). The answer to `vmreplica import`.
    pub fn import_done(
        &mut self,
        vm: &mut Vm,
        dir: &Path,
        outcome: Result<(RecoveryPoint, String), AgentError>,
    ) -> Result<String, AgentError> {
        self.progress.clear();
        let now = now_ms();
        let (point, what) = match outcome {
            Ok(o) => o,
            Err(e) => {
                if let Err(r) = self.step(vm, ReplicaEvent::ImportFailed { now_ms: now }) {
                    tracing::debug!(vm = %vm.rec.name, "machine refused: {r}");
                }
                return Err(e);
            }
        };
        self.step(
            vm,
            ReplicaEvent::Imported {
                now_ms: now,
                id: point.id,
            },
        )?;
        tracing::info!(vm = %vm.rec.name, point = point.id, dir = %dir.display(), "imported {what}");
        Ok(format!(
            "imported {what} from {} as recovery point {} of {}",
            dir.display(),
            point.id,
            vm.rec.name
        ))
    }

    /// The status row.
    pub fn status(&self, vm: &Vm, replica_name: &str, now: u64) -> VmStatus {
        let rec = &vm.rec;
        let m = &self.machine;
        let obs = self.observe(vm, now);
        let points = vm
            .host
            .store_of(rec)
            .ok()
            .and_then(|s| s.point_summary(rec.uuid).ok());
        VmStatus {
            name: rec.name.clone(),
            uuid: rec.uuid,
            state: m.state(),
            health: obs.health,
            health_reason: obs.reason,
            mode: ReplicationMode::Replica,
            frequency_secs: rec.frequency_secs.unwrap_or(0),
            continuous: rec.frequency_secs == Some(vmr_core::CONTINUOUS),
            primary: rec.primary.clone(),
            primary_address: vm.failover().ok().and_then(|f| f.primary_listen),
            replica: replica_name.to_owned(),
            last_replication_ms: m.stats().last_replication_ms,
            last_cycle: m.last_cycle(),
            stats: m.stats().clone(),
            progress: None,
            failover_program: vmr_proto::VmDefinition::from_toml(&rec.launch_toml)
                .ok()
                .map(|def| {
                    // the launcher a failover would use (the default libvirt URI is assumed
                    // to answer: status makes no libvirt call)
                    let launcher = vmr_core::failover_launcher(
                        def.program != crate::lvfailover::LIBVIRT_PROGRAM,
                        def.libvirt_xml.is_some(),
                        vm.host.config.libvirt_connect.is_some(),
                        true,
                    );
                    let lv = format!("libvirt at {}", crate::lvfailover::uri(&vm.host));
                    match launcher {
                        // defined and started through this host's libvirt (lvfailover.rs)
                        Ok(vmr_core::FailoverLauncher::LibvirtReplicatedXml) => {
                            vmr_proto::api::FailoverProgram {
                                program: lv,
                                refused: None,
                            }
                        }
                        Ok(vmr_core::FailoverLauncher::LibvirtGeneratedXml) => {
                            vmr_proto::api::FailoverProgram {
                                program: format!(
                                    "{lv} (a domain generated from the QEMU definition)"
                                ),
                                refused: None,
                            }
                        }
                        Ok(vmr_core::FailoverLauncher::QemuFromDomainXml) => {
                            vmr_proto::api::FailoverProgram {
                                program: "QEMU from the domain XML".to_owned(),
                                refused: None,
                            }
                        }
                        Ok(vmr_core::FailoverLauncher::Qemu) => vmr_proto::api::FailoverProgram {
                            refused: crate::launch::allowed_program(
                                &def.program,
                                &vm.host.config.allowed_programs,
                                &vm.host.dir.join(crate::config::CONFIG_FILE),
                            )
                            .err()
                            .map(|e| e.to_string()),
                            program: def.program,
                        },
                        Err(e) => vmr_proto::api::FailoverProgram {
                            program: def.program,
                            refused: Some(e.to_string()),
                        },
                    }
                }),
            initial_at_ms: None,
            failover_network: (!rec.failover.is_empty()).then(|| rec.failover.clone()),
            rpo_alert_secs: vm.rpo_alert_secs(),
            lag_ms: Vm::lag_ms(m.stats(), now),
            operation: self.progress.operation(),
            recovery_points: points.map(|p| p.0),
            last_point_ms: points.and_then(|p| p.1),
            last_cycle_bytes: vm.telemetry.last_cycle_bytes(),
            retention: vm
                .host
                .store_of(rec)
                .ok()
                .and_then(|s| s.retention_policy(rec.uuid).ok()),
            extended: None,
            libvirt: None,
            libvirt_jobs: None,
            failover_domains: vm
                .failover()
                .map(|fr| {
                    fr.live
                        .iter()
                        .chain(fr.tests.iter())
                        .filter_map(|f| f.libvirt.clone())
                        .collect()
                })
                .unwrap_or_default(),
            bandwidth: None,
            group: None,
            fanout: Vec::new(),
            auto_failover: None,
        }
    }

    /// What the owner compares between events.
    pub fn observe(&self, vm: &Vm, now: u64) -> Observed {
        let m = &self.machine;
        let h = replica_health(m.state(), m.stats(), now).with(vm.rpo_health(
            m.state(),
            m.stats(),
            now,
        ));
        let mut reason = h.reason();
        if let Some(e) = m.last_error() {
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!("last apply failed: {e}"));
        }
        Observed {
            state: m.state(),
            health: if m.last_error().is_some() {
                vmr_proto::api::Health::Critical
            } else {
                h.health
            },
            reason,
            errors: m.stats().errors,
            missed: m.stats().missed_cycles,
            last_error: m.last_error().map(str::to_owned),
        }
    }

    /// The machine's state and statistics (the RPO alert's inputs).
    pub fn rpo_inputs(&self) -> (ReplicationState, &vmr_proto::api::ReplicationStats) {
        (self.machine.state(), self.machine.stats())
    }
}

/// Pause, resume or disable on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCmd {
    /// Refuse cycles until resumed.
    Pause,
    /// Accept cycles again.
    Resume,
    /// Stop replicating: cycles are refused; the copy stays.
    Disable,
}

/// The points of replica VM `uuid` that retention drops when some of its points belong to
/// consistency group points: `vmr_core::group::group_retention` over every member's catalog in
/// the same store (a group's members share their primary, hence their store), each member's
/// own policy through `vmr_store::plan` (docs/groups.md, "Retention"). None when the VM holds
/// no group point (its own policy alone decides) or its catalog cannot be read.
pub fn group_prune_plan(store: &vmr_store::Store, uuid: Uuid, now: u64) -> Option<Vec<u64>> {
    let (own, _) = store.retention_inputs(uuid).ok()?;
    let mut members: Vec<Uuid> = vec![uuid];
    for (_, t) in &own {
        if let Some(t) = t {
            members.extend(t.members.iter().copied());
        }
    }
    if members.len() == 1 {
        return None;
    }
    members.sort_unstable();
    members.dedup();
    // A member this store does not hold has no points: the group points naming it are never
    // complete.
    let inputs: Vec<(Uuid, Vec<_>, vmr_store::RetentionPolicy)> = members
        .into_iter()
        .filter_map(|m| {
            store
                .retention_inputs(m)
                .ok()
                .map(|(pts, policy)| (m, pts, policy))
        })
        .collect();
    let vms: Vec<vmr_core::group::RetainPoints> = inputs
        .iter()
        .map(|(m, pts, _)| {
            let pts = pts
                .iter()
                .map(|(p, t)| vmr_core::group::RetainPoint {
                    id: p.id,
                    taken_at_ms: p.taken_at_ms,
                    kind: p.kind,
                    group: t.clone(),
                })
                .collect();
            (*m, pts)
        })
        .collect();
    let keeps = |m: Uuid, pts: &[vmr_core::group::RetainPoint]| {
        let metas: Vec<vmr_store::PointMeta> = pts
            .iter()
            .map(|p| vmr_store::PointMeta {
                id: p.id,
                taken_at_ms: p.taken_at_ms,
                kind: p.kind,
            })
            .collect();
        match inputs.iter().find(|(u, _, _)| *u == m) {
            Some((_, _, policy)) => vmr_store::plan(&metas, policy, now)
                .keep
                .into_keys()
                .collect(),
            // A member this store does not hold has no policy here: it keeps nothing more.
            None => std::collections::BTreeSet::new(),
        }
    };
    Some(vmr_core::group::group_retention(uuid, &vms, &keeps))
}
