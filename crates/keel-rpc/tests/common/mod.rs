//! Test fixtures: servers on port 0, a test service with controllable behaviour, raw frames.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use keel_echo::{EchoReply, EchoRequest, EchoServer, EchoService};
use keel_rpc::protocol::{DEFAULT_MAX_FRAME_SIZE, Frame};
use keel_rpc::{Channel, ChannelConfig, Server, ServerConfig, ServiceDef, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Counters the test service updates, so tests can see what handlers did.
#[derive(Debug, Default)]
pub struct Probe {
    pub started: AtomicUsize,
    /// Handlers whose future was dropped before finishing (cancelled or timed out).
    pub dropped_unfinished: AtomicUsize,
    pub finished: AtomicUsize,
    /// Items the `Flood` stream has produced.
    pub flood_items: AtomicUsize,
}

struct DropProbe {
    probe: Arc<Probe>,
    finished: bool,
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        if self.finished {
            self.probe.finished.fetch_add(1, Ordering::SeqCst);
        } else {
            self.probe.dropped_unfinished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

pub const TEST_SERVICE: &str = "test.Test";

/// `test.Test`: `Sleep` (sleeps `message` ms, then echoes), `Panic`, `Remaining` (replies with
/// the handler's remaining time in ms), all on the echo messages.
pub fn test_service(probe: Arc<Probe>) -> ServiceDef {
    let p = probe.clone();
    ServiceDef::new(TEST_SERVICE)
        .unary("Sleep", move |_ctx, req: EchoRequest| {
            let probe = p.clone();
            async move {
                probe.started.fetch_add(1, Ordering::SeqCst);
                let mut guard = DropProbe {
                    probe,
                    finished: false,
                };
                let ms: u64 = req
                    .message
                    .parse()
                    .map_err(|_| Status::invalid_argument("message must be ms"))?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.finished = true;
                Ok(EchoReply {
                    message: req.message,
                    payload: req.payload,
                })
            }
        })
        .unary("Panic", |_ctx, _req: EchoRequest| async move {
            if true {
                panic!("test handler panicked on purpose");
            }
            Ok(EchoReply::default())
        })
        .unary("PanicLater", |_ctx, _req: EchoRequest| async move {
            // Panics after waiting, so on the spawned-task path rather than inline.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if true {
                panic!("test handler panicked later on purpose");
            }
            Ok(EchoReply::default())
        })
        .unary("Big", |_ctx, req: EchoRequest| async move {
            // Replies with a payload of `message` bytes.
            let n: usize = req
                .message
                .parse()
                .map_err(|_| Status::invalid_argument("message must be a size"))?;
            Ok(EchoReply {
                message: String::new(),
                payload: vec![7; n].into(),
            })
        })
        .server_streaming("BigStream", |_ctx, req: EchoRequest| async move {
            // Streams a 10-byte item, then one of `message` bytes.
            let n: usize = req
                .message
                .parse()
                .map_err(|_| Status::invalid_argument("message must be a size"))?;
            let items = [10, n].map(|len| {
                Ok(EchoReply {
                    message: String::new(),
                    payload: vec![7; len].into(),
                })
            });
            Ok(futures_util::stream::iter(items))
        })
        .server_streaming("Flood", move |_ctx, req: EchoRequest| {
            // Streams `message` items of 64 KiB as fast as the connection takes them.
            let probe = probe.clone();
            async move {
                let n: usize = req
                    .message
                    .parse()
                    .map_err(|_| Status::invalid_argument("message must be a count"))?;
                let item = bytes::Bytes::from(vec![7u8; 64 * 1024]);
                Ok(futures_util::stream::iter(0..n).map(move |_| {
                    probe.flood_items.fetch_add(1, Ordering::SeqCst);
                    Ok(EchoReply {
                        message: String::new(),
                        payload: item.clone(),
                    })
                }))
            }
        })
        .unary("Work", {
            // A service with 4 workers and 10 ms of work per call: beyond 4 calls at once,
            // calls queue for a worker.
            let workers = Arc::new(tokio::sync::Semaphore::new(4));
            move |_ctx, _req: EchoRequest| {
                let workers = workers.clone();
                async move {
                    let _worker = workers.acquire().await.expect("never closed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok(EchoReply::default())
                }
            }
        })
        .unary("Meta", |ctx, req: EchoRequest| async move {
            // Replies with the value of the metadata entry named by `message`.
            let value = ctx
                .metadata()
                .get(&req.message)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            Ok(EchoReply {
                message: value,
                payload: Default::default(),
            })
        })
        .unary("Remaining", |ctx, _req: EchoRequest| async move {
            let ms = ctx
                .remaining()
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| "none".into());
            Ok(EchoReply {
                message: ms,
                payload: Default::default(),
            })
        })
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Server,
    pub probe: Arc<Probe>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestServer::start_on(listener, config).await
    }

    pub async fn start_on(listener: TcpListener, config: ServerConfig) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let probe = Arc::new(Probe::default());
        let server = Server::builder()
            .config(config)
            .add_service(EchoServer::new(EchoService))
            .add_service(test_service(probe.clone()))
            .build();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            server,
            probe,
            stop: Some(stop),
            task,
        }
    }

    /// A connected channel to this server, with default settings.
    pub async fn channel(&self) -> Channel {
        Channel::connect(self.addr.to_string(), ChannelConfig::default())
            .await
            .unwrap()
    }

    /// Starts graceful shutdown and returns the serve task to await.
    pub fn shutdown(mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
    }
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Reads frames from a raw connection until it closes (or 10 s pass).
pub async fn read_frames_until_close(stream: &mut TcpStream) -> (Vec<Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            while let Ok(Some(f)) = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                frames.push(f);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok();
    (frames, closed)
}

/// Sends raw bytes over a fresh connection.
pub async fn raw_connect(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Sends raw request bytes and returns everything the server writes until it closes.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = raw_connect(addr, request).await;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

/// Sends one HTTP/1.1 request and returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = raw_connect(addr, req.as_bytes()).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}
