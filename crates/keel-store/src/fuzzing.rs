//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not a stable API): thin
//! public wrappers over the private decoders of the bytes the store reads back from disk
//! (journal segments and snapshot files), and over the encoders that write them. See
//! `docs/fuzzing.md`.

use std::ops::Range;
use std::path::Path;

use crate::{Snapshot, StoreError, record, snapshot};

/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: usize = record::SEGMENT_HEADER_LEN;

/// Bytes of a record header (`len`, `crc`, `index`).
pub const RECORD_HEADER_LEN: usize = record::RECORD_HEADER_LEN;

/// Reads a segment header: the index of the segment's first record (`record::decode_segment_header`).
pub fn decode_segment_header(src: &[u8]) -> Option<u64> {
    record::decode_segment_header(src)
}

/// Appends a segment header (`record::encode_segment_header`).
pub fn encode_segment_header(first_index: u64, dst: &mut Vec<u8>) {
    record::encode_segment_header(first_index, dst);
}

/// Appends one record (`record::encode_record`; the payload must fit in a `u32` length).
pub fn encode_record(index: u64, payload: &[u8], dst: &mut Vec<u8>) {
    record::encode_record(index, payload, dst);
}

/// One record [`scan`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its index.
    pub index: u64,
    /// Where its payload lies in the scanned data.
    pub payload: Range<usize>,
}

/// What [`scan`] found (`record::Scan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The valid records, in order.
    pub records: Vec<Found>,
    /// Offset just past the last valid record.
    pub valid_end: usize,
    /// The first defect, at `valid_end`, if the data does not end exactly after a record.
    pub defect: Option<String>,
}

/// Reads consecutive records from `data` (a segment without its header) starting at index
/// `first_index`, until the data ends or a record is bad (`record::scan`, as recovery calls it).
pub fn scan(data: &[u8], first_index: u64, max_len: usize) -> Scan {
    let scan = record::scan(data, first_index, max_len);
    Scan {
        records: scan
            .records
            .into_iter()
            .map(|found| Found {
                index: found.index,
                payload: found.payload,
            })
            .collect(),
        valid_end: scan.valid_end,
        defect: scan.defect.map(|defect| defect.to_string()),
    }
}

/// Whether any valid record with an index at or after `from_index` starts after `offset`
/// (`record::valid_record_after`: recovery's test of a torn tail against damage in the middle).
/// `offset` is at most `data.len()`, as recovery passes it.
pub fn valid_record_after(data: &[u8], offset: usize, from_index: u64, max_len: usize) -> bool {
    record::valid_record_after(data, offset, from_index, max_len)
}

/// Verifies and decodes the bytes of a snapshot file (`snapshot::decode`, what reading a
/// snapshot file does once the file is read).
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, StoreError> {
    snapshot::decode(Path::new("fuzz.snap"), bytes.to_vec())
}

/// The bytes of the snapshot file of `data` at `index`, as writing a snapshot lays them out
/// (`snapshot::header`, then the data).
pub fn encode_snapshot(index: u64, data: &[u8]) -> Vec<u8> {
    let mut bytes = snapshot::header(index, data);
    bytes.extend_from_slice(data);
    bytes
}
