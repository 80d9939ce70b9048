//! One HTTP/1.1 connection under the accept loop's drain.

use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Drain;

/// Serves HTTP/1.1 on `io` with `service` until the connection ends: the client closes it,
/// the service accepts an upgrade (a WebSocket) and the socket is handed over,
/// sends no complete request head within `header_timeout`, or the server drains (the
/// request in flight is answered with `Connection: close`, an idle connection closes at once)
/// or is forced (the connection is dropped). Errors end the connection and are logged at
/// debug level: they are the client's doing or a broken socket.
pub async fn serve_http1<I, S>(io: I, service: S, header_timeout: Duration, drain: Drain)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        // A service may accept an upgrade (`hyper::upgrade::on`); the connection then ends
        // here and the socket goes to whoever awaits the upgrade.
        .with_upgrades();
    tokio::pin!(conn);
    let forced = drain.forced();
    tokio::pin!(forced);
    let mut draining = drain.is_draining();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = drain.draining(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut forced => return,
        }
    }
}

/// Whether `GET path` on `address` (`host:port`, HTTP/1.1) is answered with status 200
/// within `timeout`: a liveness probe for a Keel process, whose every port serves
/// `GET /health`. Any failure (refused, reset, timed out, another status) is `false`.
pub async fn answers_ok(address: &str, path: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let asked = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // "HTTP/1.1 200": the status is the status line's second word.
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head)
    };
    matches!(
        tokio::time::timeout(timeout, asked).await,
        Ok(Ok(head)) if head.starts_with(b"HTTP/1.") && head.ends_with(b" 200")
    )
}
