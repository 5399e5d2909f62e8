//! Where vmreplica's processes put Unix sockets: the one rule that keeps a socket path within
//! the 107 bytes `sun_path` allows. A socket belongs inside the directory of what owns it (an
//! agent directory, a store root), never loose in the temp dir, so a killed process leaves
//! nothing outside its own directory; when the preferred path is too long, the directory part
//! is shortened to `<runtime>/vmreplica/<blake3(owner dir)[..16]>`, where `<runtime>` is
//! `$XDG_RUNTIME_DIR`, or `/run` when the process may write there (root), or the temp dir.
//! Two owners on one host never share the shortened directory; the socket's name is kept.

use std::path::{Path, PathBuf};

/// Longest Unix socket path (`sun_path` has 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The base of shortened socket directories: `$XDG_RUNTIME_DIR` (when absolute), else `/run`
/// when this process may write there, else the temp dir.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| {
            if nix::unistd::access("/run", nix::unistd::AccessFlags::W_OK).is_ok() {
                PathBuf::from("/run")
            } else {
                std::env::temp_dir()
            }
        })
}

/// The shortened socket directory of `owner_dir`:
/// `<runtime>/vmreplica/<first 16 hex digits of blake3(owner_dir)>`.
pub fn short_socket_dir(owner_dir: &Path) -> PathBuf {
    let hash = blake3::hash(owner_dir.as_os_str().as_encoded_bytes()).to_hex();
    runtime_dir().join("vmreplica").join(&hash.as_str()[..16])
}

/// `preferred` (a socket path inside `owner_dir`) when it fits [`MAX_SOCKET_PATH`], else
/// `short_name` in [`short_socket_dir`]`(owner_dir)`.
pub fn socket_path(preferred: PathBuf, owner_dir: &Path, short_name: &str) -> PathBuf {
    if preferred.as_os_str().len() <= MAX_SOCKET_PATH {
        preferred
    } else {
        short_socket_dir(owner_dir).join(short_name)
    }
}

/// The directory for sockets of `owner_dir` whose names are at most `longest_name` bytes:
/// `preferred_dir` when every such socket fits [`MAX_SOCKET_PATH`] there, else
/// [`short_socket_dir`]`(owner_dir)`.
pub fn socket_dir(preferred_dir: PathBuf, owner_dir: &Path, longest_name: usize) -> PathBuf {
    if preferred_dir.as_os_str().len() + 1 + longest_name <= MAX_SOCKET_PATH {
        preferred_dir
    } else {
        short_socket_dir(owner_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_fits_is_kept() {
        let owner = Path::new("/var/lib/vmreplica");
        let p = owner.join("work/x/vmr-x-nbd.sock");
        assert_eq!(socket_path(p.clone(), owner, "vmr-x.sock"), p);
        let d = owner.join("sock");
        assert_eq!(socket_dir(d.clone(), owner, 40), d);
    }

    #[test]
    fn a_long_path_is_shortened_per_owner_and_keeps_its_name() {
        let a = PathBuf::from(format!("/{}", "a".repeat(100)));
        let b = PathBuf::from(format!("/{}", "b".repeat(100)));
        let pa = socket_path(a.join("s.sock"), &a, "vmr-1.sock");
        let pb = socket_path(b.join("s.sock"), &b, "vmr-1.sock");
        assert_ne!(pa, pb);
        assert!(pa.ends_with("vmr-1.sock"));
        assert!(pa.starts_with(runtime_dir().join("vmreplica")));
        assert!(pa.as_os_str().len() <= MAX_SOCKET_PATH, "{pa:?}");
        // A directory is shortened when its longest socket would not fit.
        let d = PathBuf::from(format!("/{}", "c".repeat(70)));
        assert_eq!(socket_dir(d.clone(), &d, 35), d);
        assert_eq!(socket_dir(d.clone(), &d, 36), short_socket_dir(&d));
    }
}
