//! Orders: created from reservations, paid within a window, shipped once paid.
//!
//! An order's id is derived from its reservation (`<inventory>-<reservation id>`), so the
//! buyer can be told it as soon as the reservation is made, and creating it again from the same
//! reservation (a redelivered queue message) returns the same order. Every change is journaled
//! before it is answered.
//!
//! - `pending_payment` → `paid` (by the buyer, before `expires_at_ms`) → `shipped`.
//! - `pending_payment` → `expired` once the payment window has passed ([`Orders::expire_due`],
//!   or a late payment, which is refused); the expired order's unit must go back to stock:
//!   [`Orders::unreleased`] lists the expired orders whose release is not yet confirmed, and
//!   [`Orders::mark_released`] records the confirmation, so a crash between the two only
//!   repeats the (idempotent) release.

use std::collections::BTreeMap;
use std::path::Path;

use keel_store::{Journal, JournalOptions, StoreError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Reserved, waiting for payment.
    PendingPayment,
    /// Paid in time.
    Paid,
    /// Sent to the buyer.
    Shipped,
    /// Not paid in time; its unit went back to stock.
    Expired,
}

impl OrderStatus {
    /// Its name in the API, the journal and the database (`pending_payment`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Expired => "expired",
        }
    }

    /// The status named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<OrderStatus> {
        [
            OrderStatus::PendingPayment,
            OrderStatus::Paid,
            OrderStatus::Shipped,
            OrderStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `<inventory>-<reservation id>`.
    pub order_id: String,
    /// The item.
    pub item_id: String,
    /// The buyer.
    pub user_id: String,
    /// The inventory instance holding the unit.
    pub inventory: String,
    /// The reservation there.
    pub reservation_id: u64,
    /// Where it stands.
    pub status: OrderStatus,
    /// Unix time (ms) after which an unpaid order expires.
    pub expires_at_ms: u64,
    /// For an expired order: whether its unit's release was confirmed.
    #[serde(default)]
    pub released: bool,
}

/// Why an order operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// No such order.
    #[error("no order {0}")]
    NotFound(String),
    /// Someone other than the buyer tried to pay.
    #[error("order {0} belongs to another user")]
    Forbidden(String),
    /// The payment window has passed.
    #[error("order {0} expired before it was paid")]
    Expired(String),
    /// Shipping an order that is not paid.
    #[error("order {0} is not paid")]
    NotPaid(String),
    /// The journal failed.
    #[error("orders journal: {0}")]
    Journal(#[from] StoreError),
    /// A previous journal failure stopped the instance: restart it (what was acknowledged is
    /// in the journal; what was not is not).
    #[error("orders stopped after a journal failure")]
    Failed,
    /// A journal record could not be read back.
    #[error("orders journal record {index}: {reason}")]
    BadRecord {
        /// The record's index.
        index: u64,
        /// What was wrong.
        reason: String,
    },
    /// The order book's database failed or could not be reached (orders in PostgreSQL).
    #[error("orders database: {0}")]
    Database(String),
    /// The inventory could not be asked to commit or release the order's unit.
    #[error("the inventory could not commit the unit: {0}")]
    Inventory(String),
}

impl From<sqlx::Error> for OrderError {
    fn from(e: sqlx::Error) -> OrderError {
        OrderError::Database(e.to_string())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Create(Order),
    Status {
        order_id: String,
        status: OrderStatus,
    },
    Released {
        order_id: String,
    },
    /// Reservations of `source` up to `after` have their orders.
    Cursor {
        source: String,
        after: u64,
    },
}

/// The order book of one orders instance.
#[derive(Debug)]
pub struct Orders {
    journal: Journal,
    /// Orders whose payment is being committed in the inventory: the expiry sweep leaves
    /// them alone until it is decided.
    paying: Mutex<std::collections::HashSet<String>>,
    /// Per reservation source (inventory instance): the last reservation id with an order.
    cursors: Mutex<BTreeMap<String, u64>>,
    failed: std::sync::atomic::AtomicBool,
    orders: Mutex<Book>,
    payment_window_ms: u64,
}

/// The orders with two indexes, so the periodic sweeps look only at what concerns them:
/// pending orders by expiry time, and expired orders whose unit is not back yet.
#[derive(Debug, Default)]
struct Book {
    orders: BTreeMap<String, Order>,
    /// Pending orders: (expires_at_ms, order id).
    due: std::collections::BTreeSet<(u64, String)>,
    /// Expired orders whose release is not confirmed.
    unreleased: std::collections::BTreeSet<String>,
}

impl Book {
    fn get(&self, order_id: &str) -> Option<&Order> {
        self.orders.get(order_id)
    }

