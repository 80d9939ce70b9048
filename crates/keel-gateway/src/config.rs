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

fn ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(d)?))
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
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Time a client has to send a request's headers (against slowloris).
    #[serde(deserialize_with = "ms", rename = "header_timeout_ms")]
    pub header_timeout: Duration,
    /// Keep idle client connections open this long.
    #[serde(deserialize_with = "ms", rename = "idle_timeout_ms")]
    pub idle_timeout: Duration,
    /// Longest request target (path and query) accepted; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest request body accepted (by its Content-Length); larger gets 413.
    pub max_body_bytes: u64,
}

impl Default for ServerSection {
    fn default() -> ServerSection {
        ServerSection {
            listen: "127.0.0.1:8080".parse().expect("constant address"),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 16 << 20,
        }
    }
}

/// One server of an upstream pool.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The servers.
    pub servers: Vec<ServerEntry>,
    /// Balancer: round_robin, weighted, random, p2c or consistent_hash (by client IP).
    #[serde(default = "default_balancer")]
    pub balancer: String,
    /// Time to connect to a server.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "ms",
        rename = "connect_timeout_ms"
    )]
    pub connect_timeout: Duration,
    /// Time for a server to start answering.
    #[serde(
        default = "default_response_timeout",
        deserialize_with = "ms",
        rename = "response_timeout_ms"
    )]
    pub response_timeout: Duration,
    /// Attempts per request, for idempotent requests without a body that got no answer.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Active health checks; without them only passive ejection applies.
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// `[upstreams.NAME.health]`: each server is probed with `GET path` every `interval`; `fall`
/// failed probes in a row (no answer within `timeout`, or a status outside 200-399) take it out
/// of rotation, `rise` good ones in a row bring it back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path probed.
    pub path: String,
    /// Time between probes of one server.
    #[serde(
        default = "default_interval",
        deserialize_with = "ms",
        rename = "interval_ms"
    )]
    pub interval: Duration,
    /// Time a probe may take.
    #[serde(
        default = "default_probe_timeout",
        deserialize_with = "ms",
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

fn default_balancer() -> String {
    "round_robin".into()
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

/// `[[routes]]`: what a request must match, and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
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
    /// The upstream pool.
    pub upstream: String,
    /// Removed from the front of the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Put in front of the (stripped) path before forwarding.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Overrides the upstream's response timeout for this route.
    #[serde(default, deserialize_with = "opt_ms", rename = "timeout_ms")]
    pub timeout: Option<Duration>,
    /// Client addresses (CIDRs or single addresses) allowed; everyone if empty.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client addresses refused, checked before `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Token-bucket rate limit per client IP on this route.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Authentication required on this route.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

fn opt_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
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
        for (name, up) in &self.upstreams {
            if up.servers.is_empty() {
                return bad(format!("upstream {name:?} has no servers"));
            }
            if keel_governance::balance::by_name(&up.balancer).is_none() {
                return bad(format!(
                    "upstream {name:?}: unknown balancer {:?} (use one of {})",
                    up.balancer,
                    keel_governance::balance::NAMES.join(", ")
                ));
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
            if !self.upstreams.contains_key(&r.upstream) {
                return bad(format!(
                    "route {} names upstream {:?}, which is not defined",
                    i + 1,
                    r.upstream
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
                if crate::filter::parse_net(cidr).is_none() {
                    return bad(format!(
                        "route {}: {cidr:?} is not an address or CIDR",
                        i + 1
                    ));
                }
            }
            if let Some(rl) = &r.rate_limit
                && (rl.per_second <= 0.0 || rl.burst == 0)
            {
                return bad(format!(
                    "route {}: rate_limit needs per_second > 0 and burst > 0",
                    i + 1
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            ("[server]\nlisten = 5", "invalid type"),
            ("[[routes]]\nupstream = \"nope\"", "not defined"),
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
