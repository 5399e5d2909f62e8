//! Pending resynchronisation layers: a resync cycle is written straight into one new qcow2
//! layer per disk on top of the latest point (the resync's base) while it streams in. The
//! layers are no recovery point until the whole cycle has arrived: only then does the catalog
//! write commit them as one. A resync cut short (pause, network failure, either agent killed)
//! leaves them as the VM's *pending resync*, recorded in `DIR/<vm>/resync-pending`, and the
//! next attempt on the same base continues in them: the replica's block hashes for a resync
//! are those of the pending layers, so every block that already arrived compares equal and is
//! not sent again.
//!
//! Crash argument: correctness never depends on what the pending layers hold. The primary
//! compares *every* block of its new point-in-time view with them and sends each block that
//! differs, so whatever subset of an earlier attempt's writes reached the disk (qcow2 stays a
//! valid image after a crash; unflushed clusters are merely leaked), the committed point
//! equals the view. Until that commit every earlier point is untouched.

use super::*;

/// Record of the pending resync, next to the catalog.
const PENDING: &str = "resync-pending";
/// Flush the pending layers after this many bytes written, so a killed writer loses little.
const FLUSH_EVERY: u64 = 32 << 20;

/// The pending resync of one VM: its base point and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    base: CycleId,
    layers: Vec<LayerRecord>,
}

fn pending_text(p: &Pending) -> String {
    let mut s = format!("vmr-resync-pending 1\nbase {}\n", p.base);
    for l in &p.layers {
        s.push_str(&format!(
            "layer {} {} {} {}\n",
            l.disk,
            l.size,
            l.file,
            l.backing.as_deref().unwrap_or("-")
        ));
    }
    s
}

fn parse_pending(s: &str) -> Option<Pending> {
    let mut lines = s.lines();
    if lines.next()? != "vmr-resync-pending 1" {
        return None;
    }
    let base = lines.next()?.strip_prefix("base ")?.parse().ok()?;
    let mut layers = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        let [tag, disk, size, file, backing] = f.as_slice() else {
            return None;
        };
        if *tag != "layer" || !valid_name(disk) || !valid_name(file) {
            return None;
        }
        layers.push(LayerRecord {
            disk: (*disk).to_owned(),
            size: size.parse().ok()?,
            file: (*file).to_owned(),
            backing: (*backing != "-").then(|| (*backing).to_owned()),
        });
    }
    Some(Pending { base, layers })
}

impl Vm {
    fn pending_path(&self) -> PathBuf {
        self.dir.join(PENDING)
    }

    /// The recorded pending resync (an unreadable record counts as none).
    pub(super) fn pending(&self) -> Option<Pending> {
        let s = std::fs::read_to_string(self.pending_path()).ok()?;
        parse_pending(&s)
    }

