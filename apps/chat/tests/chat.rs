//! The chat protocol from outside: real sockets, a WebSocket client library, the documented
//! messages only.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use keel_chat::ChatConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

mod common;
use common::*;

#[tokio::test]
async fn members_see_every_message_in_one_order_and_the_sender_gets_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    let mut bob = connect(server.addr, "bob").await;
    let joined = join(&mut ann, "lobby", None).await;
    assert_eq!(joined["members"], json!(["ann"]));
    assert_eq!(joined["last_msg_id"], 0);
    assert_eq!(joined["instance"], "chat-test");
    let joined = join(&mut bob, "lobby", None).await;
    assert_eq!(joined["members"], json!(["ann", "bob"]));
    let change = next_of(&mut ann, "member_joined").await;
    assert_eq!(
        (change["room"].clone(), change["user"].clone()),
        (json!("lobby"), json!("bob"))
    );

    // Both send at once; every member sees 1..=40 in one order, the senders included.
    for i in 0..20 {
        send(&mut ann, json!({"type":"send","room":"lobby","text":format!("a{i}"),"client_msg_id":format!("a{i}")})).await;
        send(&mut bob, json!({"type":"send","room":"lobby","text":format!("b{i}"),"client_msg_id":format!("b{i}")})).await;
    }
    let mut seen = Vec::new();
    for ws in [&mut ann, &mut bob] {
        let mut msgs = Vec::new();
        let mut acks = 0;
        while msgs.len() < 40 || acks < 20 {
            let v = next(ws).await;
            match v["type"].as_str().unwrap() {
                "msg" => msgs.push((
                    v["msg_id"].as_u64().unwrap(),
                    v["text"].as_str().unwrap().to_owned(),
                )),
                "ack" => acks += 1,
                other => panic!("unexpected {other}: {v}"),
            }
        }
        let ids: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            ids,
            (1..=40).collect::<Vec<_>>(),
            "numbered 1, 2, 3… without gaps"
        );
        seen.push(msgs);
    }
    assert_eq!(seen[0], seen[1], "both members see the same order");
    // A connection's own messages keep the order it sent them in.
    let mine: Vec<&str> = seen[0]
        .iter()
        .map(|m| m.1.as_str())
        .filter(|t| t.starts_with('a'))
        .collect();
    assert_eq!(mine, (0..20).map(|i| format!("a{i}")).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn resends_are_acknowledged_once_and_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    join(&mut ann, "r", None).await;
    let mut acked = Vec::new();
    for i in 1..=5 {
        send(&mut ann, json!({"type":"send","room":"r","text":format!("m{i}"),"client_msg_id":format!("c{i}")})).await;
        let ack = next_of(&mut ann, "ack").await;
        assert_eq!(ack["client_msg_id"], format!("c{i}"));
        acked.push(ack["msg_id"].as_u64().unwrap());
    }
    assert_eq!(acked, vec![1, 2, 3, 4, 5]);
    drop(ann);
    server.stop().await;

    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    let joined = join(&mut ann, "r", Some(2)).await;
    assert_eq!(joined["last_msg_id"], 5);
    assert_eq!(joined["recovered"], true);
    let missed = msg_ids(&joined["missed"]);
    assert_eq!(missed, vec![3, 4, 5]);
    // The same client_msg_id after the restart: the first number, nothing delivered again.
    send(
        &mut ann,
        json!({"type":"send","room":"r","text":"m3 again","client_msg_id":"c3"}),
    )
    .await;
    let ack = next(&mut ann).await;
    assert_eq!(
        (ack["type"].clone(), ack["msg_id"].clone()),
        (json!("ack"), json!(3))
    );
    send(
        &mut ann,
        json!({"type":"send","room":"r","text":"m6","client_msg_id":"c6"}),
    )
    .await;
    let msg = next(&mut ann).await;
    assert_eq!(
        (
            msg["type"].clone(),
            msg["msg_id"].clone(),
            msg["text"].clone()
        ),
        (json!("msg"), json!(6), json!("m6"))
    );
    // History: the newest `limit` below `before`, oldest first.
    send(
        &mut ann,
        json!({"type":"history","room":"r","before":6,"limit":2}),
    )
    .await;
    let history = next_of(&mut ann, "history").await;
    let ids = msg_ids(&history["messages"]);
    assert_eq!(ids, vec![4, 5]);
    server.stop().await;
}

