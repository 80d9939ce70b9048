//! Per-route filters applied before a request is forwarded: client address allow/deny lists
//! and token-bucket rate limits per client IP, per API key or header, or per route.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use keel_governance::balance::hash_key;
use keel_net::TokenBucket;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RateLimitConfig;
use crate::config::parse_net;
use crate::headers::Lookup;

/// Allow and deny lists.
#[derive(Debug, Default)]
pub(crate) struct AddressFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AddressFilter {
    pub(crate) fn new(allow: &[String], deny: &[String]) -> AddressFilter {
        AddressFilter {
            allow: allow.iter().filter_map(|t| parse_net(t)).collect(),
            deny: deny.iter().filter_map(|t| parse_net(t)).collect(),
        }
    }

    /// Whether `ip` may use the route.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// What a rate limit keeps a bucket for.
#[derive(Debug)]
enum LimitKey {
    Ip,
    Route,
    Header(HeaderName),
}

/// Buckets kept per limiter at most.
const MAX_BUCKETS: usize = 100_000;

#[derive(Debug)]
struct Buckets {
    map: HashMap<u64, TokenBucket>,
    swept: Instant,
}

/// Token buckets, one per key (by its hash).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_second: f64,
    burst: f64,
    key: LimitKey,
    /// For `api_key`: the keys the route accepts.
    valid_keys: Vec<Vec<u8>>,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    /// `api_key_header` is the header `key = "api_key"` means, `api_keys` the keys the route
    /// accepts.
    pub(crate) fn new(
        config: &RateLimitConfig,
        api_key_header: &str,
        api_keys: &[String],
    ) -> RateLimiter {
        let key = match config.key.as_str() {
            "route" => LimitKey::Route,
            "api_key" => HeaderName::from_bytes(api_key_header.as_bytes())
                .map_or(LimitKey::Ip, LimitKey::Header),
            k => k
                .strip_prefix("header:")
                .and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .map_or(LimitKey::Ip, LimitKey::Header),
        };
        RateLimiter {
            per_second: config.per_second,
            burst: f64::from(config.burst),
            valid_keys: if config.key == "api_key" {
                api_keys.iter().map(|k| k.as_bytes().to_vec()).collect()
            } else {
                Vec::new()
            },
            key,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Whether it counts something the client only proves with auth (checked after it).
    pub(crate) fn after_auth(&self) -> bool {
        matches!(self.key, LimitKey::Header(_))
    }

    /// What the 429 says is limited.
    pub(crate) fn subject(&self, ip: IpAddr, headers: &(impl Lookup + ?Sized)) -> String {
        match &self.key {
            LimitKey::Route => "this route".into(),
            LimitKey::Header(h) if headers.value(h).is_some() => format!("this {h}"),
            _ => ip.to_string(),
        }
    }

    /// Takes a token for the request's key; if there is none, how long until there will be.
    pub(crate) fn check(
        &self,
        ip: IpAddr,
        headers: &(impl Lookup + ?Sized),
    ) -> Result<(), Duration> {
        let by_ip = || match ip {
            IpAddr::V4(v4) => hash_key(&v4.octets()),
            IpAddr::V6(v6) => hash_key(&v6.octets()),
        };
        let key = match &self.key {
            LimitKey::Ip => by_ip(),
            LimitKey::Route => 0,
            // Hashed with a marker byte, so a header value never shares an address's bucket.
            // An API-key limit only counts keys the route accepts: a made-up key (sent along
            // with a valid token) counts against the address.
            LimitKey::Header(h) => headers
                .value(h)
                .filter(|v| self.valid_keys.is_empty() || self.valid_keys.iter().any(|k| k == v))
                .map_or_else(by_ip, |v| {
                    let mut bytes = Vec::with_capacity(v.len() + 1);
                    bytes.push(0xff);
                    bytes.extend_from_slice(v);
                    hash_key(&bytes)
                }),
        };
        let now = Instant::now();
        let mut guard = self.buckets.lock();
        let Buckets { map, swept } = &mut *guard;
        // Forget clients whose buckets have long been full again (at most once a second), so
        // the map stays small; past the cap, newcomers share one bucket rather than growing it.
        let mut key = key;
        if map.len() >= MAX_BUCKETS && !map.contains_key(&key) {
            if now.duration_since(*swept) >= Duration::from_secs(1) {
                *swept = now;
                map.retain(|_, b| !b.is_full(self.per_second, self.burst, now));
            }
            if map.len() >= MAX_BUCKETS {
                key = u64::MAX;
            }
        }
        map.entry(key)
            .or_insert(TokenBucket::full(self.burst, now))
            .take(self.per_second, self.burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn allow_and_deny() {
        let f = AddressFilter::new(
            &["10.0.0.0/8".into(), "127.0.0.1".into()],
            &["10.9.0.0/16".into()],
        );
        assert!(f.admits("10.1.2.3".parse().unwrap()));
        assert!(!f.admits("10.9.2.3".parse().unwrap()));
        assert!(f.admits("127.0.0.1".parse().unwrap()));
        assert!(f.admits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!f.admits("192.168.1.1".parse().unwrap()));
        assert!(AddressFilter::default().admits("192.168.1.1".parse().unwrap()));
        assert!(parse_net("nope").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_the_burst_then_the_rate() {
        let l = RateLimiter::new(
            &RateLimitConfig {
                per_second: 2.0,
                burst: 3,
                key: "ip".into(),
            },
            "x-api-key",
            &[],
        );
        let none = HeaderMap::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(ip, &none).is_ok());
        }
        let wait = l.check(ip, &none).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has its own bucket.
        assert!(l.check("10.0.0.2".parse().unwrap(), &none).is_ok());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check(ip, &none).is_ok());
        assert!(l.check(ip, &none).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_per_api_key_and_per_route() {
        let config = |key: &str| RateLimitConfig {
            per_second: 1.0,
            burst: 2,
            key: key.into(),
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut alice = HeaderMap::new();
        alice.insert("x-api-key", "alice".parse().unwrap());
        let mut bob = HeaderMap::new();
        bob.insert("x-api-key", "bob".parse().unwrap());
        let keys = ["alice".to_owned(), "bob".to_owned()];
        let by_key = RateLimiter::new(&config("api_key"), "x-api-key", &keys);
        assert!(by_key.after_auth());
        assert!(by_key.check(ip, &alice).is_ok());
        assert!(by_key.check(ip, &alice).is_ok());
        assert!(by_key.check(ip, &alice).is_err());
        // Same address, other key: its own bucket; no key: the address's bucket.
        assert!(by_key.check(ip, &bob).is_ok());
        assert!(by_key.check(ip, &HeaderMap::new()).is_ok());
        assert_eq!(by_key.subject(ip, &alice), "this x-api-key");

        // A key the route does not accept counts against the address.
        let mut forged = HeaderMap::new();
        forged.insert("x-api-key", "made-up".parse().unwrap());
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(by_key.check(other, &forged).is_ok());
        assert!(by_key.check(other, &HeaderMap::new()).is_ok());
        assert!(by_key.check(other, &forged).is_err());

        let whole = RateLimiter::new(&config("route"), "x-api-key", &[]);
        assert!(!whole.after_auth());
        assert!(whole.check(ip, &alice).is_ok());
        assert!(whole.check("10.0.0.2".parse().unwrap(), &bob).is_ok());
        assert!(
            whole
                .check("10.0.0.3".parse().unwrap(), &HeaderMap::new())
                .is_err()
        );
    }
}
