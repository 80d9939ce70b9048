//! Monitoring points, which the admin port renders as Prometheus text (`admin::render`).
//!
//! A route's counters are resolved when the route is compiled (and kept, by route name, across
//! reloads), so a request touches only atomics. Upstream figures are read from the pools at
//! render time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
const BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// Requests of one route (or answers of one pool's servers): by status class and by latency
/// to the response head.
#[derive(Debug, Default)]
pub(crate) struct RouteMetrics {
    /// 1xx … 5xx.
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl RouteMetrics {
    pub(crate) fn record(&self, status: http::StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Requests answered so far.
    pub(crate) fn total(&self) -> u64 {
        self.by_class.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// `metric{label="value",class="Nxx"} count` lines.
    pub(crate) fn render_classes(&self, out: &mut String, metric: &str, label: &str, value: &str) {
        let value = escape(value);
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "{metric}{{{label}=\"{value}\",class=\"{}xx\"}} {}",
                i + 1,
                c.load(Relaxed)
            );
        }
    }

    /// The latency histogram's `_bucket`, `_sum` and `_count` lines.
    pub(crate) fn render_histogram(
        &self,
        out: &mut String,
        metric: &str,
        label: &str,
        value: &str,
    ) {
        let value = escape(value);
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BOUNDS_US
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{metric}_bucket{{{label}=\"{value}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{metric}_sum{{{label}=\"{value}\"}} {}\n{metric}_count{{{label}=\"{value}\"}} {cumulative}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
    }
}

/// Gateway-wide counters, kept across reloads.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
    /// Requests no route matched.
    pub(crate) unrouted: AtomicU64,
    /// Client connections (upgraded tunnels among the open ones); refused are those closed at
    /// once because `max_connections` were open.
    pub(crate) connections: Arc<keel_net::ConnectionStats>,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) reloads: AtomicU64,
    pub(crate) reloads_refused: AtomicU64,
}

impl Metrics {
    /// The counters of the route named `name`, created on first use.
    pub(crate) fn route(&self, name: &str) -> Arc<RouteMetrics> {
        self.routes
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// The counters of every route by name.
    pub(crate) fn routes(&self) -> Vec<(String, Arc<RouteMetrics>)> {
        self.routes
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Escapes a label value.
pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
