//! The Keel RPC client.
//!
//! A [`Channel`] talks to one address over one long-lived multiplexed connection: it connects
//! in the background, pings when the connection is quiet and declares the peer dead when a
//! ping goes unanswered, and reconnects with exponential backoff and jitter. While it is
//! disconnected, calls fail at once with `unavailable` instead of queueing, so a layer above
//! (discovery and load balancing, in `keel-governance`) can send them elsewhere.
//!
//! Calls go through the [`CallTransport`] trait, which generated clients are generic over, so
//! a governed channel (many instances, balancing, retries) slots in where a `Channel` fits.

mod conn;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use conn::{ClientConn, Pending, Reply, StreamSlot};
pub use keel_net::Backoff;

use crate::protocol::{
    Codec, DEFAULT_MAX_FRAME_SIZE, Frame, FrameType, Metadata, RpcMessage, Text,
};
use crate::status::{Code, Status};
use crate::transport::Unsent;

/// Client settings. Every field has a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    /// How long one connection attempt may take.
    #[serde(with = "keel_net::duration::ms", rename = "connect_timeout_ms")]
    pub connect_timeout: Duration,
    /// Deadline for calls that set none; `None` (0 in config) means no deadline.
    #[serde(with = "keel_net::duration::opt_ms", rename = "default_timeout_ms")]
    pub default_timeout: Option<Duration>,
    /// Send a ping after the connection has been quiet this long.
    #[serde(with = "keel_net::duration::ms", rename = "keepalive_interval_ms")]
    pub keepalive_interval: Duration,
    /// Declare the peer dead if nothing arrives this long after a ping.
    #[serde(with = "keel_net::duration::ms", rename = "keepalive_timeout_ms")]
    pub keepalive_timeout: Duration,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Largest frame accepted from the server, and sent to it.
    pub max_frame_size: u32,
    /// Stream messages buffered for a slow reader before its stream is ended with `overloaded`.
    pub stream_buffer: usize,
}

impl Default for ChannelConfig {
    fn default() -> ChannelConfig {
        ChannelConfig {
            connect_timeout: Duration::from_secs(3),
            default_timeout: None,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            backoff: Backoff::default(),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            stream_buffer: 1024,
        }
    }
}

/// Where a channel's connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectivityState {
    /// A connection attempt is under way; calls wait for it (up to their deadline).
    Connecting,
    /// Connected; calls go out at once.
    Ready,
    /// The last attempt failed (the reason is given); calls fail fast with `unavailable`
    /// until a retry after backoff succeeds.
    TransientFailure(String),
}

/// Per-call options.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Time the caller will wait; sent to the server, which stops the handler when it passes.
    pub timeout: Option<Duration>,
    /// Body encoding for this call.
    pub codec: Codec,
    /// Free key/value metadata, e.g. a trace id.
    pub metadata: Vec<(Text, Bytes)>,
    /// Routing key for consistent-hash balancing (see [`hash_key`]); not sent on the wire.
    pub hash_key: Option<u64>,
}

/// 64-bit FNV-1a with a final avalanche step: stable across processes and versions, so every
/// client maps a routing key to the same point of a consistent-hash ring.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

impl CallOptions {
    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the codec.
    pub fn codec(mut self, codec: Codec) -> CallOptions {
        self.codec = codec;
        self
    }

    /// Routes this call by `key` under consistent-hash balancing: the same key reaches the
    /// same instance while the set of instances is stable.
    pub fn hash_key(mut self, key: impl AsRef<[u8]>) -> CallOptions {
        self.hash_key = Some(hash_key(key.as_ref()));
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: &str, value: impl Into<Bytes>) -> CallOptions {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

/// A call with its body already encoded (so a retry layer can resend it unchanged).
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Fully qualified service name.
    pub service: Text,
    /// Method name.
    pub method: Text,
    /// The encoded request message.
    pub body: Bytes,
    /// Options.
    pub options: CallOptions,
}

/// A successful unary reply, still encoded.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// The encoded reply message.
    pub body: Bytes,
    /// How `body` is encoded.
    pub codec: Codec,
    /// The reply's metadata (boxed, as in [`Frame`], to keep the reply small to move).
    pub metadata: Box<Metadata>,
}

