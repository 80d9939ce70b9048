//! The Keel RPC server.
//!
//! - [`Server`] / [`ServerBuilder`]: configuration, service registration, the accept loop with
//!   a connection cap, and graceful shutdown (goaway, drain up to a grace period, close).
//! - `conn`: one binary connection: a reader that dispatches each request to its own task, a
//!   writer that batches replies, cancel, ping, in-flight cap, idle timeout.
//! - `http`: HTTP/1.1 on the same port (detected from the first bytes): `POST /{service}/{method}`
//!   with JSON, `GET /health`, `GET /metrics`, `GET /status`.
//! - [`service`]: [`ServiceDef`] and the handler [`Context`].
//! - [`metrics`]: lock-free counters and their Prometheus rendering.

mod conn;
mod http;
mod limit;
pub mod metrics;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::BytesMut;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub use metrics::{Histogram, MethodStats, ServerStats};
pub use service::{Context, IntoService, ResponseStream, ServiceDef};

use crate::protocol::{DEFAULT_MAX_FRAME_SIZE, MAGIC};
use service::Handler;

/// Server limits and timeouts. Every field has a default; see `docs/operations.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections served at once; over the cap a new connection is closed at once.
    pub max_connections: usize,
    /// Calls running at once on one connection; over the cap a call gets `overloaded`.
    pub max_inflight_per_connection: usize,
    /// Largest frame accepted (header + metadata + body), in bytes.
    pub max_frame_size: u32,
    /// A connection with no call running and nothing received for this long is closed.
    #[serde(with = "keel_net::duration::ms", rename = "idle_timeout_ms")]
    pub idle_timeout: Duration,
    /// How long a new connection may take to send its first bytes (and, over HTTP, how long
    /// a request's head may take to arrive).
    #[serde(with = "keel_net::duration::ms", rename = "handshake_timeout_ms")]
    pub handshake_timeout: Duration,
    /// Over HTTP, how long a request's body may take to arrive whole; later, it gets 408.
    #[serde(with = "keel_net::duration::ms", rename = "body_timeout_ms")]
    pub body_timeout: Duration,
    /// On shutdown, how long in-flight calls may take to finish before they are cut off.
    #[serde(with = "keel_net::duration::ms", rename = "shutdown_grace_ms")]
    pub shutdown_grace: Duration,
    /// Answer HTTP/1.1 on the same port.
    pub http: bool,
    /// Calls running at once on the whole server; beyond it a call gets `overloaded` at once.
    /// 0: no fixed limit.
    pub max_concurrency: usize,
    /// Adapt the concurrency limit to measured throughput and no-load latency (brpc's auto
    /// concurrency limiter), within `max_concurrency` if that is set; also refuse calls whose
    /// deadline is nearer than the no-load latency. See `server/limit.rs`.
    pub adaptive_limit: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 10_000,
            max_inflight_per_connection: 4096,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            body_timeout: crate::http_body::DEFAULT_BODY_TIMEOUT,
            shutdown_grace: Duration::from_secs(10),
            http: true,
            max_concurrency: 0,
            adaptive_limit: false,
        }
    }
}

/// One registered method.
#[derive(Debug)]
pub(crate) struct MethodEntry {
    pub(crate) handler: Handler,
    pub(crate) stats: Arc<MethodStats>,
}

/// Everything connections share, read-only after start except atomics.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    /// Keyed by the names' bytes, so a request routes on what it carried, without a UTF-8 check.
    routes: Routes,
    pub(crate) method_list: Vec<(Arc<str>, Arc<str>, Arc<MethodStats>)>,
    pub(crate) stats: ServerStats,
    pub(crate) started: Instant,
    pub(crate) limiter: Arc<limit::Limiter>,
}

/// Services by name, each with its methods by name.
type Routes = FxHashMap<Box<[u8]>, FxHashMap<Box<[u8]>, Arc<MethodEntry>>>;

/// A method found in the routing table, with the table's own copies of its names (which
/// live as long as the server).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route<'a> {
    pub(crate) service: &'a [u8],
    pub(crate) method: &'a [u8],
    pub(crate) entry: &'a Arc<MethodEntry>,
}

/// Why a call could not be routed.
pub(crate) enum RouteError {
    NoService,
    NoMethod,
}

impl Shared {
    pub(crate) fn route(
        &self,
        service: impl AsRef<[u8]>,
        method: impl AsRef<[u8]>,
    ) -> Result<&Arc<MethodEntry>, RouteError> {
        self.route_keys(service.as_ref(), method.as_ref())
            .map(|route| route.entry)
    }

