//! The order book in PostgreSQL (`PgOrders`) against the real server (a database of its own
//! per test on `KEEL_POSTGRES_URL`, default the one on 127.0.0.1:5432): idempotent creation,
//! the transitions, a payment that holds its order out of the sweeps, and two instances
//! sharing the sweeps without doing anything twice. Skipped with a message when no server
//! answers, failed instead when `KEEL_REQUIRE_SERVICES=1`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_seckill::orders::Units;
use keel_seckill::orders_pg::PgOrders;
use keel_seckill::testing::temp_database;
use keel_seckill::{Order, OrderError, OrderStatus, Reservation};
use parking_lot::Mutex;

fn reservation(id: u64, user: &str) -> Reservation {
    Reservation {
        reservation_id: id,
        item_id: "phone".into(),
        user_id: user.into(),
        request_id: format!("q{id}"),
        bucket: 0,
    }
}

/// An inventory as the orders see it: commits and releases counted per reservation; a
/// commit can be held until the test lets it go.
#[derive(Default, Clone)]
struct FakeUnits {
    commits: Arc<Mutex<BTreeMap<u64, u32>>>,
    releases: Arc<Mutex<BTreeMap<u64, u32>>>,
    hold: Arc<Mutex<Option<Arc<tokio::sync::Notify>>>>,
    entered: Arc<tokio::sync::Notify>,
    refuse_commits: bool,
}

impl Units for FakeUnits {
    async fn commit(&self, order: &Order) -> Result<bool, String> {
        *self.commits.lock().entry(order.reservation_id).or_default() += 1;
        let hold = self.hold.lock().clone();
        if let Some(hold) = hold {
            self.entered.notify_one();
            hold.notified().await;
        }
        Ok(!self.refuse_commits)
    }

