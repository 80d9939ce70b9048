//! The hyper path: a request hyper parsed is planned (`plan`) and served — from a directory,
//! the cache, the RPC bridge, or a server of a pool over hyper's client leg — with its answer
//! streamed back; WebSocket upgrades are tunnelled. [`respond`] also serves what Keel's
//! HTTP/1.1 loop (`fast`) plans for anything but its own leg, so each feature exists once.
//!
//! Errors are JSON `{"error": CODE, "detail": ...}` (see `error`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::bodies::{BodyState, BoxError, ClientBody, ClientFault, DownBody};
use crate::cache;
use crate::error::{ErrorKind, GatewayError};
use crate::forward::{Leg, Logged, Note, account};
use crate::plan::{
    Asked, Forward, Planned, Serve, connection_names, has_token, hop_by_hop, named_by, plan,
    strip_port,
};
use crate::state::{Inner, Shared};
use crate::upstream::{Server, UpBody};

/// The answer to a request with both `Content-Length` and `Transfer-Encoding` (a request
/// smuggling attempt, or a broken client): 400, and the connection closes after it.
pub(crate) fn ambiguous_framing() -> GatewayError {
    GatewayError::new(
        ErrorKind::AmbiguousFraming,
        "the request has both Content-Length and Transfer-Encoding",
    )
    .closing()
}

/// Removes an answer's hop-by-hop headers (those `Connection` names included), as Keel's leg
/// does (`h1`): `Trailer` stays on a chunked answer, whose trailers are relayed.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| has_token(v.as_bytes(), "chunked"));
    let dropped: Vec<HeaderName> = {
        let connection = connection_names(headers);
        headers
            .keys()
            .filter(|name| {
                let name = name.as_str();
                (hop_by_hop(name) && !(chunked && name == "trailer"))
                    || name == "transfer-encoding"
                    || name == "upgrade"
                    || named_by(&connection, name)
            })
            .cloned()
            .collect()
    };
    for name in &dropped {
        headers.remove(name);
    }
}

/// Whether header `name` holds `token` in its comma-separated lists.
fn header_has(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| has_token(v.as_bytes(), token))
}

/// Serves one request, then counts it and logs it.
pub(crate) async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<DownBody> {
    let started = Instant::now();
    let shared = inner.current.load_full();
    // Only what the access log needs is copied, and only when there is one.
    let logged = shared.access.as_ref().map(|_| {
        (
            req.method().clone(),
            req.uri().clone(),
            host_of(&req),
            SystemTime::now(),
        )
    });
    let mut note = Note::default();
    let resp = serve(&inner, &shared, req, peer, tls, &mut note).await;
    let logged = logged.as_ref().map(|(method, uri, host, at)| Logged {
        at: *at,
        method: method.as_str(),
        host: host.as_deref(),
        target: uri.path_and_query().map_or("/", |p| p.as_str()),
    });
    account(
        &inner,
        &shared,
        note,
        peer,
        resp.status(),
        started.elapsed(),
        logged,
    );
    resp
}

/// The request's host without port: `Host`, or the authority of an HTTP/2 request.
fn host_of<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| strip_port(h).to_owned())
}