#[tokio::test]
async fn snapshots_cut_the_journal_and_a_restart_reads_them_back_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        snapshot_every: 10,
        sends_per_second: 1000.0,
        send_burst: 1000.0,
        ..config(dir.path())
    })
    .await;
    let mut ann = connect(server.addr, "ann").await;
    join(&mut ann, "a", None).await;
    join(&mut ann, "b", None).await;
    for i in 1..=35 {
        let room = if i % 2 == 0 { "a" } else { "b" };
        send(&mut ann, json!({"type":"send","room":room,"text":format!("m{i}"),"client_msg_id":format!("c{i}")})).await;
        next_of(&mut ann, "ack").await;
    }
    drop(ann);
    server.stop().await;
    let snapshots = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("snap")
        })
        .count();
    assert!(snapshots > 0, "a snapshot was written");

    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    for (room, count) in [("a", 17u64), ("b", 18)] {
        let joined = join(&mut ann, room, Some(0)).await;
        let texts: Vec<(u64, String)> = joined["missed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["msg_id"].as_u64().unwrap(),
                    m["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(texts.len() as u64, count, "{room}: {texts:?}");
        assert_eq!(
            texts.iter().map(|t| t.0).collect::<Vec<_>>(),
            (1..=count).collect::<Vec<_>>()
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn recovery_past_the_kept_history_says_so_and_never_has_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        history: 5,
        ..config(dir.path())
    })
    .await;
    let mut ann = connect(server.addr, "ann").await;
    join(&mut ann, "r", None).await;
    for i in 1..=12 {
        send(&mut ann, json!({"type":"send","room":"r","text":format!("m{i}"),"client_msg_id":format!("c{i}")})).await;
        next_of(&mut ann, "ack").await;
    }
    let mut bob = connect(server.addr, "bob").await;
    let joined = join(&mut bob, "r", Some(3)).await;
    assert_eq!(joined["recovered"], false);
    let missed = msg_ids(&joined["missed"]);
    assert_eq!(
        missed,
        vec![8, 9, 10, 11, 12],
        "the newest kept, up to last_msg_id, without a hole"
    );
    let joined = join(&mut bob, "r", Some(9)).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["missed"].as_array().unwrap().len(), 3);
    // Numbers past the room's last message: not recovered, never a silent success.
    let joined = join(&mut bob, "r", Some(40)).await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["missed"].as_array().unwrap().len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn presence_lists_users_once_while_any_of_their_connections_is_in_the_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut watcher = connect(server.addr, "wat").await;
    join(&mut watcher, "r", None).await;
    let mut ann1 = connect(server.addr, "ann").await;
    let mut ann2 = connect(server.addr, "ann").await;
    join(&mut ann1, "r", None).await;
    let joined = join(&mut ann2, "r", None).await;
    assert_eq!(joined["members"], json!(["ann", "wat"]));
    assert_eq!(next_of(&mut watcher, "member_joined").await["user"], "ann");
    send(&mut ann1, json!({"type":"leave","room":"r"})).await;
    send(&mut watcher, json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        next_of(&mut watcher, "presence").await["members"],
        json!(["ann", "wat"])
    );
    drop(ann2);
    let left = next_of(&mut watcher, "member_left").await;
    assert_eq!(left["user"], "ann");
    send(&mut watcher, json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        next_of(&mut watcher, "presence").await["members"],
        json!(["wat"])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_direct_message_reaches_every_connection_of_both_users() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    let mut bob1 = connect(server.addr, "bob").await;
    let mut bob2 = connect(server.addr, "bob").await;
    // Let the connections register before the message is sent.
    send(&mut bob2, json!({"type":"ping"})).await;
    next_of(&mut bob2, "pong").await;
    send(&mut bob1, json!({"type":"ping"})).await;
    next_of(&mut bob1, "pong").await;
    send(
        &mut ann,
        json!({"type":"dm","to":"bob","text":"hi","client_msg_id":"d1"}),
    )
    .await;
    for ws in [&mut bob1, &mut bob2] {
        let m = next_of(ws, "msg").await;
        assert_eq!(
            (
                m["to"].clone(),
                m["user"].clone(),
                m["text"].clone(),
                m["msg_id"].clone()
            ),
            (json!("bob"), json!("ann"), json!("hi"), json!(1))
        );
        assert!(m.get("room").is_none());
    }
    assert_eq!(next_of(&mut ann, "msg").await["to"], "bob");
    server.stop().await;
}

#[tokio::test]
async fn direct_conversations_are_out_of_reach_of_room_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    send(
        &mut ann,
        json!({"type":"dm","to":"bob","text":"secret","client_msg_id":"d1"}),
    )
    .await;
    next_of(&mut ann, "ack").await;
    let mut eve = connect(server.addr, "eve").await;
    for request in [
        json!({"type":"history","room":"dm\nann\nbob"}),
        json!({"type":"presence","room":"dm\nann\nbob"}),
        json!({"type":"join","room":"dm\nann\nbob","since":0}),
    ] {
        send(&mut eve, request).await;
        let answer = next(&mut eve).await;
        assert_eq!(answer["code"], "bad_name", "{answer}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_close_code_no_endpoint_may_send_is_answered_with_1002() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut raw = raw_client(server.addr, "ann", None).await;
    // A masked close frame (mask 0) with code 1005.
    raw.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xed])
        .await
        .unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(1002));
    let mut raw = raw_client(server.addr, "bob", None).await;
    raw.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x0f, 0xa0])
        .await
        .unwrap();
    assert_eq!(
        raw_close_code(&mut raw).await,
        Some(4000),
        "a valid code is echoed"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_upgrade_and_expired_ones_closed_with_4001() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        token_ttl: Duration::from_secs(1),
        ..config(dir.path())
    })
    .await;
    let upgrade = |token: &str| {
        format!(
            "GET /chat/ws?token={token} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
        )
    };
    let (status, _) = http(server.addr, &upgrade("not-a-token"), "").await;
    assert_eq!(status, 401);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"ann","exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"another key"),
    )
    .unwrap();
    let (status, _) = http(server.addr, &upgrade(&forged), "").await;
    assert_eq!(status, 401);
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"ann","exp": 1_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, _) = http(server.addr, &upgrade(&expired), "").await;
    assert_eq!(status, 401);
    // A token that expires while connected: close 4001.
    let mut ann = connect(server.addr, "ann").await;
    assert_eq!(close_code(&mut ann).await, 4001);
    server.stop().await;
}

