//! The sale's HTTP API (the contract in docs/seckill.md, served behind the gateway) and the catalog
//! of items it keeps.
//!
//! JSON bodies; errors are `{"error": CODE, "detail": ...}`. The catalog (name, price, stock,
//! start time, per-user limit) is journaled here; stock is held by the inventory, orders by
//! the orders service, both reached over Keel RPC.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use keel_cache::TwoLevel;
use keel_rpc::Code;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::orders_service::now_ms;
use crate::peers::Transport;
use crate::proto;

pub use crate::catalog::{Catalog, CatalogError, ItemDef, Transfer};

/// One shard of the sale: an inventory instance with its share of every item's stock, and
/// the orders instance that turns its reservations into orders. The shard's name prefixes
/// the ids of its orders (`<shard>-<reservation id>`).
#[derive(Debug, Clone)]
pub struct Shard {
    /// Its name.
    pub name: String,
    /// Its inventory.
    pub inventory: proto::InventoryClient<Transport>,
    /// Its orders service.
    pub orders: proto::OrdersClient<Transport>,
}

/// What the API needs.
#[derive(Debug)]
pub struct Api {
    /// The items.
    pub catalog: Catalog,
    /// The shards new items are spread over (at least one).
    pub shards: Vec<Shard>,
    /// Token the admin endpoints need (`Authorization: Bearer <token>`).
    pub admin_token: String,
    /// Buckets each item's stock is split into (over all its shards).
    pub buckets: u32,
    /// (item, shard) pairs found sold out, and until when that answer is reused without
    /// asking the inventory (units can come back when orders expire, so not for long).
    pub sold_out: Mutex<std::collections::HashMap<(String, String), tokio::time::Instant>>,
    /// Held while an item is created, so two creations never pick the same id.
    pub creating: tokio::sync::Mutex<()>,
    /// Units left per item: the catalog's two-level cache (in-process, plus Redis when
    /// configured), invalidated by every purchase and sell-out seen here. Units that come
    /// back from expired orders show within the cache's time to live.
    pub stock_cache: TwoLevel<u64>,
    /// Where opening times are published for the gateway's gate (none: not published).
    pub registry: Option<keel_registry::Naming>,
    /// One transfer between shards at a time per item.
    pub rebalancing: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per (item, shard) found sold out: the (user, request id) of every reservation there,
    /// so that while the shard stays sold out a request that holds none is answered here.
    pub holders: Mutex<std::collections::HashMap<(String, String), Holders>>,
    /// Buys by outcome and reservation latency, for `/metrics` and `/status`.
    pub metrics: crate::metrics::SaleMetrics,
    /// How long a buy whose answer was lost (the shard unreachable, its owner dead or being
    /// replaced) is sent again, with the same request id, before the buyer is told to retry.
    pub in_doubt_for: Duration,
}

/// The requests that hold (or held) a unit of an item in a shard.
#[derive(Debug, Default)]
pub struct Holders {
    /// The shard's full list has arrived (and successes since are added): only then may a
    /// request missing from it be answered sold out here.
    complete: bool,
    requests: std::collections::HashSet<(String, String)>,
}

/// How long an in-doubt buy is sent again by default: a standby's election (3 s lease) and
/// replay, with room to spare.
pub const DEFAULT_IN_DOUBT_FOR: Duration = Duration::from_secs(10);

/// Shards with more reservations of an item than this are not listed; their sold-out
/// requests go on to the inventory.
const MAX_HOLDERS: u32 = 200_000;

/// How long one call of a transfer may take before the transfer is left to the background.
const TRANSFER_CALL_TIMEOUT: Duration = Duration::from_secs(2);