    /// Files of the pending resync (kept by stray removal).
    pub(super) fn pending_files(&self) -> Vec<PathBuf> {
        self.pending()
            .map(|p| {
                p.layers
                    .iter()
                    .map(|l| self.disk_dir(&l.disk).join(&l.file))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn write_pending(&self, p: &Pending) -> Result<(), StoreError> {
        let path = self.pending_path();
        let tmp = self.dir.join(format!("{PENDING}{TMP_SUFFIX}"));
        std::fs::write(&tmp, pending_text(p)).map_err(|e| StoreError::io("write", &tmp, e))?;
        fsio::fsync_file(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &tmp, e))?;
        fsio::fsync_dir(&self.dir)
    }

    /// Forget the pending resync and delete its layers (never one the catalog references).
    fn drop_pending(&self, st: &VmState) {
        if let Some(p) = self.pending() {
            for l in &p.layers {
                let used = st.catalog.points.iter().any(|q| {
                    q.layers
                        .iter()
                        .any(|x| x.disk == l.disk && x.file == l.file)
                });
                if !used {
                    let _ = std::fs::remove_file(self.disk_dir(&l.disk).join(&l.file));
                }
            }
        }
        let _ = std::fs::remove_file(self.pending_path());
        let _ = fsio::fsync_dir(&self.dir);
    }
}

/// Receives one resync cycle into the pending layers ([`Store::begin_resync`]).
pub struct ResyncWriter {
    vm: Arc<Vm>,
    header: CycleHeader,
    layers: Vec<LayerRecord>,
    exports: Vec<Export>,
    pipe: Pipeline,
    since_flush: u64,
    resumed: bool,
}

impl Store {
    /// Start receiving resync cycle `header` (kind `Resync`, base = the latest point, nothing
    /// staged). Continues the pending resync of the same base when there is one
    /// ([`ResyncWriter::resumed`]); otherwise creates fresh layers on top of the base.
    pub async fn begin_resync(&self, header: CycleHeader) -> Result<ResyncWriter, StoreError> {
        let v = self.vm(header.vm)?;
        validate_header(&header)?;
        if header.kind != CycleKind::Resync {
            return Err(StoreError::InvalidCycle("not a resync cycle".into()));
        }
        let _chain = v.chain.lock().await;
        let (base, resumed, layers) = {
            let mut st = lock(&v.st);
            let latest = st.latest_known();
            if header.base != latest || st.latest_point() != latest {
                return Err(StoreError::WrongBase {
                    expected: latest,
                    got: header.base,
                });
            }
            st.check_no_shrink(&header)?;
            if let Some(r) = st.receiving {
                return Err(StoreError::ReceiveInProgress(r));
            }
            let base = find_point(&st.catalog, latest)?.clone();
            let fresh: Vec<LayerRecord> = header
                .disks
                .iter()
                .map(|d| {
                    let backing = base
                        .layers
                        .iter()
                        .find(|l| l.disk == d.id)
                        .map(|l| l.file.clone());
                    LayerRecord {
                        disk: d.id.clone(),
                        size: d.size,
                        file: format!("rs{:06}.qcow2", base.id),
                        backing,
                    }
                })
                .collect();
            let keep = v.pending().filter(|p| {
                p.base == base.id
                    && p.layers == fresh
                    && p.layers
                        .iter()
                        .all(|l| v.disk_dir(&l.disk).join(&l.file).is_file())
            });
            let resumed = keep.is_some();
            if !resumed {
                v.drop_pending(&st);
            }
            st.receiving = Some(header.id);
            (base.id, resumed, fresh)
        };
        let made = async {
            if !resumed {
                for l in &layers {
                    let dir = v.disk_dir(&l.disk);
                    std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
                    let _ = std::fs::remove_file(dir.join(&l.file));
                    qemu::create_layer(&dir, &l.file, l.size, l.backing.as_deref(), false).await?;
                    fsio::fsync_file(&dir.join(&l.file))?;
                    fsio::fsync_dir(&dir)?;
                }
                v.write_pending(&Pending {
                    base,
                    layers: layers.clone(),
                })?;
            }
            let mut exports = Vec::new();
            for l in &layers {
                match Export::start(&v.disk_dir(&l.disk).join(&l.file)).await {
                    Ok(x) => exports.push(x),
                    Err(e) => {
                        for x in exports {
                            x.abort().await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(exports)
        }
        .await;
        drop(_chain);
        match made {
            Ok(exports) => Ok(ResyncWriter {
                vm: v,
                header,
                layers,
                exports,
                pipe: Pipeline::default(),
                since_flush: 0,
                resumed,
            }),
            Err(e) => {
                let mut st = lock(&v.st);
                st.receiving = None;
                v.drop_pending(&st);
                Err(e)
            }
        }
    }

    /// The layer a resync of `vm` compares `disk` against: the pending resync's when it is on
    /// top of the latest point, else the latest point's. With the layer, its disk size.
    pub fn resync_layer(
        &self,
        vm: Uuid,
        disk: &str,
    ) -> Result<(CycleId, Option<(PathBuf, u64)>), StoreError> {
        let v = self.vm(vm)?;
        let st = lock(&v.st);
        let p = find_point(&st.catalog, None)?;
        let of = |ls: &[LayerRecord]| {
            ls.iter()
                .find(|l| l.disk == disk)
                .map(|l| (v.disk_dir(&l.disk).join(&l.file), l.size))
        };
        if let Some(pending) = v.pending().filter(|x| x.base == p.id)
            && let Some(found) = of(&pending.layers)
            && found.0.is_file()
        {
            return Ok((p.id, Some(found)));
        }
        Ok((p.id, of(&p.layers)))
    }
}

impl ResyncWriter {
    /// True when this continues an earlier, interrupted attempt's layers.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The cycle being received.
    pub fn header(&self) -> &CycleHeader {
        &self.header
    }

    /// Write one extent into the pending layers after verifying `checksum` against it.
    pub async fn put(&mut self, extent: &Extent, checksum: [u8; 32]) -> Result<(), StoreError> {
        check_extent(&self.header, extent)?;
        if vmr_proto::checksum(extent.disk, extent.offset, &extent.data) != checksum {
            return Err(StoreError::CorruptExtent {
                disk: extent.disk,
                offset: extent.offset,
            });
        }
        let i = extent.disk as usize;
        let (Some(l), Some(x)) = (self.layers.get(i), self.exports.get(i)) else {
            return Err(StoreError::InvalidCycle(format!("disk index {i}")));
        };
        self.pipe
            .order(extent.disk, extent.offset, extent.len())
            .await?;
        match &extent.data {
            ExtentData::Data(b) => {
                self.pipe
                    .write(&x.client, &l.file, extent.offset, b.clone(), x.chunk())
                    .await?
            }
            // The layer may hold an earlier attempt's data here, or its backing data: zero it.
            ExtentData::Zero(n) => {
                self.pipe
                    .zero(&x.client, &l.file, extent.offset, *n, x.chunk())
                    .await?
            }
        }
        self.since_flush += extent.len();
        if self.since_flush >= FLUSH_EVERY {
            self.pipe.drain().await?;
            for (x, l) in self.exports.iter().zip(&self.layers) {
                x.client
                    .flush()
                    .await
                    .map_err(|e| StoreError::nbd(l.file.clone(), e))?;
            }
            self.since_flush = 0;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), StoreError> {
        let drained = self.pipe.drain().await;
        let mut res = drained;
        for x in std::mem::take(&mut self.exports) {
            if res.is_ok() {
                res = x.finish().await;
            } else {
                x.abort().await;
            }
        }
        res?;
        for l in &self.layers {
            let dir = self.vm.disk_dir(&l.disk);
            fsio::fsync_file(&dir.join(&l.file))?;
        }
        Ok(())
    }

    /// The whole cycle arrived: make the pending layers durable and commit them as the
    /// cycle's recovery point (the catalog write is the instant it exists).
    pub async fn finish(mut self) -> Result<RecoveryPoint, StoreError> {
        self.close().await?;
        let v = self.vm.clone();
        let _chain = v.chain.lock().await;
        let mut st = lock(&v.st);
        st.receiving = None;
        if st.latest_point() != self.header.base || !st.staged.is_empty() {
            return Err(StoreError::WrongBase {
                expected: st.latest_known(),
                got: self.header.base,
            });
        }
        let point = PointRecord {
            id: self.header.id,
            taken_at_ms: self.header.taken_at_ms,
            kind: PointKind::from(self.header.consistency),
            layers: std::mem::take(&mut self.layers),
            pruning: false,
        };
        let mut c = st.catalog.clone();
        c.points.push(point.clone());
        v.commit(&mut st, c)?;
        let _ = std::fs::remove_file(v.pending_path());
        let _ = fsio::fsync_dir(&v.dir);
        Ok(v.point_info(&st.catalog, &point))
    }

    /// The stream ended early: flush what arrived and keep it for the next attempt.
    pub async fn suspend(mut self) {
        if let Err(e) = self.close().await {
            tracing::warn!(vm = %self.header.vm, "closing the pending resync layers: {e}");
        }
        lock(&self.vm.st).receiving = None;
    }
}

impl Drop for ResyncWriter {
    fn drop(&mut self) {
        let vm = self.vm.clone();
        let id = self.header.id;
        let release = move || {
            let mut st = lock(&vm.st);
            if st.receiving == Some(id) {
                st.receiving = None;
            }
        };
        // Dropped mid-stream (the connection went away): flush and close in the background;
        // the VM counts as receiving until then, so the next attempt does not open the
        // layers while qemu-nbd still holds them.
        let exports = std::mem::take(&mut self.exports);
        match tokio::runtime::Handle::try_current() {
            Ok(h) if !exports.is_empty() => {
                h.spawn(async move {
                    for x in exports {
                        let _ = x.finish().await;
                    }
                    release();
                });
            }
            _ => release(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_record_round_trips() {
        let p = Pending {
            base: 7,
            layers: vec![
                LayerRecord {
                    disk: "disk0".into(),
                    size: 1 << 30,
                    file: "rs000007.qcow2".into(),
                    backing: Some("c000007.qcow2".into()),
                },
                LayerRecord {
                    disk: "new".into(),
                    size: 4096,
                    file: "rs000007.qcow2".into(),
                    backing: None,
                },
            ],
        };
        assert_eq!(parse_pending(&pending_text(&p)), Some(p));
        assert_eq!(parse_pending("garbage"), None);
        assert_eq!(
            parse_pending("vmr-resync-pending 1\nbase 1\nlayer ../x 1 f -\n"),
            None
        );
    }
}