    fn values(&self) -> impl Iterator<Item = &Order> {
        self.orders.values()
    }

    /// Adds an order (a second one with the same id is ignored).
    fn insert(&mut self, order: Order) {
        if self.orders.contains_key(&order.order_id) {
            return;
        }
        let id = order.order_id.clone();
        self.orders.insert(id.clone(), order);
        self.reindex(&id, None);
    }

    fn set_status(&mut self, order_id: &str, status: OrderStatus) {
        let Some(o) = self.orders.get_mut(order_id) else {
            return;
        };
        let before = (o.status, o.expires_at_ms, o.released);
        o.status = status;
        self.reindex(order_id, Some(before));
    }

    fn set_released(&mut self, order_id: &str) {
        let Some(o) = self.orders.get_mut(order_id) else {
            return;
        };
        let before = (o.status, o.expires_at_ms, o.released);
        o.released = true;
        self.reindex(order_id, Some(before));
    }

    /// Moves the order's index entries from what it was (`before`) to what it is.
    fn reindex(&mut self, order_id: &str, before: Option<(OrderStatus, u64, bool)>) {
        if let Some((status, expires, _)) = before
            && status == OrderStatus::PendingPayment
        {
            self.due.remove(&(expires, order_id.to_owned()));
        }
        self.unreleased.remove(order_id);
        let Some(o) = self.orders.get(order_id) else {
            return;
        };
        match o.status {
            OrderStatus::PendingPayment => {
                self.due.insert((o.expires_at_ms, order_id.to_owned()));
            }
            OrderStatus::Expired if !o.released => {
                self.unreleased.insert(order_id.to_owned());
            }
            _ => {}
        }
    }
}

/// The id of the order made from a reservation.
pub fn order_id(inventory: &str, reservation_id: u64) -> String {
    format!("{inventory}-{reservation_id}")
}

impl Orders {
    /// Opens the order book in `dir`, replaying its journal; unpaid orders expire
    /// `payment_window_ms` after they are created. Blocking.
    pub fn open(
        dir: impl AsRef<Path>,
        options: JournalOptions,
        payment_window_ms: u64,
    ) -> Result<Orders, OrderError> {
        let (journal, recovered) = Journal::open(dir, options)?;
        let mut orders = Book::default();
        let mut cursors: BTreeMap<String, u64> = BTreeMap::new();
        for record in &recovered.records {
            let op: Op =
                serde_json::from_slice(&record.payload).map_err(|e| OrderError::BadRecord {
                    index: record.index,
                    reason: e.to_string(),
                })?;
            match op {
                Op::Create(order) => orders.insert(order),
                Op::Status { order_id, status } => orders.set_status(&order_id, status),
                Op::Released { order_id } => orders.set_released(&order_id),
                Op::Cursor { source, after } => {
                    let c = cursors.entry(source).or_default();
                    *c = (*c).max(after);
                }
            }
        }
        Ok(Orders {
            journal,
            paying: Mutex::new(std::collections::HashSet::new()),
            cursors: Mutex::new(cursors),
            failed: std::sync::atomic::AtomicBool::new(false),
            orders: Mutex::new(orders),
            payment_window_ms,
        })
    }

    /// Appends `op` (the caller holds the lock, so the journal's order is the changes'),
    /// returning the pending append.
    fn log(&self, op: &Op) -> Result<keel_store::Appended, OrderError> {
        if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(OrderError::Failed);
        }
        Ok(self
            .journal
            .append(serde_json::to_vec(op).unwrap_or_default())?)
    }

