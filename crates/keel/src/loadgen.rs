//! A closed-loop load generator: `concurrency` workers, each sending its next call as soon as
//! the previous one returns, for a fixed time; latencies go into HDR histograms.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The shape of a load run, shared by every load generator in `keel bench` and `bench/peers`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Payload bytes per request (echoed back).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Wall time of the measured window.
    pub elapsed: Duration,
    /// Successful calls per second over the measured window.
    pub qps: f64,
    /// Latency percentiles of successful calls, in microseconds.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
}

impl LoadReport {
    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "{:>10.0} calls/s  p50 {:>6.3} ms  p99 {:>6.3} ms  p99.9 {:>6.3} ms  max {:>7.3} ms  ({} ok, {} errors)",
            self.qps,
            self.p50_us as f64 / 1e3,
            self.p99_us as f64 / 1e3,
            self.p999_us as f64 / 1e3,
            self.max_us as f64 / 1e3,
            self.ok,
            self.errors
        )
    }

    /// The report as a JSON object, with the shape of the run.
    pub fn to_json_for(&self, load: &LoadArgs) -> serde_json::Value {
        let mut json = self.to_json();
        json["payload"] = load.payload.into();
        json["concurrency"] = load.concurrency.into();
        json["connections"] = load.connections.into();
        json
    }

    /// The report as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok, "errors": self.errors, "qps": self.qps.round(),
            "p50_ms": self.p50_us as f64 / 1e3, "p99_ms": self.p99_us as f64 / 1e3,
            "p999_ms": self.p999_us as f64 / 1e3, "max_ms": self.max_us as f64 / 1e3,
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}

/// A latency histogram in microseconds: 1 µs to 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

impl LoadReport {
    /// The report of a run measured from `measure_from` until `end` (or now, if earlier).
    pub fn from_histogram(
        hist: &Histogram<u64>,
        errors: u64,
        first_error: Option<String>,
        measure_from: Instant,
        end: Instant,
    ) -> LoadReport {
        let elapsed = Instant::now()
            .min(end)
            .saturating_duration_since(measure_from)
            .max(Duration::from_millis(1));
        let ok = hist.len();
        LoadReport {
            ok,
            errors,
            first_error,
            elapsed,
            qps: ok as f64 / elapsed.as_secs_f64(),
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
        }
    }
}

/// One closed-loop worker: what it needs to make calls, built once per worker, so a call
/// clones nothing (a load generator's own per-call costs would be counted as the system's).
pub trait Caller: Send + 'static {
    /// Makes one call.
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// A closure making calls whose futures own what they use.
impl<F, Fut> Caller for F
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        self()
    }
}

/// Runs `concurrency` workers for `warmup + duration`; only calls that start after the warm-up
/// are measured. `worker(i)` builds worker `i`, whose [`Caller::call`] makes one call.
pub async fn closed_loop<W, C>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    worker: W,
) -> LoadReport
where
    W: Fn(usize) -> C,
    C: Caller,
{
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut caller = worker(i);
        tasks.spawn(async move {
            let mut hist = new_histogram();
            let (mut errors, mut first_error) = (0u64, None);
            // One clock read per call: a call's end is the next one's start.
            let mut t0 = Instant::now();
            while t0 < end {
                let result = caller.call().await;
                let t1 = Instant::now();
                let started = std::mem::replace(&mut t0, t1);
                if started < measure_from {
                    continue;
                }
                match result {
                    // Saturating, so the histogram's count is the count of successful calls.
                    Ok(()) => hist.saturating_record((t1 - started).as_micros().max(1) as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                        // A dead server fails calls in microseconds; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        t0 = Instant::now();
                    }
                }
            }
            (hist, errors, first_error)
        });
    }
    let mut hist = new_histogram();
    let (mut errors, mut first_error) = (0, None);
    while let Some(joined) = tasks.join_next().await {
        if let Ok((h, e, f)) = joined {
            let _ = hist.add(&h);
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
    }
    LoadReport::from_histogram(&hist, errors, first_error, measure_from, end)
}
