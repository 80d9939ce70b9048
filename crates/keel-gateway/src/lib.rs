//! Keel's gateway: a reverse proxy and load balancer in front of the services.
//!
//! - [`config`]: the TOML configuration, checked on load with clear errors.
//! - `router`: routes by host, path (exact or prefix), method and headers, with prefix
//!   rewriting; a route proxies to an upstream pool or serves a directory.
//! - `upstream`: pools of servers with weights, a balancer (the same ones RPC callers use, from
//!   `keel-governance`, plus hashing by header or cookie and sticky sessions), active and
//!   passive health, a bounded wait queue, and a pooled keep-alive client (HTTP/1.1 or h2c).
//! - `auth`: per-route API keys and JWTs (HS256, RS256), forwarding chosen claims.
//! - `filter`: per-route client address allow/deny lists and token-bucket rate limits.
//! - One path for every request. `fast` (Keel's HTTP/1.1 loop, `httparse` heads) and `front`
//!   (hyper, for HTTP/2, upgrades and streamed bodies; `fast` hands a connection over to it
//!   mid-stream) read requests; `plan` decides, once, what serves each one (route, filters,
//!   header edits, replayability, timeout, leg); `proxy::respond` serves directories, the
//!   cache, the RPC bridge and hyper's leg; `forward` is the one attempt loop (queue,
//!   balancer, retries, statistics) over a `forward::Leg`: Keel's HTTP/1.1 leg (`h1`) or
//!   hyper's client (`proxy`). `headers` reads either kind of head; `state` holds the
//!   configuration in force.
//! - `bridge`: routes to Keel RPC services (JSON in, JSON out) through governed channels.
//! - `cache`: per-route response cache with miss coalescing; `static_files`: files with
//!   conditional and range requests.
//! - `framing`: follows the framing of HTTP/1 requests to refuse ambiguous ones (request
//!   smuggling) with 400, and of chunked bodies (`Chunked`, also for relaying answers);
//!   `conns`: the janitor of idle connections; `bodies`: body limits and stall timeouts;
//!   `error`: the gateway's errors, each with its side, status and code.
//! - `admin`: Prometheus metrics, routes and upstream states as JSON, and reload, on their own
//!   port; `access`: the access log.
//!
//! HTTP/1.1 and HTTP/2 downstream (h2c, or TLS with ALPN). A [`Gateway`] can be reloaded with a
//! new configuration while it serves: requests already routed finish on the old one, open
//! client connections carry on with the new one, and pools whose settings did not change keep
//! their connections, health and statistics.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod access;
mod admin;
mod auth;
mod bodies;
mod bridge;
mod cache;
pub mod config;
mod conns;
mod error;
mod fast;
mod filter;
mod forward;
mod framing;
mod front;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
mod h1;
mod headers;
mod metrics;
mod plan;
mod proxy;
mod router;
mod state;
mod static_files;
mod tls;
mod upstream;

pub use auth::{AuthConfig, JwtConfig};
pub use config::{ConfigError, GatewayConfig};
pub use gate::GateConfig;

use state::{Inner, Shared};

