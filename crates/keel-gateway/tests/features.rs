//! Balancing policies, sticky sessions, the upstream wait queue, static files and the
//! response cache, against real servers on loopback.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::net::TcpListener;

fn server_of(a: &Answer) -> String {
    a.json["server"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn hashing_by_header_and_cookie_and_sticky_sessions() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let gw = gateway(&format!(
        r#"
[upstreams.by_user]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}, {{ address = "{c}" }}]
balancer = "consistent_hash"
hash_key = "header:x-user"
[upstreams.by_session]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}, {{ address = "{c}" }}]
balancer = "consistent_hash"
hash_key = "cookie:sid"
[upstreams.sticky]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}, {{ address = "{c}" }}]
sticky_cookie = "keel_srv"
[[routes]]
path_prefix = "/user"
upstream = "by_user"
[[routes]]
path_prefix = "/session"
upstream = "by_session"
[[routes]]
path_prefix = "/sticky"
upstream = "sticky"
"#
    ))
    .await;

    // One user always lands on one server; many users spread over all three.
    let mut seen = HashSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let first = server_of(&send(gw, "GET", "/user", &[("x-user", &user)], "").await);
        for _ in 0..3 {
            let again = send(gw, "GET", "/user", &[("x-user", &user)], "").await;
            assert_eq!(server_of(&again), first, "{user} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "users should spread: {seen:?}");

    let mut seen = HashSet::new();
    for sid in 0..30 {
        let cookie = format!("theme=dark; sid=s{sid}");
        let first = server_of(&send(gw, "GET", "/session", &[("cookie", &cookie)], "").await);
        let again = send(gw, "GET", "/session", &[("cookie", &cookie)], "").await;
        assert_eq!(server_of(&again), first);
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "sessions should spread: {seen:?}");

    // Without the cookie, round robin; the answer sets it, and with it every request goes to
    // the same server.
    let first = send(gw, "GET", "/sticky", &[], "").await;
    let set = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.starts_with("keel_srv=") && set.contains("HttpOnly"),
        "{set}"
    );
    let pair = set.split(';').next().unwrap().to_owned();
    for _ in 0..12 {
        let again = send(gw, "GET", "/sticky", &[("cookie", &pair)], "").await;
        assert_eq!(server_of(&again), server_of(&first));
        assert!(
            !again.headers.contains_key("set-cookie"),
            "a valid cookie is not set again"
        );
    }
    let mut rotating = HashSet::new();
    for _ in 0..6 {
        rotating.insert(server_of(&send(gw, "GET", "/sticky", &[], "").await));
    }
    assert_eq!(rotating.len(), 3);
    // A cookie naming no server (or a tampered one) is ignored and replaced.
    let bogus = send(gw, "GET", "/sticky", &[("cookie", "keel_srv=ffff")], "").await;
    assert_eq!(bogus.status, StatusCode::OK);
    assert!(bogus.headers.contains_key("set-cookie"));
}

