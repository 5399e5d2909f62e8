//! The store's narrow storage seam: the durable file-system operations the commit protocol
//! relies on (atomic replace = create + write + fsync + rename + directory fsync, file fsync,
//! directory fsync, unlink) go through [`Storage`]. The real backend is `vmr-durable`; with the
//! `failpoints` feature (never in release builds) [`FaultStorage`] works on the real files but
//! journals every change that is not yet durable, so a test can stop the process at any step,
//! simulate a power loss (un-fsynced writes and un-fsynced directory entries are undone) or make
//! fsync fail with EIO. QEMU writes the layer files itself; the seam covers what the store
//! writes and every fsync it relies on.

use std::path::Path;

use crate::error::StoreError;
use crate::fsio;

/// Durable file-system operations of the store.
pub(crate) trait Storage: Send + Sync + std::fmt::Debug {
    /// Replace `path` with `bytes` atomically and durably (temp, fsync, rename, directory
    /// fsync): after a crash it holds the old or the new content.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError>;
    /// Replace `path` with `bytes` atomically but not durably (temp, rename; no fsync): for
    /// a checked cache file (a block-hash index) made durable later with [`Storage::fsync_file`]
    /// and [`Storage::fsync_dir`]; a power loss before that may lose it.
    fn write_visible(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError>;
    /// fsync a file's data.
    fn fsync_file(&self, path: &Path) -> Result<(), StoreError>;
    /// fsync a directory (entries created, renamed or unlinked in it become durable).
    fn fsync_dir(&self, dir: &Path) -> Result<(), StoreError>;
    /// Unlink a file; a missing file is not an error.
    fn remove_file(&self, path: &Path) -> Result<(), StoreError>;
}

/// The real backend: `vmr-durable` and the OS.
#[derive(Debug, Default)]
pub(crate) struct RealStorage;

impl Storage for RealStorage {
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        fsio::atomic_write(path, bytes)
    }
    fn write_visible(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        vmr_durable::write_visible(path, bytes).map_err(StoreError::durable)
    }
    fn fsync_file(&self, path: &Path) -> Result<(), StoreError> {
        fsio::fsync_file(path)
    }
    fn fsync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        fsio::fsync_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> Result<(), StoreError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", path, e)),
        }
    }
}

#[cfg(feature = "failpoints")]
pub use fault::FaultStorage;

#[cfg(feature = "failpoints")]
mod fault {
    //! The fault-injecting backend (feature `failpoints`).

    use std::collections::HashSet;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::Storage;
    use crate::error::{Corruption, StoreError};

    /// A change not yet durable, undone by a power loss.
    #[derive(Debug)]
    enum Undo {
        /// A directory entry created (the file did not exist before).
        Created(PathBuf),
        /// A directory entry replaced or removed; its previous content.
        Restore(PathBuf, Vec<u8>),
    }

    #[derive(Debug, Default)]
    struct State {
        /// Mutating steps left before the simulated process death (`None`: never).
        steps_left: Option<u32>,
        dead: bool,
        fail_fsync: bool,
        journal: Vec<Undo>,
        /// Files whose data was written but not fsynced.
        unsynced: HashSet<PathBuf>,
    }

    /// Real files, with every not-yet-durable change journaled (see the module docs). Open a
    /// store on it with `Store::open_with_faults`.
    #[derive(Debug, Default)]
    pub struct FaultStorage {
        st: Mutex<State>,
    }

    fn eio(op: &'static str, path: &Path) -> StoreError {
        StoreError::io(op, path, std::io::Error::from_raw_os_error(libc::EIO))
    }

    impl FaultStorage {
        /// The process "dies" at the `n`-th mutating step from now (create+write, fsync,
        /// rename, directory fsync, unlink): that step and every later one fail with EIO.
        pub fn crash_after(&self, n: u32) {
            self.lock().steps_left = Some(n);
        }

        /// Make every fsync (file or directory) fail with EIO.
        pub fn fail_fsync(&self, on: bool) {
            self.lock().fail_fsync = on;
        }

