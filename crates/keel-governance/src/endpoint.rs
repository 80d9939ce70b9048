//! What a caller tracks per endpoint: calls in flight, a peak-EWMA latency estimate, and the
//! outlier-ejection state machine (healthy → ejected → half-open probe → healthy or ejected
//! for longer).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

/// Outlier ejection settings. An endpoint is ejected (taken out of rotation) after
/// `consecutive_failures` failures in a row, or when at least `min_requests` calls in the
/// last `window` failed at `error_rate` or more; it comes back for one probe call after its
/// ejection time, which doubles with each ejection in a row up to `max_ejection`. No more than
/// `max_ejected_share` of a service's endpoints are ejected at once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint (0 turns this rule off).
    pub consecutive_failures: u32,
    /// Failure share over the window that ejects an endpoint (above 1 turns this rule off).
    pub error_rate: f64,
    /// Calls needed in the window before the error rate counts.
    pub min_requests: u32,
    /// Length of the error-rate window.
    #[serde(with = "keel_net::duration::ms", rename = "window_ms")]
    pub window: Duration,
    /// First ejection time.
    #[serde(with = "keel_net::duration::ms", rename = "base_ejection_ms")]
    pub base_ejection: Duration,
    /// Longest ejection time.
    #[serde(with = "keel_net::duration::ms", rename = "max_ejection_ms")]
    pub max_ejection: Duration,
    /// Largest share of a service's endpoints ejected at once.
    pub max_ejected_share: f64,
}

impl Default for OutlierConfig {
    fn default() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            max_ejected_share: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Health {
    Healthy,
    Ejected {
        until: Instant,
    },
    /// Ejection time is over; one probe call decides.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug)]
struct Outlier {
    health: Health,
    consecutive: u32,
    /// Ejections in a row (reset by a successful probe).
    ejections: u32,
    window_start: Instant,
    window_calls: u32,
    window_failures: u32,
}

#[derive(Debug)]
struct Latency {
    /// Peak-EWMA estimate, microseconds.
    estimate_us: f64,
    updated: Instant,
}

/// Decay time of the latency estimate.
const LATENCY_DECAY: Duration = Duration::from_secs(10);

/// Per-endpoint statistics, shared by every call through one service channel.
#[derive(Debug)]
pub struct EndpointStats {
    inflight: AtomicUsize,
    attempts: std::sync::atomic::AtomicU64,
    latency: Mutex<Latency>,
    outlier: Mutex<Outlier>,
}

impl Default for EndpointStats {
    fn default() -> EndpointStats {
        let now = Instant::now();
        EndpointStats {
            inflight: AtomicUsize::new(0),
            attempts: std::sync::atomic::AtomicU64::new(0),
            latency: Mutex::new(Latency {
                estimate_us: 0.0,
                updated: now,
            }),
            outlier: Mutex::new(Outlier {
                health: Health::Healthy,
                consecutive: 0,
                ejections: 0,
                window_start: now,
                window_calls: 0,
                window_failures: 0,
            }),
        }
    }
}

/// How a finished call went, for ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (an application error is still an answer).
    Success,
    /// The endpoint failed: unreachable, crashed mid-call, internal error, timed out.
    Failure,
}

impl EndpointStats {
    /// Calls in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The latency estimate in microseconds (0 before the first sample), decayed to now.
    pub fn latency_us(&self) -> f64 {
        self.latency.lock().estimate_us
    }

    /// Whether the endpoint may take a call now (not ejected; a half-open endpoint takes one
    /// probe at a time).
    pub fn selectable(&self, now: Instant) -> bool {
        let mut o = self.outlier.lock();
        if let Health::Ejected { until } = o.health
            && now >= until
        {
            o.health = Health::HalfOpen { probing: false };
        }
        match o.health {
            Health::Healthy => true,
            Health::Ejected { .. } => false,
            Health::HalfOpen { probing } => !probing,
        }
    }

    /// Whether the endpoint is ejected (or waiting on its probe).
    pub fn is_ejected(&self) -> bool {
        !matches!(self.outlier.lock().health, Health::Healthy)
    }

    /// Calls sent to this endpoint so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Marks a call as started; a half-open endpoint's call is its probe.
    pub fn start(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let mut o = self.outlier.lock();
        if let Health::HalfOpen { probing } = &mut o.health {
            *probing = true;
        }
    }

