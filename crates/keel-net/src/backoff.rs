//! Reconnect delays: exponential growth, capped, with jitter so that many clients cut off by
//! the same event do not come back in lockstep.

use std::time::Duration;

use serde::Deserialize;

/// Exponential backoff with proportional jitter.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first retry.
    #[serde(with = "crate::duration::ms", rename = "initial_ms")]
    pub initial: Duration,
    /// Largest delay, before jitter.
    #[serde(with = "crate::duration::ms", rename = "max_ms")]
    pub max: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Spread as a share of the delay: 0.2 gives delays in ±20%.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), given a uniform sample `unit` in
    /// `[0, 1)` (so tests can pass fixed values).
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        base.mul_f64(factor)
    }

    /// The delay before retry number `attempt`, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    fn base(&self, attempt: u32) -> Duration {
        let growth = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * growth).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_within_jittered_bounds(attempt in 0u32..200, unit in 0.0f64..1.0) {
            let b = Backoff::default();
            let d = b.delay_with(attempt, unit).as_secs_f64();
            let base = b.base(attempt).as_secs_f64();
            prop_assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9);
            prop_assert!(d <= b.max.as_secs_f64() * 1.2 + 1e-9);
        }

        #[test]
        fn base_never_shrinks(attempt in 0u32..100) {
            let b = Backoff::default();
            prop_assert!(b.base(attempt + 1) >= b.base(attempt));
        }
    }

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(800));
        assert_eq!(b.delay(30), Duration::from_secs(10));
    }
}
