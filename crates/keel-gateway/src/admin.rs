//! The admin port: Prometheus metrics and a JSON API.
//!
//! - `GET /health`: `200 {"status":"serving"}`, or `503 {"status":"draining"}` once the
//!   gateway stops (no token needed, for load balancers and supervisors).
//! - `GET /metrics`: Prometheus text (no token needed, for scrapers).
//! - `GET /status`: JSON: version, uptime, connections, routes, upstreams, reloads (no token
//!   needed; it names no secret).
//! - `GET /admin/routes`: the routes in order, with their request counts.
//! - `GET /admin/upstreams`: every pool and server: health, ejection, requests in flight,
//!   latency estimate, queue depth.
//! - `POST /admin/reload`: with an empty body, re-reads the configuration file; with a body,
//!   applies it as the new configuration (TOML). 200 `{"reloaded": true}`, or 400
//!   `{"error": "invalid_config", "detail": ...}` and the old configuration keeps serving.
//!
//! With `[admin] token` set, everything but `/health`, `/metrics` and `/status` needs
//! `Authorization: Bearer <token>`.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::access::AccessLog;
use crate::metrics::{Metrics, escape};
use crate::upstream::Pool;
use crate::{Gateway, GatewayConfig};

type AdminBody = Full<Bytes>;

fn json(status: StatusCode, value: &serde_json::Value) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn fail(status: StatusCode, code: &str, detail: impl std::fmt::Display) -> Response<AdminBody> {
    json(
        status,
        &serde_json::json!({ "error": code, "detail": detail.to_string() }),
    )
}

/// Connections the admin port keeps open at once; it serves operators and scrapers, not
/// traffic.
const ADMIN_MAX_CONNECTIONS: usize = 256;

pub(crate) async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    keel_net::AcceptLoop::new(Arc::default())
        .max_connections(ADMIN_MAX_CONNECTIONS)
        .shutdown_grace(std::time::Duration::from_secs(5))
        .run(listener, shutdown, move |stream, _, drain| {
            let gateway = gateway.clone();
            let service = hyper::service::service_fn(move |req| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&gateway, req).await) }
            });
            keel_net::serve_http1(stream, service, std::time::Duration::from_secs(10), drain)
        })
        .await
}