impl Api {
    /// An API over `catalog` and `shards` (at least one), caching stock in `stock_cache`.
    pub fn new(
        catalog: Catalog,
        shards: Vec<Shard>,
        admin_token: String,
        buckets: u32,
        stock_cache: TwoLevel<u64>,
    ) -> Api {
        Api {
            catalog,
            shards,
            admin_token,
            buckets,
            sold_out: Mutex::new(std::collections::HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            stock_cache,
            registry: None,
            rebalancing: Mutex::new(std::collections::HashMap::new()),
            holders: Mutex::new(std::collections::HashMap::new()),
            metrics: crate::metrics::SaleMetrics::default(),
            in_doubt_for: DEFAULT_IN_DOUBT_FOR,
        }
    }

    /// Whether `request` may be answered sold out here: the shard was found sold out a
    /// moment ago and, for a request with an id, the request holds no unit there.
    fn sold_out_here(&self, key: &(String, String), request: Option<(&str, &str)>) -> bool {
        let fresh = self
            .sold_out
            .lock()
            .get(key)
            .is_some_and(|until| tokio::time::Instant::now() < *until);
        fresh
            && match request {
                None => true,
                Some((user, id)) => self.holders.lock().get(key).is_some_and(|h| {
                    h.complete && !h.requests.contains(&(user.to_owned(), id.to_owned()))
                }),
            }
    }

    /// Lists the holders of `key`'s shard (once per API process), so later requests for the
    /// sold-out shard can be answered here.
    async fn learn_holders(&self, key: &(String, String), shard: &Shard) {
        {
            let mut holders = self.holders.lock();
            if holders.contains_key(key) {
                return;
            }
            // Present (incomplete) from now on, so successes while the list is on its way
            // are added to it.
            holders.insert(key.clone(), Holders::default());
        }
        let listed = shard
            .inventory
            .holders(&proto::HoldersRequest {
                item_id: key.0.clone(),
                limit: MAX_HOLDERS,
            })
            .await;
        let mut holders = self.holders.lock();
        match listed {
            Ok(reply) if reply.complete => {
                if let Some(h) = holders.get_mut(key) {
                    h.requests
                        .extend(reply.holders.into_iter().map(|h| (h.user_id, h.request_id)));
                    h.complete = true;
                }
            }
            // Too many, or the shard unreachable: left to the inventory (tried again later).
            _ => {
                holders.remove(key);
            }
        }
    }

    /// The lock that keeps an item's transfers one at a time.
    fn transfer_lock(&self, item_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.rebalancing
            .lock()
            .entry(item_id.to_owned())
            .or_default()
            .clone()
    }

    /// Moves unsold units of `item` to the shard `to`, whose share sold out, from the shard
    /// with the most left (half of them, rounded up). The transfer is journaled here before
    /// it starts and finished by [`Api::finish_transfer`] — now, or after a crash by
    /// [`Api::finish_pending_transfers`] — so units are never lost between the shards nor
    /// counted twice. True if `to` has units again.
    async fn rebalance(&self, item: &ItemDef, to: &Shard) -> bool {
        if item.shards.len() < 2 {
            return false;
        }
        let lock = self.transfer_lock(&item.item_id);
        let _one_at_a_time = lock.lock().await;
        // A rebalance that just found nothing anywhere said so here.
        if self
            .sold_out
            .lock()
            .get(&(item.item_id.clone(), to.name.clone()))
            .is_some_and(|until| tokio::time::Instant::now() < *until)
        {
            return false;
        }
        let Ok(shards) = self.shards_of(item) else {
            return false;
        };
        let request = proto::StockRequest {
            item_id: item.item_id.clone(),
        };
        let stocks =
            futures_util::future::join_all(shards.iter().map(|s| s.inventory.stock(&request)))
                .await;
        let mut donor: Option<(&Shard, u64)> = None;
        for (shard, stock) in shards.iter().zip(stocks) {
            let Ok(stock) = stock else { continue };
            if shard.name == to.name {
                if stock.left > 0 {
                    // Refilled by a transfer that finished while this one waited.
                    return true;
                }
            } else if stock.left > donor.map_or(0, |d| d.1) {
                donor = Some((shard, stock.left));
            }
        }
        let Some((donor, left)) = donor else {
            return false;
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let transfer = Transfer {
            id: format!(
                "{}-{}-{}-{}-{}",
                item.item_id,
                donor.name,
                to.name,
                now_ms(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            item_id: item.item_id.clone(),
            from: donor.name.clone(),
            to: to.name.clone(),
            units: left.div_ceil(2),
        };
        if let Err(e) = self.catalog.begin_transfer(&transfer).await {
            tracing::warn!(error = %e, "recording a transfer failed");
            return false;
        }
        match self.finish_transfer(&transfer).await {
            Ok(moved) => moved > 0,
            Err(e) => {
                tracing::warn!(transfer = %transfer.id, error = %e, "transfer not finished; retried in the background");
                false
            }
        }
    }

    /// Runs a journaled transfer to its end (both steps are idempotent in the inventories,
    /// so running it again after a crash moves nothing twice); returns the units moved.
    pub async fn finish_transfer(&self, t: &Transfer) -> Result<u64, TransferError> {
        let (Some(from), Some(to)) = (self.shard(&t.from), self.shard(&t.to)) else {
            return Err(TransferError::UnknownShard(t.id.clone()));
        };
        let out = tokio::time::timeout(
            TRANSFER_CALL_TIMEOUT,
            from.inventory.transfer_out(&proto::TransferOutRequest {
                item_id: t.item_id.clone(),
                transfer_id: t.id.clone(),
                units: t.units,
            }),
        )
        .await
        .map_err(|_| TransferError::Timeout(t.from.clone()))?
        .map_err(|e| TransferError::Call(t.from.clone(), e))?;
        if !out.found {
            return Err(TransferError::NotHeld(t.from.clone(), t.item_id.clone()));
        }
        let taken = out.units;
        if taken > 0 {
            let added = tokio::time::timeout(
                TRANSFER_CALL_TIMEOUT,
                to.inventory.transfer_in(&proto::TransferInRequest {
                    item_id: t.item_id.clone(),
                    transfer_id: t.id.clone(),
                    units: taken,
                }),
            )
            .await
            .map_err(|_| TransferError::Timeout(t.to.clone()))?
            .map_err(|e| TransferError::Call(t.to.clone(), e))?;
            if !added.found {
                // Taken and put nowhere: the transfer stays pending (and retried) rather than
                // the units being lost.
                return Err(TransferError::NotHeld(t.to.clone(), t.item_id.clone()));
            }
            self.sold_out
                .lock()
                .remove(&(t.item_id.clone(), t.to.clone()));
        }
        self.catalog.end_transfer(&t.id).await?;
        self.stock_cache.invalidate(&t.item_id).await;
        Ok(taken)
    }

    /// Finishes the transfers the catalog holds as begun (after a crash, or a failure
    /// talking to a shard); `keel-seckill api` runs it at start and every second.
    pub async fn finish_pending_transfers(&self) {
        for t in self.catalog.pending_transfers() {
            let lock = self.transfer_lock(&t.item_id);
            let _one_at_a_time = lock.lock().await;
            if let Err(e) = self.finish_transfer(&t).await {
                tracing::warn!(transfer = %t.id, error = %e, "transfer still not finished");
            }
        }
    }
}

/// Why a transfer of units between shards is not finished yet. Every step is idempotent, so
/// the transfer stays pending in the catalog and is run again later.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The transfer names a shard this API is not configured with.
    #[error("transfer {0}: a shard is not configured")]
    UnknownShard(String),
    /// A shard did not answer within the transfer's call timeout.
    #[error("{0} did not answer in time")]
    Timeout(String),
    /// A shard answered the call with an error.
    #[error("{0}: {1}")]
    Call(String, keel_rpc::Status),
    /// A shard does not hold the item.
    #[error("{0} does not hold {1}")]
    NotHeld(String, String),
    /// The catalog could not record the transfer's end.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The shard that serves `user_id` for an item held by `shards`: the same one every time
/// (highest-random-weight hashing, so it does not depend on the list's order), which makes
/// that shard's per-user count the user's whole count.
pub fn home_shard<'a>(shards: &'a [String], user_id: &str) -> Option<&'a String> {
    shards.iter().max_by_key(|shard| {
        // FNV-1a: fixed across processes and versions, unlike the standard library's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in user_id.bytes().chain([0]).chain(shard.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        // A final mix, so shard names that differ in the last byte spread well.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    })
}

/// Splits `stock` into at most `parts` non-empty shares, as even as can be.
pub fn split(stock: u64, parts: u64) -> Vec<u64> {
    let n = parts.max(1).min(stock.max(1));
    (0..n)
        .map(|i| stock / n + u64::from(i < stock % n))
        .collect()
}

/// How long a sold-out answer is reused.
const SOLD_OUT_FOR: Duration = Duration::from_millis(250);

type Answer = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Largest request body the API takes.
const MAX_BODY: usize = 64 * 1024;

/// The `error` code of an answer that failed, kept with the answer so that counters can
/// tell outcomes apart without reading its body.
#[derive(Debug, Clone)]
struct ErrorCode(String);

fn fail(status: StatusCode, code: &str, detail: impl std::fmt::Display) -> Answer {
    let mut answer = reply(
        status,
        &json!({ "error": code, "detail": detail.to_string() }),
    );
    answer.extensions_mut().insert(ErrorCode(code.to_owned()));
    answer
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A JSON value quoted in an error message, cut to 40 characters.
fn shown_json(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        None => text,
        Some((cut, _)) => format!("{}...", &text[..cut]),
    }
}

/// Counting an answer in the sale's metrics.
trait Counted {
    fn counted(self, metrics: &crate::metrics::SaleMetrics) -> Self;
}

impl Counted for Answer {
    /// Counts a buy's answer by its outcome: `ok`, or its error code.
    fn counted(self, metrics: &crate::metrics::SaleMetrics) -> Answer {
        match self.extensions().get::<ErrorCode>() {
            Some(ErrorCode(code)) => metrics.count_buy(code),
            None => metrics.count_buy("ok"),
        }
        self
    }
}

/// An RPC failure as an HTTP answer.
fn upstream(status: &keel_rpc::Status) -> Answer {
    match status.code() {
        Code::Overloaded | Code::Unavailable | Code::DeadlineExceeded => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            status.message(),
        ),
        _ => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            status.message(),
        ),
    }
}

fn order_json(o: &proto::Order) -> Value {
    json!({ "order_id": o.order_id, "item_id": o.item_id, "user_id": o.user_id, "status": o.status })
}

impl Api {
    fn shard(&self, name: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.name == name)
    }

    /// The shards holding `item`, or the answer when one of them is not known here (the API
    /// was started with fewer shards than the item was created over).
    fn shards_of(&self, item: &ItemDef) -> Result<Vec<&Shard>, Box<Answer>> {
        if item.shards.is_empty() {
            return Ok(self.shards.first().into_iter().collect());
        }
        item.shards
            .iter()
            .map(|name| {
                self.shard(name).ok_or_else(|| {
                    Box::new(fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        format!("shard {name} of {} is not configured", item.item_id),
                    ))
                })
            })
            .collect()
    }

