//! The HTTP/1.1 fast path: Keel's own request loop for what a gateway mostly does, proxying
//! plain HTTP/1.1 requests to HTTP/1.1 servers.
//!
//! One task per client connection reads a request head, routes it, applies the route's filters
//! (the same `proxy::admit` the hyper path uses), sends the request on a pooled keep-alive
//! connection to the chosen server, and relays the answer back, all by itself: no task per
//! upstream connection, no channels between tasks, no header map per request (filters, routes
//! and balancers read the parsed headers where they lie, through `headers::Lookup`). Request
//! and response bodies are relayed as they are framed (`Content-Length`, chunked, or until the
//! server closes), chunked bodies without re-encoding.
//!
//! Whatever the fast path does not serve goes to hyper, which then serves the rest of the
//! connection: the bytes already read are replayed to it (`crate::serve_connection`), so the
//! hand-over is seamless at any request boundary. That covers HTTP/2 (h2c prior knowledge), HTTP/1.0,
//! upgrades (WebSocket), `Expect`, chunked or large request bodies, any request head that is
//! not plain (ambiguous framing, bad syntax, too large: hyper and `framing` refuse those), and
//! routes to directories, caches, RPC services, h2c pools or pools with sticky sessions. A head
//! goes over before any filter has run, so no rate-limit token is spent twice.

use keel_governance::Attempts;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, Method, StatusCode, header};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::conns::{Busy, ConnState};
use crate::error::{ErrorKind, GatewayError};
use crate::framing::{Chunked, ChunkedEnd};
use crate::headers::Lookup;
use crate::proxy::{Attempt, Logged, Note};
use crate::router::Target;
use crate::upstream::{Pool, QueueError, Server};
use crate::{Inner, Shared};

/// Headers parsed per head at most (hyper's limit too); more goes to hyper, which refuses it.
pub(crate) const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole, then sent; larger ones go to hyper, which
/// streams them.
pub(crate) const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// Bytes read at a time.
const READ_SIZE: usize = 16 * 1024;
/// A server's answer head may be this long (about what hyper's client allows).
const MAX_RESPONSE_HEAD: usize = 400 * 1024;
/// Idle upstream connections kept per server, and for how long.
const MAX_IDLE_PER_SERVER: usize = 1024;
const IDLE_UPSTREAM: Duration = Duration::from_secs(90);

/// Serves a client connection: requests on the fast path while they qualify, then (if one
/// does not) the rest of the connection through hyper (`crate::serve_connection`).
pub(crate) async fn serve<I>(
    inner: Arc<Inner>,
    io: I,
    peer: SocketAddr,
    tls: bool,
    state: Arc<ConnState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, max_head, send_timeout) = {
        let shared = inner.current.load();
        let server = &shared.config.server;
        (
            server.header_timeout,
            server.max_header_bytes,
            server.idle_timeout,
        )
    };
    // The janitor wakes this task to close the connection; its waker lasts as long as it.
    std::future::poll_fn(|cx| {
        state.waker.register(cx.waker());
        Poll::Ready(())
    })
    .await;
    let mut client = Client {
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
        state: &state,
        send_timeout,
        peer_ip: peer.ip().to_string(),
    };
    let mut scratch = Scratch::default();
    // The first head must arrive within the header timeout of the connection's start.
    let mut first_by = Some(Instant::now() + header_timeout);
    let rest = loop {
        let head = match client
            .read_head(first_by.take(), header_timeout, max_head)
            .await
        {
            Read::Head(head) => head,
            Read::Closed => return,
            Read::TimedOut => {
                tracing::debug!(%peer, "no complete request head within the header timeout; closed");
                return;
            }
            Read::Other => break None,
        };
        let shared = inner.current.load_full();
        match exchange(&inner, &shared, &mut client, &head, peer, tls, &mut scratch).await {
            Next::KeepAlive => {
                // A large request or answer may have grown the buffers: an idle connection
                // keeps no more than a small one's.
                if client.buf.is_empty() && client.buf.capacity() > 4 * READ_SIZE {
                    client.buf = BytesMut::with_capacity(READ_SIZE);
                }
                scratch.trim();
            }
            Next::Close => {
                // Bounded: over TLS, shutting down writes what is pending, which a client that
                // stopped reading would never take.
                let _ = tokio::time::timeout(send_timeout, client.io.shutdown()).await;
                return;
            }
            Next::HandOver => break Some(head),
        }
    };
    // Hyper serves the rest, starting with the bytes read and not served.
    let Client { io, buf, .. } = client;
    let replay = match rest {
        None => buf.freeze(),
        Some(head) => {
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(&buf);
            all.freeze()
        }
    };
    crate::serve_connection(inner, io, replay, peer, tls, state).await;
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// The request (not served) and the rest of the connection go to hyper.
    HandOver,
}

