//! The naming scheme of every QEMU object vmreplica creates: all names start with
//! `vmr-<tag>-`, so several VMs on one QEMU/host never clash and leftovers are recognisable.

use std::path::{Path, PathBuf};

use crate::{CaptureError, ConfigFault};

/// Longest tag accepted (QEMU node names must stay below 32 characters).
pub const MAX_TAG_LEN: usize = 16;

/// Names of one VM's bitmaps, nodes, jobs, exports and files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `tag`: 1..=16 ASCII letters, digits or `_` (e.g. the first 8 hex digits of the VM UUID).
    pub fn new(tag: &str) -> Result<Names, CaptureError> {
        if tag.is_empty()
            || tag.len() > MAX_TAG_LEN
            || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(CaptureError::Config(ConfigFault::BadTag {
                tag: tag.to_owned(),
                max: MAX_TAG_LEN,
            }));
        }
        Ok(Names {
            prefix: format!("vmr-{tag}-"),
        })
    }

    /// `vmr-<tag>-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// True for any name of this VM.
    pub fn owns(&self, name: &str) -> bool {
        name.starts_with(&self.prefix)
    }

    /// The tracking bitmap of generation `gen`: `vmr-<tag>-<gen>`.
    pub fn bitmap(&self, generation: u64) -> String {
        format!("{}{generation}", self.prefix)
    }

    /// The generation of a tracking bitmap name of this VM.
    pub fn bitmap_generation(&self, name: &str) -> Option<u64> {
        let rest = name.strip_prefix(&self.prefix)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with('0') {
            return None;
        }
        rest.parse().ok()
    }

    /// Marker bitmap present while the full cycle starting generation `generation` is not
    /// committed: `vmr-<tag>-full<generation>`.
    pub fn full_marker(&self, generation: u64) -> String {
        format!("{}full{generation}", self.prefix)
    }

    /// True for a full-cycle marker bitmap of this VM.
    pub fn is_full_marker(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix("full"))
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
    }

    /// Fleecing target node of disk `i`.
    pub fn tmp_node(&self, i: usize) -> String {
        format!("{}t{i}", self.prefix)
    }

    /// Backup job's copy-before-write filter node of disk `i`.
    pub fn filter_node(&self, i: usize) -> String {
        format!("{}f{i}", self.prefix)
    }

    /// `snapshot-access` node of disk `i`.
    pub fn access_node(&self, i: usize) -> String {
        format!("{}a{i}", self.prefix)
    }

    /// Backup job of disk `i`.
    pub fn job(&self, i: usize) -> String {
        format!("{}j{i}", self.prefix)
    }

    /// NBD export id and name of disk `i`.
    pub fn export(&self, i: usize) -> String {
        format!("{}e{i}", self.prefix)
    }

    /// Fleecing temp file of disk `i`.
    pub fn fleece_file(&self, work_dir: &Path, i: usize) -> PathBuf {
        work_dir.join(format!("{}{i}.fleece", self.prefix))
    }

    /// True for a fleecing temp file name of this VM.
    pub fn is_fleece_file(&self, file_name: &str) -> bool {
        file_name.starts_with(&self.prefix) && file_name.ends_with(".fleece")
    }

    /// The NBD server socket vmreplica starts in QEMU.
    pub fn nbd_socket(&self, work_dir: &Path) -> PathBuf {
        work_dir.join(format!("{}nbd.sock", self.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_short() {
        let n = Names::new("0123456789abcdef").expect("tag");
        for s in [n.tmp_node(99), n.filter_node(99), n.access_node(99)] {
            assert!(s.len() < 32, "{s}");
            assert!(n.owns(&s));
        }
        assert_eq!(n.bitmap(7), "vmr-0123456789abcdef-7");
        assert_eq!(n.bitmap_generation("vmr-0123456789abcdef-7"), Some(7));
        assert_eq!(n.bitmap_generation(&n.full_marker(3)), None);
        assert!(n.is_full_marker(&n.full_marker(3)));
        assert!(!n.is_full_marker(&n.bitmap(3)));
        assert_eq!(n.bitmap_generation("vmr-0123456789abcdef-07"), None);
        assert_eq!(n.bitmap_generation("vmr-other-7"), None);
        assert!(n.is_fleece_file("vmr-0123456789abcdef-0.fleece"));
    }

    #[test]
    fn tags_are_validated() {
        assert!(Names::new("").is_err());
        assert!(Names::new("a-b").is_err());
        assert!(Names::new("01234567890123456").is_err());
        let a = Names::new("ab").expect("tag");
        // no tag is a prefix of another's names: '-' is not allowed in tags
        assert!(!a.owns("vmr-abc-1"));
    }
}
