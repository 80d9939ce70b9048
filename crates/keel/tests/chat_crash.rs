//! `keel chat` killed with SIGKILL while messages are being sent: after a restart every
//! acknowledged message is there, numbered without gaps, and a resend of one is not
//! delivered twice.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `keel chat` and waits for its banner.
fn start(dir: &std::path::Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["chat", "--instance", "c1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir)
        .env("KEEL_CHAT_SECRET", "crash-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel chat");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.contains("keel chat c1 on"), "{banner}");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    child
}

async fn login(addr: SocketAddr, user: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({ "user": user }).to_string();
    let req = format!(
        "POST /chat/api/login HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str::<Value>(body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_loses_no_acknowledged_message_and_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = start(dir.path(), port);
    let token = login(addr, "ann").await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat/ws?token={token}"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        json!({"type":"join","room":"r"}).to_string().into(),
    ))
    .await
    .unwrap();
    // Sends keep going (within the rate limit's burst) while acks come back; the process is
    // killed in the middle of it.
    let sender = tokio::spawn(async move {
        for i in 0..2000 {
            let m = json!({"type":"send","room":"r","text":format!("t{i}"),"client_msg_id":format!("c{i}")});
            if tx.send(Message::Text(m.to_string().into())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut killed = false;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
        let Message::Text(text) = frame else { continue };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "ack" {
            acked.push((
                v["msg_id"].as_u64().unwrap(),
                v["client_msg_id"].as_str().unwrap().to_owned(),
            ));
            if acked.len() == 15 && !killed {
                child.kill().unwrap();
                killed = true;
            }
        }
    }
    if !killed {
        let _ = child.kill();
    }
    child.wait().unwrap();
    sender.abort();
    assert!(
        killed && acked.len() >= 15,
        "acked before the kill: {}",
        acked.len()
    );

    let mut child = start(dir.path(), port);
    let token = login(addr, "ann").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/chat/ws?token={token}"))
            .await
            .unwrap();
    ws.send(Message::Text(
        json!({"type":"join","room":"r","since":0})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let joined: Value = loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            break serde_json::from_str(&t).unwrap();
        }
    };
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["recovered"], true);
    let missed = joined["missed"].as_array().unwrap();
    let ids: Vec<u64> = missed
        .iter()
        .map(|m| m["msg_id"].as_u64().unwrap())
        .collect();
    let last = joined["last_msg_id"].as_u64().unwrap();
    assert_eq!(
        ids,
        (1..=last).collect::<Vec<_>>(),
        "1..=last without a gap"
    );
    for (id, client_msg_id) in &acked {
        let m = &missed[(*id - 1) as usize];
        assert_eq!(
            m["text"].as_str().unwrap(),
            format!("t{}", &client_msg_id[1..]),
            "acked message {id} kept"
        );
    }
    // Resending an acknowledged message after the restart: its first number, no new message.
    let (first_id, first_cmid) = acked[0].clone();
    ws.send(Message::Text(
        json!({"type":"send","room":"r","text":"again","client_msg_id":first_cmid})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let ack: Value = loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            break serde_json::from_str(&t).unwrap();
        }
    };
    assert_eq!(
        (ack["type"].clone(), ack["msg_id"].clone()),
        (json!("ack"), json!(first_id))
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
