//! Upstream pools: servers with weights, a balancer, per-server statistics for passive health
//! (outlier ejection), active health checks, sticky sessions, a bounded wait queue in front of
//! the servers, and a pooled keep-alive HTTP client per pool (HTTP/1.1, or HTTP/2 for h2c).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_governance::balance::{self, Balancer, EndpointView};
use keel_governance::endpoint::{EndpointStats, OutlierConfig};
use tokio::time::Instant;

use arc_swap::ArcSwap;
use keel_governance::Discover;
use keel_registry::RegistryDiscover;

use crate::config::{DiscoveryConfig, HashKey, HealthConfig, UpstreamConfig};
use crate::headers::Lookup;

/// A request body on its way upstream.
pub(crate) type UpBody = BoxBody<bytes::Bytes, crate::bodies::BoxError>;

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
    /// Good and failed probes in a row.
    good_probes: AtomicU32,
    bad_probes: AtomicU32,
    /// Requests sent to it, and those that failed (no answer, or a 5xx).
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// The opaque id a sticky-session cookie carries.
    pub(crate) sticky_id: String,
    /// Its idle keep-alive connections for the HTTP/1 fast path (`fast`).
    pub(crate) idle: IdleConns,
}

impl Server {
    /// Whether it may take traffic: healthy and not ejected.
    pub(crate) fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.stats.is_ejected()
    }
}

pub(crate) use crate::headers::cookie;

/// Why a request could not get a slot.
#[derive(Debug)]
pub(crate) enum QueueError {
    Full(usize),
    TimedOut(Duration),
}

/// At most `max_inflight` requests at once; up to `size` more wait, each for at most
/// `timeout`.
#[derive(Debug)]
pub(crate) struct Queue {
    slots: Arc<Semaphore>,
    pub(crate) max_inflight: usize,
    waiting: AtomicUsize,
    size: usize,
    timeout: Duration,
    rejected: AtomicU64,
}

/// Counts a waiter for as long as it waits (also when its request is abandoned).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Queue {
    fn new(max_inflight: usize, size: usize, timeout: Duration) -> Queue {
        Queue {
            slots: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            waiting: AtomicUsize::new(0),
            size,
            timeout,
            rejected: AtomicU64::new(0),
        }
    }

    /// A slot, at once or after a bounded wait.
    pub(crate) async fn enter(&self) -> Result<OwnedSemaphorePermit, QueueError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.size {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(QueueError::Full(self.size));
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(QueueError::TimedOut(self.timeout))
            }
        }
    }

    /// Requests waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests turned away (queue full or wait too long) so far.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Requests holding a slot now.
    pub(crate) fn inflight(&self) -> usize {
        self.max_inflight - self.slots.available_permits()
    }
}

/// A named pool.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: String,
    servers: ArcSwap<Vec<Arc<Server>>>,
    balancer: Box<dyn Balancer>,
    pub(crate) balancer_name: &'static str,
    hash_key: HashKey,
    pub(crate) sticky_cookie: Option<String>,
    /// Whether the servers speak HTTP/2 (h2c).
    pub(crate) h2: bool,
    pub(crate) queue: Option<Queue>,
    /// Answers of its servers, by status class and latency.
    pub(crate) responses: crate::metrics::RouteMetrics,
    /// The configuration it was built from, to keep the pool (and its connections and
    /// statistics) across a reload that does not change it.
    pub(crate) config: UpstreamConfig,
    started: AtomicBool,
    pub(crate) client: Client<HttpConnector, UpBody>,
    pub(crate) response_timeout: Duration,
    pub(crate) max_attempts: u32,
    /// Bounds the extra load of retries.
    pub(crate) budget: keel_governance::RetryBudget,
    /// Retries made, and refused by the budget.
    pub(crate) retries: keel_governance::RetryStats,
    pub(crate) outlier: OutlierConfig,
    pub(crate) health: Option<HealthConfig>,
}

