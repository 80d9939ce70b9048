//! A token bucket: the one rate-limit policy of every Keel server (the gateway's per-client
//! limits, the chat's logins and requests).

use std::time::Duration;

use tokio::time::Instant;

/// Tokens that refill at a rate up to a burst; each admitted request takes one.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket: `burst` requests may come at once.
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            at: now,
        }
    }

    /// Refills for the time since the bucket was last used (`rate` tokens a second, at most
    /// `burst`) and takes a token; when there is none, how long until there will be.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.tokens = self.level(rate, burst, now);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket has filled up again by `now`: it is then no different from a new
    /// one, and a limiter keeping buckets per client may forget it.
    pub fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.level(rate, burst, now) >= burst
    }

    fn level(&self, rate: f64, burst: f64, now: Instant) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_full_again() {
        let start = Instant::now();
        let mut b = TokenBucket::full(3.0, start);
        for _ in 0..3 {
            assert!(b.take(2.0, 3.0, start).is_ok());
        }
        let wait = b.take(2.0, 3.0, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500), "one token at 2 a second");
        let later = start + Duration::from_millis(500);
        assert!(b.take(2.0, 3.0, later).is_ok());
        assert!(!b.is_full(2.0, 3.0, later));
        assert!(b.is_full(2.0, 3.0, later + Duration::from_millis(1500)));
    }
}
