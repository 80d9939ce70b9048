//! Per-route filters applied before a request is forwarded: client address allow/deny lists
//! and a token-bucket rate limit per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RateLimitConfig;

/// Parses `10.0.0.0/8`, `::1/128` or a single address.
pub(crate) fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per client IP.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub(crate) fn new(config: &RateLimitConfig) -> RateLimiter {
        RateLimiter {
            per_second: config.per_second,
            burst: f64::from(config.burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; if there is none, how long until there will be.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        // Forget clients whose buckets have long been full again, so the map stays small.
        if buckets.len() > 100_000 {
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, b| now.duration_since(b.at) < full_after);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let l = RateLimiter::new(&RateLimitConfig {
            per_second: 2.0,
            burst: 3,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(ip).is_ok());
        }
        let wait = l.check(ip).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has its own bucket.
        assert!(l.check("10.0.0.2".parse().unwrap()).is_ok());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_err());
    }
}
