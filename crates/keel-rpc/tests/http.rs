//! HTTP/1.1 on the RPC port: JSON calls, health, metrics, status.

mod common;

use common::{TestServer, http};
use keel_rpc::ServerConfig;

#[tokio::test]
async fn json_call_over_http() {
    let server = TestServer::start(ServerConfig::default()).await;
    // bytes travel as base64 in the proto3 JSON mapping: "AAEC" is [0, 1, 2].
    let (status, body) = http(
        server.addr,
        "POST",
        "/keel.echo.v1.Echo/Echo",
        r#"{"message":"hi","payload":"AAEC"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["message"], "hi");
    assert_eq!(v["payload"], "AAEC");
    // An empty body is the empty message.
    let (status, body) = http(server.addr, "POST", "/keel.echo.v1.Echo/Echo", "").await;
    assert_eq!((status, body.as_str()), (200, "{}"));
}

#[tokio::test]
async fn http_errors_carry_status_name_and_fitting_http_status() {
    let server = TestServer::start(ServerConfig::default()).await;
    let cases = [
        ("/no.Such/Echo", "{}", 404, "not_found"),
        ("/keel.echo.v1.Echo/Nope", "{}", 404, "not_found"),
        (
            "/keel.echo.v1.Echo/Echo",
            "{not json",
            400,
            "invalid_argument",
        ),
        ("/test.Test/Panic", "{}", 500, "internal"),
    ];
    for (path, body, want_status, want_error) in cases {
        let (status, body) = http(server.addr, "POST", path, body).await;
        assert_eq!(status, want_status, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], want_error, "{path}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, _) = http(server.addr, "GET", "/nowhere", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn http_deadline_header() {
    let server = TestServer::start(ServerConfig::default()).await;
    let req = "POST /test.Test/Sleep HTTP/1.1\r\nHost: t\r\nkeel-timeout-ms: 50\r\nContent-Length: 19\r\nConnection: close\r\n\r\n{\"message\":\"5000\"}\n";
    let out = common::http_raw(server.addr, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(out.contains("deadline_exceeded"), "{out}");
}

#[tokio::test]
async fn server_stream_over_http_is_ndjson() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (status, body) = http(
        server.addr,
        "POST",
        "/keel.echo.v1.Echo/Count",
        r#"{"count":3}"#,
    )
    .await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines, vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
}

#[tokio::test]
async fn health_status_and_metrics() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (status, body) = http(server.addr, "GET", "/health", "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"serving"}"#));

    for _ in 0..3 {
        http(server.addr, "POST", "/keel.echo.v1.Echo/Echo", "{}").await;
    }
    http(server.addr, "POST", "/test.Test/Panic", "{}").await;
    let (status, metrics) = http(server.addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"keel_rpc_requests_total{service="keel.echo.v1.Echo",method="Echo",status="ok"} 3"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"keel_rpc_requests_total{service="test.Test",method="Panic",status="internal"} 1"#
    ));
    assert!(metrics.contains(
        r#"keel_rpc_request_duration_seconds_count{service="keel.echo.v1.Echo",method="Echo"} 3"#
    ));
    assert!(metrics.contains("# TYPE keel_rpc_request_duration_seconds histogram"));
    // The connection fetching the metrics is itself open.
    assert!(metrics.contains("keel_rpc_connections_open 1"));
    assert!(metrics.contains("keel_rpc_inflight_calls 0"));

    let (status, page) = http(server.addr, "GET", "/status", "").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&page).unwrap();
    let echo = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "Echo")
        .unwrap()
        .clone();
    assert_eq!(echo["calls"], 3);
}

