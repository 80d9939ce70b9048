//! The sale over two shards, found through a real Keel registry: each item's stock split
//! between two inventory processes, followed by one orders process, behind one API that
//! knows only shard names. Hundreds of concurrent buyers, a SIGKILLed inventory restarted on
//! another port (found again through the registry), the audit balancing, and the units of
//! unpaid orders coming back — announced through the registry, so the catalog's cached figure
//! (kept for a minute) shows them at once.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{Procs, call, registry, start};
use serde_json::{Value, json};

fn inventory(dir: &std::path::Path, shard: &str, registry: &str) -> std::process::Child {
    common::start_inventory_with(
        &dir.join(shard),
        &["--shard", shard, "--registry", registry],
    )
    .0
}

fn buy(api: &str, item: &str, user: &str) -> (u16, Value) {
    call(
        api,
        "POST",
        &format!("/api/items/{item}/buy"),
        false,
        Some(json!({ "user_id": user, "request_id": format!("{user}-r") })),
    )
}

#[test]
fn two_shards_found_through_the_registry_never_oversell_and_balance() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let registry = registry(&rt);
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    for shard in ["inv-0", "inv-1"] {
        procs.0.push(inventory(dir.path(), shard, &registry));
    }
    // One orders process follows both shards (fewer orders instances than shards): the
    // audit and the order lists must still count each order once.
    let orders_dir = dir.path().join("orders");
    procs.0.push(
        start(
            &[
                "orders",
                "--addr",
                "127.0.0.1:0",
                "--data-dir",
                orders_dir.to_str().unwrap(),
                "--inventory",
                "inv-0",
                "--inventory",
                "inv-1",
                "--registry",
                &registry,
                "--payment-window-ms",
                "5000",
                "--sweep-ms",
                "50",
            ],
            "orders on",
        )
        .0,
    );
    let catalog = dir.path().join("catalog");
    // The catalog cache's shared tier on the real Redis, when there is one.
    let mut cache = vec![];
    if std::net::TcpStream::connect("127.0.0.1:6379").is_ok() {
        cache = vec!["--cache-redis", "redis://127.0.0.1:6379/"];
    } else {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "Redis at 127.0.0.1:6379 is needed (KEEL_REQUIRE_SERVICES=1)"
        );
        eprintln!("no Redis at 127.0.0.1:6379: the catalog cache runs without its shared tier");
    }
    let (api_proc, api) = start(
        &[
            "api",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            catalog.to_str().unwrap(),
            "--inventory",
            "inv-0",
            "--inventory",
            "inv-1",
            "--registry",
            &registry,
            "--cache-ttl-ms",
            "60000",
        ]
        .into_iter()
        .chain(cache)
        .collect::<Vec<_>>(),
        "api on",
    );
    procs.0.push(api_proc);

    let stock = 100;
    let (status, created) = call(
        &api,
        "POST",
        "/api/admin/items",
        true,
        Some(json!({"name": "Console", "price_cents": 39_900, "stock": stock})),
    );
    assert_eq!(status, 201, "{created}");
    let item = created["item_id"].as_str().unwrap().to_owned();
    // Read once, so the stock figure is cached (for a minute).
    let (_, view) = call(&api, "GET", &format!("/api/items/{item}"), false, None);
    assert_eq!(view["stock_left"], stock as u64);

    // 400 buyers at once, 16 threads: exactly the stock is sold, spread over both shards.
    let users: Vec<String> = (0..400).map(|i| format!("u{i}")).collect();
    let results: Vec<(String, u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = users
            .chunks(25)
            .map(|chunk| {
                let (api, item) = (&api, &item);
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|u| {
                            let (status, body) = buy(api, item, u);
                            (u.clone(), status, body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let won: Vec<&(String, u16, Value)> = results.iter().filter(|r| r.1 == 200).collect();
    let refused = results
        .iter()
        .filter(|r| r.1 == 409 && r.2["error"] == "sold_out")
        .count();
    assert!(won.len() <= stock, "oversold: {} of {stock}", won.len());
    assert_eq!(
        won.len() + refused,
        users.len(),
        "every answer is 200 or sold_out"
    );
    let per_shard = won.iter().fold(BTreeMap::<&str, usize>::new(), |mut m, w| {
        let id = w.2["order_id"].as_str().unwrap();
        *m.entry(id.rsplit_once('-').unwrap().0).or_default() += 1;
        m
    });
    assert_eq!(per_shard.len(), 2, "both shards sell: {per_shard:?}");
    // The purchases invalidated the cached figure.
    let (_, view) = call(&api, "GET", &format!("/api/items/{item}"), false, None);
    assert_eq!(
        (view["stock_left"].as_u64(), view["status"].as_str()),
        (
            Some((stock - won.len()) as u64),
            Some(if won.len() == stock {
                "sold_out"
            } else {
                "on_sale"
            })
        ),
        "{view}"
    );

    // A user always lands on the same shard: a second purchase is refused by the limit
    // there, and the same request again gets the same order.
    let (first_user, _, first) = won[0];
    let (status, again) = buy(&api, &item, first_user);
    assert_eq!((status, &again["order_id"]), (200, &first["order_id"]));
    let other = call(
        &api,
        "POST",
        &format!("/api/items/{item}/buy"),
        false,
        Some(json!({ "user_id": first_user, "request_id": "second" })),
    );
    assert!(
        other.1["error"] == "limit_reached" || other.1["error"] == "sold_out",
        "{other:?}"
    );

    // Orders of both shards are readable, payable, and listed for their users.
    let mut paid = HashSet::new();
    for shard in ["inv-0", "inv-1"] {
        let w = won
            .iter()
            .find(|w| w.2["order_id"].as_str().unwrap().starts_with(shard))
            .unwrap();
        let order = w.2["order_id"].as_str().unwrap();
        let (status, o) = call(&api, "GET", &format!("/api/orders/{order}"), false, None);
        assert_eq!((status, o["user_id"].as_str()), (200, Some(w.0.as_str())));
        let (status, o) = call(
            &api,
            "POST",
            &format!("/api/orders/{order}/pay"),
            false,
            Some(json!({ "user_id": w.0 })),
        );
        assert_eq!((status, o["status"].as_str()), (200, Some("paid")), "{o}");
        let (_, mine) = call(
            &api,
            "GET",
            &format!("/api/users/{}/orders", w.0),
            false,
            None,
        );
        assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
        paid.insert(order.to_owned());
    }

    // The inventory of shard inv-1 is killed and comes back on another port: the API and
    // the orders find it through the registry.
    procs.0[1].kill().unwrap();
    procs.0[1].wait().unwrap();
    procs.0[1] = inventory(dir.path(), "inv-1", &registry);
    let (status, created) = call(
        &api,
        "POST",
        "/api/admin/items",
        true,
        Some(json!({"name": "Lamp", "price_cents": 1_000, "stock": 10})),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    assert_eq!(status, 201, "{created}");
    let lamp = created["item_id"].as_str().unwrap().to_owned();
    let mut lamp_sold = 0;
    for i in 0..40 {
        let (status, body) = buy(&api, &lamp, &format!("lamp-{i}"));
        assert!(
            status == 200 || body["error"] == "sold_out",
            "{status} {body}"
        );
        lamp_sold += usize::from(status == 200);
    }
    assert_eq!(lamp_sold, 10, "40 buyers, 10 lamps over two shards");

    // Buyers who all hash to shard inv-0, more of them than inv-0's share (10 of 20 units):
    // once inv-0 sells out, units move over from inv-1 (journaled in the catalog, idempotent
    // in the inventories), and every unit is sold.
    let (status, created) = call(
        &api,
        "POST",
        "/api/admin/items",
        true,
        Some(json!({"name": "Mug", "price_cents": 500, "stock": 20})),
    );
    assert_eq!(status, 201, "{created}");
    let mug = created["item_id"].as_str().unwrap().to_owned();
    let shard_names = vec!["inv-0".to_owned(), "inv-1".to_owned()];
    let homed: Vec<String> = (0..)
        .map(|i| format!("mug-{i}"))
        .filter(|u| {
            keel_seckill::api::home_shard(&shard_names, u).map(String::as_str) == Some("inv-0")
        })
        .take(30)
        .collect();
    let mut mugs = 0;
    for user in &homed {
        let (status, body) = buy(&api, &mug, user);
        assert!(
            status == 200 || body["error"] == "sold_out",
            "{status} {body}"
        );
        if status == 200 {
            assert!(
                body["order_id"].as_str().unwrap().starts_with("inv-0-"),
                "{body}"
            );
            mugs += 1;
        }
    }
    assert_eq!(mugs, 20, "every unit sold, also those first held by inv-1");
    let (_, audit) = call(
        &api,
        "GET",
        &format!("/api/admin/items/{mug}/audit"),
        true,
        None,
    );
    assert!(
        audit["moved_between_shards"].as_u64().unwrap() >= 10,
        "{audit}"
    );

    // The audit balances once every reservation has its order.
    for (id, initial) in [(&item, stock), (&lamp, 10), (&mug, 20)] {
        let audit = common::drained_audit(&api, id, deadline);
        let by = &audit["orders_by_status"];
        let n = |s: &str| by[s].as_u64().unwrap_or(0);
        assert_eq!(audit["initial_stock"], initial as u64);
        assert_eq!(
            audit["stock_left"].as_u64().unwrap() + n("pending_payment") + n("paid") + n("shipped"),
            initial as u64,
            "{audit}"
        );
        if id == &item {
            assert_eq!(n("paid"), paid.len() as u64);
            assert_eq!(
                n("pending_payment") + n("paid") + n("expired"),
                won.len() as u64,
                "{audit}"
            );
        }
    }

    // The unpaid orders expire (5 s window): their units return, the orders announce it in
    // the registry, and the cached figure (a minute's time to live) follows.
    let (_, view) = call(&api, "GET", &format!("/api/items/{item}"), false, None);
    let cached = view["stock_left"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, view) = call(&api, "GET", &format!("/api/items/{item}"), false, None);
        if view["stock_left"].as_u64() == Some(stock as u64 - paid.len() as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the returned units never showed (was {cached}): {view}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
