//! The order book in PostgreSQL, for the scale-out profile: the same orders and transitions as
//! [`Orders`](crate::orders::Orders), kept in one table that several orders instances share.
//!
//! - **Schema** in `migrations/`, applied at start (sqlx's migrator takes an advisory lock, so
//!   instances starting together apply it once).
//! - **Idempotent creation**: an order's id is derived from its reservation, and an insert of
//!   an id that exists does nothing, so a redelivered reservation makes no second order.
//! - **Payment** locks the order's row (`FOR UPDATE`) while the inventory commits the unit,
//!   so no sweep can expire it meanwhile.
//! - **Sweeps** take rows with `FOR UPDATE SKIP LOCKED`: instances sweeping at once share the
//!   due orders between them instead of waiting for or repeating each other, and skip orders
//!   being paid.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};

use crate::orders::{Order, OrderError, OrderStatus, Units, order_id};

/// Orders expired, or released, per sweep round at most.
const SWEEP_BATCH: i64 = 500;

/// Expired orders given back per release round at most (their rows are held meanwhile).
const RELEASE_BATCH: i64 = 50;

/// How long a call to the inventory may hold an order's row (and a pooled connection).
const UNIT_CALL_PATIENCE: Duration = Duration::from_secs(3);

/// The order book in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgOrders {
    pool: PgPool,
    payment_window_ms: u64,
}

fn parse_status(text: &str) -> Result<OrderStatus, OrderError> {
    OrderStatus::from_name(text)
        .ok_or_else(|| OrderError::Database(format!("an order has the unknown status {text:?}")))
}

const COLUMNS: &str =
    "order_id, item_id, user_id, inventory, reservation_id, status, expires_at_ms, released";

fn order_of(row: &PgRow) -> Result<Order, OrderError> {
    Ok(Order {
        order_id: row.try_get("order_id")?,
        item_id: row.try_get("item_id")?,
        user_id: row.try_get("user_id")?,
        inventory: row.try_get("inventory")?,
        reservation_id: row.try_get::<i64, _>("reservation_id")? as u64,
        status: parse_status(row.try_get("status")?)?,
        expires_at_ms: row.try_get::<i64, _>("expires_at_ms")? as u64,
        released: row.try_get("released")?,
    })
}

