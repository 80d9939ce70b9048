//! The chat page in a real browser: `keel chat` serves it, two headless Chromium pages sign in
//! and meet in the lobby; one sends and the other sees it; one goes offline, messages are sent
//! meanwhile, and when it is back it has caught up with them.
//!
//! Skipped with a message when Chromium is not installed, unless `KEEL_REQUIRE_SERVICES=1`.

mod browser;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use browser::{Browser, type_into};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Signs in as `name` and waits until the page is connected.
async fn sign_in(page: &mut Browser, url: &str, name: &str) {
    page.open(url).await;
    page.eval(&type_into("name", name)).await;
    page.eval("document.getElementById('login').requestSubmit(), true")
        .await;
    page.until("window.chat && chat.online", "connected").await;
}

/// Sends `text` from the page's compose box, as a user would.
async fn say(page: &mut Browser, text: &str) {
    page.eval(&type_into("text", text)).await;
    page.eval("document.getElementById('compose').requestSubmit(), true")
        .await;
}

fn shows(text: &str) -> String {
    format!("[...document.querySelectorAll('#messages p')].some(p => p.textContent === {text:?})")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_chat_and_one_catches_up_after_being_offline() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["chat", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .env("KEEL_CHAT_SECRET", "page-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel chat");
    let mut banner = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(banner.contains("keel chat"), "{banner}");
    let url = format!("http://127.0.0.1:{port}/chat/");

    let mut ann = Browser::launch().await;
    let mut bob = Browser::launch().await;
    sign_in(&mut ann, &url, "ann").await;
    sign_in(&mut bob, &url, "bob").await;
    bob.until(
        "[...document.querySelectorAll('#members li')].some(li => li.textContent.includes('ann'))",
        "ann among the members",
    )
    .await;
    say(&mut ann, "hello").await;
    bob.until(&shows("ann: hello"), "bob sees ann's message")
        .await;

    // Bob goes offline (his page waits several seconds before it reconnects)…
    bob.eval("chat.attempt = 3; chat.socket.close(), true")
        .await;
    bob.until("!chat.online", "bob offline").await;
    // …while ann sends three messages, each acknowledged, so durable.
    for text in ["one", "two", "three"] {
        say(&mut ann, text).await;
    }
    ann.until("chat.unacked.size === 0", "ann's messages acknowledged")
        .await;
    ann.until(&shows("ann: three"), "ann sees her own message")
        .await;
    assert_eq!(bob.eval("chat.online").await, false, "bob is still offline");
    // Back online, bob's page resumes with `since` and shows what it missed, in order.
    bob.until("chat.online", "bob reconnected").await;
    let note = bob
        .until(
            "document.getElementById('note').textContent.includes('caught up') && document.getElementById('note').textContent",
            "bob caught up",
        )
        .await;
    assert_eq!(note, "caught up 3 missed message(s) in lobby");
    let texts = bob
        .eval("[...document.querySelectorAll('#messages p')].map(p => p.textContent)")
        .await;
    assert_eq!(
        texts,
        serde_json::json!(["ann: hello", "ann: one", "ann: two", "ann: three"])
    );
    drop(ann);
    drop(bob);
    let _ = server.kill();
    let _ = server.wait();
}
