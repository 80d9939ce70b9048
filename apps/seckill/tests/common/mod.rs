//! Starting `keel-seckill` processes for the tests.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Starts `keel-seckill <args>` and waits for its banner (`<banner> <address>`); returns the
/// process and the address.
pub fn start(args: &[&str], banner: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-seckill"))
        .args(args)
        .env("KEEL_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel-seckill");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix(banner)
        .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
        .trim()
        .to_owned();
    // Keep reading, so its stdout never breaks.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (child, addr)
}

/// Starts a Keel registry on a free port in this process (on `rt`); returns its address.
pub fn registry(rt: &tokio::runtime::Runtime) -> String {
    rt.block_on(serve_registry())
}

/// Starts a Keel registry on a free port on the current runtime; returns its address.
pub async fn serve_registry() -> String {
    let registry = keel_registry::Registry::open(keel_registry::RegistryConfig::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        keel_rpc::Server::builder()
            .add_service(registry.service())
            .build()
            .serve(listener, std::future::pending::<()>()),
    );
    addr.to_string()
}

pub fn start_inventory(dir: &std::path::Path) -> (Child, String) {
    start_inventory_with(dir, &[])
}

/// The same with more arguments (`--shard`, `--registry`).
pub fn start_inventory_with(dir: &std::path::Path, more: &[&str]) -> (Child, String) {
    let mut args = vec![
        "inventory",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    start(&args, "inventory on")
}

/// Starts an orders instance on a free port taking reservations from the inventory at
/// `inventory_addr` (named inv-0), sweeping for expiries every 50 ms.
pub fn start_orders(
    dir: &std::path::Path,
    inventory_addr: &str,
    payment_window_ms: u64,
) -> (Child, String) {
    start(
        &[
            "orders",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            dir.to_str().unwrap(),
            "--inventory",
            &format!("inv-0={inventory_addr}"),
            "--payment-window-ms",
            &payment_window_ms.to_string(),
            "--sweep-ms",
            "50",
        ],
        "orders on",
    )
}

/// Processes killed when dropped (also when a test fails).
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// The admin token the tests give the API.
pub const TOKEN: &str = "test-admin-token";

/// One HTTP request on its own connection: the status and the JSON body.
pub fn call(
    addr: &str,
    method: &str,
    path: &str,
    admin: bool,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = if admin {
        format!("Authorization: Bearer {TOKEN}\r\n")
    } else {
        String::new()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

/// The item's audit once the queue to the orders service has drained (every reservation has
/// its order); panics at `deadline`.
pub fn drained_audit(api: &str, item: &str, deadline: std::time::Instant) -> Value {
    loop {
        let (status, audit) = call(
            api,
            "GET",
            &format!("/api/admin/items/{item}/audit"),
            true,
            None,
        );
        if status == 200 && audit["queue_backlog"] == 0 {
            return audit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backlog never drained: {audit}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
