//! Importing a copy that did not arrive over the network: disk images an admin restored or
//! copied onto the replica host (the "existing copy" a later comparison starts from), and an
//! initial copy exported by a primary to a directory and carried over ("external media").
//!
//! Both become an ordinary full cycle written by the same layer writer as a cycle received from
//! a primary (each extent checksummed once, written into the pending layers, flushed, committed
//! by the catalog rename), so the crash argument of the store holds unchanged: a crash before
//! the commit leaves pending layers that recovery deletes, after it the point exists.

use std::path::{Path, PathBuf};

use super::*;

/// Bytes read from an image per request (and the largest data extent produced).
const PIECE: u64 = 4 << 20;

/// The file format of an image to import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// qcow2 (its own backing chain, if any, is followed).
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl ImageFormat {
    fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// One disk image to import as disk `disk` of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportImage {
    /// Disk id (the primary's node name).
    pub disk: String,
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
}

/// Find the image of each of `disks` in `dir`: `<disk>.qcow2`, `<disk>.raw` or `<disk>.img`
/// (raw). Every disk must have exactly one.
pub fn find_images(dir: &Path, disks: &[String]) -> Result<Vec<ImportImage>, StoreError> {
    let mut out = Vec::new();
    for d in disks {
        let found: Vec<ImportImage> = [
            ("qcow2", ImageFormat::Qcow2),
            ("raw", ImageFormat::Raw),
            ("img", ImageFormat::Raw),
        ]
        .into_iter()
        .map(|(ext, format)| ImportImage {
            disk: d.clone(),
            path: dir.join(format!("{d}.{ext}")),
            format,
        })
        .filter(|i| i.path.is_file())
        .collect();
        match found.as_slice() {
            [one] => out.push(one.clone()),
            [] => {
                return Err(StoreError::InvalidCycle(format!(
                    "no image for disk {d:?} in {}: expected {d}.qcow2, {d}.raw or {d}.img",
                    dir.display()
                )));
            }
            _ => {
                return Err(StoreError::InvalidCycle(format!(
                    "more than one image for disk {d:?} in {}",
                    dir.display()
                )));
            }
        }
    }
    Ok(out)
}

impl Store {
    /// Import disk images as a new full recovery point of `vm` (the next cycle id; earlier
    /// points stay). Only allocated data is read; zero ranges become zero extents.
    pub async fn import_images(
        &self,
        vm: Uuid,
        images: &[ImportImage],
    ) -> Result<RecoveryPoint, StoreError> {
        if images.is_empty() {
            return Err(StoreError::InvalidCycle("no images to import".into()));
        }
        let mut exports = Vec::new();
        for img in images {
            match Export::start_image(
                &self.inner.root,
                &img.path,
                img.format.qemu_name(),
                vec![vmr_nbd::BASE_ALLOCATION.to_owned()],
            )
            .await
            {
                Ok(x) => exports.push(x),
                Err(e) => {
                    for x in exports {
                        x.abort().await;
                    }
                    return Err(e);
                }
            }
        }
        let res = self.import_exports(vm, images, &exports).await;
        for x in exports {
            x.abort().await;
        }
        res
    }

    async fn import_exports(
        &self,
        vm: Uuid,
        images: &[ImportImage],
        exports: &[Export],
    ) -> Result<RecoveryPoint, StoreError> {
        let v = self.vm(vm)?;
        let id = lock(&v.st).latest_point().map_or(1, |l| l + 1);
        let header = CycleHeader {
            vm,
            id,
            base: None,
            kind: CycleKind::Full,
            consistency: vmr_proto::CycleConsistency::CrashConsistent,
            taken_at_ms: now_ms(),
            disks: images
                .iter()
                .zip(exports)
                .map(|(i, x)| vmr_proto::DiskInfo {
                    id: i.disk.clone(),
                    size: x.client.size(),
                })
                .collect(),
        };
        let mut w = self.begin_cycle(header).await?;
        for (index, (img, x)) in images.iter().zip(exports).enumerate() {
            let what = img.path.display().to_string();
            let nbd = |e| StoreError::nbd(what.clone(), e);
            let size = x.client.size();
            let mut pos = 0;
            while pos < size {
                let len = (size - pos).min(PIECE);
                let status = x
                    .client
                    .block_status_range(vmr_nbd::BASE_ALLOCATION, pos, len)
                    .await
                    .map_err(nbd)?;
                for s in status {
                    let data = if s.flags & vmr_nbd::STATE_ZERO != 0 {
                        ExtentData::Zero(s.length)
                    } else {
                        ExtentData::Data(
                            x.client
                                .read(s.offset, s.length as u32)
                                .await
                                .map_err(nbd)?,
                        )
                    };
                    let e = Extent {
                        disk: index as u32,
                        offset: s.offset,
                        data,
                    };
                    let c = vmr_proto::CheckedExtent::compute(e, vmr_proto::ChecksumScheme::Blocks);
                    w.put_checked(&c).await?;
                }
                pos += len;
            }
        }
        w.finish().await
    }

    /// Import a cycle file exported by a primary (`c<id>.stage`, staging format 1): streamed
    /// through the layer writer, every extent's checksum and the whole-file chain verified on
    /// the way; the point is committed only when the file's trailer verified. The cycle keeps
    /// the primary's id so that the primary's next cycle, built on it, is accepted.
    pub async fn import_cycle_file(&self, path: &Path) -> Result<RecoveryPoint, StoreError> {
        self.stream_stage_file(path, None).await
    }

    /// Stream a staging-format cycle file into a new point. Without `vm` (an import) only a
    /// full cycle is accepted and a duplicate is refused; with `vm` (replaying a cycle an older
    /// version staged) any kind is, and the file must be of that VM.
    pub(super) async fn stream_stage_file(
        &self,
        path: &Path,
        vm: Option<Uuid>,
    ) -> Result<RecoveryPoint, StoreError> {
        let p = path.to_owned();
        let (mut r, header) = cycle::blocking(move || {
            let r = StageReader::open(&p)?;
            let h = r.header().clone();
            Ok((r, h))
        })
        .await?;
        match vm {
            None if header.kind != CycleKind::Full => {
                return Err(StoreError::InvalidCycle(format!(
                    "{} holds a {:?} cycle; only a full initial copy can be imported",
                    path.display(),
                    header.kind
                )));
            }
            Some(vm) if vm != header.vm => {
                return Err(StoreError::corrupt(path, "staged cycle of another VM"));
            }
            _ => {}
        }
        let id = header.id;
        let mut w = self.begin_cycle(header).await?;
        if w.is_duplicate() {
            return Err(StoreError::InvalidCycle(format!(
                "the replica already holds cycle {id} or a newer one; nothing to import"
            )));
        }
        // A blocking reader thread feeds the extents through a small bounded channel.
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Result<vmr_proto::CheckedExtent, StoreError>>(4);
        let reader = tokio::task::spawn_blocking(move || {
            loop {
                let item = r.next_extent().transpose();
                let Some(item) = item else { return };
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    return;
                }
            }
        });
        let res = async {
            while let Some(item) = rx.recv().await {
                w.put_checked(&item?).await?;
            }
            Ok(())
        }
        .await;
        drop(rx);
        reader.await.map_err(StoreError::Background)?;
        match res {
            Ok(()) => w.finish().await,
            Err(e) => {
                w.abort().await;
                Err(e)
            }
        }
    }
}