/// Sends calls somewhere: one address ([`Channel`]) or, with governance, a service's instances.
pub trait CallTransport: Clone + Send + Sync + 'static {
    /// Makes a unary call.
    fn unary_raw(
        &self,
        request: RawRequest,
    ) -> impl Future<Output = Result<RawResponse, Status>> + Send;

    /// Makes a unary call with a message still to encode (what generated clients call).
    ///
    /// By default the message is encoded once into a buffer of its own and sent with
    /// [`unary_raw`](CallTransport::unary_raw), which a transport that may send it more than
    /// once (a retry, a hedge) needs. A [`Channel`] sends a call once, so it encodes the
    /// message straight into its connection's write buffer instead.
    fn unary_message<Req: RpcMessage>(
        &self,
        service: &'static str,
        method: &'static str,
        request: &Req,
        options: CallOptions,
    ) -> impl Future<Output = Result<RawResponse, Status>> + Send {
        let mut body = bytes::BytesMut::new();
        let encoded = options.codec.encode(request, &mut body);
        async move {
            encoded?;
            self.unary_raw(RawRequest {
                service: Text::from_static(service),
                method: Text::from_static(method),
                body: body.freeze(),
                options,
            })
            .await
        }
    }
    /// Starts a server-streaming call.
    fn server_streaming_raw(
        &self,
        request: RawRequest,
    ) -> impl Future<Output = Result<RawStream, Status>> + Send;
}

/// Makes a typed unary call over any transport (what generated clients call).
pub async fn unary<T: CallTransport, Req: RpcMessage, Resp: RpcMessage>(
    transport: &T,
    service: &'static str,
    method: &'static str,
    request: &Req,
    options: CallOptions,
) -> Result<Resp, Status> {
    let reply = transport
        .unary_message(service, method, request, options)
        .await?;
    reply.codec.decode(reply.body)
}

/// Starts a typed server-streaming call over any transport.
pub async fn server_streaming<T: CallTransport, Req: RpcMessage, Resp: RpcMessage>(
    transport: &T,
    service: &'static str,
    method: &'static str,
    request: &Req,
    options: CallOptions,
) -> Result<Streaming<Resp>, Status> {
    let mut body = bytes::BytesMut::new();
    options.codec.encode(request, &mut body)?;
    let raw = transport
        .server_streaming_raw(RawRequest {
            service: Text::from_static(service),
            method: Text::from_static(method),
            body: body.freeze(),
            options,
        })
        .await?;
    Ok(Streaming {
        raw,
        _marker: std::marker::PhantomData,
    })
}

/// Cancels the call on the server if the caller stops waiting before its reply arrives.
#[derive(Debug)]
struct CancelOnDrop {
    conn: Arc<ClientConn>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.conn.cancel(self.id);
        }
    }
}

/// The messages of a server-streaming call, still encoded. Dropping it cancels the call.
#[derive(Debug)]
pub struct RawStream {
    rx: mpsc::UnboundedReceiver<Result<Frame, Status>>,
    queued: Arc<AtomicUsize>,
    guard: CancelOnDrop,
    deadline: Option<Instant>,
    done: bool,
}

impl RawStream {
    /// The next message; `Ok(None)` when the stream ended successfully.
    pub async fn next(&mut self) -> Result<Option<(Bytes, Codec)>, Status> {
        if self.done {
            return Ok(None);
        }
        let received = match self.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.rx.recv()).await {
                Ok(r) => r,
                Err(_) => {
                    self.done = true;
                    return Err(Status::deadline_exceeded("stream deadline exceeded"));
                }
            },
            None => self.rx.recv().await,
        };
        let frame = match received {
            Some(Ok(frame)) => frame,
            Some(Err(status)) => {
                self.finish();
                return Err(status);
            }
            None => {
                self.finish();
                return Err(self.guard.conn.unavailable());
            }
        };
        match frame.kind {
            FrameType::StreamItem => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Ok(Some((frame.body, frame.meta.codec.unwrap_or_default())))
            }
            _ => {
                self.finish();
                match frame.meta.status {
                    None | Some(Code::Ok) => Ok(None),
                    Some(code) => Err(status_of(&frame, code)),
                }
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.guard.armed = false;
    }
}

