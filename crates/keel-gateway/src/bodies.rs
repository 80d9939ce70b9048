//! Body wrappers on the proxy's two legs: a size limit on request bodies whose length is not
//! declared, and a timeout between the chunks of an upstream answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::proxy::BoxError;

/// A request body cut off (with an error) after `limit` bytes; `exceeded` says whether that
/// happened, so the gateway can answer 413 rather than 502.
pub(crate) struct Capped<B> {
    inner: B,
    left: u64,
    pub(crate) exceeded: Arc<AtomicBool>,
}

impl<B> Capped<B> {
    pub(crate) fn new(inner: B, limit: u64) -> Capped<B> {
        Capped {
            inner,
            left: limit,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<B> Body for Capped<B>
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
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("the request body is over the limit".into())));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