async fn handle(gateway: &Gateway, req: Request<Incoming>) -> Response<AdminBody> {
    let shared = gateway.inner.current.load_full();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(gateway.render_metrics())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return resp;
        }
        (&Method::GET, "/health") => {
            return if gateway.inner.stopping.is_cancelled() {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "draining"}),
                )
            } else {
                json(StatusCode::OK, &serde_json::json!({"status": "serving"}))
            };
        }
        (&Method::GET, "/status") => {
            let m = &gateway.inner.metrics;
            return json(
                StatusCode::OK,
                &serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_s": gateway.inner.started.elapsed().as_secs(),
                    "connections_open": m.connections.open.load(Ordering::Relaxed),
                    "connections_accepted": m.connections.accepted.load(Ordering::Relaxed),
                    "connections_refused": m.connections.refused.load(Ordering::Relaxed),
                    "routes": shared.router.routes().len(),
                    "upstreams": shared.pools.len(),
                    "servers": shared.pools.iter().map(|p| p.servers().len()).sum::<usize>(),
                    "reloads": m.reloads.load(Ordering::Relaxed),
                    "reloads_refused": m.reloads_refused.load(Ordering::Relaxed),
                }),
            );
        }
        _ => {}
    }
    if let Some(token) = shared.config.admin.as_ref().and_then(|a| a.token.as_ref()) {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| keel_net::constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return fail(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the admin API needs Authorization: Bearer <admin token>",
            );
        }
    }
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/admin/routes") => {
            let routes: Vec<serde_json::Value> = shared
                .router
                .routes()
                .iter()
                .map(|r| r.describe(&shared.pools))
                .collect();
            json(StatusCode::OK, &serde_json::Value::from(routes))
        }
        (Method::GET, "/admin/upstreams") => {
            let mut out = serde_json::Map::new();
            for pool in &shared.pools {
                let servers: Vec<serde_json::Value> = pool
                    .servers()
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "address": s.address,
                            "weight": s.weight,
                            "healthy": s.healthy.load(Ordering::Relaxed),
                            "ejected": s.stats.is_ejected(),
                            "up": s.is_up(),
                            "inflight": s.stats.inflight(),
                            "latency_us": s.stats.latency_us(),
                            "requests": s.requests.load(Ordering::Relaxed),
                            "failures": s.failures.load(Ordering::Relaxed),
                            "idle_connections": s.idle.len(),
                        })
                    })
                    .collect();
                let queue = pool.queue.as_ref().map(|q| {
                    serde_json::json!({
                        "max_inflight": q.max_inflight,
                        "inflight": q.inflight(),
                        "waiting": q.waiting(),
                        "rejected": q.rejected(),
                    })
                });
                out.insert(
                    pool.name.clone(),
                    serde_json::json!({
                        "balancer": pool.balancer_name,
                        "protocol": if pool.h2 { "h2c" } else { "http1" },
                        "health_checks": pool.health.is_some(),
                        "discovery": pool.config.discovery.as_ref().map(|d| &d.service),
                        "queue": queue,
                        "servers": servers,
                    }),
                );
            }
            json(StatusCode::OK, &serde_json::Value::Object(out))
        }
        (Method::POST, "/admin/reload") => {
            let (parts, body) = req.into_parts();
            let limits = keel_rpc::http_body::BodyLimits::new(4 << 20);
            let body = match keel_rpc::http_body::read(&parts.headers, body, limits).await {
                Ok(body) => body,
                Err(e) => return fail(e.status(), e.code(), e),
            };
            let result = if body.iter().all(u8::is_ascii_whitespace) {
                gateway.reload_file().await
            } else {
                match std::str::from_utf8(&body)
                    .map_err(|_| crate::ConfigError::Parse("the body is not UTF-8".into()))
                    .and_then(GatewayConfig::parse)
                {
                    Ok(config) => gateway.reload(config).await,
                    Err(e) => {
                        gateway
                            .inner
                            .metrics
                            .reloads_refused
                            .fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            };
            match result {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "reloaded": true })),
                Err(e) => fail(StatusCode::BAD_REQUEST, "invalid_config", e),
            }
        }
        (_, "/admin/routes" | "/admin/upstreams" | "/admin/reload") => fail(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see the admin API in docs/gateway.md",
        ),
        (_, path) => fail(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {path}"),
        ),
    }
}

