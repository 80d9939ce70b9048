//! The order flow on one machine: reservations from the inventory become orders through the
//! durable queue (exactly one order per reservation, however often the message comes), the
//! payment window, stock coming back from expired orders, shipping, and restarts.

use std::time::Duration;

use keel_seckill::orders::order_id;
use keel_seckill::{Inventory, OrderError, OrderStatus, Orders};
use keel_store::{DurableQueue, JournalOptions};
use serde_json::json;

const WINDOW_MS: u64 = 1_000;

fn opened(dir: &std::path::Path) -> (Inventory, DurableQueue, Orders) {
    (
        Inventory::open(dir.join("inventory"), JournalOptions::default()).unwrap(),
        DurableQueue::open(dir.join("queue"), JournalOptions::default(), 1_000).unwrap(),
        Orders::open(dir.join("orders"), JournalOptions::default(), WINDOW_MS).unwrap(),
    )
}

/// Takes one message off the queue and makes its order; acknowledges it if `ack`.
async fn consume(queue: &DurableQueue, orders: &Orders, ack: bool) -> (String, bool) {
    let d = queue.pop(Duration::from_secs(30)).await;
    let m: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
    let order = orders
        .create(
            m["inventory"].as_str().unwrap(),
            m["reservation_id"].as_u64().unwrap(),
            m["item_id"].as_str().unwrap(),
            m["user_id"].as_str().unwrap(),
            0,
        )
        .await
        .unwrap();
    if ack {
        assert!(queue.ack(d.seq).await.unwrap());
    } else {
        queue.nack(&d);
    }
    (order.order_id, d.redelivered)
}

#[tokio::test]
async fn each_reservation_becomes_exactly_one_order_however_often_it_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (inventory, queue, orders) = opened(dir.path());
    inventory.create_item("cup", vec![10, 10], 1).await.unwrap();
    for u in 0..20 {
        let r = inventory
            .reserve("cup", &format!("u{u}"), "r")
            .await
            .unwrap()
            .unwrap();
        let message = json!({
            "inventory": "inv-0",
            "reservation_id": r.reservation_id,
            "item_id": r.item_id,
            "user_id": r.user_id,
        });
        queue.push(message.to_string()).await.unwrap();
    }
    // The first message is handled but not acknowledged (the consumer "dies"): it comes back
    // and makes the same order.
    let (first, redelivered) = consume(&queue, &orders, false).await;
    assert!(!redelivered);
    let (again, redelivered) = consume(&queue, &orders, true).await;
    assert_eq!((again.as_str(), redelivered), (first.as_str(), true));
    for _ in 0..19 {
        consume(&queue, &orders, true).await;
    }
    assert!(queue.is_empty());
    assert_eq!(orders.counts()[&OrderStatus::PendingPayment], 20);
    assert_eq!(first, order_id("inv-0", 1));
}

#[tokio::test]
async fn unpaid_orders_expire_their_units_return_and_only_paid_orders_ship() {
    let dir = tempfile::tempdir().unwrap();
    let (inventory, _queue, orders) = opened(dir.path());
    inventory.create_item("lamp", vec![3], 1).await.unwrap();
    let mut ids = Vec::new();
    for user in ["ann", "bob", "cy"] {
        let r = inventory.reserve("lamp", user, "r").await.unwrap().unwrap();
        let o = orders
            .create("inv-0", r.reservation_id, "lamp", user, 0)
            .await
            .unwrap();
        assert_eq!(o.expires_at_ms, WINDOW_MS);
        ids.push(o.order_id);
    }
    assert!(inventory.is_sold_out("lamp"));

    // Ann pays in time; paying twice answers the same; Bob may not pay Ann's order.
    let paid = orders.pay(&ids[0], "ann", 500).await.unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    // A paid order's unit is sold for good: the inventory refuses to release it.
    assert!(inventory.commit(paid.reservation_id).await.unwrap());
    assert!(!inventory.release(paid.reservation_id, "ann").await.unwrap());
    assert_eq!(
        orders.pay(&ids[0], "ann", 600).await.unwrap().status,
        OrderStatus::Paid
    );
    assert!(matches!(
        orders.pay(&ids[0], "bob", 600).await,
        Err(OrderError::Forbidden(_))
    ));
    // Bob pays too late: refused, and his order is expired.
    assert!(matches!(
        orders.pay(&ids[1], "bob", WINDOW_MS + 1).await,
        Err(OrderError::Expired(_))
    ));
    // The sweep expires Cy's; both units go back to stock.
    assert_eq!(orders.expire_due(WINDOW_MS + 5).await.unwrap(), 1);
    let due = orders.unreleased();
    assert_eq!(due.len(), 2);
    for o in &due {
        assert!(
            inventory
                .release(o.reservation_id, &o.user_id)
                .await
                .unwrap()
        );
        orders.mark_released(&o.order_id).await.unwrap();
    }
    assert!(orders.unreleased().is_empty());
    assert!(!inventory.is_sold_out("lamp"));
    assert_eq!(inventory.stock("lamp").unwrap().left, 2);
    // The returned units can be bought again.
    assert!(inventory.reserve("lamp", "dee", "r").await.unwrap().is_ok());

    // Only paid orders ship.
    assert_eq!(
        orders.ship(&ids[0]).await.unwrap().status,
        OrderStatus::Shipped
    );
    assert!(matches!(
        orders.ship(&ids[2]).await,
        Err(OrderError::NotPaid(_))
    ));
    assert!(matches!(
        orders.pay(&ids[2], "cy", 0).await,
        Err(OrderError::Expired(_))
    ));
    assert!(orders.get("inv-0-99").is_none());

    // All of it survives a restart.
    drop(orders);
    let orders = Orders::open(
        dir.path().join("orders"),
        JournalOptions::default(),
        WINDOW_MS,
    )
    .unwrap();
    assert_eq!(orders.get(&ids[0]).unwrap().status, OrderStatus::Shipped);
    assert_eq!(orders.get(&ids[1]).unwrap().status, OrderStatus::Expired);
    assert!(orders.unreleased().is_empty());
    assert_eq!(orders.of_user("cy").len(), 1);
}