async fn serve(
    inner: &Arc<Inner>,
    shared: &Shared,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
    note: &mut Note,
) -> Response<DownBody> {
    if req.method() == Method::CONNECT {
        // A reverse proxy tunnels nowhere on request; the connection cannot go on either
        // (the client may already be sending what it meant for the tunnel).
        return GatewayError::new(
            ErrorKind::MethodNotAllowed,
            "CONNECT is not served: this is a reverse proxy",
        )
        .closing()
        .into_response();
    }
    let http1 = matches!(
        req.version(),
        http::Version::HTTP_10 | http::Version::HTTP_11
    );
    if http1
        && let Some(why) =
            crate::headers::host_fault(req.headers(), req.version() == http::Version::HTTP_11)
    {
        return GatewayError::new(ErrorKind::InvalidHost, why)
            .closing()
            .into_response();
    }
    let host = host_of(&req);
    let planned = {
        let asked = Asked {
            method: req.method(),
            host: host.as_deref(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            target_len: req.uri().path_and_query().map_or(0, |p| p.as_str().len()),
            content_length: req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            bodiless: req.body().is_end_stream(),
            peer,
            tls,
        };
        match plan(shared, &asked, &mut note.route) {
            Ok(planned) => planned,
            Err(refusal) => return refusal.into_response(),
        }
    };
    let on_upgrade = (req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && header_has(req.headers(), &header::CONNECTION, "upgrade"))
    .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    respond(
        inner,
        planned,
        parts,
        body,
        on_upgrade,
        host.as_deref(),
        peer,
        note,
    )
    .await
}

/// Serves a planned request (hyper's, or one Keel's HTTP/1.1 loop hands over with its body
/// in hand) from a directory, the RPC bridge, the cache, or a server over hyper's leg.
/// `on_upgrade` is the client's side of a WebSocket upgrade; `host` the host asked for.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn respond<B>(
    inner: &Arc<Inner>,
    planned: Planned<'_>,
    mut parts: Parts,
    body: B,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    host: Option<&str>,
    peer: SocketAddr,
    note: &mut Note,
) -> Response<DownBody>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let forward = match planned.serve {
        Serve::Static { dir, file } => {
            return dir.serve(&parts.method, &file, &parts.headers).await;
        }
        Serve::Rpc {
            bridge,
            method,
            claims,
        } => {
            // The client's own headers of the claims' names go; the verified claims take
            // their place.
            if let Some(auth) = &planned.route.auth {
                for name in auth.claim_headers() {
                    parts.headers.remove(name);
                }
            }
            for (name, value) in claims {
                parts.headers.insert(name.clone(), value);
            }
            return bridge
                .serve(&method, parts, body, peer.ip(), planned.max_body)
                .await;
        }
        Serve::Forward(forward) => forward,
    };
    let pool = forward.pool;
    let upgrade = on_upgrade
        .as_ref()
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    let te_trailers = pool.h2 && header_has(&parts.headers, &header::TE, "trailers");
    edit_headers(&mut parts.headers, &forward, host, peer);
    if let Some(protocol) = upgrade {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // The upstream leg speaks the pool's protocol whatever the client spoke; an HTTP/2
    // request carries its host in the :authority pseudo-header, which becomes Host.
    let client_version = parts.version;
    parts.version = if pool.h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    if pool.h2 {
        // To an HTTP/2 server the request's :authority names that server; a Host naming
        // another would make it malformed (RFC 9113 §8.3.1). X-Forwarded-Host keeps it.
        parts.headers.remove(header::HOST);
    }
    // The client's body is watched on its way, so a failure it causes is answered as the
    // client's (400, 408, 413), not counted against the server. A body without a declared
    // length is counted as it streams (hyper holds a declared one to its length).
    let (body, watched) = if body.is_end_stream() {
        (body.map_err(Into::into).boxed(), None)
    } else {
        let limit = match body.size_hint().exact() {
            Some(_) => u64::MAX,
            None => planned.max_body,
        };
        let watched = ClientBody::new(body, limit);
        let state = watched.state.clone();
        (watched.boxed(), Some(state))
    };
    let up = Upstream {
        inner,
        forward: &forward,
        max_body: planned.max_body,
        peer,
    };
    let Some(cache) = forward.cache.filter(|_| on_upgrade.is_none()) else {
        let resp = up.forward(parts, body, watched, on_upgrade, note).await;
        return downgrade_version(resp, client_version);
    };
    let head = parts.method == Method::HEAD;
    // Answers to authenticated requests may differ per credential: never shared.
    let mut resp = if planned.route.auth.is_some() || cache::bypass(&parts.headers) {
        note.cache = Some("BYPASS");
        let mut resp = up.forward(parts, body, watched, None, note).await;
        cache::mark(&mut resp, "BYPASS");
        resp
    } else {
        let key = format!("{}{}", host.unwrap_or(""), forward.target);
        if let Some(hit) = cache.get(&key) {
            note.cache = Some("HIT");
            return hit.respond(head);
        }
        note.cache = Some("MISS");
        if head {
            up.forward(parts, body, watched, None, note).await
        } else {
            match cache.miss(&key) {
                cache::Miss::Lead(guard) => {
                    let resp = up.forward(parts, body, watched, None, note).await;
                    cache.offer(&guard, resp).await
                }
                cache::Miss::Stored(hit) => {
                    note.cache = Some("HIT");
                    return hit.respond(head);
                }
                cache::Miss::Follow(mut fetching) => {
                    let _ = tokio::time::timeout(forward.timeout, fetching.changed()).await;
                    if let Some(hit) = cache.get(&key) {
                        note.cache = Some("HIT");
                        return hit.respond(head);
                    }
                    up.forward(parts, body, watched, None, note).await
                }
            }
        }
    };
    if !resp.headers().contains_key("x-cache") {
        cache::mark(&mut resp, "MISS");
    }
    downgrade_version(resp, client_version)
}

