//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not a stable API): thin
//! public wrappers over the gateway's private parsers of bytes from the network. Each calls
//! the function the gateway itself calls, and only converts what it returns into public
//! types. See `docs/fuzzing.md`.

use bytes::BytesMut;

use crate::{fast, framing, h1};

/// Headers parsed per request or answer head on the fast path (more hands the head to hyper).
pub const MAX_HEADERS: usize = fast::MAX_HEADERS;

/// Largest request body the fast path takes (a larger declared length hands the head to hyper).
pub const MAX_BUFFERED_BODY: u64 = fast::MAX_BUFFERED_BODY;

/// Where the request head at the start of `buf` ends, after its empty line, if it is all there
/// (the fast path's `head_end`, which cuts each head off the bytes a client sends).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    fast::head_end(buf)
}

/// A request head the fast path accepted: the fields of its `Request`, as `parse` found them.
#[derive(Debug)]
pub struct Head<'h> {
    /// The method.
    pub method: String,
    /// The request target (path and query), as sent.
    pub target: &'h str,
    /// The `Host` header's value without its port.
    pub host: Option<&'h str>,
    /// Every header, name and value, in order.
    pub headers: Vec<(&'h str, &'h [u8])>,
    /// The body's declared length.
    pub length: Option<u64>,
    /// Whether the client keeps the connection open after this request.
    pub keep_alive: bool,
}

/// Parses `head` (a whole request head, as [`head_end`] cuts it) with the fast path's `parse`
/// and room for [`MAX_HEADERS`] headers, and hands the result to `with`: `None` if the fast
/// path does not take the head (it goes to hyper).
pub fn parse_head<R>(head: &[u8], with: impl FnOnce(Option<Head<'_>>) -> R) -> R {
    let mut parsed = [httparse::EMPTY_HEADER; fast::MAX_HEADERS];
    let head = fast::parse(head, &mut parsed).map(|req| Head {
        method: req.method.as_str().to_owned(),
        target: req.target,
        host: req.host,
        headers: req.headers.iter().map(|h| (h.name, h.value)).collect(),
        length: req.length,
        keep_alive: req.keep_alive,
    });
    with(head)
}

/// How a server frames an answer's body (the fast path's `Framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFraming {
    /// This many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// An upstream server's answer head, as the fast path read it (its `Answer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHead {
    /// The status code.
    pub status: u16,
    /// How the body is framed.
    pub framing: AnswerFraming,
    /// Whether the server keeps the connection open after the answer.
    pub reusable: bool,
}

/// Reads the answer head at the start of `buf` with the fast path's `parse_answer` (what
/// `read_answer` calls after each read from the server): `Ok(None)` while it is incomplete;
/// else 1xx interim answers and the head are taken out of `buf`, whose rest is the body's
/// first bytes, and `out` holds the head the client gets (without the `Date` and sticky
/// cookie the gateway may add). A body that ends when the server closes (`Close`) is relayed
/// chunked. `Err` holds why the answer is refused (the client gets a 502).
pub fn parse_answer(
    buf: &mut BytesMut,
    head_request: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<Option<AnswerHead>, String> {
    match h1::parse_answer(buf, head_request, keep_alive, out) {
        Ok(None) => Ok(None),
        Ok(Some(answer)) => Ok(Some({
            out.extend_from_slice(b"\r\n");
            AnswerHead {
                status: answer.status.as_u16(),
                framing: match answer.framing {
                    h1::Framing::Length(n) => AnswerFraming::Length(n),
                    h1::Framing::Chunked => AnswerFraming::Chunked,
                    h1::Framing::Close => AnswerFraming::Close,
                },
                reusable: answer.reusable,
            }
        })),
        Err(h1::Failure::NoAnswer(why) | h1::Failure::Bad(why)) => Err(why),
    }
}

/// Where a chunked body stands after some of its bytes (`framing::ChunkedEnd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedEnd {
    /// Not ended yet: all the bytes belonged to it.
    No,
    /// It ended after this many of the bytes.
    At(usize),
    /// Not a chunked body.
    Invalid,
}

/// The tracker of a chunked body (`framing::Chunked`), as the smuggling guard and the fast
/// path's relay of chunked answers use it.
#[derive(Debug)]
pub struct Chunked(framing::Chunked);

impl Chunked {
    /// A tracker at the start of a body; a size or trailer line may be `max_line` bytes long.
    pub fn new(max_line: usize) -> Chunked {
        Chunked(framing::Chunked::new(max_line))
    }

    /// Follows the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) -> ChunkedEnd {
        match self.0.feed(bytes) {
            framing::ChunkedEnd::No => ChunkedEnd::No,
            framing::ChunkedEnd::At(n) => ChunkedEnd::At(n),
            framing::ChunkedEnd::Invalid => ChunkedEnd::Invalid,
        }
    }
}

/// The request smuggling guard of one client connection (`framing::Framing`).
#[derive(Debug)]
pub struct Framing(framing::Framing);

impl Framing {
    /// A guard at the start of a connection, for heads of up to `max_head` bytes.
    pub fn new(max_head: usize) -> Framing {
        Framing(framing::Framing::new(max_head))
    }

    /// Follows `bytes`, the next bytes the client sent: the index (from 0) of a request head
    /// among them with ambiguous framing, if one is.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<u64> {
        self.0.feed(bytes).ambiguous
    }

    /// Whether it still follows the connection.
    pub fn is_on(&self) -> bool {
        self.0.is_on()
    }
}
