//! `keel bench registry`: the same registry workload against Keel's registry or etcd, through
//! the one `NamingBackend` interface, so both are driven by identical client code.
//!
//! Operations:
//! - `write`: each worker re-registers its own instance under its own lease: one durable
//!   write per call.
//! - `heartbeat`: each worker renews its own lease.
//! - `read`: list a service of 10 instances.
//! - `watch`: `--writers` workers register instances stamped with the wall-clock time; one
//!   watcher measures the delay from the write being sent to its event arriving.
//! - `expiry`: grant leases of `--ttl-ms`, register under them, stop renewing, and measure when
//!   the removal event arrives, as a multiple of the TTL.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures_util::StreamExt;
use keel::loadgen::{self, LoadArgs, LoadReport};
use keel_registry::proto::{EventKind, Instance};
use keel_registry::{EtcdBackend, NamingBackend, RegistryHandle};
use keel_rpc::{Channel, ChannelConfig};

/// Arguments of `keel bench registry`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RegistryBenchArgs {
    /// Which engine: keel or etcd.
    #[arg(long, default_value = "keel")]
    backend: String,
    /// Its address: host:port for keel, http://host:port for etcd.
    #[arg(long, default_value = "127.0.0.1:7000")]
    endpoint: String,
    /// write, heartbeat, read, watch or expiry.
    #[arg(long, default_value = "write")]
    op: String,
    #[command(flatten)]
    load: LoadArgs,
    /// Writers for the watch operation.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Lease TTL for the expiry operation.
    #[arg(long, default_value_t = 2000)]
    ttl_ms: u64,
    /// Leases timed by the expiry operation.
    #[arg(long, default_value_t = 5)]
    leases: usize,
}

const NS: &str = "bench";