#[tokio::test]
async fn an_expiry_whose_release_was_not_confirmed_is_released_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let reservation = {
        let (inventory, _queue, orders) = opened(dir.path());
        inventory.create_item("pen", vec![1], 1).await.unwrap();
        let r = inventory.reserve("pen", "eve", "r").await.unwrap().unwrap();
        orders
            .create("inv-0", r.reservation_id, "pen", "eve", 0)
            .await
            .unwrap();
        assert_eq!(orders.expire_due(WINDOW_MS).await.unwrap(), 1);
        // Crash before the release.
        r.reservation_id
    };
    let (inventory, _queue, orders) = opened(dir.path());
    let due = orders.unreleased();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].reservation_id, reservation);
    assert!(inventory.release(reservation, "eve").await.unwrap());
    // Released twice (a crash after the release, before its confirmation): harmless.
    assert!(!inventory.release(reservation, "eve").await.unwrap());
    orders.mark_released(&due[0].order_id).await.unwrap();
    assert_eq!(inventory.stock("pen").unwrap().left, 1);
}

#[tokio::test]
async fn the_sweep_expires_exactly_the_orders_due_and_lists_those_to_release() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Orders::open(
            dir.path().join("orders"),
            JournalOptions::default(),
            WINDOW_MS,
        )
    };
    let orders = open().unwrap();
    // Ten orders made at 0, 100, ..., 900 ms: each due WINDOW_MS later. Two are paid.
    for i in 0..10u64 {
        orders
            .create("inv-0", i + 1, "item-1", &format!("u{i}"), i * 100)
            .await
            .unwrap();
    }
    for i in [2u64, 5] {
        orders
            .pay(&order_id("inv-0", i + 1), &format!("u{i}"), 10)
            .await
            .unwrap();
    }
    assert_eq!(orders.expire_due(WINDOW_MS - 1).await.unwrap(), 0);
    // Due by 1,300 ms: the ones made at 0, 100, 300 (200 is paid).
    assert_eq!(orders.expire_due(WINDOW_MS + 300).await.unwrap(), 3);
    assert_eq!(orders.expire_due(WINDOW_MS + 300).await.unwrap(), 0, "once");
    let mut unreleased: Vec<String> = orders
        .unreleased()
        .into_iter()
        .map(|o| o.order_id)
        .collect();
    unreleased.sort();
    assert_eq!(unreleased, ["inv-0-1", "inv-0-2", "inv-0-4"]);
    orders.mark_released("inv-0-2").await.unwrap();
    drop(orders);
    // After a restart the indexes are rebuilt from the journal.
    let orders = open().unwrap();
    assert_eq!(orders.unreleased().len(), 2);
    // The rest (made at 400, 600 ... 900; 500 is paid) come due later.
    assert_eq!(orders.expire_due(u64::MAX).await.unwrap(), 5);
    assert_eq!(orders.unreleased().len(), 7);
    assert_eq!(
        orders.get("inv-0-3").unwrap().status,
        OrderStatus::Paid,
        "paid orders never expire"
    );
}
