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

/// The admin lists every item and takes items down: one nobody reserved is dropped, one with
/// orders is hidden (gone from the storefront, its orders still readable); bad fields are
/// refused naming the field and its rule.
#[test]
fn the_admin_lists_and_takes_down_items_and_bad_fields_are_named() {
    let sale = sale(60_000);
    let api = &sale.api;
    let create = |name: &str| {
        let (status, created) = call(
            api,
            "POST",
            "/api/admin/items",
            true,
            Some(json!({"name": name, "price_cents": 100, "stock": 5})),
        );
        assert_eq!(status, 201, "{created}");
        created["item_id"].as_str().unwrap().to_owned()
    };
    let unsold = create("nobody buys this");
    let sold = create("somebody buys this");
    let (status, bought) = call(
        api,
        "POST",
        &format!("/api/items/{sold}/buy"),
        false,
        Some(json!({"user_id": "u1", "request_id": "r1"})),
    );
    assert_eq!(status, 200, "{bought}");
    let order = bought["order_id"].as_str().unwrap().to_owned();

    let (status, listed) = call(api, "GET", "/api/admin/items", false, None);
    assert_eq!(status, 401, "{listed}");
    let (status, listed) = call(api, "GET", "/api/admin/items", true, None);
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(listed[0]["hidden"], false);

    let (status, gone) = call(
        api,
        "DELETE",
        &format!("/api/admin/items/{unsold}"),
        true,
        None,
    );
    assert_eq!(status, 200, "{gone}");
    assert_eq!(
        (gone["hidden"].clone(), gone["removed"].clone()),
        (json!(true), json!(true))
    );
    let (status, kept) = call(
        api,
        "DELETE",
        &format!("/api/admin/items/{sold}"),
        true,
        None,
    );
    assert_eq!(status, 200, "{kept}");
    assert_eq!(
        (kept["hidden"].clone(), kept["removed"].clone()),
        (json!(true), json!(false))
    );

    // Out of the storefront, and not for sale...
    let (_, shown) = call(api, "GET", "/api/items", false, None);
    assert_eq!(shown, json!([]));
    let (status, _) = call(api, "GET", &format!("/api/items/{sold}"), false, None);
    assert_eq!(status, 404);
    let (status, _) = call(
        api,
        "POST",
        &format!("/api/items/{sold}/buy"),
        false,
        Some(json!({"user_id": "u2"})),
    );
    assert_eq!(status, 404);
    // ...while its order stays, and the admin still sees the hidden item.
    let (status, _) = call(api, "GET", &format!("/api/orders/{order}"), false, None);
    assert_eq!(status, 200);
    let (_, listed) = call(api, "GET", "/api/admin/items", true, None);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["item_id"], sold.as_str());
    assert_eq!(listed[0]["hidden"], true);

    // Validation names the field and the rule.
    let refused = [
        (
            json!({"name": "x", "price_cents": -1, "stock": 1}),
            "price_cents must be a whole number from 0",
        ),
        (json!({"name": "x", "stock": 1}), "price_cents is needed"),
        (
            json!({"name": "x", "price_cents": 1, "stock": 0}),
            "stock must be a whole number from 1 to 100000000, not 0",
        ),
        (
            json!({"name": "", "price_cents": 1, "stock": 1}),
            "name must be a text of 1 to 200 characters",
        ),
        (json!({"price_cents": 1, "stock": 1}), "name is needed"),
        (
            json!({"name": "x", "price_cents": 1, "stock": 1, "per_user_limit": 0}),
            "per_user_limit must be a whole number from 1 to 1000",
        ),
        (
            json!({"name": "x", "price_cents": 1, "stock": 1, "starts_at": 5}),
            "starts_at must be an RFC 3339 time",
        ),
    ];
    for (body, want) in refused {
        let (status, answer) = call(api, "POST", "/api/admin/items", true, Some(body.clone()));
        assert_eq!(status, 400, "{body}");
        let detail = answer["detail"].as_str().unwrap_or("");
        assert!(detail.contains(want), "{body}: {detail}");
    }
}

/// The API's port serves `/health`, `/status` and `/metrics`, and the metrics count the
/// sale's business: buys by outcome, units left, orders by status, reservation latency.
#[test]
fn the_api_port_reports_health_status_and_the_sales_metrics() {
    let sale = sale(60_000);
    let api = &sale.api;
    let (status, health) = call(api, "GET", "/health", false, None);
    assert_eq!((status, health), (200, json!({"status": "serving"})));
    let (status, created) = call(
        api,
        "POST",
        "/api/admin/items",
        true,
        Some(json!({"name": "one", "price_cents": 100, "stock": 1})),
    );
    assert_eq!(status, 201);
    let item = created["item_id"].as_str().unwrap().to_owned();
    let buy = |user: &str| {
        call(
            api,
            "POST",
            &format!("/api/items/{item}/buy"),
            false,
            Some(json!({"user_id": user})),
        )
        .0
    };
    assert_eq!(buy("u1"), 200);
    assert_eq!(buy("u2"), 409);
    let (status, status_page) = call(api, "GET", "/status", false, None);
    assert_eq!(status, 200);
    assert_eq!(status_page["buys"]["ok"], 1, "{status_page}");
    assert_eq!(status_page["buys"]["sold_out"], 1, "{status_page}");
    assert_eq!(status_page["items"], 1);

    let metrics = || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(api).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    // The order is taken in by the orders service a moment after the buy.
    let mut text = metrics();
    for _ in 0..50 {
        if text.contains("status=\"pending_payment\"} 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        text = metrics();
    }
    for line in [
        "keel_sale_buys_total{outcome=\"ok\"} 1".to_owned(),
        "keel_sale_buys_total{outcome=\"sold_out\"} 1".to_owned(),
        format!("keel_sale_stock_left{{item=\"{item}\"}} 0"),
        format!("keel_sale_orders{{item=\"{item}\",status=\"pending_payment\"}} 1"),
        "keel_sale_scrape_errors_total 0".to_owned(),
    ] {
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    assert!(
        text.lines().any(
            |l| l.starts_with("keel_sale_reservation_duration_seconds_count") && !l.ends_with(" 0")
        ),
        "{text}"
    );
}
