//! Overload protection: a server-wide concurrency limit, hard or adaptive.
//!
//! A call takes a permit before its handler runs and gives it back when the handler ends;
//! without a permit the call is refused at once with `overloaded`, so an overloaded server
//! answers the excess in microseconds instead of queueing it until every caller times out.
//!
//! The adaptive limit works like TCP congestion control on latency (as brpc's auto limiter
//! and Netflix's gradient limiters do). The server remembers its no-load latency: the lowest
//! mean latency of any sampling window. Under sustained load every window queues a little,
//! so that minimum would never be seen again if the service got slower; as brpc does, every
//! `REMEASURE_EVERY` windows one window runs at half the limit, below what the service can
//! run, and its latency replaces the remembered minimum. After each window in which the limit was
//! reached: if latency stayed within `1 + HEADROOM` of the no-load latency, calls are not
//! queueing and the limit grows by a tenth; if it rose above that, calls are queueing for a
//! resource, and the limit shrinks in proportion (`limit × tolerated / measured`), toward the
//! concurrency the service can actually run. So the limit settles near throughput × no-load
//! latency (Little's law) and admitted calls keep close to no-load latency, while the excess
//! is refused at once.
//!
//! A call whose remaining deadline is shorter than the no-load latency cannot be answered in
//! time; it is refused with `deadline_exceeded` before its handler runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Adaptive limit at start: small, so the first windows measure latency without queueing.
const INITIAL_LIMIT: usize = 8;
/// Never go below this: a few calls always get through to keep measuring.
const MIN_LIMIT: usize = 2;
/// Latency above the no-load latency tolerated before the limit shrinks.
const HEADROOM: f64 = 0.3;
/// Windows between two no-load latency measurements.
const REMEASURE_EVERY: u32 = 30;

#[derive(Debug)]
struct Window {
    started: Instant,
    succeeded: u64,
    latency_sum_us: f64,
    min_latency_us: f64,
    windows: u32,
    /// During a remeasuring window: the limit to return to.
    probing: Option<usize>,
}

/// The server's limiter.
#[derive(Debug)]
pub(crate) struct Limiter {
    hard: usize,
    adaptive: Option<Mutex<Window>>,
    inflight: AtomicUsize,
    limit: AtomicUsize,
    /// Whether a call was refused, or the limit reached, during the current window. An
    /// atomic, so admitting a call never takes the window's lock.
    limited: std::sync::atomic::AtomicBool,
    /// No-load latency in microseconds (0 until measured), for the deadline check.
    no_load_us: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) deadline_dropped: AtomicU64,
}

/// Permission for one call to run. Dropping it without [`Permit::finish`] counts the call as
/// failed (cancelled or panicked).
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    started: Instant,
    ok: bool,
}

impl Permit {
    /// Marks the call as answered successfully (its latency then counts).
    pub(crate) fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(self.started.elapsed(), self.ok);
    }
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over the concurrency limit.
    Overloaded { limit: usize },
    /// Its deadline is nearer than the server's no-load latency.
    DeadlineTooClose { no_load: Duration },
}

impl Limiter {
    /// `hard`: 0 for no fixed limit; `adaptive`: measure and adapt.
    pub(crate) fn new(hard: usize, adaptive: bool) -> Limiter {
        let initial = match (hard, adaptive) {
            (0, true) => INITIAL_LIMIT,
            (h, true) => INITIAL_LIMIT.min(h),
            (0, false) => usize::MAX,
            (h, false) => h,
        };
        Limiter {
            hard,
            adaptive: adaptive.then(|| {
                Mutex::new(Window {
                    started: Instant::now(),
                    succeeded: 0,
                    latency_sum_us: 0.0,
                    min_latency_us: 0.0,
                    windows: 0,
                    probing: None,
                })
            }),
            inflight: AtomicUsize::new(0),
            limit: AtomicUsize::new(initial),
            limited: std::sync::atomic::AtomicBool::new(false),
            no_load_us: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            deadline_dropped: AtomicU64::new(0),
        }
    }

    /// Whether any limit applies (if not, calls skip the limiter entirely).
    pub(crate) fn is_active(&self) -> bool {
        self.hard > 0 || self.adaptive.is_some()
    }

