//! The gateway's configuration (TOML). Every field has a default except what names a route's
//! match and its upstream; a bad file is refused with the reason (and, for syntax errors, the
//! line and column).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//!
//! [upstreams.api]
//! servers = [{ address = "127.0.0.1:7101", weight = 100 }, { address = "127.0.0.1:7102" }]
//! balancer = "p2c"
//!
//! [[routes]]
//! path_prefix = "/api/"
//! upstream = "api"
//! strip_prefix = "/api"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use keel_governance::BalancerKind;
use serde::Deserialize;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type, with its position.
    #[error("{0}")]
    Parse(String),
    /// The configuration parses but does not make sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Listener and connection settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Upstream pools by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, tried in order; the first that matches serves the request.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The admin listener (metrics, state, reload); off if absent.
    #[serde(default)]
    pub admin: Option<AdminSection>,
}

/// `[admin]`: Prometheus `/metrics` and the JSON admin API on their own port.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address to listen on; keep it on loopback or a private network.
    pub listen: SocketAddr,
    /// If set, every admin request except `GET /metrics` needs `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
}

/// `[server.tls]`: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this certificate.
/// The files are read again on every reload, so a renewed certificate applies without a
/// restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Time a client has to send a request's headers (against slowloris).
    #[serde(
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "header_timeout_ms"
    )]
    pub header_timeout: Duration,
    /// Close a client connection after this long with no bytes either way and no request in
    /// flight (checked every half of it).
    #[serde(
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "idle_timeout_ms"
    )]
    pub idle_timeout: Duration,
    /// Longest request target (path and query) accepted; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest request body accepted (by its Content-Length); larger gets 413.
    pub max_body_bytes: u64,
    /// Client connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; HTTP/1 clients sending more
    /// get 431 (hyper's buffer cannot go below 8 KiB), HTTP/2 ones a stream error.
    pub max_header_bytes: usize,
    /// At stop, time given to requests in flight before their connections are cut.
    #[serde(
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "shutdown_grace_ms"
    )]
    pub shutdown_grace: Duration,
    /// Access log: `"stdout"`, a file path, or absent for none. One JSON object per line.
    pub access_log: Option<String>,
    /// TLS; plain HTTP (with h2c) if absent.
    pub tls: Option<TlsConfig>,
    /// How requests to HTTP/1.1 pools are sent: `"raw"` (Keel's own HTTP/1.1 leg, the
    /// default) or `"hyper"` (hyper's client). Either gives the same answers; the setting
    /// exists to compare them and to run the test suite through both. Its default is read
    /// from the environment variable `KEEL_GATEWAY_UPSTREAM_LEG` when that is set.
    pub upstream_leg: UpstreamLeg,
}

impl Default for ServerSection {
    fn default() -> ServerSection {
        ServerSection {
            listen: "127.0.0.1:8080".parse().expect("constant address"),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 16 << 20,
            max_connections: 100_000,
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
            access_log: None,
            tls: None,
            upstream_leg: UpstreamLeg::from_env(),
        }
    }
}

/// The leg requests to HTTP/1.1 pools take (`server.upstream_leg`). HTTP/2 (h2c) pools, cached
/// routes and upgrades always take hyper's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamLeg {
    /// Keel's own HTTP/1.1 client: pooled keep-alive connections, driven by the task that
    /// serves the client's connection.
    #[default]
    Raw,
    /// hyper's client.
    Hyper,
}

impl UpstreamLeg {
    /// `KEEL_GATEWAY_UPSTREAM_LEG` (`raw` or `hyper`), else [`UpstreamLeg::Raw`].
    fn from_env() -> UpstreamLeg {
        match std::env::var("KEEL_GATEWAY_UPSTREAM_LEG").as_deref() {
            Ok("hyper") => UpstreamLeg::Hyper,
            _ => UpstreamLeg::Raw,
        }
    }
}

