//! HTTP/1.1 on the RPC port, so `curl` can call any Keel service.
//!
//! - `POST /{service}/{method}` with a JSON body calls the method with the JSON codec. A
//!   unary reply is the JSON message; a server stream is newline-delimited JSON, one message
//!   per line, ending with an `{"error": ...}` line if the stream fails midway. Errors are
//!   `{"error": "<status name>", "message": "..."}` with an HTTP status that fits the code.
//!   An optional `keel-timeout-ms` header sets the deadline.
//! - `GET /health`: `200 {"status":"serving"}`, or `503 {"status":"draining"}` during shutdown.
//! - `GET /metrics`: Prometheus text.
//! - `GET /status`: uptime, connections, in-flight calls, per-method counts and latency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::conn::{panicked, run_unary};
use super::service::{Context, Handler};
use super::{MethodEntry, RouteError, Shared};
use crate::protocol::{Codec, Metadata};
use crate::status::{Code, Status};
use keel_net::{Drain, Rewind};

type Body = UnsyncBoxBody<Bytes, Infallible>;

pub(super) async fn serve_http(
    shared: Arc<Shared>,
    stream: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    lifecycle: Drain,
) {
    let service = {
        let shared = shared.clone();
        let drain = lifecycle.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let draining = drain.is_draining();
            async move { Ok::<_, Infallible>(handle(shared, req, peer, draining).await) }
        })
    };
    keel_net::serve_http1(
        Rewind::new(prefix.freeze(), stream),
        service,
        shared.config.handshake_timeout,
        lifecycle,
    )
    .await;
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

fn error_body(status: &Status) -> serde_json::Value {
    serde_json::json!({ "error": status.code().as_str(), "message": status.message() })
}

fn error_response(status: &Status) -> Response<Body> {
    let code = StatusCode::from_u16(status.code().http_status())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(code, &error_body(status))
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    draining: bool,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => {
            if draining {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "draining"}),
                )
            } else {
                json(StatusCode::OK, &serde_json::json!({"status": "serving"}))
            }
        }
        (&Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            super::metrics::render(&shared),
        ),
        (&Method::GET, "/status") => json(StatusCode::OK, &status_page(&shared)),
        (&Method::POST, _) => match call(&shared, req, &path, peer, draining).await {
            Ok(resp) => resp,
            Err(status) => error_response(&status),
        },
        (method, _) if method_path(&path).is_some_and(|(s, m)| shared.route(s, m).is_ok()) => {
            let mut resp = json(
                StatusCode::METHOD_NOT_ALLOWED,
                &error_body(&Status::invalid_argument(format!(
                    "{method} is not allowed on {path}: call methods with POST"
                ))),
            );
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            resp
        }
        _ => error_response(&Status::not_found(format!(
            "no route for {} {path}; call methods with POST /{{service}}/{{method}}",
            req.method()
        ))),
    }
}

fn status_page(shared: &Shared) -> serde_json::Value {
    let stats = &shared.stats;
    let methods: Vec<_> = shared
        .method_list
        .iter()
        .map(|(s, m, st)| {
            serde_json::json!({
                "service": &**s, "method": &**m,
                "calls": st.total(), "errors": st.total() - st.count(Code::Ok),
                "mean_latency_us": st.mean_latency().as_micros() as u64,
            })
        })
        .collect();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs(),
        "connections_open": stats.connections.open.load(Relaxed),
        "inflight_calls": stats.inflight.load(Relaxed),
        "concurrency_limit": shared.limiter.is_active().then(|| shared.limiter.limit()),
        "limited_calls_inflight": shared.limiter.is_active().then(|| shared.limiter.inflight()),
        "methods": methods,
    })
}

