//! Durable file-system primitives: atomic replace (temp + fsync + rename + directory fsync),
//! directory fsync (both through `vmr-durable`), the early-writeback hint for a layer written
//! through the page cache, allocated-size accounting, and the test pause hook (`failpoints`
//! feature only).

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::StoreError;

/// Suffix of every temporary file the store writes; `recover` deletes leftovers.
pub(crate) const TMP_SUFFIX: &str = vmr_durable::TMP_SUFFIX;

/// fsync a directory so that renames/creations/unlinks inside it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    vmr_durable::fsync_dir(dir).map_err(StoreError::durable)
}

/// fsync a file's data and metadata.
pub(crate) fn fsync_file(path: &Path) -> Result<(), StoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    f.sync_all().map_err(|e| StoreError::io("fsync", path, e))
}

/// Start writing back the dirty pages of a file without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on the whole file). A hint, not a durability
/// step: nothing relies on it, and the commit's [`fsync_file`] still makes the file durable;
/// it only leaves that fsync less to write. It may block while the device's queue is full,
/// so it runs on a blocking thread.
#[allow(unsafe_code)]
pub(crate) fn start_writeback(path: &Path) -> Result<(), StoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    // SAFETY: `f` is an open file for the whole call; the call reads no memory of ours.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(StoreError::io(
            "sync_file_range",
            path,
            std::io::Error::last_os_error(),
        ))
    }
}

/// Replace `path` with `bytes` atomically and durably (`vmr_durable::write_atomic`: temp, fsync,
/// rename, directory fsync). A crash leaves either the old or the new content.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    vmr_durable::write_atomic(path, bytes).map_err(StoreError::durable)
}

/// Bytes actually allocated by a file (0 when it does not exist).
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Allocated bytes of every file under `dir`, recursively.
pub(crate) fn allocated_tree(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => allocated_tree(&e.path()),
            Ok(_) => allocated_bytes(&e.path()),
            Err(_) => 0,
        })
        .sum()
}

/// Test hook (only with the `failpoints` feature, never in release builds): when the
/// environment variable `VMR_STORE_TEST_PAUSE` names `step`, print
/// `PAUSED <step>` on stderr and sleep forever so that a crash test can SIGKILL the process at
/// exactly that step. Does nothing otherwise.
#[cfg(feature = "failpoints")]
pub(crate) fn pause_point(step: &str) {
    static WANT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let want = WANT.get_or_init(|| std::env::var("VMR_STORE_TEST_PAUSE").ok());
    if want.as_deref() == Some(step) {
        eprintln!("PAUSED {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Without the `failpoints` feature the pause hook compiles to nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn pause_point(_step: &str) {}

/// Test hook (only with the `failpoints` feature, never in release builds): when the
/// environment variable `VMR_STORE_TEST_IMPORT_SLOW_MS` holds a number, an import sleeps that
/// many ms after each extent it writes, so that a test can watch it run.
#[cfg(feature = "failpoints")]
pub(crate) async fn import_slow_point() {
    static MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let ms = MS.get_or_init(|| {
        std::env::var("VMR_STORE_TEST_IMPORT_SLOW_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    });
    if let Some(ms) = *ms {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Without the `failpoints` feature the import hook compiles to nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn import_slow_point() {}

/// A step a test can hold at a gate ([`gate_point`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gate {
    /// A prune that has marked a point for merging: `VMR_STORE_TEST_PRUNE_GATE`,
    /// `PRUNE WAITS <point>`.
    Prune,
    /// A cycle's commit whose layers are flushed and synced, before the catalog rename:
    /// `VMR_STORE_TEST_COMMIT_GATE`, `COMMIT WAITS <cycle>`.
    Commit,
}

/// Test hook (only with the `failpoints` feature, never in release builds): when the
/// environment variable of `gate` names a file, print `<STEP> WAITS <id>` on stderr and wait
/// until that file exists, so that a test can watch what the agent does meanwhile.
#[cfg(feature = "failpoints")]
pub(crate) async fn gate_point(gate: Gate, id: u64) {
    type Path = Option<std::path::PathBuf>;
    static PRUNE: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    static COMMIT: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    let (cell, var, step) = match gate {
        Gate::Prune => (&PRUNE, "VMR_STORE_TEST_PRUNE_GATE", "PRUNE"),
        Gate::Commit => (&COMMIT, "VMR_STORE_TEST_COMMIT_GATE", "COMMIT"),
    };
    if let Some(file) = cell.get_or_init(|| std::env::var_os(var).map(Into::into)) {
        eprintln!("{step} WAITS {id}");
        while !file.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Without the `failpoints` feature the gates compile to nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn gate_point(_gate: Gate, _id: u64) {}
