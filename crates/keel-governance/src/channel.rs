//! [`ServiceChannel`]: a Keel RPC transport to a service by name. It follows the service's
//! instances through a [`Discover`], keeps a `Channel` per instance, and for every call picks
//! an instance with the configured balancer, retries safe failures on a different instance
//! under the retry budget, optionally hedges slow calls, and ejects instances that keep
//! failing. Generated clients take it wherever they take a `Channel`.
//!
//! Policies, in the order a call meets them:
//! 1. zone preference: instances in the caller's zone, if any of them can take the call;
//! 2. availability: instances whose connection is up and that are not ejected (instances still
//!    connecting are used only when nothing is up);
//! 3. the balancer picks one;
//! 4. on `unavailable` or `overloaded` (the call did not run, or the instance refused it), the
//!    call is retried on another instance, at most `max_attempts` in all, while the budget
//!    allows and the deadline has not passed;
//! 5. with `hedge_after`, a call still unanswered after that delay is also sent to a second
//!    instance (budget permitting); the first success wins and the other is cancelled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_rpc::client::{CallTransport, ConnectivityState, RawRequest, RawResponse, RawStream};
use keel_rpc::{Channel, ChannelConfig, Code, Status};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::attempts::{Attempts, GiveUp, RetryStats};
use crate::balance::{Balancer, BalancerKind, EndpointView};
use crate::budget::{RetryBudget, RetryConfig};
use crate::discover::{Discover, DiscoverError, Endpoints, Instance};
use crate::endpoint::{EndpointStats, Outcome, OutlierConfig};

/// Settings of a [`ServiceChannel`].
#[derive(Debug, Clone)]
pub struct ServiceChannelConfig {
    /// The balancer (p2c by default).
    pub balancer: BalancerKind,
    /// The caller's zone; instances there are preferred while any of them can take calls.
    pub zone: Option<String>,
    /// Retries and their budget.
    pub retry: RetryConfig,
    /// Send a backup request when a call has had no reply for this long.
    pub hedge_after: Option<Duration>,
    /// Outlier ejection.
    pub outlier: OutlierConfig,
    /// Settings of each instance's channel.
    pub channel: ChannelConfig,
    /// How long a call waits for the first instance list.
    pub resolve_timeout: Duration,
}

impl Default for ServiceChannelConfig {
    fn default() -> ServiceChannelConfig {
        ServiceChannelConfig {
            balancer: BalancerKind::P2c,
            zone: None,
            retry: RetryConfig::default(),
            hedge_after: None,
            outlier: OutlierConfig::default(),
            channel: ChannelConfig::default(),
            resolve_timeout: Duration::from_secs(5),
        }
    }
}

/// One instance as a service channel holds it.
#[derive(Debug)]
pub struct Endpoint {
    /// The instance.
    pub instance: Instance,
    /// Its connection.
    pub channel: Channel,
    /// Its statistics.
    pub stats: EndpointStats,
}

#[derive(Debug)]
struct Inner {
    service: String,
    config: ServiceChannelConfig,
    balancer: Box<dyn Balancer>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// The list `endpoints` was built from; its lock serialises rebuilds.
    applied: Mutex<Option<Arc<Endpoints>>>,
    /// Whether `endpoints` were built from a resolved list yet.
    applied_resolved: AtomicBool,
    budget: RetryBudget,
    resolved: watch::Receiver<Arc<Endpoints>>,
    stats: ServiceChannelStats,
    _stop: DropGuard,
}

/// Counters of a service channel.
#[derive(Debug, Default)]
pub struct ServiceChannelStats {
    /// Calls made.
    pub calls: std::sync::atomic::AtomicU64,
    /// Retries sent, and retries and backup requests the budget refused.
    pub retry: RetryStats,
    /// Backup (hedged) requests sent.
    pub hedges: std::sync::atomic::AtomicU64,
    /// Ejections.
    pub ejections: std::sync::atomic::AtomicU64,
}