#[tokio::test]
async fn least_connections_avoids_a_busy_server() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]
balancer = "least_conn"
[[routes]]
path_prefix = "/"
upstream = "api"
"#
    ))
    .await;
    // One long request occupies one server; while it runs, everything goes to the other.
    let long = tokio::spawn(async move { send(gw, "GET", "/sleep/1500", &[], "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        *counts
            .entry(server_of(&send(gw, "GET", "/", &[], "").await))
            .or_default() += 1;
    }
    let busy = server_of(&long.await.unwrap());
    assert_eq!(counts.get(&busy), None, "{counts:?}, busy {busy}");
    assert_eq!(counts.values().sum::<usize>(), 10);
}

#[tokio::test]
async fn a_burst_waits_in_the_queue_and_overflow_gets_503() {
    let server = upstream("a").await;
    let (gw, handle) = gateway_handle(&format!(
        r#"
[upstreams.small]
servers = [{{ address = "{server}" }}]
max_inflight = 2
queue_size = 2
queue_timeout_ms = 3000
[upstreams.impatient]
servers = [{{ address = "{server}" }}]
max_inflight = 1
queue_size = 10
queue_timeout_ms = 100
[[routes]]
path_prefix = "/small/"
strip_prefix = "/small"
upstream = "small"
[[routes]]
path_prefix = "/impatient/"
strip_prefix = "/impatient"
upstream = "impatient"
"#
    ))
    .await;
    // 2 run, 2 wait their turn, 2 are turned away at once.
    let burst: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { send(gw, "GET", "/small/sleep/400", &[], "").await }))
        .collect();
    // While the first two run, two wait: the queue depth says so.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let metrics = handle.render_metrics();
    assert!(
        metrics.contains("keel_gateway_upstream_queue_depth{upstream=\"small\"} 2"),
        "{metrics}"
    );
    let mut ok = 0;
    let mut busy = 0;
    for t in burst {
        let a = t.await.unwrap();
        match a.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(a.json["error"], "upstream_busy");
                busy += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, busy), (4, 2));

    // A wait longer than queue_timeout ends in 503 too.
    let hold = tokio::spawn(async move { send(gw, "GET", "/impatient/sleep/800", &[], "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = send(gw, "GET", "/impatient/", &[], "").await;
    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        waited.json["detail"]
            .as_str()
            .unwrap()
            .contains("no free slot"),
        "{}",
        waited.json
    );
    assert_eq!(hold.await.unwrap().status, StatusCode::OK);
    // Once the slot is free, requests pass again.
    assert_eq!(
        send(gw, "GET", "/impatient/", &[], "").await.status,
        StatusCode::OK
    );
}

/// `GET /static/docs/a.txt` with these headers.
async fn a_txt(gw: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    send(gw, "GET", "/static/docs/a.txt", headers, "").await
}

#[tokio::test]
async fn static_files_with_validators_ranges_and_no_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    let text: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    std::fs::write(root.join("docs/a.txt"), &text).unwrap();
    std::fs::write(dir.path().join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("escape.txt")).unwrap();
    let gw = gateway(&format!(
        r#"
[[routes]]
path_prefix = "/static/"
strip_prefix = "/static"
static_dir = "{}"
"#,
        root.display()
    ))
    .await;

    let full = a_txt(gw, &[]).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.body, text.as_bytes());
    assert_eq!(full.headers["content-type"], "text/plain");
    assert_eq!(full.headers["accept-ranges"], "bytes");
    let etag = full.headers["etag"].to_str().unwrap().to_owned();
    let modified = full.headers["last-modified"].to_str().unwrap().to_owned();

    // Conditional GETs.
    let same = a_txt(gw, &[("if-none-match", &etag)]).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    assert!(same.body.is_empty());
    let same = a_txt(gw, &[("if-modified-since", &modified)]).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    let changed = a_txt(gw, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(changed.status, StatusCode::OK);

    // Ranges.
    let part = a_txt(gw, &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, text.as_bytes()[10..20]);
    assert_eq!(part.headers["content-range"], "bytes 10-19/1000");
    let tail = a_txt(gw, &[("range", "bytes=-5")]).await;
    assert_eq!(tail.body, text.as_bytes()[995..]);
    let stale = a_txt(gw, &[("range", "bytes=0-9"), ("if-range", "\"old\"")]).await;
    assert_eq!(stale.status, StatusCode::OK, "a stale If-Range gets it all");
    let beyond = a_txt(gw, &[("range", "bytes=5000-")]).await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.headers["content-range"], "bytes */1000");

    // HEAD, directories, methods, absent files.
    let head = send(gw, "HEAD", "/static/docs/a.txt", &[], "").await;
    assert_eq!(head.headers["content-length"], "1000");
    assert!(head.body.is_empty());
    let index = send(gw, "GET", "/static/", &[], "").await;
    assert_eq!(index.body, "<h1>home</h1>".as_bytes());
    assert_eq!(index.headers["content-type"], "text/html");
    assert_eq!(
        send(gw, "POST", "/static/docs/a.txt", &[], "x")
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        send(gw, "GET", "/static/nope.txt", &[], "").await.status,
        StatusCode::NOT_FOUND
    );

    // No way out: a symlink pointing outside, dot-dot segments raw or escaped.
    let escape = send(gw, "GET", "/static/escape.txt", &[], "").await;
    assert_eq!(escape.status, StatusCode::FORBIDDEN);
    for path in [
        "/static/../secret.txt",
        "/static/docs/%2e%2e/%2e%2e/secret.txt",
        "/static/docs/..%2f..%2fsecret.txt",
        "/static/docs/..%5c..%5csecret.txt",
    ] {
        let answer = raw(
            gw,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(!answer.contains("top secret"), "{path}: {answer}");
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"),
            "{path}: {answer}"
        );
    }
}

