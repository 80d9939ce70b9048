//! The order book as a Keel RPC service (`keel.seckill.v1.Orders`), and the background work
//! of an orders process: taking in each inventory's reservations and expiring unpaid orders,
//! whose units go back to the inventory.
//!
//! The book is an [`OrderBook`]: a local journal ([`Orders`], embedded), which takes
//! reservations from each shard's outbox over RPC; or PostgreSQL ([`PgOrders`], scale-out),
//! which takes them from each shard's journal stream through a durable JetStream consumer
//! shared by the orders instances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_rpc::{Context, Status};

use keel_store::StreamFeed;

use crate::orders::{Order, OrderError, OrderStatus, Orders, Units, pump};
use crate::orders_pg::PgOrders;
use crate::proto;

/// Where the orders are kept, with how reservations reach them.
#[derive(Debug)]
pub enum OrderBook {
    /// A local journal, fed from each shard's outbox over RPC.
    Local(Arc<Orders>),
    /// PostgreSQL, fed from each shard's journal stream by a durable consumer.
    Postgres {
        /// The table.
        orders: PgOrders,
        /// Per shard, the durable consumer of its journal stream.
        feeds: BTreeMap<String, Arc<StreamFeed>>,
    },
}

impl OrderBook {
    /// An order.
    pub async fn get(&self, order_id: &str) -> Result<Option<Order>, OrderError> {
        match self {
            OrderBook::Local(orders) => Ok(orders.get(order_id)),
            OrderBook::Postgres { orders, .. } => orders.get(order_id).await,
        }
    }

    /// A user's orders, of one shard's reservations or all.
    pub async fn of_user(
        &self,
        user_id: &str,
        inventory: Option<&str>,
    ) -> Result<Vec<Order>, OrderError> {
        match self {
            OrderBook::Local(orders) => Ok(orders
                .of_user(user_id)
                .into_iter()
                .filter(|o| inventory.is_none_or(|i| o.inventory == i))
                .collect()),
            OrderBook::Postgres { orders, .. } => orders.of_user(user_id, inventory).await,
        }
    }

    /// Pays an order: its unit is committed through `units` while the order is held out of
    /// the expiry sweep; paid if the inventory committed, expired if it had released the unit.
    pub async fn pay(
        &self,
        order_id: &str,
        user_id: &str,
        now_ms: u64,
        units: &impl Units,
    ) -> Result<Order, OrderError> {
        match self {
            OrderBook::Local(orders) => {
                let order = orders.begin_payment(order_id, user_id, now_ms)?;
                if order.status != OrderStatus::PendingPayment {
                    return Ok(order);
                }
                match units.commit(&order).await {
                    Ok(committed) => orders.complete_payment(order_id, committed).await,
                    Err(e) => {
                        orders.abandon_payment(order_id);
                        Err(OrderError::Inventory(e))
                    }
                }
            }
            OrderBook::Postgres { orders, .. } => {
                orders.pay(order_id, user_id, now_ms, units).await
            }
        }
    }

    /// Ships a paid order.
    pub async fn ship(&self, order_id: &str) -> Result<Order, OrderError> {
        match self {
            OrderBook::Local(orders) => orders.ship(order_id).await,
            OrderBook::Postgres { orders, .. } => orders.ship(order_id).await,
        }
    }

    /// Orders by status, of one item and one shard's reservations, or all.
    pub async fn counts_of(
        &self,
        item_id: Option<&str>,
        inventory: Option<&str>,
    ) -> Result<BTreeMap<OrderStatus, usize>, OrderError> {
        match self {
            OrderBook::Local(orders) => Ok(orders.counts_of(item_id, inventory)),
            OrderBook::Postgres { orders, .. } => orders.counts_of(item_id, inventory).await,
        }
    }

    /// How far the orders of `inventory`'s reservations go: the last reservation id taken
    /// in, and how many of the shard's journal messages its feed still holds (none for a
    /// local book, whose position is contiguous).
    pub async fn position(&self, inventory: &str) -> Result<(u64, u64), OrderError> {
        match self {
            OrderBook::Local(orders) => Ok((orders.cursor(inventory), 0)),
            OrderBook::Postgres { orders, feeds } => {
                let last = orders.last_reservation(inventory).await?;
                let backlog = match feeds.get(inventory) {
                    Some(feed) => feed
                        .backlog()
                        .await
                        .map_err(|e| OrderError::Database(e.to_string()))?,
                    None => 0,
                };
                Ok((last, backlog))
            }
        }
    }

    /// Expires unpaid orders whose window has passed; returns how many.
    pub async fn expire_due(&self, now_ms: u64) -> Result<usize, OrderError> {
        match self {
            OrderBook::Local(orders) => orders.expire_due(now_ms).await,
            OrderBook::Postgres { orders, .. } => orders.expire_due(now_ms).await,
        }
    }

