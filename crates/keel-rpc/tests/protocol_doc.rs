//! The worked example in `docs/protocol.md` is real: its bytes decode with the real decoder
//! and are exactly what the real encoder writes.

use std::time::Duration;

use bytes::BytesMut;
use keel_rpc::Codec;
use keel_rpc::protocol::{DEFAULT_MAX_FRAME_SIZE, Frame, FrameType, Metadata};

const SPEC: &str = include_str!("../../../docs/protocol.md");

/// The bytes of the fenced block with this info string.
fn hex_block(info: &str) -> Vec<u8> {
    let fence = format!("```{info}\n");
    let start = SPEC
        .find(&fence)
        .unwrap_or_else(|| panic!("no {info} block in docs/protocol.md"))
        + fence.len();
    let end = start + SPEC[start..].find("```").expect("unterminated block");
    SPEC[start..end]
        .split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("hex pair"))
        .collect()
}

fn decode_all(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE)
        .unwrap()
        .expect("a whole frame");
    assert!(buf.is_empty(), "trailing bytes after the frame");
    frame
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).unwrap();
    buf.to_vec()
}

#[test]
fn worked_request_example_matches_the_codec() {
    let bytes = hex_block("hex-request");
    let frame = decode_all(&bytes);
    assert_eq!(frame.kind, FrameType::Request);
    assert_eq!(frame.request_id, 1);
    assert_eq!(frame.meta.service.as_deref(), Some("keel.echo.v1.Echo"));
    assert_eq!(frame.meta.method.as_deref(), Some("Echo"));
    assert_eq!(frame.meta.timeout, Some(Duration::from_millis(250)));
    assert_eq!(frame.meta.codec, Some(Codec::Json));
    assert_eq!(&frame.body[..], br#"{"message":"hi"}"#);
    assert_eq!(encode(&frame), bytes);
}

#[test]
fn worked_response_example_matches_the_codec() {
    let bytes = hex_block("hex-response");
    let frame = decode_all(&bytes);
    assert_eq!(frame.kind, FrameType::Response);
    assert_eq!(frame.request_id, 1);
    assert_eq!(
        *frame.meta,
        Metadata {
            codec: Some(Codec::Json),
            ..Metadata::default()
        }
    );
    assert_eq!(&frame.body[..], br#"{"message":"hi"}"#);
    assert_eq!(encode(&frame), bytes);
}
