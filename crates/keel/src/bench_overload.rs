//! `keel bench work`: load on the work service (`keel serve --work-slots N --work-ms M`), a
//! stand-in for a service with bounded capacity (N workers, M ms of work per call): closed
//! loop at a concurrency, or open loop at a fixed arrival rate, the way overload really
//! arrives (callers do not wait for the server before sending more).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel::loadgen;
use keel_echo::{EchoReply, EchoRequest};
use keel_rpc::{CallOptions, Channel, ChannelConfig, Code, ServiceDef, Status};
use parking_lot::Mutex;

/// The work service's name.
pub(crate) const SERVICE: &str = "keel.bench.Work";

/// A service with `slots` workers, each call holding one for `work`.
pub(crate) fn work_service(slots: usize, work: Duration) -> ServiceDef {
    let workers = Arc::new(tokio::sync::Semaphore::new(slots.max(1)));
    ServiceDef::new(SERVICE).unary("Do", move |_ctx, _req: EchoRequest| {
        let workers = workers.clone();
        async move {
            let _worker = workers
                .acquire()
                .await
                .map_err(|_| Status::unavailable("shutting down"))?;
            tokio::time::sleep(work).await;
            Ok(EchoReply::default())
        }
    })
}

/// Arguments of `keel bench work`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct WorkBenchArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: String,
    /// Arrivals per second (open loop); 0 runs a closed loop at --concurrency instead.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Calls in flight for the closed loop.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Per-call deadline.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    other: AtomicU64,
}

pub(crate) async fn run(args: &WorkBenchArgs) -> anyhow::Result<serde_json::Value> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(
            Channel::connect(args.addr.clone(), ChannelConfig::default())
                .await
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }
    let channels = Arc::new(channels);
    let timeout = Duration::from_millis(args.timeout_ms);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let tally = Arc::new(Tally::default());
    let admitted = Arc::new(Mutex::new(loadgen::new_histogram()));
    let refusals = Arc::new(Mutex::new(loadgen::new_histogram()));
    let one = {
        let (tally, admitted, refusals) = (tally.clone(), admitted.clone(), refusals.clone());
        move |channel: Channel| {
            let (tally, admitted, refusals) = (tally.clone(), admitted.clone(), refusals.clone());
            async move {
                let t0 = Instant::now();
                let result: Result<EchoReply, Status> = keel_rpc::client::unary(
                    &channel,
                    SERVICE,
                    "Do",
                    &EchoRequest::default(),
                    CallOptions::default().timeout(timeout),
                )
                .await;
                if t0 < measure_from || t0 >= end {
                    return;
                }
                let us = (t0.elapsed().as_micros() as u64).max(1);
                match result {
                    Ok(_) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        admitted.lock().saturating_record(us);
                    }
                    Err(e) if e.code() == Code::Overloaded => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                        refusals.lock().saturating_record(us);
                    }
                    Err(e) if e.code() == Code::DeadlineExceeded => {
                        tally.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        tally.other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    if args.rate > 0.0 {
        // Open loop: arrivals on a fixed schedule, each its own task, whatever the replies do.
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = start;
        let mut n = 0usize;
        while next < end {
            let now = Instant::now();
            while next <= now && next < end {
                let channel = channels[n % channels.len()].clone();
                tasks.spawn(one(channel));
                n += 1;
                next += interval;
            }
            // Reap finished tasks as we go so the set stays small.
            while tasks.try_join_next().is_some() {}
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while tasks.join_next().await.is_some() {}
    } else {
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..args.concurrency.max(1) {
            let channel = channels[w % channels.len()].clone();
            let one = one.clone();
            workers.spawn(async move {
                while Instant::now() < end {
                    one(channel.clone()).await;
                }
            });
        }
        while workers.join_next().await.is_some() {}
    }
    let secs = args.seconds;
    let ok = tally.ok.load(Ordering::Relaxed);
    let admitted = admitted.lock();
    let refusals = refusals.lock();
    Ok(serde_json::json!({
        "rate": args.rate, "concurrency": args.concurrency,
        "goodput": (ok as f64 / secs).round(),
        "ok": ok,
        "refused": tally.refused.load(Ordering::Relaxed),
        "timed_out": tally.timed_out.load(Ordering::Relaxed),
        "other_errors": tally.other.load(Ordering::Relaxed),
        "p50_ms": admitted.value_at_quantile(0.5) as f64 / 1e3,
        "p99_ms": admitted.value_at_quantile(0.99) as f64 / 1e3,
        "refusal_p99_ms": refusals.value_at_quantile(0.99) as f64 / 1e3,
    }))
}