    /// Waits for an append, or for everything appended so far; a failure stops the instance
    /// (its memory may be ahead of its journal from then on).
    async fn durable(&self, appended: Option<keel_store::Appended>) -> Result<(), OrderError> {
        let result = match appended {
            Some(a) => a.await.map(|_| ()),
            None => self.journal.sync().await,
        };
        result.map_err(|e| {
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::error!(error = %e, "orders journal write failed; no more changes");
            OrderError::Journal(e)
        })
    }

    /// The order made from a reservation, created now if it is new; returns it once durable.
    pub async fn create(
        &self,
        inventory: &str,
        reservation_id: u64,
        item_id: &str,
        user_id: &str,
        now_ms: u64,
    ) -> Result<Order, OrderError> {
        let id = order_id(inventory, reservation_id);
        let (order, appended) = {
            let mut orders = self.orders.lock();
            if let Some(existing) = orders.get(&id) {
                (existing.clone(), None)
            } else {
                let order = Order {
                    order_id: id.clone(),
                    item_id: item_id.to_owned(),
                    user_id: user_id.to_owned(),
                    inventory: inventory.to_owned(),
                    reservation_id,
                    status: OrderStatus::PendingPayment,
                    expires_at_ms: now_ms.saturating_add(self.payment_window_ms),
                    released: false,
                };
                let appended = self.log(&Op::Create(order.clone()))?;
                orders.insert(order.clone());
                (order, Some(appended))
            }
        };
        // Made before: its record is durable once everything appended so far is.
        self.durable(appended).await?;
        Ok(order)
    }

    /// An order.
    pub fn get(&self, order_id: &str) -> Option<Order> {
        self.orders.lock().get(order_id).cloned()
    }

    /// A user's orders, oldest first by id.
    pub fn of_user(&self, user_id: &str) -> Vec<Order> {
        self.orders
            .lock()
            .values()
            .filter(|o| o.user_id == user_id)
            .cloned()
            .collect()
    }

    /// Moves an order to `status` if `check` allows it (given the order), durably.
    async fn transition(
        &self,
        order_id: &str,
        check: impl FnOnce(&Order) -> Result<Option<OrderStatus>, OrderError>,
    ) -> Result<Order, OrderError> {
        let (order, appended) = {
            let mut orders = self.orders.lock();
            let order = orders
                .get(order_id)
                .ok_or_else(|| OrderError::NotFound(order_id.to_owned()))?;
            match check(order)? {
                None => (order.clone(), None),
                Some(status) => {
                    let appended = self.log(&Op::Status {
                        order_id: order_id.to_owned(),
                        status,
                    })?;
                    orders.set_status(order_id, status);
                    let order = orders
                        .get(order_id)
                        .cloned()
                        .ok_or_else(|| OrderError::NotFound(order_id.to_owned()))?;
                    (order, Some(appended))
                }
            }
        };
        self.durable(appended).await?;
        Ok(order)
    }

    /// Pays an order: only its buyer, only before it expires; paying a paid (or shipped)
    /// order again answers with it. A late payment expires the order and is refused.
    pub async fn pay(
        &self,
        order_id: &str,
        user_id: &str,
        now_ms: u64,
    ) -> Result<Order, OrderError> {
        let mut expired_now = false;
        let order = self
            .transition(order_id, |o| {
                if o.user_id != user_id {
                    return Err(OrderError::Forbidden(order_id.to_owned()));
                }
                match o.status {
                    OrderStatus::Expired => Err(OrderError::Expired(order_id.to_owned())),
                    OrderStatus::Paid | OrderStatus::Shipped => Ok(None),
                    OrderStatus::PendingPayment if now_ms >= o.expires_at_ms => {
                        expired_now = true;
                        Ok(Some(OrderStatus::Expired))
                    }
                    OrderStatus::PendingPayment => Ok(Some(OrderStatus::Paid)),
                }
            })
            .await?;
        if expired_now {
            return Err(OrderError::Expired(order.order_id));
        }
        Ok(order)
    }

