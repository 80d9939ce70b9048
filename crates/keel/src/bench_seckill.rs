//! `keel bench seckill`: a flash sale against a running system (`keel up`): an item is
//! created, N buyers go for it through the gateway — a closed loop with a bounded
//! concurrency, or an open loop of arrivals at a fixed rate — each trying twice (the second
//! attempt must not get a second unit), and then the invariants are checked through the API:
//! no more units sold than the stock, no user over the limit, every success an order, and the
//! audit balanced once the orders have caught up.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Arguments of `keel bench seckill`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SeckillBenchArgs {
    /// The gateway (`keel up` prints it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway: String,
    /// The admin token. Without it, KEEL_ADMIN_TOKEN, else the `admin_token` of the
    /// `keel up` configuration (`--config`).
    #[arg(long, env = "KEEL_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The `keel up` configuration the admin token is read from when none is given.
    #[arg(long, default_value = "keel.toml")]
    config: std::path::PathBuf,
    /// Buyers (each a different user).
    #[arg(long, default_value_t = 10_000)]
    buyers: u64,
    /// Units for sale.
    #[arg(long, default_value_t = 100)]
    stock: u64,
    /// Requests in flight (closed loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Buyers arriving per second (open loop: each starts on schedule whether or not the
    /// others are answered, and its latency counts from its scheduled start); 0 runs the
    /// closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Chaos: `keel up`'s `<data_dir>/pids.json`; when a third of the buyers are through,
    /// an inventory shard, an orders instance or the API (whichever the clock picks) is SIGKILLed, and
    /// `keel up` restarts it. The invariants must hold all the same.
    #[arg(long)]
    chaos: Option<std::path::PathBuf>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn call(
    client: &HttpClient,
    gateway: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = client
        .request(req.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    bought: AtomicU64,
    sold_out: AtomicU64,
    limited: AtomicU64,
    rate_limited: AtomicU64,
    errors: AtomicU64,
    /// Open loop: arrivals not started because too many buyers were still waiting.
    dropped: AtomicU64,
}

/// What every buyer shares.
struct Sale {
    client: HttpClient,
    gateway: String,
    item: String,
    tally: Tally,
    orders: Mutex<Vec<(String, String)>>,
    latencies: Mutex<hdrhistogram::Histogram<u64>>,
}

/// Open loop: buyers waiting at once, beyond which arrivals are dropped (and counted).
const MAX_OPEN_BUYERS: usize = 20_000;

/// Buyer `n`: two attempts with different request ids (at most one may get a unit). The
/// first attempt's latency counts from `since` (its scheduled start in the open loop).
async fn buyer(sale: &Sale, n: u64, since: Instant) {
    // Named after the item too, so runs against one system never share a user.
    let user = format!("{}-buyer-{n}", sale.item);
    for attempt in 0..2 {
        let t = if attempt == 0 { since } else { Instant::now() };
        let answer = call(
            &sale.client,
            &sale.gateway,
            "POST",
            &format!("/api/items/{}/buy", sale.item),
            &[("x-user-id", user.as_str())],
            Some(json!({"user_id": user, "request_id": format!("r{attempt}")})),
        )
        .await;
        sale.latencies
            .lock()
            .saturating_record(t.elapsed().as_micros() as u64);
        let tally = &sale.tally;
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok((200, body)) => {
                tally.bought.fetch_add(1, Ordering::Relaxed);
                let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                sale.orders.lock().push((order, user.clone()));
            }
            Ok((409, body)) if body["error"] == "sold_out" => {
                tally.sold_out.fetch_add(1, Ordering::Relaxed);
            }
            Ok((409, _)) => {
                tally.limited.fetch_add(1, Ordering::Relaxed);
            }
            Ok((429, _)) => {
                tally.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes a line to stderr, never panicking (a closed stderr drops it).
fn note(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The admin token: given, or the `keel up` configuration's.
fn admin_token(args: &SeckillBenchArgs) -> anyhow::Result<String> {
    use anyhow::Context as _;
    if let Some(token) = args.token.clone().filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    let config = keel::up::UpConfig::load(&args.config).with_context(|| {
        "no admin token: give --token, set KEEL_ADMIN_TOKEN, or run from keel up's directory"
            .to_owned()
    })?;
    Ok(config.admin_token)
}

pub(crate) async fn run(args: &SeckillBenchArgs) -> anyhow::Result<Value> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let gw = args.gateway.as_str();
    let bearer = format!("Bearer {}", admin_token(args)?);
    let admin = [("authorization", bearer.as_str())];
    let (status, created) = call(
        &client,
        gw,
        "POST",
        "/api/admin/items",
        &admin,
        Some(json!({"name": "bench item", "price_cents": 100, "stock": args.stock, "per_user_limit": 1})),
    )
    .await?;
    anyhow::ensure!(status == 201, "creating the item: {status} {created}");
    let item = created["item_id"].as_str().unwrap_or_default().to_owned();

    anyhow::ensure!(
        args.rate == 0.0 || (args.rate >= 0.01 && args.rate <= 10_000_000.0),
        "--rate must be 0 (closed loop) or 0.01 to 10,000,000 buyers per second"
    );
    let sale = Arc::new(Sale {
        client: client.clone(),
        gateway: args.gateway.clone(),
        item: item.clone(),
        tally: Tally::default(),
        orders: Mutex::new(Vec::new()),
        latencies: Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?),
    });
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let (sale, total) = (sale.clone(), args.buyers);
        tokio::spawn(async move {
            let tally = &sale.tally;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = tally.attempts.load(Ordering::Relaxed) / 2;
                let width = 30;
                let filled = (done * width / total.max(1)) as usize;
                note(format_args!(
                    "[{}{}] {done}/{total} buyers, {} bought, {} sold out, {} rate-limited, {} errors",
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled.min(width as usize)),
                    tally.bought.load(Ordering::Relaxed),
                    tally.sold_out.load(Ordering::Relaxed),
                    tally.rate_limited.load(Ordering::Relaxed),
                    tally.errors.load(Ordering::Relaxed),
                ));
            }
        })
    };
    let chaos = args.chaos.clone().map(|file| {
        let (next, total) = (next.clone(), args.buyers);
        tokio::spawn(async move {
            while next.load(Ordering::Relaxed) < total / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let pids: std::collections::BTreeMap<String, u32> = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            // An inventory shard, an orders instance or the API, whichever the clock picks.
            let candidates: Vec<(&String, &u32)> = pids
                .iter()
                .filter(|(name, _)| {
                    name.starts_with("inventory")
                        || name.starts_with("orders")
                        || name.starts_with("api")
                })
                .collect();
            let (victim, pid) = candidates
                .get(clock as usize % candidates.len().max(1))
                .map_or((String::new(), 0), |(n, p)| ((*n).clone(), **p));
            let killed = pid > 0
                && std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
            json!({ "victim": victim, "pid": pid, "killed": killed })
        })
    });
    if args.rate > 0.0 {
        // Open loop: buyer n starts at n / rate seconds, answered or not.
        let waiting = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_BUYERS));
        let mut buyers = tokio::task::JoinSet::new();
        for n in 0..args.buyers {
            let due = started + Duration::from_secs_f64(n as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
            next.store(n + 1, Ordering::Relaxed);
            let Ok(permit) = waiting.clone().try_acquire_owned() else {
                sale.tally.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let sale = sale.clone();
            buyers.spawn(async move {
                buyer(&sale, n, due).await;
                drop(permit);
            });
            // Reap the finished ones as we go.
            while buyers.try_join_next().is_some() {}
        }
        while buyers.join_next().await.is_some() {}
    } else {
        let mut workers = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (sale, next, total) = (sale.clone(), next.clone(), args.buyers);
            workers.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return;
                    }
                    buyer(&sale, n, Instant::now()).await;
                }
            }));
        }
        for w in workers {
            w.await?;
        }
    }
    let elapsed = started.elapsed();
    progress.abort();
    let chaos = match chaos {
        Some(task) => task.await?,
        None => Value::Null,
    };

    // Invariants, through the API.
    let orders = sale.orders.lock().clone();
    let tally = &sale.tally;
    let mut breaches: Vec<String> = Vec::new();
    let bought = orders.len() as u64;
    if bought > args.stock {
        breaches.push(format!("oversold: {bought} units sold of {}", args.stock));
    }
    let users: HashSet<&String> = orders.iter().map(|(_, u)| u).collect();
    if users.len() != orders.len() {
        breaches.push("a user got more than the limit of 1".into());
    }
    // A part may still be restarting (chaos): a failure or a 5xx is asked again, for up to
    // 30 s in all. First the audit, until the orders have taken in every reservation.
    let patience = Instant::now() + Duration::from_secs(30);
    let mut audit = Value::Null;
    // What could not be checked because the system did not answer: never a breach.
    let mut unchecked: Vec<String> = Vec::new();
    loop {
        let (status, body) = call(
            &client,
            gw,
            "GET",
            &format!("/api/admin/items/{item}/audit"),
            &admin,
            None,
        )
        .await
        .unwrap_or((0, Value::Null));
        if status == 200 {
            audit = body;
            if audit["queue_backlog"] == 0 {
                break;
            }
        }
        if Instant::now() > patience {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then every successful buy must be an order the orders services hold for its buyer (the
    // user's order list comes from them alone, not from the inventory's reservations).
    let mut lost = 0u64;
    let mut lost_example = Value::Null;
    let mut unverified = 0u64;
    for (order, user) in &orders {
        loop {
            let (status, body) = call(
                &client,
                gw,
                "GET",
                &format!("/api/users/{user}/orders"),
                &[],
                None,
            )
            .await
            .unwrap_or((0, Value::Null));
            if status == 0 || status >= 500 {
                if Instant::now() < patience {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                // No answer: whether the order exists is unknown, not known to be missing.
                unverified += 1;
                break;
            }
            let held = body.as_array().is_some_and(|list| {
                list.iter()
                    .any(|o| o["order_id"] == order.as_str() && o["user_id"] == user.as_str())
            });
            if status != 200 || !held {
                lost += 1;
                lost_example =
                    json!({ "order": order, "user": user, "status": status, "orders": body });
            }
            break;
        }
    }
    if lost > 0 {
        breaches.push(format!(
            "{lost} successful buys have no order, e.g. {lost_example}"
        ));
    }
    if unverified > 0 {
        unchecked.push(format!(
            "{unverified} successful buys could not be looked up: the system did not answer"
        ));
    }
    let audited = audit.is_object();
    if !audited {
        unchecked.push("the audit could not be read: the system did not answer".into());
    }
    let count = |s: &str| audit["orders_by_status"][s].as_u64().unwrap_or(0);
    let balance = audit["stock_left"]
        .as_u64()
        .unwrap_or(u64::MAX)
        .saturating_add(count("pending_payment") + count("paid") + count("shipped"));
    if audited && balance != args.stock {
        breaches.push(format!("the audit does not balance: {audit}"));
    }
    // Every acknowledged buy is an order; beyond those, only attempts that got no answer (a
    // part killed mid-request: the unit may have been reserved, and the buyer's retry with the
    // same request id would get it) may have become orders.
    let made = count("pending_payment") + count("paid") + count("shipped") + count("expired");
    let unanswered = tally.errors.load(Ordering::Relaxed);
    if audited && (made < bought || made > bought + unanswered) {
        breaches.push(format!(
            "{bought} units bought ({unanswered} attempts unanswered) but the orders say {audit}"
        ));
    }
    let lat = sale.latencies.lock();
    let ms = |q: f64| lat.value_at_quantile(q) as f64 / 1000.0;
    let attempts = tally.attempts.load(Ordering::Relaxed);
    let rate_limited = tally.rate_limited.load(Ordering::Relaxed);
    let mut warnings: Vec<String> = Vec::new();
    if rate_limited * 2 > attempts {
        warnings.push(format!(
            "{rate_limited} of {attempts} attempts were refused by the gateway's rate limits: this run measured the limiter, not the sale (set the [limits] of keel.toml to 0 for a benchmark)"
        ));
    }
    for w in &warnings {
        note(format_args!("warning: {w}"));
    }
    let verdict = if !breaches.is_empty() {
        "broken"
    } else if !unchecked.is_empty() {
        "unchecked"
    } else {
        "ok"
    };
    let summary = json!({
        "buyers": args.buyers,
        "stock": args.stock,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "dropped": tally.dropped.load(Ordering::Relaxed),
        "attempts": attempts,
        "attempts_per_s": (attempts as f64 / elapsed.as_secs_f64()).round(),
        "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "bought": bought,
        "buys_per_s": (bought as f64 / elapsed.as_secs_f64()).round(),
        "sold_out": tally.sold_out.load(Ordering::Relaxed),
        "limit_reached": tally.limited.load(Ordering::Relaxed),
        "rate_limited": rate_limited,
        "errors": tally.errors.load(Ordering::Relaxed),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "oversold": bought.saturating_sub(args.stock),
        "lost_acks": lost,
        "audit": audit,
        "chaos": chaos,
        "breaches": breaches,
        "unchecked": unchecked,
        "warnings": warnings,
        "verdict": verdict,
        "ok": verdict == "ok",
    });
    Ok(summary)
}
