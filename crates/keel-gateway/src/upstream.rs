//! Upstream pools: servers with weights, a balancer, per-server statistics for passive health
//! (outlier ejection), and a pooled keep-alive HTTP client per pool.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_governance::balance::{self, Balancer, EndpointView};
use keel_governance::endpoint::{EndpointStats, OutlierConfig};
use tokio::time::Instant;

use crate::config::{HealthConfig, UpstreamConfig};

/// A request body on its way upstream.
pub(crate) type UpBody = BoxBody<bytes::Bytes, hyper::Error>;

/// One server of a pool.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) address: String,
    /// `address` parsed once, for building each request's URI.
    pub(crate) authority: http::uri::Authority,
    pub(crate) weight: u32,
    pub(crate) stats: EndpointStats,
    /// The active health check's verdict (always true without checks).
    pub(crate) healthy: AtomicBool,
}

/// A named pool.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: String,
    pub(crate) servers: Vec<Arc<Server>>,
    balancer: Box<dyn Balancer>,
    pub(crate) client: Client<HttpConnector, UpBody>,
    pub(crate) response_timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) outlier: OutlierConfig,
    pub(crate) health: Option<HealthConfig>,
}

impl Pool {
    pub(crate) fn new(name: &str, config: &UpstreamConfig) -> Pool {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Pool {
            name: name.to_owned(),
            servers: config
                .servers
                .iter()
                .map(|s| {
                    Arc::new(Server {
                        authority: s
                            .address
                            .parse()
                            .expect("server addresses are checked with the configuration"),
                        address: s.address.clone(),
                        weight: s.weight,
                        stats: EndpointStats::default(),
                        healthy: AtomicBool::new(true),
                    })
                })
                .collect(),
            balancer: balance::by_name(&config.balancer)
                .unwrap_or_else(|| Box::new(balance::RoundRobin::default())),
            client,
            response_timeout: config.response_timeout,
            max_attempts: config.max_attempts.max(1),
            outlier: OutlierConfig::default(),
            health: config.health.clone(),
        }
    }

    /// Picks a server, not one of `exclude`; the client address keys consistent hashing.
    pub(crate) fn pick(&self, client: Option<IpAddr>, exclude: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let views: Vec<EndpointView<'_>> = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| EndpointView {
                id: &s.address,
                weight: s.weight,
                available: !exclude.contains(&i)
                    && s.healthy.load(Ordering::Relaxed)
                    && s.stats.selectable(now),
                inflight: s.stats.inflight(),
                latency_us: s.stats.latency_us(),
            })
            .collect();
        let key = client.map(|ip| match ip {
            IpAddr::V4(v4) => balance::hash_key(&v4.octets()),
            IpAddr::V6(v6) => balance::hash_key(&v6.octets()),
        });
        self.balancer.pick(&views, key)
    }

    /// Whether one more server may be ejected (at most half of the pool at once).
    pub(crate) fn may_eject(&self) -> bool {
        let total = self.servers.len().max(1);
        let ejected = self.servers.iter().filter(|s| s.stats.is_ejected()).count();
        ((ejected + 1) as f64 / total as f64) <= self.outlier.max_ejected_share
    }
}

/// Probes one server for ever (until the task is dropped), flipping its health flag after
/// `rise` good or `fall` bad probes in a row.
pub(crate) async fn check_health(pool: Arc<Pool>, index: usize) {
    let Some(config) = pool.health.clone() else {
        return;
    };
    let server = pool.servers[index].clone();
    let (mut good, mut bad) = (0u32, 0u32);
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let uri = format!("http://{}{}", server.address, config.path);
        let request = http::Request::get(uri)
            .header(http::header::USER_AGENT, "keel-gateway-health")
            .body(
                http_body_util::Empty::<bytes::Bytes>::new()
                    .map_err(|e| match e {})
                    .boxed(),
            );
        let ok = match request {
            Ok(request) => matches!(
                tokio::time::timeout(config.timeout, pool.client.request(request)).await,
                Ok(Ok(resp)) if resp.status().is_success() || resp.status().is_redirection()
            ),
            Err(_) => false,
        };
        if ok {
            good += 1;
            bad = 0;
        } else {
            bad += 1;
            good = 0;
        }
        let healthy = server.healthy.load(Ordering::Relaxed);
        if healthy && bad >= config.fall {
            server.healthy.store(false, Ordering::Relaxed);
            tracing::warn!(upstream = %pool.name, server = %server.address, "health check failed; out of rotation");
        } else if !healthy && good >= config.rise {
            server.healthy.store(true, Ordering::Relaxed);
            tracing::info!(upstream = %pool.name, server = %server.address, "health check passed; back in rotation");
        }
    }
}
