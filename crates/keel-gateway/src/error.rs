//! The gateway's own answers. Whenever the gateway answers a request itself instead of with a
//! server's answer, it does so with a [`GatewayError`]: what went wrong ([`ErrorKind`]), on
//! whose side ([`Side`]), whether sending the request to another server is safe, and the
//! cause in words. Status and error code follow from the kind by one mapping
//! ([`ErrorKind::status`], [`ErrorKind::code`]), the same on both of the gateway's HTTP/1.1
//! paths and on HTTP/2; the body is `{"error": CODE, "detail": TEXT}`.
//!
//! The side decides what a failure counts against: only [`Side::Upstream`] errors are the
//! servers' doing. A client that sends a broken body or stalls gets its 400 or 408 and the
//! server it was talking to is not charged with a failure.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::bodies::DownBody;

/// Whose doing a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The request itself: malformed, too large, too slow, refused by a route's filters, or
    /// for nothing the gateway serves.
    Client,
    /// The servers behind the gateway: no answer, too slow, no server able to take it.
    Upstream,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// 400 `invalid_request`: the request cannot be forwarded as it is.
    InvalidRequest,
    /// 400 `invalid_host`: `Host` missing (HTTP/1.1), repeated, or a list.
    InvalidHost,
    /// 400 `invalid_path`: a path that is not absolute or climbs above the root.
    InvalidPath,
    /// 400 `ambiguous_framing`: both `Content-Length` and `Transfer-Encoding`.
    AmbiguousFraming,
    /// 400 `invalid_body`: a body cut short or badly framed.
    InvalidBody,
    /// 408 `request_timeout`: the body did not arrive in time.
    RequestTimeout,
    /// 413 `body_too_large`.
    BodyTooLarge,
    /// 414 `uri_too_long`.
    UriTooLong,
    /// 404 `no_route`: no route matches.
    NoRoute,
    /// 404 `not_found`: no such static file.
    NotFound,
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 416 `range_not_satisfiable`.
    RangeNotSatisfiable,
    /// 403 `forbidden`: the client's address may not use the route, or a path leads outside
    /// the served directory.
    Forbidden,
    /// 401 `unauthenticated`: no valid API key or token.
    Unauthenticated,
    /// 429 `rate_limited`.
    RateLimited,
    /// 403 `not_started`: before the route's opening time.
    NotStarted,
    /// 502 `bad_gateway`: no answer from a server (refused, connection lost), or one that is
    /// not HTTP the gateway can relay.
    BadGateway,
    /// 504 `upstream_timeout`: no answer within the response timeout.
    UpstreamTimeout,
    /// 503 `upstream_busy`: the pool's queue is full, or no slot came free in time.
    UpstreamBusy,
    /// 503 `no_healthy_upstream`: every server is down or ejected.
    NoHealthyUpstream,
    /// 503 `unavailable`: an RPC route's service cannot be reached at all.
    Unavailable,
}

