//! The one forwarder: a request's way to the servers of a pool, whichever leg carries it.
//! It waits for a slot in the pool's queue, picks a server with the pool's balancer, sends
//! the request over the leg, and on no answer tries another server while that is safe (a
//! replayable request, within the attempt count and the retry budget of
//! [`keel_governance::Attempts`]); every attempt is counted in the server's statistics
//! (in flight, latency, failures, ejection) and in the pool's. What is done with the answer
//! is the caller's. Also here: what a request leaves in the metrics and the access log.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use keel_governance::Attempts;
use keel_governance::endpoint::Outcome;
use tokio::time::Instant;

use crate::error::{ErrorKind, GatewayError};
use crate::headers::Lookup;
use crate::state::{Inner, Shared};
use crate::upstream::{Pool, QueueError, Server};

/// How a request reaches one server: Keel's HTTP/1.1 leg or hyper's client.
pub(crate) trait Leg {
    /// An answer whose head is in.
    type Answer;

    /// Sends the request to `server` (`now` is the attempt's start) and waits for the head
    /// of its answer. The forwarder bounds the wait.
    fn send(
        &mut self,
        server: &Arc<Server>,
        now: Instant,
    ) -> impl Future<Output = Result<Self::Answer, GatewayError>>;

    /// The answer's status.
    fn status(answer: &Self::Answer) -> StatusCode;

    /// When an attempt failed (`timed_out`, or with an error), the client's fault that
    /// caused it, if it was the client's (a request body cut short, too large, or too slow):
    /// answered to the client and not counted against the server.
    fn client_fault(&self, timed_out: bool) -> Option<GatewayError> {
        let _ = timed_out;
        None
    }
}

/// An answer a server gave.
pub(crate) struct Forwarded<A> {
    /// The answer, its head in.
    pub(crate) answer: A,
    /// The server that gave it.
    pub(crate) server: Arc<Server>,
    /// When its head was in.
    pub(crate) answered: Instant,
}

/// Sends a request to a server of `pool` over `leg`: the answer, or the error the client
/// gets. `replayable` says whether the request may be
/// sent again after an attempt that got no answer; `timeout` bounds each attempt's wait for
/// the answer's head.
pub(crate) async fn forward<L: Leg, H: Lookup + ?Sized>(
    pool: &Pool,
    peer: SocketAddr,
    headers: &H,
    replayable: bool,
    timeout: Duration,
    leg: &mut L,
    note: &mut Note,
) -> Result<Forwarded<L::Answer>, GatewayError> {
    // The slot is held until the answer's head is in.
    let _slot = match &pool.queue {
        None => None,
        Some(queue) => Some(queue.enter().await.map_err(|e| {
            let detail = match e {
                QueueError::Full(size) => format!(
                    "upstream {:?} is at capacity and {size} requests already wait",
                    pool.name
                ),
                QueueError::TimedOut(wait) => {
                    format!("upstream {:?} had no free slot within {wait:?}", pool.name)
                }
            };
            GatewayError::new(ErrorKind::UpstreamBusy, detail)
        })?),
    };
    let servers = pool.servers();
    let mut attempts: Attempts<'_, usize, GatewayError> =
        Attempts::new(&pool.budget, pool.max_attempts, None, &pool.retries);
    loop {
        // One reading of the clock serves the balancer, the attempt's start and its deadline
        // (and the raw leg's idle connections).
        let now = Instant::now();
        let Some(index) = pool.pick(&servers, peer.ip(), headers, attempts.tried(), now) else {
            break;
        };
        attempts.start().map_err(crate::upstream::not_retried)?;
        let server = &servers[index];
        let mut attempt = Attempt::start(pool, &servers, server, note, now);
        let sent = tokio::time::timeout_at(now + timeout, leg.send(server, now)).await;
        let fault = match &sent {
            Ok(Ok(_)) => None,
            Ok(Err(_)) => leg.client_fault(false),
            Err(_) => leg.client_fault(true),
        };
        if let Some(fault) = fault {
            // Not the server's doing: the attempt counts as abandoned, not failed.
            drop(attempt);
            return Err(fault);
        }
        let answer = sent.unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!("{} did not answer within {timeout:?}", server.address),
            ))
        });
        let (status, outcome) = crate::upstream::attempt_outcome(&answer, L::status);
        let answered = Instant::now();
        let elapsed = answered.duration_since(attempt.started);
        pool.responses.record(status, elapsed);
        attempt.elapsed = Some(elapsed);
        attempt.outcome = Some(outcome);
        drop(attempt);
        match answer {
            Ok(answer) => {
                return Ok(Forwarded {
                    answer,
                    server: server.clone(),
                    answered,
                });
            }
            Err(e) if e.retry_safe() && replayable => {
                tracing::debug!(upstream = %pool.name, error = %e, "no answer");
                attempts
                    .retry(index, e)
                    .map_err(crate::upstream::not_retried)?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(attempts
        .take_last_error()
        .unwrap_or_else(|| crate::upstream::no_healthy_server(pool)))
}

/// What the access log and the metrics learn while a request is served.
#[derive(Debug, Default)]
pub(crate) struct Note {
    pub(crate) route: Option<usize>,
    /// The server that answered (or was tried last).
    pub(crate) server: Option<Arc<Server>>,
    pub(crate) cache: Option<&'static str>,
}

/// What the access log says of a request.
pub(crate) struct Logged<'a> {
    pub(crate) at: SystemTime,
    pub(crate) method: &'a str,
    pub(crate) host: Option<&'a str>,
    /// The path and query the client sent.
    pub(crate) target: &'a str,
}