    /// Gives back the units of expired orders through `units` (idempotent in the inventory)
    /// and records each confirmed release; returns the orders released.
    pub async fn release_expired(&self, units: &impl Units) -> Result<Vec<Order>, OrderError> {
        match self {
            OrderBook::Local(orders) => {
                let mut released = Vec::new();
                for order in orders.unreleased() {
                    if units.release(&order).await {
                        orders.mark_released(&order.order_id).await?;
                        released.push(order);
                    }
                }
                Ok(released)
            }
            OrderBook::Postgres { orders, .. } => orders.release_expired(units).await,
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The inventories an orders process works with, by name (the name is the first part of
/// the order ids made from their reservations).
pub type Inventories = BTreeMap<String, proto::InventoryClient<crate::peers::Transport>>;

impl Units for Inventories {
    async fn commit(&self, order: &Order) -> Result<bool, String> {
        let inventory = self.get(&order.inventory).ok_or_else(|| {
            format!(
                "order {} names unknown inventory {}",
                order.order_id, order.inventory
            )
        })?;
        inventory
            .commit(&proto::CommitRequest {
                reservation_id: order.reservation_id,
            })
            .await
            .map(|reply| reply.committed)
            .map_err(|e| e.message().to_owned())
    }

    async fn release(&self, order: &Order) -> bool {
        let Some(inventory) = self.get(&order.inventory) else {
            return false;
        };
        // Released now, or before (a repeat after a crash): either way the unit is back.
        inventory
            .release(&proto::ReleaseRequest {
                reservation_id: order.reservation_id,
                user_id: order.user_id.clone(),
            })
            .await
            .is_ok()
    }
}

/// Serves an order book over Keel RPC.
#[derive(Debug, Clone)]
pub struct OrdersService {
    orders: Arc<OrderBook>,
    inventories: Arc<Inventories>,
}

impl OrdersService {
    /// Serves `orders`, committing payments in `inventories`.
    pub fn new(orders: Arc<OrderBook>, inventories: Arc<Inventories>) -> OrdersService {
        OrdersService {
            orders,
            inventories,
        }
    }
}

fn status(e: OrderError) -> Status {
    match e {
        OrderError::NotFound(_) => Status::not_found(e.to_string()),
        OrderError::Forbidden(_) => Status::permission_denied(e.to_string()),
        OrderError::Expired(_) | OrderError::NotPaid(_) => {
            Status::failed_precondition(e.to_string())
        }
        OrderError::Journal(_)
        | OrderError::Failed
        | OrderError::Database(_)
        | OrderError::Inventory(_) => Status::unavailable(e.to_string()),
        OrderError::BadRecord { .. } => Status::internal(e.to_string()),
    }
}

fn to_proto(o: &Order) -> proto::Order {
    proto::Order {
        order_id: o.order_id.clone(),
        item_id: o.item_id.clone(),
        user_id: o.user_id.clone(),
        status: o.status.as_str().to_owned(),
        expires_at_ms: o.expires_at_ms,
    }
}

fn found(o: Order) -> proto::OrderReply {
    proto::OrderReply {
        found: true,
        order: Some(to_proto(&o)),
    }
}

impl proto::Orders for OrdersService {
    async fn get_order(
        &self,
        _ctx: Context,
        request: proto::GetOrderRequest,
    ) -> Result<proto::OrderReply, Status> {
        Ok(self
            .orders
            .get(&request.order_id)
            .await
            .map_err(status)?
            .map_or_else(proto::OrderReply::default, found))
    }

    async fn user_orders(
        &self,
        _ctx: Context,
        request: proto::UserOrdersRequest,
    ) -> Result<proto::UserOrdersReply, Status> {
        let inventory = Some(request.inventory.as_str()).filter(|i| !i.is_empty());
        Ok(proto::UserOrdersReply {
            orders: self
                .orders
                .of_user(&request.user_id, inventory)
                .await
                .map_err(status)?
                .iter()
                .map(to_proto)
                .collect(),
        })
    }

    async fn pay(
        &self,
        _ctx: Context,
        request: proto::PayRequest,
    ) -> Result<proto::OrderReply, Status> {
        let paid = self
            .orders
            .pay(
                &request.order_id,
                &request.user_id,
                now_ms(),
                &*self.inventories,
            )
            .await
            .map_err(status)?;
        Ok(found(paid))
    }

    async fn ship(
        &self,
        _ctx: Context,
        request: proto::ShipRequest,
    ) -> Result<proto::OrderReply, Status> {
        let order = self.orders.ship(&request.order_id).await.map_err(status)?;
        Ok(found(order))
    }

    async fn audit(
        &self,
        _ctx: Context,
        request: proto::AuditRequest,
    ) -> Result<proto::AuditReply, Status> {
        let item = Some(request.item_id.as_str()).filter(|i| !i.is_empty());
        let inventory = Some(request.inventory.as_str()).filter(|i| !i.is_empty());
        let mut positions = BTreeMap::new();
        let mut backlog = 0;
        for name in self.inventories.keys() {
            let (position, behind) = self.orders.position(name).await.map_err(status)?;
            positions.insert(name.clone(), position);
            if inventory.is_none_or(|i| i == name) {
                backlog += behind;
            }
        }
        Ok(proto::AuditReply {
            orders_by_status: self
                .orders
                .counts_of(item, inventory)
                .await
                .map_err(status)?
                .into_iter()
                .map(|(s, n)| (s.as_str().to_owned(), n as u64))
                .collect(),
            positions: positions.into_iter().collect(),
            backlog,
        })
    }
}

/// Runs an orders process's background work until the task is dropped: taking in each
/// inventory's reservations (a pump over its outbox, or its stream's durable consumer) and
/// the expiry sweep every `sweep` (expiring unpaid orders and returning their units, which it
/// announces in `registry`, if any, for the catalog's cache).
pub async fn background(
    book: Arc<OrderBook>,
    inventories: Arc<Inventories>,
    sweep: Duration,
    registry: Option<keel_registry::Naming>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    match &*book {
        OrderBook::Local(orders) => {
            for (name, client) in inventories.iter() {
                let (orders, name, client) = (orders.clone(), name.clone(), client.clone());
                tasks.spawn(async move {
                    loop {
                        match pump(&client, &name, &orders, now_ms(), 256).await {
                            Ok(0) => tokio::time::sleep(Duration::from_millis(10)).await,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(inventory = %name, error = %e, "taking in reservations failed; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                });
            }
        }
        OrderBook::Postgres { orders, feeds } => {
            for (name, feed) in feeds {
                tasks.spawn(follow_feed(orders.clone(), name.clone(), feed.clone()));
            }
        }
    }
    let mut ticker = tokio::time::interval(sweep);
    loop {
        ticker.tick().await;
        if let Err(e) = book.expire_due(now_ms()).await {
            tracing::warn!(error = %e, "expiry sweep failed");
            continue;
        }
        let released = match book.release_expired(&*inventories).await {
            Ok(released) => released,
            Err(e) => {
                tracing::warn!(error = %e, "recording releases failed");
                continue;
            }
        };
        let Some(registry) = &registry else {
            continue;
        };
        let items: std::collections::BTreeSet<&str> =
            released.iter().map(|o| o.item_id.as_str()).collect();
        for item in items {
            if let Err(e) = keel_registry::NamingBackend::put_config(
                registry,
                crate::peers::NAMESPACE,
                &format!("{}{item}", crate::peers::STOCK_PREFIX),
                now_ms().to_string().into_bytes().into(),
            )
            .await
            {
                tracing::warn!(error = %e, "announcing returned stock failed; caches catch up within their time to live");
            }
        }
    }
}

/// How long a batch of reservations from a feed is tried in the database before it is left
/// to be delivered again (well inside the consumer's acknowledgement wait).
const INSERT_RETRY_FOR: Duration = Duration::from_secs(4);

/// Takes in shard `name`'s reservations from its journal stream: each batch's orders are
/// inserted (idempotently) and committed, then the batch is acknowledged. Records that are
/// not reservations are acknowledged as they are; one that cannot be read is logged and
/// acknowledged with the rest.
async fn follow_feed(orders: PgOrders, name: String, feed: Arc<StreamFeed>) {
    loop {
        // A message holds one record or many (the shard's group commit): a few dozen make a
        // batch of hundreds to thousands of records.
        let batch = match feed.next(32, Duration::from_secs(1)).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(inventory = %name, error = %e, "reading the reservation feed failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        let mut reservations = Vec::with_capacity(batch.len());
        for record in &batch {
            match crate::inventory::reservation_in(&record.payload) {
                Ok(found) => reservations.extend(found),
                Err(e) => {
                    tracing::error!(inventory = %name, index = record.index, error = %e,
                        "a journal record of the shard cannot be read; it is skipped");
                }
            }
        }
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(50);
        let inserted = loop {
            match orders.create_many(&name, &reservations, now_ms()).await {
                Ok(_) => break true,
                Err(e) if started.elapsed() < INSERT_RETRY_FOR => {
                    tracing::warn!(inventory = %name, error = %e, "inserting orders failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(inventory = %name, error = %e, "inserting orders failed; the batch will be delivered again");
                    break false;
                }
            }
        };
        if inserted && let Err(e) = feed.ack(&batch).await {
            tracing::warn!(inventory = %name, error = %e, "acknowledging the feed failed; the batch will be delivered again");
        }
    }
}