#[tokio::test]
async fn oversized_body_is_413_and_wrong_verb_is_405() {
    let server = TestServer::start(ServerConfig {
        max_frame_size: 1024,
        ..ServerConfig::default()
    })
    .await;
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    let (status, body) = http(server.addr, "POST", "/keel.echo.v1.Echo/Echo", &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("1024"), "{body}");

    let req = "GET /keel.echo.v1.Echo/Echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let out = common::http_raw(server.addr, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert!(out.to_ascii_lowercase().contains("allow: post"), "{out}");
    // A path that names no method stays a 404, whatever the verb.
    let (status, _) = http(server.addr, "GET", "/no.Such/Echo", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn http_stream_cut_by_its_deadline_ends_with_an_error_line_and_is_counted() {
    let server = TestServer::start(ServerConfig::default()).await;
    let body = r#"{"count":1000,"intervalMs":20}"#;
    let req = format!(
        "POST /keel.echo.v1.Echo/Count HTTP/1.1\r\nHost: t\r\nkeel-timeout-ms: 150\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let out = common::http_raw(server.addr, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (_, chunked) = out.split_once("\r\n\r\n").unwrap();
    let lines: Vec<String> = common::dechunk(chunked)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    assert_eq!(lines[0], r#"{"n":1}"#);
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["error"], "deadline_exceeded", "{lines:?}");

    // Recorded when the stream ended, with the code it ended with.
    let (_, metrics) = http(server.addr, "GET", "/metrics", "").await;
    assert!(
        metrics.contains(
            r#"keel_rpc_requests_total{service="keel.echo.v1.Echo",method="Count",status="deadline_exceeded"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("keel_rpc_inflight_calls 0"), "{metrics}");
}

#[tokio::test]
async fn authorization_and_keel_meta_headers_become_metadata() {
    let server = TestServer::start(ServerConfig::default()).await;
    for (key, header, want) in [
        (
            "authorization",
            "Authorization: Bearer s3cret",
            "Bearer s3cret",
        ),
        ("trace-id", "keel-meta-trace-id: abc123", "abc123"),
        ("other", "X-Other: no", ""),
    ] {
        let body = format!(r#"{{"message":"{key}"}}"#);
        let req = format!(
            "POST /test.Test/Meta HTTP/1.1\r\nHost: t\r\n{header}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let out = common::http_raw(server.addr, req.as_bytes()).await;
        let (_, body) = out.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["message"].as_str().unwrap_or(""), want, "{header}");
    }
}

/// Sends `head` (and nothing more) and reads until the answer's status line is in: the
/// status code and how long it took. None if nothing came within `within`.
async fn answer_to_stall(
    addr: std::net::SocketAddr,
    head: &str,
    within: std::time::Duration,
) -> Option<(u16, std::time::Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while got.len() < 12 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    let status = std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()?;
    Some((status, started.elapsed()))
}

/// A client that declares a huge body and sends nothing is refused at once (413); one that
/// sends part of its body and stalls gets 408 once the body timeout has passed.
#[tokio::test]
async fn lying_and_stalled_bodies_are_answered_at_once_or_within_the_body_timeout() {
    use std::time::Duration;
    let server = TestServer::start(ServerConfig {
        body_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let path = "/keel.echo.v1.Echo/Echo";
    let (status, took) = answer_to_stall(
        server.addr,
        &format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000000\r\n\r\n"),
        Duration::from_secs(5),
    )
    .await
    .expect("no answer to a declared 10 GB body");
    assert_eq!(status, 413);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let (status, took) = answer_to_stall(
        server.addr,
        &format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{{\"mess"),
        Duration::from_secs(5),
    )
    .await
    .expect("no answer to a stalled body");
    assert_eq!(status, 408);
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

/// What the proto3 JSON mapping accepts, the JSON codec takes: `null` for a field's default,
/// integers written `2.0` or `2e0`. What it refuses, an error names the field of.
#[tokio::test]
async fn json_bodies_follow_the_proto3_mapping_and_errors_name_the_field() {
    let server = TestServer::start(ServerConfig::default()).await;
    let echo = "/keel.echo.v1.Echo/Echo";
    let (status, body) = http(server.addr, "POST", echo, r#"{"message": null}"#).await;
    assert_eq!((status, body.as_str()), (200, "{}"));
    let count = "/keel.echo.v1.Echo/Count";
    for form in ["2", "2.0", "2e0", "0.2e1", "\"2\""] {
        let (status, body) = http(
            server.addr,
            "POST",
            count,
            &format!(r#"{{"count": {form}, "intervalMs": 0}}"#),
        )
        .await;
        assert_eq!(status, 200, "{form}: {body}");
        assert_eq!(body.lines().count(), 2, "{form}: {body}");
    }
    let refused = [
        (r#"{"count": 2.5}"#, "count"),
        (r#"{"count": "many"}"#, "count"),
        (r#"{"count": 1, "colour": 1}"#, "colour"),
    ];
    for (sent, field) in refused {
        let (status, body) = http(server.addr, "POST", count, sent).await;
        assert_eq!(status, 400, "{sent}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(field), "{sent}: {message}");
        assert!(!message.contains("untagged enum"), "{sent}: {message}");
    }
}