    /// The shard that serves `user` for `item`.
    fn home(&self, item: &ItemDef, user: &str) -> Result<Shard, Box<Answer>> {
        // Items from before shards existed are all in the first one.
        let name = if item.shards.is_empty() {
            self.shards.first().map(|s| &s.name)
        } else {
            home_shard(&item.shards, user)
        };
        let unknown = || {
            Box::new(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!("no configured shard holds {}", item.item_id),
            ))
        };
        let name = name.ok_or_else(unknown)?;
        self.shard(name).cloned().ok_or_else(unknown)
    }

    /// The shard of an order and its reservation id, from the order id.
    fn order_shard(&self, order_id: &str) -> Option<(&Shard, u64)> {
        let (shard, id) = order_id.rsplit_once('-')?;
        Some((self.shard(shard)?, id.parse().ok()?))
    }

    /// The item's stock over its shards: (left, reserved, moved between shards). Units taken
    /// out of one shard by a transfer and not yet added to another (as the shards' own
    /// records say) count as left: they are still for sale.
    async fn stock(&self, item: &ItemDef) -> Result<(u64, u64, u64), Box<Answer>> {
        let shards = self.shards_of(item)?;
        let request = proto::StockRequest {
            item_id: item.item_id.clone(),
        };
        let replies =
            futures_util::future::join_all(shards.iter().map(|s| s.inventory.stock(&request)))
                .await;
        let (mut left, mut reserved, mut moved_out, mut moved_in) = (0u64, 0u64, 0u64, 0u64);
        for reply in replies {
            let reply = reply.map_err(|e| Box::new(upstream(&e)))?;
            left += reply.left;
            reserved += reply.reserved;
            moved_out += reply.moved_out;
            moved_in += reply.moved_in;
        }
        Ok((
            left + moved_out.saturating_sub(moved_in),
            reserved,
            moved_in,
        ))
    }

    /// Units of `item` left, through the catalog cache.
    async fn stock_left(&self, item: &ItemDef) -> Option<u64> {
        self.stock_cache
            .get_or_load(&item.item_id, || async {
                self.stock(item)
                    .await
                    .map(|(left, _, _)| left)
                    .map_err(|_| "stock unavailable".to_owned())
            })
            .await
            .ok()
    }

    async fn item_json(&self, item: &ItemDef) -> Value {
        let stock = self.stock_left(item).await;
        let left = stock.unwrap_or(0);
        // The status from the clock now, the stock from the cache.
        let status = if now_ms() < item.starts_at_ms {
            "upcoming"
        } else if stock == Some(0) {
            "sold_out"
        } else {
            "on_sale"
        };
        json!({
            "item_id": item.item_id,
            "name": item.name,
            "price_cents": item.price_cents,
            "stock_left": left,
            "starts_at": rfc3339(item.starts_at_ms),
            "status": status,
        })
    }

    fn is_admin<B>(&self, req: &Request<B>) -> bool {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| {
                !self.admin_token.is_empty()
                    && keel_net::constant_time_eq(t.as_bytes(), self.admin_token.as_bytes())
            })
    }

    /// Serves one request.
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Answer {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let admin = self.is_admin(&req);
        // The gateway rate-limits buyers by this header; a buy whose body names another
        // user is refused, so rotating the header does not get around the limit.
        let header_user = req
            .headers()
            .get("x-user-id")
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
        let (parts, body) = req.into_parts();
        let limits = keel_rpc::http_body::BodyLimits::new(MAX_BODY);
        let body = match keel_rpc::http_body::read(&parts.headers, body, limits).await {
            Ok(body) => body,
            Err(e) => return fail(e.status(), e.code(), e.to_string()),
        };
        let json_body = || serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string());
        let not_json = |why: String| {
            fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the body is not JSON: {why}"),
            )
        };
        match (method, segments.as_slice()) {
            (Method::GET, ["health"]) => reply(StatusCode::OK, &json!({"status": "serving"})),
            (Method::GET, ["metrics"]) => self.metrics_page().await,
            (Method::GET, ["status"]) => self.status_page(),
            (Method::POST, ["api", "admin", "items"]) => {
                if !admin {
                    return fail(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token needed",
                    );
                }
                match json_body() {
                    Ok(b) => self.create_item(&b).await,
                    Err(why) => not_json(why),
                }
            }
            (Method::GET, ["api", "items"]) => {
                let items: Vec<ItemDef> = self
                    .catalog
                    .all()
                    .into_iter()
                    .filter(|i| !self.catalog.is_hidden(&i.item_id))
                    .collect();
                let out =
                    futures_util::future::join_all(items.iter().map(|i| self.item_json(i))).await;
                reply(StatusCode::OK, &Value::from(out))
            }
            (Method::GET, ["api", "items", id]) => match self.catalog.shown(id).await {
                Some(item) => reply(StatusCode::OK, &self.item_json(&item).await),
                None => fail(StatusCode::NOT_FOUND, "not_found", format!("no item {id}")),
            },
            (Method::POST, ["api", "items", id, "buy"]) => match json_body() {
                Ok(b)
                    if header_user
                        .as_ref()
                        .is_some_and(|h| b["user_id"].as_str() != Some(h)) =>
                {
                    fail(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "X-User-Id names another user than the body's user_id",
                    )
                }
                Ok(b) => self.buy(id, &b).await,
                Err(why) => not_json(why),
            }
            .counted(&self.metrics),
            (Method::GET, ["api", "orders", id]) => self.order(id).await,
            (Method::GET, ["api", "users", user, "orders"]) => self.user_orders(user).await,
            (Method::POST, ["api", "orders", id, "pay"]) => match json_body() {
                Ok(b) => self.pay(id, &b).await,
                Err(why) => not_json(why),
            },
            (Method::POST, ["api", "admin", "orders", id, "ship"]) => {
                if !admin {
                    return fail(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token needed",
                    );
                }
                self.ship(id).await
            }
            (Method::GET, ["api", "admin", "items"]) => {
                if !admin {
                    return fail(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token needed",
                    );
                }
                self.admin_items().await
            }
            (Method::DELETE, ["api", "admin", "items", id]) => {
                if !admin {
                    return fail(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token needed",
                    );
                }
                self.take_down(id).await
            }
            (Method::GET, ["api", "admin", "items", id, "audit"]) => {
                if !admin {
                    return fail(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token needed",
                    );
                }
                self.audit(id).await
            }
            (_, ["api", ..]) => fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            ),
            _ => fail(StatusCode::NOT_FOUND, "not_found", "not an API path"),
        }
    }

    async fn create_item(&self, b: &Value) -> Answer {
        let invalid = |why: String| fail(StatusCode::BAD_REQUEST, "invalid_request", why);
        let name = match &b["name"] {
            Value::String(n) if !n.trim().is_empty() && n.chars().count() <= 200 => n.as_str(),
            Value::Null => return invalid("name is needed: a text of 1 to 200 characters".into()),
            other => {
                return invalid(format!(
                    "name must be a text of 1 to 200 characters, not {}",
                    shown_json(other)
                ));
            }
        };
        let whole = |field: &str, min: u64, max: u64| -> Result<u64, String> {
            match &b[field] {
                Value::Null => Err(format!(
                    "{field} is needed: a whole number from {min} to {max}"
                )),
                v => v
                    .as_u64()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "{field} must be a whole number from {min} to {max}, not {}",
                            shown_json(v)
                        )
                    }),
            }
        };
        let price = match whole("price_cents", 0, 1_000_000_000) {
            Ok(n) => n,
            Err(why) => return invalid(why),
        };
        let stock = match whole("stock", 1, 100_000_000) {
            Ok(n) => n,
            Err(why) => return invalid(why),
        };
        let starts_at_ms = match b["starts_at"].as_str() {
            None if !b["starts_at"].is_null() => {
                return invalid(format!(
                    "starts_at must be an RFC 3339 time such as 2026-12-24T18:00:00Z, not {}",
                    shown_json(&b["starts_at"])
                ));
            }
            None => now_ms(),
            Some(t) => match humantime::parse_rfc3339_weak(t) {
                Ok(at) => at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                Err(e) => {
                    return fail(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("starts_at is not RFC 3339: {e}"),
                    );
                }
            },
        };
        let per_user_limit = match &b["per_user_limit"] {
            Value::Null => 1,
            _ => match whole("per_user_limit", 1, 1000) {
                Ok(n) => n as u32,
                Err(why) => return invalid(why),
            },
        };
        let _one_at_a_time = self.creating.lock().await;
        // The stock in shares across the shards (no single process takes every buyer), each
        // share in buckets (no single counter does).
        let shares = split(stock, self.shards.len() as u64);
        let buckets_per_share = u64::from(self.buckets.max(1)).div_ceil(shares.len() as u64);
        let mut number = self.catalog.all().len() + 1;
        let item_id = 'pick: loop {
            let item_id = format!("item-{number}");
            for (shard, share) in self.shards.iter().zip(&shares) {
                let created = shard
                    .inventory
                    .create_item(&proto::CreateItemRequest {
                        item_id: item_id.clone(),
                        buckets: split(*share, buckets_per_share),
                        per_user_limit,
                    })
                    .await;
                match created {
                    Ok(_) => {}
                    // Left by a creation that failed half-way: that id is spent.
                    Err(e) if e.code() == Code::AlreadyExists && number < 1_000_000 => {
                        number += 1;
                        continue 'pick;
                    }
                    Err(e) => return upstream(&e),
                }
            }
            let item = ItemDef {
                item_id: item_id.clone(),
                name: name.to_owned(),
                price_cents: price,
                stock,
                starts_at_ms,
                per_user_limit,
                shards: self
                    .shards
                    .iter()
                    .take(shares.len())
                    .map(|s| s.name.clone())
                    .collect(),
            };
            match self.catalog.add(item).await {
                Ok(()) => break item_id,
                // Another API took this id a moment ago (its stock was made in the shards
                // with the same settings, or refused as taken): try the next one.
                Err(CatalogError::Taken(_)) if number < 1_000_000 => {
                    number += 1;
                    continue 'pick;
                }
                Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e),
            }
        };
        // An item that opens later: its opening time to the gateway's gate, which then
        // refuses early buyers before they reach this API (which refuses them too).
        if starts_at_ms > now_ms()
            && let Some(registry) = &self.registry
            && let Err(e) = keel_registry::NamingBackend::put_config(
                registry,
                crate::peers::NAMESPACE,
                &format!("{}{item_id}", crate::peers::OPENS_PREFIX),
                rfc3339(starts_at_ms).into_bytes().into(),
            )
            .await
        {
            tracing::warn!(item = %item_id, error = %e, "publishing the opening time failed; the API still refuses early buyers");
        }
        reply(StatusCode::CREATED, &json!({ "item_id": item_id }))
    }

    async fn buy(&self, item_id: &str, b: &Value) -> Answer {
        let Some(user) = b["user_id"]
            .as_str()
            .filter(|u| !u.is_empty() && u.len() <= 128)
        else {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "user_id (1 to 128 bytes) is needed",
            );
        };
        let request_id = match b["request_id"].as_str() {
            Some(r) if !r.is_empty() && r.len() <= 128 => r.to_owned(),
            Some(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "request_id must have 1 to 128 bytes",
                );
            }
            // Without one, every request is a new purchase attempt.
            None => format!("auto-{}-{:x}", now_ms(), crate::random_u64()),
        };
        let Some(item) = self.catalog.shown(item_id).await else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no item {item_id}"),
            );
        };
        if now_ms() < item.starts_at_ms {
            return fail(
                StatusCode::FORBIDDEN,
                "not_started",
                format!("the sale opens at {}", rfc3339(item.starts_at_ms)),
            );
        }
        let shard = match self.home(&item, user) {
            Ok(shard) => shard,
            Err(answer) => return *answer,
        };
        let sold_out_key = (item_id.to_owned(), shard.name.clone());
        // Sold out a moment ago: answered here, without a trip to the inventory — unless the
        // request may be the retry of one that holds a unit (its id is among the shard's
        // holders, or they are not known here), which the inventory answers.
        let own_id = b["request_id"].as_str().map(|r| (user, r));
        if self.sold_out_here(&sold_out_key, own_id) {
            return fail(StatusCode::CONFLICT, "sold_out", "no units left");
        }
        let request = proto::ReserveRequest {
            item_id: item_id.to_owned(),
            user_id: user.to_owned(),
            request_id,
        };
        let mut answer = self.reserve(&shard, &request).await;
        // The home shard's share is gone: move some of another shard's unsold units there
        // (if any shard has some), then ask once more.
        if answer
            .as_ref()
            .is_ok_and(|r| r.outcome == proto::Outcome::SoldOut as i32)
            && self.rebalance(&item, &shard).await
        {
            answer = self.reserve(&shard, &request).await;
        }
        match answer {
            Ok(r) if r.outcome == proto::Outcome::Reserved as i32 => {
                if let Some(h) = self.holders.lock().get_mut(&sold_out_key) {
                    h.requests
                        .insert((user.to_owned(), request.request_id.clone()));
                }
                self.stock_cache.invalidate(item_id).await;
                let id = r.reservation.map_or(0, |r| r.reservation_id);
                let order_id = crate::orders::order_id(&shard.name, id);
                reply(
                    StatusCode::OK,
                    &json!({ "order_id": order_id, "status": "pending_payment" }),
                )
            }
            Ok(r) if r.outcome == proto::Outcome::LimitReached as i32 => fail(
                StatusCode::CONFLICT,
                "limit_reached",
                format!("{user} holds the limit of {} already", item.per_user_limit),
            ),
            Ok(r) if r.outcome == proto::Outcome::NotFound as i32 => fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no item {item_id}"),
            ),
            Ok(_) => {
                let now = tokio::time::Instant::now();
                let newly = self
                    .sold_out
                    .lock()
                    .insert(sold_out_key.clone(), now + SOLD_OUT_FOR)
                    .is_none_or(|until| until <= now);
                if newly {
                    self.stock_cache.invalidate(item_id).await;
                    self.learn_holders(&sold_out_key, &shard).await;
                }
                fail(StatusCode::CONFLICT, "sold_out", "no units left")
            }
            Err(e) => upstream(&e),
        }
    }

    /// `GET /api/admin/items`: every item, hidden ones included, with its figures.
    async fn admin_items(&self) -> Answer {
        let items = self.catalog.all();
        let out = futures_util::future::join_all(items.iter().map(|item| async move {
            let mut shown = self.item_json(item).await;
            shown["hidden"] = Value::from(self.catalog.is_hidden(&item.item_id));
            shown["initial_stock"] = Value::from(item.stock);
            shown["price_cents"] = Value::from(item.price_cents);
            shown["per_user_limit"] = Value::from(item.per_user_limit);
            shown
        }))
        .await;
        reply(StatusCode::OK, &Value::from(out))
    }

    /// `DELETE /api/admin/items/{id}`: an item is taken out of the storefront at once; if
    /// nobody had reserved any of it, it is dropped from the catalog too, else it stays
    /// (hidden) so its orders can still be read, paid and shipped.
    async fn take_down(&self, item_id: &str) -> Answer {
        let Some(item) = self.catalog.find(item_id).await else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no item {item_id}"),
            );
        };
        // Hidden first, so no buy starts while the figures are read.
        if let Err(e) = self.catalog.hide(item_id).await {
            return fail(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e);
        }
        self.stock_cache.invalidate(item_id).await;
        let (_, reserved, _) = match self.stock(&item).await {
            Ok(figures) => figures,
            // Figures unknown: it stays hidden, never dropped.
            Err(_) => {
                return reply(
                    StatusCode::OK,
                    &json!({ "item_id": item_id, "hidden": true, "removed": false }),
                );
            }
        };
        if reserved > 0 {
            return reply(
                StatusCode::OK,
                &json!({ "item_id": item_id, "hidden": true, "removed": false,
                         "detail": format!("{reserved} units are reserved: the item stays, hidden, for its orders") }),
            );
        }
        if let Err(e) = self.catalog.remove(item_id).await {
            return fail(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e);
        }
        reply(
            StatusCode::OK,
            &json!({ "item_id": item_id, "hidden": true, "removed": true }),
        )
    }

    /// One `Reserve` decision, timed for the metrics. A call whose answer was lost
    /// (`unavailable` or `deadline_exceeded`: the shard's owner may have decided and died, or
    /// is being replaced) is sent again with the same request id for up to `in_doubt_for`;
    /// the inventory is idempotent on it, so the buyer gets the decision that was made, from
    /// whichever owner serves the shard by then.
    async fn reserve(
        &self,
        shard: &Shard,
        request: &proto::ReserveRequest,
    ) -> Result<proto::ReserveReply, keel_rpc::Status> {
        let started = std::time::Instant::now();
        let give_up = started + self.in_doubt_for;
        let backoff = keel_rpc::client::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            ..keel_rpc::client::Backoff::default()
        };
        let mut attempt = 0u32;
        let answer = loop {
            let answer = shard.inventory.reserve(request).await;
            let in_doubt = matches!(
                &answer,
                Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded)
            );
            let wait = backoff.delay(attempt);
            if !in_doubt || std::time::Instant::now() + wait >= give_up {
                break answer;
            }
            attempt += 1;
            self.metrics
                .in_doubt_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        };
        self.metrics.reservations.record(started.elapsed());
        answer
    }

    /// `GET /metrics`: the sale's counters, each item's units left, and each item's orders by
    /// status (asked of the orders services, all at once, within 2 s).
    async fn metrics_page(&self) -> Answer {
        let items = self.catalog.all();
        let stock = futures_util::future::join_all(items.iter().map(|item| async move {
            let left = self.stock_left(item).await?;
            Some((item.item_id.clone(), left))
        }));
        let orders = futures_util::future::join_all(items.iter().map(|item| async move {
            let shards = self.shards_of(item).ok()?;
            let mut by_status: std::collections::BTreeMap<String, u64> = Default::default();
            for shard in shards {
                let audit = shard
                    .orders
                    .audit(&proto::AuditRequest {
                        item_id: item.item_id.clone(),
                        inventory: shard.name.clone(),
                    })
                    .await
                    .ok()?;
                for (status, n) in audit.orders_by_status {
                    *by_status.entry(status).or_default() += n;
                }
            }
            Some((item.item_id.clone(), by_status))
        }));
        let gathered = tokio::time::timeout(
            Duration::from_secs(2),
            futures_util::future::join(stock, orders),
        )
        .await;
        let timed_out = gathered.is_err();
        let (stock, orders) = gathered.unwrap_or_default();
        if timed_out || stock.iter().any(Option::is_none) || orders.iter().any(Option::is_none) {
            self.metrics
                .scrape_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let stock: Vec<(String, u64)> = stock.into_iter().flatten().collect();
        let orders: Vec<(String, String, u64)> = orders
            .into_iter()
            .flatten()
            .flat_map(|(item, by)| by.into_iter().map(move |(s, n)| (item.clone(), s, n)))
            .collect();
        let mut answer =
            Response::new(Full::new(Bytes::from(self.metrics.render(&stock, &orders))));
        answer.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        answer
    }

    /// `GET /status`: uptime, items, buys by outcome and the mean reservation latency.
    fn status_page(&self) -> Answer {
        let buys: serde_json::Map<String, Value> = self
            .metrics
            .buys()
            .map(|(o, n)| (o.to_owned(), Value::from(n)))
            .collect();
        reply(
            StatusCode::OK,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": self.metrics.uptime().as_secs(),
                "items": self.catalog.all().len(),
                "shards": self.shards.len(),
                "buys": buys,
                "reservations": self.metrics.reservations.count(),
                "reservation_mean_us": self.metrics.reservations.mean().as_micros() as u64,
            }),
        )
    }

    async fn order(&self, order_id: &str) -> Answer {
        let Some((shard, reservation_id)) = self.order_shard(order_id) else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no order {order_id}"),
            );
        };
        match shard
            .orders
            .get_order(&proto::GetOrderRequest {
                order_id: order_id.to_owned(),
            })
            .await
        {
            Ok(r) if r.found => reply(StatusCode::OK, &order_json(&r.order.unwrap_or_default())),
            Ok(_) => {
                // Not taken in yet (the orders read the inventory's outbox a moment later):
                // the reservation says what the order is.
                if let Ok(r) = shard
                    .inventory
                    .get_reservation(&proto::GetReservationRequest { reservation_id })
                    .await
                    && let Some(r) = r.reservation
                {
                    return reply(
                        StatusCode::OK,
                        &json!({ "order_id": order_id, "item_id": r.item_id, "user_id": r.user_id, "status": "pending_payment" }),
                    );
                }
                fail(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no order {order_id}"),
                )
            }
            Err(e) => upstream(&e),
        }
    }

    async fn user_orders(&self, user: &str) -> Answer {
        // Every shard (items created over different shard sets, and transfers, may have put
        // the user's orders in more than one), each asked for its own orders only (an orders
        // instance may follow several shards).
        let requests: Vec<proto::UserOrdersRequest> = self
            .shards
            .iter()
            .map(|s| proto::UserOrdersRequest {
                user_id: user.to_owned(),
                inventory: s.name.clone(),
            })
            .collect();
        let replies = futures_util::future::join_all(
            self.shards
                .iter()
                .zip(&requests)
                .map(|(s, r)| s.orders.user_orders(r)),
        )
        .await;
        let mut orders = Vec::new();
        for reply in replies {
            match reply {
                Ok(r) => orders.extend(r.orders),
                Err(e) => return upstream(&e),
            }
        }
        reply(
            StatusCode::OK,
            &Value::from(orders.iter().map(order_json).collect::<Vec<_>>()),
        )
    }

    async fn pay(&self, order_id: &str, b: &Value) -> Answer {
        let Some(user) = b["user_id"].as_str() else {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "user_id is needed",
            );
        };
        let Some((shard, _)) = self.order_shard(order_id) else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no order {order_id}"),
            );
        };
        let request = proto::PayRequest {
            order_id: order_id.to_owned(),
            user_id: user.to_owned(),
        };
        match taken_in(|| shard.orders.pay(&request)).await {
            Ok(r) => reply(StatusCode::OK, &order_json(&r.order.unwrap_or_default())),
            Err(e) if e.code() == Code::NotFound => {
                fail(StatusCode::NOT_FOUND, "not_found", e.message())
            }
            Err(e) if e.code() == Code::PermissionDenied => {
                fail(StatusCode::FORBIDDEN, "forbidden", e.message())
            }
            Err(e) if e.code() == Code::FailedPrecondition => {
                fail(StatusCode::CONFLICT, "expired", e.message())
            }
            Err(e) => upstream(&e),
        }
    }

    async fn ship(&self, order_id: &str) -> Answer {
        let Some((shard, _)) = self.order_shard(order_id) else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no order {order_id}"),
            );
        };
        let request = proto::ShipRequest {
            order_id: order_id.to_owned(),
        };
        match taken_in(|| shard.orders.ship(&request)).await {
            Ok(r) => reply(StatusCode::OK, &order_json(&r.order.unwrap_or_default())),
            Err(e) if e.code() == Code::FailedPrecondition => {
                fail(StatusCode::CONFLICT, "not_paid", e.message())
            }
            Err(e) if e.code() == Code::NotFound => {
                fail(StatusCode::NOT_FOUND, "not_found", e.message())
            }
            Err(e) => upstream(&e),
        }
    }

    async fn audit(&self, item_id: &str) -> Answer {
        let Some(item) = self.catalog.find(item_id).await else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no item {item_id}"),
            );
        };
        let shards = match self.shards_of(&item) {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        let (left, reserved, moved) = match self.stock(&item).await {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        let mut by_status: std::collections::BTreeMap<String, u64> = Default::default();
        let mut backlog = 0;
        for shard in shards {
            let audit = match shard
                .orders
                .audit(&proto::AuditRequest {
                    item_id: item_id.to_owned(),
                    inventory: shard.name.clone(),
                })
                .await
            {
                Ok(a) => a,
                Err(e) => return upstream(&e),
            };
            for (status, n) in audit.orders_by_status {
                *by_status.entry(status).or_default() += n;
            }
            let position = audit.positions.get(&shard.name).copied().unwrap_or(0);
            backlog += audit.backlog as usize;
            backlog += shard
                .inventory
                .reservations_after(&proto::ReservationsAfterRequest {
                    after: position,
                    limit: 1000,
                })
                .await
                .map(|r| r.reservations.len())
                .unwrap_or(0);
        }
        reply(
            StatusCode::OK,
            &json!({
                "initial_stock": item.stock,
                "stock_left": left,
                "reserved": reserved,
                "orders_by_status": by_status,
                "queue_backlog": backlog,
                "moved_between_shards": moved,
            }),
        )
    }
}

