//! WebSocket (RFC 6455) framing over buffers the connection owns.
//!
//! Frame headers are read and written by `tungstenite`'s [`FrameHeader`]; what this module
//! adds is the part a server holding 100,000 mostly idle connections cares about: no buffer
//! lives with a connection between reads (the caller's read buffer is freed once empty), and
//! the message rules a chat server enforces are applied as frames arrive — client frames
//! masked, no reserved bits, control frames short and whole, text valid UTF-8, messages no
//! larger than the server's limit.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Close codes this server sends (RFC 6455 section 7.4 and the application's own, 4000–4999).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutting down).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL: u16 = 1002;
    /// A data type the server does not accept (binary messages).
    pub const UNSUPPORTED: u16 = 1003;
    /// A text message that is not UTF-8.
    pub const BAD_DATA: u16 = 1007;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The token expired (or was refused) after the upgrade.
    pub const AUTH: u16 = 4001;
    /// Sends far over the rate limit.
    pub const ABUSE: u16 = 4008;
    /// The connection fell too far behind what it was sent.
    pub const SLOW: u16 = 4009;
    /// Messages of a joined room were lost between instances and could not be recovered: the
    /// client reconnects and joins with `since`, which says what it missed.
    pub const RESYNC: u16 = 4010;
}

/// Whether an endpoint may send close code `code` (RFC 6455 section 7.4: 1005, 1006 and 1015
/// are reserved for reporting, and codes below 3000 are the protocol's own).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// The handshake's `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

/// A message or control frame read from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole text message.
    Text(String),
    /// A ping, with its payload to echo in the pong.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client closes: its code and reason, if it gave them.
    Close(Option<(u16, String)>),
}

/// Why a client's bytes end the connection, with the close code that says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A framing rule was broken.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A message over the limit.
    #[error("message over {0} bytes")]
    TooBig(usize),
    /// A text message that is not UTF-8.
    #[error("text is not UTF-8")]
    BadUtf8,
    /// A binary message (the chat protocol is JSON text).
    #[error("binary messages are not accepted")]
    Binary,
}

impl WsError {
    /// The close code that reports this error to the client.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close::PROTOCOL,
            WsError::TooBig(_) => close::TOO_BIG,
            WsError::BadUtf8 => close::BAD_DATA,
            WsError::Binary => close::UNSUPPORTED,
        }
    }
}

/// Reads frames and reassembles fragmented messages: a client's (masked) on the server, or
/// a server's (unmasked) in a client such as `keel bench chat`.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// A fragmented text message so far (empty when none is under way).
    partial: Vec<u8>,
    fragmented: bool,
    /// Whether frames must be masked (a server reading its clients) or must not be.
    masked: bool,
}

impl Decoder {
    /// A server's decoder of client frames, refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message,
            partial: Vec::new(),
            fragmented: false,
            masked: true,
        }
    }

    /// A client's decoder of server frames (which are not masked).
    pub fn for_client(max_message: usize) -> Decoder {
        Decoder {
            masked: false,
            ..Decoder::new(max_message)
        }
    }

    /// The next message or control frame from the front of `buf`, consuming it; `Ok(None)`
    /// when `buf` holds no whole frame yet.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WsError> {
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                Err(_) => return Err(WsError::Protocol("bad frame header")),
            };
            let header_len = cursor.position() as usize;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WsError::Protocol("reserved bits set"));
            }
            let mask = match (header.mask, self.masked) {
                (Some(mask), true) => Some(mask),
                (None, false) => None,
                (None, true) => return Err(WsError::Protocol("client frames must be masked")),
                (Some(_), false) => return Err(WsError::Protocol("server frames are not masked")),
            };
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return Err(WsError::Protocol("control frames are short and whole"));
            }
            let so_far = if is_control { 0 } else { self.partial.len() };
            if len > (self.max_message - so_far.min(self.max_message)) as u64 {
                return Err(WsError::TooBig(self.max_message));
            }
            let len = len as usize;
            if buf.len() < header_len + len {
                buf.reserve(header_len + len - buf.len());
                return Ok(None);
            }
            buf.advance(header_len);
            let mut payload = buf.split_to(len);
            if let Some(mask) = mask {
                unmask(&mut payload, mask);
            }
            match header.opcode {
                OpCode::Control(Control::Ping) => {
                    return Ok(Some(Incoming::Ping(payload.freeze())));
                }
                OpCode::Control(Control::Pong) => return Ok(Some(Incoming::Pong)),
                OpCode::Control(Control::Close) => return close_frame(&payload).map(Some),
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(WsError::Protocol("reserved opcode"));
                }
                OpCode::Data(Data::Binary) => return Err(WsError::Binary),
                OpCode::Data(Data::Text) => {
                    if self.fragmented {
                        return Err(WsError::Protocol("a new message inside a fragmented one"));
                    }
                    if header.is_final {
                        return text(payload.to_vec()).map(Some);
                    }
                    self.fragmented = true;
                    self.partial.extend_from_slice(&payload);
                }
                OpCode::Data(Data::Continue) => {
                    if !self.fragmented {
                        return Err(WsError::Protocol("continuation without a message"));
                    }
                    self.partial.extend_from_slice(&payload);
                    if header.is_final {
                        self.fragmented = false;
                        return text(std::mem::take(&mut self.partial)).map(Some);
                    }
                }
            }
        }
    }
}