/// One server of an upstream pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    /// `host:port`.
    pub address: String,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The servers (one of `servers` and `discovery`).
    #[serde(default)]
    pub servers: Vec<ServerEntry>,
    /// Servers found in a registry and kept up to date by a watch.
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Passive health: when a server is ejected after failures (no answer or 5xx), and for
    /// how long; after the ejection a few requests probe it and it returns if they succeed.
    #[serde(default)]
    pub outlier: keel_governance::OutlierConfig,
    /// Balancer: round_robin (the default), weighted, random, p2c, least_conn or
    /// consistent_hash.
    #[serde(default = "default_balancer")]
    pub balancer: BalancerKind,
    /// What consistent_hash hashes (the client address by default).
    #[serde(default)]
    pub hash_key: HashKey,
    /// Sticky sessions: the first answer sets this cookie to an opaque server id, and later
    /// requests carrying it go to the same server while it is healthy.
    #[serde(default)]
    pub sticky_cookie: Option<String>,
    /// How the gateway speaks to the servers: `"http1"` (default) or `"h2c"`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Requests in flight to this upstream at most; more wait in a queue. Unlimited if absent.
    #[serde(default)]
    pub max_inflight: Option<usize>,
    /// Requests that may wait for a slot; more get 503 at once.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Longest wait in the queue before 503.
    #[serde(
        default = "default_queue_timeout",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "queue_timeout_ms"
    )]
    pub queue_timeout: Duration,
    /// Time to connect to a server.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "connect_timeout_ms"
    )]
    pub connect_timeout: Duration,
    /// Time for a server to start answering.
    #[serde(
        default = "default_response_timeout",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "response_timeout_ms"
    )]
    pub response_timeout: Duration,
    /// Attempts per request, for idempotent requests without a body that got no answer.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Retries may add at most this share of extra requests (over about ten seconds) ...
    #[serde(default = "default_budget_ratio")]
    pub retry_budget_ratio: f64,
    /// ... plus this many a second whatever the share, so a quiet pool can still retry.
    #[serde(default = "default_budget_floor")]
    pub retry_budget_min_per_sec: u32,
    /// Active health checks; without them only passive ejection applies.
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// `rpc = { ... }` on a route: `POST <route path>/<Method>` with a JSON body becomes a Keel
/// RPC call of `service`/`Method` (JSON codec), sent through discovery, balancing, retries
/// and outlier ejection (`keel-governance`'s service channel). The reply is the JSON answer;
/// an RPC error becomes the HTTP status its code maps to, with
/// `{"error": "<code>", "detail": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcRouteConfig {
    /// Fully qualified RPC service, e.g. `keel.echo.v1.Echo`.
    pub service: String,
    /// Fixed instances (`host:port`); or use `discovery`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Instances from a registry (its `service` is the registered name).
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Balancer over the instances (p2c by default).
    #[serde(default = "default_rpc_balancer")]
    pub balancer: BalancerKind,
    /// Deadline of each call (sent to the server).
    #[serde(
        default = "default_rpc_timeout",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "timeout_ms"
    )]
    pub timeout: Duration,
    /// Attempts per call (retries go to other instances, within the retry budget).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Send a backup call when the first has had no reply for this long.
    #[serde(
        default,
        deserialize_with = "keel_net::duration::opt_ms::deserialize",
        rename = "hedge_after_ms"
    )]
    pub hedge_after: Option<Duration>,
}

fn default_rpc_balancer() -> BalancerKind {
    BalancerKind::P2c
}
fn default_rpc_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[upstreams.NAME.discovery]`: the servers are the instances of `service` in Keel's
/// registry (`registry = "host:port"`) or in etcd (`etcd = ["http://host:port"]`), followed by
/// a watch: instances that register join the pool, those that leave or lose their lease leave
/// it. While the registry is unreachable the last list keeps serving.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// The naming service: Keel's registry (`HOST:PORT`) or etcd
    /// (`etcd://HOST:PORT[,HOST:PORT…][?prefix=/P]`).
    #[serde(default)]
    pub registry: Option<String>,
    /// etcd endpoints (`http://HOST:PORT`), the other way to name etcd.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Key prefix of Keel's entries in etcd.
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// The service whose instances are the servers.
    pub service: String,
    /// The registry namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

impl DiscoveryConfig {
    fn check(&self) -> Result<(), String> {
        if self.registry.is_some() != self.etcd.is_empty() {
            return Err("discovery needs exactly one of registry and etcd".into());
        }
        if self.service.is_empty() {
            return Err("discovery needs a service".into());
        }
        if let Some(address) = &self.registry {
            keel_registry::NamingAddress::parse(address).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn default_etcd_prefix() -> String {
    "/keel".into()
}
fn default_namespace() -> String {
    "default".into()
}

/// `[upstreams.NAME.health]`: each server is probed with `GET path` every `interval`; `fall`
/// failed probes in a row (no answer within `timeout`, or a status outside 200-399) take it out
/// of rotation, `rise` good ones in a row bring it back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path probed.
    pub path: String,
    /// Time between probes of one server.
    #[serde(
        default = "default_interval",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "interval_ms"
    )]
    pub interval: Duration,
    /// Time a probe may take.
    #[serde(
        default = "default_probe_timeout",
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "timeout_ms"
    )]
    pub timeout: Duration,
    /// Good probes in a row that make a server healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failed probes in a row that make a server unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

