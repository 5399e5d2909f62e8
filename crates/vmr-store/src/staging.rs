//! The staging file format (`staging/c<id>.stage`): one received cycle, written sequentially
//! and verified record by record when read back.
//!
//! ```text
//! header   magic "VMRSTAGE" | version u32 | json_len u32 | CycleHeader JSON | BLAKE3(JSON) [32]
//! record   tag u8 (1 data, 2 zero) | disk u32 | offset u64 | len u64 | extent checksum [32]
//!          | data [len]   (tag 1 only)
//! trailer  tag u8 0xFF | count u64 | data_bytes u64 | chain [32] | end magic "VMRSEND1"
//! ```
//! All integers little endian. `chain` is BLAKE3 over the header checksum followed by every
//! record's 53-byte descriptor (tag .. checksum), so reordered, dropped or duplicated records
//! fail; each record's payload is covered by its extent checksum ([`vmr_proto::checksum`]).
//! A file without a valid trailer is incomplete and never renamed into place.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use vmr_proto::{CycleHeader, Extent, ExtentData};

use crate::error::{Corruption, CycleFault, StoreError};

/// File magic.
pub const MAGIC: &[u8; 8] = b"VMRSTAGE";
/// Trailer end magic.
pub const END_MAGIC: &[u8; 8] = b"VMRSEND1";
/// Current staging format version.
pub const VERSION: u32 = 1;
/// Largest data extent accepted in one record.
pub const MAX_EXTENT_BYTES: u64 = 64 << 20;
/// Largest header JSON accepted.
pub const MAX_HEADER_BYTES: u32 = 1 << 20;
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_END: u8 = 0xFF;
const DESC_LEN: usize = 53;
/// Size of the trailer in bytes.
pub const TRAILER_LEN: u64 = 1 + 8 + 8 + 32 + 8;

/// Sequential writer of a staging file (blocking I/O on a buffered file).
pub struct StageFileWriter {
    out: BufWriter<File>,
    path: PathBuf,
    chain: blake3::Hasher,
    count: u64,
    data_bytes: u64,
}

impl StageFileWriter {
    /// Create `path` (truncating) and write the header.
    pub fn create(path: &Path, header: &CycleHeader) -> Result<Self, StoreError> {
        let f = File::create(path).map_err(|e| StoreError::io("create", path, e))?;
        let mut w = StageFileWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            path: path.to_owned(),
            chain: blake3::Hasher::new(),
            count: 0,
            data_bytes: 0,
        };
        let json = serde_json::to_vec(header)
            .map_err(|e| StoreError::InvalidCycle(CycleFault::HeaderEncode(e)))?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|l| *l <= MAX_HEADER_BYTES)
            .ok_or(StoreError::InvalidCycle(CycleFault::HeaderTooLarge))?;
        let sum = blake3::hash(&json);
        w.chain.update(sum.as_bytes());
        w.write(MAGIC)?;
        w.write(&VERSION.to_le_bytes())?;
        w.write(&len.to_le_bytes())?;
        w.write(&json)?;
        w.write(sum.as_bytes())?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.out
            .write_all(b)
            .map_err(|e| StoreError::io("write", &self.path, e))
    }

    /// Append one extent record with its (already verified) checksum.
    pub fn put(&mut self, e: &Extent, sum: &[u8; 32]) -> Result<(), StoreError> {
        let desc = descriptor(e, sum);
        self.chain.update(&desc);
        self.write(&desc)?;
        if let ExtentData::Data(b) = &e.data {
            self.write(b)?;
            self.data_bytes += b.len() as u64;
        }
        self.count += 1;
        Ok(())
    }

    /// Write the trailer, flush and fsync the file. Returns the record count.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        let mut t = Vec::with_capacity(TRAILER_LEN as usize);
        t.push(TAG_END);
        t.extend_from_slice(&self.count.to_le_bytes());
        t.extend_from_slice(&self.data_bytes.to_le_bytes());
        t.extend_from_slice(self.chain.finalize().as_bytes());
        t.extend_from_slice(END_MAGIC);
        self.write(&t)?;
        let path = self.path.clone();
        let f = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io("flush", &path, e.into_error()))?;
        f.sync_all()
            .map_err(|e| StoreError::io("fsync", &path, e))?;
        Ok(self.count)
    }
}

