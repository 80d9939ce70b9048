//! One binary-protocol connection on the server side.
//!
//! The connection task reads and dispatches; a writer task drains the [`WriteQueue`]; each
//! request runs in its own task so slow calls never hold up fast ones, and replies go out in
//! whatever order calls finish.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::limit::{Permit, Refusal};
use super::metrics::MethodStats;
use super::service::{Context, Handler, Reply};
use super::{Route, RouteError, Shared};
use crate::protocol::Codec;
use crate::protocol::{Frame, FrameError, FrameType, Metadata};
use crate::status::{Code, Status};
use crate::transport::{Unsent, WriteQueue};
use keel_net::Drain;

/// State shared by the connection task and its call tasks.
#[derive(Debug)]
struct ConnState {
    queue: WriteQueue,
    /// Running calls by request id, so a cancel can stop one.
    calls: Mutex<FxHashMap<u64, AbortHandle>>,
    /// Signalled when the last running call finishes (for draining).
    idle: Notify,
}

/// Removes a call from the connection's table when its task ends, however it ends (finished,
/// cancelled, aborted at shutdown), and records its outcome: a call whose task is dropped
/// before it finished counts as `cancelled`.
struct CallGuard {
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    id: u64,
    stats: Arc<MethodStats>,
    started: Instant,
    /// Set when the call finished; `None` means it was cut short.
    outcome: Option<Code>,
    /// The call's place under the server's concurrency limit, if one applies.
    permit: Option<Permit>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let code = self.outcome.unwrap_or(Code::Cancelled);
        self.stats.record(code, self.started.elapsed());
        if code == Code::Ok
            && let Some(permit) = &mut self.permit
        {
            permit.succeeded();
        }
        let empty = {
            let mut calls = self.conn.calls.lock();
            calls.remove(&self.id);
            calls.is_empty()
        };
        self.shared.stats.inflight.fetch_sub(1, Relaxed);
        if empty {
            self.conn.idle.notify_waiters();
        }
    }
}

fn status_meta(code: Code, message: &str, codec: Option<Codec>) -> Metadata {
    Metadata {
        status: (code != Code::Ok).then_some(code),
        message: (!message.is_empty()).then(|| message.into()),
        codec,
        ..Metadata::default()
    }
}

/// Sends a bodiless reply with a status.
fn reply_status(queue: &WriteQueue, kind: FrameType, id: u64, status: &Status) {
    let meta = status_meta(status.code(), status.message(), None);
    // A closed queue means the connection is going away; there is no one left to tell.
    let _ = queue.push(kind, id, &meta, &[]);
}

/// What the connection's reader carries from one frame to the next.
#[derive(Default)]
struct Dispatch<'s> {
    /// The last route taken, by its names' bytes: consecutive calls to one method (the common
    /// case) compare two short byte strings instead of hashing and looking up both names.
    route: Option<Route<'s>>,
    /// Calls finished inline since the last read, with their outcomes. Their latency is taken
    /// once when the read's frames are all dispatched (their replies leave together then):
    /// one clock reading per read instead of one per call.
    finished: Vec<(&'s MethodStats, Code)>,
}