/// A transport to a service by name. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServiceChannel {
    inner: Arc<Inner>,
}

fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Overloaded)
}

/// Whether a failure counts against the instance (for ejection).
fn instance_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

impl ServiceChannel {
    /// A channel to `service`, whose instances `discover` provides.
    pub fn new<D: Discover + ?Sized>(
        discover: &D,
        service: &str,
        config: ServiceChannelConfig,
    ) -> Result<ServiceChannel, DiscoverError> {
        let balancer = config.balancer.build();
        let rx = discover.subscribe(service)?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            service: service.to_owned(),
            budget: RetryBudget::new(config.retry.budget_ratio, config.retry.min_retries_per_sec),
            config,
            balancer,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            applied: Mutex::new(None),
            applied_resolved: AtomicBool::new(false),
            resolved: rx.clone(),
            stats: ServiceChannelStats::default(),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&inner);
        // Build the first set now, so calls made at once see it.
        let first = rx.borrow().clone();
        rebuild(&inner, &first);
        tokio::spawn(follow(weak, rx, stop));
        Ok(ServiceChannel { inner })
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// Counters.
    pub fn stats(&self) -> &ServiceChannelStats {
        &self.inner.stats
    }

    /// The endpoints held now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.inner.endpoints.read().clone()
    }

    async fn wait_resolved(&self, deadline: Option<Instant>) -> Result<(), Status> {
        let mut rx = self.inner.resolved.clone();
        let until = deadline
            .unwrap_or_else(|| Instant::now() + self.inner.config.resolve_timeout)
            .min(Instant::now() + self.inner.config.resolve_timeout);
        match tokio::time::timeout_at(until, rx.wait_for(|e| e.resolved)).await {
            Ok(Ok(list)) => {
                // The background task may not have applied the first list yet; do it now,
                // so a call made right after it arrives sees its instances.
                if !self.inner.applied_resolved.load(Ordering::Acquire) {
                    let list = list.clone();
                    rebuild(&self.inner, &list);
                }
                Ok(())
            }
            _ => Err(Status::unavailable(format!(
                "no instance list for service {:?} yet",
                self.inner.service
            ))),
        }
    }

    /// Picks an endpoint for a call, not one of `exclude` (by instance id).
    fn pick(&self, key: Option<u64>, exclude: &[String]) -> Option<Arc<Endpoint>> {
        let endpoints = self.inner.endpoints.read().clone();
        let now = Instant::now();
        let candidates: Vec<&Arc<Endpoint>> = endpoints
            .iter()
            .filter(|e| !exclude.contains(&e.instance.id))
            .collect();
        let usable = |e: &Endpoint, allow_connecting: bool| {
            let state_ok = match e.channel.state() {
                ConnectivityState::Ready => true,
                ConnectivityState::Connecting => allow_connecting,
                ConnectivityState::TransientFailure(_) => false,
            };
            state_ok && e.stats.selectable(now)
        };
        for allow_connecting in [false, true] {
            let mut pool: Vec<&Arc<Endpoint>> = candidates.clone();
            if let Some(zone) = &self.inner.config.zone {
                let local: Vec<&Arc<Endpoint>> = pool
                    .iter()
                    .copied()
                    .filter(|e| &e.instance.zone == zone && usable(e, allow_connecting))
                    .collect();
                if !local.is_empty() {
                    pool = local;
                }
            }
            let views: Vec<EndpointView<'_>> = pool
                .iter()
                .map(|e| EndpointView {
                    id: &e.instance.id,
                    weight: e.instance.weight,
                    available: usable(e, allow_connecting),
                    inflight: e.stats.inflight(),
                    latency_us: e.stats.latency_us(),
                })
                .collect();
            if let Some(i) = self.inner.balancer.pick(&views, key) {
                return Some(pool[i].clone());
            }
        }
        None
    }

    /// One attempt on one endpoint, with its bookkeeping.
    async fn attempt(
        &self,
        endpoint: &Arc<Endpoint>,
        request: RawRequest,
    ) -> Result<RawResponse, Status> {
        endpoint.stats.start();
        let mut guard = Attempt {
            channel: self,
            endpoint,
            started: Instant::now(),
            outcome: None,
        };
        let result = endpoint.channel.unary_raw(request).await;
        guard.outcome = Some(match &result {
            Err(e) if instance_failure(e.code()) => Outcome::Failure,
            _ => Outcome::Success,
        });
        result
    }

    /// May one more endpoint of this service be ejected now?
    fn may_eject(&self) -> bool {
        let endpoints = self.inner.endpoints.read();
        let total = endpoints.len().max(1);
        let ejected = endpoints.iter().filter(|e| e.stats.is_ejected()).count();
        ((ejected + 1) as f64 / total as f64) <= self.inner.config.outlier.max_ejected_share
    }

    async fn attempt_hedged(
        &self,
        first: Arc<Endpoint>,
        request: &RawRequest,
        after: Duration,
        key: Option<u64>,
        attempts: &Attempts<'_, String, Status>,
    ) -> (Result<RawResponse, Status>, Arc<Endpoint>) {
        let primary = self.attempt(&first, request.clone());
        tokio::pin!(primary);
        tokio::select! {
            r = &mut primary => return (r, first.clone()),
            () = tokio::time::sleep(after) => {}
        }
        let backup_endpoint = if attempts.hedge() {
            let mut exclude = attempts.tried().to_vec();
            exclude.push(first.instance.id.clone());
            self.pick(key, &exclude)
        } else {
            None
        };
        let Some(second) = backup_endpoint else {
            return (primary.await, first.clone());
        };
        self.inner
            .stats
            .hedges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let backup = self.attempt(&second, request.clone());
        tokio::pin!(backup);
        // The first success wins; a failure waits for the other.
        tokio::select! {
            r = &mut primary => match r {
                Ok(ok) => (Ok(ok), first.clone()),
                Err(_) => (backup.await, second.clone()),
            },
            r = &mut backup => match r {
                Ok(ok) => (Ok(ok), second.clone()),
                Err(_) => (primary.await, first.clone()),
            },
        }
    }
}

