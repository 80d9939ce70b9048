//! Keel's gateway: a reverse proxy and load balancer in front of the services.
//!
//! - [`config`]: the TOML configuration, checked on load with clear errors.
//! - `router`: routes by host, path (exact or prefix), method and headers, with prefix
//!   rewriting.
//! - `upstream`: pools of servers with weights, a balancer (the same ones RPC callers use, from
//!   `keel-governance`), passive health (outlier ejection) and a pooled keep-alive client.
//! - `auth`: per-route API keys and JWTs (HS256, RS256), forwarding chosen claims.
//! - `filter`: per-route client address allow/deny lists and token-bucket rate limits.
//! - `proxy`: forwarding, hop-by-hop header handling, `X-Forwarded-*`, retries of connect
//!   failures for idempotent requests, JSON errors.
//!
//! HTTP/1.1 and HTTP/2 (h2c) downstream, detected per connection.

use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

mod auth;
pub mod config;
mod filter;
mod proxy;
mod router;
mod upstream;

pub use auth::{AuthConfig, JwtConfig};
pub use config::{ConfigError, GatewayConfig};

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    config: GatewayConfig,
    router: router::Router,
    pools: Vec<Arc<upstream::Pool>>,
}

/// A configured gateway. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Builds a gateway from a checked configuration.
    pub fn new(config: GatewayConfig) -> Result<Gateway, ConfigError> {
        let names: Vec<&String> = config.upstreams.keys().collect();
        let pools = config
            .upstreams
            .iter()
            .map(|(name, up)| Arc::new(upstream::Pool::new(name, up)))
            .collect();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let upstream = names
                    .iter()
                    .position(|n| **n == r.upstream)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!("route {} names no upstream", i + 1))
                    })?;
                router::Route::compile(r, upstream)
                    .map_err(|e| ConfigError::Invalid(format!("route {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                router: router::Router::new(routes),
                pools,
                config,
            }),
        })
    }

    /// Serves connections from `listener` until `shutdown` completes, then lets the requests
    /// in flight finish (connections close as they go idle).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        // Active health checks, one task per checked server, for as long as we serve.
        let mut checks = tokio::task::JoinSet::new();
        for pool in &self.shared.pools {
            if pool.health.is_some() {
                for index in 0..pool.servers.len() {
                    checks.spawn(upstream::check_health(pool.clone(), index));
                }
            }
        }
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let header_timeout = shared.config.server.header_timeout;
            let stop = stop.clone();
            tracker.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(proxy::handle(shared, req, peer).await)
                    }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        checks.abort_all();
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}