#[tokio::test]
async fn limits_answer_with_errors_or_close_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        max_text_chars: 10,
        max_message_bytes: 1024,
        max_rooms_per_connection: 2,
        sends_per_second: 0.1,
        send_burst: 6.0,
        abuse_after: 5,
        ..config(dir.path())
    })
    .await;
    let mut ann = connect(server.addr, "ann").await;
    send(&mut ann, json!({"type":"shout"})).await;
    assert_eq!(next(&mut ann).await["code"], "bad_request");
    send(
        &mut ann,
        json!({"type":"send","room":"r","text":"x","client_msg_id":"1"}),
    )
    .await;
    let e = next(&mut ann).await;
    assert_eq!(
        (e["code"].clone(), e["client_msg_id"].clone()),
        (json!("not_joined"), json!("1"))
    );
    join(&mut ann, "r1", None).await;
    join(&mut ann, "r2", None).await;
    send(&mut ann, json!({"type":"join","room":"r3"})).await;
    assert_eq!(next(&mut ann).await["code"], "too_many_rooms");
    send(
        &mut ann,
        json!({"type":"send","room":"r1","text":"much too long text","client_msg_id":"2"}),
    )
    .await;
    assert_eq!(next(&mut ann).await["code"], "too_long");
    // Every request but leave and ping takes a token: five so far, one left, then the limit
    // answers.
    send(
        &mut ann,
        json!({"type":"send","room":"r1","text":"ok","client_msg_id":"3"}),
    )
    .await;
    let mut codes = Vec::new();
    for i in 0..3 {
        send(
            &mut ann,
            json!({"type":"send","room":"r1","text":"ok","client_msg_id":format!("x{i}")}),
        )
        .await;
    }
    while codes.len() < 3 {
        let v = next(&mut ann).await;
        if v["type"] == "error" {
            codes.push(v["code"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(codes, vec!["rate_limited"; 3]);
    // Keep going far over the limit: closed with 4008.
    for i in 0..10 {
        let _ = ann
            .send(WsMessage::Text(
                json!({"type":"send","room":"r1","text":"ok","client_msg_id":format!("y{i}")})
                    .to_string()
                    .into(),
            ))
            .await;
    }
    assert_eq!(close_code(&mut ann).await, 4008);

    let mut bob = connect(server.addr, "bob").await;
    bob.send(WsMessage::Text("x".repeat(2000).into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut bob).await, 1009);
    let mut cat = connect(server.addr, "cat").await;
    cat.send(WsMessage::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut cat).await,
        u16::from(CloseCode::Unsupported)
    );
    server.stop().await;
}

/// A WebSocket client on a raw socket: it reads only when told to, and never answers pings.
async fn raw_client(addr: SocketAddr, user: &str, recv_buffer: Option<u32>) -> TcpStream {
    let token = login(addr, user).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    let req = format!(
        "GET /chat/ws?token={token} HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Writes a masked client text frame.
async fn raw_send(s: &mut TcpStream, text: &str) {
    let mut frame = vec![0x81];
    let len = text.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    s.write_all(&frame).await.unwrap();
}

/// Reads server frames until a close frame (for 20 s at most); returns its code.
async fn raw_close_code(s: &mut TcpStream) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(20), raw_close_code_inner(s))
        .await
        .ok()
        .flatten()
}

async fn raw_close_code_inner(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut h = [0u8; 2];
        if s.read_exact(&mut h).await.is_err() {
            return None;
        }
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await.ok()?);
        } else if len == 127 {
            len = s.read_u64().await.ok()?;
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 0x8 {
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_falls_behind_is_closed_with_4009_and_the_room_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        send_queue: 128,
        sends_per_second: 100_000.0,
        send_burst: 100_000.0,
        ..config(dir.path())
    })
    .await;
    // A small receive buffer, and it never reads: what the server sends it piles up.
    let mut slow = raw_client(server.addr, "slow", Some(4096)).await;
    raw_send(&mut slow, r#"{"type":"join","room":"r"}"#).await;
    let mut fast = connect(server.addr, "fast").await;
    join(&mut fast, "r", None).await;
    let mut publisher = connect(server.addr, "pub").await;
    join(&mut publisher, "r", None).await;
    // 8 MB in all, more than the slow socket's buffers and its queue together can hold; in
    // rounds of 50, so a reader that keeps up never has more than a round queued.
    let (rounds, per_round) = (54u64, 50u64);
    let total = rounds * per_round;
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < total {
            let v = next(&mut fast).await;
            if v["type"] == "msg" {
                assert_eq!(
                    v["msg_id"].as_u64().unwrap(),
                    last + 1,
                    "in order, without gaps"
                );
                last += 1;
            }
        }
    });
    let text = "y".repeat(3000);
    for round in 0..rounds {
        for i in 0..per_round {
            let id = format!("p{round}-{i}");
            send(
                &mut publisher,
                json!({"type":"send","room":"r","text":text,"client_msg_id":id}),
            )
            .await;
        }
        let mut acks = 0;
        while acks < per_round {
            if next(&mut publisher).await["type"] == "ack" {
                acks += 1;
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader that keeps up gets every message")
        .unwrap();
    assert_eq!(
        raw_close_code(&mut slow).await,
        Some(4009),
        "the close frame is sent, with its code"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_connection_that_answers_no_ping_is_dropped_and_leaves_presence() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        ping_interval: Duration::from_millis(200),
        pong_timeout: Duration::from_millis(700),
        ..config(dir.path())
    })
    .await;
    let mut watcher = connect(server.addr, "wat").await;
    join(&mut watcher, "r", None).await;
    let mut silent = raw_client(server.addr, "mute", None).await;
    raw_send(&mut silent, r#"{"type":"join","room":"r"}"#).await;
    assert_eq!(next_of(&mut watcher, "member_joined").await["user"], "mute");
    let started = std::time::Instant::now();
    assert_eq!(next_of(&mut watcher, "member_left").await["user"], "mute");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The watcher answers pings (the library does) and stays.
    send(&mut watcher, json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        next_of(&mut watcher, "presence").await["members"],
        json!(["wat"])
    );
    server.stop().await;
}

#[tokio::test]
async fn login_is_rate_limited_per_address_and_checks_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ChatConfig {
        logins_per_second: 1.0,
        login_burst: 3.0,
        ..config(dir.path())
    })
    .await;
    let (status, body) = http(
        server.addr,
        "POST /chat/api/login HTTP/1.1",
        r#"{"user":""}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(server.addr, "POST /chat/api/login HTTP/1.1", "{").await;
    assert_eq!(status, 400);
    login(server.addr, "ann").await;
    let (status, body) = http(
        server.addr,
        "POST /chat/api/login HTTP/1.1",
        r#"{"user":"ann"}"#,
    )
    .await;
    assert_eq!(status, 429, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    join(&mut ann, "r", None).await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(close_code(&mut ann).await, 1001);
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_counts_every_delivery_with_tokens_it_signs_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let summary = keel_chat::bench::run(&keel_chat::bench::ChatBenchArgs {
        protocol: keel_chat::bench::Protocol::Keel,
        addrs: vec![server.addr],
        secret_file: Some(secret),
        connections: 60,
        room_size: 20,
        rate: 60.0,
        per_connection_rate: 10.0,
        seconds: 1.0,
        sources: 2,
        churn: 20.0,
        pids: vec![std::process::id()],
    })
    .await
    .unwrap();
    assert_eq!(summary["connections"], 60, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent > 20, "{summary}");
    assert_eq!(
        summary["delivered"].as_u64().unwrap(),
        sent * 20,
        "{summary}"
    );
    assert_eq!(
        (
            summary["lost"].clone(),
            summary["gaps"].clone(),
            summary["errors"].clone()
        ),
        (json!(0), json!(0), json!(0)),
        "{summary}"
    );
    assert!(summary["kb_per_conn"].is_number(), "{summary}");
    assert!(
        summary["churn_per_s"].as_f64().unwrap() >= 10.0,
        "{summary}"
    );
    assert_eq!(summary["churn_failed"], 0, "{summary}");
    server.stop().await;
}