/// Calls the orders service, giving it a moment (up to a second) when it does not know the
/// order yet: one just bought is taken in from the inventory's outbox a few milliseconds
/// after the buyer is answered.
async fn taken_in<T, F, Fut>(mut call: F) -> Result<T, keel_rpc::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, keel_rpc::Status>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if e.code() == Code::NotFound && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Invalidates cached stock figures as orders instances announce returned units in the
/// registry (until the registry's stream ends).
pub async fn follow_stock_changes(cache: TwoLevel<u64>, registry: keel_registry::Naming) {
    use keel_registry::ConfigChange;
    let mut changes = keel_registry::follow_config(
        registry,
        crate::peers::NAMESPACE,
        crate::peers::STOCK_PREFIX,
    );
    let item = |key: &str| {
        key.strip_prefix(crate::peers::STOCK_PREFIX)
            .map(str::to_owned)
    };
    while let Some(change) = changes.recv().await {
        let items: Vec<String> = match change {
            // The first list, or one after a gap: whatever it names may have changed.
            ConfigChange::Reset { entries, .. } => {
                entries.iter().filter_map(|e| item(&e.key)).collect()
            }
            ConfigChange::Put(entry) => item(&entry.key).into_iter().collect(),
            ConfigChange::Delete { .. } => Vec::new(),
        };
        for item in items {
            cache.invalidate(&item).await;
        }
    }
}