fn default_balancer() -> BalancerKind {
    BalancerKind::RoundRobin
}

/// How the gateway speaks to an upstream's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 without TLS ("h2c"), for gRPC servers.
    H2c,
}

/// What an upstream's `consistent_hash` balancer hashes, written `"ip"`, `"header:NAME"` or
/// `"cookie:NAME"`; a request without that header or cookie falls back to its address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum HashKey {
    /// The client's address (the default).
    #[default]
    Ip,
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
}

/// A `hash_key` that is not `ip`, `header:NAME` or `cookie:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hash_key {0:?} is not ip, header:NAME or cookie:NAME")]
pub struct BadHashKey(pub String);

impl TryFrom<String> for HashKey {
    type Error = BadHashKey;

    fn try_from(key: String) -> Result<HashKey, BadHashKey> {
        let bad = || BadHashKey(key.clone());
        if key == "ip" {
            Ok(HashKey::Ip)
        } else if let Some(name) = key.strip_prefix("header:") {
            http::HeaderName::from_bytes(name.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| bad())
        } else if let Some(name) = key.strip_prefix("cookie:") {
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if token {
                Ok(HashKey::Cookie(name.to_owned()))
            } else {
                Err(bad())
            }
        } else {
            Err(bad())
        }
    }
}
fn default_queue_size() -> usize {
    1024
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    3
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_floor() -> u32 {
    10
}

/// `[[routes]]`: what a request must match, and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name in metrics and the access log; `route-N` (from 1) if absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Host header (without port) to match; any host if absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Exact path to match.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix to match (ignored if `path` is set).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Methods to match; any if empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with these exact values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The upstream pool (one of `upstream` and `static_dir`).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Serve files from this directory instead of proxying.
    #[serde(default)]
    pub static_dir: Option<String>,
    /// Cache upstream answers.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Send requests to a Keel RPC service instead (the HTTP → RPC bridge).
    #[serde(default)]
    pub rpc: Option<RpcRouteConfig>,
    /// Removed from the front of the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Put in front of the (stripped) path before forwarding.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Overrides the upstream's response timeout for this route.
    #[serde(
        default,
        deserialize_with = "keel_net::duration::opt_ms::deserialize",
        rename = "timeout_ms"
    )]
    pub timeout: Option<Duration>,
    /// Client addresses (CIDRs or single addresses) allowed; everyone if empty.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client addresses refused, checked before `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// A token-bucket rate limit on this route (per client IP unless `key` says otherwise).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// More rate limits, all applied (e.g. one per IP and one for the whole route).
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Overrides `server.max_body_bytes` for this route.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Authentication required on this route.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
    /// Refuse requests before their opening time (see [`crate::gate`]).
    #[serde(default)]
    pub gate: Option<crate::gate::GateConfig>,
}

/// `cache = { ... }` on a route: GET and HEAD answers kept in memory as their
/// `Cache-Control` (`s-maxage`, `max-age`) or `Expires` allow.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of bodies and headers held at most; the least recently used go first.
    pub max_bytes: u64,
    /// Larger answers are passed through uncached.
    #[serde(default = "default_max_entry")]
    pub max_entry_bytes: u64,
    /// Freshness of answers that say nothing about it; 0 (default) caches only answers that
    /// allow it explicitly.
    #[serde(
        default,
        deserialize_with = "keel_net::duration::ms::deserialize",
        rename = "default_ttl_ms"
    )]
    pub default_ttl: Duration,
}

fn default_max_entry() -> u64 {
    1 << 20
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`, one bucket per
/// `key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
    /// What has a bucket: `"ip"` (the client address, the default), `"route"` (one bucket
    /// for everyone), `"api_key"` (the route's API-key header; only keys the route accepts
    /// count, others count against the address) or `"header:NAME"` (a value the client
    /// chooses: pair it with a per-IP limit). A request without the header is counted by its
    /// address. Keyed limits are checked after auth, address and route limits before it. A
    /// limiter keeps at most 100,000 buckets; beyond that, newcomers share one.
    #[serde(default = "default_limit_key")]
    pub key: String,
}

fn default_limit_key() -> String {
    "ip".into()
}

