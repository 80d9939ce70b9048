//! The sale's HTTP contract, against real inventory, orders and API processes: every status
//! the contract names, and the audit balancing at the end.

mod common;

use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

use common::call;

struct Sale {
    procs: Vec<Child>,
    api: String,
    _dir: tempfile::TempDir,
}

impl Drop for Sale {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn sale(payment_window_ms: u64) -> Sale {
    let dir = tempfile::tempdir().unwrap();
    let (inventory, inventory_addr) = common::start_inventory(&dir.path().join("inv"));
    let orders_dir = dir.path().join("orders");
    let (orders, orders_addr) =
        common::start_orders(&orders_dir, &inventory_addr, payment_window_ms);
    let catalog_dir = dir.path().join("catalog");
    let (api, api_addr) = common::start(
        &[
            "api",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            catalog_dir.to_str().unwrap(),
            "--inventory",
            &format!("inv-0={inventory_addr}"),
            "--orders",
            &format!("inv-0={orders_addr}"),
            "--buckets",
            "4",
        ],
        "api on",
    );
    Sale {
        procs: vec![inventory, orders, api],
        api: api_addr,
        _dir: dir,
    }
}

#[test]
fn every_status_of_the_contract() {
    let sale = sale(1_500);
    let api = sale.api.as_str();
    // Creating items: admin only, validated.
    let item = json!({"name": "Phone", "price_cents": 49_900, "stock": 3, "per_user_limit": 1});
    assert_eq!(
        call(api, "POST", "/api/admin/items", false, Some(item.clone())).0,
        401
    );
    assert_eq!(
        call(
            api,
            "POST",
            "/api/admin/items",
            true,
            Some(json!({"name": ""}))
        )
        .0,
        400
    );
    let (status, created) = call(api, "POST", "/api/admin/items", true, Some(item));
    assert_eq!(status, 201);
    let id = created["item_id"].as_str().unwrap().to_owned();
    let later =
        json!({"name": "Later", "price_cents": 1, "stock": 1, "starts_at": "2099-01-01T00:00:00Z"});
    let (_, upcoming) = call(api, "POST", "/api/admin/items", true, Some(later));
    let upcoming = upcoming["item_id"].as_str().unwrap().to_owned();

    // Reading items.
    let (status, items) = call(api, "GET", "/api/items", false, None);
    assert_eq!(status, 200);
    assert_eq!(items.as_array().unwrap().len(), 2);
    let (_, one) = call(api, "GET", &format!("/api/items/{id}"), false, None);
    assert_eq!(
        (one["stock_left"].as_u64(), one["status"].as_str()),
        (Some(3), Some("on_sale"))
    );
    assert_eq!(one["price_cents"], 49_900);
    let (_, not_yet) = call(api, "GET", &format!("/api/items/{upcoming}"), false, None);
    assert_eq!(not_yet["status"], "upcoming");
    assert_eq!(call(api, "GET", "/api/items/nope", false, None).0, 404);

    // Buying.
    let buy = |user: &str, request: Option<&str>| {
        let mut body = json!({ "user_id": user });
        if let Some(r) = request {
            body["request_id"] = json!(r);
        }
        call(
            api,
            "POST",
            &format!("/api/items/{id}/buy"),
            false,
            Some(body),
        )
    };
    let (status, ann) = buy("ann", Some("a1"));
    assert_eq!(status, 200);
    assert_eq!(ann["status"], "pending_payment");
    let ann_order = ann["order_id"].as_str().unwrap().to_owned();
    // Readable at once, and the same answer for the same request.
    let (status, order) = call(api, "GET", &format!("/api/orders/{ann_order}"), false, None);
    assert_eq!((status, order["user_id"].as_str()), (200, Some("ann")));
    assert_eq!(buy("ann", Some("a1")).1["order_id"], ann_order.as_str());
    assert_eq!(buy("ann", Some("a2")), (409, buy("ann", Some("a3")).1));
    assert_eq!(buy("ann", Some("a4")).1["error"], "limit_reached");
    // The gateway limits buyers by X-User-Id: a header naming someone else than the body is
    // refused, so rotating it does not get around the limit.
    let raw = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(api).unwrap();
        let body = r#"{"user_id": "ann"}"#;
        write!(
            s,
            "POST /api/items/{id}/buy HTTP/1.1\r\nHost: x\r\nX-User-Id: not-ann\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("invalid_request"), "{raw}");
    assert_eq!(
        call(
            api,
            "POST",
            &format!("/api/items/{id}/buy"),
            false,
            Some(json!({}))
        )
        .0,
        400
    );
    let bad = call(api, "POST", &format!("/api/items/{id}/buy"), false, None);
    assert_eq!(
        (bad.0, bad.1["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(
        call(
            api,
            "POST",
            "/api/items/nope/buy",
            false,
            Some(json!({"user_id": "x"}))
        )
        .0,
        404
    );
    let early = call(
        api,
        "POST",
        &format!("/api/items/{upcoming}/buy"),
        false,
        Some(json!({"user_id": "x"})),
    );
    assert_eq!(
        (early.0, early.1["error"].as_str()),
        (403, Some("not_started"))
    );
    let (_, bob) = buy("bob", None);
    let bob_order = bob["order_id"].as_str().unwrap().to_owned();
    assert_eq!(buy("cy", None).0, 200);
    let sold_out = buy("dee", None);
    assert_eq!(
        (sold_out.0, sold_out.1["error"].as_str()),
        (409, Some("sold_out"))
    );
    // While sold out, the API answers new requests itself (it has learned the shard's
    // holders), and a retry of a request that holds a unit still gets its order.
    for i in 0..3 {
        let again = buy("dee", Some(&format!("d{i}")));
        assert_eq!(again.1["error"], "sold_out");
    }
    assert_eq!(buy("ann", Some("a1")).1["order_id"], ann_order.as_str());

    // Paying and shipping.
    let pay = |order: &str, user: &str| {
        call(
            api,
            "POST",
            &format!("/api/orders/{order}/pay"),
            false,
            Some(json!({"user_id": user})),
        )
    };
    assert_eq!(pay(&ann_order, "bob").0, 403);
    let (status, paid) = pay(&ann_order, "ann");
    assert_eq!((status, paid["status"].as_str()), (200, Some("paid")));
    assert_eq!(
        call(
            api,
            "POST",
            &format!("/api/admin/orders/{bob_order}/ship"),
            true,
            None
        )
        .0,
        409
    );
    let (status, shipped) = call(
        api,
        "POST",
        &format!("/api/admin/orders/{ann_order}/ship"),
        true,
        None,
    );
    assert_eq!((status, shipped["status"].as_str()), (200, Some("shipped")));
    let (_, mine) = call(api, "GET", "/api/users/ann/orders", false, None);
    assert_eq!(mine[0]["status"], "shipped");

    // Bob and Cy do not pay: after the window their orders expire and the units return.
    std::thread::sleep(Duration::from_millis(2_000));
    let late = pay(&bob_order, "bob");
    assert_eq!((late.0, late.1["error"].as_str()), (409, Some("expired")));
    let mut audit = Value::Null;
    for _ in 0..50 {
        audit = call(
            api,
            "GET",
            &format!("/api/admin/items/{id}/audit"),
            true,
            None,
        )
        .1;
        if audit["stock_left"] == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(audit["initial_stock"], 3);
    assert_eq!(audit["stock_left"], 2);
    assert_eq!(audit["queue_backlog"], 0);
    let by = &audit["orders_by_status"];
    let count = |s: &str| by[s].as_u64().unwrap_or(0);
    assert_eq!((count("shipped"), count("expired")), (1, 2));
    // The audit balances: stock left + pending + paid + shipped = initial stock.
    assert_eq!(
        audit["stock_left"].as_u64().unwrap()
            + count("pending_payment")
            + count("paid")
            + count("shipped"),
        3
    );
    assert_eq!(
        call(
            api,
            "GET",
            &format!("/api/admin/items/{id}/audit"),
            false,
            None
        )
        .0,
        401
    );
    assert_eq!(
        call(api, "GET", "/api/orders/inv-0-999", false, None).0,
        404
    );
}
