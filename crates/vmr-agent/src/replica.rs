//! The replica side of one VM, as its owner runs it: admitting or refusing a cycle, recording
//! applied cycles, pause/resume/disable, recovery points, `vmreplica import`, status. The
//! cycle's bytes are streamed into the store by the transport handler (`server.rs`) between
//! the owner's admission and its commit; the state is only ever written here, by the owner.

use std::path::Path;

use anyhow::Context;
use vmr_core::replica_health;
use vmr_proto::api::{
    CreateReplica, PointInfo, ReplicationMode, ReplicationState, ReplicationStats, VmStatus,
};
use vmr_proto::wire::RemoteError;
use vmr_store::{RecoveryPoint, RetentionPolicy, StoreError};

use crate::exit;
use crate::owned::Vm;
use crate::util::{coded, now_ms};

/// Map a store error onto what the primary is told.
pub fn store_err(e: StoreError) -> RemoteError {
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

/// An internal failure, as the primary is told.
pub fn internal(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Internal {
        message: e.to_string(),
    }
}

/// The replica side of a VM.
#[derive(Default)]
pub struct ReplicaSide {
    /// An apply task runs.
    pub applying: bool,
    /// Another cycle was staged while the apply ran: apply again when it ends.
    apply_again: bool,
    /// Data bytes of staged cycles not yet applied.
    staged_bytes: u64,
}

/// A finished apply task.
pub struct Applied {
    /// The points it made visible, or why it failed.
    pub result: Result<Vec<RecoveryPoint>, StoreError>,
    /// Data bytes of the cycles it applied.
    pub bytes: u64,
}

impl ReplicaSide {
    /// Refresh the definition and policy of an existing replica VM (`create-replica` is
    /// idempotent) and take a Disabled replica back.
    pub fn refresh(&mut self, vm: &mut Vm, req: CreateReplica) -> Result<(), RemoteError> {
        let store = vm.host.store_of(&vm.rec).map_err(internal)?;
        store
            .set_definition(vm.rec.uuid, &req.launch_toml)
            .map_err(store_err)?;
        store
            .set_retention(
                vm.rec.uuid,
                RetentionPolicy {
                    hourly: req.recovery_points,
                    app_consistent_every_hours: None,
                },
            )
            .map_err(store_err)?;
        if vm.rec.state == ReplicationState::Disabled {
            vm.rec.state = if vm.rec.last_cycle.is_some() {
                ReplicationState::Replicating
            } else {
                ReplicationState::WaitingForInitialReplication
            };
        }
        vm.rec.launch_toml = req.launch_toml;
        vm.save().map_err(internal)
    }

    /// May a cycle be received now?
    pub fn admit(&self, vm: &Vm) -> Result<(), RemoteError> {
        match vm.rec.state {
            ReplicationState::Suspended => Err(RemoteError::Unavailable {
                message: "replication is paused on the replica".into(),
            }),
            ReplicationState::Disabled => Err(RemoteError::BadRequest {
                message: format!(
                    "replication of {:?} is disabled on the replica",
                    vm.rec.name
                ),
            }),
            s @ (ReplicationState::FailedOverWaitingCompletion
            | ReplicationState::FailedOver) => Err(RemoteError::BadRequest {
                message: format!("the replica VM is {s}"),
            }),
            _ => Ok(()),
        }
    }

    /// A cycle of `bytes` data bytes is staged (durable): the caller acknowledges it; it is
    /// applied by the apply task. Returns whether an apply task must be started.
    pub fn staged(&mut self, bytes: u64) -> bool {
        self.staged_bytes += bytes;
        if self.applying {
            self.apply_again = true;
            false
        } else {
            self.applying = true;
            true
        }
    }

    /// Bytes to account to the next apply task.
    pub fn take_staged_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.staged_bytes)
    }

    /// An apply task ended. Returns whether to start another.
    pub fn applied(&mut self, vm: &mut Vm, a: Applied) -> bool {
        self.applying = false;
        match a.result {
            Ok(points) => {
                if let Some(p) = points.last() {
                    self.record_point(vm, p, points.len() as u64, a.bytes);
                }
            }
            Err(e) => {
                tracing::error!(vm = %vm.rec.name, "apply failed (the staged cycle is kept and retried): {}", crate::util::chain(&e));
                vm.rec.stats.errors += 1;
                vm.rec.last_error = Some(crate::util::chain(&e));
                if let Err(e) = vm.save() {
                    tracing::error!(vm = %vm.rec.name, "saving replica state: {e:#}");
                }
            }
        }
        if std::mem::take(&mut self.apply_again) {
            self.applying = true;
            true
        } else {
            false
        }
    }

    /// Record a committed point (applied cycles, a resync, an import). Never changes a
    /// state set meanwhile by pause, disable or failover.
    pub fn record_point(&mut self, vm: &mut Vm, p: &RecoveryPoint, cycles: u64, bytes: u64) {
        let now = now_ms();
        let rec = &mut vm.rec;
        rec.last_cycle = Some(p.id);
        if rec.state == ReplicationState::WaitingForInitialReplication {
            rec.state = ReplicationState::Replicating;
        }
        rec.stats.successful_cycles += cycles;
        rec.stats.total_bytes += bytes;
        rec.stats.max_bytes = rec.stats.max_bytes.max(bytes);
        rec.stats.last_replication_ms = Some(now);
        if p.kind == vmr_store::PointKind::AppConsistent {
            rec.stats.last_app_consistent_ms = Some(now);
        }
        rec.last_error = None;
        if let Err(e) = vm.save() {
            tracing::error!(vm = %vm.rec.name, "saving replica state: {e:#}");
        }
    }

    /// Pause, resume or disable on the replica.
    pub fn set(&mut self, vm: &mut Vm, cmd: ReplicaCmd) -> anyhow::Result<String> {
        use ReplicationState as S;
        let before = vm.rec.state;
        let after = match (cmd, before) {
            (ReplicaCmd::Pause, S::Replicating | S::WaitingForInitialReplication) => {
                vm.rec.paused_from = Some(before);
                S::Suspended
            }
            (ReplicaCmd::Resume, S::Suspended) => {
                vm.rec.paused_from.take();
                if vm.rec.last_cycle.is_some() {
                    S::Replicating
                } else {
                    S::WaitingForInitialReplication
                }
            }
            (
                ReplicaCmd::Disable,
                S::Replicating | S::WaitingForInitialReplication | S::Suspended,
            ) => S::Disabled,
            _ => {
                return Err(coded(
                    exit::INVALID_STATE,
                    format!(
                        "{:?} is {before} on this replica; {cmd:?} does not apply{}",
                        vm.rec.name,
                        match before {
                            S::FailedOverWaitingCompletion =>
                                " (complete or cancel the failover first)",
                            _ => "",
                        }
                    ),
                ));
            }
        };
        vm.rec.state = after;
        vm.save()?;
        Ok(format!("{}: {before} -> {after}", vm.rec.name))
    }

    /// Reset the statistics window.
    pub fn reset_stats(&mut self, vm: &mut Vm) -> anyhow::Result<()> {
        let s = &vm.rec.stats;
        vm.rec.stats = ReplicationStats {
            window_start_ms: now_ms(),
            last_replication_ms: s.last_replication_ms,
            last_app_consistent_ms: s.last_app_consistent_ms,
            ..Default::default()
        };
        vm.save()
    }

    /// Recovery points.
    pub fn points(&self, vm: &Vm) -> anyhow::Result<Vec<PointInfo>> {
        let store = vm.host.store_of(&vm.rec)?;
        Ok(store
            .points(vm.rec.uuid)?
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

    /// `vmreplica import NAME DIR`: load an exported initial copy (its manifest names the
    /// cycle file; the VM must match and the file's BLAKE3 must verify) or disk images
    /// (`<disk>.qcow2|raw|img`) as a new recovery point.
    pub async fn import(&mut self, vm: &mut Vm, dir: &Path) -> anyhow::Result<String> {
        let store = vm.host.store_of(&vm.rec)?;
        let rec = &vm.rec;
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
                return Err(coded(
                    exit::INVALID_STATE,
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
            let f2 = file.clone();
            let sum = tokio::task::spawn_blocking(move || blake3_file(&f2)).await??;
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
        self.record_point(vm, &point, 0, 0);
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
            replica: replica_name.to_owned(),
            last_replication_ms: rec.stats.last_replication_ms,
            last_cycle: rec.last_cycle,
            stats: rec.stats.clone(),
            progress: None,
        }
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

/// Hex BLAKE3 of a file, streamed.
pub fn blake3_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}
