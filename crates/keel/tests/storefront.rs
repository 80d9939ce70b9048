//! The storefront in a real browser: `keel up` serves it through the gateway, and headless
//! Chromium (Debian's `chromium`), driven over the DevTools protocol, creates an item on the
//! admin page, then buys it, sees the order and pays on the storefront.
//!
//! Skipped with a message when Chromium is not installed, unless `KEEL_REQUIRE_SERVICES=1`.

mod browser;
mod common;

use std::time::Duration;

use browser::{Browser, type_into};
use common::{Up, call};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_creates_an_item_buys_it_sees_the_order_and_pays() {
    if !browser::available() {
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