/// A configured gateway. Cheap to clone; clones share state and reloads.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// Builds a gateway from a checked configuration.
    pub fn new(config: GatewayConfig) -> Result<Gateway, ConfigError> {
        Gateway::build(config, None)
    }

    /// Builds a gateway from a configuration file, which [`Gateway::reload_file`] re-reads.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Gateway, ConfigError> {
        let path = path.into();
        let config = GatewayConfig::load(&path.to_string_lossy())?;
        Gateway::build(config, Some(path))
    }

    fn build(config: GatewayConfig, path: Option<PathBuf>) -> Result<Gateway, ConfigError> {
        let metrics = metrics::Metrics::default();
        let shared = compile(config, None, &metrics)?;
        Ok(Gateway {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(shared),
                path,
                metrics,
                reloading: tokio::sync::Mutex::new(()),
                stopping: CancellationToken::new(),
                started: std::time::Instant::now(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> GatewayConfig {
        self.inner.current.load().config.clone()
    }

    /// Applies a new configuration without dropping requests in flight or open connections.
    /// An invalid one is refused with the reason and the old one keeps serving. The listen
    /// address and the admin listener are fixed at start; changes to them are refused.
    pub async fn reload(&self, config: GatewayConfig) -> Result<(), ConfigError> {
        let _one_at_a_time = self.inner.reloading.lock().await;
        let old = self.inner.current.load_full();
        let result = if config.server.listen != old.config.server.listen
            || config.admin != old.config.admin
        {
            Err(ConfigError::Invalid(
                "server.listen and [admin] cannot change on reload; restart for that".into(),
            ))
        } else {
            compile(config, Some(&old), &self.inner.metrics)
        };
        match result {
            Ok(shared) => {
                start_background(&shared);
                self.inner.current.store(Arc::new(shared));
                self.inner.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.inner
                    .metrics
                    .reloads_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reload refused; the old configuration stays");
                Err(e)
            }
        }
    }

    /// Re-reads the file the gateway was built from (see [`Gateway::from_file`]) and applies
    /// it as [`Gateway::reload`] does.
    pub async fn reload_file(&self) -> Result<(), ConfigError> {
        let loaded = match &self.inner.path {
            None => Err(ConfigError::Invalid(
                "this gateway was not started from a file".into(),
            )),
            Some(path) => GatewayConfig::load(&path.to_string_lossy()),
        };
        match loaded {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                self.inner
                    .metrics
                    .reloads_refused
                    .fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Prometheus text of the gateway's metrics (what the admin port serves at `/metrics`).
    pub fn render_metrics(&self) -> String {
        let shared = self.inner.current.load();
        admin::render(&self.inner.metrics, &shared.pools, shared.access.as_deref())
    }

    /// Serves the admin API (see the `admin` module docs) on `listener` until `shutdown`.
    pub async fn serve_admin(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        admin::serve(self, listener, shutdown).await
    }

    /// Serves connections from `listener` until `shutdown` completes, then lets the requests
    /// in flight finish (connections close as they go idle).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let conns = Arc::new(conns::Conns::default());
        start_background(&self.inner.current.load());
        // The janitor: closes idle client connections (the timeout as configured now, checked
        // every half of it, at most every second), and idle server connections the servers have
        // closed or that were idle too long.
        let janitor = {
            let (conns, inner) = (conns.clone(), self.inner.clone());
            tokio::spawn(async move {
                loop {
                    let idle = inner.current.load().config.server.idle_timeout;
                    let period = (idle / 2).clamp(
                        std::time::Duration::from_millis(10),
                        std::time::Duration::from_secs(1),
                    );
                    tokio::time::sleep(period).await;
                    conns.sweep(idle);
                    for pool in &inner.current.load().pools {
                        for server in pool.servers().iter() {
                            server.idle.sweep();
                        }
                    }
                }
            })
        };
        // Shutdown starts with the gateway's own signals: idle keep-alive connections close
        // now, busy ones after their response, and tunnels end; then the accept loop drains.
        let stopping = {
            let (conns, inner) = (conns.clone(), self.inner.clone());
            async move {
                shutdown.await;
                conns.stop_all();
                inner.stopping.cancel();
            }
        };
        let (cap, grace) = (self.inner.clone(), self.inner.clone());
        let inner = self.inner.clone();
        let served = keel_net::AcceptLoop::new(self.inner.metrics.connections.clone())
            .max_connections_from(move || cap.current.load().config.server.max_connections)
            .shutdown_grace_from(move || grace.current.load().config.server.shutdown_grace)
            .run(listener, stopping, move |stream, peer, _drain| {
                let (inner, conns) = (inner.clone(), conns.clone());
                // Connections wind down through `conns`; one still busy after the grace
                // period (a stalled upstream, a client that stopped reading) is cut by the
                // accept loop.
                let serve = async move {
                    let (tls, header_timeout) = {
                        let shared = inner.current.load();
                        (shared.tls.clone(), shared.config.server.header_timeout)
                    };
                    let watched = conns.add();
                    let state = watched.state.clone();
                    match tls {
                        None => fast::serve(inner.clone(), stream, peer, false, state).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(header_timeout, acceptor.accept(stream))
                                .await
                            {
                                // HTTP/2 goes to hyper; HTTP/1 starts on the fast path.
                                Ok(Ok(stream))
                                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") =>
                                {
                                    front::serve_connection(
                                        inner.clone(),
                                        stream,
                                        bytes::Bytes::new(),
                                        peer,
                                        true,
                                        state,
                                    )
                                    .await;
                                }
                                Ok(Ok(stream)) => {
                                    fast::serve(inner.clone(), stream, peer, true, state).await;
                                }
                                Ok(Err(e)) => {
                                    inner
                                        .metrics
                                        .tls_handshake_failures
                                        .fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                }
                                Err(_) => {
                                    inner
                                        .metrics
                                        .tls_handshake_failures
                                        .fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    drop(watched);
                };
                // (One still open after the grace period is aborted by the accept loop.)
                serve
            })
            .await;
        janitor.abort();
        served
    }
}

/// Starts the background work of a compiled configuration (once each): the pools' health
/// checks and registry watches, and the gates' watches.
fn start_background(shared: &Shared) {
    for pool in &shared.pools {
        upstream::start(pool);
    }
    for route in shared.router.routes() {
        if let Some(g) = &route.gate {
            gate::start(g);
        }
    }
}

/// Compiles `config`, keeping from `old` the pools whose settings are unchanged and the
/// access log if it goes to the same place.
fn compile(
    config: GatewayConfig,
    old: Option<&Shared>,
    metrics: &metrics::Metrics,
) -> Result<Shared, ConfigError> {
    let names: Vec<&String> = config.upstreams.keys().collect();
    let pools: Vec<Arc<upstream::Pool>> = config
        .upstreams
        .iter()
        .map(|(name, up)| {
            let previous = old.and_then(|o| o.pools.iter().find(|p| &p.name == name));
            match previous {
                Some(p) if p.config == *up => p.clone(),
                Some(p) if up.discovery.is_some() && p.config.discovery == up.discovery => {
                    // Other settings, same registry service: start from the servers known
                    // now (with their statistics) until the new watch reports.
                    let pool = upstream::Pool::new(name, up);
                    pool.adopt_servers(p);
                    Arc::new(pool)
                }
                _ => Arc::new(upstream::Pool::new(name, up)),
            }
        })
        .collect();
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let upstream = r
                .upstream
                .as_ref()
                .map(|u| {
                    names.iter().position(|n| *n == u).ok_or_else(|| {
                        ConfigError::Invalid(format!("route {} names no upstream", i + 1))
                    })
                })
                .transpose()?;
            let name = r.name.clone().unwrap_or_else(|| format!("route-{}", i + 1));
            let route_metrics = metrics.route(&name);
            router::Route::compile(r, name, upstream, route_metrics)
                .map_err(|e| ConfigError::Invalid(format!("route {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tls = config
        .server
        .tls
        .as_ref()
        .map(tls::acceptor)
        .transpose()
        .map_err(ConfigError::Invalid)?;
    let access = match &config.server.access_log {
        None => None,
        Some(target) => match old.and_then(|o| o.access.as_ref()) {
            Some(log) if log.target == *target => Some(log.clone()),
            _ => Some(Arc::new(access::AccessLog::open(target).map_err(|e| {
                ConfigError::Invalid(format!("access_log {target:?}: {e}"))
            })?)),
        },
    };
    Ok(Shared {
        router: router::Router::new(routes),
        pools,
        tls,
        access,
        config,
    })
}