fn db_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgOrders {
    /// Connects to `url` (`postgres://user@host:port/database`) and brings its schema up to
    /// date; unpaid orders expire `payment_window_ms` after they are created.
    pub async fn connect(url: &str, payment_window_ms: u64) -> Result<PgOrders, OrderError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| OrderError::Database(format!("connecting to {}: {e}", redact(url))))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| OrderError::Database(format!("migrating the schema: {e}")))?;
        Ok(PgOrders {
            pool,
            payment_window_ms,
        })
    }

    /// Makes the orders of `reservations` of shard `inventory` (those that have none yet);
    /// returns how many were new. Done once committed.
    pub async fn create_many(
        &self,
        inventory: &str,
        reservations: &[crate::Reservation],
        now_ms: u64,
    ) -> Result<u64, OrderError> {
        if reservations.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = reservations
            .iter()
            .map(|r| order_id(inventory, r.reservation_id))
            .collect();
        let reservation_ids: Vec<i64> = reservations
            .iter()
            .map(|r| db_i64(r.reservation_id))
            .collect();
        let items: Vec<&str> = reservations.iter().map(|r| r.item_id.as_str()).collect();
        let users: Vec<&str> = reservations.iter().map(|r| r.user_id.as_str()).collect();
        let inserted = sqlx::query(
            "INSERT INTO seckill_orders
                 (order_id, inventory, reservation_id, item_id, user_id, status, expires_at_ms)
             SELECT id, $2, rid, item, usr, 'pending_payment', $6
             FROM UNNEST($1::text[], $3::bigint[], $4::text[], $5::text[]) AS r(id, rid, item, usr)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(inventory)
        .bind(&reservation_ids)
        .bind(&items)
        .bind(&users)
        .bind(db_i64(now_ms.saturating_add(self.payment_window_ms)))
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected())
    }

    /// An order.
    pub async fn get(&self, order_id: &str) -> Result<Option<Order>, OrderError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM seckill_orders WHERE order_id = $1"
        ))
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(order_of).transpose()
    }

    /// A user's orders (of one shard's reservations, or all), by id.
    pub async fn of_user(
        &self,
        user_id: &str,
        inventory: Option<&str>,
    ) -> Result<Vec<Order>, OrderError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM seckill_orders
             WHERE user_id = $1 AND ($2::text IS NULL OR inventory = $2)
             ORDER BY order_id"
        ))
        .bind(user_id)
        .bind(inventory)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(order_of).collect()
    }

    /// Pays an order: only its buyer, only before it expires; a paid (or shipped) order is
    /// answered as it is. While `units` commits the unit in the inventory, the order's
    /// row is locked (no sweep expires it); if the inventory committed, the order is paid,
    /// if not (the reservation was released), expired.
    pub async fn pay(
        &self,
        order_id: &str,
        user_id: &str,
        now_ms: u64,
        units: &impl Units,
    ) -> Result<Order, OrderError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM seckill_orders WHERE order_id = $1 FOR UPDATE"
        ))
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(OrderError::NotFound(order_id.to_owned()));
        };
        let mut order = order_of(&row)?;
        if order.user_id != user_id {
            return Err(OrderError::Forbidden(order_id.to_owned()));
        }
        match order.status {
            OrderStatus::Expired => return Err(OrderError::Expired(order_id.to_owned())),
            OrderStatus::Paid | OrderStatus::Shipped => return Ok(order),
            OrderStatus::PendingPayment if now_ms >= order.expires_at_ms => {
                return Err(OrderError::Expired(order_id.to_owned()));
            }
            OrderStatus::PendingPayment => {}
        }
        // Bounded: the row and a pooled connection are held meanwhile.
        let committed = tokio::time::timeout(UNIT_CALL_PATIENCE, units.commit(&order))
            .await
            .map_err(|_| OrderError::Inventory(format!("no answer in {UNIT_CALL_PATIENCE:?}")))?
            .map_err(OrderError::Inventory)?;
        let status = if committed {
            OrderStatus::Paid
        } else {
            OrderStatus::Expired
        };
        sqlx::query("UPDATE seckill_orders SET status = $2 WHERE order_id = $1")
            .bind(order_id)
            .bind(status.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        order.status = status;
        if !committed {
            return Err(OrderError::Expired(order_id.to_owned()));
        }
        Ok(order)
    }

    /// Ships a paid order (shipping it again answers with it).
    pub async fn ship(&self, order_id: &str) -> Result<Order, OrderError> {
        let row = sqlx::query(&format!(
            "UPDATE seckill_orders SET status = 'shipped'
             WHERE order_id = $1 AND status IN ('paid', 'shipped')
             RETURNING {COLUMNS}"
        ))
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => order_of(&row),
            None => match self.get(order_id).await? {
                None => Err(OrderError::NotFound(order_id.to_owned())),
                Some(_) => Err(OrderError::NotPaid(order_id.to_owned())),
            },
        }
    }

    /// Expires unpaid orders whose window has passed (up to a batch; orders being paid, or
    /// expired by another instance right now, are skipped); returns how many.
    pub async fn expire_due(&self, now_ms: u64) -> Result<usize, OrderError> {
        let expired = sqlx::query(
            "WITH due AS (
                 SELECT order_id FROM seckill_orders
                 WHERE status = 'pending_payment' AND expires_at_ms <= $1
                 ORDER BY expires_at_ms
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             UPDATE seckill_orders o SET status = 'expired'
             FROM due WHERE o.order_id = due.order_id",
        )
        .bind(db_i64(now_ms))
        .bind(SWEEP_BATCH)
        .execute(&self.pool)
        .await?;
        Ok(expired.rows_affected() as usize)
    }

    /// Gives back the units of expired orders: takes a batch of expired orders whose release
    /// is not confirmed (skipping those another instance holds), gives each unit back through
    /// `units` (idempotent in the inventory), and records the confirmed ones, all in one
    /// transaction. Returns the orders released.
    pub async fn release_expired(&self, units: &impl Units) -> Result<Vec<Order>, OrderError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM seckill_orders
             WHERE status = 'expired' AND NOT released
             ORDER BY order_id
             LIMIT $1
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(RELEASE_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let mut released = Vec::new();
        for row in &rows {
            let order = order_of(row)?;
            // Bounded, as the rows are held meanwhile: unanswered is not released (the next
            // sweep asks again).
            if tokio::time::timeout(UNIT_CALL_PATIENCE, units.release(&order))
                .await
                .unwrap_or(false)
            {
                released.push(order);
            }
        }
        if released.is_empty() {
            return Ok(released);
        }
        let ids: Vec<&str> = released.iter().map(|o| o.order_id.as_str()).collect();
        sqlx::query("UPDATE seckill_orders SET released = true WHERE order_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for order in &mut released {
            order.released = true;
        }
        Ok(released)
    }

    /// Orders by status, of one item and one shard's reservations, or all.
    pub async fn counts_of(
        &self,
        item_id: Option<&str>,
        inventory: Option<&str>,
    ) -> Result<BTreeMap<OrderStatus, usize>, OrderError> {
        let rows = sqlx::query(
            "SELECT status, count(*) AS n FROM seckill_orders
             WHERE ($1::text IS NULL OR item_id = $1) AND ($2::text IS NULL OR inventory = $2)
             GROUP BY status",
        )
        .bind(item_id)
        .bind(inventory)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = BTreeMap::new();
        for row in &rows {
            let n: i64 = row.try_get("n")?;
            counts.insert(parse_status(row.try_get("status")?)?, n as usize);
        }
        Ok(counts)
    }

    /// The highest reservation id of `inventory` with an order (0 if none).
    pub async fn last_reservation(&self, inventory: &str) -> Result<u64, OrderError> {
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT max(reservation_id) FROM seckill_orders WHERE inventory = $1",
        )
        .bind(inventory)
        .fetch_one(&self.pool)
        .await?;
        Ok(last.unwrap_or(0) as u64)
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://keel:secret@db:5432/sale"),
            "postgres://keel:***@db:5432/sale"
        );
        assert_eq!(
            redact("postgres://keel@db:5432/sale"),
            "postgres://keel@db:5432/sale"
        );
        assert_eq!(redact("postgres://db/sale"), "postgres://db/sale");
    }
}