fn text(bytes: Vec<u8>) -> Result<Incoming, WsError> {
    String::from_utf8(bytes)
        .map(Incoming::Text)
        .map_err(|_| WsError::BadUtf8)
}

fn close_frame(payload: &[u8]) -> Result<Incoming, WsError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(WsError::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::BadUtf8)?;
            Ok(Incoming::Close(Some((
                u16::from_be_bytes([*a, *b]),
                reason.to_owned(),
            ))))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends a frame; a client's (`mask`) is masked as RFC 6455 asks, a server's is not.
fn frame(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    let header = FrameHeader {
        opcode,
        mask,
        ..FrameHeader::default()
    };
    // Writing into a growable buffer cannot fail.
    let _ = header.format(payload.len() as u64, &mut dst.writer());
    let start = dst.len();
    dst.put_slice(payload);
    if let Some(mask) = mask {
        unmask(&mut dst[start..], mask);
    }
}

/// Opens a WebSocket as a client over `stream`: sends the upgrade request for `path` to
/// `host` and reads the answer; returns the bytes read past the answer (the first frames).
pub async fn client_handshake(
    stream: &mut tokio::net::TcpStream,
    host: &str,
    path: &str,
) -> std::io::Result<BytesMut> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let refused = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a2VlbC1iZW5jaC1jaGF0IQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut input = BytesMut::with_capacity(1024);
    let head_end = loop {
        if stream.read_buf(&mut input).await? == 0 {
            return Err(refused("closed during the upgrade".into()));
        }
        if let Some(at) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if input.len() >= 8192 {
            return Err(refused("no end of the upgrade answer".into()));
        }
    };
    if !input.starts_with(b"HTTP/1.1 101") {
        return Err(refused(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&input[..head_end.min(200)])
        )));
    }
    let _ = input.split_to(head_end);
    Ok(input)
}

/// Appends a server text frame (servers do not mask).
pub fn encode_text(text: &str, dst: &mut BytesMut) {
    frame(OpCode::Data(Data::Text), text.as_bytes(), None, dst);
}

/// Appends a client text frame, masked with `mask` (RFC 6455 asks clients for a fresh
/// unpredictable mask per frame; a load generator may reuse one).
pub fn encode_text_masked(text: &str, mask: [u8; 4], dst: &mut BytesMut) {
    frame(OpCode::Data(Data::Text), text.as_bytes(), Some(mask), dst);
}

/// Appends a masked pong (a client answering a server's ping).
pub fn encode_pong_masked(payload: &[u8], mask: [u8; 4], dst: &mut BytesMut) {
    frame(OpCode::Control(Control::Pong), payload, Some(mask), dst);
}

/// Appends a ping.
pub fn encode_ping(payload: &[u8], dst: &mut BytesMut) {
    frame(OpCode::Control(Control::Ping), payload, None, dst);
}

/// Appends a pong answering a ping's payload.
pub fn encode_pong(payload: &[u8], dst: &mut BytesMut) {
    frame(OpCode::Control(Control::Pong), payload, None, dst);
}