/// Applies the plan's header edits (the same Keel's leg applies) to a request's headers.
fn edit_headers(
    headers: &mut HeaderMap,
    forward: &Forward<'_>,
    host: Option<&str>,
    peer: SocketAddr,
) {
    let peer_ip = peer.ip().to_string();
    let added: Vec<(HeaderName, HeaderValue)> = forward
        .edits
        .added(&*headers, host, &peer_ip)
        .headers()
        .into_iter()
        .filter_map(|(name, value)| Some((name, HeaderValue::from_bytes(&value).ok()?)))
        .collect();
    let dropped: Vec<HeaderName> = {
        let connection = connection_names(headers);
        headers
            .keys()
            .filter(|name| forward.edits.drops(name.as_str(), &connection))
            .cloned()
            .collect()
    };
    for name in &dropped {
        headers.remove(name);
    }
    for (name, value) in added {
        headers.insert(name, value);
    }
}

/// The answer goes back in the client's HTTP version, whatever the upstream spoke.
fn downgrade_version(mut resp: Response<DownBody>, version: http::Version) -> Response<DownBody> {
    *resp.version_mut() = version;
    resp
}

/// One request's way to the servers of a pool over hyper's leg.
struct Upstream<'a> {
    inner: &'a Arc<Inner>,
    forward: &'a Forward<'a>,
    /// For bodies without a declared length.
    max_body: u64,
    peer: SocketAddr,
}

impl Upstream<'_> {
    /// Forwards the request (see `forward::forward`), then relays the answer: a WebSocket
    /// upgrade is tunnelled, hop-by-hop headers go, a sticky session gets its cookie.
    async fn forward(
        &self,
        parts: Parts,
        body: UpBody,
        watched: Option<Arc<BodyState>>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        note: &mut Note,
    ) -> Response<DownBody> {
        let forward = self.forward;
        let pool = forward.pool;
        let mut leg = HyperLeg {
            parts: &parts,
            target: &forward.target,
            pool,
            body: Some(body),
            watched,
            max_body: self.max_body,
            timeout: forward.timeout,
        };
        let forwarded = crate::forward::forward(
            pool,
            self.peer,
            &parts.headers,
            forward.replayable,
            forward.timeout,
            &mut leg,
            note,
        )
        .await;
        let (mut resp, server) = match forwarded {
            Ok(forwarded) => (forwarded.answer, forwarded.server),
            Err(error) => return error.into_response(),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = on_upgrade
        {
            tunnel(self.inner, client, hyper::upgrade::on(&mut resp));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, empty());
        }
        let (mut parts_out, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts_out.headers);
        if let Some(cookie) = crate::upstream::sticky_cookie(pool, &server, &parts.headers)
            && let Ok(v) = HeaderValue::from_str(&cookie)
        {
            parts_out.headers.append(header::SET_COOKIE, v);
        }
        // One box for the answer's body, not one per layer.
        let body = crate::bodies::Stalled::new(body, forward.timeout);
        Response::from_parts(parts_out, body.boxed())
    }
}

