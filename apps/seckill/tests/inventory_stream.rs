//! The inventory with its journal in a JetStream stream (the NATS server on 127.0.0.1:4222,
//! or `KEEL_NATS_URL`): what a restart and a change of owner do. Skipped with a message when
//! no server answers, failed instead when `KEEL_REQUIRE_SERVICES=1`.

use std::sync::Arc;

use keel_seckill::{Inventory, InventoryError, Refusal};
use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream};
use keel_store::{LogTarget, StoreError, StreamOptions};

/// The test's own stream, deleted when dropped (also when the test fails).
struct Stream {
    options: StreamOptions,
    _delete: DeleteStreams,
}

impl Stream {
    fn new(prefix: &str) -> Stream {
        let name = unique_stream(prefix);
        Stream {
            options: StreamOptions::parse(&nats_url(), name.clone()).unwrap(),
            _delete: DeleteStreams::new(vec![name]),
        }
    }

    fn target(&self) -> LogTarget {
        LogTarget::Stream(self.options.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_on_a_stream_comes_back_whole_after_a_restart() {
    if !nats_up("an_inventory_on_a_stream_comes_back_whole_after_a_restart") {
        return;
    }
    let stream = Stream::new("inv-restart");
    let inventory = Arc::new(Inventory::open_at(stream.target()).await.unwrap());
    inventory
        .create_item("phone", vec![10, 10], 1)
        .await
        .unwrap();
    let buyers: Vec<_> = (0..60)
        .map(|u| {
            let inventory = inventory.clone();
            tokio::spawn(async move {
                inventory
                    .reserve("phone", &format!("user-{u}"), "r1")
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut sold = Vec::new();
    for b in buyers {
        if let Ok(r) = b.await.unwrap() {
            sold.push(r);
        }
    }
    assert_eq!(sold.len(), 20);
    let released = &sold[0];
    assert!(
        inventory
            .release(released.reservation_id, &released.user_id)
            .await
            .unwrap()
    );
    drop(inventory);

    let again = Inventory::open_at(stream.target()).await.unwrap();
    let stock = again.stock("phone").unwrap();
    assert_eq!((stock.initial, stock.left, stock.reserved), (20, 1, 19));
    // A retried request gets its reservation from the replayed stream.
    let retry = &sold[5];
    let answer = again
        .reserve("phone", &retry.user_id, "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, *retry);
    // The unit released before the restart sells once more, then the item is sold out.
    assert!(again.reserve("phone", "late", "r1").await.unwrap().is_ok());
    assert_eq!(
        again.reserve("phone", "later", "r1").await.unwrap(),
        Err(Refusal::SoldOut)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_owner_cannot_sell_and_nothing_is_sold_twice() {
    if !nats_up("a_replaced_owner_cannot_sell_and_nothing_is_sold_twice") {
        return;
    }
    let stream = Stream::new("inv-owner");
    let old = Inventory::open_at(stream.target()).await.unwrap();
    old.create_item("phone", vec![5], 1).await.unwrap();
    for u in 0..3 {
        old.reserve("phone", &format!("old-{u}"), "r")
            .await
            .unwrap()
            .unwrap();
    }
    // A new owner takes over (as after an election): it replays the three sales.
    let new = Inventory::open_at(stream.target()).await.unwrap();
    assert_eq!(new.stock("phone").unwrap().left, 2);
    new.reserve("phone", "new-0", "r").await.unwrap().unwrap();

    // The old owner still believes two units are left; the stream refuses its sale, and the
    // buyer gets an error, not a unit.
    match old.reserve("phone", "old-3", "r").await {
        Err(InventoryError::Journal(StoreError::Fenced { .. })) => {}
        other => panic!("a replaced owner must not sell, got {other:?}"),
    }
    assert!(matches!(
        old.reserve("phone", "old-4", "r").await,
        Err(InventoryError::Failed) | Err(InventoryError::Journal(_))
    ));
    new.reserve("phone", "new-1", "r").await.unwrap().unwrap();
    assert_eq!(
        new.reserve("phone", "new-2", "r").await.unwrap(),
        Err(Refusal::SoldOut)
    );

    // What the stream holds is the new owner's view: five units, five buyers, none twice.
    let replayed = Inventory::open_at(stream.target()).await.unwrap();
    let stock = replayed.stock("phone").unwrap();
    assert_eq!((stock.initial, stock.left, stock.reserved), (5, 0, 5));
    let mut holders = replayed.holders("phone", 100).unwrap();
    holders.sort();
    let users: Vec<_> = holders.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["new-0", "new-1", "old-0", "old-1", "old-2"]);
}
