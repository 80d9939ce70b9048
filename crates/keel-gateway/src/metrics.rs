//! Monitoring points, rendered as Prometheus text on the admin port.
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

use crate::Shared;

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
    fn render_classes(&self, out: &mut String, metric: &str, label: &str, value: &str) {
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
    fn render_histogram(&self, out: &mut String, metric: &str, label: &str, value: &str) {
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

    /// Prometheus text exposition (version 0.0.4).
    pub(crate) fn render(&self, shared: &Shared) -> String {
        let mut out = String::with_capacity(4096);
        let routes: Vec<(String, Arc<RouteMetrics>)> = self
            .routes
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.push_str("# HELP keel_gateway_requests_total Requests answered, by route and status class.\n# TYPE keel_gateway_requests_total counter\n");
        for (name, m) in &routes {
            m.render_classes(&mut out, "keel_gateway_requests_total", "route", name);
        }
        let _ = writeln!(
            out,
            "keel_gateway_requests_total{{route=\"\",class=\"4xx\"}} {}",
            self.unrouted.load(Relaxed)
        );
        out.push_str("# HELP keel_gateway_request_duration_seconds Time to the response head, by route.\n# TYPE keel_gateway_request_duration_seconds histogram\n");
        for (name, m) in &routes {
            m.render_histogram(
                &mut out,
                "keel_gateway_request_duration_seconds",
                "route",
                name,
            );
        }
        out.push_str("# HELP keel_gateway_upstream_responses_total Answers from each pool's servers (502/504 for none), by status class.\n# TYPE keel_gateway_upstream_responses_total counter\n");
        for pool in &shared.pools {
            pool.responses.render_classes(
                &mut out,
                "keel_gateway_upstream_responses_total",
                "upstream",
                &pool.name,
            );
        }
        out.push_str("# HELP keel_gateway_upstream_response_seconds Time from sending to a server to its response head, by pool.\n# TYPE keel_gateway_upstream_response_seconds histogram\n");
        for pool in &shared.pools {
            pool.responses.render_histogram(
                &mut out,
                "keel_gateway_upstream_response_seconds",
                "upstream",
                &pool.name,
            );
        }
        out.push_str("# HELP keel_gateway_upstream_server_up 1 if the server may take traffic (healthy and not ejected).\n# TYPE keel_gateway_upstream_server_up gauge\n");
        let mut per_server = String::new();
        let mut per_pool = String::new();
        for pool in &shared.pools {
            let up = escape(&pool.name);
            for s in pool.servers().iter() {
                let labels = format!("upstream=\"{up}\",server=\"{}\"", escape(&s.address));
                let _ = writeln!(
                    out,
                    "keel_gateway_upstream_server_up{{{labels}}} {}",
                    u8::from(s.is_up())
                );
                let _ = writeln!(
                    per_server,
                    "keel_gateway_upstream_requests_total{{{labels}}} {}\nkeel_gateway_upstream_failures_total{{{labels}}} {}\nkeel_gateway_upstream_inflight{{{labels}}} {}",
                    s.requests.load(Relaxed),
                    s.failures.load(Relaxed),
                    s.stats.inflight()
                );
            }
            let (waiting, rejected) = pool
                .queue
                .as_ref()
                .map_or((0, 0), |q| (q.waiting(), q.rejected()));
            let _ = writeln!(
                per_pool,
                "keel_gateway_upstream_queue_depth{{upstream=\"{up}\"}} {waiting}\nkeel_gateway_upstream_queue_rejected_total{{upstream=\"{up}\"}} {rejected}\nkeel_gateway_upstream_retries_total{{upstream=\"{up}\"}} {}\nkeel_gateway_upstream_retry_budget_exhausted_total{{upstream=\"{up}\"}} {}",
                pool.retries.retries.load(Relaxed),
                pool.retries.budget_exhausted.load(Relaxed)
            );
        }
        out.push_str("# TYPE keel_gateway_upstream_requests_total counter\n# TYPE keel_gateway_upstream_failures_total counter\n# TYPE keel_gateway_upstream_inflight gauge\n");
        out.push_str(&per_server);
        out.push_str("# HELP keel_gateway_upstream_queue_depth Requests waiting for an upstream slot.\n# TYPE keel_gateway_upstream_queue_depth gauge\n# TYPE keel_gateway_upstream_queue_rejected_total counter\n# HELP keel_gateway_upstream_retries_total Requests sent again to another server after no answer.\n# TYPE keel_gateway_upstream_retries_total counter\n# HELP keel_gateway_upstream_retry_budget_exhausted_total Retries the retry budget refused.\n# TYPE keel_gateway_upstream_retry_budget_exhausted_total counter\n");
        out.push_str(&per_pool);
        for (name, kind, value) in [
            (
                "connections_open",
                "gauge",
                self.connections.open.load(Relaxed),
            ),
            (
                "connections_accepted_total",
                "counter",
                self.connections.accepted.load(Relaxed) as i64,
            ),
            (
                "connections_refused_total",
                "counter",
                self.connections.refused.load(Relaxed) as i64,
            ),
            (
                "tls_handshake_failures_total",
                "counter",
                self.tls_handshake_failures.load(Relaxed) as i64,
            ),
            (
                "reloads_total",
                "counter",
                self.reloads.load(Relaxed) as i64,
            ),
            (
                "reloads_refused_total",
                "counter",
                self.reloads_refused.load(Relaxed) as i64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE keel_gateway_{name} {kind}\nkeel_gateway_{name} {value}"
            );
        }
        if let Some(access) = &shared.access {
            let _ = writeln!(
                out,
                "# TYPE keel_gateway_access_log_dropped_total counter\nkeel_gateway_access_log_dropped_total {}",
                access.dropped()
            );
        }
        out
    }
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
