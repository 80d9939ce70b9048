//! Several chat instances as one chat, from outside: clients on different instances of the
//! same rooms, over the documented protocol only.

use std::net::SocketAddr;
use std::time::Duration;

use keel_chat::ChatConfig;
use keel_chat::cluster::{LinkConfig, Links};
use serde_json::{Value, json};
use tokio::net::TcpListener;

mod common;
use common::*;

/// The instance among `names` that holds `room`.
fn owner_of(names: &[&str], room: &str) -> String {
    let links = Links::new(&LinkConfig {
        me: names[0].into(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        request_timeout: Duration::from_secs(5),
        peer_timeout: Duration::from_secs(5),
        list_bytes: keel_chat::hub::MAX_LIST_BYTES,
    })
    .unwrap();
    links.owner(room).to_string()
}

/// A room held by `owner`.
fn room_held_by(names: &[&str], owner: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|room| owner_of(names, room) == owner)
        .unwrap()
}

/// Two instances, `names[0]` and `names[1]`, linked directly (fixed addresses) or by NATS.
struct Pair {
    dirs: [tempfile::TempDir; 2],
    listeners: [SocketAddr; 2],
    names: [String; 2],
    nats: Option<String>,
    /// How long an instance waits for the holder of a room to answer a request.
    request_timeout: Duration,
}

impl Pair {
    async fn new(names: [&str; 2], nats: Option<&str>) -> Pair {
        let mut listeners = Vec::new();
        for _ in 0..2 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.push(l.local_addr().unwrap());
        }
        Pair {
            dirs: [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()],
            listeners: [listeners[0], listeners[1]],
            names: names.map(str::to_owned),
            nats: nats.map(str::to_owned),
            request_timeout: Duration::from_secs(2),
        }
    }

    fn config(&self, i: usize) -> ChatConfig {
        let peers = (0..2)
            .map(|j| match self.nats {
                Some(_) => self.names[j].clone(),
                None => format!("{}={}", self.names[j], self.listeners[j]),
            })
            .collect();
        ChatConfig {
            instance: self.names[i].clone(),
            peers,
            nats: self.nats.clone().unwrap_or_default(),
            peer_timeout: Duration::from_secs(2),
            request_timeout: self.request_timeout,
            sends_per_second: 10_000.0,
            send_burst: 10_000.0,
            ..config(self.dirs[i].path())
        }
    }

    async fn start(&self, i: usize) -> Server {
        // The address was free a moment ago; the listener takes it again (SO_REUSEADDR).
        let listener = TcpListener::bind(self.listeners[i]).await.unwrap();
        start_on(listener, self.config(i)).await
    }
}