fn descriptor(e: &Extent, sum: &[u8; 32]) -> [u8; DESC_LEN] {
    let mut d = [0u8; DESC_LEN];
    d[0] = match e.data {
        ExtentData::Data(_) => TAG_DATA,
        ExtentData::Zero(_) => TAG_ZERO,
    };
    d[1..5].copy_from_slice(&e.disk.to_le_bytes());
    d[5..13].copy_from_slice(&e.offset.to_le_bytes());
    d[13..21].copy_from_slice(&e.len().to_le_bytes());
    d[21..53].copy_from_slice(sum);
    d
}

/// Sequential, verifying reader of a staging file.
pub struct StageReader<R: Read = BufReader<File>> {
    inp: R,
    path: PathBuf,
    header: CycleHeader,
    chain: blake3::Hasher,
    count: u64,
    data_bytes: u64,
    done: bool,
}

impl StageReader {
    /// Open a staging file and parse its header.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let f = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        StageReader::new(BufReader::with_capacity(1 << 20, f), path)
    }
}

impl<R: Read> StageReader<R> {
    /// Parse the header from `inp`; `path` names the source in errors.
    pub fn new(mut inp: R, path: &Path) -> Result<Self, StoreError> {
        let bad = |r: Corruption| StoreError::corrupt(path, r);
        let mut fixed = [0u8; 16];
        read_exact(&mut inp, &mut fixed, path)?;
        if &fixed[0..8] != MAGIC {
            return Err(bad(Corruption::StagingMagic));
        }
        let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if version != VERSION {
            return Err(bad(Corruption::StagingVersion(version)));
        }
        let len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        if len > MAX_HEADER_BYTES {
            return Err(bad(Corruption::StagingHeaderTooLarge));
        }
        let mut json = vec![0u8; len as usize];
        read_exact(&mut inp, &mut json, path)?;
        let mut sum = [0u8; 32];
        read_exact(&mut inp, &mut sum, path)?;
        if blake3::hash(&json).as_bytes() != &sum {
            return Err(bad(Corruption::StagingHeaderChecksum));
        }
        let header: CycleHeader =
            serde_json::from_slice(&json).map_err(|e| bad(Corruption::StagingHeaderJson(e)))?;
        let mut chain = blake3::Hasher::new();
        chain.update(&sum);
        Ok(StageReader {
            inp,
            path: path.to_owned(),
            header,
            chain,
            count: 0,
            data_bytes: 0,
            done: false,
        })
    }

    /// The cycle header.
    pub fn header(&self) -> &CycleHeader {
        &self.header
    }

    fn bad(&self, r: Corruption) -> StoreError {
        StoreError::corrupt(&self.path, r)
    }

    /// The next verified extent, or `None` after a valid trailer.
    pub fn next_extent(&mut self) -> Result<Option<vmr_proto::CheckedExtent>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        read_exact(&mut self.inp, &mut tag, &self.path)?;
        if tag[0] == TAG_END {
            let mut t = [0u8; TRAILER_LEN as usize - 1];
            read_exact(&mut self.inp, &mut t, &self.path)?;
            let count = u64::from_le_bytes(arr8(&t[0..8]));
            let data_bytes = u64::from_le_bytes(arr8(&t[8..16]));
            let chain = self.chain.finalize();
            if count != self.count || data_bytes != self.data_bytes {
                return Err(self.bad(Corruption::TrailerCount));
            }
            if &t[16..48] != chain.as_bytes() {
                return Err(self.bad(Corruption::TrailerChecksum));
            }
            if &t[48..56] != END_MAGIC {
                return Err(self.bad(Corruption::EndMagic));
            }
            let mut extra = [0u8; 1];
            match self.inp.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => return Err(self.bad(Corruption::AfterTrailer)),
                Err(e) => return Err(StoreError::io("read", &self.path, e)),
            }
            self.done = true;
            return Ok(None);
        }
        let mut d = [0u8; DESC_LEN];
        d[0] = tag[0];
        read_exact(&mut self.inp, &mut d[1..], &self.path)?;
        let disk = u32::from_le_bytes([d[1], d[2], d[3], d[4]]);
        let offset = u64::from_le_bytes(arr8(&d[5..13]));
        let len = u64::from_le_bytes(arr8(&d[13..21]));
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&d[21..53]);
        let data = match d[0] {
            TAG_DATA => {
                if len > MAX_EXTENT_BYTES {
                    return Err(self.bad(Corruption::ExtentTooLarge(len)));
                }
                let mut buf = vec![0u8; len as usize];
                read_exact(&mut self.inp, &mut buf, &self.path)?;
                self.data_bytes += len;
                ExtentData::Data(Bytes::from(buf))
            }
            TAG_ZERO => ExtentData::Zero(len),
            t => return Err(self.bad(Corruption::RecordTag(t))),
        };
        let checked = vmr_proto::CheckedExtent::verify(
            Extent { disk, offset, data },
            sum,
            vmr_proto::ChecksumScheme::Whole,
        )
        .map_err(|_| StoreError::CorruptExtent { disk, offset })?;
        self.chain.update(&d);
        self.count += 1;
        Ok(Some(checked))
    }
}

