//! `keel up` serves the chat next to the storefront: two chat instances behind the gateway
//! at `/chat/`, one chat across them (a member on one instance sees what is sent on the
//! other, in one order), and either instance SIGKILLed and restarted with no acknowledged
//! message lost and no gap.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Up, call, wait_for};
use futures_util::{SinkExt, StreamExt};
use keel_chat::cluster::{LinkConfig, Links};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A client connection, with the message numbers it has read while waiting for
/// something else.
struct Ws {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    seen: Vec<u64>,
}

fn login(addr: &str, user: &str) -> String {
    let (status, body) = call(
        addr,
        "POST",
        "/chat/api/login",
        &json!({ "user": user }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn connect(addr: &str, token: &str) -> Ws {
    let url = format!("ws://{addr}/chat/ws?token={token}");
    for _ in 0..100 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            return Ws {
                ws,
                seen: Vec::new(),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not connect to {addr}");
}

async fn send(ws: &mut Ws, v: Value) {
    ws.ws
        .send(Message::Text(v.to_string().into()))
        .await
        .unwrap();
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.ws.next())
            .await
            .expect("a frame within 15 s")
            .expect("the connection is open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "msg" {
                ws.seen.push(v["msg_id"].as_u64().unwrap());
            }
            return v;
        }
    }
}

/// Joins (with `since`), retrying while the room's holder is not reachable yet.
async fn join(ws: &mut Ws, room: &str, since: Option<u64>) -> Value {
    for _ in 0..100 {
        let mut m = json!({ "type": "join", "room": room });
        if let Some(since) = since {
            m["since"] = json!(since);
        }
        send(ws, m).await;
        loop {
            let v = next(ws).await;
            match v["type"].as_str() {
                Some("joined") => return v,
                Some("error") if v["code"] == "unavailable" => break,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("never joined {room}");
}

/// Sends until acknowledged (the holder may be restarting); the message's number.
async fn send_acked(ws: &mut Ws, room: &str, text: &str, id: &str) -> u64 {
    for _ in 0..100 {
        send(
            ws,
            json!({"type": "send", "room": room, "text": text, "client_msg_id": id}),
        )
        .await;
        loop {
            let v = next(ws).await;
            if v["client_msg_id"] == id {
                if v["type"] == "ack" {
                    return v["msg_id"].as_u64().unwrap();
                }
                assert_eq!(v["code"], "unavailable", "{v}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{id} never acknowledged");
}

/// The numbers of the messages read so far and until one numbered `last` has come (the
/// test uses one room per connection).
async fn messages_until(ws: &mut Ws, last: u64) -> Vec<u64> {
    while ws.seen.last().is_none_or(|id| *id < last) {
        next(ws).await;
    }
    std::mem::take(&mut ws.seen)
}

/// SIGKILLs part `name` under the pid `keel up` lists for it now in `<data_dir>/pids.json`
/// (the file a user would read); a part that restarted since it started is killed all the
/// same, and the test's output says so.
fn kill_9(up: &common::Up, name: &str) {
    let file = up.dir.path().join("data").join("pids.json");
    let pids: BTreeMap<String, u32> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let pid = pids[name];
    if pid != up.started[name] {
        println!(
            "{name} runs as pid {pid}, not its first pid {}",
            up.started[name]
        );
    }
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 {name} (pid {pid})");
}

#[test]
fn keel_up_serves_one_chat_over_two_instances_and_survives_a_kill_9_of_either() {
    let up = Up::start("");
    let gw = up.gateway.clone();
    let addrs: BTreeMap<String, String> = up.addrs.clone();
    let (c0, c1) = (addrs["chat-0"].clone(), addrs["chat-1"].clone());
    // The page and the login come through the gateway.
    let (status, page) = call(&gw, "GET", "/chat/", "");
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "the chat page");
    let (ann_token, bob_token, cid_token) =
        (login(&gw, "ann"), login(&gw, "bob"), login(&gw, "cid"));
    let names = ["chat-0".to_owned(), "chat-1".to_owned()];
    let links = Links::new(&LinkConfig {
        me: names[0].clone(),
        names: names.to_vec(),
        request_timeout: Duration::from_secs(5),
        peer_timeout: Duration::from_secs(5),
        list_bytes: keel_chat::hub::MAX_LIST_BYTES,
    })
    .unwrap();
    let room = (0..)
        .map(|i| format!("hall-{i}"))
        .find(|r| **links.owner(r) == *"chat-0")
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // ann on the room's holder, bob on the other instance (each connected straight to
        // it, to know which serves whom), cid through the gateway.
        let mut ann = connect(&c0, &ann_token).await;
        let mut bob = connect(&c1, &bob_token).await;
        let mut cid = connect(&gw, &cid_token).await;
        assert_eq!(join(&mut ann, &room, None).await["instance"], "chat-0");
        assert_eq!(join(&mut bob, &room, None).await["instance"], "chat-1");
        let joined = join(&mut cid, &room, None).await;
        assert_eq!(joined["members"], json!(["ann", "bob", "cid"]), "{joined}");
        for i in 0..5 {
            send_acked(&mut ann, &room, &format!("a{i}"), &format!("a{i}")).await;
            send_acked(&mut bob, &room, &format!("b{i}"), &format!("b{i}")).await;
        }
        let at_ann = messages_until(&mut ann, 10).await;
        let at_bob = messages_until(&mut bob, 10).await;
        let at_cid = messages_until(&mut cid, 10).await;
        assert_eq!(at_ann, (1..=10).collect::<Vec<_>>());
        assert_eq!(at_bob, at_ann);
        assert_eq!(at_cid, at_ann);

        // SIGKILL the holder: bob (elsewhere) gets `unavailable` until it is back, then his
        // resend is numbered 11; ann reconnects and recovers it with `since`.
        kill_9(&up, "chat-0");
        tokio::task::block_in_place(|| wait_for(&up.lines, "restarted chat-0"));
        let id = send_acked(&mut bob, &room, "after the kill", "k1").await;
        assert_eq!(id, 11, "numbered right after the acknowledged ten");
        assert_eq!(messages_until(&mut bob, 11).await, vec![11]);
        let mut ann = connect(&c0, &ann_token).await;
        let joined = join(&mut ann, &room, Some(10)).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(joined["missed"][0]["text"], "after the kill");

        // SIGKILL the other instance: ann keeps the room; bob reconnects and recovers.
        kill_9(&up, "chat-1");
        tokio::task::block_in_place(|| wait_for(&up.lines, "restarted chat-1"));
        let id = send_acked(&mut ann, &room, "while chat-1 restarts", "k2").await;
        assert_eq!(id, 12);
        let mut bob = connect(&c1, &bob_token).await;
        let joined = join(&mut bob, &room, Some(11)).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(joined["missed"][0]["msg_id"], 12);
        send_acked(&mut bob, &room, "back", "k3").await;
        assert_eq!(messages_until(&mut ann, 13).await.last(), Some(&13));
    });
}