/// Joins, retrying while the instance holding the room is not linked yet.
async fn join_linked(ws: &mut Ws, room: &str, since: Option<u64>) -> Value {
    for _ in 0..50 {
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

/// The messages (`msg` frames of `room`) until `count` have come, skipping other frames.
async fn messages(ws: &mut Ws, room: &str, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < count {
        let v = next(ws).await;
        if v["type"] == "msg" && v["room"] == room {
            out.push(v);
        }
    }
    out
}

async fn members_on_both_instances_see_one_order(pair: &Pair) {
    let names = [pair.names[0].as_str(), pair.names[1].as_str()];
    let (a, b) = (pair.start(0).await, pair.start(1).await);
    for owner in names {
        let room = room_held_by(&names, owner, "lobby");
        let mut ann = connect(a.addr, "ann").await;
        let mut bob = connect(b.addr, "bob").await;
        let joined = join_linked(&mut ann, &room, None).await;
        assert_eq!(joined["instance"], names[0], "ann is served by the first");
        let joined = join_linked(&mut bob, &room, None).await;
        assert_eq!(joined["instance"], names[1]);
        assert_eq!(joined["members"], json!(["ann", "bob"]), "{joined}");
        let seen = next_of(&mut ann, "member_joined").await;
        assert_eq!(seen["user"], "bob");
        // Both publish at once, 50 each.
        for i in 0..50 {
            for (ws, who) in [(&mut ann, "a"), (&mut bob, "b")] {
                send(
                    ws,
                    json!({"type": "send", "room": room, "text": format!("{who}{i}"), "client_msg_id": format!("{who}-{i}")}),
                )
                .await;
            }
        }
        let at_ann = messages(&mut ann, &room, 100).await;
        let at_bob = messages(&mut bob, &room, 100).await;
        let ids: Vec<u64> = at_ann
            .iter()
            .map(|m| m["msg_id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ids,
            (1..=100).collect::<Vec<_>>(),
            "every number, in order, at ann"
        );
        assert_eq!(
            at_ann, at_bob,
            "the same messages in the same order on both instances"
        );
        // A resend from the other instance gets the first number and is not delivered again.
        send(
            &mut bob,
            json!({"type": "send", "room": room, "text": "b0", "client_msg_id": "b-0"}),
        )
        .await;
        let ack = loop {
            let v = next(&mut bob).await;
            if v["type"] == "ack" && v["client_msg_id"] == "b-0" {
                break v;
            }
        };
        let first = at_bob.iter().find(|m| m["text"] == "b0").unwrap();
        assert_eq!(ack["msg_id"], first["msg_id"]);
        // Presence and history from either side.
        for ws in [&mut ann, &mut bob] {
            send(ws, json!({"type": "presence", "room": room})).await;
            assert_eq!(
                next_of(ws, "presence").await["members"],
                json!(["ann", "bob"])
            );
            send(
                ws,
                json!({"type": "history", "room": room, "before": 11, "limit": 5}),
            )
            .await;
            let history = next_of(ws, "history").await;
            let ids = msg_ids(&history["messages"]);
            assert_eq!(ids, vec![6, 7, 8, 9, 10]);
        }
        // Leaving on one instance is seen on the other.
        send(&mut bob, json!({"type": "leave", "room": room})).await;
        assert_eq!(next_of(&mut ann, "member_left").await["user"], "bob");
        // A direct message crosses too, to both users' connections.
        send(
            &mut ann,
            json!({"type": "dm", "to": "bob", "text": "psst", "client_msg_id": format!("d-{owner}")}),
        )
        .await;
        let dm = next_of(&mut bob, "msg").await;
        assert_eq!(
            (dm["to"].as_str(), dm["text"].as_str()),
            (Some("bob"), Some("psst"))
        );
        assert_eq!(next_of(&mut ann, "msg").await["text"], "psst");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_linked_directly_serve_one_chat() {
    let pair = Pair::new(["chat-a", "chat-b"], None).await;
    members_on_both_instances_see_one_order(&pair).await;
}

/// The NATS server of this machine, if it runs (else the test is skipped, or fails under
/// KEEL_REQUIRE_SERVICES=1).
async fn nats() -> Option<String> {
    let url = std::env::var("KEEL_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_ok() {
        return Some(url);
    }
    assert!(
        std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "NATS is not running at {url} and KEEL_REQUIRE_SERVICES=1"
    );
    eprintln!("skipped: no NATS at {url}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_linked_by_nats_serve_one_chat() {
    let Some(url) = nats().await else { return };
    // Names of this run only: the subjects are shared with anyone on that server.
    let id = std::process::id();
    let (a, b) = (format!("na{id}"), format!("nb{id}"));
    let pair = Pair::new([&a, &b], Some(&url)).await;
    members_on_both_instances_see_one_order(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_holder_restarts_loses_nothing_and_its_members_elsewhere_catch_up() {
    let pair = Pair::new(["chat-a", "chat-b"], None).await;
    let names = ["chat-a", "chat-b"];
    let room = room_held_by(&names, "chat-a", "hall");
    let (a, b) = (pair.start(0).await, pair.start(1).await);
    let mut bob = connect(b.addr, "bob").await;
    let mut cid = connect(b.addr, "cid").await;
    join_linked(&mut bob, &room, None).await;
    join_linked(&mut cid, &room, None).await;
    for i in 0..10 {
        send(
            &mut bob,
            json!({"type": "send", "room": room, "text": format!("before {i}"), "client_msg_id": format!("x{i}")}),
        )
        .await;
    }
    assert_eq!(messages(&mut cid, &room, 10).await.len(), 10);
    // The holder goes away: a send is answered `unavailable`, not lost in silence.
    a.stop().await;
    send(
        &mut bob,
        json!({"type": "send", "room": room, "text": "during", "client_msg_id": "d"}),
    )
    .await;
    let refused = next_of(&mut bob, "error").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["client_msg_id"], "d");
    // Back, from its journal: the same send, resent, is numbered after the ten.
    let a = pair.start(0).await;
    let mut acked = None;
    for _ in 0..50 {
        send(
            &mut bob,
            json!({"type": "send", "room": room, "text": "during", "client_msg_id": "d"}),
        )
        .await;
        let v = loop {
            let v = next(&mut bob).await;
            if v["type"] == "ack" || v["type"] == "error" {
                break v;
            }
        };
        if v["type"] == "ack" {
            acked = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        acked.expect("acknowledged once the holder is back")["msg_id"],
        11
    );
    // Members elsewhere were re-registered: cid, who never rejoined, gets it in order, and
    // presence still lists both.
    let after = messages(&mut cid, &room, 1).await;
    assert_eq!(after[0]["msg_id"], 11);
    assert_eq!(after[0]["text"], "during");
    let mut ann = connect(a.addr, "ann").await;
    let joined = join_linked(&mut ann, &room, Some(5)).await;
    assert_eq!(joined["members"], json!(["ann", "bob", "cid"]), "{joined}");
    assert_eq!(joined["recovered"], true);
    let missed = msg_ids(&joined["missed"]);
    assert_eq!(missed, (6..=11).collect::<Vec<_>>());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_for_a_restarting_holder_is_answered_when_it_is_back_not_at_its_deadline() {
    let mut pair = Pair::new(["chat-a", "chat-b"], None).await;
    // A deadline far beyond the test's waits (10 s a frame): what answers the send below
    // must be the holder's return, not the deadline.
    pair.request_timeout = Duration::from_secs(60);
    let names = ["chat-a", "chat-b"];
    let room = room_held_by(&names, "chat-a", "lobby");
    let (a, b) = (pair.start(0).await, pair.start(1).await);
    let mut bob = connect(b.addr, "bob").await;
    join_linked(&mut bob, &room, None).await;
    a.stop().await;
    // Sent while the holder is down: chat-b queues it for chat-a, whose next life drops
    // what was queued for the previous one.
    send(
        &mut bob,
        json!({"type": "send", "room": room, "text": "while away", "client_msg_id": "w"}),
    )
    .await;
    let a = pair.start(0).await;
    let answer = loop {
        let v = next(&mut bob).await;
        if v["client_msg_id"] == "w" {
            break v;
        }
    };
    assert!(
        answer["type"] == "ack" || answer["code"] == "unavailable",
        "{answer}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_goes_silent_loses_its_members_and_links_need_the_shared_key() {
    let pair = Pair::new(["chat-a", "chat-b"], None).await;
    let names = ["chat-a", "chat-b"];
    let room = room_held_by(&names, "chat-a", "porch");
    let (a, b) = (pair.start(0).await, pair.start(1).await);
    let mut ann = connect(a.addr, "ann").await;
    join_linked(&mut ann, &room, None).await;
    let mut bob = connect(b.addr, "bob").await;
    join_linked(&mut bob, &room, None).await;
    assert_eq!(next_of(&mut ann, "member_joined").await["user"], "bob");
    // chat-b stops: after the peer timeout bob leaves the room it held no longer.
    b.stop().await;
    let left = next_of(&mut ann, "member_left").await;
    assert_eq!(left["user"], "bob");
    // A link needs an instance's token: a user's is refused, and so is none.
    let token = login(a.addr, "mallory").await;
    let (status, _) = http(
        a.addr,
        &format!("GET /chat/relay?token={token} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
        "",
    )
    .await;
    assert_eq!(status, 401);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_kept_in_jetstream_outlives_the_instance_disk() {
    let Some(url) = nats().await else { return };
    let instance = format!("js{}", std::process::id());
    let journal_config = |dir: &std::path::Path| ChatConfig {
        instance: instance.clone(),
        journal: url.clone(),
        sends_per_second: 10_000.0,
        send_burst: 10_000.0,
        ..config(dir)
    };
    let first_disk = tempfile::tempdir().unwrap();
    let server = start(journal_config(first_disk.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    join(&mut ann, "log", None).await;
    for i in 0..5 {
        send(
            &mut ann,
            json!({"type": "send", "room": "log", "text": format!("m{i}"), "client_msg_id": format!("c{i}")}),
        )
        .await;
    }
    assert_eq!(messages(&mut ann, "log", 5).await.len(), 5);
    server.stop().await;
    drop(first_disk);
    // Another disk, the same stream: every acknowledged message is there, and numbering goes on.
    let second_disk = tempfile::tempdir().unwrap();
    let server = start(journal_config(second_disk.path())).await;
    let mut ann = connect(server.addr, "ann").await;
    let joined = join(&mut ann, "log", Some(0)).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["missed"].as_array().unwrap().len(), 5);
    send(
        &mut ann,
        json!({"type": "send", "room": "log", "text": "m5", "client_msg_id": "c5"}),
    )
    .await;
    assert_eq!(messages(&mut ann, "log", 1).await[0]["msg_id"], 6);
    server.stop().await;
    // The stream was this test's own.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream(format!("keel-chat-{instance}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_and_history_from_another_instance_carry_as_much_as_on_the_holder() {
    let pair = Pair::new(["chat-a", "chat-b"], None).await;
    let names = ["chat-a", "chat-b"];
    let room = room_held_by(&names, "chat-a", "long");
    let (a, b) = (pair.start(0).await, pair.start(1).await);
    let mut ann = connect(a.addr, "ann").await;
    join_linked(&mut ann, &room, None).await;
    let text = "x".repeat(4000);
    for i in 0..250 {
        send(
            &mut ann,
            json!({"type": "send", "room": room, "text": text, "client_msg_id": format!("c{i}")}),
        )
        .await;
    }
    assert_eq!(messages(&mut ann, &room, 250).await.len(), 250);
    // 150 messages of 4 KB: about 615 KB, within a joined frame's 1 MiB on either instance.
    for server in [&a, &b] {
        let mut bob = connect(server.addr, "bob").await;
        let joined = join_linked(&mut bob, &room, Some(100)).await;
        assert_eq!(joined["recovered"], true, "on {}", joined["instance"]);
        assert_eq!(msg_ids(&joined["missed"]), (101..=250).collect::<Vec<_>>());
        send(
            &mut bob,
            json!({"type": "history", "room": room, "before": 251, "limit": 150}),
        )
        .await;
        let history = next_of(&mut bob, "history").await;
        assert_eq!(msg_ids(&history["messages"]).len(), 150);
    }
    a.stop().await;
    b.stop().await;
}