pub(super) async fn serve_binary(
    shared: Arc<Shared>,
    stream: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    lifecycle: Drain,
) {
    let (mut reader, writer) = stream.into_split();
    let conn = Arc::new(ConnState {
        // The client enforces the same limit on what it reads.
        queue: WriteQueue::new(shared.config.max_frame_size),
        calls: Mutex::new(FxHashMap::default()),
        idle: Notify::new(),
    });
    let writer_task = {
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.queue.run_writer(writer).await {
                tracing::debug!(%peer, error = %e, "write failed; closing connection");
            }
        })
    };

    let config = &shared.config;
    let mut dispatch = Dispatch::default();
    let mut draining = lifecycle.is_draining();
    // Both made once: the loop below comes round once per read.
    let forced = lifecycle.forced();
    tokio::pin!(forced);
    let drain_begins = lifecycle.draining();
    tokio::pin!(drain_begins);
    let mut last_id = 0u64;
    let mut last_read = Instant::now();
    let idle_timer = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle_timer);

    'conn: loop {
        // Dispatch every complete frame already buffered.
        let mut dispatched = false;
        loop {
            match Frame::decode(&mut buf, config.max_frame_size) {
                Ok(Some(frame)) => {
                    dispatched = true;
                    if frame.kind == FrameType::Request {
                        last_id = last_id.max(frame.request_id);
                    }
                    let arrived = last_read;
                    let frame_result = on_frame(
                        &shared,
                        &conn,
                        frame,
                        peer,
                        draining,
                        arrived,
                        &mut dispatch,
                    );
                    if let Err(reason) = frame_result {
                        protocol_error(&shared, &conn, peer, last_id, &reason);
                        break 'conn;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    protocol_error(&shared, &conn, peer, last_id, &e.to_string());
                    break 'conn;
                }
            }
        }
        if dispatched {
            // The replies of handlers that finished inline are all queued: send them now.
            conn.queue.flush();
            if !dispatch.finished.is_empty() {
                let elapsed = last_read.elapsed();
                for (stats, code) in dispatch.finished.drain(..) {
                    stats.record(code, elapsed);
                }
            }
        }
        if conn.queue.is_closed() {
            break;
        }
        let idle = conn.idle.notified();
        tokio::pin!(idle);
        if draining {
            // Registered before the emptiness check, so a call finishing in between still
            // wakes us. Only while draining: it takes the Notify's lock.
            idle.as_mut().enable();
            if conn.calls.lock().is_empty() {
                break;
            }
        }
        // A peer that sends requests but does not read replies would grow the write queue
        // without bound; stop reading from it until the queue drains.
        let congested = conn.queue.is_congested();
        tokio::select! {
            biased;
            () = &mut forced => break,
            () = &mut drain_begins, if !draining => {
                draining = true;
                let meta = status_meta(Code::Unavailable, "server is shutting down", None);
                let _ = conn.queue.push(FrameType::GoAway, last_id, &meta, &[]);
            }
            () = idle, if draining => {}
            () = conn.queue.writable(), if congested => {}
            read = reader.read_buf(&mut buf), if !congested => match read {
                Ok(0) => break,
                Ok(_) => last_read = Instant::now(),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "read failed; closing connection");
                    break;
                }
            },
            () = &mut idle_timer => {
                let deadline = last_read + config.idle_timeout;
                if Instant::now() >= deadline && conn.calls.lock().is_empty() {
                    let meta = status_meta(Code::Unavailable, "idle timeout", None);
                    let _ = conn.queue.push(FrameType::GoAway, last_id, &meta, &[]);
                    break;
                }
                idle_timer.as_mut().reset(deadline.max(Instant::now()) + config.idle_timeout / 4);
            }
        }
    }

    // Whatever is still running has lost its caller (or its grace period): stop it.
    abort_calls(&conn);
    conn.queue.close();
    // Flush what is queued, but a peer that stopped reading must not hold the connection
    // (and shutdown) forever.
    let mut writer_task = writer_task;
    tokio::select! {
        _ = &mut writer_task => {}
        () = lifecycle.forced() => writer_task.abort(),
        () = tokio::time::sleep(config.handshake_timeout) => writer_task.abort(),
    }
}

/// Aborts every call running on the connection.
fn abort_calls(conn: &ConnState) {
    let running: Vec<AbortHandle> = conn.calls.lock().drain().map(|(_, h)| h).collect();
    for handle in running {
        handle.abort();
    }
}

/// Stops the connection's calls, then tells the peer why in a GoAway that is its last frame:
/// nothing a call still running produces can follow it. The caller then closes the connection.
fn protocol_error(shared: &Shared, conn: &ConnState, peer: SocketAddr, last_id: u64, reason: &str) {
    shared.stats.protocol_errors.fetch_add(1, Relaxed);
    tracing::warn!(%peer, reason, "protocol error; closing connection");
    abort_calls(conn);
    let meta = status_meta(
        Code::InvalidArgument,
        &format!("protocol error: {reason}"),
        None,
    );
    let _ = conn.queue.push_last(FrameType::GoAway, last_id, &meta, &[]);
}

/// Handles one frame. An `Err` is a protocol violation that ends the connection.
///
/// `arrived` is when the bytes holding the frame were read (one clock reading per read, shared
/// by the frames it brought): a call's latency counts from then.
fn on_frame<'s>(
    shared: &'s Arc<Shared>,
    conn: &Arc<ConnState>,
    frame: Frame,
    peer: SocketAddr,
    draining: bool,
    arrived: Instant,
    dispatch: &mut Dispatch<'s>,
) -> Result<(), String> {
    match frame.kind {
        FrameType::Request => {
            on_request(shared, conn, frame, peer, draining, arrived, dispatch);
            Ok(())
        }
        FrameType::Cancel => {
            if let Some(handle) = conn.calls.lock().remove(&frame.request_id) {
                handle.abort();
            }
            Ok(())
        }
        FrameType::Ping => {
            let _ = conn.queue.push(
                FrameType::Pong,
                frame.request_id,
                &Metadata::default(),
                &frame.body,
            );
            Ok(())
        }
        // The client will send nothing more; calls already running still get their replies.
        FrameType::Pong | FrameType::GoAway => Ok(()),
        FrameType::Response | FrameType::StreamItem | FrameType::StreamEnd => {
            Err(format!("{:?} frame sent to a server", frame.kind))
        }
    }
}

