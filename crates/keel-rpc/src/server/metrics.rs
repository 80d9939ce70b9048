//! Server monitoring points, rendered as Prometheus text at `GET /metrics`.
//!
//! Every counter a request touches is an atomic resolved when the method is registered, so
//! the hot path takes no lock and does no label lookup.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::status::Code;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];
const BUCKETS_MICROS: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A latency histogram with Prometheus' bucket layout (50 µs to 10 s), recorded without
/// locks. Shared by every Keel component that exports latencies.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (the last is +Inf); made cumulative when rendered.
    buckets: [AtomicU64; 17],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(BUCKETS_MICROS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Mean of the observations.
    pub fn mean(&self) -> Duration {
        Duration::from_micros(
            self.sum_micros
                .load(Relaxed)
                .checked_div(self.count())
                .unwrap_or(0),
        )
    }

    /// Appends the histogram's `_bucket`, `_sum` and `_count` lines for metric `name`, with
    /// `labels` (`key="value",...`, or empty) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Relaxed);
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Counters of one method.
#[derive(Debug, Default)]
pub struct MethodStats {
    by_code: [AtomicU64; 17],
    latency: Histogram,
}

impl MethodStats {
    /// Records a finished call.
    pub(crate) fn record(&self, code: Code, elapsed: Duration) {
        self.by_code[code as usize].fetch_add(1, Relaxed);
        self.latency.record(elapsed);
    }

    /// Finished calls with this code.
    pub fn count(&self, code: Code) -> u64 {
        self.by_code[code as usize].load(Relaxed)
    }

    /// All finished calls.
    pub fn total(&self) -> u64 {
        self.by_code.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Mean latency of finished calls.
    pub fn mean_latency(&self) -> Duration {
        self.latency.mean()
    }
}

/// Server-wide gauges and counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections (binary and HTTP): open now, accepted since start, and closed at once
    /// because the connection cap was reached.
    pub connections: Arc<keel_net::ConnectionStats>,
    /// Calls running now.
    pub inflight: AtomicI64,
    /// Connections closed because the peer broke the protocol (bad frame, oversized frame).
    pub protocol_errors: AtomicU64,
    /// Calls for a service or method that does not exist.
    pub unknown_method_calls: AtomicU64,
}

/// Renders Prometheus text exposition format (version 0.0.4).
pub(crate) fn render(shared: &super::Shared) -> String {
    let stats: &ServerStats = &shared.stats;
    let methods: &[(Arc<str>, Arc<str>, Arc<MethodStats>)] = &shared.method_list;
    let mut out = String::with_capacity(4096);
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: i64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        &mut out,
        "keel_rpc_connections_open",
        "Connections open now.",
        "gauge",
        stats.connections.open.load(Relaxed),
    );
    gauge(
        &mut out,
        "keel_rpc_connections_accepted_total",
        "Connections accepted.",
        "counter",
        stats.connections.accepted.load(Relaxed) as i64,
    );
    gauge(
        &mut out,
        "keel_rpc_connections_refused_total",
        "Connections refused at the connection cap.",
        "counter",
        stats.connections.refused.load(Relaxed) as i64,
    );
    gauge(
        &mut out,
        "keel_rpc_inflight_calls",
        "Calls being handled now.",
        "gauge",
        stats.inflight.load(Relaxed),
    );
    gauge(
        &mut out,
        "keel_rpc_protocol_errors_total",
        "Connections closed for a protocol violation.",
        "counter",
        stats.protocol_errors.load(Relaxed) as i64,
    );
    gauge(
        &mut out,
        "keel_rpc_unknown_method_calls_total",
        "Calls to a service or method that does not exist.",
        "counter",
        stats.unknown_method_calls.load(Relaxed) as i64,
    );

    let limiter = &shared.limiter;
    if limiter.is_active() {
        gauge(
            &mut out,
            "keel_rpc_concurrency_limit",
            "Calls the server admits at once now (fixed or adaptive).",
            "gauge",
            limiter.limit().min(i64::MAX as usize) as i64,
        );
        gauge(
            &mut out,
            "keel_rpc_limited_total",
            "Calls refused with overloaded at the concurrency limit.",
            "counter",
            limiter.rejected.load(Relaxed) as i64,
        );
        gauge(
            &mut out,
            "keel_rpc_deadline_dropped_total",
            "Calls refused because their deadline was nearer than the no-load latency.",
            "counter",
            limiter.deadline_dropped.load(Relaxed) as i64,
        );
    }
    out.push_str("# HELP keel_rpc_requests_total Finished calls by method and status.\n# TYPE keel_rpc_requests_total counter\n");
    for (service, method, m) in methods {
        for code in Code::ALL {
            let n = m.count(code);
            if n > 0 || code == Code::Ok {
                let _ = writeln!(
                    out,
                    "keel_rpc_requests_total{{service=\"{service}\",method=\"{method}\",status=\"{code}\"}} {n}"
                );
            }
        }
    }
    out.push_str("# HELP keel_rpc_request_duration_seconds Call latency by method.\n# TYPE keel_rpc_request_duration_seconds histogram\n");
    for (service, method, m) in methods {
        m.latency.render(
            &mut out,
            "keel_rpc_request_duration_seconds",
            &format!("service=\"{service}\",method=\"{method}\""),
        );
    }
    out
}
