//! The sale's HTTP API (the contract of issue 5, served behind the gateway) and the catalog
//! of items it keeps.
//!
//! JSON bodies; errors are `{"error": CODE, "detail": ...}`. The catalog (name, price, stock,
//! start time, per-user limit) is journaled here; stock is held by the inventory, orders by
//! the orders service, both reached over Keel RPC.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use keel_rpc::{Channel, Code};
use keel_store::{Journal, JournalOptions, StoreError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::orders_service::now_ms;
use crate::proto;

/// An item of the sale, as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemDef {
    /// Its id.
    pub item_id: String,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: u64,
    /// Units for sale.
    pub stock: u64,
    /// Unix time (ms) the sale opens.
    pub starts_at_ms: u64,
    /// Units one user may buy.
    pub per_user_limit: u32,
}

/// The journaled list of items.
#[derive(Debug)]
pub struct Catalog {
    journal: Journal,
    items: Mutex<Vec<ItemDef>>,
}

impl Catalog {
    /// Opens the catalog in `dir`. Blocking.
    pub fn open(dir: impl AsRef<Path>) -> Result<Catalog, StoreError> {
        let (journal, recovered) = Journal::open(dir, JournalOptions::default())?;
        let items = recovered
            .records
            .iter()
            .filter_map(|r| serde_json::from_slice::<ItemDef>(&r.payload).ok())
            .collect();
        Ok(Catalog {
            journal,
            items: Mutex::new(items),
        })
    }

    /// Adds an item; returns once durable.
    pub async fn add(&self, item: ItemDef) -> Result<(), StoreError> {
        let appended = {
            let mut items = self.items.lock();
            let a = self
                .journal
                .append(serde_json::to_vec(&item).unwrap_or_default())?;
            items.push(item);
            a
        };
        appended.await.map(|_| ())
    }

    /// An item.
    pub fn get(&self, item_id: &str) -> Option<ItemDef> {
        self.items
            .lock()
            .iter()
            .find(|i| i.item_id == item_id)
            .cloned()
    }

    /// All items, oldest first.
    pub fn all(&self) -> Vec<ItemDef> {
        self.items.lock().clone()
    }
}

