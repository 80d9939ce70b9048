//! Reading an HTTP request body whole, bounded in size and in time — shared by every HTTP
//! server in Keel that takes a body (the RPC port's HTTP side, the registry's, the sale's API,
//! the gateway's admin port).
//!
//! A client that lies or stalls cannot hold a connection and its task for long:
//!
//! - a declared `Content-Length` over the limit is refused at once, before any of the body is
//!   read (413);
//! - a body that grows past the limit while it arrives (chunked) is refused as soon as it does
//!   (413);
//! - a body not wholly received within the time limit is refused (408);
//! - a body cut short or badly framed is the client's fault (400).
//!
//! After a refusal the body is left unread, so hyper closes the connection once the answer is
//! written.

use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

/// How long a body may take to arrive whole, unless a server sets its own.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Size and time limits for one request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted, in bytes.
    pub max_bytes: usize,
    /// Longest time the whole body may take to arrive, from the moment reading starts.
    pub timeout: Duration,
}

impl BodyLimits {
    /// `max_bytes` within [`DEFAULT_BODY_TIMEOUT`].
    pub fn new(max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Declared or grown over the limit.
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not received whole in time.
    #[error("the request body did not arrive within {after:?}")]
    Timeout {
        /// The time limit.
        after: Duration,
    },
    /// Cut short, badly framed, or a `Content-Length` that is not a number.
    #[error("the request body could not be read: {reason}")]
    Broken {
        /// What went wrong.
        reason: String,
    },
}

impl BodyError {
    /// The HTTP status that answers it: 413, 408 or 400.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::Broken { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// A short machine-readable code: `body_too_large`, `body_timeout` or `bad_body`.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "body_too_large",
            BodyError::Timeout { .. } => "body_timeout",
            BodyError::Broken { .. } => "bad_body",
        }
    }
}

/// Reads `body` whole within `limits`; `headers` are the request's, for its declared length.
pub async fn read<B>(
    headers: &http::HeaderMap,
    body: B,
    limits: BodyLimits,
) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if let Some(declared) = headers.get(header::CONTENT_LENGTH) {
        let declared: u64 = declared
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| BodyError::Broken {
                reason: "Content-Length is not a number".into(),
            })?;
        if declared > limits.max_bytes as u64 {
            return Err(BodyError::TooLarge {
                limit: limits.max_bytes,
            });
        }
    }
    let collect = Limited::new(body, limits.max_bytes).collect();
    match tokio::time::timeout(limits.timeout, collect).await {
        Err(_) => Err(BodyError::Timeout {
            after: limits.timeout,
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge {
            limit: limits.max_bytes,
        }),
        Ok(Err(e)) => Err(BodyError::Broken {
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn declared(len: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, len.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        // The body never ends: a refusal that waited for it would hang.
        let never = StreamBody::new(futures_util::stream::pending::<
            Result<hyper::body::Frame<Bytes>, std::io::Error>,
        >());
        let err = read(&declared("10000000000"), never, BodyLimits::new(1024))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 1024 });
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out() {
        let never = StreamBody::new(futures_util::stream::pending::<
            Result<hyper::body::Frame<Bytes>, std::io::Error>,
        >());
        let limits = BodyLimits {
            max_bytes: 1024,
            timeout: Duration::from_secs(3),
        };
        let err = read(&declared("10"), never, limits).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn bodies_within_the_limits_are_read_and_bad_lengths_refused() {
        let body = Full::new(Bytes::from_static(b"hello"));
        let got = read(&declared("5"), body, BodyLimits::new(5))
            .await
            .unwrap();
        assert_eq!(&got[..], b"hello");
        let body = Full::new(Bytes::from_static(b"hello"));
        let err = read(&http::HeaderMap::new(), body, BodyLimits::new(4))
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = Full::new(Bytes::from_static(b"x"));
        let err = read(&declared("-1"), body, BodyLimits::new(4))
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
