//! Feeds arbitrary bytes to the gateway's fast path as an upstream server's answer, in
//! arbitrary pieces, as `read_answer` gets them from the socket. It may not panic; it must
//! come to the same answer however the bytes were cut; and the head it writes for the client
//! must be one HTTP/1.1 head that any client frames exactly as the gateway relays the body:
//! the same status, the same length or chunking (RFC 9112 §6.3; a body that ends when the
//! server closes is relayed chunked), nothing the server sent after it.
#![no_main]

use bytes::BytesMut;
use keel_gateway::fuzzing::{AnswerFraming, AnswerHead, MAX_HEADERS, parse_answer};
use libfuzzer_sys::fuzz_target;

/// The answer read from `data` arriving in pieces of `piece` bytes: the result, how many bytes
/// the head took (interim answers included), the body's first bytes left in the buffer, and
/// the head for the client.
fn read(
    data: &[u8],
    piece: usize,
    head_request: bool,
    keep_alive: bool,
) -> (Result<Option<AnswerHead>, String>, usize, Vec<u8>, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let n = piece.min(data.len() - at);
        buf.extend_from_slice(&data[at..at + n]);
        at += n;
        match parse_answer(&mut buf, head_request, keep_alive, &mut out) {
            Ok(None) if at < data.len() => continue,
            result => return (result, at - buf.len(), buf.to_vec(), out),
        }
    }
}

/// How a client frames the body after `head` (a head the gateway wrote), by RFC 9112 §6.3.
fn client_framing(head: &[u8], head_request: bool) -> (u16, AnswerFraming, bool) {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS + 4];
    let mut resp = httparse::Response::new(&mut parsed);
    let status = resp.parse(head);
    assert!(
        matches!(status, Ok(httparse::Status::Complete(n)) if n == head.len()),
        "the client's head does not parse alone: {status:?} {:?}",
        String::from_utf8_lossy(head)
    );
    assert_eq!(resp.version, Some(1));
    let code = resp.code.unwrap();
    let mut codings = Vec::new();
    let mut lengths = Vec::new();
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(
                h.value
                    .split(|b| *b == b',')
                    .map(|c| c.trim_ascii().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        } else if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value.to_vec());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = if head_request || code == 204 || code == 304 || (100..200).contains(&code) {
        AnswerFraming::Length(0)
    } else if let Some(last) = codings.last() {
        assert!(lengths.is_empty(), "both framings sent to the client");
        if last == b"chunked" {
            AnswerFraming::Chunked
        } else {
            AnswerFraming::Close
        }
    } else if let Some(first) = lengths.first() {
        assert!(
            lengths.len() == 1,
            "{} lengths sent to the client",
            lengths.len()
        );
        let text = std::str::from_utf8(first).expect("an ASCII length");
        assert!(text.bytes().all(|b| b.is_ascii_digit()), "length {text:?}");
        AnswerFraming::Length(text.parse().expect("a length that fits"))
    } else {
        AnswerFraming::Close
    };
    (code, framing, close)
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the piece size and the request's kind; the rest is the answer.
    let Some((&pick, data)) = input.split_first() else {
        return;
    };
    let piece = usize::from(pick >> 2).max(1);
    let head_request = pick & 1 == 1;
    let keep_alive = pick & 2 == 2;

    let (result, taken, rest, out) = read(data, piece, head_request, keep_alive);
    let (whole, taken_whole, _, out_whole) =
        read(data, data.len().max(1), head_request, keep_alive);
    assert_eq!(result, whole, "cut in pieces of {piece}");
    let Ok(Some(answer)) = result else {
        return;
    };
    // The head ends at the same byte however it arrived, and what stays in the buffer is
    // what was read after it: the body's first bytes.
    assert_eq!(taken, taken_whole, "head length, cut in pieces of {piece}");
    assert_eq!(rest, data[taken..taken + rest.len()]);
    assert_eq!(out, out_whole);
    assert!(
        answer.status >= 200,
        "an interim {} relayed as the answer",
        answer.status
    );

    let (code, framing, close) = client_framing(&out, head_request);
    assert_eq!(code, answer.status);
    // A body that ends when the server closes is relayed chunked.
    let relayed = match answer.framing {
        AnswerFraming::Close => AnswerFraming::Chunked,
        other => other,
    };
    assert_eq!(framing, relayed, "{:?}", String::from_utf8_lossy(&out));
    if !keep_alive {
        assert!(close, "the client is not told the connection closes");
    }
    if answer.reusable {
        assert!(answer.framing != AnswerFraming::Close);
    }
});
