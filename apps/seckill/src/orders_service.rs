//! The order book as a Keel RPC service (`keel.seckill.v1.Orders`), and the background work
//! of an orders process: taking in each inventory's reservations (its outbox) and expiring
//! unpaid orders, whose units go back to the inventory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_rpc::{Context, Status};

use crate::orders::{Order, OrderError, OrderStatus, Orders, pump};
use crate::proto;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The inventories an orders process works with, by name (the name is the first part of
/// the order ids made from their reservations).
pub type Inventories = BTreeMap<String, proto::InventoryClient<crate::peers::Transport>>;

/// Serves an order book over Keel RPC.
#[derive(Debug, Clone)]
pub struct OrdersService {
    orders: Arc<Orders>,
    inventories: Arc<Inventories>,
}

impl OrdersService {
    /// Serves `orders`, committing payments in `inventories`.
    pub fn new(orders: Arc<Orders>, inventories: Arc<Inventories>) -> OrdersService {
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
        OrderError::Journal(_) | OrderError::Failed => Status::unavailable(e.to_string()),
        OrderError::BadRecord { .. } => Status::internal(e.to_string()),
    }
}

fn status_name(s: OrderStatus) -> &'static str {
    match s {
        OrderStatus::PendingPayment => "pending_payment",
        OrderStatus::Paid => "paid",
        OrderStatus::Shipped => "shipped",
        OrderStatus::Expired => "expired",
    }
}

fn to_proto(o: &Order) -> proto::Order {
    proto::Order {
        order_id: o.order_id.clone(),
        item_id: o.item_id.clone(),
        user_id: o.user_id.clone(),
        status: status_name(o.status).to_owned(),
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
            .map_or_else(proto::OrderReply::default, found))
    }

    async fn user_orders(
        &self,
        _ctx: Context,
        request: proto::UserOrdersRequest,
    ) -> Result<proto::UserOrdersReply, Status> {
        Ok(proto::UserOrdersReply {
            orders: self
                .orders
                .of_user(&request.user_id)
                .iter()
                .filter(|o| request.inventory.is_empty() || o.inventory == request.inventory)
                .map(to_proto)
                .collect(),
        })
    }

    async fn pay(
        &self,
        _ctx: Context,
        request: proto::PayRequest,
    ) -> Result<proto::OrderReply, Status> {
        let order = self
            .orders
            .begin_payment(&request.order_id, &request.user_id, now_ms())
            .map_err(status)?;
        if order.status != OrderStatus::PendingPayment {
            return Ok(found(order));
        }
        let Some(inventory) = self.inventories.get(&order.inventory) else {
            self.orders.abandon_payment(&order.order_id);
            return Err(Status::internal(format!(
                "order {} names unknown inventory {}",
                order.order_id, order.inventory
            )));
        };
        let committed = match inventory
            .commit(&proto::CommitRequest {
                reservation_id: order.reservation_id,
            })
            .await
        {
            Ok(reply) => reply.committed,
            Err(e) => {
                self.orders.abandon_payment(&order.order_id);
                return Err(Status::unavailable(format!(
                    "the inventory could not commit the unit: {}",
                    e.message()
                )));
            }
        };
        let paid = self
            .orders
            .complete_payment(&order.order_id, committed)
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
        Ok(proto::AuditReply {
            orders_by_status: self
                .orders
                .counts_of(item, inventory)
                .into_iter()
                .map(|(s, n)| (status_name(s).to_owned(), n as u64))
                .collect(),
            positions: self
                .inventories
                .keys()
                .map(|name| (name.clone(), self.orders.cursor(name)))
                .collect(),
        })
    }
}

/// Runs an orders process's background work until the task is dropped: a pump per
/// inventory (taking in its reservations) and the expiry sweep every `sweep` (expiring
/// unpaid orders and returning their units, which it announces in `registry`, if any, for
/// the catalog's cache).
pub async fn background(
    orders: Arc<Orders>,
    inventories: Arc<Inventories>,
    sweep: Duration,
    registry: Option<keel_registry::RegistryHandle>,
) {
    let mut tasks = tokio::task::JoinSet::new();
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
    let mut ticker = tokio::time::interval(sweep);
    loop {
        ticker.tick().await;
        if let Err(e) = orders.expire_due(now_ms()).await {
            tracing::warn!(error = %e, "expiry sweep failed");
            continue;
        }
        for order in orders.unreleased() {
            let Some(client) = inventories.get(&order.inventory) else {
                continue;
            };
            let released = client
                .release(&proto::ReleaseRequest {
                    reservation_id: order.reservation_id,
                    user_id: order.user_id.clone(),
                })
                .await;
            // Released now, or before (a repeat after a crash): either way the unit is back.
            if released.is_ok() {
                if let Err(e) = orders.mark_released(&order.order_id).await {
                    tracing::warn!(error = %e, "recording a release failed");
                }
                if let Some(registry) = &registry
                    && let Err(e) = keel_registry::NamingBackend::put_config(
                        registry,
                        crate::peers::NAMESPACE,
                        &format!("{}{}", crate::peers::STOCK_PREFIX, order.item_id),
                        now_ms().to_string().into_bytes().into(),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "announcing returned stock failed; caches catch up within their time to live");
                }
            }
        }
    }
}
