//! The on-disk layout of journal records and segment headers: pure functions from values to
//! bytes and back, with no I/O, so recovery logic can be tested (and fuzzed) on byte slices.
//!
//! A segment file is a 16-byte header followed by records:
//!
//! ```text
//! header:  magic "KEELWAL1" (8 bytes) | first_index u64 LE
//! record:  len u32 LE | crc u32 LE | index u64 LE | payload (len bytes)
//! ```
//!
//! `crc` is the CRC-32 (IEEE) of the eight index bytes followed by the payload, so a record
//! that was only partly written, or written over, fails its check.

use std::ops::Range;

/// Magic bytes opening every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"KEELWAL1";
/// Bytes of a segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 16;
/// Bytes of a record header (`len`, `crc`, `index`).
pub(crate) const RECORD_HEADER_LEN: usize = 16;

/// Appends a segment header for a segment whose first record has index `first_index`.
pub(crate) fn encode_segment_header(first_index: u64, dst: &mut Vec<u8>) {
    dst.extend_from_slice(SEGMENT_MAGIC);
    dst.extend_from_slice(&first_index.to_le_bytes());
}

/// Reads a segment header: the index of the segment's first record.
pub(crate) fn decode_segment_header(src: &[u8]) -> Option<u64> {
    let header = src.get(..SEGMENT_HEADER_LEN)?;
    if &header[..8] != SEGMENT_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(header[8..16].try_into().ok()?))
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one record.
pub(crate) fn encode_record(index: u64, payload: &[u8], dst: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("record length checked by the journal");
    dst.extend_from_slice(&len.to_le_bytes());
    dst.extend_from_slice(&checksum(index, payload).to_le_bytes());
    dst.extend_from_slice(&index.to_le_bytes());
    dst.extend_from_slice(payload);
}

/// Bytes one record of `payload_len` bytes takes on disk.
pub(crate) fn record_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Defect {
    /// Fewer bytes than a record header.
    ShortHeader,
    /// The declared length runs past the end of the data.
    ShortPayload { declared: usize },
    /// The declared length is over the configured maximum.
    TooLong { declared: usize },
    /// The checksum does not match.
    Checksum,
    /// A valid record, but not the index that should come next.
    WrongIndex { expected: u64, found: u64 },
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::ShortHeader => write!(f, "record header cut short"),
            Defect::ShortPayload { declared } => {
                write!(f, "record of {declared} bytes cut short")
            }
            Defect::TooLong { declared } => {
                write!(f, "record length {declared} is over the maximum")
            }
            Defect::Checksum => write!(f, "checksum mismatch"),
            Defect::WrongIndex { expected, found } => {
                write!(f, "record index {found} where {expected} was expected")
            }
        }
    }
}

/// One record found by [`scan`]: its index and where its payload lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) index: u64,
    pub(crate) payload: Range<usize>,
}

/// What [`scan`] found in a segment body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The valid records, in order.
    pub(crate) records: Vec<Found>,
    /// Offset just past the last valid record.
    pub(crate) valid_end: usize,
    /// The first defect, at `valid_end`, if the data does not end exactly after a record.
    pub(crate) defect: Option<Defect>,
}

