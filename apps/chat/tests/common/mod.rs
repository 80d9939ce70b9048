//! What the chat's tests share: servers in this process, and a client of the documented
//! protocol (a WebSocket library, JSON frames).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use keel_chat::{Chat, ChatConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub(crate) const SECRET: &str = "test-secret";

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = (&mut self.done).await;
    }
}

pub(crate) fn config(dir: &std::path::Path) -> ChatConfig {
    ChatConfig {
        data_dir: dir.display().to_string(),
        secret: SECRET.into(),
        instance: "chat-test".into(),
        ..ChatConfig::default()
    }
}

pub(crate) async fn start(config: ChatConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, config).await
}

/// Serves `config` on a listener bound already (its address named in other configs).
pub(crate) async fn start_on(listener: tokio::net::TcpListener, config: ChatConfig) -> Server {
    let addr = listener.local_addr().unwrap();
    let chat = Chat::open(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        chat.serve(listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        addr,
        stop: Some(stop),
        done,
    }
}

/// A raw HTTP/1.1 exchange; returns the status and the body.
pub(crate) async fn http(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: chat\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

pub(crate) async fn login(addr: SocketAddr, user: &str) -> String {
    let (status, body) = http(
        addr,
        "POST /chat/api/login HTTP/1.1",
        &json!({ "user": user }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

pub(crate) async fn connect(addr: SocketAddr, user: &str) -> Ws {
    let token = login(addr, user).await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat/ws?token={token}"))
        .await
        .unwrap();
    ws
}

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::Text(v.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame (pings are answered by the library).
pub(crate) async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open")
            .unwrap();
        match msg {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The next frame of type `kind`, skipping others.
pub(crate) async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// The close code the server ends the connection with.
pub(crate) async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => return u16::from(frame.code),
            Ok(Some(Ok(WsMessage::Close(None)))) => return 1005,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

pub(crate) async fn join(ws: &mut Ws, room: &str, since: Option<u64>) -> Value {
    let mut m = json!({ "type": "join", "room": room });
    if let Some(since) = since {
        m["since"] = json!(since);
    }
    send(ws, m).await;
    next_of(ws, "joined").await
}

/// The `msg_id`s of a list of messages (`missed`, `messages`).
pub(crate) fn msg_ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| m["msg_id"].as_u64().unwrap())
        .collect()
}