/// Prometheus text exposition (version 0.0.4), with the pools and access log of the
/// configuration in force.
pub(crate) fn render(metrics: &Metrics, pools: &[Arc<Pool>], access: Option<&AccessLog>) -> String {
    let mut out = String::with_capacity(4096);
    let routes = metrics.routes();
    out.push_str("# HELP keel_gateway_requests_total Requests answered, by route and status class.\n# TYPE keel_gateway_requests_total counter\n");
    for (name, m) in &routes {
        m.render_classes(&mut out, "keel_gateway_requests_total", "route", name);
    }
    let _ = writeln!(
        out,
        "keel_gateway_requests_total{{route=\"\",class=\"4xx\"}} {}",
        metrics.unrouted.load(Relaxed)
    );
    out.push_str("# HELP keel_gateway_request_duration_seconds Time to the response head, by route.\n# TYPE keel_gateway_request_duration_seconds histogram\n");
    for (name, m) in &routes {
        m.render_histogram(
            &mut out,
            "keel_gateway_request_duration_seconds",
            "route",
            name,
        );
    }
    out.push_str("# HELP keel_gateway_upstream_responses_total Answers from each pool's servers (502/504 for none), by status class.\n# TYPE keel_gateway_upstream_responses_total counter\n");
    for pool in pools {
        pool.responses.render_classes(
            &mut out,
            "keel_gateway_upstream_responses_total",
            "upstream",
            &pool.name,
        );
    }
    out.push_str("# HELP keel_gateway_upstream_response_seconds Time from sending to a server to its response head, by pool.\n# TYPE keel_gateway_upstream_response_seconds histogram\n");
    for pool in pools {
        pool.responses.render_histogram(
            &mut out,
            "keel_gateway_upstream_response_seconds",
            "upstream",
            &pool.name,
        );
    }
    out.push_str("# HELP keel_gateway_upstream_server_up 1 if the server may take traffic (healthy and not ejected).\n# TYPE keel_gateway_upstream_server_up gauge\n");
    let mut per_server = String::new();
    let mut per_pool = String::new();
    for pool in pools {
        let up = escape(&pool.name);
        for s in pool.servers().iter() {
            let labels = format!("upstream=\"{up}\",server=\"{}\"", escape(&s.address));
            let _ = writeln!(
                out,
                "keel_gateway_upstream_server_up{{{labels}}} {}",
                u8::from(s.is_up())
            );
            let _ = writeln!(
                per_server,
                "keel_gateway_upstream_requests_total{{{labels}}} {}\nkeel_gateway_upstream_failures_total{{{labels}}} {}\nkeel_gateway_upstream_inflight{{{labels}}} {}",
                s.requests.load(Relaxed),
                s.failures.load(Relaxed),
                s.stats.inflight()
            );
        }
        let (waiting, rejected) = pool
            .queue
            .as_ref()
            .map_or((0, 0), |q| (q.waiting(), q.rejected()));
        let _ = writeln!(
            per_pool,
            "keel_gateway_upstream_queue_depth{{upstream=\"{up}\"}} {waiting}\nkeel_gateway_upstream_queue_rejected_total{{upstream=\"{up}\"}} {rejected}\nkeel_gateway_upstream_retries_total{{upstream=\"{up}\"}} {}\nkeel_gateway_upstream_retry_budget_exhausted_total{{upstream=\"{up}\"}} {}",
            pool.retries.retries.load(Relaxed),
            pool.retries.budget_exhausted.load(Relaxed)
        );
    }
    out.push_str("# TYPE keel_gateway_upstream_requests_total counter\n# TYPE keel_gateway_upstream_failures_total counter\n# TYPE keel_gateway_upstream_inflight gauge\n");
    out.push_str(&per_server);
    out.push_str("# HELP keel_gateway_upstream_queue_depth Requests waiting for an upstream slot.\n# TYPE keel_gateway_upstream_queue_depth gauge\n# TYPE keel_gateway_upstream_queue_rejected_total counter\n# HELP keel_gateway_upstream_retries_total Requests sent again to another server after no answer.\n# TYPE keel_gateway_upstream_retries_total counter\n# HELP keel_gateway_upstream_retry_budget_exhausted_total Retries the retry budget refused.\n# TYPE keel_gateway_upstream_retry_budget_exhausted_total counter\n");
    out.push_str(&per_pool);
    for (name, kind, value) in [
        (
            "connections_open",
            "gauge",
            metrics.connections.open.load(Relaxed),
        ),
        (
            "connections_accepted_total",
            "counter",
            metrics.connections.accepted.load(Relaxed) as i64,
        ),
        (
            "connections_refused_total",
            "counter",
            metrics.connections.refused.load(Relaxed) as i64,
        ),
        (
            "tls_handshake_failures_total",
            "counter",
            metrics.tls_handshake_failures.load(Relaxed) as i64,
        ),
        (
            "reloads_total",
            "counter",
            metrics.reloads.load(Relaxed) as i64,
        ),
        (
            "reloads_refused_total",
            "counter",
            metrics.reloads_refused.load(Relaxed) as i64,
        ),
    ] {
        let _ = writeln!(
            out,
            "# TYPE keel_gateway_{name} {kind}\nkeel_gateway_{name} {value}"
        );
    }
    if let Some(access) = access {
        let _ = writeln!(
            out,
            "# TYPE keel_gateway_access_log_dropped_total counter\nkeel_gateway_access_log_dropped_total {}",
            access.dropped()
        );
    }
    out
}
