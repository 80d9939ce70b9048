//! The proxy: route the request, pick a server, forward it over a pooled keep-alive
//! connection, stream the answer back.
//!
//! Hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`, `Proxy-*`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade`) are not forwarded in either direction;
//! `X-Forwarded-For`, `-Proto` and `-Host` are added; the client's `Host` is kept.
//!
//! Errors are JSON `{"error": CODE, "detail": ...}`: 404 `no_route`, 502 `bad_gateway` (the
//! server could not be reached or broke off), 503 `no_healthy_upstream`, 504
//! `upstream_timeout`, 403 `forbidden` (address filter), 429 `rate_limited` (with
//! `Retry-After`), 413 `body_too_large`, 414 `uri_too_long`, 401 `unauthenticated`.
//!
//! A request that got no answer from a server (connection refused, or lost before the
//! response) is retried on another one when that is safe: an idempotent method and no body.
//! A server that answers too slowly is not retried (504).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use keel_governance::endpoint::Outcome;
use tokio::time::Instant;

use crate::Shared;
use crate::upstream::UpBody;

/// A response body on its way to the client.
pub(crate) type DownBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Response<DownBody> {
    let body = serde_json::json!({ "error": code, "detail": detail.into() }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
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
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Serves one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<DownBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_owned());
    let path = req.uri().path().to_owned();
    let Some(route) = shared
        .router
        .find(req.method(), host.as_deref(), &path, req.headers())
    else {
        return error(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {} {path}", req.method()),
        );
    };
    if !route.addresses.admits(peer.ip()) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not use this route", peer.ip()),
        );
    }
    if let Some(limiter) = &route.rate_limit
        && let Err(wait) = limiter.check(peer.ip())
    {
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from {}; retry in {wait:?}", peer.ip()),
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    let limits = &shared.config.server;
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > limits.max_uri_bytes {
        return error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "request target of {target_len} bytes; the limit is {}",
                limits.max_uri_bytes
            ),
        );
    }
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limits.max_body_bytes
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "body of {len} bytes; the limit is {}",
                limits.max_body_bytes
            ),
        );
    }
    let pool = &shared.pools[route.upstream];
    let target = route.rewrite(&path, req.uri().query());
    let timeout = route.timeout.unwrap_or(pool.response_timeout);

    let (mut parts, body) = req.into_parts();
    if let Some(auth) = &route.auth
        && let Err(why) = auth.check(&mut parts.headers)
    {
        let mut resp = error(StatusCode::UNAUTHORIZED, "unauthenticated", why);
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    strip_hop_by_hop(&mut parts.headers);
    // The upstream leg is HTTP/1.1 whatever the client spoke; an HTTP/2 request carries its
    // host in the :authority pseudo-header, which becomes Host.
    parts.version = http::Version::HTTP_11;
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
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = &host
        && let Ok(v) = HeaderValue::from_str(h)
    {
        parts.headers.insert("x-forwarded-host", v);
    }
    // Only a bodiless idempotent request can be sent again after a failed attempt.
    let replayable = is_idempotent(&parts.method) && body.is_end_stream();
    let mut body = Some(body.boxed());
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = String::new();
    for _ in 0..pool.max_attempts {
        let Some(index) = pool.pick(Some(peer.ip()), &tried) else {
            break;
        };
        let server = &pool.servers[index];
        let uri = match Uri::builder()
            .scheme("http")
            .authority(server.authority.clone())
            .path_and_query(target.as_str())
            .build()
        {
            Ok(uri) => uri,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("cannot forward path {target:?}: {e}"),
                );
            }
        };
        let mut up = Request::from_parts(parts.clone(), ());
        *up.uri_mut() = uri;
        let up_body: UpBody = match body.take() {
            Some(b) => b,
            None => Empty::new().map_err(|e| match e {}).boxed(),
        };
        let up = up.map(|()| up_body);
        server.stats.start();
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, pool.client.request(up)).await;
        let (outcome, answer) = match result {
            Ok(Ok(resp)) => {
                let outcome = if resp.status().is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                (outcome, Ok(resp))
            }
            // No answer at all (refused, or the connection lost before the response): an
            // idempotent request without a body can go to another server.
            Ok(Err(e)) => (
                Outcome::Failure,
                Err((true, format!("{}: {e}", server.address))),
            ),
            Err(_) => (
                Outcome::Failure,
                Err((
                    false,
                    format!("{} did not answer within {timeout:?}", server.address),
                )),
            ),
        };
        let may_eject = outcome == Outcome::Failure && pool.may_eject();
        if server
            .stats
            .finish(outcome, started.elapsed(), &pool.outlier, may_eject)
        {
            tracing::warn!(upstream = %pool.name, server = %server.address, "server ejected after failures");
        }
        match answer {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, body.boxed());
            }
            Err((true, detail)) if replayable => {
                tracing::debug!(upstream = %pool.name, %detail, "no answer; trying another server");
                tried.push(index);
                last_error = detail;
            }
            Err((_, detail)) if detail.contains("did not answer") => {
                return error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", detail);
            }
            Err((_, detail)) => return error(StatusCode::BAD_GATEWAY, "bad_gateway", detail),
        }
    }
    if tried.is_empty() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            format!("no healthy server in upstream {:?}", pool.name),
        )
    } else {
        error(StatusCode::BAD_GATEWAY, "bad_gateway", last_error)
    }
}
