//! Keel's HTTP/1.1 front end: the request loop of a client connection speaking plain
//! HTTP/1.1, without hyper.
//!
//! One task per client connection reads a request head with `httparse`, has it planned
//! (`plan`: route, filters, what serves it) on the parsed headers where they lie (no header
//! map), and serves it: to a pool over Keel's HTTP/1.1 leg (`h1`), the answer relayed as it
//! is framed (`Content-Length` or chunked as sent, a close-delimited body chunked), all from
//! that task — no task per upstream connection, no channels between tasks. Whatever else the
//! plan says (a directory, the cache, the RPC bridge, a pool reached over hyper's leg) is
//! served by the same code the hyper path uses (`proxy::respond`), and its answer written
//! here.
//!
//! What this loop does not speak goes to hyper, which then serves the rest of the connection:
//! the bytes already read are replayed to it (`front::serve_connection`), so the hand-over is
//! seamless at any request boundary. That is a matter of protocol only — HTTP/2 (h2c prior
//! knowledge), HTTP/1.0, upgrades (WebSocket), `Expect`, chunked or large request bodies
//! (streamed by hyper), and any head that is not plain (ambiguous framing, bad syntax, too
//! large: hyper and `framing` refuse those). A head goes over before it is planned, so no
//! filter runs twice.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::bodies::DownBody;
use crate::config::UpstreamLeg;
use crate::conns::{Busy, ConnState};
use crate::error::{ErrorKind, GatewayError};
use crate::forward::{Forwarded, Logged, Note};
use crate::framing::{Chunked, ChunkedEnd};
use crate::h1::{Answer, Framing, H1Leg, MAX_RESPONSE_HEAD, READ_SIZE};
use crate::plan::{Asked, Planned, Serve, has_token, plan};
use crate::state::{Inner, Shared};
use crate::upstream::Server;

pub(crate) use crate::h1::MAX_HEADERS;