#[tokio::test]
async fn the_cache_honours_cache_control_and_coalesces_misses() {
    let server = upstream("a").await;
    let gw = gateway_to(
        server,
        "",
        "",
        "cache = { max_bytes = 65536, max_entry_bytes = 8192 }",
    )
    .await;
    let get = |path: &'static str, headers: &'static [(&'static str, &'static str)]| async move {
        send(gw, "GET", path, headers, "").await
    };
    let n = |a: &Answer| a.json["n"].as_u64().unwrap();

    let first = get("/item?cc=max-age=60", &[]).await;
    assert_eq!(first.headers["x-cache"], "MISS");
    let second = get("/item?cc=max-age=60", &[]).await;
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(n(&second), n(&first), "served from the cache");
    assert!(second.headers.contains_key("age"));
    let head = send(gw, "HEAD", "/item?cc=max-age=60", &[], "").await;
    assert_eq!(head.headers["x-cache"], "HIT");
    assert!(head.body.is_empty());

    // Expires works like max-age; no-store, private and silence do not cache.
    let e1 = get("/e?expires=60", &[]).await;
    assert_eq!(n(&get("/e?expires=60", &[]).await), n(&e1));
    for path in ["/ns?cc=no-store", "/p?cc=private,max-age=60", "/plain"] {
        let one = get(path, &[]).await;
        let two = get(path, &[]).await;
        assert_eq!(two.headers["x-cache"], "MISS", "{path}");
        assert_ne!(n(&one), n(&two), "{path}");
    }
    // The client can ask to go past it.
    let fresh = get("/item?cc=max-age=60", &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.headers["x-cache"], "BYPASS");
    assert_ne!(n(&fresh), n(&first));
    // An answer larger than max_entry_bytes passes through whole but is not kept.
    let big1 = get("/big?cc=max-age=60&size=20000", &[]).await;
    assert_eq!(big1.json["pad"].as_str().unwrap().len(), 20000);
    let big2 = get("/big?cc=max-age=60&size=20000", &[]).await;
    assert_eq!(big2.headers["x-cache"], "MISS");

    // Twenty concurrent misses: one upstream request.
    let before = n(&get("/plain", &[]).await);
    let burst: Vec<_> = (0..20)
        .map(|_| tokio::spawn(get("/sleep/300?cc=max-age=60", &[])))
        .collect();
    let mut values = HashSet::new();
    for t in burst {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        values.insert(n(&a));
    }
    assert_eq!(values.len(), 1, "all share one answer");
    let after = n(&get("/plain", &[]).await);
    assert_eq!(
        after,
        before + 2,
        "one request for the burst, one for /plain"
    );

    // Bounded in bytes: 60 distinct ~1 KiB answers do not all fit in 64 KiB.
    for i in 0..60 {
        let path: &'static str = Box::leak(format!("/fill{i}?cc=max-age=60&size=1000").into());
        get(path, &[]).await;
    }
    let mut hits = 0;
    for i in 0..60 {
        let path: &'static str = Box::leak(format!("/fill{i}?cc=max-age=60&size=1000").into());
        if get(path, &[]).await.headers["x-cache"] == "HIT" {
            hits += 1;
        }
    }
    assert!(
        hits < 60,
        "the cache kept {hits} of 60 KiB-sized answers in 64 KiB"
    );
}

