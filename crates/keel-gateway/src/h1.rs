//! Pooled HTTP/1.1 connections to upstream servers, driven by the task of the request that
//! uses them.
//!
//! A general-purpose client (hyper-util's) runs every connection as a task of its own and
//! hands requests and responses to it through channels: each proxied request then wakes two
//! more tasks and takes a pool lock on the way in and out. Here a connection is owned by the
//! request that checked it out: the request's future polls it until the response head
//! arrives, and the response body polls it while the client reads the body, so a request is
//! served by one task from the client's bytes to the upstream's and back. When the body ends
//! the connection goes back to its server's idle list (newest first out); a connection that
//! closed while idle is noticed at checkout and replaced, and a request it could not even
//! send is sent on another connection.
//!
//! Upgrades (WebSocket) and h2c pools use hyper-util's client instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::{BoxError, DownBody};
use crate::upstream::{Server, UpBody};

type Connection = http1::Connection<TokioIo<TcpStream>, UpBody>;

/// An idle connection.
pub(crate) struct Idle {
    sender: http1::SendRequest<UpBody>,
    conn: Pin<Box<Connection>>,
    since: Instant,
}

/// Idle connections of one server.
#[derive(Default)]
pub(crate) struct IdleList {
    list: parking_lot::Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for IdleList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleList")
            .field("idle", &self.list.lock().len())
            .finish()
    }
}

/// Idle connections kept per server at most, and for how long.
const MAX_IDLE: usize = 1024;
const IDLE_FOR: Duration = Duration::from_secs(90);

impl IdleList {
    fn take(&self) -> Option<Idle> {
        let mut list = self.list.lock();
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < IDLE_FOR && !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }

    fn put(&self, idle: Idle) {
        let mut list = self.list.lock();
        if list.len() >= MAX_IDLE {
            // The oldest is the least likely to still be open.
            list.remove(0);
        }
        list.push(idle);
    }

    /// Idle connections now.
    pub(crate) fn len(&self) -> usize {
        self.list.lock().len()
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub(crate) struct SendError(pub(crate) String);

/// Sends `req` to `server` over a pooled connection (or a new one) and returns the response
/// with a body that gives the connection back when it ends.
pub(crate) async fn send(
    server: &Arc<Server>,
    mut req: Request<UpBody>,
    connect_timeout: Duration,
) -> Result<Response<DownBody>, SendError> {
    loop {
        let (idle, reused) = match server.idle.take() {
            Some(idle) => (idle, true),
            None => (connect(server, connect_timeout).await?, false),
        };
        let Idle {
            mut sender,
            mut conn,
            ..
        } = idle;
        // Until the connection says it can take a request (it has been polled idle).
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Err(result.err()));
            }
            sender.poll_ready(cx).map_err(Some)
        })
        .await;
        if let Err(e) = ready {
            if reused {
                continue; // closed while idle: another one
            }
            return Err(SendError(e.map_or_else(
                || "the server closed the connection".into(),
                |e| e.to_string(),
            )));
        }
        let mut response = std::pin::pin!(sender.try_send_request(req));
        let mut conn_ended = false;
        let result = std::future::poll_fn(|cx| {
            if !conn_ended && conn.as_mut().poll(cx).is_ready() {
                // Closed or failed: the response future now resolves with the reason.
                conn_ended = true;
            }
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(resp) => {
                let alive = !conn_ended;
                let (parts, body) = resp.into_parts();
                let mut pooled = PooledBody {
                    body,
                    conn: alive.then_some((sender, conn)),
                    server: server.clone(),
                };
                if pooled.body.is_end_stream() {
                    pooled.release();
                }
                return Ok(Response::from_parts(parts, pooled.boxed()));
            }
            Err(mut e) => match e.take_message() {
                // Never written: safe to send again, on a fresh connection.
                Some(unsent) if reused => req = unsent,
                _ => return Err(SendError(e.into_error().to_string())),
            },
        }
    }
}

async fn connect(server: &Server, timeout: Duration) -> Result<Idle, SendError> {
    let address = server.address.as_str();
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError(format!("connecting: {e}"))),
        Err(_) => {
            return Err(SendError(format!(
                "connecting: no answer within {timeout:?}"
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError(format!("handshake: {e}")))?;
    Ok(Idle {
        sender,
        conn: Box::pin(conn),
        since: Instant::now(),
    })
}

/// A response body that drives its connection and returns it to the pool at the end.
struct PooledBody {
    body: Incoming,
    conn: Option<(http1::SendRequest<UpBody>, Pin<Box<Connection>>)>,
    server: Arc<Server>,
}

impl PooledBody {
    /// The whole response has been read: the connection can serve another request.
    fn release(&mut self) {
        if let Some((sender, conn)) = self.conn.take()
            && !sender.is_closed()
        {
            self.server.idle.put(Idle {
                sender,
                conn,
                since: Instant::now(),
            });
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((_, conn)) = &mut this.conn
            && conn.as_mut().poll(cx).is_ready()
        {
            // The connection ended; what it read is in the body already.
            this.conn = None;
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
