//! The HTTP/1.1 fast path: answers framed every way a server may frame them, pipelining,
//! hand-over to hyper in the middle of a connection, upstream connections reused and stale
//! ones replaced, bodies forwarded whole.
//!
//! The upstream here is a raw socket server, so each test controls the exact bytes. Header
//! names keep their case on the fast path and come out lowercase through hyper, which tells
//! the two apart.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads more from `s` into `buf`; `None` at the end.
async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

/// Reads one request (head and body, by `Content-Length` or chunked) from `s`; `None` at the
/// end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                buf.drain(..end + 4);
                let mut body = Vec::new();
                loop {
                    while !buf.windows(2).any(|w| w == b"\r\n") {
                        more(s, buf).await?;
                    }
                    let nl = buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&buf[..nl])
                            .split(';')
                            .next()?
                            .trim(),
                        16,
                    )
                    .ok()?;
                    while buf.len() < nl + 2 + size + 2 {
                        more(s, buf).await?;
                    }
                    body.extend_from_slice(&buf[nl + 2..nl + 2 + size]);
                    buf.drain(..nl + 2 + size + 2);
                    if size == 0 {
                        return Some((head, body)); // (no trailers in these tests)
                    }
                }
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An upstream answering by path:
/// - `/chunked`: a chunked body with a trailer, written in pieces;
/// - `/until-close`: an HTTP/1.0 answer without length, ended by closing;
/// - `/empty`: 204; `/garbage`: not HTTP; `/big`: 8 MiB;
/// - `/early-hints`: a 103 before the 200;
/// - anything else: `Content-Length`, with `X-Mixed-Case` and the request's head and body
///   length in the body.
///
/// Connections are counted; with `close_after` set, the server closes each connection that
/// long after each answer (as a server with a short keep-alive timeout does).
async fn raw_upstream(close_after: Option<Duration>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let next = match close_after {
                        None => read_request(&mut s, &mut buf).await,
                        Some(after) => {
                            match tokio::time::timeout(after, read_request(&mut s, &mut buf)).await
                            {
                                Ok(r) => r,
                                Err(_) => return, // closes, without a word
                            }
                        }
                    };
                    let Some((head, body)) = next else { return };
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let ok = match path.as_str() {
                        "/chunked" => {
                            let parts: [&[u8]; 4] = [
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Mixed-Case: 1\r\n\r\n5\r\nhello\r\n",
                                b"7;ext=1\r\n, world\r\n",
                                b"0\r\nX-Trailer: t\r\n",
                                b"\r\n",
                            ];
                            let mut ok = true;
                            for p in parts {
                                ok &= s.write_all(p).await.is_ok();
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            ok
                        }
                        "/until-close" => {
                            let _ = s
                                .write_all(b"HTTP/1.0 200 OK\r\nX-Mixed-Case: 1\r\n\r\nall of it")
                                .await;
                            return;
                        }
                        "/empty" => s
                            .write_all(b"HTTP/1.1 204 No Content\r\nX-Mixed-Case: 1\r\n\r\n")
                            .await
                            .is_ok(),
                        "/garbage" => s.write_all(b"SPEAK FRIEND\r\n\r\n").await.is_ok(),
                        "/big" => {
                            let body = vec![b'x'; 8 << 20];
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                            s.write_all(head.as_bytes()).await.is_ok()
                                && s.write_all(&body).await.is_ok()
                        }
                        "/early-hints" => s
                            .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Mixed-Case: 1\r\n\r\nok")
                            .await
                            .is_ok(),
                        _ => {
                            let text = format!(
                                "{{\"head\":{:?},\"body_len\":{},\"body_sum\":{}}}",
                                head,
                                body.len(),
                                body.iter().map(|b| u64::from(*b)).sum::<u64>()
                            );
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Mixed-Case: 1\r\nContent-Type: application/json\r\n\r\n{text}",
                                text.len()
                            );
                            s.write_all(answer.as_bytes()).await.is_ok()
                        }
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Sends `bytes` on `s` and reads until `answers` complete answers came back (each ending in
/// its `Content-Length` body or a final chunk), or the connection closes, or 5 s pass.
async fn exchange(s: &mut TcpStream, bytes: &[u8], answers: usize) -> String {
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while complete_answers(&out) < answers {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether requests to HTTP/1.1 pools take Keel's own leg (the default), not hyper's (the
/// suite runs through both: `KEEL_GATEWAY_UPSTREAM_LEG=hyper`).
fn raw_leg() -> bool {
    std::env::var("KEEL_GATEWAY_UPSTREAM_LEG").as_deref() != Ok("hyper")
}

/// The body of the one chunked answer in `out`, its chunks joined.
fn dechunk(out: &str) -> String {
    let mut rest = &out[out.find("\r\n\r\n").expect("a whole head") + 4..];
    let mut body = String::new();
    loop {
        let (line, after) = rest.split_once("\r\n").expect("a chunk line");
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// How many whole answers `out` holds.
fn complete_answers(out: &[u8]) -> usize {
    let text = String::from_utf8_lossy(out);
    let mut rest = &text[..];
    let mut count = 0;
    while let Some(end) = rest.find("\r\n\r\n") {
        let head = &rest[..end];
        let after = &rest[end + 4..];
        let lower = head.to_ascii_lowercase();
        if lower.contains("transfer-encoding: chunked") {
            match after.find("0\r\n") {
                Some(at) => match after[at..].find("\r\n\r\n") {
                    Some(t) => rest = &after[at + t + 4..],
                    None => return count,
                },
                None => return count,
            }
        } else {
            let len = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if after.len() < len {
                return count;
            }
            rest = &after[len..];
        }
        count += 1;
    }
    count
}

#[tokio::test]
async fn answers_framed_every_way_are_relayed_and_connections_reused() {
    let (up, conns) = raw_upstream(None).await;
    let gw = one_upstream(up).await;
    let mut s = TcpStream::connect(gw).await.unwrap();

    // Chunked, with an extension and a trailer, arriving in pieces: relayed with its
    // trailer; Keel's leg relays it as sent (header case, chunks and extensions), hyper's
    // re-chunks it.
    let out = exchange(&mut s, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");
    assert_eq!(dechunk(&out), "hello, world", "{out:?}");
    assert!(
        out.to_ascii_lowercase()
            .ends_with("0\r\nx-trailer: t\r\n\r\n"),
        "{out:?}"
    );
    if raw_leg() {
        assert!(out.contains("X-Mixed-Case: 1"), "{out:?}");
        assert!(
            out.ends_with("5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"),
            "{out:?}"
        );
    }
    // 204, a 103 skipped before the 200, a HEAD (no body though a length is declared), on
    // the same client connection and the same upstream connection.
    let out = exchange(&mut s, b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 204 No Content\r\n"), "{out:?}");
    let out = exchange(&mut s, b"GET /early-hints HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nok"),
        "{out:?}"
    );
    // (An answer to HEAD declares a length but has no body: read just the head, then make
    // sure nothing follows it.)
    let out = exchange(&mut s, b"HEAD /plain HTTP/1.1\r\nHost: x\r\n\r\n", 0).await;
    let mut out = out.into_bytes();
    while !out.ends_with(b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        out.extend_from_slice(&chunk[..n]);
    }
    let mut extra = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), s.read(&mut extra))
            .await
            .is_err(),
        "bytes after the answer to HEAD"
    );
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\n"),
        "{out:?}"
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one upstream connection served all"
    );

    // Three requests in one write (pipelined): three answers, in order.
    let out = exchange(
        &mut s,
        b"GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /p/3 HTTP/1.1\r\nHost: x\r\n\r\n",
        3,
    )
    .await;
    let order: Vec<usize> = ["GET /p/1", "GET /p/2", "GET /p/3"]
        .iter()
        .map(|p| {
            out.find(p)
                .unwrap_or_else(|| panic!("{p} missing: {out:?}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out:?}");

    // An answer that ends when the server closes: relayed chunked, and the client keeps its
    // connection.
    let out = exchange(&mut s, b"GET /until-close HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{out:?}");
    assert!(!lower.contains("connection: close"), "{out:?}");
    assert!(out.ends_with("0\r\n\r\n"), "{out:?}");
    assert_eq!(dechunk(&out), "all of it", "{out:?}");
    let out = exchange(&mut s, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");

    // Not HTTP from the server: 502 with the reason.
    let mut s = TcpStream::connect(gw).await.unwrap();
    let out = exchange(&mut s, b"GET /garbage HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out:?}");
    let reason = if raw_leg() {
        "not HTTP/1"
    } else {
        "invalid HTTP"
    };
    assert!(out.contains(reason), "{out:?}");
}

#[tokio::test]
async fn bodies_are_forwarded_whole_and_hop_by_hop_headers_dropped() {
    let (up, _) = raw_upstream(None).await;
    let gw = one_upstream(up).await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    // A 40 KB body sent in three pieces with pauses; hop-by-hop headers, one named by
    // Connection, and a prior X-Forwarded-For.
    let body: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let head = format!(
        "POST /upload?x=1 HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {}\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.1.1.1\r\nX-Kept: k\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(15_000) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(piece).await.unwrap();
    }
    let out = exchange(&mut s, b"", 1).await;
    let json: serde_json::Value =
        serde_json::from_str(&out[out.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(json["body_len"], 40_000);
    let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(json["body_sum"], sum);
    let sent = json["head"].as_str().unwrap().to_ascii_lowercase();
    assert!(sent.starts_with("post /upload?x=1 http/1.1\r\n"), "{sent}");
    for gone in ["x-secret", "keep-alive", "connection"] {
        assert!(
            !sent.contains(&format!("\n{gone}:")),
            "{gone} forwarded: {sent}"
        );
    }
    assert!(sent.contains("\nx-kept: k\r\n"), "{sent}");
    assert!(sent.contains("\nhost: shop.example\r\n"), "{sent}");
    assert!(
        sent.contains("\nx-forwarded-for: 10.1.1.1, 127.0.0.1\r\n"),
        "{sent}"
    );
    assert!(
        sent.contains("\nx-forwarded-host: shop.example\r\n"),
        "{sent}"
    );
    assert!(sent.contains("\nx-forwarded-proto: http\r\n"), "{sent}");
    assert!(sent.contains("\ncontent-length: 40000\r\n"), "{sent}");

    // A client that promises a body and stops: 408 after the route's timeout, and the
    // connection closes.
    let gw = gateway_to(up, "", "", "timeout_ms = 300").await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    let out = exchange(
        &mut s,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
        2,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(out.contains("connection: close"), "{out:?}");
}

#[tokio::test]
async fn a_head_arriving_in_pieces_is_served_once_whole() {
    let (up, _) = raw_upstream(None).await;
    let gw = one_upstream(up).await;
    let head = b"GET /pieces HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n";
    // Cut everywhere near the end, where the empty line may be split.
    for cut in [
        head.len() - 4,
        head.len() - 3,
        head.len() - 2,
        head.len() - 1,
        5,
    ] {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(&head[..cut]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let out = exchange(&mut s, &head[cut..], 1).await;
        assert!(out.starts_with("HTTP/1.1 200"), "cut at {cut}: {out:?}");
        assert!(out.to_ascii_lowercase().contains("x-mixed-case"), "{out:?}");
    }
}

#[tokio::test]
async fn what_the_fast_path_does_not_take_goes_to_hyper_mid_connection() {
    let (up, _) = raw_upstream(None).await;
    let gw = one_upstream(up).await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    // Keel's loop first (header case kept on Keel's leg)...
    let out = exchange(&mut s, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    assert!(
        out.to_ascii_lowercase().contains("x-mixed-case: 1"),
        "{out:?}"
    );
    if raw_leg() {
        assert!(out.contains("X-Mixed-Case: 1"), "{out:?}");
    }
    // ...then a chunked request body, which hyper serves (names lowercased), with the bytes
    // already read replayed to it; and hyper keeps the connection from then on.
    let out = exchange(
        &mut s,
        b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /three HTTP/1.1\r\nHost: x\r\n\r\n",
        2,
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out:?}");
    assert!(out.contains("x-mixed-case: 1"), "{out:?}");
    assert!(!out.contains("X-Mixed-Case"), "{out:?}");
    assert!(
        out.contains("\\\"body_len\\\":3") || out.contains("\"body_len\":3"),
        "{out:?}"
    );
    assert!(
        out.find("POST /two").unwrap() < out.find("GET /three").unwrap(),
        "{out:?}"
    );

    // HTTP/1.0 goes to hyper from the start.
    let out = raw(gw, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out:?}");
    assert!(out.contains("x-mixed-case: 1"), "{out:?}");
}

#[tokio::test]
async fn stale_upstream_connections_are_replaced_not_failed() {
    // The server closes each connection 30 ms after an answer, without saying so.
    let (up, conns) = raw_upstream(Some(Duration::from_millis(30))).await;
    let gw = one_upstream(up).await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    for i in 0..6 {
        // GETs and POSTs alike: a POST is never sent again, so the gateway must see that the
        // idle connection was closed before it sends on it.
        let req = if i % 2 == 0 {
            format!("GET /g/{i} HTTP/1.1\r\nHost: x\r\n\r\n")
        } else {
            format!("POST /p/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        };
        let out = exchange(&mut s, req.as_bytes(), 1).await;
        assert!(out.starts_with("HTTP/1.1 200"), "request {i}: {out:?}");
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        6,
        "a new connection each time"
    );
    // In quick succession the one connection is reused.
    let before = conns.load(Ordering::SeqCst);
    for i in 0..5 {
        let out = exchange(
            &mut s,
            format!("GET /q/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            1,
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    }
    assert_eq!(conns.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_frees_its_slot_and_is_cut_off() {
    let (up, _) = raw_upstream(None).await;
    // One slot, no queue: a second request while the slot is taken would get 503.
    let gw = gateway_to(
        up,
        "idle_timeout_ms = 400",
        "max_inflight = 1\nqueue_size = 0",
        "",
    )
    .await;
    let mut stuck = TcpStream::connect(gw).await.unwrap();
    stuck
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The slot counts until the answer's head is in, so others are served meanwhile.
    for _ in 0..3 {
        assert_eq!(send(gw, "GET", "/other", &[], "").await.status, 200);
    }
    // The stuck client took nothing for the idle timeout: cut off (it gets far less than the
    // 8 MiB, then the end of the stream).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stuck.read(&mut chunk))
            .await
            .expect("the stuck connection was held open")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 8 << 20, "{got}");
}

#[tokio::test]
async fn fragments_and_odd_targets_are_routed_as_hyper_sees_them() {
    let (up, _) = raw_upstream(None).await;
    // An exact route that refuses everyone, and a catch-all: `/login#x` must not reach the
    // catch-all by not matching `/login` exactly.
    let gw = gateway(&format!(
        "[upstreams.api]\nservers = [{{ address = \"{up}\" }}]\n[[routes]]\npath = \"/login\"\nupstream = \"api\"\ndeny = [\"0.0.0.0/0\", \"::/0\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n"
    ))
    .await;
    let out = raw(
        gw,
        b"GET /login#x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out:?}");
    let out = raw(
        gw,
        b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out:?}");
    let out = raw(
        gw,
        b"GET /a<b> HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
}

#[tokio::test]
async fn a_server_answering_garbage_costs_a_get_nothing_and_host_is_always_sent() {
    // A server that answers anything with bytes that are not HTTP, next to a good one.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"SPEAK FRIEND\r\n\r\n").await;
            });
        }
    });
    let (good, _) = raw_upstream(None).await;
    let gw = gateway(&format!(
        "[upstreams.api]\nservers = [{{ address = \"{bad}\" }}, {{ address = \"{good}\" }}]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n"
    ))
    .await;
    for i in 0..6 {
        let a = send(gw, "GET", &format!("/g/{i}"), &[], "").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    // A client whose `Connection` names `Host` still has one sent (the server's address, as
    // hyper's client does).
    let mut s = TcpStream::connect(gw).await.unwrap();
    let mut out = String::new();
    for _ in 0..2 {
        out = exchange(
            &mut s,
            b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n",
            1,
        )
        .await;
        if out.contains(&format!("host: {good}")) {
            break;
        }
    }
    assert!(out.contains(&format!("host: {good}")), "{out:?}");
    assert_eq!(out.matches(r"\nhost:").count(), 1, "{out:?}");
}

#[tokio::test]
async fn a_client_gone_before_the_answer_has_its_request_abandoned() {
    // One slot, no queue: while an abandoned request kept its slot, others would get 503.
    let server = upstream("a").await;
    let gw = gateway_to(server, "", "max_inflight = 1\nqueue_size = 0", "").await;
    let mut gone = TcpStream::connect(gw).await.unwrap();
    gone.write_all(b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(gw, "GET", "/", &[], "").await.status,
        503,
        "the slot is taken"
    );
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    assert_eq!(send(gw, "GET", "/", &[], "").await.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the slot was freed"
    );
}

#[tokio::test]
async fn a_refused_request_with_its_body_in_hand_keeps_the_connection() {
    let (up, _) = raw_upstream(None).await;
    let gw = gateway(&format!(
        "[server]\nheader_timeout_ms = 300\n[upstreams.api]\nservers = [{{ address = \"{up}\" }}]\n[[routes]]\npath = \"/closed\"\nupstream = \"api\"\ndeny = [\"0.0.0.0/0\", \"::/0\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n"
    ))
    .await;
    let mut s = TcpStream::connect(gw).await.unwrap();
    // Refused with its body read: the next request on the connection is served.
    let out = exchange(
        &mut s,
        b"POST /closed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /open HTTP/1.1\r\nHost: x\r\n\r\n",
        2,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out:?}");
    assert!(!out.contains("connection: close"), "{out:?}");
    assert!(out.contains("GET /open"), "{out:?}");
    // A CRLF after a body (as old clients send) is skipped; like any byte of a next request
    // it starts the header deadline: a request that follows in time is served...
    let out = exchange(
        &mut s,
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n",
        1,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = exchange(&mut s, b"GET /soon HTTP/1.1\r\nHost: x\r\n\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    // ...and none within the deadline closes the connection (blank lines hold nothing).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after the header deadline");
}
