//! Timer-driven behaviour under tokio's paused clock: the runtime jumps to the next timer
//! whenever every task is idle, so long timeouts are tested exactly and instantly.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{TEST_SERVICE, TestServer};
use keel_echo::{EchoReply, EchoRequest};
use keel_rpc::{CallOptions, Channel, ChannelConfig, Code, ServerConfig};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn deadline_fires_at_the_deadline_not_at_the_handler() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let started = Instant::now();
    let req = EchoRequest {
        message: "3600000".into(),
        payload: Default::default(),
    };
    let err = keel_rpc::client::unary::<_, _, EchoReply>(
        &channel,
        TEST_SERVICE,
        "Sleep",
        &req,
        CallOptions::default().timeout(Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // On the paused clock exactly 30 s pass, not the handler's hour.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    // The server dropped the handler at the same deadline.
    for _ in 0..100 {
        if server.probe.dropped_unfinished.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server did not stop the handler at the deadline");
}

#[tokio::test(start_paused = true)]
async fn idle_connection_closes_after_exactly_the_idle_timeout() {
    let config = ServerConfig {
        idle_timeout: Duration::from_secs(120),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    // Keepalive pings would keep the connection busy; make them rarer than the idle timeout.
    let client_config = ChannelConfig {
        keepalive_interval: Duration::from_secs(3600),
        ..ChannelConfig::default()
    };
    let channel = Channel::connect(server.addr.to_string(), client_config)
        .await
        .unwrap();
    let started = Instant::now();
    let mut state = channel.state();
    while state == keel_rpc::client::ConnectivityState::Ready {
        state = channel
            .wait_for_state_change(Duration::from_secs(3600))
            .await;
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(120) && waited < Duration::from_secs(160),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_only_idle_connections_ends_at_once_not_after_the_grace() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    // An idle binary connection that has made a call, and an idle HTTP keep-alive connection.
    let channel = server.channel().await;
    let req = EchoRequest {
        message: "0".into(),
        payload: Default::default(),
    };
    keel_rpc::client::unary::<_, _, EchoReply>(
        &channel,
        TEST_SERVICE,
        "Sleep",
        &req,
        CallOptions::default(),
    )
    .await
    .unwrap();
    let mut http = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut http, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut http, &mut buf)
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let started = Instant::now();
    server.shutdown().await.unwrap().unwrap();
    // On the paused clock, waiting out the grace period would show as 60 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    drop(channel);
}
