//! One client connection: a table of pending calls keyed by request id, a reader task that
//! routes replies to them, and a writer task draining the shared [`WriteQueue`].
//!
//! A unary call's reply is delivered into its entry in the table, and the caller's task is
//! woken from there: no channel is allocated per call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Frame, FrameType, Metadata};
use crate::status::{Code, Status};
use crate::transport::WriteQueue;

/// Where the reply to a pending call goes.
#[derive(Debug)]
pub(crate) enum Pending {
    /// A unary call waiting for its reply; the waker of the task awaiting it, once polled.
    Unary(Option<Waker>),
    /// A unary call's reply (or the error that ended it), not yet taken by its caller.
    Done(Result<Frame, Status>),
    Stream(StreamSlot),
}

/// The receiving end of a server stream, as the reader sees it.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    pub(crate) tx: mpsc::UnboundedSender<Result<Frame, Status>>,
    /// Items delivered but not yet taken by the caller.
    pub(crate) queued: Arc<AtomicUsize>,
}

/// Slots of a connection's ring of pending calls (see [`PendingTable`]).
const RING: usize = 128;

/// A connection's pending calls, by request id.
///
/// Ids are handed out in order, so the calls in flight at one time have ids close together:
/// each id has a slot of its own in a ring (`id % RING`), found with no hashing. A call whose
/// slot is still held by an older one (still running after `RING` newer calls were started)
/// goes to an overflow map instead, and every lookup that misses the ring tries the map.
#[derive(Debug)]
struct PendingTable {
    ring: Box<[Option<(u64, Pending)>]>,
    overflow: FxHashMap<u64, Pending>,
}

impl PendingTable {
    fn new() -> PendingTable {
        PendingTable {
            ring: (0..RING).map(|_| None).collect(),
            overflow: FxHashMap::default(),
        }
    }

    fn slot(&mut self, id: u64) -> &mut Option<(u64, Pending)> {
        &mut self.ring[id as usize % RING]
    }

    fn insert(&mut self, id: u64, pending: Pending) {
        let slot = self.slot(id);
        if slot.is_none() {
            *slot = Some((id, pending));
        } else {
            self.overflow.insert(id, pending);
        }
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Pending> {
        let i = id as usize % RING;
        match &mut self.ring[i] {
            Some((held, pending)) if *held == id => Some(pending),
            _ => self.overflow.get_mut(&id),
        }
    }

    fn remove(&mut self, id: u64) -> Option<Pending> {
        let slot = self.slot(id);
        if matches!(slot, Some((held, _)) if *held == id) {
            slot.take().map(|(_, pending)| pending)
        } else {
            self.overflow.remove(&id)
        }
    }

    /// Keeps the calls for which `keep` returns true.
    fn retain(&mut self, mut keep: impl FnMut(&mut Pending) -> bool) {
        for slot in self.ring.iter_mut() {
            if let Some((_, pending)) = slot
                && !keep(pending)
            {
                *slot = None;
            }
        }
        self.overflow.retain(|_, pending| keep(pending));
    }
}

/// A live connection to one server.
#[derive(Debug)]
pub(crate) struct ClientConn {
    pub(crate) queue: WriteQueue,
    pending: Mutex<PendingTable>,
    next_id: AtomicU64,
    /// Microseconds since `epoch` at the last byte received.
    last_read_us: AtomicU64,
    epoch: Instant,
    /// Cancelled when the connection is closed for good.
    pub(crate) closed: CancellationToken,
    /// `closed` as a flag, only read and written under the `pending` lock.
    closed_flag: AtomicBool,
    /// Cancelled when no new calls should use this connection (goaway or closed).
    pub(crate) draining: CancellationToken,
    /// `draining` as a plain flag, for the per-call check (a token's check takes a lock).
    draining_flag: AtomicBool,
    close_reason: Mutex<Option<String>>,
    max_frame_size: u32,
    stream_buffer: usize,
    pub(crate) peer: String,
}

impl ClientConn {
    /// Starts the reader and writer tasks for a connected socket.
    pub(crate) fn start(
        stream: TcpStream,
        peer: String,
        max_frame_size: u32,
        stream_buffer: usize,
    ) -> Arc<ClientConn> {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let conn = Arc::new(ClientConn {
            queue: WriteQueue::new(max_frame_size),
            pending: Mutex::new(PendingTable::new()),
            next_id: AtomicU64::new(1),
            last_read_us: AtomicU64::new(0),
            epoch: Instant::now(),
            closed: CancellationToken::new(),
            closed_flag: AtomicBool::new(false),
            draining: CancellationToken::new(),
            draining_flag: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            max_frame_size,
            stream_buffer,
            peer,
        });
        let c = conn.clone();
        tokio::spawn(async move {
            let result = c.queue.run_writer(writer).await;
            let reason = match result {
                Ok(()) => "connection closed".to_owned(),
                Err(e) => format!("write failed: {e}"),
            };
            c.close(&reason);
        });
        let c = conn.clone();
        tokio::spawn(async move { c.run_reader(reader).await });
        // Speak first: the server identifies the protocol from the first bytes and closes a
        // connection that stays silent past its handshake timeout; the pong also proves the
        // peer is a live Keel server.
        let _ = conn
            .queue
            .push(FrameType::Ping, 0, &Metadata::default(), &[]);
        conn
    }