/// What reading a request head came to.
enum Read {
    Head(Bytes),
    /// The client closed (or the gateway asked the connection to wind down) between requests.
    Closed,
    TimedOut,
    /// Not a head the fast path takes (too long): hyper's.
    Other,
}

/// Buffers reused from request to request.
#[derive(Default)]
struct Scratch {
    /// The head sent upstream.
    up: Vec<u8>,
    /// What goes to the client next.
    out: Vec<u8>,
    /// What the server sent.
    upstream: BytesMut,
}

impl Scratch {
    /// Gives back what a large message made the buffers grow to.
    fn trim(&mut self) {
        const KEEP: usize = 4 * READ_SIZE;
        if self.up.capacity() > KEEP {
            self.up = Vec::new();
        }
        if self.out.capacity() > KEEP {
            self.out = Vec::new();
        }
        if self.upstream.capacity() > KEEP {
            self.upstream = BytesMut::new();
        }
    }
}

/// The client side of a connection.
struct Client<'s, I> {
    io: I,
    /// Read and not yet used.
    buf: BytesMut,
    state: &'s ConnState,
    /// A client that takes none of an answer's bytes for this long is cut off (nginx's
    /// `send_timeout`; the server's `idle_timeout`).
    send_timeout: Duration,
    /// The client's address as `X-Forwarded-For` gives it.
    peer_ip: String,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Client<'_, I> {
    /// Reads more into `buf`: the number of bytes, 0 at the end of the stream, or (between
    /// requests, `between`) 0 at once if the connection is asked to wind down while nothing
    /// is buffered.
    async fn fill(&mut self, between: bool) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        let Client { io, buf, state, .. } = self;
        let n = std::future::poll_fn(|cx| {
            if between && buf.is_empty() && state.close.load(Ordering::Acquire) {
                return Poll::Ready(Ok(0));
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
        })
        .await?;
        if n > 0 {
            state.activity.fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Reads until `buf` holds a whole request head, and takes it out. The head must be
    /// complete by `deadline` if there is one, else within `header_timeout` of its first byte.
    async fn read_head(
        &mut self,
        mut deadline: Option<Instant>,
        header_timeout: Duration,
        max_head: usize,
    ) -> Read {
        // Where the search for the head's end goes on from (bytes before it were searched):
        // a head trickling in is searched once, not once per read.
        let mut searched: usize = 0;
        loop {
            // Empty lines before a request line are ignored (RFC 9112 §2.2): some clients
            // send a CRLF after a body. They start the head's deadline like any other byte,
            // so a client cannot hold the connection by sending blank lines.
            let blank = self
                .buf
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            if blank > 0 {
                self.buf.advance(blank);
                searched = searched.saturating_sub(blank);
                if deadline.is_none() {
                    deadline = Some(Instant::now() + header_timeout);
                }
            }
            if let Some(end) = head_end(&self.buf[searched..]).map(|end| searched + end) {
                if end > max_head {
                    return Read::Other;
                }
                return Read::Head(self.buf.split_to(end).freeze());
            }
            if self.buf.len() > max_head {
                return Read::Other;
            }
            // The end's first newline may be among the last two bytes.
            searched = self.buf.len().saturating_sub(2);
            if deadline.is_none() && !self.buf.is_empty() {
                deadline = Some(Instant::now() + header_timeout);
            }
            let read = match deadline {
                None => self.fill(true).await,
                Some(by) => match tokio::time::timeout_at(by, self.fill(true)).await {
                    Ok(read) => read,
                    Err(_) => return Read::TimedOut,
                },
            };
            match read {
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            }
        }
    }

    /// Reads until `buf` holds `len` bytes (a request body), within `timeout`.
    async fn read_body(&mut self, len: usize, timeout: Duration) -> Result<Bytes, &'static str> {
        let by = Instant::now() + timeout;
        while self.buf.len() < len {
            match tokio::time::timeout_at(by, self.fill(false)).await {
                Err(_) => return Err("timed out"),
                Ok(Ok(0) | Err(_)) => return Err("closed"),
                Ok(Ok(_)) => {}
            }
        }
        Ok(self.buf.split_to(len).freeze())
    }

    /// Writes all of `bytes` and flushes them (TLS buffers what it encrypts), failing if the
    /// client takes nothing for `send_timeout`. A timer is set only when a write has to wait.
    async fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
        while !bytes.is_empty() {
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut self.io).poll_write(cx, bytes))
            })
            .await;
            let n = match ready {
                Poll::Ready(n) => n?,
                Poll::Pending => tokio::time::timeout(self.send_timeout, self.io.write(bytes))
                    .await
                    .map_err(|_| stalled())??,
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
            self.state.activity.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::timeout(self.send_timeout, self.io.flush())
            .await
            .map_err(|_| stalled())?
    }
}