/// The typed messages of a server-streaming call. Dropping it cancels the call.
#[derive(Debug)]
pub struct Streaming<T> {
    raw: RawStream,
    _marker: std::marker::PhantomData<fn() -> T>,
}

impl<T: RpcMessage> Streaming<T> {
    /// The next message; `Ok(None)` when the stream ended successfully.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        match self.raw.next().await? {
            Some((body, codec)) => codec.decode(body).map(Some),
            None => Ok(None),
        }
    }
}

fn status_of(frame: &Frame, code: Code) -> Status {
    Status::new(code, frame.meta.message.as_deref().unwrap_or_default())
}

#[derive(Debug)]
struct ChannelShared {
    addr: String,
    config: ChannelConfig,
    conn: RwLock<Option<Arc<ClientConn>>>,
    state: watch::Sender<ConnectivityState>,
}

#[derive(Debug)]
struct ChannelInner {
    shared: Arc<ChannelShared>,
    /// Stops the background connection manager when the last clone is dropped.
    _stop: DropGuard,
}

/// A client for one server address over one multiplexed connection. Cheap to clone; clones
/// share the connection.
#[derive(Clone, Debug)]
pub struct Channel {
    inner: Arc<ChannelInner>,
}

impl Channel {
    /// A channel to `addr` (`host:port`) with default settings. It starts connecting at once
    /// in the background; calls made meanwhile wait for that first attempt.
    pub fn new(addr: impl Into<String>) -> Channel {
        Channel::with_config(addr, ChannelConfig::default())
    }

    /// A channel with explicit settings. Must be called inside a tokio runtime.
    pub fn with_config(addr: impl Into<String>, config: ChannelConfig) -> Channel {
        let (state, _) = watch::channel(ConnectivityState::Connecting);
        let shared = Arc::new(ChannelShared {
            addr: addr.into(),
            config,
            conn: RwLock::new(None),
            state,
        });
        let stop = CancellationToken::new();
        tokio::spawn(manage(shared.clone(), stop.clone()));
        Channel {
            inner: Arc::new(ChannelInner {
                shared,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// Creates a channel and waits for its first connection (or the first failure).
    pub async fn connect(
        addr: impl Into<String>,
        config: ChannelConfig,
    ) -> Result<Channel, Status> {
        let channel = Channel::with_config(addr, config);
        channel.ready(None).await?;
        Ok(channel)
    }

    /// The address this channel talks to.
    pub fn addr(&self) -> &str {
        &self.inner.shared.addr
    }

    /// The connection's current state.
    pub fn state(&self) -> ConnectivityState {
        self.inner.shared.state.borrow().clone()
    }

    /// Waits until the state is no longer `Connecting`, or `timeout` passes.
    pub async fn wait_for_state_change(&self, timeout: Duration) -> ConnectivityState {
        let mut rx = self.inner.shared.state.subscribe();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
        rx.borrow().clone()
    }

    /// A connection to send a call on, waiting while a connection attempt is under way.
    async fn ready(&self, deadline: Option<Instant>) -> Result<Arc<ClientConn>, Status> {
        let shared = &self.inner.shared;
        // The common case, connected, without subscribing to state changes.
        if let Some(conn) = shared.conn.read().as_ref()
            && !conn.is_draining()
        {
            return Ok(conn.clone());
        }
        let mut rx = shared.state.subscribe();
        loop {
            if let Some(conn) = shared.conn.read().as_ref()
                && !conn.is_draining()
            {
                return Ok(conn.clone());
            }
            let state = rx.borrow_and_update().clone();
            if let ConnectivityState::TransientFailure(reason) = state {
                return Err(Status::unavailable(format!(
                    "not connected to {}: {reason}",
                    shared.addr
                )));
            }
            // Connecting (or a replacement for a draining connection is on its way).
            let wait_until =
                deadline.unwrap_or_else(|| Instant::now() + shared.config.connect_timeout * 2);
            match tokio::time::timeout_at(wait_until, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Status::unavailable("channel closed")),
                Err(_) if deadline.is_some() => {
                    return Err(Status::deadline_exceeded(format!(
                        "deadline passed while connecting to {}",
                        shared.addr
                    )));
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "still connecting to {}",
                        shared.addr
                    )));
                }
            }
        }
    }

