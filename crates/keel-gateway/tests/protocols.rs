//! WebSocket tunnelling, HTTP/2 (gRPC-style, with trailers) to h2c upstreams, and TLS with
//! ALPN and certificate reload, through a real gateway.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_gateway::GatewayConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket server that echoes every message, prefixed with "echo: ".
async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("echo: {t}")),
                        Message::Binary(b) => Message::binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_echo_through_the_gateway() {
    let ws_server = websocket_echo().await;
    let http_server = upstream("plain").await;
    let gw = gateway(&format!(
        r#"
[upstreams.ws]
servers = [{{ address = "{ws_server}" }}]
[upstreams.plain]
servers = [{{ address = "{http_server}" }}]
[[routes]]
path = "/chat"
upstream = "ws"
[[routes]]
path_prefix = "/"
upstream = "plain"
"#
    ))
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{gw}/chat"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..50 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::text(format!("echo: hello {i}")));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();

    // Plain requests still work beside it, and an upgrade to a server that does not
    // upgrade gets that server's plain answer.
    assert_eq!(send(gw, "GET", "/x", &[], "").await.status, StatusCode::OK);
    let refused = raw_head(
        gw,
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 200"), "{refused}");
}

/// Sends raw bytes and returns the answer's head (up to the blank line).
async fn raw_head(gw: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2-only (h2c) server answering like gRPC: the request body back, then trailers.
async fn grpc_like() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let te = req
                        .headers()
                        .get("te")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let version = format!("{:?}", req.version());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    trailers.insert("grpc-message", "ok".parse().unwrap());
                    let frames = futures_util::stream::iter(vec![
                        Ok::<_, Infallible>(hyper::body::Frame::data(body)),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ]);
                    let mut resp = Response::new(http_body_util::StreamBody::new(frames));
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    resp.headers_mut().insert("x-te", te.parse().unwrap());
                    resp.headers_mut()
                        .insert("x-version", version.parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn grpc_passes_through_over_http2_with_trailers() {
    let server = grpc_like().await;
    let gw = gateway(&format!(
        r#"
[upstreams.grpc]
servers = [{{ address = "{server}" }}]
protocol = "h2c"
[[routes]]
path_prefix = "/"
upstream = "grpc"
"#
    ))
    .await;
    let stream = TcpStream::connect(gw).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..20u8 {
        let payload = Bytes::from(vec![0, 0, 0, 0, 3, i, i, i]);
        let req = Request::post(format!("http://{gw}/echo.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(payload.clone()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.headers()["x-te"],
            "trailers",
            "TE: trailers reaches gRPC"
        );
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes(), payload);
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "ok");
    }
}

struct Cert {
    der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

fn new_cert() -> Cert {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    Cert {
        der: certified.cert.der().to_vec(),
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
    }
}

/// Connects over TLS trusting `cert`; returns the stream and the certificate the server
/// showed.
async fn tls_connect(
    gw: SocketAddr,
    cert: &Cert,
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    tls_over(TcpStream::connect(gw).await.unwrap(), cert, alpn).await
}

/// TLS over a connection made by the caller.
async fn tls_over(
    tcp: TcpStream,
    cert: &Cert,
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert.der.clone()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, shown)
}

#[tokio::test]
async fn tls_with_alpn_and_certificates_renewed_by_reload() {
    let server = upstream("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = new_cert();
    std::fs::write(&cert_path, &first.cert_pem).unwrap();
    std::fs::write(&key_path, &first.key_pem).unwrap();
    let config = format!(
        r#"
[server.tls]
cert = "{}"
key = "{}"
[upstreams.api]
servers = [{{ address = "{server}" }}]
[[routes]]
path_prefix = "/"
upstream = "api"
"#,
        cert_path.display(),
        key_path.display()
    );
    let (gw, handle) = gateway_handle(&config).await;

    // HTTP/2 chosen by ALPN.
    let (stream, shown) = tls_connect(gw, &first, &[b"h2", b"http/1.1"]).await;
    assert_eq!(shown, first.der);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            Request::get(format!("https://localhost:{}/hello", gw.port()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["x_forwarded_proto"], "https");

    // HTTP/1.1 for a client that offers only that.
    let (stream, _) = tls_connect(gw, &first, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1
        .send_request(
            Request::get("/hello")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // A renewed certificate applies on reload; a broken one is refused and the old stays.
    let second = new_cert();
    std::fs::write(&cert_path, &second.cert_pem).unwrap();
    std::fs::write(&key_path, &second.key_pem).unwrap();
    handle
        .reload(GatewayConfig::parse(&config).unwrap())
        .await
        .unwrap();
    let (_, shown) = tls_connect(gw, &second, &[b"h2"]).await;
    assert_eq!(shown, second.der);
    std::fs::write(&key_path, "not a key").unwrap();
    let err = handle
        .reload(GatewayConfig::parse(&config).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls key"), "{err}");
    let (_, shown) = tls_connect(gw, &second, &[b"h2"]).await;
    assert_eq!(shown, second.der);
}

#[tokio::test]
async fn websocket_tunnels_count_as_connections_and_end_when_the_gateway_stops() {
    let ws_server = websocket_echo().await;
    let config = GatewayConfig::parse(&format!(
        "[upstreams.ws]\nservers = [{{ address = \"{ws_server}\" }}]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"ws\"\n"
    ))
    .unwrap();
    let gateway = keel_gateway::Gateway::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{gw}/chat"))
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo: hi"));
    let metrics = gateway.render_metrics();
    assert!(
        metrics.contains("keel_gateway_connections_open 1"),
        "{metrics}"
    );
    let _ = stop.send(());
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the tunnel ends at stop");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    assert!(
        gateway
            .render_metrics()
            .contains("keel_gateway_connections_open 0")
    );
}

#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed_and_a_busy_one_is_not() {
    let ws_server = websocket_echo().await;
    let (gw, gateway) = gateway_handle(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nidle_timeout_ms = 400\n[upstreams.ws]\nservers = [{{ address = \"{ws_server}\" }}]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"ws\"\n"
    ))
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{gw}/chat"))
        .await
        .unwrap();
    // Busy for three times the idle timeout: a message every 150 ms keeps it open.
    let mut last = std::time::Instant::now();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("echo: m{i}"))
        );
        last = std::time::Instant::now();
    }
    // Then silent: the gateway closes it once nothing has crossed for the idle timeout.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the idle tunnel is closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(
        last.elapsed() >= Duration::from_millis(350),
        "closed only once idle: {:?}",
        last.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gateway
        .render_metrics()
        .contains("keel_gateway_connections_open 0")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the tunnel is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_large_answer_over_tls_to_a_slow_reader_arrives_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 8 MB through HTTP/1.1 over TLS (the fast path) to a client that reads slower than the
    // gateway writes, twice on one connection: every answer arrives whole and on time. (The
    // fast path flushes after each answer, since TLS may hold back what the socket did not
    // take; with the kernel's buffers this test does not reliably catch a missing flush.)
    let server = upstream("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let cert = new_cert();
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    let config = format!(
        "[server]\nidle_timeout_ms = 30000\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstreams.api]\nservers = [{{ address = \"{server}\" }}]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
        cert_path.display(),
        key_path.display()
    );
    let (gw, _handle) = gateway_handle(&config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(gw).await.unwrap();
    let (mut stream, _) = tls_over(tcp, &cert, &[b"http/1.1"]).await;
    let started = std::time::Instant::now();
    for round in 0..2 {
        stream
            .write_all(b"GET /big?size=8000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let body_len = loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("the answer stalled")
                .unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&chunk[..n]);
            if got.len() % (64 * 1024) < n {
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + len {
                    assert_eq!(got.len(), end + 4 + len, "round {round}");
                    break len;
                }
            }
        };
        assert!(body_len > 8_000_000, "round {round}: {body_len}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}
