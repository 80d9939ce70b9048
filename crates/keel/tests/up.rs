//! `keel up`: the system (registry, two inventory shards, two orders instances, API,
//! gateway) comes up behind the gateway, a SIGKILLed part is restarted on its address and the
//! sale goes on, and SIGINT stops every process.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TOKEN: &str = "up-test-admin-token";

fn call(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// Waits for a line of `keel up`'s output containing `needle`.
fn wait_for(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?}");
}

/// Runs `keel bench seckill` (50 units, 16 at a time) against the gateway; it must exit
/// successfully; returns its summary.
fn bench(gw: &str, buyers: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "bench",
            "seckill",
            "--gateway",
            gw,
            "--token",
            TOKEN,
            "--buyers",
            buyers,
            "--stock",
            "50",
            "--concurrency",
            "16",
        ])
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn keel_up_restarts_a_killed_part_and_stops_everything_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        format!(
            "data_dir = \"data\"\nadmin_token = \"{TOKEN}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[registry]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[inventory]\nlisten = \"127.0.0.1:0\"\n[orders]\nlisten = \"127.0.0.1:0\"\npayment_window_ms = 60000\n[limits]\nbuy_per_ip_per_second = 1000.0\nbuy_per_user_per_second = 1.0\n"
        ),
    )
    .unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("up")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // If an assertion fails, keel up and its children still stop.
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _stop = StopOnDrop(up.id());
    let (tx, lines) = mpsc::channel();
    let stdout = up.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let pid_of = |line: &str| -> u32 {
        line.split("(pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap()
    };
    // Every part's banner, until the system is up: the registry, two inventory shards, two
    // orders instances (keel.toml's default scale), the API and the gateway.
    let mut started = std::collections::BTreeMap::new();
    let ready = loop {
        let line = wait_for(&lines, "");
        if line.contains("Keel is up") {
            break line;
        }
        if let Some(rest) = line.strip_prefix("started ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            started.insert(name, pid_of(&line));
        }
    };
    assert_eq!(
        started.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "api",
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
    let gw = ready
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();

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
    wait_for(&lines, "restarted inventory");
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

    // The same with chaos: the inventory or the orders process is SIGKILLed a third of the
    // way through; keel up restarts it and the invariants hold.
    let pid_file = dir.path().join("data").join("pids.json");
    let summary = bench(&gw, "600", &["--chaos", pid_file.to_str().unwrap()]);
    assert_eq!(summary["chaos"]["killed"], true, "{summary}");
    assert_eq!(
        (summary["oversold"].as_u64(), summary["lost_acks"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    wait_for(&lines, "restarted");

    // SIGINT: everything stops.
    assert!(
        Command::new("kill")
            .args(["-INT", &up.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "keel up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // (The inventory-0 first started was SIGKILLed; its pid may be reused.)
    for pid in pids.iter().filter(|p| **p != inventory_pid) {
        assert!(!alive(*pid), "process {pid} still running");
    }
}