fn on_request<'s>(
    shared: &'s Arc<Shared>,
    conn: &Arc<ConnState>,
    frame: Frame,
    peer: SocketAddr,
    draining: bool,
    arrived: Instant,
    dispatch: &mut Dispatch<'s>,
) {
    let id = frame.request_id;
    let queue = &conn.queue;
    if draining {
        let status = Status::unavailable("server is shutting down");
        return reply_status(queue, FrameType::Response, id, &status);
    }
    let (Some(service), Some(method)) = (&frame.meta.service, &frame.meta.method) else {
        let status = Status::invalid_argument("request without service or method");
        return reply_status(queue, FrameType::Response, id, &status);
    };
    let (service_bytes, method_bytes) = (service.as_bytes(), method.as_bytes());
    let routed = match dispatch.route {
        Some(last) if last.service == service_bytes && last.method == method_bytes => {
            Ok(last.entry)
        }
        _ => shared.route_keys(service_bytes, method_bytes).map(|route| {
            dispatch.route = Some(route);
            route.entry
        }),
    };
    let entry = match routed {
        Ok(entry) => entry,
        Err(e) => {
            shared.stats.unknown_method_calls.fetch_add(1, Relaxed);
            let message = match e {
                RouteError::NoService => format!("unknown service {:?}", service.as_str()),
                RouteError::NoMethod => {
                    format!(
                        "unknown method {:?} of service {:?}",
                        method.as_str(),
                        service.as_str()
                    )
                }
            };
            return reply_status(queue, FrameType::Response, id, &Status::not_found(message));
        }
    };
    let now = arrived;
    if frame.meta.timeout.is_some_and(|t| t.is_zero()) {
        entry
            .stats
            .record(Code::DeadlineExceeded, std::time::Duration::ZERO);
        let status = Status::deadline_exceeded("deadline expired before the call started");
        return reply_status(queue, FrameType::Response, id, &status);
    }
    let deadline = frame.meta.timeout.and_then(|t| now.checked_add(t));
    let codec = frame.meta.codec.unwrap_or_default();

    {
        let calls = conn.calls.lock();
        if calls.len() >= shared.config.max_inflight_per_connection {
            drop(calls);
            entry
                .stats
                .record(Code::Overloaded, std::time::Duration::ZERO);
            let status = Status::overloaded(format!(
                "connection has {} calls in flight (the limit)",
                shared.config.max_inflight_per_connection
            ));
            return reply_status(queue, FrameType::Response, id, &status);
        }
        if calls.contains_key(&id) {
            drop(calls);
            let status = Status::invalid_argument(format!("request id {id} is already in flight"));
            return reply_status(queue, FrameType::Response, id, &status);
        }
    }
    let mut permit = match admit(shared, frame.meta.timeout) {
        Ok(permit) => permit,
        Err(status) => {
            entry.stats.record(status.code(), std::time::Duration::ZERO);
            return reply_status(queue, FrameType::Response, id, &status);
        }
    };
    let ctx = Context {
        deadline,
        metadata: frame.meta,
        peer: Some(peer),
        codec,
    };
    let work = match &entry.handler {
        Handler::Unary(handler) => {
            // Fast path: poll the handler once right here. Most handlers (an echo, a cache
            // hit) finish without waiting on anything; their reply joins the others from the
            // same read in one write, with no task spawned. A handler that has to wait is
            // moved to its own task below and continues from where it stopped.
            let mut call = handler(ctx, frame.body);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match std::panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(&mut cx))) {
                Ok(std::task::Poll::Ready(result)) => {
                    let code = finish_unary(queue, id, result);
                    dispatch.finished.push((&entry.stats, code));
                    if code == Code::Ok
                        && let Some(p) = &mut permit
                    {
                        p.succeeded();
                    }
                    return;
                }
                Err(panic) => {
                    let status = panicked(&*panic);
                    reply_status(queue, FrameType::Response, id, &status);
                    dispatch.finished.push((&entry.stats, Code::Internal));
                    return;
                }
                Ok(std::task::Poll::Pending) => Work::Unary(call),
            }
        }
        Handler::ServerStreaming(handler) => Work::Stream(handler(ctx, frame.body)),
    };
    shared.stats.inflight.fetch_add(1, Relaxed);
    let guard = CallGuard {
        conn: conn.clone(),
        shared: shared.clone(),
        id,
        stats: entry.stats.clone(),
        started: now,
        outcome: None,
        permit,
    };
    let mut calls = conn.calls.lock();
    // The table stays locked until the abort handle is in it, so a call that finishes at once
    // cannot remove its entry before the entry exists.
    let task = tokio::spawn(run_call(conn.clone(), work, deadline, codec, guard));
    calls.insert(id, task.abort_handle());
}