impl Server {
    fn new(address: &str, weight: u32) -> Option<Server> {
        Some(Server {
            authority: address.parse().ok()?,
            address: address.to_owned(),
            weight,
            stats: EndpointStats::default(),
            healthy: AtomicBool::new(true),
            good_probes: AtomicU32::new(0),
            bad_probes: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sticky_id: format!("{:016x}", balance::hash_key(address.as_bytes())),
            idle: IdleConns::default(),
        })
    }
}

impl Pool {
    pub(crate) fn new(name: &str, config: &UpstreamConfig) -> Pool {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let h2 = config.protocol == crate::config::UpstreamProtocol::H2c;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .http2_only(h2)
            .build(connector);
        let servers = config
            .servers
            .iter()
            .filter_map(|s| Server::new(&s.address, s.weight).map(Arc::new))
            .collect();
        Pool {
            name: name.to_owned(),
            servers: ArcSwap::from_pointee(servers),
            balancer: config.balancer.build(),
            balancer_name: config.balancer.name(),
            hash_key: config.hash_key.clone(),
            sticky_cookie: config.sticky_cookie.clone(),
            h2,
            queue: config
                .max_inflight
                .map(|n| Queue::new(n, config.queue_size, config.queue_timeout)),
            responses: crate::metrics::RouteMetrics::default(),
            config: config.clone(),
            started: AtomicBool::new(false),
            client,
            response_timeout: config.response_timeout,
            max_attempts: config.max_attempts.max(1),
            budget: keel_governance::RetryBudget::new(
                config.retry_budget_ratio,
                config.retry_budget_min_per_sec,
            ),
            retries: keel_governance::RetryStats::default(),
            outlier: config.outlier.clone(),
            health: config.health.clone(),
        }
    }

    /// The servers now.
    pub(crate) fn servers(&self) -> Arc<Vec<Arc<Server>>> {
        self.servers.load_full()
    }

    /// Starts with the servers `other` has now (a pool it replaces on reload).
    pub(crate) fn adopt_servers(&self, other: &Pool) {
        self.servers.store(other.servers());
    }

    /// Replaces the servers with the instances a registry lists, keeping (with their
    /// statistics and health) those whose address and weight did not change.
    fn set_servers(&self, instances: &[keel_governance::Instance]) {
        let old = self.servers.load_full();
        let servers: Vec<Arc<Server>> = instances
            .iter()
            .filter_map(|i| {
                old.iter()
                    .find(|s| s.address == i.address && s.weight == i.weight)
                    .cloned()
                    .or_else(|| {
                        let server = Server::new(&i.address, i.weight);
                        if server.is_none() {
                            tracing::warn!(upstream = %self.name, address = %i.address, "registered address is not host:port; skipped");
                        }
                        server.map(Arc::new)
                    })
            })
            .collect();
        let same = servers.len() == old.len()
            && servers
                .iter()
                .zip(old.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            tracing::info!(upstream = %self.name, servers = servers.len(), "servers changed");
            self.servers.store(Arc::new(servers));
        }
    }

    /// Picks one of `servers` (a snapshot of this pool's), not one of `exclude`: the one a
    /// sticky cookie names if it is up, else the balancer's choice (consistent hashing keyed
    /// by the client address, a header or a cookie). `now` is the time to judge ejections by.
    pub(crate) fn pick(
        &self,
        servers: &[Arc<Server>],
        client: IpAddr,
        headers: &(impl Lookup + ?Sized),
        exclude: &[usize],
        now: Instant,
    ) -> Option<usize> {
        if let Some(name) = &self.sticky_cookie
            && let Some(id) = cookie(headers, name)
            && let Some(i) = servers.iter().position(|s| s.sticky_id == id)
            && !exclude.contains(&i)
            && servers[i].is_up()
        {
            return Some(i);
        }
        let views: Vec<EndpointView<'_>> = servers
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
        let named = match &self.hash_key {
            HashKey::Ip => None,
            HashKey::Header(h) => headers.value(h).map(balance::hash_key),
            HashKey::Cookie(c) => cookie(headers, c).map(|v| balance::hash_key(v.as_bytes())),
        };
        let key = named.unwrap_or_else(|| match client {
            IpAddr::V4(v4) => balance::hash_key(&v4.octets()),
            IpAddr::V6(v6) => balance::hash_key(&v6.octets()),
        });
        self.balancer.pick(&views, Some(key))
    }