    /// Whether new calls should go elsewhere (goaway received, or closed).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining_flag.load(Ordering::Acquire)
    }

    fn start_draining(&self) {
        self.draining_flag.store(true, Ordering::Release);
        self.draining.cancel();
    }

    /// Time since the last byte arrived.
    pub(crate) fn since_last_read(&self) -> std::time::Duration {
        let last = std::time::Duration::from_micros(self.last_read_us.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Registers a call and returns its request id.
    pub(crate) fn register(&self, slot: Pending) -> Result<u64, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending.lock();
        // Checked under the lock that `close` takes, so a call never lands in a table that
        // has already been failed and would then wait forever.
        if self.closed_flag.load(Ordering::Relaxed) {
            return Err(self.unavailable());
        }
        pending.insert(id, slot);
        Ok(id)
    }

    /// Forgets a call; returns whether it was still waiting for its reply.
    pub(crate) fn forget(&self, id: u64) -> bool {
        !matches!(
            self.pending.lock().remove(id),
            None | Some(Pending::Done(_))
        )
    }

    /// Takes a unary call's reply if it has come, or leaves `cx`'s waker to be woken when it
    /// does.
    fn poll_reply(&self, id: u64, cx: &mut Context<'_>) -> Poll<Result<Frame, Status>> {
        let mut pending = self.pending.lock();
        match pending.get_mut(id) {
            Some(Pending::Unary(waker)) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Some(Pending::Done(_)) => match pending.remove(id) {
                Some(Pending::Done(result)) => Poll::Ready(result),
                _ => unreachable!("the entry was just seen done"),
            },
            // Not a unary call of this connection's: nothing will ever answer it.
            Some(Pending::Stream(_)) | None => {
                drop(pending);
                Poll::Ready(Err(self.unavailable()))
            }
        }
    }

    /// Forgets a call and tells the server to stop it.
    pub(crate) fn cancel(&self, id: u64) {
        if self.forget(id) {
            let _ = self
                .queue
                .push(FrameType::Cancel, id, &Metadata::default(), &[]);
        }
    }

    /// The error a call gets when this connection is gone.
    pub(crate) fn unavailable(&self) -> Status {
        let reason = self
            .close_reason
            .lock()
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Status::unavailable(format!("connection to {} lost: {reason}", self.peer))
    }

    /// Closes the connection and fails every pending call with `unavailable`.
    pub(crate) fn close(&self, reason: &str) {
        let mut wake = Vec::new();
        let mut streams = Vec::new();
        {
            let mut pending = self.pending.lock();
            if self.closed_flag.load(Ordering::Relaxed) {
                return;
            }
            self.closed_flag.store(true, Ordering::Relaxed);
            let status = {
                let mut why = self.close_reason.lock();
                let why = why.get_or_insert_with(|| reason.to_owned());
                Status::unavailable(format!("connection to {} lost: {why}", self.peer))
            };
            self.closed.cancel();
            // Unary callers take their error from the table; streams get it on their channel.
            pending.retain(|p| match p {
                Pending::Unary(waker) => {
                    wake.extend(waker.take());
                    *p = Pending::Done(Err(status.clone()));
                    true
                }
                Pending::Done(_) => true,
                Pending::Stream(slot) => {
                    streams.push(slot.tx.clone());
                    false
                }
            });
            for tx in streams.drain(..) {
                let _ = tx.send(Err(status.clone()));
            }
        }
        self.start_draining();
        self.queue.close();
        for waker in wake {
            waker.wake();
        }
    }

    async fn run_reader(self: Arc<Self>, mut reader: OwnedReadHalf) {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let reason = loop {
            loop {
                match Frame::decode(&mut buf, self.max_frame_size) {
                    Ok(Some(frame)) => self.on_frame(frame),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, error = %e, "bad frame from server");
                        self.close(&format!("protocol error from server: {e}"));
                        return;
                    }
                }
            }
            tokio::select! {
                () = self.closed.cancelled() => return,
                read = reader.read_buf(&mut buf) => match read {
                    Ok(0) => break "server closed the connection".to_owned(),
                    Ok(_) => {
                        let now = self.epoch.elapsed().as_micros() as u64;
                        self.last_read_us.store(now, Ordering::Relaxed);
                    }
                    Err(e) => break format!("read failed: {e}"),
                },
            }
        };
        self.close(&reason);
    }

    fn on_frame(&self, frame: Frame) {
        match frame.kind {
            FrameType::Response | FrameType::StreamEnd => {
                let mut pending = self.pending.lock();
                match pending.get_mut(frame.request_id) {
                    Some(entry @ Pending::Unary(_)) => {
                        let Pending::Unary(waker) =
                            std::mem::replace(entry, Pending::Done(Ok(frame)))
                        else {
                            unreachable!("the entry was just matched as waiting")
                        };
                        drop(pending);
                        if let Some(waker) = waker {
                            waker.wake();
                        }
                    }
                    Some(Pending::Stream(_)) => {
                        if let Some(Pending::Stream(slot)) = pending.remove(frame.request_id) {
                            drop(pending);
                            let _ = slot.tx.send(Ok(frame));
                        }
                    }
                    // A reply to a call the caller has given up on, or a second final frame
                    // (a server bug) for a reply not yet taken: the first one stands.
                    Some(Pending::Done(_)) | None => {}
                }
            }
            FrameType::StreamItem => {
                let mut pending = self.pending.lock();
                let Some(Pending::Stream(slot)) = pending.get_mut(frame.request_id) else {
                    return;
                };
                if slot.queued.fetch_add(1, Ordering::AcqRel) >= self.stream_buffer {
                    // The caller is not keeping up. Rather than buffer without bound or stall
                    // every other call on this connection, end this stream with an error.
                    if let Some(Pending::Stream(slot)) = pending.remove(frame.request_id) {
                        let status = Status::new(
                            Code::Overloaded,
                            format!(
                                "stream fell {} messages behind; the client buffer is full",
                                self.stream_buffer
                            ),
                        );
                        let _ = slot.tx.send(Err(status));
                    }
                    drop(pending);
                    let _ = self.queue.push(
                        FrameType::Cancel,
                        frame.request_id,
                        &Metadata::default(),
                        &[],
                    );
                    return;
                }
                let _ = slot.tx.send(Ok(frame));
            }
            FrameType::Ping => {
                let _ = self.queue.push(
                    FrameType::Pong,
                    frame.request_id,
                    &Metadata::default(),
                    &frame.body,
                );
            }
            FrameType::Pong => {}
            FrameType::GoAway => {
                let reason = frame
                    .meta
                    .message
                    .as_deref()
                    .unwrap_or("server sent goaway")
                    .to_owned();
                // Calls already sent still get their replies; new calls go elsewhere. Should
                // the connection then fail, its calls learn the real reason, not this one.
                tracing::debug!(peer = %self.peer, reason, "goaway received");
                self.start_draining();
            }
            FrameType::Request | FrameType::Cancel => {
                tracing::warn!(peer = %self.peer, kind = ?frame.kind, "server sent a client-only frame");
                self.close("protocol error: server sent a client-only frame");
            }
        }
    }
}