    /// First half of a payment through the inventory: checks that `user_id` may pay the order
    /// now and holds it out of the expiry sweep. A paid (or shipped) order is returned as it
    /// is; for a pending one, commit its reservation in the inventory, then call
    /// [`Orders::complete_payment`].
    pub fn begin_payment(
        &self,
        order_id: &str,
        user_id: &str,
        now_ms: u64,
    ) -> Result<Order, OrderError> {
        let orders = self.orders.lock();
        let order = orders
            .get(order_id)
            .ok_or_else(|| OrderError::NotFound(order_id.to_owned()))?;
        if order.user_id != user_id {
            return Err(OrderError::Forbidden(order_id.to_owned()));
        }
        match order.status {
            OrderStatus::Expired => Err(OrderError::Expired(order_id.to_owned())),
            OrderStatus::PendingPayment if now_ms >= order.expires_at_ms => {
                Err(OrderError::Expired(order_id.to_owned()))
            }
            OrderStatus::PendingPayment => {
                self.paying.lock().insert(order_id.to_owned());
                Ok(order.clone())
            }
            OrderStatus::Paid | OrderStatus::Shipped => Ok(order.clone()),
        }
    }

    /// Second half: `committed` says whether the inventory committed the unit. If it did the
    /// order is paid (even if its window closed meanwhile: the unit is sold); if not (its
    /// reservation was released) the order is expired.
    pub async fn complete_payment(
        &self,
        order_id: &str,
        committed: bool,
    ) -> Result<Order, OrderError> {
        let result = self
            .transition(order_id, |o| match o.status {
                OrderStatus::PendingPayment if committed => Ok(Some(OrderStatus::Paid)),
                OrderStatus::PendingPayment => Ok(Some(OrderStatus::Expired)),
                _ => Ok(None),
            })
            .await;
        self.paying.lock().remove(order_id);
        let order = result?;
        if order.status == OrderStatus::Expired {
            return Err(OrderError::Expired(order.order_id));
        }
        Ok(order)
    }

    /// Gives up a payment begun with [`Orders::begin_payment`] (the inventory could not be
    /// asked): the order stays pending.
    pub fn abandon_payment(&self, order_id: &str) {
        self.paying.lock().remove(order_id);
    }

    /// Ships a paid order (shipping it again answers with it).
    pub async fn ship(&self, order_id: &str) -> Result<Order, OrderError> {
        self.transition(order_id, |o| match o.status {
            OrderStatus::Paid => Ok(Some(OrderStatus::Shipped)),
            OrderStatus::Shipped => Ok(None),
            _ => Err(OrderError::NotPaid(order_id.to_owned())),
        })
        .await
    }

    /// Expires every unpaid order whose window has passed; returns how many.
    pub async fn expire_due(&self, now_ms: u64) -> Result<usize, OrderError> {
        let (count, last) = {
            let mut orders = self.orders.lock();
            let mut last = None;
            let mut count = 0;
            let paying = self.paying.lock();
            // Only the pending orders due by now, from the expiry index.
            let due: Vec<String> = orders
                .due
                .range(..(now_ms.saturating_add(1), String::new()))
                .map(|(_, id)| id.clone())
                .filter(|id| !paying.contains(id))
                .collect();
            for order_id in due {
                last = Some(self.log(&Op::Status {
                    order_id: order_id.clone(),
                    status: OrderStatus::Expired,
                })?);
                orders.set_status(&order_id, OrderStatus::Expired);
                count += 1;
            }
            (count, last)
        };
        // The records are durable in order: the last one's acknowledgement covers them all.
        if last.is_some() {
            self.durable(last).await?;
        }
        Ok(count)
    }

    /// Expired orders whose unit's release is not confirmed yet.
    pub fn unreleased(&self) -> Vec<Order> {
        let orders = self.orders.lock();
        orders
            .unreleased
            .iter()
            .filter_map(|id| orders.get(id).cloned())
            .collect()
    }

    /// Records that an expired order's unit is back in stock.
    pub async fn mark_released(&self, order_id: &str) -> Result<(), OrderError> {
        let appended = {
            let mut orders = self.orders.lock();
            match orders.get(order_id) {
                Some(o) if !o.released => {
                    let a = self.log(&Op::Released {
                        order_id: order_id.to_owned(),
                    })?;
                    orders.set_released(order_id);
                    Some(a)
                }
                _ => None,
            }
        };
        if appended.is_some() {
            self.durable(appended).await?;
        }
        Ok(())
    }