    /// The current limit (`usize::MAX` when unlimited).
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Calls holding a permit now.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Admits a call, or says why not. `remaining` is the call's time left, if it has a
    /// deadline.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        remaining: Option<Duration>,
    ) -> Result<Permit, Refusal> {
        let no_load = self.no_load_us.load(Ordering::Relaxed);
        if let Some(left) = remaining
            && no_load > 0
            && (left.as_micros() as u64) < no_load
        {
            self.deadline_dropped.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::DeadlineTooClose {
                no_load: Duration::from_micros(no_load),
            });
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let now = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        if now > limit {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            self.mark_limited();
            return Err(Refusal::Overloaded { limit });
        }
        if now == limit {
            self.mark_limited();
        }
        Ok(Permit {
            limiter: self.clone(),
            started: Instant::now(),
            ok: false,
        })
    }

    fn mark_limited(&self) {
        self.limited.store(true, Ordering::Relaxed);
    }

    fn release(&self, elapsed: Duration, ok: bool) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        let Some(window) = &self.adaptive else {
            return;
        };
        let mut w = window.lock();
        if ok {
            w.succeeded += 1;
            w.latency_sum_us += elapsed.as_secs_f64() * 1e6;
        }
        let span = w.started.elapsed();
        let full = (span >= Duration::from_millis(100) && w.succeeded >= 50)
            || span >= Duration::from_secs(1);
        if !full {
            return;
        }
        let limited = self.limited.swap(false, Ordering::Relaxed);
        if w.succeeded > 0 {
            let latency = w.latency_sum_us / w.succeeded as f64;
            w.windows += 1;
            let current = self.limit.load(Ordering::Relaxed);
            let mut limit = if let Some(saved) = w.probing.take() {
                // The remeasuring window ran below capacity: its latency is the no-load one.
                w.min_latency_us = latency;
                saved
            } else {
                if w.min_latency_us == 0.0 || latency < w.min_latency_us {
                    w.min_latency_us = latency;
                }
                let tolerated = w.min_latency_us * (1.0 + HEADROOM);
                if latency > tolerated {
                    // Queueing: shrink toward the concurrency that keeps latency tolerable.
                    ((current as f64 * tolerated / latency).floor() as usize)
                        .min(current.saturating_sub(1))
                } else if limited {
                    // At the limit without queueing: there is room for more.
                    current + (current / 10).max(1)
                } else {
                    current
                }
            };
            if w.windows % REMEASURE_EVERY == 0 && limited {
                w.probing = Some(limit);
                limit /= 2;
            }
            limit = limit.max(MIN_LIMIT);
            if self.hard > 0 {
                limit = limit.min(self.hard);
            }
            self.limit.store(limit, Ordering::Relaxed);
            self.no_load_us
                .store(w.min_latency_us as u64, Ordering::Relaxed);
        }
        w.started = Instant::now();
        w.succeeded = 0;
        w.latency_sum_us = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_limit_admits_exactly_that_many() {
        let l = Arc::new(Limiter::new(3, false));
        let permits: Vec<Permit> = (0..3).map(|_| l.try_acquire(None).unwrap()).collect();
        assert_eq!(
            l.try_acquire(None).unwrap_err(),
            Refusal::Overloaded { limit: 3 }
        );
        drop(permits);
        assert!(l.try_acquire(None).is_ok());
        assert_eq!(l.rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_adaptive_limit_settles_near_what_the_service_can_run() {
        // A service with 8 workers and 10 ms of work per call: with n calls admitted at once,
        // each takes 10 ms x max(1, n / 8). 64 callers offer far more than it can run.
        let l = Arc::new(Limiter::new(0, true));
        let mut admitted_latency = Duration::ZERO;
        for _ in 0..600 {
            let mut permits: Vec<Permit> =
                (0..64).filter_map(|_| l.try_acquire(None).ok()).collect();
            let n = permits.len().max(1) as u32;
            admitted_latency = Duration::from_millis(10) * n.max(8) / 8;
            tokio::time::advance(admitted_latency).await;
            for p in &mut permits {
                p.succeeded();
            }
        }
        let limit = l.limit();
        assert!((8..=11).contains(&limit), "limit {limit}");
        assert!(
            admitted_latency <= Duration::from_millis(13),
            "{admitted_latency:?}"
        );
        assert!(l.rejected.load(Ordering::Relaxed) > 0);
        // The service gets twice as slow (20 ms of work): the remeasuring windows notice, and
        // the limit settles again instead of collapsing.
        for _ in 0..600 {
            let mut permits: Vec<Permit> =
                (0..64).filter_map(|_| l.try_acquire(None).ok()).collect();
            let n = permits.len().max(1) as u32;
            admitted_latency = Duration::from_millis(20) * n.max(8) / 8;
            tokio::time::advance(admitted_latency).await;
            for p in &mut permits {
                p.succeeded();
            }
        }
        let limit = l.limit();
        assert!(
            (8..=11).contains(&limit),
            "limit after the slowdown {limit}"
        );
        // The no-load latency is known: a call with 1 ms left cannot make it.
        assert!(matches!(
            l.try_acquire(Some(Duration::from_millis(1))),
            Err(Refusal::DeadlineTooClose { .. })
        ));
        assert!(l.try_acquire(Some(Duration::from_millis(50))).is_ok());
    }
}
