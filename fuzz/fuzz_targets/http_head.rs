//! Feeds arbitrary bytes to the gateway's fast path as a client's request head: cut off by
//! `head_end` (after the blank lines a client may send first, which the fast path skips), then
//! parsed by `parse`; and the whole input parsed as a head too. Neither may panic; `head_end`
//! must cut within the input, after an empty line; and a head the fast path accepts must have
//! every field it returns lie within the input, and be what the fast path promises to take.
#![no_main]

use keel_gateway::fuzzing::{Head, MAX_BUFFERED_BODY, head_end, parse_head};
use libfuzzer_sys::fuzz_target;

/// Whether `inner` lies within `outer` (an empty slice anywhere counts).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let start = outer.as_ptr() as usize;
    let at = inner.as_ptr() as usize;
    inner.is_empty() || (at >= start && at + inner.len() <= start + outer.len())
}

/// The checks on a head the fast path accepted from `input`.
fn check(input: &[u8], head: &Head<'_>) {
    assert!(within(input, head.target.as_bytes()), "{head:?}");
    assert!(head.target.starts_with('/'), "{head:?}");
    let before_target = (head.target.as_ptr() as usize) - (input.as_ptr() as usize);
    assert!(
        input[..before_target]
            .windows(head.method.len())
            .any(|w| w == head.method.as_bytes()),
        "{head:?}"
    );
    // Exactly one Host (a missing, repeated or listed one is hyper's to refuse), readable.
    let hosts = head
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("host"))
        .count();
    assert_eq!(hosts, 1, "{head:?}");
    let host = head.host.expect("an accepted head has a readable host");
    assert!(within(input, host.as_bytes()), "{head:?}");
    for (name, value) in &head.headers {
        assert!(within(input, name.as_bytes()), "{head:?}");
        assert!(within(input, value), "{head:?}");
        for refused in ["transfer-encoding", "upgrade", "expect"] {
            assert!(!name.eq_ignore_ascii_case(refused), "{head:?}");
        }
    }
    assert!(
        head.length.is_none_or(|n| n <= MAX_BUFFERED_BODY),
        "{head:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    // As the fast path reads a head: blank lines first are skipped, the head ends at its
    // empty line, and only the bytes up to there are parsed.
    let blank = data
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let rest = &data[blank..];
    if let Some(end) = head_end(rest) {
        assert!(end <= rest.len());
        let head = &rest[..end];
        assert!(head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"));
        parse_head(head, |parsed| {
            if let Some(parsed) = parsed {
                check(head, &parsed);
            }
        });
    }
    // Any bytes at all, as a head.
    parse_head(data, |parsed| {
        if let Some(parsed) = parsed {
            check(data, &parsed);
        }
    });
});