    /// The last reservation of `source` known to have its order.
    pub fn cursor(&self, source: &str) -> u64 {
        self.cursors.lock().get(source).copied().unwrap_or(0)
    }

    /// Records that the reservations of `source` up to `after` have their orders.
    pub async fn advance(&self, source: &str, after: u64) -> Result<(), OrderError> {
        let appended = {
            let mut cursors = self.cursors.lock();
            let current = cursors.entry(source.to_owned()).or_default();
            if after <= *current {
                return Ok(());
            }
            let a = self.log(&Op::Cursor {
                source: source.to_owned(),
                after,
            })?;
            *current = after;
            Some(a)
        };
        self.durable(appended).await
    }

    /// Orders by status.
    pub fn counts(&self) -> BTreeMap<OrderStatus, usize> {
        self.counts_of(None, None)
    }

    /// Orders by status, of one item or of all.
    pub fn counts_of(
        &self,
        item_id: Option<&str>,
        inventory: Option<&str>,
    ) -> BTreeMap<OrderStatus, usize> {
        let mut counts = BTreeMap::new();
        for o in self.orders.lock().values().filter(|o| {
            item_id.is_none_or(|i| o.item_id == i) && inventory.is_none_or(|i| o.inventory == i)
        }) {
            *counts.entry(o.status).or_insert(0) += 1;
        }
        counts
    }
}

/// The inventory side of an order's unit: committing it when the order is paid, giving it
/// back when the order expired. Both are idempotent in the inventory.
pub trait Units: Send + Sync {
    /// Commits the order's unit for good: true if committed (now or before), false if its
    /// reservation was released; an error when the inventory could not be asked.
    fn commit(
        &self,
        order: &Order,
    ) -> impl std::future::Future<Output = Result<bool, String>> + Send;

    /// Gives the expired order's unit back: true once it is back (now or before).
    fn release(&self, order: &Order) -> impl std::future::Future<Output = bool> + Send;
}

/// Where reservations come from: an inventory instance, in process or over RPC.
pub trait ReservationSource: Send + Sync {
    /// Reservations after `after` (by id), at most `limit`, all durable.
    fn after(
        &self,
        after: u64,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<crate::Reservation>, String>> + Send;
}

impl ReservationSource for crate::Inventory {
    async fn after(&self, after: u64, limit: usize) -> Result<Vec<crate::Reservation>, String> {
        self.reservations_after(after, limit)
            .await
            .map_err(|e| e.to_string())
    }
}

impl<T: keel_rpc::client::CallTransport> ReservationSource for crate::proto::InventoryClient<T> {
    async fn after(&self, after: u64, limit: usize) -> Result<Vec<crate::Reservation>, String> {
        let reply = self
            .reservations_after(&crate::proto::ReservationsAfterRequest {
                after,
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply
            .reservations
            .into_iter()
            .map(|r| crate::Reservation {
                reservation_id: r.reservation_id,
                item_id: r.item_id,
                user_id: r.user_id,
                request_id: r.request_id,
                bucket: r.bucket,
            })
            .collect())
    }
}

/// One round of moving reservations into orders: those of `source` (named `name`) after the
/// saved position get their orders (idempotently: a round repeated after a crash makes no
/// second order), then the position moves past them. Returns how many it handled.
pub async fn pump(
    source: &impl ReservationSource,
    name: &str,
    orders: &Orders,
    now_ms: u64,
    limit: usize,
) -> Result<usize, String> {
    let batch = source.after(orders.cursor(name), limit).await?;
    let Some(last) = batch.last().map(|r| r.reservation_id) else {
        return Ok(0);
    };
    // All appended at once, then awaited together: one group commit for the batch, not an
    // fsync per order.
    futures_util::future::try_join_all(
        batch
            .iter()
            .map(|r| orders.create(name, r.reservation_id, &r.item_id, &r.user_id, now_ms)),
    )
    .await
    .map_err(|e| e.to_string())?;
    orders
        .advance(name, last)
        .await
        .map_err(|e| e.to_string())?;
    Ok(batch.len())
}
