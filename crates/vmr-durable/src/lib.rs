//! The one way vmreplica makes a file durable: [`write_atomic`] writes a temporary file beside
//! the target, fsyncs it, renames it over the target and fsyncs the directory, so that after a
//! crash at any instant the target holds either its old or its new content, never a mix, and
//! a completed call survives a power loss. [`persist`] does the same for a large file streamed
//! to a temporary name. [`fsync_dir`] makes a rename, creation or unlink inside a directory
//! durable.
//!
//! [`write_visible`] is the same replace without the fsyncs, for a checked cache file that is
//! made durable later, off the hot path.
//!
//! Architecture Invariant: every durable file of every crate (catalogs, configs, identities,
//! manifests, definitions) is written through [`write_atomic`].

use std::io::Write;
use std::path::{Path, PathBuf};

/// Suffix of the temporary file [`write_atomic`] writes before the rename; a crash can leave
/// one behind, and a recovery may delete any file with this suffix.
pub const TMP_SUFFIX: &str = ".tmp";

/// What failed, and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct DurableError {
    /// The operation (create, write, fsync, rename, fsync directory).
    pub op: &'static str,
    /// The path it was done on.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl DurableError {
    fn new(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the device is full (ENOSPC or EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        matches!(self.source.raw_os_error(), Some(28 | 122))
    }
}

/// fsync a directory so that renames, creations and unlinks inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    let f = std::fs::File::open(dir).map_err(|e| DurableError::new("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| DurableError::new("fsync directory", dir, e))
}

/// The temporary name [`write_atomic`] uses for `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TMP_SUFFIX);
    PathBuf::from(name)
}

/// Replace `path` with `bytes` atomically and durably, with file mode `mode` (e.g. 0o600 for
/// a private key; the mode is set before any byte is written).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| DurableError::new("create", &tmp, e))?;
        // A temporary file left by a crash keeps its old mode through `open`: set it here,
        // before any byte is written.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| DurableError::new("chmod", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| DurableError::new("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| DurableError::new("fsync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| DurableError::new("rename", &tmp, e))?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Move a file written elsewhere (a large file streamed to `tmp`) into place durably: fsync
/// `tmp`, rename it over `dest`, fsync `dest`'s directory. A crash leaves either the old
/// `dest` (and maybe `tmp`) or the new one, complete.
pub fn persist(tmp: &Path, dest: &Path) -> Result<(), DurableError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(tmp)
        .map_err(|e| DurableError::new("open", tmp, e))?;
    f.sync_all()
        .map_err(|e| DurableError::new("fsync", tmp, e))?;
    std::fs::rename(tmp, dest).map_err(|e| DurableError::new("rename", tmp, e))?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fsync_dir(dir)
}

/// Replace `path` with `bytes` atomically but **not durably** (temp file, write, rename; no
/// fsync): readers see the old or the new content, never a mix, but a power loss may leave the
/// target missing, empty or old. Only for a cache whose content is checked when read (a
/// checksum and its own identity inside), whose loss costs time, never data; make it durable
/// later, off the hot path, with an fsync of the file and of its directory.
pub fn write_visible(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let tmp = tmp_path(path);
    let res = (|| {
        std::fs::write(&tmp, bytes).map_err(|e| DurableError::new("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| DurableError::new("rename", &tmp, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Replace `path` with `bytes` atomically and durably (mode 0644).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    write_atomic_mode(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f.json");
        write_atomic(&p, b"one").expect("first write");
        write_atomic(&p, b"two").expect("second write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn private_mode_is_applied() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("key.pem");
        write_atomic_mode(&p, b"secret", 0o600).expect("write");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_stale_temp_file_does_not_keep_its_mode() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("key.pem");
        std::fs::write(tmp_path(&p), b"left by a crash").expect("stale temp");
        std::fs::set_permissions(tmp_path(&p), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        write_atomic_mode(&p, b"secret", 0o600).expect("write");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&p).expect("read"), b"secret");
    }

    #[test]
    fn persist_moves_a_streamed_file_into_place() {
        let d = tempfile::tempdir().expect("tempdir");
        let tmp = d.path().join("big.tmp");
        let dest = d.path().join("big");
        std::fs::write(&tmp, vec![7u8; 1 << 20]).expect("write");
        persist(&tmp, &dest).expect("persist");
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&dest).expect("read").len(), 1 << 20);
        let e = persist(&tmp, &dest).expect_err("the temp file is gone");
        assert_eq!(e.op, "open");
    }

    #[test]
    fn failure_names_the_path_and_keeps_the_old_content() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        write_atomic(&p, b"old").expect("write");
        // A directory in the temp file's place makes the create fail.
        std::fs::create_dir(tmp_path(&p)).expect("mkdir");
        let e = write_atomic(&p, b"new").expect_err("must fail");
        assert_eq!(e.op, "create");
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
    }
}
