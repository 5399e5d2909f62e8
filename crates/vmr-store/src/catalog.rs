//! `catalog.json`: encode/decode the per-VM recovery-point catalog with its format version and
//! BLAKE3 checksum, and write it atomically (the apply/prune commit point).
//!
//! The checksum is the lowercase hex BLAKE3 of the compact JSON encoding of the `catalog`
//! member as this version's types serialize it; a reader re-encodes what it parsed and compares,
//! so any edited or torn byte fails the check.

use std::path::Path;

use vmr_proto::store::{CATALOG_FORMAT, Catalog, CatalogFile};

use crate::error::{Corruption, StoreError};
use crate::fsio;

/// Largest catalog file accepted (a bad file must not make us allocate without bound).
const MAX_CATALOG_BYTES: u64 = 64 << 20;

fn body_checksum(c: &Catalog) -> Result<String, serde_json::Error> {
    let body = serde_json::to_vec(c)?;
    Ok(blake3::hash(&body).to_hex().to_string())
}

/// Encode a catalog as the bytes of `catalog.json`. A serialization failure is an error (never
/// empty bytes, which would replace the commit point with an unreadable file).
pub fn encode(c: &Catalog) -> Result<Vec<u8>, StoreError> {
    let checksum = body_checksum(c).map_err(StoreError::Encode)?;
    let file = CatalogFile {
        format: CATALOG_FORMAT,
        checksum,
        catalog: c.clone(),
    };
    let mut out = serde_json::to_vec_pretty(&file).map_err(StoreError::Encode)?;
    out.push(b'\n');
    Ok(out)
}

/// Decode and verify `catalog.json` bytes; `path` only names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Catalog, StoreError> {
    let file: CatalogFile = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt(path, Corruption::NotCatalog(e)))?;
    if file.format != CATALOG_FORMAT {
        return Err(StoreError::corrupt(
            path,
            Corruption::CatalogFormat {
                found: file.format,
                reads: CATALOG_FORMAT,
            },
        ));
    }
    let sum = body_checksum(&file.catalog)
        .map_err(|e| StoreError::corrupt(path, Corruption::ReEncode(e)))?;
    if sum != file.checksum {
        return Err(StoreError::corrupt(path, Corruption::CatalogChecksum));
    }
    let c = file.catalog;
    if c.points.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(StoreError::corrupt(path, Corruption::PointOrder));
    }
    Ok(c)
}

/// Read and verify a catalog file.
pub fn read(path: &Path) -> Result<Catalog, StoreError> {
    let len = std::fs::metadata(path)
        .map_err(|e| StoreError::io("stat", path, e))?
        .len();
    if len > MAX_CATALOG_BYTES {
        return Err(StoreError::corrupt(path, Corruption::CatalogTooLarge(len)));
    }
    let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
    decode(&bytes, path)
}

/// Write a catalog durably (temp + fsync + rename + directory fsync). The store itself writes
/// through its storage seam (`storage.rs`); this is the same with the real backend.
pub fn write(path: &Path, c: &Catalog) -> Result<(), StoreError> {
    fsio::atomic_write(path, &encode(c)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::store::{LayerRecord, PointKind, PointRecord, RetentionPolicy};

    fn sample() -> Catalog {
        Catalog {
            vm: uuid::Uuid::nil(),
            generation: 3,
            retention: RetentionPolicy {
                hourly: 4,
                app_consistent_every_hours: Some(2),
                grid: None,
            },
            points: vec![PointRecord {
                id: 42,
                taken_at_ms: 1000,
                kind: PointKind::AppConsistent,
                layers: vec![LayerRecord {
                    disk: "disk0".into(),
                    size: 1 << 20,
                    file: "c000042.qcow2".into(),
                    backing: Some("base.qcow2".into()),
                }],
                pruning: false,
                group: None,
            }],
            views: vec![],
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let bytes = encode(&c).expect("encode");
        assert_eq!(decode(&bytes, Path::new("x")).expect("decode"), c);
    }

    #[test]
    fn checksum_detects_edit() {
        let bytes = encode(&sample()).expect("encode");
        let text = String::from_utf8(bytes)
            .expect("utf8")
            .replace("1000", "1001");
        let err = decode(text.as_bytes(), Path::new("x")).expect_err("must fail");
        assert!(
            matches!(&err, StoreError::CorruptFile { reason, .. }
                if matches!(**reason, Corruption::CatalogChecksum)),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_other_version_and_garbage() {
        let text = String::from_utf8(encode(&sample()).expect("encode"))
            .expect("utf8")
            .replace("\"format\": 1", "\"format\": 9");
        let err = decode(text.as_bytes(), Path::new("x")).expect_err("format 9");
        assert!(
            matches!(&err, StoreError::CorruptFile { reason, .. }
                if matches!(**reason, Corruption::CatalogFormat { found: 9, reads: 1 })),
            "{err:?}"
        );
        assert!(matches!(
            decode(b"{\"format\":", Path::new("x")),
            Err(StoreError::CorruptFile { .. })
        ));
        let half = encode(&sample()).expect("encode");
        assert!(decode(&half[..half.len() / 2], Path::new("x")).is_err());
    }

    #[test]
    fn atomic_write_then_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("catalog.json");
        write(&p, &sample()).expect("write");
        assert_eq!(read(&p).expect("read"), sample());
        assert!(!dir.path().join("catalog.json.tmp").exists());
    }
}
