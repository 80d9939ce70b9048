//! Helpers shared by the gateway tests: real upstream servers on loopback, a gateway, a client.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_gateway::{Gateway, GatewayConfig};
use tokio::net::TcpListener;

/// An upstream that answers with JSON describing what it received; `/slow` takes 2 s.
pub async fn upstream(name: &'static str) -> SocketAddr {
    upstream_with_health(name, Arc::new(AtomicBool::new(false))).await
}

/// The same, with `/health` answering 500 while `sick` is set.
pub async fn upstream_with_health(name: &'static str, sick: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sick = sick.clone();
            let served = served.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let sick = sick.clone();
                    let served = served.clone();
                    async move {
                        if matches!(req.uri().path(), "/health" | "/flaky")
                            && sick.load(Ordering::SeqCst)
                        {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"sick")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            return Ok::<_, Infallible>(r);
                        }
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        if let Some(ms) = req.uri().path().strip_prefix("/sleep/") {
                            let ms = ms.parse().unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        // ?cc=<Cache-Control>&expires=<seconds>&size=<padding bytes>
                        let query: Vec<(String, String)> = req
                            .uri()
                            .query()
                            .unwrap_or("")
                            .split('&')
                            .filter_map(|p| p.split_once('='))
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect();
                        let param =
                            |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                        if req.uri().path() == "/fail" {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"boom")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            return Ok::<_, Infallible>(r);
                        }
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let body = serde_json::json!({
                            "server": name,
                            "method": req.method().as_str(),
                            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                            "host": header("host"),
                            "xff": header("x-forwarded-for"),
                            "connection": header("connection"),
                            "x_hop": header("x-hop"),
                            "x_user_id": header("x-user-id"),
                            "x_forwarded_proto": header("x-forwarded-proto"),
                            "cookie": header("cookie"),
                            "n": n,
                            "pad": "x".repeat(param("size").and_then(|s| s.parse().ok()).unwrap_or(0)),
                            "body": String::from_utf8_lossy(&req.into_body().collect().await.unwrap().to_bytes()),
                        });
                        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                        r.headers_mut()
                            .insert("keep-alive", "timeout=5".parse().unwrap());
                        if let Some(cc) = param("cc") {
                            r.headers_mut().insert("cache-control", cc.parse().unwrap());
                        }
                        if let Some(secs) = param("expires").and_then(|s| s.parse().ok()) {
                            let at = std::time::SystemTime::now() + Duration::from_secs(secs);
                            r.headers_mut()
                                .insert("expires", httpdate::fmt_http_date(at).parse().unwrap());
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A gateway sending everything to one upstream server.
pub async fn one_upstream(server: SocketAddr) -> SocketAddr {
    gateway_to(server, "", "", "").await
}

/// A gateway whose one route sends everything to the pool `api` of one server, with extra
/// lines for `[server]`, the pool and the route.
pub async fn gateway_to(
    server: SocketAddr,
    server_lines: &str,
    pool_lines: &str,
    route_lines: &str,
) -> SocketAddr {
    gateway(&format!(
        "[server]\n{server_lines}\n[upstreams.api]\nservers = [{{ address = \"{server}\" }}]\n{pool_lines}\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n{route_lines}\n"
    ))
    .await
}

/// A port with nothing listening.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub async fn gateway(config: &str) -> SocketAddr {
    gateway_handle(config).await.0
}

/// A gateway serving on a free port, and its handle (for reloads and metrics).
pub async fn gateway_handle(config: &str) -> (SocketAddr, Gateway) {
    let config = GatewayConfig::parse(config).unwrap();
    let gateway = Gateway::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        gateway
            .clone()
            .serve(listener, std::future::pending::<()>()),
    );
    (addr, gateway)
}

pub struct Answer {
    pub status: StatusCode,
    pub json: serde_json::Value,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub async fn send(
    gw: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{gw}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        json,
        headers,
        body: bytes,
    }
}

/// Sends raw bytes and returns what comes back before the connection closes (or 5 s pass).
pub async fn raw(gw: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
