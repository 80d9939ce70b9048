//! The proxy: route the request, apply the route's filters, then serve it from a directory,
//! the cache, or a server of the upstream pool over a pooled keep-alive connection, streaming
//! the answer back.
//!
//! Hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`, `Proxy-*`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade`) are not forwarded in either direction, except
//! `Upgrade` on a WebSocket handshake and `TE: trailers` to an HTTP/2 (gRPC) upstream;
//! `X-Forwarded-For`, `-Proto` and `-Host` are added; the client's `Host` is kept.
//!
//! Errors are JSON `{"error": CODE, "detail": ...}`: 404 `no_route`, 502 `bad_gateway` (the
//! server could not be reached or broke off), 503 `no_healthy_upstream`, 503 `upstream_busy`
//! (the pool's wait queue is full or the wait timed out), 504 `upstream_timeout`, 403
//! `forbidden` (address filter), 429 `rate_limited` (with `Retry-After`), 413
//! `body_too_large`, 414 `uri_too_long`, 401 `unauthenticated`.
//!
//! A request that got no answer from a server (connection refused, or lost before the
//! response) is retried on another one when that is safe: an idempotent method and no body.
//! A server that answers too slowly is not retried (504).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use keel_governance::Attempts;
use keel_governance::endpoint::Outcome;
use tokio::time::Instant;

use crate::bodies::{BoxError, DownBody};
use crate::error::{ErrorKind, GatewayError};
use crate::headers::Lookup;
use crate::router::Target;
use crate::upstream::{Pool, QueueError, UpBody};
use crate::{Inner, Shared, cache};

/// The answer to a request with both `Content-Length` and `Transfer-Encoding` (a request
/// smuggling attempt, or a broken client): 400, and the connection closes after it.
pub(crate) fn ambiguous_framing() -> GatewayError {
    GatewayError::new(
        ErrorKind::AmbiguousFraming,
        "the request has both Content-Length and Transfer-Encoding",
    )
    .closing()
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: look first (comparing names is cheap; each removal hashes).
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == header::UPGRADE)
    {
        return;
    }
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = std::iter::once(connection)
            .chain(headers.get_all(header::CONNECTION).iter().skip(1))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Whether a header holds `token` in its comma-separated list (case-insensitive).
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What the access log and the metrics learn while a request is served.
#[derive(Debug, Default)]
pub(crate) struct Note {
    pub(crate) route: Option<usize>,
    /// The server that answered (or was tried last).
    pub(crate) server: Option<Arc<crate::upstream::Server>>,
    pub(crate) cache: Option<&'static str>,
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

/// What the access log says of a request.
pub(crate) struct Logged<'a> {
    pub(crate) at: SystemTime,
    pub(crate) method: &'a str,
    pub(crate) host: Option<&'a str>,
    /// The path and query the client sent.
    pub(crate) target: &'a str,
}

/// Counts a served request in its route's metrics (or as unrouted) and writes its access log
/// line (`logged` is `Some` when there is an access log).
pub(crate) fn account(
    inner: &Inner,
    shared: &Shared,
    mut note: Note,
    peer: SocketAddr,
    status: StatusCode,
    elapsed: Duration,
    logged: Option<Logged<'_>>,
) {
    match note.route {
        Some(i) => shared.router.routes()[i].metrics.record(status, elapsed),
        None => {
            inner
                .metrics
                .unrouted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if let (Some(access), Some(logged)) = (&shared.access, logged) {
        let server = note.server.take();
        access.write(&crate::access::Entry {
            ts_ms: logged
                .at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            client: peer.ip().to_string(),
            method: logged.method,
            host: logged.host,
            path: logged.target,
            status: status.as_u16(),
            duration_us: elapsed.as_micros() as u64,
            route: note.route.map(|i| shared.router.routes()[i].name.as_str()),
            upstream_server: server.as_ref().map(|s| s.address.as_str()),
            cache: note.cache,
        });
    }
}

/// The request's host without port: `Host`, or the authority of an HTTP/2 request.
fn host_of<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| strip_port(h).to_owned())
}