/// The reply to a unary call: resolves when it arrives, or with `unavailable` when the
/// connection closes first. Dropping it before then forgets the call and cancels it on the
/// server.
#[derive(Debug)]
pub(crate) struct Reply<'a> {
    conn: &'a ClientConn,
    id: u64,
    finished: bool,
    /// Not polled yet. The call was registered with the waker of the task that polls this
    /// first, in the same poll: the first poll returns `Pending` without looking (the reply,
    /// whenever it comes, wakes that task), which saves a lock and a lookup per call.
    first_poll: bool,
}

impl<'a> Reply<'a> {
    /// The reply to the call `id`, registered on `conn` as `Pending::Unary` holding the waker
    /// of the task that is polling now, which polls this reply before it next yields.
    pub(crate) fn new(conn: &'a ClientConn, id: u64) -> Reply<'a> {
        Reply {
            conn,
            id,
            finished: false,
            first_poll: true,
        }
    }
}

impl Future for Reply<'_> {
    type Output = Result<Frame, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if std::mem::take(&mut self.first_poll) {
            return Poll::Pending;
        }
        let polled = self.conn.poll_reply(self.id, cx);
        if polled.is_ready() {
            self.finished = true;
        }
        polled
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.cancel(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> Pending {
        Pending::Unary(None)
    }

    /// Ids that share a ring slot (a long call among many short ones) all stay reachable.
    #[test]
    fn the_pending_table_finds_calls_in_the_ring_and_in_the_overflow() {
        let mut table = PendingTable::new();
        let long = 1u64;
        table.insert(long, waiting());
        // Three laps of the ring while the first call is still running.
        let ids: Vec<u64> = (2..=(3 * RING as u64 + 1)).collect();
        for &id in &ids {
            table.insert(id, waiting());
        }
        assert!(!table.overflow.is_empty());
        for &id in ids.iter().chain([long].iter()) {
            assert!(
                matches!(table.get_mut(id), Some(Pending::Unary(None))),
                "id {id}"
            );
        }
        // Answer every other call, then the rest, in reverse.
        for &id in ids.iter().step_by(2) {
            let pending = table.get_mut(id).expect("registered");
            *pending = Pending::Done(Err(Status::cancelled("x")));
            assert!(
                matches!(table.remove(id), Some(Pending::Done(_))),
                "id {id}"
            );
            assert!(table.get_mut(id).is_none());
        }
        for &id in ids.iter().skip(1).step_by(2).rev() {
            assert!(table.remove(id).is_some(), "id {id}");
        }
        assert!(table.remove(ids[0]).is_none(), "removed twice");
        // A new call may reuse a freed slot; the long call is still found.
        table.insert(long + RING as u64 * 10, waiting());
        assert!(table.get_mut(long).is_some());
        let mut kept = 0;
        table.retain(|_| {
            kept += 1;
            false
        });
        assert_eq!(kept, 2);
        assert!(table.get_mut(long).is_none());
        assert!(table.overflow.is_empty());
        assert!(table.ring.iter().all(Option::is_none));
    }
}
