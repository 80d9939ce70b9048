//! The inventory's journal as the orders' outbox: every acknowledged reservation gets exactly
//! one order, while buyers buy, and across restarts of the order book at any point.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_seckill::orders::{order_id, pump};
use keel_seckill::{Inventory, Orders, Refusal};
use keel_store::JournalOptions;

const SOURCE: &str = "inv-0";

fn open_orders(dir: &std::path::Path) -> Orders {
    Orders::open(dir.join("orders"), JournalOptions::default(), 60_000).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_reservation_gets_exactly_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let inventory =
        Arc::new(Inventory::open(dir.path().join("inventory"), JournalOptions::default()).unwrap());
    inventory.create_item("gpu", vec![50; 4], 1).await.unwrap();
    let orders = Arc::new(open_orders(dir.path()));

    // The pump runs while 8 buyers go for 200 units.
    let stop = Arc::new(AtomicBool::new(false));
    let pumping = {
        let (inventory, orders, stop) = (inventory.clone(), orders.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if pump(&*inventory, SOURCE, &orders, 0, 16).await.unwrap() == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    let buyers: Vec<_> = (0..8)
        .map(|w| {
            let inventory = inventory.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..40 {
                    match inventory
                        .reserve("gpu", &format!("w{w}-{n}"), "r")
                        .await
                        .unwrap()
                    {
                        Ok(r) => acked.push(r.reservation_id),
                        Err(Refusal::SoldOut) => break,
                        Err(other) => panic!("{other:?}"),
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for b in buyers {
        acked.extend(b.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    pumping.await.unwrap();
    while pump(&*inventory, SOURCE, &orders, 0, 16).await.unwrap() > 0 {}

    assert_eq!(acked.len(), 200);
    for id in &acked {
        assert!(
            orders.get(&order_id(SOURCE, *id)).is_some(),
            "reservation {id} has no order"
        );
    }
    assert_eq!(orders.counts().values().sum::<usize>(), 200);
    assert_eq!(orders.cursor(SOURCE), *acked.iter().max().unwrap());
}

#[tokio::test]
async fn a_crash_between_making_orders_and_saving_the_position_makes_no_second_order() {
    let dir = tempfile::tempdir().unwrap();
    let inventory =
        Inventory::open(dir.path().join("inventory"), JournalOptions::default()).unwrap();
    inventory.create_item("tea", vec![30], 1).await.unwrap();
    for n in 0..20 {
        inventory
            .reserve("tea", &format!("u{n}"), "r")
            .await
            .unwrap()
            .unwrap();
    }
    {
        // Orders made for the first 10, the position never saved: a crash.
        let orders = open_orders(dir.path());
        for r in inventory.reservations_after(0, 10).await.unwrap() {
            orders
                .create(SOURCE, r.reservation_id, &r.item_id, &r.user_id, 0)
                .await
                .unwrap();
        }
        assert_eq!(orders.cursor(SOURCE), 0);
    }
    let orders = open_orders(dir.path());
    assert_eq!(pump(&inventory, SOURCE, &orders, 0, 8).await.unwrap(), 8);
    {
        // Restarted again, mid-way.
        drop(orders);
    }
    let orders = open_orders(dir.path());
    assert_eq!(orders.cursor(SOURCE), 8);
    while pump(&inventory, SOURCE, &orders, 0, 8).await.unwrap() > 0 {}
    assert_eq!(orders.counts().values().sum::<usize>(), 20);
    assert_eq!(orders.cursor(SOURCE), 20);
    // New reservations keep flowing.
    inventory
        .reserve("tea", "late", "r")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pump(&inventory, SOURCE, &orders, 0, 8).await.unwrap(), 1);
    assert_eq!(orders.counts().values().sum::<usize>(), 21);
}
