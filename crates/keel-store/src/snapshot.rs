//! Snapshot files: the whole state machine at one journal index, written to a temporary file,
//! synced, then renamed into place, so a crash leaves either the old snapshot or the new one,
//! never half of one.
//!
//! ```text
//! magic "KEELSNP1" (8) | index u64 LE | len u64 LE | crc u32 LE | data (len bytes)
//! ```
//!
//! `crc` is the CRC-32 (IEEE) of the index bytes followed by the data.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::StoreError;

const MAGIC: &[u8; 8] = b"KEELSNP1";
const HEADER_LEN: usize = 28;

/// A snapshot read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The journal index the snapshot includes: records up to and including it are in `data`.
    pub index: u64,
    /// The state machine's serialized state.
    pub data: Bytes,
}

/// The file name of the snapshot at `index`; names sort in index order.
pub(crate) fn file_name(index: u64) -> String {
    format!("snap-{index:020}.snap")
}

/// The index in a snapshot file name, if it is one.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    name.strip_prefix("snap-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

fn checksum(index: u64, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

/// The header of the snapshot of `data` at `index`; the file is the header, then `data`.
pub(crate) fn header(index: u64, data: &[u8]) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&index.to_le_bytes());
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    header.extend_from_slice(&checksum(index, data).to_le_bytes());
    header
}

/// Writes the snapshot durably: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write(dir: &Path, index: u64, data: &[u8]) -> Result<PathBuf, StoreError> {
    let path = dir.join(file_name(index));
    let tmp = dir.join(format!("{}.tmp", file_name(index)));
    let io = |e| StoreError::io(&tmp, e);
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(&header(index, data)).map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Reads and verifies a snapshot file.
pub(crate) fn read(path: &Path) -> Result<Snapshot, StoreError> {
    let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
    decode(path, bytes)
}

/// Verifies and decodes `bytes`, the contents of snapshot file `path` (which errors name).
pub(crate) fn decode(path: &Path, bytes: Vec<u8>) -> Result<Snapshot, StoreError> {
    let corrupt = |offset: usize, reason: &str| StoreError::Corrupt {
        file: path.to_owned(),
        offset: offset as u64,
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a snapshot file (bad header)"));
    }
    let index = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if (bytes.len() - HEADER_LEN) as u64 != len {
        return Err(corrupt(
            16,
            &format!(
                "declares {len} bytes of data but holds {}",
                bytes.len() - HEADER_LEN
            ),
        ));
    }
    let bytes = Bytes::from(bytes);
    let data = bytes.slice(HEADER_LEN..);
    if checksum(index, &data) != crc {
        return Err(corrupt(HEADER_LEN, "checksum mismatch"));
    }
    Ok(Snapshot { index, data })
}

/// Makes renames and file creations in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_reported_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 9, b"state").unwrap();
        assert_eq!(
            parse_name(path.file_name().unwrap().to_str().unwrap()),
            Some(9)
        );
        let snap = read(&path).unwrap();
        assert_eq!((snap.index, &snap.data[..]), (9, &b"state"[..]));

        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, &bytes).unwrap();
        match read(&path) {
            Err(StoreError::Corrupt { file, offset, .. }) => {
                assert_eq!(file, path);
                assert_eq!(offset, HEADER_LEN as u64);
            }
            other => panic!("{other:?}"),
        }
        fs::write(&path, &bytes[..20]).unwrap();
        assert!(matches!(read(&path), Err(StoreError::Corrupt { .. })));
    }
}