/// Finishes an attempt's bookkeeping, also when the call is dropped midway.
struct Attempt<'a> {
    channel: &'a ServiceChannel,
    endpoint: &'a Arc<Endpoint>,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // A call dropped before it finished (lost a hedge race, or its caller gave up) says
        // nothing about the endpoint: count it as answered.
        let outcome = self.outcome.unwrap_or(Outcome::Success);
        let may_eject = outcome == Outcome::Failure && self.channel.may_eject();
        let ejected = self.endpoint.stats.finish(
            outcome,
            self.started.elapsed(),
            &self.channel.inner.config.outlier,
            may_eject,
        );
        if ejected {
            self.channel
                .inner
                .stats
                .ejections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(service = %self.channel.inner.service,
                instance = %self.endpoint.instance.id, "instance ejected after failures");
        }
    }
}

impl ServiceChannel {
    /// A call begins: the instance list is there (waited for within the deadline), the call
    /// is counted, and the driver of its attempts is ready.
    async fn begin(&self, request: &RawRequest) -> Result<Attempts<'_, String, Status>, Status> {
        let deadline = request.options.timeout.map(|t| Instant::now() + t);
        self.wait_resolved(deadline).await?;
        let inner = &self.inner;
        inner
            .stats
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Attempts::new(
            &inner.budget,
            inner.config.retry.max_attempts,
            deadline,
            &inner.stats.retry,
        ))
    }

    /// The call's next attempt: an instance it has not failed on, and the request with the
    /// time left; or the error the call ends with.
    fn next_attempt(
        &self,
        request: &RawRequest,
        attempts: &mut Attempts<'_, String, Status>,
    ) -> Result<(Arc<Endpoint>, RawRequest), Status> {
        let Some(endpoint) = self.pick(request.options.hash_key, attempts.tried()) else {
            return Err(attempts.take_last_error().unwrap_or_else(|| {
                Status::unavailable(format!(
                    "no available instance of service {:?}",
                    self.inner.service
                ))
            }));
        };
        let left = attempts.start().map_err(given_up)?;
        let mut attempt = request.clone();
        if left.is_some() {
            attempt.options.timeout = left;
        }
        Ok((endpoint, attempt))
    }
}

