//! Keel's HTTP/1.1 upstream leg: a request sent on one of the server's idle keep-alive
//! connections (or a new one) by the task that serves the client, and the answer's head read
//! and rewritten for the client with `httparse`, without a header map. The answer's body is
//! relayed by the caller (`fast`), as it is framed.
//!
//! The head sent is the client's, with the plan's header edits ([`Edits`]); the answer's
//! head loses its hop-by-hop headers, gains `Date` when the server sent none and the sticky
//! session cookie when the pool has one, and says how its body comes: a close-delimited
//! body is relayed chunked, so the client keeps its connection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::forward::Leg;
use crate::plan::{Edits, connection_names, has_token, hop_by_hop, named_by};
use crate::upstream::{Pool, Server};

/// Headers parsed per head at most (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;
/// Bytes read at a time.
pub(crate) const READ_SIZE: usize = 16 * 1024;
/// A server's answer head may be this long (about what hyper's client allows).
pub(crate) const MAX_RESPONSE_HEAD: usize = 400 * 1024;

/// Why an answer could not be read.
#[derive(Debug)]
pub(crate) enum Failure {
    /// None at all (refused, or lost before the answer): another server may be tried.
    NoAnswer(String),
    /// The answer was not HTTP/1 the gateway can relay.
    Bad(String),
}

impl From<Failure> for GatewayError {
    fn from(failure: Failure) -> GatewayError {
        match failure {
            // Nothing was relayed: another server may be tried.
            Failure::NoAnswer(detail) | Failure::Bad(detail) => GatewayError::no_answer(detail),
        }
    }
}

/// How a server frames an answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes the connection (relayed to the client chunked).
    Close,
}

/// An answer head, relayed.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) framing: Framing,
    /// Whether the server keeps the connection open after the answer.
    pub(crate) reusable: bool,
    /// Whether the server dated its answer.
    pub(crate) dated: bool,
}

/// One request on Keel's HTTP/1.1 leg.
pub(crate) struct H1Leg<'a> {
    pub(crate) pool: &'a Pool,
    /// The head for the server without its final empty line (see [`request_head`]).
    pub(crate) head: &'a [u8],
    /// Whether `head` has a `Host` (else the server's address is sent).
    pub(crate) has_host: bool,
    pub(crate) body: &'a [u8],
    /// The client's headers (for the sticky session cookie).
    pub(crate) headers: &'a [httparse::Header<'a>],
    pub(crate) head_request: bool,
    /// Whether the client's connection stays open after the answer.
    pub(crate) keep_alive: bool,
    pub(crate) replayable: bool,
    /// What the server sent; after the answer's head, the body's first bytes.
    pub(crate) buf: &'a mut BytesMut,
    /// The request's bytes, then the answer's head for the client.
    pub(crate) out: &'a mut Vec<u8>,
}

impl Leg for H1Leg<'_> {
    type Answer = (Answer, TcpStream);

    /// Sends the request on an idle connection, or a new one, and reads the answer's head;
    /// `out` then holds the head for the client. A reused connection the server had closed
    /// is replaced by a new one when the request can be sent again.
    async fn send(
        &mut self,
        server: &Arc<Server>,
        now: Instant,
    ) -> Result<(Answer, TcpStream), GatewayError> {
        self.request(server);
        loop {
            let (mut stream, reused) = match server.idle.take(now) {
                Some(stream) => (stream, true),
                None => (
                    connect(server, self.pool.config.connect_timeout).await?,
                    false,
                ),
            };
            self.buf.clear();
            let lost = |e: &dyn std::fmt::Display| {
                GatewayError::no_answer(format!(
                    "{}: connection lost before the answer: {e}",
                    server.address
                ))
            };
            if let Err(e) = stream.write_all(self.out).await {
                if reused && self.replayable {
                    continue;
                }
                return Err(lost(&e));
            }
            let read = read_answer(
                &mut stream,
                self.buf,
                self.head_request,
                self.keep_alive,
                self.out,
            )
            .await;
            match read {
                Ok(answer) => {
                    self.finish_head(&answer, server);
                    return Ok((answer, stream));
                }
                Err(Failure::NoAnswer(_)) if reused && self.replayable && self.buf.is_empty() => {
                    // The server had closed this idle connection: a new one.
                    self.request(server);
                }
                Err(Failure::NoAnswer(e)) => return Err(lost(&e)),
                Err(other) => return Err(other.into()),
            }
        }
    }

    fn status((answer, _): &(Answer, TcpStream)) -> StatusCode {
        answer.status
    }
}

