//! The accept loop every Keel server runs.
//!
//! [`AcceptLoop::run`] takes connections from a listener and hands each, in a task of its
//! own, to the server's handler with a [`Drain`]:
//!
//! - **Connection cap.** With [`max_connections`](AcceptLoop::max_connections) connections
//!   open, a new one is closed at once (its client sees the connection reset or closed before
//!   any answer) and counted in [`ConnectionStats::refused`]. The cap may be read anew for
//!   every connection, so a server whose settings are reloaded applies a new cap at once.
//! - **Accept errors** (out of file descriptors, a connection reset before it was taken) are
//!   logged and slow the loop for [`ACCEPT_ERROR_PAUSE`] instead of spinning it; the listener
//!   stays valid.
//! - **Shutdown in two steps.** When the `shutdown` future completes the listener is closed
//!   and every connection's [`Drain`] turns to draining: protocols say goodbye their own way
//!   (RPC's goaway, HTTP's `Connection: close`) and finish what is in flight. After the
//!   grace period, [`Drain::forced`] fires for the connections still open; the tasks of those
//!   not ended [`FORCED_EXIT`] later are aborted (so a handler need not watch for it, and
//!   polls nothing per request for it), and the loop waits for them to end.
//! - **Counts** (accepted, open, refused) in [`ConnectionStats`], shared with the server's
//!   metrics; `open` is counted down however a connection's task ends, a panic included.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long the loop pauses after a failed accept.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Connection counts of one listener.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections taken from the listener (refused ones included).
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicI64,
    /// Connections closed at once because the cap was reached.
    pub refused: AtomicU64,
}

/// What a connection's handler is told about the server's shutdown.
#[derive(Clone, Debug)]
pub struct Drain {
    draining: CancellationToken,
    force: CancellationToken,
}

impl Drain {
    /// A drain with the handles that start it: cancel the first token to drain, the second
    /// to force.
    fn with_handles() -> (Drain, CancellationToken, CancellationToken) {
        let (draining, force) = (CancellationToken::new(), CancellationToken::new());
        let drain = Drain {
            draining: draining.clone(),
            force: force.clone(),
        };
        (drain, draining, force)
    }

    /// Whether the server has begun shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Completes once the server has begun shutting down (at once if it has): stop taking
    /// new requests on this connection, finish the ones in flight, close. The future owns
    /// what it waits on, so a busy connection's loop can make it once, outside the loop:
    /// polling it again costs less than making a new one each time round.
    pub fn draining(&self) -> WaitForCancellationFutureOwned {
        self.draining.clone().cancelled_owned()
    }

    /// Completes when the grace period is over: close now, whatever is in flight. The future
    /// owns what it waits on, so a connection's loop makes it once, outside the loop, and
    /// waits on it beside [`Drain::draining`].
    pub fn forced(&self) -> WaitForCancellationFutureOwned {
        self.force.clone().cancelled_owned()
    }
}

type Setting<T> = Box<dyn Fn() -> T + Send + Sync>;

/// After the grace period, how long handlers have to end by themselves once [`Drain::forced`]
/// fired, before their tasks are aborted.
pub const FORCED_EXIT: Duration = Duration::from_millis(250);

/// The accept loop of one listener; see the [module docs](self).
pub struct AcceptLoop {
    stats: Arc<ConnectionStats>,
    max_connections: Setting<usize>,
    shutdown_grace: Setting<Duration>,
    nodelay: bool,
}

impl std::fmt::Debug for AcceptLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptLoop")
            .field("stats", &self.stats)
            .field("max_connections", &(self.max_connections)())
            .field("shutdown_grace", &(self.shutdown_grace)())
            .field("nodelay", &self.nodelay)
            .finish()
    }
}

impl AcceptLoop {
    /// A loop counting into `stats`, with no cap, a 30 s grace period and `TCP_NODELAY` on.
    pub fn new(stats: Arc<ConnectionStats>) -> AcceptLoop {
        AcceptLoop {
            stats,
            max_connections: Box::new(|| usize::MAX),
            shutdown_grace: Box::new(|| Duration::from_secs(30)),
            nodelay: true,
        }
    }

    /// At most `max` connections open at once.
    pub fn max_connections(self, max: usize) -> AcceptLoop {
        self.max_connections_from(move || max)
    }

    /// The cap, read for every new connection (for settings that are reloaded).
    pub fn max_connections_from(
        mut self,
        max: impl Fn() -> usize + Send + Sync + 'static,
    ) -> AcceptLoop {
        self.max_connections = Box::new(max);
        self
    }

    /// How long connections may drain after shutdown starts before they are cut.
    pub fn shutdown_grace(self, grace: Duration) -> AcceptLoop {
        self.shutdown_grace_from(move || grace)
    }