impl GatewayConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        let config: GatewayConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and checks a configuration file.
    pub fn load(path: &str) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        GatewayConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{path}: {m}")),
            other => other,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be positive".into());
        }
        if self.server.header_timeout.is_zero() || self.server.idle_timeout.is_zero() {
            return bad("server.header_timeout_ms and idle_timeout_ms must be positive".into());
        }
        if self.server.max_header_bytes < 8192 {
            return bad("server.max_header_bytes must be at least 8192".into());
        }
        for (name, up) in &self.upstreams {
            match &up.discovery {
                None if up.servers.is_empty() => {
                    return bad(format!("upstream {name:?} has no servers"));
                }
                Some(_) if !up.servers.is_empty() => {
                    return bad(format!(
                        "upstream {name:?}: give servers or discovery, not both"
                    ));
                }
                Some(d) => {
                    if let Err(e) = d.check() {
                        return bad(format!("upstream {name:?}: {e}"));
                    }
                }
                None => {}
            }
            if let Some(cookie) = &up.sticky_cookie
                && (cookie.is_empty()
                    || !cookie
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
            {
                return bad(format!(
                    "upstream {name:?}: sticky_cookie {cookie:?} is not a cookie name"
                ));
            }
            if !(0.0..=10.0).contains(&up.retry_budget_ratio) {
                return bad(format!(
                    "upstream {name:?}: retry_budget_ratio must be between 0 and 10"
                ));
            }
            if up.max_inflight == Some(0) {
                return bad(format!("upstream {name:?}: max_inflight must be positive"));
            }
            if let Some(h) = &up.health {
                if !h.path.starts_with('/') {
                    return bad(format!(
                        "upstream {name:?}: health path {:?} must start with /",
                        h.path
                    ));
                }
                if h.rise == 0 || h.fall == 0 || h.interval.is_zero() {
                    return bad(format!(
                        "upstream {name:?}: health rise, fall and interval_ms must be positive"
                    ));
                }
            }
            for s in &up.servers {
                let port_ok = s
                    .address
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !port_ok || s.address.parse::<http::uri::Authority>().is_err() {
                    return bad(format!(
                        "upstream {name:?}: server address {:?} is not host:port",
                        s.address
                    ));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let targets = usize::from(r.upstream.is_some())
                + usize::from(r.static_dir.is_some())
                + usize::from(r.rpc.is_some());
            if targets != 1 {
                return bad(format!(
                    "route {} needs exactly one of upstream, static_dir and rpc",
                    i + 1
                ));
            }
            if let Some(up) = &r.upstream
                && !self.upstreams.contains_key(up)
            {
                return bad(format!(
                    "route {} names upstream {up:?}, which is not defined",
                    i + 1,
                ));
            }
            if let Some(dir) = &r.static_dir
                && !std::path::Path::new(dir).is_dir()
            {
                return bad(format!(
                    "route {}: static_dir {dir:?} is not a directory",
                    i + 1
                ));
            }
            if let Some(rpc) = &r.rpc {
                if rpc.service.is_empty() {
                    return bad(format!("route {}: rpc needs a service", i + 1));
                }
                if rpc.servers.is_empty() == rpc.discovery.is_none() {
                    return bad(format!(
                        "route {}: rpc needs exactly one of servers and discovery",
                        i + 1
                    ));
                }
                if let Some(Err(e)) = rpc.discovery.as_ref().map(DiscoveryConfig::check) {
                    return bad(format!("route {}: {e}", i + 1));
                }
            }
            if let Some(c) = &r.cache
                && (c.max_bytes == 0 || c.max_entry_bytes == 0 || c.max_entry_bytes > c.max_bytes)
            {
                return bad(format!(
                    "route {}: cache needs 0 < max_entry_bytes <= max_bytes",
                    i + 1
                ));
            }
            for p in [&r.path, &r.path_prefix, &r.strip_prefix, &r.add_prefix]
                .into_iter()
                .flatten()
            {
                if !p.starts_with('/') {
                    return bad(format!("route {}: path {p:?} must start with /", i + 1));
                }
            }
            for cidr in r.allow.iter().chain(&r.deny) {
                if parse_net(cidr).is_none() {
                    return bad(format!(
                        "route {}: {cidr:?} is not an address or CIDR",
                        i + 1
                    ));
                }
            }
            if let Some(Err(e)) = r.gate.as_ref().map(crate::gate::GateConfig::check) {
                return bad(format!("route {}: {e}", i + 1));
            }
            for rl in r.rate_limit.iter().chain(&r.rate_limits) {
                if !(rl.per_second >= 1e-3 && rl.per_second.is_finite()) || rl.burst == 0 {
                    return bad(format!(
                        "route {}: rate_limit needs per_second >= 0.001 and burst > 0",
                        i + 1
                    ));
                }
                if rl.key == "api_key" && r.auth.as_ref().is_none_or(|a| a.api_keys.is_empty()) {
                    return bad(format!(
                        "route {}: a rate limit keyed by api_key needs auth with api_keys",
                        i + 1
                    ));
                }
                let key_ok = matches!(rl.key.as_str(), "ip" | "route" | "api_key")
                    || rl
                        .key
                        .strip_prefix("header:")
                        .is_some_and(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok());
                if !key_ok {
                    return bad(format!(
                        "route {}: rate limit key {:?} is not ip, route, api_key or header:NAME",
                        i + 1,
                        rl.key
                    ));
                }
            }
            if let Some(auth) = &r.auth
                && let Err(e) = crate::auth::Auth::new(auth)
            {
                return bad(format!("route {} auth: {e}", i + 1));
            }
            for m in &r.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    return bad(format!("route {}: {m:?} is not an HTTP method", i + 1));
                }
            }
        }
        Ok(())
    }
}

