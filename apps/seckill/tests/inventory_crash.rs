//! kill -9 of an inventory process in the middle of a sale: after a restart on the same data
//! directory every acknowledged reservation is there (and in the outbox the orders read), and
//! selling on never goes past the stock.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_rpc::{Channel, ChannelConfig};
use keel_seckill::proto::{
    CreateItemRequest, GetReservationRequest, InventoryClient, Outcome, ReserveRequest,
    StockRequest,
};
use parking_lot::Mutex;

fn start(dir: &std::path::Path) -> (std::process::Child, String) {
    common::start_inventory(dir)
}

async fn client(addr: &str) -> InventoryClient<Channel> {
    InventoryClient::new(
        Channel::connect(addr.to_owned(), ChannelConfig::default())
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_sale_loses_no_acknowledged_reservation_and_never_oversells() {
    const STOCK: u64 = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path());
    let c = client(&addr).await;
    c.create_item(&CreateItemRequest {
        item_id: "hot".into(),
        buckets: vec![STOCK / 8; 8],
        per_user_limit: 1,
    })
    .await
    .unwrap();

    // Buyers until the process dies under them.
    let acked: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let mut buyers = Vec::new();
    for w in 0..16 {
        let (c, acked) = (c.clone(), acked.clone());
        buyers.push(tokio::spawn(async move {
            for n in 0..10_000 {
                let user = format!("w{w}-{n}");
                let request = ReserveRequest {
                    item_id: "hot".into(),
                    user_id: user.clone(),
                    request_id: "r".into(),
                };
                match c.reserve(&request).await {
                    Ok(reply) if reply.outcome == Outcome::Reserved as i32 => {
                        let id = reply.reservation.unwrap().reservation_id;
                        acked.lock().insert(id, user);
                    }
                    Ok(_) => return,  // sold out
                    Err(_) => return, // the process is gone
                }
            }
        }));
    }
    // Once the sale is well under way (or after 10 s at most), SIGKILL.
    for _ in 0..2_000 {
        if acked.lock().len() >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for b in buyers {
        b.await.unwrap();
    }
    let acked = acked.lock().clone();
    assert!(!acked.is_empty(), "the sale had started");
    assert!(
        acked.len() < STOCK as usize,
        "killed mid-sale, not after it"
    );

    // Restarted on the same directory: every acknowledged reservation is there.
    let (child, addr) = start(dir.path());
    let _procs = common::Procs(vec![child]);
    let c = client(&addr).await;
    for (id, user) in &acked {
        let found = c
            .get_reservation(&GetReservationRequest {
                reservation_id: *id,
            })
            .await
            .unwrap()
            .reservation
            .unwrap_or_else(|| panic!("acknowledged reservation {id} lost"));
        assert_eq!(&found.user_id, user);
    }
    // The outbox lists them all, so each will get its order.
    let orders_dir = tempfile::tempdir().unwrap();
    let orders = keel_seckill::Orders::open(
        orders_dir.path(),
        keel_store::JournalOptions::default(),
        60_000,
    )
    .unwrap();
    while keel_seckill::orders::pump(&c, "inv-0", &orders, 0, 500)
        .await
        .unwrap()
        > 0
    {}
    for id in acked.keys() {
        let order = keel_seckill::orders::order_id("inv-0", *id);
        assert!(orders.get(&order).is_some(), "no order for {id}");
    }
    let stock = c
        .stock(&StockRequest {
            item_id: "hot".into(),
        })
        .await
        .unwrap();
    assert_eq!(stock.initial, STOCK);
    assert!(stock.reserved >= acked.len() as u64);
    assert_eq!(stock.left + stock.reserved, STOCK);

    // Selling on, 16 buyers at a time: exactly the rest goes, never more.
    let mut late = Vec::new();
    for w in 0..16 {
        let c = c.clone();
        late.push(tokio::spawn(async move {
            let mut sold = 0u64;
            for n in 0.. {
                let reply = c
                    .reserve(&ReserveRequest {
                        item_id: "hot".into(),
                        user_id: format!("late-{w}-{n}"),
                        request_id: "r".into(),
                    })
                    .await
                    .unwrap();
                if reply.outcome != Outcome::Reserved as i32 {
                    return sold;
                }
                sold += 1;
            }
            sold
        }));
    }
    let mut sold_after = 0u64;
    for t in late {
        sold_after += t.await.unwrap();
    }
    assert_eq!(sold_after, stock.left);
    let end = c
        .stock(&StockRequest {
            item_id: "hot".into(),
        })
        .await
        .unwrap();
    assert_eq!((end.left, end.reserved, end.sold_out), (0, STOCK, true));
}
