//! The response cache of a route: GET answers kept in memory (bounded in bytes, least
//! recently used out first) for as long as the server allows, and concurrent misses for the
//! same key coalesced into one upstream request.
//!
//! An answer is stored when its status is cacheable by default (200, 203, 204, 300, 301, 404,
//! 410), it carries no `Set-Cookie` and no `Vary`, its `Cache-Control` has none of `no-store`,
//! `no-cache`, `private`, and it is fresh for a positive time: `s-maxage`, else `max-age`
//! (less its `Age`), else `Expires` minus now, else the route's `default_ttl`. A request with
//! `Authorization`, on a route with auth, or whose `Cache-Control`/`Pragma` asks for
//! `no-cache` or `no-store`, bypasses the cache.
//! Answers carry `X-Cache: HIT`, `MISS` or `BYPASS`, and hits an `Age`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::bodies::DownBody;
use crate::config::CacheConfig;

/// A stored answer.
#[derive(Debug)]
pub(crate) struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    ttl: Duration,
}

impl Stored {
    /// The answer for a hit (`head` leaves out the body).
    pub(crate) fn respond(&self, head: bool) -> Response<DownBody> {
        let body = if head {
            Bytes::new()
        } else {
            self.body.clone()
        };
        let mut resp = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        let age = self.stored_at.elapsed().as_secs();
        resp.headers_mut()
            .insert(header::AGE, HeaderValue::from(age));
        mark(&mut resp, "HIT");
        resp
    }
}

struct Ttl;

impl moka::Expiry<String, Arc<Stored>> for Ttl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Stored>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A route's cache.
pub(crate) struct Cache {
    store: moka::sync::Cache<String, Arc<Stored>>,
    /// Keys being fetched now; followers wait for the sender to go away.
    inflight: Mutex<HashMap<String, watch::Receiver<()>>>,
    max_entry: u64,
    default_ttl: Duration,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.store.entry_count())
            .field("bytes", &self.store.weighted_size())
            .finish()
    }
}

/// What a miss should do.
pub(crate) enum Miss {
    /// Fetch, offer the answer with [`Cache::offer`], then drop the guard.
    Lead(LeadGuard),
    /// Another request is fetching this key: wait on this, then look again.
    Follow(watch::Receiver<()>),
    /// It has just been stored.
    Stored(Arc<Stored>),
}

/// Held by the request fetching a key; dropping it wakes the followers.
pub(crate) struct LeadGuard {
    cache: Arc<Cache>,
    key: String,
    _tx: watch::Sender<()>,
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        self.cache.inflight.lock().remove(&self.key);
    }
}