    /// Marks a call as finished. `may_eject` says whether the service can afford to lose this
    /// endpoint now (the ejected-share cap). Returns true if this call ejected it.
    pub fn finish(
        &self,
        outcome: Outcome,
        elapsed: Duration,
        config: &OutlierConfig,
        may_eject: bool,
    ) -> bool {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        if outcome == Outcome::Success {
            self.observe_latency(elapsed, now);
        }
        let mut o = self.outlier.lock();
        if now.duration_since(o.window_start) > config.window {
            o.window_start = now;
            o.window_calls = 0;
            o.window_failures = 0;
        }
        o.window_calls += 1;
        match outcome {
            Outcome::Success => {
                o.consecutive = 0;
                if matches!(o.health, Health::HalfOpen { .. }) {
                    // The probe answered: back in rotation.
                    o.health = Health::Healthy;
                    o.ejections = 0;
                    o.window_calls = 0;
                    o.window_failures = 0;
                }
                false
            }
            Outcome::Failure => {
                o.consecutive += 1;
                o.window_failures += 1;
                let probe_failed = matches!(o.health, Health::HalfOpen { .. });
                let by_streak =
                    config.consecutive_failures > 0 && o.consecutive >= config.consecutive_failures;
                let by_rate = o.window_calls >= config.min_requests
                    && f64::from(o.window_failures) / f64::from(o.window_calls)
                        >= config.error_rate;
                let eject = probe_failed
                    || (o.health == Health::Healthy && may_eject && (by_streak || by_rate));
                if eject {
                    let factor = 1u32 << o.ejections.min(16);
                    let time = config
                        .base_ejection
                        .saturating_mul(factor)
                        .min(config.max_ejection);
                    o.health = Health::Ejected { until: now + time };
                    o.ejections += 1;
                    o.consecutive = 0;
                    o.window_calls = 0;
                    o.window_failures = 0;
                }
                eject
            }
        }
    }

    /// Peak-EWMA: a sample above the estimate replaces it at once (react to slowness fast); one
    /// below pulls it down exponentially with time (forget it slowly).
    fn observe_latency(&self, elapsed: Duration, now: Instant) {
        let sample = elapsed.as_secs_f64() * 1e6;
        let mut l = self.latency.lock();
        if l.estimate_us == 0.0 || sample > l.estimate_us {
            l.estimate_us = sample;
        } else {
            let dt = now.duration_since(l.updated).as_secs_f64();
            let w = (-dt / LATENCY_DECAY.as_secs_f64()).exp();
            l.estimate_us = l.estimate_us * w + sample * (1.0 - w);
        }
        l.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(s: &EndpointStats, c: &OutlierConfig) -> bool {
        s.start();
        s.finish(Outcome::Failure, Duration::from_millis(1), c, true)
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_probe_and_backoff() {
        let c = OutlierConfig::default();
        let s = EndpointStats::default();
        for _ in 0..4 {
            assert!(!fail(&s, &c));
        }
        assert!(fail(&s, &c), "the fifth failure in a row ejects");
        assert!(!s.selectable(Instant::now()));
        tokio::time::advance(c.base_ejection).await;
        assert!(
            s.selectable(Instant::now()),
            "half-open after the ejection time"
        );
        s.start();
        assert!(!s.selectable(Instant::now()), "one probe at a time");
        // The probe fails: ejected again, for twice as long.
        assert!(s.finish(Outcome::Failure, Duration::ZERO, &c, true));
        tokio::time::advance(c.base_ejection).await;
        assert!(!s.selectable(Instant::now()));
        tokio::time::advance(c.base_ejection).await;
        assert!(s.selectable(Instant::now()));
        // A successful probe restores it.
        s.start();
        s.finish(Outcome::Success, Duration::from_millis(1), &c, true);
        assert!(s.selectable(Instant::now()) && !s.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn the_share_cap_prevents_ejection() {
        let c = OutlierConfig::default();
        let s = EndpointStats::default();
        for _ in 0..10 {
            s.start();
            assert!(!s.finish(Outcome::Failure, Duration::ZERO, &c, false));
        }
        assert!(s.selectable(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointStats::default();
        let c = OutlierConfig::default();
        s.start();
        s.finish(Outcome::Success, Duration::from_millis(10), &c, true);
        assert_eq!(s.latency_us(), 10_000.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        s.start();
        s.finish(Outcome::Success, Duration::from_millis(1), &c, true);
        let after = s.latency_us();
        assert!(after < 10_000.0 && after > 1_000.0, "{after}");
        s.start();
        s.finish(Outcome::Success, Duration::from_millis(50), &c, true);
        assert_eq!(s.latency_us(), 50_000.0);
    }
}
