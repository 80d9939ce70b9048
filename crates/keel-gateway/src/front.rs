//! hyper's front end: a client connection served by hyper (HTTP/1.1 and HTTP/2, upgrades),
//! each request handed to `proxy::handle`. Keel's HTTP/1.1 loop (`fast`) hands a connection
//! over to it when the client speaks what the loop does not, replaying the bytes already read.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::state::Inner;
use crate::{conns, framing, proxy};

/// Serves one client connection (HTTP/1.1 or HTTP/2, with upgrades) until it ends or the
/// janitor asks it to wind down (idle for too long, or the gateway stopping). `replay` holds
/// bytes already read from `io` (by the fast path, which hands the connection over), read
/// again first.
pub(crate) async fn serve_connection<I>(
    inner: Arc<Inner>,
    io: I,
    replay: bytes::Bytes,
    peer: std::net::SocketAddr,
    tls: bool,
    state: Arc<conns::ConnState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, max_header_bytes) = {
        let shared = inner.current.load();
        let server = &shared.config.server;
        (server.header_timeout, server.max_header_bytes)
    };
    let requests = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        let requests = requests.clone();
        async move {
            // Counted down also when hyper drops the request midway (an HTTP/2 reset).
            let _busy = conns::Busy::new(&requests);
            let index = requests.requests.fetch_add(1, Ordering::Relaxed);
            if index == requests.ambiguous.load(Ordering::Acquire) {
                return Ok(proxy::ambiguous_framing().into_response());
            }
            let resp = proxy::handle(inner, req, peer, tls).await;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let io = Activity {
        io,
        replay,
        state: state.clone(),
        framing: Some(framing::Framing::new(max_header_bytes)),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_header_bytes);
    builder
        .http2()
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // Until a first request arrives the connection is on the header deadline: hyper's own
    // header timeout starts only once it has told HTTP/1 from HTTP/2, so a client trickling
    // the first bytes would otherwise hold the connection.
    let mut first_request_by = std::pin::pin!(tokio::time::sleep(header_timeout));
    let (mut registered, mut winding_down) = (false, false);
    let result = std::future::poll_fn(|cx| {
        if !registered {
            // A task's waker stays valid for the task's life: one registration will do.
            state.waker.register(cx.waker());
            registered = true;
        }
        if !winding_down && state.close.load(Ordering::Acquire) {
            conn.as_mut().graceful_shutdown();
            winding_down = true;
        }
        if !state.started.load(Ordering::Relaxed) && first_request_by.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        conn.as_mut().poll(cx).map(Some)
    })
    .await;
    match result {
        None => tracing::debug!(%peer, "no request within the header timeout; closed"),
        Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
        Some(Ok(())) => {}
    }
}

/// Counts reads and writes that moved bytes, so an idle connection can be told apart, and
/// follows the framing of the requests read (see `framing`); serves `replay` before reading
/// from `io`.
struct Activity<I> {
    io: I,
    replay: bytes::Bytes,
    state: Arc<conns::ConnState>,
    framing: Option<framing::Framing>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Activity<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = if this.replay.is_empty() {
            std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
        } else {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            std::task::Poll::Ready(Ok(()))
        };
        if buf.filled().len() > before {
            this.state.activity.fetch_add(1, Ordering::Relaxed);
            if let Some(framing) = &mut this.framing {
                if let Some(index) = framing.feed(&buf.filled()[before..]).ambiguous {
                    this.state.ambiguous.store(index, Ordering::Release);
                }
                if !framing.is_on() {
                    this.framing = None;
                }
            }
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Activity<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.state.activity.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.state.activity.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