/// Admits a call under the server's concurrency limit: `Ok(None)` when no limit applies.
pub(super) fn admit(
    shared: &Shared,
    remaining: Option<std::time::Duration>,
) -> Result<Option<Permit>, Status> {
    if !shared.limiter.is_active() {
        return Ok(None);
    }
    match shared.limiter.try_acquire(remaining) {
        Ok(permit) => Ok(Some(permit)),
        Err(Refusal::Overloaded { limit }) => Err(Status::overloaded(format!(
            "server is at its concurrency limit ({limit} calls)"
        ))),
        Err(Refusal::DeadlineTooClose { no_load }) => Err(Status::deadline_exceeded(format!(
            "the call's deadline is nearer than the server's no-load latency ({no_load:?}); not started"
        ))),
    }
}

/// A call that could not finish inline.
enum Work {
    /// A unary handler's future, already polled once.
    Unary(BoxFuture<'static, Result<Reply, Status>>),
    /// A server-streaming handler's future, not yet polled.
    Stream(BoxFuture<'static, Result<BoxStream<'static, Result<Bytes, Status>>, Status>>),
}

/// Queues a unary call's reply, encoded straight into the write buffer, and returns the
/// call's outcome. A reply too large for one frame fails that call alone (`internal`) rather
/// than making the peer drop the whole connection.
fn finish_unary(queue: &WriteQueue, id: u64, result: Result<Reply, Status>) -> Code {
    let status = match result {
        Ok(reply) => {
            let meta = status_meta(Code::Ok, "", Some(reply.codec()));
            match queue.push_with(FrameType::Response, id, &meta, false, |dst| {
                reply.encode(dst)
            }) {
                Ok(Err(Unsent::Frame(e))) => reply_too_large(&e),
                Ok(Err(Unsent::Body(status))) => status,
                // Sent, or the connection is going away and there is no one left to tell.
                Ok(Ok(())) | Err(_) => return Code::Ok,
            }
        }
        Err(status) => status,
    };
    reply_status(queue, FrameType::Response, id, &status);
    status.code()
}

fn reply_too_large(e: &FrameError) -> Status {
    Status::internal(format!("reply exceeds the frame limit: {e}"))
}

/// Runs a unary handler's future to its end: under the call's deadline, with a panic turned
/// into `internal`. Shared by the binary and the HTTP paths.
pub(super) async fn run_unary(
    call: BoxFuture<'static, Result<Reply, Status>>,
    deadline: Option<Instant>,
) -> Result<Reply, Status> {
    match with_deadline(deadline, AssertUnwindSafe(call).catch_unwind()).await {
        Some(Ok(result)) => result,
        Some(Err(panic)) => Err(panicked(&*panic)),
        None => Err(Status::deadline_exceeded(
            "deadline exceeded while the call ran",
        )),
    }
}

/// Runs one call to completion and queues its reply (or replies, for a stream).
async fn run_call(
    conn: Arc<ConnState>,
    work: Work,
    deadline: Option<Instant>,
    codec: Codec,
    mut guard: CallGuard,
) {
    let id = guard.id;
    let outcome = match work {
        Work::Unary(call) => match finish_unary(&conn.queue, id, run_unary(call, deadline).await) {
            Code::Ok => Ok(()),
            code => Err(Status::new(code, "")),
        },
        Work::Stream(start) => {
            let run = async {
                let mut stream = AssertUnwindSafe(start)
                    .catch_unwind()
                    .await
                    .map_err(|p| panicked(&*p))??;
                let item_meta = status_meta(Code::Ok, "", Some(codec));
                while let Some(item) = AssertUnwindSafe(stream.next())
                    .catch_unwind()
                    .await
                    .map_err(|p| panicked(&*p))?
                {
                    let item = item?;
                    conn.queue.writable().await;
                    match conn
                        .queue
                        .push(FrameType::StreamItem, id, &item_meta, &item)
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(reply_too_large(&e)),
                        Err(_closed) => return Err(Status::cancelled("connection closed")),
                    }
                }
                Ok(())
            };
            let result = with_deadline(deadline, run).await.unwrap_or_else(|| {
                Err(Status::deadline_exceeded(
                    "deadline exceeded while the stream ran",
                ))
            });
            let status = match &result {
                Ok(()) => Status::new(Code::Ok, ""),
                Err(s) => s.clone(),
            };
            reply_status(&conn.queue, FrameType::StreamEnd, id, &status);
            result
        }
    };
    guard.outcome = Some(outcome.err().map_or(Code::Ok, |s| s.code()));
    drop(guard);
}

async fn with_deadline<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

pub(super) fn panicked(panic: &(dyn std::any::Any + Send)) -> Status {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    tracing::error!(panic = %what, "handler panicked");
    Status::internal(format!("handler panicked: {what}"))
}
