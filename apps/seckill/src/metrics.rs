//! The sale's business in Prometheus text, served by the API at `GET /metrics`: buys by
//! outcome, the latency of reservations, units left per item and orders per item by status.
//!
//! Buys are counted as the API answers them. `rate_limited` is not among the outcomes: the
//! gateway refuses those before they reach the API, and counts them itself
//! (`keel_gateway_requests_total{status="429"}` on the buy route).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use keel_rpc::server::Histogram;

/// What a buy can come to, as the API answers it (the `error` code of its answer, or `ok`).
pub const BUY_OUTCOMES: [&str; 8] = [
    "ok",
    "sold_out",
    "limit_reached",
    "not_started",
    "overloaded",
    "not_found",
    "invalid_request",
    "internal",
];

/// Counters of the sale kept by one API process.
#[derive(Debug)]
pub struct SaleMetrics {
    started: Instant,
    buys: [AtomicU64; BUY_OUTCOMES.len()],
    /// The inventory's `Reserve` calls, as the API timed them.
    pub reservations: Histogram,
    /// Scrapes that could not ask every shard for its orders in time.
    pub scrape_errors: AtomicU64,
    /// `Reserve` calls sent again after an answer was lost (the shard's owner died or was
    /// being replaced): the same request id, so the inventory answers with its first decision.
    pub in_doubt_retries: AtomicU64,
}

impl Default for SaleMetrics {
    fn default() -> SaleMetrics {
        SaleMetrics {
            started: Instant::now(),
            buys: Default::default(),
            reservations: Histogram::default(),
            scrape_errors: AtomicU64::new(0),
            in_doubt_retries: AtomicU64::new(0),
        }
    }
}

impl SaleMetrics {
    /// Counts a buy answered with `outcome` (one of [`BUY_OUTCOMES`]; others count as
    /// `internal`).
    pub fn count_buy(&self, outcome: &str) {
        let i = BUY_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(BUY_OUTCOMES.len() - 1);
        self.buys[i].fetch_add(1, Relaxed);
    }

    /// Buys answered so far, by outcome.
    pub fn buys(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        BUY_OUTCOMES
            .iter()
            .zip(&self.buys)
            .map(|(o, n)| (*o, n.load(Relaxed)))
    }

    /// How long the process has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Renders the counters, then `stock` (units left per item) and `orders` (orders per
    /// item and status) as gathered for this scrape.
    pub fn render(&self, stock: &[(String, u64)], orders: &[(String, String, u64)]) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP keel_sale_buys_total Buy requests answered by the API, by outcome.\n# TYPE keel_sale_buys_total counter\n");
        for (outcome, n) in self.buys() {
            let _ = writeln!(out, "keel_sale_buys_total{{outcome=\"{outcome}\"}} {n}");
        }
        out.push_str("# HELP keel_sale_reservation_duration_seconds Reserve calls to the inventory, as the API timed them.\n# TYPE keel_sale_reservation_duration_seconds histogram\n");
        self.reservations
            .render(&mut out, "keel_sale_reservation_duration_seconds", "");
        out.push_str("# HELP keel_sale_stock_left Units of an item not yet reserved.\n# TYPE keel_sale_stock_left gauge\n");
        for (item, n) in stock {
            let _ = writeln!(out, "keel_sale_stock_left{{item=\"{}\"}} {n}", label(item));
        }
        out.push_str("# HELP keel_sale_orders Orders of an item by status, as the orders services count them.\n# TYPE keel_sale_orders gauge\n");
        for (item, status, n) in orders {
            let _ = writeln!(
                out,
                "keel_sale_orders{{item=\"{}\",status=\"{}\"}} {n}",
                label(item),
                label(status)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keel_sale_scrape_errors_total Scrapes that missed some shard's order counts.\n# TYPE keel_sale_scrape_errors_total counter\nkeel_sale_scrape_errors_total {}",
            self.scrape_errors.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keel_sale_in_doubt_retries_total Reserve calls resent with the same request id after a lost answer.\n# TYPE keel_sale_in_doubt_retries_total counter\nkeel_sale_in_doubt_retries_total {}",
            self.in_doubt_retries.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keel_sale_uptime_seconds Seconds since the API started.\n# TYPE keel_sale_uptime_seconds gauge\nkeel_sale_uptime_seconds {}",
            self.uptime().as_secs()
        );
        out
    }
}

/// A label value escaped for the text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_and_rendered_with_escaped_labels() {
        let m = SaleMetrics::default();
        m.count_buy("ok");
        m.count_buy("ok");
        m.count_buy("sold_out");
        m.count_buy("something else");
        m.reservations.record(Duration::from_millis(3));
        let text = m.render(
            &[("a\"b".into(), 7)],
            &[("a\"b".into(), "pending_payment".into(), 2)],
        );
        assert!(
            text.contains("keel_sale_buys_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("keel_sale_buys_total{outcome=\"sold_out\"} 1"));
        assert!(text.contains("keel_sale_buys_total{outcome=\"internal\"} 1"));
        assert!(
            text.contains("keel_sale_stock_left{item=\"a\\\"b\"} 7"),
            "{text}"
        );
        assert!(text.contains("keel_sale_orders{item=\"a\\\"b\",status=\"pending_payment\"} 2"));
        assert!(
            text.contains("keel_sale_reservation_duration_seconds_count{} 1"),
            "{text}"
        );
        assert!(text.contains("le=\"0.005\"} 1"), "{text}");
    }
}