/// Serves `api` on `listener` until `shutdown`; then requests in flight get up to 10 s to
/// finish.
pub async fn serve(
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    keel_net::AcceptLoop::new(Arc::default())
        .max_connections(MAX_CONNECTIONS)
        .shutdown_grace(Duration::from_secs(10))
        .run(listener, shutdown, move |stream, _, drain| {
            let api = api.clone();
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            keel_net::serve_http1(stream, service, Duration::from_secs(10), drain)
        })
        .await
}

/// Connections the API keeps open at once: its clients are the gateways, which pool theirs.
const MAX_CONNECTIONS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sold_out_shard_is_answered_here_only_for_requests_that_hold_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let api = Api::new(
            Catalog::open(dir.path()).unwrap(),
            Vec::new(),
            "token".into(),
            4,
            TwoLevel::local(keel_cache::CacheConfig::new("t")),
        );
        let key = ("item-1".to_owned(), "inv-0".to_owned());
        // Not known to be sold out: everything goes on.
        assert!(!api.sold_out_here(&key, None));
        api.sold_out.lock().insert(
            key.clone(),
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        // Sold out: requests without an id are answered here; with one, only once the
        // shard's holders are fully known, and never one among them.
        assert!(api.sold_out_here(&key, None));
        assert!(!api.sold_out_here(&key, Some(("ann", "a1"))));
        api.holders.lock().insert(key.clone(), Holders::default());
        assert!(
            !api.sold_out_here(&key, Some(("ann", "a1"))),
            "list incomplete"
        );
        {
            let mut holders = api.holders.lock();
            let h = holders.get_mut(&key).unwrap();
            h.requests.insert(("ann".into(), "a1".into()));
            h.complete = true;
        }
        assert!(!api.sold_out_here(&key, Some(("ann", "a1"))), "a holder");
        assert!(api.sold_out_here(&key, Some(("ann", "a2"))));
        assert!(api.sold_out_here(&key, Some(("bob", "b1"))));
        // The sold-out answer expires.
        api.sold_out
            .lock()
            .insert(key.clone(), tokio::time::Instant::now());
        assert!(!api.sold_out_here(&key, Some(("bob", "b1"))));
    }
}
