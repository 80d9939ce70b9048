//! Static files: `GET`/`HEAD` under a directory, with `ETag` and `Last-Modified`, conditional
//! requests (`If-None-Match`, `If-Modified-Since` → 304), single byte ranges (`Range`,
//! `If-Range` → 206 or 416) and `index.html` for directories.
//!
//! The path is percent-decoded and split into segments; a `..` segment, a backslash or a NUL
//! is refused (400), and the resolved file must still lie under the root after symlinks are
//! followed (403), so no request reads outside the directory.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::bodies::{BoxError, DownBody};
use crate::error::{ErrorKind, GatewayError};

/// A directory served by a route.
#[derive(Debug)]
pub(crate) struct StaticDir {
    /// The directory, with symlinks resolved.
    root: PathBuf,
}

impl StaticDir {
    pub(crate) fn new(dir: &str) -> Result<StaticDir, String> {
        let root = std::fs::canonicalize(dir).map_err(|e| format!("static_dir {dir:?}: {e}"))?;
        Ok(StaticDir { root })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Serves `path` (the request path after the route's rewrite, without the query).
    pub(crate) async fn serve(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Response<DownBody> {
        if method != Method::GET && method != Method::HEAD {
            return GatewayError::new(
                ErrorKind::MethodNotAllowed,
                format!("{method} is not allowed on static files"),
            )
            .with_header(header::ALLOW, HeaderValue::from_static("GET, HEAD"))
            .into_response();
        }
        let relative = match safe_relative(path) {
            Ok(r) => r,
            Err(why) => return GatewayError::new(ErrorKind::InvalidPath, why).into_response(),
        };
        let mut file_path = self.root.join(&relative);
        let not_found =
            || GatewayError::new(ErrorKind::NotFound, format!("no file at {path}")).into_response();
        let Ok(mut real) = tokio::fs::canonicalize(&file_path).await else {
            return not_found();
        };
        if !real.starts_with(&self.root) {
            return GatewayError::new(
                ErrorKind::Forbidden,
                format!("{path} leads outside the served directory"),
            )
            .into_response();
        }
        let Ok(mut meta) = tokio::fs::metadata(&real).await else {
            return not_found();
        };
        if meta.is_dir() {
            file_path = real.join("index.html");
            match tokio::fs::canonicalize(&file_path).await {
                Ok(r) if r.starts_with(&self.root) => real = r,
                _ => return not_found(),
            }
            match tokio::fs::metadata(&real).await {
                Ok(m) if m.is_file() => meta = m,
                _ => return not_found(),
            }
        }
        if !meta.is_file() {
            return not_found();
        }
        let len = meta.len();
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let since_epoch = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let etag = format!(
            "\"{len:x}-{:x}.{:x}\"",
            since_epoch.as_secs(),
            since_epoch.subsec_nanos()
        );
        let last_modified = httpdate::fmt_http_date(modified);

        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(header::ETAG, value(&etag));
        h.insert(header::LAST_MODIFIED, value(&last_modified));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let mime = mime_guess::from_path(&real).first_or_octet_stream();
        h.insert(header::CONTENT_TYPE, value(mime.essence_str()));

        if not_modified(headers, &etag, modified) {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            resp.headers_mut().remove(header::CONTENT_TYPE);
            return resp;
        }
        let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            Some(spec) if if_range_holds(headers, &etag, modified) => parse_range(spec, len),
            _ => RangeAnswer::Whole,
        };
        let (start, count) = match range {
            RangeAnswer::Whole => (0, len),
            RangeAnswer::Part(start, end) => {
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    value(&format!("bytes {start}-{end}/{len}")),
                );
                (start, end - start + 1)
            }
            RangeAnswer::Unsatisfiable => {
                return GatewayError::new(
                    ErrorKind::RangeNotSatisfiable,
                    format!("the file has {len} bytes"),
                )
                .with_header(header::CONTENT_RANGE, value(&format!("bytes */{len}")))
                .into_response();
            }
        };
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        if method == Method::HEAD {
            return resp;
        }
        let mut file = match tokio::fs::File::open(&real).await {
            Ok(f) => f,
            Err(_) => return not_found(),
        };
        if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
            return not_found();
        }
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 64 * 1024);
        let body = StreamBody::new(futures_util::StreamExt::map(stream, |chunk| {
            chunk.map(hyper::body::Frame::data)
        }));
        *resp.body_mut() = BodyExt::boxed(BodyExt::map_err(body, |e: std::io::Error| {
            tracing::warn!(error = %e, "static file read failed");
            BoxError::from(e)
        }));
        resp
    }
}

fn empty() -> DownBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Decodes `%XX` escapes and checks every segment; the result is relative to the root.
fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {path:?}"))?;
            decoded.push(hex);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| "path is not UTF-8".to_owned())?;
    let mut out = PathBuf::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err("\"..\" is not allowed in a path".into()),
            s if s.contains(['\\', '\0']) => {
                return Err("backslash or NUL in a path".into());
            }
            s => out.push(s),
        }
    }
    Ok(out)
}

fn not_modified(headers: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        // If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2); weak comparison.
        return inm
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag);
    }
    headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .is_some_and(|since| whole_seconds(modified) <= whole_seconds(since))
}

fn whole_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Without `If-Range`, or when it names the current version, a range applies.
fn if_range_holds(headers: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) if v.starts_with('"') => v == etag,
        Some(v) => httpdate::parse_http_date(v)
            .is_ok_and(|date| whole_seconds(date) == whole_seconds(modified)),
    }
}

#[derive(Debug, PartialEq)]
enum RangeAnswer {
    Whole,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses one `bytes=` range. Several ranges, or a unit other than bytes, get the whole file
/// (a server may ignore Range); a syntactically valid range outside the file gets 416.
fn parse_range(spec: &str, len: u64) -> RangeAnswer {
    let Some(set) = spec.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Whole;
    };
    if set.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) if len > 0 => RangeAnswer::Part(len.saturating_sub(n), len - 1),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Whole,
        },
        // bytes=A-
        (false, true) => match parse(first) {
            Some(a) if a < len => RangeAnswer::Part(a, len - 1),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Whole,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a <= b && a < len => RangeAnswer::Part(a, b.min(len - 1)),
            (Some(a), Some(b)) if a <= b => RangeAnswer::Unsatisfiable,
            _ => RangeAnswer::Whole,
        },
        (true, true) => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-200", 100), Part(0, 99));
        assert_eq!(parse_range("bytes=50-500", 100), Part(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=200-300", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Whole);
        assert_eq!(parse_range("bytes=9-1", 100), Whole);
        assert_eq!(parse_range("bytes=x-1", 100), Whole);
    }

    #[test]
    fn traversal_is_refused() {
        assert!(safe_relative("/../etc/passwd").is_err());
        assert!(safe_relative("/a/%2e%2e/%2e%2e/etc/passwd").is_err());
        assert!(safe_relative("/a/..%5c..%5cwin.ini").is_err());
        assert!(safe_relative("/a%00b").is_err());
        assert!(safe_relative("/a%zz").is_err());
        assert_eq!(
            safe_relative("/css//site%20a.css").unwrap(),
            PathBuf::from("css/site a.css")
        );
    }
}
