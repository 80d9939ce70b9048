//! The open client connections, watched by one janitor task instead of a timer per
//! connection: it closes connections that have been idle (no bytes either way, no request in
//! flight) for `idle_timeout`, and all of them, gracefully, when the gateway stops.
//!
//! A connection's task checks its `close` flag each time it is woken; the janitor sets the flag
//! and wakes it. Per request this costs two atomic increments (bytes moved, requests in
//! flight) and nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::Instant;

/// What the janitor knows of one connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Reads and writes that moved bytes.
    pub(crate) activity: AtomicU64,
    /// Requests being answered.
    pub(crate) inflight: AtomicUsize,
    /// Whether a first request has arrived (until then the connection is on a deadline).
    pub(crate) started: AtomicBool,
    /// Requests handed to the service so far, and the index of one that carried both
    /// `Content-Length` and `Transfer-Encoding` (`u64::MAX` if none): see `framing`.
    pub(crate) requests: AtomicU64,
    pub(crate) ambiguous: AtomicU64,
    /// Set by the janitor: wind down.
    pub(crate) close: AtomicBool,
    /// The connection task, to wake when `close` is set.
    pub(crate) waker: AtomicWaker,
    /// The janitor's bookkeeping: `activity` at its last look, and since when it is unchanged.
    seen: AtomicU64,
    quiet_since_ms: AtomicU64,
}

/// A request in flight on a connection, for as long as it lives.
pub(crate) struct Busy<'a>(&'a ConnState);

impl<'a> Busy<'a> {
    pub(crate) fn new(state: &'a ConnState) -> Busy<'a> {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        state.started.store(true, Ordering::Relaxed);
        Busy(state)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for ConnState {
    fn default() -> ConnState {
        ConnState {
            activity: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            ambiguous: AtomicU64::new(u64::MAX),
            close: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            seen: AtomicU64::new(0),
            quiet_since_ms: AtomicU64::new(0),
        }
    }
}

impl ConnState {
    fn close(&self) {
        self.close.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The connections of one `serve` call.
#[derive(Debug)]
pub(crate) struct Conns {
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    next: AtomicU64,
    stopping: AtomicBool,
    base: Instant,
}

impl Default for Conns {
    fn default() -> Conns {
        Conns {
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            base: Instant::now(),
        }
    }
}

/// Removes a connection from the watch when its task ends.
pub(crate) struct Registered<'a> {
    conns: &'a Conns,
    id: u64,
    pub(crate) state: Arc<ConnState>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.conns.open.lock().remove(&self.id);
    }
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Watches a new connection.
    pub(crate) fn add(&self) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        state.quiet_since_ms.store(self.now_ms(), Ordering::Relaxed);
        if self.stopping.load(Ordering::Acquire) {
            state.close.store(true, Ordering::Release);
        }
        self.open.lock().insert(id, state.clone());
        Registered {
            conns: self,
            id,
            state,
        }
    }

    /// Asks every connection to finish its requests and close.
    pub(crate) fn stop_all(&self) {
        self.stopping.store(true, Ordering::Release);
        for state in self.open.lock().values() {
            state.close();
        }
    }

    /// Closes the connections idle for `idle` or longer.
    pub(crate) fn sweep(&self, idle: Duration) {
        let now = self.now_ms();
        let idle_ms = idle.as_millis() as u64;
        for state in self.open.lock().values() {
            let activity = state.activity.load(Ordering::Relaxed);
            if activity != state.seen.load(Ordering::Relaxed)
                || state.inflight.load(Ordering::Relaxed) > 0
            {
                state.seen.store(activity, Ordering::Relaxed);
                state.quiet_since_ms.store(now, Ordering::Relaxed);
            } else if now.saturating_sub(state.quiet_since_ms.load(Ordering::Relaxed)) >= idle_ms {
                state.close();
            }
        }
    }
}