/// An error with its causes, `a: b: c`: hyper's client says what went wrong only in its
/// sources ("client error (SendRequest)" alone says nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A request on hyper's client leg.
struct HyperLeg<'a> {
    parts: &'a Parts,
    target: &'a str,
    pool: &'a crate::upstream::Pool,
    /// The body, until an attempt takes it (only a bodiless request is sent twice).
    body: Option<UpBody>,
    /// How the client's body went, if it has one.
    watched: Option<Arc<BodyState>>,
    max_body: u64,
    timeout: Duration,
}

impl Leg for HyperLeg<'_> {
    type Answer = Response<Incoming>;

    async fn send(
        &mut self,
        server: &Arc<Server>,
        _now: Instant,
    ) -> Result<Response<Incoming>, GatewayError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(server.authority.clone())
            .path_and_query(self.target)
            .build()
            .map_err(|e| {
                GatewayError::new(
                    ErrorKind::InvalidRequest,
                    format!("cannot forward path {:?}: {e}", self.target),
                )
            })?;
        let mut up = Request::from_parts(self.parts.clone(), ());
        *up.uri_mut() = uri;
        let body: UpBody = match self.body.take() {
            Some(b) => b,
            None => Empty::new().map_err(|e| match e {}).boxed(),
        };
        self.pool
            .client
            .request(up.map(|()| body))
            .await
            .map_err(|e| GatewayError::no_answer(format!("{}: {}", server.address, chain(&e))))
    }

    fn status(answer: &Response<Incoming>) -> StatusCode {
        answer.status()
    }

    fn client_fault(&self, timed_out: bool) -> Option<GatewayError> {
        let fault = self.watched.as_ref()?.fault(timed_out)?;
        let error = match fault {
            ClientFault::TooLarge => GatewayError::new(
                ErrorKind::BodyTooLarge,
                format!("the body is over the limit of {} bytes", self.max_body),
            ),
            ClientFault::Broken => GatewayError::new(
                ErrorKind::InvalidBody,
                "the request body was cut short or is badly framed",
            ),
            ClientFault::Incomplete => GatewayError::new(
                ErrorKind::RequestTimeout,
                format!(
                    "the request body was not received whole within {:?}",
                    self.timeout
                ),
            ),
        };
        // The rest of the body is in an unknown state: the connection cannot carry another
        // request.
        Some(error.closing())
    }
}

fn empty() -> DownBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// Joins the client's and the server's upgraded connections and copies bytes both ways until
/// either side closes, no byte has crossed either way for the server's `idle_timeout_ms` (as
/// nginx's `proxy_read_timeout` ends an idle WebSocket), or the gateway stops; the tunnel
/// counts as an open connection.
fn tunnel(
    inner: &Arc<Inner>,
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let inner = inner.clone();
    inner.metrics.connections.open.fetch_add(1, Relaxed);
    let idle = inner.current.load().config.server.idle_timeout;
    tokio::spawn(async move {
        let activity = Activity::new();
        let copy = async {
            match tokio::try_join!(client, server) {
                Ok((client, server)) => {
                    let mut client = Active::new(TokioIo::new(client), &activity);
                    let mut server = Active::new(TokioIo::new(server), &activity);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                        tracing::debug!(error = %e, "upgraded connection ended with an error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        };
        tokio::select! {
            () = copy => {}
            () = activity.idle_for(idle) => {
                tracing::debug!(?idle, "idle tunnel closed");
            }
            () = inner.stopping.cancelled() => {}
        }
        inner.metrics.connections.open.fetch_sub(1, Relaxed);
    });
}

/// When bytes last crossed a tunnel.
#[derive(Clone)]
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: Arc::default(),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns once nothing has crossed for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start
                + Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
            let deadline = last + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An upgraded connection that records its traffic in an [`Activity`].
struct Active<T> {
    io: T,
    activity: Activity,
}

impl<T> Active<T> {
    fn new(io: T, activity: &Activity) -> Active<T> {
        Active {
            io,
            activity: activity.clone(),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