impl Cache {
    pub(crate) fn new(config: &CacheConfig) -> Cache {
        Cache {
            store: moka::sync::Cache::builder()
                .max_capacity(config.max_bytes)
                .weigher(|k: &String, v: &Arc<Stored>| {
                    let headers: usize = v
                        .headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len() + 32)
                        .sum();
                    u32::try_from(k.len() + v.body.len() + headers + 64).unwrap_or(u32::MAX)
                })
                .expire_after(Ttl)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            inflight: Mutex::new(HashMap::new()),
            max_entry: config.max_entry_bytes,
            default_ttl: config.default_ttl,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Stored>> {
        let stored = self.store.get(key)?;
        (stored.stored_at.elapsed() < stored.ttl).then_some(stored)
    }

    /// Becomes the fetcher of `key`, or learns who is.
    pub(crate) fn miss(self: &Arc<Self>, key: &str) -> Miss {
        let mut inflight = self.inflight.lock();
        if let Some(rx) = inflight.get(key) {
            return Miss::Follow(rx.clone());
        }
        // A fetch may have ended between the caller's lookup and this lock: look again, so
        // it is not repeated.
        if let Some(stored) = self.get(key) {
            return Miss::Stored(stored);
        }
        let (tx, rx) = watch::channel(());
        inflight.insert(key.to_owned(), rx);
        Miss::Lead(LeadGuard {
            cache: self.clone(),
            key: key.to_owned(),
            _tx: tx,
        })
    }

    /// Stores `resp` under the guard's key if it may be cached, and returns the answer to
    /// send (its body read into memory if it was stored, streamed on otherwise).
    pub(crate) async fn offer(
        &self,
        guard: &LeadGuard,
        resp: Response<DownBody>,
    ) -> Response<DownBody> {
        let Some(ttl) = self.freshness(&resp) else {
            return resp;
        };
        if resp
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n > self.max_entry)
        {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        // Read up to max_entry bytes; a body that turns out longer is passed on as it comes.
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size = 0u64;
        let mut body = body;
        loop {
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        size += data.len() as u64;
                        chunks.push(data);
                        if size > self.max_entry {
                            return Response::from_parts(parts, chain(chunks, body));
                        }
                    }
                    // Trailers: not cached; pass the answer on as it is.
                    Err(frame) => {
                        let rest = http_body_util::StreamBody::new(futures_util::stream::iter(
                            chunks
                                .into_iter()
                                .map(|c| Ok(hyper::body::Frame::data(c)))
                                .chain(std::iter::once(Ok(frame))),
                        ));
                        return Response::from_parts(parts, rest.boxed());
                    }
                },
                Some(Err(e)) => {
                    let rest = http_body_util::StreamBody::new(futures_util::stream::iter(
                        chunks
                            .into_iter()
                            .map(|c| Ok(hyper::body::Frame::data(c)))
                            .chain(std::iter::once(Err(e))),
                    ));
                    return Response::from_parts(parts, rest.boxed());
                }
                None => break,
            }
        }
        let body = if chunks.len() == 1 {
            chunks.pop().unwrap_or_default()
        } else {
            Bytes::from(chunks.concat())
        };
        let mut headers = parts.headers.clone();
        headers.remove(header::AGE);
        self.store.insert(
            guard.key.clone(),
            Arc::new(Stored {
                status: parts.status,
                headers,
                body: body.clone(),
                stored_at: Instant::now(),
                ttl,
            }),
        );
        let mut resp = Response::from_parts(parts, Full::new(body).map_err(|e| match e {}).boxed());
        mark(&mut resp, "MISS");
        resp
    }

    /// How long `resp` may be served from the cache, if at all.
    fn freshness(&self, resp: &Response<DownBody>) -> Option<Duration> {
        if !matches!(
            resp.status().as_u16(),
            200 | 203 | 204 | 300 | 301 | 404 | 410
        ) {
            return None;
        }
        let h = resp.headers();
        if h.contains_key(header::SET_COOKIE) || h.contains_key(header::VARY) {
            return None;
        }
        let mut max_age = None;
        let mut s_maxage = None;
        for directive in h
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let directive = directive.trim().to_ascii_lowercase();
            let (name, arg) = directive
                .split_once('=')
                .map_or((directive.as_str(), None), |(n, a)| {
                    (n, Some(a.trim_matches('"')))
                });
            match name {
                "no-store" | "no-cache" | "private" => return None,
                "max-age" => max_age = arg.and_then(|a| a.parse::<u64>().ok()),
                "s-maxage" => s_maxage = arg.and_then(|a| a.parse::<u64>().ok()),
                _ => {}
            }
        }
        let ttl = if let Some(secs) = s_maxage.or(max_age) {
            // Time it already spent in caches upstream counts (RFC 9111 §4.2.3).
            let age = h
                .get(header::AGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            Duration::from_secs(secs.saturating_sub(age))
        } else if let Some(expires) = h.get(header::EXPIRES) {
            // An unparsable Expires means "already expired" (RFC 9111 §5.3).
            expires
                .to_str()
                .ok()
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .and_then(|at| at.duration_since(SystemTime::now()).ok())
                .unwrap_or_default()
        } else {
            self.default_ttl
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

/// Whether a request must go past the cache.
pub(crate) fn bypass(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
        || headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .chain(headers.get_all(header::PRAGMA).iter())
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                let v = v.to_ascii_lowercase();
                v.contains("no-cache") || v.contains("no-store")
            })
}

/// Sets `X-Cache`.
pub(crate) fn mark(resp: &mut Response<DownBody>, state: &'static str) {
    resp.headers_mut()
        .insert("x-cache", HeaderValue::from_static(state));
}

/// The chunks already read, then the rest of the body.
fn chain(chunks: Vec<Bytes>, rest: DownBody) -> DownBody {
    let head = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, crate::bodies::BoxError>(hyper::body::Frame::data(c))),
    );
    let tail = http_body_util::BodyStream::new(rest);
    http_body_util::StreamBody::new(futures_util::StreamExt::chain(head, tail)).boxed()
}
