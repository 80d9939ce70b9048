//! Running the gateway: reloads under load, the admin API and metrics, the access log,
//! the connection cap, and a real upstream process killed with SIGKILL under load.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_gateway::{Gateway, GatewayConfig};
use tokio::net::{TcpListener, TcpStream};

fn routed_to(server: SocketAddr, route: &str) -> String {
    format!(
        r#"
[upstreams.api]
servers = [{{ address = "{server}" }}]
[[routes]]
name = "{route}"
path_prefix = "/"
upstream = "api"
"#
    )
}

#[tokio::test]
async fn reloads_under_load_fail_no_request_and_keep_idle_connections() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let (gw, handle) = gateway_handle(&routed_to(a, "api")).await;

    // An idle keep-alive connection opened before the reloads.
    let stream = TcpStream::connect(gw).await.unwrap();
    let (mut idle, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(path)
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = idle.send_request(get("/")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(parking_lot::Mutex::new(HashSet::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 20_000 {
                sent += 1;
                // Some requests are still running when the configuration changes.
                let path = if worker == 0 { "/sleep/50" } else { "/" };
                let req = Request::get(format!("http://{gw}{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match client.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        served
                            .lock()
                            .insert(json["server"].as_str().unwrap().to_owned());
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            sent
        }));
    }
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (server, name) = if i % 2 == 0 { (b, "api-b") } else { (a, "api") };
        handle
            .reload(GatewayConfig::parse(&routed_to(server, name)).unwrap())
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        total += t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} requests");
    assert_eq!(served.lock().len(), 2, "both configurations served");

    // The idle connection outlived twenty reloads and now reaches the last configuration.
    let last = idle.send_request(get("/")).await.unwrap();
    assert_eq!(last.status(), StatusCode::OK);
    let body = last.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["server"], "a");
}

async fn admin(gateway: &Gateway) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        gateway
            .clone()
            .serve_admin(listener, std::future::pending::<()>()),
    );
    addr
}

