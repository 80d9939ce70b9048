//! `keel bench failover`: steady load on a service of several instances through a
//! `ServiceChannel`, one instance killed with SIGKILL midway; counts failed calls and measures
//! how long calls kept being sent to the dead instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_echo::{EchoClient, EchoRequest};
use keel_governance::{Instance, ServiceChannel, ServiceChannelConfig, StaticDiscover};
use keel_rpc::CallOptions;
use parking_lot::Mutex;

/// Arguments of `keel bench failover`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct FailoverBenchArgs {
    /// The instances' addresses, comma-separated.
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<String>,
    /// Process id of the instance to kill (a process the calling script started).
    #[arg(long)]
    kill_pid: u32,
    /// Address of that instance.
    #[arg(long)]
    kill_addr: String,
    /// Seconds of load before the kill.
    #[arg(long, default_value_t = 2.0)]
    kill_after: f64,
    /// Seconds of load in all.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Balancer.
    #[arg(long, default_value = "p2c")]
    balancer: String,
}

pub(crate) async fn run(args: &FailoverBenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.addrs.len() >= 2, "give at least two --addrs");
    let discover = StaticDiscover::new();
    discover.set(
        "echo",
        args.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Instance::new(format!("i{i}"), a.clone()))
            .collect(),
    );
    let channel = ServiceChannel::new(
        &discover,
        "echo",
        ServiceChannelConfig {
            balancer: args.balancer.parse()?,
            ..ServiceChannelConfig::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Wait until every instance is connected.
    for _ in 0..500 {
        let ready = channel
            .endpoints()
            .iter()
            .filter(|e| e.channel.state() == keel_rpc::client::ConnectivityState::Ready)
            .count();
        if ready == args.addrs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = EchoClient::new(channel.clone());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let calls = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, calls, failed, first_error) = (
            client.clone(),
            calls.clone(),
            failed.clone(),
            first_error.clone(),
        );
        workers.spawn(async move {
            let request = EchoRequest {
                message: "failover".into(),
                payload: vec![0x5a; 64].into(),
            };
            while Instant::now() < end {
                let options = CallOptions::default().timeout(Duration::from_secs(2));
                let result = client.echo_with(&request, options).await;
                calls.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().get_or_insert(e.to_string());
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(args.kill_after)).await;
    let dead = channel
        .endpoints()
        .iter()
        .find(|e| e.instance.address == args.kill_addr)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no instance at {}", args.kill_addr))?;
    let status = std::process::Command::new("kill")
        .args(["-9", &args.kill_pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {} failed", args.kill_pid);
    let killed_at = Instant::now();
    let mut last_attempts = dead.stats.attempts();
    let mut last_change = killed_at;
    while Instant::now() < end {
        let now = dead.stats.attempts();
        if now != last_attempts {
            last_attempts = now;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while workers.join_next().await.is_some() {}
    let stats = channel.stats();
    let first_error = first_error.lock().clone();
    Ok(serde_json::json!({
        "calls": calls.load(Ordering::Relaxed),
        "failed_calls": failed.load(Ordering::Relaxed),
        "retries": stats.retry.retries.load(Ordering::Relaxed),
        "ms_until_unrouted": (last_change.duration_since(killed_at).as_secs_f64() * 1e3 * 1000.0).round() / 1000.0,
        "first_error": first_error,
        "instances": args.addrs.len(),
        "concurrency": args.concurrency,
    }))
}
