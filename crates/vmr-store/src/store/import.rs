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
                return Err(StoreError::InvalidImport(ImportFault::NoImage {
                    disk: d.to_string(),
                    dir: dir.to_path_buf(),
                }));
            }
            _ => {
                return Err(StoreError::InvalidImport(ImportFault::ManyImages {
                    disk: d.to_string(),
                    dir: dir.to_path_buf(),
                }));
            }
        }
    }
    Ok(out)
}

/// Where an import stands, reported after every extent written: `done` bytes of the disks
/// gone through (disk after disk, zero ranges included) of `total`, and `written` data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportPos {
    /// Bytes of the disks gone through.
    pub done: u64,
    /// The disks' total size.
    pub total: u64,
    /// Data bytes written so far.
    pub written: u64,
}

/// Receives an import's [`ImportPos`].
pub type ImportProgress<'a> = &'a (dyn Fn(ImportPos) + Sync);

/// Tracks an import's position from the extents it writes.
struct Tracker<'a> {
    /// Where each disk starts in the sequence of all disks' bytes.
    starts: Vec<u64>,
    total: u64,
    written: u64,
    report: ImportProgress<'a>,
}

impl<'a> Tracker<'a> {
    fn new(sizes: impl Iterator<Item = u64>, report: ImportProgress<'a>) -> Self {
        let mut starts = Vec::new();
        let mut total = 0u64;
        for size in sizes {
            starts.push(total);
            total = total.saturating_add(size);
        }
        report(ImportPos {
            done: 0,
            total,
            written: 0,
        });
        Self {
            starts,
            total,
            written: 0,
            report,
        }
    }

    fn wrote(&mut self, e: &Extent) {
        let len = match &e.data {
            ExtentData::Data(d) => {
                self.written += d.len() as u64;
                d.len() as u64
            }
            ExtentData::Zero(n) => *n,
        };
        let start = self
            .starts
            .get(e.disk as usize)
            .copied()
            .unwrap_or(self.total);
        (self.report)(ImportPos {
            done: start
                .saturating_add(e.offset)
                .saturating_add(len)
                .min(self.total),
            total: self.total,
            written: self.written,
        });
    }
}

impl Store {
    /// Import disk images as a new full recovery point of `vm` (the next cycle id; earlier
    /// points stay). Only allocated data is read; zero ranges become zero extents. `progress`
    /// hears where the import stands after every extent.
    pub async fn import_images(
        &self,
        vm: Uuid,
        images: &[ImportImage],
        progress: ImportProgress<'_>,
    ) -> Result<RecoveryPoint, StoreError> {
        if images.is_empty() {
            return Err(StoreError::InvalidImport(ImportFault::NoImages));
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
        let res = self.import_exports(vm, images, &exports, progress).await;
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
        progress: ImportProgress<'_>,
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
            group: None,
        };
        let mut track = Tracker::new(header.disks.iter().map(|d| d.size), progress);
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
                    track.wrote(c.extent());
                    crate::fsio::import_slow_point().await;
                }
                pos += len;
            }
        }
        w.finish().await
    }

    /// Import a cycle file exported by a primary (`c<id>.stage`, staging format 1): streamed
    /// through the layer writer, every extent's checksum and the whole-file chain verified on
    /// the way; the point is committed only when the file's trailer verified. The cycle keeps
    /// the primary's id so that the primary's next cycle, built on it, is accepted. `progress`
    /// hears where the import stands after every extent.
    pub async fn import_cycle_file(
        &self,
        path: &Path,
        progress: ImportProgress<'_>,
    ) -> Result<RecoveryPoint, StoreError> {
        self.stream_stage_file(path, None, progress).await
    }

    /// Stream a staging-format cycle file into a new point. Without `vm` (an import) only a
    /// full cycle is accepted and a duplicate is refused; with `vm` (replaying a cycle an older
    /// version staged) any kind is, and the file must be of that VM.
    pub(super) async fn stream_stage_file(
        &self,
        path: &Path,
        vm: Option<Uuid>,
        progress: ImportProgress<'_>,
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
                return Err(StoreError::InvalidImport(ImportFault::NotFull {
                    path: path.to_path_buf(),
                    kind: header.kind,
                }));
            }
            Some(vm) if vm != header.vm => {
                return Err(StoreError::corrupt(path, Corruption::StagedForOtherVm));
            }
            _ => {}
        }
        let id = header.id;
        let mut track = Tracker::new(header.disks.iter().map(|d| d.size), progress);
        let mut w = self.begin_cycle(header).await?;
        if w.is_duplicate() {
            return Err(StoreError::InvalidImport(ImportFault::AlreadyHeld(id)));
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
                let c = item?;
                w.put_checked(&c).await?;
                track.wrote(c.extent());
                if vm.is_none() {
                    crate::fsio::import_slow_point().await;
                }
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