#[tokio::test]
async fn admin_api_metrics_and_refused_reloads() {
    let server = upstream("a").await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:9"
token = "s3cret"
[upstreams.api]
servers = [{{ address = "{server}" }}]
max_inflight = 8
[[routes]]
name = "api"
path_prefix = "/"
upstream = "api"
"#
    );
    let (gw, handle) = gateway_handle(&config).await;
    let adm = admin(&handle).await;
    for _ in 0..3 {
        assert_eq!(send(gw, "GET", "/x", &[], "").await.status, StatusCode::OK);
    }
    let bearer = [("authorization", "Bearer s3cret")];

    let metrics = send(adm, "GET", "/metrics", &[], "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        "keel_gateway_requests_total{route=\"api\",class=\"2xx\"} 3",
        "keel_gateway_request_duration_seconds_count{route=\"api\"} 3",
        &format!("keel_gateway_upstream_server_up{{upstream=\"api\",server=\"{server}\"}} 1"),
        &format!("keel_gateway_upstream_requests_total{{upstream=\"api\",server=\"{server}\"}} 3"),
        "keel_gateway_upstream_queue_depth{upstream=\"api\"} 0",
        "keel_gateway_upstream_responses_total{upstream=\"api\",class=\"2xx\"} 3",
        "keel_gateway_upstream_response_seconds_count{upstream=\"api\"} 3",
        "keel_gateway_connections_accepted_total 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    assert_eq!(
        send(adm, "GET", "/admin/routes", &[], "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let routes = send(adm, "GET", "/admin/routes", &bearer, "").await;
    assert_eq!(routes.json[0]["name"], "api");
    assert_eq!(routes.json[0]["upstream"], "api");
    assert_eq!(routes.json[0]["requests"], 3);
    let ups = send(adm, "GET", "/admin/upstreams", &bearer, "").await;
    assert_eq!(ups.json["api"]["servers"][0]["address"], server.to_string());
    assert_eq!(ups.json["api"]["servers"][0]["up"], true);
    assert_eq!(ups.json["api"]["queue"]["max_inflight"], 8);

    // Bad configurations are refused with the reason; the old one keeps serving.
    let bad_syntax = send(adm, "POST", "/admin/reload", &bearer, "[upstreams.api\n").await;
    assert_eq!(bad_syntax.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_syntax.json["error"], "invalid_config");
    let dangling = config.replace("upstream = \"api\"", "upstream = \"gone\"");
    let bad_ref = send(adm, "POST", "/admin/reload", &bearer, &dangling).await;
    assert!(
        bad_ref.json["detail"]
            .as_str()
            .unwrap()
            .contains("\"gone\", which is not defined"),
        "{}",
        bad_ref.json
    );
    let moved = config.replace("127.0.0.1:9", "127.0.0.1:10");
    let bad_admin = send(adm, "POST", "/admin/reload", &bearer, &moved).await;
    assert!(
        bad_admin.json["detail"]
            .as_str()
            .unwrap()
            .contains("restart")
    );
    let no_file = send(adm, "POST", "/admin/reload", &bearer, "").await;
    assert!(no_file.json["detail"].as_str().unwrap().contains("file"));
    assert_eq!(send(gw, "GET", "/x", &[], "").await.status, StatusCode::OK);

    // A good one applies.
    let renamed = config.replace("name = \"api\"", "name = \"api-v2\"");
    let ok = send(adm, "POST", "/admin/reload", &bearer, &renamed).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.json);
    assert_eq!(send(gw, "GET", "/x", &[], "").await.status, StatusCode::OK);
    let routes = send(adm, "GET", "/admin/routes", &bearer, "").await;
    assert_eq!(routes.json[0]["name"], "api-v2");
    let text = handle.render_metrics();
    assert!(text.contains("keel_gateway_reloads_total 1"), "{text}");
    assert!(
        text.contains("keel_gateway_reloads_refused_total 4"),
        "{text}"
    );
    assert!(text.contains("keel_gateway_requests_total{route=\"api-v2\",class=\"2xx\"} 1"));
}

#[tokio::test]
async fn reload_from_the_file_it_was_started_with() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, routed_to(a, "api")).unwrap();
    let gateway = Gateway::from_file(&path).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    tokio::spawn(
        gateway
            .clone()
            .serve(listener, std::future::pending::<()>()),
    );
    assert_eq!(send(gw, "GET", "/", &[], "").await.json["server"], "a");
    std::fs::write(&path, routed_to(b, "api")).unwrap();
    gateway.reload_file().await.unwrap();
    assert_eq!(send(gw, "GET", "/", &[], "").await.json["server"], "b");
    std::fs::write(&path, "[[routes]]\nupstream = \"nowhere\"\n").unwrap();
    let err = gateway.reload_file().await.unwrap_err().to_string();
    assert!(err.contains("not defined"), "{err}");
    assert_eq!(send(gw, "GET", "/", &[], "").await.json["server"], "b");
}

#[tokio::test]
async fn the_access_log_has_a_json_line_per_request() {
    let server = upstream("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = gateway(&format!(
        r#"
[server]
access_log = "{}"
[upstreams.api]
servers = [{{ address = "{server}" }}]
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "api"
"#,
        log.display()
    ))
    .await;
    send(gw, "GET", "/api/one?x=1", &[], "").await;
    send(gw, "POST", "/api/two", &[], "body").await;
    send(gw, "GET", "/nowhere", &[], "").await;
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["path"], "/api/one?x=1");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["route"], "api");
    assert_eq!(lines[0]["upstream_server"], server.to_string());
    assert_eq!(lines[0]["client"], "127.0.0.1");
    assert!(lines[0]["duration_us"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["method"], "POST");
    assert_eq!(lines[2]["status"], 404);
    assert_eq!(lines[2]["route"], serde_json::Value::Null);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = upstream("a").await;
    let gw = gateway_to(server, "max_connections = 2", "", "").await;
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = TcpStream::connect(gw).await.unwrap();
    let _ = third.write_all(request).await;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed unanswered");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(send(gw, "GET", "/", &[], "").await.status, StatusCode::OK);
}

