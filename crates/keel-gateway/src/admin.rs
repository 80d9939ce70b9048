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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

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
