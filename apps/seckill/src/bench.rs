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
pub struct SeckillBenchArgs {
    /// The gateway (`keel up` prints it): HOST:PORT. A name that resolves to several
    /// addresses (DNS load balancing over several gateways) spreads the buyers over them, and
    /// a buyer whose gateway stops answering moves to the next.
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

/// The gateways' addresses, as the name given resolves.
struct Gateways(Vec<std::net::SocketAddr>);

impl Gateways {
    async fn resolve(gateway: &str) -> anyhow::Result<Gateways> {
        use anyhow::Context as _;
        let mut addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(gateway)
            .await
            .with_context(|| format!("resolving the gateway {gateway:?}"))?
            .collect();
        addrs.sort();
        addrs.dedup();
        anyhow::ensure!(
            !addrs.is_empty(),
            "the gateway {gateway:?} resolves to no address"
        );
        Ok(Gateways(addrs))
    }

    /// [`call`] through the gateways, starting with the `n`-th (so buyers spread over them)
    /// and moving on while one cannot be connected to.
    async fn call(
        &self,
        client: &HttpClient,
        n: u64,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let count = self.0.len();
        let mut last = None;
        for k in 0..count {
            let addr = self.0[(n as usize + k) % count].to_string();
            let answer = tokio::time::timeout(
                GATEWAY_PATIENCE,
                call(client, &addr, method, path, headers, body.clone()),
            )
            .await;
            match answer {
                // A gateway cut off: the next one (the request, if it got there, is in doubt;
                // sent again with its request id it gets the decision made).
                Err(_) if k + 1 < count => {
                    last = Some(anyhow::anyhow!(
                        "{addr} did not answer in {GATEWAY_PATIENCE:?}"
                    ));
                }
                Err(_) => anyhow::bail!("{addr} did not answer in {GATEWAY_PATIENCE:?}"),
                Ok(Err(e)) if is_connect_error(&e) => last = Some(e),
                Ok(other) => return other,
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no gateway address")))
    }
}

/// How long a request waits for a gateway's answer before the next gateway is tried (with
/// several), or it counts as unanswered.
const GATEWAY_PATIENCE: Duration = Duration::from_secs(5);

/// Whether `e` is a failure to connect (nothing was sent).
fn is_connect_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(hyper_util::client::legacy::Error::is_connect)
}

#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    bought: AtomicU64,
    sold_out: AtomicU64,
    limited: AtomicU64,
    rate_limited: AtomicU64,
    errors: AtomicU64,
    /// Attempts sent again with their request id after a server error (the part that had
    /// the attempt may have died after deciding it).
    resent: AtomicU64,
    /// Open loop: arrivals not started because too many buyers were still waiting.
    dropped: AtomicU64,
}

/// What every buyer shares.
struct Sale {
    client: HttpClient,
    gateways: Gateways,
    /// Per shard, when its buys were answered with a unit (ms since the start).
    sold_at: Mutex<std::collections::BTreeMap<String, Vec<u64>>>,
    started: Instant,
    item: String,
    tally: Tally,
    orders: Mutex<Vec<(String, String)>>,
    latencies: Mutex<hdrhistogram::Histogram<u64>>,
}

/// Open loop: buyers waiting at once, beyond which arrivals are dropped (and counted).
const MAX_OPEN_BUYERS: usize = 20_000;

/// How long a buyer keeps sending an attempt the gateway answered with a server error (an
/// API or a shard's owner died with the attempt in hand, which may have been decided), with
/// the same request id, as the API's contract asks of a client: the same id gets the
/// decision that was made, from whichever API and shard owner answers by then.
const IN_DOUBT_FOR: Duration = Duration::from_secs(15);

/// Buyer `n`: two attempts with different request ids (at most one may get a unit). The
/// first attempt's latency counts from `since` (its scheduled start in the open loop), and an
/// attempt's latency includes its resends.
async fn buyer(sale: &Sale, n: u64, since: Instant) {
    // Named after the item too, so runs against one system never share a user.
    let user = format!("{}-buyer-{n}", sale.item);
    for attempt in 0..2 {
        let t = if attempt == 0 { since } else { Instant::now() };
        let give_up = Instant::now() + IN_DOUBT_FOR;
        let mut wait = Duration::from_millis(50);
        let answer = loop {
            let answer = sale
                .gateways
                .call(
                    &sale.client,
                    n,
                    "POST",
                    &format!("/api/items/{}/buy", sale.item),
                    &[("x-user-id", user.as_str())],
                    Some(json!({"user_id": user, "request_id": format!("r{attempt}")})),
                )
                .await;
            // In doubt: a server error, or (with other gateways to move to) no answer from a
            // gateway that had the request. With one gateway that is gone, nothing will
            // decide it later.
            let in_doubt = match &answer {
                Ok((status, _)) => *status >= 500,
                Err(_) => sale.gateways.0.len() > 1,
            };
            if !in_doubt || Instant::now() + wait >= give_up {
                break answer;
            }
            sale.tally.resent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        };
        sale.latencies
            .lock()
            .saturating_record(t.elapsed().as_micros() as u64);
        let tally = &sale.tally;
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok((200, body)) => {
                tally.bought.fetch_add(1, Ordering::Relaxed);
                let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                // An order id is `<shard>-<reservation id>`.
                if let Some((shard, _)) = order.rsplit_once('-') {
                    let at = sale.started.elapsed().as_millis() as u64;
                    sale.sold_at
                        .lock()
                        .entry(shard.to_owned())
                        .or_default()
                        .push(at);
                }
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
    let config = crate::up::UpConfig::load(&args.config).with_context(|| {
        "no admin token: give --token, set KEEL_ADMIN_TOKEN, or run from keel up's directory"
            .to_owned()
    })?;
    Ok(config.admin_token)
}

/// Runs the sale `args` describes and checks it; the report (as `keel bench seckill` prints
/// it as its last line), or an error when the sale could not be run at all.
pub async fn run(args: &SeckillBenchArgs) -> anyhow::Result<Value> {
    let mut connector = HttpConnector::new();
    // A gateway that is cut off (not refusing, just silent) is left for the next one soon.
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let gateways = Gateways::resolve(&args.gateway).await?;
    let bearer = format!("Bearer {}", admin_token(args)?);
    let admin = [("authorization", bearer.as_str())];
    let (status, created) = gateways
        .call(
        &client,
        0,
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
        gateways,
        sold_at: Mutex::new(std::collections::BTreeMap::new()),
        started: Instant::now(),
        item: item.clone(),
        tally: Tally::default(),
        orders: Mutex::new(Vec::new()),
        latencies: Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?),
    });
    let next = Arc::new(AtomicU64::new(0));
    let started = sale.started;
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
        let (status, body) = sale
            .gateways
            .call(
                &client,
                0,
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
            let (status, body) = sale
                .gateways
                .call(
                    &client,
                    0,
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
    // Per shard, the longest time without a unit sold between its first and last sale: how
    // long a fault kept its buyers waiting (a shard sold out ends its sales, so what comes
    // after its last sale is not counted).
    let gaps: serde_json::Map<String, Value> = sale
        .sold_at
        .lock()
        .iter()
        .map(|(shard, times)| {
            let mut times = times.clone();
            times.sort_unstable();
            let (longest, from) = times
                .windows(2)
                .map(|w| (w[1] - w[0], w[0]))
                .max()
                .unwrap_or((0, 0));
            (
                shard.clone(),
                json!({ "longest_gap_ms": longest, "gap_from_ms": from, "sold": times.len() }),
            )
        })
        .collect();
    let summary = json!({
        "buyers": args.buyers,
        "gateways": sale.gateways.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "started_unix_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .saturating_sub(sale.started.elapsed().as_millis() as u64),
        "shards": gaps,
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
        "resent": tally.resent.load(Ordering::Relaxed),
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
