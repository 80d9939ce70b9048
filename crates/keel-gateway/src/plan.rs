//! The plan of a request: one pure step, the same whichever way the request came in (Keel's
//! HTTP/1.1 loop with `httparse`'s headers, or hyper with a `HeaderMap`, both read through
//! [`Lookup`]). It normalises the path, finds the route, runs the route's filters, and
//! decides what serves the request — a directory, the RPC bridge, or a pool of servers (with
//! or without the cache) — and, for a pool, the target sent, the header edits, whether the
//! request may be sent again after a failed attempt, its timeout, and the upstream leg that
//! carries it. A refused request gets its [`GatewayError`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::header::{self, HeaderName, HeaderValue};

use crate::auth::Auth;
use crate::bridge::Bridge;
use crate::cache::Cache;
use crate::config::UpstreamLeg;
use crate::error::{ErrorKind, GatewayError};
use crate::headers::Lookup;
use crate::router::{Route, Target};
use crate::state::Shared;
use crate::static_files::StaticDir;
use crate::upstream::Pool;

/// A request as planning sees it.
pub(crate) struct Asked<'a, H: ?Sized> {
    pub(crate) method: &'a Method,
    /// The host asked for, without its port (`Host`, or an HTTP/2 request's authority).
    pub(crate) host: Option<&'a str>,
    /// The path as sent (not yet normalised) and the query.
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a H,
    /// Length of the request target (path and query) as sent.
    pub(crate) target_len: usize,
    /// The declared body length, if any.
    pub(crate) content_length: Option<u64>,
    /// Whether the request has no body at all.
    pub(crate) bodiless: bool,
    pub(crate) peer: SocketAddr,
    /// Whether the client came over TLS (`X-Forwarded-Proto`).
    pub(crate) tls: bool,
}

/// What serves an admitted request.
pub(crate) struct Planned<'s> {
    pub(crate) route: &'s Route,
    /// The largest body the route takes.
    pub(crate) max_body: u64,
    pub(crate) serve: Serve<'s>,
}

/// Who answers.
pub(crate) enum Serve<'s> {
    /// A file of a directory (the path after the route's rewrite).
    Static { dir: &'s StaticDir, file: String },
    /// A Keel RPC method through the bridge, with the claims authentication vouches for
    /// (their headers travel as call metadata).
    Rpc {
        bridge: &'s Bridge,
        method: String,
        claims: Claims<'s>,
    },
    /// A server of a pool.
    Forward(Forward<'s>),
}

/// The claim headers authentication forwards, with their values.
pub(crate) type Claims<'s> = Vec<(&'s HeaderName, HeaderValue)>;

/// A request on its way to a pool.
pub(crate) struct Forward<'s> {
    pub(crate) pool: &'s Arc<Pool>,
    /// The path and query sent to the server.
    pub(crate) target: String,
    /// Time for a server to start answering, and most between two pieces of its answer.
    pub(crate) timeout: Duration,
    /// The route's cache, for a GET or HEAD on a cached route.
    pub(crate) cache: Option<&'s Arc<Cache>>,
    /// Whether the request may be sent again after an attempt that got no answer: an
    /// idempotent method without a body.
    pub(crate) replayable: bool,
    pub(crate) leg: UpstreamLeg,
    pub(crate) edits: Edits<'s>,
}

/// Decides what serves a request, running the route's filters on the way. The route found
/// (also for a request its filters refuse) is written to `routed`, for the metrics.
pub(crate) fn plan<'s, H: Lookup + ?Sized>(
    shared: &'s Shared,
    asked: &Asked<'_, H>,
    routed: &mut Option<usize>,
) -> Result<Planned<'s>, GatewayError> {
    let path =
        normalize_path(asked.path).map_err(|why| GatewayError::new(ErrorKind::InvalidPath, why))?;
    let (route_index, route) = shared
        .router
        .find(asked.method, asked.host, &path, asked.headers)
        .ok_or_else(|| {
            GatewayError::new(
                ErrorKind::NoRoute,
                format!("no route for {} {path}", asked.method),
            )
        })?;
    *routed = Some(route_index);
    let claims = admit(
        route,
        &shared.config.server,
        asked.peer,
        asked.headers,
        asked.target_len,
        asked.content_length,
        &path,
    )?;
    let max_body = route
        .max_body_bytes
        .unwrap_or(shared.config.server.max_body_bytes);
    let serve = match &route.target {
        Target::Static(dir) => Serve::Static {
            dir,
            file: route.rewrite(&path, None),
        },
        Target::Rpc(bridge) => Serve::Rpc {
            bridge,
            method: route.rewrite(&path, None),
            claims,
        },
        Target::Upstream(i) => {
            let pool = &shared.pools[*i];
            let cache = route
                .cache
                .as_ref()
                .filter(|_| matches!(*asked.method, Method::GET | Method::HEAD));
            // hyper carries what Keel's HTTP/1.1 leg does not speak (HTTP/2) and what must be
            // held as a body on its way (an answer the cache keeps).
            let leg = if pool.h2 || cache.is_some() {
                UpstreamLeg::Hyper
            } else {
                shared.config.server.upstream_leg
            };
            Serve::Forward(Forward {
                pool,
                target: route.rewrite(&path, asked.query),
                timeout: route.timeout.unwrap_or(pool.response_timeout),
                cache,
                replayable: is_idempotent(asked.method) && asked.bodiless,
                leg,
                edits: Edits::new(asked.tls, route.auth.as_ref(), claims),
            })
        }
    };
    Ok(Planned {
        route,
        max_body,
        serve,
    })
}