/// Request bodies up to this size with a declared length are read whole, then served; larger
/// ones, and chunked ones, go to hyper, which streams them.
pub(crate) const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// Serves a client connection: requests on the fast path while they qualify, then (if one
/// does not) the rest of the connection through hyper (`front::serve_connection`).
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
        // Pinned where it is made: a request's future is large, and awaiting it by value
        // would copy it once per request.
        let exchanged = {
            let exchanging = std::pin::pin!(exchange(
                &inner,
                &shared,
                &mut client,
                &head,
                peer,
                tls,
                &mut scratch
            ));
            exchanging.await
        };
        match exchanged {
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
    crate::front::serve_connection(inner, io, replay, peer, tls, state).await;
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
    inner: &Arc<Inner>,
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
    let _busy = Busy::new(client.state);
    let started = Instant::now();
    let at = shared.access.as_ref().map(|_| SystemTime::now());
    let mut note = Note::default();
    let asked = Asked {
        method: &req.method,
        host: req.host,
        path,
        query,
        headers: req.headers,
        target_len: req.target.len(),
        content_length: req.length,
        bodiless: req.length.unwrap_or(0) == 0,
        peer,
        tls,
    };
    let done = match plan(shared, &asked, &mut note.route) {
        Err(refusal) => {
            // The body goes unread: skipped if it is all here, else the connection closes
            // (its bytes would be taken for the next request).
            let len = req.length.unwrap_or(0) as usize;
            let skipped = client.buf.len() >= len;
            if skipped {
                client.buf.advance(len);
            }
            refuse(client, refusal, req.keep_alive && skipped, &mut scratch.out).await
        }
        Ok(planned) => {
            let serving = std::pin::pin!(serve_planned(
                inner, shared, client, &req, planned, peer, scratch, &mut note,
            ));
            serving.await
        }
    };
    let logged = at.map(|at| Logged {
        at,
        method: req.method.as_str(),
        host: req.host,
        target: req.target,
    });
    let elapsed = done.at.saturating_duration_since(started);
    crate::forward::account(inner, shared, note, peer, done.status, elapsed, logged);
    if done.keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Serves an admitted request as planned: over Keel's HTTP/1.1 leg when the plan says so,
/// else through what the hyper path serves with ([`crate::proxy::respond`]), its answer
/// written here.
#[allow(clippy::too_many_arguments)]
async fn serve_planned<I: AsyncRead + AsyncWrite + Unpin>(
    inner: &Arc<Inner>,
    shared: &Shared,
    client: &mut Client<'_, I>,
    req: &Request<'_>,
    planned: Planned<'_>,
    peer: SocketAddr,
    scratch: &mut Scratch,
    note: &mut Note,
) -> Done {
    let body_timeout = match &planned.serve {
        Serve::Forward(f) => f.timeout,
        _ => planned
            .route
            .timeout
            .unwrap_or(shared.config.server.header_timeout),
    };
    let body = match req.length {
        None | Some(0) => Bytes::new(),
        Some(len) => match client.read_body(len as usize, body_timeout).await {
            Ok(body) => body,
            Err(why) => {
                let error = GatewayError::new(
                    ErrorKind::RequestTimeout,
                    format!("the request body was not received: {why}"),
                );
                return refuse(client, error, false, &mut scratch.out).await;
            }
        },
    };
    let head_request = req.method == Method::HEAD;
    // A graceful stop that began meanwhile closes the connection after this answer.
    let keep_alive = req.keep_alive && !client.state.close.load(Ordering::Acquire);
    let forward = match planned.serve {
        Serve::Forward(f) if f.leg == UpstreamLeg::Raw => f,
        _ => {
            let parts = match request_parts(req) {
                Ok(parts) => parts,
                Err(error) => return refuse(client, error, keep_alive, &mut scratch.out).await,
            };
            let body = http_body_util::Full::new(body);
            // Boxed: this future is large (the cache, the bridge, hyper's client), and inline
            // it would make every connection's task as large.
            let respond = Box::pin(crate::proxy::respond(
                inner, planned, parts, body, None, req.host, peer, note,
            ));
            let Some(resp) = unless_gone(client, respond).await else {
                return gone(peer);
            };
            return write_response(client, resp, keep_alive, head_request, &mut scratch.out).await;
        }
    };
    let has_host = crate::h1::request_head(
        &mut scratch.up,
        &req.method,
        &forward.target,
        req.headers,
        req.host,
        &client.peer_ip,
        &forward.edits,
        req.length,
    );
    let mut leg = H1Leg {
        pool: forward.pool,
        head: &scratch.up,
        has_host,
        body: &body,
        headers: req.headers,
        head_request,
        keep_alive,
        replayable: forward.replayable,
        buf: &mut scratch.upstream,
        out: &mut scratch.out,
    };
    // Pinned where it is made: the future is large, and handing it over by value would
    // copy it.
    let forwarded = {
        let forwarding = std::pin::pin!(crate::forward::forward(
            forward.pool,
            peer,
            req.headers,
            forward.replayable,
            forward.timeout,
            &mut leg,
            note,
        ));
        unless_gone(client, forwarding).await
    };
    let Some(forwarded) = forwarded else {
        // (The attempt, dropped unfinished, says nothing against the server.)
        return gone(peer);
    };
    match forwarded {
        Err(error) => refuse(client, error, keep_alive, &mut scratch.out).await,
        Ok(Forwarded {
            answer: (answer, stream),
            server,
            answered,
        }) => {
            let relayed = relay(
                client,
                scratch,
                &answer,
                stream,
                &server,
                answered,
                forward.timeout,
            )
            .await;
            Done {
                status: answer.status,
                keep_alive: keep_alive && relayed,
                at: answered,
            }
        }
    }
}

/// A request whose client went away before its answer: abandoned (status 499, nginx's
/// "client closed request").
fn gone(peer: SocketAddr) -> Done {
    tracing::debug!(%peer, "client went away before the answer");
    Done {
        status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        keep_alive: false,
        at: Instant::now(),
    }
}

/// The request as `http` types, for what the hyper path serves.
fn request_parts(req: &Request<'_>) -> Result<http::request::Parts, GatewayError> {
    let mut builder = http::Request::builder()
        .method(req.method.clone())
        .uri(req.target)
        .version(http::Version::HTTP_11);
    if let Some(headers) = builder.headers_mut() {
        headers.reserve(req.headers.len());
        for h in req.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) else {
                return Err(GatewayError::new(
                    ErrorKind::InvalidRequest,
                    format!("header {:?} cannot be forwarded", h.name),
                ));
            };
            headers.append(name, value);
        }
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .map_err(|e| GatewayError::new(ErrorKind::InvalidRequest, e.to_string()))
}