/// What the API needs.
#[derive(Debug)]
pub struct Api {
    /// The items.
    pub catalog: Catalog,
    /// The inventory instance and its name (the prefix of its orders' ids).
    pub inventory: proto::InventoryClient<Channel>,
    /// Its name.
    pub inventory_name: String,
    /// The orders service.
    pub orders: proto::OrdersClient<Channel>,
    /// Token the admin endpoints need (`Authorization: Bearer <token>`).
    pub admin_token: String,
    /// Buckets each item's stock is split into.
    pub buckets: u32,
    /// Items found sold out, and until when that answer is reused without asking the
    /// inventory (units can come back when orders expire, so not for long).
    pub sold_out: Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
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

fn fail(status: StatusCode, code: &str, detail: impl std::fmt::Display) -> Answer {
    reply(
        status,
        &json!({ "error": code, "detail": detail.to_string() }),
    )
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
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
    async fn item_json(&self, item: &ItemDef) -> Value {
        let stock = self
            .inventory
            .stock(&proto::StockRequest {
                item_id: item.item_id.clone(),
            })
            .await
            .ok();
        let left = stock.as_ref().map_or(0, |s| s.left);
        let status = if now_ms() < item.starts_at_ms {
            "upcoming"
        } else if stock.as_ref().is_some_and(|s| s.left == 0) {
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
            .is_some_and(|t| !self.admin_token.is_empty() && t == self.admin_token)
    }

    /// Serves one request.
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Answer {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let admin = self.is_admin(&req);
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body is unreadable or over 64 KiB",
                );
            }
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
                let mut out = Vec::new();
                for item in self.catalog.all() {
                    out.push(self.item_json(&item).await);
                }
                reply(StatusCode::OK, &Value::from(out))
            }
            (Method::GET, ["api", "items", id]) => match self.catalog.get(id) {
                Some(item) => reply(StatusCode::OK, &self.item_json(&item).await),
                None => fail(StatusCode::NOT_FOUND, "not_found", format!("no item {id}")),
            },
            (Method::POST, ["api", "items", id, "buy"]) => match json_body() {
                Ok(b) => self.buy(id, &b).await,
                Err(why) => not_json(why),
            },
            (Method::GET, ["api", "orders", id]) => self.order(id).await,
            (Method::GET, ["api", "users", user, "orders"]) => {
                match self
                    .orders
                    .user_orders(&proto::UserOrdersRequest {
                        user_id: (*user).to_owned(),
                    })
                    .await
                {
                    Ok(r) => reply(
                        StatusCode::OK,
                        &Value::from(r.orders.iter().map(order_json).collect::<Vec<_>>()),
                    ),
                    Err(e) => upstream(&e),
                }
            }
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
                let request = proto::ShipRequest {
                    order_id: (*id).to_owned(),
                };
                match taken_in(|| self.orders.ship(&request)).await {
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
        let name = b["name"].as_str().unwrap_or("");
        let (Some(price), Some(stock)) = (b["price_cents"].as_u64(), b["stock"].as_u64()) else {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "name, price_cents and stock are needed",
            );
        };
        if name.is_empty() || stock == 0 || stock > 100_000_000 {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "name must not be empty and stock must be 1 to 100,000,000",
            );
        }
        let starts_at_ms = match b["starts_at"].as_str() {
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
        let per_user_limit = match b["per_user_limit"].as_u64() {
            None => 1,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "per_user_limit must be 1 to 1000",
                );
            }
        };
        let item_id = format!("item-{}", self.catalog.all().len() + 1);
        // The stock in buckets, so no single counter takes every buyer.
        let n = u64::from(self.buckets.max(1)).min(stock);
        let buckets: Vec<u64> = (0..n)
            .map(|i| stock / n + u64::from(i < stock % n))
            .collect();
        if let Err(e) = self
            .inventory
            .create_item(&proto::CreateItemRequest {
                item_id: item_id.clone(),
                buckets,
                per_user_limit,
            })
            .await
        {
            return upstream(&e);
        }
        let item = ItemDef {
            item_id: item_id.clone(),
            name: name.to_owned(),
            price_cents: price,
            stock,
            starts_at_ms,
            per_user_limit,
        };
        if let Err(e) = self.catalog.add(item).await {
            return fail(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e);
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
            None => format!("auto-{}-{}", now_ms(), rand_suffix()),
        };
        let Some(item) = self.catalog.get(item_id) else {
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
        // Sold out a moment ago: answered here, without a trip to the inventory. (A request
        // with a request_id may be the retry of one that holds a unit: the inventory answers
        // those.)
        if b["request_id"].is_null()
            && self
                .sold_out
                .lock()
                .get(item_id)
                .is_some_and(|until| tokio::time::Instant::now() < *until)
        {
            return fail(StatusCode::CONFLICT, "sold_out", "no units left");
        }
        match self
            .inventory
            .reserve(&proto::ReserveRequest {
                item_id: item_id.to_owned(),
                user_id: user.to_owned(),
                request_id,
            })
            .await
        {
            Ok(r) if r.outcome == proto::Outcome::Reserved as i32 => {
                let id = r.reservation.map_or(0, |r| r.reservation_id);
                let order_id = crate::orders::order_id(&self.inventory_name, id);
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
                self.sold_out.lock().insert(
                    item_id.to_owned(),
                    tokio::time::Instant::now() + SOLD_OUT_FOR,
                );
                fail(StatusCode::CONFLICT, "sold_out", "no units left")
            }
            Err(e) => upstream(&e),
        }
    }

    async fn order(&self, order_id: &str) -> Answer {
        match self
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
                let reservation = order_id
                    .strip_prefix(&format!("{}-", self.inventory_name))
                    .and_then(|id| id.parse::<u64>().ok());
                if let Some(id) = reservation
                    && let Ok(r) = self
                        .inventory
                        .get_reservation(&proto::GetReservationRequest { reservation_id: id })
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

    async fn pay(&self, order_id: &str, b: &Value) -> Answer {
        let Some(user) = b["user_id"].as_str() else {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "user_id is needed",
            );
        };
        let request = proto::PayRequest {
            order_id: order_id.to_owned(),
            user_id: user.to_owned(),
        };
        match taken_in(|| self.orders.pay(&request)).await {
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

    async fn audit(&self, item_id: &str) -> Answer {
        let Some(item) = self.catalog.get(item_id) else {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no item {item_id}"),
            );
        };
        let stock = match self
            .inventory
            .stock(&proto::StockRequest {
                item_id: item_id.to_owned(),
            })
            .await
        {
            Ok(s) => s,
            Err(e) => return upstream(&e),
        };
        let audit = match self
            .orders
            .audit(&proto::AuditRequest {
                item_id: item_id.to_owned(),
            })
            .await
        {
            Ok(a) => a,
            Err(e) => return upstream(&e),
        };
        let position = audit
            .positions
            .get(&self.inventory_name)
            .copied()
            .unwrap_or(0);
        let made = self
            .inventory
            .reservations_after(&proto::ReservationsAfterRequest {
                after: position,
                limit: 1000,
            })
            .await
            .map(|r| r.reservations.len())
            .unwrap_or(0);
        reply(
            StatusCode::OK,
            &json!({
                "initial_stock": item.stock,
                "stock_left": stock.left,
                "reserved": stock.reserved,
                "orders_by_status": audit.orders_by_status,
                "queue_backlog": made,
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

/// A few random-looking digits (time-based, for ids that only need to differ).
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish() % 1_000_000_000
}

/// Serves `api` on `listener` until `shutdown`.
pub async fn serve(
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