/// The header edits on a request's way upstream, the same on either leg: hop-by-hop headers
/// (and those `Connection` names) stay on their hop, the client's own copies of the claim
/// headers authentication forwards are dropped, and `X-Forwarded-For` (appended to),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` are set ([`Edits::added`]).
pub(crate) struct Edits<'s> {
    auth: Option<&'s Auth>,
    claims: Claims<'s>,
    proto: &'static [u8],
}

impl<'s> Edits<'s> {
    fn new(tls: bool, auth: Option<&'s Auth>, claims: Claims<'s>) -> Edits<'s> {
        Edits {
            auth,
            claims,
            proto: if tls { b"https" } else { b"http" },
        }
    }

    /// Whether the client's header `name` is not sent upstream, `connection` being the
    /// values of the client's `Connection` headers. (`Content-Length` is each leg's own.)
    pub(crate) fn drops(&self, name: &str, connection: &[&[u8]]) -> bool {
        const SET_HERE: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
        hop_by_hop(name)
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || SET_HERE.iter().any(|n| n.eq_ignore_ascii_case(name))
            || named_by(connection, name)
            || self.auth.is_some_and(|a| {
                a.claim_headers()
                    .any(|n| n.as_str().eq_ignore_ascii_case(name))
            })
    }

    /// The headers the gateway adds after the client's, for a request with `headers` from
    /// `peer_ip` asking for `host`.
    pub(crate) fn added<'a, H: Lookup + ?Sized>(
        &'a self,
        headers: &'a H,
        host: Option<&'a str>,
        peer_ip: &'a str,
    ) -> Added<'a> {
        static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
        let prior = headers.value(&FORWARDED_FOR).filter(|_| {
            let connection = connection_names(headers);
            !named_by(&connection, "x-forwarded-for")
        });
        Added {
            prior_forwarded_for: prior,
            peer_ip,
            proto: self.proto,
            host,
            claims: &self.claims,
        }
    }
}

/// What the gateway adds to a request on its way upstream (see [`Edits::added`]): each leg
/// writes these in its own form.
pub(crate) struct Added<'a> {
    /// `X-Forwarded-For` is the client's own value (unless its `Connection` names it), then
    /// `, `, then the client's address.
    pub(crate) prior_forwarded_for: Option<&'a [u8]>,
    pub(crate) peer_ip: &'a str,
    /// `X-Forwarded-Proto`: `http` or `https`.
    pub(crate) proto: &'static [u8],
    /// `X-Forwarded-Host`: the host the client asked for.
    pub(crate) host: Option<&'a str>,
    /// The claims authentication forwards.
    pub(crate) claims: &'a [(&'a HeaderName, HeaderValue)],
}

impl Added<'_> {
    /// The headers as names and values.
    pub(crate) fn headers(&self) -> Vec<(HeaderName, Vec<u8>)> {
        let forwarded_for = match self.prior_forwarded_for {
            Some(prior) => [prior, b", ", self.peer_ip.as_bytes()].concat(),
            None => self.peer_ip.as_bytes().to_vec(),
        };
        let mut out = vec![
            (HeaderName::from_static("x-forwarded-for"), forwarded_for),
            (
                HeaderName::from_static("x-forwarded-proto"),
                self.proto.to_vec(),
            ),
        ];
        if let Some(host) = self.host {
            out.push((
                HeaderName::from_static("x-forwarded-host"),
                host.as_bytes().to_vec(),
            ));
        }
        out.extend(
            self.claims
                .iter()
                .map(|(name, value)| ((*name).clone(), value.as_bytes().to_vec())),
        );
        out
    }
}

/// The values of a message's `Connection` headers.
pub(crate) fn connection_names<H: Lookup + ?Sized>(headers: &H) -> Vec<&[u8]> {
    static CONNECTION: HeaderName = header::CONNECTION;
    headers.all(&CONNECTION).collect()
}

/// Headers that stay on their hop in either direction (RFC 9110 §7.6.1), besides
/// `Transfer-Encoding` and `Upgrade`, which each leg handles with the message's framing.
pub(crate) fn hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether header `name` is among those the `Connection` headers name.
pub(crate) fn named_by(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|v| has_token(v, name))
}

/// Whether a method is idempotent (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
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

/// A route's filters, in order: the address lists, the rate limits keyed by address or
/// route, the URI and body size limits, authentication, the rate limits keyed by a header
/// (an API key, proven by then), and the opening-time gate. On success, the claim headers
/// authentication forwards (the client's own headers of those names must go: see
/// [`crate::auth::Auth::claim_headers`]). `content_length` is the declared body length.
pub(crate) fn admit<'r>(
    route: &'r Route,
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
    route: &Route,
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
