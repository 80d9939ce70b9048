//! Body wrappers on the proxy's two legs: a client's request body, bounded and watched for the
//! client's faults, and a timeout between the chunks of an upstream answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The error type of bodies sent to clients.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body on its way to the client.
pub(crate) type DownBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What went wrong with a client's request body on its way upstream: the client's fault,
/// never the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// Over the size limit (a body without a declared length, counted as it streams).
    TooLarge,
    /// Cut short (the client closed mid-upload) or badly framed (a bad chunk line).
    Broken,
    /// Still not received whole when the answer's time was up.
    Incomplete,
}

const UNREAD: u8 = 0;
const STREAMING: u8 = 1;
const DONE: u8 = 2;
const TOO_LARGE: u8 = 3;
const BROKEN: u8 = 4;

/// How a [`ClientBody`] went, shared with the attempt that sends it.
#[derive(Debug, Default)]
pub(crate) struct BodyState(AtomicU8);

impl BodyState {
    /// The client's fault in a request that got no answer: a body over the limit or broken;
    /// or, when the answer's time ran out (`timed_out`), a body still arriving — its sending
    /// had begun and the client had not finished it, so the server was waiting for the rest.
    /// A body never read (the server unreachable) is no fault of the client's.
    pub(crate) fn fault(&self, timed_out: bool) -> Option<ClientFault> {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => Some(ClientFault::TooLarge),
            BROKEN => Some(ClientFault::Broken),
            STREAMING if timed_out => Some(ClientFault::Incomplete),
            _ => None,
        }
    }
}

/// A client's request body on its way upstream: cut off (with an error) after `limit` bytes,
/// and watched, so that a failed attempt can tell a client's fault (400, 408, 413 to that
/// client) from a server's (502, 504, counted against the server).
pub(crate) struct ClientBody<B> {
    inner: B,
    left: u64,
    pub(crate) state: Arc<BodyState>,
}

impl<B: Body> ClientBody<B> {
    pub(crate) fn new(inner: B, limit: u64) -> ClientBody<B> {
        let state = BodyState::default();
        if inner.is_end_stream() {
            state.0.store(DONE, Ordering::Release);
        }
        ClientBody {
            inner,
            left: limit,
            state: Arc::new(state),
        }
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let _ =
            this.state
                .0
                .compare_exchange(UNREAD, STREAMING, Ordering::AcqRel, Ordering::Relaxed);
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.state.0.store(TOO_LARGE, Ordering::Release);
                        return Poll::Ready(Some(Err("the request body is over the limit".into())));
                    }
                    this.left -= n;
                }
                if this.inner.is_end_stream() {
                    this.state.0.store(DONE, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.state.0.store(BROKEN, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                this.state.0.store(DONE, Ordering::Release);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream answer's body that fails if no chunk arrives for `idle` (the server stalled
/// mid-answer), so neither connection is held for ever.
pub(crate) struct Stalled<B> {
    inner: B,
    idle: Duration,
    /// Armed only while the body waits, so a body that is always ready costs no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Stalled<B> {
    pub(crate) fn new(inner: B, idle: Duration) -> Stalled<B> {
        Stalled {
            inner,
            idle,
            timer: None,
        }
    }
}

impl<B> Body for Stalled<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(format!(
                        "the upstream sent nothing for {idle:?} in the middle of its answer"
                    )
                    .into())));
                }
                Poll::Pending
            }
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