    async fn release(&self, order: &Order) -> bool {
        *self
            .releases
            .lock()
            .entry(order.reservation_id)
            .or_default() += 1;
        // A moment in the inventory, so two sweeps overlap.
        tokio::time::sleep(Duration::from_millis(1)).await;
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_in_postgres_are_made_once_and_follow_their_transitions() {
    let Some(db) = temp_database("orders_in_postgres_are_made_once_and_follow_their_transitions")
    else {
        return;
    };
    let orders = PgOrders::connect(&db.url, 60_000).await.unwrap();
    // A second instance on the same database: the schema is there already.
    let other = PgOrders::connect(&db.url, 60_000).await.unwrap();
    let batch: Vec<Reservation> = (1..=5).map(|i| reservation(i, &format!("u{i}"))).collect();
    assert_eq!(orders.create_many("inv-0", &batch, 1_000).await.unwrap(), 5);
    // Delivered again (to either instance): nothing new.
    assert_eq!(other.create_many("inv-0", &batch, 2_000).await.unwrap(), 0);
    assert_eq!(
        other
            .create_many("inv-0", &[reservation(6, "u1")], 2_000)
            .await
            .unwrap(),
        1
    );
    let order = orders.get("inv-0-1").await.unwrap().unwrap();
    assert_eq!(
        (
            order.status,
            order.expires_at_ms,
            order.user_id.as_str(),
            order.reservation_id
        ),
        (OrderStatus::PendingPayment, 61_000, "u1", 1)
    );
    assert!(orders.get("inv-0-99").await.unwrap().is_none());
    let mine: Vec<String> = orders
        .of_user("u1", Some("inv-0"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.order_id)
        .collect();
    assert_eq!(mine, ["inv-0-1", "inv-0-6"]);
    assert!(
        orders
            .of_user("u1", Some("inv-1"))
            .await
            .unwrap()
            .is_empty()
    );

    let units = FakeUnits::default();
    assert!(matches!(
        orders.pay("inv-0-1", "u2", 2_000, &units).await,
        Err(OrderError::Forbidden(_))
    ));
    assert!(matches!(
        orders.ship("inv-0-1").await,
        Err(OrderError::NotPaid(_))
    ));
    let paid = orders.pay("inv-0-1", "u1", 2_000, &units).await.unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    // Paying again answers with the paid order, without asking the inventory again.
    let again = other.pay("inv-0-1", "u1", 2_000, &units).await.unwrap();
    assert_eq!(again.status, OrderStatus::Paid);
    assert_eq!(units.commits.lock()[&1], 1);
    assert_eq!(
        orders.ship("inv-0-1").await.unwrap().status,
        OrderStatus::Shipped
    );
    assert_eq!(
        orders.ship("inv-0-1").await.unwrap().status,
        OrderStatus::Shipped
    );
    assert!(matches!(
        orders.ship("inv-0-77").await,
        Err(OrderError::NotFound(_))
    ));
    // Too late: refused, and the sweep expires it.
    assert!(matches!(
        orders.pay("inv-0-2", "u2", 61_000, &units).await,
        Err(OrderError::Expired(_))
    ));
    // The inventory had released the unit: the order is expired, not paid.
    let refusing = FakeUnits {
        refuse_commits: true,
        ..FakeUnits::default()
    };
    assert!(matches!(
        orders.pay("inv-0-3", "u3", 2_000, &refusing).await,
        Err(OrderError::Expired(_))
    ));
    let counts = orders.counts_of(Some("phone"), None).await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([
            (OrderStatus::PendingPayment, 4),
            (OrderStatus::Shipped, 1),
            (OrderStatus::Expired, 1),
        ])
    );
    assert!(
        orders
            .counts_of(Some("laptop"), None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(orders.last_reservation("inv-0").await.unwrap(), 6);
    assert_eq!(orders.last_reservation("inv-1").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_sweeps_and_leave_an_order_being_paid_alone() {
    let Some(db) =
        temp_database("two_instances_share_the_sweeps_and_leave_an_order_being_paid_alone")
    else {
        return;
    };
    let a = PgOrders::connect(&db.url, 1_000).await.unwrap();
    let b = PgOrders::connect(&db.url, 1_000).await.unwrap();
    let batch: Vec<Reservation> = (1..=2_000)
        .map(|i| reservation(i, &format!("u{i}")))
        .collect();
    assert_eq!(a.create_many("inv-0", &batch, 0).await.unwrap(), 2_000);

    // Order 7 is being paid (its commit held in the inventory) while both sweep.
    let units = FakeUnits::default();
    let hold = Arc::new(tokio::sync::Notify::new());
    *units.hold.lock() = Some(hold.clone());
    let paying = {
        let (a, units) = (a.clone(), units.clone());
        tokio::spawn(async move { a.pay("inv-0-7", "u7", 500, &units).await })
    };
    units.entered.notified().await;
    *units.hold.lock() = None;

    // Both sweep at once until nothing is left to expire.
    let sweep = |orders: PgOrders| {
        tokio::spawn(async move {
            let mut total = 0;
            loop {
                let n = orders.expire_due(5_000).await.unwrap();
                if n == 0 {
                    return total;
                }
                total += n;
            }
        })
    };
    let (x, y) = (sweep(a.clone()), sweep(b.clone()));
    let (x, y) = (x.await.unwrap(), y.await.unwrap());
    assert_eq!(x + y, 1_999, "every due order but the one being paid, once");
    assert_eq!(
        a.get("inv-0-7").await.unwrap().unwrap().status,
        OrderStatus::PendingPayment
    );
    // The payment goes through: the sweeps did not touch it.
    hold.notify_one();
    let paid = paying.await.unwrap().unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);

    // Both give units back at once: each expired order's unit once, none of the paid one.
    let release = |orders: PgOrders, units: FakeUnits| {
        tokio::spawn(async move {
            let mut total = 0;
            loop {
                let n = orders.release_expired(&units).await.unwrap().len();
                if n == 0 {
                    return total;
                }
                total += n;
            }
        })
    };
    let (x, y) = (
        release(a.clone(), units.clone()),
        release(b.clone(), units.clone()),
    );
    let (x, y) = (x.await.unwrap(), y.await.unwrap());
    assert_eq!(x + y, 1_999);
    let releases = units.releases.lock().clone();
    assert_eq!(releases.len(), 1_999);
    assert!(
        releases.values().all(|n| *n == 1),
        "a unit given back twice"
    );
    assert!(!releases.contains_key(&7));
    assert!(a.release_expired(&units).await.unwrap().is_empty());
    let counts = b.counts_of(None, Some("inv-0")).await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([(OrderStatus::Paid, 1), (OrderStatus::Expired, 1_999)])
    );
}

#[tokio::test]
async fn a_bad_database_address_is_a_clear_error() {
    let err = PgOrders::connect("postgres://nobody:secret@127.0.0.1:1/none", 1_000)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("connecting to postgres://nobody:***@127.0.0.1:1/none"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}