/// Where the request head in `buf` ends (after its empty line), if it is all there.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = buf[from..].iter().position(|b| *b == b'\n') {
        let nl = from + at;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => from = nl + 1,
        }
    }
    None
}

/// A `Content-Length` value: decimal digits only (no sign, no spaces inside), at most 19.
fn digits(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a request target is one the `http` crate takes as it is (what hyper would route
/// on): no fragment, only the characters it allows in a path and a query, ASCII only.
/// Others go to hyper, which refuses or cuts them.
fn plain_target(target: &str) -> bool {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, query),
        None => (target, ""),
    };
    let in_path =
        |b: &u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E);
    let in_query = |b: &u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E);
    path.as_bytes().iter().all(in_path) && query.as_bytes().iter().all(in_query)
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Headers that stay on their hop in either direction (`Transfer-Encoding` aside: an answer's
/// is relayed with its body as it was framed).
fn hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Request headers not copied upstream: hop-by-hop ones, and those the gateway writes itself.
fn dropped_upstream(name: &str) -> bool {
    const NAMES: [&str; 5] = [
        "transfer-encoding",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    hop_by_hop(name) || NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether header `name` is among those the `Connection` headers name.
fn named_by(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|v| has_token(v, name))
}

/// The request as the fast path serves it, once it qualifies.
pub(crate) struct Request<'h> {
    pub(crate) method: Method,
    /// What the client asked for (path and query), as sent.
    pub(crate) target: &'h str,
    pub(crate) host: Option<&'h str>,
    pub(crate) headers: &'h [httparse::Header<'h>],
    pub(crate) length: Option<u64>,
    pub(crate) keep_alive: bool,
}

/// Serves one request from `head`, or says it is hyper's.
async fn exchange<I: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    shared: &Shared,
    client: &mut Client<'_, I>,
    head: &Bytes,
    peer: SocketAddr,
    tls: bool,
    scratch: &mut Scratch,
) -> Next {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(req) = parse(head, &mut parsed) else {
        return Next::HandOver;
    };
    let (path, query) = match req.target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (req.target, None),
    };
    let Ok(path) = crate::proxy::normalize_path(path) else {
        return Next::HandOver;
    };
    let Some((route_index, route)) = shared
        .router
        .find(&req.method, req.host, &path, req.headers)
    else {
        return Next::HandOver;
    };
    let Target::Upstream(pool_index) = route.target else {
        return Next::HandOver;
    };
    let pool = &shared.pools[pool_index];
    if pool.h2 || pool.sticky_cookie.is_some() || route.cache.is_some() {
        return Next::HandOver;
    }

    // From here on the request is the fast path's: filters count it.
    let _busy = Busy::new(client.state);
    let started = Instant::now();
    let at = shared.access.as_ref().map(|_| SystemTime::now());
    let mut note = Note {
        route: Some(route_index),
        ..Note::default()
    };
    let keep_alive = req.keep_alive;
    let admitted = crate::proxy::admit(
        route,
        &shared.config.server,
        peer,
        req.headers,
        req.target.len(),
        req.length,
        &path,
    );
    let done = match admitted {
        Err(refusal) => {
            // The body goes unread: skipped if it is all here, else the connection closes
            // (its bytes would be taken for the next request).
            let len = req.length.unwrap_or(0) as usize;
            let skipped = client.buf.len() >= len;
            if skipped {
                client.buf.advance(len);
            }
            refuse(client, refusal, keep_alive && skipped, &mut scratch.out).await
        }
        Ok(claims) => {
            let target = route.rewrite(&path, query);
            let has_host = upstream_head(
                &mut scratch.up,
                &req,
                &target,
                &client.peer_ip,
                tls,
                route.auth.as_ref(),
                &claims,
            );
            let timeout = route.timeout.unwrap_or(pool.response_timeout);
            let body = match req.length {
                None | Some(0) => Ok(Bytes::new()),
                Some(len) => client.read_body(len as usize, timeout).await,
            };
            match body {
                Err(why) => {
                    let error = GatewayError::new(
                        ErrorKind::RequestTimeout,
                        format!("the request body was not received: {why}"),
                    );
                    refuse(client, error, false, &mut scratch.out).await
                }
                Ok(body) => {
                    let forward = Forward {
                        pool,
                        peer,
                        headers: req.headers,
                        replayable: crate::proxy::is_idempotent(&req.method) && body.is_empty(),
                        head_request: req.method == Method::HEAD,
                        has_host,
                        body,
                        timeout,
                    };
                    forward.run(client, scratch, keep_alive, &mut note).await
                }
            }
        }
    };
    let logged = at.map(|at| Logged {
        at,
        method: req.method.as_str(),
        host: req.host,
        target: req.target,
    });
    let elapsed = done.at.saturating_duration_since(started);
    crate::proxy::account(inner, shared, note, peer, done.status, elapsed, logged);
    if done.keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Parses a request head the fast path takes: HTTP/1.1, origin-form target, no upgrade, no
