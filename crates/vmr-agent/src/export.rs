//! Initial replication by external media, primary side: the initial (full) cycle is written to
//! a directory instead of the network: `c<id>.stage` in the staging format the replica store
//! uses (every extent with its BLAKE3, a whole-file chain in the trailer) and a manifest
//! `vmreplica-export.json` naming the VM, the cycle and the file's BLAKE3. The frozen bitmap
//! is dropped only once both are fsynced; changes made meanwhile are in the next bitmap and
//! travel as the first incremental cycle after `vmreplica import` on the replica.

use std::path::Path;

use vmr_capture::{CycleMode, VmCapture};
use vmr_proto::api::{EXPORT_MANIFEST, ExportManifest};
use vmr_proto::{CycleConsistency, CycleHeader, CycleKind};
use vmr_store::staging::StageFileWriter;

use crate::cycle::{CycleCtx, Outcome, Session, classify_capture};
use crate::errors::AgentError;
use crate::util::now_ms;
use vmr_core::Failure;
use vmr_proto::record::VmRecord;

/// Write the initial cycle `id` of `vm` to `dir`.
pub(crate) async fn run(ctx: &CycleCtx, session: &mut Session, id: u64, dir: &Path) -> Outcome {
    let rec = &ctx.rec;
    // The replica VM exists before its copy arrives (the import needs it).
    if let Err(f) = crate::cycle::create_replica(&ctx.host, rec, session).await {
        return Outcome::Failed(f);
    }
    if let Err(f) = check_dir(dir, rec) {
        return Outcome::Failed(f);
    }
    if session.capture.is_none() {
        match VmCapture::open(crate::cycle::capture_config(&ctx.host, rec, ctx.slot)).await {
            Ok(c) => session.capture = Some(c),
            Err(e) => return Outcome::Failed(classify_capture(&e)),
        }
    }
    let Some(capture) = session.capture.as_mut() else {
        return Outcome::Failed(Failure::Retryable("no capture".into()));
    };
    let (outcome, reset) = export_with(ctx, capture, rec, id, dir).await;
    if reset {
        session.capture = None;
    }
    outcome
}

/// The directory must exist (or be creatable) and hold no export of another VM.
fn check_dir(dir: &Path, rec: &VmRecord) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Fatal(format!("cannot create {}: {e}", dir.display())))?;
    let m = dir.join(EXPORT_MANIFEST);
    if let Ok(text) = std::fs::read_to_string(&m) {
        match serde_json::from_str::<ExportManifest>(&text) {
            Ok(old) if old.vm != rec.uuid => {
                return Err(Failure::Fatal(format!(
                    "{} already holds the initial copy of another VM ({:?}); choose another \
                     directory",
                    dir.display(),
                    old.name
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

async fn export_with(
    ctx: &CycleCtx,
    capture: &mut VmCapture,
    rec: &VmRecord,
    id: u64,
    dir: &Path,
) -> (Outcome, bool) {
    let taken_at_ms = now_ms();
    let mut cycle = match capture.begin_cycle(CycleMode::Full).await {
        Ok(c) => c,
        Err(e) => return (Outcome::Failed(classify_capture(&e)), true),
    };
    let disks = cycle.disks().to_vec();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    let bases = crate::cycle::disk_bases(&sizes);
    ctx.progress.start(
        vmr_proto::api::OperationKind::Export,
        sizes.iter().sum(),
        taken_at_ms,
    );
    let header = CycleHeader {
        vm: rec.uuid,
        id,
        base: None,
        kind: CycleKind::Full,
        consistency: CycleConsistency::CrashConsistent,
        taken_at_ms,
        disks,
        group: None,
    };
    let file = format!("c{id:06}.stage");
    let tmp = dir.join(format!("{file}.tmp"));
    let written = async {
        let mut w = StageFileWriter::create(&tmp, &header).map_err(|e| io_failure(&tmp, e))?;
        let mut bytes = 0u64;
        loop {
            match cycle.next_extent().await {
                Ok(Some(e)) => {
                    if let vmr_proto::ExtentData::Data(b) = &e.data {
                        bytes += b.len() as u64;
                    }
                    let sum = e.checksum();
                    tokio::task::block_in_place(|| w.put(&e, &sum))
                        .map_err(|e| io_failure(&tmp, e))?;
                    ctx.progress
                        .advance(crate::cycle::position(&bases, &e), bytes);
                }
                Ok(None) => break,
                Err(e) => return Err(classify_capture(&e)),
            }
        }
        tokio::task::block_in_place(|| w.finish()).map_err(|e| io_failure(&tmp, e))?;
        Ok(bytes)
    }
    .await;
    let bytes = match written {
        Ok(b) => b,
        Err(f) => {
            let _ = std::fs::remove_file(&tmp);
            let reset = cycle.abort().await.is_err();
            return (Outcome::Failed(f), reset);
        }
    };
    let published = tokio::task::block_in_place(|| publish(dir, &tmp, &file, rec, id, bytes));
    if let Err(f) = published {
        let _ = std::fs::remove_file(&tmp);
        let reset = cycle.abort().await.is_err();
        return (Outcome::Failed(f), reset);
    }
    match cycle.commit().await {
        Ok(()) => {
            tracing::info!(vm = %rec.name, cycle = id, bytes, dir = %dir.display(), "initial copy exported; load it on the replica with `vmreplica import`");
            (
                Outcome::Done {
                    id,
                    bytes,
                    sizes,
                    app: false,
                    pending: capture.pending_bytes().await.ok(),
                },
                false,
            )
        }
        Err(e) => (
            Outcome::Failed(Failure::Retryable(format!(
                "commit after the export failed: {e}"
            ))),
            true,
        ),
    }
}

/// Move the cycle file into place and write the manifest, both durably (`vmr-durable`).
fn publish(
    dir: &Path,
    tmp: &Path,
    file: &str,
    rec: &VmRecord,
    id: u64,
    bytes: u64,
) -> Result<(), Failure> {
    let durable = |e: vmr_durable::DurableError| Failure::Retryable(e.to_string());
    let dest = dir.join(file);
    vmr_durable::persist(tmp, &dest).map_err(durable)?;
    let sum = blake3_file(&dest).map_err(|e| Failure::Retryable(crate::util::chain(&e)))?;
    let m = ExportManifest {
        format: 1,
        vm: rec.uuid,
        name: rec.name.clone(),
        cycle: id,
        file: file.to_owned(),
        file_blake3: sum,
        bytes,
    };
    let text = serde_json::to_string_pretty(&m).map_err(|e| Failure::Fatal(e.to_string()))?;
    vmr_durable::write_atomic(&dir.join(EXPORT_MANIFEST), text.as_bytes()).map_err(durable)?;
    Ok(())
}

/// A write failure (a full disk included) is retried: the export resumes once the admin made
/// room.
fn io_failure(path: &Path, e: vmr_store::StoreError) -> Failure {
    Failure::Retryable(format!("writing {}: {e}", path.display()))
}

/// Hex BLAKE3 of a file, streamed (the export manifest's checksum; `import` checks it).
pub(crate) fn blake3_file(path: &std::path::Path) -> Result<String, AgentError> {
    let mut f = std::fs::File::open(path).map_err(AgentError::io("opening", path))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).map_err(AgentError::io("reading", path))?;
    Ok(h.finalize().to_hex().to_string())
}
