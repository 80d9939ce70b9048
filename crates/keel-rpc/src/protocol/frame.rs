//! Frames: a fixed 20-byte header, a metadata section and a body.
//!
//! ```text
//! offset  size  field
//!      0     2  magic       0x4B 0x4C ("KL")
//!      2     1  version     1
//!      3     1  frame type  1..=8
//!      4     1  flags       0 (reserved; ignored on receipt)
//!      5     1  reserved    0 (ignored on receipt)
//!      6     2  meta_len    u16, big-endian: bytes of metadata after the header
//!      8     8  request id  u64, big-endian
//!     16     4  body_len    u32, big-endian: bytes of body after the metadata
//! ```
//!
//! The metadata section is a sequence of entries `tag: u8, len: u16 BE, value: [u8; len]`.
//! Unknown tags are skipped, so new fields can be added without a version change.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codec::Codec;
use crate::status::Code;

/// The first two bytes of every frame: ASCII `KL`. No HTTP method starts with them, which is
/// what lets one port serve both protocols.
pub const MAGIC: [u8; 2] = *b"KL";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 20;
/// Default cap on a whole frame (header + metadata + body): 16 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16 << 20;

/// Metadata tags (see `docs/protocol.md`).
mod tag {
    pub(super) const SERVICE: u8 = 1;
    pub(super) const METHOD: u8 = 2;
    pub(super) const TIMEOUT: u8 = 3;
    pub(super) const CODEC: u8 = 4;
    pub(super) const STATUS: u8 = 5;
    pub(super) const MESSAGE: u8 = 6;
    pub(super) const ENTRY: u8 = 7;
}

/// What a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Client → server: start a call (service, method, codec, timeout, body = request message).
    Request = 1,
    /// Server → client: the single reply of a unary call, or the refusal of any call (status).
    Response = 2,
    /// Server → client: one message of a server-streaming call.
    StreamItem = 3,
    /// Server → client: the end of a server-streaming call, with its status.
    StreamEnd = 4,
    /// Client → server: the caller gave up on the call; stop its handler.
    Cancel = 5,
    /// Either way: are you alive? The body is echoed in the pong.
    Ping = 6,
    /// Either way: the answer to a ping, same request id and body.
    Pong = 7,
    /// Either way: no new calls on this connection; the request id is the last one accepted.
    GoAway = 8,
}

impl FrameType {
    fn from_u8(n: u8) -> Option<FrameType> {
        Some(match n {
            1 => FrameType::Request,
            2 => FrameType::Response,
            3 => FrameType::StreamItem,
            4 => FrameType::StreamEnd,
            5 => FrameType::Cancel,
            6 => FrameType::Ping,
            7 => FrameType::Pong,
            8 => FrameType::GoAway,
            _ => return None,
        })
    }
}

/// Why bytes could not be read as a frame. Every variant is fatal for the connection: after
/// it, the stream is out of step and the peer is told (goaway) and disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not `KL`.
    #[error("bad magic {0:#06x}: not a Keel frame")]
    BadMagic(u16),
    /// A version this code does not speak.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// A frame type outside 1..=8.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// The declared size exceeds the configured maximum; nothing was allocated for it.
    #[error("frame of {declared} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Header + metadata + body, as declared by the header.
        declared: u64,
        /// The configured limit.
        max: u32,
    },
    /// A metadata entry runs past the end of the metadata section.
    #[error("metadata entry with tag {tag} is truncated")]
    TruncatedMetadata {
        /// The entry's tag.
        tag: u8,
    },
    /// A fixed-size field has the wrong length.
    #[error("metadata field {tag} has length {len}, expected {expected}")]
    BadFieldLength {
        /// The entry's tag.
        tag: u8,
        /// Its declared length.
        len: usize,
        /// The only length allowed for this tag.
        expected: usize,
    },
    /// A text field that is not UTF-8.
    #[error("metadata field {tag} is not valid UTF-8")]
    InvalidUtf8 {
        /// The entry's tag.
        tag: u8,
    },
    /// A well-known field given twice.
    #[error("metadata field {tag} appears twice")]
    DuplicateField {
        /// The entry's tag.
        tag: u8,
    },
    /// A codec number this code does not know.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// The metadata would not fit the 16-bit length field, or a value its 16-bit length.
    #[error("metadata too large to encode: {0} bytes")]
    MetadataTooLarge(usize),
}