/// Appends a close frame with `code` and `reason` (cut to fit the 125-byte control limit).
pub fn encode_close(code: u16, reason: &str, dst: &mut BytesMut) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OpCode::Control(Control::Close), &payload, None, dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, as a browser sends it.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(bytes: &[u8], max: usize) -> Vec<Result<Incoming, WsError>> {
        let mut decoder = Decoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // One byte at a time: every split point of every frame is a possible read boundary.
        for b in bytes {
            buf.put_u8(*b);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(m)) => out.push(Ok(m)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn text_ping_close_and_fragments_are_read_at_any_split() {
        let mut bytes = client_frame(0x81, "héllo".as_bytes());
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x01, b"ab"));
        bytes.extend(client_frame(0x8A, b""));
        bytes.extend(client_frame(0x80, b"cd"));
        bytes.extend(client_frame(0x81, &[b'x'; 300]));
        bytes.extend(client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        let got = decode_all(&bytes, 1024);
        assert_eq!(
            got,
            vec![
                Ok(Incoming::Text("héllo".into())),
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Pong),
                Ok(Incoming::Text("abcd".into())),
                Ok(Incoming::Text("x".repeat(300))),
                Ok(Incoming::Close(Some((1000, "bye".into())))),
            ]
        );
    }

    #[test]
    fn broken_frames_get_their_close_codes() {
        let unmasked = [0x81, 0x01, b'a'];
        assert_eq!(
            decode_all(&unmasked, 64)[0],
            Err(WsError::Protocol("client frames must be masked"))
        );
        let big = client_frame(0x81, &[b'a'; 100]);
        assert_eq!(
            decode_all(&big, 64)[0].clone().unwrap_err().close_code(),
            close::TOO_BIG
        );
        let mut fragments = client_frame(0x01, &[b'a'; 40]);
        fragments.extend(client_frame(0x80, &[b'a'; 40]));
        assert_eq!(decode_all(&fragments, 64)[0], Err(WsError::TooBig(64)));
        let bad_utf8 = client_frame(0x81, &[0xff, 0xfe]);
        assert_eq!(
            decode_all(&bad_utf8, 64)[0]
                .clone()
                .unwrap_err()
                .close_code(),
            close::BAD_DATA
        );
        let binary = client_frame(0x82, b"x");
        assert_eq!(decode_all(&binary, 64)[0], Err(WsError::Binary));
        let rsv = client_frame(0xC1, b"x");
        assert_eq!(
            decode_all(&rsv, 64)[0].clone().unwrap_err().close_code(),
            close::PROTOCOL
        );
        let stray = client_frame(0x80, b"x");
        assert!(decode_all(&stray, 64)[0].is_err());
        let long_ping = client_frame(0x89, &[0; 126]);
        assert!(decode_all(&long_ping, 1024)[0].is_err());
    }

    #[test]
    fn a_client_decoder_reads_server_frames_and_the_server_reads_masked_ones() {
        let mut server_out = BytesMut::new();
        encode_text("hello", &mut server_out);
        encode_ping(b"", &mut server_out);
        let mut client = Decoder::for_client(64);
        assert_eq!(
            client.decode(&mut server_out),
            Ok(Some(Incoming::Text("hello".into())))
        );
        assert_eq!(
            client.decode(&mut server_out),
            Ok(Some(Incoming::Ping(Bytes::new())))
        );
        let mut client_out = BytesMut::new();
        encode_text_masked("hé", [9, 8, 7, 6], &mut client_out);
        encode_pong_masked(b"x", [1, 1, 1, 1], &mut client_out);
        let mut server = Decoder::new(64);
        assert_eq!(
            server.decode(&mut client_out.clone()),
            Ok(Some(Incoming::Text("hé".into())))
        );
        assert!(
            client.decode(&mut client_out).is_err(),
            "a client refuses masked frames"
        );
    }

    #[test]
    fn server_frames_are_what_a_client_library_reads() {
        let mut out = BytesMut::new();
        encode_text("hi", &mut out);
        encode_close(close::SLOW, &"é".repeat(100), &mut out);
        assert_eq!(&out[..4], &[0x81, 2, b'h', b'i']);
        assert_eq!(out[4], 0x88);
        let len = out[5] as usize;
        assert!(len <= 125, "a control frame's payload is at most 125 bytes");
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 4009);
        assert!(
            std::str::from_utf8(&out[8..8 + len - 2]).is_ok(),
            "the cut keeps UTF-8 whole"
        );
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