/// `Expect`, and a body that is absent or of one declared length of at most
/// [`MAX_BUFFERED_BODY`].
pub(crate) fn parse<'h>(
    head: &'h [u8],
    parsed: &'h mut [httparse::Header<'h>],
) -> Option<Request<'h>> {
    let mut req = httparse::Request::new(parsed);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    if req.version != Some(1) {
        return None;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return None;
    };
    // (The `http` crate takes targets up to 65,534 bytes; longer ones are hyper's to refuse.)
    if !target.starts_with('/')
        || method == "CONNECT"
        || target.len() > 65_534
        || !plain_target(target)
    {
        return None;
    }
    // A missing, repeated or listed Host is refused on the hyper path, with every other
    // request that is not well formed.
    if crate::headers::host_fault(&*req.headers, true).is_some() {
        return None;
    }
    let mut length = None;
    let mut keep_alive = true;
    let mut host = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = digits(h.value);
            // Twice (even alike) is hyper's to refuse, with `framing`.
            if length.is_some() || n.is_none_or(|n| n > MAX_BUFFERED_BODY) {
                return None;
            }
            length = n;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive &= !has_token(h.value, "close");
        } else if name.eq_ignore_ascii_case("host") && host.is_none() {
            // As `HeaderValue::to_str` takes it: visible ASCII only.
            if !h
                .value
                .iter()
                .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
            {
                return None;
            }
            host = std::str::from_utf8(h.value)
                .ok()
                .map(crate::proxy::strip_port);
        }
    }
    Some(Request {
        method: Method::from_bytes(method.as_bytes()).ok()?,
        target,
        host,
        headers: req.headers,
        length,
        keep_alive,
    })
}

