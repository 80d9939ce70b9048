//! An inventory process and an orders process working together: reservations become orders,
//! payment commits the unit, unpaid orders expire and their units come back.

mod common;

use std::time::Duration;

use keel_rpc::{Channel, ChannelConfig, Code};
use keel_seckill::proto::{
    AuditRequest, CreateItemRequest, GetOrderRequest, InventoryClient, OrdersClient, Outcome,
    PayRequest, ReleaseRequest, ReserveRequest, ShipRequest, StockRequest, UserOrdersRequest,
};

async fn channel(addr: &str) -> Channel {
    Channel::connect(addr.to_owned(), ChannelConfig::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_follow_reservations_payments_commit_and_expiries_return_stock() {
    let dir = tempfile::tempdir().unwrap();
    let (inventory_proc, inventory_addr) = common::start_inventory(&dir.path().join("inv"));
    let orders_dir = dir.path().join("orders");
    let (orders_proc, orders_addr) = common::start_orders(&orders_dir, &inventory_addr, 800);
    let _procs = common::Procs(vec![inventory_proc, orders_proc]);
    let inventory = InventoryClient::new(channel(&inventory_addr).await);
    let orders = OrdersClient::new(channel(&orders_addr).await);
    inventory
        .create_item(&CreateItemRequest {
            item_id: "watch".into(),
            buckets: vec![3],
            per_user_limit: 1,
        })
        .await
        .unwrap();
    let mut order_ids = Vec::new();
    for user in ["ann", "bob", "cy"] {
        let reply = inventory
            .reserve(&ReserveRequest {
                item_id: "watch".into(),
                user_id: user.into(),
                request_id: "r".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.outcome, Outcome::Reserved as i32);
        let id = reply.reservation.unwrap().reservation_id;
        order_ids.push(format!("inv-0-{id}"));
    }
    // The orders appear (taken in from the inventory's outbox).
    for id in &order_ids {
        let mut order = None;
        for _ in 0..100 {
            let reply = orders
                .get_order(&GetOrderRequest {
                    order_id: id.clone(),
                })
                .await
                .unwrap();
            if reply.found {
                order = reply.order;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(order.expect("the order appears").status, "pending_payment");
    }
    // Ann pays: the unit is committed, so not even a release for her can return it.
    let paid = orders
        .pay(&PayRequest {
            order_id: order_ids[0].clone(),
            user_id: "ann".into(),
        })
        .await
        .unwrap();
    assert_eq!(paid.order.unwrap().status, "paid");
    let wrong = orders
        .pay(&PayRequest {
            order_id: order_ids[1].clone(),
            user_id: "ann".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    let shipped = orders
        .ship(&ShipRequest {
            order_id: order_ids[0].clone(),
        })
        .await
        .unwrap();
    assert_eq!(shipped.order.unwrap().status, "shipped");
    let not_paid = orders
        .ship(&ShipRequest {
            order_id: order_ids[1].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_paid.code(), Code::FailedPrecondition);

    // Bob and Cy do not pay: their orders expire and both units come back.
    let mut stock = None;
    for _ in 0..100 {
        let s = inventory
            .stock(&StockRequest {
                item_id: "watch".into(),
            })
            .await
            .unwrap();
        if s.left == 2 {
            stock = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stock = stock.expect("the expired orders' units came back");
    assert_eq!((stock.left, stock.reserved), (2, 1));
    let late = orders
        .pay(&PayRequest {
            order_id: order_ids[1].clone(),
            user_id: "bob".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let bobs = orders
        .user_orders(&UserOrdersRequest {
            user_id: "bob".into(),
            inventory: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(bobs.orders[0].status, "expired");
    let audit = orders.audit(&AuditRequest::default()).await.unwrap();
    assert_eq!(audit.orders_by_status["shipped"], 1);
    assert_eq!(audit.orders_by_status["expired"], 2);
    assert_eq!(audit.positions["inv-0"], 3);
    // Ann's unit stays sold.
    let reply = inventory
        .release(&ReleaseRequest {
            reservation_id: 1,
            user_id: "ann".into(),
        })
        .await
        .unwrap();
    assert!(!reply.released);
}
