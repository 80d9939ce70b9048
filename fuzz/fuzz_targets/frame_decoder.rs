//! Feeds arbitrary bytes to the frame decoder, in arbitrary chunk sizes, as a socket would.
//! The decoder must never panic, never loop, and never reserve more than the frame limit.
#![no_main]

use bytes::BytesMut;
use keel_rpc::protocol::{Frame, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const LIMIT: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so partial reads are explored too.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match Frame::decode(&mut buf, LIMIT) {
                Ok(Some(frame)) => {
                    // Whatever decodes must re-encode to a frame that decodes the same.
                    let mut again = BytesMut::new();
                    frame
                        .encode(&mut again)
                        .expect("a decoded frame re-encodes");
                    let round = Frame::decode(&mut again, u32::MAX)
                        .expect("re-decodes")
                        .expect("whole");
                    assert_eq!(round, frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= LIMIT as usize + rest.len() + HEADER_LEN + 4096);
    }
});