impl ErrorKind {
    /// The HTTP status of the answer.
    pub(crate) fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            InvalidRequest | InvalidHost | InvalidPath | AmbiguousFraming | InvalidBody => {
                StatusCode::BAD_REQUEST
            }
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UriTooLong => StatusCode::URI_TOO_LONG,
            NoRoute | NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Forbidden | NotStarted => StatusCode::FORBIDDEN,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
            BadGateway => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamBusy | NoHealthyUpstream | Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error` code of the answer's body.
    pub(crate) fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            InvalidRequest => "invalid_request",
            InvalidHost => "invalid_host",
            InvalidPath => "invalid_path",
            AmbiguousFraming => "ambiguous_framing",
            InvalidBody => "invalid_body",
            RequestTimeout => "request_timeout",
            BodyTooLarge => "body_too_large",
            UriTooLong => "uri_too_long",
            NoRoute => "no_route",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RangeNotSatisfiable => "range_not_satisfiable",
            Forbidden => "forbidden",
            Unauthenticated => "unauthenticated",
            RateLimited => "rate_limited",
            NotStarted => "not_started",
            BadGateway => "bad_gateway",
            UpstreamTimeout => "upstream_timeout",
            UpstreamBusy => "upstream_busy",
            NoHealthyUpstream => "no_healthy_upstream",
            Unavailable => "unavailable",
        }
    }

    /// Whose doing it is.
    pub(crate) fn side(self) -> Side {
        use ErrorKind::*;
        match self {
            BadGateway | UpstreamTimeout | UpstreamBusy | NoHealthyUpstream | Unavailable => {
                Side::Upstream
            }
            _ => Side::Client,
        }
    }
}

/// A request the gateway answers itself; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct GatewayError {
    kind: ErrorKind,
    detail: String,
    /// The request got no answer at all and may be sent to another server (if it can be
    /// sent again: idempotent and without a body).
    retry_safe: bool,
    /// `Retry-After`, `WWW-Authenticate`, `Allow` or `Content-Range`, as the error calls for.
    header: Option<(HeaderName, HeaderValue)>,
    /// The connection cannot carry another request after this answer.
    close: bool,
}

impl GatewayError {
    /// An error of `kind`, with its cause in words.
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> GatewayError {
        GatewayError {
            kind,
            detail: detail.into(),
            retry_safe: false,
            header: None,
            close: false,
        }
    }

    /// A server that gave no answer at all: the request may go to another server.
    pub(crate) fn no_answer(detail: impl Into<String>) -> GatewayError {
        GatewayError {
            retry_safe: true,
            ..GatewayError::new(ErrorKind::BadGateway, detail)
        }
    }

    /// With `Retry-After`: whole seconds, at least one.
    pub(crate) fn retry_after(self, wait: Duration) -> GatewayError {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        self.with_header(header::RETRY_AFTER, HeaderValue::from(secs))
    }

    /// With a header the answer needs.
    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> GatewayError {
        self.header = Some((name, value));
        self
    }

    /// The connection closes after the answer (the rest of the request is in an unknown
    /// state).
    pub(crate) fn closing(mut self) -> GatewayError {
        self.close = true;
        self
    }

    /// The same error with more words in front of its cause.
    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> GatewayError {
        self.detail = detail.into();
        self
    }

    /// Whether the server the request went to is charged with this failure (in its failure
    /// count, its health and its ejection): only for errors on the upstream side.
    pub(crate) fn charges_server(&self) -> bool {
        self.kind.side() == Side::Upstream
    }

    pub(crate) fn retry_safe(&self) -> bool {
        self.retry_safe
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }

    pub(crate) fn header(&self) -> Option<&(HeaderName, HeaderValue)> {
        self.header.as_ref()
    }

    pub(crate) fn closes(&self) -> bool {
        self.close
    }

    /// The answer's body: `{"error": CODE, "detail": TEXT}`.
    pub(crate) fn body(&self) -> String {
        error_json(self.kind.code(), &self.detail)
    }

    /// The answer, for the hyper path.
    pub(crate) fn into_response(self) -> Response<DownBody> {
        let mut resp = json_error(self.status(), self.kind.code(), &self.detail);
        let headers = resp.headers_mut();
        if let Some((name, value)) = self.header {
            headers.insert(name, value);
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.detail)
    }
}

/// The body of a JSON error answer.
fn error_json(code: &str, detail: &str) -> String {
    serde_json::json!({ "error": code, "detail": detail }).to_string()
}

/// A JSON error answer, also for errors whose code is not the gateway's (the RPC bridge
/// relays a service's status code).
pub(crate) fn json_error(status: StatusCode, code: &str, detail: &str) -> Response<DownBody> {
    let body = Full::new(Bytes::from(error_json(code, detail)));
    let mut resp = Response::new(body.map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_failures_are_on_the_upstream_side() {
        use ErrorKind::*;
        for kind in [
            BadGateway,
            UpstreamTimeout,
            UpstreamBusy,
            NoHealthyUpstream,
            Unavailable,
        ] {
            assert_eq!(kind.side(), Side::Upstream, "{kind:?}");
            assert!(kind.status().is_server_error(), "{kind:?}");
        }
        for kind in [
            InvalidRequest,
            InvalidHost,
            InvalidPath,
            AmbiguousFraming,
            InvalidBody,
            RequestTimeout,
            BodyTooLarge,
            UriTooLong,
            NoRoute,
            NotFound,
            MethodNotAllowed,
            RangeNotSatisfiable,
            Forbidden,
            Unauthenticated,
            RateLimited,
            NotStarted,
        ] {
            assert_eq!(kind.side(), Side::Client, "{kind:?}");
            assert!(kind.status().is_client_error(), "{kind:?}");
        }
    }

    #[test]
    fn the_answer_carries_status_code_detail_and_headers() {
        let resp = GatewayError::new(ErrorKind::RateLimited, "slow down")
            .retry_after(Duration::from_millis(1200))
            .closing()
            .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let no_answer = GatewayError::no_answer("refused");
        assert!(no_answer.retry_safe());
        let body: serde_json::Value = serde_json::from_str(&no_answer.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "bad_gateway", "detail": "refused"})
        );
    }
}