/// Writes an answer the hyper path made (a file, a cached or bridged answer, an answer that
/// came over hyper's leg) to the client: its head, then its body as it comes, with its length
/// when known, else chunked (trailers included). Whether the connection stays open.
async fn write_response<I: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<'_, I>,
    resp: http::Response<DownBody>,
    keep_alive: bool,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Done {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    use std::io::Write as _;
    let at = Instant::now();
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let keep_alive = keep_alive
        && !parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), "close"));
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    crate::h1::put_decimal(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut dated, mut length) = (false, false);
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        dated |= name == header::DATE;
        length |= name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let chunked = !bodiless && !length && exact.is_none();
    if !bodiless
        && !length
        && let Some(n) = exact
    {
        crate::h1::put_content_length(out, n);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        crate::h1::date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let done = |keep_alive| Done {
        status,
        keep_alive,
        at,
    };
    if bodiless {
        let written = client.write(out).await.is_ok();
        return done(keep_alive && written);
    }
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    if chunked && !data.is_empty() {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else if !chunked {
                        out.extend_from_slice(&data);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Err(e) => {
                tracing::debug!(error = %e, "an answer broke off; the connection is cut");
                let _ = client.write(out).await;
                return done(false);
            }
        }
        // What is there goes out before waiting for more (an answer may stream slowly).
        if !body.is_end_stream() && !out.is_empty() {
            if client.write(out).await.is_err() {
                return done(false);
            }
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    let written = client.write(out).await.is_ok();
    done(keep_alive && written)
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
            let n = crate::h1::digits(h.value);
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
                .map(crate::plan::strip_port);
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
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: ",
        error.status(),
        body.len(),
    );
    crate::h1::date(|d| out.extend_from_slice(d.as_bytes()));
    out.extend_from_slice(b"\r\n");
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

/// Relays the answer over Keel's leg whose head is in `scratch.out` and whose first body
/// bytes are in `scratch.upstream`, a close-delimited body chunked; keeps the server
/// connection for reuse if it is clean (its idle time counted from `answered`, when the head
/// came, which errs on the young side). `timeout` is the longest wait for more of the
/// answer. Whether the client's connection is still usable.
async fn relay<I: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<'_, I>,
    scratch: &mut Scratch,
    answer: &Answer,
    mut stream: TcpStream,
    server: &Server,
    answered: Instant,
    timeout: Duration,
) -> bool {
    use std::io::Write as _;
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
        if answer.framing == Framing::Close {
            if take > 0 {
                let _ = write!(out, "{take:x}\r\n");
                out.extend_from_slice(&buf[..take]);
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(&buf[..take]);
        }
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
        let read = tokio::time::timeout(timeout, async {
            std::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut stream), cx, &mut *buf)
            })
            .await
        })
        .await;
        match read {
            Ok(Ok(0)) if answer.framing == Framing::Close => {
                return client.write(b"0\r\n\r\n").await.is_ok();
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                tracing::debug!(server = %server.address, "server broke off its answer");
                return false;
            }
            Err(_) => {
                tracing::debug!(server = %server.address, ?timeout, "server stalled in its answer; cut");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task holds its request's future: what only the hyper path serves is
    /// boxed, so the task stays small (18 KB before that, 7 KB after, in a test build).
    #[test]
    fn a_connections_task_stays_small() {
        fn size<F>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let config = crate::GatewayConfig::parse("").unwrap();
        let inner = crate::Gateway::new(config).unwrap().inner;
        let (io, _other_end) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let task = serve(inner, io, "127.0.0.1:1".parse().unwrap(), false, state);
        assert!(size(&task) < 12 * 1024, "{} bytes", size(&task));
    }

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
}