impl H1Leg<'_> {
    /// The request's bytes for `server` into `out`: the head, `Host` if the client sent
    /// none, and the body.
    fn request(&mut self, server: &Server) {
        let out = &mut *self.out;
        out.clear();
        out.extend_from_slice(self.head);
        if !self.has_host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(server.address.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body);
    }

    /// Ends the client's answer head in `out`: the sticky session cookie, `Date`, and the
    /// empty line.
    fn finish_head(&mut self, answer: &Answer, server: &Server) {
        let out = &mut *self.out;
        if let Some(cookie) = crate::upstream::sticky_cookie(self.pool, server, self.headers) {
            out.extend_from_slice(b"set-cookie: ");
            out.extend_from_slice(cookie.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !answer.dated {
            out.extend_from_slice(b"date: ");
            date(|d| out.extend_from_slice(d.as_bytes()));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

async fn connect(server: &Server, timeout: Duration) -> Result<TcpStream, GatewayError> {
    match tokio::time::timeout(timeout, TcpStream::connect(server.address.as_str())).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(GatewayError::no_answer(format!("{}: {e}", server.address))),
        Err(_) => Err(GatewayError::no_answer(format!(
            "{}: no connection within {timeout:?}",
            server.address
        ))),
    }
}

/// Writes the head sent upstream into `up` (without its final empty line and any `Host`,
/// which are the attempt's: see [`H1Leg`]): the client's request line with the plan's
/// target, the client's headers as the plan's [`Edits`] leave them (`asked_host` and
/// `peer_ip` for the `X-Forwarded-*` it adds), and the body's length. Whether the client sent
/// a `Host`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn request_head(
    up: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &[httparse::Header<'_>],
    asked_host: Option<&str>,
    peer_ip: &str,
    edits: &Edits<'_>,
    length: Option<u64>,
) -> bool {
    up.clear();
    up.extend_from_slice(method.as_str().as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let connection = connection_names(headers);
    let mut host = false;
    for h in headers {
        if edits.drops(h.name, &connection) || h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        host |= h.name.eq_ignore_ascii_case("host");
        up.extend_from_slice(h.name.as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(h.value);
        up.extend_from_slice(b"\r\n");
    }
    let added = edits.added(headers, asked_host, peer_ip);
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = added.prior_forwarded_for {
        up.extend_from_slice(prior);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(added.peer_ip.as_bytes());
    up.extend_from_slice(b"\r\nx-forwarded-proto: ");
    up.extend_from_slice(added.proto);
    up.extend_from_slice(b"\r\n");
    if let Some(host) = added.host {
        up.extend_from_slice(b"x-forwarded-host: ");
        up.extend_from_slice(host.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    for (name, value) in added.claims {
        up.extend_from_slice(name.as_str().as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(value.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    if let Some(len) = length {
        put_content_length(up, len);
    }
    host
}

/// Reads an answer head from `stream` into `buf` (1xx interim answers are skipped), and
/// writes the head for the client into `out`; the body's first bytes stay in `buf`.
async fn read_answer(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    head_request: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<Answer, Failure> {
    loop {
        if let Some(answer) = parse_answer(buf, head_request, keep_alive, out)? {
            return Ok(answer);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_SIZE);
        }
        let n = std::future::poll_fn(|cx| {
            tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, buf)
        })
        .await
        .map_err(|e| Failure::NoAnswer(e.to_string()))?;
        if n == 0 {
            return Err(Failure::NoAnswer("closed".into()));
        }
    }
}

/// The answer head at the start of `buf`, once it is all there (`None` until then): 1xx
/// interim answers are dropped from `buf` on the way, the head's bytes are taken out of it
/// (the body's first bytes stay), and the head for the client is written into `out`, all but
/// its end (see [`H1Leg::finish_head`]).
pub(crate) fn parse_answer(
    buf: &mut BytesMut,
    head_request: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, Failure> {
    loop {
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut parsed);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let code = resp.code.unwrap_or(0);
                if (100..200).contains(&code) && code != 101 {
                    buf.advance(n);
                    continue;
                }
                let answer = answer_head(&resp, head_request, keep_alive, out)?;
                buf.advance(n);
                return Ok(Some(answer));
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                return Err(Failure::Bad("the answer's head is too large".into()));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Failure::Bad(format!("the answer is not HTTP/1: {e}"))),
        }
    }
}

/// A `Content-Length` value: decimal digits only (no sign, no spaces inside), at most 19.
pub(crate) fn digits(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// An answer's `Content-Length`: [`digits`], or a list of equal ones (`5, 5`, which a
/// recipient may take as one, RFC 9110 §8.6).
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for item in value.split(|b| *b == b',') {
        let n = digits(item)?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// The client's copy of an answer head (hop-by-hop headers dropped) into `out`, and how its
/// body is framed (RFC 9112 §6.3).
fn answer_head(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<Answer, Failure> {
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|_| code != 101)
        .ok_or_else(|| Failure::Bad(format!("unexpected status {code}")))?;
    let headers: &[httparse::Header<'_>] = resp.headers;
    let connection = connection_names(headers);
    let mut length: Option<u64> = None;
    // Whether the answer has `Transfer-Encoding`, and its last coding over all its headers
    // (a list may be split across headers, and empty elements count for nothing).
    let mut encoding: Option<&[u8]> = None;
    let mut dated = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value);
            match (length, n) {
                (_, None) => return Err(Failure::Bad("a bad Content-Length".into())),
                (Some(a), Some(b)) if a != b => {
                    return Err(Failure::Bad("two different Content-Lengths".into()));
                }
                (_, n) => length = n,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h
                .value
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty());
            encoding = last.or(encoding).or(Some(b""));
        } else if h.name.eq_ignore_ascii_case("date") {
            dated = true;
        }
    }
    let bodiless = head_request || code == 204 || code == 304;
    let framing = if bodiless {
        Framing::Length(0)
    } else {
        match (encoding, length) {
            (Some(last), _) => {
                if last.eq_ignore_ascii_case(b"chunked") {
                    Framing::Chunked
                } else {
                    Framing::Close
                }
            }
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    let reusable = resp.version == Some(1)
        && !connection.iter().any(|v| has_token(v, "close"))
        && framing != Framing::Close;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(
        resp.reason
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for h in headers {
        let transfer_encoding = h.name.eq_ignore_ascii_case("transfer-encoding");
        let framing_header = h.name.eq_ignore_ascii_case("content-length") || transfer_encoding;
        // The length is written below, as the gateway read it; `Connection` cannot take
        // away the headers the body is framed by. A close-delimited body goes to the client
        // chunked. `Trailer` announces the trailers a chunked body brings, relayed with it.
        let announces_trailers =
            framing == Framing::Chunked && h.name.eq_ignore_ascii_case("trailer");
        if (hop_by_hop(h.name) && !announces_trailers)
            || h.name.eq_ignore_ascii_case("upgrade")
            || (named_by(&connection, h.name) && !framing_header)
            || h.name.eq_ignore_ascii_case("content-length")
            || (transfer_encoding && framing == Framing::Close)
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let (Some(n), None) = (length, encoding) {
        put_content_length(out, n);
    }
    if framing == Framing::Close {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    Ok(Answer {
        status,
        framing,
        reusable,
        dated,
    })
}

/// Appends `n` in decimal (without `core::fmt`, which costs several times more on this
/// per-request path).
pub(crate) fn put_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a `content-length: N` header line.
pub(crate) fn put_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    put_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Calls `with` with the current time as an HTTP date, formatted at most once a second per
/// thread.
pub(crate) fn date<R>(with: impl FnOnce(&str) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs || cell.1.is_empty() {
            *cell = (secs, httpdate::fmt_http_date(now));
        }
        with(&cell.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_heads_lose_hop_by_hop_headers_and_say_how_the_body_ends() {
        let frame = |head: &[u8], head_request: bool| {
            let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut parsed);
            resp.parse(head).unwrap();
            let mut out = Vec::new();
            let answer = answer_head(&resp, head_request, true, &mut out)
                .ok()
                .unwrap();
            (
                answer.framing,
                answer.reusable,
                String::from_utf8(out).unwrap(),
            )
        };
        let (framing, reusable, out) = frame(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\n\r\n",
            false,
        );
        assert_eq!((framing, reusable), (Framing::Length(5), true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nX-Kept: 2\r\ncontent-length: 5\r\n");
        // `Connection` cannot take the framing away; a length is written as it was read.
        let (framing, _, out) = frame(
            b"HTTP/1.1 200 OK\r\nContent-Length: 05\r\nConnection: content-length\r\n\r\n",
            false,
        );
        assert_eq!(framing, Framing::Length(5));
        assert!(out.contains("content-length: 5\r\n"), "{out}");
        let (framing, _, out) = frame(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n",
            false,
        );
        assert_eq!(framing, Framing::Chunked);
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        // The codings of all `Transfer-Encoding` headers make one list, as the client reads
        // it: an empty header or element does not hide a `chunked` before it.
        for (head, expected) in [
            (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n"[..],
                Framing::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked ,\r\n\r\n",
                Framing::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                Framing::Close,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\n",
                Framing::Close,
            ),
        ] {
            let (framing, _, out) = frame(head, false);
            assert_eq!(framing, expected, "{out}");
            assert!(!out.contains("content-length"), "{out}");
        }
        let (framing, _, out) = frame(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(framing, Framing::Chunked);
        assert!(!out.contains("Content-Length"), "{out}");
        // A body that ends when the server closes goes to the client chunked.
        let (framing, reusable, out) = frame(b"HTTP/1.0 200 OK\r\n\r\n", false);
        assert_eq!((framing, reusable), (Framing::Close, false));
        assert!(out.ends_with("transfer-encoding: chunked\r\n"), "{out}");
        let (framing, _, out) = frame(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!(framing, Framing::Close);
        assert!(!out.contains("gzip"), "{out}");
        // A list of equal lengths is one length.
        let (framing, _, out) = frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false);
        assert_eq!(framing, Framing::Length(5));
        assert!(out.contains("content-length: 5\r\n"), "{out}");
        let (framing, _, _) = frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(framing, Framing::Length(0));
        let (framing, _, _) = frame(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(framing, Framing::Length(0));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut parsed);
            resp.parse(bad).unwrap();
            assert!(answer_head(&resp, false, true, &mut Vec::new()).is_err());
        }
        let (_, reusable, _) = frame(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(!reusable);
    }
}