#[tokio::test]
async fn rate_limits_per_api_key_and_per_route_and_a_route_body_limit() {
    let server = upstream("a").await;
    let gw = gateway(&format!(
        r#"
[upstreams.api]
servers = [{{ address = "{server}" }}]
[[routes]]
path_prefix = "/keyed"
upstream = "api"
rate_limit = {{ per_second = 0.01, burst = 2, key = "api_key" }}
auth = {{ api_keys = ["alice", "bob"] }}
[[routes]]
path_prefix = "/shared"
upstream = "api"
max_body_bytes = 10
rate_limits = [
  {{ per_second = 0.01, burst = 3, key = "route" }},
  {{ per_second = 0.01, burst = 100, key = "header:x-tenant" }},
]
"#
    ))
    .await;
    let alice = [("x-api-key", "alice")];
    let bob = [("x-api-key", "bob")];
    for _ in 0..2 {
        assert_eq!(
            send(gw, "GET", "/keyed", &alice, "").await.status,
            StatusCode::OK
        );
    }
    let limited = send(gw, "GET", "/keyed", &alice, "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    // Another key from the same address has its own bucket; a bad key is refused by auth
    // first and takes no one's tokens.
    assert_eq!(
        send(gw, "GET", "/keyed", &bob, "").await.status,
        StatusCode::OK
    );
    for _ in 0..5 {
        let bad = send(gw, "GET", "/keyed", &[("x-api-key", "mallory")], "").await;
        assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        send(gw, "GET", "/keyed", &bob, "").await.status,
        StatusCode::OK
    );

    // The route's own body limit (this takes one of the route's three tokens).
    let big = send(gw, "POST", "/shared", &[], "more than ten bytes").await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    // One bucket for the whole route, whoever asks.
    for tenant in ["t1", "t2"] {
        let r = send(gw, "GET", "/shared", &[("x-tenant", tenant)], "").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = send(gw, "GET", "/shared", &[("x-tenant", "t3")], "").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.json["detail"].as_str().unwrap().contains("this route"));
}

/// A bare HTTP/1.1 server that counts its connections: `/close` answers with
/// `Connection: close`, `/idle-drop` closes the connection 50 ms after answering (as a
/// keep-alive timeout would), `/nocontent` is 204, `/big` is 1 MiB chunked, HEAD has no body.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut words = head.split_whitespace();
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let reply: Vec<u8> = match path {
                        "/close" => {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                                .to_vec()
                        }
                        "/nocontent" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        "/big" => {
                            let mut r =
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                            for _ in 0..64 {
                                r.extend_from_slice(b"4000\r\n");
                                r.extend_from_slice(&[b'z'; 0x4000]);
                                r.extend_from_slice(b"\r\n");
                            }
                            r.extend_from_slice(b"0\r\n\r\n");
                            r
                        }
                        _ if method == "HEAD" => {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n".to_vec()
                        }
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    if path == "/close" {
                        return;
                    }
                    if path == "/idle-drop" {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    let (server, connections) = counting_upstream().await;
    let gw = gateway_to(server, "", "", "").await;
    for _ in 0..20 {
        let r = send(gw, "GET", "/n", &[], "").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "ok");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one connection, reused"
    );

    // Bodiless answers and a long chunked one leave the connection reusable.
    let head = send(gw, "HEAD", "/n", &[], "").await;
    assert_eq!(head.headers["content-length"], "2");
    assert!(head.body.is_empty());
    assert_eq!(
        send(gw, "GET", "/nocontent", &[], "").await.status,
        StatusCode::NO_CONTENT
    );
    let big = send(gw, "GET", "/big", &[], "").await;
    assert_eq!(big.body.len(), 64 * 0x4000);
    assert!(big.body.iter().all(|b| *b == b'z'));
    assert_eq!(send(gw, "GET", "/n", &[], "").await.body, "ok");
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // The server closes: after `Connection: close`, and while the connection is idle.
    assert_eq!(send(gw, "GET", "/close", &[], "").await.body, "ok");
    assert_eq!(send(gw, "GET", "/n", &[], "").await.body, "ok");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(send(gw, "GET", "/idle-drop", &[], "").await.body, "ok");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let after = send(
        gw,
        "POST",
        "/n",
        &[],
        "a body, so no retry would hide a failure",
    )
    .await;
    assert_eq!(after.status, StatusCode::OK, "{:?}", after.body);
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

/// An HTTP server answering `{"server": name}` after `delay`.
async fn delayed(name: &'static str, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    let body = format!("{{\"server\": \"{name}\"}}");
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn p2c_prefers_the_fast_server_and_ip_hash_keeps_a_client_on_one() {
    let (fast, slow) = (
        delayed("fast", Duration::ZERO).await,
        delayed("slow", Duration::from_millis(40)).await,
    );
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let gw = gateway(&format!(
        r#"
[upstreams.mixed]
servers = [{{ address = "{fast}" }}, {{ address = "{slow}" }}]
balancer = "p2c"
[upstreams.hashed]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}, {{ address = "{c}" }}]
balancer = "consistent_hash"
[[routes]]
path_prefix = "/mixed"
upstream = "mixed"
[[routes]]
path_prefix = "/hashed"
upstream = "hashed"
"#
    ))
    .await;
    let mut fast_count = 0;
    for _ in 0..10 {
        let round: Vec<_> = (0..4)
            .map(|_| tokio::spawn(async move { send(gw, "GET", "/mixed", &[], "").await }))
            .collect();
        for t in round {
            if t.await.unwrap().json["server"] == "fast" {
                fast_count += 1;
            }
        }
    }
    assert!(fast_count >= 28, "the fast server got {fast_count} of 40");

    // Each client address sticks to one server (clients bound to different loopback
    // addresses).
    for source in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(Some(source.parse().unwrap()));
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        let mut servers = HashSet::new();
        for _ in 0..6 {
            let resp = client
                .get(format!("http://{gw}/hashed").parse().unwrap())
                .await
                .unwrap();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            servers.insert(json["server"].as_str().unwrap().to_owned());
        }
        assert_eq!(servers.len(), 1, "{source} moved: {servers:?}");
    }
}

#[tokio::test]
async fn a_server_that_never_accepts_costs_only_the_connect_timeout() {
    // A listener whose accept queue is full: further connection attempts get no answer.
    let jammed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let jammed_addr = jammed.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..512 {
        match tokio::time::timeout(
            Duration::from_millis(50),
            tokio::net::TcpStream::connect(jammed_addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    let gw = gateway_to(
        jammed_addr,
        "",
        "connect_timeout_ms = 200\nresponse_timeout_ms = 10000\nmax_attempts = 1",
        "",
    )
    .await;
    let started = std::time::Instant::now();
    let r = send(gw, "POST", "/", &[], "x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.json);
    // Not refused at once, not left to the 10 s response timeout: the 200 ms connect timeout.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    drop(held);
    drop(jammed);
}
