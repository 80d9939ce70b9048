//! Feeds arbitrary bytes to the store's snapshot reader as the contents of a snapshot file.
//! It may not panic; what it accepts must be exactly the file the writer lays out for that
//! index and data; and any one byte of a file the writer made, changed, must be refused.
#![no_main]

use keel_store::fuzzing::{decode_snapshot, encode_snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(snapshot) = decode_snapshot(input) {
        assert_eq!(encode_snapshot(snapshot.index, &snapshot.data), input);
    }
    // The input's tail as a state written at the index its first bytes give, then damaged
    // at one byte: the checksum, the length or the magic catches it.
    if input.len() < 10 {
        return;
    }
    let index = u64::from_le_bytes(input[..8].try_into().unwrap());
    let data = &input[10..];
    let file = encode_snapshot(index, data);
    let read = decode_snapshot(&file).expect("a written snapshot reads back");
    assert_eq!((read.index, &read.data[..]), (index, data));
    let at = usize::from(u16::from_le_bytes([input[8], input[9]])) % file.len();
    for flip in [0x01u8, 0x80, 0xff] {
        let mut damaged = file.clone();
        damaged[at] ^= flip;
        assert!(
            decode_snapshot(&damaged).is_err(),
            "byte {at} of {} changed by {flip:#x} went unnoticed",
            file.len()
        );
    }
    // Cut short or grown, it is refused too.
    assert!(decode_snapshot(&file[..file.len() - 1]).is_err());
    let mut longer = file.clone();
    longer.push(0);
    assert!(decode_snapshot(&longer).is_err());
});