        /// Simulate a power loss: undo every change that was not made durable, newest first;
        /// a file whose entry survived but whose data was not fsynced loses its data.
        pub fn power_loss(&self) {
            let mut st = self.lock();
            while let Some(u) = st.journal.pop() {
                match u {
                    Undo::Created(p) => {
                        let _ = std::fs::remove_file(&p);
                        st.unsynced.remove(&p);
                    }
                    Undo::Restore(p, old) => {
                        let _ = std::fs::write(&p, old);
                        st.unsynced.remove(&p);
                    }
                }
            }
            for p in std::mem::take(&mut st.unsynced) {
                let _ = std::fs::write(&p, b"");
            }
            st.dead = false;
            st.steps_left = None;
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.st.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Account one mutating step; fails once the process is "dead".
        fn step(&self, op: &'static str, path: &Path) -> Result<(), StoreError> {
            let mut st = self.lock();
            if st.dead {
                return Err(eio(op, path));
            }
            if let Some(n) = st.steps_left.as_mut() {
                if *n == 0 {
                    st.dead = true;
                    return Err(eio(op, path));
                }
                *n -= 1;
            }
            Ok(())
        }

        fn record_entry_change(&self, path: &Path) {
            let old = std::fs::read(path).ok();
            let undo = match old {
                Some(old) => Undo::Restore(path.to_owned(), old),
                None => Undo::Created(path.to_owned()),
            };
            self.lock().journal.push(undo);
        }

        fn write_new(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
            self.step("create", path)?;
            self.record_entry_change(path);
            std::fs::write(path, bytes).map_err(|e| StoreError::io("write", path, e))?;
            self.lock().unsynced.insert(path.to_owned());
            Ok(())
        }

        fn rename(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
            self.step("rename", from)?;
            self.record_entry_change(from);
            self.record_entry_change(to);
            std::fs::rename(from, to).map_err(|e| StoreError::io("rename", from, e))?;
            let mut st = self.lock();
            if st.unsynced.remove(from) {
                st.unsynced.insert(to.to_owned());
            }
            Ok(())
        }
    }

    impl Storage for FaultStorage {
        fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
            let dir = path
                .parent()
                .ok_or_else(|| StoreError::corrupt(path, Corruption::NoParent))?;
            let tmp = vmr_durable::tmp_path(path);
            let res = (|| {
                self.write_new(&tmp, bytes)?;
                self.fsync_file(&tmp)?;
                self.rename(&tmp, path)?;
                self.fsync_dir(dir)
            })();
            if res.is_err() && !self.lock().dead {
                let _ = self.remove_file(&tmp);
            }
            res
        }

        fn write_visible(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
            let tmp = vmr_durable::tmp_path(path);
            let res = self
                .write_new(&tmp, bytes)
                .and_then(|()| self.rename(&tmp, path));
            if res.is_err() && !self.lock().dead {
                let _ = self.remove_file(&tmp);
            }
            res
        }

        fn fsync_file(&self, path: &Path) -> Result<(), StoreError> {
            self.step("fsync", path)?;
            let mut st = self.lock();
            if st.fail_fsync {
                return Err(eio("fsync", path));
            }
            st.unsynced.remove(path);
            Ok(())
        }

        fn fsync_dir(&self, dir: &Path) -> Result<(), StoreError> {
            self.step("fsync directory", dir)?;
            let mut st = self.lock();
            if st.fail_fsync {
                return Err(eio("fsync directory", dir));
            }
            st.journal.retain(|u| {
                let p = match u {
                    Undo::Created(p) | Undo::Restore(p, _) => p,
                };
                p.parent() != Some(dir)
            });
            Ok(())
        }

        fn remove_file(&self, path: &Path) -> Result<(), StoreError> {
            self.step("remove", path)?;
            if !path.exists() {
                return Ok(());
            }
            self.record_entry_change(path);
            std::fs::remove_file(path).map_err(|e| StoreError::io("remove", path, e))
        }
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    //! The crash table of the commit protocol on the fault backend, without QEMU: a catalog or
    //! definition write stopped at every step, followed by a power loss, leaves the old or
    //! the new content (never a damaged or missing catalog), and one that returned `Ok`
    //! survives the power loss. An fsync that fails with EIO fails the operation and leaves the
    //! in-memory state as it was.

    use std::sync::Arc;

    use super::FaultStorage;
    use crate::{RetentionPolicy, Store};

    fn vm() -> uuid::Uuid {
        uuid::Uuid::from_u128(0x6c1f_6d7e_5a8b_4d67_9d3e_2b1f_1c0a_9e01)
    }