async fn call(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    peer: SocketAddr,
    draining: bool,
) -> Result<Response<Body>, Status> {
    if draining {
        return Err(Status::unavailable("server is shutting down"));
    }
    let Some((service, method)) = method_path(path) else {
        return Err(Status::not_found(format!(
            "{path} is not /{{service}}/{{method}}"
        )));
    };
    let entry = shared
        .route(service, method)
        .map_err(|e| {
            shared.stats.unknown_method_calls.fetch_add(1, Relaxed);
            match e {
                RouteError::NoService => Status::not_found(format!("unknown service {service:?}")),
                RouteError::NoMethod => {
                    Status::not_found(format!("unknown method {method:?} of service {service:?}"))
                }
            }
        })?
        .clone();
    let timeout = match req.headers().get("keel-timeout-ms") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "keel-timeout-ms must be a whole number of milliseconds",
                    )
                })?,
        ),
    };
    // `authorization` and `keel-meta-<key>` headers become the call's free metadata entries,
    // as a binary-protocol caller would send them.
    let mut metadata = Metadata::default();
    for (name, value) in req.headers() {
        let key = match name.as_str() {
            "authorization" => "authorization",
            other => match other.strip_prefix("keel-meta-") {
                Some(key) if !key.is_empty() => key,
                _ => continue,
            },
        };
        metadata
            .entries
            .push((key.into(), Bytes::copy_from_slice(value.as_bytes())));
    }
    let limits = crate::http_body::BodyLimits {
        max_bytes: shared.config.max_frame_size as usize,
        timeout: shared.config.body_timeout,
    };
    let (parts, body) = req.into_parts();
    let body = match crate::http_body::read(&parts.headers, body, limits).await {
        Ok(body) => body,
        Err(e) => {
            let status = Status::invalid_argument(e.to_string());
            return Ok(json(e.status(), &error_body(&status)));
        }
    };
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let ctx = Context {
        deadline,
        metadata: Box::new(metadata),
        peer: Some(peer),
        codec: Codec::Json,
    };
    let permit = super::conn::admit(shared, timeout)?;
    shared.stats.inflight.fetch_add(1, Relaxed);
    let mut record = Recorder {
        shared: shared.clone(),
        entry: entry.clone(),
        started,
        outcome: None,
        permit,
    };
    let start = match &entry.handler {
        Handler::Unary(handler) => {
            let result = run_unary(handler(ctx, body), deadline)
                .await
                .and_then(|reply| reply.into_bytes());
            record.outcome = Some(result.as_ref().err().map_or(Code::Ok, |s| s.code()));
            return result.map(|reply| full(StatusCode::OK, "application/json", reply));
        }
        Handler::ServerStreaming(handler) => AssertUnwindSafe(handler(ctx, body))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(panicked(&*panic))),
    };
    let stream = match start {
        Ok(stream) => stream,
        Err(status) => {
            record.outcome = Some(status.code());
            return Err(status);
        }
    };
    // A panic inside the stream becomes an error line, not a dead connection.
    let items = AssertUnwindSafe(stream)
        .catch_unwind()
        .map(|item| match item {
            Ok(item) => item,
            Err(panic) => Err(panicked(&*panic)),
        });
    let state = NdjsonState {
        items: Box::pin(items),
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        record,
    };
    let lines = futures_util::stream::unfold(state, next_line);
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(lines)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// `/{service}/{method}` split in two.
fn method_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// Counts an HTTP call in flight and records its outcome when it ends: for a stream, when the
/// last line has been produced, or, if the client goes away first, as `cancelled`.
struct Recorder {
    shared: Arc<Shared>,
    entry: Arc<MethodEntry>,
    started: Instant,
    outcome: Option<Code>,
    permit: Option<super::limit::Permit>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stats.inflight.fetch_sub(1, Relaxed);
        let code = self.outcome.unwrap_or(Code::Cancelled);
        self.entry.stats.record(code, self.started.elapsed());
        if code == Code::Ok
            && let Some(p) = &mut self.permit
        {
            p.succeeded();
        }
    }
}

type ItemStream = Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, Status>> + Send>>;

/// An NDJSON reply body in the making.
struct NdjsonState {
    items: ItemStream,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    record: Recorder,
}

/// The next line of an NDJSON reply: a message, or a final `{"error": ...}` line when the
/// stream fails or its deadline passes.
async fn next_line(
    mut state: NdjsonState,
) -> Option<(Result<BodyFrame<Bytes>, Infallible>, NdjsonState)> {
    if state.record.outcome.is_some() {
        return None;
    }
    let item = match state.deadline.as_mut() {
        Some(deadline) => tokio::select! {
            biased;
            item = state.items.next() => item,
            () = deadline.as_mut() => Some(Err(Status::deadline_exceeded(
                "deadline exceeded while the stream ran",
            ))),
        },
        None => state.items.next().await,
    };
    let mut line = match item {
        None => {
            state.record.outcome = Some(Code::Ok);
            return None;
        }
        Some(Ok(bytes)) => BytesMut::from(&bytes[..]),
        Some(Err(status)) => {
            state.record.outcome = Some(status.code());
            BytesMut::from(error_body(&status).to_string().as_bytes())
        }
    };
    line.extend_from_slice(b"\n");
    Some((Ok(BodyFrame::data(line.freeze())), state))
}