/// Writes the head sent upstream (without its final empty line and any `Host`, which are the
/// attempt's: see [`Forward::request`]) into `up`.
fn upstream_head(
    up: &mut Vec<u8>,
    req: &Request<'_>,
    target: &str,
    peer_ip: &str,
    tls: bool,
    auth: Option<&crate::auth::Auth>,
    claims: &[(&HeaderName, http::HeaderValue)],
) -> bool {
    use std::io::Write as _;
    up.clear();
    up.extend_from_slice(req.method.as_str().as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    static CONNECTION: HeaderName = header::CONNECTION;
    let connection: Vec<&[u8]> = req.headers.all(&CONNECTION).collect();
    let mut forwarded_for = None;
    let mut host = false;
    for h in req.headers {
        let named = named_by(&connection, h.name);
        if dropped_upstream(h.name)
            || named
            || auth.is_some_and(|a| {
                a.claim_headers()
                    .any(|n| n.as_str().eq_ignore_ascii_case(h.name))
            })
        {
            if forwarded_for.is_none() && !named && h.name.eq_ignore_ascii_case("x-forwarded-for") {
                forwarded_for = Some(h.value);
            }
            continue;
        }
        host |= h.name.eq_ignore_ascii_case("host");
        up.extend_from_slice(h.name.as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(h.value);
        up.extend_from_slice(b"\r\n");
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = forwarded_for {
        up.extend_from_slice(prior);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(peer_ip.as_bytes());
    up.extend_from_slice(b"\r\n");
    up.extend_from_slice(if tls {
        b"x-forwarded-proto: https\r\n"
    } else {
        b"x-forwarded-proto: http\r\n"
    });
    if let Some(host) = req.host {
        up.extend_from_slice(b"x-forwarded-host: ");
        up.extend_from_slice(host.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    for (name, value) in claims {
        up.extend_from_slice(name.as_str().as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(value.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    if let Some(len) = req.length {
        let _ = write!(up, "content-length: {len}\r\n");
    }
    host
}

/// How a request ended.
struct Done {
    /// The status the client got.
    status: StatusCode,
    /// Whether the connection stays open.
    keep_alive: bool,
    /// When the answer's head was ready: the metrics and the access log time a request to
    /// there, as on the hyper path.
    at: Instant,
}

/// Answers a request with the gateway's error (the connection stays open if `keep_alive`,
/// the error allows it, and the answer was written whole).
async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<'_, I>,
    error: GatewayError,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Done {
    use std::io::Write as _;
    let at = Instant::now();
    let keep_alive = keep_alive && !error.closes() && !client.state.close.load(Ordering::Acquire);
    let body = error.body();
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: {}\r\n",
        error.status(),
        body.len(),
        httpdate::fmt_http_date(SystemTime::now())
    );
    if let Some((name, value)) = error.header() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    let written = client.write(out).await.is_ok();
    Done {
        status: error.status(),
        keep_alive: keep_alive && written,
        at,
    }
}

/// One request's way to the servers of a pool (what `proxy::Upstream` is to the hyper path).
struct Forward<'a> {
    pool: &'a Pool,
    peer: SocketAddr,
    headers: &'a [httparse::Header<'a>],
    /// A bodiless idempotent request: it may be sent again after a failed attempt.
    replayable: bool,
    head_request: bool,
    /// Whether the head sent upstream has a `Host` (else the server's address is sent).
    has_host: bool,
    body: Bytes,
    timeout: Duration,
}

/// Why an attempt got no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// None at all (refused, or lost before the answer): another server may be tried.
    NoAnswer(String),
    /// Not within the response timeout.
    TimedOut(String),
    /// The answer was not HTTP/1 the gateway can relay.
    Bad(String),
}

impl From<Failure> for GatewayError {
    fn from(failure: Failure) -> GatewayError {
        match failure {
            // Nothing was relayed: another server may be tried.
            Failure::NoAnswer(detail) | Failure::Bad(detail) => GatewayError::no_answer(detail),
            Failure::TimedOut(detail) => GatewayError::new(ErrorKind::UpstreamTimeout, detail),
        }
    }
}

/// How a server frames an answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// An answer head, relayed.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) framing: Framing,
    /// Whether the server keeps the connection open after the answer.
    pub(crate) reusable: bool,
}

impl Forward<'_> {
    /// Waits for a slot in the pool's queue, sends the request to a server (and to others
    /// while that is safe), and relays the answer. A client that goes away while its request
    /// waits for an answer has it abandoned (status 499, nginx's "client closed request").
    async fn run<I: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut Client<'_, I>,
        scratch: &mut Scratch,
        keep_alive: bool,
        note: &mut Note,
    ) -> Done {
        let pool = self.pool;
        let slot = match &pool.queue {
            None => None,
            Some(queue) => match queue.enter().await {
                Ok(permit) => Some(permit),
                Err(e) => {
                    let detail = match e {
                        QueueError::Full(size) => format!(
                            "upstream {:?} is at capacity and {size} requests already wait",
                            pool.name
                        ),
                        QueueError::TimedOut(wait) => {
                            format!("upstream {:?} had no free slot within {wait:?}", pool.name)
                        }
                    };
                    let refusal = GatewayError::new(ErrorKind::UpstreamBusy, detail);
                    return refuse(client, refusal, keep_alive, &mut scratch.out).await;
                }
            },
        };
        let servers = pool.servers();
        let mut attempts: Attempts<'_, usize, GatewayError> =
            Attempts::new(&pool.budget, pool.max_attempts, None, &pool.retries);
        loop {
            // One reading of the clock serves the balancer, the attempt's start, its deadline
            // and the idle connection's age.
            let now = Instant::now();
            let Some(index) = pool.pick(
                &servers,
                self.peer.ip(),
                self.headers,
                attempts.tried(),
                now,
            ) else {
                break;
            };
            if let Err(give_up) = attempts.start() {
                let error = crate::upstream::not_retried(give_up);
                return refuse(client, error, keep_alive, &mut scratch.out).await;
            }
            let server = &servers[index];
            let mut attempt = Attempt::start(pool, &servers, server, note, now);
            // A graceful stop that began meanwhile closes the connection after this answer.
            let keep_alive = keep_alive && !client.state.close.load(Ordering::Acquire);
            let asked = tokio::time::timeout_at(
                now + self.timeout,
                self.ask(
                    server,
                    &scratch.up,
                    &mut scratch.upstream,
                    &mut scratch.out,
                    keep_alive,
                    now,
                ),
            );
            let Some(asked) = unless_gone(client, asked).await else {
                // (The attempt, dropped unfinished, says nothing against the server.)
                tracing::debug!(peer = %self.peer, "client went away before the answer");
                return Done {
                    status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                    keep_alive: false,
                    at: Instant::now(),
                };
            };
            let asked = asked
                .unwrap_or_else(|_| {
                    Err(Failure::TimedOut(format!(
                        "{} did not answer within {:?}",
                        server.address, self.timeout
                    )))
                })
                .map_err(GatewayError::from);
            let (status, outcome) =
                crate::upstream::attempt_outcome(&asked, |(answer, _)| answer.status);
            let answered = Instant::now();
            let elapsed = answered.duration_since(attempt.started);
            pool.responses.record(status, elapsed);
            attempt.elapsed = Some(elapsed);
            attempt.outcome = Some(outcome);
            drop(attempt);
            let failure = match asked {
                Ok((answer, stream)) => {
                    // Counted until the answer's head is in, as on the hyper path.
                    drop(slot);
                    let kept = keep_alive && answer.framing != Framing::Close;
                    let relayed = self
                        .relay(client, scratch, &answer, stream, server, answered)
                        .await;
                    return Done {
                        status: answer.status,
                        keep_alive: kept && relayed,
                        at: answered,
                    };
                }
                Err(failure) => failure,
            };
            if failure.retry_safe() && self.replayable {
                tracing::debug!(upstream = %pool.name, error = %failure, "no answer");
                if let Err(give_up) = attempts.retry(index, failure) {
                    let error = crate::upstream::not_retried(give_up);
                    return refuse(client, error, keep_alive, &mut scratch.out).await;
                }
            } else {
                return refuse(client, failure, keep_alive, &mut scratch.out).await;
            }
        }
        let error = attempts
            .take_last_error()
            .unwrap_or_else(|| crate::upstream::no_healthy_server(pool));
        refuse(client, error, keep_alive, &mut scratch.out).await
    }

    /// The request's bytes for `server`: the head, `Host` if the client sent none, and the
    /// body.
    fn request(&self, head: &[u8], server: &Server, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(head);
        if !self.has_host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(server.address.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
    }

    /// Sends the request to `server` (on an idle connection, or a new one) and reads the
    /// answer's head; `out` then holds the head for the client. A reused connection the
    /// server had closed is replaced by a new one when the request can be sent again.
    async fn ask(
        &self,
        server: &Server,
        head: &[u8],
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
        keep_alive: bool,
        now: Instant,
    ) -> Result<(Answer, TcpStream), Failure> {
        self.request(head, server, out);
        loop {
            let (mut stream, reused) = match server.idle.take(now) {
                Some(stream) => (stream, true),
                None => (self.connect(server).await?, false),
            };
            buf.clear();
            let lost = |e: &dyn std::fmt::Display| {
                Failure::NoAnswer(format!(
                    "{}: connection lost before the answer: {e}",
                    server.address
                ))
            };
            if let Err(e) = stream.write_all(out).await {
                if reused && self.replayable {
                    continue;
                }
                return Err(lost(&e));
            }
            match read_answer(&mut stream, buf, self.head_request, keep_alive, out).await {
                Ok(answer) => return Ok((answer, stream)),
                Err(Failure::NoAnswer(_)) if reused && self.replayable && buf.is_empty() => {
                    // The server had closed this idle connection: a new one.
                    self.request(head, server, out);
                }
                Err(Failure::NoAnswer(e)) => return Err(lost(&e)),
                Err(other) => return Err(other),
            }
        }
    }

    async fn connect(&self, server: &Server) -> Result<TcpStream, Failure> {
        let connect_timeout = self.pool.config.connect_timeout;
        match tokio::time::timeout(connect_timeout, TcpStream::connect(server.address.as_str()))
            .await
        {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) => Err(Failure::NoAnswer(format!("{}: {e}", server.address))),
            Err(_) => Err(Failure::NoAnswer(format!(
                "{}: no connection within {connect_timeout:?}",
                server.address
            ))),
        }
    }

    /// Relays the answer whose head is in `scratch.out` and whose first body bytes are in
    /// `scratch.upstream`; keeps the server connection for reuse if it is clean (its idle time
    /// counted from `answered`, when the head came, which errs on the young side). Whether the
    /// client's connection is still usable.
    async fn relay<I: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut Client<'_, I>,
        scratch: &mut Scratch,
        answer: &Answer,
        mut stream: TcpStream,
        server: &Server,
        answered: Instant,
    ) -> bool {
        let Scratch {
            out, upstream: buf, ..
        } = scratch;
        let mut chunked = Chunked::new(MAX_RESPONSE_HEAD);
        let mut left = match answer.framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        // Bytes past the end of the answer: the connection is not clean.
        let mut surplus = false;
        loop {
            // Move what the server sent (up to the end of the answer) to `out`.
            let take = match answer.framing {
                Framing::Length(_) => {
                    let n = left.min(buf.len() as u64) as usize;
                    left -= n as u64;
                    n
                }
                Framing::Chunked => match chunked.feed(buf) {
                    ChunkedEnd::No => buf.len(),
                    ChunkedEnd::At(n) => {
                        left = 0;
                        n
                    }
                    ChunkedEnd::Invalid => {
                        tracing::debug!(server = %server.address, "answer with a bad chunked body; cut");
                        let _ = client.write(out).await;
                        return false;
                    }
                },
                Framing::Close => buf.len(),
            };
            out.extend_from_slice(&buf[..take]);
            buf.advance(take);
            surplus |= left == 0 && !buf.is_empty();
            if !out.is_empty() {
                if client.write(out).await.is_err() {
                    return false;
                }
                out.clear();
            }
            if left == 0 {
                break;
            }
            buf.clear();
            if buf.capacity() < READ_SIZE {
                buf.reserve(READ_SIZE);
            }
            let read = tokio::time::timeout(self.timeout, async {
                std::future::poll_fn(|cx| {
                    tokio_util::io::poll_read_buf(Pin::new(&mut stream), cx, &mut *buf)
                })
                .await
            })
            .await;
            match read {
                Ok(Ok(0)) if answer.framing == Framing::Close => return true,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    tracing::debug!(server = %server.address, "server broke off its answer");
                    return false;
                }
                Err(_) => {
                    tracing::debug!(server = %server.address, timeout = ?self.timeout, "server stalled in its answer; cut");
                    return false;
                }
                Ok(Ok(_)) => {}
            }
        }
        if answer.reusable && !surplus {
            server.idle.put(stream, answered);
        }
        true
    }
}

