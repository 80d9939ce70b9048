//! Black-box tests of the binary protocol: a real server on port 0, real clients and raw
//! sockets speaking frames by hand.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{TEST_SERVICE, TestServer, eventually, raw_connect, read_frames_until_close};
use keel_echo::{CountRequest, EchoClient, EchoReply, EchoRequest};
use keel_rpc::client::{CallTransport, ConnectivityState, RawRequest};
use keel_rpc::protocol::{Frame, FrameType, MAGIC, Metadata, Text, VERSION};
use keel_rpc::{CallOptions, Channel, ChannelConfig, Code, Codec, ServerConfig, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn call(
    channel: &Channel,
    method: &'static str,
    message: &str,
    options: CallOptions,
) -> Result<EchoReply, Status> {
    let req = EchoRequest {
        message: message.into(),
        payload: Default::default(),
    };
    keel_rpc::client::unary(channel, TEST_SERVICE, method, &req, options).await
}

/// Starts `n` calls that sleep 300 ms and waits until all of them run on the server.
async fn occupy(
    server: &TestServer,
    channel: &Channel,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<EchoReply, Status>>> {
    let mut slow = Vec::new();
    for _ in 0..n {
        let channel = channel.clone();
        slow.push(tokio::spawn(async move {
            call(&channel, "Sleep", "300", CallOptions::default()).await
        }));
    }
    eventually("the slow calls running", || {
        server.probe.started.load(Ordering::SeqCst) == n
    })
    .await;
    slow
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).unwrap();
    buf.to_vec()
}

fn request_frame(id: u64, service: &str, method: &str, timeout: Option<Duration>) -> Frame {
    let mut f = Frame::new(FrameType::Request, id);
    f.meta.service = Some(service.into());
    f.meta.method = Some(method.into());
    f.meta.timeout = timeout;
    f
}

#[tokio::test]
async fn unary_call_in_both_codecs() {
    let server = TestServer::start(ServerConfig::default()).await;
    let client = EchoClient::new(server.channel().await);
    let req = EchoRequest {
        message: "hello".into(),
        payload: vec![0, 1, 2, 255].into(),
    };
    for codec in [Codec::Protobuf, Codec::Json] {
        let reply = client
            .echo_with(&req, CallOptions::default().codec(codec))
            .await
            .unwrap();
        assert_eq!(reply.message, "hello");
        assert_eq!(reply.payload[..], [0, 1, 2, 255]);
    }
}

#[tokio::test]
async fn server_streaming_delivers_every_item_then_ends() {
    let server = TestServer::start(ServerConfig::default()).await;
    let client = EchoClient::new(Channel::new(server.addr.to_string()));
    for codec in [Codec::Protobuf, Codec::Json] {
        let mut stream = client
            .count_with(
                &CountRequest {
                    count: 5,
                    interval_ms: 1,
                },
                CallOptions::default().codec(codec),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(item) = stream.message().await.unwrap() {
            seen.push(item.n);
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    }
    // An error before the first item ends the stream with that status.
    let mut stream = client
        .count(&CountRequest {
            count: 1_000_000,
            interval_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        stream.message().await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn thousand_concurrent_calls_on_one_connection_pair_correctly() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let channel = channel.clone();
        calls.spawn(async move {
            // Sleep times vary so replies come back in a different order than requests.
            let ms = (i * 7919) % 23;
            let req = EchoRequest {
                message: ms.to_string(),
                payload: i.to_be_bytes().to_vec().into(),
            };
            let reply: EchoReply = keel_rpc::client::unary(
                &channel,
                TEST_SERVICE,
                "Sleep",
                &req,
                CallOptions::default(),
            )
            .await
            .unwrap();
            assert_eq!(
                reply.payload[..],
                i.to_be_bytes()[..],
                "reply paired with the wrong call"
            );
            i
        });
    }
    let mut done = Vec::new();
    while let Some(r) = calls.join_next().await {
        done.push(r.unwrap());
    }
    done.sort_unstable();
    assert_eq!(done, (0..1000).collect::<Vec<_>>());
    assert_eq!(
        server
            .server
            .stats()
            .connections
            .open
            .load(Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn replies_come_back_in_completion_order() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for ms in ["300", "0"] {
        let channel = channel.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = call(&channel, "Sleep", ms, CallOptions::default())
                .await
                .unwrap();
            tx.send(reply.message).unwrap();
        });
        // Make sure the slow call is sent first.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rx.recv().await.unwrap(), "0");
    assert_eq!(rx.recv().await.unwrap(), "300");
}

#[tokio::test]
async fn deadline_exceeded_and_handler_sees_remaining_time() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let err = call(
        &channel,
        "Sleep",
        "10000",
        CallOptions::default().timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");

    let reply = call(
        &channel,
        "Remaining",
        "",
        CallOptions::default().timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let remaining: u64 = reply.message.parse().unwrap();
    assert!(
        remaining > 0 && remaining <= 5000,
        "remaining {remaining} ms"
    );
    let reply = call(&channel, "Remaining", "", CallOptions::default())
        .await
        .unwrap();
    assert_eq!(reply.message, "none");

    // The server stops the handler at the deadline too: the sleeping handler was dropped.
    eventually("server-side deadline stops the handler", || {
        server.probe.dropped_unfinished.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn expired_request_is_not_started() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut frame = request_frame(1, TEST_SERVICE, "Sleep", Some(Duration::ZERO));
    frame.body = Bytes::new();
    let mut stream = raw_connect(server.addr, &frame_bytes(&frame)).await;
    stream
        .write_all(&frame_bytes(&Frame::new(FrameType::GoAway, 0)))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let reply = loop {
        if let Some(f) = Frame::decode(&mut buf, 1 << 20).unwrap() {
            break f;
        }
        assert!(stream.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert_eq!(reply.kind, FrameType::Response);
    assert_eq!(reply.request_id, 1);
    assert_eq!(reply.meta.status, Some(Code::DeadlineExceeded));
    assert_eq!(server.probe.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dropping_a_call_cancels_its_handler() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let call_fut = call(&channel, "Sleep", "60000", CallOptions::default());
    // Give up on the call from the client side only (no deadline is sent to the server).
    let gave_up = tokio::time::timeout(Duration::from_millis(200), call_fut).await;
    assert!(gave_up.is_err());
    eventually("cancel frame stops the handler", || {
        server.probe.dropped_unfinished.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(server.probe.started.load(Ordering::SeqCst), 1);
    eventually("in-flight gauge returns to zero", || {
        server.server.stats().inflight.load(Ordering::SeqCst) == 0
    })
    .await;
    // The cancelled call is counted as such.
    let (_, metrics) = common::http(server.addr, "GET", "/metrics", "").await;
    assert!(
        metrics.contains(
            r#"keel_rpc_requests_total{service="test.Test",method="Sleep",status="cancelled"} 1"#
        ),
        "{metrics}"
    );
    // The connection is still good.
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn unknown_service_or_method_is_not_found() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let raw = |service: &'static str, method: &'static str| RawRequest {
        service: Text::from_static(service),
        method: Text::from_static(method),
        body: Bytes::new(),
        options: CallOptions::default(),
    };
    let err = channel.unary_raw(raw("no.Such", "Echo")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no.Such"), "{err}");
    let err = channel
        .unary_raw(raw("keel.echo.v1.Echo", "Nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("Nope"), "{err}");
}

#[tokio::test]
async fn handler_panic_is_internal_and_server_keeps_serving() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    for _ in 0..3 {
        let err = call(&channel, "Panic", "", CallOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("panicked on purpose"), "{err}");
        let err = call(&channel, "PanicLater", "", CallOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("panicked later on purpose"), "{err}");
    }
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_frame_closes_only_that_connection() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let garbage_cases: Vec<Vec<u8>> = vec![
        // Right magic, wrong version.
        vec![
            MAGIC[0], MAGIC[1], 99, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
        ],
        // Unknown frame type.
        vec![
            MAGIC[0], MAGIC[1], VERSION, 77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
        ],
        // Metadata entry that runs past its section.
        {
            let mut b = BytesMut::new();
            b.put_slice(&MAGIC);
            b.put_slice(&[VERSION, FrameType::Request as u8, 0, 0]);
            b.put_u16(3);
            b.put_u64(1);
            b.put_u32(0);
            b.put_slice(&[1, 0, 50]);
            b.to_vec()
        },
        // A response frame sent to a server.
        frame_bytes(&Frame::new(FrameType::Response, 5)),
    ];
    for garbage in garbage_cases {
        let mut stream = raw_connect(server.addr, &garbage).await;
        let (frames, closed) = read_frames_until_close(&mut stream).await;
        assert!(
            closed,
            "server must close a connection that sent a malformed frame"
        );
        let goaway = frames
            .iter()
            .find(|f| f.kind == FrameType::GoAway)
            .expect("a goaway explaining why");
        assert_eq!(goaway.meta.status, Some(Code::InvalidArgument));
        assert!(
            goaway
                .meta
                .message
                .as_deref()
                .unwrap_or("")
                .contains("protocol error")
        );
        // Other connections are unaffected.
        call(&channel, "Sleep", "0", CallOptions::default())
            .await
            .unwrap();
    }
    assert!(server.server.stats().protocol_errors.load(Ordering::SeqCst) >= 4);
}

/// A streaming call sent in the same write as a malformed frame never runs on after the
/// protocol error: the GoAway is the connection's last frame (docs/protocol.md §10.3).
#[tokio::test]
async fn the_protocol_error_goaway_is_the_last_frame_even_with_a_stream_running() {
    use keel_rpc::__private::prost::Message as _;
    let server = TestServer::start(ServerConfig::default()).await;
    let mut stream_request = request_frame(1, "keel.echo.v1.Echo", "Count", None);
    stream_request.body = CountRequest {
        count: 2000,
        interval_ms: 0,
    }
    .encode_to_vec()
    .into();
    let mut bytes = frame_bytes(&stream_request);
    // Unknown frame type.
    bytes.extend_from_slice(&[
        MAGIC[0], MAGIC[1], VERSION, 77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
    ]);
    for trial in 0..40 {
        let mut conn = raw_connect(server.addr, &bytes).await;
        let (frames, closed) = read_frames_until_close(&mut conn).await;
        assert!(closed, "trial {trial}");
        let last = frames.last().expect("a goaway");
        assert_eq!(
            last.kind,
            FrameType::GoAway,
            "trial {trial}: {} frames, the last a {:?}",
            frames.len(),
            last.kind
        );
        assert_eq!(
            frames
                .iter()
                .filter(|f| f.kind == FrameType::GoAway)
                .count(),
            1
        );
    }
}

#[tokio::test]
async fn oversized_frame_is_refused() {
    let config = ServerConfig {
        max_frame_size: 64 * 1024,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    // A header declaring a 1 GiB body: refused from the header alone.
    let mut header = BytesMut::new();
    header.put_slice(&MAGIC);
    header.put_slice(&[VERSION, FrameType::Request as u8, 0, 0]);
    header.put_u16(0);
    header.put_u64(1);
    header.put_u32(1 << 30);
    let mut stream = raw_connect(server.addr, &header).await;
    let (frames, closed) = read_frames_until_close(&mut stream).await;
    assert!(closed);
    let msg = frames[0].meta.message.as_deref().unwrap_or("").to_owned();
    assert!(msg.contains("exceeds the limit"), "{msg}");
    // The client refuses to send a frame over its own limit, with a clear error.
    let small = ChannelConfig {
        max_frame_size: 1024,
        ..ChannelConfig::default()
    };
    let small_channel = Channel::connect(server.addr.to_string(), small)
        .await
        .unwrap();
    let req = EchoRequest {
        message: String::new(),
        payload: vec![0; 4096].into(),
    };
    let err = EchoClient::new(small_channel).echo(&req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("exceeds the limit"), "{err}");
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn reply_over_the_frame_limit_fails_only_that_call() {
    let config = ServerConfig {
        max_frame_size: 64 * 1024,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let err = call(&channel, "Big", "100000", CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("exceeds the frame limit"), "{err}");
    // The same for a stream item: the stream ends with internal after the items that fit.
    let req = EchoRequest {
        message: "100000".into(),
        payload: Default::default(),
    };
    let mut stream = keel_rpc::client::server_streaming::<_, _, EchoReply>(
        &channel,
        TEST_SERVICE,
        "BigStream",
        &req,
        CallOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().payload.len(), 10);
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("exceeds the frame limit"), "{err}");
    // The connection survives and serves the next call.
    let reply = call(&channel, "Big", "1000", CallOptions::default())
        .await
        .unwrap();
    assert_eq!(reply.payload.len(), 1000);
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut ping = Frame::new(FrameType::Ping, 42);
    ping.body = Bytes::from_static(b"are you there");
    let mut stream = raw_connect(server.addr, &frame_bytes(&ping)).await;
    let mut buf = BytesMut::new();
    let pong = loop {
        if let Some(f) = Frame::decode(&mut buf, 1 << 20).unwrap() {
            break f;
        }
        assert!(stream.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert_eq!(pong.kind, FrameType::Pong);
    assert_eq!(pong.request_id, 42);
    assert_eq!(&pong.body[..], b"are you there");
}

#[tokio::test]
async fn graceful_shutdown_drains_inflight_calls() {
    let server = TestServer::start(ServerConfig::default()).await;
    let channel = server.channel().await;
    let slow = {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, "Sleep", "400", CallOptions::default()).await })
    };
    eventually("slow call started", || {
        server.probe.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let serving = server.shutdown();
    // The in-flight call completes normally.
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(reply.message, "400");
    serving.await.unwrap().unwrap();
    // New calls fail: the server is gone.
    let err = call(
        &channel,
        "Sleep",
        "0",
        CallOptions::default().timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_grace_period_cuts_off_stuck_calls() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let stuck = {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, "Sleep", "60000", CallOptions::default()).await })
    };
    eventually("stuck call started", || {
        server.probe.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let probe = server.probe.clone();
    server.shutdown().await.unwrap().unwrap();
    assert_eq!(probe.dropped_unfinished.load(Ordering::SeqCst), 1);
    let err = stuck.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[tokio::test]
async fn client_reconnects_after_server_restart() {
    let config = ChannelConfig {
        backoff: keel_rpc::client::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            ..Default::default()
        },
        ..ChannelConfig::default()
    };
    let server = TestServer::start(ServerConfig::default()).await;
    let addr = server.addr;
    let channel = Channel::connect(addr.to_string(), config).await.unwrap();
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
    server.shutdown().await.unwrap().unwrap();

    // While the server is down, calls fail fast with unavailable rather than hang.
    eventually("channel notices the server is gone", || {
        matches!(channel.state(), ConnectivityState::TransientFailure(_))
    })
    .await;
    let err = call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _restarted = TestServer::start_on(listener, ServerConfig::default()).await;
    let mut ok = false;
    for _ in 0..200 {
        if call(&channel, "Sleep", "0", CallOptions::default())
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the same channel never reconnected");
}

#[tokio::test]
async fn keepalive_detects_a_dead_peer() {
    // A "server" that accepts and then never answers anything, like a host that vanished.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let config = ChannelConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(100),
        ..ChannelConfig::default()
    };
    let channel = Channel::connect(addr.to_string(), config).await.unwrap();
    let pending = {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, "Sleep", "0", CallOptions::default()).await })
    };
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("keepalive"), "{err}");
}

#[tokio::test]
async fn connection_cap_refuses_extra_connections() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
    let mut extra = raw_connect(server.addr, &frame_bytes(&Frame::new(FrameType::Ping, 1))).await;
    let (frames, closed) = read_frames_until_close(&mut extra).await;
    assert!(
        closed && frames.is_empty(),
        "over-cap connection must be closed unanswered"
    );
    assert_eq!(
        server
            .server
            .stats()
            .connections
            .refused
            .load(Ordering::SeqCst),
        1
    );
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn inflight_cap_per_connection_answers_overloaded() {
    let config = ServerConfig {
        max_inflight_per_connection: 2,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let slow = occupy(&server, &channel, 2).await;
    let err = call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Overloaded, "{err}");
    for s in slow {
        s.await.unwrap().unwrap();
    }
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn idle_connection_is_closed_with_goaway() {
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut stream = raw_connect(server.addr, &frame_bytes(&Frame::new(FrameType::Ping, 1))).await;
    let (frames, closed) = read_frames_until_close(&mut stream).await;
    assert!(closed);
    let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, vec![FrameType::Pong, FrameType::GoAway]);
    assert_eq!(frames[1].meta.message.as_deref(), Some("idle timeout"));
}

#[tokio::test]
async fn metadata_reaches_the_handler() {
    let probe_seen = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = probe_seen.clone();
    let def = keel_rpc::ServiceDef::new("meta.Test").unary("Get", move |ctx, _req: EchoRequest| {
        let seen = seen.clone();
        async move {
            let trace = ctx
                .metadata()
                .get("trace-id")
                .map(|v| String::from_utf8_lossy(v).into_owned());
            *seen.lock().unwrap() = trace.clone().unwrap_or_default();
            Ok(EchoReply {
                message: trace.unwrap_or_default(),
                payload: Default::default(),
            })
        }
    });
    let server = keel_rpc::Server::builder().add_service(def).build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));
    let channel = Channel::connect(addr.to_string(), ChannelConfig::default())
        .await
        .unwrap();
    let req = EchoRequest::default();
    let reply: EchoReply = keel_rpc::client::unary(
        &channel,
        "meta.Test",
        "Get",
        &req,
        CallOptions::default().metadata("trace-id", "t-123"),
    )
    .await
    .unwrap();
    assert_eq!(reply.message, "t-123");
    assert_eq!(*probe_seen.lock().unwrap(), "t-123");
}

#[test]
fn metadata_type_is_usable_directly() {
    let meta = Metadata {
        service: Some("a.B".into()),
        ..Metadata::default()
    };
    assert_eq!(meta.service.as_deref(), Some("a.B"));
}

#[tokio::test]
async fn a_peer_that_does_not_read_stalls_its_stream_not_the_server() {
    let server = TestServer::start(ServerConfig::default()).await;
    // Ask for 10,000 items of 64 KiB (640 MiB) and never read a byte of the reply.
    let mut req = request_frame(1, TEST_SERVICE, "Flood", None);
    req.body = keel_rpc::__private::prost::Message::encode_to_vec(&EchoRequest {
        message: "10000".into(),
        payload: Default::default(),
    })
    .into();
    let mut stuck = common::raw_connect(server.addr, &frame_bytes(&req)).await;
    eventually("the stream started", || {
        server.probe.flood_items.load(Ordering::SeqCst) > 0
    })
    .await;
    // The producer stops once the connection's queue and socket buffers are full.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = server.probe.flood_items.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        assert!(
            now < 10_000,
            "the server produced everything for a peer that reads nothing"
        );
        last = now;
    }
    // Bounded: the 4 MiB queue plus what the kernel buffers, nowhere near 640 MiB.
    assert!(
        last < 1_000,
        "{last} items of 64 KiB queued for a stalled peer"
    );
    // Everyone else is served meanwhile.
    let channel = server.channel().await;
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
    // Once the peer reads again, the stream resumes and runs to its end.
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let read_all = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if server.probe.flood_items.load(Ordering::SeqCst) == 10_000 {
                break;
            }
        }
    })
    .await;
    assert!(
        read_all.is_ok(),
        "stream did not resume ({total} bytes read)"
    );
}

#[tokio::test]
async fn a_draining_connection_still_detects_a_dead_peer() {
    // A server that answers pings until a request arrives, then sends goaway and goes silent
    // without closing, like a host that vanished while its calls were draining.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut silent = false;
                loop {
                    match s.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    while let Ok(Some(f)) =
                        Frame::decode(&mut buf, keel_rpc::protocol::DEFAULT_MAX_FRAME_SIZE)
                    {
                        if silent {
                            continue;
                        }
                        let reply = match f.kind {
                            FrameType::Ping => Frame::new(FrameType::Pong, f.request_id),
                            FrameType::Request => {
                                silent = true;
                                Frame::new(FrameType::GoAway, f.request_id)
                            }
                            _ => continue,
                        };
                        let _ = s.write_all(&frame_bytes(&reply)).await;
                    }
                }
            });
        }
    });
    let config = ChannelConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(100),
        ..ChannelConfig::default()
    };
    let channel = Channel::connect(addr.to_string(), config).await.unwrap();
    // No deadline: only keepalive can end this call.
    let pending = {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, "Sleep", "0", CallOptions::default()).await })
    };
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("a call on a draining connection to a dead peer hung")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("keepalive"), "{err}");
}