    /// Whether one more server may be ejected (at most `max_ejected_share` of the pool).
    pub(crate) fn may_eject(&self, servers: &[Arc<Server>]) -> bool {
        let total = servers.len().max(1);
        let ejected = servers.iter().filter(|s| s.stats.is_ejected()).count();
        ((ejected + 1) as f64 / total as f64) <= self.outlier.max_ejected_share
    }
}

/// Starts what keeps `pool` up to date in the background (once; later calls do nothing):
/// the active health checks and the registry watch. Both end when the pool is dropped, e.g.
/// replaced by a reload.
pub(crate) fn start(pool: &Arc<Pool>) {
    if pool.started.swap(true, Ordering::Relaxed) {
        return;
    }
    if pool.health.is_some() {
        tokio::spawn(check_health(Arc::downgrade(pool)));
    }
    if let Some(discovery) = pool.config.discovery.clone() {
        tokio::spawn(follow_registry(Arc::downgrade(pool), discovery));
    }
}

/// Discovery through the registry `config` names: Keel's (its channel connects lazily and
/// reconnects by itself) or etcd (connected here; an error if it cannot be reached).
pub(crate) async fn connect_discovery(
    config: &DiscoveryConfig,
) -> Result<Arc<dyn Discover>, String> {
    let naming = match &config.registry {
        Some(address) => keel_registry::Naming::connect(address)
            .await
            .map_err(|e| e.to_string())?,
        None => keel_registry::Naming::Etcd(Box::new(
            keel_registry::EtcdBackend::connect(&config.etcd, config.etcd_prefix.clone())
                .await
                .map_err(|e| format!("cannot reach etcd at {:?}: {e}", config.etcd))?,
        )),
    };
    Ok(Arc::new(RegistryDiscover::new(
        naming,
        config.namespace.clone(),
    )))
}

