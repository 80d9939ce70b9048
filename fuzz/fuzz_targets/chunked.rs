//! Feeds arbitrary bytes, cut into arbitrary pieces, to the gateway's two trackers of a
//! client's framing: the chunked body tracker (which also frames the chunked answers the fast
//! path relays) and the request smuggling guard. Neither may panic, and neither may judge the
//! bytes differently depending on how a socket cut them: fed whole or piece by piece, a
//! chunked body ends at the same byte (or is invalid in both), and the guard finds the same
//! first ambiguous request head and is on or off the same.
#![no_main]

use keel_gateway::fuzzing::{Chunked, ChunkedEnd, Framing};
use libfuzzer_sys::fuzz_target;

/// A size or trailer line may be this long, as the gateway configures the tracker.
const MAX_LINE: usize = 64;
/// The largest request head, small so that the limit is reached often.
const MAX_HEAD: usize = 512;

/// Where a chunked body in `data` ends when it arrives in `pieces` (their sizes, cycled).
fn chunked_end(data: &[u8], pieces: &[u8]) -> ChunkedEnd {
    let mut tracker = Chunked::new(MAX_LINE);
    let mut at = 0;
    for size in pieces.iter().cycle() {
        if at == data.len() {
            return ChunkedEnd::No;
        }
        let n = usize::from(*size).max(1).min(data.len() - at);
        match tracker.feed(&data[at..at + n]) {
            ChunkedEnd::No => at += n,
            ChunkedEnd::At(end) => {
                assert!(end >= 1 && end <= n, "ended at {end} of a piece of {n}");
                return ChunkedEnd::At(at + end);
            }
            ChunkedEnd::Invalid => return ChunkedEnd::Invalid,
        }
    }
    unreachable!("pieces is not empty")
}

/// The first ambiguous head the guard finds in `data` arriving in `pieces`, and whether it is
/// still on at the end.
fn guard(data: &[u8], pieces: &[u8]) -> (Option<u64>, bool) {
    let mut guard = Framing::new(MAX_HEAD);
    let mut at = 0;
    for size in pieces.iter().cycle() {
        if at == data.len() {
            break;
        }
        let n = usize::from(*size).max(1).min(data.len() - at);
        if let Some(head) = guard.feed(&data[at..at + n]) {
            // The gateway answers 400 and closes at the first one.
            return (Some(head), guard.is_on());
        }
        at += n;
    }
    (None, guard.is_on())
}

fuzz_target!(|input: &[u8]| {
    // The first byte says how many piece sizes follow; the rest is the bytes.
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(rest.len());
    let (pieces, data) = rest.split_at(count);
    let whole = [u8::MAX];
    let pieces = if pieces.is_empty() {
        &whole[..]
    } else {
        pieces
    };

    let end = chunked_end(data, pieces);
    let end_whole = {
        let mut tracker = Chunked::new(MAX_LINE);
        tracker.feed(data)
    };
    assert_eq!(end, end_whole, "chunked body cut as {pieces:?}");
    if let ChunkedEnd::At(n) = end {
        // What follows the end is not the body's: the body alone ends at the same byte.
        let mut tracker = Chunked::new(MAX_LINE);
        assert_eq!(tracker.feed(&data[..n]), ChunkedEnd::At(n));
    }

    let (first, on) = guard(data, pieces);
    let (first_whole, on_whole) = {
        let mut guard = Framing::new(MAX_HEAD);
        let first = guard.feed(data);
        (first, guard.is_on())
    };
    assert_eq!(first, first_whole, "guard, cut as {pieces:?}");
    if first.is_none() {
        assert_eq!(on, on_whole, "guard on/off, cut as {pieces:?}");
    }
});