/// Immutable UTF-8 text.
///
/// Text of up to 23 bytes (service and method names, entry keys) is held inline: decoding it
/// from a frame copies a few bytes, with no allocation and no reference count to raise and
/// drop again, and a clone is a plain copy. Longer text lives in a shared buffer.
#[derive(Clone)]
pub struct Text(Repr);

/// Most bytes of text held inline.
const INLINE: usize = 23;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Bytes),
}

impl Text {
    /// Text from a static string, without copying.
    pub const fn from_static(s: &'static str) -> Text {
        Text(Repr::Shared(Bytes::from_static(s.as_bytes())))
    }

    /// Text from bytes known to be UTF-8.
    fn copy_of(bytes: &[u8]) -> Text {
        if bytes.len() <= INLINE {
            let mut inline = [0; INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            Text(Repr::Inline {
                len: bytes.len() as u8,
                bytes: inline,
            })
        } else {
            Text(Repr::Shared(Bytes::copy_from_slice(bytes)))
        }
    }

    /// Text decoded from a frame's metadata entry `tag`.
    fn from_utf8(bytes: &[u8], tag: u8) -> Result<Text, FrameError> {
        // Service and method names are ASCII: an OR of every byte (branch-free, so it
        // vectorises) settles those at a fraction of the cost of the general check.
        let ascii = bytes.iter().fold(0u8, |acc, b| acc | b) < 0x80;
        if !ascii {
            std::str::from_utf8(bytes).map_err(|_| FrameError::InvalidUtf8 { tag })?;
        }
        Ok(Text::copy_of(bytes))
    }

    /// The text's UTF-8 bytes (without the check [`as_str`](Text::as_str) makes).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Validated when the value was built, so this cannot fail; an empty string would be
        // the harmless answer if it ever did.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl Default for Text {
    fn default() -> Text {
        Text::from_static("")
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Text {}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text::copy_of(s.as_bytes())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        if s.len() <= INLINE {
            Text::copy_of(s.as_bytes())
        } else {
            Text(Repr::Shared(Bytes::from(s)))
        }
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// The metadata section of a frame. Every field is optional on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Fully qualified service name, e.g. `keel.echo.v1.Echo` (requests).
    pub service: Option<Text>,
    /// Method name, e.g. `Echo` (requests).
    pub method: Option<Text>,
    /// Time left for the call when the frame was sent, in microseconds on the wire (requests).
    /// Relative, so the two sides need no synchronised clocks.
    pub timeout: Option<Duration>,
    /// How the body is encoded. Absent means protobuf.
    pub codec: Option<Codec>,
    /// The outcome (responses, stream ends, goaway). Absent means ok.
    pub status: Option<Code>,
    /// Human-readable detail for a non-ok status.
    pub message: Option<Text>,
    /// Free key/value pairs, e.g. a trace id. Keys are UTF-8 of at most 255 bytes.
    pub entries: Vec<(Text, Bytes)>,
}

impl Metadata {
    /// The value of the first free entry with this key.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    /// The encoded size of this metadata section.
    pub fn encoded_len(&self) -> usize {
        let text = |t: &Option<Text>| t.as_ref().map_or(0, |t| 3 + t.as_bytes().len());
        text(&self.service)
            + text(&self.method)
            + self.timeout.map_or(0, |_| 3 + 8)
            + self.codec.map_or(0, |_| 3 + 1)
            + self.status.map_or(0, |_| 3 + 1)
            + text(&self.message)
            + self
                .entries
                .iter()
                .map(|(k, v)| 3 + 1 + k.as_bytes().len() + v.len())
                .sum::<usize>()
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        fn put_entry(dst: &mut BytesMut, tag: u8, value: &[u8]) -> Result<(), FrameError> {
            let len = u16::try_from(value.len())
                .map_err(|_| FrameError::MetadataTooLarge(value.len()))?;
            dst.put_u8(tag);
            dst.put_u16(len);
            dst.put_slice(value);
            Ok(())
        }
        if let Some(s) = &self.service {
            put_entry(dst, tag::SERVICE, s.as_bytes())?;
        }
        if let Some(m) = &self.method {
            put_entry(dst, tag::METHOD, m.as_bytes())?;
        }
        if let Some(t) = self.timeout {
            let micros = u64::try_from(t.as_micros()).unwrap_or(u64::MAX);
            put_entry(dst, tag::TIMEOUT, &micros.to_be_bytes())?;
        }
        if let Some(c) = self.codec {
            put_entry(dst, tag::CODEC, &[c as u8])?;
        }
        if let Some(s) = self.status {
            put_entry(dst, tag::STATUS, &[s as u8])?;
        }
        if let Some(m) = &self.message {
            put_entry(dst, tag::MESSAGE, m.as_bytes())?;
        }
        for (k, v) in &self.entries {
            let k = k.as_bytes();
            let key_len =
                u8::try_from(k.len()).map_err(|_| FrameError::MetadataTooLarge(k.len()))?;
            let len = 1 + k.len() + v.len();
            let len = u16::try_from(len).map_err(|_| FrameError::MetadataTooLarge(len))?;
            dst.put_u8(tag::ENTRY);
            dst.put_u16(len);
            dst.put_u8(key_len);
            dst.put_slice(k);
            dst.put_slice(v);
        }
        Ok(())
    }

    /// Decodes a metadata section. Its values are copied out of `src`: they are a few short
    /// names and numbers, cheaper to copy than to share (a shared slice costs two atomic
    /// reference-count updates).
    fn decode(mut src: &[u8]) -> Result<Metadata, FrameError> {
        let mut meta = Metadata::default();
        while let [tag, len_hi, len_lo, rest @ ..] = src {
            let (tag, len) = (*tag, usize::from(u16::from_be_bytes([*len_hi, *len_lo])));
            let Some((value, rest)) = rest.split_at_checked(len) else {
                return Err(FrameError::TruncatedMetadata { tag });
            };
            src = rest;
            let fixed = |expected: usize| {
                if len == expected {
                    Ok(())
                } else {
                    Err(FrameError::BadFieldLength { tag, len, expected })
                }
            };
            let duplicate = FrameError::DuplicateField { tag };
            match tag {
                tag::SERVICE => {
                    set_once(&mut meta.service, Text::from_utf8(value, tag)?, duplicate)?
                }
                tag::METHOD => set_once(&mut meta.method, Text::from_utf8(value, tag)?, duplicate)?,
                tag::TIMEOUT => {
                    fixed(8)?;
                    let micros = u64::from_be_bytes(value.try_into().unwrap_or([0; 8]));
                    set_once(&mut meta.timeout, Duration::from_micros(micros), duplicate)?;
                }
                tag::CODEC => {
                    fixed(1)?;
                    let codec =
                        Codec::from_u8(value[0]).ok_or(FrameError::UnknownCodec(value[0]))?;
                    set_once(&mut meta.codec, codec, duplicate)?;
                }
                tag::STATUS => {
                    fixed(1)?;
                    set_once(&mut meta.status, Code::from_u8(value[0]), duplicate)?;
                }
                tag::MESSAGE => {
                    set_once(&mut meta.message, Text::from_utf8(value, tag)?, duplicate)?
                }
                tag::ENTRY => {
                    let Some((&key_len, value)) = value.split_first() else {
                        return Err(FrameError::TruncatedMetadata { tag });
                    };
                    let Some((key, value)) = value.split_at_checked(usize::from(key_len)) else {
                        return Err(FrameError::TruncatedMetadata { tag });
                    };
                    let key = Text::from_utf8(key, tag)?;
                    meta.entries.push((key, Bytes::copy_from_slice(value)));
                }
                // Unknown tags are skipped: a newer peer may send fields this side ignores.
                _ => {}
            }
        }
        if let [tag, ..] = src {
            return Err(FrameError::TruncatedMetadata { tag: *tag });
        }
        Ok(meta)
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, duplicate: FrameError) -> Result<(), FrameError> {
    if slot.is_some() {
        return Err(duplicate);
    }
    *slot = Some(value);
    Ok(())
}

/// A whole frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is for.
    pub kind: FrameType,
    /// Flag bits; none are defined in version 1.
    pub flags: u8,
    /// Matches a response to its request on a multiplexed connection.
    pub request_id: u64,
    /// The metadata section. Boxed, so a frame is a few words: a decoded frame is moved
    /// several times on its way to a handler or a caller, and each move of an inline metadata
    /// section was a copy of some 200 bytes.
    pub meta: Box<Metadata>,
    /// The encoded message (or ping payload).
    pub body: Bytes,
}

impl Frame {
    /// A frame with empty metadata and body.
    pub fn new(kind: FrameType, request_id: u64) -> Frame {
        Frame {
            kind,
            flags: 0,
            request_id,
            meta: Box::default(),
            body: Bytes::new(),
        }
    }

    /// Appends this frame's bytes to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_with(
            dst,
            self.kind,
            self.flags,
            self.request_id,
            &self.meta,
            u32::MAX,
            |dst| dst.put_slice(&self.body),
        )
    }