    fn def(name: &str) -> String {
        format!(
            "name = \"{name}\"\nuuid = \"{}\"\nprogram = \"x\"\nargs = []\n\
             [[disks]]\nnode = \"disk0\"\npath = \"/x\"\n",
            vm()
        )
    }

    fn policy(hourly: u32) -> RetentionPolicy {
        RetentionPolicy {
            hourly,
            app_consistent_every_hours: None,
            grid: None,
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        AddVm,
        SetRetention,
        SetDefinition,
    }

    /// Run `op` on a store on the fault backend that dies at step `k`, then lose power and
    /// reopen with the real backend. Returns whether the op succeeded and what survived.
    fn run(op: Op, k: Option<u32>) -> (bool, Option<(u32, String)>) {
        let dir = tempfile::tempdir().expect("tempdir");
        if !matches!(op, Op::AddVm) {
            let s = Store::open(dir.path()).expect("open");
            s.add_vm(vm(), &def("old"), policy(1)).expect("add");
        }
        let fs = Arc::new(FaultStorage::default());
        let s = Store::open_with_faults(dir.path(), fs.clone()).expect("open faulty");
        if let Some(k) = k {
            fs.crash_after(k);
        }
        let ok = match op {
            Op::AddVm => s.add_vm(vm(), &def("new"), policy(2)).is_ok(),
            Op::SetRetention => s.set_retention(vm(), policy(2)).is_ok(),
            Op::SetDefinition => s.set_definition(vm(), &def("new")).is_ok(),
        };
        drop(s);
        fs.power_loss();
        let s = Store::open(dir.path()).expect("reopen after power loss: catalog readable");
        if s.vms().is_empty() {
            return (ok, None);
        }
        let kept = s.retention_policy(vm()).expect("policy").hourly;
        let d = s.definition(vm()).expect("definition");
        let name = if d.contains("\"new\"") { "new" } else { "old" };
        (ok, Some((kept, name.to_owned())))
    }

    #[test]
    fn every_step_of_a_commit_leaves_old_or_new() {
        for op in [Op::AddVm, Op::SetRetention, Op::SetDefinition] {
            let mut reached_ok = false;
            for k in 0..16 {
                let (ok, after) = run(op, Some(k));
                match (op, &after) {
                    (Op::AddVm, None) => assert!(!ok, "{op:?} step {k}: acknowledged VM lost"),
                    (Op::AddVm, Some((h, n))) => {
                        assert_eq!((*h, n.as_str()), (2, "new"), "{op:?} step {k}")
                    }
                    (_, None) => panic!("{op:?} step {k}: VM lost"),
                    (Op::SetRetention, Some((h, _))) => {
                        assert!(*h == 1 || *h == 2, "{op:?} step {k}");
                        if ok {
                            assert_eq!(*h, 2, "{op:?} step {k}: acknowledged change lost");
                        }
                    }
                    (Op::SetDefinition, Some((_, n))) => {
                        if ok {
                            assert_eq!(n, "new", "{op:?} step {k}: acknowledged change lost");
                        }
                    }
                }
                reached_ok |= ok;
            }
            assert!(reached_ok, "{op:?} never completed within 16 steps");
            // No crash at all: durable.
            let (ok, after) = run(op, None);
            assert!(ok);
            let after = after.expect("registered");
            match op {
                Op::SetDefinition => assert_eq!(after.1, "new"),
                _ => assert_eq!(after.0, 2),
            }
        }
    }

    #[test]
    fn fsync_eio_fails_the_commit_and_keeps_the_old_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        Store::open(dir.path())
            .expect("open")
            .add_vm(vm(), &def("old"), policy(1))
            .expect("add");
        let fs = Arc::new(FaultStorage::default());
        let s = Store::open_with_faults(dir.path(), fs.clone()).expect("open");
        fs.fail_fsync(true);
        assert!(s.set_retention(vm(), policy(2)).is_err());
        assert_eq!(s.retention_policy(vm()).expect("policy").hourly, 1);
        fs.fail_fsync(false);
        fs.power_loss();
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.retention_policy(vm()).expect("policy").hourly, 1);
        assert!(
            !dir.path()
                .join(format!("vms/{}/catalog.json.tmp", vm()))
                .exists()
        );
    }
}