fn arr8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    a
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], path: &Path) -> Result<(), StoreError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::corrupt(path, Corruption::Truncated)
        } else {
            StoreError::io("read", path, e)
        }
    })
}

/// Cheap completeness check: the file parses a header and ends with the end magic.
pub fn looks_complete(path: &Path) -> Result<CycleHeader, StoreError> {
    let r = StageReader::open(path)?;
    let header = r.header.clone();
    let mut f = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io("stat", path, e))?
        .len();
    if len < TRAILER_LEN {
        return Err(StoreError::corrupt(path, Corruption::Truncated));
    }
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(len - 8))
        .map_err(|e| StoreError::io("seek", path, e))?;
    let mut m = [0u8; 8];
    read_exact(&mut f, &mut m, path)?;
    if &m != END_MAGIC {
        return Err(StoreError::corrupt(path, Corruption::NoTrailer));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmr_proto::{CycleConsistency, CycleKind, DiskInfo};

    fn header() -> CycleHeader {
        CycleHeader {
            vm: uuid::Uuid::nil(),
            id: 2,
            base: Some(1),
            kind: CycleKind::Incremental,
            consistency: CycleConsistency::CrashConsistent,
            taken_at_ms: 5,
            disks: vec![DiskInfo {
                id: "d0".into(),
                size: 1 << 20,
            }],
            group: None,
        }
    }

    fn extents() -> Vec<Extent> {
        vec![
            Extent {
                disk: 0,
                offset: 0,
                data: ExtentData::Data(Bytes::from(vec![7u8; 4096])),
            },
            Extent {
                disk: 0,
                offset: 65536,
                data: ExtentData::Zero(65536),
            },
            Extent {
                disk: 0,
                offset: 8192,
                data: ExtentData::Data(Bytes::from(vec![9u8; 100])),
            },
        ]
    }

    fn write_file(dir: &Path) -> PathBuf {
        let p = dir.join("c2.stage");
        let mut w = StageFileWriter::create(&p, &header()).expect("create");
        for e in extents() {
            w.put(&e, &e.checksum()).expect("put");
        }
        w.finish().expect("finish");
        p
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Extent>, StoreError> {
        let mut r = StageReader::new(bytes, Path::new("mem"))?;
        let mut v = Vec::new();
        while let Some(e) = r.next_extent()? {
            v.push(e.into_extent());
        }
        Ok(v)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_file(dir.path());
        let bytes = std::fs::read(&p).expect("read");
        assert_eq!(read_all(&bytes).expect("parse"), extents());
        assert_eq!(looks_complete(&p).expect("complete"), header());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = std::fs::read(write_file(dir.path())).expect("read");
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(read_all(&b).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncation_and_payload_corruption_are_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = std::fs::read(write_file(dir.path())).expect("read");
        for cut in [0, 10, 100, bytes.len() - 1] {
            assert!(matches!(
                read_all(&bytes[..cut]),
                Err(StoreError::CorruptFile { .. })
            ));
        }
        // A payload byte of the first data extent (after header and descriptor).
        let hdr_len = 16 + serde_json::to_vec(&header()).expect("json").len() + 32;
        let mut b = bytes.clone();
        b[hdr_len + DESC_LEN + 10] ^= 1;
        assert!(matches!(
            read_all(&b),
            Err(StoreError::CorruptExtent { disk: 0, offset: 0 })
        ));
        // A huge length must not allocate.
        let mut b = bytes;
        b[hdr_len + 13..hdr_len + 21].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_all(&b), Err(StoreError::CorruptFile { .. })));
    }
}