#[tokio::test]
async fn a_hard_concurrency_limit_refuses_the_excess_at_once() {
    let server = TestServer::start(ServerConfig {
        max_concurrency: 4,
        ..ServerConfig::default()
    })
    .await;
    let channel = server.channel().await;
    let slow = occupy(&server, &channel, 4).await;
    // The fifth is refused without running, long before the others finish.
    let err = call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Overloaded);
    assert!(err.message().contains("concurrency limit"), "{err}");
    assert_eq!(server.probe.started.load(Ordering::SeqCst), 4);
    for s in slow {
        s.await.unwrap().unwrap();
    }
    // Room again.
    call(&channel, "Sleep", "0", CallOptions::default())
        .await
        .unwrap();
    let metrics = server.server.render_metrics();
    assert!(metrics.contains("keel_rpc_limited_total 1"), "{metrics}");
    assert!(
        metrics.contains("keel_rpc_concurrency_limit 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_adaptive_limit_sheds_load_a_slow_service_cannot_take() {
    let server = TestServer::start(ServerConfig {
        adaptive_limit: true,
        ..ServerConfig::default()
    })
    .await;
    let channel = server.channel().await;
    // 64 callers of a service that can run 4 calls at once: the limiter learns that more
    // than a few calls in flight only queue, and refuses the excess.
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut callers = Vec::new();
    for _ in 0..64 {
        let (channel, refused) = (channel.clone(), refused.clone());
        callers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < stop {
                match call(&channel, "Work", "", CallOptions::default()).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Code::Overloaded => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    let limit = server.server.concurrency_limit().unwrap();
    assert!(
        limit < 32,
        "the limit stayed at {limit} for a service that runs 4 at once"
    );
    assert!(refused.load(Ordering::SeqCst) > 0);
    // A call that cannot finish within the no-load latency is refused without running.
    let err = call(
        &channel,
        "Work",
        "",
        CallOptions::default().timeout(Duration::from_millis(2)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("no-load latency"), "{err}");
}