    /// Reads one frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when more bytes are needed; in that case `src` has reserved room for
    /// the rest of the frame, which is bounded by `max_frame_size` because a larger declared
    /// size is an error *before* any reservation. On success the frame's bytes are removed from
    /// `src`; the body shares them (no copy), the metadata's few values are copied.
    pub fn decode(src: &mut BytesMut, max_frame_size: u32) -> Result<Option<Frame>, FrameError> {
        let Some(header) = peek_header(src, max_frame_size)? else {
            return Ok(None);
        };
        let total = header.total_len();
        if src.len() < total {
            // Grow in steps: a header alone must not make the reader reserve a whole
            // (possibly 16 MiB) frame before any of its body has arrived.
            src.reserve((total - src.len()).min(256 * 1024));
            return Ok(None);
        }
        let meta = Metadata::decode(&src[HEADER_LEN..HEADER_LEN + header.meta_len])?;
        src.advance(HEADER_LEN + header.meta_len);
        Ok(Some(Frame {
            kind: header.kind,
            flags: header.flags,
            request_id: header.request_id,
            meta: Box::new(meta),
            body: src.split_to(header.body_len).freeze(),
        }))
    }
}

/// The fixed header, parsed.
#[derive(Clone, Copy, Debug)]
struct Header {
    kind: FrameType,
    flags: u8,
    meta_len: usize,
    request_id: u64,
    body_len: usize,
}