/// Counts a served request in its route's metrics (or as unrouted) and writes its access log
/// line (`logged` is `Some` when there is an access log).
pub(crate) fn account(
    inner: &Inner,
    shared: &Shared,
    mut note: Note,
    peer: SocketAddr,
    status: StatusCode,
    elapsed: Duration,
    logged: Option<Logged<'_>>,
) {
    match note.route {
        Some(i) => shared.router.routes()[i].metrics.record(status, elapsed),
        None => {
            inner
                .metrics
                .unrouted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if let (Some(access), Some(logged)) = (&shared.access, logged) {
        let server = note.server.take();
        access.write(&crate::access::Entry {
            ts_ms: logged
                .at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            client: peer.ip().to_string(),
            method: logged.method,
            host: logged.host,
            path: logged.target,
            status: status.as_u16(),
            duration_us: elapsed.as_micros() as u64,
            route: note.route.map(|i| shared.router.routes()[i].name.as_str()),
            upstream_server: server.as_ref().map(|s| s.address.as_str()),
            cache: note.cache,
        });
    }
}

/// The bookkeeping of one attempt on one server, done also when the request is dropped
/// midway (the client went away, or reset its HTTP/2 stream): otherwise the server's
/// in-flight count would leak, and a server being probed after an ejection would never be
/// picked again.
pub(crate) struct Attempt<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) servers: &'a [Arc<Server>],
    pub(crate) server: &'a Server,
    pub(crate) started: Instant,
    pub(crate) outcome: Option<Outcome>,
    /// How long it took, if measured already (else measured when it is dropped).
    pub(crate) elapsed: Option<Duration>,
}

impl<'a> Attempt<'a> {
    /// Starts an attempt on `server`: counted, noted as the request's server, and in the
    /// server's in-flight statistics until dropped.
    pub(crate) fn start(
        pool: &'a Pool,
        servers: &'a [Arc<Server>],
        server: &'a Arc<Server>,
        note: &mut Note,
        now: Instant,
    ) -> Attempt<'a> {
        note.server = Some(server.clone());
        server
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        server.stats.start();
        Attempt {
            pool,
            servers,
            server,
            started: now,
            outcome: None,
            elapsed: None,
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // Abandoned by the client: that says nothing about the server.
        let outcome = self.outcome.unwrap_or(Outcome::Success);
        if outcome == Outcome::Failure {
            self.server
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let may_eject = outcome == Outcome::Failure && self.pool.may_eject(self.servers);
        if self.server.stats.finish(
            outcome,
            self.elapsed.unwrap_or_else(|| self.started.elapsed()),
            &self.pool.outlier,
            may_eject,
        ) {
            tracing::warn!(upstream = %self.pool.name, server = %self.server.address, "server ejected after failures");
        }
    }
}