    /// Routes a call by the bytes of its names.
    pub(crate) fn route_keys(
        &self,
        service: &[u8],
        method: &[u8],
    ) -> Result<Route<'_>, RouteError> {
        let (service, methods) = self
            .routes
            .get_key_value(service)
            .ok_or(RouteError::NoService)?;
        let (method, entry) = methods.get_key_value(method).ok_or(RouteError::NoMethod)?;
        Ok(Route {
            service,
            method,
            entry,
        })
    }
}

/// Builds a [`Server`].
#[derive(Debug, Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    services: Vec<ServiceDef>,
}

impl ServerBuilder {
    /// Replaces the configuration.
    pub fn config(mut self, config: ServerConfig) -> ServerBuilder {
        self.config = config;
        self
    }

    /// Registers a service. A later service with the same name replaces an earlier one.
    pub fn add_service(mut self, service: impl IntoService) -> ServerBuilder {
        self.services.push(service.into_service());
        self
    }

    /// Freezes the routing table.
    pub fn build(self) -> Server {
        let mut routes = Routes::default();
        for def in self.services {
            let methods = routes.entry(def.name.into_bytes().into()).or_default();
            methods.clear();
            for (name, handler) in def.methods {
                let entry = Arc::new(MethodEntry {
                    handler,
                    stats: Arc::default(),
                });
                methods.insert(name.into_bytes().into(), entry);
            }
        }
        // The keys came from `String`s, so they are UTF-8.
        let text = |bytes: &[u8]| Arc::from(String::from_utf8_lossy(bytes));
        let mut method_list: Vec<_> = routes
            .iter()
            .flat_map(|(s, ms)| ms.iter().map(|(m, e)| (text(s), text(m), e.stats.clone())))
            .collect();
        method_list.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let limiter = Arc::new(limit::Limiter::new(
            self.config.max_concurrency,
            self.config.adaptive_limit,
        ));
        Server {
            shared: Arc::new(Shared {
                limiter,
                config: self.config,
                routes,
                method_list,
                stats: ServerStats::default(),
                started: Instant::now(),
            }),
        }
    }
}

/// A Keel RPC server: binary protocol and HTTP/1.1 on one port.
#[derive(Clone, Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Starts building a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Server-wide counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Counters of one method, if it is registered.
    pub fn method_stats(&self, service: &str, method: &str) -> Option<Arc<MethodStats>> {
        self.shared
            .route(service, method)
            .ok()
            .map(|e| e.stats.clone())
    }

    /// The concurrency limit in force now (fixed or adaptive); `None` without one.
    pub fn concurrency_limit(&self) -> Option<usize> {
        let limiter = &self.shared.limiter;
        limiter.is_active().then(|| limiter.limit())
    }

    /// The `/metrics` page as text.
    pub fn render_metrics(&self) -> String {
        metrics::render(&self.shared)
    }

    /// Serves connections from `listener` until `shutdown` completes, then shuts down
    /// gracefully: every connection gets a goaway, in-flight calls get up to
    /// [`ServerConfig::shutdown_grace`] to finish, and whatever is left is cut off.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let config = &self.shared.config;
        let shared = self.shared.clone();
        keel_net::AcceptLoop::new(self.shared.stats.connections.clone())
            .max_connections(config.max_connections)
            .shutdown_grace(config.shutdown_grace)
            .run(listener, shutdown, move |stream, peer, drain| {
                serve_connection(shared.clone(), stream, peer, drain)
            })
            .await
    }

    /// Binds `addr` and serves until `shutdown`; see [`Server::serve`].
    pub async fn bind_and_serve(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        self.serve(listener, shutdown).await
    }
}

/// Reads the first bytes and hands the connection to the protocol they announce.
async fn serve_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    lifecycle: keel_net::Drain,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let sniff = async {
        while buf.len() < MAGIC.len() {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
        }
        Ok(true)
    };
    match tokio::time::timeout(shared.config.handshake_timeout, sniff).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(%peer, "no bytes before the handshake timeout; closing");
            return;
        }
    }
    if buf[..2] == MAGIC {
        conn::serve_binary(shared, stream, buf, peer, lifecycle).await;
    } else if shared.config.http {
        http::serve_http(shared, stream, buf, peer, lifecycle).await;
    } else {
        shared.stats.protocol_errors.fetch_add(1, Relaxed);
        tracing::debug!(%peer, "not a Keel frame and HTTP is off; closing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_documented_field_names_and_refuses_unknown_ones() {
        let config: ServerConfig = serde_json::from_str(
            r#"{"max_connections": 5, "idle_timeout_ms": 1500, "shutdown_grace_ms": 20}"#,
        )
        .unwrap();
        assert_eq!(config.max_connections, 5);
        assert_eq!(config.idle_timeout, Duration::from_millis(1500));
        assert_eq!(config.shutdown_grace, Duration::from_millis(20));
        assert_eq!(config.max_frame_size, DEFAULT_MAX_FRAME_SIZE);
        let err = serde_json::from_str::<ServerConfig>(r#"{"idle_timeout": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
