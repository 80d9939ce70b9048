//! The inventory's invariants under concurrency, across restarts, and on retries.

use std::collections::HashSet;
use std::sync::Arc;

use keel_seckill::{Inventory, Refusal};
use keel_store::{JournalOptions, SyncPolicy};

fn open(dir: &std::path::Path) -> Inventory {
    Inventory::open(dir, JournalOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_buyers_for_a_hundred_units_never_oversell() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = Arc::new(
        Inventory::open(
            dir.path(),
            JournalOptions {
                sync: SyncPolicy::Never,
                ..JournalOptions::default()
            },
        )
        .unwrap(),
    );
    inventory
        .create_item("phone", vec![25, 25, 25, 25], 1)
        .await
        .unwrap();
    let buyers: Vec<_> = (0..1000)
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
    let mut sold_out = 0;
    for b in buyers {
        match b.await.unwrap() {
            Ok(r) => sold.push(r),
            Err(Refusal::SoldOut) => sold_out += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sold.len(), 100);
    assert_eq!(sold_out, 900);
    let ids: HashSet<u64> = sold.iter().map(|r| r.reservation_id).collect();
    assert_eq!(ids.len(), 100, "every unit went to one reservation");
    // The buckets were all used, each exactly to its size.
    for bucket in 0..4 {
        assert_eq!(sold.iter().filter(|r| r.bucket == bucket).count(), 25);
    }
    let stock = inventory.stock("phone").unwrap();
    assert_eq!((stock.initial, stock.left, stock.reserved), (100, 0, 100));
    assert!(inventory.is_sold_out("phone"));
}

#[tokio::test]
async fn the_per_user_limit_holds_and_a_release_frees_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = open(dir.path());
    inventory.create_item("tv", vec![10], 2).await.unwrap();
    let mut kept = Vec::new();
    for n in 0..5 {
        let answer = inventory
            .reserve("tv", "ann", &format!("r{n}"))
            .await
            .unwrap();
        match n {
            0 | 1 => kept.push(answer.unwrap()),
            _ => assert_eq!(answer, Err(Refusal::LimitReached)),
        }
    }
    assert!(
        inventory
            .release(kept[0].reservation_id, "ann")
            .await
            .unwrap()
    );
    assert!(
        !inventory
            .release(kept[0].reservation_id, "ann")
            .await
            .unwrap(),
        "once only"
    );
    assert!(inventory.reserve("tv", "ann", "r9").await.unwrap().is_ok());
    assert_eq!(
        inventory.reserve("nothing", "ann", "r1").await.unwrap(),
        Err(Refusal::NotFound)
    );
    let stock = inventory.stock("tv").unwrap();
    assert_eq!((stock.left, stock.reserved), (8, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_request_gets_the_same_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = Arc::new(open(dir.path()));
    inventory.create_item("shoe", vec![3], 5).await.unwrap();
    // The same request sent 50 times at once: one unit, one reservation id.
    let tries: Vec<_> = (0..50)
        .map(|_| {
            let inventory = inventory.clone();
            tokio::spawn(async move { inventory.reserve("shoe", "bo", "req-7").await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tries {
        ids.insert(t.await.unwrap().unwrap().reservation_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(inventory.stock("shoe").unwrap().left, 2);
    // Sent again later, also after the item sold out: the same answer.
    inventory.reserve("shoe", "cy", "a").await.unwrap().unwrap();
    inventory.reserve("shoe", "di", "a").await.unwrap().unwrap();
    assert!(inventory.is_sold_out("shoe"));
    let again = inventory
        .reserve("shoe", "bo", "req-7")
        .await
        .unwrap()
        .unwrap();
    assert!(ids.contains(&again.reservation_id));
}

#[tokio::test]
async fn reservations_survive_a_restart_and_ids_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, released) = {
        let inventory = open(dir.path());
        inventory.create_item("bag", vec![2, 2], 1).await.unwrap();
        let a = inventory.reserve("bag", "u1", "x").await.unwrap().unwrap();
        let b = inventory.reserve("bag", "u2", "x").await.unwrap().unwrap();
        assert!(inventory.release(b.reservation_id, "u2").await.unwrap());
        (a, b)
    };
    let inventory = open(dir.path());
    let stock = inventory.stock("bag").unwrap();
    assert_eq!((stock.initial, stock.left, stock.reserved), (4, 3, 1));
    assert_eq!(
        inventory.reservation(first.reservation_id),
        Some(first.clone())
    );
    assert_eq!(inventory.reservation(released.reservation_id), None);
    // The same request after the restart: the same reservation; u1 is at its limit.
    let again = inventory.reserve("bag", "u1", "x").await.unwrap().unwrap();
    assert_eq!(again, first);
    assert_eq!(
        inventory.reserve("bag", "u1", "y").await.unwrap(),
        Err(Refusal::LimitReached)
    );
    let next = inventory.reserve("bag", "u3", "x").await.unwrap().unwrap();
    assert!(next.reservation_id > released.reservation_id);
    // Creating the item again: the same settings are accepted, others refused.
    inventory.create_item("bag", vec![2, 2], 1).await.unwrap();
    assert!(inventory.create_item("bag", vec![9], 1).await.is_err());
}

#[tokio::test]
async fn a_paid_reservation_is_never_released_and_only_its_buyer_releases_one() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = open(dir.path());
    inventory.create_item("car", vec![2], 1).await.unwrap();
    let paid = inventory.reserve("car", "ann", "r").await.unwrap().unwrap();
    let unpaid = inventory.reserve("car", "bob", "r").await.unwrap().unwrap();
    assert!(inventory.commit(paid.reservation_id).await.unwrap());
    assert!(
        inventory.commit(paid.reservation_id).await.unwrap(),
        "again: same answer"
    );
    assert!(!inventory.release(paid.reservation_id, "ann").await.unwrap());
    assert!(
        !inventory
            .release(unpaid.reservation_id, "ann")
            .await
            .unwrap(),
        "not ann's"
    );
    assert!(
        inventory
            .release(unpaid.reservation_id, "bob")
            .await
            .unwrap()
    );
    assert!(
        !inventory.commit(unpaid.reservation_id).await.unwrap(),
        "released: too late"
    );
    assert_eq!(inventory.stock("car").unwrap().left, 1);
    // Bob's request sent again after its release: the same (released) reservation, not a
    // second unit.
    let again = inventory.reserve("car", "bob", "r").await.unwrap().unwrap();
    assert_eq!(again, unpaid);
    assert_eq!(inventory.stock("car").unwrap().left, 1);
    assert_eq!(
        inventory.reservation(unpaid.reservation_id),
        None,
        "not live"
    );
    // All of it after a restart.
    drop(inventory);
    let inventory = open(dir.path());
    assert!(!inventory.release(paid.reservation_id, "ann").await.unwrap());
    assert_eq!(inventory.stock("car").unwrap().left, 1);
    assert!(
        inventory
            .create_item("huge", vec![u64::MAX, 1], 1)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn transfers_move_units_once_and_survive_a_restart() {
    let (giver_dir, taker_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (giver, taker) = (open(giver_dir.path()), open(taker_dir.path()));
    giver.create_item("lamp", vec![3, 2], 1).await.unwrap();
    taker.create_item("lamp", vec![1], 1).await.unwrap();
    taker.reserve("lamp", "ann", "r").await.unwrap().unwrap();
    assert_eq!(
        taker.reserve("lamp", "bob", "r").await.unwrap(),
        Err(Refusal::SoldOut)
    );
    // The holders: every request that got a unit (refusals are not remembered).
    assert_eq!(
        taker.holders("lamp", 10),
        Some(vec![("ann".to_owned(), "r".to_owned())])
    );
    assert_eq!(taker.holders("lamp", 0), None, "more than the limit");
    assert_eq!(taker.holders("nope", 10), None);
    // Out of the giver: at most what it has; the same id, the same answer, nothing twice.
    assert_eq!(giver.transfer_out("lamp", "t1", 4).await.unwrap(), Some(4));
    assert_eq!(giver.transfer_out("lamp", "t1", 4).await.unwrap(), Some(4));
    assert_eq!(giver.stock("lamp").unwrap().left, 1);
    assert_eq!(giver.transfer_out("lamp", "t2", 9).await.unwrap(), Some(1));
    assert!(giver.is_sold_out("lamp"));
    assert_eq!(giver.transfer_out("lamp", "t3", 9).await.unwrap(), Some(0));
    assert_eq!(giver.transfer_out("nope", "t4", 1).await.unwrap(), None);
    // Into the taker: once per id; it sells again.
    assert!(taker.transfer_in("lamp", "t1", 4).await.unwrap());
    assert!(taker.transfer_in("lamp", "t1", 4).await.unwrap());
    assert!(!taker.is_sold_out("lamp"));
    assert_eq!(taker.stock("lamp").unwrap().left, 4);
    assert!(taker.reserve("lamp", "bob", "r").await.unwrap().is_ok());
    // A release at the giver puts its unit back there, as before.
    drop((giver, taker));
    let (giver, taker) = (open(giver_dir.path()), open(taker_dir.path()));
    assert_eq!(giver.stock("lamp").unwrap().left, 0);
    assert_eq!(taker.stock("lamp").unwrap().left, 3);
    // Replayed, the ids are still known.
    assert_eq!(giver.transfer_out("lamp", "t1", 4).await.unwrap(), Some(4));
    assert!(taker.transfer_in("lamp", "t1", 4).await.unwrap());
    assert_eq!(taker.stock("lamp").unwrap().left, 3);
}

#[tokio::test]
async fn the_catalog_remembers_unfinished_transfers_across_a_restart() {
    use keel_seckill::api::{Catalog, Transfer};
    let dir = tempfile::tempdir().unwrap();
    let transfer = |id: &str| Transfer {
        id: id.into(),
        item_id: "lamp".into(),
        from: "inv-1".into(),
        to: "inv-0".into(),
        units: 3,
    };
    {
        let catalog = Catalog::open(dir.path()).unwrap();
        catalog.begin_transfer(&transfer("t1")).await.unwrap();
        catalog.begin_transfer(&transfer("t2")).await.unwrap();
        catalog.end_transfer("t1").await.unwrap();
    }
    // Reopened (as after a crash): t2 is to be finished, t1 is done.
    let catalog = Catalog::open(dir.path()).unwrap();
    assert_eq!(catalog.pending_transfers(), vec![transfer("t2")]);
    catalog.end_transfer("t2").await.unwrap();
    drop(catalog);
    assert!(
        Catalog::open(dir.path())
            .unwrap()
            .pending_transfers()
            .is_empty()
    );
}