/// Parses `10.0.0.0/8`, `::1/128` or a single address (an address filter's entry).
pub(crate) fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_settings_read_their_names_and_zero_durations_are_off() {
        let config = GatewayConfig::parse(
            r#"
[upstreams.a]
servers = [{ address = "h:1" }]
balancer = "chash"
hash_key = "header:X-User"
protocol = "h2c"
[[routes]]
path_prefix = "/rpc/"
timeout_ms = 0
rpc = { service = "a.B", servers = ["h:2"], balancer = "least_conn", hedge_after_ms = 0 }
[[routes]]
upstream = "a"
timeout_ms = 250
"#,
        )
        .unwrap();
        let up = &config.upstreams["a"];
        assert_eq!(up.balancer, BalancerKind::ConsistentHash);
        assert_eq!(
            up.hash_key,
            HashKey::Header(http::HeaderName::from_static("x-user"))
        );
        assert_eq!(up.protocol, UpstreamProtocol::H2c);
        let rpc = config.routes[0].rpc.as_ref().unwrap();
        assert_eq!(rpc.balancer, BalancerKind::LeastConn);
        // 0 in an optional duration is off, as everywhere in Keel.
        assert_eq!(rpc.hedge_after, None);
        assert_eq!(config.routes[0].timeout, None);
        assert_eq!(config.routes[1].timeout, Some(Duration::from_millis(250)));
        // The defaults.
        let plain =
            GatewayConfig::parse("[upstreams.b]\nservers = [{ address = \"h:1\" }]").unwrap();
        let b = &plain.upstreams["b"];
        assert_eq!(
            (b.balancer, &b.hash_key, b.protocol),
            (
                BalancerKind::RoundRobin,
                &HashKey::Ip,
                UpstreamProtocol::Http1
            )
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            ("[server]\nlisten = 5", "invalid type"),
            ("[[routes]]\nupstream = \"nope\"", "not defined"),
            (
                "[[routes]]\npath = \"/\"",
                "exactly one of upstream, static_dir and rpc",
            ),
            (
                "[[routes]]\nrpc = { service = \"a.B\" }",
                "exactly one of servers and discovery",
            ),
            (
                "[[routes]]\nstatic_dir = \"/definitely/not/here\"",
                "not a directory",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\nhash_key = \"body\"",
                "hash_key",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\nprotocol = \"h3\"",
                "protocol",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\nmax_inflight = 0",
                "max_inflight",
            ),
            (
                "[upstreams.a]\n[upstreams.a.discovery]\nservice = \"web\"",
                "exactly one of registry and etcd",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\n[upstreams.a.discovery]\nregistry = \"h:2\"\nservice = \"web\"",
                "not both",
            ),
            ("[upstreams.a]\nservers = []", "no servers"),
            (
                "[upstreams.a]\nservers = [{ address = \"x\" }]",
                "host:port",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\nbalancer = \"best\"",
                "unknown balancer",
            ),
            (
                "[[routes]]\nrpc = { service = \"a.B\", servers = [\"h:1\"], balancer = \"best\" }",
                "unknown balancer \"best\" (use one of round_robin, weighted",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\nhash_key = \"cookie:\"",
                "hash_key \"cookie:\" is not ip",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\n[[routes]]\nupstream = \"a\"\npath_prefix = \"api\"",
                "must start with /",
            ),
            ("[surprise]\nx = 1", "unknown field"),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\n[[routes]]\nupstream = \"a\"\n[routes.auth.jwt]\nalgorithm = \"ES999\"",
                "use HS256 or RS256",
            ),
            (
                "[upstreams.a]\nservers = [{ address = \"h:1\" }]\n[[routes]]\nupstream = \"a\"\n[routes.auth.jwt]\nalgorithm = \"RS256\"\npublic_key_pem = \"junk\"",
                "public_key_pem",
            ),
        ];
        for (text, want) in cases {
            let err = GatewayConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        // Syntax errors say where.
        let err = GatewayConfig::parse("[server\nlisten = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