/// Runs `work` while watching the client: if it closes its connection (or it fails) first,
/// gives `work` up (`None`). What it sends meanwhile (pipelined requests) is kept in its
/// buffer, up to [`READ_SIZE`] more bytes.
async fn unless_gone<I: AsyncRead + AsyncWrite + Unpin, F: std::future::Future>(
    client: &mut Client<'_, I>,
    work: F,
) -> Option<F::Output> {
    let bound = client.buf.len() + READ_SIZE;
    let mut work = std::pin::pin!(work);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            out = &mut work => return Some(out),
            read = client.fill(false), if watching => match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => watching = client.buf.len() < bound,
            },
        }
    }
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
            tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf)
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
/// (the body's first bytes stay), and the head for the client is written into `out`.
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

/// The client's copy of an answer head (hop-by-hop headers dropped) into `out`, and how its
/// body is framed (RFC 9112 §6.3).
fn answer_head(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<Answer, Failure> {
    use std::io::Write as _;
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|_| code != 101)
        .ok_or_else(|| Failure::Bad(format!("unexpected status {code}")))?;
    let headers: &[httparse::Header<'_>] = resp.headers;
    static CONNECTION: HeaderName = header::CONNECTION;
    let connection: Vec<&[u8]> = headers.all(&CONNECTION).collect();
    let mut length: Option<u64> = None;
    // Whether the answer has `Transfer-Encoding`, and its last coding over all its headers
    // (a list may be split across headers, and empty elements count for nothing).
    let mut encoding: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = digits(h.value);
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
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        code,
        resp.reason
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
    );
    for h in headers {
        let framing_header = h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding");
        // The length is written below, as the gateway read it; `Connection` cannot take
        // away the headers the body is framed by.
        // `Trailer` announces the trailers a chunked body brings, relayed with it.
        let announces_trailers =
            framing == Framing::Chunked && h.name.eq_ignore_ascii_case("trailer");
        if (hop_by_hop(h.name) && !announces_trailers)
            || (named_by(&connection, h.name) && !framing_header)
            || h.name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let (Some(n), None) = (length, encoding) {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if !keep_alive || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Answer {
        status,
        framing,
        reusable,
    })
}

/// A server's idle keep-alive connections, newest last.
#[derive(Debug, Default)]
pub(crate) struct IdleConns {
    conns: Mutex<std::collections::VecDeque<(TcpStream, Instant)>>,
}

impl IdleConns {
    /// The most recently used idle connection that is still open. Those idle for too long
    /// are closed on the way.
    fn take(&self, now: Instant) -> Option<TcpStream> {
        let mut conns = self.conns.lock();
        while conns
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_UPSTREAM)
        {
            conns.pop_front();
        }
        while let Some((stream, _)) = conns.pop_back() {
            if still_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` (idle from about `since`).
    fn put(&self, stream: TcpStream, since: Instant) {
        let mut conns = self.conns.lock();
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push_back((stream, since));
        }
    }

    /// Closes the connections idle for too long and those the server has closed (so they
    /// do not linger half-closed while the server gets no requests).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.conns.lock().retain(|(stream, since)| {
            now.duration_since(*since) <= IDLE_UPSTREAM && still_open(stream)
        });
    }

    /// Connections kept now.
    pub(crate) fn len(&self) -> usize {
        self.conns.lock().len()
    }
}

/// Whether an idle connection is still open: the server neither closed it nor sent anything
/// (which would be out of turn). Without a syscall unless the socket was reported readable.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_at_their_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"\r\nGET / HTTP/1.1\r\n\r\n"), Some(20));
    }

    #[test]
    fn only_plain_http11_heads_qualify() {
        let qualifies = |head: &[u8]| {
            let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
            parse(head, &mut parsed).is_some()
        };
        assert!(qualifies(b"GET /a?b=1 HTTP/1.1\r\nHost: x:80\r\n\r\n"));
        assert!(qualifies(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(qualifies(
            b"GET /a/%2F-._~!$&'()*+,;=:@?q=/?x&y={z}|1 HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        for head in [
            &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..],
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\n",
            b"GET /api/login#x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a<b> HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a?b=1#x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            // Host missing, repeated or a list: hyper's path refuses it.
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
        ] {
            assert!(!qualifies(head), "{:?}", String::from_utf8_lossy(head));
        }
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse(
            b"GET / HTTP/1.1\r\nHost: Shop.example:8080\r\nConnection: keep-alive, close\r\n\r\n",
            &mut parsed,
        )
        .unwrap();
        assert_eq!(req.host, Some("Shop.example"));
        assert!(!req.keep_alive);
    }

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
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nX-Kept: 2\r\ncontent-length: 5\r\n\r\n"
        );
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
        let (framing, reusable, out) = frame(b"HTTP/1.0 200 OK\r\n\r\n", false);
        assert_eq!((framing, reusable), (Framing::Close, false));
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let (framing, _, _) = frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(framing, Framing::Length(0));
        let (framing, _, _) = frame(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(framing, Framing::Length(0));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
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