    fn deadline(&self, options: &CallOptions) -> Option<Instant> {
        options
            .timeout
            .or(self.inner.shared.config.default_timeout)
            .map(|t| Instant::now() + t)
    }

    /// Registers the call in `slot`, queues its request frame with the body `write_body`
    /// encodes, and returns its request id. Nothing stays registered when it fails.
    fn send(
        &self,
        conn: &ClientConn,
        target: (&Text, &Text),
        options: &CallOptions,
        deadline: Option<Instant>,
        slot: Pending,
        write_body: impl FnOnce(&mut bytes::BytesMut) -> Result<(), Status>,
    ) -> Result<u64, Status> {
        let meta = Metadata {
            service: Some(target.0.clone()),
            method: Some(target.1.clone()),
            timeout: deadline.map(|d| d.saturating_duration_since(Instant::now())),
            codec: (options.codec != Codec::Protobuf).then_some(options.codec),
            entries: options.metadata.clone(),
            ..Metadata::default()
        };
        let id = conn.register(slot)?;
        let unsent = match conn
            .queue
            .push_with(FrameType::Request, id, &meta, false, write_body)
        {
            Ok(Ok(())) => return Ok(id),
            Ok(Err(Unsent::Frame(e))) => {
                Status::invalid_argument(format!("cannot send request: {e}"))
            }
            Ok(Err(Unsent::Body(status))) => status,
            Err(_closed) => conn.unavailable(),
        };
        conn.forget(id);
        Err(unsent)
    }

    /// A unary call whose request body `write_body` encodes.
    async fn unary_with(
        &self,
        target: (&Text, &Text),
        options: &CallOptions,
        write_body: impl FnOnce(&mut bytes::BytesMut) -> Result<(), Status>,
    ) -> Result<RawResponse, Status> {
        let deadline = self.deadline(options);
        let conn = self.ready(deadline).await?;
        // This task's waker goes into the table with the call, so the reply's first poll
        // (in this same poll of the task) need not take the table's lock again.
        let waker = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
        let id = self.send(
            &conn,
            target,
            options,
            deadline,
            Pending::Unary(Some(waker)),
            write_body,
        )?;
        let reply = Reply::new(&conn, id);
        let frame = match deadline {
            Some(d) => match tokio::time::timeout_at(d, reply).await {
                Ok(r) => r,
                // The reply cancels the call as it drops.
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no reply from {} within the deadline",
                        conn.peer
                    )));
                }
            },
            None => reply.await,
        }?;
        match frame.meta.status {
            None | Some(Code::Ok) => Ok(RawResponse {
                body: frame.body,
                codec: frame.meta.codec.unwrap_or_default(),
                metadata: frame.meta,
            }),
            Some(code) => Err(status_of(&frame, code)),
        }
    }
}

impl CallTransport for Channel {
    async fn unary_raw(&self, request: RawRequest) -> Result<RawResponse, Status> {
        let target = (&request.service, &request.method);
        self.unary_with(target, &request.options, |dst| {
            dst.extend_from_slice(&request.body);
            Ok(())
        })
        .await
    }

    async fn unary_message<Req: RpcMessage>(
        &self,
        service: &'static str,
        method: &'static str,
        request: &Req,
        options: CallOptions,
    ) -> Result<RawResponse, Status> {
        let target = (&Text::from_static(service), &Text::from_static(method));
        let codec = options.codec;
        self.unary_with(target, &options, |dst| codec.encode(request, dst))
            .await
    }

    async fn server_streaming_raw(&self, request: RawRequest) -> Result<RawStream, Status> {
        let deadline = self.deadline(&request.options);
        let conn = self.ready(deadline).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let slot = StreamSlot {
            tx,
            queued: queued.clone(),
        };
        let target = (&request.service, &request.method);
        let id = self.send(
            &conn,
            target,
            &request.options,
            deadline,
            Pending::Stream(slot),
            |dst| {
                dst.extend_from_slice(&request.body);
                Ok(())
            },
        )?;
        let guard = CancelOnDrop {
            conn: conn.clone(),
            id,
            armed: true,
        };
        Ok(RawStream {
            rx,
            queued,
            guard,
            deadline,
            done: false,
        })
    }
}

