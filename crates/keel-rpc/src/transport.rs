//! Connection plumbing shared by client and server: a write queue that batches frames from
//! many tasks into few syscalls, and the reader's buffer management.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::protocol::frame::{FrameError, encode_with};
use crate::protocol::{FrameType, Metadata};

/// Above this many queued bytes, producers that can wait (streams) do.
const HIGH_WATER: usize = 4 << 20;

/// Frames waiting to be written to one connection.
///
/// Any task encodes its frame straight into the shared buffer under a short lock; one writer
/// task swaps the buffer out and writes it with a single `write_all`. Under load many frames
/// leave in one syscall; when idle a frame leaves at once. Steady state allocates nothing: the
/// writer hands its drained buffer back as the next one.
#[derive(Debug)]
pub(crate) struct WriteQueue {
    buf: Mutex<BytesMut>,
    /// Largest frame the peer accepts.
    max_frame_size: u32,
    /// Wakes the writer; `notify_one` keeps a permit, so no wake-up is lost.
    ready: Notify,
    /// Wakes producers waiting for the queue to drain below the high-water mark.
    drained: Notify,
    closed: AtomicBool,
    /// Set by [`WriteQueue::flush`]: the batch is complete, write without waiting for more.
    urgent: AtomicBool,
}

/// Why [`WriteQueue::push_with`] queued nothing.
#[derive(Debug)]
pub(crate) enum Unsent<E> {
    /// The frame would be over the size limit (or its metadata is).
    Frame(FrameError),
    /// The body could not be encoded.
    Body(E),
}

/// The connection's writer has stopped; nothing more can be sent on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Closed;

impl WriteQueue {
    /// A queue that refuses frames larger than `max_frame_size`, the limit its peer enforces.
    pub(crate) fn new(max_frame_size: u32) -> WriteQueue {
        WriteQueue {
            buf: Mutex::new(BytesMut::with_capacity(16 * 1024)),
            max_frame_size,
            ready: Notify::new(),
            drained: Notify::new(),
            closed: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
        }
    }

    /// Tells the writer that a batch is complete (a reader has dispatched everything it read),
    /// so it writes at once instead of first letting other ready tasks add frames.
    ///
    /// This keeps connections from moving in lockstep: without it, every connection's replies
    /// wait for the end of the scheduler pass that read every connection's requests, and the
    /// peer sits idle meanwhile. With it, the first connection's replies are on the wire while
    /// the next connection's requests are being handled.
    pub(crate) fn flush(&self) {
        self.urgent.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Appends a frame. A frame over the size limit is refused with
    /// [`FrameError::TooLarge`] and nothing is queued, so the caller can fail that one call
    /// instead of the peer closing the whole connection.
    pub(crate) fn push(
        &self,
        kind: FrameType,
        request_id: u64,
        meta: &Metadata,
        body: &[u8],
    ) -> Result<Result<(), FrameError>, Closed> {
        self.push_then(kind, request_id, meta, body, false)
    }

    /// Appends a frame and closes the queue in one step: no frame can follow it (a GoAway
    /// after a protocol error is the connection's last frame). The writer still sends it.
    pub(crate) fn push_last(
        &self,
        kind: FrameType,
        request_id: u64,
        meta: &Metadata,
        body: &[u8],
    ) -> Result<Result<(), FrameError>, Closed> {
        let pushed = self.push_then(kind, request_id, meta, body, true);
        self.ready.notify_one();
        pushed
    }

    fn push_then(
        &self,
        kind: FrameType,
        request_id: u64,
        meta: &Metadata,
        body: &[u8],
        close: bool,
    ) -> Result<Result<(), FrameError>, Closed> {
        let pushed = self.push_with(kind, request_id, meta, close, |dst| {
            dst.extend_from_slice(body);
            Ok::<(), std::convert::Infallible>(())
        })?;
        Ok(pushed.map_err(|unsent| match unsent {
            Unsent::Frame(e) => e,
            Unsent::Body(never) => match never {},
        }))
    }

    /// Appends a frame whose body `write_body` encodes straight into the queue, so a message
    /// is encoded once, into the bytes that go on the wire. When `write_body` fails, or the
    /// frame is over the size limit, nothing is queued.
    pub(crate) fn push_with<E>(
        &self,
        kind: FrameType,
        request_id: u64,
        meta: &Metadata,
        close: bool,
        write_body: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<Result<(), Unsent<E>>, Closed> {
        let was_empty;
        let mut body_error = None;
        let result;
        {
            let mut buf = self.buf.lock();
            // Checked under the lock, so nothing is queued after a `push_last`.
            if self.closed.load(Ordering::Acquire) {
                return Err(Closed);
            }
            was_empty = buf.is_empty();
            let start = buf.len();
            let framed = encode_with(
                &mut buf,
                kind,
                0,
                request_id,
                meta,
                self.max_frame_size,
                |dst| {
                    if let Err(e) = write_body(dst) {
                        body_error = Some(e);
                    }
                },
            );
            result = match body_error {
                Some(e) => {
                    buf.truncate(start);
                    Err(Unsent::Body(e))
                }
                None => framed.map_err(Unsent::Frame),
            };
            if close {
                self.closed.store(true, Ordering::Release);
            }
        }
        if was_empty {
            self.ready.notify_one();
        }
        Ok(result)
    }

    /// Waits until the queue is below its high-water mark (or closed).
    pub(crate) async fn writable(&self) {
        loop {
            let notified = self.drained.notified();
            if self.buf.lock().len() < HIGH_WATER || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the queue is over its high-water mark: the peer is not reading fast enough.
    pub(crate) fn is_congested(&self) -> bool {
        self.buf.lock().len() >= HIGH_WATER
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the queue closed and wakes the writer so it can finish.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// The writer loop: runs until the queue is closed and flushed, or the socket fails.
    pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(&self, mut io: W) -> std::io::Result<()> {
        let mut spare = BytesMut::with_capacity(16 * 1024);
        // On a current-thread runtime a woken task joins the back of one FIFO run queue, so
        // the writer already runs after every task that was ready when it was woken. A
        // multi-thread runtime runs a task woken by the running one next (its LIFO slot), so
        // there the writer must step aside once to let the rest of the batch in.
        let step_aside = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread);
        let result = loop {
            {
                let mut buf = self.buf.lock();
                if buf.is_empty() {
                    if self.is_closed() {
                        break Ok(());
                    }
                } else {
                    std::mem::swap(&mut *buf, &mut spare);
                }
            }
            if spare.is_empty() {
                self.ready.notified().await;
                // Unless the batch is known to be complete, let the tasks that are ready to run
                // now (replies finishing, callers sending) add their frames first, so one
                // syscall carries them all. Under load this turns one write per frame into one
                // write per scheduler pass.
                if !self.urgent.swap(false, Ordering::AcqRel) && step_aside {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if let Err(e) = io.write_all(&spare).await {
                break Err(e);
            }
            spare.clear();
            // Keep a bounded buffer around: a burst of large frames should not pin memory.
            if spare.capacity() > 1 << 20 {
                spare = BytesMut::with_capacity(16 * 1024);
            }
            self.drained.notify_waiters();
        };
        self.closed.store(true, Ordering::Release);
        self.drained.notify_waiters();
        let _ = io.shutdown().await;
        result
    }
}