/// The error a call ends with when it is not tried again.
fn given_up(give_up: GiveUp<Status>) -> Status {
    give_up
        .into_error()
        .unwrap_or_else(|| Status::deadline_exceeded("deadline passed before the call was sent"))
}

impl CallTransport for ServiceChannel {
    async fn unary_raw(&self, request: RawRequest) -> Result<RawResponse, Status> {
        let mut attempts = self.begin(&request).await?;
        let key = request.options.hash_key;
        loop {
            let (endpoint, attempt) = self.next_attempt(&request, &mut attempts)?;
            let (result, used) = match self.inner.config.hedge_after {
                Some(after) => {
                    self.attempt_hedged(endpoint, &attempt, after, key, &attempts)
                        .await
                }
                None => {
                    let r = self.attempt(&endpoint, attempt).await;
                    (r, endpoint)
                }
            };
            match result {
                Ok(reply) => return Ok(reply),
                Err(e) if retryable(e.code()) => {
                    tracing::debug!(service = %self.inner.service, instance = %used.instance.id,
                        error = %e, "the call did not run; another instance may take it");
                    attempts
                        .retry(used.instance.id.clone(), e)
                        .map_err(given_up)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn server_streaming_raw(&self, request: RawRequest) -> Result<RawStream, Status> {
        let mut attempts = self.begin(&request).await?;
        loop {
            let (endpoint, attempt) = self.next_attempt(&request, &mut attempts)?;
            match endpoint.channel.server_streaming_raw(attempt).await {
                Err(e) if retryable(e.code()) => {
                    attempts
                        .retry(endpoint.instance.id.clone(), e)
                        .map_err(given_up)?;
                }
                other => return other,
            }
        }
    }
}

/// Rebuilds the endpoint set from a new list, keeping the channel and statistics of every
/// instance that is still there at the same address.
/// Makes `endpoints` match `list` (nothing to do if it already does).
fn rebuild(inner: &Inner, list: &Arc<Endpoints>) {
    let mut applied = inner.applied.lock();
    if applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, list)) {
        return;
    }
    let old = inner.endpoints.read().clone();
    let next: Vec<Arc<Endpoint>> =
        list.instances
            .iter()
            .map(|instance| {
                match old.iter().find(|e| {
                    e.instance.id == instance.id && e.instance.address == instance.address
                }) {
                    Some(e) if e.instance == *instance => e.clone(),
                    // Same instance, new weight or labels: keep the connection, new record.
                    Some(e) => Arc::new(Endpoint {
                        instance: instance.clone(),
                        channel: e.channel.clone(),
                        stats: EndpointStats::default(),
                    }),
                    None => Arc::new(Endpoint {
                        instance: instance.clone(),
                        channel: Channel::with_config(
                            instance.address.clone(),
                            inner.config.channel.clone(),
                        ),
                        stats: EndpointStats::default(),
                    }),
                }
            })
            .collect();
    *inner.endpoints.write() = Arc::new(next);
    *applied = Some(list.clone());
    if list.resolved {
        inner.applied_resolved.store(true, Ordering::Release);
    }
}

async fn follow(
    inner: std::sync::Weak<Inner>,
    mut rx: watch::Receiver<Arc<Endpoints>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let list = rx.borrow_and_update().clone();
        let Some(inner) = inner.upgrade() else { return };
        rebuild(&inner, &list);
    }
}