/// Checks the record at `offset`, which should carry index `expected`.
fn check_at(data: &[u8], offset: usize, expected: u64, max_len: usize) -> Result<Found, Defect> {
    let rest = &data[offset..];
    if rest.len() < RECORD_HEADER_LEN {
        return Err(Defect::ShortHeader);
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let index = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    if len > max_len {
        return Err(Defect::TooLong { declared: len });
    }
    if rest.len() < RECORD_HEADER_LEN + len {
        return Err(Defect::ShortPayload { declared: len });
    }
    let payload = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
    if checksum(index, payload) != crc {
        return Err(Defect::Checksum);
    }
    if index != expected {
        return Err(Defect::WrongIndex {
            expected,
            found: index,
        });
    }
    let start = offset + RECORD_HEADER_LEN;
    Ok(Found {
        index,
        payload: start..start + len,
    })
}

/// Reads consecutive records from `data` (a segment without its header, offsets relative to
/// `data`), starting at index `first_index`, until the data ends or a record is bad.
pub(crate) fn scan(data: &[u8], first_index: u64, max_len: usize) -> Scan {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut expected = first_index;
    while offset < data.len() {
        match check_at(data, offset, expected, max_len) {
            Ok(found) => {
                offset = found.payload.end;
                expected += 1;
                records.push(found);
            }
            Err(defect) => {
                return Scan {
                    records,
                    valid_end: offset,
                    defect: Some(defect),
                };
            }
        }
    }
    Scan {
        records,
        valid_end: offset,
        defect: None,
    }
}

/// Whether any valid record with an index at or after `from_index` starts after `offset`.
///
/// This tells a torn tail (a crash cut the last write short: nothing valid follows) from
/// damage in the middle (valid records follow the bad one, so data would be lost by dropping
/// everything after it). Candidates are filtered on their header before the checksum is
/// computed, so the search is cheap even over a long tail of garbage.
pub(crate) fn valid_record_after(
    data: &[u8],
    offset: usize,
    from_index: u64,
    max_len: usize,
) -> bool {
    let window = from_index..from_index.saturating_add(1 << 32);
    (offset + 1..data.len().saturating_sub(RECORD_HEADER_LEN - 1)).any(|at| {
        let rest = &data[at..];
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let index = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        len <= max_len
            && rest.len() >= RECORD_HEADER_LEN + len
            && window.contains(&index)
            && check_at(data, at, index, max_len).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records(payloads: &[Vec<u8>], first: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode_record(first + i as u64, p, &mut out);
        }
        out
    }

    #[test]
    fn header_round_trips_and_rejects_bad_magic() {
        let mut h = Vec::new();
        encode_segment_header(42, &mut h);
        assert_eq!(decode_segment_header(&h), Some(42));
        h[0] = b'X';
        assert_eq!(decode_segment_header(&h), None);
        assert_eq!(decode_segment_header(&h[..10]), None);
    }

    #[test]
    fn flipped_byte_is_a_checksum_defect_with_valid_records_after() {
        let data = records(&[b"one".to_vec(), b"two".to_vec(), b"three".to_vec()], 7);
        let mut bad = data.clone();
        bad[RECORD_HEADER_LEN + 1] ^= 0xff; // inside the first payload
        let scan = scan(&bad, 7, 1024);
        assert_eq!(scan.records.len(), 0);
        assert_eq!(scan.defect, Some(Defect::Checksum));
        assert!(valid_record_after(&bad, 0, 7, 1024));
    }

    #[test]
    fn wrong_index_is_a_defect() {
        let data = records(&[b"a".to_vec()], 5);
        let scan = scan(&data, 4, 1024);
        assert_eq!(
            scan.defect,
            Some(Defect::WrongIndex {
                expected: 4,
                found: 5
            })
        );
    }

    proptest! {
        #[test]
        fn every_cut_yields_a_prefix_and_no_valid_record_after(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let data = records(&payloads, 1);
            let cut = cut.index(data.len() + 1);
            let scan = scan(&data[..cut], 1, 1024);
            // The records found are exactly the ones wholly before the cut, unchanged.
            let mut whole = 0;
            let mut end = 0;
            for p in &payloads {
                if end + record_len(p.len()) > cut {
                    break;
                }
                end += record_len(p.len());
                whole += 1;
            }
            prop_assert_eq!(scan.records.len(), whole);
            prop_assert_eq!(scan.valid_end, end);
            for (found, p) in scan.records.iter().zip(&payloads) {
                prop_assert_eq!(&data[found.payload.clone()], &p[..]);
            }
            prop_assert_eq!(scan.defect.is_some(), cut != end);
            if scan.defect.is_some() {
                prop_assert!(!valid_record_after(&data[..cut], end, whole as u64 + 1, 1024));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), first in any::<u64>()) {
            let scan = scan(&data, first, 1 << 20);
            prop_assert!(scan.valid_end <= data.len());
            let _ = valid_record_after(&data, scan.valid_end, first, 1 << 20);
        }
    }
}
