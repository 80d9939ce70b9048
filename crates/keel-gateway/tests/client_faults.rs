//! Clients that misbehave, from raw sockets, on both of the gateway's HTTP/1.1 paths (its own
//! request loop and hyper): blank lines sent to hold a connection, request bodies that are
//! broken, stalled, cut short or too large, and requests whose `Host` is missing, repeated or
//! a list. A client's fault is answered to that client (400, 408, 413) and never counted
//! against a server.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The upstream failures the gateway counted, summed over its servers.
fn upstream_failures(gateway: &keel_gateway::Gateway) -> u64 {
    gateway
        .render_metrics()
        .lines()
        .filter(|l| l.starts_with("keel_gateway_upstream_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Reads from `s` until an answer's head is in (or `within` passes); its status code.
async fn status_of(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()
}

/// Sends `bytes` on a new connection: the answer's status code.
async fn answer(gw: SocketAddr, bytes: &[u8], within: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(bytes).await.unwrap();
    status_of(&mut s, within).await
}

/// Reads and drops everything until the connection closes: when it did, or None if it was
/// still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, wait).await.ok()?;
    Some(started.elapsed())
}

/// After a request, blank lines once every 300 ms do not hold the connection: the first
/// starts the header deadline (1 s here), as any byte of a next request would.
#[tokio::test]
async fn blank_lines_between_requests_start_the_header_deadline_on_both_paths() {
    let up = upstream("a").await;
    let gw = gateway_to(
        up,
        "header_timeout_ms = 1000\nidle_timeout_ms = 20000",
        "",
        "",
    )
    .await;
    // HTTP/1.1 stays on the gateway's own loop; HTTP/1.0 keep-alive goes to hyper.
    for first in [
        "GET /one HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /one HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        assert_eq!(
            status_of(&mut s, Duration::from_secs(5)).await,
            Some(200),
            "{first}"
        );
        let started = Instant::now();
        let dripping = async {
            for _ in 0..30 {
                if s.write_all(b"\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(8), dripping).await;
        let closed = closed_within(&mut s, Duration::from_secs(1)).await;
        assert!(
            closed.is_some() && started.elapsed() < Duration::from_secs(4),
            "{first}: still open {:?} after the first blank line",
            started.elapsed()
        );
    }
}

/// Every fault in a client's request body is answered as the client's, and no server is
/// counted as failed (so none is ejected).
#[tokio::test]
async fn faults_in_a_clients_body_are_the_clients_not_the_servers() {
    let up = upstream("a").await;
    let (gw, handle) = gateway_handle(&format!(
        "[server]\nmax_body_bytes = 4096\n[upstreams.api]\nservers = [{{ address = \"{up}\" }}]\nresponse_timeout_ms = 1500\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n"
    ))
    .await;
    let chunked = |body: &str| {
        format!("POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
    };
    let long_extension = format!("5;ext={}\r\nhello\r\n0\r\n\r\n", "e".repeat(20_000));
    let cases: Vec<(&str, String, u16)> = vec![
        ("size zz", chunked("zz\r\nhello\r\n0\r\n\r\n"), 400),
        ("size -1", chunked("-1\r\nhello\r\n0\r\n\r\n"), 400),
        ("size 0x5", chunked("0x5\r\nhello\r\n0\r\n\r\n"), 400),
        (
            "size over 64 bits",
            chunked("ffffffffffffffffff\r\nhello\r\n"),
            400,
        ),
        ("a 20 KB extension", chunked(&long_extension), 400),
        (
            "over the limit",
            chunked(&format!("2000\r\n{}\r\n", "x".repeat(8192))),
            413,
        ),
        // A size the parser takes, then nothing: the server waits for data the client never
        // sends.
        (
            "size 2^64-1, no data",
            chunked("ffffffffffffffff\r\nhel"),
            408,
        ),
    ];
    for (what, request, want) in &cases {
        let got = answer(gw, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(got, Some(*want), "{what}");
    }
    // A chunked upload at 1 byte every 200 ms outlasts the answer's time.
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(chunked("").as_bytes()).await.unwrap();
    let trickle = async {
        for _ in 0..40 {
            if s.write_all(b"1\r\nx\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(2500), trickle).await;
    assert_eq!(status_of(&mut s, Duration::from_secs(5)).await, Some(408));
    // A client that leaves mid-upload: 1,000 of 100,000 declared bytes, then closed.
    for _ in 0..6 {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'x'; 1000]).await.unwrap();
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream_failures(&handle), 0, "{}", handle.render_metrics());
    // The server was never ejected: it still serves.
    let ok = answer(
        gw,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(ok, Some(200));
}

/// Two `Host` headers, a list in one, or none in HTTP/1.1 get 400 on both paths (HTTP/1.0
/// may omit it); CONNECT gets 405.
#[tokio::test]
async fn a_missing_repeated_or_listed_host_is_refused_and_connect_is_not_allowed() {
    let up = upstream("a").await;
    let gw = one_upstream(up).await;
    let cases: [(&str, u16); 8] = [
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        // The same on the hyper path (a chunked body goes there).
        (
            "POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        ("GET / HTTP/1.0\r\n\r\n", 200),
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405,
        ),
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
    ];
    for (request, want) in cases {
        let got = answer(gw, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(got, Some(want), "{request:?}");
    }
}

/// After an upgrade the server refused, the connection goes on in HTTP/1.1, and a request
/// with both `Content-Length` and `Transfer-Encoding` on it still gets 400.
#[tokio::test]
async fn after_a_refused_upgrade_ambiguous_framing_is_still_refused() {
    let up = upstream("a").await;
    let gw = one_upstream(up).await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    // The upstream is no WebSocket server: an ordinary answer, the connection kept.
    let first = status_of(&mut s, Duration::from_secs(5)).await;
    assert_eq!(first, Some(200));
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    let at = rest.find("HTTP/1.1 ").map(|i| &rest[i..]).unwrap_or("");
    // The first answer's body may come first; the next answer is the 400.
    assert!(rest.contains("HTTP/1.1 400") && at.len() > 12, "{rest}");
}