impl Header {
    fn total_len(&self) -> usize {
        HEADER_LEN + self.meta_len + self.body_len
    }
}

/// Checks the header at the front of `src` without consuming anything.
fn peek_header(src: &[u8], max_frame_size: u32) -> Result<Option<Header>, FrameError> {
    // Check the magic as soon as two bytes are in, so garbage is refused without waiting.
    if src.len() >= 2 && src[..2] != MAGIC {
        return Err(FrameError::BadMagic(u16::from_be_bytes([src[0], src[1]])));
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = &src[2..HEADER_LEN];
    let version = h.get_u8();
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let kind_byte = h.get_u8();
    let kind = FrameType::from_u8(kind_byte).ok_or(FrameError::UnknownFrameType(kind_byte))?;
    let flags = h.get_u8();
    let _reserved = h.get_u8();
    let meta_len = usize::from(h.get_u16());
    let request_id = h.get_u64();
    let body_len = h.get_u32();
    let declared = HEADER_LEN as u64 + meta_len as u64 + u64::from(body_len);
    if declared > u64::from(max_frame_size) {
        return Err(FrameError::TooLarge {
            declared,
            max: max_frame_size,
        });
    }
    Ok(Some(Header {
        kind,
        flags,
        meta_len,
        request_id,
        body_len: body_len as usize,
    }))
}

/// Appends a frame to `dst`, letting `write_body` put the body straight into the buffer (so a
/// message is encoded once, with no intermediate allocation). The body length is patched in
/// afterwards. A frame larger than `max_frame_size` is not appended: `dst` is left as it was
/// and the error says how large the frame would have been.
pub fn encode_with(
    dst: &mut BytesMut,
    kind: FrameType,
    flags: u8,
    request_id: u64,
    meta: &Metadata,
    max_frame_size: u32,
    write_body: impl FnOnce(&mut BytesMut),
) -> Result<(), FrameError> {
    let meta_len = meta.encoded_len();
    let meta_len16 = u16::try_from(meta_len).map_err(|_| FrameError::MetadataTooLarge(meta_len))?;
    let start = dst.len();
    dst.reserve(HEADER_LEN + meta_len);
    dst.put_slice(&MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(kind as u8);
    dst.put_u8(flags);
    dst.put_u8(0);
    dst.put_u16(meta_len16);
    dst.put_u64(request_id);
    dst.put_u32(0);
    if let Err(e) = meta.encode(dst) {
        dst.truncate(start);
        return Err(e);
    }
    let body_start = dst.len();
    write_body(dst);
    let body_len = dst.len() - body_start;
    let declared = (HEADER_LEN + meta_len + body_len) as u64;
    let body_len32 = match u32::try_from(body_len) {
        Ok(n) if declared <= u64::from(max_frame_size) => n,
        _ => {
            dst.truncate(start);
            return Err(FrameError::TooLarge {
                declared,
                max: max_frame_size,
            });
        }
    };
    dst[start + 16..start + 20].copy_from_slice(&body_len32.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame {
            kind: FrameType::Request,
            flags: 0,
            request_id: 7,
            meta: Box::new(Metadata {
                service: Some("keel.echo.v1.Echo".into()),
                method: Some("Echo".into()),
                timeout: Some(Duration::from_millis(250)),
                codec: Some(Codec::Json),
                entries: vec![("trace-id".into(), Bytes::from_static(b"abc"))],
                ..Metadata::default()
            }),
            body: Bytes::from_static(br#"{"message":"hi"}"#),
        }
    }

    #[test]
    fn round_trip_and_partial_input() {
        let frame = sample();
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        let bytes = buf.clone().freeze();
        // Every prefix is "need more", never an error or a wrong frame.
        for cut in 0..bytes.len() {
            let mut part = BytesMut::from(&bytes[..cut]);
            assert_eq!(Frame::decode(&mut part, DEFAULT_MAX_FRAME_SIZE), Ok(None));
        }
        let decoded = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, frame);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut header = BytesMut::new();
        header.put_slice(&MAGIC);
        header.put_u8(VERSION);
        header.put_u8(FrameType::Request as u8);
        header.put_u16(0);
        header.put_u16(0);
        header.put_u64(1);
        header.put_u32(u32::MAX);
        let cap_before = header.capacity();
        let err = Frame::decode(&mut header, 1024).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 1024, .. }),
            "{err}"
        );
        assert_eq!(header.capacity(), cap_before);
    }

    #[test]
    fn garbage_is_refused_at_the_magic() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            Frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE),
            Err(FrameError::BadMagic(_))
        ));
    }

    #[test]
    fn duplicate_and_bad_fields_are_errors() {
        let mut meta = BytesMut::new();
        for _ in 0..2 {
            meta.put_u8(tag::CODEC);
            meta.put_u16(1);
            meta.put_u8(0);
        }
        assert_eq!(
            Metadata::decode(&meta),
            Err(FrameError::DuplicateField { tag: tag::CODEC })
        );
        let mut meta = BytesMut::new();
        meta.put_u8(tag::TIMEOUT);
        meta.put_u16(2);
        meta.put_u16(0);
        assert!(matches!(
            Metadata::decode(&meta),
            Err(FrameError::BadFieldLength { .. })
        ));
    }

    #[test]
    fn unknown_tags_are_skipped() {
        let mut meta = BytesMut::new();
        meta.put_u8(200);
        meta.put_u16(3);
        meta.put_slice(b"xyz");
        meta.put_u8(tag::METHOD);
        meta.put_u16(1);
        meta.put_slice(b"M");
        let decoded = Metadata::decode(&meta).unwrap();
        assert_eq!(decoded.method.as_deref(), Some("M"));
    }

    #[test]
    fn text_is_checked_for_utf8_whether_held_inline_or_shared() {
        for name in [
            "Echo",
            "échö",
            "keel.echo.v1.Echo.With.A.Long.Name",
            "日本語のサービス名前です",
        ] {
            let mut meta = BytesMut::new();
            meta.put_u8(tag::SERVICE);
            meta.put_u16(name.len() as u16);
            meta.put_slice(name.as_bytes());
            let decoded = Metadata::decode(&meta).unwrap();
            assert_eq!(decoded.service.as_deref(), Some(name));
            assert_eq!(decoded.service, Some(Text::from(name.to_owned())));
        }
        for bad in [
            &b"Ech\xff"[..],
            &b"a-long-name-that-is-not-held-inline-\xc3"[..],
        ] {
            let mut meta = BytesMut::new();
            meta.put_u8(tag::METHOD);
            meta.put_u16(bad.len() as u16);
            meta.put_slice(bad);
            assert_eq!(
                Metadata::decode(&meta),
                Err(FrameError::InvalidUtf8 { tag: tag::METHOD })
            );
        }
    }

    fn arb_text() -> impl Strategy<Value = Text> {
        // ASCII and not, shorter and longer than what a text holds inline.
        "[a-zA-Z0-9._/é日-]{0,40}".prop_map(Text::from)
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let kinds = prop::sample::select(vec![
            FrameType::Request,
            FrameType::Response,
            FrameType::StreamItem,
            FrameType::StreamEnd,
            FrameType::Cancel,
            FrameType::Ping,
            FrameType::Pong,
            FrameType::GoAway,
        ]);
        let meta = (
            prop::option::of(arb_text()),
            prop::option::of(arb_text()),
            prop::option::of(any::<u64>().prop_map(Duration::from_micros)),
            prop::option::of(prop::sample::select(vec![Codec::Protobuf, Codec::Json])),
            prop::option::of(prop::sample::select(Code::ALL.to_vec())),
            prop::option::of(arb_text()),
            prop::collection::vec(
                (
                    arb_text(),
                    prop::collection::vec(any::<u8>(), 0..32).prop_map(Bytes::from),
                ),
                0..4,
            ),
        )
            .prop_map(
                |(service, method, timeout, codec, status, message, entries)| Metadata {
                    service,
                    method,
                    timeout,
                    codec,
                    status,
                    message,
                    entries,
                },
            );
        (
            kinds,
            any::<u8>(),
            any::<u64>(),
            meta,
            prop::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(kind, flags, request_id, meta, body)| Frame {
                kind,
                flags,
                request_id,
                meta: Box::new(meta),
                body: Bytes::from(body),
            })
    }

    proptest! {
        #[test]
        fn every_valid_frame_round_trips(frames in prop::collection::vec(arb_frame(), 1..4)) {
            let mut buf = BytesMut::new();
            for f in &frames {
                f.encode(&mut buf).unwrap();
            }
            for f in &frames {
                let decoded = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap();
                prop_assert_eq!(&decoded, f);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_overallocate(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            with_header in any::<bool>(),
            limit in 20u32..4096,
        ) {
            let mut buf = BytesMut::new();
            if with_header {
                // Make the garbage start like a real frame so it gets past the magic and
                // version checks and exercises the length and metadata paths.
                buf.put_slice(&MAGIC);
                buf.put_u8(VERSION);
            }
            buf.put_slice(&bytes);
            while let Ok(Some(_)) = Frame::decode(&mut buf, limit) {}
            // Whatever the input declared, the buffer never grows past the frame limit
            // (plus what the input itself occupied).
            prop_assert!(buf.capacity() <= (limit as usize).max(bytes.len() + 3) + 64);
        }
    }
}
