//! `keel up`: the system (registry, two inventory shards, two orders instances, API,
//! gateway) comes up behind the gateway, a SIGKILLed part is restarted on its address and the
//! sale goes on, and SIGINT stops every process.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::{Up, alive, bench, call, wait_for};

#[test]
fn keel_up_restarts_a_killed_part_and_stops_everything_on_sigint() {
    let mut up = Up::start("buy_per_ip_per_second = 1000.0\nbuy_per_user_per_second = 1.0\n");
    let (gw, started, lines) = (up.gateway.clone(), up.started.clone(), &up.lines);
    // Every part: the registry, two inventory shards, two orders instances (keel.toml's
    // default scale), the API, two chat instances and the gateway.
    assert_eq!(
        started.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "api",
            "chat-0",
            "chat-1",
            "gateway",
            "inventory-0",
            "inventory-1",
            "orders-0",
            "orders-1",
            "registry"
        ]
    );
    let inventory_pid = started["inventory-0"];
    let pids: Vec<u32> = started.values().copied().collect();

    let (status, created) = call(
        &gw,
        "POST",
        "/api/admin/items",
        r#"{"name": "Kettle", "price_cents": 2500, "stock": 10}"#,
    );
    assert_eq!(status, 201, "{created}");
    let (status, body) = call(
        &gw,
        "POST",
        "/api/items/item-1/buy",
        r#"{"user_id": "ann"}"#,
    );
    assert_eq!(status, 200, "{body}");

    // SIGKILL the inventory: keel up starts it again, on the same address, and the sale
    // goes on with what was sold before.
    assert!(
        Command::new("kill")
            .args(["-9", &inventory_pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_for(lines, "restarted inventory");
    let mut bought = None;
    for _ in 0..50 {
        let (status, body) = call(
            &gw,
            "POST",
            "/api/items/item-1/buy",
            r#"{"user_id": "bob"}"#,
        );
        if status == 200 {
            bought = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bought.is_some(), "buying after the restart");
    // The gateway limits buy attempts per user (keel.toml: 1 a second, burst 2).
    let carl = |_| {
        let mut s = std::net::TcpStream::connect(&gw).unwrap();
        let body = r#"{"user_id": "carl"}"#;
        write!(
            s,
            "POST /api/items/item-1/buy HTTP/1.1\r\nHost: x\r\nX-User-Id: carl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out[9..12].to_owned()
    };
    let statuses: Vec<String> = (0..3).map(carl).collect();
    assert_eq!(
        statuses,
        ["200", "409", "429"],
        "limit reached, then rate limited"
    );
    // An item that opens in an hour: the gateway's gate (fed through the registry) refuses
    // early buyers itself ("opens in ..."), without a trip to the API ("the sale opens at").
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(3_600),
    );
    let (status, created) = call(
        &gw,
        "POST",
        "/api/admin/items",
        &format!(r#"{{"name": "Later", "price_cents": 1, "stock": 5, "starts_at": "{later}"}}"#),
    );
    assert_eq!(status, 201, "{created}");
    let later_id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["item_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = call(
            &gw,
            "POST",
            &format!("/api/items/{later_id}/buy"),
            r#"{"user_id": "dan"}"#,
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the gate never closed: {body}"
        );
        // (Without an X-User-Id, the per-user limit counts the address: 1 a second.)
        if status == 429 {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        assert_eq!(status, 403, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "not_started");
        if body["detail"].as_str().unwrap().starts_with("opens in") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let (_, audit) = call(&gw, "GET", "/api/admin/items/item-1/audit", "");
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(
        (audit["stock_left"].as_u64(), audit["reserved"].as_u64()),
        (Some(7), Some(3))
    );

    // A sale under load: 300 buyers for 50 units, 16 at a time, twice each; the bench checks
    // the invariants through the API and fails on a breach.
    let summary = bench(&gw, "300", &[]);
    assert_eq!(
        (
            summary["bought"].as_u64(),
            summary["oversold"].as_u64(),
            summary["lost_acks"].as_u64()
        ),
        (Some(50), Some(0), Some(0)),
        "{summary}"
    );

    // An open loop: 200 buyers arriving at 400 a second, whether or not earlier ones have
    // their answer; the same invariants.
    let summary = bench(&gw, "200", &["--rate", "400"]);
    assert_eq!(
        (
            summary["bought"].as_u64(),
            summary["oversold"].as_u64(),
            summary["lost_acks"].as_u64(),
            summary["dropped"].as_u64()
        ),
        (Some(50), Some(0), Some(0), Some(0)),
        "{summary}"
    );
    assert!(summary["elapsed_s"].as_f64().unwrap() >= 0.45, "{summary}");

    // The same with chaos: the inventory or the orders process is SIGKILLed a third of the
    // way through; keel up restarts it and the invariants hold.
    let pid_file = up.dir.path().join("data").join("pids.json");
    let summary = bench(&gw, "600", &["--chaos", pid_file.to_str().unwrap()]);
    assert_eq!(summary["chaos"]["killed"], true, "{summary}");
    assert_eq!(
        (summary["oversold"].as_u64(), summary["lost_acks"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    wait_for(lines, "restarted");

    // SIGINT: everything stops.
    let status = up.stop();
    assert!(status.success(), "{status}");
    // (The inventory-0 first started was SIGKILLed; its pid may be reused.)
    for pid in pids.iter().filter(|p| **p != inventory_pid) {
        assert!(!alive(*pid), "process {pid} still running");
    }
}

#[test]
fn the_parts_stop_by_themselves_when_keel_up_is_killed() {
    let mut up = Up::start("buy_per_ip_per_second = 0.0\nbuy_per_user_per_second = 0.0\n");
    let pids: Vec<u32> = up.started.values().copied().collect();
    assert_eq!(
        pids.len(),
        9,
        "seven parts of the sale and two chat instances"
    );
    // SIGKILL: keel up cannot stop its children; they notice it is gone and stop.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_ctrl_c_while_the_parts_start_stops_them_in_order() {
    let dir = common::configured("", "");
    let (child, lines) = common::spawn_up(dir.path());
    let mut child = common::Interrupted(child);
    // The first part is up, the others are still to come.
    let first = wait_for(&lines, "started registry");
    let registry = common::pid_of(&first);
    assert!(
        Command::new("kill")
            .args(["-INT", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "keel up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "stopped as on any Ctrl-C: {status:?}");
    let mut started = vec![registry];
    while let Ok(line) = lines.try_recv() {
        if line.starts_with("started ") {
            started.push(common::pid_of(&line));
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while started.iter().any(|p| alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "a part outlived keel up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The count of `outcome` buys in an API's `/metrics`.
fn buys(api: &str, outcome: &str) -> u64 {
    let (status, text) = call(api, "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    let needle = format!("keel_sale_buys_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn several_apis_share_the_catalog_and_the_gateway_balances_over_them() {
    let dir = common::configured(
        "buy_per_ip_per_second = 0\nbuy_per_user_per_second = 0\n",
        "",
    );
    let config = dir.path().join("keel.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[scale]\napi = 2\n");
    std::fs::write(&config, text).unwrap();
    let up = Up::run_in(dir);
    let gw = up.gateway.clone();
    let (a, b) = (up.addrs["api"].clone(), up.addrs["api-1"].clone());
    // An item made through the gateway is known to both APIs.
    let (status, created) = call(
        &gw,
        "POST",
        "/api/admin/items",
        r#"{"name": "Kettle", "price_cents": 2500, "stock": 10}"#,
    );
    assert_eq!(status, 201, "{created}");
    for api in [&a, &b] {
        let (status, body) = call(api, "GET", "/api/items/item-1", "");
        assert_eq!(status, 200, "{api}: {body}");
    }
    // Items made on both APIs at once get distinct ids, and both list them all.
    let makers: Vec<_> = (0..12)
        .map(|i| {
            let api = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                let (status, body) = call(
                    &api,
                    "POST",
                    "/api/admin/items",
                    &format!(r#"{{"name": "Lamp {i}", "price_cents": 900, "stock": 4}}"#),
                );
                assert_eq!(status, 201, "{body}");
                serde_json::from_str::<serde_json::Value>(&body).unwrap()["item_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
        })
        .collect();
    let mut ids: Vec<String> = makers.into_iter().map(|m| m.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 12, "{ids:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for api in [&a, &b] {
        loop {
            let (_, body) = call(api, "GET", "/api/items", "");
            let listed = serde_json::from_str::<serde_json::Value>(&body).unwrap();
            if listed.as_array().unwrap().len() == 13 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{api}: {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A sale through the gateway reaches both APIs, and is checked whole.
    let summary = common::bench_with(
        &gw,
        &["--buyers", "400", "--stock", "100", "--concurrency", "16"],
    );
    assert_eq!(
        (summary["oversold"].as_u64(), summary["lost_acks"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    assert!(summary["ok"].as_bool().unwrap(), "{summary}");
    let (on_a, on_b) = (
        buys(&a, "ok") + buys(&a, "sold_out"),
        buys(&b, "ok") + buys(&b, "sold_out"),
    );
    assert!(on_a > 0 && on_b > 0, "buys per API: {on_a} and {on_b}");
    // One API SIGKILLed in the middle of a sale: the other goes on, nothing is lost.
    common::sale_with_kill(&gw, (2000, 500, 500), || vec![up.started["api-1"]]);
    drop(up);
}
