//! Shard ownership with failover, with the real processes: two inventory processes of one
//! shard share its JetStream stream (the NATS server on 127.0.0.1:4222, or `KEEL_NATS_URL`)
//! and elect an owner in a Keel registry; the API and the orders find whichever owns it. The
//! owner is SIGKILLed in the middle of a sale: the standby is elected once the lease runs out,
//! replays the stream and serves; buys in doubt are sent again with their request ids. Nothing
//! is sold twice, no acknowledged buy is lost, and every unit is accounted for. Skipped with a
//! message when no NATS server answers, failed instead when `KEEL_REQUIRE_SERVICES=1`.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Procs, call, registry, start};
use keel_registry::{NamingBackend, RegistryHandle};
use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream};
use serde_json::{Value, json};

const SHARD_SERVICE: &str = "seckill-inventory-inv-0";

/// The process ids of the shard's registered owners.
fn owners(rt: &tokio::runtime::Runtime, registry: &RegistryHandle) -> Vec<u32> {
    let snapshot = rt
        .block_on(registry.list("default", SHARD_SERVICE))
        .unwrap();
    snapshot
        .instances
        .iter()
        .map(|i| i.id.rsplit_once('/').unwrap().1.parse().unwrap())
        .collect()
}

fn wait_for_one_owner(
    rt: &tokio::runtime::Runtime,
    registry: &RegistryHandle,
    not: Option<u32>,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = owners(rt, registry);
        if let [pid] = now[..]
            && Some(pid) != not
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "owners of the shard: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_standby_takes_over_a_killed_owner_and_no_buy_is_lost_or_sold_twice() {
    if !nats_up("a_standby_takes_over_a_killed_owner_and_no_buy_is_lost_or_sold_twice") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let registry_addr = registry(&rt);
    let registry = rt.block_on(async {
        RegistryHandle::new(keel_rpc::Channel::with_config(
            registry_addr.clone(),
            keel_rpc::ChannelConfig::default(),
        ))
    });
    let stream = unique_stream("failover");
    let _delete = DeleteStreams::new(vec![stream.clone()]);
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let nats = nats_url();
    let inventory = |name: &str| {
        common::start_inventory_with(
            &dir.path().join(name),
            &[
                "--shard",
                "inv-0",
                "--journal",
                &nats,
                "--stream",
                &stream,
                "--registry",
                &registry_addr,
                "--lease-ttl-ms",
                "1000",
            ],
        )
        .0
    };
    let first = inventory("a");
    let first_pid = first.id();
    procs.0.push(first);
    // The second starts once the first owns the shard: it is the standby.
    let owner = wait_for_one_owner(&rt, &registry, None);
    assert_eq!(owner, first_pid);
    procs.0.push(inventory("b"));
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
                "--registry",
                &registry_addr,
                "--sweep-ms",
                "50",
            ],
            "orders on",
        )
        .0,
    );
    let catalog = dir.path().join("catalog");
    let (api_proc, api) = start(
        &[
            "api",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            catalog.to_str().unwrap(),
            "--inventory",
            "inv-0",
            "--registry",
            &registry_addr,
            "--in-doubt-ms",
            "8000",
        ],
        "api on",
    );
    procs.0.push(api_proc);

    let stock = 300usize;
    let (status, created) = call(
        &api,
        "POST",
        "/api/admin/items",
        true,
        Some(json!({"name": "Console", "price_cents": 39_900, "stock": stock})),
    );
    assert_eq!(status, 201, "{created}");
    let item = created["item_id"].as_str().unwrap().to_owned();

    // 600 buyers on 12 threads; once 100 buys have succeeded the owner is SIGKILLed.
    let users: Vec<String> = (0..600).map(|i| format!("u{i}")).collect();
    let won_so_far = AtomicUsize::new(0);
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let buy = |user: &str| {
        call(
            &api,
            "POST",
            &format!("/api/items/{item}/buy"),
            false,
            Some(json!({ "user_id": user, "request_id": format!("{user}-r") })),
        )
    };
    let results: Vec<(String, u16, Value, Instant, Instant)> = std::thread::scope(|s| {
        s.spawn(|| {
            while won_so_far.load(Ordering::Relaxed) < 100 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let status = std::process::Command::new("kill")
                .args(["-9", &first_pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            *killed_at.lock().unwrap() = Some(Instant::now());
        });
        let handles: Vec<_> = users
            .chunks(50)
            .map(|chunk| {
                let (buy, won_so_far) = (&buy, &won_so_far);
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|u| {
                            let sent = Instant::now();
                            let (status, body) = buy(u);
                            if status == 200 {
                                won_so_far.fetch_add(1, Ordering::Relaxed);
                            }
                            (u.clone(), status, body, sent, Instant::now())
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
    let killed_at = killed_at
        .lock()
        .unwrap()
        .expect("the owner was killed mid-sale");

    // Every buyer got an answer: a unit or sold out, never an error — the buys in doubt
    // were answered by the new owner.
    let won: Vec<_> = results.iter().filter(|r| r.1 == 200).collect();
    for (user, status, body, ..) in &results {
        assert!(
            *status == 200 || (*status == 409 && body["error"] == "sold_out"),
            "{user}: {status} {body}"
        );
    }
    assert_eq!(won.len(), stock, "exactly the stock is sold");
    let ids: HashSet<&str> = won
        .iter()
        .map(|w| w.2["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), stock, "no order id twice");
    let resumed = results
        .iter()
        .filter(|r| r.1 == 200 && r.3 > killed_at)
        .map(|r| r.4)
        .min()
        .expect("buys succeeded after the kill");
    eprintln!(
        "takeover: the first buy sent after the kill succeeded {} ms after it",
        resumed.duration_since(killed_at).as_millis()
    );

    // The standby owns the shard now; asked again, every winner gets the same order.
    let new_owner = wait_for_one_owner(&rt, &registry, Some(first_pid));
    assert_ne!(new_owner, first_pid);
    for (user, _, body, ..) in &won {
        let (status, again) = buy(user);
        assert_eq!(
            (status, &again["order_id"]),
            (200, &body["order_id"]),
            "{user}: {again}"
        );
    }

    // Every acknowledged buy has its order, and the audit balances.
    let deadline = Instant::now() + Duration::from_secs(30);
    let audit = common::drained_audit(&api, &item, deadline);
    let by = &audit["orders_by_status"];
    assert_eq!(
        by["pending_payment"].as_u64(),
        Some(stock as u64),
        "{audit}"
    );
    assert_eq!(audit["stock_left"].as_u64(), Some(0), "{audit}");
    for (user, _, body, ..) in won.iter().take(20) {
        let order = body["order_id"].as_str().unwrap();
        let (status, o) = call(&api, "GET", &format!("/api/orders/{order}"), false, None);
        assert_eq!(
            (status, o["user_id"].as_str()),
            (200, Some(user.as_str())),
            "{o}"
        );
    }
}