/// A Python file server process (the standard library's, speaking HTTP/1.1 with keep-alive
/// and a listen backlog of 1024 rather than `python3 -m http.server`'s 5) serving `dir` on a
/// free port.
fn python_server(dir: &std::path::Path) -> Option<(std::process::Child, SocketAddr)> {
    const SERVER: &str = "
import http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
Server(('127.0.0.1', int(sys.argv[1])), Handler).serve_forever()
";
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("python3")
        .args(["-c", SERVER, &port.to_string()])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((child, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_upstream_process_killed_under_load_fails_no_get() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("page.txt"), "hello from python").unwrap();
    let (Some((mut one, a)), Some((mut two, b))) =
        (python_server(dir.path()), python_server(dir.path()))
    else {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "python3 is needed for this test"
        );
        eprintln!("skipped: python3 is not available");
        return;
    };
    let gw = gateway(&format!(
        r#"
[upstreams.py]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]
max_attempts = 2
[[routes]]
path_prefix = "/"
upstream = "py"
"#
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 5_000 {
                sent += 1;
                let req = Request::get(format!("http://{gw}/page.txt"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let ok = match client.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => resp
                        .into_body()
                        .collect()
                        .await
                        .is_ok_and(|b| b.to_bytes() == "hello from python"),
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // SIGKILL, not a polite stop: connections die mid-request.
    one.kill().unwrap();
    one.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        total += t.await.unwrap();
    }
    let _ = two.kill();
    let _ = two.wait();
    assert!(total > 100, "only {total} requests");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} GETs");
}

#[tokio::test]
async fn idle_connections_are_closed_but_slow_requests_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = upstream("a").await;
    let gw = gateway_to(server, "idle_timeout_ms = 300", "", "").await;
    // A request that takes longer than the idle timeout is answered.
    let slow = send(gw, "GET", "/sleep/900", &[], "").await;
    assert_eq!(slow.status, StatusCode::OK);

    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Then silence: the gateway closes the connection within 1.5 idle periods.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_reload_keeps_unchanged_pools_with_their_statistics() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let config = |extra_route: &str| {
        format!(
            r#"
[upstreams.keep]
servers = [{{ address = "{a}" }}]
[upstreams.other]
servers = [{{ address = "{b}" }}]
[[routes]]
path_prefix = "/keep"
upstream = "keep"
{extra_route}
"#
        )
    };
    let (gw, handle) = gateway_handle(&config("")).await;
    let adm = admin(&handle).await;
    for _ in 0..5 {
        assert_eq!(
            send(gw, "GET", "/keep", &[], "").await.status,
            StatusCode::OK
        );
    }
    let requests = |v: &serde_json::Value, pool: &str| v[pool]["servers"][0]["requests"].clone();
    let before = send(adm, "GET", "/admin/upstreams", &[], "").await.json;
    assert_eq!(requests(&before, "keep"), 5);
    // A new route: the pool is the same, its counters go on.
    handle
        .reload(
            GatewayConfig::parse(&config(
                "[[routes]]\npath_prefix = \"/other\"\nupstream = \"other\"",
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        send(gw, "GET", "/keep", &[], "").await.status,
        StatusCode::OK
    );
    assert_eq!(send(gw, "GET", "/other", &[], "").await.json["server"], "b");
    let after = send(adm, "GET", "/admin/upstreams", &[], "").await.json;
    assert_eq!(requests(&after, "keep"), 6, "{after}");
    // A changed pool starts afresh.
    let changed = config("").replace("[upstreams.keep]", "[upstreams.keep]\nmax_attempts = 1");
    handle
        .reload(GatewayConfig::parse(&changed).unwrap())
        .await
        .unwrap();
    let fresh = send(adm, "GET", "/admin/upstreams", &[], "").await.json;
    assert_eq!(requests(&fresh, "keep"), 0, "{fresh}");
}