/// The path routes match and servers get: `%XX` escapes of unreserved characters decoded
/// and runs of slashes merged (so `/%61dmin` and `//admin` are `/admin`, and cannot slip past
/// a route guarding `/admin/`); a `.` or `..` segment, escaped or not, is refused.
pub(crate) fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    let bytes = path.as_bytes();
    let plain = !path.contains('%') && !path.contains("//");
    if plain
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let decoded = hi << 4 | lo;
            if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                out.push(char::from(decoded));
            } else {
                out.push_str(&path[i..i + 3]);
            }
            i += 3;
            continue;
        }
        if b == b'/' && out.ends_with('/') {
            i += 1;
            continue;
        }
        // Copy the whole UTF-8 character (paths are ASCII in practice, but be exact).
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    if out
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(format!("the path {path:?} has a dot segment"));
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`; a bare IPv6 literal is kept whole.
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
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
    let path = match normalize_path(req.uri().path()) {
        Ok(p) => p.into_owned(),
        Err(why) => return GatewayError::new(ErrorKind::InvalidPath, why).into_response(),
    };
    let Some((route_index, route)) =
        shared
            .router
            .find(req.method(), host.as_deref(), &path, req.headers())
    else {
        return GatewayError::new(
            ErrorKind::NoRoute,
            format!("no route for {} {path}", req.method()),
        )
        .into_response();
    };
    note.route = Some(route_index);
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let claims = match admit(
        route,
        &shared.config.server,
        peer,
        req.headers(),
        target_len,
        length,
        &path,
    ) {
        Ok(claims) => claims,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(auth) = &route.auth {
        let headers = req.headers_mut();
        for name in auth.claim_headers() {
            headers.remove(name);
        }
        for (name, value) in claims {
            headers.insert(name.clone(), value);
        }
    }
    let max_body = route
        .max_body_bytes
        .unwrap_or(shared.config.server.max_body_bytes);
    let pool_index = match &route.target {
        Target::Static(dir) => {
            let file = route.rewrite(&path, None);
            return dir.serve(req.method(), &file, req.headers()).await;
        }
        Target::Rpc(bridge) => {
            let method = route.rewrite(&path, None);
            let (parts, body) = req.into_parts();
            return bridge
                .serve(&method, parts, body, peer.ip(), max_body)
                .await;
        }
        Target::Upstream(i) => *i,
    };
    let pool = &shared.pools[pool_index];
    let target = route.rewrite(&path, req.uri().query());

    let on_upgrade = (req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), &header::CONNECTION, "upgrade"))
    .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade = on_upgrade
        .as_ref()
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    let te_trailers = pool.h2 && has_token(&parts.headers, &header::TE, "trailers");
    strip_hop_by_hop(&mut parts.headers);
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
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Some(h) = &host
        && let Ok(v) = HeaderValue::from_str(h)
    {
        parts.headers.insert("x-forwarded-host", v);
    }
    let timeout = route.timeout.unwrap_or(pool.response_timeout);
    if pool.h2 {
        // To an HTTP/2 server the request's :authority names that server; a Host naming
        // another would make it malformed (RFC 9113 §8.3.1). X-Forwarded-Host keeps it.
        parts.headers.remove(header::HOST);
    }
    let up = Upstream {
        inner,
        pool,
        timeout,
        target: &target,
        peer,
        max_body,
    };

    let Some(cache) = route
        .cache
        .as_ref()
        .filter(|_| on_upgrade.is_none() && matches!(parts.method, Method::GET | Method::HEAD))
    else {
        let resp = up.forward(parts, body, on_upgrade, note).await;
        return downgrade_version(resp, client_version);
    };
    let head = parts.method == Method::HEAD;
    // Answers to authenticated requests may differ per credential: never shared.
    let mut resp = if route.auth.is_some() || cache::bypass(&parts.headers) {
        note.cache = Some("BYPASS");
        let mut resp = up.forward(parts, body, None, note).await;
        cache::mark(&mut resp, "BYPASS");
        resp
    } else {
        let key = format!("{}{target}", host.as_deref().unwrap_or(""));
        if let Some(hit) = cache.get(&key) {
            note.cache = Some("HIT");
            return hit.respond(head);
        }
        note.cache = Some("MISS");
        if head {
            up.forward(parts, body, None, note).await
        } else {
            match cache.miss(&key) {
                cache::Miss::Lead(guard) => {
                    let resp = up.forward(parts, body, None, note).await;
                    cache.offer(&guard, resp).await
                }
                cache::Miss::Stored(hit) => {
                    note.cache = Some("HIT");
                    return hit.respond(head);
                }
                cache::Miss::Follow(mut fetching) => {
                    let _ = tokio::time::timeout(timeout, fetching.changed()).await;
                    if let Some(hit) = cache.get(&key) {
                        note.cache = Some("HIT");
                        return hit.respond(head);
                    }
                    up.forward(parts, body, None, note).await
                }
            }
        }
    };
    if !resp.headers().contains_key("x-cache") {
        cache::mark(&mut resp, "MISS");
    }
    downgrade_version(resp, client_version)
}

/// A route's filters, in order: the address lists, the rate limits keyed by address or
/// route, the URI and body size limits, authentication, the rate limits keyed by a header
/// (an API key, proven by then), and the opening-time gate. On success, the claim headers
/// authentication forwards (the client's own headers of those names must go: see
/// [`crate::auth::Auth::claim_headers`]). `content_length` is the declared body length.
pub(crate) fn admit<'r>(
    route: &'r crate::router::Route,
    limits: &crate::config::ServerSection,
    peer: SocketAddr,
    headers: &(impl Lookup + ?Sized),
    target_len: usize,
    content_length: Option<u64>,
    path: &str,
) -> Result<Vec<(&'r HeaderName, HeaderValue)>, GatewayError> {
    if !route.addresses.admits(peer.ip()) {
        return Err(GatewayError::new(
            ErrorKind::Forbidden,
            format!("{} may not use this route", peer.ip()),
        ));
    }
    rate_limited(route, false, peer, headers)?;
    if target_len > limits.max_uri_bytes {
        return Err(GatewayError::new(
            ErrorKind::UriTooLong,
            format!(
                "request target of {target_len} bytes; the limit is {}",
                limits.max_uri_bytes
            ),
        ));
    }
    let max_body = route.max_body_bytes.unwrap_or(limits.max_body_bytes);
    if let Some(len) = content_length
        && len > max_body
    {
        return Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("body of {len} bytes; the limit is {max_body}"),
        ));
    }
    let claims = match &route.auth {
        None => Vec::new(),
        Some(auth) => auth.verify(headers).map_err(|why| {
            GatewayError::new(ErrorKind::Unauthenticated, why)
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
        })?,
    };
    rate_limited(route, true, peer, headers)?;
    if let Some(gate) = &route.gate
        && let Err(wait) = gate.check(path)
    {
        return Err(GatewayError::new(
            ErrorKind::NotStarted,
            format!("opens in {}s", wait.as_secs_f64().ceil() as u64),
        )
        .retry_after(wait));
    }
    Ok(claims)
}

/// The 429 for the first of the route's rate limits (those checked `after_auth` or the
/// others) that has no token for this request.
fn rate_limited(
    route: &crate::router::Route,
    after_auth: bool,
    peer: SocketAddr,
    headers: &(impl Lookup + ?Sized),
) -> Result<(), GatewayError> {
    for limiter in route
        .rate_limits
        .iter()
        .filter(|l| l.after_auth() == after_auth)
    {
        if let Err(wait) = limiter.check(peer.ip(), headers) {
            return Err(GatewayError::new(
                ErrorKind::RateLimited,
                format!(
                    "too many requests from {}; retry in {wait:?}",
                    limiter.subject(peer.ip(), headers)
                ),
            )
            .retry_after(wait));
        }
    }
    Ok(())
}

/// The answer goes back in the client's HTTP version, whatever the upstream spoke.
fn downgrade_version(mut resp: Response<DownBody>, version: http::Version) -> Response<DownBody> {
    *resp.version_mut() = version;
    resp
}

/// One request's way to the servers of a pool.
struct Upstream<'a> {
    inner: &'a Arc<Inner>,
    pool: &'a Pool,
    /// For bodies without a declared length.
    max_body: u64,
    timeout: Duration,
    target: &'a str,
    peer: SocketAddr,
}

impl Upstream<'_> {
    /// Waits for a slot in the pool's queue (if it has one), then sends the request to a
    /// server, and on no answer to others while that is safe.
    async fn forward(
        &self,
        parts: Parts,
        body: Incoming,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        note: &mut Note,
    ) -> Response<DownBody> {
        let pool = self.pool;
        let _slot = match &pool.queue {
            None => None,
            Some(queue) => match queue.enter().await {
                Ok(permit) => Some(permit),
                Err(QueueError::Full(size)) => {
                    return GatewayError::new(
                        ErrorKind::UpstreamBusy,
                        format!(
                            "upstream {:?} is at capacity and {size} requests already wait",
                            pool.name
                        ),
                    )
                    .into_response();
                }
                Err(QueueError::TimedOut(wait)) => {
                    return GatewayError::new(
                        ErrorKind::UpstreamBusy,
                        format!("upstream {:?} had no free slot within {wait:?}", pool.name),
                    )
                    .into_response();
                }
            },
        };
        // Only a bodiless idempotent request can be sent again after a failed attempt.
        let replayable = is_idempotent(&parts.method) && body.is_end_stream();
        // The client's body is watched on its way, so a failure it causes is answered as the
        // client's (400, 408, 413), not counted against the server. A body without a declared
        // length is counted as it streams (hyper holds a declared one to its length).
        let (up_body, client_body) = if body.is_end_stream() {
            (body.map_err(BoxError::from).boxed(), None)
        } else {
            let limit = match body.size_hint().exact() {
                Some(_) => u64::MAX,
                None => self.max_body,
            };
            let watched = crate::bodies::ClientBody::new(body, limit);
            let state = watched.state.clone();
            (watched.boxed(), Some(state))
        };
        let mut body = Some(up_body);
        let mut on_upgrade = on_upgrade;
        let servers = pool.servers();
        let mut attempts: Attempts<'_, usize, GatewayError> =
            Attempts::new(&pool.budget, pool.max_attempts, None, &pool.retries);
        loop {
            let now = Instant::now();
            let Some(index) = pool.pick(
                &servers,
                self.peer.ip(),
                &parts.headers,
                attempts.tried(),
                now,
            ) else {
                break;
            };
            if let Err(give_up) = attempts.start() {
                return crate::upstream::not_retried(give_up).into_response();
            }
            let server = &servers[index];
            let uri = match Uri::builder()
                .scheme("http")
                .authority(server.authority.clone())
                .path_and_query(self.target)
                .build()
            {
                Ok(uri) => uri,
                Err(e) => {
                    return GatewayError::new(
                        ErrorKind::InvalidRequest,
                        format!("cannot forward path {:?}: {e}", self.target),
                    )
                    .into_response();
                }
            };
            let mut up = Request::from_parts(parts.clone(), ());
            *up.uri_mut() = uri;
            let up_body: UpBody = match body.take() {
                Some(b) => b,
                None => Empty::new().map_err(|e| match e {}).boxed(),
            };
            let up = up.map(|()| up_body);
            let mut attempt = Attempt::start(pool, &servers, server, note, now);
            let result = tokio::time::timeout(self.timeout, pool.client.request(up)).await;
            let fault = match &result {
                Ok(Ok(_)) => None,
                Ok(Err(_)) => client_body.as_ref().and_then(|b| b.fault(false)),
                Err(_) => client_body.as_ref().and_then(|b| b.fault(true)),
            };
            if let Some(fault) = fault {
                // Not the server's doing: the attempt counts as abandoned, not failed.
                drop(attempt);
                return client_fault(fault, self.max_body, self.timeout);
            }
            let answer = match result {
                Ok(Ok(resp)) => Ok(resp),
                // No answer at all (refused, or the connection lost before the response):
                // an idempotent request without a body can go to another server.
                Ok(Err(e)) => Err(GatewayError::no_answer(format!("{}: {e}", server.address))),
                Err(_) => Err(GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "{} did not answer within {:?}",
                        server.address, self.timeout
                    ),
                )),
            };
            let (status, outcome) = crate::upstream::attempt_outcome(&answer, |resp| resp.status());
            pool.responses.record(status, attempt.started.elapsed());
            attempt.outcome = Some(outcome);
            drop(attempt);
            match answer {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client) = on_upgrade.take()
                    {
                        tunnel(self.inner, client, hyper::upgrade::on(&mut resp));
                        let (parts, _) = resp.into_parts();
                        return Response::from_parts(parts, empty());
                    }
                    let (mut parts_out, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts_out.headers);
                    if let Some(name) = &pool.sticky_cookie
                        && crate::upstream::cookie(&parts.headers, name)
                            != Some(server.sticky_id.as_str())
                        && let Ok(v) = HeaderValue::from_str(&format!(
                            "{name}={}; Path=/; HttpOnly",
                            server.sticky_id
                        ))
                    {
                        parts_out.headers.append(header::SET_COOKIE, v);
                    }
                    // One box for the answer's body, not one per layer.
                    let body = crate::bodies::Stalled::new(body, self.timeout);
                    return Response::from_parts(parts_out, body.boxed());
                }
                Err(e) if e.retry_safe() && replayable => {
                    tracing::debug!(upstream = %pool.name, error = %e, "no answer");
                    if let Err(give_up) = attempts.retry(index, e) {
                        return crate::upstream::not_retried(give_up).into_response();
                    }
                }
                Err(e) => return e.into_response(),
            }
        }
        attempts
            .take_last_error()
            .unwrap_or_else(|| crate::upstream::no_healthy_server(pool))
            .into_response()
    }
}

/// The answer to a request whose own body made its attempt fail.
fn client_fault(
    fault: crate::bodies::ClientFault,
    max_body: u64,
    timeout: Duration,
) -> Response<DownBody> {
    use crate::bodies::ClientFault;
    let error = match fault {
        ClientFault::TooLarge => GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("the body is over the limit of {max_body} bytes"),
        ),
        ClientFault::Broken => GatewayError::new(
            ErrorKind::InvalidBody,
            "the request body was cut short or is badly framed",
        ),
        ClientFault::Incomplete => GatewayError::new(
            ErrorKind::RequestTimeout,
            format!("the request body was not received whole within {timeout:?}"),
        ),
    };
    // The rest of the body is in an unknown state: the connection cannot carry another
    // request.
    error.closing().into_response()
}

/// The bookkeeping of one attempt on one server, done also when the request is dropped
/// midway (the client went away, or reset its HTTP/2 stream): otherwise the server's
/// in-flight count would leak, and a server being probed after an ejection would never be
/// picked again.
pub(crate) struct Attempt<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) servers: &'a [Arc<crate::upstream::Server>],
    pub(crate) server: &'a crate::upstream::Server,
    pub(crate) started: Instant,
    pub(crate) outcome: Option<Outcome>,
    /// How long it took, if measured already (else measured when it is dropped).
    pub(crate) elapsed: Option<Duration>,
}

impl<'a> Attempt<'a> {
    /// Starts an attempt on `server`: counted, noted as the request's server, and in the
    /// server's in-flight statistics until dropped.
    pub(crate) fn start(
        pool: &'a Pool,
        servers: &'a [Arc<crate::upstream::Server>],
        server: &'a Arc<crate::upstream::Server>,
        note: &mut Note,
        now: Instant,
    ) -> Attempt<'a> {
        note.server = Some(server.clone());
        server
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        server.stats.start();
        Attempt {
            pool,
            servers,
            server,
            started: now,
            outcome: None,
            elapsed: None,
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // Abandoned by the client: that says nothing about the server.
        let outcome = self.outcome.unwrap_or(Outcome::Success);
        if outcome == Outcome::Failure {
            self.server
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let may_eject = outcome == Outcome::Failure && self.pool.may_eject(self.servers);
        if self.server.stats.finish(
            outcome,
            self.elapsed.unwrap_or_else(|| self.started.elapsed()),
            &self.pool.outlier,
            may_eject,
        ) {
            tracing::warn!(upstream = %self.pool.name, server = %self.server.address, "server ejected after failures");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_routing() {
        assert_eq!(normalize_path("/api/items").unwrap(), "/api/items");
        assert_eq!(normalize_path("/%61dmin/x").unwrap(), "/admin/x");
        assert_eq!(normalize_path("//admin///x").unwrap(), "/admin/x");
        assert_eq!(normalize_path("/a%2Fb%20c").unwrap(), "/a%2Fb%20c");
        assert_eq!(normalize_path("/caf\u{e9}").unwrap(), "/caf\u{e9}");
        assert_eq!(normalize_path("/50%").unwrap(), "/50%");
        for bad in [
            "/pub/../admin",
            "/./admin",
            "/pub/%2e%2e/admin",
            "/a/%2E/b",
            "/a/..",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        assert_eq!(strip_port("shop.example:8080"), "shop.example");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