    /// The grace period, read when shutdown starts.
    pub fn shutdown_grace_from(
        mut self,
        grace: impl Fn() -> Duration + Send + Sync + 'static,
    ) -> AcceptLoop {
        self.shutdown_grace = Box::new(grace);
        self
    }

    /// Whether accepted sockets get `TCP_NODELAY` (on by default: Keel's protocols write
    /// whole messages and want them sent at once).
    pub fn nodelay(mut self, on: bool) -> AcceptLoop {
        self.nodelay = on;
        self
    }

    /// Serves `listener` until `shutdown` completes, each connection by `handle` in a task of
    /// its own; returns once every connection's task has ended (after the grace period at the
    /// latest, when the tasks left are aborted).
    pub async fn run<H, F>(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        mut handle: H,
    ) -> std::io::Result<()>
    where
        H: FnMut(TcpStream, SocketAddr, Drain) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let (drain, drain_tx, force) = Drain::with_handles();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let stats = &self.stats;
            stats.accepted.fetch_add(1, Relaxed);
            let open = stats.open.load(Relaxed);
            if open >= i64::try_from((self.max_connections)()).unwrap_or(i64::MAX) {
                stats.refused.fetch_add(1, Relaxed);
                tracing::debug!(%peer, open, "connection cap reached; closing the new connection");
                drop(stream);
                continue;
            }
            if self.nodelay {
                let _ = stream.set_nodelay(true);
            }
            stats.open.fetch_add(1, Relaxed);
            let open = Open(stats.clone());
            let served = handle(stream, peer, drain.clone());
            tasks.spawn(async move {
                let _open = open;
                served.await;
            });
            // Ended connections' tasks are reaped as new ones come.
            while tasks.try_join_next().is_some() {}
        }
        drop(listener);
        tracing::info!(
            connections = self.stats.open.load(Relaxed),
            "shutting down: draining connections"
        );
        drain_tx.cancel();
        let grace = (self.shutdown_grace)();
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                connections = self.stats.open.load(Relaxed),
                "connections still open after the grace period; closing them"
            );
            // Handlers that watch for it end their own way first (RPC stops its calls);
            // what is left is aborted.
            force.cancel();
            let _ = tokio::time::timeout(FORCED_EXIT, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        Ok(())
    }
}

/// Counts a connection as open until dropped, however its task ends.
struct Open(Arc<ConnectionStats>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Echoes until the peer closes or the server drains (then says "bye" and closes).
    async fn echo(mut stream: TcpStream, drain: Drain) {
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => { let _ = stream.write_all(&buf[..n]).await; }
                },
                () = drain.draining() => {
                    let _ = stream.write_all(b"bye").await;
                    return;
                }
            }
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_counted() {
        let (listener, addr) = listener().await;
        let stats = Arc::new(ConnectionStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(AcceptLoop::new(stats.clone()).max_connections(1).run(
            listener,
            async { drop(stop_rx.await) },
            |s, _, d| echo(s, d),
        ));
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"hi").await.unwrap();
        let mut two = [0u8; 2];
        first.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"hi");
        // The second is closed without an answer.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let _ = second.write_all(b"hi").await;
        let mut buf = [0u8; 2];
        let read = second.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(stats.refused.load(Relaxed), 1);
        assert_eq!(stats.accepted.load(Relaxed), 2);
        assert_eq!(stats.open.load(Relaxed), 1);
        // Shutdown drains the first: it hears "bye", and the loop returns.
        stop_tx.send(()).unwrap();
        let mut bye = [0u8; 3];
        first.read_exact(&mut bye).await.unwrap();
        assert_eq!(&bye, b"bye");
        server.await.unwrap().unwrap();
        assert_eq!(stats.open.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_drain_is_forced_after_the_grace_period() {
        let (listener, addr) = listener().await;
        let stats = Arc::new(ConnectionStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (forced_tx, mut forced_rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(
            AcceptLoop::new(stats.clone())
                .shutdown_grace(Duration::from_secs(5))
                .run(
                    listener,
                    async { drop(stop_rx.await) },
                    move |_stream, _, drain| {
                        let forced_tx = forced_tx.clone();
                        async move {
                            // Ignores the drain; ends only when forced.
                            drain.forced().await;
                            let _ = forced_tx.send(());
                        }
                    },
                ),
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        while stats.open.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(forced_rx.try_recv().is_ok(), "the handler was forced");
        assert_eq!(stats.open.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_panicking_handler_is_counted_down() {
        let (listener, addr) = listener().await;
        let stats = Arc::new(ConnectionStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(AcceptLoop::new(stats.clone()).run(
            listener,
            async { drop(stop_rx.await) },
            |_, _, _| async { panic!("handler panics") },
        ));
        let _client = TcpStream::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.accepted.load(Relaxed) == 0 || stats.open.load(Relaxed) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "never counted down");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