fn instance(service: &str, id: &str, lease: u64) -> Instance {
    Instance {
        namespace: NS.into(),
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1:9".into(),
        lease_id: lease,
        ..Instance::default()
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs the benchmark and returns its JSON line.
pub(crate) async fn run(args: &RegistryBenchArgs) -> anyhow::Result<serde_json::Value> {
    let connections = args.load.connections.max(1);
    match args.backend.as_str() {
        "keel" => {
            let mut backends = Vec::new();
            for _ in 0..connections {
                let channel = Channel::connect(args.endpoint.clone(), ChannelConfig::default())
                    .await
                    .with_context(|| format!("connecting to the registry at {}", args.endpoint))?;
                backends.push(RegistryHandle::new(channel));
            }
            run_on(args, backends).await
        }
        "etcd" => {
            let mut backends = Vec::new();
            for _ in 0..connections {
                backends.push(
                    EtcdBackend::connect(std::slice::from_ref(&args.endpoint), "/keel-bench")
                        .await
                        .with_context(|| format!("connecting to etcd at {}", args.endpoint))?,
                );
            }
            run_on(args, backends).await
        }
        other => anyhow::bail!("unknown backend {other:?}: use keel or etcd"),
    }
}

async fn run_on<B: NamingBackend + Clone>(
    args: &RegistryBenchArgs,
    backends: Vec<B>,
) -> anyhow::Result<serde_json::Value> {
    let load = &args.load;
    let warmup = Duration::from_secs_f64(load.warmup);
    let seconds = Duration::from_secs_f64(load.seconds);
    let backends = Arc::new(backends);
    let pick =
        move |backends: &Arc<Vec<B>>, worker: usize| backends[worker % backends.len()].clone();
    let mut json = match args.op.as_str() {
        "write" | "heartbeat" => {
            let mut leases = Vec::with_capacity(load.concurrency);
            for w in 0..load.concurrency {
                let lease = pick(&backends, w)
                    .grant_lease(Duration::from_secs(3600))
                    .await
                    .map_err(|e| anyhow::anyhow!("granting a lease: {e}"))?;
                leases.push(lease);
            }
            let leases = Arc::new(leases);
            let heartbeat = args.op == "heartbeat";
            let b = backends.clone();
            let report = loadgen::closed_loop(load.concurrency, warmup, seconds, |w| {
                let backend = pick(&b, w);
                let lease = leases[w];
                move || {
                    let backend = backend.clone();
                    async move {
                        if heartbeat {
                            backend.keep_alive(lease).await.map_err(|e| e.to_string())
                        } else {
                            let i = instance("bench-write", &format!("w{w}"), lease);
                            backend
                                .register(&i)
                                .await
                                .map(drop)
                                .map_err(|e| e.to_string())
                        }
                    }
                }
            })
            .await;
            report_json(&report)
        }
        "read" => {
            let b0 = pick(&backends, 0);
            let lease = b0
                .grant_lease(Duration::from_secs(3600))
                .await
                .map_err(|e| anyhow::anyhow!("granting a lease: {e}"))?;
            for i in 0..10 {
                b0.register(&instance("bench-read", &format!("i{i}"), lease))
                    .await
                    .map_err(|e| anyhow::anyhow!("registering: {e}"))?;
            }
            let b = backends.clone();
            let report = loadgen::closed_loop(load.concurrency, warmup, seconds, |w| {
                let backend = pick(&b, w);
                move || {
                    let backend = backend.clone();
                    async move {
                        let list = backend
                            .list(NS, "bench-read")
                            .await
                            .map_err(|e| e.to_string())?;
                        if list.instances.len() != 10 {
                            return Err(format!("listed {} of 10 instances", list.instances.len()));
                        }
                        Ok(())
                    }
                }
            })
            .await;
            report_json(&report)
        }
        "watch" => watch_delay(args, &backends).await?,
        "expiry" => expiry(args, &pick(&backends, 0)).await?,
        other => anyhow::bail!("unknown op {other:?}: use write, heartbeat, read, watch or expiry"),
    };
    json["backend"] = args.backend.clone().into();
    json["op"] = args.op.clone().into();
    json["concurrency"] = load.concurrency.into();
    Ok(json)
}

fn report_json(report: &LoadReport) -> serde_json::Value {
    report.to_json()
}

async fn watch_delay<B: NamingBackend + Clone>(
    args: &RegistryBenchArgs,
    backends: &Arc<Vec<B>>,
) -> anyhow::Result<serde_json::Value> {
    let watcher = backends[0].clone();
    let mut stream = watcher
        .watch(NS, "bench-watch", 0)
        .await
        .map_err(|e| anyhow::anyhow!("opening the watch: {e}"))?;
    // The reset first.
    stream.next().await;
    let mut leases = Vec::new();
    for w in 0..args.writers.max(1) {
        leases.push(
            backends[w % backends.len()]
                .grant_lease(Duration::from_secs(3600))
                .await
                .map_err(|e| anyhow::anyhow!("granting a lease: {e}"))?,
        );
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.load.warmup + args.load.seconds);
    let measure_from = now_micros() + (args.load.warmup * 1e6) as u64;
    let mut writers = tokio::task::JoinSet::new();
    for (w, lease) in leases.into_iter().enumerate() {
        let backend = backends[w % backends.len()].clone();
        writers.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let mut i = instance("bench-watch", &format!("w{w}"), lease);
                i.metadata
                    .insert("sent_us".into(), now_micros().to_string());
                if backend.register(&i).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                n += 1;
            }
            n
        });
    }
    let mut hist = loadgen::new_histogram();
    let mut events = 0u64;
    while let Ok(Some(Ok(event))) = tokio::time::timeout_at(end.into(), stream.next()).await {
        if event.kind != EventKind::Put as i32 {
            continue;
        }
        let sent = event
            .instance
            .as_ref()
            .and_then(|i| i.metadata.get("sent_us"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(sent) = sent
            && sent >= measure_from
        {
            hist.saturating_record(now_micros().saturating_sub(sent).max(1));
            events += 1;
        }
    }
    let mut writes = 0;
    while let Some(n) = writers.join_next().await {
        writes += n.unwrap_or(0);
    }
    Ok(serde_json::json!({
        "writers": args.writers, "events": events, "writes": writes,
        "watch_p50_ms": hist.value_at_quantile(0.5) as f64 / 1e3,
        "watch_p99_ms": hist.value_at_quantile(0.99) as f64 / 1e3,
        "watch_max_ms": hist.max() as f64 / 1e3,
    }))
}

async fn expiry<B: NamingBackend + Clone>(
    args: &RegistryBenchArgs,
    backend: &B,
) -> anyhow::Result<serde_json::Value> {
    let ttl = Duration::from_millis(args.ttl_ms);
    // One service per lease: several leases of one service lapsing together would be held
    // back by Keel's protection against empty pushes, which is not what this measures.
    let mut timings = tokio::task::JoinSet::new();
    for n in 0..args.leases.max(1) {
        let backend = backend.clone();
        timings.spawn(async move {
            let service = format!("bench-expiry-{n}");
            let mut stream = backend
                .watch(NS, &service, 0)
                .await
                .map_err(|e| e.to_string())?;
            stream.next().await;
            let lease = backend.grant_lease(ttl).await.map_err(|e| e.to_string())?;
            let at = Instant::now();
            backend
                .register(&instance(&service, "e", lease))
                .await
                .map_err(|e| e.to_string())?;
            let deadline = at + ttl * 4 + Duration::from_secs(5);
            while let Ok(Some(Ok(event))) =
                tokio::time::timeout_at(deadline.into(), stream.next()).await
            {
                if event.kind == EventKind::Delete as i32 {
                    return Ok(at.elapsed().as_secs_f64() / ttl.as_secs_f64());
                }
            }
            Err(format!("lease of {service} did not expire within 4 TTLs"))
        });
    }
    let mut ratios = Vec::new();
    while let Some(joined) = timings.join_next().await {
        let ratio = joined
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ratios.push(ratio);
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let max = ratios.iter().cloned().fold(0.0, f64::max);
    Ok(serde_json::json!({
        "ttl_ms": args.ttl_ms, "leases": ratios.len(),
        "expiry_ratio_mean": (mean * 1000.0).round() / 1000.0,
        "expiry_ratio_max": (max * 1000.0).round() / 1000.0,
    }))
}