/// Keeps the channel connected: connect, watch, reconnect with backoff. Ends when the last
/// `Channel` clone is dropped.
async fn manage(shared: Arc<ChannelShared>, stop: CancellationToken) {
    let config = &shared.config;
    let mut attempt: u32 = 0;
    loop {
        // Only a first attempt (at start, or after a goaway) makes calls wait; retries after
        // a failure keep the channel in TransientFailure, so calls keep failing fast.
        if attempt == 0 {
            shared.state.send_replace(ConnectivityState::Connecting);
        }
        let connect = tokio::time::timeout(
            config.connect_timeout,
            TcpStream::connect(shared.addr.as_str()),
        );
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = connect => r,
        };
        let stream = match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                fail(&shared, format!("connect failed: {e}"), &stop, &mut attempt).await;
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            Err(_) => {
                fail(
                    &shared,
                    format!("connect timed out after {:?}", config.connect_timeout),
                    &stop,
                    &mut attempt,
                )
                .await;
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
        };
        attempt = 0;
        let conn = ClientConn::start(
            stream,
            shared.addr.clone(),
            config.max_frame_size,
            config.stream_buffer,
        );
        *shared.conn.write() = Some(conn.clone());
        shared.state.send_replace(ConnectivityState::Ready);
        tracing::debug!(addr = %shared.addr, "connected");

        // Keepalive runs for the connection's whole life, through a drain after a goaway too:
        // calls still running on a draining connection must learn if its peer dies.
        tokio::spawn(keepalive(
            conn.clone(),
            config.keepalive_interval,
            config.keepalive_timeout,
        ));
        tokio::select! {
            () = stop.cancelled() => {
                conn.close("channel dropped");
                *shared.conn.write() = None;
                return;
            }
            () = conn.draining.cancelled() => {}
        }
        *shared.conn.write() = None;
        if conn.closed.is_cancelled() {
            let reason = conn.unavailable().message().to_owned();
            tracing::debug!(addr = %shared.addr, reason, "connection lost");
            fail(&shared, reason, &stop, &mut attempt).await;
            if stop.is_cancelled() {
                return;
            }
        }
        // A goaway: the old connection finishes its calls on its own; connect a new one now.
    }
}

/// Records a failed attempt and sleeps the backoff delay.
async fn fail(shared: &ChannelShared, reason: String, stop: &CancellationToken, attempt: &mut u32) {
    shared
        .state
        .send_replace(ConnectivityState::TransientFailure(reason));
    let delay = shared.config.backoff.delay(*attempt);
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

/// Pings a quiet connection and closes it if the peer stops answering. Returns when the
/// connection is closed.
async fn keepalive(conn: Arc<ClientConn>, interval: Duration, timeout: Duration) {
    let mut ping_id: u64 = 0;
    loop {
        let quiet = conn.since_last_read();
        let wait = interval.saturating_sub(quiet);
        if !wait.is_zero() {
            tokio::select! {
                () = conn.closed.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        ping_id += 1;
        if conn
            .queue
            .push(FrameType::Ping, ping_id, &Metadata::default(), &[])
            .is_err()
        {
            return;
        }
        tokio::select! {
            () = conn.closed.cancelled() => return,
            () = tokio::time::sleep(timeout) => {}
        }
        if conn.since_last_read() >= interval + timeout {
            tracing::warn!(peer = %conn.peer, "no reply to keepalive ping; closing connection");
            conn.close(&format!("no reply to a keepalive ping within {timeout:?}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_documented_field_names() {
        let config: ChannelConfig = serde_json::from_str(
            r#"{"default_timeout_ms": 0, "keepalive_interval_ms": 250, "backoff": {"initial_ms": 5, "max_ms": 50}}"#,
        )
        .unwrap();
        assert_eq!(config.default_timeout, None);
        assert_eq!(config.keepalive_interval, Duration::from_millis(250));
        assert_eq!(config.backoff.initial, Duration::from_millis(5));
        assert_eq!(config.backoff.max, Duration::from_millis(50));
        assert_eq!(config.backoff.multiplier, 2.0);
    }
}
