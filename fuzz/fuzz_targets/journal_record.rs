//! Feeds arbitrary bytes to the journal's record decoder as the contents of a segment, as
//! recovery reads them back from disk. It may not panic or read out of bounds; the records it
//! takes must be consecutive from the segment's first index, lie in order within the data and
//! re-encode to exactly the bytes they were read from; it stops exactly where the valid
//! records end and names a defect if and only if bytes are left; and the test recovery uses
//! to tell a torn tail from damage in the middle must agree with a plain search.
//! Records the encoder writes always read back whole.
#![no_main]

use keel_store::fuzzing::{
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, decode_segment_header, encode_record,
    encode_segment_header, scan, valid_record_after,
};
use libfuzzer_sys::fuzz_target;

/// The largest payload the scan takes, small so that the limit is reached often.
const MAX_LEN: usize = 4096;

fuzz_target!(|input: &[u8]| {
    // A segment: its header (the first record's index), then records.
    let Some(first) = decode_segment_header(input) else {
        // Not a segment header: what the encoder writes always is one.
        if input.len() >= 8 {
            let index = u64::from_le_bytes(input[..8].try_into().unwrap());
            let mut header = Vec::new();
            encode_segment_header(index, &mut header);
            assert_eq!(header.len(), SEGMENT_HEADER_LEN);
            assert_eq!(decode_segment_header(&header), Some(index));
        }
        return;
    };
    let data = &input[SEGMENT_HEADER_LEN.min(input.len())..];
    let found = scan(data, first, MAX_LEN);
    assert!(found.valid_end <= data.len());
    assert_eq!(
        found.defect.is_some(),
        found.valid_end < data.len(),
        "{found:?}"
    );
    let mut again = Vec::new();
    let mut end = 0;
    for (i, record) in found.records.iter().enumerate() {
        assert_eq!(record.index, first.wrapping_add(i as u64));
        assert_eq!(record.payload.start, end + RECORD_HEADER_LEN);
        assert!(record.payload.end <= found.valid_end);
        assert!(record.payload.len() <= MAX_LEN);
        end = record.payload.end;
        encode_record(record.index, &data[record.payload.clone()], &mut again);
    }
    assert_eq!(end, found.valid_end);
    assert_eq!(
        again,
        &data[..found.valid_end],
        "records re-encode to their bytes"
    );

    // Recovery asks whether a valid record starts anywhere after the defect; a search of
    // every later offset must agree.
    if found.valid_end < data.len() {
        let next = first.wrapping_add(found.records.len() as u64);
        let after = valid_record_after(data, found.valid_end, next, MAX_LEN);
        // Recovery looks this far ahead in indexes (more records than a segment holds).
        let window = next..next.saturating_add(1 << 32);
        let searched = (found.valid_end + 1..data.len()).any(|at| {
            let Some(index) = data.get(at + 8..at + 16) else {
                return false;
            };
            let index = u64::from_le_bytes(index.try_into().unwrap());
            window.contains(&index) && !scan(&data[at..], index, MAX_LEN).records.is_empty()
        });
        assert_eq!(after, searched, "valid_record_after at {}", found.valid_end);
    }

    // Whatever the payloads, the encoder's records read back whole.
    let mut written = Vec::new();
    let payloads: Vec<&[u8]> = data.chunks(97).take(8).collect();
    for (i, payload) in payloads.iter().enumerate() {
        encode_record(first.wrapping_add(i as u64), payload, &mut written);
    }
    let read = scan(&written, first, MAX_LEN);
    assert!(read.defect.is_none());
    assert_eq!(read.records.len(), payloads.len());
    for (record, payload) in read.records.iter().zip(&payloads) {
        assert_eq!(&written[record.payload.clone()], *payload);
    }
});
