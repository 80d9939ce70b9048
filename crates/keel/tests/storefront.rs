//! The storefront in a real browser: `keel up` serves it through the gateway, and headless
//! Chromium (Debian's `chromium`), driven over the DevTools protocol, creates an item on the
//! admin page, then buys it, sees the order and pays on the storefront.
//!
//! Skipped with a message when Chromium is not installed, unless `KEEL_REQUIRE_SERVICES=1`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, call};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    socket: Socket,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // It names its DevTools endpoint on stderr.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium named no DevTools endpoint within 30 s");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let mut browser = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = browser
            .command("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .command(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// Sends a command (to the page once attached) and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("no answer from chromium within 30 s")
                .expect("the DevTools connection closed")
                .unwrap();
            let Message::Text(text) = next else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    async fn open(&mut self, url: &str) {
        self.command("Page.navigate", json!({ "url": url })).await;
        self.until(
            "document.readyState === 'complete' && location.href",
            "page loaded",
        )
        .await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits (up to 20 s) until `expression` is truthy; returns its value.
    async fn until(&mut self, expression: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// JavaScript that types `value` into the input `id` as a user would (input + change).
fn type_into(id: &str, value: &str) -> String {
    format!(
        "(() => {{ const e = document.getElementById({id:?}); e.value = {value:?}; \
         e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); return true; }})()"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_creates_an_item_buys_it_sees_the_order_and_pays() {
    if !std::path::Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{CHROMIUM} is missing and KEEL_REQUIRE_SERVICES=1 (apt-get install chromium)"
        );
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let up = tokio::task::spawn_blocking(|| {
        Up::start("buy_per_ip_per_second = 1000.0\nbuy_per_user_per_second = 50.0\n")
    })
    .await
    .unwrap();
    let gw = up.gateway.clone();
    let mut browser = Browser::launch().await;

    // The admin page creates an item.
    browser.open(&format!("http://{gw}/admin.html")).await;
    for (id, value) in [
        ("token", common::TOKEN),
        ("name", "Mechanical keyboard"),
        ("price", "12900"),
        ("stock", "5"),
    ] {
        browser.eval(&type_into(id, value)).await;
    }
    browser
        .eval("document.getElementById('submit').click(), true")
        .await;
    let item = browser
        .until(
            "document.getElementById('result').dataset.itemId",
            "the item to be created",
        )
        .await;
    let item = item.as_str().unwrap().to_owned();
    // ...and lists it, with a button to take it down.
    browser
        .until(
            &format!(
                "document.querySelector('#items tr[data-item-id=\"{item}\"] button') !== null || null"
            ),
            "the new item in the admin page's list",
        )
        .await;

    // An item that opens in two hours shows a countdown and cannot be bought yet.
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(7_200),
    );
    let (status, later) = tokio::task::spawn_blocking({
        let gw = gw.clone();
        move || {
            call(
                &gw,
                "POST",
                "/api/admin/items",
                &json!({"name": "Later", "price_cents": 100, "stock": 1, "starts_at": later.to_string()})
                    .to_string(),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{later}");
    let later: Value = serde_json::from_str(&later).unwrap();

    // The storefront lists both, with live stock.
    browser.open(&format!("http://{gw}/")).await;
    browser.eval(&type_into("user", "browser-ann")).await;
    let card =
        |id: &str, what: &str| format!("document.querySelector('[data-item=\"{id}\"] {what}')");
    let stock = browser
        .until(
            &format!("{}?.textContent", card(&item, ".stock")),
            "the item's card",
        )
        .await;
    assert_eq!(stock, "5 left");
    let state = browser
        .until(
            &format!(
                "{}?.textContent",
                card(later["item_id"].as_str().unwrap(), ".state")
            ),
            "the upcoming item's card",
        )
        .await;
    let state = state.as_str().unwrap();
    assert!(
        state.starts_with("opens in 2h 0m") || state.starts_with("opens in 1h 59m"),
        "{state}"
    );
    let disabled = browser
        .eval(&format!(
            "{}.disabled",
            card(later["item_id"].as_str().unwrap(), ".buy")
        ))
        .await;
    assert_eq!(disabled, true);

    // Buy: the message names the order, the stock drops, and the order is listed.
    browser
        .eval(&format!("{}.click(), true", card(&item, ".buy")))
        .await;
    let message = browser
        .until(
            "(m => m.startsWith('Bought') && m)(document.getElementById('message').textContent)",
            "the purchase",
        )
        .await;
    assert!(
        message.as_str().unwrap().contains("order inv-"),
        "{message}"
    );
    browser
        .until(
            &format!("{}?.textContent === '4 left'", card(&item, ".stock")),
            "the stock to drop",
        )
        .await;
    let status = browser
        .until(
            "document.querySelector('#orders tr .status')?.textContent",
            "the order in my orders",
        )
        .await;
    assert_eq!(status, "pending_payment");

    // Pay.
    browser
        .eval("document.querySelector('#orders .pay').click(), true")
        .await;
    browser
        .until(
            "document.querySelector('#orders tr .status')?.textContent === 'paid'",
            "the order to be paid",
        )
        .await;
    let (status, orders) =
        tokio::task::spawn_blocking(move || call(&gw, "GET", "/api/users/browser-ann/orders", ""))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let orders: Value = serde_json::from_str(&orders).unwrap();
    assert_eq!(orders[0]["item_id"], item.as_str());
    assert_eq!(orders[0]["status"], "paid");
    drop(browser);
    tokio::task::spawn_blocking(move || drop(up)).await.unwrap();
}