/// Keeps the servers of `pool` equal to the instances the registry lists.
async fn follow_registry(pool: Weak<Pool>, config: DiscoveryConfig) {
    let backoff = keel_net::Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
        ..keel_net::Backoff::default()
    };
    let mut attempt = 0;
    let discover = loop {
        match connect_discovery(&config).await {
            Ok(d) => break d,
            Err(e) => {
                tracing::warn!(error = %e, "discovery unavailable; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
                if pool.strong_count() == 0 {
                    return;
                }
            }
        }
    };
    let mut endpoints = match discover.subscribe(&config.service) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, service = %config.service, "cannot follow the service");
            return;
        }
    };
    loop {
        {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let list = endpoints.borrow_and_update().clone();
            if list.resolved {
                pool.set_servers(&list.instances);
            }
        }
        // Wake on a change, and now and then to notice that the pool is gone.
        tokio::select! {
            changed = endpoints.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Probes every server of the pool each `interval` while the pool lives, flipping a server's
/// health flag after `rise` good or `fall` bad probes in a row.
async fn check_health(pool: Weak<Pool>) {
    let Some(config) = pool.upgrade().and_then(|p| p.health.clone()) else {
        return;
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let servers = pool.servers();
        futures_util::future::join_all(servers.iter().map(|s| probe(&pool, s, &config))).await;
    }
}

async fn probe(pool: &Pool, server: &Server, config: &HealthConfig) {
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
    let (good, bad) = if ok {
        server.bad_probes.store(0, Ordering::Relaxed);
        (server.good_probes.fetch_add(1, Ordering::Relaxed) + 1, 0)
    } else {
        server.good_probes.store(0, Ordering::Relaxed);
        (0, server.bad_probes.fetch_add(1, Ordering::Relaxed) + 1)
    };
    let healthy = server.healthy.load(Ordering::Relaxed);
    if healthy && bad >= config.fall {
        server.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(upstream = %pool.name, server = %server.address, "health check failed; out of rotation");
    } else if !healthy && good >= config.rise {
        server.healthy.store(true, Ordering::Relaxed);
        tracing::info!(upstream = %pool.name, server = %server.address, "health check passed; back in rotation");
    }
}

/// A request whose attempt got no answer and that is not sent again: 502 (saying so when the
/// retry budget is spent), or 504 if the time ran out.
pub(crate) fn not_retried(
    give_up: keel_governance::GiveUp<crate::error::GatewayError>,
) -> crate::error::GatewayError {
    use crate::error::{ErrorKind, GatewayError};
    use keel_governance::GiveUp;
    match give_up {
        GiveUp::Budget(e) => {
            let detail = format!("{} (not retried: the retry budget is spent)", e.detail());
            e.with_detail(detail)
        }
        GiveUp::Attempts(e) => e,
        GiveUp::Deadline(e) => e.unwrap_or_else(|| {
            GatewayError::new(
                ErrorKind::UpstreamTimeout,
                "no time left for another attempt",
            )
        }),
    }
}

/// A request for which no server of `pool` could be picked at all.
pub(crate) fn no_healthy_server(pool: &Pool) -> crate::error::GatewayError {
    crate::error::GatewayError::new(
        crate::error::ErrorKind::NoHealthyUpstream,
        format!("no healthy server in upstream {:?}", pool.name),
    )
}

/// The status an attempt came to and what it says about the server: a failure for a 5xx
/// answer or an error on the upstream side, a success otherwise.
pub(crate) fn attempt_outcome<A>(
    answer: &Result<A, crate::error::GatewayError>,
    status_of: impl Fn(&A) -> http::StatusCode,
) -> (http::StatusCode, keel_governance::endpoint::Outcome) {
    let (status, failed) = match answer {
        Ok(a) => {
            let status = status_of(a);
            (status, status.is_server_error())
        }
        Err(e) => (e.status(), e.charges_server()),
    };
    use keel_governance::endpoint::Outcome;
    let outcome = if failed {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    (status, outcome)
}

/// Idle upstream connections kept per server, and for how long.
const MAX_IDLE_PER_SERVER: usize = 1024;
const IDLE_UPSTREAM: Duration = Duration::from_secs(90);

/// A server's idle keep-alive connections, newest last.
#[derive(Debug, Default)]
pub(crate) struct IdleConns {
    conns: Mutex<std::collections::VecDeque<(TcpStream, Instant)>>,
}

impl IdleConns {
    /// The most recently used idle connection that is still open. Those idle for too long
    /// are closed on the way.
    pub(crate) fn take(&self, now: Instant) -> Option<TcpStream> {
        let mut conns = self.conns.lock();
        while conns
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_UPSTREAM)
        {
            conns.pop_front();
        }
        while let Some((stream, _)) = conns.pop_back() {
            if still_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` (idle from about `since`).
    pub(crate) fn put(&self, stream: TcpStream, since: Instant) {
        let mut conns = self.conns.lock();
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push_back((stream, since));
        }
    }

    /// Closes the connections idle for too long and those the server has closed (so they
    /// do not linger half-closed while the server gets no requests).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.conns.lock().retain(|(stream, since)| {
            now.duration_since(*since) <= IDLE_UPSTREAM && still_open(stream)
        });
    }

    /// Connections kept now.
    pub(crate) fn len(&self) -> usize {
        self.conns.lock().len()
    }
}

/// The `Set-Cookie` value an answer from `server` carries in a pool with sticky sessions,
/// when the request did not already name that server.
pub(crate) fn sticky_cookie<H: Lookup + ?Sized>(
    pool: &Pool,
    server: &Server,
    headers: &H,
) -> Option<String> {
    let name = pool.sticky_cookie.as_ref()?;
    (cookie(headers, name) != Some(server.sticky_id.as_str()))
        .then(|| format!("{name}={}; Path=/; HttpOnly", server.sticky_id))
}

/// Whether an idle connection is still open: the server neither closed it nor sent anything
/// (which would be out of turn). Without a syscall unless the socket was reported readable.
fn still_open(stream: &TcpStream) -> bool {
    use std::task::{Context, Poll};
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}
